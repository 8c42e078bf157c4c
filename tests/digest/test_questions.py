"""Tests for digest.questions: tokens, the rendered question (en/ja, text and HTML), batching.

A real server with the demo CRM stores alice's and bob's BCCs to Ann (two open deals); the
question is then rendered again here with a fixed token so the text can be compared whole.
"""

from __future__ import annotations

import smtplib
from datetime import datetime, timedelta
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import make_msgid
from typing import Any

import pytest

from crmstore import models as m
from digest import questions as q

BCC = "example@dealmail.localhost"
TOKEN = "T0k3n_for-golden-tests_0123456789"

EN_TEXT = """\
This email could go on more than one deal. Which deal is it about?

Subject: Proposal <Q4> & seats
Date:    2026-11-26 10:00 (Europe/Paris)
With:    Ann Customer <ann@customer.test>

  1. Renewal 2027 (deal 1) - Customer Inc, stage Proposal, 12,000.00 EUR, last activity 2026-11-01
  2. Upsell seats (deal 2) - Customer Inc, stage Qualified, 4,500.00 EUR, last activity 2026-11-01
  0. No deal

How to answer: reply to this email with the number of the deal, e.g. "2".
You can also write the deal's title (or a unique part of it), or 0 for no deal.
This question can be answered for 14 days; later replies to the same thread follow your choice.

--\x20
dealmail for Example Inc
"""

JA_TEXT = """\
このメールは複数の案件に該当します。どの案件のメールですか？

件名:   見積書
日時:   2026-11-26 18:00 (Asia/Tokyo)
相手:   Ann Customer <ann@customer.test>

  1. Renewal 2027 (案件ID 1) - Customer Inc、ステージ Proposal、12,000.00 EUR、最終活動日 2026-11-01
  2. Upsell seats (案件ID 2) - Customer Inc、ステージ Qualified、4,500.00 EUR、最終活動日 2026-11-01
  0. 案件なし

回答方法: このメールに案件の番号だけを書いて返信してください（例: 「2」）。
案件名（またはその一部）でも回答できます。案件に紐付けない場合は「0」または「なし」と書いてください。
この質問には14日間回答できます。同じスレッドの以降のメールは選んだ案件に紐付きます。

--\x20
dealmail (Example Inc)
"""


def bcc(port: int, subject: str, frm: str = "Alice Admin <alice@example.com>") -> None:
    e = EmailMessage()
    e["From"] = frm
    e["To"] = "Ann Customer <ann@customer.test>"
    e["Subject"] = subject
    e["Date"] = "Thu, 26 Nov 2026 10:00:00 +0100"
    e["Message-ID"] = make_msgid(domain="example.com")
    e.set_content("Hello Ann\n")
    sender = frm.split("<")[1].rstrip(">")
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.sendmail(sender, [BCC], e.as_bytes(policy=SMTP))


@pytest.fixture
def srv(server_factory: Any) -> Any:
    running = server_factory(start_outbox_worker=False)
    # Deterministic "last activity" (no email is on these deals yet).
    m.Deal.update(updated_at=datetime(2026, 11, 1, 12, 0)).execute()
    return running


def render(srv: Any, user_address: str, subject: str) -> EmailMessage:
    config = srv.app.config
    company, user = config.find_user(user_address)
    email = m.Email.get(m.Email.subject == subject)
    row = m.PendingChoice.get(m.PendingChoice.email == email.id)
    item = q.Item(1, row, q.candidates_of_rows([row])[0])
    return q.compose_question(config, company, user, [item], TOKEN, srv.app.clock.now())


def body(msg: EmailMessage, kind: str) -> str:
    part = msg.get_body(preferencelist=(kind,))
    assert part is not None
    return str(part.get_content()).replace("\r\n", "\n")


def test_tokens_are_random_and_only_hashes_are_stored() -> None:
    tokens = {q.new_token() for _ in range(200)}
    assert len(tokens) == 200 and all(len(t) == 32 for t in tokens)  # 192 bits, base64url
    hashes = q.token_hashes(TOKEN)
    assert len(hashes) == q.MAX_BATCH and hashes[0].endswith("-001")
    assert all(TOKEN not in h and len(h) <= 64 for h in hashes)
    assert q.token_hashes(TOKEN) == hashes and q.token_hashes(TOKEN + "x") != hashes


