"""Tests for crmstore.db's schema life cycle and durability checks, on SQLite and PostgreSQL.

* a fresh database gets the current schema and ``SCHEMA_VERSION``; opening it again adds
  nothing;
* a database made by the first version (schema 1, whose DDL is frozen below exactly as
  that version created it) is upgraded step by step to the current one with its rows kept
  (version 4 numbers the stored emails for their handles);
* a database from a newer dealmail is refused untouched;
* a database whose commits are not durable (SQLite without WAL + synchronous=FULL, an
  in-memory SQLite, PostgreSQL with synchronous_commit=off) is refused: "250 only after the
  commit" means nothing otherwise (docs/reliability.md A-DUR 7).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from peewee import Database, SqliteDatabase

import crmstore.db as dbmod
from crmstore import models as m
from crmstore.db import Store, StoreError, open_database
from crmstore.handles import next_number

# Schema version 1 as dealmail 1 created it. Frozen here on purpose: it must not follow the
# current models. Version 2 added sighting.decisions_json and email.forward_json.
V1_DDL = """
CREATE TABLE "schema_info" ("id" {pk}, "version" INTEGER NOT NULL, "upgraded_at" {dt} NOT NULL);
CREATE TABLE "company" ("id" {pk}, "slug" VARCHAR(64) NOT NULL, "name" VARCHAR(200) NOT NULL);
CREATE UNIQUE INDEX "company_slug" ON "company" ("slug");
CREATE TABLE "user" ("id" {pk}, "company_id" INTEGER NOT NULL REFERENCES "company" ("id")
  ON DELETE CASCADE, "address" VARCHAR(320) NOT NULL, "name" VARCHAR(200) NOT NULL,
  "role" VARCHAR(16) NOT NULL, "active" {bool} NOT NULL);
CREATE UNIQUE INDEX "user_address" ON "user" ("address");
CREATE TABLE "organization" ("id" {pk}, "company_id" INTEGER NOT NULL REFERENCES "company"
  ("id") ON DELETE CASCADE, "name" VARCHAR(300) NOT NULL, "created_at" {dt} NOT NULL);
CREATE UNIQUE INDEX "organization_company_id_name" ON "organization" ("company_id", "name");
CREATE TABLE "org_domain" ("id" {pk}, "organization_id" INTEGER NOT NULL REFERENCES
  "organization" ("id") ON DELETE CASCADE, "company_id" INTEGER NOT NULL REFERENCES "company"
  ("id") ON DELETE CASCADE, "domain" VARCHAR(255) NOT NULL);
CREATE UNIQUE INDEX "org_domain_company_id_domain" ON "org_domain" ("company_id", "domain");
CREATE TABLE "person" ("id" {pk}, "company_id" INTEGER NOT NULL REFERENCES "company" ("id")
  ON DELETE CASCADE, "name" VARCHAR(300) NOT NULL, "organization_id" INTEGER REFERENCES
  "organization" ("id") ON DELETE SET NULL, "auto_created" {bool} NOT NULL,
  "created_at" {dt} NOT NULL);
CREATE TABLE "person_address" ("id" {pk}, "person_id" INTEGER NOT NULL REFERENCES "person"
  ("id") ON DELETE CASCADE, "company_id" INTEGER NOT NULL REFERENCES "company" ("id")
  ON DELETE CASCADE, "address" VARCHAR(320) NOT NULL);
CREATE UNIQUE INDEX "person_address_company_id_address" ON "person_address"
  ("company_id", "address");
CREATE TABLE "deal" ("id" {pk}, "company_id" INTEGER NOT NULL REFERENCES "company" ("id")
  ON DELETE CASCADE, "external_id" VARCHAR(64), "title" VARCHAR(300) NOT NULL,
  "status" VARCHAR(8) NOT NULL, "person_id" INTEGER REFERENCES "person" ("id")
  ON DELETE SET NULL, "organization_id" INTEGER REFERENCES "organization" ("id")
  ON DELETE SET NULL, "owner_id" INTEGER REFERENCES "user" ("id") ON DELETE SET NULL,
  "value" NUMERIC(14, 2), "currency" VARCHAR(3) NOT NULL, "stage" VARCHAR(100) NOT NULL,
  "created_at" {dt} NOT NULL, "updated_at" {dt} NOT NULL);
