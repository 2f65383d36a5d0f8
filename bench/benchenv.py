"""What every results file of bench/decision.py and bench/queue_depth.py starts with, and the
small helpers they share: when it ran, on what machine, with which versions, by which exact
command; percentiles; a process's memory from /proc; writing the table to a file and stdout.
"""

from __future__ import annotations

import datetime
import math
import os
import shlex
import shutil
import sqlite3
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def default_out(name: str) -> Path:
    return RESULTS / f"{datetime.date.today().isoformat()}-{name}.md"


def _meminfo_gib() -> str:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    return "?"


def _nproc() -> str:
    try:
        return subprocess.run(["nproc"], capture_output=True, text=True, timeout=5).stdout.strip() or "?"
    except OSError:
        return str(len(os.sched_getaffinity(0)))


def git_version() -> str:
    """The short hash of HEAD, with "+uncommitted src/" when src/ differs from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=10).stdout.strip()
    try:
        head = git("rev-parse", "--short", "HEAD") or "?"
        dirty = git("status", "--porcelain", "--", "src")
    except OSError:
        return "?"
    return head + (" + uncommitted changes in src/" if dirty else "")


def interpreter() -> str:
    """Which CPython runs poolmta: the same code cost ~15 % less CPU per message on
    Debian's /usr/bin/python3 than on a plain `./configure` build (pyenv's default)."""
    exe = os.path.realpath(sys.executable)
    args = sysconfig.get_config_var("CONFIG_ARGS") or ""
    how = ("the distribution's build" if exe.startswith("/usr/bin/") else
           "configured with --enable-optimizations" if "--enable-optimizations" in args else
           "configured without --enable-optimizations")
    return f"{sys.executable} ({exe}; {how})"


def command_line() -> str:
    """The command as it was typed (interpreter included), e.g. through bench/run.py; the
    interpreter by its name when it is the one on PATH, else by its path."""
    argv = list(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])
    if shutil.which(os.path.basename(argv[0])) == argv[0] or not os.path.isabs(argv[0]):
        argv[0] = os.path.basename(argv[0])
    return " ".join(shlex.quote(a) for a in argv)


def header(title: str) -> str:
    today = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return "\n".join([
        f"# {title}",
        "",
        "| | |",
        "|---|---|",
        f"| date | {today} |",
        f"| machine | {_nproc()} cores (nproc), {_meminfo_gib()} memory (MemTotal) |",
        f"| versions | Python {sys.version.split()[0]}, poolmta {git_version()}, SQLite {sqlite3.sqlite_version} |",
        f"| interpreter | {interpreter()} |",
        f"| load average at start | {Path('/proc/loadavg').read_text().split()[0]} (1 min; other work on the machine) |",
        f"| command | `{command_line()}` |",
        "",
        "",
    ])


def percentile(sorted_values: list, q: float):
    """Nearest-rank percentile of an already sorted list (q in 0..100)."""
    if not sorted_values:
        return float("nan")
    k = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(k, len(sorted_values)) - 1]


def proc_memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in KiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process (all its threads) has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def mib(kib: int) -> str:
    return f"{kib / 1024:.0f} MiB"


def write(out: str | os.PathLike, text: str) -> None:
    """Print the results and write them to OUT (its folder made if needed)."""
    print(text)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"(written to {path})")
