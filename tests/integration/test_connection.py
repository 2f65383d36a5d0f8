"""deliver.connection over real loopback sockets: PIPELINING, reply parsing, transparency, timeouts.

The server here is a script on an asyncio server socket, so a test can say
exactly when and how replies arrive. A pipelining server of this kind reads
the whole group (MAIL, RCPT..., DATA) before it answers anything: a client
that waited for each reply would hang on it, so these tests fail without
pipelining. Other delivery behaviour (TLS, refusals, 421, kept sessions)
runs through the same connector in test_deliver.py and the e2e tests, against
aiosmtpd sinks (which do not offer PIPELINING: the sequential path).
"""

from __future__ import annotations

import asyncio

import pytest

from poolmta.deliver import SmtpConnector, client, outcome
from poolmta.deliver.connection import MAX_LINE, ProtocolError, stuff
from poolmta.deliver.mx import Target
from poolmta.model import Envelope, Recipient, Source

SOURCE = Source("127.0.0.2", "out1.gw.test")


class Script:
    """A pipelining SMTP server. ``answer(lines)`` gets the group's command lines and
    returns the replies (one bytes blob: the test decides how they are split)."""

    def __init__(self, answer, ehlo=b"250-mx.test\r\n250-PIPELINING\r\n250-SIZE 1000000\r\n250 8BITMIME\r\n",
                 split_replies=False):
        self.answer, self.ehlo, self.split = answer, ehlo, split_replies
        self.groups: list[list[bytes]] = []
        self.contents: list[bytes] = []
        self.quit = 0
        self.server = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(b"220 mx.test ESMTP\r\n")
            assert (await reader.readline()).startswith(b"EHLO out1.gw.test")
            writer.write(self.ehlo)
            while True:
                group = []
                while True:                         # nothing is answered before the group's DATA
                    line = await reader.readline()
                    if not line:
                        return
                    if line == b"QUIT\r\n":
                        self.quit += 1
                        writer.write(b"221 2.0.0 bye\r\n")
                        await writer.drain()
                        return
                    group.append(line)
                    if line == b"DATA\r\n":
                        break
                self.groups.append(group)
                replies = self.answer(group)
                if self.split:                      # byte by byte: replies cut anywhere
                    for i in range(len(replies)):
                        writer.write(replies[i:i + 1])
                        await writer.drain()
                else:
                    writer.write(replies)
                if replies.rstrip().endswith(b"354 go ahead"):
                    content = b""
                    while (line := await reader.readline()) not in (b".\r\n", b""):
                        content += line
                    self.contents.append(content + line)
                    writer.write(b"250 2.0.0 queued as X\r\n")
        finally:
            writer.close()

    async def __aenter__(self):
        self.server = await asyncio.start_server(self.handle, "127.0.0.20", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc):
        self.server.close()
        await self.server.wait_closed()


def env(*rcpts: str) -> Envelope:
    return Envelope("alice@sender.test", tuple(Recipient(r) for r in rcpts))


async def run(script: Script, e: Envelope, content: bytes = b"Subject: x\r\n\r\nbody\r\n", timeout: float = 5):
    return await client.transact(SmtpConnector(), Target("mx.test", "127.0.0.20"), SOURCE, port=script.port,
                                 envelope=e, recipients=e.recipients, content=content,
                                 connect_timeout=timeout, command_timeout=timeout)


def ok_all(group: list[bytes]) -> bytes:
    out = b"250 2.1.0 ok\r\n"
    for line in group[1:-1]:
        out += b"550 5.1.1 no such user\r\n" if b"nobody@" in line else b"250 2.1.5 ok\r\n"
    return out + b"354 go ahead\r\n"


@pytest.mark.parametrize("split", [False, True], ids=["one-segment", "byte-by-byte"])
async def test_mail_rcpts_and_data_go_as_one_group(split):
    async with Script(ok_all, split_replies=split) as s:
        t = await run(s, env("bob@dest.test", "nobody@dest.test", "carol@dest.test"))
    assert t.error is None, t.error
    [group] = s.groups
    assert group == [b"MAIL FROM:<alice@sender.test> SIZE=20\r\n", b"RCPT TO:<bob@dest.test>\r\n",
                     b"RCPT TO:<nobody@dest.test>\r\n", b"RCPT TO:<carol@dest.test>\r\n", b"DATA\r\n"]
    assert [r.code for r in t.rcpt] == [250, 550, 250] and t.data.code == 250
    assert [o.status for o in outcome.classify(t)] == ["2.0.0", "5.1.1", "2.0.0"]
    assert s.contents == [b"Subject: x\r\n\r\nbody\r\n.\r\n"] and s.quit == 1


