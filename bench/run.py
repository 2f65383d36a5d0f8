#!/usr/bin/env python3
"""The benchmarks' single entry point (issue 5). Everything runs on this machine, on loopback.

    python3 bench/run.py relay [--smoke] [--rounds N] [--messages N] [--workloads A,B] [--out FILE]
                               [--poolmta-set KEY=VALUE ...] [--poolmta-config FILE]
    python3 bench/run.py decision [ARGS]      # runs bench/decision.py ARGS
    python3 bench/run.py queue-depth [ARGS]   # runs bench/queue_depth.py ARGS
    python3 bench/run.py all [--smoke]        # the three, one after the other

`relay`: poolmta's relay throughput against a throw-away Postfix, the same workload through
both, alternating (poolmta, postfix, poolmta, postfix, ...) in the same run.

- What it installs: Debian's postfix (for smtp-source, smtp-sink and the Postfix relay) when
  missing. The system Postfix is never started or stopped; its main.cf gets our instance
  directory pattern in alternate_config_directories for the run and is put back afterwards
  (bench/_postfix.py).
- Senders: Postfix's `smtp-source` to 127.0.0.1:<port of the side>, one process per stream of
  the workload (`mix` and `backpressure` run several at once).
- Receivers, the same for both sides: Postfix's C `smtp-sink` on 127.0.0.20 (MX of dest.test) and,
  for the backpressure workload, on 127.0.0.24 (MX of busy.test), both on the World's MX port.
- poolmta: tests.support.harness.World (the gateway as a process, loopback DNS with the test
  zones, pools on 127.0.0.2/.5 normal, .3 high-risk, .4 relay, retry_schedule 1s), 127.0.0.1/32
  added to contoso's "onprem" connector (smtp-source cannot bind a source address), the service
  limit recipients_per_day raised so that repeated runs stay in their pools, plus any
  --poolmta-set / --poolmta-config settings.
- Postfix: bench/_postfix.py's instance, relayhost [127.0.0.20]:<MX port>, busy.test through a
  transport map to [127.0.0.24]:<MX port>, smtp_bind_address 127.0.0.2, retries every second
  (minimal_backoff_time = maximal_backoff_time = queue_run_delay = 1s), defaults otherwise.

Per run: accepted msg/s (messages, the latency probe's included / wall time until the last
smtp-source exits), delivered msg/s (the same messages / time until the side's queue is empty), accept latency p50/p99 (a probe: one extra smtplib session on 127.0.0.1 sending one
message after the other during the run, timed from MAIL to the 250 after DATA), peak RSS (sum of
VmRSS over the side's process tree, sampled every 100 ms), CPU seconds per 1000 messages
(utime+stime of the tree, reaped children included, over the run). Each pair gives the ratios
poolmta/Postfix; the table has their median.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shlex
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
sys.path[:0] = [str(ROOT / "src"), str(ROOT), str(BENCH)]

import _postfix  # noqa: E402
import benchenv  # noqa: E402
from tests.support.harness import World, stop_process, wait_banner  # noqa: E402

SINK_IP, BUSY_IP = "127.0.0.20", "127.0.0.24"
RCPT, BUSY_RCPT = "bob@dest.test", "bob@busy.test"
SENDERS = {"normal": "app@contoso.test",          # contoso's on-prem connector, accepted domain
           "high-risk": "",                         # null reverse-path: a bounce (rule dsn)
           "relay": "someone@external.test"}        # sender not in an accepted domain, SPF fails
# Backpressure: every receiver delays replies (RCPT: ~5 %, end of DATA: ~10 % wait 1 s or more;
# smtp-sink's delays are whole seconds) and busy.test's receiver tempfails every RCPT while the
# clients submit (smtp-sink cannot tempfail a share of recipients: see BACKPRESSURE_NOTE).
SINK_DELAYS = ["-p", "-W", "rcpt:1:5", "-W", ".:1:10"]
BUSY_SHARE = 0.2
POSTFIX_SETTINGS = {"minimal_backoff_time": "1s", "maximal_backoff_time": "1s", "queue_run_delay": "1s"}
POOLMTA_BASE_SETTINGS = ["limits.recipients_per_day=1000000000"]
SMOKE = {"rounds": 1, "messages": 40, "workloads": ["4k-s20-r1", "mix-4k-s20"]}
DEFAULT_WORKLOADS = ["4k-s20-r1", "4k-s100-r1", "100k-s20-r1", "4k-s20-r10", "mix-4k-s20", "backpressure-4k-s20"]
BACKPRESSURE_NOTE = (
    "smtp-sink can delay a random share of replies (`-W command:delay:odds`) but tempfails only every "
    "instance of a command (`-r RCPT`), not a share. So the backpressure workload sends "
    f"{BUSY_SHARE:.0%} of its messages to {BUSY_RCPT}, whose receiver ({BUSY_IP}) answers every RCPT "
    "with 450 4.3.0 until the last smtp-source has exited, and is then replaced by one that accepts; the "
    f"rest go to {RCPT}. Both receivers also delay replies: `{' '.join(SINK_DELAYS)}` (whole seconds). They do "
    "not announce PIPELINING (-p): smtp-sink 3.7 answers pipelined commands out of turn when it delays a reply "
    "(Postfix's client got `503 5.5.1 Error: need RCPT command` in reply to RCPT and bounced every message). "
    "The tempfailing window lasts as long as the side takes to accept the workload, so the slower side has its "
    "busy.test mail refused for longer, and some of it more than once (1 s retries): compare the deferred attempts.")


# -- workloads -------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Stream:
    label: str
    sender: str
    rcpt: str
    sessions: int
    messages: int


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    kind: str           # plain | mix | backpressure
    size: int
    sessions: int
    rcpts: int

    def streams(self, messages: int) -> list[Stream]:
        if self.kind == "mix":
            parts = [(k, SENDERS[k], RCPT) for k in ("normal", "high-risk", "relay")]
            shares = [1 / 3] * 3
        elif self.kind == "backpressure":
            parts = [("dest.test", SENDERS["normal"], RCPT), ("busy.test", SENDERS["normal"], BUSY_RCPT)]
            shares = [1 - BUSY_SHARE, BUSY_SHARE]
        else:
            parts, shares = [("normal", SENDERS["normal"], RCPT)], [1.0]
        msgs, sess = split(messages, shares), split(self.sessions, shares)
        return [Stream(label, sender, rcpt, max(1, min(s, m)), m)
                for (label, sender, rcpt), s, m in zip(parts, sess, msgs) if m > 0]


def split(total: int, shares: list[float]) -> list[int]:
    """TOTAL in parts by SHARES, each at least 1 when TOTAL allows; the remainder to the first."""
    parts = [max(1, int(total * s)) if total >= len(shares) else 0 for s in shares]
    parts[0] += total - sum(parts)
    return parts


def parse_workload(name: str) -> Workload:
    m = re.fullmatch(r"(?:(mix|backpressure)-)?(\d+)k-s(\d+)(?:-r(\d+))?", name)
    if not m or (m.group(1) and m.group(4)) or (not m.group(1) and not m.group(4)):
        raise argparse.ArgumentTypeError(
            f"workload {name!r}: expected SIZEk-sSESSIONS-rRCPTS, mix-SIZEk-sSESSIONS or backpressure-SIZEk-sSESSIONS")
    kind, size, sessions, rcpts = m.group(1) or "plain", int(m.group(2)), int(m.group(3)), int(m.group(4) or 1)
    if size < 1 or sessions < 1 or rcpts < 1:
        raise argparse.ArgumentTypeError(f"workload {name!r}: size, sessions and recipients must be positive")
    return Workload(name, kind, size * 1024, sessions, rcpts)


def smtp_source_cmd(stream: Stream, w: Workload, port: int) -> list[str]:
    return [_postfix.tool("smtp-source"), "-s", str(stream.sessions), "-m", str(stream.messages), "-l", str(w.size),
            "-r", str(w.rcpts), "-f", stream.sender, "-t", stream.rcpt, f"127.0.0.1:{port}"]


def shell(cmd: list[str]) -> str:
    return " ".join(shlex.quote(os.path.basename(c) if i == 0 else c) for i, c in enumerate(cmd))


# -- poolmta's config: extra settings --------------------------------------------------------

def toml_literal(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_literal(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{toml_key(k)} = {toml_literal(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"no TOML literal for {v!r}")


def toml_key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else json.dumps(k)


def set_toml(text: str, path: tuple[str, ...], literal: str) -> str:
    """TEXT with the key PATH (table..., key) set to the TOML LITERAL: the key's line in its
    table replaced, or added under the table's header, or the table added at the end."""
    if len(path) < 2:
        raise ValueError(f"{'.'.join(path)}: give TABLE.KEY")
    header = "[" + ".".join(toml_key(p) for p in path[:-1]) + "]"
    key_line = f"{toml_key(path[-1])} = {literal}"
    lines = text.splitlines()
    try:
        h = next(i for i, line in enumerate(lines) if line.strip() == header)
    except StopIteration:
        lines += ["", header, key_line]
    else:
        i = h + 1
        while i < len(lines) and not lines[i].lstrip().startswith("["):
            if re.match(rf"\s*{re.escape(toml_key(path[-1]))}\s*=", lines[i]):
                lines[i] = key_line
                break
            i += 1
        else:
            lines.insert(h + 1, key_line)
    out = "\n".join(lines) + "\n"
    got = tomllib.loads(out)
    for p in path:
        got = got.get(p) if isinstance(got, dict) else None
    if got != tomllib.loads(f"x = {literal}")["x"]:
        raise ValueError(f"could not set {'.'.join(path)} = {literal} in the gateway's config")
    return out


