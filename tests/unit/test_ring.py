"""The shared-memory produce ring (shmbroker.shm.ring) and shared-memory names.

Randomized tests print their seed (``SHMB_RING_SEED=<n>`` replays one); the hypothesis machine
prints its failing rule sequence.
"""

from __future__ import annotations

import os
import random
import select
import struct
import subprocess
import sys
import textwrap
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path

import posix_ipc
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from shmbroker.errors import InvalidConfigError, RecordTooLargeError, RingError
from shmbroker.format import ring_layout
from shmbroker.format.record_batch import decode_batch, encode_batch
from shmbroker.shm import names
from shmbroker.shm.ring import RingReader, RingRegion, RingWriter

DATA_BYTES = 64 * 1024
FRAME_HEAD = struct.Struct(">qi")


def make_frame(seq: int, size: int) -> bytes:
    """A frame the ring accepts (base_offset 0, batch_length = size - 12) whose bytes encode
    ``seq``; the ring looks at nothing else."""
    return FRAME_HEAD.pack(0, size - 12) + seq.to_bytes(8, "big") + bytes([seq % 251]) * (size - 20)


def seed_for(test: str) -> int:
    seed = int(os.environ.get("SHMB_RING_SEED", random.randrange(1 << 32)))
    print(f"{test}: seed {seed} (replay with SHMB_RING_SEED={seed})")
    return seed


def unlink_quietly(name: str) -> None:
    names.unlink(name)


@pytest.fixture
def prefix(tmp_path: Path) -> Iterator[str]:
    """A prefix unique to the test; every shm name under it is unlinked afterwards."""
    value = names.shm_prefix(tmp_path)
    yield value
    for name in names.list_names(value):
        unlink_quietly(name)


@pytest.fixture
def new_name(prefix: str) -> Callable[[], str]:
    partitions = iter(range(1 << 30))
    return lambda: names.ring_name(prefix, 1, next(partitions), names.new_ring_id())


@pytest.fixture
def make_pair(new_name: Callable[[], str]) -> Iterator[Callable[..., tuple[RingWriter,
                                                                            RingReader]]]:
    opened: list[RingWriter | RingReader] = []

    def make(data_bytes: int = DATA_BYTES, ack_slots: int = 64,
             **kwargs: object) -> tuple[RingWriter, RingReader]:
        writer = RingWriter.create(new_name(), data_bytes=data_bytes, ack_slots=ack_slots,
                                   producer_id=kwargs.pop("producer_id", 7),  # type: ignore[arg-type]
                                   **kwargs)  # type: ignore[arg-type]
        opened.append(writer)
        reader = RingReader.attach(writer.name)
        opened.append(reader)
        return writer, reader

    yield make
    for side in opened:
        side.close()
        side.unlink()


def drain(reader: RingReader, max_bytes: int = 1 << 20, frames_max: int = 1 << 20,
          result: Callable[[int], int] = lambda seq: seq * 10) -> list[tuple[int, bytes]]:
    """Drain every pending frame as the worker would: (seq, bytes) in order; acks each."""
    out: list[tuple[int, bytes]] = []
    for _ in range(frames_max):
        region = reader.next_region(max_bytes)
        if region is None:
            break
        for index, (position, size) in enumerate(zip(region.positions, region.sizes)):
            out.append((region.first_seq + index, bytes(region.view[position:position + size])))
        reader.record_results(region, [result(seq) for seq in range(
            region.first_seq, region.first_seq + region.frames)])
        reader.publish(region)
        region.view.release()
    return out


# -- names -------------------------------------------------------------------------------------

def test_names(tmp_path: Path, prefix: str) -> None:
    link = tmp_path.parent / (tmp_path.name + "-link")
    link.symlink_to(tmp_path)
    assert names.shm_prefix(link) == names.shm_prefix(str(tmp_path)) == prefix
    assert prefix.startswith("shmb.") and len(prefix) == 5 + 12
    assert names.ring_name("shmb.abc", 3, 4, 255) == "/shmb.abc.t3.p4.r00000000000000ff"
    assert names.control_block_name("shmb.abc", 3, 4) == "/shmb.abc.t3.p4.ctl"
    rings = sorted(names.ring_name(prefix, 3, 4, names.new_ring_id()) for _ in range(3))
    other = names.ring_name(prefix, 3, 41, names.new_ring_id())
    control = names.control_block_name(prefix, 3, 4)
    for name in [*rings, other, control]:
        posix_ipc.SharedMemory(name, posix_ipc.O_CREX, size=4096).close_fd()
    assert names.list_rings(prefix, 3, 4) == rings
    assert names.list_rings(prefix, 3, 41) == [other]
    assert names.list_names(prefix) == sorted([*rings, other, control])
    assert names.list_names(names.shm_prefix(tmp_path / "elsewhere")) == []
    ids = {names.new_ring_id() for _ in range(100)}
    assert len(ids) == 100 and all(0 < i < 1 << 63 and i & 1 for i in ids)


