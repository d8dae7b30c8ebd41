"""Bad input at the edges: raw bytes on the broker's and a worker's socket, malformed and
oversized batches in produce requests, records too large, unknown topics, a second broker on a
data dir.  Each gets a clear error (or a closed connection), and the log stays intact: every
record acknowledged before and after is checked by value and offset."""

from __future__ import annotations

import random
import socket
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from broker_helpers import RunningBroker
from integration.produce_helpers import (
    check_acked,
    raw_connect,
    raw_request,
    read_partitions,
    read_reply_or_eof,
)

from shmbroker import Consumer, Producer, TopicPartition
from shmbroker.errors import (
    BatchTooLargeError,
    RecordTooLargeError,
    UnknownTopicOrPartitionError,
)
from shmbroker.format import record_batch
from shmbroker.protocol.frames import HEADER, HEADER_REST_SIZE, encode_frame
from shmbroker.protocol.messages import RING_RESULT_NUMBERS, ApiKey

pytestmark = pytest.mark.integration


SMALL_MAX_BATCH_BYTES = 1024
CORRUPT = RING_RESULT_NUMBERS["CORRUPT_MESSAGE"]
TOO_LARGE = RING_RESULT_NUMBERS["MESSAGE_TOO_LARGE"]


def _header(frame_length: int, api_key: int, json_length: int, correlation_id: int = 9) -> bytes:
    return HEADER.pack(frame_length, api_key, 0, correlation_id, json_length)


def _json_frame(api_key: int, json_bytes: bytes, correlation_id: int = 9) -> bytes:
    return _header(HEADER_REST_SIZE + len(json_bytes), api_key, len(json_bytes),
                   correlation_id) + json_bytes


def _bad_inputs(target: str, seed: int) -> list[tuple[str, bytes, set[int]]]:
    """(name, bytes to send, api keys an error reply may carry) for one socket."""
    rng = random.Random(seed)
    fetch_or_meta = ApiKey.FETCH if target == "worker" else ApiKey.METADATA
    wrong_types = ({"offset": "x"} if target == "worker"
                   else {"name": "t", "partitions": "x"})
    wrong_key = ApiKey.FETCH if target == "worker" else ApiKey.CREATE_TOPIC
    return [
        ("random bytes", bytes(rng.getrandbits(8) for _ in range(256)),
         set(range(1 << 16))),
        ("a frame announcing 4 GiB", struct.pack(">I", 0xFFFFFFFF) + b"\0" * 12,
         {ApiKey.ERROR}),
        ("a header shorter than itself", _header(3, fetch_or_meta, 0), {ApiKey.ERROR}),
        ("json_length past the frame", _header(HEADER_REST_SIZE + 2, fetch_or_meta, 50) + b"{}",
         {ApiKey.ERROR}),
        ("invalid JSON", _json_frame(fetch_or_meta, b"{not json"), {fetch_or_meta, 0}),
        ("JSON that is not an object", _json_frame(fetch_or_meta, b"[1, 2, 3]"),
         {fetch_or_meta, 0}),
        ("JSON of wrong types", encode_frame(wrong_key, 9, wrong_types), {wrong_key}),
        ("a bool where an int goes", encode_frame(wrong_key, 9, {
            "offset": True, "name": "t", "partitions": True}), {wrong_key}),
        ("an unknown api key", encode_frame(999, 9, {}), {999}),
        ("the other process's api key",
         encode_frame(ApiKey.METADATA if target == "worker" else ApiKey.FETCH, 9, {"offset": 0}),
         {ApiKey.METADATA if target == "worker" else ApiKey.FETCH}),
    ]


def _socket_path(broker: RunningBroker, target: str, topic: str) -> str:
    if target == "broker":
        return str(broker.socket_path)
    with broker.admin() as admin:
        (meta,) = admin.metadata([topic])
    return str(meta["partitions"][0]["socket"])


