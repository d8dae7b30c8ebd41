"""A broker whose workers check large appends on a second thread (worker_check_thread = "on";
"auto" leaves it off on a machine with fewer than 4 CPUs, such as CI's): every acknowledged
record stored at its offset, a lying batch in a large region refused and nothing of it stored,
on the ring path and on the socket path."""

from __future__ import annotations

from pathlib import Path

import pytest
from broker_helpers import RunningBroker
from integration.produce_helpers import lying_batch, raw_connect, raw_request, read_partitions

from shmbroker import Producer, limits
from shmbroker.format import record_batch
from shmbroker.protocol.messages import RING_RESULT_NUMBERS, ApiKey

pytestmark = pytest.mark.integration

CORRUPT = RING_RESULT_NUMBERS["CORRUPT_MESSAGE"]
VALUE_BYTES = 1000


@pytest.fixture(params=["on", "off"])
def broker(request: pytest.FixtureRequest, tmp_path: Path):
    with RunningBroker(tmp_path / "data",
                       config_toml=f'worker_check_thread = "{request.param}"\n') as running:
        yield running


def _values(tag: str, count: int) -> list[bytes]:
    return [f"{tag}-{number:06d}-".encode().ljust(VALUE_BYTES, b"x") for number in range(count)]


def test_large_regions_from_the_ring_are_stored_whole(broker: RunningBroker) -> None:
    with broker.admin() as admin:
        admin.create_topic("big", partitions=1)
    broker.wait_ready()
    values = _values("ring", 3000)  # ~3 MB in 64 KiB batches: regions up to 1 MiB
    with Producer(broker.data_dir, linger_ms=50, batch_size_bytes=65536) as producer:
        futures = [producer.send("big", value, partition=0) for value in values]
        producer.flush()
        offsets = [future.result(timeout=30).offset for future in futures]
    assert offsets == list(range(len(values)))
    stored = read_partitions(broker.data_dir, "big", [0])[0]
    assert [(record.offset, record.value) for record in stored] == list(enumerate(values))


def test_a_lying_batch_in_a_large_socket_produce_is_refused_alone(broker: RunningBroker) -> None:
    with broker.admin() as admin:
        admin.create_topic("lies", partitions=1)
    broker.wait_ready()
    with broker.admin() as admin:
        (meta,) = admin.metadata(["lies"])
    good = [record_batch.encode_batch(_values(f"b{number}", 60), producer_id=97,
                                      base_sequence=number * 60) for number in range(6)]
    lying = lying_batch([b"count-a", b"count-b"], 3)
    payload = b"".join(bytes(batch) for batch in good[:3]) + bytes(lying) + b"".join(
        bytes(batch) for batch in good[3:])
    assert len(payload) >= limits.append_overlap_bytes_min
    with raw_connect(str(meta["partitions"][0]["socket"])) as sock:
        reply, _, _ = raw_request(sock, ApiKey.PRODUCE, {"acks": 1}, payload)
    assert reply["results"] == [0, 60, 120, CORRUPT, 180, 240, 300], reply
    stored = read_partitions(broker.data_dir, "lies", [0])[0]
    expected = [value for number in range(6) for value in _values(f"b{number}", 60)]
    assert [record.value for record in stored] == expected
    assert [record.offset for record in stored] == list(range(360))
