"""What a SIGKILLed broker leaves in /dev/shm is reused or removed by the next start.

1. The whole broker and its producer processes SIGKILLed at once, with leftovers a killed broker
   can leave besides (names of a deleted topic, of a partition beyond the topic's count, a name
   of no known shape, a ring whose producer died while creating it, so its header has no magic).
   The next start reuses the live partitions' control blocks (their generation goes on), drains
   and unlinks the rings of the dead producers, and removes everything else; once it runs only
   the control blocks of its partitions remain, and after a clean stop nothing.
2. A producer killed after creating its ring and before attaching it (the worker never heard
   of it): the worker finds it in /dev/shm, sees its producer is dead and unlinks it.
3. The data dir deleted while the names remain (the dead producer's ring still holds records it
   wrote while no worker ran), and a broker started at the same path: it has no topics, so it
   removes every name of the path, and a new topic that gets the same topic id starts empty
   (the old ring's records do not leak into it) with a fresh control block.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import posix_ipc
import pytest
from broker_helpers import RunningBroker, end_process, wait_for
from integration.produce_helpers import read_partitions

from shmbroker import Admin, Consumer, TopicPartition
from shmbroker.format import ring_layout
from shmbroker.partition.worker import RING_SCAN_MS, RING_UNUSABLE_GRACE_MS
from shmbroker.shm import names
from shmbroker.shm.control_block import ControlBlock

pytestmark = [pytest.mark.integration, pytest.mark.fault]

PARTITIONS = 2
RECORDS = 50  # per producer process and command
PROCESS_TIMEOUT_S = 30.0
CLEAN_TIMEOUT_S = (RING_SCAN_MS + RING_UNUSABLE_GRACE_MS) / 1000 + 10.0

# A producer process that obeys lines on stdin: "flush <prefix>" sends RECORDS records and waits
# for their acks, "nowait <prefix>" only writes them into its rings; it answers "done".
PRODUCER_SCRIPT = textwrap.dedent("""
    import json, sys
    from shmbroker import Producer
    spec = json.loads(sys.argv[1])
    producer = Producer(spec["data_dir"], linger_ms=0, ring_bytes=256 * 1024,
                        ring_ack_slots=64, max_block_ms=1000)
    for line in sys.stdin:
        command, prefix = line.split()
        futures = [producer.send(spec["topic"], b"%s-%d" % (prefix.encode(), n),
                                 partition=n % spec["partitions"])
                   for n in range(spec["records"])]
        if command == "flush":
            for future in futures:
                future.result(30)
        print("done", flush=True)
