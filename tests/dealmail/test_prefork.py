"""Pre-fork serving: two worker processes share one inbound socket; SIGTERM stops them all
after their transactions, and every acknowledged message is stored once. The per-client limits
and the failed-login counters are shared by the workers (mta/anvil.py); SIGTERM during a burst
answers every client properly."""

from __future__ import annotations

import json
import os
import re
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import ROOT

from crmstore import models as m
from crmstore.db import Store

BCC = "example@dealmail.localhost"


def test_two_workers_serve_and_stop_cleanly(tmp_path: Path) -> None:
    db = tmp_path / "prefork.db"
    log = tmp_path / "server.log"
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "run_server.py"),
         "--config", str(ROOT / "conf" / "dealmail.example.toml"),
         "--set", "listeners.workers=2", "--set", "listeners.inbound=127.0.0.1:0",
         "--set", "listeners.submission=", "--set", f"database.url=sqlite:///{db}",
         "--set", f"server.demo_data={ROOT / 'conf' / 'demo'}",
         "--set", f"server.log_file={log}"],
        cwd=tmp_path)
    try:
        port = None
        deadline = time.monotonic() + 30
        while port is None and time.monotonic() < deadline:
            text = log.read_text() if log.exists() else ""
            found = re.search(r"listening on 127\.0\.0\.1:(\d+) \(2 workers\)", text)
            started = len(re.findall(r"worker \d started", text))
            if found and started == 2 and text.count("inbound SMTP listening") >= 3:
                port = int(found.group(1))
            else:
                time.sleep(0.1)  # waiting for a real process to start: no clock to inject
        assert port is not None, "pre-fork server did not start"
        for i in range(20):
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
                s.sendmail("alice@example.com", ["example@dealmail.localhost"],
                           f"From: alice@example.com\r\nTo: carl@other.test\r\n"
                           f"Subject: pf{i}\r\nMessage-ID: <pf{i}@example.com>\r\n\r\nhi\r\n"
                           .encode())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert "all workers stopped" in text
    # Two worker processes were started by the supervisor.
    pids = set(re.findall(r"worker \d started \(pid (\d+)\)", text))
    assert len(pids) == 2
    store = Store(f"sqlite:///{db}")
    store.open()
    try:
        assert sorted(e.subject for e in m.Email.select()) == sorted(f"pf{i}"
                                                                     for i in range(20))
    finally:
        store.close()


# --------------------------------------------------------------------------- helpers


class Server:
    """A real ``dealmail serve`` with several workers, its log and its ports."""

    def __init__(self, tmp_path: Path, *sets: str, db_url: str | None = None,
                 config: Path | None = None) -> None:
        self.db = tmp_path / "prefork.db"
        self.log = tmp_path / "server.log"
        self.url = db_url or f"sqlite:///{self.db}"
        self.config = config or ROOT / "conf" / "dealmail.example.toml"
        self.settings = ["--config", str(self.config), "--set", f"database.url={self.url}",
                         *[x for s in sets for x in ("--set", s)]]
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "run_server.py"), *self.settings,
             "--set", "listeners.workers=2", "--set", "listeners.inbound=127.0.0.1:0",
             "--set", f"server.demo_data={ROOT / 'conf' / 'demo'}",
             "--set", f"server.log_file={self.log}"], cwd=tmp_path)
        self.ports: dict[str, int] = {}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            text = self.log.read_text() if self.log.exists() else ""
            ports = dict(re.findall(r"(inbound SMTP|submission) listening on "
                                    r"127\.0\.0\.1:(\d+) \(2 workers\)", text))
            # Each worker logs its own listeners once it serves.
            if len(re.findall(r"inbound SMTP listening on [\d.:]+$", text, re.M)) >= 2:
                self.ports = {k: int(v) for k, v in ports.items()}
                break
            time.sleep(0.1)  # waiting for a real process to start: no clock to inject
        assert self.ports, "pre-fork server did not start"
        self.pids = [int(p) for p in re.findall(r"worker \d started \(pid (\d+)\)",
                                                self.log.read_text())]
        assert len(self.pids) == 2

    @property
    def port(self) -> int:
        return self.ports["inbound SMTP"]

    def sockets_of(self, pid: int) -> int:
        """Open sockets of one worker process (its accepted connections and listeners)."""
        count = 0
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                count += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
            except OSError:
                pass
        return count

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "dealmail.cli", *args, *self.settings],
                              capture_output=True, text=True, timeout=60)

    def stored(self) -> Counter[str]:
        store = Store(self.url)
        store.open()
        try:
            return Counter(e.subject for e in m.Email.select(m.Email.subject))
        finally:
            store.close()


