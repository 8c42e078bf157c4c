"""The LMTP listener spoken to with a raw socket (RFC 2033): replies counted line by line.

No Postfix here (tests/mta/test_postfix.py drives the real one): these pin the protocol
details a Postfix admin relies on: one reply per accepted recipient in RCPT order, XFORWARD
only from configured hosts and reset after each transaction, 451 for every recipient on an
internal fault, 20 simultaneous connections served and the one over the cap told 421.
"""

from __future__ import annotations

import socket
import threading
from typing import Any

import pytest

from crmstore import models as m
from mta.routing import mailbox_key

BCC = "example@dealmail.localhost"
SENT = "example+sent@dealmail.localhost"
ALICE_IN = f"example+received-{mailbox_key('example', 'alice@example.com')}@dealmail.localhost"
BOB_IN = f"example+received-{mailbox_key('example', 'bob@example.com')}@dealmail.localhost"


def mail(mid: str, frm: str = "Alice <alice@example.com>", to: str = "Carl <carl@other.test>",
         extra: str = "") -> bytes:
    return (f"From: {frm}\r\nTo: {to}\r\nSubject: Pilot plan\r\nMessage-ID: <{mid}>\r\n"
            f"Date: Thu, 26 Nov 2026 10:00:00 +0100\r\n{extra}\r\nHello Carl,\r\nthe plan.\r\n"
            ).encode()


