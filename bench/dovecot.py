"""A private, throw-away Dovecot IMAP server on loopback, for the tests and ``bench imap``.

One config file of its own (no ``!include``: the stock ``conf.d`` pulls in PAM and an mbox
location), one passwd-file per user, added on the fly,
Maildir mailboxes owned by a numeric uid with no passwd entry (the mail uid must not be 0),
and TLS from a ``trustme`` CA: implicit TLS on one port, STARTTLS on another. Never started as
a system service; stopped with ``doveadm stop``.

Pitfalls handled here: every folder above the config, the passwd-file and the mail root must
be traversable by Dovecot's own users (``mkdtemp`` makes 0700 folders); ``log_path`` is
required (no syslog); a fresh ``base_dir`` per instance; Dovecot's stdout is never a pipe (the
daemon keeps it open).
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

MAIL_UID = 5000

CONFIG = """\
base_dir = {root}/run
state_dir = {root}/state
instance_name = dovecot-dealmail-{tag}
log_path = {root}/dovecot.log
protocols = imap
listen = 127.0.0.1
ssl = yes
ssl_cert = <{root}/cert.pem
ssl_key = <{root}/key.pem
disable_plaintext_auth = no
auth_mechanisms = plain login
mail_location = maildir:~/Maildir
first_valid_uid = {uid}
mail_max_userip_connections = 100
auth_failure_delay = 0
passdb {{
  driver = passwd-file
  args = scheme=PLAIN {root}/users/%u
}}
userdb {{
  driver = passwd-file
  args = {root}/users/%u
  default_fields = uid={uid} gid={uid} home={root}/mail/%u
}}
namespace inbox {{
  inbox = yes
  separator = /
  mailbox Sent {{
    special_use = \\Sent
    auto = subscribe
  }}
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {plain_port}
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {tls_port}
    ssl = yes
  }}
}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class DovecotMissing(RuntimeError):
    pass


class PrivateDovecot:
    """``start()``, ``add_user()``, ``stop()``; ``ca_file`` is the CA to trust."""

    def __init__(self, root: Path | None = None) -> None:
        if shutil.which("dovecot") is None:
            raise DovecotMissing("dovecot is not installed (Debian package dovecot-imapd)")
        self.own_root = root is None
        self.root = Path(root or tempfile.mkdtemp(prefix="dealmail-dovecot-"))
        self.tag = self.root.name[-8:]
        self.host = "127.0.0.1"
        self.tls_port = 0
        self.plain_port = 0
        self.users: dict[str, str] = {}
        self._counter = itertools.count(1)

    @property
    def conf(self) -> Path:
        return self.root / "dovecot.conf"

    @property
    def ca_file(self) -> Path:
        return self.root / "ca.pem"

    def start(self) -> None:
        import trustme

        root = self.root
        for folder in (root, root / "run", root / "state", root / "mail"):
            folder.mkdir(parents=True, exist_ok=True)
            folder.chmod(0o755)
        # Dovecot's own users must traverse every folder above the root too.
        for parent in root.parents:
            if parent == Path("/"):
                break
            mode = parent.stat().st_mode & 0o777
            if mode & 0o005 != 0o005 and parent.stat().st_uid == os.getuid():
                parent.chmod(mode | 0o005)
        os.chown(root / "mail", MAIL_UID, MAIL_UID)
        ca = trustme.CA()
        leaf = ca.issue_cert("localhost", "127.0.0.1")
        ca.cert_pem.write_to_path(str(self.ca_file))
        leaf.private_key_pem.write_to_path(str(root / "key.pem"))
        with open(root / "cert.pem", "wb") as f:
            for blob in leaf.cert_chain_pems:
                f.write(blob.bytes())
        (root / "users").mkdir(exist_ok=True)
        (root / "users").chmod(0o755)
        self.tls_port, self.plain_port = free_port(), free_port()
        self.conf.write_text(CONFIG.format(root=root, tag=self.tag, uid=MAIL_UID,
                                           plain_port=self.plain_port,
                                           tls_port=self.tls_port))
        subprocess.run(["dovecot", "-c", str(self.conf)], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection((self.host, self.tls_port), 0.5).close()
                return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"dovecot did not open port {self.tls_port}: {self.log()[-2000:]}")

    def log(self) -> str:
        try:
            return (self.root / "dovecot.log").read_text(errors="replace")
        except OSError:
            return ""

    def add_user(self, name: str | None = None, password: str = "secret-pw") -> str:
        """A new user (``name@x.test``); returns the login."""
        login = name or f"user{next(self._counter)}-{os.getpid()}@x.test"
        self.users[login] = password
        # One passwd-file per user: Dovecot looks at a changed passwd-file at most once a
        # second, so users added to one shared file within a second were not found.
        users = self.root / "users" / login
        users.write_text(f"{login}:{{PLAIN}}{password}::::::\n")
        users.chmod(0o644)
        return login

    def maildir(self, login: str, folder: str = "") -> Path:
        base = self.root / "mail" / login / "Maildir"
        return base / f".{folder}" if folder and folder.upper() != "INBOX" else base

    def deliver(self, login: str, messages: list[bytes], folder: str = "",
                mtime: float | None = None) -> None:
        """Write messages straight into the user's Maildir (fast: no IMAP APPEND), owned by
        the mail uid; Dovecot assigns UIDs in file-name order when it next looks."""
        box = self.maildir(login, folder)
        for sub in ("cur", "new", "tmp"):
            (box / sub).mkdir(parents=True, exist_ok=True)
        for path in [box, *box.parents]:
            if path == self.root / "mail":
                break
            os.chown(path, MAIL_UID, MAIL_UID)
        for sub in ("cur", "new", "tmp"):
            os.chown(box / sub, MAIL_UID, MAIL_UID)
        stamp = int(time.time() * 1000)
        for i, raw in enumerate(messages):
            path = box / "cur" / f"{stamp}.M{i:07d}.dealmail:2,"
            path.write_bytes(raw)
            os.chown(path, MAIL_UID, MAIL_UID)
            if mtime is not None:
                os.utime(path, (mtime, mtime))

    def forget_uids(self, login: str, folder: str = "") -> None:
        """Lose the folder's UID list and indexes (as after a restore or a server move):
        Dovecot numbers the messages again under a new UIDVALIDITY."""
        box = self.maildir(login, folder)
        for path in box.iterdir():
            if path.name.startswith(("dovecot-uidlist", "dovecot.index")):
                path.unlink()

    def stop(self) -> None:
        pid_file = self.root / "run" / "master.pid"
        try:
            pid = int(pid_file.read_text().strip())
        except (OSError, ValueError):
            pid = None
        subprocess.run(["doveadm", "-c", str(self.conf), "stop"], check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while pid is not None and time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except OSError:
                break
            time.sleep(0.05)
        else:
            if pid is not None:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        if self.own_root:
            shutil.rmtree(self.root, ignore_errors=True)