CREATE TABLE "thread" ("id" {pk}, "company_id" INTEGER NOT NULL REFERENCES "company" ("id")
  ON DELETE CASCADE, "subject_key" VARCHAR(300) NOT NULL, "deal_id" INTEGER REFERENCES
  "deal" ("id") ON DELETE SET NULL, "created_at" {dt} NOT NULL, "last_at" {dt} NOT NULL);
CREATE TABLE "email" ("id" {pk}, "company_id" INTEGER NOT NULL REFERENCES "company" ("id")
  ON DELETE CASCADE, "dedupe_key" VARCHAR(400) NOT NULL, "message_id" VARCHAR(400),
  "content_hash" VARCHAR(64) NOT NULL, "thread_id" INTEGER NOT NULL REFERENCES "thread" ("id")
  ON DELETE CASCADE, "subject" TEXT NOT NULL, "date" {dt} NOT NULL,
  "from_address" VARCHAR(320) NOT NULL, "from_name" VARCHAR(300) NOT NULL,
  "to_json" TEXT NOT NULL, "cc_json" TEXT NOT NULL, "in_reply_to" VARCHAR(400),
  "references" TEXT NOT NULL, "thread_index" VARCHAR(64), "snippet" TEXT NOT NULL,
  "attachments_json" TEXT NOT NULL, "size" INTEGER NOT NULL, "raw" {blob} NOT NULL,
  "kind" VARCHAR(16) NOT NULL, "created_at" {dt} NOT NULL);
CREATE UNIQUE INDEX "email_company_id_dedupe_key" ON "email" ("company_id", "dedupe_key");
CREATE TABLE "sighting" ("id" {pk}, "email_id" INTEGER NOT NULL REFERENCES "email" ("id")
  ON DELETE CASCADE, "user_id" INTEGER NOT NULL REFERENCES "user" ("id") ON DELETE CASCADE,
  "channel" VARCHAR(8) NOT NULL, "visibility" VARCHAR(8) NOT NULL,
  "queue_id" VARCHAR(32) NOT NULL, "received_at" {dt} NOT NULL,
  "envelope_from" VARCHAR(320) NOT NULL, "client_ip" VARCHAR(64) NOT NULL,
  "verification" VARCHAR(16) NOT NULL, "evidence_json" TEXT NOT NULL);
CREATE UNIQUE INDEX "sighting_email_id_user_id" ON "sighting" ("email_id", "user_id");
CREATE TABLE "participant" ("id" {pk}, "email_id" INTEGER NOT NULL REFERENCES "email" ("id")
  ON DELETE CASCADE, "address" VARCHAR(320) NOT NULL, "name" VARCHAR(300) NOT NULL,
  "role" VARCHAR(4) NOT NULL, "person_id" INTEGER REFERENCES "person" ("id")
  ON DELETE SET NULL);
CREATE TABLE "link" ("id" {pk}, "email_id" INTEGER REFERENCES "email" ("id") ON DELETE CASCADE,
  "thread_id" INTEGER REFERENCES "thread" ("id") ON DELETE CASCADE, "person_id" INTEGER
  REFERENCES "person" ("id") ON DELETE CASCADE, "deal_id" INTEGER REFERENCES "deal" ("id")
  ON DELETE CASCADE, "organization_id" INTEGER REFERENCES "organization" ("id")
  ON DELETE CASCADE, "source" VARCHAR(8) NOT NULL, "created_at" {dt} NOT NULL);
