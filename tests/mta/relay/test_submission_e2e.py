"""Authenticated relay end to end: real dealmail submission listeners on loopback ports, real
clients (smtplib, swaks --tls --auth), a real SMTP server (``SmtpSink``) as the smarthost.

The App runs with the example config (passwords set with ``set_password_in_file``), the demo
CRM, an injected clock, and the outbox worker driven by hand (``run_outbox()``), so no test
sleeps. docs/reliability.md cases covered here: A.22 (Received with ESMTPSA), A.25 (outbound
smuggling, both policies), A.26 (STARTTLS command injection), A.27 (second STARTTLS),
A.28 (no AUTH before TLS, implicit TLS works, the inbound listener never offers AUTH),
A.29 (brute force per IP and per account, same answer, no password in logs), A.30 (sender
ownership, alternates allowed), A.31 (open relay on every listener), D.6.15 (the downstream
receives CRLF and dot-stuffed data; DKIM computed on that form).
"""

from __future__ import annotations

import base64
import json
import logging
import shutil
import smtplib
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from pathlib import Path
from typing import Any

import pytest

from crmstore import models as m
from dealmail.app import App
from dealmail.clock import FakeClock
from dealmail.config import load_config
from dealmail.passwords import hash_password, set_password_in_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "support"))
from conftest import RunningApp
from smtpsink import SmtpSink
from support.mail import message

ROOT = Path(__file__).resolve().parents[3]
EXAMPLE = ROOT / "conf" / "dealmail.example.toml"
ALICE_PW = "correct horse battery staple"
BOB_PW = "bob-secret-2026"


class Relay:
    """A started dealmail with its submission ports, its smarthost sink and a TLS client
    context that trusts the self-signed certificate dealmail created on first start."""

    def __init__(self, running: RunningApp, sink: SmtpSink, base: Path) -> None:
        self.running = running
        self.app = running.app
        self.sink = sink
        default = base / "var" / "tls" / "dealmail-selfsigned.crt"
        self.client_tls = ssl.create_default_context(
            cafile=str(default) if default.exists() else None)

    @property
    def sub_port(self) -> int:
        return self.app.port("submission")

    @property
    def subs_port(self) -> int:
        return self.app.port("submissions")

    @property
    def inbound_port(self) -> int:
        return self.app.port("inbound")

    def run_outbox(self) -> int:
        assert self.app.outbox is not None
        return int(self.running.call(self.app.outbox.run_once()))

    def client(self, source: str | None = None) -> smtplib.SMTP:
        s = smtplib.SMTP("127.0.0.1", self.sub_port, timeout=30,
                         source_address=(source, 0) if source else None)
        s.ehlo("client.test")
        s.starttls(context=self.client_tls)
        s.ehlo("client.test")
        return s

    def login(self, user: str = "alice@example.com", password: str = ALICE_PW,
              source: str | None = None) -> smtplib.SMTP:
        s = self.client(source)
        s.login(user, password)
        return s

    def send(self, message: EmailMessage | bytes, rcpts: list[str],
             mail_from: str = "alice@example.com", user: str = "alice@example.com",
             password: str = ALICE_PW) -> Any:
        raw = message if isinstance(message, bytes) else message.as_bytes(policy=SMTP_POLICY)
        with self.login(user, password) as s:
            return s.sendmail(mail_from, rcpts, raw)


@pytest.fixture
def relay_factory(tmp_path: Path, clock: FakeClock, dns: Any) -> Iterator[Any]:
    started: list[tuple[RunningApp, SmtpSink]] = []

    def start(*overrides: str, lenient: bool = False) -> Relay:
        conf = tmp_path / "dealmail.toml"
        shutil.copy(EXAMPLE, conf)
        set_password_in_file(conf, "alice@example.com", hash_password(ALICE_PW))
        set_password_in_file(conf, "bob@example.com", hash_password(BOB_PW))
        sink = SmtpSink(starttls=True, lenient=lenient).start()
        cfg = load_config(conf, [
            f"database.url=sqlite:///{tmp_path}/dealmail.db", "listeners.inbound=127.0.0.1:0",
            f"server.demo_data={ROOT / 'conf' / 'demo'}",
            "listeners.submission=127.0.0.1:0", "listeners.submissions=127.0.0.1:0",
            f"outbox.smarthost=127.0.0.1:{sink.port}", "outbox.smarthost_tls=required",
            "relay.auth_failure_delay=0", *overrides])
        running = RunningApp(App(cfg, clock=clock, base=tmp_path, dns_txt=dns.lookup_txt,
                                 dns_query=dns.lookup, outbox_ssl_context=sink.client_ssl_context,
                                 start_outbox_worker=False))
        running.start()
        started.append((running, sink))
        return Relay(running, sink, tmp_path)

    yield start
    for running, sink in started:
        running.stop()
        sink.stop()


