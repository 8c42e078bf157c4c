"""Deal choice by email, end to end: real dealmail listener, real smtplib, the demo CRM.

alice (English) and bob (Japanese) BCC mail to Ann, who has two open deals ("Renewal 2027"
then "Upsell seats"): dealmail queues a "which deal?" question in the outbox; the test reads
it from the outbox and answers as a mail client would, quoting the question under the answer.
The outbox worker is not started: the test drives it (and time, with the FakeClock).
"""

from __future__ import annotations

import json
import os
import smtplib
import subprocess
import sys
from dataclasses import replace
from datetime import timedelta
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from email.policy import SMTP
from email.utils import make_msgid
from pathlib import Path
from typing import Any

import pytest

from crmstore import models as m
from crmstore.outbox import list_items
from digest.questions import token_hashes
from mta.routing import RoutingTable

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "support"))
from smtpsink import SmtpSink

ROOT = Path(__file__).resolve().parents[3]
BCC = "example@dealmail.localhost"


# --------------------------------------------------------------------------- helpers


def bcc_mail(frm: str = "Alice Admin <alice@example.com>", subject: str = "Proposal",
             to: str = "Ann Customer <ann@customer.test>", **headers: str) -> EmailMessage:
    e = EmailMessage()
    e["From"] = frm
    e["To"] = to
    e["Subject"] = subject
    e["Date"] = "Thu, 26 Nov 2026 10:00:00 +0100"
    e["Message-ID"] = make_msgid(domain="example.com")
    for k, v in headers.items():
        e[k.replace("_", "-")] = v
    e.set_content("Hello Ann,\nhere is our offer.\n")
    return e


def send(port: int, message: EmailMessage, rcpts: list[str],
         mail_from: str = "alice@example.com") -> Any:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        return s.sendmail(mail_from, rcpts, message.as_bytes(policy=SMTP))


def refusal(port: int, message: EmailMessage, rcpts: list[str],
            mail_from: str = "alice@example.com") -> tuple[int, str]:
    with pytest.raises((smtplib.SMTPDataError, smtplib.SMTPRecipientsRefused)) as info:
        send(port, message, rcpts, mail_from)
    exc = info.value
    text: bytes | str
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        code, text = next(iter(exc.recipients.values()))
    else:
        assert isinstance(exc, smtplib.SMTPDataError)
        code, text = exc.smtp_code, exc.smtp_error
    return code, text.decode() if isinstance(text, bytes) else str(text)


def outbox(kind: str | None = None) -> list[m.OutboxItem]:
    q = m.OutboxItem.select().order_by(m.OutboxItem.id)
    if kind:
        q = q.where(m.OutboxItem.kind == kind)
    return list(q)


def parsed(item: m.OutboxItem) -> EmailMessage:
    msg = BytesParser(policy=policy.default).parsebytes(bytes(item.message))
    assert isinstance(msg, EmailMessage)
    return msg


def text_of(msg: EmailMessage) -> str:
    body = msg.get_body(preferencelist=("plain",))
    assert body is not None
    return str(body.get_content()).replace("\r\n", "\n")


def deal(title: str) -> m.Deal:
    return m.Deal.get(m.Deal.title == title)


def thread_deal(subject: str) -> str | None:
    email = m.Email.get(m.Email.subject == subject)
    thread = m.Thread.get_by_id(email.thread_id)
    return m.Deal.get_by_id(thread.deal_id).title if thread.deal_id else None


def email_deal_links(subject: str) -> list[tuple[str, str]]:
    email = m.Email.get(m.Email.subject == subject)
    return [(m.Deal.get_by_id(lk.deal_id).title, lk.source) for lk in
            m.Link.select().where((m.Link.email == email.id) & m.Link.deal.is_null(False))]


