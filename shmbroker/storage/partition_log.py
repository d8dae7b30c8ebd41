"""The log of one partition: ordered segments, appends, reads, retention, flushing, recovery.

Directory layout (``<data_dir>/topics/<topic>/<partition>/``)::

    00000000000000000000.log / .index / .timeindex   one segment per base offset (segment.py)
    recovery-point-offset-checkpoint                  recovery_point_offset, clean_shutdown
    log-start-offset-checkpoint                       log_start_offset

Durability cursors, in this order (asserted after every mutation)::

    log_start_offset <= log_end_offset
    flushed_offset   <= log_end_offset      offsets below flushed_offset are fsynced
    checkpointed recovery point <= flushed_offset (until truncate_to lowers both, synchronously)

The owner (one worker process) is the only writer and calls :meth:`PartitionLog.tick`
periodically for time-based flushes, retention and the recovery-point checkpoint (every
RECOVERY_POINT_CHECKPOINT_INTERVAL_MS it also fsyncs what is unflushed, so that a crash rescans
only the segments written since).  An owner that must not stall in those fsyncs (the worker)
calls ``tick(background_flush=True)`` instead and runs a :class:`FlushTicket` whenever
:meth:`PartitionLog.flush_due` says so.  The log itself starts no thread and takes no lock;
the one thing it lets another thread do is run a :class:`FlushTicket`:
:meth:`PartitionLog.begin_flush` takes what is to be fsynced (duplicated fds), the ticket's
``run`` fsyncs them anywhere, and :meth:`PartitionLog.end_flush`, back on the owner's thread,
advances ``flushed_offset``.  The owner keeps appending meanwhile (group commit without
stalling appends: see the worker).

A :class:`ReadSlice` (an fd and a byte range for ``os.sendfile``) stays valid until the next
call that deletes or truncates segments (``tick``, ``enforce_retention``, ``truncate_to``,
``delete_records_before``, ``close``); ``os.dup`` the fd to keep it longer.

Disk errors (see ``tests/unit/test_storage_enospc.py`` and ``tests/fault/test_disk_full.py``):

- A failed append -- ENOSPC or EIO from a write, a short write then an error, a roll that cannot
  create its segment -- changes nothing: segments are cut back, half-made segments deleted,
  index entries dropped, log_end_offset unchanged.  It raises :class:`StorageFullError` for a full
  disk (ENOSPC, EDQUOT) and :class:`StorageError` otherwise; the next append works as soon as
  space is back, with no reopen.  Reads never need space and go on while the disk is full.
- A failed fsync *fences* the log.  After one, what the page cache holds is unknown (Linux may
  drop the dirty pages and report success to the next fsync), so retrying would claim durability
  we do not have.  As Kafka (the log dir goes offline) and Redpanda (the process stops), the log
  then refuses appends, flushes, truncations and deletions with StorageError; reads go on.  Its
  owner must reopen it (a worker exits and its restart recovers the log from the last recovery
  point, re-reading and CRC-checking everything after it).  Batches of the append whose flush
  failed were reported failed but may be kept: a retry can store them twice (at least once).
- A checkpoint that cannot be written (full disk) is not an error: the checkpoint is only an
  optimisation of recovery.  When the stale one would claim a clean shutdown it is removed, so
  the next open scans instead of trusting it.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import NamedTuple, NoReturn

from shmbroker import limits
from shmbroker.config import LogConfig
from shmbroker.errors import (
    CorruptRecordError,
    LogClosedError,
    OffsetOutOfRangeError,
    StorageError,
    storage_error,
)
from shmbroker.format import record_batch
from shmbroker.format.record_batch import (
    BatchHeader,
    check_crc,
    frame_batch,
    set_base_offset,
)
from shmbroker.storage import overlap
from shmbroker.storage.checkpoint_file import CheckpointFile, fsync_directory
from shmbroker.storage.recovery import RecoveryReport, load_segments
from shmbroker.storage.segment import (
    CHECKED_CODECS,
    POSITION_MAX,
    RELATIVE_OFFSET_MAX,
    BatchSpan,
    Segment,
    check_records,
)
from shmbroker.storage.writeback import WritebackHint

logger = logging.getLogger("shmbroker.storage")

RECOVERY_POINT_CHECKPOINT = "recovery-point-offset-checkpoint"
LOG_START_CHECKPOINT = "log-start-offset-checkpoint"
# How often tick() fsyncs what was appended since the last flush and checkpoints the recovery
# point.  Without it, a log with no flush policy (flush_messages = flush_ms = 0, the default)
# never advanced its recovery point, and every crash rescanned everything appended since the
# last clean shutdown: worker restarts grew to seconds in a long soak run.  Kafka bounds it by
# flushing at each segment roll (and checkpoints every log.flush.offset.checkpoint.interval.ms,
# 60 s); with our 1 GiB segments that bound is too loose.  An fsync every 10 s costs little (the
# kernel writes those pages back within 30 s anyway) and bounds the rescan to ~10 s of appends.
RECOVERY_POINT_CHECKPOINT_INTERVAL_MS = 10_000
# APPEND_OVERLAP.  An append of limits.append_overlap_bytes_min or more (going whole into one
# segment) checks its batches' CRCs and record chains on the overlap helper thread (overlap.py; a
# worker turns it on or off by the broker setting worker_check_thread) while it writes them:
# os.write releases the GIL, so the check runs beside the kernel's copy.  A 64 KiB batch of
# 100-byte records takes ~15 us to check and ~25 us to write; checked first, appends of 16 such
# batches ran at under half a bare os.write's speed (bench/storage.py), overlapped ~35 % faster on
# this 2-core machine (one ~1 MB batch: ~9 %).  Below the min, the hand-off (a thread wake-up,
# tens of us on a virtual machine) costs more than it saves.  The bytes reach the file before
# their check ends: a refused call cuts them off again before it returns, and nothing is
# acknowledged or served meanwhile (the log end moves after the check).  A crash in that window
# leaves them at the end of the last segment, past the recovery point: the recovery scan walks the
# record chains there (append_overlap_bytes_max bounds how far back).


def _wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


class _CheckpointGuard:
    """Orders the recovery-point checkpoints a flush ticket writes on another thread with the
    ones the owner writes itself: a truncation (which lowers the recovery point) or a close
    moves ``generation`` on under ``lock``, and a ticket writes only under the lock and only if
    the generation is still the one it began in.  So a ticket that was late can never put back
    a recovery point above a truncation's."""

    __slots__ = ("lock", "generation")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.generation = 0

    def advance(self) -> None:
        with self.lock:
            self.generation += 1


