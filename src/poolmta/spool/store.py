"""spool.store - what the spool promises, independent of where it keeps things

The Spool protocol is the only way any stage touches the queue (the way
Postfix's cleanup owns the incoming queue and qmgr reads it). The body is
written once at accept; the per-recipient state is updated after each
attempt, as KumoMTA keeps its data and meta spools apart.

A recipient's state only moves forward: queued/deferred → delivered,
bounced, expired or deleted, never back. ``update`` touches only recipients
still pending and returns the ones it changed, so a delivery result that
arrives after an operator's ``delete`` changes nothing and is not reported.

TRUST: everything here was accepted by ingress and routed; ``accept`` must
not return before the message is durable.

SEE ALSO: spool/sqlite.py, spool/schedule.py, deliver/scheduler.py
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from ..model import Decision, Facts, Message, domain_of


class RecipientState(StrEnum):
    QUEUED = "queued"          # never tried
    DEFERRED = "deferred"      # tried, temporary failure, will retry
    DELIVERED = "delivered"    # final: 2xx from the receiver
    BOUNCED = "bounced"        # final: 5xx, null MX, …
    EXPIRED = "expired"        # final: still deferred at the end of the queue lifetime
    DELETED = "deleted"        # final: an operator removed it (`poolmta queue delete`); no DSN

    @property
    def final(self) -> bool:
        return self not in (RecipientState.QUEUED, RecipientState.DEFERRED)


PENDING = (RecipientState.QUEUED.value, RecipientState.DEFERRED.value)


@dataclass(frozen=True)
class StoredRecipient:
    idx: int
    address: str
    domain: str
    state: RecipientState
    attempts: int
    next_attempt: float
    last_reply: str            # the last remote (or our own) reply, "550 5.1.1 …"
    status: str                # enhanced status code of last_reply
    remote_mta: str            # host that gave last_reply
    notify: tuple[str, ...]
    orcpt: str
    original: str
    dsn_sent: bool


@dataclass(frozen=True)
class StoredMessage:
    message: Message
    decision: Decision
    facts: dict
    recipients: tuple[StoredRecipient, ...]
    message_id: str


@dataclass(frozen=True)
class RecipientUpdate:
    idx: int
    state: RecipientState
    next_attempt: float
    reply: str = ""
    status: str = ""
    remote_mta: str = ""
    attempted: bool = True     # False: only the schedule moved (e.g. source-domain recheck)


@dataclass(frozen=True)
class QueueEntry:
    """A line of `poolmta queue list`."""
    queue_id: str
    received_at: float
    mail_from: str
    pool: str
    size: int
    pending: int
    # (address, state, last_reply, attempts, next_attempt), every recipient in idx order
    recipients: tuple[tuple[str, str, str, int, float], ...]


class Spool(Protocol):
    async def accept(self, msg: Message, facts: Facts, decision: Decision) -> None:
        """Store envelope, body and decision; return only once durable."""

    async def due(self, now: float, limit: int, busy: set[tuple[str, str]]) -> list[tuple[str, str, list[int]]]:
        """Up to ``limit`` (queue_id, domain, recipient idxs) groups whose next attempt is due,
        earliest first; each group whole (every due recipient of that message and
        domain), none of the ``busy`` keys."""

    async def next_due_time(self) -> float | None: ...

    async def get(self, queue_id: str) -> StoredMessage | None: ...

    async def update(self, queue_id: str, updates: list[RecipientUpdate], now: float) -> list[int]:
        """Apply ``updates`` to recipients that are still pending (queued or
        deferred); a recipient that became final meanwhile (delivered, bounced,
        expired, or deleted by an operator while an attempt was in flight) is
        left alone. Return the idxs actually changed: only those may be traced
        or reported in a DSN."""

    async def set_decision(self, queue_id: str, decision: Decision, facts: Facts) -> None: ...

    async def mark_dsn_sent(self, queue_id: str, idxs: list[int]) -> None: ...

    async def undelivered_dsns(self) -> list[str]:
        """Queue ids with bounced/expired recipients whose DSN was not made yet (after a crash)."""

    async def list(self, limit: int = 1000) -> list[QueueEntry]:
        """Messages with pending recipients, oldest first (``poolmta queue list``)."""

    async def retry(self, queue_id: str | None, now: float) -> int:
        """Make the pending recipients of ``queue_id`` (None: of every message)
        due at ``now``; return how many."""

    async def delete(self, queue_id: str) -> int:
        """The operator's delete: mark the pending recipients ``deleted`` (final,
        no DSN), leave nothing pending, drop the body unless a DSN is still owed
        for a bounced or expired recipient; return how many recipients were
        dropped (0 if none was pending). History and trace stay."""

    async def purge(self, before: float, limit: int = 500) -> int:
        """Forget up to ``limit`` finished messages (nothing pending, no DSN owed)
        received before ``before``, with their trace; return how many."""

    async def close(self) -> None: ...


def message_id_of(content: bytes) -> str:
    """The Message-ID header's value, found without parsing the whole message."""
    head = content.split(b"\r\n\r\n", 1)[0]
    for line in head.split(b"\r\n"):
        if line[:11].lower() == b"message-id:":
            return line[11:].strip().decode("utf-8", "replace")[:255]
    return ""


def just_accepted(msg: Message, decision: Decision, facts: dict) -> StoredMessage:
    """What ``Spool.accept(msg, …)`` has just written, as ``get()`` would read it back:
    deliver takes a fresh message from memory instead of reading it from disk
    (deliver/scheduler.py, ``accepted``). Recipients refused at accept are bounced."""
    now = msg.received_at
    rcpts = tuple(StoredRecipient(i, r.address, domain_of(r.address),
                                  RecipientState.BOUNCED if r.refused else RecipientState.QUEUED, 0, now,
                                  r.refused, r.refused.split(" ")[1] if r.refused.count(" ") >= 1 else "", "",
                                  tuple(r.notify), r.orcpt, r.original, False)
                  for i, r in enumerate(msg.envelope.recipients))
    return StoredMessage(msg, decision, facts, rcpts, message_id_of(msg.content))


_counter = 0
_worker: int | None = None           # this process's worker number, when several share the spool


def set_worker(number: int) -> None:
    """Called once by a worker process (``server.workers`` > 1): its number goes
    into every queue id it makes, so two workers can never make the same one."""
    global _worker
    if not 0 <= number < 16:
        raise ValueError("worker numbers are 0..15")
    _worker = number


def new_queue_id() -> str:
    """Time-ordered, unique within the host: 13 hex digits of microseconds, one of
    the worker's number (random with one process) and three of a counter,
    upper-case like Postfix's queue ids."""
    global _counter
    _counter = (_counter + 1) & 0xFFF
    us = int(time.time() * 1_000_000) & 0xFFFFFFFFFFFFF
    node = _worker if _worker is not None else int.from_bytes(os.urandom(1), "big") >> 4
    return f"{us:013X}{node:X}{_counter:03X}"
