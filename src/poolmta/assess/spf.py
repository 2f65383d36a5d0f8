"""assess.spf - SPF (RFC 7208): check_host() on the shared async resolver

Evaluates the Sender Policy Framework for a client IP and a sender: the
record is fetched, parsed completely (a syntax error anywhere is a
permerror, §4.6), then its terms are evaluated left to right (§4.6.2):
mechanisms (§5), redirect= and exp= (§6), macros (§7). Every DNS question
goes through the one ``Resolver`` every stage shares (and its cache), so
nothing blocks the event loop and no thread is held while DNS answers.

Why not pyspf: it is blocking and takes its DNS from a module-global hook,
so it would need a thread per evaluation plus a sync-to-async bridge for
every query. This module is held instead to the same conformance suite
pyspf passes: the RFC 7208 test suite, all 203 tests, run in the default
test run (tests/unit/test_spf_suite.py, DNS answered from the suite's zone
data).

Limits (§4.6.4), which bound the work any record can cause:
- at most 10 terms that query DNS (include, a, mx, ptr, exists, redirect),
  counted over the whole evaluation including nested records: then permerror;
- at most 2 "void lookups" (a term's query answered NXDOMAIN or no data):
  then permerror;
- an mx term with more than 10 MX records: permerror; a ptr term (and the
  %{p} macro) looks at the first 10 names only;
- a wall-clock deadline for the whole evaluation (the caller's
  ``auth.spf_timeout``): then temperror.
A DNS failure (SERVFAIL, timeout) is temperror (§2.6.6), never "no record".

TRUST: the records, names and addresses in DNS are controlled by whoever
owns the sender's domain (or the client's reverse zone); the sender and the
HELO name come from the SMTP client. Nothing here trusts either beyond the
limits above; expanded names are length-checked before any query.

STANDARDS: RFC 7208 §2.3-2.6 (identities, results), §4 (check_host), §5
(mechanisms), §6 (redirect, exp), §7 (macros), §4.6.4 (limits); RFC 5952
(%{c} of an IPv6 address).

CONFIG: auth.spf_timeout (the caller, assess/inbound_auth.py, passes it)

SEE ALSO: assess/inbound_auth.py, dns.py, tests/unit/test_spf_suite.py
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import time
from dataclasses import dataclass
from urllib.parse import quote

from ..dns import Rcode, Resolver

MAX_DNS_TERMS = 10          # §4.6.4: include a mx ptr exists redirect
MAX_VOID_LOOKUPS = 2        # §4.6.4
MAX_NAMES = 10              # §4.6.4: MX records per mx term; PTR names per ptr term / %{p}
MAX_DEPTH = 20              # nesting of include/redirect (the term limit stops loops first)

DEFAULT_EXPLANATION = "SPF fail: the sending host is not authorised by the domain's SPF record"

_QUALIFIER = {"+": "pass", "-": "fail", "~": "softfail", "?": "neutral"}
_MECHANISMS = frozenset({"all", "include", "a", "mx", "ptr", "ip4", "ip6", "exists"})

_Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class SpfResult:
    result: str                 # pass fail softfail neutral none temperror permerror (§2.6)
    identity: str = ""          # "mailfrom" | "helo"
    domain: str = ""            # the domain whose policy was evaluated (lower case)
    mechanism: str = ""         # the term that decided, as written ("" = no match, default neutral)
    explanation: str = ""       # for fail: the exp= text (§6.2) or the default explanation
    detail: str = ""            # why: the error behind a permerror / temperror


class _PermError(Exception):
    pass


class _TempError(Exception):
    pass


# ---- parsing (§4.6, §5, §6, §7.1) --------------------------------------------

_VERSION = re.compile(r"v=spf1(?: |$)", re.IGNORECASE)
_MODIFIER = re.compile(r"([A-Za-z][A-Za-z0-9_.\-]*)=(.*)", re.DOTALL)
_DIRECTIVE = re.compile(r"([+\-~?]?)([A-Za-z][A-Za-z0-9]*)(.*)", re.DOTALL)
_MACRO = re.compile(r"%(?:\{([A-Za-z])([0-9]*)([rR]?)([.\-+,/_=]*)\}|([%_\-]))")
_TOPLABEL = re.compile(r"(?:[A-Za-z0-9]*[A-Za-z][A-Za-z0-9]*|[A-Za-z0-9]+-[A-Za-z0-9\-]*[A-Za-z0-9])")
_DOMAIN_END = re.compile(r"\.(?:" + _TOPLABEL.pattern + r")\.?$")
_CIDR_SUFFIX = re.compile(r"(?:/([0-9]+))?(?://([0-9]+))?$")
_DOMAIN_SPEC_LETTERS = frozenset("slodiphv")     # c r t only in exp text (§7.1)


@dataclass(frozen=True)
class _Macro:
    letter: str                 # as written: upper case means URL-escape the value
    digits: int                 # 0 = all parts
    reverse: bool
    delimiters: str


_Token = str | _Macro           # a literal, or a macro to expand


def _tokenise(text: str, explain: bool) -> tuple[tuple[_Token, ...], str]:
    """Tokens of a macro-string (§7.1), and the literal text after its last macro-expand."""
    tokens: list[_Token] = []
    literal: list[str] = []
    tail: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "%":
            m = _MACRO.match(text, i)
            if not m:
                raise _PermError(f"bad macro at {text[i:i + 12]!r}")
            tail = []
            if m.group(5):
                literal.append({"%": "%", "_": " ", "-": "%20"}[m.group(5)])
            else:
                letter, digits = m.group(1), m.group(2)
                if letter.lower() not in _DOMAIN_SPEC_LETTERS and not (explain and letter.lower() in "crt"):
                    raise _PermError(f"macro letter {letter!r} not allowed here")
                if digits and int(digits) == 0:
                    raise _PermError("macro transformer of 0 parts")
                if literal:
                    tokens.append("".join(literal))
                    literal = []
                tokens.append(_Macro(letter, int(digits or 0), bool(m.group(3)), m.group(4)))
            i = m.end()
        elif "\x21" <= ch <= "\x7e" or (explain and ch == " "):
            literal.append(ch)
            tail.append(ch)
            i += 1
        else:
            raise _PermError(f"character {ch!r} not allowed in SPF (7-bit visible ASCII only)")
    if literal:
        tokens.append("".join(literal))
    return tuple(tokens), "".join(tail)


def _macro_string(text: str, *, explain: bool = False) -> tuple[_Token, ...]:
    """Tokenise a macro-string; ``explain`` allows SP and the c r t letters (explain-string, §7.1)."""
    return _tokenise(text, explain)[0]


def _domain_spec(text: str) -> tuple[_Token, ...]:
    """A domain-spec must end in a macro-expand or in "." toplabel ["."] (§7.1)."""
    if not text:
        raise _PermError("empty domain-spec")
    tokens, tail = _tokenise(text, False)
    if tail and not _DOMAIN_END.search(tail):
        raise _PermError(f"domain-spec {text!r} does not end in a macro or a valid top label")
    return tokens


def _cidr(text: str | None, limit: int) -> int:
    if text is None:
        return limit
    if (len(text) > 1 and text[0] == "0") or int(text) > limit:
        raise _PermError(f"bad CIDR length /{text}")
    return int(text)


@dataclass(frozen=True)
class _Mechanism:
    result: str                 # the qualifier's result
    kind: str                   # all include a mx ptr ip4 ip6 exists
    text: str                   # as written
    spec: tuple[_Token, ...] = ()   # domain-spec; () = the current domain
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None
    cidr4: int = 32
    cidr6: int = 128


@dataclass(frozen=True)
class _Record:
    mechanisms: tuple[_Mechanism, ...]
    redirect: tuple[_Token, ...] | None
    exp: tuple[_Token, ...] | None
    has_all: bool


def parse_record(record: str) -> _Record:
    """Parse a whole SPF record (after the version check); any syntax error raises."""
    mechanisms: list[_Mechanism] = []
    redirect = exp = None
    for term in record[6:].split(" "):
        if not term:
            continue                        # 1*SP between terms, trailing SP allowed
        mod = _MODIFIER.fullmatch(term)
        if mod:
            name, value = mod.group(1).lower(), mod.group(2)
            if name in ("redirect", "exp"):
                if (redirect if name == "redirect" else exp) is not None:
                    raise _PermError(f"more than one {name}= modifier")
                if name == "redirect":
                    redirect = _domain_spec(value)
                else:
                    exp = _domain_spec(value)
            else:
                _macro_string(value)        # unknown modifiers are ignored, but must be well-formed
            continue
        d = _DIRECTIVE.fullmatch(term)
        if not d or d.group(2).lower() not in _MECHANISMS:
            raise _PermError(f"unknown mechanism {term!r}")
        mechanisms.append(_mechanism(_QUALIFIER.get(d.group(1), "pass"), d.group(2).lower(), d.group(3), term))
    return _Record(tuple(mechanisms), redirect, exp, any(m.kind == "all" for m in mechanisms))


def _mechanism(result: str, kind: str, rest: str, text: str) -> _Mechanism:
    if kind == "all":
        if rest:
            raise _PermError(f"bad term {text!r}")
        return _Mechanism(result, kind, text)
    if kind in ("include", "exists"):
        if not rest.startswith(":"):
            raise _PermError(f"{kind} needs a domain: {text!r}")
        return _Mechanism(result, kind, text, _domain_spec(rest[1:]))
    if kind in ("a", "mx"):
        m = _CIDR_SUFFIX.search(rest)
        spec, cidr4, cidr6 = rest[:m.start()], _cidr(m.group(1), 32), _cidr(m.group(2), 128)
        if spec and not spec.startswith(":"):
            raise _PermError(f"bad term {text!r}")
        return _Mechanism(result, kind, text, _domain_spec(spec[1:]) if spec else (), cidr4=cidr4, cidr6=cidr6)
    if kind == "ptr":
        if rest and not rest.startswith(":"):
            raise _PermError(f"bad term {text!r}")
        return _Mechanism(result, kind, text, _domain_spec(rest[1:]) if rest else ())
    # ip4 / ip6
    if not rest.startswith(":"):
        raise _PermError(f"{kind} needs a network: {text!r}")
    address, slash, length = rest[1:].partition("/")
    if slash and not re.fullmatch(r"[0-9]+", length):
        raise _PermError(f"bad CIDR length in {text!r}")
    try:
        if kind == "ip4":
            net = ipaddress.ip_network(f"{ipaddress.IPv4Address(address)}/{_cidr(length or None, 32)}", strict=False)
        else:
            if "%" in address:
                raise ValueError("scope")
            net = ipaddress.ip_network(f"{ipaddress.IPv6Address(address)}/{_cidr(length or None, 128)}", strict=False)
    except ValueError:
        raise _PermError(f"bad network in {text!r}") from None
    return _Mechanism(result, kind, text, network=net)


# ---- names -------------------------------------------------------------------

def valid_domain(domain: str) -> bool:
    """§4.3: a multi-label name, labels of 1-63 octets, no address literal: else the result is none."""
    d = domain[:-1] if domain.endswith(".") else domain
    if not d or len(d) > 253 or d.startswith("["):
        return False
    labels = d.split(".")
    return len(labels) > 1 and all(0 < len(label) <= 63 for label in labels)


def _queryable(name: str) -> bool:
    d = name[:-1] if name.endswith(".") else name
    return bool(d) and len(d) <= 253 and all(0 < len(label) <= 63 for label in d.split("."))


def _truncate(name: str) -> str:
    """§7.3: an expanded name over 253 characters loses labels on the left until it fits."""
    while len(name.rstrip(".")) > 253 and "." in name:
        name = name.partition(".")[2]
    return name


def _nibbles(text: str, ip: _Address) -> str:
    """The 32 hex digits of an IPv6 address for %{i}, in the letter case the address was written in
    (the suite's reference implementation keeps it; DNS does not care)."""
    text = text.strip().removeprefix("[").removesuffix("]").removeprefix("IPv6:")
    if "." in text or text.count("::") > 1:
        return ip.exploded.replace(":", "")
    head, sep, tail = text.partition("::")
    h = head.split(":") if head else []
    t = tail.split(":") if tail else []
    groups = h + ["0"] * (8 - len(h) - len(t)) + t if sep else h
    digits = "".join(g.zfill(4) for g in groups)
    return digits if len(digits) == 32 else ip.exploded.replace(":", "")


def _norm(name: str) -> str:
    return name.rstrip(".").lower()


# ---- evaluation ----------------------------------------------------------------

class _Evaluation:
    """One check_host() run with its counters; nested include/redirect share them."""

    def __init__(self, resolver: Resolver, ip: _Address, sender: str, helo: str, receiver: str,
                 now: float, default_explanation: str, ip_text: str = ""):
        self.resolver = resolver
        self.ip = ip
        self.ip_text = ip_text or str(ip)
        self.sender = sender
        self.local, _, self.sender_domain = sender.rpartition("@")
        self.helo = helo
        self.receiver = receiver or "unknown"
        self.now = now
        self.default_explanation = default_explanation
        self.terms = 0
        self.voids = 0
        self._validated: tuple[str, ...] | None = None

    # -- DNS

    async def _query(self, name: str, rdtype: str, *, void: bool) -> tuple:
        """Records of a query; () for NXDOMAIN/no data (a void lookup when ``void``); raises on DNS failure."""
        if not _queryable(name):
            return ()
        ans = await self.resolver.query(_norm(name), rdtype)
        if ans.rcode == Rcode.TEMPERROR:
            raise _TempError(f"DNS {rdtype} {_norm(name)}: {ans.detail or 'temporary failure'}")
        records = ans.records if ans.rcode == Rcode.OK else ()
        if void and not records:
            self.voids += 1
            if self.voids > MAX_VOID_LOOKUPS:
                raise _PermError(f"more than {MAX_VOID_LOOKUPS} void lookups (RFC 7208 §4.6.4)")
        return records

    async def _addresses(self, name: str, *, void: bool) -> list[_Address]:
        records = await self._query(name, "A" if self.ip.version == 4 else "AAAA", void=void)
        out = []
        for r in records:
            try:
                out.append(ipaddress.ip_address(r))
            except ValueError:
                continue
        return out

    def _count_term(self, term: str) -> None:
        self.terms += 1
        if self.terms > MAX_DNS_TERMS:
            raise _PermError(f"more than {MAX_DNS_TERMS} DNS-querying terms at {term!r} (RFC 7208 §4.6.4)")

    async def _validated_names(self, *, void: bool) -> tuple[str, ...]:
        """§5.5: names of the PTR records of the IP whose addresses include the IP (first 10 names)."""
        try:
            names = await self._query(self.ip.reverse_pointer, "PTR", void=void)
        except _TempError:
            return ()                       # §5.5: a DNS error here is "no match"
        out = []
        for name in names[:MAX_NAMES]:
            try:
                if self.ip in await self._addresses(name, void=False):
                    out.append(_norm(name))
            except _TempError:
                continue                    # §5.5: that name is skipped
        return tuple(out)

    # -- macros

    async def _expand(self, tokens: tuple[_Token, ...], domain: str) -> str:
        out = []
        for t in tokens:
            if isinstance(t, str):
                out.append(t)
                continue
            value = await self._macro_value(t.letter.lower(), domain)
            parts = re.split("[" + re.escape(t.delimiters or ".") + "]", value)
            if t.reverse:
                parts.reverse()
            if t.digits:
                parts = parts[-t.digits:]
            value = ".".join(parts)
            if t.letter.isupper():
                value = quote(value, safe="")
            out.append(value)
        return "".join(out)

    async def _macro_value(self, letter: str, domain: str) -> str:
        if letter == "s":
            return self.sender
        if letter == "l":
            return self.local
        if letter == "o":
            return self.sender_domain
        if letter == "d":
            return domain
        if letter == "i":
            if self.ip.version == 4:
                return str(self.ip)
            return ".".join(_nibbles(self.ip_text, self.ip))
        if letter == "v":
            return "in-addr" if self.ip.version == 4 else "ip6"
        if letter == "h":
            return self.helo
        if letter == "c":
            return str(self.ip)
        if letter == "r":
            return self.receiver
        if letter == "t":
            return str(int(self.now))
        if letter == "p":
            if self._validated is None:
                self._validated = await self._validated_names(void=False)
            d = _norm(domain)
            for name in self._validated:
                if name == d or name.endswith("." + d):
                    return name
            return self._validated[0] if self._validated else "unknown"
        raise _PermError(f"unknown macro letter {letter!r}")   # unreachable: checked when parsed

    async def _target(self, spec: tuple[_Token, ...], domain: str) -> str:
        return _truncate(await self._expand(spec, domain)) if spec else domain

    # -- check_host

    async def check_host(self, domain: str, depth: int = 0, *, explain: bool = True) -> tuple[str, str, str]:
        """(result, explanation, deciding term); permerror/temperror are raised."""
        if depth > MAX_DEPTH:
            raise _PermError("include/redirect nesting too deep")
        if not valid_domain(domain):
            return "none", "", ""
        records = await self._query(domain, "TXT", void=False)
        spf = [r for r in records if _VERSION.match(r)]
        if not spf:
            return "none", "", ""
        if len(spf) > 1:
            raise _PermError(f"{len(spf)} SPF records for {_norm(domain)} (RFC 7208 §4.5)")
        record = parse_record(spf[0])
        for m in record.mechanisms:
            if await self._matches(m, domain, depth):
                explanation = ""
                if m.result == "fail" and explain:
                    explanation = await self._explanation(record.exp, domain)
                return m.result, explanation, m.text
        if record.redirect is not None and not record.has_all:
            self._count_term("redirect=")
            target = await self._target(record.redirect, domain)
            result = await self.check_host(target, depth + 1, explain=explain)
            if result[0] == "none":
                raise _PermError(f"redirect={_norm(target)}: no SPF record there")
            return result
        return "neutral", "", ""

    async def _matches(self, m: _Mechanism, domain: str, depth: int) -> bool:
        ip = self.ip
        if m.kind == "all":
            return True
        if m.kind in ("ip4", "ip6"):
            return m.network.version == ip.version and ip in m.network
        self._count_term(m.text)
        target = await self._target(m.spec, domain)
        if m.kind == "include":
            result, _, _ = await self.check_host(target, depth + 1, explain=False)
            if result == "pass":
                return True
            if result in ("fail", "softfail", "neutral"):
                return False
            raise _PermError(f"include:{_norm(target)}: no SPF record there")     # none
        if m.kind == "exists":
            # §5.7: always an A query, whatever the client's address family.
            return bool(await self._query(target, "A", void=True))
        if m.kind == "a":
            return self._in_any(await self._addresses(target, void=True), m)
        if m.kind == "mx":
            exchanges = await self._query(target, "MX", void=True)
            if len(exchanges) > MAX_NAMES:
                raise _PermError(f"mx:{_norm(target)}: more than {MAX_NAMES} MX records (RFC 7208 §4.6.4)")
            for _, host in exchanges:
                if host and self._in_any(await self._addresses(host, void=False), m):
                    return True
            return False
        if m.kind == "ptr":
            t = _norm(target)
            return any(n == t or n.endswith("." + t) for n in await self._validated_names(void=True))
        raise _PermError(f"unknown mechanism {m.text!r}")       # unreachable: parse_record checks

    def _in_any(self, addresses: list[_Address], m: _Mechanism) -> bool:
        length = m.cidr4 if self.ip.version == 4 else m.cidr6
        return any(a.version == self.ip.version and self.ip in ipaddress.ip_network(f"{a}/{length}", strict=False)
                   for a in addresses)

    async def _explanation(self, exp: tuple[_Token, ...] | None, domain: str) -> str:
        """§6.2: the exp= text; any problem fetching or expanding it means the default."""
        if exp is None:
            return self.default_explanation
        try:
            target = await self._target(exp, domain)
            records = await self._query(target, "TXT", void=False)
            if len(records) != 1:
                return self.default_explanation
            return await self._expand(_macro_string(records[0], explain=True), domain)
        except (_PermError, _TempError):
            return self.default_explanation


# ---- entry points --------------------------------------------------------------

def client_address(ip: str) -> _Address | None:
    """The client IP as SPF compares it: an IPv4-mapped IPv6 address is its IPv4 address."""
    try:
        addr = ipaddress.ip_address(ip.strip().removeprefix("[").removesuffix("]").removeprefix("IPv6:"))
    except ValueError:
        return None
    if addr.version == 6 and addr.ipv4_mapped:
        return addr.ipv4_mapped
    return addr


async def check_host(resolver: Resolver, ip: str, domain: str, sender: str, *, helo: str = "",
                     receiver: str = "", timeout: float = 20.0, now: float | None = None,
                     default_explanation: str = DEFAULT_EXPLANATION, identity: str = "mailfrom") -> SpfResult:
    """RFC 7208 §4: check_host(<ip>, <domain>, <sender>). Never raises."""
    addr = client_address(ip)
    dom = _norm(domain)
    if addr is None:
        return SpfResult("none", identity, dom, detail=f"no usable client IP ({ip!r})")
    ev = _Evaluation(resolver, addr, sender, helo, receiver, time.time() if now is None else now,
                     default_explanation, ip if addr.version == 6 else "")
    try:
        async with asyncio.timeout(timeout):
            result, explanation, term = await ev.check_host(domain)
    except _PermError as e:
        return SpfResult("permerror", identity, dom, detail=str(e))
    except _TempError as e:
        return SpfResult("temperror", identity, dom, detail=str(e))
    except TimeoutError:
        return SpfResult("temperror", identity, dom, detail=f"SPF evaluation took more than {timeout:g}s")
    return SpfResult(result, identity, dom, term, explanation)


async def check(resolver: Resolver, ip: str, mail_from: str, helo: str, **kw) -> SpfResult:
    """SPF for the MAIL FROM identity, or for the HELO identity when the reverse-path is null (§2.3, §2.4).

    A reverse-path without a local part counts as postmaster (§4.3).
    """
    if mail_from:
        local, at, domain = mail_from.rpartition("@")
        if not at:
            local, domain = "", mail_from
        return await check_host(resolver, ip, domain, f"{local or 'postmaster'}@{domain}", helo=helo,
                                identity="mailfrom", **kw)
    return await check_host(resolver, ip, helo, f"postmaster@{helo}", helo=helo, identity="helo", **kw)
