"""One helper thread per process that runs a check while its caller writes.

``os.write`` releases the GIL for the whole copy into the page cache, so while a large append is
being written another thread can run Python: ``PartitionLog.append`` checks the CRCs and record
chains of the batches it writes there (see APPEND_OVERLAP in partition_log.py for when, and why
the log may hold those bytes before their check ends).

The hand-off is two bare locks, not a queue or a future: a ``concurrent.futures`` round trip
costs tens of microseconds, which is what a 64 KiB batch's whole check costs.  One caller at a
time: :meth:`Overlap.start` returns False while the helper is busy (another thread's append),
when no thread can be started, or when the process turned it off (:func:`configure`), and the
caller then runs the check itself.
"""

from __future__ import annotations

import _thread
import os
import threading
from collections.abc import Callable
from typing import Any


class Overlap:
    """``start(function, *args)`` runs ``function`` on the helper thread; ``wait()`` returns
    the exception it raised, or None.  Every successful ``start`` must be followed by one
    ``wait`` (the helper stays busy until then)."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._free = _thread.allocate_lock()  # held from start() to wait(): one caller
        self._go = _thread.allocate_lock()  # released by start(): a job is ready
        self._go.acquire()
        self._done = _thread.allocate_lock()  # released by the helper: the job ended
        self._done.acquire()
        self._job: tuple[Callable[..., Any], tuple[Any, ...]] | None = None
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def start(self, function: Callable[..., Any], *args: Any) -> bool:
        if not self.enabled or not self._free.acquire(blocking=False):
            return False
        if self._thread is None:
            thread = threading.Thread(target=self._run, name="shmbroker-overlap", daemon=True)
            try:
                thread.start()
            except RuntimeError:  # no thread to be had (a resource limit): check inline
                self._free.release()
                return False
            self._thread = thread
        self._job = (function, args)
        self._go.release()
        return True

    def wait(self) -> BaseException | None:
        self._done.acquire()
        error, self._error = self._error, None
        self._free.release()
        return error

    def _run(self) -> None:
        while True:
            self._go.acquire()
            job, self._job = self._job, None
            assert job is not None
            function, args = job
            try:
                function(*args)
            except BaseException as error:  # handed to wait(): the caller decides
                self._error = error
            del job, function, args  # drop the caller's buffers before signalling
            self._done.release()


OVERLAP = Overlap()
MODES = ("auto", "on", "off")  # of configure(): the broker setting worker_check_thread
# With fewer usable CPUs, "auto" leaves the helper off: the check then runs on the appending
# thread, and no thread switch is added to cores that other processes keep busy.
AUTO_CPUS_MIN = 4


def configure(mode: str) -> bool:
    """Turn the helper "on", "off", or "auto" (on with AUTO_CPUS_MIN usable CPUs or more: the
    broker setting worker_check_thread); return whether it is on."""
    if mode not in MODES:
        raise ValueError(f"check thread mode must be 'auto', 'on' or 'off', got {mode!r}")
    OVERLAP.enabled = mode == "on" or (mode == "auto" and usable_cpus() >= AUTO_CPUS_MIN)
    return OVERLAP.enabled


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def _forget_in_child() -> None:
    """A forked child has no helper thread (only the forking thread survives a fork)."""
    global OVERLAP
    OVERLAP = Overlap(OVERLAP.enabled)


os.register_at_fork(after_in_child=_forget_in_child)
