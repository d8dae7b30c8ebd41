"""The partition worker: one process per partition, the only writer of its log.

Loop (single thread, no locks; every blocking call has a timeout)::

    drain rings -> append -> acknowledge through shared memory -> wake parked fetches
    serve sockets (fetch with sendfile, produce fallback, attach ring, list offsets)
    every tick_ms: log.tick (flush, retention, checkpoint), ring liveness, control block

Waiting: when a pass found no ring data, spin ``spin_us`` re-reading the ring heads, then set
``worker_sleeping`` in the control block, look once more, and block in ``select`` (which also
watches the doorbell datagram socket) for at most ``sleep_ms_max``; producers ring the doorbell
only when they see ``worker_sleeping``.  The timed wait bounds the rare lost wake-up (x86 may
reorder our flag store after the head load).

Appending a ring region: the frames are copied out of shared memory first (one memcpy), then
validated and appended from the private copy.  Appending straight from the ring would let a
misbehaving producer rewrite bytes between the CRC check and the write, and a CRC-bad batch in
the middle of a segment would make recovery truncate everyone's later records.

Acknowledging after fsync (the topic's ``flush_messages = 1``): group commit.  Appended regions
are not published (acknowledged, their ring bytes freed) at once: they wait in ``_awaiting``
while a flush thread (:mod:`shmbroker.partition.flusher`) fsyncs what was appended, and the
worker goes on draining and appending.  When that flush is done, every region it covers is
published and the next flush starts, covering what came meanwhile.  Fetches then serve only
flushed batches (the high watermark is ``flushed_offset``): no consumer sees a record that a
power cut could take back.

Crash safety of rings: before appending a region the worker writes each frame's *intended* base
offset into its ack slot (not yet published).  A restarted worker finds unconsumed frames still
in the ring; for the first ones whose slot holds an intent, it checks the log: a batch at that
offset with the same producer id and base sequence means the append happened, so the frame is
acknowledged, not appended twice.  Everything after is appended as new.

Ring housekeeping: a ring is released (marked broken, then unlinked) once drained when its
producer closed it or died (pid and start time, checked each second for rings whose connection
is gone), or when it is broken (an impossible frame, a header changed under us: the reason is
logged).  Every RING_SCAN_MS /dev/shm is listed for the partition's rings nobody attached (a
producer killed before ATTACH_RING); one still unusable RING_UNUSABLE_GRACE_MS after its creation
is unlinked.  The control block is checked each tick and repaired or created again.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import fcntl
import gc
import logging
import os
import selectors
import signal
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from shmbroker import limits
from shmbroker.config import BrokerConfig, LogConfig
from shmbroker.errors import (
    BrokerError,
    CorruptLogError,
    CorruptRecordError,
    OffsetOutOfRangeError,
    ProtocolError,
    RingError,
    ShmbrokerError,
    ShuttingDownError,
    StorageError,
    StorageFullError,
)
from shmbroker.format import record_batch
from shmbroker.format.ring_layout import (
    RING_BROKEN_CORRUPT_HEADER,
    RING_BROKEN_RELEASED,
    broken_reason,
)
from shmbroker.partition import trace
from shmbroker.partition.flusher import Flusher
from shmbroker.partition.paths import PartitionPaths
from shmbroker.partition.stalls import StallWatch
from shmbroker.protocol import messages
from shmbroker.protocol.frames import Frame, frame_head
from shmbroker.protocol.messages import RING_RESULT_NUMBERS, ApiKey, error_frame, field
from shmbroker.shm import doorbell, names
from shmbroker.shm.control_block import ControlBlock
from shmbroker.shm.ring import RingReader, RingRegion
from shmbroker.storage import overlap
from shmbroker.storage.partition_log import PartitionLog
from shmbroker.transport.unix import (
    Refusals,
    ServerConnection,
    fit_fd_limit,
    listen,
    overdue_frames,
)

logger = logging.getLogger("shmbroker.worker")

# Named exit codes (gunicorn's arbiter habit): the supervisor stops restarting a worker that keeps
# failing at boot, and restarts one that crashed later.
EXIT_OK = 0
EXIT_CRASHED = 1
EXIT_USAGE = 2
EXIT_BOOT_FAILED = 3

TICK_MS = 100
SPIN_US = BrokerConfig.worker_spin_us  # the broker settings' defaults (config.py)
STALL_WARN_MS = BrokerConfig.worker_stall_warn_ms
SLEEP_MS_MAX = 50
# What the selector holds besides connections: listener, doorbell, signal pipe, flusher pipe.
SERVICE_REGISTRATIONS = 4
RING_LIVENESS_CHECK_MS = 1000  # also how often ring headers are checked for overwrites
# /dev/shm is listed this often for rings nobody attached (a producer killed between creating its
# ring and ATTACH_RING); a ring whose header stays unusable this long after its creation (killed
# while creating it, or overwritten) is unlinked.
RING_SCAN_MS = 3000
RING_UNUSABLE_GRACE_MS = 3000
PARTITION_LOCK_WAIT_S = 15.0
STOP_DRAIN_S_MAX = 10.0
STOP_FLUSH_OUTPUT_S_MAX = 2.0
DAMAGE_LOGGED_MAX = 1000  # damaged ranges logged once each; past this many, not at all
FRAME_READ_TIMEOUT_MS = 10_000  # default of the broker setting frame_read_timeout_ms

_LAST_OFFSET_DELTA = struct.Struct(">i")
_PRODUCER_ID_AND_SEQUENCE = struct.Struct(">qhi")  # producer_id, producer_epoch, base_sequence
_LAST_OFFSET_DELTA_POSITION = 23
_PRODUCER_ID_POSITION = 43

RESULT_CORRUPT = RING_RESULT_NUMBERS["CORRUPT_MESSAGE"]
RESULT_TOO_LARGE = RING_RESULT_NUMBERS["MESSAGE_TOO_LARGE"]
RESULT_STORAGE = RING_RESULT_NUMBERS["KAFKA_STORAGE_ERROR"]
RESULT_STORAGE_FULL = RING_RESULT_NUMBERS["STORAGE_FULL"]


def _storage_result(error: StorageError) -> int:
    """The ring result of a batch the log could not store (PartitionLog logged why)."""
    return RESULT_STORAGE_FULL if isinstance(error, StorageFullError) else RESULT_STORAGE


class AttachedRing:
    """A producer's ring as the worker sees it."""

    __slots__ = ("reader", "connection", "recovering", "last_alive_check_ms", "awaiting")

    def __init__(self, reader: RingReader, connection: ServerConnection | None,
                 recovering: bool) -> None:
        self.reader = reader
        self.connection = connection
        self.recovering = recovering  # after a restart: check intents until a frame is new
        self.last_alive_check_ms = 0
        self.awaiting = 0  # regions appended, waiting for their fsync to be published


