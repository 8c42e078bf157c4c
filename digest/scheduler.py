"""When each user's digest is due, and the task that queues it.

Each user's ``digest`` setting (config) is ``daily`` (08:00 in the user's time zone), ``weekly``
(Mondays at 08:00) or ``off``. A *period* is named by the local date of its slot, so daylight
saving changes move the slot in UTC but never the local 08:00 (zoneinfo resolves the offset of
that very day). The digest of a period is queued with the outbox dedupe key
``digest:<user>:<period>`` in the same transaction as its audit entry: a run interrupted and
restarted (or two runs at once) queues each period's digest once. A server that was down at
08:00 sends the digest of the latest period when it comes back; earlier missed periods are
folded into it (the digest covers everything since the last one).

:meth:`DigestScheduler.run_once` is the unit tests drive with an injected clock; the App runs
:meth:`DigestScheduler.start`, which calls it every ``poll_seconds``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo

from peewee import IntegrityError

from crmstore import models as m
from crmstore.db import Store
from dealmail.clock import Clock
from dealmail.config import Config, User

from .digests import compose_digest, default_since, last_digest_until, queue_digest

log = logging.getLogger("dealmail.digest")

DIGEST_TIME = time(8, 0)
WEEKLY_DAY = 0  # Monday


@dataclass(frozen=True)
class Slot:
    """The latest scheduled moment at or before now, and the period it names."""

    period: str
    at: datetime  # aware UTC


def current_slot(user: User, now: datetime) -> Slot | None:
    """The user's latest digest slot at or before ``now`` (None when digests are off)."""
    if user.digest == "off":
        return None
    tz = ZoneInfo(user.timezone)
    local = now.astimezone(tz)
    day = local.date()
    if user.digest == "weekly":
        day -= timedelta(days=(day.weekday() - WEEKLY_DAY) % 7)
    at = datetime.combine(day, DIGEST_TIME, tzinfo=tz)
    if at > local:
        day -= timedelta(days=7 if user.digest == "weekly" else 1)
        at = datetime.combine(day, DIGEST_TIME, tzinfo=tz)
    prefix = "W" if user.digest == "weekly" else "D"
    return Slot(period=f"{prefix}{day.isoformat()}", at=at.astimezone(UTC))


class DigestScheduler:
    """Queues due digests. Remembers (per instance, not persisted) the periods found empty so
    the poll does not recompose them; sent periods are remembered by the outbox itself."""

    def __init__(self, store: Store, config_of: Callable[[], Config], clock: Clock) -> None:
        self.store = store
        self.config_of = config_of
        self.clock = clock
        self._settled: dict[str, str] = {}  # user address -> last period handled
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()

    def already_queued(self, address: str, period: str) -> bool:
        key = f"digest:{address}:{period}#"
        return bool(m.OutboxItem.select().where(m.OutboxItem.dedupe_key.startswith(key))
                    .exists())

    def run_user(self, config: Config, user: User, now: datetime) -> list[int]:
        """Queue ``user``'s digest if due; returns the outbox ids (empty when nothing sent)."""
        slot = current_slot(user, now)
        if slot is None or self._settled.get(user.address) == slot.period:
            return []
        if self.already_queued(user.address, slot.period):
            self._settled[user.address] = slot.period
            return []
        try:
            with self.store.transaction():
                last = last_digest_until(user.address)
                since = default_since(user, slot.at, last)
                digest = compose_digest(config, user.address, since, slot.at, now)
                if digest.empty:
                    ids: list[int] = []
                else:
                    ids = queue_digest(config, digest, slot.period, now)
        except IntegrityError:
            # Another process queued the same period between our check and our insert.
            ids = []
        self._settled[user.address] = slot.period
        if ids:
            log.info("digest %s for %s queued as outbox %s", slot.period, user.address, ids)
        return ids

    def run_once(self, now: datetime | None = None) -> dict[str, list[int]]:
        """Queue every due digest; returns {user address: outbox ids} for those queued."""
        now = now or self.clock.now()
        config = self.config_of()
        queued: dict[str, list[int]] = {}
        for company in config.companies:
            for user in company.users:
                try:
                    ids = self.run_user(config, user, now)
                except Exception:
                    # One user's failure must not stop the others' digests.
                    log.exception("digest for %s failed; retrying at the next poll",
                                  user.address)
                    continue
                if ids:
                    queued[user.address] = ids
        return queued

    # ----------------------------------------------------------------- running

    def start(self, poll_seconds: float = 60.0,
              after_queue: Callable[[], None] | None = None) -> None:
        self._task = asyncio.get_running_loop().create_task(
            self._run(poll_seconds, after_queue))

    async def _run(self, poll_seconds: float, after_queue: Callable[[], None] | None) -> None:
        loop = asyncio.get_running_loop()
        while not self._stopping.is_set():
            try:
                await asyncio.wait_for(self._stopping.wait(), poll_seconds)
                break
            except TimeoutError:
                pass
            try:
                queued = await loop.run_in_executor(None, self.run_once, self.clock.now())
                if queued and after_queue is not None:
                    after_queue()
            except Exception:
                log.exception("digest pass failed; retrying at the next poll")

    async def stop(self) -> None:
        self._stopping.set()
        if self._task is not None:
            await self._task
