"""spool.schedule - when to try a deferred recipient again, and when to give up

Pure arithmetic over a time passed in: no clock is read, no I/O is done, so
every rule here is tested with plain numbers (or a FakeClock's ``now()``).

- ``retry_delay(attempts, schedule)``: the delay before retry N is
  ``schedule[N-1]``; once the list is exhausted its last value repeats
  (Postfix grows its backoff up to maximal_backoff_time; an explicit list is
  easier to read in a config file and to reason about).
- ``deadline(received_at, lifetime)``: the moment the message expires.
- ``after_deferral(...)``: what to do with a recipient that was just deferred:
  ``Retry(at)`` or ``Expire(deadline)``. A recipient expires when its next
  retry would fall past the deadline: one more try could only happen after
  the lifetime the operator granted, so we bounce now (with 5.4.7 and the last
  reply) rather than keep the sender waiting for an attempt we would not make.

TRUST: none; numbers only.

STANDARDS: RFC 5321 §4.5.4.1 (retry strategy: the interval should be at
least 30 minutes, give-up time at least 4-5 days: those are config defaults,
not enforced here), RFC 3463 (5.4.7 delivery time expired).

CONFIG: delivery.retry_schedule, delivery.queue_lifetime (read by the caller
and passed in).

SEE ALSO: deliver/scheduler.py, config.py (DeliveryConfig), replies.R554_547_EXPIRED
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Retry:
    """Try again at ``at`` (seconds since the epoch)."""
    at: float


@dataclass(frozen=True)
class Expire:
    """Give up: the next retry would come after ``deadline``."""
    deadline: float


def retry_delay(attempts: int, schedule: Sequence[float]) -> float:
    """Delay before the next try after ``attempts`` tries (>= 1) have failed.

    ``attempts`` of 0 (a recipient deferred before any connection, e.g. while
    its sender domain is re-checked) is treated as 1: there is no shorter delay
    than the first one to fall back on.
    """
    if not schedule:
        raise ValueError("retry schedule is empty")
    n = max(1, attempts)
    return float(schedule[min(n, len(schedule)) - 1])


def deadline(received_at: float, lifetime: float) -> float:
    """When a message received at ``received_at`` expires."""
    return received_at + lifetime


def expired(now: float, received_at: float, lifetime: float) -> bool:
    """True once ``now`` is past the message's deadline."""
    return now > deadline(received_at, lifetime)


def after_deferral(*, now: float, received_at: float, attempts: int, schedule: Sequence[float],
                   lifetime: float) -> Retry | Expire:
    """The fate of a recipient just deferred at ``now`` after ``attempts`` tries."""
    at = now + retry_delay(attempts, schedule)
    end = deadline(received_at, lifetime)
    if at > end:
        return Expire(end)
    return Retry(at)