class ParkedFetch:
    __slots__ = ("connection", "correlation_id", "offset", "max_bytes", "min_bytes",
                 "deadline")

    def __init__(self, connection: ServerConnection, correlation_id: int, offset: int,
                 max_bytes: int, min_bytes: int, deadline: float) -> None:
        self.connection = connection
        self.correlation_id = correlation_id
        self.offset = offset
        self.max_bytes = max_bytes
        self.min_bytes = min_bytes
        self.deadline = deadline


def read_topic_config(paths: PartitionPaths) -> LogConfig:
    try:
        overrides = orjson.loads(paths.topic_config_file.read_bytes())
    except FileNotFoundError:
        return LogConfig()
    return LogConfig.from_mapping(overrides)


class PartitionWorker:
    """Owns one partition: its log, rings, control block, doorbell and socket."""

    def __init__(self, paths: PartitionPaths, *, socket_mode: int = 0o660,
                 spin_us: int = SPIN_US, connections_max: int = limits.connections_max,
                 frame_read_timeout_ms: int = FRAME_READ_TIMEOUT_MS,
                 stall_warn_ms: int = STALL_WARN_MS) -> None:
        self.paths = paths
        self.socket_mode = socket_mode
        self.spin_s = spin_us / 1e6
        self.stalls = StallWatch(paths.topic + "/" + str(paths.partition), stall_warn_ms, logger)
        # step timestamps for bench/latency_trace.py (None unless SHMBROKER_TRACE_DIR is set)
        self.trace = trace.StepTrace.from_environment(f"{paths.topic}/{paths.partition}")
        self.connections_max = connections_max
        self.frame_read_timeout_s = frame_read_timeout_ms / 1000
        self._next_slow_frame_check = 0.0
        self._refusals = Refusals(logger, paths.topic + "/" + str(paths.partition))
        self.config = read_topic_config(paths)
        self.log: PartitionLog | None = None
        self._damage_logged: set[tuple[int | None, int | None]] = set()
        self.rings: dict[str, AttachedRing] = {}
        self._unusable_rings: dict[str, int] = {}  # name -> created (wall ms): see _scan_rings
        self._next_ring_scan_ms = 0
        self._next_header_check_ms = 0
        self._control_generation = 0
        self._readable_offset = -1  # the offset of the readable end last published
        self.parked: list[ParkedFetch] = []
        self.selector = selectors.DefaultSelector()
        self.listener: socket.socket | None = None
        self.control: ControlBlock | None = None
        self.doorbell: doorbell.Doorbell | None = None
        self._signal_r, self._signal_w = socket.socketpair()
        self._lock_fd: int | None = None
        self._stop_requested = False
        self._reload_requested = False
        self._ring_cursor = 0
        self._next_tick = 0.0
        # group commit (flush_messages = 1): regions appended and not yet published, with the
        # log end after each; the thread that runs every flush (started at boot)
        self._awaiting: collections.deque[tuple[AttachedRing, RingRegion, int]] = (
            collections.deque())
        self._flusher: Flusher | None = None

    # -- boot ---------------------------------------------------------------------------------
    def boot(self) -> None:
        """Lock, recover the log, attach rings left by producers, listen.  Raises on failure."""
        paths = self.paths
        (paths.data_dir / "run").mkdir(mode=0o750, exist_ok=True)
        self._lock_partition()
        self.log = PartitionLog(paths.log_dir, self.config, name=self.name)
        report = self.log.recovery_report
        if report.bytes_truncated or report.segments_deleted:
            logger.warning("%s: recovery %s", self.name, report)
        self.control = ControlBlock.create_or_open(paths.control_block_name)
        self.control.worker_pid = os.getpid()
        self.control.generation = self._control_generation = self.control.generation + 1
        self.control.state = 0
        if self._acks_after_fsync:  # what recovery kept past the recovery point: visible now
            self.log.flush()
        self._publish_positions()
        self.doorbell = doorbell.Doorbell.bind(paths.doorbell_name)
        self.selector.register(self.doorbell.fileno(), selectors.EVENT_READ, "doorbell")
        self._signal_r.setblocking(False)
        self._signal_w.setblocking(False)
        self.selector.register(self._signal_r, selectors.EVENT_READ, "signal")
        # The flush thread and its pipe from the start: periodic flushes use them on every
        # topic, so the worker's threads, fds and maps do not grow later on.
        self._flusher = Flusher()
        self._flusher.start()
        self.selector.register(self._flusher.fileno(), selectors.EVENT_READ, "flushed")
        for name in names.list_rings(paths.shm_prefix, paths.topic_id, paths.partition):
            self._attach(name, None, recovering=True)
        self.connections_max = fit_fd_limit(self.connections_max)
        self.listener = listen(paths.socket_path, self.socket_mode)
        self.selector.register(self.listener, selectors.EVENT_READ, "accept")
        self.control.updated_ms = time.time_ns() // 1_000_000
        self.control.state = 1
        logger.info("%s: serving offsets [%d, %d) with %d ring(s) from before", self.name,
                    self.log.log_start_offset, self.log.log_end_offset, len(self.rings))

    @property
    def name(self) -> str:
        return f"{self.paths.topic}/{self.paths.partition}"

    @property
    def _acks_after_fsync(self) -> bool:
        """Group commit: a batch is acknowledged, and served, only once fsynced."""
        return self.config.flush_messages == 1

    def _lock_partition(self) -> None:
        fd = os.open(self.paths.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        deadline = time.monotonic() + PARTITION_LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise RuntimeError(
                        f"partition {self.name} is locked by another worker "
                        f"({self.paths.lock_path}); is an old broker still running?") from None
                time.sleep(0.05)
        with contextlib.suppress(OSError):  # the pid is for people; a full disk must not stop us
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def request_stop(self) -> None:
        self._stop_requested = True
        with contextlib.suppress(OSError):
            self._signal_w.send(b"s")

    def request_reload(self) -> None:
        self._reload_requested = True
        with contextlib.suppress(OSError):
            self._signal_w.send(b"r")

    # -- rings --------------------------------------------------------------------------------
    def _attach(self, name: str, connection: ServerConnection | None, *,
                recovering: bool) -> None:
        """Attach ring ``name``: asked by its producer (``connection``), or found in /dev/shm
        (at boot, by _scan_rings), when a failure is logged instead of raised."""
        existing = self.rings.get(name)
        if existing is not None:
            existing.connection = connection
            return
        if len(self.rings) >= limits.rings_per_worker_max:
            error = RingError(
                f"partition {self.name} already has {len(self.rings)} rings of live producers "
                f"(rings_per_worker_max {limits.rings_per_worker_max}): close idle producers, "
                "or use more partitions")
            if connection is not None:
                raise error
            logger.warning("%s: not attaching ring %s yet: %s", self.name, name, error)
            return
        try:
            reader = RingReader.attach(name, check_frames=True)
        except RingError as error:
            if connection is not None:
                raise
            if name not in self._unusable_rings:
                logger.warning("%s: cannot attach ring %s found in /dev/shm (it is removed if "
                               "still unusable %d ms after its creation): %s", self.name, name,
                               RING_UNUSABLE_GRACE_MS, error)
                self._unusable_rings[name] = _created_ms(name)
            return
        self._unusable_rings.pop(name, None)
        self.rings[name] = AttachedRing(reader, connection, recovering)

    def _scan_rings(self, now_ms: int) -> None:
        """Attach the partition's rings that are in /dev/shm but not attached (a producer killed
        between creating its ring and ATTACH_RING: the liveness check then releases it), and
        unlink those still unusable RING_UNUSABLE_GRACE_MS after their creation (a producer
        killed while creating it, or a header overwritten)."""
        self._next_ring_scan_ms = now_ms + RING_SCAN_MS
        paths = self.paths
        try:
            present = names.list_rings(paths.shm_prefix, paths.topic_id, paths.partition)
        except OSError as error:
            logger.error("%s: cannot list %s for rings: %s", self.name, names.SHM_DIR, error)
            return
        for name in present:
            if name in self.rings:
                continue
            created_ms = self._unusable_rings.get(name)
            if created_ms is not None and now_ms - created_ms >= RING_UNUSABLE_GRACE_MS:
                logger.warning("%s: removing ring %s: still unusable %d ms after its creation",
                               self.name, name, now_ms - created_ms)
                names.unlink(name)
                del self._unusable_rings[name]
                continue
            self._attach(name, None, recovering=False)
        for name in set(self._unusable_rings) - set(present):
            del self._unusable_rings[name]

    def _drain_rings(self) -> int:
        """Append what the rings hold, at most drain_bytes_max; the bytes taken."""
        log = self.log
        assert log is not None
        budget = limits.drain_bytes_max
        taken = 0
        rings = list(self.rings.values())
        if len(rings) > 1:  # start one ring further each pass: no producer starves the others
            self._ring_cursor = (self._ring_cursor + 1) % len(rings)
            rings = rings[self._ring_cursor:] + rings[:self._ring_cursor]
        for ring in rings:
            reader = ring.reader
            while budget > 0 and reader.pending() and not reader.broken:
                region = reader.next_region(budget)
                if region is None:
                    break
                size = len(region.view)
                stalls = self.stalls
                appending = time.monotonic()
                checking, writing, rolling = log.check_s, log.write_s, log.roll_s
                self._append_region(ring, region)
                stalls.appending_s += time.monotonic() - appending
                stalls.checking_s += log.check_s - checking
                stalls.writing_s += log.write_s - writing
                stalls.rolling_s += log.roll_s - rolling
                taken += size
                budget -= size
            if budget <= 0:
                break
        return taken

    def _append_region(self, ring: AttachedRing, region: Any) -> None:
        log = self.log
        assert log is not None
        reader = ring.reader
        if self.trace is not None:
            self.trace.note(trace.APPEND_BEGIN, log.log_end_offset)
        copying = time.monotonic()
        copy = bytearray(region.view)  # private copy: see the module docstring
        self.stalls.copying_s += time.monotonic() - copying
        view = memoryview(copy)
        positions = region.positions
        skip = self._already_appended(ring, region, view) if ring.recovering else []
        if len(skip) < len(positions):
            # Past the frames a dead worker decided: the rest are new.  While a whole region
            # was decided, keep checking the next one (regions need not match the dead
            # worker's: the drain budget is shared between rings).
            ring.recovering = False
        results = list(skip)
        intents = list(skip)
        next_offset = log.log_end_offset
        for position in positions[len(skip):]:
            intents.append(next_offset)
            next_offset += _LAST_OFFSET_DELTA.unpack_from(
                view, position + _LAST_OFFSET_DELTA_POSITION)[0] + 1
        reader.record_results(region, intents)
        group_commit = self._acks_after_fsync
        if len(skip) < len(positions):
            start = positions[len(skip)]
            try:  # flush_messages is ours to run: on the flush thread (_start_due_flush)
                results += log.append(view[start:], defer_flush=True).base_offsets
            except CorruptRecordError:
                results += self._append_one_by_one(reader, region, view, results,
                                                   defer_flush=True)
            except StorageError as error:  # logged by the log (once per run of failures)
                logger.debug("%s: %s", self.name, error)
                results += [_storage_result(error)] * (len(positions) - len(results))
        reader.record_results(region, results)
        if self.trace is not None:  # (acknowledged now, or with group commit after an fsync)
            self.trace.note(trace.APPEND_END, log.log_end_offset)
        if group_commit:  # published once an fsync covers it (_pump_flushes)
            self._awaiting.append((ring, region, log.log_end_offset))
            ring.awaiting += 1
            return
        # positions first: whoever sees the ack must see a high watermark that covers it
        self._after_append()
        # then the parked fetches, as Kafka completes its delayed fetches right after an
        # append: the records go out before the producer's doorbell is rung (that wake-up can
        # take this core for ~100 us where cores are few) and before the rest of the drain
        if self.parked:
            self._serve_parked(time.monotonic())
        self._publish_region(reader, region)
        if self.config.flush_messages:  # flush_messages > 1: fsync every N, not before acks
            self._start_due_flush()

    @staticmethod
    def _publish_region(reader: RingReader, region: RingRegion) -> None:
        reader.publish(region)
        if reader.producer_waiting:
            doorbell.ring(reader.doorbell_address)

    # -- group commit -------------------------------------------------------------------------
    def _pump_flushes(self) -> None:
        """Take the outcome of the flush in flight (publish what it covers) and start the next
        one while regions wait for theirs."""
        flusher = self._flusher
        if flusher is not None and flusher.in_flight is not None:
            done = flusher.finished()
            if done is None:
                return
            self._end_flush(*done)
        self._release_flushed()
        log = self.log
        assert log is not None
        if self._awaiting and log.fenced is None:
            self._begin_flush()

    def _start_writeback(self) -> None:
        """Have the flush thread start the kernel's writeback of what was appended, each
        segment_writeback_bytes (storage/writeback.py): one hint at a time."""
        log, flusher = self.log, self._flusher
        assert log is not None
        if flusher is not None and not flusher.writeback_queued:
            hint = log.take_writeback()
            if hint is not None:
                flusher.start_writeback(hint)

    def _begin_flush(self) -> None:
        """Hand what is unflushed to the flush thread (none in flight, the log not fenced)."""
        log, flusher = self.log, self._flusher
        assert log is not None and flusher is not None
        try:
            ticket = log.begin_flush()
        except StorageError as error:  # fenced by a flush of its own (e.g. tick)
            self._fail_awaiting(error)
            return
        if ticket is None:  # flushed meanwhile (begin_flush fell back to flush())
            self._release_flushed()
            return
        flusher.submit(ticket)

    def _start_due_flush(self, now_ms: int | None = None) -> None:
        """The flushes of ``flush_ms``, of ``flush_messages`` above 1 and of the recovery-point
        interval, on the flush thread too: done inline, an fsync of seconds of page-cache
        writes stalled appends and fetches for as long (the log's tick runs with
        background_flush).  One flush in flight at a time; group commit's flushes (which start
        only while regions wait) cover the same ground."""
        log = self.log
        assert log is not None
        flusher = self._flusher
        if flusher is not None and flusher.in_flight is not None:
            return
        if log.fenced is None and log.flush_due(now_ms):
            self._begin_flush()

    def _end_flush(self, ticket: Any, error: OSError | None) -> None:
        log = self.log
        assert log is not None
        try:
            log.end_flush(ticket, error)
        except StorageError as failure:  # fenced: the loop exits, a new worker recovers
            self._fail_awaiting(failure)

    def _release_flushed(self) -> None:
        """Publish the waiting regions that flushed_offset covers, in order."""
        awaiting = self._awaiting
        if not awaiting:
            return
        log = self.log
        assert log is not None
        if awaiting[0][2] <= log.flushed_offset:
            self._publish_positions()  # first: whoever sees the ack sees a watermark covering it
            self._publish_awaiting(log.flushed_offset)

    def _fail_awaiting(self, error: StorageError) -> None:
        """The fsync that was to cover the waiting regions failed: each of their batches gets
        the storage error (it may still be stored: a retry can store it twice, as Kafka)."""
        if not self._awaiting:  # a periodic flush failed: the fenced log ends the loop
            return
        logger.error("%s: %d region(s) of batches not known durable: %s", self.name,
                     len(self._awaiting), error)
        self._publish_awaiting(None, _storage_result(error))
        self._publish_positions()

    def _publish_awaiting(self, upto: int | None, result: int | None = None) -> None:
        """Publish the waiting regions whose log end is at most ``upto`` (None: all), in
        order; with ``result``, each of their frames gets that error number first."""
        awaiting = self._awaiting
        while awaiting and (upto is None or awaiting[0][2] <= upto):
            ring, region, _ = awaiting.popleft()
            ring.awaiting -= 1
            if result is not None:
                ring.reader.record_results(region, [result] * region.frames)
            self._publish_region(ring.reader, region)

    def _settle_flushes(self, wait_s: float) -> None:
        """Wait for the flush in flight, flush the rest here and publish every waiting region
        (stopping, or acks no longer wait for fsync)."""
        log = self.log
        assert log is not None
        flusher = self._flusher
        if flusher is not None and flusher.in_flight is not None:
            done = flusher.finished(wait_s)
            if done is not None:
                self._end_flush(*done)
        if self._awaiting:
            try:
                log.flush()
            except StorageError as error:
                self._fail_awaiting(error)
            self._release_flushed()

    def _append_one_by_one(self, reader: RingReader, region: Any, view: memoryview,
                           done: list[int], *, defer_flush: bool = False) -> list[int]:
        """A region holding a bad batch: append the good ones, an error number for each bad."""
        log = self.log
        assert log is not None
        results: list[int] = []
        max_batch_bytes = self.config.max_batch_bytes
        for position, size in zip(region.positions[len(done):], region.sizes[len(done):]):
            if size > max_batch_bytes:
                logger.warning("%s: refused a batch of %d bytes (max_batch_bytes %d)", self.name,
                               size, max_batch_bytes)
                results.append(RESULT_TOO_LARGE)
                continue
            reader.record_results(region, done + results + [log.log_end_offset])
            try:
                results.append(log.append(view[position:position + size],
                                          defer_flush=defer_flush).base_offsets[0])
            except CorruptRecordError as error:
                logger.warning("%s: refused a corrupt batch from ring %s: %s", self.name,
                               reader.name, error)
                results.append(RESULT_CORRUPT)
            except StorageError as error:
                logger.debug("%s: %s", self.name, error)
                results.append(_storage_result(error))
        return results

    def _already_appended(self, ring: AttachedRing, region: Any, view: memoryview) -> list[int]:
        """Results of the region's first frames that a previous worker decided before dying:
        the offset of each batch it appended (checked against the log), or the error number of
        each it refused."""
        log = self.log
        assert log is not None
        found: list[int] = []
        for index, position in enumerate(region.positions):
            seq = region.first_seq + index
            slot_seq, intended = ring.reader.slot(seq)
            if slot_seq != seq:
                break
            if intended < 0:  # refused (corrupt, too large, disk error): decided, not stored
                found.append(intended)
                continue
            if not log.log_start_offset <= intended < log.log_end_offset:
                break
            try:
                stored = log.read_bytes(intended, 1)
                if len(stored) < record_batch.HEADER_SIZE:
                    break
                header = record_batch.read_header(stored, 0)
            except CorruptRecordError:  # damaged there: not known to be stored, append again
                break
            ours = _PRODUCER_ID_AND_SEQUENCE.unpack_from(view, position + _PRODUCER_ID_POSITION)
            theirs = _PRODUCER_ID_AND_SEQUENCE.unpack_from(stored, _PRODUCER_ID_POSITION)
            if header.base_offset != intended or ours != theirs or ours[0] < 0:
                break
            found.append(intended)
        if found:
            logger.info("%s: %d batch(es) of ring %s were decided before the restart",
                        self.name, len(found), ring.reader.name)
        return found

    def _release_finished_rings(self, now_ms: int) -> None:
        check_headers = now_ms >= self._next_header_check_ms
        if check_headers:
            self._next_header_check_ms = now_ms + RING_LIVENESS_CHECK_MS
        for name, ring in list(self.rings.items()):
            reader = ring.reader
            if check_headers and not reader.broken:
                problem = reader.header_problem()
                if problem:
                    reader.mark_broken(RING_BROKEN_CORRUPT_HEADER, problem)
            broken = reader.broken  # nothing more will be read from it
            closed = reader.producer_closed  # before pending(): a frame published before the
            if not broken and reader.pending():  # close flag is then still seen as pending
                continue
            if ring.awaiting:  # appended regions wait for their fsync to be published
                continue
            gone = closed or broken
            if not gone and ring.connection is None:
                if now_ms - ring.last_alive_check_ms < RING_LIVENESS_CHECK_MS:
                    continue
                ring.last_alive_check_ms = now_ms
                gone = not reader.producer_alive()
            if gone:
                if broken:
                    logger.warning("%s: released ring %s of producer pid %d, broken: %s; its "
                                   "frames from %d on were refused", self.name, name,
                                   reader.producer_pid,
                                   reader.broken_reason or broken_reason(broken),
                                   reader.progress[1])
                else:  # a producer that still writes (taken for dead) learns it at once
                    reader.mark_broken(RING_BROKEN_RELEASED)
                del self.rings[name]
                reader.unlink()
                reader.close()

    # -- after appends: positions and fetches -------------------------------------------------
    def _after_append(self) -> None:
        self._publish_positions()

    def _publish_positions(self) -> None:
        log, control = self.log, self.control
        assert log is not None and control is not None
        control.log_start_offset = log.log_start_offset
        control.log_end_offset = log.log_end_offset
        high_watermark = control.high_watermark = self._high_watermark()
        control.storage_full = log.append_failure is not None  # shown by `shmbroker status`
        # Where consumers reading the segment files themselves may read to (consumer.py,
        # "direct reads"): the high watermark's byte position, when it is known without a
        # search (at the log end, or with group commit at the flushed offset in the active
        # segment); otherwise the end published before stays (older, never wrong: the log
        # keeps what it committed), and they fetch the rest through the socket.
        if high_watermark != self._readable_offset:
            found = log.position_in_active(high_watermark)
            if found is not None:
                control.set_readable(found[0], found[1], high_watermark)
                self._readable_offset = high_watermark

    def _high_watermark(self) -> int:
        """What consumers may read up to: the log end (no mirrors yet: everything appended is
        committed), or with group commit what is fsynced."""
        log = self.log
        assert log is not None
        return log.flushed_offset if self._acks_after_fsync else log.log_end_offset

    def _serve_parked(self, now: float) -> None:
        if not self.parked:
            return
        log = self.log
        assert log is not None
        high_watermark = self._high_watermark()
        still: list[ParkedFetch] = []
        for fetch in self.parked:
            if fetch.connection.closed:
                continue
            if fetch.offset < log.log_start_offset:  # retention passed it while it waited
                self._answer_fetch(fetch.connection, fetch.correlation_id, fetch.offset,
                                   fetch.max_bytes)
                continue
            if fetch.offset < high_watermark or now >= fetch.deadline or self._stop_requested:
                if (fetch.offset < high_watermark and fetch.min_bytes > 1
                        and now < fetch.deadline and not self._stop_requested):
                    if self._available_bytes(fetch.offset, fetch.max_bytes) < fetch.min_bytes:
                        still.append(fetch)
                        continue
                self._answer_fetch(fetch.connection, fetch.correlation_id, fetch.offset,
                                   fetch.max_bytes)
            else:
                still.append(fetch)
        self.parked = still

    def _answer_parked_of(self, connection: ServerConnection) -> None:
        """Answer now (with what there is) the fetch ``connection`` has parked, if any."""
        mine = [fetch for fetch in self.parked if fetch.connection is connection]
        if not mine:
            return
        self.parked = [fetch for fetch in self.parked if fetch.connection is not connection]
        for fetch in mine:
            self._answer_fetch(connection, fetch.correlation_id, fetch.offset, fetch.max_bytes)

    # -- sockets ------------------------------------------------------------------------------
    def _accept(self) -> None:
        assert self.listener is not None
        for _ in range(64):
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:  # EMFILE, ENFILE, ENOBUFS: the client sees its connect
                logger.warning("%s: cannot accept a connection: %s", self.name, error)
                return
            connections = len(self.selector.get_map()) - SERVICE_REGISTRATIONS
            if connections >= self.connections_max:
                self._refusals.refuse(sock, self.connections_max)
                continue
            connection = ServerConnection(sock)
            self.selector.register(connection.sock, selectors.EVENT_READ, connection)

    def _on_readable(self, connection: ServerConnection) -> None:
        if not connection.fill():
            self._close(connection)
            return
        self._serve_frames(connection)

    def _serve_frames(self, connection: ServerConnection) -> None:
        """Answer the requests received, one by one, while the connection's answers go out: a
        request waits in the decoder while answers wait to be written (backpressure; see
        _update_interest), so a client that pipelines and never reads holds at most one read's
        worth of requests here, not thousands of queued answers."""
        while not connection.closed and not connection.pending_output:
            try:
                frame = connection.next_frame()
            except ProtocolError as error:
                connection.send(error_frame(ApiKey.ERROR, 0, error))
                self._close(connection)
                return
            if frame is None:
                break
            if self.parked:
                self._answer_parked_of(connection)  # responses leave in request order
            try:
                self._handle(connection, frame)
            except ProtocolError as error:
                connection.send(error_frame(frame.api_key, frame.correlation_id, error))
                self._close(connection)
                return
            except (ShmbrokerError, OSError) as error:
                connection.send(error_frame(frame.api_key, frame.correlation_id, error))
            except Exception as error:  # a bug: this request fails, the worker serves on
                logger.exception("%s: request %s failed unexpectedly", self.name, frame.api_key)
                connection.send(error_frame(frame.api_key, frame.correlation_id, BrokerError(
                    f"the partition worker failed on this request ({type(error).__name__}: "
                    f"{error}); see its log")))
                self._close(connection)
                return
        self._update_interest(connection)

    def _close_slow_frames(self, now: float) -> None:
        """Close connections whose frame began more than frame_read_timeout_ms ago."""
        timeout_s = self.frame_read_timeout_s
        self._next_slow_frame_check = now + min(1.0, timeout_s / 4)
        for connection, error in overdue_frames(
                [key.data for key in self.selector.get_map().values()], now, timeout_s):
            logger.warning("%s: %s", self.name, error)
            connection.send(error_frame(ApiKey.ERROR, 0, error))
            self._close(connection)

    def _update_interest(self, connection: ServerConnection) -> None:
        if connection.closed:
            self._close(connection)
            return
        # Backpressure: while a connection's answers wait to be written, its next requests wait
        # in the kernel's socket buffer, not here.  A client that sends and never reads (or
        # reads slowly) then costs nothing but that buffer, instead of a queue of answers and
        # a dup'ed file descriptor per queued fetch (found: thousands, until EMFILE).
        events = selectors.EVENT_WRITE if connection.pending_output else selectors.EVENT_READ
        key = self.selector.get_key(connection.sock)
        if key.events != events:
            self.selector.modify(connection.sock, events, connection)

    def _close(self, connection: ServerConnection) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(connection.sock)
        connection.close()
        for ring in self.rings.values():
            if ring.connection is connection:
                ring.connection = None
                ring.last_alive_check_ms = 0

    def _handle(self, connection: ServerConnection, frame: Frame) -> None:
        api_key, body = frame.api_key, frame.body
        if api_key == ApiKey.FETCH:
            self._fetch(connection, frame.correlation_id, body)
        elif api_key == ApiKey.PRODUCE:
            self._produce(connection, frame)
        elif api_key == ApiKey.ATTACH_RING:
            name = field(body, "name", str)
            if not self.paths.is_ring_name(name):
                raise ProtocolError(f"{name!r} is not a ring name of partition {self.name}")
            mine = sum(1 for ring_name, ring in self.rings.items()
                       if ring.connection is connection and ring_name != name)
            if mine >= limits.rings_per_connection_max:
                raise RingError(f"this connection already attached {mine} rings to partition "
                                f"{self.name} (rings_per_connection_max "
                                f"{limits.rings_per_connection_max})")
            self._attach(name, connection, recovering=False)
            self._reply(connection, frame, {})
        elif api_key == ApiKey.LIST_OFFSETS:
            self._reply(connection, frame, self._list_offsets(body))
        elif api_key == ApiKey.PING:
            self._reply(connection, frame, self._positions())
        else:
            raise ProtocolError(f"api key {api_key} is not served by a partition worker")

    def _reply(self, connection: ServerConnection, frame: Frame, body: dict[str, Any]) -> None:
        connection.send(frame_head(frame.api_key, frame.correlation_id, body))

    def _positions(self) -> dict[str, int]:
        log = self.log
        assert log is not None
        return {"log_start_offset": log.log_start_offset, "log_end_offset": log.log_end_offset,
                "high_watermark": self._high_watermark()}

    def _fetch(self, connection: ServerConnection, correlation_id: int,
               body: dict[str, Any]) -> None:
        log = self.log
        assert log is not None
        offset = field(body, "offset", int, minimum=0)
        max_bytes = min(field(body, "max_bytes", int, default=1 << 20, minimum=1),
                        limits.fetch_bytes_max)
        max_wait_ms = field(body, "max_wait_ms", int, default=0, minimum=0,
                            maximum=limits.fetch_wait_ms_max)
        min_bytes = field(body, "min_bytes", int, default=1, minimum=0)
        if self.trace is not None:
            self.trace.note(trace.FETCH_READ, offset)
        if not log.log_start_offset <= offset <= log.log_end_offset:
            raise OffsetOutOfRangeError(offset, log.log_start_offset, log.log_end_offset)
        if max_wait_ms and not self._stop_requested and (
                offset >= self._high_watermark()
                or min_bytes > 1 and self._available_bytes(offset, max_bytes) < min_bytes):
            # at most one parked fetch per connection (a later request answers it first), so
            # parked fetches are bounded by connections_max
            self.parked.append(ParkedFetch(connection, correlation_id, offset, max_bytes,
                                           min_bytes, time.monotonic() + max_wait_ms / 1000))
            if self.trace is not None:
                self.trace.note(trace.FETCH_PARKED, offset)
            return
        self._answer_fetch(connection, correlation_id, offset, max_bytes)

    def _answer_fetch(self, connection: ServerConnection, correlation_id: int, offset: int,
                      max_bytes: int) -> None:
        log = self.log
        assert log is not None
        try:
            found = log.read(offset, max_bytes, flushed_only=self._acks_after_fsync)
        except OffsetOutOfRangeError as error:  # retention moved log_start while it waited
            connection.send(error_frame(ApiKey.FETCH, correlation_id, error))
            self._update_interest(connection)
            return
        except CorruptLogError as error:
            # Damaged stored batches: never sent.  The answer names them, and where reading can
            # go on, so that the consumer reports them (CorruptLogError) and can seek past.
            self._note_damage(error)
            connection.send(frame_head(ApiKey.FETCH, correlation_id, {
                **self._positions(), "damaged": {
                    "offset": error.offset, "next_offset": error.next_offset,
                    "position": error.position, "segment_base_offset": error.segment_base_offset,
                    "reason": error.reason}}))
            self._update_interest(connection)
            return
        # position and segment: the consumer names the file position of a batch it finds
        # damaged (CRC); next_offset: where reading resumes after the slice's last batch
        body = {**self._positions(), "position": found.position,
                "segment_base_offset": found.segment_base_offset,
                "next_offset": found.next_offset}
        head = frame_head(ApiKey.FETCH, correlation_id, body, found.size_bytes)
        if self.trace is not None:  # (before: the consumer may have it before the call returns)
            self.trace.note(trace.FETCH_ANSWERED, offset, found.next_offset)
        connection.send_file(head, found.fd, found.position, found.size_bytes)
        self._update_interest(connection)

    def _note_damage(self, error: CorruptLogError) -> None:
        """Log each damaged range once (a consumer retrying would repeat it)."""
        where = (error.segment_base_offset, error.position)
        if where not in self._damage_logged and len(self._damage_logged) < DAMAGE_LOGGED_MAX:
            self._damage_logged.add(where)
            logger.error("%s: %s", self.name, error)

    def _available_bytes(self, offset: int, max_bytes: int) -> int:
        """Bytes a fetch at ``offset`` would get now (damage: answer at once, with the report)."""
        log = self.log
        assert log is not None
        try:
            return log.read(offset, max_bytes, flushed_only=self._acks_after_fsync).size_bytes
        except CorruptLogError:
            return max_bytes

    def _list_offsets(self, body: dict[str, Any]) -> dict[str, Any]:
        log = self.log
        assert log is not None
        timestamp_ms = field(body, "timestamp_ms", int)
        if timestamp_ms == messages.EARLIEST_TIMESTAMP:
            return {"offset": log.log_start_offset, "timestamp_ms": -1, **self._positions()}
        if timestamp_ms == messages.LATEST_TIMESTAMP:
            return {"offset": self._high_watermark(), "timestamp_ms": -1, **self._positions()}
        if timestamp_ms < 0:
            raise ProtocolError(f"timestamp_ms must be >= 0, -1 (latest) or -2 (earliest), "
                                f"not {timestamp_ms}")
        found = log.offset_for_timestamp(timestamp_ms)
        offset, timestamp = found if found is not None else (-1, -1)
        return {"offset": offset, "timestamp_ms": timestamp, **self._positions()}

    def _produce(self, connection: ServerConnection, frame: Frame) -> None:
        """The socket fallback of the rings: same validation, same offsets, a response frame."""
        log = self.log
        assert log is not None
        acks = field(frame.body, "acks", int, default=1, minimum=-1, maximum=1)
        if self._stop_requested:
            raise ShuttingDownError(
                "the partition worker is stopping; retry on the restarted broker")
        raw = frame.raw
        if not len(raw):
            raise ProtocolError("a produce request carries at least one batch")
        view = raw  # the decoder's private, writable copy
        try:
            results = log.append(view).base_offsets
        except CorruptRecordError:
            positions, sizes = _split_batches(view)
            if positions is None:
                raise
            region = _Region(view, positions, sizes)
            results = self._append_one_by_one(_NoIntents(), region, view, [])
        except StorageError as error:  # logged by the log; the client gets it
            logger.debug("%s: %s", self.name, error)
            self._publish_positions()
            raise
        self._after_append()
        self._release_flushed()  # its flush (flush_messages = 1) covered waiting regions too
        self._start_writeback()
        if acks != 0:
            connection.send(frame_head(frame.api_key, frame.correlation_id,
                                       {"results": results}))

    # -- the loop -----------------------------------------------------------------------------
    def _rings_pending(self) -> bool:
        return any(ring.reader.pending() and not ring.reader.broken
                   for ring in self.rings.values())

    def _wait(self, busy: bool, now: float) -> list[tuple[selectors.SelectorKey, int]]:
        if busy:
            return self.selector.select(0)
        # Spin for the rings and the sockets both: a fetch (or any request) arriving mid-spin
        # is served now, not when the spin ends (a consumer's next fetch often comes then).
        spin_until = now + self.spin_s
        select = self.selector.select
        while time.monotonic() < spin_until:
            if self._rings_pending():
                return select(0)
            events = select(0)
            if events:
                return events
        control = self.control
        assert control is not None
        timeout = min(SLEEP_MS_MAX / 1000, max(0.0, self._next_tick - now))
        for fetch in self.parked:
            timeout = min(timeout, max(0.0, fetch.deadline - now))
        control.worker_sleeping = 1
        try:
            if self._rings_pending():
                timeout = 0.0
            return self.selector.select(timeout)
        finally:
            control.worker_sleeping = 0

    def serve(self) -> None:
        log = self.log
        assert log is not None and self.doorbell is not None
        busy = True
        began = time.monotonic()
        while True:
            if self._stop_requested:
                break
            if log.fenced is not None:  # a failed fsync: only a reopen (a restart) recovers
                raise StorageError(f"{self.name}: {log.fenced}; exiting, so that a new worker "
                                   "recovers the log from disk")
            taken = self._drain_rings()
            if taken:
                self._start_writeback()
            if self._awaiting or self._flusher is not None and self._flusher.in_flight:
                self._pump_flushes()
            waiting = now = time.monotonic()
            events = self._wait(busy or bool(taken), now)
            woke = time.monotonic()
            if self.trace is not None and events:
                self.trace.note(trace.WOKE, len(events))
            for key, mask in events:
                data = key.data
                if isinstance(data, ServerConnection):
                    if mask & selectors.EVENT_WRITE:
                        data.flush()
                        if not data.pending_output:  # drained: the requests that waited
                            self._serve_frames(data)
                            continue
                    if mask & selectors.EVENT_READ and not data.closed:
                        self._on_readable(data)
                    else:
                        self._update_interest(data)
                elif data == "accept":
                    self._accept()
                elif data == "doorbell":
                    self.doorbell.drain()
                elif data == "flushed":
                    self._pump_flushes()
                elif data == "signal":
                    with contextlib.suppress(BlockingIOError):
                        self._signal_r.recv(4096)
            handled = now = time.monotonic()
            self._serve_parked(now)
            busy = bool(taken)
            if now >= self._next_tick:
                self._tick(now)
            if now >= self._next_slow_frame_check:
                self._close_slow_frames(now)
            if self._reload_requested:
                self._reload_requested = False
                self._reload_config()
            ended = time.monotonic()
            self.stalls.turn(began, waiting, woke, handled, ended)
            began = ended

    def _tick(self, now: float) -> None:
        log = self.log
        assert log is not None and self.control is not None
        self._next_tick = now + TICK_MS / 1000
        now_ms = time.time_ns() // 1_000_000
        try:
            deleted = log.tick(now_ms, background_flush=True)
            self._start_due_flush(now_ms)
        except StorageError as error:
            logger.error("%s: periodic flush/retention failed: %s", self.name, error)
            deleted = []
        if deleted:
            logger.info("%s: retention deleted segment(s) %s", self.name, deleted)
        self._release_flushed()  # a flush of tick's may cover waiting regions
        self._check_control_block()
        self._publish_positions()
        self.control.updated_ms = now_ms
        self._release_finished_rings(now_ms)
        if now_ms >= self._next_ring_scan_ms:
            self._scan_rings(now_ms)

    def _check_control_block(self) -> None:
        """Repair the control block if its header was overwritten; create it again if its name
        was unlinked or now leads elsewhere.  The old block is marked stopped with
        worker_sleeping set, so readers that still map it reopen the name (consumers) and ring
        the doorbell on every write (producers) until they do."""
        control = self.control
        assert control is not None
        if not control.header_valid():
            logger.warning("%s: control block %s was overwritten; writing it again", self.name,
                           control.name)
            control.reinitialise()
            self._fill_control_block(control)
        if control.replaced():
            logger.warning("%s: control block %s was removed from /dev/shm or replaced; "
                           "creating it again", self.name, control.name)
            try:
                fresh = ControlBlock.create_or_open(control.name)
            except (RingError, OSError) as error:  # /dev/shm full: the next tick tries again
                logger.error("%s: %s", self.name, error)
                return
            self._fill_control_block(fresh)
            control.state = 3
            control.worker_sleeping = 1
            control.close()
            self.control = fresh

    def _fill_control_block(self, control: ControlBlock) -> None:
        control.worker_pid = os.getpid()
        control.generation = self._control_generation
        control.updated_ms = time.time_ns() // 1_000_000
        self.control = control
        self._readable_offset = -1  # a new block: publish it there too
        self._publish_positions()
        control.state = 2 if self._stop_requested else 1

    def _reload_config(self) -> None:
        try:
            config = read_topic_config(self.paths)
        except (ShmbrokerError, OSError, ValueError) as error:
            logger.error("%s: keeping the old config; cannot read the new one: %s", self.name,
                         error)
            return
        assert self.log is not None
        was_group_commit = self._acks_after_fsync
        self.config = config
        self.log.config = config
        if was_group_commit and not self._acks_after_fsync:
            self._settle_flushes(STOP_DRAIN_S_MAX)
        elif self._acks_after_fsync and not was_group_commit:
            try:  # served up to flushed_offset from now on: no step back for consumers
                self.log.flush()
            except StorageError as error:
                logger.error("%s: %s", self.name, error)
        self._publish_positions()
        logger.info("%s: config reloaded", self.name)

    # -- stop ---------------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop taking connections, drain the rings, answer parked fetches, flush and close."""
        log, control = self.log, self.control
        if control is not None:
            control.state = 2
        if self.listener is not None:
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(self.listener)
            self.listener.close()
            with contextlib.suppress(OSError):
                self.paths.socket_path.unlink()
        if log is not None:
            deadline = time.monotonic() + STOP_DRAIN_S_MAX
            heads = {name: ring.reader.head for name, ring in self.rings.items()}
            while log.fenced is None and time.monotonic() < deadline and any(
                    ring.reader.progress[0] < heads[name] and not ring.reader.broken
                    for name, ring in self.rings.items()):
                if not self._drain_rings():
                    break
            self._settle_flushes(STOP_DRAIN_S_MAX)
            self._serve_parked(time.monotonic())
            self._flush_outputs(time.monotonic() + STOP_FLUSH_OUTPUT_S_MAX)
            self._release_finished_rings(time.time_ns() // 1_000_000)
            try:
                log.close()
            except StorageError as error:  # closed anyway; the next open recovers
                logger.error("%s: %s", self.name, error)
        if self._flusher is not None:
            self._flusher.close()
            self._flusher = None
        for ring in self.rings.values():
            ring.reader.close()
        self.rings.clear()
        for key in list(self.selector.get_map().values()):
            if isinstance(key.data, ServerConnection):
                key.data.close()
        if self.doorbell is not None:
            self.doorbell.close()
        if control is not None:
            control.state = 3
            control.worker_sleeping = 0
            control.close()
        if self.trace is not None:
            try:
                self.trace.save()
            except OSError as error:
                logger.error("%s: cannot write the step trace %s: %s", self.name,
                             self.trace.path, error)

    def _flush_outputs(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            pending = [key.data for key in self.selector.get_map().values()
                       if isinstance(key.data, ServerConnection) and key.data.pending_output
                       and not key.data.closed]
            if not pending:
                return
            for connection in pending:
                connection.flush()
            time.sleep(0.001)


class _Region:
    """A buffer split into batches, shaped like a RingRegion for _append_one_by_one."""

    def __init__(self, view: memoryview, positions: list[int], sizes: list[int]) -> None:
        self.view = view
        self.positions = positions
        self.sizes = sizes
        self.first_seq = 0


class _NoIntents:
    """Stands in for a RingReader where there is no ring (socket produce)."""

    name = "socket"

    def record_results(self, region: object, results: object) -> None:
        pass


def _created_ms(name: str) -> int:
    """When shared-memory object ``name`` was created (its ctime, wall ms); now if unknown."""
    try:
        return os.stat(os.path.join(names.SHM_DIR, name.lstrip("/"))).st_ctime_ns // 1_000_000
    except OSError:
        return time.time_ns() // 1_000_000


def _split_batches(view: memoryview) -> tuple[list[int], list[int]] | tuple[None, None]:
    positions: list[int] = []
    sizes: list[int] = []
    position = 0
    while position < len(view):
        try:
            size = record_batch.batch_size_at(view, position)
        except CorruptRecordError:
            return None, None
        if size < record_batch.HEADER_SIZE or position + size > len(view):
            return None, None
        positions.append(position)
        sizes.append(size)
        position += size
    return positions, sizes


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM us when the supervisor dies (PR_SET_PDEATHSIG), so a killed broker
    leaves no orphan writers behind; a new worker waits for this one's partition lock."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)


STANDBY_FLAG = "--standby"


def _wait_for_assignment(standby_argv: list[str]) -> list[str] | None:
    """Standby mode (``--standby --ready-fd FD --parent-pid PID``): Python is up and everything
    imported; wait for the supervisor to write this process's partition arguments (one JSON list
    on stdin).  None when stdin closes first (the standby was retired, or the supervisor died)."""
    _die_with_parent()
    parent = standby_argv.index("--parent-pid") if "--parent-pid" in standby_argv else -1
    if parent >= 0 and os.getppid() != int(standby_argv[parent + 1]):
        return None  # the supervisor died before we set the death signal
    line = sys.stdin.buffer.readline()
    if not line:
        return None
    assigned = orjson.loads(line)
    if not isinstance(assigned, list) or not all(isinstance(item, str) for item in assigned):
        raise SystemExit(f"shmbroker-worker: a standby expects a JSON list of arguments, "
                         f"got {line[:200]!r}")
    return assigned + standby_argv


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [STANDBY_FLAG]:
        assigned = _wait_for_assignment(argv[1:])
        if assigned is None:
            return EXIT_OK
        argv = assigned
    parser = argparse.ArgumentParser(prog="shmbroker-worker")
    parser.add_argument("--data-dir", required=True, type=Path)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--topic-id", required=True, type=int)
    parser.add_argument("--partition", required=True, type=int)
    parser.add_argument("--ready-fd", type=int, default=-1)
    parser.add_argument("--parent-pid", type=int, default=0)
    parser.add_argument("--socket-mode", type=lambda text: int(text, 8), default=0o660)
    parser.add_argument("--spin-us", type=int, default=SPIN_US)
    parser.add_argument("--check-thread", choices=overlap.MODES, default="auto")
    parser.add_argument("--stall-warn-ms", type=int, default=STALL_WARN_MS)
    parser.add_argument("--connections-max", type=int, default=limits.connections_max)
    parser.add_argument("--frame-read-timeout-ms", type=int, default=FRAME_READ_TIMEOUT_MS)
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
    _die_with_parent()
    if args.parent_pid and os.getppid() != args.parent_pid:
        return EXIT_BOOT_FAILED  # the supervisor died before we set the death signal
    overlap.configure(args.check_thread)
    paths = PartitionPaths(args.data_dir.resolve(), args.topic, args.topic_id, args.partition)
    worker = PartitionWorker(paths, socket_mode=args.socket_mode, spin_us=args.spin_us,
                             stall_warn_ms=args.stall_warn_ms,
                             connections_max=args.connections_max,
                             frame_read_timeout_ms=args.frame_read_timeout_ms)
    signal.signal(signal.SIGTERM, lambda *_: worker.request_stop())
    signal.signal(signal.SIGINT, lambda *_: worker.request_stop())
    signal.signal(signal.SIGHUP, lambda *_: worker.request_reload())
    try:
        worker.boot()
    except Exception as error:  # noqa: BLE001 - any boot failure is reported the same way
        logger.error("%s/%d: cannot start: %s", args.topic, args.partition, error,
                     exc_info=not isinstance(error, ShmbrokerError | OSError | RuntimeError))
        with contextlib.suppress(Exception):
            worker.stop()
        return EXIT_BOOT_FAILED
    # What is loaded and opened by now lives as long as the worker: out of the collector's
    # reach, so that a full collection walks only what serving made since, not every object
    # of the modules a worker imports (~8 ms here; the partition's produce and fetch wait
    # meanwhile).  The stall warnings say how long collections took in a long turn.
    gc.collect()
    gc.freeze()
    worker.stalls.watch_collections()
    if args.ready_fd >= 0:
        with contextlib.suppress(OSError):
            os.write(args.ready_fd, b"ready\n")
            os.close(args.ready_fd)
    try:
        worker.serve()
    except Exception:
        logger.exception("%s: crashed", worker.name)
        with contextlib.suppress(Exception):
            worker.stop()
        return EXIT_CRASHED
    worker.stop()
    logger.info("%s: stopped", worker.name)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
