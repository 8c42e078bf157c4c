"""Listener limits (docs/reliability.md A-DOS 36, 37; A-PROTO 11, 13): the connection cap answers
421 4.3.2 at once while existing sessions go on; a silent client is disconnected at the
command deadline; session order errors and overlong commands keep the session in sync."""

from __future__ import annotations

import smtplib
import socket
from typing import Any


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
    assert sock.recv(1024) == b""  # the server closed the idle session
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
