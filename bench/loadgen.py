"""The load generator: a small asyncio SMTP client (RFC 5321) that measures per-message latency.

It speaks only what a Smart BCC client needs: greeting, EHLO, MAIL, RCPT, DATA (with dot
stuffing, RFC 5321 §4.5.2), QUIT. Clients either keep one connection for ``per_connection``
messages (RSET is not needed: a completed DATA ends the transaction, §4.1.1.4) or open one
connection per message. A run is bounded both in message count and in wall-clock time, and
only ever connects to loopback.

Closed loop (:func:`run_closed`): ``concurrency`` clients each send their next message as soon
as the previous one was answered; this finds the maximal rate. Open loop (:func:`run_open`):
message ``i`` is due at ``start + i / rate`` whatever the server does, and its latency is
counted from that due time, so a server that falls behind is charged for the queueing too
(no "coordinated omission").
"""

from __future__ import annotations

import asyncio
import base64
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from email.utils import formatdate

LOOPBACK = ("127.0.0.1", "::1", "localhost")
SENDER = "alice@example.com"
BCC_ADDRESS = "example@dealmail.localhost"

# A message factory gets the message's sequence number and returns (recipient for the
# headers, raw message bytes with CRLF line ends).
MessageFactory = Callable[[int], bytes]


class SmtpReplyError(Exception):
    """The server answered something other than what the step expects."""

    def __init__(self, step: str, code: int, text: str) -> None:
        super().__init__(f"{step}: {code} {text}")
        self.step = step
        self.code = code
        self.text = text


@dataclass
class LoadResult:
    """What one run measured. Latencies are in seconds."""

    sent: int = 0
    ok: int = 0
    #: Bytes of the messages answered 250 (as generated, before dot-stuffing).
    bytes_ok: int = 0
    latencies: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    elapsed: float = 0.0

    @property
    def rate(self) -> float:
        return self.ok / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def mb_per_second(self) -> float:
        return self.bytes_ok / 1e6 / self.elapsed if self.elapsed > 0 else 0.0

    def percentile(self, q: float) -> float:
        """Nearest-rank percentile of the latencies (``q`` in 0..100), in seconds."""
        if not self.latencies:
            return 0.0
        ordered = sorted(self.latencies)
        rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
        return ordered[rank - 1]


def make_body(recipient: str, seq: int, run_id: str, size: int = 2048) -> bytes:
    """A plain ~``size``-byte message from alice to ``recipient`` with a unique Message-ID."""
    rng = random.Random(seq)
    head = (
        f"From: Alice Admin <{SENDER}>\r\n"
        f"To: <{recipient}>\r\n"
        f"Subject: Proposal follow-up {seq % 997}\r\n"
        f"Date: {formatdate(localtime=False)}\r\n"
        f"Message-ID: <bench-{run_id}-{seq}@example.com>\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "\r\n"
    )
    words = ("pricing", "contract", "meeting", "renewal", "discount", "timeline", "quote",
             "thanks", "next", "week", "call", "review", "licence", "seats", "budget")
    lines: list[str] = []
    length = len(head)
    while length < size:
        line = " ".join(rng.choice(words) for _ in range(11))
        lines.append(line)
        length += len(line) + 2
    return (head + "\r\n".join(lines) + "\r\n").encode()


