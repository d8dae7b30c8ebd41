"""Shared memory removed or corrupted under a running broker.

A real broker serves one partition; a *victim* producer and an *other* producer send to it.
While the worker is stopped (SIGSTOP, so the victim has records in flight), something outside
the protocol hits the victim's ring or the partition's control block; then the worker goes on:

* a ring's /dev/shm name unlinked: producer and worker still map it, so everything goes on; when
  the worker is then SIGKILLed its successor cannot find the ring, and the victim's records in
  flight fail with a clear RingError while its next records go to a new ring;
* the control block unlinked, or its header overwritten: the worker creates or repairs it
  within a tick; consumers and new producers find it, the high watermark is right;
* a ring's header or control words overwritten (head beyond the data area, a frame length past
  the head, the magic, data_bytes, the worker's progress words): the worker marks the ring
  broken and logs why, refuses the rest of its data, releases it and serves on (same pid, no
  restart); the victim's records in flight are each acknowledged at their offset or fail with a
  RingError, and its next records go to a new ring;
* a ring's magic or doorbell address (a path of 120 bytes: a worker that rang it would crash on
  every append) overwritten while the victim has records in flight, and the worker SIGKILLed:
  the next worker does not attach the ring and does not crash (one restart); the victim's
  records in flight fail with a RingError and its next ones go to a new ring.  (A ring nobody
  removes is unlinked by the worker after a grace period: ``test_shm_leftovers.py``.)

Every time: the other producer's acknowledged records are all stored at their offsets, the log
read back (CRC-checked) holds only values the test sent, each once, offsets dense.
"""

from __future__ import annotations

import mmap
import os
import re
import signal
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import posix_ipc
import pytest
from broker_helpers import RunningBroker, wait_for
from integration.produce_helpers import check_acked, read_partitions

from shmbroker import Consumer, Producer, TopicPartition
from shmbroker.errors import RingError
from shmbroker.format import ring_layout
from shmbroker.partition.paths import PartitionPaths
from shmbroker.partition.worker import RING_SCAN_MS, RING_UNUSABLE_GRACE_MS
from shmbroker.shm import names
from shmbroker.shm.control_block import ControlBlock
from shmbroker.shm.ring import RingReader

pytestmark = [pytest.mark.integration, pytest.mark.fault]

TOPIC = "shm"
RECORDS = 20  # per producer and phase
WAIT_S = 15.0
RESTART_WAIT_S = 20.0
VALUE = re.compile(rb"(other|victim|after)-\d+")
# linger 0 and no bound on batches awaiting acks: each record is its own batch in the ring at
# once, even while the worker is stopped (the records in flight this file is about)
PRODUCER_SETTINGS: dict[str, Any] = {"linger_ms": 0, "ring_bytes": 256 * 1024,
                                     "ring_ack_slots": 64, "delivery_timeout_ms": 30_000,
                                     "max_in_flight_batches": 1 << 20}
Acked = tuple[bytes, int, int]


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[RunningBroker]:
    with RunningBroker(tmp_path / "data") as running:
        with running.admin() as admin:
            admin.create_topic(TOPIC, partitions=1)
        running.wait_ready()
        yield running


def paths_of(broker: RunningBroker) -> PartitionPaths:
    with broker.admin() as admin:
        topic_id = admin.describe_topic(TOPIC)["topic_id"]
    return PartitionPaths(broker.data_dir.resolve(), TOPIC, topic_id, 0)


def worker(broker: RunningBroker) -> dict[str, Any]:
    with broker.admin() as admin:
        return next(w for w in admin.status()["workers"] if w["topic"] == TOPIC)


def mapped(name: str) -> mmap.mmap:
    shared = posix_ipc.SharedMemory(name)
    try:
        return mmap.mmap(shared.fd, shared.size)
    finally:
        shared.close_fd()


def poke(name: str, position: int, data: bytes) -> None:
    """Overwrite bytes of shm object ``name`` through a mapping of our own (a stray writer)."""
    mapping = mapped(name)
    mapping[position:position + len(data)] = data
    mapping.close()


