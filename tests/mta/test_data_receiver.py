"""mta.server.DataReceiver reads DATA in chunks with exactly the rules of the line-by-line
read it replaced: a stream reader with a line limit, ``readuntil(CRLF)`` per line, the final
dot only as a line of its own, dot-unstuffing, a line too long (554) and data too big (552)
decided after the final dot. The reference below is that line-by-line loop, run on a real
``asyncio.StreamReader`` fed in random pieces; random inputs made of the smuggling pieces
(bare LF, bare CR, dots) and lines around the limit must give the same message, the same
refusal, the same longest line (of an accepted message) and the same bytes left for the
command loop."""

from __future__ import annotations

import asyncio
import itertools
import random

import pytest

from mta.server import DataReceiver

PIECES = [b"a", b"b", b".", b"..", b"\r", b"\n", b"\r\n", b"\r\n.", b"\r\n..", b"\n.\n",
          b"\n.\r\n", b"\r.\r", b"\r\n.\n", b" ", b"\x00"]

Outcome = tuple[bytes | None, bool, bool, int, bytes]


async def _line_by_line(pieces: list[bytes], line_limit: int, size_limit: int) -> Outcome:
    """The DATA loop as it was (mta/server.py before the chunked read)."""
    reader = asyncio.StreamReader(limit=line_limit)

    async def produce() -> None:
        for piece in pieces:
            reader.feed_data(piece)
            await asyncio.sleep(0)
        reader.feed_eof()

    producer = asyncio.ensure_future(produce())
    buf = bytearray()
    received = longest = 0
    too_long = too_much = partial = False
    while True:
        try:
            line = await reader.readuntil(b"\r\n")
        except asyncio.LimitOverrunError as exc:
            too_long = True
            await reader.read(exc.consumed)
            partial = True
            continue
        if partial:
            partial = False
            continue
        if line == b".\r\n":
            break
        received += len(line)
        if size_limit and received > size_limit:
            too_much = True
        if too_long or too_much:
            continue
        size = len(line)
        if size > longest:
            if size > line_limit:
                too_long = True
                continue
            longest = size
        buf += memoryview(line)[1:] if line.startswith(b".") else line
    await producer
    rest = await reader.read()
    if too_long or too_much:  # a refusal: no message, and its longest line is not used
        return None, too_long, too_much, -1, rest
    return bytes(buf), too_long, too_much, longest, rest


def _chunked(data: bytes, cuts: list[int], line_limit: int, size_limit: int) -> Outcome:
    receiver = DataReceiver(line_limit, size_limit)
    start = 0
    for cut in [*cuts, len(data)]:
        rest = receiver.feed(data[start:cut])
        if rest is not None:
            rest += data[cut:]
            break
        start = cut
    else:
        raise AssertionError("no end of data")
    if receiver.too_long or receiver.too_much:
        return None, receiver.too_long, receiver.too_much, -1, rest
    return receiver.content(), False, False, receiver.longest, rest


def _random_case(rng: random.Random) -> tuple[bytes, int, int]:
    line_limit = rng.randint(6, 24)
    size_limit = rng.choice([0, 0, rng.randint(5, 200)])
    parts = []
    for _ in range(rng.randint(0, 40)):
        if rng.random() < 0.15:  # a line around the limit
            parts.append(b"x" * rng.randint(line_limit - 4, line_limit + 6) + b"\r\n")
        else:
            parts.append(rng.choice(PIECES))
    data = b"".join(parts) + rng.choice([b"\r\n.\r\n", b".\r\n"]) + rng.choice(
        [b"", b"QUIT\r\n", b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\n"])
    return data, line_limit, size_limit


def _pieces(rng: random.Random, data: bytes) -> list[int]:
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(0, 12))))
    return cuts


@pytest.mark.parametrize("seed", range(8))
def test_chunked_read_matches_the_line_by_line_read(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(400):
        data, line_limit, size_limit = _random_case(rng)
        cuts_a, cuts_b = _pieces(rng, data), _pieces(rng, data)
        bounds = [0, *cuts_a, len(data)]
        pieces = [data[a:b] for a, b in itertools.pairwise(bounds)]
        try:
            want = asyncio.run(_line_by_line(pieces, line_limit, size_limit))
        except asyncio.IncompleteReadError:
            continue  # the final dot was inside a line too long: no end (both wait on)
        got = _chunked(data, cuts_b, line_limit, size_limit)
        assert got == want, (data, line_limit, size_limit, cuts_b)


def test_the_end_is_only_a_dot_line_of_its_own() -> None:
    r = DataReceiver(1000)
    assert r.feed(b"a\n.\nb\r.\rc\n.\r\nd\r\n..\r\n") is None  # smuggling pieces are data
    assert r.feed(b".\r") is None
    assert r.feed(b"\nNOOP\r\n") == b"NOOP\r\n"
    assert r.content() == b"a\n.\nb\r.\rc\n.\r\nd\r\n.\r\n"


def test_a_line_too_long_is_drained_without_holding_it() -> None:
    r = DataReceiver(100)
    assert r.feed(b"ok\r\n") is None
    for _ in range(100):
        assert r.feed(b"y" * 1000) is None
        assert len(r.carry) <= 101
    assert r.feed(b"\r\n.\r\n") == b""
    assert r.too_long and not r.too_much
