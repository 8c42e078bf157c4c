"""The LMTP listener: dealmail as a delivery target of the company's own Postfix.

Postfix routes dealmail's addresses here with ``transport_maps`` (``mta/postfix.py`` writes
that config), and its ``sender_bcc_maps`` / ``recipient_bcc_maps`` add a copy of every mail a
user sends (``<slug>+sent@``) or receives (``<slug>+received-<user key>@``) as one more
recipient of the same LMTP transaction. This module is the source adapter of that traffic:

* **Protocol** (RFC 2033, on top of ``mta.server.DealmailSMTP``): ``LHLO`` instead of
  HELO/EHLO; after the final dot **one reply per accepted recipient, in RCPT order**
  (§4.2). aiosmtpd's own LMTP class answers DATA once, and Postfix then waits for the missing
  replies and defers the whole message, so we send the list ourselves.
* **XFORWARD** (Postfix's XFORWARD_README): advertised to and accepted from the hosts in
  ``lmtp.xforward_hosts`` only (``550 5.7.0`` from anyone else); attribute names checked,
  values xtext-decoded and refused with ``501 5.5.4`` when malformed (a control character,
  more than 255 characters, an ADDR that is not an IP address); not inside a transaction
  (``503``). The attributes live on the envelope, so they are forgotten after each
  transaction (end of DATA, RSET, LHLO). ADDR and HELO become the client of the evidence the
  sender gate verifies (``[UNAVAILABLE]`` keeps Postfix itself as the client).
* **Per recipient, one transaction.** The recipients are grouped by what they ask for: the
  copies of one user's mail that the sender gate must verify (the company address,
  ``+deal<ID>``, a sender-BCC copy: merged into *one* capture request so the deal link of a
  ``+deal`` is kept; a second request for the same user would be a "repeat" and lose it),
  each user's received copy (``Trust.MAILBOX``), and each ``+ask``/``+choice-`` recipient
  (its own handler). Every group enters the one capture path (``linking.capture``); all their
  commits run in **one** job of the group committer, so one database transaction holds the
  whole LMTP transaction, and each recipient is answered from its own group's disposition
  only after that commit returned. A fault of ours answers ``451 4.3.0`` for every recipient
  (never 5xx): Postfix keeps the message and delivers it again after recovery, and the
  capture path's dedup makes the retry a no-op for what was already stored.
* **Concurrency**: ``lmtp.max_connections`` simultaneous connections (Postfix's default
  destination concurrency is 20); the next one is told ``421 4.3.2`` and Postfix defers.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import re
import socket
import stat
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from email.utils import getaddresses
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

from crmstore.committer import GroupCommitter
from dealmail.config import Company, Config, LimitsConfig, User
from linking.capture import Capture, CaptureRequest, Disposition, Evidence, Outcome, Trust
from linking.parse import ParsedMessage

from . import replies
from .replies import Reply
from .routing import MTA_ONLY_KINDS, Route, RoutingTable, mailbox_key
from .server import (
    ClientLimits,
    ConnectionGate,
    DataContext,
    DealmailSMTP,
    Handler,
    SessionLimits,
    Sessions,
    accept_recipient,
    incident_reply,
    new_queue_id,
    parse_listen,
    peer_ip,
)

__all__ = [
    "XFORWARD_ATTRIBUTES",
    "DealmailLMTP",
    "LmtpHooks",
    "XforwardError",
    "parse_xforward",
    "start_lmtp",
]

log = logging.getLogger("dealmail.lmtp")

#: The attributes Postfix sends (XFORWARD_README), all of which we accept.
XFORWARD_ATTRIBUTES = ("NAME", "ADDR", "PORT", "PROTO", "HELO", "IDENT", "SOURCE")
_UNAVAILABLE = ("[UNAVAILABLE]", "[TEMPUNAVAIL]")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_XTEXT_RE = re.compile(r"\+([0-9A-F]{2})")
# Kinds whose copies the sender gate verifies as the From user's own mail.
_VERIFIED_KINDS = frozenset({"bcc", "deal", "sent"})


# --------------------------------------------------------------------------- XFORWARD


class XforwardError(ValueError):
    """A malformed XFORWARD command; the text is the reply's."""


def _xtext_decode(value: str) -> str:
    # RFC 3461 §4: "+" followed by two upper-case hex digits; a lone "+" is malformed.
    if "+" in _XTEXT_RE.sub("", value):
        raise XforwardError("bad xtext encoding")
    return _XTEXT_RE.sub(lambda m: chr(int(m.group(1), 16)), value)


