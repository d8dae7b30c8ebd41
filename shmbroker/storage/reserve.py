"""Disk space reserved ahead of appends: ``fallocate(FALLOC_FL_KEEP_SIZE)``.

An ``os.write`` that extends a file pays the file system for new blocks as it goes (ext4's
delayed allocation reserves them page by page); a write into blocks already allocated does not.
Measured here (ext4, page cache, 64 KiB writes): 6.0 GB/s into reserved space against 4.4 GB/s
extending the file.  Reserving with ``FALLOC_FL_KEEP_SIZE`` leaves the file's size alone, so
the size still marks the end of the data for every reader, recovery included; the reserved
blocks past it are released by truncating the file to its size (Segment does so when it seals
or closes a segment; in a worker, whose log flushes on tickets, a roll leaves that truncation
to the flush thread's next ticket: under heavy writeback that truncation waited up to ~180 ms
on ext4 here, the partition's appends with it, and rolls took 61-150 ms on a 16-core host).
A crash before the release leaves them allocated only until the reopen: such a segment lies
past the recovery point, and the recovery scan cuts each file it scans to its data.  Redpanda
reserves its segments the same way, in steps (``segment_fallocation_step``).

Python's ``os.posix_fallocate`` cannot keep the size, so libc's ``fallocate`` is called through
ctypes (the call releases the GIL).  Where there is no such call (not Linux) every reservation
fails with EOPNOTSUPP, and callers go on without.

File systems in memory (tmpfs, ramfs: a data dir under /dev/shm) have no blocks to allocate
ahead: there a reservation only takes memory early, and measured no faster (2.7 against 2.8 GB/s
here), so :func:`in_memory` tells callers to skip them.  Steps of 4 MiB got nearly all of the
gain on ext4 (5.9 GB/s; 1 MiB 5.7, 16 MiB 6.0).
"""

from __future__ import annotations

import ctypes
import errno
import os
from typing import Any

FALLOC_FL_KEEP_SIZE = 0x01
# statfs f_type of the file systems in memory
MEMORY_FILE_SYSTEMS = frozenset((0x01021994, 0x858458F6))  # TMPFS_MAGIC, RAMFS_MAGIC
_STATFS_BYTES = 256  # struct statfs is 120 bytes on x86-64 Linux; room to spare
# Errors that say this file system (or system) cannot reserve: stop asking for that file.
UNSUPPORTED_ERRNOS = frozenset((errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL))


def _libc_function(name: str, argtypes: list[Any]) -> Any:
    try:
        function = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (AttributeError, OSError):
        return None
    function.argtypes = argtypes
    function.restype = ctypes.c_int
    return function


_FALLOCATE = _libc_function("fallocate", [ctypes.c_int, ctypes.c_int, ctypes.c_int64,
                                          ctypes.c_int64])
_FSTATFS = _libc_function("fstatfs", [ctypes.c_int, ctypes.c_char_p])


def in_memory(fd: int) -> bool:
    """Whether ``fd``'s file lives on a file system in memory (False when it cannot say)."""
    if _FSTATFS is None:
        return False
    buffer = ctypes.create_string_buffer(_STATFS_BYTES)
    if _FSTATFS(fd, buffer) != 0:
        return False
    # f_type comes first, a C long (__fsword_t); the magic numbers fit in 32 bits
    return ctypes.c_long.from_buffer(buffer).value & 0xFFFFFFFF in MEMORY_FILE_SYSTEMS


def reserve(fd: int, offset: int, length: int) -> None:
    """Allocate ``[offset, offset + length)`` of ``fd``'s file without changing its size.
    OSError as the call fails (ENOSPC on a full disk; one of UNSUPPORTED_ERRNOS where it
    cannot be done)."""
    if _FALLOCATE is None:
        raise OSError(errno.EOPNOTSUPP, "fallocate is not available here")
    if _FALLOCATE(fd, FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
