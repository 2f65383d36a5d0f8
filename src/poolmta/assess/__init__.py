"""assess - run the independent checks on a message, concurrently, into one Facts

Each check is ``async def check(msg, ctx) -> SomeFact``: it finds out one
thing and decides nothing. They share one resolver (with its cache) through
``ctx``.

SEE ALSO: model.Facts, route/decide.py
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from ..config import AuthConfig, SpamConfig
from ..dns import Resolver
from ..model import Facts, LimitFact, Message
from ..tenancy import Directory
from . import dsn, forwarded, inbound_auth, source_domain, spam


@dataclass(frozen=True)
class Context:
    resolver: Resolver
    directory: Directory
    auth: AuthConfig = AuthConfig()
    hostname: str = "poolmta.localhost"     # our host: the authserv-id when auth.authserv_id is empty
    spam: SpamConfig = SpamConfig()
    limits: object = None                   # assess.limits.Limits (counters in the shared state), or None: not counted


async def assess(msg: Message, ctx: Context) -> Facts:
    d, sd, sp, fw, ia = await asyncio.gather(
        dsn.check(msg, ctx), source_domain.check(msg, ctx), spam.check(msg, ctx), forwarded.check(msg, ctx),
        inbound_auth.check(msg, ctx))
    # Counted last, and not at all for a message about to be deferred (451): its
    # retries must not add up against the sender and the tenant.
    lim = LimitFact() if (sp.failed and sp.on_failure == "defer") else await _limits(msg, ctx)
    return Facts(dsn=d, source_domain=sd, spam=sp, forwarded=fw, inbound_auth=ia, limits=lim)


async def _limits(msg: Message, ctx: Context) -> LimitFact:
    # Counting is the one check with a side effect: it runs once, at accept
    # (`poolmta route` has no Limits and counts nothing).
    return await ctx.limits.check(msg) if ctx.limits is not None else LimitFact()
