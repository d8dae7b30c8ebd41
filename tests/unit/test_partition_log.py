import errno
import os
import struct
import threading
import time

import pytest
from crc32c import crc32c
from storage_helpers import (  # noqa: E402
    SMALL_CONFIG,
    FakeClock,
    base_offset_of,
    make_batch,
    segment_logs,
    sized_batch,
    split_batches,
)

from shmbroker.config import LogConfig  # noqa: E402
from shmbroker.errors import (  # noqa: E402
    CorruptRecordError,
    LogClosedError,
    OffsetOutOfRangeError,
    StorageError,
)
from shmbroker.format.record_batch import read_header  # noqa: E402
from shmbroker.storage import segment as segment_module  # noqa: E402
from shmbroker.storage.partition_log import PartitionLog  # noqa: E402


def _open(tmp_path, config=SMALL_CONFIG, clock=None):
    return PartitionLog(tmp_path / "p0", config, clock_ms=clock or FakeClock())


def _count_mismatch_batch():
    """2 records, last_offset_delta 2 (a gap), CRC recomputed: valid but not a producer's."""
    batch = bytearray(make_batch([b"a", b"b"]))
    struct.pack_into(">i", batch, 23, 2)
    struct.pack_into(">I", batch, 17, crc32c(bytes(batch[21:])))
    return bytes(batch)


def test_append_assigns_offsets_and_reads_back(tmp_path):
    log = _open(tmp_path)
    first = sized_batch(3, 10)
    result = log.append(first)
    assert (result.first_offset, result.last_offset, result.base_offsets) == (0, 2, [0])
    assert result.append_time_ms == 1_000_000 and result.log_end_offset == 3
    many = sized_batch(2, 5) + sized_batch(1, 5) + sized_batch(4, 5)
    result = log.append(many)
    assert (result.first_offset, result.last_offset, result.base_offsets) == (3, 9, [3, 5, 6])
    assert log.log_end_offset == 10
    stored = split_batches(log.read_bytes(0, 10**6))
    assert [base_offset_of(batch) for batch in stored] == [0, 3, 5, 6]
    assert stored[0][8:] == first[8:]  # only the base offset changed
    for offset in range(10):
        batch = log.read_bytes(offset, 1)
        header = read_header(batch)
        assert header.base_offset <= offset < header.next_offset
        assert len(batch) == header.size
    assert log.read_bytes(10, 100) == b""
    empty = log.read(10, 100)
    assert empty.size_bytes == 0 and empty.log_end_offset == 10
    for bad in (-1, 11):
        with pytest.raises(OffsetOutOfRangeError):
            log.read(bad, 100)
    log.close()


def test_writable_buffer_rewritten_in_place_readonly_copied(tmp_path):
    log = _open(tmp_path)
    log.append(sized_batch(2, 4))
    writable = bytearray(sized_batch(1, 4))
    log.append(writable)
    assert base_offset_of(writable) == 2
    readonly = sized_batch(1, 4)
    log.append(memoryview(readonly))
    assert base_offset_of(readonly) == 0
    assert base_offset_of(log.read_bytes(3, 1)) == 3
    log.close()


@pytest.mark.parametrize("damage", ["crc", "truncated", "count", "empty", "too_large", "trailer"])
def test_bad_input_rejected_nothing_written(tmp_path, damage):
    log = _open(tmp_path, SMALL_CONFIG.replace(max_batch_bytes=2000))
    log.append(sized_batch(2, 10))
    size = log.size_bytes
    good = sized_batch(1, 10)
    if damage == "crc":
        bad = bytearray(good)
        bad[-1] ^= 1
        buffer = good + bytes(bad)
    elif damage == "truncated":
        buffer = good + good[:-1]
    elif damage == "count":
        buffer = good + _count_mismatch_batch()
    elif damage == "empty":
        buffer = b""
    elif damage == "too_large":
        buffer = good + sized_batch(1, 3000)
    else:
        buffer = good + b"\0" * 5
    with pytest.raises(CorruptRecordError) as caught:
        log.append(buffer)
    if damage == "count":
        assert "records_count == last_offset_delta + 1" in str(caught.value)
    assert log.log_end_offset == 2 and log.size_bytes == size
    assert os.path.getsize(segment_logs(tmp_path / "p0")[0]) == size
    log.append(good)
    assert log.log_end_offset == 3
    log.close()


def test_roll_by_segment_bytes_and_reads_stay_in_one_segment(tmp_path):
    config = SMALL_CONFIG.replace(segment_bytes=1000)
    log = _open(tmp_path, config)
    batches = [sized_batch(2, 100, tag=n) for n in range(10)]
    result = log.append(b"".join(batches))  # one call spanning several segments
    assert result.base_offsets == list(range(0, 20, 2))
    assert len(log.segments) > 2
    for segment in log.segments:
        assert segment.size_bytes <= 1000 and segment.file_size_bytes == segment.size_bytes
    assert [s.is_active for s in log.segments] == [False] * (len(log.segments) - 1) + [True]
    for offset in range(20):
        piece = log.read(offset, 10**6)
        segment = next(s for s in log.segments if s.base_offset == piece.segment_base_offset)
        assert piece.position + piece.size_bytes == segment.size_bytes  # stops at its end
    # a batch bigger than segment_bytes still goes in, alone
    log.append(sized_batch(1, 1500))
    assert log.segments[-1].size_bytes > 1000
    log.close()


def test_roll_by_segment_ms(tmp_path):
    clock = FakeClock()
    log = _open(tmp_path, SMALL_CONFIG.replace(segment_ms=1000), clock)
    log.append(sized_batch(1, 10))
    clock.advance(999)
    log.append(sized_batch(1, 10))
    assert len(log.segments) == 1
    clock.advance(1)
    log.append(sized_batch(1, 10))
    assert [s.base_offset for s in log.segments] == [0, 2]
    log.close()


