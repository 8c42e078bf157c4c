"""Helpers of the digest tests: a store with the example config and demo CRM, and a small
builder that writes emails, sightings and links straight through the models (so the digests
under test do not depend on the linking code's decisions). Each test module declares its
``world`` fixture with :func:`make_world` (a conftest.py here would shadow the root one's
``from conftest import ...`` in other folders)."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

from crmstore import models as m
from crmstore.db import Store
from crmstore.handles import next_number
from crmstore.importing import import_csv
from dealmail.config import Config, load_config

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "conf" / "dealmail.example.toml"
DEMO = ROOT / "conf" / "demo"
# The moment every digest test starts at (FakeClock's default).
T0 = datetime(2026, 11, 26, 9, 0, tzinfo=UTC)


def naive(when: datetime) -> datetime:
    return when.astimezone(UTC).replace(tzinfo=None)


class World:
    """Rows of one test's CRM; ``email()`` makes a message with its sightings and links."""

    def __init__(self, config: Config, store: Store) -> None:
        self.config = config
        self.store = store
        self.company_id = store.company_id("example")
        self.users = {u.address: u.id for u in m.User.select()}
        self._ids = itertools.count(1)

    def email_number(self, subject: str) -> int:
        return int(m.Email.get(m.Email.subject == subject).number)

    def deal(self, title: str) -> m.Deal:
        return m.Deal.get(m.Deal.title == title)

    def person(self, address: str) -> m.Person:
        pa = m.PersonAddress.get(m.PersonAddress.address == address)
        return m.Person.get_by_id(pa.person_id)

    def new_person(self, name: str, address: str, auto: bool = True,
                   at: datetime = T0) -> m.Person:
        p = m.Person.create(company=self.company_id, name=name, auto_created=auto,
                            created_at=naive(at))
        m.PersonAddress.create(person=p, company=self.company_id, address=address)
        return p

    def thread(self, subject: str, deal: m.Deal | None = None) -> m.Thread:
        return m.Thread.create(company=self.company_id, subject_key=subject.lower()[:300],
                               deal=deal, created_at=naive(T0), last_at=naive(T0))

    def email(self, subject: str, *, sightings: list[tuple[str, str]],
              frm: tuple[str, str] = ("Alice Admin", "alice@example.com"),
              to: list[tuple[str, str]] | None = None, date: datetime = T0,
              received: datetime | None = None, person: m.Person | None = None,
              deal: m.Deal | None = None, thread: m.Thread | None = None,
              snippet: str = "", channel: str = "bcc") -> m.Email:
        """``sightings`` are (user address, visibility); participants' persons are looked up
        by address."""
        n = next(self._ids)
        thread = thread or self.thread(subject)
        to = to if to is not None else [("Ann Customer", "ann@customer.test")]
        e = m.Email.create(
            company=self.company_id, dedupe_key=f"<t{n}@test>", message_id=f"<t{n}@test>",
            content_hash=f"{n:064d}", thread=thread, subject=subject, date=naive(date),
            from_address=frm[1], from_name=frm[0],
            to_json=json.dumps([{"address": a, "name": nm} for nm, a in to]),
            snippet=snippet, raw=f"raw R{n}Z".encode(), created_at=naive(date),
            number=next_number(self.company_id))
        for role, (name, addr) in [("from", frm)] + [("to", b) for b in to]:
            pa = m.PersonAddress.get_or_none(m.PersonAddress.address == addr)
            m.Participant.create(email=e, address=addr, name=name, role=role,
                                 person=pa.person_id if pa else None)
        if person is not None:
            m.Link.create(email=e, person=person, source="auto", created_at=naive(date))
        if deal is not None:
            m.Link.create(email=e, deal=deal, source="auto", created_at=naive(date))
        for i, (who, vis) in enumerate(sightings):
            m.Sighting.create(email=e, user=self.users[who], channel=channel, visibility=vis,
                              queue_id=f"Q{n}_{i}", received_at=naive(received or date),
                              envelope_from=who, client_ip="192.0.2.7",
                              verification="none" if vis == "quarantined" else "strong")
        return e


def open_store(tmp_path: Path, config_path: Path = EXAMPLE) -> tuple[Config, Store]:
    config = load_config(config_path, [f"database.url=sqlite:///{tmp_path}/digest.db"])
    store = Store(config.database.url)
    store.open()
    store.sync_config(config)
    for kind in ("organizations", "persons", "deals"):
        import_csv(store, "example", kind, DEMO / f"{kind}.csv",
                   freemail_domains=config.policy.freemail_domains,
                   internal_domains=config.companies[0].internal_domains)
    return config, store


def after(hours: float) -> datetime:
    return T0 + timedelta(hours=hours)


def make_world(tmp_path: Path) -> Iterator[World]:
    config, store = open_store(tmp_path)
    try:
        yield World(config, store)
    finally:
        store.close()
