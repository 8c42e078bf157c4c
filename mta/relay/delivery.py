"""Outbound delivery of one queued message to one destination (smarthost or MX hosts).

This is the SMTP client half of the relay. The outbox worker (built elsewhere) claims a
queued item, asks :mod:`mta.relay.mx` for the routes of the recipients' domain (or uses the
configured smarthost), calls :func:`deliver`, and then stores each recipient's
:class:`Outcome`: DELIVERED recipients are done, TEMPORARY ones get a new time from
:mod:`dealmail.schedules`, PERMANENT ones get a DSN from :mod:`mta.relay.dsn`. Nothing here touches
the database, reads a clock or sleeps.

Decisions, in one place each:

* :func:`classify` is the only function that turns a reply code into an outcome (the Mailman 3
  ``mta/deliver.py`` rule): 2xx delivered; 5xx permanent except 552, which RFC 5321
  §4.5.3.1.10 tells clients to treat as temporary; everything else, including "no reply at all"
  (:data:`NO_REPLY`, connection refused/lost, timeouts), temporary.
* Routes are tried in order until one gets as far as ``MAIL FROM`` (RFC 5321 §5.1: try the
  next MX host when a connection cannot be made or the host will not talk to us). Once the
  transaction has started, that host's answers are final for this attempt.
* TLS: ``required`` means STARTTLS with certificate and host name verification and no
  fallback (a MITM stripping STARTTLS gets a deferral, not plaintext); ``implicit`` is TLS from
  the first byte (RFC 8314); ``opportunistic`` uses STARTTLS when offered without verifying
  the certificate, as RFC 7672 §1.3 describes opportunistic TLS for SMTP.
* Credentials are never sent over an unencrypted connection, whatever the route says
  (docs/reliability.md D.6.6): the route fails with a TEMPORARY outcome and a clear message.
* The message body is normalised to CRLF before it leaves (docs/reliability.md A.25): a bare LF
  must never reach a downstream server, since a lenient one would read ``\\n.\\r\\n`` as the end
  of data (SMTP smuggling). aiosmtplib dot-stuffs the normalised lines.
* A connection lost after the final ``.`` but before the reply is ambiguous (RFC 1047): the
  recipients are TEMPORARY and a retry may deliver a duplicate; the relay is at-least-once.
"""

from __future__ import annotations

import enum
import re
import ssl
from dataclasses import dataclass, field

import aiosmtplib
from aiosmtplib.email import parse_address

__all__ = [
    "NO_REPLY",
    "DeliveryResult",
    "NextHop",
    "Outcome",
    "RecipientResult",
    "classify",
    "deliver",
    "has_bare_cr_or_lf",
    "normalize_line_endings",
]

# Pseudo reply code for "the server gave no SMTP reply" (refused, dropped, timed out,
# refused by our own policy before a command was sent). classify(NO_REPLY) is TEMPORARY.
NO_REPLY = 0

TLS_MODES = ("required", "implicit", "opportunistic")

_LINE_ENDINGS_RE = re.compile(rb"\r\n|\r|\n")
_BARE_CR_OR_LF_RE = re.compile(rb"\r(?!\n)|(?<!\r)\n")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


class Outcome(enum.Enum):
    """What the worker does with a recipient after an attempt."""

    DELIVERED = "delivered"
    TEMPORARY = "temporary"
    PERMANENT = "permanent"


def classify(code: int) -> Outcome:
    """The single mapping from an SMTP reply code to an :class:`Outcome`."""
    if 200 <= code <= 299:
        return Outcome.DELIVERED
    # RFC 5321 §4.5.3.1.10: 552 "exceeded storage allocation" was historically returned for
    # too many recipients; clients should treat it as a temporary failure.
    if 500 <= code <= 599 and code != 552:
        return Outcome.PERMANENT
    return Outcome.TEMPORARY


@dataclass
class RecipientResult:
    """The outcome for one envelope recipient, with the reply that caused it."""

    address: str
    outcome: Outcome
    code: int
    message: str
    remote_mta: str | None = None  # host that gave the reply, for the DSN's Remote-MTA


