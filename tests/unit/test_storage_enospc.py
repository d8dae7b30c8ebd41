"""A full disk (and other write errors) under the storage layer, injected without mounting.

:class:`DiskFaults` wraps ``os.write``, ``os.pwrite``, ``os.ftruncate``, ``os.open``, ``os.fsync``
and ``os.fdatasync`` for files under one directory: it models a disk with ``free_bytes`` left,
where a write that does not fit writes what fits (a short write) and the next one fails with
ENOSPC, as Linux does.  Everything outside the directory (pytest's own files) is untouched.

What is checked: a failed append, roll, index write, commit or metadata change leaves every file
as it was before the call; the error says the disk is full; the next call works as soon as space
is back, without a reopen; and the files reopen (after a crash or a clean close) holding exactly
the acknowledged data.  Hypothesis explores where the disk fills; a failure prints the example
(and ``--hypothesis-seed`` replays it).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from storage_helpers import (
    SMALL_CONFIG,
    FakeClock,
    base_offset_of,
    segment_logs,
    sized_batch,
    with_base_offset,
)

from shmbroker.errors import StorageError, StorageFullError
from shmbroker.format.record_batch import read_header
from shmbroker.storage.checkpoint_file import CheckpointFile
from shmbroker.storage.offset_log import OffsetLog
from shmbroker.storage.partition_log import RECOVERY_POINT_CHECKPOINT, PartitionLog
from shmbroker.supervisor.meta_store import MetaStore

pytestmark = pytest.mark.fault

_REAL = {name: getattr(os, name)
         for name in ("write", "pwrite", "ftruncate", "open", "fsync", "fdatasync")}


class DiskFaults:
    """Injected file-system faults for the files under ``root`` (see the module docstring).

    ``free_bytes``: None for a disk with room; else every byte written (write, pwrite, and
    ftruncate growing a file when ``sparse`` is False) takes one, until none is left.
    ``fsync_errno``: fsync and fdatasync fail with it.  ``ftruncate_errno``: ftruncate fails
    with it.  ``create_errno``: creating a file fails with it.  :meth:`fail_write`: one write
    or pwrite call fails.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
        self.root = os.fspath(root)
        self.free_bytes: int | None = None
        self.sparse = True
        self.fsync_errno: int | None = None
        self.ftruncate_errno: int | None = None
        self.create_errno: int | None = None
        self.fail_write_number: int | None = None
        self.fail_errno = errno.EIO
        self.fail_partial_bytes = 0
        self.writes = 0
        self.failures = 0
        for name in _REAL:
            monkeypatch.setattr(os, name, getattr(self, "_" + name))

    def fail_write(self, number: int, error_number: int, partial_bytes: int = 0) -> None:
        """The ``number``-th write or pwrite from now (1: the next) writes ``partial_bytes`` of
        its data, then fails with ``error_number``."""
        self.fail_write_number = self.writes + number
        self.fail_errno, self.fail_partial_bytes = error_number, partial_bytes

    def room(self) -> None:
        """Space is back and every fault is gone."""
        self.free_bytes = None
        self.fsync_errno = self.ftruncate_errno = self.create_errno = None
        self.fail_write_number = None

    def _ours(self, fd: int) -> bool:
        try:
            return os.readlink(f"/proc/self/fd/{fd}").startswith(self.root)
        except OSError:
            return False

    def _fail(self, number: int) -> None:
        self.failures += 1
        raise OSError(number, os.strerror(number))

    def _take(self, size: int) -> int:
        """How many of ``size`` bytes may be written now (raises ENOSPC when none)."""
        self.writes += 1
        if self.fail_write_number is not None and self.writes == self.fail_write_number:
            if 0 < self.fail_partial_bytes < size:
                return -self.fail_partial_bytes  # written, then the error
            self._fail(self.fail_errno)
        if self.free_bytes is None or size == 0:
            return size
        if self.free_bytes == 0:
            self._fail(errno.ENOSPC)
        allowed = min(size, self.free_bytes)
        self.free_bytes -= allowed
        return allowed

    def _write(self, fd: int, data: bytes) -> int:
        if not self._ours(fd):
            return _REAL["write"](fd, data)
        allowed = self._take(len(data))
        if allowed < 0:
            _REAL["write"](fd, memoryview(data)[:-allowed])
            self._fail(self.fail_errno)
        return _REAL["write"](fd, memoryview(data)[:allowed])

    def _pwrite(self, fd: int, data: bytes, position: int) -> int:
        if not self._ours(fd):
            return _REAL["pwrite"](fd, data, position)
        allowed = self._take(len(data))
        if allowed < 0:
            _REAL["pwrite"](fd, memoryview(data)[:-allowed], position)
            self._fail(self.fail_errno)
        return _REAL["pwrite"](fd, memoryview(data)[:allowed], position)

    def _ftruncate(self, fd: int, size: int) -> None:
        if self._ours(fd):
            if self.ftruncate_errno is not None:
                self._fail(self.ftruncate_errno)
            grow = size - os.fstat(fd).st_size
            if not self.sparse and grow > 0 and self.free_bytes is not None:
                if grow > self.free_bytes:
                    self._fail(errno.ENOSPC)
                self.free_bytes -= grow
        _REAL["ftruncate"](fd, size)

    def _open(self, path, flags, mode=0o777, *, dir_fd=None):  # noqa: ANN001 - os.open's
        if (self.create_errno is not None and flags & os.O_CREAT
                and os.fspath(path).startswith(self.root) and not os.path.exists(path)):
            self._fail(self.create_errno)
        return _REAL["open"](path, flags, mode, dir_fd=dir_fd)

    def _fsync(self, fd: int) -> None:
        if self.fsync_errno is not None and self._ours(fd):
            self._fail(self.fsync_errno)
        _REAL["fsync"](fd)

    def _fdatasync(self, fd: int) -> None:
        if self.fsync_errno is not None and self._ours(fd):
            self._fail(self.fsync_errno)
        _REAL["fdatasync"](fd)


