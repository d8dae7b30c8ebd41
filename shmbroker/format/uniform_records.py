"""Fast path for records sections whose records share one shape.

The common telemetry batch: every value the same size, keys absent or all the same size, no
headers.  Such records differ only in their offset delta (0, 1, 2, ...), whose varint grows by
one byte at 64, 8192 and 2**20, and in their timestamp delta, whose varint size changes rarely
(deltas grow slowly through a batch).  So the section is a few *runs* of fixed-size rows, and a
run is handled with a few numpy calls whatever its number of records.

Python pays per numpy call (~1-3 us here), and a narrow column of a 2-D ``(records,
record_size)`` view costs a strided inner loop per row; so the framing bytes of a row (length,
attributes, timestamp delta, offset delta, key and value lengths, header count: ~10 bytes around
the payload) are handled as a few **8-byte little-endian words**, each one strided 1-D
``uint64`` view over the run (one element per record):

* encode writes each word once per run (template bits | offset-delta bits from a cache |
  timestamp-delta bits), then copies the keys and values as 2-D blocks;
* decode checks each word with one masked compare against the same template, which covers every
  framing byte and the continuation bits of the timestamp varint; the timestamp deltas are then
  read through a lookup table on one strided view.

Decode treats the bytes as untrusted: the run ends at the first record whose words differ from
the template; too many short runs, or a record that is not of the batch's shape, send the caller
to the general decoder, which reports the precise defect.  Records of fewer than 8 bytes (no
room for a word) take the general path too.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from shmbroker.errors import CorruptRecordError
from shmbroker.format.varint import (
    SIZE_THRESHOLDS,
    decode_varint,
    encode_varint,
    unzigzag,
    varint_sizes,
    zigzag,
)

U8 = npt.NDArray[np.uint8]
I64 = npt.NDArray[np.int64]
U64 = npt.NDArray[np.uint64]

# Offset-delta bands: [start, end) share one varint size (zig-zag doubles the value).
_BANDS = ((0, 64, 1), (64, 8192, 2), (8192, 1 << 20, 3), (1 << 20, 1 << 27, 4),
          (1 << 27, 1 << 30, 5))
# Give up on the fast path when runs average fewer records than this.
RUN_RECORDS_MIN = 8
WORD_BYTES = 8


def offset_band_end(index: int) -> tuple[int, int]:
    """(end of the band holding offset delta ``index``, varint size in that band)."""
    for _, end, size in _BANDS:
        if index < end:
            return end, size
    raise CorruptRecordError(f"offset delta {index} is too large")


def _varint_payload(z: U64, size: int) -> U64:
    """The ``size`` varint bytes (at most 8) of each zig-zagged ``z`` as a little-endian
    integer, without continuation bits (those are constant for a given size: the row template
    holds them)."""
    if size == 1:
        return z
    payload = z & np.uint64(0x7F)
    for byte_index in range(1, size):
        payload |= ((z >> np.uint64(7 * byte_index)) & np.uint64(0x7F)) << np.uint64(
            8 * byte_index)
    return payload


def _timestamp_bits(z: U64, size: int, shift: int) -> U64:
    """The payload bits of each ``size``-byte timestamp varint that fall in a word where the
    varint starts at bit ``shift`` (negative: before the word)."""
    if size == 1:
        return z << np.uint64(shift)
    if size == 2 and 0 <= shift <= 48:
        return _two_byte_timestamps(shift).take(z)
    if 0 <= shift <= 64 - 8 * size:  # the whole varint lies in the word
        return _varint_payload(z, size) << np.uint64(shift)
    bits = np.zeros(len(z), dtype=np.uint64)
    for byte_index in range(size):
        at = shift + 8 * byte_index
        if 0 <= at < 64:
            bits |= ((z >> np.uint64(7 * byte_index)) & np.uint64(0x7F)) << np.uint64(at)
    return bits


@functools.lru_cache(maxsize=8)
def _two_byte_timestamps(shift: int) -> U64:
    """The payload bits of every two-byte varint (z < 2**14), shifted: one lookup per record
    instead of six passes (128 KiB per shift; a row layout puts the timestamp at byte 1-3)."""
    return _varint_payload(np.arange(1 << 14, dtype=np.uint64), 2) << np.uint64(shift)


def _shifted(bits: U64, shift: int) -> U64:
    """``bits`` moved ``shift`` bits up (down when negative), truncated to 64 bits."""
    if shift >= 0:
        return bits << np.uint64(shift)
    return bits >> np.uint64(-shift)


CONSTANT_BYTES_MAX = 2  # see Word.constant_bytes
_BYTE = [bytes([value]) for value in range(256)]


class Shape(NamedTuple):
    """What every record of the section shares (a tuple: cheap to hash for the layout cache)."""

    key_length: int  # -1 = null keys
    value_length: int  # -1 = null values


class Word:
    """One 8-byte window ``[offset, offset + 8)`` of a row's framing bytes.

    ``mask`` selects the bits decode checks (whole framing bytes; only the continuation bit of
    timestamp bytes), ``template`` their value with the offset delta's bytes zeroed; the offset
    delta's bytes that fall in the window are added per record from a per-band cache, shifted
    by ``offset_delta_shift`` bits (None: the window holds none of them); the timestamp's
    payload bits likewise by ``timestamp_shift``."""

    __slots__ = ("offset", "mask", "template", "offset_delta_shift", "offset_size",
                 "timestamp_shift", "_band_start", "_expected", "_expected_bytes",
                 "constant_bytes", "mask_u64")

    def __init__(self, offset: int, mask: int, template: int, offset_delta_shift: int | None,
                 offset_size: int, timestamp_shift: int | None) -> None:
        self.offset = offset
        self.mask = mask
        self.template = template
        self.offset_delta_shift = offset_delta_shift
        self.offset_size = offset_size
        self.timestamp_shift = timestamp_shift
        self._band_start = next(start for start, _, size in _BANDS if size == offset_size)
        # offset-delta windows: the band's expected words (expected); constant windows: the
        # template repeated, for encode's strided copies (written)
        self._expected: U64 | None = None
        self._expected_bytes = b""  # _expected as little-endian bytes
        self.mask_u64 = np.uint64(mask)
        # A window of at most CONSTANT_BYTES_MAX whole framing bytes, the same in every record
        # (a header count, say): decode compares each as one strided column of bytes (a C-level
        # copy and a bytes compare, ~1 us for 600 records) instead of a masked word compare
        # (~5 us).  (row offset, expected byte) pairs, or None.
        masked = [index for index in range(WORD_BYTES) if (mask >> (8 * index)) & 0xFF]
        self.constant_bytes = (
            tuple((offset + index, (template >> (8 * index)) & 0xFF) for index in masked)
            if offset_delta_shift is None and timestamp_shift is None
            and len(masked) <= CONSTANT_BYTES_MAX
            and all((mask >> (8 * index)) & 0xFF == 0xFF for index in masked) else None)

    def expected(self, first: int, last: int) -> U64 | int:
        """The window's template bits for records [first, last) of one offset band: one int
        when no offset-delta byte falls in it, else a cached array slice (read-only)."""
        if self.offset_delta_shift is None:
            return self.template
        band_start = self._band_start
        cached = self._expected
        if cached is None or len(cached) < last - band_start:
            grown = max(last - band_start, 2 * (0 if cached is None else len(cached)), 64)
            z = np.arange(band_start, band_start + grown, dtype=np.uint64) << np.uint64(1)
            payload = _varint_payload(z, self.offset_size)
            continuation = sum(0x80 << (8 * k) for k in range(self.offset_size - 1))
            cached = _shifted(payload | np.uint64(continuation), self.offset_delta_shift)
            cached |= np.uint64(self.template)
            cached.flags.writeable = False
            self._expected = cached
            self._expected_bytes = cached.astype("<u8", copy=False).tobytes()
        return cached[first - band_start : last - band_start]

    def written(self, first: int, last: int) -> U64:
        """:meth:`expected` as an array in every case, for encode: numpy copies an array into
        the unaligned, strided words of a run ~2.5x as fast as it broadcasts one integer there
        (0.6 against 1.6 us for 540 records).  A constant window's array is cached too."""
        if self.offset_delta_shift is not None:
            return self.expected(first, last)  # type: ignore[return-value]
        cached = self._expected
        if cached is None or len(cached) < last - first:
            cached = np.full(max(last - first, 64, 2 * (0 if cached is None else len(cached))),
                             self.template, dtype=np.uint64)
            cached.flags.writeable = False
            self._expected = cached
        return cached[: last - first]

    def expected_bytes(self, first: int, last: int) -> bytes:
        """:meth:`expected` as the bytes of little-endian words (what a strided copy of the
        masked windows gives when they all match)."""
        if self.offset_delta_shift is None:
            return self.template.to_bytes(WORD_BYTES, "little") * (last - first)
        band_start = self._band_start
        if len(self._expected_bytes) < (last - band_start) * WORD_BYTES:
            self.expected(first, last)  # grows the cache
        return self._expected_bytes[(first - band_start) * WORD_BYTES
                                    : (last - band_start) * WORD_BYTES]


