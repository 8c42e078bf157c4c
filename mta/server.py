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
import ipaddress
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

from crmstore.committer import CommitterStopped, GroupCommitter
from dealmail.config import Config, LimitsConfig, ListenersConfig
from linking.capture import Evidence
from linking.parse import NESTED_TOO_DEEPLY

from . import replies
from .anvil import ClientTable, client_key
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


@dataclass(frozen=True)
class SessionLimits:
    """Per-session limits (``[listeners]``), read once per connection."""

    #: Commands without a completed transaction, accepted RCPTs not counted.
    max_commands: int = ListenersConfig.max_commands
    #: Seconds a session may last in all.
    lifetime: float = ListenersConfig.session_lifetime
    #: Bytes per second during DATA over each window; 0: no rate rule.
    min_data_rate: int = ListenersConfig.min_data_rate
    data_rate_window: float = ListenersConfig.data_rate_window

    @classmethod
    def of(cls, listeners: ListenersConfig) -> SessionLimits:
        return cls(listeners.max_commands, listeners.session_lifetime,
                   listeners.min_data_rate, listeners.data_rate_window)


class ClientLimits:
    """The ``[clients]`` limits of one worker process: simultaneous connections, connection
    rate and message rate per client address, counted in the table every worker shares
    (:mod:`mta.anvil`). Exempt networks are not counted. A fault of the table never refuses
    a client (it is logged and the client served)."""

    def __init__(self, table: ClientTable | None, worker: int,
                 config_of: Callable[[], Config], now: Callable[[], float]) -> None:
        self.table = table
        self.worker = worker
        self.config_of = config_of
        self.now = now

    def key(self, ip: str) -> str | None:
        """The key ``ip`` is counted by, or None when it is exempt."""
        if self.table is None:
            return None
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return None  # not an IP client (a UNIX socket: the local MTA)
        exempt = self.config_of().clients.exempt_networks
        if exempt:
            if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
                addr = addr.ipv4_mapped
            if any(addr in net for net in exempt):
                return None
        return client_key(ip)

    def connect(self, key: str) -> str | None:
        """Count a new connection; the reply that refuses it, or None."""
        assert self.table is not None
        c = self.config_of().clients
        try:
            refused = self.table.connect(key, self.worker, self.now(), c.rate_window,
                                         c.max_connections, c.connection_rate)
        except (OSError, ValueError):  # ValueError: the table was closed (a stop)
            log.exception("client table unusable: %s served without limits", key)
            return None
        if refused is None:
            return None
        # RFC 5321 §3.8 (421 and close); 4.7.0 as Postfix's anvil-based refusals.
        if refused == "connections":
            log.info("refused connection from %s: %d connections already open", key,
                     c.max_connections)
            return "421 4.7.0 Too many connections from your address, try again later"
        log.info("refused connection from %s: more than %d connections in %g s", key,
                 c.connection_rate, c.rate_window)
        return "421 4.7.0 Too many connections from your address in a short time"

    def disconnect(self, key: str) -> None:
        assert self.table is not None
        try:
            self.table.disconnect(key, self.worker, self.now())
        except ValueError:
            pass  # the table was closed: the process is stopping, nothing is counted any more
        except OSError:
            log.exception("client table unusable: %s not counted out", key)

    def mail(self, key: str) -> str | None:
        """Count one MAIL; the reply that refuses it, or None."""
        assert self.table is not None
        c = self.config_of().clients
        if not c.message_rate:
            return None
        try:
            if self.table.message(key, self.now(), c.rate_window, c.message_rate):
                return None
        except (OSError, ValueError):  # ValueError: the table was closed (a stop)
            log.exception("client table unusable: %s served without limits", key)
            return None
        log.info("refused MAIL from %s: more than %d messages in %g s", key, c.message_rate,
                 c.rate_window)
        return "450 4.7.1 Too much mail from your address, try again later"


