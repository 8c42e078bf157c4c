"""``python -m bench lmtp``: Postfix's queue into dealmail over LMTP, against a bare LMTP sink.

One private Postfix (bench/postfixrun.py) relays two domains over LMTP: ``dealmail.localhost``
to dealmail (``dealmail serve`` in its own process, fresh SQLite database with the demo CRM,
default durability and log level) and ``sink.test`` to a bare aiosmtpd LMTP server that
answers 250 to everything (in its own process). The same load, ``N`` messages of 5 KB from
10 SMTP clients submitting to Postfix, goes to one and then the other; each message has one
recipient (aiosmtpd's LMTP class answers DATA once, which is right for one recipient only).

Figures per target: messages per second from the first submission until Postfix logged the
last ``status=sent``; p50/p99 of Postfix's own ``delay=`` (time from entering its queue to
delivered, 10 ms resolution); CPU seconds per message of the target's process tree; its peak
RSS. The ratio is dealmail's rate over the sink's, measured in the same run.
"""

from __future__ import annotations

import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .ingest import cpu_seconds, memory_kib
from .postfixrun import PrivatePostfix, free_port
from .seed import EXAMPLE_CONFIG, ROOT

CLIENTS = 10
SIZE = 5 * 1024
_DELAY_RE = re.compile(r" delay=([0-9.]+),")


def serve_sink(port: int) -> None:
    """The baseline: aiosmtpd's LMTP server, answering 250 to every message."""
    import asyncio

    from aiosmtpd.lmtp import LMTP

    class Handler:
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            return "250 2.0.0 Ok"

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: LMTP(Handler(), hostname="sink.test", loop=loop), "127.0.0.1", port)
        print("listening", flush=True)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


def _wait_port(proc: subprocess.Popen[str], port: int, timeout: float = 60) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port}")