@pytest.fixture
def disk(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> DiskFaults:
    return DiskFaults(monkeypatch, tmp_path)


def _open(directory: Path, config=SMALL_CONFIG) -> PartitionLog:
    return PartitionLog(directory, config, clock_ms=FakeClock(), name="t/0")


def _check_after_crash(log: PartitionLog, directory: Path, acked: list[tuple[int, bytes]],
                       config=SMALL_CONFIG) -> None:
    """Crash ``log`` (nothing flushed or trimmed), reopen it: recovery cuts nothing and the log
    still holds exactly the acknowledged batches."""
    log.abandon()
    log = _open(directory, config)
    assert log.recovery_report.bytes_truncated == 0 and not log.recovery_report.segments_deleted
    _check_holds(log, acked)
    log.close()


def _files(directory: Path) -> dict[str, bytes]:
    """Every file of a partition directory and its bytes (zero tails of preallocated indexes
    included), to compare before and after a failed call."""
    return {name: (directory / name).read_bytes() for name in sorted(os.listdir(directory))}


def _check_holds(log: PartitionLog, acked: list[tuple[int, bytes]]) -> None:
    """``log`` holds exactly the acknowledged batches, each at its offset, and no more."""
    for offset, batch in acked:
        assert log.read_bytes(offset, 1) == with_base_offset(batch, offset)
    end = read_header(acked[-1][1]).last_offset_delta + acked[-1][0] + 1 if acked else 0
    assert log.log_end_offset == end


def _batch(number: int) -> bytes:
    return sized_batch(1 + number % 4, 20 + number * 37 % 300, 1000 + number, tag=number)


# -- the partition log --------------------------------------------------------------------------

def test_full_disk_error_is_clear_and_changes_nothing(tmp_path, disk):
    directory = tmp_path / "p"
    log = _open(directory)
    acked = [(log.append(_batch(n)).first_offset, _batch(n)) for n in range(5)]
    before = _files(directory)
    disk.free_bytes = 100  # less than the next batch: a short write, then ENOSPC
    with pytest.raises(StorageFullError) as raised:
        log.append(_batch(5))
    message = str(raised.value)
    assert message.startswith("partition t/0: cannot append: No space left on device (")
    assert "00000000000000000000.log) [ENOSPC]" in message and "nothing was stored" in message
    assert log.append_failure == message
    assert _files(directory) == before
    _check_holds(log, acked)
    with pytest.raises(StorageFullError):  # still full: the same, nothing changes
        log.append(_batch(6))
    assert _files(directory) == before
    disk.room()
    result = log.append(_batch(7))
    assert result.first_offset == log.log_end_offset - read_header(_batch(7)).records_count
    assert log.append_failure is None
    acked.append((result.first_offset, _batch(7)))
    _check_holds(log, acked)
    _check_after_crash(log, directory, acked)


def test_other_write_errors_are_storage_errors_not_full(tmp_path, disk):
    log = _open(tmp_path / "p")
    log.append(_batch(0))
    disk.fail_write(1, errno.EIO, 30)
    with pytest.raises(StorageError, match=r"Input/output error .*\[EIO\]") as raised:
        log.append(_batch(1))
    assert not isinstance(raised.value, StorageFullError)
    disk.room()
    assert log.append(_batch(2)).first_offset == 1
    log.close()


@pytest.mark.parametrize("where", ["log-create", "index-create", "index-size"])
def test_roll_that_cannot_create_its_segment_leaves_no_half_made_one(tmp_path, disk, where,
                                                                     monkeypatch):
    directory = tmp_path / "p"
    config = SMALL_CONFIG.replace(segment_bytes=600)
    log = _open(directory, config)
    acked = [(log.append(_batch(n)).first_offset, _batch(n)) for n in range(3)]
    while log.active_segment.size_bytes + len(_batch(9)) <= 600:  # the next batch rolls
        acked.append((log.append(_batch(9)).first_offset, _batch(9)))
    before, segments = _files(directory), len(log.segments)
    if where == "log-create":
        disk.create_errno = errno.ENOSPC
    elif where == "index-create":  # the .log and .index are made, the .timeindex is not
        def refuse_index(path, flags, mode=0o777, *, dir_fd=None):  # noqa: ANN001
            if os.fspath(path).endswith(".timeindex") and flags & os.O_CREAT:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return disk._open(path, flags, mode, dir_fd=dir_fd)

        monkeypatch.setattr(os, "open", refuse_index)
    else:
        disk.sparse = False  # a file system without sparse files: preallocation needs space
        disk.free_bytes = 10
    with pytest.raises(StorageFullError, match="No space left on device"):
        log.append(_batch(10))
    assert _files(directory) == before
    disk.room()
    monkeypatch.setattr(os, "open", disk._open)
    disk.sparse = True
    result = log.append(_batch(10))
    acked.append((result.first_offset, _batch(10)))
    assert len(log.segments) == segments + 1
    _check_holds(log, acked)
    _check_after_crash(log, directory, acked, config)


def test_index_write_failure_undoes_the_log_write_too(tmp_path, disk):
    """The entries that need file space no write has reached (here the index's first block)
    are written in the append itself, so a full disk fails that append, not a later sync."""
    directory = tmp_path / "p"
    log = _open(directory)
    acked = [(log.append(_batch(0)).first_offset, _batch(0))]
    assert log.active_segment.offset_index.entries_count == 0  # no entry for position 0
    before = _files(directory)
    disk.fail_write(2, errno.ENOSPC)  # 1: the .log, 2: the .index
    with pytest.raises(StorageFullError, match=r"\.index\) \[ENOSPC\]"):
        log.append(_batch(1) + _batch(2) + _batch(3))  # more than index_interval_bytes: indexed
    assert _files(directory) == before
    assert log.active_segment.offset_index.entries_count == 0
    disk.room()
    for number in (4, 5, 6):
        acked.append((log.append(_batch(number)).first_offset, _batch(number)))
    log.close()
    log = _open(directory)
    assert all(not segment.scanned for segment in log.recovery_report.segments)
    _check_holds(log, acked)
    log.close()


def test_index_entries_in_a_written_block_wait_for_the_checkpoint(tmp_path, disk):
    """Once an index block was written, entries in it wait (no pwrite an append); syncing the
    indexes (what the recovery-point checkpoint does first) writes them, and a crash before
    that loses nothing (recovery rescans past the checkpoint)."""
    directory = tmp_path / "p"
    log = _open(directory)
    acked = [(log.append(_batch(n)).first_offset, _batch(n)) for n in range(4)]
    index = log.active_segment.offset_index
    assert index.entries_count > 0
    index_path = Path(index.path)
    on_disk = index_path.read_bytes()
    writes = disk.writes
    result = log.append(_batch(4) + _batch(5))
    acked += zip(result.base_offsets, (_batch(4), _batch(5)))
    assert disk.writes == writes + 1  # the .log only
    assert index_path.read_bytes() == on_disk
    log.active_segment.flush_indexes()
    written = index_path.read_bytes()[: index.entries_count * index.ENTRY_SIZE]
    assert written == b"".join(index.ENTRY_STRUCT.pack(int(key), int(value))
                               for key, value in zip(index.keys, index.values))
    acked.append((log.append(_batch(6)).first_offset, _batch(6)))
    assert index_path.read_bytes() == written + bytes(len(on_disk) - len(written))
    _check_after_crash(log, directory, acked)


def test_a_cut_that_fails_blocks_appends_until_one_works(tmp_path, disk):
    directory = tmp_path / "p"
    log = _open(directory)
    acked = [(log.append(_batch(0)).first_offset, _batch(0))]
    disk.fail_write(1, errno.EIO, 40)
    disk.ftruncate_errno = errno.EIO
    with pytest.raises(StorageError, match="EIO"):
        log.append(_batch(1))
    assert log.active_segment.cut_pending is not None
    assert os.path.getsize(segment_logs(directory)[0]) == len(_batch(0)) + 40  # torn bytes
    disk.fail_write_number = None
    with pytest.raises(StorageError):  # refused, not written after the torn bytes
        log.append(_batch(2))
    assert os.path.getsize(segment_logs(directory)[0]) == len(_batch(0)) + 40
    disk.ftruncate_errno = None
    acked.append((log.append(_batch(3)).first_offset, _batch(3)))
    assert log.active_segment.cut_pending is None
    _check_holds(log, acked)
    _check_after_crash(log, directory, acked)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sizes=st.lists(st.integers(0, 40), min_size=4, max_size=25),
       free_bytes=st.integers(0, 6000), space_back_after=st.integers(0, 6),
       crash=st.booleans())
