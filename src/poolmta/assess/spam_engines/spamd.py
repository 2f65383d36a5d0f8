"""assess.spam_engines.spamd - a SpamAssassin verdict from spamd, over the SPAMC/1.5 protocol

A small asyncio client, one connection per message (spamd closes it after
each answer; so does spamc): ``SYMBOLS SPAMC/1.5``, ``Content-length``, an
optional ``User``, a blank line, the message; spamd answers
``SPAMD/1.1 0 EX_OK``, a ``Spam: True ; 15.0 / 5.0`` header (verdict, score,
required score) and, for SYMBOLS, the comma-separated names of the rules that
hit, which go into the fact's detail for the trace. ``ping()`` is
``PING SPAMC/1.5`` -> ``SPAMD/1.5 0 PONG``.

A message larger than spam.max_size is sent truncated to its first max_size
bytes (at a line end). spamc -s instead skips such a message, which lets a
spammer pad past the limit; a truncated check still sees the headers and the
start of the body, where spam shows.

Every failure raises EngineError with the reason: connection refused or
reset, a timeout (the whole exchange, connect included, is bounded by
``timeout``), a non-zero spamd status (``SPAMD/1.0 76 Bad header line``), an
answer without a Spam header, or an answer larger than MAX_ANSWER.

TRUST: spamd is ours (configured by the administrator); its answer is still
parsed defensively (bounded, no more than the fields we use). The message is
the client's.

STANDARDS: SpamAssassin's spamc/PROTOCOL (SPAMC/1.5: CHECK, SYMBOLS, PING;
the Spam, Content-length and User headers; EX_* status codes from sysexits.h).

CONFIG: spam.spamd ("host:port", "[v6]:port", or "unix:/path" / "/path" for
a Unix socket), spam.timeout, spam.max_size.

SEE ALSO: assess/spam.py, tests/integration/test_spam_engines.py (a real
spamd on loopback), bench/spam_corpus.py
"""

from __future__ import annotations

import asyncio
import re

from ...model import SpamFact
from . import EngineError, truncate, why

DEFAULT_PORT = 783
MAX_ANSWER = 256 * 1024            # a SYMBOLS answer is a few hundred bytes
_SPAM = re.compile(r"^\s*(true|false|yes|no)\s*;\s*(-?\d+(?:\.\d+)?)\s*/\s*(-?\d+(?:\.\d+)?)\s*$", re.I)
_STATUS = re.compile(rb"^SPAMD/(\d+\.\d+)\s+(\d+)\s*(.*?)\r?$")


def parse_address(address: str) -> tuple[str, int] | str:
    """"host:port", "[::1]:783", "host" (port 783) -> (host, port); "unix:/p" or "/p" -> "/p"."""
    a = address.strip()
    if a.startswith("unix:"):
        return a[5:]
    if a.startswith("/"):
        return a
    if a.startswith("["):
        host, _, rest = a[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif a.count(":") == 1:
        host, _, port = a.partition(":")
    else:
        host, port = a, ""
    if not host:
        raise EngineError(f"bad spamd address {address!r}")
    try:
        p = int(port) if port else DEFAULT_PORT
    except ValueError:
        raise EngineError(f"bad spamd address {address!r}") from None
    if not 0 < p < 65536:
        raise EngineError(f"bad spamd address {address!r}")
    return host, p


async def _open(address: str):
    where = parse_address(address)
    if isinstance(where, str):
        return await asyncio.open_unix_connection(where)
    return await asyncio.open_connection(*where)


async def _exchange(address: str, request: bytes) -> bytes:
    reader, writer = await _open(address)
    try:
        writer.write(request)
        await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()          # as spamc does: nothing more comes from us
        chunks, size = [], 0
        while True:
            chunk = await reader.read(65536)
            if not chunk:
                return b"".join(chunks)
            size += len(chunk)
            if size > MAX_ANSWER:
                raise EngineError(f"spamd answer longer than {MAX_ANSWER} bytes")
            chunks.append(chunk)
    finally:
        writer.close()


def parse_answer(answer: bytes) -> tuple[dict[str, str], bytes]:
    """(headers by lower-case name, body) of a spamd answer; EngineError when it is not one."""
    head, sep, body = answer.partition(b"\r\n\r\n")
    if not sep:
        head, sep, body = answer.partition(b"\n\n")
    lines = head.splitlines()
    if not lines:
        raise EngineError("spamd closed the connection without an answer")
    m = _STATUS.match(lines[0])
    if not m:
        raise EngineError(f"not a spamd answer: {lines[0][:80]!r}")
    if m.group(2) != b"0":
        raise EngineError(f"spamd error {m.group(2).decode()} {m.group(3).decode('utf-8', 'replace')}".strip())
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.decode("utf-8", "replace").partition(":")
        if colon:
            headers[name.strip().lower()] = value.strip()
    return headers, body


async def check(content: bytes, address: str, *, timeout: float = 10.0, max_size: int = 512 * 1024,
                user: str = "") -> SpamFact:
    """spamd's verdict on ``content``; EngineError when there is none."""
    data = truncate(content, max_size)
    head = f"SYMBOLS SPAMC/1.5\r\nContent-length: {len(data)}\r\n"
    if user:
        head += f"User: {re.sub(r'[^!-~]', '_', user)[:64]}\r\n"
    try:
        answer = await asyncio.wait_for(_exchange(address, head.encode() + b"\r\n" + data), timeout)
    except EngineError:
        raise
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, EOFError) as e:
        raise EngineError(f"spamd {address}: {why(e)}") from None
    headers, body = parse_answer(answer)
    m = _SPAM.match(headers.get("spam", ""))
    if not m:
        raise EngineError(f"spamd answer has no Spam header: {answer[:120]!r}")
    is_spam = m.group(1).lower() in ("true", "yes")
    score, threshold = float(m.group(2)), float(m.group(3))
    symbols = body.decode("utf-8", "replace").strip()
    detail = f"spamd {score:g}/{threshold:g}"
    if symbols:
        detail += ": " + (symbols if len(symbols) <= 300 else symbols[:300] + "…")
    if len(data) < len(content):
        detail += f" (first {len(data)} of {len(content)} bytes)"
    return SpamFact(is_spam, "spamassassin", detail, score=score, threshold=threshold)


async def ping(address: str, timeout: float = 2.0) -> bool:
    """Does spamd answer PING with PONG?"""
    try:
        answer = await asyncio.wait_for(_exchange(address, b"PING SPAMC/1.5\r\n\r\n"), timeout)
    except (OSError, asyncio.TimeoutError, EngineError):
        return False
    return answer.startswith(b"SPAMD/") and b"PONG" in answer.split(b"\n", 1)[0]