def test_full_index_rolls(tmp_path):
    config = LogConfig(index_interval_bytes=0, segment_index_bytes=64, retention_ms=-1)
    log = _open(tmp_path, config)
    for number in range(12):
        log.append(sized_batch(1, 10, first_timestamp_ms=1000 + number))
    # 64 bytes of .timeindex hold 5 entries, one reserved for sealing: 4 batches per segment
    assert [s.base_offset for s in log.segments] == [0, 4, 8]
    for offset in range(12):
        assert base_offset_of(log.read_bytes(offset, 1)) == offset
    log.close()


def test_retention_by_time_uses_largest_timestamp(tmp_path):
    clock = FakeClock(now_ms=10_000)
    config = SMALL_CONFIG.replace(segment_bytes=300, retention_ms=5_000)
    log = _open(tmp_path, config, clock)
    for number in range(6):
        log.append(sized_batch(1, 150, first_timestamp_ms=1000 * number))
    assert len(log.segments) == 6
    clock.now_ms = 1000 * 2 + 5_000  # segments with largest timestamp < 2000 are expired
    assert log.tick() == [0, 1]
    assert log.log_start_offset == 2
    clock.now_ms = 10**9
    assert log.tick() == [2, 3, 4]  # never the active segment
    assert log.log_start_offset == 5 and len(log.segments) == 1
    with pytest.raises(OffsetOutOfRangeError):
        log.read(4, 100)
    log.close()


def test_retention_by_bytes(tmp_path):
    config = SMALL_CONFIG.replace(segment_bytes=300, retention_bytes=700)
    log = _open(tmp_path, config)
    for _ in range(6):
        log.append(sized_batch(1, 150))
    size = log.segments[0].size_bytes
    deleted = log.enforce_retention()
    assert deleted and log.size_bytes >= 700  # Kafka: keep at least retention_bytes
    assert log.size_bytes - log.segments[0].size_bytes < 700
    assert size == log.segments[0].size_bytes
    assert deleted == list(range(len(deleted)))
    log.close()


def test_delete_records_before_persists(tmp_path):
    log = _open(tmp_path, SMALL_CONFIG.replace(segment_bytes=300))
    for _ in range(5):
        log.append(sized_batch(2, 150))
    assert log.delete_records_before(5) == 5
    assert log.segments[0].base_offset == 4  # the segment holding 5 stays
    assert base_offset_of(log.read_bytes(5, 1)) == 4  # whole batch, consumer skips offset 4
    with pytest.raises(OffsetOutOfRangeError):
        log.read(4, 1)
    with pytest.raises(OffsetOutOfRangeError):
        log.delete_records_before(11)
    log.close()
    log = _open(tmp_path)
    assert (log.log_start_offset, log.log_end_offset) == (5, 10)
    assert log.delete_records_before(10) == 10  # everything: rolls a fresh active segment
    assert [s.base_offset for s in log.segments] == [10]
    log.append(sized_batch(1, 1))
    log.abandon()
    log = _open(tmp_path)
    assert (log.log_start_offset, log.log_end_offset) == (10, 11)
    log.close()


def test_truncate_to(tmp_path):
    log = _open(tmp_path, SMALL_CONFIG.replace(segment_bytes=300))
    for _ in range(6):
        log.append(sized_batch(2, 150))
    assert log.truncate_to(7) == 6  # the batch holding 7 (6..7) goes whole
    assert log.log_end_offset == 6 and log.flushed_offset <= 6
    assert log.truncate_to(100) == 6
    result = log.append(sized_batch(1, 1))
    assert result.first_offset == 6
    log.close()
    log = _open(tmp_path)
    assert log.log_end_offset == 7 and base_offset_of(log.read_bytes(6, 1)) == 6
    log.delete_records_before(4)
    assert log.truncate_to(2) == 2  # below log start: restart empty at 2
    assert (log.log_start_offset, log.log_end_offset) == (2, 2)
    assert log.append(sized_batch(1, 1)).first_offset == 2
    log.close()


def test_flush_policies(tmp_path):
    clock = FakeClock()
    log = _open(tmp_path / "a", SMALL_CONFIG.replace(flush_messages=1), clock)
    log.append(sized_batch(2, 1))
    assert log.flushed_offset == log.log_end_offset == 2
    log.close()
    log = _open(tmp_path / "b", SMALL_CONFIG.replace(flush_messages=3), clock)
    log.append(sized_batch(2, 1))
    assert log.flushed_offset == 0
    log.append(sized_batch(1, 1))
    assert log.flushed_offset == 3
    log.close()
    log = _open(tmp_path / "c", SMALL_CONFIG.replace(flush_ms=100), clock)
    log.append(sized_batch(2, 1))
    clock.advance(99)
    assert not log.maybe_flush() and log.flushed_offset == 0
    clock.advance(1)
    log.tick()
    assert log.flushed_offset == 2
    log.close()


def test_disk_full_leaves_log_unchanged(tmp_path, monkeypatch):
    log = _open(tmp_path, SMALL_CONFIG.replace(segment_bytes=500))
    log.append(sized_batch(1, 100))
    before = [(s.base_offset, s.size_bytes) for s in log.segments]
    files_before = sorted(os.listdir(tmp_path / "p0"))
    calls = []
    real_write = os.write

    def write_then_fail(fd, data):
        calls.append(len(data))
        if len(calls) == 2:  # the second segment of this append: disk full
            real_write(fd, bytes(data)[:7])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(segment_module.os, "write", write_then_fail)
    with pytest.raises(StorageError, match="No space left on device"):
        log.append(b"".join(sized_batch(1, 200) for _ in range(4)))
    monkeypatch.undo()
    assert [(s.base_offset, s.size_bytes) for s in log.segments] == before
    assert sorted(os.listdir(tmp_path / "p0")) == files_before
    assert os.path.getsize(segment_logs(tmp_path / "p0")[0]) == before[0][1]
    assert log.log_end_offset == 1
    assert log.append(sized_batch(1, 200)).first_offset == 1
    log.abandon()
    log = _open(tmp_path)
    assert log.log_end_offset == 2 and log.recovery_report.bytes_truncated == 0
    log.close()


