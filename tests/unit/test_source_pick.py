"""deliver.scheduler's choice of pool source: round-robin, but only a source of a family the destination has."""

from poolmta.clock import FakeClock
from poolmta.config import DeliveryConfig
from poolmta.deliver import Scheduler
from poolmta.model import Pool, Role, Source

A4, B6, C4 = Source("192.0.2.1", "a.gw.test"), Source("2001:db8::2", "b.gw.test"), Source("192.0.2.3", "c.gw.test")
POOL = Pool("normal", Role.NORMAL, (A4, B6, C4))


def scheduler() -> Scheduler:
    return Scheduler(spool=None, pipeline=None, resolver=None, pools={"normal": POOL}, cfg=DeliveryConfig(),
                     trace=None, clock=FakeClock(), hostname="gw.test")


def test_round_robin_when_every_family_is_reachable():
    s = scheduler()
    assert [s._pick_source(POOL, frozenset({4, 6})) for _ in range(4)] == [A4, B6, C4, A4]


def test_the_round_robin_source_is_kept_when_it_matches_else_the_next_that_does():
    s = scheduler()
    assert [s._pick_source(POOL, frozenset({4})) for _ in range(4)] == [A4, C4, C4, A4]
    s = scheduler()
    assert [s._pick_source(POOL, frozenset({6})) for _ in range(3)] == [B6, B6, B6]


def test_no_source_of_the_destinations_family():
    s = scheduler()
    v4_only = Pool("v4", Role.NORMAL, (A4, C4))
    assert s._pick_source(v4_only, frozenset({6})) is None
    assert s._peek_source(v4_only) == C4          # the turn was still taken


def test_without_families_plain_round_robin():
    s = scheduler()
    assert s._peek_source(POOL) == A4
    assert [s._pick_source(POOL) for _ in range(3)] == [A4, B6, C4]


async def test_the_deferral_names_a_dns_failure_of_the_missing_family():
    from poolmta.deliver import mx
    from poolmta.deliver.scheduler import _family_mismatch
    from poolmta.dns import Rcode, StaticResolver
    r = StaticResolver({("v6.example", "MX"): ((10, "mx.v6.example"),), ("mx.v6.example", "AAAA"): ("2001:db8::1",),
                        ("mx.v6.example", "A"): Rcode.TEMPERROR})
    v4_only = Pool("normal", Role.NORMAL, (A4, C4))
    text = _family_mismatch("v6.example", await mx.lookup("v6.example", r, 5, prefer=4), v4_only)
    assert text.startswith("the MX hosts of v6.example have IPv6 addresses only (mx.v6.example[2001:db8::1])")
    assert "mx.v6.example A: temporary failure" in text and text.endswith("pool 'normal' has IPv4 sources only")
