"""Provider presets for mailbox sync, and the configuration checks that need them.

A preset gives a provider's IMAP host, port and TLS mode, whether it speaks Gmail's
extensions (``X-GM-EXT-1``: one All Mail folder holds every message, labels instead of
folders), its OAuth2 token endpoint when it offers XOAUTH2, and the names its Sent folder has
when the server does not flag it ``\\Sent`` (RFC 6154). ``provider = "imap"`` and the presets
marked ``custom_host`` (Bluehost, Zimbra: the host is the customer's own) take ``host`` from
the mailbox block.

Hosts are the providers' published IMAP settings. Exchange ActiveSync is not IMAP and is not
supported; Exchange Online and on-premises Exchange are synced through their IMAP service.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from dealmail.config import Config, MailboxConfig, User

__all__ = ["PRESETS", "Preset", "Resolved", "check_mailboxes", "describe_mailboxes", "resolve"]

GOOGLE_TOKEN_URL = "https://oauth2.googleapis.com/token"
MICROSOFT_TOKEN_URL = "https://login.microsoftonline.com/common/oauth2/v2.0/token"

# Sent folder names of servers that do not announce \Sent (localized defaults included).
COMMON_SENT = ("Sent", "Sent Items", "Sent Messages", "Sent Mail", "INBOX.Sent",
               "INBOX/Sent", "Gesendet", "Gesendete Objekte", "Envoyés", "Éléments envoyés",
               "Enviados", "Inviati", "Verzonden", "Отправленные", "已发送", "已發送",
               "送信済み", "送信済みアイテム")


@dataclass(frozen=True)
class Preset:
    name: str
    label: str
    host: str = ""
    port: int = 993
    tls: str = "implicit"
    gmail: bool = False
    token_url: str = ""
    custom_host: bool = False
    sent_names: tuple[str, ...] = COMMON_SENT
    note: str = ""


def _p(name: str, label: str, host: str = "", **kw: object) -> Preset:
    return Preset(name, label, host, **kw)  # type: ignore[arg-type]


_NETEASE = "NetEase requires the IMAP ID command (RFC 2971) before SELECT; sent after login"
PRESETS: dict[str, Preset] = {p.name: p for p in (
    _p("imap", "any IMAP server", custom_host=True),
    _p("gmail", "Gmail / Google Workspace", "imap.gmail.com", gmail=True,
       token_url=GOOGLE_TOKEN_URL, sent_names=("[Gmail]/Sent Mail",)),
    _p("yahoo", "Yahoo Mail", "imap.mail.yahoo.com"),
    _p("outlook", "Outlook.com / Hotmail / Microsoft 365 (Exchange Online over IMAP)",
       "outlook.office365.com", token_url=MICROSOFT_TOKEN_URL,
       sent_names=("Sent Items", "Sent", *COMMON_SENT)),
    _p("icloud", "iCloud Mail", "imap.mail.me.com", sent_names=("Sent Messages", "Sent")),
    _p("aol", "AOL Mail", "imap.aol.com"),
    _p("fastmail", "Fastmail", "imap.fastmail.com"),
    _p("gandi", "Gandi Mail", "mail.gandi.net"),
    _p("gmx", "GMX", "imap.gmx.net"),
    _p("mailru", "Mail.ru", "imap.mail.ru"),
    _p("yandex", "Yandex Mail", "imap.yandex.com"),
    _p("godaddy", "GoDaddy Workspace Email", "imap.secureserver.net"),
    _p("hover", "Hover", "mail.hover.com"),
    _p("namecheap", "Namecheap Private Email", "mail.privateemail.com"),
    _p("bluehost", "Bluehost (your mail server's host)", custom_host=True),
    _p("soverin", "Soverin", "imap.soverin.net"),
    _p("zimbra", "Zimbra (your Zimbra server's host)", custom_host=True),
    _p("123-reg", "123-reg", "imap.123-reg.co.uk"),
    _p("qq", "QQ Mail", "imap.qq.com", sent_names=("Sent Messages", "已发送")),
    _p("aliyun", "Aliyun Mail", "imap.aliyun.com", sent_names=("已发送", "Sent")),
    _p("163", "NetEase 163", "imap.163.com", sent_names=("已发送",), note=_NETEASE),
    _p("126", "NetEase 126", "imap.126.com", sent_names=("已发送",), note=_NETEASE),
    _p("yeah", "NetEase yeah.net", "imap.yeah.net", sent_names=("已发送",), note=_NETEASE),
    _p("139", "China Mobile 139", "imap.139.com", sent_names=("已发送",)),
)}
# Other names admins use for the same presets.
ALIASES = {"google": "gmail", "googleworkspace": "gmail", "hotmail": "outlook",
           "office365": "outlook", "microsoft365": "outlook", "exchange": "outlook",
           "me": "icloud", "netease": "163", "yeah.net": "yeah", "mail.ru": "mailru"}


@dataclass(frozen=True)
class Resolved:
    """A configured mailbox with its preset applied: what the sync connects to."""

    user: User
    company: str
    mailbox: MailboxConfig
    preset: Preset
    host: str
    port: int
    tls: str
    token_url: str
    key: str = field(default="")

    @property
    def username(self) -> str:
        return self.mailbox.username

    @property
    def oauth2(self) -> bool:
        return bool(self.mailbox.oauth2_refresh_token_file)


def preset_of(name: str) -> Preset | None:
    name = name.strip().lower()
    return PRESETS.get(ALIASES.get(name, name))


def account_key(user: User, mailbox: MailboxConfig, host: str) -> str:
    return f"{user.address}/{mailbox.username}@{host}"


def resolve(user: User, mailbox: MailboxConfig) -> Resolved:
    """Apply the preset; raises ValueError with the admin's fix when it cannot be applied."""
    preset = preset_of(mailbox.provider)
    if preset is None:
        raise ValueError(f"unknown provider {mailbox.provider!r} (one of "
                         f"{', '.join(sorted(PRESETS))})")
    host = mailbox.host or preset.host
    if not host:
        raise ValueError(f"provider {preset.name!r} needs host = \"your IMAP server\"")
    tls = mailbox.tls or preset.tls
    port = mailbox.port or (993 if tls == "implicit" else 143)
    token_url = mailbox.oauth2_token_url or preset.token_url
    return Resolved(user, user.company, mailbox, preset, host.lower(), port, tls, token_url,
                    account_key(user, mailbox, host.lower()))


