"""Delivery with real parts: SQLite spool, the real pipeline, a DNS server and SMTP sinks on loopback.

Pools are bound to distinct 127.0.0.x addresses so each sink can tell which
pool source a message left from (peer address) and with which EHLO name.
A 1 s retry schedule keeps retries quick; nothing here asserts a duration.

  127.0.0.2  normal pool (out1.gw.test)     127.0.0.20  MX of dest.test (and implicit.test)
  127.0.0.3  high-risk pool (hr1.gw.test)   127.0.0.21  MX of sender.test: DSNs arrive here
  127.0.0.4  relay pool (rly1.gw.test)      127.0.0.22  MX of tls.test: offers STARTTLS
                                            127.0.0.23  MX of held.test: holds RCPT (see HoldingSink)
                                            127.0.0.30  nothing listens (dead primary MX)
  ::1        a dual-stack normal pool's     ::1         MX of v6only.test and implicit6.test
             IPv6 source (out6.gw.test)                 (AAAA records only)
"""

from __future__ import annotations

import asyncio
import email
import sqlite3
import ssl
import time
from email import policy
from pathlib import Path

import pytest

import poolmta.assess
import poolmta.route
import poolmta.tenancy
import poolmta.trace
from poolmta import config, replies
from poolmta.clock import SystemClock
from poolmta.deliver import Scheduler, SmtpConnector, Target, client, outcome
from poolmta.dns import CachingResolver
from poolmta.model import Envelope, Message, Origin, Recipient, Source
from poolmta.pipeline import Pipeline
from poolmta.spool import RecipientState, RecipientUpdate, new_queue_id
from poolmta.spool.sqlite import SQLiteSpool
from poolmta.trace import EventKind
from poolmta.trace import query
from tests.support.dnsserver import TestDNSServer
from tests.support.sink import Sink, _Handler

NORMAL, HIGH_RISK, RELAY = "127.0.0.2", "127.0.0.3", "127.0.0.4"
NULL_PATH = ("", "<>")          # aiosmtpd records MAIL FROM:<> as "<>"

ZONE = {
    "sender.test": {"MX": [(10, "mx.sender.test")]},
    "mx.sender.test": {"A": ["127.0.0.21"]},
    "foreign.test": {"MX": [(10, "mx.sender.test")]},
    "dest.test": {"MX": [(10, "mx.dest.test")]},
    "mx.dest.test": {"A": ["127.0.0.20"]},
    "implicit.test": {"A": ["127.0.0.20"]},
    "nullmx.test": {"MX": [(0, "")]},
    "backup.test": {"MX": [(10, "mx.dead.test"), (20, "mx.dest.test")]},
    "mx.dead.test": {"A": ["127.0.0.30"]},
    "tls.test": {"MX": [(10, "mx.tls.test")]},
    "mx.tls.test": {"A": ["127.0.0.22"]},
    "held.test": {"MX": [(10, "mx.held.test")]},
    "mx.held.test": {"A": ["127.0.0.23"]},
    "v6only.test": {"MX": [(10, "mx.v6only.test")]},
    "mx.v6only.test": {"AAAA": ["::1"]},
    "implicit6.test": {"AAAA": ["::1"]},
    # nowhere.test: not in the zone → NXDOMAIN
}
SERVFAIL = ("broken.test", "brokensender.test")

# A self-signed test certificate for mx.tls.test (valid until 2126), so the
# STARTTLS test needs no tool to make one.
TEST_CERT = """-----BEGIN CERTIFICATE-----
MIIBhDCCASmgAwIBAgIUEN1ypp5jNPvCZspHpbxU66wbqdcwCgYIKoZIzj0EAwIw
FjEUMBIGA1UEAwwLbXgudGxzLnRlc3QwIBcNMjYxMjAzMTYzNzQ4WhgPMjEyNjEx
MDkxNjM3NDhaMBYxFDASBgNVBAMMC214LnRscy50ZXN0MFkwEwYHKoZIzj0CAQYI
KoZIzj0DAQcDQgAELaQSKvNlnMrZGv7T65qPx4hn5q57+3o5AADITUtH57SFqk4q
WYG5jjjjQ84bWUegMJ2u8wG7TZZinaVm1uMShKNTMFEwHQYDVR0OBBYEFP2UQKS8
xiAYUEQP82LNjt7F/4AWMB8GA1UdIwQYMBaAFP2UQKS8xiAYUEQP82LNjt7F/4AW
MA8GA1UdEwEB/wQFMAMBAf8wCgYIKoZIzj0EAwIDSQAwRgIhAMobFtziqzRhLjt9
iSJLBl3BD62gEIeG6xuHLGVtq9ZJAiEAg1i5NLQsgO7aHMzW78qzD77yhPMeZWBJ
51C+JyypVV4=
-----END CERTIFICATE-----
"""
TEST_KEY = """-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgGFmjW8tXOlIOu3nw
zbE8glgHwq7XFcgQu3vjnR9439WhRANCAAQtpBIq82Wcytka/tPrmo/HiGfmrnv7
ejkAAMhNS0fntIWqTipZgbmOOONDzhtZR6Awna7zAbtNlmKdpWbW4xKE
-----END PRIVATE KEY-----
"""


