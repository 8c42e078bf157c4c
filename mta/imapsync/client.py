"""Connecting to a mailbox: TLS, login, identification, folder discovery, bounded reads.

* TLS always: implicit TLS (RFC 8314) or STARTTLS (RFC 3501 §6.2.1), certificates and host
  names verified against the system CAs plus the mailbox's ``ca_file`` (a self-hosted
  server's own CA is pinned that way; nothing is ever accepted unverified). A server that
  greets with ``PREAUTH`` on a STARTTLS connection, or does not offer STARTTLS, is refused
  before anything is sent: credentials never travel in cleartext.
* Login with LOGIN or SASL XOAUTH2; a refused OAuth2 token is refreshed once and retried.
* ``ID`` (RFC 2971) after login when offered (NetEase refuses SELECT without it), ``ENABLE
  CONDSTORE`` (RFC 7162) when offered.
* Folders are listed with their special-use flags (RFC 6154); imapclient decodes modified
  UTF-7 names (RFC 3501 §5.1.3).
* imaplib reads a literal of whatever size the server announces: :func:`bound_reads` refuses
  literals over a limit, so a hostile ``{4294967295}`` costs nothing (imaplib already caps a
  single line at 1,000,000 bytes).
"""

from __future__ import annotations

import imaplib
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from imapclient import IMAPClient
from imapclient.exceptions import IMAPClientError, LoginError

from .credentials import CredentialError, Credentials
from .presets import Resolved

__all__ = ["AuthFailed", "ConnectFailed", "FolderInfo", "ImapSecurityError", "LiteralTooLarge",
           "ProtocolTrouble", "bound_reads", "connect", "list_folders", "plan_folders"]

NETWORK_ERRORS = (OSError, socket.timeout, ssl.SSLError, imaplib.IMAP4.abort, EOFError)


class ImapSecurityError(Exception):
    """The connection cannot be made safe (no TLS, PREAUTH before TLS, bad certificate)."""


class AuthFailed(Exception):
    """The server refused the login; ``str()`` is the server's own words."""


class ConnectFailed(Exception):
    """No usable connection (refused, timed out, dropped, throttled)."""


class ProtocolTrouble(Exception):
    """The server's answer could not be read safely (malformed, oversized)."""


class LiteralTooLarge(ProtocolTrouble):
    pass


