"""Pre-fork serving: several worker processes accept on one listening socket.

Python runs one thread at a time, and the measured Smart BCC path needs several milliseconds
of CPU per message, so one process cannot use a second core. The parent binds the inbound
socket and the submission sockets, prepares the table of per-client counters the workers share
(``mta/anvil.py``: connection and message limits per client address, failed logins), forks
``listeners.workers`` children that each build their own :class:`App` (their own database
connection and group committer; SQLite's WAL lets them commit in turn), and supervises them:
SIGTERM and SIGHUP are passed on (the parent reopens its own log file on HUP), a worker that
dies is started again (and clears its column of open connections), a worker that cannot start
(a listener cannot bind) stops them all with a non-zero exit. Every worker serves inbound mail
and submission. With SQLite only the first worker runs the outbox worker (single-process
delivery: what another worker queues leaves at the first one's next poll,
``outbox.poll_seconds``); with PostgreSQL every worker delivers (``SKIP LOCKED`` claims). The
parent writes the status file (its pid, the workers' pids) and serves the metrics endpoint,
summing the workers' counters.

On SIGTERM the parent closes its copies of the listening sockets at once, so that when the
workers close theirs (each as its stop begins, ``App.stop``) nothing listens any more: a new
connection is refused by the kernel instead of waiting in a backlog nobody accepts from and
being reset at exit.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .app import App, StartupError, bind_reason
from .clock import json_time
from .config import Config
from .logs import reopen_logs, setup_logging

log = logging.getLogger("dealmail.prefork")

#: A worker's exit status when it cannot start (EX_OSERR): retrying would only loop.
CANNOT_START = 71


def _child(config: Config, overrides: tuple[str, ...], base: Path, index: int,
           socks: dict[str, socket.socket]) -> None:
    setup_logging(config.server.log_level, config.server.log_file, config.server.log_format)
    sqlite = config.database.url.startswith("sqlite")
    app = App(config, overrides=overrides, base=base,
              start_outbox_worker=(index == 0 or not sqlite))
    app.prebound = dict(socks)
    # Mailbox sync: leases keep each account to one process; on SQLite one worker is enough.
    app.start_imap_sync = index == 0 or not sqlite
    app.worker_index = index
    app.table_prepared = True
    try:
        asyncio.run(app.serve_forever())
    finally:
        logging.shutdown()


def serve_prefork(config: Config, overrides: tuple[str, ...], base: Path,
                  prepare: Callable[[App], None]) -> int:
    """Bind, prepare the database once (schema, config mirror, demo data), fork, supervise."""
    from mta.anvil import ClientTable, table_path
    from mta.relay.tlscert import submission_context
    from mta.server import bind_listener

    setup = App(config, overrides=overrides, base=base)
    setup.open_store()
    prepare(setup)
    setup.store.close()
    ClientTable.prepare(table_path(config.database.url, base), config.listeners.workers)
    socks: dict[str, socket.socket] = {}
    bound: dict[str, str] = {}
    for name in ("inbound", "submission", "submissions"):
        listen = getattr(config.listeners, name)
        if not listen:
            continue
        try:
            socks[name] = bind_listener(listen)
        except OSError as exc:
            raise StartupError(f"listeners.{name}: cannot listen on {listen}: "
                               f"{bind_reason(exc)}") from exc
        host, port = socks[name].getsockname()[:2]
        bound[name] = f"{host}:{port}"
        log.info("%s listening on %s:%s (%d workers)",
                 "inbound SMTP" if name == "inbound" else name, host, port,
                 config.listeners.workers)
    if "submission" in socks or "submissions" in socks:
        # A self-signed certificate is made here, once, not by workers racing to write it.
        submission_context(config.tls.cert_file, config.tls.key_file, config.hostname, base,
                           setup.clock.now())
    children: dict[int, int] = {}  # pid -> worker index
    stopping = False
    exit_code = 0
    metrics = _serve_metrics(config, setup)
    status_file = _StatusFile(config, base, bound, metrics)

    def spawn(index: int) -> None:
        pid = os.fork()
        if pid == 0:  # the child
            code = 0
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGHUP, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides
                _child(config, overrides, base, index, socks)
            except StartupError as exc:
                log.error("worker %d cannot start: %s", index, exc)
                code = CANNOT_START
            except BaseException:
                log.exception("worker %d failed", index)
                code = 1
            finally:
                os._exit(code)
        children[pid] = index
        log.info("worker %d started (pid %d)", index, pid)
        status_file.write(children)

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        if signum in (signal.SIGTERM, signal.SIGINT):
            stopping = True
            for sock in socks.values():
                sock.close()  # see the module docstring
        if signum == signal.SIGHUP:
            reopen_logs()  # the workers reload (and reopen) themselves
        for pid in list(children):
            try:
                os.kill(pid, signal.SIGTERM if signum == signal.SIGINT else signum)
            except ProcessLookupError:
                pass

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    for index in range(config.listeners.workers):
        spawn(index)
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        if pid not in children:
            continue
        index = children.pop(pid)
        status_file.write(children)
        if os.waitstatus_to_exitcode(status) == CANNOT_START and not stopping:
            log.error("worker %d cannot start: stopping every worker", index)
            stopping = True
            exit_code = CANNOT_START
            forward(signal.SIGTERM, None)
            continue
        if not stopping:
            log.error("worker %d (pid %d) ended with status %d; starting it again", index,
                      pid, status)
            time.sleep(1.0)  # a crash loop must not spin (real time: no clock to inject)
            spawn(index)
    for sock in socks.values():
        sock.close()
    if metrics is not None:
        metrics.shutdown()
        metrics.server_close()
    status_file.write({}, "stopped")
    log.info("all workers stopped")
    sys.stdout.flush()
    return exit_code


def _serve_metrics(config: Config, setup: App) -> Any:
    """The parent's metrics endpoint: the workers' counters summed (prometheus_client's
    multi-process mode, switched on by ``dealmail serve``), the database gauges."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not config.listeners.metrics or not path:
        return None
    from mta.metrics import multiprocess_registry, prepare_multiprocess_dir, serve_metrics

    prepare_multiprocess_dir(path)
    try:
        server = serve_metrics(config.listeners.metrics, multiprocess_registry(path),
                               setup.clock.now)
    except OSError as exc:
        raise StartupError(f"listeners.metrics: cannot listen on {config.listeners.metrics}: "
                           f"{bind_reason(exc)}") from exc
    log.info("metrics on http://%s:%s/metrics", *server.server_address[:2])
    return server


class _StatusFile:
    """The parent's status file: what ``dealmail status`` shows about the running server."""

    def __init__(self, config: Config, base: Path, bound: dict[str, str], metrics: Any) -> None:
        name = config.server.status_file
        self.path = (Path(name) if Path(name).is_absolute() else base / name) if name else None
        self.config = config
        self.listeners = dict(bound)
        if metrics is not None:
            self.listeners["metrics"] = "{}:{}".format(*metrics.server_address[:2])
        self.started = json_time(datetime.now(UTC))

    def write(self, children: dict[int, int], state: str = "running") -> None:
        if self.path is None:
            return
        data = {"state": state, "pid": os.getpid(), "worker": None,
                "config": str(self.config.path), "started": self.started,
                "listeners": self.listeners, "last_error": None,
                "workers": [{"index": i, "pid": pid} for pid, i in sorted(
                    children.items(), key=lambda kv: kv[1])]}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
            os.replace(tmp, self.path)
        except OSError as exc:
            log.warning("cannot write the status file %s: %s", self.path, exc.strerror)
