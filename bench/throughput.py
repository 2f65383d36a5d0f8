#!/usr/bin/env python3
"""A first rough throughput figure: messages/s accepted and delivered on loopback.

Starts the same one-machine world as the e2e tests (DNS server, MX sink, the
gateway as a process), then C concurrent SMTP sessions each send M messages of
S bytes through authenticated submission; it prints accepted msg/s (until the
last 250) and delivered msg/s (until the sink has them all), plus the accept
latency p50/p99. Every 250 was sent after the spool's fsync.

    python3 bench/throughput.py [--sessions 20] [--messages 50] [--size 4096]
"""

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

import aiosmtplib  # noqa: E402

from tests.support.harness import PASSWORD, World  # noqa: E402


async def session(world, n: int, size: int, sid: int, latencies: list[float]) -> None:
    body = (b"x" * 76 + b"\r\n") * max(1, size // 78)
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=world.listen_port, source_address=("127.0.0.60", 0),
                             timeout=60, start_tls=False, use_tls=False)
    await client.connect()
    await client.login("alice@contoso.test", PASSWORD)
    for i in range(n):
        msg = (f"From: alice@contoso.test\r\nTo: b@dest.test\r\nSubject: bench {sid}-{i}\r\n"
               f"Message-ID: <b{sid}.{i}.{time.time()}@contoso.test>\r\n\r\n").encode() + body
        t0 = time.perf_counter()
        await client.sendmail("alice@contoso.test", [f"bench{sid}-{i}@dest.test"], msg)
        latencies.append(time.perf_counter() - t0)
    await client.quit()


async def run(world, sessions: int, messages: int, size: int) -> dict:
    latencies: list[float] = []
    before = len(world.dest.messages)
    t0 = time.perf_counter()
    await asyncio.gather(*(session(world, messages, size, s, latencies) for s in range(sessions)))
    t_accept = time.perf_counter() - t0
    total = sessions * messages
    while len(world.dest.messages) - before < total:
        await asyncio.sleep(0.02)
        if time.perf_counter() - t0 > 600:
            raise RuntimeError("not all delivered within 600 s")
    t_deliver = time.perf_counter() - t0
    latencies.sort()
    return {"messages": total, "accepted_per_s": total / t_accept, "delivered_per_s": total / t_deliver,
            "accept_p50_ms": 1000 * statistics.median(latencies),
            "accept_p99_ms": 1000 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--messages", type=int, default=50, help="per session")
    ap.add_argument("--size", type=int, default=4096)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp, World(Path(tmp)) as world:
        r = asyncio.run(run(world, a.sessions, a.messages, a.size))
    print(f"sessions={a.sessions} messages={r['messages']} size={a.size}B")
    print(f"accepted: {r['accepted_per_s']:.0f} msg/s   delivered (end to end): {r['delivered_per_s']:.0f} msg/s")
    print(f"accept latency p50 {r['accept_p50_ms']:.1f} ms, p99 {r['accept_p99_ms']:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
