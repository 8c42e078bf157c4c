"""Mailbox sync against a scripted IMAP server (``tests/support/fakeimap.py``), for what a real
Dovecot will not do (docs/reliability.md E.6): E.6.12 hostile answers, E.6.10 Gmail's X-GM
extensions, E.6.11 localized special-use folder names, E.6.13 PREAUTH before STARTTLS and
XOAUTH2 refresh, E.6.14 untrusted certificates, E.6.15 throttling, E.6.8/E.6.9 BYE during IDLE
and IDLE renewal, E.6.6 and E.6.7 an expunge before the body fetch and HIGHESTMODSEQ.
"""

from __future__ import annotations

import json
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import trustme
from support.dovecot import config_with, imap_emails, mail, new_sync, one_pass
from support.fakeimap import FakeImap, Folder, TokenEndpoint, write_secret

from crmstore import models as m
from dealmail.cli import main as cli_main
from mta.imapsync.client import ImapSecurityError, connect
from mta.imapsync.credentials import CredentialError, Credentials
from mta.imapsync.service import configured_accounts
from mta.imapsync.sync import Reconnect


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def fake(ca: trustme.CA) -> Any:
    server = FakeImap(cert=ca.issue_cert("127.0.0.1", "localhost"),
                      users={"alice@fake.test": "pw-1"}).start()
    yield server
    server.stop()


def block(tmp_path: Path, fake: FakeImap, ca: trustme.CA | None, **extra: Any) -> str:
    ca_line = ""
    if ca is not None:
        ca_path = tmp_path / "fake-ca.pem"
        ca.cert_pem.write_to_path(str(ca_path))
        ca_line = f'ca_file = "{ca_path}"\n'
    lines = {"provider": "imap", "host": "127.0.0.1", "port": fake.port, "tls": "implicit",
             "username": "alice@fake.test", "since_days": 0}
    if not any(k.startswith("oauth2") or k.startswith("password") for k in extra):
        lines["password_file"] = str(write_secret(tmp_path / "pw", "pw-1"))
    lines.update(extra)
    text = "[[companies.users.mailboxes]]\n" + ca_line
    for key, value in lines.items():
        if isinstance(value, list):
            text += f"{key} = {json.dumps(value)}\n"
        elif isinstance(value, int) and not isinstance(value, bool):
            text += f"{key} = {value}\n"
        else:
            text += f"{key} = {json.dumps(value)}\n"
    return text + "\n"


def passes(running: Any, times: int = 10) -> None:
    """Catch-ups until one completes: an unreadable answer drops the connection (the next
    one reads the culprit alone), as the service's thread would."""
    sync = new_sync(running)
    for _ in range(times):
        try:
            one_pass(running, sync)
            return
        except Reconnect:
            continue
    raise AssertionError("no complete pass")


def test_hostile_answers_fail_one_message_each_and_the_sync_goes_on(
        tmp_path: Path, fake: FakeImap, ca: trustme.CA, app_factory: Any) -> None:
    for i in range(1, 8):
        fake.add("INBOX", mail(i, subject=f"m{i}"))
    fake.hostile[2] = b"* 2 FETCH (UID 2 BODY[] {4294967295}\r\n"  # a 4 GiB literal
    fake.hostile[3] = b'* 3 FETCH (UID 3 X-JUNK "' + b"a" * 2_000_000 + b'")\r\n'  # long line
    fake.hostile[4] = b"* 4 FETCH (UID 4 BODY[] {5}\r\nhello\r\n"  # unbalanced parenthesis
    six = mail(6)
    fake.hostile[6] = (b"* 6 FETCH (UID 6 ENVELOPE (NIL NIL NIL NIL NIL NIL NIL NIL NIL NIL) "
                       b"BODY[] {%d}\r\n" % len(six) + six + b")\r\n")
    fake.folders["INBOX"].messages[4].raw = (  # UID 5: a non-UTF-8 header
        b"From: <carl@other.test>\r\nTo: <alice@example.com>\r\nSubject: caf\xe9 \xff\r\n"
        b"Message-ID: <latin@x.test>\r\n\r\nbody\r\n")
    running = app_factory(config_with(tmp_path, block(tmp_path, fake, ca)))
    passes(running)
    rows = {r.uid: r for r in m.MailboxMessage.select()}
    assert {u for u, r in rows.items() if r.outcome == "unreadable"} == {2, 3, 4}
    for uid in (2, 3, 4):
        assert rows[uid].state == "failed" and "could not be read" in rows[uid].reason
    assert rows[2].reason.find("4294967295") > 0
    assert {u for u, r in rows.items() if r.state == "done"} == {1, 5, 6, 7}
    assert m.MailboxFolder.get().last_uid == 7
    assert imap_emails() == 4
    # RFC 2971 ID after login and before the first EXAMINE (NetEase refuses SELECT without).
    commands = [line.split(b" ", 2)[1].upper() for line in fake.lines if b" " in line]
    assert commands.index(b"ID") < commands.index(b"EXAMINE")
    assert commands.index(b"LOGIN") < commands.index(b"ID")


