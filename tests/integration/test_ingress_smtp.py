"""The ingress listener over real sockets on loopback.

Each test starts an IngressServer on 127.0.0.1, port 0, with a recording
pipeline (or, once, the real Pipeline over a SQLite spool). Clients bind
another 127.0.0.x address to look like somebody else: 127.0.0.50 is "the
internet" (no connector), 127.0.0.10 the tenant's connector. Raw asyncio
streams are used wherever the exact bytes matter (smuggling, pipelining,
exact reply codes); aiosmtplib and smtplib show ordinary clients get along.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import datetime
import re
import smtplib
import threading

import aiosmtplib
import pytest

from poolmta.clock import FakeClock
from poolmta.config import loads
from poolmta.ingress.handler import IngressHandler
from poolmta.ingress.server import IngressServer, PoolSMTP, listen_address
from poolmta.model import Decision, Message, Recipient, Role
from poolmta.tenancy import Directory, hash_password

PASSWORD = "correct horse"
PW_HASH = hash_password(PASSWORD)
INTERNET = "127.0.0.50"
ONPREM = "127.0.0.10"
MAX_SIZE = 4096
MAX_RCPTS = 4

BASE_TOML = f"""
[server]
listen = "127.0.0.1:2525"
hostname = "gw.test"
max_message_size = {MAX_SIZE}
max_recipients = {MAX_RCPTS}
auth_plaintext_loopback = true
timeout = "30s"
{{tls}}

[pools.normal]
role = "normal"
sources = [{{ address = "127.0.0.2", ehlo = "out1.gw.test" }}]
[pools.high-risk]
role = "high-risk"
sources = [{{ address = "127.0.0.3", ehlo = "hr1.gw.test" }}]
[pools.relay]
role = "relay"
sources = [{{ address = "127.0.0.4", ehlo = "rly1.gw.test" }}]

[tenants.acme]
accepted_domains = ["acme.example"]
users = [{{ name = "alice@acme.example", password_hash = "{PW_HASH}" }}]
connectors = [{{ name = "acme-onprem", client_ips = ["{ONPREM}/32"], trusted = true }}]
[tenants.acme.forward]
"info@acme.example" = ["info.team@partner.example", "boss@other.example"]

[tenants.globex]
accepted_domains = ["globex.example"]
[tenants.globex.forward]
"sales@globex.example" = ["sales@partner.example"]
"""


def make_config(tls: str = "", **server):
    cfg = loads(BASE_TOML.replace("{tls}", tls))
    # config.check refuses port 0 in a file; the listener itself supports it.
    return dataclasses.replace(cfg, server=dataclasses.replace(cfg.server, listen="127.0.0.1:0", **server))


class RecordingPipeline:
    """Same ``accept`` as the real Pipeline: returns once "queued", raises if not."""

    def __init__(self):
        self.messages: list[Message] = []
        self.entered = asyncio.Event()
        self.gate: asyncio.Event | None = None
        self.fail: Exception | None = None
        self.log: list[str] = []

    async def accept(self, msg: Message) -> Decision:
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        self.messages.append(msg)
        self.log.append("accept returned")
        return Decision(Role.NORMAL, "normal", ("normal",))


@pytest.fixture
async def gw():
    pipeline = RecordingPipeline()
    cfg = make_config()
    server = IngressServer(cfg, Directory(cfg), pipeline, FakeClock())
    await server.start()
    server.pipeline = pipeline
    try:
        yield server
    finally:
        await server.stop()


class Raw:
    """An SMTP client that writes exactly the bytes it is given."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int, source: str = INTERNET, ehlo: str | None = "client.test") -> "Raw":
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
        c = cls(reader, writer)
        c.greeting = await c.reply()
        if ehlo:
            c.ehlo = await c.cmd(f"EHLO {ehlo}")
        return c

    async def reply(self) -> tuple[int, str]:
        """One reply: (code, text of all lines joined by newlines)."""
        texts = []
        while True:
            line = await self.reader.readline()
            if not line:
                return 0, "\n".join(texts)                       # connection closed
            assert line.endswith(b"\r\n"), line
            texts.append(line[4:-2].decode())
            if line[3:4] == b" " or len(line) == 5:
                return int(line[:3]), "\n".join(texts)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def cmd(self, line: str | bytes) -> tuple[int, str]:
        await self.send((line.encode() if isinstance(line, str) else line) + b"\r\n")
        return await self.reply()

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, OSError):
            pass


ENHANCED = re.compile(r"^[245]\.\d{1,3}\.\d{1,3} ")


def status(reply: tuple[int, str]) -> tuple[int, str]:
    """(code, enhanced code) of a reply, asserting the enhanced code is there."""
    code, text = reply
    assert ENHANCED.match(text), f"no enhanced status code in {reply}"
    return code, text.split()[0]


MSG = b"From: a@partner.example\r\nSubject: hi\r\n\r\nhello\r\n"


