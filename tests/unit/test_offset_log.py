import errno
import os
import shutil
import signal
import stat
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from crc32c import crc32c

from shmbroker import limits
from shmbroker.errors import LogClosedError, StorageError
from shmbroker.storage import offset_log as offset_log_module
from shmbroker.storage.offset_log import (
    FILE_HEADER_BYTES,
    LOG_NAME,
    TMP_SUFFIX,
    CommittedOffset,
    OffsetLog,
)


class IntSubclass(int):
    pass


class Clock:
    def __init__(self, now_ms=1_700_000_000_000):
        self.now_ms = now_ms

    def __call__(self):
        self.now_ms += 1
        return self.now_ms


def open_log(directory, **kwargs):
    kwargs.setdefault("clock_ms", Clock())
    return OffsetLog(directory, **kwargs)


def reopen(log, **kwargs):
    log.close()
    return open_log(log.directory, **kwargs)


def log_path(log_or_directory):
    directory = getattr(log_or_directory, "directory", log_or_directory)
    return Path(directory) / LOG_NAME


# -- round trips and visibility -------------------------------------------------------------------

def test_new_log_is_created_empty(tmp_path):
    log = open_log(tmp_path / "groups")
    assert log.recovery_report.created
    assert (log.groups(), log.live_entries, log.size_bytes) == ([], 0, FILE_HEADER_BYTES)
    assert os.path.getsize(log_path(log)) == FILE_HEADER_BYTES
    log = reopen(log)
    assert not log.recovery_report.created and log.recovery_report.reason is None


def test_directory_mode(tmp_path):
    previous = os.umask(0o022)
    try:
        log = open_log(tmp_path / "data" / "groups")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(os.stat(log.directory).st_mode) == 0o750
    log.close()


def test_round_trip_through_reopen(tmp_path):
    clock = Clock()
    log = open_log(tmp_path, clock_ms=clock)
    log.stage("group-a", [("orders", 0, 10, None), ("orders", 1, 11, "m1", 5)])
    log.stage("gruppe-ä", [("payments", 3, 2**63 - 1, "métadonnée ✓" * 10)])
    log.stage("group-a", [("orders", 0, 12, "later")])  # the later commit wins
    assert log.sync() == 4
    expected_a = {("orders", 0): (12, "later"), ("orders", 1): (11, "m1")}
    expected_b = {("payments", 3): (2**63 - 1, "métadonnée ✓" * 10)}
    entries = log.entries("group-a")
    log = reopen(log)
    assert log.groups() == ["group-a", "gruppe-ä"]
    assert log.offsets("group-a") == expected_a
    assert log.offsets("gruppe-ä") == expected_b
    assert log.entries("group-a") == entries
    assert log.entries("group-a")[("orders", 1)] == CommittedOffset(11, "m1", 5, 1_700_000_000_001)
    assert log.committed("group-a", "orders", 1) == (11, "m1")
    assert log.committed("group-a", "orders", 2) is None
    assert log.committed("nobody", "orders", 1) is None
    assert log.offsets("nobody") == {}
    report = log.recovery_report
    assert (report.records_read, report.commits_read, report.truncated_bytes) == (4, 4, 0)
    assert log.live_entries == 3


def test_visible_only_after_sync(tmp_path):
    log = open_log(tmp_path)
    assert log.sync() == 0
    assert log.stage("g", [("t", 0, 1, None), ("t", 1, 2, None)]) == 2
    assert (log.offsets("g"), log.groups(), log.staged_commits) == ({}, [], 2)
    size_before = log.size_bytes
    assert os.path.getsize(log_path(log)) == size_before  # nothing written yet
    assert log.sync() == 2
    assert log.offsets("g") == {("t", 0): (1, None), ("t", 1): (2, None)}
    assert (log.staged_commits, log.staged_bytes) == (0, 0)
    assert os.path.getsize(log_path(log)) == log.size_bytes > size_before
    stats = log.statistics()
    assert (stats.syncs, stats.commits_synced, stats.live_entries) == (1, 2, 2)


