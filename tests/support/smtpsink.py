"""A scriptable local SMTP server for tests (a fake downstream MTA, as in Mailman 3's tests).

Built on aiosmtpd's threaded ``Controller``, bound to 127.0.0.1 on an OS-assigned port.
A test scripts the replies per stage and reads back what arrived::

    with SmtpSink() as sink:
        sink.script(rcpt={"bad@x.test": "550 5.1.1 no such user"}, data="451 4.3.0 later")
        ... deliver to 127.0.0.1:sink.port ...
        assert sink.messages[0].rcpt_tos == ["good@x.test"]

Features: reply per stage (MAIL, RCPT per address, DATA; a list of DATA replies is consumed
one per transaction), drop the connection after the final ``.`` (the message is recorded
first: the RFC 1047 "lost reply" case), stall before the DATA reply (``asyncio.sleep`` inside
the server only), STARTTLS / implicit TLS with a ``trustme`` certificate for 127.0.0.1 and
localhost (``sink.client_ssl_context`` trusts it), AUTH with a user table, a log of every byte
the server received with a flag saying whether it arrived under TLS (``sink.wire``), and a
"lenient" mode that ends DATA also at a bare ``\\n.\\r\\n`` or ``\\n.\\n`` like a sloppy
downstream MTA, so smuggling tests can see a second, smuggled message appear.

How to import it (there are no ``__init__.py`` files under ``tests/``): put this folder on
``sys.path`` at the top of the test module, before importing::

    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[N] / "support"))
    from smtpsink import SmtpSink

with ``N`` chosen so that ``parents[N]`` is ``tests/`` (``N = 2`` for
``tests/mta/relay/test_x.py``).
"""

from __future__ import annotations

import asyncio
import re
import ssl
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

__all__ = ["ReceivedMessage", "Script", "SmtpSink"]

# A lenient MTA ends DATA at these too (the smuggling vectors of CVE-2023-51764/51765/51766).
_LENIENT_END_RE = re.compile(rb"(?<!\r)\n\.\r\n|\n\.\n")


@dataclass(frozen=True)
class ReceivedMessage:
    """One message as the sink accepted it (content already dot-unstuffed)."""

    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    tls: bool
    authenticated_as: str | None
    smuggled: bool = False  # produced by lenient splitting, not by a real transaction


@dataclass
class Script:
    """Replies the sink gives; ``None`` means the normal 250."""

    mail: str | None = None
    rcpt: dict[str, str] = field(default_factory=dict)  # lower-cased address -> reply
    data: list[str] = field(default_factory=list)  # consumed one per DATA; the last one sticks
    drop_after_data: bool = False
    stall_data: float = 0.0  # seconds to wait before the DATA reply

    def next_data_reply(self) -> str:
        if not self.data:
            return "250 2.0.0 OK queued"
        if len(self.data) > 1:
            return self.data.pop(0)
        return self.data[0]