def test_disk_fills_anywhere_and_reopens_with_exactly_the_acked(
        tmp_path_factory, monkeypatch, sizes, free_bytes, space_back_after, crash):
    """Fill the disk at a random byte (log or index, mid-batch or mid-roll), keep appending while
    it is full, free it, append again; the log then reopens with exactly the acknowledged
    batches, and no torn bytes to cut."""
    directory = tmp_path_factory.mktemp("p")
    config = SMALL_CONFIG.replace(segment_bytes=1500, index_interval_bytes=100)
    with monkeypatch.context() as patch:
        disk = DiskFaults(patch, directory)
        log = _open(directory, config)
        disk.free_bytes = free_bytes
        acked: list[tuple[int, bytes]] = []
        failures_in_a_row = 0
        for number, size in enumerate(sizes):
            batch = sized_batch(1 + size % 3, 10 + size * 7, 1000 + number, tag=number)
            end_before = log.log_end_offset
            try:
                result = log.append(batch + _batch(size) if size % 5 == 0 else batch)
            except StorageFullError as error:
                assert "No space left on device" in str(error)
                assert log.log_end_offset == end_before
                failures_in_a_row += 1
                if failures_in_a_row > space_back_after:
                    disk.room()
                continue
            failures_in_a_row = 0
            acked.append((result.first_offset, batch))
            if size % 5 == 0:
                acked.append((result.base_offsets[1], _batch(size)))
        _check_holds(log, acked)
        disk.room()
        number = len(sizes)
        result = log.append(_batch(number))  # space is back: works at once, no reopen
        acked.append((result.first_offset, _batch(number)))
        if crash:
            log.abandon()
        else:
            log.close()
    log = _open(directory, config)
    assert log.recovery_report.bytes_truncated == 0
    _check_holds(log, acked)
    log.close()


