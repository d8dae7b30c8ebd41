"""Hostile clients on every socket the broker listens on (issue 6), while a well-behaved producer
and consumer keep working on the same broker.

Each test runs against ``broker.sock`` and against a partition worker's socket.  A hostile input
gets an error frame or a closed connection, never a hang or a crash; the bystanders keep
producing and consuming during and after, and every record they had acknowledged is read back
at its offset; the segment files hold only whole, CRC-valid, decodable batches with dense
offsets.  (tests/integration/test_broker_bad_input.py checks single malformed frames and bad
batches one by one; test_slow_clients.py a client that pipelines fetches and never reads.)

The broker runs with a short ``frame_read_timeout_ms`` so that the slow-loris tests take about
a second; the limits checked: frame_bytes_max, frame_json_bytes_max, frame_read_timeout_ms,
connections_max, rings_per_connection_max, the one parked fetch per connection.
"""

from __future__ import annotations

import contextlib
import random
import resource
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import psutil
import pytest
from broker_helpers import RunningBroker, wait_for
from integration.produce_helpers import (
    BackgroundConsumer,
    BackgroundProducer,
    closed_soon,
    lying_batch,
    raw_connect,
    raw_request,
    read_partitions,
    readable,
)

from shmbroker import Producer, TopicPartition, limits
from shmbroker.format import record_batch
from shmbroker.partition.paths import PartitionPaths
from shmbroker.protocol.frames import HEADER, HEADER_REST_SIZE, encode_frame, frame_head
from shmbroker.protocol.messages import RING_RESULT_NUMBERS, ApiKey

pytestmark = pytest.mark.integration

TOPIC = "victim"
FRAME_READ_TIMEOUT_MS = 1000
CONNECTIONS_MAX = 2100
IDLE_CONNECTIONS = 2000
CONFIG = f"frame_read_timeout_ms = {FRAME_READ_TIMEOUT_MS}\n"
TARGETS = ["broker", "worker"]
CORRUPT = RING_RESULT_NUMBERS["CORRUPT_MESSAGE"]
# BROKER_ERROR is the answer of a bug (an exception the handler did not expect: "the broker
# failed on this request"), KAFKA_STORAGE_ERROR one of a disk; hostile input gets neither
NOT_REFUSALS = {"BROKER_ERROR", "KAFKA_STORAGE_ERROR"}


# ------------------------------------------------------------------------------------------------
# the broker, the bystanders, and the checks made after every test
# ------------------------------------------------------------------------------------------------

@pytest.fixture
def broker(tmp_path: Path) -> Iterator[RunningBroker]:
    with RunningBroker(tmp_path / "data", config_toml=CONFIG) as running:
        with running.admin() as admin:
            admin.create_topic(TOPIC, partitions=1)
        yield running
        log = running.log()
        assert "Traceback" not in log and "unexpectedly" not in log, log[-3000:]


def _socket_path(broker: RunningBroker, target: str) -> str:
    if target == "broker":
        return str(broker.socket_path)
    with broker.admin() as admin:
        (meta,) = admin.metadata([TOPIC])
    return str(meta["partitions"][0]["socket"])


def _pids(broker: RunningBroker) -> tuple[int, int]:
    with broker.admin() as admin:
        status = admin.status()
    return status["pid"], status["workers"][0]["pid"]