async def transaction(c: Raw, mail_from: str, rcpts: list[str], data: bytes = MSG) -> tuple[int, str]:
    assert status(await c.cmd(f"MAIL FROM:<{mail_from}>")) == (250, "2.1.0")
    for r in rcpts:
        assert status(await c.cmd(f"RCPT TO:<{r}>"))[0] == 250, r
    assert (await c.cmd("DATA"))[0] == 354
    await c.send(data + b".\r\n")
    return await c.reply()


# ---- the handler's hooks ---------------------------------------------------------

def test_handler_defines_exactly_the_expected_hooks():
    hooks = {name for name in dir(IngressHandler) if name.startswith("handle_")}
    assert hooks == {"handle_HELO", "handle_EHLO", "handle_MAIL", "handle_RCPT", "handle_DATA", "handle_exception"}
    for name in hooks - {"handle_exception"}:
        assert hasattr(PoolSMTP, "smtp_" + name.removeprefix("handle_")), name   # aiosmtpd calls it
    # aiosmtpd would also register any handler method named auth_* as a mechanism.
    assert not [n for n in dir(IngressHandler) if n.startswith("auth_")]


@pytest.mark.parametrize("listen, expected", [
    ("127.0.0.1:0", ("127.0.0.1", 0)), ("[::1]:0", ("::1", 0)), ("127.0.0.1:2525", ("127.0.0.1", 2525)),
])
def test_listen_address_allows_port_zero(listen, expected):
    assert listen_address(listen) == expected


# ---- EHLO, TLS and AUTH --------------------------------------------------------------

def ehlo_keywords(text: str) -> set[str]:
    return {line.split()[0] for line in text.split("\n")[1:]}


async def test_greeting_and_ehlo_keywords_plaintext_auth_on_loopback(gw):
    c = await Raw.open(gw.port)
    assert c.greeting[0] == 220 and c.greeting[1].startswith("gw.test ")
    code, text = c.ehlo
    assert code == 250 and text.split("\n")[0] == "gw.test"
    kw = ehlo_keywords(text)
    assert {"SIZE", "8BITMIME", "PIPELINING", "ENHANCEDSTATUSCODES", "SMTPUTF8", "DSN", "AUTH"} <= kw
    assert "STARTTLS" not in kw
    assert f"SIZE {MAX_SIZE}" in text and "AUTH LOGIN PLAIN" in text
    await c.close()


async def test_a_multi_line_reply_is_written_at_once(gw):
    """The EHLO reply's lines leave in one write, not one each; single-line replies
    and the line order are unchanged."""
    c = await Raw.open(gw.port)
    (proto,) = gw.sessions
    writes = []
    real = proto._writer.write
    proto._writer.write = lambda data: (writes.append(data), real(data))[1]
    code, text = await c.cmd("EHLO again.test")
    assert code == 250 and text.split("\n") == c.ehlo[1].split("\n")
    assert len(writes) == 1 and writes[0].count(b"\r\n") == len(text.split("\n")) >= 6, writes
    assert writes[0].startswith(b"250-gw.test\r\n") and writes[0].endswith(b"\r\n")
    assert status(await c.cmd("NOOP")) == (250, "2.0.0") and len(writes) == 2
    await c.close()


async def test_idle_timeout_counts_from_the_last_command():
    """server.timeout: a session that keeps talking stays, however long; one that goes
    quiet is closed that long after its last command."""
    cfg = make_config(timeout=1.0)
    server = IngressServer(cfg, Directory(cfg), RecordingPipeline(), FakeClock())
    await server.start()
    try:
        c = await Raw.open(server.port)
        loop = asyncio.get_running_loop()
        start = loop.time()
        while loop.time() - start < 2.0:                  # twice the timeout, a command every 0.25 s
            assert status(await c.cmd("NOOP")) == (250, "2.0.0")
            await asyncio.sleep(0.25)
        last = loop.time()
        assert status(await c.cmd("NOOP")) == (250, "2.0.0")
        rest = await asyncio.wait_for(c.reader.read(), 10)  # the server closes: EOF
        waited = loop.time() - last
        assert 0.9 <= waited < 5, waited
        assert b"421" in rest or rest == b"", rest
    finally:
        await server.stop()


async def test_no_auth_offered_in_clear_without_the_loopback_setting():
    cfg = make_config(auth_plaintext_loopback=False)
    server = IngressServer(cfg, Directory(cfg), RecordingPipeline(), FakeClock())
    await server.start()
    try:
        c = await Raw.open(server.port)
        assert "AUTH" not in ehlo_keywords(c.ehlo[1]) and "STARTTLS" not in ehlo_keywords(c.ehlo[1])
        assert status(await c.cmd("AUTH PLAIN " + plain("alice@acme.example", PASSWORD))) == (538, "5.7.11")
        await c.close()
    finally:
        await server.stop()


def self_signed(tmp_path) -> tuple[str, str]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gw.test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("gw.test")]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