def test_write_s_sums_the_time_spent_writing_segment_files(tmp_path, monkeypatch):
    """What the worker's stall warnings call "writing the segment files": a write the disk
    holds counts, in a call that goes to one segment and in one that rolls across several; the
    checks of a batch that is refused write nothing and count nothing."""
    log = _open(tmp_path, SMALL_CONFIG.replace(segment_bytes=500))
    assert log.write_s == 0.0
    real_write = os.write
    held = []

    def held_write(fd, data):
        held.append(len(data))
        time.sleep(0.02)  # a disk that lags: the kernel holds the writer
        return real_write(fd, data)

    monkeypatch.setattr(segment_module.os, "write", held_write)
    log.append(sized_batch(1, 100))
    assert len(held) == 1 and log.write_s >= 0.02
    before = log.write_s
    log.append(b"".join(sized_batch(1, 200) for _ in range(4)))  # rolls: one write a segment
    assert len(held) >= 3 and log.write_s - before >= 0.02 * (len(held) - 1)
    before, writes = log.write_s, len(held)
    bad = bytearray(sized_batch(1, 10))
    bad[-1] ^= 1
    with pytest.raises(CorruptRecordError):
        log.append(bytes(bad))
    assert (log.write_s, len(held)) == (before, writes)
    monkeypatch.undo()
    log.close()


def test_roll_s_sums_the_time_appends_spend_rolling_segments(tmp_path, monkeypatch):
    """What the stall warnings call "rolling segments": making the next segment's files and
    sealing the last one, in an append that rolls (a roll waiting on the file system's journal
    shows there, not in write_s); an append that does not roll adds nothing."""
    log = _open(tmp_path, SMALL_CONFIG.replace(segment_bytes=500))
    log.append(sized_batch(1, 100))
    assert log.roll_s == 0.0
    real_create, real_seal = segment_module.Segment.create, segment_module.Segment.seal

    def slow_create(*args, **kwargs):
        time.sleep(0.02)
        return real_create(*args, **kwargs)

    def slow_seal(self, *args, **kwargs):
        time.sleep(0.02)
        return real_seal(self, *args, **kwargs)

    monkeypatch.setattr(segment_module.Segment, "create", staticmethod(slow_create))
    monkeypatch.setattr(segment_module.Segment, "seal", slow_seal)
    segments = len(log.segments)
    write_s = log.write_s
    log.append(b"".join(sized_batch(1, 200) for _ in range(4)))  # rolls
    rolls = len(log.segments) - segments
    assert rolls >= 2 and log.roll_s >= 2 * 0.02 * rolls  # a create and a seal each
    assert log.write_s - write_s < 0.02
    monkeypatch.undo()
    log.close()


def test_offset_for_timestamp(tmp_path):
    log = _open(tmp_path, SMALL_CONFIG.replace(segment_bytes=400))
    for number in range(10):  # batch n: records at 100n, 100n+10, 100n+20
        log.append(make_batch([b"x" * 50] * 3, timestamps=[100 * number + 10 * k
                                                           for k in range(3)]))
    assert len(log.segments) > 2
    assert log.offset_for_timestamp(0) == (0, 0)
    assert log.offset_for_timestamp(11) == (2, 20)
    assert log.offset_for_timestamp(21) == (3, 100)
    assert log.offset_for_timestamp(920) == (29, 920)
    assert log.offset_for_timestamp(921) is None
    log.delete_records_before(4)
    assert log.offset_for_timestamp(0) == (4, 110)
    log.close()


def test_closed_log_refuses(tmp_path):
    log = _open(tmp_path)
    log.close()
    log.close()
    for call in (lambda: log.append(sized_batch(1, 1)), lambda: log.read(0, 1), log.flush):
        with pytest.raises(LogClosedError):
            call()


def test_clean_reopen_scans_nothing(tmp_path):
    log = _open(tmp_path, SMALL_CONFIG.replace(segment_bytes=2000))
    for number in range(30):
        log.append(sized_batch(1 + number % 3, 100, tag=number))
    content = log.read_bytes(0, 10**6)
    log.close()
    log = _open(tmp_path)
    report = log.recovery_report
    assert report.clean_shutdown and report.segments_scanned == 0
    assert not report.changed_anything
    assert log.read_bytes(0, 10**6) == content
    end = log.log_end_offset
    log.append(sized_batch(1, 1))  # appends land at the end, not over the first batch
    assert log.read_bytes(0, 10**6) == content
    assert base_offset_of(log.read_bytes(end, 100)) == end
    log.close()


def test_tick_flushes_and_checkpoints_the_recovery_point_without_a_flush_policy(tmp_path):
    """No flush_messages, no flush_ms: the periodic checkpoint still fsyncs, so a crash (a
    reopen without close) rescans only what came after it."""
    from shmbroker.storage.partition_log import RECOVERY_POINT_CHECKPOINT_INTERVAL_MS

    clock = FakeClock()
    log = _open(tmp_path / "a", SMALL_CONFIG, clock)
    log.append(sized_batch(3, 1))
    log.tick()
    assert log.flushed_offset == 0  # not yet: the interval has not passed
    clock.advance(RECOVERY_POINT_CHECKPOINT_INTERVAL_MS)
    log.tick()
    assert log.flushed_offset == 3
    log.append(sized_batch(2, 1))
    # a crash: no close; the next open trusts the checkpoint and scans from offset 3 only
    reopened = _open(tmp_path / "a", SMALL_CONFIG, clock)
    assert reopened.log_end_offset == 5
    assert reopened.recovery_report.recovery_point_offset == 3
    reopened.close()


