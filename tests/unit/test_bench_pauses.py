"""The benchmark clients' pause watch: garbage collections and late paced sends, per process,
merged by the parent into what puts a slow second on a process."""

from __future__ import annotations

import gc
import time

import pytest

from shmbroker.perf import cli, runner


def test_collections_are_counted_by_generation_until_closed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner, "PAUSE_NOTE_NS", 0)  # every collection is a long one
    watch = runner.PauseWatch()
    try:
        before = time.monotonic_ns()
        gc.collect(0)
        gc.collect(2)
        gc.collect(2)
        after = time.monotonic_ns()
    finally:
        result = watch.close()
    assert result["collections"][0] >= 1 and result["collections"][2] == 2
    generations = [generation for _, _, generation in result["long_collections"]]
    assert generations.count(2) == 2 and 0 in generations
    for started_ns, took_ns, _ in result["long_collections"]:
        assert before <= started_ns and started_ns + took_ns <= after and took_ns >= 0
    assert watch._on_gc not in gc.callbacks
    gc.collect()
    assert watch.collections[2] == 2  # closed: no longer counting


def test_short_collections_are_counted_not_listed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner, "PAUSE_NOTE_NS", 10**12)
    watch = runner.PauseWatch()
    gc.collect()
    result = watch.close()
    assert result["collections"][2] == 1 and result["long_collections"] == []


def test_the_latest_send_of_each_second() -> None:
    watch = runner.PauseWatch()
    watch.close()
    now = time.monotonic_ns()
    start = now - 5_000_000_000
    watch.sent(now, start)  # on time: not noted
    watch.sent(now - 3_000_000, start)  # 3 ms late, in second 4 of the run
    watch.sent(now - 2_000_000, start)  # later in the same second, less late
    watch.sent(now - 1_200_000_000, start)  # 1.2 s late, in second 3
    assert set(watch.late_max) == {3, 4}
    assert 3_000_000 <= watch.late_max[4] < 1_000_000_000
    assert watch.late_max[3] >= 1_200_000_000


def test_the_parent_merges_the_children() -> None:
    start_at = 100.0
    ns = 1_000_000_000
    collected = {
        "producer": {
            0: {"pauses": {"collections": [5, 1, 0],
                           "long_collections": [(int(102.5 * ns), 2_000_000, 1)],
                           "late_max": {2: 4_000_000, 3: 1_000_000}}},
            1: {"pauses": {"collections": [4, 0, 0], "long_collections": [],
                           "late_max": {3: 9_000_000}}}},
        "consumer": {
            0: {"pauses": {"collections": [7, 2, 1],
                           "long_collections": [(int(101.25 * ns), 31_000_000, 2)],
                           "late_max": {}}}}}
    merged = runner._client_pauses(collected, start_at)
    assert merged["collections"] == {"producer 0": [5, 1, 0], "producer 1": [4, 0, 0],
                                     "consumer 0": [7, 2, 1]}
    assert merged["long_collections"] == [
        {"process": "consumer 0", "generation": 2, "t_s": 1.25, "ms": 31.0},
        {"process": "producer 0", "generation": 1, "t_s": 2.5, "ms": 2.0}]
    assert merged["late_send_max_per_s"] == [{"t_s": 2.0, "ms": 4.0}, {"t_s": 3.0, "ms": 9.0}]
    lines = cli._pause_lines(merged, warmup_s=2.0)  # the consumer's pause was in the warm-up
    assert lines == [
        "client pauses: 20 garbage collections, the longest 2.0 ms (producer 0, generation 1, "
        "2.5 s after the start)",
        "paced sends: up to 9.0 ms late (3-4 s after the start)"]
    assert cli._pause_lines(merged, warmup_s=5.0) == [
        "client pauses: 20 garbage collections, none of 1 ms or more after the warm-up"]


def test_results_without_a_watch_merge_to_nothing() -> None:
    assert runner._client_pauses({"producer": {0: {}}, "consumer": {0: {}}}, 0.0) == {}
    assert cli._pause_lines({}, 1.0) == []
