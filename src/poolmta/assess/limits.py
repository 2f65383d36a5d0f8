"""assess.limits - fact: does this message exceed a sending limit? (and what then)

Counts every message a tenant submits (SMTP AUTH, or its own connector) into
sliding windows in the shared sender state, and reports which limits the
message takes its sender over. Two kinds of limits, as in Exchange Online:

- the outbound spam policy of the tenant, chosen by the From: header address
  (the first custom policy, by priority, whose senders or domains match; else
  the tenant's default policy): recipient_limit_external_per_hour,
  recipient_limit_internal_per_hour, recipient_limit_per_day (UTC day);
  0 means no policy limit;
- the service limits: recipients per sender per rolling 24 h, messages per
  sender per minute.

Counts accumulate per authenticated submitter, or per envelope sender for
connector mail. One message to N recipients counts N. DSNs, our own alerts
and auto-replies (RFC 3834 Auto-Submitted) are not counted, nor is internet
mail to forwarding addresses (no tenant submitted it).

The message that goes over a limit, and every further one while over it,
leaves through the high-risk pool (route rule "limit"). ``after_accept``
then carries out the policy's action at the crossing: restrict the sender
for the rest of the UTC day or until released, or only alert; and a sender
whose mail is judged spam ``limits.spam_restrict_count`` times within the
window is restricted too. Alerts go to the tenant's admins as real mail.

The tenant-wide external-recipient limit (a number, or 500 × licences^0.7 +
9500) is enforced at RCPT by ingress: ``tenant_over_external_limit``.

TRUST: counts come from our own state; From: is untrusted but only selects
which of the tenant's own policies applies.

CONFIG: limits.*, tenants.*.policy, tenants.*.policies, tenants.*.admins,
tenants.*.external_recipients_per_day, tenants.*.licenses

SEE ALSO: state/, route/rules.py (limit), ingress/handler.py (restrictions), cli.py (senders)
"""

from __future__ import annotations

import logging
import math
from email.utils import formatdate, make_msgid

from ..config import Config, PolicyConfig
from ..model import Envelope, Facts, LimitFact, Message, Origin, Recipient, domain_of, header_addresses
from ..state import Restriction, SenderState, utc_day_start
from .dsn import headers

log = logging.getLogger("poolmta.limits")

HOUR, DAY = 3600.0, 86400.0


def tenant_external_limit(external_recipients_per_day: int, licenses: int) -> int:
    """The tenant-wide external recipient limit; 0 = none."""
    if external_recipients_per_day:
        return external_recipients_per_day
    if licenses:
        return int(500 * licenses ** 0.7 + 9500)       # Exchange Online's formula
    return 0


def from_address(content: bytes) -> str:
    addrs = [a for a in header_addresses(tuple(str(v) for v in headers(content).get_all("From", []))) if "@" in a]
    return addrs[0].lower() if addrs else ""


def auto_submitted(content: bytes) -> bool:
    v = str(headers(content).get("Auto-Submitted", "no")).strip().lower()
    return bool(v) and not v.startswith("no")