def test_background_flush_tick_fsyncs_nothing_and_flush_due_says_when(tmp_path, monkeypatch):
    """tick(background_flush=True) leaves the fsyncs to the owner's tickets: flush_due asks
    for one once the oldest unflushed append is flush_ms (or the recovery-point interval) old;
    after a ticket that did not cover later appends it counts from when the ticket began; the
    checkpoint records what the tickets made durable."""
    from shmbroker.storage.partition_log import RECOVERY_POINT_CHECKPOINT_INTERVAL_MS

    clock = FakeClock()
    log = _open(tmp_path / "a", LogConfig(segment_bytes=4096, index_interval_bytes=256,
                                          segment_index_bytes=1024, flush_ms=1000), clock)
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    assert not log.flush_due()
    log.append(sized_batch(3, 1))
    clock.advance(999)
    assert not log.flush_due()
    clock.advance(1)
    assert log.flush_due()
    log.tick(background_flush=True)
    assert synced == [] and log.flushed_offset == 0  # maybe_flush did not run
    ticket = log.begin_flush()
    assert ticket is not None and ticket.began_ms == clock()
    clock.advance(300)
    log.append(sized_batch(2, 1))  # after the ticket began: not covered
    log.end_flush(ticket, ticket.run())
    assert log.flushed_offset == 3 and not log.flush_due()
    clock.advance(699)
    assert not log.flush_due()  # 999 ms since the ticket began
    clock.advance(1)
    assert log.flush_due()
    ticket = log.begin_flush()
    log.end_flush(ticket, ticket.run())
    assert log.flushed_offset == 5 and not log.flush_due()
    # the interval's checkpoint: tick fsyncs and writes nothing, it makes a flush due; the
    # next ticket flushes and then writes the checkpoint, naming the log end it covered
    synced.clear()
    clock.advance(RECOVERY_POINT_CHECKPOINT_INTERVAL_MS)
    log.append(sized_batch(4, 1))
    checkpoint_path = tmp_path / "a" / "p0" / "recovery-point-offset-checkpoint"
    before = checkpoint_path.read_bytes()
    log.tick(background_flush=True)
    assert synced == [] and checkpoint_path.read_bytes() == before
    assert log.flushed_offset == 5 and log.log_end_offset == 9 and log.flush_due()
    ticket = log.begin_flush()
    assert ticket is not None and ticket.checkpoint is not None and ticket.offset == 9
    log.end_flush(ticket, ticket.run())
    assert log.flushed_offset == 9 and not log.flush_due()
    assert checkpoint_path.read_bytes() != before
    reopened = _open(tmp_path / "a", SMALL_CONFIG, clock)  # a crash: no close
    assert reopened.recovery_report.recovery_point_offset == 9
    assert reopened.log_end_offset == 9
    reopened.close()


def test_flush_messages_makes_a_flush_due_when_the_count_is_reached(tmp_path):
    """append(defer_flush=True) leaves flush_messages to the owner: flush_due says when."""
    log = _open(tmp_path / "a", SMALL_CONFIG.replace(flush_messages=5), FakeClock())
    log.append(sized_batch(3, 1), defer_flush=True)
    assert log.flushed_offset == 0 and not log.flush_due()
    log.append(sized_batch(2, 1), defer_flush=True)
    assert log.flushed_offset == 0 and log.flush_due()
    ticket = log.begin_flush()
    log.append(sized_batch(4, 1), defer_flush=True)  # 4 after the ticket: not yet 5
    log.end_flush(ticket, ticket.run())
    assert log.flushed_offset == 5 and not log.flush_due()
    log.append(sized_batch(1, 1), defer_flush=True)
    assert log.flush_due()
    log.close()


def test_without_flush_ms_the_recovery_interval_makes_a_flush_due(tmp_path):
    from shmbroker.storage.partition_log import RECOVERY_POINT_CHECKPOINT_INTERVAL_MS

    clock = FakeClock()
    log = _open(tmp_path / "a", SMALL_CONFIG, clock)
    log.append(sized_batch(1, 1))
    clock.advance(RECOVERY_POINT_CHECKPOINT_INTERVAL_MS - 1)
    assert not log.flush_due()
    clock.advance(1)
    assert log.flush_due()
    log.flush()
    assert not log.flush_due()
    log.close()


# -- the recovery-point checkpoint of background flushes -------------------------------------

def _checkpoint_due(tmp_path):
    """A log whose interval has passed under tick(background_flush=True), with 9 offsets not
    yet checkpointed: the next ticket carries the checkpoint."""
    from shmbroker.storage.partition_log import RECOVERY_POINT_CHECKPOINT_INTERVAL_MS

    clock = FakeClock()
    log = _open(tmp_path / "a", SMALL_CONFIG, clock)
    log.append(sized_batch(5, 1))
    log.append(sized_batch(4, 1))
    clock.advance(RECOVERY_POINT_CHECKPOINT_INTERVAL_MS)
    log.tick(background_flush=True)
    assert log.flush_due()
    return log, clock, tmp_path / "a" / "p0" / "recovery-point-offset-checkpoint"


def _read_checkpoint(path):
    from shmbroker.storage.checkpoint_file import CheckpointFile

    return CheckpointFile(path).read()


