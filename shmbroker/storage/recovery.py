"""Opening a partition directory after a clean shutdown or a crash.

Which segments are scanned (CRC of every batch) and which are only checked cheaply:

- after a clean shutdown (the recovery-point checkpoint says ``clean_shutdown 1``), none are
  scanned;
- otherwise every segment that may hold offsets at or after the recovery point (the offset up to
  which the log was fsynced): the segment containing it and all later ones.  The one containing
  it is scanned from the batch after the one named by the last offset-index entry below the
  recovery point (its indexes are fsynced before each recovery-point checkpoint), not from byte
  0 as Kafka does: a worker that restarts after a crash then scans at most what was appended
  since the last checkpoint (RECOVERY_POINT_CHECKPOINT_INTERVAL_MS), however large its active
  segment is.  Damage inside that flushed prefix is found on read, as in sealed segments below
  the recovery point (below).

A cheap check loads a segment's indexes, checks their shape (size a multiple of the entry size,
keys strictly increasing, the last offset entry at a batch with the right base offset, inside the
file) and CRC-checks the batches after the last offset entry to find the segment's end.  A segment
failing it is scanned.  The scan keeps the longest prefix of whole, CRC-valid batches with
contiguous offsets.

What happens to the rest depends on where the segment is (the decision for damaged segments):

- **The last (active) segment** is cut after that prefix, as Kafka does: a torn write, garbage
  or a flipped byte there ends the log, and new appends continue from the recovered end.  The
  batches after a damaged one are lost with it (a single copy cannot do better; the report and
  the broker's log say where and how many bytes went).
- **A sealed segment** is never cut in a way that loses offsets, and later segments are never
  dropped for it: their records were acknowledged and are healthy, and dropping them would let
  new appends reuse their offsets (an acknowledged offset would then serve another record).
  Junk after the batches that reach the next segment's base offset (garbage appended) is cut.
  When the batches end (truncated) or break (a bad batch) below the next segment's base, the
  bytes are kept and the offsets ``[end of the valid batches, next base)`` become the segment's
  damaged range (``Segment.damaged``): reading them raises CorruptLogError naming the position,
  and the rest of the log is served.  A damaged sealed segment that is not scanned (below the
  recovery point, as Kafka) is found on read instead: the worker re-checks the offsets of every
  header it walks and the consumer checks each batch's CRC-32C.

Only an overlap (a segment starting below its predecessor's end, which no write produces) still
drops the later segments.
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
    scanned_from: int = 0  # where the scan began: after the flushed prefix of the active one
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
    damaged_ranges: list[tuple[int, int, int, int]] = dataclasses.field(default_factory=list)
    """(segment base offset, first offset, next offset, position) of each damaged range."""
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
                    or self.files_removed or self.damaged_ranges)

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
        for base, offset, next_offset, position in self.damaged_ranges:
            parts.append(f"segment {base}: offsets [{offset}, {next_offset}) damaged from "
                         f"position {position}: reported on read, never served")
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
    buffer = bytearray(0)  # the scans' read buffer, grown by Segment.recover as needed
    walk_records_from = (recovery_point_offset if config.record_validation == "records"
                         else None)
    for number, base in enumerate(log_bases):
        segment = Segment.open_existing(directory, base, config)
        previous = segments[-1] if segments else None
        if previous is not None and previous.next_offset != base:
            # An overlap (no write makes one; a damaged predecessor was marked to end exactly
            # here): keep the prefix, drop the rest.
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
            # The segment holding the recovery point is scanned from there on (its flushed
            # prefix is trusted as the segments below are); a segment whose cheap check failed
            # is scanned whole.
            trusted = recovery_point_offset if outcome.reason is None else None
            scan = segment.recover(buffer, is_last, next_base, flushed_offset=trusted,
                                   walk_records_from=walk_records_from)
            outcome.scanned_from = scan.scanned_from
            outcome.truncated_bytes = scan.truncated_bytes
            outcome.first_bad_position = scan.first_bad_position
            outcome.reason = scan.reason if scan.reason is not None else outcome.reason
            outcome.indexes_rebuilt = scan.indexes_rebuilt
        if next_base is not None and segment.next_offset < next_base:
            position = (outcome.first_bad_position if outcome.first_bad_position is not None
                        else segment.size_bytes)
            reason = outcome.reason or (f"the batches end at offset {segment.next_offset}, "
                                        f"below the next segment's base {next_base}")
            first_damaged = segment.next_offset
            segment.mark_damaged(next_base, position, reason)
            report.damaged_ranges.append((base, first_damaged, next_base, position))
        report.segments.append(outcome)
        segments.append(segment)
    # Empty trailing segments after the first one lost everything: drop them.
    while len(segments) > 1 and segments[-1].size_bytes == 0 and segments[-2].damaged is None:
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
