"""rewrite.dkim - DKIM-sign outbound mail of our accepted domains

``signing_domain`` says whether a message is ours to sign: its From: header
names one address, in one of the tenant's accepted domains. ``sign`` then
prepends a DKIM-Signature made with that domain's active key (see
rewrite/keys.py): ``c=relaxed/relaxed``, ``d=`` the domain, ``s=`` the
active selector, ``t=`` the time given (injected, so traces and tests are
reproducible), rsa-sha256 or ed25519-sha256 after the key. The signed
header fields are those of ``dkim.headers`` that the message has, plus
From always; From is signed once more than it occurs, so a second From
cannot be added without breaking the signature. Fields that RFC 6376 says
not to sign (Received, Return-Path, Bcc, DKIM-Signature, ...) are left out
even when configured.

Signing is the last rewrite before the spool: anything changed afterwards
in a signed header or in the body breaks the signature.

A signing failure never raises: ``sign`` returns a ``SignProblem`` (no
key, unreadable key, a message dkimpy cannot parse, ...) and the caller
sends the message unsigned, tracing and logging the reason loudly.

Canonicalisation, hashing and the header layout are dkimpy's (``dkim.DKIM``);
the only thing added is the signature time: dkimpy stamps ``t=`` from
``time.time()``, so a small subclass replaces that one tag before dkimpy
hashes the header. Nothing global is patched. An RSA-2048 signature costs
about 10 ms of CPU (dkimpy's RSA is pure Python): call ``sign`` from a
worker thread when throughput matters.

TRUST: ``content`` is untrusted message data (any bytes); only the From:
header is interpreted here. Keys come from the operator's key store.

STANDARDS: RFC 6376 (DKIM), RFC 8463 (Ed25519-SHA256), RFC 8301 (rsa-sha256,
no rsa-sha1, keys >= 1024 bits), RFC 5322 §3.6.2 (From)

CONFIG: dkim.sign, dkim.headers, dkim.key_dir

SEE ALSO: rewrite/keys.py, rewrite/arc.py, pipeline.py
"""

from __future__ import annotations

import base64
import functools
import re
from dataclasses import dataclass
from typing import Iterable

import dkim as dkimpy
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.asymmetric import utils as asym_utils

from ..model import header_addresses
from .keys import Key, KeyProblem

_BLANK_LINE = re.compile(rb"\r?\n\r?\n")

# Header fields RFC 6376 §5.4 and dkimpy refuse to sign.
NEVER_SIGN = frozenset(x.decode() for x in dkimpy.DKIM.SHOULD_NOT)


@dataclass(frozen=True)
class SignProblem:
    """Why a message was not signed (it goes out unsigned)."""
    domain: str
    reason: str

    def __str__(self) -> str:
        return f"not DKIM-signed for {self.domain}: {self.reason}"


_WSP_BEFORE_CRLF = re.compile(rb"[\t ]+\r\n")
_WSP_TO_COMPRESS = re.compile(rb"[\t ]{2,}|\t")


def _strip_trailing_whitespace(content: bytes) -> bytes:
    """dkimpy's, without the scan when no line ends in WSP (the usual case)."""
    if b" \r\n" not in content and b"\t\r\n" not in content:
        return content
    return _WSP_BEFORE_CRLF.sub(b"\r\n", content)


def _compress_whitespace(content: bytes) -> bytes:
    """dkimpy's ``re.sub(b"[\\t ]+", b" ", content)``, which also replaces every single
    space with a space: one substitution per word, 6.8 ms for a 100 KB message, most
    of a signature. Only runs of two or more and tabs change anything."""
    if b"\t" not in content and b"  " not in content:
        return content
    return _WSP_TO_COMPRESS.sub(b" ", content)


_HEADER_NAME = re.compile(rb"([\x21-\x7e]+?):")


def _rfc822_parse(message: bytes):
    """dkimpy's rfc822_parse, the same result for the same input, without splitting the
    body into lines and joining them again when its line ends are CRLF already (every
    message from our spool): dkimpy's version cost 40 % of signing a 4 KB message and
    grows with the body. Anything with a bare LF goes to dkimpy's own."""
    if not message or message.count(b"\n") != message.count(b"\r\n"):
        return _dkimpy_rfc822_parse(message)
    if message.startswith(b"\r\n"):
        return [], message[2:]
    end = message.find(b"\r\n\r\n")
    if end < 0:
        head, body = (message[:-2] if message.endswith(b"\r\n") else message), b""
    else:
        head, body = message[:end], message[end + 4:]
    headers: list[list[bytes]] = []
    for line in head.split(b"\r\n"):
        if line[0] in (0x09, 0x20):
            headers[-1][1] += line + b"\r\n"
            continue
        m = _HEADER_NAME.match(line)
        if m is not None:
            headers.append([m.group(1), line[m.end(0):] + b"\r\n"])
        elif not line.startswith(b"From "):
            raise dkimpy.MessageFormatError("Unexpected characters in RFC822 header: %s" % line)
    return headers, body


