"""trace.query - the read side of the trace: timelines, summaries, look-ups

Opens the spool file read-only, so `poolmta trace` works while the gateway
runs (WAL allows it) and after it stopped.

SEE ALSO: cli.py (trace), trace/recorder.py
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path


def open_readonly(data_dir: str) -> sqlite3.Connection:
    path = Path(data_dir) / "spool.db"
    if not path.exists():
        raise FileNotFoundError(f"no spool at {path} (is server.data_dir right?)")
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    con.execute("PRAGMA busy_timeout=30000")
    return con


def timeline(con: sqlite3.Connection, queue_id: str) -> list[dict]:
    rows = con.execute("SELECT ts, kind, data FROM events WHERE queue_id=? ORDER BY id", (queue_id,)).fetchall()
    return [{"ts": ts, "event": kind, **json.loads(data)} for ts, kind, data in rows]


def summary(con: sqlite3.Connection, queue_id: str) -> dict:
    """A compact outcome: counts of per-recipient outcomes and the pool, for tests and `trace`."""
    out: dict = {}
    for ev in timeline(con, queue_id):
        k = ev["event"]
        if k in ("routed", "rerouted"):
            out["routed"] = ev["pool"]
            out["reasons"] = ev["reasons"]
        elif k in ("received", "delivered", "deferred", "bounced", "expired", "attempt", "dsn-created"):
            out[k] = out.get(k, 0) + 1
    return out


def find(con: sqlite3.Connection, message_id: str = "", sender: str = "", recipient: str = "",
         limit: int = 100) -> list[str]:
    """Queue ids matching a Message-ID, envelope sender or recipient, newest first."""
    if message_id:
        mid = message_id if message_id.startswith("<") else f"<{message_id}>"
        rows = con.execute("SELECT queue_id FROM messages WHERE message_id IN (?, ?) ORDER BY received_at DESC LIMIT ?",
                           (mid, message_id, limit))
    elif sender:
        rows = con.execute("SELECT queue_id FROM messages WHERE mail_from = ? COLLATE NOCASE ORDER BY received_at DESC"
                           " LIMIT ?", (sender, limit))
    elif recipient:
        rows = con.execute("SELECT DISTINCT r.queue_id FROM recipients r JOIN messages m USING(queue_id)"
                           " WHERE r.address = ? COLLATE NOCASE OR r.original = ? COLLATE NOCASE"
                           " ORDER BY m.received_at DESC LIMIT ?", (recipient, recipient, limit))
    else:
        rows = con.execute("SELECT queue_id FROM messages ORDER BY received_at DESC LIMIT ?", (limit,))
    return [r[0] for r in rows]


def message_row(con: sqlite3.Connection, queue_id: str) -> dict | None:
    r = con.execute("SELECT queue_id, received_at, mail_from, message_id, pool, decision, size, pending FROM messages"
                    " WHERE queue_id=?", (queue_id,)).fetchone()
    if r is None:
        return None
    rcpts = con.execute("SELECT address, state, attempts, last_reply, remote_mta FROM recipients WHERE queue_id=?"
                        " ORDER BY idx", (queue_id,)).fetchall()
    return {"queue_id": r[0], "received_at": r[1], "mail_from": r[2], "message_id": r[3], "pool": r[4],
            "decision": json.loads(r[5]), "size": r[6], "pending": r[7],
            "recipients": [{"address": a, "state": s, "attempts": n, "last_reply": lr, "remote_mta": mta}
                           for a, s, n, lr, mta in rcpts]}
