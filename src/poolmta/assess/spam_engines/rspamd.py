"""assess.spam_engines.rspamd - an rspamd verdict over its HTTP /checkv2 protocol

One HTTP/1.1 request per message on plain asyncio streams (no HTTP library:
the exchange is one POST and one JSON answer): ``POST /checkv2`` with the
message as the body, ``Content-Length``, ``Connection: close``, and rspamd's
envelope headers, so that it judges the message as an MTA would have it
judge it: ``IP`` (the client), ``Helo``, ``From`` (envelope sender),
``Rcpt`` (one per recipient), ``Queue-Id``, and ``User`` (the SMTP AUTH
login: rspamd treats authenticated mail as outbound and skips the checks
that only make sense for inbound mail). The answer is JSON with ``action``,
``score``, ``required_score`` and ``symbols``.

Verdict: spam when rspamd's action is "reject", "add header" or "rewrite
subject" (the actions that mean "this is spam" in rspamd's own metric);
"no action", "greylist" and "soft reject" (a temporary refusal, e.g. a rate
limit) are not spam. The fact's score is rspamd's score; its threshold is
rspamd's ``required_score`` (the reject score: the add-header score is not in
the answer), so the detail names the action that decided.

A message larger than spam.max_size is sent truncated to max_size bytes (at
a line end). Every failure raises EngineError: refused, reset, timeout (the
whole exchange), an HTTP status other than 200, a body that is not the
expected JSON, an answer larger than MAX_ANSWER.

TRUST: rspamd is ours; its answer is parsed defensively (bounded size,
json.loads, only the fields we use). Envelope values are client input: CR,
LF and other control characters are removed before they become HTTP headers
(no header injection).

STANDARDS: rspamd's protocol documentation (/checkv2, request headers, the
JSON reply); RFC 9112 (HTTP/1.1 message framing: Content-Length, chunked).

CONFIG: spam.rspamd_url ("http://host:port", optionally with a path prefix,
or https://), spam.timeout, spam.max_size.

SEE ALSO: assess/spam.py, tests/integration/test_spam_engines.py,
bench/spam_corpus.py
"""

from __future__ import annotations

import asyncio
import json
import re
import ssl
from urllib.parse import urlsplit

from ...model import SpamFact
from . import EngineError, truncate, why

MAX_ANSWER = 1024 * 1024           # symbols with options can be long, but not this long
SPAM_ACTIONS = frozenset({"reject", "add header", "rewrite subject"})
_CTL = re.compile(r"[\x00-\x1f\x7f]")


def _clean(value: str) -> str:
    return _CTL.sub("", value)[:998]


def _target(url: str) -> tuple[str, int, bool, str, str]:
    """(host, port, tls, path of /checkv2, Host header) of the configured URL."""
    u = urlsplit(url.strip())
    if u.scheme not in ("http", "https") or not u.hostname:
        raise EngineError(f"bad rspamd URL {url!r} (http://host:port)")
    tls = u.scheme == "https"
    try:
        port = u.port or (443 if tls else 80)
    except ValueError:
        raise EngineError(f"bad rspamd URL {url!r}") from None
    path = u.path.rstrip("/") + "/checkv2"
    return u.hostname, port, tls, path, u.netloc.rpartition("@")[2]


def build_request(data: bytes, path: str, host: str, *, ip: str = "", helo: str = "", mail_from: str | None = None,
                  rcpts: tuple[str, ...] | list[str] = (), queue_id: str = "", user: str = "") -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(data)}", "Connection: close",
             "User-Agent: poolmta"]
    if ip:
        lines.append(f"IP: {_clean(ip)}")
    if helo:
        lines.append(f"Helo: {_clean(helo)}")
    if mail_from is not None:
        lines.append(f"From: <{_clean(mail_from)}>")
    for r in list(rcpts)[:1024]:
        lines.append(f"Rcpt: <{_clean(r)}>")
    if queue_id:
        lines.append(f"Queue-Id: {_clean(queue_id)}")
    if user:
        lines.append(f"User: {_clean(user)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8") + data


