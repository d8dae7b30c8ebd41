"""Vectorised encode and decode of the records section of a RecordBatch v2.

The record layout is in :mod:`shmbroker.format.record_batch`.  Here the section is handled as
columns -- one numpy array per field -- so that a whole batch costs O(1) numpy calls, not O(records)
Python operations:

* records that share one shape (equal value sizes, keys absent or equal-sized, no headers) go
  through :mod:`shmbroker.format.uniform_records`: runs of fixed-size rows as 2-D views, a
  handful of numpy calls per run whatever its length;
* anything else takes the general path here.  **encode**: field sizes as arrays, positions by
  ``cumsum``, varints scattered per byte-column, values placed through a mask.  **decode**:
  record boundaries form a chain (each record starts with its own length); once a few records
  of one size follow each other, the next ones are verified at once on a strided view, and only
  irregular records are stepped one by one.  The fields of all records are then parsed with
  vectorised varint reads.

All positions returned by the decoder index into the buffer that was passed in, so values are
never copied.  Inputs are untrusted: every length is bounds-checked and inconsistencies raise
:class:`CorruptRecordError`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from shmbroker.errors import CorruptRecordError
from shmbroker.format import uniform_records
from shmbroker.format.varint import (
    VARINT_BYTES_MAX,
    VARLONG_BYTES_MAX,
    check_int32,
    decode_varint,
    encode_varint,
    read_varints,
    varint_sizes,
    write_varints,
    zigzag,
)

U8 = npt.NDArray[np.uint8]
I64 = npt.NDArray[np.int64]

NO_HEADERS = b"\x00"  # a headers section with zero headers


def _exclusive_cumsum(sizes: I64) -> I64:
    starts = np.empty(len(sizes), dtype=np.int64)
    if len(sizes):
        starts[0] = 0
        np.cumsum(sizes[:-1], out=starts[1:])
    return starts


def _ranges_index(starts: I64, lengths: I64) -> I64:
    """Concatenation of ``arange(start, start + length)`` for every pair, without a loop."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    shift = starts - _exclusive_cumsum(lengths)
    return np.repeat(shift, lengths) + np.arange(total, dtype=np.int64)


def stride_runs(positions: I64, runs_max: int | None = None) -> list[tuple[int, int, int]] | None:
    """Split two or more positions into runs of one spacing: (first index, end index, stride)
    each, in order (a batch's fields change spacing where a varint grows); None when they make
    more than ``runs_max`` runs.  The spacing out of a run's last element is the run's too,
    except for the last run, which ends the positions."""
    strides = np.diff(positions)  # strides[i]: from element i to element i + 1
    changes = np.flatnonzero(strides[1:] != strides[:-1])
    if runs_max is not None and len(changes) >= runs_max:
        return None
    bounds = [0, *(changes + 1).tolist(), len(positions)]
    return [(first, last, int(strides[first]))  # first < len - 1: the last element ends a run
            for first, last in zip(bounds[:-1], bounds[1:])]


def _as_u8(buffer: object) -> U8:
    if isinstance(buffer, np.ndarray):
        if buffer.dtype == np.uint8 and buffer.ndim == 1 and buffer.strides[0] == 1:
            return buffer
        # contiguous bytes: encode views runs of them as one opaque item per record
        return np.ascontiguousarray(buffer).view(np.uint8).reshape(-1)
    return np.frombuffer(buffer, dtype=np.uint8)  # type: ignore[call-overload,no-any-return]


# ------------------------------------------------------------------------------------------------
# encode
# ------------------------------------------------------------------------------------------------

@dataclass
class _Payload:
    """One variable-length payload column: chunk i is data[starts[i] : starts[i] + max(len, 0)]."""

    data: U8
    lengths: I64  # -1 = null (no bytes, encoded as length -1)
    sizes: I64  # max(lengths, 0)
    starts: I64

    @classmethod
    def of(cls, buffer: object, lengths: object, count: int, what: str) -> _Payload:
        data = _as_u8(buffer)
        lengths_array = np.asarray(lengths, dtype=np.int64).reshape(-1)
        if len(lengths_array) != count:
            raise ValueError(f"{what}: {len(lengths_array)} lengths for {count} records")
        if len(lengths_array) and int(lengths_array.min()) < -1:
            raise ValueError(f"{what}: lengths must be >= -1 (-1 = null)")
        sizes = np.maximum(lengths_array, 0)
        starts = _exclusive_cumsum(sizes)
        needed = int(sizes.sum())
        if needed > len(data):
            raise ValueError(f"{what}: lengths add up to {needed} bytes, buffer holds {len(data)}")
        return cls(data, lengths_array, sizes, starts)