@dataclass
class NextHop:
    """One host to try: a smarthost, or one MX host of the destination domain."""

    host: str
    port: int = 25
    tls: str = "opportunistic"  # "required" | "implicit" | "opportunistic"
    username: str | None = None
    password: str | None = None
    ssl_context: ssl.SSLContext | None = None  # verification context for required/implicit

    def __post_init__(self) -> None:
        if self.tls not in TLS_MODES:
            raise ValueError(f"NextHop.tls must be one of {TLS_MODES}, not {self.tls!r}")
        if (self.username is None) != (self.password is None):
            raise ValueError("NextHop needs both username and password, or neither")

    @property
    def label(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass
class DeliveryResult:
    """Per-recipient results of one attempt; ``transcript_error`` explains connection trouble."""

    recipients: list[RecipientResult]
    transcript_error: str | None = None
    route: NextHop | None = field(default=None)  # the route whose host took the transaction
    #: ``host[ip]:port`` of that route as Postfix logs it (``relay=``); None when no host
    #: took the transaction.
    relay: str | None = None

    def by_outcome(self, outcome: Outcome) -> list[RecipientResult]:
        return [r for r in self.recipients if r.outcome is outcome]


def normalize_line_endings(data: bytes) -> bytes:
    """Turn every bare CR, bare LF and CRLF into CRLF (RFC 5321 §2.3.8), ending with CRLF.

    ``\\r\\r\\n`` becomes two line breaks: the lone CR is a line break of its own.
    """
    data = _LINE_ENDINGS_RE.sub(b"\r\n", data)
    if data and not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data


def has_bare_cr_or_lf(data: bytes) -> bool:
    """True when ``data`` holds a CR not followed by LF or an LF not preceded by CR."""
    return _BARE_CR_OR_LF_RE.search(data) is not None


class _RouteFailed(Exception):
    """A connection-level failure: try the next route."""


def _address_problem(address: str, *, null_allowed: bool) -> str | None:
    """Why ``address`` cannot go on a MAIL/RCPT line, or None.

    aiosmtplib (>=5.1.1) refuses CR/LF but runs addresses through ``email.utils.parseaddr``,
    which would silently rewrite e.g. ``a(comment)@b`` into ``a@b``; we refuse anything it
    would change, so the envelope sent is exactly the envelope queued (docs/reliability.md D.6.16).
    """
    if address == "":
        return None if null_allowed else "empty address"
    if _CONTROL_RE.search(address):
        return "control character in address"
    if "@" not in address:
        return "address has no domain"
    if len(address.encode("utf-8")) > 254:  # RFC 5321 §4.5.3.1.3 path limit minus brackets
        return "address too long"
    try:
        parsed = parse_address(address)
    except ValueError:
        return "characters not permitted in an SMTP mailbox"
    if parsed != address:
        return "address would be rewritten by the SMTP client"
    return None


def _is_encrypted(smtp: aiosmtplib.SMTP) -> bool:
    return smtp.get_transport_info("sslcontext") is not None


def _opportunistic_context() -> ssl.SSLContext:
    # RFC 7672 §1.3: opportunistic TLS does not authenticate the server; it only protects
    # against passive eavesdropping. Verification is for routes configured "required".
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


async def _hello(smtp: aiosmtplib.SMTP) -> None:
    try:
        await smtp.ehlo()
    except aiosmtplib.SMTPHeloError:
        # RFC 5321 §4.1.4: fall back to HELO when EHLO is refused.
        await smtp.helo()


async def _open(route: NextHop, helo_name: str, command_timeout: float) -> aiosmtplib.SMTP:
    """Connect, say EHLO, negotiate TLS and authenticate per ``route``; raise _RouteFailed."""
    implicit = route.tls == "implicit"
    smtp = aiosmtplib.SMTP(
        hostname=route.host,
        port=route.port,
        local_hostname=helo_name,
        timeout=command_timeout,
        use_tls=implicit,
        start_tls=False,  # STARTTLS is negotiated below, per the route's policy
        validate_certs=route.tls != "opportunistic",
        tls_context=route.ssl_context if route.tls != "opportunistic" else None,
    )
    try:
        try:
            await smtp.connect()
        except aiosmtplib.SMTPConnectResponseError as exc:
            raise _RouteFailed(f"{route.label} greeted with {exc.code} {exc.message}") from exc
        except (aiosmtplib.SMTPException, OSError, ssl.SSLError) as exc:
            raise _RouteFailed(f"cannot connect to {route.label}: {exc}") from exc

        await _hello(smtp)
        if route.tls == "required":
            if not smtp.supports_extension("starttls"):
                raise _RouteFailed(
                    f"{route.label} does not offer STARTTLS and the route requires TLS; "
                    "nothing was sent"
                )
            try:
                await smtp.starttls()
            except (aiosmtplib.SMTPException, OSError, ssl.SSLError) as exc:
                raise _RouteFailed(
                    f"TLS required but STARTTLS with {route.label} failed "
                    f"(certificate or handshake): {exc}"
                ) from exc
            await _hello(smtp)  # RFC 3207 §4.2: forget pre-TLS capabilities
        elif route.tls == "opportunistic" and smtp.supports_extension("starttls"):
            try:
                await smtp.starttls(tls_context=_opportunistic_context())
            except (aiosmtplib.SMTPException, OSError, ssl.SSLError) as exc:
                raise _RouteFailed(f"STARTTLS with {route.label} failed: {exc}") from exc
            await _hello(smtp)

        if route.username is not None:
            if not _is_encrypted(smtp):
                # Never hand credentials to a cleartext session, even if the server offers
                # AUTH: a MITM may have stripped STARTTLS (docs/reliability.md 0.4, D.6.6).
                raise _RouteFailed(
                    f"refusing to send AUTH credentials to {route.label} over an unencrypted "
                    "connection (STARTTLS not offered or not negotiated)"
                )
            if not smtp.supports_extension("auth"):
                raise _RouteFailed(f"{route.label} does not offer AUTH after TLS")
            try:
                await smtp.login(route.username, route.password or "")
            except aiosmtplib.SMTPResponseException as exc:
                # Bad smarthost credentials are our configuration fault: keep the mail.
                raise _RouteFailed(
                    f"AUTH at {route.label} failed: {exc.code} {exc.message}"
                ) from exc
        return smtp
    except _RouteFailed:
        await _close(smtp)
        raise
    except (aiosmtplib.SMTPException, OSError, ssl.SSLError) as exc:
        await _close(smtp)
        raise _RouteFailed(f"session with {route.label} failed before MAIL: {exc}") from exc


async def _close(smtp: aiosmtplib.SMTP) -> None:
    if smtp.is_connected:
        try:
            # Short: a server that stalled once is not worth waiting for to say goodbye.
            await smtp.quit(timeout=min(5.0, smtp.timeout or 5.0))
        except (aiosmtplib.SMTPException, OSError, ssl.SSLError):
            pass
    smtp.close()


def _needs_smtputf8(mail_from: str, recipients: list[str]) -> bool:
    return not all(a.isascii() for a in [mail_from, *recipients])


async def _transaction(
    smtp: aiosmtplib.SMTP,
    route: NextHop,
    data: bytes,
    mail_from: str,
    recipients: list[str],
    results: dict[str, RecipientResult],
) -> str | None:
    """MAIL, RCPT per recipient, DATA; fill ``results``; return a transcript error or None."""

    def set_all(addresses: list[str], outcome: Outcome, code: int, message: str) -> None:
        for address in addresses:
            results[address] = RecipientResult(address, outcome, code, message, route.host)

    utf8 = _needs_smtputf8(mail_from, recipients)
    eight_bit = not data.isascii()
    options: list[str] = []
    if utf8:
        if not smtp.supports_extension("smtputf8"):
            # RFC 6531 §3.2 / docs/reliability.md A.18: cannot downgrade an internationalised
            # address; the recipient's server will not accept it on any retry.
            set_all(recipients, Outcome.PERMANENT, 553,
                    "5.6.7 non-ASCII address and the server does not offer SMTPUTF8")
            return None
        options.append("SMTPUTF8")
    if eight_bit:
        if not smtp.supports_extension("8bitmime"):
            # RFC 6152: never send raw 8-bit data to a server without 8BITMIME (A.17).
            set_all(recipients, Outcome.PERMANENT, 554,
                    "5.6.3 8-bit message and the server does not offer 8BITMIME")
            return None
        options.append("BODY=8BITMIME")
    if smtp.supports_extension("size"):
        options.append(f"SIZE={len(data)}")
    encoding = "utf-8" if utf8 else "ascii"

    stage = "MAIL FROM"
    accepted: list[str] = []
    try:
        try:
            await smtp.mail(mail_from, options=options, encoding=encoding)
        except aiosmtplib.SMTPResponseException as exc:
            set_all(recipients, classify(exc.code), exc.code, exc.message)
            return None
        stage = "RCPT TO"
        for address in recipients:
            try:
                await smtp.rcpt(address, encoding=encoding)
            except aiosmtplib.SMTPResponseException as exc:
                results[address] = RecipientResult(
                    address, classify(exc.code), exc.code, exc.message, route.host
                )
                continue
            accepted.append(address)
            results[address] = RecipientResult(
                address, Outcome.TEMPORARY, NO_REPLY, "accepted at RCPT, DATA not completed",
                route.host,
            )
        if not accepted:
            try:
                await smtp.rset()
            except aiosmtplib.SMTPResponseException:
                pass
            return None
        stage = "DATA"
        try:
            reply = await smtp.data(data)
        except aiosmtplib.SMTPResponseException as exc:
            # A DATA failure applies to every recipient accepted at RCPT (RFC 5321 §3.3).
            set_all(accepted, classify(exc.code), exc.code, exc.message)
            return None
        set_all(accepted, classify(reply.code), reply.code, reply.message)
        return None
    except (aiosmtplib.SMTPException, OSError, ssl.SSLError) as exc:
        pending = [a for a in recipients if a not in results or a in accepted]
        if stage == "DATA":
            why = (f"connection to {route.label} lost or timed out during DATA: {exc}; "
                   "the message may have been delivered (a retry can duplicate it)")
        else:
            why = f"connection to {route.label} lost or timed out at {stage}: {exc}"
        set_all(pending, Outcome.TEMPORARY, NO_REPLY, why)
        return why


async def deliver(
    message: bytes,
    mail_from: str,
    recipients: list[str],
    routes: list[NextHop],
    helo_name: str,
    timeout: float = 60,  # noqa: ASYNC109 - per command/reply, handed to aiosmtplib
) -> DeliveryResult:
    """Try to deliver ``message`` to ``recipients`` through the first route that takes it.

    ``mail_from == ""`` sends the null reverse-path (``MAIL FROM:<>``), as for DSNs.
    ``timeout`` bounds the connection and each command/reply separately (seconds).
    Never raises for network or protocol trouble: every recipient gets a result.
    """
    # Exact duplicates would get two RCPTs and two results for one mailbox.
    unique = list(dict.fromkeys(recipients))
    results: dict[str, RecipientResult] = {}

    problem = _address_problem(mail_from, null_allowed=True)
    if problem is not None:
        return DeliveryResult(
            [RecipientResult(a, Outcome.PERMANENT, 553, f"5.1.7 bad sender address: {problem}")
             for a in unique],
            f"sender {mail_from!r} refused locally: {problem}",
        )
    sendable: list[str] = []
    for address in unique:
        problem = _address_problem(address, null_allowed=False)
        if problem is None:
            sendable.append(address)
        else:
            # Refused locally, before any byte is written (docs/reliability.md D.6.16).
            results[address] = RecipientResult(
                address, Outcome.PERMANENT, 553, f"5.1.3 bad recipient address: {problem}"
            )

    def ordered(error: str | None, route: NextHop | None = None,
                relay: str | None = None) -> DeliveryResult:
        return DeliveryResult([results[a] for a in unique], error, route, relay)

    if not sendable:
        return ordered(None)

    data = normalize_line_endings(message)
    errors: list[str] = []
    for route in routes:
        try:
            smtp = await _open(route, helo_name, timeout)
        except _RouteFailed as exc:
            errors.append(str(exc))
            continue
        peer = smtp.get_transport_info("peername")
        ip = peer[0] if isinstance(peer, tuple) and peer else "?"
        try:
            error = await _transaction(smtp, route, data, mail_from, sendable, results)
        finally:
            await _close(smtp)
        return ordered(error, route, f"{route.host}[{ip}]:{route.port}")

    why = "; ".join(errors) if errors else "no route to the destination"
    for address in sendable:
        results[address] = RecipientResult(address, Outcome.TEMPORARY, NO_REPLY, why)
    return ordered(why)
