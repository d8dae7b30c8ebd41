"""Positions from the shared control block (no round trip) and their fallback to LIST_OFFSETS."""

from __future__ import annotations

import os
import signal

import pytest
from broker_helpers import RunningBroker, wait_for

from shmbroker import Consumer, Producer, TopicPartition

pytestmark = pytest.mark.integration

TP = TopicPartition("pos", 0)


def test_positions_come_from_the_control_block_and_survive_a_worker_restart(
        broker: RunningBroker) -> None:
    with broker.admin() as admin:
        admin.create_topic("pos", partitions=1)
    with Producer(broker.data_dir, linger_ms=0) as producer, \
            Consumer(broker.data_dir) as consumer:
        for index in range(5):
            producer.send("pos", b"%d" % index, partition=0).result(5)
        assert consumer.highwater(TP) == 5
        assert consumer.end_offsets([TP]) == {TP: 5}
        assert consumer.beginning_offsets([TP]) == {TP: 0}
        assert consumer._control_blocks, "the positions did not come from the control block"
        # kill the worker: the lookups fall back to asking the (restarted) worker
        old = broker.worker_pids()[("pos", 0)]
        os.kill(old, signal.SIGKILL)
        wait_for(lambda: broker.worker_pids().get(("pos", 0)) not in (None, old), 20,
                 message="the worker's restart")
        assert consumer.end_offsets([TP]) == {TP: 5}
        producer.send("pos", b"5", partition=0).result(10)
        assert consumer.end_offsets([TP]) == {TP: 6}
        consumer.assign([TP])
        consumer.seek_to_end(TP)
        assert consumer.position(TP) == 6
        consumer.seek_to_beginning(TP)
        assert [r.value for r in consumer.poll(5000)] == [b"%d" % i for i in range(6)]
