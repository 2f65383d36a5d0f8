"""deliver.outcome - the one place that decides what a reply or an error means

Everything that can end a delivery attempt comes here to be judged: a
``Transcript`` from client.py (replies and the exception that broke the
session, with its stage), or one of our own replies (a DNS outcome from
mx.py, a local problem). Each recipient gets one ``Outcome``:

- ``Delivered``  2xx to DATA for a recipient whose RCPT was accepted
- ``Deferred``   4xx, or the connection failed / timed out / TLS broke:
                 try again later (the scheduler applies the retry schedule)
- ``Failed``     5xx: bounce now (the scheduler makes the DSN)

Scope, in the manner of Postfix's smtp_trouble.c:

- session scope: a reply at the greeting, EHLO/HELO or MAIL, or an exception
  before any RCPT was answered, applies to every recipient of the
  transaction (smtp_site_fail / smtp_sess_fail);
- recipient scope: each RCPT reply applies to its own recipient
  (smtp_rcpt_fail);
- message scope: the DATA reply, or an exception after some RCPTs were
  accepted, applies to the accepted recipients only (smtp_mesg_fail); the
  ones already refused keep their own RCPT reply.

Every outcome keeps the reply verbatim ("550 5.1.1 <x@y>: Recipient address
rejected") with its enhanced status code and the remote MTA's name, so the
spool, the trace and the DSN all show the receiver's own words. When the
reply has no enhanced code, X.0.0 of its class is used; when its enhanced
code contradicts the reply code (550 4.1.1), the reply code wins and the
class digit is corrected (Postfix's dsn_valid() does the same).

A broken conversation is named for where it broke and whose fault it is:

- the pool source address could not be bound (client.SourceBindError, e.g.
  EADDRNOTAVAIL: the address is not on this host) is LOCAL:
  R451_440_LOCAL_BIND "451 4.4.0 Cannot bind pool source address 192.0.2.77
  (not an address of this host?): …"; no remote host is named or blamed;
- the connection refused (ECONNREFUSED): R451_441_CONN_REFUSED
  "451 4.4.1 Connection refused by host: connect to mx[ip]:port: …";
- no connection or no greeting in time: R451_441_NO_ANSWER (4.4.1);
- STARTTLS broke: R451_475_TLS_FAILED (4.7.5);
- anything later: R451_442_CONN_DROPPED (4.4.2), naming the stage.

``try_next(transcript)`` says when the next MX address may be tried in the
same attempt: the session failed or was refused with 4xx before any RCPT
was answered. A 5xx at the greeting, EHLO or MAIL is a verdict, not a reason
to ask a backup MX; a source that cannot be bound would fail for every MX.

TRUST: remote replies are untrusted; client.py has already flattened and cut
them; here only their first digits and enhanced code are interpreted.

STANDARDS: RFC 5321 §4.2.1 (reply code classes), §4.5.4.1 (retry),
RFC 3463 (enhanced status codes, 4.4.0, 4.4.1, 4.4.2, 4.7.5, 4.5.0),
RFC 2034 (ENHANCEDSTATUSCODES in replies).

SEE ALSO: deliver/client.py, deliver/scheduler.py, spool/schedule.py, replies.py
"""

from __future__ import annotations

import errno
import re
from dataclasses import dataclass

from ..replies import (R451_440_LOCAL_BIND, R451_441_CONN_REFUSED, R451_441_NO_ANSWER, R451_442_CONN_DROPPED,
                       R451_450_PROTOCOL, R451_475_TLS_FAILED, Reply)
from .client import SmtpReply, SourceBindError, Stage, Transcript, describe


@dataclass(frozen=True)
class Delivered:
    reply: str
    status: str
    remote_mta: str = ""


@dataclass(frozen=True)
class Deferred:
    reply: str
    status: str
    remote_mta: str = ""


@dataclass(frozen=True)
class Failed:
    reply: str
    status: str
    remote_mta: str = ""


Outcome = Delivered | Deferred | Failed

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?=\s|$)")


def enhanced_status(code: int, text: str) -> str:
    """The RFC 3463 code of a reply, its class made to agree with the reply code."""
    cls = str(code)[0] if 200 <= code < 600 else "4"
    m = _ENHANCED.match(text.strip())
    if m:
        return f"{cls}.{m.group(2)}.{m.group(3)}"
    return f"{cls}.0.0"


def of_reply(reply: SmtpReply, remote_mta: str) -> Outcome:
    """What one remote reply means for the recipients it applies to."""
    if 200 <= reply.code < 300:
        return Delivered(str(reply), enhanced_status(reply.code, reply.text), remote_mta)
    if 500 <= reply.code < 600:
        return Failed(str(reply), enhanced_status(reply.code, reply.text), remote_mta)
    if 400 <= reply.code < 500:
        return Deferred(str(reply), enhanced_status(reply.code, reply.text), remote_mta)
    # 1xx/3xx where none belongs, or garbage: the server is confused; try later.
    ours = R451_450_PROTOCOL
    return Deferred(f"{ours}: {reply}", ours.enhanced, remote_mta)


