"""route - decide the delivery pool of a message from its facts (pure, no I/O)."""

from .decide import Policy, route

__all__ = ["Policy", "route"]