# -- creating and attaching --------------------------------------------------------------------

def test_header_is_visible_to_the_reader(make_pair: Callable[..., tuple[RingWriter, RingReader]]
                                         ) -> None:
    writer, reader = make_pair(producer_id=123456789, doorbell_address=b"\0shmb.test.db")
    assert (reader.producer_id, reader.producer_pid) == (123456789, os.getpid())
    assert reader.doorbell_address == b"\0shmb.test.db"
    assert (reader.data_bytes, reader.ack_slots) == (writer.data_bytes, writer.ack_slots)
    assert reader.progress == (0, 0) and reader.head == 0 and not reader.pending()
    assert not reader.producer_waiting and not reader.producer_closed
    writer.set_waiting(True)
    assert reader.producer_waiting
    writer.set_waiting(False)
    assert not reader.producer_waiting
    assert reader.producer_alive()
    writer.close()
    writer.close()  # idempotent
    assert reader.producer_closed and writer.closed


@pytest.mark.parametrize("data_bytes, ack_slots, producer_id, doorbell, message", [
    (DATA_BYTES + 1, 8, 1, b"", "multiple of 4096"),
    (4096, 8, 1, b"", "multiple of 4096"),
    (DATA_BYTES, 6, 1, b"", "power of two"),
    (DATA_BYTES, 0, 1, b"", "power of two"),
    (DATA_BYTES, 8, 0, b"", "producer_id"),
    (DATA_BYTES, 8, 1 << 63, b"", "producer_id"),
    (DATA_BYTES, 8, 1, b"x" * 129, "doorbell address"),
])
def test_create_validates(new_name: Callable[[], str], data_bytes: int, ack_slots: int,
                          producer_id: int, doorbell: bytes, message: str) -> None:
    name = new_name()
    with pytest.raises(InvalidConfigError, match=message):
        RingWriter.create(name, data_bytes=data_bytes, ack_slots=ack_slots,
                          producer_id=producer_id, doorbell_address=doorbell)
    with pytest.raises(RingError, match="does not exist"):
        RingReader.attach(name)


def test_create_refuses_an_existing_name(make_pair: Callable[..., tuple[RingWriter, RingReader]]
                                         ) -> None:
    writer, _ = make_pair()
    with pytest.raises(RingError, match="already exists"):
        RingWriter.create(writer.name, data_bytes=DATA_BYTES, ack_slots=8, producer_id=1)


def test_attach_checks_the_layout(new_name: Callable[[], str]) -> None:
    missing = new_name()
    with pytest.raises(RingError, match=f"ring {missing} does not exist"):
        RingReader.attach(missing)
    tiny = new_name()
    posix_ipc.SharedMemory(tiny, posix_ipc.O_CREX, size=100).close_fd()
    with pytest.raises(RingError, match="smaller than a ring header"):
        RingReader.attach(tiny)
    zeros = new_name()
    posix_ipc.SharedMemory(zeros, posix_ipc.O_CREX,
                           size=ring_layout.ring_object_bytes(DATA_BYTES, 8)).close_fd()
    with pytest.raises(RingError, match="wrong magic"):
        RingReader.attach(zeros)
    resized = new_name()
    RingWriter.create(resized, data_bytes=DATA_BYTES, ack_slots=8, producer_id=1).close()
    shared = posix_ipc.SharedMemory(resized)
    os.ftruncate(shared.fd, ring_layout.ring_object_bytes(DATA_BYTES, 8) + 4096)
    shared.close_fd()
    with pytest.raises(RingError, match="header .* says"):
        RingReader.attach(resized)


