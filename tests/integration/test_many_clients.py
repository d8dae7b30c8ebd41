"""Many clients: producers that come and go by the thousand, the ring limit, killed producers.

1. 1,000 producers, each ``Producer(...)`` -> send one record -> flush -> close, spread over
   client processes: every record is acknowledged and stored at its offset, and the worker's
   (and the supervisor's) open fds, memory mappings, RSS and the /dev/shm names come back to
   where they were after a warm-up (nothing leaks per client).
2. ``rings_per_worker_max`` live rings on one worker: one more producer gets a clear RingError
   with ``transport="shm"`` (its ring is removed, not left behind) and falls back to the socket
   with ``transport="auto"``; closing rings frees room for new ones.
3. 1,000 producer processes SIGKILLed without closing (4 rounds of 250, forked from one
   process that paid the imports): the worker reclaims every ring (their connections close, the
   liveness check finds the process gone) and its fds and mappings come back.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from broker_helpers import RunningBroker, wait_for
from integration.produce_helpers import check_acked, read_partitions

from shmbroker import Producer, limits
from shmbroker.client.connection import Connection
from shmbroker.errors import RingError
from shmbroker.partition.paths import PartitionPaths
from shmbroker.protocol.messages import ApiKey
from shmbroker.shm import names
from shmbroker.shm.ring import RingWriter

pytestmark = [pytest.mark.integration]

TOPIC = "many"
CLIENTS = 1000
CLIENT_PROCESSES = 4
WARM_UP_CLIENTS = 50
LOOP_TIME_S_MAX = 15.0  # what the loop may take on the development box (it takes ~3-6 s)
PROCESS_TIMEOUT_S = 60.0
RELEASE_TIMEOUT_S = 15.0
FDS_SLACK = 3  # a segment roll, a checkpoint being written
MAPS_SLACK = 4
RSS_GROWTH_BYTES_MAX = 8 * limits.MIB
KILLED_PER_ROUND = 250
KILL_ROUNDS = 4
RING_BYTES = 64 * 1024
RINGS_PER_CONNECTION = 16  # what one connection may attach (rings_per_connection_max)

# One client process: ``iterations`` producers one after the other, each sends one record to
# partition 0, flushes and closes; the acks go to ``out`` as JSON [[value, partition, offset]].
CLIENT_SCRIPT = textwrap.dedent("""
    import json, sys, time
    from shmbroker import Producer
    spec = json.loads(sys.argv[1])
    acked = []
    deadline = time.monotonic() + spec["time_s_max"]
    for n in range(spec["iterations"]):
        if time.monotonic() > deadline:
            break
        value = b"%s-%d" % (spec["name"].encode(), n)
        producer = Producer(spec["data_dir"], linger_ms=0, ring_bytes=spec["ring_bytes"],
                            ring_ack_slots=16)
        future = producer.send(spec["topic"], value, partition=0)
        producer.flush(30)
        meta = future.result(0)
        producer.close()
        acked.append([value.decode(), meta.partition, meta.offset])
    with open(spec["out"], "w") as file:
        json.dump(acked, file)
""")

# Forks ``count`` producer processes (imports paid once); each sends and flushes one record,
# says "ready <pid>" and sleeps until it is killed.  The forker reaps them and exits when its
# stdin closes.
FORKER_SCRIPT = textwrap.dedent("""
    import json, os, signal, sys, time
    from shmbroker import Producer
    spec = json.loads(sys.argv[1])
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the killed children
    for n in range(spec["count"]):
        pid = os.fork()
        if pid == 0:
            producer = Producer(spec["data_dir"], linger_ms=0, ring_bytes=spec["ring_bytes"],
                                ring_ack_slots=16)
            producer.send(spec["topic"], b"killed-%d-%d" % (spec["round"], n),
                          partition=0).result(30)
            os.write(1, b"ready %d\\n" % os.getpid())  # one write: children share the pipe
            while True:
                time.sleep(60)
    sys.stdin.read()
""")


def usage(pid: int) -> dict[str, int]:
    process = psutil.Process(pid)
    return {"fds": process.num_fds(), "maps": len(process.memory_maps(grouped=False)),
            "rss": process.memory_info().rss}


def shm_names(broker: RunningBroker) -> list[str]:
    return names.list_names(names.shm_prefix(broker.data_dir))


def run_clients(broker: RunningBroker, tmp_path: Path, name: str, count: int,
                processes: int) -> list[tuple[bytes, int, int]]:
    """``count`` producers over ``processes`` client processes; the acked records."""
    started = []
    for index in range(processes):
        out = tmp_path / f"{name}-{index}.json"
        spec = {"data_dir": os.fspath(broker.data_dir), "topic": TOPIC, "name": f"{name}{index}",
                "iterations": count // processes, "out": os.fspath(out),
                "time_s_max": LOOP_TIME_S_MAX, "ring_bytes": RING_BYTES}
        started.append((subprocess.Popen([sys.executable, "-c", CLIENT_SCRIPT,
                                          json.dumps(spec)]), out))
    acked = []
    for process, out in started:
        assert process.wait(PROCESS_TIMEOUT_S) == 0
        acked += [(value.encode(), partition, offset)
                  for value, partition, offset in json.loads(out.read_text())]
    return acked


@pytest.fixture
def broker(tmp_path: Path) -> Any:
    with RunningBroker(tmp_path / "data") as running:
        with running.admin() as admin:
            admin.create_topic(TOPIC, partitions=1)
        running.wait_ready()
        yield running


def test_thousand_producers_come_and_go(broker: RunningBroker, tmp_path: Path) -> None:
    worker_pid = broker.worker_pids()[(TOPIC, 0)]
    control_blocks = shm_names(broker)
    run_clients(broker, tmp_path, "warm", WARM_UP_CLIENTS, 1)
    wait_for(lambda: shm_names(broker) == control_blocks, RELEASE_TIMEOUT_S,
             message="the warm-up producers' rings released")
    before = usage(worker_pid)
    supervisor_before = usage(broker.pid)

    started = time.monotonic()
    acked = run_clients(broker, tmp_path, "client", CLIENTS, CLIENT_PROCESSES)
    elapsed = time.monotonic() - started
    print(f"{len(acked)} producers (open, send, flush, close) in {elapsed:.1f} s over "
          f"{CLIENT_PROCESSES} processes; worker before {before}")
    assert len(acked) == CLIENTS, f"only {len(acked)} of {CLIENTS} in {LOOP_TIME_S_MAX} s"

    wait_for(lambda: shm_names(broker) == control_blocks, RELEASE_TIMEOUT_S,
             message="every closed producer's ring released")

    def settled() -> bool:
        now = usage(worker_pid)
        return (now["fds"] <= before["fds"] + FDS_SLACK
                and now["maps"] <= before["maps"] + MAPS_SLACK)

    wait_for(settled, RELEASE_TIMEOUT_S, message=f"the worker's fds and mappings back to {before}")
    after = usage(worker_pid)
    print(f"worker after {after}; supervisor {supervisor_before} -> {usage(broker.pid)}")
    assert after["rss"] - before["rss"] <= RSS_GROWTH_BYTES_MAX, (before, after)
    supervisor_after = usage(broker.pid)
    assert supervisor_after["fds"] <= supervisor_before["fds"] + FDS_SLACK
    assert supervisor_after["rss"] - supervisor_before["rss"] <= RSS_GROWTH_BYTES_MAX
    records = read_partitions(broker.data_dir, TOPIC, [0])
    assert check_acked(acked, records) == CLIENTS
    assert len(records[0]) == CLIENTS + WARM_UP_CLIENTS


def test_rings_per_worker_max(broker: RunningBroker) -> None:
    with broker.admin() as admin:
        topic_id = admin.describe_topic(TOPIC)["topic_id"]
    paths = PartitionPaths(broker.data_dir.resolve(), TOPIC, topic_id, 0)
    writers: list[RingWriter] = []
    connections: list[Connection] = []
    try:
        for _ in range(limits.rings_per_worker_max):
            ring_id = names.new_ring_id()
            writer = RingWriter.create(paths.ring_name(ring_id), data_bytes=RING_BYTES,
                                       ack_slots=16, producer_id=ring_id)
            writers.append(writer)
            if len(writers) % RINGS_PER_CONNECTION == 1:
                connections.append(Connection(paths.socket_path, 10.0))
            connections[-1].request(ApiKey.ATTACH_RING, {"name": writer.name})
        full = set(shm_names(broker))

        # one more: a clear error with transport="shm", and its ring is not left behind
        with Producer(broker.data_dir, linger_ms=0, ring_bytes=RING_BYTES,
                      transport="shm") as refused:
            with pytest.raises(RingError, match="rings_per_worker_max"):
                refused.send(TOPIC, b"refused", partition=0)
            assert set(shm_names(broker)) == full
        # transport="auto" goes over the worker's socket instead
        with Producer(broker.data_dir, linger_ms=0, ring_bytes=RING_BYTES) as fallback:
            meta = fallback.send(TOPIC, b"over-the-socket", partition=0).result(10)
        assert set(shm_names(broker)) == full

        # closed rings are released and make room
        for writer in writers[:10]:
            writer.close()
        wait_for(lambda: len(shm_names(broker)) == len(full) - 10, RELEASE_TIMEOUT_S,
                 message="the worker to release the closed rings")
        with Producer(broker.data_dir, linger_ms=0, ring_bytes=RING_BYTES,
                      transport="shm") as admitted:
            meta_shm = admitted.send(TOPIC, b"through-a-ring", partition=0).result(10)
    finally:
        for writer in writers:
            writer.close()
        for connection in connections:
            connection.close()
    records = read_partitions(broker.data_dir, TOPIC, [0])
    assert check_acked([(b"over-the-socket", 0, meta.offset),
                        (b"through-a-ring", 0, meta_shm.offset)], records) == 2
    assert [record.value for record in records[0]] == [b"over-the-socket", b"through-a-ring"]
    wait_for(lambda: len(shm_names(broker)) == 1, RELEASE_TIMEOUT_S,
             message="every ring released")


def test_killed_producers_rings_are_reclaimed(broker: RunningBroker) -> None:
    worker_pid = broker.worker_pids()[(TOPIC, 0)]
    control_blocks = shm_names(broker)
    before = None
    for round_number in range(KILL_ROUNDS):
        spec = {"data_dir": os.fspath(broker.data_dir), "topic": TOPIC,
                "count": KILLED_PER_ROUND, "ring_bytes": RING_BYTES, "round": round_number}
        forker = subprocess.Popen([sys.executable, "-c", FORKER_SCRIPT, json.dumps(spec)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        children: list[int] = []
        try:
            assert forker.stdout is not None
            deadline = time.monotonic() + PROCESS_TIMEOUT_S
            while len(children) < KILLED_PER_ROUND:
                assert time.monotonic() < deadline, f"{len(children)} producers ready"
                line = forker.stdout.readline()
                assert line.startswith(b"ready "), line
                children.append(int(line.split()[1]))
            assert len(shm_names(broker)) == len(control_blocks) + KILLED_PER_ROUND
            started = time.monotonic()
            for pid in children:
                os.kill(pid, signal.SIGKILL)
            wait_for(lambda: shm_names(broker) == control_blocks, RELEASE_TIMEOUT_S,
                     message=f"the worker to reclaim {KILLED_PER_ROUND} killed producers' rings")
            print(f"round {round_number}: {KILLED_PER_ROUND} rings reclaimed "
                  f"{time.monotonic() - started:.1f} s after the kills")
        finally:
            for pid in children:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            assert forker.stdin is not None and forker.stdout is not None
            forker.stdin.close()
            forker.wait(PROCESS_TIMEOUT_S)
            forker.stdout.close()
        if before is None:  # the first round is the warm-up
            before = usage(worker_pid)
    assert before is not None
    after = usage(worker_pid)
    print(f"worker after round 0 {before}, after round {KILL_ROUNDS - 1} {after}")
    assert after["fds"] <= before["fds"] + FDS_SLACK
    assert after["maps"] <= before["maps"] + MAPS_SLACK
    assert after["rss"] - before["rss"] <= RSS_GROWTH_BYTES_MAX
    records = read_partitions(broker.data_dir, TOPIC, [0])
    assert len(records[0]) == KILLED_PER_ROUND * KILL_ROUNDS  # each acked before its kill
