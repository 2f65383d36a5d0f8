"""assess checks on their own: each produces a fact, never a decision."""

from pathlib import Path

import pytest

from poolmta import config
from poolmta.assess import Context, assess, dsn, forwarded, source_domain, spam
from poolmta.dns import Rcode, StaticResolver
from poolmta.model import DomainState, Envelope, Message, Origin, Recipient
from poolmta.tenancy import Directory
from tests.support.configs import POOLS

DATA = Path(__file__).resolve().parents[1] / "data" / "corpus"

CFG = config.loads(POOLS + """
[tenants.contoso]
accepted_domains = ["contoso.test", "fabrikam.test"]
""")


def msg(mail_from="a@contoso.test", rcpts=("b@example.org",), content=b"Subject: x\r\n\r\nhello\r\n",
        tenant="contoso", trusted=False, auth_user="a@contoso.test"):
    return Message("Q1", Envelope(mail_from, tuple(Recipient(r) for r in rcpts)),
                   Origin("127.0.0.9", tenant=tenant, trusted_connector=trusted, connector="c", auth_user=auth_user),
                   content, 0.0)


def crlf(p: Path) -> bytes:
    raw = p.read_bytes()
    if raw.startswith(b"From "):
        raw = raw.split(b"\n", 1)[1]
    return raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


async def test_dsn_null_reverse_path():
    f = await dsn.check(msg(mail_from=""))
    assert (f.is_dsn, f.why) == (True, "null-reverse-path")


@pytest.mark.parametrize("name", ["lhost-postfix-01.eml", "rfc3464-01.eml", "lhost-exchange2007-01.eml"])
async def test_dsn_multipart_report_from_real_bounces(name):
    # real bounces sent with a non-null sender still count as DSNs
    f = await dsn.check(msg(mail_from="postmaster@example.org", content=crlf(DATA / "bounces" / name)))
    assert (f.is_dsn, f.why) == (True, "multipart-report")


def _dsn_by_the_parser(content: bytes) -> bool:
    """What dsn.check answered before its byte test: the email package's reading."""
    h = dsn._parse_headers(dsn.header_block(content))
    rt = h.get_param("report-type") or ""
    return h.get_content_type() == "multipart/report" and isinstance(rt, str) and rt.lower() == "delivery-status"


_REPORT_EDGES = [
    b"Content-Type: MULTIPART/Report; Report-Type=Delivery-Status\r\n\r\nx\r\n",
    b"content-type:multipart/report;report-type=delivery-status\r\n\r\nx\r\n",
    b"Content-Type: multipart/\r\n report; report-type=delivery-status\r\n\r\nx\r\n",
    b"Content-Type: multipart / report; report-type=delivery-status\r\n\r\nx\r\n",
    b"Content-Type:\r\n multipart/report;\r\n report-type=delivery-status\r\n\r\nx\r\n",
    b"Content-Type: multipart/report; report-type=disposition-notification\r\n\r\nx\r\n",
    b"Subject: multipart/report\r\nContent-Type: text/plain\r\n\r\nx\r\n",
    b"Content-Type: text/plain\r\n\r\nmultipart/report; report-type=delivery-status\r\n",
    b"Content-Type: multipart/report; report-type=delivery-status\n\nbare LF\n",
]


async def test_dsn_byte_test_agrees_with_the_parser():
    """The check skips parsing the header section when "multipart/report" is not in it:
    the same verdict as the parser's on every corpus message and on case, fold and
    spacing edges."""
    contents = [crlf(p) for p in sorted(DATA.parent.rglob("*.eml"))] + _REPORT_EDGES
    assert len(contents) > 40
    dsns = 0
    for content in contents:
        got = (await dsn.check(msg(mail_from="postmaster@example.org", content=content))).is_dsn
        assert got == _dsn_by_the_parser(content), content[:200]
        dsns += got
    assert dsns >= 5                     # three real bounces and two edges


async def test_ham_is_not_dsn_nor_spam():
    for p in (DATA / "ham").glob("*.eml"):
        m = msg(content=crlf(p))
        assert not (await dsn.check(m)).is_dsn
        assert not (await spam.check(m)).is_spam


async def test_gtube_is_spam():
    m = msg(content=b"Subject: t\r\n\r\n" + spam.GTUBE + b"\r\n")
    f = await spam.check(m)
    assert (f.is_spam, f.engine) == (True, "gtube")


async def test_x_spam_flag_only_from_trusted_connector():
    content = b"X-Spam-Flag: YES\r\nSubject: t\r\n\r\nbody\r\n"
    assert not (await spam.check(msg(content=content, trusted=False))).is_spam
    f = await spam.check(msg(content=content, trusted=True))
    assert (f.is_spam, f.engine) == (True, "upstream")


ZONE = StaticResolver({
    ("contoso.test", "MX"): ((10, "mx.contoso.test"),),
    ("aonly.test", "A"): ("192.0.2.1",),
    ("v6only.test", "AAAA"): ("2001:db8::1",),
    ("nullmx.test", "MX"): ((0, ""),),
    ("txtonly.test", "TXT"): ("v=spf1 -all",),
    ("broken.test", "MX"): Rcode.TEMPERROR,
    ("halfbroken.test", "A"): Rcode.TEMPERROR,
})


@pytest.mark.parametrize("domain,state", [
    ("contoso.test", DomainState.RESOLVES),
    ("aonly.test", DomainState.RESOLVES),
    ("v6only.test", DomainState.RESOLVES),
    ("nullmx.test", DomainState.NULL_MX),
    ("txtonly.test", DomainState.NO_RECORD),       # NODATA for MX, A and AAAA
    ("nxdomain.test", DomainState.NO_RECORD),
    ("broken.test", DomainState.TEMPERROR),         # SERVFAIL is not "no record"
    ("halfbroken.test", DomainState.TEMPERROR),
    ("", DomainState.NOT_APPLICABLE),
    ("[192.0.2.1]", DomainState.NO_RECORD),         # an address literal has no name in DNS
    ("999.999", DomainState.NO_RECORD),             # all-digit labels are names: asked, NXDOMAIN
])
async def test_source_domain_states(domain, state):
    f = await source_domain.check_domain(domain, ZONE)
    assert f.state == state


async def test_forwarded():
    ctx = Context(ZONE, Directory(CFG))
    assert not (await forwarded.check(msg("a@contoso.test", ["x@example.org"]), ctx)).forwarded
    assert not (await forwarded.check(msg("a@FABRIKAM.test", ["x@example.org"]), ctx)).forwarded
    f = await forwarded.check(msg("someone@gmail.test", ["x@example.org", "y@contoso.test"]), ctx)
    assert (f.forwarded, f.external_recipients) == (True, 1)
    # foreign sender to the tenant's own domain only: not leaving, not forwarding
    assert not (await forwarded.check(msg("someone@gmail.test", ["y@contoso.test"]), ctx)).forwarded
    # our domain as sender, but from the internet (no AUTH, no connector): proves nothing
    assert (await forwarded.check(msg("ceo@contoso.test", ["x@example.org"], auth_user=""), ctx)).forwarded


async def test_assess_gathers_all_facts():
    f = await assess(msg("a@contoso.test"), Context(ZONE, Directory(CFG)))
    assert f.source_domain.state == DomainState.RESOLVES
    assert not f.dsn.is_dsn and not f.spam.is_spam and not f.forwarded.forwarded
