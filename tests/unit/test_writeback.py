"""Starting the kernel's writeback early (storage/writeback.py): the log hands out each
``segment_writeback_bytes`` of its active segment once, and the worker's flush thread starts
their writeback and closes the duplicated fd."""

from __future__ import annotations

import os
import threading

import pytest
from storage_helpers import SMALL_CONFIG, FakeClock, sized_batch

from shmbroker.partition.flusher import Flusher
from shmbroker.storage import writeback
from shmbroker.storage.partition_log import PartitionLog

CONFIG = SMALL_CONFIG.replace(segment_bytes=8 * 1024, segment_writeback_bytes=1000)


def _same_file(fd: int, path: str) -> bool:
    mine, theirs = os.fstat(fd), os.stat(path)
    return (mine.st_dev, mine.st_ino) == (theirs.st_dev, theirs.st_ino)


def test_each_step_of_the_active_segment_is_handed_out_once(tmp_path):
    log = PartitionLog(tmp_path / "p0", CONFIG, clock_ms=FakeClock())
    batch = sized_batch(1, 300)  # ~370 bytes
    log.append(batch)
    assert log.take_writeback() is None  # less than a step appended
    log.append(batch + batch)
    fd, offset, length = log.take_writeback()
    try:
        assert (offset, length) == (0, 3 * len(batch))
        assert _same_file(fd, log.segments[-1].log_path)  # a duplicate: ours to close
    finally:
        os.close(fd)
    assert log.take_writeback() is None  # handed out already
    log.append(batch)
    assert log.take_writeback() is None
    log.append(batch + batch)
    fd, offset, length = log.take_writeback()
    os.close(fd)
    assert (offset, length) == (3 * len(batch), 3 * len(batch))
    while len(log.segments) == 1:  # a roll: the next segment is counted from its start
        log.append(batch)
    rolled = log.segments[-1]
    log.append(batch + batch + batch)
    fd, offset, length = log.take_writeback()
    os.close(fd)
    assert (offset, length) == (0, rolled.size_bytes) and length >= 1000
    log.close()
    assert log.take_writeback() is None  # closed


def test_zero_turns_it_off(tmp_path):
    log = PartitionLog(tmp_path / "p0", CONFIG.replace(segment_writeback_bytes=0),
                       clock_ms=FakeClock())
    log.append(b"".join(sized_batch(1, 300) for _ in range(10)))
    assert log.take_writeback() is None
    log.close()


def test_the_setting_is_a_topic_config(tmp_path):
    assert SMALL_CONFIG.replace(segment_writeback_bytes=0).segment_writeback_bytes == 0
    with pytest.raises(ValueError, match="segment_writeback_bytes"):
        SMALL_CONFIG.replace(segment_writeback_bytes=-1)


def test_start_writeback_on_a_file_and_on_a_bad_fd(tmp_path):
    path = tmp_path / "data"
    path.write_bytes(b"x" * 10_000)
    fd = os.open(path, os.O_RDWR)
    try:
        # True where the system has the call (Linux), False elsewhere
        assert writeback.start_writeback(fd, 0, 10_000) is (writeback._SYNC_FILE_RANGE is not None)
    finally:
        os.close(fd)
    if writeback._SYNC_FILE_RANGE is not None:
        with pytest.raises(OSError):
            writeback.start_writeback(fd, 0, 10_000)  # closed


@pytest.mark.parametrize("fails", [False, True])
def test_the_flush_thread_starts_it_and_closes_the_fd(tmp_path, monkeypatch, fails):
    """A hint runs on the flush thread; a failure (a hint only) is swallowed; either way the
    duplicated fd is closed and writeback_queued goes False."""
    calls = []

    def start(fd, offset, length):
        calls.append((threading.current_thread().name, offset, length, os.fstat(fd).st_size))
        if fails:
            raise OSError(5, "Input/output error")
        return True

    monkeypatch.setattr(writeback, "start_writeback", start)
    path = tmp_path / "segment"
    path.write_bytes(b"y" * 4096)
    fd = os.open(path, os.O_RDONLY)
    flusher = Flusher()
    try:
        flusher.start_writeback(writeback.WritebackHint(fd, 0, 4096))
        assert flusher.writeback_queued
    finally:
        flusher.close()  # runs what is queued first
    assert calls == [("flusher", 0, 4096, 4096)]
    assert not flusher.writeback_queued
    with pytest.raises(OSError):
        os.fstat(fd)  # closed by the thread


def test_after_a_truncation_the_active_segment_is_counted_from_its_start(tmp_path):
    """truncate_to cuts the active segment below what was handed out: what is appended after
    is handed out again from the segment's start (hinting clean pages costs nothing)."""
    log = PartitionLog(tmp_path / "p0", CONFIG.replace(segment_bytes=64 * 1024),
                       clock_ms=FakeClock())
    batch = sized_batch(1, 300)
    log.append(b"".join([batch] * 6))
    fd, offset, length = log.take_writeback()
    os.close(fd)
    assert (offset, length) == (0, 6 * len(batch))
    log.truncate_to(2)
    log.append(b"".join([batch] * 2))  # 4 batches: below what was handed out
    fd, offset, length = log.take_writeback()
    os.close(fd)
    assert (offset, length) == (0, 4 * len(batch))
    log.close()
