"""Durable topic metadata (names, ids, partition counts, config overrides) in ``<data_dir>/meta/``.

File format of ``topics.json`` (UTF-8 JSON, one topic per line, topics sorted by name)::

    {"version": 1, "next_topic_id": 8, "topics": [
    {"config": {"retention_ms": 3600000}, "created_ms": 1700000000000, "name": "metrics",
     "partitions": 4, "topic_id": 7}
    ]}

``config`` holds only the overrides the user set (validated, values in their typed form); the
defaults come from :class:`shmbroker.config.LogConfig`.  ``next_topic_id`` is larger than every
id ever handed out, so ids are never reused, even after a delete.

Durability: every change rewrites the whole snapshot ``topics.json.tmp`` -> fsync -> rename over
``topics.json`` -> fsync(dir), so a crash at any point leaves the old snapshot or the new one,
never a mix.  DESIGN.md sketches an append-only log plus a snapshot; because topic changes are
rare and the snapshot is small (a few hundred bytes a topic), one atomically replaced snapshot gives
the same guarantee with less code and no compaction.  A leftover ``.tmp`` is an unfinished write
and is removed on open.  A snapshot that cannot be read or parsed raises :class:`StorageError`:
starting empty would silently lose every topic.

Invariants (between public calls): the in-memory topics equal the snapshot on disk; every topic
id < ``next_topic_id``; names are unique.  The store is the only writer of ``meta/`` and is not
thread-safe.  If a write fails after the rename (fsync of the directory), disk and memory may
disagree, so the store refuses every further call until it is reopened.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from shmbroker import limits
from shmbroker.config import LOG_SETTINGS, LogConfig
from shmbroker.errors import (
    BrokerError,
    InvalidConfigError,
    InvalidPartitionsError,
    StorageError,
    TopicExistsError,
    UnknownTopicOrPartitionError,
    storage_error,
)
from shmbroker.format.names import safe_repr, validate_partition_count, validate_topic_name
from shmbroker.storage.checkpoint_file import fsync_directory

META_VERSION = 1
SNAPSHOT_NAME = "topics.json"
TMP_SUFFIX = ".tmp"
FIRST_TOPIC_ID = 1
SNAPSHOT_BYTES_MAX = 64 * limits.MIB  # topics_max topics with generous configs fit easily
_SETTING_NAMES = frozenset(setting.name for setting in LOG_SETTINGS)


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclasses.dataclass(frozen=True)
class TopicMeta:
    """One topic's metadata.  ``config`` holds only the user's overrides; do not mutate it."""

    name: str
    topic_id: int
    partitions: int
    config: dict[str, Any] = dataclasses.field(hash=False)
    created_ms: int

    def log_config(self, defaults: LogConfig | None = None) -> LogConfig:
        """The full config of the topic's partition logs: ``defaults`` (the broker's
        ``topic_defaults``; LogConfig's own when None) with the topic's overrides on top."""
        return (LogConfig() if defaults is None else defaults).replace(**self.config)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "topic_id": self.topic_id, "partitions": self.partitions,
                "config": dict(self.config), "created_ms": self.created_ms}

    @classmethod
    def from_json(cls, value: object) -> TopicMeta:
        """Parse and validate :meth:`to_json` output; ValueError (or a subclass) if malformed."""
        if not isinstance(value, dict):
            raise ValueError(f"a topic is a JSON object, not {safe_repr(value)}")
        fields = {"name", "topic_id", "partitions", "config", "created_ms"}
        if set(value) != fields:
            raise ValueError(f"a topic has the keys {sorted(fields)}, not {sorted(value)}")
        name = validate_topic_name(value["name"])
        for key in ("topic_id", "created_ms"):
            if type(value[key]) is not int or value[key] < 0:
                raise ValueError(f"topic {name!r}: {key} is {safe_repr(value[key])}, "
                                 "not a non-negative int")
        try:
            partitions = validate_partition_count(value["partitions"])
            config = normalize_overrides(value["config"])
        except (InvalidPartitionsError, InvalidConfigError) as error:
            raise ValueError(f"topic {name!r}: {error}") from error
        return cls(name, value["topic_id"], partitions, config, value["created_ms"])


def normalize_overrides(overrides: object) -> dict[str, Any]:
    """Validate config overrides with LogConfig; return them with typed values (``"1_000"`` ->
    1000), keeping only the keys given.  Raises :class:`InvalidConfigError`."""
    if not isinstance(overrides, Mapping):
        raise InvalidConfigError(f"configs are a mapping of name -> value, not "
                                 f"{safe_repr(overrides)}")
    for key in overrides:
        if not isinstance(key, str):
            raise InvalidConfigError(f"config names are str, not {safe_repr(key)}")
    config = LogConfig.from_mapping(overrides)
    return {key: getattr(config, key) for key in sorted(overrides)}


class MetaStore:
    """The supervisor's topic metadata, persisted in ``meta_dir/topics.json``."""

    def __init__(self, meta_dir: str | os.PathLike[str], *,
                 now_ms: Callable[[], int] = wall_clock_ms) -> None:
        self.meta_dir = Path(meta_dir)
        self.path = self.meta_dir / SNAPSHOT_NAME
        self.tmp_path = self.meta_dir / (SNAPSHOT_NAME + TMP_SUFFIX)
        self._now_ms = now_ms
        self._failure: str | None = None
        try:
            if not self.meta_dir.is_dir():
                self.meta_dir.mkdir(parents=True)
                fsync_directory(self.meta_dir.parent)
            self.tmp_path.unlink(missing_ok=True)  # an unfinished write from a crash
        except OSError as error:
            raise StorageError(f"cannot open topic metadata in {self.meta_dir}: "
                               f"{error.strerror or error}") from error
        self._topics, self._next_topic_id = self._load()

    # -- reads -----------------------------------------------------------------------------------
    def topics(self) -> list[TopicMeta]:
        """Every topic, sorted by name."""
        self._check_usable()
        return [self._topics[name] for name in sorted(self._topics)]

    def get(self, name: str) -> TopicMeta:
        """The topic called ``name``; :class:`UnknownTopicOrPartitionError` if there is none."""
        self._check_usable()
        meta = self._topics.get(name) if isinstance(name, str) else None
        if meta is None:
            raise UnknownTopicOrPartitionError(f"unknown topic {safe_repr(name)}")
        return meta

    @property
    def next_topic_id(self) -> int:
        return self._next_topic_id

    # -- changes: each one validates, writes the new snapshot, then updates memory ---------------
    def create(self, name: str, partitions: int,
               config: Mapping[str, Any] | None = None) -> TopicMeta:
        """Create a topic with a fresh id.  Raises InvalidTopicNameError, TopicExistsError,
        InvalidPartitionsError, InvalidConfigError, BrokerError (topics_max) or StorageError."""
        self._check_usable()
        validate_topic_name(name)
        if name in self._topics:
            raise TopicExistsError(f"topic {name!r} already exists")
        validate_partition_count(partitions)
        overrides = normalize_overrides({} if config is None else config)
        if len(self._topics) >= limits.topics_max:
            raise BrokerError(f"cannot create topic {name!r}: the broker already has "
                              f"{len(self._topics)} topics, the limit (topics_max); "
                              "delete one first")
        meta = TopicMeta(name, self._next_topic_id, partitions, overrides, self._now_ms())
        self._commit({**self._topics, name: meta}, self._next_topic_id + 1)
        return meta

    def delete(self, name: str) -> TopicMeta:
        """Forget the topic; its id is never handed out again.  Returns what was deleted."""
        meta = self.get(name)
        topics = dict(self._topics)
        del topics[name]
        self._commit(topics, self._next_topic_id)
        return meta

    def alter_config(self, name: str, changes: Mapping[str, Any | None]) -> TopicMeta:
        """Set overrides (``None`` removes one, falling back to the default); the merged
        overrides are validated as a whole.  Returns the updated topic."""
        meta = self.get(name)
        if not isinstance(changes, Mapping):
            raise InvalidConfigError(f"config changes are a mapping of name -> value or None, "
                                     f"not {safe_repr(changes)}")
        unknown = sorted(str(key) for key in changes if key not in _SETTING_NAMES)
        if unknown:
            raise InvalidConfigError(f"unknown config {safe_repr(unknown[0])}; known configs: "
                                     f"{', '.join(sorted(_SETTING_NAMES))}")
        merged = dict(meta.config)
        for key, value in changes.items():
            if value is None:
                merged.pop(key, None)
            else:
                merged[key] = value
        updated = dataclasses.replace(meta, config=normalize_overrides(merged))
        if updated != meta:
            self._commit({**self._topics, name: updated}, self._next_topic_id)
        return updated

    def add_partitions(self, name: str, total: int) -> TopicMeta:
        """Grow the topic to ``total`` partitions (Kafka's CreatePartitions: never shrinks)."""
        meta = self.get(name)
        validate_partition_count(total)
        if total <= meta.partitions:
            raise InvalidPartitionsError(f"topic {name!r} has {meta.partitions} partitions; it "
                                         f"can only grow (asked for {total})")
        updated = dataclasses.replace(meta, partitions=total)
        self._commit({**self._topics, name: updated}, self._next_topic_id)
        return updated

    # -- persistence -----------------------------------------------------------------------------
    def _check_usable(self) -> None:
        if self._failure is not None:
            raise StorageError(f"topic metadata in {self.meta_dir} is unusable until reopened: "
                               f"{self._failure}")

    def _commit(self, topics: dict[str, TopicMeta], next_topic_id: int) -> None:
        self._write(_encode(topics, next_topic_id))
        self._topics, self._next_topic_id = topics, next_topic_id

    def _write(self, data: bytes) -> None:
        """tmp -> fsync -> rename -> fsync(dir).  Before the rename a failure leaves the old
        snapshot (and this store) intact; after it, the store is marked unusable."""
        try:
            fd = os.open(self.tmp_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(self.tmp_path, self.path)
        except OSError as error:
            try:
                self.tmp_path.unlink(missing_ok=True)
            except OSError:
                pass  # removed on the next open
            raise storage_error(f"cannot write topic metadata {self.path}: "
                                f"{error.strerror or error}; nothing was changed",
                                error.errno) from error
        try:
            fsync_directory(self.meta_dir)
        except OSError as error:
            self._failure = f"fsync of {self.meta_dir} failed: {error.strerror or error}"
            raise StorageError(f"cannot write topic metadata {self.path}: {self._failure}; "
                               "the change may or may not survive a crash") from error

    def _load(self) -> tuple[dict[str, TopicMeta], int]:
        try:
            with open(self.path, "rb") as file:
                data = file.read(SNAPSHOT_BYTES_MAX + 1)
        except FileNotFoundError:
            return {}, FIRST_TOPIC_ID
        except OSError as error:
            raise StorageError(f"cannot read topic metadata {self.path}: "
                               f"{error.strerror or error}") from error
        try:
            if len(data) > SNAPSHOT_BYTES_MAX:
                raise ValueError(f"it is larger than {SNAPSHOT_BYTES_MAX} bytes")
            return _decode(data)
        except (ValueError, RecursionError) as error:  # JSON and Unicode errors are ValueErrors
            raise StorageError(f"topic metadata {self.path} is corrupt: {error}; restore it "
                               "from a backup or move it away to start with no topics") from error


def _encode(topics: Mapping[str, TopicMeta], next_topic_id: int) -> bytes:
    lines = [json.dumps(topics[name].to_json(), sort_keys=True, allow_nan=False)
             for name in sorted(topics)]
    header = f'{{"version": {META_VERSION}, "next_topic_id": {next_topic_id}, "topics": [\n'
    return (header + ",\n".join(lines) + "\n]}\n").encode()


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def _decode(data: bytes) -> tuple[dict[str, TopicMeta], int]:
    document = json.loads(data.decode("utf-8"), parse_constant=_reject_constant)
    if not isinstance(document, dict) or set(document) != {"version", "next_topic_id", "topics"}:
        raise ValueError("it is not an object with the keys version, next_topic_id, topics")
    if document["version"] != META_VERSION or type(document["version"]) is not int:
        raise ValueError(f"unknown version {safe_repr(document['version'])} "
                         f"(this build reads version {META_VERSION})")
    next_topic_id = document["next_topic_id"]
    if type(next_topic_id) is not int or next_topic_id < FIRST_TOPIC_ID:
        raise ValueError(f"next_topic_id is {safe_repr(next_topic_id)}, not an int >= "
                         f"{FIRST_TOPIC_ID}")
    if not isinstance(document["topics"], list):
        raise ValueError("topics is not a list")
    topics: dict[str, TopicMeta] = {}
    ids: set[int] = set()
    for item in document["topics"]:
        meta = TopicMeta.from_json(item)
        if meta.name in topics:
            raise ValueError(f"topic {meta.name!r} appears twice")
        if meta.topic_id in ids or meta.topic_id >= next_topic_id:
            raise ValueError(f"topic {meta.name!r} has topic_id {meta.topic_id}, which is "
                             f"repeated or not below next_topic_id {next_topic_id}")
        topics[meta.name] = meta
        ids.add(meta.topic_id)
    return topics, next_topic_id
