"""The record-length chain check at append (columnar.check_record_chain): every batch our
encoders write passes, and a header whose record count lies (CRC recomputed) is refused by
PartitionLog.append (record_validation = "records") with nothing written; by default ("crc")
it is stored, as documented."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shmbroker.config import LogConfig
from shmbroker.errors import CorruptRecordError
from shmbroker.format import record_batch
from shmbroker.format.columnar import check_record_chain
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
    log = PartitionLog(tmp_path / "p", LogConfig(record_validation="records"))
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


def test_by_default_a_crc_valid_batch_is_trusted(tmp_path):
    log = PartitionLog(tmp_path / "p", LogConfig())
    try:
        assert log.append(bytes(_lying([b"c" * 20, b"d" * 20], 3))).first_offset == 0
        assert log.log_end_offset == 3
    finally:
        log.close()
