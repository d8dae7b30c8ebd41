"""The worker's stall warnings: which turns count, what a warning says, how often it comes."""

from __future__ import annotations

import gc
import logging

import pytest

from shmbroker.partition.stalls import LOG_INTERVAL_S, StallWatch


@pytest.fixture
def watch(caplog: pytest.LogCaptureFixture) -> StallWatch:
    caplog.set_level(logging.WARNING)
    return StallWatch("metrics/3", 50, logging.getLogger("test-stalls"))


def test_the_wait_in_the_selector_is_not_busy_time(watch, caplog) -> None:
    watch.turn(0.0, 0.010, 5.0, 5.020, 5.039)  # 49 ms busy around a 5-s sleep
    assert watch.stalls == 0 and caplog.records == []


def test_a_long_turn_is_logged_with_its_phases(watch, caplog) -> None:
    watch.appending_s = 0.0015  # what the worker added up in its appends this turn
    watch.copying_s = 0.0001  # of which copying out of the rings,
    watch.checking_s = 0.0002  # checking,
    watch.writing_s = 0.0012  # writing the segment files
    watch.rolling_s = 0.0003  # and rolling segments
    watch.turn(10.0, 10.002, 10.003, 10.004, 10.064)  # 2 + 1 + 60 ms
    assert watch.stalls == 1 and watch.worst_s == pytest.approx(0.063)
    [record] = caplog.records
    message = record.getMessage()
    assert record.levelno == logging.WARNING and message.startswith("metrics/3: ")
    assert "kept it busy 63.0 ms" in message
    assert ("rings and flushes 2.0 ms, of which appends 1.5 ms (copying out of the rings 0.1 "
            "ms, checking 0.2 ms, writing the segment files 1.2 ms, rolling segments 0.3 ms), "
            "requests 1.0 ms, parked fetches and timers 60.0 ms, garbage collection in all 0.0 "
            "ms" in message)
    # each turn starts from nothing
    assert (watch.appending_s, watch.copying_s, watch.checking_s, watch.writing_s,
            watch.rolling_s) == (0.0,) * 5
    assert "produce and fetch of the partition waited" in message


def test_at_most_one_warning_a_second_and_the_next_counts_the_rest(watch, caplog) -> None:
    for start in (0.0, 0.2, 0.4, 0.6):
        watch.turn(start, start + 0.1, start + 0.1, start + 0.1, start + 0.1)
    assert watch.stalls == 4 and len(caplog.records) == 1
    later = 0.1 + LOG_INTERVAL_S
    watch.turn(later, later + 0.07, later + 0.07, later + 0.07, later + 0.07)
    assert len(caplog.records) == 2
    assert "(3 more such turn(s) since the last warning)" in caplog.records[1].getMessage()
    assert "more such" not in caplog.records[0].getMessage()


def test_appends_count_for_their_own_turn_only(watch, caplog) -> None:
    watch.appending_s = 0.030  # a short turn's appends (and their writes)...
    watch.copying_s = watch.checking_s = watch.writing_s = watch.rolling_s = 0.010
    watch.turn(0.0, 0.031, 0.031, 0.031, 0.031)
    watch.turn(1.0, 1.002, 1.002, 1.002, 1.080)  # ...are not the next long turn's
    [record] = caplog.records
    assert ("of which appends 0.0 ms (copying out of the rings 0.0 ms, checking 0.0 ms, "
            "writing the segment files 0.0 ms, rolling segments 0.0 ms)" in record.getMessage())


def test_garbage_collections_count_into_the_turn_they_ran_in(watch, caplog) -> None:
    watch.watch_collections()
    try:
        watch.turn(0.0, 0.001, 0.001, 0.001, 0.001)
        gc.collect()
        gc.collect()
        took = watch.collecting_s
        assert took > 0
        watch.turn(1.0, 1.001, 1.001, 1.001, 1.070)
    finally:
        watch.close()
    [record] = caplog.records
    assert f"garbage collection in all {took * 1000:.1f} ms" in record.getMessage()
    assert watch.collecting_s == 0.0
    gc.collect()  # closed: no longer counted
    assert watch.collecting_s == 0.0 and watch._on_gc not in gc.callbacks


def test_threshold_zero_turns_it_off(caplog) -> None:
    watch = StallWatch("t/0", 0, logging.getLogger("test-stalls"))
    watch.turn(0.0, 10.0, 10.0, 10.0, 20.0)
    assert watch.stalls == 0 and caplog.records == []
