"""Long polling: a parked fetch answers as soon as records arrive, poll(0) does not wait, and a
fetch holds out for fetch_min_bytes until its max wait."""

from __future__ import annotations

import select
import threading
import time

import pytest
from broker_helpers import RunningBroker, wait_for
from integration.produce_helpers import raw_connect, read_partitions

from shmbroker import Admin, Consumer, Producer, TopicPartition
from shmbroker.client.connection import read_frame
from shmbroker.format import record_batch
from shmbroker.protocol.frames import encode_frame
from shmbroker.protocol.messages import ApiKey

pytestmark = pytest.mark.integration


LONG_POLL_MS = 5000
PRODUCE_DELAY_S = 0.3  # the record must arrive while the poll is parked, not before it


def _worker_socket(broker: RunningBroker, topic: str, partition: int) -> str:
    with Admin(broker.data_dir) as admin:
        (meta,) = admin.metadata([topic])
    return str(meta["partitions"][partition]["socket"])


def test_long_poll_returns_when_a_record_arrives(broker: RunningBroker) -> None:
    with broker.admin() as admin:
        admin.create_topic("waiting", partitions=1)
    tp = TopicPartition("waiting", 0)
    acked: list[int] = []
    with Consumer(broker.data_dir, fetch_max_wait_ms=LONG_POLL_MS) as consumer, \
            Producer(broker.data_dir, linger_ms=0) as producer:
        consumer.assign([tp])
        assert consumer.position(tp) == 0
        polling = threading.Event()

        def produce_later() -> None:
            polling.wait(10)
            time.sleep(PRODUCE_DELAY_S)
            acked.append(producer.send("waiting", b"wake up", partition=0).result(10).offset)

        thread = threading.Thread(target=produce_later)
        thread.start()
        started = time.monotonic()
        polling.set()
        records = consumer.poll(timeout_ms=LONG_POLL_MS)
        elapsed_s = time.monotonic() - started
        thread.join(10)
    assert [(r.offset, r.value) for r in records] == [(0, b"wake up")]
    assert acked == [0]
    assert elapsed_s < LONG_POLL_MS / 1000 * 0.8, f"poll returned only after {elapsed_s:.2f} s"


@pytest.mark.parametrize("poll_spin_us", [1000, 1_000_000])
def test_a_spinning_consumer_gets_records_and_keeps_its_timeout(broker: RunningBroker,
                                                                poll_spin_us: int) -> None:
    """poll_spin_us: a record that arrives during the spin (1 s) or after it (1 ms, then the
    blocking select) is delivered; an empty poll still ends at its timeout, however long the
    spin."""
    with broker.admin() as admin:
        admin.create_topic("spin", partitions=1)
    tp = TopicPartition("spin", 0)
    with Consumer(broker.data_dir, fetch_max_wait_ms=LONG_POLL_MS,
                  poll_spin_us=poll_spin_us) as consumer, \
            Producer(broker.data_dir, linger_ms=0) as producer:
        consumer.assign([tp])
        assert consumer.position(tp) == 0
        started = time.monotonic()
        assert consumer.poll(timeout_ms=100) == []
        elapsed_s = time.monotonic() - started
        assert 0.1 <= elapsed_s < 0.9, f"an empty 100 ms poll took {elapsed_s:.3f} s"
        acked: list[int] = []
        timer = threading.Timer(PRODUCE_DELAY_S / 3, lambda: acked.append(
            producer.send("spin", b"spun", partition=0).result(10).offset))
        timer.start()
        records = consumer.poll(timeout_ms=LONG_POLL_MS)
        timer.join(10)
    assert [(r.offset, r.value) for r in records] == [(0, b"spun")] and acked == [0]


def test_the_spin_ends_at_the_timeout_and_a_sleep_follows_it(broker: RunningBroker) -> None:
    """The consumer's select: a spin longer than the timeout ends at the timeout (no fetch
    answer cuts it short here: nothing is assigned), and after a short spin the blocking
    select still returns the event that comes later (here the heartbeat thread's wake-up)."""
    with Consumer(broker.data_dir, poll_spin_us=1_000_000) as consumer:
        started = time.monotonic()
        assert consumer._select(0.05) == []
        elapsed_s = time.monotonic() - started
        assert 0.05 <= elapsed_s < 0.5, f"a 50 ms select spun {elapsed_s:.3f} s"
    with Consumer(broker.data_dir, poll_spin_us=1000) as consumer:
        timer = threading.Timer(0.1, consumer._wake)
        timer.start()
        events = consumer._select(5.0)
        timer.join()
        assert [key.data for key, _ in events] == ["wake"]


@pytest.mark.parametrize("value", [-1, 1_000_001, 1.5, True, "10"])
def test_poll_spin_us_is_checked(broker: RunningBroker, value: object) -> None:
    with pytest.raises(ValueError, match="poll_spin_us must be an int from 0 to 1000000"):
        Consumer(broker.data_dir, poll_spin_us=value)  # type: ignore[arg-type]