async def test_starttls_then_auth_then_send(tmp_path):
    cert, key = self_signed(tmp_path)
    cfg = make_config(tls=f'tls_cert = "{cert}"\ntls_key = "{key}"', auth_plaintext_loopback=False)
    assert cfg.server.tls_cert == cert
    pipeline = RecordingPipeline()
    server = IngressServer(cfg, Directory(cfg), pipeline, FakeClock())
    await server.start()
    try:
        raw = await Raw.open(server.port)
        assert "STARTTLS" in ehlo_keywords(raw.ehlo[1]) and "AUTH" not in ehlo_keywords(raw.ehlo[1])
        assert status(await raw.cmd("AUTH LOGIN")) == (538, "5.7.11")
        await raw.close()

        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=server.port, source_address=(INTERNET, 0),
                                 start_tls=False, validate_certs=False, local_hostname="client.test")
        await client.connect()
        await client.ehlo()
        assert client.supports_extension("starttls") and not client.supports_extension("auth")
        await client.starttls()
        await client.ehlo()
        assert client.supports_extension("auth") and not client.supports_extension("starttls")
        r = await client.execute_command(b"STARTTLS")
        assert (r.code, r.message.split()[0]) == (503, "5.5.1")             # already active
        await client.login("alice@acme.example", PASSWORD)
        await client.sendmail("alice@acme.example", ["bob@partner.example"], MSG)
        await client.quit()
    finally:
        await server.stop()
    [msg] = pipeline.messages
    assert (msg.origin.auth_user, msg.origin.tenant, msg.origin.client_ip) == ("alice@acme.example", "acme", INTERNET)


def plain(login: str, password: str, authzid: str = "") -> str:
    return base64.b64encode(f"{authzid}\0{login}\0{password}".encode()).decode()


async def test_auth_plain_and_login_success_and_failure(gw):
    c = await Raw.open(gw.port)
    assert status(await c.cmd("AUTH PLAIN " + plain("alice@acme.example", "wrong"))) == (535, "5.7.8")
    assert status(await c.cmd("AUTH PLAIN " + plain("nobody@acme.example", PASSWORD))) == (535, "5.7.8")
    assert status(await c.cmd("AUTH PLAIN " + plain("Alice@acme.example", PASSWORD))) == (235, "2.7.0")
    assert status(await c.cmd("AUTH PLAIN " + plain("alice@acme.example", PASSWORD))) == (503, "5.5.1")
    assert (await transaction(c, "alice@acme.example", ["bob@partner.example"]))[0] == 250
    await c.close()

    c = await Raw.open(gw.port)
    assert await c.cmd("AUTH LOGIN") == (334, base64.b64encode(b"Username:").decode())
    assert await c.cmd(base64.b64encode(b"alice@acme.example")) == (334, base64.b64encode(b"Password:").decode())
    assert status(await c.cmd(base64.b64encode(PASSWORD.encode()))) == (235, "2.7.0")
    await c.close()

    [msg] = gw.pipeline.messages
    assert msg.origin.auth_user == "Alice@acme.example" and msg.origin.tenant == "acme"
    assert msg.envelope.recipients == (Recipient("bob@partner.example"),)


async def test_auth_state_belongs_to_each_connection(gw):
    """The AUTH methods are looked up once per class (server.py's aiosmtpd shim) but
    bound per connection: one session's login and failures never leak to another."""
    a, b = await Raw.open(gw.port), await Raw.open(gw.port)
    for _ in range(2):
        assert status(await b.cmd("AUTH PLAIN " + plain("alice@acme.example", "guess"))) == (535, "5.7.8")
    assert status(await a.cmd("AUTH PLAIN " + plain("alice@acme.example", PASSWORD))) == (235, "2.7.0")
    assert status(await b.cmd("AUTH PLAIN " + plain("alice@acme.example", "guess"))) == (421, "4.7.0")
    assert (await transaction(a, "alice@acme.example", ["bob@partner.example"]))[0] == 250
    await a.close()
    await b.close()
    import aiosmtpd.smtp
    assert type(aiosmtpd.smtp.inspect).__name__ == "_InspectOncePerClass"


async def test_auth_refusals(gw):
    c = await Raw.open(gw.port)
    # authorisation identity other than the login: not granted
    assert status(await c.cmd("AUTH PLAIN " + plain("alice@acme.example", PASSWORD, "boss@acme.example"))) \
        == (535, "5.7.8")
    assert status(await c.cmd("AUTH PLAIN !!!")) == (501, "5.5.2")
    assert status(await c.cmd("AUTH CRAM-MD5")) == (504, "5.5.4")
    assert status(await c.cmd("MAIL FROM:<a@partner.example>"))[0] == 250
    assert status(await c.cmd("AUTH PLAIN " + plain("alice@acme.example", PASSWORD))) == (503, "5.5.1")
    await c.close()


async def test_three_auth_failures_close_the_session(gw):
    c = await Raw.open(gw.port)
    for _ in range(2):
        assert status(await c.cmd("AUTH PLAIN " + plain("alice@acme.example", "guess"))) == (535, "5.7.8")
    assert status(await c.cmd("AUTH PLAIN " + plain("alice@acme.example", "guess"))) == (421, "4.7.0")
    assert await c.reader.read() == b""                                # closed by the server
    await c.close()


