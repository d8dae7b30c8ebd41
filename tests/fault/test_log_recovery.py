"""Crash and corruption: the log reopens holding exactly the whole batches before the damage."""

import logging
import os
from pathlib import Path

import pytest
from storage_helpers import FakeClock, base_offset_of, segment_logs, sized_batch  # noqa: E402

from shmbroker.config import LogConfig  # noqa: E402
from shmbroker.errors import CorruptLogError  # noqa: E402
from shmbroker.format.record_batch import read_header  # noqa: E402
from shmbroker.storage.partition_log import PartitionLog  # noqa: E402

pytestmark = pytest.mark.fault

CONFIG = LogConfig(segment_bytes=4000, index_interval_bytes=200, segment_index_bytes=2048,
                   retention_ms=-1)


def _build(directory, batches=40):
    """A log of several segments, left as a crash leaves it; returns (offset, batch) pairs."""
    log = PartitionLog(directory, CONFIG, clock_ms=FakeClock())
    stored = []
    for number in range(batches):
        batch = sized_batch(1 + number % 3, 60 + number * 13 % 200, 1000 + number, tag=number)
        result = log.append(batch)
        stored.append((result.first_offset, result.first_offset.to_bytes(8, "big") + batch[8:]))
    log.abandon()
    return stored


def _reopen(directory):
    return PartitionLog(directory, CONFIG, clock_ms=FakeClock())


def _check_holds(log, stored):
    """The log holds exactly ``stored`` and every offset reads its batch."""
    end = 0
    for offset, batch in stored:
        assert log.read_bytes(offset, 1) == batch
    if stored:
        end = read_header(stored[-1][1]).next_offset
        last_offset = end - 1
        assert base_offset_of(log.read_bytes(last_offset, 1)) == stored[-1][0]
    assert log.log_end_offset == end
    log.append(sized_batch(1, 5))  # and appends go on after it
    assert base_offset_of(log.read_bytes(end, 1)) == end


def _active_segment_batches(directory, stored):
    active = segment_logs(directory)[-1]
    base = int(os.path.basename(active)[:20])
    return active, [(offset, batch) for offset, batch in stored if offset >= base]


def test_garbage_tail(tmp_path):
    stored = _build(tmp_path)
    active, _ = _active_segment_batches(tmp_path, stored)
    size = os.path.getsize(active)
    with open(active, "ab") as file:
        file.write(os.urandom(300))
    log = _reopen(tmp_path)
    report = log.recovery_report
    assert report.bytes_truncated == 300
    [segment] = [s for s in report.segments if s.truncated_bytes]
    assert segment.first_bad_position == size and segment.reason
    _check_holds(log, stored)
    log.close()


def test_flipped_byte_keeps_prefix(tmp_path):
    stored = _build(tmp_path)
    active, in_active = _active_segment_batches(tmp_path, stored)
    assert len(in_active) >= 4
    position = sum(len(batch) for _, batch in in_active[:2])
    flip_at = position + len(in_active[2][1]) // 2
    data = bytearray(Path(active).read_bytes())
    data[flip_at] ^= 0x40
    Path(active).write_bytes(data)
    log = _reopen(tmp_path)
    [segment] = [s for s in log.recovery_report.segments if s.truncated_bytes]
    assert segment.first_bad_position == position
    assert "CRC" in segment.reason
    assert segment.truncated_bytes == len(data) - position
    kept = stored[: stored.index(in_active[2])]
    _check_holds(log, kept)
    log.close()


def test_zero_filled_tail(tmp_path):
    stored = _build(tmp_path)
    active, _ = _active_segment_batches(tmp_path, stored)
    with open(active, "ab") as file:
        file.write(bytes(4096))  # what a preallocating file system leaves
    log = _reopen(tmp_path)
    assert log.recovery_report.bytes_truncated == 4096
    _check_holds(log, stored)
    log.close()


