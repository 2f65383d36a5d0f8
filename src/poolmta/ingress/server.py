"""ingress.server - the SMTP listener: aiosmtpd subclass, STARTTLS, DATA framing (protocol only)

``PoolSMTP`` is aiosmtpd's ``SMTP`` protocol (one instance per connection)
with the parts poolmta cannot take as they are:

- MAIL and RCPT arguments go through acceptance.py's strict RFC 5321 parser
  instead of aiosmtpd's e-mail-header parser, and the RFC 3461 DSN parameters
  (RET, ENVID, NOTIFY, ORCPT) are understood instead of answered with 555;
  a null reverse-path opens a transaction (aiosmtpd tests ``mail_from`` for
  truth, so ``MAIL FROM:<>`` would not count as one);
- DATA is read in runs up to each ``.<CRLF>`` and checked by
  acceptance.DataAssembler until the one real ``<CRLF>.<CRLF>``; bare CR/LF (SMTP smuggling) refuses the whole message;
- AUTH PLAIN and LOGIN await the handler's check, which runs scrypt in a
  thread (aiosmtpd 1.4.6 calls ``authenticator=`` synchronously, which would
  stall every session for the length of a hash); ``authenticator=`` is left
  as a fail-closed stub. AUTH is offered only under TLS, or in clear to a
  loopback client when ``auth_plaintext_loopback`` is set; three failures
  in one session close it with 421;
- every reply carries an RFC 3463 enhanced status code: ``push`` adds one to
  aiosmtpd's built-in replies that lack it (``503 Error: nested MAIL command``
  → ``503 5.5.1 …``), except the greeting, the 2xx answer to EHLO/HELO, 334
  and 354 (RFC 2034 §3).

``IngressServer`` binds ``server.listen`` with ``loop.create_server`` (port
0 picks a free port, then ``.port`` tells which) and on ``stop()`` stops
listening, lets a message being queued finish and be answered, then says
421 to every open session and closes it.

TRUST: the network. Nothing here decides who may relay; that is
acceptance.py through handler.py.

STANDARDS: RFC 5321 (§4.1.4 order of commands, §4.5.2 transparency, §4.5.3.1
limits), RFC 1870 (SIZE), RFC 6152 (8BITMIME), RFC 2920 (PIPELINING), RFC
2034 + RFC 3463 (enhanced status codes), RFC 3207 (STARTTLS), RFC 4954 and
RFC 4616 (AUTH, PLAIN), RFC 6531 (SMTPUTF8), RFC 3461 (DSN).

CONFIG: server.listen, server.hostname, server.max_message_size,
server.tls_cert, server.tls_key, server.auth_plaintext_loopback,
server.timeout.

SEE ALSO: ingress/handler.py, ingress/acceptance.py, app.py
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import logging
import re
import ssl
from base64 import b64decode
from typing import Any, AnyStr, Optional

from aiosmtpd.smtp import (
    MISSING,
    SMTP,
    AuthResult,
    Envelope as AioEnvelope,
    LoginPassword,
    Session as AioSession,
    syntax,
)

from ..config import Config, ServerConfig, parse_hostport
from ..model import Recipient
from ..replies import (
    R220_GREETING,
    R250_SENDER_OK,
    R421_470_AUTH_FAILURES,
    R421_SHUTDOWN,
    R454_TLS_UNAVAILABLE,
    R501_SYNTAX_PARAM,
    R503_BAD_SEQUENCE,
)
from ..tenancy import Directory
from . import acceptance
from .acceptance import DataAssembler, MailParams, Refuse
from .handler import IngressHandler

log = logging.getLogger("poolmta.ingress")

MAX_AUTH_FAILURES = 3

# Enhanced codes for replies that come without one (aiosmtpd's own wording).
DEFAULT_ENHANCED = {
    211: "2.0.0", 214: "2.0.0", 220: "2.0.0", 221: "2.0.0", 235: "2.7.0", 250: "2.0.0", 251: "2.1.5",
    252: "2.0.0", 421: "4.3.0", 450: "4.2.0", 451: "4.3.0", 452: "4.3.1", 454: "4.7.0", 455: "4.5.4",
    500: "5.5.2", 501: "5.5.4", 502: "5.5.1", 503: "5.5.1", 504: "5.5.4", 530: "5.7.0", 534: "5.7.9",
    535: "5.7.8", 538: "5.7.11", 550: "5.0.0", 551: "5.1.6", 552: "5.3.4", 553: "5.1.3", 554: "5.0.0",
    555: "5.5.4",
}
_REPLY_LINE = re.compile(rb"^(\d{3})([ -]?)(.*)\Z", re.S)
_HAS_ENHANCED = re.compile(rb"^[245]\.\d{1,3}\.\d{1,3}(?= |\Z)")


def add_enhanced_code(line: bytes, *, in_helo: bool = False) -> bytes:
    """``line`` with an RFC 3463 code after the reply code when it has none.

    334 (AUTH challenges) and 354 are left alone, and so are 2xx answers to
    EHLO/HELO (RFC 2034 §3); the 220 greeting never reaches here."""
    m = _REPLY_LINE.match(line)
    if not m:
        return line
    code, sep, text = int(m.group(1)), m.group(2) or b" ", m.group(3)
    if code in (334, 354) or (in_helo and 200 <= code < 300) or _HAS_ENHANCED.match(text):
        return line
    enhanced = DEFAULT_ENHANCED.get(code, f"{code // 100}.0.0")
    if code == 500 and b"too long" in text.lower():
        enhanced = "5.5.6"
    return m.group(1) + sep + enhanced.encode() + (b" " + text if text else b"")


def listen_address(listen: str) -> tuple[str, int]:
    """``server.listen`` → (host, port); unlike config.parse_hostport, port 0 is allowed
    (bind a free port: tests, and a composition root that reports ``.port``)."""
    if listen.endswith(":0"):
        host, _ = parse_hostport(listen[:-2] + ":1", 25)
        return host, 0
    return parse_hostport(listen, 25)


def client_ip(peer: Any) -> str:
    """The client's address from a socket peer tuple; IPv4-mapped IPv6 unwrapped."""
    if not isinstance(peer, (tuple, list)) or not peer:
        return ""
    try:
        addr = ipaddress.ip_address(peer[0])
    except ValueError:
        return str(peer[0])
    if addr.version == 6 and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    return str(addr)


