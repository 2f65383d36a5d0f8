#!/usr/bin/env python3
"""Micro-benchmark of the decision path: assess + route per message (issue 5; target p99 < 1 ms).

The gateway's own composition root (poolmta.app.Gateway) is built in this process from the e2e
configuration (tests/support/harness.config_text): its Directory, spam settings, sending limits
with their sender state (SQLite in a temp dir; Redis too when it answers on 127.0.0.1:6379)
and routing Policy. Only its resolver is given: a poolmta.dns.CachingResolver pointed at the
loopback test DNS server (tests/support/dnsserver.py, the e2e zone), warmed by the untimed
warm-up passes. Its cache clock is frozen, so the test server's short TTLs (60 s, 5 s for
negative answers) cannot expire during the run; the DNS server counts its queries, and the
results say how many arrived while timing (0: every answer came from the cache).

Messages: the real corpus messages of tests/data/corpus and tests/data/spam (deduplicated by
content), CRLF, each sent under every envelope kind:

- auth:           SMTP AUTH user of contoso (alice, trudy) to an external recipient;
- connector:      contoso's on-prem connector 127.0.0.10 (app@, billing@contoso.test);
- bounce:         null reverse-path from the connector, to an external address;
- forwarded:      internet client (127.0.0.50: SPF fail, 127.0.0.51: SPF pass) from
                  someone@external.test to the forwarding address info@contoso.test, expanded to
                  contoso-info@partner.test as ingress expands it;
- forwarded-dkim: the same from news@signer.test, the message DKIM-signed by signer.test
                  (key published in the test zone), so DKIM verification is on the path.

Each decision gets a fresh queue id and a unique Received header on top (so no cache keyed on
the header block makes a repeated message cheaper than a new one). Timed: `await
pipeline.decide(msg)` with time.perf_counter_ns, one message at a time, on uvloop as
`poolmta serve` runs. A second, shorter pass times every assess check and route() on its own.

    python3 bench/decision.py [--iterations 100] [--warmup 2] [--redis auto|off] [--out FILE]
    python3 bench/decision.py --smoke
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import hashlib
import sys
import tempfile
import time
from email.utils import formatdate
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

import dkim  # noqa: E402

from bench import benchenv  # noqa: E402
from poolmta.app import Gateway  # noqa: E402
from poolmta.assess import dsn, forwarded, inbound_auth, source_domain, spam  # noqa: E402
from poolmta.clock import FakeClock  # noqa: E402
from poolmta.config import loads  # noqa: E402
from poolmta.dns import CachingResolver  # noqa: E402
from poolmta.model import Envelope, Facts, Message, Origin, Recipient  # noqa: E402
from poolmta.rewrite.keys import active_key, keygen  # noqa: E402
from poolmta.route import route  # noqa: E402
from poolmta.spool import new_queue_id  # noqa: E402
from tests.support.dnsserver import TestDNSServer  # noqa: E402
from tests.support.harness import ZONE, config_text, free_port  # noqa: E402

KINDS = ("auth", "connector", "bounce", "forwarded", "forwarded-dkim")
CORPUS_DIRS = ("tests/data/corpus", "tests/data/spam")
REDIS_URL = "redis://127.0.0.1:6379/15"


def corpus_messages() -> list[tuple[str, bytes]]:
    """(name, CRLF content) of every corpus message under tests/data, each content once."""
    seen, out = set(), []
    for d in CORPUS_DIRS:
        for p in sorted((ROOT / d).rglob("*.eml")):
            raw = p.read_bytes()
            if raw.startswith(b"From "):
                raw = raw.split(b"\n", 1)[1]
            raw = raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
            h = hashlib.sha256(raw).digest()
            if h not in seen:
                seen.add(h)
                out.append((p.name, raw))
    return out


class Cases:
    """The envelope of each kind, from the gateway's own directory (connector, forwarding)."""

    def __init__(self, gw: Gateway, signer_key):
        d = gw.directory
        c = d.connector_for("127.0.0.10")
        assert c is not None and c.tenant == "contoso", "the e2e config's on-prem connector moved"
        self.connector = c
        fwd = d.forward_targets("info@contoso.test")
        assert fwd is not None, "the e2e config's forwarding address moved"
        self.fwd_tenant, self.fwd_targets = fwd
        self.signer_key = signer_key
        self.signed: dict[bytes, bytes] = {}

    def dkim_signed(self, content: bytes) -> bytes:
        if content not in self.signed:
            k = self.signer_key
            self.signed[content] = dkim.sign(content, k.selector.encode(), b"signer.test", k.private,
                                             include_headers=[b"from", b"to", b"subject", b"date"]) + content
        return self.signed[content]

    def message(self, kind: str, content: bytes, seq: int) -> Message:
        c = self.connector
        forward_rcpts = tuple(Recipient(t, (), "rfc822;info@contoso.test", original="info@contoso.test")
                              for t in self.fwd_targets)
        if kind == "auth":
            user = ("alice@contoso.test", "trudy@contoso.test")[seq % 2]
            origin = Origin("127.0.0.60", "client.test", auth_user=user, tenant="contoso")
            env = Envelope(user, (Recipient(f"r{seq % 7}@dest.test"),))
        elif kind == "connector":
            sender = ("app@contoso.test", "billing@contoso.test")[seq % 2]
            origin = Origin("127.0.0.10", "onprem.contoso.test", tenant=c.tenant, connector=c.name,
                            trusted_connector=c.trusted)
            env = Envelope(sender, (Recipient(f"r{seq % 7}@dest.test"),))
        elif kind == "bounce":
            origin = Origin("127.0.0.10", "onprem.contoso.test", tenant=c.tenant, connector=c.name,
                            trusted_connector=c.trusted)
            env = Envelope("", (Recipient("someone@external.test"),))
        elif kind == "forwarded":
            ip = ("127.0.0.50", "127.0.0.51")[seq % 2]
            origin = Origin(ip, "mail.external.test", tenant=self.fwd_tenant)
            env = Envelope("someone@external.test", forward_rcpts)
        else:
            origin = Origin("127.0.0.50", "mail.signer.test", tenant=self.fwd_tenant)
            env = Envelope("news@signer.test", forward_rcpts)
            content = self.dkim_signed(content)
        hop = (f"Received: from {origin.helo} ([{origin.client_ip}]) by bench.client.test with ESMTP id B{seq:08X};"
               f" {formatdate(usegmt=True)}\r\n").encode()
        return Message(new_queue_id(), env, origin, hop + content, time.time())


