"""The SQLite spool on a real file: durable before accept returns, group commit,
per-recipient state, and everything still there after reopening."""

import asyncio
import sqlite3

from poolmta.model import Decision, DomainState, DsnFact, Envelope, Facts, ForwardFact, Message, Origin, Recipient, \
    Role, SourceDomainFact, SpamFact
from poolmta.spool import RecipientState, RecipientUpdate, new_queue_id
from poolmta.spool.sqlite import SCHEMA, SQLiteSpool

FACTS = Facts(DsnFact(False), SourceDomainFact("contoso.test", DomainState.RESOLVES), SpamFact(False),
              ForwardFact(False))
DECISION = Decision(Role.NORMAL, "normal", ("normal",))


def message(n_rcpts=2, now=1000.0):
    rcpts = tuple(Recipient(f"r{i}@d{i % 2}.test", notify=("FAILURE",) if i == 0 else ()) for i in range(n_rcpts))
    return Message(new_queue_id(), Envelope("a@contoso.test", rcpts, ret="HDRS", envid="E1"),
                   Origin("127.0.0.9", helo="h", tenant="contoso"),
                   b"Message-ID: <m1@contoso.test>\r\nSubject: x\r\n\r\nbody\r\n", now)


async def test_accept_is_visible_to_another_connection_when_it_returns(tmp_path):
    spool = SQLiteSpool(tmp_path)
    try:
        m = message()
        await spool.accept(m, FACTS, DECISION)
        con = sqlite3.connect(tmp_path / "spool.db")
        assert con.execute("SELECT mail_from, message_id FROM messages WHERE queue_id=?", (m.queue_id,)).fetchone() == \
            ("a@contoso.test", "<m1@contoso.test>")
        assert con.execute("SELECT COUNT(*) FROM recipients WHERE queue_id=?", (m.queue_id,)).fetchone()[0] == 2
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        await spool.close()


async def test_concurrent_accepts_share_commits(tmp_path):
    spool = SQLiteSpool(tmp_path)
    try:
        msgs = [message() for _ in range(200)]
        await asyncio.gather(*(spool.accept(m, FACTS, DECISION) for m in msgs))
        st = spool.stats()
        assert st["operations"] == 200
        assert st["commits"] < 200          # group commit: several accepts per fsync
    finally:
        await spool.close()


async def test_state_roundtrip_and_reopen(tmp_path):
    spool = SQLiteSpool(tmp_path)
    m = message(3)
    await spool.accept(m, FACTS, DECISION)
    due = await spool.due(2000.0, 10, set())
    assert sorted((d, idxs) for q, d, idxs in due if q == m.queue_id) == [("d0.test", [0, 2]), ("d1.test", [1])]
    assert await spool.due(2000.0, 10, {(m.queue_id, "d0.test")}) == [(m.queue_id, "d1.test", [1])]
    await spool.update(m.queue_id, [
        RecipientUpdate(0, RecipientState.DELIVERED, 0, "250 2.0.0 ok", "2.0.0", "mx.d0.test"),
        RecipientUpdate(2, RecipientState.BOUNCED, 0, "550 5.1.1 no", "5.1.1", "mx.d0.test"),
        RecipientUpdate(1, RecipientState.DEFERRED, 5000.0, "451 4.2.0 later", "4.2.0", "mx.d1.test"),
    ], 2000.0)
    await spool.close()

    spool = SQLiteSpool(tmp_path)              # a restart
    try:
        got = await spool.get(m.queue_id)
        assert got.message.envelope == m.envelope
        assert got.message.content == m.content
        assert got.decision == DECISION
        states = [(r.address, r.state, r.attempts, r.last_reply) for r in got.recipients]
        assert states == [("r0@d0.test", RecipientState.DELIVERED, 1, "250 2.0.0 ok"),
                          ("r1@d1.test", RecipientState.DEFERRED, 1, "451 4.2.0 later"),
                          ("r2@d0.test", RecipientState.BOUNCED, 1, "550 5.1.1 no")]
        assert got.recipients[0].notify == ("FAILURE",)
        assert await spool.due(2000.0, 10, set()) == []
        assert await spool.next_due_time() == 5000.0
        assert await spool.undelivered_dsns() == [m.queue_id]
        await spool.mark_dsn_sent(m.queue_id, [2])
        assert await spool.undelivered_dsns() == []
        assert [e.queue_id for e in await spool.list()] == [m.queue_id]
        assert await spool.retry(m.queue_id, 2500.0) == 1
        assert await spool.due(2500.0, 10, set()) == [(m.queue_id, "d1.test", [1])]
    finally:
        await spool.close()