def parse_set(item: str) -> tuple[tuple[str, ...], str]:
    """KEY=VALUE with a dotted KEY; VALUE a TOML literal (a bare word is taken as a string)."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"{item!r}: expected KEY=VALUE, e.g. server.workers=2")
    value = value.strip()
    try:
        tomllib.loads(f"x = {value}")
    except tomllib.TOMLDecodeError:
        value = json.dumps(value)
    return tuple(key.strip().split(".")), value


def flatten(data: dict, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], str]]:
    out = []
    for k, v in data.items():
        if isinstance(v, dict):
            out += flatten(v, prefix + (k,))
        else:
            out.append((prefix + (k,), toml_literal(v)))
    return out


def poolmta_config_edit(settings: list[tuple[tuple[str, ...], str]]):
    def edit(text: str) -> str:
        old = 'client_ips = ["127.0.0.10/32"]'
        if old not in text:
            raise RuntimeError("harness config changed: cannot add 127.0.0.1/32 to the onprem connector")
        text = text.replace(old, 'client_ips = ["127.0.0.10/32", "127.0.0.1/32"]')
        for path, literal in settings:
            text = set_toml(text, path, literal)
        return text
    return edit


# -- processes: trees, RSS, CPU --------------------------------------------------------------

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024


def _stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def process_tree(root: int) -> list[int]:
    """ROOT and all its descendants."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            st = _stat(int(d))
            if st:
                children.setdefault(int(st[1]), []).append(int(d))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def tree_cpu(root: int) -> float:
    """CPU seconds (user + system) of ROOT's tree, children already reaped included."""
    total = 0
    for pid in process_tree(root):
        st = _stat(pid)
        if st:
            total += sum(int(x) for x in st[11:15])     # utime stime cutime cstime
    return total / CLK_TCK


