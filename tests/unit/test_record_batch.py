"""RecordBatch v2: layout, CRC coverage, attributes, record shapes and argument checking.

``hand_built_batch`` writes a batch with ``struct`` and a from-the-spec varint, independently of
the codec, so the byte-for-byte comparisons below pin the format rather than the implementation.
"""

from __future__ import annotations

import dataclasses
import gc
import struct
import time
import tracemalloc
import zlib
from collections import deque
from collections.abc import Callable

import lz4.frame
import numpy as np
import pytest
import zstandard
from crc32c import crc32c
from record_reference import varint

from shmbroker import limits
from shmbroker.errors import CorruptRecordError, UnsupportedCodecError
from shmbroker.format import columnar, uniform_records
from shmbroker.format import record_batch as rb
from shmbroker.format.record_batch import (
    Record,
    decode_batch,
    decode_columnar,
    encode_batch,
    encode_batch_columnar,
    iter_batch_positions,
    iter_records,
    read_header,
    set_base_offset,
    validate_batch,
)

CODECS = ("none", "gzip", "lz4", "zstd")
CODEC_NUMBERS = {"none": 0, "gzip": 1, "snappy": 2, "lz4": 3, "zstd": 4}


# ------------------------------------------------------------------------------------------------
# an independent reference encoder
# ------------------------------------------------------------------------------------------------



def nullable(data: bytes | None) -> bytes:
    return varint(-1) if data is None else varint(len(data)) + data


def hand_record(offset_delta: int, timestamp_delta: int, key: bytes | None, value: bytes | None,
                headers: list[tuple[str, bytes | None]]) -> bytes:
    body = (b"\x00" + varint(timestamp_delta) + varint(offset_delta) + nullable(key)
            + nullable(value))
    body += varint(len(headers))
    for header_key, header_value in headers:
        body += nullable(header_key.encode("utf-8")) + nullable(header_value)
    return varint(len(body)) + body


def hand_built_batch(records: list[tuple[int, bytes | None, bytes | None,
                                         list[tuple[str, bytes | None]]]],
                     *, base_offset: int, partition_leader_epoch: int, attributes: int,
                     producer_id: int, producer_epoch: int, base_sequence: int) -> bytes:
    """records: (timestamp, key, value, headers) per record, offsets 0..n-1."""
    base_timestamp = records[0][0]
    section = b"".join(hand_record(i, ts - base_timestamp, k, v, h)
                       for i, (ts, k, v, h) in enumerate(records))
    after_crc = (struct.pack(">h", attributes) + struct.pack(">i", len(records) - 1)
                 + struct.pack(">q", base_timestamp)
                 + struct.pack(">q", max(r[0] for r in records))
                 + struct.pack(">q", producer_id) + struct.pack(">h", producer_epoch)
                 + struct.pack(">i", base_sequence) + struct.pack(">i", len(records)) + section)
    return (struct.pack(">q", base_offset) + struct.pack(">i", 4 + 1 + 4 + len(after_crc))
            + struct.pack(">i", partition_leader_epoch) + struct.pack(">b", 2)
            + struct.pack(">I", crc32c(after_crc)) + after_crc)


def recompute_crc(batch: bytearray, position: int = 0) -> None:
    size = struct.unpack_from(">i", batch, position + 8)[0] + 12
    struct.pack_into(">I", batch, position + 17,
                     crc32c(bytes(batch[position + 21 : position + size])))


def with_codec_bits(batch: bytearray, codec: int) -> bytearray:
    """The same batch with other codec bits (and a recomputed CRC)."""
    batch = bytearray(batch)
    attributes = struct.unpack_from(">h", batch, 21)[0]
    struct.pack_into(">h", batch, 21, (attributes & ~0x07) | codec)
    recompute_crc(batch)
    return batch


SAMPLE = [
    (1_700_000_000_000, b"key-0", b"value-0", [("h", b"1"), ("null", None)]),
    (1_700_000_000_005, None, b"", []),
    (1_699_999_999_000, b"", None, [("\u00e9t\u00e9-\U0001f600", b"")]),
    (1_700_000_000_003, b"k" * 200, b"v" * 300, []),
]


def encode_sample(**fields: object) -> bytearray:
    return encode_batch([r[2] for r in SAMPLE], keys=[r[1] for r in SAMPLE],
                        timestamps=[r[0] for r in SAMPLE], headers=[r[3] for r in SAMPLE],
                        **fields)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------
# layout
# ------------------------------------------------------------------------------------------------

def test_layout_constants_match_the_kafka_header() -> None:
    expected = {"BASE_OFFSET_POSITION": 0, "BATCH_LENGTH_POSITION": 8,
                "PARTITION_LEADER_EPOCH_POSITION": 12, "MAGIC_POSITION": 16, "CRC_POSITION": 17,
                "ATTRIBUTES_POSITION": 21, "LAST_OFFSET_DELTA_POSITION": 23,
                "BASE_TIMESTAMP_POSITION": 27, "MAX_TIMESTAMP_POSITION": 35,
                "PRODUCER_ID_POSITION": 43, "PRODUCER_EPOCH_POSITION": 51,
                "BASE_SEQUENCE_POSITION": 53, "RECORDS_COUNT_POSITION": 57,
                "RECORDS_POSITION": 61, "HEADER_SIZE": 61, "LOG_OVERHEAD": 12, "MAGIC": 2}
    assert {name: getattr(rb, name) for name in expected} == expected