async def test_body_dropped_when_nothing_is_pending(tmp_path):
    spool = SQLiteSpool(tmp_path)
    try:
        m = message(1)
        await spool.accept(m, FACTS, DECISION)
        await spool.update(m.queue_id, [RecipientUpdate(0, RecipientState.DELIVERED, 0, "250 ok")], 1.0)
        got = await spool.get(m.queue_id)
        assert got.message.content == b""
        assert got.recipients[0].state == RecipientState.DELIVERED
        assert await spool.list() == []
    finally:
        await spool.close()


async def test_update_changes_only_pending_recipients_and_says_which(tmp_path):
    spool = SQLiteSpool(tmp_path)
    try:
        m = message(3)
        await spool.accept(m, FACTS, DECISION)
        assert await spool.update(m.queue_id, [RecipientUpdate(0, RecipientState.DELIVERED, 0, "250 ok")], 1.0) == [0]
        # An operator deletes recipient 1 (as `poolmta queue delete` does) while an attempt is in flight:
        con = sqlite3.connect(tmp_path / "spool.db", isolation_level=None)
        con.execute("UPDATE recipients SET state='deleted' WHERE queue_id=? AND idx=1", (m.queue_id,))
        con.close()
        changed = await spool.update(m.queue_id, [
            RecipientUpdate(0, RecipientState.BOUNCED, 0, "550 5.1.1 late", "5.1.1"),     # already final
            RecipientUpdate(1, RecipientState.BOUNCED, 0, "550 5.1.1 late", "5.1.1"),     # deleted meanwhile
            RecipientUpdate(2, RecipientState.BOUNCED, 0, "550 5.1.1 no", "5.1.1"),
        ], 2.0)
        assert changed == [2]
        got = await spool.get(m.queue_id)
        assert [(r.state, r.last_reply) for r in got.recipients] == [
            (RecipientState.DELIVERED, "250 ok"), (RecipientState.DELETED, ""),
            (RecipientState.BOUNCED, "550 5.1.1 no")]
    finally:
        await spool.close()


async def test_delete_drops_the_pending_recipients_and_keeps_the_record(tmp_path):
    spool = SQLiteSpool(tmp_path)
    try:
        m = message(3)
        await spool.accept(m, FACTS, DECISION)
        await spool.update(m.queue_id, [
            RecipientUpdate(0, RecipientState.BOUNCED, 0, "550 5.1.1 no", "5.1.1", "mx.d0.test"),   # DSN owed
            RecipientUpdate(1, RecipientState.DEFERRED, 5000.0, "451 4.2.0 later", "4.2.0", "mx.d1.test"),
        ], 2000.0)
        [entry] = await spool.list()
        assert entry.pending == 2
        assert entry.recipients == (("r0@d0.test", "bounced", "550 5.1.1 no", 1, 0.0),
                                    ("r1@d1.test", "deferred", "451 4.2.0 later", 1, 5000.0),
                                    ("r2@d0.test", "queued", "", 0, 1000.0))

        assert await spool.delete(m.queue_id) == 2          # the two pending recipients
        got = await spool.get(m.queue_id)
        assert [r.state for r in got.recipients] == [RecipientState.BOUNCED, RecipientState.DELETED,
                                                     RecipientState.DELETED]
        assert got.recipients[1].last_reply == "451 4.2.0 later"       # the history stays
        assert got.message.content == m.content             # the DSN for r0 still needs the body
        assert await spool.list() == [] and await spool.due(9999.0, 10, set()) == []
        assert await spool.next_due_time() is None
        assert await spool.retry(m.queue_id, 9999.0) == 0
        assert await spool.undelivered_dsns() == [m.queue_id]

        await spool.mark_dsn_sent(m.queue_id, [0])
        assert (await spool.get(m.queue_id)).message.content == b""
        assert await spool.delete(m.queue_id) == 0          # nothing pending any more
        assert await spool.delete("NOSUCHID") == 0
    finally:
        await spool.close()