class Sessions:
    """The live SMTP sessions of one process (every listener), so that a stop can let each
    finish what it is doing and tell the rest 421 (RFC 5321 §3.8)."""

    def __init__(self) -> None:
        self.live: set[DealmailSMTP] = set()
        self.stopping = False

    async def drain(self, within: float, tick: float = 0.05) -> None:
        """Stop: an idle session is told 421 4.3.2 at once; one receiving or answering a
        message finishes it, gets its real answer, then 421; after ``within`` seconds what
        is left is told 421 and closed (its message unacknowledged: the client retries)."""
        self.stopping = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while True:
            for session in list(self.live):
                session.shut_down()
            if not self.live or loop.time() >= deadline:
                break
            # Sessions finish on their own; a short poll notices those that went idle.
            await asyncio.sleep(tick)
        for session in list(self.live):
            session.shut_down(force=True)
        if self.live:
            await asyncio.sleep(0)  # let the transports report connection_lost


class _CountingMethods(dict[str, Any]):
    """aiosmtpd's table of command methods, whose ``get`` is how it dispatches each command
    line: the one place to count commands and to answer them differently (see
    :meth:`DealmailSMTP._on_command`)."""

    def __init__(self, methods: dict[str, Any], on_command: Callable[[str], Any]) -> None:
        super().__init__(methods)
        self._on_command = on_command

    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        replaced = self._on_command(key)
        return replaced if replaced is not None else super().get(key, default)


#: Commands that do nothing toward a message (RFC 5321 §4.1.1.5, .6, .9, .10, .8): they never
#: move the idle deadline, so they cannot hold a connection slot (Postfix's junk commands).
_JUNK = frozenset({"NOOP", "RSET", "HELP", "VRFY", "EXPN"})

_EXPIRED = {
    "timeout": "421 4.4.2 {host} Error: timeout exceeded",
    "lifetime": "421 4.4.2 {host} Session time limit reached, closing connection",
    "data-rate": "421 4.4.2 {host} Data rate too low, closing connection",
    "linger": "",
}
SHUTTING_DOWN = "421 4.3.2 {host} Service shutting down, closing connection"
#: Seconds a session told 421 at a stop stays open to read (and ignore) what the client had
#: already sent: closing a socket with unread input makes the kernel send a reset, which can
#: destroy the 421 before the client reads it.
_LINGER = 2.0


# RFC 5321 §4.1.2 Path with a dot-atom local part and a plain domain (no source route, no
# quoted local part, no address literal: those take aiosmtpd's full parser).
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_SIMPLE_PATH_RE = re.compile(
    rf"^\s*<({_ATEXT}(?:\.{_ATEXT})*@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
    rf"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*)>(.*)$", re.DOTALL)


#: Bytes asked of the stream per read during DATA (the stream buffers at most twice its line
#: limit before pausing the socket, so a read returns what has arrived, up to this).
DATA_CHUNK = 1 << 18


