"""The soak run as CI runs it: 60 s of producers and two consumer groups under a seeded schedule
of faults; every acknowledged record must be consumed by both groups (issue 6)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.fault, pytest.mark.slow]

SEED = 20261126
SOAK_TIMEOUT_S = 480


def test_soak_60s_with_faults(tmp_path):
    work = tmp_path / "soak"
    report = tmp_path / "soak.json"
    command = [sys.executable, "-m", "shmbroker.perf.cli", "soak", "--duration-s", "60",
               "--fault-interval-s", "6", "--seed", str(SEED), "--rate-per-producer", "300",
               "--stop-worker-s", "3", "--work-dir", os.fspath(work), "--json",
               os.fspath(report)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=SOAK_TIMEOUT_S)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    result = json.loads(report.read_bytes())
    assert result["ok"] and not result["errors"], output[-6000:]
    assert result["config"]["seed"] == SEED
    assert len(result["faults"]) >= 4, output[-6000:]
    assert len({fault["kind"] for fault in result["faults"]}) >= 3
    assert all(fault["recover_s"] is not None for fault in result["faults"])
    assert result["producers"]["acknowledged"] > 10_000
    for group in ("soak-a", "soak-b"):
        counts = result["groups"][group]
        assert counts["lost"] == 0
        assert counts["unique"] >= result["producers"]["acknowledged"]
    assert result["misplaced"] == 0 and result["stored_twice"] == 0
    assert "verdict: OK" in done.stdout
    assert f"soak seed {SEED}" in done.stderr
