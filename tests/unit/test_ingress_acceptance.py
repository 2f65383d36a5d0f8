"""ingress.acceptance as tables: address syntax, ESMTP parameters, relay control,
transaction rules and DATA framing. No network; the Directory is built from a
small config (it only answers from memory here)."""

import pytest

from poolmta import replies
from poolmta.config import loads
from poolmta.ingress import acceptance as acc
from poolmta.ingress.acceptance import Accept, DataAssembler, MailParams, Refuse, RcptParams, SessionFacts
from poolmta.ingress.server import add_enhanced_code
from poolmta.model import Recipient
from poolmta.tenancy import ConnectorMatch, Directory

CONFIG = """
[pools.normal]
role = "normal"
sources = [{ address = "127.0.0.2", ehlo = "out1.gw.test" }]
[pools.high-risk]
role = "high-risk"
sources = [{ address = "127.0.0.3", ehlo = "hr1.gw.test" }]
[pools.relay]
role = "relay"
sources = [{ address = "127.0.0.4", ehlo = "rly1.gw.test" }]

[tenants.acme]
accepted_domains = ["acme.example"]
connectors = [{ name = "acme-onprem", client_ips = ["127.0.0.10/32"] }]
[tenants.acme.forward]
"info@acme.example" = ["info.team@partner.example", "boss@other.example"]
"solo@acme.example" = ["solo@partner.example"]

[tenants.globex]
accepted_domains = ["globex.example"]
[tenants.globex.forward]
"sales@globex.example" = ["sales@partner.example"]
"""

DIRECTORY = Directory(loads(CONFIG))
NOBODY = SessionFacts(client_ip="198.51.100.7")
AUTHED = SessionFacts(client_ip="198.51.100.7", auth_user="alice@acme.example", auth_tenant="acme")
CONNECTOR = SessionFacts(client_ip="127.0.0.10", connector=ConnectorMatch("acme", "acme-onprem", False))


def reply_of(result):
    assert isinstance(result, Refuse), result
    return result.reply


# ---- address syntax ------------------------------------------------------------

@pytest.mark.parametrize("arg, address", [
    ("TO:<bob@partner.example>", "bob@partner.example"),
    ("to:<bob@Partner.EXAMPLE>", "bob@partner.example"),           # domain folded, local kept
    ("TO: <bob@partner.example>", "bob@partner.example"),          # tolerated space after the colon
    ("TO:<\"bob\"@partner.example>", "bob@partner.example"),       # needless quotes dropped
    ("TO:<\"b o\\\"b\"@partner.example>", "\"b o\\\"b\"@partner.example"),
    ("TO:<@relay.example:bob@partner.example>", "bob@partner.example"),              # source route stripped
    ("TO:<@a.example,@b.example:bob@partner.example>", "bob@partner.example"),
    ("TO:<user%other@acme.example>", "user%other@acme.example"),    # % is just a character
    ("TO:<other!user@acme.example>", "other!user@acme.example"),
    ("TO:<user@[127.0.0.1]>", "user@[127.0.0.1]"),                 # syntax ok; refused by policy
    ("TO:<user@[IPv6:0:0::1]>", "user@[IPv6:::1]"),
    ("TO:<bob@localhost>", "bob@localhost"),
])
def test_rcpt_syntax_accepted(arg, address):
    cmd = acc.parse_rcpt(arg, esmtp=True, smtputf8=False)
    assert isinstance(cmd, acc.RcptCommand), cmd
    assert cmd.address == address


