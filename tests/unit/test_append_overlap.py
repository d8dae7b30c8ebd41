"""Appends that check their batches on the overlap helper thread while writing them.

``limits.append_overlap_bytes_min`` is lowered here so that small batches take the overlapped
path; every outcome (what is stored, what is refused and with which message) must be the one of
the same append checked first.
"""

import errno
import os
import struct
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from storage_helpers import SMALL_CONFIG, FakeClock, chain_lie, sized_batch

from shmbroker import limits
from shmbroker.errors import CorruptRecordError, StorageError
from shmbroker.storage import overlap
from shmbroker.storage import segment as segment_module
from shmbroker.storage.partition_log import PartitionLog

CONFIG = SMALL_CONFIG.replace(segment_bytes=16 * 1024)


@pytest.fixture
def helper_calls(monkeypatch):
    """Every append overlaps (that goes whole into one segment); the list records each
    hand-off tried (False: the helper was busy)."""
    monkeypatch.setattr(limits, "append_overlap_bytes_min", 0)
    calls = []
    real_start = overlap.Overlap.start

    def start(self, function, *args):
        started = real_start(self, function, *args)
        calls.append(started)
        return started

    monkeypatch.setattr(overlap.Overlap, "start", start)
    return calls


def _bad_crc() -> bytes:
    batch = bytearray(sized_batch(2, 20))
    batch[-1] ^= 0xFF
    return bytes(batch)


def _files(directory):
    """Every file of the partition directory and its bytes (indexes included)."""
    return {name: (directory / name).read_bytes() for name in sorted(os.listdir(directory))}


def _open(path, config=CONFIG):
    return PartitionLog(path, config, clock_ms=FakeClock())


@pytest.mark.parametrize("where", [0, 2, 4])
@pytest.mark.parametrize("bad", [chain_lie, _bad_crc])
def test_a_bad_batch_in_an_overlapped_append_stores_nothing(tmp_path, helper_calls, where, bad):
    log = _open(tmp_path / "p0")
    log.append(sized_batch(2, 30))
    log.flush()
    before = _files(tmp_path / "p0")
    batches = [sized_batch(2, 40, tag=number) for number in range(5)]
    batches[where] = bad()
    helper_calls.clear()
    with pytest.raises(CorruptRecordError) as caught:
        log.append(b"".join(batches))
    assert helper_calls == [True]
    assert caught.value.position == sum(len(batch) for batch in batches[:where])
    if bad is chain_lie:
        assert f"batch {where}: " in str(caught.value)
    else:
        assert "CRC-32C mismatch" in str(caught.value)
    assert log.log_end_offset == 2
    assert _files(tmp_path / "p0") == before
    assert log.append(sized_batch(1, 10) + sized_batch(1, 10)).base_offsets == [2, 3]
    assert log.read_bytes(2, 1)[8:] == sized_batch(1, 10)[8:]
    log.close()
    log = _open(tmp_path / "p0")
    assert log.log_end_offset == 4
    log.close()


def test_an_overlapped_append_into_a_new_segment_is_undone_whole(tmp_path, helper_calls):
    log = _open(tmp_path / "p0")
    while log.size_bytes < CONFIG.segment_bytes - 500:
        log.append(sized_batch(4, 200))
    end = log.log_end_offset
    before = _files(tmp_path / "p0")
    helper_calls.clear()
    # 2 batches of ~1 KiB each do not fit in what is left: the call rolls, then goes whole
    # into the new segment (overlapped); the bad second batch undoes the roll too
    with pytest.raises(CorruptRecordError, match="batch 1: "):
        log.append(sized_batch(4, 250) + chain_lie(40))
    assert helper_calls == [True]
    assert _files(tmp_path / "p0") == before
    assert len(log.segments) == 1 and log.log_end_offset == end
    log.append(sized_batch(4, 250) + sized_batch(4, 250))
    assert len(log.segments) == 2 and log.log_end_offset == end + 8
    log.close()


