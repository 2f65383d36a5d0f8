"""rewrite.keys - the DKIM key store: per domain two selectors, one of them active

Layout (KEY_DIR is dkim.key_dir, or DATA_DIR/dkim when that is empty)::

    KEY_DIR/DOMAIN/SELECTOR.key   PEM private key, mode 0600
    KEY_DIR/DOMAIN/SELECTOR.txt   the DNS TXT record to publish, as a zone-file line
    KEY_DIR/DOMAIN/active         the selector in use (one line)

``keygen`` writes a key (RSA 2048 by default, or Ed25519) and returns the TXT
record to publish at ``SELECTOR._domainkey.DOMAIN``; the first key of a
domain becomes the active one. Keys are rotated between ``selector1`` and
``selector2``: make the other selector's key, publish its record, let DNS
catch up, then ``rotate`` switches ``active``. The old key stays on disk (and
its record should stay published for a few days: mail signed with it may
still be in transit or be re-verified).

``active_key`` never raises: a missing, unreadable or unusable key is a
``KeyProblem`` value saying why, so the caller sends the message unsigned
and says so loudly instead of stalling delivery. ``problems`` lists every
accepted domain without a usable key for ``poolmta config check`` (a
warning, not an error). ``keygen`` and ``rotate`` are operator commands:
they raise ``KeyStoreError`` with a message meant to be printed as is.

Parsed keys are cached per (directory, domain) and re-read when the
``active`` file or the key file changes (size, mtime, inode), so a rotation
takes effect on the next message without a restart.

TRUST: DOMAIN and SELECTOR become path components: both are checked to be
plain DNS names (letters, digits, hyphens, dots) before any file is touched.
Files in the key directory are the operator's and trusted; their content is
still parsed defensively.

STANDARDS: RFC 6376 §3.6.1 (key record: v=DKIM1; k=; p=), RFC 8463
(Ed25519: p= is the raw 32-byte public key), RFC 8301 (RSA keys of at least
1024 bits, 2048 recommended), RFC 1035 §3.3.14 (TXT strings of at most 255
octets).

CONFIG: dkim.key_dir, dkim.algorithm (default of `poolmta dkim keygen`),
server.data_dir

SEE ALSO: rewrite/dkim.py (signing), rewrite/arc.py (sealing), cli.py
(`poolmta dkim keygen`, `poolmta dkim rotate`, `poolmta config check`)
"""

from __future__ import annotations

import base64
import os
import re
import tempfile
import threading
from dataclasses import dataclass
from typing import Iterable, NamedTuple

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

ALGORITHMS = ("rsa-sha256", "ed25519-sha256")
SELECTORS = ("selector1", "selector2")
MIN_RSA_BITS = 1024          # RFC 8301: verifiers must not accept less
DEFAULT_RSA_BITS = 2048

_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_NAME_RE = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*$")


class KeyStoreError(Exception):
    """An operator command (keygen, rotate) was refused; the message says what to do."""


@dataclass(frozen=True)
class Key:
    """A usable signing key of one domain."""
    domain: str
    selector: str
    algorithm: str       # "rsa-sha256" | "ed25519-sha256"
    private: bytes       # as dkimpy takes it: PKCS#1 PEM (RSA) or base64 of the 32-byte seed (Ed25519)
    bits: int            # RSA modulus size; 256 for Ed25519
    path: str

    def __str__(self) -> str:
        return f"{self.domain}: selector {self.selector}, {self.algorithm} ({self.bits} bits), {self.path}"

    def __repr__(self) -> str:   # never show the private key in a log or a traceback
        return f"Key({self.domain!r}, {self.selector!r}, {self.algorithm!r}, bits={self.bits}, path={self.path!r})"


@dataclass(frozen=True)
class KeyProblem:
    """Why a domain has no usable key (its mail goes out unsigned)."""
    domain: str
    reason: str

    def __str__(self) -> str:
        return f"no usable DKIM key for {self.domain}: {self.reason}"


class Generated(NamedTuple):
    """What keygen made: the key file and the TXT record to publish."""
    path: str            # KEY_DIR/DOMAIN/SELECTOR.key
    name: str            # SELECTOR._domainkey.DOMAIN
    value: str           # v=DKIM1; k=rsa; p=...

    def zone_line(self) -> str:
        return zone_line(self.name, self.value)

    def __str__(self) -> str:
        return (f"wrote {self.path}\n"
                f"publish this DNS TXT record:\n"
                f"  name:  {self.name}\n"
                f"  value: {self.value}\n"
                f"as a zone-file line:\n{self.zone_line()}")


# ---- helpers ---------------------------------------------------------------------

def key_dir_of(cfg) -> str:
    """The configured key directory: dkim.key_dir, or DATA_DIR/dkim."""
    return cfg.dkim.key_dir or os.path.join(cfg.server.data_dir, "dkim")


def record_name(domain: str, selector: str) -> str:
    return f"{selector}._domainkey.{domain}"


def txt_strings(value: str, size: int = 255) -> list[str]:
    """The record value cut into DNS character-strings of at most 255 octets;
    a verifier joins them back without separators (RFC 6376 §3.6.2.2)."""
    return [value[i:i + size] for i in range(0, len(value), size)] or [""]