@pytest.mark.parametrize("arg, reply", [
    ("TO:bob@partner.example", replies.R501_BAD_ADDRESS),          # no angle brackets
    ("TO:<bob@partner.example", replies.R501_BAD_ADDRESS),
    ("TO:<bob@partner.example>x", replies.R501_BAD_ADDRESS),
    ("TO:<>", replies.R501_BAD_ADDRESS),
    ("TO:<bob>", replies.R501_BAD_ADDRESS),
    ("TO:<user@other@acme.example>", replies.R501_BAD_ADDRESS),
    ("TO:<user@acme.example.>", replies.R501_BAD_ADDRESS),          # trailing dot
    ("TO:<user@acme..example>", replies.R501_BAD_ADDRESS),
    ("TO:<user@-acme.example>", replies.R501_BAD_ADDRESS),
    ("TO:<user@acme_x.example>", replies.R501_BAD_ADDRESS),
    ("TO:<.user@acme.example>", replies.R501_BAD_ADDRESS),
    ("TO:<us..er@acme.example>", replies.R501_BAD_ADDRESS),
    ("TO:<us er@acme.example>", replies.R501_BAD_ADDRESS),
    ("TO:<\"unterminated@acme.example>", replies.R501_BAD_ADDRESS),
    ("TO:<\"x\"y@acme.example>", replies.R501_BAD_ADDRESS),
    ("TO:<user@[127.0.0.256]>", replies.R501_BAD_ADDRESS),
    ("TO:<user@[foo:bar]>", replies.R501_BAD_ADDRESS),
    ("TO:<@acme.example:>", replies.R501_BAD_ADDRESS),
    ("TO:<@acme.example>", replies.R501_BAD_ADDRESS),
    ("TO:<acme.example:user@other.example>", replies.R501_BAD_ADDRESS),
    ("TO:<user\r@acme.example>", replies.R501_BAD_ADDRESS),
    ("TO:<user@acme.example\udcff>", replies.R501_BAD_ADDRESS),    # undecodable byte
    ("TO:<" + "a" * 250 + "@acme.example>", replies.R501_BAD_ADDRESS),
    ("TO:<user@" + "a" * 64 + ".example>", replies.R501_BAD_ADDRESS),
    ("FROM:<bob@partner.example>", replies.R501_SYNTAX_PARAM),
    ("TO:<jürgen@partner.example>", replies.R553_567_NON_ASCII),    # needs SMTPUTF8
    ("TO:<Postmaster>", replies.R550_511_UNKNOWN_USER),
])
def test_rcpt_syntax_refused(arg, reply):
    assert reply_of(acc.parse_rcpt(arg, esmtp=True, smtputf8=False)).enhanced == reply.enhanced
    assert reply_of(acc.parse_rcpt(arg, esmtp=True, smtputf8=False)).code == reply.code


def test_utf8_address_with_smtputf8():
    cmd = acc.parse_rcpt("TO:<jürgen@bücher.example>", esmtp=True, smtputf8=True)
    assert cmd.address == "jürgen@bücher.example"
    mail = acc.parse_mail("FROM:<jürgen@bücher.example> SMTPUTF8", esmtp=True)
    assert mail.address == "jürgen@bücher.example" and mail.params.smtputf8
    assert reply_of(acc.parse_mail("FROM:<jürgen@bücher.example>", esmtp=True)) == replies.R553_567_NON_ASCII


# ---- parameters -----------------------------------------------------------------

@pytest.mark.parametrize("arg, params", [
    ("FROM:<>", MailParams()),
    ("FROM:<a@b.example> SIZE=1000", MailParams(size=1000)),
    ("FROM:<a@b.example> size=1000 body=8bitmime", MailParams(size=1000, body="8BITMIME")),
    ("FROM:<a@b.example> BODY=7BIT SMTPUTF8", MailParams(body="7BIT", smtputf8=True)),
    ("FROM:<a@b.example> RET=HDRS ENVID=QQ+2B1+3Dx", MailParams(ret="HDRS", envid="QQ+1=x")),
    ("FROM:<a@b.example> RET=full", MailParams(ret="FULL")),
    ("FROM:<a@b.example> AUTH=<>", MailParams(auth="<>")),
])
def test_mail_params_accepted(arg, params):
    cmd = acc.parse_mail(arg, esmtp=True)
    assert isinstance(cmd, acc.MailCommand), cmd
    assert cmd.params == params


