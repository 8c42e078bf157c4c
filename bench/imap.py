"""``python -m bench imap``: the initial sync of a mailbox from a local Dovecot, against a bare
imapclient fetch of the same mailbox measured in the same run.

A private Dovecot (``bench/dovecot.py``) gets two mailboxes of the same mix of messages, a
small and a large one (full run: 2,000 and 10,000 messages; ``--quick``: 50 and 200): 70%
of about 10 KB, 25% of about 200 KB, 5% of about 2 MB (text plus base64 attachments).
Correspondents are a realistic mix for a sales mailbox: 55% customers with one open deal,
15% customers with several open deals (each first mail queues a "which deal?" question), 15%
unknown senders at company domains (persons created), 10% free-mail senders (no person),
5% colleagues only (not tracked).

* **baseline**: a bare ``imapclient`` session fetching every message with ``BODY.PEEK[]`` in
  chunks of 200 UIDs, holding nothing (the anchor of docs/architecture.md);
* **dealmail**: one catch-up of ``mta.imapsync.sync.AccountSync`` into a fresh SQLite database
  (WAL, synchronous=FULL) seeded with the CRM, log level info to a file: every message read,
  captured, linked and committed with its checkpoint.

Each runs in its own process (so its peak RSS, ``ru_maxrss``, and its CPU time are its own)
after one warm-up read of the mailbox; figures are medians of the repeats. ``ratio`` compares
rates; ``CPU ratio`` compares the client's CPU per message (baseline / dealmail), which a
machine shared with other work disturbs less. Dealmail's peak RSS is reported for
both mailbox sizes: flat means it does not grow with the mailbox.
"""

from __future__ import annotations

import base64
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .dovecot import PrivateDovecot
from .seed import ROOT, open_store, person_address, seed_crm

EXAMPLE = ROOT / "conf" / "dealmail.example.toml"
BOB_BLOCK = '[[companies.users]]\naddress = "bob@example.com"'
PASSWORD = "bench-password"


@dataclass(frozen=True)
class Plan:
    quick: bool
    small: int
    large: int
    repeats: int
    persons: int = 5_000
    organizations: int = 1_000
    deals: int = 4_000


def plan_for(quick: bool) -> Plan:
    if quick:
        return Plan(True, 50, 200, 1, persons=500, organizations=100, deals=400)
    return Plan(False, 2_000, 10_000, 3)


# ----------------------------------------------------------------------------- the mailbox


