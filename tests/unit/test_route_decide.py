"""route(facts, policy) as a table: facts in, pool and reasons out (DESIGN.md §3)."""

import pytest

from poolmta.model import DomainState, DsnFact, Facts, ForwardFact, InboundAuthFact, LimitFact, Role, \
    SourceDomainFact, SpamFact
from poolmta.route import Policy, route
from poolmta.route.reasons import Reason
from poolmta.route.rules import RULES, table


def facts(dsn=False, sd=DomainState.RESOLVES, spam=False, fwd=False, spf="none", dkim=False, limits=(),
          spam_failed="", ):
    return Facts(dsn=DsnFact(dsn, "null-reverse-path" if dsn else ""),
                 source_domain=SourceDomainFact("example.org", sd),
                 spam=SpamFact(spam, "gtube" if spam else "builtin", failed=bool(spam_failed),
                               on_failure=spam_failed or "normal"),
                 limits=LimitFact(tuple(limits)),
                 forwarded=ForwardFact(fwd, "example.org", "t", 1 if fwd else 0),
                 inbound_auth=InboundAuthFact(True, "192.0.2.1", spf, "mailfrom", "example.org",
                                              dkim_aligned_pass=dkim))


CASES = [
    # id, facts, pool, reasons (deciding first), recheck
    ("plain", facts(), "normal", ["normal"], []),
    ("dsn", facts(dsn=True), "high-risk", ["dsn"], []),
    ("no-record", facts(sd=DomainState.NO_RECORD), "high-risk", ["source-domain-unresolvable"], []),
    ("null-mx", facts(sd=DomainState.NULL_MX), "high-risk", ["source-domain-null-mx"], []),
    ("spam", facts(spam=True), "high-risk", ["spam"], []),
    ("forwarded", facts(fwd=True), "relay", ["relay-unauthenticated"], []),
    # precedence: every match recorded, the first decides
    ("spam beats relay", facts(spam=True, fwd=True), "high-risk", ["spam", "relay-unauthenticated"], []),
    ("dsn beats all", facts(dsn=True, sd=DomainState.NO_RECORD, spam=True, fwd=True), "high-risk",
     ["dsn", "source-domain-unresolvable", "spam", "relay-unauthenticated"], []),
    ("unresolvable forwarded", facts(sd=DomainState.NO_RECORD, fwd=True), "high-risk",
     ["source-domain-unresolvable", "relay-unauthenticated"], []),
    # a DNS failure is not "no record": not high-risk, noted and re-checked
    ("temperror", facts(sd=DomainState.TEMPERROR), "normal", ["normal", "source-domain-temperror"], ["source-domain"]),
    ("temperror relay", facts(sd=DomainState.TEMPERROR, fwd=True), "relay",
     ["relay-unauthenticated", "source-domain-temperror"], ["source-domain"]),
    ("temperror on high-risk needs no recheck", facts(sd=DomainState.TEMPERROR, spam=True), "high-risk",
     ["spam", "source-domain-temperror"], []),
    ("null sender n/a", facts(dsn=True, sd=DomainState.NOT_APPLICABLE), "high-risk", ["dsn"], []),
    # the seed's relay-pool rule: forwarded mail whose sender authenticated stays normal (with SRS)
    ("forwarded spf pass", facts(fwd=True, spf="pass"), "normal", ["forward-authenticated"], []),
    ("forwarded dkim pass", facts(fwd=True, dkim=True), "normal", ["forward-authenticated"], []),
    ("forwarded spf softfail", facts(fwd=True, spf="softfail"), "relay", ["relay-unauthenticated"], []),
    ("forwarded spf temperror", facts(fwd=True, spf="temperror"), "relay", ["relay-unauthenticated"], []),
    ("own sender spf pass", facts(spf="pass"), "normal", ["normal"], []),
    ("spam beats authenticated forward", facts(fwd=True, spf="pass", spam=True), "high-risk",
     ["spam", "forward-authenticated"], []),
    # sending limits: the excess leaves through high-risk, one reason per limit
    ("limit", facts(limits=["recipient_limit_external_per_hour"]), "high-risk",
     ["limit:recipient_limit_external_per_hour"], []),
    ("two limits and relay", facts(limits=["service_messages_per_minute", "recipient_limit_per_day"], fwd=True),
     "high-risk", ["limit:service_messages_per_minute", "limit:recipient_limit_per_day", "relay-unauthenticated"], []),
    ("spam before limit", facts(spam=True, limits=["recipient_limit_per_day"]), "high-risk",
     ["spam", "limit:recipient_limit_per_day"], []),
    # a spam engine that failed: the tenant decides
    ("engine failed, high-risk", facts(spam_failed="high-risk"), "high-risk", ["spam-check-failed"], []),
    ("engine failed, normal", facts(spam_failed="normal"), "normal", ["normal", "spam-check-failed"], []),
]


@pytest.mark.parametrize("name,f,pool,reasons,recheck", CASES, ids=[c[0] for c in CASES])
def test_route_table(name, f, pool, reasons, recheck):
    d = route(f, Policy())
    assert d.pool == pool
    assert list(d.reasons) == reasons
    assert list(d.recheck) == recheck


def test_policy_maps_roles_to_configured_pools():
    policy = Policy({Role.NORMAL: "out-a", Role.HIGH_RISK: "hr-b", Role.RELAY: "rly-c"})
    assert route(facts(), policy).pool == "out-a"
    assert route(facts(spam=True), policy).pool == "hr-b"
    assert route(facts(fwd=True), policy).pool == "rly-c"
    assert route(facts(fwd=True), policy).role == Role.RELAY


def test_every_reason_is_documented_and_rules_use_closed_set():
    for r in Reason:
        assert r.doc and r.doc.endswith(".")
    assert all(isinstance(rule.code, Reason) for rule in RULES)
    rows = table()
    assert rows[0][1] == "dsn" and rows[-1][1] == "normal"
    assert [r[0] for r in rows] == list(range(1, len(rows) + 1))


@pytest.mark.parametrize("f,srs", [
    (facts(fwd=True, spf="pass"), True),
    (facts(fwd=True, dkim=True, spam=True), True),       # high-risk, but still authenticated forwarding
    (facts(fwd=True), False),                            # relay pool: never rewritten
    (facts(), False),                                    # own sender: no rewrite
    (facts(dsn=True, spf="pass"), False),
])
def test_srs_only_for_authenticated_forwarding(f, srs):
    assert route(f, Policy()).srs is srs
