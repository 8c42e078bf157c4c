"""The authenticated relay: mail clients send through dealmail, a copy is captured and linked.

Listeners (RFC 6409 message submission): ``listeners.submission`` with STARTTLS (RFC 3207),
and optionally ``listeners.submissions`` with TLS from the first byte (RFC 8314 §3.3).

* AUTH PLAIN (RFC 4616) and LOGIN, offered and accepted only under TLS: before STARTTLS the
  EHLO does not list AUTH and ``AUTH`` answers ``538 5.7.11`` (RFC 4954 §6). The password is
  checked with :func:`dealmail.passwords.verify_password` in a worker thread (scrypt, constant
  time; an unknown login costs the same as a wrong password and gets the same ``535 5.7.8``).
  The login is the user's primary address.
* Failed logins (:class:`LoginThrottle`, on the injected clock) are counted per client
  address and per account from that address, in the table every worker process shares
  (``mta.anvil``), so that any worker can serve submission: after
  ``relay.auth_max_failures`` for one account from one address, that account is refused from
  that address, and after ``relay.auth_client_max_failures`` from one address (any accounts)
  the address is, each with ``421 4.7.0`` and the connection closed, for
  ``relay.auth_lockout_seconds`` (RFC 4954 §4 lets a server limit attempts). An account as
  such is never locked, or anyone could lock a salesperson out of sending from everywhere;
  it is only slowed: each of its logins waits ``relay.auth_failure_delay`` per failure of the
  account within the window, up to ``relay.auth_max_delay``, before its password is checked.
  ``dealmail auth status`` and ``dealmail auth unlock ADDRESS|IP`` show and clear the
  counters. Credentials never reach a log line: aiosmtpd logs each command line, so a filter
  redacts AUTH lines on its logger.
* Nothing is relayed without authentication (``530 5.7.0`` at MAIL, RFC 4954 §6). The
  envelope sender and the header From (and Sender and Resent-From, when present) must be
  addresses of the authenticated user, primary or alternate: otherwise ``553 5.7.1``.
* A bare CR or LF in the message is normalised to CRLF or refused (``relay.bare_newlines``):
  aiosmtpd passes them through, and a lenient downstream server would read ``\\n.\\r\\n`` as the
  end of data (outbound SMTP smuggling).

Capture and queueing happen in one transaction (the group committer's): the message enters the
one capture path (``linking.capture``, channel ``relay``, trust ``login``, the user's default
visibility) and is stored and linked like every captured copy, unless every recipient is a
colleague; and one
outbox item per destination domain is queued with the envelope sender. The ``250`` is sent
after the commit; the committer's after-commit hook wakes the outbox worker. The stored copy
keeps its ``Bcc:`` header; the delivered copy loses it (RFC 5322 §3.6.3), gains a
``Received:`` line (RFC 5321 §4.4, ``with ESMTPSA``, RFC 3848) and, when configured, a DKIM
signature of the sender's domain (RFC 6376) computed on the CRLF form that leaves.
"""

from __future__ import annotations

import asyncio
import binascii
import functools
import logging
import re
import socket
import ssl
from base64 import b64decode
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from email.utils import format_datetime, make_msgid
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import MISSING, Envelope, Session

from crmstore.committer import GroupCommitter
from crmstore.db import Store
from crmstore.outbox import enqueue
from dealmail.addresses import AddressError, domain_of, normalize_address
from dealmail.config import Config, LimitsConfig, User
from dealmail.passwords import verify_password
from linking.capture import Capture, CaptureRequest, Commit, Disposition, Outcome, Trust
from linking.parse import MessageRejected, parse_message

from .. import replies
from ..anvil import KIND_ACCOUNT_CLIENT, KIND_CLIENT, ClientTable, client_key
from ..imapsync.sentcopy import queue_sent_copy
from ..metrics import Metrics
from ..replies import Reply
from ..server import (
    ClientLimits,
    ConnectionGate,
    DataContext,
    DealmailSMTP,
    Job,
    SessionLimits,
    Sessions,
    decide_and_commit,
    evidence_of,
    incident_reply,
    new_queue_id,
    parse_listen,
    peer_ip,
)
from .delivery import has_bare_cr_or_lf, normalize_line_endings
from .longlines import LIMIT, fit_line_length