@pytest.mark.parametrize("arg, reply", [
    ("FROM:<a@b.example> SIZE=abc", replies.R501_SYNTAX_PARAM),
    ("FROM:<a@b.example> SIZE", replies.R501_SYNTAX_PARAM),
    ("FROM:<a@b.example> BODY=BINARYMIME", replies.R501_SYNTAX_PARAM),
    ("FROM:<a@b.example> SMTPUTF8=yes", replies.R501_SYNTAX_PARAM),
    ("FROM:<a@b.example> RET=ALL", replies.R501_SYNTAX_PARAM),
    ("FROM:<a@b.example> ENVID=bad+zz", replies.R501_SYNTAX_PARAM),
    ("FROM:<a@b.example> ENVID=" + "x" * 101, replies.R501_SYNTAX_PARAM),
    ("FROM:<a@b.example> ENVID=a+0Db", replies.R501_SYNTAX_PARAM),   # control character
    ("FROM:<a@b.example> RET=FULL RET=HDRS", replies.R501_SYNTAX_PARAM),
    ("FROM:<a@b.example> SIZE=", replies.R501_SYNTAX_PARAM),
    ("FROM:<a@b.example> =1", replies.R501_SYNTAX_PARAM),
    ("FROM:<a@b.example> XFOO=1", replies.R555_PARAM_UNKNOWN),
    ("FROM:<a@b.example> NOTIFY=NEVER", replies.R555_PARAM_UNKNOWN),  # an RCPT parameter
    ("FROM:a@b.example", replies.R501_BAD_ADDRESS),
])
def test_mail_params_refused(arg, reply):
    r = reply_of(acc.parse_mail(arg, esmtp=True))
    assert (r.code, r.enhanced) == (reply.code, reply.enhanced)


def test_params_need_ehlo():
    assert reply_of(acc.parse_mail("FROM:<a@b.example> SIZE=1", esmtp=False)).code == 501
    assert isinstance(acc.parse_mail("FROM:<a@b.example>", esmtp=False), acc.MailCommand)


@pytest.mark.parametrize("params, expected", [
    ("NOTIFY=NEVER", RcptParams(notify=("NEVER",))),
    ("NOTIFY=success,Failure,DELAY", RcptParams(notify=("SUCCESS", "FAILURE", "DELAY"))),
    ("ORCPT=rfc822;bob+40partner.example", RcptParams(orcpt="rfc822;bob@partner.example")),
    ("NOTIFY=FAILURE ORCPT=rfc822;a+2Bb@c.example", RcptParams(notify=("FAILURE",), orcpt="rfc822;a+b@c.example")),
])
def test_rcpt_params_accepted(params, expected):
    cmd = acc.parse_rcpt(f"TO:<bob@partner.example> {params}", esmtp=True, smtputf8=False)
    assert cmd.params == expected


@pytest.mark.parametrize("params, code", [
    ("NOTIFY=NEVER,SUCCESS", 501), ("NOTIFY=ALWAYS", 501), ("NOTIFY=SUCCESS,SUCCESS", 501), ("NOTIFY=", 501),
    ("NOTIFY", 501), ("ORCPT=bob@partner.example", 501), ("ORCPT=rfc822;", 501), ("ORCPT=rfc822;a+4", 501),
    ("ORCPT=rfc822;a+0D+0AX-Injected:+20y", 501), ("ORCPT=rfc822;" + "a" * 500, 501),
    ("RET=FULL", 555), ("XFOO", 555),
])
def test_rcpt_params_refused(params, code):
    r = reply_of(acc.parse_rcpt(f"TO:<bob@partner.example> {params}", esmtp=True, smtputf8=False))
    assert r.code == code and r.enhanced == "5.5.4"


@pytest.mark.parametrize("text, decoded", [
    ("abc", "abc"), ("a+2Bb", "a+b"), ("+3D", "="), ("a+2bb", "a+b"), ("", ""),
    ("a=b", None), ("a b", None), ("+2", None), ("+GG", None), ("é", None),
])
def test_xtext(text, decoded):
    assert acc.xtext_decode(text) == decoded


# ---- relay control ----------------------------------------------------------------

FWD_INFO = (Recipient("info.team@partner.example", (), "rfc822;info@acme.example", "info@acme.example"),
            Recipient("boss@other.example", (), "rfc822;info@acme.example", "info@acme.example"))


