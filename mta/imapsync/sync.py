"""The sync loop of one mailbox account (docs/reliability.md E.5), run by one thread.

Per folder:

1. ``EXAMINE`` (read-only: the sync never changes the mailbox; bodies are read with
   ``BODY.PEEK[]``, which never sets ``\\Seen``) and compare UIDVALIDITY with the checkpoint.
   A new UIDVALIDITY starts a new epoch: the folder is read again from the first sync's history
   window; messages already stored are recognised by Message-ID (or content hash) and only
   counted, nothing is deleted. HIGHESTMODSEQ going down without a UIDVALIDITY change (a broken
   server, RFC 7162 §3.1.2.1) re-reads the folder the same way.
2. Unchanged UIDNEXT and HIGHESTMODSEQ: nothing to do. Otherwise walk the new UIDs in windows:
   ``UID FETCH lo:hi (RFC822.SIZE INTERNALDATE [X-GM-MSGID X-GM-THRID X-GM-LABELS])``, keep
   UIDs in the window (``n:*`` returns the last message even when n is past it), then fetch
   bodies in chunks bounded in count and bytes. A message over the size cap is read as its
   header and first text part only, and marked so (``X-Dealmail-Truncated``).
3. Every message enters the one capture path (channel ``imap``, trust ``mailbox``); each
   chunk's commits, its per-UID rows and the folder checkpoint are written in one transaction
   (each message in its own savepoint), so a crash re-reads the chunk and the unique key
   ``(account, folder, uidvalidity, uid)`` and the capture's Message-ID dedupe make the second
   reading a no-op. "Retry later" (our own fault) holds the checkpoint below that UID (tried
   again, set aside as failed after :data:`MAX_ATTEMPTS`); a refused message is recorded as
   failed with the reason and passed.
4. A chunk whose answer cannot be read (a literal over the limit, a malformed response, a
   ``NO``) is fetched again one UID at a time on a fresh connection: the culprit is recorded
   as failed and the sync goes on with the next UID.

Then the first folder is watched: IDLE (RFC 2177) renewed within ``imap.idle_seconds``, or
a poll every ``imap.poll_seconds``; any news, the cycle's end or a reconnect is followed by a
catch-up of every folder before watching again. Timers run on the injected clock.
"""

from __future__ import annotations

import imaplib
import json
import logging
import queue
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from imapclient import IMAPClient
from imapclient.exceptions import IMAPClientAbortError, IMAPClientError, ProtocolError
from imapclient.imapclient import seq_to_parenstr_upper
from imapclient.response_parser import parse_fetch_response

from crmstore import models as m
from crmstore.db import Store
from dealmail.clock import Clock, naive_utc
from dealmail.config import Config
from linking.capture import Capture, CaptureRequest, Disposition, Evidence, Outcome, Trust

from ..server import new_queue_id
from .client import (
    NETWORK_ERRORS,
    ConnectFailed,
    LiteralTooLarge,
    Planned,
    ProtocolTrouble,
    close,
    connect,
    is_throttle,
    list_folders,
    plan_folders,
    server_words,
)
from .credentials import Credentials
from .lease import Lease, LeaseLost
from .presets import Resolved

__all__ = ["MAX_ATTEMPTS", "AccountSync", "Fetched", "SyncDeps"]

log = logging.getLogger("dealmail.imap")

MAX_ATTEMPTS = 5
TEXT_CAP = 1 << 20  # first text part of an oversized message: at most 1 MiB
WINDOW_MAX = 20_000  # UIDs asked for per metadata round trip, at most
_TRUNCATED_HEADER = b"X-Dealmail-Truncated"


@dataclass
class SyncDeps:
    """What an account's sync needs from the application."""

    store: Store
    capture: Capture
    config_of: Callable[[], Config]
    clock: Clock
    base: Path
    lease: Lease
    connect: Callable[..., IMAPClient] = connect
    tick: float = 1.0  # real seconds between looks at the injected clock while waiting


@dataclass
class Fetched:
    uid: int
    raw: bytes | None
    size: int
    internaldate: datetime | None
    truncated: bool = False
    gm: dict[str, Any] = field(default_factory=dict)
    failure: str = ""  # why the message could not be read (recorded as failed)


@dataclass
class FolderStats:
    fetched: int = 0
    stored: int = 0
    repeat: int = 0
    ignored: int = 0  # read and not tracked (automatic, internal only, never-track list)
    failed: int = 0
    bytes: int = 0


class Reconnect(Exception):
    """The connection must be dropped (a reply could not be read); ``suspects`` are the UIDs
    of the chunk, read one by one on the next connection."""


