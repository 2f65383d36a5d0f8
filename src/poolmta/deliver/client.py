"""deliver.client - one SMTP client transaction, through an injectable Connector

``transact()`` connects to one target address from one pool source, says EHLO
with that source's name, upgrades with STARTTLS when offered (opportunistic,
no certificate check), sends MAIL FROM (the null reverse-path ``<>`` too),
one RCPT per recipient, and DATA when at least one RCPT was accepted. It
returns a ``Transcript``: every reply, whether TLS was on, and the exception
that ended the session early with the stage it happened at. It decides
nothing: deliver/outcome.py classifies a transcript (the split of Postfix's
smtp_proto.c from smtp_trouble.c).

The network is behind a ``Connector`` (``connect(target, port, source, …)``
→ ``(Session, greeting)``), as httpx keeps its transport injectable:

- ``SmtpConnector`` (connection.py) is the real one. It binds a socket to
  ``(source.address, 0)`` itself, so the connection leaves from the pool
  source's IP and a failed bind is told apart from a failed connect: it
  raises ``SourceBindError`` (a local problem, e.g. the address is not
  configured on this host), which outcome.py reports as such. It connects
  with connect_timeout, and EHLO names the source (``source.ehlo``).
  A refusal reply (4xx/5xx) comes back as a reply, never as an exception;
  exceptions mean the conversation broke (refused, reset, timeout, TLS).
- ``FunctionConnector`` turns a plain function ``(target, command) -> reply``
  into a server, for tests: no sockets, the same transaction code.

Behaviour worth knowing:
- EHLO answered with 5xx (a server that does not know EHLO) falls back to
  HELO, as Postfix does; a refused HELO ends the session.
- STARTTLS refused with a reply: the session continues in plaintext. A TLS
  handshake that breaks the connection: one new connection to the same
  address without STARTTLS (Postfix's opportunistic "may" level does the
  same), so a receiver with a broken TLS stack still gets its mail. The
  transcript says so in ``tls_note``.
- ESMTP parameters are sent only when the server advertises them: SIZE,
  BODY=8BITMIME, SMTPUTF8, and the RFC 3461 DSN parameters (RET, ENVID,
  NOTIFY, ORCPT) so that a downstream MTA honours the sender's choices.
- No RCPT accepted: no DATA; the session ends with QUIT.
- PIPELINING (RFC 2920) advertised and the session can write a group
  (connection.py's can): MAIL, every RCPT and DATA go in one write and
  their replies are read in order; the outcome is the one the sequential
  path would have had (RCPT replies after a refused MAIL are read and
  dropped; a 354 with no recipient accepted gets an empty message).
- With a SessionCache (cache.py), a transaction that ended cleanly parks its
  session instead of saying QUIT, and the next transaction from the same
  source to the same address starts at MAIL FROM on it; its transcript
  says ``reused``. A parked session the server dropped (MAIL breaks or gets
  421) is replaced by a new connection, not held against the message.
- QUIT only ends a clean session (every command answered, refusals
  included), and its answer is awaited at most QUIT_TIMEOUT (5 s, or
  command_timeout if shorter). A session that broke (timeout, reset, TLS
  failure) or a transaction that is cancelled (``Scheduler.stop`` after its
  grace) just closes the transport: a tarpit that never answers would
  otherwise hold the task for another command_timeout.

TRUST: remote replies are untrusted text; they are flattened to one line and
cut to a sane length before they reach the spool, the trace or a DSN.

STANDARDS: RFC 5321 §3.3, §4.1 (transaction), §4.5.3.2 (timeouts: passed in),
RFC 3207 (STARTTLS), RFC 2920 (PIPELINING), RFC 1870 (SIZE), RFC 6152 (8BITMIME), RFC 6531
(SMTPUTF8), RFC 3461 §4 (DSN parameters, xtext).

CONFIG: delivery.port, delivery.connect_timeout, delivery.command_timeout,
delivery.starttls (read by the scheduler and passed in).

SEE ALSO: deliver/outcome.py, deliver/scheduler.py, deliver/mx.py
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

from ..model import Envelope, Recipient, Source
from .cache import Idle, SessionCache
from .mx import Target

MAX_REPLY_TEXT = 512          # a remote reply longer than this is cut: it goes into DSNs and the trace
QUIT_TIMEOUT = 5.0            # the most a polite goodbye may cost (less when command_timeout is shorter)


class Stage(StrEnum):
    """Where in the conversation something happened."""
    CONNECT = "connect"       # TCP connection and the greeting
    EHLO = "ehlo"
    STARTTLS = "starttls"
    MAIL = "mail"
    RCPT = "rcpt"
    DATA = "data"             # the DATA command, the content and the final reply


@dataclass(frozen=True)
class SmtpReply:
    """A reply as the server sent it, multi-line replies joined with spaces."""
    code: int
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.text}".rstrip()

    @classmethod
    def parse(cls, raw: str) -> "SmtpReply":
        """ "250-a\\r\\n250 b" or "550 5.1.1 no" → SmtpReply (for FunctionConnector handlers)."""
        lines = [ln for ln in raw.replace("\r\n", "\n").split("\n") if ln]
        if not lines or len(lines[0]) < 3 or not lines[0][:3].isdigit():
            return cls(-1, flatten(raw))
        return cls(int(lines[0][:3]), flatten("\n".join(ln[4:] for ln in lines)))


def flatten(text: str) -> str:
    """One line, printable, bounded: the reply may go into headers and SQLite."""
    one = " ".join(part.strip() for part in str(text).splitlines() if part.strip())
    if not one.isprintable():
        one = "".join(c if c.isprintable() else "?" for c in one)
    return one[:MAX_REPLY_TEXT]


class Session(Protocol):
    """An open SMTP connection. Refusals come back as replies; only a broken
    conversation raises."""
    tls: bool

    async def ehlo(self) -> SmtpReply: ...
    async def helo(self) -> SmtpReply: ...
    def supports(self, extension: str) -> bool: ...
    async def starttls(self) -> SmtpReply: ...
    async def mail(self, sender: str, options: Sequence[str], utf8: bool) -> SmtpReply: ...
    async def rcpt(self, recipient: str, options: Sequence[str], utf8: bool) -> SmtpReply: ...
    async def data(self, content: bytes) -> SmtpReply: ...
    async def quit(self) -> None:
        """Say goodbye (waiting at most QUIT_TIMEOUT for the answer) and close; never raises."""
    def close(self) -> None:
        """Close the connection at once, without a word; never raises."""


class Connector(Protocol):
    async def connect(self, target: Target, port: int, source: Source, *, connect_timeout: float,
                      command_timeout: float) -> tuple[Session, SmtpReply]:
        """Open a connection from ``source`` to ``target``; return it with its greeting."""


@dataclass
class Transcript:
    """What happened in one connection, for outcome.py to judge and the trace to show."""
    target: Target
    source: Source
    port: int
    recipients: tuple[str, ...]
    greeting: SmtpReply | None = None
    ehlo: SmtpReply | None = None
    tls: bool = False
    tls_note: str = ""
    mail: SmtpReply | None = None
    rcpt: list[SmtpReply | None] = field(default_factory=list)   # aligned with recipients; None = not sent
    data: SmtpReply | None = None
    error: BaseException | None = None
    error_stage: Stage | None = None
    reused: int = 0            # >0: the session was kept from earlier transactions (cache.py), this many

    def __post_init__(self) -> None:
        if not self.rcpt:
            self.rcpt = [None] * len(self.recipients)

    @property
    def any_accepted(self) -> bool:
        return any(r is not None and 200 <= r.code < 300 for r in self.rcpt)

    def replies(self) -> list[str]:
        """The conversation, one line per reply, for the trace."""
        out = []
        if self.reused:
            out.append(f"connect: session kept open, transaction {self.reused + 1} on it"
                       f"{' (TLS)' if self.tls else ''}")
        else:
            if self.greeting is not None:
                out.append(f"connect: {self.greeting}")
            if self.ehlo is not None:
                out.append(f"ehlo: {self.ehlo}")
        if self.tls_note and not self.reused:
            out.append(f"starttls: {self.tls_note}")
        if self.mail is not None:
            out.append(f"mail: {self.mail}")
        for addr, r in zip(self.recipients, self.rcpt):
            if r is not None:
                out.append(f"rcpt <{addr}>: {r}")
        if self.data is not None:
            out.append(f"data: {self.data}")
        if self.error is not None:
            out.append(f"{self.error_stage}: error: {describe(self.error)}")
        return out


class SourceBindError(Exception):
    """The pool source address could not be bound: our problem, not the remote's."""

    def __init__(self, address: str, cause: OSError):
        super().__init__(f"cannot bind {address}: {cause.strerror or cause}")
        self.address = address
        self.cause = cause
        self.errno = cause.errno