def _produce_some(broker: RunningBroker, topic: str, tag: str, count: int = 50
                  ) -> list[tuple[bytes, int, int]]:
    with Producer(broker.data_dir, linger_ms=1) as producer:
        futures = [(b"%s-%d" % (tag.encode(), i), producer.send(topic, b"%s-%d" % (
            tag.encode(), i), partition=0)) for i in range(count)]
        producer.flush(20)
        return [(value, 0, future.result(5).offset) for value, future in futures]


@pytest.mark.parametrize("target", ["broker", "worker"])
def test_malformed_frames_get_errors_and_break_nothing(broker: RunningBroker,
                                                       target: str) -> None:
    with broker.admin() as admin:
        admin.create_topic("victim", partitions=1)
    acked = _produce_some(broker, "victim", "before")
    path = _socket_path(broker, target, "victim")
    seed = random.randrange(1 << 30)
    print(f"random bytes seed {seed}")
    for name, data, reply_keys in _bad_inputs(target, seed):
        sock = raw_connect(path)
        try:
            sock.sendall(data)
            if name == "random bytes":
                sock.shutdown(socket.SHUT_WR)  # the random length may promise more bytes
            body, api_key, closed = read_reply_or_eof(sock)
        finally:
            sock.close()
        assert body is not None or closed, f"{name}: neither an error frame nor a close"
        if body is not None:
            assert "error" in body and body.get("message"), f"{name}: reply {body}"
            assert api_key in reply_keys, f"{name}: reply with api key {api_key}: {body}"
        if name != "random bytes":
            assert body is not None, f"{name}: closed without an error frame"
            assert closed, f"{name}: the connection stayed open after a protocol error"
            assert body["error"] == "INVALID_REQUEST", f"{name}: {body}"
        # The process survived and still answers on a new connection.
        with broker.admin() as admin:
            assert "victim" in admin.list_topics(), f"after {name}"
        if target == "worker":
            check = raw_connect(path)
            try:
                response, _, correlation_id = raw_request(check, ApiKey.PING, {},
                                                          correlation_id=77)
            finally:
                check.close()
            assert correlation_id == 77 and response["log_end_offset"] == len(acked), name
    # A truncated frame, then close: nothing to answer, nothing may break.
    for cut in (2, 10, 20):
        sock = raw_connect(path)
        sock.sendall(encode_frame(ApiKey.FETCH, 5, {"offset": 0, "max_wait_ms": 0})[:cut])
        sock.close()
    acked += _produce_some(broker, "victim", "after")
    assert [offset for _, _, offset in acked] == list(range(100))
    records = read_partitions(broker.data_dir, "victim", [0])
    assert check_acked(acked, records) == 100 == len(records[0])


def test_request_errors_keep_the_connection_usable(broker: RunningBroker) -> None:
    """Errors about the request's content (not its framing) are answered on a connection that
    stays open."""
    with broker.admin() as admin:
        admin.create_topic("open", partitions=1)
    acked = _produce_some(broker, "open", "r", 10)
    sock = raw_connect(broker.socket_path)
    try:
        body, _, _ = raw_request(sock, ApiKey.METADATA, {"topics": [5]})
        assert body["error"] == "INVALID_TOPIC_NAME"
        body, _, _ = raw_request(sock, ApiKey.DESCRIBE_TOPIC, {"name": "missing"})
        assert body["error"] == "UNKNOWN_TOPIC_OR_PARTITION" and "missing" in body["message"]
        body, _, correlation_id = raw_request(sock, ApiKey.LIST_TOPICS, {}, correlation_id=3)
        assert body == {"topics": ["open"]} and correlation_id == 3
    finally:
        sock.close()
    sock = raw_connect(_socket_path(broker, "worker", "open"))
    try:
        body, _, _ = raw_request(sock, ApiKey.FETCH, {"offset": 10**12})
        assert body["error"] == "OFFSET_OUT_OF_RANGE"
        assert (body["log_start_offset"], body["log_end_offset"]) == (0, 10)
        body, raw, _ = raw_request(sock, ApiKey.FETCH, {"offset": 3, "max_wait_ms": 0})
        assert "error" not in body and body["log_end_offset"] == 10
        assert [r.value for r in record_batch.iter_records(raw, min_offset=3)] == [
            b"r-%d" % i for i in range(3, 10)]
        # A field out of its range breaks the message rules: an error, then the worker closes.
        sock.sendall(encode_frame(ApiKey.LIST_OFFSETS, 4, {"timestamp_ms": -7}))
        body, api_key, closed = read_reply_or_eof(sock)
        assert body is not None and body["error"] == "INVALID_REQUEST"
        assert "timestamp_ms" in body["message"] and api_key == ApiKey.LIST_OFFSETS and closed
    finally:
        sock.close()
    assert check_acked(acked, read_partitions(broker.data_dir, "open", [0])) == 10


