"""Email handles: ``E`` and the email's number in its company (``E123``).

Every listed email (digests, ``+ask`` answers, confirmations, the CLI) carries its handle, and
every command about one email names it. Numbers are given by the company's counter
(:class:`crmstore.models.EmailCounter`, taken by ``crmstore.hotpath`` in the transaction that
stores the email) and never reused, so a command from an old digest never reaches a newer
email. A handle names an email, never proves a right to it: commands look it up together with
the user's own copy (``crmstore.inbox``), and an unknown number and a colleague's email get the
same answer.
"""

from __future__ import annotations

import re
import unicodedata

from . import models as m
from .hotpath import HotPath

#: One handle, as a user types it: ``E123``, ``e123`` (full-width forms are NFKC-normalised
#: by :func:`parse_handle`).
HANDLE_RE = re.compile(r"^[Ee](\d{1,12})$")


def handle(number: int | None) -> str:
    """``E<number>``; empty for an email without a number (hand-made rows)."""
    return f"E{number}" if number is not None else ""


def parse_handle(text: str) -> int | None:
    """The number of a handle (``E12``, ``ｅ１２``, ``#E12``), else None."""
    norm = unicodedata.normalize("NFKC", text).strip().lstrip("#")
    found = HANDLE_RE.match(norm)
    return int(found.group(1)) if found else None


def next_number(company_id: int) -> int:
    """The company's next email number, in the caller's transaction (for rows written outside
    the recording path: tests, tools)."""
    return HotPath(m.Email._meta.database).next_email_number(company_id)


def email_of(company_id: int, number: int) -> m.Email | None:
    """The company's email with this number, whoever may see it (callers check)."""
    return m.Email.get_or_none((m.Email.company == company_id) & (m.Email.number == number))