def u64(value: int) -> bytes:
    return struct.pack("<Q", value)


def send(producer: Producer, prefix: str, start: int, count: int = RECORDS) -> list[Any]:
    return [(b"%s-%d" % (prefix.encode(), n), producer.send(TOPIC, b"%s-%d" % (
        prefix.encode(), n), partition=0)) for n in range(start, start + count)]


def outcomes(futures: list[Any]) -> tuple[list[Acked], list[BaseException]]:
    acked: list[Acked] = []
    failed: list[BaseException] = []
    for value, future in futures:
        error = future.exception(WAIT_S)
        if error is None:
            meta = future.result(0)
            acked.append((value, meta.partition, meta.offset))
        else:
            failed.append(error)
    return acked, failed


def new_ring(paths: PartitionPaths, before: set[str]) -> str:
    rings = set(names.list_rings(paths.shm_prefix, paths.topic_id, 0)) - before
    assert len(rings) == 1, rings
    return rings.pop()


class Scene:
    """The other producer, the victim and the worker stopped while the victim has records in
    flight; ``check`` verifies the log at the end."""

    def __init__(self, broker: RunningBroker) -> None:
        self.broker = broker
        self.paths = paths_of(broker)
        self.acked: list[Acked] = []
        self.other = Producer(broker.data_dir, **PRODUCER_SETTINGS)
        self.acked += outcomes(send(self.other, "other", 0))[0]
        before = set(names.list_rings(self.paths.shm_prefix, self.paths.topic_id, 0))
        self.victim = Producer(broker.data_dir, **PRODUCER_SETTINGS)
        self.acked += outcomes(send(self.victim, "victim", 0))[0]
        self.ring = new_ring(self.paths, before)
        self.observer = RingReader.attach(self.ring)
        self.worker_pid = worker(broker)["pid"]
        assert len(self.acked) == 2 * RECORDS

    def stop_worker(self) -> list[Any]:
        """SIGSTOP the worker; the victim's next records, in flight until it runs again."""
        os.kill(self.worker_pid, signal.SIGSTOP)
        return send(self.victim, "victim", RECORDS)

    def resume_worker(self) -> None:
        os.kill(self.worker_pid, signal.SIGCONT)

    def after(self) -> None:
        """The victim and the other producer both work afterwards."""
        acked, failed = outcomes(send(self.victim, "after", 0))
        assert not failed, failed[:3]
        acked_other, failed_other = outcomes(send(self.other, "other", RECORDS))
        assert not failed_other, failed_other[:3]
        self.acked += acked + acked_other

    def check(self) -> None:
        self.victim.close()
        self.other.close()
        records = read_partitions(self.broker.data_dir, TOPIC, [0])
        assert check_acked(self.acked, records) == len(self.acked)
        offsets = [record.offset for record in records[0]]
        assert offsets == list(range(len(offsets)))
        strange = [r.value for r in records[0] if not VALUE.fullmatch(r.value or b"")]
        assert not strange, f"records the test did not send: {strange[:5]}"
        wait_for(lambda: not names.list_rings(self.paths.shm_prefix, self.paths.topic_id, 0),
                 WAIT_S, message="the worker to remove every ring once the producers closed")

    def close(self) -> None:
        with_suppressed(lambda: os.kill(self.worker_pid, signal.SIGCONT))
        self.victim.close(timeout=1)
        self.other.close(timeout=1)
        self.observer.close()


def with_suppressed(call: Callable[[], object]) -> None:
    try:
        call()
    except (OSError, ProcessLookupError):
        pass


@pytest.fixture
def scene(broker: RunningBroker) -> Iterator[Scene]:
    made = Scene(broker)
    try:
        yield made
    finally:
        made.close()