def describe(exc: BaseException) -> str:
    """A one-line account of an exception ("TimeoutError: timed out")."""
    text = flatten(str(exc)) or "no detail"
    return f"{type(exc).__name__}: {text}"


def xtext(value: str) -> str:
    """RFC 3461 §4 xtext: "+" , "=" and anything outside "!".."~" become +HH."""
    return "".join(c if "!" <= c <= "~" and c not in "+=" else "".join(f"+{b:02X}" for b in c.encode("utf-8"))
                   for c in value)


def _ok(r: SmtpReply | None) -> bool:
    return r is not None and 200 <= r.code < 300


def mail_options(session: Session, envelope: Envelope, size: int) -> list[str]:
    opts = []
    if session.supports("size"):
        opts.append(f"SIZE={size}")
    if envelope.body.upper() == "8BITMIME" and session.supports("8bitmime"):
        opts.append("BODY=8BITMIME")
    if envelope.smtputf8 and session.supports("smtputf8"):
        opts.append("SMTPUTF8")
    if session.supports("dsn"):
        if envelope.ret:
            opts.append(f"RET={envelope.ret.upper()}")
        if envelope.envid:
            opts.append(f"ENVID={xtext(envelope.envid)}")
    return opts


def rcpt_options(session: Session, rcpt: Recipient) -> list[str]:
    if not session.supports("dsn"):
        return []
    opts = []
    if rcpt.notify:
        opts.append("NOTIFY=" + ",".join(n.upper() for n in rcpt.notify))
    if rcpt.orcpt:
        kind, sep, addr = rcpt.orcpt.partition(";")
        if sep:
            opts.append(f"ORCPT={kind.strip()};{xtext(addr.strip())}")
    return opts


