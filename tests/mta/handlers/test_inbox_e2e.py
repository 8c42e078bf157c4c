"""A user's inbox by email, end to end: a running server, real clients (smtplib, swaks) and a
real SMTP sink as smarthost.

A digest is delivered to the sink; a command mail built from one of its ``mailto:`` links is
sent back to ``example+ask@``; the change shows in ``dealmail conversations`` and in the next
digest. Japanese commands, thread-level privacy and unlinking for later emails, the ignore
list on the capture path, colleagues' and an admin's attempts (refused, nothing changed,
the same answer as for a handle that does not exist), and ``forget`` leaving no row (SQLite
and PostgreSQL) and, on SQLite, no byte of the message in the database files.

The outbox worker is not started: tests drive it (and the digests) with ``run_once`` and the
FakeClock.
"""

from __future__ import annotations

import json
import os
import shutil
import smtplib
import subprocess
import sys
from datetime import timedelta
from email import message_from_bytes, policy
from email.message import EmailMessage
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest
from support.mail import message, wire

from crmstore import models as m

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "support"))
from smtpsink import SmtpSink

ROOT = Path(__file__).resolve().parents[3]
EXAMPLE = ROOT / "conf" / "dealmail.example.toml"
BCC = "example@dealmail.localhost"
ASK = "example+ask@dealmail.localhost"
ALICE, BOB = "alice@example.com", "bob@example.com"
MARKER = "ZQX-unique-body-7f3a9"  # in the body and in an attachment of a forgotten email


# --------------------------------------------------------------------------- helpers


def send(port: int, msg: EmailMessage, rcpts: list[str], mail_from: str) -> Any:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        return s.sendmail(mail_from, rcpts, wire(msg))


def bcc(port: int, user: str, subject: str, to: str = "Carl <carl@other.test>",
        body: str = "Hello,\nhere is the plan.\n", **headers: str) -> EmailMessage:
    name = "Alice" if user == ALICE else "Bob"
    msg = message(frm=f"{name} <{user}>", to=to, subject=subject, body=body, **headers)
    send(port, msg, [BCC], user)
    return msg


def command(port: int, user: str, subject: str, body: str = "") -> EmailMessage:
    name = "Alice" if user == ALICE else "Bob"
    msg = message(frm=f"{name} <{user}>", to=ASK, subject=subject, body=body or "\n")
    send(port, msg, [ASK], user)
    return msg


class Env:
    """The running server, its sink, and ways to read what the users received."""

    def __init__(self, running: Any, sink: SmtpSink) -> None:
        self.running, self.sink = running, sink
        self.port = running.port
        self.clock = running.app.clock
        self.seen = 0

    def deliver(self) -> list[EmailMessage]:
        """Deliver the outbox to the sink; the messages that arrived since the last call."""
        self.running.call(self.running.app.outbox.run_once())
        new = self.sink.messages[self.seen:]
        self.seen = len(self.sink.messages)
        out = []
        for item in new:
            msg = message_from_bytes(item.data, policy=policy.default)
            assert isinstance(msg, EmailMessage)
            out.append(msg)
        return out

    def digest(self, user: str) -> EmailMessage:
        """Move the clock to the next 08:00 slot and deliver the user's digest."""
        self.clock.advance(timedelta(days=1))
        queued = self.running.app.digests.run_once(self.clock.now())
        assert user in queued, queued
        [msg] = [x for x in self.deliver() if x["X-Dealmail-Auto"] == "digest"
                 and x["To"] == user]
        return msg

    def answer(self, user: str) -> str:
        """The text of the one answer delivered to ``user``."""
        [msg] = [x for x in self.deliver() if x["X-Dealmail-Auto"] == "answer"]
        assert msg["To"] == user and msg["Auto-Submitted"] == "auto-generated"
        return text(msg)


def text(msg: EmailMessage) -> str:
    body = msg.get_body(("plain",))
    assert body is not None
    return str(body.get_content()).replace("\r\n", "\n")


def html(msg: EmailMessage) -> str:
    body = msg.get_body(("html",))
    assert body is not None
    return str(body.get_content())


