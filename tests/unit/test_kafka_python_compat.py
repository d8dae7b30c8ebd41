"""Interoperability with kafka-python's RecordBatch v2 reader and writer.

Our batches must read with ``kafka.record.default_records.DefaultRecordBatch`` (CRC included),
theirs with ours, for every codec we support; uncompressed batches must even be byte-identical.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shmbroker.format import record_batch as rb

with warnings.catch_warnings():
    # kafka-python 3.0 loads its protocol schemas with importlib.resources.read_text, which
    # Python 3.11 deprecates; the warning is theirs, not ours (filterwarnings = error).
    warnings.simplefilter("ignore", DeprecationWarning)
    from kafka.record import MemoryRecords
    from kafka.record.default_records import DefaultRecordBatch, DefaultRecordBatchBuilder

CODECS = {"none": 0, "gzip": 1, "lz4": 3, "zstd": 4}

Header = tuple[str, bytes | None]
Row = tuple[int, bytes | None, bytes | None, list[Header]]  # timestamp, key, value, headers

ROWS: list[Row] = [
    (1_700_000_000_000, b"key", b"value " * 30, [("trace-id", b"abc"), ("null", None)]),
    (1_700_000_000_500, None, b"value " * 30, []),
    (1_699_999_999_000, b"", None, [("\u00fcnic\u00f8de-\U0001f600", b"")]),
    (1_700_000_000_001, b"k" * 100, b"", []),
] + [(1_700_000_000_000 + i, b"key-%d" % i, b"value " * 30, []) for i in range(100)]


def ours(rows: list[Row], codec: str, **fields: object) -> bytearray:
    return rb.encode_batch([r[2] for r in rows], keys=[r[1] for r in rows],
                           timestamps=[r[0] for r in rows], headers=[r[3] for r in rows],
                           codec=codec, **fields)  # type: ignore[arg-type]


def theirs(rows: list[Row], codec: str, *, transactional: bool = False, producer_id: int = -1,
           producer_epoch: int = -1, base_sequence: int = -1) -> bytes:
    builder = DefaultRecordBatchBuilder(
        magic=2, compression_type=CODECS[codec], is_transactional=transactional,
        producer_id=producer_id, producer_epoch=producer_epoch, base_sequence=base_sequence,
        batch_size=2**30)
    for offset, (timestamp, key, value, headers) in enumerate(rows):
        assert builder.append(offset, timestamp, key, value, headers) is not None
    return bytes(builder.build())


def read_theirs(batch: bytes | bytearray) -> tuple[DefaultRecordBatch, list[rb.Record]]:
    reader = DefaultRecordBatch(bytes(batch))
    assert reader.validate_crc()  # before iterating, as kafka-python requires
    records = [rb.Record(r.offset, r.timestamp, r.key, r.value, tuple(r.headers))
               for r in reader]
    return reader, records


def expected(rows: list[Row], base_offset: int = 0,
             log_append_time: bool = False) -> list[rb.Record]:
    max_timestamp = max(r[0] for r in rows)
    return [rb.Record(base_offset + i, max_timestamp if log_append_time else ts, key, value,
                      tuple(headers))
            for i, (ts, key, value, headers) in enumerate(rows)]


@pytest.mark.parametrize("codec", CODECS)
def test_kafka_python_reads_our_batches(codec: str) -> None:
    batch = ours(ROWS, codec, base_offset=1000, partition_leader_epoch=5, producer_id=77,
                 producer_epoch=3, base_sequence=900, transactional=True)
    reader, records = read_theirs(batch)
    assert reader.base_offset == 1000
    assert reader.compression_type == CODECS[codec]
    assert reader.records_count == len(ROWS)
    assert reader.last_offset_delta == len(ROWS) - 1
    assert reader.leader_epoch == 5
    assert (reader.producer_id, reader.producer_epoch, reader.base_sequence) == (77, 3, 900)
    assert reader.is_transactional and not reader.is_control_batch
    assert reader.first_timestamp == ROWS[0][0]
    assert reader.max_timestamp == max(r[0] for r in ROWS)
    assert reader.size_in_bytes == len(batch)
    assert records == expected(ROWS, 1000)


@pytest.mark.parametrize("codec", CODECS)
def test_kafka_python_reads_log_append_time(codec: str) -> None:
    batch = ours(ROWS[:10], codec, log_append_time=True)
    reader, records = read_theirs(batch)
    assert reader.timestamp_type == 1
    assert records == expected(ROWS[:10], log_append_time=True)


@pytest.mark.parametrize("codec", CODECS)
def test_we_read_kafka_python_batches(codec: str) -> None:
    batch = theirs(ROWS, codec, transactional=True, producer_id=12, producer_epoch=1,
                   base_sequence=40)
    header = rb.validate_batch(batch)
    assert header.codec == CODECS[codec]  # the rows compress well: kafka-python keeps the codec
    assert header.is_transactional
    assert (header.producer_id, header.producer_epoch, header.base_sequence) == (12, 1, 40)
    assert rb.decode_batch(batch) == expected(ROWS)
    columns = rb.decode_columnar(batch)
    assert [columns.value(i) for i in range(len(ROWS))] == [r[2] for r in ROWS]
    assert list(rb.iter_records(batch)) == expected(ROWS)


def test_uncompressed_batches_are_byte_identical() -> None:
    # kafka-python's producer leaves base_offset and partition_leader_epoch at 0
    assert ours(ROWS, "none", partition_leader_epoch=0) == theirs(ROWS, "none")
    fields = dict(producer_id=5, producer_epoch=2, base_sequence=17)
    assert ours(ROWS[:3], "none", partition_leader_epoch=0, transactional=True, **fields) == \
        theirs(ROWS[:3], "none", transactional=True, **fields)  # type: ignore[arg-type]
    same_size = [(7, None, b"%04d" % i, []) for i in range(300)]
    assert ours(same_size, "none", partition_leader_epoch=0) == \
        theirs(same_size, "none")  # type: ignore[arg-type]


def test_memory_records_over_our_concatenated_batches() -> None:
    batches = [ours(ROWS[:3], "none", base_offset=0),
               ours(ROWS[3:50], "gzip", base_offset=3),
               ours(ROWS[50:51], "lz4", base_offset=50),
               ours(ROWS[51:], "zstd", base_offset=51)]
    buffer = b"".join(bytes(b) for b in batches)
    memory = MemoryRecords(buffer + bytes(batches[0][:30]))  # and a partial tail
    assert memory.valid_bytes() == len(buffer)
    seen: list[rb.Record] = []
    for batch in memory:
        assert batch.validate_crc()
        seen += [rb.Record(r.offset, r.timestamp, r.key, r.value, tuple(r.headers))
                 for r in batch]
    assert seen == expected(ROWS)
    assert list(rb.iter_records(buffer + bytes(batches[0][:30]))) == seen


def test_columnar_batches_read_with_kafka_python() -> None:
    count = 5000
    values = np.arange(count, dtype=">u4").view(np.uint8)  # 4 bytes per record
    stamps = 1_700_000_000_000 + np.arange(count, dtype=np.int64) * 3
    for codec in CODECS:
        batch = rb.encode_batch_columnar(values, np.full(count, 4), timestamps=stamps,
                                         codec=codec, base_offset=10)
        _, records = read_theirs(batch)
        assert [r.value for r in records] == [int(i).to_bytes(4, "big") for i in range(count)]
        assert [r.timestamp_ms for r in records] == stamps.tolist()
        assert [r.offset for r in records] == list(range(10, 10 + count))


# ------------------------------------------------------------------------------------------------
# hypothesis
# ------------------------------------------------------------------------------------------------

header_lists = st.lists(st.tuples(st.text(max_size=8), st.none() | st.binary(max_size=8)),
                        max_size=3)


@st.composite
def row_lists(draw: st.DrawFn) -> list[Row]:
    count = draw(st.integers(1, 80))
    base = draw(st.integers(0, 2**50))
    if draw(st.booleans()):  # equal sizes, no keys or headers: the uniform path
        size = draw(st.integers(0, 16))
        return [(base + draw(st.integers(-1000, 1000)), None, bytes([i % 256]) * size, [])
                for i in range(count)]
    return draw(st.lists(st.tuples(st.integers(base - 2**40, base + 2**40),
                                   st.none() | st.binary(max_size=10),
                                   st.none() | st.binary(max_size=30), header_lists),
                         min_size=count, max_size=count))


@settings(deadline=None, max_examples=120, print_blob=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(row_lists(), st.sampled_from(sorted(CODECS)), st.integers(0, 2**40), st.booleans())
def test_interoperability(rows: list[Row], codec: str, base_offset: int,
                          log_append_time: bool) -> None:
    batch = ours(rows, codec, base_offset=base_offset, log_append_time=log_append_time)
    reader, records = read_theirs(batch)
    assert reader.compression_type == CODECS[codec]
    assert records == expected(rows, base_offset, log_append_time)
    their_batch = theirs(rows, codec)
    their_codec = rb.validate_batch(their_batch).codec
    assert their_codec in (0, CODECS[codec])  # kafka-python drops a codec that does not help
    assert rb.decode_batch(their_batch) == expected(rows)
    if their_codec == 0:
        assert bytes(ours(rows, "none", partition_leader_epoch=0)) == their_batch
