"""Issue 4 end to end: a compromised account goes over its outbound spam policy's
limit. The excess leaves through the high-risk pool, the account is restricted
(550 5.1.8 at MAIL FROM), its tenant's admin gets an alert mail, and an
administrator's `poolmta senders release` restores sending."""

import smtplib
import time

import pytest

from tests.support.harness import PASSWORD, World, poolmta, trace_events, trace_summary

NORMAL = {"127.0.0.2", "127.0.0.5"}
HIGH_RISK = "127.0.0.3"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    with World(tmp_path_factory.mktemp("limits")) as w:
        yield w


def msg(subject: str) -> bytes:
    return f"From: mallory@contoso.test\r\nSubject: {subject}\r\n\r\nbuy now\r\n".encode()


def wait(world, qid, pred, timeout=20):
    end = time.time() + timeout
    while time.time() < end:
        s = trace_summary(world.data_dir, qid)
        if pred(s):
            return s
        time.sleep(0.1)
    raise AssertionError(trace_summary(world.data_dir, qid))


def test_policy_limit_high_risk_restriction_alert_release(world):
    cfg = str(world.config_path)
    # 2 external recipients: within the policy's 3 per hour
    q1 = world.send(msg("one"), "mallory@contoso.test", ["v1@dest.test", "v2@dest.test"], auth="mallory@contoso.test")
    # 2 more: 4 > 3, this message crosses the limit
    q2 = world.send(msg("two"), "mallory@contoso.test", ["v3@dest.test", "v4@dest.test"], auth="mallory@contoso.test")
    assert wait(world, q1, lambda s: s.get("delivered") == 2)["routed"] == "normal"
    s2 = wait(world, q2, lambda s: s.get("delivered") == 2)
    assert s2["routed"] == "high-risk" and s2["reasons"] == ["limit:recipient_limit_external_per_hour"]
    world.dest.wait_for(lambda ms: world.dest.to("v4@dest.test"))
    assert {m.peer for m in world.dest.to("v1@dest.test")} <= NORMAL
    assert [m.peer for m in world.dest.to("v4@dest.test")] == [HIGH_RISK]

    # the policy's action: block_user; the admin gets an alert, as real mail
    acts = [e for e in trace_events(world.data_dir, q2) if e["event"] == "sender-action"]
    assert acts and "restricted:block_user" in acts[0]["actions"] and "alerted" in acts[0]["actions"]
    world.contoso.wait_for(lambda ms: world.contoso.to("admin@contoso.test"))
    alert = world.contoso.to("admin@contoso.test")[0]
    assert b"mallory@contoso.test" in alert.content and b"recipient_limit_external_per_hour" in alert.content

    # restricted: refused at MAIL FROM, from any client, and listed
    with world.smtp("127.0.0.60") as s:
        s.login("mallory@contoso.test", PASSWORD)
        code, text = s.mail("mallory@contoso.test")
    assert code == 550 and b"5.1.8" in text
    listed = poolmta("senders", "list", "--config", cfg)
    assert "mallory@contoso.test" in listed.stdout and "until released" in listed.stdout
    # can still receive mail (the restriction is on sending)
    world.send(b"Subject: hi mallory\r\n\r\nx\r\n", "alice@contoso.test", ["mallory@contoso.test"],
               client_ip="127.0.0.60", auth=True)

    # an administrator releases it: sending works again, and it is not restricted again today
    r = poolmta("senders", "release", "mallory@contoso.test", "--config", cfg)
    assert r.returncode == 0, r.stderr
    assert "mallory@contoso.test" not in poolmta("senders", "list", "--config", cfg).stdout
    q3 = world.send(msg("three"), "mallory@contoso.test", ["v5@dest.test"], auth="mallory@contoso.test")
    s3 = wait(world, q3, lambda s: s.get("delivered") == 1)
    assert s3["routed"] == "high-risk"               # still over the hourly limit: the excess stays high-risk
    assert "mallory@contoso.test" not in poolmta("senders", "list", "--config", cfg).stdout
    released = trace_events(world.data_dir, "sender:mallory@contoso.test")
    assert released and released[0]["event"] == "sender-released" and released[0]["by"]


def test_restricted_connector_gets_5_7_711(world):
    cfg = str(world.config_path)
    assert poolmta("senders", "restrict", "onprem", "--connector", "--config", cfg).returncode == 0
    with world.smtp("127.0.0.10") as s:
        code, text = s.mail("app@contoso.test")
    assert code == 550 and b"5.7.711" in text
    assert poolmta("senders", "release", "onprem", "--connector", "--config", cfg).returncode == 0
    with world.smtp("127.0.0.10") as s:
        assert s.mail("app@contoso.test")[0] == 250
