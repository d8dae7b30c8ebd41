"""Admin client: topics and broker status (``kafka-topics`` of shmbroker).

>>> admin = Admin(data_dir="./shmbroker-data")
>>> admin.create_topic("metrics", partitions=4, config={"retention_ms": 3_600_000})
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from shmbroker.client.connection import Connection
from shmbroker.client.types import resolve_data_dir
from shmbroker.protocol.messages import ApiKey

BROKER_SOCKET = "broker.sock"


class Admin:
    """Topic administration over the supervisor's socket.  Every call is one request."""

    def __init__(self, data_dir: str | os.PathLike[str] | None = None, *,
                 request_timeout_ms: int = 60_000) -> None:
        self.data_dir = resolve_data_dir(data_dir)
        self._connection = Connection(self.data_dir / BROKER_SOCKET, request_timeout_ms / 1000)

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

    def status(self) -> dict[str, Any]:
        """Broker pid, uptime, topics, partitions and the state of every worker."""
        return self._request(ApiKey.STATUS)

    def close(self) -> None:
        self._connection.close()

    def __enter__(self) -> Admin:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
