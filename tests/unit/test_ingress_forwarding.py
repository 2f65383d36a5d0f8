"""Relay control for forwarding addresses: automatic forwarding control, and
bounces returning to SRS addresses (which must never make an open relay)."""

from poolmta import config
from poolmta.clock import FakeClock
from poolmta.ingress.acceptance import Accept, Refuse, SessionFacts, check_recipient
from poolmta.rewrite.srs import SRS
from poolmta.tenancy import Directory
from tests.support.configs import POOLS

CFG = config.loads(POOLS + """
[tenants.contoso]
accepted_domains = ["contoso.test"]
[tenants.contoso.forward]
"info@contoso.test" = ["x@partner.test"]
[tenants.northwind]
accepted_domains = ["northwind.test"]
auto_forwarding = "off"
[tenants.northwind.forward]
"sales@northwind.test" = ["y@partner.test"]
""")
D = Directory(CFG)
INTERNET = SessionFacts(client_ip="192.0.2.50")
CLOCK = FakeClock(1_800_000_000)
SRS_ = SRS("contoso.test", ["a-long-enough-secret-1"], clock=CLOCK)


def test_forwarding_on_expands():
    a = check_recipient("info@contoso.test", INTERNET, D, mail_from="s@ext.test")
    assert isinstance(a, Accept) and [r.address for r in a.recipients] == ["x@partner.test"]


def test_forwarding_off_refuses_at_delivery_and_tells_external_sender():
    a = check_recipient("sales@northwind.test", INTERNET, D, mail_from="s@ext.test")
    assert isinstance(a, Accept) and a.tenant == "northwind"
    (r,) = a.recipients
    assert r.address == "sales@northwind.test" and r.refused.startswith("550 5.7.520")
    assert r.notify == ()                                   # default NOTIFY: the failure is reported


def test_forwarding_off_no_dsn_to_internal_or_null_sender():
    for sender in ("boss@northwind.test", ""):
        (r,) = check_recipient("sales@northwind.test", INTERNET, D, mail_from=sender).recipients
        assert r.refused and r.notify == ("NEVER",), sender


def test_srs_bounce_is_reversed_to_the_original_sender():
    rewritten = SRS_.forward("alice@ext.test")
    a = check_recipient(rewritten, INTERNET, D, mail_from="", srs=SRS_)
    assert isinstance(a, Accept) and a.via == "srs" and a.tenant == "contoso"
    (r,) = a.recipients
    assert (r.address, r.original, r.notify) == ("alice@ext.test", rewritten, ("NEVER",))


def test_forged_or_expired_srs_is_an_unknown_user():
    rewritten = SRS_.forward("alice@ext.test")
    local, _, dom = rewritten.partition("@")
    forged = local.replace(local[5:9], "AAAA" if local[5:9] != "AAAA" else "BBBB", 1) + "@" + dom
    for addr in (forged, "SRS0=xxxx=AA=victim.test=bob@contoso.test"):
        r = check_recipient(addr, INTERNET, D, mail_from="", srs=SRS_)
        assert isinstance(r, Refuse) and str(r.reply).startswith("550 5.1.1"), addr
    later = SRS("contoso.test", ["a-long-enough-secret-1"], clock=FakeClock(CLOCK.now() + 23 * 86400))
    r = check_recipient(rewritten, INTERNET, D, mail_from="", srs=later)
    assert isinstance(r, Refuse) and "5.1.1" in str(r.reply)


def test_srs_address_outside_our_domains_is_still_relaying():
    r = check_recipient("SRS0=abcd=AA=victim.test=bob@elsewhere.test", INTERNET, D, mail_from="", srs=SRS_)
    assert isinstance(r, Refuse) and str(r.reply).startswith("550 5.7.1")
