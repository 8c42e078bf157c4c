"""Credentials of a mailbox: a password (from a secret file or an environment variable) or an
OAuth2 access token (XOAUTH2), refreshed from a refresh token against the provider's token
endpoint (RFC 6749 §6). Nothing secret is ever read from the TOML file or written to a log.
"""

from __future__ import annotations

import json
import os
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

from .presets import Resolved

__all__ = ["CredentialError", "Credentials"]


class CredentialError(Exception):
    """The secret cannot be had (missing file or variable, token endpoint refused)."""


def _read(base: Path, name: str) -> str:
    path = Path(name) if Path(name).is_absolute() else base / name
    try:
        value = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise CredentialError(f"cannot read {path}: {exc.strerror}") from exc
    if not value:
        raise CredentialError(f"{path} is empty")
    return value


def _is_loopback(url: str) -> bool:
    host = urllib.parse.urlparse(url).hostname or ""
    return host in ("localhost", "::1") or host.startswith("127.")


class Credentials:
    """The secret of one mailbox; ``token()`` caches an access token until shortly before it
    expires (``invalidate()`` after the server refused it)."""

    def __init__(self, account: Resolved, base: Path, now: Callable[[], datetime],
                 timeout: float = 30.0) -> None:
        self.account = account
        self.base = base
        self.now = now
        self.timeout = timeout
        self._token: tuple[str, datetime] | None = None
        self._lock = threading.Lock()

    @property
    def oauth2(self) -> bool:
        return self.account.oauth2

    def password(self) -> str:
        mb = self.account.mailbox
        if mb.password_env:
            value = os.environ.get(mb.password_env, "")
            if not value:
                raise CredentialError(f"environment variable {mb.password_env} is not set")
            return value
        return _read(self.base, mb.password_file)

    def invalidate(self) -> None:
        with self._lock:
            self._token = None

    def token(self) -> str:
        with self._lock:
            now = self.now()
            if self._token is not None and self._token[1] > now:
                return self._token[0]
            token, lifetime = self._refresh()
            # Refresh a minute early: the token must outlive the login it is used for.
            self._token = (token, now + timedelta(seconds=max(0, lifetime - 60)))
            return token

    def _refresh(self) -> tuple[str, int]:
        a = self.account
        url = a.token_url
        if not url:
            raise CredentialError("no OAuth2 token endpoint (oauth2_token_url)")
        if not url.startswith("https://") and not _is_loopback(url):
            raise CredentialError(f"token endpoint {url} is not https")
        form = {"grant_type": "refresh_token",
                "refresh_token": _read(self.base, a.mailbox.oauth2_refresh_token_file),
                "client_id": a.mailbox.oauth2_client_id}
        if a.mailbox.oauth2_client_secret_file:
            form["client_secret"] = _read(self.base, a.mailbox.oauth2_client_secret_file)
        request = urllib.request.Request(
            url, data=urllib.parse.urlencode(form).encode(), method="POST",
            headers={"Content-Type": "application/x-www-form-urlencoded",
                     "Accept": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                body = response.read(1 << 20)
        except urllib.error.HTTPError as exc:
            detail = exc.read(2000).decode("utf-8", "replace")
            try:
                detail = json.loads(detail).get("error_description") or json.loads(
                    detail).get("error") or detail
            except (ValueError, AttributeError):
                pass
            raise CredentialError(f"token endpoint refused the refresh token: HTTP {exc.code} "
                                  f"{str(detail)[:300]}") from exc
        except (urllib.error.URLError, OSError) as exc:
            raise CredentialError(f"token endpoint unreachable: {exc}") from exc
        try:
            data = json.loads(body)
            return str(data["access_token"]), int(data.get("expires_in", 3600))
        except (ValueError, KeyError, TypeError) as exc:
            raise CredentialError("token endpoint answered without an access_token") from exc
