"""rewrite - apply a routing decision to the message, in order, before the spool

1. trace headers: strip any Authentication-Results that claims our
   authserv-id (RFC 8601 §5), stamp ours and the original client IP when the
   sender was evaluated, Delivered-To for forwarding addresses, Received;
2. SRS: the envelope sender of authenticated forwarding is rewritten
   (decision.srs), so SPF at the destination checks our domain and bounces
   come back to us;
3. ARC (RFC 8617): mail we forward gets a seal recording the SPF/DKIM
   results we saw (pass or fail), with the forwarding domain's key;
4. DKIM: mail the tenant submitted itself (SMTP AUTH or its connector) whose
   From: domain is one of that tenant's accepted domains with a key is signed,
   the last step before the spool. Mail from the internet is never signed with
   our keys, whatever its From: says.

Signing and sealing never stall mail: a missing or broken key, or a signer
error, sends the message as it is, logged at error level and traced
("rewritten" event with the problem). RSA signing is CPU work, so it runs in
a thread, off the event loop.

TRUST: the message is untrusted bytes; keys and secrets are ours.

STANDARDS: RFC 5321 §4.4 (trace), RFC 8601, RFC 6376, RFC 8617, SRS (libsrs2).

CONFIG: server.hostname, auth.authserv_id, srs.*, dkim.*

SEE ALSO: rewrite/headers.py, rewrite/srs.py, rewrite/dkim.py, rewrite/arc.py, rewrite/keys.py, pipeline.py
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

import dkim as dkimpy

from ..assess.inbound_auth import strip_our_authres
from ..config import Config
from ..model import Decision, Facts, Message, domain_of
from . import arc, dkim, keys
from .headers import delivered_to, received
from .srs import SRS, SRSError

log = logging.getLogger("poolmta.rewrite")


MAX_ARC_SETS_VALIDATED = 10     # a longer incoming chain is sealed as cv=fail without DNS
SIGN_IN_THREAD_OVER = 64 * 1024  # larger messages are signed in a worker thread, not in the event loop


def _bounded(dnsfunc, budget: float):
    """A dkimpy dnsfunc whose lookups together take at most BUDGET seconds: an
    attacker's long ARC chain cannot hold a thread (and the 250) for minutes."""
    end = time.monotonic() + budget

    def lookup(name, timeout=5):
        left = end - time.monotonic()
        if left <= 0:
            raise dkimpy.DnsTimeoutError("ARC chain validation ran out of time")
        return dnsfunc(name, timeout=min(timeout, left))
    return lookup


class Rewriter:
    def __init__(self, cfg: Config, directory, clock, srs: SRS | None = None):
        self.cfg, self.clock, self.srs, self.directory = cfg, clock, srs, directory
        self.authserv_id = cfg.auth.authserv_id or cfg.server.hostname
        self.key_dir = keys.key_dir_of(cfg)
        from ..config import parse_hostport
        ns = [parse_hostport(n, 53) for n in cfg.dns.nameservers] or None
        self._dnsfunc = arc.make_dnsfunc(ns, cfg.dns.timeout)

    async def apply(self, msg: Message, facts: Facts, decision: Decision) -> tuple[Message, dict]:
        """The message as it is spooled, and what was done (for the trace)."""
        notes: dict = {}
        content, env = msg.content, msg.envelope
        ia = facts.inbound_auth
        if msg.origin.kind == "smtp":
            content = strip_our_authres(content, self.authserv_id)
            stamp = b""
            if ia.evaluated:
                if ia.authres:
                    stamp += f"Authentication-Results: {ia.authres}\r\n".encode("utf-8", "surrogateescape")
                if ia.original_ip:
                    stamp += f"X-Poolmta-Original-Client-IP: {ia.original_ip}\r\n".encode()
            content = received(msg, self.cfg.server.hostname) + stamp + delivered_to(msg) + content

        forwarder = next((r.original for r in env.recipients if r.original), "")
        if decision.srs and self.srs is not None and env.mail_from:
            try:
                new_from = self.srs.forward(env.mail_from, forwarder=forwarder)
                if new_from != env.mail_from:
                    notes["srs"] = {"from": env.mail_from, "to": new_from}
                    env = dataclasses.replace(env, mail_from=new_from)
            except (SRSError, ValueError) as e:
                notes["srs_problem"] = str(e)
                log.error("SRS rewrite failed queue_id=%s sender=%s: %s", msg.queue_id, env.mail_from, e)

        # ARC: every message we forward for a forwarding address (whatever its pool: the
        # seal records what we saw, pass or fail), and authenticated relaying through a connector.
        if self.cfg.dkim.arc and facts.forwarded.forwarded and (forwarder or decision.srs):
            arc_domain = domain_of(forwarder) or (self.srs.domain if self.srs else "")
            if arc_domain:
                key = keys.active_key(self.key_dir, arc_domain)
                if isinstance(key, keys.KeyProblem):
                    notes["arc_problem"] = str(key)
                else:
                    # Validating the incoming chain asks DNS (blocking, in the thread): bound the
                    # whole of it, and do not even try a chain longer than anyone honest builds.
                    sets = content.split(b"\r\n\r\n", 1)[0].lower().count(b"\narc-seal:") + \
                        content[:9].lower().startswith(b"arc-seal:")
                    cv = "fail" if sets > MAX_ARC_SETS_VALIDATED else None
                    sealed = await asyncio.to_thread(arc.seal, content, arc_domain, key, ia.authres,
                                                     self.authserv_id, self.clock.now(), cv=cv,
                                                     dnsfunc=_bounded(self._dnsfunc, self.cfg.auth.spf_timeout))
                    if isinstance(sealed, arc.SealProblem):
                        notes["arc_problem"] = str(sealed)
                    else:
                        content = sealed
                        notes["arc"] = arc_domain

        # Sign only what the tenant itself submitted (AUTH or its connector), for a From:
        # domain of that tenant: mail from the internet to a forwarding address may claim
        # our From: domain, and our key must never vouch for it.
        submitted = self.directory.submitted_by_tenant(msg.origin.auth_user, msg.origin.client_ip)
        if self.cfg.dkim.sign and submitted and msg.origin.tenant:
            d = dkim.signing_domain(content, self.directory.accepted_by_tenant.get(msg.origin.tenant, ()))
            if d:
                key = keys.active_key(self.key_dir, d)
                if len(content) > SIGN_IN_THREAD_OVER:
                    signed = await asyncio.to_thread(dkim.sign, content, d, key, self.cfg.dkim.headers,
                                                     self.clock.now())
                else:                       # ~0.3 ms for 4 KB: less than the thread hop and its wake-ups cost
                    signed = dkim.sign(content, d, key, self.cfg.dkim.headers, self.clock.now())
                if isinstance(signed, dkim.SignProblem):
                    notes["dkim_problem"] = str(signed)
                    log.error("sending UNSIGNED queue_id=%s: %s", msg.queue_id, signed)
                else:
                    content = signed
                    notes["dkim"] = {"d": d, "s": key.selector}
        if "arc_problem" in notes:
            log.error("forwarded without ARC seal queue_id=%s: %s", msg.queue_id, notes["arc_problem"])
        return dataclasses.replace(msg, envelope=env, content=content), notes