# -- a ring's name unlinked ------------------------------------------------------------------------
def test_ring_name_unlinked_under_producer_and_worker(broker: RunningBroker,
                                                      scene: Scene) -> None:
    assert names.unlink(scene.ring)
    # both sides still map it: records go on through the ring
    acked, failed = outcomes(send(scene.victim, "victim", 100))
    assert not failed
    scene.acked += acked
    assert not os.path.exists(f"/dev/shm/{scene.ring.lstrip('/')}")

    # the worker dies with records of the victim in flight: its successor cannot find the ring
    in_flight = scene.stop_worker()
    os.kill(scene.worker_pid, signal.SIGKILL)
    wait_for(lambda: worker(broker)["state"] == "running"
             and worker(broker)["pid"] not in (None, scene.worker_pid),
             RESTART_WAIT_S, message="the worker restarted")
    acked, failed = outcomes(in_flight)
    assert not acked and len(failed) == RECORDS  # the dead worker never saw them
    assert all(isinstance(error, RingError) and "cannot take our ring back" in str(error)
               for error in failed), failed[:2]
    scene.after()
    scene.check()


# -- the control block -----------------------------------------------------------------------
@pytest.mark.parametrize("how", ["unlinked", "overwritten"])
def test_control_block_removed_or_overwritten(broker: RunningBroker, scene: Scene,
                                              how: str) -> None:
    name = scene.paths.control_block_name
    if how == "unlinked":
        before = os.stat(f"/dev/shm/{name.lstrip('/')}").st_ino
        assert names.unlink(name)
        wait_for(lambda: os.path.exists(f"/dev/shm/{name.lstrip('/')}"), WAIT_S,
                 message="the worker to create its control block again")
        assert os.stat(f"/dev/shm/{name.lstrip('/')}").st_ino != before
        assert "was removed from /dev/shm or replaced" in broker.log()
    else:
        poke(name, 0, b"garbage!" * 4 + u64(1 << 62) * 4)  # magic, version, pid, state...
        poke(name, ring_layout.CONTROL_LOG_END_OFFSET_POSITION, u64(10**12))

        def repaired() -> bool:
            try:
                block = ControlBlock.open(name)
            except RingError:  # the magic is still garbage
                return False
            try:
                return block.positions()[1] < 10**12
            finally:
                block.close()

        wait_for(repaired, WAIT_S, message="the worker to repair its control block")
        assert "was overwritten; writing it again" in broker.log()
    scene.after()
    end = len(scene.acked)
    tp = TopicPartition(TOPIC, 0)
    with Consumer(broker.data_dir) as consumer:
        consumer.assign([tp])
        assert consumer.end_offsets([tp])[tp] == end
        wait_for(lambda: consumer.highwater(tp) == end, WAIT_S, message="the high watermark")
    # a producer started now maps the new block and is woken... records go through
    with Producer(broker.data_dir, **PRODUCER_SETTINGS) as late:
        acked, failed = outcomes(send(late, "after", 1000, 3))
    assert not failed
    scene.acked += acked
    assert worker(broker)["pid"] == scene.worker_pid and worker(broker)["restarts"] == 0
    assert worker(broker)["responsive"]
    scene.check()


# -- a ring's words overwritten under a running worker --------------------------------------------
def _head_beyond(scene: Scene) -> None:
    head = scene.observer.head
    poke(scene.ring, ring_layout.HEAD_POSITION, u64(head + 4 * scene.observer.data_bytes))


def _frame_past_head(scene: Scene) -> None:
    """A frame header at the head whose length runs past the published bytes, published."""
    head = scene.observer.head
    data = ring_layout.data_area_position(scene.observer.ack_slots)
    position = data + head % scene.observer.data_bytes
    poke(scene.ring, position, struct.pack(">qi", 0, 10 * scene.observer.data_bytes))
    poke(scene.ring, ring_layout.HEAD_POSITION, u64(head + 100))


def _magic(scene: Scene) -> None:
    poke(scene.ring, ring_layout.MAGIC_POSITION, b"NOTARING")


def _data_bytes(scene: Scene) -> None:
    poke(scene.ring, ring_layout.DATA_BYTES_POSITION, u64(1 << 40))


def _progress(scene: Scene) -> None:
    """The worker's own words (the producer reads them): its seqlock generation and both
    progress slots, tail beyond head."""
    poke(scene.ring, ring_layout.PROGRESS_GEN_POSITION, u64(12345) + u64(1 << 50) * 4)


