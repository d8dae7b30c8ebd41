"""Step timestamps of a partition worker: where a record's produce-to-consume latency goes.

Off unless the worker's environment names a directory in ``SHMBROKER_TRACE_DIR``
(``bench/latency_trace.py`` sets it for the broker it starts).  Then the worker notes the
CLOCK_MONOTONIC time (``time.monotonic_ns``, one clock for every process on the host) of its
steps -- woken from its sleep, an append begun and ended, a fetch request read, parked and
answered -- with the offsets each concerns, and writes them to
``<dir>/worker-<topic>-<partition>-<pid>.npz`` when it stops.  At most ``EVENTS_MAX`` steps are
kept (the first ones); a step costs ~0.3 µs while tracing and one attribute test when off.

This is a diagnostic, not a metric: it perturbs what it measures a little, and the figures it
gives are for the machine and the load of one run (see the bench script's output).
"""

from __future__ import annotations

import array
import os
import time
from pathlib import Path

import numpy as np

TRACE_DIR_ENVIRONMENT = "SHMBROKER_TRACE_DIR"
EVENTS_MAX = 1 << 20  # 32 MiB of steps at most (~20 s of a worker at 10k records/s)

# Step kinds, and what their two values are.
WOKE = 0  # events came in a turn of its loop (after its sleep, spin or poll): (how many, 0)
APPEND_BEGIN = 1  # a ring region taken for the log: (log end offset before it, 0)
APPEND_END = 2  # that region appended and acknowledged: (log end offset after it, 0)
FETCH_READ = 3  # a fetch request read: (its offset, 0)
FETCH_PARKED = 4  # the fetch waits for records: (its offset, 0)
FETCH_ANSWERED = 5  # records sent for a fetch: (its offset, the offset after the last sent)
KIND_NAMES = ("woke", "append begin", "append end", "fetch read", "fetch parked",
              "fetch answered")


class StepTrace:
    """The steps one worker noted; :meth:`save` writes them (see the module docstring)."""

    def __init__(self, path: str | os.PathLike[str], events_max: int = EVENTS_MAX) -> None:
        self.path = Path(path)
        self.events_max = events_max
        # (time ns, kind, first, second) for each step, flat: 32 bytes a step, no objects
        self._events = array.array("q")

    @classmethod
    def from_environment(cls, name: str) -> StepTrace | None:
        """A trace for the worker of partition ``name`` ("topic/partition") when
        ``SHMBROKER_TRACE_DIR`` is set, else None."""
        directory = os.environ.get(TRACE_DIR_ENVIRONMENT)
        if not directory:
            return None
        file_name = f"worker-{name.replace('/', '-')}-{os.getpid()}.npz"
        return cls(Path(directory) / file_name)

    def note(self, kind: int, first: int = 0, second: int = 0) -> None:
        events = self._events
        if len(events) < 4 * self.events_max:
            events.extend((time.monotonic_ns(), kind, first, second))

    def __len__(self) -> int:
        return len(self._events) // 4

    def save(self) -> None:
        """Write the steps (``times_ns``, ``kinds``, ``first``, ``second``: one array each)."""
        table = np.frombuffer(self._events, dtype=np.int64).reshape(-1, 4)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(self.path.name + ".partial")
        with open(partial, "wb") as file:  # a reader never sees half a file
            np.savez(file, times_ns=table[:, 0], kinds=table[:, 1], first=table[:, 2],
                     second=table[:, 3])
        os.replace(partial, self.path)


def load(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """A saved trace's arrays: ``times_ns``, ``kinds``, ``first``, ``second`` (int64)."""
    with np.load(path) as saved:
        return {name: saved[name] for name in ("times_ns", "kinds", "first", "second")}
