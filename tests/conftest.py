"""Shared fixtures: a real dealmail server on OS-assigned loopback ports with a real database.

The server runs its own asyncio loop in a background thread, so tests drive it with blocking
real clients (smtplib, swaks) exactly as a mail client would.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from crmstore.db import Store
from dealmail.app import App
from dealmail.clock import FakeClock
from dealmail.config import Config, load_config

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "conf" / "dealmail.example.toml"
CORPUS = ROOT.parent / "shared" / "corpus"


def corpus_dir(*parts: str) -> Path:
    """A folder of ../shared/corpus; fails loudly in CI, skips elsewhere when missing."""
    path = CORPUS.joinpath(*parts)
    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail(f"corpus folder {path} is missing (CI must have ../shared/corpus)")
        pytest.skip(f"corpus folder {path} not available here")
    return path


def make_config(tmp_path: Path, *overrides: str, path: Path = EXAMPLE) -> Config:
    return load_config(path, [
        f"database.url=sqlite:///{tmp_path}/dealmail.db",
        "listeners.inbound=127.0.0.1:0",
        "listeners.submission=",
        f"server.demo_data={ROOT / 'conf' / 'demo'}",
        f"server.status_file={tmp_path}/status.json",
        *overrides,
    ])


class RunningApp:
    """A started App in a background event loop thread."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def start(self) -> None:
        from dealmail.cli import load_demo_if_empty

        self.thread.start()
        self.call(self.app.start())
        load_demo_if_empty(self.app)

    def call(self, coro: Any, timeout: float = 30) -> Any:
        fut: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result(timeout)

    @property
    def port(self) -> int:
        return self.app.port("inbound")

    def stop(self) -> None:
        try:
            self.call(self.app.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """``dealmail.cli.main`` installs its own root log handler (as a real run must); tests
    that call it in-process give pytest's handlers back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def config_copy(tmp_path: Path) -> Path:
    """A writable copy of the example config."""
    path = tmp_path / "dealmail.toml"
    path.write_text(EXAMPLE.read_text(encoding="utf-8"), encoding="utf-8")
    return path


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


class DnsRecords:
    """Injected DNS for the server under test: no test touches the network. ``txt`` maps a
    name to its TXT strings; a name in ``fail`` raises a temporary failure (timeout)."""

    def __init__(self) -> None:
        self.txt: dict[str, list[str]] = {}
        self.fail: set[str] = set()

    def lookup_txt(self, name: str) -> list[str]:
        from mta.senderauth import DnsTempError

        key = name.rstrip(".").lower()
        if key in self.fail:
            raise DnsTempError(f"timeout for {key} (injected)")
        return list(self.txt.get(key, []))

    def lookup(self, name: str, qtype: str) -> list[str]:
        return []


@pytest.fixture
def dns() -> DnsRecords:
    return DnsRecords()


@pytest.fixture
def server_factory(tmp_path: Path, clock: FakeClock, dns: DnsRecords) -> Iterator[Any]:
    started: list[RunningApp] = []

    def start(*overrides: str, config: Config | None = None,
              start_outbox_worker: bool = True) -> RunningApp:
        cfg = config or make_config(tmp_path, *overrides)
        # start_outbox_worker=False: the test drives app.outbox.run_once() itself.
        running = RunningApp(App(cfg, clock=clock, overrides=overrides, base=ROOT,
                                 dns_txt=dns.lookup_txt, dns_query=dns.lookup,
                                 start_outbox_worker=start_outbox_worker))
        running.start()
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()


@pytest.fixture
def server(server_factory: Any) -> RunningApp:
    """The example config with the demo data, inbound SMTP on a free loopback port."""
    return server_factory()


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database on the local server, dropped afterwards."""
    psycopg2 = pytest.importorskip("psycopg2")
    name = f"dealmail_test_{uuid.uuid4().hex[:10]}"
    try:
        admin = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres",
                                 dbname="postgres", connect_timeout=3)
    except Exception as exc:  # the driver's OperationalError
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL on 127.0.0.1:5432 is required in CI: {exc}")
        pytest.skip(f"PostgreSQL not reachable: {exc}")
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    url = f"postgresql://postgres@127.0.0.1:5432/{name}"
    try:
        yield url
    finally:
        from mta.anvil import table_path

        # The per-client table of a server on this database (under ROOT/var: base=ROOT).
        table_path(url, ROOT).unlink(missing_ok=True)
        with admin.cursor() as cur:
            cur.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                (name,))
            cur.execute(f'DROP DATABASE IF EXISTS "{name}"')
        admin.close()


@pytest.fixture(scope="session")
def backend_stores(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], Store]]:
    """The open store of each backend, made when first asked for: a schema (and a PostgreSQL
    database, ~1 s on a busy machine) is created once per test session, not once per test."""
    from support.crm import pg_database

    with ExitStack() as stack:
        stores: dict[str, Store] = {}

        def get(backend: str) -> Store:
            if backend not in stores:
                if backend == "sqlite":
                    url = f"sqlite:///{tmp_path_factory.mktemp('store')}/dealmail.db"
                else:
                    url = stack.enter_context(pg_database("store"))
                s = Store(url)
                s.open()
                stack.callback(s.close)  # before the database is dropped
                stores[backend] = s
            return stores[backend]

        yield get


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest, tmp_path: Path,
          backend_stores: Callable[[str], Store]) -> Store:
    """An open :class:`crmstore.db.Store` on a real SQLite file or on the local PostgreSQL
    holding only the example config's company and users (the session's store, emptied)."""
    from support.crm import empty_store

    return empty_store(backend_stores(request.param), make_config(tmp_path))


# The session's private Dovecot and an App factory for the mailbox sync tests.
from support.dovecot import app_factory, dovecot  # noqa: E402, F401