def build_pass(cases: Cases, corpus: list[tuple[str, bytes]], start: int) -> list[tuple[str, str, Message]]:
    out, seq = [], start
    for kind in KINDS:
        for name, content in corpus:
            out.append((kind, name, cases.message(kind, content, seq)))
            seq += 1
    return out


async def timed_passes(gw: Gateway, cases: Cases, corpus, passes: int, first_seq: int) -> list[tuple]:
    """[(pass, kind, name, ns, pool)] for every decision of PASSES passes."""
    decide = gw.pipeline.decide
    rows = []
    for p in range(passes):
        batch = build_pass(cases, corpus, first_seq + p * len(KINDS) * len(corpus))
        for kind, name, msg in batch:
            t0 = time.perf_counter_ns()
            _, decision = await decide(msg)
            rows.append((p, kind, name, time.perf_counter_ns() - t0, decision.pool))
    return rows


STEPS = ("dsn", "source_domain", "spam", "forwarded", "inbound_auth", "limits", "route")   # Facts field names


async def step_passes(gw: Gateway, cases: Cases, corpus, passes: int, first_seq: int) -> dict:
    """{(step, kind): [ns]}: each assess check and route() timed on its own, in pipeline order."""
    ctx, policy = gw.pipeline.ctx, gw.pipeline.policy
    checks = {"dsn": dsn.check, "source_domain": source_domain.check, "spam": spam.check,
              "forwarded": forwarded.check, "inbound_auth": inbound_auth.check}
    times: dict[tuple[str, str], list[int]] = collections.defaultdict(list)
    for p in range(passes):
        for kind, _, msg in build_pass(cases, corpus, first_seq + p * len(KINDS) * len(corpus)):
            got = {}
            for name, fn in checks.items():
                t0 = time.perf_counter_ns()
                got[name] = await fn(msg, ctx)
                times[name, kind].append(time.perf_counter_ns() - t0)
            t0 = time.perf_counter_ns()
            got["limits"] = await ctx.limits.check(msg)
            times["limits", kind].append(time.perf_counter_ns() - t0)
            facts = Facts(**got)
            t0 = time.perf_counter_ns()
            route(facts, policy)
            times["route", kind].append(time.perf_counter_ns() - t0)
    return times


