"""A producer process SIGKILLed in the middle of a ring frame, with a real broker.

One producer process per way of being cut (``torn_frame_producer.py``; the modes are described
in ``tests/unit/test_ring_torn_frame.py``), all on one partition: each creates and attaches its
ring, writes a few good batches, writes part of one more frame and SIGKILLs itself.  With the worker
running all along, and with the whole broker SIGKILLed before the producers write (the frames
are then found in /dev/shm by the restarted workers):

* every good batch is stored exactly once, in its producer's order, at the offset its ack
  slot holds (read back CRC-checked; the partition's offsets dense from 0);
* nothing of the cut frame is stored; for a frame never published nothing of it is
  acknowledged (the ring's progress stops before it), for a published bad one only an error
  number is, or the ring is marked broken;
* the workers unlink the rings (their producers are dead) and none of them crashed.

Randomized: the seed is printed (``SHMB_TORN_SEED=<n>`` replays it).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from broker_helpers import RunningBroker, end_process, wait_for
from integration.produce_helpers import read_partitions

from shmbroker.format import ring_layout
from shmbroker.partition.paths import PartitionPaths
from shmbroker.partition.worker import RESULT_CORRUPT
from shmbroker.shm import names
from shmbroker.shm.ring import RingReader

pytestmark = [pytest.mark.integration, pytest.mark.fault]

TOPIC = "torn"
MODES = ("unpublished", "head_seq", "torn_head", "bad_length", "flipped")
SCRIPT = Path(__file__).with_name("torn_frame_producer.py")
PROCESS_TIMEOUT_S = 30.0
RELEASE_TIMEOUT_S = 15.0  # a worker checks a ring's producer is alive once a second
GOOD_BATCHES_MAX = 6
VALUE_BYTES_MAX = 4000  # every producer's frames fit in its ring's first lap


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[RunningBroker]:
    with RunningBroker(tmp_path / "data") as running:
        yield running


class TornProducer:
    def __init__(self, broker: RunningBroker, topic_id: int, mode: str,
                 rng: random.Random) -> None:
        self.mode = mode
        self.ring_id = names.new_ring_id()
        paths = PartitionPaths(broker.data_dir.resolve(), TOPIC, topic_id, 0)
        self.ring_name = paths.ring_name(self.ring_id)
        self.good = [[f"{mode}-{batch}-{index}-" + "g" * rng.randrange(VALUE_BYTES_MAX)
                      for index in range(rng.randint(1, 3))]
                     for batch in range(rng.randint(1, GOOD_BATCHES_MAX))]
        self.torn = [f"torn-{mode}-{index}-" + "t" * rng.randrange(VALUE_BYTES_MAX)
                     for index in range(rng.randint(1, 3))]
        spec = {"ring_name": self.ring_name, "ring_id": self.ring_id,
                "socket": os.fspath(paths.socket_path), "good": self.good, "torn": self.torn,
                "mode": mode, "cut_fraction": rng.random()}
        self.process = subprocess.Popen([sys.executable, os.fspath(SCRIPT), json.dumps(spec)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.observer: RingReader | None = None

    def wait_ready(self) -> None:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        assert line == b"ready\n", f"{self.mode}: the producer said {line!r}"
        # our own read-only look at the ring: it stays mapped after the worker unlinks it
        self.observer = RingReader.attach(self.ring_name)

    def go_and_die(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(b"go\n")
        self.process.stdin.close()
        code = self.process.wait(PROCESS_TIMEOUT_S)
        assert code == -signal.SIGKILL, f"{self.mode}: exited with {code}, not killed"

    def end(self) -> None:
        end_process(self.process, PROCESS_TIMEOUT_S)
        if self.observer is not None:
            self.observer.close()
        names.unlink(self.ring_name)


@pytest.mark.parametrize("restart", [False, True], ids=["live-worker", "restarted-broker"])
def test_producer_killed_mid_frame(broker: RunningBroker, restart: bool) -> None:
    seed = int(os.environ.get("SHMB_TORN_SEED", random.randrange(1 << 32)))
    print(f"seed {seed} (replay with SHMB_TORN_SEED={seed})")
    rng = random.Random(seed)
    with broker.admin() as admin:
        topic_id = admin.create_topic(TOPIC, partitions=1)["topic_id"]
    broker.wait_ready()
    workers_before = broker.worker_pids()
    producers = [TornProducer(broker, topic_id, mode, rng) for mode in MODES]
    try:
        for producer in producers:
            producer.wait_ready()
        if restart:
            broker.kill()  # every worker: the frames wait in the rings for the next ones
        for producer in producers:
            producer.go_and_die()
        if restart:
            broker.start()
        prefix = names.shm_prefix(broker.data_dir)
        wait_for(lambda: not names.list_rings(prefix, topic_id, 0), RELEASE_TIMEOUT_S,
                 message="the worker to unlink the dead producers' rings")
        stored = read_partitions(broker.data_dir, TOPIC, [0])[0]
        assert [record.offset for record in stored] == list(range(len(stored)))
        assert not [r.value for r in stored if (r.value or b"").startswith(b"torn-")][:3]
        assert len(stored) == sum(len(batch) for p in producers for batch in p.good)
        for producer in producers:
            observer = producer.observer
            assert observer is not None
            mine = [record for record in stored
                    if (record.value or b"").startswith(producer.mode.encode() + b"-")]
            want = [value.encode() for batch in producer.good for value in batch]
            assert [record.value for record in mine] == want, producer.mode
            frames_good = len(producer.good)
            tail, tail_seq = observer.progress
            if producer.mode in ("unpublished", "head_seq"):
                # released as any dead producer's ring, nothing of the cut frame acknowledged
                assert observer.broken == ring_layout.RING_BROKEN_RELEASED
                assert tail_seq == frames_good
            else:
                # read as frames and refused by the log's checks (error numbers only), or the
                # ring was marked broken at the first impossible one
                assert tail_seq >= frames_good
                assert all(observer.slot(seq) == (seq, RESULT_CORRUPT)
                           for seq in range(frames_good, tail_seq))
                if observer.broken != ring_layout.RING_BROKEN_CORRUPT_FRAME:
                    assert observer.broken == ring_layout.RING_BROKEN_RELEASED
                    assert producer.mode in ("bad_length", "flipped"), producer.mode
                    assert tail == observer.head and tail_seq > frames_good
            assert observer.producer_closed is False  # killed: nobody said closed
            # every good frame's slot holds the offset its records are stored at
            records = iter(mine)
            for seq, batch in enumerate(producer.good):
                first = next(records)
                assert observer.slot(seq) == (seq, first.offset), producer.mode
                for _ in batch[1:]:
                    next(records)
        if not restart:
            assert broker.worker_pids() == workers_before, "a worker was restarted"
        log = broker.log()
        broken = [p.ring_name for p in producers if p.observer
                  and p.observer.broken == ring_layout.RING_BROKEN_CORRUPT_FRAME]
        for name in broken:  # a broken ring is released with the reason in the log
            assert f"released ring {name}" in log
    finally:
        for producer in producers:
            producer.end()
