"""End to end through real processes: create, produce, consume, describe."""

from __future__ import annotations

import pytest
from broker_helpers import RunningBroker

from shmbroker import Consumer, Producer, TopicPartition

pytestmark = pytest.mark.integration


def test_produce_and_consume_every_record_by_value_and_offset(broker: RunningBroker) -> None:
    with broker.admin() as admin:
        admin.create_topic("metrics", partitions=2)
    with Producer(broker.data_dir, linger_ms=2) as producer:
        futures = [producer.send("metrics", b"value-%d" % i, partition=i % 2) for i in range(2000)]
        producer.flush(10)
        metas = [future.result(5) for future in futures]
    for partition in (0, 1):
        offsets = [meta.offset for meta in metas if meta.partition == partition]
        assert offsets == list(range(1000))
    with Consumer(broker.data_dir, auto_offset_reset="earliest") as consumer:
        consumer.assign([TopicPartition("metrics", 0), TopicPartition("metrics", 1)])
        records = []
        while len(records) < 2000:
            got = consumer.poll(timeout_ms=5000)
            assert got, "no records within 5 s"
            records += got
    by_value = {record.value: (record.partition, record.offset) for record in records}
    assert len(by_value) == 2000
    for i, meta in enumerate(metas):
        assert by_value[b"value-%d" % i] == (meta.partition, meta.offset)
