"""A full disk under a running broker: its data dir is a small tmpfs that the test fills.

Produce until the disk is full: the producer's future fails with BrokerStorageFullError saying
so; every record acknowledged before is still readable at its offset; commits and topic creation
fail with clear errors while full; a worker killed while the disk is full boots again (it is not
given up); once space is freed the next produce, commit and topic creation succeed with nothing
restarted; and after a broker restart every acknowledged record is still there.

Mounting needs root (CAP_SYS_ADMIN): without it the test skips, and
tests/unit/test_storage_enospc.py covers the same paths with injected ENOSPC.  The fixture
always unmounts (lazily, if something still holds the mount).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from broker_helpers import RunningBroker, wait_for
from integration.produce_helpers import raw_connect, raw_request, read_partitions

from shmbroker import Producer
from shmbroker.errors import BrokerStorageError, BrokerStorageFullError
from shmbroker.format import record_batch
from shmbroker.protocol.messages import ApiKey

pytestmark = [pytest.mark.integration, pytest.mark.fault]

FS_BYTES = 2 * 1024 * 1024
ROOM_BYTES = 192 * 1024  # left free after the ballast: what the records fill
VALUE_BYTES = 1000
SENDS_MAX = 2000  # a bound on the produce loop: the room holds about 190 records
LOOP_S_MAX = 30.0
COMMITS_MAX = 400  # offsets.log's last page holds about 90 commits
TIMEOUT_S = 10.0


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A fresh tmpfs of FS_BYTES mounted at tmp_path/data; skips where mounting is refused."""
    mount_point = tmp_path / "data"
    mount_point.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CAP_SYS_ADMIN); "
                    "tests/unit/test_storage_enospc.py injects ENOSPC instead")
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={FS_BYTES},mode=0750", "tmpfs",
                        os.fspath(mount_point)], check=True, capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as error:
        pytest.skip(f"cannot mount a tmpfs here ({error}); "
                    "tests/unit/test_storage_enospc.py injects ENOSPC instead")
    try:
        yield mount_point
    finally:
        unmounted = subprocess.run(["umount", os.fspath(mount_point)], capture_output=True,
                                   timeout=30)
        if unmounted.returncode != 0:
            subprocess.run(["umount", "-l", os.fspath(mount_point)], capture_output=True,
                           timeout=30)


def _free_bytes(path: Path) -> int:
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


def _fill(ballast: Path, leave_bytes: int) -> None:
    """Write ``ballast`` until ``leave_bytes`` are free."""
    size = _free_bytes(ballast.parent) - leave_bytes
    assert size > 0, f"only {_free_bytes(ballast.parent)} bytes free"
    with open(ballast, "wb") as file:
        file.write(bytes(size))


def _worker(broker: RunningBroker, topic: str = "t") -> dict:
    with broker.admin() as admin:
        [worker] = [w for w in admin.status()["workers"] if w["topic"] == topic]
    return worker