def encode_records(
    values: object,
    value_lengths: object,
    *,
    keys: object | None = None,
    key_lengths: object | None = None,
    timestamp_deltas: I64 | None = None,
    timestamp_bounds: tuple[int, int] | None = None,
    headers: object | None = None,
    header_lengths: object | None = None,
    head_room: int = 0,
) -> bytearray:
    """Encode the (uncompressed) records section of ``len(value_lengths)`` records.

    ``values``: one buffer holding the values back to back; ``value_lengths``: one length per
    record (-1 = null value).  ``keys``/``key_lengths`` likewise (omitted = every key null).
    ``timestamp_deltas``: int64 per record, relative to the batch's base timestamp (omitted = 0);
    ``timestamp_bounds``: their (min, max), when the caller has computed them already.
    ``headers``/``header_lengths``: each record's *encoded* headers section (count varint
    included); omitted = no headers.  Offset deltas are 0..n-1.  Returns a bytearray of
    ``head_room`` zero bytes (room for the batch header) followed by the records.
    """
    value_lengths_array = np.asarray(value_lengths, dtype=np.int64).reshape(-1)
    count = len(value_lengths_array)
    if timestamp_deltas is not None and len(timestamp_deltas) != count:
        raise ValueError(f"{len(timestamp_deltas)} timestamps for {count} records")
    if count and headers is None:
        encoded = _encode_uniform(values, value_lengths_array, keys, key_lengths,
                                  timestamp_deltas, timestamp_bounds, head_room)
        if encoded is not None:
            return encoded
    value = _Payload.of(values, value_lengths_array, count, "values")
    key = _Payload.of(keys if keys is not None else b"",
                      key_lengths if key_lengths is not None else np.full(count, -1, np.int64),
                      count, "keys")
    if headers is None:
        header = _Payload(np.frombuffer(NO_HEADERS * max(count, 1), dtype=np.uint8),
                          np.ones(count, np.int64), np.ones(count, np.int64),
                          np.arange(count, dtype=np.int64))
    else:
        header = _Payload.of(headers, header_lengths, count, "headers")
        if count and int(header.lengths.min()) < 1:
            raise ValueError("headers: every record's headers section is at least 1 byte")
    if timestamp_deltas is None:
        timestamp_deltas = np.zeros(count, dtype=np.int64)

    z_timestamp = zigzag(timestamp_deltas)
    z_offset = zigzag(np.arange(count, dtype=np.int64))
    z_key_length = zigzag(key.lengths)
    z_value_length = zigzag(value.lengths)
    size_timestamp = varint_sizes(z_timestamp)
    size_offset = varint_sizes(z_offset)
    size_key_length = varint_sizes(z_key_length)
    size_value_length = varint_sizes(z_value_length)
    body = (1 + size_timestamp + size_offset + size_key_length + key.sizes
            + size_value_length + value.sizes + header.sizes)
    z_body = zigzag(body)
    size_body = varint_sizes(z_body)
    record_sizes = size_body + body
    record_starts = _exclusive_cumsum(record_sizes)
    total = int(record_sizes.sum())
    encoded = bytearray(head_room + total)
    out = np.frombuffer(encoded, dtype=np.uint8)[head_room:]
    if count == 0:
        return encoded

    # General path: every varint column scattered, payloads through index ranges.
    position = record_starts
    write_varints(out, position, z_body, size_body)
    position = position + size_body + 1  # attributes byte stays 0
    write_varints(out, position, z_timestamp, size_timestamp)
    position = position + size_timestamp
    write_varints(out, position, z_offset, size_offset)
    position = position + size_offset
    write_varints(out, position, z_key_length, size_key_length)
    position = position + size_key_length
    if key.sizes.any():
        out[_ranges_index(position, key.sizes)] = key.data[: int(key.sizes.sum())]
    position = position + key.sizes
    write_varints(out, position, z_value_length, size_value_length)
    position = position + size_value_length
    value_total = int(value.sizes.sum())
    if value_total:
        # Values are most of the bytes: place them through a mask of "not value" positions,
        # which costs an index only for the few bytes of record framing around them.
        is_value = np.ones(total, dtype=bool)
        is_value[_ranges_index(record_starts, position - record_starts)] = False
        is_value[_ranges_index(position + value.sizes, header.sizes)] = False
        out[is_value] = value.data[:value_total]
    position = position + value.sizes
    out[_ranges_index(position, header.sizes)] = header.data[: int(header.sizes.sum())]
    return encoded


