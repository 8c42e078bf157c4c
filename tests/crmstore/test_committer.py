"""Unit tests of ``crmstore.committer.GroupCommitter`` on SQLite and PostgreSQL, with jobs that
write rows and a second connection that sees only what is committed.

Proves: jobs that wait while a batch runs are committed together in the next transaction (one
commit for many jobs, ``max_batch`` respected), and so are jobs queued while another worker
process holds SQLite's write lock; a failing job rolls back alone (its savepoint)
while the others of its batch commit; a failing COMMIT (injected with ``before_commit``) fails
every job of the batch, leaves nothing visible and is followed by a working connection; a
job's future is resolved only once its row is visible to other connections; ``stop()``
finishes every job submitted before it and refuses later ones with ``CommitterStopped``; on
PostgreSQL, a connection killed under the committer is replaced after the failed batch.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import threading
from collections.abc import Awaitable, Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import pytest
from support.crm import PG_HOST, peek

from crmstore import models as m
from crmstore.committer import CommitterStopped, GroupCommitter
from crmstore.db import Store

T = TypeVar("T")
WAIT = 10.0  # seconds: a deadlock fails the test instead of hanging the suite


class Blocker:
    """A job that holds the committer until released, so that later jobs pile up."""

    def __init__(self) -> None:
        self.running = threading.Event()
        self.release = threading.Event()

    def __call__(self) -> str:
        self.running.set()
        assert self.release.wait(WAIT)
        return "blocker"

    async def started(self) -> None:
        ok = await asyncio.get_running_loop().run_in_executor(None, self.running.wait, WAIT)
        assert ok, "the committer never ran the blocking job"


def org_job(company_id: int, name: str, extra: Callable[[], None] | None = None
            ) -> Callable[[], int]:
    """A job writing one organization named ``name``; ``extra`` runs after the write."""

    def job() -> int:
        org_id = int(m.Organization.create(company=company_id, name=name).id)
        if extra is not None:
            extra()
        return org_id

    return job


def visible(store: Store, *names: str) -> set[str]:
    """Which of these organizations another connection sees (i.e. committed ones)."""
    marks = ", ".join("?" * len(names))
    return {r[0] for r in peek(store, f"SELECT name FROM organization WHERE name IN ({marks})",
                               names)}


@pytest.fixture
def company_id(store: Store) -> int:
    return store.company_id("example")


@pytest.fixture
def commits() -> list[int]:
    return []


@pytest.fixture
def make_committer(store: Store, commits: list[int]) -> Iterator[Callable[..., GroupCommitter]]:
    started: list[GroupCommitter] = []

    def make(**kw: Any) -> GroupCommitter:
        committer = GroupCommitter(store, after_commit=lambda: commits.append(len(commits) + 1),
                                   **kw)
        committer.start()
        started.append(committer)
        return committer

    yield make
    for committer in started:
        committer.stop(WAIT)


def run(coro: Awaitable[T]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, WAIT)

    return asyncio.run(bounded())


# --------------------------------------------------------------------------- batching


def test_waiting_jobs_are_committed_in_one_transaction(
        store: Store, company_id: int, commits: list[int],
        make_committer: Callable[..., GroupCommitter]) -> None:
    committer = make_committer()
    blocker = Blocker()
    seen_commits: list[int] = []

    def job(i: int) -> Callable[[], Any]:
        def work() -> Any:
            seen_commits.append(len(commits))  # commits done when this job ran
            m.Organization.create(company=company_id, name=f"org{i}")
            if not store.is_sqlite:
                return store.db.execute_sql("SELECT txid_current()").fetchone()[0]
            return i
        return work

    async def main() -> list[Any]:
        first = committer.submit_async(blocker)
        await blocker.started()
        rest = [committer.submit_async(job(i)) for i in range(10)]
        blocker.release.set()
        return list(await asyncio.gather(first, *rest))

    results = run(main())
    assert results[0] == "blocker"
    assert commits == [1, 2]  # the blocker's batch, then all ten waiting jobs at once
    assert seen_commits == [1] * 10
    if not store.is_sqlite:
        assert len(set(results[1:])) == 1  # one PostgreSQL transaction id for all ten
    assert visible(store, *(f"org{i}" for i in range(10))) == {f"org{i}" for i in range(10)}


def test_a_batch_holds_at_most_max_batch_jobs(
        company_id: int, commits: list[int],
        make_committer: Callable[..., GroupCommitter]) -> None:
    committer = make_committer(max_batch=4)
    blocker = Blocker()

    async def main() -> None:
        first = committer.submit_async(blocker)
        await blocker.started()
        rest = [committer.submit_async(org_job(company_id, f"o{i}")) for i in range(10)]
        blocker.release.set()
        await asyncio.gather(first, *rest)

    run(main())
    assert len(commits) == 1 + 3  # 4 + 4 + 2 after the blocker
    assert m.Organization.select().count() == 10


def blocked_on_flock(path: str) -> bool:
    """Whether some process waits for an flock of ``path`` (a ``->`` line of /proc/locks names
    a blocked request; the file is known by its device and inode)."""
    st = os.stat(path)
    wanted = f":{st.st_ino} "
    return any(line.split(":", 1)[1].lstrip().startswith("->") and wanted in line
               for line in Path("/proc/locks").read_text().splitlines())


def test_jobs_queued_while_another_writer_holds_the_lock_share_its_commit(
        store: Store, company_id: int, commits: list[int],
        make_committer: Callable[..., GroupCommitter]) -> None:
    """On SQLite the worker processes take turns at the write lock: the batch is completed
    once the lock is ours, so what queued during the wait costs one fsync, not one each."""
    if not store.is_sqlite:
        pytest.skip("PostgreSQL has no writer lock file")
    committer = make_committer()
    lock_path = f"{store.db.database}.writelock"
    other = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)  # the other worker process
    fcntl.flock(other, fcntl.LOCK_EX)
    try:
        async def main() -> None:
            first = committer.submit_async(org_job(company_id, "first"))
            loop = asyncio.get_running_loop()
            deadline = loop.time() + WAIT
            while not blocked_on_flock(lock_path):
                assert loop.time() < deadline, "the committer never waited for the lock"
                await asyncio.sleep(0.005)
            rest = [committer.submit_async(org_job(company_id, f"o{i}")) for i in range(5)]
            fcntl.flock(other, fcntl.LOCK_UN)
            await asyncio.gather(first, *rest)

        run(main())
    finally:
        os.close(other)
    assert commits == [1]  # one transaction for the job that waited and the five behind it
    assert visible(store, "first", *(f"o{i}" for i in range(5))) == {
        "first", *(f"o{i}" for i in range(5))}


# --------------------------------------------------------------------------- failures


def test_a_failing_job_rolls_back_alone(store: Store, company_id: int, commits: list[int],
                                        make_committer: Callable[..., GroupCommitter]) -> None:
    committer = make_committer()
    blocker = Blocker()

    def boom() -> None:
        raise RuntimeError("job failed after writing")

    async def main() -> list[Any]:
        first = committer.submit_async(blocker)
        await blocker.started()
        jobs = [committer.submit_async(org_job(company_id, "good1")),
                committer.submit_async(org_job(company_id, "bad", extra=boom)),
                committer.submit_async(org_job(company_id, "good2"))]
        blocker.release.set()
        return list(await asyncio.gather(first, *jobs, return_exceptions=True))

    results = run(main())
    assert isinstance(results[2], RuntimeError) and str(results[2]) == "job failed after writing"
    assert all(isinstance(r, int) for r in (results[1], results[3]))
    assert commits == [1, 2]  # the bad job was in the same batch as the good ones
    assert visible(store, "good1", "bad", "good2") == {"good1", "good2"}


def test_a_failing_commit_fails_the_whole_batch_and_the_next_one_works(
        store: Store, company_id: int, commits: list[int],
        make_committer: Callable[..., GroupCommitter]) -> None:
    calls = []

    def before_commit() -> None:
        calls.append(1)
        if len(calls) == 2:  # the second batch's COMMIT
            raise OSError("disk full (injected)")

    committer = make_committer(before_commit=before_commit)
    blocker = Blocker()

    async def main() -> tuple[list[Any], Any]:
        first = committer.submit_async(blocker)
        await blocker.started()
        batch = [committer.submit_async(org_job(company_id, f"lost{i}")) for i in range(3)]
        blocker.release.set()
        outcomes = list(await asyncio.gather(first, *batch, return_exceptions=True))
        after = await committer.submit_async(org_job(company_id, "after"))
        return outcomes, after

    outcomes, after = run(main())
    assert outcomes[0] == "blocker"
    assert [str(e) for e in outcomes[1:]] == ["disk full (injected)"] * 3
    assert all(isinstance(e, OSError) for e in outcomes[1:])
    assert commits == [1, 2]  # after_commit ran for the blocker and for "after" only
    assert visible(store, "lost0", "lost1", "lost2", "after") == {"after"}
    assert m.Organization.get_by_id(after).name == "after"


def test_a_future_is_resolved_only_once_its_row_is_visible(
        store: Store, company_id: int, make_committer: Callable[..., GroupCommitter]) -> None:
    before_commit_saw: list[set[str]] = []
    committer = make_committer(
        before_commit=lambda: before_commit_saw.append(visible(store, "durable")))
    resolved_saw: list[set[str]] = []

    async def main() -> None:
        fut = committer.submit_async(org_job(company_id, "durable"))
        fut.add_done_callback(lambda _f: resolved_saw.append(visible(store, "durable")))
        await fut

    run(main())
    assert before_commit_saw == [set()]  # written, not yet committed: nobody else sees it
    assert resolved_saw == [{"durable"}]


# --------------------------------------------------------------------------- stop


def test_stop_finishes_submitted_jobs_then_refuses_new_ones(
        store: Store, company_id: int, make_committer: Callable[..., GroupCommitter]) -> None:
    committer = make_committer()
    blocker = Blocker()

    async def main() -> tuple[list[Any], list[str]]:
        loop = asyncio.get_running_loop()
        first = committer.submit_async(blocker)
        await blocker.started()
        accepted = [committer.submit_async(org_job(company_id, f"queued{i}")) for i in range(3)]
        stopping = loop.run_in_executor(None, committer.stop, WAIT)
        # Until stop() has begun, jobs are still taken (and must then be finished too).
        while True:
            probe = committer.submit_async(org_job(company_id, f"queued{len(accepted)}"))
            if probe.done():
                with pytest.raises(CommitterStopped):
                    probe.result()
                break
            accepted.append(probe)
            await asyncio.sleep(0.005)
        blocker.release.set()
        done = list(await asyncio.gather(first, *accepted))
        await stopping
        late = committer.submit_async(org_job(company_id, "late"))
        with pytest.raises(CommitterStopped):
            await late
        return done, [f"queued{i}" for i in range(len(accepted))]

    done, names = run(main())
    assert done[0] == "blocker" and all(isinstance(r, int) for r in done[1:])
    assert visible(store, *names, "late") == set(names)


# --------------------------------------------------------------------------- reconnect


@pytest.mark.parametrize("store", [pytest.param("postgres", marks=pytest.mark.postgres)],
                         indirect=True)
def test_a_killed_connection_is_replaced_after_the_failed_batch(
        store: Store, make_committer: Callable[..., GroupCommitter]) -> None:
    """PostgreSQL only: its server can drop the committer's connection (a restart)."""
    import psycopg2

    committer = make_committer()

    def backend_pid() -> int:
        return int(store.db.execute_sql("SELECT pg_backend_pid()").fetchone()[0])

    async def main() -> tuple[int, BaseException | int, int]:
        pid = await committer.submit_async(backend_pid)
        admin = psycopg2.connect(host=PG_HOST, user="postgres", dbname="postgres")
        try:
            with admin.cursor() as cur:
                cur.execute("SELECT pg_terminate_backend(%s)", (pid,))
        finally:
            admin.close()
        try:
            failed: BaseException | int = await committer.submit_async(backend_pid)
        except Exception as exc:
            failed = exc
        return pid, failed, await committer.submit_async(backend_pid)

    pid, failed, new_pid = run(main())
    assert isinstance(failed, Exception)  # the batch on the dead connection failed (451)
    assert new_pid != pid  # and the next one ran on a new connection