def config_text(mx_port: int, lifetime: str = "1h", starttls: str = "opportunistic",
                normal_sources=((NORMAL, "out1.gw.test"),), concurrency: int = 100) -> str:
    normal = ", ".join(f'{{ address = "{a}", ehlo = "{e}" }}' for a, e in normal_sources)
    return f"""
[server]
hostname = "gw.test"

[delivery]
port = {mx_port}
retry_schedule = ["1s"]
queue_lifetime = "{lifetime}"
connect_timeout = "2s"
command_timeout = "5s"
poll_interval = "0.2s"
starttls = "{starttls}"
concurrency = {concurrency}

[pools.normal]
role = "normal"
sources = [{normal}]

[pools.high-risk]
role = "high-risk"
sources = [{{ address = "{HIGH_RISK}", ehlo = "hr1.gw.test" }}]

[pools.relay]
role = "relay"
sources = [{{ address = "{RELAY}", ehlo = "rly1.gw.test" }}]

[tenants.acme]
accepted_domains = ["sender.test", "brokensender.test"]
"""


# ---- the world: DNS and sinks, shared by the module ------------------------------

class _HoldingHandler(_Handler):
    """RCPT for ``hold*`` waits until the test releases that address, then is
    refused (550) if the local part contains "reject", else accepted; RCPT for
    ``tarpit*`` never gets an answer. Both are listed in ``holding`` while held."""

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        local = address.split("@")[0].lower()
        sink = self.sink
        if local.startswith("tarpit"):
            sink.holding.add(address)
            await asyncio.sleep(3600)          # cancelled when the sink stops
        if local.startswith("hold"):
            sink.holding.add(address)
            deadline = time.monotonic() + 30
            while address not in sink.released and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            if "reject" in local:
                return "550 5.1.1 <%s>: Recipient address rejected: User unknown" % address
            envelope.rcpt_tos.append(address)
            return "250 2.1.5 OK"
        return await super().handle_RCPT(server, session, envelope, address, rcpt_options)


class HoldingSink(Sink):
    def __init__(self, address: str, port: int):
        super().__init__(address, port)
        self.holding: set[str] = set()
        self.released: set[str] = set()
        self.controller.handler = _HoldingHandler(self)


class World:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.dns = TestDNSServer(ZONE, servfail=SERVFAIL)
        self.dest = Sink("127.0.0.20")
        self.port = self.dest.port
        self.sender = Sink("127.0.0.21", self.port)
        self.tls = Sink("127.0.0.22", self.port)
        self.held = HoldingSink("127.0.0.23", self.port)
        self.v6 = Sink("::1", self.port)
        cert, key = tmp / "cert.pem", tmp / "key.pem"
        cert.write_text(TEST_CERT)
        key.write_text(TEST_KEY)
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(cert, key)
        self.tls.controller.SMTP_kwargs["tls_context"] = ctx

    def dsns_for(self, queue_id: str) -> list:
        """DSNs that reached the sender's MX about ``queue_id``."""
        tag = f"X-Poolmta-Queue-ID: {queue_id}".encode()
        return [m for m in self.sender.messages if tag in m.content]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = World(tmp_path_factory.mktemp("deliver-world"))
    w.dns.start()
    for s in (w.dest, w.sender, w.tls, w.held, w.v6):
        s.start()
    yield w
    for s in (w.dest, w.sender, w.tls, w.held, w.v6):
        s.stop()
    w.dns.stop()