async def test_password_check_does_not_block_other_sessions(gw):
    started, release, order = threading.Event(), threading.Event(), []
    real = gw.handler.directory.authenticate

    def slow(login, password):
        started.set()
        release.wait(10)                  # if this ran on the event loop, nothing else could be answered
        order.append("auth done")
        return real(login, password)

    gw.handler.directory.authenticate = slow
    a = await Raw.open(gw.port)
    b = await Raw.open(gw.port)
    pending = asyncio.ensure_future(a.cmd("AUTH PLAIN " + plain("alice@acme.example", PASSWORD)))
    await asyncio.to_thread(started.wait, 10)
    assert status(await b.cmd("NOOP")) == (250, "2.0.0")
    order.append("other session answered")
    release.set()
    assert status(await pending) == (235, "2.7.0")
    assert order == ["other session answered", "auth done"]
    await a.close()
    await b.close()


async def test_aiosmtplib_login_from_loopback_without_tls(gw):
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=gw.port, source_address=(INTERNET, 0), start_tls=False)
    await client.connect()
    await client.login("alice@acme.example", PASSWORD)
    errors, text = await client.sendmail("alice@acme.example", ["x@partner.example", "y@other.example"], MSG)
    assert errors == {} and text.startswith("2.0.0 Queued as ")
    await client.quit()
    [msg] = gw.pipeline.messages
    assert text.split()[-1] == msg.queue_id
    assert [r.address for r in msg.envelope.recipients] == ["x@partner.example", "y@other.example"]


# ---- relay control --------------------------------------------------------------------

async def test_connector_may_relay_anywhere(gw):
    c = await Raw.open(gw.port, source=ONPREM)
    assert status(await transaction(c, "app@acme.example", ["bob@partner.example", "carol@other.example"])) == \
        (250, "2.0.0")
    await c.close()
    [msg] = gw.pipeline.messages
    o = msg.origin
    assert (o.client_ip, o.connector, o.trusted_connector, o.tenant, o.auth_user, o.helo) == \
        (ONPREM, "acme-onprem", True, "acme", "", "client.test")
    assert msg.envelope.mail_from == "app@acme.example"
    assert msg.content == MSG


async def test_unauthenticated_relay_denied(gw):
    c = await Raw.open(gw.port)
    assert status(await c.cmd("MAIL FROM:<alice@acme.example>")) == (250, "2.1.0")
    assert status(await c.cmd("RCPT TO:<bob@partner.example>")) == (550, "5.7.1")
    assert status(await c.cmd("DATA")) == (503, "5.5.1")
    await c.close()
    assert gw.pipeline.messages == []


RELAY_TRICKS = [
    ("<user%partner.example@acme.example>", (550, "5.1.1")),
    ("<partner.example!user@acme.example>", (550, "5.1.1")),
    ('<"user@partner.example"@acme.example>', (550, "5.1.1")),
    ("<user@partner.example@acme.example>", (501, "5.1.3")),
    ("<@acme.example:user@partner.example>", (550, "5.7.1")),          # source route stripped, then checked
    ("<@acme.example,@globex.example:user@partner.example>", (550, "5.7.1")),
    ("<user@[127.0.0.1]>", (550, "5.7.1")),
    ("<user@[IPv6:::1]>", (550, "5.7.1")),
    ("<user@acme.example.>", (501, "5.1.3")),
    ("<info@acme.example.>", (501, "5.1.3")),                          # a forwarding address, trailing dot
    ("<User@ACME.example>", (550, "5.1.1")),
    ("<user@partner.example.>", (501, "5.1.3")),
    ("<user@PARTNER.example>", (550, "5.7.1")),
    ("user@partner.example", (501, "5.1.3")),
    ("<user@partner.example> NOTIFY=NEVER", (550, "5.7.1")),
    ("<user\\@partner.example@acme.example>", (501, "5.1.3")),
]


@pytest.mark.parametrize("rcpt, expected", RELAY_TRICKS)
async def test_relay_tricks_are_refused(gw, rcpt, expected):
    c = await Raw.open(gw.port)
    assert status(await c.cmd("MAIL FROM:<someone@partner.example>")) == (250, "2.1.0")
    assert status(await c.cmd(f"RCPT TO:{rcpt}")) == expected
    assert status(await c.cmd("DATA")) == (503, "5.5.1")                  # nothing was accepted
    await c.close()
    assert gw.pipeline.messages == []


async def test_forwarding_address_is_expanded(gw):
    c = await Raw.open(gw.port)
    assert status(await transaction(c, "someone@partner.example", ["INFO@Acme.Example"]))[0] == 250
    await c.close()
    [msg] = gw.pipeline.messages
    assert msg.origin.tenant == "acme" and msg.origin.connector == "" and msg.origin.auth_user == ""
    assert msg.envelope.recipients == (
        Recipient("info.team@partner.example", (), "rfc822;INFO@acme.example", "INFO@acme.example"),
        Recipient("boss@other.example", (), "rfc822;INFO@acme.example", "INFO@acme.example"))


