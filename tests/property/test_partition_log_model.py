"""PartitionLog against an in-memory model: a list of (base offset, stored batch bytes).

Hypothesis prints the failing rule sequence; ``--hypothesis-seed`` replays it.
"""

import os
import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from storage_helpers import FakeClock, make_batch, split_batches  # noqa: E402

from shmbroker.config import LogConfig  # noqa: E402
from shmbroker.errors import StorageError  # noqa: E402
from shmbroker.format.record_batch import (  # noqa: E402
    decode_columnar,
    iter_batch_positions,
    read_header,
)
from shmbroker.storage.partition_log import PartitionLog  # noqa: E402

BATCH = st.builds(
    lambda count, size, start, step, tag: make_batch(
        [bytes([tag]) * size] * count,
        timestamps=[start + step * index for index in range(count)]),
    count=st.integers(1, 4), size=st.integers(0, 300), start=st.integers(0, 5000),
    step=st.integers(-3, 50), tag=st.integers(0, 255))


class PartitionLogMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.directory = tempfile.mkdtemp(prefix="shmbroker-model-")
        self.clock = FakeClock(now_ms=10_000)
        self.config = LogConfig(segment_bytes=700, index_interval_bytes=100,
                                segment_index_bytes=96, retention_ms=60_000,
                                retention_bytes=3000, flush_messages=5)
        self.log = PartitionLog(self.directory, self.config, clock_ms=self.clock)
        self.model: list[tuple[int, bytes]] = []  # (base offset, batch) from log_start's batch
        self.log_start = 0
        self.log_end = 0
        self.ticket = None  # a flush begun (begin_flush) and not ended yet
        self.ticket_stale = False  # a truncation since it began: it may advance nothing

    def _drop_ticket(self):
        if self.ticket is not None:
            self.ticket.discard()
            self.ticket = None

    def teardown(self):
        self._drop_ticket()
        if not self.log.is_closed:
            self.log.close()
        shutil.rmtree(self.directory, ignore_errors=True)

    def _drop_before(self, log_start):
        self.model = [(base, batch) for base, batch in self.model
                      if base + read_header(batch).last_offset_delta >= log_start]

    # -- rules ----------------------------------------------------------------------------------
    @rule(batches=st.lists(BATCH, min_size=1, max_size=3), writable=st.booleans(),
          defer=st.booleans())
    def append(self, batches, writable, defer):
        buffer = b"".join(batches)
        flushed = self.log.flushed_offset
        result = self.log.append(bytearray(buffer) if writable else buffer, defer_flush=defer)
        if defer:  # the caller owns flush_messages: nothing was flushed here
            assert self.log.flushed_offset == flushed
        assert result.first_offset == self.log_end
        offset = self.log_end
        for batch, base in zip(batches, result.base_offsets, strict=True):
            assert base == offset
            self.model.append((base, base.to_bytes(8, "big") + batch[8:]))
            offset += read_header(batch).last_offset_delta + 1
        self.log_end = offset
        assert result.last_offset == offset - 1

    @rule(data=st.data(), max_bytes=st.integers(1, 2000))
    def read(self, data, max_bytes):
        offset = data.draw(st.integers(self.log_start, self.log_end))
        got = self.log.read_bytes(offset, max_bytes)
        if offset == self.log_end:
            assert got == b""
            return
        batches = split_batches(got)
        first = next(i for i, (base, batch) in enumerate(self.model)
                     if base + read_header(batch).last_offset_delta >= offset)
        assert batches == [batch for _, batch in self.model[first : first + len(batches)]]
        assert len(batches) == 1 or len(got) <= max_bytes
        piece = self.log.read(offset, max_bytes)
        last_base, last_batch = self.model[first + len(batches) - 1]
        assert piece.next_offset == last_base + read_header(last_batch).last_offset_delta + 1

    @rule()
    def begin_flush(self):
        if self.ticket is None:
            self.ticket = self.log.begin_flush()
            self.ticket_stale = False
            if self.ticket is None:
                assert self.log.flushed_offset == self.log_end
            else:
                assert self.ticket.offset == self.log_end

    @rule(fail=st.booleans())
    def end_flush(self, fail):
        if self.ticket is None:
            return
        ticket, self.ticket = self.ticket, None
        flushed = self.log.flushed_offset
        if fail:  # a failed fsync fences the log: reopen it, as a worker's restart does
            ticket.discard()
            try:
                self.log.end_flush(ticket, OSError(5, "Input/output error"))
            except StorageError:
                pass
            else:
                raise AssertionError("a failed flush must fence the log")
            assert self.log.fenced is not None
            self.log.abandon()
            self.log = PartitionLog(self.directory, self.config, clock_ms=self.clock)
            return
        self.log.end_flush(ticket, ticket.run())
        if self.ticket_stale:
            assert self.log.flushed_offset == flushed
        else:
            assert self.log.flushed_offset == max(flushed, ticket.offset)

    @rule(batches=st.lists(BATCH, min_size=1, max_size=3), data=st.data(),
          max_bytes=st.integers(1, 2000))
    def group_commit(self, batches, data, max_bytes):
        """What a worker does with flush_messages = 1: a flush runs while more is appended
        (deferred), then reads of flushed batches only stop where that flush ended."""
        if self.ticket is None:
            self.begin_flush()
        self.append(batches, writable=True, defer=True)
        if self.ticket is not None:
            self.end_flush(fail=False)
        self.read_flushed(data, max_bytes)

    @rule(data=st.data())
    def flush_across_truncation(self, data):
        """A flush begun before a truncation (a mirror's) must not claim what came after."""
        if self.ticket is not None or self.log_end == self.log_start:
            return
        self.begin_flush()
        if self.ticket is None:
            return
        self.truncate_to(data)
        if data.draw(st.booleans(), label="append again"):
            self.append([data.draw(BATCH, label="batch")], writable=True, defer=True)
        self.end_flush(fail=False)

    @rule(data=st.data(), max_bytes=st.integers(1, 2000))
    def read_flushed(self, data, max_bytes):
        offset = data.draw(st.integers(self.log_start, self.log_end), label="offset")
        piece = self.log.read(offset, max_bytes, flushed_only=True)
        flushed = self.log.flushed_offset
        if offset >= flushed:
            assert piece.size_bytes == 0 and piece.next_offset == offset
            return
        assert piece.size_bytes > 0 and piece.next_offset <= flushed
        whole = self.log.read(offset, max_bytes)
        assert whole.position == piece.position and whole.size_bytes >= piece.size_bytes

    @rule(data=st.data())
    def offset_for_timestamp(self, data):
        target = data.draw(st.integers(-1, 6000))
        expected = None
        for _, batch in self.model:
            columns = decode_columnar(batch)
            for offset, timestamp in zip(columns.offsets, columns.timestamps, strict=True):
                if offset >= self.log_start and timestamp >= target:
                    expected = (int(offset), int(timestamp))
                    break
            if expected:
                break
        assert self.log.offset_for_timestamp(target) == expected

    @rule(delta_ms=st.sampled_from([0, 1000, 30_000, 61_000]))
    def tick(self, delta_ms):
        self.clock.advance(delta_ms)
        sizes = {s.base_offset: s.size_bytes for s in self.log.segments}
        deleted = self.log.tick()
        for base in deleted:
            assert base in sizes
        assert self.log.log_start_offset >= self.log_start
        if deleted:
            assert self.log.log_start_offset == self.log.segments[0].base_offset
            self.log_start = self.log.log_start_offset
            self._drop_before(self.log_start)

    @rule(data=st.data())
    def truncate_to(self, data):
        offset = data.draw(st.integers(0, self.log_end + 2))
        self.log.truncate_to(offset)
        if offset < self.log_end:
            self.ticket_stale = True
        if offset >= self.log_end:
            return
        if offset < self.log_start:
            self.model, self.log_start, self.log_end = [], offset, offset
            return
        self.model = [(base, batch) for base, batch in self.model
                      if base + read_header(batch).last_offset_delta < offset]
        self.log_end = (self.model[-1][0] + read_header(self.model[-1][1]).last_offset_delta + 1
                        if self.model else self.log_start)
        if self.log_end < self.log_start:
            self.model, self.log_end = [], self.log_start

    @rule(data=st.data())
    def delete_records_before(self, data):
        offset = data.draw(st.integers(self.log_start, self.log_end))
        assert self.log.delete_records_before(offset) == max(offset, self.log_start)
        self.log_start = max(offset, self.log_start)
        self._drop_before(self.log_start)

    @rule()
    def close_reopen(self):
        self._drop_ticket()
        self.log.close()
        self.log = PartitionLog(self.directory, self.config, clock_ms=self.clock)
        assert self.log.recovery_report.segments_scanned == 0

    @rule(data=st.data(), damage=st.sampled_from(["none", "delete", "zero", "garbage", "cut"]))
    def crash(self, data, damage):
        self._drop_ticket()
        active_base = self.log.segments[-1].base_offset
        self.log.abandon()
        logs = sorted(name for name in os.listdir(self.directory) if name.endswith(".log"))
        active_path = os.path.join(self.directory, logs[-1])
        # where each batch of the active segment ends in its file (batches dropped from the
        # model by delete_records_before still occupy their bytes)
        ends = {header.base_offset: position + header.size for position, header
                in iter_batch_positions(Path(active_path).read_bytes())}
        cut = data.draw(st.integers(0, os.path.getsize(active_path)), label="cut")
        os.truncate(active_path, cut)
        if damage != "none":
            name = data.draw(st.sampled_from(logs), label="damaged segment")
            suffix = data.draw(st.sampled_from([".index", ".timeindex"]), label="index")
            path = os.path.join(self.directory, name[:-4] + suffix)
            size = os.path.getsize(path)
            if damage == "delete":
                os.unlink(path)
            elif damage == "zero":
                Path(path).write_bytes(bytes(size))
            elif damage == "garbage":
                Path(path).write_bytes(os.urandom(max(size, 24)))
            elif name == logs[-1]:
                os.truncate(path, size // 2)
            else:
                os.truncate(path, max(0, size - 5))
        # the model: the active segment keeps the batches wholly before the cut
        kept = []
        for base, batch in self.model:
            if base >= active_base and ends[base] > cut:
                break
            kept.append((base, batch))
        self.model = kept
        self.log_end = (kept[-1][0] + read_header(kept[-1][1]).last_offset_delta + 1
                        if kept else active_base)
        if self.log_start > self.log_end:  # the log restarts empty at its durable start
            self.model, self.log_end = [], self.log_start
        self.log = PartitionLog(self.directory, self.config, clock_ms=self.clock)


    # -- invariants -----------------------------------------------------------------------------
    @invariant()
    def cursors_match(self):
        assert (self.log.log_start_offset, self.log.log_end_offset) == (self.log_start,
                                                                         self.log_end)
        assert self.log.flushed_offset <= self.log.log_end_offset

    @invariant()
    def files_end_at_their_data(self):
        """No release of reserved space (left to a ticket by a roll) ever extends or cuts a
        segment's file: each ends where its data does."""
        for segment in self.log.segments:
            assert os.path.getsize(segment.log_path) == segment.size_bytes

    @invariant()
    def every_batch_readable(self):
        if self.model:
            got = split_batches(self.log.read_bytes(self.log_start, 10**9))
            assert got == [batch for _, batch in self.model][: len(got)]


PartitionLogMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
TestPartitionLogModel = PartitionLogMachine.TestCase
