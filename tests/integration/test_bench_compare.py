"""``shmbroker-bench compare`` smoke runs (about 2 s per system, no timed assertions): every
system's servers start and stop, every record is counted and checked by sequence number, and
the table and JSON say what happened.  shmbroker and the raw baseline always run; Redis Streams
and NATS JetStream run where their server and client are installed (CI does not install them:
those tests skip there, saying how to install)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from shmbroker.perf.histogram import Histogram
from shmbroker.perf.peers import PEERS

pytestmark = pytest.mark.integration

BENCH = [sys.executable, "-m", "shmbroker.perf.cli", "compare"]
SHORT = ["--rounds", "1", "--duration-s", "1.5", "--warmup-s", "0.3"]


def compare(*args: str, timeout_s: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*BENCH, *args], capture_output=True, text=True, timeout=timeout_s)


def check_clean(run: subprocess.CompletedProcess[str], json_path: Path,
                systems: list[str], rounds: int = 1) -> dict:
    """Exit 0; per system a row and ``rounds`` runs, each of which sent records and consumed
    every one of them, exactly once (by count, and by sequence number: lost and duplicates)."""
    assert run.returncode == 0, run.stdout + run.stderr
    result = orjson.loads(json_path.read_bytes())
    assert [row["system"] for row in result["table"]] == systems
    assert len(result["runs"]) == rounds * len(systems)
    assert [run["system"] for run in result["runs"][:len(systems)]] == systems  # alternated
    for entry in result["runs"]:
        assert entry["sent"] > 0 and entry["acknowledged"] == entry["sent"], entry["system"]
        assert entry["consumed"] == entry["sent"], entry["system"]
        assert entry["lost"] == 0 and entry["duplicates"] == 0 and entry["send_errors"] == 0
        assert entry["produce_per_s"] > 0 and entry["consume_per_s"] > 0
        assert 0 < entry["p50_us"] <= entry["p99_us"]
        measured = Histogram.from_dict(entry["latency_histogram"]).count  # after the warm-up
        assert 0 < measured < entry["consumed"]
    for row in result["table"]:
        assert row["rounds"] == rounds and row["lost"] == 0 and row["mb_per_s"] > 0
        assert row["title"] in run.stdout
    assert result["config"]["systems"] == systems
    assert set(result["config"]["setups"]) == set(systems)
    assert result["environment"]["versions"]["python"]
    assert "produce rec/s" in run.stdout and "p99 ms" in run.stdout
    return result


def test_shmbroker_and_the_raw_baseline(tmp_path: Path) -> None:
    out = tmp_path / "compare.json"
    run = compare("--systems", "shmbroker,raw", *SHORT, "--json", str(out))
    result = check_clean(run, out, ["shmbroker", "raw"])
    shmbroker, raw = result["table"]
    assert shmbroker["shmbroker_x_produce"] == 1.0 and shmbroker["shmbroker_x_consume"] == 1.0
    assert raw["shmbroker_x_produce"] > 0 and raw["server_cpu_pct"] is None  # no server
    assert shmbroker["server_cpu_pct"] > 0  # psutil saw the embedded broker
    assert result["goal"]["met"] is None  # no Redis in this run: not evaluated
    assert "goal:" not in run.stdout


@pytest.mark.parametrize("peer", ["redis", "nats"])
def test_peer(peer: str, tmp_path: Path) -> None:
    reason = PEERS[peer].missing()
    if reason is not None:
        pytest.skip(reason)
    out = tmp_path / "compare.json"
    run = compare("--systems", peer, *SHORT, "--json", str(out))
    result = check_clean(run, out, [peer])
    (row,) = result["table"]
    assert row["server_cpu_pct"] is not None and result["runs"][0]["server_rss_bytes_max"] > 0
    assert row["shmbroker_x_produce"] is None  # shmbroker did not run: no ratio
    versions = result["environment"]["versions"]
    assert {"redis": "redis-server", "nats": "nats-server"}[peer] in versions