class Gateway:
    """The stages a composition root would build, minus ingress."""

    def __init__(self, world: World, data_dir: Path, resolver=None, **cfg_kw):
        self.cfg = config.loads(config_text(world.port, **cfg_kw))
        self.clock = SystemClock()
        self.resolver = resolver or CachingResolver([("127.0.0.1", world.dns.port)], timeout=2)
        self.spool = SQLiteSpool(data_dir)
        self.data_dir = data_dir
        self.recorder = poolmta.trace.Recorder(self.clock, self.spool)
        self.events = self.recorder.capture()
        self.scheduler = Scheduler(spool=self.spool, pipeline=None, resolver=self.resolver,
                                   pools=self.cfg.pool_objects(), cfg=self.cfg.delivery, trace=self.recorder,
                                   clock=self.clock, hostname=self.cfg.server.hostname, connector=None)
        self.pipeline = Pipeline(
            ctx=poolmta.assess.Context(resolver=self.resolver, directory=poolmta.tenancy.Directory(self.cfg)),
            policy=poolmta.route.Policy(self.cfg.pool_for_role()), spool=self.spool, trace=self.recorder,
            clock=self.clock, hostname="gw.test", on_queued=self.scheduler.accepted)
        self.scheduler.pipeline = self.pipeline

    async def send(self, mail_from: str, rcpts, *, subject: str = "hello", tenant: str = "acme", **env) -> str:
        qid = new_queue_id()
        recipients = tuple(r if isinstance(r, Recipient) else Recipient(r) for r in rcpts)
        content = (f"From: {mail_from or 'MAILER-DAEMON@elsewhere.test'}\r\n"
                   f"To: {', '.join(r.address for r in recipients)}\r\n"
                   f"Subject: {subject}\r\nMessage-ID: <{qid}@sender.test>\r\n\r\nBody of {qid}\r\n").encode()
        msg = Message(qid, Envelope(mail_from, recipients, **env), Origin("127.0.0.1", helo="client.test", auth_user="submitter@test", tenant=tenant),
                      content, self.clock.now())
        await self.pipeline.accept(msg)
        return qid

    async def recipient(self, qid: str, idx: int = 0):
        stored = await self.spool.get(qid)
        return stored.recipients[idx]

    async def wait_state(self, qid: str, *states: RecipientState, idx: int = 0, timeout: float = 10.0):
        """Wait until recipient ``idx`` of ``qid`` is in one of ``states``; return it."""
        r = None

        async def reached():
            nonlocal r
            r = await self.recipient(qid, idx)
            return r.state in states
        await until(reached, timeout, lambda: f"{qid}[{idx}] never reached {states}; last: {r}")
        return r

    def of(self, qid: str, kind: EventKind | None = None) -> list:
        return [e for e in self.events if e.queue_id == qid and (kind is None or e.kind == kind)]


async def until(predicate, timeout: float = 10.0, what=lambda: "condition"):
    """Poll ``predicate`` (sync or async) without blocking the event loop the gateway runs on."""
    deadline = time.monotonic() + timeout
    while True:
        got = predicate()
        if asyncio.iscoroutine(got):
            got = await got
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what()}")
        await asyncio.sleep(0.05)


@pytest.fixture
async def make_gateway(world, tmp_path):
    made: list[Gateway] = []

    async def make(start: bool = True, **kw) -> Gateway:
        gw = Gateway(world, tmp_path / f"gw{len(made)}", **kw)
        made.append(gw)
        if start:
            await gw.scheduler.start()
        return gw
    yield make
    for gw in made:
        await gw.scheduler.stop()
        await gw.spool.close()


@pytest.fixture
async def gw(make_gateway) -> Gateway:
    return await make_gateway()


def parse(raw: bytes):
    return email.message_from_bytes(raw, policy=policy.default)


# ---- pools: source address and EHLO ---------------------------------------------------

async def test_normal_mail_leaves_from_the_normal_source_with_its_ehlo(world, gw):
    qid = await gw.send("alice@sender.test", ["ok-normal@dest.test"])
    [m] = await until(lambda: world.dest.to("ok-normal@dest.test"))
    assert (m.peer, m.ehlo, m.mail_from) == (NORMAL, "out1.gw.test", "alice@sender.test")
    assert f"Body of {qid}".encode() in m.content and m.tls is False
    r = await gw.wait_state(qid, RecipientState.DELIVERED)
    assert r.last_reply == "250 2.0.0 Ok: queued" and r.remote_mta == "mx.dest.test" and r.attempts == 1
    [attempt] = gw.of(qid, EventKind.ATTEMPT)
    assert attempt.data["source"] == NORMAL and attempt.data["ehlo"] == "out1.gw.test"
    assert attempt.data["pool"] == "normal" and attempt.data["mx"] == "mx.dest.test"
    assert attempt.data["ip"] == "127.0.0.20" and attempt.data["tls"] is False
    assert "data: 250 2.0.0 Ok: queued" in attempt.data["replies"]
    [done] = gw.of(qid, EventKind.DELIVERED)
    assert done.data["rcpt"] == "ok-normal@dest.test" and done.data["reply"] == "250 2.0.0 Ok: queued"


