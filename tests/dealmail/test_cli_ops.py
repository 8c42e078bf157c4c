"""The admin's command line around operations: help on every option, ``--version``, no
traceback when the reader of a pipe leaves, ``check-config``'s port, clash and file checks
and its delivery settings (secrets masked), one clear line and a non-zero exit when a listener
cannot bind, ``--log-format json``, progress bars only on a terminal, and one timestamp format
in every JSON output.
"""

from __future__ import annotations

import argparse
import json
import os
import pty
import select
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from dealmail import cli
from dealmail.addresses import format_mailbox
from dealmail.clock import json_time

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "conf" / "demo"

pytestmark = pytest.mark.usefixtures("restore_logging")


def dealmail(*argv: str, cwd: Path, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dealmail.cli", *argv], cwd=cwd,
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, **kw)


def _walk(parser: argparse.ArgumentParser, path: str) -> list[str]:
    missing = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                missing += _walk(sub, f"{path} {name}")
        elif not isinstance(action, argparse._HelpAction) and not action.help:
            missing.append(f"{path}: {'/'.join(action.option_strings) or action.dest}")
    return missing


def test_every_option_of_every_subcommand_has_help() -> None:
    assert _walk(cli._parser(), "dealmail") == []


def test_version_comes_from_the_package_metadata(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import PackageNotFoundError, version

    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0
    try:
        expected = version("dealmail")
    except PackageNotFoundError:
        expected = "0+source"
    assert capsys.readouterr().out.strip() == f"dealmail {expected}"


def test_a_closed_pipe_ends_quietly(config_copy: Path, tmp_path: Path) -> None:
    """``dealmail persons list | head -1``: the reader is gone before dealmail writes."""
    url = f"sqlite:///{tmp_path}/crm.db"
    for kind in ("organizations", "persons", "deals"):
        assert dealmail("import", kind, str(DEMO / f"{kind}.csv"), "--company", "example",
                        "--config", str(config_copy), "--set", f"database.url={url}",
                        cwd=tmp_path).returncode == 0
    read, write = os.pipe()
    os.close(read)  # like `head` after its line
    try:
        done = subprocess.run(
            [sys.executable, "-m", "dealmail.cli", "conversations", "--as",
             "alice@example.com", "--person", "ann@customer.test", "--config",
             str(config_copy), "--set", f"database.url={url}"],
            stdout=write, stderr=subprocess.PIPE, text=True, timeout=60, cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(ROOT)})
    finally:
        os.close(write)
    assert "Traceback" not in done.stderr and "BrokenPipeError" not in done.stderr
    assert done.stderr == ""
    assert done.returncode == 141


def test_check_config_checks_ports_clashes_and_files(config_copy: Path, tmp_path: Path) -> None:
    text = config_copy.read_text()
    config_copy.write_text(text.replace('inbound = "127.0.0.1:2525"', 'inbound = "127.0.0.1:99999"')
                           .replace('submissions = ""', 'submissions = "0.0.0.0:2587"'))
    done = dealmail("check-config", "--config", str(config_copy), cwd=tmp_path)
    assert done.returncode == cli.EXIT_CONFIG
    lines = done.stderr.splitlines()
    assert any(":listeners.inbound: port 99999 is not a TCP port" in ln.replace(" ", "", 1)
               or "listeners.inbound: port 99999 is not a TCP port" in ln for ln in lines)
    assert any("listeners.submissions: 0.0.0.0:2587 clashes with listeners.submission" in ln
               for ln in lines)

    config_copy.write_text(text.replace('cert_file = ""', 'cert_file = "missing.pem"')
                           .replace('key_file = ""', 'key_file = "missing.key"')
                           .replace('smarthost = ""', 'smarthost = "smtp.example.net:587"')
                           .replace('smarthost_username = ""', 'smarthost_username = "dm"')
                           .replace('smarthost_password = ""', 'smarthost_password = "s3cret!"'))
    done = dealmail("check-config", "--config", str(config_copy), cwd=tmp_path)
    assert done.returncode == cli.EXIT_CONFIG
    cert_line = next(i for i, ln in enumerate(text.splitlines(), 1) if ln.startswith("cert_file"))
    assert f"{config_copy}:{cert_line}: tls.cert_file: cannot read missing.pem: No such file" \
        in done.stderr
    assert "outbox: smarthost smtp.example.net:587 (TLS required); login dm / password ********" \
        in done.stdout
    assert "s3cret" not in done.stdout + done.stderr
    assert "dkim: relayed mail is not signed" in done.stdout


