"""OffsetLog against a dict model: (group, topic, partition) -> (offset, metadata).

Random sequences of stage / delete / sync / reopen / crash.  A crash drops what was staged, cuts
the file at a random byte ``k`` (and may flip one byte before ``k``) at or after the last
compaction point; the model then keeps exactly the records that lie wholly before ``k`` (and
before the flipped byte): synced state is never lost except what the crash cut.

Seeded: the seed is SHMBROKER_TEST_SEED (default below); hypothesis prints the failing rule
sequence, and the same seed replays it.
"""

import os
import shutil
import tempfile

from hypothesis import HealthCheck, event, seed, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from shmbroker.storage.offset_log import FILE_HEADER_BYTES, LOG_NAME, OffsetLog

SEED = int(os.environ.get("SHMBROKER_TEST_SEED", "20240917"))
_seed_printed = False

GROUPS = st.sampled_from(["g0", "g1", "gruppe-ä", "g" * 249])
TOPICS = st.sampled_from(["t0", "t1", "topic.with-dots_2"])
METADATA = st.one_of(st.none(), st.sampled_from(["", "m", "métadonnée", "x" * 300]))
COMMIT = st.tuples(TOPICS, st.integers(0, 3), st.integers(0, 2**63 - 1), METADATA,
                   st.integers(-1, 5))


def replay(state, ops):
    state = dict(state)
    for op in ops:
        kind = op[0]
        if kind == "commit":
            _, group, topic, partition, offset, metadata = op
            state[group, topic, partition] = (offset, metadata)
        elif kind == "group":
            state = {key: value for key, value in state.items() if key[0] != op[1]}
        else:
            state = {key: value for key, value in state.items() if key[1] != op[1]}
    return state


class Clock:
    def __init__(self):
        self.now_ms = 1_700_000_000_000

    def __call__(self):
        self.now_ms += 7
        return self.now_ms


@seed(SEED)
class OffsetLogMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        global _seed_printed
        if not _seed_printed:  # shown with the captured output of a failure
            print(f"offset log model: SHMBROKER_TEST_SEED={SEED}")
            _seed_printed = True
        self.directory = tempfile.mkdtemp(prefix="shmbroker-offsets-model-")
        self.clock = Clock()
        self.log = self._open()
        self.durable = {}  # the model: what the log must hold
        self.staged = []  # model ops staged since the last sync
        # The file from base_position on holds one record per op of appended_ops; base_state is
        # the model at base_position (a compaction rewrites the file: nothing before it can be
        # cut by a crash, which happens at or after it).
        self.base_position = self.log.size_bytes
        self.base_state = {}
        self.appended_ops = []

    def _open(self):
        return OffsetLog(self.directory, compact_ratio=2.0, compact_bytes_min=1500,
                         clock_ms=self.clock)

    def _reset_base(self):
        self.base_position = self.log.size_bytes
        self.base_state = dict(self.durable)
        self.appended_ops = []

    def teardown(self):
        self.log.close()
        shutil.rmtree(self.directory, ignore_errors=True)

    # -- rules ------------------------------------------------------------------------------------
    # (each staging rule may sync right away: hypothesis's swarm testing often leaves few syncs)
    @rule(group=GROUPS, commits=st.lists(COMMIT, min_size=1, max_size=6), then_sync=st.booleans())
    def stage(self, group, commits, then_sync):
        assert self.log.stage(group, commits) == len(commits)
        self.staged += [("commit", group, topic, partition, offset, metadata)
                        for topic, partition, offset, metadata, _ in commits]
        if then_sync:
            self.sync()

    @rule(group=GROUPS, then_sync=st.booleans())
    def delete_group(self, group, then_sync):
        self.log.delete_group(group)
        self.staged.append(("group", group))
        if then_sync:
            self.sync()

    @rule(topic=TOPICS, then_sync=st.booleans())
    def delete_topic(self, topic, then_sync):
        self.log.delete_topic(topic)
        self.staged.append(("topic", topic))
        if then_sync:
            self.sync()

    @rule()
    def sync(self):
        compactions = self.log.statistics().compactions
        commits = sum(1 for op in self.staged if op[0] == "commit")
        assert self.log.sync() == commits
        self.durable = replay(self.durable, self.staged)
        if self.log.statistics().compactions != compactions:
            event("sync compacted the log")
            self._reset_base()
        else:
            self.appended_ops += self.staged
        self.staged = []

    @rule()
    def reopen(self):
        self.log.close()
        self.staged = []
        self.log = self._open()
        assert self.log.recovery_report.truncated_bytes == 0
        if self.log.recovery_report.compacted_from_bytes is not None:
            self._reset_base()

    @rule(data=st.data(), flip=st.booleans())
    def crash(self, data, flip):
        self.log.close()
        self.staged = []
        path = os.path.join(self.directory, LOG_NAME)
        with open(path, "rb") as file:
            content = bytearray(file.read())
        size = len(content)
        assert size == self.log.size_bytes
        # record ends from base_position, read straight from the u32 length fields
        ends, position = [], self.base_position
        while position < size:
            position += 4 + int.from_bytes(content[position : position + 4], "big")
            ends.append(position)
        assert position == size and len(ends) == len(self.appended_ops)
        cut = data.draw(st.integers(self.base_position, size), label="cut")
        kept = sum(1 for end in ends if end <= cut)
        del content[cut:]
        if flip and cut > self.base_position:
            flipped = data.draw(st.integers(self.base_position, cut - 1), label="flipped byte")
            content[flipped] ^= data.draw(st.integers(1, 255), label="xor")
            kept = min(kept, sum(1 for end in ends if end <= flipped))
        with open(path, "wb") as file:
            file.write(content)
        event("crash: records lost" if kept < len(ends) else "crash: nothing synced lost")
        self.appended_ops = self.appended_ops[:kept]
        self.durable = replay(self.base_state, self.appended_ops)
        self.log = self._open()
        report = self.log.recovery_report
        survived = ends[kept - 1] if kept else self.base_position
        if report.compacted_from_bytes is None:
            assert self.log.size_bytes == survived
        assert report.truncated_bytes == len(content) - survived
        if report.compacted_from_bytes is not None:
            event("reopen after a crash compacted the log")
            self._reset_base()

    # -- invariants -------------------------------------------------------------------------------
    @invariant()
    def log_equals_model(self):
        groups = sorted({group for group, _, _ in self.durable})
        assert self.log.groups() == groups
        for group in groups:
            expected = {(topic, partition): value
                        for (g, topic, partition), value in self.durable.items() if g == group}
            assert self.log.offsets(group) == expected
        assert self.log.live_entries == len(self.durable)
        assert self.log.size_bytes == os.path.getsize(os.path.join(self.directory, LOG_NAME))
        assert self.log.size_bytes >= FILE_HEADER_BYTES + self.log.live_bytes


OffsetLogMachine.TestCase.settings = settings(
    max_examples=120, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
TestOffsetLogModel = OffsetLogMachine.TestCase