def test_close_drops_staged_commits(tmp_path):
    log = open_log(tmp_path)
    log.stage("g", [("t", 0, 1, None)])
    log.sync()
    log.stage("g", [("t", 0, 2, None)])
    log = reopen(log)
    assert log.offsets("g") == {("t", 0): (1, None)}


def test_closed_log_refuses_writes(tmp_path):
    log = open_log(tmp_path)
    log.close()
    log.close()  # idempotent
    for call in (lambda: log.stage("g", [("t", 0, 1, None)]), log.sync, log.compact,
                 lambda: log.delete_group("g"), lambda: log.delete_topic("t")):
        with pytest.raises(LogClosedError, match="closed"):
            call()


# -- tombstones -----------------------------------------------------------------------------------

def test_delete_group_and_topic(tmp_path):
    log = open_log(tmp_path)
    log.stage("g1", [("t1", 0, 1, None), ("t2", 0, 2, None)])
    log.stage("g2", [("t1", 0, 3, None), ("t1", 5, 4, None)])
    log.stage("g3", [("t1", 1, 5, None)])
    log.sync()
    log.delete_topic("t1")
    log.delete_group("g1")
    assert log.groups() == ["g1", "g2", "g3"]  # not yet synced
    assert log.sync() == 0
    assert log.groups() == []
    assert (log.live_entries, log.live_bytes) == (0, 0)
    log.stage("g2", [("t3", 0, 9, None)])
    log.sync()
    log = reopen(log)
    assert log.groups() == ["g2"]
    assert log.offsets("g2") == {("t3", 0): (9, None)}
    assert log.recovery_report.tombstones_read == 2


def test_tombstones_apply_in_staged_order(tmp_path):
    log = open_log(tmp_path)
    log.stage("g", [("t", 0, 1, None)])
    log.delete_group("g")
    log.stage("g", [("u", 0, 2, None)])
    log.delete_topic("v")
    log.stage("g", [("v", 0, 3, None)])
    assert log.sync() == 3
    assert log.offsets("g") == {("u", 0): (2, None), ("v", 0): (3, None)}
    assert reopen(log).offsets("g") == {("u", 0): (2, None), ("v", 0): (3, None)}


def test_delete_validates_names(tmp_path):
    log = open_log(tmp_path)
    with pytest.raises(ValueError, match="group id"):
        log.delete_group("")
    with pytest.raises(ValueError, match="topic name"):
        log.delete_topic("no/slash")
    assert log.staged_bytes == 0


# -- compaction -----------------------------------------------------------------------------------

def commit_rounds(log, rounds, partitions=8, groups=2):
    for offset in range(rounds):
        for group in range(groups):
            log.stage(f"group-{group}", [("events", p, offset, f"r{offset}")
                                         for p in range(partitions)])
        log.sync()


def test_compaction_on_open_shrinks_and_keeps_state(tmp_path):
    log = open_log(tmp_path, compact_bytes_min=10**9)
    commit_rounds(log, 50)
    log.delete_group("group-1")
    log.sync()
    state = {group: log.entries(group) for group in log.groups()}
    big = log.size_bytes
    assert log.statistics().compactions == 0
    log = reopen(log, compact_bytes_min=0)
    report = log.recovery_report
    assert report.compacted_from_bytes == big
    assert log.size_bytes == os.path.getsize(log_path(log)) == FILE_HEADER_BYTES + log.live_bytes
    assert log.size_bytes < big / 10
    assert {group: log.entries(group) for group in log.groups()} == state
    log = reopen(log, compact_bytes_min=0)  # nothing to do this time
    assert log.recovery_report.compacted_from_bytes is None
    assert log.recovery_report.tombstones_read == 0  # compaction dropped the tombstone
    assert {group: log.entries(group) for group in log.groups()} == state