def tree_pss_kib(root: int) -> int:
    """Proportional set size of ROOT's tree: shared pages divided among the processes sharing them."""
    total = 0
    for pid in process_tree(root):
        try:
            m = re.search(r"^Pss:\s+(\d+)", Path(f"/proc/{pid}/smaps_rollup").read_text(), re.M)
        except OSError:
            continue
        total += int(m.group(1)) if m else 0
    return total


def tree_rss_kib(root: int) -> int:
    total = 0
    for pid in process_tree(root):
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_KIB
        except (OSError, IndexError, ValueError):
            pass
    return total


class RssSampler(threading.Thread):
    def __init__(self, root: int, every: float = 0.1):
        super().__init__(daemon=True)
        self.root, self.every, self.peak_kib = root, every, 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.peak_kib = max(self.peak_kib, tree_rss_kib(self.root))
            self.done.wait(self.every)

    def stop(self) -> int:
        self.done.set()
        self.join()
        return self.peak_kib


# -- the latency probe -----------------------------------------------------------------------

class Probe(threading.Thread):
    """One more SMTP session on 127.0.0.1: one message after the other until stopped, each
    transaction timed from MAIL to the 250 after DATA."""

    def __init__(self, port: int, sender: str, rcpts: list[str], size: int):
        super().__init__(daemon=True)
        self.port, self.sender, self.rcpts = port, sender, rcpts
        body = ("x" * 76 + "\r\n") * max(1, size // 78)
        self.head = f"From: {sender}\r\nTo: {rcpts[0]}\r\nSubject: probe\r\n"
        self.body = body
        self.latencies: list[float] = []
        self.errors = 0
        self.done = threading.Event()

    def run(self) -> None:
        import smtplib
        n = 0
        while not self.done.is_set():
            try:
                with smtplib.SMTP("127.0.0.1", self.port, timeout=120) as s:
                    s.ehlo("probe.bench.test")
                    while not self.done.is_set():
                        n += 1
                        msg = f"{self.head}Message-ID: <probe.{n}.{time.time()}@contoso.test>\r\n\r\n{self.body}"
                        t0 = time.perf_counter()
                        s.mail(self.sender)
                        for r in self.rcpts:
                            s.rcpt(r)
                        code, _ = s.data(msg.encode())
                        if code != 250:
                            raise smtplib.SMTPDataError(code, b"")
                        self.latencies.append(time.perf_counter() - t0)
            except (OSError, smtplib.SMTPException):
                self.errors += 1
                self.done.wait(0.1)

    def stop(self) -> None:
        self.done.set()
        self.join(150)


# -- receivers -------------------------------------------------------------------------------

class SmtpSink:
    """Postfix's smtp-sink on ADDRESS:PORT with -c counters; `received` is its message count."""

    def __init__(self, address: str, port: int, flags: list[str]):
        user = ["-u", "postfix"] if os.geteuid() == 0 else []
        self.cmd = [_postfix.tool("smtp-sink"), *user, "-c", *flags, f"{address}:{port}", "1000"]
        self.address, self.port = address, port
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     stdin=subprocess.DEVNULL)
        self.out = b""
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        def exited() -> None:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{shell(self.cmd)} exited with {self.proc.returncode}: "
                                   f"{self.proc.stderr.read().decode(errors='replace')}")

        if not wait_banner(address, port, 10, exited):
            stop_process(self.proc)
            raise RuntimeError(f"{shell(self.cmd)} did not answer")

    def _read(self) -> None:
        for chunk in iter(lambda: self.proc.stdout.read1(65536), b""):
            self.out = self.out[-200:] + chunk

    @property
    def received(self) -> int:
        counts = re.findall(rb"mesg=(\d+)", self.out)
        return int(counts[-1]) if counts else 0

    def stop(self) -> int:
        stop_process(self.proc)
        self.reader.join(5)
        return self.received


