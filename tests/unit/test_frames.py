"""Frames of the local sockets (shmbroker.protocol.frames): exact bytes, decoding, hostile input.

Expected bytes are built by hand with ``struct`` from the layout table, never with the code under
test.  Decoders are fed one byte at a time (h11's habit) as well as in large chunks.
"""

from __future__ import annotations

import random
import struct

import orjson
import pytest

from shmbroker import limits
from shmbroker.errors import ProtocolError
from shmbroker.protocol.frames import (
    HEADER_REST_SIZE,
    HEADER_SIZE,
    LENGTH_SIZE,
    Frame,
    FrameDecoder,
    FrameHeader,
    decode_body,
    encode_frame,
    frame_head,
    parse_header,
)

COMPACTION_THRESHOLD_BYTES = 1 << 20  # FrameDecoder compacts its buffer past this many bytes


def hand_frame(api_key: int, correlation_id: int, json_bytes: bytes = b"", raw: bytes = b"",
               api_version: int = 0, frame_length: int | None = None,
               json_length: int | None = None) -> bytes:
    """A frame built from the layout table; lengths may be overridden to lie."""
    if frame_length is None:
        frame_length = 12 + len(json_bytes) + len(raw)
    if json_length is None:
        json_length = len(json_bytes)
    return (struct.pack(">IHHII", frame_length, api_key, api_version, correlation_id,
                        json_length) + json_bytes + raw)


def decode_all(decoder: FrameDecoder) -> list[Frame]:
    frames = []
    while (frame := decoder.next_frame()) is not None:
        frames.append(frame)
    return frames


def as_tuple(frame: Frame) -> tuple[int, int, int, dict, bytes]:
    return (frame.api_key, frame.api_version, frame.correlation_id, frame.body, bytes(frame.raw))


# ------------------------------------------------------------------------------------------------
# layout and encoding
# ------------------------------------------------------------------------------------------------

def test_layout_constants() -> None:
    assert (HEADER_SIZE, LENGTH_SIZE, HEADER_REST_SIZE) == (16, 4, 12)


def test_encode_frame_exact_bytes() -> None:
    frame = encode_frame(21, 0x01020304, {"acks": 1}, b"RAW", api_version=3)
    assert frame == (b"\x00\x00\x00\x19"  # frame_length 12 + 10 + 3
                     b"\x00\x15"  # api_key 21
                     b"\x00\x03"  # api_version 3
                     b"\x01\x02\x03\x04"  # correlation_id
                     b"\x00\x00\x00\x0a"  # json_length
                     b'{"acks":1}' b"RAW")
    assert frame == hand_frame(21, 0x01020304, b'{"acks":1}', b"RAW", api_version=3)


@pytest.mark.parametrize("body", [None, {}])
def test_empty_body_has_no_json_part(body: dict | None) -> None:
    assert encode_frame(25, 7, body) == hand_frame(25, 7)
    assert len(encode_frame(25, 7, body)) == HEADER_SIZE


def test_encode_frame_extreme_header_values() -> None:
    frame = encode_frame(0xFFFF, 0xFFFFFFFF, {"k": "v"}, b"\x00", api_version=0xFFFF)
    assert frame == hand_frame(0xFFFF, 0xFFFFFFFF, b'{"k":"v"}', b"\x00", api_version=0xFFFF)


@pytest.mark.parametrize("raw", [b"", b"x", bytes(range(256)) * 5])
def test_frame_head_is_encode_frame_without_raw(raw: bytes) -> None:
    body = {"offset": 5, "nested": {"a": [1, 2, None]}, "text": "é"}
    head = frame_head(20, 99, body, raw_length=len(raw), api_version=1)
    assert head + raw == encode_frame(20, 99, body, raw, api_version=1)
    assert head == hand_frame(20, 99, orjson.dumps(body), api_version=1,
                              frame_length=12 + len(orjson.dumps(body)) + len(raw))


@pytest.mark.parametrize("raw_type", [bytes, bytearray, memoryview])
def test_encode_frame_accepts_any_buffer(raw_type: type) -> None:
    raw = raw_type(b"abc") if raw_type is not memoryview else memoryview(b"abc")
    assert encode_frame(1, 2, None, raw) == hand_frame(1, 2, raw=b"abc")


