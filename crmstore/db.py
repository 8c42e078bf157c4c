"""Database setup: open SQLite or PostgreSQL from a URL, bind the models, create or upgrade the
schema, and mirror the configured companies and users into their tables.

"250 only after the commit" is only true when the commit is durable, so the store checks the
settings that make it so: SQLite in WAL mode with ``synchronous=FULL`` (a WAL commit with
NORMAL can be lost on power failure), PostgreSQL with ``fsync`` and ``synchronous_commit`` on
(docs/reliability.md A-DUR 7). It refuses to start otherwise.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import unquote, urlparse

from peewee import Database, PostgresqlDatabase, SqliteDatabase, fn
from playhouse.migrate import PostgresqlMigrator, SchemaMigrator, SqliteMigrator, migrate

from dealmail.config import Config

from . import models as m

log = logging.getLogger("dealmail.store")


class StoreError(RuntimeError):
    """The database cannot be used safely (unreachable, not durable, newer schema)."""


def open_database(url: str, base: Path | None = None) -> Database:
    """A peewee database for ``sqlite:///PATH`` or ``postgresql://…``."""
    if url.startswith("sqlite:///"):
        raw = url[len("sqlite:///"):]
        if raw == ":memory:":
            path = raw
        else:
            p = Path(raw)
            if not p.is_absolute() and base is not None:
                p = base / p
            p.parent.mkdir(parents=True, exist_ok=True)
            path = str(p)
        # check_same_thread=False: the store is used from the committer thread and the CLI
        # thread; peewee keeps one connection per thread anyway.
        return SqliteDatabase(
            path,
            pragmas={
                "journal_mode": "wal",
                "synchronous": 2,  # FULL: fsync the WAL at every commit (durability).
                "foreign_keys": 1,
                "busy_timeout": 5000,
                "cache_size": -16000,  # 16 MiB: the hot indexes, not message blobs
                "temp_store": "memory",
                # Deleted content is overwritten with zeros: a forgotten email
                # (crmstore/inbox.py) leaves no bytes in free pages of the file.
                "secure_delete": 1,
            },
            check_same_thread=False,
        )
    parsed = urlparse(url)
    if parsed.scheme in ("postgres", "postgresql"):
        return PostgresqlDatabase(
            parsed.path.lstrip("/") or "postgres",
            user=unquote(parsed.username) if parsed.username else None,
            password=unquote(parsed.password) if parsed.password else None,
            host=parsed.hostname or "127.0.0.1",
            port=parsed.port or 5432,
            # Every statement of dealmail is short (index lookups over a few thousand rows at
            # most); the planner's cost estimate of a large conversation passed
            # jit_above_cost and compiling it took 120 ms of a 230 ms query (EXPLAIN ANALYZE).
            options="-c jit=off",
        )
    raise StoreError(f"unsupported database url {url!r}")


def _migrator(db: Database) -> SchemaMigrator:
    return SqliteMigrator(db) if isinstance(db, SqliteDatabase) else PostgresqlMigrator(db)


def _upgrade_1_to_2(db: Database) -> None:
    """Version 2 records each sighting's linking decisions and a forward's parsed original."""
    mig = _migrator(db)
    migrate(
        mig.add_column("sighting", "decisions_json", m.Sighting.decisions_json),
        mig.add_column("email", "forward_json", m.Email.forward_json),
    )


def _upgrade_2_to_3(db: Database) -> None:
    """Version 3 widens sighting.visibility to hold "quarantined" (PostgreSQL enforces
    VARCHAR lengths; SQLite never did, so it needs no change)."""
    if not isinstance(db, SqliteDatabase):
        db.execute_sql('ALTER TABLE "sighting" ALTER COLUMN "visibility" TYPE VARCHAR(16)')


def _upgrade_3_to_4(db: Database) -> None:
    """Version 4 gives every email its per-company number (the handle ``E<number>``):
    existing emails are numbered in the order they were stored, and each company's counter
    starts after its last number."""
    migrate(_migrator(db).add_column("email", "number", m.Email.number))
    db.execute_sql(
        'UPDATE "email" SET "number" = x.rn FROM (SELECT "id", ROW_NUMBER() OVER '
        '(PARTITION BY "company_id" ORDER BY "id") AS rn FROM "email") AS x '
        'WHERE x."id" = "email"."id"')
    db.create_tables([m.EmailCounter])
    db.execute_sql(
        'INSERT INTO "email_counter" ("company_id", "last") SELECT c."id", '
        'COALESCE(MAX(e."number"), 0) FROM "company" c LEFT JOIN "email" e '
        'ON e."company_id" = c."id" GROUP BY c."id"')


