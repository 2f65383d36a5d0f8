"""assess.dsn - fact: is this message a DSN / NDR / bounce?

A null reverse-path (RFC 5321 §4.5.5: bounces are sent from <>), or a
top-level Content-Type of multipart/report with report-type=delivery-status
(RFC 3462/6522, RFC 3464). Either is enough: many real bounces (see the
sisimai corpus) carry one without the other.

TRUST: the header block is untrusted; only the top-level Content-Type is read.

STANDARDS: RFC 3464, RFC 6522, RFC 5321 §4.5.5

SEE ALSO: route/rules.py (rule "dsn")
"""

from __future__ import annotations

import functools
from email.message import Message as EmailMessage
from email.parser import BytesHeaderParser
from email.policy import compat32

from ..model import DsnFact, Message


def header_block(content: bytes) -> bytes:
    end = content.find(b"\r\n\r\n")
    if end < 0:
        end = content.find(b"\n\n")
    return content if end < 0 else content[:end + 2]


def headers(content: bytes) -> EmailMessage:
    """The parsed header block (read-only: the result is shared). Several checks
    (dsn, spam, limits) read the same message's headers; it is parsed once."""
    return _parse_headers(header_block(content))


@functools.lru_cache(maxsize=256)
def _parse_headers(block: bytes) -> EmailMessage:
    return BytesHeaderParser(policy=compat32).parsebytes(block)


async def check(msg: Message, ctx=None) -> DsnFact:
    if msg.envelope.mail_from == "":
        return DsnFact(True, "null-reverse-path")
    block = header_block(msg.content)
    if b"multipart/report" not in block.lower():
        # The parser below reads the type only from those very bytes (any case, no
        # space or fold inside): without them it cannot find one, and parsing the
        # header section costs ~200 µs.
        return DsnFact(False)
    h = _parse_headers(block)
    if h.get_content_type() == "multipart/report":
        rt = (h.get_param("report-type") or "")
        if isinstance(rt, str) and rt.lower() == "delivery-status":
            return DsnFact(True, "multipart-report")
    return DsnFact(False)