@pytest.fixture
def relay(relay_factory: Any) -> Relay:
    return relay_factory()


def msg(frm: str = "Alice <alice@example.com>", to: str = "Ann <ann@customer.test>",
        subject: str = "Our offer", body: str = "Hello Ann,\nhere is the offer.\n",
        **headers: str) -> EmailMessage:
    return message(frm, to, subject, body, **headers)


def auth_plain(s: smtplib.SMTP, user: str, password: str) -> tuple[int, bytes]:
    """One AUTH PLAIN exchange (smtplib.login would try every mechanism: two failures)."""
    blob = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
    return s.docmd("AUTH", f"PLAIN {blob}")


def items(kind: str | None = None) -> list[m.OutboxItem]:
    q = m.OutboxItem.select().order_by(m.OutboxItem.id)
    if kind:
        q = q.where(m.OutboxItem.kind == kind)
    return list(q)


# --------------------------------------------------------------------------- capture


def test_capture_and_delivery(relay: Relay) -> None:
    message = msg(Cc="Carl <carl@other.test>", Bcc="boss@partner.test")
    mid = message["Message-ID"]
    refused = relay.send(message, ["ann@customer.test", "carl@other.test",
                                   "boss@partner.test"])
    assert refused == {}

    # Stored and linked like a BCC copy, in the same transaction as the queueing.
    email = m.Email.get(m.Email.message_id == mid)
    sighting = m.Sighting.get(m.Sighting.email == email.id)
    assert sighting.channel == "relay"
    assert sighting.visibility == "shared"  # alice's default visibility
    assert sighting.verification == "authenticated"
    assert b"Bcc: boss@partner.test" in bytes(email.raw)  # kept in the stored copy
    ann = m.PersonAddress.get(m.PersonAddress.address == "ann@customer.test").person_id
    assert ann in {p.person_id for p in m.Participant.select()
                   .where(m.Participant.email == email.id)}

    queued = items("relay")
    assert sorted(i.domain for i in queued) == ["customer.test", "other.test", "partner.test"]
    assert {i.mail_from for i in queued} == {"alice@example.com"}

    assert relay.run_outbox() == 3
    got = relay.sink.messages
    assert sorted(r for g in got for r in g.rcpt_tos) == [
        "ann@customer.test", "boss@partner.test", "carl@other.test"]
    for g in got:
        assert g.tls and g.mail_from == "alice@example.com"
        headers = g.data.split(b"\r\n\r\n", 1)[0]
        assert b"\nBcc:" not in headers and not headers.startswith(b"Bcc:")
        assert f"Message-ID: {mid}".encode() in headers  # replies thread on it
        assert headers.startswith(b"Received: from client.test ([127.0.0.1])")
        assert b"with ESMTPSA id" in headers
        assert b"Hello Ann," in g.data
    assert {i.state for i in items("relay")} == {"sent"}


def test_colleagues_only_are_delivered_but_not_tracked(relay: Relay) -> None:
    message = msg(to="Bob <bob@example.com>", subject="lunch?")
    relay.send(message, ["bob@example.com"])
    assert m.Email.select().where(
        m.Email.message_id == message["Message-ID"]).count() == 0
    assert len(items("relay")) == 1
    assert relay.run_outbox() == 1
    assert relay.sink.messages[0].rcpt_tos == ["bob@example.com"]


