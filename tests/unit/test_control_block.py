"""How a partition's worker is found and woken: its control block and doorbells."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import posix_ipc
import pytest

from shmbroker.errors import PartitionOfflineError, RingError
from shmbroker.format import ring_layout
from shmbroker.shm import control_block, names
from shmbroker.shm.control_block import ControlBlock
from shmbroker.shm.doorbell import Doorbell, ring, sender_socket


@pytest.fixture
def name(tmp_path: Path) -> Iterator[str]:
    value = names.control_block_name(names.shm_prefix(tmp_path), 2, 5)
    yield value
    names.unlink(value)


def test_create_write_and_read_elsewhere(name: str) -> None:
    block = ControlBlock.create_or_open(name)
    assert block.writable and block.state == control_block.STARTING == 0
    assert block.positions() == (0, 0, 0)
    assert (block.worker_pid, block.generation, block.worker_sleeping, block.updated_ms) == (
        0, 0, 0, 0)
    block.worker_pid = os.getpid()
    block.generation += 1
    block.state = control_block.RUNNING
    block.set_positions(10, 30, 25)
    block.worker_sleeping = 1
    before_ms = time.time_ns() // 1_000_000
    block.touch()

    reader = ControlBlock.open(name)  # read-only, as a client maps it
    assert not reader.writable
    assert (reader.worker_pid, reader.generation, reader.state) == (os.getpid(), 1, 1)
    assert reader.state_name == "running"
    assert reader.positions() == (10, 30, 25)
    assert (reader.log_start_offset, reader.log_end_offset, reader.high_watermark) == (10, 30, 25)
    assert reader.worker_sleeping == 1
    assert before_ms <= reader.updated_ms <= time.time_ns() // 1_000_000
    with pytest.raises(PermissionError, match="read-only"):
        reader.state = control_block.STOPPED
    with pytest.raises(PermissionError):
        reader.set_positions(0, 0, 0)

    block.log_end_offset = 40  # the reader sees each store at once
    block.high_watermark = 40
    block.worker_sleeping = 0
    assert reader.positions() == (10, 40, 40) and reader.worker_sleeping == 0
    assert "running" in repr(reader)
    reader.close()
    reader.close()
    block.close()


def test_reopen_keeps_the_contents(name: str) -> None:
    block = ControlBlock.create_or_open(name)
    block.generation = 7
    block.state = control_block.STOPPED
    block.set_positions(1, 3, 2)
    block.close()
    again = ControlBlock.create_or_open(name)
    assert (again.generation, again.state, again.positions()) == (7, 3, (1, 3, 2))
    writable = ControlBlock.open(name, readonly=False)
    writable.state = control_block.STOPPING
    assert again.state_name == "stopping"
    writable.close()
    again.unlink()
    again.unlink()  # already gone: ignored
    again.close()
    with pytest.raises(PartitionOfflineError, match="does not exist: is the broker running"):
        ControlBlock.open(name)


def test_garbage_is_reinitialised_by_the_worker_and_refused_by_readers(name: str) -> None:
    shared = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, size=ring_layout.CONTROL_BLOCK_BYTES)
    os.write(shared.fd, b"\x01" * 200)
    shared.close_fd()
    with pytest.raises(RingError, match="wrong magic or version"):
        ControlBlock.open(name)
    block = ControlBlock.create_or_open(name)
    assert block.positions() == (0, 0, 0) and block.generation == 0 and block.state == 0
    block.close()
    reader = ControlBlock.open(name)
    assert reader.generation == 0
    reader.close()


def test_wrong_size_is_reinitialised(name: str) -> None:
    shared = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, size=100)
    os.write(shared.fd, b"\x01" * 100)
    shared.close_fd()
    with pytest.raises(RingError, match="100 bytes"):
        ControlBlock.open(name)
    block = ControlBlock.create_or_open(name)
    assert block.positions() == (0, 0, 0) and block.worker_pid == 0
    shared = posix_ipc.SharedMemory(name)
    size = shared.size
    shared.close_fd()
    assert size == ring_layout.CONTROL_BLOCK_BYTES
    block.close()


# -- doorbells ---------------------------------------------------------------------------------

def test_doorbell_rings_and_times_out(tmp_path: Path) -> None:
    prefix = names.shm_prefix(tmp_path)
    with Doorbell.bind(Doorbell.new_name(prefix)) as doorbell:
        assert doorbell.address.startswith(b"\0" + prefix.encode() + b".db.")
        assert not doorbell.wait(0.01)
        ring(doorbell.address)
        assert doorbell.wait(10)
        assert doorbell.drain() == 0
        for _ in range(3):
            ring(doorbell.address, sender_socket())
        assert doorbell.drain() == 3
        for _ in range(10_000):  # far more than a datagram queue holds: never blocks or raises
            ring(doorbell.address)
        assert doorbell.wait(0) and doorbell.drain() == 0
        assert isinstance(doorbell.fileno(), int)


def test_ringing_nobody_is_harmless(tmp_path: Path) -> None:
    prefix = names.shm_prefix(tmp_path)
    ring(b"\0" + Doorbell.new_name(prefix).encode())
    name = Doorbell.new_name(prefix)
    Doorbell.bind(name).close()
    ring(b"\0" + name.encode())
    with pytest.raises(ValueError, match="at most 107"):
        Doorbell.bind("x" * 200)


def test_the_readable_end_is_read_whole_or_not_at_all(name: str) -> None:
    block = ControlBlock.create_or_open(name)
    reader = ControlBlock.open(name, readonly=True)
    try:
        assert reader.readable() is None  # none published yet
        block.set_readable(0, 4096, 37)
        assert reader.readable() == (0, 4096, 37)
        block.set_readable(37, 0, 37)  # a roll: the next segment, empty
        assert reader.readable() == (37, 0, 37)
        # A writer stopped between its stores (killed, or preempted for good) leaves the
        # sequence odd: a reader gives up after READABLE_READ_TRIES and says None (it then
        # fetches through the worker) instead of taking a mix of two publications.
        words = block._words
        sequence_word = ring_layout.CONTROL_READABLE_SEQUENCE_POSITION // ring_layout.WORD_BYTES
        segment_word = ring_layout.CONTROL_READABLE_SEGMENT_POSITION // ring_layout.WORD_BYTES
        words[sequence_word] += 1
        words[segment_word] = 99
        assert words[sequence_word] & 1
        assert reader.readable() is None
        block.set_readable(99, 512, 120)  # the next writer starts from the odd sequence
        assert not words[sequence_word] & 1
        assert reader.readable() == (99, 512, 120)
        with pytest.raises(PermissionError):
            reader.set_readable(0, 0, 0)
    finally:
        reader.close()
        block.close()
