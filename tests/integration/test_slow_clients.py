"""A client that sends requests but never reads the answers (issue 6: a consumer that stops
reading must not grow the broker).  With backpressure the broker stops reading a connection
while its answers wait to be written, so the requests stay in the kernel's socket buffers, not
in the broker: its file descriptors and memory stay flat, and other clients are served."""

from __future__ import annotations

import socket
import time

import psutil
import pytest
from broker_helpers import RunningBroker, wait_for

from shmbroker import Consumer, Producer, TopicPartition
from shmbroker.protocol.frames import frame_head
from shmbroker.protocol.messages import ApiKey

pytestmark = pytest.mark.integration

PIPELINED_FETCHES = 5000
SEND_FOR_S = 3.0


def _worker(broker: RunningBroker) -> psutil.Process:
    with broker.admin() as admin:
        (entry,) = admin.status()["workers"]
    return psutil.Process(entry["pid"])


def test_a_client_that_never_reads_cannot_grow_the_worker(broker: RunningBroker) -> None:
    with broker.admin() as admin:
        admin.create_topic("t")
        socket_path = admin.metadata(["t"])[0]["partitions"][0]["socket"]
    with Producer(broker.data_dir, linger_ms=5) as producer:
        for index in range(2000):
            producer.send("t", b"%d" % index + b"x" * 1000, partition=0)
        producer.flush(30)
    worker = _worker(broker)
    fds_before = worker.num_fds()
    rss_before = worker.memory_info().rss
    hog = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    hog.connect(socket_path)
    hog.setblocking(False)
    request = b"".join(frame_head(ApiKey.FETCH, index + 1, {
        "offset": 0, "max_bytes": 1 << 20, "max_wait_ms": 0, "min_bytes": 1})
        for index in range(PIPELINED_FETCHES))
    sent = 0
    deadline = time.monotonic() + SEND_FOR_S
    try:
        while sent < len(request) and time.monotonic() < deadline:  # bounded in time and count
            try:
                sent += hog.send(request[sent:sent + 65536])
            except BlockingIOError:
                time.sleep(0.01)
        # the worker served what it could write and holds the rest back: watch it for a second
        # (this asserts that something does not happen, so it samples a window)
        fds_peak = 0
        for _ in range(20):
            fds_peak = max(fds_peak, worker.num_fds())
            time.sleep(0.05)
        assert fds_peak <= fds_before + 8, (fds_before, fds_peak)
        assert worker.memory_info().rss <= rss_before + 64 * 2**20
        # everybody else is served meanwhile
        with Consumer(broker.data_dir, auto_offset_reset="earliest") as consumer:
            consumer.assign([TopicPartition("t", 0)])
            got: list = []
            wait_for(lambda: len(got) >= 2000 or got.extend(consumer.poll(200)),
                     timeout_s=30, message="another consumer's records")
            assert [record.offset for record in got[:2000]] == list(range(2000))
    finally:
        hog.close()
    wait_for(lambda: worker.num_fds() <= fds_before + 2, message="the worker's fds back")
