"""The client's public value types (Kafka-shaped)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

DATA_DIR_ENV = "SHMBROKER_DATA_DIR"
DEFAULT_DATA_DIR = "./shmbroker-data"


def resolve_data_dir(data_dir: str | os.PathLike[str] | None) -> Path:
    """``data_dir``, else ``$SHMBROKER_DATA_DIR``, else ``./shmbroker-data`` (as ``serve``)."""
    if data_dir is None:
        data_dir = os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR
    return Path(data_dir)


class TopicPartition(NamedTuple):
    topic: str
    partition: int


class RecordMetadata(NamedTuple):
    """Where a produced record landed (offset -1 with acks=0, as Kafka)."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int


class Record(NamedTuple):
    """One consumed record."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes | None], ...]


class OffsetAndTimestamp(NamedTuple):
    offset: int
    timestamp_ms: int


class ColumnarRecords:
    """Consumed records of one partition as columns, without copying keys or values.

    ``offsets`` and ``timestamps_ms`` are int64 arrays; record i's value is
    ``data[value_positions[i] : value_positions[i] + value_lengths[i]]`` (length -1 = null),
    keys likewise.  ``data`` is a uint8 array over the fetched bytes (or a decompressed copy);
    each element of ``batches`` is the decoded :class:`ColumnarBatch` of one RecordBatch, whose
    arrays these columns concatenate.
    """

    def __init__(self, topic: str, partition: int, batches: list[Any]) -> None:
        self.topic = topic
        self.partition = partition
        self.batches = batches
        if len(batches) == 1:
            only = batches[0]
            self.offsets = only.offsets
            self.timestamps_ms = only.timestamps
        else:
            self.offsets = np.concatenate([batch.offsets for batch in batches])
            self.timestamps_ms = np.concatenate([batch.timestamps for batch in batches])

    def __len__(self) -> int:
        return len(self.offsets)

    def values(self) -> list[bytes | None]:
        """Every value as bytes (copies; for inspection rather than the hot path)."""
        out: list[bytes | None] = []
        for batch in self.batches:
            out += [batch.value(index) for index in range(len(batch))]
        return out

    def value_blocks(self) -> list[Any] | None:
        """When every value has one size: 2-D zero-copy views (records x value bytes)."""
        blocks = []
        for batch in self.batches:
            found = batch.value_blocks()
            if found is None:
                return None
            blocks += found
        return blocks

    @property
    def value_bytes(self) -> int:
        return int(sum(int(batch.value_lengths.clip(0).sum()) for batch in self.batches))

    def __repr__(self) -> str:
        return (f"ColumnarRecords({self.topic}/{self.partition}, {len(self)} records, "
                f"offsets {int(self.offsets[0]) if len(self) else '-'}.."
                f"{int(self.offsets[-1]) if len(self) else '-'})")