__all__ = [
    "LoginThrottle",
    "RelayHandler",
    "SubmissionHooks",
    "SubmissionSMTP",
    "complete_headers",
    "dkim_sign",
    "install_auth_redaction",
    "outgoing_copy",
    "received_line",
    "start_submission",
    "start_submission_listeners",
    "strip_bcc",
]

log = logging.getLogger("dealmail.relay")

AUTH_OK = "235 2.7.0 Authentication successful"
# RFC 4954 §6: the same answer whether the login is unknown or the password wrong.
AUTH_INVALID = "535 5.7.8 Authentication credentials invalid"
AUTH_LOCKED = "421 4.7.0 Too many failed logins; try again later"
AUTH_NEEDS_TLS = "538 5.7.11 Encryption required for requested authentication mechanism"
# RFC 4616 §2: an authorization identity other than the login asks to act as someone else
# (proxy authorization), which no user may do.
AUTH_AUTHZID = "535 5.7.8 Authorization identity must be empty or the login itself"
SOURCE_ROUTE_REFUSED = ("553 5.1.3 Source routes are not accepted; send to the plain "
                        "address (RFC 5321 section 4.1.1.3)")

_BCC_RE = re.compile(rb"^bcc[ \t]*:", re.IGNORECASE)
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_AUTH_LINE_RE = re.compile(r"auth\b|auth_|base64|challenge", re.IGNORECASE)
_SOURCE_ROUTE_RE = re.compile(r"^\s*<\s*@")


# --------------------------------------------------------------------------- throttling


class LoginThrottle:
    """Failed logins of the submission listeners, counted in the table shared by every
    worker process (see the module docstring). Times come from the injected clock."""

    def __init__(self, table: ClientTable, config_of: Callable[[], Config],
                 now: Callable[[], float]) -> None:
        self.table = table
        self.config_of = config_of
        self.now = now

    def refused(self, ip: str, login: str | None = None) -> bool:
        """Whether logins from ``ip`` (as ``login``) are refused for now."""
        return self.table.locked(client_key(ip), login, self.now()) > 0

    def delay(self, login: str) -> float:
        """Seconds a login as ``login`` waits before its password is checked."""
        relay = self.config_of().relay
        failures = self.table.account_failures(login, self.now())
        return min(relay.auth_failure_delay * failures, relay.auth_max_delay)

    def failure(self, ip: str, login: str) -> None:
        # Every login string is counted alike, a user's or not: the answers must not tell
        # an existing account from an unknown one (RFC 4954 §6).
        relay = self.config_of().relay
        self.table.login_failure(
            client_key(ip), login, self.now(), relay.auth_window_seconds,
            relay.auth_lockout_seconds, {KIND_CLIENT: relay.auth_client_max_failures,
                                         KIND_ACCOUNT_CLIENT: relay.auth_max_failures})

    def success(self, ip: str, login: str) -> None:
        self.table.login_success(client_key(ip), login, self.now())


class _RedactAuth(logging.Filter):
    """Drops the argument values of aiosmtpd's log lines about AUTH (it logs every command
    line, with the base64 credentials), so no password reaches a log (docs/reliability.md A.29)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage()
        except Exception:  # a malformed record is not ours to fix
            return True
        if _AUTH_LINE_RE.search(text):
            record.msg = "%s"
            record.args = ("(AUTH exchange, redacted)",)
        return True


def install_auth_redaction() -> None:
    """Idempotent: one redacting filter on aiosmtpd's logger."""
    logger = logging.getLogger("mail.log")
    if not any(isinstance(f, _RedactAuth) for f in logger.filters):
        logger.addFilter(_RedactAuth())


# --------------------------------------------------------------------------- message editing


def _header_end(raw: bytes) -> int:
    i = raw.find(b"\r\n\r\n")
    return len(raw) if i == -1 else i + 2  # offset just past the last header line's CRLF


