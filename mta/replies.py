"""SMTP replies as values, with their enhanced status codes (RFC 3463), owned by the framework.

Handlers return one of these instead of formatting strings, so that codes stay consistent:
250 only after a commit, 4xx for our own faults (the client retries), 5xx only for the
sender's (RFC 5321 §4.2.1).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from linking.capture import Disposition, Outcome


@dataclass(frozen=True)
class Reply:
    code: int
    status: str  # enhanced status code, e.g. "2.0.0"
    text: str
    #: The capture's outcome behind this reply (``stored``, ``quarantined``, ...), for the
    #: metrics; not part of what the client sees.
    outcome: str = field(default="", compare=False)

    def __str__(self) -> str:
        # One line; CR/LF never reach the wire from message data (docs/reliability.md A.35).
        text = " ".join(self.text.replace("\x00", "").split())
        return f"{self.code} {self.status} {text}"

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300


def ok(text: str = "Ok") -> Reply:
    return Reply(250, "2.0.0", text)


def queued(queue_id: str) -> Reply:
    return Reply(250, "2.0.0", f"Ok: stored as {queue_id}")


def temp_failure(incident: str) -> Reply:
    return Reply(451, "4.3.0", f"Temporary local problem, please try again later "
                               f"(incident {incident})")


def dns_temp_failure(text: str) -> Reply:
    return Reply(451, "4.7.5", text)


def unknown_recipient(address: str) -> Reply:
    return Reply(550, "5.1.1", f"<{address}>: Recipient address rejected: no such address here")


def too_many_recipients() -> Reply:
    return Reply(452, "4.5.3", "Too many recipients")


def not_allowed(text: str) -> Reply:
    return Reply(550, "5.7.1", text)


def too_big() -> Reply:
    return Reply(552, "5.3.4", "Message too big for system")


def bad_content(reason: str) -> Reply:
    return Reply(554, "5.6.0", f"Message refused: {reason}")


def for_disposition(done: Disposition, queue_id: str, refused_sender_code: int = 550) -> Reply:
    """The SMTP answer to a capture's disposition (RFC 5321 §4.2.1: 2xx accepted, 4xx try
    again, 5xx never). The submission listener refuses a sender with 553 (RFC 5321 §4.2.2,
    "mailbox name not allowed"), the others with 550."""
    reply = _for_disposition(done, queue_id, refused_sender_code)
    outcome = "quarantined" if done.quarantined and done.accepted else done.outcome.value
    return replace(reply, outcome=outcome)


def _for_disposition(done: Disposition, queue_id: str, refused_sender_code: int) -> Reply:
    if done.outcome in (Outcome.STORED, Outcome.REPEAT):
        return queued(queue_id)
    if done.outcome is Outcome.IGNORED:
        return ok(f"Ok: {queue_id} ignored ({done.reason})")
    if done.outcome is Outcome.REFUSED_CONTENT:
        return bad_content(done.reason)
    if done.outcome is Outcome.REFUSED_SENDER:
        return Reply(refused_sender_code, done.status or "5.7.1", done.reason)
    return Reply(451, done.status or "4.3.0", done.reason)
