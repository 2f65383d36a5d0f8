"""Issue 3 end to end: vouching for forwarded mail. The gateway runs as a process;
SPF records, DKIM keys and MX hosts come from a real DNS server on loopback; the
receiving servers record the source address and envelope sender they saw."""

import email
import smtplib
import time

import dkim
import pytest

from poolmta.rewrite.keys import active_key
from tests.support.harness import World, trace_summary, wait_summary

NORMAL = {"127.0.0.2", "127.0.0.5"}
HIGH_RISK = "127.0.0.3"
RELAY = "127.0.0.4"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    with World(tmp_path_factory.mktemp("fwd")) as w:
        yield w


def message(sender: str, subject: str, extra: bytes = b"") -> bytes:
    return (f"From: {sender}\r\nTo: info@contoso.test\r\nSubject: {subject}\r\n"
            f"Date: Thu, 03 Dec 2026 10:00:00 +0000\r\n"
            f"Message-ID: <{subject.replace(' ', '.')}.{time.time()}@ext>\r\n").encode() + extra + b"\r\nhello\r\n"


def arrived_for(world, rcpt: str, subject: str):
    world.dest.wait_for(lambda ms: [m for m in world.dest.to(rcpt) if subject.encode() in m.content])
    return [m for m in world.dest.to(rcpt) if subject.encode() in m.content][-1]


def zone_dnsfunc(world):
    def f(name, timeout=5):
        rec = world.dns.resolver.zone.get(name.decode().rstrip(".").lower(), {})
        return rec.get("TXT", [None])[0].encode() if rec.get("TXT") else None
    return f


def test_spf_pass_forward_stays_normal_with_srs(world):
    qid = world.send(message("someone@external.test", "spf pass"), "someone@external.test", ["info@contoso.test"],
                     client_ip="127.0.0.51")
    m = arrived_for(world, "contoso-info@partner.test", "spf pass")
    assert m.peer in NORMAL
    assert m.mail_from.startswith("SRS0=") and m.mail_from.endswith("@contoso.test")
    assert "=external.test=someone@" in m.mail_from
    head = m.content.split(b"\r\n\r\n")[0]
    assert b"spf=pass" in head and b"X-Poolmta-Original-Client-IP: 127.0.0.51" in head
    assert b"ARC-Seal: i=1;" in head and b"cv=none" in head
    s = wait_summary(world, qid, lambda s: s.get("delivered") == 1)
    assert s["routed"] == "normal" and s["reasons"] == ["forward-authenticated"]
    assert SRS_reverse(world, m.mail_from) == "someone@external.test"


def test_our_arc_seal_verifies(world):
    world.send(message("someone@external.test", "arc verifies"), "someone@external.test", ["info@contoso.test"],
               client_ip="127.0.0.51")
    m = arrived_for(world, "contoso-info@partner.test", "arc verifies")
    cv, results, reason = dkim.arc_verify(m.content, dnsfunc=zone_dnsfunc(world))
    assert cv == b"pass", reason


def test_spf_fail_forward_goes_to_relay_pool_unrewritten(world):
    # A forged verdict in our name must not survive (RFC 8601 §5).
    forged = b"Authentication-Results: gw.poolmta.test; spf=pass smtp.mailfrom=external.test\r\n"
    qid = world.send(message("someone@external.test", "spf fail", forged), "someone@external.test",
                     ["info@contoso.test"], client_ip="127.0.0.50")
    m = arrived_for(world, "contoso-info@partner.test", "spf fail")
    assert (m.peer, m.mail_from) == (RELAY, "someone@external.test")
    assert "rly" in m.ehlo
    head = m.content.split(b"\r\n\r\n")[0]
    assert b"spf=fail" in head and b"spf=pass" not in head
    assert b"ARC-Seal: i=1;" in head                       # the trail is kept for relayed mail too
    assert wait_summary(world, qid, lambda s: s.get("delivered") == 1)["reasons"] == ["relay-unauthenticated"]


def test_aligned_dkim_pass_from_unauthorised_ip_stays_normal_with_srs(world):
    raw = message("news@signer.test", "dkim pass")
    key = active_key(str(world.signer_key_dir), "signer.test")
    sig = dkim.sign(raw, key.selector.encode(), b"signer.test", key.private,
                    include_headers=[b"from", b"to", b"subject", b"date", b"message-id"])
    assert dkim.verify(sig + raw, dnsfunc=zone_dnsfunc(world))
    qid = world.send(sig + raw, "news@signer.test", ["info@contoso.test"], client_ip="127.0.0.50")
    m = arrived_for(world, "contoso-info@partner.test", "dkim pass")
    assert m.peer in NORMAL and m.mail_from.startswith("SRS0=")
    head = m.content.split(b"\r\n\r\n")[0]
    assert b"spf=fail" in head and b"dkim=pass" in head and b"header.d=signer.test" in head
    assert wait_summary(world, qid, lambda s: s.get("delivered") == 1)["reasons"] == ["forward-authenticated"]


@pytest.mark.parametrize("connector_ip,pool,reason", [
    ("127.0.0.11", "normal", "forward-authenticated"),       # skip-listed: SPF sees 127.0.0.51: pass
    ("127.0.0.12", "relay", "relay-unauthenticated"),        # not skip-listed: SPF sees the filter: fail
])
def test_skip_listing_finds_the_original_client(world, connector_ip, pool, reason):
    subject = f"via filter {connector_ip}"
    hop = (b"Received: from mail.external.test (mail.external.test [127.0.0.51])\r\n"
           b"\tby filter.contoso.test (Postfix) with ESMTP id 4F1E2\r\n"
           b"\tfor <partner@dest.test>; Thu, 03 Dec 2026 10:00:00 +0000\r\n")
    qid = world.send(hop + message("someone@external.test", subject), "someone@external.test",
                     ["partner@dest.test"], client_ip=connector_ip)
    m = arrived_for(world, "partner@dest.test", subject)
    assert (m.peer in NORMAL) if pool == "normal" else (m.peer == RELAY)
    head = m.content.split(b"\r\n\r\n")[0]
    want_ip = b"127.0.0.51" if pool == "normal" else connector_ip.encode()
    assert b"X-Poolmta-Original-Client-IP: " + want_ip in head
    assert wait_summary(world, qid, lambda s: s.get("delivered") == 1)["reasons"] == [reason]


