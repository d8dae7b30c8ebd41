"""The benchmark consumer's tally: what it notes, poll by poll, reaches the histogram and the
sequence bitmaps exactly, whenever it takes its pending notes in."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from shmbroker.perf import runner
from shmbroker.perf.histogram import Histogram

WARMUP_END_NS = 1_000


@settings(max_examples=60, deadline=None)
@given(polls=st.lists(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 2_000),
                                         st.integers(0, 300)), min_size=1, max_size=20),
                      max_size=700),
       reads_between=st.booleans())
def test_every_noted_record_reaches_the_result(polls: list[list[tuple[int, int, int]]],
                                               reads_between: bool) -> None:
    """Polls of records (producer, intended ns, seq) from three producers, some before the
    warm-up's end (not in the histogram, still counted seen), more polls than are kept pending
    (so some are taken in on the way); with ``reads_between``, the live p99 read in between."""
    tally = runner.ConsumerTally([0, 0], 0)
    expected = Histogram()
    second_max: dict[int, int] = {}
    seen: dict[int, list[int]] = {}
    for number, poll in enumerate(polls):
        now_ns = 5_000 + number * 300_000_000  # polls ~3 a second: runs of one second
        producers = np.array([p for p, _, _ in poll], dtype=np.int32)
        intended = np.array([i for _, i, _ in poll], dtype=np.int64)
        seqs = np.array([s for _, _, s in poll], dtype=np.int64)
        tally.note(now_ns, intended, producers, seqs, WARMUP_END_NS)
        tally.polled(len(poll))
        measured = intended[intended >= WARMUP_END_NS]
        if len(measured):
            expected.record_many(now_ns - measured)
            second = (now_ns - WARMUP_END_NS) // 1_000_000_000
            second_max[second] = max(second_max.get(second, 0), int((now_ns - measured).max()))
        for producer, _, seq in poll:
            seen.setdefault(producer, []).append(seq)
        if reads_between:
            tally.flush()
    result = tally.result()
    assert result["consumed"] == sum(len(poll) for poll in polls)
    assert Histogram.from_dict(result["histogram"]).to_dict() == expected.to_dict()
    assert set(result["seen"]) == set(seen)
    duplicates = 0
    for producer, seqs_seen in seen.items():
        counts = np.bincount(seqs_seen)
        assert result["seen"][producer] == np.packbits(counts > 0).tobytes()
        duplicates += int((counts - 1).clip(0).sum())
    assert result["duplicates"] == duplicates
    assert result["second_max"] == second_max  # each second's worst measured latency


def test_notes_are_taken_in_after_a_bounded_number_of_polls() -> None:
    """A paced consumer notes one record per poll: they reach the histogram every
    TALLY_PENDING_POLLS_MAX polls, not only at the end (the live p99 line reads it)."""
    tally = runner.ConsumerTally([0, 0], 0)
    one = np.ones(1, dtype=np.int64)
    for seq in range(runner.TALLY_PENDING_POLLS_MAX):
        assert tally.histogram.count == 0
        tally.note(10_000, one * 5_000, np.zeros(1, dtype=np.int32), one * seq, WARMUP_END_NS)
    assert tally.histogram.count == runner.TALLY_PENDING_POLLS_MAX
