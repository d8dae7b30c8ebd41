"""Topic administration through a real broker: create, describe, list, alter configs (applied by
the running workers: segment rolls and retention), add partitions, delete (files, shared memory
and workers gone; the name reusable), invalid names and partition counts, and a restart that
keeps every topic and config."""

from __future__ import annotations

import os
import time
from pathlib import Path

import psutil
import pytest
from broker_helpers import RunningBroker, wait_for
from integration.produce_helpers import check_acked, read_partitions

from shmbroker import Consumer, Producer, TopicPartition
from shmbroker.client.partitioner import partition_for_key
from shmbroker.config import LogConfig
from shmbroker.errors import (
    BrokerError,
    InvalidConfigError,
    InvalidPartitionsError,
    InvalidTopicNameError,
    ProtocolError,
    TopicExistsError,
    UnknownTopicOrPartitionError,
)
from shmbroker.shm import names

pytestmark = pytest.mark.integration


SEGMENT_BYTES = 2048
HOUR_MS = 3_600_000


def _segments(broker: RunningBroker, topic: str, partition: int) -> list[str]:
    directory = broker.data_dir / "topics" / topic / str(partition)
    return sorted(name for name in os.listdir(directory) if name.endswith(".log"))


def _partitions(broker: RunningBroker, topic: str) -> dict[int, dict[str, object]]:
    with broker.admin() as admin:
        return {entry["partition"]: entry for entry in admin.describe_topic(topic)["partitions"]}


def _produce(broker: RunningBroker, topic: str, values: list[bytes], partition: int = 0,
             timestamp_ms: int | None = None) -> list[tuple[bytes, int, int]]:
    # one batch per record, so that small segment_bytes roll often
    with Producer(broker.data_dir, linger_ms=0, batch_size_bytes=1) as producer:
        futures = [producer.send(topic, value, partition=partition, timestamp_ms=timestamp_ms)
                   for value in values]
        producer.flush(20)
        return [(value, partition, future.result(5).offset)
                for value, future in zip(values, futures)]


def test_create_describe_list(broker: RunningBroker) -> None:
    with broker.admin() as admin:
        created = admin.create_topic("alpha", partitions=3, config={"retention_ms": HOUR_MS})
        admin.create_topic("beta")
        assert created["name"] == "alpha" and len(created["partitions"]) == 3
        assert all(entry["state"] == "running" and entry["worker_pid"]
                   for entry in created["partitions"])
        assert sorted(admin.list_topics()) == ["alpha", "beta"]
        with pytest.raises(TopicExistsError, match="alpha"):
            admin.create_topic("alpha", partitions=1)
        with pytest.raises(UnknownTopicOrPartitionError, match="gamma"):
            admin.describe_topic("gamma")
        described = admin.describe_topic("alpha")
    assert described["config"] == {"retention_ms": HOUR_MS}
    assert described["effective_config"] == LogConfig(retention_ms=HOUR_MS).as_dict()
    for entry in described["partitions"]:
        assert (entry["log_start_offset"], entry["log_end_offset"],
                entry["high_watermark"]) == (0, 0, 0)
        assert entry["size_bytes"] == 0
        assert psutil.pid_exists(entry["worker_pid"])

    acked = []
    for partition in range(3):
        acked += _produce(broker, "alpha", [b"a%d-%d" % (partition, i) for i in range(10 * (
            partition + 1))], partition=partition)
    described_after = _partitions(broker, "alpha")
    for partition in range(3):
        entry = described_after[partition]
        assert (entry["log_start_offset"], entry["log_end_offset"],
                entry["high_watermark"]) == (0, 10 * (partition + 1), 10 * (partition + 1))
        assert entry["size_bytes"] > 0
    assert check_acked(acked, read_partitions(broker.data_dir, "alpha", range(3))) == 60
    with broker.admin() as admin:
        status = admin.status()
    assert status["topics"] == 2 and status["partitions"] == 4
    assert status["workers_alive"] == 4