def us(ns: float) -> str:
    return f"{ns / 1000:.0f} µs" if ns < 10_000_000 else f"{ns / 1e6:.1f} ms"


def stats_row(label: str, ns: list[int]) -> str:
    s = sorted(ns)
    total = sum(s)
    rate = len(s) / (total / 1e9) if total else 0
    return (f"| {label} | {len(s)} | {us(benchenv.percentile(s, 50))} | {us(benchenv.percentile(s, 99))} "
            f"| {us(s[-1])} | {rate:,.0f} |")


async def run_backend(label: str, text: str, dns: TestDNSServer, signer_key, corpus, a) -> str:
    cfg = loads(text)
    # The gateway's resolver class, warmed below; the frozen cache clock keeps every answer.
    resolver = CachingResolver([("127.0.0.1", dns.port)], cfg.dns.timeout, cfg.dns.cache_ttl_max,
                               FakeClock(time.time()))
    gw = Gateway(cfg, resolver=resolver)
    try:
        if hasattr(gw.state, "ping"):
            await gw.state.ping()
        cases = Cases(gw, signer_key)
        per_pass = len(KINDS) * len(corpus)
        await timed_passes(gw, cases, corpus, a.warmup, 0)
        q0 = len(dns.resolver.queries)
        t0 = time.perf_counter()
        rows = await timed_passes(gw, cases, corpus, a.iterations, a.warmup * per_pass)
        wall = time.perf_counter() - t0
        dns_during = len(dns.resolver.queries) - q0
        steps = await step_passes(gw, cases, corpus, a.step_passes, (a.warmup + a.iterations) * per_pass)
    finally:
        await gw.spool.close()
        await gw.state.close()
    return report(label, rows, steps, wall, dns_during, a)


