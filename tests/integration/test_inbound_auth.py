"""The inbound_auth fact against a real DNS server on loopback, through the caching resolver the gateway uses.

SPF records and DKIM keys are TXT records in the test zone; the DKIM key pair
is made here and messages are signed with dkimpy. The header helpers
(authres_value, strip_our_authres) are pure and tested at the end.
"""

from __future__ import annotations

import asyncio
import base64
import time

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from poolmta import config
from poolmta.assess import Context
from poolmta.assess.inbound_auth import aligned, check, org_domain, strip_our_authres
from poolmta.config import AuthConfig
from poolmta.dns import CachingResolver, Rcode
from poolmta.model import Envelope, Message, Origin, Recipient
from poolmta.tenancy import Directory
from tests.support.configs import POOLS
from tests.support.dnsserver import TestDNSServer

HOSTNAME = "gw.poolmta.test"
AUTHORISED = "192.0.2.10"           # in sender.test's SPF record
STRANGER = "192.0.2.99"
FILTER = "198.51.100.7"             # connector with skip listing (a filtering service in front of us)
ONPREM = "203.0.113.5"              # connector without skip listing
RELAY = "198.51.100.77"             # connector that skips its own hop (skip_last_hop)

CFG = config.loads(POOLS + f"""
[tenants.contoso]
accepted_domains = ["contoso.test"]
connectors = [
  {{ name = "filter", client_ips = ["{FILTER}/32"], skip_ips = ["198.51.100.0/24", "10.0.0.0/8"] }},
  {{ name = "onprem", client_ips = ["{ONPREM}/32"] }},
  {{ name = "relay", client_ips = ["{RELAY}/32"], skip_last_hop = true }},
]
""")


def _keypair():
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption())
    der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem, "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode()


SENDER_KEY, SENDER_DNS = _keypair()
OTHER_KEY, OTHER_DNS = _keypair()

ZONE = {
    "sender.test": {"TXT": ["v=spf1 include:_spf.sender.test -all", "some-site-verification=abc"],
                    "MX": [(10, "mx.sender.test")]},
    "_spf.sender.test": {"TXT": [["v=spf1 ip4:", f"{AUTHORISED}/32 ", "ptr:ptr.sender.test ~all"]]},
    "sel1._domainkey.sender.test": {"TXT": [SENDER_DNS]},           # 400 octets: two character-strings
    "sel1._domainkey.other.test": {"TXT": [OTHER_DNS]},
    "alias._domainkey.sender.test": {"CNAME": "sel1._domainkey.sender.test"},
    "testing._domainkey.sender.test": {"TXT": [SENDER_DNS + "; t=y"]},
    "other.test": {"TXT": ["v=spf1 -all"]},
    "broken.test": {"TXT": ["v=spf1 -all"]},
    "mail.ptr.sender.test": {"A": ["192.0.2.20"]},
    "20.2.0.192.in-addr.arpa": {"PTR": ["mail.ptr.sender.test"]},
}


@pytest.fixture(scope="module")
def dns_server():
    with TestDNSServer(ZONE, servfail=["broken.test", "sel1._domainkey.broken.test"],
                       drop=["slow.test"]) as d:
        yield d


@pytest.fixture
def ctx(dns_server):
    resolver = CachingResolver([("127.0.0.1", dns_server.port)], timeout=1.0)
    return Context(resolver, Directory(CFG), AuthConfig(), HOSTNAME)


BODY = (b"From: Alice <alice@sender.test>\r\nTo: bob@forward.contoso.test\r\nSubject: inbound auth\r\n"
        b"Date: Mon, 04 Mar 2024 10:00:00 +0000\r\nMessage-ID: <auth-1@sender.test>\r\n\r\n"
        b"Hello Bob,\r\nthis is a test.\r\n")


def signed(content: bytes, domain: bytes = b"sender.test", key: bytes = SENDER_KEY, selector: bytes = b"sel1") -> bytes:
    sig = dkim.sign(content, selector, domain, key, canonicalize=(b"relaxed", b"relaxed"),
                    include_headers=[b"from", b"to", b"subject", b"date", b"message-id"])
    return sig + content


def message(client_ip: str, content: bytes = BODY, mail_from: str = "alice@sender.test", connector: str = "",
            auth_user: str = "", kind: str = "smtp", helo: str = "mail.sender.test") -> Message:
    return Message("Q1", Envelope(mail_from, (Recipient("bob@example.org"),)),
                   Origin(client_ip, helo=helo, auth_user=auth_user, tenant="contoso" if connector else "",
                          connector=connector, kind=kind), content, time.time())


async def test_spf_pass_from_an_authorised_ip(ctx):
    f = await check(message(AUTHORISED), ctx)
    assert (f.evaluated, f.original_ip, f.spf, f.spf_identity, f.spf_domain) == (
        True, AUTHORISED, "pass", "mailfrom", "sender.test")
    assert f.dkim == () and not f.dkim_aligned_pass and f.sender_authenticated
    assert f.authres == f"{HOSTNAME}; spf=pass (sender IP is {AUTHORISED}) smtp.mailfrom=sender.test; dkim=none"


