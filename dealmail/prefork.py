"""Pre-fork serving: several worker processes accept on one listening socket.

Python runs one thread at a time, and the measured Smart BCC path needs several milliseconds
of CPU per message, so one process cannot use a second core. The parent binds the inbound
socket and the submission sockets, prepares the table of per-client counters they share
(``mta/anvil.py``: connection and message limits per client address, failed logins), forks
``listeners.workers`` children that each build their own :class:`App` (their own database
connection and group committer; SQLite's WAL lets them commit in turn), and supervises them:
SIGTERM and SIGHUP are passed on, a worker that dies is started again (and clears its column
of open connections). Every worker serves inbound mail and submission. With SQLite only the
first worker runs the outbox worker (single-process delivery: what another worker queues
leaves at the first one's next poll, ``outbox.poll_seconds``); with PostgreSQL every worker
delivers (``SKIP LOCKED`` claims).

On SIGTERM the parent closes its copies of the listening sockets at once, so that when the
workers close theirs (each as its stop begins, ``App.stop``) nothing listens any more: a new
connection is refused by the kernel instead of waiting in a backlog nobody accepts from and
being reset at exit.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

from .app import App
from .config import Config
from .logs import setup_logging

log = logging.getLogger("dealmail.prefork")


def _child(config: Config, overrides: tuple[str, ...], base: Path, index: int,
           socks: dict[str, socket.socket]) -> None:
    setup_logging(config.server.log_level, config.server.log_file)
    sqlite = config.database.url.startswith("sqlite")
    app = App(config, overrides=overrides, base=base,
              start_outbox_worker=(index == 0 or not sqlite))
    app.prebound = dict(socks)
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
    workers = config.listeners.workers
    socks: dict[str, socket.socket] = {}
    for name in ("inbound", "submission", "submissions"):
        listen = getattr(config.listeners, name)
        if not listen:
            continue
        socks[name] = bind_listener(listen)
        host, port = socks[name].getsockname()[:2]
        log.info("%s listening on %s:%s (%d workers)",
                 "inbound SMTP" if name == "inbound" else name, host, port, workers)
    if "submission" in socks or "submissions" in socks:
        # A self-signed certificate is made here, once, not by workers racing to write it.
        submission_context(config.tls.cert_file, config.tls.key_file, config.hostname, base,
                           setup.clock.now())
    children: dict[int, int] = {}  # pid -> worker index
    stopping = False

    def spawn(index: int) -> None:
        pid = os.fork()
        if pid == 0:  # the child
            code = 0
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGHUP, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides
                _child(config, overrides, base, index, socks)
            except BaseException:
                log.exception("worker %d failed", index)
                code = 1
            finally:
                os._exit(code)
        children[pid] = index
        log.info("worker %d started (pid %d)", index, pid)

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        if signum in (signal.SIGTERM, signal.SIGINT):
            stopping = True
            for sock in socks.values():
                sock.close()  # see the module docstring
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
        if not stopping:
            log.error("worker %d (pid %d) ended with status %d; starting it again", index,
                      pid, status)
            time.sleep(1.0)  # a crash loop must not spin (real time: no clock to inject)
            spawn(index)
    for sock in socks.values():
        sock.close()
    log.info("all workers stopped")
    sys.stdout.flush()
    return 0