def make_big_body(recipient: str, run_id: str, size: int) -> bytes:
    """A ``size``-byte message whose bulk is one base64 attachment (RFC 2045 §6.8 lines)."""
    boundary = f"bench-{run_id}"
    head = (
        f"From: Alice Admin <{SENDER}>\r\n"
        f"To: <{recipient}>\r\n"
        "Subject: Signed contract (large attachment)\r\n"
        f"Date: {formatdate(localtime=False)}\r\n"
        f"Message-ID: <bench-big-{run_id}@example.com>\r\n"
        "MIME-Version: 1.0\r\n"
        f'Content-Type: multipart/mixed; boundary="{boundary}"\r\n'
        "\r\n"
        f"--{boundary}\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n\r\n"
        "Please find the signed contract attached.\r\n"
        f"--{boundary}\r\n"
        "Content-Type: application/pdf; name=contract.pdf\r\n"
        "Content-Disposition: attachment; filename=contract.pdf\r\n"
        "Content-Transfer-Encoding: base64\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    # 76 base64 characters + CRLF = 78 bytes carry 57 bytes of payload.
    lines = max(1, (size - len(head) - len(tail)) // 78)
    payload = random.Random(7).randbytes(lines * 57)
    encoded = base64.encodebytes(payload).replace(b"\n", b"\r\n")
    return head + encoded.rstrip(b"\r\n") + tail


def recipient_factory(addresses: list[str], run_id: str | None = None,
                      seed: int = 1) -> MessageFactory:
    """Messages to a random person of ``addresses`` each, with unique Message-IDs."""
    rid = run_id or uuid.uuid4().hex[:12]
    rng = random.Random(seed)
    picks = [rng.choice(addresses) for _ in range(min(len(addresses), 4096))]

    def make(seq: int) -> bytes:
        return make_body(picks[seq % len(picks)], seq, rid)

    return make


#: The realistic size mix: (kind, share of the messages, smallest and largest size in bytes).
#: Most business mail is a few KB of text and HTML; a quarter carries an attachment (a quote,
#: a deck); a few carry a large one (a signed contract scan, a design file).
SIZE_MIX: tuple[tuple[str, float, int, int], ...] = (
    ("text+html", 0.70, 5_000, 20_000),
    ("attachment", 0.25, 100_000, 2_000_000),
    ("large", 0.05, 5_000_000, 20_000_000),
)


def mix_sizes(count: int, seed: int = 1) -> list[int]:
    """``count`` message sizes in :data:`SIZE_MIX`'s proportions (at least one of each kind,
    so that a short run keeps the mix), in a shuffled but reproducible order."""
    rng = random.Random(seed)
    counts = [max(1, round(count * share)) for _kind, share, _low, _high in SIZE_MIX[1:]]
    counts.insert(0, max(1, count - sum(counts)))
    sizes = [rng.randint(low, high)
             for n, (_kind, _share, low, high) in zip(counts, SIZE_MIX, strict=True)
             for _ in range(n)]
    rng.shuffle(sizes)
    return sizes


def _text_lines(rng: random.Random, size: int) -> list[str]:
    words = ("pricing", "contract", "meeting", "renewal", "discount", "timeline", "quote",
             "thanks", "next", "week", "call", "review", "licence", "seats", "budget")
    lines: list[str] = []
    length = 0
    while length < size:
        line = " ".join(rng.choice(words) for _ in range(11))
        lines.append(line)
        length += len(line) + 2
    return lines


def make_mixed_body(recipient: str, seq: int, run_id: str, size: int,
                    attachment_block: bytes) -> bytes:
    """A ``size``-byte (about) message as mail clients send it: text and HTML alternatives
    (RFC 2046 §5.1.4), and past 50 KB one or two base64 attachments (RFC 2045 §6.8) cut from
    ``attachment_block`` (76-character base64 lines with CRLF, at least ``size`` bytes)."""
    rng = random.Random(seq)
    boundary = f"mix-{run_id}-{seq}"
    text_size = size - 600 if size < 50_000 else 6_000  # the rest: headers, boundaries
    text = _text_lines(rng, text_size // 2)
    html = "".join(f"<p>{line}</p>\r\n" for line in _text_lines(rng, text_size // 2 - 200))
    alternative = (
        f"--alt-{boundary}\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
        + "\r\n".join(text) + "\r\n"
        f"--alt-{boundary}\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
        f"<html><body>\r\n{html}</body></html>\r\n--alt-{boundary}--\r\n")
    head = (
        f"From: Alice Admin <{SENDER}>\r\n"
        f"To: <{recipient}>\r\n"
        f"Subject: Proposal follow-up {seq % 997}\r\n"
        f"Date: {formatdate(localtime=False)}\r\n"
        f"Message-ID: <bench-mix-{run_id}-{seq}@example.com>\r\n"
        "MIME-Version: 1.0\r\n")
    if size < 50_000:
        return (head + f'Content-Type: multipart/alternative; boundary="alt-{boundary}"\r\n'
                "\r\n" + alternative).encode()
    parts = [(head + f'Content-Type: multipart/mixed; boundary="{boundary}"\r\n\r\n'
              f"--{boundary}\r\n"
              f'Content-Type: multipart/alternative; boundary="alt-{boundary}"\r\n\r\n'
              + alternative).encode()]
    room = max(78, size - len(parts[0]) - 400)
    # Past 1 MB two files (a deck and a spreadsheet), else one.
    shares = ((2 * room // 3, "proposal.pdf", "application/pdf"),
              (room - 2 * room // 3, "pricing.xlsx", "application/vnd.openxmlformats-"
               "officedocument.spreadsheetml.sheet")) if room > 1_000_000 else (
        (room, "proposal.pdf", "application/pdf"),)
    offset = (seq * 7919 % 97) * 78  # a different cut of the block per message
    for length, name, ctype in shares:
        lines = max(1, length // 78)
        start = offset % max(1, len(attachment_block) - lines * 78 + 1) // 78 * 78
        parts.append(
            f"--{boundary}\r\nContent-Type: {ctype}; name={name}\r\n"
            f"Content-Disposition: attachment; filename={name}\r\n"
            "Content-Transfer-Encoding: base64\r\n\r\n".encode())
        parts.append(attachment_block[start:start + lines * 78])
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts)


def attachment_block(size: int, seed: int = 7) -> bytes:
    """Random bytes base64-encoded in 76-character CRLF lines, ``size`` bytes or a little
    more (built once per run and cut into attachments)."""
    lines = size // 78 + 2
    payload = random.Random(seed).randbytes(lines * 57)
    return base64.encodebytes(payload).replace(b"\n", b"\r\n")


def mix_factory(addresses: list[str], sizes: list[int], run_id: str | None = None,
                seed: int = 1) -> MessageFactory:
    """Messages of :func:`mix_sizes` sizes (message ``seq`` has ``sizes[seq % len]``), each
    to a random person of ``addresses`` with a unique Message-ID."""
    rid = run_id or uuid.uuid4().hex[:12]
    rng = random.Random(seed)
    picks = [rng.choice(addresses) for _ in range(min(len(addresses), 4096))]
    block = attachment_block(max(sizes) + 97 * 78)

    def make(seq: int) -> bytes:
        return make_mixed_body(picks[seq % len(picks)], seq, rid, sizes[seq % len(sizes)],
                               block)

    return make


def _dot_stuff(raw: bytes) -> bytes:
    """RFC 5321 §4.5.2: a line starting with '.' gets one more; the message ends CRLF.CRLF."""
    if raw.startswith(b"."):
        raw = b"." + raw
    raw = raw.replace(b"\r\n.", b"\r\n..")
    if not raw.endswith(b"\r\n"):
        raw += b"\r\n"
    return raw + b".\r\n"


class SmtpClient:
    """One SMTP connection on asyncio streams."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, host: str, port: int,
                      helo: str = "bench.example.com") -> SmtpClient:
        if host not in LOOPBACK:
            raise ValueError(f"the load generator only connects to loopback, not {host!r}")
        async with asyncio.timeout(30):
            reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
        client = cls(reader, writer)
        await client.expect("greeting", 220)
        await client.command("EHLO", f"EHLO {helo}", 250)
        return client

    async def reply(self) -> tuple[int, str]:
        """One (possibly multi-line, RFC 5321 §4.2.1) reply."""
        texts: list[str] = []
        while True:
            line = await self.reader.readline()
            if not line:
                raise ConnectionError("connection closed by the server")
            texts.append(line[4:].decode("utf-8", "replace").rstrip())
            if line[3:4] != b"-":
                return int(line[:3]), " ".join(texts)

    async def expect(self, step: str, want: int) -> None:
        code, text = await self.reply()
        if code != want:
            raise SmtpReplyError(step, code, text)

    async def command(self, step: str, line: str, want: int) -> None:
        self.writer.write(line.encode() + b"\r\n")
        await self.expect(step, want)

    async def send(self, mail_from: str, rcpt: str, raw: bytes) -> None:
        """One transaction; raises :class:`SmtpReplyError` on any unexpected reply."""
        try:
            await self.command("MAIL", f"MAIL FROM:<{mail_from}> SIZE={len(raw)}", 250)
            await self.command("RCPT", f"RCPT TO:<{rcpt}>", 250)
            await self.command("DATA", "DATA", 354)
            self.writer.write(_dot_stuff(raw))
            await self.expect("end of data", 250)
        except SmtpReplyError:
            # Leave the connection usable for the next transaction (§4.1.1.5).
            self.writer.write(b"RSET\r\n")
            await self.reply()
            raise

    async def close(self) -> None:
        try:
            self.writer.write(b"QUIT\r\n")
            await asyncio.wait_for(self.reply(), 5)
        except (OSError, ConnectionError, TimeoutError, ValueError):
            pass
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except OSError:
            pass


@dataclass
class _Plan:
    """Shared bookkeeping of one run's workers (one instance per run, never global)."""

    total: int
    deadline: float
    next_seq: int = 0

    def take(self) -> int | None:
        if self.next_seq >= self.total or time.monotonic() >= self.deadline:
            return None
        seq = self.next_seq
        self.next_seq += 1
        return seq


async def _worker(host: str, port: int, plan: _Plan, factory: MessageFactory,
                  per_connection: int, result: LoadResult, rcpt: str,
                  due: Callable[[int], float] | None) -> None:
    client: SmtpClient | None = None
    used = 0
    if due is not None:
        # Open loop: connect before the clock starts, as a pool of ready connections.
        try:
            client = await SmtpClient.connect(host, port)
        except (OSError, ConnectionError, TimeoutError, ValueError) as exc:
            result.errors[f"connection {type(exc).__name__}: {str(exc)[:60]}"] += 1
    while True:
        seq = plan.take()
        if seq is None:
            break
        raw = factory(seq)
        start = time.monotonic()
        if due is not None:
            at = due(seq)
            if at > start:
                await asyncio.sleep(at - start)
            start = at
        result.sent += 1
        try:
            if client is None:
                client = await SmtpClient.connect(host, port)
                used = 0
            await client.send(SENDER, rcpt, raw)
            result.ok += 1
            result.bytes_ok += len(raw)
            result.latencies.append(time.monotonic() - start)
        except SmtpReplyError as exc:
            result.errors[f"{exc.step} {exc.code} {exc.text[:60]}"] += 1
        except (OSError, ConnectionError, TimeoutError, ValueError) as exc:
            result.errors[f"connection {type(exc).__name__}: {str(exc)[:60]}"] += 1
            if client is not None:
                client.writer.close()
            client = None
            continue
        used += 1
        if client is not None and used >= per_connection:
            await client.close()
            client = None
    if client is not None:
        await client.close()


async def run_closed(host: str, port: int, factory: MessageFactory, *, total: int,
                     concurrency: int, per_connection: int, time_limit: float,
                     rcpt: str = BCC_ADDRESS) -> LoadResult:
    """``concurrency`` clients sending back to back; at most ``total`` messages or
    ``time_limit`` seconds (messages already started are finished)."""
    result = LoadResult()
    plan = _Plan(total, time.monotonic() + time_limit)
    start = time.monotonic()
    await asyncio.gather(*(
        _worker(host, port, plan, factory, per_connection, result, rcpt, None)
        for _ in range(concurrency)))
    result.elapsed = time.monotonic() - start
    return result


async def run_open(host: str, port: int, factory: MessageFactory, *, rate: float,
                   duration: float, connections: int, per_connection: int = 100,
                   rcpt: str = BCC_ADDRESS) -> LoadResult:
    """Messages due at a fixed ``rate`` per second for ``duration`` seconds, spread over up
    to ``connections`` persistent connections; latency counts from each message's due time."""
    result = LoadResult()
    total = max(1, int(rate * duration))
    start = time.monotonic() + 0.5
    plan = _Plan(total, start + duration + 30)

    def due(seq: int) -> float:
        return start + seq / rate

    await asyncio.gather(*(
        _worker(host, port, plan, factory, per_connection, result, rcpt, due)
        for _ in range(connections)))
    result.elapsed = time.monotonic() - start
    return result