async def test_spf_fail_from_another_ip(ctx):
    f = await check(message(STRANGER), ctx)
    assert (f.spf, f.original_ip) == ("fail", STRANGER)
    assert not f.sender_authenticated
    assert "spf=fail" in f.authres


async def test_spf_ptr_mechanism_over_the_wire(ctx):
    # _spf.sender.test ends in "ptr:ptr.sender.test ~all": 192.0.2.20's PTR names mail.ptr.sender.test,
    # whose A record is 192.0.2.20 again: a validated name under ptr.sender.test.
    assert (await check(message("192.0.2.20"), ctx)).spf == "pass"


async def test_dkim_pass_aligned_makes_up_for_an_spf_fail(ctx):
    f = await check(message(STRANGER, signed(BODY)), ctx)
    assert f.spf == "fail"
    assert [(r.domain, r.selector, r.result) for r in f.dkim] == [("sender.test", "sel1", "pass")]
    assert f.dkim_aligned_pass and f.sender_authenticated
    assert "dkim=pass header.d=sender.test header.s=sel1" in f.authres


async def test_dkim_alignment_is_relaxed_to_the_organisational_domain(ctx):
    f = await check(message(STRANGER, signed(BODY), mail_from="bounces@mail.sender.test"), ctx)
    assert f.dkim_aligned_pass


async def test_dkim_pass_from_another_organisation_is_not_aligned(ctx):
    f = await check(message(STRANGER, signed(BODY, b"other.test", OTHER_KEY)), ctx)
    assert [(r.domain, r.result) for r in f.dkim] == [("other.test", "pass")]
    assert not f.dkim_aligned_pass and not f.sender_authenticated


async def test_every_signature_counts_and_a_broken_one_does_not_spoil_a_good_one(ctx):
    content = signed(signed(BODY, b"other.test", OTHER_KEY))            # other.test first, sender.test on top
    tampered = signed(BODY, b"sender.test", SENDER_KEY, b"alias")        # key found through a CNAME
    tampered = tampered.replace(b"this is a test", b"this is a tost")
    f = await check(message(STRANGER, signed(content)), ctx)
    assert [(r.domain, r.result) for r in f.dkim] == [
        ("sender.test", "pass"), ("sender.test", "pass"), ("other.test", "pass")]
    g = await check(message(STRANGER, tampered), ctx)
    assert [(r.selector, r.result) for r in g.dkim] == [("alias", "fail")] and not g.dkim_aligned_pass


async def test_a_key_in_testing_mode_does_not_vouch_for_the_sender(ctx):
    f = await check(message(STRANGER, signed(BODY, selector=b"testing")), ctx)
    assert [(r.selector, r.result) for r in f.dkim] == [("testing", "pass")]
    assert not f.dkim_aligned_pass and not f.sender_authenticated


RECEIVED = (b"Received: from mail.sender.test (mail.sender.test [192.0.2.10]) by mx1.filter.test (Postfix)"
            b" with ESMTPS id 4T1x2y; Mon, 04 Mar 2024 10:00:01 +0000\r\n")
RECEIVED_INTERNAL = (b"Received: from mx1.filter.test (mx1.filter.test [10.1.2.3]) by out.filter.test (Postfix)"
                     b" with ESMTP id 5U2y3z; Mon, 04 Mar 2024 10:00:02 +0000\r\n")


async def test_skip_listing_finds_the_original_ip_and_without_it_spf_fails(ctx):
    content = RECEIVED_INTERNAL + RECEIVED + BODY
    via_filter = await check(message(FILTER, content, connector="filter", helo="out.filter.test"), ctx)
    assert (via_filter.original_ip, via_filter.spf) == (AUTHORISED, "pass")
    assert f"sender IP is {AUTHORISED}" in via_filter.authres
    via_onprem = await check(message(ONPREM, content, connector="onprem", helo="out.filter.test"), ctx)
    assert (via_onprem.original_ip, via_onprem.spf) == (ONPREM, "fail")


async def test_skip_last_hop(ctx):
    f = await check(message(RELAY, RECEIVED + BODY, connector="relay"), ctx)
    assert (f.original_ip, f.spf) == (AUTHORISED, "pass")


async def test_null_sender_uses_the_helo_identity(ctx):
    f = await check(message(AUTHORISED, mail_from="", helo="sender.test"), ctx)
    assert (f.spf, f.spf_identity, f.spf_domain) == ("pass", "helo", "sender.test")
    assert "smtp.helo=sender.test" in f.authres
    behind = await check(message(FILTER, RECEIVED + BODY, mail_from="", connector="filter"), ctx)
    assert (behind.original_ip, behind.spf) == (AUTHORISED, "none")     # the original HELO is not known


async def test_not_evaluated_for_auth_submissions_and_our_own_dsns(ctx):
    assert not (await check(message(STRANGER, auth_user="alice"), ctx)).evaluated
    assert not (await check(message(STRANGER, mail_from="", kind="dsn"), ctx)).evaluated
    assert (await check(message(STRANGER, kind="cli"), ctx)).evaluated


