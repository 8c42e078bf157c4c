"""Pre-fork serving: two worker processes share one inbound socket; SIGTERM stops them all
after their transactions, and every acknowledged message is stored once."""

from __future__ import annotations

import re
import signal
import smtplib
import subprocess
import sys
import time
from pathlib import Path

from conftest import ROOT

from crmstore import models as m
from crmstore.db import Store


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
