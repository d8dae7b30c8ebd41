"""Admin client: topics, consumer groups and broker status (``kafka-topics`` and
``kafka-consumer-groups`` of shmbroker).

>>> admin = Admin(data_dir="./shmbroker-data")
>>> admin.create_topic("metrics", partitions=4, config={"retention_ms": 3_600_000})
>>> admin.describe_consumer_group("dashboards")["partitions"]    # committed, log end, lag
>>> admin.reset_consumer_group_offsets("dashboards", "metrics", to_earliest=True, execute=True)
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

from shmbroker.client.connection import Connection
from shmbroker.client.types import TopicPartition, resolve_data_dir
from shmbroker.errors import (
    GroupIdNotFoundError,
    NonEmptyGroupError,
    NoOffsetForPartitionError,
    UnknownTopicOrPartitionError,
)
from shmbroker.protocol.messages import ApiKey

BROKER_SOCKET = "broker.sock"


class Admin:
    """Topic administration over the supervisor's socket.  Every call is one request."""

    def __init__(self, data_dir: str | os.PathLike[str] | None = None, *,
                 request_timeout_ms: int = 60_000) -> None:
        self.data_dir = resolve_data_dir(data_dir)
        self._timeout_s = request_timeout_ms / 1000
        self._connection = Connection(self.data_dir / BROKER_SOCKET, self._timeout_s)

    def _request(self, api_key: ApiKey, body: dict[str, Any] | None = None) -> dict[str, Any]:
        return self._connection.request(api_key, body)[0]

    def create_topic(self, name: str, partitions: int = 1,
                     config: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Create a topic; returns its metadata once its workers are up."""
        return self._request(ApiKey.CREATE_TOPIC, {"name": name, "partitions": partitions,
                                                   "config": dict(config or {})})["topic"]

    def delete_topic(self, name: str) -> None:
        """Delete a topic: its workers stop and its files go."""
        self._request(ApiKey.DELETE_TOPIC, {"name": name})

    def list_topics(self) -> list[str]:
        return list(self._request(ApiKey.LIST_TOPICS)["topics"])

    def describe_topic(self, name: str) -> dict[str, Any]:
        """Per partition: log_start_offset, log_end_offset, high_watermark, size_bytes,
        worker_pid, state; plus the topic's config overrides and effective config."""
        return self._request(ApiKey.DESCRIBE_TOPIC, {"name": name})

    def alter_configs(self, name: str, config: Mapping[str, Any]) -> dict[str, Any]:
        """Set (or, with None, remove) config overrides; workers apply them at once."""
        return self._request(ApiKey.ALTER_CONFIGS, {"name": name, "config": dict(config)})["topic"]

    def create_partitions(self, name: str, total: int) -> dict[str, Any]:
        """Grow a topic to ``total`` partitions (partitions are never removed)."""
        return self._request(ApiKey.ADD_PARTITIONS, {"name": name, "partitions": total})["topic"]

    def metadata(self, topics: list[str] | None = None) -> list[dict[str, Any]]:
        body = {"topics": topics} if topics is not None else {}
        return list(self._request(ApiKey.METADATA, body)["topics"])

    def list_consumer_group_offsets(self, group_id: str) -> dict[tuple[str, int], int]:
        """The committed offsets of ``group_id``: {(topic, partition): offset}."""
        body = self._request(ApiKey.OFFSET_FETCH, {"group_id": group_id})
        return {(topic, partition): offset for topic, partition, offset, _ in body["offsets"]}

    # -- consumer groups (kafka-consumer-groups) ---------------------------------------------------
    def list_consumer_groups(self) -> list[dict[str, Any]]:
        """Every group the coordinator knows and every group that only has committed offsets:
        [{"group_id", "state" ("Empty", "Reconciling" or "Stable"), "group_epoch", "members"}],
        sorted by group id."""
        return list(self._request(ApiKey.LIST_GROUPS)["groups"])

    def describe_consumer_group(self, group_id: str) -> dict[str, Any]:
        """The group's state, epoch and assignor; its ``members`` (member_id, group_instance_id,
        client_id, pid, member_epoch, state, subscription, assignment [[topic, partition], ...]);
        and per partition that is committed or assigned its ``committed_offset`` (None if none),
        ``log_end_offset``, ``lag`` and owning ``member_id`` (None if none).
        :class:`GroupIdNotFoundError` for a group that has neither members nor offsets."""
        return self._request(ApiKey.DESCRIBE_GROUP, {"group_id": group_id})

    def delete_consumer_group(self, group_id: str) -> None:
        """Delete the group and, durably, its committed offsets.  Refused
        (:class:`NonEmptyGroupError`) while it has members."""
        self._request(ApiKey.DELETE_GROUP, {"group_id": group_id})

    def reset_consumer_group_offsets(
            self, group_id: str, topic: str, *, to_earliest: bool = False,
            to_latest: bool = False, to_offset: int | None = None,
            to_datetime_ms: int | None = None, shift_by: int | None = None,
            partitions: Iterable[int] | None = None, execute: bool = False,
    ) -> dict[TopicPartition, tuple[int | None, int]]:
        """Plan (and, with ``execute``, commit) new committed offsets of ``group_id`` for
        ``topic`` (every partition, or ``partitions``), as ``kafka-consumer-groups
        --reset-offsets``: {partition: (current committed offset or None, new offset)}.

        Exactly one spec: ``to_earliest``, ``to_latest``, ``to_offset`` or ``shift_by`` (both
        clamped into [log start, log end], as Kafka), ``to_datetime_ms`` (the first offset whose
        timestamp is >= it; the log end if there is none).  ``shift_by`` moves the committed
        offset, so every partition needs one.  Without ``execute`` (the default) nothing is
        committed: a dry run.  Refused (:class:`NonEmptyGroupError`) while the group has members,
        dry run included; a group that does not exist yet is fine (its offsets are created)."""
        spec = _reset_spec(to_earliest, to_latest, to_offset, to_datetime_ms, shift_by)
        self._check_no_members(group_id)
        wanted = self._topic_partitions(topic, partitions)
        current = self._committed(group_id, wanted)
        planned = {tp: (current[tp], offset)
                   for tp, offset in self._new_offsets(spec, wanted, current).items()}
        if execute:
            self._request(ApiKey.OFFSET_COMMIT, {"group_id": group_id, "offsets": [
                [tp.topic, tp.partition, new, None] for tp, (_, new) in planned.items()]})
        return planned

    def _check_no_members(self, group_id: str) -> None:
        try:
            group = self.describe_consumer_group(group_id)
        except GroupIdNotFoundError:
            return  # no members and no offsets yet: resetting creates them (as Kafka)
        members = group["members"]
        if members:
            shown = ", ".join(
                f"{member['member_id']} (client {member['client_id']!r}, pid {member['pid']})"
                for member in members[:4]) + (", ..." if len(members) > 4 else "")
            raise NonEmptyGroupError(
                f"group {group_id!r} is {group['state']} with {len(members)} member(s): "
                f"{shown}; offsets can be reset only while it has no members: stop its "
                f"consumers first")

    def _topic_partitions(self, topic: str,
                          partitions: Iterable[int] | None) -> list[TopicPartition]:
        try:
            (found,) = self.metadata([topic])
        except UnknownTopicOrPartitionError:
            raise UnknownTopicOrPartitionError(f"topic {topic!r} does not exist") from None
        count = len(found["partitions"])
        if partitions is None:
            return [TopicPartition(topic, partition) for partition in range(count)]
        wanted = sorted(set(partitions))
        if not wanted:
            raise ValueError("partitions is empty: name at least one, or None for all")
        for partition in wanted:
            if type(partition) is not int or not 0 <= partition < count:
                raise UnknownTopicOrPartitionError(
                    f"topic {topic!r} has {count} partition(s); partition {partition!r} does "
                    "not exist")
        return [TopicPartition(topic, partition) for partition in wanted]

    def _committed(self, group_id: str,
                   wanted: list[TopicPartition]) -> dict[TopicPartition, int | None]:
        body = self._request(ApiKey.OFFSET_FETCH, {
            "group_id": group_id, "partitions": [[tp.topic, tp.partition] for tp in wanted]})
        found = {TopicPartition(topic, partition): offset
                 for topic, partition, offset, _ in body["offsets"]}
        return {tp: found[tp] if found.get(tp, -1) >= 0 else None for tp in wanted}

    def _new_offsets(self, spec: tuple[str, int], wanted: list[TopicPartition],
                     current: dict[TopicPartition, int | None]) -> dict[TopicPartition, int]:
        """The new offset of each partition of ``wanted`` under ``spec`` (kind, value); the
        log's offsets come from a short-lived consumer (no group) of the same data dir."""
        from shmbroker.client.consumer import Consumer

        kind, value = spec
        with Consumer(self.data_dir, request_timeout_ms=int(self._timeout_s * 1000)) as consumer:
            if kind == "to_earliest":
                return consumer.beginning_offsets(wanted)
            end = consumer.end_offsets(wanted)
            if kind == "to_latest":
                return end
            if kind == "to_datetime_ms":
                found = consumer.offsets_for_times(dict.fromkeys(wanted, value))
                return {tp: end[tp] if at is None else at.offset for tp, at in found.items()}
            if kind == "to_offset":
                requested = dict.fromkeys(wanted, value)
            else:  # shift_by
                missing = [tp for tp in wanted if current[tp] is None]
                if missing:
                    shown = ", ".join(f"{tp.topic}/{tp.partition}" for tp in missing[:8])
                    raise NoOffsetForPartitionError(
                        f"cannot shift the offsets of {shown}{', ...' if len(missing) > 8 else ''}"
                        ": the group has no committed offset there; reset them to the "
                        "earliest, the latest or an offset first")
                requested = {tp: offset + value for tp, offset in current.items()
                             if offset is not None}
            start = consumer.beginning_offsets(wanted)
        return {tp: min(max(offset, start[tp]), end[tp]) for tp, offset in requested.items()}

    def status(self) -> dict[str, Any]:
        """Broker pid, uptime, topics, partitions and the state of every worker."""
        return self._request(ApiKey.STATUS)

    def close(self) -> None:
        self._connection.close()

    def __enter__(self) -> Admin:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


RESET_SPECS = ("to_earliest", "to_latest", "to_offset", "to_datetime_ms", "shift_by")


def _reset_spec(to_earliest: bool, to_latest: bool, to_offset: int | None,
                to_datetime_ms: int | None, shift_by: int | None) -> tuple[str, int]:
    """The one reset spec given, as (name, value); ValueError unless exactly one is."""
    given = {name: value for name, value in zip(RESET_SPECS, (
        to_earliest or None, to_latest or None, to_offset, to_datetime_ms, shift_by))
        if value is not None}
    if len(given) != 1:
        raise ValueError(f"give exactly one of {', '.join(RESET_SPECS)}; got "
                         f"{', '.join(given) or 'none'}")
    ((name, value),) = given.items()
    if name in ("to_earliest", "to_latest"):
        return name, 0
    if type(value) is not int:
        raise ValueError(f"{name} must be an int, not {value!r}")
    if name in ("to_offset", "to_datetime_ms") and value < 0:
        raise ValueError(f"{name} must be >= 0, not {value}")
    return name, value