def strip_bcc(raw: bytes) -> bytes:
    """Remove every ``Bcc:`` field (with its folded continuation lines) from the header block
    of a CRLF message; everything else is kept byte for byte (RFC 5322 §3.6.3)."""
    end = _header_end(raw)
    lines = raw[:end].split(b"\r\n")
    kept: list[bytes] = []
    dropping = False
    for line in lines:
        if line[:1] in (b" ", b"\t") and dropping:
            continue
        dropping = bool(_BCC_RE.match(line))
        if not dropping:
            kept.append(line)
    return b"\r\n".join(kept) + raw[end:]


def _has_header(raw: bytes, name: bytes) -> bool:
    pattern = re.compile(rb"^" + re.escape(name) + rb"[ \t]*:", re.IGNORECASE | re.MULTILINE)
    return pattern.search(raw[:_header_end(raw)]) is not None


def complete_headers(raw: bytes, hostname: str, now: datetime) -> bytes:
    """RFC 6409 §8.2/§8.3: a submission server may add a missing Date and Message-ID; we do,
    so that replies thread and the stored copy and the delivered copy share one id."""
    added = b""
    if not _has_header(raw, b"message-id"):
        added += f"Message-ID: {make_msgid(domain=hostname)}\r\n".encode()
    if not _has_header(raw, b"date"):
        added += f"Date: {format_datetime(now)}\r\n".encode()
    if not added:
        return raw
    end = _header_end(raw)
    return raw[:end] + added + raw[end:]


def _clean(text: str, limit: int = 200) -> str:
    # HELO and login come from the client: no CR/LF may reach a header (docs/reliability.md A.35).
    return _CONTROL_RE.sub("", text)[:limit] or "unknown"


def received_line(helo: str, ip: str, hostname: str, queue_id: str, login: str,
                  recipients: list[str], now: datetime) -> bytes:
    """RFC 5321 §4.4 trace field; ``ESMTPSA`` = ESMTP + STARTTLS/TLS + AUTH (RFC 3848)."""
    for_part = f"\r\n\tfor <{_clean(recipients[0])}>" if len(recipients) == 1 else ""
    line = (f"Received: from {_clean(helo)} ([{_clean(ip)}])\r\n\tby {hostname} (dealmail) "
            f"with ESMTPSA id {queue_id}{for_part}\r\n\t(authenticated sender {_clean(login)})"
            f"; {format_datetime(now)}\r\n")
    return line.encode("utf-8")


def dkim_sign(raw: bytes, domain: str, selector: str, key_pem: bytes) -> bytes:
    """Prepend a DKIM-Signature (relaxed/relaxed, rsa- or ed25519-sha256 by key type)."""
    import dkim

    header = dkim.sign(raw, selector.encode(), domain.encode(), key_pem,
                       canonicalize=(b"relaxed", b"relaxed"), linesep=b"\r\n")
    return bytes(header) + raw


def outgoing_copy(raw: bytes, received: bytes, dkim_key: tuple[str, str, bytes] | None,
                  *, longest_line: int | None = None) -> bytes:
    """The delivered copy: no Bcc, our Received line on top, no line longer than 998 octets
    (a part with longer ones re-encoded, ``mta.relay.longlines``), then DKIM-signed when a
    key is set, so that the signature covers what leaves. ``longest_line`` is what the DATA
    reader measured; without it the message is scanned."""
    out = received + strip_bcc(raw)
    if longest_line is None or longest_line > LIMIT:
        out = fit_line_length(out)
    if dkim_key is not None:
        domain, selector, pem = dkim_key
        out = dkim_sign(out, domain, selector, pem)
    return out


# --------------------------------------------------------------------------- the handler


def _owned(user: User, address: str) -> bool:
    try:
        return normalize_address(address) in user.addresses
    except AddressError:
        return False


