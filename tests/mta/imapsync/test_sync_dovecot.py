"""Mailbox sync against a real Dovecot (docs/reliability.md E.6), one user per test.

Cases covered here: E.6.1 initial sync with UID gaps (and no ``\\Seen`` set), E.6.2
incremental (``n:*`` returning the last message is not re-imported), E.6.3 and E.6.4
UIDVALIDITY changes (same and different content), E.6.8 IDLE pickup, E.6.13 wrong password
back-off, E.6.16 a message over the size cap and a 20 MB message, E.6.18 a message expunged on
the server stays in the CRM; the ``imap test``/``imap status`` commands; a shutdown during a
long first sync.
"""

from __future__ import annotations

import json
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from support.dovecot import imap_emails, imap_login, mail, one_pass, sync_config

from crmstore import models as m


def test_initial_sync_with_uid_gaps_then_incremental(tmp_path: Path, dovecot: Any,
                                                     app_factory: Any) -> None:
    login = dovecot.add_user()
    dovecot.deliver(login, [mail(i, sender=f"c{i % 50}@cust{i % 7}.test") for i in range(1100)])
    other = imap_login(dovecot, login)
    other.select_folder("INBOX")
    uids = other.search("ALL")
    gone = uids[::11]  # 100 UID gaps
    other.delete_messages(gone)
    other.expunge()
    running = app_factory(sync_config(tmp_path, dovecot, login))
    sync = one_pass(running)
    stats = sync.last_stats["INBOX"]
    assert (stats.fetched, stats.stored, stats.failed) == (1000, 1000, 0)
    assert imap_emails() == 1000
    assert m.Email.select().count() == 1000
    folder = m.MailboxFolder.get(m.MailboxFolder.name == "INBOX")
    assert folder.last_uid == max(uids)
    assert m.MailboxMessage.select().where(m.MailboxMessage.state == "done").count() == 1000
    # BODY.PEEK[] only: nothing was marked read.
    flags = other.get_flags(other.search("ALL"))
    assert all(b"\\Seen" not in f for f in flags.values())

    # Incremental: five new messages are the only ones fetched; then nothing at all (the
    # server answers "UID FETCH n:*" with the last message, which is not imported again).
    for i in range(5):
        other.append("INBOX", mail(2000 + i, sender="carl@other.test"))
    sync = one_pass(running)
    assert sync.last_stats["INBOX"].fetched == 5
    assert imap_emails() == 1005
    sync = one_pass(running)
    assert sync.last_stats["INBOX"].fetched == 0
    assert imap_emails() == 1005
    # Expunged on the server: kept in the CRM (never deleted by the sync).
    other.delete_messages(other.search("ALL")[:3])
    other.expunge()
    one_pass(running)
    assert imap_emails() == 1005
    other.logout()


def test_uidvalidity_change_same_messages_no_duplicates(tmp_path: Path, dovecot: Any,
                                                        app_factory: Any) -> None:
    login = dovecot.add_user()
    dovecot.deliver(login, [mail(i) for i in range(20)])
    running = app_factory(sync_config(tmp_path, dovecot, login))
    one_pass(running)
    before = m.MailboxFolder.get(m.MailboxFolder.name == "INBOX").uidvalidity
    assert imap_emails() == 20
    dovecot.forget_uids(login)  # Dovecot renumbers under a new UIDVALIDITY
    dovecot.deliver(login, [mail(100 + i) for i in range(3)])
    sync = one_pass(running)
    folder = m.MailboxFolder.get(m.MailboxFolder.name == "INBOX")
    assert folder.uidvalidity != before and folder.epochs == 1
    assert sync.last_stats["INBOX"].repeat == 20
    assert imap_emails() == 23 and m.Email.select().count() == 23
    assert m.AuditEntry.select().where(m.AuditEntry.action == "imap_rescan").count() == 1


