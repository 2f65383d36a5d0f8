"""deliver.mx over an in-memory zone: ordering, implicit MX, null MX and every DNS failure."""

import random

import pytest

from poolmta import replies
from poolmta.deliver.mx import Target, lookup, order_mx
from poolmta.dns import Rcode, StaticResolver

ZONE = {
    ("example.org", "MX"): ((20, "mx2.example.org"), (10, "mx1.example.org")),
    ("mx1.example.org", "A"): ("192.0.2.1",),
    ("mx1.example.org", "AAAA"): ("2001:db8::1",),
    ("mx2.example.org", "A"): ("192.0.2.2",),
    ("implicit.example", "A"): ("192.0.2.10",),
    ("implicit.example", "AAAA"): ("2001:db8::10",),
    ("null.example", "MX"): ((0, ""),),
    ("broken.example", "MX"): Rcode.TEMPERROR,
    ("nodata.example", "TXT"): ("v=spf1 -all",),
    ("dangling.example", "MX"): ((10, "gone.example"),),
    ("halfbroken.example", "MX"): ((10, "slow.example"),),
    ("slow.example", "A"): Rcode.TEMPERROR,
    ("mixed.example", "MX"): ((0, ""), (10, "mx1.example.org")),
    ("wide.example", "MX"): tuple((10, f"mx{i}.wide.example") for i in range(8)),
    **{(f"mx{i}.wide.example", "A"): (f"198.51.100.{i}",) for i in range(8)},
    ("backup.example", "MX"): ((10, "slow.example"), (20, "mx2.example.org")),
    ("v6only.example", "MX"): ((10, "mx.v6only.example"),),
    ("mx.v6only.example", "AAAA"): ("2001:db8::66",),
    ("implicit6.example", "AAAA"): ("2001:db8::67",),
    ("aaaa-broken.example", "MX"): ((10, "mx.aaaa-broken.example"),),
    ("mx.aaaa-broken.example", "A"): ("192.0.2.68",),
    ("mx.aaaa-broken.example", "AAAA"): Rcode.TEMPERROR,
    ("nov4.example", "MX"): ((10, "nov4.example"),),
    ("nov4.example", "TXT"): ("no address at all",),
}


@pytest.fixture
def resolver():
    return StaticResolver(ZONE)


async def test_mx_sorted_by_preference_with_a_then_aaaa(resolver):
    ans = await lookup("example.org", resolver, 10)
    assert ans.ok and ans.failure is None
    assert [(t.host, t.address) for t in ans.targets] == [
        ("mx1.example.org", "192.0.2.1"), ("mx1.example.org", "2001:db8::1"), ("mx2.example.org", "192.0.2.2")]
    assert [t.preference for t in ans.targets] == [10, 10, 20]
    assert not any(t.implicit for t in ans.targets)


async def test_both_families_are_looked_up_and_can_be_taken_apart(resolver):
    ans = await lookup("example.org", resolver, 10, prefer=4)
    assert ans.families == {4, 6}
    assert [t.address for t in ans.of_family(4)] == ["192.0.2.1", "192.0.2.2"]
    assert [t.address for t in ans.of_family(6)] == ["2001:db8::1"]
    assert [t.family for t in ans.targets] == [4, 6, 4]


async def test_the_cap_counts_the_preferred_family(resolver):
    # mx1 has A and AAAA: with a total cap of 2 the IPv4 backup mx2 would be lost.
    ans = await lookup("example.org", resolver, 2, prefer=4)
    assert [t.address for t in ans.of_family(4)] == ["192.0.2.1", "192.0.2.2"]
    ans = await lookup("wide.example", resolver, 3, prefer=4, rng=random.Random(0))
    assert len(ans.of_family(4)) == 3 and len(ans.targets) == 3        # still lazy


async def test_an_ipv6_only_mx_has_targets_whatever_the_source(resolver):
    for prefer in (4, 6, None):
        ans = await lookup("v6only.example", resolver, 5, prefer=prefer)
        assert ans.ok, ans
        assert [(t.host, t.address) for t in ans.targets] == [("mx.v6only.example", "2001:db8::66")]
        assert ans.families == {6} and ans.of_family(4) == ()


async def test_an_ipv6_only_implicit_mx_has_targets(resolver):
    ans = await lookup("implicit6.example", resolver, 5, prefer=4)
    assert ans.ok and ans.targets == (Target("implicit6.example", "2001:db8::67", 0, True),)


