"""bench/rolls.py, briefly: it appends with rolls and tickets, reports each run, cleans up, and
refuses bad arguments."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "rolls.py"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=120)


def test_a_short_run_rolls_and_reports(tmp_path: Path) -> None:
    done = run("--dir", str(tmp_path), "--size-gib", "0.02", "--segment-mib", "4", "--runs", "1",
               "--writeback-mib", "1")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("0.02 GiB of 1 MiB appends per run, 4 MiB segments, "
                               "writeback every 1 MiB")
    row = lines[2].split()
    assert row[0] == "0" and float(row[1]) > 0
    assert int(row[2]) >= 5  # 20 MiB in 4 MiB segments: rolled
    assert all(float(value) >= 0 for value in row[3:])
    assert lines[-1].startswith("medians: rolls ms ")
    assert list(tmp_path.iterdir()) == []  # its files are gone


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    for bad in (("--segment-mib", "0"), ("--writeback-mib", "-1")):
        done = run("--dir", str(tmp_path), *bad)
        assert done.returncode == 2 and "must be positive" in done.stderr