def _block(rng: random.Random) -> bytes:
    return base64.encodebytes(rng.randbytes(3 * 1024 * 1024 // 4 * 3))


class MailMaker:
    """Messages of the benchmark's mix, deterministic for a seed."""

    def __init__(self, plan: Plan, seed: int = 13) -> None:
        self.plan = plan
        self.rng = random.Random(seed)
        self.blob = _block(self.rng)
        self.n = 0

    def _sender(self) -> tuple[str, str]:
        r = self.rng.random()
        p = self.plan
        # Persons 1..deals have one open deal each; the seed adds a second open deal to the
        # persons of the last 20% of that range (see add_second_deals).
        several = int(p.deals * 0.8)
        if r < 0.55:
            i = self.rng.randint(1, several)
        elif r < 0.70:
            i = self.rng.randint(several + 1, p.deals)
        elif r < 0.85:
            return f"new{self.rng.randint(1, 10**6)}@prospect{self.rng.randint(1, 300)}.test", ""
        elif r < 0.95:
            return f"someone{self.rng.randint(1, 10**6)}@gmail.com", ""
        else:
            return "bob@example.com", "colleague"
        return person_address(i, p.organizations), ""

    def message(self) -> bytes:
        self.n += 1
        r = self.rng.random()
        size = 10_000 if r < 0.70 else (200_000 if r < 0.95 else 2_000_000)
        sender, kind = self._sender()
        inbound = self.rng.random() < 0.6 or kind == "colleague"
        frm, to = (sender, "alice@example.com") if inbound else ("alice@example.com", sender)
        text = ("Hello,\r\n\r\nthank you for your message about the proposal. " * 20)[:2000]
        head = (f"From: <{frm}>\r\nTo: <{to}>\r\nSubject: Proposal {self.n % 997}\r\n"
                f"Date: Thu, 19 Nov 2026 10:{self.n % 60:02d}:00 +0000\r\n"
                f"Message-ID: <bench-{self.n}-{self.rng.getrandbits(32)}@bench.test>\r\n"
                "MIME-Version: 1.0\r\n")
        if size <= 10_000:
            body = text + "\r\n" + "Lorem ipsum dolor sit amet. " * ((size - len(text)) // 28)
            return (head + "Content-Type: text/plain; charset=utf-8\r\n\r\n" + body
                    + "\r\n").encode()
        start = self.rng.randint(0, len(self.blob) - size - 1)
        attachment = self.blob[start:start + size]
        return (head + "Content-Type: multipart/mixed; boundary=BENCH\r\n\r\n--BENCH\r\n"
                "Content-Type: text/plain; charset=utf-8\r\n\r\n" + text + "\r\n--BENCH\r\n"
                "Content-Type: application/pdf; name=offer.pdf\r\n"
                "Content-Transfer-Encoding: base64\r\n"
                "Content-Disposition: attachment; filename=offer.pdf\r\n\r\n").encode() + \
            attachment.replace(b"\n", b"\r\n") + b"\r\n--BENCH--\r\n"


def fill(dovecot: PrivateDovecot, login: str, count: int, maker: MailMaker) -> int:
    """Write ``count`` messages into the mailbox in batches; returns their total size."""
    total = 0
    batch: list[bytes] = []
    for _ in range(count):
        batch.append(maker.message())
        total += len(batch[-1])
        if len(batch) >= 200:
            dovecot.deliver(login, batch)
            batch = []
    if batch:
        dovecot.deliver(login, batch)
    return total


# ----------------------------------------------------------------------------- the runs


def _peak_rss_mib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def baseline_fetch(host: str, port: int, ca: str, login: str, password: str) -> dict[str, Any]:
    """A bare imapclient fetch of every message, 200 per ``UID FETCH`` (runs in its own
    process)."""
    import ssl

    from imapclient import IMAPClient

    cpu0 = time.process_time()
    start = time.perf_counter()
    client = IMAPClient(host, port, ssl_context=ssl.create_default_context(cafile=ca))
    client.login(login, password)
    client.select_folder("INBOX", readonly=True)
    uids = client.search("ALL")
    count = size = 0
    for i in range(0, len(uids), 200):
        for data in client.fetch(uids[i:i + 200], ["BODY.PEEK[]"]).values():
            count += 1
            size += len(data[b"BODY[]"])
    client.logout()
    seconds = time.perf_counter() - start
    cpu = time.process_time() - cpu0
    return {"messages": count, "bytes": size, "seconds": round(seconds, 3),
            "rate": round(count / seconds, 1), "mb_per_s": round(size / seconds / 1e6, 1),
            "cpu_ms_per_msg": round(cpu / max(1, count) * 1000, 3),
            "peak_rss_mib": _peak_rss_mib()}


def dealmail_sync(config_path: str, db_path: str, plan_json: str,
                  capture: str = "yes") -> dict[str, Any]:
    """One initial sync by dealmail's AccountSync into a fresh seeded database (own
    process). ``capture="no"``: every message is answered "not tracked" without entering the
    capture path, which measures the sync alone (connection, fetches, UID rows, checkpoints,
    transactions)."""
    from dealmail.app import App
    from dealmail.config import load_config
    from dealmail.logs import setup_logging
    from mta.imapsync.lease import ensure_account
    from mta.imapsync.service import SyncService, configured_accounts
    from mta.imapsync.sync import AccountSync

    plan = Plan(**json.loads(plan_json))
    overrides = [f"database.url=sqlite:///{db_path}", "listeners.inbound=127.0.0.1:0",
                 "listeners.submission=", "server.demo_data=",
                 f"server.log_file={db_path}.log"]
    config = load_config(Path(config_path), overrides)
    setup_logging("info", config.server.log_file)
    store = open_store(Path(db_path), config)
    seeded = seed_crm(store, config, plan.persons, plan.organizations, plan.deals)
    add_second_deals(store, seeded.user_id, plan)
    store.close()
    app = App(config, base=ROOT)
    app.open_store()
    app.capture = app.build_capture()
    if capture == "no":
        from linking.capture import Disposition, Outcome

        skipped = Disposition(Outcome.IGNORED, "capture skipped (benchmark)")
        app.capture.prepare = lambda request, parsed=None: skipped  # type: ignore[method-assign]
    service = SyncService(app.store, app.capture, app.get_config, app.clock, ROOT)
    account = next(iter(configured_accounts(config)[0].values()))
    sync = AccountSync(account, service.deps)
    sync.account_id = ensure_account(app.store, account.key, account.user.address)
    service.deps.lease.acquire(sync.account_id)
    cpu0 = time.process_time()
    start = time.perf_counter()
    client = sync.open()
    stats = sync.catch_up(client)["INBOX"]
    sync.close()
    seconds = time.perf_counter() - start
    cpu = time.process_time() - cpu0
    from crmstore import models as m

    pending = m.PendingChoice.select().count()
    app.store.close()
    return {"messages": stats.fetched, "stored": stats.stored, "repeats": stats.repeat,
            "not_tracked": stats.ignored, "failed": stats.failed, "bytes": stats.bytes,
            "seconds": round(seconds, 3), "rate": round(stats.fetched / seconds, 1),
            "mb_per_s": round(stats.bytes / seconds / 1e6, 1),
            "cpu_ms_per_msg": round(cpu / max(1, stats.fetched) * 1000, 3),
            "pending_choices": pending, "peak_rss_mib": _peak_rss_mib()}


def add_second_deals(store: Any, owner: int, plan: Plan) -> None:
    """A second open deal for the persons of the last 20% of the deal range (customers with
    several open deals)."""
    from crmstore import models as m

    first = int(plan.deals * 0.8) + 1
    with store.db.atomic():
        rows = [{"company": 1, "title": f"Upsell {i}", "status": "open", "person": i,
                 "owner": owner, "currency": "EUR", "stage": "lead"}
                for i in range(first, plan.deals + 1)]
        for i in range(0, len(rows), 500):
            m.Deal.insert_many(rows[i:i + 500]).execute()


def _child(function: str, *args: str) -> dict[str, Any]:
    code = f"import json, sys; from bench.imap import {function} as f; " \
           "print(json.dumps(f(*sys.argv[1:])))"
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True,
                          text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{function} failed: {proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _config(tmp: Path, dovecot: PrivateDovecot, login: str) -> Path:
    secret = tmp / f"{login}.pw"
    secret.write_text(PASSWORD)
    block = ("[[companies.users.mailboxes]]\nprovider = \"imap\"\n"
             f"host = \"{dovecot.host}\"\nport = {dovecot.tls_port}\n"
             f"ca_file = \"{dovecot.ca_file}\"\nusername = \"{login}\"\n"
             f"password_file = \"{secret}\"\nsince_days = 0\n\n")
    path = tmp / f"{login}.toml"
    path.write_text(EXAMPLE.read_text(encoding="utf-8").replace(BOB_BLOCK, block + BOB_BLOCK))
    return path


def _median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out = dict(runs[len(runs) // 2])
    for key in ("rate", "seconds", "mb_per_s", "peak_rss_mib", "cpu_ms_per_msg"):
        values = [r[key] for r in runs if key in r]
        if values:
            out[key] = round(statistics.median(values), 3)
    out["runs"] = runs
    return out


def run_imap(quick: bool, log: Any) -> dict[str, Any]:
    plan = plan_for(quick)
    results: dict[str, Any] = {"mode": "quick" if quick else "full", "repeats": plan.repeats,
                               "cpus": os.cpu_count(), "mailboxes": {}}
    with tempfile.TemporaryDirectory(prefix="dealmail-bench-imap-") as tmp_name:
        tmp = Path(tmp_name)
        tmp.chmod(0o755)
        dovecot = PrivateDovecot(tmp / "dovecot")
        dovecot.start()
        try:
            maker = MailMaker(plan)
            for name, count in (("small", plan.small), ("large", plan.large)):
                login = dovecot.add_user(f"{name}@bench.test", PASSWORD)
                started = time.monotonic()
                size = fill(dovecot, login, count, maker)
                log(f"mailbox {name}: {count} messages, {size / 1e6:.0f} MB written in "
                    f"{time.monotonic() - started:.1f}s")
                args = (dovecot.host, str(dovecot.tls_port), str(dovecot.ca_file), login,
                        PASSWORD)
                if not quick:  # warm-up: Dovecot's indexes, the page cache
                    _child("baseline_fetch", *args)
                base_runs, deal_runs = [], []
                for i in range(plan.repeats):
                    base_runs.append(_child("baseline_fetch", *args))
                    log(f"  baseline {name} run {i + 1}: {base_runs[-1]['rate']} msg/s, "
                        f"peak RSS {base_runs[-1]['peak_rss_mib']} MiB")
                    db = tmp / f"{name}-{i}.db"
                    deal_runs.append(_child(
                        "dealmail_sync", str(_config(tmp, dovecot, login)), str(db),
                        json.dumps(plan.__dict__)))
                    log(f"  dealmail {name} run {i + 1}: {deal_runs[-1]['rate']} msg/s, "
                        f"peak RSS {deal_runs[-1]['peak_rss_mib']} MiB")
                    for suffix in ("", "-wal", "-shm", ".writelock", ".log"):
                        Path(f"{db}{suffix}").unlink(missing_ok=True)
                db = tmp / f"{name}-sync-only.db"
                alone = _child("dealmail_sync", str(_config(tmp, dovecot, login)), str(db),
                               json.dumps(plan.__dict__), "no")
                log(f"  sync only {name}: {alone['rate']} msg/s")
                base, deal = _median(base_runs), _median(deal_runs)
                results["mailboxes"][name] = {
                    "messages": count, "bytes": size, "baseline": base, "dealmail": deal,
                    "sync_only": alone,
                    "sync_only_ratio": round(alone["rate"] / base["rate"], 3)
                    if base["rate"] else None,
                    "ratio": round(deal["rate"] / base["rate"], 3) if base["rate"] else None,
                    # The same comparison in client CPU per message: steadier than rates
                    # on a machine shared with other work.
                    "cpu_ratio": round(base["cpu_ms_per_msg"] / deal["cpu_ms_per_msg"], 3)
                    if deal["cpu_ms_per_msg"] else None}
        finally:
            dovecot.stop()
    return results


def format_table(results: dict[str, Any]) -> str:
    head = (f"{'mailbox':8} {'messages':>8} {'MB':>7} {'who':9} {'msg/s':>8} {'MB/s':>7} "
            f"{'peak RSS MiB':>12} {'CPU ms/msg':>10} {'ratio':>6} {'CPU ratio':>9}")
    lines = [f"dealmail IMAP initial sync benchmark ({results['mode']}, median of "
             f"{results['repeats']}, {results['cpus']} CPUs)", head, "-" * len(head)]
    for name, box in results["mailboxes"].items():
        for who in ("baseline", "dealmail", "sync_only"):
            r = box[who]
            cpu = f"{r['cpu_ms_per_msg']:.2f}" if "cpu_ms_per_msg" in r else "-"
            ratio = (f"{box['ratio']:.2f}" if who == "dealmail" and box["ratio"] else
                     f"{box['sync_only_ratio']:.2f}" if who == "sync_only" else "")
            cpu_ratio = (f"{box['cpu_ratio']:.2f}" if who == "dealmail" and box["cpu_ratio"]
                         else f"{box['baseline']['cpu_ms_per_msg'] / r['cpu_ms_per_msg']:.2f}"
                         if who == "sync_only" and r["cpu_ms_per_msg"] else "")
            label = "sync only" if who == "sync_only" else who
            lines.append(f"{name:8} {box['messages']:8d} {box['bytes'] / 1e6:7.0f} {label:9} "
                         f"{r['rate']:8.1f} {r['mb_per_s']:7.1f} {r['peak_rss_mib']:12.1f} "
                         f"{cpu:>10} {ratio:>6} {cpu_ratio:>9}")
    lines.append("-" * len(head))
    boxes = results["mailboxes"]
    if "small" in boxes and "large" in boxes:
        small, large = boxes["small"]["dealmail"], boxes["large"]["dealmail"]
        lines.append(f"dealmail peak RSS: {small['peak_rss_mib']} MiB at "
                     f"{boxes['small']['messages']} messages, {large['peak_rss_mib']} MiB at "
                     f"{boxes['large']['messages']} "
                     f"({boxes['large']['messages'] // max(1, boxes['small']['messages'])}x "
                     "the mailbox)")
        lines.append(f"dealmail on the large mailbox: {large['stored']} stored, "
                     f"{large['not_tracked']} not tracked, {large['failed']} failed, "
                     f"{large['pending_choices']} pending deal choices (customers with several "
                     "open deals)")
        lines.append("sync only: the same sync with the capture path skipped (every message "
                     "answered 'not tracked'): the transport's own cost")
    return "\n".join(lines)


def main(quick: bool, json_path: Path | None) -> int:
    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    results = run_imap(quick, log)
    print(format_table(results), flush=True)
    if json_path is not None:
        json_path.write_text(json.dumps(results, indent=2))
    return 0
