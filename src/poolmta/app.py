"""app - the composition root: build every stage from config and wire them in pipeline order

Nothing else constructs services; settings and services are passed down
explicitly (no process-wide singletons), so a test can run two gateways in
one process.

CONFIG: all sections.

SEE ALSO: pipeline.py, cli.py (serve)
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal

from .assess import Context
from .clock import Clock, SystemClock
from .config import Config
from .dns import make_resolver
from .pipeline import Pipeline
from .rewrite import Rewriter
from .rewrite.srs import SRS
from .assess.limits import Limits
from .route import Policy
from .state.open import open_state
from .spool.sqlite import SQLiteSpool
from .tenancy import Directory
from .trace import Recorder

GC_YOUNG_THRESHOLD = 10_000     # allocations between young collections (CPython default: 700)

log = logging.getLogger("poolmta")


class Gateway:
    def __init__(self, cfg: Config, clock: Clock | None = None, resolver=None, connector=None, *,
                 worker: int = 0, workers: int = 1):
        """``worker`` of ``workers``: which of the processes sharing the spool this is (master.py)."""
        from .deliver.scheduler import Scheduler
        from .ingress.server import IngressServer

        self.cfg = cfg
        self.clock = clock or SystemClock()
        self.resolver = resolver or make_resolver(cfg.dns.nameservers, cfg.dns.timeout, cfg.dns.cache_ttl_max,
                                                  self.clock)
        self.directory = Directory(cfg)
        self.spool = SQLiteSpool(cfg.server.data_dir, shard=worker, shards=workers)
        self.trace = Recorder(self.clock, self.spool)
        self.srs = SRS.from_config(cfg.srs, self.clock) if cfg.srs.domain else None
        self.state = open_state(cfg)
        self.limits = Limits(self.state, cfg, self.directory, self.clock)
        self.pipeline = Pipeline(Context(self.resolver, self.directory, cfg.auth, cfg.server.hostname, cfg.spam,
                                         self.limits),
                                 Policy(cfg.pool_for_role()), self.spool,
                                 self.trace, self.clock, cfg.server.hostname,
                                 rewriter=Rewriter(cfg, self.directory, self.clock, self.srs),
                                 admins={n: t.admins for n, t in cfg.tenants.items()})
        self.scheduler = Scheduler(spool=self.spool, pipeline=self.pipeline, resolver=self.resolver,
                                   pools=cfg.pool_objects(), cfg=cfg.delivery, trace=self.trace, clock=self.clock,
                                   hostname=cfg.server.hostname, connector=connector)
        self.pipeline.on_queued = self.scheduler.accepted
        self.pipeline.on_refused = self.scheduler.sweep_dsns_soon
        self.ingress = IngressServer(cfg, self.directory, self.pipeline, self.clock, self.srs, self.limits,
                                     reuse_port=workers > 1)
        self.worker = worker
        self._purger: asyncio.Task | None = None

    async def start(self) -> None:
        if hasattr(self.state, "ping"):
            await self.state.ping()          # fail at start-up, not at the first message, when Redis is down
        await self.scheduler.start()
        await self.ingress.start()
        if self.worker == 0 and self.cfg.server.history_retention > 0:
            from .spool.retention import purge_history
            self._purger = asyncio.create_task(purge_history(self.spool, self.clock,
                                                             self.cfg.server.history_retention),
                                               name="poolmta-purge")
        log.info("poolmta listening on %s (port %s), pools: %s", self.cfg.server.listen, self.ingress.port,
                 ", ".join(f"{n}({p.role})={','.join(s.address for s in p.sources)}"
                           for n, p in self.cfg.pool_objects().items()))

    async def stop(self) -> None:
        if self._purger is not None:
            self._purger.cancel()
            await asyncio.gather(self._purger, return_exceptions=True)
        await self.ingress.stop()
        await self.scheduler.stop()
        self.trace.flush()
        await self.spool.close()
        await self.state.close()


def settle_memory() -> None:
    """Once started: move every object made so far (modules, config, the directory)
    out of the collector's reach, and collect the young generation less often. A full
    collection otherwise walks those ~10^5 long-lived objects again and again, each
    time holding up every session of the process."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, 20, 20)


async def serve(cfg: Config, ready=None, *, worker: int = 0, workers: int = 1) -> None:
    """Run a gateway until SIGTERM/SIGINT (one worker of ``workers``: master.py)."""
    gw = Gateway(cfg, worker=worker, workers=workers)
    await gw.start()
    settle_memory()
    if ready:
        ready(gw)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down")
    await gw.stop()
