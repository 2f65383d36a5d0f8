"""rewrite - apply a routing decision to the message, in order, before the spool

1. trace headers: strip any Authentication-Results that claims our
   authserv-id (RFC 8601 §5), stamp ours and the original client IP when the
   sender was evaluated, Delivered-To for forwarding addresses, Received;
2. SRS: the envelope sender of authenticated forwarding is rewritten
   (decision.srs), so SPF at the destination checks our domain and bounces
   come back to us;
3. ARC (RFC 8617): forwarded mail we let through gets a seal recording the
   SPF/DKIM results we saw, with the forwarding domain's key;
4. DKIM: mail whose From: domain is an accepted domain with a key is signed,
   the last step before the spool.

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

from ..assess.inbound_auth import strip_our_authres
from ..config import Config
from ..model import Decision, Facts, Message, domain_of
from . import arc, dkim, keys
from .headers import delivered_to, received
from .srs import SRS, SRSError

log = logging.getLogger("poolmta.rewrite")


class Rewriter:
    def __init__(self, cfg: Config, accepted_domains, clock, srs: SRS | None = None):
        self.cfg, self.clock, self.srs = cfg, clock, srs
        self.accepted = frozenset(d.lower() for d in accepted_domains)
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

        if decision.srs and self.cfg.dkim.arc:
            arc_domain = domain_of(forwarder) or (self.srs.domain if self.srs else "")
            if arc_domain:
                key = keys.active_key(self.key_dir, arc_domain)
                if isinstance(key, keys.KeyProblem):
                    notes["arc_problem"] = str(key)
                else:
                    sealed = await asyncio.to_thread(arc.seal, content, arc_domain, key, ia.authres,
                                                     self.authserv_id, self.clock.now(), dnsfunc=self._dnsfunc)
                    if isinstance(sealed, arc.SealProblem):
                        notes["arc_problem"] = str(sealed)
                    else:
                        content = sealed
                        notes["arc"] = arc_domain

        if self.cfg.dkim.sign:
            d = dkim.signing_domain(content, self.accepted)
            if d:
                key = keys.active_key(self.key_dir, d)
                signed = await asyncio.to_thread(dkim.sign, content, d, key, self.cfg.dkim.headers, self.clock.now())
                if isinstance(signed, dkim.SignProblem):
                    notes["dkim_problem"] = str(signed)
                    log.error("sending UNSIGNED queue_id=%s: %s", msg.queue_id, signed)
                else:
                    content = signed
                    notes["dkim"] = {"d": d, "s": key.selector}
        if "arc_problem" in notes:
            log.error("forwarded without ARC seal queue_id=%s: %s", msg.queue_id, notes["arc_problem"])
        return dataclasses.replace(msg, envelope=env, content=content), notes
