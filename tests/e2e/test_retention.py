"""server.history_retention end to end: the gateway process forgets finished messages
(spool rows and trace) once they are older than the retention, and keeps the rest."""

from __future__ import annotations

import sqlite3
import time

from tests.support.harness import World, poolmta, stop_process, trace_events, wait_summary


def simple(subject: str) -> bytes:
    return (f"From: alice@contoso.test\r\nTo: someone\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject.replace(' ', '-')}-{time.time()}@contoso.test>\r\n\r\nhello\r\n").encode()


def test_finished_messages_are_purged_after_the_retention_and_queued_ones_kept(tmp_path):
    with World(tmp_path) as world:
        done = world.send(simple("done"), "alice@contoso.test", ["bob@dest.test"], client_ip="127.0.0.60", auth=True)
        # later.test's MX is not listening: this one stays deferred.
        waiting = world.send(simple("waiting"), "alice@contoso.test", ["w@later.test"], client_ip="127.0.0.60",
                             auth=True)
        wait_summary(world, done, lambda s: s.get("delivered") == 1)
        wait_summary(world, waiting, lambda s: s.get("deferred", 0) >= 1)
        stop_process(world.proc)
        time.sleep(1.2)                                 # both are now older than the retention below
        text = world.config_path.read_text()
        assert "\n[server]\n" in text
        world.config_path.write_text(text.replace("\n[server]\n", '\n[server]\nhistory_retention = "1s"\n', 1))
        world.start_gateway()                           # the first purge runs at start

        end = time.time() + 20
        while trace_events(world.data_dir, done) and time.time() < end:
            time.sleep(0.1)
        assert trace_events(world.data_dir, done) == []
        con = sqlite3.connect(f"file:{world.data_dir / 'spool.db'}?mode=ro", uri=True)
        try:
            assert con.execute("SELECT COUNT(*) FROM messages WHERE queue_id=?", (done,)).fetchone()[0] == 0
            assert con.execute("SELECT COUNT(*) FROM recipients WHERE queue_id=?", (done,)).fetchone()[0] == 0
            assert con.execute("SELECT COUNT(*) FROM bodies WHERE queue_id=?", (waiting,)).fetchone()[0] == 1
        finally:
            con.close()
        assert any(e["event"] == "queued" for e in trace_events(world.data_dir, waiting))
        assert waiting in poolmta("queue", "list", "--config", str(world.config_path)).stdout
        assert "purged the history of 1 finished messages" in world.log_path.read_text()
