"""deliver.client + deliver.outcome: transactions against a function-made server, and their verdicts.

The server is a plain function from a command line to a reply (FunctionConnector),
so every stage can refuse or break without a socket; outcome.classify must then
give each recipient the fate Postfix's smtp_trouble.c would.
"""

import pytest

from poolmta import replies
from poolmta.deliver.client import FunctionConnector, SmtpReply, Stage, Transcript, transact, xtext
from poolmta.deliver.mx import Target
from poolmta.deliver.outcome import (Deferred, Delivered, Failed, classify, enhanced_status, of_own, of_reply,
                                     try_next)
from poolmta.model import Envelope, Recipient, Source

SOURCE = Source("192.0.2.2", "out1.gw.test")
MX1 = Target("mx1.dest.test", "192.0.2.20", 10)
MX2 = Target("mx2.dest.test", "192.0.2.21", 20)
CONTENT = b"From: a@sender.test\r\nSubject: t\r\n\r\nbody\r\n"
EHLO = "250-mx.dest.test\n250-SIZE 1000000\n250-8BITMIME\n250 DSN"


def server(**over):
    """A well-behaved server; ``over`` maps a command prefix to a reply or an exception."""
    def handler(target, command):
        for prefix, reply in over.items():
            if command.startswith(prefix.replace("_", " ")):
                if isinstance(reply, BaseException):
                    raise reply
                return reply(command) if callable(reply) else reply
        if command == "CONNECT":
            return "220 mx.dest.test ESMTP"
        if command.startswith("EHLO"):
            return EHLO
        if command.startswith("RCPT TO:<reject"):
            return "550 5.1.1 <reject@dest.test>: Recipient address rejected: User unknown"
        if command.startswith("RCPT TO:<later"):
            return "451 4.2.0 greylisted"
        if command == "DATA":
            return "354 go ahead"
        if command == "QUIT":
            return "221 bye"
        return "250 2.0.0 OK"
    return handler


async def run(conn, rcpts=("ok@dest.test",), *, mail_from="alice@sender.test", target=MX1, starttls=True, **env):
    envelope = Envelope(mail_from, tuple(Recipient(r) if isinstance(r, str) else r for r in rcpts), **env)
    return await transact(conn, target, SOURCE, port=2525, envelope=envelope, recipients=envelope.recipients,
                          content=CONTENT, connect_timeout=5, command_timeout=5, starttls=starttls)


# ---- the client reports --------------------------------------------------------

async def test_happy_path_sends_ehlo_of_the_source_and_null_sender():
    conn = FunctionConnector(server())
    t = await run(conn, mail_from="")
    cmds = [c for _, c in conn.log]
    assert cmds[:3] == ["CONNECT", "EHLO out1.gw.test", "MAIL FROM:<> SIZE=%d" % len(CONTENT)]
    assert cmds[-3:] == ["DATA", ".", "QUIT"]
    assert conn.content == [CONTENT]
    assert t.error is None and t.data == SmtpReply(250, "2.0.0 OK")
    assert classify(t) == [Delivered("250 2.0.0 OK", "2.0.0", "mx1.dest.test")]


async def test_dsn_parameters_are_passed_on_when_the_server_speaks_dsn():
    conn = FunctionConnector(server())
    rc = Recipient("ok@dest.test", notify=("FAILURE", "DELAY"), orcpt="rfc822;Ok+x@dest.test")
    await run(conn, [rc], ret="HDRS", envid="id=1 2", body="8BITMIME")
    mail = next(c for _, c in conn.log if c.startswith("MAIL"))
    rcpt = next(c for _, c in conn.log if c.startswith("RCPT"))
    assert mail == f"MAIL FROM:<alice@sender.test> SIZE={len(CONTENT)} BODY=8BITMIME RET=HDRS ENVID=id+3D1+202"
    assert rcpt == "RCPT TO:<ok@dest.test> NOTIFY=FAILURE,DELAY ORCPT=rfc822;Ok+2Bx@dest.test"