class Limits:
    def __init__(self, state: SenderState, cfg: Config, directory, clock):
        self.state, self.cfg, self.directory, self.clock = state, cfg, directory, clock

    # -- which policy, whose counters -------------------------------------------
    def policy_for(self, tenant: str, from_addr: str) -> PolicyConfig:
        t = self.cfg.tenants.get(tenant)
        if t is None:
            return PolicyConfig()
        dom = domain_of(from_addr)
        for p in sorted(t.policies, key=lambda p: p.priority):
            if from_addr in (s.lower() for s in p.senders) or dom in p.domains:
                return p
        return t.policy

    @staticmethod
    def stricter(a: PolicyConfig, b: PolicyConfig) -> PolicyConfig:
        """Of the From: address's policy and the submitter's own, the stricter: the From:
        header is the sender's to write, and must not buy a compromised account a
        lenient policy. Compared on the external-per-hour limit (0 = none), then daily."""
        def key(p: PolicyConfig):
            inf = float("inf")
            return (p.recipient_limit_external_per_hour or inf, p.recipient_limit_per_day or inf)
        return a if key(a) < key(b) else b

    def counted_sender(self, msg: Message) -> str:
        """Whose counters this message goes into ("" = not counted)."""
        o, env = msg.origin, msg.envelope
        if o.kind != "smtp" or not o.tenant:
            return ""
        if not self.directory.submitted_by_tenant(o.auth_user, o.client_ip):
            return ""
        # An AUTH user counts even with a null reverse-path: a compromised account
        # sending "bounces" is still that account sending.
        return (o.auth_user or env.mail_from).lower()

    # -- the fact ------------------------------------------------------------------
    async def check(self, msg: Message) -> LimitFact:
        sender = self.counted_sender(msg)
        if not sender:
            return LimitFact()
        # Auto-replies (Auto-Submitted, a header the sender writes) still count for the
        # sender; they are spared only the tenant-wide external limit, as the issue says.
        auto = auto_submitted(msg.content)
        tenant, env, now = msg.origin.tenant, msg.envelope, self.clock.now()
        policy = self.stricter(self.policy_for(tenant, from_address(msg.content) or sender),
                               self.policy_for(tenant, sender))
        n_ext = sum(1 for r in env.recipients if not self.directory.is_accepted(tenant, domain_of(r.address)))
        n_int = len(env.recipients) - n_ext
        k = f"{tenant}:{sender}"
        # (name, key, amount, since, limit, applies the policy's action); one round trip for all.
        windows: list[tuple[str, str, int, float, int, bool]] = []
        if n_ext:
            windows.append(("recipient_limit_external_per_hour", f"ext:{k}", n_ext, now - HOUR,
                            policy.recipient_limit_external_per_hour, True))
            if not auto:
                windows.append(("", f"tenant-ext:{tenant}", n_ext, now - DAY, 0, False))
        if n_int:
            windows.append(("recipient_limit_internal_per_hour", f"int:{k}", n_int, now - HOUR,
                            policy.recipient_limit_internal_per_hour, True))
        # (since, now]: just before midnight, so an event at 00:00:00 counts in its own day.
        windows.append(("recipient_limit_per_day", f"day:{k}", len(env.recipients),
                        math.nextafter(utc_day_start(now), -math.inf), policy.recipient_limit_per_day, True))
        # The service recipient limit is the policy's too (0 in a policy means "the
        # service default"): crossing it applies the policy's action.
        windows.append(("service_recipients_per_day", f"rcpt24:{k}", len(env.recipients), now - DAY,
                        self.cfg.limits.recipients_per_day, True))
        windows.append(("service_messages_per_minute", f"msg:{k}", 1, now - 60,
                        self.cfg.limits.messages_per_minute, False))
        results = await self.state.add_many([(key, amount, since) for _, key, amount, since, _, _ in windows], now)
        counts: dict[str, int] = {}
        exceeded: list[str] = []
        policy_hit = False
        for (name, _, _, _, limit, is_policy), (before, after) in zip(windows, results):
            if not name:
                continue
            counts[name] = after
            if limit and after > limit:
                exceeded.append(name)
                policy_hit = policy_hit or is_policy
                if before <= limit:
                    counts[f"{name}:crossed"] = 1
        return LimitFact(tuple(exceeded), sender, policy.name,
                         policy.action_when_limit_reached if policy_hit else "", counts)

    async def tenant_over_external_limit(self, tenant: str) -> bool:
        t = self.cfg.tenants.get(tenant)
        if t is None:
            return False
        limit = tenant_external_limit(t.external_recipients_per_day, t.licenses)
        if not limit:
            return False
        now = self.clock.now()
        return await self.state.count(f"tenant-ext:{tenant}", now, now - DAY) >= limit

    # -- what happens afterwards -----------------------------------------------------
    async def after_accept(self, msg: Message, facts: Facts, send_alert) -> list[str]:
        """Restrictions and alerts this message triggers; returns what was done (for the trace).

        Level-triggered and idempotent: every message over a limit with a restricting
        action asks for the restriction (a no-op when one is in force), so a failure
        at the crossing is made good by the next message. Alerts are sent once per
        sender and limit per UTC day, however often the sender crosses again."""
        lf, done = facts.limits, []
        tenant, now = msg.origin.tenant, self.clock.now()
        sender = lf.sender or self.counted_sender(msg)
        over = [n for n in lf.exceeded if n != "service_messages_per_minute"]
        if over and lf.action in ("block_user_for_today", "block_user"):
            until = utc_day_start(now) + DAY if lf.action == "block_user_for_today" else None
            if await self._restrict(sender, tenant, until, f"limit:{over[0]}", now):
                done.append(f"restricted:{lf.action}")
        for name in lf.exceeded:
            if not await self._first_today(f"alert:{tenant}:{sender}:{name}", now):
                continue
            await send_alert(tenant, f"Sending limit reached by {sender}",
                             f"{sender} went over {name} (policy {lf.policy!r}, action "
                             f"{lf.action or 'none'}).\nIts further mail leaves through the high-risk pool"
                             + (" and it is restricted from sending" if done else "") + ".\n"
                             f"Release with: poolmta senders release {sender}\n")
            done.append("alerted")
        n = self.cfg.limits.spam_restrict_count
        if sender and n and facts.spam.is_spam:
            before, after = await self.state.add(f"spam:{tenant}:{sender}", 1, now,
                                                 now - self.cfg.limits.spam_restrict_window)
            if before < n <= after:
                if await self._restrict(sender, tenant, utc_day_start(now) + DAY, "spam-volume", now):
                    done.append("restricted:spam-volume")
                    await send_alert(tenant, f"Sender restricted for sending spam: {sender}",
                                     f"{after} messages from {sender} were judged spam within "
                                     f"{int(self.cfg.limits.spam_restrict_window)} s; it is restricted "
                                     "until the end of the UTC day.\n"
                                     f"Release with: poolmta senders release {sender}\n")
        return done

    async def _first_today(self, key: str, now: float) -> bool:
        before, _ = await self.state.add(key, 1, now, math.nextafter(utc_day_start(now), -math.inf))
        return before == 0

    async def _restrict(self, sender: str, tenant: str, until: float | None, reason: str, now: float) -> bool:
        if await self.state.released_on_day("user", sender, now):
            log.info("not restricting %s: released by an administrator today", sender)
            return False
        ok = await self.state.restrict(Restriction("user", sender, now, until, reason, tenant))
        if ok:
            log.warning("sender restricted sender=%s tenant=%s reason=%s until=%s", sender, tenant, reason, until)
        return ok


def alert_message(hostname: str, tenant: str, admins: tuple[str, ...], subject: str, body: str, now: float,
                  queue_id: str) -> Message:
    """An alert to the tenant's admins, as a real message (it re-enters the pipeline)."""
    sender = f"poolmta-alerts@{hostname}"
    content = (f"From: poolmta alerts <{sender}>\r\nTo: {', '.join(admins)}\r\nSubject: [poolmta] {subject}\r\n"
               f"Date: {formatdate(now, usegmt=True)}\r\nMessage-ID: {make_msgid('alert', hostname)}\r\n"
               f"Auto-Submitted: auto-generated\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
               + body.replace("\n", "\r\n")).encode("utf-8")
    env = Envelope(sender, tuple(Recipient(a) for a in admins))
    return Message(queue_id, env, Origin("127.0.0.1", tenant=tenant, kind="alert"), content, now)
