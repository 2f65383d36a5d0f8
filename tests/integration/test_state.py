"""Sender state on a real SQLite file and the real Redis on 127.0.0.1:6379, the same
cases over both: window edges (hour, rolling 24 h, UTC day) with explicit clocks,
restrictions and releases at their edges, two nodes sharing one state, and two OS
processes adding at once (exactly one sees the limit crossed, the total is exact).

Redis must be running (CI starts it): when it is not, these tests fail, they do not
skip. Each test uses its own key prefix and deletes its keys afterwards."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import os
import random
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis

from poolmta import config
from poolmta.state import Release, Restriction, utc_day_start
from poolmta.state.open import open_state
from poolmta.state.redis import RedisState
from poolmta.state.sqlite import SQLiteState, prepare

REDIS_URL = "redis://127.0.0.1:6379/0"
ROOT = Path(__file__).resolve().parents[2]

T0 = 1_800_000_000.0                  # 2027-01-15 08:00:00 UTC
D = utc_day_start(T0)                 # that day, 00:00:00 UTC
HOUR, DAY = 3600.0, 86400.0


def before(x: float) -> float:
    """The float just below x (x - ε, as close as a timestamp can get)."""
    return math.nextafter(x, -math.inf)


def _redis_or_fail() -> None:
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except redis.RedisError as e:
        pytest.fail(f"Redis is not reachable at {REDIS_URL} ({e}): the state tests need a real Redis "
                    "(CI starts one; locally: redis-server --port 6379)", pytrace=False)


def _delete_prefix(prefix: str) -> int:
    r = redis.Redis.from_url(REDIS_URL)
    keys = list(r.scan_iter(match=prefix + "*", count=1000))
    if keys:
        r.delete(*keys)
    r.close()
    return len(keys)


@pytest.fixture
def redis_prefix():
    _redis_or_fail()
    prefix = f"poolmta-test:{uuid.uuid4().hex}:"
    yield prefix
    _delete_prefix(prefix)


@pytest.fixture(params=["sqlite", "redis"])
async def nodes(request, tmp_path):
    """A factory of SenderState instances that share one state (one "node" each)."""
    opened = []
    if request.param == "redis":
        _redis_or_fail()
        prefix = f"poolmta-test:{uuid.uuid4().hex}:"

        def make():
            s = RedisState(REDIS_URL, prefix)
            opened.append(s)
            return s
    else:
        prefix = ""

        def make():
            s = SQLiteState(tmp_path / "state.db")
            opened.append(s)
            return s
    make.backend = request.param
    make.prefix = prefix
    yield make
    for s in opened:
        await s.close()
    if prefix:
        _delete_prefix(prefix)


@pytest.fixture
def state(nodes):
    return nodes()


# ---- counters ------------------------------------------------------------

async def test_add_returns_totals_before_and_after_with_amounts(state):
    assert await state.add("k", 3, T0, T0 - HOUR) == (0, 3)
    assert await state.add("k", 5, T0 + 1, T0 + 1 - HOUR) == (3, 8)
    assert await state.add("k", 1, T0 + 2, T0 + 2 - HOUR) == (8, 9)
    assert await state.count("k", T0 + 2, T0 + 2 - HOUR) == 9
    assert await state.count("other", T0 + 2, T0 + 2 - HOUR) == 0
    assert await state.add("other", 2, T0 + 2, T0 + 2 - HOUR) == (0, 2)
    assert await state.add("k", 0, T0 + 3, T0 + 3 - HOUR) == (9, 9)        # 0: just count
    with pytest.raises(ValueError):
        await state.add("k", -1, T0 + 3, T0 + 3 - HOUR)


async def test_events_at_the_same_instant_all_count(state):
    for i in range(5):
        assert await state.add("same", 2, T0, T0 - HOUR) == (2 * i, 2 * i + 2)
    assert await state.count("same", T0, T0 - HOUR) == 10


@pytest.mark.parametrize("window", [HOUR, DAY], ids=["hour", "rolling-24h"])
async def test_sliding_window_edges(state, window):
    assert await state.add("w", 2, T0, T0 - window) == (0, 2)
    assert await state.add("w", 3, T0 + 10, T0 + 10 - window) == (2, 5)
    # An event stamped after NOW counts too: concurrent callers stamp their adds a
    # moment apart and reach the store out of order; the later one has happened.
    assert await state.count("w", T0, T0 - window) == 5
    # Last instant the first event is inside: now - window < T0.
    now = before(T0 + window)
    assert now - window < T0
    assert await state.count("w", now, now - window) == 5
    # At T0 + window the window starts exactly at T0: the event at `since` is out.
    assert await state.count("w", T0 + window, T0) == 3
    assert await state.count("w", before(T0 + 10 + window), before(T0 + 10 + window) - window) == 3
    assert await state.count("w", T0 + 10 + window, T0 + 10) == 0


@pytest.mark.parametrize("window", [HOUR, DAY], ids=["hour", "rolling-24h"])
async def test_add_sees_the_window_edges_too(state, window):
    await state.add("a", 4, T0, T0 - window)
    now = before(T0 + window)
    assert await state.add("a", 1, now, now - window) == (4, 5)            # T0 still inside
    assert await state.add("a", 1, T0 + window, T0) == (1, 2)               # T0 at `since`: out


async def test_utc_day_window_edges(state):
    # In time order, each add sees its own UTC day (start of day, ...]: yesterday
    # 23:59:59, midnight exactly (at `since`: out), just after, 23:59:59 today,
    # the next midnight, just after it.
    steps = [(D - 1, 1, (0, 1)), (D, 2, (0, 0)), (D + 0.5, 4, (0, 4)), (D + DAY - 1, 8, (4, 12)),
             (D + DAY, 16, (0, 0)), (D + DAY + 0.5, 32, (0, 32))]
    for ts, amount, expect in steps:
        assert await state.add("day", amount, ts, utc_day_start(ts)) == expect, ts
    # The whole of today as seen at its last instant: everything after midnight exactly.
    assert await state.count("day", D + DAY - 1, D) == 4 + 8 + 16 + 32
    assert await state.count("day", D + DAY + 1, D + DAY) == 32                  # 16 at since: out


async def test_add_at_exactly_since_adds_nothing_to_the_window(state):
    # A window (since, now] with since == now is empty: even the new event is at `since`.
    assert await state.add("mid", 3, D, utc_day_start(D)) == (0, 0)
    assert await state.count("mid", D + 1, D - 1) == 3                      # but it is recorded


async def test_old_events_are_pruned_after_the_retention(state):
    await state.add("p", 1, T0, T0 - HOUR)
    await state.add("p", 1, T0 + 24 * HOUR, T0)                              # 24 h later: T0 kept
    assert await state.count("p", T0 + 24 * HOUR, T0 - 1) == 2
    await state.add("p", 1, T0 + 26 * HOUR, T0 + 25 * HOUR)                  # > 25 h: T0 pruned
    assert await state.count("p", T0 + 26 * HOUR, 0.0) == 2
    # A window longer than the retention is never cut short by the add itself.
    await state.add("q", 1, T0, T0 - HOUR)
    assert await state.add("q", 1, T0 + 30 * HOUR, T0 - 1) == (1, 2)


def _edges(rng, base):
    """A timestamp on or next to a minute/hour edge, or anywhere, around BASE."""
    x = base + rng.choice([rng.randrange(-30, 30) * 3600.0, rng.randrange(-600, 600) * 60.0,
                           rng.uniform(-30 * 3600, 30 * 3600)])
    return rng.choice([x, x, before(x), math.nextafter(x, math.inf), x + 0.5])


async def test_windows_agree_with_a_plain_model_at_random_edges(state):
    # Events and windows on and around minute and hour edges (where the Redis
    # buckets split a window), checked against a brute-force sum.
    rng = random.Random(4)
    events: list[tuple[float, int]] = []
    for i in range(300):
        now = _edges(rng, T0)
        since = rng.choice([now - HOUR, now - DAY, utc_day_start(now), _edges(rng, T0), now - rng.uniform(0, DAY)])
        amount = rng.randrange(0, 5)
        if rng.random() < 0.6:
            before_, after = await state.add("m", amount, now, since)
            expect = sum(a for t, a in events if since < t)
            assert (before_, after) == (expect, expect + (amount if since < now else 0)), (i, now, since)
            events.append((now, amount))
            horizon = min(since, now - 25 * HOUR)                 # the add prunes what is older
            events = [(t, a) for t, a in events if t >= horizon]
        else:
            expect = sum(a for t, a in events if since < t)
            assert await state.count("m", now, since) == expect, (i, now, since)


# ---- restrictions and releases ------------------------------------------

def _r(sender="alice@contoso.test", since=D + 10, until=None, kind="user", reason="limit:recipient_limit_per_day"):
    return Restriction(kind, sender, since, until, reason, "contoso")


async def test_restriction_until_ends_exactly_at_until(state):
    r = _r(until=D + DAY)
    assert await state.restrict(r) is True
    assert await state.restrict(dataclasses.replace(r, since=D + 20)) is False          # already restricted
    assert await state.restrict(dataclasses.replace(r, since=before(D + DAY))) is False
    assert await state.restriction("user", r.sender, before(D + DAY)) == r
    assert await state.restrictions(before(D + DAY)) == [r]
    assert await state.restriction("user", r.sender, D + DAY) is None
    assert await state.restrictions(D + DAY) == []
    # Ended: the sender can be restricted again, with the new terms.
    again = _r(since=D + DAY, until=None, reason="spam-volume")
    assert await state.restrict(again) is True
    assert await state.restriction("user", r.sender, D + 10 * DAY) == again


async def test_restriction_without_until_lasts_until_released(state):
    r = _r()
    assert await state.restrict(r) is True
    assert await state.restriction("user", r.sender, D + 365 * DAY) == r
    assert await state.last_release("user", r.sender) is None
    at = D + 3 * HOUR
    assert await state.release("user", r.sender, at, "admin@contoso.test") is True
    assert await state.last_release("user", r.sender) == Release("user", r.sender, at, "admin@contoso.test")
    assert await state.restriction("user", r.sender, at) is None
    assert await state.restrictions(at) == []
    assert await state.release("user", r.sender, at + 1, "admin@contoso.test") is False  # nothing to lift
    assert await state.last_release("user", r.sender) == Release("user", r.sender, at, "admin@contoso.test")
    assert await state.release("user", "nobody@contoso.test", at, "admin") is False


async def test_release_after_until_lifts_nothing(state):
    r = _r(until=D + HOUR)
    assert await state.restrict(r)
    assert await state.release("user", r.sender, D + HOUR, "admin") is False
    assert await state.last_release("user", r.sender) is None
    assert await state.released_on_day("user", r.sender, D + HOUR) is False


async def test_restriction_must_end_after_it_starts(state):
    with pytest.raises(ValueError):
        await state.restrict(_r(since=D + 10, until=D + 10))


@pytest.mark.parametrize("at", [D + DAY - 1, D], ids=["23:59:59", "00:00:00"])
async def test_released_on_day_ends_at_utc_midnight(state, at):
    r = _r(since=D - HOUR)
    await state.restrict(r)
    assert await state.release("user", r.sender, at, "admin") is True
    assert await state.released_on_day("user", r.sender, at) is True
    assert await state.released_on_day("user", r.sender, D) is True
    assert await state.released_on_day("user", r.sender, D + DAY - 1) is True       # 23:59:59
    assert await state.released_on_day("user", r.sender, before(D + DAY)) is True
    assert await state.released_on_day("user", r.sender, D + DAY) is False          # 00:00:00 next day
    assert await state.released_on_day("user", r.sender, before(D)) is False        # the day before
    assert await state.released_on_day("user", "other@contoso.test", at) is False


async def test_user_senders_compare_case_insensitively(state):
    assert await state.restrict(_r(sender="Alice@Contoso.TEST"))
    got = await state.restriction("user", "alice@contoso.test", D + 20)
    assert got is not None and got.sender == "alice@contoso.test"
    assert await state.restrict(_r(sender="ALICE@contoso.test", since=D + 30)) is False
    assert [x.sender for x in await state.restrictions(D + 40)] == ["alice@contoso.test"]
    assert await state.release("user", "aLiCe@CONTOSO.test", D + 50, "admin") is True
    assert await state.released_on_day("user", "ALICE@CONTOSO.TEST", D + 60) is True
    assert (await state.last_release("user", "Alice@contoso.test")).sender == "alice@contoso.test"


async def test_kinds_are_separate_and_connector_names_kept_as_given(state):
    c = _r(kind="connector", sender="OnPrem-1", reason="spam-volume")
    assert await state.restrict(c)
    assert await state.restriction("user", "OnPrem-1", D + 20) is None
    assert await state.restriction("connector", "OnPrem-1", D + 20) == c
    assert await state.restriction("connector", "onprem-1", D + 20) is None
    u = _r(sender="onprem-1")
    assert await state.restrict(u)
    assert await state.restrictions(D + 20) == sorted([c, u], key=lambda x: (x.since, x.kind, x.sender))
    assert await state.release("connector", "OnPrem-1", D + 30, "ops") is True
    assert await state.restrictions(D + 40) == [u]
    assert await state.released_on_day("user", "onprem-1", D + 40) is False


async def test_two_nodes_share_counters_restrictions_and_releases(nodes):
    a, b = nodes(), nodes()
    assert await a.add("rcpt:bob", 4, T0, T0 - HOUR) == (0, 4)
    assert await b.add("rcpt:bob", 2, T0 + 1, T0 + 1 - HOUR) == (4, 6)
    assert await a.count("rcpt:bob", T0 + 2, T0 + 2 - HOUR) == 6
    r = _r(sender="bob@contoso.test")
    assert await a.restrict(r) is True
    assert await b.restrict(r) is False
    assert await b.restriction("user", "bob@contoso.test", D + 20) == r
    assert await b.release("user", "bob@contoso.test", D + 30, "admin") is True
    assert await a.restriction("user", "bob@contoso.test", D + 31) is None
    assert await a.released_on_day("user", "bob@contoso.test", D + 31) is True


# ---- two processes, one limit --------------------------------------------

def _child() -> None:
    """Worker process: N concurrent adds of 1 at the instant the parent names.

    Prints {"start", "end", "results": [(before, after), ...]}."""
    backend, target, key, n, now = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5])

    async def main():
        s = RedisState(REDIS_URL, target) if backend == "redis" else SQLiteState(target)
        try:
            # Warm up before the race: open the connections (Redis) the adds will use.
            await asyncio.gather(*(s.count(key, now, now - HOUR) for _ in range(n)))
            print("ready", flush=True)
            go = float(await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline))
            await asyncio.sleep(max(0.0, go - time.time() - 0.005))
            while time.time() < go:                       # both processes start within microseconds
                pass
            start = time.time()
            results = await asyncio.gather(*(s.add(key, 1, now, now - HOUR) for _ in range(n)))
            return {"start": start, "end": time.time(), "results": results}
        finally:
            await s.close()

    print(json.dumps(asyncio.run(main())), flush=True)


def _race(backend: str, target: str, key: str, per_process: int) -> tuple[list[tuple[int, int]], list[dict]]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT)]))
    code = "from tests.integration.test_state import _child; _child()"
    procs = [subprocess.Popen([sys.executable, "-c", code, backend, target, key, str(per_process), repr(T0)],
                              cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready"
        go = time.time() + 0.2
        for p in procs:
            p.stdin.write(f"{go!r}\n")
            p.stdin.flush()
        runs = []
        for p in procs:
            out, _ = p.communicate(timeout=120)
            assert p.returncode == 0, out
            runs.append(json.loads(out.strip().splitlines()[-1]))
        return [tuple(x) for run in runs for x in run["results"]], runs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_two_processes_cross_a_limit_exactly_once(backend, tmp_path, request):
    limit, n = 137, 200
    if backend == "redis":
        prefix = request.getfixturevalue("redis_prefix")
        target = prefix
    else:
        target = str(tmp_path / "state.db")
        SQLiteState(target)                               # schema before the race
    results, runs = _race(backend, target, "rcpt:mallory", n // 2)
    assert max(r["start"] for r in runs) < min(r["end"] for r in runs)    # the two really overlapped
    assert len(results) == n
    assert sorted(b for b, _ in results) == list(range(n))          # every add saw a distinct total
    assert all(a == b + 1 for b, a in results)
    crossings = [(b, a) for b, a in results if b <= limit < a]
    assert crossings == [(limit, limit + 1)]

    async def final():
        s = RedisState(REDIS_URL, target) if backend == "redis" else SQLiteState(target)
        try:
            return await s.count("rcpt:mallory", T0, T0 - HOUR)
        finally:
            await s.close()

    assert asyncio.run(final()) == n


# ---- backend specifics ---------------------------------------------------

async def test_sqlite_file_is_wal_and_a_held_lock_does_not_block_the_loop(tmp_path):
    s = SQLiteState(tmp_path / "state.db")
    other = sqlite3.connect(tmp_path / "state.db", isolation_level=None)
    try:
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        other.execute("BEGIN IMMEDIATE")                  # another process holds the write lock
        task = asyncio.create_task(s.add("k", 1, T0, T0 - HOUR))
        ticks = 0
        for _ in range(10):
            await asyncio.sleep(0.01)
            ticks += 1
        assert ticks == 10 and not task.done()            # the loop ran; the add waits for the lock
        other.execute("COMMIT")
        assert await asyncio.wait_for(task, 10) == (0, 1)
    finally:
        other.close()
        await s.close()


async def test_sqlite_restriction_is_read_while_a_counter_write_waits(tmp_path):
    """restriction() (every MAIL and RCPT) reads on the loop's own connection: it sees
    another process's restriction at once, and does not queue behind an add that waits
    for the write lock on the state thread."""
    s = SQLiteState(tmp_path / "state.db")
    other = SQLiteState(tmp_path / "state.db")        # another worker process, the CLI
    lock = sqlite3.connect(tmp_path / "state.db", isolation_level=None)
    try:
        await other.restrict(_r(sender="Mallory@contoso.test"))
        lock.execute("BEGIN IMMEDIATE")
        add = asyncio.create_task(s.add("k", 1, T0, T0 - HOUR))
        await asyncio.sleep(0.05)
        got = await s.restriction("user", "mallory@contoso.test", D + 20)
        assert got is not None and got.reason == "limit:recipient_limit_per_day"
        assert await s.restriction("user", "alice@contoso.test", D + 20) is None
        assert not add.done()                          # still waiting for the lock
        lock.execute("COMMIT")
        assert await asyncio.wait_for(add, 10) == (0, 1)
    finally:
        lock.close()
        await other.close()
        await s.close()


async def test_sqlite_prunes_each_key_once_a_minute(tmp_path):
    """Pruning is garbage collection, done at most once per minute per key: adds every
    10 s for 3 h (retention 1 h) keep no event older than the retention plus a minute, and the window
    sums stay exact."""
    s = SQLiteState(tmp_path / "state.db", retention=HOUR)
    try:
        n = 0
        for i in range(3 * 360):                      # 3 h, every 10 s
            now = T0 + i * 10.0
            before_, after = await s.add("g", 1, now, now - 600)
            assert (before_, after) == (min(n, 59), min(n, 59) + 1)      # (now - 600, now]: 59 earlier
            n += 1
        con = sqlite3.connect(tmp_path / "state.db")
        oldest = con.execute("SELECT MIN(ts), COUNT(*) FROM events WHERE key='g'").fetchone()
        con.close()
        assert oldest[0] >= now - HOUR - 60 and oldest[1] <= 360 + 7, oldest
    finally:
        await s.close()


async def test_sqlite_buckets_always_match_the_kept_events(tmp_path):
    """Minute and hour buckets equal the sum of the kept events in their span, through
    adds at random times and the pruning they do (so windows read buckets, not rows)."""
    s = SQLiteState(tmp_path / "state.db")
    rng = random.Random(7)
    try:
        for _ in range(400):
            now = T0 + rng.uniform(-30 * HOUR, 30 * HOUR)
            await s.add("b", rng.randrange(1, 4), now, rng.choice([now - HOUR, now - DAY, utc_day_start(now)]))
        con = sqlite3.connect(tmp_path / "state.db")
        rows = con.execute("SELECT size, start, amount FROM buckets WHERE key='b'").fetchall()
        for size, start, amount in rows:
            kept = con.execute("SELECT COALESCE(SUM(amount), 0) FROM events WHERE key='b' AND ts>=? AND ts<?",
                               (start, start + size)).fetchone()[0]
            assert amount == kept, (size, start)
        assert con.execute("SELECT SUM(amount) FROM buckets WHERE key='b' AND size=60").fetchone()[0] == \
            con.execute("SELECT SUM(amount) FROM events WHERE key='b'").fetchone()[0]
        con.close()
    finally:
        await s.close()


async def test_sqlite_window_cost_does_not_grow_with_the_events_in_it(tmp_path):
    """20 000 events in the last day: an add reads buckets, not the rows (SQLite VM steps)."""
    s = SQLiteState(tmp_path / "state.db")
    try:
        con = sqlite3.connect(tmp_path / "state.db")
        con.executemany("INSERT INTO events(key, ts, amount) VALUES('big', ?, 1)",
                        [(T0 - DAY + 1 + i * 4.0,) for i in range(20_000)])
        con.commit()
        con.close()
        await s.close()
        s = SQLiteState(tmp_path / "state.db")          # a file from before the buckets: filled on open
        steps = []
        s._con.set_progress_handler(lambda: steps.append(1), 1000)
        assert await s.add("big", 1, T0, T0 - DAY) == (20_000, 20_001)
        assert len(steps) < 30, len(steps)             # summing 20 000 rows is hundreds of thousand steps
    finally:
        await s.close()


async def test_sqlite_window_cost_does_not_grow_with_the_sending_rate(tmp_path):
    """A sender at 500 messages a second: a per-minute window holds 30 000 events, and
    an add still sums buckets (seconds, minutes, hours) and at most a second of rows."""
    s = SQLiteState(tmp_path / "state.db")
    try:
        for i in range(60):                              # 60 one-second batches of 500
            base = T0 - 60 + i
            await s.add_many([("dense", 1, base - 60)] * 500, base)
        steps = []
        s._con.set_progress_handler(lambda: steps.append(1), 1000)
        assert await s.add("dense", 1, T0 + 0.5, T0 + 0.5 - 60) == (29_500, 29_501)
        assert len(steps) < 30, len(steps)               # summing the rows is hundreds of thousands
        s._con.set_progress_handler(None, 0)
        assert await s.count("dense", T0 + 0.5, T0 - 120) == 30_001       # nothing lost at the edges
        assert await s.count("dense", T0 + 0.5, T0 - 30.5) == 30 * 500 + 1
    finally:
        await s.close()


async def test_sqlite_second_buckets_are_filled_in_an_older_file(tmp_path):
    """A state file with minute and hour buckets only (before the second buckets): opened,
    its events get second buckets too, and windows sum as before."""
    s = SQLiteState(tmp_path / "state.db")
    for i in range(100):
        await s.add("old", 1, T0 - 50 + i * 0.25, T0 - DAY)
    await s.close()
    con = sqlite3.connect(tmp_path / "state.db")
    con.execute("DELETE FROM buckets WHERE size=1.0")
    con.commit()
    con.close()
    s = SQLiteState(tmp_path / "state.db")
    try:
        assert await s.count("old", T0, T0 - 40.1) == 100 - 40       # ts > T0 - 40.1: i >= 40
        con = sqlite3.connect(tmp_path / "state.db")
        assert con.execute("SELECT SUM(amount), COUNT(*) FROM buckets WHERE key='old' AND size=1.0").fetchone() \
            == (100, 25)
        con.close()
    finally:
        await s.close()


async def test_sqlite_adds_never_checkpoint_the_wal_themselves(tmp_path):
    """The adds' connection leaves checkpoints to a thread of their own (an automatic
    one, inside the commit that crosses 1000 WAL pages, made that add 10 ms), which
    copies the WAL while adds go on; then the adds' thread copies the last frames, so
    that the next add rewinds the WAL: it does not grow for ever under steady adds.
    What the adds wrote is in the database file afterwards."""
    s = SQLiteState(tmp_path / "state.db", checkpoint_every=0.05)
    try:
        assert s._con.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 4000     # a safety net only
        for i in range(300):                        # adds all along, the checkpoints among them
            await s.add_many([(f"k{j}", 1, T0 - 60) for j in range(5)], T0 + i * 0.01)
            if i % 10 == 0:
                await asyncio.sleep(0.01)
        for _ in range(200):
            if s.checkpoints >= 2:
                break
            await s.add_many([("k0", 0, T0 - 60)], T0 + 3)
            await asyncio.sleep(0.02)
        assert s.checkpoints >= 2
        # Adds back to back for a second, the checkpoints among them: the WAL is rewound
        # again and again, so it holds far fewer frames than the adds wrote (each add
        # writes several pages; without rewinds the WAL holds them all).
        adds, start = 0, asyncio.get_running_loop().time()
        while asyncio.get_running_loop().time() - start < 1.0:
            await s.add_many([(f"k{j}", 1, T0 - 60) for j in range(5)], T0 + 4)
            adds += 1
        other = sqlite3.connect(tmp_path / "state.db", timeout=0)
        frames = other.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1]
        other.close()
        assert adds > 100 and frames < adds, (frames, adds)
    finally:
        await s.close()
    assert not s._checkpointer.is_alive()
    s = SQLiteState(tmp_path / "state.db")
    try:
        assert await s.count("k4", T0 + 5, T0 - 60) == 300 + adds
    finally:
        await s.close()


_ADDING_PROCESS = """
import asyncio, os, sys, time
from poolmta.state.sqlite import SQLiteState