@pytest.mark.parametrize("who, address, expected", [
    # unauthenticated client outside every connector
    (NOBODY, "bob@partner.example", replies.R550_571_RELAY_DENIED),
    (NOBODY, "nobody@acme.example", replies.R550_511_UNKNOWN_USER),
    (NOBODY, "info@acme.example", Accept(FWD_INFO, "acme", "forward")),
    (NOBODY, "INFO@ACME.example", Accept(tuple(
        Recipient(r.address, (), "rfc822;INFO@acme.example", "INFO@acme.example") for r in FWD_INFO), "acme", "forward")),
    (NOBODY, "sales@globex.example", Accept((Recipient("sales@partner.example", (), "rfc822;sales@globex.example",
                                                       "sales@globex.example"),), "globex", "forward")),
    # the classic tricks: never an external recipient
    (NOBODY, "user%partner.example@acme.example", replies.R550_511_UNKNOWN_USER),
    (NOBODY, "partner.example!user@acme.example", replies.R550_511_UNKNOWN_USER),
    (NOBODY, '"user@partner.example"@acme.example', replies.R550_511_UNKNOWN_USER),
    (NOBODY, "user@[127.0.0.1]", replies.R550_571_ADDRESS_LITERAL),
    (NOBODY, "user@acme.example.", replies.R501_BAD_ADDRESS),
    (NOBODY, "user@partner.example@acme.example", replies.R501_BAD_ADDRESS),
    (NOBODY, "info@acme.example.", replies.R501_BAD_ADDRESS),
    # authenticated: anything, as given; forwarding addresses still expanded
    (AUTHED, "bob@partner.example", Accept((Recipient("bob@partner.example"),), "acme", "auth")),
    (AUTHED, "nobody@acme.example", Accept((Recipient("nobody@acme.example"),), "acme", "auth")),
    (AUTHED, "sales@globex.example", Accept((Recipient("sales@partner.example", (), "rfc822;sales@globex.example",
                                                       "sales@globex.example"),), "acme", "auth")),
    (AUTHED, "user@[127.0.0.1]", replies.R550_571_ADDRESS_LITERAL),
    # connector
    (CONNECTOR, "bob@partner.example", Accept((Recipient("bob@partner.example"),), "acme", "connector")),
    (CONNECTOR, "user%other@partner.example", Accept((Recipient("user%other@partner.example"),), "acme", "connector")),
])
def test_check_recipient(who, address, expected):
    got = acc.check_recipient(address, who, DIRECTORY)
    if isinstance(expected, Accept):
        assert got == expected
    else:
        assert reply_of(got) == expected


def test_dsn_parameters_follow_the_recipient_and_its_expansion():
    got = acc.check_recipient("solo@acme.example", NOBODY, DIRECTORY, notify=("FAILURE",), orcpt="rfc822;x@y.example")
    assert got.recipients == (Recipient("solo@partner.example", ("FAILURE",), "rfc822;x@y.example",
                                        "solo@acme.example"),)
    got = acc.check_recipient("bob@partner.example", AUTHED, DIRECTORY, notify=("NEVER",))
    assert got.recipients == (Recipient("bob@partner.example", ("NEVER",)),)


def test_session_facts_tenant():
    assert (NOBODY.tenant, AUTHED.tenant, CONNECTOR.tenant) == ("", "acme", "acme")
    both = SessionFacts("127.0.0.10", "u", "globex", ConnectorMatch("acme", "c", False))
    assert (both.tenant, both.via) == ("globex", "auth")


# ---- transaction rules --------------------------------------------------------------

def _acc(tenant, *addrs):
    return Accept(tuple(Recipient(a) for a in addrs), tenant, "forward")


@pytest.mark.parametrize("current, tenant, new, limit, expected", [
    ((), "", _acc("acme", "a@x.example"), 2, ((Recipient("a@x.example"),), "acme")),
    ((Recipient("a@x.example"),), "acme", _acc("acme", "A@x.example"), 1, ((Recipient("a@x.example"),), "acme")),
    ((Recipient("a@x.example"),), "acme", _acc("acme", "b@x.example"), 1, replies.R452_TOO_MANY_RCPTS),
    ((), "", _acc("acme", "a@x.example", "b@x.example", "c@x.example"), 2, replies.R452_TOO_MANY_RCPTS),
    ((Recipient("a@x.example"),), "acme", _acc("globex", "b@x.example"), 5, replies.R452_453_OTHER_TENANT),
])
def test_add_recipients(current, tenant, new, limit, expected):
    got = acc.add_recipients(current, tenant, new, max_recipients=limit)
    assert got == expected if isinstance(expected, tuple) else reply_of(got) == expected