CREATE TABLE "pending_choice" ("id" {pk}, "token_hash" VARCHAR(64), "user_id" INTEGER NOT NULL
  REFERENCES "user" ("id") ON DELETE CASCADE, "email_id" INTEGER NOT NULL REFERENCES "email"
  ("id") ON DELETE CASCADE, "thread_id" INTEGER NOT NULL REFERENCES "thread" ("id")
  ON DELETE CASCADE, "person_id" INTEGER REFERENCES "person" ("id") ON DELETE SET NULL,
  "candidates_json" TEXT NOT NULL, "state" VARCHAR(10) NOT NULL, "created_at" {dt} NOT NULL,
  "asked_at" {dt}, "expires_at" {dt}, "answered_at" {dt}, "answer_deal_id" INTEGER
  REFERENCES "deal" ("id") ON DELETE SET NULL);
CREATE UNIQUE INDEX "pending_choice_token_hash" ON "pending_choice" ("token_hash");
CREATE TABLE "outbox_item" ("id" {pk}, "company_id" INTEGER REFERENCES "company" ("id")
  ON DELETE SET NULL, "kind" VARCHAR(16) NOT NULL, "mail_from" VARCHAR(320) NOT NULL,
  "recipients_json" TEXT NOT NULL, "domain" VARCHAR(255) NOT NULL, "subject" TEXT NOT NULL,
  "message" {blob} NOT NULL, "state" VARCHAR(10) NOT NULL, "attempts" INTEGER NOT NULL,
  "next_attempt_at" {dt} NOT NULL, "lease_until" {dt}, "last_error" TEXT NOT NULL,
  "created_at" {dt} NOT NULL, "sent_at" {dt}, "dedupe_key" VARCHAR(200));
CREATE UNIQUE INDEX "outbox_item_dedupe_key" ON "outbox_item" ("dedupe_key");
CREATE TABLE "audit_entry" ("id" {pk}, "at" {dt} NOT NULL, "company_id" INTEGER REFERENCES
  "company" ("id") ON DELETE SET NULL, "actor" VARCHAR(320) NOT NULL,
  "action" VARCHAR(40) NOT NULL, "email_id" INTEGER REFERENCES "email" ("id")
  ON DELETE SET NULL, "detail_json" TEXT NOT NULL);
"""

# Rows a version-1 installation holds: one of everything that the upgrade touches.
V1_ROWS = """
INSERT INTO "schema_info" ("version", "upgraded_at") VALUES (1, '2026-01-02 03:04:05');
INSERT INTO "company" ("slug", "name") VALUES ('example', 'Example Inc');
INSERT INTO "user" ("company_id", "address", "name", "role", "active")
  SELECT "id", 'alice@example.com', 'Alice', 'admin', {true} FROM "company";
INSERT INTO "person" ("company_id", "name", "auto_created", "created_at")
  SELECT "id", 'Ann Customer', {false}, '2026-01-02 03:04:05' FROM "company";
INSERT INTO "person_address" ("person_id", "company_id", "address")
  SELECT "id", "company_id", 'ann@customer.test' FROM "person";
INSERT INTO "deal" ("company_id", "title", "status", "person_id", "value", "currency", "stage",
  "created_at", "updated_at")
  SELECT "company_id", 'Renewal 2027', 'open', "id", 12000, 'EUR', 'Proposal',
  '2026-01-02 03:04:05', '2026-01-02 03:04:05' FROM "person";
INSERT INTO "thread" ("company_id", "subject_key", "deal_id", "created_at", "last_at")
  SELECT "company_id", 'renewal', "id", '2026-01-02 03:04:05', '2026-01-02 03:04:05'
  FROM "deal";
INSERT INTO "email" ("company_id", "dedupe_key", "message_id", "content_hash", "thread_id",
  "subject", "date", "from_address", "from_name", "to_json", "cc_json", "references",
  "snippet", "attachments_json", "size", "raw", "kind", "created_at")
  SELECT "company_id", '<v1@example.com>', '<v1@example.com>', 'abc', "id", 'Renewal',
  '2026-01-02 03:04:05', 'alice@example.com', 'Alice', '[]', '[]', '', 'Hello Ann',
  '[]', 5, {raw}, 'bcc', '2026-01-02 03:04:05' FROM "thread";