def test_poll_with_timeout_zero_does_not_wait(broker: RunningBroker) -> None:
    with broker.admin() as admin:
        admin.create_topic("empty", partitions=2)
    tps = [TopicPartition("empty", 0), TopicPartition("empty", 1)]
    with Consumer(broker.data_dir, fetch_max_wait_ms=LONG_POLL_MS) as consumer:
        consumer.assign(tps)
        for tp in tps:
            consumer.position(tp)  # list offsets outside the timed part
        started = time.monotonic()
        assert consumer.poll(timeout_ms=0) == []
        assert consumer.poll(timeout_ms=0) == []
        assert time.monotonic() - started < 1.0
        with Producer(broker.data_dir, linger_ms=0) as producer:
            offset = producer.send("empty", b"now there is one", partition=1).result(10).offset
        # poll(0) never waits, yet repeated polls deliver the record.
        found = wait_for(lambda: consumer.poll(timeout_ms=0), 10, message="poll(0) to deliver")
        assert [(r.partition, r.offset, r.value) for r in found] == [
            (1, offset, b"now there is one")]


def test_fetch_waits_for_min_bytes_then_answers(broker: RunningBroker) -> None:
    with broker.admin() as admin:
        admin.create_topic("bulk", partitions=1)
    value = b"x" * 200
    min_bytes = 4096
    with Producer(broker.data_dir, linger_ms=0) as producer:
        first = producer.send("bulk", value, partition=0).result(10)
        assert first.offset == 0
        sock = raw_connect(_worker_socket(broker, "bulk", 0))
        try:
            sock.sendall(encode_frame(ApiKey.FETCH, 41, {
                "offset": 0, "max_bytes": 1 << 20, "max_wait_ms": 20_000,
                "min_bytes": min_bytes}))
            # One small batch is far below min_bytes: the fetch stays parked.
            readable, _, _ = select.select([sock], [], [], 0.3)
            assert not readable, "a fetch with min_bytes 4096 answered with one small batch"
            acked = [first.offset]
            for _ in range(40):
                acked.append(producer.send("bulk", value, partition=0).result(10).offset)
            assert acked == list(range(41))
            started = time.monotonic()
            body, raw, correlation_id = read_frame(sock)
            assert time.monotonic() - started < 10
            assert correlation_id == 41 and "error" not in body
            assert len(raw) >= min_bytes
            offsets = _offsets(raw)
            assert offsets == list(range(len(offsets))) and len(offsets) >= 10
            # min_bytes beyond everything: the fetch answers at its max wait with what there is.
            started = time.monotonic()
            sock.sendall(encode_frame(ApiKey.FETCH, 42, {
                "offset": 0, "max_bytes": 1 << 20, "max_wait_ms": 300,
                "min_bytes": 1 << 20}))
            body, raw, correlation_id = read_frame(sock)
            elapsed_s = time.monotonic() - started
            assert correlation_id == 42 and "error" not in body
            assert _offsets(raw) == list(range(41))
            assert 0.2 <= elapsed_s < 10
        finally:
            sock.close()


def test_consumer_fetch_min_bytes_gathers_records(broker: RunningBroker) -> None:
    with broker.admin() as admin:
        admin.create_topic("gather", partitions=1)
    tp = TopicPartition("gather", 0)
    value = b"y" * 200
    count = 40
    with Consumer(broker.data_dir, fetch_min_bytes=4096, fetch_max_wait_ms=20_000,
                  auto_offset_reset="earliest") as consumer, \
            Producer(broker.data_dir, linger_ms=0) as producer:
        consumer.assign([tp])
        assert consumer.position(tp) == 0
        polling = threading.Event()
        acked: list[int] = []

        def produce_one_by_one() -> None:
            polling.wait(10)
            for i in range(count):
                acked.append(producer.send("gather", value + b"%d" % i, partition=0)
                             .result(10).offset)

        thread = threading.Thread(target=produce_one_by_one)
        thread.start()
        polling.set()
        first = consumer.poll(timeout_ms=20_000)
        thread.join(20)
    assert acked == list(range(count))
    # Each record went out as its own ~270-byte batch: the first answer waited for >= 4 KiB.
    assert len(first) >= 4096 // 300, f"first poll returned {len(first)} record(s)"
    assert [(r.offset, r.value) for r in first] == [(i, value + b"%d" % i)
                                                    for i in range(len(first))]
    records = read_partitions(broker.data_dir, "gather", [0])[0]
    assert [(r.offset, r.value) for r in records] == [(i, value + b"%d" % i)
                                                      for i in range(count)]


def _offsets(raw: memoryview) -> list[int]:
    return [record.offset for record in record_batch.iter_records(raw)]