def _constant_length(lengths: I64, what: str) -> int | None:
    first = int(lengths[0])
    if first < -1:
        raise ValueError(f"{what}: lengths must be >= -1 (-1 = null)")
    # all equal to the first: compared as bytes (~0.8 us for 600 lengths, ~1.9 with ==, .all())
    return first if lengths.tobytes() == lengths[:1].tobytes() * len(lengths) else None


def _encode_uniform(values: object, value_lengths: I64, keys: object | None,
                    key_lengths: object | None, timestamp_deltas: I64 | None,
                    timestamp_bounds: tuple[int, int] | None, head_room: int,
                    ) -> bytearray | None:
    """Encode through :mod:`uniform_records` when every record has one shape, else None."""
    count = len(value_lengths)
    value_length = _constant_length(value_lengths, "values")
    if value_length is None:
        return None
    value_data = _as_u8(values)
    if count * max(value_length, 0) > len(value_data):
        raise ValueError(f"values: lengths add up to {count * max(value_length, 0)} bytes, "
                         f"buffer holds {len(value_data)}")
    key_data = None
    key_length = -1
    if key_lengths is not None:
        key_lengths_array = np.asarray(key_lengths, dtype=np.int64).reshape(-1)
        if len(key_lengths_array) != count:
            raise ValueError(f"keys: {len(key_lengths_array)} lengths for {count} records")
        constant = _constant_length(key_lengths_array, "keys")
        if constant is None:
            return None
        key_length = constant
        key_data = _as_u8(keys if keys is not None else b"")
        if count * max(key_length, 0) > len(key_data):
            raise ValueError(f"keys: lengths add up to {count * max(key_length, 0)} bytes, "
                             f"buffer holds {len(key_data)}")
    timestamp_z, timestamp_sizes = uniform_records.timestamp_sizes(timestamp_deltas,
                                                                    timestamp_bounds)
    shape = uniform_records.Shape(key_length, value_length)
    plan = uniform_records.plan(shape, timestamp_sizes, count)
    if plan is None:
        return None
    runs, layouts, size = plan
    encoded = bytearray(head_room + size)
    out = np.frombuffer(encoded, dtype=np.uint8)[head_room:]
    uniform_records.encode(out, shape, runs, layouts, value_data, key_data, timestamp_z)
    return encoded


# ------------------------------------------------------------------------------------------------
# decode
# ------------------------------------------------------------------------------------------------

@dataclass
class RecordColumns:
    """Field positions of every record of one records section, as arrays.

    Positions index ``data`` (the batch buffer for uncompressed batches, so nothing is copied).
    Lengths of -1 mean null.  ``header_counts[i] > 0`` records carry headers, encoded at
    ``header_positions[i]`` (decode with :func:`decode_headers`).
    """

    data: U8
    offset_deltas: I64
    timestamp_deltas: I64
    key_positions: I64
    key_lengths: I64
    value_positions: I64
    value_lengths: I64
    header_positions: I64
    header_counts: I64
    # set when every record has one shape (one key and one value size, no headers)
    uniform: uniform_records.Decoded | None = None


SPECULATION_ROWS = 64  # the first block of equal-size records verified at once (grows 4x)
# Until a speculation of _walk_records fails it speculates right after the first record of each
# size (a batch of one shape: one record walked, then the rest at once, twice in a batch of 64
# records or more).  After a failure it speculates only after this many repeats of one size
# (after one, sizes drawn from a small range would pay a failed guess every ~20 records for
# runs of one or two), twice as many after each failure, up to the max: a batch crafted to make
# every speculation fail costs at most one failed guess (~8 us) per SPECULATION_REPEATS_MAX
# records more.
SPECULATION_REPEATS = 3
SPECULATION_REPEATS_MAX = 64


