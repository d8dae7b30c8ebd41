import random
import warnings
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shmbroker.client.partitioner import (
    StickyPartitioner,
    murmur2,
    partition_for_key,
    to_positive,
)
from shmbroker.errors import InvalidPartitionsError

with warnings.catch_warnings():
    # kafka-python 3.0 loads its protocol schemas with importlib.resources.read_text, which
    # Python 3.11 deprecates; the warning is theirs, not ours (filterwarnings = error).
    warnings.simplefilter("ignore", DeprecationWarning)
    from kafka.partitioner.default import murmur2 as kafka_python_murmur2

# Apache Kafka, clients/src/test/java/org/apache/kafka/common/utils/UtilsTest.java, testMurmur2.
KAFKA_UTILS_TEST = [
    (b"21", -973932308),
    (b"foobar", -790332482),
    (b"a-little-bit-long-string", -985981536),
    (b"a-little-bit-longer-string", -1486304829),
    (b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58897971),
    (bytes([ord("a"), ord("b"), ord("c")]), 479470107),
]
# librdkafka's rdmurmur2.c unit test (its murmur2 is the Java one; expected values unsigned).
LIBRDKAFKA_TEST = [
    (b"kafka", 0xD067CF64),
    (b"giberish123456789", 0x8F552B0C),
    (b"1234", 0x9FC97B14),
    (b"234", 0xE7C009CA),
    (b"34", 0x873930DA),
    (b"4", 0x5A4B5CA1),
    (b"PreAmbleWillBeRemoved,ThePrePartThatIs", 0x78424F1C),
    (b"", 0x106E08D9),
]


@pytest.mark.parametrize("key, expected", KAFKA_UTILS_TEST)
def test_kafka_utils_test_vectors(key, expected):
    assert murmur2(key) == expected


@pytest.mark.parametrize("key, expected", LIBRDKAFKA_TEST)
def test_librdkafka_vectors(key, expected):
    assert murmur2(key) & 0xFFFFFFFF == expected
    assert -(2**31) <= murmur2(key) < 2**31


def test_buffer_types_and_unaligned_views():
    key = b"PreAmbleWillBeRemoved,ThePrePartThatIs"
    for start in range(8):
        expected = murmur2(key[start:])
        assert murmur2(bytearray(key[start:])) == expected
        assert murmur2(memoryview(key)[start:]) == expected


def test_long_keys_beyond_cached_unpackers():
    for length in (255, 256, 257, 260, 1000, 4099):
        key = random.Random(length).randbytes(length)
        assert murmur2(key) & 0xFFFFFFFF == kafka_python_murmur2(key)


@given(st.binary(min_size=0, max_size=100))
def test_matches_kafka_python(key):
    # kafka-python returns the same 32 bits, unsigned.
    assert murmur2(key) & 0xFFFFFFFF == kafka_python_murmur2(key)
    assert -(2**31) <= murmur2(key) < 2**31


def test_to_positive():
    assert to_positive(-1) == 0x7FFFFFFF
    assert to_positive(-(2**31)) == 0
    assert to_positive(5) == 5
    assert to_positive(2**31 - 1) == 2**31 - 1


@given(st.binary(max_size=64), st.integers(1, 5000))
def test_partition_for_key_is_java_formula(key, partitions):
    partition = partition_for_key(key, partitions)
    assert partition == (kafka_python_murmur2(key) & 0x7FFFFFFF) % partitions
    assert 0 <= partition < partitions


def test_partition_for_key_known_values():
    # toPositive(-790332482) = 1357151166
    assert partition_for_key(b"foobar", 10) == 1357151166 % 10 == 6
    assert partition_for_key(b"abc", 7) == 479470107 % 7


@pytest.mark.parametrize("partitions", [0, -1])
def test_partition_for_key_refuses_no_partitions(partitions):
    with pytest.raises(InvalidPartitionsError):
        partition_for_key(b"k", partitions)


# -- sticky ---------------------------------------------------------------------------------------

def test_sticky_stays_until_new_batch():
    sticky = StickyPartitioner(random.Random(1))
    first = sticky.partition("t", 8)
    assert all(sticky.partition("t", 8) == first for _ in range(100))
    second = sticky.on_new_batch("t", 8, first)
    assert second != first
    assert sticky.partition("t", 8) == second


def test_sticky_is_per_topic():
    sticky = StickyPartitioner(random.Random(2))
    chosen = {topic: sticky.partition(topic, 1000) for topic in ("a", "b", "c")}
    sticky.on_new_batch("a", 1000, chosen["a"])
    assert sticky.partition("b", 1000) == chosen["b"]
    assert sticky.partition("c", 1000) == chosen["c"]


@pytest.mark.parametrize("seed", range(20))
def test_new_batch_never_repeats_previous(seed):
    rng = random.Random(seed)
    sticky = StickyPartitioner(rng)
    partitions = rng.randrange(2, 6)
    current = sticky.partition("t", partitions)
    for _ in range(200):
        following = sticky.on_new_batch("t", partitions, current)
        assert following != current and 0 <= following < partitions
        current = following


def test_new_batch_choice_is_uniform_over_the_others():
    sticky = StickyPartitioner(random.Random(3))
    counts = Counter()
    current = sticky.partition("t", 4)
    for _ in range(8000):
        previous, current = current, sticky.on_new_batch("t", 4, current)
        counts[(previous, current)] += 1
    assert len(counts) == 12  # every ordered pair of distinct partitions
    assert min(counts.values()) > 8000 / 12 * 0.8


def test_single_partition_always_zero():
    sticky = StickyPartitioner(random.Random(4))
    assert sticky.partition("t", 1) == 0
    assert sticky.on_new_batch("t", 1, 0) == 0


def test_stale_new_batch_keeps_current():
    sticky = StickyPartitioner(random.Random(5))
    first = sticky.partition("t", 10)
    second = sticky.on_new_batch("t", 10, first)
    # A second batch completion on `first` arrives late: the topic has moved already.
    assert sticky.on_new_batch("t", 10, first) == second


def test_new_batch_before_partition_call():
    sticky = StickyPartitioner(random.Random(6))
    chosen = sticky.on_new_batch("t", 3, 1)
    assert chosen in (0, 2)
    assert sticky.partition("t", 3) == chosen


def test_partition_count_shrank_under_sticky_choice():
    sticky = StickyPartitioner(random.Random(7))
    while sticky.partition("t", 100) < 10:
        sticky.on_new_batch("t", 100, sticky.partition("t", 100))
    assert sticky.partition("t", 10) < 10


def test_sticky_refuses_no_partitions():
    with pytest.raises(InvalidPartitionsError, match="topic 't' has no partitions"):
        StickyPartitioner().partition("t", 0)


def test_seeded_partitioners_replay():
    first = StickyPartitioner(random.Random(42))
    second = StickyPartitioner(random.Random(42))
    for partitions in (5, 5, 9, 3):
        one = first.partition("t", partitions)
        assert one == second.partition("t", partitions)
        assert first.on_new_batch("t", partitions, one) == second.on_new_batch("t", partitions, one)