def fetch_range(client: IMAPClient, spec: str, items: list[str]) -> dict[int, dict[bytes, Any]]:
    """``UID FETCH <spec> (<items>)`` for a UID range (imapclient's ``fetch`` takes only
    lists of UIDs and drops answers it did not ask for by number)."""
    imap = client._imap
    tag = imap._command("UID", "FETCH", spec, seq_to_parenstr_upper(items))
    typ, data = imap._command_complete("FETCH", tag)
    client._checkok("fetch", typ, data)
    typ, data = imap._untagged_response(typ, data, "FETCH")
    return parse_fetch_response(data, client.normalise_times, True)  # type: ignore[no-any-return]


def _is_protocol_trouble(exc: BaseException) -> bool:
    if isinstance(exc, IMAPClientAbortError | OSError):
        return False
    return isinstance(exc, ProtocolTrouble | ProtocolError | IMAPClientError | ValueError
                      | TypeError | KeyError | IndexError | AttributeError | AssertionError)


def _throttled(exc: BaseException) -> bool:
    """A server's refusal that speaks of limits (``NO [ALERT] ...limit...``): back off; our
    own exceptions never count."""
    return not isinstance(exc, ProtocolTrouble) and is_throttle(str(exc))


def _utc(value: Any) -> datetime | None:
    if not isinstance(value, datetime):
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _as_text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