_LENGTH_DTYPES = {1: np.dtype(np.uint8), 2: np.dtype("<u2")}


def _equal_run(data: U8 | memoryview, first: int, rows: int, stride: int,
               length_bytes: int) -> int:
    """How many of the ``rows`` records from ``first`` (``stride`` apart) start with the same
    ``length_bytes`` as the record before ``first``.

    The first of them is compared byte by byte: where sizes vary, a guess mostly fails there,
    and then costs ~0.2 us instead of the ~5 us of finding where a longer run breaks.  Then the
    length bytes of all rows are gathered as one strided copy and compared with the reference
    repeated (:func:`_strided_equal`: ~1 us for 600 records, where building a strided view,
    comparing and reducing cost three numpy calls, ~7 us).  Only a run that breaks later pays
    for finding where (one strided integer view, or column by column)."""
    reference = first - stride
    for column in range(length_bytes):
        if data[first + column] != data[reference + column]:
            return 0
    if _strided_equal(data, first, rows, stride,
                      data[reference : reference + length_bytes].tobytes()):
        return rows
    stop = first + rows * stride
    dtype = _LENGTH_DTYPES.get(length_bytes)
    if dtype is not None:
        lengths = np.ndarray((rows,), dtype=dtype, buffer=data, offset=first, strides=(stride,))
        value = int.from_bytes(data[reference : reference + length_bytes].tobytes(), "little")
        rows_ok = lengths == value
    else:
        block = np.frombuffer(data, np.uint8, stop - first, first).reshape(rows, stride)
        rows_ok = block[:, 0] == data[reference]
        for column in range(1, length_bytes):
            rows_ok &= block[:, column] == data[reference + column]
    return int(np.argmin(rows_ok))


def _one_shape(data: U8 | memoryview, raw: memoryview, start: int, size: int,
               count: int) -> bool:
    """Whether ``raw`` (``data[start:start + size]``) is ``count`` records of one shape, as a
    producer of equal-sized values writes them: the first 64 of the first record's size, the
    rest (at most 8192) one byte longer (their offsetDelta varint has two bytes).  Closed form:
    the sizes must tile the section exactly and every record's length varint, gathered as two
    strided copies, must equal the predicted one, so True proves the chain as the walk would.
    False says nothing (the walk then decides, and words its errors): its cost is ~2 us
    against ~5 us for the walk's two speculations on a 64 KiB batch of 100-byte records."""
    if size < 7 * count:  # (a record takes 7 bytes at least: its length and six fields)
        return False
    z = raw[0]
    width = 1
    if z >= 0x80:
        z = (z & 0x7F) | (raw[1] << 7)
        width = 2
        if z >= 0x4000 or z < 0x80:  # three bytes or more, or not the shortest form
            return False
    if z & 1 or z < 12:
        return False
    length = z >> 1
    later = (length + 1) << 1  # the zigzag length of the records after the 64th
    later_width = 1 if later < 0x80 else 2
    first_stride = width + length
    later_stride = later_width + length + 1
    head = min(count, 64)
    if head * first_stride + (count - head) * later_stride != size:
        return False
    if not _strided_equal(data, start, head, first_stride, bytes(raw[:width])):
        return False
    if count == head:
        return True
    expected = bytes((later,)) if later < 0x80 else bytes((later & 0x7F | 0x80, later >> 7))
    return _strided_equal(data, start + head * first_stride, count - head, later_stride,
                          expected)


def _strided_equal(data: U8 | memoryview, first: int, rows: int, stride: int,
                   expected: bytes) -> bool:
    """Whether each of ``rows`` places ``stride`` apart from ``first`` starts with
    ``expected`` (a length varint's bytes): one strided copy of opaque items and one
    comparison."""
    gathered = np.ndarray((rows,), _ITEM_TYPES[len(expected)], data, first, (stride,)).tobytes()
    return gathered == _repeated(expected, rows)


_ITEM_TYPES = {size: np.dtype(f"V{size}") for size in range(1, VARINT_BYTES_MAX + 1)}