def test_gmail_all_mail_labels_and_one_record_per_msgid(tmp_path: Path, fake: FakeImap,
                                                        ca: trustme.CA,
                                                        app_factory: Any) -> None:
    fake.capabilities.append("X-GM-EXT-1")
    fake.folders = {
        "INBOX": Folder("INBOX", ("\\HasNoChildren",)),
        "[Gmail]/All Mail": Folder("[Gmail]/All Mail", ("\\HasNoChildren", "\\All"), 7),
        "[Gmail]/Gesendet": Folder("[Gmail]/Gesendet", ("\\HasNoChildren", "\\Sent"), 8),
        "Customers": Folder("Customers", ("\\HasNoChildren",), 9),
    }
    raw = mail(1, subject="label test", message_id="<gm-1@x.test>")
    for folder in ("INBOX", "[Gmail]/All Mail", "Customers"):
        fake.add(folder, raw, gm_msgid=1111, gm_thrid=2222, labels=("\\Inbox", "Customers"))
    fake.add("[Gmail]/All Mail", mail(2, subject="archived only"), gm_msgid=3333,
             gm_thrid=3333)
    config = config_with(tmp_path, block(tmp_path, fake, ca, provider="gmail"))
    running = app_factory(config)
    sync = one_pass(running)
    assert [p.name for p in sync.plan] == ["[Gmail]/All Mail"]  # every message once
    assert sync.sent_folder == "[Gmail]/Gesendet"  # localized, found by its \Sent flag
    assert imap_emails() == 2
    evidence = json.loads(m.Sighting.get(m.Sighting.email == m.Email.get(
        m.Email.message_id == "<gm-1@x.test>").id).evidence_json)
    assert evidence["gm_thrid"] == "2222" and evidence["labels"] == ["\\Inbox", "Customers"]
    # Several folders configured: the same X-GM-MSGID is read once, recorded per folder.
    running.stop()
    second = tmp_path / "second"
    second.mkdir()
    config = config_with(second, block(second, fake, ca, provider="gmail",
                                       folders=["INBOX", "[Gmail]/All Mail", "Customers"]))
    fake.body_fetches.clear()
    running = app_factory(config)
    one_pass(running)
    assert m.Email.select().where(m.Email.message_id == "<gm-1@x.test>").count() == 1
    assert len(fake.body_fetches) == 2  # gm-1 once, the archived one once
    rows = list(m.MailboxMessage.select().where(m.MailboxMessage.gm_msgid == "1111"))
    assert len(rows) == 3 and sorted(r.outcome for r in rows) == ["repeat", "repeat", "stored"]