@pytest.mark.parametrize("which", ["active", "sealed"])
@pytest.mark.parametrize("suffix", [".index", ".timeindex"])
@pytest.mark.parametrize("damage", ["missing", "zeroed", "corrupt", "odd_size"])
def test_damaged_index_rebuilt(tmp_path, which, suffix, damage, caplog):
    stored = _build(tmp_path)
    log = _reopen(tmp_path)  # a clean close first, so sealed segments are only checked
    log.close()
    logs = segment_logs(tmp_path)
    assert len(logs) >= 3
    path = (logs[-1] if which == "active" else logs[1])[:-4] + suffix
    size = os.path.getsize(path)
    assert size > 0
    if damage == "missing":
        os.unlink(path)
    elif damage == "zeroed":
        Path(path).write_bytes(bytes(size))
    elif damage == "corrupt":
        data = bytearray(Path(path).read_bytes())
        data[-5] ^= 0x7F  # the last entry's position / offset
        data[-12] ^= 0x01
        Path(path).write_bytes(data)
    else:
        Path(path).write_bytes(Path(path).read_bytes()[:-3])
    with caplog.at_level(logging.WARNING, logger="shmbroker.storage"):
        log = _reopen(tmp_path)
    assert os.path.basename(path) in log.recovery_report.indexes_rebuilt
    assert log.recovery_report.bytes_truncated == 0
    assert any("rebuilt" in record.getMessage() for record in caplog.records)
    _check_holds(log, stored)
    log.close()
    log = _reopen(tmp_path)
    assert not log.recovery_report.changed_anything
    log.close()


def test_stray_files(tmp_path):
    stored = _build(tmp_path, batches=5)
    (tmp_path / "recovery-point-offset-checkpoint.tmp").write_text("junk")
    (tmp_path / "00000000000000099999.index").write_bytes(b"")  # index without a log
    (tmp_path / "notes.txt").write_text("keep me")
    (tmp_path / "123.log").write_text("not a segment name")
    log = _reopen(tmp_path)
    report = log.recovery_report
    assert set(report.files_removed) == {"recovery-point-offset-checkpoint.tmp",
                                         "00000000000000099999.index"}
    assert set(report.files_ignored) == {"notes.txt", "123.log"}
    assert (tmp_path / "notes.txt").exists() and (tmp_path / "123.log").exists()
    _check_holds(log, stored)
    log.close()


def test_crash_at_every_byte_of_the_last_append(tmp_path):
    base = tmp_path / "base"
    stored = _build(base, batches=12)
    last_offset, last_batch = stored[-1]
    active, _ = _active_segment_batches(base, stored)
    full = Path(active).read_bytes()
    start = len(full) - len(last_batch)
    for cut in range(start, len(full) + 1):
        directory = tmp_path / f"cut{cut}"
        directory.mkdir()
        for name in os.listdir(base):
            (directory / name).write_bytes((base / name).read_bytes())
        os.truncate(directory / os.path.basename(active), cut)
        log = _reopen(directory)
        expected = stored if cut == len(full) else stored[:-1]
        assert log.recovery_report.bytes_truncated == (cut - start if cut < len(full) else 0)
        _check_holds(log, expected)
        log.abandon()


def test_sealed_segment_losing_its_tail_keeps_later_segments(tmp_path):
    """A sealed segment that lost its tail (or broke) is not cut back into a hole that would
    drop the later segments (their records were acknowledged, and new appends would reuse
    their offsets): the lost offsets become a damaged range, reported on read."""
    stored = _build(tmp_path)
    logs = segment_logs(tmp_path)
    middle = logs[1]
    size = os.path.getsize(middle)
    os.truncate(middle, size - 10)  # a sealed segment loses its tail
    (tmp_path / "recovery-point-offset-checkpoint").unlink()  # scan everything
    log = _reopen(tmp_path)
    report = log.recovery_report
    assert report.segments_deleted == []
    second_base, third_base = (int(os.path.basename(p)[:20]) for p in logs[1:3])
    in_middle = [item for item in stored if second_base <= item[0] < third_base]
    last_offset, last_batch = in_middle[-1]
    assert report.damaged_ranges == [(second_base, last_offset, third_base,
                                      size - len(last_batch))]
    assert os.path.getsize(middle) == size - 10  # kept for dump-log, never served
    for offset in range(last_offset, third_base):
        with pytest.raises(CorruptLogError) as caught:
            log.read(offset, 1)
        assert (caught.value.offset, caught.value.next_offset) == (last_offset, third_base)
        assert caught.value.position == size - len(last_batch)
    kept = [item for item in stored if item != in_middle[-1]]
    for offset, batch in kept:
        assert log.read_bytes(offset, 1) == batch
    end = read_header(stored[-1][1]).next_offset
    assert log.log_end_offset == end
    log.append(sized_batch(1, 5))
    assert base_offset_of(log.read_bytes(end, 1)) == end
    log.close()
    log = _reopen(tmp_path)  # a clean reopen finds the same damage (the cheap check)
    assert log.recovery_report.damaged_ranges == report.damaged_ranges
    log.close()


