"""dns - the one asynchronous resolver every stage shares, with a cache

assess (source domain) and deliver (MX) ask DNS through one ``Resolver``.
The answer says *how* the lookup ended, because the difference between
"no such record" (NXDOMAIN, NODATA) and "could not find out" (SERVFAIL,
timeout) decides routing: the first is a fact, the second is re-checked later
and never guessed.

TRUST: DNS answers are untrusted data; names are lower-cased and the
trailing dot removed.

STANDARDS: RFC 1035, RFC 2308 (negative caching), RFC 7505 (null MX).

CONFIG: dns.nameservers, dns.timeout, dns.cache_ttl_max

SEE ALSO: assess/source_domain.py, deliver/mx.py
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.rdatatype
import dns.resolver

from .clock import Clock, SystemClock


class Rcode(StrEnum):
    OK = "ok"
    NXDOMAIN = "nxdomain"
    NODATA = "nodata"
    TEMPERROR = "temperror"


@dataclass(frozen=True)
class Answer:
    rcode: Rcode
    records: tuple = ()          # MX: ((pref, host), ...); A/AAAA: (ip, ...)
    detail: str = ""

    @property
    def definite_absence(self) -> bool:
        return self.rcode in (Rcode.NXDOMAIN, Rcode.NODATA)


class Resolver(Protocol):
    async def query(self, name: str, rdtype: str) -> Answer: ...


def _parse(rdtype: str, rrset) -> tuple:
    if rdtype == "MX":
        return tuple(sorted((r.preference, r.exchange.to_text().rstrip(".").lower()) for r in rrset))
    return tuple(r.to_text() for r in rrset)


class CachingResolver:
    """dnspython's async resolver with a small TTL-bounded cache of our own.

    The cache keeps negative answers too (RFC 2308), but never a temperror:
    a failure must be asked again.
    """

    def __init__(self, nameservers: list[tuple[str, int]] | None = None, timeout: float = 5.0,
                 cache_ttl_max: float = 3600.0, clock: Clock | None = None):
        if nameservers:
            r = dns.asyncresolver.Resolver(configure=False)
            r.nameservers = [dns.nameserver.Do53Nameserver(h, p) for h, p in nameservers]
        else:
            r = dns.asyncresolver.Resolver()
        r.lifetime = timeout
        r.timeout = timeout
        self._r = r
        self._clock = clock or SystemClock()
        self._ttl_max = cache_ttl_max
        self._cache: dict[tuple[str, str], tuple[float, Answer]] = {}
        self._inflight: dict[tuple[str, str], asyncio.Future] = {}

    async def query(self, name: str, rdtype: str) -> Answer:
        key = (name.rstrip(".").lower(), rdtype)
        hit = self._cache.get(key)
        if hit and hit[0] > self._clock.now():
            return hit[1]
        fut = self._inflight.get(key)
        if fut is not None:                     # coalesce concurrent identical lookups
            return await asyncio.shield(fut)
        fut = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        try:
            answer, ttl = await self._lookup(key[0], rdtype)
            if answer.rcode != Rcode.TEMPERROR:
                self._cache[key] = (self._clock.now() + min(ttl, self._ttl_max), answer)
            fut.set_result(answer)
            return answer
        except BaseException as e:
            fut.set_exception(e)
            fut.exception()                     # mark retrieved
            raise
        finally:
            del self._inflight[key]

    async def _lookup(self, name: str, rdtype: str) -> tuple[Answer, float]:
        try:
            ans = await self._r.resolve(name + ".", rdtype, search=False)
            return Answer(Rcode.OK, _parse(rdtype, ans.rrset)), float(ans.rrset.ttl)
        except dns.resolver.NXDOMAIN as e:
            return Answer(Rcode.NXDOMAIN, detail=str(e)), _neg_ttl(e)
        except dns.resolver.NoAnswer as e:
            return Answer(Rcode.NODATA, detail=str(e)), 300.0
        except (dns.resolver.NoNameservers, dns.exception.Timeout, dns.resolver.LifetimeTimeout) as e:
            return Answer(Rcode.TEMPERROR, detail=type(e).__name__ + ": " + str(e)[:200]), 0.0
        except dns.exception.DNSException as e:
            return Answer(Rcode.TEMPERROR, detail=type(e).__name__ + ": " + str(e)[:200]), 0.0


def _neg_ttl(e: dns.resolver.NXDOMAIN) -> float:
    try:
        for resp in e.responses().values():
            for rr in resp.authority:
                if rr.rdtype == dns.rdatatype.SOA:
                    return float(min(rr.ttl, rr[0].minimum))
    except Exception:  # the TTL is an optimisation only
        pass
    return 300.0


class StaticResolver:
    """An in-memory zone for unit tests of pure logic (integration tests use a
    real DNS server on loopback). ``zone`` maps (name, type) to records, or to
    an Rcode for failures: {("example.org", "MX"): ((10, "mx.example.org"),),
    ("broken.example", "MX"): Rcode.TEMPERROR}. Names absent from every key
    are NXDOMAIN; a known name without that type is NODATA."""

    def __init__(self, zone: dict[tuple[str, str], tuple | Rcode]):
        self.zone = {(n.lower().rstrip("."), t): v for (n, t), v in zone.items()}
        self.names = {n for n, _ in self.zone}

    async def query(self, name: str, rdtype: str) -> Answer:
        name = name.lower().rstrip(".")
        v = self.zone.get((name, rdtype))
        if isinstance(v, Rcode):
            return Answer(v)
        if v is not None:
            return Answer(Rcode.OK, tuple(v))
        return Answer(Rcode.NODATA if name in self.names else Rcode.NXDOMAIN)


def make_resolver(nameservers: tuple[str, ...], timeout: float, cache_ttl_max: float, clock: Clock) -> CachingResolver:
    from .config import parse_hostport
    ns = [parse_hostport(n, 53) for n in nameservers]
    return CachingResolver(ns or None, timeout, cache_ttl_max, clock)
