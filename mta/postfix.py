"""The Postfix side of dealmail as an MTA plugin: what ``dealmail postfix-config`` writes.

For the company's own Postfix, from the dealmail config:

* ``main.cf`` settings and a ``master.cf`` service: dealmail's mail domain is a relay domain
  whose mail goes to dealmail over LMTP (``transport_maps``, the ``dealmail`` service, TCP on
  loopback or a UNIX socket), and ``relay_recipient_maps`` lists dealmail's public addresses
  (one regular expression per kind of address in ``mta.routing.KINDS``), so Postfix refuses
  an unknown address at its own door and dealmail's ``+sent``/``+received`` addresses from
  anybody outside;
* ``sender_bcc_maps`` and ``recipient_bcc_maps``: each user's primary and alternate addresses
  mapped to their copy address, so every mail a user sends or receives through this Postfix
  reaches dealmail as one more recipient of the same delivery, without anyone BCC-ing;
* comments saying which verdicts dealmail believes from this Postfix (the trust reasoning,
  also in the README's "Behind Postfix"), and ``header_checks`` that strip incoming
  Authentication-Results claiming a trusted authserv-id (RFC 8601 §5).

Map files are written atomically: a temporary file in the same folder, ``postmap`` on it when
asked, then renames (the ``.db`` first, so that Postfix never reads a half-written map), with
the previous file kept as ``NAME.bak``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from dealmail.config import Config

from .routing import KINDS, MTA_ONLY_KINDS, AddressKind, mailbox_key

__all__ = ["MapFile", "PostfixConfig", "generate", "postfix_regexp", "write_files"]

DEFAULT_DIR = Path("/etc/postfix/dealmail")


@dataclass(frozen=True)
class MapFile:
    name: str
    text: str
    #: "hash" tables need postmap; "regexp" tables are read as they are.
    table: str

    def reference(self, folder: Path) -> str:
        return f"{self.table}:{folder / self.name}"


@dataclass(frozen=True)
class PostfixConfig:
    main_cf: str
    master_cf: str
    maps: tuple[MapFile, ...]

    def render(self) -> str:
        """Everything as one text, for stdout."""
        parts = ["# ---- main.cf: add these settings (see the comments for existing ones)",
                 self.main_cf, "# ---- master.cf: add this service", self.master_cf]
        for m in self.maps:
            parts += [f"# ---- {m.name} ({m.table} table)", m.text]
        return "\n".join(parts)


def postfix_regexp(kind: AddressKind) -> str:
    """A kind's ``+suffix`` pattern as a POSIX extended regular expression (Postfix's
    ``regexp:`` tables, regexp_table(5)): named groups become plain groups, ``\\d`` a class."""
    text = re.sub(r"\(\?P<[a-z_]+>", "(", kind.suffix)
    return text.replace(r"\d", "[0-9]")


def _transport_nexthop(config: Config) -> str:
    listen = config.listeners.lmtp
    if listen.startswith("unix:"):
        return f"unix:{listen[5:]}"
    host, _, port = listen.rpartition(":")
    return f"inet:{host}:{port}"


def _trust_comment(config: Config) -> str:
    xforward = "enabled" if config.lmtp.xforward_hosts else "disabled"
    ids = ", ".join(config.policy.trusted_authserv_ids) or "(none configured)"
    nets = ", ".join(map(str, config.policy.trusted_networks)) or "(none)"
    upstream = (", ".join(map(str, config.policy.upstream_networks))
                or "empty: from any client; list your Postfix there")
    return f"""\
