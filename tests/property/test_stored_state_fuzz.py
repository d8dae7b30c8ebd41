"""Fuzz targets for the readers of state that a crash, a disk or another process may have left
damaged: each may raise only its documented error type.

- a produce ring whose header words and data area hold random bytes (shm.ring.RingReader, the
  layout of format.ring_layout): RingError at attach, else regions inside the data area or a
  ring marked broken -- never another exception;
- checkpoint files (storage.checkpoint_file): StorageError;
- the topic metadata snapshot (supervisor.meta_store): StorageError;
- offset and time index files (storage.offset_index, storage.time_index): any bytes load, and
  shape_problem judges them (never an exception);
- the committed-offsets log (storage.offset_log): replay cuts a damaged tail (reported) or
  refuses the file with StorageError.

Bounded for CI: every target has max_examples set (the module takes a few seconds).
"""

from __future__ import annotations

import os
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from shmbroker import limits
from shmbroker.errors import RingError, StorageError
from shmbroker.format import record_batch
from shmbroker.format import ring_layout as layout
from shmbroker.shm import names
from shmbroker.shm.ring import RingReader, RingWriter
from shmbroker.storage.checkpoint_file import CheckpointFile
from shmbroker.storage.offset_index import OffsetIndex
from shmbroker.storage.offset_log import LOG_NAME, OffsetLog
from shmbroker.storage.time_index import TimeIndex
from shmbroker.supervisor.meta_store import SNAPSHOT_NAME, MetaStore

SETTINGS = settings(max_examples=150, deadline=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])
DATA_BYTES = 64 * 1024
ACK_SLOTS = 16


# ------------------------------------------------------------------------------------------------
# a ring of random bytes
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ring() -> Iterator[RingWriter]:
    ring_id = names.new_ring_id()
    writer = RingWriter.create(names.ring_name(f"fuzz{os.getpid()}", 1, 0, ring_id),
                               data_bytes=DATA_BYTES, ack_slots=ACK_SLOTS, producer_id=ring_id)
    yield writer
    writer.close()
    writer.unlink()


WORDS = {name: getattr(layout, name) for name in (
    "HEAD_POSITION", "HEAD_SEQ_POSITION", "PROGRESS_GEN_POSITION", "PROGRESS_POSITION",
    "WORKER_BROKEN_POSITION", "PRODUCER_ID_POSITION", "DOORBELL_LENGTH_POSITION",
    "DATA_BYTES_POSITION", "ACK_SLOTS_POSITION", "VERSION_POSITION", "MAGIC_POSITION")}
WORDS["PROGRESS_SEQ_POSITION"] = layout.PROGRESS_POSITION + 8  # slot 0's tail_seq
WORDS["PROGRESS_1_POSITION"] = layout.PROGRESS_POSITION + layout.PROGRESS_SLOT_BYTES
WORDS["PROGRESS_1_SEQ_POSITION"] = layout.PROGRESS_POSITION + layout.PROGRESS_SLOT_BYTES + 8
word_values = st.integers(0, 2**64 - 1) | st.integers(0, 2 * DATA_BYTES) | st.sampled_from(
    [0, 1, 61, 62, DATA_BYTES - 1, DATA_BYTES, DATA_BYTES + 1, 2**63])


@SETTINGS
@example(words={"PROGRESS_GEN_POSITION": 2**64 - 1}, patches=[], with_frames=True)
@example(words={"PROGRESS_SEQ_POSITION": 2**63}, patches=[], with_frames=True)
@given(st.dictionaries(st.sampled_from(sorted(WORDS)), word_values, max_size=4),
       st.lists(st.tuples(st.integers(0, DATA_BYTES - 1), st.binary(min_size=1, max_size=80)),
                max_size=6),
       st.booleans())
def test_ring_of_random_bytes(ring: RingWriter, words: dict[str, int],
                              patches: list[tuple[int, bytes]], with_frames: bool) -> None:
    mapping = ring._mmap
    assert mapping is not None
    data_position = layout.data_area_position(ACK_SLOTS)
    header = bytes(mapping[:data_position])  # restored at the end: the next example's ring
    try:
        if with_frames:  # plausible frames first, so that the reader gets past the heads
            batch = bytes(record_batch.encode_batch([b"v"] * 3, producer_id=ring.producer_id))
            mapping[data_position:data_position + len(batch)] = batch
            struct.pack_into("<QQ", mapping, layout.HEAD_POSITION, len(batch), 1)
        for name, value in words.items():
            struct.pack_into("<Q", mapping, WORDS[name], value)
        for position, patch in patches:
            patch = patch[:DATA_BYTES - position]
            mapping[data_position + position:data_position + position + len(patch)] = patch
        try:
            reader = RingReader.attach(ring.name, check_frames=True)
        except RingError:
            return
        try:
            for _ in range(4):  # bounded: a few regions
                reader.pending()
                region = reader.next_region(1 << 20)
                if region is None:
                    break
                assert region.frames == len(region.positions) == len(region.sizes) > 0
                for position, size in zip(region.positions, region.sizes):
                    assert 0 <= position and position + size <= len(region.view)
                    assert size >= layout.FRAME_BYTES_MIN
                assert len(region.view) <= DATA_BYTES
                reader.record_results(region, [0] * region.frames)
                reader.publish(region)
                region.view.release()
        finally:
            reader.close()
    finally:
        mapping[:data_position] = header
        mapping[data_position:data_position + DATA_BYTES] = bytes(DATA_BYTES)


