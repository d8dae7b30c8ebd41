"""The exception taxonomy of shmbroker.

Every error a caller can meet derives from :class:`ShmbrokerError`.  The split follows trio and h11:
errors about *bytes we were given* (a peer, a file on disk) are distinct from errors about *how the
library was called*, and both are distinct from assertions, which guard our own invariants and are
never caught.
"""

from __future__ import annotations


class ShmbrokerError(Exception):
    """Base class of every error shmbroker raises on purpose."""


class CorruptRecordError(ShmbrokerError):
    """Bytes that should hold Kafka RecordBatch v2 data do not.

    Raised for every defect of untrusted bytes: short buffers, wrong magic, CRC mismatch, lengths
    past the end, varint overflow, record counts that disagree with the bytes.  ``position`` is the
    byte position (in the buffer or file being read) of the batch at fault, when known.
    """

    def __init__(self, message: str, position: int | None = None) -> None:
        if position is not None:
            message = f"{message} (batch at position {position})"
        super().__init__(message)
        self.position = position


class UnsupportedCodecError(CorruptRecordError):
    """A batch uses a compression codec this build cannot encode or decode (snappy, for now)."""


class RecordTooLargeError(ShmbrokerError):
    """A batch or record exceeds a declared size limit."""


class InvalidConfigError(ShmbrokerError, ValueError):
    """A configuration value is unknown, of the wrong type or out of range."""


class OffsetOutOfRangeError(ShmbrokerError):
    """An offset lies outside [log_start_offset, log_end_offset]."""

    def __init__(self, offset: int, log_start_offset: int, log_end_offset: int) -> None:
        super().__init__(
            f"offset {offset} is out of range: the log holds offsets "
            f"[{log_start_offset}, {log_end_offset})"
        )
        self.offset = offset
        self.log_start_offset = log_start_offset
        self.log_end_offset = log_end_offset


class LogClosedError(ShmbrokerError):
    """The log (or segment) was closed by its owner and cannot be used any more."""


class StorageError(ShmbrokerError):
    """The file system failed us (ENOSPC, EIO, permissions); the log was left consistent."""
