"""trace.events - the closed set of things that can happen to a message

Structured logs and the trace use the same names. Each event is a kind, a
queue id, a time and a small dict of data; the kinds are fixed here so the CLI,
tests and an operator's log queries can rely on them.

SEE ALSO: trace/recorder.py, trace/query.py
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class EventKind(StrEnum):
    RECEIVED = "received"        # client ip, helo, auth user / connector, tenant, size, envelope
    ASSESSED = "assessed"        # the facts
    ROUTED = "routed"            # pool, role, reasons
    REWRITTEN = "rewritten"      # SRS (old → new sender), DKIM (d=, s=), ARC (domain), or why not
    QUEUED = "queued"            # durable in the spool (the 250 was sent)
    RECHECKED = "rechecked"      # a fact re-checked before delivery
    REROUTED = "rerouted"        # decision changed after a recheck
    ATTEMPT = "attempt"          # one delivery transaction: source, ehlo, mx, ip, tls, replies
    DELIVERED = "delivered"      # per recipient: remote reply
    DEFERRED = "deferred"        # per recipient: reply, next attempt
    BOUNCED = "bounced"          # per recipient: reply
    EXPIRED = "expired"          # per recipient: last reply
    DSN_CREATED = "dsn-created"  # the DSN's queue id and the recipients it reports
    DSN_SUPPRESSED = "dsn-suppressed"  # no DSN: null reverse-path or NOTIFY=NEVER
    SENDER_ACTION = "sender-action"  # a limit or spam volume restricted the sender and/or alerted its admins
    SENDER_RELEASED = "sender-released"  # an administrator released a restricted sender (who, when)
    RETRY_REQUESTED = "retry-requested"  # operator asked for an immediate retry
    DELETED = "deleted"          # operator removed the message


@dataclass(frozen=True)
class Event:
    queue_id: str
    kind: EventKind
    ts: float
    data: dict = field(default_factory=dict)