INSERT INTO "sighting" ("email_id", "user_id", "channel", "visibility", "queue_id",
  "received_at", "envelope_from", "client_ip", "verification", "evidence_json")
  SELECT e."id", u."id", 'bcc', 'shared', 'Q1', '2026-01-02 03:04:05', 'alice@example.com',
  '127.0.0.1', 'strong', '{{}}' FROM "email" e, "user" u;
INSERT INTO "link" ("email_id", "deal_id", "source", "created_at")
  SELECT e."id", d."id", 'auto', '2026-01-02 03:04:05' FROM "email" e, "deal" d;
"""

DIALECTS = {
    "sqlite": {"pk": "INTEGER NOT NULL PRIMARY KEY", "dt": "DATETIME", "blob": "BLOB",
               "bool": "INTEGER", "true": "1", "false": "0", "raw": "X'48656c6c6f'"},
    "postgresql": {"pk": "SERIAL NOT NULL PRIMARY KEY", "dt": "TIMESTAMP", "blob": "BYTEA",
                   "bool": "BOOLEAN", "true": "TRUE", "false": "FALSE",
                   "raw": "decode('48656c6c6f', 'hex')"},
}


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str]:
    """(dialect, database url): a fresh SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return "sqlite", f"sqlite:///{tmp_path}/crm.db"
    return "postgresql", str(request.getfixturevalue("pg_url"))


@pytest.fixture
def stores() -> Iterator[list[Store]]:
    """Stores opened by a test, closed afterwards (PostgreSQL drops the database then)."""
    opened: list[Store] = []
    yield opened
    for store in opened:
        store.close()


def open_store(stores: list[Store], url: str) -> Store:
    store = Store(url)
    stores.append(store)
    store.open()
    return store


def run_script(db: Database, script: str) -> None:
    for statement in script.split(";"):
        if statement.strip():
            db.execute_sql(statement)


def make_v1(dialect: str, url: str) -> None:
    db = open_database(url)
    db.connect()
    try:
        with db.atomic():
            values = DIALECTS[dialect]
            run_script(db, V1_DDL.format(**values))
            run_script(db, V1_ROWS.format(**values))
    finally:
        db.close()


def columns(store: Store, table: str) -> set[str]:
    return {c.name for c in store.db.get_columns(table)}


# --------------------------------------------------------------------------- versions


def test_fresh_database_gets_the_current_schema(
    backend: tuple[str, str], stores: list[Store],
) -> None:
    store = open_store(stores, backend[1])
    assert store.schema_version() == m.SCHEMA_VERSION == 4
    for model in m.ALL_MODELS:
        table = model._meta.table_name
        assert store.db.table_exists(table), table
        assert columns(store, table) == {f.column_name for f in model._meta.sorted_fields}
    indexes = {ix.name for ix in store.db.get_indexes("sighting")}
    assert "ix_sighting_user_received_at" in indexes
    store.close()
    # Opening again neither recreates nor re-versions anything.
    again = open_store(stores, backend[1])
    assert [r.version for r in m.SchemaInfo.select()] == [m.SCHEMA_VERSION]
    assert again.schema_version() == m.SCHEMA_VERSION


