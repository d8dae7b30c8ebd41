"""Regression tests for eight bugs a review found (its reproduction scripts, made deterministic):

1. a restarted worker recognises ring frames the dead one decided (appended, or refused) even
   when its first region of that ring is smaller than the dead worker's (another ring took
   most of the drain budget);
2. a ring with a corrupt frame does not make its worker spin, and is unlinked at the next tick;
3. a parked fetch whose offset retention deleted is answered OFFSET_OUT_OF_RANGE (no crash);
4. a producer whose ring stays full fails the futures of the batches it could not write, its
   I/O thread survives a failing linger seal, and sequence numbers stay dense;
5. ``poll_columnar`` returns the records an earlier ``poll(max_records=...)`` held back;
6. a partition paused while its fetch was in flight returns nothing until resumed;
7. CREATE of a topic whose deletion is in progress is refused, and a broker killed during a
   deletion removes the orphaned topic directory at start;
8. ALTER_CONFIGS does not SIGHUP (kill) a worker that is still starting.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from typing import Any

import psutil
import pytest
from broker_helpers import RunningBroker, wait_for
from integration.produce_helpers import (
    check_acked,
    raw_connect,
    raw_request,
    read_partitions,
)

from shmbroker import Consumer, Producer, TopicPartition
from shmbroker.client.connection import Connection, read_frame
from shmbroker.errors import BufferFullError, ShmbrokerError, TopicExistsError
from shmbroker.format import record_batch
from shmbroker.format.record_batch import BatchHeader
from shmbroker.partition.paths import PartitionPaths
from shmbroker.partition.worker import RESULT_CORRUPT, read_topic_config
from shmbroker.protocol.frames import encode_frame
from shmbroker.protocol.messages import ApiKey
from shmbroker.shm import names
from shmbroker.shm.ring import RingReader, RingWriter
from shmbroker.storage.partition_log import PartitionLog

pytestmark = pytest.mark.integration

MIB = 1 << 20
WAIT_S = 10.0


# -- helpers ------------------------------------------------------------------------------------
def _paths(broker: RunningBroker, topic: str, topic_id: int, partition: int = 0) -> PartitionPaths:
    return PartitionPaths(broker.data_dir.resolve(), topic, topic_id, partition)


def _workers(broker: RunningBroker, topic: str) -> dict[int, dict[str, Any]]:
    with broker.admin() as admin:
        return {worker["partition"]: worker for worker in admin.status()["workers"]
                if worker["topic"] == topic}


def _batch_headers(socket_path: os.PathLike[str] | str) -> list[BatchHeader]:
    """The header of every batch of a partition, read with plain FETCH requests."""
    headers: list[BatchHeader] = []
    offset = 0
    with contextlib.closing(raw_connect(socket_path)) as sock:
        while True:
            body, raw, _ = raw_request(sock, ApiKey.FETCH, {"offset": offset, "max_bytes": MIB})
            assert "error" not in body, body
            before = offset
            for _, header in record_batch.iter_batch_positions(raw):
                headers.append(header)
                offset = header.next_offset
            assert offset > before, f"a fetch at offset {offset} returned no batch: {body}"
            if offset >= body["log_end_offset"]:
                return headers


def _error_of(future: Any) -> BaseException | None:
    """The error a completed future failed with, or None.  (Not ``future.exception()``: it
    re-raises RequestTimeoutError, and BufferFullError is one.)"""
    assert future.done()
    try:
        future.result(0)
    except ShmbrokerError as error:
        return error
    return None


def _resume(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGCONT)


# -- 1. worker restart: ring frames the dead worker decided ---------------------------------------
@pytest.mark.fault
def test_restarted_worker_recognises_decided_frames_across_smaller_regions(
        broker: RunningBroker) -> None:
    """The dead worker took one region of 4 frames from ring B (300 kB, a corrupt one, 300 kB,
    300 kB), appended the good ones, recorded every result (offsets 0, 1, 2 and CORRUPT for the
    second) and died before publishing.  Ring A holds a 900 kB frame.  The new worker drains A
    first on its first pass (rings are attached in name order and the first pass starts at the
    second ring), so the rest of the drain budget gives B a region of 1 frame; the next region
    (the refused frame and two appended ones) must still be recognised as decided: nothing is
    appended twice, and the refused frame keeps its error."""
    with broker.admin() as admin:
        topic_id = admin.create_topic("split", partitions=1)["topic_id"]
    assert broker.stop() == 0

    paths = _paths(broker, "split", topic_id)
    ring_b_id, ring_a_id = 0x0000000000000001, 0x7000000000000003  # B sorts before A
    writer_b = RingWriter.create(paths.ring_name(ring_b_id), data_bytes=4 * MIB, ack_slots=16,
                                 producer_id=ring_b_id)
    writer_a = RingWriter.create(paths.ring_name(ring_a_id), data_bytes=4 * MIB, ack_slots=16,
                                 producer_id=ring_a_id)
    try:
        values_b = [b"B0-" + b"b" * 300_000, b"B1-refused", b"B2-" + b"b" * 300_000,
                    b"B3-" + b"b" * 300_000]
        for seq, value in enumerate(values_b):
            frame = record_batch.encode_batch([value], producer_id=ring_b_id, producer_epoch=0,
                                              base_sequence=seq)
            if seq == 1:
                frame[-1] ^= 0xFF  # a byte of the value: the CRC no longer matches
            assert writer_b.try_write(frame) == seq

        # The dead worker's last steps on ring B (as PartitionWorker._append_region and
        # _append_one_by_one leave them): good frames appended, every result recorded.
        reader = RingReader.attach(writer_b.name)
        region = reader.next_region(1 * MIB)  # limits.drain_bytes_max
        assert region is not None and region.frames == 4
        log = PartitionLog(paths.log_dir, read_topic_config(paths))
        for index in (0, 2, 3):
            start = region.positions[index]
            log.append(bytearray(region.view[start:start + region.sizes[index]]))
        assert log.log_end_offset == 3
        log.close()
        reader.record_results(region, [0, RESULT_CORRUPT, 1, 2])
        del region
        reader.close()  # ... and it died here, before publish

        value_a = b"A0-" + b"a" * 900_000
        assert writer_a.try_write(record_batch.encode_batch(
            [value_a], producer_id=ring_a_id, producer_epoch=0, base_sequence=0)) == 0
        assert names.list_rings(paths.shm_prefix, topic_id, 0) == [writer_b.name, writer_a.name]

        broker.start()
        wait_for(lambda: writer_a.in_flight == 0 and writer_b.in_flight == 0, WAIT_S,
                 message="both rings acknowledged")
        assert writer_b.acks() == (0, [0, RESULT_CORRUPT, 1, 2])
        assert writer_a.acks() == (0, [3])
    finally:
        writer_a.close()
        writer_b.close()

    # The scenario happened as described: B's frames were recognised in two regions, 1 + 3.
    log_text = broker.log()
    for count in (1, 3):
        assert f"split/0: {count} batch(es) of ring {writer_b.name} were decided" in log_text
    records = read_partitions(broker.data_dir, "split", [0], timeout_s=WAIT_S)
    stored = [values_b[0], values_b[2], values_b[3], value_a]
    assert check_acked([(value, 0, offset) for offset, value in enumerate(stored)],
                       records) == 4
    assert len(records[0]) == 4, [record.offset for record in records[0]]


# -- 2. a broken ring: no spinning, released -----------------------------------------------------
@pytest.mark.fault
def test_broken_ring_does_not_spin_the_worker_and_is_released(broker: RunningBroker) -> None:
    with broker.admin() as admin:
        topic_id = admin.create_topic("broken", partitions=1)["topic_id"]
    pid = broker.worker_pids()[("broken", 0)]
    worker = psutil.Process(pid)
    paths = _paths(broker, "broken", topic_id)
    ring_id = names.new_ring_id()
    writer = RingWriter.create(paths.ring_name(ring_id), data_bytes=64 * 1024, ack_slots=16,
                               producer_id=ring_id)
    shm_path = f"/dev/shm/{writer.name.lstrip('/')}"
    try:
        view = writer.writable_region(100)
        assert view is not None
        view[:] = bytes(100)
        view[8:12] = (5000).to_bytes(4, "big")  # batch_length 5000: the frame overruns the head
        del view
        writer.commit(100)
        connection = Connection(paths.socket_path, WAIT_S)
        try:
            connection.request(ApiKey.ATTACH_RING, {"name": writer.name})
            wait_for(lambda: writer.broken, WAIT_S, message="the worker to mark the ring broken")

            def cpu_s() -> float:
                times = worker.cpu_times()
                return float(times.user + times.system)

            before = cpu_s()
            time.sleep(1.0)  # a measurement window, not a wait for a condition
            used = cpu_s() - before
            assert used < 0.3, f"the worker used {used:.2f} s of CPU in 1 s after the ring broke"
            # Released at the next tick although the producer keeps it open and attached.
            wait_for(lambda: not os.path.exists(shm_path), WAIT_S,
                     message=f"{shm_path} to be unlinked")
        finally:
            connection.close()
    finally:
        writer.close()
    # The worker carries on: no crash, nothing of the corrupt frame stored.
    assert broker.worker_pids()[("broken", 0)] == pid
    assert _workers(broker, "broken")[0]["restarts"] == 0
    with Producer(broker.data_dir, linger_ms=0) as producer:
        assert producer.send("broken", b"after", partition=0).result(WAIT_S).offset == 0


# -- 3. a parked fetch passed by retention -------------------------------------------------------
def test_parked_fetch_below_log_start_gets_offset_out_of_range(broker: RunningBroker) -> None:
    with broker.admin() as admin:
        topic_id = admin.create_topic("retained", partitions=1, config={
            "segment_bytes": 4096, "retention_bytes": 4096})["topic_id"]
    pid = broker.worker_pids()[("retained", 0)]
    paths = _paths(broker, "retained", topic_id)
    with Producer(broker.data_dir, linger_ms=0) as producer:
        assert producer.send("retained", b"x" * 100, partition=0).result(WAIT_S).offset == 0
        with contextlib.closing(raw_connect(paths.socket_path, WAIT_S)) as parked:
            # Offset 0 holds far less than min_bytes: the fetch parks for max_wait_ms.
            parked.sendall(encode_frame(ApiKey.FETCH, 11, {
                "offset": 0, "max_bytes": MIB, "max_wait_ms": 30_000, "min_bytes": 10**9}))
            # Barrier: once a later request on another connection is answered, the worker has
            # read (and parked) the fetch; ring data is drained only after that loop pass.
            with contextlib.closing(raw_connect(paths.socket_path, WAIT_S)) as other:
                assert "error" not in raw_request(other, ApiKey.PING)[0]
            for i in range(200):  # ~50 kB in 4 kB segments: retention passes offset 0
                producer.send("retained", b"y%03d" % i + b"y" * 200, partition=0)
            producer.flush(WAIT_S)
            body, raw, correlation_id = read_frame(parked)
    assert correlation_id == 11
    assert body["error"] == "OFFSET_OUT_OF_RANGE", body
    assert body["offset"] == 0 and body["log_start_offset"] > 0
    assert not len(raw)
    assert broker.worker_pids()[("retained", 0)] == pid
    assert _workers(broker, "retained")[0]["restarts"] == 0
    assert "crashed" not in broker.log()
    # ... and it still serves what retention kept.
    records = read_partitions(broker.data_dir, "retained", [0], timeout_s=WAIT_S)[0]
    assert records and records[-1].offset == 200


# -- 4. a producer whose ring stays full ---------------------------------------------------------
@pytest.mark.fault
def test_producer_fails_unwritable_batches_and_keeps_working(broker: RunningBroker) -> None:
    with broker.admin() as admin:
        topic_id = admin.create_topic("full", partitions=1)["topic_id"]
    pid = broker.worker_pids()[("full", 0)]
    sent: list[tuple[bytes, Any]] = []
    with Producer(broker.data_dir, linger_ms=20, batch_size_bytes=8000, ring_bytes=64 * 1024,
                  max_block_ms=300) as producer:
        sent.append((b"first", producer.send("full", b"first", partition=0)))
        sent[0][1].result(WAIT_S)
        os.kill(pid, signal.SIGSTOP)  # the ring fills up and stays full
        try:
            with pytest.raises(BufferFullError):  # send seals a full batch and cannot write it
                for i in range(2000):
                    value = b"full-%04d-" % i + b"v" * 490
                    sent.append((value, producer.send("full", value, partition=0)))
            # Less than a batch: the I/O thread seals it after linger_ms, and cannot write it.
            lingering = [b"linger-%02d-" % i + b"l" * 490 for i in range(13)]
            lingering_sent = [(value, producer.send("full", value, partition=0))
                              for value in lingering]
            wait_for(lambda: all(future.done() for _, future in lingering_sent), WAIT_S,
                     message="the lingering batch's futures to fail")
            for _, future in lingering_sent:
                assert isinstance(_error_of(future), BufferFullError)
            sent += lingering_sent
        finally:
            _resume(pid)
        producer.flush(WAIT_S)
        wait_for(lambda: all(future.done() for _, future in sent), WAIT_S,
                 message="every future to complete")
        sent.append((b"after", producer.send("full", b"after", partition=0)))
        sent[-1][1].result(WAIT_S)  # the producer still works

    acked, failed = [], []
    for value, future in sent:
        error = _error_of(future)
        if error is None:
            acked.append((value, 0, future.result(0).offset))
        else:
            assert isinstance(error, BufferFullError), repr(error)
            failed.append(value)
    # The batch whose write raised in send() had records sent before it: they failed too.
    assert any(value.startswith(b"full-") for value in failed)
    records = read_partitions(broker.data_dir, "full", [0], timeout_s=WAIT_S)
    assert check_acked(acked, records) == len(acked)
    assert len(records[0]) == len(acked), "a failed record was stored"
    # Only written batches take sequence numbers: the ring's batches are dense in sequence.
    headers = _batch_headers(_paths(broker, "full", topic_id).socket_path)
    assert len({header.producer_id for header in headers}) == 1
    for previous, header in zip(headers, headers[1:]):
        assert header.base_sequence == previous.base_sequence + previous.records_count, (
            f"sequence gap at offset {header.base_offset}: {previous.base_sequence} + "
            f"{previous.records_count} -> {header.base_sequence}")


# -- 5. poll_columnar after poll(max_records) ----------------------------------------------------
def test_poll_columnar_returns_records_held_back_by_poll_max_records(
        broker: RunningBroker) -> None:
    with broker.admin() as admin:
        admin.create_topic("columns", partitions=1)
    tp = TopicPartition("columns", 0)
    with Producer(broker.data_dir, linger_ms=60_000) as producer:
        for i in range(100):  # one batch: sealed by flush
            producer.send("columns", b"%d" % i, partition=0)
        producer.flush(WAIT_S)
        with Consumer(broker.data_dir, auto_offset_reset="earliest") as consumer:
            consumer.assign([tp])
            first = consumer.poll(5000, max_records=10)
            assert [record.offset for record in first] == list(range(10))
            assert consumer.position(tp) == 10
            for i in range(100, 150):  # a second batch, fetched after the held-back records
                producer.send("columns", b"%d" % i, partition=0)
            producer.flush(WAIT_S)

            offsets: list[int] = []
            values: list[bytes | None] = []

            def poll_columns() -> bool:
                for columns in consumer.poll_columnar(200):
                    assert (columns.topic, columns.partition) == ("columns", 0)
                    offsets.extend(int(offset) for offset in columns.offsets)
                    values.extend(columns.values())
                return bool(offsets) and offsets[-1] >= 149

            wait_for(poll_columns, WAIT_S, message="offsets up to 149 from poll_columnar")
            assert consumer.position(tp) == 150
    assert offsets == list(range(10, 150))
    assert values == [b"%d" % i for i in range(10, 150)]


# -- 6. pause while a fetch is in flight ---------------------------------------------------------
@pytest.mark.parametrize("direct_reads", [False, True], ids=["through-worker", "direct"])
def test_partition_paused_during_an_in_flight_fetch_returns_nothing_until_resumed(
        broker: RunningBroker, direct_reads: bool) -> None:
    with broker.admin() as admin:
        admin.create_topic("paused", partitions=1)
    tp = TopicPartition("paused", 0)
    with Producer(broker.data_dir, linger_ms=0) as producer, \
            Consumer(broker.data_dir, auto_offset_reset="earliest",
                     fetch_max_wait_ms=30_000, direct_reads=direct_reads) as consumer:
        producer.send("paused", b"a", partition=0).result(WAIT_S)
        consumer.assign([tp])
        assert [(r.offset, r.value) for r in consumer.poll(5000)] == [(0, b"a")]
        fetcher = consumer._fetchers[tp]  # white box: the prefetch parked at the worker
        if direct_reads:  # no prefetch: the poll that finds nothing in the file sends it
            assert fetcher.in_flight_offset is None and fetcher.direct is not None
            # It parks for what is left of the poll; on a loaded machine that may be ~0 ms,
            # and the poll receives its empty answer: poll again (bounded) until one is out.
            for _ in range(100):
                assert consumer.poll(10) == []
                if fetcher.in_flight_offset is not None:
                    break
        assert fetcher.in_flight_offset == 1
        consumer.pause(tp)
        producer.send("paused", b"b", partition=0).result(WAIT_S)  # answers the prefetch
        while_paused: list[Any] = []

        def fetch_answered() -> bool:
            while_paused.extend(consumer.poll(50))
            return bool(while_paused) or fetcher.in_flight_offset is None

        wait_for(fetch_answered, WAIT_S, message="the in-flight fetch to be answered")
        while_paused.extend(consumer.poll(100))
        assert while_paused == []
        assert consumer.paused() == {tp}
        assert consumer.position(tp) == 1
        consumer.resume(tp)
        after = consumer.poll(5000)
        assert [(r.offset, r.value) for r in after] == [(1, b"b")]
        assert consumer.poll(0) == []
        assert consumer.position(tp) == 2


# -- 7. create while a deletion is in progress; deletion finished at start -----------------------
@pytest.mark.fault
def test_create_during_deletion_is_refused_and_orphaned_topic_dirs_are_removed(
        broker: RunningBroker) -> None:
    with broker.admin() as admin:
        admin.create_topic("gone", partitions=1)
        admin.create_topic("orphan", partitions=1)
    with Producer(broker.data_dir, linger_ms=0) as producer:
        for topic in ("gone", "orphan"):
            for i in range(50):
                producer.send(topic, b"old-%s-%d" % (topic.encode(), i), partition=0)
        producer.flush(WAIT_S)

    def start_deleting(topic: str) -> socket.socket:
        """Stop the topic's worker (a slow stop) and send DELETE without waiting for it."""
        old = broker.worker_pids()[(topic, 0)]
        os.kill(old, signal.SIGSTOP)
        sock = raw_connect(broker.socket_path, 30)
        sock.sendall(encode_frame(ApiKey.DELETE_TOPIC, 5, {"name": topic}))
        with broker.admin() as admin:
            wait_for(lambda: topic not in admin.list_topics(), WAIT_S,
                     message=f"{topic} gone from the metadata")
        return sock

    # While the old worker is still stopping, the name cannot be taken again.
    old_gone = broker.worker_pids()[("gone", 0)]
    try:
        with contextlib.closing(start_deleting("gone")) as deleting:
            with broker.admin() as admin, \
                    pytest.raises(TopicExistsError, match="still being deleted"):
                admin.create_topic("gone", partitions=1)
            _resume(old_gone)
            body, _, correlation_id = read_frame(deleting)
        assert correlation_id == 5 and "error" not in body, body
    finally:
        _resume(old_gone)
    assert not (broker.data_dir / "topics" / "gone").exists()
    with broker.admin() as admin:
        admin.create_topic("gone", partitions=1)
        assert admin.describe_topic("gone")["partitions"][0]["log_end_offset"] == 0

    # A broker killed before a deletion's files went: the next one removes them at start.
    old_orphan = broker.worker_pids()[("orphan", 0)]
    try:
        with contextlib.closing(start_deleting("orphan")):
            broker.kill()
    finally:
        _resume(old_orphan)
    assert (broker.data_dir / "topics" / "orphan").exists()
    broker.start()
    assert not (broker.data_dir / "topics" / "orphan").exists()
    with broker.admin() as admin:
        admin.create_topic("orphan", partitions=1)
        assert admin.describe_topic("orphan")["partitions"][0]["log_end_offset"] == 0
    with Producer(broker.data_dir, linger_ms=0) as producer:
        metas = {topic: [producer.send(topic, b"new-%s-%d" % (topic.encode(), i),
                                       partition=0).result(WAIT_S) for i in range(20)]
                 for topic in ("gone", "orphan")}
    for topic, topic_metas in metas.items():
        assert [meta.offset for meta in topic_metas] == list(range(20))
        records = read_partitions(broker.data_dir, topic, [0], timeout_s=WAIT_S)
        acked = [(b"new-%s-%d" % (topic.encode(), i), 0, i) for i in range(20)]
        assert check_acked(acked, records) == 20
        assert len(records[0]) == 20