# ------------------------------------------------------------------------------------------------
# files
# ------------------------------------------------------------------------------------------------

checkpoint_texts = st.binary(max_size=200) | st.builds(
    lambda lines: "\n".join(lines).encode(),
    st.lists(st.sampled_from(["0", "1", "2", "-1", "x 1", "log_end 5", "a b c", "", " ",
                              "9" * 30, "\xff", "name -9223372036854775809"]), max_size=6))


@SETTINGS
@given(checkpoint_texts)
def test_checkpoint_file_raises_only_storage_error(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "recovery-point-offset-checkpoint"
        path.write_bytes(data)
        try:
            entries = CheckpointFile(path).read()
        except StorageError:
            return
    assert entries is not None
    assert all(isinstance(value, int) for value in entries.values())


topic_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=10),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.sampled_from(["name", "topic_id", "partitions", "config",
                                       "created_ms", "topics", "next_topic_id", "version",
                                       "x"]), children, max_size=5),
    max_leaves=12)


@SETTINGS
@given(st.binary(max_size=200) | topic_json.map(orjson.dumps)
       | st.builds(lambda topics, next_id: orjson.dumps({"version": 1, "topics": topics,
                                                         "next_topic_id": next_id}),
                   st.lists(topic_json, max_size=3), st.integers(-2, 2**64 - 1)))
def test_meta_store_raises_only_storage_error(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as directory:
        (Path(directory) / SNAPSHOT_NAME).write_bytes(data)
        try:
            store = MetaStore(directory)
        except StorageError:
            return
        for topic in store.topics():
            assert isinstance(topic.name, str) and topic.partitions >= 1
            assert store.next_topic_id > topic.topic_id


@SETTINGS
@given(st.binary(max_size=400), st.sampled_from([OffsetIndex, TimeIndex]),
       st.integers(16, 512))
def test_index_files_load_and_are_judged(data: bytes, kind: type, max_index_bytes: int) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "00000000000000000000.index")
        with open(path, "wb") as file:
            file.write(data)
        index = kind(path, max_index_bytes)
        loaded = index.read_file()
        assert loaded is not None
        keys, values, size = loaded
        assert size == len(data) and len(keys) == len(values) == len(data) // index.ENTRY_SIZE
        problem = index.shape_problem(keys, values, size)
        assert problem is None or isinstance(problem, str)


