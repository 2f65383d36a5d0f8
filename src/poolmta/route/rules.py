"""route.rules - the ordered precedence table of routing rules, as data

The first rule whose predicate holds decides the pool; every rule that holds
is recorded as a reason. The order is the seed's and DESIGN.md §3's:
DSN, then unresolvable source domain, then spam, then forwarded/relayed.
`poolmta route --rules` prints this table; the docs are generated from it.

TRUST: facts come from assess; predicates only read them.

SEE ALSO: route/decide.py, route/reasons.py, ../shared/seeds/outbound-delivery-pools.en.md
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..model import DomainState, Facts, Role
from .reasons import Reason


@dataclass(frozen=True)
class Rule:
    code: Reason
    predicate: Callable[[Facts], bool]
    role: Role
    summary: str
    srs: bool = False          # a message this rule matches has its envelope sender rewritten with SRS


RULES: tuple[Rule, ...] = (
    Rule(Reason.DSN, lambda f: f.dsn.is_dsn, Role.HIGH_RISK,
         "NDR/bounce/DSN (null reverse-path or multipart/report; report-type=delivery-status)"),
    Rule(Reason.SOURCE_DOMAIN_UNRESOLVABLE, lambda f: f.source_domain.state == DomainState.NO_RECORD, Role.HIGH_RISK,
         "envelope sender's domain has no MX and no A/AAAA record"),
    Rule(Reason.SOURCE_DOMAIN_NULL_MX, lambda f: f.source_domain.state == DomainState.NULL_MX, Role.HIGH_RISK,
         "envelope sender's domain publishes a null MX (RFC 7505)"),
    Rule(Reason.SPAM, lambda f: f.spam.is_spam, Role.HIGH_RISK,
         "spam verdict"),
    Rule(Reason.SPAM_CHECK_FAILED, lambda f: f.spam.failed and f.spam.on_failure == "high-risk", Role.HIGH_RISK,
         "the spam engine failed and the tenant's on_engine_failure is \"high-risk\""),
    Rule(Reason.LIMIT, lambda f: bool(f.limits.exceeded), Role.HIGH_RISK,
         "a sending limit (service or outbound spam policy) is exceeded: limit:<name>"),
    Rule(Reason.FORWARD_AUTHENTICATED,
         lambda f: f.forwarded.forwarded and f.inbound_auth.sender_authenticated, Role.NORMAL,
         "forwarded/relayed, and the original sender passed SPF or aligned DKIM when it came in: SRS", srs=True),
    Rule(Reason.RELAY_UNAUTHENTICATED,
         lambda f: f.forwarded.forwarded and not f.inbound_auth.sender_authenticated, Role.RELAY,
         "forwarded/relayed to an external recipient; sender not in an accepted domain of the tenant,"
         " neither SPF nor aligned DKIM passed"),
)

# Recorded when it holds, but never decides a pool: the fact is re-checked before delivery.
NOTES: tuple[Rule, ...] = (
    Rule(Reason.SPAM_CHECK_FAILED, lambda f: f.spam.failed and f.spam.on_failure != "high-risk", Role.NORMAL,
         "the spam engine failed; routed as if clean (on_engine_failure = \"normal\")"),
    Rule(Reason.SOURCE_DOMAIN_TEMPERROR, lambda f: f.source_domain.state == DomainState.TEMPERROR, Role.NORMAL,
         "sender domain DNS failed: re-checked before delivery, not guessed"),
)

DEFAULT = Rule(Reason.NORMAL, lambda f: True, Role.NORMAL, "otherwise")


def table() -> list[tuple[int, str, str, str]]:
    """(order, reason, role, summary) rows, for `poolmta route --rules` and docs."""
    rows = [(i, str(r.code), str(r.role), r.summary) for i, r in enumerate(RULES, 1)]
    rows.append((len(RULES) + 1, str(DEFAULT.code), str(DEFAULT.role), DEFAULT.summary))
    return rows