async def test_dns_failures_are_temperror_never_an_exception(ctx):
    broken = BODY.replace(b"alice@sender.test", b"alice@broken.test")
    content = signed(broken, b"broken.test", SENDER_KEY)
    f = await check(message(AUTHORISED, content, mail_from="alice@broken.test"), ctx)
    assert f.spf == "temperror"
    assert [r.result for r in f.dkim] == ["temperror"]
    assert not f.sender_authenticated and "spf=temperror" in f.authres


async def test_the_spf_deadline_is_respected(dns_server):
    # slow.test never answers; the resolver would wait 5 s, auth.spf_timeout is 0.3 s.
    resolver = CachingResolver([("127.0.0.1", dns_server.port)], timeout=5.0)
    ctx = Context(resolver, Directory(CFG), AuthConfig(spf_timeout=0.3), HOSTNAME)
    t0 = asyncio.get_running_loop().time()
    f = await check(message(AUTHORISED, mail_from="alice@slow.test"), ctx)
    assert f.spf == "temperror"
    assert asyncio.get_running_loop().time() - t0 < 2.0


async def test_authserv_id_from_config(dns_server):
    resolver = CachingResolver([("127.0.0.1", dns_server.port)], timeout=1.0)
    ctx = Context(resolver, Directory(CFG), AuthConfig(authserv_id="auth.contoso.test"), HOSTNAME)
    assert (await check(message(AUTHORISED), ctx)).authres.startswith("auth.contoso.test; spf=pass")


async def test_txt_ptr_and_cname_over_the_wire(ctx):
    key = await ctx.resolver.query("sel1._domainkey.sender.test", "TXT")
    assert key.records == (SENDER_DNS,)                 # two character-strings joined with nothing between
    assert (await ctx.resolver.query("_spf.sender.test", "TXT")).records == (
        f"v=spf1 ip4:{AUTHORISED}/32 ptr:ptr.sender.test ~all",)
    assert (await ctx.resolver.query("20.2.0.192.in-addr.arpa", "PTR")).records == ("mail.ptr.sender.test",)
    assert (await ctx.resolver.query("alias._domainkey.sender.test", "TXT")).records == (SENDER_DNS,)
    assert (await ctx.resolver.query("nosuch.sender.test", "TXT")).rcode == Rcode.NXDOMAIN


# ---- pure helpers ------------------------------------------------------------------

def test_org_domain_and_alignment():
    assert org_domain("mail.sender.test") == "sender.test"
    assert org_domain("a.b.example.co.uk") == "example.co.uk"
    assert org_domain("example.com.") == "example.com"
    assert aligned("sender.test", "bounces.sender.test") and aligned("SENDER.test", "sender.test")
    assert not aligned("other.test", "sender.test") and not aligned("example.co.uk", "other.co.uk")
    assert not aligned("sender.test", "")


def test_strip_our_authres_removes_only_ours():
    content = (b"Received: from x (x [192.0.2.1]) by gw.poolmta.test; Mon, 4 Mar 2024 10:00:00 +0000\r\n"
               b"Authentication-Results: GW.poolmta.test; spf=pass smtp.mailfrom=forged.test\r\n"
               b"authentication-results: (comment) gw.poolmta.test 1;\r\n\tdkim=pass header.d=forged.test\r\n"
               b"Authentication-Results:\r\n gw.poolmta.test; dmarc=pass\r\n"
               b"Authentication-Results: \"gw.poolmta.test\"; arc=pass\r\n"
               b"Authentication-Results: mx.example.org; spf=pass smtp.mailfrom=sender.test\r\n"
               b"Authentication-Results: gw.poolmta.test.evil.test; spf=pass\r\n"
               b"ARC-Authentication-Results: i=1; gw.poolmta.test; spf=pass\r\n"
               b"Subject: hi\r\n\r\nAuthentication-Results: gw.poolmta.test; in the body stays\r\n")
    out = strip_our_authres(content, "gw.poolmta.test")
    assert out == (b"Received: from x (x [192.0.2.1]) by gw.poolmta.test; Mon, 4 Mar 2024 10:00:00 +0000\r\n"
                   b"Authentication-Results: mx.example.org; spf=pass smtp.mailfrom=sender.test\r\n"
                   b"Authentication-Results: gw.poolmta.test.evil.test; spf=pass\r\n"
                   b"ARC-Authentication-Results: i=1; gw.poolmta.test; spf=pass\r\n"
                   b"Subject: hi\r\n\r\nAuthentication-Results: gw.poolmta.test; in the body stays\r\n")
    assert strip_our_authres(content.replace(b"\r\n", b"\n"), "gw.poolmta.test") == out.replace(b"\r\n", b"\n")
    assert strip_our_authres(BODY, "gw.poolmta.test") == BODY


async def test_our_authres_value_parses_back(ctx):
    import authres
    f = await check(message(STRANGER, signed(BODY)), ctx)
    parsed = authres.AuthenticationResultsHeader.parse_value(f.authres)
    assert parsed.authserv_id == HOSTNAME
    assert [(r.method, r.result) for r in parsed.results] == [("spf", "fail"), ("dkim", "pass")]