async def test_delete_drops_the_body_when_no_dsn_is_owed(tmp_path):
    spool = SQLiteSpool(tmp_path)
    try:
        m = message(2)
        await spool.accept(m, FACTS, DECISION)
        assert await spool.delete(m.queue_id) == 2
        got = await spool.get(m.queue_id)
        assert got.message.content == b"" and {r.state for r in got.recipients} == {RecipientState.DELETED}
        con = sqlite3.connect(tmp_path / "spool.db")
        assert con.execute("SELECT pending FROM messages WHERE queue_id=?", (m.queue_id,)).fetchone() == (0,)
        con.close()
    finally:
        await spool.close()


def big_message(n_rcpts: int, domain: str, now: float) -> Message:
    rcpts = tuple(Recipient(f"r{i}@{domain}") for i in range(n_rcpts))
    return Message(new_queue_id(), Envelope("a@contoso.test", rcpts), Origin("127.0.0.9", helo="h", tenant="contoso"),
                   b"Subject: x\r\n\r\nbody\r\n", now)


async def test_due_is_not_starved_by_large_groups_in_flight_and_never_splits_a_group(tmp_path):
    spool = SQLiteSpool(tmp_path)
    try:
        in_flight = [big_message(60, "big.test", 1000.0 + i) for i in range(3)]     # due first
        waiting = big_message(1, "small.test", 1100.0)
        large = big_message(45, "large.test", 1200.0)
        for m in [*in_flight, waiting, large]:
            await spool.accept(m, FACTS, DECISION)
        busy = {(m.queue_id, "big.test") for m in in_flight}

        assert await spool.due(2000.0, 1, busy) == [(waiting.queue_id, "small.test", [0])]
        got = await spool.due(2000.0, 2, busy)
        assert got == [(waiting.queue_id, "small.test", [0]), (large.queue_id, "large.test", list(range(45)))]
        # Without busy groups: the oldest groups first, each whole.
        got = await spool.due(2000.0, 2, set())
        assert [(q, d, len(i)) for q, d, i in got] == [(in_flight[0].queue_id, "big.test", 60),
                                                      (in_flight[1].queue_id, "big.test", 60)]
        assert got[0][2] == list(range(60))
    finally:
        await spool.close()


async def test_workers_sharing_the_file_each_deliver_only_their_own_shard(tmp_path):
    """server.workers > 1: both write the same file; each sees only the mail it accepted as due."""
    w0, w1 = SQLiteSpool(tmp_path, shard=0, shards=2), SQLiteSpool(tmp_path, shard=1, shards=2)
    try:
        m0, m1 = message(now=1000.0), message(now=1001.0)
        await asyncio.gather(w0.accept(m0, FACTS, DECISION), w1.accept(m1, FACTS, DECISION))
        assert {q for q, _, _ in await w0.due(2000.0, 10, set())} == {m0.queue_id}
        assert {q for q, _, _ in await w1.due(2000.0, 10, set())} == {m1.queue_id}
        assert await w0.next_due_time() == 1000.0 and await w1.next_due_time() == 1001.0
        # Either worker can read, update and list every message (operators' commands, DSNs).
        assert (await w1.get(m0.queue_id)).message.queue_id == m0.queue_id
        assert len(await w0.list()) == 2
    finally:
        await w0.close()
        await w1.close()
    # Restarted with one worker: nothing is orphaned, it takes both shards.
    one = SQLiteSpool(tmp_path)
    try:
        assert {q for q, _, _ in await one.due(2000.0, 10, set())} == {m0.queue_id, m1.queue_id}
    finally:
        await one.close()


async def test_a_spool_from_before_shards_is_migrated_and_keeps_its_mail(tmp_path):
    con = sqlite3.connect(tmp_path / "spool.db")
    old_schema = SCHEMA.replace("    shard        INTEGER NOT NULL DEFAULT 0,\n", "")
    assert old_schema != SCHEMA
    con.executescript(old_schema)
    con.execute("INSERT INTO recipients(queue_id, idx, address, domain, state, next_attempt, updated)"
                " VALUES ('Q1', 0, 'r@d.test', 'd.test', 'queued', 5.0, 5.0)")
    con.commit()
    con.close()
    spool = SQLiteSpool(tmp_path, shard=0, shards=2)
    try:
        assert await spool.due(10.0, 10, set()) == [("Q1", "d.test", [0])]
    finally:
        await spool.close()