async def test_forwarding_loop_and_hop_limit_are_refused(gw):
    """A message that already went through this forwarding address once comes
    back: refused at DATA, nothing queued (RFC 5321 §6.3)."""
    c = await Raw.open(gw.port)
    looped = b"Delivered-To: info@acme.example\r\n" + MSG
    assert status(await transaction(c, "someone@partner.example", ["info@acme.example"], looped)) == (554, "5.4.6")
    hops = b"Received: from x by y; Thu, 1 Jan 2026 00:00:00 +0000\r\n" * 51 + MSG
    assert status(await transaction(c, "someone@partner.example", ["info@acme.example"], hops)) == (554, "5.4.6")
    assert status(await transaction(c, "someone@partner.example", ["info@acme.example"]))[0] == 250
    await c.close()
    assert len(gw.pipeline.messages) == 1


async def test_second_tenant_in_one_transaction_is_deferred_to_another(gw):
    c = await Raw.open(gw.port)
    assert status(await c.cmd("MAIL FROM:<someone@partner.example>"))[0] == 250
    assert status(await c.cmd("RCPT TO:<info@acme.example>"))[0] == 250
    assert status(await c.cmd("RCPT TO:<sales@globex.example>")) == (452, "4.5.3")
    assert (await c.cmd("DATA"))[0] == 354
    await c.send(MSG + b".\r\n")
    assert (await c.reply())[0] == 250
    assert status(await transaction(c, "someone@partner.example", ["sales@globex.example"]))[0] == 250
    await c.close()
    first, second = gw.pipeline.messages
    assert first.origin.tenant == "acme" and second.origin.tenant == "globex"
    assert [r.address for r in second.envelope.recipients] == ["sales@partner.example"]


# ---- parameters and limits ------------------------------------------------------------------

async def test_dsn_parameters_are_kept_on_envelope_and_recipients(gw):
    c = await Raw.open(gw.port, source=ONPREM)
    assert status(await c.cmd("MAIL FROM:<app@acme.example> RET=HDRS ENVID=QQ+2B314 BODY=8BITMIME SIZE=100"))[0] \
        == 250
    assert status(await c.cmd("RCPT TO:<bob@partner.example> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;Bob+40partner.example")
                  )[0] == 250
    assert status(await c.cmd("RCPT TO:<carol@partner.example> NOTIFY=NEVER"))[0] == 250
    assert status(await c.cmd("RCPT TO:<info@acme.example> NOTIFY=DELAY"))[0] == 250
    assert (await c.cmd("DATA"))[0] == 354
    await c.send(MSG + b".\r\n")
    assert (await c.reply())[0] == 250
    await c.close()
    [msg] = gw.pipeline.messages
    env = msg.envelope
    assert (env.ret, env.envid, env.body, env.smtputf8) == ("HDRS", "QQ+314", "8BITMIME", False)
    assert env.recipients == (
        Recipient("bob@partner.example", ("SUCCESS", "FAILURE"), "rfc822;Bob@partner.example"),
        Recipient("carol@partner.example", ("NEVER",)),
        Recipient("info.team@partner.example", ("DELAY",), "rfc822;info@acme.example", "info@acme.example"),
        Recipient("boss@other.example", ("DELAY",), "rfc822;info@acme.example", "info@acme.example"))


async def test_smtputf8_transaction(gw):
    c = await Raw.open(gw.port, source=ONPREM)
    assert status(await c.cmd("MAIL FROM:<jürgen@acme.example> SMTPUTF8"))[0] == 250
    assert status(await c.cmd("RCPT TO:<zoë@bücher.example>"))[0] == 250
    assert (await c.cmd("DATA"))[0] == 354
    await c.send("Subject: grüße\r\n\r\nü\r\n.\r\n".encode())
    assert (await c.reply())[0] == 250
    assert status(await c.cmd("MAIL FROM:<jürgen@acme.example>")) == (553, "5.6.7")
    await c.close()
    [msg] = gw.pipeline.messages
    assert msg.envelope.smtputf8 and msg.envelope.recipients[0].address == "zoë@bücher.example"


@pytest.mark.parametrize("command, expected", [
    (f"MAIL FROM:<a@partner.example> SIZE={MAX_SIZE + 1}", (552, "5.3.4")),
    ("MAIL FROM:<a@partner.example> XFOO=1", (555, "5.5.4")),
    ("MAIL FROM:<a@partner.example> RET=SOME", (501, "5.5.4")),
    ("MAIL FROM:<a@partner.example> ENVID=a+ZZ", (501, "5.5.4")),
    ("MAIL FROM:<a@@partner.example>", (501, "5.1.3")),
    ("MAIL FROM:a@partner.example", (501, "5.1.3")),
    ("MAIL TO:<a@partner.example>", (501, "5.5.4")),
    ("MAIL FROM:<müller@partner.example>", (553, "5.6.7")),
])
async def test_mail_refusals(gw, command, expected):
    c = await Raw.open(gw.port, source=ONPREM)
    assert status(await c.cmd(command)) == expected
    assert status(await c.cmd("MAIL FROM:<a@partner.example>"))[0] == 250      # no transaction was opened
    await c.close()


