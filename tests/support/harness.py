"""A whole world on one machine: a DNS server, receiving MX sinks and the gateway
as a separate process, all on loopback. The e2e tests and examples/demo.py use it.

Addresses (all of 127.0.0.0/8 is loopback):
  127.0.0.2/.5  normal pool sources      127.0.0.3  high-risk pool     127.0.0.4  relay pool
  127.0.0.10    the tenant's on-prem connector (a client binds it to be recognised)
  127.0.0.11    a filtering connector in front of us, skip-listed (skip_last_hop)
  127.0.0.12    the same filter without skip listing
  127.0.0.50    an "internet" client (no connector, no AUTH); SPF of external.test fails for it
  127.0.0.51    the SPF-authorised server of external.test
  127.0.0.20    MX of dest.test and partner.test  (the recipients' side)
  127.0.0.21    MX of contoso.test (where DSNs to contoso senders arrive)
  127.0.0.22    MX of later.test (started late: used for the kill -9 test)
  127.0.0.23    MX of held.test (never listening: mail to it stays in the queue)
"""

from __future__ import annotations

import os
import signal
import smtplib
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from poolmta.rewrite.keys import keygen
from poolmta.tenancy import hash_password
from tests.support.dnsserver import TestDNSServer
from tests.support.sink import Sink

ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "correct horse"

ZONE = {
    "contoso.test": {"MX": [(10, "mx.contoso.test")], "A": ["127.0.0.21"]},
    "mx.contoso.test": {"A": ["127.0.0.21"]},
    "gw.poolmta.test": {"A": ["127.0.0.1"]},
    "fragile.test": {"A": ["127.0.0.21"]},
    "sturdy.test": {"A": ["127.0.0.21"]},        # our host name: alerts come from poolmta-alerts@ it
    "dest.test": {"MX": [(10, "mx.dest.test")]},
    "mx.dest.test": {"A": ["127.0.0.20"]},
    "partner.test": {"MX": [(10, "mx.dest.test")]},
    # SPF authorises only 127.0.0.51: the "internet" client 127.0.0.50 fails it.
    "external.test": {"MX": [(10, "mx.external.test")], "TXT": ["v=spf1 ip4:127.0.0.51 -all"]},
    # Signs with DKIM (key published by World.start), authorises no IP at all.
    "signer.test": {"MX": [(10, "mx.external.test")], "TXT": ["v=spf1 -all"]},
    "mx.external.test": {"A": ["127.0.0.20"]},
    "later.test": {"MX": [(10, "mx.later.test")]},
    "mx.later.test": {"A": ["127.0.0.22"]},
    "nullmx.test": {"MX": [(0, "")]},
    "held.test": {"MX": [(10, "mx.held.test")]},
    "mx.held.test": {"A": ["127.0.0.23"]},         # nothing ever listens there: mail stays deferred
    # "nodns.contoso.test" is an accepted domain with no record at all.
}


def free_port(address: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]


def wait_banner(address: str, port: int, timeout: float = 20.0, check: Callable[[], None] | None = None) -> bool:
    """Wait until ADDRESS:PORT answers with a 220 greeting (True), at most TIMEOUT seconds (False).
    CHECK, if given, runs before every try and may raise (e.g. when the server process exited)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if check:
            check()
        try:
            with socket.create_connection((address, port), timeout=0.5) as s:
                if s.recv(100).startswith(b"220"):
                    return True
        except OSError:
            time.sleep(0.1)
    return False


def stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if PROC has not exited within TIMEOUT seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def config_text(data_dir: str, listen_port: int, mx_port: int, dns_port: int, key_dir: str = "") -> str:
    pw = hash_password(PASSWORD)
    key_dir = key_dir or f"{data_dir}/dkim"
    return f"""
[server]
listen = "127.0.0.1:{listen_port}"
hostname = "gw.poolmta.test"
data_dir = "{data_dir}"
auth_plaintext_loopback = true

[dns]
nameservers = ["127.0.0.1:{dns_port}"]
timeout = "2s"

[delivery]
port = {mx_port}
retry_schedule = ["1s"]
queue_lifetime = "1h"
connect_timeout = "2s"
command_timeout = "10s"
poll_interval = "0.2s"

[srs]
domain = "contoso.test"
secrets = ["e2e-srs-secret-0123456789"]

