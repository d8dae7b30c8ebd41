"""Settings, declared once: name (with its unit), default, meaning.

A topic's log configuration is a :class:`LogConfig`.  Its fields are the single home of every
per-topic storage knob; the README's config reference is generated from ``LOG_SETTINGS``
(``python -m shmbroker.config``), so the table and the code cannot drift apart.

Values follow Kafka's topic configs where Kafka has one (``segment.bytes`` -> ``segment_bytes``,
``retention.ms`` -> ``retention_ms``, ...), with the unit always last in the name.  ``-1`` means
"no limit" for retention, as in Kafka.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from shmbroker import limits
from shmbroker.errors import InvalidConfigError
from shmbroker.storage import overlap

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB
HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS


@dataclasses.dataclass(frozen=True)
class Setting:
    name: str
    default: Any
    unit: str
    doc: str
    minimum: int | None = None
    choices: tuple[str, ...] | None = None
    maximum: int | None = None


LOG_SETTINGS: tuple[Setting, ...] = (
    Setting("segment_bytes", 1 * GIB, "bytes",
            "roll to a new segment once the active one would exceed this size", minimum=14),
    Setting("segment_ms", 7 * DAY_MS, "ms",
            "roll to a new segment once the active one's first batch is this old", minimum=1),
    Setting("retention_ms", 7 * DAY_MS, "ms",
            "delete a sealed segment once its newest record is this old; -1 keeps forever",
            minimum=-1),
    Setting("retention_bytes", -1, "bytes",
            "delete the oldest sealed segments while the partition is larger; -1 = no limit",
            minimum=-1),
    Setting("index_interval_bytes", 4096, "bytes",
            "add an offset-index and time-index entry after this many log bytes", minimum=0),
    Setting("segment_index_bytes", 10 * MIB, "bytes",
            "preallocated size of each .index / .timeindex file; a full index rolls the segment",
            minimum=64),
    Setting("segment_preallocate_bytes", 4 * MIB, "bytes",
            "reserve the active segment's disk space ahead of its appends, this much at a "
            "time (fallocate, the file's size unchanged; what is left is released when the "
            "segment is sealed or closed; not on tmpfs): writes into reserved space cost the "
            "kernel less (ext4 here: 1.35x the speed of writes that extend the file); 0 = off",
            minimum=0),
    Setting("segment_writeback_bytes", 8 * MIB, "bytes",
            "start the kernel's writeback of the active segment's new data every this many "
            "bytes, on the worker's flush thread (sync_file_range, waiting for nothing), so "
            "that dirty pages do not pile up until the kernel holds appends back (the stall "
            "warnings' 'writing the segment files'); durability is unchanged; 0 = off",
            minimum=0),
    Setting("max_batch_bytes", 1 * MIB + 12, "bytes",
            "largest batch accepted, header included (Kafka's max.message.bytes)", minimum=61),
    Setting("flush_messages", 0, "records",
            "fsync after this many records were appended since the last flush; "
            "0 = leave it to the OS and flush_ms, 1 = every append, and then "
            "acknowledgements and consumers' reads wait for the fsync (group commit)",
            minimum=0),
    Setting("flush_ms", 0, "ms",
            "fsync when the oldest unflushed append is this old; 0 = no time-based flush",
            minimum=0),
    Setting("cleanup_policy", "delete", "",
            "what retention does with old segments; only 'delete' exists today",
            choices=("delete",)),
    Setting("record_validation", "records", "",
            "what an append checks of each batch: 'records' (header, size, CRC-32C and the "
            "chain of record lengths, inflating compressed batches first, so that a batch whose "
            "record count lies is refused: ~3.5 us per 64 KiB batch of records of one size, "
            "~0.2 us a record for irregular sizes) or 'crc' (header, size and CRC-32C only)",
            choices=("crc", "records")),
)

_BY_NAME = {setting.name: setting for setting in LOG_SETTINGS}


@dataclasses.dataclass(frozen=True)
class LogConfig:
    """Storage configuration of one partition log (all topics' partitions share their topic's)."""

    segment_bytes: int = _BY_NAME["segment_bytes"].default
    segment_ms: int = _BY_NAME["segment_ms"].default
    retention_ms: int = _BY_NAME["retention_ms"].default
    retention_bytes: int = _BY_NAME["retention_bytes"].default
    index_interval_bytes: int = _BY_NAME["index_interval_bytes"].default
    segment_index_bytes: int = _BY_NAME["segment_index_bytes"].default
    segment_preallocate_bytes: int = _BY_NAME["segment_preallocate_bytes"].default
    segment_writeback_bytes: int = _BY_NAME["segment_writeback_bytes"].default
    max_batch_bytes: int = _BY_NAME["max_batch_bytes"].default
    flush_messages: int = _BY_NAME["flush_messages"].default
    flush_ms: int = _BY_NAME["flush_ms"].default
    cleanup_policy: str = _BY_NAME["cleanup_policy"].default
    record_validation: str = _BY_NAME["record_validation"].default

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            _check(_BY_NAME[field.name], getattr(self, field.name))

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> LogConfig:
        """Build from user input (CLI ``KEY=VALUE`` strings, TOML, JSON), converting types."""
        converted: dict[str, Any] = {}
        for name, raw in values.items():
            setting = _BY_NAME.get(name)
            if setting is None:
                known = ", ".join(sorted(_BY_NAME))
                raise InvalidConfigError(f"unknown config {name!r}; known configs: {known}")
            converted[name] = _convert(setting, raw)
        return cls(**converted)

    def replace(self, **changes: Any) -> LogConfig:
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _convert(setting: Setting, raw: Any) -> Any:
    if isinstance(setting.default, str):
        return str(raw)
    if isinstance(raw, bool):
        raise InvalidConfigError(
            f"config {setting.name} takes an integer ({setting.unit}), not {raw!r}")
    if isinstance(raw, int):
        return raw
    if isinstance(raw, str):
        try:
            return int(raw.strip().replace("_", ""), 0)
        except ValueError:
            pass
    raise InvalidConfigError(
        f"config {setting.name} takes an integer ({setting.unit}), not {raw!r}"
    )


def _check(setting: Setting, value: Any) -> None:
    if setting.choices is not None:
        if value not in setting.choices:
            raise InvalidConfigError(
                f"config {setting.name} must be one of {', '.join(setting.choices)}, not {value!r}"
            )
        return
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidConfigError(
            f"config {setting.name} takes an integer ({setting.unit}), not {value!r}"
        )
    if setting.minimum is not None and value < setting.minimum:
        raise InvalidConfigError(
            f"config {setting.name} must be >= {setting.minimum} {setting.unit}, not {value}"
        )
    if setting.maximum is not None and value > setting.maximum:
        raise InvalidConfigError(
            f"config {setting.name} must be <= {setting.maximum} {setting.unit}, not {value}"
        )


def reference_table(settings: tuple[Setting, ...] = LOG_SETTINGS) -> str:
    """The Markdown config reference printed into the README."""
    lines = ["| name | default | unit | meaning |", "| --- | --- | --- | --- |"]
    for setting in settings:
        default = (oct(setting.default) if setting.unit == "octal mode" else setting.default)
        lines.append(f"| `{setting.name}` | {default} | {setting.unit} | {setting.doc} |")
    return "\n".join(lines)





# ================================================================================================
# Broker settings: `shmbroker serve --config FILE.toml`.  Top-level keys are these settings; a
# `[topic_defaults]` table holds LogConfig values that topics without an override get.
# ================================================================================================

BROKER_SETTINGS: tuple[Setting, ...] = (
    Setting("socket_mode", 0o660, "octal mode",
            "permissions of broker.sock and the workers' sockets", minimum=0),
    Setting("data_dir_mode", 0o750, "octal mode",
            "permissions the data dir and its subdirectories are created with", minimum=0),
    Setting("worker_restart_backoff_ms_max", 5000, "ms",
            "longest wait before restarting a worker that keeps dying", minimum=0),
    Setting("worker_boot_failures_max", 5, "count",
            "consecutive failed boots after which a partition's worker is not restarted",
            minimum=1),
    Setting("worker_stop_timeout_ms", 30_000, "ms",
            "how long a stopping worker may drain and flush before it is killed", minimum=1),
    Setting("topic_ready_timeout_ms", 30_000, "ms",
            "how long topic creation waits for its workers to come up", minimum=1),
    Setting("worker_standby_count", 1, "count",
            "worker processes kept started ahead of need (Python up, shmbroker imported; "
            "started 1 s after the last worker spawn), so that a dead worker's replacement "
            "only has to boot (tens of ms) instead of starting Python (0.3 s idle, seconds "
            "under load); each costs ~40 MB of memory",
            minimum=0, maximum=64),
    Setting("worker_spin_us", 50, "µs",
            "how long an idle worker re-reads its rings and polls its sockets before it "
            "sleeps (then producers must ring its doorbell); more spin, fewer wake-ups, more "
            "CPU", minimum=0),
    Setting("worker_check_thread", "auto", "",
            "whether a worker checks each append of 256 KiB or more on a second thread while "
            "it writes it (README, Append): 'on', 'off', or 'auto': on when the broker may use "
            "4 CPUs or more (with fewer, producers and consumers already fill the cores and "
            "the thread only adds switches: ~5 % slower end to end on 2 cores)",
            choices=overlap.MODES),
    Setting("worker_stall_warn_ms", 50, "ms",
            "a worker logs a warning (at most one a second) when one turn of its loop keeps "
            "it busy this long, with the time of each phase: produce and fetch of its "
            "partition wait meanwhile, as Redpanda's reactor stall warnings say; 0 = never",
            minimum=0),
    Setting("connections_max", limits.connections_max, "count",
            "connections broker.sock and each worker's socket accept at once; more are closed "
            "at once (and logged)", minimum=1, maximum=limits.connections_max),
    Setting("frame_read_timeout_ms", 10_000, "ms",
            "a request whose first bytes arrived must be whole this soon, else its connection "
            "is closed (slow-loris); idle connections between requests are not timed out",
            minimum=limits.frame_read_timeout_ms_min, maximum=limits.frame_read_timeout_ms_max),
)

_BROKER_BY_NAME = {setting.name: setting for setting in BROKER_SETTINGS}


@dataclasses.dataclass(frozen=True)
class BrokerConfig:
    """Process-level settings of one broker (not per topic)."""

    socket_mode: int = _BROKER_BY_NAME["socket_mode"].default
    data_dir_mode: int = _BROKER_BY_NAME["data_dir_mode"].default
    worker_restart_backoff_ms_max: int = _BROKER_BY_NAME["worker_restart_backoff_ms_max"].default
    worker_boot_failures_max: int = _BROKER_BY_NAME["worker_boot_failures_max"].default
    worker_stop_timeout_ms: int = _BROKER_BY_NAME["worker_stop_timeout_ms"].default
    topic_ready_timeout_ms: int = _BROKER_BY_NAME["topic_ready_timeout_ms"].default
    worker_standby_count: int = _BROKER_BY_NAME["worker_standby_count"].default
    worker_spin_us: int = _BROKER_BY_NAME["worker_spin_us"].default
    worker_check_thread: str = _BROKER_BY_NAME["worker_check_thread"].default
    worker_stall_warn_ms: int = _BROKER_BY_NAME["worker_stall_warn_ms"].default
    connections_max: int = _BROKER_BY_NAME["connections_max"].default
    frame_read_timeout_ms: int = _BROKER_BY_NAME["frame_read_timeout_ms"].default
    topic_defaults: LogConfig = dataclasses.field(default_factory=LogConfig)

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            if field.name != "topic_defaults":
                _check(_BROKER_BY_NAME[field.name], getattr(self, field.name))

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> BrokerConfig:
        converted: dict[str, Any] = {}
        for name, raw in values.items():
            if name == "topic_defaults":
                if not isinstance(raw, Mapping):
                    raise InvalidConfigError("[topic_defaults] must be a table of topic configs")
                converted[name] = LogConfig.from_mapping(raw)
                continue
            setting = _BROKER_BY_NAME.get(name)
            if setting is None:
                known = ", ".join(sorted([*_BROKER_BY_NAME, "topic_defaults"]))
                raise InvalidConfigError(f"unknown broker setting {name!r}; known: {known}")
            converted[name] = _convert(setting, raw)
        return cls(**converted)

    @classmethod
    def load(cls, path: str | None) -> BrokerConfig:
        """Read a TOML file (None = all defaults); InvalidConfigError names the file."""
        if path is None:
            return cls()
        import tomllib

        try:
            with open(path, "rb") as file:
                values = tomllib.load(file)
        except OSError as error:
            raise InvalidConfigError(f"cannot read config file {path}: {error.strerror}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
            raise InvalidConfigError(f"config file {path} is not valid TOML: {error}") from None
        try:
            return cls.from_mapping(values)
        except InvalidConfigError as error:
            raise InvalidConfigError(f"{path}: {error}") from None

    def topic_config(self, overrides: Mapping[str, Any]) -> LogConfig:
        """A topic's effective config: its overrides on top of the broker's topic defaults."""
        return LogConfig.from_mapping({**self.topic_defaults.as_dict(), **overrides})


if __name__ == "__main__":
    print("Topic configs (`--config KEY=VALUE`, `[topic_defaults]`):\n")
    print(reference_table(LOG_SETTINGS))
    print("\nBroker settings (`shmbroker serve --config FILE.toml`, top-level keys):\n")
    print(reference_table(BROKER_SETTINGS))