@pytest.mark.parametrize("params, expected", [
    ("XFOO=1", (555, "5.5.4")), ("NOTIFY=NEVER,DELAY", (501, "5.5.4")), ("ORCPT=junk", (501, "5.5.4")),
    ("RET=FULL", (555, "5.5.4")),
])
async def test_rcpt_parameter_refusals(gw, params, expected):
    c = await Raw.open(gw.port, source=ONPREM)
    assert status(await c.cmd("MAIL FROM:<a@partner.example>"))[0] == 250
    assert status(await c.cmd(f"RCPT TO:<b@partner.example> {params}")) == expected
    await c.close()


async def test_too_many_recipients(gw):
    c = await Raw.open(gw.port, source=ONPREM)
    assert status(await c.cmd("MAIL FROM:<a@acme.example>"))[0] == 250
    for i in range(MAX_RCPTS):
        assert status(await c.cmd(f"RCPT TO:<r{i}@partner.example>"))[0] == 250
    assert status(await c.cmd("RCPT TO:<one-more@partner.example>")) == (452, "4.5.3")
    assert (await c.cmd("DATA"))[0] == 354
    await c.send(MSG + b".\r\n")
    assert (await c.reply())[0] == 250
    await c.close()
    assert len(gw.pipeline.messages[0].envelope.recipients) == MAX_RCPTS


async def test_data_over_the_size_limit_is_drained_then_refused(gw):
    c = await Raw.open(gw.port, source=ONPREM)
    big = b"Subject: big\r\n\r\n" + (b"x" * 70 + b"\r\n") * 100
    assert status(await transaction(c, "a@acme.example", ["b@partner.example"], big)) == (552, "5.3.4")
    assert status(await c.cmd("NOOP")) == (250, "2.0.0")                # the session goes on
    assert status(await transaction(c, "a@acme.example", ["b@partner.example"]))[0] == 250
    await c.close()
    assert len(gw.pipeline.messages) == 1


async def test_long_line_is_drained_then_refused(gw):
    c = await Raw.open(gw.port, source=ONPREM)
    long = b"Subject: long\r\n\r\n" + b"y" * 3000 + b"\r\n"
    assert len(long) < MAX_SIZE                                         # only the line length is wrong
    assert status(await transaction(c, "a@acme.example", ["b@partner.example"], long)) == (500, "5.5.6")
    assert status(await c.cmd("RSET")) == (250, "2.0.0")
    await c.close()
    assert gw.pipeline.messages == []


async def test_sequence_errors_carry_enhanced_codes(gw):
    c = await Raw.open(gw.port, ehlo=None)
    assert status(await c.cmd("MAIL FROM:<a@partner.example>")) == (503, "5.5.1")      # EHLO first
    assert status(await c.cmd("EHLO")) == (501, "5.5.4")
    assert status(await c.cmd("EHLO bad\x01name")) == (501, "5.5.4")
    assert (await c.cmd("EHLO client.test"))[0] == 250
    assert status(await c.cmd("RCPT TO:<b@partner.example>")) == (503, "5.5.1")
    assert status(await c.cmd("DATA")) == (503, "5.5.1")
    assert status(await c.cmd("MAIL FROM:<>")) == (250, "2.1.0")                       # null sender opens one
    assert status(await c.cmd("MAIL FROM:<a@partner.example>")) == (503, "5.5.1")      # nested
    assert status(await c.cmd("DATA")) == (503, "5.5.1")
    assert status(await c.cmd("BOGUS")) == (500, "5.5.2")
    assert status(await c.cmd("VRFY <x@acme.example>"))[0] == 252
    assert status(await c.cmd("EXPN list")) == (502, "5.5.1")
    assert status(await c.cmd("STARTTLS")) == (454, "4.7.0")
    assert status(await c.cmd("HELP"))[0] == 250
    assert status(await c.cmd("NOOP")) == (250, "2.0.0")
    assert status(await c.cmd("QUIT")) == (221, "2.0.0")
    await c.close()


async def test_helo_client_gets_no_extensions(gw):
    c = await Raw.open(gw.port, source=ONPREM, ehlo=None)
    assert await c.cmd("HELO old.client") == (250, "gw.test")
    assert status(await c.cmd("MAIL FROM:<a@acme.example> SIZE=10")) == (501, "5.5.4")
    assert status(await transaction(c, "a@acme.example", ["b@partner.example"]))[0] == 250
    await c.close()
    assert gw.pipeline.messages[0].origin.helo == "old.client"


# ---- transactions, pipelining, RSET ---------------------------------------------------------------

