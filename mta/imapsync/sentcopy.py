"""Relayed mail filed in the user's Sent folder (two-way sync).

The hand-over is a durable row (``SentCopy``) written by the relay in the transaction that
queued the message (:func:`queue_sent_copy`, called from ``mta/relay/submission.py``), not a
later scan of delivered outbox items: the relay knows the user, the mailbox and the copy the
user wrote (with its ``Bcc:``, without our ``Received:`` line), which an outbox item (one per
destination domain, Bcc stripped) no longer does; and a row committed with the message can be
neither missed nor filed twice by a scan cursor.

The account's sync thread files a row once one of its outbox items is delivered: ``APPEND``
with ``\\Seen`` to the Sent folder, unless a message with that Message-ID is already there (a
crash after the APPEND and before the row was marked done). A message whose every outbox
item failed is not filed. Reading the Sent folder back later finds the same Message-ID, which
the capture already has for this user: a repeat, never a second email.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from imapclient import IMAPClient

from crmstore import models as m
from crmstore.db import Store
from dealmail.clock import naive_utc
from dealmail.config import User

from .lease import ensure_account
from .presets import resolve

if TYPE_CHECKING:
    from .sync import AccountSync

__all__ = ["file_sent_copies", "queue_sent_copy", "sent_copies_due"]

log = logging.getLogger("dealmail.imap")


def queue_sent_copy(store: Store, user: User, sender: str, raw: bytes, message_id: str | None,
                    outbox_ids: list[int], now: datetime) -> int | None:
    """Inside the relay's transaction: remember to file ``raw`` in the user's Sent folder
    (the mailbox whose login is the sender's address, else the user's first mailbox with
    ``append_sent``). Returns the row id, or None when the user has no such mailbox."""
    boxes = [mb for mb in user.mailboxes if mb.append_sent]
    if not boxes or not outbox_ids:
        return None
    mailbox = next((mb for mb in boxes if mb.username.lower() == sender.lower()), boxes[0])
    try:
        account = resolve(user, mailbox)
    except ValueError:
        return None
    account_id = ensure_account(store, account.key, user.address)
    row = m.SentCopy.create(account=account_id, message_id=message_id or "",
                            outbox_ids=json.dumps(outbox_ids), raw=raw, state="waiting",
                            created_at=naive_utc(now))
    return int(row.id)


def _waiting(account_id: int) -> list[m.SentCopy]:
    return list(m.SentCopy.select(m.SentCopy.id, m.SentCopy.outbox_ids, m.SentCopy.message_id,
                                  m.SentCopy.created_at, m.SentCopy.attempts)
                .where((m.SentCopy.account == account_id) & (m.SentCopy.state == "waiting"))
                .order_by(m.SentCopy.id).limit(100))


def _delivery(row: m.SentCopy) -> str:
    """sent (at least one item delivered) | failed (all given up) | pending."""
    ids = json.loads(row.outbox_ids or "[]")
    states = [s for (s,) in m.OutboxItem.select(m.OutboxItem.state)
              .where(m.OutboxItem.id.in_(ids)).tuples()] if ids else []
    if "sent" in states:
        return "sent"
    if not states or all(s in ("failed", "dropped") for s in states):
        return "failed"
    return "pending"


def sent_copies_due(sync: AccountSync) -> bool:
    if sync.account_id is None or sync.sent_folder is None:
        return False
    return any(_delivery(r) != "pending" for r in _waiting(sync.account_id))


def file_sent_copies(sync: AccountSync, client: IMAPClient) -> int:
    """APPEND the delivered relayed messages to the Sent folder; returns how many."""
    account_id = sync.account_id
    if account_id is None:
        return 0
    rows = _waiting(account_id)
    if not rows:
        return 0
    folder = sync.sent_folder
    filed = 0
    for row in rows:
        state = _delivery(row)
        if state == "pending":
            continue
        now = naive_utc(sync.now())
        if state == "failed":
            with sync.store.transaction():
                (m.SentCopy.update(state="dropped", raw=b"", done_at=now,
                                   last_error="not delivered to any recipient")
                 .where(m.SentCopy.id == row.id).execute())
            continue
        if folder is None:
            with sync.store.transaction():
                (m.SentCopy.update(attempts=m.SentCopy.attempts + 1,
                                   last_error="no Sent folder found (set sent_folder)")
                 .where(m.SentCopy.id == row.id).execute())
            continue
        raw = bytes(m.SentCopy.get_by_id(row.id).raw)
        already = False
        if row.message_id:
            client.select_folder(folder, readonly=True)
            already = bool(client.search(["HEADER", "Message-ID", row.message_id]))
        if not already:
            client.append(folder, raw, flags=(b"\\Seen",),
                          msg_time=row.created_at.replace(tzinfo=UTC) if row.created_at
                          else None)
        with sync.store.transaction():
            (m.SentCopy.update(state="done", raw=b"", done_at=now)
             .where(m.SentCopy.id == row.id).execute())
        filed += 1
        log.info("%s relayed %s filed in %r%s", sync.log_prefix(), row.message_id or "-",
                 folder, " (already there)" if already else "")
    return filed
