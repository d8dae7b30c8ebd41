"""Committed offsets of consumer groups: an append-only, compacted log in ``<data_dir>/groups/``.

The supervisor (single-threaded) owns it.  Commits are *staged* while a loop iteration runs and
made durable together by :meth:`OffsetLog.sync`: one write and one ``fdatasync`` for all of them
(group commit), after which they are visible and may be acknowledged.

Files in the directory::

    offsets.log       the log: a file header, then records, appended at the end
    offsets.log.tmp   scratch of a compaction (or of creation); removed on open

File header (16 bytes, big-endian)::

    position  bytes  field
    0         8      magic      b"SHMBOFFS"
    8         4      version    u32, 1
    12        4      crc        u32 CRC-32C of bytes [0, 12)

Record (big-endian; records follow one another with no padding)::

    position  bytes  field
    0         4      length     u32: bytes after this field, i.e. record size - 4
    4         4      crc        u32 CRC-32C of bytes [8, 4 + length): type to the record end
    8         1      type       u8: 1 commit, 2 group tombstone, 3 topic tombstone
    9         8      time_ms    i64: clock when staged (a commit keeps it through compactions)
    17        ...    body, by type:

    commit (1)                      group tombstone (2)       topic tombstone (3)
      u16 + utf-8  group id           u16 + utf-8  group id     u16 + utf-8  topic
      u16 + utf-8  topic
      i32          partition  (>= 0)
      i64          offset     (>= 0)
      i32          leader epoch (-1: none)
      i32 + utf-8  metadata   (length -1: null)

A record is valid when its length lies in ``[RECORD_BYTES_MIN - 4, record_bytes_max - 4]``, it
fits in the file, its CRC matches, its type is known, its fields fill it exactly, names are
non-empty valid UTF-8 and the numbers are in range.  Replaying the valid records in order gives
the state: a commit sets (group, topic, partition) -> (offset, metadata, leader epoch, time); a
group tombstone removes every entry of the group; a topic tombstone removes every entry of the
topic, in every group.

Recovery (on open): the longest prefix of valid records is kept; the rest of the file (a write
torn by a crash, or a damaged record and everything after it) is cut off and reported in
:attr:`OffsetLog.recovery_report`, never raised.  A damaged *file header* is raised as
:class:`StorageError` instead: that file is not a torn log, and starting empty would silently
lose every committed offset.

Compaction rewrites the live entries (no tombstones) sorted by (group, topic, partition) into
``offsets.log.tmp``, fsyncs it, renames it over ``offsets.log`` and fsyncs the directory: a crash
leaves the old log or the new one, both holding the same state.  It runs on open and after a
sync, when the log is at least ``compact_bytes_min`` and more than ``compact_ratio`` times the
size its live entries need; so each compaction drops more than ``compact_ratio - 1`` times the
bytes it writes.
"""

from __future__ import annotations

import dataclasses
import errno as errno_codes
import os
import struct
import time
from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple

from crc32c import crc32c

from shmbroker import limits
from shmbroker.errors import CorruptRecordError, LogClosedError, StorageError, storage_error
from shmbroker.format.names import safe_repr, validate_topic_name
from shmbroker.storage.checkpoint_file import fsync_directory

LOG_NAME = "offsets.log"
TMP_SUFFIX = ".tmp"
DIRECTORY_MODE = 0o750
FILE_MODE = 0o640

FILE_MAGIC = b"SHMBOFFS"
FILE_VERSION = 1
_FILE_HEADER = struct.Struct(">8sI")  # magic, version; then the crc
FILE_HEADER_BYTES = _FILE_HEADER.size + 4

RECORD_COMMIT = 1
RECORD_GROUP_TOMBSTONE = 2
RECORD_TOPIC_TOMBSTONE = 3

LENGTH_BYTES = 4
CRC_POSITION = 4
CRC_COVERED_FROM = 8  # type .. end
TYPE_POSITION = 8
TIME_POSITION = 9
BODY_POSITION = 17
_RECORD_HEADER = struct.Struct(">II")  # length, crc
_TYPE_TIME = struct.Struct(">Bq")
_NAME_LENGTH = struct.Struct(">H")
_COMMIT_FIELDS = struct.Struct(">iqii")  # partition, offset, leader epoch, metadata length
# the smallest record: a tombstone of a one-byte name
RECORD_BYTES_MIN = BODY_POSITION + _NAME_LENGTH.size + 1
COMMIT_FIXED_BYTES = BODY_POSITION + 2 * _NAME_LENGTH.size + _COMMIT_FIELDS.size

PARTITION_MAX = 2**31 - 1
OFFSET_MAX = 2**63 - 1
LEADER_EPOCH_NONE = -1
LEADER_EPOCH_MAX = 2**31 - 1
DEFAULT_COMPACT_RATIO = 2.0
_WRITE_CHUNK_BYTES = 1 * limits.MIB  # compaction writes the new file in chunks of about this
_COMMIT_TYPES = (tuple, list)
_NAME_CACHE_ENTRIES_MAX = 4096  # validated group ids and topics kept encoded (then cleared)

# A commit with the longest names (4 UTF-8 bytes a character for a group id) must fit a record.
assert (COMMIT_FIXED_BYTES + 4 * limits.group_id_chars_max + limits.topic_name_chars_max
        + limits.offset_metadata_bytes_max) <= limits.offset_log_record_bytes_max


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


class CommittedOffset(NamedTuple):
    """What the log stores for one (group, topic, partition)."""

    offset: int
    metadata: str | None
    leader_epoch: int
    commit_time_ms: int


# One record, decoded or staged: what replaying it does.  A plain tuple (it is made once per
# commit, and a NamedTuple costs ~0.4 us more to build):
#   (kind, group ("" for a topic tombstone), topic ("" for a group tombstone), partition (-1),
#    entry (commits only, else None), record_bytes)
_Op = tuple[int, str, str, int, CommittedOffset | None, int]


@dataclasses.dataclass
class OffsetLogRecovery:
    """What opening the log found and changed."""

    path: str
    created: bool = False
    tmp_removed: bool = False
    records_read: int = 0
    commits_read: int = 0
    tombstones_read: int = 0
    valid_bytes: int = 0
    truncated_bytes: int = 0
    first_bad_position: int | None = None
    reason: str | None = None  # why the record at first_bad_position was refused
    compacted_from_bytes: int | None = None  # the log's size before the compaction on open
    compaction_error: str | None = None


class OffsetLogStatistics(NamedTuple):
    size_bytes: int
    live_entries: int
    live_bytes: int
    groups: int
    staged_commits: int
    staged_bytes: int
    syncs: int
    commits_synced: int
    compactions: int
    last_compaction_error: str | None


def _file_header() -> bytes:
    head = _FILE_HEADER.pack(FILE_MAGIC, FILE_VERSION)
    return head + crc32c(head).to_bytes(4, "big")


def _name_field(name_bytes: bytes) -> bytes:
    return _NAME_LENGTH.pack(len(name_bytes)) + name_bytes


def _record(body: bytes) -> bytes:
    return _RECORD_HEADER.pack(len(body) + 4, crc32c(body)) + body


def commit_head(time_ms: int, group_field: bytes) -> bytes:
    """The start of a commit's covered bytes: type, time and the (length-prefixed) group id."""
    return _TYPE_TIME.pack(RECORD_COMMIT, time_ms) + group_field


def encode_commit(head: bytes, topic_field: bytes, partition: int, offset: int,
                  leader_epoch: int, metadata_bytes: bytes | None) -> bytes:
    """One commit record (see the module docstring); ``head`` from :func:`commit_head`."""
    if metadata_bytes is None:
        metadata_bytes, metadata_length = b"", -1
    else:
        metadata_length = len(metadata_bytes)
    body = b"".join((head, topic_field,
                     _COMMIT_FIELDS.pack(partition, offset, leader_epoch, metadata_length),
                     metadata_bytes))
    return _RECORD_HEADER.pack(len(body) + 4, crc32c(body)) + body


def encode_tombstone(kind: int, name: str, time_ms: int) -> bytes:
    return _record(_TYPE_TIME.pack(kind, time_ms) + _name_field(name.encode()))


