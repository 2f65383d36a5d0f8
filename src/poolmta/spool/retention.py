"""spool.retention - forget finished messages once the history retention has passed

Every finished message leaves its envelope, its recipients' results and its
trace in the spool (the body goes when it is finished), so that ``poolmta
trace`` and ``queue show`` can tell its story. Kept for ever, that history
would grow the spool file by a few KB per message without bound (at 600
msg/s, gigabytes an hour). ``purge_history`` runs in one worker (the first:
one purger is enough, and two would only contend for the write lock): every
PURGE_EVERY seconds it asks the spool to purge what was received more than
``server.history_retention`` ago, a batch at a time, yielding between
batches so that accepting and delivering mail go on. SQLite reuses the freed
pages: the file stops growing; it does not shrink (VACUUM would lock it).

CONFIG: server.history_retention (0: keep for ever, no purging)

SEE ALSO: spool/sqlite.py (purge), app.py (starts it)
"""

from __future__ import annotations

import asyncio
import logging

from ..clock import Clock
from .store import Spool

PURGE_EVERY = 60.0          # seconds between two purges
BATCH = 500                 # messages per transaction
MAX_BATCHES = 200           # per purge: 100 000 messages a minute, far above any sending rate

log = logging.getLogger("poolmta.spool")


async def purge_once(spool: Spool, clock: Clock, retention: float) -> int:
    """Purge in batches until nothing old is left (or MAX_BATCHES); return how many went."""
    before, total = clock.now() - retention, 0
    for _ in range(MAX_BATCHES):
        n = await spool.purge(before, BATCH)
        total += n
        if n < BATCH:
            break
        await asyncio.sleep(0)              # let sessions and deliveries run between batches
    if total:
        log.info("purged the history of %d finished messages received before %.0f", total, before)
    return total


async def purge_history(spool: Spool, clock: Clock, retention: float, every: float = PURGE_EVERY) -> None:
    """Purge now and then every EVERY seconds, until cancelled; never raises otherwise."""
    while True:
        try:
            await purge_once(spool, clock, retention)
        except Exception:
            log.exception("purging the spool's history failed; trying again in %.0fs", every)
        await asyncio.sleep(every)