async def test_content_is_made_transparent_and_line_ends_repaired():
    content = b".starts with a dot\r\n..two\r\nbare\nlf and bare\rcr\r\n.\r\nend\r\n"
    async with Script(ok_all) as s:
        t = await run(s, env("bob@dest.test"), content)
    assert t.data.code == 250
    assert s.contents == [b"..starts with a dot\r\n...two\r\nbare\r\nlf and bare\r\ncr\r\n..\r\nend\r\n.\r\n"]
    assert stuff(b"a\r\n") == b"a\r\n.\r\n"


async def test_a_refused_mail_reads_every_reply_and_counts_no_rcpt():
    def refuse(group):
        return b"550 5.7.1 sender refused\r\n" + b"503 5.5.1 need MAIL\r\n" * (len(group) - 2) + \
            b"503 5.5.1 need RCPT\r\n"
    async with Script(refuse) as s:
        t = await run(s, env("bob@dest.test", "carol@dest.test"))
    assert t.error is None and t.mail.code == 550 and t.rcpt == [None, None] and t.data is None
    assert [o.status for o in outcome.classify(t)] == ["5.7.1", "5.7.1"]
    assert s.quit == 1                              # replies all read: QUIT got its own answer


async def test_data_accepted_with_no_recipient_is_ended_empty():
    """RFC 2920 §3.1: a server may answer 354 to DATA although every RCPT failed."""
    def none_ok(group):
        return b"250 ok\r\n" + b"550 5.1.1 no\r\n" * (len(group) - 2) + b"354 go ahead\r\n"
    async with Script(none_ok) as s:
        t = await run(s, env("nobody@dest.test"))
    assert t.error is None and t.data is None and [r.code for r in t.rcpt] == [550]
    assert s.contents == [b".\r\n"]                  # the empty message, no content sent
    assert [o.status for o in outcome.classify(t)] == ["5.1.1"]


async def test_multiline_replies_and_the_ehlo_keywords():
    seen = {}

    def answer(group):
        return b"250-ok\r\n250-still ok\r\n250 2.1.0 ok\r\n250 2.1.5 ok\r\n354 go ahead\r\n"
    async with Script(answer, ehlo=b"250-mx.test greets you\r\n250-PIPELINING\r\n250-DSN\r\n"
                                   b"250-SIZE 10\r\n250 SMTPUTF8\r\n") as s:
        conn, greeting = await SmtpConnector().connect(Target("mx.test", "127.0.0.20"), s.port, SOURCE,
                                                       connect_timeout=5, command_timeout=5)
        assert str(greeting) == "220 mx.test ESMTP"
        r = await conn.ehlo()
        seen.update(conn.extensions)
        e = env("bob@dest.test")
        t = client.Transcript(Target("mx.test", "127.0.0.20"), SOURCE, s.port, ("bob@dest.test",))
        await client._transaction(conn, t, e, e.recipients, b"x\r\n")
        await conn.quit()
    assert r.code == 250 and seen == {"pipelining": "", "dsn": "", "size": "10", "smtputf8": ""}
    assert t.mail.text == "ok still ok 2.1.0 ok" and t.data.code == 250
    assert s.groups[0][0] == b"MAIL FROM:<alice@sender.test> SIZE=3\r\n"


async def test_no_reply_to_the_group_times_out_at_mail():
    async with Script(lambda group: b"") as s:
        t = await run(s, env("bob@dest.test"), timeout=0.5)
    assert isinstance(t.error, TimeoutError) and t.error_stage == client.Stage.MAIL
    assert "no reply to MAIL FROM within 0.5s" in str(t.error)
    assert outcome.classify(t)[0].status.startswith("4.")


async def test_garbage_or_an_endless_line_breaks_the_connection():
    for junk in (b"hello there\r\n", b"2" * (MAX_LINE + 10)):
        async with Script(lambda group, junk=junk: junk) as s:
            t = await run(s, env("bob@dest.test"))
        assert isinstance(t.error, ProtocolError) and t.error_stage == client.Stage.MAIL, t.error
        assert outcome.classify(t)[0].status.startswith("4.")


async def test_a_server_that_closes_mid_group_is_an_error_at_that_stage():
    async with Script(lambda group: b"250 ok\r\n") as s:     # then EOF: the handler returns on readline

        async def close_after(reader, writer):
            writer.write(b"220 mx.test\r\n")
            await reader.readline()
            writer.write(b"250-mx.test\r\n250 PIPELINING\r\n")
            while (await reader.readline()) != b"DATA\r\n":
                pass
            writer.write(b"250 ok\r\n")
            await writer.drain()
            writer.close()
        s.server.close()
        await s.server.wait_closed()
        s.server = await asyncio.start_server(close_after, "127.0.0.20", s.port)
        t = await run(s, env("bob@dest.test"))
    assert t.mail.code == 250 and t.error_stage == client.Stage.RCPT
    assert isinstance(t.error, ConnectionError), t.error
