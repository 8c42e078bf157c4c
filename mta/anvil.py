"""Per-client counters shared by every worker process on this host, in the spirit of Postfix's
anvil(8): simultaneous connections, connection and message rates per client address, and the
failed-login counters of the submission listeners.

Why a memory-mapped table and not the database or a server process: the counters are touched on
every connection and every MAIL, from whichever pre-fork worker the kernel gave the connection
to (``dealmail/prefork.py``), and must agree across workers. A database row per connection
would put a write transaction (SQLite's single write lock) on the path of every client; an
anvil-like service in the parent process would cost a round trip over a socket per connection
and make the supervisor a server. A fixed-size table in a file that every process maps
(``mmap``), updated under an exclusive ``flock`` held for a few microseconds, costs one lock
and one hash probe per update (measured on 2 cores: 27 µs for a connection's count and
release, 9 µs per MAIL, against 2-3 ms of CPU per ingested message), needs no process of its
own, survives a worker's crash (the kernel drops the lock with the process; the worker's open
connections are kept in its own column, which the worker started in its place clears), and
can be read and changed by ``dealmail auth status|unlock`` while the server runs.

Layout: a 64-byte header (magic, version, worker count, slots, slot size), then ``SLOTS``
slots addressed by a 16-byte BLAKE2b digest of the key with linear probing. A slot is never
emptied, only reused once it holds no open connection and every window and lock in it has
expired, so probe chains never break. When no slot can be had within ``_MAX_PROBE`` probes the
table fails open (the connection is served, the login checked without a counter) and says so
in the log: it must never refuse mail because of its own capacity.

Times are the injected clock's (seconds since the epoch), so tests move windows with
``FakeClock``.
"""

from __future__ import annotations

import fcntl
import hashlib
import ipaddress
import logging
import mmap
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "KIND_ACCOUNT",
    "KIND_ACCOUNT_CLIENT",
    "KIND_CLIENT",
    "ClientTable",
    "Counters",
    "client_key",
    "table_path",
]

log = logging.getLogger("dealmail.anvil")

_MAGIC = b"DMANVIL1"
_HEADER = struct.Struct("<8sIIII")  # magic, version, workers, slots, slot size
_HEADER_SIZE = 64
_VERSION = 1
SLOTS = 16384
_MAX_PROBE = 64
_MAX_WORKERS = 64

KIND_CLIENT = 1  # a client address (IPv6: its /64)
KIND_ACCOUNT = 2  # a login, whatever the address
KIND_ACCOUNT_CLIENT = 3  # a login from one client address

# key digest, kind, label (for `dealmail auth status`), client hash, account hash
_ID = struct.Struct("<16sB95s8s8s")
# expires, connection window end, count, message window end, count, failure window end,
# count, locked until (each window is fixed: it starts at its first event, like anvil's
# rate time unit)
_NUM = struct.Struct("<ddIdIdId")
_ZERO_KEY = b"\0" * 16


@dataclass
class Counters:
    """The numbers of one slot, as read under the lock (times in clock seconds)."""

    kind: int
    label: str
    expires: float
    conn_until: float  # end of the connection-rate window
    conn_count: int
    msg_until: float  # end of the message-rate window
    msg_count: int
    fail_until: float  # end of the failed-login window
    fail_count: int
    locked_until: float
    connections: int  # open now, all workers together


def client_key(ip: str) -> str:
    """The address a client is counted by: IPv4 as it is (an IPv4-mapped IPv6 address as its
    IPv4), IPv6 by its /64, the usual allocation to one site (RFC 6177): an attacker with one
    prefix has 2^64 addresses."""
    try:
        addr = ipaddress.ip_address(ip.strip().strip("[]"))
    except ValueError:
        return ip[:64]
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.ip_network(f"{addr}/64", strict=False))
    return str(addr)


def table_path(database_url: str, base: Path) -> Path:
    """Where the table of a server lives: next to its SQLite file, or under ``base/var`` named
    after its PostgreSQL database (one table per database per host)."""
    if database_url.startswith("sqlite:///") and not database_url.endswith(":memory:"):
        path = Path(database_url[len("sqlite:///"):])
        if not path.is_absolute():
            path = base / path
        return path.with_name(path.name + ".clients")
    digest = hashlib.blake2b(database_url.encode(), digest_size=6).hexdigest()
    return base / "var" / f"clients-{digest}.tbl"


