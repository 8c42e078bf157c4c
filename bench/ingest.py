"""``python -m bench ingest``: dealmail's Smart BCC ingestion against a bare aiosmtpd server.

Both servers run in their own process on a loopback port chosen by the OS and are driven by
the same load generator (:mod:`bench.loadgen`) from this process. For each scenario we report
messages per second, p50/p99 latency, the server's CPU seconds per message (``utime + stime``
of /proc/PID/stat, which covers all of the process's threads) and the peak RSS (``VmHWM``).
dealmail runs with a fresh SQLite database pre-seeded with persons, organizations and deals,
with its default durability (WAL, synchronous=FULL) and its default log level (info, to a file).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from . import loadgen
from .seed import ROOT, Seeded, bench_config, open_store, seed_crm, server_overrides

CLK_TCK = os.sysconf("SC_CLK_TCK")
LISTENING = re.compile(r"inbound SMTP listening on 127\.0\.0\.1:(\d+)")


# ----------------------------------------------------------------------------- /proc readings


def process_tree(pid: int) -> list[int]:
    """``pid`` and its live children (dealmail's pre-fork workers), from /proc."""
    pids = [pid]
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return pids
    for child in children:
        pids.extend(process_tree(int(child)))
    return pids


def cpu_seconds(pid: int) -> float:
    """User + system CPU of the process tree (all threads, all workers), from /proc/PID/stat."""
    total = 0.0
    for one in process_tree(pid):
        try:
            text = Path(f"/proc/{one}/stat").read_text()
        except OSError:
            continue
        # The command name (field 2) may contain spaces: split after its closing parenthesis.
        fields = text[text.rindex(")") + 2:].split()
        total += (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14, 15 of proc(5)
    return total


def memory_kib(pid: int, key: str) -> int:
    """``VmRSS`` or ``VmHWM`` (peak RSS) summed over the process tree, in KiB."""
    total = 0
    for one in process_tree(pid):
        try:
            lines = Path(f"/proc/{one}/status").read_text().splitlines()
        except OSError:
            continue
        total += next((int(line.split()[1]) for line in lines if line.startswith(key + ":")),
                      0)
    return total


# ----------------------------------------------------------------------------- the servers


def serve_baseline() -> None:
    """The baseline: aiosmtpd with a handler that only answers 250 (runs in a subprocess,
    prints ``PORT n`` on stdout, stops on SIGTERM)."""
    from aiosmtpd.smtp import SMTP, Envelope, Session

    class Answer250:
        async def handle_DATA(self, server: SMTP, session: Session,
                              envelope: Envelope) -> str:
            return "250 OK"

    async def main() -> None:
        loop = asyncio.get_running_loop()
        handler = Answer250()
        server = await loop.create_server(
            lambda: SMTP(handler, hostname="baseline.localhost"), "127.0.0.1", 0)
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        print(f"PORT {server.sockets[0].getsockname()[1]}", flush=True)
        await stop.wait()
        server.close()

    asyncio.run(main())


class ServerProcess:
    """A server subprocess listening on ``127.0.0.1:port``."""

    name = "server"

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def rss_kib(self) -> int:
        return memory_kib(self.pid, "VmRSS")

    def peak_rss_kib(self) -> int:
        return memory_kib(self.pid, "VmHWM")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def start(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class BaselineServer(ServerProcess):
    name = "baseline"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from bench.ingest import serve_baseline; serve_baseline()"],
            cwd=ROOT, stdout=subprocess.PIPE)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        if not line.startswith("PORT "):
            self.stop()
            raise RuntimeError(f"baseline server did not start: {line!r}")
        self.port = int(line.split()[1])


class DealmailServer(ServerProcess):
    """``run_server.py`` with the example config, its own database and a log file."""

    name = "dealmail"

    def __init__(self, db_path: Path, *extra: str, log_level: str = "info",
                 workers: int = 1) -> None:
        super().__init__()
        self.workers = workers
        self.db_path = db_path
        self.log_path = db_path.with_suffix(".log")
        self.extra = extra
        self.log_level = log_level

    def start(self, timeout: float = 60.0) -> None:
        self.log_path.unlink(missing_ok=True)
        args = [sys.executable, "run_server.py", "--config", "conf/dealmail.example.toml",
                "--log-level", self.log_level]
        for item in server_overrides(self.db_path, f"server.log_file={self.log_path}",
                                     f"listeners.workers={self.workers}", *self.extra):
            args += ["--set", item]
        self.proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise RuntimeError(f"dealmail exited with {self.proc.returncode}: {err}")
            if self.log_path.exists():
                found = LISTENING.search(self.log_path.read_text(errors="replace"))
                if found:
                    self.port = int(found.group(1))
                    return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"dealmail did not report its port within {timeout}s")

    def log_errors(self) -> list[str]:
        if not self.log_path.exists():
            return []
        return [line for line in self.log_path.read_text(errors="replace").splitlines()
                if " ERROR " in line or " CRITICAL " in line][:20]


# ----------------------------------------------------------------------------- scenarios


@dataclass(frozen=True)
class Scenario:
    name: str
    concurrency: int
    per_connection: int  # 1: one connection per message
    total: int
    time_limit: float


@dataclass(frozen=True)
class Plan:
    quick: bool
    persons: int
    organizations: int
    deals: int
    scenarios: tuple[Scenario, ...]
    repeats: int
    half_rate_duration: float
    warmup: int = 100


def plan_for(quick: bool) -> Plan:
    if quick:
        return Plan(True, 10_000, 2_000, 5_000, (
            Scenario("persistent_c10", 10, 100, 3000, 6.0),
            Scenario("persistent_c1", 1, 100, 600, 3.0),
        ), repeats=1, half_rate_duration=4.0)
    scenarios = []
    for mode, per in (("persistent", 100), ("per_message", 1)):
        for conc in (1, 10, 50):
            scenarios.append(Scenario(f"{mode}_c{conc}", conc, per, 6000, 8.0))
    return Plan(False, 100_000, 20_000, 50_000, tuple(scenarios), repeats=3,
                half_rate_duration=8.0)


def measure(server: ServerProcess, factory: loadgen.MessageFactory,
            run: Callable[[], Any]) -> dict[str, Any]:
    """Run one load and return its figures with the server's CPU time during it."""
    before = server.cpu()
    result: loadgen.LoadResult = asyncio.run(run())
    used = server.cpu() - before
    return {
        "sent": result.sent,
        "ok": result.ok,
        "errors": sum(result.errors.values()),
        "error_kinds": dict(result.errors.most_common(5)),
        "seconds": round(result.elapsed, 3),
        "rate": round(result.rate, 1),
        "p50_ms": round(result.percentile(50) * 1000, 2),
        "p99_ms": round(result.percentile(99) * 1000, 2),
        "cpu_ms_per_msg": round(used / result.ok * 1000, 3) if result.ok else None,
    }


def _median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"runs": runs}
    for key in ("rate", "p50_ms", "p99_ms", "cpu_ms_per_msg", "ok", "errors"):
        values = [r[key] for r in runs if r[key] is not None]
        out[key] = round(statistics.median(values), 3) if values else None
    return out


