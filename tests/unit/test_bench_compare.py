"""``shmbroker-bench compare`` without processes: a missing peer is skipped with the command
that installs it, systems alternate round by round, medians and per-round ratios, the goal's
verdict, and a lossy run makes the command say so and exit 1 (runs faked in-process)."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from click.testing import CliRunner

from shmbroker.perf import compare as compare_module
from shmbroker.perf.cli import main
from shmbroker.perf.histogram import Histogram
from shmbroker.perf.peers import PEERS, nats_jetstream, redis_streams
from shmbroker.perf.runner import RunResult
from shmbroker.perf.workload import Workload


@pytest.fixture
def no_redis_server(monkeypatch: pytest.MonkeyPatch) -> None:
    """No redis-server, and its client present: the hint must not depend on what this machine
    has installed."""
    monkeypatch.setattr(redis_streams, "find_binary", lambda name: None)
    monkeypatch.setattr(redis_streams, "module_missing", lambda *modules: [])


def test_a_peer_without_its_server_says_how_to_install_it(no_redis_server: None) -> None:
    reason = PEERS["redis"].missing()
    assert reason is not None and reason.startswith("redis-server not found")
    assert "apt-get install redis-server" in reason and "shmbroker[peers]" in reason


def test_a_peer_without_its_client_says_which_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nats_jetstream, "find_binary", lambda name: "/usr/sbin/nats-server")
    monkeypatch.setattr(nats_jetstream, "module_missing", lambda *modules: ["nats"])
    reason = PEERS["nats"].missing()
    assert reason is not None and "nats-py not installed" in reason
    assert "nats-server not found" not in reason and "shmbroker[peers]" in reason
    monkeypatch.setattr(redis_streams, "find_binary", lambda name: "/usr/bin/redis-server")
    monkeypatch.setattr(redis_streams, "module_missing", lambda *modules: ["hiredis"])
    assert "hiredis not installed" in (PEERS["redis"].missing() or "")


def test_the_command_skips_a_missing_peer_with_its_hint(no_redis_server: None) -> None:
    runnable, skipped = compare_module.plan(["shmbroker", "redis", "raw"])
    assert runnable == ["shmbroker", "raw"] and list(skipped) == ["redis"]
    run = CliRunner().invoke(main, ["compare", "--systems", "redis"])
    assert run.exit_code == 1
    assert "redis: skipped — redis-server not found; install: apt-get install redis-server " \
           "&& pip install 'shmbroker[peers]'" in run.output
    assert "no system to run" in run.output


@pytest.mark.parametrize("value, message", [
    ("redis,mongo", "unknown system 'mongo'"), (",", "name one or more")])
def test_bad_system_lists(value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        compare_module.parse_systems(value)
    run = CliRunner().invoke(main, ["compare", "--systems", value])
    assert run.exit_code == 2 and message in run.output


def test_system_lists_keep_order_and_drop_repeats() -> None:
    assert compare_module.parse_systems(" raw, shmbroker ,raw") == ["raw", "shmbroker"]


def _result(produce: float, consume: float, lost: int = 0) -> RunResult:
    latency = Histogram()
    latency.record_many([1_000_000, 2_000_000, 3_000_000])
    sent = 1000
    return RunResult(workload=Workload(name="compare"), elapsed_s=1.0, sent=sent,
                     acknowledged=sent, send_errors=0, consumed=sent - lost, lost=lost,
                     duplicates=0, produce_rate_per_s=produce, consume_rate_per_s=consume,
                     produce_mb_per_s=produce * 100 / 1e6, consume_mb_per_s=consume * 100 / 1e6,
                     latency=latency)


def test_rounds_alternate_and_ratios_are_medians_of_rounds(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # (system, round) -> (produce, consume): the baseline moves with the machine's noise; the
    # per-round ratios are redis 10, 20, 16 (produce) and 30, 15, 16 (consume)
    rates = {("shmbroker", 0): (100.0, 300.0), ("redis", 0): (10.0, 10.0),
             ("shmbroker", 1): (400.0, 300.0), ("redis", 1): (20.0, 20.0),
             ("shmbroker", 2): (160.0, 160.0), ("redis", 2): (10.0, 10.0)}
    order: list[str] = []
    monkeypatch.setattr(compare_module, "plan", lambda systems: (systems, {}))

    def fake_run(system: str, workload: Workload) -> RunResult:
        order.append(system)
        return _result(*rates[(system, (len(order) - 1) // 2)])

    monkeypatch.setattr(compare_module, "run_system", fake_run)
    out = tmp_path / "compare.json"
    run = CliRunner().invoke(main, ["compare", "--systems", "shmbroker,redis", "--rounds", "3",
                                    "--json", str(out)])
    assert run.exit_code == 0, run.output
    assert order == ["shmbroker", "redis"] * 3
    result = orjson.loads(out.read_bytes())
    shmbroker, redis = result["table"]
    assert shmbroker["produce_per_s"] == 160.0 and redis["produce_per_s"] == 10.0  # medians
    assert redis["shmbroker_x_produce"] == 16.0 and redis["shmbroker_x_consume"] == 16.0
    assert redis["shmbroker_x_produce_range"] == [10.0, 20.0]
    assert redis["shmbroker_x_consume_range"] == [15.0, 30.0]
    assert shmbroker["shmbroker_x_produce"] == 1.0
    assert result["goal"] == {"ratio_min": 15.0, "peer": "redis", "met": True,
                              "produce_ratio": 16.0, "consume_ratio": 16.0}
    assert "16.00x and 16.00x — met" in run.output


def test_a_lossy_run_is_reported_and_fails_the_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compare_module, "plan", lambda systems: (systems, {}))
    monkeypatch.setattr(compare_module, "run_system", lambda system, workload: _result(
        10.0, 10.0, lost=7 if system == "nats" else 0))
    run = CliRunner().invoke(main, ["compare", "--systems", "raw,nats", "--rounds", "2"])
    assert run.exit_code == 1
    assert "LOST 14 ACKNOWLEDGED RECORDS" in run.output and "nats (14)" in run.output
    assert "goal:" not in run.output  # neither shmbroker nor Redis ran


def test_the_goal_is_judged_only_at_full_speed_with_both_systems() -> None:
    rows = [{"system": "shmbroker", "shmbroker_x_produce": 1.0, "shmbroker_x_consume": 1.0},
            {"system": "redis", "shmbroker_x_produce": 20.0, "shmbroker_x_consume": 14.0}]
    assert compare_module.goal(rows)["met"] is False  # the slower side decides
    rows[1]["shmbroker_x_consume"] = 15.0
    assert compare_module.goal(rows)["met"] is True
    assert compare_module.goal(rows, paced=True)["met"] is None  # rates are the pace
    assert compare_module.goal(rows[:1])["met"] is None  # no Redis