def is_loopback(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return False


def make_tls_context(cert: str, key: str) -> ssl.SSLContext:
    """Server-side context for STARTTLS; clients are not asked for certificates."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    return ctx


def _fail_closed(server, session, envelope, mechanism, auth_data) -> AuthResult:
    """aiosmtpd's synchronous authenticator: never used by PLAIN/LOGIN here, and
    refuses any mechanism that would reach it."""
    return AuthResult(success=False, handled=False)


# ---- per-connection state ---------------------------------------------------

class PoolSession(AioSession):
    """aiosmtpd's Session plus what poolmta establishes about the client.
    A new one is made on connect and again after STARTTLS (RFC 3207 §4.2)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        super().__init__(loop)
        self.client_ip = ""
        self.auth_user = ""
        self.auth_tenant = ""

    # aiosmtpd logs a deprecation warning on every access of login_data,
    # which its own smtp_AUTH makes; keep the value, drop the noise.
    @property
    def login_data(self) -> Any:
        return self._login_data

    @login_data.setter
    def login_data(self, value: Any) -> None:
        self._login_data = value


class PoolEnvelope(AioEnvelope):
    """aiosmtpd's Envelope plus the transaction as acceptance decided it.
    ``mail_from`` is None until MAIL succeeded ("" is the null reverse-path)."""

    def __init__(self) -> None:
        super().__init__()
        self.params: MailParams | None = None
        self.recipients: tuple[Recipient, ...] = ()   # after forwarding expansion
        self.tenant = ""
        self.srs_bounce: bool | None = None           # recipients are returning SRS bounces (None: no recipient yet)


# ---- the protocol -----------------------------------------------------------------

class _InspectOncePerClass:
    """aiosmtpd 1.4.6 calls ``inspect.getmembers()`` on the protocol and on the handler
    for every new connection, only to find their ``auth_*`` methods (smtp.py, the
    ``_auth_methods`` dict), and ``inspect.signature()`` on the handler's EHLO hook to
    learn which of two hook forms it is: together 7 % of the gateway's CPU under
    smtp-source load (its two ``dir()`` calls are answered once per class as well,
    see _install_inspect_shim). For our two classes the ``auth_*`` names are found once per
    class and bound afresh for each instance (the methods must belong to this
    connection), and a bound method's signature is computed once per function;
    everything else goes to the real ``inspect``. Installed only into aiosmtpd's
    module namespace, and only for the 1.4 line, whose code was read."""

    def __init__(self, real, classes: tuple[type, ...]):
        self._real, self._classes = real, classes
        self._names: dict[type, tuple[str, ...]] = {}
        self._signatures: dict[object, object] = {}

    def signature(self, obj, *args, **kw):
        owner = getattr(obj, "__self__", None)
        if args or kw or not isinstance(owner, self._classes):
            return self._real.signature(obj, *args, **kw)
        key = (type(owner), obj.__func__)
        sig = self._signatures.get(key)
        if sig is None:
            sig = self._signatures[key] = self._real.signature(obj)
        return sig

    def __getattr__(self, name: str):
        return getattr(self._real, name)

    def getmembers(self, obj, predicate=None):
        if predicate is not None or not isinstance(obj, self._classes):
            return self._real.getmembers(obj, predicate)
        cls = type(obj)
        names = self._names.get(cls)
        if names is None:
            names = self._names[cls] = tuple(n for n, _ in self._real.getmembers(obj) if n.startswith("auth_"))
        return [(n, getattr(obj, n)) for n in names]


class PoolSMTP(SMTP):
    # The customary AUTH LOGIN prompts (aiosmtpd's end in a NUL byte).
    AuthLoginUsernameChallenge = "Username:"
    AuthLoginPasswordChallenge = "Password:"

    def __init__(self, handler: IngressHandler, *, server_cfg: ServerConfig,
                 tls_context: ssl.SSLContext | None = None, sessions: set | None = None,
                 loop: asyncio.AbstractEventLoop | None = None):
        super().__init__(
            handler,
            data_size_limit=server_cfg.max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=server_cfg.hostname,
            ident=R220_GREETING.text,
            tls_context=tls_context,
            require_starttls=False,
            timeout=server_cfg.timeout,
            auth_required=False,
            auth_require_tls=True,                     # relaxed per connection in connection_made
            authenticator=_fail_closed,
            loop=loop,
        )
        # aiosmtpd keeps these limits in a class-level dict that every EHLO
        # grows; give each connection its own (DSN parameters lengthen MAIL/RCPT).
        self.command_size_limits = collections.defaultdict(lambda: SMTP.command_size_limit,
                                                           {"MAIL": 1000, "RCPT": 1000})
        self.server_cfg = server_cfg
        self.sessions = sessions if sessions is not None else set()
        self.idle = asyncio.Event()
        self.idle.set()
        self._greeted = False
        self._continued: list[bytes] = []         # the lines so far of a multi-line reply (push)
        self._deadline = 0.0                      # of the idle timeout (_reset_timeout)
        self._in_helo = False
        self._auth_failures = 0

    # -- connection ------------------------------------------------------------
    def _create_session(self) -> PoolSession:
        return PoolSession(self.loop)

    def _create_envelope(self) -> PoolEnvelope:
        return PoolEnvelope()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        session: PoolSession = self.session      # type: ignore[assignment]
        session.client_ip = client_ip(session.peer)
        self._auth_require_tls = not (self.server_cfg.auth_plaintext_loopback and is_loopback(session.client_ip))
        self.sessions.add(self)

    def connection_lost(self, error: Optional[Exception]) -> None:
        self.sessions.discard(self)
        self.idle.set()
        super().connection_lost(error)

    def shutdown(self) -> None:
        """Say 421 and close (listener stopping)."""
        if self.transport is None or self.transport.is_closing():
            return
        try:
            self.transport.write(f"{R421_SHUTDOWN}\r\n".encode())
        finally:
            self.transport.close()

    async def push(self, status: AnyStr) -> None:
        """One reply line; the lines of a multi-line reply ("250-...") are held and
        written with its last line, in one write (aiosmtpd writes each line: an EHLO
        reply was 8 system calls per session, a quarter of the listener's writes)."""
        line = status.encode("utf-8", "surrogateescape") if isinstance(status, str) else status
        if self._greeted:
            line = add_enhanced_code(line, in_helo=self._in_helo)
        self._greeted = True                      # the first push is the 220 greeting
        if line[3:4] == b"-":
            self._continued.append(line)
            return
        if self._continued:
            self._continued.append(line)
            line = b"\r\n".join(self._continued)
            self._continued.clear()
        await super().push(line)

    def _reset_timeout(self, duration: Optional[float] = None) -> None:
        """The idle timeout starts again. aiosmtpd cancels its timer and arms a new one
        at every command (1.5 % of the listener's CPU); here the deadline moves, and
        the one timer, when it fires before it, is armed again for it."""
        self._deadline = self.loop.time() + (duration or self._timeout_duration)
        h = self._timeout_handle
        if h is None or h.cancelled() or h.when() > self._deadline:
            if h is not None:
                h.cancel()
            self._timeout_handle = self.loop.call_at(self._deadline, self._timeout_due)

    def _timeout_due(self) -> None:
        if self.loop.time() < self._deadline:
            self._timeout_handle = self.loop.call_at(self._deadline, self._timeout_due)
        else:
            self._timeout_cb()

    # -- commands --------------------------------------------------------------
    @syntax("HELO hostname")
    async def smtp_HELO(self, hostname: str) -> None:
        self._in_helo = True
        try:
            await super().smtp_HELO(hostname)
        finally:
            self._in_helo = False

    @syntax("EHLO hostname")
    async def smtp_EHLO(self, hostname: str) -> None:
        self._in_helo = True
        try:
            await super().smtp_EHLO(hostname)
        finally:
            self._in_helo = False

    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str) -> None:
        if not self.tls_context:
            await self.push(str(R454_TLS_UNAVAILABLE))
            return
        if self._tls_protocol is not None:
            await self.push(str(R503_BAD_SEQUENCE.with_text("TLS already active")))
            return
        await super().smtp_STARTTLS(arg)

    @syntax("AUTH <mechanism>")
    async def smtp_AUTH(self, arg: str) -> None:
        if self.envelope is not None and self.envelope.mail_from is not None:
            # RFC 4954 §4: not during a mail transaction.
            await self.push(str(R503_BAD_SEQUENCE.with_text("AUTH not permitted during a mail transaction")))
            return
        await super().smtp_AUTH(arg)

    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: Optional[str]) -> None:
        if await self.check_helo_needed():
            return
        assert self.session is not None and self.envelope is not None
        if self.envelope.mail_from is not None:
            await self.push(str(R503_BAD_SEQUENCE.with_text("Nested MAIL command")))
            return
        cmd = acceptance.parse_mail(arg or "", esmtp=self.session.extended_smtp)
        if isinstance(cmd, Refuse):
            await self.push(str(cmd))
            return
        status = await self._call_handler_hook("MAIL", cmd.address, list(cmd.options))
        if status is MISSING:                     # a handler without handle_MAIL
            self.envelope.mail_from = cmd.address
            status = str(R250_SENDER_OK)
        await self.push(status)

    @syntax("RCPT TO: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_RCPT(self, arg: Optional[str]) -> None:
        if await self.check_helo_needed():
            return
        assert self.session is not None and self.envelope is not None
        if self.envelope.mail_from is None:
            await self.push(str(R503_BAD_SEQUENCE.with_text("Need MAIL before RCPT")))
            return
        cmd = acceptance.parse_rcpt(arg or "", esmtp=self.session.extended_smtp,
                                    smtputf8=self.envelope.smtp_utf8)
        if isinstance(cmd, Refuse):
            await self.push(str(cmd))
            return
        status = await self._call_handler_hook("RCPT", cmd.address, list(cmd.options))
        if status is MISSING:
            status = str(R503_BAD_SEQUENCE.with_text("No recipient policy"))   # fail closed
        await self.push(status)

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        if await self.check_helo_needed():
            return
        assert self.envelope is not None
        if self.envelope.mail_from is None:
            await self.push(str(R503_BAD_SEQUENCE.with_text("Need MAIL command")))
            return
        if not self.envelope.rcpt_tos:
            await self.push(str(R503_BAD_SEQUENCE.with_text("Need RCPT command")))
            return
        if arg:
            await self.push(str(R501_SYNTAX_PARAM.with_text("Syntax: DATA")))
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        data = DataAssembler(self.server_cfg.max_message_size)
        while True:
            try:
                # Up to the next ".<CRLF>" (the end of data is one): many lines per call.
                chunk = await self._reader.readuntil(b".\r\n")
            except asyncio.LimitOverrunError as e:
                # No ".<CRLF>" within the reader's limit: take what it holds, keep reading.
                chunk = await self._reader.read(e.consumed)
            except asyncio.IncompleteReadError:
                log.info("%r connection closed during DATA", self.session.peer if self.session else None)
                self._set_post_data_state()
                return
            self._reset_timeout()                 # a long upload is not an idle session
            if data.feed(chunk):
                break
        content = data.result()
        if isinstance(content, Refuse):
            log.info("%r DATA refused: %s", self.session.peer if self.session else None, content)
            self._set_post_data_state()
            await self.push(str(content))
            return
        self.envelope.content = self.envelope.original_content = content
        self.idle.clear()
        try:
            status = await self._call_handler_hook("DATA")
            if status is MISSING:
                status = str(R503_BAD_SEQUENCE.with_text("No message policy"))
            self._set_post_data_state()
            await self.push(status)
        finally:
            self.idle.set()

    # -- AUTH mechanisms (async credential check) ----------------------------
    async def auth_PLAIN(self, _: Any, args: list[str]) -> AuthResult:
        if len(args) == 1:
            blob = await self.challenge_auth("")
            if blob is MISSING:
                return AuthResult(success=False)  # challenge_auth has answered
        else:
            try:
                blob = b64decode(args[1].encode(), validate=True)
            except Exception:
                await self.push("501 5.5.2 Can't decode base64")
                return AuthResult(success=False, handled=True)
        parts = blob.split(b"\x00")
        if len(parts) != 3:
            await self.push("501 5.5.2 Can't split auth value")
            return AuthResult(success=False, handled=True)
        authzid, login, password = parts
        if authzid and authzid != login:
            # RFC 4616 §2: acting for another identity is not something we grant.
            return await self._auth_failed()
        return await self._check_credentials("PLAIN", LoginPassword(login, password))

    async def auth_LOGIN(self, _: Any, args: list[str]) -> AuthResult:
        if len(args) == 1:
            login = await self.challenge_auth(self.AuthLoginUsernameChallenge)
            if login is MISSING:
                return AuthResult(success=False)
        else:
            try:
                login = b64decode(args[1].encode(), validate=True)
            except Exception:
                await self.push("501 5.5.2 Can't decode base64")
                return AuthResult(success=False, handled=True)
        password = await self.challenge_auth(self.AuthLoginPasswordChallenge)
        if password is MISSING:
            return AuthResult(success=False)
        return await self._check_credentials("LOGIN", LoginPassword(login, password))

    async def _check_credentials(self, mechanism: str, creds: LoginPassword) -> AuthResult:
        handler: IngressHandler = self.event_handler
        result = await handler.authenticate(self, self.session, self.envelope, mechanism, creds)
        if result.success:
            return result
        return await self._auth_failed()

    async def _auth_failed(self) -> AuthResult:
        self._auth_failures += 1
        if self._auth_failures < MAX_AUTH_FAILURES:
            return AuthResult(success=False, handled=False)     # smtp_AUTH answers 535 5.7.8
        await self.push(str(R421_470_AUTH_FAILURES))
        if self.transport is not None:
            self.transport.close()
        return AuthResult(success=False, handled=True)


# ---- the listener ------------------------------------------------------------------

def _install_inspect_shim() -> None:
    import inspect

    import aiosmtpd
    import aiosmtpd.smtp
    if aiosmtpd.__version__.startswith("1.4.") and aiosmtpd.smtp.inspect is inspect:
        ours = (PoolSMTP, IngressHandler)
        aiosmtpd.smtp.inspect = _InspectOncePerClass(inspect, ours)
        # Its two dir() calls per connection (to find the smtp_* and handle_* methods)
        # read the names of the class, which do not change: once per class too.
        names: dict[type, list[str]] = {}

        def dir_once_per_class(*obj):
            if len(obj) != 1 or not isinstance(obj[0], ours):
                return dir(*obj)
            cls = type(obj[0])
            if cls not in names:
                names[cls] = dir(cls)
            return names[cls]
        aiosmtpd.smtp.dir = dir_once_per_class


_install_inspect_shim()


class IngressServer:
    """The SMTP listener of one gateway: ``await start()``, ``.port``, ``await stop()``."""

    def __init__(self, cfg: Config, directory: Directory, pipeline, clock, srs=None, limits=None, *,
                 reuse_port: bool = False):
        self.cfg = cfg
        self.reuse_port = reuse_port          # several worker processes listen on the same port
        self.handler = IngressHandler(cfg, directory, pipeline, clock, srs, limits)
        self.host = ""
        self.port = 0
        self.sessions: set[PoolSMTP] = set()
        self._server: asyncio.base_events.Server | None = None
        self._tls: ssl.SSLContext | None = None

    async def start(self) -> None:
        s = self.cfg.server
        self.host, port = listen_address(s.listen)
        if s.tls_cert and s.tls_key:
            self._tls = await asyncio.to_thread(make_tls_context, s.tls_cert, s.tls_key)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: PoolSMTP(self.handler, server_cfg=s, tls_context=self._tls, sessions=self.sessions, loop=loop),
            self.host, port, reuse_port=self.reuse_port or None)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("ingress listening on %s port %d (STARTTLS %s)", self.host, self.port,
                 "on" if self._tls else "off")

    async def stop(self) -> None:
        if self._server is None:
            return
        server, self._server = self._server, None
        server.close()
        self.handler.closing = True
        # A message being queued finishes and gets its 250 before the 421.
        await asyncio.gather(*(p.idle.wait() for p in list(self.sessions)))
        await self.handler.drain()
        for p in list(self.sessions):
            p.shutdown()
        for _ in range(200):                      # let connection_lost run (bounded)
            if not self.sessions:
                break
            await asyncio.sleep(0.01)
        for p in list(self.sessions):
            if p.transport is not None:
                p.transport.abort()
        await server.wait_closed()