def decode_record(data: bytes, position: int, size: int) -> _Op:
    """The record of ``size`` bytes at ``position`` of ``data`` (its length field already read
    and checked against the bounds); raises :class:`CorruptRecordError` when it is not valid."""
    end = position + size
    stored_crc = int.from_bytes(data[position + CRC_POSITION : position + CRC_COVERED_FROM], "big")
    computed_crc = crc32c(data[position + CRC_COVERED_FROM : end])
    if stored_crc != computed_crc:
        raise CorruptRecordError(
            f"crc mismatch: stored {stored_crc:#010x}, computed {computed_crc:#010x}", position)
    kind, time_ms = _TYPE_TIME.unpack_from(data, position + TYPE_POSITION)
    cursor = position + BODY_POSITION
    try:
        first, cursor = _decode_name(data, cursor, end)
        if kind == RECORD_GROUP_TOMBSTONE:
            op = (kind, first, "", -1, None, size)
        elif kind == RECORD_TOPIC_TOMBSTONE:
            op = (kind, "", first, -1, None, size)
        elif kind == RECORD_COMMIT:
            topic, cursor = _decode_name(data, cursor, end)
            if cursor + _COMMIT_FIELDS.size > end:
                raise ValueError("commit fields cut short")
            partition, offset, leader_epoch, metadata_length = _COMMIT_FIELDS.unpack_from(
                data, cursor)
            cursor += _COMMIT_FIELDS.size
            if partition < 0 or offset < 0 or leader_epoch < LEADER_EPOCH_NONE:
                raise ValueError(f"partition {partition}, offset {offset}, leader epoch "
                                 f"{leader_epoch} out of range")
            metadata = None
            if metadata_length >= 0:
                if cursor + metadata_length > end:
                    raise ValueError(f"metadata of {metadata_length} bytes does not fit")
                metadata = data[cursor : cursor + metadata_length].decode()
                cursor += metadata_length
            elif metadata_length != -1:
                raise ValueError(f"metadata length {metadata_length}")
            op = (kind, first, topic, partition,
                  CommittedOffset(offset, metadata, leader_epoch, time_ms), size)
        else:
            raise ValueError(f"unknown record type {kind}")
        if cursor != end:
            raise ValueError(f"fields end at {cursor - position} of {size} bytes")
    except (ValueError, struct.error) as error:  # UnicodeDecodeError is a ValueError
        raise CorruptRecordError(f"malformed record: {error}", position) from None
    return op


def _decode_name(data: bytes, cursor: int, end: int) -> tuple[str, int]:
    if cursor + _NAME_LENGTH.size > end:
        raise ValueError("name length cut short")
    (length,) = _NAME_LENGTH.unpack_from(data, cursor)
    cursor += _NAME_LENGTH.size
    if length == 0 or cursor + length > end:
        raise ValueError(f"name of {length} bytes")
    return data[cursor : cursor + length].decode(), cursor + length


def validate_group_id(group: object) -> str:
    """Return ``group`` if it is a valid group id (a str of 1 to group_id_chars_max characters,
    encodable as UTF-8); else raise ValueError."""
    rule = f"a group id is a str of 1 to {limits.group_id_chars_max} characters"
    if not isinstance(group, str):
        raise ValueError(f"invalid group id {safe_repr(group)}: its type is "
                         f"{type(group).__name__}; {rule}")
    if not 1 <= len(group) <= limits.group_id_chars_max:
        raise ValueError(f"invalid group id {safe_repr(group)}: it is {len(group)} characters "
                         f"long; {rule}")
    try:
        group.encode()
    except UnicodeEncodeError as error:
        raise ValueError(f"invalid group id {safe_repr(group)}: not encodable as UTF-8 "
                         f"({error.reason} at index {error.start})") from None
    return group


def _is_int(value: object) -> bool:
    return type(value) is int  # not bool, nor any other int subclass


