"""Standby workers (broker setting worker_standby_count): a process started ahead of need, past
Python's start and imports, takes the partition of a worker that died; another is started in
its place.  A standby that dies waiting is replaced without touching any worker; a clean stop
retires it; with worker_standby_count = 0 workers start from scratch as before."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

import psutil
import pytest
from broker_helpers import RunningBroker, wait_for
from integration.produce_helpers import check_acked, read_partitions

from shmbroker import Producer

pytestmark = [pytest.mark.integration]

TIMEOUT_S = 20.0
RECORDS = 50


def _standbys(broker: RunningBroker) -> list[int]:
    """Pids of the supervisor's children waiting as standbys (not serving a partition)."""
    workers = set(broker.worker_pids().values())
    pids = []
    for child in broker.children():
        with contextlib.suppress(psutil.Error):
            if "--standby" in child.cmdline() and child.pid not in workers and child.status() != (
                    psutil.STATUS_ZOMBIE):
                pids.append(child.pid)
    return pids


def _produce(broker: RunningBroker, topic: str, tag: str) -> list[tuple[bytes, int, int]]:
    acked = []
    with Producer(broker.data_dir, acks=1, linger_ms=0) as producer:
        futures = [(f"{tag}-{index}".encode(), producer.send(topic, f"{tag}-{index}".encode(),
                                                             partition=0))
                   for index in range(RECORDS)]
        for value, future in futures:
            meta = future.result(TIMEOUT_S)
            acked.append((value, meta.partition, meta.offset))
    return acked


def _check(broker: RunningBroker, topic: str, acked: list[tuple[bytes, int, int]]) -> None:
    records = read_partitions(broker.data_dir, topic, [0])
    assert check_acked(acked, records) == len(acked)
    assert len(records[0]) == len(acked)


def test_a_killed_worker_is_replaced_by_the_standby(broker: RunningBroker) -> None:
    with broker.admin() as admin:
        admin.create_topic("standby", partitions=1)
    broker.wait_ready()
    acked = _produce(broker, "standby", "before")
    (standby,) = wait_for(lambda: _standbys(broker) or None, TIMEOUT_S, message="a standby")
    old = broker.worker_pids()[("standby", 0)]
    os.kill(old, signal.SIGKILL)
    new = wait_for(lambda: (broker.worker_pids().get(("standby", 0)) not in (None, old)
                            and broker.worker_pids()[("standby", 0)]), TIMEOUT_S,
                   message="the replacement worker")
    assert new == standby, "the standby did not take the dead worker's partition"
    broker.wait_ready()
    acked += _produce(broker, "standby", "after")
    _check(broker, "standby", acked)
    # and a new standby waits for the next one
    (again,) = wait_for(lambda: _standbys(broker) or None, TIMEOUT_S, message="a new standby")
    assert again not in (standby, old)


def test_a_standby_that_dies_waiting_is_replaced_and_no_worker_restarts(
        broker: RunningBroker) -> None:
    with broker.admin() as admin:
        admin.create_topic("quiet", partitions=1)
    broker.wait_ready()
    (standby,) = wait_for(lambda: _standbys(broker) or None, TIMEOUT_S, message="a standby")
    process = psutil.Process(standby)
    # one that lived a while is replaced at once (a young one only at the next spawn)
    wait_for(lambda: time.time() - process.create_time() > 2.5, TIMEOUT_S,
             message="the standby to be older than HEALTHY_RUN_S")
    process.kill()
    (replacement,) = wait_for(lambda: [pid for pid in _standbys(broker) if pid != standby] or None,
                              TIMEOUT_S, message="a replacement standby")
    assert replacement != standby
    with broker.admin() as admin:
        (worker,) = admin.status()["workers"]
    assert (worker["state"], worker["restarts"]) == ("running", 0)
    assert "standby worker" in broker.log() and "SIGKILL" in broker.log()
    _check(broker, "quiet", _produce(broker, "quiet", "still"))


def test_a_clean_stop_retires_the_standby(broker: RunningBroker) -> None:
    with broker.admin() as admin:
        admin.create_topic("bye", partitions=1)
    broker.wait_ready()
    (standby,) = wait_for(lambda: _standbys(broker) or None, TIMEOUT_S, message="a standby")
    process = psutil.Process(standby)
    assert broker.stop() == 0
    wait_for(lambda: not process.is_running() or process.status() == psutil.STATUS_ZOMBIE,
             TIMEOUT_S, message="the standby to exit")


def test_without_standbys_a_worker_restarts_from_scratch(tmp_path: Path) -> None:
    broker = RunningBroker(tmp_path / "data", config_toml="worker_standby_count = 0\n").start()
    try:
        with broker.admin() as admin:
            admin.create_topic("plain", partitions=1)
        broker.wait_ready()
        acked = _produce(broker, "plain", "before")
        assert _standbys(broker) == []
        old = broker.worker_pids()[("plain", 0)]
        os.kill(old, signal.SIGKILL)
        wait_for(lambda: broker.worker_pids().get(("plain", 0)) not in (None, old), TIMEOUT_S,
                 message="the replacement worker")
        broker.wait_ready()
        assert _standbys(broker) == []
        acked += _produce(broker, "plain", "after")
        _check(broker, "plain", acked)
    finally:
        broker.stop()
