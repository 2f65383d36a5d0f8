"""The gateway as a process: real SMTP in, real DNS, pools bound to distinct
127.0.0.x addresses, receiving servers that record the peer address and EHLO.
Every message is checked at the receiver (which source address it came from)
and in the trace (which pool and why)."""

import email
import json
import time

import pytest

from poolmta.assess.spam import GTUBE
from tests.support.harness import World, corpus, poolmta, trace_events, trace_summary, wait_summary

NORMAL = {"127.0.0.2", "127.0.0.5"}
HIGH_RISK = "127.0.0.3"
RELAY = "127.0.0.4"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    with World(tmp_path_factory.mktemp("world")) as w:
        yield w


def simple(subject: str, body: bytes = b"hello\r\n", sender: str = "alice@contoso.test") -> bytes:
    return (f"From: {sender}\r\nTo: someone\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject.replace(' ', '-')}-{time.time()}@contoso.test>\r\n\r\n").encode() + body


def test_ham_from_authenticated_user_leaves_from_normal_pool(world):
    qid = world.send(corpus("ham/easy-ham-2__00001.1a31cc283af0060967a233d26548a6ce.eml"),
                     "alice@contoso.test", ["ham1@dest.test"], client_ip="127.0.0.60", auth=True)
    world.dest.wait_for(lambda ms: world.dest.to("ham1@dest.test"))
    m = world.dest.to("ham1@dest.test")[0]
    assert m.peer in NORMAL
    assert m.ehlo in ("out1.poolmta.test", "out2.poolmta.test")
    assert m.mail_from == "alice@contoso.test"
    assert b"by gw.poolmta.test (poolmta)" in m.content
    s = wait_summary(world, qid, lambda s: s.get("delivered") == 1)
    assert s["routed"] == "normal" and s["reasons"] == ["normal"]


def test_real_bounce_via_connector_leaves_from_high_risk(world):
    qid = world.send(corpus("bounces/lhost-postfix-01.eml"), "", ["bounce1@dest.test"], client_ip="127.0.0.10")
    world.dest.wait_for(lambda ms: world.dest.to("bounce1@dest.test"))
    m = world.dest.to("bounce1@dest.test")[0]
    assert (m.peer, m.ehlo, m.mail_from) == (HIGH_RISK, "hr1.poolmta.test", "")
    s = wait_summary(world, qid, lambda s: s.get("delivered") == 1)
    assert s["routed"] == "high-risk" and s["reasons"][0] == "dsn"


def test_gtube_leaves_from_high_risk(world):
    qid = world.send(simple("gtube", GTUBE + b"\r\n"), "alice@contoso.test", ["spam1@dest.test"],
                     client_ip="127.0.0.60", auth=True)
    world.dest.wait_for(lambda ms: world.dest.to("spam1@dest.test"))
    assert world.dest.to("spam1@dest.test")[0].peer == HIGH_RISK
    assert wait_summary(world, qid, lambda s: s.get("delivered") == 1)["reasons"] == ["spam"]


def test_forwarded_mail_from_external_sender_leaves_from_relay_pool(world):
    qid = world.send(simple("forward me", sender="someone@external.test"), "someone@external.test",
                     ["info@contoso.test"], client_ip="127.0.0.50")
    world.dest.wait_for(lambda ms: world.dest.to("contoso-info@partner.test"))
    m = world.dest.to("contoso-info@partner.test")[0]
    assert m.peer == RELAY
    assert "rly" in m.ehlo
    assert m.mail_from == "someone@external.test"       # not rewritten (no SRS on the relay pool)
    s = wait_summary(world, qid, lambda s: s.get("delivered") == 1)
    assert s["reasons"] == ["relay-unauthenticated"]


def test_sender_domain_without_mx_or_a_leaves_from_high_risk(world):
    qid = world.send(simple("nodns", sender="app@nodns.contoso.test"), "app@nodns.contoso.test",
                     ["nodns1@dest.test"], client_ip="127.0.0.10")
    world.dest.wait_for(lambda ms: world.dest.to("nodns1@dest.test"))
    assert world.dest.to("nodns1@dest.test")[0].peer == HIGH_RISK
    s = wait_summary(world, qid, lambda s: s.get("delivered") == 1)
    assert s["reasons"] == ["source-domain-unresolvable"]