class CheckpointWork:
    """What a :class:`FlushTicket` does after its data fsyncs: give back the space reserved
    past the data of segments sealed since the last ticket (``releases``: a duplicated fd and
    the size to truncate to, each), fsync index files (duplicated fds: the indexes of segments
    sealed since the last ticket, and the active segment's when a checkpoint is asked for),
    then, with ``write_checkpoint``, write the recovery-point checkpoint naming the ticket's
    offset.  The releases and the checkpoint are skipped once the log truncated or closed after
    the ticket began (the guard's generation moved).  The outcome stays here for
    :meth:`PartitionLog.end_flush`."""

    __slots__ = ("index_fds", "releases", "file", "guard", "generation", "write_checkpoint",
                 "written", "error")

    def __init__(self, index_fds: list[int], file: CheckpointFile, guard: _CheckpointGuard,
                 write_checkpoint: bool, releases: list[tuple[int, int]] | None = None) -> None:
        self.index_fds = index_fds
        self.releases = releases if releases is not None else []
        self.file = file
        self.guard = guard
        self.generation = guard.generation  # the guard's then: a later one writes nothing
        self.write_checkpoint = write_checkpoint
        self.written = False
        self.error: Exception | None = None

    def run(self, recovery_point: int) -> None:
        try:
            if self.releases:
                with self.guard.lock:  # a truncation may not cut (and reuse) a file meanwhile
                    if self.guard.generation == self.generation:
                        _release_reserves(self.releases)
            for fd in self.index_fds:
                os.fsync(fd)
            if not self.write_checkpoint:
                return
            with self.guard.lock:
                if self.guard.generation == self.generation:
                    self.file.write({"recovery_point_offset": recovery_point,
                                     "clean_shutdown": 0})
                    self.written = True
        except (OSError, StorageError) as error:
            self.error = error
        finally:
            self.discard()

    def discard(self) -> None:
        _close_fds(self.index_fds)
        _close_fds([fd for fd, _ in self.releases])
        self.releases.clear()


def _release_reserves(releases: list[tuple[int, int]]) -> None:
    """Truncate each ``(fd, size)`` file to its size, freeing the blocks reserved past it
    (best effort: a failure costs disk space, not data), and close the fds.  A file whose size
    is no longer ``size`` is left alone: a truncation never extends a file here."""
    for fd, size in releases:
        try:
            if os.fstat(fd).st_size == size:
                os.ftruncate(fd, size)
        except OSError as error:
            logger.warning("cannot release the space reserved past %d bytes of a sealed "
                           "segment: %s", size, error)
    _close_fds([fd for fd, _ in releases])
    releases.clear()


class FlushTicket(NamedTuple):
    """A flush begun by :meth:`PartitionLog.begin_flush`, to be :meth:`run` on any thread and
    then handed to :meth:`PartitionLog.end_flush` on the owner's."""

    offset: int  # the log end when it began: what it makes durable
    segment_base_offset: int  # the active segment then ...
    position: int  # ... and its size then (``offset``'s byte position in it)
    fds: list[int]  # duplicates of the fds of the segments holding unflushed batches
    directory: str | None  # fsync the directory too (segments made or deleted since)
    generation: int  # the log's truncation count then: a stale ticket advances nothing
    began_ms: int  # the log's clock then: appends after it are not covered
    # index files to fsync once the data is, then the recovery-point checkpoint to write
    # (recovery point = ``offset``) when the interval asked for one; None: neither
    checkpoint: CheckpointWork | None = None

    def run(self) -> OSError | None:
        """fsync what the ticket holds (any thread: os.fsync releases the GIL), then write its
        checkpoint; close its fds.  Returns the fsync's error instead of raising it (the
        checkpoint's outcome stays in ``checkpoint``)."""
        try:
            for fd in self.fds:
                os.fsync(fd)
            if self.directory is not None:
                fsync_directory(self.directory)
        except OSError as error:
            self.discard()
            return error
        _close_fds(self.fds)
        if self.checkpoint is not None:
            self.checkpoint.run(self.offset)
        return None

    def discard(self) -> None:
        """Close the ticket's fds (a ticket that will not run)."""
        _close_fds(self.fds)
        if self.checkpoint is not None:
            self.checkpoint.discard()


