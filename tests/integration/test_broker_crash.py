"""Crashes under load: a worker SIGKILLed, a worker dead while producers write into its rings,
the broker stopped (SIGTERM) or killed outright and restarted on the same data dir, a worker that
cannot boot.  acks=1 means "in the OS page cache", so no process crash may lose an acknowledged
record, and the ring recovery must never append a batch twice."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from broker_helpers import RunningBroker, wait_for
from integration.produce_helpers import (
    BackgroundConsumer,
    BackgroundProducer,
    check_acked,
    read_partitions,
)

from shmbroker import Consumer, Producer, Record, TopicPartition
from shmbroker.format import record_batch
from shmbroker.partition.paths import PartitionPaths
from shmbroker.partition.worker import read_topic_config
from shmbroker.shm import names
from shmbroker.shm.ring import RingReader, RingWriter
from shmbroker.storage.partition_log import PartitionLog

pytestmark = [pytest.mark.integration, pytest.mark.fault]


RESTART_TIMEOUT_S = 20.0
LOAD_RECORDS = 500  # acks to wait for before and after each crash


def _worker_state(broker: RunningBroker, topic: str, partition: int) -> tuple[int | None, str]:
    with broker.admin() as admin:
        for worker in admin.status()["workers"]:
            if (worker["topic"], worker["partition"]) == (topic, partition):
                return worker["pid"], worker["state"]
    raise AssertionError(f"no worker for {topic}/{partition}")


def _wait_restarted(broker: RunningBroker, topic: str, partition: int, old_pid: int) -> int:
    def restarted() -> int | None:
        pid, state = _worker_state(broker, topic, partition)
        return pid if pid not in (None, old_pid) and state == "running" else None

    return int(wait_for(restarted, RESTART_TIMEOUT_S,
                        message=f"a new worker for {topic}/{partition}"))


def _check_everything_acked(broker: RunningBroker, topic: str, partitions: int,
                            acked: list[tuple[bytes, int, int]]) -> dict[int, list[Record]]:
    records = read_partitions(broker.data_dir, topic, range(partitions))
    assert check_acked(acked, records) == len(acked)
    stored = sum(len(found) for found in records.values())
    assert stored == len(acked), f"{stored} records stored, {len(acked)} acked"
    return records


@pytest.fixture
def stopped_supervisor_guard(broker: RunningBroker) -> Iterator[RunningBroker]:
    """SIGCONT the supervisor at teardown, whatever the test left it in."""
    yield broker
    if broker.process is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(broker.pid, signal.SIGCONT)


def test_sigkill_worker_under_load_loses_and_duplicates_nothing(broker: RunningBroker) -> None:
    with broker.admin() as admin:
        admin.create_topic("crash", partitions=2)
    live = BackgroundConsumer(broker.data_dir, "crash", [0, 1]).start()
    with Producer(broker.data_dir, acks=1, linger_ms=1) as producer:
        load = BackgroundProducer(producer, "crash", 2).start()
        load.wait_acked(LOAD_RECORDS)
        for partition in (0, 1, 0):  # the first worker twice: a restarted worker crashes too
            old_pid = broker.worker_pids()[("crash", partition)]
            os.kill(old_pid, signal.SIGKILL)
            _wait_restarted(broker, "crash", partition, old_pid)
            load.wait_acked(LOAD_RECORDS)
        acked = load.stop()
    assert len(acked) == len(load.sent)
    records = _check_everything_acked(broker, "crash", 2, acked)
    # A consumer polling through the crashes saw the log exactly: no gap, no repeat.
    ends = {TopicPartition("crash", p): len(found) for p, found in records.items()}
    consumed = live.finish(ends)
    for partition, found in records.items():
        assert consumed[partition][:len(found)] == found
    with broker.admin() as admin:
        restarts = {(w["topic"], w["partition"]): w["restarts"] for w in admin.status()["workers"]}
    assert restarts == {("crash", 0): 2, ("crash", 1): 1}


def test_sigkill_while_segments_roll_and_write_back_loses_nothing(broker: RunningBroker) -> None:
    """Small segments roll every few hundred batches, each roll leaving the release of its
    reserved space to the flush thread, which also starts the writeback of every 2 KiB: a
    worker SIGKILLed among them loses and duplicates nothing, and its successor goes on."""
    config = {"segment_bytes": 8192, "segment_preallocate_bytes": 4096,
              "segment_writeback_bytes": 2048, "retention_ms": -1}
    with broker.admin() as admin:
        admin.create_topic("rolling", partitions=1, config=config)
    with Producer(broker.data_dir, acks=1, linger_ms=1) as producer:
        load = BackgroundProducer(producer, "rolling", 1).start()
        load.wait_acked(LOAD_RECORDS)
        for _ in range(3):
            old_pid = broker.worker_pids()[("rolling", 0)]
            os.kill(old_pid, signal.SIGKILL)
            _wait_restarted(broker, "rolling", 0, old_pid)
            load.wait_acked(LOAD_RECORDS)
        acked = load.stop()
    _check_everything_acked(broker, "rolling", 1, acked)
    segments = sorted(Path(broker.data_dir, "topics").rglob("*.log"))
    assert len(segments) >= 5  # it rolled (2,000 records: ~10 segments)


def test_records_written_while_the_worker_is_dead_are_appended_after_restart(
        stopped_supervisor_guard: RunningBroker) -> None:
    broker = stopped_supervisor_guard
    with broker.admin() as admin:
        admin.create_topic("dead", partitions=1)
    with Producer(broker.data_dir, acks=1, linger_ms=1) as producer:
        before = [producer.send("dead", b"before-%d" % i, partition=0) for i in range(300)]
        producer.flush(20)
        old_pid = broker.worker_pids()[("dead", 0)]
        # Hold the supervisor so that the worker stays dead while we write into its ring.
        os.kill(broker.pid, signal.SIGSTOP)
        try:
            os.kill(old_pid, signal.SIGKILL)
            wait_for(lambda: not os.path.exists(f"/proc/{old_pid}/status")
                     or "State:\tZ" in Path(f"/proc/{old_pid}/status").read_text(),
                     message="the worker to die")
            during = [producer.send("dead", b"during-%d" % i, partition=0) for i in range(300)]
            with pytest.raises(TimeoutError):
                producer.flush(0.3)  # nobody appends while the worker is dead
            assert not any(future.done() for future in during)
        finally:
            os.kill(broker.pid, signal.SIGCONT)
        _wait_restarted(broker, "dead", 0, old_pid)
        producer.flush(20)
        after = [producer.send("dead", b"after-%d" % i, partition=0) for i in range(300)]
        producer.flush(20)
        metas = [future.result(5) for future in before + during + after]
    assert [meta.offset for meta in metas] == list(range(900))
    values = ([b"before-%d" % i for i in range(300)] + [b"during-%d" % i for i in range(300)]
              + [b"after-%d" % i for i in range(300)])
    _check_everything_acked(broker, "dead", 1,
                            [(value, 0, meta.offset) for value, meta in zip(values, metas)])


@pytest.mark.parametrize("appended", [0, 2, 4])
def test_restarted_worker_recognises_ring_batches_the_dead_one_appended(
        broker: RunningBroker, appended: int) -> None:
    """The dead worker's last steps, replayed by hand with the broker stopped: it took a region
    of 4 frames from a ring, wrote their intended offsets into the ack slots, appended the first
    ``appended`` of them, and died before publishing.  The next worker must acknowledge those at
    the offsets they have and append only the rest."""
    with broker.admin() as admin:
        topic_id = admin.create_topic("intent", partitions=1)["topic_id"]
    with Producer(broker.data_dir, linger_ms=0) as producer:
        earlier = [producer.send("intent", b"earlier-%d" % i).result(10) for i in range(10)]
    assert [meta.offset for meta in earlier] == list(range(10))
    assert broker.stop() == 0

    paths = PartitionPaths(broker.data_dir.resolve(), "intent", topic_id, 0)
    ring_id = names.new_ring_id()
    writer = RingWriter.create(paths.ring_name(ring_id), data_bytes=1 << 20, ack_slots=64,
                               producer_id=ring_id)
    try:
        values = [[b"ring-%d-%d" % (frame, i) for i in range(3)] for frame in range(4)]
        for frame, batch_values in enumerate(values):
            writer.try_write(record_batch.encode_batch(
                batch_values, producer_id=ring_id, producer_epoch=0, base_sequence=3 * frame))
        reader = RingReader.attach(writer.name)
        region = reader.next_region(1 << 20)
        assert region is not None and region.frames == 4
        reader.record_results(region, [10, 13, 16, 19])  # intents, as PartitionWorker does
        if appended:
            log = PartitionLog(paths.log_dir, read_topic_config(paths))
            private = bytearray(region.view[:region.positions[appended - 1]
                                            + region.sizes[appended - 1]])
            assert log.append(private).base_offsets == [10, 13, 16, 19][:appended]
            log.close()
        del region
        reader.close()  # ... and the worker died here, before publish

        broker.start()
        wait_for(lambda: writer.in_flight == 0, RESTART_TIMEOUT_S, message="ring acks")
        first_seq, results = writer.acks()
        assert (first_seq, results) == (0, [10, 13, 16, 19])
    finally:
        writer.close()
    acked = [(b"earlier-%d" % i, 0, i) for i in range(10)]
    acked += [(value, 0, 10 + 3 * frame + i)
              for frame, batch_values in enumerate(values) for i, value in enumerate(batch_values)]
    _check_everything_acked(broker, "intent", 1, acked)
    if appended:
        assert f"{appended} batch(es) of ring" in broker.log()


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_broker_restart_under_load_keeps_every_acked_record(broker: RunningBroker,
                                                            how: str) -> None:
    with broker.admin() as admin:
        admin.create_topic("restart", partitions=3)
    with Producer(broker.data_dir, acks=1, linger_ms=1) as producer:
        load = BackgroundProducer(producer, "restart", 3).start()
        load.wait_acked(LOAD_RECORDS)
        if how == "sigterm":
            assert broker.stop() == 0
        else:
            broker.kill()
        broker.start()
        load.wait_acked(LOAD_RECORDS)
        acked = load.stop()
    assert len(acked) == len(load.sent)
    _check_everything_acked(broker, "restart", 3, acked)


def test_broker_restart_keeps_acked_records_of_closed_producers(broker: RunningBroker) -> None:
    """Acked, producer closed, broker killed: the records are in the log after restart."""
    with broker.admin() as admin:
        admin.create_topic("closed", partitions=2)
    with Producer(broker.data_dir, acks=1, linger_ms=0) as producer:
        metas = [producer.send("closed", b"c%d" % i, partition=i % 2).result(10)
                 for i in range(200)]
    broker.kill()
    broker.start()  # and wait until every worker runs
    _check_everything_acked(broker, "closed", 2,
                            [(b"c%d" % i, meta.partition, meta.offset)
                             for i, meta in enumerate(metas)])


def test_worker_that_cannot_boot_is_given_up_others_keep_working(tmp_path: Path) -> None:
    config = "worker_boot_failures_max = 3\nworker_restart_backoff_ms_max = 200\n"
    with RunningBroker(tmp_path / "data", config_toml=config) as broker:
        broker.wait_ready()
        with broker.admin() as admin:
            admin.create_topic("boot", partitions=2)
        with Producer(broker.data_dir, linger_ms=0) as producer:
            first = [producer.send("boot", b"b%d" % i, partition=i % 2).result(10)
                     for i in range(10)]
        assert broker.stop() == 0
        # Partition 1's log directory becomes a plain file: its worker cannot open its log.
        log_dir = broker.data_dir / "topics" / "boot" / "1"
        shutil.rmtree(log_dir)
        log_dir.write_bytes(b"not a directory")
        broker.start(workers=False)

        wait_for(lambda: _worker_state(broker, "boot", 1)[1] == "failed", RESTART_TIMEOUT_S,
                 message="boot/1 given up")
        with broker.admin() as admin:
            workers = {(w["topic"], w["partition"]): w for w in admin.status()["workers"]}
            described = {entry["partition"]: entry
                         for entry in admin.describe_topic("boot")["partitions"]}
        assert workers[("boot", 1)]["state"] == "failed"
        assert workers[("boot", 1)]["pid"] is None
        assert workers[("boot", 0)]["state"] == "running"
        assert described[1]["state"] == "failed"
        assert "failed to boot 3 times" in broker.log()

        with Producer(broker.data_dir, linger_ms=0) as producer:
            more = [producer.send("boot", b"more%d" % i, partition=0).result(10)
                    for i in range(10)]
        acked = [(b"b%d" % i, 0, meta.offset) for i, meta in enumerate(first) if i % 2 == 0]
        acked += [(b"more%d" % i, 0, meta.offset) for i, meta in enumerate(more)]
        assert [offset for _, _, offset in acked] == list(range(15))
        records = read_partitions(broker.data_dir, "boot", [0])
        assert check_acked(acked, records) == 15
        assert _worker_state(broker, "boot", 1)[1] == "failed"  # still given up, not restarted


def test_producer_wakes_the_new_worker_after_a_broker_restart(broker: RunningBroker) -> None:
    with broker.admin() as admin:
        admin.create_topic("wake", partitions=1)
    with Producer(broker.data_dir, linger_ms=0) as producer:

        def median_latency_ms() -> float:
            latencies = []
            for i in range(40):
                started = time.perf_counter()
                producer.send("wake", b"w%d" % i, partition=0).result(10)
                latencies.append((time.perf_counter() - started) * 1000)
            return sorted(latencies)[len(latencies) // 2]

        before_ms = median_latency_ms()
        assert broker.stop() == 0
        broker.start()
        producer.send("wake", b"first after restart", partition=0).result(30)
        after_ms = median_latency_ms()
    # A sleeping worker that is never woken answers after its select timeout (20-50 ms).
    assert after_ms < 8, f"median ack latency {before_ms:.2f} ms before the restart, " \
                         f"{after_ms:.2f} ms after"


def test_consumer_offset_lookup_waits_for_a_restarting_worker(
        stopped_supervisor_guard: RunningBroker) -> None:
    broker = stopped_supervisor_guard
    with broker.admin() as admin:
        admin.create_topic("lookup", partitions=1)
    with Producer(broker.data_dir, linger_ms=0) as producer:
        for i in range(10):
            producer.send("lookup", b"l%d" % i).result(10)
    tp = TopicPartition("lookup", 0)
    old_pid = broker.worker_pids()[("lookup", 0)]
    found: dict[str, object] = {}
    with Consumer(broker.data_dir) as consumer:
        os.kill(broker.pid, signal.SIGSTOP)  # the worker stays dead until SIGCONT
        try:
            os.kill(old_pid, signal.SIGKILL)
            wait_for(lambda: not os.path.exists(f"/proc/{old_pid}/status")
                     or "State:\tZ" in Path(f"/proc/{old_pid}/status").read_text(),
                     message="the worker to die")

            def look_up() -> None:
                try:
                    found["ends"] = consumer.end_offsets([tp])
                except Exception as error:  # noqa: BLE001 - checked below
                    found["error"] = error

            thread = threading.Thread(target=look_up)
            thread.start()
            thread.join(0.5)  # the lookup is under way while the worker is dead
        finally:
            os.kill(broker.pid, signal.SIGCONT)
        thread.join(RESTART_TIMEOUT_S)
    assert found == {"ends": {tp: 10}}
