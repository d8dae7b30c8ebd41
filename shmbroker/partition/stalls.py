"""Stall warnings for the worker's loop, as Redpanda's reactor logs "Reactor stalled for N ms".

A worker is one thread serving one partition: every produce, fetch and acknowledgement of the
partition waits while a loop turn runs.  A turn that keeps the thread busy for tens of ms (a
blocking fsync, a long append, a garbage collection, the process descheduled) shows up as a
latency tail that nothing else explains.  :class:`StallWatch` is given the times of each turn's
phases and logs a warning, at most once per LOG_INTERVAL_S, for a turn whose busy time (the
turn less its wait in the selector) reached the broker setting ``worker_stall_warn_ms``, with
the time of each phase and how many more such turns it did not log.  Of the first phase it
also says how long the appends of the regions drained took, from what the worker adds to
:attr:`StallWatch.appending_s` during the turn, and of that how long went to copying the
regions out of the rings (``copying_s``), to checking their batches or waiting for the check
thread to (``checking_s``, from ``PartitionLog.check_s``), to writing the segment files
(``writing_s``, from ``PartitionLog.write_s``) and to rolling segments (``rolling_s``: the
next one's files made, the last one sealed).  A write the disk holds up -- the kernel holding
writers back while it writes dirty pages to a disk that lags behind the appends -- shows in
the writing; a check thread that got no core in time, in the checking; a roll that waits for
the file system's journal, in the rolling; what none explains is the rest of the append's
Python (or the process waiting for a core).
And how long the garbage collector ran in the turn (:meth:`StallWatch.watch_collections`).
"""

from __future__ import annotations

import gc
import logging
import time
from typing import Any

LOG_INTERVAL_S = 1.0  # at most one warning a second; the others are counted in the next one


class StallWatch:
    """Counts and logs long loop turns of one worker.  ``threshold_ms`` 0 turns it off."""

    def __init__(self, name: str, threshold_ms: int, logger: logging.Logger) -> None:
        self.name = name
        self.threshold_s = threshold_ms / 1000
        self.logger = logger
        self.stalls = 0  # turns at or past the threshold, logged or not
        self.worst_s = 0.0
        self._unlogged = 0
        self._next_log = 0.0
        self.appending_s = 0.0  # this turn's time in appends, added to by the worker
        self.copying_s = 0.0  # of which copying regions out of the rings
        self.checking_s = 0.0  # checking batches, or waiting for the check thread to
        self.writing_s = 0.0  # writing the segment files (PartitionLog.write_s)
        self.rolling_s = 0.0  # rolling segments (PartitionLog.roll_s)
        self.collecting_s = 0.0  # this turn's garbage collections (watch_collections)
        self._collection_began = 0.0

    def watch_collections(self) -> None:
        """Count the garbage collector's time into the turns (until :meth:`close`)."""
        if self._on_gc not in gc.callbacks:
            gc.callbacks.append(self._on_gc)

    def close(self) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._collection_began = time.monotonic()
        else:
            self.collecting_s += time.monotonic() - self._collection_began

    def turn(self, began: float, waiting: float, woke: float, handled: float,
             ended: float) -> None:
        """One loop turn, in monotonic seconds: it ``began``; it drained the rings and pumped
        the flushes until ``waiting`` in the selector, which returned at ``woke``; it handled
        the ready connections until ``handled``; parked fetches and timers until ``ended``."""
        threshold = self.threshold_s
        appending, self.appending_s = self.appending_s, 0.0
        copying, self.copying_s = self.copying_s, 0.0
        checking, self.checking_s = self.checking_s, 0.0
        writing, self.writing_s = self.writing_s, 0.0
        rolling, self.rolling_s = self.rolling_s, 0.0
        collecting, self.collecting_s = self.collecting_s, 0.0
        if not threshold:
            return
        busy = (waiting - began) + (ended - woke)
        if busy < threshold:
            return
        self.stalls += 1
        self.worst_s = max(self.worst_s, busy)
        if ended < self._next_log:
            self._unlogged += 1
            return
        phases = {"rings and flushes": waiting - began,
                  "of which appends": appending, "requests": handled - woke,
                  "parked fetches and timers": ended - handled,
                  "garbage collection in all": collecting}
        described = [f"{phase} {seconds * 1000:.1f} ms" for phase, seconds in phases.items()]
        described[1] += (f" (copying out of the rings {copying * 1000:.1f} ms, checking "
                         f"{checking * 1000:.1f} ms, writing the segment files "
                         f"{writing * 1000:.1f} ms, rolling segments {rolling * 1000:.1f} ms)")
        self.logger.warning(
            "%s: one turn of the worker's loop kept it busy %.1f ms (%s); produce and fetch of "
            "the partition waited meanwhile%s", self.name, busy * 1000, ", ".join(described),
            f" ({self._unlogged} more such turn(s) since the last warning)" if self._unlogged
            else "")
        self._unlogged = 0
        self._next_log = ended + LOG_INTERVAL_S
