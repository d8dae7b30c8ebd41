"""A stored batch whose CRC-32C holds but whose records do not parse, met by a consumer.

Such a batch can only be stored under ``record_validation = "crc"`` (the default walks each
batch's records at append and refuses it).  The consumer must behave as for any damaged batch
(Kafka's CorruptRecordException): the records before it are returned, then poll raises
CorruptLogError naming the records it spoils, again on every poll until the application seeks
to ``next_offset``; the records after it are then read normally.  Nothing is skipped silently,
by ``poll`` or by ``poll_columnar``, and the position never passes records not returned.
"""

from __future__ import annotations

import time

import pytest
from broker_helpers import RunningBroker
from integration.produce_helpers import lying_batch, raw_connect, raw_request

from shmbroker import Consumer, TopicPartition
from shmbroker.errors import CorruptLogError
from shmbroker.format import record_batch
from shmbroker.protocol.messages import ApiKey

TOPIC = "trusting"
POLL_DEADLINE_S = 20


@pytest.fixture
def stored(broker: RunningBroker) -> TopicPartition:
    """Offsets 0-1 good, 2-4 the lying batch, 5-6 good: produced over the worker's socket."""
    with broker.admin() as admin:
        admin.create_topic(TOPIC, partitions=1, config={"record_validation": "crc"})
    broker.wait_ready()
    with broker.admin() as admin:
        (meta,) = admin.metadata([TOPIC])
    batches = [record_batch.encode_batch([b"good-0", b"good-1"], producer_id=97,
                                         base_sequence=0),
               lying_batch([b"lie-0", b"lie-1"], 3),  # ends inside record 2
               record_batch.encode_batch([b"good-5", b"good-6"], producer_id=98,
                                         base_sequence=0)]
    with raw_connect(str(meta["partitions"][0]["socket"])) as sock:
        for expected, batch in zip((0, 2, 5), batches):
            reply, _, _ = raw_request(sock, ApiKey.PRODUCE, {"acks": 1}, bytes(batch))
            assert reply["results"] == [expected], reply
    return TopicPartition(TOPIC, 0)


def _poll_values(consumer: Consumer, columnar: bool) -> list[tuple[int, bytes]]:
    """What one poll returns, as (offset, value) pairs."""
    if not columnar:
        return [(record.offset, record.value) for record in consumer.poll(timeout_ms=200)]
    got = []
    for part in consumer.poll_columnar(timeout_ms=200):
        for batch in part.batches:
            got += [(int(offset), batch.value(index))
                    for index, offset in enumerate(batch.offsets.tolist())]
    return got


@pytest.mark.parametrize("columnar", [False, True], ids=["poll", "poll_columnar"])
def test_records_before_the_damage_then_the_error_then_the_records_after(
        broker: RunningBroker, stored: TopicPartition, columnar: bool) -> None:
    with Consumer(broker.data_dir, fetch_max_wait_ms=50) as consumer:
        consumer.assign([stored])
        consumer.seek(stored, 0)
        got: list[tuple[int, bytes]] = []
        error = None
        deadline = time.monotonic() + POLL_DEADLINE_S
        while error is None and time.monotonic() < deadline:
            try:
                got += _poll_values(consumer, columnar)
            except CorruptLogError as raised:
                error = raised
        assert got == [(0, b"good-0"), (1, b"good-1")]
        assert error is not None, "the damaged batch was never reported"
        assert (error.offset, error.next_offset) == (2, 5), error
        assert (error.topic, error.partition) == (TOPIC, 0)
        assert consumer.position(stored) == 2, "the position passed records not returned"
        with pytest.raises(CorruptLogError):  # again, until the application seeks past it
            deadline = time.monotonic() + POLL_DEADLINE_S
            while time.monotonic() < deadline:
                assert _poll_values(consumer, columnar) == []
        consumer.seek(stored, error.next_offset)
        after: list[tuple[int, bytes]] = []
        deadline = time.monotonic() + POLL_DEADLINE_S
        while len(after) < 2 and time.monotonic() < deadline:
            after += _poll_values(consumer, columnar)
        assert after == [(5, b"good-5"), (6, b"good-6")]