def test_failed_fsync_fences_the_log(tmp_path, disk, caplog):
    directory = tmp_path / "p"
    log = _open(directory, SMALL_CONFIG.replace(flush_messages=2))
    acked = [(log.append(_batch(0)).first_offset, _batch(0))]
    assert log.flushed_offset == 0
    disk.fsync_errno = errno.EIO
    with pytest.raises(StorageError, match=r"partition t/0: fsync failed \(EIO"):
        log.append(_batch(1))  # written, then its flush failed: reported failed, maybe kept
    assert log.fenced is not None and "fsync failed" in log.fenced
    assert "log fenced" in caplog.text
    disk.room()  # even with a working disk: no retried fsync that would claim durability
    with pytest.raises(StorageError, match="refuses writes until it is reopened"):
        log.append(_batch(2))
    with pytest.raises(StorageError, match="refuses writes"):
        log.flush()
    assert log.read_bytes(0, 1) == with_base_offset(_batch(0), 0)  # reads go on
    with pytest.raises(StorageError, match="closed without a clean shutdown"):
        log.close()
    assert log.is_closed
    recovery = CheckpointFile(directory / RECOVERY_POINT_CHECKPOINT).read()
    assert recovery == {"recovery_point_offset": 0, "clean_shutdown": 0}
    log = _open(directory)
    assert log.recovery_report.segments_scanned == 1  # from the durable point, with CRCs
    assert log.log_end_offset >= acked[-1][0] + 1
    _check_holds(log, acked + [(1, _batch(1))])  # the page cache kept it (at least once)
    log.close()