def test_5xx_produces_dsn_that_reaches_sender_domain_from_high_risk(world):
    qid = world.send(simple("will bounce"), "alice@contoso.test", ["reject-me@dest.test"],
                     client_ip="127.0.0.60", auth=True)
    world.contoso.wait_for(lambda ms: world.contoso.to("alice@contoso.test"))
    dsn = world.contoso.to("alice@contoso.test")[0]
    assert dsn.mail_from == ""                         # null reverse-path
    assert dsn.peer == HIGH_RISK
    parsed = email.message_from_bytes(dsn.content)
    assert parsed.get_content_type() == "multipart/report"
    assert parsed.get_param("report-type") == "delivery-status"
    assert [p.get_content_type() for p in parsed.get_payload()][:2] == ["text/plain", "message/delivery-status"]
    assert b"reject-me@dest.test" in dsn.content and b"5.1.1" in dsn.content
    s = wait_summary(world, qid, lambda s: s.get("bounced") == 1 and s.get("dsn-created") == 1)
    assert s["routed"] == "normal"
    assert not world.dest.to("reject-me@dest.test")


def test_4xx_then_success_is_delivered_after_retry(world):
    qid = world.send(simple("greylisted"), "alice@contoso.test", ["tempfail-1@dest.test"],
                     client_ip="127.0.0.60", auth=True)
    world.dest.wait_for(lambda ms: world.dest.to("tempfail-1@dest.test"), timeout=30)
    s = wait_summary(world, qid, lambda s: s.get("delivered") == 1)
    assert s["deferred"] == 1 and s["attempt"] == 2
    kinds = [e["event"] for e in trace_events(world.data_dir, qid)]
    assert kinds.index("deferred") < kinds.index("delivered")


def test_relay_attempt_from_internet_is_refused(world):
    with world.smtp("127.0.0.50") as s:
        s.mail("someone@external.test")
        code, text = s.rcpt("victim@dest.test")
    assert code == 550 and b"5.7.1" in text


def test_kill_9_with_mail_in_queue_loses_nothing(world):
    # later.test's MX is not listening yet: everything stays queued (deferred).
    qids = [world.send(simple(f"survivor {i}"), "alice@contoso.test", [f"k{i}@later.test"],
                       client_ip="127.0.0.60", auth=True) for i in range(15)]
    world.kill_gateway()
    world.later.start()
    world.start_gateway()
    world.later.wait_for(lambda ms: len({r for m in ms for r in m.rcpt_tos}) >= 15, timeout=40)
    got = {r for m in world.later.messages for r in m.rcpt_tos}
    assert got == {f"k{i}@later.test" for i in range(15)}
    for qid in qids:
        assert wait_summary(world, qid, lambda s: s.get("delivered") == 1)["routed"] == "normal"


def test_operator_commands_on_a_live_queue(world):
    """postqueue-style work on the running gateway: list, show, trace, retry, delete."""
    cfg = str(world.config_path)
    qid = world.send(simple("held mail"), "alice@contoso.test", ["held1@held.test"], client_ip="127.0.0.60",
                     auth=True)
    wait_summary(world, qid, lambda s: s.get("deferred", 0) >= 1)

    p = poolmta("queue", "list", "--config", cfg)
    assert p.returncode == 0 and qid in p.stdout and "held1@held.test" in p.stdout and "deferred" in p.stdout
    shown = json.loads(poolmta("queue", "show", qid, "--config", cfg, "--json").stdout)
    assert shown["pool"] == "normal" and shown["recipients"][0]["state"] == "deferred"
    human = poolmta("queue", "show", "--config", cfg, qid)          # options before the id work too
    assert human.returncode == 0, human.stderr
    assert f"queue id:   {qid}" in human.stdout and "held1@held.test: deferred" in human.stdout
    assert "next in" in p.stdout or "next now" in p.stdout

    t = poolmta("trace", qid, "--config", cfg)
    assert t.returncode == 0
    for word in ("received", "assessed", "routed", "queued", "attempt", "deferred", "127.0.0.23"):
        assert word in t.stdout, word
    by_rcpt = json.loads(poolmta("trace", "--recipient", "held1@held.test", "--json", "--config", cfg).stdout)
    assert [m["queue_id"] for m in by_rcpt] == [qid]
    by_sender = json.loads(poolmta("trace", "--sender", "alice@contoso.test", "--json", "--config", cfg).stdout)
    assert qid in [m["queue_id"] for m in by_sender]

    attempts = trace_summary(world.data_dir, qid).get("attempt", 0)
    r = poolmta("queue", "retry", qid, "--config", cfg)
    assert r.returncode == 0 and "1 recipient(s)" in r.stdout
    wait_summary(world, qid, lambda s: s.get("attempt", 0) > attempts)

    d = poolmta("queue", "delete", qid, "--config", cfg)
    assert d.returncode == 0, d.stderr
    assert qid not in poolmta("queue", "list", "--config", cfg).stdout
    time.sleep(0.3)                                   # an attempt already in flight may still finish
    settled = trace_summary(world.data_dir, qid).get("attempt", 0)
    time.sleep(1.5)                                   # longer than the retry schedule: nothing tries it again
    after = trace_summary(world.data_dir, qid)
    assert after.get("attempt", 0) == settled
    assert after.get("bounced", 0) == 0 and after.get("dsn-created", 0) == 0
    assert "deleted" in [e["event"] for e in trace_events(world.data_dir, qid)]
    assert poolmta("queue", "delete", qid, "--config", cfg).returncode == 1


