"""What a benchmark run does: the :class:`Workload`, its validation and its TOML files.

A workload file (``bench/workloads/*.toml``) is flat TOML whose keys are the field names below;
a missing key keeps its default, an unknown key is an error (a typo would otherwise silently run
the default), and ``name`` defaults to the file's stem.  Command-line options override fields
through :meth:`Workload.with_overrides`, where None means "option not given".

A Workload is valid by construction (``__post_init__`` validates), so a runner never meets a
half-checked one.  Units are in the field names; sizes are total value bytes, including the
24-byte header every benchmark record carries (:mod:`shmbroker.perf.payloads`).
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shmbroker import limits
from shmbroker.client.producer import RING_BYTES_DEFAULT
from shmbroker.format.ring_layout import PAGE_BYTES
from shmbroker.perf.payloads import PAYLOAD_KINDS, parse_size_spec

PROCESSES_MAX = 1024  # producers, and consumers: each is one OS process
DURATION_S_MAX = 7 * 24 * 3600.0
LINGER_MS_MAX = 60_000
BATCH_SIZE_BYTES_MIN = 1024
BATCH_SIZE_BYTES_MAX = limits.batch_bytes_max  # 64 MiB
RATE_PER_SEC_MAX = 1_000_000_000
CHUNK_RECORDS_MAX = 1 << 20  # records a columnar producer hands to one send_batch call
NAME_CHARS_MAX = 100
ACKS = ("0", "1", "all")
APIS = ("per-record", "columnar")
COMPRESSIONS = ("none", "gzip", "lz4", "zstd")
_NAME_RE = re.compile(r"^[A-Za-z0-9._-]+$")


def _integer(name: str, value: object, low: int, high: int) -> int:
    """``value`` as an int in [low, high]; an integral float (TOML ``1e4``) is accepted."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"workload field '{name}' must be an integer in [{low}, {high}], "
                         f"got {value!r}")
    return value


def _seconds(name: str, value: object, low: float, high: float, low_inclusive: bool) -> float:
    """``value`` as a float in ``[low, high]`` (or ``(low, high]``); ints are accepted."""
    seconds = (float(value) if isinstance(value, int | float) and not isinstance(value, bool)
               else math.nan)
    above_low = low <= seconds if low_inclusive else low < seconds  # False for NaN
    if not (above_low and seconds <= high):
        bound = "[" if low_inclusive else "("
        raise ValueError(f"workload field '{name}' must be a number of seconds in "
                         f"{bound}{low:g}, {high:g}], got {value!r}")
    return seconds


def _choice(name: str, value: object, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"workload field '{name}' must be one of "
                         f"{', '.join(repr(a) for a in allowed)}; got {value!r}")
    return value  # type: ignore[return-value]


