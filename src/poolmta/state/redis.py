"""state.redis - sender state shared by every node of a cluster, in Redis

The ``SenderState`` for several gateway processes: every node counts into
the same windows and sees the same restrictions and releases. redis-py's
asyncio client; no call blocks the event loop.

Counters are sorted sets, one per key (``PREFIX w:KEY``): score = the
event's timestamp, member = "ts:uuid:amount" (unique even when two events
share a timestamp; the amount rides in the member). ``add`` is one Lua
script, so Redis runs it atomically with respect to every other client: it
prunes the events older than the retention (25 h, the longest window the
limits use; never past ``since``), sums the amounts within ``(since, now]``,
adds the event and returns the sum before it (after = before + amount, or
before when since == now: that window is empty). Of several nodes adding at
once exactly one sees the total cross a limit.

Exact boundaries: the caller's timestamps reach ZRANGEBYSCORE as the strings
Python's repr() gives ("(" for the open end), which Redis parses back bit
for bit; the script compares them as doubles but never formats one into a
string (Lua 5.1 would round it to 14 digits). An event at exactly ``since``
is out, one at exactly ``now`` is in.

Summing every member of a 24 h window would cost O(events): 16 ms of Redis
time per add at 10,000 events, 60 ms at 43,200 (30 messages a minute), with
every node waiting. So a hash ``PREFIX b:KEY`` keeps the sum per hour
("3600:B"), per minute ("60:B") and per second ("1:B"), updated by the same
script that adds and prunes, and a window is summed as whole hours, then
whole minutes at its two ends, then whole seconds of the two partial
minutes, then the members of the two partial seconds: ~0.4 ms whatever the
volume. (Partial minutes were summed member by member until a sender at 150
msg/s made that thousands of members at every add, 17 ms.) A partial minute
is read by its seconds only when they add up to its minute bucket; otherwise
(events counted before the seconds were kept, or by a node of an older
version during a rolling upgrade) by its members, as before: exact either
way, and nothing to convert. The buckets only split where the window covers
them whole, so the boundaries stay as exact as the sorted set.

Restrictions are hashes ``PREFIX r:KIND:SENDER`` (since, until, reason,
tenant), listed in the set ``PREFIX r:index`` so that ``restrictions``
never scans the keyspace; a hash whose restriction ends gets an expiry an
hour after ``until``, and the listing drops index entries whose hash has
expired. ``restrict`` and ``release`` are Lua scripts (check and change in
one step). The latest release is a hash ``PREFIX rel:KIND:SENDER`` (at, by)
that expires a day after the end of its UTC day; the history of releases is
the trace/audit log's business. Every key lives under ``state.key_prefix``;
counter keys expire ``retention`` (or the window, if longer) after their
last event; only the index and restrictions without ``until`` never expire.

Expiries are relative (PEXPIRE, computed from the caller's own clock), so a
test clock that is years off real time cannot make a key vanish early; they
only collect garbage: whether a restriction is in force is decided by
comparing ``until`` with ``now``, exactly (restricted at until-ε, free at
until).

Senders of kind "user" are addresses and are lower-cased on the way in;
connector names are kept as given.

Several keys in one script: fine on one Redis (or Sentinel); on Redis
Cluster the restriction keys would need a common hash tag.

TRUST: keys and senders are our own strings; they are passed as KEYS/ARGV,
never spliced into a script. The Redis server is trusted (it is ours).

STANDARDS: none (Redis EVALSHA, sorted sets: https://redis.io/docs/latest/
develop/interact/programmability/eval-intro/).

CONFIG: state.backend = "redis", state.url, state.key_prefix

SEE ALSO: state/__init__.py (the protocol), state/sqlite.py (one node),
state/open.py (the factory)
"""

from __future__ import annotations

import asyncio

import math
import uuid

import redis.asyncio as aioredis

from . import Release, Restriction, utc_day_start

RETENTION = 25 * 3600.0
GRACE = 3600.0          # restriction hashes outlive their `until` by this much