async def test_trace_is_durable_and_readable_from_a_readonly_connection(world, gw):
    qid = await gw.send("alice@sender.test", ["ok-trace@dest.test"])
    await gw.wait_state(qid, RecipientState.DELIVERED)

    def summary():
        con = query.open_readonly(str(gw.data_dir))
        try:
            return query.summary(con, qid)
        finally:
            con.close()
    s = await until(lambda: (lambda s: s if s.get("delivered") == 1 else None)(summary()))
    assert s["routed"] == "normal" and s["attempt"] == 1 and s["received"] == 1


async def test_null_sender_leaves_from_the_high_risk_source(world, gw):
    qid = await gw.send("", ["ok-hr@dest.test"])
    [m] = await until(lambda: world.dest.to("ok-hr@dest.test"))
    assert (m.peer, m.ehlo) == (HIGH_RISK, "hr1.gw.test") and m.mail_from in NULL_PATH
    assert gw.of(qid, EventKind.ATTEMPT)[0].data["pool"] == "high-risk"


async def test_relayed_mail_leaves_from_the_relay_source(world, gw):
    qid = await gw.send("someone@foreign.test", ["ok-relay@dest.test"])
    [m] = await until(lambda: world.dest.to("ok-relay@dest.test"))
    assert m.peer == RELAY and "rly" in m.ehlo
    await gw.wait_state(qid, RecipientState.DELIVERED)


async def test_implicit_mx_and_backup_mx_after_a_refused_connection(world, gw):
    q1 = await gw.send("alice@sender.test", ["ok-implicit@implicit.test"])
    q2 = await gw.send("alice@sender.test", ["ok-backup@backup.test"])
    await until(lambda: world.dest.to("ok-implicit@implicit.test") and world.dest.to("ok-backup@backup.test"))
    await gw.wait_state(q1, RecipientState.DELIVERED)
    await gw.wait_state(q2, RecipientState.DELIVERED)
    dead, live = gw.of(q2, EventKind.ATTEMPT)
    assert (dead.data["mx"], dead.data["ip"]) == ("mx.dead.test", "127.0.0.30")
    assert any("error" in line for line in dead.data["replies"])
    assert (live.data["mx"], live.data["ip"]) == ("mx.dest.test", "127.0.0.20")


# ---- STARTTLS -----------------------------------------------------------------------------

async def test_opportunistic_starttls_without_certificate_check(world, gw):
    qid = await gw.send("alice@sender.test", ["ok-tls@tls.test"])
    [m] = await until(lambda: world.tls.to("ok-tls@tls.test"))
    assert m.tls is True and m.peer == NORMAL and m.ehlo == "out1.gw.test"
    await gw.wait_state(qid, RecipientState.DELIVERED)
    assert gw.of(qid, EventKind.ATTEMPT)[0].data["tls"] is True


async def test_starttls_never(world, make_gateway):
    gw = await make_gateway(starttls="never")
    qid = await gw.send("alice@sender.test", ["ok-notls@tls.test"])
    [m] = await until(lambda: world.tls.to("ok-notls@tls.test"))
    assert m.tls is False
    await gw.wait_state(qid, RecipientState.DELIVERED)


# ---- failures, retries, DSNs ----------------------------------------------------------------