def test_compaction_after_sync_bounds_the_file(tmp_path):
    log = open_log(tmp_path, compact_bytes_min=4096, compact_ratio=2.0)
    commit_rounds(log, 200)
    stats = log.statistics()
    assert stats.compactions >= 5
    assert log.size_bytes <= max(4096, 2 * (FILE_HEADER_BYTES + log.live_bytes)) + 2 * 1024
    state = {group: log.offsets(group) for group in log.groups()}
    assert state["group-0"][("events", 7)] == (199, "r199")
    log = reopen(log)
    assert {group: log.offsets(group) for group in log.groups()} == state
    assert not os.path.exists(log_path(log).with_name(LOG_NAME + TMP_SUFFIX))


def test_explicit_compact_keeps_staged_records_staged(tmp_path):
    log = open_log(tmp_path)
    commit_rounds(log, 3)
    log.stage("group-0", [("events", 0, 100, None)])
    log.compact()
    assert log.size_bytes == FILE_HEADER_BYTES + log.live_bytes
    assert log.committed("group-0", "events", 0) == (2, "r2")
    log.sync()
    assert reopen(log).committed("group-0", "events", 0) == (100, None)


def test_leftover_tmp_is_removed_on_open(tmp_path):
    log = open_log(tmp_path)
    commit_rounds(log, 2)
    log.close()
    tmp = log_path(tmp_path).with_name(LOG_NAME + TMP_SUFFIX)
    tmp.write_bytes(b"half a compaction")
    log = open_log(tmp_path)
    assert log.recovery_report.tmp_removed and not tmp.exists()
    assert log.committed("group-1", "events", 3) == (1, "r1")


def test_compaction_ratio_must_exceed_one(tmp_path):
    with pytest.raises(ValueError, match="compact_ratio"):
        open_log(tmp_path, compact_ratio=1.0)
    with pytest.raises(ValueError, match="compact_bytes_min"):
        open_log(tmp_path, compact_bytes_min=-1)


# -- validation -----------------------------------------------------------------------------------

@pytest.mark.parametrize("group, commit, message", [
    ("", ("t", 0, 0, None), "group id .* empty|0 characters"),
    ("g" * 250, ("t", 0, 0, None), "250 characters"),
    (7, ("t", 0, 0, None), "type is int"),
    ("bad\udc80", ("t", 0, 0, None), "UTF-8"),
    ("g", ("", 0, 0, None), "topic name"),
    ("g", ("a b", 0, 0, None), "topic name"),
    ("g", ("t" * 250, 0, 0, None), "topic name"),
    ("g", (b"t", 0, 0, None), "topic name"),
    ("g", ("t", -1, 0, None), "partition -1"),
    ("g", ("t", 2**31, 0, None), "partition"),
    ("g", ("t", True, 0, None), "partition True"),
    ("g", ("t", "0", 0, None), "partition"),
    ("g", ("t", 0, -1, None), "offset -1"),
    ("g", ("t", 0, 2**63, None), "offset"),
    ("g", ("t", 0, 1.0, None), "offset"),
    ("g", ("t", 0, 0, b"meta"), "metadata .* bytes, not a str"),
    ("g", ("t", 0, 0, "é" * 2049), "4098 bytes of UTF-8, more than 4096"),
    ("g", ("t", 0, 0, "\ud800"), "metadata .* UTF-8"),
    ("g", ("t", 0, 0, None, -2), "leader epoch -2"),
    ("g", ("t", 0, 0, None, 2**31), "leader epoch"),
    ("g", ("t", 0, 0), "is not a tuple"),
    ("g", ("t", 0, 0, None, -1, "x"), "is not a tuple"),
    ("g", "t-0-0", "is not a tuple"),
    (["g"], ("t", 0, 0, None), "type is list"),
    ("g", (["t"], 0, 0, None), "topic name"),
    ("g", ("t", 0, 0, ["m"]), "metadata .* list"),
    ("g", ("t", IntSubclass(1), 0, None), "partition"),
])
def test_validation_errors(tmp_path, group, commit, message):
    log = open_log(tmp_path)
    with pytest.raises(ValueError, match=message):
        log.stage(group, [("ok", 0, 0, None), commit])
    assert (log.staged_commits, log.staged_bytes) == (0, 0)  # all or nothing
    assert log.sync() == 0


