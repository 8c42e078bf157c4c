"""``python -m bench scale``: does ingestion stay flat, and ``conversations`` fast, as data grows?

The database is filled in bulk (:func:`bench.seed.seed_emails`, never over SMTP) to each size
in turn (10k, 100k, 1M stored emails; quick: 10k, 50k), one deal getting 5,000 emails. At each
size dealmail is started on it, N messages are ingested over SMTP (10 persistent connections)
to measure messages/s and server CPU per message, and ``crmstore.queries.conversations`` for
the 5,000-email deal is timed in this process (median of 5). Last, the peak memory of a server
ingesting one 25 MB message: ``VmHWM`` after it minus ``VmRSS`` idle before it.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from crmstore import models as m
from crmstore.queries import conversations

from . import loadgen
from .ingest import DealmailServer, measure
from .seed import bench_config, open_store, seed_crm, seed_emails

HOT_DEAL = 1
HOT_EMAILS = 5000
BIG_MESSAGE = 25 * 1024 * 1024


def time_conversations(db_path: Path, repeats: int = 5) -> dict[str, Any]:
    """Median wall time of ``conversations(alice, deal=HOT_DEAL)`` over ``repeats`` calls."""
    config = bench_config(db_path)
    store = open_store(db_path, config)
    try:
        user = m.User.get(m.User.address == config.companies[0].users[0].address)
        deal = m.Deal.get_by_id(HOT_DEAL)
        times = []
        emails = 0
        for _ in range(repeats):
            start = time.perf_counter()
            out = conversations(user, deal=deal)
            times.append(time.perf_counter() - start)
            emails = sum(len(t["emails"]) for t in out["threads"])
        return {"median_ms": round(statistics.median(times) * 1000, 1),
                "min_ms": round(min(times) * 1000, 1), "emails_returned": emails}
    finally:
        store.close()


def ingest_at(db_path: Path, addresses: list[str], total: int, time_limit: float,
              log: Callable[[str], None]) -> dict[str, Any]:
    with DealmailServer(db_path) as server:
        server.start()
        host, port = "127.0.0.1", server.port
        warm = loadgen.recipient_factory(addresses, seed=99)
        asyncio.run(loadgen.run_closed(host, port, warm, total=100, concurrency=5,
                                       per_connection=100, time_limit=20))
        runs = []
        for i in range(3):
            f = loadgen.recipient_factory(addresses, seed=100 + i)
            runs.append(measure(server, f, lambda f=f: loadgen.run_closed(  # type: ignore[misc]
                host, port, f, total=total, concurrency=10, per_connection=100,
                time_limit=time_limit)))
            log(f"    ingest run {i + 1}: {runs[-1]['rate']} msg/s, "
                f"{runs[-1]['cpu_ms_per_msg']} ms CPU/msg, {runs[-1]['errors']} errors")
    return {
        "rate": statistics.median(r["rate"] for r in runs),
        "cpu_ms_per_msg": statistics.median(r["cpu_ms_per_msg"] or 0.0 for r in runs),
        "p99_ms": statistics.median(r["p99_ms"] for r in runs),
        "errors": sum(r["errors"] for r in runs),
        "runs": runs,
    }


def big_message(db_path: Path, addresses: list[str], log: Callable[[str], None]) -> dict[str, Any]:
    raw = loadgen.make_big_body(addresses[0], "big", BIG_MESSAGE)
    with DealmailServer(db_path, "limits.message_size=40000000") as server:
        server.start()
        # Let start-up garbage settle, then one small message so the code paths are loaded.
        warm = loadgen.recipient_factory(addresses, seed=7)
        asyncio.run(loadgen.run_closed("127.0.0.1", server.port, warm, total=20,
                                       concurrency=1, per_connection=100, time_limit=20))
        idle = server.rss_kib()
        hwm_before = server.peak_rss_kib()
        result = asyncio.run(loadgen.run_closed(
            "127.0.0.1", server.port, lambda _seq: raw, total=1, concurrency=1,
            per_connection=1, time_limit=120))
        peak = server.peak_rss_kib()
    above = (peak - idle) * 1024
    log(f"  25 MB message: idle {idle / 1024:.1f} MiB, peak {peak / 1024:.1f} MiB, "
        f"{above / len(raw):.2f}x its size above idle, {result.ok} accepted "
        f"{dict(result.errors)}")
    return {"message_bytes": len(raw), "idle_rss_mib": round(idle / 1024, 1),
            "peak_before_mib": round(hwm_before / 1024, 1),
            "peak_rss_mib": round(peak / 1024, 1),
            "above_idle_over_size": round(above / len(raw), 2),
            "accepted": result.ok, "errors": dict(result.errors),
            "seconds": round(result.elapsed, 2)}


def run_scale(quick: bool, log: Callable[[str], None]) -> dict[str, Any]:
    sizes = [10_000, 50_000] if quick else [10_000, 100_000, 1_000_000]
    total, time_limit = (600, 3.0) if quick else (3000, 10.0)
    persons, orgs, deals = (10_000, 2_000, 5_000) if quick else (100_000, 20_000, 50_000)
    out: dict[str, Any] = {"mode": "quick" if quick else "full", "sizes": {}}
    with tempfile.TemporaryDirectory(prefix="dealmail-scale-") as tmp:
        db_path = Path(tmp) / "scale.db"
        config = bench_config(db_path)
        store = open_store(db_path, config)
        try:
            seeded = seed_crm(store, config, persons, orgs, deals)
        finally:
            store.close()
        addresses = seeded.addresses()
        for size in sizes:
            store = open_store(db_path, config)
            start = time.monotonic()
            try:
                have = int(m.Email.select().count())
                if have < size:
                    seed_emails(store, seeded, size - have, hot_deal=HOT_DEAL,
                                hot_count=HOT_EMAILS)
                stored = int(m.Email.select().count())
            finally:
                store.close()
            log(f"{stored} stored emails (filled in {time.monotonic() - start:.1f}s)")
            figures = ingest_at(db_path, addresses, total, time_limit, log)
            figures["conversations"] = time_conversations(db_path)
            figures["stored_emails"] = stored
            log(f"    conversations: {figures['conversations']}")
            out["sizes"][str(size)] = figures
        out["big_message"] = big_message(db_path, addresses, log)
        out["db_mib"] = round(db_path.stat().st_size / 2**20, 1)
    first, last = out["sizes"][str(sizes[0])], out["sizes"][str(sizes[-1])]
    out["cpu_growth"] = round(last["cpu_ms_per_msg"] / first["cpu_ms_per_msg"], 3)
    out["rate_ratio"] = round(last["rate"] / first["rate"], 3)
    return out


def format_table(results: dict[str, Any]) -> str:
    head = (f"{'stored emails':>13} {'msg/s':>8} {'CPU ms/msg':>10} {'p99 ms':>8} "
            f"{'conv. ms':>9} {'returned':>8} {'errors':>6}")
    lines = [f"dealmail scale benchmark ({results['mode']}; ingest medians of 3, "
             "conversations median of 5)", head, "-" * len(head)]
    for fig in results["sizes"].values():
        c = fig["conversations"]
        lines.append(f"{fig['stored_emails']:>13} {fig['rate']:8.1f} "
                     f"{fig['cpu_ms_per_msg']:10.3f} {fig['p99_ms']:8.1f} "
                     f"{c['median_ms']:9.1f} {c['emails_returned']:8d} {fig['errors']:6d}")
    lines.append("-" * len(head))
    lines.append(f"CPU per message, largest / smallest: {results['cpu_growth']}x "
                 f"(rate ratio {results['rate_ratio']})")
    big = results["big_message"]
    lines.append(f"one {big['message_bytes'] / 2**20:.1f} MiB message: idle RSS "
                 f"{big['idle_rss_mib']} MiB, peak {big['peak_rss_mib']} MiB = "
                 f"{big['above_idle_over_size']}x the message size above idle "
                 f"(accepted: {big['accepted']}, errors: {big['errors']})")
    return "\n".join(lines)


def main(quick: bool, json_path: Path | None) -> int:
    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    results = run_scale(quick, log)
    print(format_table(results), flush=True)
    if json_path is not None:
        json_path.write_text(json.dumps(results, indent=2))
    return 0