@functools.lru_cache(maxsize=256)
def _repeated(pattern: bytes, times: int) -> bytes:
    """``pattern * times``, kept: batches of one shape come again and again."""
    return pattern * times


def _record_starts(data: U8, start: int, end: int, count: int) -> tuple[I64, I64, I64]:
    """Each record's start, length-varint size and body length (the chain walked by
    :func:`_walk_records`; the lengths then read back at once)."""
    singles: list[int] = []
    runs: list[tuple[int, int, int, int]] = []  # (singles before it, rows, position, stride)
    _walk_records(data, start, end, count, singles, runs)
    starts = np.array(singles, dtype=np.int64)
    if runs:
        # Interleave singles and runs in one pass (an np.insert per run is O(runs * count)).
        parts: list[I64] = []
        previous = 0
        for at, rows, position, stride in runs:
            parts += [starts[previous:at], position + stride * np.arange(rows, dtype=np.int64)]
            previous = at
        starts = np.concatenate(parts + [starts[previous:]])
    bodies, size_lengths = read_varints(data, starts, end, VARINT_BYTES_MAX)
    return starts, size_lengths, bodies


# Batches of at most this many records are walked without numpy (no speculation, no array
# view): for a one-record batch (a producer with linger 0) the array set-up cost 3.7 us here
# against ~1 us for the plain walk.
SCALAR_WALK_RECORDS_MAX = 8


def check_record_chain(buffer: object, start: int, end: int, count: int) -> None:
    """CorruptRecordError unless ``buffer[start:end]`` is exactly ``count`` length-prefixed
    records: the chain of record lengths, which a batch whose header lies about its record
    count (with a recomputed CRC) breaks.  The records' insides are not decoded.  Runs on every
    append (the worker's hot path): see :func:`_walk_records` for its cost."""
    # A memoryview, not a numpy array, for bytes-like buffers: its item reads and strided
    # copies serve the walk as well, and making the array cost ~0.9 us a batch.
    data = buffer if isinstance(buffer, np.ndarray) else memoryview(buffer)  # type: ignore[arg-type]
    if not isinstance(data, np.ndarray) and (data.format != "B" or data.ndim != 1):
        data = data.cast("B")
    _walk_records(data, start, end, count, None, None)


