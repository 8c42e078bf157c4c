"""What every inbound handler does first: read the message, or answer without storing.

A message that cannot be read safely is refused ``554 5.6.0`` with the reason; an automatic
message (auto-reply, bulk, our own marker) is accepted and ignored, so no loop can start
(RFC 3834 §2).
"""

from __future__ import annotations

import logging

from linking.parse import MessageRejected, ParsedMessage, parse_message

from .. import replies
from ..replies import Reply
from ..server import DataContext


def read_message(ctx: DataContext, log: logging.Logger, what: str) -> ParsedMessage | Reply:
    """The parsed message, or the final reply when it must not be handled further."""
    try:
        parsed = parse_message(ctx.raw)
    except MessageRejected as exc:
        log.info("[%s] refused from %s: %s", ctx.queue_id, ctx.peer_ip, exc.reason)
        return replies.bad_content(exc.reason)
    if parsed.is_auto:
        log.info("[%s] %s %s ignored: %s", ctx.queue_id, parsed.message_id or "-", what,
                 parsed.auto_reason)
        return replies.ok(f"Ok: {ctx.queue_id} ignored (automatic message)")
    return parsed
