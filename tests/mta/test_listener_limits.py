"""Listener limits (docs/reliability.md A-DOS 36, 37; A-PROTO 11, 13): the connection cap answers
421 4.3.2 at once while existing sessions go on; a silent client is disconnected at the
command deadline; session order errors and overlong commands keep the session in sync.

Per client address (``[clients]``, counted in the table the workers share): simultaneous
connections, connection and message rates, exempt networks. Per session: junk commands do not
keep a session alive, a command budget without a transaction, a lifetime, a minimum DATA
rate. Cross-worker sharing is proved on a real 2-worker server in tests/dealmail/test_prefork.py.
The example config exempts loopback, so these tests clear ``clients.exempt_networks``."""

from __future__ import annotations

import smtplib
import socket
import time
from datetime import timedelta
from typing import Any

import pytest

from crmstore import models as m
from dealmail.clock import FakeClock


def _greeting(port: int) -> tuple[socket.socket, bytes]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    return sock, sock.recv(1024)


def test_connection_cap_answers_421_and_keeps_existing_sessions(server_factory: Any) -> None:
    running = server_factory("listeners.max_connections=2")
    first, g1 = _greeting(running.port)
    second, g2 = _greeting(running.port)
    assert g1.startswith(b"220") and g2.startswith(b"220")
    third, g3 = _greeting(running.port)
    assert g3.startswith(b"421 4.3.2")
    assert third.recv(1024) == b""  # closed by the server
    first.sendall(b"NOOP\r\n")
    assert first.recv(1024).startswith(b"250")
    for s in (first, second, third):
        s.close()
    # A slot freed by a closed session is usable again.
    with smtplib.SMTP("127.0.0.1", running.port, timeout=10) as client:
        assert client.noop()[0] == 250


def test_silent_client_disconnected_at_command_deadline(server_factory: Any) -> None:
    running = server_factory("listeners.command_timeout=0.5")
    sock, greeting = _greeting(running.port)
    assert greeting.startswith(b"220")
    sock.settimeout(10)
    # Told why (as Postfix does), then closed.
    assert sock.recv(1024) == b"421 4.4.2 dealmail.localhost Error: timeout exceeded\r\n"
    assert sock.recv(1024) == b""
    sock.close()


def test_session_order_and_long_command(server: Any) -> None:
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as s:
        s.ehlo()
        assert s.docmd("RCPT TO:<example@dealmail.localhost>")[0] == 503
        assert s.docmd("DATA")[0] == 503
        assert s.docmd("MAIL FROM:<alice@example.com>")[0] == 250
        assert s.docmd("MAIL FROM:<alice@example.com>")[0] == 503  # nested MAIL
        assert s.docmd("RSET")[0] == 250
        code, _ = s.docmd("NOOP " + "x" * 2000)
        assert code == 500
        assert s.noop()[0] == 250  # still in sync


def test_low_disk_space_refuses_mail_temporarily(server: Any, monkeypatch: Any) -> None:
    """docs/reliability.md A-DUR 5: below 1.5x the size limit free, MAIL gets 452 4.3.1."""
    monkeypatch.setattr(server.app.inbound_hooks, "has_space", lambda: False)
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as s:
        s.ehlo()
        code, text = s.docmd("MAIL FROM:<alice@example.com>")
        assert code == 452 and text.startswith(b"4.3.1")
    monkeypatch.setattr(server.app.inbound_hooks, "has_space", server.app.has_space)
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as s:
        assert s.ehlo()[0] == 250
        assert s.docmd("MAIL FROM:<alice@example.com>")[0] == 250


# --------------------------------------------------------------------------- per client


def _connect_from(port: int, source: str) -> tuple[socket.socket, bytes]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10,
                                    source_address=(source, 0))
    return sock, sock.recv(1024)


