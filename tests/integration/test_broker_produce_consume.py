"""Produce and consume through real broker processes: producer processes (keyed, unkeyed,
explicit partitions, the socket fallback), columnar batches, headers/keys/timestamps, seeking,
offsets_for_times, max_records, acks=0.  Every acknowledged record is checked by value and
offset."""

from __future__ import annotations

import collections
import time
from pathlib import Path

import numpy as np
import pytest
from broker_helpers import RunningBroker, wait_for
from integration.produce_helpers import (
    check_acked,
    producer_results,
    read_partitions,
    start_producer_process,
)

from shmbroker import Consumer, Producer, TopicPartition
from shmbroker.client import producer as producer_module
from shmbroker.client.partitioner import partition_for_key
from shmbroker.errors import (
    NoOffsetForPartitionError,
    OffsetOutOfRangeError,
    RecordTooLargeError,
)

pytestmark = pytest.mark.integration


PARTITIONS = 3
RECORDS_PER_PRODUCER = 600
BASE_TIMESTAMP_MS = 1_700_000_000_000


def _keyed_records(tag: str) -> list[dict[str, object]]:
    return [{"value": f"{tag}-{i}", "key": f"key-{i % 23}",
             "headers": [["h", f"{tag}-h{i}"], ["n", str(i)]],
             "timestamp_ms": BASE_TIMESTAMP_MS + i} for i in range(RECORDS_PER_PRODUCER)]