def test_the_ticket_writes_the_checkpoint_on_the_thread_that_runs_it(tmp_path, monkeypatch):
    """tick writes nothing on the owner's thread; the ticket's thread fsyncs the segment, then
    the index files, then writes the checkpoint (recovery point = the ticket's offset)."""
    import threading

    from shmbroker.storage.checkpoint_file import CheckpointFile

    log, _, path = _checkpoint_due(tmp_path)
    events = []
    real_write, real_fsync = CheckpointFile.write, os.fsync
    monkeypatch.setattr(CheckpointFile, "write", lambda self, entries: events.append(
        ("write", threading.current_thread().name, dict(entries)))
        or real_write(self, entries))
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(
        ("fsync", threading.current_thread().name, os.fstat(fd).st_ino)) or real_fsync(fd))
    ticket = log.begin_flush()
    assert events == []  # nothing on the owner's thread yet
    assert ticket is not None and ticket.checkpoint is not None and ticket.offset == 9
    runner = threading.Thread(target=lambda: events.append(("done", ticket.run())),
                              name="flusher")
    runner.start()
    runner.join()
    log.end_flush(ticket, events.pop()[1])
    active = log.segments[-1]
    inodes = [os.stat(p).st_ino for p in (active.log_path, active.offset_index.path,
                                          active.time_index.path)]
    fsynced = [event[2] for event in events if event[0] == "fsync"]
    assert fsynced[:3] == inodes  # data, then both indexes, then the checkpoint's own
    writes = [event for event in events if event[0] == "write"]
    assert writes == [("write", "flusher", {"recovery_point_offset": 9, "clean_shutdown": 0})]
    assert all(event[1] == "flusher" for event in events)
    assert _read_checkpoint(path)["recovery_point_offset"] == 9
    assert not log.flush_due() and log.begin_flush() is None
    log.abandon()  # a crash: the next open trusts the checkpoint
    reopened = _open(tmp_path / "a", SMALL_CONFIG)
    assert reopened.recovery_report.recovery_point_offset == 9
    reopened.close()


def test_a_truncation_wins_over_a_checkpoint_ticket_that_ran_late(tmp_path):
    """The truncation lowers the recovery point; the ticket begun before it (recovery point 9)
    runs after it and must not put 9 back over it."""
    log, _, path = _checkpoint_due(tmp_path)
    ticket = log.begin_flush()
    assert ticket is not None and ticket.checkpoint is not None
    assert log.truncate_to(5) == 5
    assert _read_checkpoint(path)["recovery_point_offset"] <= 5
    log.end_flush(ticket, ticket.run())
    assert _read_checkpoint(path)["recovery_point_offset"] <= 5
    assert not ticket.checkpoint.written and ticket.checkpoint.index_fds == []
    assert log.flushed_offset <= 5 == log.log_end_offset
    log.abandon()
    reopened = _open(tmp_path / "a", SMALL_CONFIG)
    assert reopened.log_end_offset == 5
    reopened.close()


def test_a_clean_close_is_not_overwritten_by_a_late_ticket(tmp_path):
    log, _, path = _checkpoint_due(tmp_path)
    ticket = log.begin_flush()
    log.close()
    assert _read_checkpoint(path) == {"recovery_point_offset": 9, "clean_shutdown": 1}
    assert ticket.run() is None and not ticket.checkpoint.written
    assert _read_checkpoint(path) == {"recovery_point_offset": 9, "clean_shutdown": 1}


def test_a_failed_checkpoint_write_is_logged_not_fenced_and_tried_again(tmp_path, monkeypatch,
                                                                        caplog):
    from shmbroker.storage.checkpoint_file import CheckpointFile
    from shmbroker.storage.partition_log import RECOVERY_POINT_CHECKPOINT_INTERVAL_MS

    log, clock, path = _checkpoint_due(tmp_path)
    before = _read_checkpoint(path)
    real_write = CheckpointFile.write

    def failing(self, entries):
        raise StorageError(f"cannot write checkpoint {self.path}: No space left on device")

    monkeypatch.setattr(CheckpointFile, "write", failing)
    ticket = log.begin_flush()
    log.end_flush(ticket, ticket.run())
    assert log.fenced is None and log.flushed_offset == 9  # the data flush stands
    assert "cannot make the index files and the recovery-point checkpoint durable" in caplog.text
    assert _read_checkpoint(path) == before and not log.flush_due()
    monkeypatch.setattr(CheckpointFile, "write", real_write)
    log.append(sized_batch(1, 1))
    clock.advance(RECOVERY_POINT_CHECKPOINT_INTERVAL_MS)
    log.tick(background_flush=True)  # the next interval asks again
    ticket = log.begin_flush()
    assert ticket is not None and ticket.checkpoint is not None
    log.end_flush(ticket, ticket.run())
    assert _read_checkpoint(path)["recovery_point_offset"] == 10
    log.close()


def test_a_failed_data_fsync_writes_no_checkpoint(tmp_path, monkeypatch):
    log, _, path = _checkpoint_due(tmp_path)
    before = _read_checkpoint(path)
    ticket = log.begin_flush()
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(
        OSError(errno.EIO, "Input/output error")))
    error = ticket.run()
    assert isinstance(error, OSError) and ticket.checkpoint.index_fds == []
    with pytest.raises(StorageError, match="fsync failed"):
        log.end_flush(ticket, error)
    assert _read_checkpoint(path) == before and log.fenced is not None
    log.abandon()


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _roll_once(log):
    """Append 200-byte batches until the log rolls; the segment it sealed."""
    count = len(log.segments)
    while len(log.segments) == count:
        log.append(sized_batch(5, 200), defer_flush=True)
    return log.segments[-2]