def test_a_segment_overlapping_its_predecessor_is_dropped_with_those_after_it(tmp_path):
    """What a crash inside a truncation that restarts the log can leave: the old segment (its
    unlink not yet durable) and the new, empty one whose base lies inside the old one's
    offsets.  Recovery keeps the prefix that is in order and drops the overlapping segment."""
    stored = _build(tmp_path)
    logs = segment_logs(tmp_path)
    last_base = int(os.path.basename(logs[-1])[:20])
    inside = last_base + 1  # an offset the last segment holds
    assert any(offset > inside for offset, _ in stored)
    (tmp_path / f"{inside:020d}.log").write_bytes(b"")
    log = _reopen(tmp_path)
    assert log.recovery_report.segments_deleted == [inside]
    assert "deleted segments" in log.recovery_report.summary()
    assert not (tmp_path / f"{inside:020d}.log").exists()
    assert segment_logs(tmp_path) == logs
    _check_holds(log, stored)
    log.close()


@pytest.mark.parametrize("torn_tail", [False, True])
def test_batches_bigger_than_the_scan_buffer_are_read_whole(tmp_path, monkeypatch, torn_tail):
    """Recovery reads segments SCAN_CHUNK_BYTES at a time; a batch bigger than that is read
    into a buffer of its own.  Big and small batches alternate; with ``torn_tail`` the last
    big batch lost its end (a crash mid-write): the prefix before it is kept."""
    from shmbroker.storage import segment as segment_module

    config = LogConfig(segment_bytes=1 << 20, retention_ms=-1)
    log = PartitionLog(tmp_path, config, clock_ms=FakeClock())
    stored = []
    for number in range(9):
        batch = sized_batch(3, 2000 if number % 2 else 50, tag=number)  # ~6 KB or ~0.2 KB
        result = log.append(batch)
        stored.append((result.first_offset, result.first_offset.to_bytes(8, "big") + batch[8:]))
    log.abandon()
    (path,) = segment_logs(tmp_path)
    if torn_tail:
        big = sized_batch(3, 2000, tag=99)
        with open(path, "ab") as file:
            file.write(stored[-1][0].to_bytes(8, "big"))  # never mind the offset: it is torn
            file.write(big[8 : len(big) // 2])
    (tmp_path / "recovery-point-offset-checkpoint").unlink()  # scan it all
    monkeypatch.setattr(segment_module, "SCAN_CHUNK_BYTES", 4096)
    log = PartitionLog(tmp_path, config, clock_ms=FakeClock())
    assert log.recovery_report.segments[0].scanned
    assert log.recovery_report.bytes_truncated == (len(big) // 2 if torn_tail else 0)
    _check_holds(log, stored)
    log.close()


@pytest.mark.parametrize("where", ["before the damage", "inside the damage"])
def test_truncating_into_a_damaged_segment_drops_its_damage(tmp_path, where):
    """A sealed segment that lost its tail holds a damaged range; a truncation into that
    segment (what a mirror does) cuts the damaged bytes away with everything after the
    truncation point: the segment becomes the active one, readable to its new end, and
    appends go on from there, also after a reopen."""
    stored = _build(tmp_path)
    logs = segment_logs(tmp_path)
    middle = logs[1]
    os.truncate(middle, os.path.getsize(middle) - 10)
    (tmp_path / "recovery-point-offset-checkpoint").unlink()
    log = _reopen(tmp_path)
    ((_, damaged_from, _, _),) = log.recovery_report.damaged_ranges
    second_base = int(os.path.basename(middle)[:20])
    kept = [item for item in stored if item[0] < damaged_from]
    if where == "before the damage":
        kept = [item for item in kept if item[0] < kept[-1][0]]  # the last whole one goes too
        offset = read_header(kept[-1][1]).next_offset
        assert second_base < offset < damaged_from
    else:
        offset = damaged_from + 1
    assert log.truncate_to(offset) == read_header(kept[-1][1]).next_offset
    assert segment_logs(tmp_path) == logs[:2]
    _check_holds(log, kept)  # (appends one more batch)
    log.close()
    log = _reopen(tmp_path)
    assert log.recovery_report.damaged_ranges == []
    assert log.log_end_offset == read_header(kept[-1][1]).next_offset + 1
    for offset, batch in kept:
        assert log.read_bytes(offset, 1) == batch
    log.close()
