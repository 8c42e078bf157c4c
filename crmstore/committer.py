"""The group committer: one thread that owns the database writes of the SMTP transactions.

Each SMTP transaction submits one job; the committer takes the write lock and then runs every
job waiting at that moment in one database transaction, each inside its own savepoint (so one
failing job rolls back alone and is answered 451), commits once, and only then resolves the
jobs' futures. No client is answered before the commit that holds its message returned
(RFC 5321 §6.1), yet N waiting messages cost one fsync instead of N. When nothing else waits
the job is committed at once: a lone client never waits for a grouping window
(docs/architecture.md, measured facts).

The outbox worker is woken only by a batch that queued outbox rows (``after_queue``): each
batch reads the outbox's highest id in its own transaction (one indexed statement per batch,
not per message) and compares it with the last one seen. Waking the worker after every batch
cost a thread hop and a "what is due?" query per commit while nothing was queued.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any, TypeVar

from crmstore import models as m
from crmstore.db import Store
from crmstore.hotpath import column_sql, table_sql

log = logging.getLogger("dealmail.committer")

T = TypeVar("T")
# One unit of work run inside the batch transaction (the SMTP listeners submit their handler jobs).
Work = Callable[[], Any]

# A fault injection point for tests (docs/reliability.md A-DUR 3): called just before COMMIT.
BeforeCommit = Callable[[], None]


class _JobFailed(Exception):
    """Raised inside a one-job batch's transaction to roll it back (see ``_run_batch``)."""


class CommitterStopped(RuntimeError):
    """The committer is shutting down; the job was not run (answer 451)."""


def _settle(items: list[tuple[asyncio.Future[Any], bool, Any]]) -> None:
    for afut, ok, value in items:
        if afut.done():  # the client went away and the waiter was cancelled
            continue
        if ok:
            afut.set_result(value)
        else:
            afut.set_exception(value)


