"""One log segment: ``<base_offset:020d>.log`` plus its ``.index`` and ``.timeindex``.

The ``.log`` file is a plain concatenation of Kafka RecordBatch v2 batches (see
:mod:`shmbroker.format.record_batch`), exactly as produced and as fetched, no framing of our own.
It is written with ``os.write`` at the file end and read with ``os.pread`` (or ``os.sendfile`` by a
worker, using :attr:`Segment.fd`); never through mmap.

Index policy (the same for appends and for recovery rebuilds, so a rebuild is byte-equal):
before a batch is appended, if at least ``index_interval_bytes`` of log were written since the
last offset-index entry (or ever, for the first), the batch gets an offset-index entry
``(base_offset - segment base, position)`` and, if the segment's largest timestamp grew since
the last time-index entry, a time-index entry ``(largest timestamp, its batch's base offset)``.
Sealing a segment adds a last time-index entry for its largest timestamp.  One slot of each index
is reserved for that last entry; an index with no other free slot is full and rolls the segment.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np

from shmbroker.config import LogConfig
from shmbroker.errors import CorruptRecordError
from shmbroker.format.record_batch import (
    HEADER_SIZE,
    LOG_OVERHEAD,
    batch_size_at,
    validate_batch,
)
from shmbroker.storage.offset_index import OffsetIndex
from shmbroker.storage.time_index import TimeIndex

LOG_SUFFIX = ".log"
INDEX_SUFFIX = ".index"
TIME_INDEX_SUFFIX = ".timeindex"
BASE_OFFSET_DIGITS = 20
NO_TIMESTAMP = -1
POSITION_MAX = 2**32 - 1  # index positions are uint32
RELATIVE_OFFSET_MAX = 2**31 - 1  # as Kafka: relative offsets stay within an int32

# base_offset (0..8), batch_length (8..12), last_offset_delta (23..27), max_timestamp (35..43)
_WALK_STRUCT = struct.Struct(">qi11xi8xq")
_WALK_HEADER_BYTES = _WALK_STRUCT.size
_WALK_CHUNK_BYTES = 64 * 1024
SCAN_CHUNK_BYTES = 16 * 1024 * 1024


def segment_file_name(base_offset: int, suffix: str) -> str:
    return f"{base_offset:0{BASE_OFFSET_DIGITS}d}{suffix}"


class BatchSpan(NamedTuple):
    """Where one stored batch lies and what it covers."""

    position: int
    base_offset: int
    size_bytes: int
    last_offset_delta: int
    max_timestamp_ms: int

    @property
    def next_offset(self) -> int:
        return self.base_offset + self.last_offset_delta + 1

    @property
    def end_position(self) -> int:
        return self.position + self.size_bytes


class SegmentScan(NamedTuple):
    """What :meth:`Segment.recover` found."""

    valid_bytes: int
    truncated_bytes: int
    first_bad_position: int | None
    reason: str | None
    indexes_rebuilt: tuple[str, ...]


class _State(NamedTuple):
    size_bytes: int
    next_offset: int
    max_timestamp_ms: int
    offset_of_max_timestamp: int
    bytes_since_index_entry: int
    offset_entries: int
    time_entries: int
    roll_start_ms: int | None


class Segment:
    """A file of batches with dense offsets ``[base_offset, next_offset)``.

    Invariants:
    - ``.log`` bytes ``[0, size_bytes)`` are whole batches, each CRC-valid, the first with
      ``base_offset``, each next one starting at the previous one's ``next_offset``; the file is
      never longer than ``size_bytes`` after a method returns.
    - every offset-index entry points at a batch start inside ``[0, size_bytes)``; every
      time-index entry names a batch base offset inside the segment; both follow the index
      policy in the module docstring.
    - ``max_timestamp_ms`` is the largest batch max timestamp (NO_TIMESTAMP when empty).
    - ``is_active``: index files preallocated and open; otherwise sealed (trimmed, closed).
    """

    def __init__(self, directory: str, base_offset: int, config: LogConfig, fd: int) -> None:
        self.directory = directory
        self.base_offset = base_offset
        self.log_path = os.path.join(directory, segment_file_name(base_offset, LOG_SUFFIX))
        self.offset_index = OffsetIndex(
            os.path.join(directory, segment_file_name(base_offset, INDEX_SUFFIX)),
            config.segment_index_bytes,
        )
        self.time_index = TimeIndex(
            os.path.join(directory, segment_file_name(base_offset, TIME_INDEX_SUFFIX)),
            config.segment_index_bytes,
        )
        self.index_interval_bytes = config.index_interval_bytes
        self.fd = fd
        self.size_bytes = 0
        self.next_offset = base_offset
        self.max_timestamp_ms = NO_TIMESTAMP
        self.offset_of_max_timestamp = base_offset
        self.roll_start_ms: int | None = None  # clock at first append (roll by segment_ms)
        self._bytes_since_index_entry = 0

    # -- life cycle ---------------------------------------------------------------------------
    @classmethod
    def create(cls, directory: str, base_offset: int, config: LogConfig) -> Segment:
        """A new, empty, active segment (any files of that name are replaced)."""
        path = os.path.join(directory, segment_file_name(base_offset, LOG_SUFFIX))
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        segment = cls(directory, base_offset, config, fd)
        try:
            segment.offset_index.write_file(active=True)
            segment.time_index.write_file(active=True)
        except BaseException:
            segment.abandon()
            raise
        return segment

    @classmethod
    def open_existing(cls, directory: str, base_offset: int, config: LogConfig) -> Segment:
        """Open the files; state stays empty until :meth:`recover` or :meth:`load_clean`."""
        path = os.path.join(directory, segment_file_name(base_offset, LOG_SUFFIX))
        fd = os.open(path, os.O_RDWR)
        return cls(directory, base_offset, config, fd)

    @property
    def is_active(self) -> bool:
        return self.offset_index.is_active

    @property
    def is_closed(self) -> bool:
        return self.fd < 0

    @property
    def file_size_bytes(self) -> int:
        return os.fstat(self.fd).st_size

    def seal(self) -> None:
        """Stop appending: record the largest timestamp, trim and close the index files."""
        if not self.is_active:
            return
        last = self.time_index.last_entry()
        if self.max_timestamp_ms != NO_TIMESTAMP and (
            last is None or self.max_timestamp_ms > last[0]
        ):
            self.time_index.append(
                self.max_timestamp_ms, self.offset_of_max_timestamp - self.base_offset
            )
        self.offset_index.seal()
        self.time_index.seal()

    def activate(self) -> None:
        """Make a sealed segment appendable again (after truncate_to made it the last)."""
        self.offset_index.activate()
        self.time_index.activate()

    def flush(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        """Clean close: trim the indexes (no final time-index entry: the segment stays last)."""
        if self.fd < 0:
            return
        self.offset_index.seal()
        self.time_index.seal()
        os.fsync(self.fd)
        fd, self.fd = self.fd, -1
        os.close(fd)

    def abandon(self) -> None:
        """Close every fd without syncing or trimming: what a crash leaves behind."""
        self.offset_index.abandon()
        self.time_index.abandon()
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def delete_files(self) -> None:
        self.abandon()
        for path in (self.log_path, self.offset_index.path, self.time_index.path):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    # -- appends ------------------------------------------------------------------------------
    def free_index_entries(self) -> int:
        """Batches that can still be appended without overflowing an index (one slot each)."""
        return min(self.offset_index.free_entries, self.time_index.free_entries) - 1

    def append(self, data: memoryview, batches: list[BatchSpan], now_ms: int) -> None:
        """Write ``data`` (the concatenation of ``batches``, positions relative to ``data``) at
        the end with one os.write loop, then index each batch.  On OSError the file is cut
        back to its previous size and the error propagates; nothing else changed."""
        assert self.is_active and batches and batches[0].base_offset == self.next_offset
        start = self.size_bytes
        view = data
        try:
            while view:
                written = os.write(self.fd, view)
                view = view[written:]
        except OSError:
            self._cut_file(start)
            raise
        for span in batches:
            self._index_batch(start + span.position, span)
        self.offset_index.write_pending()
        self.time_index.write_pending()
        self.size_bytes = start + len(data)
        if self.roll_start_ms is None:
            self.roll_start_ms = now_ms

    def _index_batch(self, position: int, span: BatchSpan) -> None:
        if span.max_timestamp_ms > self.max_timestamp_ms:
            self.max_timestamp_ms = span.max_timestamp_ms
            self.offset_of_max_timestamp = span.base_offset
        if self._bytes_since_index_entry >= self.index_interval_bytes:
            self.offset_index.append(span.base_offset - self.base_offset, position)
            last = self.time_index.last_entry()
            if self.max_timestamp_ms != NO_TIMESTAMP and (
                last is None or self.max_timestamp_ms > last[0]
            ):
                self.time_index.append(
                    self.max_timestamp_ms, self.offset_of_max_timestamp - self.base_offset
                )
            self._bytes_since_index_entry = 0
        self._bytes_since_index_entry += span.size_bytes
        self.next_offset = span.next_offset

    def _cut_file(self, size_bytes: int) -> None:
        os.ftruncate(self.fd, size_bytes)
        os.lseek(self.fd, size_bytes, os.SEEK_SET)

    def snapshot(self) -> _State:
        return _State(self.size_bytes, self.next_offset, self.max_timestamp_ms,
                      self.offset_of_max_timestamp, self._bytes_since_index_entry,
                      self.offset_index.entries_count, self.time_index.entries_count,
                      self.roll_start_ms)

    def restore(self, state: _State) -> None:
        """Undo appends made since ``state`` was taken (used when a later write failed)."""
        self._cut_file(state.size_bytes)
        self.offset_index.truncate_entries(state.offset_entries)
        self.time_index.truncate_entries(state.time_entries)
        (self.size_bytes, self.next_offset, self.max_timestamp_ms, self.offset_of_max_timestamp,
         self._bytes_since_index_entry, _, _, self.roll_start_ms) = state

    # -- truncation ---------------------------------------------------------------------------
    def truncate_to_offset(self, offset: int) -> int:
        """Drop every batch whose last offset is >= ``offset``; return the bytes removed."""
        span = self.find_batch(offset) if offset < self.next_offset else None
        if span is None:
            return 0
        removed = self.size_bytes - span.position
        self._truncate_to_position(span.position)
        os.fsync(self.fd)
        return removed

    def _truncate_to_position(self, position: int) -> None:
        self._cut_file(position)
        self.size_bytes = position
        self.offset_index.truncate_entries(self.offset_index.first_index_at_or_after_value(position))
        offset_entries = self.offset_index.entries_count
        start = int(self.offset_index.values[-1]) if offset_entries else 0
        # Time entries naming a batch at or after the cut go; the batch is gone.
        next_offset = self._next_offset_after(start, position)
        relative_next = next_offset - self.base_offset
        keep = int(np.searchsorted(self.time_index.values, relative_next, side="left"))
        self.time_index.truncate_entries(keep)
        self._restore_tail_state(start, next_offset)

    def _next_offset_after(self, start: int, end: int) -> int:
        next_offset = self.base_offset
        for span in self.iter_batches(start, end):
            next_offset = span.next_offset
        return next_offset

    def _restore_tail_state(self, start: int, next_offset: int) -> None:
        """Largest timestamp and index interval state from the index tails plus a header walk
        of ``[start, size_bytes)`` (start: the last offset-index entry, or 0)."""
        last_time = self.time_index.last_entry()
        if last_time is None:
            self.max_timestamp_ms = NO_TIMESTAMP
            self.offset_of_max_timestamp = self.base_offset
        else:
            self.max_timestamp_ms = last_time[0]
            self.offset_of_max_timestamp = self.base_offset + last_time[1]
        for span in self.iter_batches(start, self.size_bytes):
            if span.max_timestamp_ms > self.max_timestamp_ms:
                self.max_timestamp_ms = span.max_timestamp_ms
                self.offset_of_max_timestamp = span.base_offset
        self.next_offset = next_offset
        self._bytes_since_index_entry = self.size_bytes - start

    # -- reads --------------------------------------------------------------------------------
    def iter_batches(self, start: int, end: int) -> Iterator[BatchSpan]:
        """Walk batch headers in ``[start, end)`` (start must be a batch boundary); no CRC."""
        chunk = b""
        chunk_position = start
        position = start
        while position < end:
            relative = position - chunk_position
            if relative + _WALK_HEADER_BYTES > len(chunk):
                chunk = os.pread(self.fd, min(_WALK_CHUNK_BYTES, end - position), position)
                chunk_position, relative = position, 0
                if len(chunk) < _WALK_HEADER_BYTES:
                    raise CorruptRecordError(
                        f"segment {self.log_path}: batch header cut short", position
                    )
            base_offset, batch_length, last_offset_delta, max_timestamp_ms = (
                _WALK_STRUCT.unpack_from(chunk, relative)
            )
            size = batch_length + LOG_OVERHEAD
            if size < HEADER_SIZE or position + size > end or last_offset_delta < 0:
                raise CorruptRecordError(
                    f"segment {self.log_path}: batch of {size} bytes does not fit", position
                )
            yield BatchSpan(position, base_offset, size, last_offset_delta, max_timestamp_ms)
            position += size

    def find_batch(self, offset: int) -> BatchSpan | None:
        """The batch holding ``offset``, or None when the segment does not hold it."""
        if offset < self.base_offset or offset >= self.next_offset:
            return None
        _, position = self.offset_index.lookup(offset - self.base_offset)
        for span in self.iter_batches(position, self.size_bytes):
            if span.next_offset > offset:
                return span
        return None

    def read_range(self, offset: int, max_bytes: int) -> tuple[int, int, BatchSpan, int] | None:
        """(position, size_bytes, first batch, next offset) of the whole batches from the one
        holding ``offset`` that fit in ``max_bytes`` -- at least that first batch.  ``next
        offset`` is the offset after the last batch of the range (where the next read starts)."""
        first = self.find_batch(offset)
        if first is None:
            return None
        limit = first.position + max(max_bytes, first.size_bytes)
        if limit >= self.size_bytes:
            return first.position, self.size_bytes - first.position, first, self.next_offset
        found = self.offset_index.first_index_at_or_after_value(limit + 1) - 1
        start = first.position
        end, next_offset = first.end_position, first.next_offset
        if found >= 0 and int(self.offset_index.values[found]) > first.position:
            # an indexed batch boundary inside the range: resume the walk from there
            start = end = int(self.offset_index.values[found])
            next_offset = self.base_offset + int(self.offset_index.keys[found])
        for span in self.iter_batches(start, self.size_bytes):
            if span.end_position > limit:
                break
            end, next_offset = span.end_position, span.next_offset
        return first.position, end - first.position, first, next_offset

    def timestamp_start_position(self, timestamp_ms: int) -> int:
        """A batch boundary at or before the first batch whose max timestamp >= timestamp_ms."""
        entry = self.time_index.lookup(timestamp_ms)
        if entry is None:
            return 0
        return self.offset_index.lookup(entry[1])[1]

    def pread_exact(self, position: int, size_bytes: int) -> bytes:
        parts = []
        while size_bytes > 0:
            part = os.pread(self.fd, size_bytes, position)
            if not part:
                raise CorruptRecordError(f"segment {self.log_path} ends early", position)
            parts.append(part)
            position += len(part)
            size_bytes -= len(part)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    # -- recovery -----------------------------------------------------------------------------
    def load_clean(self, is_last: bool) -> str | None:
        """Trust the log (it was flushed) and check the indexes cheaply.

        Loads the index files, checks their shape and that the last offset entry points at a
        batch, then walks and CRC-checks the batches after it to find ``next_offset``.  Returns
        why the segment must be recovered instead (None when it is fine).
        """
        self.size_bytes = self.file_size_bytes
        for index in (self.offset_index, self.time_index):
            stored = index.read_file()
            if stored is None:
                return f"{os.path.basename(index.path)} is missing"
            keys, values, file_size = stored
            problem = index.shape_problem(keys, values, file_size)
            if problem is not None:
                return f"{os.path.basename(index.path)}: {problem}"
            index.set_entries(keys, values)
        start = 0
        last = self.offset_index.last_entry()
        if last is not None:
            if last[1] >= self.size_bytes:
                return f"index entry points past the log ({last[1]} >= {self.size_bytes})"
            start = last[1]
        next_offset = self.base_offset + (last[0] if last is not None else 0)
        buffer = self.pread_exact(start, self.size_bytes - start) if self.size_bytes else b""
        position = 0
        while position < len(buffer):
            try:
                header = validate_batch(buffer, position)
            except CorruptRecordError as error:
                return f"batch at position {start + position}: {error}"
            if header.base_offset != next_offset:
                return (f"batch at position {start + position} has base offset "
                        f"{header.base_offset}, expected {next_offset}")
            next_offset = header.next_offset
            position += header.size
        self.next_offset = next_offset
        last_time = self.time_index.last_entry()
        if last_time is not None:
            # It names the batch where the segment's largest timestamp so far was reached.
            span = self.find_batch(self.base_offset + last_time[1])
            if span is None or span.max_timestamp_ms != last_time[0]:
                return "time index's last entry does not match the batch it names"
        self._restore_tail_state(start, next_offset)
        os.lseek(self.fd, self.size_bytes, os.SEEK_SET)  # os.write appends at the fd position
        if is_last:
            self.activate()
        self._read_roll_start()
        return None

    def recover(self, buffer: bytearray, is_last: bool) -> SegmentScan:
        """Keep the longest prefix of whole, CRC-valid, offset-contiguous batches, cut the
        rest, and rebuild the indexes when they differ from what that prefix implies.

        ``buffer`` is a reused read buffer (grown if one batch is bigger).
        """
        file_size = self.file_size_bytes
        self.size_bytes = 0
        self.next_offset = self.base_offset
        self.max_timestamp_ms = NO_TIMESTAMP
        self.offset_of_max_timestamp = self.base_offset
        self._bytes_since_index_entry = 0
        self.offset_index.set_entries(np.zeros(0), np.zeros(0))
        self.time_index.set_entries(np.zeros(0), np.zeros(0))
        reason: str | None = None
        view = memoryview(buffer)
        chunk = view[:0]
        chunk_position = 0
        position = 0
        while position < file_size:
            relative = position - chunk_position
            if relative + LOG_OVERHEAD > len(chunk):
                chunk = view[: os.preadv(self.fd, [view[: file_size - position]], position)]
                chunk_position, relative = position, 0
                if len(chunk) < LOG_OVERHEAD:
                    reason = f"truncated batch: {len(chunk)} bytes, no length field"
                    break
            size = batch_size_at(chunk, relative)
            if size < HEADER_SIZE:
                reason = f"batch_length {size - LOG_OVERHEAD} is shorter than a batch header"
                break
            if position + size > file_size:
                reason = f"truncated batch: {file_size - position} of {size} bytes"
                break
            if relative + size > len(chunk):
                if size > len(view):  # one batch bigger than the buffer: a private bigger one
                    view = memoryview(bytearray(size))
                chunk = view[: os.preadv(self.fd, [view[: file_size - position]], position)]
                chunk_position, relative = position, 0
                if len(chunk) < size:
                    reason = f"read {len(chunk)} of {size} bytes"
                    break
            try:
                header = validate_batch(chunk, relative)
            except CorruptRecordError as error:
                reason = str(error).rsplit(" (batch at position", 1)[0]
                break
            if header.base_offset != self.next_offset:
                reason = f"base offset {header.base_offset} where {self.next_offset} was expected"
                break
            if (position > POSITION_MAX or self.free_index_entries() <= 0
                    or header.last_offset - self.base_offset > RELATIVE_OFFSET_MAX):
                reason = "batch beyond what the segment's indexes can address"
                break
            self._index_batch(position, BatchSpan(position, header.base_offset, header.size,
                                                  header.last_offset_delta, header.max_timestamp))
            position += size
            self.size_bytes = position
        chunk.release()
        bad_position = position if reason is not None else None
        truncated = file_size - self.size_bytes
        self._cut_file(self.size_bytes)  # also puts the fd position at the end for os.write
        if truncated:
            os.fsync(self.fd)
        if not is_last:
            self.seal_entries_only()
        rebuilt = tuple(
            os.path.basename(index.path)
            for index in (self.offset_index, self.time_index)
            if self._sync_index_file(index, active=is_last)
        )
        self._read_roll_start()
        return SegmentScan(self.size_bytes, truncated, bad_position, reason, rebuilt)

    def seal_entries_only(self) -> None:
        """Add the sealed segment's last time-index entry in memory (files written later)."""
        last = self.time_index.last_entry()
        if self.max_timestamp_ms != NO_TIMESTAMP and (
            last is None or self.max_timestamp_ms > last[0]
        ):
            self.time_index.append(
                self.max_timestamp_ms, self.offset_of_max_timestamp - self.base_offset
            )

    def _sync_index_file(self, index: OffsetIndex | TimeIndex, *, active: bool) -> bool:
        """Make the file hold the in-memory entries; True when it had to be rewritten."""
        stored = index.read_file()
        count = index.entries_count
        consistent = False
        if stored is not None:
            keys, values, file_size = stored
            expected_sizes = (count * index.ENTRY_SIZE, index.max_entries * index.ENTRY_SIZE)
            consistent = (
                file_size in expected_sizes
                and np.array_equal(keys[:count], index.keys)
                and np.array_equal(values[:count], index.values)
                and not keys[count:].any()
                and not values[count:].any()
            )
        if consistent:
            if active:
                index.activate()
            elif stored is not None and stored[2] != count * index.ENTRY_SIZE:
                index.write_file(active=False)
            return False
        index.write_file(active=active)
        return True

    def _read_roll_start(self) -> None:
        """After a reopen the roll clock restarts at the first batch's max timestamp."""
        self.roll_start_ms = None
        if self.size_bytes:
            first = next(self.iter_batches(0, self.size_bytes))
            self.roll_start_ms = first.max_timestamp_ms