def zone_line(name: str, value: str) -> str:
    parts = "\n\t".join(f'"{s}"' for s in txt_strings(value, 250))
    return f"{name}.\tIN\tTXT\t( {parts} )"


def _norm_domain(domain: str) -> str:
    d = (domain or "").strip().rstrip(".").lower()
    if not d.isascii():
        raise KeyStoreError(f"{domain!r}: write an internationalised domain in its A-label (xn--) form")
    if not _NAME_RE.match(d) or len(d) > 253:
        raise KeyStoreError(f"{domain!r} is not a domain name")
    return d


def _norm_selector(selector: str) -> str:
    s = (selector or "").strip().lower()
    if not _NAME_RE.match(s) or len(s) > 63:
        raise KeyStoreError(f"{selector!r} is not a selector (letters, digits, hyphens, dots)")
    return s


def _write_atomic(path: str, data: bytes, mode: int) -> None:
    """Write a file whole or not at all, with its mode set before any byte is in it."""
    d = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=d)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _public_value(private) -> tuple[str, str]:
    """(algorithm, TXT record value) of a private key object."""
    if isinstance(private, rsa.RSAPrivateKey):
        spki = private.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        return "rsa-sha256", "v=DKIM1; k=rsa; p=" + base64.b64encode(spki).decode("ascii")
    if isinstance(private, ed25519.Ed25519PrivateKey):
        raw = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return "ed25519-sha256", "v=DKIM1; k=ed25519; p=" + base64.b64encode(raw).decode("ascii")
    raise KeyStoreError(f"unsupported key type {type(private).__name__}")


# ---- operator commands ---------------------------------------------------------------

def keygen(key_dir: str, domain: str, selector: str = "selector1", algorithm: str = "rsa-sha256",
           *, force: bool = False, rsa_bits: int = DEFAULT_RSA_BITS) -> Generated:
    """Make a key for DOMAIN under SELECTOR; return (path, TXT name, TXT value).

    Refuses to overwrite an existing key unless ``force`` (its record may be
    published and mail signed with it in transit). The domain's first key
    becomes the active one; otherwise ``active`` is left alone (see rotate).
    """
    if not key_dir:
        raise KeyStoreError("no key directory (dkim.key_dir, or server.data_dir)")
    d = _norm_domain(domain)
    s = _norm_selector(selector)
    if algorithm not in ALGORITHMS:
        raise KeyStoreError(f"algorithm {algorithm!r}: use one of {', '.join(ALGORITHMS)}")
    ddir = os.path.join(key_dir, d)
    path = os.path.join(ddir, s + ".key")
    if os.path.exists(path) and not force:
        raise KeyStoreError(
            f"{path} exists: {d} already has a key for selector {s} (its TXT record may be published); "
            f"use another selector, or force to replace it")
    if algorithm == "rsa-sha256":
        if rsa_bits < MIN_RSA_BITS:
            raise KeyStoreError(f"RSA keys of {rsa_bits} bits are refused by verifiers (at least {MIN_RSA_BITS})")
        private = rsa.generate_private_key(public_exponent=65537, key_size=rsa_bits)
        pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                    serialization.NoEncryption())
    else:
        private = ed25519.Ed25519PrivateKey.generate()
        pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    _, value = _public_value(private)
    name = record_name(d, s)
    os.makedirs(ddir, mode=0o700, exist_ok=True)
    _write_atomic(path, pem, 0o600)
    _write_atomic(os.path.join(ddir, s + ".txt"),
                  (zone_line(name, value) + f"  ; DKIM key {s} for {d} ({algorithm})\n").encode("ascii"), 0o644)
    if active_selector(key_dir, d) is None:
        _write_atomic(os.path.join(ddir, "active"), (s + "\n").encode("ascii"), 0o644)
    return Generated(path, name, value)


def active_selector(key_dir: str, domain: str) -> str | None:
    """The selector named in DOMAIN/active, or None when there is none (or it cannot be read)."""
    try:
        d = _norm_domain(domain)
        with open(os.path.join(key_dir, d, "active"), "rb") as f:
            return _norm_selector(f.read(256).decode("ascii", "replace"))
    except (OSError, KeyStoreError):
        return None


def rotate(key_dir: str, domain: str) -> str:
    """Switch DOMAIN's active selector selector1 <-> selector2; return the new one.

    Refused when the other selector has no usable key: make it first with
    keygen and publish its TXT record.
    """
    d = _norm_domain(domain)
    current = active_selector(key_dir, d)
    if current is None:
        raise KeyStoreError(f"{d} has no active key ({os.path.join(key_dir, d, 'active')} is missing or unreadable): "
                            f"run `poolmta dkim keygen {d}` first")
    new = "selector2" if current == "selector1" else "selector1"
    path = os.path.join(key_dir, d, new + ".key")
    if not os.path.exists(path):
        raise KeyStoreError(
            f"{d} has no key for {new} ({path} is missing): run `poolmta dkim keygen {d} --selector {new}` first, "
            f"publish the TXT record it prints, wait for DNS, then rotate")
    loaded = _load(key_dir, d, new)
    if isinstance(loaded, KeyProblem):
        raise KeyStoreError(f"cannot rotate {d} to {new}: {loaded.reason}")
    _write_atomic(os.path.join(key_dir, d, "active"), (new + "\n").encode("ascii"), 0o644)
    return new


