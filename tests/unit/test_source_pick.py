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
