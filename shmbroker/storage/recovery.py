"""Opening a partition directory after a clean shutdown or a crash.

Which segments are scanned (CRC of every batch) and which are only checked cheaply:

- after a clean shutdown (the recovery-point checkpoint says ``clean_shutdown 1``), none are
  scanned;
- otherwise every segment that may hold offsets at or after the recovery point (the offset up to
  which the log was fsynced): the segment containing it and all later ones.

A cheap check loads a segment's indexes, checks their shape (size a multiple of the entry size,
keys strictly increasing, the last offset entry at a batch with the right base offset, inside the
file) and CRC-checks the batches after the last offset entry to find the segment's end.  A segment
failing it is scanned.  The scan keeps the longest prefix of whole, CRC-valid batches with
contiguous offsets and truncates the rest; a segment whose base offset does not continue its
predecessor (a hole after a truncation) is deleted with every later one, so the log always stays
the longest valid prefix of what was written.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re

from shmbroker.config import LogConfig
from shmbroker.storage.checkpoint_file import TMP_SUFFIX
from shmbroker.storage.segment import (
    INDEX_SUFFIX,
    LOG_SUFFIX,
    SCAN_CHUNK_BYTES,
    TIME_INDEX_SUFFIX,
    Segment,
)

logger = logging.getLogger("shmbroker.storage")

_SEGMENT_FILE = re.compile(r"(\d{20})(\.log|\.index|\.timeindex)")


@dataclasses.dataclass
class SegmentRecovery:
    """What recovery did to one segment."""

    base_offset: int
    scanned: bool  # CRC-checked batch by batch (False: cheap check only)
    truncated_bytes: int = 0
    first_bad_position: int | None = None
    reason: str | None = None  # why the first bad batch was refused / why a cheap check failed
    indexes_rebuilt: tuple[str, ...] = ()


@dataclasses.dataclass
class RecoveryReport:
    """Everything opening a partition directory changed or noticed."""

    directory: str
    clean_shutdown: bool
    recovery_point_offset: int
    segments: list[SegmentRecovery] = dataclasses.field(default_factory=list)
    segments_deleted: list[int] = dataclasses.field(default_factory=list)
    files_removed: list[str] = dataclasses.field(default_factory=list)
    files_ignored: list[str] = dataclasses.field(default_factory=list)

    @property
    def segments_scanned(self) -> int:
        return sum(1 for segment in self.segments if segment.scanned)

    @property
    def bytes_truncated(self) -> int:
        return sum(segment.truncated_bytes for segment in self.segments)

    @property
    def indexes_rebuilt(self) -> list[str]:
        return [name for segment in self.segments for name in segment.indexes_rebuilt]

    @property
    def changed_anything(self) -> bool:
        return bool(self.bytes_truncated or self.indexes_rebuilt or self.segments_deleted
                    or self.files_removed)

    def summary(self) -> str:
        parts = [f"{self.directory}: {self.segments_scanned} of {len(self.segments)} segments "
                 f"scanned (recovery point {self.recovery_point_offset}, "
                 f"clean shutdown {self.clean_shutdown})"]
        for segment in self.segments:
            if segment.truncated_bytes or segment.reason:
                parts.append(f"segment {segment.base_offset}: {segment.reason} at position "
                             f"{segment.first_bad_position}; truncated "
                             f"{segment.truncated_bytes} bytes")
            if segment.indexes_rebuilt:
                parts.append(f"rebuilt {', '.join(segment.indexes_rebuilt)}")
        if self.segments_deleted:
            parts.append(f"deleted segments {self.segments_deleted}")
        if self.files_removed:
            parts.append(f"removed {self.files_removed}")
        if self.files_ignored:
            parts.append(f"ignored unknown files {self.files_ignored}")
        return "; ".join(parts)


def load_segments(
    directory: str,
    config: LogConfig,
    recovery_point_offset: int,
    clean_shutdown: bool,
    known_files: frozenset[str] = frozenset(),
) -> tuple[list[Segment], RecoveryReport]:
    """Open, check and repair the segments of ``directory``; the last one is left active."""
    report = RecoveryReport(directory, clean_shutdown, recovery_point_offset)
    log_bases: list[int] = []
    index_files: list[tuple[int, str]] = []
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        match = _SEGMENT_FILE.fullmatch(name)
        if name.endswith(TMP_SUFFIX):
            os.unlink(path)
            report.files_removed.append(name)
        elif match and match.group(2) == LOG_SUFFIX:
            log_bases.append(int(match.group(1)))
        elif match:
            index_files.append((int(match.group(1)), name))
        elif name not in known_files:
            report.files_ignored.append(name)
    bases = set(log_bases)
    for base, name in index_files:
        if base not in bases:  # an index without its log: derived data of nothing
            os.unlink(os.path.join(directory, name))
            report.files_removed.append(name)

    segments: list[Segment] = []
    buffer = bytearray(SCAN_CHUNK_BYTES) if not clean_shutdown else bytearray(0)
    for number, base in enumerate(log_bases):
        segment = Segment.open_existing(directory, base, config)
        previous = segments[-1] if segments else None
        if previous is not None and previous.next_offset != base:
            # A hole (the previous segment lost its tail): keep the prefix, drop the rest.
            segment.abandon()
            for later in log_bases[number:]:
                _delete_segment_files(directory, later)
                report.segments_deleted.append(later)
            break
        is_last = number == len(log_bases) - 1
        next_base = log_bases[number + 1] if not is_last else None
        needs_scan = not clean_shutdown and (next_base is None or next_base > recovery_point_offset)
        outcome = SegmentRecovery(base, scanned=needs_scan)
        if not needs_scan:
            problem = segment.load_clean(is_last)
            if problem is not None:
                logger.warning("segment %s of %s failed its check (%s); scanning it",
                               base, directory, problem)
                outcome.scanned = needs_scan = True
                outcome.reason = problem
        if needs_scan:
            if len(buffer) < SCAN_CHUNK_BYTES:
                buffer = bytearray(SCAN_CHUNK_BYTES)
            scan = segment.recover(buffer, is_last)
            outcome.truncated_bytes = scan.truncated_bytes
            outcome.first_bad_position = scan.first_bad_position
            outcome.reason = scan.reason if scan.reason is not None else outcome.reason
            outcome.indexes_rebuilt = scan.indexes_rebuilt
        report.segments.append(outcome)
        segments.append(segment)
    # Empty trailing segments after the first one lost everything: drop them.
    while len(segments) > 1 and segments[-1].size_bytes == 0:
        dropped = segments.pop()
        dropped.delete_files()
        report.segments_deleted.append(dropped.base_offset)
    if segments and not segments[-1].is_active:
        segments[-1].activate()
    if report.changed_anything or report.files_ignored:
        logger.warning("recovered %s", report.summary())
    else:
        logger.info("opened %s", report.summary())
    return segments, report


def _delete_segment_files(directory: str, base_offset: int) -> None:
    for suffix in (LOG_SUFFIX, INDEX_SUFFIX, TIME_INDEX_SUFFIX):
        try:
            os.unlink(os.path.join(directory, f"{base_offset:020d}{suffix}"))
        except FileNotFoundError:
            pass
