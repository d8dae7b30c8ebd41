"""bench/write_stalls.py, briefly: it appends at the paced rate, reports each second, cleans up,
and refuses bad arguments."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "write_stalls.py"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=60)


def test_a_short_run_with_fsyncs(tmp_path: Path) -> None:
    done = run("--dir", str(tmp_path), "--seconds", "1.2", "--rate-per-sec", "2000",
               "--fsync-every-s", "0.2")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"{tmp_path}: 2,000 writes/s of 170 B, fsync every 0.2 s"
    rows = [line.split() for line in lines[2:-1]]
    seconds = [int(row[0]) for row in rows]  # (a write late past 2 s on a loaded machine: 2)
    assert seconds[:2] == [0, 1] and seconds == sorted(set(seconds))
    assert all(float(row[1]) > 0 and int(row[2]) >= 0 for row in rows)
    assert lines[-1].startswith("median of the seconds' longest: ")
    assert list(tmp_path.iterdir()) == []  # its file is gone


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    done = run("--dir", str(tmp_path), "--rate-per-sec", "0")
    assert done.returncode == 2 and "must be positive" in done.stderr
