"""trace.recorder - record an event: add time, store it with the spool, log it as JSON

A chain of plain processor functions, as in structlog: each takes the event
and returns it (or None to drop it). The default chain stamps the time, writes
the event into the spool file (riding the spool's next group commit) and logs
one JSON object per event. Tests may add ``capture`` to collect events.

SEE ALSO: trace/events.py, trace/query.py, spool/sqlite.py
"""

from __future__ import annotations

import asyncio
import logging
import os
import select
import sqlite3
import sys
import time
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
        self._spool = spool
        self._rows: list[tuple] = []          # events for the spool, written once per event-loop turn
        chain: list[Processor] = []
        if spool is not None:
            chain.append(self._to_spool)
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

    def flush(self) -> None:
        """Hand over what waits for the end of this event-loop turn: the spool's rows
        (before the spool closes) and the event log's lines."""
        self._flush_rows()
        _event_log.flush()

    def capture(self) -> list[Event]:
        """Start collecting events in memory (tests) and return the list."""
        self.captured = []
        return self.captured

    def _to_spool(self, ev: Event) -> Event:
        """Queue the event's row; the rows of one event-loop turn (a message's received,
        assessed, routed, rewritten, queued…) go to the spool writer as one operation,
        riding its next group commit (one queue hand-off and savepoint, not seven)."""
        self._rows.append((ev.queue_id, ev.ts, ev.kind.value, _encoded(ev).decode()))
        if len(self._rows) == 1:
            try:
                asyncio.get_running_loop().call_soon(self._flush_rows)
            except RuntimeError:              # no event loop (a command-line tool): at once
                self._flush_rows()
        return ev

    def _flush_rows(self) -> None:
        rows, self._rows = self._rows, []
        if not rows:
            return

        def op(con: sqlite3.Connection) -> None:
            con.executemany("INSERT INTO events(queue_id, ts, kind, data) VALUES (?,?,?,?)", rows)
        self._spool.write_nowait(op)


def _encoded(ev: Event) -> bytes:
    """The data's JSON, made once per event for both the spool and the log."""
    cached = getattr(ev, "_json", None)
    if cached is None:
        cached = encode(ev.data)
        object.__setattr__(ev, "_json", cached)
    return cached


class EventLog:
    """Trace events as one JSON object per line on standard error, in the format of the
    gateway's other log lines (``2026-12-04 09:10:09,802 poolmta.trace INFO {…}``),
    when the ``poolmta.trace`` logger is enabled for INFO (``serve --log-level``).

    Why not ``logging.info``: seven events per message made the logging machinery
    (record, formatter, handler, a flush per line) a tenth of the gateway's CPU.
    Lines are gathered and written once per event-loop turn, in writes of at most
    PIPE_BUF bytes so that worker processes sharing the stream never interleave
    inside a line."""

    def __init__(self, stream=None):
        self._stream = stream                 # None: sys.stderr as it is at each write
        self._pending: list[bytes] = []
        self._scheduled = False
        self._second = -1
        self._stamp = ""

    def add(self, ts: float, line: bytes) -> None:
        sec = int(ts)
        if sec != self._second:
            self._second, self._stamp = sec, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(sec))
        self._pending.append(f"{self._stamp},{int((ts - sec) * 1000):03d} poolmta.trace INFO ".encode()
                             + line + b"\n")
        if self._scheduled:
            return
        try:
            asyncio.get_running_loop().call_soon(self.flush)
            self._scheduled = True
        except RuntimeError:                  # no event loop (a command-line tool): at once
            self.flush()

    def flush(self) -> None:
        self._scheduled = False
        lines, self._pending = self._pending, []
        if not lines:
            return
        stream = self._stream or sys.stderr
        try:
            stream.flush()                    # what went through the stream before goes first
            try:
                fd = stream.fileno()
            except (AttributeError, OSError, ValueError):
                fd = None                     # not a real file (a test's capture): through the stream
            for data in _pipe_sized(lines):
                if fd is None:
                    out = getattr(stream, "buffer", None)
                    out.write(data) if out is not None else stream.write(data.decode("utf-8", "replace"))
                    continue
                while data:                   # os.write, not the buffered writer, which would merge
                    data = data[os.write(fd, data):]
            if fd is None:
                stream.flush()
        except (OSError, ValueError):         # a closed or broken stream must not stop the mail
            pass


def _pipe_sized(lines: list[bytes]):
    """Whole lines joined into writes of at most PIPE_BUF bytes (a longer line alone)."""
    chunk: list[bytes] = []
    size = 0
    for line in lines:
        if chunk and size + len(line) > select.PIPE_BUF:
            yield b"".join(chunk)
            chunk, size = [], 0
        chunk.append(line)
        size += len(line)
    if chunk:
        yield b"".join(chunk)


_event_log = EventLog()


def _to_json_log(ev: Event) -> Event:
    if log.isEnabledFor(logging.INFO):
        # {"event":…,"queue_id":…,"ts":…, then the data's own members}
        head = orjson.dumps({"event": ev.kind.value, "queue_id": ev.queue_id, "ts": round(ev.ts, 6)})
        data = _encoded(ev)
        _event_log.add(ev.ts, head[:-1] + b"," + data[1:] if len(data) > 2 else head)
    return ev
