"""Committed offsets for manually assigned consumers (Kafka's generation -1 commits): durable
before acknowledged, used as the start position, surviving a supervisor SIGKILL."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from broker_helpers import RunningBroker

from shmbroker import Consumer, Producer, TopicPartition
from shmbroker.client.connection import Connection
from shmbroker.errors import (
    GroupIdNotFoundError,
    InvalidCommitOffsetError,
    InvalidGroupIdError,
    InvalidTopicNameError,
    ProtocolError,
    UnknownTopicOrPartitionError,
)
from shmbroker.protocol.messages import ApiKey

pytestmark = pytest.mark.integration

TP0, TP1 = TopicPartition("events", 0), TopicPartition("events", 1)


def _produce(data_dir: Path, count: int) -> None:
    with Producer(data_dir, linger_ms=1) as producer:
        for index in range(count):
            producer.send("events", b"%d" % index, partition=index % 2)
        producer.flush(10)


def test_commit_resume_and_survive_a_supervisor_kill(tmp_path: Path) -> None:
    broker = RunningBroker(tmp_path / "data").start()
    try:
        with broker.admin() as admin:
            admin.create_topic("events", partitions=2)
        _produce(broker.data_dir, 40)  # 20 per partition
        with Consumer(broker.data_dir, group_id="g", auto_offset_reset="earliest",
                      enable_auto_commit=False) as consumer:
            consumer.assign([TP0, TP1])
            assert consumer.committed([TP0, TP1]) == {TP0: None, TP1: None}
            records = []
            while len(records) < 40:
                records += consumer.poll(5000, max_records=7)
            consumer.commit({TP0: 12})
            consumer.commit()  # positions: TP1 is at 20, TP0 at 20 (overrides 12)
            assert consumer.committed([TP0, TP1]) == {TP0: 20, TP1: 20}
            consumer.commit({TP0: 5, TP1: 9})
        broker.kill()  # SIGKILL supervisor and workers: acknowledged commits must survive
        broker.start()
        with broker.admin() as admin:
            assert admin.list_consumer_group_offsets("g") == {("events", 0): 5, ("events", 1): 9}
        with Consumer(broker.data_dir, group_id="g", auto_offset_reset="latest") as consumer:
            consumer.assign([TP0, TP1])
            got = []
            while len(got) < 15 + 11:
                got += consumer.poll(5000)
            assert sorted((r.partition, r.offset) for r in got) == (
                [(0, offset) for offset in range(5, 20)] + [(1, offset) for offset in range(9, 20)])
        # auto-commit on close committed the positions
        with Consumer(broker.data_dir, group_id="g") as consumer:
            assert consumer.committed([TP0, TP1]) == {TP0: 20, TP1: 20}
    finally:
        broker.stop()
        broker.cleanup_shared_memory()


def test_commit_after_a_limited_poll_covers_only_the_records_returned(
        broker: RunningBroker) -> None:
    """A fetch brings every record; max_poll_records returns a few.  commit() (and the
    auto-commit on close) stores the position after the last record returned, not after the
    last one fetched: the next member starts at the first record it never saw."""
    with broker.admin() as admin:
        admin.create_topic("events", partitions=2)
    with Producer(broker.data_dir, linger_ms=50) as producer:  # one batch per partition
        for index in range(400):
            producer.send("events", b"%d" % index, partition=index % 2)
        producer.flush(10)
    seen: list[tuple[int, int]] = []
    with Consumer(broker.data_dir, group_id="g", auto_offset_reset="earliest",
                  max_poll_records=30) as consumer:
        consumer.assign([TP0, TP1])
        while len(seen) < 50:
            seen += [(r.partition, r.offset) for r in consumer.poll(5000)]
        consumer.commit()
        committed = consumer.committed([TP0, TP1])
        for tp in (TP0, TP1):
            returned = [offset for partition, offset in seen if partition == tp.partition]
            assert committed[tp] == consumer.position(tp) == (returned[-1] + 1 if returned
                                                               else 0)
        seen += [(r.partition, r.offset) for r in consumer.poll(5000)]  # then close commits
    with Consumer(broker.data_dir, group_id="g", auto_offset_reset="earliest") as consumer:
        consumer.assign([TP0, TP1])
        while len(seen) < 400:
            records = consumer.poll(5000)
            assert records, "the second consumer stopped short"
            seen += [(r.partition, r.offset) for r in records]
    assert sorted(seen) == sorted((p, o) for p in range(2) for o in range(200))  # each once


def test_bad_commits_get_clear_errors(broker: RunningBroker) -> None:
    with broker.admin() as admin:
        admin.create_topic("events", partitions=2)
    with Consumer(broker.data_dir, group_id="g") as consumer:
        with pytest.raises(UnknownTopicOrPartitionError, match="nope"):
            consumer.commit({TopicPartition("nope", 0): 1})
        with pytest.raises(UnknownTopicOrPartitionError, match="partition 7 does not exist"):
            consumer.commit({TopicPartition("events", 7): 1})
        with pytest.raises(InvalidCommitOffsetError, match="offsets are >= 0"):
            consumer.commit({TP0: -3})
        assert consumer.committed([TP0]) == {TP0: None}
        consumer.commit({TP0: 3})  # the connection still works after refused commits
        assert consumer.committed([TP0]) == {TP0: 3}
    with Consumer(broker.data_dir) as consumer, pytest.raises(ValueError, match="group_id"):
        consumer.commit({TP0: 1})


@pytest.mark.parametrize("body, error, message", [
    ({"group_id": ["g"], "offsets": []}, ProtocolError, "'group_id' must be str"),
    ({"group_id": "", "offsets": []}, InvalidGroupIdError, "1 to 249 characters"),
    ({"group_id": "g", "offsets": "x"}, ProtocolError, "'offsets' must be list"),
    ({"group_id": "g", "offsets": [["events", 0, 1]]}, ProtocolError, "each committed offset"),
    ({"group_id": "g", "offsets": [["events", 0, "1", None]]}, ProtocolError,
     "each committed offset"),
    ({"group_id": "g", "offsets": [["events", True, 1, None]]}, ProtocolError,
     "each committed offset"),
    ({"group_id": "g", "offsets": [["events", 0, 1, 5]]}, ProtocolError,
     "each committed offset"),
    ({"group_id": "g", "offsets": [["a/b", 0, 1, None]]}, InvalidTopicNameError, "a/b"),
    ({"group_id": "g", "offsets": [["events", -1, 1, None]]}, UnknownTopicOrPartitionError,
     "partition -1 does not exist"),
    ({"group_id": "g", "member_id": 7, "offsets": []}, ProtocolError, "'member_id' must be str"),
    ({"group_id": "g", "member_epoch": "1", "offsets": []}, ProtocolError,
     "'member_epoch' must be int"),
    # a member commit to a group that has no members (KIP-848: GROUP_ID_NOT_FOUND)
    ({"group_id": "g", "member_id": "nobody", "member_epoch": 1, "offsets": []},
     GroupIdNotFoundError, "does not exist"),
])
def test_malformed_commit_requests_get_clear_errors(broker: RunningBroker, body: dict[str, Any],
                                                    error: type[Exception], message: str) -> None:
    """Raw OFFSET_COMMIT requests of the wrong shape: a precise error (INVALID_REQUEST closes
    the connection), nothing stored, and the broker serves the next client."""
    with broker.admin() as admin:
        admin.create_topic("events", partitions=2)
    connection = Connection(broker.socket_path, 10.0)
    try:
        with pytest.raises(error, match=message):
            connection.request(ApiKey.OFFSET_COMMIT, body)
    finally:
        connection.close()
    with broker.admin() as admin:
        assert admin.list_consumer_group_offsets("g") == {}
    with Consumer(broker.data_dir, group_id="g") as consumer:
        consumer.commit({TP0: 4})
        assert consumer.committed([TP0]) == {TP0: 4}
