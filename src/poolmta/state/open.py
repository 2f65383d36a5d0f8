"""state.open - the sender state the configuration asks for

``open_state(cfg)`` returns the ``SenderState`` of ``[state]``: SQLite at
DATA_DIR/state.db (backend = "sqlite", the default, one node) or Redis at
``state.url`` with every key under ``state.key_prefix`` (backend = "redis",
every node of a cluster). Opening does not reach Redis (the client connects
on first use); call ``ping()`` on the result to fail early when it is down.

TRUST: the configuration is operator input, already validated by
config.check (backend, URL scheme).

STANDARDS: none.

CONFIG: state.backend, state.url, state.key_prefix, server.data_dir

SEE ALSO: state/__init__.py, state/sqlite.py, state/redis.py
"""

from __future__ import annotations

from pathlib import Path

from ..config import Config
from . import SenderState


def prepare_state(cfg: Config) -> None:
    """Create the state's file before worker processes open it (master.py); Redis needs nothing."""
    if cfg.state.backend == "sqlite":
        from .sqlite import prepare
        prepare(Path(cfg.server.data_dir) / "state.db")


def open_state(cfg: Config) -> SenderState:
    backend = cfg.state.backend
    if backend == "sqlite":
        from .sqlite import SQLiteState
        return SQLiteState(Path(cfg.server.data_dir) / "state.db")
    if backend == "redis":
        from .redis import RedisState
        return RedisState(cfg.state.url, cfg.state.key_prefix)
    raise ValueError(f"state.backend must be \"sqlite\" or \"redis\", not {backend!r}")
