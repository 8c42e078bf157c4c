"""No message content in any log at any level (dealmail/logs.py): a private email's subject
and body appear nowhere in the server's log at ``log_level = "debug"``, nor in a command's
debug output that reads it back, while the decisions about it are logged."""

from __future__ import annotations

import re
import signal
import smtplib
import subprocess
import sys
import time
from pathlib import Path

from conftest import ROOT

SUBJECT = "Confidential pricing for Carl zq7subject"
BODY = "Our floor price is 41,999 EUR zq7body; do not forward."


def test_debug_log_holds_no_private_text(tmp_path: Path) -> None:
    db = tmp_path / "dealmail.db"
    log = tmp_path / "server.log"
    settings = ["--config", str(ROOT / "conf" / "dealmail.example.toml"),
                "--set", f"database.url=sqlite:///{db}",
                "--set", f"server.demo_data={ROOT / 'conf' / 'demo'}"]
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "run_server.py"), *settings, "--log-level", "debug",
         "--set", "listeners.inbound=127.0.0.1:0", "--set", "listeners.submission=",
         "--set", f"server.log_file={log}"], cwd=tmp_path)
    try:
        port = None
        deadline = time.monotonic() + 30
        while port is None and time.monotonic() < deadline:
            found = re.search(r"inbound SMTP listening on 127\.0\.0\.1:(\d+)",
                              log.read_text() if log.exists() else "")
            if found:
                port = int(found.group(1))
            else:
                time.sleep(0.1)  # waiting for a real process to start: no clock to inject
        assert port is not None, "server did not start"
        # Bob's mail is private by default (the example config).
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
            s.sendmail("bob@example.com", ["example@dealmail.localhost"],
                       f"From: Bob <bob@example.com>\r\nTo: Carl <carl@other.test>\r\n"
                       f"Subject: {SUBJECT}\r\nMessage-ID: <private-1@example.com>\r\n\r\n"
                       f"{BODY}\r\n".encode())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    # Reading it back as its owner, with debug output too.
    shown = subprocess.run(
        [sys.executable, "-m", "dealmail.cli", "conversations", "--as", "bob@example.com",
         "--person", "carl@other.test", *settings, "--log-level", "debug"],
        capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert shown.returncode == 0 and "zq7subject" in shown.stdout  # it is stored
    text = log.read_text()
    assert "<private-1@example.com> stored as email #" in text  # the decision is logged
    assert "DEBUG dealmail.committer: committed a batch of 1 job(s)" in text  # debug is on
    for secret in ("zq7subject", "zq7body", "41,999"):
        assert secret not in text, secret
        assert secret not in shown.stderr, secret