def run_server_scenarios(server: ServerProcess, plan: Plan, addresses: list[str],
                         log: Callable[[str], None]) -> dict[str, Any]:
    """Every scenario ``plan.repeats`` times on one server, then the open-loop half-rate run."""
    host, port = "127.0.0.1", server.port
    seq_base = [0]

    def factory() -> loadgen.MessageFactory:
        seq_base[0] += 1
        return loadgen.recipient_factory(addresses, seed=seq_base[0])

    # Warm up (imports, caches, first connections) before measuring anything.
    warm = factory()
    asyncio.run(loadgen.run_closed(host, port, warm, total=plan.warmup, concurrency=5,
                                   per_connection=100, time_limit=20))
    out: dict[str, Any] = {}
    for sc in plan.scenarios:
        runs = []
        for i in range(plan.repeats):
            f = factory()
            r = measure(server, f, lambda f=f, sc=sc: loadgen.run_closed(  # type: ignore[misc]
                host, port, f, total=sc.total, concurrency=sc.concurrency,
                per_connection=sc.per_connection, time_limit=sc.time_limit))
            log(f"  {server.name:9} {sc.name:16} run {i + 1}: {r['rate']:8.1f} msg/s "
                f"p99 {r['p99_ms']:7.1f} ms, {r['errors']} errors")
            runs.append(r)
        out[sc.name] = _median(runs)
    max_rate = out["persistent_c10"]["rate"]
    rate = max(1.0, max_rate / 2)
    runs = []
    for i in range(plan.repeats):
        f = factory()
        r = measure(server, f, lambda f=f: loadgen.run_open(  # type: ignore[misc]
            host, port, f, rate=rate, duration=plan.half_rate_duration, connections=20))
        log(f"  {server.name:9} {'half_rate':16} run {i + 1}: {r['rate']:8.1f} msg/s "
            f"p99 {r['p99_ms']:7.1f} ms, {r['errors']} errors")
        runs.append(r)
    out["half_rate"] = _median(runs) | {"offered_rate": round(rate, 1)}
    return out