@pytest.mark.parametrize("path", ["list", "columnar"])
def test_encoding_matches_a_hand_built_batch(path: str) -> None:
    fields = dict(base_offset=1234567890123, partition_leader_epoch=77, producer_id=987654321,
                  producer_epoch=12, base_sequence=4242)
    attributes = 0x10  # transactional
    expected = hand_built_batch([list(r) for r in SAMPLE], attributes=attributes,  # type: ignore[misc]
                                **fields)
    if path == "list":
        batch = encode_sample(transactional=True, **fields)
    else:
        keys = [r[1] for r in SAMPLE]
        values = [r[2] for r in SAMPLE]
        sections = [b"".join([varint(len(r[3]))] + [nullable(k.encode()) + nullable(v)
                                                    for k, v in r[3]]) for r in SAMPLE]
        batch = encode_batch_columnar(
            b"".join(v for v in values if v is not None),
            [-1 if v is None else len(v) for v in values],
            keys=b"".join(k for k in keys if k is not None),
            key_lengths=[-1 if k is None else len(k) for k in keys],
            timestamps=np.array([r[0] for r in SAMPLE], dtype=np.int64),
            headers=b"".join(sections), header_lengths=[len(s) for s in sections],
            transactional=True, **fields)  # type: ignore[arg-type]
    assert isinstance(batch, bytearray)
    assert bytes(batch) == expected

    # every field at its documented byte position
    def at(fmt: str, position: int) -> int:
        return struct.unpack_from(fmt, batch, position)[0]  # type: ignore[no-any-return]
    assert at(">q", 0) == 1234567890123
    assert at(">i", 8) == len(batch) - 12
    assert at(">i", 12) == 77
    assert at(">b", 16) == 2
    assert at(">I", 17) == crc32c(bytes(batch[21:]))
    assert at(">h", 21) == attributes
    assert at(">i", 23) == len(SAMPLE) - 1
    assert at(">q", 27) == SAMPLE[0][0]
    assert at(">q", 35) == max(r[0] for r in SAMPLE)
    assert at(">q", 43) == 987654321
    assert at(">h", 51) == 12
    assert at(">i", 53) == 4242
    assert at(">i", 57) == len(SAMPLE)

    header = read_header(batch)
    assert header == validate_batch(batch)
    assert header._asdict() == {
        "base_offset": 1234567890123, "batch_length": len(batch) - 12,
        "partition_leader_epoch": 77, "magic": 2, "crc": at(">I", 17), "attributes": attributes,
        "last_offset_delta": 3, "base_timestamp": SAMPLE[0][0],
        "max_timestamp": max(r[0] for r in SAMPLE), "producer_id": 987654321,
        "producer_epoch": 12, "base_sequence": 4242, "records_count": 4}
    assert header.size == len(batch)
    assert header.last_offset == 1234567890123 + 3
    assert header.next_offset == 1234567890123 + 4
    assert header.is_transactional and not header.is_control and not header.is_log_append_time


def test_decode_of_the_sample() -> None:
    batch = encode_sample(base_offset=100)
    expected = [Record(100 + i, ts, k, v, tuple(h)) for i, (ts, k, v, h) in enumerate(SAMPLE)]
    assert decode_batch(batch) == expected
    assert decode_batch(bytes(batch)) == expected
    assert decode_batch(memoryview(batch)) == expected
    columns = decode_columnar(batch)
    assert len(columns) == 4
    assert columns.offsets.tolist() == [100, 101, 102, 103]
    assert columns.timestamps.tolist() == [r[0] for r in SAMPLE]
    assert [columns.value(i) for i in range(4)] == [r[2] for r in SAMPLE]
    assert columns.key_lengths.tolist() == [5, -1, 0, 200]
    assert columns.value_lengths.tolist() == [7, 0, -1, 300]
    assert columns.header_counts.tolist() == [2, 0, 1, 0]
    assert columns.values_equal_size() is None


def test_decoded_records_are_a_sequence_made_as_it_is_read() -> None:
    batch = encode_sample(base_offset=100)
    expected = [Record(100 + i, ts, k, v, tuple(h)) for i, (ts, k, v, h) in enumerate(SAMPLE)]
    records = decode_batch(batch)
    assert isinstance(records, rb.RecordList) and len(records) == 4
    assert list(records) == expected and list(records) == expected  # iterates again
    assert records == tuple(expected) and expected == records and records == decode_batch(batch)
    assert records != expected[:3] and records != [*expected[:3], expected[0]]
    assert records != "not records" and records != set()
    assert [records[i] for i in (0, 3, -1, -4)] == [expected[i] for i in (0, 3, -1, -4)]
    assert records[1:3] == expected[1:3] and records[::-2] == expected[::-2]
    assert records[-1].value == SAMPLE[3][2] and type(records[0]) is Record
    for index in (4, -5):
        with pytest.raises(IndexError):
            records[index]
    with pytest.raises(TypeError):
        hash(records)
    assert repr(records) == f"RecordList({expected!r})"
    assert records + records == expected * 2 and expected[:1] + records == expected[:1] + expected
    assert records + (expected[0],) == [*expected, expected[0]]
    with pytest.raises(TypeError):
        records + 1  # type: ignore[operator]
    # rows below min_offset left out, wider rows with leading fields
    wide = decode_columnar(batch).record_list(tuple, ("t", 7), min_offset=102)
    assert len(wide) == 2 and list(wide) == [("t", 7, *r) for r in expected[2:]]
    assert wide[0] == ("t", 7, *expected[2]) and wide[-1] == ("t", 7, *expected[3])
    assert wide[1:] == [("t", 7, *expected[3])] and wide[-2:-1] == [("t", 7, *expected[2])]
    assert wide[5:9] == [] and wide[1:0] == [] and wide[:] == list(wide)


@pytest.mark.parametrize(("key", "value_size"), [
    (b"key", -1), (b"key", 0), (None, 5), (b"", 5), (b"key", 5)])
def test_records_of_one_shape_come_from_the_decoders_runs(key: bytes | None,
                                                           value_size: int) -> None:
    """The uniform decoder's runs give the same records as the general field search."""
    values = [None if value_size < 0 else bytes([i % 251]) * value_size for i in range(200)]
    batch = encode_batch(values, keys=[key] * 200, timestamps=[7] * 200)
    columns = decode_columnar(batch)
    assert columns.uniform is not None and len(columns.uniform.value_runs) == 2  # 1-, 2-byte deltas
    expected = [Record(i, 7, key, value) for i, value in enumerate(values)]
    assert columns.records() == expected
    assert dataclasses.replace(columns, uniform=None).records() == expected
    if value_size >= 0:
        blocks = columns.value_blocks()
        assert blocks is not None and [len(b) for b in blocks] == [64, 136]
        assert [bytes(row) for block in blocks for row in block] == values