""")


class ProducerProcess:
    def __init__(self, data_dir: Path, topic: str) -> None:
        spec = {"data_dir": os.fspath(data_dir), "topic": topic, "partitions": PARTITIONS,
                "records": RECORDS}
        self.process = subprocess.Popen([sys.executable, "-c", PRODUCER_SCRIPT,
                                         json.dumps(spec)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def command(self, line: str) -> None:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(line.encode() + b"\n")
        self.process.stdin.flush()
        answer = self.process.stdout.readline()
        assert answer == b"done\n", f"the producer answered {answer!r} to {line!r}"

    def kill(self) -> None:
        end_process(self.process, PROCESS_TIMEOUT_S)


def plant(name: str, size: int) -> None:
    """Create shm object ``name`` of ``size`` zero bytes (as a process killed early leaves)."""
    posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=size).close_fd()


def generation(name: str) -> int:
    block = ControlBlock.open(name)
    try:
        return int(block.generation)
    finally:
        block.close()


def end_offsets(data_dir: Path, topic: str) -> list[int]:
    wanted = [TopicPartition(topic, p) for p in range(PARTITIONS)]
    with Consumer(data_dir) as consumer:
        ends = consumer.end_offsets(wanted)
    return [ends[tp] for tp in wanted]


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[RunningBroker]:
    with RunningBroker(tmp_path / "data") as running:
        yield running


def test_killed_broker_leftovers_are_reused_or_removed(broker: RunningBroker) -> None:
    prefix = names.shm_prefix(broker.data_dir)
    with Admin(broker.data_dir) as admin:
        topic_id = admin.create_topic("live", partitions=PARTITIONS)["topic_id"]
        doomed = admin.create_topic("doomed", partitions=1)["topic_id"]
        admin.delete_topic("doomed")
    broker.wait_ready()
    controls = [names.control_block_name(prefix, topic_id, p) for p in range(PARTITIONS)]
    producers = [ProducerProcess(broker.data_dir, "live") for _ in range(2)]
    try:
        for index, producer in enumerate(producers):
            producer.command(f"flush p{index}")
        rings = set(names.list_names(prefix)) - set(controls)
        assert len(rings) == 2 * PARTITIONS, rings  # one per producer and partition
        # leftovers a killed broker may leave besides
        planted = [names.control_block_name(prefix, doomed, 0),  # a deleted topic's
                   names.ring_name(prefix, doomed, 0, names.new_ring_id()),
                   names.control_block_name(prefix, topic_id, PARTITIONS + 3),  # no such
                   f"/{prefix}.junk"]
        for name in planted:
            plant(name, ring_layout.CONTROL_BLOCK_BYTES)
        half_made = names.ring_name(prefix, topic_id, 0, names.new_ring_id())  # no magic
        plant(half_made, ring_layout.ring_object_bytes(64 * 1024, 16))

        broker.kill()
        for producer in producers:
            producer.kill()
        left = set(names.list_names(prefix))
        assert left == {*controls, *rings, *planted, half_made}, left

        broker.start()
        now = set(names.list_names(prefix))
        assert not now & set(planted), f"names of no live partition kept: {now & set(planted)}"
        started = time.monotonic()
        wait_for(lambda: set(names.list_names(prefix)) == set(controls), CLEAN_TIMEOUT_S,
                 message="the workers to release the dead producers' rings and remove the "
                         "half-made one")
        print(f"leftover rings gone {time.monotonic() - started:.1f} s after the start")
        # the control blocks were reused: each worker start counts in them
        assert [generation(name) for name in controls] == [2] * PARTITIONS
        log = broker.log()
        assert f"cannot attach ring {half_made}" in log
        assert f"removing ring {half_made}" in log
        # what the dead producers had acknowledged is there, once
        stored = read_partitions(broker.data_dir, "live", range(PARTITIONS))
        values = sorted(record.value or b"" for records in stored.values() for record in records)
        assert values == sorted(b"p%d-%d" % (index, n) for index in range(2)
                                for n in range(RECORDS))
    finally:
        for producer in producers:
            producer.kill()

    assert broker.stop() == 0
    assert names.list_names(prefix) == [], "a clean stop leaves names behind"


def test_data_dir_deleted_while_names_remain(broker: RunningBroker) -> None:
    prefix = names.shm_prefix(broker.data_dir)
    with Admin(broker.data_dir) as admin:
        topic_id = admin.create_topic("old", partitions=PARTITIONS)["topic_id"]
    broker.wait_ready()
    producer = ProducerProcess(broker.data_dir, "old")
    try:
        producer.command("flush acked")
        broker.kill()
        producer.command("nowait unread")  # written into its rings; no worker reads them
    finally:
        producer.kill()
    old_names = set(names.list_names(prefix))
    assert len(old_names) == PARTITIONS * 2, old_names  # control blocks and rings

    shutil.rmtree(broker.data_dir)
    broker.start()
    assert names.list_names(prefix) == [], "names of the deleted data dir were kept"
    with Admin(broker.data_dir) as admin:
        fresh = admin.create_topic("fresh", partitions=PARTITIONS)["topic_id"]
    assert fresh == topic_id  # the same names as the old topic's: they must not be reused
    broker.wait_ready()
    assert [generation(names.control_block_name(prefix, fresh, p))
            for p in range(PARTITIONS)] == [1] * PARTITIONS
    assert end_offsets(broker.data_dir, "fresh") == [0] * PARTITIONS
    assert set(names.list_names(prefix)) == {names.control_block_name(prefix, fresh, p)
                                             for p in range(PARTITIONS)}


# A process that creates a ring for partition 0 of the topic and never attaches it.
CREATOR_SCRIPT = textwrap.dedent("""
    import sys, time
    from shmbroker.shm.ring import RingWriter
    RingWriter.create(sys.argv[1], data_bytes=64 * 1024, ack_slots=16,
                      producer_id=int(sys.argv[2]))
    print("ready", flush=True)
    time.sleep(120)
""")


def test_ring_of_a_producer_killed_before_attaching(broker: RunningBroker) -> None:
    prefix = names.shm_prefix(broker.data_dir)
    with Admin(broker.data_dir) as admin:
        topic_id = admin.create_topic("unattached", partitions=1)["topic_id"]
    broker.wait_ready()
    ring_id = names.new_ring_id()
    name = names.ring_name(prefix, topic_id, 0, ring_id)
    creator = subprocess.Popen([sys.executable, "-c", CREATOR_SCRIPT, name, str(ring_id)],
                               stdout=subprocess.PIPE)
    try:
        assert creator.stdout is not None
        assert creator.stdout.readline() == b"ready\n"
    finally:
        creator.kill()
        creator.wait(PROCESS_TIMEOUT_S)
        if creator.stdout is not None:
            creator.stdout.close()
    assert name in names.list_names(prefix)
    wait_for(lambda: name not in names.list_names(prefix), RING_SCAN_MS / 1000 + 10.0,
             message="the worker to find the unattached ring and unlink it")
