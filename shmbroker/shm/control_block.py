"""A partition's control block: 4096 bytes of shared memory its worker writes and anyone reads.

Layout (constants in :mod:`shmbroker.format.ring_layout`; native u64 words)::

    0    magic b"SHMBCTL1"    8    version 1          16   worker_pid       24   state
    32   generation           40   updated_ms
    64   log_start_offset     72   log_end_offset     80   high_watermark
    88   readable_sequence    96   readable_segment   104  readable_position  112 readable_offset
    128  worker_sleeping (1 = the worker blocks in select; producers ring its doorbell)

Invariants: only the partition's current worker writes (one writer per word, each store one
aligned 8-byte move: see :mod:`shmbroker.shm.ring` on memory order); ``log_start_offset <=
high_watermark <= log_end_offset`` as a reader sees it, because :meth:`ControlBlock.set_positions`
stores log_end, then high_watermark, then log_start, and :meth:`ControlBlock.positions` loads
them in the opposite order (positions only grow while a worker runs).  The readable end
(:meth:`ControlBlock.set_readable`) is three words under a sequence lock: where a consumer that
reads segment files itself may read to.  The object outlives
workers: a restarted worker reopens it, keeps its contents and bumps ``generation`` itself.

Damage from outside: the worker checks its block every tick.  A header overwritten
(:meth:`ControlBlock.header_valid`) is written again with every field; a name unlinked or
pointing elsewhere (:meth:`ControlBlock.replaced`, by inode) gets a new block, and the old one is
left with state STOPPED and worker_sleeping 1, so readers still mapping it reopen the name
(consumers) and meanwhile ring the doorbell on every write (producers): never a lost wake-up.
"""

from __future__ import annotations

import mmap
import os
import time
from typing import Any

import posix_ipc

from shmbroker.errors import AccessDeniedError, PartitionOfflineError, RingError
from shmbroker.format.ring_layout import (
    CONTROL_BLOCK_BYTES,
    CONTROL_GENERATION_POSITION,
    CONTROL_HIGH_WATERMARK_POSITION,
    CONTROL_LOG_END_OFFSET_POSITION,
    CONTROL_LOG_START_OFFSET_POSITION,
    CONTROL_MAGIC,
    CONTROL_MAGIC_POSITION,
    CONTROL_READABLE_OFFSET_POSITION,
    CONTROL_READABLE_POSITION_POSITION,
    CONTROL_READABLE_SEGMENT_POSITION,
    CONTROL_READABLE_SEQUENCE_POSITION,
    CONTROL_STATE_NAMES,
    CONTROL_STATE_POSITION,
    CONTROL_STATE_RUNNING,
    CONTROL_STATE_STARTING,
    CONTROL_STATE_STOPPED,
    CONTROL_STATE_STOPPING,
    CONTROL_STORAGE_FULL_POSITION,
    CONTROL_UPDATED_MS_POSITION,
    CONTROL_VERSION,
    CONTROL_VERSION_POSITION,
    CONTROL_WORKER_PID_POSITION,
    CONTROL_WORKER_SLEEPING_POSITION,
    WORD_BYTES,
)
from shmbroker.shm import names

STARTING = CONTROL_STATE_STARTING
RUNNING = CONTROL_STATE_RUNNING
STOPPING = CONTROL_STATE_STOPPING
STOPPED = CONTROL_STATE_STOPPED
STATE_NAMES = CONTROL_STATE_NAMES

_MAGIC_WORD = CONTROL_MAGIC_POSITION // WORD_BYTES
_VERSION_WORD = CONTROL_VERSION_POSITION // WORD_BYTES
_LOG_START_WORD = CONTROL_LOG_START_OFFSET_POSITION // WORD_BYTES
_LOG_END_WORD = CONTROL_LOG_END_OFFSET_POSITION // WORD_BYTES
_HIGH_WATERMARK_WORD = CONTROL_HIGH_WATERMARK_POSITION // WORD_BYTES
_READABLE_SEQUENCE_WORD = CONTROL_READABLE_SEQUENCE_POSITION // WORD_BYTES
_READABLE_SEGMENT_WORD = CONTROL_READABLE_SEGMENT_POSITION // WORD_BYTES
_READABLE_POSITION_WORD = CONTROL_READABLE_POSITION_POSITION // WORD_BYTES
_READABLE_OFFSET_WORD = CONTROL_READABLE_OFFSET_POSITION // WORD_BYTES
# A reader that meets the readable end being written this many times in a row gives up (the
# writer is preempted, or died in between): it then fetches through the worker's socket.
READABLE_READ_TRIES = 16