class DataReceiver:
    """The message after DATA's 354, fed in chunks as they arrive, with the rules of reading
    it line by line with a stream whose line limit is ``line_limit`` (aiosmtpd's way, and
    ours before): a line ends at CRLF only, so a bare LF or CR is data and ``<LF>.<LF>`` or
    ``<LF>.<CR><LF>`` never ends the message (the SMTP smuggling vectors); the message ends
    at the first line that is exactly ``.<CRLF>`` (RFC 5321 §4.1.1.4); a leading dot is
    removed from every other line (§4.5.2).

    Refusals are decided after the final dot (§4.2.5): a line of more than ``line_limit``
    bytes with its CRLF is too long (554 5.6.0); the data is too big (552 5.3.4) when the
    lines, as received (stuffed, with CRLF), exceed ``size_limit`` bytes (0: no limit), not
    counting a line of more than ``line_limit`` bytes before its CRLF (the stream drains
    such a line without returning it). After a refusal nothing more is kept."""

    __slots__ = ("_buf", "carry", "line_limit", "longest", "received", "size_limit",
                 "skip_line", "too_long", "too_much")

    def __init__(self, line_limit: int, size_limit: int = 0) -> None:
        self.line_limit = line_limit
        self.size_limit = size_limit
        #: The start of a line whose CRLF has not arrived yet.
        self.carry = b""
        #: The line being received is longer than the limit: what is left of it is dropped.
        self.skip_line = False
        self.received = 0
        #: The longest line kept, with its CRLF (the relay re-encodes a message past 998).
        self.longest = 0
        self.too_long = False
        self.too_much = False
        self._buf = bytearray()

    def feed(self, chunk: bytes) -> bytes | None:
        """Take the next bytes; None while the final dot has not come, else what followed
        it (pipelined commands, to be read as such)."""
        data = self.carry + chunk if self.carry else chunk
        last = data.rfind(b"\r\n")
        if last < 0:
            self.carry = data
            self._check_carry()
            return None
        complete = last + 2
        # ``data`` starts at the start of a line (unless inside a line too long, whose
        # remainder is no line of its own), so the final dot line is either at 0 or right
        # after a CRLF.
        if data.startswith(b".\r\n") and not self.skip_line:
            end = 0
        else:
            end = data.find(b"\r\n.\r\n", 0, complete)
            if end >= 0:
                end += 2
        if end < 0:
            self._lines(data[:complete] if complete < len(data) else data)
            self.carry = data[complete:]
            self._check_carry()
            return None
        self._lines(data[:end])
        self.carry = b""
        return data[end + 3:]

    def _check_carry(self) -> None:
        # A line still without its CRLF past the limit: the stream would drain it now
        # (LimitOverrunError): too long, and never counted. Its last byte is kept, in case it
        # is the CR of the CRLF that ends it.
        if len(self.carry) > self.line_limit + 1:
            self.too_long = self.skip_line = True
            self.carry = self.carry[-1:]

    def _lines(self, region: bytes) -> None:
        """Complete lines (``region`` is empty or ends with CRLF)."""
        if self.skip_line:
            first = region.find(b"\r\n")
            region = region[first + 2:]  # the end of the line too long
            self.skip_line = False
        if not region:
            return
        contents = region.split(b"\r\n")
        contents.pop()  # after the last CRLF
        widest = max(map(len, contents)) + 2
        if widest <= self.line_limit:
            # The common case, at C speed: no line too long in this region.
            self.received += len(region)
            if self.size_limit and self.received > self.size_limit:
                self.too_much = True
            if self.too_long or self.too_much:
                return
            self.longest = max(self.longest, widest)
            if region.startswith(b"."):
                region = region[1:]
            self._buf += region.replace(b"\r\n.", b"\r\n")
            return
        for content in contents:
            size = len(content) + 2
            if size > self.line_limit + 2:  # drained by the stream: uncounted
                self.too_long = True
                continue
            self.received += size
            if self.size_limit and self.received > self.size_limit:
                self.too_much = True
            if self.too_long or self.too_much:
                continue
            if size > self.line_limit:
                self.too_long = True
                continue
            self.longest = max(self.longest, size)
            self._buf += content[1:] if content.startswith(b".") else content
            self._buf += b"\r\n"

    def content(self) -> bytes:
        """The message, unstuffed (once: the buffer is released)."""
        content = bytes(self._buf)
        self.discard()
        return content

    def discard(self) -> None:
        self._buf = bytearray()


