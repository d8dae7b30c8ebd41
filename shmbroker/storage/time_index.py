"""The time index (``.timeindex``): timestamp -> offset, sparse.

File layout (Kafka's), big-endian, 12-byte entries, no header::

    position  size  field
    0         8     timestamp        int64   ms; the largest timestamp of the segment so far
    8         4     relative_offset  uint32  base offset of the batch holding that
                                             timestamp - segment base offset

An entry is added at most once per ``index_interval_bytes`` of log and only when the segment's
largest timestamp grew since the last entry; when the segment is sealed a last entry records its
largest timestamp, so ``last_entry()`` of a sealed segment's index is its largest timestamp
(what time retention uses).  Preallocation, trimming and the absent checksum are as for
:mod:`shmbroker.storage.offset_index`.
"""

from __future__ import annotations

import struct

import numpy as np

from shmbroker.storage.offset_index import SparseIndex


class TimeIndex(SparseIndex):
    """timestamp -> relative offset.  Invariant (beyond SparseIndex's): timestamps strictly grow,
    offsets never decrease."""

    FILE_DTYPE = np.dtype([("timestamp", ">i8"), ("relative_offset", ">u4")])
    ENTRY_STRUCT = struct.Struct(">qI")
    ENTRY_SIZE = 12
    KEY_NAME = "timestamp"
    VALUE_NAME = "relative_offset"

    def lookup(self, timestamp_ms: int) -> tuple[int, int] | None:
        """(timestamp, relative offset) of the last entry with timestamp <= ``timestamp_ms``."""
        found = self.floor_index(timestamp_ms)
        if found < 0:
            return None
        return int(self._keys[found]), int(self._values[found])