def make_message(seq: int, run: str, to: str) -> bytes:
    head = (f"From: Alice <alice@example.com>\r\nTo: {to}\r\nSubject: Pilot plan {seq}\r\n"
            f"Message-ID: <{run}.{seq}@example.com>\r\n"
            "Date: Thu, 26 Nov 2026 10:00:00 +0100\r\n\r\n")
    line = "Hello Carl, here is the plan for the pilot, with the figures we discussed.\r\n"
    body = line * ((SIZE - len(head)) // len(line) + 1)
    return (head + body).encode()


def submit(port: int, count: int, rcpt: str, run: str) -> None:
    """``count`` messages from ``CLIENTS`` persistent SMTP connections."""
    import smtplib

    def client(first: int) -> None:
        with smtplib.SMTP("127.0.0.1", port, timeout=60) as smtp:
            for seq in range(first, count, CLIENTS):
                smtp.sendmail("alice@example.com", [rcpt],
                              make_message(seq, run, "Carl <carl@other.test>"))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def measure(postfix: PrivatePostfix, pid: int, rcpt: str, count: int) -> dict[str, Any]:
    since = postfix.log_size()
    run = uuid.uuid4().hex[:8]
    pattern = re.compile(rf"to=<{re.escape(rcpt)}>.*status=sent")
    cpu0 = cpu_seconds(pid)
    start = time.monotonic()
    sender = threading.Thread(target=submit, args=(postfix.port, count, rcpt, run))
    sender.start()
    deadline = start + 600
    lines: list[str] = []
    while time.monotonic() < deadline:
        lines = [ln for ln in postfix.log()[since:].splitlines() if pattern.search(ln)]
        if len(lines) >= count:
            break
        time.sleep(0.02)
    elapsed = time.monotonic() - start
    sender.join()
    cpu = cpu_seconds(pid) - cpu0
    if len(lines) < count:
        raise RuntimeError(f"only {len(lines)} of {count} delivered to {rcpt}")
    delays = sorted(float(m.group(1)) for ln in lines if (m := _DELAY_RE.search(ln)))
    return {"messages": count, "seconds": round(elapsed, 3),
            "rate": round(count / elapsed, 1),
            "p50_ms": round(statistics.median(delays) * 1000, 1),
            "p99_ms": round(delays[min(len(delays) - 1, int(len(delays) * 0.99))] * 1000, 1),
            "cpu_ms_per_msg": round(cpu / count * 1000, 2),
            "peak_rss_mib": round(memory_kib(pid, "VmHWM") / 1024, 1)}


def run_lmtp(quick: bool, log: Callable[[str], None]) -> dict[str, Any]:
    count = 200 if quick else 2000
    work = Path(tempfile.mkdtemp(prefix="bench-lmtp-"))
    dealmail_port, sink_port = free_port(), free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    dealmail = subprocess.Popen(
        [sys.executable, "-m", "dealmail.cli", "--config", str(EXAMPLE_CONFIG),
         "--set", f"database.url=sqlite:///{work}/dealmail.db",
         "--set", "listeners.inbound=127.0.0.1:0", "--set", "listeners.submission=",
         "--set", f"listeners.lmtp=127.0.0.1:{dealmail_port}",
         "--set", f"server.demo_data={ROOT / 'conf' / 'demo'}",
         "--set", f"server.log_file={work}/dealmail.log",
         "--set", f"server.status_file={work}/dealmail.status.json", "serve"],
        cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True)
    sink = subprocess.Popen(
        [sys.executable, "-c", f"from bench.lmtp import serve_sink; serve_sink({sink_port})"],
        cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, text=True)
    postfix = PrivatePostfix(work / "postfix", main={
        "relay_domains": "dealmail.localhost, sink.test",
        "transport_maps": f"hash:{work / 'postfix' / 'conf' / 'transport'}",
        "lmtp_send_xforward_command": "yes",
        # The same for both targets: Postfix's defaults, but no queue-run backoff surprises.
        "default_destination_concurrency_limit": "20",
    }, maps={"transport": f"dealmail.localhost lmtp:inet:127.0.0.1:{dealmail_port}\n"
                          f"sink.test lmtp:inet:127.0.0.1:{sink_port}\n"})
    try:
        _wait_port(dealmail, dealmail_port)
        _wait_port(sink, sink_port)
        postfix.start()
        log(f"postfix on 127.0.0.1:{postfix.port}; dealmail LMTP :{dealmail_port}; "
            f"sink LMTP :{sink_port}; {count} messages of {SIZE // 1024} KB, "
            f"{CLIENTS} clients")
        # Warm up both (imports, caches, first connections).
        measure(postfix, sink.pid, "warm@sink.test", 20)
        measure(postfix, dealmail.pid, "example@dealmail.localhost", 20)
        results = {"baseline": measure(postfix, sink.pid, "carl@sink.test", count)}
        log(f"baseline done: {results['baseline']['rate']} msg/s")
        results["dealmail"] = measure(postfix, dealmail.pid, "example@dealmail.localhost",
                                      count)
        log(f"dealmail done: {results['dealmail']['rate']} msg/s")
    finally:
        postfix.stop()
        for proc in (dealmail, sink):
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    return {"mode": "quick" if quick else "full", "messages": count, "clients": CLIENTS,
            "size": SIZE, **results,
            "ratio": round(results["dealmail"]["rate"] / results["baseline"]["rate"], 3)}


def format_table(results: dict[str, Any]) -> str:
    head = (f"dealmail LMTP benchmark ({results['mode']}: {results['messages']} x "
            f"{results['size'] // 1024} KB, {results['clients']} clients into Postfix)")
    cols = ("msg/s", "p50 ms", "p99 ms", "CPU ms/msg", "peak RSS MiB")
    keys = ("rate", "p50_ms", "p99_ms", "cpu_ms_per_msg", "peak_rss_mib")
    lines = [head, f"{'target':<28}" + "".join(f"{c:>14}" for c in cols)]
    for name, label in (("baseline", "bare aiosmtpd LMTP sink"), ("dealmail", "dealmail")):
        lines.append(f"{label:<28}" + "".join(f"{results[name][k]:>14}" for k in keys))
    lines.append(f"ratio (dealmail / sink msg/s): {results['ratio']}")
    return "\n".join(lines)


def main(quick: bool, json_path: Path | None) -> int:
    results = run_lmtp(quick, lambda text: print(text, file=sys.stderr, flush=True))
    print(format_table(results))
    if json_path is not None:
        json_path.write_text(json.dumps(results, indent=2))
    return 0
