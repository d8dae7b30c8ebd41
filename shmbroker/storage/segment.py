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

A failed write (ENOSPC, EIO, a short write followed by an error) is undone: :meth:`Segment.append`
cuts the ``.log`` back to its size before the call and drops the index entries it added, so the
next append starts exactly where the failed one did, never after torn bytes.  If even the cut
fails, the segment refuses appends until a later cut succeeds (``cut_pending``).
"""

from __future__ import annotations

import collections
import logging
import os
import struct
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import numpy as np

from shmbroker import limits
from shmbroker.config import LogConfig
from shmbroker.errors import CorruptLogError, CorruptRecordError
from shmbroker.format import record_batch
from shmbroker.format.columnar import check_record_chain
from shmbroker.format.record_batch import (
    CODEC_GZIP,
    CODEC_LZ4,
    CODEC_NONE,
    CODEC_ZSTD,
    HEADER_SIZE,
    LOG_OVERHEAD,
    BatchHeader,
    batch_size_at,
    validate_batch,
)
from shmbroker.storage.offset_index import OffsetIndex
from shmbroker.storage.reserve import UNSUPPORTED_ERRNOS, in_memory, reserve
from shmbroker.storage.time_index import TimeIndex

logger = logging.getLogger("shmbroker.storage")

LOG_SUFFIX = ".log"
INDEX_SUFFIX = ".index"
TIME_INDEX_SUFFIX = ".timeindex"
BASE_OFFSET_DIGITS = 20
NO_TIMESTAMP = -1
RECENT_BATCHES_MAX = 64  # the last batches appended, kept for find_batch (see __init__)
POSITION_MAX = 2**32 - 1  # index positions are uint32
RELATIVE_OFFSET_MAX = 2**31 - 1  # as Kafka: relative offsets stay within an int32

# base_offset (0..8), batch_length (8..12), last_offset_delta (23..27), max_timestamp (35..43)
_WALK_STRUCT = struct.Struct(">qi11xi8xq")
_WALK_HEADER_BYTES = _WALK_STRUCT.size
_WALK_CHUNK_BYTES = 64 * 1024
SCAN_CHUNK_BYTES = 16 * 1024 * 1024


def segment_file_name(base_offset: int, suffix: str) -> str:
    return f"{base_offset:0{BASE_OFFSET_DIGITS}d}{suffix}"


# Codecs whose records an append can walk (record_validation = "records"): a compressed batch
# is inflated first (bounded by limits.decompressed_batch_bytes_max), as Kafka's broker does.
# Snappy batches, which we cannot decode, are stored and served unchanged.
CHECKED_CODECS = frozenset((CODEC_NONE, CODEC_GZIP, CODEC_LZ4, CODEC_ZSTD))


def check_records(view: memoryview, position: int, header: BatchHeader) -> None:
    """CorruptRecordError unless the batch at ``position`` holds ``records_count`` records."""
    start, end = position + HEADER_SIZE, position + header.size
    if header.codec == CODEC_NONE:
        check_record_chain(view, start, end, header.records_count)
    else:
        records = record_batch.decompress(header.codec, view[start:end])
        check_record_chain(records, 0, len(records), header.records_count)


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


class DamagedRange(NamedTuple):
    """Offsets ``[offset, next_offset)`` of a sealed segment that recovery found unreadable:
    its batches end (or break) at byte ``position`` before the next segment's base offset."""

    offset: int
    next_offset: int
    position: int
    reason: str