def parse_xforward(arg: str) -> dict[str, str]:
    """The attributes of one ``XFORWARD name=value ...`` command, names upper-cased and values
    decoded; raises :class:`XforwardError` for anything Postfix would not send."""
    attrs: dict[str, str] = {}
    words = arg.split()
    if not words:
        raise XforwardError("Syntax: XFORWARD attribute=value...")
    for word in words:
        name, sep, raw = word.partition("=")
        name = name.upper()
        if not sep or name not in XFORWARD_ATTRIBUTES:
            raise XforwardError(f"Bad XFORWARD attribute name: {_CONTROL_RE.sub('', name)[:40]}")
        value = _xtext_decode(raw)
        if len(value) > 255:
            raise XforwardError(f"Bad XFORWARD attribute value: {name} longer than 255")
        if _CONTROL_RE.search(value):
            raise XforwardError(f"Bad XFORWARD attribute value: control character in {name}")
        if value.upper() in _UNAVAILABLE:
            attrs[name] = value.upper()
            continue
        if name == "ADDR":
            address = value[5:] if value.upper().startswith("IPV6:") else value
            try:
                value = str(ipaddress.ip_address(address))
            except ValueError:
                raise XforwardError(f"Bad XFORWARD ADDR syntax: {value[:60]}") from None
        elif name == "PORT" and not (value.isdigit() and int(value) <= 65535):
            raise XforwardError("Bad XFORWARD PORT syntax")
        elif name == "SOURCE" and value.upper() not in ("LOCAL", "REMOTE"):
            raise XforwardError("Bad XFORWARD SOURCE syntax")
        attrs[name] = value
    return attrs


def _given(attrs: dict[str, str], name: str) -> str:
    value = attrs.get(name, "")
    return "" if value in _UNAVAILABLE else value


# --------------------------------------------------------------------------- protocol