def _secret_problem(base: Path, mailbox: MailboxConfig) -> tuple[str, str] | None:
    """(key, message) of a missing or unreadable secret, else None."""
    for key in ("password_file", "oauth2_refresh_token_file", "oauth2_client_secret_file"):
        name = getattr(mailbox, key)
        if not name:
            continue
        path = Path(name) if Path(name).is_absolute() else base / name
        try:
            if not path.read_text(encoding="utf-8").strip():
                return key, f"{path} is empty"
        except OSError as exc:
            return key, f"cannot read {path}: {exc.strerror}"
    if mailbox.password_env and not os.environ.get(mailbox.password_env):
        return "password_env", f"environment variable {mailbox.password_env} is not set"
    return None


def check_mailboxes(config: Config, base: Path | None = None) -> list[str]:
    """Every problem of the configured mailboxes as ``FILE:LINE: key: message`` (unknown
    provider, missing host, missing secret, OAuth2 without a token endpoint)."""
    base = base or Path.cwd()
    problems = []
    for company in config.companies:
        for user in company.users:
            for mb in user.mailboxes:
                where = f"{config.path}:{mb.line}: {mb.key}"
                try:
                    resolved = resolve(user, mb)
                except ValueError as exc:
                    problems.append(f"{where}.provider: {exc}")
                    continue
                if mb.oauth2_refresh_token_file and not resolved.token_url:
                    problems.append(f"{where}.oauth2_token_url: provider {resolved.preset.name!r}"
                                    " has no OAuth2 token endpoint; set oauth2_token_url")
                if mb.oauth2_refresh_token_file and not mb.oauth2_client_id:
                    problems.append(f"{where}.oauth2_client_id: OAuth2 needs the client id "
                                    "the refresh token was issued to")
                secret = _secret_problem(base, mb)
                if secret is not None:
                    problems.append(f"{where}.{secret[0]}: {secret[1]}")
                if mb.ca_file:
                    ca = Path(mb.ca_file) if Path(mb.ca_file).is_absolute() else base / mb.ca_file
                    if not ca.is_file():
                        problems.append(f"{where}.ca_file: {ca} does not exist")
    return problems


def describe_mailboxes(config: Config) -> list[str]:
    """Lines for ``dealmail check-config``: each configured mailbox and where it connects."""
    lines = []
    for company in config.companies:
        for user in company.users:
            for mb in user.mailboxes:
                try:
                    a = resolve(user, mb)
                except ValueError:
                    continue
                folders = ", ".join(mb.folders) or (
                    "All Mail" if a.preset.gmail else "INBOX and the Sent folder")
                lines.append(f"  mailbox of {user.address}: {mb.username} at {a.host}:{a.port} "
                             f"({a.preset.label}; {a.tls} TLS; "
                             f"{'XOAUTH2' if a.oauth2 else 'password'}; {folders})")
    return lines
