"""Digests: content (golden text and HTML in English and Japanese), privacy of the listing,
template and HTML injection, scheduling across daylight-saving changes, once-only sending
across an interrupted run, and the ``dealmail digest`` command.

Goldens live in ``tests/digest/golden/``; regenerate them after an intended change with
``UPDATE_GOLDEN=1 python -m pytest tests/digest -q`` and review the diff.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email import message_from_bytes, policy
from pathlib import Path
from typing import Any

import pytest
from digest_world import T0, World, after, make_world, naive

from crmstore import models as m
from dealmail.cli import main as cli_main
from dealmail.clock import FakeClock
from dealmail.config import User
from digest import scheduler as scheduler_module
from digest.digests import compose_digest, queue_digest, render_digest
from digest.scheduler import DigestScheduler, current_slot

GOLDEN = Path(__file__).resolve().parent / "golden"
SINCE = T0 - timedelta(hours=1)
UNTIL = T0 + timedelta(days=1)
INJECTION = "Intro {{ 7*7 }} <script>alert(1)</script>"


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    yield from make_world(tmp_path)


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return
    if not path.exists():
        pytest.fail(f"golden file {path} is missing: run with UPDATE_GOLDEN=1 and review it")
    assert text == path.read_text(encoding="utf-8"), f"{name} differs from its golden file"


def scenario(w: World) -> dict[str, m.Email]:
    """Alice (en, Paris, owns Renewal 2027 and Upsell seats) and Bob (ja, Tokyo, owns
    Pilot), with every kind of digest entry."""
    ann, carl = w.person("ann@customer.test"), w.person("carl@other.test")
    pilot, renewal = w.deal("Pilot"), w.deal("Renewal 2027")
    e: dict[str, m.Email] = {}
    e["offer"] = w.email("Offer", sightings=[("alice@example.com", "shared")], person=ann,
                         date=after(1), snippet="Hello Ann,\nhere is our offer.")
    m.PendingChoice.create(
        user=w.users["alice@example.com"], email=e["offer"], thread=e["offer"].thread,
        person=ann, candidates_json=json.dumps([renewal.id, w.deal("Upsell seats").id]),
        state="asked", created_at=naive(after(1)), asked_at=naive(after(1.1)))
    pilot_thread = w.thread("pilot plan", deal=pilot)
    e["pilot"] = w.email("Pilot plan", sightings=[("alice@example.com", "shared")],
                         to=[("Carl Other", "carl@other.test")], person=carl, deal=pilot,
                         thread=pilot_thread, date=after(2))
    e["pilot_ja"] = w.email("見積もりのご案内", sightings=[("bob@example.com", "shared")],
                            frm=("Bob Seller", "bob@example.com"),
                            to=[("Carl Other", "carl@other.test")], person=carl, deal=pilot,
                            thread=pilot_thread, date=after(3))
    # Bob's private mail on Alice's deal: the deal's owner still may not see it.
    e["private"] = w.email("Bob private terms", sightings=[("bob@example.com", "private")],
                           frm=("Bob Seller", "bob@example.com"), person=ann, deal=renewal,
                           date=after(4))
    zed = w.new_person("Zed <b>bold</b>", "zed@newco.test", at=after(5))
    e["inject"] = w.email(INJECTION, sightings=[("alice@example.com", "shared")],
                          to=[("Zed <b>bold</b>", "zed@newco.test")], person=zed,
                          date=after(5))
    e["internal"] = w.email("Lunch", sightings=[("alice@example.com", "shared")],
                            to=[("Bob Seller", "bob@example.com")], date=after(6))
    e["stranger"] = w.email("Hello stranger", sightings=[("alice@example.com", "shared")],
                            to=[("", "someone@mail.test")], date=after(7))
    e["forged"] = w.email("Forged wire instructions",
                          sightings=[("alice@example.com", "quarantined")], date=after(8))
    m.AuditEntry.create(at=naive(after(9)), company=w.company_id, actor="alice@example.com",
                        action="replay", email=e["offer"],
                        detail_json=json.dumps({"client_ip": "198.51.100.4",
                                                "envelope_from": "mallory@evil.test"}))
    return e


def rendered(w: World, user: str) -> tuple[str, str, str]:
    digest = compose_digest(w.config, user, SINCE, UNTIL, UNTIL)
    return render_digest(digest)


@pytest.mark.parametrize("user,name", [("alice@example.com", "digest_alice_en"),
                                       ("bob@example.com", "digest_bob_ja")])
def test_digest_golden(world: World, user: str, name: str) -> None:
    scenario(world)
    subject, text, html = rendered(world, user)
    check_golden(f"{name}.txt", f"Subject: {subject}\n\n{text}")
    check_golden(f"{name}.html", html)


def test_digest_groups_and_lists_every_kind(world: World) -> None:
    scenario(world)
    digest = compose_digest(world.config, "alice@example.com", SINCE, UNTIL, UNTIL)
    c = digest.context
    assert [d["title"] for d in c["by_deal"]] == ["Pilot"]
    assert [g["person"]["name"] for g in c["by_person"]] == ["Ann Customer", "Zed <b>bold</b>"]
    assert {e["subject"]: e["reason"] for e in c["no_person"]} == {
        "Lunch": "internal", "Hello stranger": "unknown"}
    [pending] = c["pending"]
    assert [x["title"] for x in pending["candidates"]] == ["Renewal 2027", "Upsell seats"]
    assert [(r["kind"], r["subject"]) for r in c["refused"]] == [
        ("quarantined", None), ("replayed", "Offer")]
    assert [p["addresses"] for p in c["auto_persons"]] == [["zed@newco.test"]]
    _subject, text, _html = render_digest(digest)
    assert "Forged wire instructions" not in text  # quarantined: listed, never shown
    assert "Bob private terms" not in text  # private to Bob, admins and deal owners included
    assert "198.51.100.4" in text and "mallory@evil.test" in text


def test_bob_sees_shared_mail_on_his_deal_but_not_alices_quarantine(world: World) -> None:
    scenario(world)
    _s, text, _h = rendered(world, "bob@example.com")
    assert "Pilot plan" in text and "見積もりのご案内" in text and "Bob private terms" in text
    for secret in ("Forged wire instructions", "Hello stranger", "Lunch", "198.51.100.4"):
        assert secret not in text


def test_template_and_html_injection_render_literally(world: World) -> None:
    scenario(world)
    _s, text, html = rendered(world, "alice@example.com")
    assert INJECTION in text and "Zed <b>bold</b>" in text
    assert "49" not in text.replace("2049", "")
    assert "<script>" not in html and "<b>bold" not in html
    assert "Intro {{ 7*7 }} &lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "Zed &lt;b&gt;bold&lt;/b&gt;" in html


def test_empty_digest_is_empty_and_not_queued(world: World) -> None:
    digest = compose_digest(world.config, "alice@example.com", SINCE, UNTIL, UNTIL)
    assert digest.empty
    sched = DigestScheduler(world.store, lambda: world.config, FakeClock(UNTIL))
    assert sched.run_once(after(30)) == {}
    assert m.OutboxItem.select().count() == 0


def test_digest_message_headers(world: World) -> None:
    scenario(world)
    digest = compose_digest(world.config, "alice@example.com", SINCE, UNTIL, UNTIL)
    with world.store.transaction():
        ids = queue_digest(world.config, digest, "D2026-11-27", UNTIL)
        assert queue_digest(world.config, digest, "D2026-11-27", UNTIL) == []
    [item] = m.OutboxItem.select().where(m.OutboxItem.id.in_(ids))
    assert item.kind == "digest" and item.mail_from == ""
    assert json.loads(item.recipients_json) == ["alice@example.com"]
    msg = message_from_bytes(bytes(item.message), policy=policy.default)
    assert msg["Auto-Submitted"] == "auto-generated"
    assert msg["X-Dealmail-Auto"] == "digest"
    assert {p.get_content_type() for p in msg.iter_parts()} == {"text/plain", "text/html"}


# --------------------------------------------------------------------------- scheduling


def alice(digest: str = "daily") -> User:
    return User(address="alice@example.com", company="example", timezone="Europe/Paris",
                digest=digest)


@pytest.mark.parametrize("now,period,local", [
    # Before the spring change (CET, UTC+1) and after it (CEST, UTC+2): 08:00 local both days.
    (datetime(2026, 3, 28, 7, 0, tzinfo=UTC), "D2026-03-28", "2026-03-28 08:00"),
    (datetime(2026, 3, 29, 5, 59, tzinfo=UTC), "D2026-03-28", "2026-03-28 08:00"),
    (datetime(2026, 3, 29, 6, 0, tzinfo=UTC), "D2026-03-29", "2026-03-29 08:00"),
    # Autumn: CEST on the 24th, CET from the 25th.
    (datetime(2026, 10, 24, 6, 0, tzinfo=UTC), "D2026-10-24", "2026-10-24 08:00"),
    (datetime(2026, 10, 25, 6, 59, tzinfo=UTC), "D2026-10-24", "2026-10-24 08:00"),
    (datetime(2026, 10, 25, 7, 0, tzinfo=UTC), "D2026-10-25", "2026-10-25 08:00"),
])
def test_slot_is_0800_local_across_dst(now: datetime, period: str, local: str) -> None:
    from zoneinfo import ZoneInfo

    slot = current_slot(alice(), now)
    assert slot is not None and slot.period == period
    assert slot.at.astimezone(ZoneInfo("Europe/Paris")).strftime("%Y-%m-%d %H:%M") == local


def test_weekly_and_off_slots() -> None:
    thursday = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
    slot = current_slot(alice("weekly"), thursday)
    assert slot is not None and slot.period == "W2026-11-23"  # the Monday
    monday_early = datetime(2026, 11, 30, 6, 0, tzinfo=UTC)  # 07:00 in Paris
    slot = current_slot(alice("weekly"), monday_early)
    assert slot is not None and slot.period == "W2026-11-23"
    assert current_slot(alice("off"), thursday) is None


def digest_items(user: str) -> list[m.OutboxItem]:
    return list(m.OutboxItem.select().where((m.OutboxItem.kind == "digest")
                                            & m.OutboxItem.dedupe_key.startswith(
                                                f"digest:{user}:")).order_by(m.OutboxItem.id))


@pytest.mark.parametrize("days", [
    [datetime(2026, 3, 27, 12, 0, tzinfo=UTC), datetime(2026, 3, 28, 12, 0, tzinfo=UTC)],
    [datetime(2026, 10, 23, 12, 0, tzinfo=UTC), datetime(2026, 10, 24, 12, 0, tzinfo=UTC)],
], ids=["march", "october"])
def test_scheduler_across_dst_sends_at_0800_paris(world: World, days: list[datetime]) -> None:
    """An email each afternoon; the FakeClock walks minute by minute around 08:00 local."""
    clock = FakeClock(days[0])
    sched = DigestScheduler(world.store, lambda: world.config, clock)
    sent_at: list[str] = []
    for day in days:
        world.email(f"Mail of {day:%m-%d}", sightings=[("alice@example.com", "shared")],
                    person=world.person("dora@customer.test"),
                    to=[("Dora", "dora@customer.test")], date=day, received=day)
        next_day = day + timedelta(days=1)
        for minutes in range(4 * 60, 8 * 60, 1):  # 04:00..07:59 UTC of the next day
            now = next_day.replace(hour=0) + timedelta(minutes=minutes)
            clock.set(now)
            if sched.run_once(now).get("alice@example.com"):
                from zoneinfo import ZoneInfo

                sent_at.append(now.astimezone(ZoneInfo("Europe/Paris")).strftime("%H:%M"))
    assert sent_at == ["08:00", "08:00"]
    items = digest_items("alice@example.com")
    assert len(items) == 2
    # The second digest covers only what came after the first.
    second = message_from_bytes(bytes(items[1].message), policy=policy.default)
    body = second.get_body(("plain",))
    assert body is not None
    text = body.get_content()
    assert f"Mail of {days[1]:%m-%d}" in text and f"Mail of {days[0]:%m-%d}" not in text


def test_interrupted_run_then_restart_sends_each_digest_once(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    scenario(world)
    now = datetime(2026, 11, 27, 9, 0, tzinfo=UTC)  # after 08:00 in Paris and in Tokyo
    real = scheduler_module.compose_digest
    calls: list[str] = []

    def crash_for_bob(config: Any, address: str, *args: Any) -> Any:
        calls.append(address)
        if address == "bob@example.com":
            raise RuntimeError("process killed here")
        return real(config, address, *args)

    monkeypatch.setattr(scheduler_module, "compose_digest", crash_for_bob)
    first = DigestScheduler(world.store, lambda: world.config, FakeClock(now))
    assert list(first.run_once(now)) == ["alice@example.com"]

    # A crash after queueing but before the commit leaves nothing behind either.
    def crash_after_queue(config: Any, digest: Any, period: str, when: Any) -> Any:
        scheduler_module_queue(config, digest, period, when)
        raise RuntimeError("killed before commit")

    scheduler_module_queue = scheduler_module.queue_digest
    monkeypatch.setattr(scheduler_module, "compose_digest", real)
    monkeypatch.setattr(scheduler_module, "queue_digest", crash_after_queue)
    crashed = DigestScheduler(world.store, lambda: world.config, FakeClock(now))
    assert crashed.run_once(now) == {}
    assert digest_items("bob@example.com") == []

    monkeypatch.setattr(scheduler_module, "queue_digest", scheduler_module_queue)
    for _restart in range(3):  # restarts, and repeated polls, in the same period
        restarted = DigestScheduler(world.store, lambda: world.config, FakeClock(now))
        restarted.run_once(now)
        restarted.run_once(now + timedelta(minutes=5))
    assert len(digest_items("alice@example.com")) == 1
    assert len(digest_items("bob@example.com")) == 1
    assert m.AuditEntry.select().where(m.AuditEntry.action == "digest").count() == 2


def test_digest_covers_since_the_last_one(world: World) -> None:
    world.email("First", sightings=[("alice@example.com", "shared")],
                person=world.person("dora@customer.test"), to=[("Dora", "dora@customer.test")],
                date=after(1))
    sched = DigestScheduler(world.store, lambda: world.config, FakeClock(T0))
    day2 = datetime(2026, 11, 27, 7, 30, tzinfo=UTC)
    assert sched.run_once(day2)
    world.email("Second", sightings=[("alice@example.com", "shared")],
                person=world.person("dora@customer.test"), to=[("Dora", "dora@customer.test")],
                date=day2 + timedelta(hours=1))
    day3 = day2 + timedelta(days=1)
    assert sched.run_once(day3)
    texts = []
    for item in digest_items("alice@example.com"):
        msg = message_from_bytes(bytes(item.message), policy=policy.default)
        body = msg.get_body(("plain",))
        assert body is not None
        texts.append(body.get_content())
    assert "First" in texts[0] and "Second" not in texts[0]
    assert "Second" in texts[1] and "First" not in texts[1]


# --------------------------------------------------------------------------- command line


def test_cli_digest_dry_run_then_queue(world: World, capsys: pytest.CaptureFixture[str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    now = datetime.now(UTC)
    world.email("Fresh news", sightings=[("alice@example.com", "shared")],
                person=world.person("dora@customer.test"), to=[("Dora", "dora@customer.test")],
                date=now - timedelta(hours=2), received=now - timedelta(hours=2))
    world.store.close()
    args = ["--config", str(world.config.path),
            "--set", f"database.url={world.config.database.url}"]
    assert cli_main([*args, "digest", "--user", "alice@example.com", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "Subject: Your dealmail digest: 1 email(s)" in out and "Fresh news" in out
    assert "Auto-Submitted: auto-generated" in out
    world.store.open()
    assert m.OutboxItem.select().count() == 0  # a dry run queues nothing
    world.store.close()
    assert cli_main([*args, "digest", "--user", "alice@example.com"]) == 0
    assert "queued as outbox #" in capsys.readouterr().out
    # Nothing new since that digest: the next one is empty and not sent.
    assert cli_main([*args, "digest", "--user", "alice@example.com"]) == 0
    assert "not sent" in capsys.readouterr().out
    assert cli_main([*args, "digest", "--user", "nobody@example.com"]) == 67
    world.store.open()
    assert m.OutboxItem.select().where(m.OutboxItem.kind == "digest").count() == 1


def test_failing_mailbox_is_told_once(world: World) -> None:
    """A mailbox the IMAP sync cannot read is listed in the digest of the period its trouble
    began, with the server's words (escaped in HTML), and not in the next ones."""
    alice_row = m.User.get(m.User.address == "alice@example.com")
    m.MailboxAccount.create(
        key="alice@example.com/alice@mail.test@imap.mail.test", user=alice_row.id,
        state="failing", last_error="[AUTHENTICATIONFAILED] <Invalid> credentials",
        failures=3, failing_since=naive(after(5)))
    digest = compose_digest(world.config, "alice@example.com", SINCE, UNTIL, UNTIL)
    assert not digest.empty
    _subject, text, html = render_digest(digest)
    assert "== Mailboxes dealmail cannot sync ==" in text
    assert "alice@mail.test: failing since" in text
    assert "[AUTHENTICATIONFAILED] <Invalid> credentials" in text
    assert "&lt;Invalid&gt;" in html
    later = compose_digest(world.config, "alice@example.com", UNTIL,
                           UNTIL + timedelta(days=1), UNTIL + timedelta(days=1))
    assert later.empty  # told once
    bob = compose_digest(world.config, "bob@example.com", SINCE, UNTIL, UNTIL)
    assert "cannot sync" not in render_digest(bob)[1]
