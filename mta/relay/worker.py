"""The outbox delivery worker: sends what ``crmstore.outbox`` queued, after the commit.

* :class:`OutboxWorker` claims due rows with a lease (``SELECT … FOR UPDATE SKIP LOCKED`` on
  PostgreSQL, so several dealmail processes share one outbox; SQLite is single-process),
  delivers them with :func:`mta.relay.delivery.deliver`, then records per recipient: delivered
  and permanently failed recipients leave the row, temporary ones stay for the next attempt on
  the retry schedule. A worker killed mid-delivery leaves its lease to expire: the row is then
  claimed again (at-least-once, the attempt counted).
* A permanent failure or a give-up produces one DSN (RFC 3464) to the envelope sender, queued
  from the null sender; dealmail's own notices use the null sender, so no DSN is ever made
  about them and no backscatter reaches unverified addresses.
* Each attempt logs one line per recipient, in the form a Postfix admin greps for (the
  outbox item id is the queue id)::

    outbox#24: message-id=<a1@example.com>, to=<ann@customer.test>,
      relay=smtp.example.net[192.0.2.7]:587, delay=0.42, tries=1, dsn=2.0.0,
      status=sent (250 2.0.0 Ok: queued as 4F2A)

  ``status`` is ``sent``, ``deferred`` (with the next attempt's time) or ``bounced`` (a
  permanent failure, or the retry lifetime ended); ``relay=none`` when no host took the
  transaction. With ``server.log_format = "json"`` the same facts are keys of the JSON line.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from peewee import Case, fn

from crmstore import models as m
from crmstore.bounces import forget_bounced_persons
from crmstore.db import Store
from crmstore.outbox import enqueue
from dealmail.clock import Clock, naive_utc
from dealmail.config import Config
from dealmail.schedules import RetrySchedule, parse_schedule

from .delivery import DeliveryResult, NextHop, Outcome, RecipientResult, deliver
from .dsn import build_dsn
from .longlines import fit_line_length
from .mx import AddrLookup, MxLookup, RouteError, resolve_routes

if TYPE_CHECKING:
    from ..metrics import Metrics

log = logging.getLogger("dealmail.outbox")

# The shortest sleep between passes when an item is due but another worker holds it.
_MIN_WAIT = 0.2

_MESSAGE_ID_RE = re.compile(rb"^message-id:[ \t]*(.*(?:\r?\n[ \t].*)*)",
                            re.IGNORECASE | re.MULTILINE)
_DSN_RE = re.compile(r"^([245]\.\d{1,3}\.\d{1,3})\b")


def message_id_of(raw: bytes) -> str:
    """The Message-ID of a queued message (header block only), or ``-``."""
    end = raw.find(b"\r\n\r\n")
    if end < 0:
        end = raw.find(b"\n\n")
    match = _MESSAGE_ID_RE.search(raw[: end if end >= 0 else len(raw)])
    if match is None:
        return "-"
    return " ".join(match.group(1).decode("utf-8", "replace").split()) or "-"


def dsn_of(result: RecipientResult) -> str:
    """The enhanced status (RFC 3463) of a recipient's reply: the one the server gave, else
    the class of its code; 4.4.1 when no host answered (RFC 3463 §3.5, "no answer from
    host"), as Postfix logs it."""
    match = _DSN_RE.match(result.message.strip())
    if match:
        return match.group(1)
    if result.code == 0:
        return "4.4.1"
    return f"{result.code // 100}.0.0"


class OutboxWorker:
    """Claims due outbox items and delivers them; ``run_once`` is the unit tests drive.

    The ``[outbox]`` and ``[server]`` sections are read from ``config_of()`` at every use, so
    a reloaded config (SIGHUP) applies to the next delivery attempt."""

    def __init__(self, store: Store, clock: Clock, config_of: Callable[[], Config],
                 mx_lookup: MxLookup | None = None, addr_lookup: AddrLookup | None = None,
                 ssl_context: Any = None, worker_id: str = "w1", *, batch: int = 20,
                 timeout: float = 60.0, mx_port: int = 25,
                 refresh: Mapping[str, Callable[[m.OutboxItem], bytes | None]] | None = None,
                 metrics: Metrics | None = None) -> None:
        self.store = store
        self.clock = clock
        self.config_of = config_of
        self.mx_lookup = mx_lookup
        self.addr_lookup = addr_lookup
        self.ssl_context = ssl_context
        self.worker_id = worker_id
        self.batch = batch
        self.timeout = timeout
        self.mx_port = mx_port
        # Composed mail of these kinds is checked again when due (by kind; a batched
        # question may have been decided meanwhile).
        self.refresh = dict(refresh or {})
        self.metrics = metrics
        self._schedule: tuple[tuple[str, float], RetrySchedule] | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._current: m.OutboxItem | None = None  # the delivery in flight

    @property
    def schedule(self) -> RetrySchedule:
        """The retry schedule of the current config (parsed again only when it changed)."""
        o = self.config_of().outbox
        key = (o.retry_schedule, o.give_up_after_hours)
        if self._schedule is None or self._schedule[0] != key:
            self._schedule = (key, parse_schedule(
                o.retry_schedule, give_up_after=timedelta(hours=o.give_up_after_hours)))
        return self._schedule[1]

    # ----------------------------------------------------------------- routes

    def routes_for(self, domain: str) -> list[NextHop]:
        s = self.config_of().outbox
        if s.smarthost:
            host, _, port = s.smarthost.rpartition(":")
            return [NextHop(host=host.strip("[]"), port=int(port), tls=s.smarthost_tls,
                            username=s.smarthost_username or None,
                            password=s.smarthost_password or None,
                            ssl_context=self.ssl_context)]
        if self.mx_lookup is None or self.addr_lookup is None:
            from .mx import dnspython_addr_lookup, dnspython_mx_lookup

            self.mx_lookup = self.mx_lookup or dnspython_mx_lookup()
            self.addr_lookup = self.addr_lookup or dnspython_addr_lookup()
        return resolve_routes(domain, self.mx_lookup, self.addr_lookup, port=self.mx_port)

    # ----------------------------------------------------------------- claiming

    def claim(self) -> list[m.OutboxItem]:
        """Lease up to ``batch`` due items (one transaction)."""
        now = naive_utc(self.clock.now())
        lease_until = now + timedelta(seconds=self.config_of().outbox.lease_seconds)
        due = ((m.OutboxItem.state == "queued") & (m.OutboxItem.next_attempt_at <= now)
               & (m.OutboxItem.lease_until.is_null() | (m.OutboxItem.lease_until < now)))
        # A read first: the write lock is taken only when something is due, so the worker
        # never competes with the ingestion commits for nothing.
        if not m.OutboxItem.select(m.OutboxItem.id).where(due).exists():
            return []
        with self.store.transaction():
            q = (m.OutboxItem.select()
                 .where(due)
                 .order_by(m.OutboxItem.next_attempt_at, m.OutboxItem.id)
                 .limit(self.batch))
            if not self.store.is_sqlite:
                q = q.for_update(skip_locked=True)
            items = list(q)
            if items:
                # The attempt is counted when it starts: a worker killed mid-delivery still
                # used one (at-least-once, docs/reliability.md D.6).
                (m.OutboxItem.update(lease_until=lease_until,
                                     attempts=m.OutboxItem.attempts + 1)
                 .where(m.OutboxItem.id.in_([i.id for i in items])).execute())
                for i in items:
                    i.attempts += 1
        return items

    # ----------------------------------------------------------------- delivering

    async def run_once(self) -> int:
        """Deliver every due item once; returns how many items were attempted. Once a stop
        began, the items claimed and not yet started are handed back untouched."""
        loop = asyncio.get_running_loop()
        items = await loop.run_in_executor(None, self.claim)
        for done, item in enumerate(items):
            if self._stopping:
                await loop.run_in_executor(None, self.release, items[done:])
                return done
            if item.kind in self.refresh and not await loop.run_in_executor(
                    None, self._refreshed, item):
                continue
            self._current = item
            try:
                result = await self._attempt(item)
            finally:
                self._current = None
            # Recorded even when a stop began meanwhile: the outcome of a delivery that
            # happened must be kept, or the next start would send it again.
            await loop.run_in_executor(None, self.record, item, result)
        return len(items)

    def release(self, items: list[m.OutboxItem]) -> None:
        """Give back claimed items not attempted (a stop): due again at once, the attempt
        counted at claim time taken back, nothing sent."""
        if not items:
            return
        with self.store.transaction():
            (m.OutboxItem.update(lease_until=None, attempts=m.OutboxItem.attempts - 1)
             .where(m.OutboxItem.id.in_([i.id for i in items])).execute())
        log.info("outbox: %d claimed item(s) handed back for the next start", len(items))

    def _refreshed(self, item: m.OutboxItem) -> bool:
        """Let the composer check the item once more before it leaves (one transaction):
        new bytes replace the queued ones; None means it is no longer needed (dropped)."""
        with self.store.transaction():
            fresh = self.refresh[item.kind](item)
            if fresh is None:
                (m.OutboxItem.update(state="dropped", lease_until=None,
                                     last_error="no longer needed when it was due")
                 .where(m.OutboxItem.id == item.id).execute())
                log.info("outbox #%s (%s to %s): dropped, no longer needed", item.id,
                         item.kind, item.domain)
                return False
        item.message = fresh
        return True

    async def _attempt(self, item: m.OutboxItem) -> DeliveryResult:
        recipients = json.loads(item.recipients_json)
        try:
            routes = self.routes_for(item.domain)
        except RouteError as exc:
            outcome = Outcome.PERMANENT if exc.permanent else Outcome.TEMPORARY
            code = 550 if exc.permanent else 451
            return DeliveryResult([RecipientResult(r, outcome, code, f"{exc.status} {exc}")
                                   for r in recipients], transcript_error=str(exc))
        # What dealmail composes (a DSN quoting a header, say) can carry a line longer
        # than RFC 5322 allows; a relayed copy was fitted before it was signed and comes
        # back unchanged.
        message = fit_line_length(bytes(item.message))
        return await deliver(message, item.mail_from, recipients, routes,
                             self.config_of().hostname, timeout=self.timeout)

    def record(self, item: m.OutboxItem, result: DeliveryResult) -> None:
        """Store one attempt's outcome (one transaction): pending recipients stay queued."""
        now = naive_utc(self.clock.now())
        delivered = result.by_outcome(Outcome.DELIVERED)
        failed = result.by_outcome(Outcome.PERMANENT)
        temporary = result.by_outcome(Outcome.TEMPORARY)
        next_at = None
        if temporary:
            next_at = self.schedule.next_attempt(item.attempts, item.created_at, now)
            if next_at is not None:
                next_at = naive_utc(next_at)
        gave_up = temporary if (temporary and next_at is None) else []
        errors = "; ".join(f"{r.address}: {r.code} {r.message}" for r in failed + temporary)
        with self.store.transaction():
            fields: dict[Any, Any] = {m.OutboxItem.lease_until: None,
                                      m.OutboxItem.last_error: errors[:2000]}
            if temporary and next_at is not None:
                fields[m.OutboxItem.recipients_json] = json.dumps([r.address for r in temporary])
                fields[m.OutboxItem.next_attempt_at] = next_at
            elif delivered:
                fields[m.OutboxItem.state] = "sent"
                fields[m.OutboxItem.sent_at] = now
            else:
                fields[m.OutboxItem.state] = "failed"
            m.OutboxItem.update(fields).where(m.OutboxItem.id == item.id).execute()
            if failed or gave_up:
                self._queue_dsn(item, failed + gave_up, now)
            if item.kind == "relay":
                # A mistyped customer address: the person relayed mail created is nobody.
                forget_bounced_persons(item.company_id, [
                    r.address for r in failed if dsn_of(r).startswith("5.1.")], now)
        self._log_attempt(item, result, now, next_at, bool(gave_up))

    def _log_attempt(self, item: m.OutboxItem, result: DeliveryResult, now: datetime,
                     next_at: datetime | None, gave_up: bool) -> None:
        """One line per recipient of this attempt (see the module docstring)."""
        message_id = message_id_of(bytes(item.message))
        delay = max(0.0, (now - item.created_at).total_seconds())
        relay = result.relay or "none"
        for r in result.recipients:
            if r.outcome is Outcome.DELIVERED:
                status = "sent"
            elif r.outcome is Outcome.PERMANENT or gave_up:
                status = "bounced"
            else:
                status = "deferred"
            reply = " ".join(f"{r.code} {r.message}".split()) if r.code else r.message
            if status == "deferred" and next_at is not None:
                reply += f"; next attempt {next_at:%Y-%m-%d %H:%M:%S} UTC"
            elif gave_up and r.outcome is Outcome.TEMPORARY:
                reply = f"gave up after {item.attempts} attempt(s): {reply}"
            dsn = dsn_of(r)
            fields = {"queue_id": f"outbox#{item.id}", "kind": item.kind,
                      "message_id": message_id, "to": r.address, "relay": relay,
                      "delay": round(delay, 2), "tries": item.attempts, "dsn": dsn,
                      "status": status, "reply": reply}
            log.log(logging.WARNING if status == "bounced" else logging.INFO,
                    "outbox#%s: message-id=%s, to=<%s>, relay=%s, delay=%.2f, tries=%d, "
                    "dsn=%s, status=%s (%s)", item.id, message_id, r.address, relay, delay,
                    item.attempts, dsn, status, reply, extra={"fields": fields})
            if self.metrics is not None:
                self.metrics.delivery(status)

    def _queue_dsn(self, item: m.OutboxItem, failed: list[RecipientResult],
                   now: datetime) -> None:
        config = self.config_of()
        dsn_from = f"Mail Delivery System <MAILER-DAEMON@{config.mail_domain}>"
        dsn = build_dsn(bytes(item.message), item.mail_from, failed, config.hostname,
                        dsn_from, item.created_at, now)
        if dsn is None:  # never about a null-sender message (RFC 3464 §2, RFC 5321 §6.2)
            return
        enqueue(dsn, kind="dsn", mail_from="", recipients=[item.mail_from], now=now,
                company_id=item.company_id)

    # ----------------------------------------------------------------- running

    def wake(self) -> None:
        self._wake.set()

    def start(self, poll_seconds: float = 5.0) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(poll_seconds))

    async def _run(self, poll_seconds: float) -> None:
        # Woken by a commit that queued rows (crmstore.committer's after_queue), else asleep
        # until the earliest queued item is due by the injected clock; ``poll_seconds`` only
        # bounds the sleep, for rows another process queued (dealmail/prefork.py) or an
        # admin made due (``dealmail outbox retry``).
        loop = asyncio.get_running_loop()
        while not self._stopping:
            timeout = poll_seconds
            try:
                while await self.run_once():
                    pass
                due = await loop.run_in_executor(None, self.next_due)
                if due is not None:
                    wait = (due - naive_utc(self.clock.now())).total_seconds()
                    # Due yet not claimable: leased in another worker's claim transaction
                    # (SKIP LOCKED); look again shortly instead of spinning.
                    timeout = min(poll_seconds, max(wait, _MIN_WAIT))
            except Exception:
                log.exception("outbox worker pass failed; retrying at the next poll")
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except TimeoutError:
                pass

    def next_due(self) -> datetime | None:
        """When the earliest queued item can next be claimed (its next attempt, or the end
        of a lease still held), naive UTC; None when nothing is queued."""
        o = m.OutboxItem
        claimable = Case(None, [((o.lease_until.is_null(False))
                                 & (o.lease_until > o.next_attempt_at), o.lease_until)],
                         o.next_attempt_at)
        value = (o.select(fn.MIN(claimable)).where(o.state == "queued").scalar())
        if value is None:
            return None
        if isinstance(value, str):  # SQLite returns an expression's datetime as its text
            return datetime.fromisoformat(value)
        return naive_utc(value)

    async def stop(self, within: float | None = None) -> None:
        """Stop after the delivery in flight, waiting at most ``within`` seconds for it.
        Past that it is cancelled: its lease stays, so it is retried once the lease expires
        (at-least-once, docs/reliability.md D.6.3: the next hop may have taken it)."""
        self._stopping = True
        self._wake.set()
        if self._task is None:
            return
        done, _ = await asyncio.wait({self._task}, timeout=within)
        if done:
            return
        current = self._current
        log.warning("outbox: delivery of #%s not finished within %s s of the stop: cut; it "
                    "is retried when its lease expires", current.id if current else "?",
                    within)
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass


