"""The exception taxonomy of shmbroker.

Every error a caller can meet derives from :class:`ShmbrokerError`.  The split follows trio and h11:
errors about *bytes we were given* (a peer, a file on disk) are distinct from errors about *how the
library was called*, and both are distinct from assertions, which guard our own invariants and are
never caught.
"""

from __future__ import annotations

import errno


class ShmbrokerError(Exception):
    """Base class of every error shmbroker raises on purpose.

    ``code``, where a class has one, is what the error is called on the wire (see
    ``protocol.messages.error_body``); the receiving side raises the BrokerError subclass that
    declares the same code (``error_from_code``).
    """

    code: str | None = None


class CorruptRecordError(ShmbrokerError):
    """Bytes that should hold Kafka RecordBatch v2 data do not.

    Raised for every defect of untrusted bytes: short buffers, wrong magic, CRC mismatch, lengths
    past the end, varint overflow, record counts that disagree with the bytes.  ``position`` is the
    byte position (in the buffer or file being read) of the batch at fault, when known;
    ``reason`` the message without it (for errors that name the position their own way).
    """

    code = "CORRUPT_MESSAGE"  # received as CorruptBatchError

    def __init__(self, message: str, position: int | None = None) -> None:
        self.reason = message
        if position is not None:
            message = f"{message} (batch at position {position})"
        super().__init__(message)
        self.position = position


class UnsupportedCodecError(CorruptRecordError):
    """A batch uses a compression codec this build cannot encode or decode (snappy, for now)."""


class CorruptLogError(CorruptRecordError):
    """Stored batches of a partition are damaged: records ``[offset, next_offset)`` cannot be
    served (Kafka's CorruptRecordException on fetch, with the range it spoils).

    ``position`` is the byte position of the damaged batch in ``segment_base_offset``'s
    ``.log`` file (what ``shmbroker dump-log --verify`` names).  A consumer raises it with
    ``topic`` and ``partition`` set; ``seek(tp, error.next_offset)`` goes on after the damage.
    ``next_offset`` is where trustworthy data resumes; it may be past healthy records when the
    damage broke the chain of batch lengths (then up to the next index entry or segment).
    """

    def __init__(self, message: str, *, offset: int, next_offset: int,
                 position: int | None = None, segment_base_offset: int | None = None,
                 topic: str | None = None, partition: int | None = None) -> None:
        where = "" if topic is None else f"{topic}/{partition}: "
        segment = ("" if segment_base_offset is None
                   else f" in segment {segment_base_offset:020d}.log")
        at = "" if position is None else f" at position {position}"
        super().__init__(f"{where}damaged batch{segment}{at}: {message}; records [{offset}, "
                         f"{next_offset}) cannot be read (seek to {next_offset} to skip them)")
        self.position = position
        self.offset = offset
        self.next_offset = next_offset
        self.segment_base_offset = segment_base_offset
        self.topic = topic
        self.partition = partition
        self.reason = message


class RecordTooLargeError(ShmbrokerError):
    """A batch or record exceeds a declared size limit."""

    code = "MESSAGE_TOO_LARGE"  # received as BatchTooLargeError


class BrokerError(ShmbrokerError):
    """The broker reported an error for a request (the base of every coded error)."""

    code = "BROKER_ERROR"


class InvalidConfigError(BrokerError, ValueError):
    """A configuration value is unknown, of the wrong type or out of range."""

    code = "INVALID_CONFIG"


class OffsetOutOfRangeError(ShmbrokerError):
    """An offset lies outside [log_start_offset, log_end_offset]."""

    code = "OFFSET_OUT_OF_RANGE"  # received as OffsetOutOfRangeBrokerError

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

    code = "KAFKA_STORAGE_ERROR"  # received as BrokerStorageError


class StorageFullError(StorageError):
    """The file system has no space left (ENOSPC) or the user's quota is spent (EDQUOT).

    Nothing of the failed write was kept; the same call works again once space is freed, with
    no restart.  Build one with :func:`storage_error`."""

    code = "STORAGE_FULL"  # received as BrokerStorageFullError


FULL_ERRNOS = frozenset((errno.ENOSPC, errno.EDQUOT))


def storage_error(message: str, errno_number: int | None) -> StorageError:
    """:class:`StorageFullError` for a full disk or quota, else :class:`StorageError`."""
    if errno_number in FULL_ERRNOS:
        return StorageFullError(message)
    return StorageError(message)


# ------------------------------------------------------------------------------------------------
# Broker and client errors.  Each one that crosses a socket has a ``code``: the string carried in
# a response's ``error`` field (see shmbroker.protocol.messages), mapped back to the same class on
# the other side by :func:`error_from_code`.
# ------------------------------------------------------------------------------------------------

class ProtocolError(BrokerError):
    """The peer broke the framing or message rules (a malformed frame, a wrong JSON type)."""

    code = "INVALID_REQUEST"


class BrokerNotRunningError(BrokerError):
    """No broker answers on the data dir's socket."""

    code = "BROKER_NOT_RUNNING"


class AccessDeniedError(BrokerError, PermissionError):
    """This user may not use the broker's socket (its mode, socket_mode, leaves us out)."""

    code = "ACCESS_DENIED"


class BrokerAlreadyRunningError(BrokerError):
    """Another broker holds the data dir's lock."""

    code = "BROKER_ALREADY_RUNNING"


class UnknownTopicOrPartitionError(BrokerError):
    """The topic, or that partition of it, does not exist."""

    code = "UNKNOWN_TOPIC_OR_PARTITION"


class TopicExistsError(BrokerError):
    code = "TOPIC_ALREADY_EXISTS"


class InvalidTopicNameError(BrokerError, ValueError):
    code = "INVALID_TOPIC_NAME"


class InvalidPartitionsError(BrokerError, ValueError):
    code = "INVALID_PARTITIONS"


class PartitionOfflineError(BrokerError):
    """The partition's worker is not running (starting, restarting, or given up after boot
    failures)."""

    code = "PARTITION_OFFLINE"


class RequestTimeoutError(BrokerError, TimeoutError):
    """A request, an acknowledgement or a blocking call did not complete in time."""

    code = "REQUEST_TIMED_OUT"


class BufferFullError(RequestTimeoutError):
    """A producer's ring or buffer memory stayed full for max_block_ms."""

    code = "BUFFER_FULL"


class ClosedError(BrokerError):
    """The producer, consumer or admin client was closed by its owner."""

    code = "CLOSED"


class ShuttingDownError(BrokerError):
    """The broker or worker is stopping and takes no new requests."""

    code = "SHUTTING_DOWN"


class RingError(BrokerError):
    """A shared-memory ring is missing, of the wrong layout, or was marked broken."""

    code = "RING_ERROR"


class CorruptBatchError(BrokerError):
    """The broker refused a produced batch as corrupt (bad CRC, magic, sizes or counts)."""

    code = "CORRUPT_MESSAGE"


class BatchTooLargeError(BrokerError, RecordTooLargeError):
    """The broker refused a produced batch larger than the topic's max_batch_bytes."""

    code = "MESSAGE_TOO_LARGE"


class BrokerStorageError(BrokerError):
    """The broker could not store a batch (disk full, I/O error); nothing was written."""

    code = "KAFKA_STORAGE_ERROR"


class BrokerStorageFullError(BrokerStorageError):
    """The broker's disk is full (or its quota spent): nothing of the request was stored, and
    the same request succeeds once space is freed (no restart needed)."""

    code = "STORAGE_FULL"


class OffsetOutOfRangeBrokerError(BrokerError, OffsetOutOfRangeError):
    """A fetch or list-offsets request named an offset outside the partition's log."""

    code = "OFFSET_OUT_OF_RANGE"

    def __init__(self, offset: int, log_start_offset: int, log_end_offset: int) -> None:
        OffsetOutOfRangeError.__init__(self, offset, log_start_offset, log_end_offset)


class NoOffsetForPartitionError(BrokerError):
    """A consumer has no position and no reset policy for a partition."""

    code = "NO_OFFSET_FOR_PARTITION"


def _coded_classes() -> dict[str, type[BrokerError]]:
    found: dict[str, type[BrokerError]] = {}
    pending: list[type[BrokerError]] = [BrokerError]
    while pending:
        cls = pending.pop()
        found.setdefault(cls.code, cls)
        pending.extend(cls.__subclasses__())
    return found


def error_from_code(code: str, message: str, **fields: int) -> BrokerError:
    """The exception for an ``error`` code received from a peer (unknown codes -> BrokerError)."""
    cls = _coded_classes().get(code, BrokerError)
    if cls is OffsetOutOfRangeBrokerError:
        return OffsetOutOfRangeBrokerError(fields.get("offset", -1),
                                           fields.get("log_start_offset", -1),
                                           fields.get("log_end_offset", -1))
    error = cls(message)
    return error