def _offset_log_files(draw: st.DrawFn) -> bytes:
    """Random bytes, or a valid offset log with bytes damaged or cut."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=300))
    with tempfile.TemporaryDirectory() as directory:
        log = OffsetLog(directory)
        for index in range(draw(st.integers(1, 4))):
            log.stage(f"g{index % 2}", [("t", index, index * 10, draw(st.none() | st.text(
                max_size=5)))])
            log.sync()
        log.close()
        data = bytearray((Path(directory) / LOG_NAME).read_bytes())
    for _ in range(draw(st.integers(1, 3))):
        position = draw(st.integers(0, len(data) - 1))
        if draw(st.booleans()):
            data[position] = draw(st.integers(0, 255))
        else:
            del data[position:]
            break
    return bytes(data)


@settings(SETTINGS, max_examples=60)  # each example writes and syncs a small log
@given(st.composite(_offset_log_files)())
def test_offset_log_replay_raises_only_storage_error(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as directory:
        (Path(directory) / LOG_NAME).write_bytes(data)
        try:
            log = OffsetLog(directory)
        except StorageError:
            return
        try:
            for group in log.groups():
                for (topic, partition), entry in log.offsets(group).items():
                    assert isinstance(topic, str) and partition >= 0
                    assert entry[0] >= 0
            # the damaged tail was cut: the log takes new commits and replays them
            log.stage("after", [("t", 0, 5, None)])
            log.sync()
        finally:
            log.close()
        again = OffsetLog(directory)
        try:
            assert again.offsets("after")[("t", 0)][0] == 5
        finally:
            again.close()


def test_the_ring_target_reaches_the_frames(ring: RingWriter) -> None:
    """Without damage the target's ring holds one frame that the reader returns: the fuzz
    target exercises next_region, not only attach."""
    mapping = ring._mmap
    assert mapping is not None
    data_position = layout.data_area_position(ACK_SLOTS)
    header = bytes(mapping[:data_position])
    try:
        batch = bytes(record_batch.encode_batch([b"v"] * 3, producer_id=ring.producer_id))
        mapping[data_position:data_position + len(batch)] = batch
        struct.pack_into("<QQ", mapping, layout.HEAD_POSITION, len(batch), 1)
        reader = RingReader.attach(ring.name, check_frames=True)
        try:
            region = reader.next_region(1 << 20)
            assert region is not None and region.sizes == [len(batch)]
            region.view.release()
        finally:
            reader.close()
    finally:
        mapping[:data_position] = header
        mapping[data_position:data_position + DATA_BYTES] = bytes(DATA_BYTES)


def _field_bodies() -> st.SearchStrategy[bytes]:
    """Record bodies (type, time, then fields) that are mostly almost right: a known type, and
    after the names either random bytes or commit fields with random numbers and lengths."""
    name = st.binary(min_size=0, max_size=12).map(
        lambda raw: struct.pack(">H", len(raw)) + raw)
    lying_name = st.tuples(st.integers(0, 0xFFFF), st.binary(max_size=12)).map(
        lambda pair: struct.pack(">H", pair[0]) + pair[1])
    commit_fields = st.tuples(st.integers(-2**31, 2**31 - 1), st.integers(-2**63, 2**63 - 1),
                              st.integers(-2**31, 2**31 - 1), st.integers(-4, 16)).map(
        lambda fields: struct.pack(">iqii", *fields))
    return st.tuples(
        st.sampled_from([1, 1, 1, 2, 3, 0, 4, 255]).map(lambda kind: bytes([kind])),
        st.integers(-2**63, 2**63 - 1).map(lambda time_ms: struct.pack(">q", time_ms)),
        st.one_of(name, lying_name), st.one_of(name, lying_name, st.just(b"")),
        st.one_of(commit_fields, st.binary(max_size=24), st.just(b"")),
        st.binary(max_size=12),
    ).map(b"".join)


@settings(SETTINGS, max_examples=200)
@given(_field_bodies())
@example(b"\x01" + bytes(8) + b"\x00\x01g\x00\x01t" + struct.pack(">iqii", 0, 5, -1, -2))
@example(b"\x01" + bytes(8) + b"\x00\x01g\x00\x01t" + struct.pack(">iqii", 0, 5, -1, 9) + b"m")
@example(b"\x02" + bytes(8) + b"\x00\x01\xff")  # not UTF-8
@example(b"\x02" + bytes(8) + b"\x00\x01g")  # a valid group tombstone
@example(b"\x01" + bytes(8) + b"\x00\x01g\x00\x01t" + struct.pack(">iqii", 0, 5, -1, 1) + b"m")
@example(b"\x01" + bytes(8) + b"\x00\x01g\x00\x01t" + struct.pack(">iqii", -1, 5, -1, -1))
def test_offset_log_records_with_a_valid_crc_and_bad_fields(body: bytes) -> None:
    """A record whose CRC matches but whose fields do not hold together (wrong lengths,
    numbers out of range, an unknown type, bad UTF-8) decodes to CorruptRecordError and
    nothing else; replay keeps the commit before it and cuts it with the one after."""
    from shmbroker.errors import CorruptRecordError
    from shmbroker.storage import offset_log

    crafted = offset_log._record(body)
    try:
        op = offset_log.decode_record(crafted, 0, len(crafted))
    except CorruptRecordError:
        op = None
    head = offset_log.commit_head(7, offset_log._name_field(b"before"))
    first = offset_log.encode_commit(head, offset_log._name_field(b"t"), 0, 1, -1, None)
    last = offset_log.encode_commit(head.replace(b"before", b"after!"),
                                    offset_log._name_field(b"t"), 0, 2, -1, None)
    bounded = offset_log.RECORD_BYTES_MIN <= len(crafted) <= limits.offset_log_record_bytes_max
    with tempfile.TemporaryDirectory() as directory:
        (Path(directory) / LOG_NAME).write_bytes(offset_log._file_header() + first + crafted
                                                 + last)
        log = OffsetLog(directory)
        try:
            if op is None or not bounded:
                assert log.offsets("before") == {("t", 0): (1, None)}
                assert log.groups() == ["before"]
                assert log.recovery_report.first_bad_position == (
                    offset_log.FILE_HEADER_BYTES + len(first))
            else:
                assert log.offsets("after!") == {("t", 0): (2, None)}
        finally:
            log.close()
