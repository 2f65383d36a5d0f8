"""spool.sqlite - the default spool: one SQLite file in WAL mode, group commit

One writer thread owns the writing connection. Callers submit operations;
the thread takes every operation that is waiting, runs them in a single
transaction and commits once (synchronous=FULL: the WAL is fsynced before the
commit returns), then wakes every caller. So concurrent SMTP sessions share
one fsync instead of paying one each, and no caller's ``accept`` returns
before its message is on disk. Reads use a second connection in their own
thread; WAL lets them run while the writer commits.

The body sits in its own table, written once; recipients carry the state
that changes after every attempt. When a message has no pending recipient
left, and no DSN is still owed for a bounced or expired recipient, its body
is dropped; the envelope, recipient results and trace stay until the history
retention (server.history_retention) has passed since it was received.

Several worker processes may share the file (``server.workers``): each
writes under SQLite's write lock with its own group commit, and each delivers
only the recipients of its own *shard*, the ``shard`` column written at
accept (the accepting worker's number). A worker takes ``shard % shards ==
its number``, so after a restart with fewer workers no shard is orphaned.

Operations a caller may rely on:

- ``due(now, limit, busy)`` gives up to ``limit`` whole (queue id, domain)
  groups, earliest next attempt first: it streams due rows from the
  ``recipients_due`` index until it has found that many groups not in
  ``busy``, then reads each group's due recipients. Its cost follows the rows
  it steps over, not the depth of the queue; a group is never split, and
  large messages already in flight cannot crowd the others out of a round;
- ``next_due_time()`` is one index seek (per shard number, with workers);
- ``undelivered_dsns()`` reads the ``recipients_dsn_owed`` index only;
- ``update`` changes only recipients still queued or deferred and returns
  the idxs it changed (one UPDATE per recipient; its rowcount says whether
  the row was still pending): a late result never overwrites a final state;
- ``delete(queue_id)`` is the operator's delete: the pending recipients
  become ``deleted`` (final, no DSN), ``messages.pending`` becomes 0, the
  body goes unless a DSN is still owed; it returns how many recipients were
  dropped (0: nothing was pending). The message row, the recipients' history
  and the trace stay, so ``poolmta trace`` can still tell the story;
- ``purge(before, limit)`` forgets finished messages received before
  ``before`` (server.history_retention, spool/retention.py): row, recipients,
  trace; never one with a recipient pending or a DSN owed;
- ``retry(queue_id | None, now)`` makes pending recipients due now and
  returns how many;
- ``list(limit)`` gives the messages with pending recipients, oldest first,
  each recipient as (address, state, last reply, attempts, next attempt).

TRUST: the file is ours; content is stored as opaque bytes.

CONFIG: server.data_dir

SEE ALSO: spool/store.py (the protocol), trace/recorder.py (events share this file)
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import orjson

from ..model import Decision, Envelope, Facts, Message, Origin, Recipient, Role, domain_of
from .store import PENDING, QueueEntry, message_id_of, RecipientState, RecipientUpdate, StoredMessage, StoredRecipient

SCHEMA = """
CREATE TABLE IF NOT EXISTS messages(
    queue_id     TEXT PRIMARY KEY,
    received_at  REAL NOT NULL,
    mail_from    TEXT NOT NULL,
    envelope     TEXT NOT NULL,
    origin       TEXT NOT NULL,
    message_id   TEXT NOT NULL DEFAULT '',
    pool         TEXT NOT NULL,
    decision     TEXT NOT NULL,
    facts        TEXT NOT NULL,
    size         INTEGER NOT NULL,
    pending      INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_mid ON messages(message_id);
CREATE INDEX IF NOT EXISTS messages_from ON messages(mail_from);
CREATE TABLE IF NOT EXISTS bodies(
    queue_id TEXT PRIMARY KEY,
    data     BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS recipients(
    queue_id     TEXT NOT NULL,
    idx          INTEGER NOT NULL,
    address      TEXT NOT NULL,
    domain       TEXT NOT NULL,
    notify       TEXT NOT NULL DEFAULT '',
    orcpt        TEXT NOT NULL DEFAULT '',
    original     TEXT NOT NULL DEFAULT '',
    state        TEXT NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL,
    last_reply   TEXT NOT NULL DEFAULT '',
    status       TEXT NOT NULL DEFAULT '',
    remote_mta   TEXT NOT NULL DEFAULT '',
    dsn_sent     INTEGER NOT NULL DEFAULT 0,
    updated      REAL NOT NULL,
    shard        INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY(queue_id, idx)
);
CREATE INDEX IF NOT EXISTS recipients_due ON recipients(next_attempt) WHERE state IN ('queued', 'deferred');
CREATE INDEX IF NOT EXISTS recipients_dsn_owed ON recipients(queue_id) WHERE state IN ('bounced', 'expired') AND dsn_sent = 0;
CREATE INDEX IF NOT EXISTS recipients_addr ON recipients(address);
CREATE TABLE IF NOT EXISTS events(
    id        INTEGER PRIMARY KEY,
    queue_id  TEXT NOT NULL,
    ts        REAL NOT NULL,
    kind      TEXT NOT NULL,
    data      TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_qid ON events(queue_id);
"""


def _connect(path: str) -> sqlite3.Connection:
    con = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=FULL")
    con.execute("PRAGMA busy_timeout=30000")
    con.execute("PRAGMA foreign_keys=OFF")
    return con


MAX_SHARD = 16                     # workers are numbered 0..15 (master.py, server.workers)


def _migrate(con: sqlite3.Connection) -> None:
    """Bring a spool written by an earlier version up to SCHEMA (columns added since)."""
    cols = {r[1] for r in con.execute("PRAGMA table_info(recipients)")}
    if "shard" not in cols:
        con.execute("ALTER TABLE recipients ADD COLUMN shard INTEGER NOT NULL DEFAULT 0")
    # The finished messages, oldest first, for purge() (the history retention).
    con.execute("CREATE INDEX IF NOT EXISTS messages_finished ON messages(received_at) WHERE pending = 0")
    # Each worker's next due time in O(log n) however deep the other shards are.
    con.execute("CREATE INDEX IF NOT EXISTS recipients_due_shard ON recipients(shard, next_attempt)"
                " WHERE state IN ('queued', 'deferred')")


def prepare(data_dir: str | os.PathLike) -> None:
    """Create or migrate ``DATA_DIR/spool.db`` and switch it to WAL, then close it.
    The master (master.py) does this once before forking workers: two processes
    switching one new file to WAL at the same moment get "database is locked"."""
    Path(data_dir).mkdir(parents=True, exist_ok=True)
    con = _connect(str(Path(data_dir) / "spool.db"))
    try:
        _create(con)
    finally:
        con.close()


def _create(con: sqlite3.Connection) -> None:
    """SCHEMA, then the migrations (one process migrates at a time)."""
    con.executescript(SCHEMA)
    con.execute("BEGIN IMMEDIATE")
    try:
        _migrate(con)
    finally:
        con.execute("COMMIT")


class _Writer(threading.Thread):
    """Group commit: run every waiting operation in one transaction."""

    def __init__(self, path: str):
        super().__init__(name="spool-writer", daemon=True)
        self.con = _connect(path)
        _create(self.con)
        self.q: queue.Queue = queue.Queue()
        self.batches = 0
        self.ops = 0

    def run(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                break
            batch = [item]
            while True:
                try:
                    nxt = self.q.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self.q.put(None)
                    break
                batch.append(nxt)
            results: list[tuple[Any, Any, Any, Any]] = []
            try:
                self.con.execute("BEGIN IMMEDIATE")
                for fn, loop, fut in batch:
                    self.con.execute("SAVEPOINT op")
                    try:
                        r = fn(self.con)
                        self.con.execute("RELEASE op")
                        results.append((loop, fut, r, None))
                    except Exception as e:           # one bad op must not sink the batch
                        self.con.execute("ROLLBACK TO op")
                        self.con.execute("RELEASE op")
                        results.append((loop, fut, None, e))
                self.con.execute("COMMIT")
            except Exception as e:
                try:
                    self.con.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
                results = [(loop, fut, None, e) for fn, loop, fut in batch]
            self.batches += 1
            self.ops += len(batch)
            for loop, fut, r, e in results:
                if fut is not None:
                    loop.call_soon_threadsafe(_settle, fut, r, e)
        self.con.close()


def _settle(fut: asyncio.Future, result: Any, exc: BaseException | None) -> None:
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)


def _json(obj: Any) -> str:
    """Compact JSON of a dict or dataclass (orjson: a dataclass as asdict() would give it,
    without asdict's deep copy, which cost more than the rest of an accept)."""
    return orjson.dumps(obj).decode()


def _envelope_from(s: str) -> Envelope:
    d = orjson.loads(s)
    d["recipients"] = tuple(Recipient(r["address"], tuple(r["notify"]), r["orcpt"], r["original"], r.get("refused", ""))
                            for r in d["recipients"])
    return Envelope(**d)


def _decision_from(s: str) -> Decision:
    d = orjson.loads(s)
    return Decision(Role(d["role"]), d["pool"], tuple(d["reasons"]), tuple(d.get("recheck", ())), d.get("srs", False))


class SQLiteSpool:
    """The Spool protocol on one SQLite file (``DATA_DIR/spool.db``)."""

    def __init__(self, data_dir: str | os.PathLike, *, shard: int = 0, shards: int = 1):
        """``shard`` of ``shards``: this worker's number and how many share the file."""
        if not 0 <= shard < shards:
            raise ValueError(f"shard {shard} is not in 0..{shards - 1}")
        self.shard, self.shards = shard, shards
        # SQL that keeps the rows of this worker's shard (nothing to filter for one worker).
        self._mine = f" AND shard % {shards} = {shard}" if shards > 1 else ""
        Path(data_dir).mkdir(parents=True, exist_ok=True)
        self.path = str(Path(data_dir) / "spool.db")
        self._writer = _Writer(self.path)
        self._writer.start()
        self._reader = _connect(self.path)
        self._reads = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spool-reader")
        self._purge_cursor = 0          # purge(): the trace event id to look on from
        self._closed = False

    # -- plumbing --------------------------------------------------------
    def _write(self, fn: Callable[[sqlite3.Connection], Any]) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._writer.q.put((fn, loop, fut))
        return fut

    def write_nowait(self, fn: Callable[[sqlite3.Connection], Any]) -> None:
        """Queue a write that nobody waits for (trace events): it rides the next commit."""
        self._writer.q.put((fn, None, None))

    async def _read(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._reads, fn, self._reader)

    def stats(self) -> dict:
        return {"commits": self._writer.batches, "operations": self._writer.ops}

    # -- the protocol ----------------------------------------------------
    async def accept(self, msg: Message, facts: Facts, decision: Decision) -> None:
        env = msg.envelope
        now = msg.received_at
        mrow = (msg.queue_id, msg.received_at, env.mail_from, _json(env), _json(msg.origin),
                message_id_of(msg.content), decision.pool, _json(decision.to_dict()), _json(facts), len(msg.content),
                sum(1 for r in env.recipients if not r.refused))
        # A recipient refused at accept (e.g. forwarding disabled) is final at once:
        # stored as bounced with its reply, and the DSN sweep reports it.
        rrows = [(msg.queue_id, i, r.address, domain_of(r.address), ",".join(r.notify), r.orcpt, r.original,
                  RecipientState.BOUNCED.value if r.refused else RecipientState.QUEUED.value, 0, now,
                  r.refused, r.refused.split(" ")[1] if r.refused.count(" ") >= 1 else "", now, self.shard)
                 for i, r in enumerate(env.recipients)]
        content = msg.content

        def op(con: sqlite3.Connection) -> None:
            con.execute("INSERT INTO messages VALUES (?,?,?,?,?,?,?,?,?,?,?)", mrow)
            con.execute("INSERT INTO bodies VALUES (?,?)", (msg.queue_id, content))
            con.executemany("INSERT INTO recipients(queue_id, idx, address, domain, notify, orcpt, original, state,"
                            " attempts, next_attempt, last_reply, status, updated, shard)"
                            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                            rrows)
        await self._write(op)

    async def due(self, now: float, limit: int, busy: set[tuple[str, str]]) -> list[tuple[str, str, list[int]]]:
        """Whole (queue id, domain) groups with a due recipient, earliest first.

        The limit counts groups, not recipients: a big group is never split, and
        groups in flight (``busy``) are left out without taking places."""
        if limit <= 0:
            return []

        def op(con: sqlite3.Connection):
            # Due rows streamed in next_attempt order from the partial index, only until
            # LIMIT groups are found (grouping every due row first cost a second per
            # round with 1 M due); rows of busy groups are stepped over, so big groups in
            # flight cannot starve the rest. Then each group's due recipients by its
            # queue id: a group is never split.
            groups: list[tuple[str, str]] = []
            seen: set[tuple[str, str]] = set(busy)
            rows = con.execute(
                "SELECT queue_id, domain FROM recipients INDEXED BY recipients_due"
                " WHERE state IN ('queued','deferred') AND next_attempt <= ?" + self._mine +
                " ORDER BY next_attempt", (now,))
            for qid, dom in rows:
                if (qid, dom) not in seen:
                    seen.add((qid, dom))
                    groups.append((qid, dom))
                    if len(groups) >= limit:
                        break
            out: list[tuple[str, str, list[int]]] = []
            for qid, dom in groups:
                idxs = [r[0] for r in con.execute(
                    "SELECT idx FROM recipients WHERE queue_id=? AND domain=? AND state IN ('queued','deferred')"
                    " AND next_attempt <= ? ORDER BY idx", (qid, dom, now))]
                if idxs:
                    out.append((qid, dom, idxs))
            return out
        return await self._read(op)

    async def next_due_time(self) -> float | None:
        def op(con):
            if self.shards == 1:
                return con.execute("SELECT MIN(next_attempt) FROM recipients"
                                   " WHERE state IN ('queued','deferred')").fetchone()[0]
            # One index seek per shard number this worker owns (shard % shards == mine):
            # "shard % N = k" in a WHERE would walk the whole due index of the others.
            mine = range(self.shard, MAX_SHARD, self.shards)
            parts = " UNION ALL ".join(
                "SELECT (SELECT MIN(next_attempt) FROM recipients WHERE state IN ('queued','deferred')"
                f" AND shard = {k}) AS m" for k in mine)
            return con.execute(f"SELECT MIN(m) FROM ({parts})").fetchone()[0]
        return await self._read(op)

    async def get(self, queue_id: str) -> StoredMessage | None:
        def op(con):
            m = con.execute("SELECT queue_id, received_at, envelope, origin, decision, facts, message_id FROM messages"
                            " WHERE queue_id = ?", (queue_id,)).fetchone()
            if m is None:
                return None
            body = con.execute("SELECT data FROM bodies WHERE queue_id = ?", (queue_id,)).fetchone()
            rows = con.execute("SELECT idx, address, domain, state, attempts, next_attempt, last_reply, status,"
                               " remote_mta, notify, orcpt, original, dsn_sent FROM recipients WHERE queue_id = ?"
                               " ORDER BY idx", (queue_id,)).fetchall()
            return m, (body[0] if body else b""), rows
        got = await self._read(op)
        if got is None:
            return None
        m, body, rows = got
        origin = Origin(**json.loads(m[3]))
        msg = Message(m[0], _envelope_from(m[2]), origin, bytes(body), m[1])
        rcpts = tuple(StoredRecipient(r[0], r[1], r[2], RecipientState(r[3]), r[4], r[5], r[6], r[7], r[8],
                                      tuple(x for x in r[9].split(",") if x), r[10], r[11], bool(r[12])) for r in rows)
        return StoredMessage(msg, _decision_from(m[4]), json.loads(m[5]), rcpts, m[6])

    async def update(self, queue_id: str, updates: list[RecipientUpdate], now: float) -> list[int]:
        rows = [(u.state.value, u.next_attempt, 1 if u.attempted else 0, u.reply, u.status, u.remote_mta, now,
                 queue_id, u.idx) for u in updates]

        def op(con: sqlite3.Connection) -> list[int]:
            changed: list[int] = []
            for row in rows:
                # One statement per recipient, so its rowcount says whether the
                # row was still pending (works on every SQLite, no RETURNING needed).
                cur = con.execute("UPDATE recipients SET state=?, next_attempt=?, attempts=attempts+?,"
                                  " last_reply=CASE WHEN ?4 = '' THEN last_reply ELSE ?4 END,"
                                  " status=CASE WHEN ?5 = '' THEN status ELSE ?5 END,"
                                  " remote_mta=CASE WHEN ?6 = '' THEN remote_mta ELSE ?6 END, updated=?"
                                  " WHERE queue_id=? AND idx=? AND state IN ('queued','deferred')", row)
                if cur.rowcount > 0:
                    changed.append(row[-1])
            pending = con.execute("SELECT COUNT(*) FROM recipients WHERE queue_id=? AND state IN ('queued','deferred')",
                                  (queue_id,)).fetchone()[0]
            con.execute("UPDATE messages SET pending=? WHERE queue_id=?", (pending, queue_id))
            if pending == 0:
                con.execute("DELETE FROM bodies WHERE queue_id=? AND NOT EXISTS (SELECT 1 FROM recipients"
                            " WHERE queue_id=? AND state IN ('bounced','expired') AND dsn_sent=0)", (queue_id, queue_id))
            return changed
        return await self._write(op)

    async def set_decision(self, queue_id: str, decision: Decision, facts: Facts) -> None:
        def op(con):
            con.execute("UPDATE messages SET pool=?, decision=?, facts=? WHERE queue_id=?",
                        (decision.pool, _json(decision.to_dict()), _json(facts), queue_id))
        await self._write(op)

    async def mark_dsn_sent(self, queue_id: str, idxs: list[int]) -> None:
        def op(con):
            con.executemany("UPDATE recipients SET dsn_sent=1 WHERE queue_id=? AND idx=?", [(queue_id, i) for i in idxs])
            con.execute("DELETE FROM bodies WHERE queue_id=? AND NOT EXISTS (SELECT 1 FROM recipients WHERE queue_id=?"
                        " AND (state IN ('queued','deferred') OR (state IN ('bounced','expired') AND dsn_sent=0)))",
                        (queue_id, queue_id))
        await self._write(op)

    async def undelivered_dsns(self) -> list[str]:
        """Messages with failed recipients whose DSN was not made yet (after a crash)."""
        def op(con):
            return [r[0] for r in con.execute(
                "SELECT DISTINCT queue_id FROM recipients WHERE state IN ('bounced','expired') AND dsn_sent=0"
                + self._mine)]
        return await self._read(op)

    async def list(self, limit: int = 1000) -> list[QueueEntry]:
        def op(con):
            ms = con.execute("SELECT queue_id, received_at, mail_from, pool, size, pending FROM messages"
                             " WHERE pending > 0 ORDER BY received_at LIMIT ?", (limit,)).fetchall()
            out = []
            for q in ms:
                rs = con.execute("SELECT address, state, last_reply, attempts, next_attempt FROM recipients"
                                 " WHERE queue_id=? ORDER BY idx", (q[0],)).fetchall()
                out.append(QueueEntry(q[0], q[1], q[2], q[3], q[4], q[5], tuple(tuple(r) for r in rs)))
            return out
        return await self._read(op)

    async def retry(self, queue_id: str | None, now: float) -> int:
        def op(con):
            if queue_id:
                cur = con.execute("UPDATE recipients SET next_attempt=? WHERE queue_id=? AND state IN ('queued','deferred')",
                                  (now, queue_id))
            else:
                cur = con.execute("UPDATE recipients SET next_attempt=? WHERE state IN ('queued','deferred')", (now,))
            return cur.rowcount
        return await self._write(op)

    async def delete(self, queue_id: str, *, now: float | None = None) -> int:
        when = time.time() if now is None else now

        def op(con):
            n = con.execute("UPDATE recipients SET state='deleted', updated=? WHERE queue_id=?"
                            " AND state IN ('queued','deferred')", (when, queue_id)).rowcount
            con.execute("UPDATE messages SET pending=0 WHERE queue_id=?", (queue_id,))
            # Recipients that already bounced may still be owed their DSN, which quotes the body.
            con.execute("DELETE FROM bodies WHERE queue_id=? AND NOT EXISTS (SELECT 1 FROM recipients WHERE queue_id=?"
                        " AND state IN ('bounced','expired') AND dsn_sent=0)", (queue_id, queue_id))
            return n
        return await self._write(op)

    async def purge(self, before: float, limit: int = 500) -> int:
        """Forget up to LIMIT finished messages received before BEFORE (oldest first):
        their row, recipients' results, body and trace events. A message with a
        recipient still pending, or a DSN still owed, is never taken. Then trace
        events older than BEFORE that belong to no message (transactions refused at
        DATA, audit events of senders), up to LIMIT * 10 of them. Returns how many
        messages went. One short transaction in the group commit (readers and the
        other workers wait for it, so it is kept small: call it again while it
        returns LIMIT)."""
        def op(con: sqlite3.Connection) -> int:
            qids = [(q,) for (q,) in con.execute(
                "SELECT queue_id FROM messages m WHERE pending = 0 AND received_at < ? AND NOT EXISTS"
                " (SELECT 1 FROM recipients r WHERE r.queue_id = m.queue_id AND state IN ('bounced','expired')"
                " AND dsn_sent = 0) ORDER BY received_at LIMIT ?", (before, limit))]
            for table in ("events", "recipients", "bodies", "messages"):
                con.executemany(f"DELETE FROM {table} WHERE queue_id = ?", qids)
            # Events of no message: walk them by id (ids grow with time), a bounded run at a time.
            row = con.execute("SELECT MIN(id) FROM events WHERE id >= ?", (self._purge_cursor,)).fetchone()
            lo = row[0]
            if lo is not None:
                hi = lo + limit * 10
                con.execute("DELETE FROM events WHERE id >= ? AND id < ? AND ts < ? AND NOT EXISTS"
                            " (SELECT 1 FROM messages m WHERE m.queue_id = events.queue_id)", (lo, hi, before))
                newer = con.execute("SELECT 1 FROM events WHERE id >= ? AND id < ? AND ts >= ? LIMIT 1",
                                    (lo, hi, before)).fetchone()
                # Past the retention's edge: start from the same place next time.
                self._purge_cursor = lo if newer else hi
            return len(qids)
        return await self._write(op)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._writer.q.put(None)
        await asyncio.get_running_loop().run_in_executor(None, self._writer.join)
        self._reads.shutdown(wait=True)
        self._reader.close()