def test_commits_may_be_lists(tmp_path):
    log = open_log(tmp_path)
    assert log.stage("g", [["t", 0, 5, None], ["t", 1, 6, "m", 2]]) == 2
    log.sync()
    assert log.entries("g")[("t", 1)][:3] == (6, "m", 2)


def test_limits_at_the_edge_are_accepted(tmp_path):
    log = open_log(tmp_path)
    group = "群" * limits.group_id_chars_max  # 3 UTF-8 bytes a character
    commit = ("t" * limits.topic_name_chars_max, 2**31 - 1, 2**63 - 1,
              "m" * limits.offset_metadata_bytes_max, 2**31 - 1)
    log.stage(group, [commit, ("t", 0, 0, "")])
    log.sync()
    log = reopen(log)
    assert log.committed(group, commit[0], commit[1]) == (commit[2], commit[3])
    assert log.committed(group, "t", 0) == (0, "")


def test_staged_bytes_are_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(limits, "offset_log_staged_bytes_max", 1000)
    log = open_log(tmp_path)
    log.stage("g", [("t", p, 0, None) for p in range(10)])
    with pytest.raises(ValueError, match="sync\\(\\) first"):
        log.stage("g", [("t", p, 0, None) for p in range(20)])
    assert log.staged_commits == 10
    assert log.sync() == 10
    log.stage("g", [("t", p, 0, None) for p in range(20)])


# -- the record format ----------------------------------------------------------------------------

def test_commit_record_layout(tmp_path):
    log = open_log(tmp_path, clock_ms=lambda: 1234)
    log.stage("grp", [("top", 7, 42, "md", 3)])
    log.stage("grp", [("top", 8, 43, None)])
    log.delete_topic("top")
    log.sync()
    data = log_path(log).read_bytes()
    assert data[:8] == b"SHMBOFFS"
    assert struct.unpack(">I", data[8:12]) == (1,)
    assert struct.unpack(">I", data[12:16]) == (crc32c(data[:12]),)
    body = (struct.pack(">Bq", 1, 1234) + struct.pack(">H", 3) + b"grp" + struct.pack(">H", 3)
            + b"top" + struct.pack(">iqii", 7, 42, 3, 2) + b"md")
    first = struct.pack(">II", len(body) + 4, crc32c(body)) + body
    body = (struct.pack(">Bq", 1, 1234) + struct.pack(">H", 3) + b"grp" + struct.pack(">H", 3)
            + b"top" + struct.pack(">iqii", 8, 43, -1, -1))
    second = struct.pack(">II", len(body) + 4, crc32c(body)) + body
    body = struct.pack(">Bq", 3, 1234) + struct.pack(">H", 3) + b"top"
    third = struct.pack(">II", len(body) + 4, crc32c(body)) + body
    assert data[16:] == first + second + third


# -- disk failures --------------------------------------------------------------------------------

def _fail_with(error_number, after_bytes=None):
    real_write = os.write
    state = {"written": 0}

    def failing(fd, data):
        if after_bytes is not None and state["written"] < after_bytes:
            count = real_write(fd, bytes(data)[: after_bytes - state["written"]])
            state["written"] += count
            return count
        raise OSError(error_number, os.strerror(error_number))
    return failing