def test_queue_ids_of_different_workers_never_collide():
    from poolmta.spool import store
    try:
        store.set_worker(3)
        a = {new_queue_id() for _ in range(2000)}
        store.set_worker(4)
        b = {new_queue_id() for _ in range(2000)}
    finally:
        store._worker = None
    assert len(a) == 2000 and len(b) == 2000 and not a & b
    assert {q[13] for q in a} == {"3"} and {q[13] for q in b} == {"4"}


async def test_a_deep_queue_is_not_scanned_by_the_delivery_loop(tmp_path):
    """200 k deferred recipients, all due: the loop's queries step over what they need,
    counted in SQLite virtual-machine steps (deterministic, unlike a stopwatch)."""
    await SQLiteSpool(tmp_path, shard=1, shards=2).close()
    con = sqlite3.connect(tmp_path / "spool.db")
    con.executemany("INSERT INTO recipients(queue_id, idx, address, domain, state, attempts, next_attempt, updated,"
                    " shard) VALUES (?,0,?,'x.test','deferred',1,?,0,?)",
                    [(f"Q{i:08d}", f"r{i}@x.test", 1e9 + i, i % 2) for i in range(200_000)])
    con.commit()
    con.close()
    for shard in (0, 1):
        spool = SQLiteSpool(tmp_path, shard=shard, shards=2)
        steps = []
        spool._reader.set_progress_handler(lambda: steps.append(1), 1000)
        try:
            assert await spool.next_due_time() == 1e9 + shard
            due = await spool.due(2e9, 100, set())
            assert await spool.undelivered_dsns() == []
            assert len(due) == 100 and all(int(q[1:]) % 2 == shard for q, _, _ in due)
            # A scan of the 200 k rows is millions of steps; these take a few thousand.
            assert len(steps) < 100, len(steps)
        finally:
            await spool.close()


async def test_purge_forgets_old_finished_messages_and_their_trace_only(tmp_path):
    """server.history_retention: finished messages received before the cut go with their
    recipients, body and trace; a message still pending, one still owed a DSN, and one
    received after the cut stay, whatever their age. Trace events of no message go
    once old; recent ones stay. Batches of LIMIT."""
    spool = SQLiteSpool(tmp_path)
    try:
        done = [message(1, now=1000.0 + i) for i in range(5)]
        pending, owed, recent = message(1, now=1000.0), message(1, now=1000.0), message(1, now=9000.0)
        for m in (*done, pending, owed, recent):
            await spool.accept(m, FACTS, DECISION)
        for m in (*done, recent):
            await spool.update(m.queue_id, [RecipientUpdate(0, RecipientState.DELIVERED, 0, "250 ok", "2.0.0", "mx")],
                               2000.0)
        await spool.update(owed.queue_id, [RecipientUpdate(0, RecipientState.BOUNCED, 0, "550 no", "5.1.1", "mx")],
                           2000.0)
        con = sqlite3.connect(tmp_path / "spool.db", isolation_level=None)
        rows = [(m.queue_id, m.received_at, "received", "{}") for m in (*done, pending, owed, recent)]
        rows += [("refused-at-data-1", 1500.0, "received", "{}"), ("sender:eve@contoso.test", 9500.0, "released", "{}")]
        con.executemany("INSERT INTO events(queue_id, ts, kind, data) VALUES(?,?,?,?)", rows)

        def ids(table):
            return {r[0] for r in con.execute(f"SELECT queue_id FROM {table}")}
        assert await spool.purge(5000.0, limit=3) == 3                   # the 3 oldest finished
        assert await spool.purge(5000.0, limit=3) == 2
        assert await spool.purge(5000.0, limit=3) == 0
        kept = {pending.queue_id, owed.queue_id, recent.queue_id}
        assert ids("messages") == kept and ids("recipients") == kept
        assert ids("bodies") == {pending.queue_id, owed.queue_id}        # recent's body went when it finished
        assert ids("events") == kept | {"sender:eve@contoso.test"}        # the old orphan went, the recent stayed
        await spool.mark_dsn_sent(owed.queue_id, [0])                      # its DSN made: now it may go
        assert await spool.purge(5000.0) == 1 and owed.queue_id not in ids("messages")
        assert (await spool.get(pending.queue_id)).message.content == pending.content      # untouched
        con.close()
    finally:
        await spool.close()