def test_version_1_database_is_upgraded_with_its_data(
    backend: tuple[str, str], stores: list[Store],
) -> None:
    dialect, url = backend
    make_v1(dialect, url)
    store = open_store(stores, url)
    assert store.schema_version() == 4
    assert sorted(r.version for r in m.SchemaInfo.select()) == [1, 2, 3, 4]
    assert "decisions_json" in columns(store, "sighting")
    assert "forward_json" in columns(store, "email")
    assert "number" in columns(store, "email")
    assert "ix_email_company_number" in {ix.name for ix in store.db.get_indexes("email")}

    # The version-1 rows are all there, the new columns at their defaults.
    assert m.Company.get().slug == "example"
    assert m.User.get().address == "alice@example.com"
    assert m.PersonAddress.get().address == "ann@customer.test"
    deal = m.Deal.get()
    assert (deal.title, deal.status, f"{deal.value:.2f}") == ("Renewal 2027", "open", "12000.00")
    email = m.Email.get()
    assert email.message_id == "<v1@example.com>"
    # Version 4 numbered the stored email (its handle E1); the next one continues.
    assert email.number == 1
    assert m.EmailCounter.get(m.EmailCounter.company == email.company_id).last == 1
    assert bytes(email.raw) == b"Hello"
    assert email.date == datetime(2026, 1, 2, 3, 4, 5)
    assert email.forward_json is None
    sighting = m.Sighting.get()
    assert (sighting.visibility, sighting.verification) == ("shared", "strong")
    assert sighting.decisions_json == "[]"
    assert m.Link.get().deal_id == deal.id

    # The upgraded database takes new rows with the new columns, ids continuing.
    new_email = m.Email.create(
        company=email.company_id, dedupe_key="<v2@example.com>", message_id="<v2@example.com>",
        content_hash="def", thread=email.thread_id, subject="Re: Renewal",
        date=datetime(2026, 2, 1), raw=b"x", forward_json='{"chain": []}')
    assert new_email.id > email.id
    m.Sighting.create(email=new_email, user=sighting.user_id, channel="forward",
                      visibility="private", queue_id="Q2", received_at=datetime(2026, 2, 1),
                      decisions_json='["deal #1 followed from the thread"]')
    assert m.Sighting.select().count() == 2
    assert next_number(email.company_id) == 2
    store.close()
    assert open_store(stores, url).schema_version() == 4  # no second upgrade
    second = m.Email.create(
        company=email.company_id, dedupe_key="<v3@example.com>", message_id="<v3@example.com>",
        content_hash="ghi", thread=email.thread_id, subject="Quarantined",
        date=datetime(2026, 2, 2),
        raw=b"q")
    m.Sighting.create(email=second, user=m.User.get().id, channel="bcc",
                      visibility="quarantined", queue_id="Q3",
                      received_at=datetime(2026, 2, 2))  # v3 column width, on both backends


def test_upgrade_to_4_numbers_each_company_s_emails_in_stored_order(
    backend: tuple[str, str], stores: list[Store],
) -> None:
    """Handles (E<number>) are per company: the upgrade numbers each company's emails from 1
    in the order they were stored, and each company's counter continues after its last."""
    dialect, url = backend
    make_v1(dialect, url)
    db = open_database(url)
    db.connect()
    values = DIALECTS[dialect]
    with db.atomic():
        db.execute_sql('''INSERT INTO "company" ("slug", "name") VALUES ('other', 'Other')''')
        for n, slug in enumerate(["other", "example", "other", "example"], start=2):
            db.execute_sql(
                'INSERT INTO "email" ("company_id", "dedupe_key", "message_id", "content_hash", '
                '"thread_id", "subject", "date", "from_address", "from_name", "to_json", '
                '"cc_json", "references", "snippet", "attachments_json", "size", "raw", "kind", '
                f'"created_at") SELECT c."id", \'<v{n}@x>\', \'<v{n}@x>\', \'h\', t."id", \'s\', '
                "'2026-01-02 03:04:05', 'a@x', '', '[]', '[]', '', '', '[]', 1, "
                f"{values['raw']}, 'bcc', '2026-01-02 03:04:05' FROM \"company\" c, "
                f"\"thread\" t WHERE c.\"slug\" = '{slug}'")
    db.close()
    open_store(stores, url)
    numbers = {(e.company.slug, e.message_id): e.number for e in m.Email.select()}
    assert numbers == {("example", "<v1@example.com>"): 1, ("other", "<v2@x>"): 1,
                       ("example", "<v3@x>"): 2, ("other", "<v4@x>"): 2,
                       ("example", "<v5@x>"): 3}
    counters = {c.company.slug: c.last for c in m.EmailCounter.select()}
    assert counters == {"example": 3, "other": 2}
    other = m.Company.get(m.Company.slug == "other").id
    assert next_number(other) == 3


