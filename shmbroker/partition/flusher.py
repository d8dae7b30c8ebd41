"""The worker's flush thread: fsyncs off the worker's thread, for group commit.

A topic with ``flush_messages = 1`` acknowledges a batch only once an fsync covers it.  Done
inline, every drained region of the rings waits for its fsync before the next region is read,
and the worker spends a third of its time blocked in fsync (measured with py-spy on the
``durable-1k`` workload).  Instead the worker appends, hands
:meth:`PartitionLog.begin_flush`'s ticket to this thread, and goes on draining and appending
while the disk syncs; when the ticket is done the worker acknowledges every region the flush
covered and starts the next flush, which covers everything appended meanwhile.  That is group
commit with one fsync in flight, as Redpanda and PostgreSQL do it: the more the disk lags, the
more each fsync covers.

The flushes that acknowledgements do not wait for (``flush_ms``, ``flush_messages`` above 1,
the recovery-point interval) run here too, for every topic: inline, one fsync of seconds of
page-cache writes stalled appends and fetches as long.

One thread, at most one ticket in flight.  Completion is reported through a queue and a
non-blocking pipe whose read end the worker's selector watches, so a sleeping worker wakes.
The same thread also starts the kernel's writeback of each few MiB appended
(:meth:`Flusher.start_writeback`, storage/writeback.py): a hint, fire and forget, queued
behind the ticket in flight if any (whose fsync writes it back anyway).
"""

from __future__ import annotations

import os
import queue
import threading

from shmbroker.storage.partition_log import FlushTicket
from shmbroker.storage.writeback import WritebackHint

THREAD_JOIN_S = 5.0


class Flusher:
    """Runs :class:`FlushTicket` s on one thread, one at a time."""

    def __init__(self) -> None:
        self._requests: queue.SimpleQueue[FlushTicket | WritebackHint | None] = (
            queue.SimpleQueue())
        self._done: queue.SimpleQueue[OSError | None] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.in_flight: FlushTicket | None = None
        # A writeback hint is queued or running (one at a time: the next, asked for meanwhile,
        # covers what this one does not); set here, cleared by the thread.
        self.writeback_queued = False
        self._thread: threading.Thread | None = None

    def fileno(self) -> int:
        """Readable when a ticket finished (for the worker's selector)."""
        return self._wake_r

    def start(self) -> None:
        """Start the thread now (else the first :meth:`submit` does)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="flusher", daemon=True)
            self._thread.start()

    def submit(self, ticket: FlushTicket) -> None:
        assert self.in_flight is None, "one flush in flight at a time"
        self.start()
        self.in_flight = ticket
        self._requests.put(ticket)

    def start_writeback(self, hint: WritebackHint) -> None:
        """Run ``hint`` (PartitionLog.take_writeback's) on the thread; nothing is reported back
        but :attr:`writeback_queued` going False once it ran."""
        self.start()
        self.writeback_queued = True
        self._requests.put(hint)

    def finished(self, wait_s: float = 0.0) -> tuple[FlushTicket, OSError | None] | None:
        """The ticket in flight and its outcome once it ran (waiting up to ``wait_s``); None
        while it runs or when none is in flight."""
        if self.in_flight is None:
            return None
        try:
            error = self._done.get(timeout=wait_s) if wait_s > 0 else self._done.get_nowait()
        except queue.Empty:
            return None
        try:
            os.read(self._wake_r, 64)
        except BlockingIOError:
            pass
        ticket, self.in_flight = self.in_flight, None
        return ticket, error

    def close(self) -> None:
        """Stop the thread (after the ticket in flight, if any) and close the pipe."""
        if self._thread is not None:  # (a ticket left in flight closes its own fds)
            self._requests.put(None)
            self._thread.join(THREAD_JOIN_S)
            if self._thread.is_alive():  # an fsync hangs: it may still write to the pipe, so
                return  # keep the fds (a closed number could be reused); the exit closes them
            self._thread = None
        self.in_flight = None
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

    def _run(self) -> None:
        while True:
            ticket = self._requests.get()
            if ticket is None:
                return
            if isinstance(ticket, WritebackHint):
                ticket.run()
                self.writeback_queued = False
                continue
            self._done.put(ticket.run())
            try:
                os.write(self._wake_w, b"f")
            except OSError:  # full (the worker drains it) or closed (stopping)
                pass

