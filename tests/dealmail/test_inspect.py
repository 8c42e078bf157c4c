"""``dealmail inspect``: reads a message and stores nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dealmail.cli import main

pytestmark = pytest.mark.usefixtures("restore_logging")

FORWARD = (b"From: Alice <alice@example.com>\r\nSubject: Fwd: Re: Proposal\r\n"
           b"Message-ID: <f9@example.com>\r\n\r\nFYI, Ann's answer.\r\n\r\n"
           b"---------- Forwarded message ---------\r\n"
           b"From: Ann Customer <ann@customer.test>\r\n"
           b"Date: Thu, Nov 26, 2026 at 10:03 AM\r\nSubject: Re: Proposal\r\n"
           b"To: Alice <alice@example.com>\r\n\r\nWe would like 20 more seats.\r\n")


def test_inspect_forward_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    eml = tmp_path / "fwd.eml"
    eml.write_bytes(FORWARD)
    db = tmp_path / "x.db"
    assert main(["inspect", str(eml), "--json", "--config", "conf/dealmail.example.toml",
                 "--set", f"database.url=sqlite:///{db}"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["kind"] == "forward" and out["forwarded"] is True
    assert out["sender"] == {"address": "alice@example.com", "name": "Alice"}
    assert out["original"]["from"]["address"] == "ann@customer.test"
    assert out["original"]["note"] == "FYI, Ann's answer."
    assert out["participants"][0] == {"address": "ann@customer.test", "name": "Ann Customer",
                                      "role": "from"}
    assert out["thread_keys"]["subject"] == "proposal"
    assert not db.exists()  # nothing stored, no database even opened


def test_inspect_bcc_copy_with_company(tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    eml = tmp_path / "bcc.eml"
    eml.write_bytes(b"From: Alice <alice@example.com>\r\nTo: Ann <ann@customer.test>\r\n"
                    b"Subject: Offer\r\n\r\nHello Ann\r\n\r\n-- \r\nAlice\r\n")
    db = tmp_path / "x.db"
    args = ["--config", "conf/dealmail.example.toml", "--set", f"database.url=sqlite:///{db}"]
    for kind in ("organizations", "persons", "deals"):
        assert main(["import", kind, f"conf/demo/{kind}.csv", "--company", "example",
                     *args]) == 0
    capsys.readouterr()
    assert main(["inspect", str(eml), "--company", "example", "--json", *args]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["kind"] == "bcc" and out["forwarded"] is False
    assert out["reply_text"] == "Hello Ann"
    assert out["would_link"]["needs_choice"] is True
    assert {d["title"] for d in out["would_link"]["open_deals"]} == {"Renewal 2027",
                                                                     "Upsell seats"}


def test_inspect_refused_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    eml = tmp_path / "bad.eml"
    eml.write_bytes(b"From: a@x.test\r\nFrom: b@y.test\r\n\r\nhi\r\n")
    assert main(["inspect", str(eml), "--config", "conf/dealmail.example.toml"]) != 0
    assert "more than one From" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["multipart", "rfc822"])
def test_inspect_deep_nesting_reports_the_reason(tmp_path: Path, kind: str) -> None:
    """The listener's reason (554 5.6.0) and a non-zero exit, never a traceback."""
    import subprocess
    import sys

    from conftest import ROOT
    from support.mail import nested_multipart, nested_rfc822

    eml = tmp_path / "deep.eml"
    eml.write_bytes((nested_multipart if kind == "multipart" else nested_rfc822)(5000))
    done = subprocess.run([sys.executable, "-m", "dealmail.cli", "inspect", str(eml),
                           "--config", str(ROOT / "conf" / "dealmail.example.toml")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert done.returncode == 65
    assert "would be refused (554 5.6.0): MIME structure nested deeper than 50 levels" in (
        done.stderr)
    assert "Traceback" not in done.stderr + done.stdout
