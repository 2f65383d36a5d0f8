"""dns - the one asynchronous resolver every stage shares, with a cache

assess (source domain) and deliver (MX) ask DNS through one ``Resolver``.
The answer says *how* the lookup ended, because the difference between
"no such record" (NXDOMAIN, NODATA) and "could not find out" (SERVFAIL,
timeout) decides routing: the first is a fact, the second is re-checked later
and never guessed.

``CachingResolver`` keeps answers (negative ones too, RFC 2308; never a
temporary failure) for their TTL, at most ``dns.cache_ttl_max``. The cache
is bounded: every ``sweep_every`` inserts, or whenever it grows past
``max_entries``, expired entries are dropped; if it is still too big, the
oldest entries go until it is at 90 % of ``max_entries``. So memory stays
bounded however many names the traffic brings, and a sweep costs one pass
over the cache every so many inserts, not one per query. Concurrent
identical lookups share one query.

TRUST: DNS answers are untrusted data; names are lower-cased and the
trailing dot removed.

STANDARDS: RFC 1035, RFC 2308 (negative caching), RFC 7505 (null MX), RFC 7208 §3.3 and
RFC 6376 §3.6.2.2 (a TXT record's character-strings are joined with nothing between them).

CONFIG: dns.nameservers, dns.timeout, dns.cache_ttl_max (max_entries and
sweep_every are constructor arguments with defaults of 10000 and 1000)

SEE ALSO: assess/source_domain.py, assess/spf.py, assess/inbound_auth.py, deliver/mx.py
"""

from __future__ import annotations

import asyncio
import itertools
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
    records: tuple = ()          # MX: ((pref, host), ...); A/AAAA: (ip, ...); TXT: (text, ...); PTR: (host, ...)
    detail: str = ""

    @property
    def definite_absence(self) -> bool:
        return self.rcode in (Rcode.NXDOMAIN, Rcode.NODATA)


class Resolver(Protocol):
    async def query(self, name: str, rdtype: str) -> Answer: ...


def _parse(rdtype: str, rrset) -> tuple:
    if rdtype == "MX":
        return tuple(sorted((r.preference, r.exchange.to_text().rstrip(".").lower()) for r in rrset))
    if rdtype == "TXT":
        # One str per record, its character-strings joined with nothing between them
        # (RFC 7208 §3.3, RFC 6376 §3.6.2.2). Octets that are not UTF-8 become U+FFFD: still
        # not ASCII, so an SPF record or DKIM key carrying them stays invalid.
        return tuple(b"".join(r.strings).decode("utf-8", "replace") for r in rrset)
    if rdtype == "PTR":
        # In the order the server gave them (RFC 7208 §4.6.4 looks at the first 10 only).
        return tuple(r.target.to_text().rstrip(".").lower() for r in rrset)
    return tuple(r.to_text() for r in rrset)


class CachingResolver:
    """dnspython's async resolver with a small TTL-bounded, size-bounded cache of our own.

    The cache keeps negative answers too (RFC 2308), but never a temperror:
    a failure must be asked again.
    """

    def __init__(self, nameservers: list[tuple[str, int]] | None = None, timeout: float = 5.0,
                 cache_ttl_max: float = 3600.0, clock: Clock | None = None, *, max_entries: int = 10_000,
                 sweep_every: int = 1_000):
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
        self._cache: dict[tuple[str, str], tuple[float, Answer]] = {}     # insertion order = age
        self._max_entries = max(1, max_entries)
        self._sweep_every = max(1, sweep_every)
        self._inserts = 0                       # since the last sweep
        self._inflight: dict[tuple[str, str], asyncio.Future] = {}

    @property
    def cache_size(self) -> int:
        return len(self._cache)

    def _store(self, key: tuple[str, str], expires: float, answer: Answer) -> None:
        self._cache.pop(key, None)              # re-inserted at the young end
        self._cache[key] = (expires, answer)
        self._inserts += 1
        if self._inserts >= self._sweep_every or len(self._cache) > self._max_entries:
            self._sweep()

    def _sweep(self) -> None:
        """Drop expired entries; then, if still too many, the oldest ones."""
        self._inserts = 0
        now = self._clock.now()
        for k in [k for k, (expires, _) in self._cache.items() if expires <= now]:
            del self._cache[k]
        if len(self._cache) > self._max_entries:
            # Down to 90 % of the cap, so a full cache is not swept on every insert.
            excess = len(self._cache) - max(1, (self._max_entries * 9) // 10)
            for k in list(itertools.islice(self._cache, excess)):
                del self._cache[k]

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
                self._store(key, self._clock.now() + min(ttl, self._ttl_max), answer)
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
