"""bench/latency_trace.py, briefly: a real broker traces its worker's steps, the script cuts
every measured record's latency into stages and prints them (a smoke test: no figure is
judged), and leaves nothing behind."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from shmbroker.partition import trace

pytestmark = pytest.mark.integration

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "latency_trace.py"
ROOT = SCRIPT.parents[1]
STAGES = ("pacing", "send call", "to the worker", "append", "to the answer", "to the consumer",
          "total")


def test_every_stage_of_the_measured_records(tmp_path: Path) -> None:
    environment = {**os.environ, "TMPDIR": str(tmp_path)}
    environment.pop(trace.TRACE_DIR_ENVIRONMENT, None)
    done = subprocess.run([sys.executable, str(SCRIPT), "--records", "400",
                           "--rate-per-sec", "2000", "--producer-spin-us", "0",
                           "--json", str(tmp_path / "out.json")],
                          capture_output=True, text=True, timeout=180, cwd=ROOT,
                          env=environment)
    assert done.returncode == 0, done.stdout + done.stderr
    counts = {match[1]: int(match[2]) for match in  # "  name   p50 p90 p99 count"
              re.finditer(r"^ +(\S.*?)\s+-?\d+\.\d(?:\s+-?\d+\.\d){2}\s+(\d+)$", done.stdout,
                          re.MULTILINE)}
    for name in STAGES:  # the last 360 (the first tenth is the warm-up), every one traced
        if name != "to the answer":
            assert counts[name] == 360, done.stdout
    # a record either left in a fetch answer or was read from the segment file directly
    assert counts.get("to the answer", 0) + counts.get("of which read directly", 0) == 360, (
        done.stdout)
    assert counts.get("answered at once", 0) + counts.get("parked, then answered", 0) > 0, (
        done.stdout)
    result = orjson.loads((tmp_path / "out.json").read_bytes())
    assert set(STAGES) <= set(result["rounds"][0]["stages"])  # (and "to the answer" split)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out.json"]  # temp dir gone
