"""Test helpers for the storage layer: build batches, inspect and damage partition directories.

Test files import this with ``tests/`` put on ``sys.path`` (see the top of each storage test);
``pythonpath = ["tests"]`` in pyproject's pytest options would make that unnecessary.
"""

from __future__ import annotations

import os
import struct
import warnings
from collections.abc import Sequence

from crc32c import crc32c

from shmbroker.config import LogConfig
from shmbroker.format.record_batch import validate_batch

try:
    from shmbroker.format.record_batch import encode_batch as _encode_batch
except ImportError:  # pragma: no cover - until the format module grows encode_batch
    _encode_batch = None

# Small indexes so that tests cover index-full rolls; everything else at its default.
SMALL_CONFIG = LogConfig(segment_bytes=64 * 1024, index_interval_bytes=256,
                         segment_index_bytes=1024, retention_ms=-1)


def make_batch(
    values: Sequence[bytes | None],
    *,
    timestamps: Sequence[int] | None = None,
    keys: Sequence[bytes | None] | None = None,
    base_offset: int = 0,
) -> bytes:
    """One uncompressed RecordBatch v2 holding ``values`` (timestamps default to 1000 + i)."""
    if timestamps is None:
        timestamps = [1000 + index for index in range(len(values))]
    if keys is None:
        keys = [None] * len(values)
    if _encode_batch is not None:
        return bytes(_encode_batch(list(values), keys=list(keys), timestamps=list(timestamps),
                                   base_offset=base_offset))
    with warnings.catch_warnings():  # kafka-python imports deprecated importlib APIs
        warnings.simplefilter("ignore", DeprecationWarning)
        from kafka.record.default_records import DefaultRecordBatchBuilder

    builder = DefaultRecordBatchBuilder(magic=2, compression_type=0, is_transactional=0,
                                        producer_id=-1, producer_epoch=-1, base_sequence=-1,
                                        batch_size=1 << 30)
    for index, (key, value, timestamp) in enumerate(zip(keys, values, timestamps, strict=True)):
        builder.append(index, timestamp, key, value, [])
    buffer = builder.build()
    buffer[0:8] = base_offset.to_bytes(8, "big", signed=True)
    return bytes(buffer)


def sized_batch(records: int, value_bytes: int, first_timestamp_ms: int = 1000,
                tag: int = 0) -> bytes:
    """``records`` records of ``value_bytes`` bytes each (content derived from ``tag``)."""
    values = [bytes([(tag + index) % 256]) * value_bytes for index in range(records)]
    return make_batch(values, timestamps=[first_timestamp_ms + index for index in range(records)])


def lying_batch(values: Sequence[bytes], count: int) -> bytearray:
    """A batch of ``values`` whose records_count and last_offset_delta say ``count`` records,
    agreeing with each other but not with the records, its CRC recomputed: only a walk of the
    record lengths finds the lie (record_validation = "records")."""
    lying = bytearray(_encode_batch(list(values), producer_id=99, base_sequence=0))
    struct.pack_into(">i", lying, 57, count)  # records_count
    struct.pack_into(">i", lying, 23, count - 1)  # last_offset_delta
    struct.pack_into(">I", lying, 17, crc32c(bytes(lying[21:])))
    return lying


def chain_lie(records: int = 3) -> bytes:
    """:func:`lying_batch` of ``records`` 20-byte values claiming one record more."""
    return bytes(lying_batch([bytes([index]) * 20 for index in range(records)], records + 1))


def split_batches(data: bytes) -> list[bytes]:
    """Cut concatenated batches apart (each validated)."""
    batches = []
    position = 0
    while position < len(data):
        header = validate_batch(data, position)
        batches.append(bytes(data[position : position + header.size]))
        position += header.size
    return batches


def base_offset_of(batch: bytes) -> int:
    return int.from_bytes(batch[:8], "big", signed=True)


def with_base_offset(batch: bytes, base_offset: int) -> bytes:
    return base_offset.to_bytes(8, "big", signed=True) + batch[8:]


def segment_logs(directory: str | os.PathLike[str]) -> list[str]:
    return sorted(os.path.join(directory, name) for name in os.listdir(directory)
                  if name.endswith(".log"))


class FakeClock:
    """An injectable ``clock_ms``."""

    def __init__(self, now_ms: int = 1_000_000) -> None:
        self.now_ms = now_ms

    def __call__(self) -> int:
        return self.now_ms

    def advance(self, delta_ms: int) -> int:
        self.now_ms += delta_ms
        return self.now_ms
