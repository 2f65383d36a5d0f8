"""assess.forwarded - fact: is this mail forwarded or relayed for someone else?

It is when it leaves for at least one recipient outside the vouching tenant's
accepted domains while its envelope sender's domain is not one of them
either: the tenant is passing on somebody else's mail (an auto-forward, an
on-prem server relaying a third party). The seed sends such mail through the
relay pool unless the original sender can be authenticated (a later issue).

TRUST: origin.tenant was established by ingress (AUTH or connector IP or
the recipient's accepted domain).

SEE ALSO: route/rules.py (rule "relay-unauthenticated"), tenancy.py
"""

from __future__ import annotations

from ..model import ForwardFact, Message, domain_of


async def check(msg: Message, ctx) -> ForwardFact:
    tenant = msg.origin.tenant
    d = ctx.directory
    sender_domain = msg.envelope.sender_domain
    external = sum(1 for r in msg.envelope.recipients if not d.is_accepted(tenant, domain_of(r.address)))
    # The tenant's own domain as sender makes mail the tenant's own only when the
    # tenant handed it to us (AUTH, its connector). From the internet (a forwarding
    # address, a skip-listed filter) anyone can write our domain in MAIL FROM: such
    # mail is forwarded like any other and must authenticate to keep the normal pool.
    own = d.is_accepted(tenant, sender_domain) and (
        msg.origin.kind in ("dsn", "cli") or d.submitted_by_tenant(msg.origin.auth_user, msg.origin.client_ip))
    if msg.origin.kind == "alert":          # our own alert to the tenant's admins
        return ForwardFact(False, sender_domain, tenant, external)
    # A null reverse-path names no sender to vouch for (or not): the DSN rule covers it.
    forwarded = bool(sender_domain) and external > 0 and not own
    return ForwardFact(forwarded, sender_domain, tenant, external)
