"""Mail loops: too many hops, and a forwarding address that sees its own message again."""

from poolmta.ingress.acceptance import Refuse, check_loop
from poolmta.model import Recipient
from poolmta.rewrite.headers import delivered_to
from poolmta.model import Envelope, Message, Origin

FWD = (Recipient("x@partner.test", original="list@contoso.test"),)
PLAIN = (Recipient("x@partner.test"),)


def test_hop_limit():
    body = b"Subject: s\r\n\r\nReceived: in the body does not count\r\n"
    at_limit = b"Received: from a by b; x\r\n" * 3 + body
    assert check_loop(at_limit, PLAIN, 3) is None
    refused = check_loop(b"Received: from a\r\n\tby b; x\r\n" * 4 + body, PLAIN, 3)
    assert isinstance(refused, Refuse) and str(refused.reply).startswith("554 5.4.6")


def test_forwarding_loop_detected_by_our_delivered_to():
    seen = b"Delivered-To: LIST@contoso.test\r\nSubject: s\r\n\r\nbody\r\n"
    assert isinstance(check_loop(seen, FWD, 50), Refuse)
    # the header only matters for the address being forwarded again
    assert check_loop(seen, PLAIN, 50) is None
    assert check_loop(b"Delivered-To: other@contoso.test\r\n\r\nb\r\n", FWD, 50) is None
    # in the body it is not a header
    assert check_loop(b"Subject: s\r\n\r\nDelivered-To: list@contoso.test\r\n", FWD, 50) is None


def test_delivered_to_written_once_per_forwarding_address():
    env = Envelope("a@ext.test", (Recipient("x@p.test", original="list@contoso.test"),
                                  Recipient("y@p.test", original="List@contoso.test"),
                                  Recipient("z@p.test")))
    msg = Message("Q", env, Origin("127.0.0.50"), b"Subject: s\r\n\r\nb\r\n", 0.0)
    assert delivered_to(msg) == b"Delivered-To: list@contoso.test\r\n"
    assert isinstance(check_loop(delivered_to(msg) + msg.content, env.recipients, 50), Refuse)
