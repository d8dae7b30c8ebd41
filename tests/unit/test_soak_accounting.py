"""The soak's schedule and verdict (shmbroker.perf.soak): replayable, and able to say FAILED."""

from __future__ import annotations

import numpy as np
import pytest

from shmbroker.perf.soak import (
    FAULT_KINDS,
    FaultRecord,
    SoakConfig,
    _read_rows,
    account,
    fault_table,
    schedule,
)


def test_schedule_is_replayed_by_its_seed():
    config = SoakConfig(duration_s=600, fault_interval_s=10, seed=42)
    planned = schedule(config)
    assert planned == schedule(SoakConfig(duration_s=600, fault_interval_s=10, seed=42))
    assert planned != schedule(SoakConfig(duration_s=600, fault_interval_s=10, seed=43))
    times = [at for at, _ in planned]
    assert times == sorted(times) and 0 < times[0] and times[-1] < 600
    gaps = np.diff([0.0, *times])
    assert gaps.min() >= 5 - 1e-6 and gaps.max() <= 15 + 1e-6
    assert {kind for _, kind in planned} <= set(FAULT_KINDS)
    assert len({kind for _, kind in planned}) == len(FAULT_KINDS)  # 60 draws of 8 kinds


def test_schedule_draws_only_the_chosen_kinds():
    planned = schedule(SoakConfig(duration_s=300, fault_interval_s=5, seed=1,
                                  faults=("kill_worker", "hard_restart")))
    assert {kind for _, kind in planned} == {"kill_worker", "hard_restart"}


@pytest.mark.parametrize("bad", [{"faults": ("explode",)}, {"faults": ()},
                                 {"record_size_bytes": 10}, {"acks": "2"},
                                 {"partitions": 0}])
def test_config_refuses_nonsense(bad):
    with pytest.raises(ValueError):
        SoakConfig(**bad)


def _acked(records):
    """rows (producer_id, seq, partition, offset, intended_ns)"""
    return np.array([(p, s, part, off, 1000 + s) for p, s, part, off in records],
                    dtype=np.int64).reshape(-1, 5)


def _consumed(records, at_ns=5000):
    """rows (partition, offset, producer_id, seq, intended_ns, consumed_ns)"""
    return np.array([(part, off, p, s, 1000 + s, at_ns + i)
                     for i, (p, s, part, off) in enumerate(records)],
                    dtype=np.int64).reshape(-1, 6)


LOG = [(0, 0, 0, 0), (0, 1, 1, 0), (1, 0, 0, 1), (1, 1, 1, 1), (0, 2, 0, 2)]


def test_a_clean_run():
    verdict = account(_acked(LOG), {"a": _consumed(LOG), "b": _consumed(LOG[::-1])})
    for group in ("a", "b"):
        assert verdict["groups"][group] == {"consumed": 5, "unique": 5, "lost": 0,
                                            "redelivered": 0, "unacknowledged_stored": 0}
    assert verdict["misplaced"] == 0 and verdict["stored_twice"] == 0
    assert len(verdict["first_latencies_ns"]) == 10


def test_a_lost_record_is_counted_for_the_group_that_missed_it():
    verdict = account(_acked(LOG), {"a": _consumed(LOG), "b": _consumed(LOG[:-1])})
    assert verdict["groups"]["a"]["lost"] == 0
    assert verdict["groups"]["b"]["lost"] == 1


def test_redelivery_is_counted_not_lost():
    again = LOG + LOG[1:3]
    verdict = account(_acked(LOG), {"a": _consumed(again)})
    assert verdict["groups"]["a"]["redelivered"] == 2
    assert verdict["groups"]["a"]["lost"] == 0
    assert verdict["misplaced"] == 0 and verdict["stored_twice"] == 0


def test_an_unacknowledged_record_may_be_stored():
    verdict = account(_acked(LOG[:-1]), {"a": _consumed(LOG)})
    assert verdict["groups"]["a"]["unacknowledged_stored"] == 1
    assert verdict["groups"]["a"]["lost"] == 0


def test_a_record_found_at_another_offset_is_misplaced():
    moved = [*LOG[:-1], (0, 2, 0, 3)]  # acknowledged at offset 2, consumed at offset 3
    verdict = account(_acked(LOG), {"a": _consumed(moved)})
    assert verdict["misplaced"] == 1


def test_groups_that_disagree_about_an_offset_are_misplaced():
    other = [*LOG[:-1], (1, 7, 0, 2)]  # offset (0, 2) holds another record for group b
    verdict = account(_acked(LOG), {"a": _consumed(LOG), "b": _consumed(other)})
    assert verdict["misplaced"] >= 1


def test_a_record_stored_twice_is_counted():
    twice = [*LOG, (0, 1, 1, 2)]  # the record of (1, 0) again at (1, 2)
    verdict = account(_acked(LOG), {"a": _consumed(twice)})
    assert verdict["stored_twice"] == 1


def test_torn_last_row_is_left_out(tmp_path):
    rows = np.arange(12, dtype=np.int64).reshape(2, 6)
    path = tmp_path / "m.consumed"
    path.write_bytes(rows.tobytes() + b"\x01\x02\x03")  # a writer killed mid-row
    np.testing.assert_array_equal(_read_rows([path], 6), rows)
    assert _read_rows([], 6).shape == (0, 6)


def test_fault_table_marks_what_did_not_recover():
    faults = [FaultRecord("kill_worker", 1.0, "", recover_s=0.5, max_latency_ms=20.0),
              FaultRecord("kill_worker", 9.0, "", recover_s=1.5, max_latency_ms=40.0),
              FaultRecord("hard_restart", 5.0, "", recover_s=None)]
    table = {row["kind"]: row for row in fault_table(faults)}
    assert table["kill_worker"]["count"] == 2
    assert table["kill_worker"]["recover_s_median"] == 1.0
    assert table["kill_worker"]["recover_s_max"] == 1.5
    assert table["kill_worker"]["max_latency_ms"] == 40.0
    assert table["hard_restart"]["not_recovered"] == 1