# ------------------------------------------------------------------------------------------------
# parse_header
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("buffer_type", [bytes, bytearray, memoryview])
def test_parse_header_reads_fields(buffer_type: type) -> None:
    data = hand_frame(5, 0xDEADBEEF, b"{}", b"raw!", api_version=2) + b"trailing"
    header = parse_header(buffer_type(data))
    assert header == FrameHeader(12 + 2 + 4, 5, 2, 0xDEADBEEF, 2)
    assert header.raw_length == 4
    assert header.total_length == 4 + 18


@pytest.mark.parametrize("size", [0, 1, 4, 15])
def test_parse_header_needs_sixteen_bytes(size: int) -> None:
    with pytest.raises(ProtocolError, match="16 bytes"):
        parse_header(hand_frame(1, 1)[:size])


@pytest.mark.parametrize("frame_length", [0, 1, 4, 11])
def test_frame_length_shorter_than_header_is_refused(frame_length: int) -> None:
    with pytest.raises(ProtocolError, match="shorter than its header"):
        parse_header(hand_frame(1, 1, frame_length=frame_length))


def test_frame_length_of_exactly_the_header_is_accepted() -> None:
    assert parse_header(hand_frame(1, 1, frame_length=12)).raw_length == 0


def test_json_length_past_the_frame_is_refused() -> None:
    with pytest.raises(ProtocolError, match="json_length 11 does not fit"):
        parse_header(hand_frame(1, 1, b"{}" * 5, frame_length=22, json_length=11))
    assert parse_header(hand_frame(1, 1, frame_length=22, json_length=10)).raw_length == 0


def test_json_length_past_its_own_limit_is_refused() -> None:
    too_long = limits.frame_json_bytes_max + 1
    data = hand_frame(1, 1, frame_length=12 + too_long + 10, json_length=too_long)
    with pytest.raises(ProtocolError, match="json_length"):
        parse_header(data)
    at_limit = limits.frame_json_bytes_max
    assert parse_header(hand_frame(1, 1, frame_length=12 + at_limit,
                                   json_length=at_limit)).json_length == at_limit


def test_frame_bytes_max_bounds_frame_length() -> None:
    assert parse_header(hand_frame(1, 1, frame_length=100), frame_bytes_max=100)
    with pytest.raises(ProtocolError, match="exceeds frame_bytes_max 100"):
        parse_header(hand_frame(1, 1, frame_length=101), frame_bytes_max=100)
    with pytest.raises(ProtocolError, match="exceeds frame_bytes_max"):
        parse_header(hand_frame(1, 1, frame_length=limits.frame_bytes_max + 1))
    with pytest.raises(ProtocolError):
        parse_header(hand_frame(1, 1, frame_length=0xFFFFFFFF))


# ------------------------------------------------------------------------------------------------
# decode_body
# ------------------------------------------------------------------------------------------------

def test_decode_body_of_nothing_is_empty_object() -> None:
    assert decode_body(b"") == {}
    assert decode_body(memoryview(b"")) == {}


@pytest.mark.parametrize("buffer_type", [bytes, bytearray, memoryview])
def test_decode_body_reads_an_object(buffer_type: type) -> None:
    assert decode_body(buffer_type(b'{"a": [1, "\xc3\xa9", null]}')) == {"a": [1, "é", None]}


@pytest.mark.parametrize("data", [b"[]", b"1", b'"text"', b"null", b"true", b"1.5"])
def test_decode_body_refuses_non_objects(data: bytes) -> None:
    with pytest.raises(ProtocolError, match="must be a JSON object"):
        decode_body(data)


@pytest.mark.parametrize("data", [
    b"{", b"{'a': 1}", b'{"a":1}x', b"NaN", b"\x00", b'{"a": "\xff"}', b'{"\xed\xa0\x80": 1}',
    b"\xef\xbb", b"[" * 5000, b"{" + b'"a":{' * 2000 + b"}" * 2001,
])
def test_decode_body_refuses_invalid_json_and_utf8(data: bytes) -> None:
    with pytest.raises(ProtocolError, match="not valid JSON"):
        decode_body(data)


# ------------------------------------------------------------------------------------------------
# FrameDecoder: well-formed streams
# ------------------------------------------------------------------------------------------------

SAMPLES = [
    hand_frame(1, 0),
    hand_frame(20, 1, b'{"offset":0,"max_bytes":1048576}'),
    hand_frame(21, 2, b'{"acks":-1}', bytes(range(256))),
    hand_frame(22, 0xFFFFFFFF, b"", b"only raw", api_version=0xFFFF),
    hand_frame(0xFFFF, 3, b'{"e":"\xc3\xa9"}'),
]
SAMPLE_TUPLES = [
    (1, 0, 0, {}, b""),
    (20, 0, 1, {"offset": 0, "max_bytes": 1048576}, b""),
    (21, 0, 2, {"acks": -1}, bytes(range(256))),
    (22, 0xFFFF, 0xFFFFFFFF, {}, b"only raw"),
    (0xFFFF, 0, 3, {"e": "é"}, b""),
]