# --------------------------------------------------------------------------- outbox wake


def test_after_queue_runs_only_after_a_batch_that_queued_outbox_rows(
        store: Store, company_id: int, make_committer: Callable[..., GroupCommitter]) -> None:
    from crmstore.outbox import enqueue

    woken: list[int] = []
    committer = make_committer(after_queue=lambda: woken.append(1))

    def queue_one(extra: Callable[[], None] | None = None) -> Callable[[], None]:
        def job() -> None:
            enqueue(b"Subject: x\r\n\r\nbody\r\n", kind="notice", mail_from="",
                    recipients=["alice@example.com"], now=datetime(2026, 11, 26, 9, 0))
            if extra is not None:
                extra()
        return job

    def boom() -> None:
        raise RuntimeError("rolled back with its outbox row")

    async def one(job: Callable[[], Any]) -> Any:
        try:
            return await committer.submit_async(job)
        except RuntimeError:
            return None

    async def main() -> list[int]:
        seen = []
        await one(org_job(company_id, "first"))  # the first batch wakes once (unknown)
        seen.append(len(woken))
        await one(org_job(company_id, "second"))
        seen.append(len(woken))
        await one(queue_one())
        seen.append(len(woken))
        await one(org_job(company_id, "third"))
        seen.append(len(woken))
        await one(queue_one(extra=boom))  # its row rolled back: nothing new to send
        seen.append(len(woken))
        return seen

    assert run(main()) == [1, 1, 2, 2, 2]


