"""Single-producer/single-consumer byte ring in POSIX shared memory: one per (producer, partition).

Layout (full table and constants in :mod:`shmbroker.format.ring_layout`)::

    [0, 4096)          header: geometry, producer identity and doorbell, then one cache line each
                       for {head, head_seq} (producer), {producer_closed, producer_waiting}
                       (producer), {progress_gen, progress[2]} (worker), {worker_broken} (worker)
    [4096, D)          ack slots: ack_slots x (seq u64, result i64), written by the worker
    [D, D+data_bytes)  data area: Kafka RecordBatch v2 frames back to back, WRAP_MARKER at a lap end

Invariants (byte counters are monotonic; a data position is ``counter % data_bytes``):

* ``tail <= head`` and ``head - tail <= data_bytes``; ``tail_seq <= head_seq``;
* the producer publishes frame ``seq`` only if ``seq < acks_read + ack_slots``, where
  ``acks_read <= tail_seq`` is the first frame whose result the producer has not yet read out of
  its ack slot, so a slot is never overwritten before its result was taken;
* a frame never straddles the end of the data area and is at most ``data_bytes // 2`` bytes, so
  it always fits after a wrap; a frame's base_offset is never -1 (the wrap marker);
* the worker writes the ack slots of frames ``[tail_seq, tail_seq + n)`` before it publishes the
  progress ``(tail', tail_seq + n)``;
* each frame carries the ring's producer id, and its base sequence follows the previous frame's
  records (mod 2**31); the worker's reader checks it (``check_frames``);
* the reader looks only at published bytes: a producer killed while writing a frame (before its
  head store) leaves nothing of it to read.  A published frame that is impossible marks the ring
  broken (``worker_broken``, :attr:`RingReader.broken_reason`): it is never read again, the
  frames before it are still taken, the producer fails the rest and opens a new ring.

Damage from outside (a stray write into the object): the worker checks the header words it
attached with (magic, version, geometry, producer id: :meth:`RingReader.header_problem`) and
marks a ring whose header changed broken; a head outside the data area or a frame length past
the head is an impossible frame.  The worker only ever rings an abstract doorbell address read
at attach (never a filesystem path).  Garbage in the worker's own words (progress, ack slots)
makes the producer's next read fail with RingError: it gives the ring up.

Memory order.  Every shared counter is one aligned native 8-byte word, written by one side only,
through ``memoryview(mmap).cast("Q")``: CPython compiles each item store or load to one 8-byte
move.  A side writes its payload first (frame bytes, ack slots) and its counter last; on x86-64
(TSO: stores are seen in program order, loads are not reordered with loads) that is enough for
the other side to see the payload once it sees the counter.  This is NOT portable to weakly
ordered CPUs (ARM, POWER): there the stores need release and the loads acquire semantics, i.e. a
small C helper.  The progress pair ``(tail, tail_seq)`` is published with a two-slot seqlock:
write slot ``(gen + 1) % 2``, then store ``gen + 1``; a reader reads gen, the slot ``gen % 2``,
gen again, and retries if it changed.

Waking.  ``producer_waiting`` (producer sets it before sleeping on its doorbell) and the worker's
progress store form a store->load pattern that x86 may reorder, so a wake-up can be lost: the
producer must sleep with a timeout (MEASUREMENTS.md, lesson 5), which bounds that race.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Sequence
from typing import NamedTuple

import posix_ipc
import psutil

from shmbroker import limits
from shmbroker.errors import InvalidConfigError, RecordTooLargeError, RingError
from shmbroker.format.ring_layout import (
    ACK_AREA_WORD,
    ACK_SLOT_WORDS,
    ACK_SLOTS_WORD,
    DATA_BYTES_WORD,
    DOORBELL_ADDRESS_BYTES_MAX,
    DOORBELL_ADDRESS_POSITION,
    DOORBELL_LENGTH_WORD,
    FRAME_BYTES_MIN,
    FRAME_HEADER_BYTES,
    FRAME_LAST_OFFSET_DELTA_POSITION,
    FRAME_SEQUENCE_MODULUS,
    HEAD_SEQ_WORD,
    HEAD_WORD,
    MAGIC_WORD,
    PAGE_BYTES,
    PRODUCER_CLOSED_WORD,
    PRODUCER_ID_WORD,
    PRODUCER_PID_WORD,
    PRODUCER_START_TIME_MS_WORD,
    PRODUCER_WAITING_WORD,
    PROGRESS_GEN_WORD,
    PROGRESS_SLOT_WORDS,
    PROGRESS_WORD,
    RING_BROKEN_CORRUPT_FRAME,
    RING_HEADER_BYTES,
    RING_MAGIC,
    RING_VERSION,
    VERSION_WORD,
    WORKER_BROKEN_WORD,
    WRAP_MARKER,
    broken_reason,
    data_area_position,
    ring_object_bytes,
)
from shmbroker.shm import doorbell, names

Buffer = bytes | bytearray | memoryview

_FRAME_HEAD = struct.Struct(">qi")  # base_offset, batch_length
# last_offset_delta, (base and max timestamps), producer_id, producer_epoch, base_sequence
_FRAME_IDENTITY = struct.Struct(">i16xqhi")
_WRAP_BASE_OFFSET = -1  # WRAP_MARKER read as a big-endian int64
_TOUCH_CHUNK_BYTES = 1024 * 1024
_ZEROS = bytes(_TOUCH_CHUNK_BYTES)
_SEQLOCK_TRIES_MAX = 100_000
_PRODUCER_ID_MAX = (1 << 63) - 1
_START_TIME_TOLERANCE_MS = 1000


def _geometry_problem(data_bytes: int, ack_slots: int) -> str | None:
    if (data_bytes % PAGE_BYTES or not
            limits.ring_data_bytes_min <= data_bytes <= limits.ring_data_bytes_max):
        return (f"data_bytes {data_bytes} must be a multiple of {PAGE_BYTES} in "
                f"[{limits.ring_data_bytes_min}, {limits.ring_data_bytes_max}]")
    if ack_slots < 1 or ack_slots & (ack_slots - 1) or ack_slots > limits.ring_ack_slots_max:
        return f"ack_slots {ack_slots} must be a power of two in [1, {limits.ring_ack_slots_max}]"
    return None


_WORD_MASK = (1 << 64) - 1
_SEQ_MAX = 1 << 62  # frame numbers of a ring stay below this (2**62 frames: never reached)


def _read_progress(words: memoryview) -> tuple[int, int]:
    """The (tail, tail_seq) pair through the seqlock."""
    for _ in range(_SEQLOCK_TRIES_MAX):
        generation = words[PROGRESS_GEN_WORD]
        slot = PROGRESS_WORD + (generation & 1) * PROGRESS_SLOT_WORDS
        tail = words[slot]
        tail_seq = words[slot + 1]
        if words[PROGRESS_GEN_WORD] == generation:
            return tail, tail_seq
    raise RingError(f"ring progress changed on each of {_SEQLOCK_TRIES_MAX} reads")


def _process_start_time_ms(process: psutil.Process) -> int:
    return int(process.create_time() * 1000)


class _RingMapping:
    """What both sides share: the mapping and its cached typed views."""

    def __init__(self, name: str, mapping: mmap.mmap, data_bytes: int, ack_slots: int) -> None:
        self.name = name
        self.data_bytes = data_bytes
        self.ack_slots = ack_slots
        self._mmap: mmap.mmap | None = mapping
        self._words = memoryview(mapping).cast("Q")
        self._signed = memoryview(mapping).cast("q")
        data_position = data_area_position(ack_slots)
        self._data = memoryview(mapping)[data_position:data_position + data_bytes]
        self._ack_mask = ack_slots - 1

    @property
    def closed(self) -> bool:
        return self._mmap is None

    def _unmap(self) -> None:
        if self._mmap is None:
            return
        for view in (self._data, self._signed, self._words):
            view.release()
        try:
            self._mmap.close()
        except BufferError:
            pass  # a caller still holds a region view: unmapped when the last one is dropped
        self._mmap = None

    def unlink(self) -> None:
        """Remove the ring's name (mappings stay valid until closed)."""
        names.unlink(self.name)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} data_bytes={self.data_bytes}>"


