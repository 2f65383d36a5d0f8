"""route.decide - route(facts, policy) -> Decision: the heart of poolmta

A pure function, in the manner of h11's Connection: facts go in, a decision
comes out; no socket, clock or DNS. It walks the rule table in order; the
first rule that holds picks the role, every rule that holds adds its reason
code, and the policy maps the role to the configured pool that plays it.

TRUST: facts are trusted (assess produced them).

SEE ALSO: route/rules.py, tests/unit/test_route_decide.py
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..model import Decision, Facts, Role
from .reasons import Reason
from .rules import DEFAULT, NOTES, RULES


@dataclass(frozen=True)
class Policy:
    """Which pool plays each role (from config.pool_for_role())."""
    pools: dict[Role, str] = field(default_factory=lambda: {r: r.value for r in Role})


def route(facts: Facts, policy: Policy) -> Decision:
    matched = [r for r in RULES if r.predicate(facts)]
    decider = matched[0] if matched else DEFAULT
    reasons: list[str] = []
    for r in matched or [DEFAULT]:
        if r.code == Reason.LIMIT:          # one reason per limit: limit:recipient_limit_external_per_hour, …
            reasons.extend(f"limit:{name}" for name in facts.limits.exceeded)
        else:
            reasons.append(str(r.code))
    recheck: list[str] = []
    for note in NOTES:
        if note.predicate(facts):
            reasons.append(str(note.code))
            # Only worth re-checking when the answer could still change the pool.
            if note.code == Reason.SOURCE_DOMAIN_TEMPERROR and decider.role != Role.HIGH_RISK:
                recheck.append("source-domain")
    role = decider.role
    # Authenticated forwarding keeps SRS even when a risk rule picked high-risk;
    # relay-pool mail is never rewritten (the seed), and a null sender cannot be.
    srs = role != Role.RELAY and any(r.srs for r in matched)
    return Decision(role=role, pool=policy.pools[role], reasons=tuple(reasons), recheck=tuple(recheck), srs=srs)
