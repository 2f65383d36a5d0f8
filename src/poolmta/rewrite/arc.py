"""rewrite.arc - ARC-seal forwarded mail we let through (RFC 8617)

When we forward somebody else's mail, SPF and often DKIM no longer hold at
the next hop. An ARC set records what we saw when the message came in and
vouches for it with our signature, so the next receiver can trust our
verdict if it trusts us. ``seal`` prepends one ARC set, instance ``i=N``
(one more than the highest instance already in the message, 1 if none):

- ARC-Authentication-Results: ``i=N; `` + the Authentication-Results value
  we computed at ingress (``authserv-id; spf=pass ...``), with its ``arc=``
  result set to the chain status (added after the authserv-id when the
  value has none; comments and the order of results are kept);
- ARC-Message-Signature: like a DKIM signature (``c=relaxed/relaxed``) over
  the configured header fields the message has (From always) and the body;
- ARC-Seal: over all ARC sets in instance order, with ``cv=`` ``none`` for
  i=1, else ``pass`` or ``fail`` for the chain as it came to us. A failed
  chain is sealed over our set only (RFC 8617 §5.1.2; the suite's
  ``i1_base_fail`` and ``i2_base_fail`` cases).

The chain status is the caller's ``cv`` when given (the ingress already
validated the chain), else it is validated here with dkimpy's ARC verifier,
which looks keys up in DNS through ``dnsfunc`` (blocking: call ``seal``
from a worker thread; ``make_dnsfunc`` builds one on the configured
nameservers). No set is added when an earlier sealer already marked the
chain failed (an AS with cv=fail ends the chain: validators stop there,
and the suite's ``no_additional_sig`` case expects no new set), past
instance 50, or when the domain's key is not RSA (ARC seals are
rsa-sha256, the only ARC algorithm dkimpy and common verifiers know): each
of those is a ``SealProblem`` with a ``code``, never an exception. The
caller sends the message on without a new set and traces why.

Hashing, canonicalisation and the choice of header instances are dkimpy's
(``dkim.ARC``: its AR parsing is replaced by our own value, its cv by ours).
``compact=True`` writes the tags sorted and unfolded (dkimpy's
"standardize"), the layout of the ValiMail ARC test suite; the default
folds lines the way dkimpy folds DKIM signatures.

TRUST: ``content`` is untrusted; existing ARC sets are only trusted as far
as they verify. ``authres`` is ours (made at ingress) but is still checked
to be one header value for our authserv-id.

STANDARDS: RFC 8617 (ARC), RFC 8601 (Authentication-Results), RFC 6376
(signing, canonicalisation)

CONFIG: dkim.arc (whether the pipeline seals), dkim.headers (AMS fields),
dkim.key_dir; the authserv-id is the host name stamped at ingress

SEE ALSO: rewrite/keys.py, rewrite/dkim.py, pipeline.py
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from typing import Callable, Iterable

import dkim as dkimpy
from dkim.canonicalization import CanonicalizationPolicy
from dkim.crypto import parse_pem_private_key

from ..config import DkimConfig
from .dkim import NEVER_SIGN, header_names, header_values, _linesep
from .keys import Key, KeyProblem

INSTANCE_LIMIT = 50
ARC_HEADERS = ("arc-seal", "arc-message-signature", "arc-authentication-results")
DEFAULT_HEADERS = DkimConfig().headers

DnsFunc = Callable[..., "bytes | None"]     # dkimpy's: dnsfunc(name: bytes, timeout=5) -> TXT bytes or None


@dataclass(frozen=True)
class SealProblem:
    """Why no ARC set was added (the message goes on without one)."""
    domain: str
    reason: str
    code: str = "error"   # no-key | key-type | chain-terminated | instance-limit | authres | cv | error

    def __str__(self) -> str:
        return f"not ARC-sealed for {self.domain}: {self.reason}"


def make_dnsfunc(nameservers: Iterable[tuple[str, int]] | None = None, timeout: float = 5.0) -> DnsFunc:
    """A dkimpy ``dnsfunc`` (blocking TXT lookup) asking NAMESERVERS ((host, port), ...),
    or the system's resolvers when None: the first TXT record's strings joined,
    None for NXDOMAIN / no record, ``dkim.DnsTimeoutError`` when DNS did not answer
    within TIMEOUT (also the cap of the timeout dkimpy asks for)."""
    import dns.exception
    import dns.nameserver
    import dns.rdatatype
    import dns.resolver

    servers = list(nameservers or ())
    if servers:
        r = dns.resolver.Resolver(configure=False)
        r.nameservers = [dns.nameserver.Do53Nameserver(h, p) for h, p in servers]
    else:
        r = dns.resolver.Resolver()
    r.lifetime = r.timeout = timeout

    cap = timeout

    def dnsfunc(name, timeout: float = timeout):
        qname = name.decode("ascii") if isinstance(name, bytes) else name
        try:   # dkimpy passes its own timeout (5 s); ours is the cap
            a = r.resolve(qname, dns.rdatatype.TXT, raise_on_no_answer=False, lifetime=min(timeout, cap))
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None
        except (dns.exception.Timeout, dns.resolver.NoNameservers) as e:
            raise dkimpy.DnsTimeoutError(f"{qname}: {type(e).__name__}: {e}") from None
        for rrset in a.response.answer:
            if rrset.rdtype == dns.rdatatype.TXT:
                return b"".join(next(iter(rrset)).strings)
        return None

    return dnsfunc


def chain_status(content: bytes, dnsfunc: DnsFunc | None = None, minkey: int = 1024) -> tuple[str, str]:
    """Validate the ARC chain of CONTENT with dkimpy: ("none" | "pass" | "fail" | "terminated", reason).

    "terminated" means an earlier sealer marked the chain failed (cv=fail):
    nobody may add to it. Blocking (DNS through ``dnsfunc``).
    """
    try:
        kw = {"dnsfunc": dnsfunc} if dnsfunc is not None else {}
        cv, _, reason = dkimpy.arc_verify(content, minkey=minkey, **kw)
    except Exception as e:   # dkimpy mostly returns fail; anything else is a fail too
        return "fail", f"{type(e).__name__}: {e}"
    if cv is None:
        return "terminated", reason
    return cv.decode("ascii", "replace"), reason


# ---- Authentication-Results value -> ARC-Authentication-Results ------------------------------

def _split_top(value: str) -> list[str]:
    """Split an Authentication-Results value at ';' outside comments and quoted strings."""
    parts, cur, depth, quoted, esc = [], [], 0, False, False
    for ch in value:
        if esc:
            esc = False
        elif ch == "\\" and (quoted or depth):
            esc = True
        elif quoted:
            quoted = ch != '"'
        elif ch == '"' and not depth:
            quoted = True
        elif ch == "(":
            depth += 1
        elif ch == ")" and depth:
            depth -= 1
        elif ch == ";" and not depth:
            parts.append("".join(cur).strip())
            cur = []
            continue
        cur.append(ch)
    parts.append("".join(cur).strip())
    return parts


_COMMENT = re.compile(r"\((?:[^()\\]|\\.)*\)")
_METHOD = re.compile(r"^\s*([A-Za-z0-9_.-]+)\s*(?:/\s*\d+\s*)?=\s*([A-Za-z0-9_.-]+)")


def _strip_comments(s: str) -> str:
    prev = None
    while prev != s:
        prev, s = s, _COMMENT.sub(" ", s)
    return " ".join(s.split())


def aar_value(authres: str, authserv_id: str, cv: str) -> tuple[str, list[str]] | SealProblem:
    """(authserv-id, results) for the AAR: the results of AUTHRES with arc=CV in them."""
    unfolded = re.sub(r"\r?\n(?=[ \t])", "", authres or "")
    if "\r" in unfolded or "\n" in unfolded:
        return SealProblem("", "the Authentication-Results value has a line break that is not folding", "authres")
    if not unfolded.strip():
        return authserv_id, [f"arc={cv}"]
    parts = _split_top(unfolded)
    head = _strip_comments(parts[0]).split()
    if not head or head[0].lower() != authserv_id.lower():
        return SealProblem("", f"the Authentication-Results value is for {parts[0]!r}, not for {authserv_id!r}",
                           "authres")
    results = [p for p in parts[1:] if p]
    methods = [(_METHOD.match(_strip_comments(r)) or None) for r in results]
    if any(m is None for m in methods) and not (len(results) == 1 and _strip_comments(results[0]).lower() == "none"):
        bad = next(r for r, m in zip(results, methods) if m is None)
        return SealProblem("", f"not a method=result in the Authentication-Results value: {bad!r}", "authres")
    arcs = [m.group(2).lower() for m in methods if m and m.group(1).lower() == "arc"]
    if arcs:
        if arcs != [cv]:
            return SealProblem("", f"the Authentication-Results value says arc={'/'.join(arcs)} "
                                   f"but the chain is cv={cv}", "cv")
    elif results and _strip_comments(results[0]).lower() == "none":
        results = [f"arc={cv}"]
    else:
        results.insert(0, f"arc={cv}")
    return authserv_id, results


def _fold_aar(instance: int, authserv_id: str, results: list[str], linesep: bytes, compact: bool) -> bytes:
    if compact:   # the suite's layout: one line, "; " between the parts
        return "; ".join([f"i={instance}", authserv_id, *results]).encode("utf-8")
    sep = ";" + linesep.decode("ascii") + "\t"
    return (f"i={instance}; {authserv_id};" + linesep.decode("ascii") + "\t" + sep.join(results)).encode("utf-8")


# ---- the sealer ---------------------------------------------------------------------------

class _Sealer(dkimpy.ARC):
    """dkimpy's ARC signer with our AAR value, our cv and our time."""

    def seal_set(self, selector: bytes, domain: bytes, privkey: bytes, instance: int, aar: bytes, cv: bytes,
                 include_headers: list[bytes], timestamp: int, standardize: bool) -> list[bytes]:
        pk = parse_pem_private_key(privkey)
        canon = CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")
        _, arc_headers_w_instance = self.sorted_arc_headers()
        # A failed chain: the seal covers our set only (RFC 8617 §5.1.2).
        arc_headers = [y for _, y in arc_headers_w_instance] if cv != dkimpy.CV_Fail else []
        self.include_headers = tuple(include_headers)
        self.hasher = dkimpy.HASH_ALGORITHMS[self.signature_algorithm]
        new = []

        aar_field = aar + self.linesep
        new.append(b"ARC-Authentication-Results: " + aar_field)
        arc_headers.insert(0, (b"ARC-Authentication-Results", aar_field))
        self.headers = canon.canonicalize_headers(arc_headers[:1]) + self.headers

        h = self.hasher()
        h.update(canon.canonicalize_body(self.body))
        bodyhash = base64.b64encode(h.digest())
        t = str(int(timestamp)).encode("ascii")
        ams_fields = [
            (b"i", str(instance).encode("ascii")),
            (b"a", self.signature_algorithm),
            (b"c", b"relaxed/relaxed"),
            (b"d", domain),
            (b"s", selector),
            (b"t", t),
            (b"h", b" : ".join(include_headers)),
            (b"bh", bodyhash),
            (b"b", b"0" * 60),   # dkimpy: keeps b= on a line of its own, so refolding leaves the rest alone
        ]
        ams = self.gen_header(ams_fields, list(include_headers), canon, b"ARC-Message-Signature", pk, standardize)
        new.append(b"ARC-Message-Signature: " + ams)
        arc_headers.insert(0, (b"ARC-Message-Signature", ams))
        self.headers = canon.canonicalize_headers(arc_headers[:1]) + self.headers

        as_fields = [
            (b"i", str(instance).encode("ascii")),
            (b"cv", cv),
            (b"a", self.signature_algorithm),
            (b"d", domain),
            (b"s", selector),
            (b"t", t),
            (b"b", b"0" * 60),
        ]
        as_include = [x[0].lower() for x in arc_headers]
        as_include.reverse()
        if cv == dkimpy.CV_Fail:
            # dkimpy picks header instances from the bottom up: reversed, ours come first.
            self.headers.reverse()
        seal_field = self.gen_header(as_fields, as_include, canon, b"ARC-Seal", pk, standardize)
        new.append(b"ARC-Seal: " + seal_field)
        new.reverse()
        return new