def _lines(sock: socket.socket, until: bytes = b"") -> bytes:
    """Everything the server sends until it closes (or ``until`` is seen)."""
    data = b""
    while not (until and until in data):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def test_one_address_cannot_take_every_slot(server_factory: Any) -> None:
    """The default of 20 connections per client address: the 21st and later get 421 4.7.0
    at once, while another client is served (with a listener cap of 200 that a flood from
    one address would otherwise fill). A slot comes back when a connection closes."""
    running = server_factory("clients.exempt_networks=[]")
    held = []
    refused = []
    for _ in range(25):
        sock, greeting = _connect_from(running.port, "127.0.0.2")
        (held if greeting.startswith(b"220") else refused).append((sock, greeting))
    assert len(held) == 20 and len(refused) == 5
    for sock, greeting in refused:
        assert greeting.startswith(b"421 4.7.0 Too many connections from your address")
        assert sock.recv(1024) == b""
        sock.close()
    with smtplib.SMTP("127.0.0.1", running.port, source_address=("127.0.0.3", 0),
                      timeout=10) as other:
        assert other.sendmail("alice@example.com", ["example@dealmail.localhost"],
                              b"From: alice@example.com\r\nTo: carl@other.test\r\n"
                              b"Subject: served\r\n\r\nstill served\r\n") == {}
    held.pop()[0].close()
    deadline = time.monotonic() + 10
    while True:  # the server notices the close asynchronously
        sock, greeting = _connect_from(running.port, "127.0.0.2")
        sock.close()
        if greeting.startswith(b"220") or time.monotonic() > deadline:
            break
    assert greeting.startswith(b"220")
    for sock, _ in held:
        sock.close()


def test_connection_and_message_rates_per_address(server_factory: Any,
                                                  clock: FakeClock) -> None:
    running = server_factory("clients.exempt_networks=[]", "clients.connection_rate=3",
                             "clients.message_rate=2")
    for _ in range(3):
        sock, greeting = _connect_from(running.port, "127.0.0.2")
        assert greeting.startswith(b"220")
        sock.close()
    sock, greeting = _connect_from(running.port, "127.0.0.2")
    assert greeting.startswith(b"421 4.7.0 Too many connections from your address in a")
    sock.close()
    with smtplib.SMTP("127.0.0.1", running.port, source_address=("127.0.0.3", 0),
                      timeout=10) as other:
        other.ehlo()
        assert other.docmd("MAIL FROM:<alice@example.com>")[0] == 250
        assert other.rset()[0] == 250
        assert other.docmd("MAIL FROM:<alice@example.com>")[0] == 250
        assert other.rset()[0] == 250
        code, text = other.docmd("MAIL FROM:<alice@example.com>")
        assert (code, text) == (450, b"4.7.1 Too much mail from your address, try again later")
        clock.advance(timedelta(seconds=61))  # the windows of the injected clock end
        assert other.docmd("MAIL FROM:<alice@example.com>")[0] == 250
    sock, greeting = _connect_from(running.port, "127.0.0.2")
    assert greeting.startswith(b"220")
    sock.close()


def test_exempt_networks_are_not_counted(server_factory: Any) -> None:
    running = server_factory("clients.max_connections=2",
                             "clients.exempt_networks=['127.0.0.2/32']")
    socks = [_connect_from(running.port, "127.0.0.2") for _ in range(4)]
    assert all(g.startswith(b"220") for _, g in socks)
    third = [_connect_from(running.port, "127.0.0.3") for _ in range(3)]
    assert [g[:9] for _, g in third] == [b"220 dealm"] * 2 + [b"421 4.7.0"]
    for sock, _ in socks + third:
        sock.close()


# --------------------------------------------------------------------------- per session