def _walk_records(data: U8 | memoryview, start: int, end: int, count: int,
                  singles: list[int] | None,
                  runs: list[tuple[int, int, int, int]] | None) -> None:
    """Walk the chain of ``count`` record lengths through ``data[start:end]``; raise
    CorruptRecordError unless it ends exactly at ``end``.  ``data``: a numpy byte array or a
    memoryview of bytes.  At most SCALAR_WALK_RECORDS_MAX records are walked one by one,
    without speculating.  With ``singles`` and ``runs``, note
    where records start: single records' positions, and runs of equal-size records as
    (len(singles) before the run, rows, first position, stride).

    Written for speed.  Record lengths of one or two varint bytes (records under 8 KiB) are
    read inline in a tight loop, ~0.2 us a record for irregular sizes.  After a record (until a
    guess fails; then after SPECULATION_REPEATS records of one size) the rest up to where the
    offsetDelta varint grows are guessed to be of that size too and verified at once by
    :func:`_equal_run`; where the guess fails, later guesses take blocks of SPECULATION_ROWS
    growing 4x while they hold, and need twice the run before them (SPECULATION_REPEATS_MAX
    bounds what a crafted batch costs).  A batch of records of one shape walks two records and
    makes two guesses whatever its count (~5.4 us per 64 KiB of 100-byte records; its CRC-32C
    ~3 us); but the check alone first tries :func:`_one_shape`, which proves such a batch in
    closed form (~3.5 us in all).  A stride fixes the length varint's size (1 byte up to 64, 2
    up to 8193), so equal length bytes mean equal strides.
    """
    raw = memoryview(data)[start:end]
    size = end - start
    if singles is None and SCALAR_WALK_RECORDS_MAX < count <= 8192 and _one_shape(
            data, raw, start, size, count):
        return
    position = 0
    index = 0
    stride = previous_stride = -1
    speculation_rows = count  # first guess: all the rest are of that size (one numpy pass)
    # speculate after one record of a size, until a guess fails; a few records: never
    required_repeats = count if count <= SCALAR_WALK_RECORDS_MAX else 0
    try:
        while index < count:
            repeats = 0
            for index in range(index, count):  # noqa: B020 - resumes where the block ended
                if singles is not None:
                    singles.append(start + position)
                z = raw[position]
                if z < 0x80:
                    stride = 1
                else:
                    z = (z & 0x7F) | (raw[position + 1] << 7)
                    stride = 2
                    if z >= 0x4000:  # three or more varint bytes: a record of 8 KiB or more
                        body, after = decode_varint(raw, position, size)
                        z = body << 1 if body >= 0 else 1
                        stride = after - position
                if z & 1 or z < 12:  # negative, or shorter than a record's six 1-byte fields
                    raise CorruptRecordError(
                        f"record {index} of {count} has a length of {(z >> 1) ^ -(z & 1)}")
                stride += z >> 1
                position += stride
                if stride != previous_stride:
                    previous_stride = stride
                    repeats = 0
                else:
                    repeats += 1
                if repeats == required_repeats:
                    break
            else:
                index = count
                break
            index += 1
            # A record's offsetDelta varint grows a byte at records 64 and 8192: so does its size.
            boundary = 64 if index < 64 else 8192 if index < 8192 else count
            room = min(boundary - index, count - index, (size - position) // stride,
                       speculation_rows)
            if room < 3:
                continue
            # Enough records of one size in a row: speculate that more follow, compare their
            # length bytes with the last one's, accept the matching prefix.
            first = start + position
            run = _equal_run(data, first, room, stride, stride - (z >> 1))
            if runs is not None and singles is not None and run:
                runs.append((len(singles), run, first, stride))
            position += stride * run
            index += run
            if run == room:
                speculation_rows *= 4
            else:  # speculate in smaller blocks and after longer runs from now on
                speculation_rows = SPECULATION_ROWS
                required_repeats = min(max(2 * required_repeats, SPECULATION_REPEATS),
                                       SPECULATION_REPEATS_MAX)
    except IndexError:
        raise CorruptRecordError(
            f"the records section ends inside record {index} of {count}") from None
    if position > size:
        raise CorruptRecordError(
            f"the last of {count} records runs {position - size} bytes past the batch's end")
    if position < size:
        raise CorruptRecordError(
            f"{size - position} bytes left over after the {count} declared records")


# Columns that only depend on a batch's record count are shared by the batches of one size
# (one producer's usually are): at most 64 sizes of up to this many records (~8 MiB in all).
SHARED_COLUMN_RECORDS_MAX = 16384


def _constant_column(count: int, value: int) -> I64:
    """A read-only column of ``count`` times ``value``."""
    if count > SHARED_COLUMN_RECORDS_MAX:
        return np.full(count, value, dtype=np.int64)
    return _shared_column(count, value)


def _offset_deltas(count: int) -> I64:
    """The read-only column 0..count-1."""
    if count > SHARED_COLUMN_RECORDS_MAX:
        return np.arange(count, dtype=np.int64)
    return _shared_column(count, None)


@functools.lru_cache(maxsize=64)
def _shared_column(count: int, value: int | None) -> I64:
    column = (np.arange(count, dtype=np.int64) if value is None
              else np.full(count, value, dtype=np.int64))
    column.flags.writeable = False
    return column


def decode_records(buffer: object, start: int, end: int, count: int) -> RecordColumns:
    """Parse ``count`` records in ``buffer[start:end]`` into columns (positions into buffer)."""
    data = _as_u8(buffer)
    if count == 0:
        if start != end:
            raise CorruptRecordError(f"{end - start} bytes of records but a count of 0")
        empty = np.zeros(0, dtype=np.int64)
        return RecordColumns(data, empty, empty, empty, empty, empty, empty, empty, empty)
    uniform = uniform_records.decode(data, start, end, count)
    if uniform is not None:
        shape = uniform.shape
        return RecordColumns(
            data, _offset_deltas(count), uniform.timestamp_deltas, uniform.key_positions,
            _constant_column(count, shape.key_length), uniform.value_positions,
            _constant_column(count, shape.value_length),
            uniform.value_positions + max(shape.value_length, 0), _constant_column(count, 0),
            uniform)
    return decode_records_general(data, start, end, count)