@pytest.mark.parametrize("size, refused", [(None, False), (1000, False), (1001, True)])
def test_check_mail_size(size, refused):
    r = acc.check_mail(MailParams(size=size), max_size=1000)
    assert (r is not None) == refused
    if refused:
        assert r.reply == replies.R552_534_TOO_BIG


@pytest.mark.parametrize("name, ok", [
    ("client.example", True), ("[192.0.2.1]", True), ("localhost", True), ("", False),
    ("a b", False), ("evil\rBcc: x", False), ("x\ty", False), ("x" * 300, False),
])
def test_valid_helo(name, ok):
    assert acc.valid_helo(name) is ok


# ---- DATA framing -------------------------------------------------------------------

def lines(stream: bytes) -> list[bytes]:
    """Split a byte stream the way readuntil(b"\\r\\n") hands it out."""
    out = []
    while stream:
        i = stream.find(b"\r\n")
        if i < 0:
            out.append(stream)
            break
        out.append(stream[:i + 2])
        stream = stream[i + 2:]
    return out


def assemble(stream: bytes, max_size: int = 10_000) -> tuple[bytes | Refuse, int]:
    """Feed the chunks; return the result and how many chunks were consumed."""
    d = DataAssembler(max_size)
    for n, chunk in enumerate(lines(stream), 1):
        if d.feed(chunk):
            return d.result(), n
    raise AssertionError("no end of data")


@pytest.mark.parametrize("stream, content", [
    (b"Subject: x\r\n\r\nhello\r\n.\r\n", b"Subject: x\r\n\r\nhello\r\n"),
    (b".\r\n", b""),
    (b"..leading dot\r\n...\r\n.\r\n", b".leading dot\r\n..\r\n"),
    (b"a\r\n\r\n.\r\n", b"a\r\n\r\n"),
    (b"8bit \xc3\xa9\r\n.\r\n", b"8bit \xc3\xa9\r\n"),
])
def test_data_accepted(stream, content):
    assert assemble(stream) == (content, len(lines(stream)))


SMUGGLED = b"MAIL FROM:<evil@attacker.example>\r\nRCPT TO:<victim@partner.example>\r\nDATA\r\nsmuggled\r\n"


@pytest.mark.parametrize("fake_end", [
    b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r", b"\r.\r\n", b"\r\n.\r", b"\r\n.\r\r\n", b"\n.\r\r\n",
    b"\n..\r\n",
])
def test_smuggling_end_variants_never_end_early(fake_end):
    stream = b"Subject: x\r\n\r\nbody" + fake_end + SMUGGLED + b".\r\n"
    result, consumed = assemble(stream)
    assert consumed == len(lines(stream))            # read to the real <CRLF>.<CRLF>, one message
    assert reply_of(result) == replies.R554_560_BARE_NEWLINE


@pytest.mark.parametrize("stream", [
    b"bare LF\nhere\r\n.\r\n", b"bare CR\rhere\r\n.\r\n", b"ends in CR\r\r\n.\r\n", b"\n.\r\n.\r\n",
])
def test_bare_newlines_refused(stream):
    result, _ = assemble(stream)
    assert reply_of(result) == replies.R554_560_BARE_NEWLINE


def test_limits():
    assert reply_of(assemble(b"x" * 998 + b"\r\n" + b"y" * 999 + b"\r\n.\r\n")[0]) == replies.R500_LINE_TOO_LONG
    assert assemble(b"." + b"x" * 998 + b"\r\n.\r\n")[0] == b"x" * 998 + b"\r\n"    # the dot does not count
    assert reply_of(assemble(b"x" * 500 + b"\r\n" + b"y" * 500 + b"\r\n.\r\n", max_size=1000)[0]) == \
        replies.R552_534_TOO_BIG
    assert assemble(b"x" * 498 + b"\r\n" + b"y" * 498 + b"\r\n.\r\n", max_size=1000)[0] == \
        b"x" * 498 + b"\r\n" + b"y" * 498 + b"\r\n"


