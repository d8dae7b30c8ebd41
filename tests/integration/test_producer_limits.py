"""Producer backpressure (a full ring blocks, then BufferFullError) and the socket fallback."""

from __future__ import annotations

import os
import signal

import pytest
from broker_helpers import RunningBroker
from integration.produce_helpers import check_acked, read_partitions

from shmbroker import Producer
from shmbroker.client import producer as producer_module
from shmbroker.errors import BufferFullError

pytestmark = pytest.mark.integration


def test_a_full_ring_blocks_then_raises_and_nothing_acked_is_lost(broker: RunningBroker) -> None:
    with broker.admin() as admin:
        admin.create_topic("slow", partitions=1)
    worker = broker.worker_pids()[("slow", 0)]
    value = b"v" * 1000
    acked: list[tuple[bytes, int, int]] = []
    with Producer(broker.data_dir, linger_ms=0, ring_bytes=64 * 1024, max_block_ms=300,
                  delivery_timeout_ms=60_000) as producer:
        producer.send("slow", b"first", partition=0).result(10)  # ring and worker are up
        acked.append((b"first", 0, 0))
        os.kill(worker, signal.SIGSTOP)
        futures = []
        try:
            with pytest.raises(BufferFullError) as caught:
                for index in range(1000):  # 1 MB into a 64 KiB ring: it fills up
                    futures.append((value + b"%d" % index,
                                    producer.send("slow", value + b"%d" % index, partition=0)))
            assert "stayed full" in str(caught.value) and "slow/0" in str(caught.value)
            assert 10 < len(futures) < 1000
        finally:
            os.kill(worker, signal.SIGCONT)
        for sent, future in futures:
            acked.append((sent, 0, future.result(10).offset))
    assert check_acked(acked, read_partitions(broker.data_dir, "slow", [0])) == len(acked)


def test_producer_falls_back_to_the_socket_when_shared_memory_is_refused(
        broker: RunningBroker, monkeypatch: pytest.MonkeyPatch) -> None:
    with broker.admin() as admin:
        admin.create_topic("fallback", partitions=2)

    def refuse(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied", "/dev/shm/ring")

    monkeypatch.setattr(producer_module.RingWriter, "create", refuse)
    with Producer(broker.data_dir, linger_ms=1) as producer:
        futures = [(b"r%d" % i, producer.send("fallback", b"r%d" % i, partition=i % 2))
                   for i in range(300)]
        producer.flush(10)
        acked = [(value, future.result(5).partition, future.result(5).offset)
                 for value, future in futures]
        assert all(state.use_socket for state in producer._partitions.values())
    assert check_acked(acked, read_partitions(broker.data_dir, "fallback", [0, 1])) == 300
