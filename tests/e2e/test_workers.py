"""server.workers = 2: two worker processes under one master share the listen
port and the spool; every message is delivered exactly once, each worker
delivers what it accepted, a killed worker is started again, and SIGTERM to
the master stops them all."""

import os
import signal
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.support import harness
from tests.support.harness import World, wait_summary


def children(pid: int) -> set[int]:
    out = set()
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(stat[1]) == pid and stat[0] != "Z":
                out.add(int(d))
    return out


def alive(pid: int) -> bool:
    """Running (a zombie waiting for a reaper that may never come in a container is not)."""
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_children(pid: int, pred, timeout: float = 20.0) -> set[int]:
    end = time.time() + timeout
    while time.time() < end:
        kids = children(pid)
        if pred(kids):
            return kids
        time.sleep(0.1)
    raise AssertionError(f"children of {pid}: {children(pid)}")


def two_workers(mp: pytest.MonkeyPatch) -> None:
    """World's configuration, with two workers."""
    plain = harness.config_text

    def text(*a, **k):
        t = plain(*a, **k)
        return t if "workers = 2" in t else t.replace("[server]\n", "[server]\nworkers = 2\n", 1)
    mp.setattr(harness, "config_text", text)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    two_workers(mp)
    try:
        with World(tmp_path_factory.mktemp("workers")) as w:
            yield w
    finally:
        mp.undo()


def burst(world, tag: str, sessions: int, per_session: int) -> list[str]:
    """Several connections at once, so the kernel spreads them over both workers."""
    def one(s: int) -> list[str]:
        return [world.send(f"Subject: {tag} {s}.{i}\r\nMessage-ID: <{tag}.{s}.{i}@contoso.test>\r\n\r\nhi\r\n"
                           .encode(), "alice@contoso.test", [f"{tag}-{s}-{i}@dest.test"], client_ip="127.0.0.60",
                           auth=True)
                for i in range(per_session)]
    with ThreadPoolExecutor(sessions) as ex:
        return [q for qs in ex.map(one, range(sessions)) for q in qs]


def test_every_message_is_delivered_once_by_the_worker_that_accepted_it(world):
    assert len(wait_children(world.proc.pid, lambda k: len(k) == 2)) == 2
    qids = burst(world, "w", sessions=8, per_session=5)
    assert len(set(qids)) == 40
    world.dest.wait_for(lambda ms: len([m for m in ms if m.rcpt_tos[0].startswith("w-")]) >= 40)
    time.sleep(0.5)                                        # a duplicate would arrive now
    got = sorted(m.rcpt_tos[0] for m in world.dest.messages if m.rcpt_tos[0].startswith("w-"))
    assert got == sorted(f"w-{s}-{i}@dest.test" for s in range(8) for i in range(5))
    # Queue ids carry the accepting worker's number; the shard column says who delivers.
    con = sqlite3.connect(f"file:{world.data_dir}/spool.db?mode=ro", uri=True)
    rows = con.execute("SELECT queue_id, shard FROM recipients WHERE address LIKE 'w-%'").fetchall()
    con.close()
    assert all(int(q[13], 16) == shard for q, shard in rows)
    assert {shard for _, shard in rows} == {0, 1}, "the kernel gave every connection to one worker"


def test_a_killed_worker_is_started_again_and_mail_still_flows(world):
    before = wait_children(world.proc.pid, lambda k: len(k) == 2)
    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    after = wait_children(world.proc.pid, lambda k: len(k) == 2 and victim not in k)
    assert len(after - before) == 1
    qids = burst(world, "k", sessions=4, per_session=3)
    for q in qids:
        assert wait_summary(world, q, lambda s: s.get("delivered") == 1)["routed"] == "normal"


def test_both_workers_write_whole_event_log_lines(world):
    """Each worker writes its trace lines in writes of at most PIPE_BUF: no line is torn."""
    import json
    qids = burst(world, "log", sessions=6, per_session=4)
    for q in qids:
        wait_summary(world, q, lambda s: s.get("delivered") == 1)
    time.sleep(0.3)
    events = []
    for line in world.log_path.read_text().splitlines():
        if " poolmta.trace INFO " in line:
            events.append(json.loads(line.split(" poolmta.trace INFO ", 1)[1]))
    queued = {e["queue_id"] for e in events if e["event"] == "queued"}
    delivered = {e["queue_id"] for e in events if e["event"] == "delivered"}
    assert set(qids) <= queued and set(qids) <= delivered


def test_sigterm_to_the_master_stops_every_worker(world):
    kids = wait_children(world.proc.pid, lambda k: len(k) == 2)
    world.proc.send_signal(signal.SIGTERM)
    assert world.proc.wait(30) == 0
    assert not any(alive(p) for p in kids)


def test_workers_do_not_outlive_a_killed_master(tmp_path, monkeypatch):
    two_workers(monkeypatch)
    with World(tmp_path) as w:
        kids = wait_children(w.proc.pid, lambda k: len(k) == 2)
        w.kill_gateway()                                   # SIGKILL: the master cannot forward anything
        end = time.time() + 20
        while time.time() < end and any(alive(p) for p in kids):
            time.sleep(0.1)
        assert not any(alive(p) for p in kids)

