"""Tests for dealmail.schedules: schedule parsing and next-attempt times with injected datetimes.

docs/reliability.md D.6.1 (a destination that always answers 451: attempts follow the curve and
give up at exactly the lifetime) and D.6.13 (wall clock moved back: no retry storm). No clock is
read and nothing sleeps: every "now" is a literal datetime.
"""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

import pytest

from dealmail.schedules import (
    DEFAULT_GIVE_UP_AFTER,
    DEFAULT_SCHEDULE,
    RetrySchedule,
    default_schedule,
    parse_schedule,
)

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
M = timedelta(minutes=1)
H = timedelta(hours=1)


def test_parse_units_and_repeats() -> None:
    s = parse_schedule("30s, 5m,1h*3 ,2d")
    assert s.delays == (timedelta(seconds=30), 5 * M, H, H, H, timedelta(days=2))
    assert s.give_up_after == DEFAULT_GIVE_UP_AFTER == timedelta(days=5)


def test_default_schedule() -> None:
    s = default_schedule()
    assert DEFAULT_SCHEDULE == "5m,10m,20m,40m,1h*200"
    assert s.delays[:5] == (5 * M, 10 * M, 20 * M, 40 * M, H)
    assert len(s.delays) == 204 and set(s.delays[4:]) == {H}


@pytest.mark.parametrize(
    "text", ["", "5", "m", "5x", "5m,", "-5m", "1.5h", "5m*0", "0s", "5m*", "1s*99999999",
             "5 minutes"],
)
def test_parse_errors_name_the_item(text: str) -> None:
    with pytest.raises(ValueError):
        parse_schedule(text)


def test_error_message_names_bad_item() -> None:
    with pytest.raises(ValueError, match="'7y'"):
        parse_schedule("5m,7y")


def test_schedule_validation() -> None:
    with pytest.raises(ValueError):
        RetrySchedule(())
    with pytest.raises(ValueError):
        RetrySchedule((M,), timedelta(0))
    with pytest.raises(ValueError):
        RetrySchedule((M,), jitter=1.5)


def test_first_attempt_is_now() -> None:
    assert default_schedule().next_attempt(0, T0, T0) == T0


def test_always_451_curve_and_exact_give_up() -> None:
    """Simulate a destination that always defers, attempting exactly when told to."""
    s = default_schedule()
    attempts = [T0]
    now = T0
    while True:
        nxt = s.next_attempt(len(attempts), T0, now)
        if nxt is None:
            break
        assert nxt > now
        attempts.append(nxt)
        now = nxt
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    assert gaps[:5] == [5 * M, 10 * M, 20 * M, 40 * M, H]
    assert all(g <= H for g in gaps)
    # T0, +5m, +15m, +35m, +1h15m, then hourly (2h15m ... 119h15m), then the last try
    # exactly at the 5-day deadline rather than never: 1 + 4 + 118 + 1 attempts.
    assert attempts[-1] == T0 + timedelta(days=5)
    assert attempts[-2] == T0 + timedelta(hours=119, minutes=15)
    assert len(attempts) == 124
    # Once the attempt at the deadline failed: give up.
    assert s.next_attempt(len(attempts), T0, attempts[-1]) is None


def test_give_up_when_late_worker_runs_past_deadline() -> None:
    s = default_schedule()
    late = T0 + timedelta(days=6)
    assert s.next_attempt(7, T0, late) is None


def test_next_slot_capped_at_deadline() -> None:
    s = parse_schedule("1d", give_up_after=timedelta(hours=30))
    first_retry = s.next_attempt(1, T0, T0)
    assert first_retry == T0 + timedelta(days=1)
    s2 = parse_schedule("1d*5", give_up_after=timedelta(hours=30))
    assert s2.next_attempt(2, T0, T0 + timedelta(days=1)) == T0 + timedelta(hours=30)


def test_exhausted_list_gives_up_before_lifetime() -> None:
    s = parse_schedule("5m,10m", give_up_after=timedelta(days=5))
    assert s.next_attempt(1, T0, T0) == T0 + 5 * M
    assert s.next_attempt(2, T0, T0 + 5 * M) == T0 + 15 * M
    assert s.next_attempt(3, T0, T0 + 15 * M) is None


def test_clock_moved_back_gives_no_storm() -> None:
    s = default_schedule()
    behind = T0 - timedelta(days=1)  # wall clock jumped back a day
    nxt = s.next_attempt(6, T0, behind)
    assert nxt == behind + H


def test_negative_attempts_rejected() -> None:
    with pytest.raises(ValueError):
        default_schedule().next_attempt(-1, T0, T0)


def test_jitter_within_bounds_with_injected_random() -> None:
    s = parse_schedule("10m", give_up_after=timedelta(days=1), jitter=0.2)
    assert s.next_attempt(1, T0, T0, rand=lambda: 0.0) == T0 + 8 * M
    assert s.next_attempt(1, T0, T0, rand=lambda: 1.0) == T0 + 12 * M
    assert s.next_attempt(1, T0, T0, rand=lambda: 0.5) == T0 + 10 * M
