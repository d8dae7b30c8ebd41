"""``shmbroker dump-log``: print and verify segment files, like Kafka's kafka-dump-log.sh.

Walks every batch of a ``.log`` segment (or every segment of a partition directory): offsets,
sizes, timestamps, codec, CRC validity, and with ``print_data`` every record (without it, each
batch's chain of record lengths is still checked, as the broker checks it on append and in
recovery: a batch that lies about its record count under a recomputed CRC is corrupt too).
Verification reports the first corrupt position; a batch with a bad CRC but a sane length is
reported and skipped so that the rest of the file is still shown.

An offset index (``.index``) or time index (``.timeindex``) given by name is printed entry by
entry with absolute offsets, as kafka-dump-log prints them, and each entry is checked against the
``.log`` beside it: an offset entry must name the position of the batch that starts at its
offset, a time entry a batch (by its base offset, see ``Segment._index_batch``) whose largest
timestamp it holds; keys must grow.  A preallocated index's zero tail (an active segment's, or
one a crash left) is not printed.  Other files (checkpoints) are skipped with a line saying so,
as Kafka's tool does.  Indexes are derived data: a bad one loses nothing (the broker rebuilds it
when it opens the partition), but it is reported like a bad batch.

Offsets are checked as the broker reads them: a segment's first batch starts at the base offset in
its file name, each next batch where the previous one ended (base offsets are not covered by the
CRC, so a damaged one shows only this way), and the last one ends where the next segment of the
same directory begins (a segment that lost whole batches at its end).
"""

from __future__ import annotations

import errno
import mmap
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shmbroker.errors import CorruptRecordError
from shmbroker.format.record_batch import (
    HEADER_SIZE,
    compute_crc,
    decode_batch,
    read_header,
)
from shmbroker.storage.offset_index import OffsetIndex, SparseIndex
from shmbroker.storage.segment import CHECKED_CODECS, check_records
from shmbroker.storage.time_index import TimeIndex

LOG_SUFFIX = ".log"
INDEX_KINDS: dict[str, type[SparseIndex]] = {".index": OffsetIndex, ".timeindex": TimeIndex}


@dataclass
class DumpResult:
    batches: int = 0
    records: int = 0
    index_entries: int = 0
    bytes_valid: int = 0
    first_error_position: int | None = None
    first_error: str | None = None
    errors: int = 0

    def note_error(self, position: int, message: str) -> None:
        self.errors += 1
        if self.first_error_position is None:
            self.first_error_position = position
            self.first_error = message


def segment_paths(path: Path) -> list[Path]:
    """The files to dump for ``path``: a directory's segments, or the file itself."""
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.suffix == LOG_SUFFIX)
    return [path]


def dump_file(path: Path, emit: Callable[[str], None], *, print_data: bool,
              result: DumpResult) -> bool:
    """Dump a segment or an index by its name; False (and a line saying so) for any other
    file."""
    kind = INDEX_KINDS.get(path.suffix)
    if kind is not None:
        dump_index(path, kind, emit, result=result)
    elif path.suffix == LOG_SUFFIX:
        dump_segment(path, emit, print_data=print_data, result=result)
    else:
        emit(f"Ignoring unknown file {path} (not a .log, .index or .timeindex file)")
        return False
    return True


