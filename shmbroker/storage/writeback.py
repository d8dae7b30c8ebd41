"""Starting the kernel's writeback of a segment's new data early: ``sync_file_range``.

Appends go to the page cache; the kernel writes dirty pages back on its own schedule, and once
they pile up past its dirty limits it holds every writer in ``write`` while it catches up
(``balance_dirty_pages``): an append of 1 MiB that usually takes ~0.3 ms then takes 50-200 ms
(the worker's stall warnings call it "writing the segment files").  Asking for the writeback
of each few MiB as they are appended (``SYNC_FILE_RANGE_WRITE``: start it, wait for nothing)
keeps the dirty pages few, so the kernel seldom has to hold an append back.  RocksDB does the
same (``bytes_per_sync``).  Measured here (``bench/rolls.py``: ext4 on a virtual disk, 4 GiB
of 1 MiB appends with the worker's flush thread; six alternated pairs): the append p99.9 went
from 22.6 to 14.6 ms (medians), shorter in five pairs; the single longest append moved either
way (bench/RESULTS.md).  It changes no durability: only an fsync makes data durable, and
acknowledgements that wait for one still do.

Python's ``os`` has no ``sync_file_range``: libc's is called through ctypes (releasing the GIL).
Where there is none (not Linux), :func:`start_writeback` returns False and callers go on
without.
"""

from __future__ import annotations

import ctypes
import logging
import os
from typing import NamedTuple

logger = logging.getLogger(__name__)

SYNC_FILE_RANGE_WRITE = 2


def _sync_file_range() -> object | None:
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (AttributeError, OSError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_SYNC_FILE_RANGE = _sync_file_range()


def start_writeback(fd: int, offset: int, length: int) -> bool:
    """Start writing ``[offset, offset + length)`` of ``fd``'s file back to its disk, without
    waiting for it; False where the system has no such call.  OSError on failure (EBADF,
    EIO...)."""
    if _SYNC_FILE_RANGE is None:
        return False
    if _SYNC_FILE_RANGE(fd, offset, length, SYNC_FILE_RANGE_WRITE) != 0:  # type: ignore[operator]
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return True


class WritebackHint(NamedTuple):
    """Bytes of a segment file whose writeback is due (``PartitionLog.take_writeback``), through
    a duplicate of the file's fd that :meth:`run` closes."""

    fd: int
    offset: int
    length: int

    def run(self) -> None:
        """Start the writeback (any thread: the call releases the GIL), then close the fd.  A
        failure is only a hint lost: the kernel writes the bytes back later all the same."""
        try:
            start_writeback(self.fd, self.offset, self.length)
        except OSError as error:
            logger.debug("writeback of %d bytes at %d not started: %s", self.length,
                         self.offset, error)
        finally:
            os.close(self.fd)