def test_junk_commands_do_not_keep_a_session_alive(server_factory: Any) -> None:
    """NOOP every 0.3 s used to reset the idle timer forever; now only commands that move a
    message forward do, so the session ends at command_timeout after EHLO."""
    running = server_factory("listeners.command_timeout=1")
    sock, _ = _greeting(running.port)
    sock.sendall(b"EHLO client.test\r\n")
    assert b"250 " in _lines(sock, b"250 ")
    started = time.monotonic()
    answers = b""
    try:
        while time.monotonic() - started < 10:
            sock.sendall(b"NOOP\r\n")
            time.sleep(0.3)  # a real slow client on a real socket
            answers += sock.recv(4096)
            if b"421" in answers:
                break
    except OSError:
        pass
    assert b"421 4.4.2 dealmail.localhost Error: timeout exceeded" in answers
    assert 0.8 < time.monotonic() - started < 3
    sock.close()


def test_commands_without_a_transaction_are_capped(server_factory: Any) -> None:
    running = server_factory("listeners.max_commands=10")
    with smtplib.SMTP("127.0.0.1", running.port, timeout=10) as s:
        s.ehlo()
        # Accepted recipients do not count, a completed transaction starts over.
        s.docmd("MAIL FROM:<alice@example.com>")
        for _ in range(15):
            assert s.docmd("RCPT TO:<example@dealmail.localhost>")[0] == 250
        assert s.data(b"From: alice@example.com\r\nTo: carl@other.test\r\nSubject: c\r\n\r\n"
                      b"x\r\n")[0] == 250
        for _ in range(10):
            assert s.noop()[0] == 250
        code, text = s.docmd("RSET")
        assert (code, text) == (421, b"4.7.0 Too many commands without a transaction, "
                                     b"closing connection")
        with pytest.raises(smtplib.SMTPServerDisconnected):
            s.noop()


def test_session_lifetime(server_factory: Any) -> None:
    running = server_factory("listeners.session_lifetime=1")
    sock, _ = _greeting(running.port)
    started = time.monotonic()
    sock.sendall(b"EHLO client.test\r\n")
    _lines(sock, b"250 ")
    time.sleep(0.5)  # a real client going on with real commands
    sock.sendall(b"MAIL FROM:<alice@example.com>\r\n")
    assert _lines(sock, b"\r\n").startswith(b"250")
    rest = _lines(sock)
    assert rest == b"421 4.4.2 dealmail.localhost Session time limit reached, closing " \
                   b"connection\r\n"
    assert 0.8 < time.monotonic() - started < 3
    sock.close()


def test_slow_data_is_cut_fast_data_is_not(server_factory: Any) -> None:
    """A DATA dribbling a byte at a time held a slot for the whole data_timeout (600 s);
    now it must keep min_data_rate over each data_rate_window."""
    running = server_factory("listeners.min_data_rate=1000", "listeners.data_rate_window=1")
    with smtplib.SMTP("127.0.0.1", running.port, timeout=30) as s:
        body = b"From: alice@example.com\r\nTo: carl@other.test\r\nSubject: fast\r\n\r\n"
        assert s.sendmail("alice@example.com", ["example@dealmail.localhost"],
                          body + (b"x" * 76 + b"\r\n") * 5000) == {}
    sock, _ = _greeting(running.port)
    sock.sendall(b"EHLO c\r\nMAIL FROM:<alice@example.com>\r\n"
                 b"RCPT TO:<example@dealmail.localhost>\r\nDATA\r\n")
    assert b"354 " in _lines(sock, b"354 ")
    sock.sendall(b"From: alice@example.com\r\nSubject: slow\r\n\r\n")
    started = time.monotonic()
    answer = b""
    try:
        while time.monotonic() - started < 10 and not answer:
            sock.sendall(b"y")
            time.sleep(0.1)  # 10 bytes/s, well below the 1000 required
            sock.setblocking(False)
            try:
                answer = sock.recv(1024)
            except BlockingIOError:
                pass
            finally:
                sock.setblocking(True)
    except OSError:
        pass
    assert answer == b"421 4.4.2 dealmail.localhost Data rate too low, closing connection\r\n"
    assert time.monotonic() - started < 3
    sock.close()
    assert m.Email.select().where(m.Email.subject == "slow").count() == 0