class Receivers:
    """The sinks of one workload: 127.0.0.20, and for backpressure 127.0.0.24 (tempfailing every
    RCPT until `release()`). `total()` counts every message every sink of the workload got."""

    def __init__(self, w: Workload, port: int):
        self.port, self.backpressure = port, w.kind == "backpressure"
        self.flags = SINK_DELAYS if self.backpressure else []
        self.done = 0
        self.dest = SmtpSink(SINK_IP, port, self.flags)
        self.busy: SmtpSink | None = None
        self.commands = [shell(self.dest.cmd)]

    def before_run(self) -> None:
        if self.backpressure:
            self._swap_busy(["-r", "RCPT"])

    def release(self) -> None:
        if self.backpressure:
            self._swap_busy([])

    def _swap_busy(self, extra: list[str]) -> None:
        if self.busy:
            self.done += self.busy.stop()
        self.busy = SmtpSink(BUSY_IP, self.port, self.flags + extra)
        cmd = shell(self.busy.cmd)
        if cmd not in self.commands:
            self.commands.append(cmd)

    def stop(self) -> int:
        for s in (self.dest, self.busy):
            if s:
                self.done += s.stop()
        self.busy = None
        return self.done


# -- the two sides ---------------------------------------------------------------------------

class PoolmtaSide:
    name = "poolmta"

    def __init__(self, world):
        self.world = world
        self.port = world.listen_port
        self.db = world.data_dir / "spool.db"

    def root_pid(self) -> int:
        return self.world.proc.pid

    def _query(self, sql: str, *args) -> list[tuple]:
        con = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=10)
        try:
            return con.execute(sql, args).fetchall()
        finally:
            con.close()

    def drained(self, since: float, expected: int) -> bool:
        got = self._query("SELECT COUNT(*) FROM messages WHERE received_at >= ?", since)[0][0]
        if got < expected:
            return False
        return self._query("SELECT COUNT(*) FROM recipients WHERE state IN ('queued','deferred')")[0][0] == 0

    def mark(self) -> dict:
        return {}

    def outcome(self, since: float, mark: dict) -> tuple[int, int]:
        """(failed attempts before delivery, recipients not delivered) of the messages received since SINCE."""
        deferred, failed = self._query(
            "SELECT COALESCE(SUM(MAX(r.attempts - 1, 0)), 0), COALESCE(SUM(r.state != 'delivered'), 0)"
            " FROM recipients r JOIN messages m USING(queue_id) WHERE m.received_at >= ?", since)[0]
        return deferred, failed

    def pools(self, since: float) -> dict[str, int]:
        return dict(self._query("SELECT pool, COUNT(*) FROM messages WHERE received_at >= ? GROUP BY pool", since))