# Shared by _ADD and _COUNT. KEYS[1] is the window's sorted set, KEYS[2] its
# bucket hash: field "3600:B" holds the sum of the events in [B*3600, (B+1)*3600),
# "60:B" the same per minute, always equal to what the sorted set holds. A bound
# is {v = number, s = string}: `s` is what ZRANGEBYSCORE gets (the caller's repr,
# or "%.17g" of a bucket edge, an integer), so no timestamp is ever rounded.
_WINDOW = """
local SIZES = {3600, 60}                  -- and seconds inside a partial minute: msum

local function bucket(x, size)            -- the largest b with b*size <= x
  local b = math.floor(x / size)
  while b * size > x do b = b - 1 end
  while (b + 1) * size <= x do b = b + 1 end
  return b
end

local function edge(v)
  return {v = v, s = string.format('%.17g', v)}
end

local function field(size, b)
  return size .. ':' .. string.format('%.17g', b)
end

local function zsum(lo, lo_in, hi, hi_in)
  local n = 0
  local ms = redis.call('ZRANGEBYSCORE', KEYS[1], (lo_in and '' or '(') .. lo.s, (hi_in and '' or '(') .. hi.s)
  for i = 1, #ms do
    n = n + tonumber(string.match(ms[i], ':(%d+)$'))
  end
  return n
end

-- The events of [lo, hi] (bounds in or out as flagged), a range inside minute M:
-- its whole seconds from their buckets and the two partial seconds from the sorted
-- set, when the minute's seconds add up to its minute bucket; else (events counted
-- without seconds: before they were kept, or by an older node) its members.
local function msum(m, lo, lo_in, hi, hi_in)
  local fields = {field(60, m)}
  for sec = m * 60, m * 60 + 59 do fields[#fields + 1] = field(1, sec) end
  local vals = redis.call('HMGET', KEYS[2], unpack(fields))
  local secs = 0
  for i = 2, 61 do secs = secs + (tonumber(vals[i]) or 0) end
  if secs ~= (tonumber(vals[1]) or 0) then return zsum(lo, lo_in, hi, hi_in) end
  local first = bucket(lo.v, 1)
  if not (lo_in and first == lo.v) then first = first + 1 end
  local last = bucket(hi.v, 1) - 1
  if first > last then return zsum(lo, lo_in, hi, hi_in) end
  local n = 0
  for sec = first, last do n = n + (tonumber(vals[sec - m * 60 + 2]) or 0) end
  return n + zsum(lo, lo_in, edge(first), false) + zsum(edge(last + 1), true, hi, hi_in)
end

-- A range of at most two partial minutes (what the minute level leaves): by minute.
local function psum(lo, lo_in, hi, hi_in)
  if lo.v > hi.v then return 0 end
  local m1, m2 = bucket(lo.v, 60), bucket(hi.v, 60)
  if m2 == m1 + 1 and hi.v == m2 * 60 and not hi_in then m2 = m1 end     -- ends where m2 starts
  if m1 == m2 then return msum(m1, lo, lo_in, hi, hi_in) end
  if m2 ~= m1 + 1 then return zsum(lo, lo_in, hi, hi_in) end
  local mid = edge(m2 * 60)
  return msum(m1, lo, lo_in, mid, false) + msum(m2, mid, true, hi, hi_in)
end

-- Sum of the events with lo < ts (lo <= ts if lo_in) and ts <= hi (ts < hi if
-- not hi_in): whole buckets of the coarsest size that fit, then the edges on
-- either side one level finer, the last level from the sorted set itself.
local function rsum(level, lo, lo_in, hi, hi_in)
  if lo.v > hi.v then return 0 end
  local size = SIZES[level]
  if not size then return psum(lo, lo_in, hi, hi_in) end
  local first = bucket(lo.v, size)
  if not (lo_in and first * size == lo.v) then first = first + 1 end
  local last = bucket(hi.v, size) - 1
  if first > last then return rsum(level + 1, lo, lo_in, hi, hi_in) end
  local fields = {}
  for b = first, last do fields[#fields + 1] = field(size, b) end
  local n = 0
  for _, x in ipairs(redis.call('HMGET', KEYS[2], unpack(fields))) do
    if x then n = n + tonumber(x) end
  end
  return n + rsum(level + 1, lo, lo_in, edge(first * size), false)
           + rsum(level + 1, edge((last + 1) * size), true, hi, hi_in)
end

-- Sum within (since, now], clamped to the events there are (so that a long
-- window over a short history reads few buckets).
local function window(since_s, now_s)
  local lo, lo_in = {v = tonumber(since_s), s = since_s}, false
  local hi, hi_in = {v = tonumber(now_s), s = now_s}, true
  local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  if #first == 0 then return 0 end
  local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
  local minv, maxv = tonumber(first[2]), tonumber(last[2])
  if minv > lo.v then lo, lo_in = {v = minv, s = first[2]}, true end
  -- Up to the latest event, even past `now`: adds from several nodes (or several
  -- tasks) reach Redis slightly out of timestamp order, and an event another
  -- caller stamped a moment later has happened all the same. Excluding it would
  -- let concurrent senders slip past a limit together.
  hi, hi_in = {v = maxv, s = last[2]}, true
  return rsum(1, lo, lo_in, hi, hi_in)
end

local function credit(ts, amount)
  for _, size in ipairs({3600, 60, 1}) do
    local f = field(size, bucket(ts, size))
    if redis.call('HINCRBY', KEYS[2], f, amount) <= 0 then
      redis.call('HDEL', KEYS[2], f)
    end
  end
end
"""

