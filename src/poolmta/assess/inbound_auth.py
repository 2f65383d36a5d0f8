"""assess.inbound_auth - fact: how the original sender authenticated when the message came in

For mail that arrives from the internet or from a connector (not for SMTP
AUTH submissions, not for DSNs we generate), find out whether the original
sender can be vouched for, so route/ can let forwarded mail keep the normal
pool (with SRS) instead of the relay pool:

- the original client IP: the connecting client, or, behind a connector
  with skip listing, the first hop of the Received chain that is not
  skipped (assess/received_chain.py);
- SPF (RFC 7208, assess/spf.py) of the envelope sender (the HELO name when
  the reverse-path is null) against that IP;
- DKIM (RFC 6376) of every DKIM-Signature, not only the first, with dkimpy:
  the key records are fetched first through the shared resolver (all
  concurrently, bounded by auth.spf_timeout), then the signatures are
  verified in a worker thread (asyncio.to_thread: hashing and RSA are CPU
  work) with a dnsfunc that answers from those prefetched records, so
  dkimpy never touches the network;
- ``dkim_aligned_pass``: a valid signature whose d= is the envelope sender's
  domain or shares its organisational domain (relaxed alignment, as in
  DMARC, RFC 7489 §3.1.1, applied to the envelope sender as the seed asks);
- the value of the Authentication-Results header we stamp (RFC 8601, built
  with the ``authres`` package), with our authserv-id; and
  ``strip_our_authres()``, which removes incoming Authentication-Results
  headers that claim our authserv-id (RFC 8601 §5), for the rewrite stage.

What is checked beyond dkimpy (RFC 6376 says so, dkimpy does not): the key
record's h= must allow the signature's hash, its k= must match the
signature's algorithm, its s= must include email, and a key with t=s
requires the i= domain to equal d=. A key in testing mode (t=y) may pass,
but such a signature is never counted as the sender's authentication
(§3.6.1: verifiers MUST NOT treat it differently from unsigned mail).

Policy beyond RFC 6376 (RFC 8301): rsa-sha1 signatures and RSA keys shorter
than 1024 bits are reported as ``policy`` even when they verify, and never
vouch for the sender. At most ``MAX_SIGNATURES`` signatures are verified;
the rest are reported as ``policy`` (a message with a thousand signatures
must not cost a thousand RSA operations).

Organisational domain: neither publicsuffix2 nor tldextract is a dependency,
so ``org_domain()`` is a deliberate simplification of the Public Suffix List:
the last two labels, or the last three when the last two are a known
two-level public suffix (co.uk, com.au, ...; ``_TWO_LEVEL_SUFFIXES``).
Private suffixes (github.io, blogspot.com, ...) are not known to it, so two
customers of such a host share an "organisation" here.

Nothing here raises: a DNS failure is a temperror result, and an unexpected
error in a check is logged and reported as temperror.

TRUST: the message content (Received, DKIM-Signature, Authentication-Results
headers), the envelope sender and the HELO come from the client; DNS
answers are the domains' own. The original IP is only believed as far as
skip-listed hops wrote it (see received_chain.py).

STANDARDS: RFC 7208 (SPF), RFC 6376 (DKIM) §3.6.1, §6.1; RFC 8301
(algorithm and key size policy); RFC 8463 (Ed25519); RFC 8601
(Authentication-Results) §2.7, §5; RFC 7489 §3.2 (organisational domain,
simplified).

CONFIG: auth.authserv_id (empty = the server's host name), auth.spf_timeout
(also the budget of the DKIM key lookups); tenants.*.connectors.skip_ips,
skip_last_hop.

SEE ALSO: assess/spf.py, assess/received_chain.py, model.InboundAuthFact,
route/rules.py (forward-authenticated)
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import re
from dataclasses import dataclass

import authres
import dkim
from dkim.util import InvalidTagValueList, parse_tag_value

from ..dns import Rcode, Resolver
from ..model import DkimResult, InboundAuthFact, Message
from . import received_chain, spf
from .dsn import header_block

log = logging.getLogger(__name__)

MAX_SIGNATURES = 10
TESTING = "key in testing mode (t=y): does not authenticate the sender"     # the detail of such a pass

# dkimpy logs every key or signature problem at ERROR; we report them in the result instead.
_dkimpy_log = logging.getLogger(__name__ + ".dkimpy")
_dkimpy_log.addHandler(logging.NullHandler())
_dkimpy_log.propagate = False

# Two-level public suffixes common enough to matter (a simplification of the Public Suffix List,
# see the module notes): under these the organisational domain has three labels.
_TWO_LEVEL_SUFFIXES = frozenset("""
    co.uk org.uk me.uk ltd.uk plc.uk net.uk sch.uk ac.uk gov.uk nhs.uk police.uk
    com.au net.au org.au edu.au gov.au asn.au id.au
    co.nz net.nz org.nz ac.nz govt.nz school.nz geek.nz
    co.jp ne.jp or.jp ac.jp ad.jp ed.jp go.jp gr.jp lg.jp
    co.kr or.kr ne.kr re.kr ac.kr go.kr
    co.za org.za net.za gov.za ac.za web.za
    co.in net.in org.in firm.in gen.in ind.in ac.in gov.in
    co.il org.il net.il ac.il gov.il muni.il
    co.id or.id web.id ac.id go.id
    co.th in.th ac.th go.th or.th
    com.br net.br org.br gov.br edu.br art.br
    com.ar net.ar org.ar gob.ar
    com.mx net.mx org.mx gob.mx edu.mx
    com.cn net.cn org.cn gov.cn edu.cn ac.cn
    com.hk net.hk org.hk gov.hk edu.hk
    com.tw net.tw org.tw gov.tw edu.tw idv.tw
    com.sg net.sg org.sg gov.sg edu.sg
    com.my net.my org.my gov.my edu.my
    com.ph net.ph org.ph gov.ph
    com.vn net.vn org.vn gov.vn
    com.tr net.tr org.tr gov.tr edu.tr
    com.ua net.ua org.ua gov.ua
    com.pl net.pl org.pl
    com.ru net.ru org.ru
    com.sa com.eg com.ng com.pk com.co com.pe com.ve com.ec com.uy com.py com.bo
    co.ke co.tz co.ug co.zw co.ve co.cr
