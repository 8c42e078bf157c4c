"""SIGHUP applies what can change live and names what cannot.

In-process (``App.reload``, as the SIGHUP handler calls it): a tightened ``[outbox]
smarthost_tls`` stops the next delivery to a smarthost without STARTTLS; a new ``[tls]``
certificate is what the submission listener presents to the next client; a new
``limits.message_size`` is the next session's SIZE; a changed listener address is named in
one "needs a restart" line; an unreadable certificate refuses the whole reload.
Through a real ``dealmail serve`` process and ``kill -HUP``: the log file moved away by
logrotate is reopened.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import smtplib
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from crmstore import models as m
from crmstore.outbox import enqueue
from dealmail.app import App
from dealmail.clock import FakeClock
from dealmail.config import load_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "support"))
from conftest import RunningApp
from smtpsink import SmtpSink

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "conf" / "dealmail.example.toml"


class Reloadable:
    """An App on a config file of the test's own, which the test rewrites and reloads."""

    def __init__(self, tmp_path: Path, clock: FakeClock, *overrides: str) -> None:
        self.path = tmp_path / "dealmail.toml"
        self.text = EXAMPLE.read_text(encoding="utf-8")
        self.path.write_text(self.text, encoding="utf-8")
        self.overrides = (f"database.url=sqlite:///{tmp_path}/dealmail.db",
                          "listeners.inbound=127.0.0.1:0", "listeners.submission=",
                          f"server.status_file={tmp_path}/status.json", "server.demo_data=",
                          *overrides)
        config = load_config(self.path, self.overrides)
        self.running = RunningApp(App(config, clock=clock, overrides=self.overrides,
                                      base=tmp_path, start_outbox_worker=False))
        self.running.start()
        self.app = self.running.app

    def edit(self, old: str, new: str) -> None:
        assert old in self.text, old
        self.text = self.text.replace(old, new, 1)
        self.path.write_text(self.text, encoding="utf-8")

    def reload(self) -> bool:
        async def run() -> bool:
            return self.app.reload()

        return bool(self.running.call(run()))


@pytest.fixture
def reloadable(tmp_path: Path, clock: FakeClock) -> Iterator[Any]:
    made: list[Reloadable] = []

    def make(*overrides: str) -> Reloadable:
        made.append(Reloadable(tmp_path, clock, *overrides))
        return made[-1]

    yield make
    for r in made:
        r.running.stop()


def test_outbox_tls_tightened_by_reload_applies_to_the_next_delivery(
        reloadable: Any, clock: FakeClock) -> None:
    with SmtpSink() as sink:  # no STARTTLS offered
        r = reloadable()
        r.edit('smarthost = ""', f'smarthost = "127.0.0.1:{sink.port}"')
        r.edit('smarthost_tls = "required"', 'smarthost_tls = "opportunistic"')
        assert r.reload()
        raw = b"From: a@example.com\r\nTo: ann@customer.test\r\nSubject: x\r\n\r\nhi\r\n"

        def queue() -> int:
            with r.app.store.transaction():
                [item] = enqueue(raw, kind="relay", mail_from="alice@example.com",
                                 recipients=["ann@customer.test"], now=clock.now())
            return item

        first = queue()
        assert r.running.call(r.app.outbox.run_once()) == 1
        assert len(sink.messages) == 1 and not sink.messages[0].tls  # cleartext, as configured
        assert m.OutboxItem.get_by_id(first).state == "sent"

        r.edit('smarthost_tls = "opportunistic"', 'smarthost_tls = "required"')
        assert r.reload()
        second = queue()
        assert r.running.call(r.app.outbox.run_once()) == 1
        assert len(sink.messages) == 1  # nothing more went out in cleartext
        item = m.OutboxItem.get_by_id(second)
        assert item.state == "queued" and "does not offer STARTTLS" in item.last_error


def _self_signed(folder: Path, name: str) -> tuple[Path, Path]:
    from mta.relay.tlscert import ensure_self_signed

    cert, key = folder / f"{name}.crt", folder / f"{name}.key"
    assert ensure_self_signed(cert, key, name, FakeClock().now())
    return cert, key


