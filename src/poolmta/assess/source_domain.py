"""assess.source_domain - fact: does the envelope sender's domain exist for mail?

The seed: mail whose source domain has no A record and no MX record in public
DNS always leaves through the high-risk pool. We ask MX first; a non-null MX
set settles it. NXDOMAIN settles it the other way. NODATA for MX falls back to
A and AAAA (the implicit MX of RFC 5321 §5.1). A null MX (RFC 7505) is its
own state. A SERVFAIL or timeout anywhere is TEMPERROR: not "no record".

TRUST: DNS answers.

STANDARDS: RFC 5321 §5.1, RFC 7505

CONFIG: dns.* (through the shared resolver)

SEE ALSO: dns.py, route/rules.py
"""

from __future__ import annotations

import asyncio

from ..dns import Rcode, Resolver
from ..model import DomainState, Message, SourceDomainFact


async def check_domain(domain: str, resolver: Resolver) -> SourceDomainFact:
    if not domain:
        return SourceDomainFact("", DomainState.NOT_APPLICABLE)
    if domain.startswith("["):
        # An address literal has no name to look up: it has no MX and no A
        # record in DNS, which is exactly what the seed sends to high-risk.
        return SourceDomainFact(domain, DomainState.NO_RECORD, "address literal: no name in DNS")
    mx = await resolver.query(domain, "MX")
    if mx.rcode == Rcode.OK:
        hosts = [h for _, h in mx.records]
        if len(hosts) == 1 and hosts[0] == "":
            return SourceDomainFact(domain, DomainState.NULL_MX, "MX 0 .")
        return SourceDomainFact(domain, DomainState.RESOLVES, "MX " + " ".join(h for h in hosts if h))
    if mx.rcode == Rcode.NXDOMAIN:
        return SourceDomainFact(domain, DomainState.NO_RECORD, "NXDOMAIN")
    if mx.rcode == Rcode.TEMPERROR:
        return SourceDomainFact(domain, DomainState.TEMPERROR, "MX: " + mx.detail)
    a, aaaa = await asyncio.gather(resolver.query(domain, "A"), resolver.query(domain, "AAAA"))
    if a.rcode == Rcode.OK or aaaa.rcode == Rcode.OK:
        return SourceDomainFact(domain, DomainState.RESOLVES, "no MX; address record (implicit MX)")
    if a.rcode == Rcode.TEMPERROR or aaaa.rcode == Rcode.TEMPERROR:
        return SourceDomainFact(domain, DomainState.TEMPERROR, "A/AAAA: " + (a.detail or aaaa.detail))
    return SourceDomainFact(domain, DomainState.NO_RECORD, "no MX, no A, no AAAA")


async def check(msg: Message, ctx) -> SourceDomainFact:
    return await check_domain(msg.envelope.sender_domain, ctx.resolver)
