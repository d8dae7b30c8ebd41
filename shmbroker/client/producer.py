"""The producer: batches records per partition and hands them to the partition's worker.

>>> with Producer(data_dir="./shmbroker-data", acks=1, linger_ms=5) as producer:
...     future = producer.send("metrics", value=b"21.5", key=b"sensor-7")
...     future.result(timeout=5)      # RecordMetadata(topic, partition, offset, timestamp_ms)

Path of a record: ``send`` appends it to its partition's open batch (under one lock); the batch
is sealed when it reaches ``batch_size_bytes``, when ``linger_ms`` has passed since its first
record (the I/O thread seals it), or at ``flush``.  ``linger_ms=0`` seals at once, in the
calling thread (the lowest latency, one batch per record) while fewer than
``max_in_flight_batches`` of the partition's batches await their ack; past that, as Kafka's
sender does at max.in.flight.requests.per.connection, records gather in the open batch until an
ack comes back (the I/O thread seals it then, or after ``LINGER_ZERO_HOLD_S``), so under load
batches grow by themselves instead of the worker taking one batch per record.  A sealed batch
is encoded as a Kafka RecordBatch v2 (producer id = the ring's id, base sequence = records sent
so far to that partition, so a restarted worker can recognise what it already appended) and
copied into this producer's shared-memory ring for that partition; the worker is woken through
its doorbell only when its control block says it sleeps.  The worker writes each batch's base
offset (or an error number) into the ring's ack slots; the I/O thread reads them and completes
the futures.

Nothing in a ring is lost when a worker dies: the restarted worker re-attaches the ring and
appends what is left.  A partition whose ring cannot be created (no /dev/shm access, another
user's broker) falls back to PRODUCE requests over the worker's socket, one round trip per batch,
retried after a worker restart (at least once: a batch the dead worker had appended may be
appended again).

Backpressure: a full ring blocks ``send`` up to ``max_block_ms`` (BufferFullError after), and
records waiting in open batches are bounded by ``buffer_memory_bytes``.
"""

from __future__ import annotations

import collections
import contextlib
import os
import select
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from shmbroker import limits
from shmbroker.client.connection import Connection
from shmbroker.client.futures import BatchFuture, ProducedBatch, RecordFuture
from shmbroker.client.metadata import Metadata, PartitionInfo
from shmbroker.client.partitioner import StickyPartitioner, partition_for_key
from shmbroker.client.types import resolve_data_dir
from shmbroker.errors import (
    BatchTooLargeError,
    BrokerError,
    BrokerNotRunningError,
    BufferFullError,
    ClosedError,
    RecordTooLargeError,
    RequestTimeoutError,
    RingError,
    ShmbrokerError,
    ShuttingDownError,
    UnknownTopicOrPartitionError,
    error_from_code,
)
from shmbroker.format import record_batch
from shmbroker.format.ring_layout import broken_reason
from shmbroker.protocol.messages import (
    ACKS_ALL,
    ACKS_LEADER,
    ACKS_NONE,
    RING_RESULT_ERRORS,
    ApiKey,
)
from shmbroker.shm import control_block, doorbell, names
from shmbroker.shm.control_block import ControlBlock
from shmbroker.shm.ring import RingWriter

SEQUENCE_MODULUS = 1 << 31
# Upper bound of a record's framing: length, attributes, timestamp and offset deltas, key and
# value lengths, header count (varints; a timestamp delta can take 10 bytes).
RECORD_OVERHEAD_BYTES = 24
METADATA_RETRY_AFTER_S = 1.0  # a worker unreachable this long: ask the supervisor what changed
SPIN_S = 0.0001
IO_WAIT_S_MAX = 0.1
IN_FLIGHT_WAIT_S = 0.005
# linger_ms=0 with max_in_flight_batches awaiting their ack: the longest a record waits in its
# open batch for an ack to come back (then it is sealed anyway: a worker that stopped
# acknowledging gets the records in its ring, where delivery_timeout_ms and max_block_ms apply)
LINGER_ZERO_HOLD_S = 0.005
ATTACH_RETRY_S = 0.1
CONNECTION_CHECK_S = 0.5
RING_BYTES_DEFAULT = 8 * limits.MIB  # a producer's ring per partition (Producer ring_bytes)
KEY_CACHE_ENTRIES_MAX = 65_536  # key -> partition, so murmur2 runs once per distinct key


def _acks_number(acks: int | str) -> int:
    if acks in (0, "0"):
        return ACKS_NONE
    if acks in (1, "1"):
        return ACKS_LEADER
    if acks in (-1, "-1", "all"):
        return ACKS_ALL
    raise ValueError(f"acks must be 0, 1 or 'all', not {acks!r}")


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


_time_ns = time.time_ns
_new_future = object.__new__


