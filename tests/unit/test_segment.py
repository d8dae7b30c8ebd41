import errno
import os
import tempfile
from pathlib import Path

import pytest
from storage_helpers import sized_batch, with_base_offset  # noqa: E402

from shmbroker.config import LogConfig  # noqa: E402
from shmbroker.format.record_batch import read_header  # noqa: E402
from shmbroker.storage import segment as segment_module  # noqa: E402
from shmbroker.storage.segment import BatchSpan, Segment  # noqa: E402

CONFIG = LogConfig(index_interval_bytes=300, segment_index_bytes=4096)


def _fill(segment, count, base_offset=100):
    """Append ``count`` batches of 1..3 records one by one; return (offset, bytes) pairs."""
    stored = []
    next_offset = base_offset
    for number in range(count):
        batch = with_base_offset(sized_batch(1 + number % 3, 40 + number * 7 % 90,
                                             1000 + number, tag=number), next_offset)
        header = read_header(batch)
        span = BatchSpan(0, next_offset, header.size, header.last_offset_delta,
                         header.max_timestamp)
        segment.append(memoryview(batch), [span], now_ms=5)
        stored.append((next_offset, batch))
        next_offset = header.next_offset
    return stored


def test_append_read_and_indexes(tmp_path):
    segment = Segment.create(str(tmp_path), 100, CONFIG)
    assert os.path.basename(segment.log_path) == "00000000000000000100.log"
    stored = _fill(segment, 40)
    assert segment.next_offset == read_header(stored[-1][1]).next_offset
    assert segment.size_bytes == sum(len(batch) for _, batch in stored)
    assert segment.offset_index.entries_count > 5
    positions = {}
    position = 0
    for offset, batch in stored:
        positions[offset] = position
        position += len(batch)
    # every index entry points at a batch start with the right offset
    for relative, index_position in zip(segment.offset_index.keys, segment.offset_index.values,
                                        strict=True):
        assert positions[100 + int(relative)] == int(index_position)
    for offset, batch in stored:
        header = read_header(batch)
        for wanted in range(offset, header.next_offset):
            span = segment.find_batch(wanted)
            assert (span.position, span.base_offset) == (positions[offset], offset)
    assert segment.find_batch(99) is None and segment.find_batch(segment.next_offset) is None


def test_read_range_whole_batches_capped(tmp_path):
    segment = Segment.create(str(tmp_path), 0, CONFIG)
    stored = _fill(segment, 30, base_offset=0)
    sizes = [len(batch) for _, batch in stored]
    # at least one batch even when max_bytes is tiny
    assert segment.read_range(0, 1)[:2] == (0, sizes[0])
    # exactly the whole batches that fit
    for cap in (sizes[0] + sizes[1], sizes[0] + sizes[1] + sizes[2] - 1, 1000, 5000):
        position, size, first, next_offset = segment.read_range(0, cap)
        total = 0
        included = 0
        for batch_size in sizes:
            if total + batch_size > cap:
                break
            total += batch_size
            included += 1
        assert (position, size, first.base_offset) == (0, max(total, sizes[0]), 0)
        assert next_offset == stored[max(included, 1)][0]
    # from the middle, to the end of the segment
    offset, _ = stored[10]
    position, size, _, next_offset = segment.read_range(offset, 10**9)
    assert position == sum(sizes[:10]) and position + size == segment.size_bytes
    assert next_offset == segment.next_offset


def test_seal_adds_last_time_entry_and_trims(tmp_path):
    segment = Segment.create(str(tmp_path), 0, CONFIG)
    _fill(segment, 20, base_offset=0)
    assert os.path.getsize(segment.offset_index.path) == 4096
    segment.seal()
    assert not segment.is_active
    assert segment.time_index.last_entry()[0] == segment.max_timestamp_ms
    assert os.path.getsize(segment.offset_index.path) == segment.offset_index.entries_count * 8
    assert os.path.getsize(segment.time_index.path) == segment.time_index.entries_count * 12
    segment.close()


def test_recover_rebuilds_identical_indexes(tmp_path):
    segment = Segment.create(str(tmp_path), 0, CONFIG)
    _fill(segment, 50, base_offset=0)
    segment.close()
    index_bytes = Path(segment.offset_index.path).read_bytes()
    time_bytes = Path(segment.time_index.path).read_bytes()
    os.unlink(segment.offset_index.path)
    os.unlink(segment.time_index.path)
    reopened = Segment.open_existing(str(tmp_path), 0, CONFIG)
    scan = reopened.recover(bytearray(1024), is_last=True)  # small buffer: many refills
    assert scan.reason is None and scan.truncated_bytes == 0
    assert set(scan.indexes_rebuilt) == {"00000000000000000000.index",
                                         "00000000000000000000.timeindex"}
    reopened.close()
    assert Path(segment.offset_index.path).read_bytes() == index_bytes
    assert Path(segment.time_index.path).read_bytes() == time_bytes


