"""assess.received_chain - the original client IP behind a connector, from the Received chain

Skip listing (what Microsoft calls Enhanced Filtering for Connectors): when
mail reaches us through a relay of the tenant's or a third-party filter,
the connecting client is not the original sender, and SPF against it says
nothing. The Received headers say who handed the message to each hop; the
original client is the first hop, newest to oldest, that is not skipped.

The hops, newest first, are: the connecting client itself (the connector),
then the client named in each Received header from the top down (the top
one was written by the connector and names who connected to it). A hop is
skipped when ``skip_last_hop`` is set and it is the connecting client, when
its address is in one of the ``skip_ips`` networks, or when it is localhost
(127.0.0.1 or ::1: a content filter handing mail back to the same host, never
an original sender). The first hop not skipped is the original client.

Only headers written by skipped (so trusted) hops are believed: the walk
stops at the first hop that is not skipped, so whatever a sender forged
further down is never read. For the same reason a header that records a
hand-over ("from ...") without an address we can read ends the walk: the
hops below it are not known to be ours, so none of them can be the answer
and the connecting client stands (SPF against a relay will not pass: the
safe failure). A header without a "from" clause records a local event on
the host that wrote the header below it (qmail's "invoked from network",
Postfix's "from userid"): it is no hop, and the walk passes over it.

Everything here is pure: headers in, an answer out.

TRUST: Received headers are untrusted text, believed only as far as the
skipped hops wrote them (see above). At most ``MAX_HOPS`` headers are read.

STANDARDS: RFC 5321 §4.4 (trace information: "from" Extended-Domain with
TCP-info), RFC 5322 §3.6.7; the de-facto Received formats of Postfix,
Sendmail, Exim, qmail, Exchange/Microsoft 365, Gmail and others.

CONFIG: tenants.*.connectors.skip_ips, skip_last_hop (through tenancy.ConnectorMatch)

SEE ALSO: assess/inbound_auth.py, tenancy.py
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from email.parser import BytesHeaderParser
from email.policy import compat32

from .dsn import header_block

MAX_HOPS = 50

_Address = ipaddress.IPv4Address | ipaddress.IPv6Address
_Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# "[192.0.2.1]", "[IPv6:2001:db8::1]", "[2001:db8::1]", with an optional ":port" (Exim) after it.
_BRACKETED = re.compile(r"\[(?:IPv6:)?([0-9A-Fa-f:.]+)\](?::\d+)?")
# A bare address as a token of its own: "(192.0.2.1)", "(2603:10b6:5:1b0::15)", "192.0.2.1 - 192.0.2.1".
_BARE = re.compile(r"(?<![\w.:\-])([0-9A-Fa-f]*:[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*|\d{1,3}(?:\.\d{1,3}){3})(?![\w.:\-])")
# What a client called itself: "helo=name", "HELO name", "(helo=[10.0.0.1])", "EHLO name".
_HELO = re.compile(r"\b(?:helo|ehlo)(?:=|\s+)\S+", re.IGNORECASE)


@dataclass(frozen=True)
class OriginalClient:
    ip: str                     # the original client IP ("" only when client_ip was empty)
    hop: int                    # 0 = the connecting client; n = the client named in the n-th Received header
    detail: str = ""            # how it was found, for the trace


def received_headers(content: bytes, limit: int = MAX_HOPS) -> list[str]:
    """The Received header values, unfolded, in header order (newest first)."""
    h = BytesHeaderParser(policy=compat32).parsebytes(header_block(content))
    out = []
    for value in h.get_all("Received") or ():
        out.append(" ".join(str(value).split()))
        if len(out) >= limit:
            break
    return out


def _address(text: str) -> _Address | None:
    try:
        a = ipaddress.ip_address(text)
    except ValueError:
        return None
    if a.version == 6 and a.ipv4_mapped:
        a = a.ipv4_mapped
    return None if a.is_unspecified else a


def _from_clause(received: str) -> tuple[str, list[str]] | None:
    """The "from" part of a Received value: (its text outside comments, its comments), or None.

    The clause ends at the first "by", "via", "with", "id", "for" or ";" outside comments.
    """
    text = received.strip()
    if not re.match(r"from\s", text, re.IGNORECASE):
        return None
    outside: list[str] = []
    comments: list[str] = []
    depth = 0
    current: list[str] = []
    i = 4
    while i < len(text):
        ch = text[i]
        if ch == "(":
            if depth == 0:
                current = []
            else:
                current.append(ch)
            depth += 1
        elif ch == ")" and depth:
            depth -= 1
            if depth == 0:
                comments.append("".join(current))
            else:
                current.append(ch)
        elif depth:
            current.append(ch)
        else:
            if ch == ";":
                break
            m = re.match(r"\s(?:by|via|with|id|for)\s", text[i:i + 6], re.IGNORECASE) if ch.isspace() else None
            if m:
                break
            outside.append(ch)
        i += 1
    return "".join(outside), comments


def names_a_hop(received: str) -> bool:
    """Does the header record a client handing the message over ("from ...")?"""
    return _from_clause(received) is not None


def hop_ip(received: str) -> str:
    """The address of the client a Received header records ("" when it names none).

    In order of trust: an address in brackets inside the TCP-info comment
    (Postfix/Sendmail "(host [192.0.2.1])", Exim "([192.0.2.1] helo=x)"),
    a bare address as the comment (Exchange/qmail "(192.0.2.1)"), an address
    in brackets after "from" (Exim "from [192.0.2.1]", "from host [192.0.2.1]"),
    a bare address as the "from" name. What the client claimed in HELO never
    counts: "from [10.0.0.1] (host [192.0.2.1])" is 192.0.2.1.
    """
    clause = _from_clause(received)
    if clause is None:
        return ""
    outside, comments = clause
    comments = [_HELO.sub(" ", c) for c in comments]
    for pattern in (_BRACKETED, _BARE):
        for c in comments:
            for m in pattern.finditer(c):
                a = _address(m.group(1))
                if a is not None:
                    return str(a)
    for pattern in (_BRACKETED, _BARE):
        for m in pattern.finditer(outside):
            a = _address(m.group(1))
            if a is not None:
                return str(a)
    return ""


def parse_networks(skip_ips) -> tuple[_Network, ...]:
    out = []
    for n in skip_ips:
        try:
            out.append(ipaddress.ip_network(n, strict=False))
        except ValueError:
            continue                        # config validated them; a bad one skips nothing
    return tuple(out)


_LOCALHOST = (ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1"))


def _skipped(a: _Address, networks: tuple[_Network, ...]) -> bool:
    # Only localhost itself: a content filter re-injects there. The rest of 127/8
    # stays a distinct host (several test hosts on one machine use it so).
    return a in _LOCALHOST or any(a.version == n.version and a in n for n in networks)


def original_client(client_ip: str, received: list[str], skip_ips=(), skip_last_hop: bool = False) -> OriginalClient:
    """The first hop, newest to oldest, that is not skipped (see the module notes)."""
    networks = parse_networks(skip_ips)
    client = _address(client_ip)
    if client is None:
        return OriginalClient(client_ip, 0, "connecting client (not an IP address)")
    if not skip_last_hop and not _skipped(client, networks):
        return OriginalClient(str(client), 0, "connecting client")
    why = "connector skipped (skip_last_hop)" if skip_last_hop else f"connector {client} skip-listed"
    for n, value in enumerate(received[:MAX_HOPS], start=1):
        if not names_a_hop(value):
            continue                        # a local event ("by host (Postfix, from userid 5)", "(qmail 1 invoked
            #                                 from network)") written by the host the hop above named: no new hop
        ip = hop_ip(value)
        if not ip:
            return OriginalClient(str(client), 0, f"{why}; Received header {n} names no client address,"
                                                  " so the chain below it is not trusted: connecting client used")
        a = _address(ip)
        if not _skipped(a, networks):
            return OriginalClient(str(a), n, f"{why}; Received header {n}: first hop not skipped")
    return OriginalClient(str(client), 0, f"{why}; every hop in the Received chain is skipped: connecting client used")
