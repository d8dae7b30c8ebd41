"""shmbroker-bench smoke runs (2 seconds each, no timed assertions): the tool runs, counts every
record, and its JSON says what happened.  It exists so the tool cannot rot."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from broker_helpers import RunningBroker

pytestmark = pytest.mark.integration

BENCH = [sys.executable, "-m", "shmbroker.perf.cli"]


def bench(*args: str, timeout_s: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*BENCH, *args], capture_output=True, text=True, timeout=timeout_s)


def check_clean_run(run: subprocess.CompletedProcess[str], json_path: Path) -> dict:
    assert run.returncode == 0, run.stdout + run.stderr
    result = orjson.loads(json_path.read_bytes())
    assert result["sent"] > 0 and result["acknowledged"] == result["sent"]
    assert result["lost"] == 0 and result["send_errors"] == 0
    assert result["consumed"] >= result["acknowledged"]
    assert result["latency_histogram"]["max"] > 0 and result["latency_us"]["50"] > 0
    assert result["timeline"] and result["environment"]["python"]
    assert "lost 0" in run.stdout and "records/s" in run.stdout
    return result


def test_default_run_against_an_embedded_broker(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    run = bench("--duration-s", "2", "--json", str(out))
    result = check_clean_run(run, out)
    assert result["workload"]["name"] == "default" and result["workload"]["partitions"] == 1
    assert result["broker"]["broker_rss_bytes_max"] > 0  # psutil saw the embedded broker
    assert result["broker"]["broker_cpu_pct_median"] > 0
    # psutil saw the producer and the consumer, which never stop moving records in a run
    assert result["clients"]["producers_cpu_pct_median"] > 0
    assert result["clients"]["consumers_cpu_pct_median"] > 0
    assert "client processes: CPU producers" in run.stdout
    assert all(point["host_steal_cpu_pct"] >= 0 for point in result["timeline"])
    assert result["clients"]["host_steal_cpu_pct_max"] >= 0
    # each measured second's worst latency (from the warm-up's end on), the worst the max
    seconds = result["latency_max_per_s"]
    assert seconds and result["start_monotonic_s"] > 0
    warmup_s = result["workload"]["warmup_s"]
    indexes = [second["t_s"] - warmup_s for second in seconds]
    assert indexes == sorted(set(indexes)) and all(i >= 0 and i == int(i) for i in indexes)
    assert max(second["max_us"] for second in seconds) == pytest.approx(
        result["latency_histogram"]["max"] / 1000, rel=0.01)
    assert "slowest second:" in run.stdout and "\n  in it: " in run.stdout
    # each client's garbage collections, by generation, from its start gate on
    pauses = result["client_pauses"]
    assert set(pauses["collections"]) == {"producer 0", "consumer 0"}
    assert all(len(counts) == 3 and min(counts) >= 0 for counts in pauses["collections"].values())
    assert isinstance(pauses["long_collections"], list)
    assert "client pauses:" in run.stdout


@pytest.mark.parametrize("options", [
    ["--api", "columnar", "--partitions", "3", "--producers", "2", "--consumers", "2"],
    # a group with more consumers than partitions: one of them gets none
    ["--group", "bench", "--partitions", "2", "--consumers", "3", "--keyed",
     "--payload", "telemetry", "--record-size-bytes", "64-512"],
    ["--rate-per-sec", "2000", "--linger-ms", "0", "--acks", "all", "--warmup-s", "0.5",
     "--durable", "--record-size-bytes", "1024"],
    ["--api", "columnar", "--compression", "zstd", "--rate-per-sec", "20000"],
    # big batches: chunks longer than the default payload template, cut into 1 MiB batches
    ["--api", "columnar", "--batch-size-bytes", "1048576", "--chunk-records", "10000"],
], ids=["columnar-2x2", "group-telemetry", "paced-acks-all", "columnar-zstd-paced",
        "big-batches"])
def test_workloads_against_a_running_broker(broker: RunningBroker, tmp_path: Path,
                                            options: list[str]) -> None:
    out = tmp_path / "result.json"
    run = bench("--data-dir", str(broker.data_dir), "--duration-s", "2", "--json", str(out),
                *options)
    result = check_clean_run(run, out)
    if "--rate-per-sec" in options:  # paced: about the rate asked for, not as fast as it goes
        rate = int(options[options.index("--rate-per-sec") + 1])
        assert result["sent"] <= rate * (2 + result["workload"]["warmup_s"]) + 1024
    with broker.admin() as admin:  # its topics are gone again
        assert not [name for name in admin.list_topics() if name.startswith("shmbroker-bench")]


def test_workload_file_and_overrides(broker: RunningBroker, tmp_path: Path) -> None:
    workload = Path(__file__).parents[2] / "bench" / "workloads" / "latency-10k.toml"
    out = tmp_path / "result.json"
    run = bench("--data-dir", str(broker.data_dir), "--workload", str(workload),
                "--duration-s", "1", "--json", str(out))
    result = check_clean_run(run, out)
    assert result["workload"]["rate_per_sec"] == 10_000 and result["workload"]["duration_s"] == 1


@pytest.mark.parametrize("args, message", [
    (["--record-size-bytes", "10"], "24"),
    (["--record-size-bytes", "9-3"], "record"),
    (["--partitions", "0"], "--partitions"),
    (["--acks", "2"], "--acks"),
    (["--duration-s", "-1"], "--duration-s"),
    (["--ring-bytes", "65537"], "'ring_bytes' must be a multiple of 4096"),
    (["--broker-setting", "worker_check_thread=sometimes"],
     "worker_check_thread must be one of auto, on, off, not 'sometimes'"),
    (["--broker-setting", "no_such_setting=1"], "unknown broker setting 'no_such_setting'"),
    (["--broker-setting", "worker_spin_us"], "give NAME=VALUE"),
    (["scale", "--broker-setting", "worker_spin_us=-1"], "worker_spin_us must be >= 0"),
])
def test_bad_options_are_usage_errors(args: list[str], message: str) -> None:
    run = bench(*args, "--duration-s", "1") if "--duration-s" not in args else bench(*args)
    assert run.returncode == 2, run.stdout + run.stderr
    assert message in run.stderr


def test_spinning_consumers_and_workers(tmp_path: Path) -> None:
    """--poll-spin-us reaches the consumers (the workload says so), --worker-spin-us the
    embedded broker (a setting it refused would stop it starting); the run is clean."""
    out = tmp_path / "result.json"
    run = bench("--duration-s", "1", "--rate-per-sec", "2000", "--linger-ms", "0",
                "--poll-spin-us", "300", "--worker-spin-us", "300", "--json", str(out))
    result = check_clean_run(run, out)
    assert result["workload"]["poll_spin_us"] == 300
    assert "consumers spin 300 µs" in run.stdout


@pytest.mark.parametrize("args", [["--worker-spin-us", "10"],
                                  ["--broker-setting", "worker_check_thread=off"],
                                  ["scale", "--broker-setting", "worker_check_thread=off"]])
def test_broker_settings_need_the_embedded_broker(tmp_path: Path, args: list[str]) -> None:
    run = bench(*args, "--data-dir", str(tmp_path), "--duration-s", "1")
    assert run.returncode == 2 and "keeps its own config" in run.stderr, run.stderr


def test_the_embedded_broker_runs_with_the_settings_given() -> None:
    """The config file it writes is the one the broker was started with, and reads back as
    the settings (a string and an integer)."""
    import psutil

    from shmbroker.config import BrokerConfig
    from shmbroker.perf.cli import embedded_broker

    with embedded_broker({"worker_check_thread": "off", "worker_spin_us": 7}) as (data_dir, pid):
        assert (data_dir / "broker.sock").exists()
        command = psutil.Process(pid).cmdline()
        config = BrokerConfig.load(command[command.index("--config") + 1])
    assert (config.worker_check_thread, config.worker_spin_us) == ("off", 7)
    assert config.worker_standby_count == BrokerConfig().worker_standby_count  # the rest: defaults


def test_no_broker_at_the_data_dir(tmp_path: Path) -> None:
    run = bench("--data-dir", str(tmp_path / "nothing"), "--duration-s", "1")
    assert run.returncode == 1 and "no broker at" in run.stderr


def test_scale_sweep(broker: RunningBroker, tmp_path: Path) -> None:
    out = tmp_path / "scale.json"
    run = bench("scale", "--data-dir", str(broker.data_dir), "--partitions", "1,2",
                "--duration-s", "1", "--warmup-s", "0", "--json", str(out))
    assert run.returncode == 0, run.stdout + run.stderr
    result = orjson.loads(out.read_bytes())
    assert [row["partitions"] for row in result["table"]] == [1, 2]
    first = result["table"][0]
    assert first["speed_up"] == (1.0 if first["rate_per_s"] else 0.0)
    # Rates are medians of whole seconds: one second on a loaded 2-core box may see a second
    # partition's worker still starting.  What every run must show is records moved end to end.
    for sweep_run in result["runs"]:
        assert sweep_run["consumed"] >= sweep_run["acknowledged"] > 0, sweep_run
    assert "speed-up" in run.stdout and "CPUs" in run.stdout
    for row in result["table"]:  # where each partition's cores went
        assert all(row[f"{kind}_cpu_pct"] > 0 for kind in ("producers", "broker", "consumers"))
    assert "producer/broker/consumer" in run.stdout


def test_scale_refuses_bad_partition_lists() -> None:
    run = bench("scale", "--partitions", "1,x")
    assert run.returncode == 2 and "comma-separated" in run.stderr


def test_unkeyed_producers_split_the_partitions() -> None:
    from shmbroker.perf.runner import producer_share

    parts = [("t", p) for p in range(4)]
    assert [producer_share(parts, i, 4) for i in range(4)] == [[("t", p)] for p in range(4)]
    assert producer_share(parts, 1, 2) == [("t", 1), ("t", 3)]
    assert producer_share(parts, 0, 1) == parts
    assert [producer_share(parts[:2], i, 3) for i in range(3)] == [
        [("t", 0)], [("t", 1)], [("t", 0)]]


def test_plot_without_matplotlib_fails_before_the_run(tmp_path: Path) -> None:
    if importlib.util.find_spec("matplotlib") is not None:
        pytest.skip("matplotlib is installed: --plot works")
    run = bench("--plot", str(tmp_path / "plot.png"), "--duration-s", "1")
    assert run.returncode == 1 and "pip install 'shmbroker[plot]'" in run.stderr
    assert "records/s" not in run.stdout  # refused before a run, not after it