def _digest(key: str) -> bytes:
    return hashlib.blake2b(key.encode("utf-8", "surrogateescape"), digest_size=16).digest()


def _short(value: str) -> bytes:
    return hashlib.blake2b(value.encode("utf-8", "surrogateescape"), digest_size=8).digest()


class ClientTable:
    """One process's view of the shared table (see the module docstring). Used from one
    thread per process (the event loop; the CLI's main thread)."""

    def __init__(self, path: Path, fd: int, mapped: mmap.mmap, workers: int, slots: int,
                 slot_size: int) -> None:
        self.path = path
        self._fd = fd
        self._map = mapped
        self.workers = workers
        self.slots = slots
        self._slot_size = slot_size
        self._conn = struct.Struct(f"<{workers}H")
        self._warned_full = 0.0
        self.closed = False

    # ------------------------------------------------------------------ opening

    @classmethod
    def prepare(cls, path: Path, workers: int, slots: int = SLOTS) -> None:
        """Before the workers start (the pre-fork parent, or a single-process server): make
        the file, or keep its counters when its shape fits, with every open-connection count
        cleared (no process serves anything yet)."""
        if not 1 <= workers <= _MAX_WORKERS:
            raise ValueError(f"workers must be between 1 and {_MAX_WORKERS}")
        slot_size = _slot_size(workers)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            size = _HEADER_SIZE + slots * slot_size
            header = os.pread(fd, _HEADER.size, 0)
            fits = (len(header) == _HEADER.size
                    and _HEADER.unpack(header) == (_MAGIC, _VERSION, workers, slots, slot_size)
                    and os.fstat(fd).st_size == size)
            if not fits:
                os.ftruncate(fd, 0)
                os.ftruncate(fd, size)  # a sparse file of zeros: every slot never used
                os.pwrite(fd, _HEADER.pack(_MAGIC, _VERSION, workers, slots, slot_size), 0)
        finally:
            os.close(fd)  # closing drops the lock
        if fits:
            table = cls.open(path)
            try:
                for worker in range(workers):
                    table.clear_worker(worker)
            finally:
                table.close()

    @classmethod
    def open(cls, path: Path) -> ClientTable:
        """Map a prepared table (a worker process, ``dealmail auth``)."""
        fd = os.open(path, os.O_RDWR)
        try:
            header = os.pread(fd, _HEADER.size, 0)
            if len(header) != _HEADER.size:
                raise ValueError(f"{path}: not a dealmail client table")
            magic, version, workers, slots, slot_size = _HEADER.unpack(header)
            if magic != _MAGIC or version != _VERSION or slot_size != _slot_size(workers):
                raise ValueError(f"{path}: not a dealmail client table of this version")
            mapped = mmap.mmap(fd, _HEADER_SIZE + slots * slot_size)
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, mapped, workers, slots, slot_size)

    def close(self) -> None:
        self.closed = True
        self._map.close()
        os.close(self._fd)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        if self.closed:
            raise ValueError(f"client table {self.path} is closed")
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    # ------------------------------------------------------------------ slots

    def _offset(self, slot: int) -> int:
        return _HEADER_SIZE + slot * self._slot_size

    def _connections(self, offset: int) -> int:
        return sum(self._conn.unpack_from(self._map, offset + _ID.size + _NUM.size))

    def _find(self, key: str, now: float, create: bool, kind: int = 0, label: str = "",
              client: str = "", account: str = "") -> int | None:
        """The offset of ``key``'s slot; with ``create``, a fresh or reused one when it has
        none (None when the table is full)."""
        digest = _digest(key)
        start = int.from_bytes(digest[:8], "little") % self.slots
        reusable = -1
        for probe in range(_MAX_PROBE):
            offset = self._offset((start + probe) % self.slots)
            held = self._map[offset:offset + 16]
            if held == digest:
                return offset
            if held == _ZERO_KEY:
                if not create:
                    return None
                if reusable < 0:
                    reusable = offset
                break
            if reusable < 0 and create:
                expires = struct.unpack_from("<d", self._map, offset + _ID.size)[0]
                if expires <= now and self._connections(offset) == 0:
                    reusable = offset
        if reusable < 0:
            if create and now - self._warned_full > 60:
                self._warned_full = now
                log.warning("client table %s is full: limits not applied to %s", self.path,
                            label or key)
            return None
        self._map[reusable:reusable + self._slot_size] = bytes(self._slot_size)
        _ID.pack_into(self._map, reusable, digest, kind,
                      label.encode("utf-8", "replace")[:95],
                      _short(client) if client else b"", _short(account) if account else b"")
        return reusable

    def _read(self, offset: int) -> list[float | int]:
        return list(_NUM.unpack_from(self._map, offset + _ID.size))

    def _write(self, offset: int, values: list[float | int]) -> None:
        # expires: the slot may be reused once every window and the lock have run out.
        values[0] = max(values[1], values[3], values[5], values[7])
        _NUM.pack_into(self._map, offset + _ID.size, *values)

    def _conn_add(self, offset: int, worker: int, delta: int) -> None:
        at = offset + _ID.size + _NUM.size + 2 * worker
        value = struct.unpack_from("<H", self._map, at)[0] + delta
        struct.pack_into("<H", self._map, at, min(max(value, 0), 0xFFFF))

    def clear_worker(self, worker: int) -> None:
        """Forget the open connections counted by ``worker`` (a worker process starting in
        the place of one that died: its connections died with it)."""
        at = _ID.size + _NUM.size + 2 * worker
        with self._locked():
            for slot in range(self.slots):
                offset = self._offset(slot)
                if self._map[offset:offset + 16] != _ZERO_KEY:
                    struct.pack_into("<H", self._map, offset + at, 0)

    # ------------------------------------------------------------------ connections

    def connect(self, client: str, worker: int, now: float, window: float,
                max_connections: int, max_rate: int) -> str | None:
        """Count a new connection of ``client``; the reason to refuse it, or None. A refused
        connection counts towards the rate (a client hammering stays refused) but is not
        counted as open."""
        with self._locked():
            offset = self._find("c:" + client, now, True, KIND_CLIENT, client, client=client)
            if offset is None:
                return None
            values = self._read(offset)
            if values[1] <= now:
                values[1], values[2] = now + window, 0  # a new window, ending then
            values[2] += 1
            refusal = None
            if max_connections and self._connections(offset) >= max_connections:
                refusal = "connections"
            elif max_rate and values[2] > max_rate:
                refusal = "rate"
            else:
                self._conn_add(offset, worker, 1)
            self._write(offset, values)
            return refusal

    def disconnect(self, client: str, worker: int, now: float) -> None:
        with self._locked():
            offset = self._find("c:" + client, now, False)
            if offset is not None:
                self._conn_add(offset, worker, -1)

    def message(self, client: str, now: float, window: float, max_rate: int) -> bool:
        """Count one MAIL of ``client``; False when it is over ``max_rate`` per window."""
        with self._locked():
            offset = self._find("c:" + client, now, True, KIND_CLIENT, client, client=client)
            if offset is None:
                return True
            values = self._read(offset)
            if values[3] <= now:
                values[3], values[4] = now + window, 0
            values[4] += 1
            self._write(offset, values)
            return values[4] <= max_rate

    # ------------------------------------------------------------------ logins

    @staticmethod
    def _auth_keys(client: str, account: str | None) -> list[tuple[str, int, str, str, str]]:
        keys = [("c:" + client, KIND_CLIENT, client, client, "")]
        if account:
            keys.append(("a:" + account, KIND_ACCOUNT, account, "", account))
            keys.append((f"p:{account}|{client}", KIND_ACCOUNT_CLIENT,
                         f"{account} from {client}", client, account))
        return keys

    def counters(self, key: str, now: float) -> Counters | None:
        """The counters of ``key`` ("c:CLIENT", "a:LOGIN", "p:LOGIN|CLIENT"), or None."""
        with self._locked():
            offset = self._find(key, now, False)
            return None if offset is None else self._counters(offset)

    def _counters(self, offset: int) -> Counters:
        kind, label = _ID.unpack_from(self._map, offset)[1:3]
        values = self._read(offset)
        return Counters(kind, label.rstrip(b"\0").decode("utf-8", "replace"), values[0],
                        values[1], int(values[2]), values[3], int(values[4]), values[5],
                        int(values[6]), values[7], self._connections(offset))

    def login_failure(self, client: str, account: str | None, now: float, window: float,
                      lockout: float, limits: dict[int, int]) -> dict[int, int]:
        """Count a failed login of ``account`` from ``client``: per client, per account and
        per (account, client). A kind with a limit in ``limits`` whose count reaches it is
        locked for ``lockout`` seconds. Returns the failure count of each kind."""
        counts: dict[int, int] = {}
        with self._locked():
            for key, kind, label, c, a in self._auth_keys(client, account):
                offset = self._find(key, now, True, kind, label, client=c, account=a)
                if offset is None:
                    continue
                values = self._read(offset)
                if values[5] <= now:
                    values[5], values[6] = now + window, 0
                values[6] += 1
                counts[kind] = int(values[6])
                limit = limits.get(kind)
                if limit and values[6] >= limit:
                    values[7] = now + lockout
                    values[5], values[6] = now, 0  # counting starts again after the lock
                self._write(offset, values)
        return counts

    def login_success(self, client: str, account: str, now: float) -> None:
        """A correct password from ``client`` clears the failures of that pair only (the
        account's own count goes on slowing a guesser elsewhere until its window ends)."""
        with self._locked():
            offset = self._find(f"p:{account}|{client}", now, False)
            if offset is not None:
                values = self._read(offset)
                values[5], values[6] = 0.0, 0
                self._write(offset, values)

    def locked(self, client: str, account: str | None, now: float) -> float:
        """Until when logins from ``client`` (as ``account``) are refused; 0 when they are
        not. An account is never locked as such: only a client, or an account from one
        client."""
        until = 0.0
        with self._locked():
            for key, kind, *_rest in self._auth_keys(client, account):
                if kind == KIND_ACCOUNT:
                    continue
                offset = self._find(key, now, False)
                if offset is not None:
                    locked = self._read(offset)[7]
                    if locked > now:
                        until = max(until, locked)
        return until

    def account_failures(self, account: str, now: float) -> int:
        """Failed logins of ``account`` within its current window, from any client."""
        with self._locked():
            offset = self._find("a:" + account, now, False)
            if offset is None:
                return 0
            values = self._read(offset)
            return int(values[6]) if values[5] > now else 0

    def login_entries(self, now: float) -> list[Counters]:
        """Every slot with failures in their window or a lock still running."""
        out = []
        with self._locked():
            for slot in range(self.slots):
                offset = self._offset(slot)
                if self._map[offset:offset + 16] == _ZERO_KEY:
                    continue
                c = self._counters(offset)
                if (c.fail_until > now and c.fail_count) or c.locked_until > now:
                    out.append(c)
        return out

    def unlock(self, client: str | None = None, account: str | None = None) -> int:
        """Clear failures and locks of every slot about ``client`` or ``account`` (the
        client itself, the account itself, and each pair); returns how many were cleared."""
        want_client = _short(client) if client else None
        want_account = _short(account) if account else None
        cleared = 0
        with self._locked():
            for slot in range(self.slots):
                offset = self._offset(slot)
                if self._map[offset:offset + 16] == _ZERO_KEY:
                    continue
                _d, _kind, _label, c, a = _ID.unpack_from(self._map, offset)
                if (want_client is not None and c == want_client) or (
                        want_account is not None and a == want_account):
                    values = self._read(offset)
                    if values[6] or values[7]:
                        cleared += 1
                    values[5], values[6], values[7] = 0.0, 0, 0.0
                    self._write(offset, values)
        return cleared


def _slot_size(workers: int) -> int:
    size = _ID.size + _NUM.size + 2 * workers
    return (size + 7) // 8 * 8
