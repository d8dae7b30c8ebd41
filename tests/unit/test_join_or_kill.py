"""shmbroker.subprocesses.join_or_kill: the benchmarks' clean-up of their child processes."""

from __future__ import annotations

import multiprocessing
import signal
import time

from shmbroker.subprocesses import join_or_kill


def _exit_at_once() -> None:
    pass


def _hang() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # only SIGKILL ends it
    time.sleep(600)


def test_children_that_end_are_joined_and_hung_ones_killed() -> None:
    context = multiprocessing.get_context("spawn")
    quick, hung = context.Process(target=_exit_at_once), context.Process(target=_hang)
    quick.start()
    hung.start()
    started = time.monotonic()
    join_or_kill([quick, None, hung], 0.5)  # None: a slot whose child was never started
    assert time.monotonic() - started < 60
    assert quick.exitcode == 0
    assert not hung.is_alive() and hung.exitcode == -signal.SIGKILL