class AccountSync:
    """The sync of one account (see the module docstring). One thread uses it."""

    def __init__(self, account: Resolved, deps: SyncDeps) -> None:
        self.account = account
        self.deps = deps
        self.store = deps.store
        self.credentials = Credentials(account, deps.base, deps.clock.now)
        self.account_id: int | None = None
        self.client: IMAPClient | None = None
        self.caps: frozenset[bytes] = frozenset()
        self.plan: list[Planned] = []
        self.sent_folder: str | None = None
        # UIDs of chunks whose answer could not be read: fetched one at a time next.
        self.suspects: set[tuple[str, int, int]] = set()
        # Consecutive broken connections while reading a chunk (first UID) or a UID (-UID).
        self.broken: dict[tuple[str, int, int], int] = {}
        self.healthy = False  # this connection completed a catch-up
        self.wake = threading.Event()
        self.last_stats: dict[str, FolderStats] = {}
        # Set by the service at shutdown: a long catch-up stops after the chunk it commits.
        self.stopping = threading.Event()

    # ------------------------------------------------------------------ helpers

    @property
    def config(self) -> Config:
        return self.deps.config_of()

    def now(self) -> datetime:
        return self.deps.clock.now()

    @property
    def cap(self) -> int:
        mb = self.account.mailbox
        return mb.max_message_size or self.config.limits.message_size

    def log_prefix(self) -> str:
        return f"[imap {self.account.key}]"

    # ------------------------------------------------------------------ session

    def open(self) -> IMAPClient:
        cfg = self.config.imap
        client = self.deps.connect(self.account, self.credentials, self.deps.base,
                                   timeout=cfg.timeout_seconds,
                                   max_literal=self.cap + 2 * TEXT_CAP)
        self.client = client
        self.caps = frozenset(client.capabilities())
        self.healthy = False
        if self.account_id is not None:
            with self.store.transaction():
                (m.MailboxAccount.update(capabilities=" ".join(sorted(
                    c.decode("ascii", "replace") for c in self.caps)))
                 .where(m.MailboxAccount.id == self.account_id).execute())
        return client

    def close(self) -> None:
        if self.client is not None:
            close(self.client)
            self.client = None

    def session(self, stop: threading.Event) -> None:
        """Connect, catch up, watch, catch up... until ``stop`` (or an exception)."""
        self.stopping = stop
        client = self.open()
        try:
            while not stop.is_set():
                self.catch_up(client)
                self.healthy = True
                self.record_success()
                if stop.is_set():
                    break
                self.watch(client, stop)
        finally:
            self.close()

    def catch_up(self, client: IMAPClient) -> dict[str, FolderStats]:
        gmail = b"X-GM-EXT-1" in self.caps
        self.plan, self.sent_folder = plan_folders(self.account, list_folders(client), gmail)
        stats: dict[str, FolderStats] = {}
        for planned in self.plan:
            if self.stopping.is_set():
                return stats
            if planned.role == "missing":
                log.warning("%s folder %r is configured but not on the server",
                            self.log_prefix(), planned.name)
                continue
            stats[planned.name] = self.sync_folder(client, planned.name, planned.role, gmail)
        from .sentcopy import file_sent_copies

        file_sent_copies(self, client)
        self.last_stats = stats
        return stats

    # ------------------------------------------------------------------ one folder

    def _folder_row(self, name: str, role: str) -> m.MailboxFolder:
        assert self.account_id is not None
        row = m.MailboxFolder.get_or_none((m.MailboxFolder.account == self.account_id)
                                          & (m.MailboxFolder.name == name))
        if row is None:
            with self.store.transaction():
                row, _ = m.MailboxFolder.get_or_create(account=self.account_id, name=name,
                                                       defaults={"role": role})
        return row

    def sync_folder(self, client: IMAPClient, name: str, role: str,
                    gmail: bool) -> FolderStats:
        stats = FolderStats()
        info = client.select_folder(name, readonly=True)
        uidvalidity = int(info[b"UIDVALIDITY"])
        uidnext = int(info[b"UIDNEXT"]) if b"UIDNEXT" in info else None
        exists = int(info.get(b"EXISTS", 0))
        hms = int(info[b"HIGHESTMODSEQ"]) if info.get(b"HIGHESTMODSEQ") is not None else None
        row = self._folder_row(name, role)
        now = self.now()
        prefix = self.log_prefix()
        rescan_reason = ""
        if row.uidvalidity is None:
            days = self.account.mailbox.since_days
            row.since = naive_utc(now - timedelta(days=days)) if days else None
            row.uidvalidity = uidvalidity
            row.last_uid = 0
        elif row.uidvalidity != uidvalidity:
            rescan_reason = (f"UIDVALIDITY of {name!r} changed from {row.uidvalidity} to "
                             f"{uidvalidity}")
        elif hms is not None and row.highest_modseq is not None and hms < row.highest_modseq:
            rescan_reason = (f"HIGHESTMODSEQ of {name!r} went down from {row.highest_modseq} "
                             f"to {hms} with the same UIDVALIDITY")
        if rescan_reason:
            # A new epoch: read the folder again; what is stored stays, repeats are counted.
            log.warning("%s %s: reading the folder again (nothing is deleted)", prefix,
                        rescan_reason)
            with self.store.transaction():
                row.uidvalidity, row.last_uid, row.highest_modseq = uidvalidity, 0, None
                row.epochs += 1
                row.save()
                m.AuditEntry.create(
                    at=naive_utc(now), company=self._company_id(), actor=self.account.user.address,
                    action="imap_rescan", detail_json=json.dumps(
                        {"account": self.account.key, "folder": name, "reason": rescan_reason}))
        pending_retry = self._has_retries(name, uidvalidity)
        if (uidnext is not None and uidnext - 1 <= row.last_uid and not pending_retry
                and (hms is None or hms == row.highest_modseq)):
            self._save_checkpoint(row, None, hms, uidnext)
            return stats
        if exists == 0:
            self._save_checkpoint(row, max(row.last_uid, (uidnext or 1) - 1), hms, uidnext)
            return stats
        end = (uidnext - 1) if uidnext is not None else self._max_uid(client)
        # The target of this pass, written with each chunk's checkpoint: ``imap status``
        # shows how far a long first sync is.
        row.uidnext = end + 1
        self._walk(client, row, uidvalidity, end, gmail, stats)
        if self.stopping.is_set():  # stopped between two chunks: the pass is not complete
            return stats
        self._save_checkpoint(row, None, hms, uidnext)
        log.info("%s %s: %d fetched, %d stored, %d repeats, %d not tracked, %d failed; "
                 "checkpoint %s:%s", prefix, name, stats.fetched, stats.stored, stats.repeat,
                 stats.ignored, stats.failed, uidvalidity, row.last_uid)
        return stats

    def _max_uid(self, client: IMAPClient) -> int:
        resp = fetch_range(client, "*", ["UID"])
        return max(resp) if resp else 0

    def _has_retries(self, folder: str, uidvalidity: int) -> bool:
        assert self.account_id is not None
        return bool(m.MailboxMessage.select(m.MailboxMessage.id).where(
            (m.MailboxMessage.account == self.account_id) & (m.MailboxMessage.folder == folder)
            & (m.MailboxMessage.uidvalidity == uidvalidity)
            & (m.MailboxMessage.state == "retry")).exists())

    def _save_checkpoint(self, row: m.MailboxFolder, last_uid: int | None, hms: int | None,
                         uidnext: int | None) -> None:
        with self.store.transaction():
            self.deps.lease.confirm(row.account_id)
            if last_uid is not None:
                row.last_uid = last_uid
            # HIGHESTMODSEQ is kept only once the pass is complete: unchanged next time
            # means nothing to do.
            row.highest_modseq = hms if not self._has_retries(row.name, row.uidvalidity) else None
            row.uidnext = uidnext
            row.last_sync_at = naive_utc(self.now())
            row.save()

    def _walk(self, client: IMAPClient, row: m.MailboxFolder, uidvalidity: int, end: int,
              gmail: bool, stats: FolderStats) -> None:
        """Read the new UIDs and capture them. A reader thread owns the connection and
        fetches the next chunk while this thread captures and commits the previous one
        (at most two chunks wait in between: memory stays bounded by the chunk size)."""
        chunks: queue.Queue[tuple[Any, ...]] = queue.Queue(maxsize=2)
        stop = threading.Event()

        def read() -> None:
            try:
                for item in self._read(client, row, uidvalidity, end, gmail, stats):
                    while not stop.is_set():
                        try:
                            chunks.put(item, timeout=0.2)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
                chunks.put(("end",))
            except BaseException as exc:  # handed to the committing thread, raised there
                chunks.put(("error", exc))

        reader = threading.Thread(target=read, name=f"{threading.current_thread().name}-read",
                                  daemon=True)
        reader.start()
        blocked = False  # a UID waits for a retry: the checkpoint stays below it
        try:
            while not self.stopping.is_set():
                item = chunks.get()
                if item[0] == "end":
                    break
                if item[0] == "error":
                    raise item[1]
                if item[0] == "chunk":
                    _, batch, prepared, known = item
                    blocked = self._commit(row, uidvalidity, prepared, known, stats,
                                           None if blocked else batch[-1]) or blocked
                elif item[0] == "window" and not blocked:
                    self._advance(row, item[1])
        finally:
            stop.set()
            reader.join()

    def _read(self, client: IMAPClient, row: m.MailboxFolder, uidvalidity: int, end: int,
              gmail: bool, stats: FolderStats) -> Iterator[tuple[Any, ...]]:
        """("chunk", UIDs, prepared messages, known UID rows) for each chunk, and ("window",
        last UID) after each window of UIDs was read."""
        cfg = self.config.imap
        chunk = cfg.chunk_messages
        width = max(chunk * 4, 200)
        lo = row.last_uid + 1
        since = row.since.replace(tzinfo=UTC) if row.since else None
        items = ["RFC822.SIZE", "INTERNALDATE"]
        if gmail:
            items += ["X-GM-MSGID", "X-GM-THRID", "X-GM-LABELS"]
        while lo <= end:
            hi = min(end, lo + width - 1)
            meta = fetch_range(client, f"{lo}:{hi}", items)
            # Unsolicited FETCH responses (flag changes) carry no size: not ours.
            uids = sorted(u for u in meta if lo <= u <= hi and b"RFC822.SIZE" in meta[u])
            # Adapt the window to the density of UIDs (gaps after expunges).
            if len(uids) < chunk and width < WINDOW_MAX:
                width = min(WINDOW_MAX, width * 2)
            elif len(uids) > chunk * 8:
                width = max(chunk, width // 2)
            known = self._known(row.name, uidvalidity, lo, hi)
            todo: list[int] = []
            for uid in uids:
                state = known.get(uid, (None, 0))[0]
                if state in ("done", "failed", "gone"):
                    continue
                when = _utc(meta[uid].get(b"INTERNALDATE"))
                if since is not None and when is not None and when < since:
                    continue
                todo.append(uid)
            if gmail:
                todo = self._gmail_known(row, uidvalidity, todo, meta, known)
            for batch in self._batches(todo, meta, chunk, cfg.chunk_bytes):
                fetched = self._fetch(client, row.name, uidvalidity, batch, meta, gmail)
                yield ("chunk", batch, self._prepare(row, uidvalidity, fetched, stats), known)
            yield ("window", hi)
            lo = hi + 1

    def _known(self, folder: str, uidvalidity: int, lo: int,
               hi: int) -> dict[int, tuple[str, int]]:
        q = (m.MailboxMessage.select(m.MailboxMessage.uid, m.MailboxMessage.state,
                                     m.MailboxMessage.attempts)
             .where((m.MailboxMessage.account == self.account_id)
                    & (m.MailboxMessage.folder == folder)
                    & (m.MailboxMessage.uidvalidity == uidvalidity)
                    & (m.MailboxMessage.uid >= lo) & (m.MailboxMessage.uid <= hi)).tuples())
        return {uid: (state, attempts) for uid, state, attempts in q}

    def _gmail_known(self, row: m.MailboxFolder, uidvalidity: int, todo: list[int],
                     meta: dict[int, dict[bytes, Any]],
                     known: dict[int, tuple[str, int]]) -> list[int]:
        """Gmail shows one message in several folders (labels) with one X-GM-MSGID: one
        seen in another folder already is recorded as a repeat without reading it again."""
        ids = {u: str(meta[u].get(b"X-GM-MSGID", "")) for u in todo}
        wanted = [i for i in ids.values() if i]
        if not wanted:
            return todo
        seen = {gm: email for gm, email in m.MailboxMessage.select(
            m.MailboxMessage.gm_msgid, m.MailboxMessage.email).where(
            (m.MailboxMessage.account == self.account_id)
            & m.MailboxMessage.gm_msgid.in_(wanted)
            & (m.MailboxMessage.state == "done")).tuples()}
        rest = []
        repeats = []
        for uid in todo:
            gm = ids[uid]
            if gm and gm in seen:
                repeats.append((uid, gm, seen[gm]))
            else:
                rest.append(uid)
        if repeats:
            now = naive_utc(self.now())
            with self.store.transaction():
                self.deps.lease.confirm(row.account_id)
                for uid, gm, email in repeats:
                    m.MailboxMessage.insert(
                        account=self.account_id, folder=row.name, uidvalidity=uidvalidity,
                        uid=uid, state="done", outcome="repeat", email=email, gm_msgid=gm,
                        reason="same X-GM-MSGID already synced", at=now).on_conflict_ignore(
                    ).execute()
            for uid, _, _ in repeats:
                known[uid] = ("done", 1)
        return rest

    @staticmethod
    def _batches(todo: list[int], meta: dict[int, dict[bytes, Any]], count: int,
                 size: int) -> Iterator[list[int]]:
        batch: list[int] = []
        total = 0
        for uid in todo:
            n = int(meta[uid].get(b"RFC822.SIZE", 0) or 0)
            if batch and (len(batch) >= count or total + n > size):
                yield batch
                batch, total = [], 0
            batch.append(uid)
            total += n
        if batch:
            yield batch

    # ------------------------------------------------------------------ fetching

    def _fetch(self, client: IMAPClient, folder: str, uidvalidity: int, batch: list[int],
               meta: dict[int, dict[bytes, Any]], gmail: bool) -> list[Fetched]:
        suspects = [u for u in batch if (folder, uidvalidity, u) in self.suspects]
        if suspects:
            return [self._fetch_alone(client, folder, uidvalidity, u, meta, gmail)
                    for u in batch]
        try:
            got = self._fetch_many(client, batch, meta, gmail)
        except Exception as exc:
            if not self._blame(exc, (folder, uidvalidity, batch[0])):
                raise
            log.warning("%s %s: a chunk of %d message(s) could not be read (%s); reading "
                        "them one by one", self.log_prefix(), folder, len(batch),
                        server_words(exc))
            self.suspects.update((folder, uidvalidity, u) for u in batch)
            raise Reconnect(str(exc)) from exc
        self.broken.pop((folder, uidvalidity, batch[0]), None)
        return got

    def _blame(self, exc: BaseException, key: tuple[str, int, int]) -> bool:
        """Whether the answer itself is at fault: unreadable, or the connection broke twice
        in a row at the same place (a malformed stream looks like a dropped connection)."""
        if _throttled(exc) or isinstance(exc, Reconnect):
            return False
        self.broken[key] = self.broken.get(key, 0) + 1
        return _is_protocol_trouble(exc) or self.broken[key] >= 2

    def _fetch_alone(self, client: IMAPClient, folder: str, uidvalidity: int, uid: int,
                     meta: dict[int, dict[bytes, Any]], gmail: bool) -> Fetched:
        key = (folder, uidvalidity, uid)
        try:
            got = self._fetch_many(client, [uid], meta, gmail)
        except Exception as exc:
            if not self._blame(exc, (folder, uidvalidity, -uid)):
                raise
            self.suspects.discard(key)
            reason = f"the server's answer could not be read: {server_words(exc)}"
            log.warning("%s %s UID %s: %s", self.log_prefix(), folder, uid, reason)
            # Recorded now (the connection is dropped next), then go on with the next UID.
            self._record_unreadable(folder, uidvalidity, uid, reason)
            raise Reconnect(reason) from exc
        self.suspects.discard(key)
        self.broken.pop((folder, uidvalidity, -uid), None)
        return got[0]

    def _record_unreadable(self, folder: str, uidvalidity: int, uid: int, reason: str) -> None:
        with self.store.transaction():
            m.MailboxMessage.insert(
                account=self.account_id, folder=folder, uidvalidity=uidvalidity, uid=uid,
                state="failed", outcome="unreadable", reason=reason[:2000],
                at=naive_utc(self.now())).on_conflict_ignore().execute()

    def _fetch_many(self, client: IMAPClient, batch: list[int],
                    meta: dict[int, dict[bytes, Any]], gmail: bool) -> list[Fetched]:
        cap = self.cap
        small = [u for u in batch if int(meta[u].get(b"RFC822.SIZE", 0) or 0) <= cap]
        bodies: dict[int, bytes] = {}
        if small:
            resp = client.fetch(small, ["BODY.PEEK[]"])
            for uid, data in resp.items():
                body = data.get(b"BODY[]")
                if isinstance(body, bytes) and uid in meta:
                    bodies[uid] = body
        out = []
        for uid in batch:
            item = meta[uid]
            size = int(item.get(b"RFC822.SIZE", 0) or 0)
            fetched = Fetched(uid=uid, raw=None, size=size,
                              internaldate=_utc(item.get(b"INTERNALDATE")))
            if gmail:
                fetched.gm = {"gm_msgid": str(item.get(b"X-GM-MSGID", "")),
                              "gm_thrid": str(item.get(b"X-GM-THRID", "")),
                              "labels": [_as_text(x) for x in item.get(b"X-GM-LABELS", ())]}
            if size > cap:
                fetched.raw = self._fetch_truncated(client, uid, size, cap)
                fetched.truncated = True
            else:
                fetched.raw = bodies.get(uid)
            out.append(fetched)
        return out

    def _fetch_truncated(self, client: IMAPClient, uid: int, size: int,
                         cap: int) -> bytes | None:
        """The header and the first text part of a message over the size cap."""
        resp = client.fetch([uid], ["BODY.PEEK[HEADER]", "BODYSTRUCTURE"]).get(uid)
        if not resp:
            return None
        header = resp.get(b"BODY[HEADER]")
        if not isinstance(header, bytes):
            return None
        if len(header) > cap:
            raise LiteralTooLarge(f"header block of {len(header)} bytes")
        section, multipart = _text_section(resp.get(b"BODYSTRUCTURE"))
        part_header = b""
        body = b""
        if section is not None:
            items = ([f"BODY.PEEK[{section}.MIME]", f"BODY.PEEK[{section}]<0.{TEXT_CAP}>"]
                     if multipart else [f"BODY.PEEK[TEXT]<0.{TEXT_CAP}>"])
            got = client.fetch([uid], items).get(uid, {})
            for key, value in got.items():
                k = bytes(key) if isinstance(key, bytes) else str(key).encode()
                if not isinstance(value, bytes):
                    continue
                if k.endswith(b".MIME]"):
                    part_header = value
                elif k.startswith(b"BODY["):
                    body = value
        note = (f"{_TRUNCATED_HEADER.decode()}: original of {size} bytes is over the "
                f"{cap}-byte limit; headers and text only\r\n").encode()
        if multipart:
            kept = _drop_fields(header, (b"content-type", b"content-transfer-encoding"))
            return note + kept.rstrip(b"\r\n") + b"\r\n" + (
                part_header.rstrip(b"\r\n") + b"\r\n" if part_header else b"") + b"\r\n" + body
        return note + header.rstrip(b"\r\n") + b"\r\n\r\n" + body

    # ------------------------------------------------------------------ committing

    def _company_id(self) -> int | None:
        return self.deps.capture.directory_of().company_ids.get(self.account.company)

    def _request(self, folder: str, uidvalidity: int, item: Fetched) -> CaptureRequest:
        config = self.config
        found = config.find_user(self.account.user.address)
        company = config.company(self.account.company)
        assert found is not None and company is not None
        details: dict[str, Any] = {"account": self.account.key, "folder": folder, "uid": item.uid,
                                   "uidvalidity": uidvalidity}
        details.update({k: v for k, v in item.gm.items() if v})
        if item.truncated:
            details["truncated"] = f"original {item.size} bytes"
        return CaptureRequest(
            raw=item.raw or b"", channel="imap", company=company, queue_id=new_queue_id(),
            evidence=Evidence(details=details), trust=Trust.MAILBOX, user=found[1],
            received_at=item.internaldate or self.now())

    def _prepare(self, row: m.MailboxFolder, uidvalidity: int, fetched: list[Fetched],
                 stats: FolderStats) -> list[tuple[Fetched, Any]]:
        """Read, gate and choose the originals of a chunk (the capture's ``prepare``: no
        writes), in the reader thread: this overlaps with the commit of the previous chunk."""
        prepared: list[tuple[Fetched, Any]] = []
        for item in fetched:
            stats.fetched += 1
            stats.bytes += len(item.raw or b"")
            if item.raw is None:
                prepared.append((item, None))
                continue
            try:
                prepared.append((item, self.deps.capture.prepare(
                    self._request(row.name, uidvalidity, item))))
            except Exception as exc:
                log.exception("%s %s UID %s: capture failed", self.log_prefix(), row.name,
                              item.uid)
                prepared.append((item, exc))
        return prepared

    def _commit(self, row: m.MailboxFolder, uidvalidity: int,
                prepared: list[tuple[Fetched, Any]], known: dict[int, tuple[str, int]],
                stats: FolderStats, checkpoint: int | None) -> bool:
        """Run a prepared chunk's commits, its UID rows and the checkpoint in one
        transaction (each message in its own savepoint). Returns whether a UID waits for a
        retry (then the checkpoint did not move past it)."""
        now = naive_utc(self.now())
        blocked = False
        db = self.store.db
        with self.store.transaction():
            self.deps.lease.confirm(row.account_id)
            for item, ready in prepared:
                state, outcome, reason, email = "done", "", "", None
                if ready is None:
                    state, outcome, reason = "gone", "vanished", "expunged before it was read"
                else:
                    done: Disposition | None = None
                    if isinstance(ready, Disposition):
                        done = ready
                    elif callable(ready):
                        try:
                            with db.atomic():
                                done = ready()
                        except Exception as exc:
                            log.exception("%s %s UID %s: commit failed", self.log_prefix(),
                                          row.name, item.uid)
                            ready = exc
                    if done is None:
                        state, outcome, reason = "retry", "error", f"internal error: {ready!r}"
                    elif done.outcome is Outcome.DEFERRED:
                        state, outcome, reason = "retry", done.outcome.value, done.reason
                    elif done.accepted:
                        outcome, reason = done.outcome.value, done.reason
                        email = done.email_ids[0] if done.email_ids else None
                    else:
                        state, outcome, reason = "failed", done.outcome.value, done.reason
                if state == "retry":
                    attempts = known.get(item.uid, ("", 0))[1] + 1
                    if attempts >= MAX_ATTEMPTS:
                        state, reason = "failed", f"set aside after {attempts} attempts: {reason}"
                    else:
                        blocked = True
                else:
                    attempts = known.get(item.uid, ("", 0))[1] + 1
                if state == "done":
                    if outcome == "repeat":
                        stats.repeat += 1
                    elif outcome == "ignored":
                        stats.ignored += 1
                    else:
                        stats.stored += 1
                elif state == "failed":
                    stats.failed += 1
                    log.warning("%s %s UID %s not tracked: %s", self.log_prefix(), row.name,
                                item.uid, reason)
                values = {"state": state, "outcome": outcome, "reason": reason[:2000],
                          "email": email, "gm_msgid": item.gm.get("gm_msgid") or None,
                          "truncated": item.truncated, "attempts": attempts, "at": now}
                if item.uid in known:
                    (m.MailboxMessage.update(values).where(
                        (m.MailboxMessage.account == self.account_id)
                        & (m.MailboxMessage.folder == row.name)
                        & (m.MailboxMessage.uidvalidity == uidvalidity)
                        & (m.MailboxMessage.uid == item.uid)).execute())
                else:
                    m.MailboxMessage.insert(account=self.account_id, folder=row.name,
                                            uidvalidity=uidvalidity, uid=item.uid,
                                            **values).execute()
                known[item.uid] = (state, attempts)
            if checkpoint is not None and not blocked:
                row.last_uid = max(row.last_uid, checkpoint)
                (m.MailboxFolder.update(last_uid=row.last_uid, uidvalidity=uidvalidity,
                                        since=row.since, last_sync_at=now,
                                        uidnext=row.uidnext)
                 .where(m.MailboxFolder.id == row.id).execute())
        return blocked

    def _advance(self, row: m.MailboxFolder, uid: int) -> None:
        if uid <= row.last_uid:
            return
        with self.store.transaction():
            self.deps.lease.confirm(row.account_id)
            row.last_uid = uid
            (m.MailboxFolder.update(last_uid=uid, uidvalidity=row.uidvalidity, since=row.since)
             .where(m.MailboxFolder.id == row.id).execute())

    # ------------------------------------------------------------------ watching

    def watch(self, client: IMAPClient, stop: threading.Event) -> str:
        """Wait for news on the first folder (IDLE, else polling) within one cycle; returns
        why it stopped waiting."""
        cfg = self.config.imap
        deadline = self.now() + timedelta(seconds=min(cfg.idle_seconds, cfg.poll_seconds))
        watched = next((p.name for p in self.plan if p.role != "missing"), "INBOX")
        from .sentcopy import sent_copies_due

        ticks = 0
        if b"IDLE" not in self.caps:
            while not stop.is_set():
                if self.now() >= deadline:
                    return "poll"
                if self.wake.is_set():
                    self.wake.clear()
                    return "woken"
                stop.wait(self.deps.tick)
                ticks += 1
                self._keep_lease()
                if ticks % 10 == 0 and sent_copies_due(self):
                    return "sent copies"
            return "stop"
        client.select_folder(watched, readonly=True)
        client.idle()
        why = "stop"
        try:
            while not stop.is_set():
                responses = client.idle_check(timeout=self.deps.tick)
                if any((len(r) > 1 and r[1] in (b"EXISTS", b"EXPUNGE", b"FETCH", b"VANISHED"))
                       or (r and r[0] == b"BYE") for r in responses):
                    why = "news"
                    break
                if self.now() >= deadline:
                    why = "cycle"
                    break
                if self.wake.is_set():
                    self.wake.clear()
                    why = "woken"
                    break
                ticks += 1
                self._keep_lease()
                if ticks % 10 == 0 and sent_copies_due(self):
                    why = "sent copies"
                    break
        finally:
            client.idle_done()
        return why

    def _keep_lease(self) -> None:
        assert self.account_id is not None
        if not self.deps.lease.renew_if_due(self.account_id):
            raise LeaseLost(self.account.key)

    # ------------------------------------------------------------------ health

    def record_success(self) -> None:
        assert self.account_id is not None
        with self.store.transaction():
            (m.MailboxAccount.update(state="ok", failures=0, failing_since=None,
                                     next_retry_at=None, last_error="",
                                     last_sync_at=naive_utc(self.now()))
             .where(m.MailboxAccount.id == self.account_id).execute())

    def record_failure(self, exc: BaseException, delay: timedelta, *, failing: bool) -> None:
        """Store the error and when to try again. ``failing``: the account is in trouble (the
        user is told once in the digest); otherwise a dropped connection is only resumed."""
        assert self.account_id is not None
        now = naive_utc(self.now())
        words = server_words(exc)
        with self.store.transaction():
            row = m.MailboxAccount.get_by_id(self.account_id)
            fields: dict[Any, Any] = {
                m.MailboxAccount.last_error: words[:2000],
                m.MailboxAccount.next_retry_at: now + delay,
            }
            if failing:
                fields[m.MailboxAccount.failures] = row.failures + 1
                fields[m.MailboxAccount.state] = "failing"
                if row.failing_since is None:
                    fields[m.MailboxAccount.failing_since] = now
            m.MailboxAccount.update(fields).where(m.MailboxAccount.id == self.account_id).execute()


def failure_kind(exc: BaseException) -> str:
    """auth | security | throttle | network | protocol | internal."""
    from .client import AuthFailed, ImapSecurityError
    from .credentials import CredentialError

    if isinstance(exc, AuthFailed | CredentialError):
        return "auth"
    if isinstance(exc, ImapSecurityError):
        return "security"
    if _throttled(exc):
        return "throttle"
    if isinstance(exc, Reconnect):
        return "protocol"
    if isinstance(exc, (ConnectFailed, imaplib.IMAP4.abort, *NETWORK_ERRORS)):
        return "network"
    if _is_protocol_trouble(exc):
        return "protocol"
    return "internal"


# --------------------------------------------------------------------------- MIME helpers

_FIELD_RE = re.compile(rb"^([^:\s]+)\s*:", re.ASCII)


def _drop_fields(header: bytes, names: tuple[bytes, ...]) -> bytes:
    out: list[bytes] = []
    skipping = False
    for line in header.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and out is not None:
            if not skipping:
                out.append(line)
            continue
        match = _FIELD_RE.match(line)
        skipping = bool(match and match.group(1).lower() in names)
        if not skipping:
            out.append(line)
    return b"".join(out)


def _text_section(structure: Any) -> tuple[str | None, bool]:
    """The section number of the first text/plain part (else text/html) of a
    BODYSTRUCTURE, and whether the message is multipart."""
    if structure is None:
        return None, False
    try:
        multipart = bool(structure.is_multipart)
    except AttributeError:
        return None, False
    if not multipart:
        kind = _as_text(structure[0]).lower()
        return ("1", False) if kind == "text" else (None, False)
    found: dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        parts = node[0]
        for i, part in enumerate(parts, start=1):
            section = f"{prefix}{i}"
            if getattr(part, "is_multipart", False):
                walk(part, f"{section}.")
                continue
            kind = f"{_as_text(part[0]).lower()}/{_as_text(part[1]).lower()}"
            if kind in ("text/plain", "text/html") and kind not in found:
                found[kind] = section

    walk(structure, "")
    section = found.get("text/plain") or found.get("text/html")
    return section, True