def report(label: str, rows: list[tuple], steps: dict, wall: float, dns_during: int, a) -> str:
    lines = [f"## Limits state: {label}", "",
             f"{len(rows)} decisions timed ({a.iterations} passes), {wall:.1f} s wall in all (message building"
             f" included); DNS queries that reached the server while timing: {dns_during}.", "",
             "| kind | decisions | p50 | p99 | max | decisions/s (1 / mean) |", "|---|---|---|---|---|---|"]
    by_kind = collections.defaultdict(list)
    for _, kind, _, ns, _ in rows:
        by_kind[kind].append(ns)
    for kind in KINDS:
        lines.append(stats_row(kind, by_kind[kind]))
    lines.append(stats_row("**all**", [r[3] for r in rows]))
    # Does a decision get slower as the sender state fills up? First and last tenth of the passes.
    tenth = max(1, a.iterations // 10)
    lines += ["", f"Counted kinds (auth, connector) over the run: first {tenth} vs last {tenth} passes:", "",
              "| kind | p50 first | p50 last | p99 first | p99 last |", "|---|---|---|---|---|"]
    for kind in ("auth", "connector"):
        first = sorted(r[3] for r in rows if r[1] == kind and r[0] < tenth)
        last = sorted(r[3] for r in rows if r[1] == kind and r[0] >= a.iterations - tenth)
        lines.append(f"| {kind} | {us(benchenv.percentile(first, 50))} | {us(benchenv.percentile(last, 50))} "
                     f"| {us(benchenv.percentile(first, 99))} | {us(benchenv.percentile(last, 99))} |")
    slow = sorted(rows, key=lambda r: r[3], reverse=True)[:3]
    lines += ["", "Slowest decisions: " + "; ".join(f"{us(r[3])} {r[1]} {r[2]}" for r in slow) + ".", ""]
    pools = collections.defaultdict(collections.Counter)
    for _, kind, _, _, pool in rows:
        pools[kind][pool] += 1
    lines.append("Pools decided: " + "; ".join(
        f"{k}: " + ", ".join(f"{p} {n}" for p, n in pools[k].most_common()) for k in KINDS) + ".")
    lines += ["", f"Each step on its own, p50 / p99 ({a.step_passes} pass(es); assess runs the five checks"
              " concurrently, and limits after them, so the steps do not add up to the decision):", "",
              "| step | " + " | ".join(KINDS) + " |", "|---" * (len(KINDS) + 1) + "|"]
    for s in STEPS:
        cells = []
        for kind in KINDS:
            v = sorted(steps[s, kind])
            cells.append(f"{us(benchenv.percentile(v, 50))} / {us(benchenv.percentile(v, 99))}")
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def redis_answers() -> bool:
    import socket
    try:
        with socket.create_connection(("127.0.0.1", 6379), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def redis_cleanup(prefix: str) -> None:
    import redis
    r = redis.Redis.from_url(REDIS_URL)
    try:
        keys = list(r.scan_iter(match=prefix + "*", count=1000))
        for i in range(0, len(keys), 500):
            r.delete(*keys[i:i + 500])
    finally:
        r.close()


async def bench(a) -> str:
    corpus = corpus_messages()
    sections = []
    with tempfile.TemporaryDirectory(prefix="poolmta-decision-") as tmp:
        tmp_path = Path(tmp)
        made = keygen(str(tmp_path / "signer-keys"), "signer.test")
        signer_key = active_key(str(tmp_path / "signer-keys"), "signer.test")
        zone = dict(ZONE)
        zone[made.name] = {"TXT": [made.value]}
        with TestDNSServer(zone) as dns:
            def text(data_dir: str, extra: str = "") -> str:
                return config_text(str(tmp_path / data_dir), free_port(), 25, dns.port,
                                   str(tmp_path / "dkim")) + extra
            sections.append(await run_backend("SQLite (state.db in a temp dir, the default)", text("sqlite"),
                                              dns, signer_key, corpus, a))
            if a.redis == "auto" and redis_answers():
                prefix = f"poolmta-bench-decision-{time.time_ns()}:"
                extra = f'\n[state]\nbackend = "redis"\nurl = "{REDIS_URL}"\nkey_prefix = "{prefix}"\n'
                try:
                    sections.append(await run_backend(f"Redis 127.0.0.1:6379 db 15, key prefix {prefix}",
                                                      text("redis", extra), dns, signer_key, corpus, a))
                finally:
                    redis_cleanup(prefix)
            else:
                sections.append("## Limits state: Redis\n\nNot measured (" +
                                ("--redis off" if a.redis == "off" else "nothing answers on 127.0.0.1:6379") + ").\n")
    intro = (f"Decision path: `await pipeline.decide(msg)` (assess + route) per message, one at a time, on "
             f"{loop_name()}. Gateway built by poolmta.app.Gateway from tests/support/harness.config_text; resolver:"
             f" CachingResolver against the loopback test DNS server, warmed by {a.warmup} untimed pass(es), cache"
             f" clock frozen (no expiry). {len(corpus)} distinct corpus messages (tests/data/corpus, tests/data/spam;"
             f" {min(len(c) for _, c in corpus)}–{max(len(c) for _, c in corpus)} bytes) × {len(KINDS)} envelope kinds"
             f" per pass; every decision a new queue id and a unique Received header. Target: p99 < 1 ms.\n")
    return intro + "\n" + "\n".join(sections)


def loop_name() -> str:
    try:
        import uvloop  # noqa: F401
        return "uvloop (as `poolmta serve`)"
    except ImportError:
        return "asyncio's loop (uvloop not installed)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iterations", type=int, default=100, help="timed passes over every message and kind")
    ap.add_argument("--warmup", type=int, default=2, help="untimed passes first (they fill the DNS cache)")
    ap.add_argument("--step-passes", type=int, default=None, help="passes timing each step on its own")
    ap.add_argument("--redis", choices=("auto", "off"), default="auto",
                    help="also measure with the sender state on Redis at 127.0.0.1:6379 when it answers")
    ap.add_argument("--smoke", action="store_true", help="a few hundred decisions, for CI")
    ap.add_argument("--out", default=None, help="results file (default bench/results/<date>-decision.md)")
    a = ap.parse_args(argv)
    if a.smoke:
        a.iterations, a.warmup = 2, 1
    if a.step_passes is None:
        a.step_passes = 1 if a.smoke else max(1, a.iterations // 10)
    out = a.out or benchenv.default_out("decision" + ("-smoke" if a.smoke else ""))
    head = benchenv.header("Decision path micro-benchmark (assess + route)")     # date and load before the run
    try:
        import uvloop
        text = uvloop.run(bench(a))
    except ImportError:
        text = asyncio.run(bench(a))
    benchenv.write(out, head + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