# ------------------------------------------------------------------------------------------------
# Consumer groups and committed offsets (shmbroker.coordinator).  Kafka's error names where Kafka
# has one (the KIP-848 ones for the heartbeat protocol; ILLEGAL_GENERATION, REBALANCE_IN_PROGRESS
# and FENCED_INSTANCE_ID serve the classic JoinGroup/SyncGroup adapter).
# ------------------------------------------------------------------------------------------------

class InvalidGroupIdError(BrokerError, ValueError):
    """A group id is empty, too long or not a string."""

    code = "INVALID_GROUP_ID"


class GroupIdNotFoundError(BrokerError):
    """No group of that id exists (describe, delete, heartbeat to a group never joined)."""

    code = "GROUP_ID_NOT_FOUND"


class NonEmptyGroupError(BrokerError):
    """The operation needs a group without members (delete, offset reset, member-less commit)."""

    code = "NON_EMPTY_GROUP"


class GroupMaxSizeReachedError(BrokerError):
    """The group already has ``limits.members_per_group_max`` members."""

    code = "GROUP_MAX_SIZE_REACHED"


class UnknownMemberIdError(BrokerError):
    """The member id is not (or no longer) in the group: it left or was removed after its session
    timed out.  The client drops its partitions and joins again without a member id."""

    code = "UNKNOWN_MEMBER_ID"


class FencedMemberEpochError(BrokerError):
    """A heartbeat carried a member epoch the coordinator did not give (a zombie, or a member that
    missed more than one response).  The client drops all its partitions and joins again with its
    member id (KIP-848)."""

    code = "FENCED_MEMBER_EPOCH"


class StaleMemberEpochError(BrokerError):
    """A commit carried an older member epoch than the member's current or previous one; the
    client retries with the epoch of its latest heartbeat response (KIP-848)."""

    code = "STALE_MEMBER_EPOCH"


class PartitionNotOwnedError(BrokerError):
    """A group member committed offsets of partitions the coordinator does not assign to it now
    (revoked, never granted, or still owned by another member).  Kafka's clients report this as
    CommitFailedException; the commit is refused so a zombie cannot rewind another's progress."""

    code = "PARTITION_NOT_OWNED"


class UnreleasedInstanceIdError(BrokerError):
    """A member joined with a ``group_instance_id`` that a live member of the group still uses; it
    is released when that member leaves, its connection closes or its session times out."""

    code = "UNRELEASED_INSTANCE_ID"


class FencedInstanceIdError(BrokerError):
    """Another member joined with the same ``group_instance_id`` and took over (classic
    protocol), or a join named a member id that does not go with its instance id."""

    code = "FENCED_INSTANCE_ID"


class IllegalGenerationError(BrokerError):
    """A classic-protocol request carried a generation id other than the group's current one."""

    code = "ILLEGAL_GENERATION"


class RebalanceInProgressError(BrokerError):
    """A classic-protocol group is rebalancing; the member must rejoin (JoinGroup)."""

    code = "REBALANCE_IN_PROGRESS"


class UnsupportedAssignorError(BrokerError, ValueError):
    """A member asked for a partition assignor the coordinator does not have."""

    code = "UNSUPPORTED_ASSIGNOR"


class InvalidRegularExpressionError(BrokerError, ValueError):
    """A subscription pattern is not a valid regular expression, or too long."""

    code = "INVALID_REGULAR_EXPRESSION"


class InvalidSessionTimeoutError(BrokerError, ValueError):
    """A session or rebalance timeout lies outside the limits the coordinator accepts."""

    code = "INVALID_SESSION_TIMEOUT"


class InvalidCommitOffsetSizeError(BrokerError, ValueError):
    """An offset commit names more partitions than ``limits.commit_partitions_max``."""

    code = "INVALID_COMMIT_OFFSET_SIZE"


class OffsetMetadataTooLargeError(BrokerError, ValueError):
    """A committed offset's metadata string is longer than ``limits.offset_metadata_bytes_max``
    (UTF-8 bytes)."""

    code = "OFFSET_METADATA_TOO_LARGE"


class InvalidCommitOffsetError(BrokerError, ValueError):
    """A committed offset is not a valid position (negative)."""

    code = "INVALID_COMMIT_OFFSET"