class _RecordingSMTP(SMTP):
    """aiosmtpd's SMTP that also logs each received chunk with its TLS state."""

    def __init__(self, sink: SmtpSink, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._sink = sink

    async def push(self, status: Any) -> None:
        # aiosmtpd prints "250-AUTH" even with no mechanism; a sink without users offers none.
        text = status.decode() if isinstance(status, bytes) else str(status)
        if not self._sink.auth_enabled and text.startswith("250-AUTH"):
            return
        await super().push(status)

    def data_received(self, data: bytes) -> None:
        transport = self.transport
        under_tls = self._tls_protocol is not None or (
            transport is not None and transport.get_extra_info("sslcontext") is not None
        )
        self._sink._record_wire(under_tls, data)
        super().data_received(data)


class _Controller(Controller):
    """Controller bound to port 0: find the real port from the listening socket."""

    def __init__(self, sink: SmtpSink, handler: Any, **kwargs: Any) -> None:
        super().__init__(handler, hostname="127.0.0.1", port=0, **kwargs)
        self._sink = sink

    def factory(self) -> SMTP:
        return _RecordingSMTP(self._sink, self.handler, **self.SMTP_kwargs)

    def _trigger_server(self) -> None:
        server = self.server
        assert isinstance(server, asyncio.Server)
        self.port = server.sockets[0].getsockname()[1]
        super()._trigger_server()


class _Handler:
    def __init__(self, sink: SmtpSink) -> None:
        self.sink = sink

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str,
        mail_options: list[str],
    ) -> str:
        reply = self.sink._current().mail
        if reply is not None:
            return reply
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str,
        rcpt_options: list[str],
    ) -> str:
        reply = self.sink._current().rcpt.get(address.lower())
        if reply is not None:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        script = self.sink._current()
        if script.stall_data:
            await asyncio.sleep(script.stall_data)
        reply = self.sink._next_data_reply()
        if reply.startswith("2"):
            self.sink._accept(server, session, envelope)
        if script.drop_after_data:
            # Abort (no FIN handshake niceties) before replying: the client saw its '.'
            # accepted by nobody, which is the ambiguous case of RFC 1047.
            transport = server.transport
            assert isinstance(transport, asyncio.WriteTransport)
            transport.abort()
        return reply

    async def handle_exception(self, error: Exception) -> str:
        return "451 4.3.0 sink error"


def _authenticator_for(users: Mapping[str, str]) -> Any:
    def authenticator(
        server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        if isinstance(auth_data, LoginPassword):
            login = auth_data.login.decode("utf-8", "replace")
            if users.get(login) == auth_data.password.decode("utf-8", "replace"):
                return AuthResult(success=True, auth_data=login)
        return AuthResult(success=False, handled=False)

    return authenticator


class SmtpSink:
    """A fake SMTP server on 127.0.0.1:<port>; use as a context manager."""

    def __init__(
        self,
        *,
        starttls: bool = False,
        implicit_tls: bool = False,
        require_starttls: bool = False,
        auth_users: Mapping[str, str] | None = None,
        auth_require_tls: bool = True,
        lenient: bool = False,
        smtputf8: bool = True,
        hostname: str = "sink.test",
    ) -> None:
        self._lock = threading.Lock()
        self._messages: list[ReceivedMessage] = []
        self._wire: list[tuple[bool, bytes]] = []
        self._script = Script()
        self.lenient = lenient
        self.auth_enabled = auth_users is not None
        self.ca = trustme.CA()
        cert = self.ca.issue_cert("127.0.0.1", "localhost")
        self.server_ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(self.server_ssl_context)
        self.client_ssl_context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        self.ca.configure_trust(self.client_ssl_context)

        kwargs: dict[str, Any] = {
            # A fixed name: aiosmtpd otherwise resolves the host name on each connection.
            "server_hostname": hostname,
            "enable_SMTPUTF8": smtputf8,
            "auth_require_tls": auth_require_tls,
        }
        if starttls or require_starttls:
            kwargs["tls_context"] = self.server_ssl_context
            kwargs["require_starttls"] = require_starttls
        if implicit_tls:
            kwargs["ssl_context"] = self.server_ssl_context
            # aiosmtpd only counts STARTTLS as TLS for AUTH; implicit TLS is TLS too.
            kwargs["auth_require_tls"] = False
        if auth_users is not None:
            kwargs["authenticator"] = _authenticator_for(dict(auth_users))
        self._controller = _Controller(self, _Handler(self), **kwargs)

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> SmtpSink:
        self._controller.start()
        return self

    def stop(self) -> None:
        self._controller.stop()

    def __enter__(self) -> SmtpSink:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return int(self._controller.port)

    # -- scripting -------------------------------------------------------------------------
    def script(
        self,
        *,
        mail: str | None = None,
        rcpt: Mapping[str, str] | None = None,
        data: str | list[str] | None = None,
        drop_after_data: bool = False,
        stall_data: float = 0.0,
    ) -> None:
        """Replace the script (replies are full lines such as ``"550 5.1.1 no such user"``)."""
        data_list = [data] if isinstance(data, str) else list(data or [])
        with self._lock:
            self._script = Script(
                mail=mail,
                rcpt={k.lower(): v for k, v in (rcpt or {}).items()},
                data=data_list,
                drop_after_data=drop_after_data,
                stall_data=stall_data,
            )

    def _current(self) -> Script:
        with self._lock:
            return self._script

    def _next_data_reply(self) -> str:
        with self._lock:
            return self._script.next_data_reply()

    # -- recording -------------------------------------------------------------------------
    @property
    def messages(self) -> list[ReceivedMessage]:
        """A snapshot of the messages accepted so far."""
        with self._lock:
            return list(self._messages)

    @property
    def wire(self) -> list[tuple[bool, bytes]]:
        """Every chunk the server read, as ``(under_tls, bytes)`` (after TLS decryption)."""
        with self._lock:
            return list(self._wire)

    def plaintext_wire(self) -> bytes:
        """All bytes that arrived outside TLS: what a passive eavesdropper saw."""
        return b"".join(chunk for tls, chunk in self.wire if not tls)

    def all_wire(self) -> bytes:
        return b"".join(chunk for _, chunk in self.wire)

    def _record_wire(self, under_tls: bool, data: bytes) -> None:
        with self._lock:
            self._wire.append((under_tls, bytes(data)))

    def _accept(self, server: SMTP, session: Session, envelope: Envelope) -> None:
        tls = server._tls_protocol is not None or (
            server.transport is not None
            and server.transport.get_extra_info("sslcontext") is not None
        )
        user = session.auth_data if session.authenticated else None
        content = envelope.original_content or b""
        base = ReceivedMessage(
            # aiosmtpd keeps the null reverse-path as "<>"; record it as "".
            mail_from="" if envelope.mail_from in (None, "<>") else envelope.mail_from,
            rcpt_tos=list(envelope.rcpt_tos),
            data=content,
            tls=tls,
            authenticated_as=user if isinstance(user, str) else None,
        )
        found = [base]
        if self.lenient:
            found = _lenient_split(base)
        with self._lock:
            self._messages.extend(found)


def _restuff(content: bytes) -> bytes:
    # aiosmtpd removed one leading dot from each CRLF line; put it back to get the wire bytes.
    lines = content.split(b"\r\n")
    return b"\r\n".join(b"." + line if line.startswith(b".") else line for line in lines)


def _unstuff(wire: bytes) -> bytes:
    lines = wire.split(b"\r\n")
    return b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines)


