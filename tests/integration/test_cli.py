"""The poolmta command as an operator runs it (a subprocess), against a real DNS
server on loopback and a real spool file."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from poolmta.assess.spam import GTUBE
from tests.support.dnsserver import TestDNSServer
from tests.support.harness import ZONE, config_text, corpus, free_port

ROOT = Path(__file__).resolve().parents[2]


def run(*args, stdin: bytes | None = None, check=False) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    p = subprocess.run([sys.executable, "-m", "poolmta", *args], input=stdin, capture_output=True, env=env,
                       timeout=60)
    if check:
        assert p.returncode == 0, p.stderr.decode()
    return p


@pytest.fixture(scope="module")
def dns_server():
    with TestDNSServer(ZONE) as d:
        yield d


@pytest.fixture
def cfg_file(tmp_path, dns_server):
    p = tmp_path / "poolmta.toml"
    p.write_text(config_text(str(tmp_path / "spool"), free_port(), 2525, dns_server.port))
    return p


def test_config_check_ok_and_bad(tmp_path, cfg_file):
    p = run("config", "check", str(cfg_file))
    assert p.returncode == 0, p.stdout
    assert b"0 error(s)" in p.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text(cfg_file.read_text().replace('address = "127.0.0.4"', 'address = "127.0.0"'))
    p = run("config", "check", str(bad))
    assert p.returncode == 1
    assert b"pools.relay.sources[0].address: not an IP address" in p.stdout


def test_serve_refuses_bad_config_naming_the_key(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[server]\nlisten = \"127.0.0.1:1\"\nmax_recipients = \"many\"\n")
    p = run("serve", "--config", str(bad))
    assert p.returncode == 2
    assert b"server.max_recipients: must be an integer" in p.stderr


def test_config_params_documents_everything():
    p = run("config", "params", check=True)
    assert b"delivery.retry_schedule" in p.stdout and b"server.max_message_size" in p.stdout


def test_hash_password_verifies():
    from poolmta.tenancy import verify_password
    p = run("hash-password", "--stdin", stdin=b"s3cret\n", check=True)
    h = p.stdout.decode().strip()
    assert h.startswith("$scrypt$") and verify_password("s3cret", h) and not verify_password("other", h)


@pytest.mark.parametrize("msg,mail_from,rcpt,extra,pool,reasons", [
    ("ham", "alice@contoso.test", "bob@dest.test", ["--auth-user", "alice@contoso.test"], "normal", ["normal"]),
    ("gtube", "alice@contoso.test", "bob@dest.test", ["--auth-user", "alice@contoso.test"], "high-risk", ["spam"]),
    ("bounce", "", "bob@dest.test", ["--client-ip", "127.0.0.10"], "high-risk", ["dsn"]),
    ("ham", "someone@external.test", "bob@dest.test", ["--client-ip", "127.0.0.10"], "relay",
     ["relay-unauthenticated"]),
    ("ham", "app@nodns.contoso.test", "bob@dest.test", ["--client-ip", "127.0.0.10"], "high-risk",
     ["source-domain-unresolvable"]),
    ("ham", "x@nullmx.test", "bob@dest.test", ["--client-ip", "127.0.0.10"], "high-risk",
     ["source-domain-null-mx", "relay-unauthenticated"]),
])
def test_route_prints_the_servers_decision(tmp_path, cfg_file, msg, mail_from, rcpt, extra, pool, reasons):
    files = {"ham": corpus("ham/easy-ham-2__00001.1a31cc283af0060967a233d26548a6ce.eml"),
             "gtube": b"Subject: t\r\n\r\n" + GTUBE + b"\r\n",
             "bounce": corpus("bounces/lhost-postfix-01.eml")}
    f = tmp_path / "m.eml"
    f.write_bytes(files[msg])
    p = run("route", str(f), "--mail-from", mail_from, "--rcpt", rcpt, "--config", str(cfg_file), "--json", *extra,
            check=True)
    out = json.loads(p.stdout)
    assert out["decision"]["pool"] == pool
    assert out["decision"]["reasons"] == reasons
    human = run("route", str(f), "--mail-from", mail_from, "--rcpt", rcpt, "--config", str(cfg_file), *extra,
                check=True).stdout.decode()
    assert f"pool:     {pool}" in human and reasons[0] in human


def test_route_rules_table():
    out = run("route", "--rules", check=True).stdout.decode().splitlines()
    assert out[0].startswith("1. dsn") and "high-risk" in out[0]
    assert out[-1].split()[1] == "normal"


def test_trace_and_queue_without_spool_say_so(tmp_path, cfg_file):
    p = run("trace", "--config", str(cfg_file), "ABC")
    assert p.returncode == 1 and b"no spool" in p.stderr


def test_serve_refuses_a_source_address_that_is_not_on_this_host(tmp_path, cfg_file):
    bad = tmp_path / "bad.toml"
    bad.write_text(cfg_file.read_text().replace('address = "127.0.0.4"', 'address = "192.0.2.77"'))
    p = run("config", "check", str(bad))
    assert p.returncode == 0 and b"warning: pools.relay.sources[0].address: 192.0.2.77 cannot be bound" in p.stdout
    p = run("serve", "--config", str(bad))
    assert p.returncode == 2 and b"pools.relay.sources[0].address" in p.stderr


def test_config_from_environment(tmp_path, cfg_file):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), POOLMTA_CONFIG=str(cfg_file))
    p = subprocess.run([sys.executable, "-m", "poolmta", "queue", "list"], capture_output=True, env=env, timeout=60)
    assert p.returncode == 1 and str(tmp_path / "spool").encode() in p.stderr    # the configured spool, not the default