# --------------------------------------------------------------------------- prepared jobs


def test_submit_prepared_answers_or_commits_from_the_worker_thread(
        store: Store, company_id: int, commits: list[int],
        make_committer: Callable[..., GroupCommitter]) -> None:
    from concurrent.futures import ThreadPoolExecutor

    committer = make_committer()
    worker_threads: list[str] = []

    def prepare(name: str) -> Callable[[], Any]:
        def run() -> Any:
            worker_threads.append(threading.current_thread().name)
            if name == "refuse":
                return "550 no"  # a final answer: nothing is queued
            if name == "broken":
                raise ValueError("prepare failed")
            return org_job(company_id, name)
        return run

    async def main(executor: ThreadPoolExecutor) -> list[Any]:
        jobs = [committer.submit_prepared(executor, prepare(n), callable)
                for n in ("p1", "refuse", "broken", "p2")]
        return list(await asyncio.gather(*jobs, return_exceptions=True))

    with ThreadPoolExecutor(2, thread_name_prefix="prep") as executor:
        results = run(main(executor))
        assert results[1] == "550 no"
        assert isinstance(results[2], ValueError) and str(results[2]) == "prepare failed"
        assert {m.Organization.get_by_id(results[0]).name,
                m.Organization.get_by_id(results[3]).name} == {"p1", "p2"}
        assert visible(store, "p1", "p2") == {"p1", "p2"}  # answered after the commit
        assert all(name.startswith("prep") for name in worker_threads)
        committer.stop(WAIT)


        async def late() -> Any:
            return await committer.submit_prepared(executor, prepare("late"), callable)

        with pytest.raises(CommitterStopped):
            run(late())
    assert visible(store, "late") == set()


def test_a_job_alone_in_its_batch_fails_without_a_trace_and_the_next_one_commits(
        store: Store, company_id: int, commits: list[int],
        make_committer: Callable[..., GroupCommitter]) -> None:
    """A lone job runs without a savepoint: its failure rolls the whole transaction back."""
    committer = make_committer()

    def boom() -> None:
        raise RuntimeError("lone job failed after writing")

    async def main() -> tuple[Any, Any]:
        try:
            await committer.submit_async(org_job(company_id, "lone", extra=boom))
        except RuntimeError as exc:
            failed: Any = exc
        after = await committer.submit_async(org_job(company_id, "next"))
        return failed, after

    failed, after = run(main())
    assert str(failed) == "lone job failed after writing"
    assert commits == [1]  # only "next" was committed
    assert visible(store, "lone", "next") == {"next"}
    assert m.Organization.get_by_id(after).name == "next"
