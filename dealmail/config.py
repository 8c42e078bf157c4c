"""Admin configuration: load the TOML file, validate every value, report every problem at once.

The admin edits ``conf/dealmail.toml`` (documented by ``conf/dealmail.example.toml``). Loading
produces an immutable :class:`Config`; a problem is reported as ``FILE:LINE: key: message`` and
all problems of a file are reported together, so an admin fixes them in one pass. ``--set
section.key=value`` overrides are applied before validation, like Postfix's ``-o``.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from dealmail.addresses import AddressError, normalize_address, normalize_domain

__all__ = [
    "DEFAULT_FREEMAIL",
    "ClientsConfig",
    "Company",
    "Config",
    "ConfigError",
    "DatabaseConfig",
    "ImapConfig",
    "LimitsConfig",
    "ListenersConfig",
    "LmtpConfig",
    "MailboxConfig",
    "OutboxConfig",
    "PolicyConfig",
    "RelayConfig",
    "ServerConfig",
    "TlsConfig",
    "User",
    "check_files",
    "find_config_path",
    "load_config",
    "needs_restart",
]

DEFAULT_FREEMAIL: tuple[str, ...] = (
    "gmail.com", "googlemail.com", "yahoo.com", "yahoo.co.jp", "outlook.com", "hotmail.com",
    "live.com", "msn.com", "icloud.com", "me.com", "mac.com", "aol.com", "gmx.de", "gmx.net",
    "web.de", "mail.ru", "yandex.ru", "proton.me", "protonmail.com", "zoho.com", "qq.com",
    "163.com", "126.com", "naver.com", "docomo.ne.jp", "ezweb.ne.jp", "softbank.ne.jp",
    "mail.test",
)

VERIFY_LEVELS = ("none", "spf", "trusted-network", "arc", "upstream", "strong")
_SLUG_RE = re.compile(r"^[a-z0-9](?:[a-z0-9._-]{0,40}[a-z0-9])?$")


class ConfigError(Exception):
    """One or more problems in a config file; ``problems`` are ``FILE:LINE: key: message``."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)


@dataclass(frozen=True)
class MailboxConfig:
    """One ``[[companies.users.mailboxes]]`` block: a mailbox of the user synced over IMAP
    (``mta/imapsync``). Provider presets and secrets are checked by the sync itself
    (``mta.imapsync.presets.check_mailboxes``, also run by ``dealmail check-config``), so
    ``line`` keeps where the block is, for ``FILE:LINE`` messages."""

    provider: str = "imap"
    host: str = ""
    port: int = 0  # 0: the preset's (993 for implicit TLS, 143 for STARTTLS)
    tls: str = ""  # implicit | starttls; "": the preset's
    ca_file: str = ""
    username: str = ""
    password_file: str = ""
    password_env: str = ""
    oauth2_refresh_token_file: str = ""
    oauth2_client_id: str = ""
    oauth2_client_secret_file: str = ""
    oauth2_token_url: str = ""
    folders: tuple[str, ...] = ()
    since_days: int = 30
    sent_folder: str = ""
    append_sent: bool = True
    max_message_size: int = 0  # 0: limits.message_size
    key: str = ""  # companies[i].users[j].mailboxes[k]
    line: int = 0


@dataclass(frozen=True)
class User:
    address: str
    company: str
    alternates: tuple[str, ...] = ()
    name: str = ""
    role: str = "user"
    default_visibility: str = "shared"
    auto_link_deals: bool = True
    language: str = "en"
    timezone: str = "UTC"
    password_hash: str = ""
    digest: str = "daily"
    confirm_choices: bool = True
    #: Mailboxes synced over IMAP (``mta/imapsync``).
    mailboxes: tuple[MailboxConfig, ...] = ()
    #: Addresses and domains whose mail is never tracked for this user, whatever the source
    #: (added to the user's own ignore list, ``dealmail emails ignore``).
    never_track: tuple[str, ...] = ()

    @property
    def addresses(self) -> tuple[str, ...]:
        return (self.address, *self.alternates)


@dataclass(frozen=True)
class Company:
    slug: str
    name: str
    internal_domains: tuple[str, ...]
    users: tuple[User, ...]
    min_verification: str = "strong"
    accept_levels: tuple[str, ...] = ()
    on_unverified: str = "reject"

    def user(self, address: str) -> User | None:
        for u in self.users:
            if address in u.addresses:
                return u
        return None


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class ServerConfig:
    """``[server]``: names and logging."""

    mail_domain: str = "dealmail.localhost"
    hostname: str = "dealmail.localhost"
    log_level: str = "info"
    log_file: str = ""
    demo_data: str = ""
    #: ``text`` or ``json`` (one object per line, for log shippers).
    log_format: str = "text"
    #: Where the running server writes what ``dealmail status`` reads (listeners, workers).
    status_file: str = "var/dealmail.status.json"


@dataclass(frozen=True)
class DatabaseConfig:
    """``[database]``."""

    url: str = "sqlite:///var/dealmail.db"


@dataclass(frozen=True)
class ListenersConfig:
    """``[listeners]``: where dealmail listens, and per-connection limits."""

    inbound: str = "127.0.0.1:2525"
    submission: str = "127.0.0.1:2587"
    submissions: str = ""
    #: LMTP behind the company's MTA (mta/lmtp.py): ``HOST:PORT`` or ``unix:PATH``; empty: off.
    lmtp: str = ""
    max_connections: int = 200
    workers: int = 1
    command_timeout: float = 300.0
    data_timeout: float = 600.0
    #: Commands a session may send without completing a transaction (accepted RCPTs not
    #: counted), like Postfix's smtpd_junk_command_limit; NOOP, RSET, HELP, VRFY and EXPN
    #: never move the idle deadline, so they cannot keep a session alive.
    max_commands: int = 100
    #: Seconds a session may last in all; 421 4.4.2 then (never while its message is
    #: being answered).
    session_lifetime: float = 1800.0
    #: Bytes per second a client must send during DATA, measured over each
    #: data_rate_window seconds (Postfix's smtpd_min_data_rate); slower: 421 4.4.2.
    min_data_rate: int = 500
    data_rate_window: float = 30.0
    #: Seconds a stop (SIGTERM) waits for messages being received and deliveries in flight
    #: before it closes what is left with 421 4.3.2.
    stop_timeout: float = 60.0

    #: HOST:PORT of the Prometheus metrics endpoint (``/metrics``); empty: none.
    metrics: str = ""


@dataclass(frozen=True)
class ClientsConfig:
    """``[clients]``: limits per client address (an IPv6 client: its /64), shared by every
    worker process (mta/anvil.py), like Postfix's anvil."""

    max_connections: int = 20
    connection_rate: int = 60
    message_rate: int = 300
    rate_window: float = 60.0
    exempt_networks: tuple[Network, ...] = ()


