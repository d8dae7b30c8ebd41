"""Producer backpressure (a full ring blocks, then BufferFullError) and the socket fallback."""

from __future__ import annotations

import collections
import os
import signal

import pytest
from broker_helpers import RunningBroker, wait_for
from integration.produce_helpers import check_acked, read_partitions

from shmbroker import Producer
from shmbroker.client import producer as producer_module
from shmbroker.errors import BufferFullError, RingError
from shmbroker.format import record_batch

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
        # With linger 0 the first max_in_flight_batches records went out as batches of one;
        # the rest gathered in the open batch, and the send that sealed it (full) raised: the
        # records of that batch fail with the same error, and none of them is stored.
        failed = []
        for sent, future in futures:
            error = future.exception(10)
            if error is None:
                acked.append((sent, 0, future.result(0).offset))
            else:
                assert isinstance(error, BufferFullError), error
                failed.append(sent)
        assert len(acked) > producer.max_in_flight_batches and failed
    stored = read_partitions(broker.data_dir, "slow", [0])
    assert check_acked(acked, stored) == len(acked)
    assert not set(failed) & {record.value for record in stored[0]}


def _batch_sizes(broker: RunningBroker, topic: str) -> list[int]:
    """Records per stored batch of partition 0, in offset order."""
    directory = broker.data_dir / "topics" / topic / "0"
    sizes = []
    for path in sorted(directory.glob("*.log")):
        data = path.read_bytes()
        sizes += [header.records_count for _, header in record_batch.iter_batch_positions(data)]
    return sizes


def test_linger_zero_sends_each_record_at_once_until_batches_await_acks(
        broker: RunningBroker) -> None:
    """linger_ms=0 as Kafka's: a record goes out at once (a batch of one) while fewer than
    max_in_flight_batches await their ack; past that, records gather until an ack comes back,
    so a slow worker gets a few large batches instead of one per record."""
    with broker.admin() as admin:
        admin.create_topic("lingerless", partitions=1)
    worker = broker.worker_pids()[("lingerless", 0)]
    acked: list[tuple[bytes, int, int]] = []
    with Producer(broker.data_dir, linger_ms=0, max_in_flight_batches=3) as producer:
        for index in range(10):  # one at a time: nothing awaits an ack, each goes at once
            value = b"single-%d" % index
            acked.append((value, 0, producer.send("lingerless", value, partition=0)
                          .result(10).offset))
        os.kill(worker, signal.SIGSTOP)
        try:
            futures = [(b"burst-%d" % i, producer.send("lingerless", b"burst-%d" % i,
                                                       partition=0)) for i in range(300)]
            wait_for(lambda: not producer._partitions[("lingerless", 0)].values, 10,
                     message="the I/O thread to seal the gathered records (LINGER_ZERO_HOLD_S)")
        finally:
            os.kill(worker, signal.SIGCONT)
        acked += [(value, 0, future.result(10).offset) for value, future in futures]
    assert check_acked(acked, read_partitions(broker.data_dir, "lingerless", [0])) == len(acked)
    sizes = _batch_sizes(broker, "lingerless")
    assert sizes[:13] == [1] * 13  # ten sent one by one, then three before the first wait
    assert sum(sizes) == 310 and len(sizes) < 13 + 20, sizes  # the rest in a few batches


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "5"])
def test_max_in_flight_batches_is_checked(broker: RunningBroker, value: object) -> None:
    with pytest.raises(ValueError, match=r"max_in_flight_batches must be an int >= 1"):
        Producer(broker.data_dir, max_in_flight_batches=value)  # type: ignore[arg-type]


@pytest.mark.parametrize("settings, message", [
    ({"acks": 2}, "acks must be 0, 1 or 'all', not 2"),
    ({"acks": "leader"}, "acks must be 0, 1 or 'all'"),
    ({"transport": "tcp"}, "transport must be 'auto', 'shm' or 'socket'"),
    ({"linger_ms": -1}, "linger_ms must be an int >= 0"),
    ({"linger_ms": True}, "linger_ms must be an int >= 0"),
    ({"batch_size_bytes": 1.5}, "batch_size_bytes must be an int >= 0"),
    ({"max_block_ms": "10"}, "max_block_ms must be an int >= 0"),
])
def test_producer_settings_are_checked(broker: RunningBroker, settings: dict,
                                       message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Producer(broker.data_dir, **settings)


def test_send_takes_bytes_like_values_and_keys_and_refuses_other_types(
        broker: RunningBroker) -> None:
    """bytes, bytearray and memoryview values and keys are stored as their bytes (copied at
    send: the caller may reuse its buffer at once); anything else is a TypeError naming the
    type, and the producer goes on."""
    with broker.admin() as admin:
        admin.create_topic("typed", partitions=1)
    with Producer(broker.data_dir, linger_ms=1) as producer:
        reused = bytearray(b"first")
        futures = [producer.send("typed", reused, key=bytearray(b"k1"), partition=0)]
        reused[:] = b"XXXXX"  # after send: the record keeps what it was given
        futures.append(producer.send("typed", memoryview(b"second"), key=memoryview(b"k2"),
                                     partition=0))
        for value, key, named in (("text", None, "str"), (7, None, "int"),
                                  (b"v", "text-key", "str"), (b"v", 7, "int")):
            kind = "value" if key is None else "key"
            with pytest.raises(TypeError, match=f"{kind} must be bytes or None, not {named}"):
                producer.send("typed", value, key=key, partition=0)  # type: ignore[arg-type]
        futures.append(producer.send("typed", b"third", partition=0))
        producer.flush(10)
        assert [future.result(5).offset for future in futures] == [0, 1, 2]
    (records,) = read_partitions(broker.data_dir, "typed", [0]).values()
    assert [(record.key, record.value) for record in records] == [
        (b"k1", b"first"), (b"k2", b"second"), (None, b"third")]


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


def test_the_io_threads_lockless_checks_survive_a_ring_closed_under_them(
        broker: RunningBroker) -> None:
    """The I/O thread looks at its rings without the lock while it spins for acks and before
    it sleeps (_acks_ready, _set_waiting); a sender may drop and close a ring meanwhile (its
    words overwritten: test_shm_faults). A closed ring seen there is skipped: it once raised
    "operation forbidden on released memoryview object" and killed the I/O thread, so every
    later send failed."""
    from shmbroker import Producer

    with broker.admin() as admin:
        admin.create_topic("lockless", partitions=1)
    with Producer(broker.data_dir, linger_ms=0) as producer:
        producer.send("lockless", b"first", partition=0).result(10)
        state = producer._partitions[("lockless", 0)]
        with producer._lock:  # a sender drops the ring (its words were garbage, say) ...
            ring = state.ring
            assert ring is not None and ring.closed is False
            producer._drop_ring(state, RingError("dropped by the test"))
            assert ring.closed
            # ... after the I/O thread took state.ring, which it then reads: closed
            state.ring, state.in_flight = ring, collections.deque([None])
            try:
                assert producer._acks_ready() is False
                producer._set_waiting(True)
            finally:
                state.ring = None
                state.in_flight.clear()
        assert producer.send("lockless", b"second", partition=0).result(10).offset == 1