def _lenient_split(message: ReceivedMessage) -> list[ReceivedMessage]:
    """What a sloppy MTA would have seen: DATA ending at a bare-LF dot line, then commands."""
    wire = _restuff(message.data)
    pieces = _LENIENT_END_RE.split(wire)
    if len(pieces) == 1:
        return [message]
    first = ReceivedMessage(
        message.mail_from, message.rcpt_tos, _unstuff(pieces[0]) + b"\r\n",
        message.tls, message.authenticated_as,
    )
    found = [first]
    for piece in pieces[1:]:
        # The bytes after the fake end of data are read as commands; only a MAIL, RCPT and
        # DATA sequence makes a message (anything else would just get 500 replies).
        mail_from: str | None = None
        rcpts: list[str] = []
        rest = piece
        while rest:
            line, sep, rest = rest.partition(b"\n")
            command = line.rstrip(b"\r").decode("latin-1")
            upper = command.upper()
            if upper.startswith("MAIL FROM:"):
                mail_from = command[10:].strip().strip("<>")
            elif upper.startswith("RCPT TO:"):
                rcpts.append(command[8:].strip().strip("<>"))
            elif upper == "DATA":
                if mail_from is not None and rcpts:
                    found.append(ReceivedMessage(
                        mail_from, rcpts, _unstuff(rest), message.tls,
                        message.authenticated_as, smuggled=True,
                    ))
                break
            if not sep:
                break
    return found
