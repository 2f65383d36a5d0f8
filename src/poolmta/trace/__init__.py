"""trace - the append-only event timeline of every message."""

from .events import Event, EventKind
from .recorder import Recorder

__all__ = ["Event", "EventKind", "Recorder"]
