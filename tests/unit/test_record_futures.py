"""RecordFuture and the ProducedBatch it shares: results, exceptions and done-callbacks (run
once, on the completing thread or at once when done already; one that raises is logged and
the others still run)."""

from __future__ import annotations

import logging
import threading

import pytest

from shmbroker.client.futures import ProducedBatch, RecordFuture
from shmbroker.errors import BatchTooLargeError, RequestTimeoutError


def _batch(count: int = 3) -> ProducedBatch:
    batch = ProducedBatch("t", 2)
    batch.count = count
    batch.timestamps = [1000 + index for index in range(count)]
    return batch


def test_callbacks_run_once_on_the_completing_thread_with_their_future() -> None:
    batch = _batch()
    futures = [RecordFuture(batch, index) for index in range(3)]
    seen: list[tuple[int, str]] = []
    for future in futures:
        future.add_done_callback(lambda done: seen.append(
            (done.result(0).offset, threading.current_thread().name)))
    assert seen == [] and not futures[0].done()
    with pytest.raises(RequestTimeoutError, match="t/2 not acknowledged"):
        futures[0].result(0.01)
    completer = threading.Thread(target=batch.complete, args=(40,), name="io")
    completer.start()
    completer.join()
    assert seen == [(40, "io"), (41, "io"), (42, "io")]
    batch.complete(99)  # a second completion changes nothing and calls nobody again
    assert futures[2].result(0).offset == 42 and len(seen) == 3
    assert futures[1].result(0).timestamp_ms == 1001


def test_a_callback_added_when_done_runs_at_once() -> None:
    batch = _batch(1)
    error = BatchTooLargeError("too big for the test")
    batch.complete(-1, error)
    future = RecordFuture(batch, 0)
    seen: list[BaseException | None] = []
    future.add_done_callback(lambda done: seen.append(done.exception(0)))
    assert seen == [error]
    with pytest.raises(BatchTooLargeError):
        future.result(0)


def test_a_callback_that_raises_is_logged_and_the_others_run(caplog) -> None:
    batch = _batch(2)
    seen: list[int] = []

    def broken(_: RecordFuture) -> None:
        raise ValueError("a bug in the application's callback")

    RecordFuture(batch, 0).add_done_callback(broken)
    RecordFuture(batch, 1).add_done_callback(lambda done: seen.append(done.result(0).offset))
    with caplog.at_level(logging.ERROR, logger="shmbroker.client.futures"):
        batch.complete(7)  # does not raise into the completing thread
    assert seen == [8]
    assert "done-callback raised" in caplog.text and "a bug in the application" in caplog.text
    with caplog.at_level(logging.ERROR, logger="shmbroker.client.futures"):
        RecordFuture(batch, 0).add_done_callback(broken)  # done already: at once, logged too
    assert caplog.text.count("done-callback raised") == 2
