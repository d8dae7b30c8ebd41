"""Pieces of Kafka's record encoding written from the protocol spec, independently of
``shmbroker.format``: the oracle that tests compare the codec against."""

from __future__ import annotations

Header = tuple[str, bytes | None]


def varint(value: int) -> bytes:
    """Zig-zag LEB128, spelled out from the spec (not the codec's own encoder)."""
    z = (value << 1) if value >= 0 else ((-value) << 1) - 1
    out = bytearray()
    while z >= 0x80:
        out.append((z & 0x7F) | 0x80)
        z >>= 7
    out.append(z)
    return bytes(out)


def headers_section(headers: list[Header]) -> bytes:
    """A record's headers section, written from the spec, not with encode_headers."""
    parts = [varint(len(headers))]
    for key, value in headers:
        parts += [varint(len(key.encode())), key.encode()]
        parts += [varint(-1)] if value is None else [varint(len(value)), value]
    return b"".join(parts)