_dkimpy_rfc822_parse = dkimpy.rfc822_parse


def _install_faster_canonicalization() -> None:
    """Put the two functions above in place of dkimpy's (relaxed canonicalization, for
    signing and verifying alike); same output, byte for byte (tests/unit/test_dkim_sign.py
    compares them on the corpus and on generated whitespace). Only for the dkimpy
    1.1 line, whose canonicalization module was read."""
    import importlib.metadata

    from dkim import canonicalization
    try:
        version = importlib.metadata.version("dkimpy")
    except importlib.metadata.PackageNotFoundError:
        return
    if version.startswith("1.1."):
        canonicalization.strip_trailing_whitespace = _strip_trailing_whitespace
        canonicalization.compress_whitespace = _compress_whitespace
        # DKIM.sign parses the PEM private key (pure-Python ASN.1) at every signature:
        # 27 % of signing a 4 KB message. The parse is a pure function of the key's
        # bytes and its result is only read, so parse each key once.
        dkimpy.rfc822_parse = _rfc822_parse
        if not hasattr(dkimpy.parse_pem_private_key, "cache_info"):
            dkimpy.parse_pem_private_key = functools.lru_cache(maxsize=64)(dkimpy.parse_pem_private_key)


_install_faster_canonicalization()


@functools.lru_cache(maxsize=64)
def _rsa_key(pem: bytes):
    """The private key as `cryptography` holds it (parsed once per key)."""
    return serialization.load_pem_private_key(pem, password=None)


class _TimedDKIM(dkimpy.DKIM):
    """dkimpy's DKIM with the signature time given instead of read from the clock,
    and the RSA operation done by `cryptography` (OpenSSL) instead of dkimpy's
    pure-Python modular exponentiation.

    Why: dkimpy's RSA-2048 signature is big-integer Python under the GIL; at load
    it was 40 % of the gateway's CPU and capped delivery at ~45 msg/s. OpenSSL
    signs in microseconds and releases the GIL. PKCS#1 v1.5 is deterministic, so
    the signature is byte for byte the one dkimpy would make (the golden tests
    check this). Everything else — canonicalisation, header hashing, folding —
    stays dkimpy's.
    """

    def __init__(self, message: bytes, t: int, rsa_pem: bytes | None = None, **kw):
        super().__init__(message, **kw)
        self._t = str(int(t)).encode("ascii")
        self._rsa_pem = rsa_pem

    def gen_header(self, fields, include_headers, canon_policy, header_name, pk, standardize=False):
        fields = [(k, self._t if k == b"t" else v) for k, v in fields]
        if self._rsa_pem is None or self.signature_algorithm != b"rsa-sha256" or standardize:
            return super().gen_header(fields, include_headers, canon_policy, header_name, pk, standardize)
        # dkimpy's gen_header (1.1.8) for rsa-sha256, unfolded once, with the signing swapped.
        header_value = b"; ".join(b"=".join(x) for x in fields)
        header_value = dkimpy.fold(header_value, namelen=len(header_name), linesep=b"\r\n")
        header_value = dkimpy.RE_BTAG.sub(b"\\1", header_value)
        header = (header_name, b" " + header_value)
        h = dkimpy.HashThrough(self.hasher(), self.debug_content)
        sig = dict(fields)
        headers = canon_policy.canonicalize_headers(self.headers)
        self.signed_headers = dkimpy.hash_headers(h, canon_policy, headers, include_headers, header, sig)
        sig2 = _rsa_key(self._rsa_pem).sign(h.digest(), padding.PKCS1v15(), asym_utils.Prehashed(hashes.SHA256()))
        idx = [i for i in range(len(fields)) if fields[i][0] == b"b"][0]
        fields[idx] = (b"b", base64.b64encode(bytes(sig2)))
        header_value = b"; ".join(b"=".join(x) for x in fields) + self.linesep
        return dkimpy.fold(header_value, namelen=len(header_name), linesep=self.linesep)


