"""Smoke test of the benchmark harness: ``python -m bench ingest --quick`` runs end to end.

Only checks that the table is printed and that the JSON holds every scenario with a positive
rate for both servers; timing figures are never asserted (they depend on the machine).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_ingest_quick_prints_table_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "ingest", "--quick", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dealmail ingest benchmark (quick" in proc.stdout
    for header in ("msg/s", "p50 ms", "p99 ms", "CPU ms/msg", "ratio"):
        assert header in proc.stdout
    data = json.loads(out.read_text())
    assert data["mode"] == "quick"
    assert set(data["scenarios"]) == {"persistent_c10", "persistent_c1", "half_rate"}
    for name, scenario in data["scenarios"].items():
        for server in ("baseline", "dealmail"):
            figures = scenario[server]
            assert figures["rate"] > 0, (name, server, figures)
            assert figures["ok"] > 0, (name, server, figures)
            assert figures["cpu_ms_per_msg"] is not None
        assert scenario["ratio"] > 0
    assert data["servers"]["dealmail"]["peak_rss_mib"] >= data["servers"]["dealmail"][
        "idle_rss_mib"]
    mix = data["size_mix"]
    for server in ("baseline", "dealmail"):
        assert mix[server]["ok"] > 0 and mix[server]["mb_per_s"] > 0, (server, mix[server])
        assert mix[server]["largest_bytes"] >= 5_000_000
        assert isinstance(mix[server]["rss_within_bound"], bool)
        assert mix[server]["largest_alone_ok"], (server, mix[server])
        assert isinstance(mix[server]["largest_alone_within_bound"], bool)
    assert "size mix (70% text+html" in proc.stdout and "MB/s" in proc.stdout


def test_size_mix_keeps_its_proportions_in_a_short_run() -> None:
    from bench.loadgen import mix_factory, mix_sizes

    sizes = mix_sizes(40)
    assert len(sizes) == 40
    assert sum(5_000 <= s <= 20_000 for s in sizes) == 28
    assert sum(100_000 <= s <= 2_000_000 for s in sizes) == 10
    assert sum(5_000_000 <= s <= 20_000_000 for s in sizes) == 2
    assert mix_sizes(10).count(max(mix_sizes(10))) == 1  # a short run still has a large one
    make = mix_factory(["ann@customer.test"], sizes)
    for seq in range(40):
        raw = make(seq)
        assert abs(len(raw) - sizes[seq]) < 0.1 * sizes[seq] + 1_000, seq
        assert b"\r\n.\r\n" not in raw and b"\n" not in raw.replace(b"\r\n", b"")


def test_lmtp_quick_prints_both_targets_and_the_ratio(tmp_path: Path) -> None:
    """``python -m bench lmtp --quick`` against a real private Postfix (fails without it)."""
    out = tmp_path / "lmtp.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "lmtp", "--quick", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dealmail LMTP benchmark (quick" in proc.stdout
    assert "bare aiosmtpd LMTP sink" in proc.stdout and "ratio" in proc.stdout
    data = json.loads(out.read_text())
    for target in ("baseline", "dealmail"):
        assert data[target]["messages"] == 200 and data[target]["rate"] > 0
        assert data[target]["p99_ms"] >= data[target]["p50_ms"]
    assert data["ratio"] > 0