# KEYS: window, buckets; ARGV: now, since, prune-before, member, amount, ttl-ms.
# Returns the sum within (since, now] before the event.
_ADD = _WINDOW + """
local old = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[3], 'WITHSCORES')
for i = 1, #old, 2 do
  credit(tonumber(old[i + 1]), -tonumber(string.match(old[i], ':(%d+)$')))
end
if #old > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[3])
end
local before = window(ARGV[2], ARGV[1])
local amount = tonumber(ARGV[5])
if amount > 0 then
  redis.call('ZADD', KEYS[1], ARGV[1], ARGV[4])
  credit(tonumber(ARGV[1]), amount)
end
for i = 1, 2 do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    redis.call('PEXPIRE', KEYS[i], ARGV[6])
  end
end
return before
"""

# KEYS: window, buckets; ARGV: now, since
_COUNT = _WINDOW + """
return window(ARGV[2], ARGV[1])
"""

# KEYS[1] restriction hash, KEYS[2] index; ARGV: since, until ('' = none),
# reason, tenant, index member, ttl-ms ('' = none)
_RESTRICT = """
local u = redis.call('HGET', KEYS[1], 'until')
if u then
  if u == '' or tonumber(ARGV[1]) < tonumber(u) then
    return 0
  end
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'since', ARGV[1], 'until', ARGV[2], 'reason', ARGV[3], 'tenant', ARGV[4])
if ARGV[6] ~= '' then
  redis.call('PEXPIRE', KEYS[1], ARGV[6])
end
redis.call('SADD', KEYS[2], ARGV[5])
return 1
"""

# KEYS[1] restriction hash, KEYS[2] index, KEYS[3] release hash;
# ARGV: now, by, index member, release ttl-ms
_RELEASE = """
local u = redis.call('HGET', KEYS[1], 'until')
if not u then
  return 0
end
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[3])
if u ~= '' and tonumber(ARGV[1]) >= tonumber(u) then
  return 0
end
redis.call('DEL', KEYS[3])
redis.call('HSET', KEYS[3], 'at', ARGV[1], 'by', ARGV[2])
redis.call('PEXPIRE', KEYS[3], ARGV[4])
return 1
"""

# KEYS[1] index; ARGV[1] restriction key prefix. Returns [member, hgetall, ...];
# drops index members whose hash has expired, in the same step (a node that
# restricts the sender again meanwhile cannot lose its index entry).
_LIST = """
local out = {}
for _, m in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local h = redis.call('HGETALL', ARGV[1] .. m)
  if #h == 0 then
    redis.call('SREM', KEYS[1], m)
  else
    table.insert(out, m)
    table.insert(out, h)
  end
end
return out
"""


def norm_sender(kind: str, sender: str) -> str:
    """Addresses compare case-insensitively; connector names as given."""
    return sender.lower() if kind == "user" else sender


def _f(x: float) -> str:
    """A float as Redis reads it back bit for bit (repr is the shortest exact form)."""
    return repr(float(x))


