"""deliver.cache + client.transact: sessions kept open between transactions.

The server is a function (FunctionConnector), so what was said on which
connection can be read back from its log."""

import asyncio

from poolmta.deliver.cache import SessionCache
from poolmta.deliver.client import FunctionConnector, transact
from poolmta.deliver.mx import Target
from poolmta.model import Envelope, Recipient, Source
from tests.unit.test_outcome import CONTENT, MX1, SOURCE, server

OTHER_SOURCE = Source("192.0.2.5", "out2.gw.test")


async def send(conn, cache, rcpt="ok@dest.test", *, source=SOURCE, target=MX1):
    env = Envelope("alice@sender.test", (Recipient(rcpt),))
    return await transact(conn, target, source, port=2525, envelope=env, recipients=env.recipients,
                          content=CONTENT, connect_timeout=5, command_timeout=5, cache=cache)


def commands(conn):
    return [c.split(" ")[0] for _, c in conn.log]


async def test_second_message_reuses_the_session_from_mail_from_on():
    conn, cache = FunctionConnector(server()), SessionCache(idle=5)
    first = await send(conn, cache, "a@dest.test")
    second = await send(conn, cache, "b@dest.test")
    assert commands(conn) == ["CONNECT", "EHLO", "MAIL", "RCPT", "DATA", ".", "MAIL", "RCPT", "DATA", "."]
    assert first.reused == 0 and second.reused == 1 and cache.reused == 1
    assert second.replies()[0] == "connect: session kept open, transaction 2 on it"
    assert second.data.code == 250 and second.greeting.code == 220          # classified like a fresh one
    await cache.close()
    assert commands(conn)[-1] == "QUIT" and cache.idle_sessions == 0


async def test_sessions_are_never_shared_between_sources_or_addresses():
    conn, cache = FunctionConnector(server()), SessionCache(idle=5)
    await send(conn, cache)
    await send(conn, cache, source=OTHER_SOURCE)
    await send(conn, cache, target=Target("mx2.dest.test", "192.0.2.21", 20))
    assert commands(conn).count("CONNECT") == 3
    assert [c for _, c in conn.log if c.startswith("EHLO")] == ["EHLO out1.gw.test", "EHLO out2.gw.test",
                                                                 "EHLO out1.gw.test"]
    await cache.close()


async def test_an_idle_session_is_closed_with_quit_after_the_cache_time():
    conn, cache = FunctionConnector(server()), SessionCache(idle=0.05)
    await send(conn, cache)
    assert cache.idle_sessions == 1
    await asyncio.sleep(0.2)
    assert cache.idle_sessions == 0 and commands(conn)[-1] == "QUIT"
    await send(conn, cache)
    assert commands(conn).count("CONNECT") == 2


async def test_reuse_limit_then_quit():
    conn, cache = FunctionConnector(server()), SessionCache(idle=5, max_uses=3)
    for i in range(4):
        await send(conn, cache, f"r{i}@dest.test")
    assert commands(conn).count("CONNECT") == 2
    assert commands(conn).index("QUIT") == commands(conn).index("CONNECT", 1) - 1   # 3 transactions, goodbye
    await cache.close()


async def test_a_session_the_server_dropped_meanwhile_is_replaced_not_blamed():
    mails = 0

    def mail(command):
        nonlocal mails
        mails += 1
        if mails == 2:                         # the kept session: the server closed it while it was idle
            raise ConnectionResetError("Connection lost")
        return "250 2.1.0 OK"
    conn, cache = FunctionConnector(server(MAIL=mail)), SessionCache(idle=5)
    await send(conn, cache)
    t = await send(conn, cache)
    assert t.error is None and t.data.code == 250 and t.reused == 0
    assert commands(conn).count("CONNECT") == 2 and conn.closed == [MX1.address]
    await cache.close()


async def test_421_or_a_refused_transaction_is_not_kept():
    conn, cache = FunctionConnector(server(DATA="421 4.3.2 closing")), SessionCache(idle=5)
    await send(conn, cache)
    assert cache.idle_sessions == 0
    conn2, cache2 = FunctionConnector(server()), SessionCache(idle=5)
    await send(conn2, cache2, "reject@dest.test")              # no RCPT accepted: no DATA, QUIT
    assert cache2.idle_sessions == 0 and commands(conn2)[-1] == "QUIT"


async def test_cache_time_zero_means_quit_after_every_message():
    conn, cache = FunctionConnector(server()), SessionCache(idle=0)
    await send(conn, cache)
    await send(conn, cache)
    assert commands(conn).count("CONNECT") == 2 and commands(conn).count("QUIT") == 2


async def test_a_session_whose_data_command_was_refused_is_not_kept():
    """A 554 to the DATA command leaves the server's transaction open (Postfix then says
    503 nested MAIL command): such a session must not carry the next message."""
    state = {"open": False}

    def handler(target, command):
        if command.startswith("MAIL"):
            if state["open"]:
                return "503 5.5.1 Error: nested MAIL command"
            state["open"] = True
            return "250 2.1.0 Ok"
        if command == "DATA":
            return "554 5.7.1 no data for you"            # the transaction stays open on the server
        if command == "CONNECT":
            state["open"] = False
        return server()(target, command)
    conn, cache = FunctionConnector(handler), SessionCache(idle=5)
    first = await send(conn, cache, "a@dest.test")
    assert first.data.code == 554 and cache.idle_sessions == 0
    second = await send(conn, cache, "b@dest.test")
    assert second.reused == 0 and second.mail.code == 250 and commands(conn).count("CONNECT") == 2


async def test_503_to_mail_on_a_kept_session_means_a_new_connection():
    mails = 0

    def mail(command):
        nonlocal mails
        mails += 1
        return "503 5.5.1 Error: nested MAIL command" if mails == 2 else "250 2.1.0 OK"
    conn, cache = FunctionConnector(server(MAIL=mail)), SessionCache(idle=5)
    await send(conn, cache)
    t = await send(conn, cache)
    assert t.reused == 0 and t.mail.code == 250 and t.data.code == 250
    await cache.close()
