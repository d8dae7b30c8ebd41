"""Asynchronous offset commits (Kafka's ``commitAsync``), pipelined on their own connection.

``send`` writes an OFFSET_COMMIT frame without waiting for the answer, so many commits are in
flight together and the supervisor makes them durable with one fsync per loop iteration (its
group commit).  Self-clocked batching, as Nagle's algorithm: while fewer than
``SENT_AHEAD_MAX`` commits are unanswered a commit is written at once; beyond that it waits in a
buffer that the reader thread writes, in one ``sendall``, as soon as answers come back.  Under
load one system call carries many commits each way; a lone commit is never delayed.

The reader thread collects the answers in order; the callbacks run on the application's thread
when it calls :meth:`run_callbacks` (the consumer does in ``poll``, ``commit`` and ``close``), as
Kafka's do.  :meth:`flush` waits for every commit in flight: a synchronous commit after
asynchronous ones goes after them, so an older offset never lands last.
"""

from __future__ import annotations

import collections
import contextlib
import socket
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from shmbroker.client.connection import not_running, open_socket
from shmbroker.client.types import TopicPartition
from shmbroker.errors import BrokerNotRunningError, RequestTimeoutError, ShmbrokerError
from shmbroker.protocol.frames import FrameDecoder, frame_head
from shmbroker.protocol.messages import ApiKey, check_response

SENT_AHEAD_MAX = 8  # commits written and unanswered before new ones are buffered
RECV_BYTES = 256 * 1024

CommitCallback = Callable[[Mapping[TopicPartition, int], Exception | None], None]


class AsyncCommitter:
    def __init__(self, socket_path: Path, timeout_s: float, in_flight_max: int = 1024) -> None:
        self.socket_path = socket_path
        self.timeout_s = timeout_s
        self.in_flight_max = in_flight_max
        self._sock: socket.socket | None = None
        self._reader: threading.Thread | None = None
        self._condition = threading.Condition()
        # (correlation id, offsets, callback, error) in send order; answers come in the same
        # order.  A commit refused before sending waits here, correlation id -1 and its error
        # set, so that its callback keeps its place among the others.
        self._in_flight: collections.deque[tuple[int, dict[TopicPartition, int],
                                                 CommitCallback | None, Exception | None]] = (
            collections.deque())
        self._done: collections.deque[tuple[dict[TopicPartition, int], CommitCallback | None,
                                            Exception | None]] = collections.deque()
        self._unsent: list[bytes] = []  # frames of the newest len(_unsent) commits in flight
        self._correlation = 0

    def send(self, body: dict[str, Any], offsets: dict[TopicPartition, int],
             callback: CommitCallback | None) -> None:
        with self._condition:
            deadline = time.monotonic() + self.timeout_s
            while len(self._in_flight) >= self.in_flight_max:  # bounded, as Kafka's in-flight
                if not self._condition.wait(max(0.0, deadline - time.monotonic())):
                    raise RequestTimeoutError(f"{len(self._in_flight)} asynchronous commits "
                                              f"unanswered for {self.timeout_s} s")
            try:
                sock = self._connected()
                self._correlation = self._correlation % 0x7FFFFFFF + 1
                frame = frame_head(ApiKey.OFFSET_COMMIT, self._correlation, body)
                if len(self._in_flight) - len(self._unsent) < SENT_AHEAD_MAX:
                    sock.sendall(b"".join((*self._unsent, frame)) if self._unsent else frame)
                    self._unsent.clear()
                else:
                    self._unsent.append(frame)  # the reader writes it when answers come
            except (OSError, ShmbrokerError) as error:
                failure = error if isinstance(error, ShmbrokerError) else not_running(
                    self.socket_path)
                self._done.append((offsets, callback, failure))
                self._close_locked(failure)
                return
            self._in_flight.append((self._correlation, offsets, callback, None))
            # (no notify: only the reader's answers change what waiters wait for)

    def _connected(self) -> socket.socket:
        if self._sock is None:
            self._sock = open_socket(self.socket_path, None)
            self._reader = threading.Thread(target=self._read, args=(self._sock,),
                                            name="shmbroker-commits", daemon=True)
            self._reader.start()
        return self._sock

    def _read(self, sock: socket.socket) -> None:
        decoder = FrameDecoder()
        while True:
            try:
                data = sock.recv(RECV_BYTES)
                if not data:
                    raise ConnectionResetError("the supervisor closed the connection")
                decoder.receive_data(data)
                frames = decoder.frames()
            except (OSError, ShmbrokerError):
                with self._condition:
                    if self._sock is sock:
                        self._close_locked(not_running(self.socket_path))
                return
            with self._condition:
                for frame in frames:
                    if not self._in_flight or self._in_flight[0][0] != frame.correlation_id:
                        continue  # not ours (cannot happen on this connection): ignore
                    _, offsets, callback, _ = self._in_flight.popleft()
                    try:
                        check_response(frame.body)
                        error: Exception | None = None
                    except ShmbrokerError as failure:
                        error = failure
                    self._done.append((offsets, callback, error))
                    self._pop_refused()
                if self._unsent and self._sock is sock:
                    try:
                        sock.sendall(b"".join(self._unsent))
                    except OSError:
                        self._close_locked(not_running(self.socket_path))
                        return
                    self._unsent.clear()
                self._condition.notify_all()

    def _close_locked(self, error: Exception) -> None:
        self._unsent.clear()
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()
            self._sock = None
        while self._in_flight:
            _, offsets, callback, refusal = self._in_flight.popleft()
            self._done.append((offsets, callback, refusal or error))
        self._condition.notify_all()

    def refused(self, offsets: dict[TopicPartition, int], callback: CommitCallback | None,
                error: Exception) -> None:
        """A commit refused before it was sent: its callback runs with the others, in order."""
        with self._condition:
            self._in_flight.append((-1, offsets, callback, error))
            self._pop_refused()

    def _pop_refused(self) -> None:
        """Move the refusals at the head of the queue (nothing sent before them is unanswered)
        to the answered ones."""
        while self._in_flight and self._in_flight[0][0] == -1:
            _, offsets, callback, error = self._in_flight.popleft()
            self._done.append((offsets, callback, error))
        self._condition.notify_all()

    @property
    def pending(self) -> int:
        with self._condition:
            return len(self._in_flight)

    def flush(self, timeout_s: float | None = None) -> None:
        """Wait until every commit sent has its answer (RequestTimeoutError past the timeout)."""
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        with self._condition:
            while self._in_flight:
                if not self._condition.wait(max(0.0, deadline - time.monotonic())):
                    self._close_locked(RequestTimeoutError(
                        f"asynchronous commits unanswered for {self.timeout_s} s"))
                    break

    def run_callbacks(self) -> list[Exception]:
        """Call the callbacks of the answered commits, in order; returns the errors of those
        that had no callback (the consumer logs them)."""
        with self._condition:
            done, self._done = list(self._done), collections.deque()
        unreported = []
        for offsets, callback, error in done:
            if callback is not None:
                callback(offsets, error)
            elif error is not None:
                unreported.append(error)
        return unreported

    def close(self) -> None:
        with self._condition:
            self._close_locked(BrokerNotRunningError("the consumer closed"))
        if self._reader is not None:
            self._reader.join(1.0)