CORRUPTIONS = {"head_beyond": (_head_beyond, ring_layout.RING_BROKEN_CORRUPT_FRAME),
               "frame_past_head": (_frame_past_head, ring_layout.RING_BROKEN_CORRUPT_FRAME),
               "magic": (_magic, ring_layout.RING_BROKEN_CORRUPT_HEADER),
               "data_bytes": (_data_bytes, ring_layout.RING_BROKEN_CORRUPT_HEADER),
               "progress": (_progress, None)}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_ring_words_overwritten(broker: RunningBroker, scene: Scene, corruption: str) -> None:
    corrupt, broken_code = CORRUPTIONS[corruption]
    in_flight = scene.stop_worker()
    try:
        corrupt(scene)
        if broken_code is None:  # the victim reads them while the worker is stopped
            wait_for(lambda: all(future.done() for _, future in in_flight), WAIT_S,
                     message="the victim to give up its ring")
    finally:
        scene.resume_worker()
    acked, failed = outcomes(in_flight)
    scene.acked += acked
    assert all(isinstance(error, RingError) for error in failed), failed[:2]
    if broken_code is not None:
        wait_for(lambda: scene.observer.broken == broken_code, WAIT_S,
                 message=f"the worker to mark the ring broken ({broken_code})")
        wait_for(lambda: f"released ring {scene.ring}" in broker.log(), WAIT_S,
                 message="the worker to release the ring with its reason")
        assert f"released ring {scene.ring}" in broker.log()
        if failed:
            assert "marked our ring" in str(failed[0]) and "broken" in str(failed[0])
    else:  # the producer saw garbage in the worker's words and gave the ring up
        assert len(failed) == RECORDS
        assert "acknowledged frame" in str(failed[0]), failed[0]
    wait_for(lambda: not os.path.exists(f"/dev/shm/{scene.ring.lstrip('/')}"), WAIT_S,
             message="the ring to be unlinked")
    scene.after()  # the victim goes on with a new ring, the other one never stopped
    assert worker(broker)["pid"] == scene.worker_pid and worker(broker)["restarts"] == 0
    scene.check()


# -- garbage met by a restarted worker -------------------------------------------------------------
@pytest.mark.parametrize("field", ["magic", "doorbell"])
def test_restarted_worker_meets_a_corrupt_ring(broker: RunningBroker, scene: Scene,
                                               field: str) -> None:
    in_flight = scene.stop_worker()
    if field == "magic":
        poke(scene.ring, ring_layout.MAGIC_POSITION, b"NOTARING")
    else:  # a path (not an abstract address), longer than a Unix address holds
        poke(scene.ring, ring_layout.DOORBELL_LENGTH_POSITION, u64(120))
        poke(scene.ring, ring_layout.DOORBELL_ADDRESS_POSITION, b"/tmp/x" * 20)
        poke(scene.ring, ring_layout.PRODUCER_WAITING_POSITION, u64(1))
    os.kill(scene.worker_pid, signal.SIGKILL)
    started = time.monotonic()
    wait_for(lambda: worker(broker)["state"] == "running"
             and worker(broker)["pid"] not in (None, scene.worker_pid),
             RESTART_WAIT_S, message="the worker restarted")
    acked, failed = outcomes(in_flight)
    assert not acked and len(failed) == RECORDS
    assert all(isinstance(error, RingError) and "cannot take our ring back" in str(error)
               for error in failed), failed[:2]
    wait_for(lambda: not os.path.exists(f"/dev/shm/{scene.ring.lstrip('/')}"),
             (RING_SCAN_MS + RING_UNUSABLE_GRACE_MS) / 1000 + WAIT_S,
             message="the unusable ring to be removed")
    print(f"unusable ring removed {time.monotonic() - started:.1f} s after the kill")
    assert f"cannot attach ring {scene.ring}" in broker.log()
    scene.after()  # the victim's re-attach failed: its next records go to a new ring
    assert worker(broker)["restarts"] == 1
    scene.check()
