"""Disk space reserved ahead of appends: ``fallocate(FALLOC_FL_KEEP_SIZE)``.

An ``os.write`` that extends a file pays the file system for new blocks as it goes (ext4's
delayed allocation reserves them page by page); a write into blocks already allocated does not.
Measured here (ext4, page cache, 64 KiB writes): 6.0 GB/s into reserved space against 4.4 GB/s
extending the file.  Reserving with ``FALLOC_FL_KEEP_SIZE`` leaves the file's size alone, so
the size still marks the end of the data for every reader, recovery included; the reserved
blocks past it are released by truncating the file to its size (Segment does so when it seals
or closes a segment).  Redpanda reserves its segments the same way, in steps
(``segment_fallocation_step``).

Python's ``os.posix_fallocate`` cannot keep the size, so libc's ``fallocate`` is called through
ctypes (the call releases the GIL).  Where there is no such call (not Linux) every reservation
fails with EOPNOTSUPP, and callers go on without.
"""

from __future__ import annotations

import ctypes
import errno
import os

FALLOC_FL_KEEP_SIZE = 0x01
# Errors that say this file system (or system) cannot reserve: stop asking for that file.
UNSUPPORTED_ERRNOS = frozenset((errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL))


def _libc_fallocate():  # type: ignore[no-untyped-def]
    try:
        function = ctypes.CDLL(None, use_errno=True).fallocate
    except (AttributeError, OSError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    function.restype = ctypes.c_int
    return function


_FALLOCATE = _libc_fallocate()


def reserve(fd: int, offset: int, length: int) -> None:
    """Allocate ``[offset, offset + length)`` of ``fd``'s file without changing its size.
    OSError as the call fails (ENOSPC on a full disk; one of UNSUPPORTED_ERRNOS where it
    cannot be done)."""
    if _FALLOCATE is None:
        raise OSError(errno.EOPNOTSUPP, "fallocate is not available here")
    if _FALLOCATE(fd, FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
