"""Which message a received copy is about: itself (a BCC copy) or the originals it forwards.

Seed rule 4: a user forwards a customer's reply to the company address with an empty To line
(the address in Bcc). So a message whose To/Cc hold nothing but dealmail's own addresses, and
that carries a forward (inline block, attached message/rfc822 or .eml, Resent-* headers), is
about the forwarded original(s): each chain's innermost message becomes one email, linked to
its real correspondents. A message with customers in To/Cc is a BCC copy even if its body
quotes a forward.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from dealmail.addresses import Mailbox, domain_of
from dealmail.config import Config, User

from .forwards import ForwardedMessage, find_forwards
from .parse import ParsedMessage, _snip
from .record import Original


def is_forward_candidate(parsed: ParsedMessage, config: Config) -> bool:
    """No To/Cc other than dealmail's own addresses (an empty To is the seed's recipe)."""
    return all(domain_of(b.address) == config.mail_domain for b in parsed.to + parsed.cc)


def _content_hash(fwd: ForwardedMessage) -> str:
    h = hashlib.sha256()
    for part in (fwd.from_.address if fwd.from_ else fwd.from_raw, fwd.subject, fwd.date_raw,
                 " ".join(fwd.body.split())):
        h.update(part.encode("utf-8", "surrogateescape") + b"\x00")
    return h.hexdigest()


# A person's address looked up by their exact display name (unique match only), or None.
NameLookup = Callable[[str], str | None]


def forwarded_original(chain: list[ForwardedMessage], parsed: ParsedMessage,
                       when: datetime, name_lookup: NameLookup | None = None) -> Original | None:
    """The conversation's message of one forward chain (its innermost original).

    Outlook shows only a name for a sender in the address book (``From: Carl Other``). Such an
    original is attributed to the company's person of exactly that name when there is one;
    otherwise it is stored for the forwarder with ``forward["unattributed"]`` set, so the
    digest can ask who wrote it instead of calling it internal mail."""
    inner = chain[-1]
    sender = inner.from_
    forward: dict[str, Any] = {
        "note": chain[0].note,
        "chain": [c.as_dict() for c in chain],
    }
    if sender is None:
        name = inner.from_name
        if not name:
            return None
        address = name_lookup(name) if name_lookup is not None else None
        if address is not None:
            sender = Mailbox(address, name)
            forward["sender_by_name"] = name
        else:
            sender = parsed.from_
            forward["unattributed"] = name
    date = inner.date if inner.date and not inner.date_flagged else (parsed.date or when)
    forward["date_flagged"] = inner.date_flagged or inner.date is None
    return Original(
        from_=sender, to=inner.to, cc=inner.cc, subject=inner.subject or parsed.subject,
        date=date, message_id=inner.message_id, in_reply_to=inner.in_reply_to,
        references=inner.references or ([parsed.in_reply_to] if parsed.in_reply_to else [])
        + parsed.references,
        thread_index=None, snippet=_snip(inner.body), attachments=[],
        content_hash=_content_hash(inner), forward=forward, original_raw=inner.raw,
    )


def originals_for(parsed: ParsedMessage, user: User, config: Config, when: datetime,
                  name_lookup: NameLookup | None = None,
                  ) -> tuple[str, list[Original], list[list[ForwardedMessage]]]:
    """(channel, originals, chains) for a verified user's message to the Smart BCC address."""
    if is_forward_candidate(parsed, config):
        chains = find_forwards(parsed.full, ZoneInfo(user.timezone))
        originals = [o for chain in chains
                     if (o := forwarded_original(chain, parsed, when, name_lookup))]
        if originals:
            return "forward", originals, chains
    return "bcc", [plain_original(parsed, when)], []


def plain_original(parsed: ParsedMessage, when: datetime) -> Original:
    """The received message itself as the conversation's message (a BCC or relayed copy)."""
    return Original(
        from_=parsed.from_, to=parsed.to, cc=parsed.cc, subject=parsed.subject,
        date=parsed.date or when, message_id=parsed.message_id,
        in_reply_to=parsed.in_reply_to, references=parsed.references,
        thread_index=parsed.thread_index, snippet=parsed.snippet,
        attachments=parsed.attachments, content_hash=parsed.content_hash,
    )
