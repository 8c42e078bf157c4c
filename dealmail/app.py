"""The application object: built once at start-up from the config and passed down.

It owns the store, the group committer, the worker pool, the routing table and the handlers,
and the current config (swapped whole on SIGHUP after validation; an invalid file leaves the
old one in force). Nothing in dealmail keeps mutable state at module level.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import ssl
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

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

from .clock import Clock, SystemClock
from .config import Config, ConfigError, load_config

log = logging.getLogger("dealmail.app")


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
        self.worker_index = 0
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
                                   AskHandler(capture, self.clock.now)]
        return {kind: h for h in handlers for kind in h.serves}

    def build_outbox(self) -> OutboxWorker:
        return OutboxWorker(self.store, self.clock, self.get_config, self.mx_lookup,
                            self.addr_lookup, self.outbox_ssl_context,
                            refresh={"question": self.refresh_question})

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
        """Validate the config file again and swap it in; keep the old one if invalid."""
        try:
            new = load_config(path or self.config.path, self.overrides)
        except ConfigError as exc:
            log.error("config reload refused, previous configuration stays in force:\n%s", exc)
            return False
        self.store.sync_config(new)
        self.config = new
        self.directory = Directory(new)
        self.routing = RoutingTable(new, self.routing.enabled)
        log.info("config reloaded from %s", new.path)
        return True

    # ------------------------------------------------------------------ serving

    async def start(self) -> None:
        """Open the store and start the listeners (ports 0 pick free ones)."""
        self.open_store()
        # One peewee Database per process: it keeps one connection per thread, so the
        # committer thread gets its own connection with the same durability pragmas.
        self.loop = asyncio.get_running_loop()
        self.committer = GroupCommitter(self.store, after_commit=self.after_commit)
        self.committer.start()
        self.outbox = self.build_outbox()
        if self.start_outbox_worker:
            self.outbox.start(self.config.outbox.poll_seconds)
        # Digests: polled every minute; tests call self.digests.run_once(now) instead.
        self.digests = DigestScheduler(self.store, self.get_config, self.clock)
        self.digests.start(60.0, after_queue=self.after_commit)
        self.capture = self.build_capture()
        self.handlers = self.build_handlers(self.capture)
        self.routing = RoutingTable(self.config, self.handlers)
        self.open_client_table()
        hooks = InboundHooks(
            lambda: self.routing, self.handlers, self.committer, self.executor,
            lambda: self.config.limits.max_recipients, has_space=self.has_space,
        )
        self.inbound_hooks = hooks
        c = self.config
        if c.listeners.inbound:
            self.servers["inbound"] = await start_listener(
                hooks, c.listeners.inbound, sock=self.prebound.get("inbound"),
                hostname=c.hostname,
                data_size_limit=c.limits.message_size, command_timeout=c.listeners.command_timeout,
                data_timeout=c.listeners.data_timeout, max_connections=c.listeners.max_connections,
                line_length=c.limits.line_length, limits=self.session_limits,
                clients=self.client_limits, sessions=self.sessions,
            )
            log.info("inbound SMTP listening on %s", self.address("inbound"))
        # Authenticated relay (submission with STARTTLS, optional implicit TLS); every
        # worker serves it, their failed-login counters being in the shared table.
        from mta.relay.submission import start_submission_listeners

        if self.run_submission:
            self.servers.update(await start_submission_listeners(self))

    def open_client_table(self) -> None:
        """Map the table of per-client counters every worker shares (mta/anvil.py); a single
        process prepares it itself, a pre-fork worker clears its own column (the worker it
        replaces may have died with connections counted)."""
        path = table_path(self.config.database.url, self.base)
        if not self.table_prepared:
            ClientTable.prepare(path, workers=1)
        self.clients_table = ClientTable.open(path)
        if self.table_prepared:
            self.clients_table.clear_worker(self.worker_index)
        self.client_limits = ClientLimits(self.clients_table, self.worker_index,
                                          self.get_config,
                                          lambda: self.clock.now().timestamp())

    def session_limits(self) -> SessionLimits:
        """The limits of a new SMTP session, from the config of the moment (SIGHUP)."""
        return SessionLimits.of(self.config.listeners)

    def address(self, name: str) -> str:
        sock = self.servers[name].sockets[0]
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
        if self.committer is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.committer.stop)
        self.executor.shutdown(wait=True)
        self.store.close()
        if self.clients_table is not None:
            self.clients_table.close()
            self.clients_table = None
        log.info("stopped")

    async def serve_forever(self) -> None:
        """Run until SIGTERM/SIGINT; SIGHUP reloads the config."""
        await self.start()
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        await stop.wait()
        log.info("SIGTERM received: stopping")
        await self.stop()