def test_newer_schema_is_refused_untouched(
    backend: tuple[str, str], stores: list[Store],
) -> None:
    store = open_store(stores, backend[1])
    m.SchemaInfo.create(version=m.SCHEMA_VERSION + 1)
    store.close()
    newer = Store(backend[1])
    stores.append(newer)
    with pytest.raises(StoreError, match=rf"schema version {m.SCHEMA_VERSION + 1} is newer "
                       rf"than this dealmail \({m.SCHEMA_VERSION}\)"):
        newer.open()
    assert sorted(r.version for r in m.SchemaInfo.select()) == [m.SCHEMA_VERSION,
                                                                m.SCHEMA_VERSION + 1]


# --------------------------------------------------------------------------- durability


def _sqlite_with(monkeypatch: pytest.MonkeyPatch, **pragmas: object) -> None:
    """Make Store open SQLite with chosen pragmas (as a hand-made or older setup would)."""
    real = dbmod.open_database

    def patched(url: str, base: Path | None = None) -> Database:
        db = real(url, base)
        assert isinstance(db, SqliteDatabase)
        return SqliteDatabase(db.database, pragmas={**dict(db._pragmas), **pragmas},
                              check_same_thread=False)

    monkeypatch.setattr(dbmod, "open_database", patched)


@pytest.mark.parametrize(
    ("pragmas", "found"),
    [({"synchronous": 1}, "wal, 1"),          # NORMAL: a WAL commit can be lost on power loss
     ({"synchronous": 0}, "wal, 0"),          # OFF
     ({"journal_mode": "delete"}, "delete, 2")],
)
def test_sqlite_that_is_not_durable_is_refused(
    pragmas: dict[str, object], found: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    stores: list[Store],
) -> None:
    _sqlite_with(monkeypatch, **pragmas)
    store = Store(f"sqlite:///{tmp_path}/crm.db")
    stores.append(store)
    with pytest.raises(StoreError, match=rf"synchronous=FULL \(found {found}\)"):
        store.open()
    assert not store.db.table_exists("schema_info")  # refused before creating anything


def test_sqlite_default_settings_are_durable(tmp_path: Path, stores: list[Store]) -> None:
    store = open_store(stores, f"sqlite:///{tmp_path}/crm.db")
    assert store.db.execute_sql("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.db.execute_sql("PRAGMA synchronous").fetchone()[0] == 2
    assert store.db.execute_sql("PRAGMA foreign_keys").fetchone()[0] == 1
    assert store.db.execute_sql("PRAGMA busy_timeout").fetchone()[0] >= 1000


def test_in_memory_sqlite_is_refused(stores: list[Store]) -> None:
    store = Store("sqlite:///:memory:")
    stores.append(store)
    with pytest.raises(StoreError, match="keeps nothing"):
        store.open()


def test_sqlite_relative_path_is_under_the_base(tmp_path: Path, stores: list[Store]) -> None:
    store = Store("sqlite:///var/crm.db", base=tmp_path)
    stores.append(store)
    store.open()
    assert (tmp_path / "var" / "crm.db").exists()


def test_postgresql_with_synchronous_commit_off_is_refused(
    pg_url: str, stores: list[Store],
) -> None:
    first = open_store(stores, pg_url)
    name = pg_url.rsplit("/", 1)[1]
    first.db.execute_sql(f'ALTER DATABASE "{name}" SET synchronous_commit = off')
    first.close()
    store = Store(pg_url)
    stores.append(store)
    with pytest.raises(StoreError, match="synchronous_commit=off"):
        store.open()


def test_unreachable_postgresql_is_a_store_error(stores: list[Store]) -> None:
    # Port 1 on loopback: nothing listens there, the connection is refused at once.
    store = Store("postgresql://postgres@127.0.0.1:1/nothing")
    stores.append(store)
    with pytest.raises(StoreError, match="cannot open database"):
        store.open()


def test_unsupported_url() -> None:
    with pytest.raises(StoreError, match="unsupported database url"):
        Store("mysql://root@localhost/crm")