@pytest.mark.parametrize("where", ["write", "partial-write", "fdatasync"])
def test_enospc_keeps_earlier_commits_and_the_log_usable(tmp_path, monkeypatch, where):
    log = open_log(tmp_path)
    log.stage("g", [("t", 0, 1, "kept")])
    log.sync()
    size = log.size_bytes
    log.stage("g", [("t", 0, 2, None), ("t", 1, 2, None)])
    log.delete_group("g")
    if where == "fdatasync":
        def fail_sync(fd):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        monkeypatch.setattr(offset_log_module.os, "fdatasync", fail_sync)
    else:
        monkeypatch.setattr(offset_log_module.os, "write",
                            _fail_with(errno.ENOSPC, 30 if where == "partial-write" else None))
    with pytest.raises(StorageError) as raised:
        log.sync()
    monkeypatch.undo()
    assert "ENOSPC" in str(raised.value) and str(tmp_path) in str(raised.value)
    assert "2 committed offsets" in str(raised.value)
    assert isinstance(raised.value.__cause__, OSError)
    assert os.path.getsize(log_path(log)) == log.size_bytes == size
    assert (log.staged_commits, log.staged_bytes) == (0, 0)
    assert log.offsets("g") == {("t", 0): (1, "kept")}
    log.stage("g", [("t", 1, 3, None)])
    assert log.sync() == 1
    log = reopen(log)
    assert log.offsets("g") == {("t", 0): (1, "kept"), ("t", 1): (3, None)}
    assert log.recovery_report.truncated_bytes == 0


def test_failed_cut_back_makes_the_log_unusable_until_reopened(tmp_path, monkeypatch):
    log = open_log(tmp_path)
    log.stage("g", [("t", 0, 1, None)])
    log.sync()
    log.stage("g", [("t", 0, 2, None)])

    def fail(*args):
        raise OSError(errno.EIO, os.strerror(errno.EIO))
    monkeypatch.setattr(offset_log_module.os, "fdatasync", fail)
    monkeypatch.setattr(offset_log_module.os, "ftruncate", fail)
    with pytest.raises(StorageError, match="EIO"):
        log.sync()
    monkeypatch.undo()
    with pytest.raises(StorageError, match="unusable.*reopen"):
        log.stage("g", [("t", 0, 3, None)])
    assert log.offsets("g") == {("t", 0): (1, None)}
    log = reopen(log)
    # the failed batch's record reached the file whole; recovery may keep it (it was never
    # acknowledged, but it is what the consumer asked for); earlier commits are never lost
    assert log.committed("g", "t", 0) in ((1, None), (2, None))


def test_failed_compaction_is_reported_not_raised(tmp_path, monkeypatch):
    log = open_log(tmp_path, compact_bytes_min=2000)
    real_open = os.open

    def refuse_tmp(path, *args, **kwargs):
        if str(path).endswith(TMP_SUFFIX):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_open(path, *args, **kwargs)
    monkeypatch.setattr(offset_log_module.os, "open", refuse_tmp)
    commit_rounds(log, 40)
    stats = log.statistics()
    assert stats.compactions == 0 and "ENOSPC" in stats.last_compaction_error
    assert stats.commits_synced == 40 * 16
    monkeypatch.undo()
    commit_rounds(log, 40)
    assert log.statistics().compactions >= 1
    assert reopen(log).committed("group-1", "events", 2) == (39, "r39")


def test_unwritable_directory_is_storage_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(StorageError, match="cannot open the offset log"):
        open_log(tmp_path / "file" / "groups")


# -- recovery -------------------------------------------------------------------------------------

def _three_commits(directory):
    log = open_log(directory)
    log.stage("g", [("t", 0, 1, "first")])
    log.sync()
    log.stage("g", [("t", 1, 2, None)])
    log.sync()
    before_last = log.size_bytes
    log.stage("g", [("t", 0, 3, "third, the last record")])
    log.sync()
    end = log.size_bytes
    log.close()
    return before_last, end


def test_torn_tail_at_every_byte_is_cut_to_the_previous_record(tmp_path):
    source = tmp_path / "source"
    before_last, end = _three_commits(source)
    data = log_path(source).read_bytes()
    for cut in range(before_last, end + 1):
        directory = tmp_path / f"cut-{cut}"
        directory.mkdir()
        log_path(directory).write_bytes(data[:cut])
        log = open_log(directory)
        report = log.recovery_report
        if cut == end:
            assert log.committed("g", "t", 0) == (3, "third, the last record")
            assert report.reason is None
            continue
        assert log.offsets("g") == {("t", 0): (1, "first"), ("t", 1): (2, None)}, cut
        assert report.truncated_bytes == cut - before_last
        assert report.valid_bytes == log.size_bytes == before_last
        assert os.path.getsize(log_path(directory)) == before_last
        assert (report.reason is None) == (cut == before_last)
        # and the log goes on from there
        log.stage("g", [("t", 2, 9, None)])
        log.sync()
        log = reopen(log)
        assert log.committed("g", "t", 2) == (9, None) and log.committed("g", "t", 1) == (2, None)
        log.close()
        shutil.rmtree(directory)