@dataclass(frozen=True)
class Row:
    """Byte layout of one record of a run."""

    size: int
    timestamp_column: int
    timestamp_size: int
    key_column: int
    value_column: int
    words: tuple[Word, ...]


@functools.lru_cache(maxsize=512)
def row_layout(shape: Shape, timestamp_size: int, offset_size: int) -> Row | None:
    """The layout of a record of ``shape`` with varints of these sizes; None below 8 bytes."""
    key_length_bytes = encode_varint(shape.key_length)
    value_length_bytes = encode_varint(shape.value_length)
    key_size = max(shape.key_length, 0)
    value_size = max(shape.value_length, 0)
    body = (1 + timestamp_size + offset_size + len(key_length_bytes) + key_size
            + len(value_length_bytes) + value_size + 1)
    length_bytes = encode_varint(body)
    size = len(length_bytes) + body
    if size < WORD_BYTES:
        return None
    timestamp_column = len(length_bytes) + 1
    offset_column = timestamp_column + timestamp_size
    key_column = offset_column + offset_size + len(key_length_bytes)
    value_column = key_column + key_size + len(value_length_bytes)
    template = bytearray(size)  # attributes and header count stay 0
    mask = bytearray(size)
    template[: len(length_bytes)] = length_bytes
    template[timestamp_column : offset_column - 1] = b"\x80" * (timestamp_size - 1)
    template[key_column - len(key_length_bytes) : key_column] = key_length_bytes
    template[value_column - len(value_length_bytes) : value_column] = value_length_bytes
    mask[:key_column] = b"\xff" * key_column
    mask[timestamp_column:offset_column] = b"\x80" * timestamp_size
    mask[key_column + key_size : value_column] = b"\xff" * len(value_length_bytes)
    mask[size - 1] = 0xFF
    words = []
    # the columns the mask covers: the framing up to the key, the value's length, the last byte
    uncovered = sorted({*range(key_column), *range(key_column + key_size, value_column),
                        size - 1})
    while uncovered:
        offset = min(uncovered[0], size - WORD_BYTES)
        end = offset + WORD_BYTES
        words.append(Word(
            offset, int.from_bytes(mask[offset:end], "little"),
            int.from_bytes(template[offset:end], "little"),
            8 * (offset_column - offset) if offset_column < end and offset_column + offset_size
            > offset else None, offset_size,
            8 * (timestamp_column - offset) if timestamp_column < end and offset_column
            > offset else None))
        uncovered = [column for column in uncovered if column >= end]
    return Row(size, timestamp_column, timestamp_size, key_column, value_column, tuple(words))


