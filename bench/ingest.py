"""``python -m bench ingest``: dealmail's Smart BCC ingestion against a bare aiosmtpd server.

Both servers run in their own process on a loopback port chosen by the OS and are driven by
the same load generator (:mod:`bench.loadgen`) from this process. For each scenario we report
messages per second, p50/p99 latency, the server's CPU seconds per message (``utime + stime``
of /proc/PID/stat, which covers all of the process's threads) and the peak RSS (``VmHWM``).
dealmail runs with a fresh SQLite database pre-seeded with persons, organizations and deals,
with its default durability (WAL, synchronous=FULL) and its default log level (info, to a file).

Beside the closed-loop scenarios of 2 KB messages: the open-loop run at half of each server's
own closed-loop rate (its p99 is the latency a loaded-but-not-saturated server gives), and the
size-mix run (:data:`bench.loadgen.SIZE_MIX`: text+HTML, attachments, a few large files) in
msg/s and MB/s, with the peak RSS above idle during it against 4x the largest message.
``--database postgresql://HOST:PORT/DB`` runs dealmail a second time on a fresh database it
creates on that PostgreSQL server (and drops afterwards), printed beside the SQLite figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self
from urllib.parse import unquote, urlparse

from . import loadgen
from .seed import ROOT, Database, Seeded, bench_config, open_store, seed_crm, server_overrides

CLK_TCK = os.sysconf("SC_CLK_TCK")
#: The name of the dealmail server on PostgreSQL in the tables and the JSON.
PG = "dealmail-pg"
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


def reset_peak_rss(pid: int) -> bool:
    """Reset ``VmHWM`` to the current RSS in the process tree (``5`` to /proc/PID/clear_refs,
    proc(5), Linux 4.0+), so that a later peak belongs to what ran after; False if refused."""
    done = True
    for one in process_tree(pid):
        try:
            Path(f"/proc/{one}/clear_refs").write_text("5")
        except OSError:
            done = False
    return done


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

    def __init__(self, db: Database, *extra: str, log_level: str = "info",
                 workers: int = 1, log_path: Path | None = None, name: str = "dealmail") -> None:
        super().__init__()
        self.name = name
        self.workers = workers
        self.db_path = db
        if log_path is None:
            assert isinstance(db, Path), "a PostgreSQL server needs a log_path"
            log_path = db.with_suffix(".log")
        self.log_path = log_path
        self.extra = extra
        self.log_level = log_level

    def start(self, timeout: float = 60.0) -> None:
        self.log_path.unlink(missing_ok=True)
        args = [sys.executable, "run_server.py", "--config", "conf/dealmail.example.toml",
                "--log-level", self.log_level]
        # The status file beside the log, not in the repository's var/.
        status = self.log_path.with_suffix(".status.json")
        for item in server_overrides(self.db_path, f"server.log_file={self.log_path}",
                                     f"server.status_file={status}",
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
    #: The size-mix run: messages, persistent clients, seconds at most.
    mix_total: int = 40
    mix_concurrency: int = 4
    mix_time_limit: float = 60.0


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
                half_rate_duration=8.0, mix_total=200, mix_time_limit=240.0)


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
        "mb_per_s": round(result.mb_per_second, 2),
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
            log(f"  {server.name:11} {sc.name:16} run {i + 1}: {r['rate']:8.1f} msg/s "
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
        log(f"  {server.name:11} {'half_rate':16} run {i + 1}: {r['rate']:8.1f} msg/s "
            f"p99 {r['p99_ms']:7.1f} ms, {r['errors']} errors")
        runs.append(r)
    out["half_rate"] = _median(runs) | {"offered_rate": round(rate, 1)}
    return out


def run_size_mix(server: ServerProcess, plan: Plan, addresses: list[str],
                 log: Callable[[str], None]) -> dict[str, Any]:
    """The size-mix run (closed loop, persistent clients) on a server already warm, with its
    peak RSS above the RSS before it (VmHWM reset first) against 4x the largest message."""
    sizes = loadgen.mix_sizes(plan.mix_total, seed=3)
    factory = loadgen.mix_factory(addresses, sizes, seed=3)
    reset = reset_peak_rss(server.pid)
    idle = server.rss_kib()
    r = measure(server, factory, lambda: loadgen.run_closed(
        "127.0.0.1", server.port, factory, total=plan.mix_total,
        concurrency=plan.mix_concurrency, per_connection=100, time_limit=plan.mix_time_limit))
    above = max(0, server.peak_rss_kib() - idle) * 1024
    largest = max(sizes)
    # The largest message alone: what one message costs, which the bound is about (with
    # several clients, large messages overlap and add up).
    alone = loadgen.mix_factory(addresses, [largest], seed=4)
    reset_peak_rss(server.pid)
    idle_alone = server.rss_kib()
    one = asyncio.run(loadgen.run_closed("127.0.0.1", server.port, alone, total=1,
                                         concurrency=1, per_connection=1, time_limit=60))
    above_alone = max(0, server.peak_rss_kib() - idle_alone) * 1024
    r |= {"largest_bytes": largest, "mean_bytes": round(sum(sizes) / len(sizes)),
          "peak_rss_above_idle_mib": round(above / 2**20, 1), "peak_reset": reset,
          "rss_bound_mib": round(4 * largest / 2**20, 1),
          "rss_within_bound": above <= 4 * largest,
          "largest_alone_ok": one.ok == 1,
          "largest_alone_peak_mib": round(above_alone / 2**20, 1),
          "largest_alone_within_bound": above_alone <= 4 * largest}
    log(f"  {server.name:11} {'size_mix':16}      : {r['rate']:8.1f} msg/s "
        f"{r['mb_per_s']:6.1f} MB/s p99 {r['p99_ms']:7.1f} ms, {r['errors']} errors, "
        f"peak RSS +{r['peak_rss_above_idle_mib']} MiB (largest alone "
        f"+{r['largest_alone_peak_mib']} MiB)")
    return r


def seed_database(db: Database, plan: Plan) -> tuple[Seeded, float]:
    start = time.monotonic()
    config = bench_config(db)
    store = open_store(db, config)
    try:
        seeded = seed_crm(store, config, plan.persons, plan.organizations, plan.deals)
    finally:
        store.close()
    return seeded, time.monotonic() - start


@contextlib.contextmanager
def pg_database(server_url: str) -> Iterator[str]:
    """A fresh PostgreSQL database on the server of ``server_url`` (whose database is only
    used to connect; trust or password authentication as in the URL), dropped afterwards
    with the per-client table file a server on it made."""
    import psycopg2

    from mta.anvil import table_path

    parsed = urlparse(server_url)
    if parsed.scheme not in ("postgres", "postgresql"):
        raise SystemExit(f"--database wants a postgresql:// URL, not {server_url!r}")
    name = f"dealmail_bench_{uuid.uuid4().hex[:10]}"
    admin = psycopg2.connect(
        host=parsed.hostname or "127.0.0.1", port=parsed.port or 5432,
        user=unquote(parsed.username) if parsed.username else None,
        password=unquote(parsed.password) if parsed.password else None,
        dbname=parsed.path.lstrip("/") or "postgres", connect_timeout=5)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    url = parsed._replace(path=f"/{name}").geturl()
    try:
        yield url
    finally:
        table_path(url, ROOT).unlink(missing_ok=True)
        with admin.cursor() as cur:
            cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = %s", (name,))
            cur.execute(f'DROP DATABASE IF EXISTS "{name}"')
        admin.close()


def _run_one(server: ServerProcess, plan: Plan, addresses: list[str],
             log: Callable[[str], None]) -> tuple[dict[str, Any], dict[str, Any]]:
    """All scenarios on one server: (figures per scenario, the server's memory and log)."""
    with server:
        server.start()
        idle = server.rss_kib()
        log(f"{server.name} pid {server.pid} on port {server.port}")
        figures = run_server_scenarios(server, plan, addresses, log)
        info: dict[str, Any] = {"idle_rss_mib": round(idle / 1024, 1),
                                "peak_rss_mib": round(server.peak_rss_kib() / 1024, 1)}
        figures["size_mix"] = run_size_mix(server, plan, addresses, log)
        if isinstance(server, DealmailServer):
            info["log_errors"] = server.log_errors()
    return figures, info


def run_ingest(quick: bool, log: Callable[[str], None], workers: int = 2,
               overrides: tuple[str, ...] = (), database: str | None = None) -> dict[str, Any]:
    plan = plan_for(quick)
    results: dict[str, Any] = {"mode": "quick" if quick else "full", "repeats": plan.repeats,
                               "cpus": os.cpu_count(), "dealmail_workers": workers,
                               "dealmail_overrides": list(overrides)}
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dealmail-bench-")))
        db_path = tmp / "bench.db"
        seeded, took = seed_database(db_path, plan)
        log(f"seeded {seeded.persons} persons, {seeded.organizations} organizations, "
            f"{seeded.deals} deals in {took:.1f}s")
        results["seed"] = {"persons": seeded.persons, "organizations": seeded.organizations,
                           "deals": seeded.deals, "seconds": round(took, 2)}
        addresses = seeded.addresses()
        servers: list[ServerProcess] = [
            BaselineServer(), DealmailServer(db_path, *overrides, workers=workers)]
        if database is not None:
            pg_url = stack.enter_context(pg_database(database))
            pg_seeded, took = seed_database(pg_url, plan)
            log(f"seeded a fresh PostgreSQL database in {took:.1f}s")
            assert pg_seeded.addresses() == addresses
            results["postgresql"] = {"server": database, "seed_seconds": round(took, 2)}
            servers.append(DealmailServer(pg_url, *overrides, workers=workers,
                                          log_path=tmp / "bench-pg.log", name=PG))
        infos: dict[str, dict[str, Any]] = {}
        per_server: dict[str, dict[str, Any]] = {}
        for server in servers:
            per_server[server.name], infos[server.name] = _run_one(server, plan, addresses, log)
        results["servers"] = infos
        names = [s.name for s in servers[1:]]
        scenarios: dict[str, Any] = {}
        for name in [*(s.name for s in plan.scenarios), "half_rate"]:
            base = per_server["baseline"][name]
            scenarios[name] = {"baseline": base}
            for dm in names:
                deal = per_server[dm][name]
                scenarios[name][dm] = deal
                key = "ratio" if dm == "dealmail" else f"ratio_{dm}"
                scenarios[name][key] = (round(deal["rate"] / base["rate"], 3)
                                        if base["rate"] else None)
        results["scenarios"] = scenarios
        mix: dict[str, Any] = {"baseline": per_server["baseline"]["size_mix"],
                               "kinds": [list(k) for k in loadgen.SIZE_MIX],
                               "concurrency": plan.mix_concurrency}
        for dm in names:
            deal, base = per_server[dm]["size_mix"], mix["baseline"]
            mix[dm] = deal
            mix["ratio" if dm == "dealmail" else f"ratio_{dm}"] = (
                round(deal["mb_per_s"] / base["mb_per_s"], 3) if base["mb_per_s"] else None)
        results["size_mix"] = mix
    return results


def format_table(results: dict[str, Any]) -> str:
    head = (f"{'scenario':16} {'server':11} {'msg/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
            f"{'CPU ms/msg':>10} {'errors':>6} {'ratio':>6}")
    lines = [f"dealmail ingest benchmark ({results['mode']}, median of {results['repeats']}, "
             f"{results['cpus']} CPUs, dealmail with {results['dealmail_workers']} worker(s), "
             f"seed {results['seed']['persons']} persons / "
             f"{results['seed']['organizations']} orgs / {results['seed']['deals']} deals"
             + "".join(f"; --set {o}" for o in results.get("dealmail_overrides", [])) + ")",
             head, "-" * len(head)]
    for name, sc in results["scenarios"].items():
        for server in ("baseline", "dealmail", PG):
            if server not in sc:
                continue
            r = sc[server]
            cpu = f"{r['cpu_ms_per_msg']:.3f}" if r["cpu_ms_per_msg"] is not None else "-"
            ratio = sc.get("ratio" if server == "dealmail" else f"ratio_{server}")
            label = name
            if name == "half_rate":
                label = f"half@{r['offered_rate']:.0f}/s"
            lines.append(f"{label:16} {server:11} {r['rate']:9.1f} {r['p50_ms']:8.2f} "
                         f"{r['p99_ms']:8.2f} {cpu:>10} {r['errors']:6d} "
                         f"{f'{ratio:.2f}' if ratio else '':>6}")
    lines.append("-" * len(head))
    mix = results.get("size_mix")
    if mix:
        kinds = ", ".join(f"{share:.0%} {kind} {low // 1000:,}-{high // 1000:,} KB"
                          for kind, share, low, high in mix["kinds"])
        lines.append(f"size mix ({kinds}; {mix['baseline']['sent']} messages, "
                     f"{mix['concurrency']} persistent clients; ratio of MB/s):")
        mhead = (f"{'server':11} {'msg/s':>7} {'MB/s':>7} {'p50 ms':>8} {'p99 ms':>8} "
                 f"{'CPU ms/MB':>9} {'errors':>6} {'ratio':>6}  peak RSS above idle: "
                 "the mix; the largest alone")
        lines += [mhead, "-" * len(mhead)]
        for server in ("baseline", "dealmail", PG):
            if server not in mix:
                continue
            r = mix[server]
            ratio = mix.get("ratio" if server == "dealmail" else f"ratio_{server}")
            mb = r["mb_per_s"] * r["seconds"]
            cpu = (f"{r['cpu_ms_per_msg'] * r['ok'] / mb:.1f}"
                   if r["cpu_ms_per_msg"] is not None and mb else "-")
            bound = "pass" if r["rss_within_bound"] else "FAIL"
            alone = "pass" if r["largest_alone_within_bound"] else "FAIL"
            lines.append(
                f"{server:11} {r['rate']:7.1f} {r['mb_per_s']:7.1f} {r['p50_ms']:8.1f} "
                f"{r['p99_ms']:8.1f} {cpu:>9} {r['errors']:6d} "
                f"{f'{ratio:.2f}' if ratio else '':>6}  {r['peak_rss_above_idle_mib']} MiB "
                f"{bound}; {r['largest_alone_peak_mib']} MiB {alone} (bound: 4x largest "
                f"{r['largest_bytes'] / 1e6:.1f} MB = {r['rss_bound_mib']} MiB)"
                + ("" if r["peak_reset"] else " (peak not resettable)"))
        lines.append("-" * len(mhead))
    for name, s in results["servers"].items():
        lines.append(f"{name}: idle RSS {s['idle_rss_mib']} MiB, peak RSS (VmHWM) "
                     f"{s['peak_rss_mib']} MiB")
        for err in s.get("log_errors", []):
            lines.append(f"  log: {err}")
    return "\n".join(lines)


def main(quick: bool, json_path: Path | None, workers: int = 2,
         overrides: tuple[str, ...] = (), database: str | None = None) -> int:
    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    results = run_ingest(quick, log, workers, overrides, database)
    print(format_table(results), flush=True)
    if json_path is not None:
        json_path.write_text(json.dumps(results, indent=2))
    return 0