@dataclass(frozen=True)
class LmtpConfig:
    """``[lmtp]``: dealmail behind the company's Postfix (mta/lmtp.py, mta/postfix.py)."""

    #: Clients whose XFORWARD attributes (the original client) are believed; ``unix`` stands
    #: for connections on a UNIX socket listener.
    xforward_hosts: tuple[Network | str, ...] = ()
    #: Simultaneous LMTP connections; the next one is told 421 (Postfix defers, never bounces).
    max_connections: int = 50
    #: Permissions of a ``unix:PATH`` listener's socket.
    socket_mode: int = 0o660
    #: What ``dealmail postfix-config`` generates: sender_bcc_maps / recipient_bcc_maps.
    capture_sent: bool = True
    capture_received: bool = True
    #: The name of the Postfix transport (master.cf service) that delivers to dealmail.
    transport_name: str = "dealmail"

    def xforward_allowed(self, peer: str) -> bool:
        """Whether a client at ``peer`` (an IP address, or "" on a UNIX socket) may send
        XFORWARD."""
        if not peer:
            return "unix" in self.xforward_hosts
        try:
            addr = ipaddress.ip_address(peer)
        except ValueError:
            return False
        return any(not isinstance(net, str) and addr in net for net in self.xforward_hosts)


@dataclass(frozen=True)
class LimitsConfig:
    """``[limits]``: per-message limits."""

    message_size: int = 25 * 1024 * 1024
    max_recipients: int = 100
    #: Longest line of a message accepted in DATA, in bytes without the CRLF. RFC 5322 §2.1.1
    #: says 998, but real mail (single-line base64, generated HTML) breaks it and Postfix
    #: accepts it; the relay re-encodes such parts before sending them on.
    line_length: int = 65536
    #: MIME structure caps, checked on the raw bytes before any recursive parse: nesting of
    #: multipart and message/* entities, parts in all, header fields in one header block.
    mime_depth: int = 50
    mime_parts: int = 1000
    header_fields: int = 1000


@dataclass(frozen=True)
class OutboxConfig:
    """``[outbox]``: how dealmail delivers what it sends (mta/relay/worker.py)."""

    smarthost: str = ""  # HOST:PORT, or "" for direct MX delivery
    smarthost_tls: str = "required"
    smarthost_username: str = ""
    smarthost_password: str = ""
    retry_schedule: str = "5m,10m,20m,40m,1h*200"
    give_up_after_hours: float = 120.0
    lease_seconds: int = 600
    poll_seconds: float = 5.0


@dataclass(frozen=True)
class TlsConfig:
    """``[tls]``: the certificate of the submission listeners (empty: self-signed)."""

    cert_file: str = ""
    key_file: str = ""


@dataclass(frozen=True)
class RelayConfig:
    """``[relay]``: the authenticated relay (mta/relay/submission.py)."""

    bare_newlines: str = "normalize"
    auth_max_failures: int = 5
    auth_window_seconds: float = 900.0
    auth_lockout_seconds: float = 900.0
    auth_failure_delay: float = 1.0
    #: Failed logins from one client address, whatever the accounts, before that address is
    #: refused (credential stuffing); per account and address it is auth_max_failures.
    auth_client_max_failures: int = 20
    #: Cap of the delay an account with recent failures puts before each of its logins.
    auth_max_delay: float = 10.0
    dkim: tuple[tuple[str, str, str], ...] = ()  # (domain, selector, key file)


@dataclass(frozen=True)
class ImapConfig:
    """``[imap]``: how mailboxes are synced (``mta/imapsync``); the mailboxes themselves are
    configured per user."""

    enabled: bool = True
    #: Seconds between checks of a mailbox without IDLE, and of the folders not watched by
    #: IDLE (a mailbox watches its first folder, INBOX by default).
    poll_seconds: float = 120.0
    #: Longest IDLE before it is renewed (RFC 2177 asks for less than 29 minutes).
    idle_seconds: float = 1500.0
    #: Messages and bytes fetched per round trip (and committed per transaction).
    chunk_messages: int = 100
    chunk_bytes: int = 16 * 1024 * 1024
    #: Back-off after a failure: the first delay, doubled each time up to the maximum,
    #: with up to 20% random jitter.
    retry_first_seconds: float = 30.0
    retry_max_seconds: float = 3600.0
    #: One process syncs an account at a time: it holds a lease this long, renewed as it works.
    lease_seconds: float = 120.0
    #: Seconds to wait for a server's answer before the connection counts as dead.
    timeout_seconds: float = 120.0


@dataclass(frozen=True)
class PolicyConfig:
    """``[policy]``: linking rules and what sender verification trusts (mta/senderauth.py)."""

    trusted_networks: tuple[Network, ...] = ()
    create_unknown_persons: bool = True
    freemail_domains: tuple[str, ...] = DEFAULT_FREEMAIL
    thread_window_days: int = 30
    choice_token_days: int = 14
    choice_batch_minutes: int = 5
    choice_questions_per_hour: int = 6
    authserv_id: str = ""
    trusted_authserv_ids: tuple[str, ...] = ()
    trusted_arc_sealers: tuple[str, ...] = ()
    #: When non-empty, upstream A-R headers are honoured only from clients in these networks
    #: (the border MTAs). Empty means any client: then a sender that reaches us directly,
    #: bypassing the border, can put a forged A-R above every Received.
    upstream_networks: tuple[Network, ...] = ()
    check_spf: bool = True
    #: Per DNS query; the injected resolver enforces it.
    dns_timeout: float = 5.0
    #: RFC 8301 §3.2 requires at least 1024 bits for a DKIM RSA key.
    min_rsa_bits: int = 1024


