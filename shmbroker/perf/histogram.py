"""Log-linear latency histogram (HdrHistogram's bucket layout) on numpy, mergeable across processes.

Each benchmark process records its latencies into a :class:`Histogram`, sends
:meth:`Histogram.to_dict` to the parent, and the parent merges them: a fixed bucket layout makes
merging an addition of two count arrays, and percentiles of the merged histogram are as accurate
as those of one histogram fed every value.

Layout, for values in nanoseconds clamped into ``[0, VALUE_NS_MAX]`` (``2**42 - 1`` ns, about
73 minutes) and ``S = 2**sub_bucket_bits`` linear sub-buckets per power of two::

    value v                          shift          bucket index              bucket width
    0 <= v < 2*S                     0              v                         1 (exact)
    2**e <= v < 2**(e+1), e > b      e - b          shift * S + (v >> shift)  2**shift

that is ``shift = max(floor(log2 v) - sub_bucket_bits, 0)`` and
``index = shift * S + (v >> shift)``; the buckets tile ``[0, VALUE_NS_MAX]`` without gaps and
there are ``(VALUE_BITS - sub_bucket_bits + 1) * S`` of them (4608 for the default 7 bits, 36 KiB
of int64 counts).  A bucket of width ``2**shift`` starts at ``>= S * 2**shift``, so any value
in it is within ``1/S`` of the bucket's bounds: **relative error below 2**-sub_bucket_bits**,
0.79 % for the default.

Invariants: ``count == counts.sum()``; when ``count > 0``, ``min <= max`` are the exact extremes
of the recorded (clamped) values and ``sum`` is their exact sum, so ``mean`` is exact.

Out-of-range values: a value ``<= 0`` is recorded as 0 (bucket 0: a negative latency is a clock
artefact, not a measurement); a value above ``VALUE_NS_MAX`` is recorded as ``VALUE_NS_MAX`` (the
last bucket) and counted in ``overflow``, so ``max == VALUE_NS_MAX`` with ``overflow > 0`` reads
"some latency was at least 73 minutes".  min, max, sum and mean describe the clamped values.

Empty histogram: ``min``, ``max``, ``mean`` and every percentile are 0, as in HdrHistogram, so the
report of a second in which nothing arrived prints zeros instead of failing; look at ``count``.

Percentiles use the nearest-rank definition (numpy's ``method="inverted_cdf"``): the value of
rank ``ceil(p / 100 * count)`` (at least 1), reported as the upper bound of its bucket clamped
into ``[min, max]``; it is never below the true value and exceeds it by less than the relative
error.  Rank 1 is exactly ``min`` and rank ``count`` exactly ``max``.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Mapping
from fractions import Fraction
from functools import lru_cache
from typing import Any

import numpy as np
import numpy.typing as npt

I64 = npt.NDArray[np.int64]

VALUE_BITS = 42
VALUE_NS_MAX = (1 << VALUE_BITS) - 1  # 4398 s, about 73 minutes
SUB_BUCKET_BITS_DEFAULT = 7  # relative error < 2**-7 = 0.79 %
SUB_BUCKET_BITS_MIN = 1
SUB_BUCKET_BITS_MAX = 12  # 31 * 4096 buckets = 1 MiB of counts; finer is not worth it
_LOW_32_BITS = 0xFFFF_FFFF


def bucket_count(sub_bucket_bits: int) -> int:
    """Number of buckets of the layout with ``2**sub_bucket_bits`` sub-buckets per power of 2."""
    return (VALUE_BITS - sub_bucket_bits + 1) << sub_bucket_bits


@lru_cache(maxsize=SUB_BUCKET_BITS_MAX)
def _bucket_upper_bounds(sub_bucket_bits: int) -> I64:
    """Largest value (inclusive) of each bucket: the inverse of the index formula above."""
    index = np.arange(bucket_count(sub_bucket_bits), dtype=np.int64)
    shift = np.maximum((index >> sub_bucket_bits) - 1, 0)
    lower = (index - (shift << sub_bucket_bits)) << shift
    upper = lower + (np.int64(1) << shift) - 1
    upper.flags.writeable = False
    return upper


def _check_sub_bucket_bits(sub_bucket_bits: object) -> int:
    if (not isinstance(sub_bucket_bits, int) or isinstance(sub_bucket_bits, bool)
            or not SUB_BUCKET_BITS_MIN <= sub_bucket_bits <= SUB_BUCKET_BITS_MAX):
        raise ValueError(f"sub_bucket_bits must be an integer in [{SUB_BUCKET_BITS_MIN}, "
                         f"{SUB_BUCKET_BITS_MAX}], got {sub_bucket_bits!r}")
    return sub_bucket_bits


def _rank(percentile: float, count: int) -> int:
    """Nearest rank of ``percentile`` among ``count`` values, in exact arithmetic.

    ``repr`` gives the decimal the caller wrote (99.9), not the binary float just above it, which
    would turn "the 999th of 1000" into the 1000th.
    """
    return max(1, math.ceil(Fraction(repr(percentile)) * count / 100))


def _check_percentile(percentile: float) -> float:
    value = float(percentile)
    if not 0.0 <= value <= 100.0:  # NaN fails too
        raise ValueError(f"percentile must be in [0, 100], got {percentile!r}")
    return value


class Histogram:
    """Counts of nanosecond values in log-linear buckets, plus exact count, min, max and sum.

    >>> h = Histogram()
    >>> h.record_many(np.array([1_000, 2_000, 3_000, 1_000_000]))
    >>> h.count, h.min, h.max, h.percentile(50)   # 2000 lies in the bucket [2000, 2007]
    (4, 1000, 1000000, 2007)
    """

    __slots__ = ("sub_bucket_bits", "counts", "overflow", "_count", "_min", "_max", "_sum")

    def __init__(self, sub_bucket_bits: int = SUB_BUCKET_BITS_DEFAULT) -> None:
        self.sub_bucket_bits = _check_sub_bucket_bits(sub_bucket_bits)
        self.counts: I64 = np.zeros(bucket_count(sub_bucket_bits), dtype=np.int64)
        self.overflow = 0  # values above VALUE_NS_MAX, counted in the last bucket
        self._count = 0
        self._min = VALUE_NS_MAX  # meaningful only while _count > 0
        self._max = 0
        self._sum = 0  # a Python int: exact whatever the number of values

    # -- recording -------------------------------------------------------------------------------

    def record(self, value_ns: int) -> None:
        """Record one value (an int; see the module docstring for values out of range)."""
        value = operator.index(value_ns)
        if value <= 0:
            value = 0
        elif value > VALUE_NS_MAX:
            value = VALUE_NS_MAX
            self.overflow += 1
        shift = max(value.bit_length() - 1 - self.sub_bucket_bits, 0)
        self.counts[(shift << self.sub_bucket_bits) + (value >> shift)] += 1
        self._count += 1
        self._min = min(self._min, value)
        self._max = max(self._max, value)
        self._sum += value

    def record_many(self, values_ns: npt.ArrayLike) -> None:
        """Record an integer array of values: a dozen numpy calls whatever its length."""
        values = np.asarray(values_ns).reshape(-1)
        if values.dtype.kind not in "iu":
            raise TypeError(f"record_many takes integer nanoseconds, got dtype {values.dtype}")
        if values.size == 0:
            return
        if values.dtype.kind == "u":  # uint64 above 2**63 would wrap negative in int64
            values = np.minimum(values, VALUE_NS_MAX + 1)  # still counts as overflow
        values = values.astype(np.int64, copy=False)
        overflow = int(np.count_nonzero(values > VALUE_NS_MAX))
        clamped = np.clip(values, 0, VALUE_NS_MAX)
        # frexp is exact for integers below 2**53: v = m * 2**e with m in [0.5, 1), so
        # floor(log2 v) = e - 1 (and e = 0 for v = 0, which lands in shift 0 as it should).
        _, exponent = np.frexp(clamped.astype(np.float64))
        shift = np.maximum(exponent.astype(np.int64) - 1 - self.sub_bucket_bits, 0)
        index = (shift << self.sub_bucket_bits) + (clamped >> shift)
        self.counts += np.bincount(index, minlength=len(self.counts))
        self.overflow += overflow
        self._count += int(clamped.size)
        self._min = min(self._min, int(clamped.min()))
        self._max = max(self._max, int(clamped.max()))
        # Exact sum without int64 overflow: high and low 32-bit halves summed apart.
        high = int((clamped >> 32).sum())
        low = int((clamped & _LOW_32_BITS).sum())
        self._sum += (high << 32) + low

    def merge(self, other: Histogram) -> None:
        """Add ``other``'s values to this histogram (ValueError if its layout differs)."""
        if not isinstance(other, Histogram):
            raise TypeError(f"can only merge a Histogram, not {type(other).__name__}")
        if other.sub_bucket_bits != self.sub_bucket_bits:
            raise ValueError(f"cannot merge histograms of different layouts: sub_bucket_bits "
                             f"{self.sub_bucket_bits} and {other.sub_bucket_bits}")
        if other._count == 0:
            return
        self.counts += other.counts
        self.overflow += other.overflow
        self._count += other._count
        self._min = min(self._min, other._min)
        self._max = max(self._max, other._max)
        self._sum += other._sum

    def copy(self) -> Histogram:
        twin = Histogram(self.sub_bucket_bits)
        twin.merge(self)
        return twin

    def clear(self) -> None:
        """Forget every value (the layout stays): for per-interval snapshots."""
        self.counts[:] = 0
        self.overflow = self._count = self._max = self._sum = 0
        self._min = VALUE_NS_MAX

    # -- statistics ------------------------------------------------------------------------------

    @property
    def count(self) -> int:
        return self._count

    @property
    def min(self) -> int:
        return self._min if self._count else 0

    @property
    def max(self) -> int:
        return self._max

    @property
    def sum(self) -> int:
        return self._sum

    @property
    def mean(self) -> float:
        return self._sum / self._count if self._count else 0.0

    @property
    def relative_error_max(self) -> float:
        """Bound on ``(percentile(p) - true value) / true value``."""
        return 2.0 ** -self.sub_bucket_bits

    def percentile(self, percentile: float) -> int:
        """The value at ``percentile`` (0..100) in ns; see the module docstring for the rules."""
        return self.percentiles([percentile])[float(percentile)]

    def percentiles(self, percentiles: Iterable[float]) -> dict[float, int]:
        """``{p: value_ns}`` for each p, with one cumulative sum for all of them."""
        wanted = [_check_percentile(p) for p in percentiles]
        if self._count == 0:
            return dict.fromkeys(wanted, 0)
        cumulative = np.cumsum(self.counts)
        upper = _bucket_upper_bounds(self.sub_bucket_bits)
        result = {}
        for percentile in wanted:
            rank = _rank(percentile, self._count)
            if rank == 1:
                value = self._min
            elif rank >= self._count:
                value = self._max
            else:
                index = int(np.searchsorted(cumulative, rank, side="left"))
                value = min(max(int(upper[index]), self._min), self._max)
            result[percentile] = value
        return result

    # -- serialisation ---------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable (orjson) sparse form: only non-empty buckets are listed."""
        nonzero = np.flatnonzero(self.counts)
        return {
            "sub_bucket_bits": self.sub_bucket_bits,
            "counts": np.stack([nonzero, self.counts[nonzero]], axis=1).tolist(),
            "min": self.min,
            "max": self.max,
            "sum": self._sum,
            "overflow": self.overflow,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Histogram:
        """Inverse of :meth:`to_dict`; ValueError for a dict that no histogram could produce."""
        missing = {"sub_bucket_bits", "counts", "min", "max", "sum", "overflow"} - set(data)
        if missing:
            raise ValueError(f"histogram dict lacks {', '.join(sorted(missing))}")
        histogram = cls(data["sub_bucket_bits"])
        try:
            pairs = np.asarray(data["counts"], dtype=np.int64).reshape(-1, 2)
        except (TypeError, ValueError, OverflowError) as error:
            raise ValueError(f"histogram counts must be [[index, count], ...]: {error}") from None
        index, counts = pairs[:, 0], pairs[:, 1]
        if len(index) and (index.min() < 0 or index.max() >= len(histogram.counts)):
            raise ValueError(f"histogram bucket index out of range [0, {len(histogram.counts)})")
        if len(np.unique(index)) != len(index) or (counts < 0).any():
            raise ValueError("histogram counts list a bucket twice or a negative count")
        histogram.counts[index] = counts
        total = int(counts.sum())
        scalars = {key: data[key] for key in ("min", "max", "sum", "overflow")}
        for key, value in scalars.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"histogram {key} must be an integer >= 0, got {value!r}")
        if total and not scalars["min"] <= scalars["max"] <= VALUE_NS_MAX:
            raise ValueError(f"histogram min {scalars['min']} and max {scalars['max']} must "
                             f"satisfy min <= max <= {VALUE_NS_MAX}")
        low, high = (scalars["min"] * total, scalars["max"] * total) if total else (0, 0)
        if not low <= scalars["sum"] <= high:
            raise ValueError(f"histogram sum {scalars['sum']} is impossible for {total} values "
                             f"in [{scalars['min']}, {scalars['max']}]")
        if scalars["overflow"] > total:
            raise ValueError(f"histogram overflow {scalars['overflow']} exceeds its count {total}")
        histogram._count = total
        if total:
            histogram._min, histogram._max = scalars["min"], scalars["max"]
        histogram._sum = scalars["sum"]
        histogram.overflow = scalars["overflow"]
        return histogram

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Histogram):
            return NotImplemented
        return (self.sub_bucket_bits == other.sub_bucket_bits
                and np.array_equal(self.counts, other.counts)
                and (self.count, self.min, self.max, self.sum, self.overflow)
                == (other.count, other.min, other.max, other.sum, other.overflow))

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        if not self._count:
            return f"Histogram(sub_bucket_bits={self.sub_bucket_bits}, empty)"
        p50, p99 = self.percentiles([50, 99]).values()
        return (f"Histogram(count={self._count}, min={self.min}, p50={p50}, p99={p99}, "
                f"max={self._max}, overflow={self.overflow})")