def command_line(*words: bytes) -> bytes:
    """One command line; a CR or LF inside would smuggle a second command."""
    line = b" ".join(words)
    if b"\r" in line or b"\n" in line:
        raise ValueError(f"CR or LF inside an SMTP command: {line[:80]!r}")
    return line + b"\r\n"


def path_command(prefix: bytes, address: str, options, utf8: bool) -> bytes:
    """MAIL FROM:<a> / RCPT TO:<b> with the address as ingress parsed and stored it
    (never re-parsed: a header parser would mangle a quoted local part)."""
    path = b"<" + address.encode("utf-8" if utf8 else "ascii") + b">"
    return command_line(prefix + path, *(o.encode("ascii") for o in options))


# Replies to MAIL on a kept session that say the session, not the sender, is the problem.
_SESSION_GONE = (421, 503)


def _reusable(t: Transcript) -> bool:
    """The transaction is over and the session is in a known state: the message was
    taken (2xx after the content), nothing broke, no reply announced that the server
    is closing (421). A refusal of the DATA command itself comes back in ``t.data``
    too, and leaves the server's transaction open: the next MAIL would get 503
    "nested MAIL command" and bounce an innocent message. So only a 2xx counts."""
    return (t.error is None and t.data is not None and 200 <= t.data.code < 300
            and all(r is None or r.code != 421 for r in (t.mail, *t.rcpt)))


async def transact(connector: Connector, target: Target, source: Source, *, port: int, envelope: Envelope,
                   recipients: Sequence[Recipient], content: bytes, connect_timeout: float,
                   command_timeout: float, starttls: bool = True, cache: SessionCache | None = None) -> Transcript:
    """Run one SMTP transaction for ``recipients``; report, never raise (except cancellation).

    With ``cache``, a session parked by an earlier transaction from the same source to
    the same address is used when there is one, and this one is parked afterwards
    when it ended cleanly (cache.py)."""
    if not content.endswith(b"\r\n"):
        content += b"\r\n"
    key = (source.address, source.ehlo, target.address, port, starttls)
    kept = cache.take(key) if cache is not None and cache.enabled else None
    if kept is not None:
        t = Transcript(target, source, port, tuple(r.address for r in recipients), greeting=kept.greeting,
                       ehlo=kept.ehlo, tls=kept.tls, tls_note=kept.tls_note, reused=kept.uses)
        try:
            await _transaction(kept.session, t, envelope, recipients, content)
        except BaseException:
            kept.session.close()
            raise
        if (t.mail is not None and t.mail.code not in _SESSION_GONE
                and not (t.error is not None and t.error_stage == Stage.MAIL)):
            kept.uses += 1
            if not (_reusable(t) and cache.keep(key, kept)):
                await _end(kept.session, t)
            return t
        # The server let the parked session go (closed it, 421 at MAIL) or lost its
        # state (503 to MAIL): not this message's failure; a new connection below.
        kept.session.close()
    t = Transcript(target, source, port, tuple(r.address for r in recipients))
    try:
        session, t.greeting = await connector.connect(target, port, source, connect_timeout=connect_timeout,
                                                      command_timeout=command_timeout)
    except Exception as e:
        t.error, t.error_stage = e, Stage.CONNECT
        return t
    try:
        if await _open(session, t, starttls):
            await _transaction(session, t, envelope, recipients, content)
    except BaseException:
        session.close()          # cancelled (shutdown): no goodbye that could outlast the grace
        raise
    if not (cache is not None and _reusable(t)
            and cache.keep(key, Idle(session, t.greeting, t.ehlo, t.tls, t.tls_note, time.monotonic()))):
        await _end(session, t)
    if t.error_stage == Stage.STARTTLS and t.error is not None:
        # The handshake broke the connection: one more connection, in plaintext.
        again = await transact(connector, target, source, port=port, envelope=envelope, recipients=recipients,
                               content=content, connect_timeout=connect_timeout,
                               command_timeout=command_timeout, starttls=False, cache=cache)
        again.tls_note = f"handshake failed ({describe(t.error)}), retried without TLS"
        return again
    return t