[dkim]
key_dir = "{key_dir}"

[limits]
messages_per_minute = 100000      # the e2e tests send bursts from one user; limits have their own tests

[spam]
spamd = "127.0.0.1:9"             # nothing listens: tenants on spamassassin see a failed engine
timeout = "2s"

[pools.normal]
role = "normal"
sources = [{{ address = "127.0.0.2", ehlo = "out1.poolmta.test" }}, {{ address = "127.0.0.5", ehlo = "out2.poolmta.test" }}]

[pools.high-risk]
role = "high-risk"
sources = [{{ address = "127.0.0.3", ehlo = "hr1.poolmta.test" }}]

[pools.relay]
role = "relay"
sources = [{{ address = "127.0.0.4", ehlo = "rly1.poolmta.test" }}]

[tenants.contoso]
accepted_domains = ["contoso.test", "nodns.contoso.test"]
users = [{{ name = "alice@contoso.test", password_hash = "{pw}" }},
         {{ name = "mallory@contoso.test", password_hash = "{pw}" }},
         {{ name = "eve@contoso.test", password_hash = "{pw}" }},
         {{ name = "trudy@contoso.test", password_hash = "{pw}" }}]
admins = ["admin@contoso.test"]
# mallory's account is the compromised one of the limits tests: a tight policy of her own.
policies = [{{ name = "tight", priority = 1, senders = ["mallory@contoso.test"], recipient_limit_external_per_hour = 3, action_when_limit_reached = "block_user" }},
            {{ name = "watch", priority = 2, senders = ["eve@contoso.test"], recipient_limit_external_per_hour = 3, action_when_limit_reached = "alert" }}]
connectors = [
    {{ name = "onprem", client_ips = ["127.0.0.10/32"], trusted = true }},
    {{ name = "filter", client_ips = ["127.0.0.11/32"], skip_last_hop = true }},
    {{ name = "filter-noskip", client_ips = ["127.0.0.12/32"] }},
]

[tenants.contoso.forward]
"info@contoso.test" = ["contoso-info@partner.test"]

# Tenants whose spam engine is down (spamd on a closed port): one defers, one sends high-risk.
[tenants.fragile]
accepted_domains = ["fragile.test"]
users = [{{ name = "f@fragile.test", password_hash = "{pw}" }}]
spam_engine = "spamassassin"
on_engine_failure = "defer"

[tenants.sturdy]
accepted_domains = ["sturdy.test"]
users = [{{ name = "s@sturdy.test", password_hash = "{pw}" }}]
spam_engine = "spamassassin"
on_engine_failure = "high-risk"
external_recipients_per_day = 2

[tenants.northwind]
accepted_domains = ["northwind.test"]
auto_forwarding = "off"

