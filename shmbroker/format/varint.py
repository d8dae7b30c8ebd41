"""Zig-zag LEB128 varints, as Kafka's records use them (protobuf's sint32 / sint64).

Encoding: ``z = (n << 1) ^ (n >> 63)`` (zig-zag, so small negative numbers stay short), then 7 bits
per byte, least significant group first, high bit set on every byte but the last.  A varint
(int32) takes at most 5 bytes, a varlong (int64) at most 10.

Two flavours of every operation: scalar (one value, for headers and slow paths) and vectorised
(numpy arrays of values and byte positions, O(bytes-per-varint) numpy calls for a whole batch).
Decoders treat their input as untrusted: overlong varints, values out of range and reads past the
end raise :class:`CorruptRecordError`.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from shmbroker.errors import CorruptRecordError

VARINT_BYTES_MAX = 5
VARLONG_BYTES_MAX = 10
_U64_MASK = (1 << 64) - 1
INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1

U8 = npt.NDArray[np.uint8]
I64 = npt.NDArray[np.int64]
U64 = npt.NDArray[np.uint64]

# Varint encodings of small non-negative numbers (offset deltas, lengths), computed once.
_SMALL_CACHE_SIZE = 1 << 14


def _encode_zigzag(value: int) -> bytes:
    return encode_varint_unsigned((value << 1) ^ (value >> 63))


def encode_varint_unsigned(z: int) -> bytes:
    """LEB128 bytes of an already zig-zagged (non-negative) value."""
    out = bytearray()
    while z >= 0x80:
        out.append((z & 0x7F) | 0x80)
        z >>= 7
    out.append(z)
    return bytes(out)


_SMALL = [_encode_zigzag(value) for value in range(_SMALL_CACHE_SIZE)]
MINUS_ONE = _encode_zigzag(-1)


def encode_varint(value: int) -> bytes:
    """Zig-zag varint bytes of ``value`` (any int64)."""
    if 0 <= value < _SMALL_CACHE_SIZE:
        return _SMALL[value]
    return _encode_zigzag(value)


def decode_varint(
    buffer: bytes | bytearray | memoryview, position: int, end: int,
    max_bytes: int = VARINT_BYTES_MAX,
) -> tuple[int, int]:
    """Decode the varint at ``position`` (not reading at or past ``end``); return (value, next).
    Of a 10th byte only the lowest bit lands within 64 bits: the rest is dropped, as Java's
    ``ByteUtils.readVarlong`` and :func:`read_varints` do."""
    shift = 0
    z = 0
    stop = min(end, position + max_bytes)
    for index in range(position, min(stop, position + 9)):
        byte = buffer[index]
        z |= (byte & 0x7F) << shift
        if byte < 0x80:
            return (z >> 1) ^ -(z & 1), index + 1
        shift += 7
    if stop - position >= 10 and buffer[position + 9] < 0x80:  # (a varlong's last byte)
        z = (z | buffer[position + 9] << 63) & _U64_MASK
        return (z >> 1) ^ -(z & 1), position + 10
    if end - position < max_bytes:
        raise CorruptRecordError(f"varint runs past the end of the records at byte {position}")
    raise CorruptRecordError(f"varint longer than {max_bytes} bytes at byte {position}")


# -- vectorised ---------------------------------------------------------------------------------

def zigzag(values: I64) -> U64:
    """Zig-zag transform of an int64 array (as uint64)."""
    values = values.astype(np.int64, copy=False)
    return ((values << 1) ^ (values >> 63)).view(np.uint64)


def unzigzag(z: U64) -> I64:
    z = z.astype(np.uint64, copy=False)
    return ((z >> np.uint64(1)).view(np.int64)) ^ -((z & np.uint64(1)).view(np.int64))


# SIZE_THRESHOLDS[k]: the smallest zig-zagged value whose varint takes k + 2 bytes.
SIZE_THRESHOLDS = np.array([1 << (7 * k) for k in range(1, 10)], dtype=np.uint64)


def varint_sizes(z: U64) -> I64:
    """Encoded size in bytes of each zig-zagged value."""
    return np.searchsorted(SIZE_THRESHOLDS, z, side="right").astype(np.int64) + 1


def write_varints(out: U8, positions: I64, z: U64, sizes: I64) -> None:
    """Write each ``z[i]`` as ``sizes[i]`` varint bytes at ``out[positions[i]]``."""
    if len(z) == 0:
        return
    size_max = int(sizes.max())
    if size_max == 1:
        out[positions] = z.astype(np.uint8)
        return
    for byte_index in range(size_max):
        if byte_index == 0:
            chosen_positions, chosen_z, chosen_sizes = positions, z, sizes
        else:
            chosen = sizes > byte_index
            chosen_positions = positions[chosen]
            chosen_z = z[chosen]
            chosen_sizes = sizes[chosen]
        group = (chosen_z >> np.uint64(7 * byte_index)) & np.uint64(0x7F)
        more = (chosen_sizes > byte_index + 1).astype(np.uint64) << np.uint64(7)
        out[chosen_positions + byte_index] = (group | more).astype(np.uint8)


def read_varints(
    data: U8, positions: I64, end: int, max_bytes: int = VARINT_BYTES_MAX
) -> tuple[I64, I64]:
    """Decode the varint at each position of ``data`` (never reading at or past ``end``).

    Returns (values, sizes).  Raises CorruptRecordError when a varint is longer than
    ``max_bytes`` or runs into ``end``.
    """
    count = len(positions)
    z = np.zeros(count, dtype=np.uint64)
    sizes = np.zeros(count, dtype=np.int64)
    if count == 0:
        return z.view(np.int64), sizes
    if int(positions.max()) >= end or int(positions.min()) < 0:
        raise CorruptRecordError("record field starts past the end of the records")
    active_index = np.arange(count)
    for byte_index in range(max_bytes):
        where = positions[active_index] + byte_index
        if int(where.max()) >= end:
            raise CorruptRecordError("varint runs past the end of the records")
        byte = data[where].astype(np.uint64)
        z[active_index] |= (byte & np.uint64(0x7F)) << np.uint64(7 * byte_index)
        finished = byte < 0x80
        sizes[active_index[finished]] = byte_index + 1
        active_index = active_index[~finished]
        if len(active_index) == 0:
            return unzigzag(z), sizes
    raise CorruptRecordError(f"varint longer than {max_bytes} bytes")


def check_int32(values: I64, what: str) -> None:
    if len(values) and (int(values.min()) < INT32_MIN or int(values.max()) > INT32_MAX):
        raise CorruptRecordError(f"{what} does not fit in 32 bits")