def test_alter_configs_rolls_segments_and_applies_retention(broker: RunningBroker) -> None:
    with broker.admin() as admin:
        admin.create_topic("logs", partitions=1, config={"retention_ms": -1})
    value = b"v" * 100
    acked = _produce(broker, "logs", [value + b"%d" % i for i in range(20)])
    assert len(_segments(broker, "logs", 0)) == 1

    with broker.admin() as admin:
        altered = admin.alter_configs("logs", {"segment_bytes": SEGMENT_BYTES})
        assert altered["config"] == {"retention_ms": -1, "segment_bytes": SEGMENT_BYTES}
        assert admin.describe_topic("logs")["effective_config"]["segment_bytes"] == SEGMENT_BYTES

    # The worker rolls at the new size: wait until it applied the change (SIGHUP), then fill.
    def rolled() -> bool:
        acked.extend(_produce(broker, "logs", [value + b"r%d" % len(acked)]))
        return len(_segments(broker, "logs", 0)) > 1

    wait_for(rolled, 10, message="a segment roll after segment_bytes was lowered")
    acked += _produce(broker, "logs", [value + b"x%d" % i for i in range(200)])
    segments = _segments(broker, "logs", 0)
    assert len(segments) >= 200 * len(value) // SEGMENT_BYTES
    for name in segments:
        size = (broker.data_dir / "topics" / "logs" / "0" / name).stat().st_size
        assert size <= SEGMENT_BYTES or name == segments[0], (name, size)
    assert check_acked(acked, read_partitions(broker.data_dir, "logs", [0])) == len(acked)

    # Size retention: the oldest sealed segments go until the partition fits.
    retention_bytes = 4 * SEGMENT_BYTES
    with broker.admin() as admin:
        admin.alter_configs("logs", {"retention_bytes": retention_bytes})
    def within_retention() -> bool:  # Kafka's rule: delete while the rest is still too big
        try:
            sizes = [(broker.data_dir / "topics" / "logs" / "0" / name).stat().st_size
                     for name in _segments(broker, "logs", 0)]
        except FileNotFoundError:  # retention deleted one between the listing and the stat
            return False
        if sum(sizes) - sizes[0] >= retention_bytes:
            return False
        # The worker publishes the new log start just after it deleted the files: wait for it.
        return _partitions(broker, "logs")[0]["log_start_offset"] != 0

    wait_for(within_retention, 10, message="retention_bytes to delete segments")
    assert len(_segments(broker, "logs", 0)) < len(segments)
    log_start = int(_partitions(broker, "logs")[0]["log_start_offset"])  # type: ignore[call-overload]
    assert 0 < log_start < len(acked)
    assert _segments(broker, "logs", 0)[0] == f"{log_start:020d}.log"
    kept = [entry for entry in acked if entry[2] >= log_start]
    records = read_partitions(broker.data_dir, "logs", [0])
    assert check_acked(kept, records) == len(kept) == len(records[0])

    # Removing an override (None) restores the default.
    with broker.admin() as admin:
        altered = admin.alter_configs("logs", {"retention_bytes": None})
        assert "retention_bytes" not in altered["config"]
        assert admin.describe_topic("logs")["effective_config"]["retention_bytes"] == (
            LogConfig().retention_bytes)