[tenants.northwind.forward]
"sales@northwind.test" = ["nw-sales@partner.test"]
"""


class World:
    """``mx_sinks=False`` starts no Python sink on 127.0.0.20/.21 (a caller puts its own
    receiver on ``mx_port`` there, e.g. Postfix's smtp-sink in bench/run.py);
    ``config_edit`` rewrites the gateway's config text before it is written."""

    def __init__(self, workdir: Path, *, mx_sinks: bool = True, config_edit: Callable[[str], str] | None = None):
        self.workdir = Path(workdir)
        self.mx_sinks = mx_sinks
        self.config_edit = config_edit
        self.data_dir = self.workdir / "spool"
        self.mx_port = free_port("127.0.0.20")
        self.dns = TestDNSServer(ZONE)
        self.dest = Sink("127.0.0.20", self.mx_port)          # dest.test, partner.test, external.test
        self.contoso = Sink("127.0.0.21", self.mx_port)       # contoso.test: DSNs come back here
        self.later = Sink("127.0.0.22", self.mx_port)         # started only when a test wants it
        self.listen_port = free_port()
        self.config_path = self.workdir / "poolmta.toml"
        self.proc: subprocess.Popen | None = None
        self.log_path = self.workdir / "gateway.log"

    def start(self) -> "World":
        self.dns.start()
        if self.mx_sinks:
            self.dest.start()
            self.contoso.start()
        self.key_dir = self.workdir / "dkim"
        text = config_text(str(self.data_dir), self.listen_port, self.mx_port, self.dns.port, str(self.key_dir))
        self.config_path.write_text(self.config_edit(text) if self.config_edit else text)
        # Our DKIM key for contoso.test, and a third party's for signer.test, published in the test zone.
        made = keygen(str(self.key_dir), "contoso.test")
        self.dns.resolver.zone[made.name] = {"TXT": [made.value]}
        self.signer_key_dir = self.workdir / "signer-keys"
        made = keygen(str(self.signer_key_dir), "signer.test")
        self.dns.resolver.zone[made.name] = {"TXT": [made.value]}
        self.start_gateway()
        return self

    def start_gateway(self) -> None:
        log = open(self.log_path, "ab")
        env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
        self.proc = subprocess.Popen([sys.executable, "-m", "poolmta", "serve", "--config", str(self.config_path)],
                                     stdout=log, stderr=log, env=env, cwd=str(self.workdir))
        def exited() -> None:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.proc.returncode}:\n{self.log_path.read_text()[-3000:]}")

        if not wait_banner("127.0.0.1", self.listen_port, 20, exited):
            raise RuntimeError("gateway did not start listening within 20 s")

    def kill_gateway(self) -> None:
        """kill -9: no clean shutdown at all."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc:
            stop_process(self.proc)
        for s in (self.dest, self.contoso, self.later):
            try:
                s.stop()
            except Exception:
                pass
        self.dns.stop()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- clients -------------------------------------------------------------
    def smtp(self, client_ip: str = "127.0.0.1") -> smtplib.SMTP:
        s = smtplib.SMTP("127.0.0.1", self.listen_port, timeout=20, source_address=(client_ip, 0))
        s.ehlo("client.test")
        return s

    def send(self, content: bytes, mail_from: str, rcpts: list[str], *, client_ip: str = "127.0.0.1",
             auth: bool | str = False) -> str:
        """Send one message; return the queue id from the 250 reply. ``auth`` True logs
        in as alice, a string as that user."""
        with self.smtp(client_ip) as s:
            if auth:
                s.login(auth if isinstance(auth, str) else "alice@contoso.test", PASSWORD)
            s.mail(mail_from)
            for r in rcpts:
                code, text = s.rcpt(r)
                if code != 250:
                    raise smtplib.SMTPRecipientsRefused({r: (code, text)})
            code, text = s.data(content)
            if code != 250:
                raise smtplib.SMTPDataError(code, text)
            return text.decode().split()[-1]


def poolmta(*args: str) -> subprocess.CompletedProcess:
    """Run the poolmta command as an operator would."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    return subprocess.run([sys.executable, "-m", "poolmta", *args], capture_output=True, text=True, env=env,
                          timeout=60)


def trace_summary(data_dir: Path, queue_id: str) -> dict:
    from poolmta.trace import query
    con = query.open_readonly(str(data_dir))
    try:
        return query.summary(con, queue_id)
    finally:
        con.close()


def wait_summary(world: "World", queue_id: str, pred, timeout: float = 20.0) -> dict:
    """Wait until the trace summary of QUEUE_ID satisfies PRED; return it."""
    end = time.time() + timeout
    while time.time() < end:
        s = trace_summary(world.data_dir, queue_id)
        if pred(s):
            return s
        time.sleep(0.1)
    raise AssertionError(f"trace of {queue_id} never satisfied the condition: {trace_summary(world.data_dir, queue_id)}")


def trace_events(data_dir: Path, queue_id: str) -> list[dict]:
    from poolmta.trace import query
    con = query.open_readonly(str(data_dir))
    try:
        return query.timeline(con, queue_id)
    finally:
        con.close()


def wait_events(world: "World", queue_id: str, kind: str, timeout: float = 20.0) -> list[dict]:
    """Wait until QUEUE_ID's timeline holds an event of KIND; return those events. For
    events recorded after the 250 (a sender action): the message may be delivered, and
    its delivery traced, before they are written."""
    end = time.time() + timeout
    while True:
        found = [e for e in trace_events(world.data_dir, queue_id) if e["event"] == kind]
        if found or time.time() >= end:
            return found
        time.sleep(0.1)


def corpus(name: str) -> bytes:
    """A message from tests/data/corpus with CRLF line ends and no mbox 'From ' line."""
    raw = (ROOT / "tests" / "data" / "corpus" / name).read_bytes()
    if raw.startswith(b"From "):
        raw = raw.split(b"\n", 1)[1]
    return raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