def tls_context(account: Resolved, base: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if account.mailbox.ca_file:
        ca = Path(account.mailbox.ca_file)
        ctx.load_verify_locations(cafile=str(ca if ca.is_absolute() else base / ca))
    return ctx


def bound_reads(client: IMAPClient, limit: int) -> None:
    """Refuse literals over ``limit`` bytes before reading them (imaplib would read, and
    hold, whatever size the server announces)."""
    imap = client._imap
    read = imap.read

    def bounded(size: int) -> bytes:
        if size > limit:
            raise LiteralTooLarge(f"server announced a literal of {size} bytes "
                                  f"(at most {limit} are read)")
        return read(size)  # type: ignore[no-any-return]

    imap.read = bounded


def _words(exc: BaseException) -> str:
    text = str(exc).strip() or exc.__class__.__name__
    for prefix in ("b'", 'b"'):
        text = text.replace(prefix, "'")
    return text[:500]


def connect(account: Resolved, credentials: Credentials, base: Path, *, timeout: float,
            max_literal: int, client_name: str = "dealmail") -> IMAPClient:
    """A logged-in connection (the caller logs out). Raises :class:`ImapSecurityError`,
    :class:`AuthFailed`, :class:`ConnectFailed` or :class:`CredentialError`."""
    ctx = tls_context(account, base)
    try:
        if account.tls == "implicit":
            client = IMAPClient(account.host, account.port, ssl=True, ssl_context=ctx,
                                timeout=timeout)
        else:
            client = IMAPClient(account.host, account.port, ssl=False, timeout=timeout)
            welcome = bytes(client.welcome or b"")
            if welcome.upper().startswith(b"* PREAUTH"):
                client.shutdown()
                raise ImapSecurityError(
                    "the server greeted with PREAUTH before STARTTLS: refused, no credentials "
                    "sent (a man in the middle can do that to skip TLS)")
            if b"STARTTLS" not in client.capabilities():
                client.shutdown()
                raise ImapSecurityError("the server does not offer STARTTLS: refused, "
                                        "credentials are never sent in cleartext")
            client.starttls(ctx)
    except ssl.SSLCertVerificationError as exc:
        raise ImapSecurityError(f"certificate of {account.host} not trusted: "
                                f"{exc.verify_message or exc}; set ca_file to pin a private "
                                "CA") from exc
    except ImapSecurityError:
        raise
    except (IMAPClientError, *NETWORK_ERRORS) as exc:
        raise ConnectFailed(f"cannot connect to {account.host}:{account.port}: "
                            f"{_words(exc)}") from exc
    client.normalise_times = False
    bound_reads(client, max_literal)
    try:
        _login(client, account, credentials)
        caps = client.capabilities()
        if b"ID" in caps:
            try:
                client.id_({"name": client_name, "vendor": "dealmail"})
            except IMAPClientError:
                pass  # informational; a server that offers ID and refuses it still works
        if b"CONDSTORE" in caps and b"ENABLE" in caps:
            try:
                client.enable("CONDSTORE")
            except IMAPClientError:
                pass
    except (AuthFailed, CredentialError):
        _close(client)
        raise
    except (IMAPClientError, *NETWORK_ERRORS) as exc:
        _close(client)
        raise ConnectFailed(f"{account.host}: {_words(exc)}") from exc
    return client


def _login(client: IMAPClient, account: Resolved, credentials: Credentials) -> None:
    username = account.username
    if not credentials.oauth2:
        try:
            client.login(username, credentials.password())
        except LoginError as exc:
            raise AuthFailed(_words(exc)) from exc
        return
    for attempt in (1, 2):
        token = credentials.token()
        try:
            client.oauth2_login(username, token)
            return
        except (LoginError, IMAPClientError) as exc:
            if isinstance(exc, imaplib.IMAP4.abort):
                raise
            # The token may have been revoked or expired early: refresh once.
            credentials.invalidate()
            if attempt == 2:
                raise AuthFailed(_words(exc)) from exc


def _close(client: IMAPClient) -> None:
    try:
        client.logout()
    except Exception:
        try:
            client.shutdown()
        except Exception:
            pass


close = _close


@dataclass(frozen=True)
class FolderInfo:
    name: str
    flags: tuple[str, ...]
    delimiter: str

    @property
    def selectable(self) -> bool:
        return "\\noselect" not in self.flags and "\\nonexistent" not in self.flags


def list_folders(client: IMAPClient) -> list[FolderInfo]:
    out = []
    for flags, delim, name in client.list_folders():
        out.append(FolderInfo(
            name=name if isinstance(name, str) else bytes(name).decode("utf-8", "replace"),
            flags=tuple(f.decode("ascii", "replace").lower() if isinstance(f, bytes)
                        else str(f).lower() for f in flags),
            delimiter=(delim.decode() if isinstance(delim, bytes) else str(delim or "/"))))
    return out


@dataclass(frozen=True)
class Planned:
    name: str
    role: str  # inbox | sent | all | custom
    why: str


def plan_folders(account: Resolved, folders: list[FolderInfo],
                 gmail: bool) -> tuple[list[Planned], str | None]:
    """The folders to sync (first one watched with IDLE) and the Sent folder to file
    relayed mail in, with the reason for each choice."""
    by_name = {f.name: f for f in folders if f.selectable}
    sent = _special(folders, "\\sent", account.preset.sent_names)
    if account.mailbox.sent_folder:
        sent = (account.mailbox.sent_folder, "configured sent_folder")
    planned: list[Planned] = []
    if account.mailbox.folders:
        for name in account.mailbox.folders:
            if name not in by_name and name.upper() != "INBOX":
                planned.append(Planned(name, "missing", "configured, not on the server"))
                continue
            role = ("inbox" if name.upper() == "INBOX" else
                    "sent" if sent and name == sent[0] else
                    "all" if "\\all" in by_name.get(name, FolderInfo("", (), "")).flags
                    else "custom")
            planned.append(Planned(name, role, "configured in folders"))
        return planned, sent[0] if sent else None
    if gmail:
        every = _special(folders, "\\all", ("[Gmail]/All Mail", "[Google Mail]/All Mail"))
        if every is not None:
            planned.append(Planned(every[0], "all", f"Gmail: every message once ({every[1]}), "
                                   "labels read with X-GM-LABELS"))
            return planned, sent[0] if sent else None
    planned.append(Planned("INBOX", "inbox", "mail you receive"))
    if sent is not None:
        planned.append(Planned(sent[0], "sent", f"mail you send ({sent[1]})"))
    return planned, sent[0] if sent else None


def _special(folders: list[FolderInfo], flag: str,
             names: tuple[str, ...]) -> tuple[str, str] | None:
    for f in folders:
        if flag in f.flags and f.selectable:
            return f.name, f"flagged {flag[0]}{flag[1:].capitalize()}, RFC 6154"
    lowered = {f.name.lower(): f.name for f in folders if f.selectable}
    for name in names:
        if name.lower() in lowered:
            return lowered[name.lower()], "by its usual name (the server flags none)"
    return None


def capability_list(client: IMAPClient) -> list[str]:
    return sorted(c.decode("ascii", "replace") if isinstance(c, bytes) else str(c)
                  for c in client.capabilities())


def server_words(exc: BaseException) -> str:
    return _words(exc)


def is_throttle(text: str) -> bool:
    t = text.lower()
    return any(w in t for w in ("limit", "throttl", "too many", "try again later",
                                "[unavailable]", "overquota", "bandwidth"))


