"""A real DNS server on loopback (dnslib), serving test zones over UDP and TCP.

Zone format: {"name": {"MX": [(10, "mx.example")], "A": ["127.0.0.20"], "TXT": ["v=spf1 -all"]}}.
A TXT value is one record: a str (split into 255-octet character-strings when longer, as a
DKIM key must be) or a list of str (the record's character-strings as given). ``PTR`` values
are host names; a ``CNAME`` value (one host name) makes the server answer other types with
the alias and the target's records, as an authoritative server for both zones does.
A name listed in ``servfail`` answers SERVFAIL; one in ``drop`` never answers (timeout).
Names that are not in the zone answer NXDOMAIN (with an SOA so negative caching works);
a known name without the asked type answers NODATA.
"""

from __future__ import annotations

import socket
import threading

from dnslib import CNAME, PTR, QTYPE, RCODE, RR, A, AAAA, MX, SOA, TXT, DNSLabel
from dnslib.server import BaseResolver, DNSLogger, DNSServer


class _QuietLogger(DNSLogger):
    def __init__(self):
        super().__init__(log="-request,-reply,-truncated,-error,-recv,-send,-data", prefix=False)


class ZoneResolver(BaseResolver):
    def __init__(self, zone: dict, servfail=(), drop=()):
        self.zone = {k.lower().rstrip("."): v for k, v in zone.items()}
        self.servfail = {n.lower().rstrip(".") for n in servfail}
        self.drop = {n.lower().rstrip(".") for n in drop}
        self.queries: list[tuple[str, str]] = []

    def resolve(self, request, handler):
        reply = request.reply()
        qname = str(request.q.qname).lower().rstrip(".")
        qtype = QTYPE[request.q.qtype]
        self.queries.append((qname, qtype))
        if qname in self.drop:
            return None
        if qname in self.servfail:
            reply.header.rcode = RCODE.SERVFAIL
            return reply
        entry = self.zone.get(qname)
        soa = RR("test.", QTYPE.SOA, rdata=SOA("ns.test.", "hostmaster.test.", (1, 60, 60, 60, 5)), ttl=5)
        if entry is None:
            reply.header.rcode = RCODE.NXDOMAIN
            reply.add_auth(soa)
            return reply
        owner = request.q.qname
        for _ in range(8):                  # follow a CNAME chain inside the zone
            if qtype in entry or "CNAME" not in entry or qtype == "CNAME":
                break
            target = entry["CNAME"][0] if isinstance(entry["CNAME"], (list, tuple)) else entry["CNAME"]
            reply.add_answer(RR(owner, QTYPE.CNAME, rdata=CNAME(DNSLabel(target.rstrip(".") + ".")), ttl=60))
            owner = DNSLabel(target.rstrip(".") + ".")
            entry = self.zone.get(target.lower().rstrip("."))
            if entry is None:
                return reply
        values = entry.get(qtype, ())
        if qtype == "CNAME" and isinstance(values, str):
            values = [values]
        for value in values:
            rdata = _rdata(qtype, value)
            if rdata is not None:
                reply.add_answer(RR(owner, getattr(QTYPE, qtype), rdata=rdata, ttl=60))
        if not reply.rr:
            reply.add_auth(soa)
        return reply


def _rdata(qtype: str, value):
    if qtype == "MX":
        pref, host = value
        return MX(DNSLabel(host + "." if host else "."), pref)
    if qtype == "A":
        return A(value)
    if qtype == "AAAA":
        return AAAA(value)
    if qtype == "TXT":
        if isinstance(value, (list, tuple)):
            return TXT([_force(v) for v in value])
        raw = value.encode("utf-8") if isinstance(value, str) else value
        return TXT([raw[i:i + 255] for i in range(0, len(raw), 255)] or [b""])
    if qtype in ("PTR", "CNAME"):
        return (PTR if qtype == "PTR" else CNAME)(DNSLabel(value.rstrip(".") + "."))
    return None


def _force(v) -> bytes:
    return v.encode("utf-8") if isinstance(v, str) else v


class TestDNSServer:
    """Start with ``with TestDNSServer(zone) as dns: dns.port``."""

    __test__ = False   # not a pytest test class

    def __init__(self, zone: dict, servfail=(), drop=(), address: str = "127.0.0.1", port: int = 0):
        self.resolver = ZoneResolver(zone, servfail, drop)
        self.address = address
        self.port = port or _free_port(address)
        self.udp = DNSServer(self.resolver, address=address, port=self.port, logger=_QuietLogger())
        self.tcp = DNSServer(self.resolver, address=address, port=self.port, tcp=True, logger=_QuietLogger())

    @property
    def nameserver(self) -> str:
        return f"{self.address}:{self.port}"

    def start(self) -> "TestDNSServer":
        self.udp.start_thread()
        self.tcp.start_thread()
        return self

    def stop(self) -> None:
        for s in (self.udp, self.tcp):
            s.stop()
            s.server.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def _free_port(address: str) -> int:
    # A port free for both UDP and TCP on this address.
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
            t.bind((address, 0))
            port = t.getsockname()[1]
            try:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                    u.bind((address, port))
                    return port
            except OSError:
                continue
    raise RuntimeError("no free port")
