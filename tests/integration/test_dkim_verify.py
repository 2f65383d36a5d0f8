"""Our DKIM signatures and ARC seals verify over real DNS: the loopback DNS server
(tests/support/dnsserver.py) publishes the TXT records that `keys.keygen` printed, and

- dkimpy verifies through `arc.make_dnsfunc` (dnspython, UDP/TCP to the server);
- opendkim, an independent C implementation (Debian package `opendkim`), verifies in its
  test mode (`opendkim -t FILE`), its resolver (libunbound) forwarding every query to the
  same loopback server through a `ResolverConfiguration` file (`forward-addr: 127.0.0.1@PORT`).
  `opendkim-testmsg` (opendkim-tools) cannot be used for this: it resolves through the
  system's stub resolver, which only asks port 53 of the nameservers in /etc/resolv.conf.

For ARC, besides dkimpy, Mail::DKIM (Perl, Debian package `libmail-dkim-perl`: the
implementation that vendors the ValiMail suite) verifies our chains, its Net::DNS resolver
pointed at the loopback server. It also checks our RSA DKIM signatures (this Mail::DKIM,
1.20230212, has no Ed25519).

A missing opendkim or Mail::DKIM is a failure naming the package to install, not a skip.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import dkim as dkimpy
import pytest

from poolmta.config import DkimConfig
from poolmta.rewrite import arc, dkim, keys
from tests.support.dnsserver import TestDNSServer

HEADERS = DkimConfig().headers
NOW = 1796212800

MSG = (b"Received: from client.example.com ([192.0.2.10])\r\n\tby mx.example.com; Tue, 1 Dec 2026 12:00:00 +0000\r\n"
       b"From: Alice Example <alice@example.com>\r\nTo: Bob <bob@example.net>\r\n"
       b"Subject: Quarterly report\r\n  (folded)\r\nDate: Tue, 1 Dec 2026 12:00:00 +0000\r\n"
       b"Message-ID: <r1@example.com>\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
       b"\r\nHello Bob,  \r\n\r\nthe report   is attached.\r\n\r\n\r\n")

FWD = (b"Received: from mail.sender.example ([192.0.2.7])\r\n\tby mx.fwd.example; Tue, 1 Dec 2026 12:00:00 +0000\r\n"
       b"From: Carol <carol@sender.example>\r\nTo: bob@fwd.example\r\nSubject: forwarded\r\n"
       b"Date: Tue, 1 Dec 2026 11:59:00 +0000\r\nMessage-ID: <f1@sender.example>\r\n\r\nHello Bob.\r\n")


def _opendkim() -> str:
    path = shutil.which("opendkim") or ("/usr/sbin/opendkim" if os.access("/usr/sbin/opendkim", os.X_OK) else None)
    if path is None:
        pytest.fail("opendkim is not installed: the independent DKIM verifier of this test is Debian's "
                    "`opendkim` package (apt-get install -y opendkim)", pytrace=False)
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A key store (example.com: RSA selector1 active + Ed25519 selector2; RSA keys for two
    forwarders) and the loopback DNS server publishing their records."""
    kd = tmp_path_factory.mktemp("dkim")
    made = [keys.keygen(str(kd), "example.com", "selector1"),
            keys.keygen(str(kd), "example.com", "selector2", "ed25519-sha256"),
            keys.keygen(str(kd), "fwd.example"),
            keys.keygen(str(kd), "relay.example")]
    zone = {g.name: {"TXT": [keys.txt_strings(g.value)]} for g in made}
    zone["broken._domainkey.example.com"] = {"TXT": ["v=DKIM1; k=rsa; p=notbase64!"]}
    with TestDNSServer(zone, servfail=["down._domainkey.example.com"]) as server:
        yield kd, server, arc.make_dnsfunc([("127.0.0.1", server.port)], timeout=2)


def signed(kd: Path, selector: str, content: bytes = MSG) -> bytes:
    key = keys._load(str(kd), "example.com", selector)
    out = dkim.sign(content, "example.com", key, HEADERS, NOW)
    assert isinstance(out, bytes), out
    return out


def dkimpy_verify(content: bytes, dnsfunc) -> bool:
    try:
        return dkimpy.DKIM(content).verify(dnsfunc=dnsfunc)
    except dkimpy.DKIMException:
        return False


# ---- dkimpy over DNS ------------------------------------------------------------------------------

@pytest.mark.parametrize("selector", ["selector1", "selector2"])
def test_dkimpy_verifies_our_signatures_over_dns(world, selector):
    kd, server, dnsfunc = world
    out = signed(kd, selector)
    before = len(server.resolver.queries)
    assert dkimpy_verify(out, dnsfunc)
    assert (f"{selector}._domainkey.example.com", "TXT") in server.resolver.queries[before:]
    assert not dkimpy_verify(out.replace(b"is attached", b"is missing"), dnsfunc)


