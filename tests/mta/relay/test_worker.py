"""The durable outbox against a real SMTP server (``SmtpSink``) on loopback, with an injected
clock: retries, DSNs, per-recipient outcomes, crash safety, and several worker processes on
PostgreSQL.

docs/reliability.md D.6 cases covered: D.6.1 (schedule and give-up at the lifetime with one
``4.4.7`` DSN), D.6.2 (mixed 250/550/451 recipients), D.6.3 (connection dropped after the
final ``.``: deferred, retried, duplicate at the sink recorded: at-least-once), D.6.7 (DSN from
the null sender to the envelope sender; never a DSN about a null-sender message), D.6.8 (two
worker processes, 1,000 items, every one delivered exactly once; SKIP LOCKED), D.6.9 (a worker
SIGKILLed mid-delivery: claimable after the lease, delivered, attempt counted).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, timedelta
from pathlib import Path
from typing import Any

import pytest

from crmstore import models as m
from crmstore.db import Store
from crmstore.outbox import enqueue
from dealmail.clock import FakeClock, SystemClock, naive_utc
from dealmail.config import Config, OutboxConfig, ServerConfig
from mta.relay.worker import OutboxWorker

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "support"))
from smtpsink import SmtpSink

ROOT = Path(__file__).resolve().parents[3]

# One worker process: claims and delivers until nothing is claimable (drain), or claims one
# batch, says so on stdout and starts delivering (to be killed mid-delivery).
WORKER = r"""
import asyncio, json, sys
from datetime import timedelta
from crmstore.db import Store
from dealmail.clock import SystemClock
from pathlib import Path
from mta.relay.worker import OutboxWorker
from dealmail.config import Config, OutboxConfig

url, port, mode, wid = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
store = Store(url)
store.open()
config = Config(path=Path("test.toml"), outbox=OutboxConfig(
    smarthost=f"127.0.0.1:{port}", smarthost_tls="opportunistic", lease_seconds=600,
    retry_schedule="5m"))
worker = OutboxWorker(store, SystemClock(), lambda: config, worker_id=wid, batch=10)

async def main() -> None:
    if mode == "claim-then-hang":
        items = await asyncio.get_running_loop().run_in_executor(None, worker.claim)
        print(json.dumps([i.id for i in items]), flush=True)
        await worker._attempt(items[0])  # the sink stalls: killed in here
        return
    done = 0
    while (n := await worker.run_once()):
        done += n
    print(json.dumps({"worker": wid, "attempted": done}), flush=True)

