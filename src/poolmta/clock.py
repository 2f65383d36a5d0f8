"""clock - the one injectable source of time

Every stage that reads the time (retry schedule, queue lifetime, trace
timestamps, later SRS and limit windows) takes a ``Clock`` so that tests can
move time by hand instead of sleeping.

TRUST: none.

SEE ALSO: spool/schedule.py, deliver/scheduler.py
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Seconds since the epoch (UTC)."""


class SystemClock:
    def now(self) -> float:
        return time.time()


class FakeClock:
    """A clock that only moves when a test tells it to."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self._now = start

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        self._now += seconds