class DealmailSMTP(SMTP):
    """aiosmtpd's protocol with our limits: connection caps (per listener and, shared by all
    workers, per client address), a budget of commands without a completed transaction, an
    idle deadline that junk commands do not move, a session lifetime, a minimum DATA rate,
    a graceful stop, and enhanced status codes.

    Deadlines share one timer (aiosmtpd made one per command: 6% of a transaction's CPU,
    py-spy): ``_deadline`` is when the session's current wait ends, the timer fires at it or
    at the next DATA-rate check and re-arms itself."""

    def __init__(self, handler: Any, *, gate: ConnectionGate, data_timeout: float,
                 line_length: int = LimitsConfig.line_length,
                 limits: SessionLimits | None = None, clients: ClientLimits | None = None,
                 sessions: Sessions | None = None, **kwargs: Any) -> None:
        # aiosmtpd sizes its stream reader by this attribute (RFC 5322's 998 + CRLF + a
        # stuffed dot); real mail has longer lines, which are stored as received
        # ([limits] line_length; the relay re-encodes them before sending on).
        self.line_length_limit = line_length + 3
        self._line_length = line_length
        super().__init__(handler, **kwargs)
        self._smtp_methods = _CountingMethods(self._smtp_methods, self._on_command)
        self._gate = gate
        self._data_timeout = data_timeout
        self._limits = limits or SessionLimits()
        self._clients = clients
        self._sessions = sessions
        self._counted = False
        self._client: str | None = None  # the key counted in the client table
        self._deadline = 0.0
        self._deadline_why = "timeout"
        self._session_end = 0.0
        self._rate_tick = 0.0  # next DATA-rate check (0: not receiving DATA)
        self._tick_bytes = 0
        self._data_bytes = 0
        self._commands = 0  # since the last completed transaction
        self._junk_pending = False
        self._in_data = False  # from 354 until the final answer is sent
        self._stopping = False
        self._lingering = False  # told 421 at a stop: reading and ignoring until closed

    # ------------------------------------------------------------------ connections

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.transport is None
        if first:
            assert isinstance(transport, asyncio.WriteTransport)
            refusal = None
            host = self.hostname
            if self._sessions is not None and self._sessions.stopping:
                refusal = SHUTTING_DOWN.format(host=host)
            elif self._gate.open >= self._gate.limit:
                # RFC 5321 §3.8: 421 and close when the service cannot take the connection.
                refusal = "421 4.3.2 Too many connections, try again later"
            elif self._clients is not None:
                peer = transport.get_extra_info("peername")
                key = self._clients.key(str(peer[0]) if isinstance(peer, tuple) else "")
                if key is not None:
                    refusal = self._clients.connect(key)
                    if refusal is None:
                        self._client = key
            if refusal is not None:
                transport.write(refusal.encode() + b"\r\n")
                transport.close()
                return
            self._gate.open += 1
            self._counted = True
            if self._sessions is not None:
                self._sessions.live.add(self)
            self._session_end = self.loop.time() + self._limits.lifetime
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if self._counted:
            self._gate.open -= 1
            self._counted = False
            if self._sessions is not None:
                self._sessions.live.discard(self)
        if self._client is not None and self._clients is not None:
            self._clients.disconnect(self._client)
            self._client = None
        if self.session is None:
            return
        super().connection_lost(error)

    async def push(self, status: Any) -> None:
        # aiosmtpd's own replies lack enhanced status codes (RFC 2034) or are 500s where a
        # 4xx/5xx with a precise meaning is due.
        if self._lingering:
            return  # the 421 was the last word (a command read meanwhile is ignored)
        if isinstance(status, str):
            if status.startswith(("552 Error: Too much mail data",
                                  "552 Error: message size exceeds")):
                status = str(replies.too_big())
            elif status.startswith("500 Line too long"):
                status = self._too_long_reply()
            elif status.startswith("500 Error: ("):
                status = "451 4.3.0 Temporary local problem, please try again later"
        await super().push(status)

    def _too_long_reply(self) -> str:
        # The upload was drained first (RFC 5321 §4.2.5: the reply follows the final dot).
        return str(replies.bad_content(
            f"a line is longer than {self._line_length} characters ([limits] line_length; "
            "RFC 5322 section 2.1.1 allows 998)"))

    # ------------------------------------------------------------------ commands

    def _on_command(self, name: str) -> Any:
        """Every command line aiosmtpd dispatches passes here first; returns a method that
        answers it instead, or None for the usual one."""
        self._commands += 1
        self._junk_pending = name in _JUNK
        if self._lingering:
            return self._ignore
        if self._stopping:
            return self._shutting_down
        accepted = len(self.envelope.rcpt_tos) if self.envelope is not None else 0
        if self._commands - accepted > self._limits.max_commands:
            return self._too_many_commands
        return None

    async def _too_many_commands(self, arg: str | None) -> None:
        log.info("closed session of %s: more than %d commands without a transaction",
                 peer_ip(self.session) if self.session is not None else "?",
                 self._limits.max_commands)
        await self._close_with("421 4.7.0 Too many commands without a transaction, "
                               "closing connection")

    async def _shutting_down(self, arg: str | None) -> None:
        self._say_shutting_down()

    async def _ignore(self, arg: str | None) -> None:
        """A command read after the 421 of a stop: no answer (see _LINGER)."""

    async def _close_with(self, reply: str) -> None:
        # As aiosmtpd's QUIT does: reply, end the command loop, close.
        await self.push(reply)
        if self._handler_coroutine is not None:
            self._handler_coroutine.cancel()
        if self.transport is not None:
            self.transport.close()

    async def smtp_MAIL(self, arg: str | None) -> None:
        if self._client is not None and self._clients is not None:
            refusal = self._clients.mail(self._client)
            if refusal is not None:
                await self.push(refusal)
                return
        await super().smtp_MAIL(arg)

    # ------------------------------------------------------------------ stopping

    def shut_down(self, force: bool = False) -> None:
        """A stop is under way (:meth:`Sessions.drain`): a session waiting for a command is
        told 421 now; one receiving or answering a message is left to finish, answered, then
        told 421; one in the middle of a command answers it, and its next command gets 421.
        ``force`` (the stop's time is up): 421 and closed whatever it is doing."""
        self._stopping = True
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if force:
            if not self._lingering:
                assert isinstance(transport, asyncio.WriteTransport)
                transport.write(SHUTTING_DOWN.format(host=self.hostname).encode() + b"\r\n")
            transport.close()
            return
        if self._lingering or self._in_data:
            return
        if self._reader._waiter is not None:  # type: ignore[attr-defined]
            self._say_shutting_down()  # waiting for a command: idle

    def _say_shutting_down(self) -> None:
        """421 4.3.2 (RFC 5321 §3.8), then read and ignore whatever comes for a moment before
        closing, so that the client reads the 421 as the answer to what it sent meanwhile."""
        transport = self.transport
        if self._lingering or not isinstance(transport, asyncio.WriteTransport):
            return
        transport.write(SHUTTING_DOWN.format(host=self.hostname).encode() + b"\r\n")
        self._lingering = True
        self._rate_tick = 0.0
        self._arm(self.loop.time() + _LINGER, "linger", lifetime=False)

    # ------------------------------------------------------------------ deadlines

    def _arm(self, when: float, why: str, lifetime: bool = True) -> None:
        """End the current wait at ``when`` (not after the session's end, unless a message
        is being answered: ``lifetime=False``)."""
        if lifetime and self._session_end and when >= self._session_end:
            when, why = self._session_end, "lifetime"
        self._deadline, self._deadline_why = when, why
        at = min(when, self._rate_tick) if self._rate_tick else when
        handle = self._timeout_handle
        if handle is None or handle.cancelled() or handle.when() > at:
            if handle is not None:
                handle.cancel()
            self._timeout_handle = self.loop.call_at(at, self._check_deadline)

    def _reset_timeout(self, duration: float | None = None) -> None:
        """aiosmtpd's hook before each command (and at connection): the idle deadline moves,
        except for a junk command."""
        if self._junk_pending and duration is None:
            self._junk_pending = False
            return
        self._arm(self.loop.time() + (duration or self._timeout_duration), "timeout")

    def _check_deadline(self) -> None:
        now = self.loop.time()
        if self._rate_tick and now >= self._rate_tick:
            window = self._limits.data_rate_window
            # Bytes read so far, and those received but not yet a whole line.
            arrived = self._data_bytes + len(self._reader._buffer)  # type: ignore[attr-defined]
            if arrived - self._tick_bytes < self._limits.min_data_rate * window:
                self._expire("data-rate")
                return
            self._tick_bytes, self._rate_tick = arrived, now + window
        if now >= self._deadline:
            self._expire(self._deadline_why)
            return
        at = min(self._deadline, self._rate_tick) if self._rate_tick else self._deadline
        self._timeout_handle = self.loop.call_at(at, self._check_deadline)

    def _expire(self, why: str) -> None:
        if why != "linger":
            log.info("closed session of %s: %s",
                     peer_ip(self.session) if self.session is not None else "?",
                     {"timeout": "no command within the timeout",
                      "lifetime": "session lifetime reached",
                      "data-rate": "DATA slower than the minimum rate"}[why])
        transport = self.transport
        if (_EXPIRED[why] and isinstance(transport, asyncio.WriteTransport)
                and not transport.is_closing()):
            transport.write(_EXPIRED[why].format(host=self.hostname).encode() + b"\r\n")
        self._timeout_cb()

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
        processing share one deadline (``data_timeout``), so a slow commit is not cut off
        before its 250; during the upload the client must also keep up ``min_data_rate``
        (a dribbling client would otherwise hold its slot for the whole deadline) and stay
        within the session's lifetime; the answer itself is never cut off by either."""
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        now = self.loop.time()
        data_end = now + self._data_timeout
        self._in_data = True
        self._data_bytes = self._tick_bytes = 0
        if self._limits.min_data_rate:
            self._rate_tick = now + self._limits.data_rate_window
        self._arm(data_end, "timeout")
        try:
            await self.push("354 End data with <CR><LF>.<CR><LF>")
            await self._receive_data(data_end)
        finally:
            self._in_data = False
            self._rate_tick = 0.0
        self._commands = 0  # a transaction completed, whatever its answer
        if self._stopping:
            self._say_shutting_down()  # after the real answer, not instead of it
        elif self.transport is not None:
            self._reset_timeout()

    async def _receive_data(self, data_end: float) -> None:
        """The data after 354 up to the final dot, then the answer. Read in large chunks
        (:class:`DataReceiver`: the rules of a line-by-line read, without a ``readuntil``
        and a Python loop per line: ~30 per 2 KB message, ~260,000 per 20 MB attachment)."""
        assert self.envelope is not None
        reader = self._reader
        receiver = DataReceiver(self.line_length_limit, self.data_size_limit or 0)
        while self.transport is not None:
            try:
                chunk = await reader.read(DATA_CHUNK)
            except asyncio.CancelledError:
                self._writer.close()
                raise
            if not chunk:  # the client went away before the final dot: as readuntil does
                raise asyncio.IncompleteReadError(receiver.carry, None)
            self._data_bytes += len(chunk)
            rest = receiver.feed(chunk)
            if rest is not None:
                if rest:
                    # Pipelined commands after the final dot (RFC 2920) belong to the
                    # command loop: back to the front of the stream's buffer.
                    reader._buffer[:0] = rest  # type: ignore[attr-defined]
                    self._data_bytes -= len(rest)
                break
        # The upload is complete: only our own processing is timed now, up to the DATA
        # deadline, and neither the rate rule nor the session's lifetime may cut the answer.
        self._rate_tick = 0.0
        self._arm(data_end, "timeout", lifetime=False)
        if receiver.too_long or receiver.too_much:
            receiver.discard()
            self._set_post_data_state()
            await self.push_data_reply(
                self._too_long_reply() if receiver.too_long and not receiver.too_much
                else str(replies.too_big()))
            return
        content = receiver.content()
        self.envelope.content = content
        self.envelope.original_content = content
        self.envelope.longest_line = receiver.longest - 2  # type: ignore[attr-defined]
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()
        await self.push_data_reply("250 OK" if status is MISSING else status)

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
        return await accept_recipient(self.executor, handler, route, envelope, address,
                                      rcpt_options)

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