def _word(position: int, doc: str) -> Any:
    """A property over the u64 at ``position``; setting it fails on a read-only block."""
    index = position // WORD_BYTES

    def get(self: ControlBlock) -> int:
        return self._words[index]  # type: ignore[no-any-return]

    def put(self: ControlBlock, value: int) -> None:
        self._check_writable()
        self._words[index] = value

    return property(get, put, doc=doc)


class ControlBlock:
    """One partition's control block, mapped read-write (its worker) or read-only (anyone)."""

    worker_pid = _word(CONTROL_WORKER_PID_POSITION, "pid of the worker that last wrote")
    state = _word(CONTROL_STATE_POSITION, "STARTING, RUNNING, STOPPING or STOPPED")
    log_start_offset = _word(CONTROL_LOG_START_OFFSET_POSITION, "first offset in the log")
    log_end_offset = _word(CONTROL_LOG_END_OFFSET_POSITION, "offset the next batch gets")
    high_watermark = _word(CONTROL_HIGH_WATERMARK_POSITION, "offsets below it may be fetched")
    worker_sleeping = _word(CONTROL_WORKER_SLEEPING_POSITION,
                            "1 while the worker blocks in select: producers ring its doorbell")
    generation = _word(CONTROL_GENERATION_POSITION, "incremented by each worker start")
    updated_ms = _word(CONTROL_UPDATED_MS_POSITION, "wall clock (ms) of the last update")
    storage_full = _word(CONTROL_STORAGE_FULL_POSITION,
                         "1 while appends fail on the disk (no space left, ...), else 0")

    def __init__(self, name: str, mapping: mmap.mmap, writable: bool, inode: int = 0) -> None:
        self.name = name
        self.writable = writable
        self.inode = inode  # of the object mapped: replaced() compares it with the name's
        self._mmap: mmap.mmap | None = mapping
        self._words = memoryview(mapping).cast("Q")

    @classmethod
    def create_or_open(cls, name: str, mode: int = 0o600) -> ControlBlock:
        """The worker's view: keeps the contents of a valid existing block, otherwise
        (re)initialises it (magic, version; every other field zero, state STARTING)."""
        try:
            shared = posix_ipc.SharedMemory(name, posix_ipc.O_CREAT, mode=mode)
        except posix_ipc.Error as error:
            raise RingError(f"cannot create or open control block {name}: {error}") from None
        try:
            if shared.size != CONTROL_BLOCK_BYTES:
                os.ftruncate(shared.fd, 0)  # any other size is not ours: start from zeros
                os.ftruncate(shared.fd, CONTROL_BLOCK_BYTES)
            mapping = mmap.mmap(shared.fd, CONTROL_BLOCK_BYTES)
            inode = os.fstat(shared.fd).st_ino
        finally:
            shared.close_fd()
        block = cls(name, mapping, writable=True, inode=inode)
        if not block.header_valid():
            block.reinitialise()
        return block

    @classmethod
    def open(cls, name: str, readonly: bool = True) -> ControlBlock:
        """Anyone's view of an existing block."""
        try:
            shared = posix_ipc.SharedMemory(name, read_only=readonly)
        except posix_ipc.ExistentialError:
            raise PartitionOfflineError(f"partition's control block {name} does not exist: is "
                                        f"the broker running?") from None
        except posix_ipc.PermissionsError:
            raise AccessDeniedError(f"permission denied opening the partition's control block "
                                    f"{name} (another user's broker?)") from None
        try:
            if shared.size != CONTROL_BLOCK_BYTES:
                raise RingError(f"control block {name} is {shared.size} bytes, not "
                                f"{CONTROL_BLOCK_BYTES}")
            access = mmap.ACCESS_READ if readonly else mmap.ACCESS_WRITE
            mapping = mmap.mmap(shared.fd, CONTROL_BLOCK_BYTES, access=access)
            inode = os.fstat(shared.fd).st_ino
        finally:
            shared.close_fd()
        block = cls(name, mapping, writable=not readonly, inode=inode)
        words = block._words
        if words[_MAGIC_WORD] != CONTROL_MAGIC or words[_VERSION_WORD] != CONTROL_VERSION:
            block.close()
            raise RingError(f"control block {name} has the wrong magic or version (not "
                            f"initialised yet, or written by another build)")
        return block

    def header_valid(self) -> bool:
        """Whether magic and version are this build's (not overwritten)."""
        words = self._words
        return words[_MAGIC_WORD] == CONTROL_MAGIC and words[_VERSION_WORD] == CONTROL_VERSION

    def reinitialise(self) -> None:
        """Zero the block and write magic and version (magic last); the worker then stores its
        fields again."""
        self._check_writable()
        assert self._mmap is not None
        words = self._words
        words[_MAGIC_WORD] = 0
        self._mmap[:] = bytes(CONTROL_BLOCK_BYTES)
        words[_VERSION_WORD] = CONTROL_VERSION
        words[_MAGIC_WORD] = CONTROL_MAGIC

    def replaced(self) -> bool:
        """Whether the name no longer leads to the object mapped here (unlinked, or unlinked and
        created again): readers that open the name would not see this block."""
        try:
            return os.stat(os.path.join(names.SHM_DIR, self.name.lstrip("/"))).st_ino != self.inode
        except FileNotFoundError:
            return True

    def _check_writable(self) -> None:
        if not self.writable:
            raise PermissionError(f"control block {self.name} was opened read-only")

    def positions(self) -> tuple[int, int, int]:
        """``(log_start_offset, log_end_offset, high_watermark)``, mutually consistent."""
        words = self._words
        log_start = words[_LOG_START_WORD]
        high_watermark = words[_HIGH_WATERMARK_WORD]
        log_end = words[_LOG_END_WORD]
        return log_start, log_end, high_watermark

    def set_positions(self, log_start_offset: int, log_end_offset: int,
                      high_watermark: int) -> None:
        """Store all three in the order :meth:`positions` relies on."""
        assert log_start_offset <= high_watermark <= log_end_offset
        self._check_writable()
        words = self._words
        words[_LOG_END_WORD] = log_end_offset
        words[_HIGH_WATERMARK_WORD] = high_watermark
        words[_LOG_START_WORD] = log_start_offset

    def set_readable(self, segment_base_offset: int, position: int, offset: int) -> None:
        """Publish where a consumer reading the segment files itself may read up to: in the
        segment of ``segment_base_offset``, to byte ``position`` (a batch boundary), which is
        ``offset`` (<= high_watermark).  A sequence lock (one writer, the worker): the
        sequence is odd while the three words change, so a reader never takes a mix of two
        publications.  Written from an odd sequence too (a worker killed in between)."""
        self._check_writable()
        words = self._words
        sequence = (words[_READABLE_SEQUENCE_WORD] + 1) | 1
        words[_READABLE_SEQUENCE_WORD] = sequence
        words[_READABLE_SEGMENT_WORD] = segment_base_offset
        words[_READABLE_POSITION_WORD] = position
        words[_READABLE_OFFSET_WORD] = offset
        words[_READABLE_SEQUENCE_WORD] = sequence + 1

    def readable(self) -> tuple[int, int, int] | None:
        """``(segment_base_offset, position, offset)`` as :meth:`set_readable` last published
        it, or None: none published yet, or it kept changing under READABLE_READ_TRIES reads."""
        words = self._words
        for _ in range(READABLE_READ_TRIES):
            sequence = words[_READABLE_SEQUENCE_WORD]
            if sequence & 1:
                continue
            segment = words[_READABLE_SEGMENT_WORD]
            position = words[_READABLE_POSITION_WORD]
            offset = words[_READABLE_OFFSET_WORD]
            if words[_READABLE_SEQUENCE_WORD] == sequence:
                return (segment, position, offset) if sequence else None
        return None

    def touch(self) -> None:
        """Set ``updated_ms`` to now."""
        self.updated_ms = time.time_ns() // 1_000_000

    @property
    def state_name(self) -> str:
        return STATE_NAMES.get(self.state, f"unknown ({self.state})")

    def close(self) -> None:
        if self._mmap is None:
            return
        self._words.release()
        self._mmap.close()
        self._mmap = None

    def unlink(self) -> None:
        names.unlink(self.name)

    def __repr__(self) -> str:
        return (f"<ControlBlock {self.name} {self.state_name} positions={self.positions()} "
                f"generation={self.generation}>")
