"""rewrite.headers - the trace headers we prepend for our own hop: Received, and
Delivered-To for each forwarding address the message was expanded from

STANDARDS: RFC 5321 §4.4 (trace information), RFC 5322 §3.6.7

SEE ALSO: pipeline.py
"""

from __future__ import annotations

from email.utils import formatdate

from ..model import Message


def received(msg: Message, hostname: str) -> bytes:
    o = msg.origin
    proto = "ESMTPA" if o.auth_user else "ESMTP"
    helo = o.helo or "unknown"
    rcpt = msg.envelope.recipients[0].address if len(msg.envelope.recipients) == 1 else ""
    line = (f"Received: from {helo} ([{o.client_ip}])\r\n"
            f"\tby {hostname} (poolmta) with {proto} id {msg.queue_id}"
            + (f"\r\n\tfor <{rcpt}>" if rcpt else "")
            + f"; {formatdate(msg.received_at, usegmt=True)}\r\n")
    return line.encode("utf-8", "surrogateescape")


def delivered_to(msg: Message) -> bytes:
    """One Delivered-To per forwarding address the message was expanded from,
    so that it is recognised (and refused) if a loop brings it back."""
    seen: list[str] = []
    for r in msg.envelope.recipients:
        if r.original and r.original.lower() not in seen:
            seen.append(r.original.lower())
    return b"".join(f"Delivered-To: {a}\r\n".encode("utf-8", "surrogateescape") for a in seen)
