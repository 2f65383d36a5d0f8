#!/usr/bin/env python3
"""Queue-depth benchmark (issue 5): a deep spool of deferred mail, then fresh mail alongside it.

Targets: delivery rate of fresh mail with 100 k deferred messages queued >= 0.9 x the rate with
an empty queue; gateway RSS with 1 M queued < 500 MB and flat (the queue lives on disk).

One world on loopback (tests/support/harness.World: test DNS server, the gateway as its own
process, the aiosmtpd sink of dest.test on 127.0.0.20), plus deferred.test, whose MX
127.0.0.24 is a tests/support/sink.py sink answering "451 4.2.0" to every RCPT of a defer*
address. Two data directories, identical configuration (the e2e one, queue_lifetime 5 d and
the default retry schedule instead of the tests' 1 h / 1 s): "empty" and "deep".

1. Template: one 4 KB message from alice (SMTP AUTH) to a defer* address of deferred.test goes
   through the running gateway for real; its receiver answers 451, the recipient is deferred.
   Its rows (messages, bodies, recipients, events: received .. deferred) are read back from
   spool.db, and the message is deleted (`poolmta queue delete`).
2. Fill: with the gateway stopped, the deep spool.db (schema made by SQLiteSpool itself) gets
   QUEUED copies of those rows by executemany: a new queue id from poolmta's new_queue_id()
   and a new defer* recipient of the same length in every column, the recipient deferred
   (attempts 1, the 451 as last reply) with its next attempt spread over 1 h .. 6 h from now,
   so none is due during the run; the trace events' times are shifted to now.
3. Spool queries: the spool's own due(), next_due_time() and undelivered_dsns() timed on both
   spools, in this process (what the delivery loop asks each round, and at start-up); on the
   deep one also as worker 1 of 2 would ask them (server.workers = 2), and, after the rounds,
   with every deferred recipient due at once (spool.retry(None, now)).
4. Rounds, alternating empty, deep / deep, empty (the gateway restarted on each data dir):
   start-up time (to the 220 greeting), wait until idle, CPU seconds used over --idle-seconds
   idle seconds, RSS; then BATCHES batches of fresh mail (bench/throughput.py's workload: SESSIONS
   concurrent AUTH sessions x MESSAGES messages of 4 KB to dest.test), each until the sink has
   all of it: accepted and delivered msg/s (median of the batches), RSS after each batch and
   peak RSS (VmHWM).

    python3 bench/queue_depth.py [--queued 100000] [--sessions 20] [--messages 50] [--batches 2]
                                 [--rounds 2] [--workers 1] [--workdir DIR] [--out FILE]
    python3 bench/queue_depth.py --queued 1000000 --rounds 1       # the long mode
    python3 bench/queue_depth.py --smoke
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

from bench import benchenv  # noqa: E402
from bench.throughput import run as fresh_mail  # noqa: E402
from poolmta.spool import new_queue_id  # noqa: E402
from poolmta.spool.sqlite import SQLiteSpool  # noqa: E402
from tests.support.harness import World, poolmta  # noqa: E402
from tests.support.sink import Sink  # noqa: E402

DEFERRED_MX = "127.0.0.24"
TEMPLATE_RCPT = "defer-000000000000@deferred.test"       # every copy gets one of the same length
TABLES = ("messages", "bodies", "recipients", "events")


# ---- the gateway process ------------------------------------------------------------

def tree_pids(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").iterdir():
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
    return out


def memory(world: World) -> dict[str, int]:
    """VmRSS and VmHWM in KiB, summed over the gateway and any worker processes it started."""
    total = {"VmRSS": 0, "VmHWM": 0}
    for p in tree_pids(world.proc.pid):
        for k, v in benchenv.proc_memory(p).items():
            total[k] += v
    return total


def cpu(world: World) -> float:
    return sum(benchenv.cpu_seconds(p) for p in tree_pids(world.proc.pid))


def start(world: World, config: Path) -> float:
    """Start the gateway on CONFIG; seconds until it greets."""
    world.config_path = config
    t0 = time.perf_counter()
    world.start_gateway()
    return time.perf_counter() - t0


def stop(world: World) -> None:
    world.proc.terminate()
    world.proc.wait(30)


def wait_idle(world: World, limit: float = 60.0) -> float:
    """Wait until the gateway uses under 2 % of a core over half a second; seconds waited."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < limit:
        c0 = cpu(world)
        time.sleep(0.5)
        if cpu(world) - c0 < 0.01:
            break
    return time.perf_counter() - t0