def test_truncate_to_offset(tmp_path):
    segment = Segment.create(str(tmp_path), 0, CONFIG)
    stored = _fill(segment, 30, base_offset=0)
    offset, batch = stored[12]
    removed = segment.truncate_to_offset(offset + read_header(batch).last_offset_delta)
    assert segment.next_offset == offset
    assert removed == sum(len(b) for _, b in stored[12:])
    assert segment.file_size_bytes == segment.size_bytes
    assert all(int(p) < segment.size_bytes for p in segment.offset_index.values)
    assert segment.max_timestamp_ms == max(read_header(b).max_timestamp for _, b in stored[:12])
    _fill(segment, 5, base_offset=offset)  # appends continue
    segment.close()


def test_write_error_cuts_back(tmp_path, monkeypatch):
    segment = Segment.create(str(tmp_path), 0, CONFIG)
    _fill(segment, 3, base_offset=0)
    size = segment.size_bytes
    real_write = os.write

    def failing_write(fd, data):
        real_write(fd, bytes(data)[:10])  # a partial write, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(segment_module.os, "write", failing_write)
    with pytest.raises(OSError):
        _fill(segment, 1, base_offset=segment.next_offset)
    monkeypatch.undo()
    assert segment.size_bytes == size == segment.file_size_bytes
    _fill(segment, 2, base_offset=segment.next_offset)
    assert segment.file_size_bytes == segment.size_bytes


def _walked(segment, offset):
    """find_batch the long way (index lookup and header walk), the recent batches bypassed."""
    recent = segment._recent
    segment._recent = type(recent)(maxlen=recent.maxlen)
    try:
        return segment.find_batch(offset)
    finally:
        segment._recent = recent


def test_find_batch_of_the_last_batches_agrees_with_the_walk(tmp_path, monkeypatch):
    """The last batches appended are found without a walk (the recent ones); after a
    truncation, a failed append or an append of batches of other sizes it is the batch on disk
    that counts: every answer equals the walk's, and the kept ones serve where they still end
    the log."""
    segment = Segment.create(str(tmp_path), 0, CONFIG)
    stored = _fill(segment, 20, base_offset=0)

    def check_all():
        for offset in range(segment.next_offset + 1):
            assert segment.find_batch(offset) == _walked(segment, offset), offset

    check_all()
    last_offset, last_batch = stored[-1]
    walks = []
    real_iter = segment.iter_batches
    monkeypatch.setattr(segment, "iter_batches",
                        lambda *args: walks.append(args) or real_iter(*args))
    span = segment.find_batch(read_header(last_batch).next_offset - 1)
    assert walks == [] and span.base_offset == last_offset
    assert span.end_position == segment.size_bytes
    assert segment.find_batch(stored[-5][0]).base_offset == stored[-5][0] and walks == []
    monkeypatch.undo()
    # truncate into the middle, then append batches with other sizes at the same offsets
    offset, batch = stored[12]
    segment.truncate_to_offset(offset)
    assert not segment._recent
    check_all()
    stored[12:] = _fill(segment, 6, base_offset=offset)
    check_all()
    # a failed append leaves the old tail as the answer
    real_write = os.write
    monkeypatch.setattr(segment_module.os, "write",
                        lambda fd, data: (_ for _ in ()).throw(OSError(errno.EIO, "EIO")))
    with pytest.raises(OSError):
        _fill(segment, 1, base_offset=segment.next_offset)
    monkeypatch.setattr(segment_module.os, "write", real_write)
    check_all()
    # appends undone (a later step of the same PartitionLog append failed)
    state = segment.snapshot()
    _fill(segment, 2, base_offset=segment.next_offset)
    segment.restore(state)
    assert not segment._recent
    check_all()
    _fill(segment, 1, base_offset=segment.next_offset)
    check_all()
    segment.close()


# -- space reserved ahead of appends (segment_preallocate_bytes) ---------------------------------

RESERVE_CONFIG = LogConfig(segment_bytes=64 * 1024 * 1024, segment_preallocate_bytes=1 << 20,
                           index_interval_bytes=300, segment_index_bytes=4096)


def _allocated_bytes(path):
    return os.stat(path).st_blocks * 512