def seed_database(db_path: Path, plan: Plan) -> tuple[Seeded, float]:
    start = time.monotonic()
    config = bench_config(db_path)
    store = open_store(db_path, config)
    try:
        seeded = seed_crm(store, config, plan.persons, plan.organizations, plan.deals)
    finally:
        store.close()
    return seeded, time.monotonic() - start


def run_ingest(quick: bool, log: Callable[[str], None], workers: int = 2,
               overrides: tuple[str, ...] = ()) -> dict[str, Any]:
    plan = plan_for(quick)
    results: dict[str, Any] = {"mode": "quick" if quick else "full", "repeats": plan.repeats,
                               "cpus": os.cpu_count(), "dealmail_workers": workers,
                               "dealmail_overrides": list(overrides)}
    with tempfile.TemporaryDirectory(prefix="dealmail-bench-") as tmp:
        db_path = Path(tmp) / "bench.db"
        seeded, took = seed_database(db_path, plan)
        log(f"seeded {seeded.persons} persons, {seeded.organizations} organizations, "
            f"{seeded.deals} deals in {took:.1f}s")
        results["seed"] = {"persons": seeded.persons, "organizations": seeded.organizations,
                           "deals": seeded.deals, "seconds": round(took, 2)}
        addresses = seeded.addresses()
        servers: dict[str, dict[str, Any]] = {}
        per_server: dict[str, dict[str, Any]] = {}
        for server in (BaselineServer(), DealmailServer(db_path, *overrides, workers=workers)):
            with server:
                server.start()
                idle = server.rss_kib()
                log(f"{server.name} pid {server.pid} on port {server.port}")
                per_server[server.name] = run_server_scenarios(server, plan, addresses, log)
                servers[server.name] = {"idle_rss_mib": round(idle / 1024, 1),
                                        "peak_rss_mib": round(server.peak_rss_kib() / 1024, 1)}
                if isinstance(server, DealmailServer):
                    servers[server.name]["log_errors"] = server.log_errors()
        results["servers"] = servers
        scenarios: dict[str, Any] = {}
        for name in [*(s.name for s in plan.scenarios), "half_rate"]:
            base, deal = per_server["baseline"][name], per_server["dealmail"][name]
            scenarios[name] = {
                "baseline": base, "dealmail": deal,
                "ratio": round(deal["rate"] / base["rate"], 3) if base["rate"] else None,
            }
        results["scenarios"] = scenarios
    return results


def format_table(results: dict[str, Any]) -> str:
    head = (f"{'scenario':16} {'server':9} {'msg/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
            f"{'CPU ms/msg':>10} {'errors':>6} {'ratio':>6}")
    lines = [f"dealmail ingest benchmark ({results['mode']}, median of {results['repeats']}, "
             f"{results['cpus']} CPUs, dealmail with {results['dealmail_workers']} worker(s), "
             f"seed {results['seed']['persons']} persons / "
             f"{results['seed']['organizations']} orgs / {results['seed']['deals']} deals"
             + "".join(f"; --set {o}" for o in results.get("dealmail_overrides", [])) + ")",
             head, "-" * len(head)]
    for name, sc in results["scenarios"].items():
        for server in ("baseline", "dealmail"):
            r = sc[server]
            cpu = f"{r['cpu_ms_per_msg']:.3f}" if r["cpu_ms_per_msg"] is not None else "-"
            ratio = f"{sc['ratio']:.2f}" if server == "dealmail" and sc["ratio"] else ""
            label = name
            if name == "half_rate":
                label = f"half@{r['offered_rate']:.0f}/s"
            lines.append(f"{label:16} {server:9} {r['rate']:9.1f} {r['p50_ms']:8.2f} "
                         f"{r['p99_ms']:8.2f} {cpu:>10} {r['errors']:6d} {ratio:>6}")
    lines.append("-" * len(head))
    for name, s in results["servers"].items():
        lines.append(f"{name}: idle RSS {s['idle_rss_mib']} MiB, peak RSS (VmHWM) "
                     f"{s['peak_rss_mib']} MiB")
        for err in s.get("log_errors", []):
            lines.append(f"  log: {err}")
    return "\n".join(lines)


def main(quick: bool, json_path: Path | None, workers: int = 2,
         overrides: tuple[str, ...] = ()) -> int:
    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    results = run_ingest(quick, log, workers, overrides)
    print(format_table(results), flush=True)
    if json_path is not None:
        json_path.write_text(json.dumps(results, indent=2))
    return 0
