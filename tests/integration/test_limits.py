"""Sending limits with an injectable clock, at the exact edges of their windows
(hour, UTC day, rolling 24 h), counting into a real SQLite state file."""

import pytest

from poolmta import config
from poolmta.assess.limits import Limits, auto_submitted, tenant_external_limit
from poolmta.clock import FakeClock
from poolmta.model import Envelope, Message, Origin, Recipient
from poolmta.state.sqlite import SQLiteState
from poolmta.tenancy import Directory, hash_password
from tests.support.configs import POOLS

PW = hash_password("x")
CFG = config.loads(POOLS + f"""
[limits]
recipients_per_day = 10
messages_per_minute = 4
[tenants.t]
accepted_domains = ["t.test"]
users = [{{ name = "u@t.test", password_hash = "{PW}" }}]
connectors = [{{ name = "c", client_ips = ["127.0.0.10/32"] }}]
policy = {{ recipient_limit_external_per_hour = 3, recipient_limit_internal_per_hour = 2, recipient_limit_per_day = 6 }}
policies = [{{ name = "vip", priority = 1, domains = ["vip.t.test"], recipient_limit_external_per_hour = 100 }}]
""")
D = Directory(CFG)
MIDNIGHT = 1_800_057_600.0          # a UTC midnight (divisible by 86400)


@pytest.fixture
async def limits(tmp_path):
    state = SQLiteState(tmp_path / "state.db")
    clock = FakeClock(MIDNIGHT + 10 * 3600)
    yield Limits(state, CFG, D, clock), clock
    await state.close()


def message(rcpts, *, auth="u@t.test", client="127.0.0.50", sender="u@t.test", from_hdr="u@t.test", extra=b"",
            kind="smtp"):
    content = f"From: {from_hdr}\r\n".encode() + extra + b"Subject: s\r\n\r\nb\r\n"
    return Message("Q", Envelope(sender, tuple(Recipient(r) for r in rcpts)),
                   Origin(client, auth_user=auth, tenant="t", kind=kind), content, 0.0)


async def test_external_per_hour_exact_edges(limits):
    lim, clock = limits
    assert (await lim.check(message(["a@x.test", "b@x.test", "c@x.test"]))).exceeded == ()   # 3: at the limit
    clock.advance(10)
    f = await lim.check(message(["d@x.test"]))                                                   # 4 > 3
    assert "recipient_limit_external_per_hour" in f.exceeded and f.action == "block_user_for_today"
    assert f.counts["recipient_limit_external_per_hour:crossed"] == 1
    clock.advance(10)
    f = await lim.check(message(["e@x.test"]))                                                   # still over
    assert "recipient_limit_external_per_hour" in f.exceeded and "recipient_limit_external_per_hour:crossed" not in f.counts
    assert f.counts["recipient_limit_external_per_hour"] == 5
    clock.advance(3600 - 21)        # t0+3599: a,b,c (at t0) are still inside (now-3600, now]
    assert (await lim.check(message(["f@x.test"]))).counts["recipient_limit_external_per_hour"] == 6
    clock.advance(1)                # t0+3600: a,b,c sit exactly at `since`: out
    assert (await lim.check(message(["g@x.test"]))).counts["recipient_limit_external_per_hour"] == 4


async def test_internal_and_daily_limits_and_utc_day_edge(limits):
    lim, clock = limits
    clock._now = MIDNIGHT + 86400 - 10            # 23:59:50 UTC
    assert (await lim.check(message(["a@t.test", "b@t.test"]))).exceeded == ()
    assert "recipient_limit_internal_per_hour" in (await lim.check(message(["c@t.test"]))).exceeded
    clock._now = MIDNIGHT + 86400                 # 00:00:00: a new UTC day for the daily limit
    f = await lim.check(message(["x1@x.test", "x2@x.test", "x3@x.test"]))
    assert "recipient_limit_per_day" not in f.exceeded and f.counts["recipient_limit_per_day"] == 3
    assert "recipient_limit_per_day" in (await lim.check(message(["y@t.test", "z@t.test", "w@t.test", "v@t.test"]))).exceeded