class Bystanders:
    """A producer (shared-memory ring) and a consumer working on the victim topic throughout."""

    def __init__(self, broker: RunningBroker) -> None:
        self.broker = broker
        self.pids = _pids(broker)
        self.producer_client = Producer(broker.data_dir, linger_ms=1)
        self.producer = BackgroundProducer(self.producer_client, TOPIC, 1, rate_per_s=2000,
                                           pace=50, prefix=b"bystander-")
        self.consumer = BackgroundConsumer(broker.data_dir, TOPIC, [0])

    def __enter__(self) -> Bystanders:
        self.producer.start()
        self.consumer.start()
        self.producer.wait_acked(100)
        return self

    def progress(self, count: int = 100) -> None:
        """The bystanders are still served: ``count`` more records acknowledged, and the
        consumer reads what was acknowledged before."""
        self.producer.wait_acked(count)
        target = self.producer.acked_count() - 1
        wait_for(lambda: len(self.consumer.records[0]) >= target, timeout_s=20,
                 message=f"the bystander consumer reading {target} records")

    def finish(self) -> None:
        acked = self.producer.stop()
        self.producer_client.close()
        ends = {TopicPartition(TOPIC, 0): max(offset for _, _, offset in acked) + 1}
        # what the consumer read during the test, and a new consumer from the start
        for records in (self.consumer.finish(ends)[0],
                        read_partitions(self.broker.data_dir, TOPIC, [0])[0]):
            by_offset = {record.offset: record.value for record in records}
            offsets = [record.offset for record in records]
            assert offsets == list(range(len(offsets))), "offsets not dense from 0"
            missing = [(value, offset) for value, _, offset in acked
                       if by_offset.get(offset) != value]
            assert not missing and len(acked) > 100, (len(acked), missing[:5])
        assert _pids(self.broker) == self.pids, "the supervisor or the worker was restarted"
        check_segments(self.broker, TOPIC)

    def __exit__(self, *exc_info: object) -> None:
        if exc_info[0] is None:
            self.finish()
        else:
            with contextlib.suppress(BaseException):
                self.producer.stop(5)
            self.producer_client.close()


def check_segments(broker: RunningBroker, topic: str) -> None:
    """Every segment file of partition 0 holds whole batches, each CRC-valid and decodable,
    with dense offsets from one file to the next."""
    with broker.admin() as admin:
        topic_id = admin.metadata([topic])[0]["topic_id"]
    log_dir = PartitionPaths(broker.data_dir, topic, topic_id, 0).log_dir
    expected = None
    for path in sorted(log_dir.glob("*.log")):
        data = path.read_bytes()
        end = 0
        for position, header in record_batch.iter_batch_positions(data):
            record_batch.validate_batch(data, position)
            records = record_batch.decode_batch(data, position)
            assert len(records) == header.records_count, (path, position)
            if expected is not None:
                assert header.base_offset == expected, (path, position, header, expected)
            expected = header.next_offset
            end = position + header.size
        assert end == len(data), f"{path}: {len(data) - end} bytes after the last whole batch"


def _answer(sock: socket.socket, timeout_s: float = 10.0) -> tuple[dict[str, Any] | None, bool]:
    """(the first frame's JSON body or None, whether the broker closed the connection before
    answering); AssertionError if it did neither within ``timeout_s``."""
    data = bytearray()
    deadline = time.monotonic() + timeout_s
    while not (len(data) >= 16 and len(data) >= 4 + int.from_bytes(data[:4], "big")):
        left = deadline - time.monotonic()
        assert readable(sock, max(0.0, left)), \
            "the broker neither answered nor closed the connection"
        try:
            chunk = sock.recv(1 << 20)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            return None, True
        data += chunk
    json_length = int.from_bytes(data[12:16], "big")
    body = orjson.loads(bytes(data[16:16 + json_length])) if json_length else {}
    return body, False


def _assert_closed_by_broker(body: dict[str, Any] | None, closed: bool, what: str) -> None:
    assert body is not None or closed, f"{what}: neither an answer nor a close"
    if body is not None:
        assert isinstance(body.get("error"), str) and body.get("message"), f"{what}: {body}"
        assert body["error"] not in NOT_REFUSALS, f"{what}: {body}"


# ------------------------------------------------------------------------------------------------
# garbage, truncated frames, giant lengths, invalid bodies
# ------------------------------------------------------------------------------------------------

