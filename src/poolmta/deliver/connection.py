"""deliver.connection - the real Connector: one SMTP client connection on an asyncio.Protocol

``SmtpConnector.connect()`` binds a socket to the pool source's address,
connects it to the target (``connect_timeout``), reads the greeting and
returns a ``Connection``: the Session that client.py's ``transact()`` drives
(EHLO, STARTTLS, MAIL, RCPT, DATA, QUIT), with one addition: when the server
advertises PIPELINING, ``transact()`` sends MAIL, every RCPT and DATA in one
write and reads their replies in order (``write_group`` / ``reply``), as
Postfix's smtp client does. One write and one wake-up instead of one per
command and per reply, on both ends; over a WAN, one round trip instead of
2 + recipients.

Why our own, not aiosmtplib (which poolmta used before, and which the tests
still use as a client): aiosmtplib 5.x has no PIPELINING (its protocol drops
a reply that arrives while an earlier one waits to be picked up, by design),
and per command it costs an ``asyncio.wait_for`` task, a lock and two regex
passes over the whole message (line-ending normalisation and dot-stuffing):
the delivery half of the gateway's CPU in the relay benchmark. What this
module does is small and fully specified (RFC 5321 §4.1, §4.5.2; RFC 2920;
RFC 3207): parse replies, stuff dots, time out, upgrade to TLS with the
event loop's own ``start_tls``.

Behaviour:
- Replies: ``ddd-text`` lines continue, ``ddd text`` (or ``ddd``) ends one;
  a reply line over MAX_LINE or a reply over MAX_REPLY bytes, or a line that
  does not start with three digits, breaks the connection (ProtocolError).
- Every reply is awaited at most ``command_timeout`` (the greeting:
  ``connect_timeout``); TimeoutError names what was waited for.
- The server closing the connection fails every reply still awaited with
  ConnectionResetError (or the OS error that closed it).
- Content: line ends normalised to CRLF only when the message has a bare CR
  or LF (messages from the spool are CRLF already), a leading dot doubled on
  every line (RFC 5321 §4.5.2), then ``.<CRLF>``.
- STARTTLS: the loop's ``start_tls`` on the same protocol, no certificate
  check (opportunistic, as Postfix's "may" level), handshake bounded by
  command_timeout; the EHLO keywords are forgotten until the next EHLO.

TRUST: replies are the remote's, untrusted: bounded in size, flattened by
client.flatten before they go anywhere. Commands are ours; a CR or LF inside
one is refused (ValueError) before it reaches the wire.

STANDARDS: RFC 5321 §4.1, §4.2 (reply syntax), §4.5.2 (transparency),
§4.5.3.1.5 (reply line length); RFC 2920 (PIPELINING); RFC 3207 (STARTTLS).

CONFIG: delivery.connect_timeout, delivery.command_timeout (passed in).

SEE ALSO: deliver/client.py (the transaction), deliver/cache.py (kept sessions)
"""

from __future__ import annotations

import asyncio
import re
import ssl
from collections import deque

from ..model import Source
from .client import QUIT_TIMEOUT, SmtpReply, bound_socket, command_line, flatten, path_command
from .mx import Target

MAX_LINE = 4096               # RFC 5321 §4.5.3.1.5 says 512; real servers send longer, none this long
MAX_REPLY = 64 * 1024         # a multi-line reply (an EHLO list) longer than this is not SMTP
_BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n")


class ProtocolError(Exception):
    """The server said something that is not an SMTP reply."""


def _client_tls() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


_TLS: ssl.SSLContext | None = None


def stuff(content: bytes) -> bytes:
    """CONTENT as DATA sends it: CRLF line ends, dots doubled at line starts, and the
    terminating ``.<CRLF>``. CONTENT ends with CRLF (transact() sees to it)."""
    if content.count(b"\n") != content.count(b"\r\n") or content.count(b"\r") != content.count(b"\r\n"):
        content = _BARE.sub(b"\r\n", content)
    if content.startswith(b"."):
        content = b"." + content
    return content.replace(b"\r\n.", b"\r\n..") + b".\r\n"


