"""Frames on the local Unix sockets (``broker.sock`` and every worker's socket), sans-IO.

Byte layout of one frame (all integers big-endian, as Kafka's wire protocol)::

    offset  size  field
    0       4     frame_length   bytes after this field (rest of header, json, raw)
    4       2     api_key        which request (protocol.messages.ApiKey); a response repeats it
    6       2     api_version    version of that request's body (0 today)
    8       4     correlation_id chosen by the client, echoed in the response
    12      4     json_length    bytes of the JSON part, <= frame_json_bytes_max
    16      J     json           a JSON object (orjson), the message's fields
    16+J    R     raw            the rest: raw bytes (RecordBatch v2 batches), possibly empty

A fetch response is a frame whose raw part is a range of a segment file: the worker sends the
first ``16 + J`` bytes and then ``os.sendfile`` for the rest; readers see one ordinary frame.

:class:`FrameDecoder` is a sans-IO state machine (after h11): the caller feeds whatever bytes
arrived with :meth:`FrameDecoder.receive_data` and takes whole frames with
:meth:`FrameDecoder.next_frame`; it never touches a socket.  Buffered input is capped: a frame
announcing more than ``frame_bytes_max`` is a :class:`ProtocolError` before any of it is buffered.
"""

from __future__ import annotations

import struct
from typing import Any, NamedTuple

import orjson

from shmbroker import limits
from shmbroker.errors import ProtocolError

HEADER = struct.Struct(">IHHII")
HEADER_SIZE = HEADER.size  # 16
LENGTH_SIZE = 4
# frame_length counts the header fields after itself too.
HEADER_REST_SIZE = HEADER_SIZE - LENGTH_SIZE


class FrameHeader(NamedTuple):
    frame_length: int
    api_key: int
    api_version: int
    correlation_id: int
    json_length: int

    @property
    def raw_length(self) -> int:
        return self.frame_length - HEADER_REST_SIZE - self.json_length

    @property
    def total_length(self) -> int:
        return LENGTH_SIZE + self.frame_length


class Frame(NamedTuple):
    api_key: int
    api_version: int
    correlation_id: int
    body: dict[str, Any]
    raw: memoryview


def parse_header(data: bytes | bytearray | memoryview, frame_bytes_max: int | None = None
                 ) -> FrameHeader:
    """Read and check the 16-byte header at the start of ``data``."""
    if len(data) < HEADER_SIZE:
        raise ProtocolError(f"frame header needs {HEADER_SIZE} bytes, got {len(data)}")
    header = FrameHeader(*HEADER.unpack_from(data, 0))
    limit = limits.frame_bytes_max if frame_bytes_max is None else frame_bytes_max
    if header.frame_length > limit:
        raise ProtocolError(
            f"frame of {header.frame_length} bytes exceeds frame_bytes_max {limit}")
    if header.frame_length < HEADER_REST_SIZE:
        raise ProtocolError(f"frame_length {header.frame_length} is shorter than its header")
    if header.json_length > min(limits.frame_json_bytes_max,
                                header.frame_length - HEADER_REST_SIZE):
        raise ProtocolError(
            f"json_length {header.json_length} does not fit the frame of "
            f"{header.frame_length} bytes (or exceeds {limits.frame_json_bytes_max})")
    return header


def decode_body(data: bytes | bytearray | memoryview) -> dict[str, Any]:
    """The JSON part of a frame: an object, else ProtocolError."""
    if not len(data):
        return {}
    try:
        body = orjson.loads(data)
    except orjson.JSONDecodeError as error:
        raise ProtocolError(f"frame body is not valid JSON: {error}") from None
    if not isinstance(body, dict):
        raise ProtocolError(f"frame body must be a JSON object, not {type(body).__name__}")
    return body