# ---- signing side: never raises ------------------------------------------------------------

_cache: dict[tuple[str, str], tuple[tuple, Key]] = {}
_cache_lock = threading.Lock()


def _stamp(st: os.stat_result) -> tuple:
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def active_key(key_dir: str, domain: str) -> Key | KeyProblem:
    """The active key of DOMAIN, or a KeyProblem saying why there is none. Never raises."""
    try:
        if not key_dir:
            return KeyProblem(domain, "no key directory configured (dkim.key_dir, server.data_dir)")
        try:
            d = _norm_domain(domain)
        except KeyStoreError as e:
            return KeyProblem(domain, str(e))
        active = os.path.join(key_dir, d, "active")
        try:
            ast = os.stat(active)
            with open(active, "rb") as f:
                raw = f.read(256)
        except FileNotFoundError:
            return KeyProblem(d, f"{active} is missing: no key was made for it "
                                 f"(run `poolmta dkim keygen {d}` and publish the TXT record)")
        except OSError as e:
            return KeyProblem(d, f"cannot read {active}: {e.strerror or e}")
        try:
            s = _norm_selector(raw.decode("ascii"))
        except (UnicodeDecodeError, KeyStoreError):
            return KeyProblem(d, f"{active} does not name a selector: {raw[:40]!r}")
        path = os.path.join(key_dir, d, s + ".key")
        try:
            kst = os.stat(path)
        except FileNotFoundError:
            return KeyProblem(d, f"the active selector is {s} but {path} is missing")
        except OSError as e:
            return KeyProblem(d, f"cannot read {path}: {e.strerror or e}")
        stamp = (s, _stamp(ast), _stamp(kst))
        with _cache_lock:
            hit = _cache.get((key_dir, d))
        if hit and hit[0] == stamp:
            return hit[1]
        loaded = _load(key_dir, d, s)
        if isinstance(loaded, Key):
            with _cache_lock:
                _cache[(key_dir, d)] = (stamp, loaded)
        return loaded
    except Exception as e:   # the signing path must go on whatever the key store holds
        return KeyProblem(domain, f"unexpected error reading the key: {type(e).__name__}: {e}")


def _load(key_dir: str, d: str, s: str) -> Key | KeyProblem:
    path = os.path.join(key_dir, d, s + ".key")
    try:
        with open(path, "rb") as f:
            pem = f.read(1 << 16)
    except FileNotFoundError:
        return KeyProblem(d, f"{path} is missing")
    except OSError as e:
        return KeyProblem(d, f"cannot read {path}: {e.strerror or e}")
    try:
        private = serialization.load_pem_private_key(pem, password=None)
    except TypeError:
        return KeyProblem(d, f"{path} is encrypted with a passphrase; the gateway needs it unencrypted (mode 0600)")
    except Exception as e:   # ValueError, UnsupportedAlgorithm, ...
        return KeyProblem(d, f"{path} is not a usable PEM private key ({type(e).__name__}: {e})")
    if isinstance(private, rsa.RSAPrivateKey):
        if private.key_size < MIN_RSA_BITS:
            return KeyProblem(d, f"{path} is an RSA key of {private.key_size} bits: "
                                 f"verifiers ignore keys under {MIN_RSA_BITS} bits")
        pkcs1 = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                      serialization.NoEncryption())
        return Key(d, s, "rsa-sha256", pkcs1, private.key_size, path)
    if isinstance(private, ed25519.Ed25519PrivateKey):
        seed = private.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                     serialization.NoEncryption())
        return Key(d, s, "ed25519-sha256", base64.b64encode(seed), 256, path)
    return KeyProblem(d, f"{path} holds a {type(private).__name__}: DKIM signs with RSA or Ed25519 keys only")


def public_record(key: Key) -> str:
    """The TXT record value that matches KEY (what keygen printed for it)."""
    if key.algorithm == "rsa-sha256":
        private = serialization.load_pem_private_key(key.private, password=None)
    else:
        private = ed25519.Ed25519PrivateKey.from_private_bytes(base64.b64decode(key.private))
    return _public_value(private)[1]


def problems(key_dir: str, domains: Iterable[str]) -> list[str]:
    """One line per accepted domain without a usable key (its mail goes out
    unsigned), and per key file that others can read. Warnings for `config check`."""
    out: list[str] = []
    for d in sorted({(x or "").strip().rstrip(".").lower() for x in domains} - {""}):
        k = active_key(key_dir, d)
        if isinstance(k, KeyProblem):
            out.append(f"dkim: {d}: {k.reason}; mail from {d} goes out unsigned")
            continue
        try:
            mode = os.stat(k.path).st_mode & 0o777
        except OSError:
            continue
        if mode & 0o077:
            out.append(f"dkim: {d}: {k.path} has mode {mode:04o}: other users can read the private key (chmod 600 it)")
    return out
