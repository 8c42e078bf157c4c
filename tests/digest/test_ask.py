"""+ask requests: parsing (English, Japanese, full-width), answers limited by the visibility
rule (admins included) and never a count of what the reader may not see, closest matches,
goldens in English and
Japanese, and end to end over SMTP (verified users only; 550 5.7.1 otherwise, nothing sent).
"""

from __future__ import annotations

import json
import smtplib
import sys
from collections.abc import Iterator
from email import message_from_bytes, policy
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path
from typing import Any

import pytest
from digest_world import T0, World, after, make_world
from test_digests import check_golden, scenario

from crmstore import models as m
from digest.ask import Request, answer_request, parse_request, render_answer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "support"))
from smtpsink import SmtpSink

ASK = "example+ask@dealmail.localhost"


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    yield from make_world(tmp_path)


@pytest.mark.parametrize("subject,body,expected", [
    ("deal 42", "", Request("deal", "42", 42, "deal 42")),
    ("Deal #7", "", Request("deal", "#7", 7, "Deal #7")),
    ("deal Renewal 2027", "", Request("deal", "Renewal 2027", None, "deal Renewal 2027")),
    ("person ann@customer.test", "", Request("person", "ann@customer.test", None,
                                             "person ann@customer.test")),
    ("org Customer Inc", "", Request("org", "Customer Inc", None, "org Customer Inc")),
    ("inbox", "", Request("inbox", raw="inbox")),
    ("HELP", "", Request("help", raw="HELP")),
    ("案件 3", "", Request("deal", "3", 3, "案件 3")),
    ("案件３", "", Request("deal", "3", 3, "案件3")),  # full-width digit, no space
    ("ｄｅａｌ　４２", "", Request("deal", "42", 42, "deal 42")),
    ("人物 ann@customer.test", "", Request("person", "ann@customer.test", None,
                                          "人物 ann@customer.test")),
    ("組織：Customer Inc", "", Request("org", "Customer Inc", None, "組織:Customer Inc")),
    ("Re: deal 5", "", Request("deal", "5", 5, "deal 5")),
    ("", "\n  deal Pilot\nthanks", Request("deal", "Pilot", None, "deal Pilot")),
    ("Question", "org Other Ltd", Request("org", "Other Ltd", None, "org Other Ltd")),
    ("deals please", "", Request("unknown", raw="deals please")),
    ("deal", "", Request("unknown", raw="deal")),
    ("hello", "how are you", Request("unknown", raw="hello")),
])
def test_parse_request(subject: str, body: str, expected: Request) -> None:
    assert parse_request(subject, body) == expected


def ask(w: World, user: str, subject: str) -> tuple[str, str, str, dict[str, Any]]:
    answer = answer_request(w.config, user, parse_request(subject), after(30))
    return (*render_answer(answer), answer.context)


def test_admin_sees_no_private_mail_nor_that_it_exists(world: World) -> None:
    e = scenario(world)
    renewal = world.deal("Renewal 2027")
    _s, text, html, ctx = ask(world, "alice@example.com", f"deal {renewal.id}")
    assert ctx["outcome"] == "history" and "hidden" not in ctx["history"]
    assert "Bob private terms" not in text + html
    # Saying "1 email you may not see" would tell Alice that Bob has a private email here.
    assert "may not see" not in text + html and ctx["history"]["shown"] == 0
    _s, text, _h, ctx = ask(world, "bob@example.com", f"deal {renewal.id}")
    assert "Bob private terms" in text and ctx["history"]["shown"] == 1
    # The quarantined message is nobody's, not even in the owner's answers.
    _s, text, _h, ctx = ask(world, "alice@example.com", "inbox")
    assert "Forged wire instructions" not in text and "Offer" in text
    assert e["forged"].id not in [x["id"] for t in ctx["history"]["threads"]
                                  for x in t["emails"]]


def test_threads_newest_first_with_participants_and_first_lines(world: World) -> None:
    scenario(world)
    pilot = world.deal("Pilot")
    world.email("Older pilot thread", sightings=[("alice@example.com", "shared")],
                to=[("Carl Other", "carl@other.test")], deal=pilot, date=T0,
                snippet="line one\nline two\nline three\nline four")
    _s, text, _h, ctx = ask(world, "alice@example.com", "deal Pilot")
    subjects = [t["subject"] for t in ctx["history"]["threads"]]
    assert subjects == ["見積もりのご案内", "Older pilot thread"]  # thread order: newest first
    assert [x["subject"] for x in ctx["history"]["threads"][0]["emails"]] == [
        "見積もりのご案内", "Pilot plan"]
    assert "| line three" in text and "line four" not in text
    assert "from Bob Seller <bob@example.com>; to Carl Other <carl@other.test>" in text


def test_person_org_and_closest_matches(world: World) -> None:
    scenario(world)
    _s, text, _h, ctx = ask(world, "alice@example.com", "person ann@customer.test")
    assert ctx["outcome"] == "history" and "Offer" in text and "Bob private" not in text
    _s, text, _h, ctx = ask(world, "alice@example.com", "person Carl")
    assert ctx["what"] == "person Carl Other" and "Pilot plan" in text
    _s, text, _h, ctx = ask(world, "alice@example.com", "org Customer Inc")
    assert "Offer" in text and "Bob private terms" not in text
    _s, text, _h, ctx = ask(world, "alice@example.com", "deal Renewl 2027")
    assert ctx["outcome"] == "not_found" and "deal 1" in text and "deal Renewal" in text
    _s, text, _h, ctx = ask(world, "alice@example.com", "deal e")  # in every title
    assert ctx["outcome"] == "ambiguous" and len(ctx["matches"]) == 3
    _s, text, _h, ctx = ask(world, "alice@example.com", "deal 999")
    assert ctx["outcome"] == "not_found" and "deal 42" in text  # the help text follows


