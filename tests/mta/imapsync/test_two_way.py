"""Two-way sync against a real Dovecot: mail relayed by dealmail is filed in the user's Sent
folder once delivered and is not stored twice when the sync reads it back; the same message
seen through the Smart BCC address and through the mailbox is one email."""

from __future__ import annotations

import smtplib
import ssl
import sys
from pathlib import Path
from typing import Any

from support.dovecot import imap_login, mail, one_pass, sync_config

from crmstore import models as m

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "support"))
from smtpsink import SmtpSink

ALICE_PW = "correct horse battery staple"


def test_relayed_mail_is_filed_in_sent_once_and_read_back_as_a_repeat(
        tmp_path: Path, dovecot: Any, app_factory: Any) -> None:
    login = dovecot.add_user()
    with SmtpSink(starttls=True) as sink:
        config = sync_config(tmp_path, dovecot, login, "listeners.submission=127.0.0.1:0",
                             f"outbox.smarthost=127.0.0.1:{sink.port}",
                             "outbox.smarthost_tls=required", "relay.auth_failure_delay=0",
                             relay_password=ALICE_PW)
        running = app_factory(config)
        running.app.outbox.ssl_context = sink.client_ssl_context
        one_pass(running)  # the account knows its Sent folder
        raw = mail(1, sender="alice@example.com", to="carl@other.test",
                   subject="Pilot plan", message_id="<relayed-1@example.com>")
        raw = raw.replace(b"From: Sender <alice@example.com>", b"From: Alice <alice@example.com>")
        tls = ssl.create_default_context(
            cafile=str(tmp_path / "var" / "tls" / "dealmail-selfsigned.crt"))
        tls.check_hostname = False  # the self-signed certificate names dealmail.localhost
        with smtplib.SMTP("127.0.0.1", running.app.port("submission"), timeout=30) as s:
            s.starttls(context=tls)
            s.login("alice@example.com", ALICE_PW)
            s.sendmail("alice@example.com", ["carl@other.test"], raw)
        copy = m.SentCopy.get()
        assert copy.state == "waiting"
        one_pass(running)  # not delivered yet: not filed
        assert m.SentCopy.get().state == "waiting"
        assert running.call(running.app.outbox.run_once()) == 1
        assert len(sink.messages) == 1
        sync = one_pass(running)  # files it, then reads it back on the next pass
        assert m.SentCopy.get().state == "done" and bytes(m.SentCopy.get().raw) == b""
        other = imap_login(dovecot, login)
        other.select_folder("Sent", readonly=True)
        uids = other.search(["HEADER", "Message-ID", "<relayed-1@example.com>"])
        assert len(uids) == 1
        assert b"\\Seen" in other.get_flags(uids)[uids[0]]
        other.logout()
        sync = one_pass(running)
        assert sync.sent_folder == "Sent"
        assert m.Email.select().where(m.Email.message_id == "<relayed-1@example.com>").count() == 1
        email = m.Email.get(m.Email.message_id == "<relayed-1@example.com>")
        assert [s.channel for s in email.sightings] == ["relay"]
        row = m.MailboxMessage.get(m.MailboxMessage.folder == "Sent")
        assert (row.state, row.outcome, row.email_id) == ("done", "repeat", email.id)
        # Filing is idempotent: a second pass files nothing more.
        one_pass(running)
        other = imap_login(dovecot, login)
        other.select_folder("Sent", readonly=True)
        assert len(other.search("ALL")) == 1
        other.logout()


def test_bcc_copy_and_mailbox_copy_are_one_email(tmp_path: Path, dovecot: Any,
                                                 app_factory: Any) -> None:
    login = dovecot.add_user()
    running = app_factory(sync_config(tmp_path, dovecot, login))
    raw = mail(7, sender="alice@example.com", to="carl@other.test", subject="Quote",
               message_id="<quote-7@example.com>")
    with smtplib.SMTP("127.0.0.1", running.port, timeout=30) as s:
        s.sendmail("alice@example.com", ["example@dealmail.localhost"], raw)
    dovecot.deliver(login, [raw], folder="Sent")
    sync = one_pass(running)
    assert sync.last_stats["Sent"].repeat == 1
    email = m.Email.get(m.Email.message_id == "<quote-7@example.com>")
    assert m.Email.select().count() == 1
    assert [s.channel for s in email.sightings] == ["bcc"]


def test_never_track_list_applies_to_mailbox_and_bcc(tmp_path: Path, dovecot: Any,
                                                     app_factory: Any) -> None:
    login = dovecot.add_user()
    running = app_factory(sync_config(
        tmp_path, dovecot, login, alice_keys='never_track = ["lawyer.test", "hr@other.test"]\n'))
    dovecot.deliver(login, [mail(1, sender="counsel@lawyer.test", subject="private"),
                            mail(2, sender="hr@other.test", subject="also private"),
                            mail(3, sender="carl@other.test", subject="tracked")])
    sync = one_pass(running)
    assert (sync.last_stats["INBOX"].stored, sync.last_stats["INBOX"].ignored) == (1, 2)
    assert [e.subject for e in m.Email.select()] == ["tracked"]
    rows = {r.uid: r for r in m.MailboxMessage.select()}
    assert rows[1].outcome == "ignored" and "does not track" in rows[1].reason
    raw = mail(9, sender="alice@example.com", to="counsel@lawyer.test", subject="bcc'd")
    with smtplib.SMTP("127.0.0.1", running.port, timeout=30) as s:
        assert s.sendmail("alice@example.com", ["example@dealmail.localhost"], raw) == {}
    assert m.Email.select().count() == 1
