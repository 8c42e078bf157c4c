"""The application object: built once at start-up from the config and passed down.

It owns the store, the group committer, the worker pool, the routing table and the handlers,
and the current config (swapped whole on SIGHUP after validation; an invalid file leaves the
old one in force). Nothing in dealmail keeps mutable state at module level.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import ssl
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from crmstore import models as m
from crmstore.committer import GroupCommitter
from crmstore.db import Store
from digest.notices import deal_mismatch_hook
from digest.questions import after_record_hook, refresh_question
from digest.scheduler import DigestScheduler
from linking.capture import Capture, SenderGate
from linking.record import Directory
from mta.anvil import ClientTable, table_path
from mta.handlers.ask import AskHandler
from mta.handlers.choice import ChoiceHandler
from mta.handlers.smart_bcc import SmartBccHandler
from mta.imapsync.service import SyncService
from mta.metrics import Metrics, serve_metrics
from mta.relay.mx import AddrLookup, MxLookup
from mta.relay.worker import OutboxWorker
from mta.routing import RoutingTable
from mta.senderauth import DnsQuery, DnsTxt, SenderVerifier, dnspython_txt
from mta.server import (
    ClientLimits,
    Handler,
    InboundHooks,
    SessionLimits,
    Sessions,
    start_listener,
)
from mta.verification import crypto_verifier

from .clock import Clock, SystemClock, json_time
from .config import Config, ConfigError, check_files, load_config, needs_restart
from .logs import reopen_logs, setup_logging

log = logging.getLogger("dealmail.app")


class StartupError(Exception):
    """The server cannot start (a listener cannot bind, a file cannot be read): one clear
    line for the admin, no traceback."""


class App:
    def __init__(self, config: Config, clock: Clock | None = None,
                 overrides: tuple[str, ...] = (), base: Path | None = None,
                 dns_txt: DnsTxt | None = None, dns_query: DnsQuery | None = None,
                 mx_lookup: MxLookup | None = None, addr_lookup: AddrLookup | None = None,
                 outbox_ssl_context: ssl.SSLContext | None = None,
                 start_outbox_worker: bool = True) -> None:
        # DNS is injected in tests (no test touches the network); None = dnspython.
        self.dns_txt = dns_txt
        self.dns_query = dns_query
        self.mx_lookup = mx_lookup
        self.addr_lookup = addr_lookup
        self.outbox_ssl_context = outbox_ssl_context
        # Tests drive the worker with run_once() and an injected clock instead.
        self.start_outbox_worker = start_outbox_worker
        self.outbox: OutboxWorker | None = None
        # Set by the pre-fork parent (dealmail serve with listeners.workers > 1): the
        # listening sockets it bound, this worker's index, and that it prepared the table of
        # per-client counters (mta/anvil.py) every worker shares.
        self.prebound: dict[str, socket.socket] = {}
        self.run_submission = True
        self.table_prepared = False
        self.clients_table: ClientTable | None = None
        self.client_limits: ClientLimits | None = None
        # Every live SMTP session, so that a stop lets each finish its message.
        self.sessions = Sessions()
        self.inbound_hooks: InboundHooks | None = None
        self.digests: DigestScheduler | None = None
        self.config = config
        self.overrides = overrides
        self.clock: Clock = clock or SystemClock()
        self.base = base or Path.cwd()
        self.store = Store(config.database.url, self.base)
        self.committer: GroupCommitter | None = None
        self.executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="dealmail-work")
        self.directory: Directory | None = None
        self.routing = RoutingTable(config)
        self.servers: dict[str, asyncio.Server] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self.handlers: dict[str, Handler] = {}
        self.capture: Capture | None = None
        # Mailbox sync over IMAP (mta/imapsync); the pre-fork parent runs it in one worker
        # on SQLite. imap_tick: real seconds between looks at the clock while waiting.
        self.imap: SyncService | None = None
        self.start_imap_sync = True
        self.imap_tick = 1.0
        # Operations (docs: README "Operations"): the submission listeners' live TLS context
        # (reloaded on SIGHUP), the counters of mta.metrics, the status file `dealmail
        # status` reads. A pre-fork worker sets worker_index; its parent serves the metrics.
        self.tls_context: ssl.SSLContext | None = None
        self.metrics = Metrics()
        self.metrics_server: Any = None
        self.worker_index: int | None = None
        self.started_at: datetime | None = None
        self.last_reload: datetime | None = None
        self.last_error: dict[str, str] | None = None
        self._status_lock = threading.Lock()

    # ------------------------------------------------------------------ set-up

    def open_store(self) -> None:
        self.store.open()
        self.store.sync_config(self.config)
        self.directory = Directory(self.config)

    def get_config(self) -> Config:
        return self.config

    def get_directory(self) -> Directory:
        assert self.directory is not None, "open_store() first"
        return self.directory

    def build_capture(self) -> Capture:
        """The one capture path every source enters, with its sender gate and hooks."""
        verifier = crypto_verifier(self.get_config, self.dns_txt, self.dns_query,
                                   clock=lambda: self.clock.now().timestamp())
        capture = Capture(self.get_config, self.get_directory, self.clock.now,
                          SenderGate(self.get_config, verifier),
                          signature_check=self.check_signatures)
        # A "which deal?" question is queued in the transaction that stored the email.
        capture.add_hook(after_record_hook(self.get_config, self.get_directory,
                                           self.clock.now))
        # A +deal naming another customer's deal is obeyed, and the user is told.
        capture.add_hook(deal_mismatch_hook(self.get_config, self.get_directory,
                                            self.clock.now))
        return capture

    def build_handlers(self, capture: Capture) -> dict[str, Handler]:
        """The handler of each kind of address (``mta.routing.KINDS``)."""
        handlers: list[Handler] = [SmartBccHandler(capture),
                                   ChoiceHandler(capture, self.clock.now),
                                   AskHandler(capture, self.clock.now,
                                              scrub=self.store.scrub_after_commit)]
        return {kind: h for h in handlers for kind in h.serves}

    def build_outbox(self) -> OutboxWorker:
        return OutboxWorker(self.store, self.clock, self.get_config, self.mx_lookup,
                            self.addr_lookup, self.outbox_ssl_context,
                            refresh={"question": self.refresh_question},
                            metrics=self.metrics)

    def refresh_question(self, item: m.OutboxItem) -> bytes | None:
        """A due "which deal?" question is checked again: its threads may have been decided
        meanwhile (digest.questions.refresh_question)."""
        return refresh_question(self.config, item, self.clock.now())

    def has_space(self) -> bool:
        """Whether the database's file system can take 1.5 of the largest message (checked at
        MAIL; PostgreSQL manages its own storage)."""
        if not self.store.is_sqlite:
            return True
        try:
            st = os.statvfs(Path(self.store.db.database).parent)
        except OSError:
            return True  # cannot tell: do not refuse mail on a guess
        return st.f_bavail * st.f_frsize >= 1.5 * self.config.limits.message_size

    def after_commit(self) -> None:
        """Called from the committer thread once a batch is durable: wake the outbox worker
        (it only ever sends what is committed)."""
        if self.outbox is not None and self.loop is not None:
            self.loop.call_soon_threadsafe(self.outbox.wake)

    def check_signatures(self, raw: bytes, from_domain: str) -> list[dict[str, object]]:
        """DKIM results of a forwarded original (recorded, never a sender verification)."""
        config = self.config
        txt = self.dns_txt or dnspython_txt(timeout=config.policy.dns_timeout)
        checker = SenderVerifier(config.policy, txt, self.dns_query,
                                 clock=lambda: self.clock.now().timestamp())
        return [asdict(s) for s in checker.check_signatures(raw, from_domain)]

    def reload(self, path: Path | None = None) -> bool:
        """SIGHUP: reopen the log file (logrotate), validate the config file again and swap
        it in whole; keep the old one if invalid or if a file it names cannot be read.

        Every part reads the config through ``get_config`` when it starts a piece of work
        (a message's capture, a delivery attempt, a digest run), so each new transaction sees
        one config, old or new. Applied live: users (the database mirror, the directory and
        routing are rebuilt), policies, limits, outbox routes and credentials, DKIM keys,
        logging, and the submission listeners' certificate (loaded into their live TLS
        context). Listener addresses, the database URL and the worker count cannot change
        while listening: one line names them ("needs a restart: ...")."""
        reopen_logs()
        try:
            new = load_config(path or self.config.path, self.overrides)
            problems = check_files(new, self.base)
            if problems:
                raise ConfigError(problems)
        except ConfigError as exc:
            log.error("config reload refused, previous configuration stays in force:\n%s", exc)
            return False
        old = self.config
        if self.tls_context is not None:
            from mta.relay.tlscert import reload_context

            try:
                reload_context(self.tls_context, new.tls.cert_file, new.tls.key_file,
                               new.hostname, self.base, self.clock.now())
            except (OSError, ssl.SSLError) as exc:
                log.error("config reload refused, previous configuration stays in force: "
                          "tls: cannot load the certificate: %s", exc)
                return False
        self.store.sync_config(new)
        self.config = new
        self.directory = Directory(new)
        self.routing = RoutingTable(new, self.routing.enabled)
        if self.imap is not None and self.start_imap_sync:
            self.imap.refresh()  # mailboxes added or removed
        s_old, s_new = old.server, new.server
        if (s_old.log_level, s_old.log_file, s_old.log_format) != (
                s_new.log_level, s_new.log_file, s_new.log_format):
            setup_logging(s_new.log_level, s_new.log_file, s_new.log_format)
            self._watch_errors()
        self.last_reload = self.clock.now()
        log.info("config reloaded from %s", new.path)
        restart = needs_restart(old, new)
        if restart:
            log.warning("needs a restart: %s (the running values stay in force until then)",
                        ", ".join(restart))
        self.write_status()
        return True

    # ------------------------------------------------------------------ status

    def status_path(self) -> Path | None:
        """The status file of this process: ``server.status_file``; a pre-fork worker writes
        ``<file>.worker<N>`` beside its parent's."""
        name = self.config.server.status_file
        if not name:
            return None
        path = Path(name) if Path(name).is_absolute() else self.base / name
        if self.worker_index is not None:
            path = path.with_name(f"{path.name}.worker{self.worker_index}")
        return path

    def status(self, state: str = "running") -> dict[str, Any]:
        listeners = {name: self.address(name) for name, server in self.servers.items()
                     if server.sockets}
        if self.metrics_server is not None:
            host, port = self.metrics_server.server_address[:2]
            listeners["metrics"] = f"{host}:{port}"
        return {
            "state": state, "pid": os.getpid(), "worker": self.worker_index,
            "config": str(self.config.path), "database": _masked_url(self.config.database.url),
            "started": json_time(self.started_at), "reloaded": json_time(self.last_reload),
            "listeners": listeners, "last_error": self.last_error,
        }

    def write_status(self, state: str = "running") -> None:
        """Write the status file atomically (a reader never sees half of it)."""
        path = self.status_path()
        if path is None or self.started_at is None:
            return
        with self._status_lock:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(path.name + ".tmp")
                tmp.write_text(json.dumps(self.status(state), indent=2) + "\n",
                               encoding="utf-8")
                os.replace(tmp, path)
            except OSError as exc:
                log.warning("cannot write the status file %s: %s", path, exc.strerror)

    def _watch_errors(self) -> None:
        """Keep the last ERROR line for ``dealmail status`` (a handler on the root logger)."""
        root = logging.getLogger()
        if not any(isinstance(h, _LastError) for h in root.handlers):
            root.addHandler(_LastError(self))

    # ------------------------------------------------------------------ serving

    async def start(self) -> None:
        """Open the store and start the listeners (ports 0 pick free ones). A listener that
        cannot bind raises :class:`StartupError` naming it."""
        self.open_store()
        # One peewee Database per process: it keeps one connection per thread, so the
        # committer thread gets its own connection with the same durability pragmas.
        self.loop = asyncio.get_running_loop()
        self.committer = GroupCommitter(self.store, after_queue=self.after_commit)
        self.committer.start()
        self.outbox = self.build_outbox()
        if self.start_outbox_worker:
            self.outbox.start(self.config.outbox.poll_seconds)
        # Digests: polled every minute; tests call self.digests.run_once(now) instead.
        self.digests = DigestScheduler(self.store, self.get_config, self.clock)
        self.digests.start(60.0, after_queue=self.after_commit)
        self.capture = self.build_capture()
        self.handlers = self.build_handlers(self.capture)
        self.imap = SyncService(self.store, self.capture, self.get_config, self.clock, self.base,
                                tick=self.imap_tick)
        if self.start_imap_sync:
            await asyncio.get_running_loop().run_in_executor(None, self.imap.start)
        self.routing = RoutingTable(self.config, self.handlers)
        self.open_client_table()
        hooks = InboundHooks(
            lambda: self.routing, self.handlers, self.committer, self.executor,
            lambda: self.config.limits.max_recipients, has_space=self.has_space,
            metrics=self.metrics,
        )
        self.inbound_hooks = hooks
        c = self.config
        if c.listeners.inbound:
            try:
                self.servers["inbound"] = await start_listener(
                    hooks, c.listeners.inbound, sock=self.prebound.get("inbound"),
                    hostname=c.hostname,
                    data_size_limit=lambda: self.config.limits.message_size,
                    command_timeout=c.listeners.command_timeout,
                    data_timeout=c.listeners.data_timeout,
                    max_connections=c.listeners.max_connections,
                    line_length=c.limits.line_length, limits=self.session_limits,
                    clients=self.client_limits, sessions=self.sessions,
                )
            except OSError as exc:
                raise StartupError(f"listeners.inbound: cannot listen on {c.listeners.inbound}: "
                                   f"{bind_reason(exc)}") from exc
            log.info("inbound SMTP listening on %s", self.address("inbound"))
        # Authenticated relay (submission with STARTTLS, optional implicit TLS); every
        # worker serves it, their failed-login counters being in the shared table.
        from mta.relay.submission import start_submission_listeners

        if self.run_submission:
            try:
                self.servers.update(await start_submission_listeners(self))
            except OSError as exc:
                raise StartupError(f"listeners.submission: cannot listen on "
                                   f"{c.listeners.submission or c.listeners.submissions}: "
                                   f"{bind_reason(exc)}") from exc
        # LMTP behind the company's MTA: bound by the first worker only (not pre-bound).
        if c.listeners.lmtp and self.run_submission and not self.worker_index:
            try:
                await self.start_lmtp()
            except OSError as exc:
                raise StartupError(f"listeners.lmtp: cannot listen on {c.listeners.lmtp}: "
                                   f"{bind_reason(exc)}") from exc
        # The metrics endpoint: here, unless a pre-fork parent serves every worker's sum.
        if c.listeners.metrics and self.worker_index is None:
            try:
                self.metrics_server = serve_metrics(c.listeners.metrics, self.metrics.registry,
                                                    self.clock.now)
            except OSError as exc:
                raise StartupError(f"listeners.metrics: cannot listen on {c.listeners.metrics}: "
                                   f"{bind_reason(exc)}") from exc
            host, port = self.metrics_server.server_address[:2]
            log.info("metrics on http://%s:%s/metrics", host, port)
        self.started_at = self.clock.now()
        self._watch_errors()
        self.write_status()

    async def start_lmtp(self) -> None:
        """The LMTP listener behind the company's Postfix (mta/lmtp.py)."""
        from mta.lmtp import LmtpHooks, start_lmtp

        assert self.capture is not None and self.committer is not None
        c = self.config
        hooks = LmtpHooks(self.get_config, self.handlers, self.capture, self.committer,
                          self.executor, has_space=self.has_space)
        self.servers["lmtp"] = await start_lmtp(
            hooks, c.listeners.lmtp, hostname=c.hostname,
            data_size_limit=c.limits.message_size, command_timeout=c.listeners.command_timeout,
            data_timeout=c.listeners.data_timeout, max_connections=c.lmtp.max_connections,
            xforward_allowed=lambda peer: self.config.lmtp.xforward_allowed(peer),
            socket_mode=c.lmtp.socket_mode, line_length=c.limits.line_length,
            limits=self.session_limits, clients=self.client_limits, sessions=self.sessions)
        log.info("LMTP listening on %s", self.address("lmtp"))

    def open_client_table(self) -> None:
        """Map the table of per-client counters every worker shares (mta/anvil.py); a single
        process prepares it itself, a pre-fork worker clears its own column (the worker it
        replaces may have died with connections counted)."""
        path = table_path(self.config.database.url, self.base)
        if not self.table_prepared:
            ClientTable.prepare(path, workers=1)
        self.clients_table = ClientTable.open(path)
        worker = self.worker_index or 0
        if self.table_prepared:
            self.clients_table.clear_worker(worker)
        self.client_limits = ClientLimits(self.clients_table, worker,
                                          self.get_config,
                                          lambda: self.clock.now().timestamp())

    def session_limits(self) -> SessionLimits:
        """The limits of a new SMTP session, from the config of the moment (SIGHUP)."""
        return SessionLimits.of(self.config.listeners)

    def address(self, name: str) -> str:
        sock = self.servers[name].sockets[0]
        if sock.family == socket.AF_UNIX:
            return f"unix:{sock.getsockname()}"
        host, port = sock.getsockname()[:2]
        return f"{host}:{port}"

    def port(self, name: str) -> int:
        return int(self.servers[name].sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """Graceful stop (SIGTERM), bounded by ``listeners.stop_timeout``: the listeners stop
        accepting; a session waiting for a command is told ``421 4.3.2`` at once, one
        receiving or answering a message finishes it and gets its real answer first
        (``mta.server.Sessions.drain``); the outbox lets the delivery in flight finish and
        sends nothing more (``OutboxWorker.stop``). Only then does the committer stop, so no
        message is ever answered "committer stopped"."""
        within = self.config.listeners.stop_timeout
        self.sessions.stopping = True
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
            self.metrics_server.server_close()
        for server in self.servers.values():
            server.close()
        stopping = [self.sessions.drain(within)]
        if self.outbox is not None:
            stopping.append(self.outbox.stop(within))
        if self.digests is not None:
            stopping.append(self.digests.stop())
        await asyncio.gather(*stopping)
        for server in self.servers.values():
            await server.wait_closed()
        if self.imap is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.imap.stop)
        if self.committer is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.committer.stop)
        self.executor.shutdown(wait=True)
        self.store.close()
        if self.clients_table is not None:
            self.clients_table.close()
            self.clients_table = None
        self.write_status("stopped")
        root = logging.getLogger()
        for handler in [h for h in root.handlers if isinstance(h, _LastError)]:
            root.removeHandler(handler)
        log.info("stopped")

    async def serve_forever(self) -> None:
        """Run until SIGTERM/SIGINT; SIGHUP reloads the config."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        # Before start(): a HUP or TERM sent as soon as the first log line appears must not
        # meet the default action (which would end the process).
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        try:
            await self.start()
        except StartupError:
            await self.stop()  # what did start (committer, outbox, listeners) ends cleanly
            raise
        await stop.wait()
        log.info("SIGTERM received: stopping")
        await self.stop()



class _LastError(logging.Handler):
    """Remembers the last ERROR line of the process for the status file."""

    def __init__(self, app: App) -> None:
        super().__init__(logging.ERROR)
        self.app = app

    def emit(self, record: logging.LogRecord) -> None:
        if record.name == "dealmail.app" and "status file" in record.getMessage():
            return
        self.app.last_error = {"at": json_time(datetime.fromtimestamp(record.created, UTC)) or "",
                               "logger": record.name,
                               "message": record.getMessage().splitlines()[0][:300]}
        self.app.write_status()


def _masked_url(url: str) -> str:
    """A database URL without its password (``postgresql://user:***@host/db``)."""
    head, sep, rest = url.partition("://")
    if "@" not in rest:
        return url
    creds, _, host = rest.rpartition("@")
    user = creds.split(":", 1)[0]
    return f"{head}{sep}{user}{':***' if ':' in creds else ''}@{host}"


def bind_reason(exc: OSError) -> str:
    """Why a listener could not bind, as the system says it ("Address already in use");
    asyncio wraps the errno in a longer message of its own."""
    return os.strerror(exc.errno) if exc.errno else str(exc)