async def test_5xx_bounces_and_a_dsn_reaches_the_sender_from_the_high_risk_pool(world, gw):
    qid = await gw.send("alice@sender.test", ["reject-1@dest.test", "ok-partial@dest.test"], envid="ENV-1")
    bounced = await gw.wait_state(qid, RecipientState.BOUNCED, idx=0)
    assert bounced.last_reply.startswith("550 5.1.1 <reject-1@dest.test>: Recipient address rejected")
    assert bounced.status == "5.1.1" and bounced.remote_mta == "mx.dest.test"
    await gw.wait_state(qid, RecipientState.DELIVERED, idx=1)

    [dsn] = await until(lambda: world.dsns_for(qid))
    assert (dsn.peer, dsn.ehlo, dsn.rcpt_tos) == (HIGH_RISK, "hr1.gw.test", ["alice@sender.test"])
    assert dsn.mail_from in NULL_PATH
    report = parse(dsn.content)
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    assert report["Auto-Submitted"] == "auto-replied"
    text, status, returned = report.iter_parts()
    per_message, *per_rcpt = status.get_payload()
    assert per_message["Reporting-MTA"] == "dns; gw.test"
    assert per_message["Original-Envelope-Id"] == "ENV-1"
    [r] = per_rcpt                                     # only the failed recipient is reported
    assert r["Final-Recipient"] == "rfc822; reject-1@dest.test"
    assert (r["Action"], r["Status"], r["Remote-MTA"]) == ("failed", "5.1.1", "dns; mx.dest.test")
    assert r["Diagnostic-Code"] == "smtp; " + bounced.last_reply
    assert returned.get_content_type() == "message/rfc822"
    assert f"Body of {qid}".encode() in dsn.content

    [created] = await until(lambda: gw.of(qid, EventKind.DSN_CREATED))
    assert created.data["rcpt"] == ["reject-1@dest.test"]
    dsn_qid = created.data["dsn_queue_id"]
    stored_dsn = await gw.spool.get(dsn_qid)
    assert stored_dsn.decision.pool == "high-risk" and stored_dsn.decision.reasons[0] == "dsn"
    assert stored_dsn.message.origin.kind == "dsn" and stored_dsn.message.origin.tenant == "acme"
    assert (await gw.recipient(qid, 0)).dsn_sent


async def test_tempfail_is_deferred_then_delivered_on_retry(world, gw):
    qid = await gw.send("alice@sender.test", ["tempfail-1@dest.test"])
    [deferred] = await until(lambda: gw.of(qid, EventKind.DEFERRED))
    assert deferred.data["reply"].startswith("451 4.2.0") and deferred.data["next_attempt"] > deferred.ts
    r = await gw.wait_state(qid, RecipientState.DELIVERED)
    assert r.attempts == 2
    assert [e.kind for e in gw.of(qid) if e.kind in (EventKind.DEFERRED, EventKind.DELIVERED)] == [
        EventKind.DEFERRED, EventKind.DELIVERED]
    assert len(world.dest.to("tempfail-1@dest.test")) == 1


async def test_always_deferred_expires_at_the_queue_lifetime_with_a_dsn(world, make_gateway):
    gw = await make_gateway(lifetime="1.5s")
    qid = await gw.send("alice@sender.test", ["defer-1@dest.test"])
    r = await gw.wait_state(qid, RecipientState.EXPIRED)
    assert r.status == "5.4.7" and r.attempts >= 1
    assert r.last_reply == "451 4.2.0 <defer-1@dest.test>: try again later"      # the receiver's last words
    [dsn] = await until(lambda: world.dsns_for(qid))
    [rcpt_block] = parse(dsn.content).get_payload()[1].get_payload()[1:]
    assert rcpt_block["Status"] == "5.4.7"
    assert rcpt_block["Diagnostic-Code"] == "smtp; 451 4.2.0 <defer-1@dest.test>: try again later"
    assert replies.R554_547_EXPIRED.text.split(":")[0].encode() in dsn.content
    assert gw.of(qid, EventKind.EXPIRED)[0].data["status"] == "5.4.7"


async def test_null_mx_bounces_at_once_with_5110(world, gw):
    qid = await gw.send("alice@sender.test", ["someone@nullmx.test"])
    r = await gw.wait_state(qid, RecipientState.BOUNCED)
    assert r.status == "5.1.10" and r.last_reply == str(replies.R550_5110_NULL_MX) and r.remote_mta == ""
    [attempt] = gw.of(qid, EventKind.ATTEMPT)
    assert attempt.data["ip"] == "" and "null MX" in attempt.data["dns"]
    [dsn] = await until(lambda: world.dsns_for(qid))
    assert parse(dsn.content).get_payload()[1].get_payload()[1]["Status"] == "5.1.10"


async def test_nxdomain_bounces_with_512(world, gw):
    qid = await gw.send("alice@sender.test", ["someone@nowhere.test"])
    r = await gw.wait_state(qid, RecipientState.BOUNCED)
    assert r.status == "5.1.2" and r.last_reply == str(replies.R550_512_NO_SUCH_DOMAIN)
    await until(lambda: world.dsns_for(qid))


async def test_servfail_defers_with_443(world, gw):
    before = time.time()
    qid = await gw.send("alice@sender.test", ["someone@broken.test"])
    r = await gw.wait_state(qid, RecipientState.DEFERRED)
    assert r.status == "4.4.3" and r.last_reply == str(replies.R451_443_DNS_TEMPFAIL)
    assert r.next_attempt >= before + 1.0                    # on the retry schedule, not tried at once
    assert not gw.of(qid, EventKind.BOUNCED)