@dataclass(frozen=True)
class Workload:
    """One benchmark: topics and partitions to create, processes to start, records to send.

    ``topics`` topics of ``partitions`` partitions each; ``producers`` processes share the
    partitions of all topics and send ``record_size`` values (a size spec: "100" or "64-1024")
    at ``rate_per_sec`` records per second *in total* (0 = as fast as possible) for
    ``duration_s`` seconds, after ``warmup_s`` seconds whose records are not measured (warm-up
    comes before the measured duration, as in the OpenMessaging Benchmark).  ``consumers``
    processes read everything back: as members of consumer group ``group``, or, with no group,
    each assigned its share of the partitions.  ``keyed`` sends keys (partition by murmur2 of
    the key).  ``durable`` creates the topics with ``flush_messages = 1``: the broker fsyncs
    before it acknowledges (group commit: one fsync in flight, covering everything appended
    while the one before ran).
    ``acks``, ``linger_ms``, ``batch_size_bytes``, ``ring_bytes`` and ``compression`` are the
    producer settings (``ring_bytes``: the shared-memory ring per partition, a multiple of 4096:
    what may be in flight unacknowledged, Kafka's ``buffer.memory`` per partition); ``api``
    picks ``send``/``poll`` ("per-record") or ``send_batch``/``poll_columnar`` ("columnar");
    ``chunk_records`` is how many records a columnar producer hands to one ``send_batch`` (it
    cuts them into batches of ``batch_size_bytes``: with 1 MiB batches, give it ~10,000 100-byte
    records, as OMB's kafka-big-batches workload pairs batch.size=1048576 with a long linger);
    ``payload`` is "random" (incompressible) or "telemetry" (JSON readings).
    ``poll_spin_us`` is the consumers' setting of that name: how long a poll busy-polls its
    fetch sockets before it sleeps (0, the default, never spins; for latency runs on a host
    with a core to spare per consumer).
    """

    name: str = "default"
    topics: int = 1
    partitions: int = 1
    producers: int = 1
    consumers: int = 1
    group: str | None = None
    record_size: str = "100"
    keyed: bool = False
    rate_per_sec: int = 0
    duration_s: float = 10.0
    warmup_s: float = 0.0
    acks: str = "1"
    linger_ms: int = 5
    batch_size_bytes: int = 65536
    ring_bytes: int = RING_BYTES_DEFAULT
    api: str = "per-record"
    compression: str = "none"
    payload: str = "random"
    durable: bool = False
    poll_spin_us: int = 0
    chunk_records: int = 1024

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field and normalise a few spellings; ValueError names the field.

        Normalised: an integer ``record_size`` (TOML ``record_size = 100``) becomes its string,
        ``acks`` 0, 1 and -1 (Kafka's spelling of all) become "0", "1" and "all", integral
        floats become ints, and int seconds become floats.
        """
        fix = self._normalise
        if (not isinstance(self.name, str) or not self.name or len(self.name) > NAME_CHARS_MAX
                or not _NAME_RE.match(self.name)):
            raise ValueError(f"workload field 'name' must be 1 to {NAME_CHARS_MAX} letters, "
                             f"digits, '.', '_' or '-', got {self.name!r}")
        fix("topics", _integer("topics", self.topics, 1, limits.topics_max))
        fix("partitions", _integer("partitions", self.partitions, 1,
                                   limits.partitions_per_topic_max))
        fix("producers", _integer("producers", self.producers, 1, PROCESSES_MAX))
        fix("consumers", _integer("consumers", self.consumers, 1, PROCESSES_MAX))
        if self.group is not None and (
                not isinstance(self.group, str) or not self.group
                or len(self.group) > limits.group_id_chars_max):
            raise ValueError(f"workload field 'group' must be a consumer group id of 1 to "
                             f"{limits.group_id_chars_max} characters, or absent for "
                             f"consumers outside any group; got {self.group!r}")
        record_size = self.record_size
        if isinstance(record_size, int) and not isinstance(record_size, bool):
            record_size = str(record_size)
        if not isinstance(record_size, str):
            raise ValueError(f"workload field 'record_size' must be a size such as '100' or "
                             f"'64-1024', got {record_size!r}")
        try:
            spec = parse_size_spec(record_size)
            spec.check_header_room()
        except ValueError as error:
            raise ValueError(f"workload field 'record_size': {error}") from None
        fix("record_size", record_size)
        for flag in ("keyed", "durable"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"workload field {flag!r} must be true or false, got "
                                 f"{getattr(self, flag)!r}")
        fix("rate_per_sec", _integer("rate_per_sec", self.rate_per_sec, 0, RATE_PER_SEC_MAX))
        fix("duration_s", _seconds("duration_s", self.duration_s, 0.0, DURATION_S_MAX,
                                   low_inclusive=False))
        fix("warmup_s", _seconds("warmup_s", self.warmup_s, 0.0, DURATION_S_MAX,
                                 low_inclusive=True))
        acks = self.acks
        if isinstance(acks, int | str) and not isinstance(acks, bool):
            acks = {0: "0", 1: "1", -1: "all", "-1": "all"}.get(acks, acks)
        fix("acks", _choice("acks", acks, ACKS))
        fix("linger_ms", _integer("linger_ms", self.linger_ms, 0, LINGER_MS_MAX))
        fix("batch_size_bytes", _integer("batch_size_bytes", self.batch_size_bytes,
                                         BATCH_SIZE_BYTES_MIN, BATCH_SIZE_BYTES_MAX))
        fix("ring_bytes", _integer("ring_bytes", self.ring_bytes, limits.ring_data_bytes_min,
                                   limits.ring_data_bytes_max))
        if self.ring_bytes % PAGE_BYTES:  # a ring's data area is whole pages
            raise ValueError(f"workload field 'ring_bytes' must be a multiple of "
                             f"{PAGE_BYTES}, got {self.ring_bytes}")
        fix("poll_spin_us", _integer("poll_spin_us", self.poll_spin_us, 0,
                                     limits.poll_spin_us_max))
        fix("chunk_records", _integer("chunk_records", self.chunk_records, 1,
                                      CHUNK_RECORDS_MAX))
        _choice("api", self.api, APIS)
        _choice("compression", self.compression, COMPRESSIONS)
        _choice("payload", self.payload, PAYLOAD_KINDS)

    def _normalise(self, field: str, value: object) -> None:
        object.__setattr__(self, field, value)  # frozen: only validate() may do this

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(field.name for field in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Workload:
        """A Workload from ``{field: value}``; ValueError for unknown keys or invalid values."""
        _check_keys(data)
        return cls(**data)

    def with_overrides(self, overrides: Mapping[str, Any]) -> Workload:
        """A copy with ``overrides`` applied; None values (options not given) are skipped."""
        given = {key: value for key, value in overrides.items() if value is not None}
        _check_keys(given)
        return dataclasses.replace(self, **given)

    def replace(self, **overrides: Any) -> Workload:
        """``with_overrides`` with keyword arguments: ``workload.replace(duration_s=5)``."""
        return self.with_overrides(overrides)

    def to_dict(self) -> dict[str, Any]:
        """Every field, JSON- and TOML-friendly (a None group is kept as None)."""
        return dataclasses.asdict(self)


def _check_keys(data: Mapping[str, Any]) -> None:
    known = Workload.field_names()
    unknown = sorted(str(key) for key in data if key not in known)
    if unknown:
        raise ValueError(f"unknown workload field{'s' if len(unknown) > 1 else ''} "
                         f"{', '.join(unknown)}; known fields: {', '.join(known)}")


def load_workload(path: str | Path) -> Workload:
    """Read a workload TOML file; ValueError (naming the file) if it is invalid."""
    path = Path(path)
    try:
        with path.open("rb") as file:
            data = tomllib.load(file)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:  # (TOML is UTF-8)
        raise ValueError(f"{path}: not valid TOML: {error}") from None
    data.setdefault("name", path.stem)
    try:
        return Workload.from_dict(data)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