class PostfixSide:
    name = "postfix"

    def __init__(self, pf: _postfix.Postfix):
        self.pf = pf
        self.port = pf.port

    def root_pid(self) -> int:
        return self.pf.master_pid()

    def drained(self, since: float, expected: int) -> bool:
        return self.pf.queued() == 0

    def mark(self) -> dict:
        return self.pf.log_counts(("status=deferred", "status=bounced", "status=expired"))

    def outcome(self, since: float, mark: dict) -> tuple[int, int]:
        now = self.mark()
        return (now["status=deferred"] - mark["status=deferred"],
                now["status=bounced"] + now["status=expired"] - mark["status=bounced"] - mark["status=expired"])

    def pools(self, since: float) -> dict[str, int]:
        return {}


# -- one run ---------------------------------------------------------------------------------

def run_once(side, w: Workload, messages: int, receivers: Receivers, log_dir: Path) -> dict:
    streams = w.streams(messages)
    cmds = [smtp_source_cmd(s, w, side.port) for s in streams]
    receivers.before_run()
    root = side.root_pid()
    mark = side.mark()
    cpu0 = tree_cpu(root)
    sampler = RssSampler(root)
    sampler.start()
    rcpts = [RCPT] + [f"{i}{RCPT}" for i in range(2, w.rcpts + 1)]
    probe = Probe(side.port, SENDERS["normal"], rcpts, w.size)
    since = time.time()
    t0 = time.perf_counter()
    probe.start()
    procs = []
    for i, c in enumerate(cmds):
        err = open(log_dir / f"smtp-source.{side.name}.{i}.log", "w+b")
        procs.append((subprocess.Popen(c, stdout=err, stderr=err, stdin=subprocess.DEVNULL), err))
    failed = []
    for p, err in procs:
        try:
            rc = p.wait(900)
        except subprocess.TimeoutExpired:
            p.kill()
            rc = "timeout"
        if rc != 0:
            err.seek(0)
            failed.append(f"{shell(p.args)} -> {rc}: {err.read()[-1500:].decode(errors='replace')}")
        err.close()
    t_acc = time.perf_counter() - t0
    probe.stop()
    receivers.release()
    if failed:
        sampler.stop()
        raise RuntimeError(f"{side.name}: smtp-source failed:\n" + "\n".join(failed))
    sent = sum(s.messages for s in streams)
    total = sent + len(probe.latencies)
    while not side.drained(since, total):
        if time.perf_counter() - t0 > 900 + t_acc:
            sampler.stop()
            raise RuntimeError(f"{side.name}: queue not empty 900 s after the last message was accepted")
        time.sleep(0.02)
    t_del = time.perf_counter() - t0
    cpu = tree_cpu(root) - cpu0
    peak = sampler.stop()
    pss = tree_pss_kib(root)
    deferred, failed = side.outcome(since, mark)
    lat = sorted(probe.latencies)
    return {"side": side.name, "workload": w.name, "messages": sent, "probe": len(lat), "probe_errors": probe.errors,
            "accepted": total / t_acc, "delivered": total / t_del, "t_acc": t_acc, "t_del": t_del,
            "p50": 1000 * benchenv.percentile(lat, 50), "p99": 1000 * benchenv.percentile(lat, 99),
            "rss_mib": peak / 1024, "pss_mib": pss / 1024, "cpu_per_1000": 1000 * cpu / total,
            "pools": side.pools(since), "deferrals": deferred, "failed": failed,
            "commands": [shell(c) for c in cmds]}


# -- the relay matrix ------------------------------------------------------------------------

