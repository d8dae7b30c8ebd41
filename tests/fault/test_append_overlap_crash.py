"""A crash while an overlapped append's batches are written but not yet checked (see
APPEND_OVERLAP in shmbroker/storage/partition_log.py): the next open keeps the good batches and
cuts the bad one, as the append itself would have refused it."""

import os
import select
import subprocess
import sys
from pathlib import Path

import pytest
from storage_helpers import (
    SMALL_CONFIG,
    FakeClock,
    base_offset_of,
    chain_lie,
    segment_logs,
    sized_batch,
)

from shmbroker import limits
from shmbroker.format.record_batch import read_header
from shmbroker.storage.partition_log import PartitionLog
from shmbroker.subprocesses import child_environment

pytestmark = pytest.mark.fault

CHILD = Path(__file__).with_name("overlap_child.py")
TESTS = Path(__file__).parent.parent


def _child(mode, directory, **kwargs):
    env = child_environment()  # this shmbroker, and storage_helpers from tests/
    env["PYTHONPATH"] = str(TESTS) + os.pathsep + env["PYTHONPATH"]
    return subprocess.Popen([sys.executable, str(CHILD), mode, str(directory)], env=env,
                            **kwargs)


def test_sigkill_between_write_and_verdict_leaves_no_bad_batch(tmp_path):
    directory = tmp_path / "p0"
    with _child("crash", directory, stdin=subprocess.PIPE, stdout=subprocess.PIPE) as child:
        try:
            ready, _, _ = select.select([child.stdout], [], [], 60)
            assert ready, "the child never wrote its append"
            assert child.stdout.readline() == b"written\n"
            size = os.path.getsize(segment_logs(directory)[-1])
        finally:
            child.kill()
    log = PartitionLog(directory, SMALL_CONFIG, clock_ms=FakeClock())
    report = log.recovery_report
    # the three good batches of the interrupted call stay (written whole, never acknowledged,
    # as after any crash mid-append); the lying one is cut
    assert log.log_end_offset == 4 + 9
    assert report.bytes_truncated == len(chain_lie())
    assert os.path.getsize(segment_logs(directory)[-1]) == size - len(chain_lie())
    assert "record" in " ".join(str(segment.reason) for segment in report.segments)
    for offset in range(13):
        assert read_header(log.read_bytes(offset, 1)).base_offset <= offset
    assert log.append(sized_batch(1, 5)).first_offset == 13
    log.close()


def test_recovery_walks_records_only_in_the_tail_an_append_could_have_left(tmp_path,
                                                                         monkeypatch):
    directory = tmp_path / "p0"
    log = PartitionLog(directory, SMALL_CONFIG, clock_ms=FakeClock())
    log.append(sized_batch(2, 30))
    log.flush()
    log.abandon()
    lie = bytearray(chain_lie())
    lie[:8] = (2).to_bytes(8, "big")
    with open(segment_logs(directory)[-1], "ab") as segment:
        segment.write(lie)
    for tail_bytes, kept in ((len(lie) - 1, True), (len(lie), False)):
        # a lying batch that starts before the tail is not walked: no append left it there
        monkeypatch.setattr(limits, "append_overlap_bytes_max", tail_bytes)
        log = PartitionLog(directory, SMALL_CONFIG.replace(record_validation="records"),
                           clock_ms=FakeClock())
        assert log.log_end_offset == (2 + 4 if kept else 2)
        if kept:
            assert base_offset_of(log.read_bytes(2, 1)) == 2
            log.abandon()
        else:
            log.close()
    # "crc" validation never walks record chains, on append or in recovery
    with open(segment_logs(directory)[-1], "ab") as segment:
        segment.write(lie)
    log = PartitionLog(directory, SMALL_CONFIG.replace(record_validation="crc"),
                       clock_ms=FakeClock())
    assert log.log_end_offset == 6
    log.close()


def test_a_forked_child_gets_its_own_helper(tmp_path):
    child = _child("fork", tmp_path / "p0")
    assert child.wait(timeout=120) == 0