def _batch(values: list[bytes], sequence: int = 0) -> bytearray:
    return record_batch.encode_batch(values, producer_id=4242, producer_epoch=0,
                                     base_sequence=sequence)


def test_socket_produce_refuses_bad_batches_one_by_one(broker: RunningBroker) -> None:
    with broker.admin() as admin:
        admin.create_topic("strict", partitions=1,
                           config={"max_batch_bytes": SMALL_MAX_BATCH_BYTES})
    good = {name: _batch([b"%s-%d" % (name.encode(), i) for i in range(3)])
            for name in ("a", "b", "c", "d", "e")}
    bad_crc = _batch([b"crc-0", b"crc-1"])
    bad_crc[-1] ^= 0xFF
    bad_magic = _batch([b"magic"])
    bad_magic[record_batch.MAGIC_POSITION] = 1
    oversized = _batch([b"o" * (SMALL_MAX_BATCH_BYTES + 100)])
    assert len(oversized) > SMALL_MAX_BATCH_BYTES >= max(len(b) for b in good.values())

    sock = raw_connect(_socket_path(broker, "worker", "strict"))
    try:
        def produce(*batches: bytes, acks: int = 1) -> dict[str, Any]:
            body, _, _ = raw_request(sock, ApiKey.PRODUCE, {"acks": acks}, b"".join(batches))
            return body

        assert produce(good["a"], bad_crc, good["b"]) == {"results": [0, CORRUPT, 3]}
        assert produce(bad_magic) == {"results": [CORRUPT]}
        assert produce(oversized, good["c"]) == {"results": [TOO_LARGE, 6]}
        assert produce(good["d"], bad_magic, bad_crc, oversized) == {
            "results": [9, CORRUPT, CORRUPT, TOO_LARGE]}
        # A buffer that is not batches at all: one error for the request.
        body = produce(b"\0" * 7)
        assert "error" in body and body.get("message"), body
        # acks=0: no answer; the next request's answer is the next frame.
        sock.sendall(encode_frame(ApiKey.PRODUCE, 1, {"acks": 0}, bytes(good["e"])))
        body, _, correlation_id = raw_request(sock, ApiKey.PING, {}, correlation_id=2)
        assert correlation_id == 2 and body["log_end_offset"] == 15
    finally:
        sock.close()
    acked = [(b"%s-%d" % (name.encode(), i), 0, base + i)
             for name, base in (("a", 0), ("b", 3), ("c", 6), ("d", 9), ("e", 12))
             for i in range(3)]
    records = read_partitions(broker.data_dir, "strict", [0])
    assert check_acked(acked, records) == 15 == len(records[0])


@pytest.mark.parametrize("transport", ["shm", "socket"])
def test_record_larger_than_max_batch_bytes_fails_its_future(broker: RunningBroker,
                                                             transport: str) -> None:
    with broker.admin() as admin:
        admin.create_topic("tiny", partitions=1,
                           config={"max_batch_bytes": SMALL_MAX_BATCH_BYTES})
    with Producer(broker.data_dir, linger_ms=0, transport=transport) as producer:
        before = producer.send("tiny", b"small before", partition=0).result(10)
        big = producer.send("tiny", b"B" * (2 * SMALL_MAX_BATCH_BYTES), partition=0)
        error = big.exception(10)
        after = producer.send("tiny", b"small after", partition=0).result(10)
    assert isinstance(error, BatchTooLargeError | RecordTooLargeError), repr(error)
    assert isinstance(error, RecordTooLargeError)
    assert "MESSAGE_TOO_LARGE" in str(error) or "max_batch_bytes" in str(error), str(error)
    with pytest.raises(RecordTooLargeError):
        big.result(0)
    assert (before.offset, after.offset) == (0, 1)
    records = read_partitions(broker.data_dir, "tiny", [0])
    assert check_acked([(b"small before", 0, 0), (b"small after", 0, 1)], records) == 2
    assert len(records[0]) == 2


