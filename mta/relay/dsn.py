"""Delivery status notifications (RFC 3464) for relayed mail that failed or is delayed.

The outbox worker calls :func:`build_dsn` with the recipients that failed permanently (or were
given up after the retry lifetime, or are still being retried when ``delayed=True``) and
queues the result to the original envelope sender, sent from the null reverse-path
``MAIL FROM:<>`` (RFC 3464 §2, RFC 5321 §4.5.5). That null sender is what stops loops: a
message whose own sender is null never gets a DSN (RFC 5321 §6.2, docs/reliability.md A.23/D.6.7),
so a DSN that fails is never bounced again.

Shape (RFC 3462/6522 ``multipart/report; report-type=delivery-status``):

1. ``text/plain``: what happened, for a human;
2. ``message/delivery-status``: a per-message block (Reporting-MTA, Arrival-Date) then one
   block per recipient (Final-Recipient, Action, Status, Remote-MTA, Diagnostic-Code,
   Last-Attempt-Date, Will-Retry-Until);
3. ``text/rfc822-headers``: the original header block only, bounded in size (D.6.7), never the
   body.

Status codes (RFC 3463): the enhanced code from the server's reply when it has one of the
right class; otherwise 5.0.0 for a permanent failure, 4.4.7 ("delivery time expired") for a
message given up after temporary failures (docs/reliability.md D.6.1), 4.0.0 for a delay
(4.4.1 when no server answered at all). Text that came from a remote server is stripped of
control characters before it goes into a field, so a hostile reply cannot add header lines.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from email import policy
from email.message import EmailMessage, Message
from email.utils import format_datetime, make_msgid

from mta.relay.delivery import NO_REPLY, Outcome, RecipientResult

__all__ = ["MAX_HEADERS_BYTES", "build_dsn", "dsn_status"]

# The original's header block is attached up to this size (cut at a line boundary).
MAX_HEADERS_BYTES = 64 * 1024

_ENHANCED_RE = re.compile(r"^\s*([245])\.(\d{1,3})\.(\d{1,3})(?=\s|$)")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]+")
_MAX_FIELD = 900  # keep any one field well under RFC 5322's 998-octet line limit


def _clean(text: str, limit: int = _MAX_FIELD) -> str:
    """One line, no control characters: safe inside a header-style field."""
    text = _CONTROL_RE.sub(" ", text).strip()
    return text[:limit]


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def dsn_status(result: RecipientResult, delayed: bool) -> str:
    """The RFC 3463 status for one recipient's line in the report."""
    match = _ENHANCED_RE.match(result.message or "")
    enhanced = ".".join(match.groups()) if match else None
    if delayed:
        if enhanced and enhanced.startswith("4."):
            return enhanced
        return "4.4.1" if result.code == NO_REPLY else "4.0.0"
    if result.outcome is Outcome.PERMANENT:
        if enhanced and enhanced.startswith("5."):
            return enhanced
        return "5.0.0"
    # Failed after the retry lifetime: a persistent transient failure (RFC 3463 X.4.7).
    return "4.4.7"


def _diagnostic(result: RecipientResult) -> str | None:
    message = _clean(result.message)
    if result.code == NO_REPLY:
        # RFC 3464 §2.3.6: non-SMTP diagnostics use an X- type.
        return f"X-Dealmail; {message}" if message else None
    return f"smtp; {result.code} {message}".rstrip()


def _header_block(original_headers: bytes) -> bytes:
    """The header section only (up to the first empty line), bounded, with CRLF endings."""
    normalised = original_headers.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    head, _, _ = normalised.partition(b"\n\n")
    if len(head) > MAX_HEADERS_BYTES:
        head = head[:MAX_HEADERS_BYTES].rsplit(b"\n", 1)[0]
    return head.rstrip(b"\n") + b"\n"


