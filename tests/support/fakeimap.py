"""A scripted IMAP server on loopback for what a real Dovecot will not do: hostile or broken
answers, Gmail's extensions (``X-GM-EXT-1``), XOAUTH2 with a local token endpoint, a
``PREAUTH`` greeting before STARTTLS, ``BYE`` and throttling.

One thread per connection, line-based, just enough IMAP4rev1 (RFC 3501) for the sync:
CAPABILITY, STARTTLS, LOGIN, AUTHENTICATE XOAUTH2, ID, ENABLE, LIST, SELECT/EXAMINE, UID FETCH,
UID SEARCH, APPEND, NOOP, IDLE, LOGOUT. Every line received is kept in ``lines`` so tests can
prove what a client did or did not send.

Also here: :class:`TokenEndpoint`, a tiny OAuth2 token endpoint (RFC 6749 §6) over HTTP on
loopback.
"""

from __future__ import annotations

import base64
import json
import re
import socket
import ssl
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


@dataclass
class Message:
    uid: int
    raw: bytes
    internaldate: datetime = field(default_factory=lambda: datetime(2026, 11, 20, tzinfo=UTC))
    gm_msgid: int | None = None
    gm_thrid: int | None = None
    labels: tuple[str, ...] = ()


@dataclass
class Folder:
    name: str  # as sent on the wire (modified UTF-7 already applied)
    flags: tuple[str, ...] = ()
    uidvalidity: int = 1
    messages: list[Message] = field(default_factory=list)
    highestmodseq: int | None = None

    @property
    def uidnext(self) -> int:
        return max((msg.uid for msg in self.messages), default=0) + 1


def _imap_date(when: datetime) -> str:
    return when.strftime("%d-%b-%Y %H:%M:%S +0000")


class FakeImap:
    def __init__(self, *, tls: bool = True, cert: Any = None,
                 greeting: str = "* OK fake IMAP ready",
                 capabilities: tuple[str, ...] = ("IMAP4rev1", "IDLE", "ID", "ENABLE",
                                                  "UIDPLUS", "SPECIAL-USE"),
                 users: dict[str, str] | None = None) -> None:
        self.tls = tls
        self.cert = cert  # a trustme leaf certificate (implicit TLS and STARTTLS)
        self.greeting = greeting
        self.capabilities = list(capabilities)
        self.users = users or {}
        self.tokens: set[str] = set()  # XOAUTH2 access tokens accepted
        self.folders: dict[str, Folder] = {"INBOX": Folder("INBOX")}
        # uid -> the whole untagged FETCH response to send instead of the normal one, when a
        # body is asked for (bytes, a literal's bytes included).
        self.hostile: dict[int, bytes] = {}
        self.login_reply: str | None = None  # e.g. "* BYE [UNAVAILABLE] limit exceeded"
        self.fetch_reply: str | None = None  # e.g. "NO [ALERT] bandwidth limit exceeded"
        self.bye_in_idle = False
        self.vanish: set[int] = set()  # expunged between the size fetch and the body fetch
        self.lines: list[bytes] = []
        self.body_fetches: list[int] = []
        self.logins = 0
        self._stop = threading.Event()
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(20)
        self.port = self._sock.getsockname()[1]
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._conns: list[socket.socket] = []

    # ------------------------------------------------------------------ control

    def start(self) -> FakeImap:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        try:
            self._sock.close()
        except OSError:
            pass
        for conn in self._conns:
            try:
                conn.close()
            except OSError:
                pass

    def __enter__(self) -> FakeImap:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def add(self, folder: str, raw: bytes, **kw: Any) -> Message:
        box = self.folders[folder]
        msg = Message(uid=kw.pop("uid", box.uidnext), raw=raw, **kw)
        box.messages.append(msg)
        box.messages.sort(key=lambda x: x.uid)
        return msg

    def _server_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.cert.configure_cert(ctx)
        return ctx

    # ------------------------------------------------------------------ serving

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            if self.tls:
                conn = self._server_context().wrap_socket(conn, server_side=True)
            Session(self, conn).run()
        except (OSError, ssl.SSLError, ValueError):
            pass
        finally:
            try:
                conn.close()
            except OSError:
                pass


_UID_SET = re.compile(r"^[0-9*:,]+$")