def _close_fds(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
    fds.clear()


class AppendResult(NamedTuple):
    """Offsets assigned by one :meth:`PartitionLog.append`."""

    first_offset: int
    last_offset: int
    base_offsets: list[int]  # one per batch, in buffer order
    append_time_ms: int
    log_end_offset: int  # after the append


class ReadSlice(NamedTuple):
    """Whole batches of one segment: send ``size_bytes`` from ``position`` of ``fd``."""

    fd: int
    position: int
    size_bytes: int
    segment_base_offset: int
    first_offset: int  # base offset of the first batch (<= the offset asked for); log_end if empty
    log_end_offset: int  # at the time of the read
    next_offset: int  # offset after the slice's last batch: where the next read starts


class PartitionLog:
    """Ordered segments holding dense offsets ``[log_start_offset, log_end_offset)``.

    Invariants:
    - at least one segment; segments are sorted by base offset and contiguous
      (``segments[i].next_offset == segments[i + 1].base_offset``); only the last is active.
    - ``segments[0].base_offset <= log_start_offset <= log_end_offset == segments[-1].next_offset``
    - ``flushed_offset <= log_end_offset``.
    - a failed append (bad batch, disk error) leaves files and state exactly as before the call.
    - once ``fenced`` (a failed fsync) it stays fenced until closed: nothing but reads.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        config: LogConfig,
        *,
        clock_ms: Callable[[], int] = _wall_clock_ms,
        name: str | None = None,
    ) -> None:
        self.directory = os.fspath(directory)
        self.name = name if name is not None else self.directory  # what errors call it
        self.config = config
        self._clock_ms = clock_ms
        self._fenced: str | None = None
        self._append_failure: str | None = None
        # Seconds appends spent writing into the segment files (os.write, reserving space, the
        # index entries), summed since the log opened.  A writer the kernel holds back while
        # it writes dirty pages to a disk that lags (or a slow disk) waits here, off the CPU.
        self.write_s = 0.0
        # Seconds appends spent checking batches (CRC-32C, record chains) on the appending
        # thread, or waiting for the check thread to finish them (APPEND_OVERLAP).  The
        # worker's stall warnings say how much of a long turn each of the two was.
        self.check_s = 0.0
        # Seconds appends spent rolling segments: making the next one's files and sealing the
        # one before (file creation and truncation wait for the file system's journal, which
        # can wait for the writeback of everything dirty).
        self.roll_s = 0.0
        os.makedirs(self.directory, exist_ok=True)
        self._recovery_checkpoint = CheckpointFile(
            os.path.join(self.directory, RECOVERY_POINT_CHECKPOINT))
        self._log_start_checkpoint = CheckpointFile(
            os.path.join(self.directory, LOG_START_CHECKPOINT))
        recovery = self._read_checkpoint(self._recovery_checkpoint)
        recovery_point = recovery.get("recovery_point_offset", 0)
        clean_shutdown = recovery.get("clean_shutdown", 0) == 1
        self.recovery_report: RecoveryReport
        segments, self.recovery_report = load_segments(
            self.directory, config, recovery_point, clean_shutdown,
            frozenset((RECOVERY_POINT_CHECKPOINT, LOG_START_CHECKPOINT)))
        stored_log_start = self._read_checkpoint(self._log_start_checkpoint).get(
            "log_start_offset", 0)
        if segments and stored_log_start > segments[-1].next_offset:
            # A crash lost unflushed batches below a durable log start: restart empty there,
            # offsets never go back below a log start consumers may have seen.
            logger.warning("%s: log start %s is past the recovered log end %s; restarting the "
                           "log empty at %s", self.directory, stored_log_start,
                           segments[-1].next_offset, stored_log_start)
            for segment in segments:
                segment.delete_files()
                self.recovery_report.segments_deleted.append(segment.base_offset)
            segments = []
        if not segments:
            segments = [Segment.create(self.directory, stored_log_start, config)]
            fsync_directory(self.directory)
        self._segments = segments
        self._base_offsets = [segment.base_offset for segment in segments]
        self._closed = False
        self._log_end_offset = segments[-1].next_offset
        self._log_start_offset = min(max(segments[0].base_offset, stored_log_start),
                                     self._log_end_offset)
        # What recovery kept past the recovery point may sit only in the page cache (a process
        # crash): it counts as unflushed, and the flush policy takes it from here.
        self._flushed_offset = min(max(recovery_point, segments[0].base_offset),
                                   self._log_end_offset)
        self._unflushed_since_ms: int | None = (
            None if self._flushed_offset == self._log_end_offset else clock_ms())
        self._directory_dirty = bool(self.recovery_report.segments_deleted)
        self._directory_in_flight = False  # a FlushTicket will fsync the directory
        self._truncations = 0  # FlushTicket.generation
        # (segment base offset, byte position) of flushed_offset, for reads of flushed batches
        # only; None: found (and kept) at the next such read
        self._flushed_position: tuple[int, int] | None = None
        self._checkpointed_recovery_point = -1
        self._last_checkpoint_ms = clock_ms()
        # background flushes: the interval's checkpoint waits for the next ticket, which
        # writes it on the flush thread (inline, its four fsyncs stalled the worker's thread
        # for tens of ms every interval)
        self._checkpoint_wanted = False
        self._checkpoint_guard = _CheckpointGuard()
        # An owner that runs flush tickets (begin_flush) gets segment rolls that do not fsync
        # the sealed segment's index files on its thread: their fds wait here for the next
        # ticket, which fsyncs them (before any checkpoint could trust them).
        self._tickets_used = False
        self._sealed_index_fds: list[int] = []
        # With tickets, a roll leaves the release of the sealed segment's reserved space to the
        # next ticket too: (duplicated fd, size to truncate to) each (Segment.reserve_release).
        self._reserve_releases: list[tuple[int, int]] = []
        # What take_writeback handed out: (the active segment's base offset, the position its
        # writeback was asked up to).
        self._written_back = (-1, 0)
        if not self._try_recovery_checkpoint():
            # It may still say "clean shutdown": a crash from now on must not be trusted as one.
            # (Removing a file needs no space.)  The next open then scans everything.
            try:
                os.unlink(self._recovery_checkpoint.path)
            except FileNotFoundError:
                pass
            except OSError as error:
                raise StorageError(f"partition {self.name}: cannot replace or remove "
                                   f"{self._recovery_checkpoint.path}: {error.strerror or error}"
                                   ) from error
        self._check_invariants()

    # -- cursors ------------------------------------------------------------------------------
    @property
    def log_start_offset(self) -> int:
        return self._log_start_offset

    @property
    def log_end_offset(self) -> int:
        return self._log_end_offset

    @property
    def flushed_offset(self) -> int:
        return self._flushed_offset

    @property
    def segments(self) -> tuple[Segment, ...]:
        return tuple(self._segments)

    @property
    def active_segment(self) -> Segment:
        return self._segments[-1]

    @property
    def size_bytes(self) -> int:
        return sum(segment.size_bytes for segment in self._segments)

    @property
    def is_closed(self) -> bool:
        return self._closed

    @property
    def fenced(self) -> str | None:
        """Why the log refuses writes after a failed fsync (None: it does not); see the module
        docstring.  Reopen it to go on."""
        return self._fenced

    @property
    def append_failure(self) -> str | None:
        """The error of the last append if it failed on the disk (e.g. no space left); None
        once an append succeeds again."""
        return self._append_failure

    def _check_invariants(self, appended: bool = False) -> None:
        """The class invariants; after an append (``appended``) in O(1): an append only adds
        segments at the end, so the base offsets are checked there, not over every segment
        (with small segments and long retention, a walk per append would dominate it)."""
        segments = self._segments
        if appended:
            assert len(self._base_offsets) == len(segments)
            assert self._base_offsets[-1] == segments[-1].base_offset
        else:
            assert segments and self._base_offsets == [s.base_offset for s in segments]
        assert segments[0].base_offset <= self._log_start_offset <= self._log_end_offset
        assert self._log_end_offset == segments[-1].next_offset
        assert self._flushed_offset <= self._log_end_offset
        assert segments[-1].is_active

    def _check_open(self) -> None:
        if self._closed:
            raise LogClosedError(f"partition log {self.directory} is closed")

    def _check_writable(self) -> None:
        self._check_open()
        if self._fenced is not None:
            raise StorageError(f"partition {self.name}: the log refuses writes until it is "
                               f"reopened: {self._fenced}")

    # -- append -------------------------------------------------------------------------------
    def append(self, buffer: bytes | bytearray | memoryview, *,
               defer_flush: bool = False) -> AppendResult:
        """Append one or more concatenated batches; assign their offsets; return them.

        Every batch is validated (header, size <= max_batch_bytes, CRC-32C, and
        ``records_count == last_offset_delta + 1`` as Kafka requires of producers, and its
        record chain with ``record_validation = "records"``); one bad batch refuses the whole
        call with CorruptRecordError and nothing is stored.  The contents of a large call are
        checked while it is written (APPEND_OVERLAP), and cut off again if bad.
        Base offsets are rewritten *in place when ``buffer`` is writable* (a bytearray or
        writable memoryview, e.g. a ring slot -- no copy), into a private copy otherwise.
        Batches go to the active segment with one os.write per segment touched, rolling between
        batches when needed.  A disk error
        raises StorageError (StorageFullError for a full disk) and leaves the log as it was.  A
        failed flush (``flush_messages``) after the write fences the log and raises StorageError.
        With ``defer_flush`` the caller owns the ``flush_messages`` policy (it flushes with
        :meth:`begin_flush`, off its thread, before it acknowledges).
        """
        if self._closed or self._fenced is not None:  # (no call on the hot path)
            self._check_writable()
        view = memoryview(buffer)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        spans, headers = self._frame(view)
        unchecked: list[BatchHeader] | None = headers
        if not limits.append_overlap_bytes_min <= view.nbytes <= limits.append_overlap_bytes_max:
            self._check_timed(view, headers, spans)
            unchecked = None
        if view.readonly:
            view = memoryview(bytearray(view))
        for span in spans:
            set_base_offset(view, span.position, span.base_offset)
        now_ms = self._clock_ms()
        self._write(view, spans, now_ms, unchecked)
        first, last = spans[0].base_offset, spans[-1].next_offset - 1
        self._log_end_offset = last + 1
        if self._append_failure is not None:
            logger.warning("partition %s: appends work again (log end %d)", self.name,
                           self._log_end_offset)
            self._append_failure = None
        if self._unflushed_since_ms is None:
            self._unflushed_since_ms = now_ms
        flush_messages = self.config.flush_messages
        if (flush_messages and not defer_flush
                and self._log_end_offset - self._flushed_offset >= flush_messages):
            self.flush()
        self._check_invariants(appended=True)
        return AppendResult(first, last, [span.base_offset for span in spans], now_ms,
                            self._log_end_offset)

    def _frame(self, view: memoryview) -> tuple[list[BatchSpan], list[BatchHeader]]:
        """Cut ``view`` into batches and assign their offsets, checking each header and size;
        :meth:`_check_batches` checks what they hold.  A bad header refuses the call, with the
        error of an earlier batch's contents if one is bad too (the first bad batch is named,
        as when each batch is checked whole before the next)."""
        if not view.nbytes:
            raise CorruptRecordError("empty append: the buffer holds no batch")
        spans: list[BatchSpan] = []
        headers: list[BatchHeader] = []
        position = 0
        next_offset = self._log_end_offset
        max_batch_bytes = self.config.max_batch_bytes
        try:
            while position < view.nbytes:
                header = frame_batch(view, position, max_batch_bytes)
                if header.records_count != header.last_offset_delta + 1:
                    raise CorruptRecordError(
                        f"batch {len(spans)} declares {header.records_count} records but "
                        f"last_offset_delta {header.last_offset_delta}; a produced batch must "
                        "have records_count == last_offset_delta + 1", position)
                spans.append(BatchSpan(position, next_offset, header.size,
                                       header.last_offset_delta, header.max_timestamp))
                headers.append(header)
                next_offset += header.last_offset_delta + 1
                position += header.size
        except CorruptRecordError:
            self._check_batches(view, headers, spans)
            raise
        return spans, headers

    def _check_timed(self, view: memoryview, headers: list[BatchHeader],
                     spans: list[BatchSpan]) -> None:
        """:meth:`_check_batches` on this thread, its time counted in ``check_s``."""
        began = time.monotonic()
        try:
            self._check_batches(view, headers, spans)
        finally:
            self.check_s += time.monotonic() - began

    def _check_batches(self, view: memoryview, headers: list[BatchHeader],
                       spans: list[BatchSpan]) -> None:
        """CorruptRecordError naming the first batch whose CRC-32C (and with
        ``record_validation = "records"``, whose record chain) is wrong.  Reads only what each
        CRC covers (not the base offsets, which the caller may rewrite first)."""
        walk = self.config.record_validation == "records"
        for number, (header, span) in enumerate(zip(headers, spans)):
            position = span.position
            check_crc(view, position, header)
            if walk and header.codec in CHECKED_CODECS:  # records as the header says
                try:
                    check_records(view, position, header)
                except CorruptRecordError as error:
                    raise CorruptRecordError(f"batch {number}: {error}", position) from None

    def _write(self, view: memoryview, spans: list[BatchSpan], now_ms: int,
               unchecked: list[BatchHeader] | None = None) -> None:
        """Write ``spans`` of ``view`` segment by segment; undo everything on OSError or a bad
        batch.

        ``unchecked``: the batches' headers, when :meth:`_check_batches` is still to run.  When
        they all go to one segment it runs on the overlap helper while they are written (see
        APPEND_OVERLAP), else before anything is written.  Its verdict comes before anything is
        committed (a segment sealed, the log end moved): a bad batch undoes the write as an
        OSError does, and outranks a disk error (it would have been found first)."""
        config = self.config
        original = self._segments[-1]
        snapshot = original.snapshot()
        created: list[Segment] = []
        target = original
        overlapped = False
        try:
            if (target.size_bytes and target.roll_start_ms is not None
                    and now_ms - target.roll_start_ms >= config.segment_ms):
                target = self._create_segment(spans[0].base_offset)
                created.append(target)
            index = 0
            while index < len(spans):
                stop = index
                size_bytes = target.size_bytes
                free_entries = target.free_index_entries()
                while stop < len(spans) and stop - index < free_entries:
                    span = spans[stop]
                    if not _fits(target, size_bytes, span, config.segment_bytes):
                        break
                    size_bytes += span.size_bytes
                    stop += 1
                if stop == index:
                    target = self._create_segment(spans[index].base_offset)
                    created.append(target)
                    continue
                start_position = spans[index].position
                if start_position == 0 and stop == len(spans):  # all of it (the usual)
                    if unchecked is not None:
                        overlapped = overlap.OVERLAP.start(self._check_batches, view, unchecked,
                                                           spans)
                        if not overlapped:
                            self._check_timed(view, unchecked, spans)
                    began = time.monotonic()
                    target.append(view, spans, now_ms, snapshot if target is original else None)
                    self.write_s += time.monotonic() - began
                    break
                if unchecked is not None:
                    self._check_timed(view, unchecked, spans)
                    unchecked = None
                chunk = view[start_position : spans[stop - 1].end_position]
                began = time.monotonic()
                target.append(chunk, [span._replace(position=span.position - start_position)
                                      for span in spans[index:stop]], now_ms,
                              snapshot if target is original else None)
                self.write_s += time.monotonic() - began
                index = stop
            if overlapped:
                began = time.monotonic()
                bad = overlap.OVERLAP.wait()
                self.check_s += time.monotonic() - began
                overlapped = False  # waited for (an interrupt in the wait: waited below)
                if bad is not None:
                    raise bad
        except BaseException as error:  # a disk error, a bad batch (or an interrupt): undo
            for segment in created:
                segment.delete_files()
            original.restore(snapshot)
            if original.cut_pending is not None:
                logger.error("partition %s: %s; appends wait for a cut that works",
                             self.name, original.cut_pending)
            if overlapped and (bad := overlap.OVERLAP.wait()) is not None:
                raise bad from None
            if isinstance(error, OSError):
                raise self._append_error(error) from error
            raise
        if created:
            began = time.monotonic()
            for segment in created:
                self._seal(self._segments[-1])
                self._segments.append(segment)
                self._base_offsets.append(segment.base_offset)
                self._directory_dirty = True
            self.roll_s += time.monotonic() - began

    def _create_segment(self, base_offset: int) -> Segment:
        """The next segment's files, made for an append (its time counted in ``roll_s``)."""
        began = time.monotonic()
        try:
            return Segment.create(self.directory, base_offset, self.config)
        finally:
            self.roll_s += time.monotonic() - began

    def _append_error(self, error: OSError) -> StorageError:
        """The error of a failed append; logs the first of a run of them (not every retry)."""
        text = (error.strerror or os.strerror(error.errno)) if error.errno else str(error)
        name = errno.errorcode.get(error.errno or 0, "EIO")
        where = f" ({error.filename})" if error.filename else ""
        message = (f"partition {self.name}: cannot append: {text}{where} [{name}]; nothing was "
                   f"stored, log end stays {self._log_end_offset}; ")
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            message += "produce again once space is freed (no restart needed)"
        else:
            message += "produce again once the disk recovers"
        if self._append_failure is None:
            logger.error("%s (further failures are not logged until an append succeeds)",
                         message)
        self._append_failure = message
        return storage_error(message, error.errno)

    def _seal(self, segment: Segment) -> None:
        if self._tickets_used:
            try:
                release = segment.reserve_release()
            except OSError:  # no fd to be had: seal releases it here
                release = None
            if release is not None:
                self._reserve_releases.append(release)
        try:
            self._sealed_index_fds += segment.seal(defer_fsync=self._tickets_used)
        except OSError:  # indexes are derived data: recovery rebuilds them
            logger.exception("cannot seal the indexes of %s", segment.log_path)

    def _sync_sealed_indexes(self) -> None:
        """fsync (here) and close the index files of segments sealed for a ticket that has
        not come yet: a checkpoint written on this thread may trust them."""
        _release_reserves(self._reserve_releases)
        fds, self._sealed_index_fds = self._sealed_index_fds, []
        try:
            for fd in fds:
                os.fsync(fd)
        finally:
            _close_fds(fds)

    # -- reads --------------------------------------------------------------------------------
    def _segment_for(self, offset: int) -> Segment:
        if not self._log_start_offset <= offset <= self._log_end_offset:
            raise OffsetOutOfRangeError(offset, self._log_start_offset, self._log_end_offset)
        return self._segments[bisect.bisect_right(self._base_offsets, offset) - 1]

    def read(self, offset: int, max_bytes: int, *, flushed_only: bool = False) -> ReadSlice:
        """Whole batches from the one holding ``offset``, within one segment, about ``max_bytes``
        (at least one batch).  Empty at log_end; OffsetOutOfRangeError outside the log;
        CorruptLogError (with the offset to resume from) where stored batches are damaged.
        With ``flushed_only``, only batches below ``flushed_offset`` (empty from there on)."""
        self._check_open()
        segment = self._segment_for(offset)
        end = self._flushed_offset if flushed_only else self._log_end_offset
        if offset >= end:
            active = self._segments[-1]
            return ReadSlice(active.fd, active.size_bytes, 0, active.base_offset,
                             offset, self._log_end_offset, offset)
        cap = None
        if segment.next_offset > end:  # flushed_offset falls inside this segment
            cap = (self._flushed_position_in(segment), end)
        found = segment.read_range(offset, max_bytes, cap)
        assert found is not None, (offset, segment.base_offset, segment.next_offset)
        position, size_bytes, first, next_offset = found
        return ReadSlice(segment.fd, position, size_bytes, segment.base_offset,
                         first.base_offset, self._log_end_offset, next_offset)

    def _flushed_position_in(self, segment: Segment) -> int:
        """The byte position of flushed_offset (a batch boundary) in ``segment``."""
        known = self._flushed_position
        if known is not None and known[0] == segment.base_offset:
            return known[1]
        span = segment.find_batch(self._flushed_offset)
        assert span is not None and span.base_offset == self._flushed_offset, (
            span, self._flushed_offset)
        self._flushed_position = (segment.base_offset, span.position)
        return span.position

    def position_in_active(self, offset: int) -> tuple[int, int] | None:
        """``(active segment's base offset, byte position of offset in it)`` when ``offset``
        is log_end_offset or flushed_offset and in the active segment (positions known
        without a search); None otherwise."""
        active = self._segments[-1]
        if offset == self._log_end_offset:
            return active.base_offset, active.size_bytes
        if offset == self._flushed_offset and active.base_offset <= offset:
            return active.base_offset, self._flushed_position_in(active)
        return None

    def read_bytes(self, offset: int, max_bytes: int) -> bytes:
        """As :meth:`read`, but the bytes themselves (os.pread)."""
        found = self.read(offset, max_bytes)
        if not found.size_bytes:
            return b""
        segment = self._segments[bisect.bisect_right(self._base_offsets, found.first_offset) - 1]
        return segment.pread_exact(found.position, found.size_bytes)

    def offset_for_timestamp(self, timestamp_ms: int) -> tuple[int, int] | None:
        """(offset, timestamp) of the first record with timestamp >= ``timestamp_ms``
        at or after log_start, or None when there is none."""
        self._check_open()
        log_start = self._log_start_offset
        for segment in self._segments:
            if segment.max_timestamp_ms < timestamp_ms or segment.next_offset <= log_start:
                continue
            for span in segment.iter_batches(segment.timestamp_start_position(timestamp_ms),
                                             segment.size_bytes):
                if span.max_timestamp_ms < timestamp_ms or span.next_offset <= log_start:
                    continue
                data = segment.pread_exact(span.position, span.size_bytes)
                batch = record_batch.decode_columnar(data, 0)
                wanted = (batch.timestamps >= timestamp_ms) & (batch.offsets >= log_start)
                if wanted.any():
                    found = int(wanted.argmax())
                    return int(batch.offsets[found]), int(batch.timestamps[found])
            damaged = segment.damaged
            if damaged is not None and damaged.next_offset > log_start:
                # The answer may lie in records nobody can read: name the first of them
                # (timestamp unknown) so that a consumer seeking there is told, not skipped.
                return max(damaged.offset, log_start), -1
        return None

    # -- durability ---------------------------------------------------------------------------
    def flush(self) -> None:
        """fsync every segment holding unflushed offsets (and the directory after rolls)."""
        self._check_writable()
        directory = self._directory_dirty or self._directory_in_flight
        if self._flushed_offset == self._log_end_offset and not directory:
            return
        try:
            for segment in self._unflushed_segments():
                segment.flush()
            if directory:
                fsync_directory(self.directory)
                self._directory_dirty = False
        except OSError as error:
            self._fence_for(error)
        active = self._segments[-1]
        self._flushed_offset = self._log_end_offset
        self._flushed_position = (active.base_offset, active.size_bytes)
        self._unflushed_since_ms = None
        self._check_invariants()

    def _unflushed_segments(self) -> list[Segment]:
        found = []
        for segment in reversed(self._segments):
            if segment.next_offset <= self._flushed_offset and segment.size_bytes:
                break
            found.append(segment)
        return found

    def _fence_for(self, error: OSError) -> NoReturn:
        """Fence the log after a failed fsync and raise StorageError."""
        self._fence(f"fsync failed ({errno.errorcode.get(error.errno or 0, 'EIO')}: "
                    f"{error.strerror or error}) with offsets [{self._flushed_offset}, "
                    f"{self._log_end_offset}) not known to be durable")
        raise StorageError(f"partition {self.name}: {self._fenced}") from error

    def take_writeback(self) -> WritebackHint | None:
        """The active segment's bytes whose writeback is now due (``segment_writeback_bytes``
        of them appended since the last asked for; storage/writeback.py says why), for another
        thread to :meth:`~WritebackHint.run` (it holds a duplicate of the segment's fd), or None.
        Each byte is handed out once; those of a segment that rolled before they were are left
        to its flushes."""
        step = self.config.segment_writeback_bytes
        if not step or self._closed:
            return None
        active = self._segments[-1]
        segment, position = self._written_back
        if segment != active.base_offset:
            segment, position = active.base_offset, 0
        if active.size_bytes - position < step:
            self._written_back = (segment, position)
            return None
        try:
            fd = os.dup(active.fd)
        except OSError:  # no fd to be had: the kernel's own writeback does it, later
            return None
        self._written_back = (segment, active.size_bytes)
        return WritebackHint(fd, position, active.size_bytes - position)

    def begin_flush(self) -> FlushTicket | None:
        """Take what :meth:`flush` would fsync now, as a ticket to run on another thread while
        this one goes on appending; None when everything is flushed.  The ticket then goes to
        :meth:`end_flush` (on this thread): only that advances ``flushed_offset``."""
        self._check_writable()
        self._tickets_used = True
        if (self._flushed_offset == self._log_end_offset and not self._directory_dirty
                and not self._checkpoint_wanted and not self._sealed_index_fds
                and not self._reserve_releases):
            return None
        fds: list[int] = []
        checkpoint = None
        active = self._segments[-1]
        try:
            for segment in self._unflushed_segments():
                fds.append(os.dup(segment.fd))
            if self._checkpoint_wanted or self._sealed_index_fds or self._reserve_releases:
                index_fds = active.dup_index_fds() if self._checkpoint_wanted else []
                checkpoint = CheckpointWork(self._sealed_index_fds + index_fds,
                                            self._recovery_checkpoint, self._checkpoint_guard,
                                            self._checkpoint_wanted, self._reserve_releases)
        except OSError:  # out of fds: flush (and checkpoint) here instead
            _close_fds(fds)
            self.flush()
            if self._checkpoint_wanted:
                self._checkpoint_wanted = False
                self._try_recovery_checkpoint()
            else:
                with contextlib.suppress(OSError):  # derived data: recovery rebuilds them
                    self._sync_sealed_indexes()
            return None
        self._sealed_index_fds = []  # the ticket's now
        self._reserve_releases = []
        self._checkpoint_wanted = False
        directory = self.directory if self._directory_dirty else None
        if directory is not None:
            self._directory_dirty = False
            self._directory_in_flight = True
        return FlushTicket(self._log_end_offset, active.base_offset, active.size_bytes, fds,
                           directory, self._truncations, self._clock_ms(), checkpoint)

    def end_flush(self, ticket: FlushTicket, error: OSError | None) -> None:
        """Take the outcome of a ticket from :meth:`begin_flush`: advance ``flushed_offset``
        to its offset, or fence the log (and raise StorageError) when its fsync failed."""
        ticket.discard()
        if self._closed:
            return
        if ticket.directory is not None:
            self._directory_in_flight = False
            if error is not None:
                self._directory_dirty = True
        if error is not None:
            self._fence_for(error)
        if ticket.generation == self._truncations and ticket.offset > self._flushed_offset:
            self._flushed_offset = ticket.offset
            self._flushed_position = (ticket.segment_base_offset, ticket.position)
            # what is still unflushed was appended after the ticket began (flush_ms counts
            # from then: at worst a flush comes early, never late)
            self._unflushed_since_ms = (None if ticket.offset == self._log_end_offset
                                        else ticket.began_ms)
        work = ticket.checkpoint
        if work is not None:
            if work.written:  # (only in the ticket's generation: ticket.offset is flushed)
                self._checkpointed_recovery_point = ticket.offset
            elif work.error is not None:  # the checkpoint: tried again after the interval
                logger.warning("partition %s: cannot make the index files and the "
                               "recovery-point checkpoint durable: %s", self.name, work.error)
        self._check_invariants()

    def _fence(self, reason: str) -> None:
        if self._fenced is None:
            self._fenced = reason
            logger.error("partition %s: log fenced: %s; it takes no more writes until reopened",
                         self.name, reason)

    def maybe_flush(self, now_ms: int | None = None) -> bool:
        """Flush when the oldest unflushed append is ``flush_ms`` old; True if it flushed."""
        self._check_open()
        if self._flush_ms_due(self._clock_ms() if now_ms is None else now_ms):
            self.flush()
            return True
        return False

    def _flush_ms_due(self, now_ms: int) -> bool:
        """Whether ``flush_ms`` is set and the oldest unflushed append is that old."""
        flush_ms = self.config.flush_ms
        since = self._unflushed_since_ms
        return bool(flush_ms) and since is not None and now_ms - since >= flush_ms

    def flush_due(self, now_ms: int | None = None) -> bool:
        """Whether a flush is due now, for an owner that flushes in the background (see
        :meth:`tick`, and ``append(defer_flush=True)``): ``flush_messages`` records are
        unflushed, or the oldest unflushed append is ``flush_ms`` old, or as old as the
        recovery-point interval (which bounds what a crash rescans)."""
        if self._checkpoint_wanted or self._sealed_index_fds or self._reserve_releases:
            return True
        since = self._unflushed_since_ms
        if since is None or self._flushed_offset == self._log_end_offset:
            return False
        flush_messages = self.config.flush_messages
        if flush_messages and self._log_end_offset - self._flushed_offset >= flush_messages:
            return True
        now_ms = self._clock_ms() if now_ms is None else now_ms
        return (self._flush_ms_due(now_ms)
                or now_ms - since >= RECOVERY_POINT_CHECKPOINT_INTERVAL_MS)

    def tick(self, now_ms: int | None = None, *, background_flush: bool = False) -> list[int]:
        """Periodic work: time-based flush, retention, recovery-point checkpoint.

        With ``background_flush`` it fsyncs nothing itself: the owner runs the flushes that
        :meth:`flush_due` asks for as tickets off its thread, and the checkpoint records what
        they made durable.  Returns the base offsets of the segments retention deleted.
        """
        self._check_writable()
        now_ms = self._clock_ms() if now_ms is None else now_ms
        if background_flush:
            self._tickets_used = True  # rolls leave their index fsyncs to the tickets
        else:
            self.maybe_flush(now_ms)
        deleted = self.enforce_retention(now_ms)
        if now_ms - self._last_checkpoint_ms >= RECOVERY_POINT_CHECKPOINT_INTERVAL_MS:
            self._last_checkpoint_ms = now_ms
            if background_flush:  # the owner's next ticket flushes and checkpoints
                self._checkpoint_wanted = (
                    self._checkpointed_recovery_point != self._log_end_offset)
            else:
                if self._flushed_offset < self._log_end_offset:
                    self.flush()  # a failed fsync fences the log, as any flush does
                if self._flushed_offset != self._checkpointed_recovery_point:
                    self._try_recovery_checkpoint()  # on failure: again after the interval
        return deleted

    def _write_recovery_checkpoint(self, *, clean_shutdown: bool) -> None:
        # Recovery trusts the active segment's index entries below the recovery point (it
        # scans on from the last of them), and the sealed segments' indexes: they must be on
        # disk before the checkpoint says so (those sealed for a ticket too).
        active = self._segments[-1]
        if active.is_active or self._sealed_index_fds:
            try:
                self._sync_sealed_indexes()
                if active.is_active:
                    active.flush_indexes()
            except OSError as error:
                raise StorageError(f"partition {self.name}: cannot sync the indexes of "
                                   f"{active.log_path}: {error.strerror or error}") from error
        with self._checkpoint_guard.lock:  # one writer of the file (and its .tmp) at a time
            self._recovery_checkpoint.write({"recovery_point_offset": self._flushed_offset,
                                             "clean_shutdown": int(clean_shutdown)})
        self._checkpointed_recovery_point = self._flushed_offset

    def _try_recovery_checkpoint(self, *, clean_shutdown: bool = False) -> bool:
        """Write the recovery-point checkpoint; on a disk error log it and return False (the
        one on disk is older: recovery scans more, never less)."""
        try:
            self._write_recovery_checkpoint(clean_shutdown=clean_shutdown)
        except StorageError as error:
            logger.warning("partition %s: %s", self.name, error)
            return False
        return True

    @staticmethod
    def _read_checkpoint(checkpoint: CheckpointFile) -> dict[str, int]:
        try:
            return checkpoint.read() or {}
        except StorageError:
            logger.warning("ignoring unreadable checkpoint %s", checkpoint.path, exc_info=True)
            return {}

    # -- deletion -----------------------------------------------------------------------------
    def enforce_retention(self, now_ms: int | None = None) -> list[int]:
        """Delete the oldest sealed segments past retention_ms (by their largest timestamp)
        or while the log is over retention_bytes.  Never the active segment."""
        self._check_writable()
        now_ms = self._clock_ms() if now_ms is None else now_ms
        retention_ms, retention_bytes = self.config.retention_ms, self.config.retention_bytes
        deleted: list[int] = []
        total_bytes = self.size_bytes
        while len(self._segments) > 1:
            oldest = self._segments[0]
            expired = retention_ms >= 0 and now_ms - oldest.max_timestamp_ms > retention_ms
            too_big = retention_bytes >= 0 and total_bytes - oldest.size_bytes >= retention_bytes
            if not (expired or too_big):
                break
            total_bytes -= oldest.size_bytes
            deleted.append(oldest.base_offset)
            self._delete_oldest()
        if deleted:
            logger.info("retention deleted segments %s of %s", deleted, self.directory)
        self._check_invariants()
        return deleted

    def _delete_oldest(self) -> None:
        oldest = self._segments.pop(0)
        self._base_offsets.pop(0)
        oldest.delete_files()
        self._log_start_offset = max(self._log_start_offset, self._segments[0].base_offset)
        self._directory_dirty = True

    def delete_records_before(self, offset: int) -> int:
        """Make ``offset`` the new log start (Kafka's DeleteRecords); returns log_start_offset.

        The new start is checkpointed before any file goes; segments wholly below it are deleted
        (the active one too, by rolling first, when ``offset == log_end_offset``)."""
        self._check_writable()
        if offset > self._log_end_offset or offset < 0:
            raise OffsetOutOfRangeError(offset, self._log_start_offset, self._log_end_offset)
        if offset <= self._log_start_offset:
            return self._log_start_offset
        self._log_start_checkpoint.write({"log_start_offset": offset})
        self._log_start_offset = offset
        active = self._segments[-1]
        if active.size_bytes and active.next_offset <= offset:
            new = Segment.create(self.directory, self._log_end_offset, self.config)
            self._seal(active)
            self._segments.append(new)
            self._base_offsets.append(new.base_offset)
        while len(self._segments) > 1 and self._segments[0].next_offset <= offset:
            self._delete_oldest()
        self.flush()
        self._check_invariants()
        return self._log_start_offset

    def truncate_to(self, offset: int) -> int:
        """Drop every batch holding an offset >= ``offset`` (mirrors); returns log_end_offset.

        A batch straddling ``offset`` goes whole, so log_end may end below ``offset``.  Below
        log_start the log is emptied and restarts at ``offset``.  Durable on return."""
        self._check_writable()
        if offset >= self._log_end_offset:
            return self._log_end_offset
        if offset < 0:
            raise OffsetOutOfRangeError(offset, self._log_start_offset, self._log_end_offset)
        logger.info("truncating %s to offset %s (log end %s)", self.directory, offset,
                    self._log_end_offset)
        # Before any cut: a ticket in flight gives back no reserved space once the guard moved
        # (a segment cut and appended to again must never be truncated back to its old size),
        # and the releases not yet handed to a ticket are done here, while sizes are final.
        self._checkpoint_guard.advance()
        _release_reserves(self._reserve_releases)
        self._written_back = (-1, 0)  # (a cut segment's writeback is asked for from its start)
        while self._segments and self._segments[-1].base_offset >= offset:
            self._segments.pop().delete_files()
            self._base_offsets.pop()
        if not self._segments or offset < self._log_start_offset:
            self._restart_at(offset)
        else:
            last = self._segments[-1]
            last.truncate_to_offset(offset)
            last.activate()
            if last.next_offset < self._log_start_offset:
                # The batch straddling log start went: restart empty at log start, so offsets
                # never go back below a log start consumers may have seen.
                self._restart_at(self._log_start_offset)
        self._log_end_offset = self._segments[-1].next_offset
        fsync_directory(self.directory)
        self._directory_dirty = False
        self._truncations += 1  # a flush begun before advances nothing
        self._checkpoint_guard.advance()  # nor writes its checkpoint over ours
        self._flushed_offset = min(self._flushed_offset, self._log_end_offset)
        self._flushed_position = None
        self._segments[-1].flush()
        self._write_recovery_checkpoint(clean_shutdown=False)
        self._check_invariants()
        return self._log_end_offset

    def _restart_at(self, offset: int) -> None:
        for segment in self._segments:
            segment.delete_files()
        self._segments = [Segment.create(self.directory, offset, self.config)]
        self._base_offsets = [offset]
        self._log_start_offset = offset
        self._log_start_checkpoint.write({"log_start_offset": offset})

    # -- closing ------------------------------------------------------------------------------
    def close(self) -> None:
        """Flush, trim the indexes, checkpoint a clean shutdown, close every fd.

        A fenced log is abandoned instead (no flush, no clean-shutdown mark: the next open
        recovers it).  A disk error while trimming or checkpointing is logged, every fd still
        closed, and the shutdown is not marked clean (the next open scans); a failed flush
        raises StorageError after closing everything."""
        if self._closed:
            return
        if self._fenced is None:
            try:
                self.flush()
            except StorageError:
                pass  # fenced now: abandoned below, then raised
        if self._fenced is not None:
            self.abandon()
            raise StorageError(f"partition {self.name}: closed without a clean shutdown: "
                               f"{self._fenced}")
        _release_reserves(self._reserve_releases)
        clean = True
        for segment in self._segments:
            try:
                segment.close()
            except OSError as error:
                logger.warning("partition %s: cannot trim the indexes of %s (%s); the next open "
                               "checks them", self.name, segment.log_path, error)
                segment.abandon()
                clean = False
        if clean:
            self._checkpoint_guard.advance()  # a ticket still running writes no checkpoint
            self._try_recovery_checkpoint(clean_shutdown=True)
        _close_fds(self._sealed_index_fds)  # (synced by that checkpoint, unless it failed)
        self._closed = True

    def abandon(self) -> None:
        """Close every fd without flushing, trimming or checkpointing: what a crash leaves
        (tests; a worker that must exit at once).  The next open runs recovery."""
        for segment in self._segments:
            segment.abandon()
        _close_fds(self._sealed_index_fds)
        _close_fds([fd for fd, _ in self._reserve_releases])
        self._reserve_releases.clear()
        self._closed = True

    def __enter__(self) -> PartitionLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"PartitionLog({self.directory!r}, log_start={self._log_start_offset}, "
                f"log_end={self._log_end_offset}, segments={len(self._segments)})")


def _fits(target: Segment, size_bytes: int, span: BatchSpan, segment_bytes: int) -> bool:
    """Can ``span`` go into ``target`` once it holds ``size_bytes``?"""
    if span.next_offset - 1 - target.base_offset > RELATIVE_OFFSET_MAX:
        return False
    if size_bytes == 0:
        return True
    return size_bytes + span.size_bytes <= segment_bytes and size_bytes <= POSITION_MAX
