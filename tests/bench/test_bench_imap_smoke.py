"""Smoke test of ``python -m bench imap --quick``: it runs end to end against the private
Dovecot and prints both sides. Timing figures are never asserted (they depend on the
machine); what is checked is that both sides read every message and that dealmail stored
them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_imap_quick_prints_table_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "imap", "--quick", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dealmail IMAP initial sync benchmark (quick" in proc.stdout
    for header in ("msg/s", "peak RSS MiB", "CPU ms/msg", "ratio"):
        assert header in proc.stdout
    data = json.loads(out.read_text())
    assert set(data["mailboxes"]) == {"small", "large"}
    for box in data["mailboxes"].values():
        assert box["baseline"]["messages"] == box["messages"]
        deal = box["dealmail"]
        assert deal["messages"] == box["messages"] and deal["failed"] == 0
        assert deal["stored"] + deal["not_tracked"] == box["messages"]
        assert deal["pending_choices"] > 0  # customers with several open deals
        assert box["sync_only"]["messages"] == box["messages"]
        assert box["ratio"] > 0 and deal["peak_rss_mib"] > 0