def test_uidvalidity_change_new_content_keeps_the_old(tmp_path: Path, dovecot: Any,
                                                      app_factory: Any) -> None:
    login = dovecot.add_user()
    dovecot.deliver(login, [mail(i) for i in range(10)])
    running = app_factory(sync_config(tmp_path, dovecot, login))
    one_pass(running)
    for path in (dovecot.maildir(login) / "cur").iterdir():
        path.unlink()
    dovecot.forget_uids(login)
    dovecot.deliver(login, [mail(500 + i) for i in range(4)])
    one_pass(running)
    assert imap_emails() == 14  # 4 new, the 10 old ones preserved


def test_idle_picks_up_new_mail_within_seconds(tmp_path: Path, dovecot: Any,
                                               app_factory: Any) -> None:
    login = dovecot.add_user()
    dovecot.deliver(login, [mail(i) for i in range(3)])
    running = app_factory(sync_config(tmp_path, dovecot, login), sync=True)
    deadline = time.monotonic() + 10
    while imap_emails() < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert imap_emails() == 3
    time.sleep(0.3)  # the thread is in IDLE now
    other = imap_login(dovecot, login)
    start = time.monotonic()
    other.append("INBOX", mail(99, subject="arrived during IDLE"))
    while imap_emails() < 4 and time.monotonic() - start < 5:
        time.sleep(0.02)
    took = time.monotonic() - start
    other.logout()
    assert imap_emails() == 4, "not picked up"
    assert took < 2.0, f"picked up after {took:.2f}s"
    row = m.MailboxAccount.get()
    assert row.state == "ok" and row.lease_holder == running.app.imap.holder


def test_wrong_password_backs_off_on_the_clock(tmp_path: Path, dovecot: Any,
                                                app_factory: Any, clock: Any) -> None:
    login = dovecot.add_user()
    running = app_factory(sync_config(tmp_path, dovecot, login, password="wrong"), sync=True)
    attempts: list[float] = []
    deps = running.app.imap.deps
    real_connect = deps.connect

    def counting(*args: Any, **kw: Any) -> Any:
        attempts.append(time.monotonic())
        return real_connect(*args, **kw)

    deps.connect = counting
    running.app.imap.wake()
    deadline = time.monotonic() + 10
    row = None
    while time.monotonic() < deadline:
        row = m.MailboxAccount.get_or_none()
        if row is not None and row.state == "failing":
            break
        time.sleep(0.05)
    assert row is not None and row.state == "failing", row and row.last_error
    assert "AUTHENTICATIONFAILED" in row.last_error or "Authentication failed" in row.last_error
    first_delay = (row.next_retry_at - clock.now().replace(tzinfo=None)).total_seconds()
    assert 24 <= first_delay <= 36  # 30 s with up to 20% jitter
    time.sleep(0.5)  # no hot loop: the clock has not moved, nothing is tried
    tried = len(attempts)
    assert tried <= 1
    clock.advance(timedelta(seconds=40))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        row = m.MailboxAccount.get()
        if row.failures >= 2:
            break
        time.sleep(0.05)
    assert row.failures == 2 and row.failing_since is not None
    second = (row.next_retry_at - clock.now().replace(tzinfo=None)).total_seconds()
    assert 48 <= second <= 72  # doubled


def test_message_over_the_size_cap_is_headers_and_text(tmp_path: Path, dovecot: Any,
                                                       app_factory: Any) -> None:
    login = dovecot.add_user()
    big = (b"From: <carl@other.test>\r\nTo: <alice@example.com>\r\nSubject: big one\r\n"
           b"Message-ID: <big@sender.test>\r\nMIME-Version: 1.0\r\n"
           b"Content-Type: multipart/mixed; boundary=XX\r\n\r\n--XX\r\n"
           b"Content-Type: text/plain; charset=utf-8\r\n\r\nPlease see the attachment.\r\n"
           b"--XX\r\nContent-Type: application/octet-stream\r\n"
           b"Content-Transfer-Encoding: base64\r\n\r\n" + (b"QUFB" * 19 + b"\r\n") * 20000
           + b"--XX--\r\n")
    dovecot.deliver(login, [big, mail(1)])
    running = app_factory(sync_config(tmp_path, dovecot, login, max_message_size=200_000))
    sync = one_pass(running)
    assert sync.last_stats["INBOX"].stored == 2
    email = m.Email.get(m.Email.message_id == "<big@sender.test>")
    raw = bytes(email.raw)
    assert raw.startswith(b"X-Dealmail-Truncated: original of")
    assert b"Please see the attachment." in raw and len(raw) < 10_000
    assert "Please see the attachment" in email.snippet
    row = m.MailboxMessage.get(m.MailboxMessage.email == email.id)
    assert row.truncated