def frame_head(api_key: int, correlation_id: int, body: dict[str, Any] | None = None,
               raw_length: int = 0, api_version: int = 0) -> bytes:
    """Header + JSON of a frame whose ``raw_length`` raw bytes the caller sends next."""
    json_bytes = orjson.dumps(body) if body else b""
    return HEADER.pack(HEADER_REST_SIZE + len(json_bytes) + raw_length, api_key, api_version,
                       correlation_id, len(json_bytes)) + json_bytes


def encode_frame(api_key: int, correlation_id: int, body: dict[str, Any] | None = None,
                 raw: bytes | bytearray | memoryview = b"", api_version: int = 0) -> bytes:
    """One whole frame as bytes (small frames; big raw parts go out with writev/sendfile)."""
    head = frame_head(api_key, correlation_id, body, len(raw), api_version)
    return head + bytes(raw) if len(raw) else head


class FrameDecoder:
    """Splits a byte stream into frames.

    Invariants: ``self._buffer[self._start:]`` holds the bytes received and not yet returned;
    never more than one frame's worth (``frame_bytes_max`` + header) plus one read is buffered,
    because the header is checked as soon as it is complete.  After a ProtocolError the decoder
    is broken and raises again (the caller answers with an error frame and closes).
    """

    def __init__(self, frame_bytes_max: int | None = None) -> None:
        self.frame_bytes_max = (limits.frame_bytes_max if frame_bytes_max is None
                                else frame_bytes_max)
        self._buffer = bytearray()
        self._start = 0
        self._header: tuple[int, int, int, int, int] | None = None
        self._error: ProtocolError | None = None

    @property
    def buffered_bytes(self) -> int:
        return len(self._buffer) - self._start

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        if self._error is not None:
            raise self._error
        if self._start and self._start == len(self._buffer):
            self._buffer.clear()
            self._start = 0
        self._buffer += data

    def next_frame(self) -> Frame | None:
        """The next whole frame, or None until more bytes arrive.  ProtocolError on bad input."""
        if self._error is not None:
            raise self._error
        try:
            return self._next_frame()
        except ProtocolError as error:
            self._error = error
            raise

    def frames(self) -> list[Frame]:
        """Every whole frame buffered, as :meth:`next_frame` returns them one by one."""
        found: list[Frame] = []
        while (frame := self.next_frame()) is not None:
            found.append(frame)
        return found

    def _next_frame(self) -> Frame | None:
        # (the hot path of every request: plain tuples and locals; checks as parse_header's)
        buffer = self._buffer
        start = self._start
        available = len(buffer) - start
        header = self._header
        if header is None:
            if available < HEADER_SIZE:
                if available >= LENGTH_SIZE:  # refuse a giant length before it is buffered
                    (length,) = struct.unpack_from(">I", buffer, start)
                    if length > self.frame_bytes_max:
                        raise ProtocolError(
                            f"frame of {length} bytes exceeds frame_bytes_max "
                            f"{self.frame_bytes_max}")
                return None
            header = HEADER.unpack_from(buffer, start)
            frame_length, _, _, _, json_length = header
            if (frame_length > self.frame_bytes_max or frame_length < HEADER_REST_SIZE
                    or json_length > frame_length - HEADER_REST_SIZE
                    or json_length > limits.frame_json_bytes_max):
                parse_header(memoryview(buffer)[start:], self.frame_bytes_max)  # raises
                raise AssertionError("parse_header accepted a header the fast path refused")
            self._header = header
        frame_length, api_key, api_version, correlation_id, json_length = header
        end = start + LENGTH_SIZE + frame_length
        if len(buffer) < end:
            return None
        json_start = start + HEADER_SIZE
        json_end = json_start + json_length
        if json_length:
            with memoryview(buffer) as view:
                body = decode_body(view[json_start:json_end])
        else:
            body = {}
        # a slice of a bytearray is a private, writable copy: the one copy the raw part needs
        # (a worker rewrites base offsets in it before appending)
        raw = memoryview(buffer[json_end:end])
        self._start = end
        self._header = None
        if end > 1 << 20 and end * 2 > len(buffer):
            del buffer[:end]
            self._start = 0
        return Frame(api_key, api_version, correlation_id, body, raw)