def test_one_frame_in_one_chunk() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(SAMPLES[2])
    frame = decoder.next_frame()
    assert frame is not None
    assert isinstance(frame.raw, memoryview)
    assert as_tuple(frame) == SAMPLE_TUPLES[2]
    assert decoder.next_frame() is None
    assert decoder.buffered_bytes == 0


def test_one_byte_at_a_time() -> None:
    decoder = FrameDecoder()
    assert decoder.next_frame() is None
    got = []
    for frame_bytes in SAMPLES:
        for index in range(len(frame_bytes)):
            decoder.receive_data(frame_bytes[index:index + 1])
            frame = decoder.next_frame()
            if index < len(frame_bytes) - 1:
                assert frame is None, f"frame returned after {index + 1} of {len(frame_bytes)}"
                assert decoder.buffered_bytes == index + 1
            else:
                assert frame is not None, "whole frame not returned at its last byte"
                got.append(as_tuple(frame))
                assert decoder.buffered_bytes == 0
        assert decoder.next_frame() is None
    assert got == SAMPLE_TUPLES


def test_next_frame_may_be_called_many_times_while_waiting() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(SAMPLES[1][:HEADER_SIZE + 3])
    for _ in range(5):
        assert decoder.next_frame() is None
    decoder.receive_data(SAMPLES[1][HEADER_SIZE + 3:])
    frame = decoder.next_frame()
    assert frame is not None and as_tuple(frame) == SAMPLE_TUPLES[1]


def test_empty_receive_is_a_no_op() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(b"")
    assert decoder.next_frame() is None and decoder.buffered_bytes == 0
    decoder.receive_data(SAMPLES[0])
    decoder.receive_data(b"")
    assert as_tuple(decoder.next_frame()) == SAMPLE_TUPLES[0]  # type: ignore[arg-type]


def test_many_frames_in_one_chunk() -> None:
    stream = b"".join(SAMPLES) * 400
    decoder = FrameDecoder()
    decoder.receive_data(stream)
    frames = decode_all(decoder)
    assert [as_tuple(frame) for frame in frames] == SAMPLE_TUPLES * 400
    assert decoder.buffered_bytes == 0


def test_chunks_that_end_mid_header_and_mid_body() -> None:
    stream = b"".join(SAMPLES)
    cuts = [2, 4, 5, 15, 16, 17, 30, 31, len(stream) - 1]
    decoder = FrameDecoder()
    got = []
    for start, end in zip([0, *cuts], [*cuts, len(stream)]):
        decoder.receive_data(stream[start:end])
        got += [as_tuple(frame) for frame in decode_all(decoder)]
    assert got == SAMPLE_TUPLES


@pytest.mark.parametrize("chunk_type", [bytearray, memoryview])
def test_decoder_copies_what_it_is_given(chunk_type: type) -> None:
    chunk = bytearray(SAMPLES[2])
    decoder = FrameDecoder()
    decoder.receive_data(chunk if chunk_type is bytearray else memoryview(chunk))
    chunk[:] = bytes(len(chunk))  # the caller reuses its receive buffer
    assert as_tuple(decoder.next_frame()) == SAMPLE_TUPLES[2]  # type: ignore[arg-type]


def test_frames_larger_than_the_compaction_threshold() -> None:
    seed = 20240611
    rng = random.Random(seed)
    big_raw = [rng.randbytes(size) for size in
               (COMPACTION_THRESHOLD_BYTES + 1, 3 * COMPACTION_THRESHOLD_BYTES, 700_000)]
    frames_bytes = []
    expected = []
    for index, raw in enumerate(big_raw * 3):
        body = {"index": index}
        frames_bytes.append(encode_frame(21, index, body, raw))
        expected.append((21, 0, index, body, raw))
        frames_bytes.append(SAMPLES[1])
        expected.append(SAMPLE_TUPLES[1])
    stream = b"".join(frames_bytes)
    largest_frame = max(len(frame) for frame in frames_bytes)
    decoder = FrameDecoder()
    got: list[Frame] = []
    position = 0
    while position < len(stream):
        chunk = rng.randint(1, 300_000)
        decoder.receive_data(stream[position:position + chunk])
        position += chunk
        got += decode_all(decoder)
        # compaction keeps the buffer to about one frame plus one read
        assert len(decoder._buffer) <= 2 * (largest_frame + 300_000), f"seed {seed}"
    # earlier frames are unaffected by later compaction: their raw part is a copy
    assert [as_tuple(frame) for frame in got] == expected, f"seed {seed}"
    assert decoder.buffered_bytes == 0


