"""ingress.handler - the aiosmtpd hooks: ask acceptance, then answer

aiosmtpd calls ``handle_HELO``, ``handle_EHLO``, ``handle_MAIL``,
``handle_RCPT`` and ``handle_DATA`` by name (found with ``dir()``, so a
misspelt hook is silently ignored: tests/integration/test_ingress_smtp.py
checks the exact set). Each hook gathers what the session knows, calls a pure
function of acceptance.py, keeps the result on the transaction and returns
the reply string. ``handle_DATA`` builds the ``Message`` and awaits
``pipeline.accept``; it replies 250 only after that returned, that is after
the spool has the message on disk, and 451 if it raised. ``authenticate``
checks SMTP AUTH credentials against the tenancy Directory in a worker
thread, because scrypt takes tens of milliseconds.

The transaction state lives on the server's ``PoolEnvelope`` (recipients
after forwarding expansion, the vouching tenant, the MAIL parameters) and the
session state on ``PoolSession`` (client IP, AUTH user and tenant), so RSET,
a new EHLO and STARTTLS reset them the way aiosmtpd resets its own.

TRUST: hook arguments come from the client, already through the strict
parser in server.py; they are parsed again here by the same pure functions
rather than believed. The pipeline is trusted to raise when it did not queue.

STANDARDS: RFC 5321 §3.3 (transactions), §4.2.5 (reply after the data is
safe), RFC 4954 (AUTH), RFC 3461 (DSN parameters kept on the envelope).

CONFIG: server.max_message_size, server.max_recipients, tenants.*.

SEE ALSO: ingress/acceptance.py, ingress/server.py, pipeline.py
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from aiosmtpd.smtp import AuthResult, LoginPassword

from ..config import Config
from ..model import Envelope, Message, Origin
from ..replies import (
    R250_QUEUED,
    R250_RCPT_OK,
    R250_SENDER_OK,
    R421_SHUTDOWN,
    R451_LOCAL_ERROR,
    R451_SPOOL_ERROR,
    R452_453_OTHER_TENANT,
    R501_SYNTAX_PARAM,
    R550_518_RESTRICTED_SENDER,
    R550_57233_TENANT_EXTERNAL_LIMIT,
    R550_57711_CONNECTOR_RESTRICTED,
)
from ..pipeline import DeferMessage
from ..spool import new_queue_id
from ..tenancy import Directory
from . import acceptance
from .acceptance import Refuse, SessionFacts

if TYPE_CHECKING:                      # pragma: no cover
    from .server import PoolEnvelope, PoolSession

log = logging.getLogger("poolmta.ingress")

# The keywords the handler adds to aiosmtpd's own EHLO list (SIZE, 8BITMIME,
# SMTPUTF8, STARTTLS and AUTH come from the server's settings).
EXTRA_EHLO_KEYWORDS = ("PIPELINING", "ENHANCEDSTATUSCODES", "DSN")


class IngressHandler:
    """aiosmtpd handler: policy answers for one listener (shared by its sessions)."""

    def __init__(self, cfg: Config, directory: Directory, pipeline, clock, srs=None, limits=None):
        self.cfg, self.directory, self.pipeline, self.clock = cfg, directory, pipeline, clock
        self.limits = limits                # assess.limits.Limits: restricted senders, tenant external limit
        self.srs = srs                      # rewrite.srs.SRS when [srs] is configured: reverses returning bounces
        self.inflight: set[asyncio.Task] = set()
        self.closing = False

    # -- helpers -------------------------------------------------------------
    def facts(self, session: "PoolSession") -> SessionFacts:
        return SessionFacts(client_ip=session.client_ip, auth_user=session.auth_user,
                            auth_tenant=session.auth_tenant,
                            connector=self.directory.connector_for(session.client_ip))

    async def _restricted(self, session: "PoolSession", mail_from: str):
        """Restricted senders may not send (they can still receive): 550 5.1.8 for a
        user, 550 5.7.711 for a connector (Exchange Online's codes)."""
        if self.limits is None or session.client_ip is None:
            return None
        now, state = self.clock.now(), self.limits.state
        if session.auth_user:
            who = session.auth_user
        else:
            c = self.directory.connector_for(session.client_ip)
            if c is None:
                return None                     # internet mail: not a sender of ours
            if await state.restriction("connector", c.name, now):
                log.warning("restricted connector refused name=%s client=%s", c.name, session.client_ip)
                return R550_57711_CONNECTOR_RESTRICTED
            who = mail_from
        if who and await state.restriction("user", who, now):
            log.warning("restricted sender refused sender=%s client=%s", who, session.client_ip)
            return R550_518_RESTRICTED_SENDER
        return None

    # -- hooks -----------------------------------------------------------------
    async def handle_HELO(self, server, session: "PoolSession", envelope, hostname: str) -> str:
        if not acceptance.valid_helo(hostname):
            return str(R501_SYNTAX_PARAM.with_text("Syntax: HELO hostname"))
        session.host_name = hostname
        return f"250 {server.hostname}"

    async def handle_EHLO(self, server, session: "PoolSession", envelope, hostname: str,
                          responses: list[str]) -> list[str]:
        if not acceptance.valid_helo(hostname):
            return [str(R501_SYNTAX_PARAM.with_text("Syntax: EHLO hostname"))]
        session.host_name = hostname
        last = responses[-1]                          # "250 HELP"
        return responses[:-1] + [f"250-{k}" for k in EXTRA_EHLO_KEYWORDS] + [last]

    async def handle_MAIL(self, server, session: "PoolSession", envelope: "PoolEnvelope", address: str,
                          mail_options: list[str]) -> str:
        params = acceptance.mail_params(mail_options)
        if isinstance(params, Refuse):
            return str(params)
        refused = acceptance.check_mail(params, max_size=self.cfg.server.max_message_size)
        if refused:
            return str(refused)
        restricted = await self._restricted(session, address)
        if restricted:
            return str(restricted)
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        envelope.smtp_utf8 = params.smtputf8
        envelope.params = params
        return str(R250_SENDER_OK)

    async def handle_RCPT(self, server, session: "PoolSession", envelope: "PoolEnvelope", address: str,
                          rcpt_options: list[str]) -> str:
        params = acceptance.rcpt_params(rcpt_options)
        if isinstance(params, Refuse):
            return str(params)
        facts = self.facts(session)
        restricted = await self._restricted(session, envelope.mail_from or "")
        if restricted:                         # restricted since its MAIL FROM (another node, an admin)
            return str(restricted)
        verdict = acceptance.check_recipient(address, facts, self.directory, notify=params.notify,
                                             orcpt=params.orcpt, mail_from=envelope.mail_from or "", srs=self.srs)
        if isinstance(verdict, Refuse):
            log.info("rcpt refused client=%s auth=%s rcpt=%s reply=%s", facts.client_ip, facts.auth_user or "-",
                     address, verdict)
            return str(verdict)
        # A returning SRS bounce leaves with a null reverse-path, so it cannot share
        # a transaction (one reverse-path) with ordinary recipients: 452, send it again.
        srs_bounce = verdict.via == "srs"
        if envelope.srs_bounce is not None and envelope.srs_bounce != srs_bounce:
            return str(R452_453_OTHER_TENANT)
        if (self.limits is not None and verdict.via in ("auth", "connector")
                and any(not self.directory.is_accepted(verdict.tenant, r.address.rpartition("@")[2])
                        for r in verdict.recipients)
                and await self.limits.tenant_over_external_limit(verdict.tenant)):
            log.warning("tenant external limit: refused rcpt=%s tenant=%s", address, verdict.tenant)
            return str(R550_57233_TENANT_EXTERNAL_LIMIT)
        added = acceptance.add_recipients(envelope.recipients, envelope.tenant, verdict,
                                          max_recipients=self.cfg.server.max_recipients)
        if isinstance(added, Refuse):
            return str(added)
        envelope.recipients, envelope.tenant = added
        envelope.srs_bounce = srs_bounce
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return str(R250_RCPT_OK)

    async def handle_DATA(self, server, session: "PoolSession", envelope: "PoolEnvelope") -> str:
        if self.closing:
            return str(R421_SHUTDOWN)
        facts = self.facts(session)
        content = envelope.original_content or b""
        looping = acceptance.check_loop(content, envelope.recipients, self.cfg.server.max_hops)
        if looping:
            log.warning("loop refused client=%s from=%s reply=%s", facts.client_ip, envelope.mail_from, looping)
            return str(looping)
        msg = self.message(session, envelope, facts, content)
        task = asyncio.ensure_future(self.pipeline.accept(msg))
        client = {"waiting": True}
        self.inflight.add(task)
        task.add_done_callback(lambda t: self._accept_done(t, msg.queue_id, client))
        try:
            # Shielded: a client that disconnects must not cancel a spool write
            # half-way. It gets no 250 and will send again; a duplicate is the
            # SMTP trade-off (RFC 1047), a half-queued message is not.
            await asyncio.shield(task)
        except asyncio.CancelledError:
            client["waiting"] = False
            raise
        except DeferMessage as e:
            log.warning("message deferred queue_id=%s client=%s: %s", msg.queue_id, facts.client_ip, e.reply)
            return str(e.reply)
        except Exception:
            log.exception("accept failed queue_id=%s client=%s", msg.queue_id, facts.client_ip)
            return str(R451_SPOOL_ERROR)
        return str(R250_QUEUED).format(queue_id=msg.queue_id)

    async def handle_exception(self, error: Exception) -> str:
        # aiosmtpd's default would put the exception text on the wire.
        log.error("SMTP session error: %r", error, exc_info=error)
        return str(R451_LOCAL_ERROR)

    # -- AUTH (called by PoolSMTP.auth_PLAIN / auth_LOGIN, not a hook) -------
    async def authenticate(self, server, session: "PoolSession", envelope, mechanism: str,
                           auth_data: LoginPassword) -> AuthResult:
        try:
            login = auth_data.login.decode("utf-8")
            password = auth_data.password.decode("utf-8")
        except UnicodeDecodeError:
            return AuthResult(success=False, handled=False)
        if not login or not password:
            return AuthResult(success=False, handled=False)
        tenant = await asyncio.to_thread(self.directory.authenticate, login, password)
        if not tenant:
            log.warning("auth failed client=%s mechanism=%s login=%r", session.client_ip, mechanism, login)
            return AuthResult(success=False, handled=False)
        session.auth_user, session.auth_tenant = login, tenant
        log.info("auth ok client=%s login=%s tenant=%s", session.client_ip, login, tenant)
        return AuthResult(success=True, auth_data=login)

    # -- the message -------------------------------------------------------------
    def message(self, session: "PoolSession", envelope: "PoolEnvelope", facts: SessionFacts,
                content: bytes) -> Message:
        p = envelope.params or acceptance.MailParams()
        # SRS bounces are passed on as bounces: null reverse-path (RFC 5321 §4.5.5), so they route high-risk.
        mail_from = "" if envelope.srs_bounce else (envelope.mail_from or "")
        env = Envelope(mail_from=mail_from, recipients=envelope.recipients, ret=p.ret,
                       envid=p.envid, smtputf8=p.smtputf8, body=p.body)
        c = facts.connector
        origin = Origin(client_ip=facts.client_ip, helo=session.host_name or "", auth_user=facts.auth_user,
                        tenant=envelope.tenant, connector=c.name if c else "",
                        trusted_connector=bool(c and c.trusted), kind="smtp")
        return Message(queue_id=new_queue_id(), envelope=env, origin=origin, content=content,
                       received_at=self.clock.now())

    def _accept_done(self, task: asyncio.Task, queue_id: str, client: dict) -> None:
        self.inflight.discard(task)
        if task.cancelled():
            log.warning("accept cancelled queue_id=%s", queue_id)
            return
        exc = task.exception()                        # retrieve it, always
        if not client["waiting"]:
            if exc is None:
                log.warning("queued after the client left queue_id=%s (it may send again)", queue_id)
            else:
                log.error("accept failed after the client left queue_id=%s: %r", queue_id, exc)

    async def drain(self) -> None:
        """Wait for every accept in flight (shutdown); new DATA gets 421 from now on."""
        self.closing = True
        while self.inflight:
            await asyncio.gather(*list(self.inflight), return_exceptions=True)


__all__ = ["IngressHandler", "EXTRA_EHLO_KEYWORDS"]