asyncio.run(main())
"""


class Outbox:
    """A store, a sink as smarthost, and a worker on a fake clock in one event loop."""

    def __init__(self, store: Store, sink: SmtpSink, clock: FakeClock,
                 give_up: timedelta = timedelta(days=5)) -> None:
        self.store = store
        self.sink = sink
        self.clock = clock
        self.loop = asyncio.new_event_loop()
        config = Config(
            path=Path("test.toml"),
            server=ServerConfig(mail_domain="dealmail.test", hostname="dealmail.test"),
            outbox=OutboxConfig(smarthost=f"127.0.0.1:{sink.port}",
                                smarthost_tls="opportunistic",
                                retry_schedule="5m,10m,20m,40m,1h*200",
                                give_up_after_hours=give_up.total_seconds() / 3600))
        self.worker = OutboxWorker(store, clock, lambda: config)

    def put(self, recipients: list[str], mail_from: str = "alice@example.com",
            tag: str = "1", kind: str = "relay") -> list[int]:
        raw = (f"From: Alice <{mail_from or 'mailer-daemon@dealmail.test'}>\r\n"
               f"To: {', '.join(recipients)}\r\nSubject: offer {tag}\r\n"
               f"Message-ID: <tag-{tag}@example.com>\r\n\r\nbody {tag}\r\n").encode()
        with self.store.transaction():
            return enqueue(raw, kind=kind, mail_from=mail_from, recipients=recipients,
                           now=self.clock.now(), subject=f"offer {tag}")

    def run(self) -> int:
        return self.loop.run_until_complete(self.worker.run_once())

    def item(self, item_id: int) -> m.OutboxItem:
        return m.OutboxItem.get_by_id(item_id)

    def close(self) -> None:
        self.loop.close()


@pytest.fixture
def sink() -> Iterator[SmtpSink]:
    with SmtpSink(starttls=True) as s:
        yield s


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(f"sqlite:///{tmp_path}/outbox.db")
    s.open()
    yield s
    s.close()


@pytest.fixture
def outbox(store: Store, sink: SmtpSink, clock: FakeClock) -> Iterator[Outbox]:
    o = Outbox(store, sink, clock)
    yield o
    o.close()


def dsns(sink: SmtpSink) -> list[Any]:
    return [g for g in sink.messages if g.mail_from == ""]



def test_what_dealmail_composes_is_fitted_at_delivery(outbox: Outbox, store: Store) -> None:
    """A composed message with a header and a body line over 998 octets (a DSN quoting the
    headers of a message that had them, say) is fitted when it is sent: the sink, like a
    strict MTA, would refuse it (its 500 would turn into a DSN about dealmail's own mail)."""
    refs = " ".join(f"<{i}@example.com>" for i in range(120))
    raw = (f"From: MAILER-DAEMON@dealmail.test\r\nTo: alice@example.com\r\n"
           f"Subject: notice\r\nReferences: {refs}\r\n\r\n{'y' * 3000}\r\n").encode()
    with store.transaction():
        enqueue(raw, kind="dsn", mail_from="", recipients=["alice@example.com"],
                now=outbox.clock.now())
    assert outbox.run() == 1
    data = outbox.sink.messages[0].data
    assert max(len(line) for line in data.split(b"\r\n")) <= 998
    assert b"y" * 70 in data and b"<119@example.com>" in data
    assert m.OutboxItem.get().state == "sent"

def test_temporary_failure_then_success(outbox: Outbox, clock: FakeClock) -> None:
    [item_id] = outbox.put(["ann@customer.test"])
    outbox.sink.script(data="451 4.3.0 busy, try later")
    assert outbox.run() == 1
    item = outbox.item(item_id)
    assert (item.state, item.attempts) == ("queued", 1)
    assert item.next_attempt_at == naive_utc(clock.now() + timedelta(minutes=5))
    assert "451 4.3.0 busy" in item.last_error
    assert outbox.run() == 0  # not due yet
    clock.advance(timedelta(minutes=5))
    outbox.sink.script()
    assert outbox.run() == 1
    item = outbox.item(item_id)
    assert (item.state, item.attempts) == ("sent", 2)
    assert [g.rcpt_tos for g in outbox.sink.messages] == [["ann@customer.test"]]
    assert outbox.sink.messages[0].tls  # opportunistic STARTTLS was used


def test_permanent_failure_sends_one_dsn_from_the_null_sender(outbox: Outbox) -> None:
    [item_id] = outbox.put(["ann@customer.test"])
    outbox.sink.script(rcpt={"ann@customer.test": "550 5.1.1 no such user"})
    assert outbox.run() == 1
    assert outbox.item(item_id).state == "failed"
    [dsn] = list(m.OutboxItem.select().where(m.OutboxItem.kind == "dsn"))
    assert dsn.mail_from == "" and json.loads(dsn.recipients_json) == ["alice@example.com"]
    assert outbox.run() == 1
    [got] = dsns(outbox.sink)
    assert got.rcpt_tos == ["alice@example.com"]
    text = got.data.decode()
    assert "multipart/report" in text and "report-type=\"delivery-status\"" in text
    assert "Action: failed" in text and "Status: 5.1.1" in text
    assert "Final-Recipient: rfc822; ann@customer.test" in text
    assert "Message-ID: <tag-1@example.com>" in text  # the original headers are attached


def test_no_dsn_about_a_null_sender_message(outbox: Outbox) -> None:
    # A DSN that itself fails is not bounced again (RFC 3464 §2, RFC 5321 §6.2).
    [item_id] = outbox.put(["alice@example.com"], mail_from="", kind="dsn")
    outbox.sink.script(rcpt={"alice@example.com": "550 5.1.1 gone"})
    assert outbox.run() == 1
    assert outbox.item(item_id).state == "failed"
    assert m.OutboxItem.select().count() == 1
    assert outbox.run() == 0


def test_mixed_recipients_250_550_451(outbox: Outbox, clock: FakeClock) -> None:
    rcpts = ["ann@customer.test", "dora@customer.test", "carl@customer.test"]
    [item_id] = outbox.put(rcpts)
    outbox.sink.script(rcpt={"dora@customer.test": "550 5.1.1 no such user",
                             "carl@customer.test": "451 4.2.1 mailbox busy"})
    assert outbox.run() == 1
    assert [g.rcpt_tos for g in outbox.sink.messages] == [["ann@customer.test"]]
    item = outbox.item(item_id)
    assert item.state == "queued" and json.loads(item.recipients_json) == ["carl@customer.test"]
    [dsn] = list(m.OutboxItem.select().where(m.OutboxItem.kind == "dsn"))
    assert "dora@customer.test" in bytes(dsn.message).decode()
    assert "carl@customer.test" not in bytes(dsn.message).decode().split("\r\n\r\n", 2)[1]

    clock.advance(timedelta(minutes=5))
    outbox.sink.script()
    assert outbox.run() == 2  # carl's retry and the DSN
    delivered = [r for g in outbox.sink.messages if g.mail_from for r in g.rcpt_tos]
    assert Counter(delivered) == {"ann@customer.test": 1, "carl@customer.test": 1}
    assert outbox.sink.messages[-1].rcpt_tos in (["carl@customer.test"], ["alice@example.com"])
    assert outbox.item(item_id).state == "sent"
    assert len(dsns(outbox.sink)) == 1


def test_give_up_after_the_schedule(store: Store, sink: SmtpSink, clock: FakeClock) -> None:
    outbox = Outbox(store, sink, clock, give_up=timedelta(hours=3))
    start = clock.now()
    [item_id] = outbox.put(["ann@customer.test"])
    sink.script(data="451 4.3.0 still busy")
    offsets = []
    while outbox.item(item_id).state == "queued":
        offsets.append((clock.now() - start) / timedelta(minutes=1))
        assert outbox.run() >= 1
        item = outbox.item(item_id)
        if item.state == "queued":
            clock.set(item.next_attempt_at.replace(tzinfo=UTC))
    # 5m doubling to 1h; the last attempt exactly at the 3 h lifetime, then give up.
    assert offsets == [0, 5, 15, 35, 75, 135, 180]
    item = outbox.item(item_id)
    assert (item.state, item.attempts) == ("failed", 7)
    sink.script()
    assert outbox.run() == 1
    [got] = dsns(sink)
    text = got.data.decode()
    assert "Action: failed" in text and "Status: 4.4.7" in text
    assert "Diagnostic-Code: smtp; 451 4.3.0 still busy" in text
    outbox.close()


def test_connection_dropped_after_data_is_retried(outbox: Outbox, clock: FakeClock) -> None:
    [item_id] = outbox.put(["ann@customer.test"])
    outbox.sink.script(drop_after_data=True)
    assert outbox.run() == 1
    assert outbox.item(item_id).state == "queued"
    assert "may have been delivered" in outbox.item(item_id).last_error
    clock.advance(timedelta(minutes=5))
    outbox.sink.script()
    assert outbox.run() == 1
    # At-least-once: the sink recorded the first copy before the drop, then the retry.
    assert len(outbox.sink.messages) == 2
    assert outbox.item(item_id).state == "sent"


def _worker(url: str, port: int, mode: str, wid: str) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-c", WORKER, url, str(port), mode, wid],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)


def test_worker_killed_mid_delivery(tmp_path: Path, sink: SmtpSink) -> None:
    url = f"sqlite:///{tmp_path}/outbox.db"
    store = Store(url)
    store.open()
    clock = FakeClock(SystemClock().now())  # the worker process uses the real clock
    outbox = Outbox(store, sink, clock)
    [item_id] = outbox.put(["ann@customer.test"])
    sink.script(stall_data=20)  # the sink holds the final reply: the worker is mid-DATA
    proc = _worker(url, sink.port, "claim-then-hang", "doomed")
    assert proc.stdout is not None
    assert json.loads(proc.stdout.readline()) == [item_id]
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    item = outbox.item(item_id)
    assert (item.state, item.attempts) == ("queued", 1)  # the attempt was counted
    assert item.lease_until is not None
    sink.script()
    assert outbox.run() == 0  # still leased by the dead worker
    clock.advance(timedelta(minutes=10, seconds=1))
    assert outbox.run() == 1
    item = outbox.item(item_id)
    assert (item.state, item.attempts) == ("sent", 2)
    assert [g.rcpt_tos for g in sink.messages] == [["ann@customer.test"]]
    outbox.close()
    store.close()


def test_two_processes_deliver_1000_items_exactly_once_on_postgresql(pg_url: str) -> None:
    store = Store(pg_url)
    store.open()
    now = SystemClock().now()
    with SmtpSink() as sink:
        with store.transaction():
            for i in range(1000):
                raw = (f"From: alice@example.com\r\nTo: c{i}@customer{i % 7}.test\r\n"
                       f"Subject: item {i}\r\nX-Tag: {i}\r\n\r\nbody {i}\r\n").encode()
                enqueue(raw, kind="relay", mail_from="alice@example.com",
                        recipients=[f"c{i}@customer{i % 7}.test"], now=now)
        procs = [_worker(pg_url, sink.port, "drain", f"w{n}") for n in range(2)]
        reports = []
        for proc in procs:
            out, _ = proc.communicate(timeout=300)
            assert proc.returncode == 0
            reports.append(json.loads(out.strip().splitlines()[-1]))
        tags: Counter[int] = Counter()
        for g in sink.messages:
            header = g.data.split(b"\r\n\r\n", 1)[0]
            tag = next(line for line in header.split(b"\r\n") if line.startswith(b"X-Tag:"))
            tags[int(tag.split(b":")[1])] += 1
    assert sum(r["attempted"] for r in reports) == 1000
    assert len(tags) == 1000 and set(tags.values()) == {1}
    states = Counter(i.state for i in m.OutboxItem.select())
    assert states == {"sent": 1000}
    assert {i.attempts for i in m.OutboxItem.select()} == {1}
    print("per-worker attempts:", reports)
    store.close()


def test_next_due_is_the_earliest_claimable_time(outbox: Outbox, clock: FakeClock) -> None:
    """The worker sleeps until this instead of polling: the earliest next attempt of a queued
    item, or the end of a lease still held; None when nothing is queued."""
    assert outbox.worker.next_due() is None
    now = naive_utc(clock.now())
    [a] = outbox.put(["ann@customer.test"], tag="a")
    [b] = outbox.put(["bob@customer.test"], tag="b")
    m.OutboxItem.update(next_attempt_at=now + timedelta(minutes=10)).where(
        m.OutboxItem.id == a).execute()
    m.OutboxItem.update(next_attempt_at=now + timedelta(minutes=3),
                        lease_until=now + timedelta(minutes=7)).where(
        m.OutboxItem.id == b).execute()
    assert outbox.worker.next_due() == now + timedelta(minutes=7)  # b's lease ends first
    m.OutboxItem.update(state="sent").where(m.OutboxItem.id == b).execute()
    assert outbox.worker.next_due() == now + timedelta(minutes=10)
    m.OutboxItem.update(state="failed").where(m.OutboxItem.id == a).execute()
    assert outbox.worker.next_due() is None
