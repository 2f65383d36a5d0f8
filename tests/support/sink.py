"""A receiving SMTP server on loopback that records what arrives and who sent it.

It records, per transaction, the peer address (so tests see which pool source
the gateway bound), the EHLO name, the envelope, the content and whether TLS
was on. Replies are programmable by recipient local part:

- ``reject*``     → 550 5.1.1 at RCPT
- ``tempfail*``   → 451 4.2.0 at RCPT the first time for each recipient, then accepted
- ``defer*``      → always 451 4.2.0 at RCPT
- ``slow*``       → replies to RCPT after ``slow_seconds``
anything else     → accepted.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from dataclasses import dataclass, field

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP


@dataclass
class Received:
    peer: str
    ehlo: str
    mail_from: str
    rcpt_tos: list[str]
    content: bytes
    tls: bool
    ts: float = field(default_factory=time.time)


class _Handler:
    def __init__(self, sink: "Sink"):
        self.sink = sink
        self.seen_tempfail: set[str] = set()

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        local = address.split("@")[0].lower()
        if local.startswith("slow"):
            await asyncio.sleep(self.sink.slow_seconds)
        if local.startswith("reject"):
            return "550 5.1.1 <%s>: Recipient address rejected: User unknown" % address
        if local.startswith("defer"):
            return "451 4.2.0 <%s>: try again later" % address
        if local.startswith("tempfail") and address.lower() not in self.seen_tempfail:
            self.seen_tempfail.add(address.lower())
            return "451 4.2.0 <%s>: greylisted, try again later" % address
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        self.sink.messages.append(Received(
            # aiosmtpd 1.4.6 reports MAIL FROM:<> as "<>": record the null reverse-path as "".
            peer=session.peer[0], ehlo=session.host_name or "",
            mail_from="" if envelope.mail_from in ("<>", None) else envelope.mail_from,
            rcpt_tos=list(envelope.rcpt_tos), content=envelope.original_content or b"",
            tls=session.ssl is not None))
        self.sink.arrived.set()
        return "250 2.0.0 Ok: queued"


class Sink:
    def __init__(self, address: str = "127.0.0.1", port: int = 0, slow_seconds: float = 2.0):
        self.address = address
        self.port = port or _free_port(address)
        self.slow_seconds = slow_seconds
        self.messages: list[Received] = []
        self.arrived = threading.Event()
        self.controller = Controller(_Handler(self), hostname=address, port=self.port,
                                     enable_SMTPUTF8=True)

    def start(self) -> "Sink":
        self.controller.start()
        return self

    def stop(self) -> None:
        self.controller.stop()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def wait_for(self, predicate, timeout: float = 20.0) -> list[Received]:
        """Wait until ``predicate(messages)`` is true; return the messages."""
        end = time.time() + timeout
        while time.time() < end:
            if predicate(self.messages):
                return self.messages
            time.sleep(0.05)
        raise AssertionError(f"sink {self.address}:{self.port}: condition not met within {timeout}s; "
                             f"got {[(m.mail_from, m.rcpt_tos, m.peer) for m in self.messages]}")

    def to(self, address: str) -> list[Received]:
        a = address.lower()
        return [m for m in self.messages if a in (r.lower() for r in m.rcpt_tos)]


def _free_port(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]