def test_fragments_of_a_long_line_are_drained_not_ended():
    d = DataAssembler(100_000)
    for chunk in (b"x" * 1000, b"y" * 1000, b"z\r\n", b".\r\n"):
        if d.feed(chunk):
            break
    assert d.done and reply_of(d.result()) == replies.R500_LINE_TOO_LONG
    d = DataAssembler(100_000)
    assert not d.feed(b"x" * 10) and not d.feed(b".\r\n")   # ".\r\n" mid-line is not the end
    assert d.feed(b".\r\n")
    assert d.result() == b"x" * 10 + b".\r\n"


# ---- enhanced status codes on the wire -----------------------------------------------

@pytest.mark.parametrize("line, in_helo, out", [
    (b"503 Error: nested MAIL command", False, b"503 5.5.1 Error: nested MAIL command"),
    (b"501 Syntax: HELO hostname", True, b"501 5.5.4 Syntax: HELO hostname"),
    (b"500 Error: bad syntax", False, b"500 5.5.2 Error: bad syntax"),
    (b"500 Command line too long", False, b"500 5.5.6 Command line too long"),
    (b"502 EXPN not implemented", False, b"502 5.5.1 EXPN not implemented"),
    (b"530 Must issue a STARTTLS command first", False, b"530 5.7.0 Must issue a STARTTLS command first"),
    (b"552 Error: Too much mail data", False, b"552 5.3.4 Error: Too much mail data"),
    (b"554 Command refused due to lack of security", False, b"554 5.0.0 Command refused due to lack of security"),
    (b"421 4.7.0 MAIL sent too many times", False, b"421 4.7.0 MAIL sent too many times"),
    (b"221 Bye", False, b"221 2.0.0 Bye"),
    (b"220 Ready to start TLS", False, b"220 2.0.0 Ready to start TLS"),
    (b"250 OK", False, b"250 2.0.0 OK"),
    (b"250 gw.test", True, b"250 gw.test"),
    (b"250-SIZE 1000", True, b"250-SIZE 1000"),
    (b"250 HELP", True, b"250 HELP"),
    (b"334 VXNlcm5hbWU6", False, b"334 VXNlcm5hbWU6"),
    (b"354 End data with <CR><LF>.<CR><LF>", False, b"354 End data with <CR><LF>.<CR><LF>"),
    (b"550 5.7.1 Relaying denied", False, b"550 5.7.1 Relaying denied"),
    (b"538 5.7.11 Encryption required", False, b"538 5.7.11 Encryption required"),
    (b"599", False, b"599 5.0.0"),
])
def test_add_enhanced_code(line, in_helo, out):
    assert add_enhanced_code(line, in_helo=in_helo) == out


def server_chunks(stream: bytes, limit: int = 1001) -> list[bytes]:
    """The chunks PoolSMTP.smtp_DATA reads: up to each ".\\r\\n", or at most ``limit``
    bytes when none is that near (StreamReader.readuntil's LimitOverrunError)."""
    out = []
    while stream:
        i = stream.find(b".\r\n")
        if i == -1 or i + 3 > limit:
            take = min(len(stream), max(1, limit - 2))
        else:
            take = i + 3
        out.append(stream[:take])
        stream = stream[take:]
    return out


@pytest.mark.parametrize("stream", [
    b"Subject: x\r\n\r\nhello.\r\nworld.\r\n.\r\n", b".\r\n", b"..leading dot\r\n...\r\n.\r\n",
    b"a.\r\n.\r\n", b"x" * 3000 + b"\r\n.\r\n", (b"y" * 70 + b".\r\n") * 80 + b".\r\n",
    b"Subject: x\r\n\r\nbody\n.\r\n" + SMUGGLED + b".\r\n", b"Subject: x\r\n\r\nbody\r.\r\n" + SMUGGLED + b".\r\n",
    b"x" * 500 + b"\r\n" + b"y" * 600 + b"\r\n.\r\n",
])
def test_runs_of_many_lines_give_what_lines_give(stream):
    """The server feeds runs of lines, not lines: same message, same refusals, same end."""
    by_line = assemble(stream, max_size=1000 if b"y" * 600 in stream else 10_000)[0]
    d = DataAssembler(1000 if b"y" * 600 in stream else 10_000)
    fed = 0
    for chunk in server_chunks(stream):
        fed += len(chunk)
        if d.feed(chunk):
            break
    assert fed == len(stream)                          # ended exactly at the real end
    assert d.result() == by_line