def ams_headers(content: bytes, headers: Iterable[str]) -> list[str]:
    """Header fields the AMS signs: the configured ones the message has, From always;
    never an ARC field, Authentication-Results or a field RFC 6376 says not to sign."""
    present = set(header_names(content))
    out: list[str] = []
    for h in headers:
        h = h.strip().lower()
        if (h and h not in out and h in present and h not in NEVER_SIGN and h not in ARC_HEADERS
                and h != "authentication-results"):
            out.append(h)
    if "from" not in out:
        out.insert(0, "from")
    return out


def seal(content: bytes, domain: str, key: Key | KeyProblem, authres: str, authserv_id: str, now: float,
         *, cv: str | None = None, dnsfunc: DnsFunc | None = None, headers: Iterable[str] = DEFAULT_HEADERS,
         compact: bool = False, minkey: int = 1024) -> bytes | SealProblem:
    """CONTENT with a new ARC set for DOMAIN prepended, or why not. Never raises.

    ``authres`` is the Authentication-Results value stamped at ingress
    (``authserv-id; spf=pass ...``; empty when nothing was checked), for
    ``authserv_id``. ``cv`` is the status of the chain as received
    ("none" | "pass" | "fail") when the caller knows it; otherwise the chain
    is validated here (DNS through ``dnsfunc``, keys under ``minkey`` bits fail).
    """
    d = (domain or "").strip().rstrip(".").lower()
    try:
        if isinstance(key, KeyProblem):
            return SealProblem(d, key.reason, "no-key")
        if not isinstance(key, Key):
            return SealProblem(d, f"no key given ({type(key).__name__})", "no-key")
        if key.domain != d:
            return SealProblem(d, f"the key is {key.domain}'s, not {d}'s", "no-key")
        if key.algorithm != "rsa-sha256":
            return SealProblem(d, f"the active key ({key.selector}) is {key.algorithm}: ARC seals are rsa-sha256 "
                                  f"only; give {d} an RSA key to seal with", "key-type")
        if not header_values(content, "from"):
            return SealProblem(d, "the message has no From: header", "error")
        linesep = _linesep(content)
        sealer = _Sealer(content, signature_algorithm=b"rsa-sha256", linesep=linesep, minkey=minkey)
        max_instance, sets = sealer.sorted_arc_headers()
        instance = max_instance + 1 if sets else 1
        if instance > INSTANCE_LIMIT:
            return SealProblem(d, f"the chain already has {max_instance} sets (RFC 8617 allows {INSTANCE_LIMIT})",
                               "instance-limit")
        # An AS that says cv=fail ends the chain: nobody adds to it.
        for i, (name, value) in sets:
            if name.lower() == b"arc-seal" and re.search(rb"(?:^|;)\s*cv\s*=\s*fail\b", value, re.I):
                return SealProblem(d, f"the ARC chain was already marked failed (cv=fail at i={i})",
                                   "chain-terminated")
        if cv is None:
            cv, reason = chain_status(content, dnsfunc, minkey)
            if cv == "terminated":
                return SealProblem(d, f"the ARC chain is over: {reason}", "chain-terminated")
        cv = cv.lower()
        if cv not in ("none", "pass", "fail"):
            return SealProblem(d, f"cv must be none, pass or fail, not {cv!r}", "cv")
        if (instance == 1) != (cv == "none"):
            return SealProblem(d, f"cv={cv} does not fit instance {instance} "
                                  f"({'no' if instance == 1 else 'an'} existing chain)", "cv")
        aar = aar_value(authres, authserv_id, cv)
        if isinstance(aar, SealProblem):
            return SealProblem(d, aar.reason, aar.code)
        srv, results = aar
        aar_bytes = _fold_aar(instance, srv, results, linesep, compact)
        include = [h.encode("ascii") for h in ams_headers(content, headers)]
        fields = sealer.seal_set(key.selector.encode("ascii"), d.encode("ascii"), key.private, instance,
                                 aar_bytes, cv.encode("ascii"), include, int(now), compact)
        return b"".join(fields) + content
    except Exception as e:
        return SealProblem(d, f"{type(e).__name__}: {e}", "error")
