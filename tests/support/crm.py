"""A CRM store for the unit tests of the core path (imported as ``support.crm``).

The ``store`` fixture of the root conftest hands each test a :class:`crmstore.db.Store` on a
real SQLite file or on a PostgreSQL database, both created once per test session and emptied
for each test (:func:`empty_store`) but for the example config's company and users.
:func:`add_demo_crm` then writes the demo CRM of ``conf/demo`` straight through the models
(not through the CSV importer, so that a fault of the importer never shows up as a fault of
the capture path).
"""

from __future__ import annotations

import os
import sqlite3
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pytest

from crmstore import models as m
from crmstore.db import Store
from dealmail.config import Config

PG_HOST = "127.0.0.1"
# When every CRM row of these tests is created (naive UTC, as stored).
CREATED = datetime(2026, 11, 1, 9, 0)


@contextmanager
def pg_database(label: str) -> Iterator[str]:
    """A PostgreSQL database on the local server for the duration of the block (skips the
    test when PostgreSQL is not running; fails when env CI is set)."""
    psycopg2 = pytest.importorskip("psycopg2")
    try:
        admin = psycopg2.connect(host=PG_HOST, port=5432, user="postgres", dbname="postgres",
                                 connect_timeout=3)
    except Exception as exc:  # the driver's OperationalError
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL on {PG_HOST}:5432 is required in CI: {exc}")
        pytest.skip(f"PostgreSQL on {PG_HOST}:5432 not reachable: {exc}")
    admin.autocommit = True
    label = "".join(c for c in label.rpartition(".")[2].lower() if c.isalnum() or c == "_")
    name = f"dealmail_test_{label[:24]}_{uuid.uuid4().hex[:8]}"
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql://postgres@{PG_HOST}:5432/{name}"
    finally:
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def empty_store(store: Store, config: Config) -> Store:
    """``store`` with no rows but the config's companies and users, its ids restarted, and
    the models bound to it (the session's stores are shared by the tests)."""
    store.db.bind(m.ALL_MODELS, bind_refs=False, bind_backrefs=False)
    store.db.connect(reuse_if_open=True)
    if store.db.in_transaction():  # a failed test's leftovers
        store.db.rollback()
    with store.transaction():  # one commit: DELETE is ~10x faster than TRUNCATE here
        for model in reversed(m.ALL_MODELS):  # referring tables first
            if model is not m.SchemaInfo:
                model.delete().execute()
                if not store.is_sqlite:  # SQLite's next id is already max(id) + 1
                    store.db.execute_sql(
                        "SELECT setval(pg_get_serial_sequence(%s, 'id'), 1, false)",
                        (f'"{model._meta.table_name}"',))
        store.sync_config(config)
    return store


def peek(store: Store, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    """Rows of ``sql`` read on a connection of its own: what another process sees, i.e. only
    what is committed. ``sql`` uses ``?`` placeholders on both backends."""
    if store.is_sqlite:
        conn = sqlite3.connect(store.db.database)
        try:
            return list(conn.execute(sql, params).fetchall())
        finally:
            conn.close()
    import psycopg2

    pg = psycopg2.connect(host=PG_HOST, port=5432, user="postgres", dbname=store.db.database)
    try:
        with pg.cursor() as cur:
            cur.execute(sql.replace("?", "%s"), params)
            return list(cur.fetchall())
    finally:
        pg.close()


@dataclass(frozen=True)
class DemoCrm:
    """Ids of the demo CRM (conf/demo): Customer Inc (customer.test) with Ann (two open
    deals) and Dora (none); Other Ltd (other.test) with Carl (open "Pilot", won "Old order")."""

    company: int
    customer_inc: int
    other_ltd: int
    ann: int
    carl: int
    dora: int
    renewal: int
    upsell: int
    pilot: int
    old_order: int


def add_demo_crm(store: Store, slug: str = "example") -> DemoCrm:
    cid = store.company_id(slug)
    with store.transaction():
        orgs = {}
        for name, domain in (("Customer Inc", "customer.test"), ("Other Ltd", "other.test")):
            org = m.Organization.create(company=cid, name=name, created_at=CREATED)
            m.OrgDomain.create(organization=org, company=cid, domain=domain)
            orgs[name] = org.id
        persons = {}
        for name, address, org_name in (("Ann Customer", "ann@customer.test", "Customer Inc"),
                                        ("Carl Other", "carl@other.test", "Other Ltd"),
                                        ("Dora Customer", "dora@customer.test", "Customer Inc")):
            p = m.Person.create(company=cid, name=name, organization=orgs[org_name],
                                created_at=CREATED)
            m.PersonAddress.create(person=p, company=cid, address=address)
            persons[address.split("@")[0]] = p.id
        deals = {}
        for title, status, who in (("Renewal 2027", "open", "ann"), ("Upsell seats", "open", "ann"),
                                   ("Pilot", "open", "carl"), ("Old order", "won", "carl")):
            d = m.Deal.create(company=cid, title=title, status=status, person=persons[who],
                              organization=orgs["Other Ltd" if who == "carl" else "Customer Inc"],
                              created_at=CREATED, updated_at=CREATED)
            deals[title] = d.id
    return DemoCrm(cid, orgs["Customer Inc"], orgs["Other Ltd"], persons["ann"],
                   persons["carl"], persons["dora"], deals["Renewal 2027"],
                   deals["Upsell seats"], deals["Pilot"], deals["Old order"])


def row_counts() -> dict[str, int]:
    """Rows per table, to show that something wrote nothing."""
    return {model.__name__: model.select().count() for model in m.ALL_MODELS}
