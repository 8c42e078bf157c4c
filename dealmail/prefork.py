"""Pre-fork serving: several worker processes accept on one listening socket.

Python runs one thread at a time, and the measured Smart BCC path needs several milliseconds
of CPU per message, so one process cannot use a second core. The parent binds the inbound
socket, forks ``listeners.workers`` children that each build their own :class:`App` (their
own database connection and group committer; SQLite's WAL lets them commit in turn), and
supervises them: SIGTERM and SIGHUP are passed on, a worker that dies is started again.
With SQLite only the first worker runs the outbox worker and the submission listener
(single-process delivery); with PostgreSQL every worker delivers (``SKIP LOCKED`` claims).
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
           sock: socket.socket) -> None:
    setup_logging(config.server.log_level, config.server.log_file)
    sqlite = config.database.url.startswith("sqlite")
    app = App(config, overrides=overrides, base=base,
              start_outbox_worker=(index == 0 or not sqlite))
    app.prebound = {"inbound": sock}
    app.run_submission = index == 0
    # Mailbox sync: leases keep each account to one process; on SQLite one worker is enough.
    app.start_imap_sync = index == 0 or not sqlite
    try:
        asyncio.run(app.serve_forever())
    finally:
        logging.shutdown()


def serve_prefork(config: Config, overrides: tuple[str, ...], base: Path,
                  prepare: Callable[[App], None]) -> int:
    """Bind, prepare the database once (schema, config mirror, demo data), fork, supervise."""
    from mta.server import bind_listener

    setup = App(config, overrides=overrides, base=base)
    setup.open_store()
    prepare(setup)
    setup.store.close()
    sock = bind_listener(config.listeners.inbound)
    host, port = sock.getsockname()[:2]
    log.info("inbound SMTP listening on %s:%s (%d workers)", host, port, config.listeners.workers)
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
                _child(config, overrides, base, index, sock)
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
    sock.close()
    log.info("all workers stopped")
    sys.stdout.flush()
    return 0