async def test_service_limits_rolling_24h_and_per_minute(limits):
    lim, clock = limits
    for i in range(4):
        assert "service_messages_per_minute" not in (await lim.check(message([f"m{i}@t.test"]))).exceeded
        clock.advance(1)
    assert "service_messages_per_minute" in (await lim.check(message(["m5@t.test"]))).exceeded
    clock.advance(60)
    assert "service_messages_per_minute" not in (await lim.check(message(["m6@t.test"]))).exceeded
    # 6 recipients so far; 4 more is 10 (at the service limit), the 11th is over, for 24 h
    clock.advance(3 * 3600)
    assert "service_recipients_per_day" not in (await lim.check(message(["a@t.test", "b@t.test", "c@t.test", "d@t.test"]))).exceeded
    clock.advance(61)
    assert "service_recipients_per_day" in (await lim.check(message(["e@t.test"]))).exceeded


async def test_policy_is_chosen_by_from_header(limits):
    lim, _ = limits
    assert lim.policy_for("t", "boss@vip.t.test").name == "vip"
    assert lim.policy_for("t", "u@t.test").name == "default"
    # a vip From: from the vip sender itself gets the vip policy
    f = await lim.check(message(["a@x.test", "b@x.test", "c@x.test", "d@x.test"], auth="boss@vip.t.test",
                                sender="boss@vip.t.test", from_hdr="boss@vip.t.test"))
    assert f.policy == "vip" and "recipient_limit_external_per_hour" not in f.exceeded


async def test_what_is_not_counted(limits):
    lim, _ = limits
    big = [f"r{i}@x.test" for i in range(20)]
    assert (await lim.check(message(big, auth="", client="127.0.0.10", sender=""))).sender == ""     # DSN by connector
    assert (await lim.check(message(big, auth="", client="127.0.0.50"))).sender == ""                # internet
    assert (await lim.check(message(big, kind="alert"))).sender == ""                                # our alerts
    f = await lim.check(message(["a@x.test"], auth="", client="127.0.0.10", sender="App@t.test"))    # connector
    assert f.sender == "app@t.test"                  # connector mail counts per envelope sender


def test_tenant_limit_formula_and_auto_submitted():
    assert tenant_external_limit(0, 0) == 0
    assert tenant_external_limit(2500, 100) == 2500
    assert tenant_external_limit(0, 100) == int(500 * 100 ** 0.7 + 9500)
    assert auto_submitted(b"Auto-Submitted: auto-generated\r\n\r\n")
    assert not auto_submitted(b"Auto-Submitted: no\r\n\r\n") and not auto_submitted(b"Subject: x\r\n\r\n")


async def test_auto_submitted_counts_for_the_sender_but_not_the_tenant_limit(limits):
    lim, clock = limits
    f = await lim.check(message([f"r{i}@x.test" for i in range(4)], extra=b"Auto-Submitted: auto-replied\r\n"))
    assert "recipient_limit_external_per_hour" in f.exceeded              # the header buys no escape
    assert await lim.state.count("tenant-ext:t", clock.now(), clock.now() - 86400) == 0


async def test_authenticated_null_sender_still_counts(limits):
    lim, _ = limits
    assert (await lim.check(message(["a@x.test"], sender=""))).sender == "u@t.test"


async def test_from_header_cannot_buy_a_lenient_policy(limits):
    lim, _ = limits
    f = await lim.check(message(["a@x.test", "b@x.test", "c@x.test", "d@x.test"], from_hdr="boss@vip.t.test"))
    assert f.policy == "default" and "recipient_limit_external_per_hour" in f.exceeded


async def test_actions_are_level_triggered_and_alerts_once_a_day(limits):
    lim, clock = limits
    sent = []

    async def alert(tenant, subject, body):
        sent.append(subject)
    from poolmta.model import Facts, DsnFact, SourceDomainFact, SpamFact, ForwardFact, DomainState
    for i in range(6):
        lf = await lim.check(message([f"z{i}@x.test"] * 1))
        facts = Facts(DsnFact(False), SourceDomainFact("t.test", DomainState.RESOLVES), SpamFact(False),
                      ForwardFact(False), limits=lf)
        await lim.after_accept(message(["z@x.test"]), facts, alert)
        clock.advance(1)
    assert await lim.state.restriction("user", "u@t.test", clock.now()) is not None
    # over the external-per-hour limit on messages 4-6 and the per-minute one on 5-6:
    # one alert for each limit, not one per message
    assert sent.count("Sending limit reached by u@t.test") == 2