def test_a_call_split_between_segments_is_checked_before_it_is_written(tmp_path, helper_calls,
                                                                      monkeypatch):
    log = _open(tmp_path / "p0")
    while log.size_bytes < CONFIG.segment_bytes - 1500:
        log.append(sized_batch(4, 200))
    writes = []
    real_write = segment_module.os.write
    monkeypatch.setattr(segment_module.os, "write",
                        lambda fd, data: writes.append(len(data)) or real_write(fd, data))
    batches = [sized_batch(4, 250, tag=number) for number in range(3)] + [chain_lie()]
    helper_calls.clear()
    with pytest.raises(CorruptRecordError, match="batch 3: "):
        log.append(b"".join(batches))
    assert helper_calls == [] and writes == []  # refused before the first byte
    log.close()


def test_one_big_batch_overlaps_too(tmp_path, helper_calls):
    log = _open(tmp_path / "p0")
    with pytest.raises(CorruptRecordError, match="batch 0: "):
        log.append(chain_lie(200))
    assert helper_calls == [True] and log.size_bytes == 0
    assert log.append(sized_batch(200, 20)).base_offsets == [0]
    assert helper_calls == [True, True] and log.log_end_offset == 200
    log.close()


def test_a_busy_helper_means_the_append_checks_first(tmp_path, helper_calls):
    log = _open(tmp_path / "p0")
    release = threading.Event()
    assert overlap.OVERLAP.start(release.wait)  # another thread's append, say
    try:
        with pytest.raises(CorruptRecordError):
            log.append(sized_batch(2, 40) + _bad_crc())
        assert helper_calls == [True, False]
        assert log.log_end_offset == 0 and log.size_bytes == 0
        assert log.append(sized_batch(2, 40) + sized_batch(1, 40)).base_offsets == [0, 2]
    finally:
        release.set()
        assert overlap.OVERLAP.wait() is None
    log.close()


def test_a_disk_error_during_an_overlapped_append(tmp_path, helper_calls, monkeypatch):
    log = _open(tmp_path / "p0")
    log.append(sized_batch(2, 30))
    before = _files(tmp_path / "p0")
    real_write = segment_module.os.write

    def short_then_full(fd, data):
        real_write(fd, bytes(data)[:11])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(segment_module.os, "write", short_then_full)
    helper_calls.clear()
    good = sized_batch(2, 40) + sized_batch(3, 40)
    with pytest.raises(StorageError, match="No space left on device"):
        log.append(good)
    # a bad batch outranks the disk error: it is what a check first would have found
    with pytest.raises(CorruptRecordError, match="batch 1: "):
        log.append(sized_batch(2, 40) + chain_lie())
    monkeypatch.setattr(segment_module.os, "write", real_write)
    assert helper_calls == [True, True]
    assert _files(tmp_path / "p0") == before
    assert log.append(good).base_offsets == [2, 4]
    log.close()


_DAMAGE = st.sampled_from(["none", "crc", "chain", "count", "truncated"])


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sizes=st.lists(st.tuples(st.integers(1, 12), st.integers(0, 300)), min_size=1,
                      max_size=8),
       damage=st.lists(st.tuples(st.integers(0, 7), _DAMAGE), max_size=3),
       calls=st.integers(1, 4))