def test_producer_processes_keyed_unkeyed_explicit_and_socket(broker: RunningBroker,
                                                              tmp_path: Path) -> None:
    with broker.admin() as admin:
        admin.create_topic("events", partitions=PARTITIONS)
    workloads = {
        "keyed": (_keyed_records("keyed"), {"linger_ms": 2}),
        "unkeyed": ([{"value": f"unkeyed-{i}"} for i in range(RECORDS_PER_PRODUCER)],
                    {"linger_ms": 1, "batch_size_bytes": 2048}),
        "explicit": ([{"value": f"explicit-{i}", "partition": i % PARTITIONS}
                      for i in range(RECORDS_PER_PRODUCER)], {"linger_ms": 0}),
        "socket": ([{"value": f"socket-{i}", "partition": (i // 7) % PARTITIONS,
                     "key": None if i % 2 else f"s{i}"} for i in range(RECORDS_PER_PRODUCER)],
                   {"linger_ms": 2, "transport": "socket"}),
    }
    processes = {tag: start_producer_process(broker.data_dir, "events", records,
                                             tmp_path / f"{tag}.json", **args)
                 for tag, (records, args) in workloads.items()}
    results = {tag: producer_results(process, tmp_path / f"{tag}.json")
               for tag, process in processes.items()}

    acked = [(value.encode(), partition, offset)
             for rows in results.values() for value, _, partition, offset, _ in rows]
    assert len(acked) == len(workloads) * RECORDS_PER_PRODUCER
    records = read_partitions(broker.data_dir, "events", range(PARTITIONS))
    assert check_acked(acked, records) == len(acked)
    assert sum(len(found) for found in records.values()) == len(acked)

    # Per producer and partition, offsets grow in send order (and so does the consumed order).
    for tag, rows in results.items():
        last: dict[int, int] = {}
        for value, _, partition, offset, _ in rows:
            assert offset > last.get(partition, -1), f"{tag}: {value} at {offset} out of order"
            last[partition] = offset
    # Explicit partitions are honoured; keys land where Kafka's partitioner puts them.
    for value, _, partition, _, _ in results["explicit"]:
        assert partition == int(value.split("-")[1]) % PARTITIONS
    key_partitions: dict[str, set[int]] = collections.defaultdict(set)
    for _, key, partition, _, _ in results["keyed"]:
        key_partitions[key].add(partition)
        assert partition == partition_for_key(key.encode(), PARTITIONS)
    assert all(len(found) == 1 for found in key_partitions.values())
    # Keys, headers and timestamps round trip.
    by_value = {record.value: record for found in records.values() for record in found}
    for index, (value, key, _, _, timestamp_ms) in enumerate(results["keyed"]):
        record = by_value[value.encode()]
        assert record.key == key.encode()
        assert record.timestamp_ms == timestamp_ms == BASE_TIMESTAMP_MS + index
        assert record.headers == (("h", f"keyed-h{index}".encode()), ("n", str(index).encode()))
    for value, key, *_ in results["socket"]:
        assert by_value[value.encode()].key == (key.encode() if key is not None else None)
    # Unkeyed records: the sticky partitioner spread them (batches of 2 KiB, 3 partitions).
    assert len({partition for _, _, partition, _, _ in results["unkeyed"]}) > 1


def test_null_values_keys_and_headers_round_trip(broker: RunningBroker) -> None:
    with broker.admin() as admin:
        admin.create_topic("nulls", partitions=1)
    sends = [
        {"value": None, "key": b"k"},
        {"value": b"", "key": None},
        {"value": b"v", "key": b"", "headers": [("empty", b""), ("none", None)]},
        {"value": b"\x00\xff" * 100, "key": b"\x01" * 300, "timestamp_ms": 0},
        {"value": b"last", "headers": [("unicode-\u00e9", b"x")],
         "timestamp_ms": BASE_TIMESTAMP_MS},
    ]
    with Producer(broker.data_dir, linger_ms=0) as producer:
        futures = [producer.send("nulls", **send) for send in sends]  # type: ignore[arg-type]
        metas = [future.result(10) for future in futures]
    assert [meta.offset for meta in metas] == list(range(len(sends)))
    records = read_partitions(broker.data_dir, "nulls", [0])[0]
    assert len(records) == len(sends)
    for send, meta, record in zip(sends, metas, records):
        assert (record.offset, record.value, record.key) == (
            meta.offset, send["value"], send.get("key"))
        assert record.headers == tuple(send.get("headers", ()))  # type: ignore[arg-type]
        assert record.timestamp_ms == meta.timestamp_ms
        if "timestamp_ms" in send:
            assert record.timestamp_ms == send["timestamp_ms"]


def test_send_batch_columnar_and_poll_columnar(broker: RunningBroker) -> None:
    with broker.admin() as admin:
        admin.create_topic("columns", partitions=2)
    count = 3000
    width = 16
    buffer = b"".join(b"%016d" % i for i in range(count))
    lengths = np.full(count, width, dtype=np.int64)
    timestamps = np.arange(count, dtype=np.int64) + BASE_TIMESTAMP_MS
    listed = [b"list-%d" % i for i in range(500)]
    with Producer(broker.data_dir, batch_size_bytes=8192) as producer:
        columnar = producer.send_batch("columns", (buffer, lengths), partition=1,
                                       timestamps=timestamps)
        as_list = producer.send_batch("columns", listed, partition=0,
                                      keys=[b"k%d" % i for i in range(500)])
        meta = columnar.result(20)
        list_meta = as_list.result(20)
    assert len(meta.base_offsets) > 1, "3000 records of 16 bytes span several 8 KiB batches"
    assert sum(meta.counts) == count
    assert meta.offsets().tolist() == list(range(count))
    assert list_meta.offsets().tolist() == list(range(500))

    acked = [(buffer[i * width:(i + 1) * width], 1, int(offset))
             for i, offset in enumerate(meta.offsets())]
    acked += [(value, 0, int(offset)) for value, offset in zip(listed, list_meta.offsets())]
    check_acked(acked, read_partitions(broker.data_dir, "columns", [0, 1]))

    tp = TopicPartition("columns", 1)
    with Consumer(broker.data_dir, auto_offset_reset="earliest") as consumer:
        consumer.assign([tp])
        seen_offsets: list[int] = []
        seen_values: list[bytes | None] = []
        for _ in range(200):
            if len(seen_offsets) >= count:
                break
            for columns in consumer.poll_columnar(timeout_ms=2000):
                assert (columns.topic, columns.partition) == ("columns", 1)
                assert columns.offsets.dtype == np.int64
                assert len(columns.values()) == len(columns)
                blocks = columns.value_blocks()
                assert blocks is not None
                assert b"".join(block.tobytes() for block in blocks) == b"".join(
                    value for value in columns.values() if value is not None)
                assert columns.timestamps_ms.tolist() == (
                    columns.offsets + BASE_TIMESTAMP_MS).tolist()
                seen_offsets += columns.offsets.tolist()
                seen_values += columns.values()
        assert seen_offsets == list(range(count))
        assert seen_values == [buffer[i * width:(i + 1) * width] for i in range(count)]
        # Whole batches: a columnar poll after a seek starts at the batch holding the position.
        consumer.seek(tp, 1234)
        first = consumer.poll_columnar(timeout_ms=5000)
        assert first and int(first[0].offsets[0]) <= 1234 <= int(first[0].offsets[-1])


def test_send_batch_columnar_with_keys_across_batches(broker: RunningBroker) -> None:
    """Columnar values with a list of keys (some null, of mixed sizes), cut into several
    RecordBatches: each record keeps its own key; with no partition given, the first key
    chooses it, as it would for a keyed send."""
    with broker.admin() as admin:
        admin.create_topic("keyed-columns", partitions=3)
    count = 2000
    values = [b"value-%05d" % i for i in range(count)]
    keys = [None if i % 7 == 0 else b"key-%d" % (i * 37) for i in range(count)]
    keys[0] = b"first-key"
    buffer = b"".join(values)
    lengths = np.fromiter(map(len, values), dtype=np.int64, count=count)
    expected_partition = partition_for_key(b"first-key", 3)
    with Producer(broker.data_dir, batch_size_bytes=4096) as producer:
        meta = producer.send_batch("keyed-columns", (buffer, lengths), keys=keys).result(20)
    assert meta.partition == expected_partition
    assert len(meta.base_offsets) > 3 and meta.offsets().tolist() == list(range(count))
    stored = read_partitions(broker.data_dir, "keyed-columns", [expected_partition])
    assert [(record.offset, record.key, record.value) for record in stored[expected_partition]
            ] == [(offset, key, value) for offset, (key, value) in enumerate(zip(keys, values))]


@pytest.mark.parametrize("values, keys, error, message", [
    ([b"a", b"b"], [b"k"], ValueError, "1 keys for 2 values"),
    ([], None, ValueError, "at least one record"),
    ((b"", []), None, ValueError, "at least one record"),
    ([b"small", b"x" * 8192], None, RecordTooLargeError, "does not fit in a batch"),
    ((b"ab", [1, 1]), [b"k", 5], TypeError, "keys must be bytes"),
])
def test_send_batch_refuses_bad_input_and_sends_nothing(
        broker: RunningBroker, values: object, keys: object, error: type,
        message: str) -> None:
    with broker.admin() as admin:
        admin.create_topic("refused", partitions=1, config={"max_batch_bytes": 4096})
    with Producer(broker.data_dir) as producer:
        with pytest.raises(error, match=message):
            producer.send_batch("refused", values, keys=keys, partition=0)  # type: ignore[arg-type]
        assert producer.send("refused", b"after", partition=0).result(10).offset == 0


def test_max_poll_records_returns_every_record_once_and_holds_back_whole_batches(
        broker: RunningBroker) -> None:
    """Large fetches returned a few records at a time (Kafka's max.poll.records): every record
    once, in order, positions exact, a paused partition's held-back records kept for resume.
    What a poll does not return is held back as slices and undecoded batches, not one entry
    per record (which made each poll copy all the rest: 0.01M records/s at 500 a poll)."""
    with broker.admin() as admin:
        admin.create_topic("bulk", partitions=2)
    count = 12_000
    tps = [TopicPartition("bulk", p) for p in range(2)]
    with Producer(broker.data_dir, acks=1, batch_size_bytes=256 * 1024) as producer:
        for tp in tps:
            values = b"".join(b"p%d-%07d" % (tp.partition, i) for i in range(count))
            producer.send_batch("bulk", (values, np.full(count, 10)), partition=tp.partition,
                                timestamps=BASE_TIMESTAMP_MS).result(20)
    with Consumer(broker.data_dir, auto_offset_reset="earliest", max_poll_records=37) as consumer:
        consumer.assign(tps)
        got: dict[int, list[tuple[int, bytes]]] = {0: [], 1: []}
        polls = 0
        while len(got[0]) + len(got[1]) < 2 * count and polls < 5000:
            polls += 1
            if polls == 20:
                consumer.pause(tps[1])
            if polls == 60:
                assert consumer.paused() == {tps[1]}
                consumer.resume(tps[1])
            records = consumer.poll(timeout_ms=5000)
            assert 0 < len(records) <= 37
            for record in records:
                got[record.partition].append((record.offset, record.value))
                assert record.partition == 0 or not 20 <= polls < 60  # paused: nothing
            for tp in tps:
                if got[tp.partition]:
                    assert consumer.position(tp) == got[tp.partition][-1][0] + 1
            held = sum(len(fetcher.buffered) for fetcher in consumer._fetchers.values())
            assert held <= 32, f"{held} entries held back"
        for tp in tps:
            assert got[tp.partition] == [(i, b"p%d-%07d" % (tp.partition, i))
                                         for i in range(count)]


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "10"])
def test_max_poll_records_and_max_records_are_checked(broker: RunningBroker,
                                                      value: object) -> None:
    with pytest.raises(ValueError, match=r"max_poll_records must be an int >= 1 or None"):
        Consumer(broker.data_dir, max_poll_records=value)  # type: ignore[arg-type]
    with Consumer(broker.data_dir) as consumer:
        assert consumer.max_poll_records == 500  # Kafka's default
        with pytest.raises(ValueError, match=r"max_records must be an int >= 1 or None"):
            consumer.poll(0, max_records=value)  # type: ignore[arg-type]


