"""deliver.scheduler - the delivery loop: due recipients → MX → source of the pool → outcome → spool

A message just accepted leaves at once, from memory: the pipeline calls
``accepted()``, which starts one task per (queue id, domain) group without
reading the spool back. Everything else (retries, mail a full house or a
restart left waiting) is found by one background task that asks the spool
for due groups that are not already in flight, and runs each group as its
own task; at most ``delivery.concurrency`` groups run at once. Between rounds
it sleeps until the next recipient is due, ``delivery.poll_interval``
passes, or ``wake()`` is called (when a slot frees while work was waiting
for one, or a DSN sweep is asked for).

One group, in order (Postfix's qmgr → smtp → bounce, in one coroutine):

1. read the message; if its routing decision left facts to re-check (the
   sender domain's DNS failed at accept time), ask ``pipeline.reassess``;
   still unknown → defer with R451_443_SOURCE_DNS_TEMPFAIL, no connection;
2. take the pool the decision names. Pools are configuration: nothing here
   knows what a pool is for;
3. look up the MX targets, both address families (mx.py), and pick the
   source: the pool's next source in round-robin order if the destination
   has addresses of its family, else the next source (in the same order)
   whose family it has. A pool with no source of any family the destination
   has (an IPv4-only pool, an MX with only AAAA records) defers with
   R451_444_NO_SOURCE_FAMILY, naming the families and the pool, without an
   attempt: the operator may add a source, and the message expires on the
   queue lifetime like any deferral. Only targets of the source's family are
   tried (a socket of one family cannot reach the other);
4. run one SMTP transaction (on a session kept open by an earlier one from
   the same source to the same address when there is one: cache.py), moving
   to the next MX address while
   ``outcome.try_next`` allows (connection failure, 4xx before RCPT), at
   most ``delivery.max_mx_hosts`` addresses;
5. classify (outcome.py) and plan retries (spool/schedule.py): a deferred
   recipient whose next retry would fall past the queue lifetime EXPIRES
   (5.4.7, last reply kept);
6. commit the new states with one ``spool.update``, then trace them. The
   update only touches recipients still pending and returns those it changed:
   a recipient an operator deleted (``poolmta queue delete``) while this
   attempt was in flight stays deleted, gets no state event and no DSN (the
   ATTEMPT event still records what the remote said);
7. for recipients that just bounced or expired, make one DSN (dsn/build.py)
   and hand it to ``pipeline.accept`` (null reverse-path: it is routed like
   any bounce), unless the reverse-path is null (never a DSN about a DSN) or
   the recipient's NOTIFY excludes FAILURE; then ``spool.mark_dsn_sent``.

Nothing accepted may be lost: a recipient's state changes only through
``spool.update``; a crash before it leaves the recipient due (it is tried
again: at-least-once), a crash between the update and the DSN is repaired at
start-up from ``spool.undelivered_dsns()``. An exception in one group is
logged, the group is deferred, and the loop goes on.

TRUST: the spool holds only accepted mail; DNS answers and remote replies are
untrusted and handled in mx.py / client.py / outcome.py.

STANDARDS: RFC 5321 §4.5.4.1 (retry), §4.5.5 (null reverse-path for
notifications), RFC 3461 §4.1 (NOTIFY), RFC 3464 (DSN).

CONFIG: delivery.* (port, retry_schedule, queue_lifetime, connect_timeout,
command_timeout, concurrency, starttls, max_mx_hosts, poll_interval,
connection_cache_time, connection_reuse_limit),
pools.*, server.hostname (passed in).

SEE ALSO: deliver/mx.py, deliver/client.py, deliver/outcome.py, spool/schedule.py,
dsn/build.py, pipeline.py, app.py
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .. import dsn
from ..clock import Clock
from ..config import DeliveryConfig
from ..dns import Resolver
from ..model import Decision, Envelope, Message, Origin, Pool, Recipient, Source, Status
from ..replies import R451_435_NO_SOURCE, R451_443_SOURCE_DNS_TEMPFAIL, R451_444_NO_SOURCE_FAMILY, R451_LOCAL_ERROR
from ..spool import RecipientState, RecipientUpdate, StoredMessage, StoredRecipient, new_queue_id
from ..spool.store import just_accepted
from ..spool import schedule
from ..trace import EventKind
from . import client, mx, outcome
from .cache import SessionCache
from .client import Connector
from .connection import SmtpConnector
from .outcome import Deferred, Delivered, Failed, Outcome

log = logging.getLogger("poolmta.deliver")

Key = tuple[str, str]                  # (queue id, recipient domain)

# After a failed DSN hand-off, look again this much later (the failure was
# local: the spool or the pipeline; the recipients themselves are final).
DSN_SWEEP_RETRY = 60.0


@dataclass
class _Progress:
    """How far a group got, so an exception handler knows what it may still undo."""
    stored: StoredMessage | None = None
    committed: bool = False


def _family(source: Source) -> int:
    return mx.ip_version(source.address)


def _family_names(families) -> str:
    return " and ".join(f"IPv{f}" for f in sorted(families))


def _family_mismatch(domain: str, answer: mx.MxAnswer, pool: Pool) -> str:
    """Why no source of ``pool`` can reach ``domain``, for the deferral reply."""
    theirs = _family_names(answer.families)
    if domain.startswith("["):
        what = f"the address literal {domain} is {theirs}"
    elif all(t.implicit for t in answer.targets):
        what = f"{domain} (no MX record, so the domain itself) has {theirs} addresses only"
    else:
        what = f"the MX hosts of {domain} have {theirs} addresses only"
    dns_note = f" (DNS: {answer.detail})" if answer.detail else ""     # e.g. the A query failed for now
    return (f"{what} ({answer.describe_targets()}){dns_note}; "
            f"pool {pool.name!r} has {_family_names({_family(s) for s in pool.sources})} sources only")


def wants_failure_dsn(notify: Sequence[str]) -> bool:
    """RFC 3461 §4.1: no NOTIFY means the default (failures are reported)."""
    words = {n.upper() for n in notify}
    if not words:
        return True
    return "FAILURE" in words and "NEVER" not in words


class Scheduler:
    def __init__(self, *, spool, pipeline, resolver: Resolver, pools: Mapping[str, Pool], cfg: DeliveryConfig,
                 trace, clock: Clock, hostname: str, connector: Connector | None = None,
                 rng: random.Random | None = None):
        self.spool, self.pipeline, self.resolver = spool, pipeline, resolver
        self.pools, self.cfg, self.trace, self.clock, self.hostname = dict(pools), cfg, trace, clock, hostname
        self.connector: Connector = connector or SmtpConnector()
        self.sessions = SessionCache(cfg.connection_cache_time, cfg.connection_reuse_limit)
        self.rng = rng or random.Random()
        self._inflight: dict[Key, asyncio.Task] = {}
        self._penalty: dict[Key, float] = {}          # groups whose last error could not even be recorded
        self._next_source: dict[str, int] = {}
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._stopping = False
        self._dsn_sweep_at: float | None = None
        self._backlog = False           # due work may be waiting for a free slot: look when one frees

    # ---- life cycle ----------------------------------------------------------
    async def start(self) -> None:
        """Start the loop; its first act is to make DSNs a crash left unmade."""
        if self._task is not None:
            return
        self._stopping = False
        self._dsn_sweep_at = 0.0
        self._task = asyncio.create_task(self._loop(), name="poolmta-deliver")

    def wake(self) -> None:
        """Look for due work now (cheap, synchronous)."""
        self._wakeup.set()

    def accepted(self, msg: Message, decision: Decision, facts: dict) -> None:
        """A message is durable in the spool (pipeline.accept): start its groups now,
        from memory, with no spool read (Postfix's qmgr also takes new mail from the
        incoming queue at once). A group that cannot start now (no free slot, its
        facts to re-check) is left to the loop, which finds it due in the spool."""
        if self._stopping or self._task is None:
            return
        if decision.recheck:
            self.wake()
            return
        stored = just_accepted(msg, decision, facts)
        groups: dict[str, list[int]] = {}
        for r in stored.recipients:
            if r.state is RecipientState.QUEUED:
                groups.setdefault(r.domain, []).append(r.idx)
        for domain, idxs in groups.items():
            key = (msg.queue_id, domain)
            # While work waits in the spool for a slot, new mail queues behind it (the loop
            # serves due order); otherwise fresh mail would take every slot that frees.
            if (self._backlog or key in self._inflight or key in self._penalty
                    or len(self._inflight) >= self.cfg.concurrency):
                self._backlog = True
                self.wake()
                continue
            self._start(key, idxs, stored)

    def sweep_dsns_soon(self) -> None:
        """Recipients became final outside a delivery (refused at accept): make their DSNs now."""
        self._dsn_sweep_at = 0.0
        self._wakeup.set()

    async def stop(self, grace: float = 10.0) -> None:
        """Stop looking for work; let transactions in flight finish for ``grace``
        seconds, then cancel the rest (their recipients stay due: nothing is lost).
        A cancelled transaction closes its connection without QUIT (client.py),
        so stop() takes about ``grace``, even when an MX never answers."""
        self._stopping = True
        self.wake()
        if self._task is not None:
            await self._task
            self._task = None
        tasks = list(self._inflight.values())
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await self.sessions.close()

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    # ---- the loop -------------------------------------------------------------
    async def _loop(self) -> None:
        while not self._stopping:
            # Cleared before looking, so a wake() during the look is not lost.
            self._wakeup.clear()
            delay = self.cfg.poll_interval
            try:
                if self._dsn_sweep_at is not None and self.clock.now() >= self._dsn_sweep_at:
                    await self._sweep_dsns()
                delay = await self._dispatch()
            except Exception:
                log.exception("delivery loop: a round failed; trying again in %.1fs", delay)
            if self._stopping:
                break
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout=max(0.0, delay))
            except TimeoutError:
                pass

    async def _dispatch(self) -> float:
        """Start tasks for due groups; return how long to sleep."""
        now = self.clock.now()
        self._penalty = {k: until for k, until in self._penalty.items() if until > now}
        free = self.cfg.concurrency - len(self._inflight)
        self._backlog = free <= 0
        if free > 0:
            busy = set(self._inflight) | set(self._penalty)
            due = await self.spool.due(now, free, busy)
            self._backlog = len(due) >= free
            for queue_id, domain, idxs in due:
                key = (queue_id, domain)
                # In flight now: started from memory (accepted) while the spool was read.
                if key in busy or key in self._inflight:
                    continue
                if len(self._inflight) >= self.cfg.concurrency:      # taken by accepted() meanwhile
                    self._backlog = True
                    break
                self._start(key, idxs)
                busy.add(key)
        nxt = await self.spool.next_due_time()
        if nxt is None:
            return self.cfg.poll_interval
        wait = nxt - self.clock.now()
        if wait <= 0:
            # Due but in flight, penalised, or no free slot: a finishing task wakes us.
            return self.cfg.poll_interval
        return min(wait, self.cfg.poll_interval)

    def _start(self, key: Key, idxs: list[int], stored: StoredMessage | None = None) -> None:
        task = asyncio.create_task(self._run_group(key[0], key[1], idxs, stored), name=f"deliver-{key[0]}-{key[1]}")
        self._inflight[key] = task
        task.add_done_callback(lambda t, key=key: self._done(key, t))

    def _done(self, key: Key, task: asyncio.Task) -> None:
        self._inflight.pop(key, None)
        if not task.cancelled() and task.exception() is not None:
            log.error("delivery task %s/%s ended with %r", key[0], key[1], task.exception())
        if self._backlog:
            # Only when work was left waiting for a slot: a look at the spool per
            # finished delivery would cost two reads per message at full speed.
            self.wake()

    # ---- one group ------------------------------------------------------------
    async def _run_group(self, queue_id: str, domain: str, idxs: list[int], stored: StoredMessage | None = None) -> None:
        progress = _Progress()
        try:
            await self._deliver(queue_id, domain, idxs, progress, stored)
        except Exception:
            log.exception("delivery of %s to %s failed locally; deferring", queue_id, domain)
            if not progress.committed:
                await self._defer_after_error(queue_id, domain, idxs, progress.stored)

    async def _deliver(self, queue_id: str, domain: str, idxs: list[int], progress: _Progress,
                       stored: StoredMessage | None = None) -> None:
        from_spool = stored is None
        if from_spool:
            stored = await self.spool.get(queue_id)
        if stored is None:
            return                                   # deleted by the operator meanwhile
        progress.stored = stored
        wanted = set(idxs)
        now = self.clock.now()
        # From the spool: only recipients still due (the due() answer may be older than
        # a deferral another task just committed for them).
        rcpts = [r for r in stored.recipients if r.idx in wanted and not r.state.final
                 and not (from_spool and r.next_attempt > now)]
        if not rcpts:
            return
        msg, decision = stored.message, stored.decision

        if decision.recheck:
            decision, unknown = await self.pipeline.reassess(msg, stored.facts, decision)
            if unknown:
                await self._finish(stored, rcpts, [outcome.of_own(R451_443_SOURCE_DNS_TEMPFAIL)] * len(rcpts),
                                   attempted=False, progress=progress)
                return

        pool = self.pools.get(decision.pool)
        if pool is None or not pool.sources:
            log.error("message %s: pool %r is not configured or has no source", queue_id, decision.pool)
            own = outcome.of_own(R451_435_NO_SOURCE, f"pool {decision.pool!r}")
            await self._finish(stored, rcpts, [own] * len(rcpts), attempted=False, progress=progress)
            return
        answer = await mx.lookup(domain, self.resolver, self.cfg.max_mx_hosts,
                                 prefer=_family(self._peek_source(pool)), rng=self.rng)
        source = self._pick_source(pool, answer.families if answer.ok else None)
        if source is None:
            own = outcome.of_own(R451_444_NO_SOURCE_FAMILY, _family_mismatch(domain, answer, pool))
            log.warning("message %s to %s: %s", queue_id, domain, own.reply)
            await self._finish(stored, rcpts, [own] * len(rcpts), attempted=False, progress=progress)
            return
        if not answer.ok:
            own = outcome.of_own(answer.failure)
            self.trace.record(queue_id, EventKind.ATTEMPT, source=source.address, ehlo=source.ehlo, pool=pool.name,
                              mx="", ip="", tls=False, domain=domain, dns=answer.detail, replies=[own.reply],
                              rcpt=[r.address for r in rcpts])
            await self._finish(stored, rcpts, [own] * len(rcpts), attempted=True, progress=progress)
            return

        envelope_rcpts = [msg.envelope.recipients[r.idx] for r in rcpts]
        transcript = None
        for target in answer.of_family(_family(source))[:max(1, self.cfg.max_mx_hosts)]:
            transcript = await client.transact(
                self.connector, target, source, port=self.cfg.port, envelope=msg.envelope,
                recipients=envelope_rcpts, content=msg.content, connect_timeout=self.cfg.connect_timeout,
                command_timeout=self.cfg.command_timeout, starttls=self.cfg.starttls != "never",
                cache=self.sessions)
            self.trace.record(queue_id, EventKind.ATTEMPT, source=source.address, ehlo=source.ehlo, pool=pool.name,
                              mx=target.host, ip=target.address, tls=transcript.tls, domain=domain,
                              replies=transcript.replies(), rcpt=[r.address for r in rcpts])
            if not outcome.try_next(transcript):
                break
        assert transcript is not None                # the source was picked for a family with targets
        await self._finish(stored, rcpts, outcome.classify(transcript), attempted=True, progress=progress)

    def _peek_source(self, pool: Pool) -> Source:
        """The source the round-robin would give next (without taking it)."""
        return pool.sources[self._next_source.get(pool.name, 0) % len(pool.sources)]

    def _pick_source(self, pool: Pool, families: frozenset[int] | None = None) -> Source | None:
        """Round-robin over the pool's sources, so their reputations share the load.

        With ``families``, the round-robin source if its family is among them,
        else the next source after it that is; None if no source is."""
        i = self._next_source.get(pool.name, 0)
        self._next_source[pool.name] = i + 1
        n = len(pool.sources)
        for k in range(n):
            s = pool.sources[(i + k) % n]
            if families is None or _family(s) in families:
                return s
        return None

    # ---- results ------------------------------------------------------------------
    async def _finish(self, stored: StoredMessage, rcpts: Sequence[StoredRecipient], outcomes: Sequence[Outcome],
                      *, attempted: bool, progress: _Progress) -> None:
        """Plan, commit, trace, notify: in that order, so nothing final is traced before it is durable."""
        msg = stored.message
        now = self.clock.now()
        updates: list[RecipientUpdate] = []
        events: list[tuple[int, EventKind, dict]] = []           # (idx, kind, data)
        failed: list[tuple[StoredRecipient, Status]] = []
        for r, o in zip(rcpts, outcomes, strict=True):
            base = {"rcpt": r.address, "reply": o.reply, "status": o.status, "remote_mta": o.remote_mta}
            if isinstance(o, Delivered):
                updates.append(RecipientUpdate(r.idx, RecipientState.DELIVERED, now, o.reply, o.status, o.remote_mta,
                                               attempted))
                events.append((r.idx, EventKind.DELIVERED, base))
            elif isinstance(o, Failed):
                updates.append(RecipientUpdate(r.idx, RecipientState.BOUNCED, now, o.reply, o.status, o.remote_mta,
                                               attempted))
                events.append((r.idx, EventKind.BOUNCED, base))
                failed.append((r, dsn.status_for(r.address, state="bounced", reply=o.reply, status=o.status,
                                                 remote_mta=o.remote_mta, orcpt=r.orcpt)))
            else:
                plan = schedule.after_deferral(now=now, received_at=msg.received_at,
                                               attempts=r.attempts + (1 if attempted else 0),
                                               schedule=self.cfg.retry_schedule, lifetime=self.cfg.queue_lifetime)
                if isinstance(plan, schedule.Retry):
                    updates.append(RecipientUpdate(r.idx, RecipientState.DEFERRED, plan.at, o.reply, o.status,
                                                   o.remote_mta, attempted))
                    events.append((r.idx, EventKind.DEFERRED, {**base, "next_attempt": plan.at}))
                else:
                    # The last reply stays as the diagnostic; 5.4.7 says why we stopped.
                    st = dsn.status_for(r.address, state="expired", reply=o.reply, status="", remote_mta=o.remote_mta,
                                        orcpt=r.orcpt)
                    updates.append(RecipientUpdate(r.idx, RecipientState.EXPIRED, now, o.reply, st.status,
                                                   o.remote_mta, attempted))
                    events.append((r.idx, EventKind.EXPIRED, {**base, "status": st.status,
                                                              "deadline": plan.deadline}))
                    failed.append((r, st))
        changed = set(await self.spool.update(msg.queue_id, updates, now))
        progress.committed = True
        if len(changed) < len(updates):
            # Final meanwhile (an operator deleted them while we were connected): the
            # ATTEMPT event keeps the remote's words; no state event, no DSN.
            log.info("message %s: result for recipient(s) %s ignored: no longer pending", msg.queue_id,
                     sorted(u.idx for u in updates if u.idx not in changed))
        for idx, kind, data in events:
            if idx in changed:
                self.trace.record(msg.queue_id, kind, **data)
        failed = [(r, st) for r, st in failed if r.idx in changed]
        if failed:
            await self._notify(stored, failed)

    async def _defer_after_error(self, queue_id: str, domain: str, idxs: list[int],
                                 stored: StoredMessage | None) -> None:
        """A local failure: put the group back on the schedule without an attempt."""
        now = self.clock.now()
        attempts = {r.idx: r.attempts for r in stored.recipients} if stored else {}
        addresses = {r.idx: r.address for r in stored.recipients} if stored else {}
        updates = [RecipientUpdate(i, RecipientState.DEFERRED,
                                   now + schedule.retry_delay(attempts.get(i, 1), self.cfg.retry_schedule),
                                   str(R451_LOCAL_ERROR), R451_LOCAL_ERROR.enhanced, "", attempted=False)
                   for i in idxs
                   if stored is None or not any(r.idx == i and r.state.final for r in stored.recipients)]
        try:
            changed = set(await self.spool.update(queue_id, updates, now))
            for u in updates:
                if u.idx not in changed:
                    continue
                self.trace.record(queue_id, EventKind.DEFERRED, rcpt=addresses.get(u.idx, ""), idx=u.idx,
                                  reply=u.reply, status=u.status, next_attempt=u.next_attempt)
        except Exception:
            # Not even that could be written: keep the group out of the loop for a while.
            log.exception("could not defer %s to %s after a local error", queue_id, domain)
            self._penalty[(queue_id, domain)] = now + schedule.retry_delay(1, self.cfg.retry_schedule)

    # ---- delivery status notifications -------------------------------------------
    async def _notify(self, stored: StoredMessage, failed: Sequence[tuple[StoredRecipient, Status]]) -> None:
        """Make the DSN for recipients that just failed, or record why there is none."""
        msg = stored.message
        qid = msg.queue_id
        idxs = [r.idx for r, _ in failed]
        if msg.envelope.mail_from == "":
            # RFC 5321 §4.5.5 / RFC 3464 §2: never a notification about a notification.
            self.trace.record(qid, EventKind.DSN_SUPPRESSED, reason="null-reverse-path",
                              rcpt=[r.address for r, _ in failed])
            await self.spool.mark_dsn_sent(qid, idxs)
            return
        report = [(r, s) for r, s in failed if wants_failure_dsn(r.notify)]
        quiet = [r.address for r, _ in failed if not wants_failure_dsn(r.notify)]
        if quiet:
            self.trace.record(qid, EventKind.DSN_SUPPRESSED, reason="notify", rcpt=quiet)
        if report:
            try:
                dsn_qid = await self._send_dsn(msg, [s for _, s in report])
            except Exception:
                log.exception("could not queue the DSN for %s; will try again", qid)
                self._dsn_sweep_at = self.clock.now() + DSN_SWEEP_RETRY
                # The silent ones are settled; only the reported ones wait for the sweep.
                settled = [r.idx for r, _ in failed if not wants_failure_dsn(r.notify)]
                if settled:
                    await self.spool.mark_dsn_sent(qid, settled)
                return
            self.trace.record(qid, EventKind.DSN_CREATED, dsn_queue_id=dsn_qid, rcpt=[r.address for r, _ in report])
        await self.spool.mark_dsn_sent(qid, idxs)

    async def _send_dsn(self, original: Message, statuses: Sequence[Status]) -> str:
        now = self.clock.now()
        qid = new_queue_id()
        content = dsn.build(original, statuses, hostname=self.hostname, now=now,
                            message_id=f"<{qid}@{self.hostname}>")
        sender = original.envelope.mail_from
        message = Message(
            queue_id=qid,
            envelope=Envelope(mail_from="", recipients=(Recipient(sender),), smtputf8=not sender.isascii()),
            origin=Origin(client_ip="127.0.0.1", kind="dsn", tenant=original.origin.tenant),
            content=content, received_at=now)
        await self.pipeline.accept(message)
        return qid

    async def _sweep_dsns(self) -> None:
        """DSNs that a crash (or a failed hand-off) left unmade; recipients are already final."""
        self._dsn_sweep_at = None
        try:
            await self._sweep_dsns_once()
        except Exception:
            self._dsn_sweep_at = self.clock.now() + DSN_SWEEP_RETRY     # not forgotten: looked at again
            raise

    async def _sweep_dsns_once(self) -> None:
        busy = {qid for qid, _ in self._inflight}
        for qid in await self.spool.undelivered_dsns():
            if qid in busy:
                # A group of this message is running and may be making its own DSN.
                self._dsn_sweep_at = self.clock.now() + DSN_SWEEP_RETRY
                continue
            stored = await self.spool.get(qid)
            if stored is None:
                continue
            failed = [(r, dsn.status_for(r.address, state=r.state.value, reply=r.last_reply, status=r.status,
                                         remote_mta=r.remote_mta, orcpt=r.orcpt))
                      for r in stored.recipients
                      if r.state in (RecipientState.BOUNCED, RecipientState.EXPIRED) and not r.dsn_sent]
            if failed:
                await self._notify(stored, failed)
