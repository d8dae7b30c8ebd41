"""Record sizes, payload buffers and the 24-byte benchmark header.

The header reference below packs with ``struct`` from the documented layout, independently of
the numpy code under test.  Hypothesis prints failing examples; the seeded test prints its seed
(``SHMB_PAYLOADS_SEED=<n>`` replays one).
"""

from __future__ import annotations

import json
import os
import random
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shmbroker.perf.payloads import (
    HEADER_BYTES,
    RECORD_BYTES_MAX,
    TELEMETRY_TEMPLATES,
    SizeSpec,
    decode_headers,
    encode_headers,
    make_payloads,
    parse_size_spec,
    sizes,
)

SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
REFERENCE_HEADER = struct.Struct("<qiiq")  # intended_ns, producer_id, reserved, seq


def seed_for(test: str) -> int:
    seed = int(os.environ.get("SHMB_PAYLOADS_SEED", random.randrange(1 << 32)))
    print(f"{test}: seed {seed} (replay with SHMB_PAYLOADS_SEED={seed})")
    return seed


def starts_of(lengths: np.ndarray) -> np.ndarray:
    lengths = np.asarray(lengths, dtype=np.int64)
    return np.cumsum(lengths) - lengths


# -- size specs ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "expected"), [
    ("100", SizeSpec(100, 100)),
    (" 64-1024 ", SizeSpec(64, 1024)),
    ("64 - 1024", SizeSpec(64, 1024)),
    ("1KiB", SizeSpec(1024, 1024)),
    ("512B-2KiB", SizeSpec(512, 2048)),
    ("16MiB", SizeSpec(RECORD_BYTES_MAX, RECORD_BYTES_MAX)),
    (100, SizeSpec(100, 100)),
])
def test_parse_size_spec(text: str | int, expected: SizeSpec) -> None:
    assert parse_size_spec(text) == expected


@pytest.mark.parametrize(("text", "message"), [
    ("0", "record size '0' must be at least 1 byte"),
    ("0-100", "must be at least 1 byte"),
    ("-5", "record size '-5' is negative"),
    ("10-5", "range '10-5' is reversed: its minimum 10 is above its maximum 5"),
    ("abc", "record size 'abc' is not a byte count: write N or MIN-MAX"),
    ("10-", "not a byte count"),
    ("1.5", "not a byte count"),
    ("16777217", "16777217 bytes is above the limit of 16777216 bytes"),
    ("100-17MiB", "above the limit"),
    (None, "must be a string"),
])
def test_parse_size_spec_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_size_spec(text)


def test_size_spec_str_round_trips() -> None:
    for text in ("100", "64-1024"):
        assert str(parse_size_spec(text)) == text


def test_sizes_refuse_records_without_room_for_the_header() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="record size must be >= 24 bytes: each record carries "
                                         "its send time and sequence"):
        sizes(parse_size_spec("10-100"), 5, rng)
    assert sizes(parse_size_spec("24"), 3, rng).tolist() == [24, 24, 24]


def test_sizes_fixed_and_uniform() -> None:
    seed = seed_for("test_sizes_fixed_and_uniform")
    rng = np.random.default_rng(seed)
    fixed = sizes(parse_size_spec("100"), 1000, rng)
    assert fixed.dtype == np.int64 and (fixed == 100).all() and len(fixed) == 1000
    ranged = sizes(parse_size_spec("64-70"), 20_000, rng)
    assert ranged.min() == 64 and ranged.max() == 70  # both ends reached: inclusive
    assert set(np.unique(ranged).tolist()) == set(range(64, 71))
    assert len(sizes(parse_size_spec("64-70"), 0, rng)) == 0


# -- payloads ------------------------------------------------------------------------------------

lengths_lists = st.lists(st.integers(HEADER_BYTES, 600), max_size=60)


@SETTINGS
@given(lengths=lengths_lists, kind=st.sampled_from(["random", "telemetry"]),
       seed=st.integers(0, 2**32 - 1))