def test_seek_position_offsets_for_times_and_max_records(broker: RunningBroker) -> None:
    with broker.admin() as admin:
        admin.create_topic("seek", partitions=1)
    count = 1000
    tp = TopicPartition("seek", 0)
    with Producer(broker.data_dir, linger_ms=2, batch_size_bytes=4096) as producer:
        futures = [producer.send("seek", b"r%d" % i, partition=0,
                                 timestamp_ms=BASE_TIMESTAMP_MS + 10 * i) for i in range(count)]
        producer.flush(20)
        metas = [future.result(5) for future in futures]
    assert [meta.offset for meta in metas] == list(range(count))
    check_acked([(b"r%d" % i, 0, meta.offset) for i, meta in enumerate(metas)],
                read_partitions(broker.data_dir, "seek", [0]))

    with Consumer(broker.data_dir, auto_offset_reset="latest") as consumer:
        consumer.assign([tp])
        assert consumer.position(tp) == count  # latest
        assert consumer.beginning_offsets([tp]) == {tp: 0}
        assert consumer.end_offsets([tp]) == {tp: count}
        found = consumer.offsets_for_times({tp: BASE_TIMESTAMP_MS + 10 * 500})
        assert found[tp] is not None and found[tp].offset == 500
        assert found[tp].timestamp_ms == BASE_TIMESTAMP_MS + 5000
        between = consumer.offsets_for_times({tp: BASE_TIMESTAMP_MS + 10 * 700 - 3})
        assert between[tp] is not None and between[tp].offset == 700
        assert consumer.offsets_for_times({tp: 0})[tp] is not None
        assert consumer.offsets_for_times({tp: 0})[tp].offset == 0  # type: ignore[union-attr]
        assert consumer.offsets_for_times({tp: BASE_TIMESTAMP_MS + 10 * count}) == {tp: None}

        consumer.seek(tp, 500)
        assert consumer.position(tp) == 500
        got = consumer.poll(timeout_ms=5000, max_records=7)
        assert [(r.offset, r.value) for r in got] == [(500 + i, b"r%d" % (500 + i))
                                                      for i in range(7)]
        assert consumer.position(tp) == 507
        more = consumer.poll(timeout_ms=5000, max_records=5)
        assert [r.offset for r in more] == list(range(507, 512))
        assert consumer.position(tp) == 512

        # Out of range: reset as auto_offset_reset says (latest here).
        consumer.seek(tp, count + 100)
        assert consumer.poll(timeout_ms=300) == []
        assert consumer.position(tp) == count
        consumer.seek_to_end()
        assert consumer.position(tp) == count
        assert consumer.poll(timeout_ms=200) == []
        consumer.seek_to_beginning()
        assert consumer.position(tp) == 0
        everything = []
        for _ in range(100):
            if len(everything) >= count:
                break
            batch = consumer.poll(timeout_ms=2000, max_records=300)
            assert len(batch) <= 300
            everything += batch
        assert [(r.offset, r.value, r.timestamp_ms) for r in everything] == [
            (i, b"r%d" % i, BASE_TIMESTAMP_MS + 10 * i) for i in range(count)]
        assert consumer.position(tp) == count
    with Consumer(broker.data_dir, auto_offset_reset="earliest") as consumer:
        consumer.assign([tp])
        consumer.seek(tp, count + 100)
        got = consumer.poll(timeout_ms=5000, max_records=3)
        assert [(r.offset, r.value) for r in got] == [(i, b"r%d" % i) for i in range(3)]
    with Consumer(broker.data_dir, auto_offset_reset="none") as consumer:
        consumer.assign([tp])
        with pytest.raises(NoOffsetForPartitionError):
            consumer.poll(timeout_ms=100)
        consumer.seek(tp, count + 100)
        with pytest.raises(OffsetOutOfRangeError):
            consumer.poll(timeout_ms=2000)


