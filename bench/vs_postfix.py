#!/usr/bin/env python3
"""poolmta vs a throw-away Postfix instance, same workload, same run, alternating.

Workload (both sides): Postfix's own `smtp-source -s SESSIONS -m MESSAGES -l SIZE
-f app@contoso.test -t bob@dest.test 127.0.0.1:PORT`; the receiver is the same
aiosmtpd counting sink (tests/support/sink.py) on 127.0.0.20. Accepted msg/s is
MESSAGES / smtp-source wall time; delivered msg/s is MESSAGES / time until the
sink has them all (both from the moment smtp-source starts).

- poolmta: tests.support.harness.World, with 127.0.0.1/32 added to the "onprem"
  connector of tenant contoso (smtp-source cannot bind a source address).
- Postfix: a copy of /etc/postfix in /tmp/pfbench/inst.XXXX (listed in the default
  instance's alternate_config_directories), own queue/data directories, smtpd on
  127.0.0.1:free port, relayhost [127.0.0.20]:sink port, smtp_bind_address
  127.0.0.2, default_process_limit 100, no local delivery, chroot off. Stopped and
  removed afterwards.

    python3 bench/vs_postfix.py [--messages 1000] [--sessions 20] [--size 4096] [--rounds 2]
"""

import argparse
import glob
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

from tests.support import harness  # noqa: E402
from tests.support.harness import World, free_port  # noqa: E402
from tests.support.sink import Sink  # noqa: E402

FROM, RCPT = "app@contoso.test", "bob@dest.test"
PFBASE = "/tmp/pfbench"

_orig_config_text = harness.config_text


def _config_with_loopback_connector(*a, **k):
    text = _orig_config_text(*a, **k)
    old = 'client_ips = ["127.0.0.10/32"]'
    assert old in text
    return text.replace(old, 'client_ips = ["127.0.0.10/32", "127.0.0.1/32"]')


harness.config_text = _config_with_loopback_connector


def smtp_source(port: int, sessions: int, messages: int, size: int, sink: Sink) -> dict:
    before = len(sink.messages)
    cmd = ["smtp-source", "-s", str(sessions), "-m", str(messages), "-l", str(size),
           "-f", FROM, "-t", RCPT, f"127.0.0.1:{port}"]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    t_acc = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"smtp-source failed {p.returncode}: {p.stderr[-2000:]}")
    while len(sink.messages) - before < messages:
        time.sleep(0.02)
        if time.perf_counter() - t0 > 900:
            raise RuntimeError(f"only {len(sink.messages) - before}/{messages} delivered within 900 s")
    t_del = time.perf_counter() - t0
    return {"accepted": messages / t_acc, "delivered": messages / t_del, "cmd": " ".join(cmd)}


def postconf(*args: str) -> None:
    subprocess.run(["postconf", *args], check=True, capture_output=True, text=True)


class Postfix:
    def __init__(self, sink_port: int):
        os.makedirs(PFBASE, exist_ok=True)
        os.chmod(PFBASE, 0o755)
        want = f"{PFBASE}/inst.*"
        cur = subprocess.run(["postconf", "-h", "alternate_config_directories"], capture_output=True,
                             text=True).stdout.strip()
        if want not in cur:
            postconf("-e", f"alternate_config_directories = {(cur + ' ' + want).strip()}")
        self.dir = tempfile.mkdtemp(prefix="inst.", dir=PFBASE)
        os.chmod(self.dir, 0o755)
        self.etc = f"{self.dir}/etc"
        shutil.copytree("/etc/postfix", self.etc, symlinks=True)
        q, d = f"{self.dir}/queue", f"{self.dir}/data"
        os.makedirs(q)
        os.makedirs(d)
        shutil.chown(d, "postfix", "postfix")
        self.port = free_port()
        c = ["-c", self.etc]
        postconf(*c, "-e", f"queue_directory={q}", f"data_directory={d}", "inet_interfaces=127.0.0.1",
                 "mynetworks=127.0.0.0/8", f"relayhost=[127.0.0.20]:{sink_port}", "smtp_bind_address=127.0.0.2",
                 "default_process_limit=100", "mydestination=", "local_transport=error:no local delivery",
                 "alias_maps=", "alias_database=", "maillog_file=/dev/stdout", "myhostname=pf.bench.test",
                 "multi_instance_name=postfix-bench", "compatibility_level=3.6", "smtputf8_enable=no")
        postconf(*c, "-M#", "smtp/inet")
        postconf(*c, "-M", f"127.0.0.1:{self.port}/inet=127.0.0.1:{self.port} inet n - n - - smtpd")
        postconf(*c, "-F", "*/*/chroot = n")
        self.log = open(f"{self.dir}/start.log", "wb")
        subprocess.run(["postfix", "-c", self.etc, "start"], stdout=self.log, stderr=self.log,
                       stdin=subprocess.DEVNULL, timeout=60)
        deadline = time.time() + 20
        import socket
        while time.time() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    if s.recv(100).startswith(b"220"):
                        return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("postfix did not start")

    def stop(self) -> None:
        subprocess.run(["postfix", "-c", self.etc, "stop"], capture_output=True, timeout=60)
        time.sleep(1)
        shutil.rmtree(self.dir, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--messages", type=int, default=1000, help="total per run")
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=2, help="(poolmta, postfix) pairs")
    a = ap.parse_args()
    if not shutil.which("smtp-source"):
        sys.exit("smtp-source missing: apt-get install -y postfix")
    rows = []
    with tempfile.TemporaryDirectory() as tmp, World(Path(tmp)) as world:
        pf_sink = Sink("127.0.0.20", free_port("127.0.0.20"))
        pf_sink.start()
        pf = Postfix(pf_sink.port)
        try:
            for r in range(a.rounds):
                p = smtp_source(world.listen_port, a.sessions, a.messages, a.size, world.dest)
                x = smtp_source(pf.port, a.sessions, a.messages, a.size, pf_sink)
                rows.append((r + 1, p, x))
                print(f"round {r + 1}: poolmta acc {p['accepted']:.0f} del {p['delivered']:.0f} | "
                      f"postfix acc {x['accepted']:.0f} del {x['delivered']:.0f}", flush=True)
        finally:
            pf.stop()
            pf_sink.stop()
    print(f"\nsessions={a.sessions} messages={a.messages} size={a.size}B\n")
    print("| round | poolmta acc msg/s | poolmta del msg/s | postfix acc msg/s | postfix del msg/s "
          "| ratio acc | ratio del |")
    print("|---|---|---|---|---|---|---|")
    ra, rd = [], []
    for n, p, x in rows:
        ra.append(p["accepted"] / x["accepted"])
        rd.append(p["delivered"] / x["delivered"])
        print(f"| {n} | {p['accepted']:.0f} | {p['delivered']:.0f} | {x['accepted']:.0f} | {x['delivered']:.0f} "
              f"| {ra[-1]:.2f} | {rd[-1]:.2f} |")
    print(f"| median | | | | | {statistics.median(ra):.2f} | {statistics.median(rd):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
