"""shmbroker.subprocesses.join_or_kill: the benchmarks' clean-up of their child processes."""

from __future__ import annotations

import multiprocessing
import signal
import time

from shmbroker.subprocesses import join_or_kill


def test_children_that_end_are_joined_and_hung_ones_killed() -> None:
    # stdlib targets: a spawned child unpickles its target by module, and this test module is
    # not importable there (tests/ is no package on the child's path)
    context = multiprocessing.get_context("spawn")
    quick = context.Process(target=time.sleep, args=(0,))
    hung = context.Process(target=time.sleep, args=(600,))  # only a kill ends it in time
    quick.start()
    hung.start()
    started = time.monotonic()
    join_or_kill([quick, None, hung], 0.5)  # None: a slot whose child was never started
    assert time.monotonic() - started < 60
    assert quick.exitcode == 0
    assert not hung.is_alive() and hung.exitcode == -signal.SIGKILL