class _Partition:
    """A partition's open batch, ring (or socket fallback) and batches in flight."""

    def __init__(self, info: PartitionInfo) -> None:
        self.info = info
        self.topic = info.topic
        self.partition = info.partition
        self.ring: RingWriter | None = None
        self.control: ControlBlock | None = None
        self.worker_doorbell = b"\0" + info.doorbell.encode()
        self.connection: Connection | None = None
        self.attached = False
        self.use_socket = False
        self.next_attach = 0.0
        self.sequence = 0
        self.in_flight: collections.deque[ProducedBatch | None] = collections.deque()
        self.unreachable_since = 0.0
        # A RecordBatch may not exceed the topic's max_batch_bytes (header included).
        self.record_bytes_max = info.max_batch_bytes - record_batch.HEADER_SIZE
        self.batch_limit = self.record_bytes_max
        self.reset_open()

    def reset_open(self) -> None:
        self.values: list[bytes | None] = []
        self.keys: list[bytes | None] | None = None
        self.headers: list[Any] | None = None
        self.timestamps: list[int] = []
        self.open_bytes = 0
        self.opened_at = 0.0
        self.batch: ProducedBatch | None = None


class Producer:
    """Kafka-shaped producer.  Thread-safe; one I/O thread completes futures."""

    def __init__(self, data_dir: str | os.PathLike[str] | None = None, *,
                 acks: int | str = 1, linger_ms: int = 5, batch_size_bytes: int = 65536,
                 max_block_ms: int = 60_000, buffer_memory_bytes: int = 32 * limits.MIB,
                 delivery_timeout_ms: int = 120_000, compression: str | None = None,
                 ring_bytes: int = RING_BYTES_DEFAULT, ring_ack_slots: int = 4096,
                 transport: str = "auto", request_timeout_ms: int = 30_000,
                 metadata_max_age_ms: int = 300_000, max_in_flight_batches: int = 5) -> None:
        if transport not in ("auto", "shm", "socket"):
            raise ValueError(f"transport must be 'auto', 'shm' or 'socket', not {transport!r}")
        for name, value in (("linger_ms", linger_ms), ("max_block_ms", max_block_ms),
                            ("batch_size_bytes", batch_size_bytes)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, not {value!r}")
        if not isinstance(max_in_flight_batches, int) or isinstance(max_in_flight_batches, bool) \
                or max_in_flight_batches < 1:
            raise ValueError(f"max_in_flight_batches must be an int >= 1, not "
                             f"{max_in_flight_batches!r}")
        self.data_dir = resolve_data_dir(data_dir)
        self.acks = _acks_number(acks)
        self.linger_s = linger_ms / 1000
        # Kafka's max.in.flight.requests.per.connection, for linger_ms=0 (see the module text)
        self.max_in_flight_batches = max_in_flight_batches
        self.batch_size_bytes = max(batch_size_bytes, 1)
        self.max_block_s = max_block_ms / 1000
        self.buffer_memory_bytes = buffer_memory_bytes
        self.delivery_timeout_s = delivery_timeout_ms / 1000
        self.codec = record_batch.codec_number(compression or "none")  # ValueError if unknown
        if self.codec != record_batch.CODEC_NONE:
            record_batch.compress(self.codec, b"")  # one this build cannot encode: say so now
        self.ring_bytes = ring_bytes
        self.ring_ack_slots = ring_ack_slots
        self.transport = transport
        self.request_timeout_s = request_timeout_ms / 1000
        self.metadata_max_age_s = metadata_max_age_ms / 1000
        self._metadata = Metadata(self.data_dir, request_timeout_ms / 1000)
        self._metadata.refresh()  # fail fast when no broker runs
        self._partitions: dict[tuple[str, int], _Partition] = {}
        self._sticky = StickyPartitioner()
        self._lock = threading.RLock()
        self._routes: dict[tuple[str, int | None], _Partition] = {}
        self._key_partitions: dict[tuple[str, bytes], int] = {}
        self._open_bytes = 0
        self._closed = False
        self._doorbell = doorbell.Doorbell.bind(
            doorbell.Doorbell.new_name(names.shm_prefix(self.data_dir)))
        self._io_idle = False
        self._io_wake_at = 0.0  # when the I/O thread's sleep ends at the latest (monotonic)
        self._io_stop = False
        self._io_error: BaseException | None = None
        self._io_thread = threading.Thread(target=self._io_loop, name="shmbroker-producer-io",
                                           daemon=True)
        self._io_thread.start()

    # -- public API -----------------------------------------------------------------------------
    def send(self, topic: str, value: bytes | None = None, key: bytes | None = None, *,
             headers: Sequence[tuple[str, bytes | None]] | None = None,
             partition: int | None = None, timestamp_ms: int | None = None) -> RecordFuture:
        """Queue one record; a future of its :class:`RecordMetadata`."""
        # The hot path: a few dict lookups and list appends under one lock (~1 µs a record).
        if type(value) is not bytes and value is not None:
            if not isinstance(value, bytearray | memoryview):
                raise TypeError(f"value must be bytes or None, not {type(value).__name__}")
            value = bytes(value)
        size = RECORD_OVERHEAD_BYTES + (len(value) if value is not None else 0)
        if key is not None:
            if type(key) is not bytes:
                if not isinstance(key, bytearray | memoryview):
                    raise TypeError(f"key must be bytes or None, not {type(key).__name__}")
                key = bytes(key)
            size += len(key)
        if headers:
            size += sum(len(name) + (len(data) if data else 0) + 4 for name, data in headers)
        # acquire/release, not "with": 190 ns against 340 ns for the pair here (CPython 3.11)
        lock = self._lock
        lock.acquire()
        try:
            if self._closed or self._io_error is not None:
                self._check_open()
            state = self._routes.get((topic, partition)) if key is None else None
            if state is None:
                state = self._route(topic, key, partition)
            if size > state.record_bytes_max:  # a failed future, as Kafka's Java producer
                failed = ProducedBatch(topic, state.partition)
                failed.count = 1
                failed.complete(-1, BatchTooLargeError(
                    f"a record of about {size} bytes does not fit in a batch for "
                    f"{topic}/{state.partition}: the topic's max_batch_bytes is "
                    f"{state.info.max_batch_bytes} (header included) [MESSAGE_TOO_LARGE]"))
                return RecordFuture(failed, 0)
            values = state.values
            if values and state.open_bytes + size > state.batch_limit:
                self._seal(state)
                if key is None and partition is None:
                    state = self._routes[(topic, None)]
                values = state.values
            if not values:
                self._open_batch(state, size)
            batch = state.batch
            index = len(values)
            values.append(value)
            if key is not None or state.keys is not None:
                if state.keys is None:
                    state.keys = [None] * index
                state.keys.append(key)
            if headers or state.headers is not None:
                if state.headers is None:
                    state.headers = [None] * index
                state.headers.append(list(headers) if headers else None)
            state.timestamps.append(_time_ns() // 1_000_000 if timestamp_ms is None
                                    else timestamp_ms)
            state.open_bytes += size
            self._open_bytes += size
            if state.open_bytes >= state.batch_limit or (
                    not self.linger_s and not self._acks_awaited(state)):
                self._seal(state)
            # RecordFuture(batch, index) without its __init__ call: ~0.1 µs of ~1.5 a send
            future = _new_future(RecordFuture)
            future._batch = batch
            future._index = index
            return future
        finally:
            lock.release()

    def _open_batch(self, state: _Partition, size: int) -> None:
        if self._open_bytes + size > self.buffer_memory_bytes:
            self._flush_open_batches()
        state.batch = ProducedBatch(state.topic, state.partition)
        state.opened_at = time.monotonic()
        if self._io_idle and (self.linger_s or self._acks_awaited(state)):
            # The I/O thread seals this batch: it must know of it, unless it wakes before the
            # batch is due anyway (with batches in flight it sleeps IN_FLIGHT_WAIT_S at most).
            # A ring wakes it to take the lock and sleep again, ~10-30 us of this thread's
            # time here: once a batch, while batches filled faster than linger_ms.
            if not self.linger_s or self._io_wake_at > state.opened_at + self.linger_s:
                doorbell.ring(self._doorbell.address)

    def send_batch(self, topic: str, values: Sequence[bytes | None] | tuple[Any, Any], *,
                   partition: int | None = None, keys: Sequence[bytes | None] | None = None,
                   timestamps: Any = None) -> BatchFuture:
        """Queue many records for one partition at once.

        ``values``: a list of bytes, or a ``(buffer, lengths)`` pair (one buffer of values back
        to back and an int array of their lengths: the columnar API, O(1) Python work per
        RecordBatch).  ``timestamps``: one int for all, an int64 array, or None for now.  The
        records are cut into RecordBatches of about ``batch_size_bytes`` and written in order.
        """
        columnar = isinstance(values, tuple)
        if columnar:
            buffer, lengths = values
            lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
            key_buffer = key_lengths = None
            if keys is not None:
                key_buffer, key_lengths = record_batch._lengths_and_buffer(keys, "keys")
            count = len(lengths)
            sizes = lengths.clip(0) + (key_lengths.clip(0) if key_lengths is not None else 0)
        else:
            count = len(values)
            if keys is not None and len(keys) != count:
                raise ValueError(f"{len(keys)} keys for {count} values")
            sizes = np.fromiter((len(v) if v is not None else 0 for v in values),
                                dtype=np.int64, count=count)
        if count == 0:
            raise ValueError("send_batch needs at least one record")
        if timestamps is None:
            timestamps = _now_ms()
        with self._lock:
            self._check_open()
            if partition is None and keys is not None:
                first_key = keys[0]
                partition = (partition_for_key(bytes(first_key), len(self._topic(topic)))
                             if first_key is not None else None)
            state = self._choose(topic, None, partition)
            if state.values:
                self._seal(state)
            sizes = sizes + RECORD_OVERHEAD_BYTES
            if int(sizes.max()) > state.record_bytes_max:
                raise RecordTooLargeError(
                    f"a record of about {int(sizes.max())} bytes does not fit in a batch for "
                    f"{topic}/{state.partition}: the topic's max_batch_bytes is "
                    f"{state.info.max_batch_bytes} (header included)")
            cuts = _cut_points(sizes, state.batch_limit)
            batches: list[ProducedBatch] = []
            value_ends = np.cumsum(lengths.clip(0)) if columnar else None
            key_ends = (np.cumsum(key_lengths.clip(0))
                        if columnar and key_lengths is not None else None)
            for start, stop in zip(cuts[:-1], cuts[1:]):
                stamp = (timestamps if isinstance(timestamps, int)
                         else np.asarray(timestamps, dtype=np.int64)[start:stop])
                if columnar:
                    assert value_ends is not None
                    v0 = int(value_ends[start - 1]) if start else 0
                    v1 = int(value_ends[stop - 1])
                    kwargs: dict[str, Any] = {}
                    if key_ends is not None:
                        k0 = int(key_ends[start - 1]) if start else 0
                        kwargs = {"keys": memoryview(key_buffer)[k0:int(key_ends[stop - 1])],
                                  "key_lengths": key_lengths[start:stop]}
                    encode = _Encoder(lambda pid, seq, v0=v0, v1=v1, start=start, stop=stop,
                                      stamp=stamp, kwargs=kwargs:
                                      record_batch.encode_batch_columnar(
                                          memoryview(buffer)[v0:v1], lengths[start:stop],
                                          timestamps=stamp, codec=self.codec, producer_id=pid,
                                          producer_epoch=0, base_sequence=seq, **kwargs))
                else:
                    chunk_keys = list(keys[start:stop]) if keys is not None else None
                    encode = _Encoder(lambda pid, seq, start=start, stop=stop, stamp=stamp,
                                      chunk_keys=chunk_keys:
                                      record_batch.encode_batch(
                                          values[start:stop], keys=chunk_keys,  # type: ignore[index]
                                          timestamps=stamp, codec=self.codec, producer_id=pid,
                                          producer_epoch=0, base_sequence=seq))
                batch = ProducedBatch(topic, state.partition)
                batch.count = stop - start
                batch.timestamps = (stamp if isinstance(stamp, int)
                                    else stamp.tolist())  # type: ignore[assignment]
                self._write(state, batch, encode)
                batches.append(batch)
            # No wake-up for the I/O thread: the worker rings it when it acknowledges (every
            # ring, a new one too, says that it waits), as for batches sealed by send.
        return BatchFuture(topic, state.partition, batches)

    def flush(self, timeout: float | None = None) -> None:
        """Send every open batch and wait until all sent batches are acknowledged."""
        with self._lock:
            self._check_open()
            self._flush_open_batches()
            waiting = [batch for state in self._partitions.values()
                       for batch in state.in_flight if batch is not None]
            if self._io_idle:
                doorbell.ring(self._doorbell.address)
        deadline = None if timeout is None else time.monotonic() + timeout
        for batch in waiting:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not batch.wait(left):
                raise RequestTimeoutError(f"flush: batches still unacknowledged after {timeout} s")

    def partitions_for(self, topic: str) -> list[int]:
        return list(range(len(self._topic(topic))))

    def close(self, timeout: float | None = None) -> None:
        """Flush (up to ``timeout``), stop the I/O thread, close the rings (the workers drain
        and remove them)."""
        if self._closed:
            return
        try:
            self.flush(timeout)
        except (ShmbrokerError, OSError):
            pass
        with self._lock:
            self._closed = True
            self._io_stop = True
        doorbell.ring(self._doorbell.address)
        self._io_thread.join(timeout=5)
        with self._lock:
            for state in self._partitions.values():
                for batch in state.in_flight:
                    if batch is not None:
                        batch.complete(-1, ClosedError("the producer was closed before the "
                                                       "broker acknowledged this record"))
                if state.ring is not None:
                    state.ring.close()
                if state.control is not None:
                    state.control.close()
                if state.connection is not None:
                    state.connection.close()
            self._doorbell.close()
            self._metadata.close()

    def __enter__(self) -> Producer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- internals (called with self._lock held) -------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("the producer is closed")
        if self._io_error is not None:
            raise ClosedError(f"the producer's I/O thread failed: {self._io_error}")

    def _topic(self, topic: str) -> list[PartitionInfo]:
        return self._metadata.partitions(topic)

    def _route(self, topic: str, key: bytes | None, partition: int | None) -> _Partition:
        """The partition a record goes to (slow path of send; caches keyless routes)."""
        if key is not None and partition is None:
            partition = self._key_partitions.get((topic, key))
            if partition is None:
                partition = partition_for_key(key, len(self._topic(topic)))
                if len(self._key_partitions) >= KEY_CACHE_ENTRIES_MAX:
                    self._key_partitions.clear()
                self._key_partitions[(topic, key)] = partition
            return self._choose(topic, None, partition)
        state = self._choose(topic, key, partition)
        if key is None:
            self._routes[(topic, partition)] = state
        return state

    def _choose(self, topic: str, key: bytes | None, partition: int | None) -> _Partition:
        infos = self._topic(topic)
        if partition is None:
            if key is not None:
                partition = partition_for_key(bytes(key), len(infos))
            else:
                partition = self._sticky.partition(topic, len(infos))
        elif not isinstance(partition, int) or not 0 <= partition < len(infos):
            if isinstance(partition, int) and not isinstance(partition, bool) and partition >= 0:
                infos = self._refresh_topic(topic)  # maybe the topic grew
                if partition < len(infos):
                    return self._choose(topic, key, partition)
            raise UnknownTopicOrPartitionError(
                f"topic {topic!r} has {len(infos)} partitions; partition {partition} does not "
                "exist")
        state = self._partitions.get((topic, partition))
        if state is None:
            state = _Partition(infos[partition])
            # a batch must also fit in a ring frame (half the ring): records gathering while
            # batches are in flight (linger_ms=0) or lingering must not outgrow a small ring
            state.batch_limit = max(1, min(self.batch_size_bytes, state.record_bytes_max,
                                           self.ring_bytes // 2 - record_batch.HEADER_SIZE))
            self._partitions[(topic, partition)] = state
        return state

    def _flush_open_batches(self) -> None:
        for state in list(self._partitions.values()):
            if state.values:
                self._seal(state)

    def _seal(self, state: _Partition) -> None:
        """Encode the open batch of ``state`` and write it out."""
        batch = state.batch
        assert batch is not None and state.values
        values, keys, headers, timestamps = (state.values, state.keys, state.headers,
                                             state.timestamps)
        self._open_bytes -= state.open_bytes
        state.reset_open()
        batch.count = len(values)
        # one record (linger 0): its int, not a list, so the batch in flight is one object
        # for the garbage collector to track (see futures._COMPLETION_LOCK)
        batch.timestamps = timestamps[0] if len(timestamps) == 1 else timestamps
        sticky = self._routes.get((state.topic, None))
        if sticky is state:  # KIP-480: a keyless topic moves on when its batch is sealed
            partitions = len(self._topic(state.topic))
            self._sticky.on_new_batch(state.topic, partitions, state.partition)
            self._routes[(state.topic, None)] = self._choose(state.topic, None, None)
        encode = _Encoder(lambda pid, seq: record_batch.encode_batch(
            values, keys=keys, headers=headers, timestamps=timestamps, codec=self.codec,
            producer_id=pid, producer_epoch=0, base_sequence=seq))
        self._write(state, batch, encode)

    def _write(self, state: _Partition, batch: ProducedBatch, encode: _Encoder) -> None:
        """Hand a sealed batch to the worker; on any failure its futures fail with the error
        (then it propagates: the caller of send learns it too)."""
        try:
            self._write_or_raise(state, batch, encode)
        except BaseException as error:
            batch.complete(-1, error if isinstance(error, ShmbrokerError | OSError)
                           else ClosedError(f"sending the batch failed: {error!r}"))
            raise

    def _write_or_raise(self, state: _Partition, batch: ProducedBatch,
                        encode: _Encoder) -> None:
        if state.ring is not None and state.ring.broken:
            self._drop_ring(state, self._broken_error(state, state.ring))
        if state.ring is None and not state.use_socket:
            self._open_ring(state)
        if state.use_socket:
            self._write_socket(state, batch, encode)
            return
        ring = state.ring
        assert ring is not None
        data = encode(ring.producer_id, state.sequence)
        try:
            seq = ring.try_write(data)
        except RecordTooLargeError:
            raise RecordTooLargeError(
                f"a batch of {len(data)} bytes does not fit in the ring of "
                f"{state.topic}/{state.partition} ({ring.frame_bytes_max} bytes at most); "
                "lower batch_size_bytes or raise ring_bytes") from None
        if seq is None:
            seq = self._wait_for_room(state, data)
        # only a written batch takes sequence numbers (the worker's dedup relies on them)
        state.sequence = (state.sequence + batch.count) % SEQUENCE_MODULUS
        batch.sent_at = time.monotonic()
        state.in_flight.append(batch if self.acks != ACKS_NONE else None)
        if self.acks == ACKS_NONE:
            batch.complete(-1)
        control = state.control
        if control is not None and control.worker_sleeping:
            doorbell.ring(state.worker_doorbell)

    def _wait_for_room(self, state: _Partition, data: bytearray) -> int:
        ring = state.ring
        assert ring is not None
        deadline = time.monotonic() + self.max_block_s
        pause = 0.00005
        while True:
            if ring.broken:
                raise self._broken_error(state, ring)
            control = state.control
            if control is not None and control.worker_sleeping:
                doorbell.ring(state.worker_doorbell)
            if time.monotonic() > deadline:
                raise BufferFullError(
                    f"the ring of {state.topic}/{state.partition} stayed full for "
                    f"{self.max_block_s * 1000:.0f} ms (max_block_ms): is the broker running "
                    "and keeping up?")
            time.sleep(pause)
            pause = min(pause * 2, 0.002)
            seq = ring.try_write(data)
            if seq is not None:
                return seq

    def _open_ring(self, state: _Partition) -> None:
        info = state.info
        if self.transport == "socket":
            state.use_socket = True
        else:
            ring_id = names.new_ring_id()
            name = names.ring_name(info.shm_prefix, info.topic_id, info.partition, ring_id)
            try:
                state.ring = RingWriter.create(
                    name, data_bytes=self.ring_bytes, ack_slots=self.ring_ack_slots,
                    producer_id=ring_id, doorbell_address=self._doorbell.address)
                with contextlib.suppress(ShmbrokerError):
                    state.control = ControlBlock.open(info.control_block, readonly=True)
            except (OSError, PermissionError, RingError) as error:
                if self.transport == "shm":
                    raise
                state.use_socket = True
                state.ring = None
                del error
        state.connection = Connection(info.socket, self.request_timeout_s)
        if state.ring is not None:
            if self._io_idle:  # the I/O thread sleeps: the worker must ring it for our acks
                state.ring.set_waiting(True)
            try:
                self._attach(state)
            except RingError:  # refused (rings_per_worker_max): remove it; socket or error
                state.ring.unlink()
                state.ring.close()
                state.ring = None
                if state.control is not None:
                    state.control.close()
                    state.control = None
                if self.transport == "shm":
                    raise
                state.use_socket = True

    def _broken_error(self, state: _Partition, ring: RingWriter) -> RingError:
        return RingError(f"the worker of {state.topic}/{state.partition} marked our ring "
                         f"{ring.name} broken: {broken_reason(ring.broken)}; the records in "
                         "flight in it were not stored (the next batch goes to a new ring)")

    def _drop_ring(self, state: _Partition, error: RingError) -> None:
        """Give up a broken or lost ring: complete what the worker acknowledged, fail the rest
        of its batches with ``error``, unmap and unlink it; the next batch opens a new ring."""
        ring = state.ring
        if ring is None:
            return
        in_flight = state.in_flight
        with contextlib.suppress(RingError):  # its ack slots may be garbage too
            for result in ring.acks()[1]:
                batch = in_flight.popleft()
                if batch is not None:
                    batch.complete(*_outcome(result, state, batch))
        for batch in in_flight:
            if batch is not None:
                batch.complete(-1, error)
        in_flight.clear()
        ring.unlink()  # a ring the worker released is gone already; a lost one is ours
        ring.close()
        state.ring = None
        state.attached = False
        if state.control is not None:
            state.control.close()
            state.control = None
        if state.connection is not None:
            state.connection.close()
            state.connection = None

    def _attach(self, state: _Partition) -> None:
        """Tell the worker about our ring (it also finds rings by name when it restarts)."""
        assert state.ring is not None and state.connection is not None
        try:
            state.connection.request(ApiKey.ATTACH_RING, {"name": state.ring.name},
                                     timeout_s=min(self.request_timeout_s, 5.0))
            state.attached = True
        except (BrokerNotRunningError, RequestTimeoutError):
            state.attached = False
            state.next_attach = time.monotonic() + ATTACH_RETRY_S

    def _write_socket(self, state: _Partition, batch: ProducedBatch, encode: _Encoder) -> None:
        """The fallback: one PRODUCE round trip per batch, retried across worker restarts."""
        assert state.connection is not None
        producer_id = hash((id(self), state.topic, state.partition)) & ((1 << 62) - 1) | 1
        data = encode(producer_id, state.sequence)
        state.sequence = (state.sequence + batch.count) % SEQUENCE_MODULUS
        deadline = time.monotonic() + self.delivery_timeout_s
        while True:
            try:
                body, _ = state.connection.request(ApiKey.PRODUCE, {"acks": ACKS_LEADER}, data)
                break
            except (BrokerNotRunningError, ShuttingDownError):  # a worker restart: retry
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
            except BrokerError as error:
                batch.complete(-1, error)
                return
        result = body["results"][0]
        batch.complete(*_outcome(result, state, batch))

    # -- the I/O thread ---------------------------------------------------------------------------
    def _io_loop(self) -> None:
        try:
            self._io_run()
        except BaseException as error:  # noqa: BLE001 - reported to every caller afterwards
            self._io_error = error
            with self._lock:
                for state in self._partitions.values():
                    for batch in state.in_flight:
                        if batch is not None:
                            batch.complete(-1, ClosedError(f"producer I/O failed: {error}"))

    def _io_run(self) -> None:
        next_check = 0.0
        while True:
            with self._lock:
                if self._io_stop:
                    return
                now = time.monotonic()
                in_flight = self._collect_acks(now)  # first: acks make room (linger_ms=0)
                linger_wait, sealed = self._seal_lingering(now)
                in_flight = in_flight or sealed
                if now >= next_check:
                    self._check_connections(now)
                    next_check = now + CONNECTION_CHECK_S
            if in_flight:
                # Spin briefly for acks, keeping the GIL.  Yielding it on every turn
                # (sleep(0)) cost far more while the application's thread computes: each turn
                # then waits out its switch interval (5 ms) to get the GIL back, so acks were
                # collected 10-70 ms late at 10k sends/s, and the batches in flight set off
                # young garbage collections whose survivors brought on ~30 ms full ones (the
                # latency tail on the 16-core device machine, bench/RESULTS.md "Latency").
                # Kept, the GIL stalls that thread SPIN_S at most.
                spin_until = time.monotonic() + SPIN_S
                progressed = False
                while time.monotonic() < spin_until:
                    if self._acks_ready():
                        progressed = True
                        break
                if progressed:
                    continue
            # Sleep on our doorbell; every ring says we wait, so the worker rings it when it
            # acknowledges anything, and senders need not wake us for their acks.  How long,
            # and that we sleep, are settled under the lock: a batch opened from then on is
            # either in linger_wait or sees _io_idle (and _io_wake_at) and rings if need be.
            with self._lock:
                now = time.monotonic()
                # batches may have opened since the lock was last ours (during the spin)
                linger_wait, sealed = self._seal_lingering(now)
                if sealed:
                    continue
                timeout = min(IN_FLIGHT_WAIT_S if in_flight else IO_WAIT_S_MAX, linger_wait)
                self._io_wake_at = now + timeout
                self._io_idle = True
            self._set_waiting(True)
            try:
                if not self._acks_ready():
                    self._doorbell.wait(timeout)
            finally:
                self._set_waiting(False)
                self._io_idle = False

    def _seal_lingering(self, now: float) -> tuple[float, bool]:
        """Seal the open batches that are due: (seconds until the next is, whether any was)."""
        wait = IO_WAIT_S_MAX
        sealed = False
        for state in list(self._partitions.values()):
            if state.values:
                due = state.opened_at + self.linger_s
                if not self.linger_s and self._acks_awaited(state):
                    due = state.opened_at + LINGER_ZERO_HOLD_S  # (or an ack, sooner)
                if now >= due:
                    sealed = True
                    try:
                        self._seal(state)
                    except (ShmbrokerError, OSError):
                        pass  # its futures carry the error; the I/O thread goes on
                else:
                    wait = min(wait, due - now)
        return wait, sealed

    def _acks_awaited(self, state: _Partition) -> bool:
        """Whether max_in_flight_batches of the partition's batches await the worker's ack (in
        the ring's own counters: the I/O thread may not have collected those that came)."""
        if len(state.in_flight) < self.max_in_flight_batches:
            return False
        ring = state.ring
        if ring is None:
            return False
        try:
            return ring.in_flight >= self.max_in_flight_batches
        except RingError:  # its words are garbage: the write that follows meets it and says so
            return False

    def _collect_acks(self, now: float) -> bool:
        """Complete the batches the workers acknowledged; True while any are in flight."""
        any_in_flight = False
        for state in self._partitions.values():
            ring = state.ring
            if ring is None or not state.in_flight:
                continue
            try:
                _, results = ring.acks()
            except RingError as error:  # its shared words were overwritten
                self._drop_ring(state, RingError(
                    f"{state.topic}/{state.partition}: {error}; the records in flight in it "
                    "were not acknowledged (some may be stored)"))
                continue
            in_flight = state.in_flight
            for result in results:
                batch = in_flight.popleft()
                if batch is not None:
                    batch.complete(*_outcome(result, state, batch))
            if in_flight:
                any_in_flight = True
                oldest = in_flight[0]
                if (oldest is not None and not oldest.done
                        and now - oldest.sent_at > self.delivery_timeout_s):
                    # Fail the waiting futures, but keep the batches queued: the frames are in
                    # the ring and their acks, if the worker comes back, must still line up.
                    error = RequestTimeoutError(
                        f"{state.topic}/{state.partition}: no acknowledgement within "
                        f"delivery_timeout_ms ({self.delivery_timeout_s * 1000:.0f} ms); is the "
                        "partition's worker running? (`shmbroker status`)")
                    for batch in in_flight:
                        if batch is not None and now - batch.sent_at > self.delivery_timeout_s:
                            batch.complete(-1, error)
                if ring.broken:
                    self._drop_ring(state, self._broken_error(state, ring))
        return any_in_flight

    # _acks_ready and _set_waiting run on the I/O thread without the lock (the spin for acks
    # must not hold senders up), so a sender may drop and close a ring in between: a closed
    # ring's words are a released memoryview (ValueError), and garbage in its words a
    # RingError; either way that ring is gone or going, and nothing is to be done with it here
    # (whoever dropped it completed its batches).
    def _acks_ready(self) -> bool:
        for state in list(self._partitions.values()):
            ring = state.ring
            try:
                if (ring is not None and state.in_flight
                        and ring.in_flight < len(state.in_flight)):
                    return True
            except (ValueError, RingError):
                continue
        return False

    def _set_waiting(self, waiting: bool) -> None:
        for state in list(self._partitions.values()):
            ring = state.ring
            if ring is not None:
                with contextlib.suppress(ValueError, RingError):
                    ring.set_waiting(waiting)

    def _check_connections(self, now: float) -> None:
        stale: set[str] = set()
        for state in list(self._partitions.values()):
            if state.ring is None or state.connection is None:
                continue
            if state.attached:
                sock = state.connection._sock
                if sock is not None:
                    readable, _, _ = select.select([sock], [], [], 0)
                    if readable:  # EOF: the worker went away; the next one re-attaches
                        state.connection.close()
                        state.attached = False
                        state.next_attach = now
            if state.attached and (state.control is None
                                   or state.control.state != control_block.RUNNING):
                # the worker replaced its control block (stopped, or the name was unlinked)
                if state.control is not None:
                    state.control.close()
                    state.control = None
                with contextlib.suppress(ShmbrokerError):
                    state.control = ControlBlock.open(state.info.control_block)
            if not state.attached and now >= state.next_attach:
                try:
                    self._attach(state)
                except RingError as error:  # the restarted worker cannot find our ring
                    self._drop_ring(state, RingError(
                        f"{state.topic}/{state.partition}: the restarted worker cannot take "
                        f"our ring back ({error}); the records in flight in it were not "
                        "acknowledged (some may be stored)"))
                    continue
                if state.attached:
                    state.unreachable_since = 0.0
                    # a restarted broker made a new control block: map the new one
                    if state.control is not None:
                        state.control.close()
                        state.control = None
                    with contextlib.suppress(ShmbrokerError):
                        state.control = ControlBlock.open(state.info.control_block)
                elif not state.unreachable_since:
                    state.unreachable_since = now
                elif now - state.unreachable_since > METADATA_RETRY_AFTER_S:
                    state.unreachable_since = now
                    stale.add(state.topic)
        for topic in stale:
            self._check_topic(topic)
        if now - self._metadata.refreshed_at > self.metadata_max_age_s:
            for topic in {state.topic for state in self._partitions.values()}:
                self._check_topic(topic)

    def _refresh_topic(self, topic: str) -> list[PartitionInfo]:
        """Ask the supervisor about ``topic`` again; forget cached routes if it changed."""
        self._metadata.refresh([topic])
        infos = self._metadata.partitions(topic)
        for key in [key for key in self._routes if key[0] == topic]:
            del self._routes[key]
        for key in [key for key in self._key_partitions if key[0] == topic]:
            del self._key_partitions[key]
        return infos

    def _check_topic(self, topic: str) -> None:
        """Refresh ``topic``; retire our partitions of it if it was deleted or recreated."""
        try:
            infos = self._refresh_topic(topic)
        except UnknownTopicOrPartitionError:
            infos = []
        except (BrokerNotRunningError, RequestTimeoutError):
            return
        for (name, partition), state in list(self._partitions.items()):
            if name != topic:
                continue
            if partition < len(infos) and infos[partition].topic_id == state.info.topic_id:
                continue
            self._retire(state, UnknownTopicOrPartitionError(
                f"topic {topic!r} was deleted{' and recreated' if infos else ''} while "
                "records to it were in flight; they were not stored"))

    def _retire(self, state: _Partition, error: BaseException) -> None:
        """Forget a partition that no longer exists: fail its batches, remove its ring."""
        for batch in state.in_flight:
            if batch is not None:
                batch.complete(-1, error)
        state.in_flight.clear()
        if state.batch is not None:
            state.batch.complete(-1, error)
        self._open_bytes -= state.open_bytes
        state.reset_open()
        if state.ring is not None:
            state.ring.unlink()
            state.ring.close()
        if state.control is not None:
            state.control.close()
        if state.connection is not None:
            state.connection.close()
        del self._partitions[(state.topic, state.partition)]
        for key in [key for key, value in self._routes.items() if value is state]:
            del self._routes[key]


class _Encoder:
    """Deferred encoding: ``(producer_id, base_sequence) -> batch bytes``."""

    __slots__ = ("_function",)

    def __init__(self, function: Callable[[int, int], bytearray]) -> None:
        self._function = function

    def __call__(self, producer_id: int, base_sequence: int) -> bytearray:
        return self._function(producer_id, base_sequence)


def _outcome(result: int, state: _Partition | None = None,
             batch: ProducedBatch | None = None) -> tuple[int, BaseException | None]:
    if result >= 0:
        return result, None
    code = RING_RESULT_ERRORS.get(result, "BROKER_ERROR")
    where = f" for {state.topic}/{state.partition}" if state is not None else ""
    what = f" ({batch.count} record(s))" if batch is not None else ""
    reasons = {
        "MESSAGE_TOO_LARGE": " larger than the topic's max_batch_bytes "
                             f"({state.info.max_batch_bytes if state else '?'})",
        "CORRUPT_MESSAGE": " that failed validation (CRC, magic, sizes or record count)",
        "KAFKA_STORAGE_ERROR": ": the broker could not write it (disk full or I/O error; see "
                               "its log); nothing was stored",
        "STORAGE_FULL": ": no space left on device (the broker's data dir is full); nothing "
                        "was stored; send it again once space is freed",
    }
    return -1, error_from_code(code, f"the broker refused a batch{what}{where}"
                                     f"{reasons.get(code, '')} [{code}]")


def _cut_points(sizes: np.ndarray[Any, Any], target_bytes: int) -> list[int]:
    """Indices cutting ``sizes`` into runs of about ``target_bytes`` (each at least one)."""
    ends = np.cumsum(sizes)
    cuts = [0]
    total = int(ends[-1])
    while cuts[-1] < len(sizes):
        start = cuts[-1]
        base = int(ends[start - 1]) if start else 0
        stop = int(np.searchsorted(ends, base + target_bytes, side="right"))
        cuts.append(max(stop, start + 1))
        if base >= total:
            break
    cuts[-1] = len(sizes)
    return cuts