def _connect(port: int, source: str) -> tuple[socket.socket, bytes]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10,
                                    source_address=(source, 0))
    return sock, sock.recv(1024)


# --------------------------------------------------------------------------- shared limits


def test_client_limits_are_shared_by_the_workers(tmp_path: Path) -> None:
    """Six connections per address in all, not per worker: the connections that were let in
    are spread over both workers (counted in /proc), and the seventh is refused whichever
    worker the kernel gives it to."""
    server = Server(tmp_path, "clients.exempt_networks=[]", "clients.max_connections=6",
                    "listeners.submission=")
    try:
        for _attempt in range(10):
            before = {pid: server.sockets_of(pid) for pid in server.pids}
            held, refused = [], []
            for _ in range(12):
                sock, greeting = _connect(server.port, "127.0.0.2")
                (held if greeting.startswith(b"220") else refused).append((sock, greeting))
            assert len(held) == 6 and len(refused) == 6
            assert all(g.startswith(b"421 4.7.0 Too many connections") for _, g in refused)
            gained = [server.sockets_of(pid) - before[pid] for pid in server.pids]
            for sock, _ in held + refused:
                sock.close()
            if all(n > 0 for n in gained):
                break  # both workers hold some of the six: the count was shared
            time.sleep(0.5)  # all six on one worker by chance: close, let it notice, again
        assert all(n > 0 for n in gained), gained
        with smtplib.SMTP("127.0.0.1", server.port, source_address=("127.0.0.3", 0),
                          timeout=10) as other:
            assert other.noop()[0] == 250
        assert server.stop() == 0
    finally:
        server.kill()


def test_login_failures_are_shared_by_the_workers(tmp_path: Path) -> None:
    """Every worker serves submission; three wrong passwords for bob from one address,
    answered by whichever workers, lock bob out of that address on all of them (with
    counters per process, a worker that had seen fewer would let him in); `dealmail auth`
    reads and clears the same counters while the server runs."""
    import base64
    import shutil
    import ssl

    from dealmail.passwords import hash_password, set_password_in_file

    config = tmp_path / "dealmail.toml"
    shutil.copy(ROOT / "conf" / "dealmail.example.toml", config)
    set_password_in_file(config, "bob@example.com", hash_password("bob-secret-2026"))
    server = Server(tmp_path, "listeners.submission=127.0.0.1:0", "relay.auth_max_failures=3",
                    "relay.auth_failure_delay=0", config=config)
    context = ssl.create_default_context(
        cafile=str(tmp_path / "var" / "tls" / "dealmail-selfsigned.crt"))

    def auth(source: str, password: str) -> int:
        with smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=30,
                          source_address=(source, 0)) as s:
            s.starttls(context=context)
            s.ehlo()
            blob = base64.b64encode(f"\0bob@example.com\0{password}".encode()).decode()
            return s.docmd("AUTH", f"PLAIN {blob}")[0]

    try:
        assert [auth("127.0.0.3", "guess") for _ in range(3)] == [535, 535, 421]
        assert [auth("127.0.0.3", "bob-secret-2026") for _ in range(6)] == [421] * 6
        assert [auth("127.0.0.4", "bob-secret-2026") for _ in range(4)] == [235] * 4
        status = server.cli("auth", "status", "--json")
        assert status.returncode == 0, status.stderr
        assert any(e["who"] == "bob@example.com from 127.0.0.3" and e["locked_until"]
                   for e in json.loads(status.stdout))
        assert server.cli("auth", "unlock", "127.0.0.3").returncode == 0
        assert [auth("127.0.0.3", "bob-secret-2026") for _ in range(4)] == [235] * 4
        assert server.stop() == 0
    finally:
        server.kill()