def test_time_retention_deletes_old_segments_only(broker: RunningBroker) -> None:
    with broker.admin() as admin:
        admin.create_topic("aging", partitions=1,
                           config={"retention_ms": -1, "segment_bytes": SEGMENT_BYTES})
    now_ms = time.time_ns() // 1_000_000
    old = _produce(broker, "aging", [b"old-%03d" % i + b"." * 100 for i in range(100)],
                   timestamp_ms=now_ms - 10 * HOUR_MS)
    new = _produce(broker, "aging", [b"new-%03d" % i + b"." * 100 for i in range(60)])
    assert len(_segments(broker, "aging", 0)) > 4
    assert _partitions(broker, "aging")[0]["log_start_offset"] == 0

    with broker.admin() as admin:
        admin.alter_configs("aging", {"retention_ms": HOUR_MS})
    wait_for(lambda: _partitions(broker, "aging")[0]["log_start_offset"] != 0, 10,
             message="retention_ms to delete the old segments")
    # Only segments whose newest record is older than an hour went.
    wait_for(lambda: len(old) - int(_partitions(broker, "aging")[0]["log_start_offset"])
             < SEGMENT_BYTES // 100, 10, message="every old sealed segment deleted")
    log_start = int(_partitions(broker, "aging")[0]["log_start_offset"])  # type: ignore[call-overload]
    assert 0 < log_start <= len(old)
    records = read_partitions(broker.data_dir, "aging", [0])
    kept = [entry for entry in old if entry[2] >= log_start] + new
    assert check_acked(kept, records) == len(kept) == len(records[0])


def test_add_partitions(broker: RunningBroker) -> None:
    with broker.admin() as admin:
        admin.create_topic("grow", partitions=1)
        acked = _produce(broker, "grow", [b"first-%d" % i for i in range(10)])
        grown = admin.create_partitions("grow", 3)
        assert len(grown["partitions"]) == 3
        assert all(entry["state"] == "running" for entry in grown["partitions"])
        with pytest.raises(InvalidPartitionsError, match="3 partitions"):
            admin.create_partitions("grow", 2)
        with pytest.raises(UnknownTopicOrPartitionError):
            admin.create_partitions("nope", 2)
    for partition in (1, 2):
        acked += _produce(broker, "grow", [b"p%d-%d" % (partition, i) for i in range(10)],
                          partition=partition)
    with Producer(broker.data_dir, linger_ms=0) as producer:  # keyed records spread over 3
        keyed = [(key, producer.send("grow", b"keyed-%d" % i, key=key).result(5))
                 for i, key in enumerate(b"key-%d" % i for i in range(30))]
    for index, (key, meta) in enumerate(keyed):
        assert meta.partition == partition_for_key(key, 3)
        acked.append((b"keyed-%d" % index, meta.partition, meta.offset))
    records = read_partitions(broker.data_dir, "grow", range(3))
    assert check_acked(acked, records) == len(acked) == sum(map(len, records.values()))
    assert {partition for _, partition, _ in acked} == {0, 1, 2}


def test_existing_producer_sees_added_partitions(broker: RunningBroker) -> None:
    with broker.admin() as admin:
        admin.create_topic("grow", partitions=1)
    with Producer(broker.data_dir, linger_ms=0) as producer:
        assert producer.send("grow", b"before", partition=0).result(5).offset == 0
        with broker.admin() as admin:
            admin.create_partitions("grow", 3)
        assert producer.send("grow", b"after", partition=2).result(5).offset == 0


def test_delete_topic_removes_files_memory_and_workers(broker: RunningBroker) -> None:
    with broker.admin() as admin:
        doomed = admin.create_topic("doomed", partitions=2)
        admin.create_topic("bystander", partitions=1)
    topic_id = doomed["topic_id"]
    pids = [entry["worker_pid"] for entry in doomed["partitions"]]
    prefix = names.shm_prefix(broker.data_dir)
    shm_marker = f"{prefix}.t{topic_id}."
    _produce(broker, "doomed", [b"d%d" % i for i in range(20)], partition=0)
    _produce(broker, "doomed", [b"d%d" % i for i in range(5)], partition=1)
    bystander = _produce(broker, "bystander", [b"b%d" % i for i in range(20)])
    with Producer(broker.data_dir) as producer:  # leaves a ring behind, drained and removed
        producer.send("doomed", b"ring", partition=1).result(5)
    assert any(name.startswith(shm_marker) for name in os.listdir("/dev/shm"))
    assert (broker.data_dir / "topics" / "doomed").is_dir()

    with broker.admin() as admin:
        admin.delete_topic("doomed")
        assert admin.list_topics() == ["bystander"]
        with pytest.raises(UnknownTopicOrPartitionError):
            admin.describe_topic("doomed")
        with pytest.raises(UnknownTopicOrPartitionError):
            admin.delete_topic("doomed")
    assert not (broker.data_dir / "topics" / "doomed").exists()
    assert list((broker.data_dir / "deleted").iterdir()) == []
    assert [name for name in os.listdir("/dev/shm") if name.startswith(shm_marker)] == []
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    run_files = [path.name for path in (broker.data_dir / "run").iterdir()]
    assert not [name for name in run_files if name.startswith(f"t{topic_id}p")], run_files

    # The name is free again: a new topic, new id, offsets from 0, none of the old records.
    with broker.admin() as admin:
        reborn = admin.create_topic("doomed", partitions=1)
    assert reborn["topic_id"] != topic_id
    again = _produce(broker, "doomed", [b"again-%d" % i for i in range(5)])
    assert [offset for _, _, offset in again] == list(range(5))
    records = read_partitions(broker.data_dir, "doomed", [0])
    assert check_acked(again, records) == 5 == len(records[0])
    assert check_acked(bystander, read_partitions(broker.data_dir, "bystander", [0])) == 20


def test_producer_follows_a_recreated_topic(broker: RunningBroker) -> None:
    with broker.admin() as admin:
        admin.create_topic("phoenix", partitions=1)
    with Producer(broker.data_dir, linger_ms=0, delivery_timeout_ms=2000) as producer:
        assert producer.send("phoenix", b"first life").result(5).offset == 0
        with broker.admin() as admin:
            admin.delete_topic("phoenix")
            admin.create_topic("phoenix", partitions=1)
        # A record sent before the producer noticed the change went to the deleted topic's
        # ring: it fails with a clear error (it is not silently stored in the new topic).
        # Whatever the producer sends after it noticed lands in the new topic.
        racing = producer.send("phoenix", b"racing the delete")
        error = racing.exception(10)
        expected = []
        if error is None:
            expected.append((b"racing the delete", 0, racing.result(0).offset))
        else:
            assert isinstance(error, UnknownTopicOrPartitionError), repr(error)
            assert "deleted" in str(error)
        meta = producer.send("phoenix", b"second life").result(5)
        expected.append((b"second life", 0, meta.offset))
    assert meta.offset == len(expected) - 1
    assert check_acked(expected, read_partitions(broker.data_dir, "phoenix", [0])) == len(
        expected)


@pytest.mark.parametrize("name", ["a/b", "..", ".", "", "x" * 250, "caf\u00e9", "a b",
                                  "../../etc"])
def test_invalid_topic_names(broker: RunningBroker, name: str) -> None:
    with broker.admin() as admin:
        with pytest.raises(InvalidTopicNameError) as caught:
            admin.create_topic(name)
        message = str(caught.value)
        assert "invalid topic name" in message and "[a-zA-Z0-9._-]" in message
        assert admin.list_topics() == []
    assert list((broker.data_dir / "topics").iterdir()) == []
    with pytest.raises(InvalidTopicNameError), Producer(broker.data_dir) as producer:
        producer.send(name, b"x")


def test_topic_name_limits_and_invalid_partition_counts(broker: RunningBroker) -> None:
    longest = "x" * 249
    with broker.admin() as admin:
        admin.create_topic(longest)
        admin.create_topic("a.b_c-D9")
        assert sorted(admin.list_topics()) == sorted([longest, "a.b_c-D9"])
        for partitions in (0, -1, 4097):
            with pytest.raises(InvalidPartitionsError, match="partition count"):
                admin.create_topic("counted", partitions=partitions)
    for partitions in ("x", 1.5, None, True):
        with broker.admin() as admin, pytest.raises((InvalidPartitionsError, ProtocolError)) \
                as caught:
            admin.create_topic("counted", partitions=partitions)  # type: ignore[arg-type]
        assert "partitions" in str(caught.value)
    with broker.admin() as admin:
        assert "counted" not in admin.list_topics()
        for config in ({"nope": 1}, {"segment_bytes": 5}, {"segment_bytes": "abc"},
                       {"cleanup_policy": "compact"}):
            with pytest.raises((InvalidConfigError, BrokerError)) as caught_config:
                admin.create_topic("configured", config=config)
            assert next(iter(config)) in str(caught_config.value)
        assert "configured" not in admin.list_topics()
    acked = _produce(broker, longest, [b"long-%d" % i for i in range(5)])
    assert check_acked(acked, read_partitions(broker.data_dir, longest, [0])) == 5


def test_admin_keeps_working_after_a_refused_request(broker: RunningBroker) -> None:
    with broker.admin() as admin:
        with pytest.raises((InvalidPartitionsError, ProtocolError)):
            admin.create_topic("t", partitions="x")  # type: ignore[arg-type]
        assert admin.list_topics() == []


def test_invalid_config_raises_invalid_config_error(broker: RunningBroker) -> None:
    with broker.admin() as admin, pytest.raises(InvalidConfigError, match="nope"):
        admin.create_topic("t", config={"nope": 1})


def test_restart_keeps_topics_and_configs(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with RunningBroker(data_dir) as broker:
        broker.wait_ready()
        with broker.admin() as admin:
            admin.create_topic("kept", partitions=2, config={"retention_ms": HOUR_MS})
            admin.create_topic("changed", partitions=1)
            admin.create_topic("dropped", partitions=1)
            admin.alter_configs("changed", {"segment_bytes": SEGMENT_BYTES,
                                            "retention_ms": -1})
            admin.create_partitions("changed", 2)
            admin.delete_topic("dropped")
            before = {name: admin.describe_topic(name) for name in ("kept", "changed")}
        acked = _produce(broker, "changed", [b"c" * 100 + b"%d" % i for i in range(50)])
        acked += _produce(broker, "changed", [b"one-%d" % i for i in range(5)], partition=1)
        segments_before = len(_segments(broker, "changed", 0))
        assert segments_before > 1
    with RunningBroker(data_dir) as broker:
        broker.wait_ready()
        with broker.admin() as admin:
            assert sorted(admin.list_topics()) == ["changed", "kept"]
            after = {name: admin.describe_topic(name) for name in ("kept", "changed")}
        for name in ("kept", "changed"):
            assert after[name]["topic_id"] == before[name]["topic_id"]
            assert after[name]["config"] == before[name]["config"]
            assert after[name]["effective_config"] == before[name]["effective_config"]
            assert len(after[name]["partitions"]) == len(before[name]["partitions"])
        assert after["changed"]["config"] == {"retention_ms": -1,
                                              "segment_bytes": SEGMENT_BYTES}
        # The restarted workers apply the stored config: they keep rolling small segments.
        acked += _produce(broker, "changed", [b"c" * 100 + b"after-%d" % i for i in range(50)])
        assert len(_segments(broker, "changed", 0)) >= segments_before + 2
        records = read_partitions(broker.data_dir, "changed", [0, 1])
        assert check_acked(acked, records) == len(acked) == sum(map(len, records.values()))
        with Consumer(broker.data_dir) as consumer:
            tp = TopicPartition("changed", 1)
            assert consumer.end_offsets([tp]) == {tp: 5}
