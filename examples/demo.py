#!/usr/bin/env python3
"""See poolmta route mail on one machine.

Starts a DNS server with test zones, receiving MX servers and the gateway (as a
process) on loopback addresses, sends a handful of real messages through it,
and prints for each: sender, recipient, the pool and reasons from the trace,
and the source address and EHLO name the receiving server saw.

    pip install -e '.[test]' && python3 examples/demo.py [--keep]
"""

import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

from poolmta.assess.spam import GTUBE  # noqa: E402
from tests.support.harness import World, corpus, trace_events, trace_summary  # noqa: E402


def simple(subject, body=b"hello\r\n", sender="alice@contoso.test"):
    return f"From: {sender}\r\nSubject: {subject}\r\n\r\n".encode() + body


CASES = [
    # (what, content, mail_from, rcpt, client_ip, auth, where the message arrives, address it arrives for)
    ("ham, authenticated user", corpus("ham/easy-ham-2__00010.d1b4dbbad797c5c0537c5a0670c373fd.eml"),
     "alice@contoso.test", "bob@dest.test", "127.0.0.60", True, "dest", "bob@dest.test"),
    ("real bounce via connector", corpus("bounces/rfc3464-01.eml"),
     "", "carol@dest.test", "127.0.0.10", False, "dest", "carol@dest.test"),
    ("GTUBE spam", simple("cheap pills", GTUBE + b"\r\n"),
     "alice@contoso.test", "dave@dest.test", "127.0.0.60", True, "dest", "dave@dest.test"),
    ("forwarded from outside", simple("hello info", sender="someone@external.test"),
     "someone@external.test", "info@contoso.test", "127.0.0.50", False, "dest", "contoso-info@partner.test"),
    ("forwarded, SPF pass -> SRS", simple("hello again", sender="someone@external.test"),
     "someone@external.test", "info@contoso.test", "127.0.0.51", False, "dest", "contoso-info@partner.test"),
    ("sender domain without DNS", simple("from nowhere", sender="app@nodns.contoso.test"),
     "app@nodns.contoso.test", "erin@dest.test", "127.0.0.10", False, "dest", "erin@dest.test"),
    ("5xx at receiver -> DSN", simple("to a missing user"),
     "alice@contoso.test", "reject-frank@dest.test", "127.0.0.60", True, "contoso", "alice@contoso.test"),
    ("4xx then success", simple("greylisted"),
     "alice@contoso.test", "tempfail-gina@dest.test", "127.0.0.60", True, "dest", "tempfail-gina@dest.test"),
]


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp, World(Path(tmp)) as world:
        print(f"gateway on 127.0.0.1:{world.listen_port}; pools normal=127.0.0.2,.5 high-risk=127.0.0.3 "
              f"relay=127.0.0.4; MX sinks on 127.0.0.20/.21 port {world.mx_port}\n")
        rows = []
        for what, content, mail_from, rcpt, ip, auth, sink_name, arrives_for in CASES:
            t0 = time.time()
            qid = world.send(content, mail_from, [rcpt], client_ip=ip, auth=auth)
            sink = getattr(world, sink_name)
            sink.wait_for(lambda ms: [m for m in sink.to(arrives_for)
                                      if qid.encode() in m.content or sink_name == "contoso"], timeout=30)
            m = [m for m in sink.to(arrives_for) if qid.encode() in m.content or sink_name == "contoso"][-1]
            s = trace_summary(world.data_dir, qid)
            pool, reasons = s.get("routed", "?"), ",".join(s.get("reasons", []))
            if sink_name == "contoso":      # the bounce: show how the DSN itself was routed
                dsn_qid = next(e["dsn_queue_id"] for e in trace_events(world.data_dir, qid)
                               if e["event"] == "dsn-created")
                ds = trace_summary(world.data_dir, dsn_qid)
                pool, reasons = f"{pool} -> DSN {ds.get('routed')}", f"{reasons} -> {','.join(ds.get('reasons', []))}"
            rows.append((what, mail_from or "<>", rcpt, pool, reasons,
                         f"{m.peer} {m.ehlo} from <{m.mail_from}>"
                         + (f" (DSN to {arrives_for})" if sink_name == "contoso" else ""),
                         f"{time.time() - t0:.1f}s", qid))
        heads = ("message", "sender", "recipient", "pool", "reasons", "receiver saw", "took", "queue id")
        widths = [max(len(str(r[i])) for r in rows + [heads]) for i in range(len(heads))]
        line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths))
        print(line(heads))
        print("  ".join("-" * w for w in widths))
        for r in rows:
            print(line(r))
        if "--keep" in sys.argv:
            print(f"\nThe world keeps running; in another shell:\n"
                  f"  export POOLMTA_CONFIG={world.config_path}\n"
                  f"  poolmta trace {rows[0][-1]}\n  poolmta queue list\n"
                  f"Ctrl-C here stops it.")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
        else:
            print("\nRun with --keep to leave everything running and look with poolmta trace / queue.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
