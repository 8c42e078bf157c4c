"""SMTP listeners: aiosmtpd protocol objects, the hook object that routes and answers, limits.

``InboundHooks`` is aiosmtpd's "handler" object; we keep the word *handler* for the per-address
business logic in ``mta.handlers``. The hooks check recipients at RCPT time against the routing
table, and at DATA hand the message to the handler of its route: the handler's checks run in a
worker thread, its database work in the group committer, and the reply is sent only after the
commit returned. Any fault of ours answers ``451 4.3.0`` with an incident reference, never
aiosmtpd's default ``500`` with the exception text (docs/reliability.md §0.2).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import secrets
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiosmtpd.smtp import MISSING, SMTP, Envelope, Session

from crmstore.committer import GroupCommitter
from linking.capture import Evidence

from . import replies
from .metrics import Metrics, outcome_of_reply
from .replies import Reply
from .routing import Route, RoutingTable

log = logging.getLogger("dealmail.smtp")


def new_queue_id() -> str:
    """dealmail's own id for one SMTP transaction (carried by every log line about it)."""
    return secrets.token_hex(6).upper()


@dataclass
class DataContext:
    """Everything a handler gets about one received message."""

    raw: bytes
    mail_from: str
    routes: list[Route]
    peer_ip: str
    helo: str
    queue_id: str
    authenticated_as: str | None = None
    smtp_utf8: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


Job = Callable[[], Reply]


def evidence_of(ctx: DataContext) -> Evidence:
    """What an SMTP transaction tells the capture path about how a message arrived."""
    return Evidence(client_ip=ctx.peer_ip, helo=ctx.helo, envelope_from=ctx.mail_from,
                    authenticated_as=ctx.authenticated_as, tls=bool(ctx.extra.get("tls")))


class Handler(Protocol):
    """The business logic of one or more kinds of address (``mta.routing.KINDS``)."""

    #: The address kinds this handler answers for.
    serves: tuple[str, ...]

    def rcpt_check(self, route: Route) -> Reply | None:
        """At RCPT, off the event loop: a refusal when the address does not exist (say a
        ``+deal<ID>`` of no deal), else None."""
        ...

    def check(self, ctx: DataContext) -> Reply | Job:
        """Runs in a worker thread with no write access: parse, verify, decide. Returns the
        final reply (refusals, ignored auto-replies) or a job for the committer, which runs
        it in the transaction and returns the reply to send once committed."""
        ...


