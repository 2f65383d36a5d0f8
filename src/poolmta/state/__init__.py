"""state - sending-limit counters and restricted senders, shared by every node

One small interface, two implementations: SQLite (one node, the default, a
file beside the spool) and Redis (a cluster: every gateway process of the
service counts into the same windows and sees the same restrictions).

Counters are sliding windows of events: ``add(key, amount, now, since)``
records ``amount`` (recipients, messages) at ``now`` and returns the totals
within ``(since, now]`` before and after the addition, atomically, so that
of several nodes adding at once exactly one sees the total cross a limit.
The caller chooses ``since``: ``now - 3600`` for an hour, ``now - 86400``
for a rolling 24 h, the start of the UTC day for a calendar day.

A restriction is a sender (an address, or a connector name) that may not
send until ``until`` (None: until an administrator releases it). A release
is recorded with who and when, and protects the sender from being
restricted again on the same UTC day.

SEE ALSO: state/sqlite.py, state/redis.py, assess/limits.py, cli.py (senders)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Restriction:
    kind: str                  # "user" (an address) | "connector" (a connector name)
    sender: str                # lower-cased address, or connector name
    since: float
    until: float | None        # None: until released by an administrator
    reason: str                # e.g. "limit:recipient_limit_external_per_hour", "spam-volume"
    tenant: str = ""


@dataclass(frozen=True)
class Release:
    kind: str
    sender: str
    at: float
    by: str


class SenderState(Protocol):
    async def add(self, key: str, amount: int, now: float, since: float) -> tuple[int, int]:
        """Record AMOUNT at NOW under KEY; return (total before, total after) within (since, now]."""

    async def add_many(self, items: list[tuple[str, int, float]], now: float) -> list[tuple[int, int]]:
        """``add`` for several (key, amount, since) at NOW, in one round trip; each key atomic."""

    async def count(self, key: str, now: float, since: float) -> int:
        """Total under KEY within (since, now]."""

    async def restrict(self, r: Restriction) -> bool:
        """Restrict a sender; False if already restricted (nothing changed)."""

    async def restriction(self, kind: str, sender: str, now: float) -> Restriction | None:
        """The restriction in force for the sender at NOW, if any."""

    async def release(self, kind: str, sender: str, now: float, by: str) -> bool:
        """Lift a restriction; record the release. False if the sender was not restricted."""

    async def released_on_day(self, kind: str, sender: str, now: float) -> bool:
        """Was the sender released on NOW's UTC day (then it is not restricted again that day)?"""

    async def restrictions(self, now: float) -> list[Restriction]:
        """Every restriction in force at NOW."""

    async def close(self) -> None: ...


def utc_day_start(now: float) -> float:
    return float(int(now // 86400) * 86400)