def relay(a: argparse.Namespace) -> int:
    head = benchenv.header("Relay throughput: poolmta vs Postfix on loopback")    # date and load before we start
    _postfix.ensure_installed()

    settings = [parse_set(s) for s in POOLMTA_BASE_SETTINGS + a.poolmta_set]
    if a.poolmta_config:
        settings += flatten(tomllib.loads(Path(a.poolmta_config).read_text()))
    workloads = [parse_workload(n) for n in a.workloads]
    runs: list[dict] = []
    notes: dict[str, list[str]] = {}
    sinks_seen: dict[str, tuple[int, int]] = {}
    with tempfile.TemporaryDirectory(prefix="poolmta-bench-") as tmp, _postfix.alternate_config_directories():
        world = World(Path(tmp), mx_sinks=False, config_edit=poolmta_config_edit(settings))
        pf = None
        try:
            world.start()
            world.dns.resolver.zone["busy.test"] = {"MX": [(10, "mx.busy.test")]}
            world.dns.resolver.zone["mx.busy.test"] = {"A": [BUSY_IP]}
            pf = _postfix.Postfix(SINK_IP, world.mx_port, {"busy.test": f"smtp:[{BUSY_IP}]:{world.mx_port}"},
                                  POSTFIX_SETTINGS)
            sides = [PoolmtaSide(world), PostfixSide(pf)]
            for w in workloads:
                receivers = Receivers(w, world.mx_port)
                try:
                    for r in range(a.rounds):
                        for side in sides:
                            res = run_once(side, w, a.messages, receivers, Path(tmp))
                            res["pair"] = r + 1
                            runs.append(res)
                            print(f"{w.name} pair {r + 1} {side.name}: accepted {res['accepted']:.0f} msg/s, "
                                  f"delivered {res['delivered']:.0f} msg/s, p99 {res['p99']:.0f} ms", flush=True)
                finally:
                    got = receivers.stop()
                    notes[w.name] = receivers.commands
                sent = sum(x["messages"] + x["probe"] for x in runs if x["workload"] == w.name)
                sinks_seen[w.name] = (got, sent)
            poolmta_config = world.config_path.read_text()
            postfix_settings = dict(pf.settings)
            smtpd_service = pf.smtpd_service
            ports = {"poolmta": world.listen_port, "postfix": pf.port, "mx": world.mx_port}
            pf_version = _postfix.version()     # while the system main.cf is sure to exist
        finally:
            if pf:
                pf.stop()
            world.stop()
    text = report(head, a, workloads, runs, notes, sinks_seen, settings, poolmta_config, postfix_settings,
                  smtpd_service, ports, pf_version)
    benchenv.write(a.out or benchenv.default_out("relay-smoke" if a.smoke else "relay"), text)
    for p in problems(runs):
        print(f"FAILED: {p}", file=sys.stderr)
    return 1 if problems(runs) else 0


def problems(runs: list[dict]) -> list[str]:
    return [f"{r['workload']} pair {r['pair']} {r['side']}: {r['failed']} recipient(s) not delivered"
            for r in runs if r["failed"]]


