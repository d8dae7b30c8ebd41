"""A producer killed mid-batch leaves a half-written frame in its ring: the worker must never
append it, and must store every earlier frame exactly once.

The worker's own drain (``PartitionWorker._drain_rings``, in this process, on a real
PartitionLog and ring) reads a ring into which a producer wrote good frames and then one frame
cut at byte ``cut``, in one of these ways:

* ``unpublished``: the bytes up to ``cut`` are written, nothing is published (a RingWriter
  publishes head_seq, then head, after the bytes: a producer killed before that);
* ``head_seq``: head_seq is published, head is not (killed between the two stores);
* ``torn_head``: head covers the frame's first ``cut`` bytes only (no RingWriter does that: a
  wrong head, as a foreign write or a bug would leave);
* ``bad_length``: the whole frame is published with its batch_length overwritten;
* ``flipped``: the whole frame is published with byte ``cut`` flipped (CRC, magic, identity).

``tests/fault/test_torn_frame.py`` does the same with a real broker and a producer process that
SIGKILLs itself at that point.  Hypothesis prints the failing example.
"""

from __future__ import annotations

import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from fault.torn_frame_producer import poke  # also the torn producer's: one way to poke
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from shmbroker.config import LogConfig
from shmbroker.format import record_batch, ring_layout
from shmbroker.partition.paths import PartitionPaths
from shmbroker.partition.worker import RESULT_CORRUPT, AttachedRing, PartitionWorker
from shmbroker.shm import names
from shmbroker.shm.control_block import ControlBlock
from shmbroker.shm.ring import RingReader, RingWriter
from shmbroker.storage.partition_log import PartitionLog

DATA_BYTES = 64 * 1024
ACK_SLOTS = 16
TOPIC_ID = 7
MODES = ("unpublished", "head_seq", "torn_head", "bad_length", "flipped")
DRAIN_PASSES_MAX = 1000


