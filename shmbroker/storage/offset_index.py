"""Sparse segment indexes: the shared machinery and the offset index (``.index``).

``.index`` file layout (Kafka's), big-endian, 8-byte entries, no header::

    position  size  field
    0         4     relative_offset  uint32  batch base offset - segment base offset
    4         4     position         uint32  byte position of that batch in the .log

Entries are sparse: one every ``index_interval_bytes`` of log (see ``Segment``).  Unlike recent
Kafka, an entry names the *base* offset of the batch that starts at ``position``, so a lookup lands
on the batch itself.  There is no checksum: indexes are derived data; recovery compares them with
the log and rebuilds them when they disagree.

While its segment is active an index file is preallocated (ftruncate) to ``segment_index_bytes``
and the bytes past the entries are zero; a sealed or cleanly closed index is trimmed to its
entries.  Entries live in memory as numpy arrays (binary search is ``np.searchsorted``); the file
is written with ``os.pwrite``, never through mmap.

Entries reach the file lazily.  The in-memory entries answer every lookup of the running
process; the file matters only to the next open, so an append writes its new entries only when
one of them needs file space that no write has reached yet (the first entry in a new file-system
block); the others wait for that write or for :meth:`SparseIndex.write_pending` from an index
sync, a seal or a close.  At most a block of entries (512 offset entries, 341 time entries)
waits, and an append of one 64 KiB batch saves its two index pwrites.  Nothing is lost by
waiting: the recovery-point checkpoint writes and fsyncs the entries before it names an offset
(recovery trusts the entries below it), and crash recovery rescans what lies past it and
rewrites the index files to match (see ``Segment.recover``).

A full disk: preallocation is sparse (``ftruncate``), so writing an entry into a new block may
fail with ENOSPC -- and that write is never deferred, so the append that caused it fails, not a
later flush.  The caller (``Segment.append``) then drops the entries in memory with
:meth:`SparseIndex.truncate_entries`, which also zeroes whatever part of them reached the file
(best effort: bytes past the entries are derived junk at worst, which a clean close trims and
crash recovery compares and rewrites).  Rewriting bytes of a block already written needs no new
space on the file systems we run on (ext4, xfs, tmpfs); on a copy-on-write one (btrfs) a
deferred write could still meet ENOSPC later, in a checkpoint's index sync, a seal or a close:
those log it and go on, and the next open checks the index against the log and rebuilds it, as
for any index a crash left behind.
"""

from __future__ import annotations

import os
import struct
from typing import ClassVar

import numpy as np

_INITIAL_CAPACITY = 64
_BLOCK_BYTES_DEFAULT = 4096  # when fstat cannot say (st_blksize: the file system's block)