def test_bounce_to_srs_address_reaches_the_original_sender_from_high_risk(world):
    from poolmta import config
    from poolmta.clock import SystemClock
    from poolmta.rewrite.srs import SRS
    srs = SRS.from_config(config.load(world.config_path).srs, SystemClock())
    srs_addr = srs.forward("someone@external.test")              # what the gateway mints for this sender
    bounce = (b"From: MAILER-DAEMON@partner.test\r\nTo: " + srs_addr.encode() + b"\r\n"
              b"Subject: Undelivered Mail Returned to Sender (srs)\r\n\r\nyour mail bounced\r\n")
    qid = world.send(bounce, "", [srs_addr], client_ip="127.0.0.53")
    world.dest.wait_for(lambda ms: [m for m in world.dest.to("someone@external.test")
                                    if b"Returned to Sender (srs)" in m.content])
    m = [m for m in world.dest.to("someone@external.test") if b"Returned to Sender (srs)" in m.content][-1]
    assert (m.peer, m.mail_from) == (HIGH_RISK, "")
    assert wait_summary(world, qid, lambda s: s.get("delivered") == 1)["reasons"][0] == "dsn"


def test_forged_srs_address_is_refused(world):
    with world.smtp("127.0.0.53") as s:
        s.mail("")
        code, text = s.rcpt("SRS0=AbCd=AB=victim.test=bob@contoso.test")
    assert code == 550 and b"5.1.1" in text and b"SRS" in text
    with pytest.raises(smtplib.SMTPRecipientsRefused):
        world.send(b"Subject: x\r\n\r\nx\r\n", "", ["SRS0=zzzz=ZZ=victim.test=bob@contoso.test"], client_ip="127.0.0.53")


def test_our_outbound_mail_is_dkim_signed_and_verifies(world):
    qid = world.send(message("alice@contoso.test", "signed by us"), "alice@contoso.test", ["bob@dest.test"],
                     client_ip="127.0.0.60", auth=True)
    m = arrived_for(world, "bob@dest.test", "signed by us")
    assert m.content.startswith(b"DKIM-Signature:") or b"\r\nDKIM-Signature:" in m.content
    sig = email.message_from_bytes(m.content)["DKIM-Signature"]
    assert "d=contoso.test" in sig.replace(" ", "") and "c=relaxed/relaxed" in sig.replace(" ", "")
    assert dkim.verify(m.content, dnsfunc=zone_dnsfunc(world))
    assert wait_summary(world, qid, lambda s: s.get("delivered") == 1)["routed"] == "normal"


def test_domain_without_key_goes_out_unsigned_and_says_so(world):
    qid = world.send(message("app@nodns.contoso.test", "unsigned"), "app@nodns.contoso.test", ["carol@dest.test"],
                     client_ip="127.0.0.10")
    m = arrived_for(world, "carol@dest.test", "unsigned")
    assert b"DKIM-Signature" not in m.content.split(b"\r\n\r\n")[0]
    from tests.support.harness import trace_events
    (ev,) = [e for e in trace_events(world.data_dir, qid) if e["event"] == "rewritten"]
    assert "nodns.contoso.test" in ev["dkim_problem"]


def test_internet_mail_claiming_our_from_domain_is_not_signed_with_our_key(world):
    """A spoofer writes From: alice@contoso.test and sends to our forwarding address:
    it is forwarded (relay pool, SPF failed) but never DKIM-signed as contoso.test."""
    qid = world.send(message("alice@contoso.test", "spoofed from"), "someone@external.test", ["info@contoso.test"],
                     client_ip="127.0.0.50")
    m = arrived_for(world, "contoso-info@partner.test", "spoofed from")
    assert m.peer == RELAY
    assert b"DKIM-Signature" not in m.content.split(b"\r\n\r\n")[0]


def test_filter_connector_mail_claiming_our_domain_is_not_signed(world):
    """A skip-listed filter relays internet mail: a forged From: ceo@contoso.test
    through it is not the tenant's own mail and is never signed with our key."""
    hop = (b"Received: from evil.example (evil.example [203.0.113.9])\r\n"
           b"\tby filter.contoso.test (Postfix) with ESMTP id 4F1E3; Thu, 03 Dec 2026 10:00:00 +0000\r\n")
    qid = world.send(hop + message("ceo@contoso.test", "forged through filter"), "ceo@contoso.test",
                     ["partner@dest.test"], client_ip="127.0.0.11")
    m = arrived_for(world, "partner@dest.test", "forged through filter")
    assert m.peer == RELAY
    assert b"DKIM-Signature" not in m.content.split(b"\r\n\r\n")[0]
    assert wait_summary(world, qid, lambda s: s.get("delivered") == 1)["reasons"] == ["relay-unauthenticated"]


def SRS_reverse(world, address: str) -> str:
    from poolmta import config
    from poolmta.clock import SystemClock
    from poolmta.rewrite.srs import SRS
    return SRS.from_config(config.load(world.config_path).srs, SystemClock()).reverse(address)
