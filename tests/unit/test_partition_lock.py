"""The partition lock a worker takes at boot (PartitionWorker._lock_partition): one worker per
partition, whatever the supervisor believes; a worker of an old broker that still holds it
makes the new one wait, then fail to boot with a message saying why."""

from __future__ import annotations

import fcntl
import os
import threading

import pytest

from shmbroker.partition import worker as worker_module
from shmbroker.partition.paths import PartitionPaths
from shmbroker.partition.worker import PartitionWorker


@pytest.fixture
def partition(tmp_path):
    paths = PartitionPaths(tmp_path, "locked", 3, 0)
    paths.lock_path.parent.mkdir(parents=True)
    worker = PartitionWorker(paths)
    yield paths, worker
    if worker._lock_fd is not None:
        os.close(worker._lock_fd)
    worker._signal_r.close()
    worker._signal_w.close()
    worker.selector.close()


def _hold(path) -> int:
    """The lock, as another worker holds it (its own open file description)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o640)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def test_a_free_partition_is_locked_and_names_its_worker(partition):
    paths, worker = partition
    worker._lock_partition()
    assert paths.lock_path.read_text() == f"{os.getpid()}\n"
    with pytest.raises(BlockingIOError):  # and nobody else gets it now
        _hold(paths.lock_path)


def test_a_held_lock_fails_the_boot_after_the_wait(partition, monkeypatch):
    paths, worker = partition
    monkeypatch.setattr(worker_module, "PARTITION_LOCK_WAIT_S", 0.2)
    holder = _hold(paths.lock_path)
    try:
        with pytest.raises(RuntimeError, match="is locked by another worker .* is an old broker "
                                               "still running"):
            worker._lock_partition()
        assert worker._lock_fd is None
    finally:
        os.close(holder)


def test_a_lock_released_during_the_wait_is_taken(partition, monkeypatch):
    paths, worker = partition
    monkeypatch.setattr(worker_module, "PARTITION_LOCK_WAIT_S", 30.0)
    holder = _hold(paths.lock_path)
    released = threading.Event()

    def release_soon() -> None:
        released.wait(30)
        os.close(holder)  # the old worker exits

    releaser = threading.Thread(target=release_soon)
    releaser.start()
    real_sleep = worker_module.time.sleep

    def sleep_then_release(seconds: float) -> None:  # the first retry's pause: let it go
        released.set()
        releaser.join(30)
        real_sleep(seconds)

    monkeypatch.setattr(worker_module.time, "sleep", sleep_then_release)
    worker._lock_partition()
    assert worker._lock_fd is not None and not releaser.is_alive()
    assert paths.lock_path.read_text() == f"{os.getpid()}\n"