class SparseIndex:
    """An ordered, sparse key -> value index backed by a file of fixed-size entries.

    Invariants:
    - ``0 <= entries_count <= max_entries``; keys of entries ``[0, entries_count)`` strictly grow;
      values never decrease.
    - The file's first ``entries_count`` entries equal the in-memory ones after
      :meth:`write_pending`; while ``is_active`` the file is ``max_entries * ENTRY_SIZE`` bytes
      long.
    - ``_file_count <= entries_count``; entries at or past ``_file_high`` were never written to
      the file since it was last zeroed there (``_file_count <= _file_high``).
    """

    FILE_DTYPE: ClassVar[np.dtype]  # structured, big-endian: (key, value)
    ENTRY_STRUCT: ClassVar[struct.Struct]  # the same entry, for a few at a time
    ENTRY_SIZE: ClassVar[int]
    KEY_NAME: ClassVar[str]
    VALUE_NAME: ClassVar[str]

    def __init__(self, path: str, max_index_bytes: int) -> None:
        self.path = path
        self.max_entries = max(2, max_index_bytes // self.ENTRY_SIZE)
        self._keys = np.zeros(_INITIAL_CAPACITY, dtype=np.int64)
        self._values = np.zeros(_INITIAL_CAPACITY, dtype=np.int64)
        self.entries_count = 0
        self._file_count = 0  # entries [0, _file_count) are known to be in the file
        self._file_high = 0  # entries [_file_high, max_entries) of the file are zero (or absent)
        # entries [0, _backed_count) lie in file blocks that a write has reached: writing them
        # needs no new space (see write_if_unbacked)
        self._backed_count = 0
        self._block_bytes = _BLOCK_BYTES_DEFAULT
        self._fd = -1
        self._last_entry = (0, 0)
        self._last_entry_count = -1  # _last_entry is valid while entries_count equals this

    # -- state --------------------------------------------------------------------------------
    @property
    def is_active(self) -> bool:
        return self._fd >= 0

    @property
    def free_entries(self) -> int:
        return self.max_entries - self.entries_count

    @property
    def keys(self) -> np.ndarray:
        return self._keys[: self.entries_count]

    @property
    def values(self) -> np.ndarray:
        return self._values[: self.entries_count]

    def last_entry(self) -> tuple[int, int] | None:
        if self.entries_count == 0:
            return None
        if self._last_entry_count != self.entries_count:  # Python ints, cached: hot path
            self._last_entry = (int(self._keys[self.entries_count - 1]),
                                int(self._values[self.entries_count - 1]))
            self._last_entry_count = self.entries_count
        return self._last_entry

    # -- file ---------------------------------------------------------------------------------
    def read_file(self) -> tuple[np.ndarray, np.ndarray, int] | None:
        """Entries as stored on disk (keys, values, file size), or None if the file is missing.

        A preallocated file's zero tail is returned as entries, as far as it was written; the
        caller judges them.  Its never-written tail is a hole (preallocation is an ftruncate),
        which reads as zeros and is not read: an active index of 10 MiB with a few entries is
        read in microseconds, not tens of milliseconds (a worker's restart after a crash).
        """
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            file_size = os.fstat(fd).st_size
            try:
                data_end = os.lseek(fd, 0, os.SEEK_HOLE)  # the file's size when it has no hole
            except OSError:  # a file system without SEEK_HOLE
                data_end = file_size
            data = _pread_all(fd, min(data_end, file_size))
        finally:
            os.close(fd)
        whole = len(data) // self.ENTRY_SIZE * self.ENTRY_SIZE
        raw = np.frombuffer(data, dtype=self.FILE_DTYPE, count=whole // self.ENTRY_SIZE)
        keys = raw[self.KEY_NAME].astype(np.int64)
        values = raw[self.VALUE_NAME].astype(np.int64)
        return keys, values, file_size

    def set_entries(self, keys: np.ndarray, values: np.ndarray) -> None:
        """Replace the in-memory entries (the file is not touched)."""
        count = len(keys)
        assert count == len(values) and count <= self.max_entries
        capacity = max(_INITIAL_CAPACITY, count)
        self._keys = np.zeros(capacity, dtype=np.int64)
        self._values = np.zeros(capacity, dtype=np.int64)
        self._keys[:count] = keys
        self._values[:count] = values
        self.entries_count = count
        self._file_count = 0  # unknown: write_pending rewrites from the start if active
        self._file_high = count  # (called before activation, which trusts the file's zero tail)
        self._last_entry_count = -1

    def write_file(self, *, active: bool) -> None:
        """Rewrite the whole file from memory; preallocate it when ``active``."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            os.ftruncate(fd, 0)
            self._file_count = 0
            self._file_high = self.entries_count
            _pwrite_all(fd, self._encode(0, self.entries_count), 0)
            self._file_count = self.entries_count
            if active:
                os.ftruncate(fd, self.max_entries * self.ENTRY_SIZE)
        except BaseException:
            os.close(fd)
            raise
        self._close_fd()
        if active:
            self._fd = fd
            self._learn_blocks(fd, self.entries_count)
        else:
            os.fsync(fd)
            os.close(fd)

    def activate(self) -> None:
        """Open the file for appends and preallocate it (entries must already be on disk)."""
        if self._fd >= 0:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            os.ftruncate(fd, self.max_entries * self.ENTRY_SIZE)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._file_count = self.entries_count
        self._file_high = self.entries_count  # the bytes past the entries are zero
        self._learn_blocks(fd, self.entries_count)  # (the entries were written: read back)

    def activate_empty(self) -> None:
        """Open the file for appends as a preallocated file of zeros, the in-memory entries
        still to be written (by the next :meth:`write_pending`).  Needs no free space on a file
        system with sparse files: for recovery on a full disk, where rewriting them failed."""
        self._close_fd()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            os.ftruncate(fd, 0)
            os.ftruncate(fd, self.max_entries * self.ENTRY_SIZE)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._file_count = 0
        self._file_high = 0
        self._learn_blocks(fd, 0)

    def seal(self, *, fsync: bool = True) -> None:
        """Trim the file to its entries, make it durable and close it."""
        if self._fd < 0:
            return
        self.write_pending()
        os.ftruncate(self._fd, self.entries_count * self.ENTRY_SIZE)
        if fsync:
            os.fsync(self._fd)
        self._close_fd()

    def seal_deferred(self) -> int | None:
        """:meth:`seal` without its fsync: trim the file and close it, returning a duplicate of
        its fd for another thread to fsync (the caller closes it); None when not open."""
        if self._fd < 0:
            return None
        self.write_pending()
        os.ftruncate(self._fd, self.entries_count * self.ENTRY_SIZE)
        duplicate = os.dup(self._fd)
        self._close_fd()
        return duplicate

    def flush(self) -> None:
        if self._fd >= 0:
            self.write_pending()
            os.fsync(self._fd)

    def dup_for_flush(self) -> int | None:
        """Write the pending entries and return a duplicate of the file's fd, for another
        thread to fsync (the caller closes it); None when the file is not open (sealed)."""
        if self._fd < 0:
            return None
        self.write_pending()
        return os.dup(self._fd)

    def abandon(self) -> None:
        """Close without trimming or syncing (what a crash leaves)."""
        self._close_fd()

    def _close_fd(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    # -- entries ------------------------------------------------------------------------------
    def append(self, key: int, value: int) -> None:
        """Add one entry at the end, in memory; :meth:`write_pending` puts new entries in the
        file (one pwrite per append call of the segment, not one per entry)."""
        count = self.entries_count
        assert count < self.max_entries, f"{self.path} is full"
        if __debug__ and count:
            last_key, last_value = self.last_entry()  # type: ignore[misc]
            assert key > last_key and value >= last_value, (key, value, last_key, last_value)
        if count == len(self._keys):
            capacity = min(self.max_entries, 2 * count)
            self._keys = np.resize(self._keys, capacity)
            self._values = np.resize(self._values, capacity)
        self._keys[count] = key
        self._values[count] = value
        self.entries_count = count + 1
        self._last_entry = (key, value)
        self._last_entry_count = count + 1

    def write_pending(self) -> None:
        """Write the entries appended since the last write, in one pwrite (when active)."""
        if self._fd >= 0 and self._file_count < self.entries_count:
            start = self._file_count
            count = self.entries_count
            self._file_high = max(self._file_high, count)  # before: it may tear
            _pwrite_all(self._fd, self._encode(start, count), start * self.ENTRY_SIZE)
            self._file_count = count
            if count > self._backed_count:
                self._backed_count = self._entries_in_blocks(count)

    def write_if_unbacked(self) -> None:
        """:meth:`write_pending` now if a pending entry needs file space that no write has
        reached yet (that write may fail with ENOSPC, and the append that caused it must see
        so); else the entries wait (see the module docstring)."""
        if self.entries_count > self._backed_count and self._fd >= 0:
            self.write_pending()

    def _learn_blocks(self, fd: int, written_count: int) -> None:
        """Note the file system's block size, and that entries ``[0, written_count)`` are
        written, for :meth:`write_if_unbacked`."""
        try:
            self._block_bytes = max(os.fstat(fd).st_blksize, self.ENTRY_SIZE)
        except OSError:
            self._block_bytes = _BLOCK_BYTES_DEFAULT
        self._backed_count = self._entries_in_blocks(written_count) if written_count else 0

    def _entries_in_blocks(self, written_count: int) -> int:
        """The whole entries that fit in the blocks that ``written_count`` entries touch."""
        block = self._block_bytes
        end = -(-written_count * self.ENTRY_SIZE // block) * block
        return min(end // self.ENTRY_SIZE, self.max_entries)

    def truncate_entries(self, count: int) -> None:
        """Drop entries ``[count, entries_count)``, in memory first; then zero what of them
        reached the file (when active).  Raises OSError if zeroing fails, with the entries
        already dropped (the file then holds junk past them: see the module docstring)."""
        if count < self.entries_count:
            self.entries_count = count
            self._last_entry_count = -1
        self._file_count = min(self._file_count, self.entries_count)
        high = self._file_high
        if self._fd >= 0 and high > self.entries_count:
            count = self.entries_count
            os.pwrite(self._fd, bytes((high - count) * self.ENTRY_SIZE), count * self.ENTRY_SIZE)
            self._file_high = count

    def floor_index(self, key: int) -> int:
        """Index of the last entry whose key is <= ``key``; -1 when there is none."""
        return int(np.searchsorted(self.keys, key, side="right")) - 1

    def first_index_at_or_after_value(self, value: int) -> int:
        """Index of the first entry whose value is >= ``value`` (entries_count if none)."""
        return int(np.searchsorted(self.values, value, side="left"))

    def _encode(self, start: int, stop: int) -> bytes:
        if stop - start <= 4:  # the usual append: a struct per entry beats a numpy record array
            pack = self.ENTRY_STRUCT.pack
            return b"".join(pack(int(self._keys[i]), int(self._values[i]))
                            for i in range(start, stop))
        out = np.empty(stop - start, dtype=self.FILE_DTYPE)
        out[self.KEY_NAME] = self._keys[start:stop]
        out[self.VALUE_NAME] = self._values[start:stop]
        return out.tobytes()

    def shape_problem(self, keys: np.ndarray, values: np.ndarray, file_size: int) -> str | None:
        """Why these on-disk entries cannot be an index of this kind (None when they can)."""
        if file_size % self.ENTRY_SIZE:
            return f"size {file_size} is not a multiple of {self.ENTRY_SIZE}"
        if len(keys) > self.max_entries:
            return f"{len(keys)} entries exceed the maximum {self.max_entries}"
        if len(keys) > 1 and not bool(np.all(np.diff(keys) > 0)):
            return f"{self.KEY_NAME}s do not strictly increase"
        if len(values) > 1 and not bool(np.all(np.diff(values) >= 0)):
            return f"{self.VALUE_NAME}s decrease"
        return None


class OffsetIndex(SparseIndex):
    """relative offset -> position.  Also: positions strictly increase (one entry per batch)."""

    FILE_DTYPE = np.dtype([("relative_offset", ">u4"), ("position", ">u4")])
    ENTRY_STRUCT = struct.Struct(">II")
    ENTRY_SIZE = 8
    KEY_NAME = "relative_offset"
    VALUE_NAME = "position"

    def lookup(self, relative_offset: int) -> tuple[int, int]:
        """(relative offset, position) of the last entry at or before ``relative_offset``.

        (0, 0) -- the segment's start -- when no entry is at or before it.
        """
        found = self.floor_index(relative_offset)
        if found < 0:
            return 0, 0
        return int(self._keys[found]), int(self._values[found])

    def shape_problem(self, keys: np.ndarray, values: np.ndarray, file_size: int) -> str | None:
        problem = super().shape_problem(keys, values, file_size)
        if problem is None and len(values) > 1 and not bool(np.all(np.diff(values) > 0)):
            problem = "positions do not strictly increase"
        return problem


def _pread_all(fd: int, size: int) -> bytes:
    parts = []
    position = 0
    while position < size:
        part = os.pread(fd, size - position, position)
        if not part:  # the file shrank meanwhile
            break
        parts.append(part)
        position += len(part)
    return b"".join(parts)


def _pwrite_all(fd: int, data: bytes, position: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, position)
        view = view[written:]
        position += written
