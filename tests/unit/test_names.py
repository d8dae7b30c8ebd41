import pytest
from hypothesis import given
from hypothesis import strategies as st

from shmbroker import limits
from shmbroker.errors import (
    InvalidPartitionsError,
    InvalidTopicNameError,
    UnknownTopicOrPartitionError,
)
from shmbroker.format.names import (
    TOPIC_NAME_RULE,
    safe_repr,
    validate_partition,
    validate_partition_count,
    validate_topic_name,
)

LEGAL = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-"


@pytest.mark.parametrize("name", [
    "a", "metrics", "Orders.v2", "a_b-c.d", "...", ".a", "..a", "-", "_", "0",
    "x" * limits.topic_name_chars_max,
])
def test_valid_names_are_returned(name):
    assert validate_topic_name(name) == name


@pytest.mark.parametrize("name, fault", [
    ("", "it is empty"),
    (".", "it names a directory"),
    ("..", "it names a directory"),
    ("a/b", "it contains '/' at index 1"),
    ("../etc", "it contains '/' at index 2"),
    ("nul\x00", "it contains '\\x00' at index 3"),
    ("has space", "it contains ' ' at index 3"),
    ("tab\t", "it contains '\\t' at index 3"),
    ("line\n", "it contains '\\n' at index 4"),
    ("caf\u00e9", "it contains '\u00e9' at index 3"),
    ("\u0661\u0662", "it contains '\u0661' at index 0"),  # Unicode digits are not [0-9]
    ("bad\udcff", "it contains '\\udcff' at index 3"),  # a lone surrogate (undecodable bytes)
    ("a:b", "it contains ':' at index 1"),
    ("x" * (limits.topic_name_chars_max + 1), "it is 250 characters long"),
    (b"metrics", "its type is bytes, not str"),
    (None, "its type is NoneType, not str"),
    (7, "its type is int, not str"),
    (["a"], "its type is list, not str"),
])
def test_invalid_names_say_what_is_wrong(name, fault):
    with pytest.raises(InvalidTopicNameError) as raised:
        validate_topic_name(name)
    message = str(raised.value)
    assert fault in message
    assert message.endswith(TOPIC_NAME_RULE)
    assert message.startswith("invalid topic name ")


def test_rule_text():
    assert TOPIC_NAME_RULE == ("a topic name is 1 to 249 characters from [a-zA-Z0-9._-], "
                               "and not '.' or '..'")


def test_huge_name_is_shown_truncated():
    with pytest.raises(InvalidTopicNameError) as raised:
        validate_topic_name("y" * 10_000)
    message = str(raised.value)
    assert "'" + "y" * 59 + "... (10000 characters)" in message
    assert len(message) < 250


def test_huge_bytes_and_containers_are_shown_truncated():
    assert safe_repr(b"z" * 10**6) == repr(b"z" * 60)[:60] + "... (1000000 bytes)"
    assert len(safe_repr(list(range(10**5)))) < 70
    assert len(safe_repr({"k" * 1000: "v" * 1000})) < 70
    assert safe_repr("short") == "'short'"
    assert safe_repr(None) == "None"


@given(st.text(alphabet=LEGAL, min_size=1, max_size=limits.topic_name_chars_max))
def test_any_legal_name_passes(name):
    if name in (".", ".."):
        with pytest.raises(InvalidTopicNameError):
            validate_topic_name(name)
    else:
        assert validate_topic_name(name) == name


@given(st.text(min_size=1, max_size=40))
def test_any_text_is_accepted_exactly_when_legal(name):
    legal = all(char in LEGAL for char in name) and name not in (".", "..")
    try:
        validate_topic_name(name)
        accepted = True
    except InvalidTopicNameError:
        accepted = False
    assert accepted == legal


def test_partition_in_range():
    assert validate_partition(0, 4, "metrics") == 0
    assert validate_partition(3, 4, "metrics") == 3


@pytest.mark.parametrize("value, message", [
    (7, "topic 'metrics' has 4 partitions; partition 7 does not exist"),
    (4, "topic 'metrics' has 4 partitions; partition 4 does not exist"),
    (-1, "topic 'metrics' has 4 partitions; partition -1 does not exist"),
    ("2", "topic 'metrics' has 4 partitions; a partition is an int from 0 to 3, not '2' (str)"),
    (True, "topic 'metrics' has 4 partitions; a partition is an int from 0 to 3, not True (bool)"),
    (1.0, "topic 'metrics' has 4 partitions; a partition is an int from 0 to 3, not 1.0 (float)"),
    (None, "topic 'metrics' has 4 partitions; a partition is an int from 0 to 3, not None "
           "(NoneType)"),
])
def test_partition_out_of_range_or_wrong_type(value, message):
    with pytest.raises(UnknownTopicOrPartitionError) as raised:
        validate_partition(value, 4, "metrics")
    assert str(raised.value) == message


def test_single_partition_is_singular():
    with pytest.raises(UnknownTopicOrPartitionError, match="has 1 partition; partition 1 does"):
        validate_partition(1, 1, "t")


@pytest.mark.parametrize("value", [1, 2, limits.partitions_per_topic_max])
def test_partition_count_valid(value):
    assert validate_partition_count(value) == value


@pytest.mark.parametrize("value, shown", [
    (0, "0"), (-3, "-3"), (limits.partitions_per_topic_max + 1, "4097"), (True, "True"),
    ("4", "'4'"), (4.0, "4.0"), (None, "None"),
])
def test_partition_count_invalid(value, shown):
    with pytest.raises(InvalidPartitionsError) as raised:
        validate_partition_count(value)
    assert str(raised.value) == f"a partition count is an int from 1 to 4096, not {shown}"
