"""dsn.build - the RFC 3464 delivery status notification for failed recipients

``build(original, statuses, hostname=…, now=…)`` returns the bytes (CRLF line
endings) of a ``multipart/report; report-type=delivery-status`` message to
the original sender, with three parts:

1. text/plain: a short human explanation, then one paragraph per failed
   recipient with our sentence (from replies.py) where the failure is ours
   and the remote host's reply verbatim where it is theirs;
2. message/delivery-status: the per-message fields (Reporting-MTA,
   X-Poolmta-Queue-ID, Original-Envelope-Id when ENVID was given,
   Arrival-Date), then per recipient Original-Recipient (from ORCPT),
   Final-Recipient, Action, Status, Remote-MTA, Diagnostic-Code and
   Last-Attempt-Date: a template fill of ``model.Status`` records, which are
   shaped on Postfix's DSN struct for that reason;
3. the returned message: message/rfc822 with the whole message when RET=FULL
   or RET was not given and the message is at most ``RETURN_LIMIT`` bytes;
   otherwise text/rfc822-headers with its header section only.

The skeleton (headers, parts 1 and 2) is made with the ``email`` package. The
returned message is spliced in verbatim instead of being re-parsed and
re-generated: the sender gets back exactly what they sent, byte for byte
(a regenerated copy may refold headers and break DKIM signatures or hide
the very thing that made it bounce). The boundary is checked not to occur
in the returned bytes.

The caller sends the result as a new message with a null reverse-path
(RFC 3464 §2, RFC 5321 §4.5.5), so no DSN is ever made about a DSN; it
re-enters the pipeline and leaves through the high-risk pool like any
bounce. ``status_for()`` turns a failed recipient's stored state into the
``Status`` record for it.

TRUST: the original content is untrusted bytes and is only copied; remote
replies arrive flattened to one line (deliver/client.py) and are folded
here; addresses were syntax-checked by ingress.

STANDARDS: RFC 3464 (message/delivery-status), RFC 6522 (multipart/report),
RFC 3461 §4.3 (RET), §4.4 (ENVID), §4.2 (ORCPT), RFC 3834 (Auto-Submitted),
RFC 5322 (header fields, dates), RFC 2046 §5.2.1 (message/rfc822).

CONFIG: server.hostname (passed in: Reporting-MTA, From, Message-ID).

SEE ALSO: model.Status, replies.py, deliver/scheduler.py, tests/golden/dsn/
"""

from __future__ import annotations

import re
import textwrap
import uuid
from collections.abc import Sequence
from datetime import datetime, timezone
from email.charset import QP, Charset
from email.generator import BytesGenerator
from email.message import Message as EmailMessage
from email.mime.base import MIMEBase
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.policy import compat32
from email.utils import make_msgid
from io import BytesIO

from ..model import Message, Status
from ..replies import R554_547_EXPIRED

# Largest original returned whole; larger ones come back as headers only.
# Postfix's bounce_size_limit is 50 000; a little more keeps most office mail whole.
RETURN_LIMIT = 100_000

SUBJECT = "Undelivered Mail Returned to Sender"

# No folding: every field we write is short except Diagnostic-Code, whose reply
# client.py caps at 512 characters (far below RFC 5322's 998), and bounce
# parsers in the wild read it as one line.
_POLICY = compat32.clone(linesep="\r\n", max_line_length=0)


def rfc5322_date(ts: float) -> str:
    """ "Fri, 15 Jan 2027 08:00:00 +0000": UTC with a numeric zone (not the obsolete "GMT")."""
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%a, %d %b %Y %H:%M:%S +0000")


def status_for(recipient: str, *, state: str, reply: str, status: str, remote_mta: str,
               orcpt: str = "") -> Status:
    """The Status record of a failed recipient from what the spool keeps about it.

    ``state`` is the recipient's final state ("bounced" | "expired"). An
    expired recipient carries our 5.4.7 sentence as the reason and the last
    reply (remote or ours) as the diagnostic, so the sender sees both why we
    gave up and what the receiver last said.
    """
    if state == "expired":
        reason = R554_547_EXPIRED.text
        status = R554_547_EXPIRED.enhanced
    elif remote_mta:
        reason = ""                                    # the remote reply speaks for itself
    else:
        reason = _sentence(reply)                      # one of ours: our wording from replies.py
    return Status(recipient=recipient, status=status or "5.0.0", action="failed", reason=reason,
                  diag_type="smtp" if reply else "", diag_text=reply, mta_type="dns" if remote_mta else "",
                  mta_name=remote_mta, orcpt=orcpt)


def _sentence(reply: str) -> str:
    """ "550 5.1.10 Recipient domain … mail" → the sentence without the codes."""
    m = re.match(r"^\d{3}(?:[ -]\d\.\d{1,3}\.\d{1,3})?[ -]?(.*)$", reply.strip())
    return m.group(1) if m else reply


def human_text(original: Message, statuses: Sequence[Status], hostname: str) -> str:
    """The first part: what happened, in plain words."""
    lines = [
        f"This is the mail system at host {hostname}.",
        "",
        "Your message could not be delivered to one or more recipients.",
        "The delivery report and the returned message are attached.",
        "",
    ]
    wrap = dict(width=76, subsequent_indent="    ", break_long_words=False, break_on_hyphens=False)
    for s in statuses:
        head = f"<{s.recipient}>:"
        if s.reason:
            lines.extend(textwrap.wrap(f"{head} {s.reason} ({s.status})", **wrap))
            if s.diag_text and s.mta_name:
                lines.extend(textwrap.wrap(f"Last reply from host {s.mta_name}: {s.diag_text}",
                                           initial_indent="    ", **wrap))
            elif s.diag_text and _sentence(s.diag_text) != s.reason:
                lines.extend(textwrap.wrap(f"Last reply: {s.diag_text}", initial_indent="    ", **wrap))
        else:
            who = f"host {s.mta_name} said:" if s.mta_name else "reply:"
            lines.extend(textwrap.wrap(f"{head} {who} {s.diag_text}", **wrap))
        lines.append("")
    return "\r\n".join(lines)