async def test_a_failing_aaaa_query_does_not_hide_the_a_records(resolver):
    ans = await lookup("aaaa-broken.example", resolver, 5, prefer=4)
    assert ans.ok and [t.address for t in ans.targets] == ["192.0.2.68"]
    assert "AAAA" in ans.detail


async def test_no_address_of_either_family_is_still_544(resolver):
    ans = await lookup("nov4.example", resolver, 5, prefer=4)
    assert ans.failure == replies.R550_544_NO_ROUTE


async def test_cap_on_addresses(resolver):
    ans = await lookup("example.org", resolver, 2)
    assert len(ans.targets) == 2
    assert ans.targets[0].address == "192.0.2.1"


async def test_equal_preference_is_randomised_but_stays_complete():
    seen = set()
    for seed in range(20):
        order = order_mx([(10, "a"), (10, "b"), (10, "c"), (5, "first"), (20, "last")], random.Random(seed))
        assert order[0] == (5, "first") and order[-1] == (20, "last")
        assert sorted(h for _, h in order[1:4]) == ["a", "b", "c"]
        seen.add(tuple(h for _, h in order[1:4]))
    assert len(seen) > 1          # not always the same order


async def test_duplicate_mx_hosts_tried_once():
    assert order_mx([(10, "a"), (10, "a")], random.Random(1)) == [(10, "a")]


async def test_lazy_resolution_stops_at_the_cap(resolver):
    ans = await lookup("wide.example", resolver, 3, rng=random.Random(0))
    assert len(ans.targets) == 3
    assert len({t.host for t in ans.targets}) == 3


async def test_implicit_mx_when_no_mx_record(resolver):
    ans = await lookup("implicit.example", resolver, 5)
    assert ans.targets == (Target("implicit.example", "192.0.2.10", 0, True),
                           Target("implicit.example", "2001:db8::10", 0, True))


async def test_nxdomain_is_permanent_512(resolver):
    ans = await lookup("nowhere.example", resolver, 5)
    assert not ans.ok and ans.failure == replies.R550_512_NO_SUCH_DOMAIN
    assert ans.failure.permanent and ans.failure.enhanced == "5.1.2"


async def test_null_mx_is_permanent_5110(resolver):
    ans = await lookup("null.example", resolver, 5)
    assert ans.failure == replies.R550_5110_NULL_MX and ans.failure.enhanced == "5.1.10"
    assert ans.targets == ()


async def test_null_mx_mixed_with_real_mx_uses_the_real_ones(resolver):
    ans = await lookup("mixed.example", resolver, 5, prefer=4)
    assert ans.ok and [t.host for t in ans.of_family(4)] == ["mx1.example.org"]


async def test_servfail_on_mx_is_temporary_443(resolver):
    ans = await lookup("broken.example", resolver, 5)
    assert ans.failure == replies.R451_443_DNS_TEMPFAIL and ans.failure.transient


async def test_no_mx_and_no_address_is_permanent_544(resolver):
    ans = await lookup("nodata.example", resolver, 5)
    assert ans.failure == replies.R550_544_NO_ROUTE and ans.failure.permanent


async def test_mx_host_without_address_is_permanent_544(resolver):
    ans = await lookup("dangling.example", resolver, 5)
    assert ans.failure == replies.R550_544_NO_ROUTE
    assert "gone.example" in ans.detail


async def test_mx_host_with_dns_failure_is_temporary(resolver):
    ans = await lookup("halfbroken.example", resolver, 5)
    assert ans.failure == replies.R451_443_DNS_TEMPFAIL


async def test_a_failing_primary_does_not_hide_a_working_backup(resolver):
    ans = await lookup("backup.example", resolver, 5, prefer=4)
    assert ans.ok and [t.host for t in ans.of_family(4)] == ["mx2.example.org"]


async def test_address_literal_needs_no_dns(resolver):
    ans = await lookup("[192.0.2.55]", resolver, 5)
    assert [t.address for t in ans.targets] == ["192.0.2.55"]


async def test_name_is_normalised(resolver):
    ans = await lookup("Example.ORG.", resolver, 1)
    assert ans.domain == "example.org" and ans.targets[0].host == "mx1.example.org"


async def test_an_ipv6_address_literal_is_an_ipv6_target(resolver):
    ans = await lookup("[IPv6:2001:db8::3]", resolver, 5, prefer=4)
    assert ans.families == {6} and [t.address for t in ans.of_family(6)] == ["2001:db8::3"]
