"""Tests for the ``dealmail`` command line: check-config's effective configuration, ``--set``
and ``--config`` for every subcommand wherever they are written, CSV import of the demo data
(idempotent, a bad row imports nothing and names its line) and the persons/deals listings.

Commands run in-process through :func:`dealmail.cli.main` (one run through a real
subprocess checks the console entry point), each on its own temporary SQLite database.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from crmstore import models as m
from crmstore.db import Store
from dealmail import cli
from dealmail.config import Config

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "conf" / "dealmail.example.toml"
DEMO = ROOT / "conf" / "demo"


pytestmark = pytest.mark.usefixtures("restore_logging")


@pytest.fixture
def conf(config_copy: Path) -> Path:
    return config_copy


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/crm.db"


class Run:
    """Runs ``dealmail`` in-process with a config and a database of the test's own."""

    def __init__(self, conf: Path, db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
        self.conf, self.db_url, self.capsys = conf, db_url, capsys

    def __call__(self, *argv: str) -> tuple[int, str, str]:
        self.capsys.readouterr()
        code = cli.main([*argv, "--config", str(self.conf), "--set",
                         f"database.url={self.db_url}"])
        out = self.capsys.readouterr()
        return code, out.out, out.err

    def json(self, *argv: str) -> Any:
        code, out, err = self(*argv, "--json")
        assert code == 0, err
        return json.loads(out)


@pytest.fixture
def run(conf: Path, db_url: str, capsys: pytest.CaptureFixture[str]) -> Run:
    return Run(conf, db_url, capsys)


def table_counts(db_url: str) -> dict[str, int]:
    store = Store(db_url)
    store.open()
    try:
        return {model.__name__: model.select().count() for model in m.ALL_MODELS}
    finally:
        store.close()


def import_demo(run: Run) -> list[str]:
    outputs = []
    for kind in ("organizations", "persons", "deals"):
        code, out, err = run("import", kind, str(DEMO / f"{kind}.csv"), "--company", "example")
        assert code == 0, err
        outputs.append(out.strip())
    return outputs


# --------------------------------------------------------------------------- check-config


def test_check_config_prints_companies_addresses_and_senders(
    conf: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli.main(["check-config", "--config", str(conf)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"config: {conf}"
    assert "mail domain: dealmail.localhost" in out
    assert "company example (Example Inc); internal domains: example.com" in out
    served = [line.split()[1] for line in out if line.startswith("  serves: ")]
    assert served == ["example@dealmail.localhost", "example+deal<ID>@dealmail.localhost",
                      "example+ask@dealmail.localhost",
                      "example+choice-<token>@dealmail.localhost",
                      # Behind Postfix only (LMTP), for its sender/recipient BCC maps.
                      "example+sent@dealmail.localhost",
                      "example+received-<userkey>@dealmail.localhost"]
    i = out.index("  user alice@example.com (admin; default shared; auto deal linking on; en; "
                  "Europe/Paris; relay password not set)")
    assert out[i + 1] == "    may send as: alice@example.com, alice.personal@mail.test"
    j = out.index("  user bob@example.com (user; default private; auto deal linking on; ja; "
                  "Asia/Tokyo; relay password not set)")
    assert out[j + 1] == "    may send as: bob@example.com"


def test_check_config_through_the_console_entry_point(conf: Path, tmp_path: Path) -> None:
    """``python -m dealmail.cli`` behaves like ``main``: output on stdout, exit 0; a bad
    config: every problem on stderr, exit 78 (EX_CONFIG), nothing on stdout."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("DEALMAIL_CONFIG", None)
    ok = subprocess.run([sys.executable, "-m", "dealmail.cli", "check-config", "--config",
                         str(conf)], capture_output=True, text=True, cwd=tmp_path, env=env,
                        timeout=60, check=False)
    assert ok.returncode == 0, ok.stderr
    assert "    may send as: alice@example.com, alice.personal@mail.test" in ok.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text(conf.read_text(encoding="utf-8")
                   .replace('role = "admin"', 'role = "boss"')
                   .replace("max_recipients = 100", "max_recipients = -1")
                   .replace('address = "bob@example.com"', 'address = "bob@"'),
                   encoding="utf-8")
    lines = bad.read_text(encoding="utf-8").splitlines()
    where = {key: lines.index(text) + 1 for key, text in [
        ("role", 'role = "boss"'), ("max", "max_recipients = -1"),
        ("bob", 'address = "bob@"')]}
    done = subprocess.run([sys.executable, "-m", "dealmail.cli", "check-config", "--config",
                           str(bad)], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=60, check=False)
    assert done.returncode == 78
    assert done.stdout == ""
    problems = done.stderr.splitlines()
    assert problems[0] == f"{bad}:{where['max']}: limits.max_recipients: must be at least 1"
    assert problems[1] == (f"{bad}:{where['role']}: companies[0].users[0].role: "
                           "must be admin or user")
    assert problems[2].startswith(f"{bad}:{where['bob']}: companies[0].users[1].address: "
                                  "malformed address 'bob@'")
    assert problems[3] == "dealmail: 3 problem(s) in the configuration; nothing started"


# --------------------------------------------------------------------------- --set / --config


@pytest.mark.parametrize("position", ["before", "after"])
def test_set_and_config_work_before_or_after_the_subcommand(
    conf: Path, position: str, capsys: pytest.CaptureFixture[str],
) -> None:
    opts = ["--config", str(conf), "--set", "server.mail_domain=crm.example.net"]
    argv = [*opts, "check-config"] if position == "before" else ["check-config", *opts]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"config: {conf}\n")
    assert "  serves: example@crm.example.net  (Smart BCC: " in out


def test_later_set_wins(conf: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--set", "server.mail_domain=a.test", "--config", str(conf),
                     "check-config", "--set", "server.mail_domain=b.test"]) == 0
    assert "mail domain: b.test" in capsys.readouterr().out


SUBCOMMANDS: list[list[str]] = [
    ["serve"],
    ["check-config"],
    ["set-password", "bob@example.com"],
    ["import", "persons", str(DEMO / "persons.csv"), "--company", "example"],
    ["persons", "list"],
    ["deals", "list", "--json"],
    ["conversations", "--as", "alice@example.com", "--person", "ann@customer.test"],
]


@pytest.mark.parametrize("argv", SUBCOMMANDS, ids=lambda a: " ".join(a[:2]))
@pytest.mark.parametrize("position", ["top", "sub"])
def test_every_subcommand_validates_its_overrides(
    argv: list[str], position: str, conf: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An override that breaks the config stops every subcommand before it does anything."""
    monkeypatch.chdir(tmp_path)
    before = conf.read_bytes()
    bad = ["--config", str(conf), "--set", "limits.max_recipients=0"]
    full = [*bad, *argv] if position == "top" else [*argv, *bad]
    assert cli.main(full) == 78
    err = capsys.readouterr().err
    assert "limits.max_recipients: must be at least 1" in err
    assert conf.read_bytes() == before
    assert list(tmp_path.iterdir()) == [conf]  # no database, no var/ folder


@pytest.mark.parametrize("argv", [a for a in SUBCOMMANDS if a[0] not in
                                  ("serve", "check-config", "set-password")],
                         ids=lambda a: " ".join(a[:2]))
def test_store_subcommands_use_the_overridden_database(
    argv: list[str], conf: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    db = tmp_path / "elsewhere" / "crm.db"
    depth = 2 if argv[0] in ("persons", "deals") else 1
    full = [*argv[:depth], "--set", f"database.url=sqlite:///{db}", *argv[depth:],
            "--config", str(conf)]
    code = cli.main(full)
    err = capsys.readouterr().err
    assert db.exists()
    if argv[0] == "conversations":
        # An empty database has no such person: a clear error, not a crash.
        assert code == 67 and "no person with address 'ann@customer.test'" in err
    else:
        assert code == 0, err


def test_serve_gets_the_overridden_config(
    conf: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[tuple[Config, bool, tuple[str, ...]]] = []

    def fake_serve(config: Config, fallback: bool, overrides: tuple[str, ...]) -> int:
        seen.append((config, fallback, overrides))
        return 0

    monkeypatch.setattr(cli, "serve", fake_serve)
    assert cli.main(["--set", "listeners.inbound=127.0.0.1:2600", "serve", "--config",
                     str(conf), "--set", "listeners.submission="]) == 0
    (config, fallback, overrides), = seen
    assert config.path == conf and fallback is False
    assert config.listeners.inbound == "127.0.0.1:2600" and config.listeners.submission == ""
    # The overrides are kept so that a SIGHUP reload applies them again.
    assert overrides == ("listeners.inbound=127.0.0.1:2600", "listeners.submission=")


# --------------------------------------------------------------------------- import & listings


def test_import_demo_then_list_persons_and_deals(run: Run) -> None:
    outputs = import_demo(run)
    assert outputs == [
        "organizations: 2 rows; 2 created, 0 updated, 0 unchanged",
        "persons: 3 rows; 3 created, 0 updated, 0 unchanged",
        "deals: 4 rows; 4 created, 0 updated, 0 unchanged",
    ]
    persons = run.json("persons", "list")
    by_name = {p["name"]: p for p in persons}
    assert set(by_name) == {"Ann Customer", "Carl Other", "Dora Customer"}
    assert by_name["Ann Customer"]["addresses"] == ["ann@customer.test"]
    assert by_name["Ann Customer"]["organization"] == "Customer Inc"
    assert by_name["Ann Customer"]["open_deals"] == 2
    assert by_name["Carl Other"]["open_deals"] == 1  # "Old order" is won
    assert by_name["Dora Customer"]["open_deals"] == 0
    assert by_name["Dora Customer"]["organization"] == "Customer Inc"
    assert all(set(p) >= {"id", "name", "addresses", "organization", "open_deals"}
               for p in persons)

    deals = run.json("deals", "list", "--company", "example")
    assert [(d["title"], d["status"], d["person"], d["organization"], d["owner"], d["value"],
             d["currency"], d["stage"]) for d in deals] == [
        ("Renewal 2027", "open", "Ann Customer", "Customer Inc", "alice@example.com",
         "12000.00", "EUR", "Proposal"),
        ("Upsell seats", "open", "Ann Customer", "Customer Inc", "alice@example.com",
         "4500.00", "EUR", "Qualified"),
        ("Pilot", "open", "Carl Other", "Other Ltd", "bob@example.com", "3000.00", "EUR",
         "Negotiation"),
        ("Old order", "won", "Carl Other", "Other Ltd", "bob@example.com", "800.00", "EUR",
         "Closed"),
    ]

    code, out, _ = run("persons", "list")
    assert code == 0 and "ann@customer.test" in out and "open deals: 2" in out
    code, out, _ = run("deals", "list")
    assert code == 0 and "Renewal 2027" in out and "owner alice@example.com" in out


def test_importing_the_demo_twice_changes_nothing(run: Run, db_url: str) -> None:
    import_demo(run)
    counts = table_counts(db_url)
    persons, deals = run.json("persons", "list"), run.json("deals", "list")
    assert counts["Person"] == 3 and counts["Deal"] == 4 and counts["Organization"] == 2
    assert counts["PersonAddress"] == 3 and counts["OrgDomain"] == 2

    assert import_demo(run) == [
        "organizations: 2 rows; 0 created, 0 updated, 2 unchanged",
        "persons: 3 rows; 0 created, 0 updated, 3 unchanged",
        "deals: 4 rows; 0 created, 0 updated, 4 unchanged",
    ]
    assert table_counts(db_url) == counts
    assert run.json("persons", "list") == persons
    assert run.json("deals", "list") == deals


def test_a_csv_with_one_bad_row_imports_nothing_and_names_the_line(
    run: Run, db_url: str, tmp_path: Path,
) -> None:
    import_demo(run)
    counts = table_counts(db_url)
    deals = run.json("deals", "list")
    bad = tmp_path / "deals.csv"
    bad.write_text(
        "Title,Status,Person,Organization,Value,Currency,Owner,Stage\n"
        "Expansion,open,Ann Customer,Customer Inc,100,EUR,alice@example.com,Lead\n"
        "Second site,open,Dora Customer,Customer Inc,200,EUR,alice@example.com,Lead\n"
        "Broken,maybe,Dora Customer,Customer Inc,300,EUR,alice@example.com,Lead\n"
        "Third site,open,Carl Other,Other Ltd,400,EUR,bob@example.com,Lead\n",
        encoding="utf-8")
    code, out, err = run("import", "deals", str(bad), "--company", "example")
    assert code == 65  # EX_DATAERR
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"{bad}:4: ") and "maybe" in lines[0]
    assert lines[1] == f"dealmail: {bad}: 1 bad row(s); nothing imported"
    assert table_counts(db_url) == counts
    assert run.json("deals", "list") == deals


def test_import_into_an_unknown_company(run: Run, db_url: str) -> None:
    code, _, err = run("import", "persons", str(DEMO / "persons.csv"), "--company", "nope")
    assert code == 67 and "unknown company 'nope'" in err
    assert table_counts(db_url)["Person"] == 0


def test_import_of_a_missing_file(run: Run, tmp_path: Path) -> None:
    code, _, err = run("import", "persons", str(tmp_path / "missing.csv"), "--company",
                       "example")
    assert code == 65
    assert str(tmp_path / "missing.csv") in err and "nothing imported" in err


def test_listing_an_unknown_company(run: Run) -> None:
    code, out, err = run("persons", "list", "--company", "nope")
    assert code == 67 and out == "" and "unknown company 'nope'" in err


# --------------------------------------------------------------------------- emails


def stored_email(db_url: str, owner: str, subject: str) -> str:
    """One email with its owner's copy, as the recording path leaves it; returns its handle."""
    from datetime import datetime

    from crmstore.handles import next_number

    store = Store(db_url)
    store.open()
    try:
        with store.transaction():
            company = m.Company.get()
            when = datetime(2026, 11, 26, 9)
            thread = m.Thread.create(company=company, subject_key=subject.lower(),
                                     created_at=when, last_at=when)
            email = m.Email.create(company=company, dedupe_key=f"<{subject}@x>",
                                   message_id=f"<{subject}@x>", content_hash="h", thread=thread,
                                   subject=subject, date=datetime(2026, 11, 26, 9),
                                   from_address=owner, raw=b"raw",
                                   number=next_number(company.id))
            m.Participant.create(email=email, address="carl@other.test", role="to")
            m.Sighting.create(email=email, user=m.User.get(m.User.address == owner),
                              channel="bcc", visibility="shared", queue_id="Q",
                              received_at=datetime(2026, 11, 26, 9))
            return f"E{email.number}"
    finally:
        store.close()


def test_emails_commands_for_scripts(run: Run, db_url: str) -> None:
    import_demo(run)
    h = stored_email(db_url, "alice@example.com", "Hello")
    [listed] = run.json("emails", "list", "--as", "alice@example.com")
    assert (listed["handle"], listed["subject"], listed["visibility"]) == (h, "Hello", "shared")
    assert run.json("emails", "show", h, "--as", "alice@example.com")["yours"] is True
    [done] = run.json("emails", "private", h, "--as", "alice@example.com")
    assert (done["command"], done["target"], done["status"]) == ("private", h, "done")
    code, out, _ = run("emails", "deal", h, "Pilot", "--as", "alice@example.com")
    assert code == 0 and out == f"done: {h} “Hello”: the thread is now on deal #3 “Pilot”.\n"
    code, out, _ = run("emails", "deal", h, "No such deal", "--as", "alice@example.com")
    assert code == 65 and out.startswith("refused: ")
    # Bob (and an admin acting for a colleague alike) gets no power over Alice's copy.
    code, out, _ = run("emails", "forget", h, "--as", "bob@example.com")
    assert (code, out) == (67, f"refused: {h}: unknown, or not your email.\n")
    code, _out, err = run("emails", "show", h, "--as", "bob@example.com")
    assert code == 67 and "unknown, or not an email you may see" in err  # private now
    code, _out, err = run("emails", "private", "X1", "--as", "alice@example.com")
    assert code == 2 and "not an email handle" in err
    [gone] = run.json("emails", "forget", h, "--as", "alice@example.com")
    assert gone["status"] == "done" and "deleted" not in gone
    assert run("emails", "show", h, "--as", "alice@example.com")[0] == 67
    assert run.json("emails", "ignore", "@other.test", "--as", "alice@example.com")[0][
        "status"] == "done"
    assert run.json("emails", "ignored", "--as", "alice@example.com") == ["@other.test"]
    assert table_counts(db_url)["Email"] == 0
    store = Store(db_url)
    store.open()
    try:
        entries = [(a.action, json.loads(a.detail_json)["via"]) for a in
                   m.AuditEntry.select().order_by(m.AuditEntry.id)]
    finally:
        store.close()
    assert entries == [("visibility", "cli"), ("deal", "cli"), ("forget", "cli"),
                       ("ignore", "cli")]