def test_auto_created_person_of_private_mail_is_not_named(world: World) -> None:
    secret = world.new_person("Secret Contact", "secret@hidden.test")
    world.email("Private intro", sightings=[("bob@example.com", "private")],
                frm=("Bob Seller", "bob@example.com"),
                to=[("Secret Contact", "secret@hidden.test")], person=secret)
    for request in ("person secret@hidden.test", "person Secret Contact", "person Secret Contct"):
        _s, text, html, ctx = ask(world, "alice@example.com", request)
        assert ctx["outcome"] == "not_found" and ctx["matches"] == [], request
        assert "Private intro" not in text + html
        if request != "person Secret Contact":  # else only the request itself is echoed
            assert "Secret Contact" not in text + html
    _s, text, _h, ctx = ask(world, "bob@example.com", "person secret@hidden.test")
    assert ctx["outcome"] == "history" and "Private intro" in text


@pytest.mark.parametrize("user,request_,name", [
    ("alice@example.com", "deal 3", "ask_alice_deal_en"),
    ("bob@example.com", "案件 Pilot", "ask_bob_deal_ja"),
    ("alice@example.com", "deal Renewl", "ask_alice_not_found_en"),
    ("bob@example.com", "ヘルプ", "ask_bob_help_ja"),
    ("alice@example.com", "what is this", "ask_alice_unknown_en"),
])
def test_answer_golden(world: World, user: str, request_: str, name: str) -> None:
    scenario(world)
    subject, text, html, _ctx = ask(world, user, request_)
    check_golden(f"{name}.txt", f"Subject: {subject}\n\n{text}")
    check_golden(f"{name}.html", html)


def test_injection_in_answers_is_literal(world: World) -> None:
    scenario(world)
    _s, text, html, _ctx = ask(world, "alice@example.com", "person zed@newco.test")
    assert "Intro {{ 7*7 }} <script>alert(1)</script>" in text
    assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    _s, text, html, _ctx = ask(world, "alice@example.com", "deal {{ 7*7 }}<script>")
    assert "{{ 7*7 }}<script>" in text and "<script>" not in html


# --------------------------------------------------------------------------- over SMTP


def mail(frm: str, subject: str, to: str = ASK, body: str = "", **headers: str) -> bytes:
    e = EmailMessage()
    e["From"], e["To"], e["Subject"] = frm, to, subject
    e["Message-ID"] = make_msgid(domain="example.com")
    e["Date"] = "Thu, 26 Nov 2026 10:00:00 +0100"
    for k, v in headers.items():
        e[k.replace("_", "-")] = v
    e.set_content(body or "Hello\n")
    return e.as_bytes(policy=policy.SMTP)


def send(port: int, raw: bytes, rcpt: str, mail_from: str) -> Any:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        return s.sendmail(mail_from, [rcpt], raw)


def answers() -> list[m.OutboxItem]:
    return list(m.OutboxItem.select().where(m.OutboxItem.kind == "answer"))


def test_ask_end_to_end_over_smtp(server_factory: Any) -> None:
    with SmtpSink() as sink:
        running = server_factory(f"outbox.smarthost=127.0.0.1:{sink.port}",
                                 "outbox.smarthost_tls=opportunistic",
                                 start_outbox_worker=False)
        port = running.port
        upsell = int(m.Deal.get(m.Deal.title == "Upsell seats").id)
        bcc_deal = f"example+deal{upsell}@dealmail.localhost"
        send(port, mail("Alice <alice@example.com>", "Seats for Ann", to="ann@customer.test"),
             bcc_deal, "alice@example.com")
        send(port, mail("Bob <bob@example.com>", "Bob's private seat discount",
                        to="ann@customer.test"), bcc_deal, "bob@example.com")
        request = mail("Alice <alice@example.com>", f"deal {upsell}")
        reply = send(port, request, ASK, "alice@example.com")
        assert reply == {}
        running.call(running.app.outbox.run_once())
        delivered = [x for x in sink.messages if b"X-Dealmail-Auto: answer" in x.data]
        assert len(delivered) == 1
        assert delivered[0].rcpt_tos == ["alice@example.com"] and delivered[0].mail_from == ""
        msg = message_from_bytes(delivered[0].data, policy=policy.default)
        assert msg["Auto-Submitted"] == "auto-generated"
        assert msg["In-Reply-To"] == message_from_bytes(request)["Message-ID"]
        body = msg.get_body(("plain",))
        assert body is not None
        text = body.get_content()
        assert "Seats for Ann" in text
        assert "discount" not in text and "may not see" not in text


def test_ask_from_strangers_and_unverified_users_is_refused(server_factory: Any) -> None:
    running = server_factory("policy.trusted_networks=[\"10.0.0.0/8\"]")
    with smtplib.SMTP("127.0.0.1", running.port, timeout=30) as s:
        for frm in ("Mallory <mallory@evil.test>", "Alice <alice@example.com>"):
            with pytest.raises(smtplib.SMTPDataError) as info:
                s.sendmail("x@evil.test", [ASK], mail(frm, "deal 1"))
            assert info.value.smtp_code == 550
            err: Any = info.value.smtp_error
            assert (err.decode() if isinstance(err, bytes) else err).startswith("5.7.1")
    assert answers() == []


def test_automatic_requests_are_ignored(server: Any) -> None:
    send(server.port, mail("Alice <alice@example.com>", "deal 1",
                           Auto_Submitted="auto-replied"), ASK, "alice@example.com")
    assert answers() == []
    send(server.port, mail("Alice <alice@example.com>", "help"), ASK, "alice@example.com")
    [item] = answers()
    assert json.loads(item.recipients_json) == ["alice@example.com"]
    assert "help" in item.subject
