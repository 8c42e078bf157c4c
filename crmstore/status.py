"""The database's part of ``dealmail status``: schema, outbox depth by state, the oldest item
still waiting for a retry, quarantined copies. Reads only."""

from __future__ import annotations

from typing import Any

from peewee import fn

from dealmail.clock import json_time

from . import models as m

__all__ = ["store_status"]


def store_status(store: Any) -> dict[str, Any]:
    version = m.SchemaInfo.select(fn.MAX(m.SchemaInfo.version)).scalar()
    counts = dict(m.OutboxItem.select(m.OutboxItem.state, fn.COUNT(m.OutboxItem.id))
                  .group_by(m.OutboxItem.state).tuples())
    outbox = {state: counts.get(state, 0) for state in ("queued", "sent", "failed", "dropped")}
    # Deferred: queued and tried at least once (a fresh item waiting for its first attempt is
    # not a delivery problem).
    oldest = (m.OutboxItem.select()
              .where((m.OutboxItem.state == "queued") & (m.OutboxItem.attempts > 0))
              .order_by(m.OutboxItem.created_at, m.OutboxItem.id).first())
    return {
        "backend": "sqlite" if store.is_sqlite else "postgresql",
        "schema_version": version,
        "outbox": outbox,
        "oldest_deferred": None if oldest is None else {
            "id": oldest.id, "kind": oldest.kind, "domain": oldest.domain,
            "created": json_time(oldest.created_at), "attempts": oldest.attempts,
            "next_attempt": json_time(oldest.next_attempt_at),
            "last_error": oldest.last_error[:300]},
        "quarantined": m.Sighting.select().where(m.Sighting.visibility == "quarantined").count(),
    }
