"""Validation of topic names, partition numbers and partition counts (pure; no I/O).

Rules, as Kafka's ``Topic.validate``:

* a topic name is a ``str`` of 1 to ``limits.topic_name_chars_max`` (249) characters, each one of
  ``[a-zA-Z0-9._-]``, and is neither ``"."`` nor ``".."`` (the name becomes a directory);
* a partition is an ``int`` (not ``bool``) in ``0 .. partitions - 1``;
* a partition count is an ``int`` (not ``bool``) in ``1 .. limits.partitions_per_topic_max``.

Unlike Kafka we do not warn that ``.`` and ``_`` collide in metric names.  Values come from
untrusted peers, so errors show them through :func:`safe_repr` (bounded length, any type).
"""

from __future__ import annotations

import re
import reprlib

from shmbroker import limits
from shmbroker.errors import (
    InvalidPartitionsError,
    InvalidTopicNameError,
    UnknownTopicOrPartitionError,
)

TOPIC_NAME_RULE = (
    f"a topic name is 1 to {limits.topic_name_chars_max} characters from [a-zA-Z0-9._-], "
    "and not '.' or '..'"
)
_TOPIC_NAME_PATTERN = re.compile(r"[a-zA-Z0-9._-]+", re.ASCII)
_BAD_CHAR_PATTERN = re.compile(r"[^a-zA-Z0-9._-]", re.ASCII)
SAFE_REPR_CHARS_MAX = 60

_repr = reprlib.Repr()
_repr.maxstring = SAFE_REPR_CHARS_MAX
_repr.maxother = SAFE_REPR_CHARS_MAX
_repr.maxlist = _repr.maxtuple = _repr.maxdict = _repr.maxset = 6


def safe_repr(value: object, chars_max: int = SAFE_REPR_CHARS_MAX) -> str:
    """``repr(value)`` cut to about ``chars_max`` characters, cheap for huge strings and bytes."""
    if isinstance(value, str | bytes | bytearray) and len(value) > chars_max:
        unit = "characters" if isinstance(value, str) else "bytes"
        head = repr(value[:chars_max])[:chars_max]
        return f"{head}... ({len(value)} {unit})"
    text = _repr.repr(value)
    return text if len(text) <= chars_max + 3 else text[:chars_max] + "..."


def validate_topic_name(name: object) -> str:
    """Return ``name`` if it is a valid topic name; else raise :class:`InvalidTopicNameError`."""
    if isinstance(name, str) and len(name) <= limits.topic_name_chars_max \
            and _TOPIC_NAME_PATTERN.fullmatch(name) and name not in (".", ".."):
        return name
    raise InvalidTopicNameError(f"invalid topic name {safe_repr(name)}: {_topic_name_fault(name)}; "
                                f"{TOPIC_NAME_RULE}")


def _topic_name_fault(name: object) -> str:
    if not isinstance(name, str):
        return f"its type is {type(name).__name__}, not str"
    if not name:
        return "it is empty"
    if len(name) > limits.topic_name_chars_max:
        return f"it is {len(name)} characters long"
    if name in (".", ".."):
        return "it names a directory"
    bad = _BAD_CHAR_PATTERN.search(name)
    assert bad is not None, name
    return f"it contains {bad.group()!r} at index {bad.start()}"


def validate_partition(value: object, partitions: int, topic: str) -> int:
    """Return ``value`` if it is a partition of ``topic`` (which has ``partitions`` of them).

    Raises :class:`UnknownTopicOrPartitionError` otherwise, for a wrong type too.
    """
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < partitions:
        return value
    count = f"{partitions} partition" + ("" if partitions == 1 else "s")
    if isinstance(value, int) and not isinstance(value, bool):
        raise UnknownTopicOrPartitionError(
            f"topic {topic!r} has {count}; partition {value} does not exist")
    raise UnknownTopicOrPartitionError(
        f"topic {topic!r} has {count}; a partition is an int from 0 to {partitions - 1}, "
        f"not {safe_repr(value)} ({type(value).__name__})")


def validate_partition_count(value: object) -> int:
    """Return ``value`` if it is a valid partition count; else raise InvalidPartitionsError."""
    if isinstance(value, int) and not isinstance(value, bool) \
            and 1 <= value <= limits.partitions_per_topic_max:
        return value
    raise InvalidPartitionsError(
        f"a partition count is an int from 1 to {limits.partitions_per_topic_max}, "
        f"not {safe_repr(value)}")
