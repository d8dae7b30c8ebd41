"""Consumers read the segment files themselves (consumer.py, "Direct reads"), up to the
readable end the worker publishes in the control block, on across rolls, and go through the
worker whenever that is not safe: a seek, a worker restart, log start past the position,
damage, files they may not open.  Every record is checked by offset and value, and reading
directly returns exactly what reading through the worker returns."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from broker_helpers import RunningBroker, wait_for

from shmbroker import Consumer, Producer, TopicPartition
from shmbroker.errors import CorruptLogError, OffsetOutOfRangeError
from shmbroker.format import record_batch

pytestmark = pytest.mark.integration

TOPIC = "direct"
TP = TopicPartition(TOPIC, 0)
SEGMENT_BYTES = 64 * 1024
POLL_DEADLINE_S = 30


def value(offset: int) -> bytes:
    return b"record-%07d-" % offset + bytes([offset % 251]) * (offset % 40)


def produce(data_dir: Path, first: int, count: int, linger_ms: int = 2,
            topic: str = TOPIC) -> None:
    with Producer(data_dir, linger_ms=linger_ms, batch_size_bytes=8192) as producer:
        futures = [producer.send(topic, value(offset), partition=0)
                   for offset in range(first, first + count)]
        producer.flush(30)
    assert [future.result(0).offset for future in futures] == list(range(first, first + count))


def produce_one_by_one(data_dir: Path, first: int, count: int) -> None:
    """One batch a record: each sent once the one before is acknowledged."""
    with Producer(data_dir, linger_ms=0) as producer:
        for offset in range(first, first + count):
            assert producer.send(TOPIC, value(offset), partition=0).result(10).offset == offset


def count_direct_reads(consumer: Consumer) -> dict[str, int]:
    """Counts the polls' reads that took batches from the segment file, and the fetch answers
    received from the worker (wraps the methods)."""
    counts = {"direct": 0, "answers": 0}
    read_direct, receive = consumer._read_direct, consumer._receive

    def counted(fetcher: Any) -> Any:
        found = read_direct(fetcher)
        if found:
            counts["direct"] += 1
        return found

    def received(fetcher: Any) -> Any:
        counts["answers"] += 1
        return receive(fetcher)

    consumer._read_direct = counted  # type: ignore[method-assign]
    consumer._receive = received  # type: ignore[method-assign]
    return counts


def poll_until(consumer: Consumer, count: int) -> list[tuple[int, bytes]]:
    got: list[tuple[int, bytes]] = []
    deadline = time.monotonic() + POLL_DEADLINE_S
    while len(got) < count and time.monotonic() < deadline:
        got += [(record.offset, record.value) for record in consumer.poll(timeout_ms=200)]
    return got


def expected(first: int, count: int) -> list[tuple[int, bytes]]:
    return [(offset, value(offset)) for offset in range(first, first + count)]


@pytest.fixture
def topic(broker: RunningBroker) -> RunningBroker:
    with broker.admin() as admin:
        admin.create_topic(TOPIC, partitions=1, config={"segment_bytes": SEGMENT_BYTES})
    broker.wait_ready()
    return broker


@pytest.mark.parametrize(("segment_bytes", "fetch_max_bytes"), [
    (SEGMENT_BYTES, 3000),  # a few segments, rolled all along; many reads each
    (8 << 20, 64 * 1024),  # one segment
], ids=["rolls", "one-segment"])
def test_a_catch_up_reads_the_files_and_gets_what_the_worker_sends(
        broker: RunningBroker, segment_bytes: int, fetch_max_bytes: int) -> None:
    with broker.admin() as admin:
        admin.create_topic("catch-up", partitions=1, config={"segment_bytes": segment_bytes})
    broker.wait_ready()
    tp = TopicPartition("catch-up", 0)
    produce(broker.data_dir, 0, 6000, topic="catch-up")
    results = {}
    for direct_reads in (True, False):
        with Consumer(broker.data_dir, fetch_max_bytes=fetch_max_bytes,
                      direct_reads=direct_reads) as consumer:
            counts = count_direct_reads(consumer)
            consumer.assign([tp])
            consumer.seek(tp, 0)
            results[direct_reads] = poll_until(consumer, 6000)
            assert consumer.position(tp) == 6000
            assert (counts["direct"] > 0) == direct_reads, counts
            if direct_reads:  # the first answer, then sealed segments and the active one
                assert counts["answers"] == 1, counts
    assert results[True] == results[False] == expected(0, 6000)


def test_batches_larger_than_fetch_max_bytes_are_read_whole(topic: RunningBroker) -> None:
    produce(topic.data_dir, 0, 1)
    with Consumer(topic.data_dir, fetch_max_bytes=512) as consumer:
        counts = count_direct_reads(consumer)
        consumer.assign([TP])
        consumer.seek(TP, 0)
        assert poll_until(consumer, 1) == expected(0, 1)
        produce(topic.data_dir, 1, 400, linger_ms=50)  # batches of ~8 KiB, 16x fetch_max_bytes
        assert poll_until(consumer, 400) == expected(1, 400)
        assert counts["direct"] > 0


def test_records_produced_while_polling_with_and_without_spinning(topic: RunningBroker) -> None:
    """Records already there when the poll comes (read from the file), two at once, and records
    produced while the poll waits (its parked fetch answered; with spinning, the readable end
    seen moving): after each, the consumer reads on from the end of what it has (white box)."""
    for poll_spin_us in (0, 2000):
        with Consumer(topic.data_dir, poll_spin_us=poll_spin_us,
                      fetch_max_wait_ms=1000) as consumer, \
                Producer(topic.data_dir, linger_ms=0) as producer:
            counts = count_direct_reads(consumer)
            consumer.assign([TP])
            consumer.seek_to_end(TP)
            first = consumer.position(TP)
            fetcher = consumer._fetchers[TP]
            for offset in range(first, first + 240):
                step = (offset - first) % 4
                if step == 3:  # produced 5 ms into the poll, which waits for it
                    later = threading.Timer(0.005, producer.send, (TOPIC, value(offset)),
                                            {"partition": 0})
                    later.start()
                    assert poll_until(consumer, 1) == expected(offset, 1)
                    later.join()
                else:
                    assert producer.send(TOPIC, value(offset), partition=0).result(
                        10).offset == offset
                    if step == 0:  # two records wait for the next poll
                        continue
                    count = 2 if step == 1 else 1
                    assert poll_until(consumer, count) == expected(offset - count + 1, count)
                direct = fetcher.direct
                if direct is not None:  # it reads on from the end of what it has read
                    log_dir = Path(fetcher.info.log_dir)  # type: ignore[arg-type]
                    segment = log_dir / f"{direct.segment_base_offset:020d}.log"
                    assert (direct.offset, direct.position) == (
                        offset + 1, segment.stat().st_size)
            started = time.monotonic()
            assert consumer.poll(timeout_ms=100) == []  # nothing more: the timeout holds
            assert time.monotonic() - started < 5
            assert counts["direct"] > 0, "no record was read from the file"


def test_a_seek_and_a_worker_killed_while_reading_directly(broker: RunningBroker) -> None:
    with broker.admin() as admin:  # one segment: what the consumer holds stays readable
        admin.create_topic("seek", partitions=1, config={"segment_bytes": 8 << 20})
    broker.wait_ready()
    tp = TopicPartition("seek", 0)
    produce(broker.data_dir, 0, 2000, topic="seek")
    with Consumer(broker.data_dir, fetch_max_bytes=4096) as consumer:
        counts = count_direct_reads(consumer)
        consumer.assign([tp])
        consumer.seek(tp, 0)
        got = poll_until(consumer, 1500)
        assert got == expected(0, len(got)) and consumer._fetchers[tp].direct is not None
        for offset in (100, 1700, 1700):  # back, forward, and to where it is
            consumer.seek(tp, offset)
            assert poll_until(consumer, 2000 - offset) == expected(offset, 2000 - offset)
        old = broker.worker_pids()[("seek", 0)]
        os.kill(old, signal.SIGKILL)
        wait_for(lambda: broker.worker_pids().get(("seek", 0)) not in (None, old), 30,
                 message="the worker's restart")
        produce(broker.data_dir, 2000, 1000, topic="seek")
        assert poll_until(consumer, 1000) == expected(2000, 1000)
        assert counts["direct"] > 0


def test_damage_met_reading_directly_is_reported_as_the_worker_reports_it(
        topic: RunningBroker) -> None:
    """A byte flipped on disk inside the active segment, past where a direct reader is: the
    records before it come, then CorruptLogError with the worker's evidence, as for consumers
    that read through the worker only or start afresh."""
    produce_one_by_one(topic.data_dir, 0, 50)
    errors = {}
    with Consumer(topic.data_dir) as consumer:
        consumer.assign([TP])
        consumer.seek(TP, 0)
        assert poll_until(consumer, 50) == expected(0, 50)
        fetcher = consumer._fetchers[TP]
        assert fetcher.direct is not None, "the consumer does not read the file itself"
        produce_one_by_one(topic.data_dir, 50, 50)
        base = fetcher.direct.segment_base_offset
        segment = Path(fetcher.info.log_dir) / f"{base:020d}.log"
        data = segment.read_bytes()
        position = fetcher.direct.position  # the batch of offset 50, then on to 60's
        while (header := record_batch.read_header(data, position)).base_offset != 60:
            position += header.size
        flip = position + header.size - 3  # a byte of its value: the CRC no longer holds
        with open(segment, "r+b") as file:
            file.seek(flip)
            file.write(bytes([data[flip] ^ 0xFF]))
        got, *error = poll_until_error(consumer)
        errors["established"] = (expected(0, 50) + got, *error)
    for direct_reads in (True, False):
        with Consumer(topic.data_dir, direct_reads=direct_reads) as reader:
            reader.assign([TP])
            reader.seek(TP, 0)
            errors[direct_reads] = poll_until_error(reader)
    assert errors[True] == errors[False] == errors["established"]
    assert errors[True][0] == expected(0, 60)
    assert errors[True][1:] == (60, 61, position, base)


def poll_until_error(consumer: Consumer) -> tuple[Any, ...]:
    got: list[tuple[int, bytes]] = []
    deadline = time.monotonic() + POLL_DEADLINE_S
    while time.monotonic() < deadline:
        try:
            got += [(record.offset, record.value) for record in consumer.poll(timeout_ms=200)]
        except CorruptLogError as error:
            return (got, error.offset, error.next_offset, error.position,
                    error.segment_base_offset)
    raise AssertionError(f"no CorruptLogError; got {got[-3:]}")


@pytest.mark.parametrize("reset", ["earliest", "none"])
def test_retention_deleting_what_a_direct_reader_holds(topic: RunningBroker, reset: str) -> None:
    """The consumer reads directly in a segment that then rolls and is deleted by retention:
    its next poll goes to the worker, which says the offset is gone, as for any consumer:
    auto_offset_reset="earliest" starts again at log start; "none" raises."""
    produce(topic.data_dir, 0, 100)
    with Consumer(topic.data_dir, auto_offset_reset=reset) as consumer:
        consumer.assign([TP])
        consumer.seek(TP, 0)
        assert poll_until(consumer, 100) == expected(0, 100)
        assert consumer._fetchers[TP].direct is not None
        with topic.admin() as admin:
            admin.alter_configs(TOPIC, {"retention_bytes": 2 * SEGMENT_BYTES})
        produce(topic.data_dir, 100, 8000)  # ~10 segments: the first ones go

        def log_start() -> int:
            return consumer.beginning_offsets([TP])[TP]

        start = wait_for(log_start, 20, message="retention to delete the first segments")
        if reset == "none":
            with pytest.raises(OffsetOutOfRangeError):
                deadline = time.monotonic() + POLL_DEADLINE_S
                while time.monotonic() < deadline:
                    consumer.poll(timeout_ms=200)
            return
        got = poll_until(consumer, 8100 - start)
        assert got[0][0] <= log_start() and got[-1][0] == 8099
        first = got[0][0]
        assert got == expected(first, 8100 - first)


def test_files_it_may_not_open_are_read_through_the_worker(
        topic: RunningBroker, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A consumer of another user (the data dir's mode lets it reach the sockets, not the
    files): the first open is refused, it says so once and fetches everything as before."""
    from shmbroker.client import consumer as consumer_module

    opened = []
    real_open = os.open

    def refuse(path: Any, flags: int, *args: Any) -> int:
        if not str(path).endswith(".log"):  # (os is everyone's module: only segments)
            return real_open(path, flags, *args)
        opened.append(path)
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(consumer_module.os, "open", refuse)
    produce(topic.data_dir, 0, 3000)
    with caplog.at_level("INFO", logger="shmbroker.consumer"), \
            Consumer(topic.data_dir, fetch_max_bytes=3000) as consumer:
        counts = count_direct_reads(consumer)
        consumer.assign([TP])
        consumer.seek(TP, 0)
        assert poll_until(consumer, 3000) == expected(0, 3000)
        assert counts["direct"] == 0 and len(opened) == 1
    assert sum("reading through the worker only" in r.getMessage() for r in caplog.records) == 1