def _ms(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


def _s(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v


class RedisState:
    """The SenderState protocol on a Redis server shared by every node."""

    def __init__(self, url: str = "redis://127.0.0.1:6379/0", key_prefix: str = "poolmta:",
                 retention: float = RETENTION, client: aioredis.Redis | None = None):
        # Timeouts so that a Redis that hangs cannot hold an SMTP session forever;
        # options in the URL (?socket_timeout=…) take precedence.
        self._r = client or aioredis.from_url(url, socket_connect_timeout=5, socket_timeout=5)
        self.url = url
        self.prefix = key_prefix
        self.retention = float(retention)
        self._add = self._r.register_script(_ADD)
        self._count = self._r.register_script(_COUNT)
        self._restrict = self._r.register_script(_RESTRICT)
        self._release = self._r.register_script(_RELEASE)
        self._list = self._r.register_script(_LIST)

    # -- key layout ------------------------------------------------------
    def _wkey(self, key: str) -> str:
        return f"{self.prefix}w:{key}"

    def _bkey(self, key: str) -> str:
        return f"{self.prefix}b:{key}"

    def _rkey(self, kind: str, sender: str) -> str:
        return f"{self.prefix}r:{kind}:{sender}"

    def _relkey(self, kind: str, sender: str) -> str:
        return f"{self.prefix}rel:{kind}:{sender}"

    @property
    def _index(self) -> str:
        return f"{self.prefix}r:index"

    # -- counters --------------------------------------------------------
    async def add(self, key: str, amount: int, now: float, since: float) -> tuple[int, int]:
        if amount < 0:
            raise ValueError(f"amount must not be negative: {amount}")
        amount = int(amount)
        now, since = float(now), float(since)
        prune_before = min(since, now - self.retention)
        ttl = _ms(max(self.retention, now - since))
        member = f"{_f(now)}:{uuid.uuid4().hex}:{amount}"
        before = int(await self._add(keys=[self._wkey(key), self._bkey(key)],
                                     args=[_f(now), _f(since), _f(prune_before), member, amount, ttl]))
        # The new event is at NOW: inside (since, now] unless the window is empty.
        return before, before + amount if since < now else before

    async def add_many(self, items: list[tuple[str, int, float]], now: float) -> list[tuple[int, int]]:
        """Several adds at NOW, sent together (each one its own atomic script)."""
        return list(await asyncio.gather(*(self.add(k, a, now, s) for k, a, s in items)))

    async def count(self, key: str, now: float, since: float) -> int:
        return int(await self._count(keys=[self._wkey(key), self._bkey(key)], args=[_f(now), _f(since)]))

    # -- restrictions ----------------------------------------------------
    async def restrict(self, r: Restriction) -> bool:
        if r.until is not None and r.until <= r.since:
            raise ValueError(f"restriction of {r.sender} ends ({r.until}) before it starts ({r.since})")
        sender = norm_sender(r.kind, r.sender)
        ttl = "" if r.until is None else _ms(r.until - r.since + GRACE)
        done = await self._restrict(
            keys=[self._rkey(r.kind, sender), self._index],
            args=[_f(r.since), "" if r.until is None else _f(r.until), r.reason, r.tenant, f"{r.kind}:{sender}", ttl])
        return bool(done)

    async def restriction(self, kind: str, sender: str, now: float) -> Restriction | None:
        sender = norm_sender(kind, sender)
        h = await self._r.hgetall(self._rkey(kind, sender))
        r = self._restriction(kind, sender, h)
        return r if r is not None and (r.until is None or now < r.until) else None

    @staticmethod
    def _restriction(kind: str, sender: str, h: dict) -> Restriction | None:
        h = {_s(k): _s(v) for k, v in h.items()}
        if "since" not in h:
            return None
        until = h.get("until", "")
        return Restriction(kind, sender, float(h["since"]), float(until) if until else None,
                           h.get("reason", ""), h.get("tenant", ""))

    async def release(self, kind: str, sender: str, now: float, by: str) -> bool:
        sender = norm_sender(kind, sender)
        ttl = _ms(utc_day_start(now) + 2 * 86400.0 - now)
        done = await self._release(keys=[self._rkey(kind, sender), self._index, self._relkey(kind, sender)],
                                   args=[_f(now), by, f"{kind}:{sender}", ttl])
        return bool(done)

    async def last_release(self, kind: str, sender: str) -> Release | None:
        """The latest release of the sender (who and when), while its record lasts."""
        sender = norm_sender(kind, sender)
        h = {_s(k): _s(v) for k, v in (await self._r.hgetall(self._relkey(kind, sender))).items()}
        if "at" not in h:
            return None
        return Release(kind, sender, float(h["at"]), h.get("by", ""))

    async def released_on_day(self, kind: str, sender: str, now: float) -> bool:
        rel = await self.last_release(kind, sender)
        return rel is not None and utc_day_start(rel.at) == utc_day_start(now)

    async def restrictions(self, now: float) -> list[Restriction]:
        flat = await self._list(keys=[self._index], args=[f"{self.prefix}r:"])
        out = []
        for i in range(0, len(flat) - 1, 2):
            kind, _, sender = _s(flat[i]).partition(":")
            h = flat[i + 1]
            r = self._restriction(kind, sender, dict(zip(h[::2], h[1::2])))
            if r is not None and (r.until is None or now < r.until):
                out.append(r)
        return sorted(out, key=lambda r: (r.since, r.kind, r.sender))

    async def ping(self) -> None:
        """Raise (redis.ConnectionError) if the server cannot be reached."""
        await self._r.ping()

    async def close(self) -> None:
        await self._r.aclose()
