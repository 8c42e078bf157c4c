"""The ingestion hot path's SQL, written once and reused: every statement ``record_email`` runs
for a message.

Profiling the Smart BCC path (bench/, py-spy) showed the committer thread spending ~42% of its
time in peewee building SQL text for ~12 statements per message, against ~10% in the commit
itself. These statements are fixed, so they are built once per database from the models' own
table and column names (no drift from the schema) and executed with the driver's cursor
directly. Only this module knows the SQL dialect differences (placeholders, RETURNING).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from peewee import Database, SqliteDatabase

from . import models as m


def table_sql(model: type[m.BaseModel]) -> str:
    """The model's table name, quoted for SQL written by hand (both dialects)."""
    return f'"{model._meta.table_name}"'


def column_sql(model: type[m.BaseModel], field: str) -> str:
    """The column of the model's ``field``, quoted for SQL written by hand."""
    return f'"{model._meta.fields[field].column_name}"'


# Short names for the statements below.
_t, _c = table_sql, column_sql


class HotPath:
    """Prepared statements of the ingestion path for one database."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.sqlite = isinstance(db, SqliteDatabase)
        p = "?" if self.sqlite else "%s"
        self._p = p
        # SQLite's way to keep a term's index out of a plan (unary +, its documented hint);
        # PostgreSQL plans from its own statistics and has no unary + for text.
        self._noix = "+" if self.sqlite else ""
        E, PA, P, OD, T, D, S, PC = (m.Email, m.PersonAddress, m.Person, m.OrgDomain, m.Thread,
                                     m.Deal, m.Sighting, m.PendingChoice)
        self.sql_email_by_key = (
            f"SELECT {_c(E, 'id')}, {_c(E, 'thread')} FROM {_t(E)} "
            f"WHERE {_c(E, 'company')} = {p} AND {_c(E, 'dedupe_key')} = {p}")
        self.sql_sighting_of = (
            f"SELECT {_c(S, 'id')} FROM {_t(S)} WHERE {_c(S, 'email')} = {p} "
            f"AND {_c(S, 'user')} = {p}")
        self.sql_person_of_address = (
            f"SELECT pa.{_c(PA, 'person')}, pe.{_c(P, 'organization')} FROM {_t(PA)} pa "
            f"JOIN {_t(P)} pe ON pe.{_c(P, 'id')} = pa.{_c(PA, 'person')} "
            f"WHERE pa.{_c(PA, 'company')} = {p} AND pa.{_c(PA, 'address')} = {p}")
        self.sql_org_of_domain = (
            f"SELECT {_c(OD, 'organization')} FROM {_t(OD)} "
            f"WHERE {_c(OD, 'company')} = {p} AND {_c(OD, 'domain')} = {p}")
        self.sql_thread_of_index = (
            f"SELECT {_c(E, 'thread')} FROM {_t(E)} WHERE {_c(E, 'company')} = {p} "
            f"AND {_c(E, 'thread_index')} = {p} LIMIT 1")
        self.sql_thread_candidates = (
            f"SELECT t.{_c(T, 'id')} FROM {_t(T)} t WHERE t.{_c(T, 'company')} = {p} "
            f"AND t.{_c(T, 'subject_key')} = {p} AND t.{_c(T, 'last_at')} >= {p} "
            f"ORDER BY t.{_c(T, 'last_at')} DESC LIMIT 5")
        self.sql_thread_row = (
            f"SELECT {_c(T, 'id')}, {_c(T, 'deal')}, {_c(T, 'last_at')} FROM {_t(T)} "
            f"WHERE {_c(T, 'id')} = {p}")
        # A joined thread moves forward to this email's date (never back) and tells its
        # deal, in one statement (SQLite's two-argument MAX is PostgreSQL's GREATEST).
        latest = "MAX" if self.sqlite else "GREATEST"
        self.sql_join_thread = (
            f"UPDATE {_t(T)} SET {_c(T, 'last_at')} = {latest}({_c(T, 'last_at')}, {p}) "
            f"WHERE {_c(T, 'id')} = {p} RETURNING {_c(T, 'deal')}")
        self.sql_set_thread_deal = (
            f"UPDATE {_t(T)} SET {_c(T, 'deal')} = {p} WHERE {_c(T, 'id')} = {p} "
            f"AND {_c(T, 'deal')} IS NULL")
        self.sql_links_of_email = (
            f"SELECT {_c(m.Link, 'person')}, {_c(m.Link, 'deal')}, "
            f"{_c(m.Link, 'organization')} FROM {_t(m.Link)} WHERE {_c(m.Link, 'email')} = {p}")
        self.sql_pending_for_thread = (
            f"SELECT {_c(PC, 'id')} FROM {_t(PC)} WHERE {_c(PC, 'thread')} = {p} "
            f"AND {_c(PC, 'user')} = {p} AND {_c(PC, 'state')} IN ('pending', 'asked') "
            f"LIMIT 1")
        EC, TV, TU = m.EmailCounter, m.ThreadVisibility, m.ThreadUnlinked
        # One statement takes the company's next email number and keeps the counter row
        # locked until the commit (PostgreSQL: two hosts never take the same number).
        self.sql_next_number = (
            f"UPDATE {_t(EC)} SET {_c(EC, 'last')} = {_c(EC, 'last')} + 1 "
            f"WHERE {_c(EC, 'company')} = {p} RETURNING {_c(EC, 'last')}")
        self.sql_new_counter = (
            f"INSERT INTO {_t(EC)} ({_c(EC, 'company')}, {_c(EC, 'last')}) "
            f"SELECT {p}, COALESCE(MAX({_c(E, 'number')}), 0) FROM {_t(E)} "
            f"WHERE {_c(E, 'company')} = {p} ON CONFLICT DO NOTHING")
        self.sql_thread_visibility = (
            f"SELECT {_c(TV, 'visibility')} FROM {_t(TV)} WHERE {_c(TV, 'thread')} = {p} "
            f"AND {_c(TV, 'user')} = {p}")
        self.sql_thread_unlinked = (
            f"SELECT 1 FROM {_t(TU)} WHERE {_c(TU, 'thread')} = {p}")
        self._deal_cols = f"{_c(D, 'id')}, {_c(D, 'title')}"
        self._insert_cache: dict[tuple[str, tuple[str, ...], int], str] = {}

    # ------------------------------------------------------------------ helpers

    def _value(self, v: Any) -> Any:
        # SQLite keeps peewee's text form of datetimes ("YYYY-MM-DD HH:MM:SS[.ffffff]").
        if self.sqlite and isinstance(v, datetime):
            return str(v)
        return v

    def one(self, sql: str, params: Sequence[Any]) -> tuple[Any, ...] | None:
        cur = self.db.execute_sql(sql, [self._value(v) for v in params])
        return cur.fetchone()  # type: ignore[no-any-return]

    def all(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        cur = self.db.execute_sql(sql, [self._value(v) for v in params])
        return list(cur.fetchall())

    def run(self, sql: str, params: Sequence[Any]) -> int:
        cur = self.db.execute_sql(sql, [self._value(v) for v in params])
        return int(cur.rowcount)

    def insert(self, model: type[m.BaseModel], row: dict[str, Any]) -> int:
        """Insert one row; returns its id."""
        cols = tuple(row)
        key = (model._meta.table_name, cols, 1)
        sql = self._insert_cache.get(key)
        if sql is None:
            names = ", ".join(_c(model, c) for c in cols)
            marks = ", ".join([self._p] * len(cols))
            sql = f"INSERT INTO {_t(model)} ({names}) VALUES ({marks})"
            if not self.sqlite:
                sql += f" RETURNING {_c(model, 'id')}"
            self._insert_cache[key] = sql
        cur = self.db.execute_sql(sql, [self._value(row[c]) for c in cols])
        if self.sqlite:
            return int(cur.lastrowid)
        return int(cur.fetchone()[0])

    def insert_many(self, model: type[m.BaseModel], rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        cols = tuple(rows[0])
        key = (model._meta.table_name, cols, len(rows))
        sql = self._insert_cache.get(key)
        if sql is None:
            names = ", ".join(_c(model, c) for c in cols)
            one = "(" + ", ".join([self._p] * len(cols)) + ")"
            sql = f"INSERT INTO {_t(model)} ({names}) VALUES " + ", ".join([one] * len(rows))
            self._insert_cache[key] = sql
        self.db.execute_sql(sql, [self._value(r[c]) for r in rows for c in cols])

    # ------------------------------------------------------------------ queries

    def email_by_key(self, company_id: int, key: str) -> tuple[int, int] | None:
        row = self.one(self.sql_email_by_key, (company_id, key))
        return (int(row[0]), int(row[1])) if row else None

    def has_sighting(self, email_id: int, user_id: int) -> bool:
        return self.one(self.sql_sighting_of, (email_id, user_id)) is not None

    def person_of_address(self, company_id: int, address: str) -> tuple[int, int | None] | None:
        row = self.one(self.sql_person_of_address, (company_id, address))
        return (int(row[0]), row[1]) if row else None

    def persons_and_orgs(self, company_id: int, addresses: Sequence[str],
                         domains: Sequence[str],
                         ) -> tuple[dict[str, tuple[int, int | None]], dict[str, int]]:
        """The persons of ``addresses`` (address -> (person, its organization)) and the
        organizations of ``domains`` (domain -> organization), found ones only, in one
        statement for all the participants of a message."""
        if not addresses and not domains:
            return {}, {}
        PA, P, OD, p = m.PersonAddress, m.Person, m.OrgDomain, self._p
        parts: list[str] = []
        params: list[Any] = []
        if addresses:
            parts.append(
                f"SELECT 'p', pa.{_c(PA, 'address')}, pa.{_c(PA, 'person')}, "
                f"pe.{_c(P, 'organization')} FROM {_t(PA)} pa "
                f"JOIN {_t(P)} pe ON pe.{_c(P, 'id')} = pa.{_c(PA, 'person')} "
                f"WHERE pa.{_c(PA, 'company')} = {p} "
                f"AND pa.{_c(PA, 'address')} IN ({', '.join([p] * len(addresses))})")
            params += [company_id, *addresses]
        if domains:
            parts.append(
                f"SELECT 'o', {_c(OD, 'domain')}, {_c(OD, 'organization')}, NULL "
                f"FROM {_t(OD)} WHERE {_c(OD, 'company')} = {p} "
                f"AND {_c(OD, 'domain')} IN ({', '.join([p] * len(domains))})")
            params += [company_id, *domains]
        persons: dict[str, tuple[int, int | None]] = {}
        orgs: dict[str, int] = {}
        for kind, key, ident, org in self.all(" UNION ALL ".join(parts), params):
            if kind == "p":
                persons[str(key)] = (int(ident), int(org) if org is not None else None)
            else:
                orgs[str(key)] = int(ident)
        return persons, orgs

    def org_of_domain(self, company_id: int, domain: str) -> int | None:
        row = self.one(self.sql_org_of_domain, (company_id, domain))
        return int(row[0]) if row else None

    def thread_of_message_ids(self, company_id: int, ids: list[str]) -> int | None:
        if not ids:
            return None
        marks = ", ".join([self._p] * len(ids))
        E = m.Email
        sql = (f"SELECT {_c(E, 'thread')} FROM {_t(E)} WHERE {_c(E, 'company')} = {self._p} "
               f"AND {_c(E, 'message_id')} IN ({marks}) ORDER BY {_c(E, 'date')} DESC LIMIT 1")
        row = self.one(sql, (company_id, *ids))
        return int(row[0]) if row else None

    def thread_of_index(self, company_id: int, key: str) -> int | None:
        row = self.one(self.sql_thread_of_index, (company_id, key))
        return int(row[0]) if row else None

    def thread_candidates(self, company_id: int, subject_key: str, since: datetime) -> list[int]:
        return [int(r[0]) for r in self.all(self.sql_thread_candidates,
                                            (company_id, subject_key, since))]

    def thread_shares_participant(self, thread_id: int, addresses: Iterable[str]) -> bool:
        addrs = list(addresses)
        if not addrs:
            return False
        P, E = m.Participant, m.Email
        marks = ", ".join([self._p] * len(addrs))
        # Driven by the thread (a few emails), not by the address (a frequent customer is a
        # participant of thousands of emails): "+address" keeps its index out of the plan.
        sql = (f"SELECT 1 FROM {_t(E)} e JOIN {_t(P)} pa ON pa.{_c(P, 'email')} = e.{_c(E, 'id')} "
               f"WHERE e.{_c(E, 'thread')} = {self._p} "
               f"AND {self._noix}pa.{_c(P, 'address')} IN ({marks}) "
               "LIMIT 1")
        return self.one(sql, (thread_id, *addrs)) is not None

    def thread_row(self, thread_id: int) -> tuple[int, int | None]:
        row = self.one(self.sql_thread_row, (thread_id,))
        assert row is not None
        return int(row[0]), (int(row[1]) if row[1] is not None else None)

    def join_thread(self, thread_id: int, when: datetime) -> int | None:
        """Move the thread's last activity forward to ``when`` (never back) and return its
        deal (what ``thread_row`` tells), in one statement."""
        rows = self.all(self.sql_join_thread, (when, thread_id))
        assert rows, f"thread {thread_id} vanished"
        return int(rows[0][0]) if rows[0][0] is not None else None

    def set_thread_deal(self, thread_id: int, deal_id: int) -> None:
        self.run(self.sql_set_thread_deal, (deal_id, thread_id))

    def links_of_email(self, email_id: int) -> set[tuple[int | None, int | None, int | None]]:
        return {(r[0], r[1], r[2]) for r in self.all(self.sql_links_of_email, (email_id,))}

    def open_deals(self, company_id: int, persons: list[int]) -> list[tuple[int, str]]:
        D = m.Deal
        marks = ", ".join([self._p] * len(persons))
        # "+column": still checked, but never used as the index. Company and status match
        # most deals of a large company; the person index is the selective one.
        sql = (f"SELECT {self._deal_cols} FROM {_t(D)} WHERE {_c(D, 'person')} IN ({marks}) "
               f"AND {self._noix}{_c(D, 'status')} = 'open' "
               f"AND {self._noix}{_c(D, 'company')} = {self._p} "
               f"ORDER BY {_c(D, 'id')}")
        return [(int(r[0]), str(r[1])) for r in self.all(sql, (*persons, company_id))]

    def next_email_number(self, company_id: int) -> int:
        """The company's next email number (the counter row is made on first use)."""
        rows = self.all(self.sql_next_number, (company_id,))
        if not rows:
            self.run(self.sql_new_counter, (company_id, company_id))
            rows = self.all(self.sql_next_number, (company_id,))
        return int(rows[0][0])

    def thread_visibility(self, thread_id: int, user_id: int) -> str | None:
        """The visibility a user chose for a whole thread (``private thread E12``)."""
        row = self.one(self.sql_thread_visibility, (thread_id, user_id))
        return str(row[0]) if row else None

    def thread_unlinked(self, thread_id: int) -> bool:
        return self.one(self.sql_thread_unlinked, (thread_id,)) is not None

    def pending_for_thread(self, thread_id: int, user_id: int) -> int | None:
        row = self.one(self.sql_pending_for_thread, (thread_id, user_id))
        return int(row[0]) if row else None