async def test_unresolved_sender_domain_waits_without_a_connection(world, gw):
    qid = await gw.send("bob@brokensender.test", ["ok-recheck@dest.test"])
    r = await gw.wait_state(qid, RecipientState.DEFERRED)
    assert r.last_reply == str(replies.R451_443_SOURCE_DNS_TEMPFAIL) and r.attempts == 0
    assert gw.of(qid, EventKind.RECHECKED)
    assert not gw.of(qid, EventKind.ATTEMPT)
    assert not world.dest.to("ok-recheck@dest.test")


async def test_no_dsn_about_a_message_with_a_null_reverse_path(world, gw):
    qid = await gw.send("", ["reject-null@dest.test"])
    await gw.wait_state(qid, RecipientState.BOUNCED)
    [suppressed] = await until(lambda: gw.of(qid, EventKind.DSN_SUPPRESSED))
    assert suppressed.data["reason"] == "null-reverse-path"
    assert not gw.of(qid, EventKind.DSN_CREATED)
    assert (await gw.recipient(qid)).dsn_sent                 # handled: not redone at the next start
    assert [m.queue_id for m in await gw.spool.list()] == []  # and no DSN was queued


async def test_notify_never_means_no_dsn(world, gw):
    qid = await gw.send("alice@sender.test", [Recipient("reject-never@dest.test", notify=("NEVER",)),
                                              Recipient("reject-success@dest.test", notify=("SUCCESS",)),
                                              Recipient("reject-failure@dest.test", notify=("FAILURE",))])
    for i in range(3):
        await gw.wait_state(qid, RecipientState.BOUNCED, idx=i)
    [suppressed] = await until(lambda: gw.of(qid, EventKind.DSN_SUPPRESSED))
    assert suppressed.data == {"reason": "notify", "rcpt": ["reject-never@dest.test", "reject-success@dest.test"]}
    [created] = await until(lambda: gw.of(qid, EventKind.DSN_CREATED))
    assert created.data["rcpt"] == ["reject-failure@dest.test"]
    [dsn] = await until(lambda: world.dsns_for(qid))
    assert b"reject-failure@dest.test" in dsn.content.split(b"message/rfc822")[0]
    assert b"Final-Recipient: rfc822; reject-never" not in dsn.content


async def test_dsn_left_unmade_by_a_crash_is_made_at_start(world, make_gateway):
    gw = await make_gateway(start=False)
    qid = await gw.send("alice@sender.test", ["crashed@dest.test"])
    # The state a crash between spool.update and the DSN leaves behind:
    now = time.time()
    await gw.spool.update(qid, [RecipientUpdate(0, RecipientState.BOUNCED, now, "550 5.1.1 gone before the crash",
                                                "5.1.1", "mx.dest.test")], now)
    assert await gw.spool.undelivered_dsns() == [qid]
    await gw.scheduler.start()
    [dsn] = await until(lambda: world.dsns_for(qid))
    assert b"Diagnostic-Code: smtp; 550 5.1.1 gone before the crash" in dsn.content
    await until(lambda: _empty(gw))                           # marked: not made twice
    assert not world.dest.to("crashed@dest.test")             # a final recipient is never tried again


async def _empty(gw) -> bool:
    return await gw.spool.undelivered_dsns() == []


class ExplodingResolver:
    """A resolver that fails in an unplanned way for one domain."""

    def __init__(self, inner):
        self.inner = inner

    async def query(self, name, rdtype):
        if name.startswith("explode.test"):
            raise RuntimeError("resolver bug")
        return await self.inner.query(name, rdtype)


async def test_a_crashing_group_is_deferred_and_the_loop_goes_on(world, make_gateway):
    inner = CachingResolver([("127.0.0.1", world.dns.port)], timeout=2)
    gw = await make_gateway(resolver=ExplodingResolver(inner))
    before = time.time()
    q1 = await gw.send("alice@sender.test", ["someone@explode.test"])
    r = await gw.wait_state(q1, RecipientState.DEFERRED)
    assert r.last_reply == str(replies.R451_LOCAL_ERROR) and r.next_attempt >= before + 1.0
    assert gw.of(q1, EventKind.DEFERRED)[0].data["rcpt"] == "someone@explode.test"
    q2 = await gw.send("alice@sender.test", ["ok-after-crash@dest.test"])
    await gw.wait_state(q2, RecipientState.DELIVERED)
    assert world.dest.to("ok-after-crash@dest.test")


