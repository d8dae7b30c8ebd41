"""``shmbroker dump-log``: print and verify segment files, like Kafka's kafka-dump-log.sh.

Walks every batch of a ``.log`` segment (or every segment of a partition directory): offsets,
sizes, timestamps, codec, CRC validity, and with ``print_data`` every record.  Verification
reports the first corrupt position; a batch with a bad CRC but a sane length is reported and
skipped so that the rest of the file is still shown.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from shmbroker.errors import CorruptRecordError
from shmbroker.format.record_batch import (
    HEADER_SIZE,
    compute_crc,
    decode_batch,
    read_header,
)


@dataclass
class DumpResult:
    batches: int = 0
    records: int = 0
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
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.suffix == ".log")
    return [path]


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


def dump_segment(path: Path, emit: Callable[[str], None], *, print_data: bool,
                 result: DumpResult) -> None:
    """Walk one segment file, emitting one line per batch (and per record with print_data)."""
    emit(f"Dumping {path}")
    for data in _mapped(path):
        _walk(data, emit, print_data=print_data, result=result)


def _walk(data: memoryview, emit: Callable[[str], None], *, print_data: bool,
          result: DumpResult) -> None:
    position = 0
    end = len(data)
    expected_offset: int | None = None
    while position < end:
        if end - position < HEADER_SIZE:
            message = f"truncated batch header: {end - position} bytes at the end of the file"
            emit(f"CORRUPT position: {position} {message}")
            result.note_error(position, message)
            return
        try:
            header = read_header(data, position)
        except CorruptRecordError as error:
            emit(f"CORRUPT position: {position} {error}")
            result.note_error(position, str(error))
            return  # without a sane length there is no next batch to find
        size = header.size
        if position + size > end:
            message = f"truncated batch: {end - position} of {size} bytes"
            emit(f"CORRUPT position: {position} {message}")
            result.note_error(position, message)
            return
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
        elif expected_offset is not None and header.base_offset < expected_offset:
            message = (f"offsets go backwards: batch base offset {header.base_offset} after "
                       f"next offset {expected_offset}")
            emit(f"CORRUPT position: {position} {message}")
            result.note_error(position, message)
        else:
            result.bytes_valid += size
        result.batches += 1
        result.records += header.records_count
        if crc_valid:  # a damaged header's offsets are not evidence of anything
            expected_offset = header.next_offset
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


def _show(value: bytes | None) -> str:
    if value is None:
        return "null"
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value.hex()