def test_overlapped_and_checked_first_appends_agree(tmp_path_factory, monkeypatch, sizes, damage,
                                                    calls):
    """The same calls into two logs, one overlapping every append, one checking first: the same
    results, the same errors (message included) and the same files."""
    buffers = []
    for call in range(calls):
        batches = [sized_batch(records, value_bytes, tag=call * 10 + number)
                   for number, (records, value_bytes) in enumerate(sizes)]
        for number, kind in damage:
            if number < len(batches) and kind != "none":
                batches[number] = {"crc": _bad_crc, "chain": chain_lie,
                                   "count": lambda: chain_lie()[:23] + struct.pack(">i", 9)
                                   + chain_lie()[27:],
                                   "truncated": lambda: sized_batch(2, 9)[:-3]}[kind]()
        buffers.append(b"".join(batches))
    outcomes = []
    for overlapped in (True, False):
        monkeypatch.setattr(limits, "append_overlap_bytes_min", 0 if overlapped else 1 << 40)
        directory = tmp_path_factory.mktemp("log")
        log = _open(directory)
        results = []
        for buffer in buffers:
            try:
                results.append(log.append(buffer).base_offsets)
            except CorruptRecordError as error:
                results.append(str(error))
        log.close()
        outcomes.append((results, _files(directory)))
    assert outcomes[0] == outcomes[1]


def test_configure_auto_needs_four_cpus(monkeypatch):
    monkeypatch.setattr(overlap.OVERLAP, "enabled", True)
    for cpus, expected in ((1, False), (3, False), (4, True), (64, True)):
        monkeypatch.setattr(overlap, "usable_cpus", lambda cpus=cpus: cpus)
        assert overlap.configure("auto") is expected
        assert overlap.OVERLAP.enabled is expected
    assert overlap.configure("on") is True
    assert overlap.configure("off") is False
    assert not overlap.OVERLAP.start(print)  # off: the caller checks
    with pytest.raises(ValueError, match="'auto', 'on' or 'off'"):
        overlap.configure("sometimes")


def test_a_helper_turned_off_means_the_append_checks_first(tmp_path, helper_calls, monkeypatch):
    monkeypatch.setattr(overlap.OVERLAP, "enabled", False)
    log = _open(tmp_path / "p0")
    with pytest.raises(CorruptRecordError, match="batch 1: "):
        log.append(sized_batch(2, 40) + chain_lie())
    assert helper_calls == [False] and log.size_bytes == 0
    log.close()


def test_an_interrupt_while_waiting_for_the_helper_undoes_and_frees_it(tmp_path, helper_calls,
                                                                       monkeypatch):
    log = _open(tmp_path / "p0")
    log.append(sized_batch(2, 30))
    before = _files(tmp_path / "p0")
    real_wait = overlap.Overlap.wait
    interrupts = []

    def interrupted_wait(self):
        if not interrupts:  # the first wait is interrupted (Ctrl-C); the undo waits again
            interrupts.append(True)
            raise KeyboardInterrupt
        return real_wait(self)

    monkeypatch.setattr(overlap.Overlap, "wait", interrupted_wait)
    helper_calls.clear()
    with pytest.raises(KeyboardInterrupt):
        log.append(sized_batch(2, 40) + sized_batch(2, 40))
    assert _files(tmp_path / "p0") == before and log.log_end_offset == 2
    assert log.append(sized_batch(2, 40) + sized_batch(2, 40)).base_offsets == [2, 4]
    assert helper_calls == [True, True]  # the helper was free again
    log.close()


@pytest.mark.parametrize("on_helper", [False, True])
def test_check_s_counts_the_checks_or_the_wait_for_the_helper(tmp_path, monkeypatch, helper_calls,
                                                             on_helper):
    """What the worker's stall warnings call "checking": the checks run on the appending thread,
    or its wait for the helper thread that runs them; a slow check shows there whichever ran it
    (and not in write_s)."""
    monkeypatch.setattr(overlap.OVERLAP, "enabled", on_helper)
    real_check = PartitionLog._check_batches
    checked_on = []

    def slow_check(self, *args):
        checked_on.append(threading.current_thread() is threading.main_thread())
        threading.Event().wait(0.05)  # a check thread that got no core in time
        return real_check(self, *args)

    monkeypatch.setattr(PartitionLog, "_check_batches", slow_check)
    log = _open(tmp_path / "p0")
    log.append(sized_batch(3, 10))
    assert checked_on == [not on_helper] and helper_calls == ([True] if on_helper else [False])
    assert log.check_s >= 0.045 and log.write_s < 0.045
    log.close()
