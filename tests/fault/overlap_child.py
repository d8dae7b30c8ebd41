"""A process that appends with the overlap helper, for ``test_append_overlap_crash.py``.

``python overlap_child.py crash LOG_DIR``: appends two good batches, then one call of three
good batches and a batch whose record chain lies (CRC recomputed), overlapped.  The helper's
check of that call is held until stdin closes; once the call's bytes are in the file the
process prints ``written`` and waits there, to be SIGKILLed: what a crash between the write
and the check's verdict leaves.

``python overlap_child.py fork LOG_DIR``: uses the helper, forks, and the child appends with
the helper again (its own: threads do not survive a fork); exits 0 when both appends worked,
after at most 60 s (a child stuck on the parent's helper would hang without this).
"""

from __future__ import annotations

import os
import signal
import sys

from storage_helpers import SMALL_CONFIG, chain_lie, sized_batch

from shmbroker import limits
from shmbroker.storage import segment as segment_module
from shmbroker.storage.partition_log import PartitionLog


def crash(directory: str) -> None:
    log = PartitionLog(directory, SMALL_CONFIG)
    log.append(sized_batch(2, 30, tag=1) + sized_batch(2, 30, tag=2))
    log.flush()  # the recovery point: 4
    real_check = PartitionLog._check_batches
    real_append = segment_module.Segment.append

    def held_check(self, *args):
        sys.stdin.read()  # until the test closes it (it kills us first)
        real_check(self, *args)

    def announced_append(self, *args):
        real_append(self, *args)
        print("written", flush=True)

    PartitionLog._check_batches = held_check  # type: ignore[method-assign]
    segment_module.Segment.append = announced_append  # type: ignore[method-assign]
    log.append(b"".join(sized_batch(3, 40, tag=10 + n) for n in range(3)) + chain_lie())
    print("the bad batch was accepted", flush=True)


def fork(directory: str) -> int:
    log = PartitionLog(directory, SMALL_CONFIG)
    log.append(sized_batch(2, 30) + sized_batch(2, 30))
    log.close()
    pid = os.fork()
    if pid == 0:
        signal.alarm(60)
        child = PartitionLog(directory, SMALL_CONFIG)
        child.append(sized_batch(2, 30) + sized_batch(2, 30))
        child.close()
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    return 0 if os.waitstatus_to_exitcode(status) == 0 else 1


if __name__ == "__main__":
    limits.append_overlap_bytes_min = 0
    if sys.argv[1] == "crash":
        crash(sys.argv[2])
    else:
        sys.exit(fork(sys.argv[2]))