def header_block(content: bytes) -> bytes:
    """The header section of a message (without the blank line that ends it): up to the
    first match of _BLANK_LINE, found with bytes.find (in C, at memchr speed; the regex
    tried every position of the header section, three times per message)."""
    end = content.find(b"\r\n\r\n")
    limit = len(content) if end < 0 else end + 1
    for blank in (b"\n\n", b"\r\n\n", b"\n\r\n"):
        i = content.find(blank, 0, limit + len(blank) - 1)
        if i >= 0 and (end < 0 or i < end):
            end = i
            limit = i + 1
    return content if end < 0 else content[:end]


def header_values(content: bytes, name: str) -> list[str]:
    """Unfolded values of every header field called NAME (case-insensitive)."""
    want = name.lower().encode("ascii")
    out: list[str] = []
    cur: list[bytes] | None = None
    for line in header_block(content).replace(b"\r\n", b"\n").split(b"\n"):
        if line[:1] in (b" ", b"\t"):
            if cur is not None:
                cur.append(line)
            continue
        if cur is not None:
            out.append(b"".join(cur).decode("utf-8", "surrogateescape").strip())
            cur = None
        fname, colon, rest = line.partition(b":")
        if colon and fname.strip().lower() == want:
            cur = [rest]
    if cur is not None:
        out.append(b"".join(cur).decode("utf-8", "surrogateescape").strip())
    return out


def header_names(content: bytes) -> list[str]:
    """Lower-cased names of the header fields, in order."""
    out = []
    for line in header_block(content).replace(b"\r\n", b"\n").split(b"\n"):
        if line[:1] in (b" ", b"\t", b""):
            continue
        fname, colon, _ = line.partition(b":")
        if colon:
            out.append(fname.strip().lower().decode("ascii", "replace"))
    return out


def signing_domain(content: bytes, accepted_domains: Iterable[str]) -> str | None:
    """The From: domain (lower-cased) when it is one of ACCEPTED_DOMAINS, else None.

    Only a message with exactly one From: field naming exactly one address
    is signed: with several authors RFC 5322 wants a Sender, and whose
    domain would sign is no longer obvious.
    """
    froms = header_values(content, "from")
    if len(froms) != 1:
        return None
    addrs = header_addresses(tuple(froms))
    if len(addrs) != 1 or "@" not in addrs[0]:
        return None
    domain = addrs[0].rpartition("@")[2].strip().rstrip(".").lower()
    accepted = {d.strip().rstrip(".").lower() for d in accepted_domains}
    return domain if domain and domain in accepted else None


def headers_to_sign(content: bytes, headers: Iterable[str]) -> list[str]:
    """The configured fields the message has (From always), in config order,
    with From once more than it occurs (over-signing)."""
    present = header_names(content)
    want: list[str] = []
    for h in headers:
        h = h.strip().lower()
        if h and h not in want and h not in NEVER_SIGN and h in present:
            want.append(h)
    if "from" not in want:
        want.insert(0, "from")
    return want + ["from"] * max(1, present.count("from"))


def _linesep(content: bytes) -> bytes:
    head = header_block(content)
    return b"\n" if b"\n" in head and b"\r\n" not in head else b"\r\n"


def sign(content: bytes, domain: str, key: Key | KeyProblem, headers: tuple[str, ...],
         now: float) -> bytes | SignProblem:
    """CONTENT with a DKIM-Signature for DOMAIN prepended, or why not. Never raises."""
    try:
        if isinstance(key, KeyProblem):
            return SignProblem(domain, key.reason)
        d = (domain or "").strip().rstrip(".").lower()
        if not isinstance(key, Key):
            return SignProblem(domain, f"no key given ({type(key).__name__})")
        if key.domain != d:
            return SignProblem(domain, f"the key is {key.domain}'s, not {d}'s")
        if not header_values(content, "from"):
            return SignProblem(d, "the message has no From: header (RFC 6376 §5.4 requires signing it)")
        include = headers_to_sign(content, headers)
        signer = _TimedDKIM(content, int(now), rsa_pem=key.private if key.algorithm == "rsa-sha256" else None,
                            signature_algorithm=key.algorithm.encode("ascii"), linesep=_linesep(content))
        header = signer.sign(key.selector.encode("ascii"), d.encode("ascii"), key.private,
                             canonicalize=(b"relaxed", b"relaxed"),
                             include_headers=[h.encode("ascii") for h in include])
        return header + content
    except Exception as e:   # dkimpy raises DKIMException subclasses, and others on odd input
        return SignProblem(domain, f"{type(e).__name__}: {e}")