async def accept_recipient(executor: ThreadPoolExecutor, handler: Handler | None, route: Route,
                           envelope: Envelope, address: str, rcpt_options: list[str]) -> str:
    """The end of RCPT for a routed address: the handler's check (a database lookup, off the
    event loop; the plain company address needs none), then the recipient is added to the
    envelope with its route."""
    if handler is not None and route.params:
        refusal = await asyncio.get_running_loop().run_in_executor(
            executor, handler.rcpt_check, route)
        if refusal is not None:
            return str(refusal)
    routes: list[Route] = getattr(envelope, "routes", [])
    envelope.rcpt_tos.append(address)
    envelope.rcpt_options.extend(rcpt_options)
    routes.append(route)
    envelope.routes = routes  # type: ignore[attr-defined]
    return "250 2.1.5 Ok"


async def decide_and_commit(executor: ThreadPoolExecutor, committer: GroupCommitter,
                            check: Callable[[], Reply | Job], ctx: DataContext, *,
                            metrics: Metrics | None = None, listener: str = "inbound") -> str:
    """The DATA reply of a listener: the handler's check in a worker thread, then its job in
    the committer; the reply is sent only once that commit returned. Any fault of ours is a
    451 4.3.0 with our id, never a 5xx nor the exception text (RFC 5321 §4.2.5)."""
    started = time.perf_counter()
    try:
        # The worker thread hands a job straight to the committer (one wake-up of this loop
        # per message); a Reply decided without the store comes back as it is.
        reply = await committer.submit_prepared(executor, check,
                                                lambda decided: not isinstance(decided, Reply))
    except CommitterStopped:
        # The stop drains the sessions before it stops the committer (dealmail/app.py), so
        # this is only a guard: a temporary answer, and no traceback for an expected state.
        log.warning("[%s] not stored: the server is stopping", ctx.queue_id)
        reply = Reply(451, "4.3.2", "Service shutting down, try again later", outcome="error")
    except RecursionError:
        # A structure too deep for a recursive walk that linking.parse.check_structure did
        # not foresee: permanent, so 554 (a 451 would be retried for days).
        log.warning("[%s] refused from %s: %s", ctx.queue_id, ctx.peer_ip, NESTED_TOO_DEEPLY)
        reply = replies.bad_content(NESTED_TOO_DEEPLY)
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
    line_length: int = LimitsConfig.line_length,
    limits: Callable[[], SessionLimits] | None = None, clients: ClientLimits | None = None,
    sessions: Sessions | None = None, protocol: type[DealmailSMTP] | None = None,
    **smtp_kwargs: Any,
) -> asyncio.Server:
    """Listen on ``HOST:PORT`` (port 0 picks a free one; read it from the server's socket),
    or accept on ``sock``, a listening socket bound by the parent of several worker
    processes (pre-fork: the kernel hands each connection to one of them). ``limits`` gives
    each new session its limits (the config of the moment), ``clients`` counts clients in
    the table shared by the workers, ``sessions`` lets a stop drain the sessions
    (:meth:`Sessions.drain`), ``protocol`` is the DealmailSMTP subclass to serve with."""
    host, port = parse_listen(listen)
    gate = ConnectionGate(max_connections)
    loop = asyncio.get_running_loop()

    make = protocol or DealmailSMTP

    def factory() -> DealmailSMTP:
        # A callable limit is read per connection: a reloaded limits.message_size applies
        # to the next session (SIZE in its EHLO and the DATA cut-off agree).
        return make(
            hooks, gate=gate, data_timeout=data_timeout, line_length=line_length,
            limits=limits() if limits is not None else None, clients=clients,
            sessions=sessions,
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
