"""The source-domain fact against a real DNS server on loopback (dnslib), through
the same caching resolver the gateway uses."""

import pytest

from poolmta.assess.source_domain import check_domain
from poolmta.dns import CachingResolver, Rcode
from poolmta.model import DomainState
from tests.support.dnsserver import TestDNSServer

ZONE = {
    "good.test": {"MX": [(10, "mx.good.test")]},
    "mx.good.test": {"A": ["127.0.0.20"]},
    "aonly.test": {"A": ["127.0.0.21"]},
    "nullmx.test": {"MX": [(0, "")]},
    "txtonly.test": {"TXT": ["v=spf1 -all"]},
}


@pytest.fixture(scope="module")
def dns_server():
    with TestDNSServer(ZONE, servfail=["servfail.test"], drop=["timeout.test"]) as d:
        yield d


@pytest.fixture
def resolver(dns_server):
    return CachingResolver([("127.0.0.1", dns_server.port)], timeout=1.0)


@pytest.mark.parametrize("domain,state", [
    ("good.test", DomainState.RESOLVES),
    ("aonly.test", DomainState.RESOLVES),
    ("nullmx.test", DomainState.NULL_MX),
    ("txtonly.test", DomainState.NO_RECORD),
    ("nosuch.test", DomainState.NO_RECORD),
    ("servfail.test", DomainState.TEMPERROR),
    ("timeout.test", DomainState.TEMPERROR),
])
async def test_states_over_the_wire(resolver, domain, state):
    assert (await check_domain(domain, resolver)).state == state


async def test_negative_answers_are_cached_failures_are_not(resolver, dns_server):
    q = dns_server.resolver.queries
    await resolver.query("nosuch.test", "MX")
    n = len(q)
    assert (await resolver.query("nosuch.test", "MX")).rcode == Rcode.NXDOMAIN
    assert len(q) == n                      # served from cache
    await resolver.query("servfail.test", "MX")
    n = len(q)
    assert (await resolver.query("servfail.test", "MX")).rcode == Rcode.TEMPERROR
    assert len(q) > n                       # asked again: a failure is never cached


async def test_the_cache_sweeps_expired_entries_and_has_a_hard_cap(dns_server):
    from poolmta.clock import FakeClock
    clock = FakeClock()
    r = CachingResolver([("127.0.0.1", dns_server.port)], timeout=1.0, clock=clock, max_entries=8, sweep_every=4)
    for i in range(20):                                  # NXDOMAIN, cached (negative TTL of the test zone: 5 s)
        assert (await r.query(f"gone{i}.test", "A")).rcode == Rcode.NXDOMAIN
        assert r.cache_size <= 8                         # never more than the cap
    assert (await r.query("mx.good.test", "A")).rcode == Rcode.OK       # TTL 60 s
    clock.advance(30)                                    # every negative answer has expired, the A has not
    for i in range(4):                                   # a few inserts trigger a sweep
        await r.query(f"later{i}.test", "A")
    assert r.cache_size <= 5
    n = len(dns_server.resolver.queries)
    assert (await r.query("mx.good.test", "A")).records == ("127.0.0.20",)
    assert len(dns_server.resolver.queries) == n         # the live entry survived the sweep
