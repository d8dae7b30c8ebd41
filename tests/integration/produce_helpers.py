"""Helpers for the broker integration tests: producer processes, reading a topic back to its end,
checking acknowledged records, and raw frames on a broker or worker socket.

An *acked* record is a triple ``(value, partition, offset)`` that a producer's future returned.
:func:`check_acked` is the one check every test makes: each acked value sits at exactly its acked
offset, no value appears twice in the log, and offsets are dense.
"""

from __future__ import annotations

import collections
import json
import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from storage_helpers import lying_batch  # noqa: F401 - the integration tests import it here

from shmbroker import Consumer, Record, TopicPartition
from shmbroker.client.connection import read_frame
from shmbroker.protocol.frames import encode_frame
from shmbroker.transport.unix import connect

POLL_MS = 500
READ_TIMEOUT_S = 30.0
PROCESS_TIMEOUT_S = 90.0

Acked = tuple[bytes, int, int]

# One producer process.  argv[1] is a JSON spec: data_dir, topic, out (a path), producer
# (keyword arguments of Producer), records (a list of {"value", "key"?, "partition"?,
# "headers"?, "timestamp_ms"?}; strings are latin-1 bytes).  It writes a JSON list with one
# [value, key, partition, offset, timestamp_ms] per record, in send order.
PRODUCER_SCRIPT = r"""
import json, sys
from shmbroker import Producer

spec = json.loads(sys.argv[1])
enc = lambda text: None if text is None else text.encode("latin-1")
futures = []
with Producer(spec["data_dir"], **spec.get("producer", {})) as producer:
    for record in spec["records"]:
        headers = [(name, enc(value)) for name, value in record.get("headers") or ()]
        futures.append(producer.send(
            spec["topic"], enc(record["value"]), key=enc(record.get("key")),
            partition=record.get("partition"), headers=headers or None,
            timestamp_ms=record.get("timestamp_ms")))
    producer.flush(60)
    out = []
    for record, future in zip(spec["records"], futures):
        meta = future.result(60)
        out.append([record["value"], record.get("key"), meta.partition, meta.offset,
                    meta.timestamp_ms])
with open(spec["out"], "w") as file:
    json.dump(out, file)
"""