@dataclass(frozen=True)
class Config:
    path: Path
    server: ServerConfig = field(default_factory=ServerConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    listeners: ListenersConfig = field(default_factory=ListenersConfig)
    clients: ClientsConfig = field(default_factory=ClientsConfig)
    lmtp: LmtpConfig = field(default_factory=LmtpConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    outbox: OutboxConfig = field(default_factory=OutboxConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    relay: RelayConfig = field(default_factory=RelayConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    imap: ImapConfig = field(default_factory=ImapConfig)
    companies: tuple[Company, ...] = ()
    # Derived index: normalised address -> (company slug, user address).
    user_index: Mapping[str, tuple[str, str]] = field(default_factory=dict)

    @property
    def mail_domain(self) -> str:
        """dealmail's own mail domain (``server.mail_domain``), asked for everywhere."""
        return self.server.mail_domain

    @property
    def hostname(self) -> str:
        """The name dealmail gives itself in SMTP and headers (``server.hostname``)."""
        return self.server.hostname

    def company(self, slug: str) -> Company | None:
        for c in self.companies:
            if c.slug == slug:
                return c
        return None

    def find_user(self, address: str) -> tuple[Company, User] | None:
        hit = self.user_index.get(address)
        if hit is None:
            return None
        company = self.company(hit[0])
        assert company is not None
        user = company.user(hit[1])
        assert user is not None
        return company, user

    def is_trusted(self, ip: str) -> bool:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(addr in net for net in self.policy.trusted_networks)

    def describe(self, address_forms: Sequence[tuple[str, str]] = ()) -> str:
        """The effective configuration as ``dealmail check-config`` prints it;
        ``address_forms`` are the kinds of address each company serves, as (form with
        ``{slug}`` and ``{domain}``, purpose)."""
        lines = [
            f"config: {self.path}",
            f"mail domain: {self.mail_domain}",
            f"database: {self.database.url}",
            f"inbound: {self.listeners.inbound}   submission: {self.listeners.submission}"
            + (f"   submissions: {self.listeners.submissions}"
               if self.listeners.submissions else "")
            + (f"   metrics: {self.listeners.metrics}" if self.listeners.metrics else ""),
            f"message size limit: {self.limits.message_size} bytes; "
            f"max recipients: {self.limits.max_recipients}",
            "trusted networks: " + (", ".join(map(str, self.policy.trusted_networks))
                                    or "(none)"),
            *self._describe_delivery(),
        ]
        for c in self.companies:
            lines.append("")
            lines.append(f"company {c.slug} ({c.name}); internal domains: "
                         + ", ".join(c.internal_domains))
            for form, purpose in address_forms:
                address = form.format(slug=c.slug, domain=self.mail_domain)
                lines.append(f"  serves: {address}  ({purpose})")
            accepted = ", ".join(c.accept_levels) or "-"
            lines.append(f"  sender verification: minimum {c.min_verification}; also accepted: "
                         f"{accepted}; below it: {c.on_unverified}")
            for u in c.users:
                lines.append(
                    f"  user {u.address} ({u.role}; default {u.default_visibility}; "
                    f"auto deal linking {'on' if u.auto_link_deals else 'off'}; {u.language}; "
                    f"{u.timezone}; relay password {'set' if u.password_hash else 'not set'})"
                )
                lines.append("    may send as: " + ", ".join(u.addresses))
        return "\n".join(lines)


    def _describe_delivery(self) -> list[str]:
        """The effective outbox and DKIM settings, secrets masked (check-config)."""
        o = self.outbox
        route = (f"smarthost {o.smarthost} (TLS {o.smarthost_tls})" if o.smarthost
                 else "direct to each domain's MX hosts (port 25, opportunistic TLS)")
        login = (f"; login {o.smarthost_username} / password ********"
                 if o.smarthost_username else "; no login")
        lines = [f"outbox: {route}{login}",
                 f"  retries: {o.retry_schedule}; give up after {o.give_up_after_hours:g} h; "
                 f"lease {o.lease_seconds} s; poll every {o.poll_seconds:g} s"]
        if self.tls.cert_file:
            lines.append(f"tls: certificate {self.tls.cert_file}, key {self.tls.key_file}")
        else:
            lines.append("tls: self-signed certificate under var/tls/ (created on first start)")
        if not self.relay.dkim:
            lines.append("dkim: relayed mail is not signed")
        for domain, selector, key_file in self.relay.dkim:
            lines.append(f"dkim: {domain} signed with selector {selector} "
                         f"(key {key_file}; publish {selector}._domainkey.{domain})")
        return lines


#: Settings read only when a listener or the store is built: a reload (SIGHUP) cannot apply
#: them; the server names the ones that changed ("needs a restart: ...").
RESTART_ONLY: tuple[tuple[str, str], ...] = (
    ("database", "url"), ("listeners", "inbound"), ("listeners", "submission"),
    ("listeners", "submissions"), ("listeners", "metrics"), ("listeners", "workers"),
    ("listeners", "max_connections"), ("listeners", "command_timeout"),
    ("listeners", "data_timeout"), ("listeners", "lmtp"), ("lmtp", "max_connections"),
    ("lmtp", "socket_mode"), ("server", "hostname"), ("server", "status_file"),
    # Sizes each session's stream reader when the listener is built (mta/server.py).
    ("limits", "line_length"),
)


def needs_restart(old: Config, new: Config) -> list[str]:
    """The ``section.key`` names of :data:`RESTART_ONLY` settings that differ."""
    return [f"{section}.{key}" for section, key in RESTART_ONLY
            if getattr(getattr(old, section), key) != getattr(getattr(new, section), key)]


def check_files(config: Config, base: Path) -> list[str]:
    """Files the config names that the server could not read (relative paths from ``base``,
    the server's working directory), as ``FILE:LINE: key: message``: the TLS certificate and
    key, the DKIM keys, the log file's folder. ``check-config``, start-up and reload ask."""
    try:
        text = config.path.read_text(encoding="utf-8")
    except OSError:
        text = ""
    p = _Problems(config.path, text)

    def readable(key: str, name: str) -> None:
        path = Path(name) if Path(name).is_absolute() else base / name
        try:
            with open(path, "rb") as f:
                f.read(1)
        except OSError as exc:
            p.add(key, f"cannot read {name}: {exc.strerror}")

    if config.tls.cert_file:
        readable("tls.cert_file", config.tls.cert_file)
        readable("tls.key_file", config.tls.key_file)
    for i, (_domain, _selector, key_file) in enumerate(config.relay.dkim):
        readable(f"relay.dkim[{i}].key_file", key_file)
    if config.server.log_file:
        folder = (base / config.server.log_file).parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            p.add("server.log_file", f"cannot write into {folder}")
    return p.in_file_order()


# --------------------------------------------------------------------------- line index


def _key_lines(text: str) -> dict[str, int]:
    """Map dotted key paths (``companies[0].users[1].address``) to their line numbers.

    tomllib gives no positions, so we follow the table headers ourselves; this covers the
    forms the example uses (tables, arrays of tables, ``key = value``)."""
    lines: dict[str, int] = {}
    counters: dict[str, int] = {}
    prefix = ""
    header_re = re.compile(r"^\s*(\[\[?)\s*([A-Za-z0-9_.\-\"]+)\s*\]\]?")
    key_re = re.compile(r"^\s*([A-Za-z0-9_\-\"]+(?:\s*\.\s*[A-Za-z0-9_\-\"]+)*)\s*=")
    for lineno, line in enumerate(text.splitlines(), start=1):
        m = header_re.match(line)
        if m:
            parts = [p.strip('"') for p in m.group(2).split(".")]
            # Resolve the path: each earlier part refers to the latest element of its array.
            path = ""
            for i, part in enumerate(parts):
                base = f"{path}.{part}" if path else part
                is_last = i == len(parts) - 1
                if is_last and m.group(1) == "[[":
                    idx = counters.get(base, -1) + 1
                    counters[base] = idx
                    # A nested array's key includes its parent's index, so it restarts
                    # by itself for each new parent element.
                    path = f"{base}[{idx}]"
                elif base in counters:
                    path = f"{base}[{counters[base]}]"
                else:
                    path = base
            prefix = path
            lines.setdefault(prefix, lineno)
            continue
        m = key_re.match(line)
        if m and not line.lstrip().startswith("#"):
            key = ".".join(p.strip().strip('"') for p in m.group(1).split("."))
            lines.setdefault(f"{prefix}.{key}" if prefix else key, lineno)
    return lines


class _Problems:
    def __init__(self, path: Path, text: str) -> None:
        self.path = path
        self.lines = _key_lines(text)
        self.items: list[str] = []

    def line_of(self, key: str) -> int:
        """The line of ``key``, else of its nearest enclosing key. An array element
        (``policy.trusted_networks[0]``) is on its array's line, not on the table header's."""
        probe = key
        while probe:
            if probe in self.lines:
                return self.lines[probe]
            if probe.endswith("]") and "[" in probe:
                probe = probe[:probe.rindex("[")]
            else:
                probe = probe.rsplit(".", 1)[0] if "." in probe else ""
        return 1

    def add(self, key: str, message: str) -> None:
        self.items.append(f"{self.path}:{self.line_of(key)}: {key}: {message}")

    def in_file_order(self) -> list[str]:
        """The problems sorted by line (checks across companies find some late)."""
        prefix = len(f"{self.path}:")
        return sorted(self.items, key=lambda item: int(item[prefix:].split(":", 1)[0]))


# --------------------------------------------------------------------------- schema


_SERVER_KEYS = {"mail_domain": str, "hostname": str, "log_level": str, "log_file": str,
                "demo_data": str, "log_format": str, "status_file": str}
_DATABASE_KEYS = {"url": str}
_LISTENER_KEYS = {"inbound": str, "submission": str, "submissions": str, "lmtp": str,
                  "max_connections": int,
                  "workers": int, "command_timeout": (int, float),
                  "data_timeout": (int, float), "max_commands": int,
                  "session_lifetime": (int, float), "min_data_rate": int,
                  "data_rate_window": (int, float), "stop_timeout": (int, float),
                  "metrics": str}
_CLIENT_KEYS = {"max_connections": int, "connection_rate": int, "message_rate": int,
                "rate_window": (int, float), "exempt_networks": list}
_LIMIT_KEYS = {"message_size": int, "max_recipients": int, "line_length": int,
               "mime_depth": int, "mime_parts": int, "header_fields": int}
_LMTP_KEYS = {"xforward_hosts": list, "max_connections": int, "socket_mode": str,
              "capture_sent": bool, "capture_received": bool, "transport_name": str}
_OUTBOX_KEYS = {"smarthost": str, "smarthost_tls": str, "smarthost_username": str,
                "smarthost_password": str, "retry_schedule": str,
                "give_up_after_hours": (int, float), "lease_seconds": int,
                "poll_seconds": (int, float)}
_POLICY_KEYS = {"trusted_networks": list, "create_unknown_persons": bool,
                "freemail_domains": list, "thread_window_days": int, "choice_token_days": int,
                "choice_batch_minutes": int, "choice_questions_per_hour": int,
                "authserv_id": str, "trusted_authserv_ids": list, "trusted_arc_sealers": list,
                "upstream_networks": list, "check_spf": bool, "dns_timeout": (int, float),
                "min_rsa_bits": int}
_COMPANY_KEYS = {"slug": str, "name": str, "internal_domains": list, "users": list,
                 "sender_verification": dict}
_VERIFY_KEYS = {"minimum": str, "accept": list, "on_unverified": str}
_USER_KEYS = {"address": str, "alternates": list, "name": str, "role": str,
              "default_visibility": str, "auto_link_deals": bool, "language": str,
              "timezone": str, "password_hash": str, "digest": str, "confirm_choices": bool,
              "mailboxes": list, "never_track": list}
_MAILBOX_KEYS = {"provider": str, "host": str, "port": int, "tls": str, "ca_file": str,
                 "username": str, "password_file": str, "password_env": str,
                 "oauth2_refresh_token_file": str, "oauth2_client_id": str,
                 "oauth2_client_secret_file": str, "oauth2_token_url": str, "folders": list,
                 "since_days": int, "sent_folder": str, "append_sent": bool,
                 "max_message_size": int}
_IMAP_KEYS = {"enabled": bool, "poll_seconds": (int, float), "idle_seconds": (int, float),
              "chunk_messages": int, "chunk_bytes": int, "retry_first_seconds": (int, float),
              "retry_max_seconds": (int, float), "lease_seconds": (int, float),
              "timeout_seconds": (int, float)}


def _type_name(t: Any) -> str:
    if isinstance(t, tuple):
        return " or ".join(x.__name__ for x in t)
    return {"str": "a string", "int": "an integer", "bool": "true or false", "list": "a list",
            "dict": "a table"}.get(t.__name__, t.__name__)


def _check_table(p: _Problems, where: str, table: Any, schema: Mapping[str, Any]) -> dict[str, Any]:
    """Return the known, well-typed keys of ``table``; report unknown keys and bad types."""
    if not isinstance(table, dict):
        p.add(where, "must be a table")
        return {}
    good: dict[str, Any] = {}
    for key, value in table.items():
        path = f"{where}.{key}" if where else key
        if key not in schema:
            p.add(path, "unknown key")
            continue
        expected = schema[key]
        if isinstance(value, bool) and expected in (int, (int, float)):
            p.add(path, f"must be {_type_name(expected)}, not true/false")
            continue
        if not isinstance(value, expected):
            p.add(path, f"must be {_type_name(expected)}")
            continue
        good[key] = value
    return good


def _set_override(data: dict[str, Any], assignment: str) -> None:
    key, sep, raw = assignment.partition("=")
    if not sep or not key.strip():
        raise ConfigError([f"--set {assignment}: expected section.key=value"])
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word is taken as a string, like Postfix's -o
    node = data
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError([f"--set {assignment}: {part} is not a table"])
    node[parts[-1]] = value


def find_config_path(explicit: str | None, root: Path | None = None) -> tuple[Path, bool]:
    """The config to use: ``--config``, else ``$DEALMAIL_CONFIG``, else ``conf/dealmail.toml``;
    on a fresh clone without that file, the example. Returns (path, is_example_fallback)."""
    if explicit:
        return Path(explicit), False
    env = os.environ.get("DEALMAIL_CONFIG")
    if env:
        return Path(env), False
    base = root or Path.cwd()
    main = base / "conf" / "dealmail.toml"
    if main.exists():
        return main, False
    return base / "conf" / "dealmail.example.toml", True


def load_config(path: Path, overrides: Iterable[str] = ()) -> Config:
    """Read, override and validate a config file. Raises :class:`ConfigError` listing every
    problem found."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}:1: (file): cannot read: {exc.strerror}"]) from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        lineno = getattr(exc, "lineno", None) or _toml_error_line(str(exc))
        raise ConfigError([f"{path}:{lineno}: (syntax): {exc}"]) from exc
    for assignment in overrides:
        _set_override(data, assignment)
    return _validate(path, text, data)


def _toml_error_line(message: str) -> int:
    m = re.search(r"line (\d+)", message)
    return int(m.group(1)) if m else 1


def _address(p: _Problems, key: str, value: Any) -> str | None:
    if not isinstance(value, str):
        p.add(key, "must be an address string")
        return None
    try:
        return normalize_address(value)
    except AddressError as exc:
        p.add(key, f"malformed address {value!r} ({exc})")
        return None


def _check_clashes(p: _Problems, listeners: dict[str, Any]) -> None:
    """Two listeners on one port of one address (or one of them on the wildcard address)
    would fail at start-up with a bind error; say so now, naming both keys."""
    seen: list[tuple[str, str, int]] = []
    for key in ("inbound", "submission", "submissions", "metrics", "lmtp"):
        value = listeners.get(key, getattr(ListenersConfig, key))
        if not value or value.startswith("unix:") or not re.match(r"^.+:\d{1,5}$", value):
            continue
        host, _, port_text = value.rpartition(":")
        host, port = host.strip("[]").lower(), int(port_text)
        if port == 0:  # a free port each: never a clash
            continue
        for other, other_host, other_port in seen:
            if port == other_port and (host == other_host
                                       or {host, other_host} & {"0.0.0.0", "::", ""}):
                p.add(f"listeners.{key}", f"{value} clashes with listeners.{other} "
                      f"({listeners.get(other, getattr(ListenersConfig, other))})")
        seen.append((key, host, port))


def _validate_outbox(p: _Problems, outbox: dict[str, Any], sec: dict[str, Any]) -> None:
    from dealmail.schedules import parse_schedule

    host = outbox.get("smarthost", "")
    if host and not re.match(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.\-]+):\d{1,5}$", host):
        p.add("outbox.smarthost", "must be HOST:PORT, or empty for direct MX delivery")
    elif host and not 1 <= int(host.rpartition(":")[2]) <= 65535:
        p.add("outbox.smarthost", f"port {host.rpartition(':')[2]} is not a TCP port (1-65535)")
    tls = outbox.get("smarthost_tls", "required")
    if tls not in ("required", "implicit", "opportunistic"):
        p.add("outbox.smarthost_tls", "must be required, implicit or opportunistic")
    if bool(outbox.get("smarthost_username")) != bool(outbox.get("smarthost_password")):
        p.add("outbox.smarthost_username", "smarthost_username and smarthost_password go "
              "together")
    schedule = outbox.get("retry_schedule")
    if schedule is not None:
        try:
            parse_schedule(schedule)
        except ValueError as exc:
            p.add("outbox.retry_schedule", str(exc))
    for key in ("give_up_after_hours", "lease_seconds", "poll_seconds"):
        if key in outbox and outbox[key] <= 0:
            p.add(f"outbox.{key}", "must be positive")
    for key, value in outbox.items():
        sec[key] = float(value) if key in ("give_up_after_hours",
                                                          "poll_seconds") else value


def _validate_imap(p: _Problems, imap: dict[str, Any], sec: dict[str, Any]) -> None:
    for key, value in imap.items():
        if key != "enabled" and value <= 0:
            p.add(f"imap.{key}", "must be positive")
        sec[key] = float(value) if isinstance(_IMAP_KEYS[key], tuple) else value
    if imap.get("idle_seconds", 0) > 1740:
        p.add("imap.idle_seconds", "must be at most 1740 (RFC 2177: renew IDLE within "
              "29 minutes)")


def _mailboxes(p: _Problems, uwhere: str, raw: list[Any]) -> list[MailboxConfig]:
    """The user's mailbox blocks, checked for shape here; provider presets and secrets are
    checked by ``mta.imapsync.presets.check_mailboxes`` (it knows the providers)."""
    out = []
    for i, block in enumerate(raw):
        where = f"{uwhere}.mailboxes[{i}]"
        b = _check_table(p, where, block, _MAILBOX_KEYS)
        tls = b.get("tls", "")
        if tls not in ("", "implicit", "starttls"):
            p.add(f"{where}.tls", "must be implicit or starttls")
        port = b.get("port", 0)
        if not 0 <= port <= 65535:
            p.add(f"{where}.port", "must be a port number")
        if not b.get("username"):
            p.add(where, "missing key: username")
        secrets = [k for k in ("password_file", "password_env", "oauth2_refresh_token_file")
                   if b.get(k)]
        if len(secrets) != 1:
            p.add(where, "needs exactly one of password_file, password_env or "
                  "oauth2_refresh_token_file (a password never sits in this file)")
        if b.get("since_days", 30) < 0:
            p.add(f"{where}.since_days", "must be 0 (all history) or more")
        if b.get("max_message_size", 0) < 0:
            p.add(f"{where}.max_message_size", "must be 0 (limits.message_size) or more")
        folders = tuple(str(f) for f in b.get("folders", []))
        if any(not f or "\r" in f or "\n" in f for f in folders):
            p.add(f"{where}.folders", "folder names must be non-empty single lines")
        values = {k: v for k, v in b.items() if k != "folders"}
        out.append(MailboxConfig(**values, folders=folders, key=where,
                                 line=p.line_of(where)))
    return out


def _never_track(p: _Problems, uwhere: str, raw: list[Any]) -> tuple[str, ...]:
    """Addresses (``x@y``) and domains (``y`` or ``@y``) normalised."""
    out = []
    for i, value in enumerate(raw):
        key = f"{uwhere}.never_track[{i}]"
        if not isinstance(value, str):
            p.add(key, "must be an address or a domain")
            continue
        try:
            out.append(normalize_address(value) if "@" in value
                       else normalize_domain(value.lstrip("@.")))
        except AddressError as exc:
            p.add(key, f"{value!r}: {exc}")
    return tuple(out)


def _networks(p: _Problems, key: str, values: Iterable[Any]) -> tuple[Network, ...]:
    """The CIDR networks of the list at ``key``, each bad item reported on its own."""
    nets = []
    for i, value in enumerate(values):
        try:
            nets.append(ipaddress.ip_network(str(value), strict=False))
        except ValueError:
            p.add(f"{key}[{i}]", f"{value!r} is not a CIDR network")
    return tuple(nets)


def _validate_lmtp(p: _Problems, lmtp: dict[str, Any], sec: dict[str, Any]) -> None:
    hosts: list[Network | str] = []
    for i, value in enumerate(lmtp.get("xforward_hosts", [])):
        if value == "unix":
            hosts.append("unix")
            continue
        try:
            hosts.append(ipaddress.ip_network(str(value), strict=False))
        except ValueError:
            p.add(f"lmtp.xforward_hosts[{i}]", f"{value!r} is not a CIDR network nor \"unix\"")
    if "xforward_hosts" in lmtp:
        sec["xforward_hosts"] = tuple(hosts)
    if "max_connections" in lmtp:
        if lmtp["max_connections"] < 1:
            p.add("lmtp.max_connections", "must be at least 1")
        sec["max_connections"] = lmtp["max_connections"]
    if "socket_mode" in lmtp:
        mode = lmtp["socket_mode"]
        if not re.match(r"^0?[0-7]{3}$", mode):
            p.add("lmtp.socket_mode", "must be an octal mode such as \"0660\"")
        else:
            sec["socket_mode"] = int(mode, 8)
    if "transport_name" in lmtp:
        name = lmtp["transport_name"]
        if not re.match(r"^[a-z][a-z0-9_-]{0,30}$", name):
            p.add("lmtp.transport_name", "must be a Postfix service name (a-z, 0-9, - and _)")
        sec["transport_name"] = name
    for key in ("capture_sent", "capture_received"):
        if key in lmtp:
            sec[key] = lmtp[key]


_TLS_KEYS = {"cert_file": str, "key_file": str}
_RELAY_KEYS = {"bare_newlines": str, "auth_max_failures": int,
               "auth_window_seconds": (int, float), "auth_lockout_seconds": (int, float),
               "auth_failure_delay": (int, float), "auth_client_max_failures": int,
               "auth_max_delay": (int, float), "dkim": list}
_DKIM_KEYS = {"domain": str, "selector": str, "key_file": str}


def _validate_relay(p: _Problems, tls: dict[str, Any], relay: dict[str, Any],
                    tls_sec: dict[str, Any], relay_sec: dict[str, Any]) -> None:
    if bool(tls.get("cert_file")) != bool(tls.get("key_file")):
        p.add("tls.cert_file", "cert_file and key_file go together (both empty: a "
              "self-signed certificate is created under var/tls/)")
    tls_sec["cert_file"] = tls.get("cert_file", "")
    tls_sec["key_file"] = tls.get("key_file", "")
    policy = relay.get("bare_newlines", "normalize")
    if policy not in ("normalize", "reject"):
        p.add("relay.bare_newlines", "must be normalize or reject")
    relay_sec["bare_newlines"] = policy
    for key in ("auth_max_failures", "auth_client_max_failures"):
        if relay.get(key, 5) < 1:
            p.add(f"relay.{key}", "must be at least 1")
    for key in ("auth_window_seconds", "auth_lockout_seconds"):
        if relay.get(key, 1) <= 0:
            p.add(f"relay.{key}", "must be positive (seconds)")
    for key in ("auth_failure_delay", "auth_max_delay"):
        if relay.get(key, 0) < 0:
            p.add(f"relay.{key}", "must not be negative (seconds)")
    for key in ("auth_max_failures", "auth_window_seconds", "auth_lockout_seconds",
                "auth_failure_delay", "auth_client_max_failures", "auth_max_delay"):
        if key in relay:
            relay_sec[key] = (relay[key] if key in ("auth_max_failures",
                                                    "auth_client_max_failures")
                              else float(relay[key]))
    keys: list[tuple[str, str, str]] = []
    for i, raw in enumerate(relay.get("dkim", [])):
        entry = _check_table(p, f"relay.dkim[{i}]", raw, _DKIM_KEYS)
        if not all(entry.get(k) for k in _DKIM_KEYS):
            p.add(f"relay.dkim[{i}]", "needs domain, selector and key_file")
            continue
        try:
            domain = normalize_domain(entry["domain"])
        except AddressError as exc:
            p.add(f"relay.dkim[{i}].domain", str(exc))
            continue
        keys.append((domain, entry["selector"], entry["key_file"]))
    relay_sec["dkim"] = tuple(keys)


def _validate_clients(p: _Problems, clients: dict[str, Any], sec: dict[str, Any]) -> None:
    for key in ("max_connections", "connection_rate", "message_rate"):
        if key in clients:
            if clients[key] < 0:
                p.add(f"clients.{key}", "must not be negative (0 turns the limit off)")
            sec[key] = clients[key]
    if "rate_window" in clients:
        if clients["rate_window"] <= 0:
            p.add("clients.rate_window", "must be positive (seconds)")
        sec["rate_window"] = float(clients["rate_window"])
    sec["exempt_networks"] = _networks(p, "clients.exempt_networks",
                                       clients.get("exempt_networks", []))


def _validate(path: Path, text: str, data: dict[str, Any]) -> Config:
    p = _Problems(path, text)
    top_schema = {"server": dict, "database": dict, "listeners": dict, "lmtp": dict,
                  "limits": dict,
                  "outbox": dict, "tls": dict, "relay": dict,
                  "policy": dict, "imap": dict, "companies": list, "clients": dict}
    top = _check_table(p, "", data, top_schema)
    server = _check_table(p, "server", top.get("server", {}), _SERVER_KEYS)
    database = _check_table(p, "database", top.get("database", {}), _DATABASE_KEYS)
    listeners = _check_table(p, "listeners", top.get("listeners", {}), _LISTENER_KEYS)
    limits = _check_table(p, "limits", top.get("limits", {}), _LIMIT_KEYS)
    outbox = _check_table(p, "outbox", top.get("outbox", {}), _OUTBOX_KEYS)
    policy = _check_table(p, "policy", top.get("policy", {}), _POLICY_KEYS)
    # One dict of validated values per section, turned into its frozen dataclass at the end.
    sec: dict[str, dict[str, Any]] = {name: {} for name in (
        "server", "database", "listeners", "lmtp", "limits", "outbox", "tls", "relay",
        "policy", "imap", "clients")}
    _validate_imap(p, _check_table(p, "imap", top.get("imap", {}), _IMAP_KEYS), sec["imap"])
    srv, lst, pol = sec["server"], sec["listeners"], sec["policy"]
    _validate_outbox(p, outbox, sec["outbox"])
    _validate_relay(p, _check_table(p, "tls", top.get("tls", {}), _TLS_KEYS),
                    _check_table(p, "relay", top.get("relay", {}), _RELAY_KEYS),
                    sec["tls"], sec["relay"])

    mail_domain = server.get("mail_domain", "dealmail.localhost")
    try:
        srv["mail_domain"] = normalize_domain(mail_domain)
    except AddressError as exc:
        p.add("server.mail_domain", str(exc))
        srv["mail_domain"] = "dealmail.localhost"
    srv["hostname"] = server.get("hostname", srv["mail_domain"])
    level = server.get("log_level", "info").lower()
    if level not in ("debug", "info", "warning", "error"):
        p.add("server.log_level", "must be one of debug, info, warning, error")
    srv["log_level"] = level
    srv["log_file"] = server.get("log_file", "")
    srv["demo_data"] = server.get("demo_data", "")
    log_format = server.get("log_format", "text")
    if log_format not in ("text", "json"):
        p.add("server.log_format", "must be text or json")
    srv["log_format"] = log_format
    srv["status_file"] = server.get("status_file", "var/dealmail.status.json")

    url = database.get("url", "sqlite:///var/dealmail.db")
    if not re.match(r"^(sqlite:///.+|sqlite:///:memory:|postgres(ql)?://.+)$", url):
        p.add("database.url", "must be sqlite:///PATH or postgresql://USER@HOST:PORT/DB")
    sec["database"]["url"] = url

    for key in ("inbound", "submission", "submissions", "metrics"):
        if key in listeners:
            value = listeners[key]
            if value and not re.match(r"^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.\-]+):\d{1,5}$", value):
                p.add(f"listeners.{key}", "must be HOST:PORT (an empty string disables it)")
            elif value and not 0 <= int(value.rpartition(":")[2]) <= 65535:
                p.add(f"listeners.{key}", f"port {value.rpartition(':')[2]} is not a TCP port "
                      "(1-65535; 0 picks a free one)")
            lst[key] = value
    if listeners.get("lmtp"):
        value = listeners["lmtp"]
        if value.startswith("unix:"):
            if not value[5:].strip():
                p.add("listeners.lmtp", "unix: needs the socket's path (unix:/run/dealmail/lmtp)")
        elif not re.match(r"^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.\-]+):\d{1,5}$", value):
            p.add("listeners.lmtp", "must be HOST:PORT or unix:PATH (an empty string disables it)")
        elif not 0 <= int(value.rpartition(":")[2]) <= 65535:
            p.add("listeners.lmtp", f"port {value.rpartition(':')[2]} is not a TCP port "
                  "(1-65535; 0 picks a free one)")
    if "lmtp" in listeners:
        lst["lmtp"] = listeners["lmtp"]
    _validate_lmtp(p, _check_table(p, "lmtp", top.get("lmtp", {}), _LMTP_KEYS), sec["lmtp"])
    _check_clashes(p, lst)
    for key in ("max_connections", "workers"):
        if key in listeners:
            if listeners[key] < 1:
                p.add(f"listeners.{key}", "must be at least 1")
            lst[key] = listeners[key]
    if listeners.get("workers", 1) > 64:
        p.add("listeners.workers", "must be at most 64")
    for key in ("command_timeout", "data_timeout", "session_lifetime", "data_rate_window",
                "stop_timeout"):
        if key in listeners:
            if listeners[key] <= 0:
                p.add(f"listeners.{key}", "must be positive (seconds)")
            lst[key] = float(listeners[key])
    for key in ("max_commands", "min_data_rate"):
        if key in listeners:
            if listeners[key] < (1 if key == "max_commands" else 0):
                p.add(f"listeners.{key}", "must be at least 1" if key == "max_commands"
                      else "must not be negative (0 turns the rule off)")
            lst[key] = listeners[key]
    _validate_clients(p, _check_table(p, "clients", top.get("clients", {}), _CLIENT_KEYS),
                      sec["clients"])
    if "message_size" in limits:
        if limits["message_size"] < 1024:
            p.add("limits.message_size", "must be at least 1024 bytes")
        sec["limits"]["message_size"] = limits["message_size"]
    if "max_recipients" in limits:
        if limits["max_recipients"] < 1:
            p.add("limits.max_recipients", "must be at least 1")
        sec["limits"]["max_recipients"] = limits["max_recipients"]
    # (lowest, highest): the MIME depth stays well below Python's recursion limit, which the
    # standard library's parser and generator use one or more frames per level of.
    for key, low, high in (("line_length", 998, 16 * 1024 * 1024), ("mime_depth", 1, 100),
                           ("mime_parts", 1, 1_000_000), ("header_fields", 10, 1_000_000)):
        if key in limits:
            if not low <= limits[key] <= high:
                p.add(f"limits.{key}", f"must be between {low} and {high}")
            sec["limits"][key] = limits[key]

    pol["trusted_networks"] = _networks(p, "policy.trusted_networks",
                                        policy.get("trusted_networks", []))
    pol["upstream_networks"] = _networks(p, "policy.upstream_networks",
                                         policy.get("upstream_networks", []))
    pol["authserv_id"] = policy.get("authserv_id", "") or srv["hostname"]
    for key in ("trusted_authserv_ids", "trusted_arc_sealers"):
        pol[key] = tuple(str(x).strip().lower() for x in policy.get(key, []))
    if "check_spf" in policy:
        pol["check_spf"] = policy["check_spf"]
    if "dns_timeout" in policy:
        if policy["dns_timeout"] <= 0:
            p.add("policy.dns_timeout", "must be positive (seconds)")
        pol["dns_timeout"] = float(policy["dns_timeout"])
    if "min_rsa_bits" in policy:
        if policy["min_rsa_bits"] < 1024:
            p.add("policy.min_rsa_bits", "must be at least 1024 (RFC 8301 section 3.2)")
        pol["min_rsa_bits"] = policy["min_rsa_bits"]
    if "create_unknown_persons" in policy:
        pol["create_unknown_persons"] = policy["create_unknown_persons"]
    if "freemail_domains" in policy:
        doms = []
        for i, value in enumerate(policy["freemail_domains"]):
            try:
                doms.append(normalize_domain(str(value)))
            except AddressError as exc:
                p.add(f"policy.freemail_domains[{i}]", str(exc))
        pol["freemail_domains"] = tuple(doms)
    for key in ("thread_window_days", "choice_token_days"):
        if key in policy:
            if policy[key] < 1:
                p.add(f"policy.{key}", "must be at least 1")
            pol[key] = policy[key]
    if "choice_batch_minutes" in policy:
        if not 0 <= policy["choice_batch_minutes"] <= 1440:
            p.add("policy.choice_batch_minutes", "must be between 0 and 1440 (minutes)")
        pol["choice_batch_minutes"] = policy["choice_batch_minutes"]
    if "choice_questions_per_hour" in policy:
        if policy["choice_questions_per_hour"] < 1:
            p.add("policy.choice_questions_per_hour", "must be at least 1")
        pol["choice_questions_per_hour"] = policy["choice_questions_per_hour"]

    companies: list[Company] = []
    claimed: dict[str, str] = {}  # address -> "companies[i].users[j].key" first claim
    claimed_by: dict[str, tuple[str, bool]] = {}  # address -> (company slug, is a primary)
    domain_owner: dict[str, str] = {}  # internal domain -> first company claiming it
    user_index: dict[str, tuple[str, str]] = {}
    slugs: set[str] = set()
    raw_companies = top.get("companies", [])
    for ci, raw in enumerate(raw_companies):
        where = f"companies[{ci}]"
        c = _check_table(p, where, raw, _COMPANY_KEYS)
        slug = c.get("slug")
        if slug is None:
            p.add(where, "missing key: slug")
            slug = f"company{ci}"
        elif not _SLUG_RE.match(slug) or "+" in slug:
            p.add(f"{where}.slug", f"{slug!r} is not a valid local part "
                  "(lower-case letters, digits, '.', '_' and '-'; no '+')")
        if slug in slugs:
            p.add(f"{where}.slug", f"company {slug!r} is defined twice")
        slugs.add(slug)
        domains: list[str] = []
        for di, d in enumerate(c.get("internal_domains", [])):
            try:
                domains.append(normalize_domain(str(d)))
            except AddressError as exc:
                p.add(f"{where}.internal_domains[{di}]", str(exc))
                continue
            domain_owner.setdefault(domains[-1], slug)
        verify = _check_table(p, f"{where}.sender_verification",
                              c.get("sender_verification", {}), _VERIFY_KEYS)
        minimum = verify.get("minimum", "strong")
        if minimum not in VERIFY_LEVELS:
            p.add(f"{where}.sender_verification.minimum",
                  f"must be one of {', '.join(VERIFY_LEVELS)}")
        accept = tuple(str(x) for x in verify.get("accept", []))
        for ai, level_name in enumerate(accept):
            if level_name not in VERIFY_LEVELS:
                p.add(f"{where}.sender_verification.accept[{ai}]",
                      f"must be one of {', '.join(VERIFY_LEVELS)}")
        on_unverified = verify.get("on_unverified", "reject")
        if on_unverified not in ("reject", "quarantine"):
            p.add(f"{where}.sender_verification.on_unverified", "must be reject or quarantine")
        users: list[User] = []
        for ui, raw_user in enumerate(c.get("users", [])):
            uwhere = f"{where}.users[{ui}]"
            u = _check_table(p, uwhere, raw_user, _USER_KEYS)
            if "address" not in u:
                p.add(uwhere, "missing key: address")
                continue
            primary = _address(p, f"{uwhere}.address", u["address"])
            alternates: list[str] = []
            for ai, alt in enumerate(u.get("alternates", [])):
                a = _address(p, f"{uwhere}.alternates[{ai}]", alt)
                if a:
                    alternates.append(a)
            # A malformed primary still lets the user's other values be checked below, so
            # that every problem of the file is reported in one pass.
            if primary is not None and domains and primary.rpartition("@")[2] not in domains:
                p.add(f"{uwhere}.address",
                      f"{primary} is outside the company's internal domains")
            for key, addr in ([("address", primary)] if primary else []) + [
                (f"alternates[{i}]", a) for i, a in enumerate(alternates)
            ]:
                if addr in claimed:
                    p.add(f"{uwhere}.{key}", f"{addr} is already claimed by {claimed[addr]}")
                elif primary is not None:
                    claimed[addr] = f"{uwhere}.{key}"
                    claimed_by[addr] = (slug, key == "address")
                    user_index[addr] = (slug, primary)
            role = u.get("role", "user")
            if role not in ("admin", "user"):
                p.add(f"{uwhere}.role", "must be admin or user")
            vis = u.get("default_visibility", "shared")
            if vis not in ("shared", "private"):
                p.add(f"{uwhere}.default_visibility", "must be shared or private")
            lang = u.get("language", "en")
            if lang not in ("en", "ja"):
                p.add(f"{uwhere}.language", "must be en or ja")
            tz = u.get("timezone", "UTC")
            try:
                ZoneInfo(tz)
            except (ZoneInfoNotFoundError, ValueError):
                p.add(f"{uwhere}.timezone", f"unknown time zone {tz!r}")
            pw = u.get("password_hash", "")
            if pw and not pw.startswith(("scrypt$", "$argon2")):
                p.add(f"{uwhere}.password_hash",
                      "must be a hash made by `dealmail set-password` (never a plain password)")
            digest = u.get("digest", "daily")
            if digest not in ("daily", "weekly", "off"):
                p.add(f"{uwhere}.digest", "must be daily, weekly or off")
            mailboxes = tuple(_mailboxes(p, uwhere, u.get("mailboxes", [])))
            never_track = _never_track(p, uwhere, u.get("never_track", []))
            if primary is None:
                continue
            users.append(User(
                address=primary, company=slug, alternates=tuple(alternates),
                name=u.get("name", ""), role=role, default_visibility=vis,
                auto_link_deals=u.get("auto_link_deals", True), language=lang, timezone=tz,
                password_hash=pw, digest=digest, confirm_choices=u.get("confirm_choices", True),
                mailboxes=mailboxes, never_track=never_track,
            ))
        companies.append(Company(
            slug=slug, name=c.get("name", slug), internal_domains=tuple(domains),
            users=tuple(users), min_verification=minimum, accept_levels=accept,
            on_unverified=on_unverified,
        ))
    # A company's own addresses (slug@mail_domain...) must not be a user's address.
    for addr, where in claimed.items():
        domain = addr.rpartition("@")[2]
        if domain == srv["mail_domain"]:
            p.add(where, f"{addr} is inside dealmail's own mail domain")
        # An address inside another company's internal domains belongs to that company's
        # people: claiming it would let one tenant send as (and file mail of) another. A
        # primary outside its own company's domains was already reported above.
        owner = domain_owner.get(domain)
        slug, is_primary = claimed_by[addr]
        own_domains = next(c.internal_domains for c in companies if c.slug == slug)
        if owner is not None and owner != slug and not (is_primary and own_domains):
            p.add(where, f"{addr} is inside the internal domain {domain} of company {owner!r}")
    if p.items:
        raise ConfigError(p.in_file_order())
    return Config(
        path=path, server=ServerConfig(**srv), database=DatabaseConfig(**sec["database"]),
        listeners=ListenersConfig(**lst), lmtp=LmtpConfig(**sec["lmtp"]),
        limits=LimitsConfig(**sec["limits"]),
        outbox=OutboxConfig(**sec["outbox"]), tls=TlsConfig(**sec["tls"]),
        relay=RelayConfig(**sec["relay"]), policy=PolicyConfig(**pol),
        clients=ClientsConfig(**sec["clients"]),
        imap=ImapConfig(**sec["imap"]),
        companies=tuple(companies), user_index=user_index)
