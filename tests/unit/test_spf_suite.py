"""The RFC 7208 (SPF) conformance suite against assess/spf.py: every test, every run.

Each scenario's ``zonedata`` is served by an in-memory resolver that
answers the way the suite's reference driver (pyspf's test/testspf.py)
does: ``SPF`` records stand in for TXT when a name has no TXT record
(``TXT: NONE`` suppresses that), ``TIMEOUT`` means a DNS timeout for every
type not listed before it, CNAMEs are followed, names that are not in the
zone are NXDOMAIN. A test's ``result`` may be a list of acceptable results;
where an ``explanation`` is given it must match too (the default
explanation is "DEFAULT", as in the reference driver).
"""

from __future__ import annotations

from pathlib import Path

import yaml

from poolmta.assess import spf
from poolmta.dns import Answer, Rcode

SUITE = Path(__file__).resolve().parent.parent / "data" / "spf" / "rfc7208-tests.yml"
EXPECTED_TESTS = 203


class SuiteResolver:
    """Answers from one scenario's zonedata, like the suite's reference driver."""

    def __init__(self, zonedata: dict):
        self.zone: dict[str, list] = {}
        for name, entries in zonedata.items():
            out, generated, has_txt = [], [], False
            for e in entries:
                if e == "TIMEOUT":
                    out.append("TIMEOUT")
                    continue
                ((t, v),) = e.items()
                if t == "TXT":
                    has_txt = True
                if v == "NONE":
                    continue
                if t in ("TXT", "SPF"):
                    v = "".join(v) if isinstance(v, list) else v
                    if t == "SPF":
                        generated.append(("TXT", v))
                out.append((t, v))
            self.zone[name.lower().rstrip(".")] = out + ([] if has_txt else generated)
        self.queries: list[tuple[str, str]] = []

    async def query(self, name: str, rdtype: str) -> Answer:
        name = name.lower().rstrip(".")
        for _ in range(10):                     # CNAME chain
            self.queries.append((name, rdtype))
            entries = self.zone.get(name)
            if entries is None:
                return Answer(Rcode.NXDOMAIN)
            records, seen, cname = [], False, None
            for e in entries:
                if e == "TIMEOUT":
                    if not seen:
                        return Answer(Rcode.TEMPERROR, detail="DNS timeout (suite)")
                    break
                t, v = e
                if t == rdtype:
                    seen = True
                    if v == "TIMEOUT":
                        return Answer(Rcode.TEMPERROR, detail="DNS timeout (suite)")
                    records.append(tuple(v) if t == "MX" else v)
                elif t == "CNAME":
                    cname = v
            if records:
                return Answer(Rcode.OK, tuple(records))
            if cname is None:
                return Answer(Rcode.NODATA)
            name = cname.lower().rstrip(".")
        return Answer(Rcode.TEMPERROR, detail="CNAME chain too long (suite)")


def load_suite() -> list[tuple[str, str, dict, dict]]:
    cases = []
    with open(SUITE, "rb") as f:
        for scenario in yaml.safe_load_all(f):
            for name, test in scenario["tests"].items():
                cases.append((scenario["description"], name, test, scenario["zonedata"]))
    return cases


async def run_case(test: dict, zonedata: dict) -> tuple[bool, str]:
    resolver = SuiteResolver(zonedata)
    r = await spf.check(resolver, test["host"], test["mailfrom"], test["helo"],
                        receiver="receiver.example", default_explanation="DEFAULT", timeout=5.0)
    want = test["result"] if isinstance(test["result"], list) else [test["result"]]
    ok = r.result in want
    if ok and "explanation" in test:
        ok = r.explanation == test["explanation"]
    got = f"{r.result} (explanation {r.explanation!r}, term {r.mechanism!r}, detail {r.detail!r})"
    return ok, f"want {want} explanation {test.get('explanation')!r}, got {got}"


async def test_the_whole_rfc7208_suite_passes():
    cases = load_suite()
    failures = []
    for scenario, name, test, zonedata in cases:
        ok, why = await run_case(test, zonedata)
        if not ok:
            failures.append(f"{scenario} / {name}: {why}")
    passed = len(cases) - len(failures)
    assert len(cases) == EXPECTED_TESTS, f"the suite has {len(cases)} tests, expected {EXPECTED_TESTS}"
    assert not failures, f"RFC 7208 suite: {passed}/{len(cases)} passed, {len(failures)} failed:\n" + "\n".join(failures)


# ---- beyond the suite: what the gateway relies on ------------------------------

class SlowResolver:
    async def query(self, name, rdtype):
        import asyncio
        await asyncio.sleep(10)


async def test_a_deadline_makes_temperror():
    import time
    t0 = time.monotonic()
    r = await spf.check(SlowResolver(), "192.0.2.1", "a@example.org", "mx.example.org", timeout=0.1)
    assert (r.result, r.identity, r.domain) == ("temperror", "mailfrom", "example.org")
    assert time.monotonic() - t0 < 1


async def test_ipv4_mapped_client_and_helo_identity():
    zone = {"example.org": [{"TXT": "v=spf1 ip4:192.0.2.0/24 -all"}]}
    r = await spf.check(SuiteResolver(zone), "::ffff:192.0.2.7", "", "example.org")
    assert (r.result, r.identity, r.domain, r.mechanism) == ("pass", "helo", "example.org", "ip4:192.0.2.0/24")


async def test_no_client_ip_is_none_not_an_error():
    r = await spf.check(SuiteResolver({}), "", "a@example.org", "x")
    assert r.result == "none" and "client IP" in r.detail