@pytest.mark.parametrize("declared_by", ["begin_flush", "tick"])
def test_a_roll_leaves_the_sealed_indexes_fsync_to_the_next_ticket(tmp_path, monkeypatch,
                                                                   declared_by):
    """An owner that runs tickets (it began one, or ticks with background_flush): the roll
    trims and closes the sealed segment's indexes but fsyncs nothing on its thread; a flush is
    due at once, and its ticket fsyncs both index files."""
    log = _durable(tmp_path)
    log.append(sized_batch(1, 10), defer_flush=True)
    if declared_by == "begin_flush":
        ticket = log.begin_flush()
        log.end_flush(ticket, ticket.run())
    else:
        log.tick(background_flush=True)
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.fstat(fd).st_ino)
                        or real_fsync(fd))
    sealed = _roll_once(log)
    assert synced == [] and not sealed.is_active and log.flush_due()
    ticket = log.begin_flush()
    assert ticket is not None and ticket.checkpoint is not None
    assert not ticket.checkpoint.write_checkpoint  # no interval yet: indexes only
    log.end_flush(ticket, ticket.run())
    index_inodes = {os.stat(path).st_ino for path in (sealed.offset_index.path,
                                                      sealed.time_index.path)}
    assert index_inodes <= set(synced)
    assert ticket.checkpoint.index_fds == [] and not log.flush_due()
    log.close()


def test_without_tickets_a_roll_fsyncs_the_sealed_indexes_itself(tmp_path, monkeypatch):
    log = _durable(tmp_path)
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.fstat(fd).st_ino)
                        or real_fsync(fd))
    sealed = _roll_once(log)
    assert {os.stat(path).st_ino for path in (sealed.offset_index.path,
                                              sealed.time_index.path)} <= set(synced)
    log.close()


@pytest.mark.parametrize("ending", ["close", "truncate", "abandon"])
def test_index_fds_waiting_for_a_ticket_are_synced_or_closed_without_one(tmp_path, ending):
    """A checkpoint written on the owner's thread (close, truncate_to) fsyncs the sealed
    indexes first; abandon closes their fds.  No fd is left open either way."""
    before = _open_fds()
    log = _durable(tmp_path)
    log.tick(background_flush=True)
    _roll_once(log)
    assert log._sealed_index_fds  # waiting for a ticket
    if ending == "truncate":
        log.truncate_to(1)
        assert log._sealed_index_fds == []
        log.close()
    elif ending == "close":
        log.close()
    else:
        log.abandon()
    assert log._sealed_index_fds == [] and _open_fds() == before
    if ending != "abandon":  # and the indexes it trusts were synced: it reopens clean
        reopened = PartitionLog(tmp_path / "p0", log.config, clock_ms=FakeClock())
        assert reopened.recovery_report.clean_shutdown
        reopened.close()


# -- flushes run off the owner's thread (group commit) ---------------------------------------

def _durable(tmp_path):
    config = LogConfig(segment_bytes=4096, index_interval_bytes=256, segment_index_bytes=1024,
                       retention_ms=-1, flush_messages=1)
    return PartitionLog(tmp_path / "p0", config, clock_ms=FakeClock())


def test_deferred_flush_advances_flushed_offset_only_when_its_ticket_ends(tmp_path):
    log = _durable(tmp_path)
    log.append(sized_batch(3, 10))
    assert log.flushed_offset == 3  # flush_messages = 1: inline
    log.append(sized_batch(2, 10), defer_flush=True)
    assert (log.flushed_offset, log.log_end_offset) == (3, 5)
    ticket = log.begin_flush()
    assert ticket is not None and ticket.offset == 5 and len(ticket.fds) == 1
    log.append(sized_batch(4, 10), defer_flush=True)  # appends go on while it runs
    assert ticket.run() is None and ticket.fds == []  # its fds are closed
    assert log.flushed_offset == 3
    log.end_flush(ticket, None)
    assert log.flushed_offset == 5  # not 9: the later append is not covered
    ticket = log.begin_flush()
    assert ticket is not None and ticket.offset == 9
    log.end_flush(ticket, ticket.run())
    assert log.flushed_offset == 9 and log.begin_flush() is None


def test_a_ticket_covers_every_segment_rolled_since_the_last_flush(tmp_path, monkeypatch):
    log = _durable(tmp_path)
    while len(log.segments) < 3:
        log.append(sized_batch(5, 200), defer_flush=True)
    ticket = log.begin_flush()
    assert ticket is not None and len(ticket.fds) == 3 and ticket.directory is not None
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.fstat(fd).st_ino)
                        or real_fsync(fd))
    log.end_flush(ticket, ticket.run())
    inodes = {os.stat(segment.log_path).st_ino for segment in log.segments}
    assert inodes <= set(synced)  # every segment's file (through its duplicated fd)
    assert log.flushed_offset == log.log_end_offset


def test_reads_of_flushed_batches_stop_at_flushed_offset(tmp_path):
    log = _durable(tmp_path)
    log.append(sized_batch(3, 10) + sized_batch(2, 10))
    log.append(sized_batch(4, 10), defer_flush=True)
    assert [base_offset_of(batch) for batch in split_batches(log.read_bytes(0, 10**6))] \
        == [0, 3, 5]
    flushed = log.read(0, 10**6, flushed_only=True)
    assert flushed.next_offset == 5
    assert [base_offset_of(batch) for batch in split_batches(
        os.pread(flushed.fd, flushed.size_bytes, flushed.position))] == [0, 3]
    assert log.read(3, 1, flushed_only=True).next_offset == 5
    beyond = log.read(5, 10**6, flushed_only=True)
    assert beyond.size_bytes == 0 and beyond.next_offset == 5
    ticket = log.begin_flush()
    assert ticket is not None
    log.end_flush(ticket, ticket.run())
    assert log.read(0, 10**6, flushed_only=True).next_offset == 9


def test_reads_of_flushed_batches_after_reopen_find_the_flushed_position(tmp_path):
    log = _durable(tmp_path)
    log.append(sized_batch(3, 10))
    log.close()
    log = _durable(tmp_path)  # flushed_offset 3 from the checkpoint; its position not known
    log.append(sized_batch(2, 10), defer_flush=True)
    assert (log.flushed_offset, log.log_end_offset) == (3, 5)
    flushed = log.read(0, 10**6, flushed_only=True)
    assert flushed.next_offset == 3
    assert [base_offset_of(batch) for batch in split_batches(
        os.pread(flushed.fd, flushed.size_bytes, flushed.position))] == [0]


