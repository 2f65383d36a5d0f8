"""rewrite.srs - Sender Rewriting Scheme: rewrite the envelope sender of mail we
forward, and turn the bounces that come back into bounces for the original sender

When we forward mail whose original sender authenticated (SPF or aligned DKIM
passed when it came in), the envelope sender is rewritten into our own domain,
so SPF at the destination checks *our* record and bounces come back to *us*:

    forward("alice@sender.example")
        -> "SRS0=HHHH=TT=sender.example=alice@ours.example"
    reverse("SRS0=HHHH=TT=sender.example=alice@ours.example")
        -> "alice@sender.example"

HHHH is an HMAC of the rest (so nobody else can mint an address that we would
forward a bounce to: SRS must never become an open relay), TT a day stamp (so
an address is only honoured for ``max_age``).

The libsrs2 / PostSRSd form (``format = "srs"``), field by field:

* ``SRS0=HHHH=TT=domain=local@ours``. TT is ``(unix_time // 86400) mod 1024`` in
  two characters of the base32 alphabet ``A-Z2-7``, high five bits first.
  HHHH is ``HMAC-SHA1(secret, lower(TT) + lower(domain) + lower(local))`` in
  base64, its first ``hash_length`` characters. ``lower`` folds ASCII only (as C
  ``tolower`` does); the fields are concatenated without separators.
* A sender that is already a foreign SRS0 address (we are the second hop) is
  not wrapped again: ``SRS0<sep>opaque@hop1`` becomes
  ``SRS1=HHHH=hop1==opaque@ours`` with HHHH = HMAC(lower(hop1) +
  lower(<sep>opaque)), the opaque part keeping its leading separator. A foreign
  SRS1 address ``SRS1<sep>X=hop1==opaque@hopN`` keeps its first hop and opaque
  part and is re-signed by us: ``SRS1=HHHH=hop1==opaque@ours``. Reversing an
  SRS1 address gives ``SRS0<sep>opaque@hop1``: the bounce goes straight back to
  the first hop, which reverses its own SRS0.
* A sender already in our domain (``srs.domain``, or one of the
  ``exclude_domains`` given to the constructor) is returned unchanged, and so
  is the null reverse-path ``""``: neither is ever rewritten.
* Several secrets: the first signs, all verify (put a new secret first, keep
  the old one for ``max_age``, then drop it).
* Reverse compares the hash case-insensitively (some MTAs change the case of
  local parts) and accepts it in standard base64 (``+ /``, libsrs2, PostSRSd
  1.x) and in base64url (``- _``, PostSRSd >= 2.2.6). A hash longer than
  ``hash_length`` is compared on its first ``hash_length`` characters, a shorter
  one is refused, as PostSRSd 2.x does. The domain after the ``@`` is not
  checked (libsrs2 does not either): the caller decides which domains are ours.
* Validity: an address minted on UTC day D is honoured through the end of day
  D + max_age (21 days: D+21 valid, D+22 expired), exactly libsrs2's
  ``now <= then + maxage``. One deliberate difference: libsrs2 reads a stamp
  from the future as 1023 days old and refuses it; we accept a stamp at most
  ``skew_days`` (default 1) ahead of our clock, so an address minted by one of
  our nodes whose clock runs slightly ahead, bounced back at once to a node
  whose clock does not, still works. The stamp is under the HMAC, so only we
  can write one; anything further ahead is refused as expired. The stamp counts
  days modulo 1024, as in every SRS implementation: an address becomes "fresh"
  again after 1024 days (about 2.8 years), a known property of the scheme.
* Addresses longer than 512 characters are refused (SRSMalformed), forward and
  reverse: PostSRSd's implementation limit, kept so that we never mint an
  address PostSRSd-style verifiers cannot take. There is no 64-octet check on
  SRS0/SRS1 local parts, because PostSRSd makes none (its own test vectors
  rewrite a 512-character address into a 500-character local part): most MTAs
  accept longer local parts than RFC 5321 §4.5.3.1.1 promises.

Hash alphabet of the addresses we *mint*: ``hash_alphabet="base64url"`` (the
default, what PostSRSd 2.2.6 and later write: no ``+`` to be mistaken for a
recipient delimiter, no ``/``) or ``"base64"`` (libsrs2, PostSRSd 1.x). Reverse
always takes both. Debian 12's postsrsd is 1.10: it writes standard base64 and
refuses base64url hashes ("Hash invalid"), so about one address in eight that
we mint in base64url (those whose hash holds a ``-`` or ``_``) cannot be
reversed by a postsrsd 1.x sharing our secret; choose ``"base64"`` when one
must. Everything else is identical (tests/integration/test_srs_postsrsd.py
shows it against the real daemon).

The Microsoft 365 form (``format = "m365"``), for tenants used to Exchange
Online's addresses:

* ``forward(sender, forwarder="bob@fwd.example")`` ->
  ``bob+SRS=HHHH=TT=sender.example=alice@fwd.example``: the forwarding
  mailbox's local part, ``+SRS=``, then the SRS0 fields (same hash and stamp
  as SRS0), at the forwarding address's domain. The forwarding address is
  required in this format (ValueError without it).
* If that local part would exceed 64 octets, the fallback is
  ``bounces+SRS=HHHH=TT@<srs.domain>`` with HHHH = HMAC(lower(TT) +
  lower(srs.domain)). It does not carry the original sender, and we keep no
  state, so a bounce to it cannot be routed: ``reverse`` checks its hash and
  stamp and then raises ``SRSNotReversible`` (a forged or expired one raises
  SRSBadHash / SRSExpired), and ingress refuses it at RCPT with 550 5.1.1.
  That is the safe choice: refusing a DSN costs nothing (its reverse-path is
  null, so no one is bounced to), while accepting and dropping would turn the
  address into a silent sink and hide the failure; forwarding it anywhere would
  be a relay.
* Only the format is Microsoft's; its hash is its own secret, so we neither
  mint nor verify Exchange Online's hashes. ``reverse`` takes both forms in
  either format, so switching ``srs.format`` does not strand addresses already
  out there.

Why our own implementation: pysrs does not work on current Python; srslib
0.1.5 matches libsrs2 but rewrites senders in our own domain (the caller must
skip them), refuses base64url hashes, and its validity window is one day short
of libsrs2's (it refuses on day 21, libsrs2 and PostSRSd accept through day
21). The algorithm is small and fully pinned down by the PostSRSd vectors, so
owning it costs less than wrapping around three gaps.

TRUST: every address handed to ``reverse`` is attacker-controlled (any host on
the internet can RCPT TO an SRS-looking address of ours): only a valid HMAC
under one of our secrets, inside the window, yields an address to deliver to.
Parsing is linear and bounded (512 characters, a 2-character stamp: the long
stamp of CVE-2020-35573 is refused outright). Hashes are compared in constant
time. Senders handed to ``forward`` are untrusted too; they are only copied,
never interpreted beyond splitting at the last ``@``.

STANDARDS: SRS as specified by Shevek's "Sender Rewriting Scheme" paper
(libsrs2, Mail::SRS) and PostSRSd; RFC 2104 (HMAC), RFC 4648 §4/§5/§6 (base64,
base64url, base32 alphabet), RFC 5321 §4.5.3.1.1 (64-octet local part),
RFC 7208 (the SPF check this exists for).

CONFIG: srs.domain, srs.secrets, srs.format, srs.max_age (whole days),
srs.hash_length. ``hash_alphabet``, ``skew_days`` and ``exclude_domains`` are
constructor arguments (``from_config`` also reads an ``srs.hash_alphabet``
setting when config.py has one).

SEE ALSO: ingress/acceptance.py (bounces to SRS addresses), route/rules.py
(rule "forward-authenticated"), clock.py, tests/unit/test_srs.py,
tests/integration/test_srs_postsrsd.py, tests/data/srs/README.md
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from typing import Iterable

from ..clock import Clock

DAY = 86400
_SLOTS = 1024                              # 2 base32 characters of day stamp
_BASE32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
_SEPARATORS = "=-+"                         # allowed after SRS0/SRS1 (libsrs2)
MAX_ADDRESS = 512                           # PostSRSd's limit on an address
MAX_LOCAL_PART = 64                         # RFC 5321 §4.5.3.1.1 (m365 form only)
_M365_TAG = "+srs="
_M365_FALLBACK_LOCAL = "bounces"
_TO_STD = str.maketrans("-_", "+/")
_TO_URL = str.maketrans("+/", "-_")


class SRSError(ValueError):
    """An address that cannot be rewritten or reversed; ``reason`` says why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class SRSMalformed(SRSError):
    """Not a well-formed address or SRS address (missing field, bad stamp, too long)."""


