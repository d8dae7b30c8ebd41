"""Zig-zag varints: scalar and vectorised flavours must agree, byte for byte and value for value.

The reference encoder below is written from the protobuf spec, independently of the module under
test, so a bug shared by both flavours still shows.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shmbroker.errors import CorruptRecordError
from shmbroker.format import varint
from shmbroker.format.varint import (
    VARINT_BYTES_MAX,
    VARLONG_BYTES_MAX,
    check_int32,
    decode_varint,
    encode_varint,
    read_varints,
    unzigzag,
    varint_sizes,
    write_varints,
    zigzag,
)

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def reference_encode(value: int) -> bytes:
    """protobuf sint64: zig-zag, then little-endian base-128 groups."""
    assert INT64_MIN <= value <= INT64_MAX
    z = (value << 1) if value >= 0 else ((-value) << 1) - 1
    out = bytearray()
    while True:
        group = z & 0x7F
        z >>= 7
        if z:
            out.append(group | 0x80)
        else:
            out.append(group)
            return bytes(out)


# value -> its encoding, from the protobuf documentation and Kafka's ByteUtilsTest
KNOWN = {
    0: b"\x00",
    -1: b"\x01",
    1: b"\x02",
    -2: b"\x03",
    63: b"\x7e",
    -64: b"\x7f",
    64: b"\x80\x01",
    -65: b"\x81\x01",
    8191: b"\xfe\x7f",
    8192: b"\x80\x80\x01",
    INT32_MAX: b"\xfe\xff\xff\xff\x0f",
    INT32_MIN: b"\xff\xff\xff\xff\x0f",
    INT64_MAX: b"\xfe\xff\xff\xff\xff\xff\xff\xff\xff\x01",
    INT64_MIN: b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",
}

EXTREMES = sorted(
    {0, 1, -1, 63, 64, -64, -65, 8191, 8192, 2**20 - 1, 2**20, INT32_MAX, INT32_MIN,
     INT32_MAX + 1, INT32_MIN - 1, 2**62, -(2**62), INT64_MAX, INT64_MIN, INT64_MAX - 1,
     INT64_MIN + 1}
    | {sign * (2 ** (7 * k) >> 1) + delta for k in range(1, 10) for sign in (1, -1)
       for delta in (-1, 0, 1)}
)
EXTREMES = [v for v in EXTREMES if INT64_MIN <= v <= INT64_MAX]

int64s = st.integers(INT64_MIN, INT64_MAX)
int32s = st.integers(INT32_MIN, INT32_MAX)


@pytest.mark.parametrize(("value", "encoded"), sorted(KNOWN.items()))
def test_known_encodings(value: int, encoded: bytes) -> None:
    assert reference_encode(value) == encoded
    assert encode_varint(value) == encoded
    max_bytes = VARINT_BYTES_MAX if INT32_MIN <= value <= INT32_MAX else VARLONG_BYTES_MAX
    assert decode_varint(encoded, 0, len(encoded), max_bytes) == (value, len(encoded))


@pytest.mark.parametrize("value", EXTREMES)
def test_scalar_round_trip_of_extremes(value: int) -> None:
    encoded = encode_varint(value)
    assert encoded == reference_encode(value)
    assert decode_varint(encoded, 0, len(encoded), VARLONG_BYTES_MAX) == (value, len(encoded))
    if INT32_MIN <= value <= INT32_MAX:
        assert len(encoded) <= VARINT_BYTES_MAX
        assert decode_varint(encoded, 0, len(encoded)) == (value, len(encoded))


def _vector_encode(values: list[int]) -> tuple[bytes, np.ndarray, np.ndarray]:
    """Vectorised encoding of ``values`` back to back: (bytes, positions, sizes)."""
    z = zigzag(np.array(values, dtype=np.int64))
    sizes = varint_sizes(z)
    positions = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    out = np.full(int(sizes.sum()), 0xAA, dtype=np.uint8)  # no byte may be left unwritten
    write_varints(out, positions, z, sizes)
    return out.tobytes(), positions, sizes


@pytest.mark.parametrize("values", [EXTREMES, list(range(-300, 300)), [INT64_MIN] * 3, [5]])
def test_vectorised_agrees_with_scalar_on_extremes(values: list[int]) -> None:
    check_agreement(values)


@settings(deadline=None, max_examples=200)
@given(st.lists(int64s | int32s | st.integers(-200, 200), min_size=1, max_size=60))
def test_vectorised_agrees_with_scalar(values: list[int]) -> None:
    check_agreement(values)


def check_agreement(values: list[int]) -> None:
    encoded, positions, sizes = _vector_encode(values)
    assert encoded == b"".join(reference_encode(v) for v in values)
    assert sizes.tolist() == [len(reference_encode(v)) for v in values]
    decoded, decoded_sizes = read_varints(
        np.frombuffer(encoded, dtype=np.uint8), positions, len(encoded), VARLONG_BYTES_MAX)
    assert decoded.dtype == np.int64
    assert decoded.tolist() == values
    assert decoded_sizes.tolist() == sizes.tolist()
    position = 0
    for value in values:
        scalar, position = decode_varint(encoded, position, len(encoded), VARLONG_BYTES_MAX)
        assert scalar == value
    assert position == len(encoded)
    assert unzigzag(zigzag(np.array(values, dtype=np.int64))).tolist() == values


def test_zigzag_maps_int64_extremes_to_the_ends_of_uint64() -> None:
    z = zigzag(np.array([0, -1, 1, INT64_MAX, INT64_MIN], dtype=np.int64))
    assert z.dtype == np.uint64
    assert z.tolist() == [0, 1, 2, 2**64 - 2, 2**64 - 1]
    assert varint_sizes(z).tolist() == [1, 1, 1, 10, 10]


def test_write_varints_of_nothing_writes_nothing() -> None:
    out = np.full(4, 7, dtype=np.uint8)
    empty = np.zeros(0, dtype=np.int64)
    write_varints(out, empty, empty.view(np.uint64), empty)
    assert out.tolist() == [7, 7, 7, 7]
    values, sizes = read_varints(out, empty, 4)
    assert len(values) == 0 and len(sizes) == 0


def test_write_varints_at_scattered_positions() -> None:
    values = [300, -1, INT32_MIN]
    z = zigzag(np.array(values, dtype=np.int64))
    sizes = varint_sizes(z)
    positions = np.array([20, 3, 9], dtype=np.int64)
    out = np.zeros(30, dtype=np.uint8)
    write_varints(out, positions, z, sizes)
    for position, value in zip(positions.tolist(), values, strict=True):
        encoded = reference_encode(value)
        assert out[position : position + len(encoded)].tobytes() == encoded
    decoded, _ = read_varints(out, positions, 30)
    assert decoded.tolist() == values


# -- untrusted input ----------------------------------------------------------------------------

@pytest.mark.parametrize(("max_bytes"), [VARINT_BYTES_MAX, VARLONG_BYTES_MAX])
def test_overlong_varint_is_corrupt(max_bytes: int) -> None:
    overlong = b"\x80" * max_bytes + b"\x00"  # one continuation byte too many
    with pytest.raises(CorruptRecordError, match="longer than"):
        decode_varint(overlong, 0, len(overlong), max_bytes)
    data = np.frombuffer(overlong, dtype=np.uint8)
    with pytest.raises(CorruptRecordError):
        read_varints(data, np.array([0], dtype=np.int64), len(overlong), max_bytes)
    # the same bytes one shorter are a valid (non-canonical) zero of exactly max_bytes bytes
    exact = b"\x80" * (max_bytes - 1) + b"\x00"
    assert decode_varint(exact, 0, len(exact), max_bytes) == (0, max_bytes)
    values, sizes = read_varints(np.frombuffer(exact, dtype=np.uint8),
                                 np.array([0], dtype=np.int64), len(exact), max_bytes)
    assert values.tolist() == [0] and sizes.tolist() == [max_bytes]


def test_int64_varint_is_rejected_where_an_int32_varint_is_expected() -> None:
    encoded = encode_varint(INT64_MAX)
    with pytest.raises(CorruptRecordError):
        decode_varint(encoded, 0, len(encoded))
    with pytest.raises(CorruptRecordError):
        read_varints(np.frombuffer(encoded, dtype=np.uint8), np.array([0], dtype=np.int64),
                     len(encoded))


@pytest.mark.parametrize("value", [64, -65, 8192, INT32_MIN, INT64_MAX, INT64_MIN])
def test_truncated_varint_is_corrupt(value: int) -> None:
    encoded = reference_encode(value)
    for cut in range(len(encoded)):
        truncated = encoded[:cut]
        with pytest.raises(CorruptRecordError):
            decode_varint(truncated, 0, len(truncated), VARLONG_BYTES_MAX)
        # the bytes are there, but ``end`` says they are not ours to read
        with pytest.raises(CorruptRecordError):
            decode_varint(encoded, 0, cut, VARLONG_BYTES_MAX)
        data = np.frombuffer(encoded, dtype=np.uint8)
        with pytest.raises(CorruptRecordError):
            read_varints(data, np.array([0], dtype=np.int64), cut, VARLONG_BYTES_MAX)


def test_read_varints_rejects_positions_outside_the_section() -> None:
    data = np.zeros(8, dtype=np.uint8)
    for positions in ([8], [0, 9], [-1], [0, -3]):
        with pytest.raises(CorruptRecordError):
            read_varints(data, np.array(positions, dtype=np.int64), 8)
    with pytest.raises(CorruptRecordError):  # inside the array, past ``end``
        read_varints(data, np.array([5], dtype=np.int64), 5)


def test_one_bad_varint_among_good_ones_is_found() -> None:
    good = b"".join(reference_encode(v) for v in range(100))
    data = np.frombuffer(good + b"\x80" * 6, dtype=np.uint8)
    positions = np.append(np.arange(100, dtype=np.int64), len(good))
    with pytest.raises(CorruptRecordError):
        read_varints(data, positions, len(data))


@settings(deadline=None, max_examples=300)
@given(st.binary(min_size=0, max_size=12), st.integers(0, 12))
def test_scalar_and_vectorised_agree_on_arbitrary_bytes(raw: bytes, end: int) -> None:
    """Whatever the bytes, both decoders raise CorruptRecordError or return the same thing."""
    end = min(end, len(raw))
    for max_bytes in (VARINT_BYTES_MAX, VARLONG_BYTES_MAX):
        try:
            scalar: tuple[int, int] | None = decode_varint(raw, 0, end, max_bytes)
        except CorruptRecordError:
            scalar = None
        try:
            values, sizes = read_varints(np.frombuffer(raw, dtype=np.uint8),
                                         np.array([0], dtype=np.int64), end, max_bytes)
            vector: tuple[int, int] | None = (int(values[0]), int(sizes[0]))
        except CorruptRecordError:
            vector = None
        # (a 10th byte above 1 carries bits past 64: both keep 64, as Java's readVarlong)
        assert scalar == vector, (raw, end, max_bytes)
        if scalar is not None:
            value, size = scalar
            assert 1 <= size <= min(max_bytes, end)
            assert raw[size - 1] < 0x80 and all(b >= 0x80 for b in raw[: size - 1])


def test_check_int32() -> None:
    check_int32(np.array([INT32_MIN, 0, INT32_MAX], dtype=np.int64), "offset delta")
    check_int32(np.zeros(0, dtype=np.int64), "offset delta")
    for bad in (INT32_MAX + 1, INT32_MIN - 1):
        with pytest.raises(CorruptRecordError, match="offset delta"):
            check_int32(np.array([0, bad], dtype=np.int64), "offset delta")


def test_small_value_cache_matches_reference() -> None:
    for value in range(0, 20000, 7):
        assert encode_varint(value) == reference_encode(value)
    assert varint.MINUS_ONE == b"\x01"


def test_a_tenth_byte_keeps_64_bits_as_java_does() -> None:
    """Java's ByteUtils.readVarlong shifts the 10th byte by 63 in a long: of 0x02 nothing is
    left (0), of an odd byte the lowest bit (zig-zag 2**63, which is 2**62).  Both decoders
    agree with it (the fuzz test found the scalar one giving 2**63, a value no int64 holds)."""
    for last, expected in ((0x02, 0), (0x03, 2**62), (0x01, 2**62), (0x7F, 2**62)):
        raw = b"\x80" * 9 + bytes((last,))
        assert decode_varint(raw, 0, len(raw), VARLONG_BYTES_MAX) == (expected, 10)
        values, sizes = read_varints(np.frombuffer(raw, dtype=np.uint8),
                                     np.array([0], dtype=np.int64), len(raw), VARLONG_BYTES_MAX)
        assert (int(values[0]), int(sizes[0])) == (expected, 10)