def test_payload_sizes_are_exact(lengths: list[int], kind: str, seed: int) -> None:
    buffer, out_lengths = make_payloads(kind, np.array(lengths, dtype=np.int64),
                                        np.random.default_rng(seed))
    assert isinstance(buffer, bytearray)
    assert len(buffer) == sum(lengths)
    assert out_lengths.dtype == np.int64 and out_lengths.tolist() == lengths
    for start in starts_of(out_lengths).tolist():
        assert buffer[start:start + HEADER_BYTES] == bytes(HEADER_BYTES)  # room for the header


@SETTINGS
@given(lengths=lengths_lists, seed=st.integers(0, 2**32 - 1))
def test_telemetry_bodies_are_ascii_json_when_long_enough(lengths: list[int], seed: int) -> None:
    buffer, out_lengths = make_payloads("telemetry", lengths, np.random.default_rng(seed))
    for start, length in zip(starts_of(out_lengths).tolist(), lengths):
        body = bytes(buffer[start + HEADER_BYTES:start + length])
        assert len(body) == length - HEADER_BYTES
        text = body.decode("ascii")  # UnicodeDecodeError fails the test
        if len(body) >= 100:  # every reading is shorter than 100 bytes
            reading = json.loads(text)
            assert set(reading) <= {"sensor", "ts", "temp_c", "hum", "site", "pad"}
            assert reading["sensor"].startswith("s-") and isinstance(reading["ts"], int)
        elif body:
            assert text.startswith('{"sensor":"s-'[:len(body)])


def test_telemetry_fits_each_length_the_documented_way() -> None:
    rng = np.random.default_rng(7)
    body_lengths = np.arange(0, 130)
    buffer, lengths = make_payloads("telemetry", body_lengths, rng, reserved_bytes=0)
    bodies = [bytes(buffer[s:s + n]) for s, n in zip(starts_of(lengths), lengths)]
    reading_lengths = {len(b) for b in bodies if b.endswith(b'"}')}  # exact-length readings
    full = [b for b in bodies if len(b) >= 100]
    assert all(json.loads(b) for b in full)
    assert any(b'"pad":"' in b for b in full) and all(b.rstrip().endswith(b"}") for b in full)
    short = [b for b in bodies if b and len(b) < min(reading_lengths)]
    assert short and all(not b.endswith(b"}") for b in short)  # truncated, no closing brace


def test_telemetry_reuses_templates_cyclically() -> None:
    lengths = np.full(TELEMETRY_TEMPLATES + 2, 120, dtype=np.int64)
    buffer, _ = make_payloads("telemetry", lengths, np.random.default_rng(3))
    body = np.frombuffer(buffer, dtype=np.uint8).reshape(-1, 120)[:, HEADER_BYTES:]
    assert (body[0] == body[TELEMETRY_TEMPLATES]).all()
    assert (body[1] == body[TELEMETRY_TEMPLATES + 1]).all()
    assert not (body[0] == body[1]).all()


def test_random_payloads_are_replayable_and_not_constant() -> None:
    first, _ = make_payloads("random", [1000, 1000], np.random.default_rng(11))
    again, _ = make_payloads("random", [1000, 1000], np.random.default_rng(11))
    other, _ = make_payloads("random", [1000, 1000], np.random.default_rng(12))
    assert first == again != other
    assert len(set(first[HEADER_BYTES:1000])) > 200  # random bytes, not a fill pattern