def test_a_failed_ticket_fences_the_log(tmp_path):
    log = _durable(tmp_path)
    log.append(sized_batch(2, 10), defer_flush=True)
    ticket = log.begin_flush()
    assert ticket is not None
    ticket.discard()
    with pytest.raises(StorageError, match="fsync failed"):
        log.end_flush(ticket, OSError(errno.EIO, "Input/output error"))
    assert log.fenced is not None and log.flushed_offset == 0
    with pytest.raises(StorageError):
        log.append(sized_batch(1, 10))


def test_a_ticket_begun_before_a_truncation_advances_nothing(tmp_path):
    log = _durable(tmp_path)
    log.append(sized_batch(3, 10))
    log.append(sized_batch(3, 10), defer_flush=True)
    ticket = log.begin_flush()
    assert ticket is not None and ticket.offset == 6
    log.truncate_to(3)
    log.append(sized_batch(3, 10), defer_flush=True)  # offsets 3..5 again, other bytes
    log.end_flush(ticket, ticket.run())
    assert log.flushed_offset == 3


def test_position_in_active_for_the_log_end_and_the_flushed_offset(tmp_path):
    """What the worker publishes as the readable end (direct reads): a byte position known
    without a search, and the batch boundary there; None elsewhere."""
    log = _durable(tmp_path)
    log.append(sized_batch(3, 10))  # flushed inline (flush_messages = 1)
    end_of_first = log.active_segment.size_bytes
    assert log.position_in_active(3) == (0, end_of_first)
    log.append(sized_batch(2, 10), defer_flush=True)
    assert (log.flushed_offset, log.log_end_offset) == (3, 5)
    assert log.position_in_active(5) == (0, log.active_segment.size_bytes)
    assert log.position_in_active(3) == (0, end_of_first)  # the flushed offset, in the middle
    assert log.position_in_active(4) is None  # inside a batch: not a boundary it knows
    assert log.position_in_active(0) is None
    stored = log.read_bytes(3, 10**6)
    assert read_header(stored).base_offset == 3  # the batch that starts there
    while len(log.segments) < 2:
        log.append(sized_batch(2, 200), defer_flush=True)
    active = log.active_segment
    assert log.flushed_offset < active.base_offset
    assert log.position_in_active(log.flushed_offset) is None  # flushed point in a sealed one
    assert log.position_in_active(log.log_end_offset) == (active.base_offset, active.size_bytes)
    ticket = log.begin_flush()
    log.end_flush(ticket, ticket.run())
    assert log.position_in_active(log.flushed_offset) == (active.base_offset, active.size_bytes)
    log.close()


# -- a roll leaves giving back the sealed segment's reserved space to the next ticket ----------

RESERVING = SMALL_CONFIG.replace(segment_bytes=64 << 20, segment_preallocate_bytes=1 << 20,
                                 segment_ms=1000)


def _allocated_bytes(path):
    return os.stat(path).st_blocks * 512


