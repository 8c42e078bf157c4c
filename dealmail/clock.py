"""The application clock: every module asks it for now, so tests move time without sleeping."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Protocol


class Clock(Protocol):
    def now(self) -> datetime:
        """The current time, timezone-aware (UTC)."""
        ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)


class FakeClock:
    """A clock tests set and advance by hand."""

    def __init__(self, start: datetime | None = None) -> None:
        self._now = start or datetime(2026, 11, 26, 9, 0, tzinfo=UTC)

    def now(self) -> datetime:
        return self._now

    def advance(self, delta: timedelta) -> None:
        self._now += delta

    def set(self, when: datetime) -> None:
        self._now = when


def naive_utc(when: datetime) -> datetime:
    """The stored form of a timestamp: naive UTC (SQLite has no time zones)."""
    if when.tzinfo is None:
        return when
    return when.astimezone(UTC).replace(tzinfo=None)


def json_time(when: datetime | str | None) -> str | None:
    """A timestamp as every JSON output writes it: UTC, whole seconds, ``Z``
    (``2026-11-26T09:00:00Z``). Stored timestamps are naive UTC; SQLite hands them back as
    text with or without microseconds, PostgreSQL as datetimes, so without one format the
    same kind of field differed in precision from one row (or channel) to the next."""
    if when is None:
        return None
    if isinstance(when, str):
        when = datetime.fromisoformat(when)
    return naive_utc(when).strftime("%Y-%m-%dT%H:%M:%SZ")