# ---- template and fill ------------------------------------------------------------------

def template_content() -> bytes:
    body = (b"x" * 76 + b"\r\n") * (4096 // 78)
    return (b"From: alice@contoso.test\r\nTo: list@deferred.test\r\nSubject: queue depth\r\n"
            b"Message-ID: <queue-depth-template@contoso.test>\r\n\r\n") + body


def spool_rows(data_dir: Path, queue_id: str) -> dict[str, tuple[list[str], list[tuple]]]:
    """{table: (columns, rows)} of one message, read-only."""
    con = sqlite3.connect(f"file:{data_dir / 'spool.db'}?mode=ro", uri=True)
    try:
        out = {}
        for t in TABLES:
            cur = con.execute(f"SELECT * FROM {t} WHERE queue_id = ? ORDER BY rowid", (queue_id,))
            out[t] = ([d[0] for d in cur.description], cur.fetchall())
        return out
    finally:
        con.close()


def make_template(world: World) -> dict:
    """One real message through the gateway to the 451 receiver, read back once deferred."""
    qid = world.send(template_content(), "alice@contoso.test", [TEMPLATE_RCPT], auth=True)
    deadline = time.time() + 30
    while True:
        rows = spool_rows(world.data_dir, qid)
        cols, rcpts = rows["recipients"]
        if rcpts and rcpts[0][cols.index("state")] == "deferred":
            kinds = [r[rows["events"][0].index("kind")] for r in rows["events"][1]]
            if "deferred" in kinds:
                break
        if time.time() > deadline:
            raise RuntimeError(f"template {qid} was not deferred within 30 s: {rows['recipients']}")
        time.sleep(0.2)
    r = poolmta("queue", "delete", qid, "--config", str(world.config_path))
    if r.returncode != 0:
        raise RuntimeError(f"poolmta queue delete {qid}: {r.stderr}")
    # The events up to the first deferral (a later retry would add more).
    ecols, events = rows["events"]
    k = ecols.index("kind")
    last = next(i for i, e in enumerate(events) if e[k] == "deferred")
    rows["events"] = (ecols, events[:last + 1])
    return {"queue_id": qid, "rows": rows}


def _sub(value, old: dict, new: dict):
    """VALUE with the template's queue id and recipient replaced (str and bytes alike)."""
    if isinstance(value, str):
        return value.replace(old["qid"], new["qid"]).replace(old["rcpt"], new["rcpt"])
    if isinstance(value, bytes):
        return (value.replace(old["qid"].encode(), new["qid"].encode())
                .replace(old["rcpt"].encode(), new["rcpt"].encode()))
    return value


def fill(data_dir: Path, template: dict, n: int, batch: int = 5000) -> dict:
    """N deferred copies of the template into DATA_DIR/spool.db; timings and counts."""
    t0 = time.perf_counter()
    # The schema (and any migration) as the gateway's own spool makes it.
    spool = SQLiteSpool(data_dir)
    asyncio.run(spool.close())
    con = sqlite3.connect(str(data_dir / "spool.db"), isolation_level=None)
    con.execute("PRAGMA synchronous=OFF")          # a bulk load; the gateway opens it afterwards
    rows = template["rows"]
    old = {"qid": template["queue_id"], "rcpt": TEMPLATE_RCPT}
    mcols, (mrow,) = rows["messages"]
    rcols, (rrow,) = rows["recipients"]
    ecols, erows = rows["events"]
    ecols_in = [c for c in ecols if c != "id"]
    now = time.time()
    t_template = mrow[mcols.index("received_at")]
    sql = {t: f"INSERT INTO {t}({', '.join(c)}) VALUES ({', '.join('?' * len(c))})"
           for t, c in (("messages", mcols), ("bodies", rows["bodies"][0]), ("recipients", rcols),
                        ("events", ecols_in))}
    done = 0
    while done < n:
        todo: dict[str, list[tuple]] = {t: [] for t in TABLES}
        for i in range(done, min(n, done + batch)):
            new = {"qid": new_queue_id(), "rcpt": f"defer-{i:012d}@deferred.test"}
            next_attempt = now + 3600 + 5 * 3600 * i / max(1, n - 1)
            m = dict(zip(mcols, (_sub(v, old, new) for v in mrow)))
            m["received_at"] = now
            todo["messages"].append(tuple(m[c] for c in mcols))
            todo["bodies"] += [tuple(_sub(v, old, new) for v in b) for b in rows["bodies"][1]]
            r = dict(zip(rcols, (_sub(v, old, new) for v in rrow)))
            r.update(state="deferred", attempts=1, next_attempt=next_attempt, updated=now)
            todo["recipients"].append(tuple(r[c] for c in rcols))
            for e in erows:
                ev = dict(zip(ecols, (_sub(v, old, new) for v in e)))
                ev["ts"] = now + (ev["ts"] - t_template)
                if ev["kind"] == "deferred":
                    data = json.loads(ev["data"])
                    data["next_attempt"] = next_attempt
                    ev["data"] = json.dumps(data, separators=(",", ":"))
                todo["events"].append(tuple(ev[c] for c in ecols_in))
        con.execute("BEGIN")
        for t in TABLES:
            con.executemany(sql[t], todo[t])
        con.execute("COMMIT")
        done += len(todo["messages"])
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    return {"seconds": time.perf_counter() - t0, "events_per_message": len(erows)}


def disk_size(data_dir: Path) -> int:
    """Bytes on disk of spool.db and its WAL/SHM files."""
    return sum(p.stat().st_blocks * 512 for p in data_dir.glob("spool.db*"))


def deferred_count(data_dir: Path) -> int:
    con = sqlite3.connect(f"file:{data_dir / 'spool.db'}?mode=ro", uri=True)
    try:
        return con.execute("SELECT COUNT(*) FROM recipients WHERE state='deferred'").fetchone()[0]
    finally:
        con.close()


# ---- the spool's own queries on a deep spool ------------------------------------------------

async def _time_queries(data_dir: Path, concurrency: int, shards: int) -> dict[str, float]:
    kw = {"shard": shards - 1, "shards": shards} if shards > 1 else {}
    spool = SQLiteSpool(data_dir, **kw)
    out: dict[str, float] = {}
    try:
        probes = {"due(now, concurrency)": lambda: spool.due(time.time(), concurrency, set()),
                  "next_due_time()": spool.next_due_time,
                  "undelivered_dsns()": spool.undelivered_dsns}
        for name, fn in probes.items():
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                await fn()
                times.append(time.perf_counter() - t0)
            out[name] = statistics.median(times)
    finally:
        await spool.close()
    return out


async def retry_all(data_dir: Path) -> None:
    spool = SQLiteSpool(data_dir)
    try:
        await spool.retry(None, time.time() - 1)
    finally:
        await spool.close()


def time_queries(data_dir: Path, concurrency: int, shards: int = 1) -> dict[str, float] | None:
    try:
        return asyncio.run(_time_queries(data_dir, concurrency, shards))
    except TypeError:                   # a spool without shards (the keyword is not there)
        return None


# ---- the run ---------------------------------------------------------------------------

def measure(world: World, config: Path, label: str, a) -> dict:
    r: dict = {"label": label, "startup_s": start(world, config)}
    try:
        r["settle_s"] = wait_idle(world)
        r["idle"] = memory(world)
        c0 = cpu(world)
        time.sleep(a.idle_seconds)
        r["idle_cpu_s"] = cpu(world) - c0
        batches, r["rss_batches"] = [], []
        for _ in range(a.batches):
            batches.append(asyncio.run(fresh_mail(world, a.sessions, a.messages, a.size)))
            r["rss_batches"].append(memory(world)["VmRSS"])
        for k in batches[0]:
            r[k] = statistics.median(b[k] for b in batches)
        r["after"] = memory(world)
    finally:
        stop(world)
    print(f"  {label}: start {r['startup_s']:.1f} s, idle CPU {r['idle_cpu_s']:.2f} s / {a.idle_seconds} s, "
          f"RSS {benchenv.mib(r['idle']['VmRSS'])} -> {benchenv.mib(r['after']['VmRSS'])}, "
          f"accepted {r['accepted_per_s']:.0f}/s, delivered {r['delivered_per_s']:.0f}/s", flush=True)
    return r


def configs(world: World, deep_dir: Path, a) -> tuple[Path, Path]:
    text = world.config_path.read_text()
    for old, new in (('queue_lifetime = "1h"', 'queue_lifetime = "5d"'), ('retry_schedule = ["1s"]\n', "")):
        assert old in text, f"the e2e config changed: {old!r} not found"
        text = text.replace(old, new)
    if a.workers != 1:
        text = text.replace("[server]\n", f"[server]\nworkers = {a.workers}\n", 1)
    empty = world.workdir / "empty.toml"
    empty.write_text(text)
    old_dir = f'data_dir = "{world.data_dir}"'
    assert old_dir in text
    deep = world.workdir / "deep.toml"
    deep.write_text(text.replace(old_dir, f'data_dir = "{deep_dir}"'))
    return empty, deep


def run(a, workdir: Path) -> str:
    world = World(workdir)
    world.dns.resolver.zone["deferred.test"] = {"MX": [(10, "mx.deferred.test")]}
    world.dns.resolver.zone["mx.deferred.test"] = {"A": [DEFERRED_MX]}
    deferring = Sink(DEFERRED_MX, world.mx_port)
    deep_dir = workdir / "deep"
    results: list[dict] = []
    with world:
        deferring.start()
        try:
            empty_cfg, deep_cfg = configs(world, deep_dir, a)
            stop(world)
            start(world, empty_cfg)                  # the same settings the rounds use
            try:
                template = make_template(world)
            finally:
                stop(world)
            print(f"template {template['queue_id']} deferred ({len(template['rows']['events'][1])} events);"
                  f" filling {a.queued} ...", flush=True)
            filled = fill(deep_dir, template, a.queued)
            filled["deferred"] = deferred_count(deep_dir)
            filled["disk"] = disk_size(deep_dir)
            print(f"filled in {filled['seconds']:.1f} s: {filled['deferred']} deferred, spool.db "
                  f"{filled['disk'] / 2**20:.0f} MiB", flush=True)
            concurrency = 100
            queries = {"empty": time_queries(world.data_dir, concurrency),
                       "deep": time_queries(deep_dir, concurrency),
                       "deep, shard 1 of 2": time_queries(deep_dir, concurrency, shards=2)}
            for rnd in range(a.rounds):
                pair = [("empty", empty_cfg), ("deep", deep_cfg)]
                for label, cfg in pair if rnd % 2 == 0 else pair[::-1]:     # neither always goes first
                    results.append(measure(world, cfg, f"{label} #{rnd + 1}", a))
                    results[-1]["kind"] = label
            filled["disk_after"] = disk_size(deep_dir)
            # Last, as it changes the deep spool: every deferred recipient due at once, as after
            # `poolmta queue retry --all` or when a long outage's retries line up.
            asyncio.run(retry_all(deep_dir))
            queries["deep, all due"] = time_queries(deep_dir, concurrency)
            filled["deferred_after"] = deferred_count(deep_dir)
        finally:
            deferring.stop()
    return report(a, filled, queries, results)


def report(a, filled: dict, queries: dict, results: list[dict]) -> str:
    n = a.queued
    lines = [
        f"Deep spool: {n:,} messages of 4 KB from alice (AUTH), each with one recipient deferred by a receiver"
        f" answering 451 (deferred.test, {DEFERRED_MX}); rows copied from one real message that went through"
        f" the gateway to that receiver ({filled['events_per_message']} trace events each), next attempts spread"
        f" over 1–6 h from now. Fresh mail: {a.sessions} AUTH sessions × {a.messages} messages of {a.size} bytes"
        f" to dest.test (accepting sink), the gateway (server.workers = {a.workers}) restarted on each data dir,"
        f" rounds alternating empty, deep / deep, empty.", "",
        "| deep spool | |", "|---|---|",
        f"| fill ({n:,} messages, executemany, gateway stopped) | {filled['seconds']:.1f} s |",
        f"| deferred recipients after fill / at the end | {filled['deferred']:,} / {filled['deferred_after']:,} |",
        f"| spool.db on disk after fill | {filled['disk'] / 2**20:,.0f} MiB"
        f" ({filled['disk'] / max(1, n):,.0f} bytes per queued message) |",
        f"| spool.db on disk at the end (WAL included) | {filled['disk_after'] / 2**20:,.0f} MiB |",
        "",
        "The spool's own queries, median of 5 (the delivery loop asks due() and next_due_time() every round,"
        " undelivered_dsns() at start-up and after a refused recipient); \"shard 1 of 2\": as worker 1 of"
        " server.workers = 2 would ask, all the rows being worker 0's; \"all due\": after the rounds, every"
        " deferred recipient made due (spool.retry(None, now)):", "",
        "| query | " + " | ".join(queries) + " |", "|---" * (len(queries) + 1) + "|"]
    names = next(q for q in queries.values() if q is not None).keys()
    for name in names:
        lines.append(f"| {name} | " + " | ".join(
            f"{q[name] * 1000:.2f} ms" if q else "n/a" for q in queries.values()) + " |")
    lines += ["", "| round | start-up | idle CPU over "
              f"{a.idle_seconds:g} s | RSS idle | RSS after fresh mail | peak RSS (VmHWM) | accepted msg/s "
              "| delivered msg/s | accept p50 / p99 |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['label']} | {r['startup_s']:.1f} s | {r['idle_cpu_s']:.2f} s "
                     f"| {benchenv.mib(r['idle']['VmRSS'])} | {benchenv.mib(r['after']['VmRSS'])} "
                     f"| {benchenv.mib(r['after']['VmHWM'])} | {r['accepted_per_s']:.0f} "
                     f"| {r['delivered_per_s']:.0f} | {r['accept_p50_ms']:.0f} / {r['accept_p99_ms']:.0f} ms |")
    if a.batches > 1:
        lines += ["", f"RSS after each of the {a.batches} batches of fresh mail (rates above: median of the batches): "
                  + "; ".join(f"{r['label']}: " + " → ".join(benchenv.mib(k) for k in r["rss_batches"])
                              for r in results) + "."]
    rate = {k: statistics.median(r["delivered_per_s"] for r in results if r["kind"] == k) for k in ("empty", "deep")}
    ratio = rate["deep"] / rate["empty"]
    lines += ["", f"Delivered msg/s, median of the rounds: empty {rate['empty']:.0f}, deep {rate['deep']:.0f};"
              f" **deep / empty = {ratio:.2f}** (target ≥ 0.9: {'met' if ratio >= 0.9 else 'NOT met'}).",
              f"Gateway RSS with {n:,} queued: idle {benchenv.mib(max(r['idle']['VmRSS'] for r in results if r['kind'] == 'deep'))},"
              f" peak {benchenv.mib(max(r['after']['VmHWM'] for r in results if r['kind'] == 'deep'))}"
              f" (empty queue: peak {benchenv.mib(max(r['after']['VmHWM'] for r in results if r['kind'] == 'empty'))};"
              " target < 500 MB with 1 M queued)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--queued", type=int, default=100_000, help="deferred messages pre-filled in the deep spool")
    ap.add_argument("--sessions", type=int, default=20, help="concurrent SMTP sessions of fresh mail")
    ap.add_argument("--messages", type=int, default=50, help="fresh messages per session and round")
    ap.add_argument("--size", type=int, default=4096, help="bytes of a fresh message")
    ap.add_argument("--batches", type=int, default=2, help="batches of fresh mail per round (RSS after each)")
    ap.add_argument("--rounds", type=int, default=2, help="(empty, deep) pairs")
    ap.add_argument("--workers", type=int, default=1, help="server.workers of both gateways (0: one per CPU)")
    ap.add_argument("--idle-seconds", type=float, default=10.0, help="how long the idle CPU is measured")
    ap.add_argument("--workdir", default=None, help="where the spools go (default: a temp dir, removed after)")
    ap.add_argument("--smoke", action="store_true", help="2000 queued, a few fresh messages, for CI")
    ap.add_argument("--out", default=None, help="results file (default bench/results/<date>-queue-depth.md)")
    a = ap.parse_args(argv)
    if a.smoke:
        a.queued, a.sessions, a.messages, a.rounds, a.batches, a.idle_seconds = 2000, 2, 5, 1, 1, 2.0
    name = "queue-depth" + ("-smoke" if a.smoke else "-1m" if a.queued >= 1_000_000 else "")
    out = a.out or benchenv.default_out(name)
    if a.workdir:
        os.makedirs(a.workdir, exist_ok=True)
    head = benchenv.header(f"Queue depth: {a.queued:,} deferred messages in the spool")   # date and load before the run
    with tempfile.TemporaryDirectory(prefix="poolmta-queue-depth-", dir=a.workdir) as tmp:
        text = run(a, Path(tmp))
    benchenv.write(out, head + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