def answer_mail(question: EmailMessage, answer: str, style: str = "gmail",
                frm: str = "Alice Admin <alice@example.com>", **headers: str) -> EmailMessage:
    """A reply to ``question`` as a mail client writes it: the answer on top, the question
    quoted (Gmail, Apple Mail, Japanese Gmail) or below a header block (Outlook)."""
    quoted = text_of(question)
    sender = str(question["From"])
    if style == "outlook":
        body = (f"{answer}\r\n\r\n________________________________\r\nFrom: {sender}\r\n"
                f"Sent: Thursday, November 26, 2026 10:05 AM\r\nTo: {question['To']}\r\n"
                f"Subject: {question['Subject']}\r\n\r\n{quoted}")
    else:
        lines = "\n".join("> " + ln if ln else ">" for ln in quoted.splitlines())
        attribution = {
            "gmail": f"On Thu, Nov 26, 2026 at 10:05 AM {sender} wrote:",
            "apple": f"> On 26 Nov 2026, at 10:05, {sender} wrote:\n>",
            "gmail_ja": f"2026年11月26日(木) 18:05 {sender}:",
        }[style]
        body = f"{answer}\n\n{attribution}\n\n{lines}\n"
        if style == "apple":
            body = f"{answer}\n\nSent from my iPhone\n\n{attribution}\n{lines}\n"
    e = EmailMessage()
    e["From"] = frm
    e["To"] = str(question["Reply-To"])
    e["Subject"] = "Re: " + str(question["Subject"])
    e["Date"] = "Thu, 26 Nov 2026 10:05:00 +0100"
    e["Message-ID"] = make_msgid(domain="example.com")
    e["In-Reply-To"] = str(question["Message-ID"])
    e["References"] = str(question["Message-ID"])
    for k, v in headers.items():
        e[k.replace("_", "-")] = v
    e.set_content(body)
    return e


def reply_address(question: EmailMessage) -> str:
    return str(question["Reply-To"]).strip("<>")


def answer(port: int, question: EmailMessage, text: str, style: str = "gmail",
           mail_from: str = "alice@example.com", **kw: Any) -> Any:
    return send(port, answer_mail(question, text, style, **kw), [reply_address(question)],
                mail_from)


def swap_config(srv: Any, company: Any) -> None:
    """Run with a changed company (as a config reload would)."""
    srv.app.config = replace(srv.app.config, companies=(company,))
    srv.app.routing = RoutingTable(srv.app.config, srv.app.routing.enabled)


@pytest.fixture
def srv(server_factory: Any) -> Any:
    return server_factory(start_outbox_worker=False)


def ask_alice(port: int, subject: str = "Proposal") -> EmailMessage:
    send(port, bcc_mail(subject=subject), [BCC])
    [item] = outbox("question")
    return parsed(item)


# --------------------------------------------------------------------------- the question