# What dealmail believes from this Postfix (dealmail's [policy] and [lmtp] sections):
# * A copy made by sender_bcc_maps is checked like any copy of a user's own mail: the
#   header From must be a user of the company, verified at a level the company accepts
#   ([companies.sender_verification]). A copy whose From names another user than the
#   envelope sender is refused (Postfix binds the envelope sender to the SASL login with
#   smtpd_sender_login_maps + reject_sender_login_mismatch: keep that on submission).
# * strong: your OpenDKIM signs what users submit, and dealmail checks that signature.
# * upstream: Authentication-Results written by your OpenDKIM/OpenDMARC under an authserv-id
#   listed in dealmail's policy.trusted_authserv_ids ({ids}), honoured only from
#   policy.upstream_networks ({upstream}). Postfix must strip incoming headers that claim that
#   authserv-id (header_checks below; header_checks see what the client sent, not what
#   your milters add).
# * trusted-network: the client is in policy.trusted_networks ({nets}). XFORWARD is
#   {xforward} (lmtp.xforward_hosts): with it, the client is the one that handed the mail
#   to Postfix (your office network, or a laptop that Postfix's SASL authenticated, whose
#   mail then needs DKIM); without it, the client is Postfix itself, and every copy it
#   hands over is at trusted-network level when Postfix's address is trusted: only do that
#   when Postfix refuses mail from outside that claims your own domains.
# * Copies made by recipient_bcc_maps are the recipient user's own received mail (like
#   their mailbox): the From is a correspondent, nothing is verified.
# * dealmail's own mail (questions, digests, DSNs) is marked auto-generated; when it comes
#   back through these maps it is accepted and never captured.
"""


def generate(config: Config, folder: Path = DEFAULT_DIR) -> PostfixConfig:
    """The Postfix configuration for ``config``; ``folder`` is where the map files live."""
    if not config.listeners.lmtp:
        raise ValueError("listeners.lmtp is empty: set the LMTP listener first "
                         "(e.g. --set listeners.lmtp=127.0.0.1:2424)")
    domain = config.mail_domain
    service = config.lmtp.transport_name
    escaped = re.escape(domain).replace(r"\-", "-")
    public = [k for k in KINDS if k.name not in MTA_ONLY_KINDS]
    relay_lines = ["# dealmail's public addresses; anything else at "
                   f"{domain} is refused by Postfix (550 5.1.1)."]
    for company in config.companies:
        slug = re.escape(company.slug).replace(r"\-", "-")
        suffixes = "|".join(postfix_regexp(k) for k in public if k.suffix)
        relay_lines.append(f"/^{slug}(\\+({suffixes}))?@{escaped}$/ OK")
    relay = MapFile("dealmail_relay_recipients", "\n".join(relay_lines) + "\n", "regexp")
    transport = MapFile("dealmail_transport",
                        f"{domain}  {service}:{_transport_nexthop(config)}\n", "hash")
    sent_lines: list[str] = []
    received_lines: list[str] = []
    for company in config.companies:
        for user in company.users:
            copy_to = f"{company.slug}+received-{mailbox_key(company.slug, user.address)}"
            for address in user.addresses:
                sent_lines.append(f"{address}  {company.slug}+sent@{domain}")
                received_lines.append(f"{address}  {copy_to}@{domain}")
    maps = [transport, relay]
    if config.lmtp.capture_sent:
        maps.append(MapFile("dealmail_sender_bcc", "\n".join(sent_lines) + "\n", "hash"))
    if config.lmtp.capture_received:
        maps.append(MapFile("dealmail_recipient_bcc", "\n".join(received_lines) + "\n",
                            "hash"))
    if config.policy.trusted_authserv_ids:
        lines = [f"/^Authentication-Results:[[:space:]]*{re.escape(i)}([[:space:];]|$)/ "
                 f"IGNORE" for i in config.policy.trusted_authserv_ids]
        maps.append(MapFile("dealmail_header_checks", "\n".join(lines) + "\n", "regexp"))
    by_name = {m.name: m.reference(folder) for m in maps}
    concurrency = min(20, config.lmtp.max_connections)
    recipients = min(50, config.limits.max_recipients)
    main = [f"# dealmail behind Postfix: generated by `dealmail postfix-config` from "
            f"{config.path}", _trust_comment(config).rstrip(),
            f"# Mail for {domain} is relayed to dealmail. If relay_domains, transport_maps or",
            "# relay_recipient_maps are already set, list dealmail's entries next to yours.",
            f"relay_domains = {domain}",
            f"transport_maps = {by_name['dealmail_transport']}",
            f"relay_recipient_maps = {by_name['dealmail_relay_recipients']}"]
    if "dealmail_sender_bcc" in by_name:
        main += ["# A copy of every mail a user sends (envelope sender = a user's address).",
                 f"sender_bcc_maps = {by_name['dealmail_sender_bcc']}"]
    if "dealmail_recipient_bcc" in by_name:
        main += ["# A copy of every mail a user receives.",
                 f"recipient_bcc_maps = {by_name['dealmail_recipient_bcc']}"]
    if "dealmail_header_checks" in by_name:
        main += ["# Strip forged Authentication-Results of your trusted authserv-ids (RFC 8601 "
                 "section 5).", f"header_checks = {by_name['dealmail_header_checks']}"]
    main += [f"# At most lmtp.max_connections ({config.lmtp.max_connections}) connections; "
             "dealmail answers one more with 421 and Postfix defers.",
             f"{service}_destination_concurrency_limit = {concurrency}",
             f"# At most limits.max_recipients ({config.limits.max_recipients}) per delivery.",
             f"{service}_destination_recipient_limit = {recipients}"]
    xforward = ("\n  -o lmtp_send_xforward_command=yes" if config.lmtp.xforward_hosts
                else "")
    master = (f"# The LMTP client that delivers to dealmail (lmtp(8)); XFORWARD tells dealmail "
              f"the original client.\n"
              f"{service}  unix  -       -       n       -       -       lmtp"
              f"{xforward}\n  -o syslog_name=postfix/{service}\n")
    return PostfixConfig("\n".join(main) + "\n", master, tuple(maps))


def _atomic_write(path: Path, text: str) -> bool:
    """Write ``path`` through a temporary file and a rename; keep a changed old file as
    ``.bak``. Returns whether the content changed."""
    old = path.read_text(encoding="utf-8") if path.exists() else None
    if old == text:
        return False
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        if old is not None:
            shutil.copy2(path, path.with_name(path.name + ".bak"))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return True


def _postmap(path: Path, text: str, postfix_dir: Path | None) -> None:
    """``postmap`` a copy, then move its ``.db`` into place before the source, so a Postfix
    daemon opening the map meanwhile sees the old table or the new one, never half of one."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        command = ["postmap"]
        if postfix_dir is not None:
            command += ["-c", str(postfix_dir)]
        proc = subprocess.run([*command, f"hash:{tmp}"], capture_output=True, text=True,
                              check=False, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"postmap {path.name} failed: {proc.stderr.strip()}")
        os.chmod(f"{tmp}.db", 0o644)
        os.replace(f"{tmp}.db", f"{path}.db")
    finally:
        tmp.unlink(missing_ok=True)
        Path(f"{tmp}.db").unlink(missing_ok=True)


def write_files(generated: PostfixConfig, folder: Path, *, postmap: bool,
                postfix_dir: Path | None = None) -> list[str]:
    """Write the snippets and maps into ``folder``; returns a line per file written."""
    folder.mkdir(parents=True, exist_ok=True)
    done: list[str] = []
    files: Iterable[tuple[str, str, str]] = [
        ("dealmail_main.cf", generated.main_cf, ""),
        ("dealmail_master.cf", generated.master_cf, ""),
        *((m.name, m.text, m.table) for m in generated.maps)]
    for name, text, table in files:
        path = folder / name
        if postmap and table == "hash":
            _postmap(path, text, postfix_dir)  # the .db first: see _postmap
        changed = _atomic_write(path, text)
        if postmap and table == "hash":
            done.append(f"{path} (and {path}.db){'' if changed else ', unchanged'}")
        else:
            done.append(f"{path}{'' if changed else ' (unchanged)'}")
    return done