def test_a_listener_that_cannot_bind_is_one_line_and_a_nonzero_exit(
        config_copy: Path, tmp_path: Path) -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        done = dealmail("serve", "--config", str(config_copy), "--set",
                        f"database.url=sqlite:///{tmp_path}/d.db", "--set",
                        f"listeners.inbound=127.0.0.1:{port}", "--set", "listeners.submission=",
                        "--set", "server.demo_data=", "--set",
                        f"server.status_file={tmp_path}/status.json", cwd=tmp_path)
    finally:
        busy.close()
    assert done.returncode == cli.EXIT_OSERR
    assert "Traceback" not in done.stderr
    [line] = [ln for ln in done.stderr.splitlines() if "ERROR" in ln]
    assert line.endswith(f"cannot start: listeners.inbound: cannot listen on 127.0.0.1:{port}: "
                         "Address already in use")


def test_log_format_json_gives_one_object_per_line(config_copy: Path, tmp_path: Path) -> None:
    done = dealmail("import", "organizations", str(DEMO / "organizations.csv"), "--company",
                    "example", "--config", str(config_copy), "--set",
                    f"database.url=sqlite:///{tmp_path}/crm.db", "--log-format", "json",
                    cwd=tmp_path)
    assert done.returncode == 0
    records = [json.loads(line) for line in done.stderr.splitlines()]
    assert records and all({"ts", "level", "logger", "msg"} <= set(r) for r in records)
    assert records[0]["ts"].endswith("Z")


def _run_on_a_terminal(argv: list[str], cwd: Path) -> tuple[int, str]:
    """Run with standard error on a pseudo-terminal (what an admin's shell gives it)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "dealmail.cli", *argv], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=slave,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    os.close(slave)
    seen = b""
    while True:
        ready, _, _ = select.select([master], [], [], 60)
        if not ready:
            break
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed its end
            break
        if not chunk:
            break
        seen += chunk
    os.close(master)
    proc.communicate(timeout=60)
    return proc.returncode, seen.decode("utf-8", "replace")


def test_import_shows_progress_on_a_terminal_only(config_copy: Path, tmp_path: Path) -> None:
    rows = ["Name,Email"] + [f"Person {i},p{i}@customer{i % 50}.test" for i in range(3000)]
    csv = tmp_path / "persons.csv"
    csv.write_text("\n".join(rows) + "\n", encoding="utf-8")
    base = ["import", "persons", str(csv), "--company", "example", "--config",
            str(config_copy), "--set", f"database.url=sqlite:///{tmp_path}/crm.db"]
    code, screen = _run_on_a_terminal(base, tmp_path)
    assert code == 0
    assert "3000/3000" in screen and "rows/s" in screen  # done/total and the rate
    code, screen = _run_on_a_terminal([*base, "--quiet"], tmp_path)
    assert code == 0 and "3000/3000" not in screen
    done = dealmail(*base, cwd=tmp_path)  # standard error is a pipe: no bar
    assert done.returncode == 0 and "rows/s" not in done.stderr and "\r" not in done.stderr

    relink = ["relink", "--config", str(config_copy), "--set",
              f"database.url=sqlite:///{tmp_path}/crm.db"]
    code, screen = _run_on_a_terminal(relink, tmp_path)
    assert code == 0 and "email(s) linked" not in screen  # the summary goes to stdout


def test_json_timestamps_have_one_format() -> None:
    from datetime import UTC, datetime

    assert json_time(datetime(2026, 11, 26, 9, 0, 0, 123456)) == "2026-11-26T09:00:00Z"
    assert json_time(datetime(2026, 11, 26, 9, 0, 0)) == "2026-11-26T09:00:00Z"
    assert json_time("2026-11-26 09:00:00.5") == "2026-11-26T09:00:00Z"
    assert json_time(datetime(2026, 11, 26, 10, 0, tzinfo=UTC)) == "2026-11-26T10:00:00Z"


def test_empty_display_names_print_without_a_double_space() -> None:
    from digest.compose import environment

    assert format_mailbox("", "ann@customer.test") == "ann@customer.test"
    assert format_mailbox("  Ann  Customer ", "ann@customer.test") == \
        "Ann Customer <ann@customer.test>"
    template = environment().from_string("from {{ box | mailbox }};")
    assert template.render(box={"name": "", "address": "ann@customer.test"}) == \
        "from ann@customer.test;"