@pytest.fixture
def reserving(tmp_path, monkeypatch):
    """Segments reserve space ahead even where the temp dir is a tmpfs (which supports
    fallocate; the broker only skips it there as no faster); skip where nothing can."""
    monkeypatch.setattr(segment_module, "in_memory", lambda fd: False)
    probe = tmp_path / "probe"
    fd = os.open(probe, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        segment_module.reserve(fd, 0, 1 << 20)
        if _allocated_bytes(probe) < 1 << 20:
            pytest.skip("this file system cannot reserve space (fallocate KEEP_SIZE)")
    except OSError:
        pytest.skip("this file system cannot reserve space (fallocate KEEP_SIZE)")
    finally:
        os.close(fd)
        probe.unlink()


def _truncations(monkeypatch):
    """(thread, path) of every os.ftruncate from now on."""
    calls = []
    real_ftruncate = os.ftruncate

    def ftruncate(fd, length):
        calls.append((threading.current_thread().name, os.readlink(f"/proc/self/fd/{fd}")))
        return real_ftruncate(fd, length)

    monkeypatch.setattr(os, "ftruncate", ftruncate)
    return calls


def _run_ticket(log):
    ticket = log.begin_flush()
    assert ticket is not None
    outcome = []
    runner = threading.Thread(target=lambda: outcome.append(ticket.run()), name="flusher")
    runner.start()
    runner.join(30)
    log.end_flush(ticket, outcome[0])


def test_a_roll_leaves_giving_back_the_reserved_space_to_the_next_ticket(tmp_path, monkeypatch,
                                                                        reserving):
    """The truncation that frees the blocks reserved past a sealed segment's data can wait tens
    of ms for the file system's journal (measured on a 16-core machine: rolls of 61-150 ms):
    with tickets (as a worker runs), it runs on the ticket's thread, not the appending one."""
    clock = FakeClock()
    log = _open(tmp_path, RESERVING, clock)
    log.tick(background_flush=True)  # flushes on tickets, as a worker's log
    first = sized_batch(2, 100)
    log.append(first)
    sealed = log.segments[0]
    assert _allocated_bytes(sealed.log_path) >= 1 << 20  # reserved a step ahead
    truncations = _truncations(monkeypatch)
    clock.advance(2000)
    log.append(sized_batch(1, 100))  # segment_ms: rolls
    assert len(log.segments) == 2 and log.flush_due()
    assert not any(path == sealed.log_path for _, path in truncations)  # not on this thread
    assert _allocated_bytes(sealed.log_path) >= 1 << 20  # still reserved ...
    _run_ticket(log)
    assert ("flusher", sealed.log_path) in truncations  # ... until the ticket gave it back
    assert _allocated_bytes(sealed.log_path) < 1 << 20
    assert os.path.getsize(sealed.log_path) == len(first)
    monkeypatch.undo()
    log.close()
    reopened = _open(tmp_path, RESERVING, clock)
    assert [base_offset_of(batch) for batch in split_batches(reopened.read_bytes(0, 1 << 20))] \
        == [0]
    assert reopened.log_end_offset == 3 and reopened.recovery_report.bytes_truncated == 0
    reopened.close()


@pytest.mark.parametrize("checkpoint_due", [False, True])
def test_out_of_fds_a_flush_runs_on_the_owners_thread_instead_of_a_ticket(
        tmp_path, monkeypatch, reserving, checkpoint_due):
    """begin_flush cannot duplicate the fds a ticket needs (EMFILE): it flushes here and
    returns None, and what the ticket would have carried is done here too: the sealed
    segment's reserved space given back, its indexes synced, the checkpoint written when due.
    No fd is left open."""
    from shmbroker.storage.partition_log import RECOVERY_POINT_CHECKPOINT_INTERVAL_MS

    before = _open_fds()
    clock = FakeClock()
    log = _open(tmp_path, RESERVING, clock)
    log.tick(background_flush=True)  # flushes on tickets, as a worker's log
    first = sized_batch(2, 100)
    log.append(first, defer_flush=True)
    sealed = log.segments[0]
    clock.advance(2000)
    log.append(sized_batch(1, 100), defer_flush=True)  # segment_ms: rolls
    assert len(log.segments) == 2 and log._reserve_releases and log._sealed_index_fds
    if checkpoint_due:
        clock.advance(RECOVERY_POINT_CHECKPOINT_INTERVAL_MS)
        log.tick(background_flush=True)
    assert log.flush_due() and log.flushed_offset == 0

    def no_fd(fd):
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    monkeypatch.setattr(os, "dup", no_fd)
    assert log.begin_flush() is None
    monkeypatch.undo()
    assert log.flushed_offset == log.log_end_offset == 3 and not log.flush_due()
    assert log._reserve_releases == [] and log._sealed_index_fds == []
    assert os.path.getsize(sealed.log_path) == len(first)
    assert _allocated_bytes(sealed.log_path) < 1 << 20  # given back
    checkpoint = _read_checkpoint(tmp_path / "p0" / "recovery-point-offset-checkpoint")
    if checkpoint_due:
        assert checkpoint["recovery_point_offset"] == 3
    log.abandon()  # a crash: the next open trusts what was synced
    assert _open_fds() == before
    reopened = _open(tmp_path, RESERVING, clock)
    assert reopened.log_end_offset == 3 and reopened.recovery_report.bytes_truncated == 0
    if checkpoint_due:
        assert reopened.recovery_report.recovery_point_offset == 3
    reopened.close()


@pytest.mark.parametrize("ticket_begun", [False, True])
def test_a_truncation_never_lets_a_release_cut_a_segment_back(tmp_path, monkeypatch, reserving,
                                                              ticket_begun):
    """A sealed segment that truncate_to cuts and makes the last again takes appends past its
    old size: a release of its old reserve, pending or in a ticket begun before, must not
    truncate it back to that size (the pending ones run before the cut, a ticket begun before
    is stale, and a release never applies to a file whose size moved)."""
    config = RESERVING.replace(segment_bytes=64 * 1024, segment_ms=7 * 24 * 3600 * 1000)
    log = _open(tmp_path, config)
    log.tick(background_flush=True)
    first = [sized_batch(1, 20_000) for _ in range(2)]
    log.append(b"".join(first))  # offsets 0, 1: ~40 KiB, reserved up to 64 KiB
    log.append(sized_batch(1, 30_000))  # does not fit: rolls, offset 2 in the second segment
    assert len(log.segments) == 2
    old_size = log.segments[0].size_bytes
    ticket = log.begin_flush() if ticket_begun else None
    log.truncate_to(1)  # the first segment is the last again, cut after offset 0
    assert log.log_end_offset == 1 and len(log.segments) == 1
    assert os.path.getsize(log.segments[0].log_path) == len(first[0])  # cut, not regrown
    more = [sized_batch(1, 10_000) for _ in range(4)]
    log.append(b"".join(more))  # ~60 KiB: past the first segment's old size, in it
    assert len(log.segments) == 1 and log.segments[0].size_bytes > old_size
    expected = [first[0], *more]
    if ticket is not None:
        log.end_flush(ticket, ticket.run())  # stale: gives back nothing
    if log.flush_due():
        _run_ticket(log)
    stored = split_batches(log.read_bytes(0, 1 << 20))
    assert [batch[8:] for batch in stored] == [batch[8:] for batch in expected]
    assert os.path.getsize(log.segments[0].log_path) == sum(map(len, expected))
    log.close()
    reopened = _open(tmp_path, config)
    assert reopened.log_end_offset == 5 and reopened.recovery_report.bytes_truncated == 0
    reopened.close()


def test_a_crash_before_the_ticket_gives_the_reserved_space_back_at_the_reopen(tmp_path,
                                                                               reserving):
    """A roll's release waits for the next ticket; a crash before it leaves the blocks
    reserved past the sealed segment's data allocated, until the reopen: the recovery scan
    (every segment past the recovery point, which a segment sealed after the last ticket is)
    cuts each file to its data, which gives them back."""
    clock = FakeClock()
    log = _open(tmp_path, RESERVING, clock)
    log.tick(background_flush=True)
    first = sized_batch(2, 100)
    log.append(first)
    clock.advance(2000)
    log.append(sized_batch(1, 100))  # rolls: the first segment's release pending
    sealed_path = log.segments[0].log_path
    assert _allocated_bytes(sealed_path) >= 1 << 20
    log.abandon()  # the crash
    reopened = _open(tmp_path, RESERVING, clock)
    assert _allocated_bytes(sealed_path) < 1 << 20
    assert os.path.getsize(sealed_path) == len(first)
    assert reopened.log_end_offset == 3
    reopened.close()
