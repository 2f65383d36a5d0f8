"""deliver.cache - SMTP sessions kept open between transactions (Postfix's scache)

After a transaction that ended cleanly (the final reply to DATA, no 421, no
broken connection), client.transact gives the session back here instead of
saying QUIT; the next transaction from the same pool source to the same MX
address and port takes it and starts at MAIL FROM, skipping the TCP
handshake, the greeting, EHLO and STARTTLS. RFC 5321 §4.1.4: after the final
reply to DATA a new transaction may begin on the same session.

Rules (as Postfix's smtp_connection_cache_time_limit and
smtp_connection_reuse_time_limit / _count_limit):

- a session waits here at most ``idle`` seconds (then: QUIT and close);
- a session is reused for at most ``max_age`` seconds after it was opened and
  ``max_uses`` transactions, then it is closed after its last one;
- the key is (source address, EHLO name, MX address, port, STARTTLS wanted),
  so a session never carries mail for another pool source: the receiver sees
  each pool's own address and name, exactly as without the cache;
- a server may close an idle session at any time: client.transact notices
  when MAIL fails on a taken session and opens a new connection, so such a
  failure is never reported as the message's;
- ``close()`` (the scheduler stopping) says QUIT to every idle session.

TRUST: the sessions' remote ends; nothing is read from them here.

CONFIG: delivery.connection_cache_time, delivery.connection_reuse_limit

SEE ALSO: deliver/client.py (transact), deliver/scheduler.py
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

Key = tuple[str, str, str, int, bool]          # source address, EHLO name, MX address, port, STARTTLS wanted

MAX_AGE = 300.0                                 # seconds a connection is reused after it was opened


@dataclass
class Idle:
    """An open session between transactions, with what its opening said."""
    session: Any                                # client.Session
    greeting: Any                               # client.SmtpReply
    ehlo: Any
    tls: bool
    tls_note: str
    opened: float
    uses: int = 1                               # transactions done on it so far
    expiry: asyncio.TimerHandle | None = field(default=None, repr=False)


class SessionCache:
    def __init__(self, idle: float = 2.0, max_uses: int = 100, max_age: float = MAX_AGE):
        self.idle, self.max_uses, self.max_age = idle, max_uses, max_age
        self._idle: dict[Key, list[Idle]] = defaultdict(list)
        self._closing: set[asyncio.Task] = set()
        self.reused = 0                          # transactions that started on a taken session

    @property
    def enabled(self) -> bool:
        return self.idle > 0 and self.max_uses > 1

    def take(self, key: Key) -> Idle | None:
        """The most recently parked session for ``key``, if any (LIFO: the others may expire)."""
        stack = self._idle.get(key)
        while stack:
            entry = stack.pop()
            if entry.expiry is not None:
                entry.expiry.cancel()
                entry.expiry = None
            if time.monotonic() - entry.opened < self.max_age:
                if not stack:
                    del self._idle[key]
                self.reused += 1
                return entry
            self._quit(entry)
        self._idle.pop(key, None)
        return None

    def keep(self, key: Key, entry: Idle) -> bool:
        """Park ``entry`` after a clean transaction; False if it may not be reused (the caller says QUIT)."""
        if not self.enabled or entry.uses >= self.max_uses or time.monotonic() - entry.opened >= self.max_age:
            return False
        loop = asyncio.get_running_loop()
        entry.expiry = loop.call_later(self.idle, self._expire, key, entry)
        self._idle[key].append(entry)
        return True

    @property
    def idle_sessions(self) -> int:
        return sum(len(v) for v in self._idle.values())

    def _expire(self, key: Key, entry: Idle) -> None:
        stack = self._idle.get(key)
        if stack and entry in stack:
            stack.remove(entry)
            if not stack:
                del self._idle[key]
            entry.expiry = None
            self._quit(entry)

    def _quit(self, entry: Idle) -> None:
        task = asyncio.get_running_loop().create_task(entry.session.quit())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        """QUIT every parked session (bounded by the client's QUIT timeout)."""
        for stack in list(self._idle.values()):
            for entry in stack:
                if entry.expiry is not None:
                    entry.expiry.cancel()
                self._quit(entry)
        self._idle.clear()
        if self._closing:
            await asyncio.gather(*list(self._closing), return_exceptions=True)
