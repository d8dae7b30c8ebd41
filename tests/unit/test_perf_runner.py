"""shmbroker-bench's chunk schedule (perf.runner.next_chunk), shared by shmbroker's columnar
producer and the peers' producers."""

from __future__ import annotations

import time

import numpy as np

from shmbroker.perf.runner import TEMPLATE_RECORDS, next_chunk


def test_unpaced_chunks_are_full_and_never_wrap_the_template():
    first, seqs, intended = next_chunk(5, 0, 0, 100)
    assert first == 5 and seqs.tolist() == list(range(5, 105))
    assert (intended == intended[0]).all() and intended[0] <= time.monotonic_ns()
    first, seqs, _ = next_chunk(TEMPLATE_RECORDS - 10, 0, 0, 100)
    assert first == TEMPLATE_RECORDS - 10 and len(seqs) == 10  # up to the template's end


def test_chunks_bigger_than_the_default_template_come_from_a_bigger_one():
    template = 10_000  # a producer with chunk_records = 10,000 makes a template that long
    first, seqs, _ = next_chunk(3 * template, 0, 0, template, template)
    assert first == 0 and seqs.tolist() == list(range(3 * template, 4 * template))
    first, seqs, _ = next_chunk(template + 9_000, 0, 0, template, template)
    assert first == 9_000 and len(seqs) == 1_000  # still never wraps


def test_paced_chunks_send_what_is_due_at_its_intended_times():
    interval_ns = 1_000_000  # 1,000 records/s
    start_ns = time.monotonic_ns() - 50 * interval_ns  # 50 records (and a bit) are due
    first, seqs, intended = next_chunk(0, start_ns, interval_ns, 1000)
    assert first == 0 and 50 <= len(seqs) < 1000
    np.testing.assert_array_equal(intended, start_ns + seqs * interval_ns)
    # nothing due yet: None, after a sleep of at most 1 ms
    assert next_chunk(10**6, time.monotonic_ns(), interval_ns, 1000) is None
