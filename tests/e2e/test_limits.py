"""Issue 4 end to end: a compromised account goes over its outbound spam policy's
limit. The excess leaves through the high-risk pool, the account is restricted
(550 5.1.8 at MAIL FROM), its tenant's admin gets an alert mail, and an
administrator's `poolmta senders release` restores sending."""

import smtplib
import time

import pytest

from tests.support.harness import PASSWORD, World, poolmta, trace_events, trace_summary, wait_events, wait_summary

NORMAL = {"127.0.0.2", "127.0.0.5"}
HIGH_RISK = "127.0.0.3"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    with World(tmp_path_factory.mktemp("limits")) as w:
        yield w


def msg(subject: str) -> bytes:
    return f"From: mallory@contoso.test\r\nSubject: {subject}\r\n\r\nbuy now\r\n".encode()


def test_policy_limit_high_risk_restriction_alert_release(world):
    cfg = str(world.config_path)
    # 2 external recipients: within the policy's 3 per hour
    q1 = world.send(msg("one"), "mallory@contoso.test", ["v1@dest.test", "v2@dest.test"], auth="mallory@contoso.test")
    # 2 more: 4 > 3, this message crosses the limit
    q2 = world.send(msg("two"), "mallory@contoso.test", ["v3@dest.test", "v4@dest.test"], auth="mallory@contoso.test")
    assert wait_summary(world, q1, lambda s: s.get("delivered") == 2)["routed"] == "normal"
    s2 = wait_summary(world, q2, lambda s: s.get("delivered") == 2)
    assert s2["routed"] == "high-risk" and s2["reasons"] == ["limit:recipient_limit_external_per_hour"]
    world.dest.wait_for(lambda ms: world.dest.to("v4@dest.test"))
    assert {m.peer for m in world.dest.to("v1@dest.test")} <= NORMAL
    assert [m.peer for m in world.dest.to("v4@dest.test")] == [HIGH_RISK]

    # the policy's action: block_user; the admin gets an alert, as real mail
    # Recorded once the action is taken, after the 250 (the message may be delivered first).
    acts = wait_events(world, q2, "sender-action")
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
    s3 = wait_summary(world, q3, lambda s: s.get("delivered") == 1)
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


def test_two_nodes_sharing_redis_enforce_one_limit_together(world, tmp_path):
    """Two gateway processes count into the same Redis: 8 single-recipient messages
    from one sender, 4 through each node at once, against a limit of 3: the crossing
    happens exactly once (one alert, one sender-action), 3 leave normal, 5 high-risk."""
    import concurrent.futures
    import os
    import re
    import subprocess
    import sys
    import uuid

    import redis

    from tests.support.harness import ROOT, free_port

    prefix = f"poolmta-e2e-{uuid.uuid4().hex[:8]}:"
    base = world.config_path.read_text()
    nodes = []
    for name in ("a", "b"):
        port = free_port()
        text = re.sub(r'listen = "127\.0\.0\.1:\d+"', f'listen = "127.0.0.1:{port}"', base)
        text = re.sub(r'data_dir = "[^"]*"', f'data_dir = "{tmp_path / name}"', text)
        text += f'\n[state]\nbackend = "redis"\nurl = "redis://127.0.0.1:6379/0"\nkey_prefix = "{prefix}"\n'
        path = tmp_path / f"{name}.toml"
        path.write_text(text)
        log = open(tmp_path / f"{name}.log", "wb")
        proc = subprocess.Popen([sys.executable, "-m", "poolmta", "serve", "--config", str(path)], stdout=log,
                                stderr=log, env=dict(os.environ, PYTHONPATH=str(ROOT / "src")))
        nodes.append((proc, port, tmp_path / name))
    try:
        for proc, port, _ in nodes:
            end = time.time() + 20
            while True:
                try:
                    smtplib.SMTP("127.0.0.1", port, timeout=2).quit()
                    break
                except OSError:
                    assert proc.poll() is None and time.time() < end, (tmp_path / "a.log").read_text()
                    time.sleep(0.1)

        def send(i: int) -> str:
            _, port, _ = nodes[i % 2]
            with smtplib.SMTP("127.0.0.1", port, timeout=30, source_address=("127.0.0.60", 0)) as s:
                s.login("eve@contoso.test", PASSWORD)
                s.sendmail("eve@contoso.test", [f"two-nodes-{i}@dest.test"],
                           f"From: eve@contoso.test\r\nSubject: node test {i}\r\n\r\nx\r\n")
            return f"two-nodes-{i}@dest.test"

        with concurrent.futures.ThreadPoolExecutor(8) as ex:
            rcpts = list(ex.map(send, range(8)))
        world.dest.wait_for(lambda ms: all(world.dest.to(r) for r in rcpts), timeout=30)
        peers = [world.dest.to(r)[0].peer for r in rcpts]
        assert sum(p in NORMAL for p in peers) == 3 and peers.count(HIGH_RISK) == 5, peers
        world.contoso.wait_for(lambda ms: [m for m in world.contoso.to("admin@contoso.test")
                                           if b"eve@contoso.test" in m.content])
        time.sleep(1.0)                            # a second alert, if any, would have arrived by now
        alerts = [m for m in world.contoso.to("admin@contoso.test") if b"eve@contoso.test" in m.content]
        assert len(alerts) == 1
        from poolmta.trace import query
        actions = 0
        for _, _, data_dir in nodes:
            con = query.open_readonly(str(data_dir))
            actions += con.execute("SELECT COUNT(*) FROM events WHERE kind='sender-action'").fetchone()[0]
            con.close()
        assert actions == 1
    finally:
        for proc, _, _ in nodes:
            proc.terminate()
            proc.wait(10)
        r = redis.Redis(host="127.0.0.1", port=6379)
        for key in r.scan_iter(f"{prefix}*"):
            r.delete(key)