class Connection(asyncio.Protocol):
    """One SMTP client connection: a Session (client.py) over an asyncio transport."""

    def __init__(self, target: Target, source: Source, command_timeout: float):
        self.target, self.source, self.timeout = target, source, command_timeout
        self.transport: asyncio.Transport | None = None
        self.tls = False
        self.extensions: dict[str, str] = {}
        self._loop = asyncio.get_running_loop()
        self._buf = bytearray()
        self._lines: list[bytes] = []                 # lines of the reply being read
        self._replies: deque[tuple[SmtpReply, list[bytes]]] = deque()   # complete replies not yet asked for
        self.last_lines: list[bytes] = []             # the lines of the reply reply() returned last
        self._waiter: asyncio.Future | None = None
        self._lost: BaseException | None = None

    # -- asyncio.Protocol ------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        start = 0
        try:
            while True:
                end = buf.find(b"\n", start)
                if end < 0:
                    if len(buf) - start > MAX_LINE:
                        raise ProtocolError(f"a reply line longer than {MAX_LINE} bytes")
                    break
                line = bytes(buf[start:end]).rstrip(b"\r")
                start = end + 1
                if len(line) < 3 or not line[:3].isdigit() or line[3:4] not in (b"", b" ", b"-"):
                    raise ProtocolError(f"not an SMTP reply: {flatten(line.decode('utf-8', 'replace'))[:80]!r}")
                self._lines.append(line)
                if sum(len(x) for x in self._lines) > MAX_REPLY:
                    raise ProtocolError(f"a reply longer than {MAX_REPLY} bytes")
                if line[3:4] != b"-":
                    lines, self._lines = self._lines, []
                    text = "\n".join(x[4:].decode("utf-8", "replace") for x in lines)
                    self._replies.append((SmtpReply(int(lines[0][:3]), flatten(text)), lines))
        except ProtocolError as e:
            del buf[:]
            self._lost = e
            self._wake()
            if self.transport is not None:
                self.transport.abort()
            return
        del buf[:start]
        self._wake()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._lost is None:
            self._lost = exc or ConnectionResetError("the server closed the connection")
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done() and (self._replies or self._lost is not None):
            w.set_result(None)

    # -- reading and writing ---------------------------------------------------
    async def reply(self, timeout: float | None = None, what: str = "reply") -> SmtpReply:
        """The next reply, in order; raises if the connection breaks or it does not come in time."""
        while not self._replies:
            if self._lost is not None:
                raise self._lost
            w = self._waiter = self._loop.create_future()
            t = self.timeout if timeout is None else timeout
            timer = self._loop.call_later(t, _expire, w, f"no {what} within {t:g}s")
            try:
                await w
            finally:
                timer.cancel()
                self._waiter = None
        r, self.last_lines = self._replies.popleft()
        return r

    def write(self, data: bytes) -> None:
        if self._lost is not None:
            raise self._lost
        if self.transport is None or self.transport.is_closing():
            raise ConnectionResetError("the connection is closed")
        self.transport.write(data)

    def write_group(self, lines: list[bytes]) -> None:
        """Several commands in one write (RFC 2920); read their replies with reply()."""
        self.write(b"".join(lines))

    async def command(self, line: bytes, what: str) -> SmtpReply:
        self.write(line)
        return await self.reply(what=what)

    # -- the Session protocol (client.py) --------------------------------------
    async def ehlo(self) -> SmtpReply:
        r = await self.command(command_line(b"EHLO", self.source.ehlo.encode("ascii")), "reply to EHLO")
        self.extensions = {}
        if 200 <= r.code < 300:
            # The keywords: the first word of every line after the first (RFC 5321 §4.1.1.1).
            for line in self.last_lines[1:]:
                word, _, params = line[4:].decode("ascii", "replace").strip().partition(" ")
                if word:
                    self.extensions[word.lower()] = params
        return r

    async def helo(self) -> SmtpReply:
        self.extensions = {}
        return await self.command(command_line(b"HELO", self.source.ehlo.encode("ascii")), "reply to HELO")

    def supports(self, extension: str) -> bool:
        return extension.lower() in self.extensions

    async def starttls(self) -> SmtpReply:
        global _TLS
        r = await self.command(b"STARTTLS\r\n", "reply to STARTTLS")
        if r.code != 220:
            return r
        if _TLS is None:
            _TLS = _client_tls()
        self.transport = await self._loop.start_tls(self.transport, self, _TLS, server_side=False,
                                                    server_hostname=self.target.host or None,
                                                    ssl_handshake_timeout=self.timeout)
        self.tls = True
        self.extensions = {}
        return r

    async def mail(self, sender: str, options, utf8: bool) -> SmtpReply:
        return await self.command(path_command(b"MAIL FROM:", sender, options, utf8), "reply to MAIL FROM")

    async def rcpt(self, recipient: str, options, utf8: bool) -> SmtpReply:
        return await self.command(path_command(b"RCPT TO:", recipient, options, utf8), "reply to RCPT TO")

    async def data(self, content: bytes) -> SmtpReply:
        r = await self.command(b"DATA\r\n", "reply to DATA")
        if r.code != 354:
            return r
        return await self.content(content)

    async def content(self, content: bytes) -> SmtpReply:
        """The message after a 354, and the reply to it."""
        self.write(stuff(content))
        return await self.reply(what="reply to the end of the content")

    async def quit(self) -> None:
        try:
            self.write(b"QUIT\r\n")
            await self.reply(min(self.timeout, QUIT_TIMEOUT), "reply to QUIT")
        except Exception:          # the transaction is over; a rude goodbye changes nothing
            pass
        if self.transport is not None:
            self.transport.close()

    def close(self) -> None:
        """At once, without a word: nothing still buffered is sent."""
        if self.transport is not None:
            self.transport.abort()


def _expire(fut: asyncio.Future, why: str) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError(why))


class SmtpConnector:
    """Connections from the source's address, with its EHLO name (client.Connector)."""

    async def connect(self, target: Target, port: int, source: Source, *, connect_timeout: float,
                      command_timeout: float):
        loop = asyncio.get_running_loop()
        sock = bound_socket(source.address)
        try:
            try:
                await asyncio.wait_for(loop.sock_connect(sock, (target.address, port)), timeout=connect_timeout)
            except TimeoutError:
                raise TimeoutError(f"no connection within {connect_timeout:g}s") from None
            conn = Connection(target, source, command_timeout)
            await loop.create_connection(lambda: conn, sock=sock)
        except BaseException:
            sock.close()
            raise
        try:
            greeting = await conn.reply(connect_timeout, "greeting")
        except BaseException:
            conn.close()
            raise
        return conn, greeting
