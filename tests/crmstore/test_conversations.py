"""``crmstore.queries.conversations`` on SQLite and PostgreSQL, against rows written by the ORM.

Proves, on both backends, what the one-statement listing decides per email: which emails a
user may see (the rule of ``crmstore.visibility``), newest first with equal dates by id; the
sighting each is shown with (the reader's own, even quarantined, else the first shared one,
whose owner and channel are named but never its decisions); the thread's deal and title;
``needs_choice`` only for a thread without a deal and with an open question; emails reached by
a link of their own as well as by their thread's deal.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from crmstore import models as m
from crmstore.db import Store
from crmstore.queries import conversations

T = datetime(2026, 11, 26, 9, 0)


def _world(store: Store) -> dict[str, Any]:
    cid = store.company_id("example")
    alice = m.User.get(m.User.address == "alice@example.com")
    bob = m.User.get(m.User.address == "bob@example.com")
    ann = m.Person.create(company=cid, name="Ann")
    pilot = m.Deal.create(company=cid, title="Pilot", status="open", person=ann)
    t1 = m.Thread.create(company=cid, subject_key="pilot", deal=pilot, created_at=T, last_at=T)
    t2 = m.Thread.create(company=cid, subject_key="other", created_at=T, last_at=T)

    def email(key: str, thread: m.Thread, when: datetime) -> m.Email:
        return m.Email.create(company=cid, dedupe_key=key, message_id=key, content_hash="h",
                              thread=thread, subject=key, date=when, raw=b"raw",
                              to_json='[{"address": "ann@customer.test", "name": "Ann"}]')

    def sight(e: m.Email, user: m.User, visibility: str, channel: str = "bcc") -> None:
        m.Sighting.create(email=e, user=user, channel=channel, visibility=visibility,
                          queue_id="Q", received_at=T,
                          decisions_json=f'["{user.address} decided {e.dedupe_key}"]')

    e1 = email("e1", t1, T)
    sight(e1, alice, "shared")
    sight(e1, bob, "private", "imap")
    e2 = email("e2", t1, T + timedelta(hours=1))
    sight(e2, bob, "shared", "forward")
    e3 = email("e3", t1, T + timedelta(hours=1))  # the same date as e2, a higher id
    sight(e3, alice, "private")
    e4 = email("e4", t2, T - timedelta(days=1))  # reached by its own link only
    m.Link.create(email=e4, deal=pilot, source="auto")
    sight(e4, alice, "quarantined")
    sight(e4, bob, "shared", "relay")
    m.PendingChoice.create(user=bob, email=e4, thread=t2, candidates_json="[]",
                           state="asked", created_at=T)
    return {"alice": alice, "bob": bob, "pilot": pilot, "t1": t1.id, "t2": t2.id,
            "e1": e1.id, "e2": e2.id, "e3": e3.id, "e4": e4.id}


def _shape(result: dict[str, Any]) -> list[tuple[int, Any, bool, list[tuple[Any, ...]]]]:
    return [(t["id"], t["deal"], t["needs_choice"],
             [(e["id"], e["owner"], e["channel"], e["visibility"], e["decisions"])
              for e in t["emails"]]) for t in result["threads"]]


def test_conversations_of_a_deal_per_reader(store: Store) -> None:
    with store.transaction():
        w = _world(store)
    deal = {"id": w["pilot"].id, "title": "Pilot"}
    alice = "alice@example.com"
    bob = "bob@example.com"
    assert _shape(conversations(w["alice"], deal=w["pilot"])) == [
        (w["t1"], deal, False, [
            (w["e3"], alice, "bcc", "private", [f"{alice} decided e3"]),
            (w["e2"], bob, "forward", "shared", []),  # a colleague's: no decisions
            (w["e1"], alice, "bcc", "shared", [f"{alice} decided e1"])]),
        (w["t2"], None, True, [
            (w["e4"], alice, "bcc", "quarantined", [f"{alice} decided e4"])]),
    ]
    assert _shape(conversations(w["bob"], deal=w["pilot"])) == [
        (w["t1"], deal, False, [
            (w["e2"], bob, "forward", "shared", [f"{bob} decided e2"]),
            (w["e1"], bob, "imap", "private", [f"{bob} decided e1"])]),
        (w["t2"], None, True, [(w["e4"], bob, "relay", "shared", [f"{bob} decided e4"])]),
    ]
    one = conversations(w["alice"], deal=w["pilot"])["threads"][0]["emails"][0]
    assert one["date"] == "2026-11-26T10:00:00Z" and one["handle"] == ""
    assert one["to"] == [{"address": "ann@customer.test", "name": "Ann"}]
    assert len(conversations(w["alice"], deal=w["pilot"], limit=2)["threads"][0]["emails"]) == 2