def _reserving_file_system(directory):
    probe = os.path.join(directory, "probe")
    fd = os.open(probe, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        segment_module.reserve(fd, 0, 1 << 20)
        return _allocated_bytes(probe) >= 1 << 20
    except OSError:
        return False
    finally:
        os.close(fd)
        os.unlink(probe)


def test_appends_reserve_space_ahead_and_sealing_gives_it_back(tmp_path):
    if not _reserving_file_system(str(tmp_path)):
        pytest.skip("this file system cannot reserve space (fallocate KEEP_SIZE)")
    segment = Segment.create(str(tmp_path), 100, RESERVE_CONFIG)
    stored = _fill(segment, 10)
    size = sum(len(batch) for _, batch in stored)
    assert os.path.getsize(segment.log_path) == segment.size_bytes == size  # size: the data's
    assert _allocated_bytes(segment.log_path) >= size + (1 << 20)  # and a step past it
    segment.seal()
    assert _allocated_bytes(segment.log_path) < size + (1 << 20)  # given back
    segment.close()
    with open(segment.log_path, "rb") as file:
        assert file.read() == b"".join(batch for _, batch in stored)


def test_a_crash_with_space_reserved_loses_nothing_and_reopens_clean(tmp_path):
    segment = Segment.create(str(tmp_path), 100, RESERVE_CONFIG)
    stored = _fill(segment, 12)
    segment.abandon()  # reserved blocks past the data stay allocated, the size is the data's
    reopened = Segment.open_existing(str(tmp_path), 100, RESERVE_CONFIG)
    scan = reopened.recover(bytearray(), is_last=True)
    assert scan.truncated_bytes == 0 and scan.first_bad_position is None
    assert reopened.next_offset == read_header(stored[-1][1]).next_offset
    more = _fill(reopened, 3, base_offset=reopened.next_offset)  # appends go on after it
    assert reopened.size_bytes == sum(len(batch) for _, batch in stored + more)
    reopened.close()
    assert os.path.getsize(reopened.log_path) == reopened.size_bytes


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EOPNOTSUPP])
def test_a_reservation_that_fails_costs_only_the_speedup(tmp_path, monkeypatch, code):
    calls = []

    def failing(fd, offset, length):
        calls.append(length)
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(segment_module, "reserve", failing)
    config = LogConfig(segment_bytes=64 * 1024 * 1024, segment_preallocate_bytes=2048,
                       index_interval_bytes=300, segment_index_bytes=4096)
    segment = Segment.create(str(tmp_path), 100, config)
    stored = _fill(segment, 40)  # ~4 KiB of batches: two steps of 2 KiB
    assert segment.size_bytes == sum(len(batch) for _, batch in stored)
    with open(segment.log_path, "rb") as file:
        assert file.read() == b"".join(batch for _, batch in stored)
    # a full disk: asked again a step later; a file system that cannot: asked once
    assert len(calls) >= 2 if code == errno.ENOSPC else len(calls) == 1
    segment.close()


def test_no_reservation_on_a_file_system_in_memory(tmp_path, monkeypatch):
    """tmpfs has no blocks to allocate ahead: a reservation would only take memory early."""
    calls = []
    monkeypatch.setattr(segment_module, "reserve", lambda *arguments: calls.append(arguments))
    monkeypatch.setattr(segment_module, "in_memory", lambda fd: True)
    segment = Segment.create(str(tmp_path), 100, RESERVE_CONFIG)
    stored = _fill(segment, 20)
    assert calls == []
    assert segment.size_bytes == sum(len(batch) for _, batch in stored)
    segment.close()


def test_tmpfs_is_known_to_be_in_memory(tmp_path):
    if not os.path.isdir("/dev/shm") or os.statvfs("/dev/shm").f_blocks == 0:
        pytest.skip("no /dev/shm here")
    with tempfile.TemporaryDirectory(dir="/dev/shm") as in_memory:
        fd = os.open(in_memory, os.O_RDONLY)
        try:
            assert segment_module.in_memory(fd)
        finally:
            os.close(fd)
    fd = os.open(tmp_path, os.O_RDONLY)
    try:  # (the test's own temp dir may be a tmpfs too: then both say so)
        assert segment_module.in_memory(fd) == (_file_system_type(tmp_path) in ("tmpfs", "ramfs"))
    finally:
        os.close(fd)


def _file_system_type(path):
    """The type /proc/mounts gives for the mount holding ``path`` (the longest matching prefix)."""
    best, found = "", "?"
    real = os.path.realpath(path)
    with open("/proc/mounts") as mounts:
        for line in mounts:
            fields = line.split()
            point = fields[1]
            inside = real == point or real.startswith(point.rstrip("/") + "/")
            if inside and len(point) > len(best):
                best, found = point, fields[2]
    return found