async def _end(session: Session, t: Transcript) -> None:
    if t.error is None:
        await session.quit()     # a clean end, refusals included: say goodbye, briefly
    else:
        session.close()          # broken, timed out or a tarpit: a QUIT would only wait again


async def _open(session: Session, t: Transcript, starttls: bool) -> bool:
    """Greeting, EHLO (HELO) and STARTTLS; fills ``t``; True when a transaction may begin."""
    stage = Stage.CONNECT
    try:
        if not _ok(t.greeting):
            return False
        stage = Stage.EHLO
        t.ehlo = await session.ehlo()
        if t.ehlo.code >= 500:
            # RFC 5321 §4.1.4: a server that does not know EHLO still knows HELO.
            t.ehlo = await session.helo()
        if not _ok(t.ehlo):
            return False
        if starttls and session.supports("starttls"):
            stage = Stage.STARTTLS
            r = await session.starttls()
            if _ok(r):
                t.tls = session.tls
                stage = Stage.EHLO
                t.ehlo = await session.ehlo()   # RFC 3207 §4.2: forget what was learnt before TLS
                if not _ok(t.ehlo):
                    return False
            else:
                t.tls_note = f"refused, continued without TLS: {r}"
        return True
    except Exception as e:
        t.error, t.error_stage = e, stage
        return False


async def _transaction(session: Session, t: Transcript, envelope: Envelope, recipients: Sequence[Recipient],
                       content: bytes) -> None:
    """MAIL, RCPT, DATA; fills ``t``; stops at the first refusal of the session."""
    if hasattr(session, "write_group") and session.supports("pipelining"):
        return await _pipelined(session, t, envelope, recipients, content)
    stage = Stage.MAIL
    try:
        utf8 = envelope.smtputf8
        t.mail = await session.mail(envelope.mail_from, mail_options(session, envelope, len(content)), utf8)
        if not _ok(t.mail):
            return
        stage = Stage.RCPT
        for i, rcpt in enumerate(recipients):
            t.rcpt[i] = await session.rcpt(rcpt.address, rcpt_options(session, rcpt), utf8)
        if not t.any_accepted:
            return
        stage = Stage.DATA
        t.data = await session.data(content)
    except Exception as e:
        t.error, t.error_stage = e, stage


async def _pipelined(session, t: Transcript, envelope: Envelope, recipients: Sequence[Recipient],
                     content: bytes) -> None:
    """The transaction as a group (RFC 2920): MAIL, every RCPT and DATA in one write,
    their replies read in order, then the content after a 354. Every reply is read
    (§3.1: the client must check them all); RCPT replies count only after an
    accepted MAIL, as the sequential path would not have sent them."""
    utf8 = envelope.smtputf8
    stage = Stage.MAIL
    try:
        lines = [path_command(b"MAIL FROM:", envelope.mail_from, mail_options(session, envelope, len(content)), utf8)]
        lines += [path_command(b"RCPT TO:", r.address, rcpt_options(session, r), utf8) for r in recipients]
        lines.append(b"DATA\r\n")
        session.write_group(lines)
        t.mail = await session.reply(what="reply to MAIL FROM")
        if not _ok(t.mail):
            await _drain(session, len(recipients) + 1)
            return
        stage = Stage.RCPT
        for i in range(len(recipients)):
            t.rcpt[i] = await session.reply(what="reply to RCPT TO")
        stage = Stage.DATA
        go = await session.reply(what="reply to DATA")
        if not t.any_accepted:
            if go.code == 354:       # §3.1: DATA taken with no recipient: end it with an empty message
                session.write(b".\r\n")
                await _drain(session, 1)
            return
        t.data = await session.content(content) if go.code == 354 else go
    except Exception as e:
        t.error, t.error_stage = e, stage