def median_of(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def report(head, a, workloads, runs, sink_cmds, sinks_seen, settings, poolmta_config, pf_settings, smtpd_service,
           ports, pf_version) -> str:
    out = [head.rstrip("\n"), "",
           f"Postfix {pf_version}. {a.rounds} pair(s) of runs (poolmta, then Postfix) per workload, "
           f"{a.messages} smtp-source messages per run" + (" (smoke mode)." if a.smoke else "."), "",
           "## Results (median over the runs of each side)", "",
           "| workload | side | accepted msg/s | delivered msg/s | accept p50 ms | accept p99 ms | peak RSS MiB "
           "| PSS after MiB | CPU s/1000 msg |",
           "|---|---|---|---|---|---|---|---|---|"]
    for w in workloads:
        for side in ("poolmta", "postfix"):
            rs = [r for r in runs if r["workload"] == w.name and r["side"] == side]
            out.append(f"| {w.name} | {side} | " + " | ".join(
                f"{median_of([r[k] for r in rs]):{fmt}}" for k, fmt in
                (("accepted", ".1f"), ("delivered", ".1f"), ("p50", ".1f"), ("p99", ".1f"), ("rss_mib", ".0f"),
                 ("pss_mib", ".0f"), ("cpu_per_1000", ".2f"))) + " |")
    out += ["", "## Ratio poolmta / Postfix per pair", "",
            "| workload | pair | accepted | delivered | accept p99 | CPU per message |", "|---|---|---|---|---|---|"]
    for w in workloads:
        ratios = []
        for pair in sorted({r["pair"] for r in runs if r["workload"] == w.name}):
            p, x = ({r["side"]: r for r in runs if r["workload"] == w.name and r["pair"] == pair}.get(s)
                    for s in ("poolmta", "postfix"))
            if not (p and x):
                continue
            ratios.append([p["accepted"] / x["accepted"], p["delivered"] / x["delivered"], p["p99"] / x["p99"],
                           p["cpu_per_1000"] / x["cpu_per_1000"] if x["cpu_per_1000"] else float("nan")])
            out.append(f"| {w.name} | {pair} | " + " | ".join(f"{v:.2f}" for v in ratios[-1]) + " |")
        if ratios:
            out.append(f"| {w.name} | median | " + " | ".join(
                f"{median_of([r[i] for r in ratios]):.2f}" for i in range(4)) + " |")
    out += ["", "## Every run", "",
            "| workload | pair | side | messages + probe | accept s | until empty s | accepted msg/s | delivered msg/s "
            "| p50 ms | p99 ms | peak RSS MiB | PSS after MiB | CPU s/1000 | deferred attempts | not delivered |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        out.append(f"| {r['workload']} | {r['pair']} | {r['side']} | {r['messages']} + {r['probe']} | {r['t_acc']:.2f} "
                   f"| {r['t_del']:.2f} | {r['accepted']:.1f} | {r['delivered']:.1f} | {r['p50']:.1f} | {r['p99']:.1f} "
                   f"| {r['rss_mib']:.0f} | {r['pss_mib']:.0f} | {r['cpu_per_1000']:.2f} | {r['deferrals']} "
                   f"| {r['failed']} |")
    out += ["", "## Checks", ""]
    for w in workloads:
        got, sent = sinks_seen.get(w.name, (0, 0))
        out.append(f"- {w.name}: the receivers counted {got} transactions for {sent} messages sent through both "
                   f"sides (smtp-sink -c; one transaction per message and destination).")
        if w.kind == "mix":
            for r in runs:
                if r["workload"] == w.name and r["side"] == "poolmta":
                    want = {s.label: s.messages for s in w.streams(r["messages"])}
                    want["normal"] += r["probe"]
                    out.append(f"  - pair {r['pair']}: poolmta's spool has per pool {json.dumps(r['pools'], sort_keys=True)};"
                               f" sent normal (probe included) / high-risk / relay = {want['normal']} / "
                               f"{want['high-risk']} / {want['relay']}")
        probe_errors = sum(r["probe_errors"] for r in runs if r["workload"] == w.name)
        if probe_errors:
            out.append(f"  - the latency probe reconnected {probe_errors} time(s) after an error")
    out += [f"- FAILED: {p}" for p in problems(runs)] or ["- every recipient of every run was delivered"]
    out += ["", "## How it was measured", "",
            "- accepted msg/s = all messages of the run (smtp-source's and the latency probe's) / wall time from the "
            "start of the smtp-source processes until the last one exits (every message got its 250).",
            "- delivered msg/s = the same messages / time from the same start "
            "until the side's queue is empty: poolmta, all messages in its spool and no recipient queued or deferred "
            "(read-only SQLite on spool.db); Postfix, no file left in maildrop, incoming, active, deferred, hold. "
            "Polled every 20 ms.",
            "- accept latency: smtp-source reports none, so one more client (Python smtplib, 127.0.0.1, sender "
            f"{SENDERS['normal']}, the workload's size and recipient count) sends one message after the other on one "
            "connection during the run; p50/p99 of its transactions, timed from MAIL FROM to the 250 after DATA.",
            "- peak RSS = the largest sum of VmRSS over the side's process tree (poolmta: the gateway process and its "
            "children; Postfix: master and every descendant), sampled every 100 ms. Pages shared between "
            "processes count once per process, and Postfix keeps idle smtpd/cleanup/smtp processes for up to 100 s "
            "(max_idle), so its sum grows with the sessions of earlier runs. PSS after = the proportional set size "
            "(shared pages divided among their sharers, /proc/PID/smaps_rollup) of the same tree once the queue is "
            "empty: one reading, taken outside the timed part, since reading it is slow.",
            "- CPU s/1000 msg = utime+stime (+cutime+cstime: reaped children) of that tree over the run, per 1000 "
            "messages. The senders, receivers, the DNS server (in the benchmark's process, used by poolmta only; "
            "Postfix has a relayhost) and the probe are not counted.",
            "- deferred attempts: poolmta, the sum of (attempts - 1) over recipients that needed more than one; "
            "Postfix, the `status=deferred` lines of its mail log. not delivered: poolmta, recipients of the run in "
            "any final state but delivered; Postfix, `status=bounced` and `status=expired` lines. Any at all makes "
            "the benchmark exit 1.",
            f"- smtp-source opens one connection per message (no -d), sends HELO, then MAIL, RCPT (-r N: N, N-1 ... 2 "
            f"prefixed to the address, then the address itself), DATA.",
            "", "## Backpressure", "", BACKPRESSURE_NOTE, "",
            "## Settings", "",
            "poolmta: tests/support/harness.py's config (retry_schedule [\"1s\"], DKIM signing of contoso.test on, "
            "sender limits counted in SQLite; what it does not set is poolmta's default, see `poolmta config params`), "
            "with 127.0.0.1/32 added to the onprem connector and these settings:", ""]
    out += [f"- `{'.'.join(p)} = {v}`" for p, v in settings]
    out += ["", "Postfix: main.cf holds only these (Postfix defaults otherwise: fsync on, "
            "default_destination_concurrency_limit 20, default_process_limit 100, connection cache on demand); "
            f"master.cf is the system's with smtp/inet commented out and `{smtpd_service}` added, chroot off:", ""]
    out += [f"- `{k} = {v}`" for k, v in pf_settings.items()]
    out += ["", "poolmta's config: the sections that matter here (the rest is the harness's: pools, tenants):", "",
            "```toml", *config_sections(poolmta_config, ("server", "delivery", "limits", "state")), "```"]
    out += ["", "## Commands", "", f"    {benchenv.command_line()}", "",
            f"poolmta listened on 127.0.0.1:{ports['poolmta']}, Postfix on 127.0.0.1:{ports['postfix']}; "
            f"the receivers on port {ports['mx']}.", ""]
    for w in workloads:
        seen = set()
        out.append(f"{w.name}:")
        out.append("")
        for c in sink_cmds.get(w.name, []) + [c for r in runs if r["workload"] == w.name for c in r["commands"]]:
            if c not in seen:
                seen.add(c)
                out.append(f"    {c}")
        out.append("")
    return "\n".join(out)


def config_sections(text: str, names: tuple[str, ...]) -> list[str]:
    """The lines of TEXT's tables NAMES (TOML), headers included."""
    out, keep = [], False
    for line in text.splitlines():
        if line.startswith("["):
            keep = line.strip().strip("[]") in names
        if keep and line.strip():
            out.append(line)
    return out


# -- the entry point -------------------------------------------------------------------------

OTHERS = {"decision": "decision.py", "queue-depth": "queue_depth.py"}


def run_other(name: str, args: list[str]) -> int:
    script = BENCH / OTHERS[name]
    if not script.exists():
        print(f"bench/run.py {name}: {script.relative_to(ROOT)} does not exist (not written yet?)", file=sys.stderr)
        return 2
    return subprocess.run([sys.executable, str(script), *args], cwd=str(ROOT)).returncode


def relay_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="bench/run.py relay", description="poolmta vs Postfix relay throughput")
    ap.add_argument("--smoke", action="store_true",
                    help=f"{SMOKE['rounds']} pair, {SMOKE['messages']} messages, {', '.join(SMOKE['workloads'])}")
    ap.add_argument("--rounds", type=int, help="(poolmta, postfix) pairs per workload (default 3)")
    ap.add_argument("--messages", type=int, help="smtp-source messages per run (default 1000)")
    ap.add_argument("--workloads", help=f"comma-separated (default {','.join(DEFAULT_WORKLOADS)})")
    ap.add_argument("--out", help="results file (default bench/results/<date>-relay.md, -relay-smoke.md with --smoke)")
    ap.add_argument("--poolmta-set", action="append", default=[], metavar="KEY=VALUE",
                    help="a setting for poolmta's config, e.g. server.workers=2 (repeatable; VALUE is TOML)")
    ap.add_argument("--poolmta-config", metavar="FILE", help="a TOML file whose settings go into poolmta's config")
    return ap