def test_reading_decoded_records_one_at_a_time_sets_off_no_garbage_collection() -> None:
    """Records are tuple subclasses, which the collector tracks: a list of thousands sets off
    young collections (one per 700 allocations).  Made and dropped one at a time, they do not."""
    values = [bytes([i % 251]) * 100 for i in range(10_000)]
    batch = encode_batch(values, timestamps=list(range(10_000)))
    collections: list[int] = []

    def count(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            collections.append(info["generation"])

    def collections_during(action: Callable[[], object]) -> int:
        gc.collect()
        collections.clear()
        gc.callbacks.append(count)
        try:
            action()
        finally:
            gc.callbacks.remove(count)
        return len(collections)

    assert gc.isenabled()
    assert collections_during(lambda: deque(decode_batch(batch), 0)) <= 1
    assert collections_during(lambda: [r.value for r in decode_batch(batch)]) <= 1
    # the cost avoided: a young collection per threshold allocations (700 up to CPython 3.13)
    young_threshold = gc.get_threshold()[0]
    assert collections_during(lambda: list(decode_batch(batch))) >= 10_000 // young_threshold // 2


def test_defaults_and_timestamp_now() -> None:
    before = rb.time_ms()
    batch = encode_batch([b"a", b"b"])
    after = rb.time_ms()
    header = validate_batch(batch)
    assert before <= header.base_timestamp == header.max_timestamp <= after
    assert (header.producer_id, header.producer_epoch, header.base_sequence) == (-1, -1, -1)
    assert header.partition_leader_epoch == -1 and header.base_offset == 0
    assert header.attributes == 0
    assert [r.timestamp_ms for r in decode_batch(batch)] == [header.base_timestamp] * 2
    assert [r.key for r in decode_batch(batch)] == [None, None]


# ------------------------------------------------------------------------------------------------
# CRC coverage
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("codec", CODECS)
def test_crc_covers_attributes_to_the_end_and_nothing_before(codec: str) -> None:
    batch = encode_sample(codec=codec, base_offset=5, partition_leader_epoch=3)
    stored_crc = struct.unpack_from(">I", batch, 17)[0]
    # base_offset and partition_leader_epoch: outside the CRC, rewritten by brokers
    for position in list(range(0, 8)) + list(range(12, 16)):
        flipped = bytearray(batch)
        flipped[position] ^= 0xFF
        assert validate_batch(flipped).crc == stored_crc
        assert rb.compute_crc(flipped, 0, len(flipped)) == stored_crc
    # the CRC itself and every byte from the attributes on
    for position in range(17, len(batch)):
        flipped = bytearray(batch)
        flipped[position] ^= 0x01
        if position >= 21:
            assert rb.compute_crc(flipped, 0, len(flipped)) != stored_crc, position
        with pytest.raises(CorruptRecordError):
            validate_batch(flipped)
        with pytest.raises(CorruptRecordError):
            decode_columnar(flipped)


def test_crc_is_checked_by_default_and_can_be_skipped() -> None:
    batch = encode_batch([b"abc"] * 3, timestamps=0)
    batch[-2] ^= 0x20  # the last value byte (the last byte is its headers count)
    with pytest.raises(CorruptRecordError, match="CRC"):
        decode_batch(batch)
    with pytest.raises(CorruptRecordError, match="CRC"):
        decode_columnar(batch)
    assert decode_batch(batch, verify_crc=False)[-1].value == b"abC"


@pytest.mark.parametrize("view", [bytearray, memoryview])
def test_set_base_offset_keeps_the_crc_valid(view: type) -> None:
    first = encode_batch([b"x"] * 3, timestamps=1)
    second = encode_batch([b"y", b"zz"], timestamps=2, codec="gzip")
    buffer = bytearray(first + second)
    target = buffer if view is bytearray else memoryview(buffer)
    set_base_offset(target, 0, 1000)
    set_base_offset(target, len(first), 2**62)
    assert validate_batch(buffer).base_offset == 1000
    assert validate_batch(buffer, len(first)).base_offset == 2**62
    assert [r.offset for r in iter_records(buffer)] == [1000, 1001, 1002, 2**62, 2**62 + 1]
    assert struct.unpack_from(">I", buffer, 17) == struct.unpack_from(">I", first, 17)


# ------------------------------------------------------------------------------------------------
# attributes
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("codec", CODECS)
def test_codec_bits(codec: str) -> None:
    values = [b"compressible " * 20] * 10
    batch = encode_batch(values, timestamps=7, codec=codec)
    header = validate_batch(batch)
    assert header.codec == CODEC_NUMBERS[codec] == header.attributes & 0x07
    assert header.codec_name == codec
    assert [r.value for r in decode_batch(batch)] == values
    if codec != "none":
        assert len(batch) < sum(map(len, values))
    # the codec can also be given as its number
    assert encode_batch(values, timestamps=7, codec=CODEC_NUMBERS[codec]) == batch


@pytest.mark.parametrize("codec", CODECS)
def test_compressed_sections_are_standard_containers(codec: str) -> None:
    """gzip container, LZ4 frame, zstd frame: what Kafka's Java client reads."""
    plain = encode_sample()
    batch = encode_sample(codec=codec)
    section = bytes(batch[61:])
    inflate = {"none": lambda b: b, "gzip": lambda b: zlib.decompress(b, 31),
               "lz4": lz4.frame.decompress,
               "zstd": lambda b: zstandard.ZstdDecompressor().stream_reader(b).read()}[codec]
    assert inflate(section) == bytes(plain[61:])
    assert bytes(batch[21:23]) == struct.pack(">h", CODEC_NUMBERS[codec])


@pytest.mark.parametrize("codec", CODECS)
def test_log_append_time_gives_every_record_the_max_timestamp(codec: str) -> None:
    timestamps = [50, 10, 90, -5, 20]
    batch = encode_batch([b"v"] * 5, timestamps=timestamps, log_append_time=True, codec=codec)
    header = validate_batch(batch)
    assert header.is_log_append_time and header.attributes & 0x08
    assert header.max_timestamp == 90 and header.base_timestamp == 50
    assert [r.timestamp_ms for r in decode_batch(batch)] == [90] * 5
    assert decode_columnar(batch).timestamps.tolist() == [90] * 5
    create_time = encode_batch([b"v"] * 5, timestamps=timestamps, codec=codec)
    assert [r.timestamp_ms for r in decode_batch(create_time)] == timestamps


@pytest.mark.parametrize(("flags", "bits"), [
    ({}, 0), ({"transactional": True}, 0x10), ({"control": True}, 0x20),
    ({"log_append_time": True}, 0x08),
    ({"transactional": True, "control": True, "log_append_time": True}, 0x38)])
def test_flag_bits(flags: dict[str, bool], bits: int) -> None:
    batch = encode_batch([b"a"], timestamps=1, codec="lz4", **flags)  # type: ignore[arg-type]
    header = validate_batch(batch)
    assert header.attributes == bits | 3
    assert header.is_transactional == bool(bits & 0x10)
    assert header.is_control == bool(bits & 0x20)
    assert header.is_log_append_time == bool(bits & 0x08)


def test_unknown_codec_bits_are_corrupt() -> None:
    batch = encode_batch([b"a"], timestamps=1)
    for codec in (5, 6, 7):
        with pytest.raises(CorruptRecordError, match="codec"):
            read_header(with_codec_bits(batch, codec))
        with pytest.raises(CorruptRecordError):
            decode_batch(with_codec_bits(batch, codec))


def test_snappy_is_recognised_stored_and_not_decoded() -> None:
    snappy = with_codec_bits(encode_batch([b"a", b"b"], timestamps=1), 2)
    header = validate_batch(snappy)  # whole and intact: kept and served
    assert header.codec == 2 and header.codec_name == "snappy"
    assert list(iter_batch_positions(snappy)) == [(0, header)]
    for decode in (decode_batch, decode_columnar, lambda b: list(iter_records(b))):
        with pytest.raises(UnsupportedCodecError, match="snappy"):
            decode(snappy)
    assert issubclass(UnsupportedCodecError, CorruptRecordError)
    with pytest.raises(UnsupportedCodecError):
        encode_batch([b"a"], timestamps=1, codec="snappy")


# ------------------------------------------------------------------------------------------------
# record shapes
# ------------------------------------------------------------------------------------------------

def round_trip(values: list[bytes | None], keys: list[bytes | None] | None = None,
               headers: list[list[tuple[str, bytes | None]]] | None = None,
               timestamps: list[int] | None = None, codec: str = "none") -> bytearray:
    """Encode on both paths, check they agree byte for byte, decode both ways, compare."""
    count = len(values)
    timestamps = timestamps if timestamps is not None else [1000 + i for i in range(count)]
    batch = encode_batch(values, keys=keys, timestamps=timestamps, headers=headers, codec=codec,
                         base_offset=10)
    key_lengths = None if keys is None else [-1 if k is None else len(k) for k in keys]
    sections = None
    if headers is not None:
        sections = [columnar.encode_headers(h) for h in headers]
    columnar_batch = encode_batch_columnar(
        np.frombuffer(b"".join(v for v in values if v is not None), dtype=np.uint8),
        np.array([-1 if v is None else len(v) for v in values]),
        keys=None if keys is None else b"".join(k for k in keys if k is not None),
        key_lengths=key_lengths, timestamps=timestamps,
        headers=None if sections is None else b"".join(sections),
        header_lengths=None if sections is None else [len(s) for s in sections],
        codec=codec, base_offset=10)
    assert columnar_batch == batch
    expected = [Record(10 + i, timestamps[i], None if keys is None else keys[i], values[i],
                       tuple(headers[i]) if headers is not None else ())
                for i in range(count)]
    records = decode_batch(batch)
    assert records == expected
    columns = decode_columnar(batch)
    assert columns.offsets.tolist() == [r.offset for r in expected]
    assert columns.timestamps.tolist() == timestamps
    assert [columns.value(i) for i in range(count)] == values
    assert columns.value_lengths.tolist() == [-1 if v is None else len(v) for v in values]
    data = columns.data
    for i, record in enumerate(expected):
        length = int(columns.key_lengths[i])
        start = int(columns.key_positions[i])
        assert (None if length < 0 else data[start : start + length].tobytes()) == record.key
    assert columns.header_counts.tolist() == [len(r.headers) for r in expected]
    return batch


@pytest.mark.parametrize("codec", CODECS)
def test_null_keys_and_values_and_empty_values(codec: str) -> None:
    round_trip([None, b"", b"x", None, b""], keys=[b"", None, None, b"k", b""], codec=codec)
    round_trip([None] * 3, codec=codec)
    round_trip([b""] * 3, keys=[b""] * 3, codec=codec)
    round_trip([None] * 3, keys=[None] * 3, codec=codec)


@pytest.mark.parametrize("count", [2, 20, 100])
@pytest.mark.parametrize("codec", ["none", "zstd"])
def test_null_and_empty_mixed_among_equal_sizes(count: int, codec: str) -> None:
    """Null and empty payloads take the same bytes but different length varints."""
    for first, second in ((b"", None), (None, b"")):
        values = [first] * (count // 2) + [second] * (count - count // 2)
        round_trip(values, codec=codec)
        round_trip([b"v"] * count, keys=values, codec=codec)
        round_trip([first if i % 3 else second for i in range(count)], codec=codec)


@pytest.mark.parametrize("codec", CODECS)
def test_headers(codec: str) -> None:
    headers = [
        [("a", b"1"), ("b", None), ("", b""), ("\u65e5\u672c\u8a9e", b"\xff\x00"),
         ("emoji-\U0001f680", b"x" * 200)],
        [],
        [("only-null", None)],
        [("k" * 300, b"v")],
    ]
    round_trip([b"v0", b"v1", None, b""], keys=[None, b"k", b"", b"k3"], headers=headers,
               codec=codec)


def test_headers_on_some_records_of_equal_size() -> None:
    values = [b"0123456789"] * 40
    headers: list[list[tuple[str, bytes | None]]] = [[] for _ in values]
    headers[17] = [("trace", b"abc")]
    round_trip(values, headers=headers)
    headers = [[("h", bytes([i]))] for i in range(40)]  # equal header sizes everywhere
    round_trip(values, headers=headers)


@pytest.mark.parametrize("count", [63, 64, 65, 8191, 8192, 8193, 20000])
def test_offset_delta_varints_grow_with_the_record_count(count: int) -> None:
    values = [b"abcd"] * count
    batch = round_trip(values, timestamps=[5] * count)
    stride = np.diff(decode_columnar(batch).value_positions)
    # 7 one-byte fields + 4 value bytes; the offset delta takes 1, 2 then 3 bytes
    sizes = [11 if i < 64 else 12 if i < 8192 else 13 for i in range(count)]
    assert stride.tolist() == sizes[1:]
    assert len(batch) == 61 + sum(sizes)
    # the same counts through the general path (ragged sizes)
    ragged = [b"x" * (i % 3) for i in range(count)]
    batch = round_trip(ragged, timestamps=[5] * count)
    assert len(batch) == 61 + sum(7 + (i % 3) + (i >= 64) + (i >= 8192) for i in range(count))


def test_many_records_with_three_byte_offset_deltas_and_headers() -> None:
    count = 9000
    values = [b"%d" % i for i in range(count)]
    headers = [[("i", b"%d" % i)] if i % 1000 == 0 else [] for i in range(count)]
    records = decode_batch(round_trip(values, keys=values, headers=headers, codec="lz4"))
    assert records[8999] == Record(10 + 8999, 1000 + 8999, b"8999", b"8999", ())
    assert records[8000].headers == (("i", b"8000"),)


@pytest.mark.parametrize("codec", ["none", "gzip"])
def test_negative_and_large_timestamp_deltas(codec: str) -> None:
    round_trip([b"a"] * 5, timestamps=[0, -1, -(2**40), 2**40, 63], codec=codec)
    round_trip([b"a"] * 4, timestamps=[-(2**62), 2**62, 0, -1], codec=codec)
    round_trip([b"a"] * 3, timestamps=[-5, -6, -7], codec=codec)
    round_trip([b"a", b"bb"], timestamps=[2**63 - 1, 0], codec=codec)
    # equal-sized multi-byte deltas on every record
    round_trip([b"q"] * 30, timestamps=[10**6 + 1000 * i for i in range(30)], codec=codec)
    round_trip([b"q"] * 30, timestamps=[10**6 - 1000 * i for i in range(30)], codec=codec)
    # deltas whose sizes differ among otherwise equal records
    round_trip([b"q"] * 30, timestamps=[0] * 15 + [10**9] * 15, codec=codec)


@pytest.mark.parametrize("codec", CODECS)
def test_equal_ragged_and_mixed_sizes(codec: str) -> None:
    rng = np.random.default_rng(20240601)
    equal = [rng.bytes(16) for _ in range(100)]
    ragged = [rng.bytes(int(n)) for n in rng.integers(0, 300, 100)]
    round_trip(equal, codec=codec)
    round_trip(equal, keys=[rng.bytes(8) for _ in range(100)], codec=codec)
    round_trip(ragged, keys=[rng.bytes(int(n)) for n in rng.integers(0, 9, 100)], codec=codec)
    round_trip(equal[:50] + ragged[:50], codec=codec)  # a run, then ragged
    round_trip(ragged[:30] + equal + ragged[30:40], codec=codec)  # a run in the middle
    round_trip(equal[:1] + [b"x" * 200] + equal[:98], codec=codec)  # one odd record
    round_trip(equal[:60] + [e + b"!" for e in equal[:60]], codec=codec)  # two runs
    round_trip(equal, keys=[b"k"] * 99 + [b"kk"], codec=codec)
    round_trip([b"x" * 64] * 3 + [b"x" * 8192] * 3 + [b"y" * 70000], codec=codec)


@pytest.mark.parametrize("codec", CODECS)
def test_values_equal_size_view(codec: str) -> None:
    # 64 records: offset deltas 0..63 all take one byte, so the records share one stride
    values = [bytes([i]) * 12 for i in range(64)]
    batch = encode_batch(values, timestamps=1, codec=codec)
    columns = decode_columnar(batch)
    view = columns.values_equal_size()
    assert view is not None and view.shape == (64, 12) and view.dtype == np.uint8
    assert view.tolist() == [list(v) for v in values]
    assert not view.flags.writeable
    if codec == "none":  # zero copy: the view looks into the caller's buffer
        assert np.shares_memory(view, np.frombuffer(batch, dtype=np.uint8))
    # past 64 records the offset-delta varint grows by a byte: no single stride any more, so
    # the view may be refused -- but if it is given it must be right
    values = [bytes([i]) * 12 for i in range(100)]
    view = decode_columnar(encode_batch(values, timestamps=1, codec=codec)).values_equal_size()
    assert view is None or view.tolist() == [list(v) for v in values]
    single = decode_columnar(encode_batch([b"abc"], timestamps=1, codec=codec))
    one = single.values_equal_size()
    assert one is not None and one.tolist() == [list(b"abc")]
    empty = decode_columnar(encode_batch([b""] * 3, timestamps=1, codec=codec))
    zero = empty.values_equal_size()
    assert zero is not None and zero.shape == (3, 0)
    # keys of different sizes: equal values, unequal strides
    keyed = decode_columnar(encode_batch([b"v" * 4] * 3, keys=[b"a", b"bb", b"c"],
                                         timestamps=1, codec=codec))
    assert keyed.values_equal_size() is None
    for others in ([b"v" * 12] * 5 + [b"v" * 11], [b"v"] * 5 + [None], [None] * 3):
        mixed = decode_columnar(encode_batch(others, timestamps=1, codec=codec))
        assert mixed.values_equal_size() is None


# ------------------------------------------------------------------------------------------------
# several batches
# ------------------------------------------------------------------------------------------------

def several_batches() -> tuple[bytearray, list[int], list[Record]]:
    batches = [
        encode_batch([b"a", b"b", b"c"], timestamps=1, base_offset=0),
        encode_batch([b"d" * 100] * 20, timestamps=2, base_offset=3, codec="gzip"),
        encode_batch([None, b"e"], keys=[b"k", None], timestamps=3, base_offset=23, codec="lz4"),
        encode_batch([b"f"], timestamps=4, base_offset=25, codec="zstd",
                     headers=[[("h", None)]]),
    ]
    positions = list(np.cumsum([0] + [len(b) for b in batches[:-1]]))
    records = [r for b in batches for r in decode_batch(b)]
    return bytearray(b"".join(batches)), [int(p) for p in positions], records


def test_iter_batch_positions_over_concatenated_batches() -> None:
    buffer, positions, _ = several_batches()
    walked = list(iter_batch_positions(buffer))
    assert [position for position, _ in walked] == positions
    assert [header.base_offset for _, header in walked] == [0, 3, 23, 25]
    assert [header.codec_name for _, header in walked] == ["none", "gzip", "lz4", "zstd"]
    assert all(header == validate_batch(buffer, p) for p, header in walked)
    # from a later position and up to an ``end``
    assert [p for p, _ in iter_batch_positions(buffer, positions[1])] == positions[1:]
    assert [p for p, _ in iter_batch_positions(buffer, 0, positions[2])] == positions[:2]


@pytest.mark.parametrize("tail", [1, 11, 12, 13, 60, 61, 62, -1])
def test_iter_batch_positions_stops_before_a_partial_tail(tail: int) -> None:
    buffer, positions, records = several_batches()
    extra = encode_batch([b"tail" * 10], timestamps=9, base_offset=26)
    partial = buffer + extra[:tail]
    assert [p for p, _ in iter_batch_positions(partial)] == positions
    assert list(iter_records(partial)) == records
    assert list(iter_batch_positions(bytes(extra[:tail]))) == []


def test_iter_batch_positions_reports_a_corrupt_batch_with_its_position() -> None:
    buffer, positions, _ = several_batches()
    buffer[positions[2] + 40] ^= 0x01
    walk = iter_batch_positions(buffer)
    assert [next(walk)[0], next(walk)[0]] == positions[:2]
    with pytest.raises(CorruptRecordError) as caught:
        next(walk)
    assert caught.value.position == positions[2]
    # a batch_length too small to hold a header is not a "partial tail"
    buffer, positions, _ = several_batches()
    struct.pack_into(">i", buffer, positions[1] + 8, 10)
    with pytest.raises(CorruptRecordError):
        list(iter_batch_positions(buffer))


def test_iter_records_with_min_offset() -> None:
    buffer, _, records = several_batches()
    assert list(iter_records(buffer)) == records
    assert [r.offset for r in records] == list(range(26))
    for min_offset in (0, 1, 3, 4, 22, 23, 24, 25, 26, 1000):
        assert list(iter_records(buffer, min_offset=min_offset)) == records[min_offset:]
    assert list(iter_records(b"")) == []


def test_decode_at_a_position_inside_a_larger_buffer() -> None:
    buffer, positions, records = several_batches()
    for memory in (buffer, bytes(buffer), memoryview(buffer), np.frombuffer(buffer, np.uint8)):
        assert decode_batch(memory, positions[2]) == records[23:25]  # type: ignore[arg-type]
        columns = decode_columnar(memory, positions[1])  # type: ignore[arg-type]
        assert columns.position == positions[1]
        assert columns.offsets.tolist() == list(range(3, 23))


# ------------------------------------------------------------------------------------------------
# columnar inputs and bad arguments
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sizes", [[5] * 20, [1, 0, 7, 3, 0, 9] * 3])
def test_columnar_input_types_all_encode_the_same(sizes: list[int]) -> None:
    raw = bytes(range(256))[: sum(sizes)] + b"extra bytes past the last value are ignored"
    key_raw = b"K" * len(sizes)
    expected = encode_batch_columnar(raw, sizes, keys=key_raw, key_lengths=[1] * len(sizes),
                                     timestamps=42, codec="gzip")
    for buffer in (raw, bytearray(raw), memoryview(raw), np.frombuffer(raw, dtype=np.uint8)):
        for lengths in (sizes, np.array(sizes), np.array(sizes, dtype=np.int32), tuple(sizes)):
            batch = encode_batch_columnar(buffer, lengths, keys=memoryview(key_raw),
                                          key_lengths=np.ones(len(sizes), dtype=np.int64),
                                          timestamps=np.int64(42), codec="gzip")
            assert batch == expected
    values = [raw[s - n : s] for s, n in zip(np.cumsum(sizes).tolist(), sizes, strict=True)]
    assert [r.value for r in decode_batch(expected)] == values
    assert expected == encode_batch(values, keys=[b"K"] * len(sizes), timestamps=42,
                                    codec="gzip")


def test_columnar_buffer_is_not_modified() -> None:
    raw = bytearray(b"0123456789" * 10)
    copy = bytes(raw)
    batch = encode_batch_columnar(raw, [10] * 10, timestamps=1)
    raw[0:5] = b"XXXXX"
    assert bytes(raw[5:]) == copy[5:]
    assert decode_batch(batch)[0].value == b"0123456789"


@pytest.mark.parametrize(("call", "error", "match"), [
    (lambda: encode_batch_columnar(b"abc", [2, 2], timestamps=1), ValueError, "buffer holds"),
    (lambda: encode_batch_columnar(b"abcd", [2, 2, 2], timestamps=1), ValueError,
     "buffer holds"),
    (lambda: encode_batch_columnar(b"abc", [-2], timestamps=1), ValueError, ">= -1"),
    (lambda: encode_batch_columnar(b"abc", [1, 2, -2], timestamps=1), ValueError, ">= -1"),
    (lambda: encode_batch_columnar(b"", [], timestamps=1), ValueError, "at least one"),
    (lambda: encode_batch_columnar(b"ab", [1, 1], timestamps=[1]), ValueError, "timestamps"),
    (lambda: encode_batch_columnar(b"ab", [1, 1], timestamps=[1, 2, 3]), ValueError,
     "timestamps"),
    (lambda: encode_batch_columnar(b"ab", [1, 1], keys=b"k", key_lengths=[1]), ValueError,
     "keys"),
    (lambda: encode_batch_columnar(b"ab", [1, 1], keys=b"k", key_lengths=[1, 1]), ValueError,
     "keys"),
    (lambda: encode_batch_columnar(b"ab", [1, 1], keys=b"kk", key_lengths=[1, -3]), ValueError,
     "keys"),
    (lambda: encode_batch_columnar(b"ab", [1, 1], headers=b"\x00", header_lengths=[1]),
     ValueError, "headers"),
    (lambda: encode_batch_columnar(b"ab", [1, 1], headers=b"\x00", header_lengths=[1, 1]),
     ValueError, "headers"),
    (lambda: encode_batch_columnar(b"ab", [1, 1], headers=b"\x00\x00", header_lengths=[1, 0]),
     ValueError, "headers"),
    (lambda: encode_batch_columnar(b"ab", [1, 1], codec="brotli"), ValueError, "compression"),
    (lambda: encode_batch_columnar(b"ab", [1, 1], codec=7), ValueError, "codec"),
    (lambda: encode_batch_columnar("text", [4], timestamps=1), TypeError, None),
    (lambda: encode_batch([b"a", "b"], timestamps=1), TypeError, "values must be bytes"),
    (lambda: encode_batch([b"a", 5], timestamps=1), TypeError, "values must be bytes"),
    (lambda: encode_batch([b"a", None, "c"], timestamps=1), TypeError, "values must be bytes"),
    # past the scalar path's few records: the joined values, then the search for the bad one
    (lambda: encode_batch([b"a"] * 40 + [None, "c"], timestamps=1), TypeError,
     r"values must be bytes \(or None\), not str"),
    (lambda: encode_batch([b"a"] * 40 + [5], timestamps=1), TypeError,
     r"values must be bytes \(or None\), not int"),
    (lambda: encode_batch([b"a"] * 40, keys=[b"k"] * 39 + [3.5], timestamps=1), TypeError,
     r"keys must be bytes \(or None\), not float"),
    (lambda: encode_batch([b"a"], keys=["k"], timestamps=1), TypeError, "keys must be bytes"),
    (lambda: encode_batch([b"a"], keys=[b"k", b"l"], timestamps=1), ValueError, "keys"),
    (lambda: encode_batch([b"a", b"b"], timestamps=[1]), ValueError, None),
    (lambda: encode_batch([b"a", b"b"], timestamps=[1, 2, 3]), ValueError, "timestamps"),
    (lambda: encode_batch([b"a", b"b"], headers=[[("k", b"v")]], timestamps=1), ValueError,
     "header"),
    (lambda: encode_batch([b"a"], headers=[[(b"k", b"v")]], timestamps=1), TypeError, None),
    (lambda: encode_batch([b"a"], headers=[[("k", "v")]], timestamps=1), TypeError, None),
    (lambda: encode_batch([], timestamps=1), ValueError, "at least one"),
    (lambda: encode_batch([b"a"], timestamps=1, producer_epoch=2**15), ValueError, None),
    (lambda: encode_batch([b"a"], timestamps=1, base_offset=2**63), ValueError, None),
])
def test_bad_arguments_raise_clear_errors(call, error, match) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(error, match=match):
        call()


def test_too_many_records(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(limits, "batch_records_max", 10)
    encode_batch([b"a"] * 10, timestamps=1)
    with pytest.raises(ValueError, match="batch_records_max"):
        encode_batch([b"a"] * 11, timestamps=1)


# ------------------------------------------------------------------------------------------------
# hostile batches
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("codec", ["gzip", "lz4", "zstd"])
def test_decompression_bomb_is_corrupt(codec: str, monkeypatch: pytest.MonkeyPatch) -> None:
    batch = encode_batch([bytes(10_000)] * 10, timestamps=1, codec=codec)
    inflated = len(encode_batch([bytes(10_000)] * 10, timestamps=1)) - 61
    monkeypatch.setattr(limits, "decompressed_batch_bytes_max", inflated)
    assert len(decode_batch(batch)) == 10  # exactly at the limit: fine
    monkeypatch.setattr(limits, "decompressed_batch_bytes_max", inflated - 1)
    with pytest.raises(CorruptRecordError, match="inflate"):
        decode_batch(batch)
    monkeypatch.setattr(limits, "decompressed_batch_bytes_max", 1000)
    for decode in (decode_batch, decode_columnar, lambda b: list(iter_records(b))):
        with pytest.raises(CorruptRecordError, match="inflate"):
            decode(batch)
    validate_batch(batch)  # the batch itself is intact


@pytest.mark.parametrize("codec", ["gzip", "lz4", "zstd"])
def test_a_huge_records_count_costs_no_memory(codec: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A small compressed batch claiming 2**31 - 1 records must be rejected before anything is
    sized by the claimed count (only the compressed codecs: for codec none the header check
    already bounds the count by the batch length)."""
    monkeypatch.setattr(limits, "decompressed_batch_bytes_max", 2**20)
    batch = encode_batch([b"x"] * 3, timestamps=1, codec=codec)
    struct.pack_into(">i", batch, 23, 2**31 - 1)  # last_offset_delta
    struct.pack_into(">i", batch, 57, 2**31 - 1)  # records_count
    recompute_crc(batch)
    tracemalloc.start()
    try:
        with pytest.raises(CorruptRecordError):
            decode_columnar(batch)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20


@pytest.mark.parametrize("codec", ["gzip", "lz4", "zstd"])
def test_garbage_compressed_section_is_corrupt(codec: str) -> None:
    batch = encode_batch([b"y" * 50] * 5, timestamps=1, codec=codec)
    truncated = bytearray(batch[:-5])
    struct.pack_into(">i", truncated, 8, len(truncated) - 12)
    recompute_crc(truncated)
    garbage = bytearray(batch[:61]) + b"\x13" * 40
    struct.pack_into(">i", garbage, 8, len(garbage) - 12)
    recompute_crc(garbage)
    for broken in (truncated, garbage):
        validate_batch(broken)
        with pytest.raises(CorruptRecordError):
            decode_batch(broken)


def test_records_count_disagreeing_with_the_records_is_corrupt() -> None:
    for codec in CODECS:
        batch = encode_batch([b"a", b"bb", b"ccc"], timestamps=1, codec=codec)
        for count in (0, 2, 4):
            broken = bytearray(batch)
            struct.pack_into(">i", broken, 57, count)
            struct.pack_into(">i", broken, 23, max(count - 1, 0))
            recompute_crc(broken)
            with pytest.raises(CorruptRecordError):
                decode_batch(broken)


def test_header_sanity_checks() -> None:
    batch = encode_batch([b"a", b"b"], timestamps=1)
    with pytest.raises(CorruptRecordError, match="truncated"):
        read_header(batch[:60])
    with pytest.raises(CorruptRecordError, match="truncated"):
        validate_batch(batch[:-1])
    with pytest.raises(CorruptRecordError, match="truncated"):
        read_header(batch, len(batch) - 10)
    for _field, position, fmt, value, match in [
        ("magic", 16, ">b", 1, "magic"), ("magic", 16, ">b", 3, "magic"),
        ("batch_length", 8, ">i", 48, "batch_length"),
        ("records_count", 57, ">i", -1, "records count"),
        ("last_offset_delta", 23, ">i", 0, "last_offset_delta"),
        ("last_offset_delta", 23, ">i", -1, "last_offset_delta"),
    ]:
        broken = bytearray(batch)
        struct.pack_into(fmt, broken, position, value)
        recompute_crc(broken)
        with pytest.raises(CorruptRecordError, match=match):
            read_header(broken)
    with pytest.raises(CorruptRecordError, match="max_batch_bytes"):
        validate_batch(batch, max_batch_bytes=len(batch) - 1)
    assert validate_batch(batch, max_batch_bytes=len(batch)).size == len(batch)


def test_offset_gaps_are_allowed_but_offsets_must_grow() -> None:
    """Compaction leaves gaps: last_offset_delta may exceed records_count - 1."""
    batch = encode_batch([b"a", b"b"], timestamps=1, base_offset=50)
    gapped = bytearray(batch)
    struct.pack_into(">i", gapped, 23, 9)
    recompute_crc(gapped)
    assert read_header(gapped).next_offset == 60
    assert [r.offset for r in decode_batch(gapped)] == [50, 51]
    # second record's offset delta rewritten from 1 to 0: offsets no longer grow
    records = bytearray(batch[61:])
    second = (records[0] >> 1) + 1  # first record: one length byte + its body
    assert records[second + 3] == 0x02  # length, attributes, timestamp delta, offset delta
    records[second + 3] = 0x00
    broken = bytearray(batch[:61]) + records
    recompute_crc(broken)
    with pytest.raises(CorruptRecordError, match="offset"):
        decode_batch(broken)


def test_decode_time_is_linear_in_the_record_count() -> None:
    """Short runs of equal-sized records between odd ones (runs of 6, then one record a byte
    longer) once cost O(runs * count): each speculative run check looked at every remaining
    record.  Such a batch must decode about as fast as a fully ragged one."""
    count = 100_000
    runs = encode_batch([b"x" * (8 if i % 7 else 9) for i in range(count)], timestamps=0)
    ragged = encode_batch([b"x" * (i % 5) for i in range(count)], timestamps=0)

    def best_of_three(batch: bytearray) -> float:
        times = []
        for _ in range(3):
            started = time.perf_counter()
            assert len(decode_columnar(batch)) == count
            times.append(time.perf_counter() - started)
        return min(times)

    ragged_s, runs_s = best_of_three(ragged), best_of_three(runs)
    assert runs_s < 10 * ragged_s + 0.05, (runs_s, ragged_s)


def test_last_offset_past_int64_is_rejected() -> None:
    """A batch whose last offset does not fit in int64 is corrupt (it would wrap around)."""
    batch = encode_batch([b"a", b"b"], timestamps=0)
    set_base_offset(batch, 0, 2**63 - 1)
    with pytest.raises(CorruptRecordError):
        decode_batch(batch)


@pytest.mark.parametrize("count", [1, 2, 63, 64, 65, 700, 8193, 10_000])
@pytest.mark.parametrize("stamps", ["one", "slow", "fast"])
def test_value_blocks_are_zero_copy_views_of_every_value(count: int, stamps: str) -> None:
    values = np.random.default_rng(count).integers(0, 256, count * 100, dtype=np.uint8)
    timestamps = {"one": 5, "slow": 1000 + np.arange(count) // 3,
                  "fast": 1000 + np.arange(count) * 100}[stamps]
    batch = encode_batch_columnar(values, np.full(count, 100), timestamps=timestamps)
    columns = decode_columnar(batch)
    blocks = columns.value_blocks()
    assert blocks is not None and len(blocks) <= 8
    assert np.array_equal(np.concatenate(blocks), values.reshape(count, 100))
    for block in blocks:
        assert np.shares_memory(block, columns.data)  # views into the batch, not copies
    single = columns.values_equal_size()
    assert (single is not None) == (len(blocks) == 1)


def test_value_blocks_none_for_mixed_sizes() -> None:
    batch = encode_batch([b"a", b"bb", b"c"], timestamps=1)
    assert decode_columnar(batch).value_blocks() is None
    assert decode_columnar(encode_batch([b"a", None], timestamps=1)).value_blocks() is None


def test_a_value_length_that_lies_costs_no_memory_to_reject() -> None:
    """A CRC-valid batch (anyone can compute the CRC) whose record says its value has 2**26
    bytes but holds 5, with a record length that matches what is there (so the record chain
    checked at append holds).  Decoding refuses it at once: the one-shape decoder once built
    a row layout as big as the claimed value (a fuzzed length of 2**31 took a test process's
    24 GB)."""
    value = b"small"
    body = (b"\x00" + varint(0) + varint(0) + varint(-1) + varint(1 << 26) + value
            + varint(0))
    records = varint(len(body)) + body
    batch = rb.finish_batch(bytearray(rb.HEADER_SIZE) + records, 1, attributes=0,
                            base_offset=0, base_timestamp=1, max_timestamp=1)
    columnar.check_record_chain(batch, rb.HEADER_SIZE, len(batch), 1)  # stored at append
    raw = memoryview(batch)
    assert uniform_records._parse_first(raw, rb.HEADER_SIZE, len(batch), 0) is None
    tracemalloc.start()
    try:
        for decode in (rb.decode_columnar, rb.decode_batch):
            with pytest.raises(CorruptRecordError):
                decode(batch)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, peak
