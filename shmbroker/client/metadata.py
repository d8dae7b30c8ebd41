"""Topic metadata as the client caches it: where each partition's worker, control block and
doorbell are (from the supervisor's METADATA response)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, NamedTuple

from shmbroker.client.connection import Connection
from shmbroker.errors import UnknownTopicOrPartitionError
from shmbroker.format.names import validate_topic_name
from shmbroker.protocol.messages import ApiKey

BROKER_SOCKET = "broker.sock"


class PartitionInfo(NamedTuple):
    topic: str
    topic_id: int
    partition: int
    socket: Path
    control_block: str
    doorbell: str
    shm_prefix: str
    max_batch_bytes: int
    log_dir: Path | None = None  # the partition's segment files (consumers read them directly)


class Metadata:
    """Thread-safe cache of topic -> partitions, refreshed from the supervisor on demand."""

    def __init__(self, data_dir: Path, timeout_s: float = 30.0) -> None:
        self.data_dir = data_dir
        self.connection = Connection(data_dir / BROKER_SOCKET, timeout_s)
        self._topics: dict[str, list[PartitionInfo]] = {}
        self._lock = threading.Lock()
        self.refreshed_at = 0.0

    def refresh(self, topics: list[str] | None = None) -> None:
        body: dict[str, Any] = {"topics": topics} if topics is not None else {}
        response, _ = self.connection.request(ApiKey.METADATA, body)
        found: dict[str, list[PartitionInfo]] = {}
        for topic in response["topics"]:
            found[topic["name"]] = [
                PartitionInfo(topic["name"], topic["topic_id"], entry["partition"],
                              Path(entry["socket"]), entry["control_block"], entry["doorbell"],
                              entry["shm_prefix"], topic.get("max_batch_bytes", 1 << 20),
                              Path(entry["log_dir"]) if "log_dir" in entry else None)
                for entry in topic["partitions"]]
        with self._lock:
            if topics is None:
                self._topics = found
            else:
                self._topics.update(found)
            self.refreshed_at = time.monotonic()

    def partitions(self, topic: str) -> list[PartitionInfo]:
        """The partitions of ``topic`` (asks the supervisor the first time)."""
        infos = self._topics.get(topic)
        if infos is None:
            validate_topic_name(topic)
            try:
                self.refresh([topic])
            except UnknownTopicOrPartitionError:
                raise UnknownTopicOrPartitionError(
                    f"unknown topic {topic!r} — create it with `shmbroker topics create "
                    f"{topic} --partitions N`") from None
            infos = self._topics[topic]
        return infos

    def partition(self, topic: str, partition: int) -> PartitionInfo:
        infos = self.partitions(topic)
        if not isinstance(partition, int) or isinstance(partition, bool) or not (
                0 <= partition < len(infos)):
            self.refresh([topic])
            infos = self.partitions(topic)
            if not isinstance(partition, int) or not 0 <= partition < len(infos):
                raise UnknownTopicOrPartitionError(
                    f"topic {topic!r} has {len(infos)} partitions; partition {partition} does "
                    "not exist")
        return infos[partition]

    def close(self) -> None:
        self.connection.close()