class Lmtp:
    """A raw LMTP client: each command's reply lines, as sent."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.file = self.sock.makefile("rb")
        self.greeting = self.reply()

    def reply(self) -> list[str]:
        lines = []
        while True:
            line = self.file.readline().decode()
            if not line:
                raise ConnectionError("connection closed")
            lines.append(line.rstrip("\r\n"))
            if line[3:4] != "-":
                return lines

    def cmd(self, line: str) -> list[str]:
        self.sock.sendall(line.encode() + b"\r\n")
        return self.reply()

    def deliver(self, mail_from: str, rcpts: list[str], raw: bytes) -> tuple[list[str], list[str]]:
        """(RCPT replies, DATA replies: one line read per accepted recipient)."""
        assert self.cmd(f"MAIL FROM:<{mail_from}>")[0].startswith("250")
        rcpt = [self.cmd(f"RCPT TO:<{r}>")[0] for r in rcpts]
        accepted = sum(r.startswith("250") for r in rcpt)
        assert self.cmd("DATA")[0].startswith("354")
        self.sock.sendall(raw + b".\r\n")
        return rcpt, [self.reply()[0] for _ in range(accepted)]

    def close(self) -> None:
        try:
            self.sock.sendall(b"QUIT\r\n")
        except OSError:
            pass
        self.sock.close()


@pytest.fixture
def lmtp_server(server_factory: Any) -> Any:
    return server_factory("listeners.lmtp=127.0.0.1:0",
                          'lmtp.xforward_hosts=["127.0.0.1/32"]')


def connect(running: Any) -> Lmtp:
    client = Lmtp(running.app.port("lmtp"))
    assert client.greeting[0].startswith("220")
    assert client.cmd("LHLO mx.company.test")[-1].startswith("250 ")
    return client


def test_one_reply_per_recipient_in_order_and_stored_once(lmtp_server: Any) -> None:
    pilot = m.Deal.get(m.Deal.title == "Pilot").id
    client = connect(lmtp_server)
    rcpt, data = client.deliver(
        "alice@example.com",
        [SENT, f"example+deal{pilot}@dealmail.localhost", "example+deal999999@dealmail.localhost",
         "nobody@dealmail.localhost", BOB_IN], mail("order1@example.com"))
    client.close()
    assert [r[:9] for r in rcpt] == ["250 2.1.5", "250 2.1.5", "550 5.1.1", "550 5.1.1",
                                     "250 2.1.5"]
    # RFC 2033 §4.2: three accepted recipients, three replies after the dot, all 250.
    assert len(data) == 3 and all(d.startswith("250 2.0.0") for d in data), data
    email = m.Email.get(m.Email.message_id == "<order1@example.com>")
    assert m.Email.select().where(m.Email.message_id == "<order1@example.com>").count() == 1
    # The sender-BCC copy and +deal merged into one capture: the deal link is kept.
    assert m.Link.select().where((m.Link.email == email.id) & (m.Link.deal == pilot)).exists()
    sightings = {(s.user.address, s.channel) for s in m.Sighting.select().where(
        m.Sighting.email == email.id)}
    # alice's copy (an explicit +deal BCC reads as a BCC) and bob's received copy.
    assert sightings == {("alice@example.com", "bcc"), ("bob@example.com", "mta")}


def test_sender_bcc_copy_alone_is_captured_as_mta_with_empty_to(lmtp_server: Any) -> None:
    client = connect(lmtp_server)
    raw = mail("bcc-only@example.com", to="undisclosed-recipients:;",
               extra="Bcc: Carl <carl@other.test>\r\n")
    _rcpt, data = client.deliver("alice@example.com", [SENT], raw)
    client.close()
    assert data[0].startswith("250 2.0.0"), data
    sighting = m.Sighting.get()
    assert sighting.channel == "mta" and sighting.user.address == "alice@example.com"
    assert sighting.client_ip == "127.0.0.1"


def test_sent_copy_of_a_colleagues_from_is_refused(lmtp_server: Any) -> None:
    client = connect(lmtp_server)
    _rcpt, data = client.deliver("bob@example.com", [SENT], mail("spoof@example.com"))
    client.close()
    assert data[0].startswith("550 5.7.1") and "different users" in data[0], data
    assert not m.Email.select().exists()


def test_refused_message_gets_one_reply_per_recipient(lmtp_server: Any) -> None:
    client = connect(lmtp_server)
    long_line = b"x" * 1200
    raw = mail("long@example.com").replace(b"the plan.", long_line)
    _rcpt, data = client.deliver("alice@example.com", [SENT, BCC, BOB_IN], raw)
    assert len(data) == 3 and all(d.startswith("554 5.6.0") for d in data), data
    # The session goes on: the next transaction is answered as usual.
    _rcpt, data = client.deliver("alice@example.com", [SENT], mail("after@example.com"))
    client.close()
    assert data[0].startswith("250"), data


def test_internal_fault_answers_451_for_every_recipient(lmtp_server: Any) -> None:
    committer = lmtp_server.app.committer

    def broken() -> None:
        raise RuntimeError("disk on fire (injected)")

    committer.before_commit = broken
    client = connect(lmtp_server)
    _rcpt, data = client.deliver("alice@example.com", [SENT, BCC, BOB_IN],
                                 mail("fault@example.com"))
    assert len(data) == 3 and all(d.startswith("451 4.3.0") for d in data), data
    assert all("disk" not in d for d in data)  # never the exception text
    committer.before_commit = None
    _rcpt, data = client.deliver("alice@example.com", [SENT, BCC, BOB_IN],
                                 mail("fault@example.com"))
    client.close()
    assert all(d.startswith("250") for d in data), data
    assert m.Email.select().count() == 1


def test_own_mail_coming_back_is_accepted_and_not_captured(lmtp_server: Any) -> None:
    client = connect(lmtp_server)
    raw = mail("q1@dealmail.localhost", frm="dealmail <example@dealmail.localhost>",
               to="Alice <alice@example.com>",
               extra="Auto-Submitted: auto-generated\r\nX-Dealmail-Auto: question\r\n")
    _rcpt, data = client.deliver("", [ALICE_IN], raw)
    client.close()
    assert data[0].startswith("250") and "ignored" in data[0], data
    assert not m.Email.select().exists() and not m.PendingChoice.select().exists()


def test_xforward_sets_the_client_and_is_reset_after_the_transaction(
        lmtp_server: Any) -> None:
    client = connect(lmtp_server)
    assert client.cmd("XFORWARD ADDR=192.0.2.1 HELO=laptop.example NAME=[UNAVAILABLE]")[0] \
        .startswith("250")
    assert client.cmd("XFORWARD PROTO=ESMTP SOURCE=REMOTE IDENT=4Xy+2Bz")[0].startswith("250")
    # 192.0.2.1 is outside the trusted networks: alice's copy is not believed.
    _rcpt, data = client.deliver("alice@example.com", [SENT], mail("xf1@example.com"))
    assert data[0].startswith("550 5.7.1"), data
    # Reset after the dot: the next transaction's client is the LMTP peer again.
    _rcpt, data = client.deliver("alice@example.com", [SENT], mail("xf2@example.com"))
    assert data[0].startswith("250"), data
    sighting = m.Sighting.get()
    assert sighting.client_ip == "127.0.0.1"
    client.close()


def test_xforward_rules(lmtp_server: Any, server_factory: Any) -> None:
    client = connect(lmtp_server)
    assert any("XFORWARD" in line for line in client.cmd("LHLO mx.company.test"))
    for bad in ("XFORWARD", "XFORWARD ADDR=not-an-ip", "XFORWARD FOO=bar",
                "XFORWARD HELO=" + "a" * 256, "XFORWARD HELO=a+0Db", "XFORWARD HELO=a+b",
                "XFORWARD PORT=70000", "XFORWARD SOURCE=ELSEWHERE"):
        assert client.cmd(bad)[0].startswith("501 5.5.4"), bad
    assert client.cmd("XFORWARD ADDR=IPv6:2001:db8::1")[0].startswith("250")
    assert client.cmd("MAIL FROM:<alice@example.com>")[0].startswith("250")
    assert client.cmd("XFORWARD ADDR=192.0.2.9")[0].startswith("503")
    assert client.cmd("RSET")[0].startswith("250")
    client.close()
    # From a host outside lmtp.xforward_hosts: not advertised, and refused.
    other = server_factory("listeners.lmtp=127.0.0.1:0", 'lmtp.xforward_hosts=["192.0.2.0/24"]')
    client = connect(other)
    assert not any("XFORWARD" in line for line in client.cmd("LHLO mx.company.test"))
    assert client.cmd("XFORWARD ADDR=192.0.2.1")[0] == \
        "550 5.7.0 Error: insufficient authorization"
    client.close()


def test_helo_and_ehlo_are_not_lmtp(lmtp_server: Any) -> None:
    client = Lmtp(lmtp_server.app.port("lmtp"))
    assert client.cmd("EHLO mx")[0].startswith("500")
    assert client.cmd("MAIL FROM:<alice@example.com>")[0].startswith("503 5.5.1 Error: send LHLO")
    client.close()


def test_twenty_concurrent_deliveries_then_421_over_the_cap(server_factory: Any) -> None:
    running = server_factory("listeners.lmtp=127.0.0.1:0", "lmtp.max_connections=20")
    clients = [connect(running) for _ in range(20)]
    # The 21st connection while 20 are open: 421, which makes Postfix defer (RFC 5321 §3.8).
    extra = socket.create_connection(("127.0.0.1", running.app.port("lmtp")), timeout=10)
    assert extra.makefile("rb").readline().startswith(b"421 4.3.2")
    extra.close()
    results: dict[int, list[str]] = {}

    def one(i: int) -> None:
        _rcpt, results[i] = clients[i].deliver(
            "alice@example.com", [SENT, BOB_IN], mail(f"c{i}@example.com"))
        clients[i].close()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 20
    assert all(r[0].startswith("250") and r[1].startswith("250") for r in results.values())
    assert m.Email.select().count() == 20


def test_unix_socket_listener(server_factory: Any, tmp_path: Any) -> None:
    path = tmp_path / "lmtp.sock"
    running = server_factory(f"listeners.lmtp=unix:{path}", 'lmtp.xforward_hosts=["unix"]',
                             "lmtp.socket_mode=0600")
    assert running.app.address("lmtp") == f"unix:{path}"
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(path))
    client = Lmtp.__new__(Lmtp)
    client.sock, client.file = sock, sock.makefile("rb")
    assert client.reply()[0].startswith("220")
    assert any("XFORWARD" in line for line in client.cmd("LHLO mx"))
    assert client.cmd("XFORWARD ADDR=127.0.0.1")[0].startswith("250")
    _rcpt, data = client.deliver("alice@example.com", [SENT], mail("unix@example.com"))
    client.close()
    assert data[0].startswith("250"), data
