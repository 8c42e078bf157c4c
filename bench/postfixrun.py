"""A private, throw-away Postfix instance on loopback, for the tests and ``python -m bench lmtp``.

``postfix -c DIR`` runs a second Postfix next to (never instead of) a system one: its own
``main.cf``/``master.cf``, queue directory, data directory and log file, listening only on
127.0.0.1 on a free port. What was learnt making it work (Postfix 3.7, as root):

* ``maillog_file`` must lie under one of ``maillog_file_prefixes``, or even ``postmap`` is
  fatal; Postfix logs to a file only with ``maillog_file`` plus the ``postlog`` service;
* ``data_directory`` must belong to the ``postfix`` user;
* every service runs without chroot (the stock ``master.cf`` chroots most of them into the
  queue directory, where our map files and /etc/services are not);
* ``postfix stop`` returns before the master exits: wait for ``QUEUE/pid/master.pid``'s
  process to be gone (about 1.5 s) before reusing the ports or removing the folders.

A missing Postfix is an error (:class:`PostfixMissing`), never a reason to skip.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Self

__all__ = ["PostfixMissing", "PrivatePostfix", "free_port"]

SBIN = Path("/usr/sbin")

# The stock services (Debian's master.cf.dist) that a relay needs, all without chroot.
_SERVICES = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class PostfixMissing(RuntimeError):
    """Postfix is not installed (``scripts/test`` installs Debian's ``postfix``)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"Postfix did not open 127.0.0.1:{port} within {timeout} s")


class PrivatePostfix:
    """One private Postfix: ``main`` holds extra ``main.cf`` settings, ``maps`` the files
    (name -> text) to write and ``postmap`` in the config folder (``hash:`` tables), and
    ``master`` extra ``master.cf`` lines."""

    def __init__(self, root: Path, *, main: Mapping[str, str] | None = None,
                 maps: Mapping[str, str] | None = None, master: str = "",
                 smtpd_port: int = 0, hostname: str = "mx.company.test",
                 smtpd_options: Mapping[str, str] | None = None) -> None:
        for tool in ("postfix", "postmap", "postqueue", "postsuper"):
            if not (SBIN / tool).exists():
                raise PostfixMissing(f"{SBIN / tool} not found: install Debian's postfix "
                                     "(scripts/test does, as root)")
        self.root = root
        self.conf = root / "conf"
        self.queue = root / "queue"
        self.data = root / "data"
        self.log_file = root / "maillog"
        self.port = smtpd_port or free_port()
        self.hostname = hostname
        self.main = dict(main or {})
        self.maps = dict(maps or {})
        self.master = master
        self.smtpd_options = dict(smtpd_options or {})
        self.running = False

    # ------------------------------------------------------------------ files

    def main_cf(self) -> str:
        settings = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue),
            "data_directory": str(self.data),
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "maillog_file": str(self.log_file),
            "maillog_file_prefixes": f"{self.root}, /var, /dev/stdout, /tmp",
            "myhostname": self.hostname,
            "mydestination": "",
            "local_recipient_maps": "",
            "alias_maps": "",
            "alias_database": "",
            "mynetworks": "127.0.0.0/8",
            "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
            "smtp_dns_support_level": "disabled",
            "smtp_tls_security_level": "none",
            "smtpd_tls_security_level": "none",
            "biff": "no",
            "append_dot_mydomain": "no",
            # A short backoff so that postqueue -f retries deferred mail in tests at once.
            "minimal_backoff_time": "1s",
            "maximal_backoff_time": "2s",
            "queue_run_delay": "1s",
            **self.main,
        }
        return "".join(f"{k} = {v}\n" for k, v in settings.items())

    def master_cf(self) -> str:
        options = "".join(f"\n  -o {k}={v}" for k, v in self.smtpd_options.items())
        return (f"127.0.0.1:{self.port} inet n - n - - smtpd{options}\n"
                f"{_SERVICES}{self.master}")

    def write(self) -> None:
        self.conf.mkdir(parents=True, exist_ok=True)
        (self.conf / "main.cf").write_text(self.main_cf())
        (self.conf / "master.cf").write_text(self.master_cf())
        for name, text in self.maps.items():
            self.write_map(name, text)

    def write_map(self, name: str, text: str) -> Path:
        path = self.conf / name
        path.write_text(text)
        self.run("postmap", "-c", str(self.conf), f"hash:{path}")
        return path

    # ------------------------------------------------------------------ control

    def run(self, tool: str, *args: str, check: bool = True) -> str:
        proc = subprocess.run([str(SBIN / tool), *args], capture_output=True, text=True,
                              timeout=60, check=False, stdin=subprocess.DEVNULL)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{tool} {' '.join(args)} failed ({proc.returncode}): "
                               f"{proc.stderr.strip()}")
        return proc.stdout + proc.stderr

    def start(self) -> Self:
        self.queue.mkdir(parents=True, exist_ok=True)
        self.data.mkdir(parents=True, exist_ok=True)
        shutil.chown(self.data, "postfix", "postfix")
        # Postfix's daemons (user postfix) must reach the config and log folders.
        for folder in (self.root, *self.root.parents):
            if folder == Path("/"):
                break
            mode = folder.stat().st_mode
            if not mode & 0o001:
                os.chmod(folder, mode | 0o011)
        self.write()
        self.run("postfix", "-c", str(self.conf), "start")
        self.running = True
        _wait_port(self.port, 20)
        return self

    def reload(self) -> None:
        self.run("postfix", "-c", str(self.conf), "reload")

    def stop(self) -> None:
        if not self.running:
            return
        pid_file = self.queue / "pid" / "master.pid"
        try:
            pid = int(pid_file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pid = 0
        self.run("postfix", "-c", str(self.conf), "stop", check=False)
        deadline = time.monotonic() + 20
        while pid and time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        self.running = False

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ queue and log

    def flush(self) -> None:
        """``postqueue -f``: attempt every queued message now."""
        self.run("postqueue", "-c", str(self.conf), "-f")

    def queue_ids(self) -> list[str]:
        """Ids of the messages in the queue (``postqueue -j``, one JSON object a line)."""
        import json

        out = self.run("postqueue", "-c", str(self.conf), "-j", check=False)
        return [json.loads(line)["queue_id"] for line in out.splitlines()
                if line.startswith("{")]

    def log(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except OSError:
            return ""

    def wait_log(self, pattern: str, count: int = 1, timeout: float = 30.0,
                 since: int = 0, flush: Callable[[], None] | None = None) -> list[str]:
        """The log lines (after offset ``since``) matching ``pattern``, once there are at
        least ``count``; ``flush`` is called now and then while waiting."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        next_flush = time.monotonic() + 1.0
        while True:
            lines = [ln for ln in self.log()[since:].splitlines() if regex.search(ln)]
            if len(lines) >= count:
                return lines
            if time.monotonic() > deadline:
                raise TimeoutError(f"{count} log line(s) matching {pattern!r} not seen in "
                                   f"{timeout} s; log tail:\n{self.log()[-4000:]}")
            if flush is not None and time.monotonic() > next_flush:
                flush()
                next_flush = time.monotonic() + 1.0
            time.sleep(0.05)

    def log_size(self) -> int:
        return len(self.log())