def test_flipped_byte_in_the_last_record_is_cut(tmp_path):
    source = tmp_path / "source"
    before_last, end = _three_commits(source)
    data = log_path(source).read_bytes()
    for position in range(before_last, end):
        damaged = bytearray(data)
        damaged[position] ^= 0x40
        directory = tmp_path / f"flip-{position}"
        directory.mkdir()
        log_path(directory).write_bytes(damaged)
        log = open_log(directory)
        assert log.offsets("g") == {("t", 0): (1, "first"), ("t", 1): (2, None)}, position
        report = log.recovery_report
        assert report.first_bad_position == before_last and report.reason, position
        assert report.truncated_bytes == end - before_last
        log.close()
        shutil.rmtree(directory)


def test_damaged_record_in_the_middle_cuts_the_rest(tmp_path):
    before_last, end = _three_commits(tmp_path)
    data = bytearray(log_path(tmp_path).read_bytes())
    data[FILE_HEADER_BYTES + 10] ^= 1  # inside the first record
    log_path(tmp_path).write_bytes(data)
    log = open_log(tmp_path)
    assert log.groups() == []
    assert "crc mismatch" in log.recovery_report.reason
    assert log.recovery_report.first_bad_position == FILE_HEADER_BYTES


@pytest.mark.parametrize("content, message", [
    (b"", "shorter than the 16-byte header"),
    (b"SHMBOFF", "shorter than the 16-byte header"),
    (b"NOTOURS!" + bytes(8), "magic"),
    (b"SHMBOFFS" + bytes(8), "CRC"),
])
def test_bad_file_header_is_storage_error(tmp_path, content, message):
    log_path(tmp_path).write_bytes(content)
    with pytest.raises(StorageError, match=message):
        open_log(tmp_path)
    assert log_path(tmp_path).read_bytes() == content  # left for a person to look at


def test_future_version_is_storage_error(tmp_path):
    head = b"SHMBOFFS" + struct.pack(">I", 2)
    log_path(tmp_path).write_bytes(head + struct.pack(">I", crc32c(head)))
    with pytest.raises(StorageError, match="format version 2"):
        open_log(tmp_path)


# -- a real SIGKILL --------------------------------------------------------------------------------

_COMMITTER = """
import sys
from shmbroker.storage.offset_log import OffsetLog
log = OffsetLog(sys.argv[1])
start = max([offset for offset, _ in log.offsets("g").values()], default=-1) + 1
for offset in range(start, start + 10**9):
    for partition in range(16):
        log.stage("g", [("t", partition, offset, "x" * (offset % 50))])
    assert log.sync() == 16
    print(offset, flush=True)  # acknowledged
"""


@pytest.mark.fault
def test_acknowledged_commits_survive_sigkill(tmp_path):
    directory = tmp_path / "groups"
    acknowledged = -1
    for round_number in range(3):
        child = subprocess.Popen([sys.executable, "-c", _COMMITTER, str(directory)],
                                 stdout=subprocess.PIPE, text=True)
        try:
            for _ in range(100 + 37 * round_number):
                acknowledged = int(child.stdout.readline())
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
            child.stdout.close()
        log = open_log(directory)
        offsets = log.offsets("g")
        assert len(offsets) == 16
        for (_, partition), (offset, metadata) in offsets.items():
            # the batch after the last acknowledged one may have been synced, not yet printed
            assert offset in (acknowledged, acknowledged + 1), (partition, offset, acknowledged)
            assert metadata == "x" * (offset % 50)
        log.close()