class InProcessWorker:
    """A PartitionWorker whose log, control block and one ring are set up by hand (no boot, no
    sockets): only its drain runs."""

    def __init__(self, data_dir: Path) -> None:
        self.paths = PartitionPaths(data_dir, "torn", TOPIC_ID, 0)
        self.worker = PartitionWorker(self.paths)
        self.worker.log = PartitionLog(self.paths.log_dir, LogConfig())
        self.worker.control = ControlBlock.create_or_open(self.paths.control_block_name)

    def attach(self, name: str) -> RingReader:
        reader = RingReader.attach(name, check_frames=True)
        self.worker.rings[name] = AttachedRing(reader, None, recovering=False)
        return reader

    def drain(self) -> None:
        for _ in range(DRAIN_PASSES_MAX):
            if not self.worker._drain_rings():
                return
        raise AssertionError(f"the ring still had data after {DRAIN_PASSES_MAX} passes")

    def stored(self) -> list[record_batch.Record]:
        log = self.worker.log
        assert log is not None
        data = log.read_bytes(0, 1 << 30) if log.log_end_offset else b""
        records: list[record_batch.Record] = []
        position = 0
        while position < len(data):
            records += record_batch.decode_batch(data, position)  # CRC-checked
            position += record_batch.batch_size_at(data, position)
        return records

    def close(self) -> None:
        worker = self.worker
        for ring in worker.rings.values():
            ring.reader.close()
        assert worker.log is not None and worker.control is not None
        worker.log.close()
        worker.control.close()
        worker.control.unlink()
        worker.selector.close()
        worker._signal_r.close()
        worker._signal_w.close()


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A data dir per hypothesis example; its shm names are unlinked afterwards."""
    with tempfile.TemporaryDirectory() as directory:
        yield Path(directory)
        for name in names.list_names(names.shm_prefix(directory)):
            names.unlink(name)


def batch(ring_id: int, sequence: int, values: list[bytes]) -> bytearray:
    return record_batch.encode_batch(values, producer_id=ring_id, producer_epoch=0,
                                     base_sequence=sequence)


def write(writer: RingWriter, frame: bytes | bytearray, worker: InProcessWorker) -> int:
    """Write a whole frame, draining first when the ring is full; its ring seq."""
    seq = writer.try_write(frame)
    if seq is None:
        worker.drain()
        writer.acks()
        seq = writer.try_write(frame)
    assert seq is not None
    return seq


@st.composite
def scenarios(draw: st.DrawFn) -> dict[str, object]:
    good = draw(st.lists(st.tuples(st.integers(1, 4), st.integers(0, 7000), st.booleans()),
                         max_size=8))
    torn_records = draw(st.integers(1, 4))
    torn_value_bytes = draw(st.integers(0, 7000))  # 4 x 7000 fit half the ring
    mode = draw(st.sampled_from(MODES))
    return {"good": good, "torn_records": torn_records, "torn_value_bytes": torn_value_bytes,
            "mode": mode, "cut_fraction": draw(st.floats(0, 1, exclude_max=True)),
            "drain_before": draw(st.booleans())}


def run_scenario(directory: Path, scenario: dict[str, object]) -> None:
    worker = InProcessWorker(directory)
    ring_id = names.new_ring_id()
    name = worker.paths.ring_name(ring_id)
    writer = RingWriter.create(name, data_bytes=DATA_BYTES, ack_slots=ACK_SLOTS,
                               producer_id=ring_id)
    try:
        reader = worker.attach(name)
        expected: list[bytes] = []
        sequence = 0
        good = scenario["good"]
        assert isinstance(good, list)
        for index, (count, value_bytes, drain_now) in enumerate(good):
            values = [b"good-%d-%d-" % (index, i) + b"g" * value_bytes for i in range(count)]
            write(writer, batch(ring_id, sequence, values), worker)
            sequence += count
            expected += values
            if drain_now:
                worker.drain()
        if scenario["drain_before"]:
            worker.drain()
        frames_good = len(good)

        torn_records = scenario["torn_records"]
        torn_value_bytes = scenario["torn_value_bytes"]
        assert isinstance(torn_records, int) and isinstance(torn_value_bytes, int)
        torn = batch(ring_id, sequence, [b"torn-%d-" % i + b"t" * torn_value_bytes
                                         for i in range(torn_records)])
        mode = scenario["mode"]
        fraction = scenario["cut_fraction"]
        assert isinstance(fraction, float)
        view = writer.writable_region(len(torn))
        if view is None:
            worker.drain()
            writer.acks()
            view = writer.writable_region(len(torn))
        assert view is not None
        wrapped_bare = False
        if mode in ("unpublished", "head_seq", "torn_head"):
            cut = int(fraction * len(torn))  # bytes of the frame written: 0 .. size - 1
            view[:cut] = torn[:cut]
            view.release()
            if mode == "head_seq":
                poke(name, ring_layout.HEAD_SEQ_POSITION, reader.head_seq + 1)
            elif mode == "torn_head":
                head = reader.head
                writer.commit(len(torn))  # the wrap marker, if any, as a RingWriter writes it
                # with a wrap and cut 0 the head covers the lap's skip and not a byte of the
                # frame: "a skip without its frame", which the reader calls broken
                wrapped_bare = cut == 0 and reader.head - len(torn) > head
                poke(name, ring_layout.HEAD_POSITION, reader.head - len(torn) + cut)
                assert reader.head > head or cut == 0
        else:
            view[:] = torn
            if mode == "bad_length":
                wrong = int(fraction * (1 << 31))
                if wrong == len(torn) - ring_layout.FRAME_HEADER_BYTES:
                    wrong += 1
                struct.pack_into(">i", view, ring_layout.FRAME_BATCH_LENGTH_POSITION, wrong)
            else:  # flipped: a byte the CRC, the magic, the length or the identity covers
                cut = 8 + int(fraction * (len(torn) - 8))
                if 12 <= cut < 16:  # partition_leader_epoch: not covered by the CRC (Kafka's)
                    cut = 16
                view[cut] ^= 0xFF
            view.release()
            writer.commit(len(torn))

        worker.drain()
        stored = worker.stored()
        assert [record.value for record in stored] == expected  # each once, in order
        assert [record.offset for record in stored] == list(range(len(expected)))
        assert not any((record.value or b"").startswith(b"torn") for record in stored)
        tail, tail_seq = reader.progress
        if mode in ("unpublished", "head_seq") or (
                mode == "torn_head" and cut == 0 and not wrapped_bare):
            assert not reader.broken
            assert tail_seq == frames_good  # nothing of the torn frame acknowledged
            assert not reader.pending()
        else:
            # Read as frames (a wrong length cuts it in pieces) and each refused by the log's
            # checks, or the ring is marked broken: either way only error numbers after the
            # good frames, and a ring not broken has been read to its head.
            assert frames_good <= tail_seq
            assert all(reader.slot(seq) == (seq, RESULT_CORRUPT)
                       for seq in range(frames_good, tail_seq))
            if reader.broken:
                assert reader.broken == ring_layout.RING_BROKEN_CORRUPT_FRAME
                assert reader.broken_reason
            else:
                assert mode in ("flipped", "bad_length") and tail_seq > frames_good
                assert tail == reader.head
    finally:
        writer.close()
        writer.unlink()
        worker.close()


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(scenario=scenarios())
@example(scenario={  # a torn head over a lap's wrap skip and no byte of the frame
    "good": [(1, 3618, False), (4, 7000, False), (4, 6357, False)], "torn_records": 4,
    "torn_value_bytes": 6137, "mode": "torn_head", "cut_fraction": 0.0, "drain_before": False})
def test_a_torn_frame_is_never_appended(scratch: Path, scenario: dict[str, object]) -> None:
    with tempfile.TemporaryDirectory(dir=scratch) as directory:
        run_scenario(Path(directory), scenario)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cut_fraction", [0.0, 0.1, 0.5, 0.999])
def test_each_cut_mode(tmp_path: Path, mode: str, cut_fraction: float) -> None:
    """The modes at fixed cuts (no hypothesis), with earlier frames drained and not."""
    run_scenario(tmp_path, {"good": [(3, 100, True), (1, 5000, False), (2, 0, False)],
                            "torn_records": 3, "torn_value_bytes": 2000, "mode": mode,
                            "cut_fraction": cut_fraction, "drain_before": False})
