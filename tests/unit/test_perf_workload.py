"""Workload validation, TOML loading, overrides, and the shipped bench/workloads files."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shmbroker.perf.workload import Workload, load_workload

ROOT = Path(__file__).resolve().parents[2]
WORKLOADS = sorted((ROOT / "bench" / "workloads").glob("*.toml"))


def test_defaults() -> None:
    workload = Workload()
    assert workload.to_dict() == {
        "name": "default", "topics": 1, "partitions": 1, "producers": 1, "consumers": 1,
        "group": None, "record_size": "100", "keyed": False, "rate_per_sec": 0,
        "duration_s": 10.0, "warmup_s": 0.0, "acks": "1", "linger_ms": 5,
        "batch_size_bytes": 65536, "ring_bytes": 8 * 1024 * 1024, "api": "per-record",
        "compression": "none", "payload": "random", "durable": False, "poll_spin_us": 0,
        "chunk_records": 1024,
    }
    orjson.dumps(workload.to_dict())  # JSON-serialisable for result files


@pytest.mark.parametrize(("fields", "message"), [
    ({"topics": 0}, r"'topics' must be an integer in \[1, 10000\], got 0"),
    ({"partitions": 5000}, r"'partitions' must be an integer in \[1, 4096\]"),
    ({"producers": 0}, "'producers' must be an integer in"),
    ({"consumers": 2.5}, "'consumers' must be an integer in"),
    ({"consumers": True}, "'consumers' must be an integer in"),
    ({"duration_s": 0}, r"'duration_s' must be a number of seconds in \(0, "),
    ({"duration_s": float("nan")}, "'duration_s' must be a number of seconds"),
    ({"warmup_s": -1}, r"'warmup_s' must be a number of seconds in \[0, "),
    ({"rate_per_sec": -1}, r"'rate_per_sec' must be an integer in \[0, "),
    ({"linger_ms": -1}, "'linger_ms' must be an integer in"),
    ({"batch_size_bytes": 1023}, r"'batch_size_bytes' must be an integer in \[1024, 67108864\]"),
    ({"batch_size_bytes": 64 * 1024 * 1024 + 1}, "'batch_size_bytes' must be an integer in"),
    ({"ring_bytes": 32768}, r"'ring_bytes' must be an integer in \[65536, 1073741824\]"),
    ({"ring_bytes": 65536 + 100}, "'ring_bytes' must be a multiple of 4096, got 65636"),
    ({"acks": "2"}, "'acks' must be one of '0', '1', 'all'; got '2'"),
    ({"api": "batch"}, "'api' must be one of 'per-record', 'columnar'; got 'batch'"),
    ({"compression": "snappy"},
     "'compression' must be one of 'none', 'gzip', 'lz4', 'zstd'; got 'snappy'"),
    ({"payload": "zeros"}, "'payload' must be one of 'random', 'telemetry'"),
    ({"record_size": "10-5"}, "'record_size': record size range '10-5' is reversed"),
    ({"record_size": "16"}, "'record_size': record size must be >= 24 bytes"),
    ({"record_size": 1.5}, "'record_size' must be a size such as"),
    ({"keyed": "yes"}, "'keyed' must be true or false"),
    ({"durable": 1}, "'durable' must be true or false"),
    ({"group": ""}, "'group' must be a consumer group id"),
    ({"name": "a b"}, "'name' must be 1 to 100 letters"),
    ({"poll_spin_us": -1}, r"'poll_spin_us' must be an integer in \[0, 1000000\], got -1"),
    ({"poll_spin_us": 1_000_001}, "'poll_spin_us' must be an integer in"),
])
def test_validation_names_the_field_and_the_allowed_values(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Workload(**fields)


def test_normalised_spellings() -> None:
    workload = Workload(record_size=1024, acks=-1, duration_s=5, rate_per_sec=1e4)  # type: ignore[arg-type]
    assert (workload.record_size, workload.acks, workload.rate_per_sec) == ("1024", "all", 10000)
    assert isinstance(workload.duration_s, float) and workload.duration_s == 5.0
    assert Workload(acks=0).acks == "0" and Workload(acks=1).acks == "1"  # type: ignore[arg-type]


def test_workload_is_frozen() -> None:
    with pytest.raises(AttributeError):
        Workload().topics = 3  # type: ignore[misc]


def test_overrides_skip_none_and_revalidate() -> None:
    base = Workload(partitions=4)
    changed = base.with_overrides({"duration_s": 3, "producers": None, "acks": "all"})
    assert (changed.duration_s, changed.producers, changed.acks, changed.partitions) == (
        3.0, 1, "all", 4)
    assert base.replace(rate_per_sec=None) == base
    assert base.replace(linger_ms=0).linger_ms == 0
    with pytest.raises(ValueError, match="'linger_ms' must be an integer"):
        base.replace(linger_ms=-3)
    with pytest.raises(ValueError, match="unknown workload field durations; known fields: name"):
        base.with_overrides({"durations": 3})


@settings(max_examples=100, deadline=None)
@given(partitions=st.integers(1, 4096), rate=st.integers(0, 10**9),
       duration=st.floats(0.001, 3600), acks=st.sampled_from(["0", "1", "all"]))
def test_to_dict_from_dict_round_trip(partitions: int, rate: int, duration: float,
                                      acks: str) -> None:
    workload = Workload(partitions=partitions, rate_per_sec=rate, duration_s=duration, acks=acks)
    assert Workload.from_dict(orjson.loads(orjson.dumps(workload.to_dict()))) == workload


# -- TOML files ----------------------------------------------------------------------------------

def test_load_toml(tmp_path: Path) -> None:
    path = tmp_path / "fan-out.toml"
    path.write_text('# a comment\npartitions = 8\nconsumers = 3\ngroup = "g"\n'
                    'record_size = "64-1024"\nduration_s = 2\n')
    workload = load_workload(path)
    assert workload == Workload(name="fan-out", partitions=8, consumers=3, group="g",
                                record_size="64-1024", duration_s=2.0)


def test_load_names_unknown_keys_and_the_known_ones(tmp_path: Path) -> None:
    path = tmp_path / "typo.toml"
    path.write_text("partitons = 8\nlinger = 3\n")
    with pytest.raises(ValueError) as caught:
        load_workload(path)
    message = str(caught.value)
    assert str(path) in message and "unknown workload fields linger, partitons" in message
    assert "known fields: name, topics, partitions, producers" in message


def test_load_reports_invalid_values_and_invalid_toml(tmp_path: Path) -> None:
    bad_value = tmp_path / "bad.toml"
    bad_value.write_text('acks = "most"\n')
    with pytest.raises(ValueError, match=r"bad.toml: workload field 'acks' must be one of"):
        load_workload(bad_value)
    bad_toml = tmp_path / "broken.toml"
    bad_toml.write_text("partitions = \n")
    with pytest.raises(ValueError, match="broken.toml: not valid TOML"):
        load_workload(bad_toml)
    nested = tmp_path / "nested.toml"
    nested.write_text("[producer]\nacks = 1\n")
    with pytest.raises(ValueError, match="unknown workload field producer"):
        load_workload(nested)


def test_the_shipped_workloads_are_there() -> None:
    assert {path.stem for path in WORKLOADS} >= {"default", "telemetry-4p", "latency-10k",
                                                 "durable-1k", "big-batches"}


@pytest.mark.parametrize("path", WORKLOADS, ids=[path.stem for path in WORKLOADS])
def test_every_shipped_workload_loads_and_validates(path: Path) -> None:
    workload = load_workload(path)
    workload.validate()
    assert workload.name == path.stem
    assert path.read_text().startswith("#"), "each workload file opens with what it models"


def test_shipped_workloads_say_what_the_issue_asked() -> None:
    by_name = {path.stem: load_workload(path) for path in WORKLOADS}
    assert by_name["default"] == Workload()
    telemetry = by_name["telemetry-4p"]
    assert (telemetry.partitions, telemetry.producers, telemetry.consumers, telemetry.group,
            telemetry.payload, telemetry.record_size, telemetry.keyed, telemetry.api) == (
        4, 4, 4, "bench", "telemetry", "64-1024", True, "columnar")
    latency = by_name["latency-10k"]
    assert (latency.rate_per_sec, latency.linger_ms, latency.record_size,
            latency.partitions) == (10000, 0, "100", 1)
    durable = by_name["durable-1k"]
    assert (durable.record_size, durable.acks, durable.partitions, durable.durable) == (
        "1024", "all", 1, True)
    big = by_name["big-batches"]
    assert (big.api, big.batch_size_bytes, big.chunk_records, big.record_size) == (
        "columnar", 1 << 20, 10_000, "100")


@pytest.mark.parametrize("value", [0, -1, 1.5, "many", True, (1 << 20) + 1])
def test_chunk_records_is_checked(value: object) -> None:
    with pytest.raises(ValueError, match="chunk_records"):
        Workload(chunk_records=value)  # type: ignore[arg-type]
    assert Workload().chunk_records == 1024 and Workload(chunk_records=10_000).chunk_records
