"""Threads: which conversation a new email belongs to.

Order of evidence (RFC 5322 §3.6.4 first, heuristics last): a Message-ID named in In-Reply-To
or References that we already stored; Outlook's Thread-Index conversation prefix when the
references are missing (Outlook strips them on some paths); last, the normalised subject plus
a shared external participant within a time window.
"""

from __future__ import annotations

import base64
import binascii
from datetime import datetime, timedelta

from crmstore import models as m

from .parse import normalize_subject


def thread_index_key(value: str | None) -> str | None:
    """The conversation part of a Thread-Index: its first 22 bytes (a FILETIME and a GUID);
    later bytes are per-reply child blocks ([MS-OXOMSG] 2.2.1.3)."""
    if not value:
        return None
    try:
        data = base64.b64decode(value.strip() + "==", validate=False)
    except (binascii.Error, ValueError):
        return None
    if len(data) < 22:
        return None
    return base64.b64encode(data[:22]).decode("ascii")


def find_thread(
    company_id: int,
    message_ids: list[str],
    thread_key: str | None,
    subject: str,
    external_addresses: set[str],
    when: datetime,
    window_days: int,
) -> tuple[m.Thread | None, str]:
    """The existing thread this email joins, and why (for the decision log)."""
    if message_ids:
        row = (m.Email.select(m.Email.thread)
               .where((m.Email.company == company_id) & m.Email.message_id.in_(message_ids))
               .order_by(m.Email.date.desc()).first())
        if row is not None:
            return m.Thread.get_by_id(row.thread_id), "references"
    if thread_key:
        row = (m.Email.select(m.Email.thread)
               .where((m.Email.company == company_id) & (m.Email.thread_index == thread_key))
               .first())
        if row is not None:
            return m.Thread.get_by_id(row.thread_id), "thread-index"
    key = normalize_subject(subject)
    if key and external_addresses:
        since = when - timedelta(days=window_days)
        candidates = (m.Thread.select()
                      .where((m.Thread.company == company_id) & (m.Thread.subject_key == key)
                             & (m.Thread.last_at >= since))
                      .order_by(m.Thread.last_at.desc()).limit(5))
        for thread in candidates:
            shared = (m.Participant.select(m.Participant.id)
                      .join(m.Email, on=(m.Participant.email == m.Email.id))
                      .where((m.Email.thread == thread.id)
                             & m.Participant.address.in_(list(external_addresses)))
                      .exists())
            if shared:
                return thread, "subject and participant"
    return None, "new"