class RingWriter(_RingMapping):
    """The producer's side: creates the ring, writes frames, reads their results."""

    def __init__(self, name: str, mapping: mmap.mmap, data_bytes: int, ack_slots: int,
                 producer_id: int) -> None:
        super().__init__(name, mapping, data_bytes, ack_slots)
        self.producer_id = producer_id
        self.frame_bytes_max = data_bytes // 2
        self._head = 0  # mirrors of our own counters
        self._head_seq = 0
        self._tail = 0  # the worker's progress as last read
        self._tail_seq = 0
        self._acks_read = 0  # first frame whose result is not in _results yet
        self._results_first = 0
        self._results: list[int] = []
        self._skip = 0  # wrap skip of the reserved frame
        self._reserved = -1  # bytes reserved by writable_region, -1 when none

    @classmethod
    def create(cls, name: str, *, data_bytes: int, ack_slots: int, producer_id: int,
               doorbell_address: bytes = b"", mode: int = 0o600) -> RingWriter:
        """Create a new ring object ``name`` (it must not exist) and map it."""
        problem = _geometry_problem(data_bytes, ack_slots)
        if problem:
            raise InvalidConfigError(f"ring {name}: {problem}")
        if not 0 < producer_id <= _PRODUCER_ID_MAX:
            raise InvalidConfigError(f"ring {name}: producer_id {producer_id} is not a positive "
                                     f"int64")
        if len(doorbell_address) > DOORBELL_ADDRESS_BYTES_MAX:
            raise InvalidConfigError(f"ring {name}: doorbell address of {len(doorbell_address)} "
                                     f"bytes; at most {DOORBELL_ADDRESS_BYTES_MAX} fit")
        size = ring_object_bytes(data_bytes, ack_slots)
        try:
            shared = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=mode, size=size)
        except posix_ipc.ExistentialError:
            raise RingError(f"ring {name} already exists") from None
        try:
            mapping = mmap.mmap(shared.fd, size)
        except BaseException:
            shared.unlink()
            raise
        finally:
            shared.close_fd()
        ring = cls(name, mapping, data_bytes, ack_slots, producer_id)
        try:
            ring._initialise(doorbell_address)
        except BaseException:
            ring.close()
            ring.unlink()
            raise
        return ring

    def _initialise(self, doorbell_address: bytes) -> None:
        assert self._mmap is not None
        words = self._words
        words[VERSION_WORD] = RING_VERSION
        words[DATA_BYTES_WORD] = self.data_bytes
        words[ACK_SLOTS_WORD] = self.ack_slots
        process = psutil.Process()
        words[PRODUCER_PID_WORD] = process.pid
        words[PRODUCER_START_TIME_MS_WORD] = _process_start_time_ms(process)
        words[PRODUCER_ID_WORD] = self.producer_id
        words[DOORBELL_LENGTH_WORD] = len(doorbell_address)
        end = DOORBELL_ADDRESS_POSITION + len(doorbell_address)
        self._mmap[DOORBELL_ADDRESS_POSITION:end] = doorbell_address
        # First touch of tmpfs pages costs ~1 GB/s: pay it now, not on the produce path.
        whole = memoryview(self._mmap)
        try:
            for start in range(RING_HEADER_BYTES, len(whole), _TOUCH_CHUNK_BYTES):
                chunk = min(_TOUCH_CHUNK_BYTES, len(whole) - start)
                whole[start:start + chunk] = _ZEROS[:chunk]
        finally:
            whole.release()
        words[MAGIC_WORD] = RING_MAGIC  # last: a reader that sees the magic sees the header

    # -- writing -------------------------------------------------------------------------------

    def _reserve(self, size: int) -> int:
        """Data position where a frame of ``size`` bytes goes now, or -1 if it does not fit."""
        if size > self.frame_bytes_max:
            raise RecordTooLargeError(f"a batch of {size} bytes does not fit in ring {self.name}: "
                                      f"at most {self.frame_bytes_max} bytes (half its data area)")
        if size < FRAME_BYTES_MIN:
            raise ValueError(f"a batch of {size} bytes is shorter than a RecordBatch v2 header "
                             f"({FRAME_BYTES_MIN} bytes)")
        if self._words[WORKER_BROKEN_WORD]:
            raise RingError(f"ring {self.name} was marked broken by the worker: "
                            f"{broken_reason(self._words[WORKER_BROKEN_WORD])}")
        data_bytes = self.data_bytes
        head = self._head
        position = head % data_bytes
        left = data_bytes - position
        skip = left if size > left else 0
        end = head + skip + size
        if end - self._tail > data_bytes or self._head_seq >= self._acks_read + self.ack_slots:
            self._collect()
            if end - self._tail > data_bytes or self._head_seq >= self._acks_read + self.ack_slots:
                return -1
        self._skip = skip
        return 0 if skip else position

    def _publish(self, size: int) -> int:
        data = self._data
        start = 0 if self._skip else self._head % self.data_bytes
        if data[start] == 0xFF and data[start:start + 8] == WRAP_MARKER:
            raise ValueError("a batch's base_offset may not be -1: that is the ring's wrap marker")
        if self._skip >= FRAME_HEADER_BYTES:
            position = self._head % self.data_bytes
            data[position:position + 8] = WRAP_MARKER
        seq = self._head_seq
        self._head += self._skip + size
        self._head_seq = seq + 1
        words = self._words
        words[HEAD_SEQ_WORD] = self._head_seq
        words[HEAD_WORD] = self._head  # publishes the frame
        return seq

    def try_write(self, batch: Buffer) -> int | None:
        """Copy one whole batch into the ring and publish it; its frame seq, or None if there is
        no room now (wait for acks, then retry)."""
        size = len(batch)
        position = self._reserve(size)
        if position < 0:
            return None
        self._data[position:position + size] = batch
        return self._publish(size)

    def writable_region(self, size: int) -> memoryview | None:
        """A writable view of ``size`` contiguous bytes to encode one batch into (zero copy), or
        None if there is no room now.  Publish it with :meth:`commit`; the view is invalid after.
        """
        position = self._reserve(size)
        if position < 0:
            return None
        self._reserved = size
        return self._data[position:position + size]

    def commit(self, size: int) -> int:
        """Publish the batch encoded into the last :meth:`writable_region` (``size`` may be less
        than was reserved); its frame seq."""
        if not FRAME_BYTES_MIN <= size <= self._reserved:
            raise ValueError(f"commit of {size} bytes: {self._reserved} reserved by "
                             f"writable_region (-1: none), at least {FRAME_BYTES_MIN} needed")
        self._reserved = -1
        return self._publish(size)

    # -- results -------------------------------------------------------------------------------

    def _collect(self) -> None:
        """Read the worker's progress and take the results of newly acknowledged frames."""
        self._tail, self._tail_seq = _read_progress(self._words)
        seq = self._acks_read
        tail_seq = self._tail_seq
        if tail_seq <= seq:
            return
        if tail_seq > self._head_seq:
            raise RingError(f"ring {self.name}: the worker acknowledged frame {tail_seq - 1} but "
                            f"only {self._head_seq} were written")
        if not self._results:
            self._results_first = seq
        signed = self._signed
        mask = self._ack_mask
        results = self._results
        for expected in range(seq, tail_seq):
            word = ACK_AREA_WORD + (expected & mask) * ACK_SLOT_WORDS
            if signed[word] != expected:
                raise RingError(f"ring {self.name}: ack slot of frame {expected} holds frame "
                                f"{signed[word]}; the worker broke the ring protocol")
            results.append(signed[word + 1])
        self._acks_read = tail_seq

    def acks(self) -> tuple[int, list[int]]:
        """``(first_seq, results)`` of the frames acknowledged since the previous call: result
        ``>= 0`` is the base offset the frame got, ``< 0`` an error number.  (A write that needs
        ack slots takes results out of them early; they are kept and returned here, so the list
        holds every frame acknowledged since the previous call, in seq order.)"""
        self._collect()
        first, results = self._results_first, self._results
        self._results = []
        self._results_first = self._acks_read
        return (first if results else self._acks_read), results

    @property
    def in_flight(self) -> int:
        """Frames written and not yet acknowledged by the worker."""
        self._tail, self._tail_seq = _read_progress(self._words)
        return self._head_seq - self._tail_seq

    @property
    def free_bytes(self) -> int:
        self._tail, self._tail_seq = _read_progress(self._words)
        return self.data_bytes - (self._head - self._tail)

    @property
    def broken(self) -> int:
        """0, or the error number the worker marked the ring broken with."""
        return self._words[WORKER_BROKEN_WORD]

    def set_waiting(self, waiting: bool) -> None:
        """Tell the worker that we sleep on our doorbell (and want a datagram after acks)."""
        self._words[PRODUCER_WAITING_WORD] = 1 if waiting else 0

    def close(self) -> None:
        """Mark the ring cleanly closed (no more frames) and unmap it; the name stays for the
        worker to drain and unlink."""
        if self._mmap is None:
            return
        self._words[PRODUCER_WAITING_WORD] = 0
        self._words[PRODUCER_CLOSED_WORD] = 1
        self._unmap()