""".split())


def org_domain(domain: str) -> str:
    """The organisational domain, by the simplified public-suffix rule of the module notes."""
    labels = domain.rstrip(".").lower().split(".")
    if len(labels) <= 2:
        return ".".join(labels)
    if ".".join(labels[-2:]) in _TWO_LEVEL_SUFFIXES:
        return ".".join(labels[-3:])
    return ".".join(labels[-2:])


def aligned(signing_domain: str, sender_domain: str) -> bool:
    """Relaxed alignment: the same organisational domain."""
    if not signing_domain or not sender_domain:
        return False
    return org_domain(signing_domain) == org_domain(sender_domain)


# ---- DKIM ------------------------------------------------------------------------

@dataclass(frozen=True)
class _Signature:
    index: int
    domain: str                      # d=, lower case ("" when unreadable)
    selector: str                    # s=
    tags: dict | None                # parsed tag list, None when it does not parse
    problem: str = ""                # why it cannot be verified at all


def _signatures(content: bytes) -> list[_Signature]:
    headers, _ = dkim.rfc822_parse(content)
    out = []
    for name, value in headers:
        if name.lower() != b"dkim-signature":
            continue
        i = len(out)
        try:
            tags = parse_tag_value(value)
        except InvalidTagValueList as e:
            d = re.search(rb"(?:^|;)\s*d\s*=\s*([^;\s]*)", value)
            s = re.search(rb"(?:^|;)\s*s\s*=\s*([^;\s]*)", value)
            out.append(_Signature(i, _text(d.group(1)).lower() if d else "", _text(s.group(1)) if s else "",
                                  None, f"signature tag list does not parse: {e}"))
            continue
        d, s = _text(tags.get(b"d", b"")).lower(), _text(tags.get(b"s", b""))
        problem = "" if d and s else "signature without d= or s="
        out.append(_Signature(i, d, s, tags, problem))
    return out


def _text(b: bytes) -> str:
    return re.sub(r"\s+", "", b.decode("utf-8", "replace"))


def _key_name(selector: str, domain: str) -> str:
    return f"{selector}._domainkey.{domain}".lower().rstrip(".")


def _key_problem(sig: dict, key: bytes) -> tuple[str, str] | None:
    """(result, why) when the key record cannot be used for this signature (RFC 6376 §3.6.1, §6.1.2)."""
    try:
        k = parse_tag_value(key)
    except InvalidTagValueList as e:
        return "permerror", f"key record does not parse: {e}"
    if b"v" in k and k[b"v"] != b"DKIM1":
        return "permerror", "key record v= is not DKIM1"
    if b"p" not in k:
        return "permerror", "key record has no p="
    if not k[b"p"].strip():
        return "permerror", "key revoked (empty p=)"
    ktype = k.get(b"k", b"rsa").strip().lower()
    if ktype not in (b"rsa", b"ed25519"):
        return "permerror", f"key type k={_text(ktype)} not supported"
    algorithm = sig.get(b"a", b"").strip().lower()
    if algorithm.split(b"-")[0] != ktype:
        return "permerror", f"key type k={_text(ktype)} does not match a={_text(algorithm)}"
    if b"h" in k:
        hashes = [h.strip().lower() for h in k[b"h"].split(b":")]
        if algorithm.split(b"-")[-1] not in hashes:
            return "permerror", f"key h={_text(k[b'h'])} does not allow a={_text(algorithm)}"
    if b"s" in k:
        services = [s.strip().lower() for s in k[b"s"].split(b":")]
        if b"*" not in services and b"email" not in services:
            return "permerror", f"key is not for email (s={_text(k[b's'])})"
    flags = [f.strip().lower() for f in k.get(b"t", b"").split(b":")]
    if b"s" in flags and b"i" in sig:
        i_domain = sig[b"i"].rpartition(b"@")[2].lower().rstrip(b".")
        if i_domain != sig.get(b"d", b"").lower().rstrip(b"."):
            return "permerror", "key t=s: the i= domain must equal d="
    try:
        raw = base64.b64decode(re.sub(rb"\s+", b"", k[b"p"]), validate=True)
    except (binascii.Error, ValueError):
        return "permerror", "key p= is not base64"
    if ktype == b"ed25519" and len(raw) != 32:
        return "permerror", f"ed25519 key of {len(raw)} octets, not 32 (RFC 8463 §4)"
    try:
        dkim.evaluate_pk(b"key", _usable_key(key))
    except Exception as e:
        return "permerror", f"key: {e}"
    return None


def _usable_key(key: bytes) -> bytes:
    """The key record reduced to k= and p= for dkimpy, once _key_problem() has checked the rest.

    dkimpy reads s= as one value rather than a colon-separated list (RFC 6376
    §3.6.1), so "s=email:web" would lose the key; every other tag is checked here.
    """
    k = parse_tag_value(key)
    return b"k=" + k.get(b"k", b"rsa").strip().lower() + b"; p=" + re.sub(rb"\s+", b"", k[b"p"])


def _testing(key: bytes) -> bool:
    try:
        k = parse_tag_value(key)
    except InvalidTagValueList:
        return False
    return b"y" in [f.strip().lower() for f in k.get(b"t", b"").split(b":")]


def _verify_all(content: bytes, sigs: list[_Signature], keys: dict[str, tuple[str, bytes | str]],
                minkey: int, allow_sha1: bool) -> list[DkimResult]:
    """The CPU part, in a worker thread: every signature against its prefetched key."""
    results: list[DkimResult] = []
    try:
        d = dkim.DKIM(content, logger=_dkimpy_log, minkey=minkey)
    except Exception as e:          # a header block dkimpy cannot read
        return [DkimResult(s.domain, s.selector, "permerror", f"message: {e}"[:200]) for s in sigs]

    def dnsfunc(name, timeout=5):
        name = name.decode("ascii", "replace") if isinstance(name, bytes) else name
        state, value = keys.get(name.lower().rstrip("."), ("none", b""))
        return _usable_key(value) if state == "ok" else None

    for s in sigs:
        def result(r: str, why: str = "") -> DkimResult:
            return DkimResult(s.domain, s.selector, r, why[:200])

        if s.problem:
            results.append(result("permerror", s.problem))
            continue
        if s.index >= MAX_SIGNATURES:
            results.append(result("policy", f"not verified: more than {MAX_SIGNATURES} signatures"))
            continue
        state, key = keys[_key_name(s.selector, s.domain)]
        if state == "temperror":
            results.append(result("temperror", f"key lookup: {key}"))
            continue
        if state == "none":
            results.append(result("permerror", f"no key at {_key_name(s.selector, s.domain)}"))
            continue
        try:
            d.verify_headerprep(s.index)        # signature fields: syntax, algorithm, i=, t=, x= ...
        except Exception as e:                  # dkim.DKIMException, or dkimpy tripping on odd input
            results.append(result("permerror", str(e) or type(e).__name__))
            continue
        problem = _key_problem(s.tags, key)
        if problem:
            results.append(result(*problem))
            continue
        try:
            ok = d.verify(idx=s.index, dnsfunc=dnsfunc)
        except dkim.ValidationError as e:
            results.append(result("fail" if "body hash mismatch" in str(e) else "permerror", str(e)))
            continue
        except dkim.KeyFormatError as e:
            results.append(result("policy" if "too small" in str(e) else "permerror", str(e)))
            continue
        except Exception as e:              # dkimpy's own failures on odd input
            results.append(result("permerror", f"{type(e).__name__}: {e}"))
            continue
        if not ok:
            results.append(result("fail", "signature did not verify"))
        elif s.tags.get(b"a", b"").strip().lower() == b"rsa-sha1" and not allow_sha1:
            results.append(result("policy", "rsa-sha1 verifies but is not accepted (RFC 8301)"))
        elif _testing(key):
            results.append(result("pass", TESTING))
        else:
            results.append(result("pass"))
    return results


async def verify_dkim(content: bytes, resolver: Resolver, *, timeout: float = 20.0, minkey: int = 1024,
                      allow_sha1: bool = False) -> tuple[DkimResult, ...]:
    """Verify every DKIM-Signature of a message; () when there is none. Never raises."""
    head = header_block(content)                # the body is only read in the worker thread
    if b"dkim-signature" not in head.lower():
        return ()
    try:
        sigs = _signatures(head)
    except Exception as e:                      # a header block dkimpy cannot read
        return (DkimResult("", "", "permerror", f"message: {e}"[:200]),)
    if not sigs:
        return ()
    names = sorted({_key_name(s.selector, s.domain) for s in sigs[:MAX_SIGNATURES] if not s.problem})
    keys: dict[str, tuple[str, bytes | str]] = {}

    async def fetch(name: str) -> None:
        ans = await resolver.query(name, "TXT")
        if ans.rcode == Rcode.TEMPERROR:
            keys[name] = ("temperror", ans.detail or "DNS failure")
        elif ans.rcode == Rcode.OK and ans.records:
            keys[name] = ("ok", ans.records[0].encode("utf-8"))
        else:
            keys[name] = ("none", b"")

    try:
        async with asyncio.timeout(timeout):
            await asyncio.gather(*(fetch(n) for n in names))
    except TimeoutError:
        for n in names:
            keys.setdefault(n, ("temperror", f"no answer within {timeout:g}s"))
    return tuple(await asyncio.to_thread(_verify_all, content, sigs, keys, minkey, allow_sha1))


def authenticates(r: DkimResult) -> bool:
    """A signature that vouches for its d=: it verified, with an acceptable algorithm and key, not in testing mode."""
    return r.result == "pass" and r.detail != TESTING


# ---- Authentication-Results --------------------------------------------------------

def _comment(text: str) -> str | None:
    text = re.sub(r"[^\x20-\x7e]|[()\\]", " ", text).strip()
    return " ".join(text.split())[:120] or None


def authres_value(authserv_id: str, spf_result: spf.SpfResult, original_ip: str,
                  dkim_results: tuple[DkimResult, ...]) -> str:
    """The Authentication-Results header value (RFC 8601): "authserv-id; spf=...; dkim=..."."""
    results = []
    ip_comment = f"sender IP is {original_ip}" if original_ip else None
    if spf_result.identity == "helo":
        results.append(authres.SPFAuthenticationResult(
            result=spf_result.result, result_comment=ip_comment, smtp_helo=spf_result.domain or None))
    else:
        results.append(authres.SPFAuthenticationResult(
            result=spf_result.result, result_comment=ip_comment, smtp_mailfrom=spf_result.domain or None))
    if not dkim_results:
        results.append(authres.DKIMAuthenticationResult(result="none"))
    for r in dkim_results:
        results.append(authres.DKIMAuthenticationResult(
            result=r.result, result_comment=_comment(r.detail) if r.result != "pass" or r.detail else None,
            header_d=r.domain or None, header_s=r.selector or None))
    return authres.AuthenticationResultsHeader(authserv_id=authserv_id, results=results).header_value()


_AUTHSERV_ID = re.compile(rb"\s*(?:\((?:[^()\\]|\\.)*\)\s*)*(\"(?:[^\"\\]|\\.)*\"|[^\s;()]+)")


def _claimed_authserv_id(value: bytes) -> str:
    m = _AUTHSERV_ID.match(value)
    if not m:
        return ""
    v = m.group(1)
    if v.startswith(b'"'):
        v = re.sub(rb"\\(.)", rb"\1", v[1:-1])
    return v.decode("latin-1").strip().lower()


def strip_our_authres(content: bytes, authserv_id: str) -> bytes:
    """Remove Authentication-Results headers that claim ``authserv_id`` (RFC 8601 §5).

    Everything else stays byte for byte as it was, ARC-Authentication-Results
    included; the comparison ignores letter case. Only the header block is read.
    """
    ours = authserv_id.strip().lower()
    head = header_block(content)
    if not ours or b"authentication-results" not in head.lower():
        return content
    lines = head.splitlines(keepends=True)
    out: list[bytes] = []
    dropping = False
    for n, line in enumerate(lines):
        if line[:1] in (b" ", b"\t"):
            if not dropping:
                out.append(line)
            continue
        name, colon, value = line.partition(b":")
        dropping = False
        if colon and name.strip().lower() == b"authentication-results":
            # The authserv-id may be on a continuation line: read the whole field.
            field = value + b"".join(_continuation(lines, n + 1))
            dropping = _claimed_authserv_id(field.replace(b"\r\n", b" ").replace(b"\n", b" ")) == ours
        if not dropping:
            out.append(line)
    return b"".join(out) + content[len(head):]


def _continuation(lines: list[bytes], start: int):
    for line in lines[start:]:
        if line[:1] not in (b" ", b"\t"):
            return
        yield line


# ---- the check ------------------------------------------------------------------------

async def check(msg: Message, ctx) -> InboundAuthFact:
    """The fact for a message; not evaluated for SMTP AUTH submissions and DSNs we generate."""
    o = msg.origin
    if o.auth_user or o.kind == "dsn":
        return InboundAuthFact()
    authserv_id = ctx.auth.authserv_id or ctx.hostname
    try:
        return await _evaluate(msg, ctx, authserv_id)
    except Exception:                           # never let a bug here lose or stall a message
        log.exception("inbound_auth check failed for %s", msg.queue_id)
        failed = spf.SpfResult("temperror", "mailfrom" if msg.envelope.mail_from else "helo",
                               msg.envelope.sender_domain or o.helo.lower(), detail="internal error")
        return InboundAuthFact(evaluated=True, original_ip=o.client_ip, spf="temperror",
                               spf_identity=failed.identity, spf_domain=failed.domain,
                               authres=authres_value(authserv_id, failed, o.client_ip, ()))


async def _evaluate(msg: Message, ctx, authserv_id: str) -> InboundAuthFact:
    o, env = msg.origin, msg.envelope
    match = ctx.directory.connector_for(o.client_ip)
    if match is not None and (match.skip_ips or match.skip_last_hop):
        found = received_chain.original_client(o.client_ip, received_chain.received_headers(msg.content),
                                               match.skip_ips, match.skip_last_hop)
    else:
        found = received_chain.OriginalClient(o.client_ip, 0, "connecting client")
    timeout = ctx.auth.spf_timeout

    async def spf_check() -> spf.SpfResult:
        if not env.mail_from and found.hop > 0:
            # The HELO we know is the connector's, not the original client's.
            return spf.SpfResult("none", "helo", o.helo.lower(),
                                 detail="null reverse-path behind skip listing: the original HELO is not known")
        return await spf.check(ctx.resolver, found.ip, env.mail_from, o.helo, receiver=ctx.hostname, timeout=timeout)

    spf_result, dkim_results = await asyncio.gather(
        spf_check(), verify_dkim(msg.content, ctx.resolver, timeout=timeout))
    sender_domain = env.sender_domain
    return InboundAuthFact(
        evaluated=True,
        original_ip=found.ip,
        spf=spf_result.result,
        spf_identity=spf_result.identity,
        spf_domain=spf_result.domain,
        dkim=dkim_results,
        dkim_aligned_pass=any(authenticates(r) and aligned(r.domain, sender_domain) for r in dkim_results),
        authres=authres_value(authserv_id, spf_result, found.ip, dkim_results),
    )