class Links(HTMLParser):
    """The action links of an HTML part: (data-command, href, label)."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[tuple[str, str, str]] = []
        self._open: tuple[str, str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "a" and a.get("class") == "action":
            self._open = (a["data-command"] or "", a["href"] or "")

    def handle_data(self, data: str) -> None:
        if self._open is not None:
            self.links.append((*self._open, data))
            self._open = None


def links(msg: EmailMessage) -> list[tuple[str, str, str]]:
    parser = Links()
    parser.feed(html(msg))
    return parser.links


def mailto(href: str) -> tuple[str, dict[str, str]]:
    """(address, fields) of a mailto: URI, decoded as RFC 6068 says (``+`` stays ``+``)."""
    parts = urlsplit(href)
    assert parts.scheme == "mailto"
    fields = {}
    for pair in parts.query.split("&"):
        key, _, value = pair.partition("=")
        fields[key] = unquote(value)
    return unquote(parts.path), fields


def click(env: Env, user: str, msg: EmailMessage, label: str, handle: str,
          append: str = "") -> None:
    """Send the mail the action link ``label`` of email ``handle`` opens (what a mail client
    does with the link), with ``append`` typed after its subject."""
    [href] = [h for cmd, h, lab in links(msg) if lab == label and cmd.split()[1] == handle]
    address, fields = mailto(href)
    assert address == ASK
    command(env.port, user, fields["subject"] + append, fields.get("body", ""))


def handle_of(subject: str) -> str:
    return f"E{m.Email.get(m.Email.subject == subject).number}"


def cli_json(db_url: str, *argv: str) -> Any:
    """``dealmail ARGV --json`` as an admin runs it next to the running server: its own
    process on the same database (peewee's models are bound per process)."""
    done = subprocess.run(
        [sys.executable, "-m", "dealmail.cli", *argv, "--json", "--config", str(EXAMPLE),
         "--set", f"database.url={db_url}"], capture_output=True, text=True, timeout=60,
        check=False, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture
def env(server_factory: Any, tmp_path: Path) -> Any:
    with SmtpSink() as sink:
        running = server_factory(f"outbox.smarthost=127.0.0.1:{sink.port}",
                                 "outbox.smarthost_tls=opportunistic",
                                 start_outbox_worker=False)
        yield Env(running, sink)


def db_url(env: Env) -> str:
    return str(env.running.app.config.database.url)


# --------------------------------------------------------------------------- the loop


def test_digest_link_to_command_to_conversations_and_next_digest(env: Env) -> None:
    first = bcc(env.port, ALICE, "Pilot plan")
    h = handle_of("Pilot plan")
    digest = env.digest(ALICE)
    assert digest["Reply-To"] == ASK
    assert f"Pilot plan  [{h}]" in text(digest)
    assert f"Commands: private {h} | deal {h} <deal number or title> | unlink {h} | " \
           f"forget {h}" in text(digest)
    labels = [lab for cmd, _href, lab in links(digest) if cmd.split()[1] == h]
    assert labels == ["Private", "Move to deal…", "Unlink", "Forget"]

    click(env, ALICE, digest, "Private", h)
    answer = env.answer(ALICE)
    assert f"{h} “Pilot plan”: your copy is now private" in answer
    convs = cli_json(db_url(env), "conversations", "--as", ALICE,
                     "--person", "carl@other.test")
    [email] = convs["threads"][0]["emails"]
    assert (email["handle"], email["visibility"]) == (h, "private")
    # Private is the owner's business alone: Bob, on whose deal it is, no longer sees it.
    assert cli_json(db_url(env), "conversations", "--as", BOB,
                    "--person", "carl@other.test") == {"threads": []}

    # "Move to deal…" opens a mail whose subject waits for the deal: the user types it.
    click(env, ALICE, digest, "Move to deal…", h, append="Renewal 2027")
    assert f"{h} “Pilot plan”: the thread is now on deal #1 “Renewal 2027”." \
           in env.answer(ALICE)
    convs = cli_json(db_url(env), "conversations", "--as", ALICE, "--deal", "1")
    assert convs["threads"][0]["deal"] == {"id": 1, "title": "Renewal 2027"}
    assert [e["handle"] for e in convs["threads"][0]["emails"]] == [h]

    # The thread's next email follows the new deal, and the next digest says so.
    bcc(env.port, ALICE, "Re: Pilot plan", In_Reply_To=str(first["Message-ID"]))
    h2 = handle_of("Re: Pilot plan")
    nxt = env.digest(ALICE)
    assert "Deal #1 Renewal 2027\n Person: Carl Other\n  - " in text(nxt)
    assert f"Re: Pilot plan  [{h2}]" in text(nxt) and "Deal #3 Pilot" not in text(nxt)
    assert f"[{h}]" not in text(nxt)  # listed in the previous period's digest
    # The inbox answer lists both, the private copy offering "Share", the shared "Private".
    command(env.port, ALICE, "inbox")
    inbox = env.answer(ALICE)
    assert f"share {h} |" in inbox and f"private {h2} |" in inbox
    assert inbox.count("on deal #1 Renewal 2027") == 2


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks not installed")
def test_several_commands_in_one_mail_and_a_swaks_command(env: Env) -> None:
    bcc(env.port, ALICE, "Pilot plan")
    bcc(env.port, ALICE, "Pricing", to="Ann <ann@customer.test>")
    h1, h2 = handle_of("Pilot plan"), handle_of("Pricing")
    # One mail, commands in the subject and body, a typo and a greeting among them.
    command(env.port, ALICE, f"private {h1}",
            f"Hi dealmail,\ndeal {h2} Upsell\nprivte {h1}\nunlink {h1}\nE999 is mine\n"
            f"forget E999\nThanks\n")
    answer = env.answer(ALICE)
    assert f"{h1} “Pilot plan”: your copy is now private" in answer
    assert f"{h2} “Pricing”: the thread is now on deal #2 “Upsell seats”." in answer
    assert f"“privte {h1}”: not understood." in answer
    assert f"{h1} “Pilot plan”: the thread is on no deal now" in answer
    assert "E999: unknown, or not your email." in answer
    assert "Hi dealmail" not in answer and "Thanks" not in answer  # prose is no command
    audit = [(a.action, json.loads(a.detail_json)) for a in
             m.AuditEntry.select().where(m.AuditEntry.actor == ALICE).order_by(m.AuditEntry.id)
             if a.action in ("visibility", "deal", "unlink")]
    assert [(a, d["handle"], d["before"], d["after"], d["via"]) for a, d in audit] == [
        ("visibility", h1, "shared", "private", "mail"),
        ("deal", h2, [], 2, "mail"),
        ("unlink", h1, [3], None, "mail")]

    out = subprocess.run(
        ["swaks", "--server", f"127.0.0.1:{env.port}", "--from", ALICE, "--to", ASK,
         "--header", f"From: Alice <{ALICE}>", "--header", f"Subject: share {h1}",
         "--body", "sent with swaks"],
        capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"{h1} “Pilot plan”: your copy is now shared" in env.answer(ALICE)


def test_japanese_commands_and_thread_privacy_for_later_emails(env: Env) -> None:
    first = bcc(env.port, BOB, "見積もり")
    h = handle_of("見積もり")
    digest = env.digest(BOB)
    assert f"コマンド: 非公開 {h} |" not in text(digest)  # Bob's default is private
    assert f"コマンド: 共有 {h} | 案件 {h} <案件番号または案件名> | 紐付け解除 {h} | 削除 {h}" \
        in text(digest)
    assert [lab for cmd, _h, lab in links(digest) if cmd.split()[1] == h] == [
        "共有", "案件を変更…", "紐付け解除", "削除"]
    # Full-width handle and digits, Japanese keywords, several lines.
    wide = "Ｅ" + "".join(chr(ord(c) + 0xFEE0) for c in h[1:])
    command(env.port, BOB, f"共有 スレッド {wide}", f"案件 {h} Pilot\n")
    answer = env.answer(BOB)
    assert f"{h} 「見積もり」: このスレッドのあなたのメール 1 件を共有しました。" in answer
    assert f"{h} 「見積もり」: スレッドはすでに案件 #3「Pilot」に紐付いています。" in answer
    # Bob's later copy in that thread is shared, though his default is private.
    bcc(env.port, BOB, "Re: 見積もり", In_Reply_To=str(first["Message-ID"]))
    later = m.Email.get(m.Email.subject == "Re: 見積もり")
    assert m.Sighting.get(m.Sighting.email == later.id).visibility == "shared"
    assert later.thread_id == m.Email.get(m.Email.subject == "見積もり").thread_id
    # An unrelated email keeps his default.
    bcc(env.port, BOB, "別件")
    other = m.Email.get(m.Email.subject == "別件")
    assert m.Sighting.get(m.Sighting.email == other.id).visibility == "private"


def test_unlink_holds_for_the_thread_s_later_emails(env: Env) -> None:
    first = bcc(env.port, ALICE, "Pilot plan")
    h = handle_of("Pilot plan")
    command(env.port, ALICE, f"unlink {h}")
    assert "the thread is on no deal now" in env.answer(ALICE)
    bcc(env.port, ALICE, "Re: Pilot plan", In_Reply_To=str(first["Message-ID"]))
    [thread] = cli_json(db_url(env), "conversations", "--as", ALICE,
                        "--person", "carl@other.test")["threads"]
    # Carl's only open deal is no longer chosen automatically for this thread.
    assert thread["deal"] is None and len(thread["emails"]) == 2
    later = m.Email.get(m.Email.subject == "Re: Pilot plan")
    assert not m.Link.select().where((m.Link.email == later.id)
                                     & m.Link.deal.is_null(False)).exists()
    # A deal named again is followed by the thread's next emails.
    command(env.port, ALICE, f"deal {h} Pilot")
    assert "now on deal #3 “Pilot”" in env.answer(ALICE)
    bcc(env.port, ALICE, "Re: Re: Pilot plan", In_Reply_To=str(first["Message-ID"]))
    assert cli_json(db_url(env), "conversations", "--as", ALICE, "--person",
                    "carl@other.test")["threads"][0]["deal"]["title"] == "Pilot"


# --------------------------------------------------------------------------- who may


def test_colleague_and_admin_get_no_power_and_learn_nothing(env: Env) -> None:
    bcc(env.port, BOB, "Bob private terms", to="Ann <ann@customer.test>")
    bcc(env.port, ALICE, "Alice shared offer")
    hb, ha = handle_of("Bob private terms"), handle_of("Alice shared offer")
    before = [(s.id, s.visibility) for s in m.Sighting.select()]
    links_before = m.Link.select().count()
    unknown = "E9999"
    # Alice is an admin: Bob's private copy is still his alone.
    command(env.port, ALICE, f"share {hb}",
            f"forget {hb}\ndeal {hb} Pilot\nshow {hb}\nshare {unknown}")
    answer = env.answer(ALICE)
    assert "Bob private terms" not in answer
    for verb_line in (f"{hb}: unknown, or not your email.",
                      f"{unknown}: unknown, or not your email."):
        assert verb_line in answer
    assert answer.count(f"{hb}: unknown, or not your email.") == 3
    # Bob may see Alice's shared email (it is on a person) but it is not his copy.
    command(env.port, BOB, f"forget {ha}", f"unlink {ha}\nperson {ha} dora@customer.test")
    answer = env.answer(BOB)
    assert answer.count(f"{ha}: 不明、またはあなたのメールではありません。") == 3
    assert [(s.id, s.visibility) for s in m.Sighting.select()] == before
    assert m.Link.select().count() == links_before
    # A stranger and an unverified sender are refused at SMTP time; nothing is answered.
    for frm, src in (("Mallory <mallory@evil.test>", "mallory@evil.test"),):
        with pytest.raises(smtplib.SMTPDataError) as info:
            send(env.port, message(frm=frm, to=ASK, subject=f"forget {ha}"), [ASK], src)
        assert info.value.smtp_code == 550
    assert env.deliver() == []
    assert m.Email.select().count() == 2


def test_unverified_user_is_refused(server_factory: Any) -> None:
    running = server_factory('policy.trusted_networks=["10.0.0.0/8"]',
                             start_outbox_worker=False)
    with pytest.raises(smtplib.SMTPDataError) as info:
        command(running.port, ALICE, "forget E1")
    assert info.value.smtp_code == 550
    assert m.OutboxItem.select().count() == 0 and m.AuditEntry.select().where(
        m.AuditEntry.action == "forget").count() == 0


# --------------------------------------------------------------------------- ignore


def test_ignore_list_applies_to_capture_and_track_undoes_it(env: Env) -> None:
    command(env.port, ALICE, "ignore @other.test", "ignore ann@customer.test\nignored")
    answer = env.answer(ALICE)
    assert "@other.test: not tracked for you any more" in answer
    assert "ann@customer.test: not tracked for you any more" in answer
    assert "  - @other.test\n  - ann@customer.test" in answer  # "ignored" lists them
    bcc(env.port, ALICE, "Only Carl")  # every customer ignored: not tracked
    assert m.Email.select().count() == 0
    # A tracked customer keeps the conversation; the ignored one is neither linked nor made
    # a person.
    bcc(env.port, ALICE, "Carl and Dora", to="Carl <carl@other.test>, Dora "
                                             "<dora@customer.test>")
    email = m.Email.get(m.Email.subject == "Carl and Dora")
    linked = {m.Person.get_by_id(lk.person_id).name for lk in
              m.Link.select().where((m.Link.email == email.id) & m.Link.person.is_null(False))}
    assert linked == {"Dora Customer"}
    # Bob's list is his own.
    bcc(env.port, BOB, "Bob to Carl")
    assert m.Email.select().where(m.Email.subject == "Bob to Carl").exists()
    command(env.port, ALICE, "track @other.test")
    assert "@other.test: tracked again." in env.answer(ALICE)
    bcc(env.port, ALICE, "Carl again")
    assert m.Email.select().where(m.Email.subject == "Carl again").exists()


# --------------------------------------------------------------------------- forget


def marked_mail(user: str, subject: str) -> EmailMessage:
    name = "Alice" if user == ALICE else "Bob"
    msg = message(frm=f"{name} <{user}>", to="Zed <zed@newco.test>", subject=subject,
                  body=f"Hello Zed,\nthe secret is {MARKER}.\n")
    msg.add_attachment(f"attachment {MARKER}\n".encode() * 50, maintype="application",
                       subtype="octet-stream", filename="secret.bin")
    return msg


def rows_about(email_id: int, thread_id: int, address: str) -> dict[str, int]:
    return {
        "email": m.Email.select().where(m.Email.id == email_id).count(),
        "sighting": m.Sighting.select().where(m.Sighting.email == email_id).count(),
        "participant": m.Participant.select().where(m.Participant.email == email_id).count(),
        "link": m.Link.select().where((m.Link.email == email_id)
                                      | (m.Link.thread == thread_id)).count(),
        "pending": m.PendingChoice.select().where(m.PendingChoice.email == email_id).count(),
        "thread": m.Thread.select().where(m.Thread.id == thread_id).count(),
        "person": m.PersonAddress.select().where(m.PersonAddress.address == address).count(),
        "audit": m.AuditEntry.select().where(m.AuditEntry.email == email_id).count(),
    }


def forget_scenario(env: Env) -> None:
    send(env.port, marked_mail(ALICE, "Never track this"), [BCC], ALICE)
    email = m.Email.get(m.Email.subject == "Never track this")
    h = f"E{email.number}"
    assert MARKER.encode() in bytes(email.raw)
    assert m.PersonAddress.select().where(m.PersonAddress.address == "zed@newco.test").exists()
    command(env.port, ALICE, f"forget {h}")
    assert f"{h}: your copy is forgotten." in env.answer(ALICE)
    gone = rows_about(email.id, email.thread_id, "zed@newco.test")
    assert gone == dict.fromkeys(gone, 0)
    [entry] = m.AuditEntry.select().where(m.AuditEntry.action == "forget")
    detail = json.loads(entry.detail_json)
    assert (entry.email_id, detail["handle"], detail["email_deleted"]) == (None, h, True)
    assert MARKER not in entry.detail_json
    # Nothing else in the database holds the message: its bytes were only in the email row.
    for model in m.ALL_MODELS:
        for row in model.select().dicts():
            for value in row.values():
                if isinstance(value, (bytes, memoryview, str)):
                    assert MARKER.encode() not in (value.encode() if isinstance(value, str)
                                                   else bytes(value)), model
    # Sent again by the user, it is tracked again as a new email with a new handle.
    send(env.port, marked_mail(ALICE, "Never track this"), [BCC], ALICE)
    again = m.Email.get(m.Email.subject == "Never track this")
    assert again.number > email.number


def test_forget_leaves_no_row_and_no_byte_on_sqlite(env: Env) -> None:
    forget_scenario(env)
    path = Path(str(env.running.app.store.db.database))

    def files_with_marker() -> list[Path]:
        return [p for p in (path, Path(f"{path}-wal"))
                if p.exists() and MARKER.encode() in p.read_bytes()]

    assert files_with_marker()  # the copy sent again is on disk: the check can see it
    command(env.port, ALICE, f"forget {handle_of('Never track this')}")
    assert "your copy is forgotten" in env.answer(ALICE)
    # secure_delete zeroes freed pages; the truncating checkpoint after the commit removes
    # the write-ahead log's older page images.
    assert files_with_marker() == []


def test_forget_on_postgresql(server_factory: Any, pg_url: str) -> None:
    with SmtpSink() as sink:
        running = server_factory(f"database.url={pg_url}",
                                 f"outbox.smarthost=127.0.0.1:{sink.port}",
                                 "outbox.smarthost_tls=opportunistic",
                                 start_outbox_worker=False)
        forget_scenario(Env(running, sink))


def test_forgotten_copy_is_not_revived_by_a_colleague_s_copy(env: Env) -> None:
    """Alice forgets her copy of a message Bob has too: the email stays for Bob; Bob sending
    it again never brings Alice's copy back; Alice sending it again does."""
    msg = message(frm="Carl <carl@other.test>", to="Alice <alice@example.com>, "
                  "Bob <bob@example.com>", subject="To both of you")
    for user in (ALICE, BOB):
        fwd = message(frm=f"X <{user}>", to=BCC, subject="Fwd: To both of you", body="fyi")
        fwd.add_attachment(msg)
        send(env.port, fwd, [BCC], user)
    email = m.Email.get(m.Email.subject == "To both of you")
    h = f"E{email.number}"
    assert m.Sighting.select().where(m.Sighting.email == email.id).count() == 2
    command(env.port, ALICE, f"forget {h}")
    assert f"{h}: your copy is forgotten." in env.answer(ALICE)  # the same words either way
    owners = {s.user.address for s in m.Sighting.select().where(m.Sighting.email == email.id)}
    assert owners == {BOB}
    fwd = message(frm="Bob <bob@example.com>", to=BCC, subject="Fwd: again", body="fyi")
    fwd.add_attachment(msg)
    send(env.port, fwd, [BCC], BOB)
    owners = {s.user.address for s in m.Sighting.select().where(m.Sighting.email == email.id)}
    assert owners == {BOB}
    fwd = message(frm="Alice <alice@example.com>", to=BCC, subject="Fwd: mine", body="fyi")
    fwd.add_attachment(msg)
    send(env.port, fwd, [BCC], ALICE)
    owners = {s.user.address for s in m.Sighting.select().where(m.Sighting.email == email.id)}
    assert owners == {ALICE, BOB}


def test_unlink_closes_the_which_deal_question(env: Env) -> None:
    """Ann has two open deals: a question is asked. "unlink" answers it for good: the
    question is void, an answer to it later changes nothing and says why."""
    bcc(env.port, ALICE, "Proposal", to="Ann <ann@customer.test>")
    env.clock.advance(timedelta(minutes=6))  # questions wait for the batch window
    [question] = [x for x in env.deliver() if x["X-Dealmail-Auto"] == "question"]
    h = handle_of("Proposal")
    command(env.port, ALICE, f"unlink {h}")
    assert f"{h} “Proposal”: the thread is on no deal now" in env.answer(ALICE)
    assert [p.state for p in m.PendingChoice.select()] == ["void"]
    reply = message(frm="Alice <alice@example.com>", to=str(question["Reply-To"]),
                    subject="Re: " + str(question["Subject"]), body="1\n")
    send(env.port, reply, [str(question["Reply-To"]).strip("<>")], ALICE)
    [note] = [x for x in env.deliver() if x["X-Dealmail-Auto"] == "answer"]
    assert "was taken off any deal (unlink), so this question is closed" in text(note)
    assert f"mail “deal {h} <deal>” to {ASK}" in text(note)
    email = m.Email.get(m.Email.subject == "Proposal")
    assert m.Thread.get_by_id(email.thread_id).deal_id is None
    assert [p.state for p in m.PendingChoice.select()] == ["void"]


def test_a_waiting_question_forgets_a_forgotten_email(env: Env) -> None:
    """Two emails to Ann wait in one "which deal?" question (the batch window): forgetting
    one draws the question again without it; forgetting the other drops it, bytes and all."""
    bcc(env.port, ALICE, "First offer", to="Ann <ann@customer.test>")
    bcc(env.port, ALICE, "Second offer", to="Ann <ann@customer.test>")
    [item] = m.OutboxItem.select().where(m.OutboxItem.kind == "question")
    assert "2 emails" in item.subject
    command(env.port, ALICE, f"forget {handle_of('First offer')}")
    env.deliver()  # the answer; the question still waits for its window
    item = m.OutboxItem.get_by_id(item.id)
    assert item.state == "queued" and item.subject == "Which deal? Second offer"
    assert b"First offer" not in bytes(item.message)
    command(env.port, ALICE, f"forget {handle_of('Second offer')}")
    env.deliver()
    item = m.OutboxItem.get_by_id(item.id)
    assert (item.state, bytes(item.message), item.subject) == ("dropped", b"", "")
    env.clock.advance(timedelta(minutes=6))
    assert [x for x in env.deliver() if x["X-Dealmail-Auto"] == "question"] == []
