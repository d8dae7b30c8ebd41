"""Hostile names (issue 6): topic and group names with ``/``, ``..``, NUL, 10,000 characters,
or text that is not valid UTF-8, through every request that takes one.  Each gets a clear error
(or, where Kafka allows the name, works), the broker keeps serving, and nothing on disk is
created outside the data dir's own layout."""

from __future__ import annotations

import socket
import struct
from pathlib import Path

import orjson
import pytest
from broker_helpers import RunningBroker

from shmbroker import Consumer, TopicPartition
from shmbroker.client.connection import Connection
from shmbroker.errors import (
    GroupIdNotFoundError,
    InvalidGroupIdError,
    InvalidTopicNameError,
    ProtocolError,
    UnknownTopicOrPartitionError,
)
from shmbroker.protocol.frames import HEADER
from shmbroker.protocol.messages import ApiKey

pytestmark = pytest.mark.integration

BAD_TOPICS = ["a/b", "..", ".", "../escape", "nul\0byte", "x" * 10_000, "", "sp ace"]


def test_hostile_topic_names_are_refused_everywhere(broker: RunningBroker) -> None:
    with broker.admin() as admin:
        admin.create_topic("ok")
        for name in BAD_TOPICS:
            with pytest.raises(InvalidTopicNameError, match="invalid topic name"):
                admin.create_topic(name)
            for call in (admin.describe_topic, admin.delete_topic):
                with pytest.raises((InvalidTopicNameError, UnknownTopicOrPartitionError)):
                    call(name)
        assert admin.list_topics() == ["ok"]
    with Consumer(broker.data_dir, group_id="g") as consumer:
        for name in BAD_TOPICS[:3]:
            with pytest.raises((InvalidTopicNameError, UnknownTopicOrPartitionError)):
                consumer.commit({TopicPartition(name, 0): 1})
    # nothing was created next to or above the topics dir
    assert sorted(entry.name for entry in (broker.data_dir / "topics").iterdir()) == ["ok"]
    assert not (broker.data_dir.parent / "escape").exists()


@pytest.mark.parametrize("group_id", ["a/b", "..", "nul\0byte", "ünïcode ✓", "x" * 249])
def test_odd_but_valid_group_ids_work_as_kafka_allows(broker: RunningBroker,
                                                       group_id: str) -> None:
    """Kafka allows any string as a group id; it never becomes a path here (one offset log)."""
    with broker.admin() as admin:
        admin.create_topic("t")
    with Consumer(broker.data_dir, group_id=group_id, enable_auto_commit=False) as consumer:
        consumer.assign([TopicPartition("t", 0)])
        consumer.commit({TopicPartition("t", 0): 3})
        assert consumer.committed([TopicPartition("t", 0)]) == {TopicPartition("t", 0): 3}
    with broker.admin() as admin:
        assert admin.describe_consumer_group(group_id)["partitions"][0]["committed_offset"] == 3
        admin.delete_consumer_group(group_id)
        with pytest.raises(GroupIdNotFoundError):
            admin.describe_consumer_group(group_id)
    assert sorted(entry.name for entry in (broker.data_dir / "groups").iterdir()) == [
        "offsets.log"]


@pytest.mark.parametrize("api_key, body", [
    (ApiKey.DESCRIBE_GROUP, {"group_id": "x" * 10_000}),
    (ApiKey.DELETE_GROUP, {"group_id": ""}),
    (ApiKey.OFFSET_COMMIT, {"group_id": "x" * 250, "offsets": []}),
    (ApiKey.JOIN_GROUP, {"group_id": "x" * 10_000, "topics": ["t"], "session_timeout_ms": 10000,
                         "rebalance_timeout_ms": 10000}),
])
def test_overlong_and_empty_group_ids_get_clear_errors(broker: RunningBroker, api_key: ApiKey,
                                                        body: dict) -> None:
    connection = Connection(broker.socket_path, 10.0)
    try:
        with pytest.raises(InvalidGroupIdError, match="1 to 249 characters"):
            connection.request(api_key, body)
        connection.request(ApiKey.LIST_GROUPS, {})  # the same connection still serves
    finally:
        connection.close()


def _raw_request(path: Path, api_key: int, json_bytes: bytes) -> dict:
    """Send a frame whose JSON part is exactly ``json_bytes`` (not necessarily valid)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(HEADER.pack(12 + len(json_bytes), api_key, 0, 1, len(json_bytes))
                     + json_bytes)
        head = sock.recv(16, socket.MSG_WAITALL)
        length, _, _, _, json_length = struct.unpack(">IHHII", head)
        rest = b""
        while len(rest) < length - 12:
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
        return orjson.loads(rest[:json_length])


@pytest.mark.parametrize("json_bytes", [
    b'{"name": "\xff\xfe", "partitions": 1}',  # not UTF-8 at all
    b'{"name": "\\ud800", "partitions": 1}',  # a lone surrogate: no UTF-8 for it
])
def test_names_that_are_not_utf8_are_refused(broker: RunningBroker, json_bytes: bytes) -> None:
    answer = _raw_request(broker.socket_path, ApiKey.CREATE_TOPIC, json_bytes)
    assert answer["error"] == ProtocolError.code and "JSON" in answer["message"], answer
    with broker.admin() as admin:
        assert admin.list_topics() == []
        admin.create_topic("fine")  # the broker serves on