def timestamp_sizes(deltas: I64 | None, bounds: tuple[int, int] | None = None,
                    ) -> tuple[U64 | None, list[tuple[int, int]]]:
    """Zig-zagged timestamp deltas (None when all are 0) and where their varints change size:
    [(first record, size), ...] from record 0.  ``bounds``: the deltas' (min, max) when the
    caller has them (encode_batch_columnar needs the max for the header anyway).  Deltas in
    [0, 63] (a batch spanning under 64 ms, the usual) cost one shift; other non-decreasing
    deltas one search; the rest a few passes."""
    if deltas is None or len(deltas) == 0:
        return None, [(0, 1)]
    low, high = bounds if bounds is not None else (int(deltas.min()), int(deltas.max()))
    if low >= 0:
        if high == 0:
            return None, [(0, 1)]
        z = (deltas << 1).view(np.uint64)  # zig-zag of non-negative values
        if high < 64:  # one byte each, in any order
            return z, [(0, 1)]
        if len(deltas) == 1 or (deltas[1:] >= deltas[:-1]).all():
            # where each size starts; the last (10 bytes) runs to the end: zig-zags >= 2**63
            firsts = [0, *np.searchsorted(z, SIZE_THRESHOLDS).tolist(), len(z)]
            return z, [(first, size) for size, (first, after) in enumerate(
                zip(firsts[:-1], firsts[1:]), start=1) if first < after]
    z = zigzag(deltas)
    sizes = varint_sizes(z)
    changes = [0, *(np.flatnonzero(sizes[1:] != sizes[:-1]) + 1).tolist()]
    return z, [(first, int(sizes[first])) for first in changes]


