"""state.sqlite - sender state for one node: one SQLite file in WAL mode

The default ``SenderState``: sliding-window counters, restrictions and
releases in ``DATA_DIR/state.db``. Every write runs on one worker thread
that owns the connection, so the event loop never waits on the disk; a
caller awaits the result. ``restriction`` (asked at every MAIL and RCPT) reads
on the event loop's own connection: a WAL read waits for no writer.

Counters are rows (key, ts, amount), and per key minute and hour buckets that
always equal the sum of the kept rows in their span. A window sum reads the
raw rows of its first partial minute, then minute buckets up to the next
whole hour, then hour buckets: its cost follows the events of one minute,
not the thousands a day-long window holds (summing the rows was 1.3 ms per
add at 20 k events and grew without bound). ``add`` is one transaction
opened with BEGIN IMMEDIATE: it takes the database's write lock before it
reads, then sums the window, inserts the event (and its buckets), prunes
the key's events older than the retention (once a minute per key), and commits. Another process writing the same file (a second
gateway on the host, the CLI) waits for the lock (busy_timeout), so of
several adds exactly one sees the total cross a limit. The window is
``ts > since`` (events stamped after ``now`` by a concurrent caller count too): an event at exactly ``since`` is out, one at
exactly ``now`` is in. Timestamps are stored as REAL, the caller's float
bit for bit, so the boundaries hold to the last bit.

Restrictions are one row per (kind, sender), in force while ``until`` is
NULL or later than now (restricted at until-ε, free at until). ``restrict``
and ``release`` check and change the row in one BEGIN IMMEDIATE transaction.
Releases are kept as a history (who, when); ``released_on_day`` looks for a
release within NOW's UTC day. Senders of kind "user" are addresses and are
lower-cased on the way in, so every method compares them case-insensitively;
connector names are kept as given.

Durability: counter transactions run with synchronous=NORMAL (in WAL mode a
crash of the process loses nothing; a power failure may lose the last
counts before a checkpoint, which only lets a sender send a little more).
Restrictions and releases run with synchronous=FULL: when ``restrict`` or
``release`` returns, the change is on disk.

TRUST: keys and senders are our own strings (addresses already parsed by
ingress); every value is bound as a parameter, never formatted into SQL.

STANDARDS: none (SQLite's WAL and locking: https://sqlite.org/wal.html,
https://sqlite.org/lang_transaction.html).

CONFIG: server.data_dir, state.backend = "sqlite"

SEE ALSO: state/__init__.py (the protocol), state/redis.py (several nodes),
state/open.py (the factory), spool/sqlite.py (the same house rules)
"""

from __future__ import annotations

import asyncio
import math
import os
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from . import Release, Restriction, utc_day_start