def test_the_active_key_through_the_whole_path(world):
    kd, server, dnsfunc = world
    content = MSG
    domain = dkim.signing_domain(content, ["example.com"])
    out = dkim.sign(content, domain, keys.active_key(str(kd), domain), HEADERS, NOW)
    assert dkimpy_verify(out, dnsfunc)


def test_make_dnsfunc_answers(world):
    kd, server, dnsfunc = world
    value = dnsfunc(b"selector1._domainkey.example.com.")
    assert value.startswith(b"v=DKIM1; k=rsa; p=") and len(value) > 255    # several DNS strings, joined
    assert dnsfunc(b"nosuch._domainkey.example.com.") is None
    with pytest.raises(dkimpy.DnsTimeoutError):
        dnsfunc(b"down._domainkey.example.com.")


def test_a_signature_whose_key_is_not_published_does_not_verify(world):
    kd, server, dnsfunc = world
    out = signed(kd, "selector1").replace(b"s=selector1", b"s=broken", 1)
    assert not dkimpy_verify(out, dnsfunc)
    out = signed(kd, "selector1").replace(b"s=selector1", b"s=down", 1)
    assert not dkimpy_verify(out, dnsfunc)


# ---- opendkim (independent verifier) over the same DNS ---------------------------------------

def opendkim_verify(tmp_path: Path, server: TestDNSServer, content: bytes) -> tuple[str, str]:
    """(dkim result from opendkim's Authentication-Results, its whole output)."""
    binary = _opendkim()
    unbound = tmp_path / "unbound.conf"
    unbound.write_text("server:\n"
                       "  do-not-query-localhost: no\n"
                       '  module-config: "iterator"\n'
                       "forward-zone:\n"
                       '  name: "."\n'
                       f"  forward-addr: 127.0.0.1@{server.port}\n")
    conf = tmp_path / "opendkim.conf"
    conf.write_text(f"Mode v\nResolverConfiguration {unbound}\nSyslog no\nMinimumKeyBits 1024\n"
                    f"AlwaysAddARHeader yes\nAuthservID verifier.test\n")
    msg = tmp_path / "message.eml"
    msg.write_bytes(content)
    p = subprocess.run([binary, "-x", str(conf), "-vvv", "-t", str(msg)], capture_output=True, text=True,
                       timeout=60, stdin=subprocess.DEVNULL)
    output = f"exit {p.returncode}\n{p.stdout}\n{p.stderr}"
    m = re.search(r"hname='Authentication-Results' hvalue='[^']*?dkim=(\w+)", p.stdout)
    return (m.group(1) if m else ""), output


@pytest.mark.parametrize("selector,algorithm", [("selector1", "rsa-sha256"), ("selector2", "ed25519-sha256")])
def test_opendkim_verifies_our_signatures(world, tmp_path, selector, algorithm):
    kd, server, _ = world
    out = signed(kd, selector)
    before = len(server.resolver.queries)
    result, output = opendkim_verify(tmp_path, server, out)
    assert result == "pass", output
    assert f"header.s={selector}" in output and f"header.a={algorithm}" in output, output
    assert re.search(rf"verification \(s={selector}, d=example\.com, .*\) succeeded", output), output
    assert (f"{selector}._domainkey.example.com", "TXT") in server.resolver.queries[before:]


def test_opendkim_fails_a_tampered_message(world, tmp_path):
    kd, server, _ = world
    out = signed(kd, "selector1").replace(b"is attached", b"is missing")
    result, output = opendkim_verify(tmp_path, server, out)
    assert result == "fail", output


def test_opendkim_verifies_golden_lf_message(world, tmp_path):
    """Bare-LF input stays bare LF; opendkim reads it as a file of lines and still agrees."""
    kd, server, _ = world
    out = signed(kd, "selector1", MSG.replace(b"\r\n", b"\n"))
    result, output = opendkim_verify(tmp_path, server, out)
    assert result == "pass", output


# ---- ARC over DNS ------------------------------------------------------------------------------------

def test_arc_first_and_second_hop_verify_over_dns(world):
    kd, server, dnsfunc = world
    one = arc.seal(FWD, "fwd.example", keys.active_key(str(kd), "fwd.example"),
                   "mx.fwd.example; spf=pass smtp.mailfrom=carol@sender.example; dkim=none", "mx.fwd.example",
                   NOW, dnsfunc=dnsfunc)
    assert isinstance(one, bytes), one
    cv, _, reason = dkimpy.arc_verify(one, dnsfunc=dnsfunc)
    assert cv == dkimpy.CV_Pass, reason

    hop = b"Received: from mx.fwd.example\r\n\tby mx.relay.example; Tue, 1 Dec 2026 12:01:00 +0000\r\n" + one
    before = len(server.resolver.queries)
    two = arc.seal(hop, "relay.example", keys.active_key(str(kd), "relay.example"),
                   "mx.relay.example; spf=fail smtp.mailfrom=carol@sender.example", "mx.relay.example",
                   NOW + 60, dnsfunc=dnsfunc)              # cv from validating the chain over DNS
    assert isinstance(two, bytes), two
    assert ("selector1._domainkey.fwd.example", "TXT") in server.resolver.queries[before:]
    assert b"cv=pass" in two.split(b"ARC-Message-Signature")[0]
    cv, results, reason = dkimpy.arc_verify(two, dnsfunc=dnsfunc)
    assert cv == dkimpy.CV_Pass, reason
    assert [r["instance"] for r in results] == [2, 1]