class SegmentScan(NamedTuple):
    """What :meth:`Segment.recover` found."""

    valid_bytes: int
    truncated_bytes: int
    first_bad_position: int | None
    reason: str | None
    indexes_rebuilt: tuple[str, ...]
    scanned_from: int = 0  # the position the CRC scan started at (after a flushed prefix)


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
      ``base_offset``, each next one starting at the previous one's ``next_offset``, as written
      and as recovery found them (bytes can rot later: reads re-check what they walk); the file
      is never longer than ``size_bytes`` after a method returns, unless ``damaged``.
    - every offset-index entry points at a batch start inside ``[0, size_bytes)``; every
      time-index entry names a batch base offset inside the segment; both follow the index
      policy in the module docstring.
    - ``max_timestamp_ms`` is the largest batch max timestamp (NO_TIMESTAMP when empty).
    - ``is_active``: index files preallocated and open; otherwise sealed (trimmed, closed).
    - ``damaged`` (sealed segments only, set by recovery): offsets ``[damaged.offset,
      next_offset)`` are not in ``[0, size_bytes)``; reading them raises CorruptLogError, and
      the file may hold unreadable bytes past ``size_bytes``.

    Reads trust only the indexes (built from validated batches) and re-check what they walk:
    each batch header must continue the offsets of the one before.  A walk that breaks raises
    CorruptLogError naming the damaged batch and the next offset a read can resume from (the
    next index entry, or the segment's end): damage spoils at most one index interval.
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
        # disk space reserved ahead of the appends (storage/reserve.py), up to _reserved_end;
        # the step is 0 where the file system cannot reserve or need not (tmpfs)
        self._reserve_step_bytes = config.segment_preallocate_bytes
        self._segment_bytes = config.segment_bytes
        self._reserved_end = 0
        self.fd = fd
        self.size_bytes = 0
        self.next_offset = base_offset
        self.max_timestamp_ms = NO_TIMESTAMP
        self.offset_of_max_timestamp = base_offset
        self.roll_start_ms: int | None = None  # clock at first append (roll by segment_ms)
        self._bytes_since_index_entry = 0
        # Why bytes past size_bytes may still be in the file (a cut after a failed append
        # failed); appends are refused until a cut succeeds.
        self.cut_pending: str | None = None
        self.damaged: DamagedRange | None = None  # set by recovery (sealed segments only)
        # The last batches appended (absolute positions, oldest first): a consumer keeping up
        # fetches one of them next, and find_batch then needs no index lookup and no header
        # walk (a quarter of a tail fetch's cost in the worker at 10k one-record batches/s).
        # Trusted only while the newest still ends the segment; truncation and undo clear it.
        self._recent: collections.deque[BatchSpan] = collections.deque(
            maxlen=RECENT_BATCHES_MAX)

    # -- life cycle ---------------------------------------------------------------------------
    @classmethod
    def create(cls, directory: str, base_offset: int, config: LogConfig) -> Segment:
        """A new, empty, active segment (any files of that name are replaced)."""
        path = os.path.join(directory, segment_file_name(base_offset, LOG_SUFFIX))
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as error:
            error.filename = error.filename or path
            raise
        segment = cls(directory, base_offset, config, fd)
        try:
            for index in (segment.offset_index, segment.time_index):
                try:
                    index.write_file(active=True)
                except OSError as error:
                    error.filename = error.filename or index.path
                    raise
        except BaseException:
            segment.delete_files()  # no half-made segment left for recovery or a later roll
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

    def seal(self, *, defer_fsync: bool = False) -> list[int]:
        """Stop appending: give back the space reserved past the data, record the largest
        timestamp, trim and close the index files.
        With ``defer_fsync`` they are not fsynced here: duplicates of their fds are returned
        for another thread to fsync (the caller closes them); else [] once they are durable."""
        if not self.is_active:
            return []
        self._release_reserve()
        last = self.time_index.last_entry()
        if self.max_timestamp_ms != NO_TIMESTAMP and (
            last is None or self.max_timestamp_ms > last[0]
        ):
            self.time_index.append(
                self.max_timestamp_ms, self.offset_of_max_timestamp - self.base_offset
            )
        if not defer_fsync:
            self.offset_index.seal()
            self.time_index.seal()
            return []
        return self._index_fds(lambda index: index.seal_deferred())

    def activate(self) -> None:
        """Make a sealed segment appendable again (after truncate_to made it the last)."""
        self.offset_index.activate()
        self.time_index.activate()

    def flush(self) -> None:
        os.fsync(self.fd)

    def flush_indexes(self) -> None:
        """Write and fsync the index entries (before a recovery-point checkpoint trusts them)."""
        self.offset_index.flush()
        self.time_index.flush()

    def dup_index_fds(self) -> list[int]:
        """:meth:`flush_indexes` for another thread: write the pending entries and return
        duplicates of the open index files' fds, to fsync there (the caller closes them)."""
        return self._index_fds(lambda index: index.dup_for_flush())

    def _index_fds(self, take: Callable[[Any], int | None]) -> list[int]:
        """``take(index)`` for both indexes: the fds it gave (None: that file is not open); on
        an OSError the fds taken so far are closed."""
        fds: list[int] = []
        try:
            for index in (self.offset_index, self.time_index):
                fd = take(index)
                if fd is not None:
                    fds.append(fd)
        except OSError:
            for fd in fds:
                os.close(fd)
            raise
        return fds

    def close(self) -> None:
        """Clean close: give back the reserved space, trim the indexes (no final time-index
        entry: the segment stays last)."""
        if self.fd < 0:
            return
        self._release_reserve()
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

    def append(self, data: memoryview, batches: list[BatchSpan], now_ms: int,
               state: _State | None = None) -> None:
        """Write ``data`` (the concatenation of ``batches``, positions relative to ``data``) at
        the end with one os.write loop, then index each batch.

        On OSError (its ``filename`` set to the file that failed) everything is undone with
        :meth:`restore` -- the ``.log`` cut back to its previous size, the new index entries
        dropped -- and the error propagates.  ``state``: this segment's :meth:`snapshot` now, when
        the caller has one already."""
        assert self.is_active and batches and batches[0].base_offset == self.next_offset
        if self.cut_pending is not None:
            self._cut_file(self.size_bytes)  # raises OSError: still no append after junk
            self.cut_pending = None
        if state is None:
            state = self.snapshot()
        start = self.size_bytes
        if start + len(data) > self._reserved_end and self._reserve_step_bytes:
            self._reserve(start, start + len(data))
        failing = self.log_path
        try:
            view = data
            while view:
                written = os.write(self.fd, view)
                view = view[written:]
            for span in batches:
                self._index_batch(start + span.position, span)
            failing = self.offset_index.path
            self.offset_index.write_if_unbacked()  # the rest wait (offset_index.py says why)
            failing = self.time_index.path
            self.time_index.write_if_unbacked()
        except OSError as error:
            error.filename = error.filename or failing
            self.restore(state)
            raise
        self.size_bytes = start + len(data)
        self._recent.extend([BatchSpan(start + position, base_offset, size, delta, timestamp)
                             for position, base_offset, size, delta, timestamp
                             in batches[-RECENT_BATCHES_MAX:]])
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

    def _reserve(self, start: int, end: int) -> None:
        """Reserve ``[start, end)`` and a step more, up to segment_bytes (where the segment
        rolls); on a file system in memory, nothing, ever (asked once).  Best effort: a full
        disk or a file system that cannot only costs the speed-up (the write itself then fails
        if space is really out)."""
        if not self._reserved_end and in_memory(self.fd):  # (asked once a segment)
            self._reserve_step_bytes = 0  # tmpfs: nothing to allocate ahead, only memory
            return
        target = max(end, min(end + self._reserve_step_bytes, self._segment_bytes))
        try:
            reserve(self.fd, start, target - start)
        except OSError as error:
            if error.errno in UNSUPPORTED_ERRNOS:
                self._reserve_step_bytes = 0  # not on this file system: stop asking
            else:  # ENOSPC, say: ask again a step later
                logger.debug("%s: cannot reserve space ahead: %s", self.log_path, error)
        self._reserved_end = target

    def _reserved_past_data(self) -> bool:
        """Whether space reserved past the data is this segment's to give back (its file open,
        no cut of junk pending, which frees it anyway)."""
        return self._reserved_end > self.size_bytes and self.fd >= 0 and self.cut_pending is None

    def reserve_release(self) -> tuple[int, int] | None:
        """The release of the space reserved past the data, for another thread to do:
        ``(fd, size)`` -- a duplicate of the file's fd (the caller closes it) and the size to
        truncate the file to -- or None when nothing is reserved.  The segment then no longer
        releases it itself.  For a segment being sealed: a roll on a busy file system can wait
        tens of ms in that truncation (the journal), the partition's appends with it."""
        if not self._reserved_past_data():
            return None
        fd = os.dup(self.fd)
        self._reserved_end = 0
        return fd, self.size_bytes

    def _release_reserve(self) -> None:
        """Give back the reserved space past the data (truncating a file to its own size
        frees the blocks past it); best effort."""
        if self._reserved_past_data():
            try:
                os.ftruncate(self.fd, self.size_bytes)
            except OSError as error:
                logger.warning("%s: cannot release the space reserved past its %d bytes: %s",
                               self.log_path, self.size_bytes, error)
        self._reserved_end = 0

    def _cut_file(self, size_bytes: int) -> None:
        self._reserved_end = 0  # a truncation frees what was reserved past it
        os.ftruncate(self.fd, size_bytes)
        os.lseek(self.fd, size_bytes, os.SEEK_SET)

    def snapshot(self) -> _State:
        return _State(self.size_bytes, self.next_offset, self.max_timestamp_ms,
                      self.offset_of_max_timestamp, self._bytes_since_index_entry,
                      self.offset_index.entries_count, self.time_index.entries_count,
                      self.roll_start_ms)

    def restore(self, state: _State) -> None:
        """Undo appends made since ``state`` was taken (used when a later write failed).

        Never raises: memory is restored first; a failed index zeroing leaves derived junk past
        the entries (harmless, see offset_index); a failed cut of the ``.log`` sets
        :attr:`cut_pending`, and appends are refused until a cut succeeds."""
        (self.size_bytes, self.next_offset, self.max_timestamp_ms, self.offset_of_max_timestamp,
         self._bytes_since_index_entry, _, _, self.roll_start_ms) = state
        self._recent.clear()
        for index, count in ((self.offset_index, state.offset_entries),
                             (self.time_index, state.time_entries)):
            try:
                index.truncate_entries(count)
            except OSError:
                pass
        try:
            self._cut_file(state.size_bytes)
        except OSError as error:
            self.cut_pending = (f"cannot cut {self.log_path} back to {state.size_bytes} bytes "
                                f"after a failed append: {error.strerror or error}")

    # -- truncation ---------------------------------------------------------------------------
    def truncate_to_offset(self, offset: int) -> int:
        """Drop every batch whose last offset is >= ``offset``; return the bytes removed."""
        self._recent.clear()
        damaged = self.damaged
        removed = 0
        if damaged is not None:  # the damaged tail goes first: it is past every kept offset
            removed = self.file_size_bytes - damaged.position
            self.damaged = None
            self.next_offset = damaged.offset
            self._cut_file(damaged.position)
            os.fsync(self.fd)
        span = self.find_batch(offset) if offset < self.next_offset else None
        if span is None:
            return removed
        removed += self.size_bytes - span.position
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
    def iter_batches(self, start: int, end: int,
                     first_offset: int | None = None) -> Iterator[BatchSpan]:
        """Walk batch headers in ``[start, end)`` (start must be a batch boundary); no CRC.

        With ``first_offset`` each batch must start at the offset after the previous one (the
        first at ``first_offset``): a damaged base offset (not covered by the CRC) or
        last_offset_delta raises CorruptRecordError instead of yielding wrong offsets.
        """
        chunk = b""
        chunk_position = start
        position = start
        expected = first_offset
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
            if expected is not None:
                if base_offset != expected:
                    raise CorruptRecordError(
                        f"segment {self.log_path}: batch has base offset {base_offset}, "
                        f"{expected} expected", position)
                expected = base_offset + last_offset_delta + 1
            yield BatchSpan(position, base_offset, size, last_offset_delta, max_timestamp_ms)
            position += size

    @property
    def readable_next_offset(self) -> int:
        """The offset after the last batch that can be read (``next_offset`` unless damaged)."""
        return self.damaged.offset if self.damaged is not None else self.next_offset

    def resume_offset_after(self, position: int) -> int:
        """The first offset a read can trust after byte ``position``: the next offset-index
        entry's (an entry is only made for a validated batch), else the readable end."""
        found = self.offset_index.first_index_at_or_after_value(position + 1)
        if found < self.offset_index.entries_count:
            return self.base_offset + int(self.offset_index.keys[found])
        return self.readable_next_offset

    def _damage_error(self, error: CorruptRecordError, previous: BatchSpan | None,
                      start_offset: int, start_position: int) -> CorruptLogError:
        """The damage a checked walk ran into.  ``error`` is at the batch the walk could not
        take; ``previous`` (the one before it, whose header looked right) may be the one at
        fault (a wrong length or last_offset_delta misleads the walk): its CRC decides.  This
        is the error path only, so reading one batch back costs nothing on the hot path."""
        offset = start_offset
        position = error.position if error.position is not None else start_position
        reason = error.reason.split(": ", 1)[-1]
        if previous is not None:
            offset = previous.next_offset
            try:
                validate_batch(self.pread_exact(previous.position, previous.size_bytes))
            except CorruptRecordError as previous_error:
                offset, position = previous.base_offset, previous.position
                reason = previous_error.reason
        next_offset = max(self.resume_offset_after(position), offset + 1)
        return CorruptLogError(reason, offset=offset, next_offset=next_offset,
                               position=position, segment_base_offset=self.base_offset)

    def _damaged_tail_error(self) -> CorruptLogError:
        damaged = self.damaged
        assert damaged is not None
        return CorruptLogError(damaged.reason, offset=damaged.offset,
                               next_offset=damaged.next_offset, position=damaged.position,
                               segment_base_offset=self.base_offset)

    def find_batch(self, offset: int) -> BatchSpan | None:
        """The batch holding ``offset``, or None when the segment does not hold it.

        CorruptLogError when the batches from the index entry to it do not check out, or when
        ``offset`` lies in the damaged tail recovery found."""
        if offset < self.base_offset or offset >= self.next_offset:
            return None
        if self.damaged is not None and offset >= self.damaged.offset:
            raise self._damaged_tail_error()
        recent = self._recent
        if (recent and recent[0].base_offset <= offset
                and recent[-1].end_position == self.size_bytes
                and recent[-1].next_offset == self.next_offset):
            for span in reversed(recent):  # the newest first: where consumers read
                if span.base_offset <= offset:
                    return span
        key, position = self.offset_index.lookup(offset - self.base_offset)
        start_offset = self.base_offset + key
        previous: BatchSpan | None = None
        try:
            for span in self.iter_batches(position, self.size_bytes, start_offset):
                if span.next_offset > offset:
                    return span
                previous = span
        except CorruptRecordError as error:
            raise self._damage_error(error, previous, start_offset, position) from None
        # The walk reached the end below ``offset``: the last batch's offsets are wrong.
        raise self._damage_error(
            CorruptRecordError(f"the batches end before offset {offset}", self.size_bytes),
            previous, start_offset, position)

    def read_range(self, offset: int, max_bytes: int, end: tuple[int, int] | None = None
                   ) -> tuple[int, int, BatchSpan, int] | None:
        """(position, size_bytes, first batch, next offset) of the whole batches from the one
        holding ``offset`` that fit in ``max_bytes`` -- at least that first batch.  ``next
        offset`` is the offset after the last batch of the range (where the next read starts),
        checked against the header after it or the segment's end.  Damage inside the range ends
        it before the batch that may be at fault (the next read meets that batch first).
        ``end``: (position, offset) of a batch boundary past ``offset`` where reading stops
        (the flushed end), instead of the segment's end."""
        first = self.find_batch(offset)
        if first is None:
            return None
        size_bytes, end_offset = (self.size_bytes, self.readable_next_offset) if end is None \
            else end
        limit = first.position + max(max_bytes, first.size_bytes)
        if limit >= size_bytes:
            return first.position, size_bytes - first.position, first, end_offset
        found = self.offset_index.first_index_at_or_after_value(limit + 1) - 1
        start, start_offset = first.position, first.base_offset
        end_position, next_offset = first.end_position, first.next_offset
        if found >= 0 and int(self.offset_index.values[found]) > first.position:
            # an indexed batch boundary inside the range: resume the walk from there
            start = end_position = int(self.offset_index.values[found])
            start_offset = next_offset = self.base_offset + int(self.offset_index.keys[found])
        previous: BatchSpan | None = None
        try:
            for span in self.iter_batches(start, size_bytes, start_offset):
                if span.end_position > limit:
                    break
                previous = span
                end_position, next_offset = span.end_position, span.next_offset
        except CorruptRecordError:
            if previous is None or previous.position == first.position:
                # only the first batch: where reading can go on after it is the next index
                # entry's offset (the first batch may be the one at fault)
                return (first.position, first.size_bytes, first,
                        self.resume_offset_after(first.position))
            end_position, next_offset = previous.position, previous.base_offset
        return first.position, end_position - first.position, first, next_offset

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
            try:
                span = self.find_batch(self.base_offset + last_time[1])
            except CorruptRecordError as error:
                return f"time index's last entry names a damaged batch: {error}"
            if span is None or span.max_timestamp_ms != last_time[0]:
                return "time index's last entry does not match the batch it names"
        self._restore_tail_state(start, next_offset)
        os.lseek(self.fd, self.size_bytes, os.SEEK_SET)  # os.write appends at the fd position
        if is_last:
            self.activate()
        self._read_roll_start()
        return None

    def recover(self, buffer: bytearray, is_last: bool,
                next_base_offset: int | None = None,
                flushed_offset: int | None = None,
                walk_records_from: int | None = None) -> SegmentScan:
        """Keep the longest prefix of whole, CRC-valid, offset-contiguous batches, cut the
        rest, and rebuild the indexes when they differ from what that prefix implies.

        ``buffer`` is a reused read buffer, grown here up to SCAN_CHUNK_BYTES (or what is left
        to scan), and privately for one batch that is bigger.  A sealed segment
        (``next_base_offset``: the next segment's base) whose prefix ends below that base keeps
        its bytes past the prefix: the caller marks them damaged (see ``recovery.py``).

        ``flushed_offset`` (the recovery point, when it falls inside this segment): the batches
        below it were fsynced, and so were the index entries naming them (the checkpoint is
        written after the indexes are synced), so the scan resumes after the batch named by the
        last offset-index entry below it (see :meth:`_load_flushed_prefix`) instead of at
        byte 0.  This is
        where Kafka rescans the whole segment; doing less keeps a worker's restart short when
        its active segment is large.

        ``walk_records_from`` (the recovery point, with ``record_validation = "records"``):
        in the last segment, batches from this offset on that start in the file's last
        ``limits.append_overlap_bytes_max`` bytes must also pass :func:`check_records`.  A
        large append writes its batches while it checks them (APPEND_OVERLAP in
        partition_log.py), so a crash can leave unchecked batches there, and only there.
        """
        file_size = self.file_size_bytes
        position = 0
        if flushed_offset is not None and flushed_offset > self.base_offset:
            position = self._load_flushed_prefix(flushed_offset, file_size)
        if position == 0:
            self._reset_to_empty()
        scanned_from = position
        reason: str | None = None
        walk_from_offset = walk_records_from or 0
        walk_from_position = (file_size - limits.append_overlap_bytes_max  # else: none
                              if walk_records_from is not None and is_last else file_size)
        needed = min(SCAN_CHUNK_BYTES, file_size - position)
        if len(buffer) < needed:  # grown in place: the caller reuses it for later segments
            buffer.extend(bytes(needed - len(buffer)))
        view = memoryview(buffer)
        chunk = view[:0]
        chunk_position = 0
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
                if (position >= walk_from_position and header.codec in CHECKED_CODECS
                        and header.base_offset >= walk_from_offset):
                    check_records(chunk, relative, header)
            except CorruptRecordError as error:
                reason = error.reason
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
        if is_last or next_base_offset is None or self.next_offset >= next_base_offset:
            self._cut_file(self.size_bytes)  # also puts the fd position at the end for os.write
            if truncated:
                os.fsync(self.fd)
        else:
            truncated = 0  # kept for dump-log; never served (the caller marks it damaged)
        if not is_last:
            self.seal_entries_only()
        rebuilt = tuple(
            os.path.basename(index.path)
            for index in (self.offset_index, self.time_index)
            if self._sync_index_file(index, active=is_last)
        )
        self._read_roll_start()
        return SegmentScan(self.size_bytes, truncated, bad_position, reason, rebuilt,
                           scanned_from)

    def _reset_to_empty(self) -> None:
        self._recent.clear()
        self.size_bytes = 0
        self.next_offset = self.base_offset
        self.max_timestamp_ms = NO_TIMESTAMP
        self.offset_of_max_timestamp = self.base_offset
        self._bytes_since_index_entry = 0
        self.offset_index.set_entries(np.zeros(0), np.zeros(0))
        self.time_index.set_entries(np.zeros(0), np.zeros(0))

    def _load_flushed_prefix(self, flushed_offset: int, file_size: int) -> int:
        """Take the segment up to batch B, the one named by the last offset-index entry below
        ``flushed_offset``, as it was when B was appended: index entries up to B's, the
        largest timestamp from the time index, B itself CRC-checked.  Return the position
        after B, where the scan goes on (0 when the indexes cannot be trusted: a full scan).

        The time index gets an entry only together with an offset entry, and each names a batch
        at or before that entry's batch; so the time entries naming offsets up to B's are
        exactly those that existed once B was indexed, and the last of them holds the largest
        timestamp so far."""
        loaded = []
        for index in (self.offset_index, self.time_index):
            stored = index.read_file()
            if stored is None:
                return 0
            keys, values, _ = stored
            # A preallocated file's zero tail is unused.  Keys strictly increase, so only the
            # first entry can be a real (0, 0).
            used = np.flatnonzero(keys | values)
            count = int(used[-1]) + 1 if len(used) else 0
            keys, values = keys[:count], values[:count]
            if index.shape_problem(keys, values, count * index.ENTRY_SIZE) is not None:
                return 0
            loaded.append((keys, values))
        (offset_keys, positions), (timestamps, time_offsets) = loaded
        # the last entry naming a batch that starts below the recovery point (flushed whole)
        entry = int(np.searchsorted(offset_keys, flushed_offset - self.base_offset,
                                    side="left")) - 1
        if entry < 0:
            return 0
        if not len(timestamps):
            # A time entry comes with the first offset entry; none at all may be one (0, 0)
            # entry (a timestamp of 0) that reads as the zero tail: scan everything instead.
            return 0
        relative = int(offset_keys[entry])
        position = int(positions[entry])
        if position + LOG_OVERHEAD > file_size:
            return 0
        size = batch_size_at(self.pread_exact(position, LOG_OVERHEAD), 0)
        if size < HEADER_SIZE or position + size > file_size:
            return 0
        try:
            header = validate_batch(self.pread_exact(position, size), 0)
        except CorruptRecordError:
            return 0
        if header.base_offset != self.base_offset + relative:
            return 0
        keep = int(np.searchsorted(time_offsets, relative, side="right"))
        self.offset_index.set_entries(offset_keys[: entry + 1], positions[: entry + 1])
        self.time_index.set_entries(timestamps[:keep], time_offsets[:keep])
        self.size_bytes = position + header.size
        self._restore_tail_state(position, header.next_offset)
        return self.size_bytes

    def mark_damaged(self, next_offset: int, position: int, reason: str) -> None:
        """Recovery found this sealed segment's batches ending (or breaking) at ``position``
        below ``next_offset``, the next segment's base: those offsets become a damaged range
        that reads report, and the offsets stay contiguous (never reused)."""
        assert not self.is_active and next_offset > self.next_offset, (next_offset, self)
        self.damaged = DamagedRange(self.next_offset, next_offset, position, reason)
        self.next_offset = next_offset

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
        try:
            if consistent:
                if active:
                    index.activate()
                elif stored is not None and stored[2] != count * index.ENTRY_SIZE:
                    index.write_file(active=False)
                return False
            index.write_file(active=active)
        except OSError:
            # A full disk at boot must not stop the partition: the entries are right in memory.
            # An active index restarts as a zero file that the next append fills (that needs
            # no space); a sealed one is removed, so that the next open rebuilds it.
            if active:
                index.activate_empty()
            else:
                os.unlink(index.path)
        return True

    def _read_roll_start(self) -> None:
        """After a reopen the roll clock restarts at the first batch's max timestamp."""
        self.roll_start_ms = None
        if self.size_bytes:
            first = next(self.iter_batches(0, self.size_bytes))
            self.roll_start_ms = first.max_timestamp_ms
