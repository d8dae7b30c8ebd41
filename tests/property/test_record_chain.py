"""The record-length chain check at append (columnar.check_record_chain): every batch our
encoders write passes; on runs of sizes, damaged length bytes and random bytes it accepts
exactly what a plain, independent walk accepts (and the decoder then finds the same record
starts); a header whose record count lies (CRC recomputed) is refused by PartitionLog.append
(the default, record_validation = "records") with nothing written, compressed batches
included; with "crc" it is stored, as documented."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shmbroker.config import LogConfig
from shmbroker.errors import CorruptRecordError
from shmbroker.format import record_batch
from shmbroker.format.columnar import (
    SCALAR_WALK_RECORDS_MAX,
    _as_u8,
    _one_shape,
    _record_starts,
    _walk_records,
    check_record_chain,
)
from shmbroker.format.varint import decode_varint
from shmbroker.storage.partition_log import PartitionLog

values = st.lists(st.one_of(st.none(), st.binary(max_size=300)), min_size=1, max_size=200)


def _records_of(batch: bytearray) -> tuple[int, int, int]:
    header = record_batch.read_header(batch, 0)
    return record_batch.HEADER_SIZE, header.size, header.records_count


@settings(max_examples=150, deadline=None)
@given(values, st.booleans())
def test_every_encoded_batch_passes(records, uniform):
    if uniform:  # the columnar fast path's shape: values of one size
        records = [b"v" * 100] * len(records)
    batch = record_batch.encode_batch(records, keys=[b"k"] * len(records))
    check_record_chain(batch, *_records_of(batch))


def _lying(values: list[bytes], count: int) -> bytearray:
    batch = record_batch.encode_batch(values, producer_id=7, base_sequence=0)
    struct.pack_into(">i", batch, 57, count)  # records_count
    struct.pack_into(">i", batch, 23, count - 1)  # last_offset_delta
    size = struct.unpack_from(">i", batch, 8)[0] + record_batch.LOG_OVERHEAD
    struct.pack_into(">I", batch, 17, record_batch.compute_crc(batch, 0, size))
    return batch


@settings(max_examples=100, deadline=None)
@given(st.integers(min_value=1, max_value=60), st.integers(min_value=1, max_value=60))
def test_a_record_count_that_lies_is_refused(actual, declared):
    if actual == declared:
        return
    batch = _lying([b"x" * 20] * actual, declared)
    with pytest.raises(CorruptRecordError):
        # the header check refuses counts the bytes cannot hold; the chain, every other lie
        record_batch.validate_batch(batch)
        check_record_chain(batch, *_records_of(batch))


def test_partition_log_refuses_the_lying_batch_and_writes_nothing(tmp_path):
    log = PartitionLog(tmp_path / "p", LogConfig())
    try:
        good = record_batch.encode_batch([b"a", b"b"])
        log.append(good)
        with pytest.raises(CorruptRecordError, match="batch 1"):
            log.append(bytes(good) + bytes(_lying([b"c" * 20, b"d" * 20], 3)))
        assert log.log_end_offset == 2
        log.append(good)
        assert log.log_end_offset == 4
    finally:
        log.close()


def test_with_crc_validation_a_crc_valid_batch_is_trusted(tmp_path):
    log = PartitionLog(tmp_path / "p", LogConfig(record_validation="crc"))
    try:
        assert log.append(bytes(_lying([b"c" * 20, b"d" * 20], 3))).first_offset == 0
        assert log.log_end_offset == 3
    finally:
        log.close()


# Sizes that exercise every path of the walker: runs of one size long enough to speculate
# (and to grow the block), runs broken mid-block, one- two- and three-byte length varints.
sizes = st.lists(
    st.tuples(st.sampled_from([0, 1, 40, 57, 58, 100, 8180, 8200]), st.integers(1, 300)),
    min_size=1, max_size=6)


def _reference_walk(batch: bytes | bytearray, start: int, end: int, count: int
                    ) -> list[tuple[int, int]] | None:
    """An independent, plain walk of the chain: (start, length-varint size) of each record,
    or None where the production walker must refuse."""
    records = []
    position = start
    for _ in range(count):
        try:
            body, after = decode_varint(batch, position, end)
        except CorruptRecordError:
            return None
        if body < 6 or after + body > end:
            return None
        records.append((position, after - position))
        position = after + body
    return records if position == end else None


def _reference_accepts(batch: bytes | bytearray, start: int, end: int, count: int) -> bool:
    return _reference_walk(batch, start, end, count) is not None


@settings(max_examples=300, deadline=None)
@given(sizes, st.sampled_from([0, 0, 0, 0, -1, 1, 3]), st.data())
def test_the_walk_agrees_with_a_plain_walk_on_runs_and_damage(runs, count_change, data):
    records = [b"r" * size for size, repeat in runs for _ in range(repeat)]
    batch = bytearray(record_batch.encode_batch(records[:2000]))
    start, end, count = _records_of(batch)
    where = data.draw(st.sampled_from(["nowhere", "anywhere", "a length"]))
    if where != "nowhere":  # damage one byte of the records section
        if where == "a length":  # one of a record's length bytes, where the walk looks
            records = _reference_walk(batch, start, end, count)
            assert records is not None
            record_start, length_bytes = data.draw(st.sampled_from(records))
            at = record_start + data.draw(st.integers(0, length_bytes - 1))
        else:
            at = data.draw(st.integers(start, end - 1))
        batch[at] = data.draw(st.integers(0, 255))
    count = max(0, count + count_change)
    accepted = _reference_accepts(batch, start, end, count)
    if accepted:
        check_record_chain(batch, start, end, count)
        starts, _, _ = _record_starts(_as_u8(batch), start, end, count)  # the decoder's view
        assert starts.tolist() == [at for at, _ in _reference_walk(batch, start, end, count)]
    else:
        with pytest.raises(CorruptRecordError):
            check_record_chain(batch, start, end, count)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400), st.integers(0, 80))
def test_random_bytes_are_refused_or_accepted_as_a_plain_walk_does(section, count):
    if _reference_accepts(section, 0, len(section), count):
        check_record_chain(section, 0, len(section), count)
    else:
        with pytest.raises(CorruptRecordError):
            check_record_chain(section, 0, len(section), count)


@pytest.mark.parametrize("codec", ["gzip", "lz4", "zstd"])
def test_a_compressed_batch_whose_count_lies_is_refused(tmp_path, codec):
    """The records of a compressed batch are inflated and walked too (as Kafka's broker
    decompresses to validate); an honest one is stored."""
    log = PartitionLog(tmp_path / "p", LogConfig())
    try:
        honest = record_batch.encode_batch([b"c" * 20, b"d" * 30], codec=codec)
        assert log.append(honest).last_offset == 1
        lying = bytearray(honest)
        struct.pack_into(">i", lying, 57, 3)
        struct.pack_into(">i", lying, 23, 2)
        size = struct.unpack_from(">i", lying, 8)[0] + record_batch.LOG_OVERHEAD
        struct.pack_into(">I", lying, 17, record_batch.compute_crc(lying, 0, size))
        with pytest.raises(CorruptRecordError, match="left over|ends inside|past"):
            log.append(bytes(lying))
        garbled = bytearray(honest)  # the compressed bytes themselves broken, CRC recomputed
        garbled[record_batch.HEADER_SIZE + 2 : size - 2] = bytes(size - 4
                                                                 - record_batch.HEADER_SIZE)
        struct.pack_into(">I", garbled, 17, record_batch.compute_crc(garbled, 0, size))
        with pytest.raises(CorruptRecordError):
            log.append(bytes(garbled))
        assert log.log_end_offset == 2
        assert log.append(honest).first_offset == 2
    finally:
        log.close()


def test_a_snappy_batch_is_stored_unchecked(tmp_path):
    """We cannot inflate snappy: such a batch is stored and served unchanged, as documented."""
    batch = bytearray(record_batch.encode_batch([b"s" * 20, b"t" * 20]))
    attributes = struct.unpack_from(">h", batch, 21)[0]
    struct.pack_into(">h", batch, 21, attributes | record_batch.CODEC_SNAPPY)
    size = len(batch)
    struct.pack_into(">I", batch, 17, record_batch.compute_crc(batch, 0, size))
    log = PartitionLog(tmp_path / "p", LogConfig())
    try:
        assert log.append(bytes(batch)).last_offset == 1
    finally:
        log.close()


def _outcome(walk, *args):
    try:
        walk(*args)
    except CorruptRecordError as error:
        return str(error)
    return None


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=400),
                 st.lists(st.binary(max_size=9000), max_size=8).map(
                     lambda values: bytes(record_batch.encode_batch(values or [b""]))[
                         record_batch.HEADER_SIZE:])),
       st.integers(0, SCALAR_WALK_RECORDS_MAX), st.data())
def test_the_walk_without_numpy_agrees_with_the_vectorised_one(section, count, data):
    """Batches of up to SCALAR_WALK_RECORDS_MAX records are walked over the bytes themselves,
    without a numpy view: it accepts and refuses exactly what the walk over a numpy view does
    and what a plain walk does, with the same message, also inside a larger buffer and for
    records of 8 KiB and more (three-byte lengths)."""
    pad = data.draw(st.integers(0, 5))
    buffer = b"\xff" * pad + section + b"\x00" * data.draw(st.integers(0, 5))
    args = (pad, pad + len(section), count)
    fast = _outcome(check_record_chain, buffer, *args)
    assert fast == _outcome(_walk_records, _as_u8(buffer), *args, None, None)
    assert (fast is None) == _reference_accepts(buffer, *args)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 300), st.integers(SCALAR_WALK_RECORDS_MAX + 1, 1200),
       st.sampled_from(["none", "length byte", "resize two", "count"]), st.data())
def test_batches_of_one_shape_take_the_closed_form_and_agree_with_a_plain_walk(
        value_bytes, count, damage, data):
    """Records of one size (a producer's equal values, one timestamp): the chain is proved
    in closed form (_one_shape), across the 64th record where the offsetDelta varint grows and
    across record lengths where the length varint grows; any damage makes it say no, and the
    walk then decides as a plain walk does."""
    batch = bytearray(record_batch.encode_batch([b"v" * value_bytes] * count, timestamps=5))
    start, end, count_declared = _records_of(batch)
    raw = memoryview(batch)[start:end]
    assert _one_shape(batch, raw, start, end - start, count_declared)  # taken when whole
    records = _reference_walk(batch, start, end, count_declared)
    assert records is not None
    if damage == "length byte":  # one record's length bytes, where the check looks
        record_start, length_bytes = data.draw(st.sampled_from(records))
        at = record_start + data.draw(st.integers(0, length_bytes - 1))
        batch[at] = data.draw(st.integers(0, 255).filter(lambda byte: byte != batch[at]))
    elif damage == "resize two":  # one record a byte longer, the next a byte shorter: the
        index = data.draw(st.integers(0, count - 2))  # sizes still tile the section
        record_start, length_bytes = records[index]
        body, _ = decode_varint(batch, record_start, end)
        if length_bytes == 1 and body < 63:
            batch[record_start] += 2  # zigzag: length + 1
            next_start, next_bytes = records[index + 1]
            if next_bytes == 1:
                batch[next_start] -= 2
    elif damage == "count":
        count_declared += data.draw(st.sampled_from([-1, 1]))
    if damage != "none":
        assert not (_one_shape(batch, raw, start, end - start, count_declared)
                    and _reference_walk(batch, start, end, count_declared) is None)
    if _reference_accepts(batch, start, end, count_declared):
        check_record_chain(batch, start, end, count_declared)
    else:
        with pytest.raises(CorruptRecordError):
            check_record_chain(batch, start, end, count_declared)