class GroupCommitter:
    def __init__(self, store: Store, max_batch: int = 64,
                 before_commit: BeforeCommit | None = None,
                 after_commit: Callable[[], None] | None = None,
                 after_queue: Callable[[], None] | None = None) -> None:
        self.store = store
        #: Called after every committed batch.
        self.after_commit = after_commit
        #: Called after a committed batch that queued outbox rows (the outbox worker's wake).
        self.after_queue = after_queue
        self._sql_outbox_max = (f"SELECT MAX({column_sql(m.OutboxItem, 'id')}) "
                                f"FROM {table_sql(m.OutboxItem)}")
        # The outbox's highest id at the last commit; None: unknown (the first batch, or a
        # failed commit), which wakes the worker once.
        self._outbox_max: int | None = None
        self.max_batch = max_batch
        self.before_commit = before_commit
        self._queue: queue.SimpleQueue[tuple[Work, Future[Any]] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="dealmail-committer", daemon=True)
        self._stopping = threading.Event()
        # Jobs are queued from the event loop and from worker threads (submit_prepared):
        # "not stopping" and the put happen under this lock, and stop() sets the flag and
        # queues its end mark under it, so no job lands behind the end mark unanswered.
        self._lock = threading.Lock()
        # Futures of submit_async: concurrent future id -> (loop, asyncio future).
        self._async: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future[Any]]] = {}

    def start(self) -> None:
        self._thread.start()

    def submit_async(self, job: Callable[[], T]) -> asyncio.Future[T]:
        """Queue ``job`` for the next batch; the returned future (of the calling event loop)
        gets its result after the commit. A batch's results reach each loop in one wake-up
        (one ``call_soon_threadsafe`` per batch instead of one per message)."""
        loop = asyncio.get_running_loop()
        afut: asyncio.Future[T] = loop.create_future()
        if not self._enqueue(job, loop, afut):
            afut.set_exception(CommitterStopped("committer stopped"))
        return afut

    def submit_prepared(self, executor: Executor, prepare: Callable[[], Any],
                        is_job: Callable[[Any], bool]) -> asyncio.Future[Any]:
        """Run ``prepare`` in ``executor``. What it returns is the answer, unless ``is_job``
        says it is a job for the store: then the worker thread queues it for the next batch
        itself, and the answer is the job's result after the commit. The same as
        ``submit_async(await run_in_executor(executor, prepare))`` with one wake-up of the
        event loop per message instead of two (a message that needs a commit is handed from
        the worker thread straight to the committer)."""
        loop = asyncio.get_running_loop()
        afut: asyncio.Future[Any] = loop.create_future()

        def run() -> None:
            try:
                value = prepare()
                if not is_job(value):
                    items: list[tuple[asyncio.Future[Any], bool, Any]] = [(afut, True, value)]
                elif self._enqueue(value, loop, afut):
                    return  # the committer answers after the commit
                else:
                    items = [(afut, False, CommitterStopped("committer stopped"))]
            except BaseException as exc:  # the caller's await raises it, as run_in_executor
                items = [(afut, False, exc)]
            try:
                loop.call_soon_threadsafe(_settle, items)
            except RuntimeError:  # the loop is closed: nobody waits any more
                log.debug("event loop closed before a prepared answer arrived")

        executor.submit(run)
        return afut

    def _enqueue(self, job: Work, loop: asyncio.AbstractEventLoop,
                 afut: asyncio.Future[Any]) -> bool:
        """Queue ``job`` for the next batch, ``afut`` (of ``loop``) to get its outcome;
        False when the committer is stopping (nothing queued)."""
        with self._lock:
            if self._stopping.is_set():
                return False
            cfut: Future[Any] = Future()
            # Registered before the job is queued: the committer may finish it at once.
            self._async[id(cfut)] = (loop, afut)
            self._queue.put((job, cfut))
            return True

    def stop(self, timeout: float = 30.0) -> None:
        """Finish every job already submitted, then stop."""
        with self._lock:
            self._stopping.set()
            self._queue.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        try:
            while True:
                first = self._queue.get()
                if first is None or self._run_batch([first]):
                    self._drain_after_stop()
                    return
        finally:
            self.store.close()

    def _drain_after_stop(self) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                self._run_batch([item])

    def _top_up(self, batch: list[tuple[Work, Future[Any]]]) -> bool:
        """Add the jobs waiting now to ``batch`` (up to ``max_batch``); True when the stop
        mark was among them."""
        while len(batch) < self.max_batch:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return False
            if item is None:
                return True
            batch.append(item)
        return False

    def _run_batch(self, batch: list[tuple[Work, Future[Any]]]) -> bool:
        """Run ``batch`` and the jobs that join it once the write lock is held, in one
        transaction; True when the stop mark was taken from the queue meanwhile."""
        results: list[tuple[Future[Any], bool, Any]] = []
        db = self.store.db
        stop_seen = False
        try:
            with self.store.transaction():
                # The batch is completed only now that the write lock is ours: on SQLite
                # another worker process may have held it meanwhile, and every job queued
                # during that wait shares this commit's fsync instead of waiting for the next.
                stop_seen = self._top_up(batch)
                # A job alone in its batch needs no savepoint: if it fails, the whole
                # transaction is rolled back instead (two statements, SAVEPOINT and RELEASE,
                # fewer per message whenever clients do not overlap).
                alone = len(batch) == 1
                for job, fut in batch:
                    if not fut.set_running_or_notify_cancel():
                        continue
                    try:
                        if alone:
                            value = job()
                        else:
                            with db.atomic():  # a savepoint: this job alone rolls back
                                value = job()
                        results.append((fut, True, value))
                    except BaseException as exc:  # answered 451 by the caller
                        results.append((fut, False, exc))
                        if alone:
                            raise _JobFailed from exc
                queued = self._outbox_grew()
                if self.before_commit is not None:
                    self.before_commit()
        except _JobFailed:
            # The one job of the batch failed and its transaction was rolled back: nothing
            # else was in it, the connection is fine.
            self._outbox_max = None
            self._resolve(results)
            return stop_seen
        except BaseException as exc:
            # The commit itself failed: nothing of this batch is durable.
            self._outbox_max = None
            log.error("commit of %d job(s) failed: %r", len(batch), exc)
            failed = [(fut, False, exc) for _job, fut in batch]
            self._resolve(failed)
            self._reconnect()
            return stop_seen
        log.debug("committed a batch of %d job(s)", len(batch))
        if self.after_commit is not None:
            self.after_commit()
        if queued and self.after_queue is not None:
            self.after_queue()
        self._resolve(results)
        return stop_seen

    def _outbox_grew(self) -> bool:
        """Whether this transaction sees outbox rows the last commit did not (queued by this
        batch, or by another process meanwhile: both are worth a wake). Ids only grow; a
        rolled-back savepoint takes its rows, and so its ids, with it."""
        if self.after_queue is None:
            return False
        row = self.store.db.execute_sql(self._sql_outbox_max).fetchone()
        current = int(row[0]) if row and row[0] is not None else 0
        previous, self._outbox_max = self._outbox_max, current
        return previous is None or current > previous

    def _resolve(self, results: list[tuple[Future[Any], bool, Any]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], bool, Any]]]
        by_loop = {}
        for fut, ok, value in results:
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(value)
            target = self._async.pop(id(fut), None)
            if target is not None:
                by_loop.setdefault(target[0], []).append((target[1], ok, value))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_settle, items)
            except RuntimeError:  # the loop is closed: nobody waits any more
                log.debug("event loop closed before %d result(s) arrived", len(items))

    def _reconnect(self) -> None:
        """After a failed commit the connection may be dead (PostgreSQL restarted): reopen it
        so the next message succeeds without a restart (docs/reliability.md A-DUR 6)."""
        try:
            if not self.store.db.is_closed():
                self.store.db.close()
        except Exception:  # the old connection is unusable anyway
            log.debug("closing the failed connection raised", exc_info=True)
        try:
            self.store.db.connect(reuse_if_open=True)
        except Exception:
            log.warning("database reconnect failed; will retry with the next message",
                        exc_info=True)