def _handshake(port: int, cafile: Path) -> bool:
    context = ssl.create_default_context(cafile=str(cafile))
    context.check_hostname = False
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        try:
            s.starttls(context=context)
        except ssl.SSLError:
            return False
        return True


def test_reload_loads_a_new_certificate_into_the_submission_listener(
        reloadable: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    old_cert, _ = _self_signed(tmp_path, "old")
    new_cert, _ = _self_signed(tmp_path, "new")
    r = reloadable("listeners.submission=127.0.0.1:0", "tls.cert_file=old.crt",
                   "tls.key_file=old.key")
    port = r.app.port("submission")
    assert _handshake(port, old_cert) and not _handshake(port, new_cert)
    r.edit('cert_file = ""', 'cert_file = "new.crt"')
    r.edit('key_file = ""', 'key_file = "new.key"')
    r.overrides = r.app.overrides = tuple(o for o in r.overrides if not o.startswith("tls."))
    assert r.reload()
    assert _handshake(port, new_cert) and not _handshake(port, old_cert)

    # A certificate file that cannot be read refuses the whole reload: nothing changes.
    r.edit('cert_file = "new.crt"', 'cert_file = "missing.crt"')
    r.edit('message_size = 26214400', 'message_size = 2048')
    caplog.set_level(logging.ERROR, "dealmail.app")
    assert not r.reload()
    assert "tls.cert_file: cannot read missing.crt" in caplog.text
    assert r.app.config.limits.message_size == 26214400
    assert _handshake(port, new_cert)


def test_reload_applies_limits_and_names_what_needs_a_restart(
        reloadable: Any, caplog: pytest.LogCaptureFixture) -> None:
    r = reloadable()
    with smtplib.SMTP("127.0.0.1", r.running.port, timeout=10) as s:
        s.ehlo()
        assert s.esmtp_features["size"] == "26214400"
    r.edit("message_size = 26214400", "message_size = 4096")
    r.edit('inbound = "127.0.0.1:2525"', 'inbound = "127.0.0.1:2626"')
    r.overrides = r.app.overrides = tuple(o for o in r.overrides
                                          if not o.startswith("listeners.inbound"))
    caplog.set_level(logging.INFO, "dealmail.app")
    assert r.reload()
    with smtplib.SMTP("127.0.0.1", r.running.port, timeout=10) as s:
        s.ehlo()
        assert s.esmtp_features["size"] == "4096"
        big = b"From: alice@example.com\r\nSubject: big\r\n\r\n" + b"x" * 70 + b"\r\n"
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            s.sendmail("alice@example.com", ["example@dealmail.localhost"], big * 80)
        assert refused.value.smtp_code == 552
    restart = [rec.getMessage() for rec in caplog.records if "needs a restart" in
               rec.getMessage()]
    assert len(restart) == 1 and restart[0].startswith("needs a restart: listeners.inbound")
    assert r.app.address("inbound") != "127.0.0.1:2626"  # still where it listened


def _wait_for(predicate: Any, what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_sighup_reopens_the_log_file_after_logrotate(tmp_path: Path) -> None:
    log_file = tmp_path / "dealmail.log"
    conf = tmp_path / "dealmail.toml"
    conf.write_text(EXAMPLE.read_text(encoding="utf-8"), encoding="utf-8")
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "run_server.py"), "--config", str(conf),
         "--set", f"database.url=sqlite:///{tmp_path}/d.db",
         "--set", "listeners.inbound=127.0.0.1:0", "--set", "listeners.submission=",
         "--set", f"server.log_file={log_file}", "--set", "server.demo_data=",
         "--set", f"server.status_file={tmp_path}/status.json"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_for((tmp_path / "status.json").exists, "the status file")
        rotated = tmp_path / "dealmail.log.1"
        log_file.rename(rotated)  # what logrotate does before its postrotate HUP
        proc.send_signal(signal.SIGHUP)
        _wait_for(lambda: log_file.exists() and "config reloaded" in log_file.read_text(),
                  "the reload line in the new file")
        assert "config reloaded" not in rotated.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert re.search(r"INFO dealmail.app: stopped", log_file.read_text())
