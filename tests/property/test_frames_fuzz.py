"""FrameDecoder properties: any split of valid frames decodes alike; hostile bytes are only ever
ProtocolError.

Hypothesis prints the failing example and a ``@reproduce_failure`` blob.  The seeded sweep at the
end prints its seed in every failure message; set ``SHMBROKER_FUZZ_SEED`` to replay one.
"""

from __future__ import annotations

import os
import random
import struct
from collections.abc import Callable
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shmbroker.errors import ProtocolError
from shmbroker.protocol.frames import Frame, FrameDecoder, decode_body, encode_frame, parse_header

SETTINGS = settings(max_examples=300, deadline=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
ROUND_TRIP_SETTINGS = settings(SETTINGS, max_examples=150)  # each example decodes ~10 KiB

json_scalars = (st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1)
                | st.text(max_size=20))
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
bodies = st.dictionaries(st.text(max_size=12), json_values, max_size=5)
frames = st.tuples(
    st.integers(0, 0xFFFF),  # api_key
    st.integers(0, 0xFFFF),  # api_version
    st.integers(0, 0xFFFFFFFF),  # correlation_id
    bodies,
    st.binary(max_size=3000),  # raw
)

FrameTuple = tuple[int, int, int, dict[str, Any], bytes]


def encode(frame: FrameTuple) -> bytes:
    api_key, api_version, correlation_id, body, raw = frame
    return encode_frame(api_key, correlation_id, body, raw, api_version=api_version)


def as_tuple(frame: Frame) -> FrameTuple:
    return (frame.api_key, frame.api_version, frame.correlation_id, frame.body, bytes(frame.raw))


def feed(decoder: FrameDecoder, chunks: list[bytes]) -> list[Frame]:
    """Feed every chunk, taking frames after each; ProtocolError propagates."""
    got = []
    for chunk in chunks:
        decoder.receive_data(chunk)
        while (frame := decoder.next_frame()) is not None:
            got.append(frame)
    return got


def split(stream: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(stream), *(cut % (len(stream) + 1) for cut in cuts)})
    return [stream[start:end] for start, end in zip(points, points[1:])]


def feed_hostile(data: bytes, cuts: list[int], frame_bytes_max: int | None) -> None:
    """Anything but ProtocolError escapes and fails the test; after one, the decoder stays broken
    and nothing it returned violates the frame layout."""
    decoder = FrameDecoder(frame_bytes_max)
    try:
        frames_got = feed(decoder, split(data, cuts))
    except ProtocolError:
        for action in (decoder.next_frame, lambda: decoder.receive_data(b"\0" * 16)):
            try:
                action()
            except ProtocolError:
                continue
            raise AssertionError("decoder not broken after a ProtocolError") from None
        return
    assert decoder.buffered_bytes <= len(data) - 16 * len(frames_got)
    for frame in frames_got:
        assert isinstance(frame.body, dict)
        assert 0 <= frame.api_key <= 0xFFFF and 0 <= frame.correlation_id <= 0xFFFFFFFF


# ------------------------------------------------------------------------------------------------
# valid streams
# ------------------------------------------------------------------------------------------------

@ROUND_TRIP_SETTINGS
@given(st.lists(frames, min_size=1, max_size=8), st.lists(st.integers(0, 2**32), max_size=40))
def test_any_split_decodes_to_the_same_frames(sequence: list[FrameTuple],
                                              cuts: list[int]) -> None:
    stream = b"".join(encode(frame) for frame in sequence)
    decoder = FrameDecoder()
    got = feed(decoder, split(stream, cuts))
    assert [as_tuple(frame) for frame in got] == sequence
    assert decoder.buffered_bytes == 0 and decoder.next_frame() is None


@ROUND_TRIP_SETTINGS
@given(st.lists(frames, min_size=1, max_size=4))
def test_one_byte_at_a_time_decodes_to_the_same_frames(sequence: list[FrameTuple]) -> None:
    stream = b"".join(encode(frame) for frame in sequence)
    decoder = FrameDecoder()
    got = feed(decoder, [stream[index:index + 1] for index in range(len(stream))])
    assert [as_tuple(frame) for frame in got] == sequence


@ROUND_TRIP_SETTINGS
@given(st.lists(frames, min_size=1, max_size=4), st.lists(st.integers(0, 2**32), max_size=10))
def test_tightest_frame_bytes_max_still_decodes(sequence: list[FrameTuple],
                                                cuts: list[int]) -> None:
    encoded = [encode(frame) for frame in sequence]
    tightest = max(len(frame) - 4 for frame in encoded)
    got = feed(FrameDecoder(tightest), split(b"".join(encoded), cuts))
    assert [as_tuple(frame) for frame in got] == sequence


# ------------------------------------------------------------------------------------------------
# hostile streams
# ------------------------------------------------------------------------------------------------