def _fields(pairs: Sequence[tuple[str, str]]) -> EmailMessage:
    block = EmailMessage(policy=_POLICY)
    for name, value in pairs:
        if value:
            block[name] = value
    return block


def delivery_status(original: Message, statuses: Sequence[Status], hostname: str, last_attempt: float) -> MIMEBase:
    """The second part: machine-readable fields, one block per message and per recipient."""
    part = MIMEBase("message", "delivery-status", policy=_POLICY)
    del part["MIME-Version"]
    part["Content-Description"] = "Delivery report"
    env = original.envelope
    blocks = [_fields([
        ("Reporting-MTA", f"dns; {hostname}"),
        ("X-Poolmta-Queue-ID", original.queue_id),
        ("Original-Envelope-Id", env.envid),
        ("Arrival-Date", rfc5322_date(original.received_at)),
    ])]
    for s in statuses:
        orcpt = s.orcpt
        if orcpt and ";" not in orcpt:
            orcpt = f"rfc822;{orcpt}"
        blocks.append(_fields([
            ("Original-Recipient", orcpt),
            ("Final-Recipient", f"rfc822; {s.recipient}"),
            ("Action", s.action or "failed"),
            ("Status", s.status),
            ("Remote-MTA", f"{s.mta_type or 'dns'}; {s.mta_name}" if s.mta_name else ""),
            ("Diagnostic-Code", f"{s.diag_type or 'smtp'}; {s.diag_text}" if s.diag_text else ""),
            ("Last-Attempt-Date", rfc5322_date(last_attempt)),
        ]))
    part.set_payload(blocks)
    return part


def _header_section(content: bytes) -> bytes:
    end = content.find(b"\r\n\r\n")
    return content if end < 0 else content[:end + 2]


def _crlf(data: bytes) -> bytes:
    """The returned message with CRLF line ends (it should have them already)."""
    return re.sub(rb"\r?\n", b"\r\n", data)


def build(original: Message, statuses: Sequence[Status], *, hostname: str, now: float,
          last_attempt: float | None = None, boundary: str | None = None, message_id: str | None = None,
          return_limit: int = RETURN_LIMIT) -> bytes:
    """The DSN reporting ``statuses`` about ``original``, as CRLF bytes ready to queue."""
    if not statuses:
        raise ValueError("a DSN needs at least one recipient status")
    env = original.envelope
    content = _crlf(original.content)
    whole = env.ret.upper() != "HDRS" and len(content) <= return_limit
    returned = content if whole else _header_section(content)
    if not returned.endswith(b"\r\n"):
        returned += b"\r\n"

    boundary = boundary or f"{original.queue_id}.{int(now)}/{hostname}"
    while boundary.encode() in returned:
        # The returned text must not contain the delimiter (RFC 2046 §5.1.1).
        boundary = f"{boundary}.{uuid.uuid4().hex[:8]}"

    top = MIMEMultipart("report", boundary=boundary, policy=_POLICY, **{"report-type": "delivery-status"})
    content_type = top["Content-Type"]
    del top["Content-Type"], top["MIME-Version"]       # re-added below, after the identifying headers
    top["From"] = f"MAILER-DAEMON@{hostname} (Mail Delivery System)"
    top["To"] = env.mail_from
    top["Subject"] = SUBJECT
    top["Date"] = rfc5322_date(now)
    top["Message-ID"] = message_id or make_msgid(domain=hostname)
    top["Auto-Submitted"] = "auto-replied"
    top["MIME-Version"] = "1.0"
    top["Content-Type"] = content_type
    top.preamble = "This is a MIME-encapsulated message."

    text = human_text(original, statuses, hostname)
    if text.isascii():
        notice = MIMEText(text, "plain", "us-ascii", policy=_POLICY)
    else:
        cs = Charset("utf-8")
        cs.body_encoding = QP
        notice = MIMEText(text, "plain", cs, policy=_POLICY)
    del notice["MIME-Version"]
    notice["Content-Description"] = "Notification"
    top.attach(notice)

    top.attach(delivery_status(original, statuses, hostname, now if last_attempt is None else last_attempt))

    # A placeholder that the generator copies as-is; the original replaces it afterwards.
    token = f"poolmta-returned-{uuid.uuid4().hex}"
    ret = MIMEBase("message", "rfc822" if whole else "rfc822-headers", policy=_POLICY)
    if not whole:
        ret.replace_header("Content-Type", "text/rfc822-headers")
    del ret["MIME-Version"]
    ret["Content-Description"] = "Undelivered Message" if whole else "Undelivered Message Headers"
    if not returned.isascii():
        ret["Content-Transfer-Encoding"] = "8bit"
    ret.set_payload(token)
    top.attach(ret)

    out = BytesIO()
    BytesGenerator(out, mangle_from_=False, policy=_POLICY).flatten(top)
    skeleton = out.getvalue()
    if skeleton.count(token.encode()) != 1:
        raise AssertionError("DSN skeleton lost its placeholder")
    # ``returned`` keeps its final CRLF; the generator's CRLF after the token
    # belongs to the closing delimiter (RFC 2046 §5.1.1).
    return skeleton.replace(token.encode(), returned, 1)