def _produce_until_full(producer: Producer, acked: dict[int, bytes]) -> BaseException:
    """Send one record at a time until one fails; record the acknowledged ones."""
    deadline = time.monotonic() + LOOP_S_MAX
    for number in range(SENDS_MAX):
        assert time.monotonic() < deadline, f"{len(acked)} records in {LOOP_S_MAX} s, no error"
        value = number.to_bytes(4, "big") * (VALUE_BYTES // 4)
        future = producer.send("t", value, partition=0)
        try:
            metadata = future.result(TIMEOUT_S)
        except BrokerStorageError as error:
            return error
        acked[metadata.offset] = value
    raise AssertionError(f"{SENDS_MAX} records of {VALUE_BYTES} bytes fit a {FS_BYTES}-byte disk")


def _check_acked(broker: RunningBroker, acked: dict[int, bytes]) -> None:
    records = read_partitions(broker.data_dir, "t", [0])[0]
    by_offset = {record.offset: record.value for record in records}
    missing = [offset for offset in acked if by_offset.get(offset) != acked[offset]]
    assert not missing, f"{len(missing)} acknowledged records lost or changed, first {missing[0]}"
    assert len(by_offset) == len(acked), "records stored that were never acknowledged"


def _socket_produce(broker: RunningBroker, value: bytes) -> dict:
    """The produce fallback over the worker's socket (no ring): the response body."""
    with broker.admin() as admin:
        [meta] = admin.metadata(["t"])
    sock = raw_connect(meta["partitions"][0]["socket"])
    try:
        body, _, _ = raw_request(sock, ApiKey.PRODUCE, {"acks": 1},
                                 bytes(record_batch.encode_batch([value])))
    finally:
        sock.close()
    return body


def _commit(broker: RunningBroker, offset: int) -> None:
    with broker.admin() as admin:
        admin.reset_consumer_group_offsets("g", "t", to_offset=offset, execute=True)


def test_full_disk_refuses_cleanly_keeps_everything_and_recovers_by_itself(small_fs: Path):
    ballast = small_fs / "ballast"
    broker = RunningBroker(small_fs)
    try:
        broker.start()
        with broker.admin() as admin:
            admin.create_topic("t", partitions=1)
        _commit(broker, 0)
        _fill(ballast, ROOM_BYTES)
        acked: dict[int, bytes] = {}
        with Producer(small_fs, acks=1, linger_ms=0) as producer:
            error = _produce_until_full(producer, acked)
            assert isinstance(error, BrokerStorageFullError), repr(error)
            assert "no space left on device" in str(error) and "t/0" in str(error)
            assert len(acked) > ROOM_BYTES // (2 * VALUE_BYTES)
            log_end = max(acked) + 1

            # While full: fetches of stored data work; the partition says why it refuses.
            _check_acked(broker, acked)
            assert "t/0: cannot append: No space left on device" in broker.log()
            assert _worker(broker)["storage_full"] is True
            status = subprocess.run(
                [sys.executable, "-m", "shmbroker.cli", "status", "--data-dir", str(small_fs)],
                capture_output=True, text=True, timeout=TIMEOUT_S, check=True).stdout
            assert "running, storage full: appends refused until space is freed" in status
            with pytest.raises(BrokerStorageFullError, match="no space left on device"):
                producer.send("t", b"x" * VALUE_BYTES, partition=0).result(TIMEOUT_S)
            refused = _socket_produce(broker, b"x" * VALUE_BYTES)
            assert refused["error"] == "STORAGE_FULL", refused
            assert refused["message"].startswith(
                "partition t/0: cannot append: No space left on device (")
            assert "00000000000000000000.log) [ENOSPC]" in refused["message"]

            # Topic creation: a clear error, the old topics intact.
            with broker.admin() as admin:
                with pytest.raises(BrokerStorageFullError,
                                   match="topic metadata .*No space left on device"):
                    admin.create_topic("t2", partitions=1)
                assert admin.list_topics() == ["t"]

            # Commits: accepted until offsets.log's last page is full, then a clear error.
            for commit in range(1, COMMITS_MAX):
                try:
                    _commit(broker, min(commit, log_end))
                except BrokerStorageError as refused:
                    assert "ENOSPC (No space left on device)" in str(refused)
                    assert isinstance(refused, BrokerStorageFullError), type(refused)
                    break
            else:
                raise AssertionError(f"{COMMITS_MAX} commits on a full disk")
            last_commit = min(commit - 1, log_end)
            with broker.admin() as admin:
                assert admin.list_consumer_group_offsets("g") == {("t", 0): last_commit}

            # A worker that dies while the disk is full boots again (not given up).
            old = _worker(broker)
            os.kill(old["pid"], signal.SIGKILL)
            wait_for(lambda: (w := _worker(broker))["pid"] not in (None, old["pid"])
                     and w["state"] == "running", 20.0, message="the worker's restart")
            # (its boot removed a stale checkpoint: a page may be free again)
            error = _produce_until_full(producer, acked)
            assert isinstance(error, BrokerStorageFullError), repr(error)
            assert _worker(broker)["state"] == "running"
            log_end = max(acked) + 1
            _check_acked(broker, acked)

            # Space comes back: everything works again at once, nothing restarted.
            pid = _worker(broker)["pid"]
            ballast.unlink()
            value = b"after" * 200
            metadata = producer.send("t", value, partition=0).result(TIMEOUT_S)
            assert metadata.offset == log_end
            acked[metadata.offset] = value
            assert _worker(broker)["pid"] == pid
            assert _worker(broker)["storage_full"] is False
        _commit(broker, log_end)
        with broker.admin() as admin:
            admin.create_topic("t2", partitions=1)
            assert admin.list_consumer_group_offsets("g") == {("t", 0): log_end}
        _check_acked(broker, acked)

        broker.stop()
        broker.start()
        _check_acked(broker, acked)
        with broker.admin() as admin:
            assert sorted(admin.list_topics()) == ["t", "t2"]
            assert admin.list_consumer_group_offsets("g") == {("t", 0): log_end}
    finally:
        with contextlib.suppress(Exception):
            broker.stop()
        broker.cleanup_shared_memory()
