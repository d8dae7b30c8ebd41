"""The benchmark clients' pause watch: garbage collections and late paced sends, per process,
merged by the parent into what puts a slow second on a process."""

from __future__ import annotations

import gc
import mmap
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
    """What a paced producer notes: the latest send of each second, with the sending thread's
    CPU time, context switches and page faults since its last send on time."""
    watch = runner.PauseWatch()
    watch.close()
    now = time.monotonic_ns()
    start = now - 5_500_000_000  # now is in second 5 of the run
    watch.sent(now - 5_000_000, start)  # the first send: nothing to compare with yet
    assert watch.late_max == {}
    watch.sent(time.monotonic_ns(), start)  # on time: not noted
    with mmap.mmap(-1, 8 << 20) as fresh:  # pages the thread faults in, writing to each
        fresh[::4096] = b"x" * (len(fresh) // 4096)
    ran_until = time.thread_time_ns() + 3_000_000
    while time.thread_time_ns() < ran_until:  # the thread runs 3 ms...
        pass
    watch.sent(time.monotonic_ns() - 3_500_000, start)  # ...and sends 3.5 ms late
    watch.sent(time.monotonic_ns() - 2_000_000, start)  # less late, same second: not kept
    watch.sent(time.monotonic_ns(), start)  # on time again
    time.sleep(0.003)  # waits ~3 ms (a voluntary switch)...
    watch.sent(time.monotonic_ns() - 1_200_000_000, start)  # ...and sends 1.2 s late: second 4
    assert set(watch.late_max) == {4, 5}
    late, gap, cpu, waits, preempted, faults = watch.late_max[5]
    assert 3_500_000 <= late < 100_000_000 and gap >= 3_000_000
    assert cpu >= 3_000_000 and waits >= 0 and preempted >= 0
    assert faults >= 1  # (2048 with 4-KiB pages; a few where huge pages back it)
    # since the last send on time: the sleep, not the spin before it
    late, gap, cpu, waits, preempted, faults = watch.late_max[4]
    assert late >= 1_200_000_000 and 3_000_000 <= gap < 1_000_000_000 and waits >= 1
    assert cpu < gap / 2


def test_the_parent_merges_the_children() -> None:
    start_at = 100.0
    ns = 1_000_000_000
    collected = {
        "producer": {
            0: {"pauses": {"collections": [5, 1, 0],
                           "long_collections": [(int(102.5 * ns), 2_000_000, 1)],
                           "late_max": {2: (4_000_000, 4_100_000, 100_000, 1, 0, 0),
                                        3: (1_000_000, 1_100_000, 1_100_000, 0, 0, 0)}}},
            1: {"pauses": {"collections": [4, 0, 0], "long_collections": [],
                           "late_max": {3: (9_000_000, 9_050_000, 50_000, 0, 1, 12)}}}},
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
    assert merged["late_send_max_per_s"] == [
        {"t_s": 2.0, "ms": 4.0, "gap_ms": 4.1, "cpu_ms": 0.1, "waits": 1, "preempted": 0,
         "page_faults": 0},
        {"t_s": 3.0, "ms": 9.0, "gap_ms": 9.05, "cpu_ms": 0.05, "waits": 0, "preempted": 1,
         "page_faults": 12}]
    lines = cli._pause_lines(merged, warmup_s=2.0)  # the consumer's pause was in the warm-up
    assert lines == [
        "client pauses: 20 garbage collections, the longest 2.0 ms (producer 0, generation 1, "
        "2.5 s after the start)",
        "paced sends: up to 9.0 ms late (3-4 s after the start; in the 9.1 ms since its last "
        "send on time the sending thread ran 0.1 ms, waited 0 times, was preempted 1 times "
        "and took 12 page faults)"]
    # what a slow second's latency may come from: the producers' late sends overlapping it
    # (their seconds count from the start: 2.0-3.0 and 3.0-4.0 meet 2.5-3.5) and its longest
    # garbage collection (the list is longest first)
    assert cli._pauses_within(merged, 2.5) == (
        "paced sends up to 9.0 ms late; the longest garbage collection 2.0 ms (producer 0)")
    assert cli._pauses_within(merged, 1.2) == (
        "paced sends up to 4.0 ms late; the longest garbage collection 31.0 ms (consumer 0)")
    assert cli._pauses_within(merged, 7.0) == (
        "no paced send 1 ms late or more; no garbage collection of 1 ms or more")
    assert cli._pause_lines(merged, warmup_s=5.0) == [
        "client pauses: 20 garbage collections, none of 1 ms or more after the warm-up"]


def test_results_without_a_watch_merge_to_nothing() -> None:
    assert runner._client_pauses({"producer": {0: {}}, "consumer": {0: {}}}, 0.0) == {}
    assert cli._pause_lines({}, 1.0) == []