async def main(path, n, pages):
    s = SQLiteState(path, checkpoint_every=0.05, autocheckpoint_pages=pages)
    end = time.monotonic() + 2.5
    i = biggest = 0
    while time.monotonic() < end:
        await s.add_many([(f"p{n}k{j}", 1, 1.78e9 - 60) for j in range(5)], 1.78e9 + i * 0.001)
        i += 1
        await asyncio.sleep(0.002)
        if i % 20 == 0:
            biggest = max(biggest, os.path.getsize(path + "-wal"))
    await s.close()                  # the last one to close removes the WAL: measured before
    print(i, biggest)

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
"""


def test_sqlite_wal_stays_bounded_with_two_processes_adding(tmp_path):
    """Workers share state.db: while one finishes a checkpoint the other's adds go on,
    and the WAL was never rewound (it grew 12 MB a second). SQLite's own checkpoint at
    N pages (500 here) is the safety net: the WAL stays near N pages."""
    path = tmp_path / "state.db"
    prepare(path)
    procs = [subprocess.Popen([sys.executable, "-c", _ADDING_PROCESS, str(path), str(n), "500"],
                              stdout=subprocess.PIPE, text=True) for n in range(2)]
    out = [p.communicate(timeout=60)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    adds, wal = [int(a) for a, _ in out], max(int(w) for _, w in out)
    assert min(adds) > 200
    assert wal < 4 * 500 * 4096, (wal, adds)          # without the net: ~25 MB and growing


async def test_sqlite_state_survives_reopening(tmp_path):
    s = SQLiteState(tmp_path / "state.db")
    await s.add("k", 7, T0, T0 - HOUR)
    await s.restrict(_r())
    await s.close()
    s = SQLiteState(tmp_path / "state.db")
    try:
        assert await s.count("k", T0, T0 - HOUR) == 7
        assert await s.restriction("user", "alice@contoso.test", D + 20) == _r()
    finally:
        await s.close()


async def test_redis_keys_live_under_the_prefix_and_expire(redis_prefix):
    s = RedisState(REDIS_URL, redis_prefix)
    raw = aioredis.from_url(REDIS_URL, decode_responses=True)
    try:
        await s.add("k", 2, T0, T0 - HOUR)
        await s.restrict(_r(sender="timed@contoso.test", until=D + DAY))
        await s.restrict(_r(sender="forever@contoso.test"))
        await s.restrict(_r(sender="freed@contoso.test"))
        await s.release("user", "freed@contoso.test", D + HOUR, "admin")
        keys = sorted([k async for k in raw.scan_iter(match=redis_prefix + "*")])
        p = redis_prefix
        assert keys == sorted([f"{p}w:k", f"{p}b:k", f"{p}r:index", f"{p}r:user:timed@contoso.test",
                               f"{p}r:user:forever@contoso.test", f"{p}rel:user:freed@contoso.test"])
        ttl = {k[len(p):]: await raw.pttl(k) for k in keys}
        assert 0 < ttl["w:k"] <= 25 * 3600 * 1000 and 0 < ttl["b:k"] <= 25 * 3600 * 1000
        assert 0 < ttl["r:user:timed@contoso.test"] <= (DAY - 10 + 3600) * 1000
        assert ttl["r:user:forever@contoso.test"] == -1                  # until released
        assert ttl["r:index"] == -1
        assert (DAY - HOUR) * 1000 < ttl["rel:user:freed@contoso.test"] <= (2 * DAY - HOUR) * 1000
        # Members are unique per event and carry the amount.
        (member,) = await raw.zrange(f"{p}w:k", 0, -1)
        ts, uid, amount = member.split(":")
        assert float(ts) == T0 and len(uid) == 32 and amount == "2"
        assert await raw.hgetall(f"{p}b:k") == {f"3600:{int(T0 // 3600)}": "2", f"60:{int(T0 // 60)}": "2",
                                                f"1:{int(T0)}": "2"}
        # A restriction hash that expired leaves the index at the next listing.
        await raw.delete(f"{p}r:user:timed@contoso.test")
        assert [r.sender for r in await s.restrictions(D + 20)] == ["forever@contoso.test"]
        assert await raw.smembers(f"{p}r:index") == {"user:forever@contoso.test"}
    finally:
        await raw.aclose()
        await s.close()


async def test_redis_buckets_always_match_the_sorted_set(redis_prefix):
    # After adds and prunes at random edges, every hour/minute bucket holds exactly
    # the sum of the members in it, and no empty bucket is left behind.
    s = RedisState(REDIS_URL, redis_prefix)
    raw = aioredis.from_url(REDIS_URL, decode_responses=True)
    try:
        rng = random.Random(7)
        for _ in range(400):
            now = _edges(rng, T0 + rng.uniform(0, 40 * HOUR))
            since = rng.choice([now - HOUR, now - DAY, utc_day_start(now)])
            await s.add("inv", rng.randrange(1, 4), now, since)
        members = await raw.zrange(f"{redis_prefix}w:inv", 0, -1, withscores=True)
        want: dict[str, int] = {}
        for m, ts in members:
            for size in (3600, 60, 1):
                f = f"{size}:{math.floor(ts / size)}"
                want[f] = want.get(f, 0) + int(m.rsplit(":", 1)[1])
        got = {k: int(v) for k, v in (await raw.hgetall(f"{redis_prefix}b:inv")).items()}
        assert got == want
        assert min(ts for _, ts in members) >= min(since, now - 25 * HOUR)     # the last add pruned
    finally:
        await raw.aclose()
        await s.close()


async def test_redis_windows_are_exact_with_or_without_second_buckets(redis_prefix):
    """A partial minute is summed from its seconds when they add up to its minute bucket,
    else from the members: exact for events counted before the seconds were kept (or by
    an older node in a rolling upgrade), here their seconds removed by hand, mixed with
    events that have them; windows at random edges against a plain sum of the members."""
    s = RedisState(REDIS_URL, redis_prefix)
    raw = aioredis.from_url(REDIS_URL, decode_responses=True)
    key = f"{redis_prefix}b:mix"
    rng = random.Random(11)
    try:
        events = []
        for i in range(300):
            now = T0 + i * 0.4 + rng.choice([0.0, 0.25])
            amount = rng.randrange(1, 4)
            await s.add("mix", amount, now, T0 - DAY)
            events.append((now, amount))
            if i < 150:                                 # "old" events: no second bucket
                await raw.hincrby(key, f"1:{math.floor(now)}", -amount)
                await raw.hdel(key, *[f for f, v in (await raw.hgetall(key)).items() if int(v) <= 0])
        fields = {f: int(v) for f, v in (await raw.hgetall(key)).items()}
        minutes = {math.floor(t / 60) for t, _ in events}
        whole = {m for m in minutes
                 if sum(fields.get(f"1:{sec}", 0) for sec in range(m * 60, m * 60 + 60)) == fields[f"60:{m}"]}
        assert whole and minutes - whole               # both ways of summing a partial minute are used
        end = events[-1][0]
        for _ in range(150):
            since = rng.choice([T0 + rng.uniform(-5, 130), math.floor(T0 + rng.uniform(0, 120)),
                                math.floor((T0 + rng.uniform(0, 120)) / 60) * 60.0, events[rng.randrange(300)][0]])
            want = sum(a for t, a in events if t > since)
            assert await s.count("mix", end, since) == want, since
    finally:
        await raw.aclose()
        await s.close()


async def test_redis_unreachable_raises_connection_error():
    s = RedisState("redis://127.0.0.1:1/0", "x:")
    try:
        with pytest.raises(redis.ConnectionError):
            await s.ping()
        with pytest.raises(redis.ConnectionError):
            await s.add("k", 1, T0, T0 - HOUR)
    finally:
        await s.close()


async def test_open_state_follows_the_config(tmp_path, redis_prefix):
    base = config.load(None)
    cfg = dataclasses.replace(base, server=dataclasses.replace(base.server, data_dir=str(tmp_path / "data")))
    s = open_state(cfg)
    try:
        assert isinstance(s, SQLiteState) and s.path == str(tmp_path / "data" / "state.db")
        assert await s.add("k", 1, T0, T0 - HOUR) == (0, 1)
        assert (tmp_path / "data" / "state.db").exists()
    finally:
        await s.close()
    cfg = dataclasses.replace(cfg, state=config.StateConfig(backend="redis", url=REDIS_URL, key_prefix=redis_prefix))
    s = open_state(cfg)
    try:
        assert isinstance(s, RedisState) and s.prefix == redis_prefix
        await s.ping()
        assert await s.add("k", 1, T0, T0 - HOUR) == (0, 1)
        assert redis.Redis.from_url(REDIS_URL).exists(f"{redis_prefix}w:k") == 1
    finally:
        await s.close()
    with pytest.raises(ValueError):
        open_state(dataclasses.replace(cfg, state=config.StateConfig(backend="memcached")))


async def test_adds_arriving_out_of_timestamp_order_still_count_each_other(state):
    # Two nodes stamp their adds a millisecond apart; the later stamp reaches the store
    # first. The earlier one must still see it, or both would pass a limit of 1.
    assert await state.add("ooo", 1, T0 + 0.002, T0 + 0.002 - HOUR) == (0, 1)
    assert await state.add("ooo", 1, T0 + 0.001, T0 + 0.001 - HOUR) == (1, 2)


async def test_many_concurrent_adds_with_real_clock_are_exact(state):
    import time as _time

    async def one():
        now = _time.time()
        return await state.add("conc", 1, now, now - HOUR)
    results = await asyncio.gather(*(one() for _ in range(50)))
    assert sorted(a for _, a in results) == list(range(1, 51))


async def test_add_many_is_add_for_each(state):
    assert await state.add("m1", 2, T0, T0 - HOUR) == (0, 2)
    got = await state.add_many([("m1", 3, T0 + 1 - HOUR), ("m2", 1, T0 + 1 - 60), ("m1", 0, T0 + 1 - DAY)], T0 + 1)
    assert got == [(2, 5), (0, 1), (5, 5)]
