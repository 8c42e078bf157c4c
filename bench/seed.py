"""Fast database filling for the benchmarks: CRM rows and stored emails written in bulk.

The rows are written straight into the SQLite file before the server starts (never over SMTP),
in one transaction per table batch with explicit ids, so that 100,000 persons or a million
emails take seconds instead of hours. Addresses and ids are deterministic so that the load
generator can pick existing persons.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from peewee import PostgresqlDatabase

from crmstore import models as m
from crmstore.db import Store
from dealmail.config import Config, load_config

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_CONFIG = ROOT / "conf" / "dealmail.example.toml"
BATCH = 5000
EPOCH = datetime(2024, 1, 1)


#: A benchmark database: an SQLite file, or the URL of a PostgreSQL database.
Database = Path | str


def database_url(db: Database) -> str:
    """``db`` as a ``database.url``: a path is an SQLite file, a string is already a URL."""
    return db if isinstance(db, str) else f"sqlite:///{db}"


def server_overrides(db: Database, *extra: str) -> list[str]:
    """The ``--set`` overrides of a benchmark server: its own database, a free loopback
    port, no submission listener and no demo data."""
    return [
        f"database.url={database_url(db)}",
        "listeners.inbound=127.0.0.1:0",
        "listeners.submission=",
        "server.demo_data=",
        *extra,
    ]


def bench_config(db: Database, *extra: str) -> Config:
    return load_config(EXAMPLE_CONFIG, server_overrides(db, *extra))


def person_address(i: int, orgs: int) -> str:
    return f"p{i}@org{i % orgs}.test"


@dataclass
class Seeded:
    """What :func:`seed_crm` wrote."""

    company_id: int
    user_id: int
    persons: int
    organizations: int
    deals: int

    def addresses(self) -> list[str]:
        return [person_address(i, self.organizations) for i in range(1, self.persons + 1)]


def _chunks(rows: Iterable[tuple[Any, ...]], size: int = BATCH) -> Iterator[list[tuple[Any, ...]]]:
    chunk: list[tuple[Any, ...]] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def bulk_insert(store: Store, model: type[m.BaseModel], columns: Sequence[str],
                rows: Iterable[tuple[Any, ...]]) -> int:
    """``INSERT`` many rows with one prepared statement (sqlite3 ``executemany``; on
    PostgreSQL psycopg2's ``execute_values``, one multi-row statement per page): the same
    rows as peewee's ``insert_many`` without building one SQL text per batch. Explicit ids
    bypass PostgreSQL's sequences: :func:`fix_sequences` moves them past the rows."""
    table = model._meta.table_name  # type: ignore[attr-defined]
    fields = model._meta.fields  # type: ignore[attr-defined]
    cols = ", ".join(f'"{fields[c].column_name}"' for c in columns)
    conn = store.db.connection()
    count = 0
    if isinstance(store.db, PostgresqlDatabase):
        from psycopg2.extras import execute_values

        with conn.cursor() as cur:
            for chunk in _chunks(rows):
                execute_values(cur, f'INSERT INTO "{table}" ({cols}) VALUES %s', chunk,
                               page_size=1000)
                count += len(chunk)
        return count
    marks = ", ".join("?" for _ in columns)
    sql = f'INSERT INTO "{table}" ({cols}) VALUES ({marks})'
    for chunk in _chunks(rows):
        conn.executemany(sql, chunk)
        count += len(chunk)
    return count


def fix_sequences(store: Store, models: Iterable[type[m.BaseModel]]) -> None:
    """PostgreSQL: each table's id sequence set past its largest id (rows inserted with
    explicit ids leave the sequence at 1, and the server's first insert would collide)."""
    if not isinstance(store.db, PostgresqlDatabase):
        return
    for model in models:
        table = model._meta.table_name  # type: ignore[attr-defined]
        store.db.execute_sql(
            f"SELECT setval(pg_get_serial_sequence('\"{table}\"', 'id'), "
            f'COALESCE((SELECT MAX(id) FROM "{table}"), 0) + 1, false)')


def open_store(db: Database, config: Config) -> Store:
    store = Store(database_url(db))
    store.open()
    store.sync_config(config)
    return store


def seed_crm(store: Store, config: Config, persons: int, organizations: int,
             deals: int) -> Seeded:
    """``organizations`` organizations (one domain each), ``persons`` persons (one address
    each, spread over the organizations) and ``deals`` open deals, one per person for the
    first ``deals`` persons, owned by alice."""
    company = m.Company.get(m.Company.slug == config.companies[0].slug)
    user = m.User.get(m.User.address == config.companies[0].users[0].address)
    cid, uid = int(company.id), int(user.id)
    with store.db.atomic():
        bulk_insert(store, m.Organization, ["id", "company", "name", "created_at"],
                    ((i, cid, f"Org {i}", EPOCH) for i in range(1, organizations + 1)))
        bulk_insert(store, m.OrgDomain, ["id", "organization", "company", "domain"],
                    ((i, i, cid, f"org{i % organizations}.test")
                     for i in range(1, organizations + 1)))
        bulk_insert(store, m.Person, ["id", "company", "name", "organization", "auto_created",
                                      "created_at"],
                    ((i, cid, f"Person {i}", (i % organizations) or organizations, False, EPOCH)
                     for i in range(1, persons + 1)))
        bulk_insert(store, m.PersonAddress, ["id", "person", "company", "address"],
                    ((i, i, cid, person_address(i, organizations))
                     for i in range(1, persons + 1)))
        bulk_insert(store, m.Deal, ["id", "company", "title", "status", "person", "organization",
                                    "owner", "currency", "stage", "created_at", "updated_at"],
                    ((i, cid, f"Deal {i}", "open", i, (i % organizations) or organizations, uid,
                      "EUR", "proposal", EPOCH, EPOCH) for i in range(1, deals + 1)))
        fix_sequences(store, (m.Organization, m.OrgDomain, m.Person, m.PersonAddress, m.Deal))
    return Seeded(cid, uid, persons, organizations, deals)


def _max_id(store: Store, model: type[m.BaseModel]) -> int:
    table = model._meta.table_name  # type: ignore[attr-defined]
    return int(store.db.execute_sql(f'SELECT COALESCE(MAX(id), 0) FROM "{table}"').fetchone()[0])


def seed_emails(store: Store, seeded: Seeded, count: int, *, hot_deal: int,
                hot_count: int, seed: int = 5) -> int:
    """Add ``count`` stored emails (email, sighting, 2 participants, person and deal links,
    threads of 10), of which ``hot_count`` (minus those already there) belong to
    ``hot_deal``'s threads. Returns the number of emails now stored."""
    rng = random.Random(seed + count)
    first_email = _max_id(store, m.Email) + 1
    first_thread = _max_id(store, m.Thread) + 1
    first_link = _max_id(store, m.Link) + 1
    first_part = _max_id(store, m.Participant) + 1
    first_sighting = _max_id(store, m.Sighting) + 1
    hot_have = int(store.db.execute_sql(
        'SELECT COUNT(*) FROM "email" e JOIN "thread" t ON e.thread_id = t.id '
        "WHERE t.deal_id = ?", (hot_deal,)).fetchone()[0])
    hot_left = max(0, hot_count - hot_have)
    cid, uid = seeded.company_id, seeded.user_id
    emails: list[tuple[Any, ...]] = []
    threads: list[tuple[Any, ...]] = []
    sightings: list[tuple[Any, ...]] = []
    parts: list[tuple[Any, ...]] = []
    links: list[tuple[Any, ...]] = []
    thread_id = first_thread - 1
    thread_deal: int | None = None
    thread_person = 1
    raw = b"From: alice@example.com\r\nSubject: seeded\r\n\r\nseeded body\r\n"
    with store.db.atomic():
        for n in range(count):
            eid = first_email + n
            if n % 10 == 0:  # a new thread every 10 emails
                thread_id += 1
                if hot_left > 0:
                    thread_deal = hot_deal
                    thread_person = hot_deal
                else:
                    thread_person = rng.randint(1, seeded.persons)
                    thread_deal = thread_person if thread_person <= seeded.deals else None
                when = EPOCH + timedelta(minutes=n)
                threads.append((thread_id, cid, f"seeded thread {thread_id}", thread_deal,
                                when, when))
            if thread_deal == hot_deal:
                hot_left -= 1
            when = EPOCH + timedelta(minutes=n)
            addr = person_address(thread_person, seeded.organizations)
            emails.append((eid, cid, f"<seed-{eid}@example.com>", f"<seed-{eid}@example.com>",
                           f"{eid:064x}", thread_id, f"seeded thread {thread_id}", when,
                           "alice@example.com", "Alice Admin",
                           f'[{{"address": "{addr}", "name": ""}}]', "[]",
                           f"snippet of seeded email {eid}", len(raw), raw, "bcc", when, "", "[]"))
            sightings.append((first_sighting + n, eid, uid, "bcc", "shared", f"S{eid:011X}", when,
                              "alice@example.com", "127.0.0.1", "trusted-network", "{}", "[]"))
            pid = first_part + 2 * n
            parts.append((pid, eid, "alice@example.com", "Alice Admin", "from", None))
            parts.append((pid + 1, eid, addr, "", "to", thread_person))
            lid = first_link + 2 * n
            links.append((lid, eid, thread_person, None, "auto", when))
            if thread_deal is not None:
                links.append((lid + 1, eid, None, thread_deal, "auto", when))
            if len(emails) >= BATCH:
                _flush(store, threads, emails, sightings, parts, links)
        _flush(store, threads, emails, sightings, parts, links)
    return _max_id(store, m.Email)


def _flush(store: Store, threads: list[tuple[Any, ...]], emails: list[tuple[Any, ...]],
           sightings: list[tuple[Any, ...]], parts: list[tuple[Any, ...]],
           links: list[tuple[Any, ...]]) -> None:
    bulk_insert(store, m.Thread, ["id", "company", "subject_key", "deal", "created_at",
                                  "last_at"], threads)
    bulk_insert(store, m.Email, ["id", "company", "dedupe_key", "message_id", "content_hash",
                                 "thread", "subject", "date", "from_address", "from_name",
                                 "to_json", "cc_json", "snippet", "size", "raw", "kind",
                                 "created_at", "references", "attachments_json"], emails)
    bulk_insert(store, m.Sighting, ["id", "email", "user", "channel", "visibility", "queue_id",
                                    "received_at", "envelope_from", "client_ip",
                                    "verification", "evidence_json", "decisions_json"],
                sightings)
    bulk_insert(store, m.Participant, ["id", "email", "address", "name", "role", "person"],
                parts)
    bulk_insert(store, m.Link, ["id", "email", "person", "deal", "source", "created_at"], links)
    for rows in (threads, emails, sightings, parts, links):
        rows.clear()
