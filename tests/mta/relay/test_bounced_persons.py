"""A relayed mail to a mistyped address that hard-bounces (5.1.x) leaves no "nobody" person:
the person that mail created is removed (and so never shown or asked about); a person who
ever wrote to us, has a deal, or bounced for another reason (mailbox full, policy) stays."""

from __future__ import annotations

import asyncio
import sys
from datetime import datetime
from pathlib import Path

from crmstore import models as m
from crmstore.db import Store
from crmstore.outbox import enqueue
from dealmail.clock import FakeClock
from dealmail.config import Config, OutboxConfig
from mta.relay.worker import OutboxWorker

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "support"))
from smtpsink import SmtpSink

NOW = datetime(2026, 11, 26, 9, 0)


def person(company: m.Company, address: str, *, auto: bool = True, wrote: bool = False,
           thread: m.Thread) -> int:
    p = m.Person.create(company=company, name=address.split("@")[0], auto_created=auto,
                        created_at=NOW)
    m.PersonAddress.create(person=p, company=company, address=address)
    email = m.Email.create(company=company, dedupe_key=f"k-{address}", content_hash="h",
                           thread=thread, date=NOW, raw=b"x", created_at=NOW,
                           from_address=address if wrote else "alice@example.com")
    m.Participant.create(email=email, address=address, role="from" if wrote else "to", person=p)
    m.Link.create(email=email, person=p, source="auto", created_at=NOW)
    return int(p.id)


def test_a_hard_bounce_removes_the_nobody_person(tmp_path: Path, clock: FakeClock) -> None:
    store = Store(f"sqlite:///{tmp_path}/o.db")
    store.open()
    with store.transaction():
        company = m.Company.create(slug="example", name="Example")
        thread = m.Thread.create(company=company, subject_key="x", created_at=NOW, last_at=NOW)
        typo = person(company, "ann@custmer.test", thread=thread)
        real = person(company, "carl@other.test", wrote=True, thread=thread)
        full = person(company, "dora@customer.test", thread=thread)
        imported = person(company, "zed@newco.test", auto=False, thread=thread)
    rcpts = ["ann@custmer.test", "carl@other.test", "dora@customer.test", "zed@newco.test"]
    with SmtpSink() as sink:
        sink.script(rcpt={"ann@custmer.test": "550 5.1.1 no such user",
                          "carl@other.test": "550 5.1.1 no such user",
                          "dora@customer.test": "552 5.2.2 mailbox full",
                          "zed@newco.test": "550 5.1.1 no such user"})
        config = Config(path=Path("t.toml"), outbox=OutboxConfig(
            smarthost=f"127.0.0.1:{sink.port}", smarthost_tls="opportunistic"))
        worker = OutboxWorker(store, clock, lambda: config)
        with store.transaction():
            for rcpt in rcpts:  # one item per domain, as enqueue makes them
                enqueue(b"From: alice@example.com\r\nSubject: hi\r\n\r\nhi\r\n", kind="relay",
                        mail_from="alice@example.com", recipients=[rcpt],
                        now=clock.now(), company_id=company.id)
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(worker.run_once())
        finally:
            loop.close()
    remaining = {p.id for p in m.Person.select()}
    assert typo not in remaining
    assert {real, full, imported} <= remaining
    [part] = list(m.Participant.select().where(m.Participant.address == "ann@custmer.test"))
    assert part.person_id is None  # the stored mail keeps the address it was sent to
    [audit] = list(m.AuditEntry.select().where(m.AuditEntry.action == "person-removed"))
    assert "ann@custmer.test" in audit.detail_json
    assert m.OutboxItem.select().where(m.OutboxItem.kind == "dsn").count() == 3
    store.close()