def test_producer_alive_detects_exit_and_pid_reuse(
        make_pair: Callable[..., tuple[RingWriter, RingReader]], new_name: Callable[[], str]
) -> None:
    name = new_name()
    script = ("import sys; from shmbroker.shm.ring import RingWriter; "
              f"RingWriter.create({name!r}, data_bytes={DATA_BYTES}, ack_slots=8, producer_id=5)")
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)  # exits, reaped
    dead = RingReader.attach(name)
    try:
        assert not dead.producer_alive()
    finally:
        dead.close()
    writer, reader = make_pair()
    assert reader.producer_alive()
    writer._words[ring_layout.PRODUCER_START_TIME_MS_WORD] -= 5000  # as if our pid was reused
    reused = RingReader.attach(writer.name)
    assert not reused.producer_alive()
    reused.close()


# -- writing and reading -----------------------------------------------------------------------

def test_round_trip_through_many_laps(make_pair: Callable[..., tuple[RingWriter, RingReader]]
                                      ) -> None:
    rng = random.Random(seed_for("round_trip"))
    writer, reader = make_pair(ack_slots=32)
    frame_max = writer.frame_bytes_max
    written: deque[tuple[int, bytes]] = deque()
    read = 0
    for _ in range(3000):
        size = rng.choice([61, 62, 100, 1000, rng.randint(61, 5000), rng.randint(61, frame_max)])
        frame = make_frame(len(written) + read, size)
        seq = writer.try_write(frame)
        if seq is None:
            left = DATA_BYTES - writer._head % DATA_BYTES
            assert writer.in_flight == 32 or writer.free_bytes < size + (left if size > left else 0)
            got = drain(reader, max_bytes=rng.randint(1, 3 * DATA_BYTES // 4))
            assert got == [written.popleft() for _ in got]
            read += len(got)
            first, results = writer.acks()
            assert (first, results) == (read - len(got), [s * 10 for s, _ in got])
            seq = writer.try_write(frame)
            assert seq is not None
        assert seq == read + len(written)
        written.append((seq, frame))
    assert drain(reader) == list(written)
    assert writer.in_flight == 0 and writer.free_bytes == DATA_BYTES
    assert reader.progress[1] == 3000 and reader.progress[0] > 10 * DATA_BYTES


def test_wrap_marker_and_short_tail(make_pair: Callable[..., tuple[RingWriter, RingReader]]
                                    ) -> None:
    writer, reader = make_pair()
    data = writer._data
    # 12 bytes left before the end: a wrap marker is written there.
    for seq, size in enumerate([32768, DATA_BYTES - 32768 - 12]):
        assert writer.try_write(make_frame(seq, size)) == seq
    assert len(drain(reader)) == 2
    assert writer.try_write(make_frame(2, 100)) == 2
    assert bytes(data[DATA_BYTES - 12:DATA_BYTES - 4]) == ring_layout.WRAP_MARKER
    region = reader.next_region(1 << 20)
    assert region is not None and region.frames == 1 and bytes(region.view) == make_frame(2, 100)
    assert region.end_tail == DATA_BYTES + 100
    reader.record_results(region, [0])
    reader.publish(region)
    region.view.release()
    # 5 bytes left before the end: no room for a marker; the reader skips them anyway.
    for seq, size in [(3, 32768), (4, DATA_BYTES - 32768 - 100 - 5)]:
        assert writer.try_write(make_frame(seq, size)) == seq
    assert [s for s, _ in drain(reader)] == [3, 4]
    assert writer.try_write(make_frame(5, 200)) == 5
    assert drain(reader) == [(5, make_frame(5, 200))]
    assert reader.progress == (2 * DATA_BYTES + 200, 6)
    # Frames that end exactly at the end of the data area need no wrap.
    assert writer.try_write(make_frame(6, 32768 - 200)) == 6
    assert writer.try_write(make_frame(7, 32768)) == 7
    assert writer.try_write(make_frame(8, 61)) == 8  # at the start of the next lap
    assert bytes(data[:61]) == make_frame(8, 61)
    first = reader.next_region(1 << 20)
    assert first is not None and (first.first_seq, first.end_tail) == (6, 3 * DATA_BYTES)
    reader.record_results(first, [6, 7])
    reader.publish(first)
    first.view.release()
    assert [s for s, _ in drain(reader)] == [8]
    assert reader.progress == (3 * DATA_BYTES + 61, 9)


def test_regions_respect_max_bytes_and_the_data_end(
        make_pair: Callable[..., tuple[RingWriter, RingReader]]) -> None:
    writer, reader = make_pair()
    for seq in range(10):
        writer.try_write(make_frame(seq, 1000))
    for max_bytes, frames in [(1999, 1), (2000, 2), (2001, 2)]:
        probe = RingReader.attach(writer.name)  # a fresh cursor each time
        region = probe.next_region(max_bytes)
        assert region is not None and region.frames == frames, max_bytes
        region.view.release()
        probe.close()
    region = reader.next_region(3500)
    assert region is not None
    assert (region.frames, region.positions, region.sizes) == (3, [0, 1000, 2000], [1000] * 3)
    assert (region.first_seq, region.end_tail, len(region.view)) == (0, 3000, 3000)
    assert reader.pending()
    region = reader.next_region(10)  # the first frame alone is larger: it comes anyway
    assert region is not None and (region.first_seq, region.frames) == (3, 1)
    assert reader.progress == (0, 0)  # nothing published yet
    rest = reader.next_region(1 << 20)
    assert rest is not None and (rest.first_seq, rest.frames) == (4, 6)
    assert not reader.pending() and reader.next_region(1 << 20) is None


def test_region_is_writable_in_place(make_pair: Callable[..., tuple[RingWriter, RingReader]]
                                     ) -> None:
    writer, reader = make_pair()
    batches = [encode_batch([b"value-%d" % i] * (i + 1)) for i in range(5)]
    for batch in batches:
        writer.try_write(batch)
    region = reader.next_region(1 << 20)
    assert region is not None and region.sizes == [len(b) for b in batches]
    next_offset = 100
    for position, size in zip(region.positions, region.sizes):
        struct.pack_into(">q", region.view, position, next_offset)  # as the worker assigns
        next_offset += len(decode_batch(region.view[position:position + size]))
    decoded = [decode_batch(region.view[p:p + s]) for p, s in zip(region.positions, region.sizes)]
    assert [[r.offset for r in batch] for batch in decoded][1] == [101, 102]
    assert [r.value for r in decoded[4]] == [b"value-4"] * 5
    region.view.release()


def test_acks_and_ack_slots(make_pair: Callable[..., tuple[RingWriter, RingReader]]) -> None:
    writer, reader = make_pair(ack_slots=4)
    assert writer.acks() == (0, [])
    for seq in range(4):
        assert writer.try_write(make_frame(seq, 100)) == seq
    assert writer.try_write(make_frame(4, 100)) is None  # every ack slot is in flight
    assert writer.in_flight == 4
    region = reader.next_region(250)
    assert region is not None and region.frames == 2
    reader.record_results(region, [-1])  # a prefix of the region (the worker's intents)
    assert reader.slot(0) == (0, -1)
    with pytest.raises(ValueError, match="3 results for a region of 2 frames"):
        reader.record_results(region, [1, 2, 3])
    reader.record_results(region, [500, -3])  # the last call wins
    assert reader.slot(1) == (1, -3)
    assert writer.in_flight == 4  # recorded, not yet published
    reader.publish(region)
    assert reader.progress == (200, 2) and writer.in_flight == 2
    # The writer has not read the results yet, but writing may take their slots: it keeps them.
    assert writer.try_write(make_frame(4, 100)) == 4
    assert writer.try_write(make_frame(5, 100)) == 5
    assert writer.try_write(make_frame(6, 100)) is None
    assert [s for s, _ in drain(reader, result=lambda seq: 1000 + seq)] == [2, 3, 4, 5]
    assert reader.slot(4) == (4, 1004) and reader.slot(0) == (4, 1004)
    assert writer.acks() == (0, [500, -3, 1002, 1003, 1004, 1005])
    assert writer.acks() == (6, [])


def test_ack_slot_mismatch_is_a_ring_error(make_pair: Callable[..., tuple[RingWriter, RingReader]]
                                           ) -> None:
    writer, reader = make_pair(ack_slots=4)
    writer.try_write(make_frame(0, 100))
    region = reader.next_region(1 << 20)
    assert region is not None
    reader.record_results(region, [0])
    reader._signed[ring_layout.ACK_AREA_WORD] = 9  # as a buggy worker would leave frame 0's slot
    reader.publish(region)
    with pytest.raises(RingError, match="ack slot of frame 0 holds frame 9"):
        writer.acks()


def test_bytes_backpressure_and_size_limits(
        make_pair: Callable[..., tuple[RingWriter, RingReader]]) -> None:
    writer, reader = make_pair(ack_slots=1024)
    with pytest.raises(RecordTooLargeError, match="at most 32768 bytes"):
        writer.try_write(make_frame(0, DATA_BYTES // 2 + 1))
    with pytest.raises(ValueError, match="shorter than a RecordBatch"):
        writer.try_write(b"x" * 60)
    with pytest.raises(ValueError, match="wrap marker"):
        writer.try_write(b"\xff" * 100)
    seq = 0
    while writer.try_write(make_frame(seq, 1000)) is not None:
        seq += 1
        assert seq <= DATA_BYTES // 1000
    assert seq == DATA_BYTES // 1000 and writer.free_bytes == DATA_BYTES - seq * 1000
    assert writer.try_write(make_frame(seq, DATA_BYTES - seq * 1000)) == seq  # fits exactly
    assert writer.free_bytes == 0
    assert len(drain(reader)) == seq + 1
    assert writer.try_write(make_frame(0, DATA_BYTES // 2)) is not None


def test_zero_copy_writable_region(make_pair: Callable[..., tuple[RingWriter, RingReader]]
                                   ) -> None:
    writer, reader = make_pair(ack_slots=8)
    with pytest.raises(ValueError, match="-1: none"):
        writer.commit(100)
    batch = encode_batch([b"zero-copy"] * 3)
    view = writer.writable_region(len(batch) + 50)
    assert view is not None and len(view) == len(batch) + 50
    view[:len(batch)] = batch
    view.release()
    assert not reader.pending()  # nothing is visible before commit
    assert writer.commit(len(batch)) == 0  # less than reserved is fine
    for seq in range(1, 8):  # more laps through the zero-copy path, wrapping included
        size = 20_000 + seq
        view = writer.writable_region(size)
        assert view is not None
        view[:] = make_frame(seq, size)
        view.release()
        assert writer.commit(size) == seq
        got = drain(reader)
        assert got[-1] == (seq, make_frame(seq, size))
        if seq == 1:
            assert got[0] == (0, bytes(batch))
    with pytest.raises(RecordTooLargeError):
        writer.writable_region(DATA_BYTES // 2 + 1)
    with pytest.raises(ValueError, match="-1: none"):
        writer.commit(100)


def test_corrupt_batch_length_breaks_the_ring(
        make_pair: Callable[..., tuple[RingWriter, RingReader]]) -> None:
    for bad_size in [22, 300]:  # too short for a batch header; runs past head
        writer, reader = make_pair()
        writer.try_write(make_frame(0, 100))
        view = writer.writable_region(100)
        assert view is not None
        view[:] = make_frame(1, 100)
        FRAME_HEAD.pack_into(view, 0, 0, bad_size - 12)
        view.release()
        writer.commit(100)
        region = reader.next_region(1 << 20)  # the good frame before the bad one comes first
        assert region is not None and region.frames == 1 and not reader.broken
        region.view.release()
        assert reader.next_region(1 << 20) is None
        assert reader.broken == ring_layout.RING_BROKEN_CORRUPT_FRAME == writer.broken
        assert "frame 1 declares" in reader.broken_reason
        with pytest.raises(RingError, match="marked broken"):
            writer.try_write(make_frame(2, 100))
        assert reader.next_region(1 << 20) is None


PUBLISHER_SCRIPT = textwrap.dedent("""
    import sys
    from shmbroker.shm.ring import RingReader, RingRegion
    reader, count, empty = RingReader.attach(sys.argv[1]), int(sys.argv[2]), memoryview(b"")
    print("ready", flush=True)
    for seq in range(count):
        reader.publish(RingRegion(empty, [], [], seq, (seq + 1) * 100, 1))
""")


def test_progress_seqlock_is_never_torn(make_pair: Callable[..., tuple[RingWriter, RingReader]]
                                        ) -> None:
    """Another process publishes progress as fast as it can; every pair read here is one that
    was published (tail == 100 x tail_seq), and they never go backwards."""
    writer, reader = make_pair()
    publishes = 200_000
    publisher = subprocess.Popen([sys.executable, "-c", PUBLISHER_SCRIPT, writer.name,
                                  str(publishes)], stdout=subprocess.PIPE, text=True)
    try:
        assert publisher.stdout is not None and publisher.stdout.readline() == "ready\n"
        deadline = time.monotonic() + 60
        previous, distinct = 0, 0
        while previous < publishes:
            assert time.monotonic() < deadline, f"deadline passed at {previous}"
            tail, tail_seq = reader.progress
            assert tail == tail_seq * 100 and tail_seq >= previous, (tail, tail_seq, previous)
            distinct += tail_seq != previous
            previous = tail_seq
        publisher.communicate(timeout=60)
        assert publisher.returncode == 0
        print(f"{distinct} distinct progress values read during {publishes} publishes")
    finally:
        if publisher.poll() is None:
            publisher.kill()
        publisher.communicate(timeout=10)


# -- two processes -----------------------------------------------------------------------------

PRODUCER_SCRIPT = textwrap.dedent("""
    import os, random, struct, sys, time
    from shmbroker.shm.ring import RingWriter
    name, count, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    deadline = time.monotonic() + 60
    sizes = [random.Random(seed).randint(61, 5000) for _ in range(count)]
    def frame(seq, size):
        return (struct.pack(">qi", 0, size - 12) + seq.to_bytes(8, "big")
                + bytes([seq % 251]) * (size - 20))
    writer = RingWriter.create(name, data_bytes=256 * 1024, ack_slots=256, producer_id=99)
    print("ready", flush=True)
    seq, results = 0, []
    while len(results) < count:
        assert time.monotonic() < deadline, f"producer: deadline passed at frame {seq}"
        if seq < count and writer.try_write(frame(seq, sizes[seq])) is not None:
            seq += 1
            continue
        first, got = writer.acks()
        assert first == len(results), (first, len(results))
        results.extend(got)
        if not got:
            os.sched_yield()
    assert results == [3 * s for s in range(count)], "wrong results"
    writer.close()
    print("done", flush=True)
""")


def test_two_processes(new_name: Callable[[], str]) -> None:
    count, seed = 20_000, seed_for("two_processes")
    sizes = [random.Random(seed).randint(61, 5000) for _ in range(count)]
    name = new_name()
    producer = subprocess.Popen([sys.executable, "-c", PRODUCER_SCRIPT, name, str(count),
                                 str(seed)], stdout=subprocess.PIPE, text=True)
    try:
        assert producer.stdout is not None
        assert select.select([producer.stdout], [], [], 60)[0], "producer did not start"
        assert producer.stdout.readline() == "ready\n"
        reader = RingReader.attach(name)
        deadline = time.monotonic() + 60
        seq = 0
        while seq < count:
            assert time.monotonic() < deadline, f"reader: deadline passed at frame {seq}"
            region = reader.next_region(256 * 1024)
            if region is None:
                os.sched_yield()
                continue
            assert region.first_seq == seq
            for position, size in zip(region.positions, region.sizes):
                assert size == sizes[seq]
                assert region.view[position:position + size] == make_frame(seq, size), seq
                seq += 1
            reader.record_results(region, range(3 * region.first_seq, 3 * seq, 3))
            reader.publish(region)
            region.view.release()
        output, _ = producer.communicate(timeout=60)
        assert producer.returncode == 0 and output == "done\n"
        assert reader.producer_closed and not reader.pending() and reader.head_seq == count
        reader.close()
    finally:
        if producer.poll() is None:
            producer.kill()
        producer.communicate(timeout=10)
        unlink_quietly(name)


# -- the ring against a model ------------------------------------------------------------------

class RingMachine(RuleBasedStateMachine):
    """Random writes, drains, publishes and ack reads against a model of the ring's rules."""

    ACK_SLOTS = 8

    def __init__(self) -> None:
        super().__init__()
        self.name = names.ring_name("shmb.hypothesis", os.getpid(), 0, names.new_ring_id())
        self.writer = RingWriter.create(self.name, data_bytes=DATA_BYTES,
                                        ack_slots=self.ACK_SLOTS, producer_id=1)
        self.reader = RingReader.attach(self.name)
        self.head = 0  # the model's byte counters
        self.tail = 0
        self.next_seq = 0
        self.tail_seq = 0
        self.unread: deque[tuple[int, bytes, int, bool]] = deque()  # seq, frame, end, wrapped
        self.drained: deque[tuple[RingRegion, list[int]]] = deque()
        self.unreturned: list[tuple[int, int]] = []  # published results acks() owes us

    @rule(size=st.integers(61, DATA_BYTES // 2))
    def write(self, size: int) -> None:
        left = DATA_BYTES - self.head % DATA_BYTES
        wrapped = size > left
        end = self.head + (left if wrapped else 0) + size
        fits = end - self.tail <= DATA_BYTES and self.next_seq < self.tail_seq + self.ACK_SLOTS
        frame = make_frame(self.next_seq, size)
        seq = self.writer.try_write(frame)
        assert (seq is not None) == fits
        if seq is not None:
            assert seq == self.next_seq
            self.unread.append((seq, frame, end, wrapped))
            self.head = end
            self.next_seq += 1

    @rule(max_bytes=st.integers(1, DATA_BYTES))
    def drain(self, max_bytes: int) -> None:
        region = self.reader.next_region(max_bytes)
        if not self.unread:
            assert region is None
            return
        assert region is not None and region.frames >= 1
        assert sum(region.sizes) <= max_bytes or region.frames == 1
        for position, size in zip(region.positions, region.sizes):
            seq, frame, end, _ = self.unread.popleft()
            assert bytes(region.view[position:position + size]) == frame
        assert region.first_seq == seq - region.frames + 1 and region.end_tail == end
        if self.unread and not self.unread[0][3]:  # the next frame continues this lap
            assert sum(region.sizes) + len(self.unread[0][1]) > max_bytes
        results = [seq * 3 - 5 for seq in range(region.first_seq, seq + 1)]
        self.reader.record_results(region, [0] * region.frames)
        self.reader.record_results(region, results)
        self.drained.append((region, results))

    @precondition(lambda self: self.drained)
    @rule()
    def publish(self) -> None:
        region, results = self.drained.popleft()
        self.reader.publish(region)
        region.view.release()
        self.tail = region.end_tail
        self.tail_seq = region.first_seq + region.frames
        self.unreturned += [(region.first_seq + i, r) for i, r in enumerate(results)]

    @rule()
    def acks(self) -> None:
        first, results = self.writer.acks()
        expected_first = self.unreturned[0][0] if self.unreturned else self.tail_seq
        assert (first, results) == (expected_first, [r for _, r in self.unreturned])
        self.unreturned = []

    @invariant()
    def counters_agree(self) -> None:
        assert self.reader.progress == (self.tail, self.tail_seq)
        assert self.reader.head == self.head and self.writer.in_flight == self.next_seq - \
            self.tail_seq
        assert self.reader.pending() == bool(self.unread)

    def teardown(self) -> None:
        for region, _ in self.drained:
            region.view.release()
        self.writer.close()
        self.reader.close()
        self.reader.unlink()


RingMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=60, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestRingModel = RingMachine.TestCase


def _identified_frame(producer_id: int, base_sequence: int, records: int = 3,
                      size: int = 100) -> bytes:
    """A frame carrying a batch header's identity fields (last_offset_delta = records - 1,
    producer id, epoch 0, base sequence), as the worker's check_frames reads them."""
    frame = bytearray(make_frame(0, size))
    struct.pack_into(">i", frame, 23, records - 1)  # FRAME_LAST_OFFSET_DELTA_POSITION
    struct.pack_into(">qhi", frame, 43, producer_id, 0, base_sequence)
    return bytes(frame)


@pytest.mark.parametrize("bad, reason", [
    ((8, 6), "frame 2 carries producer id 8, not the ring's 7"),
    ((7, 5), "frame 2 has base sequence 5; the previous frame's records end at 6"),
])
def test_check_frames_breaks_the_ring_on_another_producers_frame(
        new_name: Callable[[], str], bad: tuple[int, int], reason: str) -> None:
    """With ``check_frames`` (the worker's reader), a frame whose producer id is not the
    ring's, or whose base sequence does not follow on from the frame before, marks the ring
    broken; the frames before it are still read."""
    writer = RingWriter.create(new_name(), data_bytes=DATA_BYTES, ack_slots=64, producer_id=7)
    reader = RingReader.attach(writer.name, check_frames=True)
    try:
        for frame in (_identified_frame(7, 0), _identified_frame(7, 3), _identified_frame(*bad)):
            assert writer.try_write(frame) is not None
        region = reader.next_region(1 << 20)
        assert region is not None and region.frames == 2 and not reader.broken
        region.view.release()
        assert reader.next_region(1 << 20) is None
        assert reader.broken == ring_layout.RING_BROKEN_CORRUPT_FRAME
        assert reason in reader.broken_reason
    finally:
        for side in (writer, reader):
            side.close()
        writer.unlink()