class RelayHandler:
    """Decides about one submitted message (worker thread) and returns the committer's job."""

    channel = "relay"

    def __init__(self, capture: Capture, now: Callable[[], datetime], base: Path,
                 store: Store | None = None) -> None:
        self.capture = capture
        self.config_of = capture.config_of
        self.now = now
        self.base = base
        # With the store, relayed mail is also filed in the user's Sent folder by the
        # mailbox sync (mta/imapsync/sentcopy.py) once delivered.
        self.store = store

    def _dkim_key(self, config: Config, from_domain: str) -> tuple[str, str, bytes] | None:
        for domain, selector, key_file in config.relay.dkim:
            if domain == from_domain:
                try:
                    return domain, selector, (self.base / key_file).read_bytes()
                except OSError as exc:
                    # Misconfiguration must not hold users' mail: send unsigned, loudly.
                    log.error("DKIM key %s for %s unreadable (%s): sending unsigned",
                              key_file, domain, exc.strerror)
        return None

    def check(self, ctx: DataContext, recipients: list[str]) -> Reply | Job:
        qid = ctx.queue_id
        config = self.config_of()
        found = config.find_user(ctx.authenticated_as or "")
        if found is None:
            # The account disappeared from the config during the session (reload).
            return Reply(451, "4.7.0", "Your account changed; log in again")
        company, user = found
        raw = ctx.raw
        if has_bare_cr_or_lf(raw):
            if config.relay.bare_newlines == "reject":
                log.info("[%s] refused from %s: bare CR or LF", qid, user.address)
                return replies.bad_content(
                    "bare CR or LF in the message; lines must end with CRLF "
                    "(RFC 5322 section 2.3)")
            raw = normalize_line_endings(raw)
            log.info("[%s] bare CR/LF normalised to CRLF", qid)
        now = self.now()
        raw = complete_headers(raw, config.hostname, now)
        try:
            parsed = parse_message(raw, config.limits)
        except MessageRejected as exc:
            log.info("[%s] refused from %s: %s", qid, user.address, exc.reason)
            return replies.bad_content(exc.reason)
        request = CaptureRequest(
            raw=raw, channel="relay", company=company, queue_id=qid,
            evidence=evidence_of(ctx), trust=Trust.LOGIN, user=user,
            recipients=tuple(recipients), received_at=now)
        # The same gate as every source: here it checks that From, Sender and Resent-From
        # are the authenticated user's own addresses (553 5.7.1 otherwise).
        admitted = self.capture.gate.admit(parsed, request)
        if isinstance(admitted, Disposition):
            log.info("[%s] refused from %s: %s", qid, user.address, admitted.reason)
            return replies.for_disposition(admitted, qid, refused_sender_code=553)
        # An automatic message is delivered but never tracked (no loops, RFC 3834 §2).
        prepared: Disposition | Commit = (
            Disposition(Outcome.IGNORED, f"automatic message ({parsed.auto_reason})")
            if parsed.is_auto else self.capture.prepare(request, parsed))
        received = received_line(ctx.helo, ctx.peer_ip, config.hostname, qid, user.address,
                                 recipients, now)
        outgoing = outgoing_copy(raw, received,
                                 self._dkim_key(config, domain_of(parsed.from_.address)),
                                 longest_line=ctx.extra.get("longest_line"))
        mid = parsed.message_id or "-"
        company_id = self.capture.directory_of().company_ids.get(company.slug)

        def job() -> Reply:
            done = prepared if isinstance(prepared, Disposition) else prepared()
            if not done.accepted:  # the capture refused: nothing is sent either
                return replies.for_disposition(done, qid, refused_sender_code=553)
            if done.outcome is Outcome.IGNORED:
                log.info("[%s] %s not tracked (%s)", qid, mid, done.reason)
            ids = enqueue(outgoing, kind="relay", mail_from=ctx.mail_from,
                          recipients=recipients, now=now, company_id=company_id,
                          subject=parsed.subject)
            log.info("[%s] %s from %s queued for %d recipient(s) as outbox %s", qid, mid,
                     user.address, len(recipients), ",".join(f"#{i}" for i in ids))
            if self.store is not None and user.mailboxes and config.imap.enabled:
                queue_sent_copy(self.store, user, parsed.from_.address, raw,
                                parsed.message_id, ids, now)
            return Reply(250, "2.0.0", f"Ok: queued as {qid}")

        return job