def test_localized_sent_folder_in_modified_utf7_and_imap_test_command(
        tmp_path: Path, fake: FakeImap, ca: trustme.CA, capsys: Any,
        restore_logging: Any) -> None:
    fake.folders["&AMk-l&AOk-ments envoy&AOk-s"] = Folder(
        "&AMk-l&AOk-ments envoy&AOk-s", ("\\HasNoChildren", "\\Sent"), 5)
    config = config_with(tmp_path, block(tmp_path, fake, ca))
    code = cli_main(["--config", str(config.path), "imap", "test", "alice@example.com"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "Éléments envoyés  \\sent" in out
    assert "INBOX  (inbox: mail you receive)" in out
    assert "Éléments envoyés  (sent: mail you send (flagged \\Sent, RFC 6154))" in out
    assert fake.body_fetches == []  # the test reads nothing


def test_preauth_before_starttls_is_refused_without_sending_credentials(
        tmp_path: Path, ca: trustme.CA) -> None:
    with FakeImap(tls=False, cert=ca.issue_cert("127.0.0.1"), greeting="* PREAUTH welcome",
                  users={"alice@fake.test": "pw-1"}) as fake:
        config = config_with(tmp_path, block(tmp_path, fake, ca, tls="starttls"))
        account = next(iter(configured_accounts(config)[0].values()))
        with pytest.raises(ImapSecurityError, match="PREAUTH"):
            connect(account, Credentials(account, tmp_path, lambda: None),  # type: ignore
                    tmp_path, timeout=5, max_literal=1 << 20)
        assert not any(b"LOGIN" in line.upper() or b"pw-1" in line for line in fake.lines)


def test_starttls_works_and_is_required(tmp_path: Path, ca: trustme.CA) -> None:
    with FakeImap(tls=False, cert=ca.issue_cert("127.0.0.1"),
                  users={"alice@fake.test": "pw-1"}) as fake:
        config = config_with(tmp_path, block(tmp_path, fake, ca, tls="starttls"))
        account = next(iter(configured_accounts(config)[0].values()))
        client = connect(account, Credentials(account, tmp_path, lambda: None),  # type: ignore
                         tmp_path, timeout=5, max_literal=1 << 20)
        client.logout()
        assert fake.lines[1].upper().endswith(b"STARTTLS\r\n")


def test_untrusted_certificate_is_refused_unless_pinned(tmp_path: Path, fake: FakeImap,
                                                        ca: trustme.CA) -> None:
    config = config_with(tmp_path, block(tmp_path, fake, None))
    account = next(iter(configured_accounts(config)[0].values()))
    with pytest.raises(ImapSecurityError, match="not trusted"):
        connect(account, Credentials(account, tmp_path, lambda: None),  # type: ignore
                tmp_path, timeout=5, max_literal=1 << 20)
    assert fake.logins == 0


def test_xoauth2_token_refreshed_when_refused(tmp_path: Path, fake: FakeImap, ca: trustme.CA,
                                              clock: Any) -> None:
    endpoint = TokenEndpoint(fake)
    try:
        config = config_with(tmp_path, block(
            tmp_path, fake, ca, provider="gmail",
            oauth2_refresh_token_file=str(write_secret(tmp_path / "refresh", "refresh-1")),
            oauth2_client_id="client-1", oauth2_token_url=endpoint.url))
        account = next(iter(configured_accounts(config)[0].values()))
        creds = Credentials(account, tmp_path, clock.now)
        connect(account, creds, tmp_path, timeout=5, max_literal=1 << 20).logout()
        assert endpoint.issued == 1 and endpoint.requests[0]["client_id"] == "client-1"
        # The server stops accepting the cached token (expired, revoked): refreshed once.
        fake.tokens = {"something-else"}
        connect(account, creds, tmp_path, timeout=5, max_literal=1 << 20).logout()
        assert endpoint.issued == 2
        # The refresh token itself is revoked: the account fails with the endpoint's words.
        endpoint.refresh_token = "another"
        fake.tokens = set()
        with pytest.raises(CredentialError, match="HTTP 400 Token has been revoked"):
            connect(account, creds, tmp_path, timeout=5, max_literal=1 << 20)
    finally:
        endpoint.stop()


def wait_for(predicate: Any, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError("condition not reached")


def test_throttling_backs_off_and_keeps_progress(tmp_path: Path, fake: FakeImap,
                                                 ca: trustme.CA, app_factory: Any,
                                                 clock: Any) -> None:
    for i in range(250):
        fake.add("INBOX", mail(i))
    config = config_with(tmp_path, block(tmp_path, fake, ca), "imap.chunk_messages=100")
    running = app_factory(config)
    sync = one_pass(running)
    assert sync.last_stats["INBOX"].stored == 250
    for i in range(250, 400):
        fake.add("INBOX", mail(i))
    fake.fetch_reply = "NO [ALERT] Account exceeded command or bandwidth limits. (Failure)"
    running.app.start_imap_sync = True
    running.app.imap.start()
    wait_for(lambda: (m.MailboxAccount.get().state == "failing"))
    row = m.MailboxAccount.get()
    assert "bandwidth limits" in row.last_error
    assert row.next_retry_at > clock.now().replace(tzinfo=None) + timedelta(seconds=20)
    logins = fake.logins
    time.sleep(0.3)
    assert fake.logins == logins  # no reconnect storm while the back-off runs
    assert m.MailboxFolder.get().last_uid == 250  # progress kept
    fake.fetch_reply = None
    clock.advance(timedelta(minutes=2))
    wait_for(lambda: imap_emails() == 400)
    wait_for(lambda: m.MailboxAccount.get().state == "ok")


def test_bye_in_idle_reconnects_and_catches_up_and_idle_is_renewed(
        tmp_path: Path, fake: FakeImap, ca: trustme.CA, app_factory: Any, clock: Any) -> None:
    fake.add("INBOX", mail(1))
    config = config_with(tmp_path, block(tmp_path, fake, ca), "imap.poll_seconds=60")
    app_factory(config, sync=True)
    wait_for(lambda: imap_emails() == 1)
    wait_for(lambda: sum(b"IDLE" in x for x in fake.lines) >= 1)
    # IDLE renewed at the end of each cycle (on the injected clock).
    clock.advance(timedelta(seconds=61))
    wait_for(lambda: sum(b"IDLE" in x for x in fake.lines) >= 2)
    assert sum(x.strip().upper() == b"DONE" for x in fake.lines) >= 1
    # The server says BYE in IDLE; a message arrives while we are away.
    fake.bye_in_idle = True
    clock.advance(timedelta(seconds=61))
    wait_for(lambda: m.MailboxAccount.get().last_error != "")
    fake.bye_in_idle = False
    fake.add("INBOX", mail(2))
    row = m.MailboxAccount.get()
    assert row.state == "ok"  # a drop is not a failing account
    clock.advance(timedelta(seconds=10))
    wait_for(lambda: imap_emails() == 2)


def test_expunged_before_the_body_fetch_and_modseq_going_down(tmp_path: Path, fake: FakeImap,
                                                              ca: trustme.CA,
                                                              app_factory: Any) -> None:
    """E.6.6: a message expunged between the size fetch and the body fetch is passed
    without an error or a lost checkpoint; E.6.7: HIGHESTMODSEQ going down under the same
    UIDVALIDITY reads the folder again (nothing doubled) and leaves an audit entry."""
    fake.capabilities += ["CONDSTORE"]
    fake.folders["INBOX"].highestmodseq = 50
    for i in range(1, 6):
        fake.add("INBOX", mail(i))
    fake.vanish = {3}
    running = app_factory(config_with(tmp_path, block(tmp_path, fake, ca)))
    one_pass(running)
    rows = {r.uid: r for r in m.MailboxMessage.select()}
    assert rows[3].state == "gone" and {rows[u].state for u in (1, 2, 4, 5)} == {"done"}
    folder = m.MailboxFolder.get()
    assert (folder.last_uid, folder.highest_modseq) == (5, 50)
    fetches = len(fake.body_fetches)
    one_pass(running)  # unchanged UIDNEXT and HIGHESTMODSEQ: nothing is fetched
    assert len(fake.body_fetches) == fetches
    fake.folders["INBOX"].highestmodseq = 7  # a broken server
    one_pass(running)
    folder = m.MailboxFolder.get()
    assert folder.epochs == 1 and folder.highest_modseq == 7
    assert len(fake.body_fetches) == fetches  # known UIDs are not read again
    assert imap_emails() == 4
    assert m.AuditEntry.get(m.AuditEntry.action == "imap_rescan").detail_json.find(
        "HIGHESTMODSEQ") > 0
