"""One process at a time per mailbox account: a lease on the account's row.

A process syncs an account only while it holds the lease (``lease_holder`` and
``lease_until`` on ``mailbox_account``), renews it as it works, and confirms it inside every
transaction that writes the account's checkpoints, so a process that lost it (stalled past the
expiry while another took over) can never commit behind the new holder. A dead holder's
accounts are taken over once its lease expires. On PostgreSQL the claim reads the row with
``SELECT … FOR UPDATE SKIP LOCKED`` (several hosts claim at once without waiting for each
other); SQLite's single writer lock (``crmstore.db.Store.transaction``) serialises the claims
of the processes sharing one file.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta

from peewee import IntegrityError

from crmstore import models as m
from crmstore.db import Store
from dealmail.clock import naive_utc

__all__ = ["Lease", "LeaseLost", "ensure_account"]


class LeaseLost(Exception):
    """Another process holds this account now: stop syncing it."""


def ensure_account(store: Store, key: str, user_address: str) -> int:
    """The id of the account row for ``key`` (created on first use)."""
    row = m.MailboxAccount.get_or_none(m.MailboxAccount.key == key)
    if row is not None:
        return int(row.id)
    user = m.User.get(m.User.address == user_address)
    try:
        with store.transaction():
            row, _ = m.MailboxAccount.get_or_create(key=key, defaults={"user": user.id})
    except IntegrityError:  # created by another process in the meantime
        row = m.MailboxAccount.get(m.MailboxAccount.key == key)
    return int(row.id)


class Lease:
    def __init__(self, store: Store, holder: str, now: Callable[[], datetime],
                 seconds: Callable[[], float]) -> None:
        self.store = store
        self.holder = holder
        self.now = now
        self.seconds = seconds

    def _until(self) -> datetime:
        return naive_utc(self.now()) + timedelta(seconds=self.seconds())

    def acquire(self, account_id: int) -> bool:
        """Take (or keep) the lease when it is free, ours or expired."""
        now = naive_utc(self.now())
        row = m.MailboxAccount.get_or_none(m.MailboxAccount.id == account_id)
        if row is not None and row.lease_holder not in (None, self.holder) and \
                row.lease_until is not None and row.lease_until >= now:
            return False  # held by another process: a read, no write lock taken
        free = (m.MailboxAccount.lease_holder.is_null()
                | (m.MailboxAccount.lease_holder == self.holder)
                | m.MailboxAccount.lease_until.is_null()
                | (m.MailboxAccount.lease_until < now))
        with self.store.transaction():
            q = m.MailboxAccount.select(m.MailboxAccount.id).where(
                (m.MailboxAccount.id == account_id) & free)
            if not self.store.is_sqlite:
                q = q.for_update(skip_locked=True)
            if q.first() is None:
                return False
            (m.MailboxAccount.update(lease_holder=self.holder, lease_until=self._until())
             .where(m.MailboxAccount.id == account_id).execute())
        return True

    def holds(self, account_id: int) -> bool:
        row = m.MailboxAccount.get_or_none(m.MailboxAccount.id == account_id)
        return bool(row is not None and row.lease_holder == self.holder and row.lease_until
                    and row.lease_until >= naive_utc(self.now()))

    def confirm(self, account_id: int) -> None:
        """Inside the caller's transaction: extend the lease, or raise :class:`LeaseLost`."""
        now = naive_utc(self.now())
        done = (m.MailboxAccount.update(lease_until=self._until())
                .where((m.MailboxAccount.id == account_id)
                       & (m.MailboxAccount.lease_holder == self.holder)
                       & (m.MailboxAccount.lease_until >= now)).execute())
        if not done:
            raise LeaseLost(f"account #{account_id} is held by another process now")

    def renew_if_due(self, account_id: int) -> bool:
        """Renew when less than two thirds of the lease are left; False when it is lost."""
        row = m.MailboxAccount.get_or_none(m.MailboxAccount.id == account_id)
        now = naive_utc(self.now())
        if row is None or row.lease_holder != self.holder or row.lease_until is None \
                or row.lease_until < now:
            return False
        if row.lease_until - now > timedelta(seconds=self.seconds() * 2 / 3):
            return True
        try:
            with self.store.transaction():
                self.confirm(account_id)
        except LeaseLost:
            return False
        return True

    def release(self, account_id: int) -> None:
        with self.store.transaction():
            (m.MailboxAccount.update(lease_holder=None, lease_until=None)
             .where((m.MailboxAccount.id == account_id)
                    & (m.MailboxAccount.lease_holder == self.holder)).execute())