def test_english_question_text_and_html(srv: Any) -> None:
    bcc(srv.port, "Proposal <Q4> & seats")
    msg = render(srv, "alice@example.com", "Proposal <Q4> & seats")
    assert body(msg, "plain") == EN_TEXT
    html = body(msg, "html")
    # Message data is escaped in HTML, never markup (docs/reliability.md A.34).
    assert "<td>Proposal &lt;Q4&gt; &amp; seats</td>" in html
    assert "<td>Ann Customer &lt;ann@customer.test&gt;</td>" in html
    assert ("<tr><td><b>2</b></td><td>Upsell seats (deal 2)</td><td>Customer Inc</td>"
            "<td>Qualified</td><td>4,500.00 EUR</td><td>2026-11-01</td></tr>") in html
    assert '<td colspan="5">No deal</td>' in html and 'lang="en"' in html
    assert str(msg["Subject"]) == "Which deal? Proposal <Q4> & seats"
    assert msg["Reply-To"] == f"example+choice-{TOKEN}@dealmail.localhost"
    assert msg["To"] == "alice@example.com"
    assert msg["Auto-Submitted"] == "auto-generated" and msg["X-Dealmail-Auto"] == "question"
    assert str(msg["Message-ID"]).endswith("@dealmail.localhost>")


def test_japanese_question_text_and_html(srv: Any) -> None:
    bcc(srv.port, "見積書", frm="Bob <bob@example.com>")
    msg = render(srv, "bob@example.com", "見積書")
    assert body(msg, "plain") == JA_TEXT
    html = body(msg, "html")
    assert 'lang="ja"' in html and "<td>見積書</td>" in html
    assert '<td colspan="5">案件なし</td>' in html and "最終活動日" in html
    assert str(msg["Subject"]) == "どの案件ですか？ 見積書"


def test_last_activity_is_the_latest_visible_email(srv: Any) -> None:
    upsell = m.Deal.get(m.Deal.title == "Upsell seats")
    bcc(srv.port, "Seats", frm="Bob <bob@example.com>")  # bob's mail is private
    seats = m.Email.get(m.Email.subject == "Seats")
    m.Thread.update(deal=upsell.id).where(m.Thread.id == seats.thread_id).execute()
    alice = m.User.get(m.User.address == "alice@example.com")
    bob = m.User.get(m.User.address == "bob@example.com")
    # Bob sees his own email's date; alice may not, so she gets the deal's update time.
    assert q._last_activities([upsell], bob)[upsell.id] == datetime(2026, 11, 26, 9, 0)
    assert q._last_activities([upsell], alice)[upsell.id] == datetime(2026, 11, 1, 12, 0)


def test_batch_rerendered_with_a_fresh_token(srv: Any) -> None:
    bcc(srv.port, "First")
    [item] = m.OutboxItem.select().where(m.OutboxItem.kind == "question")
    first_key = item.dedupe_key
    first_hash = m.PendingChoice.get().token_hash
    srv.app.clock.advance(timedelta(minutes=2))
    bcc(srv.port, "Second")
    [item] = m.OutboxItem.select().where(m.OutboxItem.kind == "question")
    assert item.dedupe_key != first_key and item.subject == "Which deals? 2 emails"
    assert item.next_attempt_at == item.created_at + timedelta(minutes=5)
    rows = list(m.PendingChoice.select().order_by(m.PendingChoice.id))
    assert [r.token_hash.rsplit("-", 1)[1] for r in rows] == ["001", "002"]
    assert first_hash not in {r.token_hash for r in rows}
    # After the window the batch is closed: the next question is a new email.
    srv.app.clock.advance(timedelta(minutes=4))
    bcc(srv.port, "Third")
    assert m.OutboxItem.select().where(m.OutboxItem.kind == "question").count() == 2