def parse_relay(argv: list[str]) -> argparse.Namespace:
    ap = relay_parser()
    a = ap.parse_args(argv)
    base = SMOKE if a.smoke else {"rounds": 3, "messages": 1000, "workloads": DEFAULT_WORKLOADS}
    a.rounds = a.rounds or base["rounds"]
    a.messages = a.messages or base["messages"]
    a.workloads = a.workloads.split(",") if a.workloads else base["workloads"]
    try:
        for n in a.workloads:
            parse_workload(n)
        for s in a.poolmta_set:
            parse_set(s)
    except argparse.ArgumentTypeError as e:
        ap.error(str(e))
    if a.rounds < 1 or a.messages < 1:
        ap.error("--rounds and --messages must be at least 1")
    return a


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cmds = ["relay", *OTHERS, "all"]
    if not argv or argv[0] not in cmds:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    # A SIGTERM (a CI timeout) still stops Postfix, the sinks and the gateway, and restores main.cf.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    cmd, rest = argv[0], argv[1:]
    if cmd == "relay":
        return relay(parse_relay(rest))
    if cmd in OTHERS:
        return run_other(cmd, rest)
    extra = ["--smoke"] if "--smoke" in rest else []
    unknown = [x for x in rest if x != "--smoke"]
    if unknown:
        print(f"bench/run.py all: only --smoke is understood, not {' '.join(unknown)}", file=sys.stderr)
        return 2
    try:
        codes = {"relay": relay(parse_relay(extra))}
    except Exception as e:      # the other two still run
        print(f"bench/run.py relay failed: {e!r}", file=sys.stderr)
        codes = {"relay": 1}
    for name in OTHERS:
        print(f"\n== bench/run.py {name} {' '.join(extra)}", flush=True)
        codes[name] = run_other(name, extra)
    print("\n" + ", ".join(f"{k}: {'ok' if v == 0 else f'exit {v}'}" for k, v in codes.items()))
    return max(codes.values())


if __name__ == "__main__":
    sys.exit(main())
