"""The durable outbox queue: everything dealmail sends is a row here, written in the transaction
that caused it (so a message is queued exactly when its cause is committed, and never sent from
inside a transaction).

* :func:`enqueue` is called inside a handler's (or the CLI's) transaction: one row per
  destination domain (RFC 5321 §5.1 routes by domain), so one domain's trouble never delays or
  re-sends another's.
* :func:`list_items`, :func:`retry_item` and :func:`drop_item` are the admin's tools
  (``dealmail outbox``).

The delivery worker that claims and sends these rows is ``mta.relay.worker``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from typing import Any

from dealmail.addresses import domain_of
from dealmail.clock import json_time, naive_utc

from . import models as m


def as_bytes(message: EmailMessage | bytes) -> bytes:
    if isinstance(message, bytes):
        return message
    return message.as_bytes(policy=SMTP_POLICY)


def enqueue(
    message: EmailMessage | bytes,
    *,
    kind: str,
    mail_from: str,
    recipients: Sequence[str],
    now: datetime,
    company_id: int | None = None,
    subject: str = "",
    dedupe_key: str | None = None,
) -> list[int]:
    """Queue ``message`` for ``recipients`` (must run inside the caller's transaction).

    ``dedupe_key`` makes the call idempotent (a digest for one period, a question for one
    batch): a second call with the same key queues nothing and returns []."""
    if dedupe_key is not None and m.OutboxItem.select().where(
            m.OutboxItem.dedupe_key.startswith(dedupe_key + "#")).exists():
        return []
    raw = as_bytes(message)
    if not subject and isinstance(message, EmailMessage):
        subject = str(message.get("Subject", ""))
    by_domain: dict[str, list[str]] = {}
    for rcpt in recipients:
        by_domain.setdefault(domain_of(rcpt.lower()), []).append(rcpt)
    ids = []
    when = naive_utc(now)
    for domain, rcpts in sorted(by_domain.items()):
        item = m.OutboxItem.create(
            company=company_id, kind=kind, mail_from=mail_from,
            recipients_json=json.dumps(rcpts), domain=domain, subject=subject[:500],
            message=raw, state="queued", attempts=0, next_attempt_at=when, created_at=when,
            dedupe_key=f"{dedupe_key}#{domain}" if dedupe_key else None,
        )
        ids.append(item.id)
    return ids


def list_items(limit: int = 200) -> list[dict[str, Any]]:
    """``dealmail outbox --json``: newest first."""
    out = []
    for i in (m.OutboxItem.select().order_by(m.OutboxItem.id.desc()).limit(limit)):
        out.append({
            "id": i.id, "kind": i.kind, "to": json.loads(i.recipients_json),
            "subject": i.subject, "state": i.state, "attempts": i.attempts,
            "next_attempt": json_time(i.next_attempt_at) if i.state == "queued" else None,
            "last_error": i.last_error, "created": json_time(i.created_at),
        })
    return out


def retry_item(item_id: int, now: datetime) -> bool:
    """Admin: make a queued or failed item due now."""
    return bool(m.OutboxItem.update(state="queued", next_attempt_at=naive_utc(now),
                                    lease_until=None)
                .where((m.OutboxItem.id == item_id)
                       & m.OutboxItem.state.in_(["queued", "failed"])).execute())


def drop_item(item_id: int) -> bool:
    """Admin: give up an item without a DSN."""
    return bool(m.OutboxItem.update(state="dropped", lease_until=None)
                .where((m.OutboxItem.id == item_id) & (m.OutboxItem.state == "queued"))
                .execute())
