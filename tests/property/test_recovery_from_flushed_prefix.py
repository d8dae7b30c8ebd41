"""Recovery after a crash resumes its scan at the recovery point inside the segment that holds
it (Segment._load_flushed_prefix) instead of at byte 0: the segments it opens must be exactly
what a scan of everything builds, whatever was appended, flushed, torn or damaged.

Each example appends batches of random sizes and timestamps (some offset- and time-index
entries, sometimes several segments), checkpoints the recovery point somewhere, appends more,
crashes (closes without flushing or trimming), maybe damages the unflushed tail or an index,
and then opens two copies of the directory: one with its recovery-point checkpoint (the
resumed scan) and one without (every segment scanned from byte 0).  Their segments' state,
index entries and log bytes must be equal."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from storage_helpers import make_batch

from shmbroker.config import LogConfig
from shmbroker.storage.partition_log import RECOVERY_POINT_CHECKPOINT, PartitionLog
from shmbroker.storage.segment import INDEX_SUFFIX, TIME_INDEX_SUFFIX

BATCH = st.builds(
    lambda count, size, start, step: make_batch(
        [b"v" * size] * count, timestamps=[start + step * index for index in range(count)]),
    count=st.integers(1, 5), size=st.integers(0, 200), start=st.integers(0, 100_000),
    step=st.integers(-3, 50))

DAMAGE = st.sampled_from(["none", "cut tail", "garbage tail", "flip tail byte",
                          "zero offset index", "zero time index", "drop offset index"])


def _state(log: PartitionLog) -> list[tuple]:
    """Everything recovery decides about each segment."""
    state = []
    for segment in log._segments:
        with open(segment.log_path, "rb") as file:
            data = file.read()
        state.append((
            segment.base_offset, segment.size_bytes, segment.next_offset,
            segment.max_timestamp_ms, segment.offset_of_max_timestamp,
            segment._bytes_since_index_entry, segment.damaged,
            segment.offset_index.keys.tolist(), segment.offset_index.values.tolist(),
            segment.time_index.keys.tolist(), segment.time_index.values.tolist(),
            data[: segment.size_bytes]))
    return state + [(log.log_start_offset, log.log_end_offset)]


def _damage(directory: Path, how: str, flushed_bytes: int, rng_byte: int) -> None:
    segments = sorted(directory.glob("*.log"))
    last = segments[-1]
    size = last.stat().st_size
    stem = str(last)[: -len(".log")]
    if how == "cut tail" and size > flushed_bytes:
        os.truncate(last, flushed_bytes + rng_byte % (size - flushed_bytes))
    elif how == "garbage tail":
        with open(last, "ab") as file:
            file.write(bytes([rng_byte]) * (1 + rng_byte % 90))
    elif how == "flip tail byte" and size > flushed_bytes:
        at = flushed_bytes + rng_byte % (size - flushed_bytes)
        with open(last, "r+b") as file:
            file.seek(at)
            byte = file.read(1)
            file.seek(at)
            file.write(bytes([byte[0] ^ 0x5A]))
    elif how in ("zero offset index", "zero time index"):
        path = stem + (INDEX_SUFFIX if how == "zero offset index" else TIME_INDEX_SUFFIX)
        with open(path, "r+b") as file:
            file.write(bytes(os.path.getsize(path)))
    elif how == "drop offset index":
        os.unlink(stem + INDEX_SUFFIX)


@pytest.mark.parametrize("segment_bytes", [1 << 30, 2500])
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(before=st.lists(BATCH, min_size=0, max_size=40),
       after=st.lists(BATCH, min_size=0, max_size=15),
       damage=DAMAGE, rng_byte=st.integers(0, 255))
def test_resumed_scan_builds_what_a_full_scan_builds(segment_bytes, before, after, damage,
                                                     rng_byte):
    root = Path(tempfile.mkdtemp(prefix="shmbroker-resume-"))
    try:
        config = LogConfig(segment_bytes=segment_bytes, index_interval_bytes=300)
        directory = root / "resumed"
        log = PartitionLog(directory, config)
        for batch in before:
            log.append(batch)
        log.flush()
        assert log._try_recovery_checkpoint()
        flushed_bytes = log._segments[-1].size_bytes
        for batch in after:
            log.append(batch)
        log.abandon()  # a crash: nothing trimmed, synced or checkpointed
        _damage(directory, damage, flushed_bytes, rng_byte)
        shutil.copytree(directory, root / "full")
        os.unlink(root / "full" / RECOVERY_POINT_CHECKPOINT)

        resumed = PartitionLog(directory, config)
        full = PartitionLog(root / "full", config)
        try:
            assert _state(resumed) == _state(full)
            if damage == "none":  # nothing was lost: every batch is back
                assert resumed.log_end_offset == sum(
                    int.from_bytes(batch[23:27], "big") + 1 for batch in before + after)
            report = resumed.recovery_report
            flushed_offset = sum(int.from_bytes(batch[23:27], "big") + 1 for batch in before)
            segment = full._segments[-1]
            if (damage == "none" and segment_bytes > 1 << 20
                    and segment.offset_index.lookup(flushed_offset - 1)[1] > 0
                    and segment.time_index.keys.any()):
                # one segment, with an offset-index entry naming a batch below the recovery
                # point: the scan began after that batch, not at byte 0 (unless the only time
                # entry is (0, 0), which reads as a preallocated file's zero tail)
                assert report.segments[-1].scanned_from > 0
        finally:
            resumed.abandon()
            full.abandon()
    finally:
        shutil.rmtree(root, ignore_errors=True)
