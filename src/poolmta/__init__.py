"""poolmta: an outbound mail gateway that routes every message through the
delivery pool it deserves (normal, high-risk, relay)."""

__version__ = "0.1.0"
