"""Round trips of RecordBatch v2 through both encoders and both decoders, driven by hypothesis.

For every generated batch: the list API (``encode_batch``) and the columnar API
(``encode_batch_columnar``) must produce the same bytes, and ``decode_batch`` /
``decode_columnar`` must give back every field.  Shapes are drawn to hit the uniform fast path
(equal sizes), the general path (ragged sizes) and mixtures.  On failure hypothesis prints the
example and a ``@reproduce_failure`` blob that replays it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from record_reference import Header, headers_section

from shmbroker.format import record_batch as rb

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
CODECS = ("none", "gzip", "lz4", "zstd")

SETTINGS = settings(deadline=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@dataclass
class Batch:
    values: list[bytes | None]
    keys: list[bytes | None] | None
    headers: list[list[Header]] | None
    timestamps: list[int] | int
    codec: str
    fields: dict[str, int | bool] = field(default_factory=dict)


@st.composite
def payloads(draw: st.DrawFn, count: int, size_max: int) -> list[bytes | None]:
    """``count`` nullable byte strings: all one size, ragged, or one size with exceptions."""
    shape = draw(st.sampled_from(["equal", "ragged", "mostly-equal", "null", "empty"]))
    if shape == "null":
        return [None] * count
    if shape == "empty":
        return [b""] * count
    if shape == "ragged":
        return draw(st.lists(st.none() | st.binary(max_size=size_max), min_size=count,
                             max_size=count))
    size = draw(st.integers(0, size_max))
    blob = draw(st.binary(min_size=size * count, max_size=size * count))
    items: list[bytes | None] = [blob[i * size : (i + 1) * size] for i in range(count)]
    if shape == "mostly-equal":
        exceptions = draw(st.lists(st.tuples(st.integers(0, count - 1),
                                             st.none() | st.binary(max_size=size_max)),
                                   min_size=1, max_size=3))
        for index, item in exceptions:
            items[index] = item
    return items


@st.composite
def timestamps(draw: st.DrawFn, count: int) -> list[int] | int:
    shape = draw(st.sampled_from(["one", "constant", "near", "wide", "extreme", "same-size"]))
    if shape == "one":
        return draw(st.integers(INT64_MIN, INT64_MAX))
    base = draw(st.integers(-(2**62), 2**62) | st.sampled_from([0, 1_700_000_000_000]))
    if shape == "constant":
        return [base] * count
    if shape == "near":  # small deltas, both signs
        return [base + d for d in draw(st.lists(st.integers(-100, 100), min_size=count,
                                                max_size=count))]
    if shape == "wide":  # big deltas, both signs
        return [base + d for d in draw(st.lists(st.integers(-(2**61), 2**61), min_size=count,
                                                max_size=count))]
    if shape == "same-size":  # every delta takes the same number of varint bytes
        step = draw(st.integers(1, 2**20))
        return [base + step * i for i in range(count)]
    return draw(st.lists(st.integers(INT64_MIN, INT64_MAX) | st.sampled_from(
        [INT64_MIN, INT64_MAX, 0, -1]), min_size=count, max_size=count))


@st.composite
def batches(draw: st.DrawFn, count_max: int = 30, size_max: int = 40) -> Batch:
    count = draw(st.integers(1, count_max))
    values = draw(payloads(count, size_max))
    keys = draw(st.none() | payloads(count, 12))
    headers = None
    if draw(st.booleans()):
        header = st.tuples(st.text(max_size=6), st.none() | st.binary(max_size=8))
        some = st.lists(header, max_size=3)
        if draw(st.booleans()):
            headers = draw(st.lists(some, min_size=count, max_size=count))
        else:  # headers on a few records only
            headers = [[] for _ in range(count)]
            for index in draw(st.lists(st.integers(0, count - 1), max_size=3)):
                headers[index] = draw(some)
    fields: dict[str, int | bool] = draw(st.fixed_dictionaries({}, optional={
        "base_offset": st.integers(0, 2**62),
        "partition_leader_epoch": st.integers(INT32_MIN, INT32_MAX),
        "producer_id": st.integers(INT64_MIN, INT64_MAX),
        "producer_epoch": st.integers(-(2**15), 2**15 - 1),
        "base_sequence": st.integers(INT32_MIN, INT32_MAX),
        "log_append_time": st.booleans(),
        "transactional": st.booleans(),
        "control": st.booleans(),
    }))
    return Batch(values, keys, headers, draw(timestamps(count)), draw(st.sampled_from(CODECS)),
                 fields)


def joined(items: list[bytes | None]) -> tuple[bytes, list[int]]:
    return (b"".join(i for i in items if i is not None),
            [-1 if i is None else len(i) for i in items])


def encode_both(batch: Batch, columnar_style: int = 0) -> bytearray:
    """Encode through both APIs; they must agree byte for byte."""
    listed = rb.encode_batch(batch.values, keys=batch.keys, timestamps=batch.timestamps,
                             headers=batch.headers, codec=batch.codec,
                             **batch.fields)  # type: ignore[arg-type]
    values, value_lengths = joined(batch.values)
    kwargs: dict[str, object] = {}
    if batch.keys is not None:
        kwargs["keys"], kwargs["key_lengths"] = joined(batch.keys)  # type: ignore[assignment]
    if batch.headers is not None and any(batch.headers):
        sections = [headers_section(h) for h in batch.headers]
        kwargs["headers"] = b"".join(sections)
        kwargs["header_lengths"] = [len(s) for s in sections]
    # the same columns in the other accepted container types
    if columnar_style == 1:
        values_arg: object = np.frombuffer(values, dtype=np.uint8)
        lengths_arg: object = np.array(value_lengths, dtype=np.int64)
    elif columnar_style == 2:
        values_arg, lengths_arg = memoryview(bytearray(values)), tuple(value_lengths)
    else:
        values_arg, lengths_arg = values, value_lengths
    ts: object = batch.timestamps
    if not isinstance(ts, int) and columnar_style == 1:
        ts = np.array(ts, dtype=np.int64)
    columnar = rb.encode_batch_columnar(values_arg, lengths_arg, timestamps=ts,
                                        codec=batch.codec, **kwargs,
                                        **batch.fields)  # type: ignore[arg-type]
    assert bytes(columnar) == bytes(listed)
    return listed


def check_decoded(batch: Batch, encoded: bytearray | bytes, position: int = 0) -> None:
    count = len(batch.values)
    base_offset = int(batch.fields.get("base_offset", 0))
    stamps = batch.timestamps if isinstance(batch.timestamps, list) else [batch.timestamps] * count
    max_timestamp = max(stamps)
    if batch.fields.get("log_append_time"):
        stamps = [max_timestamp] * count
    keys = batch.keys if batch.keys is not None else [None] * count
    headers = [tuple(h) for h in batch.headers] if batch.headers else [()] * count
    expected = [rb.Record(base_offset + i, stamps[i], keys[i], batch.values[i], headers[i])
                for i in range(count)]

    header = rb.validate_batch(encoded, position)
    assert header.records_count == count and header.last_offset_delta == count - 1
    assert header.base_offset == base_offset
    assert header.max_timestamp == max_timestamp
    first = batch.timestamps[0] if isinstance(batch.timestamps, list) else batch.timestamps
    assert header.base_timestamp == first
    assert header.codec_name == batch.codec
    assert header.is_log_append_time == bool(batch.fields.get("log_append_time"))
    assert header.is_transactional == bool(batch.fields.get("transactional"))
    assert header.is_control == bool(batch.fields.get("control"))
    for name, default in (("partition_leader_epoch", -1), ("producer_id", -1),
                          ("producer_epoch", -1), ("base_sequence", -1)):
        assert getattr(header, name) == batch.fields.get(name, default)

    records = rb.decode_batch(encoded, position)
    assert records == expected and len(records) == count
    assert [records[i] for i in range(-count, count)] == expected + expected
    third = count // 3
    assert records[third : count - third] == expected[third : count - third]
    # decode_rows: the scalar decoder below SMALL_BATCH_RECORDS_MAX, the columnar one above
    assert rb.decode_rows(encoded, position, header) == expected
    skip = count // 2
    rows = rb.decode_rows(encoded, position, header, tuple, ("t", 7), base_offset + skip)
    assert rows == [("t", 7, *record) for record in expected[skip:]]
    assert rows[1:] == [("t", 7, *record) for record in expected[skip + 1 :]]
    columns = rb.decode_columnar(encoded, position)
    assert columns.header == header and len(columns) == count
    assert columns.offsets.tolist() == [r.offset for r in expected]
    assert columns.timestamps.tolist() == stamps
    assert [columns.value(i) for i in range(count)] == batch.values
    assert columns.value_lengths.tolist() == [-1 if v is None else len(v) for v in batch.values]
    assert columns.key_lengths.tolist() == [-1 if k is None else len(k) for k in keys]
    data = columns.data
    for i in range(count):
        start, length = int(columns.key_positions[i]), int(columns.key_lengths[i])
        if length >= 0:
            assert data[start : start + length].tobytes() == keys[i]
    assert columns.header_counts.tolist() == [len(h) for h in headers]
    assert columns.records() == expected
    # the uniform decoder's runs, when it found them, and the general field search agree
    assert dataclasses.replace(columns, uniform=None).records() == expected
    view = columns.values_equal_size()
    if view is not None:
        assert view.tolist() == [list(v) for v in batch.values]  # type: ignore[arg-type]
    elif count <= 64 and len({-1 if v is None else len(v) for v in batch.values}) == 1 \
            and batch.values[0] is not None and batch.keys is None and not batch.headers \
            and not isinstance(batch.timestamps, list):
        raise AssertionError("equal values with one stride but no 2-D view")
    assert list(rb.iter_records(encoded, position)) == expected


@settings(SETTINGS, max_examples=400)
@given(batches(), st.integers(0, 2))
def test_round_trip(batch: Batch, columnar_style: int) -> None:
    encoded = encode_both(batch, columnar_style)
    check_decoded(batch, encoded)
    check_decoded(batch, bytes(encoded))


@settings(SETTINGS, max_examples=60)
@given(batches(count_max=300, size_max=10), st.binary(max_size=30))
def test_round_trip_of_larger_batches_at_a_position(batch: Batch, prefix: bytes) -> None:
    """Counts past 64 (2-byte offset deltas), decoded from inside a larger buffer."""
    encoded = encode_both(batch)
    check_decoded(batch, prefix + encoded + b"\xff" * 5, len(prefix))


@settings(SETTINGS, max_examples=8)
@given(st.integers(8150, 8250), st.integers(0, 6), st.sampled_from(CODECS),
       st.booleans(), st.integers(-(2**40), 2**40))
def test_round_trip_around_three_byte_offset_deltas(count: int, size: int, codec: str,
                                                   ragged: bool, step: int) -> None:
    rng = np.random.default_rng(count * 7 + size)
    values: list[bytes | None] = [rng.bytes(size) for _ in range(count)]
    if ragged:
        values[count // 2] = rng.bytes(size + 3)
        values[-1] = None
    batch = Batch(values, None, None, [step * (i % 5) for i in range(count)], codec)
    check_decoded(batch, encode_both(batch))


@settings(SETTINGS, max_examples=60)
@given(batches(count_max=8), st.sampled_from(CODECS))
def test_codec_does_not_change_the_records(batch: Batch, other_codec: str) -> None:
    """The same records under two codecs: the records sections inflate to the same bytes."""
    first = encode_both(batch)
    batch.codec, original = other_codec, batch.codec
    second = encode_both(batch)
    assert rb.decode_batch(first) == rb.decode_batch(second)
    inflated = [bytes(b[61:]) if rb.read_header(b).codec == 0
                else rb.decompress(rb.read_header(b).codec, bytes(b[61:])) for b in (first, second)]
    assert inflated[0] == inflated[1]
    assert bytes(first[23:61]) == bytes(second[23:61])  # header past the attributes
    assert original in CODECS
