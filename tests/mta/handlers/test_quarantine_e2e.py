"""Quarantine tools end to end: a copy the policy could not verify is held (logged as
"quarantined", no deal question), listed for the admin without its body, released by the
claimed user with ``release E<number>`` (the email's handle) to ``+ask`` (then linked and
asked about as usual), and released or dropped with ``dealmail quarantine``.
"""

from __future__ import annotations

import json
import logging
import os
import smtplib
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import EXAMPLE, ROOT, make_config

from crmstore import models as m
from crmstore.visibility import can_see
from dealmail import cli

UNTRUSTED = "127.0.0.2"  # outside policy.trusted_networks below: verification "none"
BCC = "example@dealmail.localhost"


def mail(subject: str, to: str = "Ann <ann@customer.test>") -> bytes:
    return (f"From: Alice <alice@example.com>\r\nTo: {to}\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject.replace(' ', '-')}@example.com>\r\n"
            f"Date: Thu, 26 Nov 2026 09:00:00 +0000\r\n\r\nSecret body of {subject}\r\n"
            ).encode()


@pytest.fixture
def setup(tmp_path: Path, server_factory: Any) -> Any:
    conf = tmp_path / "dealmail.toml"
    conf.write_text(EXAMPLE.read_text(encoding="utf-8").replace(
        'on_unverified = "reject"', 'on_unverified = "quarantine"'), encoding="utf-8")
    overrides = ("policy.trusted_networks=['127.0.0.1/32']",)
    running = server_factory(config=make_config(tmp_path, *overrides, path=conf),
                             start_outbox_worker=False)

    def admin(*argv: str) -> tuple[int, str]:
        # A process of its own, as an admin runs it: peewee's models are bound process-wide,
        # so an in-process CLI would take them from the running server.
        done = subprocess.run(
            [sys.executable, "-m", "dealmail.cli", *argv, "--config", str(conf), "--set",
             f"database.url=sqlite:///{tmp_path}/dealmail.db", "--set", overrides[0]],
            capture_output=True, text=True, timeout=60, cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(ROOT)})
        return done.returncode, done.stdout

    return running, admin


def send(port: int, raw: bytes, source: str = UNTRUSTED, to: str = BCC) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, source_address=(source, 0), timeout=30) as s:
        s.ehlo()
        s.mail("alice@example.com")
        s.rcpt(to)
        return s.data(raw)


def test_quarantine_list_release_by_email_and_drop(
        setup: Any, caplog: pytest.LogCaptureFixture) -> None:
    running, admin = setup
    caplog.set_level(logging.INFO, "dealmail.capture")
    code, text = send(running.port, mail("Renewal terms"))
    assert code == 250
    email = m.Email.get(m.Email.subject == "Renewal terms")
    [sighting] = list(m.Sighting.select().where(m.Sighting.email == email.id))
    assert sighting.visibility == "quarantined"
    qid = text.decode().rsplit(" ", 1)[1]
    lines = [r.getMessage() for r in caplog.records if f"[{qid}]" in r.getMessage()]
    assert lines and all("accepted" not in line for line in lines)
    assert any(" quarantined as email #" in line and " from alice@example.com (" in line
               for line in lines)
    # Ann has two open deals, but nobody is asked about a copy nobody may see.
    assert not m.PendingChoice.select().exists()
    assert not m.OutboxItem.select().where(m.OutboxItem.kind == "question").exists()

    code, out = admin("quarantine", "list", "--json")
    assert code == 0
    [listed] = json.loads(out)
    assert listed["id"] == email.id and listed["claimed_user"] == "alice@example.com"
    assert listed["client_ip"] == UNTRUSTED and listed["verification"] == "none"
    assert listed["subject"] == "Renewal terms" and listed["size"] == email.size
    assert "Secret body" not in json.dumps(listed)  # metadata only, never the body

    # Alice releases it herself, from where she is verified (the trusted network).
    code, _ = send(running.port, (f"From: Alice <alice@example.com>\r\nTo: {BCC}\r\n"
                                  f"Subject: release E{email.number}\r\n\r\n").encode(),
                   source="127.0.0.1", to="example+ask@dealmail.localhost")
    assert code == 250
    alice = m.User.get(m.User.address == "alice@example.com")
    assert m.Sighting.get_by_id(sighting.id).visibility == "shared"  # her default
    assert can_see(alice, email.id)
    [choice] = list(m.PendingChoice.select())
    assert choice.email_id == email.id and choice.user_id == alice.id
    kinds = sorted(i.kind for i in m.OutboxItem.select())
    assert kinds == ["answer", "question"]
    answer = m.OutboxItem.get(m.OutboxItem.kind == "answer")
    assert "Released from quarantine" in answer.subject
    assert m.AuditEntry.select().where(m.AuditEntry.action == "quarantine-release").exists()

    # Asking again: nothing left to release, and the user is told so.
    send(running.port, (f"From: Alice <alice@example.com>\r\nTo: {BCC}\r\n"
                        f"Subject: release E{email.number}\r\n\r\n").encode(),
         source="127.0.0.1", to="example+ask@dealmail.localhost")
    assert m.OutboxItem.select().where(m.OutboxItem.subject.contains("Nothing to release")
                                       ).count() == 1

    # The admin releases one and drops another.
    send(running.port, mail("Second offer", to="Dora <dora@customer.test>"))
    send(running.port, mail("Forged order", to="Zed <zed@newco.test>"))
    second = m.Email.get(m.Email.subject == "Second offer")
    forged = m.Email.get(m.Email.subject == "Forged order")
    zed = m.PersonAddress.get(m.PersonAddress.address == "zed@newco.test").person_id
    assert admin("quarantine", "release", str(second.id))[0] == 0
    assert can_see(alice, second.id)
    assert admin("quarantine", "drop", str(forged.id))[0] == 0
    assert m.Email.get_or_none(m.Email.id == forged.id) is None
    assert m.Person.get_or_none(m.Person.id == zed) is None  # created only by the forgery
    assert admin("quarantine", "drop", str(forged.id))[0] == cli.EXIT_NOTFOUND
    assert admin("quarantine", "release", str(second.id))[0] == cli.EXIT_NOTFOUND
    assert json.loads(admin("quarantine", "list", "--json")[1]) == []


def test_digest_tells_the_claimed_user_how_to_release(setup: Any) -> None:
    from datetime import timedelta

    from digest.digests import compose_digest, render_digest

    running, _admin = setup
    send(running.port, mail("Held one"))
    email = m.Email.get(m.Email.subject == "Held one")
    config = running.app.config
    now = running.app.clock.now()
    digest = compose_digest(config, "alice@example.com", now - timedelta(days=1),
                            now + timedelta(hours=1), now + timedelta(hours=1))
    _subject, text, html = render_digest(digest)
    assert f"(release E{email.number})" in text and "Held one" not in text
    assert f'"release E{email.number}"' in text and "example+ask@dealmail.localhost" in text
    assert f"release E{email.number}" in html