def _garbage(target: str, seed: int) -> list[tuple[str, bytes, bool]]:
    """(name, bytes, whether the sender half-closes after them) for one socket."""
    rng = random.Random(seed)
    api = ApiKey.FETCH if target == "worker" else ApiKey.METADATA
    header = HEADER.pack

    def frame_with_json(json_bytes: bytes, raw: bytes = b"") -> bytes:
        return header(HEADER_REST_SIZE + len(json_bytes) + len(raw), api, 0, 9,
                      len(json_bytes)) + json_bytes + raw

    cases: list[tuple[str, bytes, bool]] = [
        (f"random bytes {index}", rng.randbytes(rng.choice([1, 15, 16, 17, 100, 5000])), True)
        for index in range(6)]
    cases += [
        ("4 GiB announced", header(0xFFFFFFFF, api, 0, 9, 0), False),
        ("4 GiB announced, length only", struct.pack(">I", 0xFFFFFFFF), False),
        ("frame_bytes_max + 1", header(limits.frame_bytes_max + 1, api, 0, 9, 2), False),
        ("json_length past frame_json_bytes_max",
         header(limits.frame_json_bytes_max + 100, api, 0, 9,
                limits.frame_json_bytes_max + 1), False),
        ("invalid UTF-8 JSON", frame_with_json(b'{"offset": "\xff\xfe"}'), False),
        ("truncated JSON", frame_with_json(b'{"offset": 0, "max_by'), False),
        ("JSON null", frame_with_json(b"null"), False),
        ("JSON string", frame_with_json(b'"hello"'), False),
        ("deeply nested JSON", frame_with_json(b"[" * 100_000 + b"]" * 100_000), False),
        ("valid header, body shorter than announced",
         header(HEADER_REST_SIZE + 50, api, 0, 9, 40) + b'{"a": 1}', True),
        ("api version 7", encode_frame(api, 9, {"offset": 0}, api_version=7), False),
        ("api key 0 (ERROR)", encode_frame(0, 9, {}), False),
    ]
    for cut in (1, 3, 4, 15, 16, 20):  # truncated frames, then close
        cases.append((f"first {cut} bytes of a frame, then close",
                      encode_frame(api, 5, {"offset": 0, "topics": None})[:cut], True))
    return cases


@pytest.mark.parametrize("target", TARGETS)
def test_garbage_gets_an_error_or_a_close(broker: RunningBroker, target: str) -> None:
    path = _socket_path(broker, target)
    seed = random.randrange(1 << 30)
    print(f"seed {seed}")
    with Bystanders(broker) as bystanders:
        for name, data, half_close in _garbage(target, seed):
            sock = raw_connect(path)
            try:
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    sock.sendall(data)  # the broker may close before reading it all
                if half_close:
                    sock.shutdown(socket.SHUT_WR)
                body, closed = _answer(sock)
            finally:
                sock.close()
            what = f"{name} (seed {seed})"
            if body is not None and "error" not in body:  # garbage that happens to be a request
                continue
            _assert_closed_by_broker(body, closed, what)
        bystanders.progress()


# ------------------------------------------------------------------------------------------------
# JSON of the wrong types, field by field
# ------------------------------------------------------------------------------------------------

WRONG = {"a string": "7", "a float": 1.5, "a bool": True, "null": None, "a list": [1],
         "an object": {"a": 1}, "-1": -1, "2**64-1": 2**64 - 1, "-2**63": -(2**63),
         "a huge string": "x" * 100_000}


def _requests(target: str) -> list[tuple[int, dict[str, Any], bytes]]:
    """(api key, valid body, raw) of the requests whose fields are replaced one by one."""
    if target == "worker":
        batch = bytes(record_batch.encode_batch([b"typed"], producer_id=7, base_sequence=0))
        return [(ApiKey.PRODUCE, {"acks": 1}, batch),
                (ApiKey.FETCH, {"offset": 0, "max_bytes": 4096, "max_wait_ms": 0,
                                "min_bytes": 1}, b""),
                (ApiKey.LIST_OFFSETS, {"timestamp_ms": -1}, b""),
                (ApiKey.ATTACH_RING, {"name": "no-such-ring"}, b"")]
    return [(ApiKey.CREATE_TOPIC, {"name": "typed", "partitions": 1,
                                   "config": {"retention_ms": 1000}}, b""),
            (ApiKey.OFFSET_COMMIT, {"group_id": "g", "offsets": [[TOPIC, 0, 1, "m"]],
                                    "member_id": None, "member_epoch": -1}, b""),
            (ApiKey.METADATA, {"topics": [TOPIC]}, b""),
            (ApiKey.OFFSET_FETCH, {"group_id": "g", "partitions": [[TOPIC, 0]]}, b""),
            (ApiKey.DESCRIBE_TOPIC, {"name": TOPIC}, b"")]