def _mapped(path: Path) -> Iterator[memoryview]:
    with open(path, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        if size == 0:
            yield memoryview(b"")
            return
        with mmap.mmap(file.fileno(), size, access=mmap.ACCESS_READ) as mapping:
            view = memoryview(mapping)
            try:
                yield view
            finally:
                view.release()


_SEGMENT_NAME = re.compile(r"(\d{20})\.(?:log|index|timeindex)")


def _base_offset(path: Path) -> int | None:
    match = _SEGMENT_NAME.fullmatch(path.name)
    return int(match.group(1)) if match else None


def _next_segment_base(path: Path) -> int | None:
    """The base offset of the segment after ``path`` in its directory, if there is one."""
    base = _base_offset(path)
    if base is None:
        return None
    later = [found for found in map(_base_offset, path.parent.glob("*.log"))
             if found is not None and found > base]
    return min(later, default=None)


def dump_segment(path: Path, emit: Callable[[str], None], *, print_data: bool,
                 result: DumpResult) -> None:
    """Walk one segment file, emitting one line per batch (and per record with print_data)."""
    emit(f"Dumping {path}")
    for data in _mapped(path):
        end_offset = _walk(data, emit, print_data=print_data, result=result,
                           expected_offset=_base_offset(path))
        next_base = _next_segment_base(path)
        if (end_offset is not None and next_base is not None and end_offset < next_base
                and not result.errors):
            message = (f"the batches end at offset {end_offset} but the next segment starts at "
                       f"{next_base}: offsets [{end_offset}, {next_base}) are missing")
            emit(f"CORRUPT position: {len(data)} {message}")
            result.note_error(len(data), message)


def _walk(data: memoryview, emit: Callable[[str], None], *, print_data: bool,
          result: DumpResult, expected_offset: int | None = None) -> int | None:
    """Emit every batch; return the offset after the last one (None after a fatal error)."""
    position = 0
    end = len(data)
    while position < end:
        if end - position < HEADER_SIZE:
            message = f"truncated batch header: {end - position} bytes at the end of the file"
            emit(f"CORRUPT position: {position} {message}")
            result.note_error(position, message)
            return None
        try:
            header = read_header(data, position)
        except CorruptRecordError as error:
            emit(f"CORRUPT position: {position} {error}")
            result.note_error(position, str(error))
            return None  # without a sane length there is no next batch to find
        size = header.size
        if position + size > end:
            message = f"truncated batch: {end - position} of {size} bytes"
            emit(f"CORRUPT position: {position} {message}")
            result.note_error(position, message)
            return None
        crc_valid = compute_crc(data, position, size) == header.crc
        timestamp_kind = "LogAppendTime" if header.is_log_append_time else "CreateTime"
        last_sequence = (header.base_sequence + header.last_offset_delta
                         if header.base_sequence >= 0 else -1)
        emit(
            f"baseOffset: {header.base_offset} lastOffset: {header.last_offset} "
            f"count: {header.records_count} baseSequence: {header.base_sequence} "
            f"lastSequence: {last_sequence} "
            f"producerId: {header.producer_id} producerEpoch: {header.producer_epoch} "
            f"partitionLeaderEpoch: {header.partition_leader_epoch} "
            f"isTransactional: {str(header.is_transactional).lower()} "
            f"isControl: {str(header.is_control).lower()} position: {position} "
            f"{timestamp_kind}: {header.max_timestamp} size: {size} magic: {header.magic} "
            f"compresscodec: {header.codec_name} crc: {header.crc} "
            f"isvalid: {str(crc_valid).lower()}"
        )
        if not crc_valid:
            result.note_error(position, f"CRC-32C mismatch in batch at offset {header.base_offset}")
        elif expected_offset is not None and header.base_offset != expected_offset:
            message = (f"batch base offset {header.base_offset} where {expected_offset} was "
                       "expected (offsets do not continue)")
            emit(f"CORRUPT position: {position} {message}")
            result.note_error(position, message)
        else:
            result.bytes_valid += size
        result.batches += 1
        result.records += header.records_count
        # a damaged header's offsets are not evidence of anything: the next batch sets them
        expected_offset = header.next_offset if crc_valid else None
        if crc_valid and not print_data and header.codec in CHECKED_CODECS:
            try:  # the record chain, as the broker checks it (a lying count with a fresh CRC)
                check_records(data, position, header)
            except CorruptRecordError as error:
                emit(f"CORRUPT position: {position} records: {error}")
                result.note_error(position, f"records: {error}")
        if print_data and crc_valid:
            try:
                for record in decode_batch(data, position, verify_crc=False):
                    emit(f"| offset: {record.offset} {timestamp_kind}: {record.timestamp_ms} "
                         f"keySize: {-1 if record.key is None else len(record.key)} "
                         f"valueSize: {-1 if record.value is None else len(record.value)} "
                         f"headerKeys: [{','.join(k for k, _ in record.headers)}] "
                         f"key: {_show(record.key)} payload: {_show(record.value)}")
            except CorruptRecordError as error:
                emit(f"CORRUPT position: {position} records: {error}")
                result.note_error(position, f"records: {error}")
        position += size
    return expected_offset


def dump_index(path: Path, kind: type[SparseIndex], emit: Callable[[str], None], *,
               result: DumpResult) -> None:
    """Print the entries of an offset or time index, checking each against the segment beside
    it (see the module docstring)."""
    emit(f"Dumping {path}")
    base = _base_offset(path)
    stored = kind(str(path), 0).read_file()  # as the broker reads it (a hole's zeros skipped)
    if stored is None:
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(path))
    keys, values, file_size = stored
    used = np.flatnonzero(keys | values)  # a preallocated zero tail is unused
    count = int(used[-1]) + 1 if len(used) else 0
    batches = _batches_beside(path) if base is not None else None  # (offsets unknown)
    # what an entry names in the log: the base offset of the batch at a position (offset
    # index), or the largest timestamp of the batch at a base offset (time index)
    in_log: dict[int, int] | None = None
    if batches is not None:
        in_log = ({position: first for position, first, _ in batches} if kind is OffsetIndex
                  else {first: largest for _, first, largest in batches})
    if base is None:
        emit(f"(no base offset in the name {path.name}: offsets are shown relative, and not "
             "checked against a log)")
    elif batches is None:
        emit(f"(no segment {path.with_suffix(LOG_SUFFIX).name} beside it: the entries are not "
             "checked against the log)")
    relative_base = base or 0
    previous: tuple[int, int] | None = None
    for number, (key, value) in enumerate(zip(keys[:count].tolist(), values[:count].tolist())):
        if kind is OffsetIndex:
            offset, position = relative_base + key, value
            emit(f"offset: {offset} position: {position}")
            grows = previous is None or (offset > previous[0] and position > previous[1])
            problem = None if grows else "offsets and positions must grow from entry to entry"
            previous = offset, position
            claim = ("position", position, "starts at offset", offset)
        else:
            timestamp, offset = key, relative_base + value
            emit(f"timestamp: {timestamp} offset: {offset}")
            grows = previous is None or (timestamp > previous[0] and offset >= previous[1])
            problem = (None if grows else
                       "timestamps must grow and offsets must not fall from entry to entry")
            previous = timestamp, offset
            claim = ("offset", offset, "has largest timestamp", timestamp)
        if problem is None and in_log is not None:
            problem = _log_disagrees(in_log, *claim)
        if problem is not None:
            emit(f"CORRUPT position: {number * kind.ENTRY_SIZE} {problem}")
            result.note_error(number * kind.ENTRY_SIZE, problem)
        result.index_entries += 1
    torn = file_size % kind.ENTRY_SIZE
    if torn:
        message = f"{torn} bytes after the last whole {kind.ENTRY_SIZE}-byte entry"
        emit(f"CORRUPT position: {file_size - torn} {message}")
        result.note_error(file_size - torn, message)


def _batches_beside(path: Path) -> list[tuple[int, int, int]] | None:
    """The batches of the segment beside an index: (position, base offset, largest timestamp)
    of each, as far as their headers are sane; None without a segment file."""
    log_path = path.with_suffix(LOG_SUFFIX)
    if not log_path.is_file():
        return None
    batches = []
    for data in _mapped(log_path):
        position = 0
        while len(data) - position >= HEADER_SIZE:
            try:
                header = read_header(data, position)
            except CorruptRecordError:
                break
            if position + header.size > len(data):
                break
            batches.append((position, header.base_offset, header.max_timestamp))
            position += header.size
    return batches


def _log_disagrees(in_log: dict[int, int], where: str, at: int, what: str,
                   expected: int) -> str | None:
    """Why the log does not bear an index entry out: it names the batch at ``where`` ``at``,
    of which ``what`` should be ``expected``."""
    found = in_log.get(at)
    if found is None:
        return f"no batch of the log starts at {where} {at}"
    if found != expected:
        return f"the batch at {where} {at} {what} {found}, not {expected}"
    return None


def _show(value: bytes | None) -> str:
    if value is None:
        return "null"
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value.hex()