def runs_for(sizes: list[tuple[int, int]], count: int) -> list[tuple[int, int, int, int]]:
    """Split [0, count) into runs of one (timestamp size, offset size): (first, last, ts, od),
    given :func:`timestamp_sizes`."""
    bounds = sorted({0, count, *(start for start, _, _ in _BANDS if 0 < start < count),
                     *(first for first, _ in sizes)})
    runs = []
    change = 0
    for first, last in zip(bounds[:-1], bounds[1:]):
        while change + 1 < len(sizes) and sizes[change + 1][0] <= first:
            change += 1
        runs.append((first, last, sizes[change][1], offset_band_end(first)[1]))
    return runs


def layouts_for(shape: Shape, runs: list[tuple[int, int, int, int]]) -> list[Row] | None:
    """The row layout of every run, or None when a record is too small for the fast path."""
    rows = [row_layout(shape, ts, od) for _, _, ts, od in runs]
    return None if None in rows else rows  # type: ignore[return-value]


# (runs, their layouts, bytes): tuples, shared by every batch that gets one plan
Plan = tuple[tuple[tuple[int, int, int, int], ...], tuple[Row, ...], int]
PLANS_KEPT_SIZES_MAX = 4  # timestamp size changes in a batch's plan worth keeping


def plan(shape: Shape, sizes: list[tuple[int, int]], count: int) -> Plan | None:
    """How to encode ``count`` records of ``shape`` with :func:`timestamp_sizes`' ``sizes``:
    (runs, their row layouts, bytes in all); None when the fast path does not pay (too many
    short runs) or does not apply (records under a word).  The plans of the few size lists a
    producer's batches have (one, mostly) are kept: making one took ~5 us of a 64 KiB batch."""
    if len(sizes) <= PLANS_KEPT_SIZES_MAX:
        return _kept_plan(shape, tuple(sizes), count)
    return _make_plan(shape, sizes, count)


@functools.lru_cache(maxsize=256)
def _kept_plan(shape: Shape, sizes: tuple[tuple[int, int], ...], count: int) -> Plan | None:
    return _make_plan(shape, list(sizes), count)


def _make_plan(shape: Shape, sizes: list[tuple[int, int]], count: int) -> Plan | None:
    runs = runs_for(sizes, count)
    if len(runs) * RUN_RECORDS_MIN > count and len(runs) > 4:
        return None
    layouts = layouts_for(shape, runs)
    if layouts is None:
        return None
    return tuple(runs), tuple(layouts), sum((last - first) * row.size
                                            for (first, last, _, _), row in zip(runs, layouts))


def encode(out: U8, shape: Shape, runs: Sequence[tuple[int, int, int, int]],
           layouts: Sequence[Row], values: U8, keys: U8 | None,
           timestamp_z: U64 | None) -> None:
    """Write the records of ``runs`` into ``out`` (exactly the sum of rows x row size bytes,
    **zero-filled**).  ``timestamp_z``: zig-zagged timestamp deltas, None when all are 0.

    Every write into the rows goes through a strided copy from an aligned array: numpy's ufuncs
    and scalar broadcasts are 2-3x slower when their output is unaligned (a row is rarely a
    multiple of 8 bytes), and keys and values move as one opaque ``V<size>`` item per record
    (a memcpy each: ~2x as fast as a 2-D copy of bytes)."""
    key_size = max(shape.key_length, 0)
    value_size = max(shape.value_length, 0)
    shifted: dict[int, U64] = {}  # one-byte timestamp bits by shift, for every record at once
    position = 0
    for (first, last, timestamp_size, _), row in zip(runs, layouts):
        rows = last - first
        for word in row.words:  # framing first: a window may cover payload bytes
            shift = word.timestamp_shift
            if shift is not None and timestamp_z is not None:
                if timestamp_size == 1:
                    if shift not in shifted:
                        shifted[shift] = timestamp_z << np.uint64(shift)
                    timestamp_bits = shifted[shift][first:last]
                else:
                    timestamp_bits = _timestamp_bits(timestamp_z[first:last], timestamp_size,
                                                     shift)
                bits = np.bitwise_or(timestamp_bits, word.written(first, last))
            elif word.offset_delta_shift is None and word.template == 0:
                continue  # zero-filled already
            else:
                bits = word.written(first, last)
            np.ndarray((rows,), "<u8", out, position + word.offset, (row.size,))[...] = bits
        if key_size:
            np.ndarray((rows,), f"V{key_size}", out, position + row.key_column,
                       (row.size,))[...] = keys[first * key_size : last * key_size].view(  # type: ignore[index]
                           f"V{key_size}")
        if value_size:
            np.ndarray((rows,), f"V{value_size}", out, position + row.value_column,
                       (row.size,))[...] = values[first * value_size
                                                  : last * value_size].view(f"V{value_size}")
        position += rows * row.size


