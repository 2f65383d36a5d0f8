"""assess.spam - fact: the spam verdict on a message, from the tenant's engine

Finds out whether an outbound message is spam, with the engine its tenant
chose (``tenants.*.spam_engine``; a message without a known tenant gets
"builtin"):

- "spamassassin": spamd over its SPAMC protocol (spam_engines/spamd.py);
- "rspamd": rspamd's HTTP /checkv2 (spam_engines/rspamd.py);
- "builtin": in-process, no daemon: GTUBE and a few signals measured on the
  corpus to hit no ham (spam_engines/builtin.py).

Before any engine: an ``X-Spam-Flag: YES`` header is the verdict when the
message came from a connector configured as trusted (its filter has judged
it already; anyone else could add or strip the header, so from anyone else
it means nothing). That holds whatever the tenant's engine.

The fact records the engine, its score and threshold, a detail for the
trace (the rules or signals that hit) and the seconds the check took. A
check never raises and never blocks mail by itself: an engine that is
down, slow (over spam.timeout) or broken gives ``failed=True, is_spam=False``
with the reason in the detail and the tenant's ``on_engine_failure``
("normal" | "high-risk" | "defer") in ``on_failure``, for route/ to apply
and the trace to record as spam-check-failed.

TRUST: the content is untrusted; verdict headers are believed only from
trusted connectors; an engine's answer is believed (it is ours), but
parsed defensively.

STANDARDS: GTUBE (SpamAssassin's test string); the engines' protocols, see
each of spam_engines/.

CONFIG: tenants.*.spam_engine, tenants.*.on_engine_failure,
tenants.*.connectors.trusted; spam.spamd, spam.rspamd_url, spam.timeout,
spam.max_size.

SEE ALSO: spam_engines/, route/rules.py (rule "spam"), model.SpamFact,
bench/spam_corpus.py (precision, recall and time per engine)
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace

from ..config import SpamConfig
from ..model import Message, SpamFact
from .dsn import headers
from .spam_engines import EngineError, builtin, rspamd, spamd

log = logging.getLogger(__name__)

GTUBE = builtin.GTUBE
ENGINES = ("builtin", "spamassassin", "rspamd")
THREAD_OVER = 64 * 1024     # builtin parses larger messages in a worker thread, not in the event loop


def _tenant_settings(msg: Message, ctx) -> tuple[str, str]:
    """(spam_engine, on_engine_failure) of the message's tenant; builtin/normal when unknown."""
    directory = getattr(ctx, "directory", None)
    lookup = getattr(directory, "tenant", None)
    t = lookup(msg.origin.tenant) if (lookup and msg.origin.tenant) else None
    if t is None:
        return "builtin", "normal"
    return t.spam_engine, t.on_engine_failure


def upstream_verdict(msg: Message) -> SpamFact | None:
    """The trusted connector's own verdict, when it says spam."""
    if not msg.origin.trusted_connector:
        return None
    flag = headers(msg.content).get("X-Spam-Flag", "")
    if str(flag).strip().upper() == "YES":
        return SpamFact(True, "upstream", f"X-Spam-Flag: YES from trusted connector {msg.origin.connector}",
                        score=1.0, threshold=1.0)
    return None


async def _run(engine: str, msg: Message, cfg: SpamConfig) -> SpamFact:
    if engine == "spamassassin":
        return await spamd.check(msg.content, cfg.spamd, timeout=cfg.timeout, max_size=cfg.max_size)
    if engine == "rspamd":
        return await rspamd.check(
            msg.content, cfg.rspamd_url, timeout=cfg.timeout, max_size=cfg.max_size,
            ip=msg.origin.client_ip, helo=msg.origin.helo, mail_from=msg.envelope.mail_from,
            rcpts=[r.address for r in msg.envelope.recipients], queue_id=msg.queue_id, user=msg.origin.auth_user)
    if engine == "builtin":
        if len(msg.content) > THREAD_OVER:
            return await asyncio.to_thread(builtin.check, msg.content, cfg.max_size)
        return builtin.check(msg.content, cfg.max_size)
    raise EngineError(f"unknown spam engine {engine!r}")


async def check(msg: Message, ctx=None) -> SpamFact:
    start = time.monotonic()
    cfg = getattr(ctx, "spam", None) or SpamConfig()
    engine, on_failure = _tenant_settings(msg, ctx)
    fact = upstream_verdict(msg)
    if fact is None:
        try:
            fact = await _run(engine, msg, cfg)
        except EngineError as e:
            why = str(e)
        except Exception as e:                      # a bug here must not stop mail: no verdict, say why
            log.exception("spam check of %s with %s failed", msg.queue_id, engine)
            why = f"{type(e).__name__}: {e}"
        else:
            why = ""
        if why:
            log.warning("spam check of %s with %s failed: %s (on failure: %s)", msg.queue_id, engine, why, on_failure)
            fact = SpamFact(False, engine, why, failed=True)
    return replace(fact, on_failure=on_failure, elapsed=round(time.monotonic() - start, 6))