class DealmailLMTP(DealmailSMTP):
    """LMTP (RFC 2033) with dealmail's limits: LHLO, XFORWARD, one reply per recipient."""

    def __init__(self, handler: Any, *, xforward_allowed: Callable[[str], bool],
                 **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._xforward_allowed = xforward_allowed
        self._data_recipients = 0

    @property
    def xforward_ok(self) -> bool:
        return self.session is not None and self._xforward_allowed(peer_ip(self.session))

    async def smtp_LHLO(self, arg: str) -> None:
        """RFC 2033 §4.1: the LMTP greeting, answered like EHLO."""
        if not arg:
            await self.push("501 5.5.4 Syntax: LHLO hostname")
            return
        await SMTP.smtp_EHLO(self, arg)

    async def smtp_HELO(self, arg: str) -> None:
        await self.push('500 5.5.1 Error: command "HELO" not recognized; this is LMTP: '
                        "use LHLO (RFC 2033 section 4.1)")

    async def smtp_EHLO(self, arg: str) -> None:
        await self.push('500 5.5.1 Error: command "EHLO" not recognized; this is LMTP: '
                        "use LHLO (RFC 2033 section 4.1)")

    async def check_helo_needed(self, helo: str = "LHLO") -> bool:
        assert self.session is not None
        if not self.session.host_name:
            await self.push("503 5.5.1 Error: send LHLO first")
            return True
        return False

    async def smtp_XFORWARD(self, arg: str | None) -> None:
        if await self.check_helo_needed():
            return
        assert self.session is not None and self.envelope is not None
        if not self.xforward_ok:
            log.warning("XFORWARD refused from %s: not in lmtp.xforward_hosts",
                        peer_ip(self.session) or "a UNIX socket")
            await self.push("550 5.7.0 Error: insufficient authorization")
            return
        if self.envelope.mail_from is not None:
            await self.push("503 5.5.1 Error: MAIL transaction in progress")
            return
        try:
            attrs = parse_xforward(arg or "")
        except XforwardError as exc:
            await self.push(f"501 5.5.4 {exc}")
            return
        current: dict[str, str] = getattr(self.envelope, "xforward", {})
        self.envelope.xforward = {**current, **attrs}  # type: ignore[attr-defined]
        await self.push("250 2.0.0 Ok")

    async def smtp_DATA(self, arg: str) -> None:
        assert self.envelope is not None
        self._data_recipients = len(self.envelope.rcpt_tos)
        await super().smtp_DATA(arg)

    async def push_data_reply(self, status: str | list[str]) -> None:
        # RFC 2033 §4.2: one reply for every recipient that was accepted at RCPT, in order,
        # even when the whole message is refused (too big, overlong line).
        lines = [status] * self._data_recipients if isinstance(status, str) else status
        for line in lines:
            await self.push(line)


# --------------------------------------------------------------------------- delivery


@dataclass
class _Delivery:
    """What the worker thread decided for one LMTP transaction: the final answers known
    already, and the jobs that answer the other recipients once committed."""

    answers: list[Reply | None]
    jobs: list[tuple[list[int], Callable[[], Reply]]] = field(default_factory=list)

    def run(self) -> list[tuple[list[int], Reply]]:
        """The committer's job: every group's commit in the one transaction."""
        return [(indexes, job()) for indexes, job in self.jobs]


class LmtpHooks:
    """aiosmtpd hook object of the LMTP listener (see the module docstring)."""

    def __init__(self, config_of: Callable[[], Config], handlers: dict[str, Handler],
                 capture: Capture, committer: GroupCommitter, executor: ThreadPoolExecutor,
                 has_space: Callable[[], bool] | None = None) -> None:
        self.config_of = config_of
        self.handlers = handlers
        self.capture = capture
        self.committer = committer
        self.executor = executor
        self.has_space = has_space
        # Derived from the config, rebuilt when a reload swaps it.
        self._derived: tuple[int, RoutingTable, dict[tuple[str, str], User]] | None = None

    def _tables(self) -> tuple[RoutingTable, dict[tuple[str, str], User]]:
        config = self.config_of()
        if self._derived is None or self._derived[0] != id(config):
            enabled = set(self.handlers) | MTA_ONLY_KINDS
            mailboxes = {(c.slug, mailbox_key(c.slug, u.address)): u
                         for c in config.companies for u in c.users}
            self._derived = (id(config), RoutingTable(config, enabled), mailboxes)
        return self._derived[1], self._derived[2]

    def mailbox_user(self, route: Route) -> User | None:
        return self._tables()[1].get((route.company.slug, route.params.get("mailbox", "")))

    # ------------------------------------------------------------------ commands

    async def handle_EHLO(self, server: DealmailLMTP, session: Session, envelope: Envelope,
                          hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname
        extra = ["250-PIPELINING", "250-ENHANCEDSTATUSCODES"]
        if server.xforward_ok:
            extra.append("250-XFORWARD " + " ".join(XFORWARD_ATTRIBUTES))
        return [*responses[:-1], *extra, responses[-1]]

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, mail_options: list[str]) -> str:
        if self.has_space is not None and not self.has_space():
            log.warning("refused MAIL from %s: not enough free disk space", peer_ip(session))
            return "452 4.3.1 Insufficient system storage"
        envelope.mail_from = address  # "<>" stays truthy: aiosmtpd's RCPT needs a sender
        envelope.mail_options.extend(mail_options)
        envelope.routes = []  # type: ignore[attr-defined]
        return "250 2.1.0 Ok"

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        if len(envelope.rcpt_tos) >= self.config_of().limits.max_recipients:
            return str(replies.too_many_recipients())
        route = self._tables()[0].route(address)
        if route is not None and route.kind == "received" and self.mailbox_user(route) is None:
            route = None  # a user key of nobody (the user left; the maps are stale)
        if route is None:
            log.info("refused RCPT <%s> from %s: not one of our addresses", address,
                     peer_ip(session) or "a UNIX socket")
            return str(replies.unknown_recipient(address))
        return await accept_recipient(self.executor, self.handlers.get(route.kind), route,
                                      envelope, address, rcpt_options)

    async def handle_DATA(self, server: SMTP, session: Session,
                          envelope: Envelope) -> list[str]:
        routes: list[Route] = getattr(envelope, "routes", [])
        queue_id = new_queue_id()
        xforward: dict[str, str] = dict(getattr(envelope, "xforward", {}))
        peer = peer_ip(session)
        ctx = DataContext(
            raw=bytes(envelope.original_content or b""),
            mail_from="" if envelope.mail_from in (None, "<>") else envelope.mail_from,
            routes=routes, peer_ip=_given(xforward, "ADDR") or peer,
            helo=_given(xforward, "HELO") or session.host_name or "", queue_id=queue_id,
            smtp_utf8="SMTPUTF8" in [o.upper() for o in envelope.mail_options],
            extra={"lmtp_peer": peer or "unix", "xforward": xforward,
                   "rcpt_tos": list(envelope.rcpt_tos)})
        answers = await self.deliver(ctx)
        for address, answer in zip(envelope.rcpt_tos, answers, strict=True):
            log.info("[%s] <%s>: %s", queue_id, address, answer)
        return [str(a) for a in answers]

    async def handle_exception(self, error: Exception) -> str:
        return incident_reply(error)

    # ------------------------------------------------------------------ the transaction

    async def deliver(self, ctx: DataContext) -> list[Reply]:
        """One answer per recipient, in RCPT order, once everything is committed."""
        try:
            delivery = await asyncio.get_running_loop().run_in_executor(
                self.executor, self.plan, ctx)
            answers = delivery.answers
            if delivery.jobs:
                for indexes, reply in await self.committer.submit_async(delivery.run):
                    for i in indexes:
                        answers[i] = reply
        except Exception:
            log.exception("[%s] fault while delivering from %s: 451 for every recipient",
                          ctx.queue_id, ctx.peer_ip)
            return [replies.temp_failure(ctx.queue_id)] * len(ctx.routes)
        missing = [i for i, a in enumerate(answers) if a is None]
        if missing:  # a bug of ours; never a silent 250
            log.error("[%s] no answer for recipient(s) %s", ctx.queue_id, missing)
            return [replies.temp_failure(ctx.queue_id)] * len(ctx.routes)
        return [a for a in answers if a is not None]

    def plan(self, ctx: DataContext) -> _Delivery:
        """Worker thread, no writes: group the recipients, read the message once and prepare
        one capture per group (see the module docstring)."""
        qid = ctx.queue_id
        delivery = _Delivery(answers=[None] * len(ctx.routes))
        groups: dict[tuple[str, ...], list[int]] = {}
        for i, route in enumerate(ctx.routes):
            if route.kind in _VERIFIED_KINDS:
                key: tuple[str, ...] = ("verify", route.company.slug)
            elif route.kind == "received":
                key = ("mailbox", route.company.slug, route.params["mailbox"])
            else:
                key = ("handler", str(i))
            groups.setdefault(key, []).append(i)
        read: ParsedMessage | Disposition | None = None
        for key, indexes in groups.items():
            if key[0] == "handler":
                route = ctx.routes[indexes[0]]
                decided = self.handlers[route.kind].check(replace(ctx, routes=[route]))
                if isinstance(decided, Reply):
                    delivery.answers[indexes[0]] = decided
                else:
                    delivery.jobs.append((indexes, decided))
                continue
            if read is None:
                read = self.capture.read(ctx.raw)
            if isinstance(read, Disposition):
                # Unreadable (554 for each) or automatic, which includes dealmail's own
                # questions and digests coming back through Postfix: accepted, never tracked.
                self._answer(delivery, indexes, replies.for_disposition(read, qid))
                continue
            routes = [ctx.routes[i] for i in indexes]
            request = (self._verified_request(ctx, routes, read) if key[0] == "verify"
                       else self._mailbox_request(ctx, routes))
            if isinstance(request, Disposition):
                self._answer(delivery, indexes, replies.for_disposition(request, qid))
                continue
            prepared = self.capture.prepare(request, read)
            if isinstance(prepared, Disposition):
                self._answer(delivery, indexes, replies.for_disposition(prepared, qid))
            else:
                delivery.jobs.append((indexes, _answering(prepared, qid)))
        return delivery

    @staticmethod
    def _answer(delivery: _Delivery, indexes: list[int], reply: Reply) -> None:
        for i in indexes:
            delivery.answers[i] = reply

    @staticmethod
    def _evidence(ctx: DataContext, routes: list[Route]) -> Evidence:
        details = {"lmtp_peer": ctx.extra.get("lmtp_peer", ""),
                   "recipients": [r.address for r in routes]}
        if ctx.extra.get("xforward"):
            details["xforward"] = ctx.extra["xforward"]
        return Evidence(client_ip=ctx.peer_ip, helo=ctx.helo, envelope_from=ctx.mail_from,
                        details=details)

    def _verified_request(self, ctx: DataContext, routes: list[Route],
                          parsed: ParsedMessage) -> CaptureRequest | Disposition:
        company = routes[0].company
        kinds = {r.kind for r in routes}
        deals = list(dict.fromkeys(r.deal_id for r in routes if r.deal_id is not None))
        if len(deals) > 1:
            log.warning("[%s] several +deal addresses (%s): the message is linked to deal %s",
                        ctx.queue_id, ", ".join(map(str, deals)), deals[0])
        if kinds == {"sent"}:
            refusal = self._sender_mismatch(ctx, company, parsed)
            if refusal is not None:
                return refusal
        # An explicit BCC (the company address or +deal) may carry forwarded originals and is
        # read as such; a copy made by sender_bcc_maps is the user's own outbound mail, read
        # like relayed mail (never refused for an empty or foreign To line).
        channel = "bcc" if kinds & {"bcc", "deal"} else "mta"
        return CaptureRequest(
            raw=ctx.raw, channel=channel, company=company, queue_id=ctx.queue_id,
            evidence=self._evidence(ctx, routes), trust=Trust.VERIFY,
            deal_id=deals[0] if deals else None, recipients=_bcc_header(parsed))

    def _sender_mismatch(self, ctx: DataContext, company: Company,
                         parsed: ParsedMessage) -> Disposition | None:
        """A sender-BCC copy exists because the envelope sender is a user's address (Postfix
        binds it to the SASL login with reject_sender_login_mismatch): a header From of
        another user is somebody writing as a colleague, never that colleague's mail."""
        if not ctx.mail_from:
            return None
        config = self.config_of()
        owner = config.find_user(ctx.mail_from.lower())
        claimed = config.find_user(parsed.from_.address)
        if owner is None or claimed is None or owner[1] is claimed[1]:
            return None
        return Disposition(
            Outcome.REFUSED_SENDER,
            f"envelope sender <{ctx.mail_from}> and From <{parsed.from_.address}> are "
            "different users", "5.7.1")

    def _mailbox_request(self, ctx: DataContext,
                         routes: list[Route]) -> CaptureRequest | Disposition:
        user = self.mailbox_user(routes[0])
        if user is None:  # the config changed between RCPT and DATA
            return Disposition(Outcome.DEFERRED, "recipient changed during delivery", "4.3.0")
        return CaptureRequest(
            raw=ctx.raw, channel="mta", company=routes[0].company, queue_id=ctx.queue_id,
            evidence=self._evidence(ctx, routes), trust=Trust.MAILBOX, user=user)


def _bcc_header(parsed: ParsedMessage) -> tuple[str, ...]:
    """The sender's own Bcc list, when the client left it in the message: the envelope
    recipients Postfix delivers elsewhere are not ours to see, and a customer in Bcc is a
    customer of the conversation (like the relay's envelope recipients)."""
    values = [str(v) for v in parsed.headers.get_all("bcc", [])]
    return tuple(a.lower() for _n, a in getaddresses(values) if "@" in a)


def _answering(commit: Callable[[], Disposition], qid: str) -> Callable[[], Reply]:
    def job() -> Reply:
        return replies.for_disposition(commit(), qid)

    return job


# --------------------------------------------------------------------------- listening


def _unix_path(listen: str) -> Path | None:
    return Path(listen[5:]) if listen.startswith("unix:") else None


async def start_lmtp(
    hooks: LmtpHooks, listen: str, *, hostname: str, data_size_limit: int,
    command_timeout: float, data_timeout: float, max_connections: int,
    xforward_allowed: Callable[[str], bool], socket_mode: int = 0o660,
    line_length: int = LimitsConfig.line_length,
    limits: Callable[[], SessionLimits] | None = None, clients: ClientLimits | None = None,
    sessions: Sessions | None = None,
) -> asyncio.Server:
    """Listen on ``HOST:PORT`` (port 0 picks a free one) or ``unix:PATH``. ``line_length``,
    ``limits``, ``clients`` and ``sessions`` as for :func:`mta.server.start_listener` (a
    client on a UNIX socket is never counted per address)."""
    gate = ConnectionGate(max_connections)
    loop = asyncio.get_running_loop()

    def factory() -> DealmailLMTP:
        return DealmailLMTP(
            hooks, gate=gate, data_timeout=data_timeout, xforward_allowed=xforward_allowed,
            line_length=line_length, limits=limits() if limits is not None else None,
            clients=clients, sessions=sessions,
            data_size_limit=data_size_limit, enable_SMTPUTF8=True, hostname=hostname,
            ident="dealmail LMTP", timeout=command_timeout, loop=loop)

    path = _unix_path(listen)
    if path is not None:
        # A socket left by an earlier run would make bind fail; anything else at that path
        # is not ours to remove.
        if path.exists() and stat.S_ISSOCK(path.stat().st_mode):
            path.unlink()
        server = await loop.create_unix_server(factory, path=str(path))
        os.chmod(path, socket_mode)
        return server
    host, port = parse_listen(listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return await loop.create_server(factory, host=host, port=port, family=family)