@dataclass
class Decoded:
    shape: Shape
    timestamp_deltas: I64
    key_positions: I64
    value_positions: I64
    # the values as runs of one stride: (first value's position, records, stride); a key sits
    # key_gap bytes before its value
    value_runs: list[tuple[int, int, int]]
    key_gap: int


def _parse_first(raw: memoryview, position: int, end: int, index: int) -> tuple[Shape, int] | None:
    """Parse the record at ``position`` far enough to know its shape; None if it has none.
    Varints of one and two bytes (every field of records under 8 KiB) are read inline."""
    try:
        field = position + (1 if raw[position] < 0x80 else 2 if raw[position + 1] < 0x80 else 0)
        if field == position:  # a length of three or more bytes
            _, field = decode_varint(raw, position, end)
        if raw[field] != 0:  # attributes
            return None
        field += 1
        if raw[field] < 0x80:  # the usual timestamp delta: under 64 ms
            after = field + 1
        else:
            _, after = decode_varint(raw, field, end, 10)
        timestamp_size = after - field
        lengths = []
        for _ in range(3):  # offset delta, key length, value length
            z = raw[after]
            if z < 0x80:
                after += 1
                value = (z >> 1) ^ -(z & 1)
            elif raw[after + 1] < 0x80:
                z = (z & 0x7F) | raw[after + 1] << 7
                after += 2
                value = (z >> 1) ^ -(z & 1)
            else:
                value, after = decode_varint(raw, after, end)
            lengths.append(value)
            if len(lengths) == 2:
                after += max(value, 0)  # the key
    except (CorruptRecordError, IndexError):
        return None
    offset_delta, key_length, value_length = lengths
    # (the value must fit too: a length that lies would make row_layout build a row that big)
    if (offset_delta != index or key_length < -1 or value_length < -1
            or after + max(value_length, 0) > end):
        return None
    return Shape(key_length, value_length), timestamp_size


# Timestamp deltas of one and two varint bytes, decoded by table: indexed by the byte, or by
# the little-endian pair of bytes with continuation bits cleared (b0 | b1 << 8).
_TIMESTAMPS_1 = unzigzag(np.arange(256, dtype=np.uint64) & np.uint64(0x7F))
_pair = np.arange(0x8000, dtype=np.uint64)
_TIMESTAMPS_2 = unzigzag((_pair & np.uint64(0x7F)) | ((_pair >> np.uint64(8)) & np.uint64(0x7F))
                         << np.uint64(7))
del _pair


def _timestamp_deltas(data: U8, position: int, rows: int, row: Row) -> I64:
    """Timestamp deltas of ``rows`` records from ``position`` (continuation bits verified)."""
    column = position + row.timestamp_column
    size = row.timestamp_size
    if size == 1:
        return _TIMESTAMPS_1.take(np.ndarray((rows,), np.uint8, data, column, (row.size,)))
    if size == 2:
        pairs = np.ndarray((rows,), "<u2", data, column, (row.size,))
        return _TIMESTAMPS_2.take(pairs & np.uint16(0x7F7F))
    z = np.zeros(rows, dtype=np.uint64)
    for byte_index in range(size):
        stamps = np.ndarray((rows,), np.uint8, data, column + byte_index, (row.size,))
        z |= (stamps.astype(np.uint64) & np.uint64(0x7F)) << np.uint64(7 * byte_index)
    return unzigzag(z)


