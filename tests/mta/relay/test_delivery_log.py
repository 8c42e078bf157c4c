"""The delivery log a Postfix admin can follow: one line per recipient per attempt with the
queue id, Message-ID, recipient, relay host[ip]:port, delay, tries, dsn and status with the
remote reply; the same facts as keys of the JSON line; and the delivery counters."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from pathlib import Path

import pytest

from crmstore.db import Store
from crmstore.outbox import enqueue
from dealmail.clock import FakeClock
from dealmail.config import Config, OutboxConfig
from dealmail.logs import JsonFormatter
from mta.metrics import Metrics
from mta.relay.worker import OutboxWorker

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "support"))
from smtpsink import SmtpSink


def test_one_line_per_recipient_per_attempt(tmp_path: Path, clock: FakeClock,
                                            caplog: pytest.LogCaptureFixture) -> None:
    store = Store(f"sqlite:///{tmp_path}/o.db")
    store.open()
    metrics = Metrics()
    with SmtpSink() as sink:
        sink.script(rcpt={"gone@customer.test": "550 5.1.1 no such user",
                          "busy@customer.test": "450 4.2.1 mailbox busy"})
        config = Config(path=Path("t.toml"), outbox=OutboxConfig(
            smarthost=f"127.0.0.1:{sink.port}", smarthost_tls="opportunistic",
            retry_schedule="5m"))
        worker = OutboxWorker(store, clock, lambda: config, metrics=metrics)
        raw = (b"From: Alice <alice@example.com>\r\nTo: ann@customer.test\r\n"
               b"Subject: offer\r\nMessage-ID: <offer-1@example.com>\r\n\r\nhello\r\n")
        with store.transaction():
            [item] = enqueue(raw, kind="relay", mail_from="alice@example.com",
                             recipients=["ann@customer.test", "gone@customer.test",
                                         "busy@customer.test"], now=clock.now())
        caplog.set_level(logging.INFO, "dealmail.outbox")
        loop = asyncio.new_event_loop()
        try:
            assert loop.run_until_complete(worker.run_once()) == 1
        finally:
            loop.close()
    store.close()
    records = [r for r in caplog.records if r.name == "dealmail.outbox"]
    lines = {r.fields["to"]: r.getMessage() for r in records}  # type: ignore[attr-defined]
    relay = f"relay=127.0.0.1[127.0.0.1]:{sink.port}"
    assert lines["ann@customer.test"].startswith(
        f"outbox#{item}: message-id=<offer-1@example.com>, to=<ann@customer.test>, {relay}, "
        "delay=0.00, tries=1, dsn=2.0.0, status=sent (250 ")
    assert lines["gone@customer.test"].endswith(
        "dsn=5.1.1, status=bounced (550 5.1.1 no such user)")
    assert ", dsn=4.2.1, status=deferred (450 4.2.1 mailbox busy; next attempt " \
        "2026-11-26 09:05:00 UTC)" in lines["busy@customer.test"]
    assert len(records) == 3
    data = json.loads(JsonFormatter().format(next(
        r for r in records if "gone@" in r.getMessage())))
    assert data["to"] == "gone@customer.test" and data["status"] == "bounced"
    assert data["relay"] == relay.removeprefix("relay=") and data["dsn"] == "5.1.1"
    assert data["message_id"] == "<offer-1@example.com>" and data["queue_id"] == f"outbox#{item}"
    counts = {s.labels["status"]: s.value for s in metrics.deliveries.collect()[0].samples
              if s.name.endswith("_total")}
    assert counts == {"sent": 1.0, "bounced": 1.0, "deferred": 1.0}


def test_no_route_logs_relay_none(tmp_path: Path, clock: FakeClock,
                                  caplog: pytest.LogCaptureFixture) -> None:
    store = Store(f"sqlite:///{tmp_path}/o.db")
    store.open()
    config = Config(path=Path("t.toml"), outbox=OutboxConfig(
        smarthost="127.0.0.1:9", smarthost_tls="opportunistic", retry_schedule="5m"))
    worker = OutboxWorker(store, clock, lambda: config, timeout=5)
    with store.transaction():
        enqueue(b"From: a@example.com\r\nSubject: x\r\n\r\nx\r\n", kind="relay",
                mail_from="a@example.com", recipients=["ann@customer.test"], now=clock.now())
    caplog.set_level(logging.INFO, "dealmail.outbox")
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(worker.run_once())
    finally:
        loop.close()
        store.close()
    [line] = [r.getMessage() for r in caplog.records if r.name == "dealmail.outbox"]
    assert "message-id=-, to=<ann@customer.test>, relay=none," in line
    assert "dsn=4.4.1, status=deferred (cannot connect to 127.0.0.1:9" in line
