"""deliver.mx - where to deliver a domain's mail: MX lookup, implicit MX, null MX

``lookup(domain, resolver, max_addresses, prefer=)`` returns an
``MxAnswer``: the ordered list of (host, address) targets to try, or the
reason there are none. The order is RFC 5321 §5.1's: MX records by
preference, shuffled among equal preferences (so load spreads over equal MX
hosts), each host's addresses in the order A then AAAA. Without an MX record
the domain itself is the implicit MX.

Both address families are always looked up (A and AAAA, concurrently): an
MX with only AAAA records is a destination, not "no address", whatever the
family of the source that asks. The caller picks a source whose family the
answer has (``MxAnswer.families``) and takes that family's targets
(``MxAnswer.of_family``); deliver/scheduler.py defers with 4.4.4 when the
pool has no source of any family the destination has.

Targets are capped at ``max_addresses`` (delivery.max_mx_hosts) per family,
and hosts are resolved lazily: resolution stops once the preferred family
(``prefer``: the family of the caller's round-robin source) has the cap, so a
domain with 30 MX hosts costs only the lookups needed to fill it. Without
``prefer`` the cap counts targets of both families together.

How a lookup ends, and what it means for the recipients:

- MX records with addresses          → targets
- NXDOMAIN                            → permanent: R550_512_NO_SUCH_DOMAIN (5.1.2)
- a single MX with host "" ("MX 0 .") → permanent: R550_5110_NULL_MX (5.1.10, RFC 7505 §3)
- no MX, no A and no AAAA (NODATA)    → permanent: R550_544_NO_ROUTE (5.4.4)
- every MX host without an A or AAAA  → permanent: R550_544_NO_ROUTE (5.4.4)
- SERVFAIL / timeout on the MX query, or on host addresses when no host
  resolved (in either family)         → temporary: R451_443_DNS_TEMPFAIL (4.4.3)

A null MX mixed with real MX records is a misconfiguration (RFC 7505 §3
says it must be alone); the "." entries are ignored and the rest is used.
An address literal ("[192.0.2.1]") is its own target, without DNS.

This module only finds targets; outcome.py turns a failure Reply into the
recipients' fate (it is the one place that classifies).

TRUST: DNS answers are untrusted: host names come lower-cased and without
the trailing dot from the resolver; addresses are checked with ipaddress.

STANDARDS: RFC 5321 §5.1 (locating the target host, implicit MX),
RFC 7505 (null MX), RFC 3463 (5.1.2, 5.1.10, 5.4.4, 4.4.3).

CONFIG: delivery.max_mx_hosts (passed in by the scheduler), dns.* through
the shared resolver.

SEE ALSO: dns.py, deliver/scheduler.py, deliver/outcome.py, assess/source_domain.py
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import random
from collections.abc import Iterable
from dataclasses import dataclass

from ..dns import Rcode, Resolver
from ..replies import (R451_443_DNS_TEMPFAIL, R550_512_NO_SUCH_DOMAIN, R550_544_NO_ROUTE, R550_5110_NULL_MX,
                       Reply)


@functools.lru_cache(maxsize=4096)
def ip_version(address: str) -> int:
    """4 or 6 (asked for every target and source of every delivery: remembered)."""
    return ipaddress.ip_address(address).version


@dataclass(frozen=True)
class Target:
    """One address to connect to, and the MX host name it came from."""
    host: str
    address: str
    preference: int = 0
    implicit: bool = False             # True: no MX record, the domain itself (RFC 5321 §5.1)

    @property
    def family(self) -> int:
        """4 or 6: the IP version of ``address``."""
        return ip_version(self.address)


@dataclass(frozen=True)
class MxAnswer:
    domain: str
    targets: tuple[Target, ...] = ()
    failure: Reply | None = None       # why there are no targets
    detail: str = ""                   # what DNS said, for the trace

    @property
    def ok(self) -> bool:
        return self.failure is None

    @property
    def families(self) -> frozenset[int]:
        """The IP versions the targets have: {4}, {6}, {4, 6}, or empty on failure."""
        return frozenset(t.family for t in self.targets)

    def of_family(self, family: int) -> tuple[Target, ...]:
        """The targets of one IP version, best first."""
        return tuple(t for t in self.targets if t.family == family)

    def describe_targets(self, limit: int = 3) -> str:
        """ "mx.example[2001:db8::1], …" for messages."""
        shown = [f"{t.host}[{t.address}]" for t in self.targets[:limit]]
        return ", ".join(shown) + (", …" if len(self.targets) > limit else "")


def order_mx(records: Iterable[tuple[int, str]], rng: random.Random | None = None) -> list[tuple[int, str]]:
    """MX records by preference, shuffled among equal preferences (RFC 5321 §5.1)."""
    rng = rng or random
    by_pref: dict[int, list[str]] = {}
    for pref, host in records:
        by_pref.setdefault(int(pref), []).append(host)
    out: list[tuple[int, str]] = []
    for pref in sorted(by_pref):
        hosts = list(dict.fromkeys(by_pref[pref]))      # a host listed twice is tried once
        rng.shuffle(hosts)
        out.extend((pref, h) for h in hosts)
    return out


def _literal(domain: str) -> str | None:
    """The address of a domain literal "[192.0.2.1]" / "[IPv6:2001:db8::1]", else None."""
    if not (domain.startswith("[") and domain.endswith("]")):
        return None
    inner = domain[1:-1]
    if inner.lower().startswith("ipv6:"):
        inner = inner[5:]
    try:
        return str(ipaddress.ip_address(inner))
    except ValueError:
        return None


ADDRESS_TYPES = ("A", "AAAA")          # A before AAAA: the documented order


async def _addresses(host: str, resolver: Resolver) -> tuple[list[str], bool, str]:
    """(addresses, temporary failure seen, detail) of one host, both families."""
    types = ADDRESS_TYPES
    answers = await asyncio.gather(*(resolver.query(host, t) for t in types))
    addrs: list[str] = []
    temp = False
    details = []
    for t, a in zip(types, answers):
        if a.rcode == Rcode.OK:
            for rec in a.records:
                try:
                    addrs.append(str(ipaddress.ip_address(rec)))
                except ValueError:
                    details.append(f"{host} {t}: ignored non-address {rec!r}")
        elif a.rcode == Rcode.TEMPERROR:
            temp = True
            details.append(f"{host} {t}: {a.detail or 'temporary failure'}")
        else:
            details.append(f"{host} {t}: {a.rcode}")
    return list(dict.fromkeys(addrs)), temp, "; ".join(details)


async def lookup(domain: str, resolver: Resolver, max_addresses: int = 5, *, prefer: int | None = None,
                 rng: random.Random | None = None) -> MxAnswer:
    """The targets for mail to ``domain``, best first, of both families.

    With ``prefer`` (4 or 6) at most ``max_addresses`` per family, and hosts
    are resolved until the preferred family has that many; without it at
    most ``max_addresses`` in all."""
    domain = domain.rstrip(".").lower()
    cap = max(1, max_addresses)
    lit = _literal(domain)
    if lit is not None:
        return MxAnswer(domain, (Target(domain, lit, 0, implicit=True),), detail="address literal")

    mx = await resolver.query(domain, "MX")
    if mx.rcode == Rcode.NXDOMAIN:
        return MxAnswer(domain, failure=R550_512_NO_SUCH_DOMAIN, detail=f"{domain} MX: NXDOMAIN")
    if mx.rcode == Rcode.TEMPERROR:
        return MxAnswer(domain, failure=R451_443_DNS_TEMPFAIL, detail=f"{domain} MX: {mx.detail or 'temporary failure'}")

    if mx.rcode == Rcode.OK:
        records = [(p, h) for p, h in mx.records]
        real = [(p, h) for p, h in records if h]
        if not real:
            # Only "." entries: the domain says it accepts no mail (RFC 7505 §3).
            return MxAnswer(domain, failure=R550_5110_NULL_MX, detail=f"{domain} MX: 0 . (null MX)")
        hosts = order_mx(real, rng)
        implicit = False
    else:
        # NODATA for MX: the domain is its own mail exchanger (RFC 5321 §5.1).
        hosts = [(0, domain)]
        implicit = True

    targets: list[Target] = []
    count = {4: 0, 6: 0}
    temp_fail = False
    details: list[str] = []

    def full() -> bool:
        return (count[prefer] if prefer in count else len(targets)) >= cap

    for pref, host in hosts:
        if full():
            break
        lit = _literal(host)
        if lit is not None:
            addrs, temp, detail = [lit], False, ""
        else:
            addrs, temp, detail = await _addresses(host, resolver)
        temp_fail = temp_fail or temp
        if detail:
            details.append(detail)
        for a in addrs:
            t = Target(host, a, pref, implicit)
            if prefer in count:
                if count[t.family] >= cap:
                    continue
            elif len(targets) >= cap:
                break
            count[t.family] += 1
            targets.append(t)
    if targets:
        return MxAnswer(domain, tuple(targets), detail="; ".join(details))
    if temp_fail:
        # Some host could not be resolved now: it may have addresses later.
        return MxAnswer(domain, failure=R451_443_DNS_TEMPFAIL, detail="; ".join(details))
    what = "no MX and no address record" if implicit else "no MX host has an address"
    return MxAnswer(domain, failure=R550_544_NO_ROUTE, detail=f"{domain}: {what}" + (f" ({'; '.join(details)})" if details else ""))
