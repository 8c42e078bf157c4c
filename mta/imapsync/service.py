"""The mailbox sync service: one thread per configured mailbox account (imapclient is
blocking), started and stopped by the application.

Each thread claims its account's lease (:mod:`.lease`), runs :meth:`AccountSync.session`
(connect, catch up, watch, catch up...) and on any failure records it and waits before the
next attempt: exponential back-off with jitter on the injected clock for a failing account
(wrong password, refused certificate, throttling, an unreachable server), a short pause for a
connection that dropped after a good catch-up. One account's trouble never touches another
account's thread or the rest of the server. A config reload starts and stops threads for
added and removed mailboxes.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from crmstore import models as m
from crmstore.db import Store
from dealmail.clock import Clock, naive_utc
from dealmail.config import Config
from linking.capture import Capture

from .client import connect
from .lease import Lease, LeaseLost, ensure_account
from .presets import Resolved, check_mailboxes, resolve
from .sync import AccountSync, Reconnect, SyncDeps, failure_kind

__all__ = ["AccountRunner", "SyncService", "backoff"]

log = logging.getLogger("dealmail.imap")


def backoff(failures: int, first: float, most: float, rng: random.Random) -> timedelta:
    """Delay before the next attempt after ``failures`` consecutive failures: doubling from
    ``first`` up to ``most``, with ±20% jitter so that accounts failing together (a server
    outage) do not come back together."""
    base = min(most, first * (2 ** max(0, failures - 1)))
    return timedelta(seconds=base * rng.uniform(0.8, 1.2))


def configured_accounts(config: Config) -> tuple[dict[str, Resolved], list[str]]:
    """Every mailbox that can be synced, by account key, and the problems of the others."""
    accounts: dict[str, Resolved] = {}
    problems = []
    for company in config.companies:
        for user in company.users:
            for mb in user.mailboxes:
                try:
                    resolved = resolve(user, mb)
                except ValueError as exc:
                    problems.append(f"{config.path}:{mb.line}: {mb.key}: {exc}")
                    continue
                accounts.setdefault(resolved.key, resolved)
    return accounts, problems


class AccountRunner(threading.Thread):
    def __init__(self, service: SyncService, account: Resolved) -> None:
        super().__init__(name=f"imap-{account.key}"[:60], daemon=True)
        self.service = service
        self.account = account
        self.stop_event = threading.Event()
        self.sync = AccountSync(account, service.deps)
        self.holding = False  # this thread holds the account's lease

    def run(self) -> None:
        deps = self.service.deps
        sync = self.sync
        try:
            sync.account_id = ensure_account(deps.store, self.account.key,
                                             self.account.user.address)
        except Exception:
            log.exception("[imap %s] cannot create the account row", self.account.key)
            return
        while not self.stop_event.is_set():
            try:
                self._once()
            except Exception:  # never let the thread die: log, wait, try again
                log.exception("[imap %s] sync loop error", self.account.key)
                self.stop_event.wait(deps.tick)
        try:
            deps.lease.release(sync.account_id)
        except Exception:
            log.exception("[imap %s] lease not released", self.account.key)

    def _wait(self, seconds: float | None = None) -> None:
        self.stop_event.wait(self.service.deps.tick if seconds is None else seconds)

    def _once(self) -> None:
        deps = self.service.deps
        sync = self.sync
        account_id = sync.account_id
        assert account_id is not None
        # Renewed only when due while held (a read per look, a write now and then).
        self.holding = (self.holding and deps.lease.renew_if_due(account_id)) or \
            deps.lease.acquire(account_id)
        if not self.holding:
            self._wait()
            return
        row = m.MailboxAccount.get_by_id(account_id)
        now = naive_utc(deps.clock.now())
        if row.next_retry_at is not None and now < row.next_retry_at:
            if sync.wake.is_set() and row.state != "failing":
                sync.wake.clear()
            else:
                self._wait()
                return
        try:
            sync.session(self.stop_event)
        except LeaseLost:
            self.holding = False
            log.info("[imap %s] lease taken over by another process", self.account.key)
        except Exception as exc:
            kind = failure_kind(exc)
            cfg = deps.config_of().imap
            # Reading a chunk again one UID at a time, or a drop after a good catch-up (BYE,
            # reset): reconnect soon, then catch up before watching again.
            failing = not (isinstance(exc, Reconnect) or (sync.healthy and kind == "network"))
            if failing:
                delay = backoff(row.failures + 1, cfg.retry_first_seconds,
                                cfg.retry_max_seconds, self.service.rng)
            else:
                delay = timedelta(seconds=min(5.0, cfg.retry_first_seconds))
            if kind == "internal":
                log.exception("[imap %s] internal error", self.account.key)
            log.warning("[imap %s] %s failure: %s; next attempt in %.0fs", self.account.key,
                        kind, exc, delay.total_seconds())
            sync.record_failure(exc, delay, failing=failing)


class SyncService:
    """Runs every configured mailbox account in its own thread."""

    def __init__(self, store: Store, capture: Capture, config_of: Callable[[], Config],
                 clock: Clock, base: Path, *, holder: str | None = None,
                 rng: random.Random | None = None, connect_fn: Callable[..., Any] = connect,
                 tick: float = 1.0) -> None:
        self.holder = holder or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.rng = rng or random.Random()
        lease = Lease(store, self.holder, clock.now,
                      lambda: config_of().imap.lease_seconds)
        self.deps = SyncDeps(store=store, capture=capture, config_of=config_of, clock=clock,
                             base=base, lease=lease, connect=connect_fn, tick=tick)
        self.runners: dict[str, AccountRunner] = {}
        self._lock = threading.Lock()

    def start(self) -> None:
        self.refresh()

    def refresh(self) -> None:
        """Start threads for configured accounts not running; stop removed ones."""
        config = self.deps.config_of()
        wanted, problems = configured_accounts(config) if config.imap.enabled else ({}, [])
        for problem in problems:
            log.error("mailbox not synced: %s", problem)
        for problem in check_mailboxes(config, self.deps.base) if config.imap.enabled else []:
            log.warning("mailbox configuration: %s", problem)
        with self._lock:
            for key in list(self.runners):
                runner = self.runners[key]
                if key not in wanted or runner.account != wanted[key] or not runner.is_alive():
                    runner.stop_event.set()
                    runner.join(30)
                    del self.runners[key]
            for key, account in wanted.items():
                if key not in self.runners:
                    runner = AccountRunner(self, account)
                    self.runners[key] = runner
                    runner.start()
        if wanted:
            log.info("mailbox sync: %d account(s)", len(wanted))

    def wake(self, key: str | None = None) -> None:
        for k, runner in list(self.runners.items()):
            if key is None or k == key:
                runner.sync.wake.set()

    def stop(self, timeout: float = 30.0) -> None:
        with self._lock:
            for runner in self.runners.values():
                runner.stop_event.set()
            for runner in self.runners.values():
                runner.join(timeout)
            self.runners.clear()

    def sync_of(self, key: str) -> AccountSync:
        return self.runners[key].sync


def status(config: Config) -> list[dict[str, Any]]:
    """``dealmail imap status``: per configured account, its state and checkpoints (reads
    the store only)."""
    accounts, problems = configured_accounts(config)
    out = []
    for key, account in accounts.items():
        row = m.MailboxAccount.get_or_none(m.MailboxAccount.key == key)
        entry: dict[str, Any] = {"account": key, "user": account.user.address,
                                 "provider": account.preset.name, "host": account.host,
                                 "state": "never synced", "folders": []}
        if row is not None:
            tracked = (m.MailboxMessage.select().where(
                (m.MailboxMessage.account == row.id) & (m.MailboxMessage.state == "done")
                & m.MailboxMessage.email.is_null(False)).count())
            failed = (m.MailboxMessage.select().where(
                (m.MailboxMessage.account == row.id)
                & (m.MailboxMessage.state == "failed")).count())
            entry.update({
                "state": row.state, "last_sync": _iso(row.last_sync_at),
                "last_error": row.last_error or None,
                "next_retry": _iso(row.next_retry_at) if row.state == "failing" else None,
                "failing_since": _iso(row.failing_since), "failures": row.failures,
                "messages_tracked": tracked, "messages_failed": failed,
                "lease_holder": row.lease_holder, "lease_until": _iso(row.lease_until),
                "folders": [_folder_status(row.id, f)
                            for f in row.folders.order_by(m.MailboxFolder.id)],
                "sent_copies_waiting": m.SentCopy.select().where(
                    (m.SentCopy.account == row.id) & (m.SentCopy.state == "waiting")).count(),
            })
        out.append(entry)
    for problem in problems:
        out.append({"account": None, "state": "misconfigured", "last_error": problem})
    return out


def _folder_status(account_id: int, f: m.MailboxFolder) -> dict[str, Any]:
    """One folder's checkpoint, with the progress of its current pass: how many UIDs of this
    UIDVALIDITY were handled, and how far the checkpoint is towards the newest UID the server
    announced (UIDNEXT - 1) — during a first sync of a large mailbox, how much is done."""
    handled = (m.MailboxMessage.select().where(
        (m.MailboxMessage.account == account_id) & (m.MailboxMessage.folder == f.name)
        & (m.MailboxMessage.uidvalidity == f.uidvalidity)).count()) if f.uidvalidity else 0
    newest = (f.uidnext - 1) if f.uidnext else None
    progress = (round(100.0 * min(f.last_uid, newest) / newest, 1)
                if newest and newest > 0 else None)
    return {"name": f.name, "role": f.role, "uidvalidity": f.uidvalidity,
            "last_uid": f.last_uid, "newest_uid": newest, "handled": handled,
            "progress_percent": progress, "highest_modseq": f.highest_modseq,
            "epochs": f.epochs, "last_sync": _iso(f.last_sync_at)}


def _iso(when: datetime | None) -> str | None:
    return when.isoformat() + "Z" if when is not None else None