# ---- operator actions meet deliveries in flight -------------------------------------------

async def test_a_late_bounce_for_a_recipient_the_operator_deleted_is_not_traced_or_reported(world, gw):
    rcpt = "hold-reject-deleted@held.test"
    qid = await gw.send("alice@sender.test", [rcpt])
    await until(lambda: rcpt in world.held.holding)
    # What `poolmta queue delete` does, from another process, while the RCPT is in flight:
    con = sqlite3.connect(gw.data_dir / "spool.db", isolation_level=None)
    try:
        con.execute("UPDATE recipients SET state='deleted' WHERE queue_id=? AND state IN ('queued','deferred')",
                    (qid,))
        con.execute("UPDATE messages SET pending=0 WHERE queue_id=?", (qid,))
    finally:
        con.close()
    world.held.released.add(rcpt)
    [attempt] = await until(lambda: gw.of(qid, EventKind.ATTEMPT))
    assert any("550 5.1.1" in line for line in attempt.data["replies"])     # what happened stays on record
    await until(lambda: gw.scheduler.in_flight == 0)
    assert (await gw.recipient(qid)).state == RecipientState.DELETED
    assert not gw.of(qid, EventKind.BOUNCED)
    assert not gw.of(qid, EventKind.DSN_CREATED) and not gw.of(qid, EventKind.DSN_SUPPRESSED)
    assert await gw.spool.undelivered_dsns() == []
    assert not world.dsns_for(qid)


async def test_stop_keeps_to_its_grace_even_when_the_mx_is_a_tarpit(world, gw):
    rcpt = "tarpit-stop@held.test"
    qid = await gw.send("alice@sender.test", [rcpt])
    await until(lambda: rcpt in world.held.holding)
    started = time.monotonic()
    await gw.scheduler.stop(grace=0.3)
    # command_timeout is 5 s: a QUIT sent into the tarpit would wait for all of it.
    assert time.monotonic() - started < 2.0
    assert gw.scheduler.in_flight == 0
    r = await gw.recipient(qid)
    assert r.state == RecipientState.QUEUED              # nothing lost: due again at the next start


# ---- local trouble is named as local ---------------------------------------------------------

async def test_a_pool_source_that_is_not_on_this_host_is_a_local_deferral(world, make_gateway):
    gw = await make_gateway(normal_sources=[("192.0.2.77", "out77.gw.test")])
    qid = await gw.send("alice@sender.test", ["ok-nobind@dest.test"])
    r = await gw.wait_state(qid, RecipientState.DEFERRED)
    assert r.status == "4.4.0" and r.remote_mta == ""
    assert r.last_reply.startswith("451 4.4.0 Cannot bind pool source address 192.0.2.77 (not an address of this host?)")
    assert "No answer from host" not in r.last_reply
    assert not world.dest.to("ok-nobind@dest.test")


async def test_refused_connection_and_bind_failure_over_real_sockets(world):
    env = Envelope("alice@sender.test", (Recipient("ok-refused@dest.test"),))
    conn = SmtpConnector()

    async def attempt(target, source):
        t = await client.transact(conn, target, source, port=world.port, envelope=env, recipients=env.recipients,
                                  content=b"Subject: x\r\n\r\nbody\r\n", connect_timeout=2, command_timeout=2)
        [o] = outcome.classify(t)
        return t, o

    t, refused = await attempt(Target("mx.dead.test", "127.0.0.30"), Source(NORMAL, "out1.gw.test"))
    assert refused.status == "4.4.1"
    assert refused.reply.startswith(f"451 4.4.1 Connection refused by host: connect to mx.dead.test[127.0.0.30]:{world.port}")
    assert outcome.try_next(t)                     # a backup MX may well answer

    t, unbound = await attempt(Target("mx.dest.test", "127.0.0.20"), Source("192.0.2.77", "out77.gw.test"))
    assert unbound.status == "4.4.0"
    assert unbound.reply.startswith("451 4.4.0 Cannot bind pool source address 192.0.2.77 (not an address of this host?)")
    assert not outcome.try_next(t)                 # every other MX would fail the same way


# ---- address families ---------------------------------------------------------------------------

