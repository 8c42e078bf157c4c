"""The private Dovecot of the test session (``bench/dovecot.py`` runs it) and helpers to fill
mailboxes and configure dealmail to sync them.

A missing ``dovecot`` binary fails the tests loudly (``scripts/test`` installs the Debian
package ``dovecot-imapd``): an IMAP sync that was never run against a real server is not
tested.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from datetime import UTC, datetime
from email.utils import format_datetime, make_msgid
from pathlib import Path
from typing import Any

import pytest
from imapclient import IMAPClient

from bench.dovecot import DovecotMissing, PrivateDovecot
from dealmail.config import Config, load_config

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "conf" / "dealmail.example.toml"
BOB_BLOCK = '[[companies.users]]\naddress = "bob@example.com"'


@pytest.fixture(scope="session")
def dovecot() -> Iterator[PrivateDovecot]:
    try:
        server = PrivateDovecot()
    except DovecotMissing as exc:
        pytest.fail(f"{exc}: scripts/test installs it; IMAP sync tests never skip")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def imap_login(dovecot: PrivateDovecot, login: str) -> IMAPClient:
    """A second, independent client (another mail program of the user)."""
    ctx = ssl.create_default_context(cafile=str(dovecot.ca_file))
    client = IMAPClient(dovecot.host, dovecot.tls_port, ssl_context=ctx, timeout=30)
    client.login(login, dovecot.users[login])
    return client


def mail(i: int, *, sender: str = "carl@other.test", to: str = "alice@example.com",
         subject: str | None = None, body: str = "Hello", size: int = 0,
         message_id: str | None = None) -> bytes:
    text = body + ("\r\n" + "x" * 76) * (size // 78)
    return (f"From: Sender <{sender}>\r\nTo: <{to}>\r\n"
            f"Subject: {subject or f'message {i}'}\r\n"
            f"Date: {format_datetime(datetime(2026, 11, 20, 9, 0, tzinfo=UTC))}\r\n"
            f"Message-ID: {message_id or make_msgid(f'm{i}', 'sender.test')}\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
            f"{text}\r\n").encode()


def mailbox_block(dovecot: PrivateDovecot, login: str, password_file: Path, **extra: object
                  ) -> str:
    lines = ["[[companies.users.mailboxes]]", 'provider = "imap"',
             f'host = "{dovecot.host}"', f"port = {dovecot.tls_port}",
             'tls = "implicit"', f'ca_file = "{dovecot.ca_file}"', f'username = "{login}"',
             f'password_file = "{password_file}"', "since_days = 0"]
    for key, value in extra.items():
        if isinstance(value, bool):
            lines.append(f"{key} = {'true' if value else 'false'}")
        elif isinstance(value, int):
            lines.append(f"{key} = {value}")
        elif isinstance(value, list):
            lines.append(f"{key} = [{', '.join(repr(v).replace(chr(39), chr(34)) for v in value)}]")
        else:
            lines.append(f'{key} = "{value}"')
    return "\n".join(lines) + "\n\n"


def sync_config(tmp_path: Path, dovecot: PrivateDovecot, login: str, *overrides: str,
                password: str | None = None, alice_extra: str = "", alice_keys: str = "",
                relay_password: str | None = None, **extra: object) -> Config:
    """The example config with ``login``'s Dovecot mailbox on alice, a fresh database
    (``relay_password``: alice's submission password)."""
    secret = tmp_path / f"{login}.secret"
    secret.write_text((password or dovecot.users[login]) + "\n")
    block = alice_keys + mailbox_block(dovecot, login, secret, **extra) + alice_extra
    return config_with(tmp_path, block, *overrides, relay_password=relay_password)


def _without_keys(text: str, block: str) -> str:
    """The example without alice's own lines for keys that ``block`` sets."""
    for line in block.splitlines():
        key = line.split("=", 1)[0].strip()
        if "=" in line and not line.startswith(("[", "#")):
            text = "\n".join(x for x in text.split("\n")
                             if not (x.startswith(f"{key} = ") and x.endswith("[]")))
    return text


def config_with(tmp_path: Path, alice_block: str, *overrides: str,
                relay_password: str | None = None) -> Config:
    """The example config with ``alice_block`` (mailbox blocks) after alice's user block."""
    head = alice_block.split("[[", 1)[0]  # alice's own keys, before any mailbox block
    text = _without_keys(EXAMPLE.read_text(encoding="utf-8"), head)
    text = text.replace(BOB_BLOCK, alice_block + BOB_BLOCK)
    path = tmp_path / "dealmail.toml"
    path.write_text(text, encoding="utf-8")
    if relay_password:
        from dealmail.passwords import hash_password, set_password_in_file

        set_password_in_file(path, "alice@example.com", hash_password(relay_password))
    return load_config(path, [
        f"database.url=sqlite:///{tmp_path}/dealmail.db",
        "listeners.inbound=127.0.0.1:0",
        "listeners.submission=",
        f"server.demo_data={ROOT / 'conf' / 'demo'}",
        *overrides,
    ])


@pytest.fixture
def app_factory(tmp_path: Path, clock: Any, dns: Any) -> Iterator[Any]:
    """Start an App (no outbox worker) whose mailbox sync the test drives, or starts with
    ``sync=True`` (``tick``: real seconds between the threads' looks at the clock)."""
    from conftest import RunningApp

    from dealmail.app import App

    started: list[Any] = []

    def start(config: Config, *, sync: bool = False, tick: float = 0.05) -> Any:
        app = App(config, clock=clock, base=tmp_path, dns_txt=dns.lookup_txt,
                  dns_query=dns.lookup, start_outbox_worker=False)
        app.start_imap_sync = sync
        app.imap_tick = tick
        running = RunningApp(app)
        running.start()
        started.append(running)
        return running

    yield start
    for running in started:
        if running.thread.is_alive():  # a test may have stopped one itself
            running.stop()


def new_sync(running: Any) -> Any:
    """The sync object of alice's first mailbox (what the service's thread keeps)."""
    from mta.imapsync.lease import ensure_account
    from mta.imapsync.service import configured_accounts
    from mta.imapsync.sync import AccountSync

    app = running.app
    account = next(iter(configured_accounts(app.config)[0].values()))
    sync = AccountSync(account, app.imap.deps)
    sync.account_id = ensure_account(app.store, account.key, account.user.address)
    return sync


def one_pass(running: Any, sync: Any = None) -> Any:
    """One catch-up of alice's first mailbox, as the service's thread runs it (``sync``: the
    account's sync object of an earlier pass, as the thread keeps it)."""
    app = running.app
    sync = sync or new_sync(running)
    assert app.imap.deps.lease.acquire(sync.account_id)
    client = sync.open()
    try:
        sync.catch_up(client)
        sync.record_success()
    finally:
        sync.close()
    return sync


def imap_emails(user: str = "alice@example.com") -> int:
    """How many emails ``user`` got through the mailbox sync."""
    from crmstore import models as m

    return (m.Sighting.select().join(m.User)
            .where((m.User.address == user) & (m.Sighting.channel == "imap")).count())
