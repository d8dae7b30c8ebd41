"""The latency histogram: accuracy against numpy on raw values, merging, serialisation.

The reference for percentiles is computed from the sorted raw values with integer arithmetic
(nearest rank), independently of the histogram's own rank code; numpy.percentile brackets it.
Randomised tests are hypothesis tests (it prints the failing example) or print their seed
(``SHMB_HISTOGRAM_SEED=<n>`` replays one).
"""

from __future__ import annotations

import os
import random

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shmbroker.perf.histogram import (
    SUB_BUCKET_BITS_DEFAULT,
    VALUE_NS_MAX,
    Histogram,
    bucket_count,
)

SETTINGS = settings(max_examples=200, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
values_ns = st.integers(-(10**6), VALUE_NS_MAX + 10**9)
value_lists = st.lists(values_ns, max_size=300)
in_range_lists = st.lists(st.integers(0, VALUE_NS_MAX), min_size=1, max_size=300)


def seed_for(test: str) -> int:
    seed = int(os.environ.get("SHMB_HISTOGRAM_SEED", random.randrange(1 << 32)))
    print(f"{test}: seed {seed} (replay with SHMB_HISTOGRAM_SEED={seed})")
    return seed


def histogram_of(values: list[int] | np.ndarray, sub_bucket_bits: int = 7) -> Histogram:
    histogram = Histogram(sub_bucket_bits)
    histogram.record_many(np.asarray(values, dtype=np.int64))
    return histogram


def nearest_rank(sorted_values: np.ndarray, percentile: int) -> int:
    """The value of rank ceil(p/100 * n) (at least 1), in integer arithmetic."""
    rank = max(1, -(-percentile * len(sorted_values) // 100))
    return int(sorted_values[rank - 1])


# -- layout ---------------------------------------------------------------------------------------

def test_layout_of_the_default() -> None:
    assert SUB_BUCKET_BITS_DEFAULT == 7
    assert bucket_count(7) == 36 * 128
    assert Histogram().counts.shape == (4608,) and Histogram().counts.dtype == np.int64
    assert Histogram().relative_error_max == 2**-7 < 0.01
    assert VALUE_NS_MAX >= 3600 * 10**9  # at least one hour


def test_small_values_are_exact() -> None:
    histogram = histogram_of(np.arange(256))  # [0, 2 * 128): one bucket per value
    assert (histogram.counts[:256] == 1).all() and histogram.counts[256:].sum() == 0
    assert histogram.percentiles([1, 50, 99]) == {1: 2, 50: 127, 99: 253}


def test_every_bucket_upper_bound_maps_to_its_own_bucket() -> None:
    """Bucket bounds and the index formula agree: bucket i holds [upper(i-1) + 1, upper(i)]."""
    from shmbroker.perf.histogram import _bucket_upper_bounds

    for bits in (1, 3, 7, 12):
        upper = _bucket_upper_bounds(bits)
        assert upper[-1] == VALUE_NS_MAX and upper[0] == 0
        lower = np.concatenate([[0], upper[:-1] + 1])
        for edge in (lower, upper):
            assert (histogram_of(edge, bits).counts == 1).all()
        width = upper - lower + 1
        assert ((width - 1) / np.maximum(lower, 1) < 2.0**-bits).all()


# -- recording -----------------------------------------------------------------------------------

@SETTINGS
@given(values=value_lists)
def test_record_many_equals_record_one_by_one(values: list[int]) -> None:
    one_by_one = Histogram()
    for value in values:
        one_by_one.record(value)
    assert histogram_of(values) == one_by_one
    assert one_by_one.count == len(values)


@SETTINGS
@given(values=value_lists)
def test_exact_statistics_of_clamped_values(values: list[int]) -> None:
    histogram = histogram_of(values)
    clamped = [min(max(value, 0), VALUE_NS_MAX) for value in values]
    assert histogram.count == len(values) == int(histogram.counts.sum())
    assert histogram.overflow == sum(value > VALUE_NS_MAX for value in values)
    if values:
        assert (histogram.min, histogram.max, histogram.sum) == (min(clamped), max(clamped),
                                                                 sum(clamped))
        assert histogram.mean == pytest.approx(sum(clamped) / len(clamped), rel=1e-12)
    else:
        assert (histogram.min, histogram.max, histogram.mean) == (0, 0, 0.0)


def test_out_of_range_values() -> None:
    histogram = Histogram()
    histogram.record(-5)
    histogram.record(0)
    histogram.record_many(np.array([VALUE_NS_MAX + 1, 2**63 - 1]))
    histogram.record_many(np.array([2**64 - 1], dtype=np.uint64))
    assert histogram.counts[0] == 2 and histogram.counts[-1] == 3
    assert histogram.overflow == 3 and histogram.max == VALUE_NS_MAX and histogram.min == 0
    assert histogram.percentile(100) == VALUE_NS_MAX


def test_sum_is_exact_beyond_int64() -> None:
    histogram = Histogram()
    many = np.full(3_000_000, VALUE_NS_MAX, dtype=np.int64)  # sum > 2**63
    histogram.record_many(many)
    assert histogram.sum == 3_000_000 * VALUE_NS_MAX > 2**63


def test_record_refuses_non_integers() -> None:
    with pytest.raises(TypeError):
        Histogram().record(1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="integer nanoseconds"):
        Histogram().record_many(np.array([1.5]))


# -- percentiles ---------------------------------------------------------------------------------

@SETTINGS
@given(values=in_range_lists, percentile=st.integers(0, 100),
       bits=st.integers(1, 12))
def test_percentile_within_relative_error_of_the_true_value(values: list[int], percentile: int,
                                                            bits: int) -> None:
    histogram = histogram_of(values, bits)
    exact = nearest_rank(np.sort(values), percentile)
    found = histogram.percentile(percentile)
    assert exact <= found <= exact + exact * 2.0**-bits, (exact, found)


def test_lognormal_percentiles_against_numpy() -> None:
    seed = seed_for("test_lognormal_percentiles_against_numpy")
    rng = np.random.default_rng(seed)
    for sigma in (0.5, 1.0, 2.0):
        values = rng.lognormal(mean=13.0, sigma=sigma, size=50_000).astype(np.int64)
        histogram = histogram_of(values)
        wanted = [0, 1, 10, 25, 50, 75, 90, 99, 99.9, 99.99, 100]
        found = histogram.percentiles(wanted)
        # numpy's "lower" and "higher" order statistics bracket the nearest-rank value
        lower = np.percentile(values, wanted, method="lower")
        higher = np.percentile(values, wanted, method="higher")
        for percentile, low, high in zip(wanted, lower, higher):
            value = found[percentile]
            assert low <= value <= high * (1 + histogram.relative_error_max), (
                seed, sigma, percentile, low, value, high)


def test_percentile_rank_uses_the_decimal_the_caller_wrote() -> None:
    histogram = histogram_of(np.arange(1, 1001) * 1000)  # ranks 1..1000
    # 99.9 % of 1000 is rank 999, although the float 99.9 is a hair above 99.9
    assert 999_000 <= histogram.percentile(99.9) < 1_000_000  # not rank 1000, the max
    assert histogram.percentile(0) == 1000 and histogram.percentile(100) == 1_000_000


def test_empty_histogram_reports_zeros() -> None:
    histogram = Histogram()
    assert histogram.percentiles([0, 50, 100]) == {0: 0, 50: 0, 100: 0}
    assert (histogram.count, histogram.min, histogram.max, histogram.mean) == (0, 0, 0, 0.0)


@pytest.mark.parametrize("bad", [-0.1, 100.5, float("nan"), float("inf")])
def test_percentile_out_of_range(bad: float) -> None:
    with pytest.raises(ValueError, match=r"percentile must be in \[0, 100\]"):
        histogram_of([1, 2, 3]).percentile(bad)


# -- merge and serialisation ---------------------------------------------------------------------

@SETTINGS
@given(first=value_lists, second=value_lists)
def test_merge_of_two_equals_one_of_both(first: list[int], second: list[int]) -> None:
    merged = histogram_of(first)
    merged.merge(histogram_of(second))
    assert merged == histogram_of(first + second)


def test_merge_refuses_another_layout() -> None:
    with pytest.raises(ValueError, match="different layouts: sub_bucket_bits 7 and 5"):
        Histogram(7).merge(Histogram(5))


def test_copy_and_clear() -> None:
    histogram = histogram_of([5, 10_000, 10**9])
    twin = histogram.copy()
    histogram.clear()
    assert histogram == Histogram() and twin == histogram_of([5, 10_000, 10**9])


@SETTINGS
@given(values=value_lists, bits=st.integers(1, 12))
def test_to_dict_from_dict_round_trip_through_orjson(values: list[int], bits: int) -> None:
    histogram = histogram_of(values, bits)
    wire = orjson.dumps(histogram.to_dict())
    back = Histogram.from_dict(orjson.loads(wire))
    assert back == histogram
    assert back.percentiles([50, 99]) == histogram.percentiles([50, 99])


def test_to_dict_is_sparse() -> None:
    data = histogram_of([3, 3, 1_000_000]).to_dict()
    assert data["sub_bucket_bits"] == 7 and len(data["counts"]) == 2
    assert data["counts"][0] == [3, 2]
    assert (data["min"], data["max"], data["sum"], data["overflow"]) == (3, 1_000_000,
                                                                        1_000_006, 0)


@pytest.mark.parametrize(("change", "message"), [
    ({"counts": [[4608, 1]]}, "bucket index out of range"),
    ({"counts": [[1, 1], [1, 2]]}, "a bucket twice"),
    ({"counts": [[1, -1]]}, "negative count"),
    ({"min": 9, "max": 2}, "min <= max"),
    ({"sum": 10**9}, "sum 1000000000 is impossible"),
    ({"overflow": 5}, "overflow 5 exceeds its count"),
    ({"sub_bucket_bits": 40}, "sub_bucket_bits must be an integer in"),
    ({"counts": "many"}, r"\[\[index, count\], ...\]"),
])
def test_from_dict_refuses_impossible_dicts(change: dict, message: str) -> None:
    data = histogram_of([1, 2]).to_dict() | change
    with pytest.raises(ValueError, match=message):
        Histogram.from_dict(data)


def test_from_dict_names_missing_keys() -> None:
    with pytest.raises(ValueError, match="lacks max, sum"):
        Histogram.from_dict({"sub_bucket_bits": 7, "counts": [], "min": 0, "overflow": 0})