async def test_no_esmtp_parameters_when_not_advertised():
    conn = FunctionConnector(server(EHLO="250 mx.dest.test"))
    await run(conn, [Recipient("ok@dest.test", notify=("NEVER",))], ret="FULL")
    assert ("192.0.2.20", "MAIL FROM:<alice@sender.test>") in conn.log
    assert ("192.0.2.20", "RCPT TO:<ok@dest.test>") in conn.log


async def test_xtext():
    assert xtext("a+b=c d") == "a+2Bb+3Dc+20d"
    assert xtext("é") == "+C3+A9"


async def test_starttls_when_offered_then_ehlo_again():
    conn = FunctionConnector(server(EHLO="250-mx\n250 STARTTLS", STARTTLS="220 ready"))
    t = await run(conn)
    cmds = [c for _, c in conn.log]
    assert cmds[:4] == ["CONNECT", "EHLO out1.gw.test", "STARTTLS", "EHLO out1.gw.test"]
    assert t.tls is True


async def test_starttls_never_is_respected():
    conn = FunctionConnector(server(EHLO="250-mx\n250 STARTTLS", STARTTLS="220 ready"))
    t = await run(conn, starttls=False)
    assert "STARTTLS" not in [c for _, c in conn.log] and t.tls is False


async def test_starttls_refused_continues_in_plaintext():
    conn = FunctionConnector(server(EHLO="250-mx\n250 STARTTLS", STARTTLS="454 4.7.0 TLS not available"))
    t = await run(conn)
    assert t.tls is False and "454" in t.tls_note
    assert classify(t)[0].__class__ is Delivered


async def test_tls_handshake_failure_retries_once_without_tls():
    conn = FunctionConnector(server(EHLO="250-mx\n250 STARTTLS", STARTTLS=ConnectionResetError("handshake")))
    t = await run(conn)
    cmds = [c for _, c in conn.log]
    assert cmds.count("CONNECT") == 2 and cmds.count("STARTTLS") == 1
    assert t.tls is False and "retried without TLS" in t.tls_note
    assert isinstance(classify(t)[0], Delivered)


async def test_ehlo_refused_falls_back_to_helo():
    conn = FunctionConnector(server(EHLO="502 5.5.2 what?", HELO="250 hi"))
    t = await run(conn)
    assert ("192.0.2.20", "HELO out1.gw.test") in conn.log
    assert isinstance(classify(t)[0], Delivered)


async def test_no_data_when_no_recipient_was_accepted():
    conn = FunctionConnector(server())
    t = await run(conn, ["reject@dest.test", "later@dest.test"])
    assert "DATA" not in [c for _, c in conn.log]
    assert t.data is None


# ---- the verdicts ----------------------------------------------------------------

async def test_per_recipient_replies_are_kept_verbatim():
    conn = FunctionConnector(server())
    t = await run(conn, ["ok@dest.test", "reject@dest.test", "later@dest.test"])
    ok, rej, later = classify(t)
    assert ok == Delivered("250 2.0.0 OK", "2.0.0", "mx1.dest.test")
    assert rej == Failed("550 5.1.1 <reject@dest.test>: Recipient address rejected: User unknown", "5.1.1",
                         "mx1.dest.test")
    assert later == Deferred("451 4.2.0 greylisted", "4.2.0", "mx1.dest.test")
    assert not try_next(t)


@pytest.mark.parametrize("stage, reply", [("CONNECT", "554 5.3.2 go away"), ("EHLO", "550 5.7.1 no"),
                                          ("MAIL", "553 5.1.8 bad sender")])
async def test_5xx_at_session_stage_fails_every_recipient(stage, reply):
    conn = FunctionConnector(server(**{stage: reply}) if stage != "EHLO" else server(EHLO=reply, HELO=reply))
    t = await run(conn, ["a@dest.test", "b@dest.test"])
    out = classify(t)
    assert out == [Failed(reply, reply.split()[1], "mx1.dest.test")] * 2
    assert not try_next(t)          # a verdict, not a reason to ask a backup MX


