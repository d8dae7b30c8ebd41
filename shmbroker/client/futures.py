"""The outcomes of produced records: futures shared per batch (thread-safe, cheap per record).

One :class:`ProducedBatch` holds the outcome of every record of one RecordBatch; a record's
:class:`RecordFuture` is just (batch, index), so ``send`` allocates one small object per record
and no lock or event until somebody waits.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from shmbroker.client.types import RecordMetadata
from shmbroker.errors import RequestTimeoutError

logger = logging.getLogger(__name__)

# One lock for every batch's few lines of completion bookkeeping, not one per batch: each
# batch in flight is then one object the garbage collector tracks instead of two (a lock is
# a tracked object since CPython 3.12).  At 10k one-record batches a second with acks running
# late, the objects in flight set off young collections whose survivors brought on full ones
# of ~30 ms on the 16-core device machine (bench/RESULTS.md, "Latency").  Held for a handful
# of attribute writes, never across a callback or a wait: no contention worth a lock each.
_COMPLETION_LOCK = threading.Lock()


def _run_callback(callback: Callable[[], None]) -> None:
    """Run a done-callback; an exception it raises is logged (as concurrent.futures and Kafka's
    producer do), never raised into the thread that completed the batch, and the batch's other
    callbacks still run."""
    try:
        callback()
    except Exception:
        logger.exception("a producer future's done-callback raised")


class ProducedBatch:
    """One sealed (or open) batch's outcome, shared by the futures of its records."""

    __slots__ = ("topic", "partition", "count", "timestamps", "base_offset", "error", "_event",
                 "_callbacks", "done", "sent_at")

    def __init__(self, topic: str, partition: int) -> None:
        self.topic = topic
        self.partition = partition
        self.count = 0
        self.timestamps: list[int] | int = 0
        self.base_offset = -1
        self.error: BaseException | None = None
        self.done = False
        self.sent_at = 0.0  # monotonic time it went into the ring (delivery_timeout_ms)
        self._event: threading.Event | None = None
        self._callbacks: list[Callable[[], None]] | None = None

    def complete(self, base_offset: int, error: BaseException | None = None) -> None:
        with _COMPLETION_LOCK:
            if self.done:
                return
            self.base_offset = base_offset
            self.error = error
            self.done = True
            event, callbacks = self._event, self._callbacks
            self._callbacks = None
        if event is not None:
            event.set()
        for callback in callbacks or ():
            _run_callback(callback)

    def wait(self, timeout: float | None) -> bool:
        if self.done:
            return True
        with _COMPLETION_LOCK:
            if self.done:
                return True
            if self._event is None:
                self._event = threading.Event()
            event = self._event
        return event.wait(timeout)

    def on_done(self, callback: Callable[[], None]) -> None:
        with _COMPLETION_LOCK:
            if not self.done:
                if self._callbacks is None:
                    self._callbacks = []
                self._callbacks.append(callback)
                return
        _run_callback(callback)

    def timestamp(self, index: int) -> int:
        timestamps = self.timestamps
        return timestamps if isinstance(timestamps, int) else timestamps[index]


class RecordFuture:
    """The outcome of one ``send``: ``result(timeout)`` -> :class:`RecordMetadata`."""

    __slots__ = ("_batch", "_index")

    def __init__(self, batch: ProducedBatch, index: int) -> None:
        self._batch = batch
        self._index = index

    def done(self) -> bool:
        return self._batch.done

    @property
    def batch(self) -> ProducedBatch:
        """The outcome this record shares with the others of its RecordBatch (one object per
        batch: a caller tracking many records can keep these instead of a future each)."""
        return self._batch

    def result(self, timeout: float | None = None) -> RecordMetadata:
        batch = self._batch
        if not batch.wait(timeout):
            raise RequestTimeoutError(
                f"record to {batch.topic}/{batch.partition} not acknowledged within {timeout} s")
        if batch.error is not None:
            raise batch.error
        offset = batch.base_offset + self._index if batch.base_offset >= 0 else -1
        return RecordMetadata(batch.topic, batch.partition, offset, batch.timestamp(self._index))

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The error the record failed with, None if it was stored; RequestTimeoutError only
        when the outcome is not known within ``timeout`` (a failure that is itself a timeout,
        e.g. BufferFullError, is returned)."""
        batch = self._batch
        if not batch.wait(timeout):
            raise RequestTimeoutError(
                f"record to {batch.topic}/{batch.partition} not acknowledged within {timeout} s")
        return batch.error

    def add_done_callback(self, callback: Callable[[RecordFuture], Any]) -> None:
        """Call ``callback(future)`` once the record is acknowledged or failed (Kafka's send
        callback): on the producer's I/O thread, or at once on this one if it is done already.
        Keep it short (it holds up the acknowledgements behind it); an exception it raises is
        logged."""
        self._batch.on_done(lambda: callback(self))


class BatchMetadata(NamedTuple):
    """Where a ``send_batch`` landed: one base offset per RecordBatch it was cut into."""

    topic: str
    partition: int
    base_offsets: list[int]
    counts: list[int]

    def offsets(self) -> np.ndarray[Any, np.dtype[np.int64]]:
        """Every record's offset, in order."""
        if not self.counts:
            return np.empty(0, dtype=np.int64)
        counts = np.asarray(self.counts, dtype=np.int64)
        starts = np.repeat(np.asarray(self.base_offsets, dtype=np.int64) - np.cumsum(counts)
                           + counts, counts)
        return starts + np.arange(int(counts.sum()), dtype=np.int64)


class BatchFuture:
    """The outcome of one ``send_batch``: ``result(timeout)`` -> :class:`BatchMetadata`."""

    def __init__(self, topic: str, partition: int, batches: list[ProducedBatch]) -> None:
        self.topic = topic
        self.partition = partition
        self._batches = batches

    def done(self) -> bool:
        return all(batch.done for batch in self._batches)

    def result(self, timeout: float | None = None) -> BatchMetadata:
        deadline = None if timeout is None else time.monotonic() + timeout
        for batch in self._batches:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not batch.wait(left):
                raise RequestTimeoutError(f"batch to {self.topic}/{self.partition} not "
                                          f"acknowledged within {timeout} s")
            if batch.error is not None:
                raise batch.error
        return BatchMetadata(self.topic, self.partition,
                             [batch.base_offset for batch in self._batches],
                             [batch.count for batch in self._batches])