UPGRADES = {1: _upgrade_1_to_2, 2: _upgrade_2_to_3, 3: _upgrade_3_to_4}


class Store:
    """The CRM database of one dealmail process."""

    def __init__(self, url: str, base: Path | None = None) -> None:
        self.url = url
        self.db = open_database(url, base)
        self.is_sqlite = isinstance(self.db, SqliteDatabase)
        self.db.bind(m.ALL_MODELS, bind_refs=False, bind_backrefs=False)
        # Several processes writing one SQLite file (pre-fork workers, the CLI) queue on a
        # lock file: a blocked flock() wakes the next writer the moment the lock is free,
        # where SQLite's busy handler polls with sleeps of up to 100 ms (seconds of p99
        # under load, measured with two workers).
        self._lock_path: str | None = None
        if self.is_sqlite and self.db.database != ":memory:":
            self._lock_path = f"{self.db.database}.writelock"
        self._lock_fd = threading.local()
        self._scrub = threading.local()

    # ------------------------------------------------------------------ lifecycle

    def open(self) -> None:
        """Connect, check durability settings, create or upgrade the schema."""
        try:
            self.db.connect(reuse_if_open=True)
        except Exception as exc:  # the driver's own exception types differ
            raise StoreError(f"cannot open database {self.url}: {exc}") from exc
        self.check_durability()
        self.ensure_schema()
        if self.is_sqlite:
            # Planner statistics, bounded in cost (SQLite's advice for long-lived
            # connections): without them it may pick a low-selectivity index.
            self.db.execute_sql("PRAGMA analysis_limit=1000")
            self.db.execute_sql("PRAGMA optimize=0x10002")

    def close(self) -> None:
        if not self.db.is_closed():
            self.db.close()

    def check_durability(self) -> None:
        if self.is_sqlite:
            mode = self.db.execute_sql("PRAGMA journal_mode").fetchone()[0]
            sync = self.db.execute_sql("PRAGMA synchronous").fetchone()[0]
            if str(self.url).endswith(":memory:"):
                # Gone when the process exits (and one empty database per thread): a 250
                # would promise what it cannot keep.
                raise StoreError("sqlite:///:memory: keeps nothing after the process exits: "
                                 "a 250 would not mean the message is durable; use a file")
            if mode.lower() != "wal" or int(sync) < 2:
                raise StoreError(
                    f"SQLite must run with journal_mode=WAL and synchronous=FULL "
                    f"(found {mode}, {sync}): a 250 would not mean the message is durable"
                )
        else:
            for setting in ("fsync", "synchronous_commit"):
                value = self.db.execute_sql(f"SHOW {setting}").fetchone()[0]
                if value == "off":
                    raise StoreError(
                        f"PostgreSQL has {setting}=off: a 250 would not mean the message is "
                        "durable; turn it on"
                    )

    def schema_version(self) -> int | None:
        if not self.db.table_exists("schema_info"):
            return None
        row = m.SchemaInfo.select().order_by(m.SchemaInfo.version.desc()).first()
        return row.version if row else None

    def ensure_schema(self) -> None:
        with self.db.atomic():
            version = self.schema_version()
            if version is None:
                self.db.create_tables(m.ALL_MODELS)
                self._create_extra_indexes()
                m.SchemaInfo.create(version=m.SCHEMA_VERSION)
                log.info("created database schema version %s", m.SCHEMA_VERSION)
                return
            if version > m.SCHEMA_VERSION:
                raise StoreError(
                    f"database schema version {version} is newer than this dealmail "
                    f"({m.SCHEMA_VERSION}); upgrade dealmail"
                )
            while version < m.SCHEMA_VERSION:
                UPGRADES[version](self.db)
                version += 1
                m.SchemaInfo.create(version=version)
                log.info("upgraded database schema to version %s", version)
            # Tables added by a newer dealmail (new models, no change to existing ones) are
            # created as they are: an upgrade step is needed only to change existing tables.
            missing = [t for t in m.ALL_MODELS if not self.db.table_exists(t._meta.table_name)]
            if missing:
                self.db.create_tables(missing)
                log.info("created tables %s", ", ".join(t._meta.table_name for t in missing))
            self._create_extra_indexes()

    def _create_extra_indexes(self) -> None:
        for model, fields, unique in m.EXTRA_INDEXES:
            table = model._meta.table_name
            name = f"ix_{table}_{'_'.join(fields)}"
            cols = ", ".join(f'"{model._meta.fields[f].column_name}"' for f in fields)
            uniq = "UNIQUE " if unique else ""
            self.db.execute_sql(f'CREATE {uniq}INDEX IF NOT EXISTS "{name}" ON "{table}" ({cols})')

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One write transaction. On SQLite it takes the write lock at BEGIN (IMMEDIATE), so
        a busy database fails before any work instead of at commit."""
        if self.is_sqlite:
            depth = getattr(self._lock_fd, "depth", 0)
            fd = self._writer_lock() if depth == 0 else None  # nested: already held
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            self._lock_fd.depth = depth + 1
            try:
                with self.db.atomic(lock_type="IMMEDIATE"):
                    yield
                if depth == 0:
                    self._scrub_if_asked()
            finally:
                self._lock_fd.depth = depth
                self._scrub.wanted = False
                if fd is not None:
                    fcntl.flock(fd, fcntl.LOCK_UN)
        else:
            try:
                with self.db.atomic():
                    yield
            finally:
                self._scrub.wanted = False

    def scrub_after_commit(self) -> None:
        """Ask for the deleted content of this thread's current transaction to leave the
        database files once it is committed (a forgotten email). SQLite overwrites deleted
        content in the database file (``secure_delete``), but the write-ahead log keeps the
        older page images until a checkpoint: a truncating checkpoint after the commit
        removes them. PostgreSQL keeps dead rows until VACUUM reuses their space; it has no
        cheap equivalent, so this does nothing there."""
        self._scrub.wanted = True

    def _scrub_if_asked(self) -> None:
        if not getattr(self._scrub, "wanted", False):
            return
        self._scrub.wanted = False
        busy, _log_frames, _done = self.db.execute_sql(
            "PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        if busy:  # a long reader: the log is truncated at a later checkpoint instead
            log.warning("write-ahead log not truncated after a deletion (readers busy)")

    def _writer_lock(self) -> int | None:
        """This thread's descriptor of the lock file (flock excludes per open file, so each
        thread needs its own to exclude the others)."""
        if self._lock_path is None:
            return None
        fd: int | None = getattr(self._lock_fd, "fd", None)
        if fd is None:
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
            self._lock_fd.fd = fd
        return fd

    # ------------------------------------------------------------------ config mirror

    def sync_config(self, config: Config) -> None:
        """Mirror companies and users from the config (rows are referenced by sightings and
        deals; a user removed from the config is marked inactive, never deleted)."""
        with self.transaction():
            for c in config.companies:
                company, _ = m.Company.get_or_create(slug=c.slug, defaults={"name": c.name})
                if company.name != c.name:
                    company.name = c.name
                    company.save()
                # The company's email numbers start after any it already has.
                (m.EmailCounter.insert(
                    company=company,
                    last=m.Email.select(fn.COALESCE(fn.MAX(m.Email.number), 0))
                    .where(m.Email.company == company))
                 .on_conflict_ignore().execute())
                present = set()
                for u in c.users:
                    present.add(u.address)
                    row = m.User.get_or_none(m.User.address == u.address)
                    if row is None:
                        m.User.create(company=company, address=u.address, name=u.name,
                                      role=u.role, active=True)
                    else:
                        changed = (row.company_id != company.id or row.name != u.name
                                   or row.role != u.role or not row.active)
                        if changed:
                            row.company = company
                            row.name, row.role, row.active = u.name, u.role, True
                            row.save()
                (m.User.update(active=False)
                 .where((m.User.company == company) & m.User.address.not_in(present or {""}))
                 .execute())

    def company_id(self, slug: str) -> int:
        row = m.Company.get_or_none(m.Company.slug == slug)
        if row is None:
            raise StoreError(f"unknown company {slug!r}")
        return int(row.id)