def of_own(reply: Reply, detail: str = "") -> Outcome:
    """What one of our own replies (DNS outcome, local trouble) means; no remote MTA."""
    text = f"{reply}: {detail}" if detail else str(reply)
    if reply.permanent:
        return Failed(text, reply.enhanced)
    if reply.transient:
        return Deferred(text, reply.enhanced)
    return Delivered(text, reply.enhanced)


def _in_chain(exc: BaseException | None, match) -> BaseException | None:
    """The first exception in ``exc``'s cause/context chain for which ``match`` is true."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if match(exc):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def bind_failure(exc: BaseException | None) -> SourceBindError | None:
    """The SourceBindError behind ``exc``, if the pool source could not be bound."""
    found = _in_chain(exc, lambda e: isinstance(e, SourceBindError))
    return found if isinstance(found, SourceBindError) else None


def _refused(exc: BaseException) -> bool:
    return _in_chain(exc, lambda e: isinstance(e, ConnectionRefusedError)
                     or (isinstance(e, OSError) and e.errno == errno.ECONNREFUSED)) is not None


_BIND_HINTS = {errno.EADDRNOTAVAIL: "not an address of this host?",
               errno.EADDRINUSE: "address in use", errno.EACCES: "permission denied"}


def of_error(stage: Stage, exc: BaseException, t: Transcript) -> Deferred:
    """A broken conversation is always temporary; the reply says where and how it broke."""
    bind = bind_failure(exc)
    if bind is not None:
        # Local: nothing was sent anywhere, so no remote host is named.
        hint = _BIND_HINTS.get(bind.errno or 0)
        head = f"{R451_440_LOCAL_BIND} {bind.address}" + (f" ({hint})" if hint else "")
        return Deferred(f"{head}: {describe(bind.cause)}", R451_440_LOCAL_BIND.enhanced)
    where = f"{t.target.host}[{t.target.address}]:{t.port}"
    if stage == Stage.CONNECT and t.greeting is None:
        ours = R451_441_CONN_REFUSED if _refused(exc) else R451_441_NO_ANSWER
        what = f"connect to {where}"
    elif stage == Stage.STARTTLS:
        ours, what = R451_475_TLS_FAILED, f"STARTTLS with {where}"
    else:
        ours, what = R451_442_CONN_DROPPED, f"{stage} with {where}"
    return Deferred(f"{ours}: {what}: {describe(exc)}", ours.enhanced)


def _session_refusal(t: Transcript) -> SmtpReply | None:
    """The first non-2xx reply at session scope (greeting, EHLO/HELO, MAIL), if any."""
    for r in (t.greeting, t.ehlo, t.mail):
        if r is not None and not 200 <= r.code < 300:
            return r
    return None


def classify(t: Transcript) -> list[Outcome]:
    """One outcome per recipient of the transcript, in its order."""
    n = len(t.recipients)
    host = t.target.host
    refusal = _session_refusal(t)
    if refusal is not None:
        return [of_reply(refusal, host)] * n
    answered = any(r is not None for r in t.rcpt)
    if t.error is not None and not answered:
        return [of_error(t.error_stage or Stage.CONNECT, t.error, t)] * n
    if t.mail is None and t.error is None:
        # Nothing was said and nothing broke: a transcript of a session that never ran.
        return [of_own(R451_450_PROTOCOL, "no SMTP transaction took place")] * n

    out: list[Outcome] = []
    for r in t.rcpt:
        if r is None:
            # Never asked: the session broke before this RCPT.
            out.append(of_error(t.error_stage or Stage.RCPT, t.error, t) if t.error is not None
                       else of_own(R451_450_PROTOCOL, "recipient was not sent"))
        elif not 200 <= r.code < 300:
            out.append(of_reply(r, host))
        elif t.data is not None:
            out.append(of_reply(t.data, host))
        elif t.error is not None:
            out.append(of_error(t.error_stage or Stage.DATA, t.error, t))
        else:
            out.append(of_own(R451_450_PROTOCOL, "accepted recipient but no DATA"))
    return out


def try_next(t: Transcript) -> bool:
    """May the next MX address be tried in this attempt? Only if nothing was decided yet."""
    if any(r is not None for r in t.rcpt):
        return False
    if bind_failure(t.error) is not None:
        return False             # the same source would fail to bind for every MX
    if t.error is not None:
        return True
    refusal = _session_refusal(t)
    return refusal is not None and not 500 <= refusal.code < 600