# --------------------------------------------------------------------------- SIGTERM


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_sigterm_during_a_burst_answers_every_client(tmp_path: Path, database: str,
                                                     request: pytest.FixtureRequest) -> None:
    """SIGTERM while eight clients send without pause, one is uploading a message, one is
    idle and one is half-way through a transaction: the upload finishes and gets its real
    250, everyone else gets 421 4.3.2, nobody sees a reset or a 451, nothing acknowledged is
    lost or stored twice, new connections are refused, and the log has no traceback."""
    url = request.getfixturevalue("pg_url") if database == "postgresql" else None
    server = Server(tmp_path, "listeners.submission=", db_url=url)
    outcomes: dict[int, list[str]] = {}
    acked: list[str] = []
    lock = threading.Lock()
    go_on = threading.Event()
    go_on.set()

    def burst(n: int) -> None:
        seen = outcomes.setdefault(n, [])
        try:
            s = smtplib.SMTP("127.0.0.1", server.port, timeout=30)
        except OSError as exc:
            seen.append(f"connect {exc!r}")
            return
        i = 0
        while True:
            tag = f"burst{n}-{i}"
            try:
                s.sendmail("alice@example.com", [BCC],
                           f"From: alice@example.com\r\nTo: carl@other.test\r\nSubject: {tag}"
                           f"\r\nMessage-ID: <{tag}@example.com>\r\n\r\nhi\r\n".encode())
            except smtplib.SMTPRecipientsRefused as exc:  # the stop came after MAIL
                seen.append(str(next(iter(exc.recipients.values()))[0]))
                return
            except smtplib.SMTPResponseException as exc:
                seen.append(str(exc.smtp_code))
                return
            except (OSError, smtplib.SMTPException) as exc:
                seen.append(repr(exc))
                return
            seen.append("250")
            with lock:
                acked.append(tag)
            i += 1

    def read_line(sock: socket.socket) -> bytes:
        data = b""
        while not data.endswith(b"\r\n"):
            chunk = sock.recv(1)
            if not chunk:
                break
            data += chunk
        return data

    def converse(port: int, *commands: bytes) -> socket.socket:
        sock, greeting = _connect(port, "127.0.0.1")
        assert greeting.startswith(b"220")
        for command in commands:
            sock.sendall(command)
            line = read_line(sock)
            while line[3:4] == b"-":
                line = read_line(sock)
            assert line[:1] in (b"2", b"3"), (command, line)
        return sock

    try:
        threads = [threading.Thread(target=burst, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        idle = converse(server.port, b"EHLO idle.test\r\n")
        half = converse(server.port, b"EHLO half.test\r\n", b"MAIL FROM:<alice@example.com>\r\n",
                        f"RCPT TO:<{BCC}>\r\n".encode())
        upload = converse(server.port, b"EHLO up.test\r\n", b"MAIL FROM:<alice@example.com>\r\n",
                          f"RCPT TO:<{BCC}>\r\n".encode(), b"DATA\r\n")
        upload.sendall(b"From: alice@example.com\r\nTo: carl@other.test\r\nSubject: upload\r\n"
                       b"Message-ID: <upload@example.com>\r\n\r\n")
        time.sleep(1.0)  # let the burst run on a real server
        server.proc.send_signal(signal.SIGTERM)
        for _ in range(10):  # the upload goes on (2 KB per 0.1 s) after the SIGTERM
            time.sleep(0.1)
            upload.sendall((b"z" * 78 + b"\r\n") * 25)
        upload.sendall(b".\r\n")
        assert read_line(upload).startswith(b"250 ")  # its real answer
        assert read_line(upload).startswith(b"421 4.3.2")  # then the stop's
        assert read_line(idle).startswith(b"421 4.3.2")
        half.sendall(b"DATA\r\n")
        assert read_line(half).startswith(b"421 4.3.2")
        with pytest.raises(ConnectionRefusedError):
            _connect(server.port, "127.0.0.1")  # nobody listens any more
        for t in threads:
            t.join(60)
        for sock in (idle, half, upload):
            sock.close()
        assert server.proc.wait(60) == 0
    finally:
        server.kill()
    for n, seen in outcomes.items():
        assert seen and seen[0] == "250", (n, seen)  # each sent before the stop
        assert set(seen[:-1]) == {"250"} and seen[-1] == "421", (n, seen[-3:])
    stored = server.stored()
    assert stored["upload"] == 1
    assert all(stored[tag] == 1 for tag in acked)
    assert all(n == 1 for n in stored.values())
    text = server.log.read_text()
    assert "Traceback" not in text and "CommitterStopped" not in text
    assert "all workers stopped" in text