# --------------------------------------------------------------------------- SMTP side


def _login_form(value: bytes) -> str:
    """A login or authorization identity as compared: a normalised address if it is one."""
    text = value.decode("utf-8", "replace").strip()
    try:
        return normalize_address(text)
    except AddressError:
        return text.lower()


def _is_tls(server: Any) -> bool:
    transport = server.transport
    return server._tls_protocol is not None or (
        transport is not None and transport.get_extra_info("sslcontext") is not None)


class SubmissionSMTP(DealmailSMTP):
    """The protocol of the submission listeners."""

    _source_route = False

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        # RFC 5321 §4.1.1.3 and appendix C: a server SHOULD ignore a source route
        # (<@a.test,@b.test:x@y>), and aiosmtpd drops it silently. A mail client never sends
        # one, and the next hop of a relay might honour it: refused (docs/reliability.md
        # A.31), with aiosmtpd's own order of checks (530/503 first).
        if _SOURCE_ROUTE_RE.match(arg or ""):
            self._source_route = True
            return None, None
        return super()._getaddr(arg)

    async def push(self, status: Any) -> None:
        if (self._source_route and isinstance(status, str)
                and status.startswith("553 5.1.3 Error: malformed address")):
            self._source_route = False
            log.info("source-routed path refused from %s",
                     peer_ip(self.session) if self.session is not None else "?")
            status = SOURCE_ROUTE_REFUSED
        await super().push(status)

    async def smtp_STARTTLS(self, arg: str) -> None:
        # RFC 3207 §4.2: STARTTLS once; aiosmtpd would start a second handshake on the TLS
        # stream (docs/reliability.md A.27).
        if _is_tls(self):
            await self.push("503 5.5.1 TLS already active")
            return
        await super().smtp_STARTTLS(arg)


