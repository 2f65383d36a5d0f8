"""assess.spam_engines - the spam verdict engines behind assess/spam.py

One module per engine, each with ``async def check(content, …) -> SpamFact``:

- ``builtin``: in-process, no daemon: GTUBE and a few cheap signals that
  were measured on the corpus (bench/spam_corpus.py);
- ``spamd``: SpamAssassin's spamd over its own protocol (SPAMC/1.5);
- ``rspamd``: rspamd's HTTP ``/checkv2``.

An engine that cannot give a verdict (refused, reset, timed out, answered
something it should not have) raises ``EngineError`` with the reason; the
caller (assess/spam.py) turns that into a failed fact. ``truncate()`` is the
one way all of them cut an oversized message.

TRUST: the message content is untrusted; so is what a daemon answers, as
far as parsing goes (bounded sizes, no eval).

STANDARDS: see each engine.

CONFIG: spam.timeout, spam.max_size (read by assess/spam.py and passed in).

SEE ALSO: assess/spam.py, bench/spam_corpus.py
"""

from __future__ import annotations


class EngineError(Exception):
    """The engine gave no verdict; the message says why (for the trace)."""


def truncate(content: bytes, max_size: int) -> bytes:
    """The first ``max_size`` bytes of ``content``, cut after the last complete line
    when there is one (a half line can confuse a parser; a missing tail cannot).
    ``max_size`` <= 0 means no limit."""
    if max_size <= 0 or len(content) <= max_size:
        return content
    head = content[:max_size]
    nl = head.rfind(b"\n")
    return head[:nl + 1] if nl > 0 else head


def why(e: BaseException) -> str:
    """A short reason for a failed exchange with an engine, for the trace."""
    import asyncio
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, (asyncio.TimeoutError, TimeoutError)):
        return "timed out"
    if isinstance(e, asyncio.IncompleteReadError):
        return "connection closed in the middle of the answer"
    return f"{type(e).__name__}: {e}".rstrip(": ")