def test_swaks_tls_auth_plain_and_login(relay: Relay) -> None:
    swaks = shutil.which("swaks")
    if swaks is None:
        pytest.skip("swaks not installed (scripts/test installs it)")
    for mech in ("PLAIN", "LOGIN"):
        result = subprocess.run(
            [swaks, "--server", "127.0.0.1", "--port", str(relay.sub_port), "--tls",
             "--auth", mech, "--auth-user", "alice@example.com", "--auth-password", ALICE_PW,
             "--ehlo", "swaks.test", "--from", "alice@example.com",
             "--to", "ann@customer.test", "--header", f"Subject: via swaks {mech}",
             "--header", "From: Alice <alice@example.com>", "--body", "sent by swaks"],
            capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "235 2.7.0" in result.stdout
        assert "250 2.0.0 Ok: queued as" in result.stdout
    subjects = sorted(i.subject for i in items("relay"))
    assert subjects == ["via swaks LOGIN", "via swaks PLAIN"]
    assert relay.run_outbox() == 2
    assert len(relay.sink.messages) == 2
    assert m.Sighting.select().where(m.Sighting.channel == "relay").count() == 2


def test_implicit_tls_listener(relay: Relay) -> None:
    with smtplib.SMTP_SSL("127.0.0.1", relay.subs_port, context=relay.client_tls,
                          timeout=30) as s:
        s.ehlo("client.test")
        assert "starttls" not in s.esmtp_features
        assert "PLAIN" in s.esmtp_features["auth"]
        s.login("alice@example.com", ALICE_PW)
        s.sendmail("alice@example.com", ["ann@customer.test"],
                   msg().as_bytes(policy=SMTP_POLICY))
    assert len(items("relay")) == 1


def test_temporary_then_permanent_failure_end_to_end(relay: Relay, clock: FakeClock) -> None:
    relay.sink.script(rcpt={"ann@customer.test": "451 4.2.1 greylisted",
                            "dora@customer.test": "550 5.1.1 no such user"})
    relay.send(msg(to="Ann <ann@customer.test>, Dora <dora@customer.test>"),
               ["ann@customer.test", "dora@customer.test"])
    assert relay.run_outbox() == 1
    assert relay.sink.messages == []
    [dsn] = items("dsn")  # Dora's failure, now; Ann is retried later
    assert json.loads(dsn.recipients_json) == ["alice@example.com"] and dsn.mail_from == ""
    clock.advance(timedelta(minutes=5))
    relay.sink.script()
    # Ann's retry, the DSN, and any question dealmail itself queued (Ann has two open deals).
    assert relay.run_outbox() >= 2
    relayed = [g for g in relay.sink.messages if g.mail_from == "alice@example.com"]
    assert [g.rcpt_tos for g in relayed] == [["ann@customer.test"]]  # Dora is not retried
    [report] = [g for g in relay.sink.messages if b"multipart/report" in g.data]
    assert report.mail_from == "" and report.rcpt_tos == ["alice@example.com"]
    assert b"Status: 5.1.1" in report.data and b"dora@customer.test" in report.data


def test_configured_certificate_is_used(relay_factory: Any, tmp_path: Path) -> None:
    from mta.relay.tlscert import ensure_self_signed

    cert, key = tmp_path / "own" / "c.pem", tmp_path / "own" / "k.pem"
    assert ensure_self_signed(cert, key, "mail.example.com", FakeClock().now())
    assert not ensure_self_signed(cert, key, "mail.example.com", FakeClock().now())
    assert key.stat().st_mode & 0o077 == 0  # the key is private to dealmail
    relay = relay_factory("tls.cert_file=own/c.pem", "tls.key_file=own/k.pem")
    assert not (tmp_path / "var" / "tls").exists()  # no self-signed default was made
    context = ssl.create_default_context(cafile=str(cert))
    with smtplib.SMTP("127.0.0.1", relay.sub_port, timeout=30) as s:
        s.starttls(context=context)
        s.login("alice@example.com", ALICE_PW)


# --------------------------------------------------------------------------- AUTH


def test_wrong_password_and_unknown_user_get_the_same_answer(relay_factory: Any) -> None:
    relay = relay_factory("relay.auth_max_failures=10")
    answers = []
    for user, password in (("alice@example.com", "wrong"), ("nobody@example.com", ALICE_PW),
                           ("alice", ALICE_PW)):
        with relay.client() as s:
            answers.append(auth_plain(s, user, password))
    assert answers[0] == (535, b"5.7.8 Authentication credentials invalid")
    assert answers[0] == answers[1] == answers[2]
    # smtplib's LOGIN path (PLAIN, then LOGIN) gets the same refusal.
    with relay.client() as s, pytest.raises(smtplib.SMTPAuthenticationError) as info:
        s.login("alice@example.com", "wrong again")
    assert (info.value.smtp_code, info.value.smtp_error) == answers[0]
    # A user without a password (carol has none in the example) cannot log in either.
    relay.login().quit()


def test_auth_before_starttls_is_refused(relay: Relay) -> None:
    with smtplib.SMTP("127.0.0.1", relay.sub_port, timeout=30) as s:
        s.ehlo("client.test")
        assert "auth" not in s.esmtp_features
        assert "starttls" in s.esmtp_features
        blob = base64.b64encode(f"\0alice@example.com\0{ALICE_PW}".encode()).decode()
        code, text = s.docmd("AUTH", f"PLAIN {blob}")
        assert (code, text) == (538, b"5.7.11 Encryption required for requested "
                                     b"authentication mechanism")
        code, _ = s.docmd("MAIL", "FROM:<alice@example.com>")
        assert code == 530
    # The inbound listener never offers AUTH at all (docs/reliability.md A.28).
    with smtplib.SMTP("127.0.0.1", relay.inbound_port, timeout=30) as s:
        s.ehlo("client.test")
        assert "auth" not in s.esmtp_features
        code, _ = s.docmd("AUTH", f"PLAIN {blob}")
        assert code >= 500
    assert items() == []


def test_second_starttls_and_injected_commands(relay: Relay) -> None:
    with relay.client() as s:
        code, _ = s.docmd("STARTTLS")
        assert code == 503
    # A.26: a command pipelined after STARTTLS in cleartext is discarded.
    sock = socket.create_connection(("127.0.0.1", relay.sub_port), timeout=30)
    f = sock.makefile("rb")
    f.readline()
    sock.sendall(b"EHLO x.test\r\n")
    while not f.readline().startswith(b"250 "):
        pass
    sock.sendall(b"STARTTLS\r\nMAIL FROM:<alice@example.com>\r\n")
    assert f.readline().startswith(b"220")
    tls = relay.client_tls.wrap_socket(sock, server_hostname="127.0.0.1")
    tf = tls.makefile("rb")
    tls.sendall(b"EHLO x.test\r\n")
    lines = []
    while not (line := tf.readline()).startswith(b"250 "):
        lines.append(line)
    tls.sendall(b"RCPT TO:<ann@customer.test>\r\n")
    assert tf.readline()[:3] in (b"503", b"530")  # the injected MAIL never happened
    tls.close()


def test_login_throttling_cannot_be_turned_against_a_user(
        relay_factory: Any, clock: FakeClock, caplog: pytest.LogCaptureFixture,
        capsys: pytest.CaptureFixture[str], restore_logging: None) -> None:
    """Failed logins count per client address and per account from that address: wrong
    passwords for bob from one address lock bob out of that address only; his right
    password works from another, and a colleague behind the same (NAT) address is not
    affected. Too many failures from one address, whatever the accounts, lock the address.
    An unknown login is answered exactly like a wrong password. `dealmail auth status`
    shows it all and `dealmail auth unlock` clears it."""
    from datetime import UTC, datetime

    from dealmail.cli import main

    caplog.set_level(logging.DEBUG)
    clock.set(datetime.now(UTC))  # `dealmail auth` reads the table with the real time
    relay = relay_factory("relay.auth_max_failures=3", "relay.auth_client_max_failures=6",
                          "relay.auth_lockout_seconds=600")
    # Three wrong passwords for bob from 127.0.0.2: the third answered 421 4.7.0, closed.
    with relay.client("127.0.0.2") as s:
        assert auth_plain(s, "bob@example.com", "guess")[0] == 535
        assert auth_plain(s, "bob@example.com", "guess")[0] == 535
        assert auth_plain(s, "bob@example.com", "guess") == (
            421, b"4.7.0 Too many failed logins; try again later")
        with pytest.raises(smtplib.SMTPServerDisconnected):
            s.noop()
    # Bob's right password from that address is refused for a while...
    with relay.client("127.0.0.2") as s:
        assert auth_plain(s, "bob@example.com", BOB_PW)[0] == 421
    # ...but works from any other address, and alice behind the same address logs in.
    relay.login("bob@example.com", BOB_PW, source="127.0.0.3").quit()
    relay.login("alice@example.com", ALICE_PW, source="127.0.0.2").quit()
    # An unknown login gets the very same answers (no way to tell accounts apart).
    with relay.client("127.0.0.5") as s:
        answers = [auth_plain(s, "nobody@example.com", "guess") for _ in range(3)]
    assert answers == [(535, b"5.7.8 Authentication credentials invalid")] * 2 + [
        (421, b"4.7.0 Too many failed logins; try again later")]
    # Six failures from one address, over several accounts: the address is locked.
    with relay.client("127.0.0.4") as s:
        for login in ("alice@example.com", "bob@example.com", "carol@example.com",
                      "dave@example.com", "erin@example.com"):
            assert auth_plain(s, login, "guess")[0] == 535
        assert auth_plain(s, "frank@example.com", "guess")[0] == 421
    with relay.client("127.0.0.4") as s:
        assert auth_plain(s, "alice@example.com", ALICE_PW)[0] == 421
    # The admin's view, and the unlock.
    config = ["--config", str(relay.app.config.path), *[
        f"--set={o}" for o in (f"database.url={relay.app.config.database.url}",)]]
    capsys.readouterr()
    assert main(["auth", "status", "--json", *config]) == 0
    status = json.loads(capsys.readouterr().out)
    locked = {e["who"] for e in status if e["locked_until"]}
    assert {"bob@example.com from 127.0.0.2", "127.0.0.4",
            "nobody@example.com from 127.0.0.5"} <= locked
    assert {e["who"]: e["failures"] for e in status if e["kind"] == "account"}[
        "bob@example.com"] == 4
    assert main(["auth", "unlock", "bob@example.com", *config]) == 0
    assert "cleared" in capsys.readouterr().out
    relay.login("bob@example.com", BOB_PW, source="127.0.0.2").quit()
    assert main(["auth", "unlock", "127.0.0.4", *config]) == 0
    relay.login("alice@example.com", ALICE_PW, source="127.0.0.4").quit()
    # Locks end by themselves after the lockout (injected clock).
    with relay.client("127.0.0.5") as s:
        assert auth_plain(s, "nobody@example.com", "guess")[0] == 421
    clock.advance(timedelta(seconds=601))
    with relay.client("127.0.0.5") as s:
        assert auth_plain(s, "nobody@example.com", "guess")[0] == 535
    # Passwords never reach a log line, not even base64-encoded, at DEBUG.
    text = caplog.text
    for secret in (ALICE_PW, BOB_PW, "guess"):
        assert secret not in text
        assert base64.b64encode(f"\0alice@example.com\0{secret}".encode()).decode() not in text
        assert base64.b64encode(secret.encode()).decode() not in text
    assert "AUTH failed from 127.0.0.2" in text


# --------------------------------------------------------------------------- senders


def test_sending_as_a_colleague_is_refused(relay: Relay) -> None:
    with relay.login() as s:
        code, text = s.docmd("MAIL", "FROM:<bob@example.com>")
        assert code == 553 and text.startswith(b"5.7.1 Sender address rejected: not owned")
        s.rset()
        # Case-insensitive, and alternates are allowed.
        assert s.docmd("MAIL", "FROM:<Alice.Personal@MAIL.TEST>")[0] == 250
        s.rset()
        # Header From of a colleague with alice's envelope: refused at DATA.
        with pytest.raises(smtplib.SMTPDataError) as info:
            s.sendmail("alice@example.com", ["ann@customer.test"],
                       msg(frm="Bob <bob@example.com>").as_bytes(policy=SMTP_POLICY))
        assert info.value.smtp_code == 553
        assert b"5.7.1" in info.value.smtp_error
        # A Sender header must be hers too.
        with pytest.raises(smtplib.SMTPDataError):
            s.sendmail("alice@example.com", ["ann@customer.test"],
                       msg(Sender="bob@example.com").as_bytes(policy=SMTP_POLICY))
        s.sendmail("alice.personal@mail.test", ["ann@customer.test"],
                   msg(frm="Alice <alice.personal@mail.test>").as_bytes(policy=SMTP_POLICY))
    assert len(items("relay")) == 1


def test_resent_from_and_sender_are_checked_like_from(relay: Relay) -> None:
    """RFC 5322 §3.6.6: Resent-From and Resent-Sender name who sends a resent message, so
    they must be the user's own addresses, like From and Sender (553 5.7.1)."""
    with relay.login("bob@example.com", BOB_PW) as s:
        for header in ({"Resent_From": "Alice <alice@example.com>"},
                       {"Resent_Sender": "alice@example.com"},
                       {"Sender": "alice@example.com"}):
            with pytest.raises(smtplib.SMTPDataError) as info:
                s.sendmail("bob@example.com", ["ann@customer.test"],
                           msg(frm="Bob <bob@example.com>", **header).as_bytes(
                               policy=SMTP_POLICY))
            assert info.value.smtp_code == 553, header
            assert info.value.smtp_error.startswith(
                b"5.7.1 Sender address rejected: <alice@example.com> not owned by user "
                b"bob@example.com"), header
        s.sendmail("bob@example.com", ["ann@customer.test"],
                   msg(frm="Bob <bob@example.com>", Resent_From="bob@example.com").as_bytes(
                       policy=SMTP_POLICY))
    assert len(items("relay")) == 1


def test_source_routes_are_refused(relay: Relay) -> None:
    with relay.login() as s:
        code, text = s.docmd("MAIL", "FROM:<@relay.test:alice@example.com>")
        assert code == 553 and text.startswith(b"5.1.3 Source routes are not accepted")
        assert s.docmd("MAIL", "FROM:<alice@example.com>")[0] == 250
        for route in ("<@a.test,@b.test:x@y.test>", "< @a.test:ann@customer.test>"):
            code, text = s.docmd("RCPT", f"TO:{route}")
            assert code == 553 and text.startswith(b"5.1.3 Source routes"), route
        assert s.docmd("RCPT", "TO:<ann@customer.test>")[0] == 250
    with relay.client() as s:  # unauthenticated: aiosmtpd's order of checks first
        assert s.docmd("MAIL", "FROM:<@a.test:alice@example.com>")[0] == 530


def test_authorization_identity_must_be_the_login(relay: Relay) -> None:
    """AUTH PLAIN's authzid (RFC 4616 §2) asks to act as someone else: bob\0alice\0pw no
    longer logs in as alice; an empty one or the login itself is fine."""
    for authzid in ("bob@example.com", "someone"):
        with relay.client() as s:
            blob = base64.b64encode(f"{authzid}\0alice@example.com\0{ALICE_PW}".encode())
            code, text = s.docmd("AUTH", f"PLAIN {blob.decode()}")
            assert code == 535 and text.startswith(b"5.7.8 Authorization identity"), authzid
            assert s.docmd("MAIL", "FROM:<alice@example.com>")[0] == 530
    for authzid in ("", "Alice@Example.com"):
        with relay.client() as s:
            blob = base64.b64encode(f"{authzid}\0alice@example.com\0{ALICE_PW}".encode())
            assert s.docmd("AUTH", f"PLAIN {blob.decode()}")[0] == 235, authzid


OPEN_RELAY_ADDRESSES = [
    # The classic open-relay test set (docs/reliability.md A.8/A.31).
    "victim@elsewhere.test",
    "victim%elsewhere.test@dealmail.localhost",
    '"victim@elsewhere.test"@dealmail.localhost',
    "victim@elsewhere.test@dealmail.localhost",
    "@dealmail.localhost:victim@elsewhere.test",
    "elsewhere.test!victim@dealmail.localhost",
    "victim@[127.0.0.1]",
    "victim%elsewhere.test@[127.0.0.1]",
]


def test_open_relay_attempts_on_every_listener(relay: Relay) -> None:
    # Submission without AUTH (after STARTTLS, on both listeners): nothing is accepted.
    for make in (relay.client, lambda: _implicit(relay)):
        with make() as s:
            assert s.docmd("MAIL", "FROM:<alice@example.com>")[0] == 530
            for rcpt in OPEN_RELAY_ADDRESSES:
                assert s.docmd("RCPT", f"TO:<{rcpt}>")[0] >= 500
    # Inbound listener: only dealmail's own addresses; anything else 550 5.1.1 (or a
    # syntax refusal for the malformed forms).
    with smtplib.SMTP("127.0.0.1", relay.inbound_port, timeout=30) as s:
        s.ehlo("client.test")
        assert s.docmd("MAIL", "FROM:<spammer@evil.test>")[0] == 250
        for rcpt in OPEN_RELAY_ADDRESSES:
            code, text = s.docmd("RCPT", f"TO:<{rcpt}>")
            assert code in (550, 553, 501), (rcpt, code, text)
            if rcpt == "victim@elsewhere.test":
                assert text.startswith(b"5.1.1")
    # Authenticated: the odd forms are refused too, a plain address is relayed.
    with relay.login() as s:
        assert s.docmd("MAIL", "FROM:<alice@example.com>")[0] == 250
        for rcpt in OPEN_RELAY_ADDRESSES[1:]:
            if rcpt.startswith("@"):
                continue  # RFC 5321 §4.1.1.3: the source route is dropped: a plain address
            assert s.docmd("RCPT", f"TO:<{rcpt}>")[0] >= 500, rcpt
        assert s.docmd("RCPT", "TO:<victim@elsewhere.test>")[0] == 250
    assert items() == []
    assert relay.run_outbox() == 0 and relay.sink.messages == []


def _implicit(relay: Relay) -> smtplib.SMTP:
    s = smtplib.SMTP_SSL("127.0.0.1", relay.subs_port, context=relay.client_tls, timeout=30)
    s.ehlo("client.test")
    return s


# --------------------------------------------------------------------------- smuggling


SMUGGLING_VECTORS = [b"\n.\r\n", b"\n.\n", b"\r\n.\r", b"\r.\r\n"]


def _smuggling_body(vector: bytes) -> bytes:
    head = msg(subject="smuggle").as_bytes(policy=SMTP_POLICY)
    return (head + b"first part" + vector + b"MAIL FROM:<ceo@example.com>\r\n"
            b"RCPT TO:<victim@customer.test>\r\nDATA\r\nFrom: ceo@example.com\r\n\r\n"
            b"smuggled\r\n")


def _send_raw(s: smtplib.SMTP, data: bytes, rcpt: str = "ann@customer.test") -> tuple[int, bytes]:
    """MAIL/RCPT/DATA with the bytes sent as they are (smtplib.data would fix line ends)."""
    assert s.docmd("MAIL", "FROM:<alice@example.com>")[0] == 250
    assert s.docmd("RCPT", f"TO:<{rcpt}>")[0] == 250
    assert s.docmd("DATA")[0] == 354
    s.send(data + b"\r\n.\r\n")
    return s.getreply()


def test_bare_lf_smuggling_is_normalised(relay_factory: Any) -> None:
    relay = relay_factory(lenient=True)
    with relay.login() as s:
        for vector in SMUGGLING_VECTORS:
            code, text = _send_raw(s, _smuggling_body(vector))
            assert code == 250, text
    assert relay.run_outbox() == len(SMUGGLING_VECTORS)
    got = relay.sink.messages
    # The lenient sink would split on a bare-LF end of data: it saw one message per send.
    assert len(got) == len(SMUGGLING_VECTORS)
    assert not any(g.smuggled for g in got)
    for g in got:
        assert g.rcpt_tos == ["ann@customer.test"]
        assert b"smuggled" in g.data
        body = g.data
        assert b"\r\n" in body and b"\n" not in body.replace(b"\r\n", b"")
        assert b"\r" not in body.replace(b"\r\n", b"")


def test_bare_lf_rejected_by_policy(relay_factory: Any) -> None:
    relay = relay_factory("relay.bare_newlines=reject", lenient=True)
    with relay.login() as s:
        code, text = _send_raw(s, _smuggling_body(b"\n.\r\n"))
        assert code == 554 and text.startswith(b"5.6.0")
    assert items() == []


# --------------------------------------------------------------------------- DKIM


def test_dkim_signature_on_the_delivered_form(relay_factory: Any, tmp_path: Path) -> None:
    dkim = pytest.importorskip("dkim")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (tmp_path / "dkim.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption()))
    public = key.public_key().public_bytes(serialization.Encoding.DER,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    relay = relay_factory(
        'relay.dkim=[{domain = "example.com", selector = "dm", key_file = "dkim.key"}]')
    relay.send(msg(body="line one\nline two\n.dot line\n"), ["ann@customer.test"])
    assert relay.run_outbox() == 1
    data = relay.sink.messages[0].data
    assert data.startswith(b"DKIM-Signature:")
    record = b"v=DKIM1; k=rsa; p=" + base64.b64encode(public)

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        assert name == b"dm._domainkey.example.com."
        return record

    assert dkim.verify(data, dnsfunc=dnsfunc)


def test_long_lines_are_encoded_before_signing(relay_factory: Any, tmp_path: Path) -> None:
    """A 5,000-character single-line HTML part is stored as received and leaves
    quoted-printable (the sink, like a strict MTA, refuses lines over 998 octets: its 500
    would have become a DSN), under a DKIM signature computed on the encoded form."""
    dkim = pytest.importorskip("dkim")
    from email import message_from_bytes
    from email import policy as email_policy

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (tmp_path / "dkim.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption()))
    public = key.public_key().public_bytes(serialization.Encoding.DER,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    relay = relay_factory(
        'relay.dkim=[{domain = "example.com", selector = "dm", key_file = "dkim.key"}]')
    html = "<html><body>" + "<p>Offre pour Ann, caf\u00e9 compris</p>" * 150 + "</body></html>"
    assert len(html) > 5000
    message = msg(subject="one-line html")
    message.set_content(html, subtype="html", cte="8bit")
    raw = message.as_bytes(policy=SMTP_POLICY)
    assert max(len(line) for line in raw.split(b"\r\n")) > 5000
    relay.send(raw, ["ann@customer.test"])
    assert relay.run_outbox() == 1
    data = relay.sink.messages[0].data
    assert max(len(line) for line in data.split(b"\r\n")) <= 998
    delivered = message_from_bytes(data, policy=email_policy.default)
    assert delivered["Content-Transfer-Encoding"] == "quoted-printable"
    assert delivered.get_content().rstrip("\r\n") == html
    record = b"v=DKIM1; k=rsa; p=" + base64.b64encode(public)
    assert dkim.verify(data, dnsfunc=lambda name, timeout=5: record)
    stored = m.Email.get(m.Email.message_id == message["Message-ID"])
    assert html.encode() in bytes(stored.raw)  # the stored copy is the one received


def test_outbox_cli_lists_relay_items(relay: Relay) -> None:
    relay.send(msg(), ["ann@customer.test"])
    from crmstore.outbox import list_items

    listed = list_items()
    assert listed[0]["kind"] == "relay" and listed[0]["to"] == ["ann@customer.test"]
    assert json.dumps(listed)  # the --json form is serialisable


# --------------------------------------------------------------------------- units


def test_per_client_limits_apply_to_submission(relay_factory: Any) -> None:
    """The submission listeners count clients in the same table as the inbound one."""
    relay = relay_factory("clients.exempt_networks=[]", "clients.max_connections=2")
    held = [socket.create_connection(("127.0.0.1", port), timeout=10,
                                     source_address=("127.0.0.2", 0))
            for port in (relay.sub_port, relay.inbound_port)]
    assert all(s.recv(1024).startswith(b"220") for s in held)
    third = socket.create_connection(("127.0.0.1", relay.sub_port), timeout=10,
                                     source_address=("127.0.0.2", 0))
    assert third.recv(1024).startswith(b"421 4.7.0 Too many connections from your address")
    for s in [*held, third]:
        s.close()
    relay.login(source="127.0.0.3").quit()


def test_account_is_slowed_never_locked(tmp_path: Path) -> None:
    """The account's own count (from every address) only delays its logins, growing with
    its failures up to auth_max_delay; locks are per address and per account from an
    address; a success clears that pair only; windows and locks end on the clock."""
    from dealmail.config import RelayConfig
    from mta.anvil import ClientTable
    from mta.relay.submission import LoginThrottle

    relay_config = RelayConfig(auth_max_failures=3, auth_client_max_failures=4,
                               auth_window_seconds=600, auth_lockout_seconds=300,
                               auth_failure_delay=0.5, auth_max_delay=2.0)
    config = load_config(EXAMPLE, [])
    config = type(config)(**{**config.__dict__, "relay": relay_config})
    path = tmp_path / "clients"
    ClientTable.prepare(path, workers=2)
    table = ClientTable.open(path)
    now = [1_000_000.0]
    t = LoginThrottle(table, lambda: config, lambda: now[0])
    assert t.delay("a@x.test") == 0
    for i, ip in enumerate(["192.0.2.1", "192.0.2.2", "192.0.2.3", "192.0.2.4",
                            "192.0.2.5"]):
        t.failure(ip, "a@x.test")
        assert t.delay("a@x.test") == min(0.5 * (i + 1), 2.0)
        assert not t.refused("198.51.100.7", "a@x.test")  # never locked as an account
    assert t.delay("b@x.test") == 0
    t.failure("192.0.2.1", "a@x.test")
    t.failure("192.0.2.1", "a@x.test")  # the pair's third
    assert t.refused("192.0.2.1", "a@x.test") and not t.refused("192.0.2.1", "b@x.test")
    t.failure("192.0.2.9", "c@x.test")
    t.success("192.0.2.9", "c@x.test")
    t.failure("192.0.2.9", "c@x.test")
    t.failure("192.0.2.9", "c@x.test")
    assert not t.refused("192.0.2.9", "c@x.test")  # the success started the pair over
    t.failure("192.0.2.9", "d@x.test")  # the address's fourth
    assert t.refused("192.0.2.9") and t.refused("192.0.2.9", "e@x.test")
    now[0] += 301  # the locks are over; the account's window (600 s) is not
    assert not t.refused("192.0.2.1", "a@x.test") and not t.refused("192.0.2.9")
    assert t.delay("a@x.test") == 2.0
    now[0] += 300
    assert t.delay("a@x.test") == 0
    # IPv6 clients count by their /64.
    for host in range(4):
        t.failure(f"2001:db8:1:2::{host + 1}", f"u{host}@x.test")
    assert t.refused("2001:db8:1:2:ffff::1") and not t.refused("2001:db8:1:3::1")
    table.close()


def test_strip_bcc_keeps_everything_else() -> None:
    from mta.relay.submission import strip_bcc

    raw = (b"From: a@example.com\r\nBcc: x@y.test,\r\n\tz@y.test\r\nTo: b@c.test\r\n"
           b"bcc:\r\nSubject: s\r\n\r\nBcc: in the body stays\r\n")
    assert strip_bcc(raw) == (b"From: a@example.com\r\nTo: b@c.test\r\nSubject: s\r\n\r\n"
                              b"Bcc: in the body stays\r\n")