@pytest.mark.parametrize("domain", ["v6only.test", "implicit6.test"])
async def test_an_ipv6_only_destination_waits_for_a_pool_without_ipv6_it_does_not_bounce(world, gw, domain):
    qid = await gw.send("alice@sender.test", [f"ok-v6wait@{domain}"])
    r = await gw.wait_state(qid, RecipientState.DEFERRED)
    assert r.status == "4.4.4" and r.last_reply.startswith(str(replies.R451_444_NO_SOURCE_FAMILY))
    assert "IPv6" in r.last_reply and "'normal'" in r.last_reply and "IPv4" in r.last_reply
    assert "[::1]" in r.last_reply
    assert not gw.of(qid, EventKind.BOUNCED) and not world.dsns_for(qid)
    assert not world.v6.to(f"ok-v6wait@{domain}")


@pytest.mark.parametrize("domain", ["v6only.test", "implicit6.test"])
async def test_a_dual_stack_pool_reaches_an_ipv6_only_destination_from_its_ipv6_source(world, make_gateway, domain):
    gw = await make_gateway(normal_sources=[(NORMAL, "out1.gw.test"), ("::1", "out6.gw.test")])
    rcpt = f"ok-v6@{domain}"
    qid = await gw.send("alice@sender.test", [rcpt])
    [m] = await until(lambda: world.v6.to(rcpt))
    assert (m.peer, m.ehlo) == ("::1", "out6.gw.test")
    await gw.wait_state(qid, RecipientState.DELIVERED)
    [attempt] = gw.of(qid, EventKind.ATTEMPT)
    assert (attempt.data["source"], attempt.data["ip"]) == ("::1", "::1")


async def test_a_dual_stack_pool_keeps_ipv4_destinations_on_ipv4_sources(world, make_gateway):
    gw = await make_gateway(normal_sources=[(NORMAL, "out1.gw.test"), ("::1", "out6.gw.test")])
    qids = [await gw.send("alice@sender.test", [f"ok-v4-{i}@dest.test"]) for i in range(3)]
    for qid in qids:
        await gw.wait_state(qid, RecipientState.DELIVERED)
    assert {world.dest.to(f"ok-v4-{i}@dest.test")[0].peer for i in range(3)} == {NORMAL}


async def test_back_to_back_messages_share_one_kept_session_over_real_sockets(world, gw):
    first = await gw.send("alice@sender.test", ["kept-1@dest.test"])
    await gw.wait_state(first, RecipientState.DELIVERED)
    second = await gw.send("alice@sender.test", ["kept-2@dest.test"])
    await gw.wait_state(second, RecipientState.DELIVERED)
    [m1], [m2] = world.dest.to("kept-1@dest.test"), world.dest.to("kept-2@dest.test")
    assert (m1.peer, m1.ehlo) == (m2.peer, m2.ehlo) == (NORMAL, "out1.gw.test")
    [a2] = gw.of(second, EventKind.ATTEMPT)
    assert a2.data["replies"][0] == "connect: session kept open, transaction 2 on it"
    assert gw.scheduler.sessions.idle_sessions == 1
    await gw.scheduler.stop()                               # says QUIT to the kept session
    assert gw.scheduler.sessions.idle_sessions == 0


async def test_fresh_mail_leaves_from_memory_without_reading_the_spool_back(world, gw):
    reads = []
    real_get = gw.spool.get

    async def counting_get(qid):
        reads.append(qid)
        return await real_get(qid)
    gw.spool.get = counting_get
    qid = await gw.send("alice@sender.test", ["fresh-1@dest.test", "fresh-2@implicit.test"])
    await until(lambda: world.dest.to("fresh-1@dest.test") and world.dest.to("fresh-2@implicit.test"))
    await until(lambda: len(gw.of(qid, EventKind.DELIVERED)) == 2)     # traced after the spool update
    gw.spool.get = real_get
    assert reads == []
    await gw.wait_state(qid, RecipientState.DELIVERED, idx=1)
    assert len(gw.of(qid, EventKind.ATTEMPT)) == 2            # one per domain, each exactly once


async def test_mail_accepted_while_every_slot_is_busy_waits_in_the_spool_and_still_leaves(world, make_gateway):
    gw = await make_gateway(concurrency=1)
    first = await gw.send("alice@sender.test", ["slow-busy@dest.test"])       # holds the only slot ~2 s
    second = await gw.send("alice@sender.test", ["after-busy@dest.test"])
    await gw.wait_state(second, RecipientState.DELIVERED, timeout=20)
    await gw.wait_state(first, RecipientState.DELIVERED, timeout=20)
    assert len(gw.of(second, EventKind.ATTEMPT)) == 1