def start_producer_process(data_dir: Path, topic: str, records: Sequence[dict[str, Any]],
                           out: Path, **producer_args: Any) -> subprocess.Popen[bytes]:
    """Start a producer process running :data:`PRODUCER_SCRIPT`; see :func:`producer_results`."""
    spec = {"data_dir": os.fspath(data_dir), "topic": topic, "out": os.fspath(out),
            "producer": producer_args, "records": list(records)}
    return subprocess.Popen([sys.executable, "-c", PRODUCER_SCRIPT, json.dumps(spec)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def producer_results(process: subprocess.Popen[bytes], out: Path) -> list[list[Any]]:
    """Wait for a producer process; its [value, key, partition, offset, timestamp_ms] rows."""
    stdout, stderr = process.communicate(timeout=PROCESS_TIMEOUT_S)
    assert process.returncode == 0, (
        f"producer process exited with {process.returncode}:\n{stderr.decode(errors='replace')}")
    return list(json.loads(out.read_text()))


def read_partitions(data_dir: Path, topic: str, partitions: Iterable[int],
                    timeout_s: float = READ_TIMEOUT_S) -> dict[int, list[Record]]:
    """Every record of ``partitions`` from log start to the log end as it is now."""
    wanted = [TopicPartition(topic, partition) for partition in partitions]
    found: dict[int, list[Record]] = {tp.partition: [] for tp in wanted}
    with Consumer(data_dir, auto_offset_reset="earliest") as consumer:
        consumer.assign(wanted)
        ends = consumer.end_offsets(wanted)
        consumer.seek_to_beginning()
        deadline = time.monotonic() + timeout_s
        while any(consumer.position(tp) < ends[tp] for tp in wanted):
            assert time.monotonic() < deadline, (
                f"read {({p: len(r) for p, r in found.items()})} records of {topic} in "
                f"{timeout_s} s; end offsets {ends}")
            for record in consumer.poll(timeout_ms=POLL_MS):
                found[record.partition].append(record)
    for tp in wanted:  # a poll may have run past the end offsets we took
        found[tp.partition] = [r for r in found[tp.partition] if r.offset < ends[tp]]
    return found


def check_log(records: dict[int, list[Record]]) -> dict[tuple[int, int], Record]:
    """Offsets of each partition dense and increasing, no value twice in the topic; the
    records by (partition, offset)."""
    by_position: dict[tuple[int, int], Record] = {}
    values: collections.Counter[bytes | None] = collections.Counter()
    for partition, found in records.items():
        offsets = [record.offset for record in found]
        if offsets:
            assert offsets == list(range(offsets[0], offsets[0] + len(offsets))), (
                f"partition {partition}: offsets not dense: {offsets[:20]}...")
        for record in found:
            by_position[(partition, record.offset)] = record
            values[record.value] += 1
    duplicates = [value for value, count in values.items() if count > 1]
    assert not duplicates, f"{len(duplicates)} value(s) stored twice, e.g. {duplicates[:5]}"
    return by_position


def check_acked(acked: Iterable[Acked], records: dict[int, list[Record]]) -> int:
    """Each acked value at its acked (partition, offset), the log as :func:`check_log` wants;
    the number of acked records checked."""
    by_position = check_log(records)
    count = 0
    missing = []
    for value, partition, offset in acked:
        record = by_position.get((partition, offset))
        if record is None or record.value != value:
            missing.append((value, partition, offset, record.value if record else None))
        count += 1
    assert not missing, (f"{len(missing)} of {count} acked records are not at their acked "
                         f"offset, e.g. (value, partition, offset, found) {missing[:5]}")
    return count


# -- raw frames ---------------------------------------------------------------------------------
def raw_connect(path: str | os.PathLike[str], timeout_s: float = 10.0) -> socket.socket:
    return connect(path, timeout_s)


def raw_request(sock: socket.socket, api_key: int, body: dict[str, Any] | None = None,
                raw: bytes = b"", correlation_id: int = 7
                ) -> tuple[dict[str, Any], memoryview, int]:
    """Send one frame, read one frame: (JSON body, raw bytes, correlation id)."""
    sock.sendall(encode_frame(api_key, correlation_id, body, raw))
    return read_frame(sock)


def read_reply_or_eof(sock: socket.socket, timeout_s: float = 10.0
                      ) -> tuple[dict[str, Any] | None, int | None, bool]:
    """After sending bad input: (error body or None, api key or None, closed afterwards).

    Reads one frame if one comes, then whether the peer closed the connection (EOF) within
    ``timeout_s``; AssertionError if it neither answered nor closed.
    """
    sock.settimeout(timeout_s)
    data = bytearray()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        readable, _, _ = select.select([sock], [], [], max(0.0, deadline - time.monotonic()))
        if not readable:
            break
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            return _parse_reply(data) + (True,)
        data += chunk
        if _whole_frame(data):
            body, api_key = _parse_reply(data)
            return body, api_key, closed_soon(sock, 1.0)
    assert data, "the broker neither answered nor closed the connection"
    return _parse_reply(data) + (False,)


def _whole_frame(data: bytearray) -> bool:
    return len(data) >= 4 and len(data) >= 4 + int.from_bytes(data[:4], "big")


def _parse_reply(data: bytearray) -> tuple[dict[str, Any] | None, int | None]:
    if not _whole_frame(data) or len(data) < 16:
        return None, None
    api_key = int.from_bytes(data[4:6], "big")
    json_length = int.from_bytes(data[12:16], "big")
    body = json.loads(bytes(data[16:16 + json_length])) if json_length else {}
    return body, api_key


def readable(sock: socket.socket, timeout_s: float) -> bool:
    """Whether ``sock`` has data or EOF within ``timeout_s`` (poll: fds above 1024 too)."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(timeout_s * 1000))


def closed_soon(sock: socket.socket, timeout_s: float) -> bool:
    """Whether the peer closed ``sock`` within ``timeout_s`` (with nothing more sent)."""
    if not readable(sock, timeout_s):
        return False
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


class BackgroundProducer:
    """A thread sending ``value-<i>`` records round robin over ``partitions`` at about
    ``rate_per_s`` until stopped (or ``records_max`` sent), keeping every future: the load under
    which the fault tests crash things.  Every ``pace`` records it waits for the previous one's
    ack, bounding what is in flight."""

    def __init__(self, producer: Any, topic: str, partitions: int, *, rate_per_s: int = 5000,
                 records_max: int = 200_000, pace: int = 100, prefix: bytes = b"value-") -> None:
        import threading

        self.producer = producer
        self.topic = topic
        self.partitions = partitions
        self.rate_per_s = rate_per_s
        self.records_max = records_max
        self.pace = pace
        self.prefix = prefix
        self.sent: list[tuple[bytes, Any]] = []
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="background-producer",
                                        daemon=True)

    def start(self) -> BackgroundProducer:
        self._thread.start()
        return self

    def _run(self) -> None:
        started = time.monotonic()
        try:
            for index in range(self.records_max):
                if self._stop.is_set():
                    return
                value = self.prefix + b"%d" % index
                future = self.producer.send(self.topic, value, partition=index % self.partitions)
                self.sent.append((value, future))
                if index % self.pace == self.pace - 1:
                    future.exception(60)
                    ahead_s = started + index / self.rate_per_s - time.monotonic()
                    if ahead_s > 0:
                        self._stop.wait(ahead_s)  # rate limit, not a wait for a condition
        except BaseException as error:  # noqa: BLE001 - reported by stop()
            self.error = error

    def acked_count(self) -> int:
        return sum(1 for _, future in list(self.sent) if future.done())

    def wait_acked(self, count: int, timeout_s: float = 30.0) -> None:
        """Wait until ``count`` more records than now are acknowledged."""
        target = self.acked_count() + count
        deadline = time.monotonic() + timeout_s
        while self.acked_count() < target:
            assert self.error is None, f"the background producer failed: {self.error!r}"
            assert self._thread.is_alive() or self.acked_count() >= target, (
                f"the background producer stopped after {len(self.sent)} records")
            assert time.monotonic() < deadline, (
                f"only {self.acked_count()} of {target} records acked in {timeout_s} s")
            time.sleep(0.01)

    def stop(self, timeout_s: float = 60.0) -> list[Acked]:
        """Stop sending, flush, and return the acked records; AssertionError if a future failed
        or stayed pending."""
        self._stop.set()
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), "the background producer did not stop"
        assert self.error is None, f"the background producer failed: {self.error!r}"
        self.producer.flush(timeout_s)
        acked: list[Acked] = []
        failures = []
        for value, future in self.sent:
            error = future.exception(timeout_s)
            if error is not None:
                failures.append((value, error))
                continue
            meta = future.result(0)
            acked.append((value, meta.partition, meta.offset))
        assert not failures, (f"{len(failures)} of {len(self.sent)} sends failed, e.g. "
                              f"{failures[:3]}")
        return acked


class BackgroundConsumer:
    """A thread consuming ``topic`` from the beginning while the fault tests crash things;
    :meth:`finish` lets it read up to given end offsets and returns what it consumed, per
    partition, in consumption order."""

    def __init__(self, data_dir: Path, topic: str, partitions: Iterable[int]) -> None:
        import threading

        self.data_dir = data_dir
        self.wanted = [TopicPartition(topic, partition) for partition in partitions]
        self.records: dict[int, list[Record]] = {tp.partition: [] for tp in self.wanted}
        self.error: BaseException | None = None
        self.ends: dict[TopicPartition, int] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="background-consumer",
                                        daemon=True)

    def start(self) -> BackgroundConsumer:
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            with Consumer(self.data_dir, auto_offset_reset="earliest") as consumer:
                consumer.assign(self.wanted)
                while not self._stop.is_set():
                    for record in consumer.poll(timeout_ms=100):
                        self.records[record.partition].append(record)
                    ends = self.ends
                    if ends is not None and all(
                            consumer.position(tp) >= ends[tp] for tp in self.wanted):
                        return
        except BaseException as error:  # noqa: BLE001 - reported by finish()
            self.error = error

    def finish(self, ends: dict[TopicPartition, int],
               timeout_s: float = READ_TIMEOUT_S) -> dict[int, list[Record]]:
        self.ends = ends
        self._thread.join(timeout_s)
        self._stop.set()
        assert self.error is None, f"the background consumer failed: {self.error!r}"
        assert not self._thread.is_alive(), (
            f"the background consumer did not reach {ends} in {timeout_s} s")
        return self.records