def test_twenty_megabyte_message(tmp_path: Path, dovecot: Any, app_factory: Any) -> None:
    login = dovecot.add_user()
    dovecot.deliver(login, [mail(1, size=20 * 1024 * 1024, subject="twenty")])
    running = app_factory(sync_config(tmp_path, dovecot, login))
    one_pass(running)
    email = m.Email.get(m.Email.subject == "twenty")
    assert email.size > 20 * 1024 * 1024


def test_imap_status_and_imap_test_commands(tmp_path: Path, dovecot: Any, app_factory: Any,
                                            capsys: Any, restore_logging: Any) -> None:
    from dealmail.cli import main as cli_main

    login = dovecot.add_user()
    dovecot.deliver(login, [mail(i) for i in range(4)])
    config = sync_config(tmp_path, dovecot, login)
    running = app_factory(config)
    one_pass(running)
    args = ["--config", str(config.path), "--set", f"database.url=sqlite:///{tmp_path}/dealmail.db"]
    assert cli_main([*args, "imap", "test", login]) == 0
    out = capsys.readouterr().out
    assert "INBOX  (inbox: mail you receive)" in out
    assert "Sent  (sent: mail you send (flagged \\Sent, RFC 6154))" in out
    assert "relayed mail filed in: Sent" in out
    assert cli_main([*args, "imap", "status", "--json"]) == 0
    (status,) = json.loads(capsys.readouterr().out)
    assert status["state"] == "ok" and status["messages_tracked"] == 4
    assert status["user"] == "alice@example.com" and status["last_error"] is None
    inbox = next(f for f in status["folders"] if f["name"] == "INBOX")
    assert inbox["last_uid"] == 4 and inbox["uidvalidity"]
    assert inbox["handled"] == 4 and inbox["progress_percent"] == 100.0
    assert cli_main([*args, "imap", "status"]) == 0
    assert "UIDVALIDITY" in capsys.readouterr().out


def test_stop_during_a_long_first_sync_ends_after_a_chunk(tmp_path: Path, dovecot: Any,
                                                         app_factory: Any) -> None:
    """Shutdown does not wait for a whole mailbox: the sync stops after the chunk it is
    committing, with its checkpoint, and the next start goes on from there."""
    login = dovecot.add_user()
    dovecot.deliver(login, [mail(i) for i in range(600)])
    running = app_factory(sync_config(tmp_path, dovecot, login, "imap.chunk_messages=20"),
                          sync=True)
    deadline = time.monotonic() + 20
    while imap_emails() < 40 and time.monotonic() < deadline:
        time.sleep(0.01)
    started = time.monotonic()
    running.app.imap.stop()
    assert time.monotonic() - started < 5
    done = imap_emails()
    assert 40 <= done < 600
    folder = m.MailboxFolder.get(m.MailboxFolder.name == "INBOX")
    assert folder.last_uid == done and folder.highest_modseq is None
    # imap status shows how far the first sync is.
    from mta.imapsync.service import status

    (entry,) = status(running.app.config)
    inbox = next(f for f in entry["folders"] if f["name"] == "INBOX")
    assert inbox["handled"] == done and inbox["newest_uid"] == 600
    assert inbox["progress_percent"] == round(100 * done / 600, 1) < 100
    sync = one_pass(running)
    assert sync.last_stats["INBOX"].fetched == 600 - done
    assert imap_emails() == 600