def test_with_group_commit_the_readable_end_is_the_flushed_offset(broker: RunningBroker) -> None:
    """flush_messages = 1: records are visible once fsynced (the high watermark is the flushed
    offset), and a direct reader reads no further than that either."""
    with broker.admin() as admin:
        admin.create_topic("durable", partitions=1, config={"flush_messages": 1})
    broker.wait_ready()
    tp = TopicPartition("durable", 0)
    with Consumer(broker.data_dir) as consumer:
        consumer.assign([tp])
        consumer.seek(tp, 0)
        for first in (0, 500, 1000):
            produce(broker.data_dir, first, 500, topic="durable")
            assert poll_until(consumer, 500) == expected(first, 500)
            block = consumer._fetchers[tp].direct.block  # type: ignore[union-attr]
            readable = block.readable()
            assert readable is not None
            assert readable[2] == block.high_watermark == first + 500, readable


def test_a_spinning_poll_takes_another_partitions_answer(broker: RunningBroker) -> None:
    """Partition 0 read directly, nothing new there (the poll spins on its readable end, no
    fetch of its own in flight), partition 1 waiting on a parked fetch whose answer is there:
    that poll takes the answer (it once went round its spin for ever, the event pending)."""
    with broker.admin() as admin:
        admin.create_topic("two", partitions=2)
    broker.wait_ready()
    tps = [TopicPartition("two", 0), TopicPartition("two", 1)]

    def stuck(*_: Any) -> None:
        raise TimeoutError("poll did not return")

    previous = signal.signal(signal.SIGALRM, stuck)
    try:
        with Producer(broker.data_dir, linger_ms=0) as producer, \
                Consumer(broker.data_dir, poll_spin_us=200_000,
                         fetch_max_wait_ms=5000) as consumer:
            consumer.assign(tps)
            for tp in tps:
                consumer.seek(tp, 0)
            for index in range(3):
                producer.send("two", b"zero-%d" % index, partition=0).result(10)
                assert [(r.partition, r.offset) for r in consumer.poll(5000)] == [(0, index)]
            fetchers = [consumer._fetchers[tp] for tp in tps]
            assert fetchers[0].direct is not None and fetchers[0].in_flight_offset is None
            assert fetchers[1].in_flight_offset == 0  # parked at partition 1's worker
            producer.send("two", b"one", partition=1).result(10)
            signal.alarm(10)
            got = [(r.partition, r.offset, r.value) for r in consumer.poll(3000)]
            signal.alarm(0)
            assert got == [(1, 0, b"one")]
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_random_produce_poll_and_seek_direct_and_through_the_worker_agree(
        topic: RunningBroker) -> None:
    """A seeded random run of produces (batches of all sizes, rolls on the way), polls of
    random sizes and seeks, with one consumer reading directly and one through the worker:
    after every step both have returned exactly the stored records from their last seek."""
    import random

    rng = random.Random(1515)
    produced = 0
    consumers = {True: Consumer(topic.data_dir, fetch_max_bytes=2000,
                                direct_reads=True),
                 False: Consumer(topic.data_dir, direct_reads=False)}
    counts = count_direct_reads(consumers[True])
    returned: dict[bool, list[tuple[int, bytes]]] = {True: [], False: []}
    start = 0
    try:
        with Producer(topic.data_dir, linger_ms=1, batch_size_bytes=4096) as producer:
            for consumer in consumers.values():
                consumer.assign([TP])
                consumer.seek(TP, 0)
            for _ in range(120):
                action = rng.random()
                if action < 0.4:
                    count = rng.choice([1, 2, 7, 50, 300])
                    futures = [producer.send(TOPIC, value(offset), partition=0)
                               for offset in range(produced, produced + count)]
                    producer.flush(30)
                    assert [f.result(0).offset for f in futures] == list(
                        range(produced, produced + count))
                    produced += count
                elif action < 0.9:
                    limit = rng.choice([1, 10, 500, None])
                    for direct, consumer in consumers.items():
                        returned[direct] += [(r.offset, r.value) for r in
                                             consumer.poll(timeout_ms=rng.choice([0, 20]),
                                                           max_records=limit)]
                else:
                    start = rng.randrange(0, produced + 1)
                    for direct, consumer in consumers.items():
                        consumer.seek(TP, start)
                        returned[direct] = []
                for direct in consumers:
                    got = returned[direct]
                    assert got == expected(start, len(got)), (direct, got[:3], start)
            for direct, consumer in consumers.items():  # and all of it in the end
                returned[direct] += poll_until(consumer, produced - start - len(returned[direct]))
        assert returned[True] == returned[False] == expected(start, produced - start)
        assert counts["direct"] > 10, counts
    finally:
        for consumer in consumers.values():
            consumer.close()
