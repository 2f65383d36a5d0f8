#!/usr/bin/env python3
"""Spam engines on the SpamAssassin corpus: precision, recall and check time per engine.

Runs every message of ../shared/corpus/ham-spam/spamassassin/ (200 ham, 200
spam; mbox 'From ' line stripped, CRLF line ends, as the spool holds them)
through each engine, one message at a time, and prints one row per engine:
precision and recall of the spam verdicts, the per-message check time
(p50/p99), and how many checks failed (no verdict; counted as not spam).

- builtin: in-process (assess/spam_engines/builtin.py); also prints, for
  each of its signals and for the candidates that were measured and not
  kept, how many ham and spam messages it hits, and why a candidate was
  dropped.
- spamassassin: a real spamd of our own on loopback, started as the
  integration test starts it (-L: no network tests, Bayes off, stock Debian
  rules without sa-update).
- rspamd: a real rspamd of our own on loopback (as the integration test:
  no Redis, DNS answered NXDOMAIN by a loopback test server), twice: as
  inbound mail (no envelope headers), and as the gateway asks for an SMTP
  AUTH submission (User and client IP given: rspamd then skips the checks
  meant for inbound mail).

    python3 bench/spam_corpus.py [--engines builtin,spamassassin,rspamd] [--corpus DIR] [--max-size BYTES]
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

from poolmta.assess.spam_engines import EngineError, builtin, rspamd, spamd  # noqa: E402

CORPUS = ROOT.parent / "shared" / "corpus" / "ham-spam" / "spamassassin"


def load(path: Path) -> bytes:
    raw = path.read_bytes()
    if raw.startswith(b"From "):
        raw = raw.split(b"\n", 1)[1]
    return raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


# ---- builtin: the kept signals and the candidates that were measured and dropped ---------------------------

def _candidates():
    html_only = lambda p: "text/html" in p.types and "text/plain" not in p.types
    ip_url = lambda p: any(builtin._public_ip(builtin._host(a)) for _, a in p.urls)
    subject = lambda p: p.subject
    return [
        ("url-ip (alone)", ip_url,
         "0 ham here, but people link to their own servers by address: kept only with bulk wording"),
        ("html-only", html_only, "hits ham (newsletters)"),
        ("bulk wording (unsubscribe, opt-out…)", lambda p: bool(builtin._BULK.search(p.text)),
         "hits ham (every mailing list)"),
        ("'click here'", lambda p: bool(re.search(r"click\s+here", p.text, re.I)), "hits ham"),
        ("subject mostly capitals", lambda p: (lambda s: len(s) >= 10 and sum(c.isupper() for c in s) / len(s) > .8)(
            [c for c in re.sub(r"\[[^\]]*\]", "", subject(p)) if c.isalpha()]), "hits ham"),
        ("'$', 'free' or '!!' in subject", lambda p: bool(re.search(r"\$\$|\$\d|free|!!", subject(p), re.I)),
         "hits ham"),
        ("'!!!' twice in the body", lambda p: p.text.count("!!!") >= 2,
         "0 ham here, but punctuation is style, not deceit"),
        ("base64 HTML part", lambda p: "base64-html" in p.flags,
         "0 ham here (2002), but many honest mailers encode HTML in base64 today"),
        ("Asian or Cyrillic charset", lambda p: "exotic-charset" in p.flags,
         "0 ham here, but would judge a language, not a message"),
        ("mailto:…?subject=remove", lambda p: bool(re.search(r"mailto:[^\s\"'>]*\?subject=[^\"'>]*remove", p.text,
                                                               re.I)),
         "0 ham here, but honest lists offer the same"),
    ]


def parse_for_candidates(content: bytes, max_size: int):
    import email
    p = builtin.parse(content, max_size)
    msg = email.message_from_bytes(content[:max_size])
    p.subject = str(msg.get("Subject", ""))
    p.flags = set()
    for part in msg.walk():
        if part.get_content_type() == "text/html" and str(part.get("Content-Transfer-Encoding", "")).strip().lower() \
                == "base64":
            p.flags.add("base64-html")
    if re.search(rb"charset=\"?(ks_c_5601|gb2312|big5|euc-kr|windows-1251|koi8)", content[:max_size], re.I):
        p.flags.add("exotic-charset")
    return p


def builtin_signals(ham: list[bytes], spam: list[bytes], max_size: int) -> None:
    rows = []
    parsed = {k: [parse_for_candidates(c, max_size) for c in msgs] for k, msgs in (("ham", ham), ("spam", spam))}
    for s in builtin.SIGNALS:
        rows.append((s.name, sum(bool(s.test(p)) for p in parsed["ham"]),
                     sum(bool(s.test(p)) for p in parsed["spam"]), "kept: " + s.why))
    for name, test, why in _candidates():
        rows.append((name, sum(bool(test(p)) for p in parsed["ham"]), sum(bool(test(p)) for p in parsed["spam"]),
                     "dropped: " + why))
    print(f"\nbuiltin signals on {len(ham)} ham / {len(spam)} spam (a message can hit several)")
    print(f"  {'signal':38} {'ham':>4} {'spam':>5}  decision")
    for name, h, s, why in rows:
        print(f"  {name:38} {h:4} {s:5}  {why}")


# ---- the run -----------------------------------------------------------------------------------------------

async def measure(check, ham: list[bytes], spam: list[bytes], names: list[str]) -> dict:
    times, verdicts, failed = [], {"ham": [], "spam": []}, 0
    for kind, msgs in (("ham", ham), ("spam", spam)):
        for content in msgs:
            t0 = time.perf_counter()
            try:
                f = await check(content)
                verdicts[kind].append(f.is_spam)
            except EngineError:
                failed += 1
                verdicts[kind].append(False)
            times.append(time.perf_counter() - t0)
    tp, fp = sum(verdicts["spam"]), sum(verdicts["ham"])
    times.sort()
    return {"precision": tp / (tp + fp) if tp + fp else float("nan"), "recall": tp / len(spam),
            "tp": tp, "fp": fp, "fp_names": [n for n, v in zip(names, verdicts["ham"]) if v], "failed": failed, "p50": statistics.median(times),
            "p99": times[min(len(times) - 1, int(len(times) * 0.99))]}


def row(name: str, r: dict) -> str:
    return (f"{name:34} {r['precision']:9.3f} {r['recall']:7.3f} {r['fp']:4} {r['tp']:4} {r['failed']:6}"
            f" {1000 * r['p50']:9.1f} {1000 * r['p99']:9.1f}")


async def run(engines: list[str], corpus: Path, max_size: int) -> None:
    ham_paths = sorted((corpus / "ham").glob("*.eml"))
    names = [p.name.split(".")[0] for p in ham_paths]
    ham = [load(p) for p in ham_paths]
    spam = [load(p) for p in sorted((corpus / "spam").glob("*.eml"))]
    print(f"corpus {corpus}: {len(ham)} ham, {len(spam)} spam; one message at a time; max_size {max_size}")
    results: list[tuple[str, dict]] = []
    notes: list[str] = []

    if "builtin" in engines:
        async def b(c):
            return builtin.check(c, max_size)
        results.append(("builtin", await measure(b, ham, spam, names)))

    if "spamassassin" in engines:
        from tests.integration.test_spam_engines import Spamd
        t0 = time.perf_counter()
        with Spamd(children=2) as d:
            notes.append(f"spamd started (answered PING) in {time.perf_counter() - t0:.1f} s")

            async def s(c):
                return await spamd.check(c, d.address, timeout=60, max_size=max_size)
            results.append(("spamassassin (spamd -L)", await measure(s, ham, spam, names)))

    if "rspamd" in engines:
        from tests.integration.test_spam_engines import Rspamd
        from tests.support.dnsserver import TestDNSServer
        with TestDNSServer({}) as dns:
            t0 = time.perf_counter()
            with Rspamd(dns.nameserver) as r:
                notes.append(f"rspamd started (answered /ping) in {time.perf_counter() - t0:.1f} s")

                async def ri(c):
                    return await rspamd.check(c, r.url, timeout=60, max_size=max_size)

                async def ra(c):
                    return await rspamd.check(c, r.url, timeout=60, max_size=max_size,
                                              user="alice@contoso.test", ip="192.0.2.10")
                results.append(("rspamd (as inbound mail)", await measure(ri, ham, spam, names)))
                results.append(("rspamd (as an AUTH submission)", await measure(ra, ham, spam, names)))

    print(f"\n{'engine':34} {'precision':>9} {'recall':>7} {'FP':>4} {'TP':>4} {'failed':>6} {'p50 ms':>9} {'p99 ms':>9}")
    for name, r in results:
        print(row(name, r))
    for n in notes:
        print("  " + n)
    for name, r in results:
        if r["fp_names"]:
            print(f"  {name} judged spam: {', '.join(r['fp_names'])}")
    if "builtin" in engines:
        builtin_signals(ham, spam, max_size)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engines", default="builtin,spamassassin,rspamd")
    ap.add_argument("--corpus", type=Path, default=CORPUS)
    ap.add_argument("--max-size", type=int, default=512 * 1024)
    a = ap.parse_args()
    asyncio.run(run([e.strip() for e in a.engines.split(",") if e.strip()], a.corpus, a.max_size))


if __name__ == "__main__":
    main()