async def _read_answer(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    status_line = await reader.readline()
    m = re.match(rb"HTTP/1\.[01] (\d{3})", status_line)
    if not m:
        raise EngineError(f"not an HTTP answer: {status_line[:80]!r}")
    status = int(m.group(1))
    headers: dict[str, str] = {}
    while True:
        line = await reader.readline()
        if not line:
            raise EngineError("rspamd closed the connection in the HTTP header")
        if line in (b"\r\n", b"\n"):
            break
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
        if len(headers) > 100:
            raise EngineError("too many HTTP header fields in rspamd's answer")
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = b""
        while True:
            size_line = await reader.readline()
            try:
                size = int(size_line.split(b";")[0].strip(), 16)
            except ValueError:
                raise EngineError(f"bad chunk size {size_line[:40]!r}") from None
            if size == 0:
                break
            if len(body) + size > MAX_ANSWER:
                raise EngineError(f"rspamd answer longer than {MAX_ANSWER} bytes")
            body += await reader.readexactly(size)
            await reader.readline()
        return status, body
    if "content-length" in headers:
        try:
            n = int(headers["content-length"])
        except ValueError:
            raise EngineError("bad Content-Length in rspamd's answer") from None
        if not 0 <= n <= MAX_ANSWER:
            raise EngineError(f"rspamd answer of {n} bytes (at most {MAX_ANSWER})")
        return status, await reader.readexactly(n)
    chunks, size = [], 0                                # Connection: close framing
    while chunk := await reader.read(65536):
        size += len(chunk)
        if size > MAX_ANSWER:
            raise EngineError(f"rspamd answer longer than {MAX_ANSWER} bytes")
        chunks.append(chunk)
    return status, b"".join(chunks)


async def _exchange(url: str, data: bytes, envelope: dict) -> tuple[int, bytes]:
    host, port, tls, path, host_header = _target(url)
    reader, writer = await asyncio.open_connection(
        host, port, ssl=ssl.create_default_context() if tls else None, server_hostname=host if tls else None)
    try:
        writer.write(build_request(data, path, host_header, **envelope))
        await writer.drain()
        return await _read_answer(reader)
    finally:
        writer.close()


def _weight(symbol) -> float:
    try:
        return abs(float(symbol.get("score", 0) or 0)) if isinstance(symbol, dict) else 0.0
    except (TypeError, ValueError):
        return 0.0


def parse_reply(status: int, body: bytes) -> SpamFact:
    try:
        reply = json.loads(body.decode("utf-8", "replace")) if body else {}
    except ValueError:
        reply = None
    if status != 200:
        err = reply.get("error", "") if isinstance(reply, dict) else ""
        raise EngineError(f"rspamd HTTP {status}" + (f": {str(err)[:200]}" if err else ""))
    if not isinstance(reply, dict) or not isinstance(reply.get("action"), str):
        raise EngineError(f"rspamd answer without an action: {body[:120]!r}")
    action = reply["action"]
    try:
        score = float(reply.get("score", 0.0))
        threshold = float(reply.get("required_score", 0.0))
    except (TypeError, ValueError):
        raise EngineError("rspamd answer with a score that is not a number") from None
    symbols = reply.get("symbols") if isinstance(reply.get("symbols"), dict) else {}
    top = sorted(((_weight(v), str(k)) for k, v in symbols.items()), reverse=True)
    names = ",".join(name for _, name in top[:20])
    detail = f"rspamd {action} {score:g}/{threshold:g}" + (f": {names}" if names else "")
    return SpamFact(action in SPAM_ACTIONS, "rspamd", detail, score=score, threshold=threshold)


async def check(content: bytes, url: str, *, timeout: float = 10.0, max_size: int = 512 * 1024,
                ip: str = "", helo: str = "", mail_from: str | None = None, rcpts=(), queue_id: str = "",
                user: str = "") -> SpamFact:
    """rspamd's verdict on ``content``; EngineError when there is none."""
    data = truncate(content, max_size)
    envelope = dict(ip=ip, helo=helo, mail_from=mail_from, rcpts=tuple(rcpts), queue_id=queue_id, user=user)
    try:
        status, body = await asyncio.wait_for(_exchange(url, data, envelope), timeout)
    except EngineError:
        raise
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
            ValueError, ssl.SSLError) as e:
        raise EngineError(f"rspamd {url}: {why(e)}") from None
    fact = parse_reply(status, body)
    if len(data) < len(content):
        fact = SpamFact(fact.is_spam, fact.engine, fact.detail + f" (first {len(data)} of {len(content)} bytes)",
                        score=fact.score, threshold=fact.threshold)
    return fact


async def ping(url: str, timeout: float = 2.0) -> bool:
    """Does rspamd answer GET /ping with pong?"""
    try:
        host, port, tls, path, host_header = _target(url)
        ping_path = path[: -len("/checkv2")] + "/ping"

        async def go():
            reader, writer = await asyncio.open_connection(
                host, port, ssl=ssl.create_default_context() if tls else None)
            try:
                writer.write(f"GET {ping_path} HTTP/1.1\r\nHost: {host_header}\r\nConnection: close\r\n\r\n".encode())
                await writer.drain()
                return await _read_answer(reader)
            finally:
                writer.close()
        status, body = await asyncio.wait_for(go(), timeout)
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, EngineError, ValueError):
        return False
    return status == 200 and b"pong" in body