@pytest.mark.parametrize("stage", ["CONNECT", "MAIL"])
async def test_4xx_at_session_stage_defers_all_and_allows_the_next_mx(stage):
    conn = FunctionConnector(server(**{stage: "421 4.3.2 busy"}))
    t = await run(conn, ["a@dest.test", "b@dest.test"])
    assert classify(t) == [Deferred("421 4.3.2 busy", "4.3.2", "mx1.dest.test")] * 2
    assert try_next(t)


async def test_connection_refused_is_deferred_441_refused_by_host_with_where():
    conn = FunctionConnector(server(CONNECT=ConnectionRefusedError(111, "Connection refused")))
    t = await run(conn)
    [o] = classify(t)
    assert isinstance(o, Deferred) and o.status == "4.4.1" and o.remote_mta == ""
    assert o.reply.startswith("451 4.4.1 Connection refused by host: connect to mx1.dest.test[192.0.2.20]:2525")
    assert "No answer" not in o.reply
    assert try_next(t)
    assert t.error_stage == Stage.CONNECT


async def test_connect_timeout_is_no_answer_441():
    conn = FunctionConnector(server(CONNECT=TimeoutError("timed out")))
    [o] = classify(await run(conn))
    assert o.status == "4.4.1" and o.reply.startswith(str(replies.R451_441_NO_ANSWER) + ": connect to mx1.dest.test")


async def test_a_source_address_that_cannot_be_bound_is_a_local_problem_440():
    import errno
    from poolmta.deliver.client import SourceBindError
    err = SourceBindError("192.0.2.2", OSError(errno.EADDRNOTAVAIL, "Cannot assign requested address"))
    conn = FunctionConnector(server(CONNECT=err))
    t = await run(conn)
    [o] = classify(t)
    assert isinstance(o, Deferred) and o.status == "4.4.0" and o.remote_mta == ""
    assert o.reply.startswith("451 4.4.0 Cannot bind pool source address 192.0.2.2 (not an address of this host?)")
    assert "mx1.dest.test" not in o.reply and "No answer" not in o.reply     # the remote is not to blame
    assert not try_next(t)                        # the next MX would fail the same way


async def test_timeout_before_rcpt_defers_all():
    conn = FunctionConnector(server(MAIL=TimeoutError("timed out")))
    t = await run(conn, ["a@dest.test", "b@dest.test"])
    out = classify(t)
    assert all(isinstance(o, Deferred) and o.status == "4.4.2" for o in out)
    assert "mail with mx1.dest.test" in out[0].reply
    assert try_next(t)


async def test_drop_during_rcpt_keeps_earlier_verdicts_and_defers_the_rest():
    def rcpt(cmd):
        if "third" in cmd:
            raise ConnectionResetError("reset by peer")
        return "250 2.1.5 ok"
    conn = FunctionConnector(server(RCPT=lambda c: "550 5.1.1 no" if "first" in c else rcpt(c)))
    t = await run(conn, ["first@dest.test", "second@dest.test", "third@dest.test", "fourth@dest.test"])
    first, second, third, fourth = classify(t)
    assert isinstance(first, Failed) and first.reply == "550 5.1.1 no"
    assert isinstance(second, Deferred) and second.status == "4.4.2"     # accepted, but no DATA happened
    assert isinstance(third, Deferred) and isinstance(fourth, Deferred)
    assert not try_next(t)


@pytest.mark.parametrize("final, kind, status", [("250 2.0.0 queued", Delivered, "2.0.0"),
                                                 ("452 4.3.1 disk full", Deferred, "4.3.1"),
                                                 ("554 5.6.0 content rejected", Failed, "5.6.0")])
async def test_data_reply_applies_to_the_accepted_recipients_only(final, kind, status):
    conn = FunctionConnector(server(**{".": final}))
    t = await run(conn, ["ok@dest.test", "reject@dest.test", "also@dest.test"])
    ok, rej, also = classify(t)
    assert ok == also == kind(final, status, "mx1.dest.test")
    assert isinstance(rej, Failed) and rej.status == "5.1.1"