async def test_null_sender_rset_and_two_transactions_in_one_session(gw):
    c = await Raw.open(gw.port, source=ONPREM)
    assert status(await c.cmd("MAIL FROM:<a@acme.example>"))[0] == 250
    assert status(await c.cmd("RCPT TO:<dropped@partner.example>"))[0] == 250
    assert status(await c.cmd("RSET")) == (250, "2.0.0")
    assert status(await c.cmd("RCPT TO:<b@partner.example>")) == (503, "5.5.1")
    assert status(await transaction(c, "", ["bounce@partner.example"]))[0] == 250
    assert status(await transaction(c, "a@acme.example", ["b@partner.example"]))[0] == 250
    await c.close()
    first, second = gw.pipeline.messages
    assert first.envelope.mail_from == "" and [r.address for r in first.envelope.recipients] == \
        ["bounce@partner.example"]
    assert second.envelope.mail_from == "a@acme.example" and first.queue_id != second.queue_id


async def test_pipelined_transaction(gw):
    c = await Raw.open(gw.port, source=ONPREM)
    await c.send(b"MAIL FROM:<a@acme.example>\r\nRCPT TO:<b@partner.example>\r\n"
                 b"RCPT TO:<x@[10.0.0.1]>\r\nRCPT TO:<c@partner.example>\r\nDATA\r\n")
    got = [status(await c.reply()) for _ in range(4)]
    assert got == [(250, "2.1.0"), (250, "2.1.5"), (550, "5.7.1"), (250, "2.1.5")]
    assert (await c.reply())[0] == 354
    await c.send(MSG + b".\r\nMAIL FROM:<a@acme.example>\r\nRCPT TO:<d@partner.example>\r\nDATA\r\n")
    assert status(await c.reply())[0] == 250
    assert [status(await c.reply()) for _ in range(2)] == [(250, "2.1.0"), (250, "2.1.5")]
    assert (await c.reply())[0] == 354
    await c.send(b"..dot\r\n.\r\nQUIT\r\n")
    assert status(await c.reply())[0] == 250
    assert status(await c.reply()) == (221, "2.0.0")
    await c.close()
    first, second = gw.pipeline.messages
    assert [r.address for r in first.envelope.recipients] == ["b@partner.example", "c@partner.example"]
    assert second.content == b".dot\r\n"


# ---- DATA: bare newlines and smuggling ------------------------------------------------------------

SMUGGLE = b"MAIL FROM:<ceo@acme.example>\r\nRCPT TO:<victim@partner.example>\r\nDATA\r\nwire money\r\n"


@pytest.mark.parametrize("fake_end", [
    b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r", b"\r.\r\n", b"\r\n.\r", b"\r\n.\r\r\n", b"\n..\r\n",
])
async def test_smuggled_end_of_data_queues_nothing(gw, fake_end):
    c = await Raw.open(gw.port, source=ONPREM)
    assert status(await c.cmd("MAIL FROM:<a@acme.example>"))[0] == 250
    assert status(await c.cmd("RCPT TO:<b@partner.example>"))[0] == 250
    assert (await c.cmd("DATA"))[0] == 354
    await c.send(b"Subject: x\r\n\r\nbody" + fake_end + SMUGGLE + b".\r\n")
    assert status(await c.reply()) == (554, "5.6.0")
    # exactly one reply for the whole thing: the next one answers our NOOP
    assert status(await c.cmd("NOOP")) == (250, "2.0.0")
    assert gw.pipeline.messages == []
    assert status(await transaction(c, "a@acme.example", ["b@partner.example"]))[0] == 250
    await c.close()
    [msg] = gw.pipeline.messages
    assert [r.address for r in msg.envelope.recipients] == ["b@partner.example"]


@pytest.mark.parametrize("data", [b"a\nb\r\n", b"a\rb\r\n", b"line\r\r\n", b"\n"])
async def test_bare_cr_or_lf_refuses_the_message(gw, data):
    c = await Raw.open(gw.port, source=ONPREM)
    assert status(await transaction(c, "a@acme.example", ["b@partner.example"], data + b"\r\n")) == (554, "5.6.0")
    assert status(await c.cmd("NOOP")) == (250, "2.0.0")
    await c.close()
    assert gw.pipeline.messages == []


async def test_disconnect_in_data_queues_nothing(gw):
    c = await Raw.open(gw.port, source=ONPREM)
    assert status(await c.cmd("MAIL FROM:<a@acme.example>"))[0] == 250
    assert status(await c.cmd("RCPT TO:<b@partner.example>"))[0] == 250
    assert (await c.cmd("DATA"))[0] == 354
    await c.send(b"Subject: cut\r\n\r\nhalf a message\n.\n")
    await c.close()
    c = await Raw.open(gw.port, source=ONPREM)                         # the server is fine
    assert status(await c.cmd("NOOP")) == (250, "2.0.0")
    await c.close()
    assert gw.pipeline.messages == []


# ---- 250 only after the spool has it ---------------------------------------------------------------

