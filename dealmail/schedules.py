"""Retry schedules for the outbound relay: when to try a deferred message again.

The outbox worker (built elsewhere) stores, per queued item, how many attempts were made
and when the first one happened; after a TEMPORARY outcome it asks
:meth:`RetrySchedule.next_attempt` for the next time, and gives up (sends a ``failed`` DSN,
see :mod:`mta.relay.dsn`) when the answer is ``None``.

Schedules are written the way Haraka writes them, e.g. ``"5m,10m,20m,40m,1h*200"``: a comma
list of delays with a unit (``s``, ``m``, ``h``, ``d``), each optionally repeated ``*N`` times.
The default follows Postfix: first retry after 5 minutes, doubling up to one hour, and a
message lifetime of 5 days (``maximal_queue_lifetime``). Nothing here reads a clock: the caller
passes ``now``, so tests use plain datetimes and never sleep.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

__all__ = [
    "DEFAULT_GIVE_UP_AFTER",
    "DEFAULT_SCHEDULE",
    "RetrySchedule",
    "default_schedule",
    "parse_schedule",
]

DEFAULT_SCHEDULE = "5m,10m,20m,40m,1h*200"
# Postfix maximal_queue_lifetime; RFC 5321 §4.5.4.1 asks for "at least 4-5 days".
DEFAULT_GIVE_UP_AFTER = timedelta(days=5)

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_TOKEN_RE = re.compile(r"^(\d+)\s*([smhd])\s*(?:\*\s*(\d+))?$")
# Bound on the expanded schedule so a typo such as "1s*99999999" cannot eat memory.
_MAX_STEPS = 10_000


@dataclass(frozen=True)
class RetrySchedule:
    """Delays between attempts (``delays[i]`` follows attempt ``i + 1``) and a lifetime.

    ``jitter`` spreads retries by up to that fraction of the delay (0.1 = ±10 %) so that a
    burst of mail deferred together does not hit the destination again at the same second.
    """

    delays: tuple[timedelta, ...]
    give_up_after: timedelta = DEFAULT_GIVE_UP_AFTER
    jitter: float = 0.0

    def __post_init__(self) -> None:
        if not self.delays:
            raise ValueError("a retry schedule needs at least one delay")
        if any(d <= timedelta(0) for d in self.delays):
            raise ValueError("retry delays must be positive (a zero delay is a hot loop)")
        if self.give_up_after <= timedelta(0):
            raise ValueError("give_up_after must be positive")
        if not 0.0 <= self.jitter < 1.0:
            raise ValueError("jitter must be a fraction in [0, 1)")

    def delay_after(self, attempts_done: int) -> timedelta | None:
        """The nominal delay after ``attempts_done`` attempts, ``None`` when the list is used up."""
        if attempts_done < 1:
            return timedelta(0)
        if attempts_done > len(self.delays):
            return None
        return self.delays[attempts_done - 1]

    def deadline(self, first_attempt_at: datetime) -> datetime:
        """The moment after which the message is given up."""
        return first_attempt_at + self.give_up_after

    def next_attempt(
        self,
        attempts_done: int,
        first_attempt_at: datetime,
        now: datetime,
        rand: Callable[[], float] = random.random,
    ) -> datetime | None:
        """When to try next, or ``None`` to give up.

        The last attempt is made exactly at the deadline (``first_attempt_at + give_up_after``)
        rather than skipped because the next regular slot would fall after it; once an attempt
        at or after the deadline has failed, the answer is ``None``. ``now`` earlier than the
        previous attempt (wall clock moved back) still yields ``now + delay``, never a storm of
        immediate retries.
        """
        if attempts_done < 0:
            raise ValueError("attempts_done cannot be negative")
        deadline = self.deadline(first_attempt_at)
        if now >= deadline and attempts_done > 0:
            return None
        delay = self.delay_after(attempts_done)
        if delay is None:
            return None
        if self.jitter and delay:
            # Uniform in [delay*(1-j), delay*(1+j)].
            delay = delay * (1.0 + self.jitter * (2.0 * rand() - 1.0))
        candidate = now + delay
        return min(candidate, deadline) if attempts_done > 0 else candidate


def parse_schedule(
    text: str,
    give_up_after: timedelta = DEFAULT_GIVE_UP_AFTER,
    jitter: float = 0.0,
) -> RetrySchedule:
    """Parse ``"5m,10m,20m,40m,1h*200"`` into a :class:`RetrySchedule`.

    Raises ValueError naming the offending item, so ``dealmail check-config`` can point at it.
    """
    delays: list[timedelta] = []
    items = [item.strip() for item in text.split(",")]
    if not text.strip():
        raise ValueError("empty retry schedule")
    for item in items:
        match = _TOKEN_RE.match(item)
        if match is None:
            raise ValueError(
                f"bad retry schedule item {item!r}: expected <number><s|m|h|d>[*<count>]"
            )
        amount, unit, repeat = match.group(1), match.group(2), match.group(3)
        seconds = int(amount) * _UNITS[unit]
        count = int(repeat) if repeat is not None else 1
        if seconds == 0:
            raise ValueError(f"bad retry schedule item {item!r}: zero delay")
        if count == 0:
            raise ValueError(f"bad retry schedule item {item!r}: repeat count 0")
        if len(delays) + count > _MAX_STEPS:
            raise ValueError(f"retry schedule longer than {_MAX_STEPS} steps")
        delays.extend([timedelta(seconds=seconds)] * count)
    return RetrySchedule(tuple(delays), give_up_after, jitter)


def default_schedule() -> RetrySchedule:
    """The Postfix-like default: 5m, 10m, 20m, 40m, then hourly, for 5 days."""
    return parse_schedule(DEFAULT_SCHEDULE, DEFAULT_GIVE_UP_AFTER)