async def _drain(session, n: int) -> None:
    """Read N replies the transaction no longer needs (the session is not kept: its
    transaction did not end in a 2xx to the content); a break here changes nothing."""
    try:
        for _ in range(n):
            await session.reply(what="reply to a pipelined command")
    except Exception:
        pass


# ---- the real connector's socket (connection.py) -----------------------------------

def bound_socket(address: str) -> socket.socket:
    """A non-blocking TCP socket bound to ``(address, 0)``; SourceBindError if it cannot be."""
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET
    except ValueError as e:
        raise SourceBindError(address, OSError(0, str(e))) from e
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.bind((address, 0))
    except OSError as e:
        sock.close()
        raise SourceBindError(address, e) from e
    return sock


# ---- a connector made of a function, for tests -----------------------------------

Handler = Callable[[Target, str], str]


class _FunctionSession:
    def __init__(self, conn: "FunctionConnector", target: Target, source: Source):
        self.conn, self.target, self.source = conn, target, source
        self.tls = False
        self.extensions: set[str] = set()

    def _raw(self, command: str) -> str:
        self.conn.log.append((self.target.address, command))
        return self.conn.handler(self.target, command)

    def _ask(self, command: str) -> SmtpReply:
        return SmtpReply.parse(self._raw(command))

    async def ehlo(self) -> SmtpReply:
        raw = self._raw(f"EHLO {self.source.ehlo}")
        r = SmtpReply.parse(raw)
        # Keywords are the first word of each line after the first (RFC 5321 §4.1.1.1).
        lines = [ln[4:].split() for ln in raw.replace("\r\n", "\n").split("\n")[1:] if len(ln) > 4]
        self.extensions = {w[0].lower() for w in lines if w} if _ok(r) else set()
        return r

    async def helo(self) -> SmtpReply:
        self.extensions = set()
        return self._ask(f"HELO {self.source.ehlo}")

    def supports(self, extension: str) -> bool:
        return extension.lower() in self.extensions

    async def starttls(self) -> SmtpReply:
        r = self._ask("STARTTLS")
        if _ok(r):
            self.tls = True
        return r

    async def mail(self, sender: str, options: Sequence[str], utf8: bool) -> SmtpReply:
        return self._ask(" ".join([f"MAIL FROM:<{sender}>", *options]))

    async def rcpt(self, recipient: str, options: Sequence[str], utf8: bool) -> SmtpReply:
        return self._ask(" ".join([f"RCPT TO:<{recipient}>", *options]))

    async def data(self, content: bytes) -> SmtpReply:
        r = self._ask("DATA")
        if r.code != 354:
            return r
        self.conn.content.append(content)
        return self._ask(".")

    async def quit(self) -> None:
        try:
            self._ask("QUIT")
        except Exception:
            pass

    def close(self) -> None:
        self.conn.closed.append(self.target.address)


class FunctionConnector:
    """A Connector whose server is a function ``(target, command) -> reply text``.

    Commands are "CONNECT", "EHLO name", "STARTTLS", "MAIL FROM:<a> OPTS",
    "RCPT TO:<b> OPTS", "DATA", "." (end of content) and "QUIT". The handler
    may raise to simulate a broken connection. EHLO keywords are read from a
    multi-line EHLO reply ("250-mx.example\\n250 STARTTLS"). Every command is
    logged in ``log`` as (address, command); contents in ``content``; the
    address of every connection closed without QUIT in ``closed``.
    """

    def __init__(self, handler: Handler):
        self.handler = handler
        self.log: list[tuple[str, str]] = []
        self.content: list[bytes] = []
        self.closed: list[str] = []

    async def connect(self, target: Target, port: int, source: Source, *, connect_timeout: float,
                      command_timeout: float) -> tuple[Session, SmtpReply]:
        session = _FunctionSession(self, target, source)
        return session, session._ask("CONNECT")
