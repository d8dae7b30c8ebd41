"""Hostile bytes: every reader may raise CorruptRecordError and nothing else.

Inputs are random bytes and mutations of valid batches -- bit flips, truncation, extension,
header fields overwritten (batch_length, records_count, last_offset_delta, magic, attributes) and
record bytes overwritten -- each both with the CRC left stale and with the CRC recomputed, so
that the record parser itself (not just the CRC check) meets the damage.  For compressed
batches the records section is also damaged *before* recompression.  Whenever a reader accepts
a mutant, what it returns must be self-consistent.

Hypothesis prints the failing example and a ``@reproduce_failure`` blob; the seeded sweep at the
end prints its seed in every failure message.
"""

from __future__ import annotations

import itertools
import os
import struct
import zlib
from collections.abc import Callable

import lz4.frame
import numpy as np
import zstandard
from crc32c import crc32c
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from shmbroker.errors import CorruptRecordError
from shmbroker.format import record_batch as rb

CODECS = ("none", "gzip", "lz4", "zstd")
SETTINGS = settings(deadline=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# header fields a mutation may overwrite: name -> (position, struct format)
FIELDS = {
    "batch_length": (8, ">i"),
    "magic": (16, ">b"),
    "attributes": (21, ">h"),
    "last_offset_delta": (23, ">i"),
    "base_timestamp": (27, ">q"),
    "records_count": (57, ">i"),
}
BOUNDS = {"i": (-(2**31), 2**31 - 1), "b": (-128, 127), "h": (-(2**15), 2**15 - 1),
          "q": (-(2**63), 2**63 - 1)}


# ------------------------------------------------------------------------------------------------
# readers and the consistency of what they return
# ------------------------------------------------------------------------------------------------

def attempt(read: Callable[[], object]) -> object | None:
    """Run one reader: CorruptRecordError -> None; any other exception fails the test."""
    try:
        return read()
    except CorruptRecordError:
        return None


def read_everything(buffer: bytes | bytearray, position: int = 0) -> None:
    """Every reader over ``buffer``; check whatever they accept."""
    header = attempt(lambda: rb.read_header(buffer, position))
    validated = attempt(lambda: rb.validate_batch(buffer, position))
    if validated is not None:
        assert validated == header
    for verify_crc in (True, False):
        columns = attempt(lambda verify=verify_crc: rb.decode_columnar(buffer, position,
                                                                       verify_crc=verify))
        records = attempt(lambda verify=verify_crc: rb.decode_batch(buffer, position,
                                                                    verify_crc=verify))
        assert (columns is None) == (records is None), "decode_batch and decode_columnar disagree"
        if columns is not None:
            check_consistent(buffer, position, columns, records)  # type: ignore[arg-type]
        if verify_crc and validated is None:
            assert columns is None, "decoded a batch that does not validate"
        if (not verify_crc and header is not None
                and position + header.size <= len(buffer)):  # type: ignore[attr-defined]
            rows = attempt(lambda: rb.decode_rows(buffer, position, header))
            if rows is not None and records is not None:
                assert rows == records, "decode_rows and decode_batch disagree"
    walked = attempt(lambda: list(rb.iter_batch_positions(buffer, position)))
    if walked:
        at = position
        for batch_position, batch_header in walked:  # type: ignore[attr-defined]
            assert batch_position == at and batch_header.size >= rb.HEADER_SIZE
            at += batch_header.size
        assert at <= len(buffer)
    for min_offset in (0, 2):
        iterated = attempt(lambda least=min_offset: list(rb.iter_records(buffer, position,
                                                                          min_offset=least)))
        if iterated:
            assert all(r.offset >= min_offset for r in iterated)  # type: ignore[attr-defined]


def check_consistent(buffer: bytes | bytearray, position: int, columns: rb.ColumnarBatch,
                     records: list[rb.Record]) -> None:
    header = columns.header
    count = len(columns)
    assert count == header.records_count == len(records)
    data = columns.data
    offsets = columns.offsets.tolist()
    assert all(a < b for a, b in itertools.pairwise(offsets)), "offsets must increase"
    if count:
        assert header.base_offset <= offsets[0]
        assert offsets[-1] <= header.base_offset + header.last_offset_delta
    if header.codec == rb.CODEC_NONE:  # zero copy: fields lie inside this batch's records
        low, high = position + rb.HEADER_SIZE, position + header.size
    else:
        low, high = 0, len(data)
    for positions, lengths in ((columns.key_positions, columns.key_lengths),
                               (columns.value_positions, columns.value_lengths)):
        for start, length in zip(positions.tolist(), lengths.tolist(), strict=True):
            assert length >= -1
            if length >= 0:
                assert low <= start and start + length <= high
    for index, record in enumerate(records):
        assert record.offset == offsets[index]
        assert record.value == columns.value(index)
        length = int(columns.key_lengths[index])
        start = int(columns.key_positions[index])
        assert record.key == (None if length < 0 else data[start : start + length].tobytes())
        assert len(record.headers) == int(columns.header_counts[index])
        if header.is_log_append_time:
            assert record.timestamp_ms == header.max_timestamp
    view = columns.values_equal_size()
    if view is not None:
        assert view.tolist() == [list(r.value) for r in records]  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------
# valid batches and their mutants
# ------------------------------------------------------------------------------------------------

@st.composite
def valid_batches(draw: st.DrawFn) -> bytearray:
    count = draw(st.integers(1, 12))
    equal = draw(st.booleans())
    if equal:
        size = draw(st.integers(0, 12))
        values: list[bytes | None] = [bytes([i]) * size for i in range(count)]
    else:
        values = draw(st.lists(st.none() | st.binary(max_size=20), min_size=count,
                               max_size=count))
    keys = draw(st.none() | st.lists(st.none() | st.binary(max_size=6), min_size=count,
                                     max_size=count))
    headers = draw(st.none() | st.lists(
        st.lists(st.tuples(st.text(max_size=4), st.none() | st.binary(max_size=4)),
                 max_size=2), min_size=count, max_size=count))
    stamps = draw(st.lists(st.integers(-(2**45), 2**45), min_size=count, max_size=count)
                  | st.integers(0, 2**41))
    return rb.encode_batch(values, keys=keys, headers=headers, timestamps=stamps,
                           codec=draw(st.sampled_from(CODECS)),
                           log_append_time=draw(st.booleans()),
                           base_offset=draw(st.integers(0, 2**40)))


def recompute_crc(batch: bytearray) -> None:
    if len(batch) < rb.HEADER_SIZE:
        return
    size = struct.unpack_from(">i", batch, 8)[0] + 12
    end = size if rb.HEADER_SIZE <= size <= len(batch) else len(batch)
    struct.pack_into(">I", batch, 17, crc32c(bytes(batch[21:end])))


def compress(codec: int, data: bytes) -> bytes:
    """Independent of the codec module: the containers Kafka uses."""
    if codec == 1:
        return zlib.compress(data, wbits=31)
    if codec == 3:
        return lz4.frame.compress(data)  # type: ignore[no-any-return]
    if codec == 4:
        return zstandard.ZstdCompressor().compress(data)
    return data


def inflate(codec: int, data: bytes) -> bytes:
    if codec == 1:
        return zlib.decompress(data, wbits=31)
    if codec == 3:
        return lz4.frame.decompress(data)  # type: ignore[no-any-return]
    if codec == 4:
        return zstandard.ZstdDecompressor().stream_reader(data).read()  # type: ignore[no-any-return]
    return data


def with_section(batch: bytearray, section: bytes) -> bytearray:
    """The batch with its (uncompressed) records section replaced, recompressed, CRC fixed."""
    codec = batch[22] & 0x07
    out = bytearray(batch[: rb.HEADER_SIZE]) + compress(codec, section)
    struct.pack_into(">i", out, 8, len(out) - 12)
    recompute_crc(out)
    return out


@st.composite
def mutants(draw: st.DrawFn) -> tuple[bytearray, str]:
    batch = draw(valid_batches())
    kind = draw(st.sampled_from(["flip", "truncate", "extend", "field", "overwrite",
                                 "section"]))
    if kind == "flip":
        anywhere = st.integers(0, len(batch) - 1)
        in_records = st.integers(rb.HEADER_SIZE, len(batch) - 1)  # hypothesis favours small
        for index in draw(st.lists(anywhere | in_records, min_size=1, max_size=4)):
            batch[index] ^= 1 << draw(st.integers(0, 7))
    elif kind == "truncate":
        del batch[draw(st.integers(0, len(batch) - 1)):]
    elif kind == "extend":
        batch += draw(st.binary(min_size=1, max_size=40))
        if draw(st.booleans()):  # and claim the extra bytes as records
            struct.pack_into(">i", batch, 8, len(batch) - 12)
    elif kind == "field":
        for name in draw(st.lists(st.sampled_from(sorted(FIELDS)), min_size=1, max_size=3,
                                  unique=True)):
            at, fmt = FIELDS[name]
            current = struct.unpack_from(fmt, batch, at)[0]
            low, high = BOUNDS[fmt[-1]]
            value = draw(st.integers(low, high)
                         | st.integers(max(low, current - 3), min(high, current + 3))
                         | st.sampled_from([low, high, 0, -1, 1, 2]))
            struct.pack_into(fmt, batch, at, value)
    elif kind == "overwrite":
        start = draw(st.integers(rb.HEADER_SIZE, len(batch) - 1))
        patch = draw(st.binary(min_size=1, max_size=8))
        batch[start : start + len(patch)] = patch
    else:  # damage the records section itself, then recompress
        section = inflate(batch[22] & 0x07, bytes(batch[rb.HEADER_SIZE :]))
        start = draw(st.integers(0, max(len(section) - 1, 0)))
        patch = draw(st.binary(min_size=1, max_size=6))
        cut = draw(st.sampled_from(["replace", "insert", "delete"]))
        if cut == "replace":
            section = section[:start] + patch + section[start + len(patch) :]
        elif cut == "insert":
            section = section[:start] + patch + section[start:]
        else:
            section = section[:start] + section[start + len(patch) :]
        return with_section(batch, section), kind
    crc = draw(st.sampled_from(["stale", "recomputed"]))
    if crc == "recomputed":
        recompute_crc(batch)
    return batch, f"{kind}/{crc}"


# ------------------------------------------------------------------------------------------------
# the properties
# ------------------------------------------------------------------------------------------------

@settings(SETTINGS, max_examples=300)
@given(st.binary(max_size=200))
def test_random_bytes(raw: bytes) -> None:
    read_everything(raw)
    read_everything(bytearray(raw))


@settings(SETTINGS, max_examples=300)
@given(st.binary(min_size=61, max_size=120), st.integers(0, 7), st.integers(0, 30))
def test_random_bytes_behind_a_plausible_header(raw: bytes, codec: int, count: int) -> None:
    """Random records under a header that passes every header check and carries a valid CRC,
    so the random bytes reach the decompressors and the record parser."""
    batch = bytearray(raw)
    struct.pack_into(">i", batch, 8, len(batch) - 12)
    struct.pack_into(">b", batch, 16, 2)
    struct.pack_into(">h", batch, 21, codec)
    struct.pack_into(">i", batch, 23, max(count - 1, 0))
    struct.pack_into(">i", batch, 57, count)
    recompute_crc(batch)
    read_everything(batch)


@settings(SETTINGS, max_examples=600)
@given(mutants())
def test_mutated_batches(mutant: tuple[bytearray, str]) -> None:
    batch, kind = mutant
    decoded = attempt(lambda: rb.decode_columnar(batch))
    event(f"{kind}: {'decoded' if decoded is not None else 'rejected'}")
    read_everything(batch)
    read_everything(b"\x00" * 5 + bytes(batch), 5)


@settings(SETTINGS, max_examples=150)
@given(st.lists(valid_batches(), min_size=1, max_size=4), st.data())
def test_mutated_batch_among_others(batches: list[bytearray], data: st.DataObject) -> None:
    """One damaged batch among good ones: iter_batch_positions either raises or yields only
    batches that validate; whole batches before the damage are always found."""
    victim = data.draw(st.integers(0, len(batches) - 1))
    damaged = bytearray(batches[victim])
    index = data.draw(st.integers(0, len(damaged) - 1))
    damaged[index] ^= 1 << data.draw(st.integers(0, 7))
    buffer = b"".join(bytes(b) for b in batches[:victim]) + damaged + b"".join(
        bytes(b) for b in batches[victim + 1 :])
    walk = rb.iter_batch_positions(buffer)
    found = []
    try:
        for position, header in walk:
            assert rb.validate_batch(buffer, position) == header
            found.append(position)
    except CorruptRecordError:
        pass
    good_prefix = list(np.cumsum([0] + [len(b) for b in batches[:victim]])[:-1])
    assert found[: len(good_prefix)] == good_prefix
    read_everything(buffer)


def test_seeded_mutation_sweep() -> None:
    """Many cheap mutants of a few batches from a seeded generator (seed in every message;
    replay with SHMBROKER_FUZZ_SEED=<seed>)."""
    seed = int(os.environ.get("SHMBROKER_FUZZ_SEED", "20260611"))
    rng = np.random.default_rng(seed)
    bases = [
        rb.encode_batch([b"a" * 8] * 70, timestamps=5, codec=codec) for codec in CODECS
    ] + [
        rb.encode_batch([b"x" * int(n) for n in rng.integers(0, 30, 20)],
                        keys=[None, b"k"] * 10, headers=[[("h", b"v")], []] * 10,
                        timestamps=[int(t) for t in rng.integers(-(2**40), 2**40, 20)],
                        codec=codec) for codec in CODECS
    ]
    for trial in range(1500):
        base = bases[trial % len(bases)]
        batch = bytearray(base)
        for _ in range(int(rng.integers(1, 4))):
            index = int(rng.integers(0, len(batch)))
            batch[index] = int(rng.integers(0, 256))
        if rng.random() < 0.3:
            name = sorted(FIELDS)[int(rng.integers(0, len(FIELDS)))]
            at, fmt = FIELDS[name]
            low, high = BOUNDS[fmt[-1]]
            struct.pack_into(fmt, batch, at, int(rng.integers(low, high, endpoint=True)))
        if rng.random() < 0.7:
            recompute_crc(batch)
        try:
            read_everything(batch)
        except AssertionError as error:
            raise AssertionError(f"seed {seed}, trial {trial}: {error}") from error
        except Exception as error:
            raise AssertionError(
                f"seed {seed}, trial {trial}: {type(error).__name__}: {error}; "
                f"batch {bytes(batch).hex()}") from error