@st.composite
def plausible_garbage(draw: st.DrawFn) -> bytes:
    """A header with small, possibly lying lengths, then random or almost-JSON bytes."""
    frame_length = draw(st.integers(0, 300))
    json_length = draw(st.integers(0, 300))
    header = struct.pack(">IHHII", frame_length, draw(st.integers(0, 0xFFFF)),
                         draw(st.integers(0, 0xFFFF)), draw(st.integers(0, 0xFFFFFFFF)),
                         json_length)
    payload = draw(st.binary(max_size=600)
                   | st.builds(lambda value, tail: orjson.dumps(value) + tail, json_values,
                               st.binary(max_size=20)))
    return header + payload


@st.composite
def mutated_stream(draw: st.DrawFn) -> bytes:
    """Valid frames with bytes overwritten, dropped or inserted."""
    stream = bytearray(b"".join(encode(frame) for frame in draw(st.lists(frames, min_size=1,
                                                                             max_size=3))))
    for _ in range(draw(st.integers(1, 4))):
        position = draw(st.integers(0, len(stream) - 1))
        action = draw(st.sampled_from(["overwrite", "delete", "insert"]))
        if action == "overwrite":
            stream[position] = draw(st.integers(0, 255))
        elif action == "delete":
            del stream[position]
        else:
            stream.insert(position, draw(st.integers(0, 255)))
        if not stream:
            break
    return bytes(stream)


hostile_inputs = st.binary(max_size=2000) | plausible_garbage() | mutated_stream() | st.lists(
    plausible_garbage(), min_size=1, max_size=5).map(b"".join)


@SETTINGS
@given(hostile_inputs, st.lists(st.integers(0, 2**32), max_size=20),
       st.sampled_from([None, 16, 64, 300, 1000]))
def test_hostile_bytes_raise_only_protocol_error(data: bytes, cuts: list[int],
                                                 frame_bytes_max: int | None) -> None:
    feed_hostile(data, cuts, frame_bytes_max)


@SETTINGS
@given(st.binary(max_size=200))
def test_parse_header_and_decode_body_raise_only_protocol_error(data: bytes) -> None:
    try:
        header = parse_header(data, 1000)
    except ProtocolError:
        pass
    else:
        assert 12 <= header.frame_length <= 1000
        assert 0 <= header.json_length <= header.frame_length - 12
        assert header.raw_length >= 0
    try:
        body = decode_body(data)
    except ProtocolError:
        pass
    else:
        assert isinstance(body, dict)


def test_seeded_sweep_of_random_bytes() -> None:
    seed = int(os.environ.get("SHMBROKER_FUZZ_SEED", "20260611"))
    rng = random.Random(seed)
    for iteration in range(3000):
        size = rng.choice([rng.randint(0, 32), rng.randint(0, 4000)])
        data = bytearray(rng.randbytes(size))
        if len(data) >= 16 and rng.random() < 0.7:  # make the lengths plausible
            struct.pack_into(">I", data, 0, rng.randint(0, len(data)))
            struct.pack_into(">I", data, 12, rng.randint(0, len(data)))
        cuts = [rng.randint(0, size) for _ in range(rng.randint(0, 10))]
        try:
            feed_hostile(bytes(data), cuts, rng.choice([None, 64, 1000]))
        except Exception as error:
            raise AssertionError(f"SHMBROKER_FUZZ_SEED={seed} iteration {iteration}: "
                                 f"{type(error).__name__}: {error}") from error


# ------------------------------------------------------------------------------------------------
# frames(): the batch form the connections use must agree with next_frame() exactly
# ------------------------------------------------------------------------------------------------

def outcome(take: Callable[[FrameDecoder], list[Frame]], chunks: list[bytes],
            frame_bytes_max: int | None) -> tuple[list[FrameTuple], str | None, int]:
    """(frames, error message or None, bytes left buffered) of feeding ``chunks``."""
    decoder = FrameDecoder(frame_bytes_max)
    got: list[Frame] = []
    try:
        for chunk in chunks:
            decoder.receive_data(chunk)
            got += take(decoder)
    except ProtocolError as error:
        return [as_tuple(frame) for frame in got], str(error), -1
    return [as_tuple(frame) for frame in got], None, decoder.buffered_bytes


def one_by_one(decoder: FrameDecoder) -> list[Frame]:
    found = []
    while (frame := decoder.next_frame()) is not None:
        found.append(frame)
    return found


@SETTINGS
@given(st.lists(frames, min_size=1, max_size=6) | hostile_inputs.map(lambda data: [data]),
       st.lists(st.integers(0, 2**32), max_size=20), st.sampled_from([None, 16, 64, 300]))
def test_frames_batch_agrees_with_next_frame(sequence: list[Any], cuts: list[int],
                                             frame_bytes_max: int | None) -> None:
    stream = b"".join(encode(item) if isinstance(item, tuple) else item for item in sequence)
    chunks = split(stream, cuts)
    batch = outcome(FrameDecoder.frames, chunks, frame_bytes_max)
    single = outcome(one_by_one, chunks, frame_bytes_max)
    # a batch that fails part-way returns none of its frames (the connection closes anyway)
    if batch[1] is not None:
        assert single[1] == batch[1] and single[0][:len(batch[0])] == batch[0]
    else:
        assert batch == single
