"""Damaged segment and index files under real broker processes (issue 6: torn writes).

Each test produces numbered records through a real broker into one partition whose segments are
small (several sealed ones and an active one), damages its files -- a flipped byte, a torn tail,
garbage, deleted or zeroed indexes -- while the broker runs or while it is down, then reads the
whole log back with a consumer that, like an application, catches ``CorruptLogError`` and seeks to
``error.next_offset``.  The accounting at the end:

* every record served is the acknowledged one at its offset (never wrong bytes);
* every acknowledged record is served at its acknowledged offset, except those inside a range
  that some CorruptLogError *reported* (with its segment and byte position), and those after a
  damaged point of the active segment, which recovery cut after a crash (reported in the
  broker's log with the position) -- a single copy cannot do better;
* the reported ranges are small (one index interval, or up to the next segment) and name the
  damaged batch's position, which ``shmbroker dump-log --verify`` reports too (exit 1);
* the partition's worker keeps running and serving, and produce goes on (dense offsets).

Damage positions come from a seeded random generator; the seed is printed.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from broker_helpers import RunningBroker

from shmbroker import Consumer, Producer, TopicPartition
from shmbroker.errors import CorruptLogError
from shmbroker.format.record_batch import HEADER_SIZE, read_header
from shmbroker.storage.checkpoint_file import CheckpointFile
from shmbroker.storage.partition_log import RECOVERY_POINT_CHECKPOINT

pytestmark = [pytest.mark.integration, pytest.mark.fault]

TOPIC = "damage"
TP = TopicPartition(TOPIC, 0)
SEGMENT_BYTES = 8192
INDEX_INTERVAL_BYTES = 1024
TOPIC_CONFIG = {"segment_bytes": SEGMENT_BYTES, "index_interval_bytes": INDEX_INTERVAL_BYTES,
                "retention_ms": -1}
RECORDS = 1500  # ~15 segments of 8 KiB
BASE_TIMESTAMP_MS = 1_700_000_000_000
READ_TIMEOUT_S = 20.0
ERRORS_MAX = 200  # a bound on the read-through loop, not an expectation
POLL_MS = 100
CENTURY_MS = 100 * 365 * 24 * 3600 * 1000  # longer than the records are old
SEED = int(os.environ.get("DAMAGE_SEED", random.SystemRandom().randrange(1 << 30)))


@pytest.fixture
def rng() -> random.Random:
    print(f"DAMAGE_SEED={SEED}")  # a failure replays with this environment variable
    return random.Random(SEED)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[RunningBroker]:
    with RunningBroker(tmp_path / "data") as running:
        with running.admin() as admin:
            admin.create_topic(TOPIC, partitions=1, config=TOPIC_CONFIG)
        running.wait_ready()
        yield running


# -- producing and reading -----------------------------------------------------------------------
def produce(broker: RunningBroker, count: int, first: int = 0) -> dict[int, bytes]:
    """``count`` numbered records (batches of ~12); offset -> value of each acknowledged one."""
    acked: dict[int, bytes] = {}
    with Producer(broker.data_dir, linger_ms=5, batch_size_bytes=600) as producer:
        futures = []
        for number in range(first, first + count):
            value = b"record-%06d-" % number + b"x" * (number % 23)
            futures.append((value, producer.send(TOPIC, value, partition=0,
                                                  timestamp_ms=BASE_TIMESTAMP_MS + 10 * number)))
        producer.flush(30)
        for value, future in futures:
            acked[future.result(30).offset] = value
    return acked


def read_through(broker: RunningBroker, start: int = 0
                 ) -> tuple[dict[int, bytes], list[CorruptLogError], int]:
    """Read from ``start`` to the end as an application does: on CorruptLogError, note it and
    seek past.  (served offset -> value, the errors, the end offset)."""
    served: dict[int, bytes] = {}
    errors: list[CorruptLogError] = []
    with Consumer(broker.data_dir) as consumer:
        consumer.assign([TP])
        end = consumer.end_offsets([TP])[TP]
        consumer.seek(TP, start)
        deadline = time.monotonic() + READ_TIMEOUT_S
        while consumer.position(TP) < end:
            assert time.monotonic() < deadline, f"read {len(served)} of {end} in time"
            try:
                records = consumer.poll(timeout_ms=POLL_MS)
            except CorruptLogError as error:
                assert (error.topic, error.partition) == (TOPIC, 0)
                assert error.offset == consumer.position(TP), (error, consumer.position(TP))
                assert error.next_offset > error.offset
                errors.append(error)
                assert len(errors) <= ERRORS_MAX, errors[:5]
                consumer.seek(TP, error.next_offset)
                continue
            for record in records:
                assert record.offset not in served, f"offset {record.offset} served twice"
                served[record.offset] = record.value
    return served, errors, end


def account(acked: dict[int, bytes], served: dict[int, bytes],
            errors: list[CorruptLogError], lost_from: int | None = None) -> set[int]:
    """Check the accounting of the module docstring; the acknowledged offsets reported."""
    wrong = [(offset, value, acked.get(offset)) for offset, value in served.items()
             if acked.get(offset) != value]
    assert not wrong, f"{len(wrong)} record(s) served wrong, e.g. {wrong[:5]}"
    reported = {offset for error in errors for offset in range(error.offset, error.next_offset)}
    assert not reported & served.keys(), "an offset both reported damaged and served"
    missing = sorted(offset for offset in acked if offset not in served
                     and offset not in reported and (lost_from is None or offset < lost_from))
    assert not missing, f"{len(missing)} acknowledged record(s) neither served nor reported, " \
                        f"e.g. {missing[:10]}"
    for error in errors:
        assert error.position is not None and error.segment_base_offset is not None, error
        assert f"position {error.position}" in str(error) and f"{TOPIC}/0" in str(error)
    return reported & acked.keys()


# -- files ---------------------------------------------------------------------------------------
def partition_dir(broker: RunningBroker) -> Path:
    return broker.data_dir / "topics" / TOPIC / "0"


def segment_files(broker: RunningBroker) -> list[Path]:
    return sorted(partition_dir(broker).glob("*.log"))


def batches_of(path: Path) -> list[tuple[int, int, int, int]]:
    """(position, size, base offset, next offset) of each batch of a healthy segment file."""
    data = path.read_bytes()
    found = []
    position = 0
    while position < len(data):
        header = read_header(data, position)
        found.append((position, header.size, header.base_offset, header.next_offset))
        position += header.size
    return found


def flip(path: Path, position: int, mask: int = 0x5A) -> None:
    """XOR one byte in place (the running worker's fd sees it: same inode, page cache)."""
    with open(path, "r+b") as file:
        file.seek(position)
        byte = file.read(1)[0]
        file.seek(position)
        file.write(bytes([byte ^ mask]))


def dump_log_verify(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shmbroker.cli", "dump-log", "--verify",
                           str(path)], capture_output=True, text=True, timeout=60)


