"""trace.recorder - record an event: add time, store it with the spool, log it as JSON

A chain of plain processor functions, as in structlog: each takes the event
and returns it (or None to drop it). The default chain stamps the time, writes
the event into the spool file (riding the spool's next group commit) and logs
one JSON object per event. Tests may add ``capture`` to collect events.

SEE ALSO: trace/events.py, trace/query.py, spool/sqlite.py
"""

from __future__ import annotations

import logging
import sqlite3
from typing import Callable

import orjson

from ..clock import Clock
from .events import Event, EventKind

log = logging.getLogger("poolmta.trace")

Processor = Callable[[Event], Event | None]


def encode(data: dict) -> bytes:
    """An event's data as compact JSON (orjson: dataclasses, enums and tuples as
    json.dumps would write their dicts, values and lists; anything else as str)."""
    return orjson.dumps(data, default=str)


class Recorder:
    def __init__(self, clock: Clock, spool=None, processors: list[Processor] | None = None):
        self.clock = clock
        chain: list[Processor] = []
        if spool is not None:
            chain.append(self._to_spool(spool))
        chain.append(_to_json_log)
        self.chain = processors if processors is not None else chain
        self.captured: list[Event] | None = None

    def record(self, queue_id: str, kind: EventKind, **data) -> None:
        ev: Event | None = Event(queue_id, kind, self.clock.now(), data)
        if self.captured is not None:
            self.captured.append(ev)
        for proc in self.chain:
            ev = proc(ev)
            if ev is None:
                return

    def capture(self) -> list[Event]:
        """Start collecting events in memory (tests) and return the list."""
        self.captured = []
        return self.captured

    @staticmethod
    def _to_spool(spool) -> Processor:
        def proc(ev: Event) -> Event:
            row = (ev.queue_id, ev.ts, ev.kind.value, _encoded(ev).decode())

            def op(con: sqlite3.Connection) -> None:
                con.execute("INSERT INTO events(queue_id, ts, kind, data) VALUES (?,?,?,?)", row)
            spool.write_nowait(op)
            return ev
        return proc


def _encoded(ev: Event) -> bytes:
    """The data's JSON, made once per event for both the spool and the log."""
    cached = getattr(ev, "_json", None)
    if cached is None:
        cached = encode(ev.data)
        object.__setattr__(ev, "_json", cached)
    return cached


def _to_json_log(ev: Event) -> Event:
    if log.isEnabledFor(logging.INFO):
        # {"event":…,"queue_id":…,"ts":…, then the data's own members}
        head = orjson.dumps({"event": ev.kind.value, "queue_id": ev.queue_id, "ts": round(ev.ts, 6)})
        data = _encoded(ev)
        log.info((head[:-1] + b"," + data[1:] if len(data) > 2 else head).decode())
    return ev