def decode_records_general(data: U8, start: int, end: int, count: int) -> RecordColumns:
    """:func:`decode_records` without the fast path for records of one shape (which must
    agree with it wherever it applies: tests compare them)."""
    starts, size_lengths, bodies = _record_starts(data, start, end, count)
    record_ends = starts + size_lengths + bodies
    position = starts + size_lengths + 1  # skip the attributes byte
    timestamp_deltas, sizes = read_varints(data, position, end, VARLONG_BYTES_MAX)
    position = position + sizes
    offset_deltas, sizes = read_varints(data, position, end, VARINT_BYTES_MAX)
    check_int32(offset_deltas, "offset delta")
    if int(offset_deltas[0]) < 0 or (count > 1 and not (np.diff(offset_deltas) > 0).all()):
        raise CorruptRecordError("record offset deltas are not increasing from 0 up")
    position = position + sizes
    key_lengths, sizes = read_varints(data, position, end, VARINT_BYTES_MAX)
    position = position + sizes
    key_positions = position
    position = position + np.maximum(key_lengths, 0)
    value_lengths, sizes = read_varints(data, np.minimum(position, end - 1), end,
                                        VARINT_BYTES_MAX)
    if int(key_lengths.min()) < -1 or int((position - record_ends).max()) >= 0:
        raise CorruptRecordError("a record's key runs past the record's end")
    position = position + sizes
    value_positions = position
    position = position + np.maximum(value_lengths, 0)
    if int(value_lengths.min()) < -1 or int((position - record_ends).max()) >= 0:
        raise CorruptRecordError("a record's value runs past the record's end")
    header_counts, sizes = read_varints(data, position, end, VARINT_BYTES_MAX)
    header_positions = position
    position = position + sizes
    if int(header_counts.min()) < 0:
        raise CorruptRecordError("negative header count")
    plain = header_counts == 0
    if not (position[plain] == record_ends[plain]).all():
        raise CorruptRecordError("record length disagrees with the record's fields")
    if not plain.all():
        raw = memoryview(data)
        for index in np.flatnonzero(~plain).tolist():
            _, after = decode_headers(raw, int(header_positions[index]),
                                      int(record_ends[index]))
            if after != record_ends[index]:
                raise CorruptRecordError(
                    f"record {index}: length disagrees with its headers")
    return RecordColumns(data, offset_deltas, timestamp_deltas, key_positions, key_lengths,
                         value_positions, value_lengths, header_positions, header_counts)


def decode_headers(raw: memoryview, position: int, end: int) -> tuple[list[tuple[str, bytes]], int]:
    """Decode one record's headers section at ``position``; return (headers, next position)."""
    count, position = decode_varint(raw, position, end)
    if count < 0 or count > end - position:
        raise CorruptRecordError(f"invalid header count {count}")
    headers: list[tuple[str, bytes]] = []
    for _ in range(count):
        key_length, position = decode_varint(raw, position, end)
        if key_length < 0 or position + key_length > end:
            raise CorruptRecordError("header key runs past the record's end")
        try:
            key = bytes(raw[position : position + key_length]).decode("utf-8")
        except UnicodeDecodeError as error:
            raise CorruptRecordError(f"header key is not UTF-8: {error}") from None
        position += key_length
        value_length, position = decode_varint(raw, position, end)
        if value_length < -1 or position + max(value_length, 0) > end:
            raise CorruptRecordError("header value runs past the record's end")
        value = None if value_length < 0 else bytes(raw[position : position + value_length])
        position += max(value_length, 0)
        headers.append((key, value))  # type: ignore[arg-type]
    return headers, position


def encode_headers(
    headers: list[tuple[str, bytes | None]] | tuple[tuple[str, bytes | None], ...],
) -> bytes:
    """One record's encoded headers section (count varint included)."""
    if not headers:
        return NO_HEADERS
    parts = [encode_varint(len(headers))]
    for key, value in headers:
        if not isinstance(key, str):
            raise TypeError(f"header keys must be str, not {type(key).__name__}")
        key_bytes = key.encode("utf-8")
        parts.append(encode_varint(len(key_bytes)))
        parts.append(key_bytes)
        if value is None:
            parts.append(encode_varint(-1))
        else:
            parts.append(encode_varint(len(value)))
            parts.append(bytes(value))
    return b"".join(parts)
