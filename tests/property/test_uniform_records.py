"""The fast path for records of one shape (``uniform_records``) against the general codec.

The fast path handles a records section as runs of fixed-size rows and checks each row's framing
as a few masked 8-byte words; the general path walks and parses every field.  Wherever the fast
path applies it must give the same bytes (encode) and the same fields (decode), and on damaged
bytes it must either step aside (return None: the general path then reports the defect) or
agree with the general path.  Timestamps are drawn to cross varint-size boundaries inside a
batch (sorted, with steps that make them grow past 64 and 8192) and at random.
"""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shmbroker.errors import CorruptRecordError
from shmbroker.format import columnar, uniform_records
from shmbroker.format.varint import decode_varint

SETTINGS = settings(deadline=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
HEAD_ROOM = 3  # decode from inside a buffer, not at its start


@st.composite
def sections(draw: st.DrawFn) -> tuple[dict[str, object], int, bool]:
    """Arguments of ``encode_records`` for records of one shape, the record count, and
    whether the timestamps keep the fast path (random ones make runs of a record or two)."""
    count = draw(st.integers(1, 70) | st.integers(60, 400) | st.just(8200))
    key_length = draw(st.sampled_from([-1, -1, 0, 1, 5, 17]))
    value_length = draw(st.sampled_from([-1, 0, 1, 3, 7, 8, 60, 100, 130]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    style = draw(st.sampled_from(["none", "zero", "steps", "shuffled", "growing", "random",
                                  "negative", "huge"]))
    if style == "none":
        deltas = None
    elif style == "zero":
        deltas = np.zeros(count, dtype=np.int64)
    elif style == "steps":  # ~20 records per millisecond, as telemetry arrives
        deltas = np.arange(count, dtype=np.int64) // draw(st.integers(1, 50))
    elif style == "shuffled":  # in no order (records stamped out of order), one-byte varints
        deltas = rng.integers(0, draw(st.sampled_from([64, 66])), count)  # or a few two-byte
    elif style == "growing":  # crosses the one-, two- and three-byte boundaries in a batch
        deltas = np.cumsum(rng.integers(0, draw(st.sampled_from([2, 40, 3000])), count))
        deltas -= deltas[0]
    elif style == "random":
        deltas = rng.integers(-(2**40), 2**40, count)
    elif style == "huge":  # sorted, up to deltas whose zig-zag needs all 10 varint bytes
        deltas = np.sort(rng.integers(0, 2**63 - 1, count, dtype=np.int64))
        deltas[0] = 0
    else:
        deltas = -np.arange(count, dtype=np.int64)
    values = rng.bytes(count * max(value_length, 0))
    arguments: dict[str, object] = {
        # a strided array of the same bytes, or the bytes: encode must read either alike
        "values": (np.repeat(np.frombuffer(values, np.uint8), 2)[::2]
                   if draw(st.booleans()) else values),
        "value_lengths": np.full(count, value_length, dtype=np.int64),
        "timestamp_deltas": deltas,
    }
    if key_length != -1 or draw(st.booleans()):
        arguments["keys"] = rng.bytes(count * max(key_length, 0))
        arguments["key_lengths"] = np.full(count, key_length, dtype=np.int64)
    if deltas is not None and draw(st.booleans()):  # as encode_batch_columnar passes them
        arguments["timestamp_bounds"] = (int(deltas.min()), int(deltas.max()))
    fast_path = style not in ("random", "huge") and not (
        style == "shuffled" and int(deltas.max()) >= 64)  # type: ignore[union-attr]
    return arguments, count, fast_path


def encode_general(arguments: dict[str, object], count: int) -> bytearray:
    """The general encoder: explicit (empty) header sections keep the fast path out."""
    return columnar.encode_records(**arguments, headers=b"\x00" * count,  # type: ignore[arg-type]
                                   header_lengths=np.ones(count, dtype=np.int64),
                                   head_room=HEAD_ROOM)


def general_or_none(data: np.ndarray, end: int, count: int) -> columnar.RecordColumns | None:
    try:
        return columnar.decode_records_general(data, HEAD_ROOM, end, count)
    except CorruptRecordError:
        return None


def assert_same_records(fast: columnar.RecordColumns, general: columnar.RecordColumns) -> None:
    for name in ("offset_deltas", "timestamp_deltas", "key_lengths", "value_lengths",
                 "value_positions", "header_counts"):
        assert np.array_equal(getattr(fast, name), getattr(general, name)), name
    has_key = general.key_lengths >= 0
    assert np.array_equal(fast.key_positions[has_key], general.key_positions[has_key])


@settings(SETTINGS, max_examples=250)
@given(sections())
def test_fast_path_encodes_and_decodes_like_the_general_path(
        section: tuple[dict[str, object], int, bool]) -> None:
    arguments, count, fast_path = section
    fast = columnar.encode_records(**arguments, head_room=HEAD_ROOM)  # type: ignore[arg-type]
    general = encode_general(arguments, count)
    assert fast == general
    data = np.frombuffer(bytes(fast) + b"\xaa" * 8, dtype=np.uint8)  # bytes after the section
    end = len(fast)
    expected = columnar.decode_records_general(data, HEAD_ROOM, end, count)
    decoded = columnar.decode_records(data, HEAD_ROOM, end, count)
    assert_same_records(decoded, expected)
    first_length, after = decode_varint(memoryview(fast), HEAD_ROOM, end)
    smallest_row = after - HEAD_ROOM + first_length  # record 0: the shortest varints
    if fast_path and smallest_row >= uniform_records.WORD_BYTES:  # else the general path
        assert uniform_records.decode(data, HEAD_ROOM, end, count) is not None


def test_timestamp_deltas_of_ten_varint_bytes_are_encoded_as_the_general_path_does() -> None:
    """A delta of 2**62 ms zig-zags to 2**63: ten varint bytes (hypothesis found the fast path
    sizing it as one byte: the last size band was left out)."""
    deltas = np.array([0, 2**62, 2**63 - 1], dtype=np.int64)
    arguments: dict[str, object] = {"values": b"abc", "value_lengths": np.ones(3, np.int64),
                                    "timestamp_deltas": deltas}
    fast = columnar.encode_records(**arguments, head_room=HEAD_ROOM)  # type: ignore[arg-type]
    assert fast == encode_general(arguments, 3)
    _, sizes = uniform_records.timestamp_sizes(deltas)
    assert sizes == [(0, 1), (1, 10)]


@settings(SETTINGS, max_examples=400)
@given(sections(), st.data())
def test_damaged_section_is_left_to_the_general_path_or_decoded_alike(
        section: tuple[dict[str, object], int, bool], data: st.DataObject) -> None:
    arguments, count, _ = section
    buffer = bytearray(columnar.encode_records(**arguments,  # type: ignore[arg-type]
                                               head_room=HEAD_ROOM))
    for _ in range(data.draw(st.integers(1, 3))):
        where = data.draw(st.integers(HEAD_ROOM, len(buffer) - 1))
        buffer[where] = data.draw(st.integers(0, 255) | st.sampled_from(
            [buffer[where] ^ 0x80, buffer[where] ^ 0x01, 0, 0x80]))
    declared = count + data.draw(st.sampled_from([0, 0, 0, -1, 1]))
    if declared < 1:
        return
    array = np.frombuffer(bytes(buffer), dtype=np.uint8)
    fast = uniform_records.decode(array, HEAD_ROOM, len(buffer), declared)
    general = decoded_as_the_general_path(array, declared)
    if fast is not None:
        assert general is not None, "the fast path accepted what the general path rejects"


def decoded_as_the_general_path(array: np.ndarray, count: int) -> columnar.RecordColumns | None:
    """Check that ``decode_records`` (fast path or not) decodes ``array`` (a section from
    HEAD_ROOM to its end) as the general path does, or rejects it as the general path does;
    the general path's records, None if it rejects them."""
    general = general_or_none(array, len(array), count)
    try:
        decoded = columnar.decode_records(array, HEAD_ROOM, len(array), count)
    except CorruptRecordError:
        assert general is None
        return None
    assert general is not None
    assert_same_records(decoded, general)
    return general


@settings(SETTINGS, max_examples=100)
@given(st.integers(0, 605), st.integers(1, 255), st.sampled_from([-1, 0, 7]))
def test_a_wrong_constant_byte_anywhere_in_a_run_is_caught(
        record: int, byte: int, key_length: int) -> None:
    """A record's header count is checked as a column of bytes (Word.constant_bytes): a
    nonzero one in any record of a 606-record run (either offset band) ends the fast path's
    run there, and the section goes to the general path."""
    count = 606
    arguments: dict[str, object] = {
        "values": bytes(range(100)) * count,
        "value_lengths": np.full(count, 100, dtype=np.int64),
        "timestamp_deltas": np.arange(count, dtype=np.int64) // 20}
    if key_length >= 0:
        arguments["keys"] = b"k" * (key_length * count)
        arguments["key_lengths"] = np.full(count, key_length, dtype=np.int64)
    buffer = bytearray(columnar.encode_records(**arguments,  # type: ignore[arg-type]
                                               head_room=HEAD_ROOM))
    clean = np.frombuffer(bytes(buffer), dtype=np.uint8)
    assert uniform_records.decode(clean, HEAD_ROOM, len(buffer), count) is not None
    position = HEAD_ROOM
    for _ in range(record + 1):  # to the end of the record: a length varint, then its body
        body, position = decode_varint(buffer, position, len(buffer))
        position += body
    assert buffer[position - 1] == 0  # its header count
    buffer[position - 1] = byte
    damaged = np.frombuffer(bytes(buffer), dtype=np.uint8)
    assert uniform_records.decode(damaged, HEAD_ROOM, len(buffer), count) is None
    decoded_as_the_general_path(damaged, count)