def test_arc_chain_status_is_fail_when_dns_is_down(world):
    kd, server, _ = world
    one = arc.seal(FWD, "fwd.example", keys.active_key(str(kd), "fwd.example"), "mx.fwd.example; spf=pass",
                   "mx.fwd.example", NOW, cv="none")
    dead = arc.make_dnsfunc([("127.0.0.1", 9)], timeout=0.5)      # nothing answers there
    assert arc.chain_status(one, dead)[0] == "fail"


# ---- Mail::DKIM (independent ARC verifier) over the same DNS ---------------------------------

MAIL_DKIM = r"""
use strict; use warnings;
use Net::DNS::Resolver; use Mail::DKIM::DNS; use Mail::DKIM::ARC::Verifier; use Mail::DKIM::Verifier;
my ($port, $file) = @ARGV;
Mail::DKIM::DNS::resolver(Net::DNS::Resolver->new(nameservers => ['127.0.0.1'], port => $port,
                                                  udp_timeout => 5, tcp_timeout => 5));
open(my $fh, '<', $file) or die "$file: $!"; binmode $fh; local $/; my $msg = <$fh>; close $fh;
$msg =~ s/\r?\n/\r\n/g;
my $arc = Mail::DKIM::ARC::Verifier->new(Strict => 1);
$arc->PRINT($msg); $arc->CLOSE;
print "arc=", $arc->result, " (", ($arc->result_detail // ''), ")\n";
my $dk = Mail::DKIM::Verifier->new();
$dk->PRINT($msg); $dk->CLOSE;
print "dkim=", $dk->result, " (", ($dk->result_detail // ''), ")\n";
"""


def mail_dkim(tmp_path: Path, server: TestDNSServer, content: bytes) -> dict[str, str]:
    """{"arc": result, "dkim": result, "out": whole output} from Mail::DKIM."""
    check = subprocess.run(["perl", "-MMail::DKIM::ARC::Verifier", "-MNet::DNS", "-e", "1"],
                           capture_output=True, text=True)
    if check.returncode != 0:
        pytest.fail("Mail::DKIM is not installed: the independent ARC verifier of this test is Debian's "
                    "`libmail-dkim-perl` package (apt-get install -y libmail-dkim-perl)\n" + check.stderr,
                    pytrace=False)
    script = tmp_path / "verify.pl"
    script.write_text(MAIL_DKIM)
    msg = tmp_path / "message.eml"
    msg.write_bytes(content)
    p = subprocess.run(["perl", str(script), str(server.port), str(msg)], capture_output=True, text=True,
                       timeout=60, stdin=subprocess.DEVNULL)
    out = f"exit {p.returncode}\n{p.stdout}\n{p.stderr}"
    got = dict(re.findall(r"^(arc|dkim)=(\w+)", p.stdout, re.M))
    got["out"] = out
    return got


def test_mail_dkim_verifies_our_arc_chains(world, tmp_path):
    kd, server, dnsfunc = world
    one = arc.seal(FWD, "fwd.example", keys.active_key(str(kd), "fwd.example"),
                   "mx.fwd.example; spf=pass smtp.mailfrom=carol@sender.example", "mx.fwd.example",
                   NOW, dnsfunc=dnsfunc)
    r = mail_dkim(tmp_path, server, one)
    assert r["arc"] == "pass", r["out"]
    assert "as.1.fwd.example=pass" in r["out"] and "ams.1.fwd.example=pass" in r["out"]

    hop = b"Received: from mx.fwd.example\r\n\tby mx.relay.example; Tue, 1 Dec 2026 12:01:00 +0000\r\n" + one
    two = arc.seal(hop, "relay.example", keys.active_key(str(kd), "relay.example"),
                   "mx.relay.example; spf=fail smtp.mailfrom=carol@sender.example", "mx.relay.example",
                   NOW + 60, dnsfunc=dnsfunc)
    r = mail_dkim(tmp_path, server, two)
    assert r["arc"] == "pass", r["out"]
    assert "as.2.relay.example=pass" in r["out"] and "as.1.fwd.example=pass" in r["out"]

    r = mail_dkim(tmp_path, server, two.replace(b"Hello Bob.", b"Hello Eve."))
    assert r["arc"] == "fail", r["out"]


def test_mail_dkim_verifies_our_rsa_signature(world, tmp_path):
    kd, server, _ = world
    r = mail_dkim(tmp_path, server, signed(kd, "selector1"))
    assert r["dkim"] == "pass", r["out"]
    r = mail_dkim(tmp_path, server, signed(kd, "selector1").replace(b"is attached", b"is missing"))
    assert r["dkim"] == "fail", r["out"]
