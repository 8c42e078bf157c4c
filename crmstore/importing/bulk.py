"""Bulk SQL of the importer: preloads read as the driver returns them, ids reserved for new
rows before they are written (so that rows referring to them can be written in the same
bulk), and inserts straight through the driver (``executemany`` on SQLite, ``COPY`` on
PostgreSQL)."""

from __future__ import annotations

import io
from typing import Any

import peewee
from peewee import Model

from ..db import Store


def tuple_rows(query: Any) -> list[tuple[Any, ...]]:
    """Rows of a peewee select as plain tuples (typed loosely: peewee's stubs type a
    ``.tuples()`` query as yielding model instances)."""
    return list(query.tuples())


def raw_rows(query: Any) -> list[tuple[Any, ...]]:
    """Rows as the driver returns them, without peewee's per-value conversion: for the
    100,000-row preloads of ids, names and addresses (ints and strings on both backends)."""
    return list(query.model._meta.database.execute(query).fetchall())


def reserve_ids(store: Store, model: type[Model], n: int) -> list[int]:
    """Ids for ``n`` new rows, so that rows referring to them can be written in bulk.

    PostgreSQL: taken from the table's own sequence (safe against concurrent writers).
    SQLite: after the current maximum; the import holds the write lock (BEGIN IMMEDIATE), so
    nobody else can take them meanwhile."""
    if n == 0:
        return []
    table = model._meta.table_name
    if store.is_sqlite:
        start = store.db.execute_sql(f'SELECT COALESCE(MAX(id), 0) FROM "{table}"').fetchone()[0]
        return list(range(int(start) + 1, int(start) + 1 + n))
    cursor = store.db.execute_sql(
        "SELECT nextval(pg_get_serial_sequence(%s, 'id')) FROM generate_series(1, %s)",
        (table, n))
    return [int(r[0]) for r in cursor.fetchall()]


def insert_rows(store: Store, model: type[Model], fields: list[Any],
                rows: list[tuple[Any, ...]]) -> None:
    """Bulk insert straight through the driver (building 100,000 rows as peewee expressions
    costs ten times more than writing them). Values still go through each field's
    ``db_value`` so they are stored exactly as peewee would store them."""
    if not rows:
        return
    table = model._meta.table_name
    columns = ", ".join(f'"{f.column_name}"' for f in fields)
    convert = [f.db_value for f in fields]
    plain = (int, str, type(None))  # stored as is; skipping db_value halves the Python work
    values = [tuple(v if type(v) in plain else c(v) for c, v in zip(convert, row, strict=True))
              for row in rows]
    # The driver's own exceptions become peewee's (IntegrityError...), as for any query.
    with peewee.__exception_wrapper__:
        _driver_insert(store, table, columns, len(fields), values)


def _driver_insert(store: Store, table: str, columns: str, width: int,
                   values: list[tuple[Any, ...]]) -> None:
    cursor = store.db.cursor()
    if store.is_sqlite:
        marks = ", ".join("?" * width)
        cursor.executemany(f'INSERT INTO "{table}" ({columns}) VALUES ({marks})', values)
        return
    # PostgreSQL: COPY is its bulk-load path (a third faster than multi-row INSERTs here).
    # CSV format with every value quoted and NULL written as an unquoted \N, so that an empty
    # string stays an empty string and no cell text can be mistaken for NULL.
    buffer = io.StringIO()
    for row in values:
        buffer.write(",".join(
            "\\N" if v is None else '"' + str(v).replace('"', '""') + '"' for v in row))
        buffer.write("\n")
    buffer.seek(0)
    cursor.copy_expert(
        f"COPY \"{table}\" ({columns}) FROM STDIN WITH (FORMAT csv, NULL '\\N')", buffer)