def test_acks_zero_futures_give_minus_one_and_records_arrive(broker: RunningBroker) -> None:
    with broker.admin() as admin:
        admin.create_topic("fire", partitions=2)
    count = 1000
    with Producer(broker.data_dir, acks=0, linger_ms=1) as producer:
        futures = [producer.send("fire", b"f%d" % i, partition=i % 2) for i in range(count)]
        producer.flush(20)
        metas = [future.result(5) for future in futures]
    assert {meta.offset for meta in metas} == {-1}
    assert [meta.partition for meta in metas] == [i % 2 for i in range(count)]
    # acks=0: flush returns once the batches are in the rings, not once they are appended
    wanted = [TopicPartition("fire", 0), TopicPartition("fire", 1)]
    with Consumer(broker.data_dir) as consumer:
        wait_for(lambda: consumer.end_offsets(wanted) == {tp: count // 2 for tp in wanted},
                 message="the workers to append what acks=0 sent")
    records = read_partitions(broker.data_dir, "fire", [0, 1])
    # Nothing was acked with an offset, but one producer writing in order means record i of
    # partition p sits at offset i // 2.
    check_acked([(b"f%d" % i, i % 2, i // 2) for i in range(count)], records)
    assert sum(len(found) for found in records.values()) == count


@pytest.mark.parametrize("transport", ["shm", "socket"])
def test_done_callbacks_get_each_records_outcome(broker: RunningBroker, transport: str) -> None:
    """Kafka's send callback: ``add_done_callback`` runs once per record with its future,
    acknowledged (offsets in send order) or failed (a record too big for the topic)."""
    with broker.admin() as admin:
        admin.create_topic("called", partitions=1, config={"max_batch_bytes": 4096})
    outcomes: list[tuple[bytes, int | None, str | None]] = []
    sent = [b"c%03d" % i for i in range(300)]

    def record(value: bytes):
        def done(future) -> None:
            error = future.exception(0)
            outcomes.append((value, None if error else future.result(0).offset,
                             type(error).__name__ if error else None))
        return done

    with Producer(broker.data_dir, linger_ms=2, transport=transport) as producer:
        for value in sent[:150]:
            producer.send("called", value, partition=0).add_done_callback(record(value))
        producer.send("called", b"x" * 8192, partition=0).add_done_callback(record(b"big"))
        for value in sent[150:]:
            producer.send("called", value, partition=0).add_done_callback(record(value))
        producer.flush(20)
        wait_for(lambda: len(outcomes) == len(sent) + 1, message="every callback")
    assert (b"big", None, "BatchTooLargeError") in outcomes
    acked = [(value, offset) for value, offset, error in outcomes if error is None]
    assert sorted(acked, key=lambda pair: pair[1]) == [(value, offset) for offset, value
                                                       in enumerate(sent)]
    check_acked([(value, 0, offset) for value, offset in acked],
                read_partitions(broker.data_dir, "called", [0]))


@pytest.mark.parametrize("transport", ["shm", "socket"])
def test_transports_give_the_same_log(broker: RunningBroker, transport: str) -> None:
    with broker.admin() as admin:
        admin.create_topic("same", partitions=2)
    count = 800
    with Producer(broker.data_dir, transport=transport, linger_ms=1) as producer:
        futures = [producer.send("same", b"v%d" % i, key=b"k%d" % (i % 5),
                                 partition=(i // 10) % 2, headers=[("i", b"%d" % i)],
                                 timestamp_ms=BASE_TIMESTAMP_MS + i) for i in range(count)]
        producer.flush(30)
        metas = [future.result(5) for future in futures]
    expected = {0: [], 1: []}  # type: dict[int, list[bytes]]
    for i in range(count):
        expected[(i // 10) % 2].append(b"v%d" % i)
    for i, meta in enumerate(metas):
        assert (meta.partition, meta.offset) == ((i // 10) % 2,
                                                 expected[(i // 10) % 2].index(b"v%d" % i))
    records = read_partitions(broker.data_dir, "same", [0, 1])
    check_acked([(b"v%d" % i, meta.partition, meta.offset) for i, meta in enumerate(metas)],
                records)
    by_value = {r.value: r for found in records.values() for r in found}
    for i in range(count):
        record = by_value[b"v%d" % i]
        assert record.key == b"k%d" % (i % 5)
        assert record.headers == (("i", b"%d" % i),)
        assert record.timestamp_ms == BASE_TIMESTAMP_MS + i


def test_a_lingering_batch_wakes_the_sleeping_io_thread(broker: RunningBroker,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The producer's I/O thread seals batches whose linger_ms ran out.  Asleep with nothing to
    do (here for up to a minute), it is woken by the batch that send opens: each lone record is
    acknowledged long before that sleep would end.  (Asleep until before the batch is due, it
    is not woken: it seals the batch when it wakes.)"""
    monkeypatch.setattr(producer_module, "IO_WAIT_S_MAX", 60.0)
    with broker.admin() as admin:
        admin.create_topic("linger", partitions=1)
    with Producer(broker.data_dir, linger_ms=5) as producer:
        for i in range(3):
            wait_for(lambda: producer._io_idle and producer._io_wake_at - time.monotonic() > 30,
                     message="the I/O thread in its long sleep")
            assert producer.send("linger", b"v%d" % i).result(10).offset == i