# -- 8. ALTER_CONFIGS while workers start --------------------------------------------------------
def test_alter_configs_does_not_kill_starting_workers(broker: RunningBroker) -> None:
    partitions = 6
    with contextlib.closing(raw_connect(broker.socket_path, 30)) as creating:
        # CREATE answers once the workers are up: do not wait, alter while they start.
        creating.sendall(encode_frame(ApiKey.CREATE_TOPIC, 3, {
            "name": "altered", "partitions": partitions, "config": {}}))
        with broker.admin() as admin:
            wait_for(lambda: "altered" in admin.list_topics(), WAIT_S,
                     message="the topic to be created")
            topic = admin.alter_configs("altered", {"retention_ms": 1_000_000})
        starting = [p["partition"] for p in topic["partitions"] if p["state"] == "starting"]
        # Workers are Python processes: they take far longer to start than this round trip.
        assert starting, f"no worker was starting when the config changed: {topic['partitions']}"
        body, _, correlation_id = read_frame(creating)
    assert correlation_id == 3 and "error" not in body, body

    workers = _workers(broker, "altered")
    assert sorted(workers) == list(range(partitions))
    assert {p: (w["state"], w["restarts"]) for p, w in workers.items()} == {
        p: ("running", 0) for p in range(partitions)}, [
            line for line in broker.log().splitlines() if "restarting" in line]
    # The workers that were starting are told once they are ready.
    for partition in starting:
        wait_for(lambda partition=partition: f"altered/{partition}: config reloaded"
                 in broker.log(), WAIT_S, message=f"altered/{partition} to reload its config")
    assert "restarting" not in broker.log()
    with broker.admin() as admin:
        assert admin.describe_topic("altered")["config"]["retention_ms"] == 1_000_000