class Session:
    def __init__(self, server: FakeImap, conn: socket.socket) -> None:
        self.server = server
        self.conn = conn
        self.file = conn.makefile("rb")
        self.selected: Folder | None = None
        self.authenticated = False

    def send(self, data: bytes | str) -> None:
        self.conn.sendall(data.encode() if isinstance(data, str) else data)

    def line(self) -> bytes:
        got = self.file.readline(1 << 20)
        if not got:
            raise OSError("closed")
        self.server.lines.append(got)
        return got

    def run(self) -> None:
        self.send(self.server.greeting + "\r\n")
        while True:
            raw = self.line().rstrip(b"\r\n")
            tag, _, rest = raw.decode("utf-8", "replace").partition(" ")
            command, _, args = rest.partition(" ")
            handler = getattr(self, f"do_{command.upper()}", None)
            if command.upper() == "UID":
                sub, _, args = args.partition(" ")
                handler = getattr(self, f"do_UID_{sub.upper()}", None)
            if handler is None:
                self.send(f"{tag} BAD unknown command\r\n")
                continue
            if handler(tag, args) == "close":
                return

    # ------------------------------------------------------------------ commands

    def do_CAPABILITY(self, tag: str, args: str) -> None:
        caps = list(self.server.capabilities)
        if not self.server.tls and not isinstance(self.conn, ssl.SSLSocket):
            caps.append("STARTTLS")
        if "XOAUTH2" not in " ".join(caps) and self.server.tokens:
            caps.append("AUTH=XOAUTH2")
        self.send(f"* CAPABILITY {' '.join(caps)}\r\n{tag} OK done\r\n")

    def do_STARTTLS(self, tag: str, args: str) -> None:
        self.send(f"{tag} OK begin TLS\r\n")
        ctx = self.server._server_context()
        self.conn = ctx.wrap_socket(self.conn, server_side=True)
        self.file = self.conn.makefile("rb")

    def do_LOGIN(self, tag: str, args: str) -> str | None:
        self.server.logins += 1
        if self.server.login_reply:
            self.send(self.server.login_reply + "\r\n")
            if "BYE" in self.server.login_reply:
                return "close"
            self.send(f"{tag} NO [UNAVAILABLE] try later\r\n")
            return None
        parts = re.findall(r'"((?:[^"\\]|\\.)*)"|(\S+)', args)
        values = [a or b for a, b in parts]
        if len(values) == 2 and self.server.users.get(values[0]) == values[1]:
            self.authenticated = True
            self.send(f"{tag} OK logged in\r\n")
        else:
            self.send(f"{tag} NO [AUTHENTICATIONFAILED] Invalid credentials (Failure)\r\n")
        return None

    def do_AUTHENTICATE(self, tag: str, args: str) -> None:
        self.server.logins += 1
        self.send("+ \r\n")
        blob = self.line().strip()
        try:
            text = base64.b64decode(blob).decode()
        except ValueError:
            text = ""
        token = text.split("auth=Bearer ", 1)[-1].split("\x01", 1)[0]
        if args.upper().startswith("XOAUTH2") and token in self.server.tokens:
            self.authenticated = True
            self.send(f"{tag} OK authenticated\r\n")
        else:
            self.send(f"{tag} NO [AUTHENTICATIONFAILED] Invalid credentials (Failure)\r\n")

    def do_ID(self, tag: str, args: str) -> None:
        self.send(f'* ID ("name" "fake")\r\n{tag} OK ID completed\r\n')

    def do_ENABLE(self, tag: str, args: str) -> None:
        self.send(f"* ENABLED {args}\r\n{tag} OK enabled\r\n")

    def do_NOOP(self, tag: str, args: str) -> None:
        self.send(f"{tag} OK noop\r\n")

    def do_LOGOUT(self, tag: str, args: str) -> str:
        self.send(f"* BYE bye\r\n{tag} OK logout\r\n")
        return "close"

    def do_LIST(self, tag: str, args: str) -> None:
        out = []
        for folder in self.server.folders.values():
            out.append(f'* LIST ({" ".join(folder.flags)}) "/" "{folder.name}"\r\n')
        self.send("".join(out) + f"{tag} OK list\r\n")

    def do_SELECT(self, tag: str, args: str) -> None:
        name = args.strip().strip('"')
        folder = self.server.folders.get(name)
        if folder is None:
            self.send(f"{tag} NO no such folder\r\n")
            return
        self.selected = folder
        modseq = (f"* OK [HIGHESTMODSEQ {folder.highestmodseq}]\r\n"
                  if folder.highestmodseq is not None else "")
        self.send(f"* {len(folder.messages)} EXISTS\r\n* 0 RECENT\r\n"
                  f"* OK [UIDVALIDITY {folder.uidvalidity}]\r\n"
                  f"* OK [UIDNEXT {folder.uidnext}]\r\n{modseq}"
                  f"{tag} OK [READ-ONLY] selected\r\n")

    do_EXAMINE = do_SELECT

    def _uids(self, spec: str) -> list[Message]:
        assert self.selected is not None
        msgs = self.selected.messages
        top = msgs[-1].uid if msgs else 0
        wanted: set[int] = set()
        for part in spec.split(","):
            lo_s, _, hi_s = part.partition(":")
            lo = top if lo_s == "*" else int(lo_s)
            hi = lo if not hi_s else (top if hi_s == "*" else int(hi_s))
            lo, hi = min(lo, hi), max(lo, hi)
            wanted.update(range(lo, hi + 1) if hi - lo < 1_000_000 else
                          [x.uid for x in msgs if lo <= x.uid <= hi])
        found = [x for x in msgs if x.uid in wanted]
        if not found and msgs and spec.endswith(":*"):
            found = [msgs[-1]]  # RFC 3501 §6.4.8: n:* always matches the last message
        return found

    def do_UID_FETCH(self, tag: str, args: str) -> None:
        if self.server.fetch_reply and "BODY" in args.upper():
            self.send(f"{tag} {self.server.fetch_reply}\r\n")
            return
        spec, _, items = args.partition(" ")
        items = items.upper()
        assert self.selected is not None
        out = bytearray()
        for msg in self._uids(spec):
            seq = self.selected.messages.index(msg) + 1
            wants_body = "BODY.PEEK[]" in items
            if wants_body and msg.uid in self.server.vanish:
                continue
            if wants_body:
                self.server.body_fetches.append(msg.uid)
                if msg.uid in self.server.hostile:
                    out += self.server.hostile[msg.uid]
                    continue
            parts = [f"UID {msg.uid}".encode()]
            if "RFC822.SIZE" in items:
                parts.append(f"RFC822.SIZE {len(msg.raw)}".encode())
            if "INTERNALDATE" in items:
                parts.append(f'INTERNALDATE "{_imap_date(msg.internaldate)}"'.encode())
            if "X-GM-MSGID" in items and msg.gm_msgid is not None:
                parts.append(f"X-GM-MSGID {msg.gm_msgid}".encode())
            if "X-GM-THRID" in items and msg.gm_thrid is not None:
                parts.append(f"X-GM-THRID {msg.gm_thrid}".encode())
            if "X-GM-LABELS" in items:
                labels = " ".join(f'"{x}"' for x in msg.labels)
                parts.append(f"X-GM-LABELS ({labels})".encode())
            if wants_body:
                parts.append(f"BODY[] {{{len(msg.raw)}}}\r\n".encode() + msg.raw)
            out += f"* {seq} FETCH (".encode() + b" ".join(parts) + b")\r\n"
        self.send(bytes(out) + f"{tag} OK fetch done\r\n".encode())

    def do_UID_SEARCH(self, tag: str, args: str) -> None:
        assert self.selected is not None
        uids = " ".join(str(x.uid) for x in self.selected.messages)
        self.send(f"* SEARCH {uids}\r\n{tag} OK search\r\n")

    def do_APPEND(self, tag: str, args: str) -> None:
        size = int(re.search(r"\{(\d+)\+?\}$", args).group(1))  # type: ignore[union-attr]
        if not args.endswith("+}"):
            self.send("+ go ahead\r\n")
        data = self.file.read(size)
        self.file.readline()
        name = args.split(" ", 1)[0].strip('"')
        self.server.add(name, data)
        self.send(f"{tag} OK append\r\n")

    def do_IDLE(self, tag: str, args: str) -> str | None:
        self.send("+ idling\r\n")
        if self.server.bye_in_idle:
            self.send("* BYE server shutting down\r\n")
            return "close"
        self.line()  # DONE
        self.send(f"{tag} OK idle done\r\n")
        return None


class TokenEndpoint:
    """OAuth2 token endpoint on loopback: a good refresh token gets ``tok-<n>`` (and the
    IMAP server is told to accept it); anything else gets HTTP 400 invalid_grant."""

    def __init__(self, imap: FakeImap, refresh_token: str = "refresh-1") -> None:
        self.imap = imap
        self.refresh_token = refresh_token
        self.issued = 0
        self.requests: list[dict[str, str]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                form = dict(x.split("=", 1) for x in self.rfile.read(length).decode()
                            .split("&") if "=" in x)
                outer.requests.append(form)
                if form.get("grant_type") == "refresh_token" and form.get(
                        "refresh_token") == outer.refresh_token:
                    outer.issued += 1
                    token = f"tok-{outer.issued}"
                    outer.imap.tokens = {token}
                    body = json.dumps({"access_token": token, "expires_in": 3600,
                                       "token_type": "Bearer"}).encode()
                    self.send_response(200)
                else:
                    body = json.dumps({"error": "invalid_grant",
                                       "error_description": "Token has been revoked."}).encode()
                    self.send_response(400)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/token"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def write_secret(path: Path, value: str) -> Path:
    path.write_text(value + "\n")
    return path