def worker_pid(broker: RunningBroker) -> int:
    return broker.worker_pids()[(TOPIC, 0)]


def base_of(path: Path) -> int:
    return int(path.name[:20])


# -- 1a: a flipped byte in sealed segments while the broker runs -----------------------------------
def test_flipped_bytes_in_sealed_segments_while_running(broker: RunningBroker,
                                                        rng: random.Random) -> None:
    acked = produce(broker, RECORDS)
    segments = segment_files(broker)
    assert len(segments) >= 6, segments
    pid = worker_pid(broker)
    # Three kinds of damage, one per sealed segment, each in a batch in the middle: a byte of
    # the records (CRC), the base offset (not covered by the CRC: only offsets show it) and
    # the batch length (the chain of batches breaks).
    damaged: dict[int, tuple[Path, int, int, int]] = {}  # segment base -> (path, pos, base, next)
    for segment, field in zip(segments[1:4], ("records", "base_offset", "batch_length")):
        batches = batches_of(segment)
        position, size, base, next_offset = batches[rng.randrange(1, len(batches) - 1)]
        at = {"records": position + rng.randrange(HEADER_SIZE, size),
              "base_offset": position + 7, "batch_length": position + 11}[field]
        flip(segment, at, 0x01 if field != "records" else rng.randrange(1, 256))
        damaged[base_of(segment)] = (segment, position, base, next_offset)

    served, errors, end = read_through(broker)
    print("reported:", *errors, sep="\n  ")
    reported = account(acked, served, errors)
    assert end == max(acked) + 1
    for segment_base, (segment, position, base, next_offset) in damaged.items():
        mine = [error for error in errors if error.segment_base_offset == segment_base]
        assert mine, f"the damage in segment {segment_base} at {position} was not reported"
        # the damaged batch's records are reported; the report starts at (or just after) it
        assert any(error.offset <= base and error.position in (position,) for error in mine) \
            or any(error.offset <= base < error.next_offset for error in mine), (mine, position)
        assert all(offset in reported for offset in range(base, next_offset))
        result = dump_log_verify(segment)
        assert result.returncode == 1, result.stdout[-2000:]
        assert f"first corruption at position {position}" in result.stderr, result.stderr
    # Reported ranges stay small: at most one index interval's records or so per damage.
    assert len(reported) <= 3 * (2 * INDEX_INTERVAL_BYTES // 30), sorted(reported)
    assert len(served) + len(reported) == len(acked)

    # The worker was never replaced, and produce and consume go on.
    assert worker_pid(broker) == pid
    more = produce(broker, 200, first=RECORDS)
    assert sorted(more) == list(range(end, end + 200))
    served_more, errors_more, _ = read_through(broker, start=end)
    assert not errors_more and served_more == more


# -- 1b: the active segment torn while the broker is down ------------------------------------------
@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_torn_active_segment_after_a_crash(broker: RunningBroker, rng: random.Random,
                                           damage: str) -> None:
    acked = produce(broker, RECORDS)
    broker.kill()
    active = segment_files(broker)[-1]
    batches = batches_of(active)
    size = active.stat().st_size
    if damage == "truncate":
        cut = rng.randrange(batches[len(batches) // 2][0] + 1, size)
        os.truncate(active, cut)
        whole = [batch for batch in batches if batch[0] + batch[1] <= cut]
        kept_end = whole[-1][3] if whole else base_of(active)
        bad_position = whole[-1][0] + whole[-1][1] if whole else 0
    else:
        with open(active, "ab") as file:
            file.write(rng.randbytes(700))
        kept_end, bad_position = batches[-1][3], size
    broker.start()

    served, errors, end = read_through(broker)
    assert not errors
    assert end == kept_end
    account(acked, served, errors, lost_from=kept_end)
    assert sorted(served) == list(range(kept_end))
    assert f"at position {bad_position}" in broker.log(), broker.log()[-3000:]
    # New records continue right after the recovered end, densely.
    more = produce(broker, 100, first=RECORDS)
    assert sorted(more) == list(range(kept_end, kept_end + 100))
    served_more, errors_more, _ = read_through(broker, start=kept_end)
    assert not errors_more and served_more == more


# -- 1c: a sealed segment torn while the broker is down ------------------------------------------
@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_torn_sealed_segment_after_a_crash(broker: RunningBroker, rng: random.Random,
                                           damage: str) -> None:
    """The decision (storage/recovery.py): a sealed segment is not cut back into a hole that
    would drop the later, healthy segments (and let new records reuse their acknowledged
    offsets).  Junk after its last batch is cut; offsets it lost become a damaged range that
    readers are told about, with its position; every other record is served."""
    acked = produce(broker, RECORDS)
    broker.kill()
    segments = segment_files(broker)
    victim, following = segments[2], segments[3]
    batches = batches_of(victim)
    size = victim.stat().st_size
    if damage == "truncate":
        cut = rng.randrange(batches[1][0] + 1, size)
        os.truncate(victim, cut)
        whole = [batch for batch in batches if batch[0] + batch[1] <= cut]
        lost = (whole[-1][3], base_of(following))
        bad_position = whole[-1][0] + whole[-1][1]
    else:
        with open(victim, "ab") as file:
            file.write(rng.randbytes(700))
    broker.start()

    served, errors, end = read_through(broker)
    assert end == max(acked) + 1  # nothing after the damage was dropped
    reported = account(acked, served, errors)
    if damage == "truncate":
        assert [(e.offset, e.next_offset, e.position, e.segment_base_offset) for e in errors] \
            == [(*lost, bad_position, base_of(victim))]
        assert reported == set(range(*lost))
        assert victim.stat().st_size == cut  # kept for dump-log, never served
        result = dump_log_verify(partition_dir(broker))
        assert result.returncode == 1
        assert f"first corruption at position {bad_position}" in result.stderr, result.stderr
    else:
        assert not errors and len(served) == len(acked)
        assert victim.stat().st_size == size  # the garbage was cut
        assert dump_log_verify(partition_dir(broker)).returncode == 0
    more = produce(broker, 100, first=RECORDS)
    assert sorted(more) == list(range(end, end + 100))  # no acknowledged offset reused


# -- 1d: indexes deleted or zeroed ----------------------------------------------------------------
def _check_lookups(broker: RunningBroker, acked: dict[int, bytes], rng: random.Random) -> None:
    """Reads by offset and offsets_for_times give the right records."""
    offsets = rng.sample(sorted(acked), 25) + [min(acked), max(acked)]
    with Consumer(broker.data_dir) as consumer:
        consumer.assign([TP])
        for offset in offsets:
            consumer.seek(TP, offset)
            deadline = time.monotonic() + READ_TIMEOUT_S
            records: list = []
            while not records:
                assert time.monotonic() < deadline
                records = consumer.poll(timeout_ms=POLL_MS, max_records=1)
            assert (records[0].offset, records[0].value) == (offset, acked[offset])
        numbers = {offset: int(value[7:13]) for offset, value in acked.items()}
        for offset in offsets:
            wanted = BASE_TIMESTAMP_MS + 10 * numbers[offset]
            found = consumer.offsets_for_times({TP: wanted - 5})[TP]
            assert found is not None and tuple(found) == (offset, wanted)


@pytest.mark.parametrize("damage", ["deleted", "zeroed"])
def test_damaged_indexes(broker: RunningBroker, rng: random.Random, damage: str) -> None:
    acked = produce(broker, RECORDS)
    pid = worker_pid(broker)

    def damage_indexes() -> None:
        for path in [*partition_dir(broker).glob("*.index"),
                     *partition_dir(broker).glob("*.timeindex")]:
            if damage == "deleted":
                path.unlink()
            else:
                path.write_bytes(bytes(path.stat().st_size))

    # While running: the worker keeps its entries in memory (index files are written, never
    # read back or mapped), so lookups stay right and appends go on.
    damage_indexes()
    _check_lookups(broker, acked, rng)
    acked |= produce(broker, 150, first=RECORDS)
    _check_lookups(broker, acked, rng)
    assert worker_pid(broker) == pid
    # A clean restart (the files hold what the running worker left) and a crash restart after
    # the damage again: recovery rebuilds them.
    broker.stop()
    broker.start()
    _check_lookups(broker, acked, rng)
    broker.kill()
    damage_indexes()
    broker.start()
    _check_lookups(broker, acked, rng)
    assert "rebuilt" in broker.log()
    served, errors, _ = read_through(broker)
    assert not errors and served == acked


# -- 1e: a flipped byte in the active segment while running ----------------------------------------
def _active_segment_with_flushed_prefix(broker: RunningBroker, acked: dict[int, bytes]
                                        ) -> tuple[Path, int, int]:
    """Stop the broker cleanly (its recovery point is then the log end) until its active
    segment holds a flushed prefix that recovery trusts: a batch before the one named by the
    last offset-index entry below the recovery point.  (segment, recovery point, position of
    that named batch: batches before it are not rescanned after a crash).  Records produced
    meanwhile are added to ``acked``."""
    for attempt in range(10):
        broker.stop()
        broker.start()
        checkpoint = CheckpointFile(str(partition_dir(broker) / RECOVERY_POINT_CHECKPOINT))
        recovery_point = checkpoint.read()["recovery_point_offset"]
        active = segment_files(broker)[-1]
        base = int(active.name[:20])
        raw = np.frombuffer(active.with_suffix(".index").read_bytes(), dtype=">u4")
        keys, positions = raw[0::2].astype(np.int64), raw[1::2].astype(np.int64)
        named = positions[(keys < recovery_point - base) & (positions > 0)]
        if len(named) and len(batches_of(active)) > 2:
            return active, recovery_point, int(named.max())
        acked.update(produce(broker, 40, first=RECORDS + 40 * attempt))  # fill it further
    raise AssertionError("no active segment with an indexed flushed prefix in 10 tries")


@pytest.mark.parametrize("where", ["unflushed tail", "flushed prefix"])
def test_flipped_byte_in_the_active_segment(broker: RunningBroker, rng: random.Random,
                                            where: str) -> None:
    acked = produce(broker, RECORDS)
    with broker.admin() as admin:  # the records' timestamps are old: no time-based roll after
        admin.alter_configs(TOPIC, {**TOPIC_CONFIG, "segment_ms": CENTURY_MS})  # each restart
    active, recovery_point, resume_position = _active_segment_with_flushed_prefix(broker, acked)
    prefix = [batch for batch in batches_of(active) if batch[0] < resume_position]
    acked.update(produce(broker, 20, first=10 * RECORDS))  # an unflushed tail
    if where == "flushed prefix":
        assert segment_files(broker)[-1] == active, "the tail rolled the segment"
        candidates = prefix
    else:
        active = segment_files(broker)[-1]
        tail = [batch for batch in batches_of(active) if batch[2] >= recovery_point]
        candidates = tail[:-1] or tail  # one with a batch after it, if there is one
    assert candidates
    position, size, base, next_offset = rng.choice(candidates)
    flip(active, position + rng.randrange(HEADER_SIZE, size), rng.randrange(1, 256))

    served, errors, end = read_through(broker)
    reported = account(acked, served, errors)
    assert [(error.offset, error.position) for error in errors] == [(base, position)]
    assert reported == set(range(base, next_offset))  # the batch after it gave next_offset

    broker.kill()
    broker.start()
    served, errors, after_crash = read_through(broker)
    if where == "unflushed tail":
        # After a crash, recovery scans what was appended since the recovery point and cuts the
        # active segment at the damaged batch: the acknowledged records from there on are lost
        # -- but *detected* (the consumer was told, and the broker's log names the position):
        # with a single copy there is nothing to restore them from.  New records take the
        # offsets from the cut on.
        assert not errors and after_crash == base
        account(acked, served, errors, lost_from=base)
        assert f"at position {position}" in broker.log()
        first_new = base
    else:
        # Below the recovery point the active segment was fsynced and is not scanned again (as
        # sealed segments are not): the damage stays where it is, is reported on read with its
        # position, and every other record is still served.
        assert [(error.offset, error.position) for error in errors] == [(base, position)]
        assert after_crash == end
        assert account(acked, served, errors) == set(range(base, next_offset))
        first_new = end
    more = produce(broker, 50, first=20 * RECORDS)
    assert sorted(more) == list(range(first_new, first_new + 50))