RETENTION = 25 * 3600.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS events(
    key    TEXT NOT NULL,
    ts     REAL NOT NULL,
    amount INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS events_window ON events(key, ts, amount);     -- covers the sums
CREATE TABLE IF NOT EXISTS buckets(
    key    TEXT NOT NULL,
    size   REAL NOT NULL,               -- 1, 60 or 3600 seconds
    start  REAL NOT NULL,               -- a multiple of size
    amount INTEGER NOT NULL,
    PRIMARY KEY(key, size, start)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS restrictions(
    kind   TEXT NOT NULL,
    sender TEXT NOT NULL,
    since  REAL NOT NULL,
    until  REAL,
    reason TEXT NOT NULL,
    tenant TEXT NOT NULL DEFAULT '',
    PRIMARY KEY(kind, sender)
);
CREATE TABLE IF NOT EXISTS releases(
    id     INTEGER PRIMARY KEY,
    kind   TEXT NOT NULL,
    sender TEXT NOT NULL,
    at     REAL NOT NULL,
    by     TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS releases_sender ON releases(kind, sender, at);
"""


def norm_sender(kind: str, sender: str) -> str:
    """Addresses compare case-insensitively; connector names as given."""
    return sender.lower() if kind == "user" else sender


def _connect(path: str) -> sqlite3.Connection:
    con = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    con.execute("PRAGMA busy_timeout=30000")
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=NORMAL")
    return con


AUTOCHECKPOINT_PAGES = 4000
SECOND, MINUTE, HOUR = 1.0, 60.0, 3600.0
BUCKET_SIZES = (SECOND, MINUTE, HOUR)


def _after(t: float, size: float) -> float:
    """The first multiple of SIZE strictly after T."""
    return math.floor(t / size) * size + size


def _window_sum(con: sqlite3.Connection, key: str, since: float) -> int:
    """Sum of the key's events with ts > since, in O(events of one second), not of the
    window: the raw events up to the next whole second, then whole seconds up to the next
    whole minute, whole minutes up to the next whole hour, then whole hours (the buckets
    hold every event from their start on, so the open upper edge, events stamped after
    now, is covered too). Second buckets matter for a sender at hundreds of messages a
    second: a minute of its raw events is thousands of rows to sum at every message."""
    s0, m0, h0 = _after(since, SECOND), _after(since, MINUTE), _after(since, HOUR)
    return con.execute(
        "SELECT (SELECT COALESCE(SUM(amount), 0) FROM events WHERE key=?1 AND ts>?2 AND ts<?3)"
        " + (SELECT COALESCE(SUM(amount), 0) FROM buckets WHERE key=?1 AND size=1.0 AND start>=?3 AND start<?4)"
        " + (SELECT COALESCE(SUM(amount), 0) FROM buckets WHERE key=?1 AND size=60.0 AND start>=?4 AND start<?5)"
        " + (SELECT COALESCE(SUM(amount), 0) FROM buckets WHERE key=?1 AND size=3600.0 AND start>=?5)",
        (key, since, s0, m0, h0)).fetchone()[0]


def _record(con: sqlite3.Connection, key: str, ts: float, amount: int) -> None:
    con.execute("INSERT INTO events(key, ts, amount) VALUES(?,?,?)", (key, ts, amount))
    for size in BUCKET_SIZES:
        con.execute("INSERT INTO buckets(key, size, start, amount) VALUES(?,?,?,?)"
                    " ON CONFLICT(key, size, start) DO UPDATE SET amount = amount + excluded.amount",
                    (key, size, math.floor(ts / size) * size, amount))


def _prune(con: sqlite3.Connection, key: str, cutoff: float) -> None:
    """Forget the key's events before CUTOFF, keeping every bucket equal to the sum of
    the events still kept in its span: a bucket that straddles CUTOFF loses what is
    pruned from it, those wholly before it go. So any window sums exactly what a
    scan of the kept events would."""
    for size in BUCKET_SIZES:
        b = math.floor(cutoff / size) * size
        if b < cutoff:
            con.execute("UPDATE buckets SET amount = amount - (SELECT COALESCE(SUM(amount), 0) FROM events"
                        " WHERE key=?1 AND ts>=?2 AND ts<?3) WHERE key=?1 AND size=?4 AND start=?2",
                        (key, b, cutoff, size))
        con.execute("DELETE FROM buckets WHERE key=? AND size=? AND start<?", (key, size, b))
    con.execute("DELETE FROM events WHERE key=? AND ts<?", (key, cutoff))


def _fill_buckets(con: sqlite3.Connection) -> None:
    """A state file from before the buckets (or before one of their sizes): sum its
    events into those of each missing size once."""
    for size in BUCKET_SIZES:
        if con.execute("SELECT 1 FROM buckets WHERE size=? LIMIT 1", (size,)).fetchone() is None:
            con.execute("INSERT INTO buckets(key, size, start, amount)"
                        " SELECT key, ?1, CAST(ts / ?1 AS INTEGER) * ?1, SUM(amount)"
                        " FROM events GROUP BY 1, 2, 3", (size,))


def prepare(path: str | os.PathLike) -> None:
    """Create the file, its schema and WAL mode, then close it: done once by the
    master before it forks workers (master.py), which then only open it."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    con = _connect(str(path))
    try:
        con.executescript(SCHEMA)
        SQLiteState._tx(con, _fill_buckets)
    finally:
        con.close()


class _Checkpointer(threading.Thread):
    """Copies the WAL back into the database file every EVERY seconds, on its own
    connection, beside the adds: SQLite's automatic checkpoint runs inside the commit
    that crosses 1000 WAL pages, and its two fsyncs made that add 10-12 ms instead of
    0.4 (the p99 of an add, once second buckets wrote more pages).

    SQLite rewinds the WAL only when a write begins after a checkpoint copied all of
    it, and adds keep writing while this thread copies (its "all copied" is of the
    frames there were when it began): so after each pass FINISH has the adds' own
    thread copy the few frames written meanwhile, between two adds, and the next add
    rewinds the WAL. One small checkpoint a second there, not a big one every hundred
    adds; without it the WAL grew without end under steady adds (1.5 GB in 18 s)."""

    def __init__(self, path: str, every: float, finish: Callable[[], None]):
        super().__init__(name="state-checkpoint", daemon=True)
        self.path, self.every, self.finish = path, every, finish
        self.stopping = threading.Event()

    def run(self) -> None:
        con = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=0)
        try:
            while not self.stopping.wait(self.every):
                try:
                    con.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                except sqlite3.Error:            # busy, or the file going away: next time
                    continue
                if self.stopping.is_set():
                    break
                try:
                    self.finish()
                except RuntimeError:             # the adds' thread is shutting down
                    break
        finally:
            con.close()


def _in_force(until: float | None, now: float) -> bool:
    return until is None or now < until


class SQLiteState:
    """The SenderState protocol on one SQLite file (``DATA_DIR/state.db``)."""

    def __init__(self, path: str | os.PathLike, retention: float = RETENTION, checkpoint_every: float = 1.0,
                 autocheckpoint_pages: int = AUTOCHECKPOINT_PAGES):
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        self.path = str(p)
        self.retention = float(retention)
        self._con = _connect(self.path)
        self._con.executescript(SCHEMA)
        self._tx(self._con, _fill_buckets)
        # _Checkpointer copies the WAL every second; SQLite's own checkpoint, inside a
        # commit, only when the WAL passes 4000 pages (16 MB): when another process's
        # adds keep it from being rewound (workers share the file; with 2 it grew 12 MB/s).
        self._con.execute(f"PRAGMA wal_autocheckpoint={int(autocheckpoint_pages)}")
        self._con.execute("PRAGMA journal_size_limit=67108864")  # a WAL that grew is cut back to 64 MB
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="state-sqlite")
        self._reader: sqlite3.Connection | None = None      # the event loop's own, for restriction()
        self._pruned: dict[str, float] = {}                 # key -> the minute its events were last pruned
        self.checkpoints = 0                                # whole-WAL checkpoints (_finish_checkpoint)
        self._closed = False
        self._checkpointer = _Checkpointer(self.path, checkpoint_every, self._finish_checkpoint)
        self._checkpointer.start()

    # -- plumbing --------------------------------------------------------
    def _finish_checkpoint(self) -> None:
        """From _Checkpointer: copy the WAL's last frames on the adds' own thread, between
        two adds, so that the next add rewinds the WAL."""
        def op() -> None:
            try:
                busy, log, copied = self._con.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            except sqlite3.Error:
                return
            if not busy and log == copied:
                self.checkpoints += 1             # the next add rewinds the WAL
        self._pool.submit(op)

    async def _run(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        if self._closed:
            raise RuntimeError("sender state is closed")
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, self._con)

    def _read_now(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        """Run the read FN on the event loop's own connection, without a thread hop (one
        costs ~40 µs of CPU, and restriction() is asked at every MAIL and RCPT). A read
        in WAL mode takes no lock a writer holds; should it find the file busy all the
        same (a WAL reset), it raises and the caller reads through the worker thread."""
        if self._closed:
            raise RuntimeError("sender state is closed")
        if self._reader is None:
            self._reader = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=0)
            self._reader.execute("PRAGMA busy_timeout=0")
        return fn(self._reader)

    def _prune_due(self, key: str, cutoff: float) -> bool:
        """Whether KEY's old events are to be pruned now: once per minute of CUTOFF and key
        in this process, not at every add (it is garbage collection only: no window reads
        events or buckets before its `since`, and the retention is longer than any window)."""
        minute = cutoff // MINUTE
        if self._pruned.get(key) == minute:
            return False
        if len(self._pruned) > 100_000:
            self._pruned.clear()
        self._pruned[key] = minute
        return True

    @staticmethod
    def _tx(con: sqlite3.Connection, fn: Callable[[sqlite3.Connection], Any], durable: bool = False) -> Any:
        """Run FN in one BEGIN IMMEDIATE transaction (FULL sync when DURABLE)."""
        if durable:
            con.execute("PRAGMA synchronous=FULL")
        try:
            con.execute("BEGIN IMMEDIATE")
            try:
                r = fn(con)
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")
            return r
        finally:
            if durable:
                con.execute("PRAGMA synchronous=NORMAL")

    # -- counters --------------------------------------------------------
    async def add(self, key: str, amount: int, now: float, since: float) -> tuple[int, int]:
        if amount < 0:
            raise ValueError(f"amount must not be negative: {amount}")
        now, since = float(now), float(since)
        cutoff = min(since, now - self.retention)

        def op(con: sqlite3.Connection) -> tuple[int, int]:
            # Everything after `since`, even past `now`: concurrent adds are stamped a moment
            # apart and may commit out of order; an event stamped later has happened all the same.
            before = _window_sum(con, key, since)
            if amount:
                _record(con, key, now, amount)
            if self._prune_due(key, cutoff):
                _prune(con, key, cutoff)
            # The new event is at NOW: inside (since, now] unless the window is empty.
            return before, before + amount if since < now else before

        return await self._run(lambda con: self._tx(con, op))

    async def add_many(self, items: list[tuple[str, int, float]], now: float) -> list[tuple[int, int]]:
        """Several adds at NOW in one transaction and one thread hop: (key, amount, since) each."""
        now = float(now)
        for _, amount, _ in items:
            if amount < 0:
                raise ValueError(f"amount must not be negative: {amount}")

        def op(con: sqlite3.Connection) -> list[tuple[int, int]]:
            out = []
            for key, amount, since in items:
                since = float(since)
                before = _window_sum(con, key, since)
                if amount:
                    _record(con, key, now, amount)
                cutoff = min(since, now - self.retention)
                if self._prune_due(key, cutoff):
                    _prune(con, key, cutoff)
                out.append((before, before + amount if since < now else before))
            return out

        return await self._run(lambda con: self._tx(con, op))

    async def count(self, key: str, now: float, since: float) -> int:
        def op(con: sqlite3.Connection) -> int:
            return _window_sum(con, key, float(since))
        return await self._run(op)

    # -- restrictions ----------------------------------------------------
    async def restrict(self, r: Restriction) -> bool:
        if r.until is not None and r.until <= r.since:
            raise ValueError(f"restriction of {r.sender} ends ({r.until}) before it starts ({r.since})")
        sender = norm_sender(r.kind, r.sender)

        def op(con: sqlite3.Connection) -> bool:
            row = con.execute("SELECT until FROM restrictions WHERE kind=? AND sender=?", (r.kind, sender)).fetchone()
            if row is not None and _in_force(row[0], r.since):
                return False
            con.execute("INSERT OR REPLACE INTO restrictions(kind, sender, since, until, reason, tenant)"
                        " VALUES(?,?,?,?,?,?)", (r.kind, sender, float(r.since),
                                                 None if r.until is None else float(r.until), r.reason, r.tenant))
            return True

        return await self._run(lambda con: self._tx(con, op, durable=True))

    async def restriction(self, kind: str, sender: str, now: float) -> Restriction | None:
        sender = norm_sender(kind, sender)

        def op(con: sqlite3.Connection) -> Restriction | None:
            row = con.execute("SELECT since, until, reason, tenant FROM restrictions WHERE kind=? AND sender=?"
                              " AND (until IS NULL OR until>?)", (kind, sender, float(now))).fetchone()
            return None if row is None else Restriction(kind, sender, row[0], row[1], row[2], row[3])

        try:
            return self._read_now(op)
        except sqlite3.OperationalError:
            return await self._run(op)

    async def release(self, kind: str, sender: str, now: float, by: str) -> bool:
        sender = norm_sender(kind, sender)

        def op(con: sqlite3.Connection) -> bool:
            row = con.execute("SELECT until FROM restrictions WHERE kind=? AND sender=?", (kind, sender)).fetchone()
            if row is None:
                return False
            con.execute("DELETE FROM restrictions WHERE kind=? AND sender=?", (kind, sender))
            if not _in_force(row[0], now):
                return False                 # it had ended already: nothing lifted
            con.execute("INSERT INTO releases(kind, sender, at, by) VALUES(?,?,?,?)", (kind, sender, float(now), by))
            return True

        return await self._run(lambda con: self._tx(con, op, durable=True))

    async def released_on_day(self, kind: str, sender: str, now: float) -> bool:
        sender = norm_sender(kind, sender)
        day = utc_day_start(now)

        def op(con: sqlite3.Connection) -> bool:
            return con.execute("SELECT 1 FROM releases WHERE kind=? AND sender=? AND at>=? AND at<? LIMIT 1",
                               (kind, sender, day, day + 86400.0)).fetchone() is not None

        return await self._run(op)

    async def last_release(self, kind: str, sender: str) -> Release | None:
        """The latest release of the sender (who and when), if any."""
        sender = norm_sender(kind, sender)

        def op(con: sqlite3.Connection) -> Release | None:
            row = con.execute("SELECT at, by FROM releases WHERE kind=? AND sender=? ORDER BY at DESC, id DESC LIMIT 1",
                              (kind, sender)).fetchone()
            return None if row is None else Release(kind, sender, row[0], row[1])

        return await self._run(op)

    async def restrictions(self, now: float) -> list[Restriction]:
        def op(con: sqlite3.Connection) -> list[Restriction]:
            rows = con.execute("SELECT kind, sender, since, until, reason, tenant FROM restrictions"
                               " WHERE until IS NULL OR until>? ORDER BY since, kind, sender", (float(now),))
            return [Restriction(*row) for row in rows]

        return await self._run(op)

    async def ping(self) -> None:
        """Raise if the database cannot be read (for `serve` to fail early)."""
        await self._run(lambda con: con.execute("SELECT 1").fetchone())

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._checkpointer.stopping.set()
        if self._reader is not None:
            self._reader.close()
        await asyncio.get_running_loop().run_in_executor(self._pool, self._con.close)
        self._pool.shutdown(wait=True)
        await asyncio.get_running_loop().run_in_executor(None, self._checkpointer.join)