class RingRegion(NamedTuple):
    """Consecutive published frames, contiguous in the data area."""

    view: memoryview  # writable, over the frames in shared memory
    positions: list[int]  # frame starts within view
    sizes: list[int]
    first_seq: int
    end_tail: int  # monotonic byte position after the region (any wrap skip before it included)
    frames: int


class RingReader(_RingMapping):
    """The worker's side: attaches to a ring, drains regions of frames, acknowledges them."""

    def __init__(self, name: str, mapping: mmap.mmap, data_bytes: int, ack_slots: int) -> None:
        super().__init__(name, mapping, data_bytes, ack_slots)
        words = self._words
        self.producer_id: int = words[PRODUCER_ID_WORD]
        self.producer_pid: int = words[PRODUCER_PID_WORD]
        self._producer_start_time_ms: int = words[PRODUCER_START_TIME_MS_WORD]
        length = min(words[DOORBELL_LENGTH_WORD], DOORBELL_ADDRESS_BYTES_MAX)
        self.doorbell_address = bytes(
            mapping[DOORBELL_ADDRESS_POSITION:DOORBELL_ADDRESS_POSITION + length])
        self._generation: int = words[PROGRESS_GEN_WORD]
        self._read_tail, self._read_seq = _read_progress(words)  # next_region's cursor
        self._published_seq = self._read_seq
        # The header words as attached: header_problem() compares them with what is there now.
        self._header = (RING_MAGIC, RING_VERSION, data_bytes, ack_slots, self.producer_id)
        self.check_frames = False  # see next_region
        self._next_sequence = -1  # base sequence the next frame must carry; -1: not known yet
        self.broken_reason = ""  # why this reader marked the ring broken

    @classmethod
    def attach(cls, name: str, *, check_frames: bool = False) -> RingReader:
        """Map the existing ring ``name`` after checking its layout.  ``check_frames``: also
        check each frame's producer id and base sequence (see :meth:`next_region`)."""
        try:
            shared = posix_ipc.SharedMemory(name)
        except posix_ipc.ExistentialError:
            raise RingError(f"ring {name} does not exist (never created, or already "
                            f"unlinked)") from None
        except posix_ipc.Error as error:  # permissions: another user's object
            raise RingError(f"ring {name} cannot be opened: {error}") from None
        try:
            size = shared.size
            if size < RING_HEADER_BYTES:
                raise RingError(f"ring {name} is {size} bytes, smaller than a ring header")
            mapping = mmap.mmap(shared.fd, size)
        finally:
            shared.close_fd()
        words = memoryview(mapping).cast("Q")
        try:
            magic, version = words[MAGIC_WORD], words[VERSION_WORD]
            data_bytes, ack_slots = words[DATA_BYTES_WORD], words[ACK_SLOTS_WORD]
            producer_id, doorbell_length = words[PRODUCER_ID_WORD], words[DOORBELL_LENGTH_WORD]
            doorbell_start = bytes(mapping[DOORBELL_ADDRESS_POSITION:DOORBELL_ADDRESS_POSITION + 1])
            # (both slots: a reader may start from either)
            progress_seqs = [words[PROGRESS_WORD + slot * PROGRESS_SLOT_WORDS + 1]
                             for slot in (0, 1)]
        finally:
            words.release()
        problem = None
        if magic != RING_MAGIC:
            problem = (f"wrong magic {magic.to_bytes(8, 'little')!r} (not a ring, or its "
                       f"producer has not finished creating it)")
        elif version != RING_VERSION:
            problem = f"version {version}; this build reads version {RING_VERSION}"
        else:
            problem = _geometry_problem(data_bytes, ack_slots)
            expected = ring_object_bytes(data_bytes, ack_slots)
            if problem is None and expected != size:
                problem = (f"object is {size} bytes; its header (data_bytes {data_bytes}, "
                           f"ack_slots {ack_slots}) says {expected}")
            elif problem is None and not 0 < producer_id <= _PRODUCER_ID_MAX:
                problem = f"producer_id {producer_id} is not a positive int64"
            elif problem is None and max(progress_seqs) >= _SEQ_MAX:
                # the worker's own words, overwritten: frame numbers this high never happen,
                # and counting on from them would overflow the 64-bit words
                problem = (f"its progress words hold frame number {max(progress_seqs)}, past "
                           f"{_SEQ_MAX}: not what a worker wrote")
            elif problem is None and doorbell_length and (
                    doorbell_length > doorbell.ADDRESS_BYTES_MAX or doorbell_start != b"\0"):
                # the worker sends datagrams there: only to an abstract address, never a path
                problem = (f"its doorbell address ({doorbell_length} bytes) is not an abstract "
                           f"Unix address of at most {doorbell.ADDRESS_BYTES_MAX} bytes")
        if problem:
            mapping.close()
            raise RingError(f"ring {name}: {problem}")
        reader = cls(name, mapping, data_bytes, ack_slots)
        reader.check_frames = check_frames
        return reader

    # -- draining ------------------------------------------------------------------------------

    def pending(self) -> bool:
        """Whether published frames wait beyond what :meth:`next_region` returned (one load)."""
        return self._words[HEAD_WORD] != self._read_tail

    def next_region(self, max_bytes: int) -> RingRegion | None:
        """The published frames from the read cursor on, contiguous in the data area, stopping
        before ``max_bytes`` unless the first frame alone is larger; None if there are none or
        the ring is broken.

        A published frame that cannot be what a RingWriter wrote (a head outside the data area,
        a length below a batch header or past the head, a misplaced wrap marker; with
        ``check_frames``, another producer id or a base sequence that does not follow the
        previous frame's) marks the ring broken, with :attr:`broken_reason` saying why; the
        frames before it are still returned first (a later call stops at the bad one).  Bytes
        not yet published are never looked at, so a producer killed while writing a frame
        leaves nothing of it to read."""
        words = self._words
        if words[WORKER_BROKEN_WORD]:
            return None
        head = words[HEAD_WORD]
        tail = self._read_tail
        if head == tail:
            return None
        data_bytes = self.data_bytes
        if not tail < head <= tail + data_bytes:
            return self._corrupt(f"head {head} is outside ({tail}, {tail + data_bytes}], the "
                                 f"bytes after the read position {tail}")
        data = self._data
        position = tail % data_bytes
        left = data_bytes - position
        unpack = _FRAME_HEAD.unpack_from
        if left < FRAME_HEADER_BYTES or unpack(data, position)[0] == _WRAP_BASE_OFFSET:
            tail += left
            position = 0
            if head <= tail:  # a skip without its frame: not what RingWriter writes
                return self._corrupt(f"head {head} ends in the wrap skip before {tail}")
        start = position
        at_data_end = head - tail >= data_bytes - position
        end = data_bytes if at_data_end else position + (head - tail)
        limit = start + max_bytes
        positions: list[int] = []
        sizes: list[int] = []
        problem = ""
        check_frames = self.check_frames
        identity = _FRAME_IDENTITY.unpack_from
        sequence = self._next_sequence
        while position < end:
            seq = self._read_seq + len(positions)
            if end - position < FRAME_HEADER_BYTES:
                if not at_data_end:
                    problem = (f"{end - position} published bytes after frame {seq - 1} are "
                               f"not a frame")
                break  # at the data end: a wrap, the next call skips it
            base_offset, batch_length = unpack(data, position)
            if base_offset == _WRAP_BASE_OFFSET:
                if not at_data_end:
                    problem = f"a wrap marker in place of frame {seq}, before the data end"
                break
            size = batch_length + FRAME_HEADER_BYTES
            if size < FRAME_BYTES_MIN or position + size > end:
                problem = (f"frame {seq} declares {size} bytes; {end - position} are published "
                           f"(at least {FRAME_BYTES_MIN} needed)")
                break
            if check_frames:
                delta, producer_id, _, base_sequence = identity(
                    data, position + FRAME_LAST_OFFSET_DELTA_POSITION)
                if producer_id != self.producer_id:
                    problem = (f"frame {seq} carries producer id {producer_id}, not the "
                               f"ring's {self.producer_id}")
                    break
                if sequence >= 0 and base_sequence != sequence:
                    problem = (f"frame {seq} has base sequence {base_sequence}; the previous "
                               f"frame's records end at {sequence}")
                    break
            if position + size > limit and positions:
                break
            if check_frames:
                sequence = (base_sequence + delta + 1) % FRAME_SEQUENCE_MODULUS
            positions.append(position - start)
            sizes.append(size)
            position += size
        if not positions:
            return self._corrupt(problem or "no whole frame in the published bytes")
        self._next_sequence = sequence
        first_seq = self._read_seq
        self._read_tail = tail + (position - start)
        self._read_seq = first_seq + len(positions)
        return RingRegion(data[start:position], positions, sizes, first_seq, self._read_tail,
                          len(positions))

    def _corrupt(self, reason: str) -> None:
        self.mark_broken(RING_BROKEN_CORRUPT_FRAME, reason)
        return None

    def header_problem(self) -> str | None:
        """What changed in the header since attach (magic, version, geometry, producer id), or
        None: a header overwritten under a running worker."""
        words = self._words
        now = (words[MAGIC_WORD], words[VERSION_WORD], words[DATA_BYTES_WORD],
               words[ACK_SLOTS_WORD], words[PRODUCER_ID_WORD])
        if now == self._header:
            return None
        fields = ("magic", "version", "data_bytes", "ack_slots", "producer_id")
        changed = [f"{field} {before} -> {after}"
                   for field, before, after in zip(fields, self._header, now) if before != after]
        return "header changed: " + ", ".join(changed)

    def record_results(self, region: RingRegion, results: Sequence[int]) -> None:
        """Write the ack slots of the region's first ``len(results)`` frames (``results[i]`` for
        frame ``first_seq + i``); may be repeated before :meth:`publish`, the last call wins.
        Every frame's slot must be written before the region is published."""
        if len(results) > region.frames:
            raise ValueError(f"{len(results)} results for a region of {region.frames} frames")
        signed = self._signed
        mask = self._ack_mask
        seq = region.first_seq
        for result in results:
            word = ACK_AREA_WORD + (seq & mask) * ACK_SLOT_WORDS
            signed[word + 1] = result
            signed[word] = seq  # after the result: a slot whose seq matches holds its result
            seq += 1

    def publish(self, region: RingRegion) -> None:
        """Publish progress past ``region`` (its ack slots must be recorded): frees its bytes."""
        assert region.first_seq == self._published_seq, (
            f"regions must be published in order: {region.first_seq} after {self._published_seq}")
        words = self._words
        generation = (self._generation + 1) & _WORD_MASK  # (read from shared memory: any value)
        slot = PROGRESS_WORD + (generation & 1) * PROGRESS_SLOT_WORDS
        words[slot] = region.end_tail
        words[slot + 1] = region.first_seq + region.frames
        words[PROGRESS_GEN_WORD] = generation
        self._generation = generation
        self._published_seq = region.first_seq + region.frames

    def slot(self, seq: int) -> tuple[int, int]:
        """The raw ack slot frame ``seq`` maps to: (seq stored there, result)."""
        word = ACK_AREA_WORD + (seq & self._ack_mask) * ACK_SLOT_WORDS
        return self._signed[word], self._signed[word + 1]

    # -- state ---------------------------------------------------------------------------------

    @property
    def progress(self) -> tuple[int, int]:
        """The published (tail, tail_seq)."""
        return _read_progress(self._words)

    @property
    def head(self) -> int:
        return self._words[HEAD_WORD]

    @property
    def head_seq(self) -> int:
        return self._words[HEAD_SEQ_WORD]

    @property
    def producer_closed(self) -> bool:
        return self._words[PRODUCER_CLOSED_WORD] == 1

    @property
    def producer_waiting(self) -> bool:
        return self._words[PRODUCER_WAITING_WORD] == 1

    @property
    def broken(self) -> int:
        return self._words[WORKER_BROKEN_WORD]

    def producer_alive(self) -> bool:
        """Whether the producer process still runs (same pid and start time, not a zombie)."""
        try:
            process = psutil.Process(self.producer_pid)
            started_ms = _process_start_time_ms(process)
            if abs(started_ms - self._producer_start_time_ms) > _START_TIME_TOLERANCE_MS:
                return False  # the pid was reused
            return process.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False
        except psutil.AccessDenied:
            return True

    def mark_broken(self, code: int, reason: str = "") -> None:
        """Declare the ring unusable (``code`` != 0): the producer sees it, fails the frames
        still in flight and opens a new ring.  The first mark stays."""
        assert code != 0
        if not self._words[WORKER_BROKEN_WORD]:
            self._words[WORKER_BROKEN_WORD] = code
            self.broken_reason = reason or broken_reason(code)

    def close(self) -> None:
        self._unmap()