def test_bcc_queues_one_question_to_alice(srv: Any, tmp_path: Path) -> None:
    question = ask_alice(srv.port)
    [item] = outbox()
    assert item.kind == "question" and item.state == "queued" and item.mail_from == ""
    assert json.loads(item.recipients_json) == ["alice@example.com"]
    assert str(question["From"]).endswith("<example@dealmail.localhost>")
    assert question["Auto-Submitted"] == "auto-generated"
    assert question["X-Dealmail-Auto"] == "question"
    assert question["Message-ID"]
    addr = reply_address(question)
    assert addr.startswith("example+choice-") and addr.endswith("@dealmail.localhost")
    token = addr.split("+choice-", 1)[1].split("@")[0]
    assert len(token) >= 32  # token_urlsafe(24): 192 random bits
    [row] = m.PendingChoice.select()
    assert row.state == "asked" and row.token_hash == token_hashes(token)[0]
    assert token not in row.token_hash
    assert row.expires_at == row.asked_at + timedelta(days=14)
    text = text_of(question)
    assert "1. Renewal 2027" in text and "2. Upsell seats" in text and "0. No deal" in text
    assert "Ann Customer <ann@customer.test>" in text and "Proposal" in text
    # Held for the batch window, then delivered from the null sender.
    assert item.next_attempt_at == item.created_at + timedelta(minutes=5)

    listed = [i for i in list_items() if i["kind"] == "question"]
    assert listed[0]["to"] == ["alice@example.com"] and listed[0]["state"] == "queued"
    db = srv.app.config.database.url
    cli = subprocess.run(
        [sys.executable, "-m", "dealmail.cli", "outbox", "--json", "--config",
         str(ROOT / "conf" / "dealmail.example.toml"), "--set", f"database.url={db}"],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert cli.returncode == 0, cli.stderr
    shown = json.loads(cli.stdout)
    assert [(i["id"], i["to"], i["state"]) for i in shown] == [
        (item.id, ["alice@example.com"], "queued")]
    assert shown[0]["subject"] == "Which deal? Proposal" and shown[0]["attempts"] == 0


def test_question_delivered_after_the_window_from_null_sender(server_factory: Any,
                                                              clock: Any) -> None:
    with SmtpSink() as sink:
        srv = server_factory(f"outbox.smarthost=127.0.0.1:{sink.port}",
                             "outbox.smarthost_tls=opportunistic", start_outbox_worker=False)
        ask_alice(srv.port)
        assert srv.call(srv.app.outbox.run_once()) == 0  # still inside the batch window
        clock.advance(timedelta(minutes=5))
        assert srv.call(srv.app.outbox.run_once()) == 1
        [got] = sink.messages
        assert got.mail_from == "" and got.rcpt_tos == ["alice@example.com"]
        assert b"Reply-To: example+choice-" in got.data
    assert outbox("question")[0].state == "sent"


# --------------------------------------------------------------------------- answers


@pytest.mark.parametrize("style", ["gmail", "outlook", "apple"])
def test_answer_2_links_email_and_thread(srv: Any, style: str) -> None:
    question = ask_alice(srv.port)
    answer(srv.port, question, "2", style)
    assert thread_deal("Proposal") == "Upsell seats"
    assert ("Upsell seats", "choice") in email_deal_links("Proposal")
    [row] = m.PendingChoice.select()
    assert row.state == "answered" and row.answer_deal_id == deal("Upsell seats").id
    [audit] = m.AuditEntry.select().where(m.AuditEntry.action == "deal_choice")
    assert audit.actor == "alice@example.com"
    assert json.loads(audit.detail_json)["deal"] == deal("Upsell seats").id
    [confirm] = outbox("confirm")
    assert json.loads(confirm.recipients_json) == ["alice@example.com"]
    assert confirm.mail_from == ""
    msg = parsed(confirm)
    # The email's handle leads the line: "unlink E1" or "deal E1 ..." can follow by mail.
    assert text_of(msg).strip() == 'E1 “Proposal” is now on deal 2 “Upsell seats”.'
    assert msg["In-Reply-To"] and msg["Auto-Submitted"] == "auto-generated"


def test_no_confirmation_when_the_user_turned_them_off(srv: Any) -> None:
    company = srv.app.config.companies[0]
    quiet = tuple(replace(u, confirm_choices=False) for u in company.users)
    swap_config(srv, replace(company, users=quiet))
    question = ask_alice(srv.port)
    answer(srv.port, question, "2")
    assert thread_deal("Proposal") == "Upsell seats"
    assert [i.kind for i in outbox()] == ["question"]


def test_html_only_gmail_reply(srv: Any) -> None:
    question = ask_alice(srv.port)
    reply = answer_mail(question, "unused")
    reply.clear_content()
    reply.set_content(
        '<div dir="ltr">#2</div><br><div class="gmail_quote"><div class="gmail_attr">On Thu, '
        'Nov 26, 2026 dealmail wrote:</div><blockquote class="gmail_quote">'
        + body_html(question) + "</blockquote></div>", subtype="html")
    send(srv.port, reply, [reply_address(question)])
    assert thread_deal("Proposal") == "Upsell seats"


def body_html(msg: EmailMessage) -> str:
    part = msg.get_body(preferencelist=("html",))
    assert part is not None
    return str(part.get_content())


def test_later_reply_in_thread_follows_without_new_question(srv: Any) -> None:
    first = bcc_mail(subject="Seats")
    send(srv.port, first, [BCC])
    question = parsed(outbox("question")[0])
    answer(srv.port, question, "2")
    follow = bcc_mail(subject="Re: Seats", In_Reply_To=str(first["Message-ID"]),
                      References=str(first["Message-ID"]))
    send(srv.port, follow, [BCC])
    assert len(outbox("question")) == 1
    assert email_deal_links("Re: Seats") == [("Upsell seats", "thread")]
    assert m.PendingChoice.select().count() == 1


def test_japanese_user_answers_fullwidth_two(srv: Any) -> None:
    send(srv.port, bcc_mail(frm="Bob <bob@example.com>", subject="見積書"), [BCC],
         mail_from="bob@example.com")
    [item] = outbox("question")
    assert json.loads(item.recipients_json) == ["bob@example.com"]
    question = parsed(item)
    assert str(question["Subject"]) == "どの案件ですか？ 見積書"
    text = text_of(question)
    assert "このメールは複数の案件に該当します" in text and "0. 案件なし" in text
    assert "Asia/Tokyo" in text and "2026-11-26 18:00" in text
    answer(srv.port, question, "２", "gmail_ja", frm="Bob <bob@example.com>",
           mail_from="bob@example.com")
    assert thread_deal("見積書") == "Upsell seats"
    confirm = text_of(parsed(outbox("confirm")[0]))
    assert confirm.strip() == "E1「見積書」を案件2「Upsell seats」に紐付けました。"


def test_answer_from_alternate_address_is_accepted(srv: Any) -> None:
    question = ask_alice(srv.port)
    answer(srv.port, question, "upsell", frm="Alice <alice.personal@mail.test>",
           mail_from="alice.personal@mail.test")
    assert thread_deal("Proposal") == "Upsell seats"


# --------------------------------------------------------------------------- refusals


def test_wrong_sender_refused_and_nothing_changes(srv: Any) -> None:
    question = ask_alice(srv.port)
    code, text = refusal(srv.port, answer_mail(question, "2", frm="Bob <bob@example.com>"),
                         [reply_address(question)], "bob@example.com")
    assert code == 550 and text.startswith("5.7.1")
    code, text = refusal(srv.port, answer_mail(question, "2", frm="Ann <ann@customer.test>"),
                         [reply_address(question)], "ann@customer.test")
    assert code == 550 and text.startswith("5.7.1")
    assert thread_deal("Proposal") is None
    assert m.PendingChoice.get().state == "asked"
    assert len(outbox()) == 1 and not m.AuditEntry.select().where(
        m.AuditEntry.action == "deal_choice").exists()


def test_unverified_sender_refused(server_factory: Any) -> None:
    # Only aligned DKIM would do: alice's unsigned answer from 127.0.0.1 is not enough.
    srv = server_factory(start_outbox_worker=False)
    question = ask_alice(srv.port)
    company = srv.app.config.companies[0]
    swap_config(srv, replace(company, accept_levels=()))
    code, text = refusal(srv.port, answer_mail(question, "2"), [reply_address(question)])
    assert code == 550 and text.startswith("5.7.1") and "could not be verified" in text
    assert thread_deal("Proposal") is None


def test_forged_token_refused_at_rcpt(srv: Any) -> None:
    question = ask_alice(srv.port)
    forged = "example+choice-" + "A" * 32 + "@dealmail.localhost"
    code, text = refusal(srv.port, answer_mail(question, "2"), [forged])
    assert code == 550 and text.startswith("5.1.1")
    # A real token of this company under another company's slug does not exist either.
    assert thread_deal("Proposal") is None


def test_out_of_office_reply_is_ignored(srv: Any) -> None:
    question = ask_alice(srv.port)
    answer(srv.port, question, "I am out of the office until Monday.",
           Auto_Submitted="auto-replied")
    assert m.PendingChoice.get().state == "asked"
    assert len(outbox()) == 1  # nothing said back


# --------------------------------------------------------------------------- awkward answers


def test_ambiguous_title_explained_and_token_stays_valid(srv: Any) -> None:
    ann = deal("Upsell seats")
    m.Deal.create(company=ann.company_id, title="Upsell licences", status="open",
                  person=ann.person_id, organization=ann.organization_id, value=900,
                  currency="EUR", stage="Lead")
    question = ask_alice(srv.port)
    assert "3. Upsell licences" in text_of(question)
    answer(srv.port, question, "upsell")
    assert thread_deal("Proposal") is None
    [explain] = outbox("answer")
    text = text_of(parsed(explain))
    assert "matches several deals" in text and "'Upsell seats'" in text
    assert "2. Upsell seats" in text and "3. Upsell licences" in text
    assert parsed(explain)["Reply-To"] == question["Reply-To"]
    answer(srv.port, question, "Upsell seats")
    assert thread_deal("Proposal") == "Upsell seats"


def test_unreadable_answer_explained(srv: Any) -> None:
    question = ask_alice(srv.port)
    answer(srv.port, question, "the big one", "outlook")
    [explain] = outbox("answer")
    text = text_of(parsed(explain))
    assert "I could not read your answer about “Proposal”" in text
    assert "1. Renewal 2027" in text
    assert m.PendingChoice.get().state == "asked"


def test_used_token_reports_state_never_bounces(srv: Any) -> None:
    question = ask_alice(srv.port)
    answer(srv.port, question, "2")
    answer(srv.port, question, "1")  # accepted (250), changes nothing
    assert thread_deal("Proposal") == "Upsell seats"
    [report] = outbox("answer")
    text = text_of(parsed(report))
    assert "was already answered: it is on deal 2 “Upsell seats”" in text
    assert parsed(report)["Reply-To"] is None  # nothing left to answer


def test_expired_token_gets_a_fresh_question(srv: Any, clock: Any) -> None:
    question = ask_alice(srv.port)
    clock.advance(timedelta(days=15))
    answer(srv.port, question, "2")
    assert thread_deal("Proposal") is None
    [fresh] = outbox("answer")
    again = parsed(fresh)
    assert "has expired; here it is again" in text_of(again)
    assert again["Reply-To"] != question["Reply-To"]
    answer(srv.port, again, "2")
    assert thread_deal("Proposal") == "Upsell seats"
    states = sorted(r.state for r in m.PendingChoice.select())
    assert states == ["answered", "void"]


def test_deal_closed_meanwhile_refused_with_fresh_question(srv: Any) -> None:
    question = ask_alice(srv.port)
    m.Deal.update(status="won").where(m.Deal.title == "Upsell seats").execute()
    answer(srv.port, question, "2")
    assert thread_deal("Proposal") is None
    again = parsed(outbox("answer")[0])
    text = text_of(again)
    assert "Deal 2 “Upsell seats” is no longer open (won)" in text
    assert "1. Renewal 2027" in text and "Upsell seats (deal" not in text
    answer(srv.port, again, "1")
    assert thread_deal("Proposal") == "Renewal 2027"


# --------------------------------------------------------------------------- batching


def test_three_pending_emails_batched_and_multi_answer(srv: Any, clock: Any) -> None:
    for i, subject in enumerate(["Offer A", "Offer B", "Offer C"]):
        if i:
            clock.advance(timedelta(minutes=1))
        send(srv.port, bcc_mail(subject=subject), [BCC])
    [item] = outbox("question")
    question = parsed(item)
    assert str(question["Subject"]) == "Which deals? 3 emails"
    text = text_of(question)
    for n, subject in enumerate(["Offer A", "Offer B", "Offer C"], start=1):
        assert f"--- Email {n} ---\nSubject: {subject}" in text
    assert item.next_attempt_at == item.created_at + timedelta(minutes=5)
    answer(srv.port, question, "1: 2, 2: 0\n3: renewal")
    assert thread_deal("Offer A") == "Upsell seats"
    assert thread_deal("Offer B") is None
    assert thread_deal("Offer C") == "Renewal 2027"
    assert [r.state for r in m.PendingChoice.select().order_by(m.PendingChoice.id)] == [
        "answered"] * 3
    confirm = text_of(parsed(outbox("confirm")[0]))
    assert confirm.splitlines() == ["E1 “Offer A” is now on deal 2 “Upsell seats”.",
                                    "E2 “Offer B” stays without a deal.",
                                    "E3 “Offer C” is now on deal 1 “Renewal 2027”."]
    # "No deal" is remembered: a later message in that thread is not asked about again.
    b = m.Email.get(m.Email.subject == "Offer B")
    send(srv.port, bcc_mail(subject="Re: Offer B", In_Reply_To=b.message_id), [BCC])
    assert len(outbox("question")) == 1


def test_partial_multi_answer_keeps_the_rest_open(srv: Any) -> None:
    send(srv.port, bcc_mail(subject="One"), [BCC])
    send(srv.port, bcc_mail(subject="Two"), [BCC])
    question = parsed(outbox("question")[0])
    answer(srv.port, question, "1: 2")
    assert thread_deal("One") == "Upsell seats" and thread_deal("Two") is None
    text = text_of(parsed(outbox("answer")[0]))
    assert "E1 “One” is now on deal 2 “Upsell seats”." in text
    assert "“Two” still needs an answer." in text and "--- Email 2 ---" not in text
    answer(srv.port, question, "2: 1")
    assert thread_deal("Two") == "Renewal 2027"


def test_rate_limit_holds_questions_until_the_next_hour(server_factory: Any,
                                                       clock: Any) -> None:
    srv = server_factory("policy.choice_batch_minutes=0", "policy.choice_questions_per_hour=1",
                         start_outbox_worker=False)
    send(srv.port, bcc_mail(subject="First"), [BCC])
    send(srv.port, bcc_mail(subject="Second"), [BCC])
    assert len(outbox("question")) == 1
    assert sorted(r.state for r in m.PendingChoice.select()) == ["asked", "pending"]
    clock.advance(timedelta(minutes=61))
    send(srv.port, bcc_mail(subject="Third"), [BCC])
    latest = parsed(outbox("question")[-1])
    assert str(latest["Subject"]) == "Which deals? 2 emails"
    assert "Subject: Second" in text_of(latest) and "Subject: Third" in text_of(latest)


@pytest.mark.postgres
def test_batch_and_multi_answer_on_postgresql(server_factory: Any, pg_url: str,
                                              clock: Any) -> None:
    # The open batch is taken FOR UPDATE (the outbox worker claims with SKIP LOCKED).
    srv = server_factory(f"database.url={pg_url}", start_outbox_worker=False)
    send(srv.port, bcc_mail(subject="PG one"), [BCC])
    clock.advance(timedelta(minutes=1))
    send(srv.port, bcc_mail(subject="PG two"), [BCC])
    [item] = outbox("question")
    question = parsed(item)
    assert str(question["Subject"]) == "Which deals? 2 emails"
    answer(srv.port, question, "1: upsell\n2: 0", "outlook")
    assert thread_deal("PG one") == "Upsell seats" and thread_deal("PG two") is None
    assert len(outbox("confirm")) == 1