def test_checkpoints_on_a_full_disk_do_not_stop_the_log(tmp_path, disk):
    directory = tmp_path / "p"
    log = _open(directory)
    acked = [(log.append(_batch(n)).first_offset, _batch(n)) for n in range(4)]
    log.close()  # recovery checkpoint: clean_shutdown 1
    disk.free_bytes = 0
    log = _open(directory)  # cannot mark the shutdown unclean: the stale "clean" one goes
    assert not os.path.exists(directory / RECOVERY_POINT_CHECKPOINT)
    _check_holds(log, acked)
    with pytest.raises(StorageFullError):
        log.append(_batch(4))
    disk.room()
    acked.append((log.append(_batch(5)).first_offset, _batch(5)))
    log.abandon()  # a crash: nothing may trust the old "clean shutdown"
    log = _open(directory)
    assert log.recovery_report.segments_scanned >= 1
    _check_holds(log, acked)
    disk.free_bytes = 0
    log.close()  # the clean-shutdown checkpoint cannot be written: not clean, still closed
    assert log.is_closed
    disk.room()
    log = _open(directory)
    assert log.recovery_report.segments_scanned >= 1
    _check_holds(log, acked)
    log.close()


@pytest.mark.parametrize("which", ["active", "sealed"])
def test_recovery_on_a_full_disk_that_must_rewrite_an_index(tmp_path, disk, which):
    directory = tmp_path / "p"
    config = SMALL_CONFIG.replace(segment_bytes=700)
    log = _open(directory, config)
    acked = [(log.append(_batch(n)).first_offset, _batch(n)) for n in range(12)]
    log.close()
    logs = segment_logs(directory)
    assert len(logs) >= 3
    index = (logs[-1] if which == "active" else logs[0])[:-4] + ".index"
    Path(index).write_bytes(b"\xff" * 16)  # keys do not increase: the open must rebuild it
    disk.free_bytes = 0
    log = _open(directory, config)
    _check_holds(log, acked)
    for offset, _ in acked:  # lookups go through the rebuilt in-memory index
        assert base_offset_of(log.read_bytes(offset, 1)) == offset
    with pytest.raises(StorageFullError):
        log.append(_batch(20))
    disk.room()
    acked.append((log.append(_batch(21)).first_offset, _batch(21)))
    log.close()
    log = _open(directory, config)
    scanned = [segment for segment in log.recovery_report.segments if segment.scanned]
    if which == "active":  # the zero file got every entry with the next append: no scan
        assert not scanned
    else:  # removed on the full disk: rebuilt now
        assert len(scanned) == 1 and "missing" in scanned[0].reason
    _check_holds(log, acked)
    log.close()


# -- committed offsets and topic metadata -------------------------------------------------------

def test_offset_log_commits_on_a_full_disk(tmp_path, disk):
    directory = tmp_path / "groups"
    offsets = OffsetLog(directory, compact_bytes_min=1 << 30)
    acked: dict[tuple[str, int], int] = {}
    disk.free_bytes = 700
    refused = 0
    for number in range(100):  # about 60 bytes a commit: the disk fills within 12
        offsets.stage("g", [("t", number % 7, number, None)])
        try:
            offsets.sync()
        except StorageFullError as error:
            assert "ENOSPC (No space left on device)" in str(error)
            refused += 1
            if refused == 3:
                break
            continue
        acked["t", number % 7] = number
    assert refused == 3 and acked
    assert offsets.offsets("g") == {key: (offset, None) for key, offset in acked.items()}
    disk.room()
    offsets.stage("g", [("t", 0, 1000, None)])
    assert offsets.sync() == 1  # space is back: works at once
    acked["t", 0] = 1000
    offsets.close()
    reopened = OffsetLog(directory)
    assert reopened.recovery_report.truncated_bytes == 0
    assert reopened.offsets("g") == {key: (offset, None) for key, offset in acked.items()}
    reopened.close()


def test_create_topic_on_a_full_disk(tmp_path, disk):
    meta_dir = tmp_path / "meta"
    store = MetaStore(meta_dir)
    store.create("kept", 2)
    snapshot = (meta_dir / "topics.json").read_bytes()
    disk.free_bytes = 10
    with pytest.raises(StorageFullError, match="No space left on device; nothing was changed"):
        store.create("new", 1)
    assert (meta_dir / "topics.json").read_bytes() == snapshot
    assert os.listdir(meta_dir) == ["topics.json"]  # the torn .tmp is gone
    assert [topic.name for topic in store.topics()] == ["kept"]
    disk.room()
    store.create("new", 1)
    assert [topic.name for topic in MetaStore(meta_dir).topics()] == ["kept", "new"]