async def test_data_command_refused():
    conn = FunctionConnector(server(DATA="554 5.5.1 no valid recipients"))
    t = await run(conn)
    assert classify(t) == [Failed("554 5.5.1 no valid recipients", "5.5.1", "mx1.dest.test")]


async def test_drop_after_data_is_deferred_never_delivered():
    conn = FunctionConnector(server(**{".": ConnectionResetError("gone")}))
    t = await run(conn, ["ok@dest.test", "reject@dest.test"])
    ok, rej = classify(t)
    assert isinstance(ok, Deferred) and ok.status == "4.4.2" and "data with" in ok.reply
    assert isinstance(rej, Failed)


def test_enhanced_status_derivation():
    assert enhanced_status(550, "5.1.1 no") == "5.1.1"
    assert enhanced_status(550, "no such user") == "5.0.0"
    assert enhanced_status(451, "greylisted") == "4.0.0"
    assert enhanced_status(550, "4.1.1 contradiction") == "5.1.1"     # the reply code decides the class
    assert enhanced_status(250, "2.0.0 ok") == "2.0.0"
    assert enhanced_status(550, "5.1.10 null mx") == "5.1.10"


def test_unexpected_codes_are_temporary_protocol_trouble():
    o = of_reply(SmtpReply(354, "go on"), "mx")
    assert isinstance(o, Deferred) and o.status == "4.5.0" and "354 go on" in o.reply


def test_own_replies():
    assert of_own(replies.R550_5110_NULL_MX) == Failed(str(replies.R550_5110_NULL_MX), "5.1.10", "")
    assert of_own(replies.R451_443_DNS_TEMPFAIL, "SERVFAIL") == Deferred(
        str(replies.R451_443_DNS_TEMPFAIL) + ": SERVFAIL", "4.4.3", "")


def test_replies_are_flattened_and_bounded():
    r = SmtpReply.parse("550-5.1.1 first line\r\n550 5.1.1 second\x07line")
    assert r.code == 550 and r.text == "5.1.1 first line 5.1.1 second?line"
    long = SmtpReply.parse("550 " + "x" * 5000)
    assert len(long.text) <= 512


def test_transcript_replies_for_the_trace():
    t = Transcript(MX1, SOURCE, 25, ("a@x",), greeting=SmtpReply(220, "hi"), ehlo=SmtpReply(250, "mx"),
                   mail=SmtpReply(250, "ok"), rcpt=[SmtpReply(550, "5.1.1 no")])
    assert t.replies() == ["connect: 220 hi", "ehlo: 250 mx", "mail: 250 ok", "rcpt <a@x>: 550 5.1.1 no"]


# ---- the goodbye -----------------------------------------------------------------

async def test_quit_after_a_clean_session_even_a_refused_one():
    conn = FunctionConnector(server(MAIL="553 5.1.8 bad sender"))
    await run(conn)
    assert [c for _, c in conn.log][-1] == "QUIT"


async def test_no_quit_after_a_broken_session_the_connection_is_just_closed():
    conn = FunctionConnector(server(RCPT=TimeoutError("timed out")))
    t = await run(conn)
    assert t.error_stage == Stage.RCPT
    assert "QUIT" not in [c for _, c in conn.log]
    assert conn.closed == ["192.0.2.20"]


async def test_no_quit_when_the_transaction_is_cancelled():
    import asyncio
    entered = asyncio.Event()

    class Stalling(FunctionConnector):
        async def connect(self, target, port, source, **kw):
            session, greeting = await super().connect(target, port, source, **kw)
            real_rcpt = session.rcpt

            async def rcpt(*a):
                entered.set()
                await asyncio.sleep(3600)         # a tarpit: RCPT is never answered
                return await real_rcpt(*a)
            session.rcpt = rcpt
            return session, greeting

    conn = Stalling(server())
    task = asyncio.create_task(run(conn))
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert "QUIT" not in [c for _, c in conn.log] and conn.closed == ["192.0.2.20"]
