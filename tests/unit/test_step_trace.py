"""The worker's step trace (shmbroker/partition/trace.py) and what bench/latency_trace.py makes
of it: each record's stages from the producer's, the worker's and the consumer's timestamps."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from shmbroker.partition import trace

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "latency_trace.py"


def _bench_module():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("latency_trace", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_off_unless_the_environment_names_a_directory(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(trace.TRACE_DIR_ENVIRONMENT, raising=False)
    assert trace.StepTrace.from_environment("metrics/3") is None
    monkeypatch.setenv(trace.TRACE_DIR_ENVIRONMENT, str(tmp_path / "traces"))
    found = trace.StepTrace.from_environment("metrics/3")
    assert found is not None
    assert found.path.parent == tmp_path / "traces"
    assert found.path.name.startswith("worker-metrics-3-") and found.path.suffix == ".npz"


def test_steps_are_saved_in_order_up_to_the_cap(tmp_path: Path) -> None:
    steps = trace.StepTrace(tmp_path / "deep" / "worker.npz", events_max=3)
    steps.note(trace.APPEND_BEGIN, 10)
    steps.note(trace.APPEND_END, 12)
    steps.note(trace.FETCH_ANSWERED, 10, 12)
    steps.note(trace.WOKE, 1)  # past the cap: dropped
    assert len(steps) == 3
    steps.save()
    saved = trace.load(steps.path)
    assert saved["kinds"].tolist() == [trace.APPEND_BEGIN, trace.APPEND_END,
                                       trace.FETCH_ANSWERED]
    assert saved["first"].tolist() == [10, 12, 10]
    assert saved["second"].tolist() == [0, 0, 12]
    assert np.all(np.diff(saved["times_ns"]) >= 0)
    assert [path.name for path in steps.path.parent.iterdir()] == ["worker.npz"]


def _steps(rows: list[tuple[int, int, int, int]]) -> dict[str, np.ndarray]:
    table = np.array(rows, dtype=np.int64)
    return {"times_ns": table[:, 0], "kinds": table[:, 1], "first": table[:, 2],
            "second": table[:, 3]}


# Two regions of two records each; the first fetch parked and answered after the first append,
# the next one read 75 us after that answer, parked, answered after the second append.
WORKER = _steps([
    (5_000, trace.FETCH_READ, 0, 0), (6_000, trace.FETCH_PARKED, 0, 0),
    (10_000, trace.APPEND_BEGIN, 0, 0), (20_000, trace.APPEND_END, 2, 0),
    (25_000, trace.FETCH_ANSWERED, 0, 2),
    (100_000, trace.FETCH_READ, 2, 0), (101_000, trace.FETCH_PARKED, 2, 0),
    (310_000, trace.APPEND_BEGIN, 2, 0), (330_000, trace.APPEND_END, 4, 0),
    (340_000, trace.FETCH_ANSWERED, 2, 4)])
INTENDED = np.array([0, 2_000, 300_000, 302_000, 400_000])
PRODUCER = {"intended": INTENDED, "called": INTENDED + 1_000, "returned": INTENDED + 6_000}


def test_each_record_is_cut_into_stages() -> None:
    bench = _bench_module()
    consumer = {"offsets": np.arange(5), "indexes": np.arange(5),
                "received": np.array([40_000, 40_000, 360_000, 360_000, 500_000])}
    found = bench.stages(PRODUCER, consumer, WORKER)  # record 4: appended by no region traced
    expected = {"pacing": [1, 1, 1, 1], "send call": [5, 5, 5, 5],
                "to the worker": [9, 7, 9, 7], "append": [10, 10, 20, 20],
                "to the answer": [5, 5, 10, 10], "to the consumer": [15, 15, 20, 20],
                "total": [40, 38, 60, 58], bench.PARKED_ANSWER: [5, 5, 10, 10],
                bench.LATER_ANSWER: [], bench.READ_DIRECTLY: []}
    assert {name: values.tolist() for name, values in found.items()} == expected


def test_records_no_answer_held_were_read_directly() -> None:
    """The consumer read the second region from the segment file itself (no second answer):
    its records have no "to the answer", and "to the consumer" runs from the append's end."""
    bench = _bench_module()
    rows = [row for row in zip(*(WORKER[name].tolist() for name in
                                 ("times_ns", "kinds", "first", "second")))
            if row[0] not in (100_000, 101_000, 340_000)]  # no second fetch
    consumer = {"offsets": np.arange(4), "indexes": np.arange(4),
                "received": np.array([40_000, 40_000, 345_000, 345_000])}
    found = bench.stages(PRODUCER, consumer, _steps(sorted(rows)))
    assert found["to the answer"].tolist() == [5, 5]
    assert found["to the consumer"].tolist() == [15, 15, 15, 15]
    assert found[bench.READ_DIRECTLY].tolist() == [15, 15]
    assert found["total"].tolist() == [40, 38, 45, 43]
    assert list(found)[6:9] == [bench.LATER_ANSWER, "to the consumer", bench.READ_DIRECTLY]


def test_to_the_answer_is_split_by_how_the_record_left() -> None:
    """The second fetch arrives after the second region is appended: answered at once."""
    bench = _bench_module()
    rows = [row for row in zip(*(WORKER[name].tolist() for name in
                                 ("times_ns", "kinds", "first", "second")))
            if row[0] not in (100_000, 101_000, 340_000)]  # the second fetch, parked
    rows += [(335_000, trace.FETCH_READ, 2, 0), (336_000, trace.FETCH_ANSWERED, 2, 4)]
    consumer = {"offsets": np.arange(4), "indexes": np.arange(4),
                "received": np.array([40_000, 40_000, 360_000, 360_000])}
    found = bench.stages(PRODUCER, consumer, _steps(sorted(rows)))
    assert found[bench.PARKED_ANSWER].tolist() == [5, 5]
    assert found[bench.LATER_ANSWER].tolist() == [6, 6]
    assert found["to the answer"].tolist() == [5, 5, 6, 6]
    assert list(found)[4:7] == ["to the answer", bench.PARKED_ANSWER, bench.LATER_ANSWER]


def test_offsets_that_are_not_the_indexes_are_refused() -> None:
    consumer = {"offsets": np.arange(2) + 7, "indexes": np.arange(2),
                "received": np.array([40_000, 40_000])}
    with pytest.raises(ValueError, match="not its index"):
        _bench_module().stages(PRODUCER, consumer, WORKER)


def test_the_fetch_cycle() -> None:
    found = _bench_module().fetch_cycle(WORKER)
    assert found["answered at once"].tolist() == []
    assert found["parked, then answered"].tolist() == [20, 240]
    assert found["answer -> next fetch"].tolist() == [75]
