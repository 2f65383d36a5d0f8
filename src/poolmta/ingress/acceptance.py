"""ingress.acceptance - may this client hand us this sender, this recipient, this data?

Pure functions, no I/O (the h11 way): the strict parser of MAIL FROM / RCPT
TO arguments and their ESMTP parameters, relay control, the recipient count
and tenant rules, and the assembler that turns the lines of a DATA phase into
message bytes or a refusal. Each answer is a value: a parsed command, an
``Accept``, or a ``Refuse`` carrying the ``Reply`` that goes on the wire.

Relay control. A recipient is accepted when

- the client authenticated as a tenant user, or its IP matches a tenant
  connector: any domain, as given (forwarding addresses are still expanded);
- otherwise only in an accepted domain, and there only when it is a
  forwarding address, which is expanded to its targets (poolmta has no
  mailboxes): other local parts get ``550 5.1.1``;
- anything else is ``550 5.7.1`` relaying denied.

The message's tenant is the AUTH user's tenant, else the connector's, else
the tenant owning the forwarding address. An unauthenticated transaction
whose recipients would belong to two tenants answers the first recipient of
the second tenant with ``452 4.5.3``: RFC 5321 §4.5.3.1.10 makes the client
send those recipients again in a later transaction, so every message has
exactly one vouching tenant and nothing is lost.

Addresses are parsed strictly to RFC 5321 §4.1.2 rather than with e-mail
header rules (aiosmtpd's ``_getaddr``). The classic relay tricks cannot
reach an external address from an unauthenticated client: ``%`` and ``!``
are ordinary local-part characters, never routing (``user%other@ours`` is an
unknown user of ours); source routes (``<@ours:user@other>``) are stripped as
§4.1.1.3 allows and the remaining mailbox is checked on its own; quoted
local parts stay quoted and are looked up as they are; ``user@other@ours``,
trailing dots and empty labels are syntax errors (``501 5.1.3``); address
literals (``user@[127.0.0.1]``) are refused as recipients for everyone
(``550 5.7.1``), so an authenticated user cannot aim the gateway at an
internal host either. Domains compare case-insensitively; forwarding
lookups ignore case.

DATA. ``DataAssembler`` reads until the one real ``<CRLF>.<CRLF>``. A bare
CR or LF anywhere (including every SMTP-smuggling end-of-data variant such
as ``<LF>.<LF>`` or ``<CR>.<CR>``) never ends the message and is never split
into two: the whole message is refused with ``554 5.6.0`` once the real end
arrives. Lines over 998 octets get ``500 5.5.6``, more than the size limit
``552 5.3.4``; in each case nothing is kept.

Loops. ``check_loop`` refuses (``554 5.4.6``) a message with more Received
headers than ``server.max_hops``, or one that already carries our
Delivered-To for a forwarding address it is being forwarded for again.

TRUST: every argument is untrusted client input. The Directory answers from
configuration only; this module never calls its (slow) ``authenticate``.

STANDARDS: RFC 5321 §4.1.1.3 (source routes), §4.1.2 (path syntax),
§4.5.2 (transparency), §4.5.3.1 (size limits), §4.5.3.1.10 (452 for
recipients), RFC 1870 (SIZE), RFC 6152 (8BITMIME), RFC 6531 (SMTPUTF8,
553 5.6.7), RFC 3461 (RET, ENVID, NOTIFY, ORCPT, xtext), RFC 4954 §5 (AUTH=
MAIL parameter), RFC 3463 (enhanced status codes).

CONFIG: server.max_message_size, server.max_recipients, server.max_hops (passed in);
tenants.* through tenancy.Directory.

SEE ALSO: ingress/handler.py, ingress/server.py, tenancy.py, replies.py
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from ..model import Recipient
from ..replies import (
    R500_LINE_TOO_LONG,
    R501_BAD_ADDRESS,
    R501_SYNTAX_PARAM,
    R550_511_BAD_SRS,
    R550_511_UNKNOWN_USER,
    R550_57520_FORWARDING_DISABLED,
    R550_571_ADDRESS_LITERAL,
    R550_571_RELAY_DENIED,
    R552_534_TOO_BIG,
    R553_567_NON_ASCII,
    R554_546_FORWARD_LOOP,
    R554_546_TOO_MANY_HOPS,
    R554_560_BARE_NEWLINE,
    R555_PARAM_UNKNOWN,
    R452_453_OTHER_TENANT,
    R452_TOO_MANY_RCPTS,
    Reply,
)
from ..tenancy import ConnectorMatch


# ---- results -----------------------------------------------------------------

@dataclass(frozen=True)
class Refuse:
    """The command or message is refused with ``reply``."""
    reply: Reply

    def __str__(self) -> str:
        return str(self.reply)


@dataclass(frozen=True)
class Accept:
    """A recipient is accepted: queue ``recipients`` (expanded) for ``tenant``."""
    recipients: tuple[Recipient, ...]
    tenant: str
    via: str                          # "auth" | "connector" | "forward"


@dataclass(frozen=True)
class Mailbox:
    """A syntactically valid RFC 5321 Mailbox; domain lower-cased."""
    local: str                        # as given, or unquoted when quoting was needless
    domain: str                       # lower-case; "[…]" for an address literal
    literal: bool = False

    @property
    def address(self) -> str:
        return f"{self.local}@{self.domain}"

    @property
    def ascii(self) -> bool:
        return self.address.isascii()


@dataclass(frozen=True)
class MailParams:
    size: int | None = None           # SIZE= (RFC 1870)
    body: str = ""                    # "7BIT" | "8BITMIME" | ""
    smtputf8: bool = False
    ret: str = ""                     # "FULL" | "HDRS" | ""
    envid: str = ""                   # xtext-decoded
    auth: str = ""                    # AUTH= (RFC 4954 §5), decoded, informational only


@dataclass(frozen=True)
class RcptParams:
    notify: tuple[str, ...] = ()
    orcpt: str = ""                   # "addr-type;decoded-address"


@dataclass(frozen=True)
class MailCommand:
    address: str                      # "" = null reverse-path
    params: MailParams
    options: tuple[str, ...]          # the parameters as sent, for aiosmtpd's hook signature


@dataclass(frozen=True)
class RcptCommand:
    address: str
    params: RcptParams
    options: tuple[str, ...]


@dataclass(frozen=True)
class SessionFacts:
    """What the session has established about the client, for relay control."""
    client_ip: str
    auth_user: str = ""
    auth_tenant: str = ""
    connector: ConnectorMatch | None = None

    @property
    def tenant(self) -> str:
        """The tenant vouching for everything this client sends, if any."""
        if self.auth_tenant:
            return self.auth_tenant
        return self.connector.tenant if self.connector else ""

    @property
    def via(self) -> str:
        if self.auth_tenant:
            return "auth"
        return "connector" if self.connector else ""


class _Bad(Exception):
    def __init__(self, reply: Reply):
        self.reply = reply


# ---- address syntax (RFC 5321 §4.1.2) ----------------------------------------

_ATEXT = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-/=?^_`{|}~")
_LDH = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-")
MAX_MAILBOX = 254                     # 256-octet path minus the angle brackets (§4.5.3.1.3)
MAX_DOMAIN = 255                      # §4.5.3.1.2
MAX_LABEL = 63


def _wide(c: str) -> bool:
    """A UTF-8 character allowed by RFC 6531 (not a surrogate from undecodable bytes)."""
    return ord(c) > 127 and not 0xD800 <= ord(c) <= 0xDFFF and c.isprintable()


def _is_dot_string(s: str) -> bool:
    if not s:
        return False
    return all(atom and all(c in _ATEXT or _wide(c) for c in atom) for atom in s.split("."))


def _domain(s: str) -> str:
    """A Domain (dot-separated LDH labels, U-labels allowed), lower-cased; no trailing dot."""
    if not s or len(s) > MAX_DOMAIN:
        raise _Bad(R501_BAD_ADDRESS)
    for label in s.split("."):
        if not label or len(label) > MAX_LABEL or label[0] == "-" or label[-1] == "-":
            raise _Bad(R501_BAD_ADDRESS)
        if not all(c in _LDH or _wide(c) for c in label):
            raise _Bad(R501_BAD_ADDRESS)
    return s.lower()


def _address_literal(s: str) -> str:
    inner = s[1:-1]
    try:
        if inner[:5].lower() == "ipv6:":
            return f"[IPv6:{ipaddress.IPv6Address(inner[5:]).compressed}]"
        if re.fullmatch(r"\d{1,3}(\.\d{1,3}){3}", inner):
            return f"[{ipaddress.IPv4Address(inner)}]"
    except ValueError:
        pass
    raise _Bad(R501_BAD_ADDRESS)


def _quoted_local(s: str) -> tuple[str, str]:
    """Split '"…"@rest' into (local, rest); local unquoted when quoting was needless."""
    i, out = 1, []
    while i < len(s):
        c = s[i]
        if c == "\\":
            if i + 1 >= len(s) or not (32 <= ord(s[i + 1]) <= 126 or _wide(s[i + 1])):
                raise _Bad(R501_BAD_ADDRESS)
            out.append(s[i + 1])
            i += 2
            continue
        if c == '"':
            break
        if not (c in (" ", "!") or 35 <= ord(c) <= 126 and c != "\\" or _wide(c)):
            raise _Bad(R501_BAD_ADDRESS)
        out.append(c)
        i += 1
    else:
        raise _Bad(R501_BAD_ADDRESS)
    content, rest = "".join(out), s[i + 1:]
    # §4.1.2: '"user"' and 'user' are the same mailbox; keep the quotes only when needed.
    return (content if _is_dot_string(content) else s[:i + 1]), rest


def parse_mailbox(s: str) -> Mailbox:
    """Mailbox = Local-part "@" ( Domain / address-literal ); raises _Bad."""
    if not s or len(s.encode("utf-8", "surrogatepass")) > MAX_MAILBOX:
        raise _Bad(R501_BAD_ADDRESS)
    if s.startswith('"'):
        local, rest = _quoted_local(s)
        if not rest.startswith("@"):
            raise _Bad(R501_BAD_ADDRESS)
        domain_part = rest[1:]
    else:
        local, at, domain_part = s.partition("@")
        if not at or not _is_dot_string(local):
            raise _Bad(R501_BAD_ADDRESS)
    if domain_part.startswith("[") and domain_part.endswith("]"):
        return Mailbox(local, _address_literal(domain_part), literal=True)
    return Mailbox(local, _domain(domain_part))


def _source_route(route: str) -> None:
    """A-d-l = At-domain *( "," At-domain ): validated, then ignored (§4.1.1.3)."""
    for at_domain in route.split(","):
        if not at_domain.startswith("@"):
            raise _Bad(R501_BAD_ADDRESS)
        d = at_domain[1:]
        if d.startswith("[") and d.endswith("]"):
            _address_literal(d)
        else:
            _domain(d)


def _split_path(arg: str) -> tuple[str, str]:
    """'<path> params' → ('path', 'params'); the closing '>' found outside quotes."""
    if not arg.startswith("<"):
        raise _Bad(R501_BAD_ADDRESS.with_text("Bad address syntax: the address must be enclosed in <>"))
    i, quoted = 1, False
    while i < len(arg):
        c = arg[i]
        if quoted and c == "\\":
            i += 2
            continue
        if c == '"':
            quoted = not quoted
        elif c == ">" and not quoted:
            break
        i += 1
    else:
        raise _Bad(R501_BAD_ADDRESS)
    rest = arg[i + 1:]
    if rest and not rest.startswith(" "):
        raise _Bad(R501_BAD_ADDRESS)
    return arg[1:i], rest.strip(" ")


def parse_path(path: str, *, null_ok: bool) -> Mailbox | None:
    """The inside of <…>: None for the null path (when allowed), else the Mailbox."""
    if path == "":
        if null_ok:
            return None
        raise _Bad(R501_BAD_ADDRESS)
    if path.startswith("@"):
        route, colon, path = path.partition(":")
        if not colon:
            raise _Bad(R501_BAD_ADDRESS)
        _source_route(route)
    return parse_mailbox(path)


# ---- ESMTP parameters --------------------------------------------------------

_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*\Z")
_HEX = frozenset("0123456789ABCDEFabcdef")
MAX_ENVID = 100                       # RFC 3461 §4.4
MAX_ORCPT = 500                       # RFC 3461 §4.2


def xtext_decode(s: str) -> str | None:
    """RFC 3461 §4 xtext → text; None when ``s`` is not valid xtext."""
    out, i = [], 0
    while i < len(s):
        c = s[i]
        if c == "+":
            h = s[i + 1:i + 3]
            if len(h) != 2 or not set(h) <= _HEX:
                return None
            out.append(chr(int(h, 16)))
            i += 3
        elif 33 <= ord(c) <= 126 and c != "=":
            out.append(c)
            i += 1
        else:
            return None
    return "".join(out)


def _params(text: str) -> list[tuple[str, str | None, str]]:
    """'A=1 B' → [('A', '1', 'A=1'), ('B', None, 'B')]; keyword upper-cased."""
    out = []
    seen: set[str] = set()
    for raw in text.split():
        key, eq, value = raw.partition("=")
        if not _KEYWORD.match(key) or (eq and not value):
            raise _Bad(R501_SYNTAX_PARAM)
        if eq and not all(33 <= ord(c) <= 126 and c != "=" or _wide(c) for c in value):
            raise _Bad(R501_SYNTAX_PARAM)
        key = key.upper()
        if key in seen:
            raise _Bad(R501_SYNTAX_PARAM.with_text(f"Parameter {key} given twice"))
        seen.add(key)
        out.append((key, value if eq else None, raw))
    return out


def _bad_value(key: str, what: str) -> _Bad:
    return _Bad(R501_SYNTAX_PARAM.with_text(f"Bad {key} parameter: {what}"))


def _mail_params(items: list[tuple[str, str | None, str]]) -> MailParams:
    kw: dict = {}
    for key, value, _ in items:
        if key == "SIZE":
            if value is None or not value.isascii() or not value.isdigit() or len(value) > 20:
                raise _bad_value(key, "a number of octets is required")
            kw["size"] = int(value)
        elif key == "BODY":
            if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                raise _bad_value(key, "7BIT or 8BITMIME")
            kw["body"] = value.upper()
        elif key == "SMTPUTF8":
            if value is not None:
                raise _bad_value(key, "takes no value")
            kw["smtputf8"] = True
        elif key == "RET":
            if value is None or value.upper() not in ("FULL", "HDRS"):
                raise _bad_value(key, "FULL or HDRS")
            kw["ret"] = value.upper()
        elif key == "ENVID":
            decoded = xtext_decode(value) if value is not None else None
            if decoded is None or len(value) > MAX_ENVID or not decoded.isprintable():
                raise _bad_value(key, f"xtext of at most {MAX_ENVID} characters")
            kw["envid"] = decoded
        elif key == "AUTH":
            decoded = xtext_decode(value) if value is not None else None
            if decoded is None:
                raise _bad_value(key, "<> or an xtext mailbox")
            kw["auth"] = decoded
        else:
            raise _Bad(R555_PARAM_UNKNOWN.with_text(f"Unsupported MAIL FROM parameter {key}"))
    return MailParams(**kw)


_NOTIFY = ("SUCCESS", "FAILURE", "DELAY")


def _rcpt_params(items: list[tuple[str, str | None, str]]) -> RcptParams:
    kw: dict = {}
    for key, value, _ in items:
        if key == "NOTIFY":
            words = value.upper().split(",") if value is not None else []
            if words == ["NEVER"]:
                kw["notify"] = ("NEVER",)
            elif words and all(w in _NOTIFY for w in words) and len(set(words)) == len(words):
                kw["notify"] = tuple(words)
            else:
                raise _bad_value(key, "NEVER, or a list of SUCCESS, FAILURE, DELAY")
        elif key == "ORCPT":
            addr_type, semi, xtext = (value or "").partition(";")
            decoded = xtext_decode(xtext) if semi else None
            if (decoded is None or not decoded or not decoded.isprintable() or len(value) > MAX_ORCPT
                    or not re.fullmatch(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+", addr_type)):
                raise _bad_value(key, "addr-type;xtext (e.g. rfc822;user+40example.org)")
            kw["orcpt"] = f"{addr_type};{decoded}"
        else:
            raise _Bad(R555_PARAM_UNKNOWN.with_text(f"Unsupported RCPT TO parameter {key}"))
    return RcptParams(**kw)


def mail_params(options: list[str] | tuple[str, ...]) -> MailParams | Refuse:
    """The MAIL FROM parameters (as sent, one per item) validated and decoded."""
    try:
        return _mail_params(_params(" ".join(options)))
    except _Bad as e:
        return Refuse(e.reply)


def rcpt_params(options: list[str] | tuple[str, ...]) -> RcptParams | Refuse:
    """The RCPT TO parameters validated and decoded (NOTIFY, ORCPT)."""
    try:
        return _rcpt_params(_params(" ".join(options)))
    except _Bad as e:
        return Refuse(e.reply)


def _command_arg(arg: str, keyword: str) -> str:
    if arg[:len(keyword)].upper() != keyword:
        verb = "MAIL" if keyword == "FROM:" else "RCPT"
        raise _Bad(R501_SYNTAX_PARAM.with_text(f"Syntax: {verb} {keyword}<address> [parameters]"))
    # RFC 5321 allows no space after the colon; nearly every server tolerates one.
    return arg[len(keyword):].lstrip(" ")


def parse_mail(arg: str, *, esmtp: bool) -> MailCommand | Refuse:
    """The argument of MAIL ("FROM:<addr> params") → MailCommand or Refuse."""
    try:
        path, rest = _split_path(_command_arg(arg, "FROM:"))
        if rest and not esmtp:
            raise _Bad(R501_SYNTAX_PARAM.with_text("Parameters need EHLO"))
        mbox = parse_path(path, null_ok=True)
        items = _params(rest)
        params = _mail_params(items)
        if mbox is not None and not mbox.ascii and not params.smtputf8:
            raise _Bad(R553_567_NON_ASCII)
        return MailCommand(mbox.address if mbox else "", params, tuple(raw for _, _, raw in items))
    except _Bad as e:
        return Refuse(e.reply)


def parse_rcpt(arg: str, *, esmtp: bool, smtputf8: bool) -> RcptCommand | Refuse:
    """The argument of RCPT ("TO:<addr> params") → RcptCommand or Refuse.

    ``<Postmaster>`` without a domain (§4.1.1.3) is read as an address with no
    mailbox here: poolmta has no mailboxes, so it is an unknown user."""
    try:
        path, rest = _split_path(_command_arg(arg, "TO:"))
        if rest and not esmtp:
            raise _Bad(R501_SYNTAX_PARAM.with_text("Parameters need EHLO"))
        if path.lower() == "postmaster":
            raise _Bad(R550_511_UNKNOWN_USER)
        mbox = parse_path(path, null_ok=False)
        assert mbox is not None
        items = _params(rest)
        params = _rcpt_params(items)
        if not mbox.ascii and not smtputf8:
            raise _Bad(R553_567_NON_ASCII)
        return RcptCommand(mbox.address, params, tuple(raw for _, _, raw in items))
    except _Bad as e:
        return Refuse(e.reply)


def valid_helo(name: str) -> bool:
    """An EHLO/HELO argument we are willing to record in a Received header:
    one word of printable characters (a domain or an address literal; we do
    not insist, as many clients send their bare host name)."""
    return bool(name) and len(name) <= MAX_DOMAIN + 2 and all(
        (33 <= ord(c) <= 126) or _wide(c) for c in name)


# ---- policy --------------------------------------------------------------------

def check_mail(params: MailParams, *, max_size: int) -> Refuse | None:
    """A declared SIZE over the limit is refused before any data is sent (RFC 1870)."""
    if params.size is not None and params.size > max_size:
        return Refuse(R552_534_TOO_BIG)
    return None


def check_recipient(address: str, facts: SessionFacts, directory, *,
                    notify: tuple[str, ...] = (), orcpt: str = "", mail_from: str = "",
                    srs=None) -> Accept | Refuse:
    """Relay control for one forward-path (see the module docstring)."""
    try:
        mbox = parse_path(address, null_ok=False)
    except _Bad as e:
        return Refuse(e.reply)
    assert mbox is not None
    if mbox.literal:
        return Refuse(R550_571_ADDRESS_LITERAL)
    given = mbox.address
    local_tenant = directory.tenant_of_domain(mbox.domain)
    if srs is not None and local_tenant and srs.is_srs(given):
        return _srs_bounce(given, local_tenant, srs, orcpt)
    fwd = directory.forward_targets(given)
    expanded: tuple[Recipient, ...] = ()
    if fwd:
        ftenant, targets = fwd
        if not directory.auto_forwarding(ftenant):
            # Exchange Online's automatic forwarding control: accepted, not forwarded,
            # and an external, non-null sender is told so by DSN (5.7.520).
            # The DSN goes to an external, non-null sender; whether it is sent at all is
            # decided later, once SPF/DKIM have vouched for that sender (never backscatter).
            sender_domain = mail_from.rpartition("@")[2].rstrip(".").lower() if mail_from else ""
            tell = bool(mail_from) and not directory.is_accepted(ftenant, sender_domain)
            expanded = (Recipient(given, notify if tell else ("NEVER",), orcpt or f"rfc822;{given}", original=given,
                                  refused=str(R550_57520_FORWARDING_DISABLED)),)
        else:
            # RFC 3461 §4.2: keep the address the client gave as ORCPT when it gave none.
            expanded = tuple(Recipient(t, notify, orcpt or f"rfc822;{given}", original=given) for t in targets)
    if facts.tenant:
        return Accept(expanded or (Recipient(given, notify, orcpt),), facts.tenant, facts.via)
    if not local_tenant:
        return Refuse(R550_571_RELAY_DENIED)
    if not expanded:
        return Refuse(R550_511_UNKNOWN_USER)
    return Accept(expanded, fwd[0], "forward")


def _srs_bounce(given: str, tenant: str, srs, orcpt: str) -> Accept | Refuse:
    """A bounce coming back to an address we rewrote with SRS: deliver it to the
    original sender. Only a valid, unexpired address of ours is accepted, so SRS
    never turns into an open relay; anything else is an unknown user."""
    from ..rewrite.srs import SRSError
    try:
        original = srs.reverse(given)
    except SRSError as e:
        return Refuse(R550_511_BAD_SRS.with_text(f"{R550_511_BAD_SRS.text} ({e})"))
    # NOTIFY=NEVER: this is a bounce on its way back; a failure to deliver it makes no further DSN.
    return Accept((Recipient(original, ("NEVER",), orcpt or f"rfc822;{given}", original=given),), tenant, "srs")


def add_recipients(current: tuple[Recipient, ...], tenant: str, accept: Accept, *,
                   max_recipients: int) -> tuple[tuple[Recipient, ...], str] | Refuse:
    """Add an accepted recipient to the transaction: (recipients, tenant) or Refuse.

    Duplicates (same address, any case) are kept once. The count is of the
    recipients that will be queued, after forwarding expansion."""
    if tenant and accept.tenant != tenant:
        return Refuse(R452_453_OTHER_TENANT)
    have = {r.address.lower() for r in current}
    new = []
    for r in accept.recipients:
        if r.address.lower() not in have:
            have.add(r.address.lower())
            new.append(r)
    if len(current) + len(new) > max_recipients:
        return Refuse(R452_TOO_MANY_RCPTS)
    return current + tuple(new), accept.tenant


# ---- DATA ------------------------------------------------------------------------

MAX_LINE = 998                        # octets of text per line, CRLF excluded (RFC 5322 §2.1.1)


class DataAssembler:
    """The DATA phase, sans I/O: feed it the chunks the reader returns, in order,
    until ``feed`` returns True; then ``result()`` is the message or a Refuse.

    A chunk is any run of bytes in stream order; the server reads up to each
    ``.<CRLF>`` (``StreamReader.readuntil(b".\\r\\n")``, or what it holds when a
    stretch has none), so a chunk holds many lines and the end of data can only
    be at the end of a chunk. Only a ``.<CRLF>`` that starts a line (after a CRLF,
    or at the very start of DATA) ends the message. The checks run once over the
    whole message, in C (bytes.count, split, replace), not per line in Python:
    reading 4 KB line by line was a tenth of the gateway's CPU.
    """

    def __init__(self, max_size: int, max_line: int = MAX_LINE):
        self.max_size, self.max_line = max_size, max_line
        self.size = 0
        self.too_big = False
        self.done = False
        self._parts: list[bytes] = []
        self._last2 = b"\r\n"           # the DATA command's own CRLF: a first line "." ends DATA

    def feed(self, chunk: bytes) -> bool:
        """Take one chunk; True once the real end-of-data line has been seen."""
        if self.done:
            raise RuntimeError("data already complete")
        end = chunk.endswith(b".\r\n") and (self._last2 + chunk)[-5:-3] == b"\r\n"
        if end:
            chunk = chunk[:-3]                         # the "." line is not content; its CRLF-before is
        self.size += len(chunk)
        if self.size > self.max_size * 4 // 3 + 3:     # past any doubt: unstuffing removes at most 1 byte in 4
            self.too_big = True
        if self.too_big:
            self._parts.clear()                        # refused anyway: keep nothing
        elif chunk:
            self._parts.append(chunk)
        if chunk:
            self._last2 = (self._last2 + chunk)[-2:]
        self.done = end
        return end

    def result(self) -> bytes | Refuse:
        """The message (CRLF line ends, dot-stuffing undone) or why it is refused."""
        if not self.done:
            raise RuntimeError("data not complete")
        if self.too_big:
            return Refuse(R552_534_TOO_BIG)
        raw = b"".join(self._parts)
        crlf = raw.count(b"\r\n")
        if raw.count(b"\r") != crlf or raw.count(b"\n") != crlf or (raw and not raw.endswith(b"\r\n")):
            return Refuse(R554_560_BARE_NEWLINE)
        # Transparency (RFC 5321 §4.5.2): the first "." of every line that starts with one.
        content = (raw[1:] if raw.startswith(b".") else raw).replace(b"\r\n.", b"\r\n")
        if len(content) > self.max_size:
            return Refuse(R552_534_TOO_BIG)
        if len(content) > self.max_line and max(map(len, content.split(b"\r\n"))) > self.max_line:
            return Refuse(R500_LINE_TOO_LONG)
        return content


# ---- mail loops --------------------------------------------------------------

def _header_lines(content: bytes) -> list[bytes]:
    """The unfolded header field names and values of the message (only the header block)."""
    end = content.find(b"\r\n\r\n")
    block = content if end < 0 else content[:end]
    out: list[bytes] = []
    for line in block.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and out:
            out[-1] += line
        else:
            out.append(line)
    return out


def check_loop(content: bytes, recipients: tuple[Recipient, ...], max_hops: int) -> Refuse | None:
    """RFC 5321 §6.3: refuse a message that has been round too often.

    Two tests, as Postfix does: more Received headers than ``max_hops``
    (hopcount_limit), and a forwarding address that this message was already
    forwarded for (our Delivered-To header, as local(8) does): a loop of
    forwarding addresses stops at its first turn instead of multiplying.
    """
    lines = _header_lines(content)
    hops = sum(1 for h in lines if h[:9].lower() == b"received:")
    if hops > max_hops:
        return Refuse(R554_546_TOO_MANY_HOPS)
    forwarded_for = {r.original.lower() for r in recipients if r.original}
    if forwarded_for:
        seen = {h[13:].strip().strip(b"<>").decode("utf-8", "replace").lower()
                for h in lines if h[:13].lower() == b"delivered-to:"}
        if forwarded_for & seen:
            return Refuse(R554_546_FORWARD_LOOP)
    return None