class SubmissionHooks:
    """aiosmtpd hook object of the submission listeners."""

    #: Set by the application when it counts messages (``mta.metrics``).
    metrics: Metrics | None = None

    def __init__(self, config_of: Callable[[], Config], handler: RelayHandler,
                 throttle: LoginThrottle, committer: GroupCommitter,
                 executor: ThreadPoolExecutor) -> None:
        self.config_of = config_of
        self.handler = handler
        self.throttle = throttle
        self.committer = committer
        self.executor = executor

    async def handle_EHLO(self, server: Any, session: Session, envelope: Envelope,
                          hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname
        extra = ["250-PIPELINING", "250-ENHANCEDSTATUSCODES"]
        return [*responses[:-1], *extra, responses[-1]]

    # ------------------------------------------------------------------ AUTH

    async def _refuse_locked(self, server: Any) -> None:
        await server.push(AUTH_LOCKED)
        transport = server.transport
        if transport is not None:
            transport.close()

    async def _credentials(self, server: Any,
                           args: list[str]) -> tuple[bytes, bytes, bytes] | None:
        """(authorization identity, login, password) from AUTH PLAIN or LOGIN (which has no
        authorization identity: empty); None after a protocol error reply."""
        mechanism = args[0].upper()
        try:
            if mechanism == "PLAIN":
                if len(args) == 1:
                    blob = await server.challenge_auth("")
                    if blob is MISSING:
                        return None
                else:
                    blob = b64decode(args[1].encode(), validate=True)
                parts = blob.split(b"\x00")
                if len(parts) != 3:
                    await server.push("501 5.5.2 Cannot split the PLAIN response")
                    return None
                return parts[0], parts[1], parts[2]  # RFC 4616 §2: authzid NUL authcid NUL pw
            if mechanism == "LOGIN":
                if len(args) == 1:
                    login = await server.challenge_auth("Username:")
                    if login is MISSING:
                        return None
                else:
                    login = b64decode(args[1].encode(), validate=True)
                password = await server.challenge_auth("Password:")
                if password is MISSING:
                    return None
                return b"", login, password
        except (binascii.Error, ValueError):
            await server.push("501 5.5.2 Cannot decode base64")
            return None
        await server.push("504 5.5.4 Unrecognized authentication type")
        return None

    async def handle_AUTH(self, server: Any, session: Session, envelope: Envelope,
                          args: list[str]) -> str | None:
        ip = peer_ip(session)
        if not _is_tls(server):
            return AUTH_NEEDS_TLS
        if self.throttle.refused(ip):
            log.info("AUTH from %s refused: too many failures", ip)
            await self._refuse_locked(server)
            return None
        creds = await self._credentials(server, args)
        if creds is None:
            return None
        authzid_bytes, login_bytes, password_bytes = creds
        login = _login_form(login_bytes)
        password = password_bytes.decode("utf-8", "replace")
        if authzid_bytes and _login_form(authzid_bytes) != login:
            # Refused before the password is looked at: the answer says nothing about it.
            log.info("AUTH from %s refused: authorization identity differs from the login", ip)
            return AUTH_AUTHZID
        if self.throttle.refused(ip, login):
            log.info("AUTH from %s refused: too many failures", ip)
            await self._refuse_locked(server)
            return None
        delay = self.throttle.delay(login)
        if delay > 0:
            # The account had failures (from anywhere): slowed, never locked.
            await asyncio.sleep(delay)  # a real wait for the client (tests set 0)
        config = self.config_of()
        found = config.find_user(login)
        user = found[1] if found is not None and found[1].address == login else None
        stored = user.password_hash if user is not None else None
        loop = asyncio.get_running_loop()
        ok = await loop.run_in_executor(self.executor, verify_password, password, stored)
        if ok and user is not None:
            self.throttle.success(ip, login)
            session.authenticated = True
            session.auth_data = user.address  # type: ignore[assignment]
            log.info("AUTH ok: %s from %s", user.address, ip)
            return AUTH_OK
        self.throttle.failure(ip, login)
        # The login is logged only when it is a user's address: a password typed into the
        # login field must not end up in the log.
        log.info("AUTH failed from %s for %s", ip,
                 user.address if user is not None else "an unknown login")
        if self.throttle.refused(ip, login):
            await self._refuse_locked(server)
            return None
        return AUTH_INVALID

    # ------------------------------------------------------------------ transaction

    def _user(self, session: Session) -> User | None:
        if not session.authenticated or not isinstance(session.auth_data, str):
            return None
        found = self.config_of().find_user(session.auth_data)
        return found[1] if found is not None else None

    async def handle_MAIL(self, server: Any, session: Session, envelope: Envelope,
                          address: str, mail_options: list[str]) -> str:
        user = self._user(session)
        if user is None:
            return "530 5.7.0 Authentication required"
        if address not in ("", "<>") and not _owned(user, address):
            log.info("MAIL FROM <%s> refused: not an address of %s", _clean(address),
                     user.address)
            return f"553 5.7.1 Sender address rejected: not owned by user {user.address}"
        envelope.mail_from = "" if address == "<>" else address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(self, server: Any, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        if self._user(session) is None:
            # Never an open relay (RFC 5321 §7.1); aiosmtpd's auth_required already said 530.
            return "550 5.7.1 Relaying denied: authenticate first"
        if len(envelope.rcpt_tos) >= self.config_of().limits.max_recipients:
            return str(replies.too_many_recipients())
        try:
            normal = normalize_address(address)
        except AddressError:
            return "501 5.1.3 Bad recipient address syntax"
        local = normal.rpartition("@")[0]
        if any(c in local for c in '%!@"') or normal.rpartition("@")[2].startswith("["):
            # Source-route and percent-hack forms (docs/reliability.md A.31): no legitimate client
            # needs them, and a lenient next hop could relay them on.
            return "553 5.1.3 Recipient address form not accepted here"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: Any, session: Session, envelope: Envelope) -> str:
        queue_id = new_queue_id()
        ctx = DataContext(
            raw=bytes(envelope.original_content or b""), mail_from=envelope.mail_from or "",
            routes=[], peer_ip=peer_ip(session), helo=session.host_name or "",
            queue_id=queue_id, authenticated_as=session.auth_data
            if isinstance(session.auth_data, str) else None,
            smtp_utf8="SMTPUTF8" in [o.upper() for o in envelope.mail_options],
            extra={"tls": _is_tls(server),
                   "longest_line": getattr(envelope, "longest_line", None)},
        )
        check = functools.partial(self.handler.check, ctx, list(envelope.rcpt_tos))
        return await decide_and_commit(self.executor, self.committer, check, ctx,
                                       metrics=self.metrics,
                                       listener="submission")

    async def handle_exception(self, error: Exception) -> str:
        return incident_reply(error)


async def start_submission(
    hooks: SubmissionHooks, listen: str, tls_context: ssl.SSLContext, *, implicit: bool,
    hostname: str, data_size_limit: int | Callable[[], int], command_timeout: float,
    data_timeout: float, max_connections: int, line_length: int = LimitsConfig.line_length,
    limits: Callable[[], SessionLimits] | None = None, clients: ClientLimits | None = None,
    sessions: Sessions | None = None, sock: socket.socket | None = None,
) -> asyncio.Server:
    """Listen on ``HOST:PORT`` (or accept on ``sock``, bound by the pre-fork parent): STARTTLS
    (``implicit=False``) or TLS from the first byte. The other arguments are those of
    :func:`mta.server.start_listener`."""
    install_auth_redaction()
    host, port = parse_listen(listen)
    gate = ConnectionGate(max_connections)
    loop = asyncio.get_running_loop()

    def factory() -> SubmissionSMTP:
        protocol = SubmissionSMTP(
            hooks, gate=gate, data_timeout=data_timeout, line_length=line_length,
            limits=limits() if limits is not None else None, clients=clients,
            sessions=sessions,
            data_size_limit=data_size_limit() if callable(data_size_limit) else data_size_limit,
            enable_SMTPUTF8=True, hostname=hostname, ident="dealmail ESMTP submission",
            timeout=command_timeout, loop=loop, auth_required=True, auth_require_tls=True,
            tls_context=None if implicit else tls_context,
        )
        if implicit:
            # aiosmtpd counts only STARTTLS as TLS for AUTH; here every byte is under TLS
            # (and handle_AUTH checks the transport itself).
            protocol._auth_require_tls = False
        return protocol

    if sock is not None:
        return await loop.create_server(factory, sock=sock,
                                         ssl=tls_context if implicit else None)
    return await loop.create_server(factory, host=host, port=port,
                                     ssl=tls_context if implicit else None)


async def start_submission_listeners(app: Any) -> dict[str, asyncio.Server]:
    """Start the listeners the config asks for (App.start calls this): ``submission`` and
    ``submissions``. The relay captures through the application's one capture path."""
    from .tlscert import submission_context

    c: Config = app.config
    servers: dict[str, asyncio.Server] = {}
    if not (c.listeners.submission or c.listeners.submissions):
        return servers
    context = submission_context(c.tls.cert_file, c.tls.key_file, c.hostname, app.base,
                                 app.clock.now())
    app.tls_context = context  # App.reload loads renewed certificate files into it
    handler = RelayHandler(app.capture, app.clock.now, app.base, store=app.store)
    throttle = LoginThrottle(app.clients_table, app.get_config,
                             lambda: app.clock.now().timestamp())
    hooks = SubmissionHooks(app.get_config, handler, throttle, app.committer, app.executor)
    hooks.metrics = app.metrics
    for name, listen, implicit in (("submission", c.listeners.submission, False),
                                   ("submissions", c.listeners.submissions, True)):
        if not listen:
            continue
        servers[name] = await start_submission(
            hooks, listen, context, implicit=implicit, hostname=c.hostname,
            data_size_limit=lambda: app.config.limits.message_size,
            command_timeout=c.listeners.command_timeout,
            data_timeout=c.listeners.data_timeout, max_connections=c.listeners.max_connections,
            line_length=c.limits.line_length, limits=app.session_limits,
            clients=app.client_limits, sessions=app.sessions, sock=app.prebound.get(name))
        sock = servers[name].sockets[0].getsockname()
        log.info("%s listening on %s:%s (%s)", name, sock[0], sock[1],
                 "implicit TLS" if implicit else "STARTTLS")
    return servers