class OffsetLog:
    """The committed offsets of every consumer group, durable in ``directory``.

    Invariants (between public calls):
    - the file holds ``size_bytes`` bytes: the header, then whole valid records only;
    - the in-memory state equals the replay of those records; staged records are in neither;
    - ``live_bytes`` is the sum of the encoded sizes of the live entries, and
      ``size_bytes >= FILE_HEADER_BYTES + live_bytes`` (equal right after a compaction);
    - a group appears in :meth:`groups` only while it has at least one entry.
    After a failure that could leave the file and memory disagreeing (a failed cut-back after a
    failed sync, or a failed directory fsync after a compaction's rename) the log refuses every
    further stage/sync with :class:`StorageError`; it must be reopened.  Not thread-safe.
    """

    def __init__(self, directory: str | os.PathLike[str], *,
                 compact_ratio: float = DEFAULT_COMPACT_RATIO,
                 compact_bytes_min: int = limits.offset_log_compact_bytes_min,
                 clock_ms: Callable[[], int] = wall_clock_ms) -> None:
        if not compact_ratio > 1.0:
            raise ValueError(f"compact_ratio is {compact_ratio!r}; it must be > 1")
        if not _is_int(compact_bytes_min) or compact_bytes_min < 0:
            raise ValueError(f"compact_bytes_min is {compact_bytes_min!r}; it must be an int >= 0")
        self.directory = os.fspath(directory)
        self.path = os.path.join(self.directory, LOG_NAME)
        self.tmp_path = self.path + TMP_SUFFIX
        self.compact_ratio = float(compact_ratio)
        self.compact_bytes_min = compact_bytes_min
        self._clock_ms = clock_ms
        self._groups: dict[str, dict[tuple[str, int], CommittedOffset]] = {}
        self._record_bytes: dict[tuple[str, str, int], int] = {}  # (group, topic, partition)
        self._live_bytes = 0
        self._size_bytes = 0
        self._group_fields: dict[str, bytes] = {}  # validated names -> length-prefixed UTF-8
        self._topic_fields: dict[str, bytes] = {}
        self._staged_records: list[bytes] = []
        self._staged_ops: list[_Op] = []
        self._staged_bytes = 0
        self._staged_commits = 0
        self._failed: str | None = None
        self._compact_retry_bytes = 0  # after a failed compaction: wait until the log is this big
        self._syncs = 0
        self._commits_synced = 0
        self._compactions = 0
        self._last_compaction_error: str | None = None
        self._fd = -1
        self.recovery_report = report = OffsetLogRecovery(self.path)
        try:
            if not os.path.isdir(self.directory):
                os.makedirs(self.directory, mode=DIRECTORY_MODE, exist_ok=True)
                fsync_directory(os.path.dirname(os.path.abspath(self.directory)))
            report.tmp_removed = self._remove_tmp()
            if not os.path.exists(self.path):
                os.close(self._write_replacement(iter(())))
                fsync_directory(self.directory)
                report.created = True
            self._fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as error:
            raise StorageError(f"cannot open the offset log in {self.directory}: "
                               f"{_describe(error)}") from error
        try:
            self._recover(report)
            if self._should_compact():
                report.compacted_from_bytes = self._size_bytes
                try:
                    self.compact()
                except StorageError as error:
                    report.compacted_from_bytes = None
                    report.compaction_error = str(error)
                    if self._failed is not None:
                        raise
        except BaseException:
            self.close()
            raise

    # -- state --------------------------------------------------------------------------------
    @property
    def size_bytes(self) -> int:
        """Bytes of the log file (all durable)."""
        return self._size_bytes

    @property
    def live_entries(self) -> int:
        return len(self._record_bytes)

    @property
    def live_bytes(self) -> int:
        """Bytes the live entries take as records (the log's size after a compaction, less the
        file header)."""
        return self._live_bytes

    @property
    def staged_commits(self) -> int:
        return self._staged_commits

    @property
    def staged_bytes(self) -> int:
        return self._staged_bytes

    @property
    def is_closed(self) -> bool:
        return self._fd < 0

    def groups(self) -> list[str]:
        """Groups with at least one committed offset, sorted."""
        return sorted(self._groups)

    def offsets(self, group: str) -> dict[tuple[str, int], tuple[int, str | None]]:
        """(topic, partition) -> (offset, metadata) of every committed offset of ``group``."""
        return {key: (entry.offset, entry.metadata)
                for key, entry in self._groups.get(group, {}).items()}

    def entries(self, group: str) -> dict[tuple[str, int], CommittedOffset]:
        """(topic, partition) -> everything stored, leader epoch and commit time included."""
        return dict(self._groups.get(group, {}))

    def committed(self, group: str, topic: str, partition: int) -> tuple[int, str | None] | None:
        entry = self._groups.get(group, {}).get((topic, partition))
        return None if entry is None else (entry.offset, entry.metadata)

    def statistics(self) -> OffsetLogStatistics:
        return OffsetLogStatistics(
            self._size_bytes, self.live_entries, self._live_bytes, len(self._groups),
            self._staged_commits, self._staged_bytes, self._syncs, self._commits_synced,
            self._compactions, self._last_compaction_error)

    # -- staging ------------------------------------------------------------------------------
    def stage(self, group: str, commits: Iterable[tuple[str, int, int, str | None]
                                                  | tuple[str, int, int, str | None, int]]) -> int:
        """Validate and encode ``commits`` of ``group``: (topic, partition, offset, metadata[,
        leader_epoch]).  They become durable and visible at the next :meth:`sync`.

        All or nothing: on a ValueError nothing of this call is staged.  Returns how many
        commits were staged.
        """
        if self._fd < 0 or self._failed is not None:
            self._check_usable()
        now_ms = self._clock_ms()
        group_field = self._group_fields.get(group) if type(group) is str else None
        if group_field is None:
            group_field = self._group_field(group)
        head = _TYPE_TIME.pack(RECORD_COMMIT, now_ms) + group_field  # commit_head, inlined
        records: list[bytes] = []
        ops: list[_Op] = []
        staged_bytes = self._staged_bytes
        for index, commit in enumerate(commits):
            # fast path: exact types and ranges; anything else gets _commit_error's diagnosis
            if type(commit) in _COMMIT_TYPES and len(commit) == 5:
                topic, partition, offset, metadata, leader_epoch = commit
            elif type(commit) in _COMMIT_TYPES and len(commit) == 4:
                topic, partition, offset, metadata = commit
                leader_epoch = LEADER_EPOCH_NONE
            else:
                raise self._commit_error(group, index, commit)
            topic_field = self._topic_fields.get(topic) if type(topic) is str else None
            if topic_field is None:
                topic_field = self._topic_field(topic)
            if (type(partition) is not int or not 0 <= partition <= PARTITION_MAX
                    or type(offset) is not int or not 0 <= offset <= OFFSET_MAX
                    or type(leader_epoch) is not int
                    or not LEADER_EPOCH_NONE <= leader_epoch <= LEADER_EPOCH_MAX):
                raise self._commit_error(group, index, commit)
            if metadata is None:  # the common case, encode_commit inlined
                body = b"".join((head, topic_field, _COMMIT_FIELDS.pack(
                    partition, offset, leader_epoch, -1)))
                record = _RECORD_HEADER.pack(len(body) + 4, crc32c(body)) + body
            else:
                # (a str longer than the byte limit is refused before it is encoded)
                if type(metadata) is not str or len(metadata) > limits.offset_metadata_bytes_max:
                    raise self._commit_error(group, index, commit)
                try:
                    metadata_bytes = metadata.encode()
                except UnicodeEncodeError:
                    raise self._commit_error(group, index, commit) from None
                if len(metadata_bytes) > limits.offset_metadata_bytes_max:
                    raise self._commit_error(group, index, commit)
                record = encode_commit(head, topic_field, partition, offset, leader_epoch,
                                       metadata_bytes)
            staged_bytes += len(record)
            if staged_bytes > limits.offset_log_staged_bytes_max:
                raise ValueError(
                    f"offset log {self.directory}: staging {index + 1} commits of group "
                    f"{group!r} would hold {staged_bytes} bytes unsynced, more than "
                    f"{limits.offset_log_staged_bytes_max}; sync() first")
            records.append(record)
            ops.append((RECORD_COMMIT, group, topic, partition,
                        CommittedOffset(offset, metadata, leader_epoch, now_ms), len(record)))
        self._staged_records += records
        self._staged_ops += ops
        self._staged_bytes = staged_bytes
        self._staged_commits += len(ops)
        return len(ops)

    def _group_field(self, group: str) -> bytes:
        """The validated, length-prefixed UTF-8 of ``group`` (cached)."""
        field = self._group_fields.get(group) if type(group) is str else None
        if field is None:
            field = _name_field(validate_group_id(group).encode())
            if len(self._group_fields) >= _NAME_CACHE_ENTRIES_MAX:
                self._group_fields.clear()
            self._group_fields[group] = field
        return field

    def _topic_field(self, topic: str) -> bytes:
        """The validated, length-prefixed UTF-8 of ``topic`` (cached)."""
        field = _name_field(validate_topic_name(topic).encode())
        if len(self._topic_fields) >= _NAME_CACHE_ENTRIES_MAX:
            self._topic_fields.clear()
        self._topic_fields[topic] = field
        return field

    def _commit_error(self, group: str, index: int, commit: object) -> ValueError:
        """What is wrong with a commit the fast path refused."""
        try:
            self._check_commit(group, index, commit)
        except ValueError as error:
            return error
        raise AssertionError(f"the fast path refused a valid commit {commit!r}")

    def _check_commit(self, group: str, index: int,
                      commit: object) -> tuple[str, int, int, str | None, int]:
        where = f"group {group!r}, commit {index}"
        if type(commit) not in _COMMIT_TYPES or len(commit) not in (4, 5):
            raise ValueError(f"{where}: {safe_repr(commit)} is not a tuple (topic, partition, "
                             "offset, metadata[, leader_epoch])")
        topic, partition, offset, metadata = commit[:4]
        leader_epoch = commit[4] if len(commit) == 5 else LEADER_EPOCH_NONE
        validate_topic_name(topic)
        if not _is_int(partition) or not 0 <= partition <= PARTITION_MAX:
            raise ValueError(f"{where}: partition {safe_repr(partition)} of topic {topic!r}; a "
                             f"partition is an int from 0 to {PARTITION_MAX}")
        if not _is_int(offset) or not 0 <= offset <= OFFSET_MAX:
            raise ValueError(f"{where}: offset {safe_repr(offset)} for {topic}-{partition}; an "
                             f"offset is an int from 0 to {OFFSET_MAX}")
        if metadata is not None:
            if type(metadata) is not str:
                raise ValueError(f"{where}: metadata for {topic}-{partition} is a "
                                 f"{type(metadata).__name__}, not a str or None")
            try:
                metadata_bytes = len(metadata.encode())
            except UnicodeEncodeError as error:
                raise ValueError(f"{where}: metadata for {topic}-{partition} is not encodable "
                                 f"as UTF-8 ({error.reason})") from None
            if metadata_bytes > limits.offset_metadata_bytes_max:
                raise ValueError(f"{where}: metadata for {topic}-{partition} is "
                                 f"{metadata_bytes} bytes of UTF-8, more than "
                                 f"{limits.offset_metadata_bytes_max}")
        if not _is_int(leader_epoch) or not LEADER_EPOCH_NONE <= leader_epoch <= LEADER_EPOCH_MAX:
            raise ValueError(f"{where}: leader epoch {safe_repr(leader_epoch)} for "
                             f"{topic}-{partition}; it is an int from -1 (none) to "
                             f"{LEADER_EPOCH_MAX}")
        return topic, partition, offset, metadata, leader_epoch

    def delete_group(self, group: str) -> None:
        """Stage a tombstone: at the next sync every offset of ``group`` goes."""
        self._check_usable()
        self._group_field(group)
        self._stage_tombstone(RECORD_GROUP_TOMBSTONE, group, "", group)

    def delete_topic(self, topic: str) -> None:
        """Stage a tombstone: at the next sync every group's offsets of ``topic`` go (applying
        it walks every live entry once)."""
        self._check_usable()
        if type(topic) is not str or topic not in self._topic_fields:
            self._topic_field(topic)
        self._stage_tombstone(RECORD_TOPIC_TOMBSTONE, "", topic, topic)

    def _stage_tombstone(self, kind: int, group: str, topic: str, name: str) -> None:
        record = encode_tombstone(kind, name, self._clock_ms())
        if self._staged_bytes + len(record) > limits.offset_log_staged_bytes_max:
            raise ValueError(f"offset log {self.directory}: {self._staged_bytes} bytes staged, "
                             f"the most is {limits.offset_log_staged_bytes_max}; sync() first")
        self._staged_records.append(record)
        self._staged_ops.append((kind, group, topic, -1, None, len(record)))
        self._staged_bytes += len(record)

    def discard_staged(self) -> int:
        """Drop everything staged (nothing of it was acknowledged); returns the commits dropped."""
        dropped = self._staged_commits
        self._staged_records = []
        self._staged_ops = []
        self._staged_bytes = 0
        self._staged_commits = 0
        return dropped

    # -- durability ---------------------------------------------------------------------------
    def sync(self) -> int:
        """Write everything staged with one write, fdatasync, then make it visible.

        Returns how many commits became durable (tombstones not counted, so a sync of
        tombstones only returns 0).  On an OSError
        (ENOSPC, EIO...) the file is cut back to its size before the write, the whole staged
        batch is dropped and :class:`StorageError` is raised: the caller fails those commits;
        the log stays usable.  May compact afterwards (a failed compaction is not raised: the
        commits are durable; see :meth:`statistics`).
        """
        self._check_usable()
        if not self._staged_ops:
            return 0
        data = b"".join(self._staged_records)
        ops, commits = self._staged_ops, self._staged_commits
        self.discard_staged()
        start = self._size_bytes
        try:
            view = memoryview(data)
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
            os.fdatasync(self._fd)
        except OSError as error:
            self._cut_back(start, error)
            raise storage_error(
                f"cannot store {commits} committed offsets ({len(data)} bytes) in "
                f"{self.directory}: {_describe(error)}; none of them was kept", error.errno
            ) from error
        self._size_bytes = start + len(data)
        for op in ops:
            self._apply(op)
        self._syncs += 1
        self._commits_synced += commits
        if self._should_compact():
            try:
                self.compact()
            except StorageError as error:  # the commits are durable in the old file
                self._last_compaction_error = str(error)
                self._compact_retry_bytes = self._size_bytes + max(self.compact_bytes_min, 1)
        return commits

    def _cut_back(self, size_bytes: int, cause: OSError) -> None:
        """Remove a failed write's bytes, so that the next write starts where they started.

        If the file cannot be cut, the log is failed: appending after stray bytes would hide
        every later record from recovery.  Syncing the cut is best effort: until the next sync
        succeeds, a crash may bring back whole records of the failed batch (never acknowledged,
        but commits their consumer asked for); the next sync overwrites them.
        """
        try:
            os.ftruncate(self._fd, size_bytes)
            os.lseek(self._fd, size_bytes, os.SEEK_SET)
        except OSError as error:
            self._failed = (f"a failed sync ({_describe(cause)}) could not be cut back from the "
                            f"file ({_describe(error)})")
            return
        try:
            os.fdatasync(self._fd)
        except OSError:
            pass

    def compact(self) -> None:
        """Rewrite the log as its live entries only: tmp -> fsync -> rename -> fsync(dir).

        Staged records stay staged.  Raises StorageError when it fails; before the rename the old
        log is kept and stays usable; after it (the directory fsync failed) the log is failed.
        """
        self._check_usable()
        fd = self._write_replacement(self._live_records())
        previous_fd, self._fd = self._fd, fd
        os.close(previous_fd)
        self._size_bytes = os.lseek(fd, 0, os.SEEK_END)
        assert self._size_bytes == FILE_HEADER_BYTES + self._live_bytes, (
            self._size_bytes, self._live_bytes)
        self._compactions += 1
        self._compact_retry_bytes = 0
        try:
            fsync_directory(self.directory)
        except OSError as error:
            self._failed = f"the compacted log's rename may not be durable ({_describe(error)})"
            raise StorageError(f"offset log {self.directory}: {self._failed}") from error

    def _live_records(self) -> Iterator[bytes]:
        for group in sorted(self._groups):
            group_field = _name_field(group.encode())
            entries = self._groups[group]
            topic_field, field_topic = b"", None
            for topic, partition in sorted(entries):
                entry = entries[topic, partition]
                if topic != field_topic:
                    topic_field, field_topic = _name_field(topic.encode()), topic
                metadata = None if entry.metadata is None else entry.metadata.encode()
                yield encode_commit(commit_head(entry.commit_time_ms, group_field), topic_field,
                                    partition, entry.offset, entry.leader_epoch, metadata)

    def _write_replacement(self, records: Iterator[bytes]) -> int:
        """A new log (header + ``records``) renamed over ``path``; returns its open fd (positioned
        at its end).  The directory is *not* fsynced.  Raises StorageError, leaving ``path``."""
        fd = -1
        try:
            fd = os.open(self.tmp_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
                         FILE_MODE)
            parts, part_bytes = [_file_header()], FILE_HEADER_BYTES
            for record in records:
                parts.append(record)
                part_bytes += len(record)
                if part_bytes >= _WRITE_CHUNK_BYTES:
                    _write_all(fd, b"".join(parts))
                    parts, part_bytes = [], 0
            _write_all(fd, b"".join(parts))
            os.fsync(fd)
            os.replace(self.tmp_path, self.path)
        except OSError as error:
            if fd >= 0:
                os.close(fd)
            self._remove_tmp()
            raise StorageError(f"cannot rewrite the offset log {self.path}: "
                               f"{_describe(error)}; the previous log is kept") from error
        return fd

    def _should_compact(self) -> bool:
        size = self._size_bytes
        return (size >= self.compact_bytes_min and size >= self._compact_retry_bytes
                and size > self.compact_ratio * (FILE_HEADER_BYTES + self._live_bytes))

    def _remove_tmp(self) -> bool:
        try:
            os.unlink(self.tmp_path)
        except FileNotFoundError:
            return False
        except OSError:
            return False  # not fatal: the next replacement truncates it
        return True

    # -- replay -------------------------------------------------------------------------------
    def _apply(self, op: _Op) -> None:
        kind, group, topic, partition, entry, record_bytes = op
        if kind == RECORD_COMMIT:
            assert entry is not None
            entries = self._groups.get(group)
            if entries is None:
                entries = self._groups[group] = {}
            entries[topic, partition] = entry
            key = (group, topic, partition)
            self._live_bytes += record_bytes - self._record_bytes.get(key, 0)
            self._record_bytes[key] = record_bytes
        elif kind == RECORD_GROUP_TOMBSTONE:
            for topic, partition in self._groups.pop(group, {}):
                self._live_bytes -= self._record_bytes.pop((group, topic, partition))
        else:
            assert kind == RECORD_TOPIC_TOMBSTONE, op
            for group in list(self._groups):
                entries = self._groups[group]
                for key in [key for key in entries if key[0] == topic]:
                    del entries[key]
                    self._live_bytes -= self._record_bytes.pop((group, *key))
                if not entries:
                    del self._groups[group]

    def _recover(self, report: OffsetLogRecovery) -> None:
        """Replay the longest valid prefix of records; cut the rest off the file."""
        try:
            file_size = os.fstat(self._fd).st_size
            self._check_file_header(file_size)
            position = FILE_HEADER_BYTES
            chunk, chunk_position = b"", position
            while position < file_size:
                relative = position - chunk_position
                if relative + LENGTH_BYTES > len(chunk):
                    chunk = _pread_all(self._fd, min(limits.recovery_read_bytes,
                                                     file_size - position), position)
                    chunk_position, relative = position, 0
                    if len(chunk) < LENGTH_BYTES:
                        report.reason = f"torn record: {len(chunk)} bytes, no length field"
                        break
                size = LENGTH_BYTES + int.from_bytes(chunk[relative : relative + 4], "big")
                if not RECORD_BYTES_MIN <= size <= limits.offset_log_record_bytes_max:
                    report.reason = (f"record size {size} outside [{RECORD_BYTES_MIN}, "
                                     f"{limits.offset_log_record_bytes_max}]")
                    break
                if position + size > file_size:
                    report.reason = f"torn record: {file_size - position} of {size} bytes"
                    break
                if relative + size > len(chunk):
                    chunk = _pread_all(self._fd, min(limits.recovery_read_bytes,
                                                     file_size - position), position)
                    chunk_position, relative = position, 0
                try:
                    op = decode_record(chunk, relative, size)
                except CorruptRecordError as error:
                    report.reason = error.reason
                    break
                self._apply(op)
                report.records_read += 1
                if op[0] == RECORD_COMMIT:
                    report.commits_read += 1
                else:
                    report.tombstones_read += 1
                position += size
            if report.reason is not None:
                report.first_bad_position = position
            report.valid_bytes = position
            report.truncated_bytes = file_size - position
            if report.truncated_bytes:
                os.ftruncate(self._fd, position)
                os.fsync(self._fd)
            os.lseek(self._fd, position, os.SEEK_SET)
        except OSError as error:
            raise StorageError(f"cannot recover the offset log {self.path}: "
                               f"{_describe(error)}") from error
        self._size_bytes = position

    def _check_file_header(self, file_size: int) -> None:
        header = _pread_all(self._fd, FILE_HEADER_BYTES, 0)
        problem = None
        if len(header) < FILE_HEADER_BYTES:
            problem = f"{file_size} bytes, shorter than the {FILE_HEADER_BYTES}-byte header"
        elif header != _file_header():
            magic, version = _FILE_HEADER.unpack_from(header)
            if magic != FILE_MAGIC:
                problem = f"magic {magic!r}, not {FILE_MAGIC!r}"
            elif crc32c(header[:12]) != int.from_bytes(header[12:], "big"):
                problem = "its file header fails its CRC"
            else:
                problem = f"format version {version}; this build reads {FILE_VERSION}"
        if problem is not None:
            raise StorageError(f"{self.path} is not an offset log this build can read: "
                               f"{problem}.  Move it away to start with no committed offsets")

    # -- life cycle ---------------------------------------------------------------------------
    def _check_usable(self) -> None:
        if self._fd < 0:
            raise LogClosedError(f"the offset log in {self.directory} is closed")
        if self._failed is not None:
            raise StorageError(f"offset log {self.directory} is unusable: {self._failed}; "
                               "reopen it")

    def close(self) -> None:
        """Close the file.  Staged commits are dropped (they were never acknowledged); reads
        keep answering from memory."""
        self.discard_staged()
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)


def _describe(error: OSError) -> str:
    """``ENOSPC (No space left on device)`` for an OSError with an errno."""
    if error.errno is None:
        return str(error)
    name = errno_codes.errorcode.get(error.errno, f"errno {error.errno}")
    return f"{name} ({error.strerror or os.strerror(error.errno)})"


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _pread_all(fd: int, size: int, position: int) -> bytes:
    """Up to ``size`` bytes at ``position`` (fewer only at the end of the file)."""
    parts = []
    while size > 0:
        part = os.pread(fd, size, position)
        if not part:
            break
        parts.append(part)
        position += len(part)
        size -= len(part)
    return parts[0] if len(parts) == 1 else b"".join(parts)