class ConnectionGate:
    """Caps simultaneous connections of one listener (aiosmtpd has none: its issue #282)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0


# RFC 5321 §4.1.2 Path with a dot-atom local part and a plain domain (no source route, no
# quoted local part, no address literal: those take aiosmtpd's full parser).
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_SIMPLE_PATH_RE = re.compile(
    rf"^\s*<({_ATEXT}(?:\.{_ATEXT})*@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
    rf"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*)>(.*)$", re.DOTALL)


class DealmailSMTP(SMTP):
    """aiosmtpd's protocol with our limits: connection cap, DATA deadline, enhanced codes."""

    def __init__(self, handler: Any, *, gate: ConnectionGate, data_timeout: float,
                 **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._gate = gate
        self._data_timeout = data_timeout
        self._counted = False
        self._deadline = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.transport is None
        if first and self._gate.open >= self._gate.limit:
            # RFC 5321 §3.8: 421 and close when the service cannot take the connection.
            assert isinstance(transport, asyncio.WriteTransport)
            transport.write(b"421 4.3.2 Too many connections, try again later\r\n")
            transport.close()
            return
        if first:
            self._gate.open += 1
            self._counted = True
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if self._counted:
            self._gate.open -= 1
            self._counted = False
        if self.session is None:
            return
        super().connection_lost(error)

    async def push(self, status: Any) -> None:
        # aiosmtpd's own replies lack enhanced status codes (RFC 2034) or are 500s where a
        # 4xx/5xx with a precise meaning is due.
        if isinstance(status, str):
            if status.startswith(("552 Error: Too much mail data",
                                  "552 Error: message size exceeds")):
                status = str(replies.too_big())
            elif status.startswith("500 Line too long"):
                # The upload was drained; the message breaks RFC 5322 §2.1.1 (998 octets).
                status = str(replies.bad_content("a line is longer than 998 characters "
                                                 "(RFC 5322 section 2.1.1)"))
            elif status.startswith("500 Error: ("):
                status = "451 4.3.0 Temporary local problem, please try again later"
        await super().push(status)

    def _reset_timeout(self, duration: float | None = None) -> None:
        """aiosmtpd cancels and creates a timer for every command (6% of a transaction's
        CPU, py-spy); keep one timer and move a deadline instead. The timer, when it fires
        early, re-arms itself for the current deadline."""
        loop = self.loop
        self._deadline = loop.time() + (duration or self._timeout_duration)
        handle = self._timeout_handle
        if handle is None or handle.cancelled() or handle.when() > self._deadline:
            if handle is not None:
                handle.cancel()
            self._timeout_handle = loop.call_at(self._deadline, self._check_deadline)

    def _check_deadline(self) -> None:
        if self.loop.time() >= self._deadline:
            self._timeout_cb()
        else:
            self._timeout_handle = self.loop.call_at(self._deadline, self._check_deadline)

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """MAIL/RCPT path argument. The common ``<local@domain>`` form is read with one
        regular expression; anything else goes to aiosmtpd's RFC 5322 parser, which costs
        ~0.4 ms per call (22% of the CPU of a BCC transaction, measured with py-spy)."""
        m = _SIMPLE_PATH_RE.match(arg or "")
        if m is None:
            return super()._getaddr(arg)  # type: ignore[no-any-return]
        address = m.group(1)
        if self.local_part_limit and len(address.rpartition("@")[0]) > self.local_part_limit:
            return None, None
        return address, m.group(2).lstrip()

    async def smtp_DATA(self, arg: str) -> None:
        """DATA as aiosmtpd does it (RFC 5321 §4.1.1.4, §4.5.2 dot-unstuffing, end only at
        CRLF.CRLF so bare-LF smuggling cannot end it early), but read into one buffer: aiosmtpd
        keeps a list of one bytearray per line, which for a 25 MB attachment costs ~20 MB of
        per-object overhead before the join copies it all again. The whole upload and our
        processing share one deadline, so a slow commit is not cut off before its 250."""
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        self._reset_timeout(self._data_timeout)
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        buf = bytearray()
        limit = self.data_size_limit
        received = 0
        too_long = too_much = False
        partial = False  # inside a line longer than the stream limit
        while self.transport is not None:
            try:
                line = await self._reader.readuntil(b"\r\n")
            except asyncio.CancelledError:
                self._writer.close()
                raise
            except asyncio.LimitOverrunError as exc:
                # A line over the limit: drain it, answer after the final dot (RFC 5321
                # §4.2.5 implies the reply waits for the end of the data).
                too_long = True
                await self._reader.read(exc.consumed)
                partial = True
                continue
            if partial:
                partial = False
                continue
            if line == b".\r\n":
                break
            received += len(line)
            if limit and received > limit:
                too_much = True
            if too_long or too_much:
                continue
            if len(line) > self.line_length_limit:
                too_long = True
                continue
            buf += memoryview(line)[1:] if line.startswith(b".") else line
        if too_long or too_much:
            del buf
            self._set_post_data_state()
            await self.push_data_reply(str(replies.bad_content(
                "a line is longer than 998 characters (RFC 5322 section 2.1.1)"))
                if too_long and not too_much else str(replies.too_big()))
            self._reset_timeout()
            return
        content = bytes(buf)
        del buf
        self.envelope.content = content
        self.envelope.original_content = content
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()
        await self.push_data_reply("250 OK" if status is MISSING else status)
        if self.transport is not None:
            self._reset_timeout()

    async def push_data_reply(self, status: str | list[str]) -> None:
        """The reply to the end of DATA: one line in SMTP. The LMTP listener (mta/lmtp.py)
        sends one per accepted recipient instead (RFC 2033 §4.2)."""
        for line in [status] if isinstance(status, str) else status:
            await self.push(line)


class InboundHooks:
    """aiosmtpd hook object of the inbound listener (Smart BCC, forwards, answers)."""

    def __init__(
        self,
        routing: Callable[[], RoutingTable],
        handlers: dict[str, Handler],
        committer: GroupCommitter,
        executor: ThreadPoolExecutor,
        max_recipients: Callable[[], int],
        has_space: Callable[[], bool] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.has_space = has_space
        self.metrics = metrics
        self._routing = routing
        self.handlers = handlers
        self.committer = committer
        self.executor = executor
        self.max_recipients = max_recipients

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: Envelope,
                          hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname
        # aiosmtpd handles pipelined commands in order; advertise it (RFC 2920) and our
        # enhanced status codes (RFC 2034).
        extra = ["250-PIPELINING", "250-ENHANCEDSTATUSCODES"]
        return [*responses[:-1], *extra, responses[-1]]

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, mail_options: list[str]) -> str:
        # Postfix's queue_minfree (docs/reliability.md A-DUR 5): refuse a transaction we could
        # not store, before the client sends it; a temporary reply, the client retries.
        if self.has_space is not None and not self.has_space():
            log.warning("refused MAIL from %s: not enough free disk space", peer_ip(session))
            return "452 4.3.1 Insufficient system storage"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        envelope.routes = []  # type: ignore[attr-defined]
        return "250 2.1.0 Ok"

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        routes: list[Route] = getattr(envelope, "routes", [])
        if len(envelope.rcpt_tos) >= self.max_recipients():
            return str(replies.too_many_recipients())
        route = self._routing().route(address)
        handler = self.handlers.get(route.kind) if route is not None else None
        if route is None or handler is None:
            log.info("refused RCPT <%s> from %s: not one of our addresses",
                     address, peer_ip(session))
            return str(replies.unknown_recipient(address))
        if routes:
            first = routes[0]
            if (first.company.slug != route.company.slug or not first.batchable
                    or not route.batchable):
                # RFC 5321 §3.3: a 452 for this recipient makes the client send it in a later
                # transaction, so each transaction has one company and one kind of handler.
                return "452 4.5.3 Please send to this address in a separate transaction"
        # The plain company address needs no database lookup; the others' checks run off
        # the event loop.
        if route.params:
            refusal = await asyncio.get_running_loop().run_in_executor(
                self.executor, handler.rcpt_check, route)
            if refusal is not None:
                return str(refusal)
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        routes.append(route)
        envelope.routes = routes  # type: ignore[attr-defined]
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        routes: list[Route] = getattr(envelope, "routes", [])
        queue_id = new_queue_id()
        raw = envelope.original_content or b""
        ctx = DataContext(
            raw=bytes(raw), mail_from=envelope.mail_from or "", routes=routes,
            peer_ip=peer_ip(session), helo=session.host_name or "", queue_id=queue_id,
            authenticated_as=_auth_login(session),
            smtp_utf8="SMTPUTF8" in [o.upper() for o in envelope.mail_options],
        )
        handler = self.handlers[routes[0].kind]
        return await decide_and_commit(self.executor, self.committer,
                                       functools.partial(handler.check, ctx), ctx,
                                       metrics=self.metrics)

    async def handle_exception(self, error: Exception) -> str:
        return incident_reply(error)


async def decide_and_commit(executor: ThreadPoolExecutor, committer: GroupCommitter,
                            check: Callable[[], Reply | Job], ctx: DataContext, *,
                            metrics: Metrics | None = None, listener: str = "inbound") -> str:
    """The DATA reply of a listener: the handler's check in a worker thread, then its job in
    the committer; the reply is sent only once that commit returned. Any fault of ours is a
    451 4.3.0 with our id, never a 5xx nor the exception text (RFC 5321 §4.2.5)."""
    started = time.perf_counter()
    try:
        decided = await asyncio.get_running_loop().run_in_executor(executor, check)
        reply = decided if isinstance(decided, Reply) else await committer.submit_async(decided)
    except Exception:
        log.exception("[%s] fault while handling DATA from %s", ctx.queue_id, ctx.peer_ip)
        fault = replies.temp_failure(ctx.queue_id)
        reply = Reply(fault.code, fault.status, fault.text, outcome="error")
    if metrics is not None:
        metrics.message(listener, outcome_of_reply(reply.code, reply.outcome),
                        time.perf_counter() - started)
    return str(reply)


def incident_reply(error: Exception) -> str:
    """aiosmtpd's handle_exception: 451 with an incident id instead of its 500 + text."""
    incident = new_queue_id()
    log.error("incident %s: SMTP session error", incident, exc_info=error)
    return str(replies.temp_failure(incident))


def peer_ip(session: Session) -> str:
    peer = session.peer
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return str(peer or "")


def _auth_login(session: Session) -> str | None:
    if not session.authenticated:
        return None
    data = session.auth_data
    login = getattr(data, "login", None)
    if isinstance(login, bytes):
        return login.decode("utf-8", "replace")
    return str(login) if login else None


def parse_listen(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


async def start_listener(
    hooks: Any, listen: str, *, hostname: str, data_size_limit: int | Callable[[], int],
    command_timeout: float,
    data_timeout: float, max_connections: int, sock: socket.socket | None = None,
    **smtp_kwargs: Any,
) -> asyncio.Server:
    """Listen on ``HOST:PORT`` (port 0 picks a free one; read it from the server's socket),
    or accept on ``sock``, a listening socket bound by the parent of several worker
    processes (pre-fork: the kernel hands each connection to one of them)."""
    host, port = parse_listen(listen)
    gate = ConnectionGate(max_connections)
    loop = asyncio.get_running_loop()

    def factory() -> DealmailSMTP:
        # A callable limit is read per connection: a reloaded limits.message_size applies
        # to the next session (SIZE in its EHLO and the DATA cut-off agree).
        return DealmailSMTP(
            hooks, gate=gate, data_timeout=data_timeout,
            data_size_limit=data_size_limit() if callable(data_size_limit) else data_size_limit,
            enable_SMTPUTF8=True, hostname=hostname,
            ident="dealmail ESMTP", timeout=command_timeout, loop=loop, **smtp_kwargs,
        )

    if sock is not None:
        return await loop.create_server(factory, sock=sock)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return await loop.create_server(factory, host=host, port=port, family=family)


def bind_listener(listen: str, backlog: int = 511) -> socket.socket:
    """A listening socket for ``HOST:PORT``, bound before the worker processes fork."""
    host, port = parse_listen(listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP matters: asyncio sets TCP_NODELAY on accepted sockets only when the
    # listening socket says TCP; without it each multi-line reply (EHLO) waits ~40 ms for
    # the client's delayed ACK (Nagle).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    sock.setblocking(False)
    return sock