def test_kill_9_during_a_burst_of_accepts_loses_no_acknowledged_message(world):
    """Clients keep sending while the gateway is killed: every message that got
    its 250 is delivered after the restart (at least once), none is lost."""
    import threading

    acked: list[str] = []
    lock = threading.Lock()

    def client(n: int) -> None:
        for i in range(40):
            rcpt = f"burst{n}-{i}@dest.test"
            try:
                world.send(simple(f"burst {n} {i}"), "alice@contoso.test", [rcpt], client_ip="127.0.0.60", auth=True)
            except Exception:
                return                        # the gateway died under us: this one was never acknowledged
            with lock:
                acked.append(rcpt)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    deadline = time.time() + 20
    while len(acked) < 10 and time.time() < deadline:
        time.sleep(0.01)
    world.kill_gateway()
    for t in threads:
        t.join(30)
    assert 10 <= len(acked) < 160            # killed mid-burst
    world.start_gateway()
    world.dest.wait_for(lambda ms: set(acked) <= {r for m in ms for r in m.rcpt_tos}, timeout=60)


def test_auto_forwarding_off_tells_the_external_sender(world):
    """Exchange Online's automatic forwarding control: not forwarded, and the
    external sender (SPF-authenticated: 127.0.0.51) gets a DSN 550 5.7.520 from
    the high-risk pool, with the headers only."""
    qid = world.send(simple("please forward", b"SECRET BODY\r\n", sender="someone@external.test"),
                     "someone@external.test", ["sales@northwind.test"], client_ip="127.0.0.51")
    world.dest.wait_for(lambda ms: world.dest.to("someone@external.test"))
    dsn = world.dest.to("someone@external.test")[0]
    assert (dsn.peer, dsn.mail_from) == (HIGH_RISK, "")
    assert b"5.7.520" in dsn.content and b"does not allow external forwarding" in dsn.content
    assert b"text/rfc822-headers" in dsn.content and b"SECRET BODY" not in dsn.content
    s = wait_summary(world, qid, lambda s: s.get("dsn-created") == 1)
    assert s.get("attempt", 0) == 0 and s["bounced"] == 1
    assert not world.dest.to("nw-sales@partner.test")


def test_auto_forwarding_off_never_reflects_mail_to_a_forged_sender(world):
    """The same from a client SPF does not authorise: the sender may be forged, so no
    DSN (it would carry the attacker's content to a victim); the trace says why."""
    qid = world.send(simple("backscatter attempt", sender="victim@external.test"), "victim@external.test",
                     ["sales@northwind.test"], client_ip="127.0.0.50")
    s = wait_summary(world, qid, lambda s: s.get("bounced") == 1)
    time.sleep(1.0)
    assert "dsn-suppressed" in [e["event"] for e in trace_events(world.data_dir, qid)]
    assert trace_summary(world.data_dir, qid).get("dsn-created", 0) == 0
    assert not world.dest.to("victim@external.test")


def test_internet_client_using_our_domain_as_sender_does_not_get_the_normal_pool(world):
    """Anyone can write MAIL FROM:<ceo@contoso.test>; from the internet (to a forwarding
    address) that proves nothing: SPF fails, so it leaves through the relay pool."""
    qid = world.send(simple("spoofed ceo", sender="ceo@contoso.test"), "ceo@contoso.test", ["info@contoso.test"],
                     client_ip="127.0.0.50")
    world.dest.wait_for(lambda ms: [m for m in world.dest.to("contoso-info@partner.test")
                                    if b"spoofed ceo" in m.content])
    m = [m for m in world.dest.to("contoso-info@partner.test") if b"spoofed ceo" in m.content][0]
    assert m.peer == RELAY
    assert b"DKIM-Signature" not in m.content.split(b"\r\n\r\n")[0]
    assert wait_summary(world, qid, lambda s: s.get("delivered") == 1)["reasons"] == ["relay-unauthenticated"]