@pytest.mark.parametrize(("kind", "lengths", "message"), [
    ("zeros", [100], "payload must be one of random, telemetry; got 'zeros'"),
    ("random", [10], r"value lengths must be in \[24, 16777216\]"),
    ("random", [RECORD_BYTES_MAX + 1], "value lengths must be in"),
])
def test_make_payloads_errors(kind: str, lengths: list[int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_payloads(kind, lengths, np.random.default_rng(0))


# -- headers -------------------------------------------------------------------------------------

int64s = st.integers(-(2**63), 2**63 - 1)


@SETTINGS
@given(records=st.lists(st.tuples(st.integers(HEADER_BYTES, 80), int64s, int64s), max_size=40),
       producer_id=st.integers(-(2**31), 2**31 - 1),
       sizes=st.sampled_from(["equal", "runs", "ragged"]))
def test_header_round_trip(records: list[tuple[int, int, int]], producer_id: int,
                           sizes: str) -> None:
    """Equal sizes (one strided view), a few runs of one size each (a view per run, as batches
    whose offset-delta varint grows), ragged sizes (a gather)."""
    if sizes == "equal":
        lengths = np.full(len(records), HEADER_BYTES + 8, dtype=np.int64)
    elif sizes == "runs":  # runs of 7 records, the run's size drawn from its first record
        lengths = np.array([records[i - i % 7][0] for i in range(len(records))],
                           dtype=np.int64)
    else:
        lengths = np.array([r[0] for r in records], dtype=np.int64)
    intended = np.array([r[1] for r in records], dtype=np.int64)
    seqs = np.array([r[2] for r in records], dtype=np.int64)
    buffer, _ = make_payloads("random", lengths, np.random.default_rng(0))
    before = bytes(buffer)
    offsets = starts_of(lengths)
    encode_headers(buffer, offsets, intended, producer_id, seqs)
    for i, (start, length) in enumerate(zip(offsets.tolist(), lengths.tolist())):
        assert buffer[start:start + HEADER_BYTES] == REFERENCE_HEADER.pack(
            int(intended[i]), producer_id, 0, int(seqs[i]))
        assert buffer[start + HEADER_BYTES:start + length] == before[start + HEADER_BYTES:
                                                                     start + length]
    for data in (bytes(buffer), np.frombuffer(buffer, dtype=np.uint8)):
        got_intended, got_producers, got_seqs = decode_headers(data, offsets, lengths)
        assert got_intended.dtype == np.int64 and got_seqs.dtype == np.int64
        assert got_producers.dtype == np.int32
        assert got_intended.tolist() == intended.tolist() and got_seqs.tolist() == seqs.tolist()
        assert got_producers.tolist() == [producer_id] * len(records)


def test_headers_at_unordered_offsets_in_a_memoryview() -> None:
    buffer = bytearray(200)
    offsets = np.array([100, 0, 40])
    encode_headers(memoryview(buffer), offsets, [1, 2, 3], 9, [10, 20, 30])
    intended, producers, seqs = decode_headers(buffer, offsets)
    assert intended.tolist() == [1, 2, 3] and seqs.tolist() == [10, 20, 30]
    assert REFERENCE_HEADER.unpack_from(buffer, 40) == (3, 9, 0, 30)
    assert buffer[24:40] == bytes(16) and buffer[64:100] == bytes(36)  # nothing else written


@pytest.mark.parametrize(("call", "error", "message"), [
    (lambda: encode_headers(bytes(100), [0], [1], 1, [1]), TypeError, "not bytes"),
    (lambda: encode_headers(bytearray(100), [80], [1], 1, [1]), ValueError,
     r"offsets must lie in \[0, 76\]"),
    (lambda: encode_headers(bytearray(100), [0, 10], [1, 2], 1, [1, 2]), ValueError,
     "headers at offsets 0 and 10 would overlap"),
    (lambda: encode_headers(bytearray(100), [0, 30], [1], 1, [1, 2]), ValueError,
     "2 offsets, 1 intended_ns and 2 seqs"),
    (lambda: encode_headers(bytearray(100), [0], [1], 2**31, [1]), ValueError,
     "producer_id must fit in an int32"),
    (lambda: decode_headers(bytes(100), [-1]), ValueError, "value positions must lie in"),
    (lambda: decode_headers(bytes(100), [0, 30], [30, -1]), ValueError,
     "value 1 has -1 bytes, fewer than the 24-byte benchmark header"),
])
def test_header_errors(call, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        call()


def test_value_headers_of_per_record_values() -> None:
    """What a per-record consumer reads: each value's header, and the values' bytes; a value
    too short for a header (two 12-byte ones would make 24 bytes) is refused, not misread."""
    from shmbroker.perf.payloads import value_headers

    values = [REFERENCE_HEADER.pack(100 + i, 7, 0, i) + bytes(i * 3) for i in range(5)]
    intended, producers, seqs, value_bytes = value_headers(values)
    assert intended.tolist() == [100, 101, 102, 103, 104] and seqs.tolist() == [0, 1, 2, 3, 4]
    assert producers.tolist() == [7] * 5 and value_bytes == sum(map(len, values))
    with pytest.raises(ValueError, match="value 1 has 12 bytes, fewer than the 24-byte"):
        value_headers([values[0], bytes(12), bytes(12)])
    assert [len(column) for column in value_headers([])[:3]] == [0, 0, 0]


def test_empty_header_arrays() -> None:
    encode_headers(bytearray(10), [], [], 1, [])
    intended, producers, seqs = decode_headers(b"", [])
    assert len(intended) == len(producers) == len(seqs) == 0


# -- headers of the consumer's columnar batches ---------------------------------------------------

@SETTINGS
@given(sizes=st.lists(st.sampled_from(["equal", "ragged"]), min_size=1, max_size=3),
       counts=st.lists(st.integers(1, 200), min_size=3, max_size=3),
       skip_fraction=st.floats(0, 1.2), codec=st.sampled_from(["none", "lz4"]),
       producer_id=st.integers(-(2**31), 2**31 - 1), data=st.data())
def test_batch_headers_of_columnar_batches(sizes: list[str], counts: list[int],
                                           skip_fraction: float, codec: str, producer_id: int,
                                           data: st.DataObject) -> None:
    """Batches of one shape (views, one per stride run: counts past 64 change the stride) and
    ragged ones (a gather), some compressed (their values in a decompressed copy), with the
    first records skipped: the headers of one poll come out in order, as the reference packs
    them, with the bytes of the values."""
    from shmbroker.format.record_batch import decode_columnar, encode_batch_columnar
    from shmbroker.perf.payloads import batch_headers, header_columns

    items, expected, expected_bytes = [], [], 0
    for number, kind in enumerate(sizes):
        count = counts[number]
        lengths = np.full(count, 40, dtype=np.int64) if kind == "equal" else np.array(
            data.draw(st.lists(st.integers(HEADER_BYTES, 90), min_size=count, max_size=count)),
            dtype=np.int64)
        intended = np.arange(count, dtype=np.int64) * 1_000 + number
        seqs = np.arange(count, dtype=np.int64) + 10_000 * number
        buffer, _ = make_payloads("random", lengths, np.random.default_rng(number))
        encode_headers(buffer, starts_of(lengths), intended, producer_id, seqs)
        batch = decode_columnar(encode_batch_columnar(bytes(buffer), lengths, codec=codec,
                                                      base_offset=5))
        assert (batch.uniform is not None) == (kind == "equal" or len(set(lengths)) == 1)
        skip = int(count * skip_fraction)
        found, value_bytes = batch_headers(batch, skip)
        items += found
        expected += [(int(intended[i]), int(seqs[i])) for i in range(skip, count)]
        assert value_bytes == int(lengths[skip:].sum())
        expected_bytes += value_bytes
    got_intended, got_producers, got_seqs = header_columns(items)
    assert list(zip(got_intended.tolist(), got_seqs.tolist())) == expected
    assert got_producers.tolist() == [producer_id] * len(expected)
    assert got_intended.dtype == got_seqs.dtype == np.int64 and got_producers.dtype == np.int32


@pytest.mark.parametrize("lengths", [[20, 20, 20], [40, 12, 40]])
def test_batch_headers_refuse_values_without_room_for_the_header(lengths: list[int]) -> None:
    from shmbroker.format.record_batch import decode_columnar, encode_batch_columnar
    from shmbroker.perf.payloads import batch_headers

    batch = decode_columnar(encode_batch_columnar(bytes(sum(lengths)), lengths))
    with pytest.raises(ValueError, match="fewer than the 24-byte benchmark header"):
        batch_headers(batch)


def test_header_columns_of_nothing() -> None:
    from shmbroker.perf.payloads import header_columns

    assert [len(column) for column in header_columns([])] == [0, 0, 0]
