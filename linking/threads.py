"""Thread keys: Outlook's Thread-Index conversation prefix.

``linking.record`` decides which conversation a new email belongs to: a Message-ID named in
In-Reply-To or References that we already stored (RFC 5322 §3.6.4); Outlook's Thread-Index
conversation prefix when the references are missing (Outlook strips them on some paths); last,
the normalised subject plus a shared external participant within a time window.
"""

from __future__ import annotations

import base64
import binascii


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
