"""assess.spam_engines.builtin - a spam verdict without a filter daemon: GTUBE and a few measured signals

What a small installation can run in-process, in a few milliseconds. It
judges spam only on evidence that honest mail does not produce:

- ``gtube``: the GTUBE test string (the standard anti-spam test pattern);
- ``url-userinfo``: an http(s) link with a user part, ``http://www.bank.example@203.0.113.9/``:
  the classic disguise of where a link goes; RFC 9110 §4.2.4 forbids senders
  to generate it;
- ``url-encoded-host``: an http(s) link whose host name is %-encoded
  (``http://%77%77%77.example/``): legal (RFC 3986 §3.2.2) but only ever
  used to hide the host from readers and filters;
- ``not-spam-claim``: the message claims not to be spam ("this is not spam",
  "cannot be considered spam", the "Bill S.1618" boilerplate);
- ``url-ip-bulk``: a link to a public IP address (not a name), in a message
  that also has unsubscribe/removal wording or is HTML only, i.e. a bulk
  mailing that hides its sender's domain. A link to an IP address alone is
  not enough: people send each other links to their own servers and
  printers (private addresses never count).

Every signal decides alone (score = the number of signals that hit,
threshold 1). Each was kept because it hits none of the 200 ham messages of
the SpamAssassin corpus (so builtin's precision there is 1.0); candidates
that hit ham, or that would be unfair to honest mail outside a 2002 corpus,
were measured and dropped: bench/spam_corpus.py prints both lists with
their hits. The recall is low by design (a filter daemon is the real
engine): see the bench for the figures.

Only the first max_size bytes are read, and at most MAX_PARTS MIME parts;
text parts are decoded (transfer encoding, charset, HTML entities) before
the patterns run, so quoted-printable or base64 do not hide a link.

TRUST: all of it is the client's; nothing here is believed beyond the
patterns above. The trusted-connector X-Spam-Flag verdict is not here: it
applies whatever the engine, in assess/spam.py.

STANDARDS: RFC 3986 §3.2 (URI authority), RFC 9110 §4.2.4 (userinfo in
http(s) URIs), RFC 2045/2047 (MIME decoding, through the email package).

CONFIG: spam.max_size

SEE ALSO: assess/spam.py, bench/spam_corpus.py, tests/unit/test_spam_builtin.py
"""

from __future__ import annotations

import email
import email.message
import html
import ipaddress
import re
from dataclasses import dataclass
from typing import Callable

from ...model import SpamFact
from . import truncate

GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
MAX_PARTS = 100


@dataclass
class Parsed:
    """What the signals look at: decoded text of the text/* parts, the links in them, the part types."""
    text: str
    urls: list[tuple[str, str]]      # (the URL as written, its authority: userinfo@host:port)
    types: list[str]


@dataclass(frozen=True)
class Signal:
    name: str
    why: str
    test: Callable[[Parsed], str]    # evidence ("" = no hit)


# Both patterns are spelled so that Python's re can skip ahead in C to the candidates:
# a case-sensitive first letter ([hH], [tcbTCB]: the only characters those letters
# match under re.I), the word boundary checked after it ((?<!\w.) is \b one character
# back), the rest under re.I. Written as \bhttps?://… and \b(?:this…|cannot…|bill…),
# each tried at every position, they took 1-2 ms on a 30 KB message; same matches
# (tests/unit/test_spam_builtin.py compares them with those spellings).
_URL = re.compile(r"(?-i:[hH])(?<!\w.)ttps?://([^\s/?#\"'<>\\]+)[^\s\"'<>]*", re.I)
_PCT_HEX = re.compile(r"%[0-9a-f]{2}", re.I)
_NOT_SPAM = re.compile(
    r"(?-i:[tcbTCB])(?<!\w.)(?:"
    r"(?<=[tT])his\s+(?:is\s+not|isn'?t)\s+(?:a\s+)?spam"
    r"|(?<=[tT])his\s+(?:e-?mail|message|mail|letter)\s+(?:is\s+not|isn'?t)\s+(?:a\s+)?spam"
    r"|(?<=[cC])annot\s+be\s+considered\s+(?:as\s+)?(?:a\s+)?spam"
    r"|(?<=[bB])ill\s+s\.\s?1618)", re.I)
_BULK = re.compile(
    r"\b(?:to\s+be\s+removed|remove\s+me|removal\s+(?:instructions|request|link)"
    r"|opt[- ]?out|unsubscribe)", re.I)


def _text_of(part: email.message.Message) -> str:
    try:
        payload = part.get_payload(decode=True) or b""
    except Exception:                                # a broken encoding: read what is there
        payload = str(part.get_payload()).encode("latin-1", "replace")
    charset = part.get_content_charset() or "latin-1"
    try:
        text = payload.decode(charset, "replace")
    except LookupError:
        text = payload.decode("latin-1", "replace")
    if part.get_content_subtype() == "html":
        text = html.unescape(text)
    return text


_FIELD_NAME = re.compile(rb"[!-9;-~]+")           # RFC 5322 §3.6.8 ftext
_CHARSET = re.compile(rb'^\s*charset\s*=\s*(?:"([^"\\]*)"|([^\s";()<>@,:\\/\[\]?=]+))\s*$', re.I)