def _timestamp_fits(raw: memoryview, position: int, end: int, row: Row) -> bool:
    """Whether the record at ``position`` has a timestamp varint of ``row``'s size (a run of
    one shape ends where the timestamp deltas need one more byte)."""
    if end - position < row.size:
        return False
    last = position + row.timestamp_column + row.timestamp_size - 1
    return raw[last] < 0x80 and (row.timestamp_size == 1 or raw[last - 1] >= 0x80)


def _matching_rows(data: U8, position: int, end: int, rows: int, index: int, row: Row) -> int:
    """How many of (at most) ``rows`` records from ``position`` (record ``index`` of the
    section) match ``row``'s template: per word, its masked windows copied out as bytes and
    compared with the expected ones (a column compare of bytes for a word of constant bytes:
    Word.constant_bytes); only a word that does not match pays for finding where."""
    rows = min(rows, (end - position) // row.size)
    if rows < 1:
        return 0
    ok = None
    size = row.size
    stop = position + rows * size
    for word in row.words:
        constant = word.constant_bytes
        if constant is not None:
            for column, value in constant:
                if data[position + column : stop : size].tobytes() != _BYTE[value] * rows:
                    break
            else:
                continue
        view = np.ndarray((rows,), "<u8", data, position + word.offset, (size,))
        masked = view & word.mask_u64
        if masked.tobytes() == word.expected_bytes(index, index + rows):
            continue
        matches = masked == word.expected(index, index + rows)
        ok = matches if ok is None else ok & matches
    if ok is None:
        return rows
    return int(np.argmin(ok))  # a word's bytes differed: some row is False


POSITIONS_KEPT_RECORDS_MAX = 16384  # sections up to this many records keep their positions


@functools.lru_cache(maxsize=64)
def _value_positions(run_shapes: tuple[tuple[int, int, int], ...]) -> I64:
    """Where each value starts, from the section's start, for records in these runs: the same
    for every batch of a producer's usual shape and count (one addition a batch instead of an
    arange a run and a concatenation)."""
    positions = _make_value_positions(run_shapes)
    positions.flags.writeable = False
    return positions


def _make_value_positions(run_shapes: Sequence[tuple[int, int, int]]) -> I64:
    parts = []
    position = 0
    for rows, size, value_column in run_shapes:
        parts.append(np.arange(position + value_column, position + value_column + rows * size,
                               size))
        position += rows * size
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def decode(data: U8, start: int, end: int, count: int) -> Decoded | None:
    """Decode a section of ``count`` same-shape records, or return None if it is not one."""
    raw = memoryview(data)
    shape = None
    timestamp_parts: list[I64] = []
    run_shapes: list[tuple[int, int, int]] = []  # (records, row size, value column)
    value_runs: list[tuple[int, int, int]] = []
    position = start
    index = 0
    runs = 0
    timestamp_size = 0
    key_gap = 0
    while index < count:
        band_end, offset_size = offset_band_end(index)
        # Guess that the run goes on in the same shape (the words check the guess), parse the
        # record where the guess fails.
        row = None
        if shape is not None:
            row = row_layout(shape, timestamp_size, offset_size)
            if row is not None and not _timestamp_fits(raw, position, end, row):
                row = None
        if row is None:
            parsed = _parse_first(raw, position, end, index)
            if parsed is None or (shape is not None and parsed[0] != shape):
                return None
            shape, timestamp_size = parsed
            row = row_layout(shape, timestamp_size, offset_size)
            if row is None:
                return None
        rows = _matching_rows(data, position, end, min(count, band_end) - index, index, row)
        if rows == 0:
            return None
        timestamp_parts.append(_timestamp_deltas(data, position, rows, row))
        run_shapes.append((rows, row.size, row.value_column))
        value_runs.append((position + row.value_column, rows, row.size))
        key_gap = row.value_column - row.key_column  # the same in every run (one shape)
        position += rows * row.size
        index += rows
        runs += 1
        if runs * RUN_RECORDS_MIN > count and runs > 4:
            return None
    if position != end or shape is None:
        return None
    values = (_value_positions(tuple(run_shapes)) if count <= POSITIONS_KEPT_RECORDS_MAX
              else _make_value_positions(run_shapes)) + start
    return Decoded(shape, timestamp_parts[0] if runs == 1 else np.concatenate(timestamp_parts),
                   values - key_gap if shape.key_length >= 0 else values, values, value_runs,
                   key_gap)