async def test_250_only_after_accept_returned(gw):
    gw.pipeline.gate = asyncio.Event()
    c = await Raw.open(gw.port, source=ONPREM)
    assert status(await c.cmd("MAIL FROM:<a@acme.example>"))[0] == 250
    assert status(await c.cmd("RCPT TO:<b@partner.example>"))[0] == 250
    assert (await c.cmd("DATA"))[0] == 354
    await c.send(MSG + b".\r\n")
    await gw.pipeline.entered.wait()                                    # the pipeline has the message...
    reply = asyncio.ensure_future(c.reply())
    for _ in range(20):                                                 # ...give a premature reply every chance
        await asyncio.sleep(0)
    assert not reply.done() and gw.pipeline.messages == []
    gw.pipeline.gate.set()
    code, text = await reply
    gw.pipeline.log.append("client got reply")
    assert gw.pipeline.log == ["accept returned", "client got reply"]
    assert (code, text) == (250, f"2.0.0 Queued as {gw.pipeline.messages[0].queue_id}")
    await c.close()


async def test_451_when_accept_raises(gw):
    gw.pipeline.fail = OSError("disk full")
    c = await Raw.open(gw.port, source=ONPREM)
    assert status(await transaction(c, "a@acme.example", ["b@partner.example"])) == (451, "4.3.0")
    gw.pipeline.fail = None
    assert status(await transaction(c, "a@acme.example", ["b@partner.example"]))[0] == 250
    await c.close()
    assert len(gw.pipeline.messages) == 1


async def test_stop_answers_in_flight_message_then_421():
    pipeline = RecordingPipeline()
    pipeline.gate = asyncio.Event()
    cfg = make_config()
    server = IngressServer(cfg, Directory(cfg), pipeline, FakeClock())
    await server.start()
    busy = await Raw.open(server.port, source=ONPREM)
    idle = await Raw.open(server.port, source=ONPREM)
    assert status(await busy.cmd("MAIL FROM:<a@acme.example>"))[0] == 250
    assert status(await busy.cmd("RCPT TO:<b@partner.example>"))[0] == 250
    assert (await busy.cmd("DATA"))[0] == 354
    await busy.send(MSG + b".\r\n")
    await pipeline.entered.wait()
    stopping = asyncio.ensure_future(server.stop())
    for _ in range(20):
        await asyncio.sleep(0)
    assert not stopping.done()                                          # waits for the message
    pipeline.gate.set()
    await stopping
    assert status(await busy.reply())[0] == 250
    assert status(await busy.reply()) == (421, "4.3.2")
    assert status(await idle.reply()) == (421, "4.3.2")
    await busy.close()
    await idle.close()
    assert len(pipeline.messages) == 1
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", server.port)


# ---- ordinary clients ------------------------------------------------------------------------------

async def test_smtplib_sendmail_with_dsn_options(gw):
    def send():
        with smtplib.SMTP("127.0.0.1", gw.port, source_address=(ONPREM, 0), timeout=10) as s:
            s.ehlo("client.test")
            assert s.has_extn("dsn") and s.has_extn("enhancedstatuscodes") and s.has_extn("pipelining")
            refused = s.sendmail("app@acme.example", ["bob@partner.example", "x@[192.0.2.1]"],
                                 "Subject: lf line ends\n\nsmtplib makes these CRLF\n",
                                 mail_options=["RET=FULL", "ENVID=id-1"], rcpt_options=["NOTIFY=FAILURE"])
            return refused

    refused = await asyncio.to_thread(send)
    assert refused == {"x@[192.0.2.1]": (550, b"5.7.1 Address literals are not accepted as recipients")}
    [msg] = gw.pipeline.messages
    assert msg.envelope.ret == "FULL" and msg.envelope.envid == "id-1"
    assert msg.envelope.recipients == (Recipient("bob@partner.example", ("FAILURE",)),)
    assert msg.content == b"Subject: lf line ends\r\n\r\nsmtplib makes these CRLF\r\n"


async def test_real_pipeline_and_sqlite_spool(tmp_path):
    from poolmta import assess, route, trace
    from poolmta.dns import StaticResolver
    from poolmta.pipeline import Pipeline
    from poolmta.spool.sqlite import SQLiteSpool

    cfg = make_config()
    clock = FakeClock()
    directory = Directory(cfg)
    spool = SQLiteSpool(tmp_path)
    resolver = StaticResolver({("partner.example", "MX"): ((10, "mx.partner.example"),),
                               ("acme.example", "MX"): ((10, "mx.acme.example"),)})
    pipeline = Pipeline(ctx=assess.Context(resolver=resolver, directory=directory), policy=route.Policy(),
                        spool=spool, trace=trace.Recorder(clock, spool), clock=clock, hostname="gw.test")
    server = IngressServer(cfg, directory, pipeline, clock)
    await server.start()
    try:
        c = await Raw.open(server.port)
        code, text = await transaction(c, "someone@partner.example", ["info@acme.example"])
        assert (code, text.split()[:3]) == (250, ["2.0.0", "Queued", "as"])
        await c.close()
        stored = await spool.get(text.split()[-1])
        assert stored is not None
        assert [r.address for r in stored.recipients] == ["info.team@partner.example", "boss@other.example"]
        assert {r.original for r in stored.recipients} == {"info@acme.example"}
        assert stored.message.origin.tenant == "acme"
        assert stored.message.content.endswith(MSG)
        assert b"by gw.test (poolmta)" in stored.message.content
    finally:
        await server.stop()
        await spool.close()
