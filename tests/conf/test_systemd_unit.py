"""conf/systemd/dealmail.service: sandboxed as the admin's guide says, and valid for systemd
(``systemd-analyze verify``, where systemd is installed: it is part of Debian's ``systemd``
package, present on the development machines)."""

from __future__ import annotations

import configparser
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "conf" / "systemd" / "dealmail.service"


def test_the_unit_is_sandboxed_and_reloads_with_hup() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(UNIT)
    service = unit["Service"]
    assert service["ProtectSystem"] == "strict"
    assert service["ReadWritePaths"].endswith("/var")
    assert service["NoNewPrivileges"] == "yes"
    assert service["CapabilityBoundingSet"] == "CAP_NET_BIND_SERVICE"
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["ExecStart"].endswith("dealmail serve")
    assert "71" in service["RestartPreventExitStatus"].split()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd not installed")
def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    # verify checks that ExecStart and the working directory exist: point them at stand-ins.
    (tmp_path / "var").mkdir()
    program = tmp_path / "dealmail"
    program.write_text("#!/bin/sh\nexit 0\n")
    program.chmod(0o755)
    text = UNIT.read_text().replace("/opt/dealmail/.venv/bin/dealmail", str(program))
    unit = tmp_path / "dealmail.service"
    unit.write_text(text.replace("/opt/dealmail", str(tmp_path)))
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "", done.stderr
    broken = tmp_path / "broken.service"
    broken.write_text(text.replace("/opt/dealmail", str(tmp_path))
                      .replace("ProtectSystem=strict", "ProtectSystem=very"))
    done = subprocess.run(["systemd-analyze", "verify", str(broken)], capture_output=True,
                          text=True, timeout=60)
    assert "protect system" in done.stderr  # the check does read the sandboxing lines