def test_frame_exactly_at_frame_bytes_max() -> None:
    frame = hand_frame(21, 1, b"{}", b"r" * 86)  # frame_length 100
    decoder = FrameDecoder(frame_bytes_max=100)
    decoder.receive_data(frame * 2)
    assert len(decode_all(decoder)) == 2


def test_default_frame_bytes_max_comes_from_limits() -> None:
    assert FrameDecoder().frame_bytes_max == limits.frame_bytes_max
    assert FrameDecoder(123).frame_bytes_max == 123


# ------------------------------------------------------------------------------------------------
# FrameDecoder: hostile input
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("length", [0xFFFFFFFF, limits.frame_bytes_max + 1])
def test_giant_length_is_refused_after_four_bytes(length: int) -> None:
    announcement = struct.pack(">I", length)
    decoder = FrameDecoder()
    for index in range(3):
        decoder.receive_data(announcement[index:index + 1])
        assert decoder.next_frame() is None
    decoder.receive_data(announcement[3:])
    with pytest.raises(ProtocolError, match="exceeds frame_bytes_max"):
        decoder.next_frame()
    assert decoder.buffered_bytes == 4  # nothing of the announced frame was waited for


def test_small_frame_bytes_max_is_checked_after_four_bytes() -> None:
    decoder = FrameDecoder(frame_bytes_max=100)
    decoder.receive_data(struct.pack(">I", 101))
    with pytest.raises(ProtocolError, match="exceeds frame_bytes_max 100"):
        decoder.next_frame()


@pytest.mark.parametrize(("data", "fragment"), [
    (hand_frame(1, 1, frame_length=11), "shorter than its header"),
    (hand_frame(1, 1, frame_length=0), "shorter than its header"),
    (hand_frame(1, 1, b"{}", frame_length=13, json_length=2), "does not fit"),
    (hand_frame(1, 1, b"{}", json_length=0xFFFFFFFF), "does not fit"),
    (hand_frame(1, 1, b"[1,2]"), "must be a JSON object"),
    (hand_frame(1, 1, b"null"), "must be a JSON object"),
    (hand_frame(1, 1, b'"s"'), "must be a JSON object"),
    (hand_frame(1, 1, b'{"a":"\xff\xfe"}'), "not valid JSON"),
    (hand_frame(1, 1, b'{"a":1'), "not valid JSON"),
    (hand_frame(1, 1, b'{"a":1}', b"raw", json_length=9), "not valid JSON"),  # json eats raw
])
def test_hostile_frames_are_protocol_errors(data: bytes, fragment: str) -> None:
    for chunk_size in (len(data), 1):
        decoder = FrameDecoder()
        with pytest.raises(ProtocolError, match=fragment):
            for index in range(0, len(data), chunk_size):
                decoder.receive_data(data[index:index + chunk_size])
                decoder.next_frame()


def test_frames_before_a_bad_one_are_delivered() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(SAMPLES[1] + SAMPLES[2] + hand_frame(1, 1, b"[]") + SAMPLES[0])
    assert as_tuple(decoder.next_frame()) == SAMPLE_TUPLES[1]  # type: ignore[arg-type]
    assert as_tuple(decoder.next_frame()) == SAMPLE_TUPLES[2]  # type: ignore[arg-type]
    with pytest.raises(ProtocolError):
        decoder.next_frame()


def test_decoder_stays_broken_after_a_protocol_error() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(hand_frame(1, 1, frame_length=3))
    with pytest.raises(ProtocolError) as first:
        decoder.next_frame()
    for _ in range(3):
        with pytest.raises(ProtocolError) as again:
            decoder.next_frame()
        assert str(again.value) == str(first.value)
        with pytest.raises(ProtocolError):
            decoder.receive_data(SAMPLES[0])  # valid bytes do not repair it
    with pytest.raises(ProtocolError):
        decoder.next_frame()


def test_decoder_refuses_data_after_a_body_error() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(hand_frame(1, 1, b"\xff"))
    with pytest.raises(ProtocolError, match="not valid JSON"):
        decoder.next_frame()
    with pytest.raises(ProtocolError, match="not valid JSON"):
        decoder.receive_data(SAMPLES[0])