class SRSNotOurs(SRSError):
    """Not an SRS address at all: there is nothing to reverse."""


class SRSBadHash(SRSError):
    """The hash does not verify under any of our secrets: forged, or not minted by us."""


class SRSExpired(SRSError):
    """A valid hash, but the day stamp is outside the validity window."""


class SRSNotReversible(SRSError):
    """A genuine m365 fallback address (``bounces+SRS=HHHH=TT@…``): it does not
    carry the original sender, so a bounce to it cannot be routed."""


def _lower(s: str) -> bytes:
    # ASCII-only folding on the UTF-8 octets, as libsrs2's C tolower() does.
    return s.encode("utf-8", "surrogateescape").lower()


def _split(address: str) -> tuple[str, str]:
    local, at, domain = address.rpartition("@")
    if not at:
        raise SRSMalformed("no @ sign in the address")
    return local, domain


def _is_tagged(local: str, tag: str) -> bool:
    return len(local) >= 5 and local[:4].lower() == tag and local[4] in _SEPARATORS


def _check_length(address: str) -> None:
    if len(address) > MAX_ADDRESS:
        raise SRSMalformed(f"address longer than {MAX_ADDRESS} characters")


class SRS:
    """Forward and reverse envelope senders; see the module docstring.

    ``forward`` returns the address to use as envelope sender; ``reverse``
    returns the address a bounce to an SRS address must go to, or raises an
    ``SRSError`` (the reason is its text). ``is_srs`` says whether an address
    looks like one of ours, i.e. whether ``reverse`` (not the mailbox table)
    must decide about it.
    """

    def __init__(self, domain: str, secrets: Iterable[str], *, clock: Clock, format: str = "srs",
                 max_age: float = 21 * DAY, hash_length: int = 4, hash_alphabet: str = "base64url",
                 skew_days: int = 1, exclude_domains: Iterable[str] = (), keep_foreign_srs1: bool = False):
        self.domain = domain.strip().rstrip(".").lower()
        self.secrets = tuple(s.encode("utf-8") for s in secrets if s)
        if not self.domain:
            raise ValueError("SRS needs a domain (srs.domain)")
        if not self.secrets:
            raise ValueError("SRS needs at least one secret (srs.secrets)")
        if format not in ("srs", "m365"):
            raise ValueError(f"srs.format must be \"srs\" or \"m365\", not {format!r}")
        if hash_alphabet not in ("base64url", "base64"):
            raise ValueError(f"hash_alphabet must be \"base64url\" or \"base64\", not {hash_alphabet!r}")
        if not 1 <= hash_length <= 27:          # 27 base64 characters hold all 160 bits of SHA-1
            raise ValueError("srs.hash_length must be 1..27")
        self.max_age_days = int(max_age // DAY)
        if not 0 <= skew_days < 8:
            raise ValueError("skew_days must be 0..7")
        if not 0 <= self.max_age_days < _SLOTS - 1 - skew_days:
            raise ValueError(f"srs.max_age must be 0..{_SLOTS - 2 - skew_days} days")
        self.clock = clock
        self.format = format
        self.hash_length = hash_length
        self.hash_alphabet = hash_alphabet
        self.skew_days = skew_days
        self.exclude = frozenset(d.strip().rstrip(".").lower() for d in exclude_domains if d.strip())
        # libsrs2 re-signs a foreign SRS1 keeping its first hop. That hop was never
        # authenticated (only the SRS1 sender's own domain was), and SRS1 carries no
        # timestamp: an attacker could mint SRS1=…=victim==anything and have us relay
        # bounces to SRS0anything@victim for ever. By default a foreign SRS1 is wrapped
        # as our own SRS0 instead (timestamped; its bounce goes back to the domain that
        # authenticated). keep_foreign_srs1=True restores libsrs2/postsrsd behaviour.
        self.keep_foreign_srs1 = keep_foreign_srs1

    @classmethod
    def from_config(cls, cfg, clock: Clock, *, exclude_domains: Iterable[str] = ()) -> "SRS":
        """From ``Config.srs`` (an SrsConfig)."""
        return cls(cfg.domain, cfg.secrets, clock=clock, format=cfg.format, max_age=cfg.max_age,
                   hash_length=cfg.hash_length, hash_alphabet=getattr(cfg, "hash_alphabet", "base64url"),
                   exclude_domains=exclude_domains, keep_foreign_srs1=getattr(cfg, "keep_foreign_srs1", False))

    # ---- primitives ---------------------------------------------------------------

    def _mac(self, secret: bytes, *fields: str) -> str:
        """Standard base64 of HMAC-SHA1 over the lower-cased fields, first hash_length characters."""
        digest = hmac.new(secret, b"".join(_lower(f) for f in fields), hashlib.sha1).digest()
        return base64.b64encode(digest).decode("ascii")[: self.hash_length]

    def _sign(self, *fields: str) -> str:
        h = self._mac(self.secrets[0], *fields)
        return h.translate(_TO_URL) if self.hash_alphabet == "base64url" else h

    def _verify(self, given: str, *fields: str) -> None:
        if len(given) < self.hash_length:
            raise SRSMalformed("hash too short in SRS address")
        want = given[: self.hash_length].translate(_TO_STD).lower().encode("ascii", "replace")
        ok = False
        for secret in self.secrets:             # every secret is tried, so timing tells nothing about which
            ok |= hmac.compare_digest(self._mac(secret, *fields).lower().encode("ascii"), want)
        if not ok:
            raise SRSBadHash("hash invalid in SRS address")

    def _today(self) -> int:
        return int(self.clock.now() // DAY)

    def _stamp(self) -> str:
        day = self._today() % _SLOTS
        return _BASE32[day >> 5] + _BASE32[day & 31]

    @staticmethod
    def _parse_stamp(stamp: str) -> int:
        if len(stamp) != 2:
            raise SRSMalformed("timestamp in SRS address is not 2 characters")
        try:
            return (_BASE32.index(stamp[0].upper()) << 5) | _BASE32.index(stamp[1].upper())
        except ValueError:
            raise SRSMalformed("bad base32 character in SRS timestamp") from None

    def _check_age(self, then: int) -> None:
        age = (self._today() - then) % _SLOTS
        if age <= self.max_age_days or age >= _SLOTS - self.skew_days:
            return
        when = f"{age} days old" if age < _SLOTS // 2 else f"{_SLOTS - age} days in the future"
        raise SRSExpired(f"timestamp out of date in SRS address ({when}; valid for {self.max_age_days} days)")

    def _is_ours(self, domain: str) -> bool:
        d = domain.rstrip(".").lower()
        if d == self.domain or d in self.exclude:
            return True
        return any(x.startswith(".") and d.endswith(x) for x in self.exclude)

    # ---- public API ---------------------------------------------------------------

    def is_srs(self, address: str) -> bool:
        """Whether the address has the shape of an SRS address (SRS0/SRS1 or
        the m365 ``+SRS=`` form), whatever its domain and validity."""
        local = address.rpartition("@")[0] if "@" in address else address
        return _is_tagged(local, "srs0") or _is_tagged(local, "srs1") or _M365_TAG in local.lower()

    def forward(self, address: str, forwarder: str = "") -> str:
        """The envelope sender to use when forwarding mail from ``address``.

        ``forwarder`` is the forwarding address (the mailbox whose forwarding
        sent the message on); the m365 format needs it, the srs format ignores
        it. Raises SRSMalformed for an address without ``@`` or longer than 512
        characters."""
        if address == "":
            return ""                           # the null reverse-path is never rewritten
        _check_length(address)
        local, domain = _split(address)
        if not local or not domain:
            raise SRSMalformed("no local part or no domain in the address")
        if self.format == "m365":
            return self._forward_m365(address, local, domain, forwarder)
        if self._is_ours(domain):
            return address
        if _is_tagged(local, "srs1"):
            parts = local[5:].split("=", 2)     # hash, first hop, opaque (which keeps its separator)
            if self.keep_foreign_srs1 and len(parts) == 3 and parts[1] and parts[2]:
                return self._srs1(parts[1], parts[2])
            # A malformed foreign SRS1 is just a local part to us: wrapped as SRS0 below,
            # so its bounce still comes back to it (libsrs2 would refuse to rewrite it).
        elif _is_tagged(local, "srs0"):
            return self._srs1(domain, local[4:])
        stamp = self._stamp()
        return f"SRS0={self._sign(stamp, domain, local)}={stamp}={domain}={local}@{self.domain}"

    def _srs1(self, first_hop: str, opaque: str) -> str:
        return f"SRS1={self._sign(first_hop, opaque)}={first_hop}={opaque}@{self.domain}"

    def _forward_m365(self, address: str, local: str, domain: str, forwarder: str) -> str:
        if not forwarder or "@" not in forwarder:
            raise ValueError("srs.format \"m365\" needs the forwarding address (forward(sender, forwarder=...))")
        flocal, fdomain = forwarder.rsplit("@", 1)
        if self._is_ours(domain) or domain.rstrip(".").lower() == fdomain.rstrip(".").lower():
            return address
        stamp = self._stamp()
        tagged = f"{flocal}+SRS={self._sign(stamp, domain, local)}={stamp}={domain}={local}"
        if len(tagged.encode("utf-8", "surrogateescape")) <= MAX_LOCAL_PART:
            return f"{tagged}@{fdomain}"
        return f"{_M365_FALLBACK_LOCAL}+SRS={self._sign(stamp, self.domain)}={stamp}@{self.domain}"

    def reverse(self, address: str) -> str:
        """The address a bounce to the SRS address ``address`` must go to.

        SRS0 and the m365 form give the original sender, SRS1 the first hop's
        SRS0 address. Raises SRSNotOurs (not an SRS address), SRSMalformed,
        SRSBadHash, SRSExpired, or SRSNotReversible (m365 fallback)."""
        _check_length(address)
        local = address.rpartition("@")[0] if "@" in address else address
        if _is_tagged(local, "srs1"):
            hash_, sep1, rest = local[5:].partition("=")
            host, sep2, opaque = rest.partition("=")
            if not hash_:
                raise SRSMalformed("no hash in SRS1 address")
            if not sep1 or not host:
                raise SRSMalformed("no host in SRS1 address")
            if not sep2 or not opaque:
                raise SRSMalformed("no user in SRS1 address")
            self._verify(hash_, host, opaque)
            return f"SRS0{opaque}@{host}"
        if _is_tagged(local, "srs0"):
            return self._reverse_fields(local[5:], "SRS0")
        i = local.lower().find(_M365_TAG)
        if i >= 0:
            rest = local[i + len(_M365_TAG):]
            if local[:i].lower() == _M365_FALLBACK_LOCAL and rest.count("=") == 1:
                hash_, _, stamp = rest.partition("=")
                if not hash_:
                    raise SRSMalformed("no hash in SRS address")
                then = self._parse_stamp(stamp)
                self._verify(hash_, stamp, address.rpartition("@")[2])
                self._check_age(then)
                raise SRSNotReversible("SRS fallback address (bounces+SRS=…): it does not carry the original"
                                       " sender, so a bounce to it cannot be passed on")
            return self._reverse_fields(rest, "SRS")
        raise SRSNotOurs("not an SRS address")

    def _reverse_fields(self, fields: str, what: str) -> str:
        """``HHHH=TT=domain=local`` -> ``local@domain`` after checking stamp and hash."""
        hash_, sep, rest = fields.partition("=")
        if not hash_:
            raise SRSMalformed(f"no hash in {what} address")
        stamp, _, rest = rest.partition("=")
        if not stamp:
            raise SRSMalformed(f"no timestamp in {what} address")
        host, _, user = rest.partition("=")
        if not host:
            raise SRSMalformed(f"no host in {what} address")
        if not user:
            raise SRSMalformed(f"no user in {what} address")
        then = self._parse_stamp(stamp)
        # The hash first: a forged address is reported as forged, never as merely expired.
        self._verify(hash_, stamp, host, user)
        self._check_age(then)
        return f"{user}@{host}"