def _variants(body: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """The body with one field (or one element of a nested list/object) replaced by a value of
    a wrong type, or removed."""
    for name, value in body.items():
        yield f"{name} missing", {k: v for k, v in body.items() if k != name}
        for label, wrong in WRONG.items():
            yield f"{name} = {label}", {**body, name: wrong}
        if isinstance(value, dict):
            for inner in value:
                for label, wrong in WRONG.items():
                    yield f"{name}.{inner} = {label}", {**body, name: {**value, inner: wrong}}
        if isinstance(value, list) and value and isinstance(value[0], list):
            for index in range(len(value[0])):
                for label, wrong in WRONG.items():
                    entry = list(value[0])
                    entry[index] = wrong
                    yield f"{name}[0][{index}] = {label}", {**body, name: [entry]}
            yield f"{name}[0] too short", {**body, name: [value[0][:-1]]}
            yield f"{name}[0] not a list", {**body, name: [7]}


@pytest.mark.parametrize("target", TARGETS)
def test_json_of_wrong_types_in_every_field(broker: RunningBroker, target: str) -> None:
    path = _socket_path(broker, target)
    answered = refused = 0
    with Bystanders(broker) as bystanders:
        for api_key, body, raw in _requests(target):
            for what, variant in _variants(body):
                with raw_connect(path) as sock:  # (a ProtocolError closes the connection)
                    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                        sock.sendall(encode_frame(api_key, 3, variant, raw))
                    reply, closed = _answer(sock)
                if reply is not None and "error" not in reply:
                    answered += 1  # a null taken as the field's default, for example
                else:
                    _assert_closed_by_broker(reply, closed, f"{ApiKey(api_key).name} {what}")
                    refused += 1
        bystanders.progress()
    assert refused > 40 and refused > answered, (refused, answered)


# ------------------------------------------------------------------------------------------------
# batches over the socket-fallback produce
# ------------------------------------------------------------------------------------------------

def _bad_batches() -> list[tuple[str, bytes]]:
    def batch(*values: bytes) -> bytearray:
        return record_batch.encode_batch(list(values), producer_id=99, base_sequence=0)

    def recrc(data: bytearray) -> bytearray:
        size = struct.unpack_from(">i", data, 8)[0] + 12
        struct.pack_into(">I", data, 17, record_batch.compute_crc(data, 0, size))
        return data

    cases = []
    wrong_crc = batch(b"crc-a", b"crc-b")
    wrong_crc[-1] ^= 0x01
    cases.append(("wrong CRC", bytes(wrong_crc)))
    for magic in (0, 1, 3, 255):
        wrong_magic = batch(b"magic")
        wrong_magic[16] = magic
        cases.append((f"magic {magic}", bytes(recrc(wrong_magic))))
    for count in (0, 3, -1, 2**31 - 1):  # records_count lies (CRC recomputed)
        lying = batch(b"count-a", b"count-b")
        struct.pack_into(">i", lying, 57, count)
        cases.append((f"records_count {count}", bytes(recrc(lying))))
        if count in (0, -1, 2**31 - 1):  # and last_offset_delta agrees (see below for 1, 3)
            struct.pack_into(">i", lying, 23, max(count - 1, 0))
            cases.append((f"records_count {count}, last_offset_delta agrees",
                          bytes(recrc(lying))))
    for delta in (-8, -1, 1, 1000):  # batch_length lies
        lying = batch(b"length-a", b"length-b")
        length = struct.unpack_from(">i", lying, 8)[0]
        struct.pack_into(">i", lying, 8, length + delta)
        cases.append((f"batch_length {delta:+d}", bytes(recrc(lying))))
    huge = batch(b"x")
    struct.pack_into(">i", huge, 8, 2**31 - 1)
    cases.append(("batch_length 2**31-1", bytes(huge)))
    cases.append(("a truncated batch", bytes(batch(b"trunc-a", b"trunc-b"))[:-3]))
    cases.append(("half a header", bytes(batch(b"half"))[:30]))
    cases.append(("records section of garbage",
                  bytes(recrc(bytearray(bytes(batch(b"g" * 40))[:61]) + bytearray(
                      random.Random(5).randbytes(40))))))
    return cases


def test_socket_produce_of_bad_batches_never_corrupts_the_log(broker: RunningBroker) -> None:
    path = _socket_path(broker, "worker")
    good = bytes(record_batch.encode_batch([b"good"], producer_id=98, base_sequence=0))
    stored = []
    with Bystanders(broker) as bystanders:
        sock = raw_connect(path)
        try:
            for name, bad in _bad_batches():
                for payload in (bad, good + bad, bad + good):
                    sock.sendall(encode_frame(ApiKey.PRODUCE, 4, {"acks": 1}, payload))
                    reply, closed = _answer(sock)
                    assert reply is not None and not closed, name
                    if "error" in reply:  # the whole request refused: nothing stored
                        _assert_closed_by_broker(reply, closed, name)
                        continue
                    results = reply["results"]
                    assert all(r >= 0 or r == CORRUPT for r in results), (name, results)
                    if payload.startswith(good):
                        assert results[0] >= 0, (name, results)
                    stored += [r for r in results if r >= 0]
                    # a good batch after a bad one is stored only if the bad one's length
                    # was believable; the bad one itself never is
                    assert sum(r >= 0 for r in results) <= payload.count(good), (name, results)
        finally:
            sock.close()
        bystanders.progress()
    assert stored, "no good batch was stored at all"


@pytest.mark.parametrize("count", [1, 3])
def test_a_crc_valid_batch_whose_record_count_lies_is_refused(broker: RunningBroker,
                                                              count: int) -> None:
    """records_count and last_offset_delta that agree with each other but not with the records,
    the CRC recomputed: the worker walks the chain of record lengths at append and refuses it
    (the default, record_validation = "records"; "crc" would trust a CRC-valid batch's records:
    see the README)."""
    strict = "strict-records"
    with broker.admin() as admin:
        admin.create_topic(strict, partitions=1)
    broker.wait_ready()
    with broker.admin() as admin:
        (meta,) = admin.metadata([strict])
    lying = lying_batch([b"count-a", b"count-b"], count)
    good = record_batch.encode_batch([b"after"], producer_id=98, base_sequence=0)
    with raw_connect(str(meta["partitions"][0]["socket"])) as sock:
        reply, _, _ = raw_request(sock, ApiKey.PRODUCE, {"acks": 1}, bytes(lying))
        assert reply.get("error") or reply["results"] == [CORRUPT], reply
        reply, _, _ = raw_request(sock, ApiKey.PRODUCE, {"acks": 1}, bytes(good))
        assert reply["results"] == [0], reply  # nothing of the lying batch took an offset
    check_segments(broker, strict)


# ------------------------------------------------------------------------------------------------
# slow-loris
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("target", TARGETS)
def test_slow_frames_are_closed_after_frame_read_timeout(broker: RunningBroker,
                                                         target: str) -> None:
    """One connection sends a frame one byte every 0.2 s, another a header and then nothing:
    the bystanders are not held up, and both are closed once frame_read_timeout_ms passed."""
    path = _socket_path(broker, target)
    api = ApiKey.FETCH if target == "worker" else ApiKey.METADATA
    frame = encode_frame(api, 11, {"offset": 0, "topics": None, "padding": "p" * 100})
    with Bystanders(broker) as bystanders:
        dripper = raw_connect(path)
        stalled = raw_connect(path)
        stalled.sendall(frame[:16])
        started = time.monotonic()
        sent = 0
        closed_at = None
        try:
            while time.monotonic() - started < 10 * FRAME_READ_TIMEOUT_MS / 1000:  # bounded
                try:
                    dripper.send(frame[sent:sent + 1])
                    sent += 1
                except (BrokenPipeError, ConnectionResetError):
                    closed_at = time.monotonic()
                    break
                if readable(dripper, 0.2):
                    closed_at = time.monotonic()
                    break
            assert closed_at is not None and sent < len(frame), (
                f"the dripping connection was not closed ({sent} bytes sent)")
            elapsed_s = closed_at - started
            assert FRAME_READ_TIMEOUT_MS / 1000 * 0.7 <= elapsed_s <= 6 * (
                FRAME_READ_TIMEOUT_MS / 1000), elapsed_s
            for sock, name in ((dripper, "dripping"), (stalled, "stalled")):
                body, closed = _answer(sock)
                assert closed or closed_soon(sock, 5.0), f"the {name} connection stayed open"
                if body is not None:
                    assert body["error"] == "INVALID_REQUEST", body
                    assert "frame_read_timeout_ms" in body["message"], body
            bystanders.progress()
        finally:
            dripper.close()
            stalled.close()
    assert "frame_read_timeout_ms" in broker.log()


@pytest.mark.parametrize("target", TARGETS)
def test_a_slow_but_steady_client_within_the_timeout_is_served(broker: RunningBroker,
                                                               target: str) -> None:
    """The deadline is per frame: a client sending many frames in pieces, each whole well
    within frame_read_timeout_ms, is served for longer than the timeout in total."""
    path = _socket_path(broker, target)
    api = ApiKey.PING if target == "worker" else ApiKey.LIST_TOPICS
    sock = raw_connect(path)
    started = time.monotonic()
    try:
        for index in range(8):
            frame = encode_frame(api, index + 1, {})
            sock.sendall(frame[:5])
            time.sleep(FRAME_READ_TIMEOUT_MS / 1000 / 4)  # pacing the client, on purpose
            sock.sendall(frame[5:])
            body, closed = _answer(sock)
            assert body is not None and "error" not in body and not closed, body
        assert time.monotonic() - started > FRAME_READ_TIMEOUT_MS / 1000 * 1.5
    finally:
        sock.close()


# ------------------------------------------------------------------------------------------------
# thousands of idle connections, and connections_max
# ------------------------------------------------------------------------------------------------

def _fd_count(pid: int) -> int:
    return psutil.Process(pid).num_fds()


@pytest.fixture
def nofile() -> Iterator[None]:
    """Room for the test's own connections (bounded), restored afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 2 * CONNECTIONS_MAX + 512
    if hard != resource.RLIM_INFINITY and hard < wanted:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {wanted}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_thousands_of_idle_connections_and_connections_max(tmp_path: Path,
                                                          nofile: None) -> None:
    config = CONFIG + f"connections_max = {CONNECTIONS_MAX}\n"
    with RunningBroker(tmp_path / "data", config_toml=config) as broker:
        with broker.admin() as admin:
            admin.create_topic(TOPIC, partitions=1)
        supervisor_pid, worker_pid = _pids(broker)
        paths = {"broker": _socket_path(broker, "broker"),
                 "worker": _socket_path(broker, "worker")}
        fds_before = {pid: _fd_count(pid) for pid in (supervisor_pid, worker_pid)}
        idle: list[socket.socket] = []
        try:
            with Bystanders(broker) as bystanders:
                for path in paths.values():
                    for _ in range(IDLE_CONNECTIONS):
                        idle.append(raw_connect(path))
                # accepted (not just queued in the backlog): the broker's fds grew
                for pid in (supervisor_pid, worker_pid):
                    wait_for(lambda p=pid: _fd_count(p) >= fds_before[p] + IDLE_CONNECTIONS,
                             timeout_s=20, message="the idle connections accepted")
                bystanders.progress()
                # an idle connection is still served when it speaks
                body, _, _ = raw_request(idle[-1], ApiKey.PING, {})
                assert "error" not in body and body["log_end_offset"] > 0
                body, _, _ = raw_request(idle[0], ApiKey.LIST_TOPICS, {})
                assert body == {"topics": [TOPIC]}
                # fill each socket up to connections_max: then the next is closed at once
                for target, path in paths.items():
                    refused = None
                    for _ in range(CONNECTIONS_MAX):  # bounded: far more than the room left
                        sock = raw_connect(path)
                        idle.append(sock)
                        if readable(sock, 0.05) and closed_soon(sock, 0):
                            refused = sock
                            break
                    assert refused is not None, f"{target}: no connection was refused"
                    extra = raw_connect(path)
                    idle.append(extra)
                    assert closed_soon(extra, 5.0), f"{target}: a connection past the limit hung"
                log = broker.log()
                assert log.count(f"connections_max {CONNECTIONS_MAX} reached") >= 2, log[-2000:]
                for sock in idle:
                    sock.close()
                idle.clear()
                for pid in (supervisor_pid, worker_pid):
                    wait_for(lambda p=pid: _fd_count(p) <= fds_before[p] + 4, timeout_s=20,
                             message="the broker's fds back to where they were")
                bystanders.progress()
        finally:
            for sock in idle:
                sock.close()
        assert _pids(broker) == (supervisor_pid, worker_pid)


# ------------------------------------------------------------------------------------------------
# a consumer that stops reading, and other per-connection bounds
# ------------------------------------------------------------------------------------------------

def test_a_consumer_that_stops_reading_while_producers_produce(broker: RunningBroker) -> None:
    """Many connections that each send fetches of a large log and never read: the worker's RSS
    and fds stay flat while a producer keeps producing and another consumer keeps consuming."""
    path = _socket_path(broker, "worker")
    with Producer(broker.data_dir, linger_ms=5) as producer:
        for index in range(4000):
            producer.send(TOPIC, b"%d" % index + b"x" * 4000, partition=0)
        producer.flush(30)
    (_, worker_pid) = _pids(broker)
    worker = psutil.Process(worker_pid)
    with Bystanders(broker) as bystanders:
        fds_before = worker.num_fds()
        rss_before = worker.memory_info().rss
        hogs = []
        fetch = b"".join(frame_head(ApiKey.FETCH, index + 1, {
            "offset": 0, "max_bytes": limits.fetch_bytes_max, "max_wait_ms": 0})
            for index in range(200))
        try:
            for _ in range(20):
                hog = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                hog.connect(path)
                hog.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    hog.send(fetch)
                hogs.append(hog)
            deadline = time.monotonic() + 4.0
            rss_peak = fds_peak = 0
            while time.monotonic() < deadline:  # asserts something does not happen: a window
                rss_peak = max(rss_peak, worker.memory_info().rss)
                fds_peak = max(fds_peak, worker.num_fds())
                bystanders.progress(50)
            assert rss_peak <= rss_before + 32 * 2**20, (rss_before, rss_peak)
            assert fds_peak <= fds_before + 2 * len(hogs) + 8, (fds_before, fds_peak)
        finally:
            for hog in hogs:
                hog.close()
        wait_for(lambda: worker.num_fds() <= fds_before + 4, message="the worker's fds back")


def test_one_parked_fetch_per_connection(broker: RunningBroker) -> None:
    """Long polls pipelined on one connection: the worker parks only the latest; each earlier
    one is answered (empty) when the next arrives, in request order."""
    path = _socket_path(broker, "worker")
    sock = raw_connect(path)
    try:
        end = raw_request(sock, ApiKey.PING, {})[0]["log_end_offset"]
        sock.sendall(b"".join(encode_frame(ApiKey.FETCH, index, {
            "offset": end, "max_wait_ms": 30_000}) for index in range(1, 51)))
        from shmbroker.client.connection import read_frame

        for index in range(1, 50):  # answered at once, in order, while the last is parked
            body, raw, correlation_id = read_frame(sock)
            assert correlation_id == index and "error" not in body and not len(raw)
        sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            read_frame(sock)
    finally:
        sock.close()


def test_rings_per_connection_max(broker: RunningBroker) -> None:
    from shmbroker.shm import names
    from shmbroker.shm.ring import RingWriter

    path = _socket_path(broker, "worker")
    with broker.admin() as admin:
        (meta,) = admin.metadata([TOPIC])
    partition = meta["partitions"][0]
    rings = []
    sock = raw_connect(path)
    try:
        for _ in range(limits.rings_per_connection_max + 1):
            ring_id = names.new_ring_id()
            name = names.ring_name(partition["shm_prefix"], meta["topic_id"], 0, ring_id)
            rings.append(RingWriter.create(name, data_bytes=limits.ring_data_bytes_min,
                                           ack_slots=64, producer_id=ring_id))
        for ring in rings[:-1]:
            body, _, _ = raw_request(sock, ApiKey.ATTACH_RING, {"name": ring.name})
            assert body == {}, body
        body, _, _ = raw_request(sock, ApiKey.ATTACH_RING, {"name": rings[-1].name})
        assert body["error"] == "RING_ERROR" and "rings_per_connection_max" in body["message"]
        # attaching one of its own again is fine (idempotent), and the connection serves on
        body, _, _ = raw_request(sock, ApiKey.ATTACH_RING, {"name": rings[0].name})
        assert body == {}, body
    finally:
        sock.close()
        for ring in rings:
            ring.close()  # the worker unlinks the rings it attached; the last one is ours
        rings[-1].unlink()
