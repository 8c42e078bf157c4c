"""``dealmail status`` and the metrics of pre-forked workers, against a real ``dealmail serve``
with two workers: the status file names the listeners and both workers, the parent's metrics
endpoint sums what every worker answered, and a stopped server is reported as not running."""

from __future__ import annotations

import json
import os
import signal
import smtplib
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from dealmail import cli

ROOT = Path(__file__).resolve().parents[2]
BCC = "example@dealmail.localhost"


def test_status_and_metrics_of_a_preforked_server(config_copy: Path, tmp_path: Path) -> None:
    common = ["--config", str(config_copy), "--set", f"database.url=sqlite:///{tmp_path}/d.db",
              "--set", f"server.status_file={tmp_path}/var/status.json"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "run_server.py"), *common, "--set", "listeners.workers=2",
         "--set", "listeners.inbound=127.0.0.1:0", "--set", "listeners.submission=",
         "--set", "listeners.metrics=127.0.0.1:0",
         "--set", f"server.demo_data={ROOT / 'conf' / 'demo'}"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    status_file = tmp_path / "var" / "status.json"

    def status() -> tuple[int, dict]:  # type: ignore[type-arg]
        done = subprocess.run([sys.executable, "-m", "dealmail.cli", "status", "--json",
                               *common], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=60)
        return done.returncode, json.loads(done.stdout)

    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if status_file.exists() and len(json.loads(status_file.read_text())
                                             .get("workers", [])) == 2 and all(
                    (tmp_path / "var" / f"status.json.worker{i}").exists() for i in (0, 1)):
                break
            time.sleep(0.1)
        code, report = status()
        assert code == 0 and report["running"] is True
        server = report["server"]
        assert [w["alive"] for w in server["workers"]] == [True, True]
        host, port = server["listeners"]["inbound"].rsplit(":", 1)
        with smtplib.SMTP(host, int(port), timeout=30) as s:
            for n in range(4):
                s.sendmail("alice@example.com", [BCC],
                           (f"From: Alice <alice@example.com>\r\nTo: Carl <carl@other.test>\r\n"
                            f"Subject: n{n}\r\nMessage-ID: <n{n}@example.com>\r\n\r\nhi\r\n"
                            ).encode())
        metrics = server["listeners"]["metrics"]
        with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=10) as r:
            text = r.read().decode()
        stored = sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                     if s.name == "dealmail_messages_total" and s.labels["outcome"] == "stored")
        assert stored == 4
        db = report["database"]
        assert db["quarantined"] == 0 and set(db["outbox"]) == {"queued", "sent", "failed",
                                                                   "dropped"}
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    code, report = status()
    assert code == cli.EXIT_UNAVAILABLE and report["running"] is False
    assert report["server"]["state"] == "stopped"