def _plain_text(content: bytes) -> Parsed | None:
    """The text of a one-part text/plain message without a transfer encoding (most
    machine-sent mail), read without the email package, decoded as ``_text_of``
    decodes it; None for anything else (multipart, base64, quoted-printable, HTML,
    RFC 2231 parameters, repeated or odd headers), which goes to the real parser.
    Parsing every message with the email package was 7 % of the gateway's CPU."""
    head, sep, body = content.partition(b"\r\n\r\n")
    if not sep or b"\n" in head.replace(b"\r\n", b""):
        return None
    ctype = cte = None
    for line in head.replace(b"\r\n\t", b" ").replace(b"\r\n ", b"  ").split(b"\r\n"):
        name, colon, value = line.partition(b":")
        if not colon or not _FIELD_NAME.fullmatch(name):
            return None                           # not a header section the parser would read as one
        lname = name.lower()
        if lname == b"content-type":
            if ctype is not None:
                return None
            ctype = value
        elif lname == b"content-transfer-encoding":
            if cte is not None:
                return None
            cte = value
    if cte is not None and cte.strip().lower() not in (b"7bit", b"8bit"):
        return None
    charset = None
    if ctype is not None:
        main, _, params = ctype.partition(b";")
        if main.strip().lower() != b"text/plain" or b"(" in ctype:
            return None
        for param in (p for p in params.split(b";") if p.strip()):
            m = _CHARSET.match(param)
            if m is None:
                if param.split(b"=", 1)[0].strip().lower().startswith(b"charset"):
                    return None                   # charset*=, or something the parser reads otherwise
                continue
            if charset is not None:
                return None
            charset = (m.group(1) if m.group(1) is not None else m.group(2)).decode("ascii", "replace").lower()
    try:
        text = body.decode(charset or "latin-1", "replace")
    except LookupError:
        text = body.decode("latin-1", "replace")
    return Parsed(text, _urls(text), ["text/plain"])


def parse(content: bytes, max_size: int = 512 * 1024) -> Parsed:
    content = truncate(content, max_size)
    quick = _plain_text(content)
    if quick is not None:
        return quick
    msg = email.message_from_bytes(content)
    texts, types = [], []
    for i, part in enumerate(msg.walk()):
        if i >= MAX_PARTS:
            break
        if part.is_multipart():
            continue
        types.append(part.get_content_type())
        if part.get_content_maintype() == "text":
            texts.append(_text_of(part))
    text = "\n".join(texts)
    return Parsed(text, _urls(text), types)


def _urls(text: str) -> list[tuple[str, str]]:
    # Every match holds "://": without one the scan (a \b test at every position) is skipped.
    if "://" not in text:
        return []
    return [(m.group(0)[:200], m.group(1)) for m in _URL.finditer(text)]


def _host(authority: str) -> str:
    host = authority.rpartition("@")[2]
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


_DOTTED_QUAD = re.compile(r"\d{1,3}(\.\d{1,3}){3}")
_DECIMAL_IP = re.compile(r"\d{8,10}")
_HEX_IP = re.compile(r"0x[0-9a-f]{1,8}")


def _public_ip(host: str) -> bool:
    """Is the host an IP literal of a global address? Dotted quads, and the integer and
    hex spellings browsers also accept (http://3232235777/, http://0xCB007109/)."""
    h = host.rstrip(".").lower()
    if not h or not (h[0].isdecimal() or ":" in h):
        return False            # a name (most links): none of the spellings below starts so
    try:
        if _DOTTED_QUAD.fullmatch(h) or ":" in h:
            ip = ipaddress.ip_address(h)
        elif _DECIMAL_IP.fullmatch(h):
            ip = ipaddress.ip_address(int(h))
        elif _HEX_IP.fullmatch(h):
            ip = ipaddress.ip_address(int(h, 16))
        else:
            return False
    except ValueError:
        return False
    return ip.is_global


def _userinfo(p: Parsed) -> str:
    return next((url for url, auth in p.urls if "@" in auth), "")


def _encoded_host(p: Parsed) -> str:
    return next((url for url, auth in p.urls if _PCT_HEX.search(auth.rpartition("@")[2])), "")


def _not_spam(p: Parsed) -> str:
    # Every alternative holds "spam" (in any case: casefold() maps the long s that re.I
    # matches too) or "1618": without them the scan is skipped.
    if "1618" not in p.text and "spam" not in p.text.casefold():
        return ""
    m = _NOT_SPAM.search(p.text)
    return repr(m.group(0)) if m else ""


def _ip_bulk(p: Parsed) -> str:
    url = next((url for url, auth in p.urls if _public_ip(_host(auth))), "")
    if not url:
        return ""
    html_only = "text/html" in p.types and "text/plain" not in p.types
    m = _BULK.search(p.text)
    if m:
        return f"{url} with {m.group(0)!r}"
    return f"{url} in an HTML-only message" if html_only else ""


SIGNALS: tuple[Signal, ...] = (
    Signal("url-userinfo", "a link with a user part hides where it goes (RFC 9110 §4.2.4)", _userinfo),
    Signal("url-encoded-host", "a %-encoded host name hides the host", _encoded_host),
    Signal("not-spam-claim", "honest mail does not claim not to be spam", _not_spam),
    Signal("url-ip-bulk", "a bulk mailing linking to a public IP address hides its domain", _ip_bulk),
)


def hits(content: bytes, max_size: int = 512 * 1024) -> list[tuple[str, str]]:
    """(signal name, evidence) of every signal that hits, GTUBE first."""
    out = []
    if GTUBE in content:                             # anywhere: a byte search costs nothing
        out.append(("gtube", "GTUBE test string"))
    p = parse(content, max_size)
    for s in SIGNALS:
        evidence = s.test(p)
        if evidence:
            out.append((s.name, evidence))
    return out


def check(content: bytes, max_size: int = 512 * 1024) -> SpamFact:
    found = hits(content, max_size)
    if not found:
        return SpamFact(False, "builtin", "", score=0.0, threshold=1.0)
    detail = "; ".join(f"{name}: {evidence}" if name != "gtube" else evidence for name, evidence in found)
    engine = "gtube" if found[0][0] == "gtube" else "builtin"
    return SpamFact(True, engine, detail[:500], score=float(len(found)), threshold=1.0)
