"""bench/run.py relay --smoke, as CI runs it: it completes, prints its table with figures for both
sides of every smoke workload, and writes the results file. The figures themselves are never
asserted (they are for bench/results/)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SMOKE_WORKLOADS = ["4k-s20-r1", "mix-4k-s20"]
NUM = r"([0-9]+(?:\.[0-9]+)?)"


@pytest.mark.slow
def test_relay_smoke_prints_its_table(tmp_path):
    out = tmp_path / "relay.md"
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "relay", "--smoke", "--out", str(out)],
                       capture_output=True, text=True, timeout=300, cwd=str(ROOT))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    for w in SMOKE_WORKLOADS:
        for side in ("poolmta", "postfix"):
            row = re.search(rf"^\| {re.escape(w)} \| {side} \|(.*)\|$", p.stdout, re.M)
            assert row, f"no table row for {w} / {side}:\n{p.stdout[-3000:]}"
            cells = [c.strip() for c in row.group(1).split("|")]
            assert len(cells) == 7 and all(re.fullmatch(NUM, c) for c in cells), row.group(0)
            assert all(float(c) > 0 for c in cells), row.group(0)
        assert re.search(rf"^\| {re.escape(w)} \| median \| {NUM} \| {NUM} \|", p.stdout, re.M), w
    assert out.exists()
    text = out.read_text()
    assert "smtp-source -s" in text and "every recipient of every run was delivered" in text
    assert "mix-4k-s20" in text and '"relay":' in text          # the mix's per-pool counts


def test_unknown_subcommand_prints_usage():
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "nonsense"], capture_output=True, text=True,
                       timeout=60, cwd=str(ROOT))
    assert p.returncode == 2 and "bench/run.py relay" in p.stderr