def test_repeated_spam_restricts_the_sender(world):
    """The seed: if the volume of spam continues, the user is restricted. The 5th
    spam within the window (limits.spam_restrict_count) restricts trudy."""
    from poolmta.assess.spam import GTUBE
    body = b"From: trudy@contoso.test\r\nSubject: win\r\n\r\n" + GTUBE + b"\r\n"
    qids = [world.send(body, "trudy@contoso.test", [f"spam{i}@dest.test"], auth="trudy@contoso.test")
            for i in range(5)]
    assert all(wait_summary(world, q, lambda s: s.get("delivered") == 1)["routed"] == "high-risk" for q in qids)
    acts = wait_events(world, qids[-1], "sender-action")     # recorded after the 250
    assert acts and "restricted:spam-volume" in acts[0]["actions"]
    with world.smtp("127.0.0.60") as s:
        s.login("trudy@contoso.test", PASSWORD)
        code, text = s.mail("trudy@contoso.test")
    assert code == 550 and b"5.1.8" in text
    world.contoso.wait_for(lambda ms: [m for m in world.contoso.to("admin@contoso.test")
                                       if b"trudy@contoso.test" in m.content and b"spam" in m.content])


def test_spam_engine_down_defer_or_high_risk_per_tenant(world):
    body = b"From: x\r\nSubject: engine down\r\n\r\nhello\r\n"
    with pytest.raises(smtplib.SMTPDataError) as e:                 # on_engine_failure = "defer"
        world.send(body, "f@fragile.test", ["d1@dest.test"], auth="f@fragile.test")
    assert e.value.smtp_code == 451 and b"4.7.1" in e.value.smtp_error
    qid = world.send(body, "s@sturdy.test", ["d2@dest.test"], auth="s@sturdy.test")   # "high-risk"
    s = wait_summary(world, qid, lambda s: s.get("delivered") == 1)
    assert s["routed"] == "high-risk" and s["reasons"] == ["spam-check-failed"]
    spam = [e for e in trace_events(world.data_dir, qid) if e["event"] == "assessed"][0]["spam"]
    assert spam["failed"] and spam["engine"] == "spamassassin"


def test_tenant_external_recipient_limit_refuses_with_5_7_233(world):
    body = b"From: s@sturdy.test\r\nSubject: many\r\n\r\nhello\r\n"
    world.send(body, "s@sturdy.test", ["t1@dest.test", "t2@dest.test"], auth="s@sturdy.test")   # reaches 2 (+1 above)
    with world.smtp("127.0.0.60") as s:
        s.login("s@sturdy.test", PASSWORD)
        s.mail("s@sturdy.test")
        code, text = s.rcpt("t3@dest.test")
        assert code == 550 and b"5.7.233" in text
        assert s.rcpt("colleague@sturdy.test")[0] == 250             # internal recipients still fine