def _human_text(failed: list[RecipientResult], delayed: bool, reporting_mta: str) -> str:
    if delayed:
        intro = (f"This is the mail system at {reporting_mta}.\n\n"
                 "Your message could not be delivered yet to the recipients below.\n"
                 "It is still being retried; you do not need to send it again.\n")
    else:
        intro = (f"This is the mail system at {reporting_mta}.\n\n"
                 "Your message could not be delivered to the recipients below.\n"
                 "This is a permanent error; no further attempts will be made.\n")
    lines = [intro]
    for result in failed:
        reply = _clean(result.message)
        where = f" ({_clean(result.remote_mta, 255)} said)" if result.remote_mta else ""
        code = f"{result.code} " if result.code != NO_REPLY else ""
        lines.append(f"<{_clean(result.address, 300)}>{where}: {code}{reply}")
    lines.append("\nThe headers of your message are attached.")
    return "\n".join(lines) + "\n"


def build_dsn(
    original_headers: bytes,
    original_mail_from: str,
    failed: list[RecipientResult],
    reporting_mta: str,
    from_address: str,
    arrival_date: datetime,
    now: datetime,
    delayed: bool = False,
    retry_until: datetime | None = None,
) -> EmailMessage | None:
    """Compose one DSN to ``original_mail_from`` about ``failed``; None when none is allowed.

    ``original_headers`` may be the whole message: only the header block is attached.
    ``retry_until`` (delayed reports only) fills RFC 3464 §2.3.9 Will-Retry-Until.
    """
    sender = original_mail_from.strip()
    if sender in ("", "<>") or not failed:
        # Never a DSN about a null-sender message: that is how DSN loops are avoided.
        return None

    dsn = EmailMessage(policy=policy.default)
    dsn["From"] = from_address
    dsn["To"] = sender
    dsn["Subject"] = ("Delayed Mail (still being retried)" if delayed
                      else "Undelivered Mail Returned to Sender")
    dsn["Date"] = format_datetime(_aware(now))
    dsn["Message-ID"] = make_msgid(domain=reporting_mta)
    # RFC 3834 §5: automatic responses are marked; our own marker lets dealmail's
    # handlers recognise and ignore its own notices (no loops, docs/architecture.md invariants).
    dsn["Auto-Submitted"] = "auto-replied"
    dsn["X-Dealmail-Auto"] = "dsn"

    dsn.set_content(_human_text(failed, delayed, reporting_mta))
    dsn.make_mixed()
    dsn.set_type("multipart/report")
    dsn.set_param("report-type", "delivery-status")

    per_message = Message(policy=policy.default)
    per_message["Reporting-MTA"] = f"dns; {_clean(reporting_mta, 255)}"
    per_message["Arrival-Date"] = format_datetime(_aware(arrival_date))
    blocks: list[Message | str] = [per_message]
    for result in failed:
        block = Message(policy=policy.default)
        block["Final-Recipient"] = f"rfc822; {_clean(result.address, 300)}"
        block["Action"] = "delayed" if delayed else "failed"
        block["Status"] = dsn_status(result, delayed)
        if result.remote_mta:
            block["Remote-MTA"] = f"dns; {_clean(result.remote_mta, 255)}"
        diagnostic = _diagnostic(result)
        if diagnostic:
            block["Diagnostic-Code"] = diagnostic
        block["Last-Attempt-Date"] = format_datetime(_aware(now))
        if delayed and retry_until is not None:
            block["Will-Retry-Until"] = format_datetime(_aware(retry_until))
        blocks.append(block)
    status_part = EmailMessage(policy=policy.default)
    status_part["Content-Type"] = "message/delivery-status"
    status_part.set_payload(blocks)
    dsn.attach(status_part)

    headers = _header_block(original_headers)
    headers_part = EmailMessage(policy=policy.default)
    # Non-ASCII (SMTPUTF8 or raw 8-bit) headers are carried quoted-printable so the DSN
    # itself stays 7-bit and can go to any server.
    cte = "7bit" if headers.isascii() else "quoted-printable"
    headers_part.set_content(
        headers.decode("utf-8", "replace"), subtype="rfc822-headers", cte=cte
    )
    del headers_part["MIME-Version"]  # only the top level carries it (RFC 2045 §4)
    dsn.attach(headers_part)
    return dsn