def test_many_small_records_fit_a_small_max_batch_bytes(broker: RunningBroker) -> None:
    """Records that each fit max_batch_bytes are accepted even when the producer's
    batch_size_bytes is larger (Kafka's producer splits a batch the broker refuses as too
    large)."""
    with broker.admin() as admin:
        admin.create_topic("split", partitions=1,
                           config={"max_batch_bytes": SMALL_MAX_BATCH_BYTES})
    with Producer(broker.data_dir, linger_ms=20) as producer:
        futures = [producer.send("split", b"%050d" % i, partition=0) for i in range(100)]
        producer.flush(20)
        errors = [future.exception(5) for future in futures]
    assert errors == [None] * 100, f"{sum(e is not None for e in errors)} failed: {errors[0]!r}"


def test_record_too_large_error_says_what_and_how_much(broker: RunningBroker) -> None:
    with broker.admin() as admin:
        admin.create_topic("tiny", partitions=1,
                           config={"max_batch_bytes": SMALL_MAX_BATCH_BYTES})
    with Producer(broker.data_dir, linger_ms=0) as producer:
        error = producer.send("tiny", b"B" * (2 * SMALL_MAX_BATCH_BYTES)).exception(10)
    assert isinstance(error, RecordTooLargeError)
    message = str(error)
    assert "tiny" in message and "max_batch_bytes" in message, message


def test_unknown_topic_and_partition_errors(broker: RunningBroker) -> None:
    with broker.admin() as admin:
        admin.create_topic("known", partitions=2)
    with Producer(broker.data_dir) as producer:
        with pytest.raises(UnknownTopicOrPartitionError) as caught:
            producer.send("nope", b"x")
        assert "'nope'" in str(caught.value) and "create" in str(caught.value)
        with pytest.raises(UnknownTopicOrPartitionError) as caught:
            producer.send("known", b"x", partition=5)
        assert "2 partitions" in str(caught.value) and "5" in str(caught.value)
        with pytest.raises(UnknownTopicOrPartitionError):
            producer.send("known", b"x", partition=-1)
        ok = producer.send("known", b"fine", partition=1).result(10)
    with Consumer(broker.data_dir) as consumer:
        with pytest.raises(UnknownTopicOrPartitionError) as caught:
            consumer.assign([TopicPartition("nope", 0)])
        assert "'nope'" in str(caught.value)
        with pytest.raises(UnknownTopicOrPartitionError):
            consumer.assign([TopicPartition("known", 2)])
    assert check_acked([(b"fine", 1, ok.offset)],
                       read_partitions(broker.data_dir, "known", [0, 1])) == 1


def test_second_broker_on_the_same_data_dir_exits_naming_the_first(
        broker: RunningBroker, tmp_path: Path) -> None:
    with broker.admin() as admin:
        admin.create_topic("mine", partitions=1)
        pid = admin.status()["pid"]
    acked = _produce_some(broker, "mine", "m", 10)
    second = subprocess.run(
        [sys.executable, "-m", "shmbroker.cli", "serve", "--data-dir", str(broker.data_dir)],
        capture_output=True, timeout=30, stdin=subprocess.DEVNULL)
    stderr = second.stderr.decode(errors="replace")
    assert second.returncode == 1, stderr
    assert f"pid {pid}" in stderr and "already" in stderr, stderr
    # The first broker is untouched.
    assert broker.socket_path.exists()
    acked += _produce_some(broker, "mine", "n", 10)
    assert check_acked(acked, read_partitions(broker.data_dir, "mine", [0])) == 20
