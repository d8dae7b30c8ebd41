"""Fast path for records sections whose records share one shape.

The common telemetry batch: every value the same size, keys absent or all the same size, no
headers.  Such records differ only in their offset delta (0, 1, 2, ...), whose varint grows by
one byte at 64, 8192 and 2**20, and in their timestamp delta, whose varint size changes rarely
(deltas grow slowly through a batch).  So the section is a few *runs* of fixed-size rows; each
run is a 2-D numpy view ``(records, record_size)`` whose fields are column blocks, and encode or
decode cost a handful of numpy calls per run whatever the number of records.  This is what makes
the columnar API run at tens of millions of records per second from Python.

Decode treats the bytes as untrusted: the first record of a run is parsed field by field, then
every row of the run is checked against it (constant columns byte-equal, offset-delta columns
equal to the expected encoding, timestamp-delta continuation bits of the same size).  The run
ends at the first row that differs; too many short runs, or a first row that is not of this
shape, send the caller to the general decoder, which reports the precise defect.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from shmbroker.errors import CorruptRecordError
from shmbroker.format.varint import decode_varint, encode_varint

U8 = npt.NDArray[np.uint8]
I64 = npt.NDArray[np.int64]

# Offset-delta bands: [start, end) share one varint size (zig-zag doubles the value).
_BANDS = ((0, 64, 1), (64, 8192, 2), (8192, 1 << 20, 3), (1 << 20, 1 << 27, 4),
          (1 << 27, 1 << 30, 5))
_band_columns: dict[int, U8] = {}
# Give up on the fast path when runs average fewer records than this.
RUN_RECORDS_MIN = 8


def _offset_delta_columns(size: int, first: int, last: int) -> U8:
    """Varint bytes of offset deltas [first, last) (all of encoded ``size``), as (n, size)."""
    band_start = next(start for start, _, band_size in _BANDS if band_size == size)
    cached = _band_columns.get(size)
    needed = last - band_start
    if cached is None or len(cached) < needed:
        grown = max(needed, 2 * (0 if cached is None else len(cached)), 64)
        z = np.arange(band_start, band_start + grown, dtype=np.uint64) << np.uint64(1)
        columns = np.empty((grown, size), dtype=np.uint8)
        write_varint_columns(columns, 0, z, size)
        _band_columns[size] = cached = columns
    return cached[first - band_start : last - band_start]


def offset_band_end(index: int) -> tuple[int, int]:
    """(end of the band holding offset delta ``index``, varint size in that band)."""
    for _, end, size in _BANDS:
        if index < end:
            return end, size
    raise CorruptRecordError(f"offset delta {index} is too large")


def write_varint_columns(block: U8, column: int, z: npt.NDArray[np.uint64], size: int) -> None:
    """Write zig-zagged values ``z`` as ``size``-byte varints into columns of ``block``."""
    for byte_index in range(size):
        group = (z >> np.uint64(7 * byte_index)) & np.uint64(0x7F)
        if byte_index < size - 1:
            group |= np.uint64(0x80)
        block[:, column + byte_index] = group


class Shape(NamedTuple):
    """What every record of the section shares (a tuple: cheap to hash for the layout cache)."""

    key_length: int  # -1 = null keys
    value_length: int  # -1 = null values


@dataclass(frozen=True)
class Row:
    """Byte layout of one record of a run."""

    prefix: bytes  # length varint .. key length varint, with zeroed delta bytes
    timestamp_column: int
    timestamp_size: int
    offset_column: int
    offset_size: int
    key_column: int
    value_length_column: int
    value_column: int
    size: int
    constant_columns: I64  # columns every row repeats
    constant_bytes: U8


@functools.lru_cache(maxsize=512)
def row_layout(shape: Shape, timestamp_size: int, offset_size: int) -> Row:
    key_length_bytes = encode_varint(shape.key_length)
    value_length_bytes = encode_varint(shape.value_length)
    key_size = max(shape.key_length, 0)
    value_size = max(shape.value_length, 0)
    body = (1 + timestamp_size + offset_size + len(key_length_bytes) + key_size
            + len(value_length_bytes) + value_size + 1)
    length_bytes = encode_varint(body)
    timestamp_column = len(length_bytes) + 1
    offset_column = timestamp_column + timestamp_size
    prefix = (length_bytes + b"\x00" + bytes(timestamp_size) + bytes(offset_size)
              + key_length_bytes)
    key_column = len(prefix)
    value_length_column = key_column + key_size
    value_column = value_length_column + len(value_length_bytes)
    size = len(length_bytes) + body
    row = np.zeros(size, dtype=np.uint8)
    row[:key_column] = np.frombuffer(prefix, dtype=np.uint8)
    row[value_length_column:value_column] = np.frombuffer(value_length_bytes, dtype=np.uint8)
    columns = [c for c in range(key_column) if not timestamp_column <= c < key_column - len(
        key_length_bytes)]
    columns += list(range(value_length_column, value_column)) + [size - 1]
    index = np.array(columns, dtype=np.int64)
    return Row(prefix, timestamp_column, timestamp_size, offset_column, offset_size, key_column,
               value_length_column, value_column, size, index, row[index])


def runs_for(timestamp_sizes: I64 | None, count: int) -> list[tuple[int, int, int, int]]:
    """Split [0, count) into runs of one (timestamp size, offset size): (first, last, ts, od)."""
    bounds = [0] + [start for start, _, _ in _BANDS if 0 < start < count] + [count]
    if timestamp_sizes is not None and timestamp_sizes[0] != timestamp_sizes[-1] or (
            timestamp_sizes is not None and not (timestamp_sizes == timestamp_sizes[0]).all()):
        changes = (np.flatnonzero(timestamp_sizes[1:] != timestamp_sizes[:-1]) + 1).tolist()
        bounds = sorted(set(bounds).union(changes))
    runs = []
    for first, last in zip(bounds[:-1], bounds[1:]):
        runs.append((first, last,
                     1 if timestamp_sizes is None else int(timestamp_sizes[first]),
                     offset_band_end(first)[1]))
    return runs


def encoded_size(shape: Shape, runs: list[tuple[int, int, int, int]]) -> int:
    return sum((last - first) * row_layout(shape, ts, od).size for first, last, ts, od in runs)


def encode(out: U8, shape: Shape, runs: list[tuple[int, int, int, int]], values: U8,
           keys: U8 | None, timestamp_z: npt.NDArray[np.uint64] | None) -> None:
    """Write the records of ``runs`` into ``out`` (exactly :func:`encoded_size` bytes,
    zero-filled).  ``timestamp_z``: zig-zagged timestamp deltas, None when all are 0."""
    key_size = max(shape.key_length, 0)
    value_size = max(shape.value_length, 0)
    position = 0
    for first, last, timestamp_size, offset_size in runs:
        row = row_layout(shape, timestamp_size, offset_size)
        rows = last - first
        block = out[position : position + rows * row.size].reshape(rows, row.size)
        block[:, : row.key_column] = np.frombuffer(row.prefix, dtype=np.uint8)
        if timestamp_z is not None:
            write_varint_columns(block, row.timestamp_column, timestamp_z[first:last],
                                 timestamp_size)
        block[:, row.offset_column : row.offset_column + offset_size] = _offset_delta_columns(
            offset_size, first, last)
        if key_size:
            block[:, row.key_column : row.value_length_column] = (
                keys[first * key_size : last * key_size].reshape(rows, key_size))  # type: ignore[index]
        block[:, row.value_length_column : row.value_column] = row.constant_bytes[
            len(row.constant_bytes) - 1 - (row.value_column - row.value_length_column) : -1]
        if value_size:
            block[:, row.value_column : row.value_column + value_size] = (
                values[first * value_size : last * value_size].reshape(rows, value_size))
        # the last column (headers count) stays 0
        position += rows * row.size


@dataclass
class Decoded:
    shape: Shape
    timestamp_deltas: I64
    key_positions: I64
    value_positions: I64


def _parse_first(raw: memoryview, position: int, end: int, index: int) -> tuple[Shape, int] | None:
    """Parse the record at ``position`` far enough to know its shape; None if it has none."""
    try:
        _, field = decode_varint(raw, position, end)
        if raw[field] != 0:
            return None
        field += 1
        _, after = decode_varint(raw, field, end, 10)
        timestamp_size = after - field
        offset_delta, field = decode_varint(raw, after, end)
        key_length, field = decode_varint(raw, field, end)
        field += max(key_length, 0)
        value_length, field = decode_varint(raw, field, end)
    except (CorruptRecordError, IndexError):
        return None
    if offset_delta != index or key_length < -1 or value_length < -1:
        return None
    return Shape(key_length, value_length), timestamp_size


def decode(data: U8, start: int, end: int, count: int) -> Decoded | None:
    """Decode a section of ``count`` same-shape records, or return None if it is not one."""
    raw = memoryview(data)
    first_parse = _parse_first(raw, start, end, 0)
    if first_parse is None:
        return None
    shape = first_parse[0]
    timestamp_parts: list[I64] = []
    row_start_parts: list[I64] = []
    column_parts: list[tuple[int, int]] = []
    position = start
    index = 0
    runs = 0
    while index < count:
        parsed = first_parse if index == 0 else _parse_first(raw, position, end, index)
        if parsed is None or parsed[0] != shape:
            return None
        timestamp_size = parsed[1]
        band_end, offset_size = offset_band_end(index)
        row = row_layout(shape, timestamp_size, offset_size)
        rows = min(count, band_end) - index
        rows = min(rows, (end - position) // row.size)
        if rows < 1:
            return None
        block = data[position : position + rows * row.size].reshape(rows, row.size)
        ok = (block[:, row.constant_columns] == row.constant_bytes).all(axis=1)
        ok &= (block[:, row.offset_column : row.offset_column + offset_size]
               == _offset_delta_columns(offset_size, index, index + rows)).all(axis=1)
        stamps = block[:, row.timestamp_column : row.timestamp_column + timestamp_size]
        ok &= stamps[:, -1] < 0x80
        if timestamp_size > 1:
            ok &= (stamps[:, :-1] >= 0x80).all(axis=1)
        if not ok.all():
            rows = int(np.argmin(ok))
            if rows == 0:
                return None
            block = block[:rows]
            stamps = stamps[:rows]
        timestamp_parts.append(_timestamp_deltas(stamps))
        row_start_parts.append(position + row.size * np.arange(rows, dtype=np.int64))
        column_parts.append((row.key_column, row.value_column))
        position += rows * row.size
        index += rows
        runs += 1
        if runs * RUN_RECORDS_MIN > count and runs > 4:
            return None
    if position != end:
        return None
    if runs == 1:
        row_starts = row_start_parts[0]
        key_positions = row_starts + column_parts[0][0]
        value_positions = row_starts + column_parts[0][1]
        return Decoded(shape, timestamp_parts[0], key_positions, value_positions)
    key_positions = np.concatenate([s + c[0] for s, c in zip(row_start_parts, column_parts)])
    value_positions = np.concatenate([s + c[1] for s, c in zip(row_start_parts, column_parts)])
    return Decoded(shape, np.concatenate(timestamp_parts), key_positions, value_positions)


def _timestamp_deltas(stamps: U8) -> I64:
    size = stamps.shape[1]
    if size == 1:
        if not stamps.any():
            return np.zeros(len(stamps), dtype=np.int64)
        z = stamps[:, 0].astype(np.int64)
    else:
        z64 = np.zeros(len(stamps), dtype=np.uint64)
        for byte_index in range(size):
            z64 |= (stamps[:, byte_index].astype(np.uint64) & np.uint64(0x7F)) << np.uint64(
                7 * byte_index)
        z = z64.view(np.int64)
    return ((z >> 1) & np.int64(0x7FFFFFFFFFFFFFFF)) ^ -(z & 1)
