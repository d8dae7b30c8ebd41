"""MetaStore: round trips through reopen, validation messages, crash atomicity, a model test.

The model test is a hypothesis state machine; it prints the failing rule sequence, and
``--hypothesis-seed`` replays it.
"""

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from storage_helpers import FakeClock

from shmbroker import limits
from shmbroker.config import LogConfig
from shmbroker.errors import (
    BrokerError,
    InvalidConfigError,
    InvalidPartitionsError,
    InvalidTopicNameError,
    StorageError,
    TopicExistsError,
    UnknownTopicOrPartitionError,
)
from shmbroker.supervisor import meta_store
from shmbroker.supervisor.meta_store import MetaStore, TopicMeta


@pytest.fixture
def clock():
    return FakeClock(now_ms=1_700_000_000_000)


@pytest.fixture
def meta_dir(tmp_path):
    return tmp_path / "data" / "meta"


def reopen(store: MetaStore, clock=None) -> MetaStore:
    return MetaStore(store.meta_dir, now_ms=clock or FakeClock())


def test_fresh_store_is_empty_and_writes_nothing(meta_dir, clock):
    store = MetaStore(meta_dir, now_ms=clock)
    assert meta_dir.is_dir()
    assert store.topics() == []
    assert store.next_topic_id == 1
    assert not (meta_dir / "topics.json").exists()


def test_create_get_list_round_trip(meta_dir, clock):
    store = MetaStore(meta_dir, now_ms=clock)
    metrics = store.create("metrics", 4, {"retention_ms": "3_600_000", "segment_bytes": 1 << 20})
    clock.advance(5)
    alpha = store.create("alpha", 1)
    assert metrics == TopicMeta("metrics", 1, 4, {"retention_ms": 3_600_000,
                                                  "segment_bytes": 1 << 20}, 1_700_000_000_000)
    assert alpha == TopicMeta("alpha", 2, 1, {}, 1_700_000_000_005)
    for view in (store, reopen(store)):
        assert view.topics() == [alpha, metrics]
        assert view.get("metrics") == metrics
        assert view.next_topic_id == 3
    assert metrics.log_config() == LogConfig(retention_ms=3_600_000, segment_bytes=1 << 20)
    defaults = LogConfig(retention_ms=1, flush_messages=1)
    assert metrics.log_config(defaults) == defaults.replace(retention_ms=3_600_000,
                                                            segment_bytes=1 << 20)


def test_snapshot_format(meta_dir, clock):
    store = MetaStore(meta_dir, now_ms=clock)
    store.create("b", 2, {"retention_ms": 5})
    store.create("a", 1)
    text = (meta_dir / "topics.json").read_text()
    assert text == (
        '{"version": 1, "next_topic_id": 3, "topics": [\n'
        '{"config": {}, "created_ms": 1700000000000, "name": "a", "partitions": 1, '
        '"topic_id": 2},\n'
        '{"config": {"retention_ms": 5}, "created_ms": 1700000000000, "name": "b", '
        '"partitions": 2, "topic_id": 1}\n'
        ']}\n')
    assert json.loads(text)["topics"][0] == store.get("a").to_json()
    assert not (meta_dir / "topics.json.tmp").exists()


def test_delete_alter_add_partitions_survive_reopen(meta_dir, clock):
    store = MetaStore(meta_dir, now_ms=clock)
    store.create("keep", 3, {"retention_ms": 10, "flush_messages": 1})
    store.create("drop", 1)
    assert store.delete("drop").name == "drop"
    altered = store.alter_config("keep", {"retention_ms": None, "segment_ms": "60000",
                                          "cleanup_policy": "delete"})
    assert altered.config == {"flush_messages": 1, "segment_ms": 60_000,
                              "cleanup_policy": "delete"}
    grown = store.add_partitions("keep", 8)
    assert grown.partitions == 8 and grown.config == altered.config
    assert grown.topic_id == 1 and grown.created_ms == 1_700_000_000_000
    store = reopen(store)
    assert store.topics() == [grown]
    with pytest.raises(UnknownTopicOrPartitionError, match="unknown topic 'drop'"):
        store.get("drop")


def test_alter_without_change_and_removing_unset_override(meta_dir, clock):
    store = MetaStore(meta_dir, now_ms=clock)
    meta = store.create("t", 1, {"retention_ms": 10})
    before = (meta_dir / "topics.json").stat().st_mtime_ns
    assert store.alter_config("t", {"retention_ms": 10, "segment_ms": None}) == meta
    assert (meta_dir / "topics.json").stat().st_mtime_ns == before


def test_topic_ids_are_never_reused(meta_dir, clock):
    store = MetaStore(meta_dir, now_ms=clock)
    assert store.create("a", 1).topic_id == 1
    store.delete("a")
    store = reopen(store)
    assert store.create("a", 1).topic_id == 2
    store.delete("a")
    store = reopen(store)
    assert store.topics() == []
    assert store.next_topic_id == 3
    assert store.create("b", 1).topic_id == 3


# -- validation -----------------------------------------------------------------------------------

def test_create_validation_messages(meta_dir, clock):
    store = MetaStore(meta_dir, now_ms=clock)
    store.create("metrics", 4)
    with pytest.raises(TopicExistsError, match="^topic 'metrics' already exists$"):
        store.create("metrics", 2)
    with pytest.raises(InvalidTopicNameError, match=r"invalid topic name 'a/b': it contains '/'"):
        store.create("a/b", 1)
    with pytest.raises(InvalidTopicNameError, match=r"invalid topic name '\.\.'"):
        store.create("..", 1)
    with pytest.raises(InvalidPartitionsError, match="int from 1 to 4096, not 0$"):
        store.create("new", 0)
    with pytest.raises(InvalidPartitionsError, match="not 5000$"):
        store.create("new", 5000)
    with pytest.raises(InvalidConfigError, match="unknown config 'retention'; known configs"):
        store.create("new", 1, {"retention": 5})
    with pytest.raises(InvalidConfigError, match="segment_bytes must be >= 14 bytes, not 1"):
        store.create("new", 1, {"segment_bytes": 1})
    with pytest.raises(InvalidConfigError, match="takes an integer"):
        store.create("new", 1, {"retention_ms": "soon"})
    with pytest.raises(InvalidConfigError, match="mapping of name -> value"):
        store.create("new", 1, [("retention_ms", 5)])
    with pytest.raises(InvalidConfigError, match="config names are str, not 5"):
        store.create("new", 1, {5: 5})
    store = reopen(store)
    assert [meta.name for meta in store.topics()] == ["metrics"]
    assert store.next_topic_id == 2  # failed creates consume no id


def test_topics_max(meta_dir, clock, monkeypatch):
    monkeypatch.setattr(limits, "topics_max", 2)
    store = MetaStore(meta_dir, now_ms=clock)
    store.create("a", 1)
    store.create("b", 1)
    with pytest.raises(BrokerError, match="already has 2 topics, the limit \\(topics_max\\)"):
        store.create("c", 1)
    store.delete("a")
    store.create("c", 1)


def test_unknown_topic_messages(meta_dir, clock):
    store = MetaStore(meta_dir, now_ms=clock)
    for call in (lambda: store.get("x"), lambda: store.delete("x"),
                 lambda: store.alter_config("x", {}), lambda: store.add_partitions("x", 3)):
        with pytest.raises(UnknownTopicOrPartitionError) as raised:
            call()
        assert str(raised.value) == "unknown topic 'x'"
    with pytest.raises(UnknownTopicOrPartitionError, match="^unknown topic None$"):
        store.get(None)


def test_add_partitions_only_grows(meta_dir, clock):
    store = MetaStore(meta_dir, now_ms=clock)
    store.create("x", 4)
    for total in (2, 4):
        with pytest.raises(InvalidPartitionsError) as raised:
            store.add_partitions("x", total)
        assert str(raised.value) == (
            f"topic 'x' has 4 partitions; it can only grow (asked for {total})")
    with pytest.raises(InvalidPartitionsError, match="from 1 to 4096, not 4097"):
        store.add_partitions("x", 4097)
    assert store.get("x").partitions == 4


def test_alter_config_validates_the_merged_config(meta_dir, clock):
    store = MetaStore(meta_dir, now_ms=clock)
    store.create("x", 1, {"retention_ms": 7})
    with pytest.raises(InvalidConfigError, match="unknown config 'nope'"):
        store.alter_config("x", {"nope": None})
    with pytest.raises(InvalidConfigError, match="unknown config 'nope'"):
        store.alter_config("x", {"nope": 1})
    with pytest.raises(InvalidConfigError, match="retention_ms must be >= -1 ms, not -5"):
        store.alter_config("x", {"retention_ms": -5, "segment_ms": 100})
    with pytest.raises(InvalidConfigError, match="cleanup_policy must be one of delete"):
        store.alter_config("x", {"cleanup_policy": "compact"})
    with pytest.raises(InvalidConfigError, match="mapping of name -> value or None"):
        store.alter_config("x", "retention_ms=5")
    assert reopen(store).get("x").config == {"retention_ms": 7}


# -- crashes and corruption -----------------------------------------------------------------------

class Crash(BaseException):
    """The process dying at this point (not an OSError: nothing catches it)."""


def crash(*args, **kwargs):
    raise Crash()


@pytest.mark.parametrize("point, survives", [
    ("fsync", False), ("replace", False), ("fsync_directory", True),
])
def test_crash_at_any_point_leaves_old_or_new_snapshot(meta_dir, clock, monkeypatch, point,
                                                       survives):
    store = MetaStore(meta_dir, now_ms=clock)
    store.create("old", 2)
    old_text = (meta_dir / "topics.json").read_text()
    target = meta_store if point == "fsync_directory" else os
    monkeypatch.setattr(target, point, crash)
    with pytest.raises(Crash):
        store.create("new", 1)
    monkeypatch.undo()
    survivor = reopen(store)
    assert not (meta_dir / "topics.json.tmp").exists()
    names = [meta.name for meta in survivor.topics()]
    assert names == (["new", "old"] if survives else ["old"])
    if not survives:
        assert (meta_dir / "topics.json").read_text() == old_text


def test_failed_rename_is_storage_error_and_store_stays_usable(meta_dir, clock, monkeypatch):
    store = MetaStore(meta_dir, now_ms=clock)
    store.create("old", 2)

    def refuse(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(StorageError, match="No space left on device; nothing was changed"):
        store.create("new", 1)
    monkeypatch.undo()
    assert not (meta_dir / "topics.json.tmp").exists()
    assert [meta.name for meta in store.topics()] == ["old"]
    assert [meta.name for meta in reopen(store).topics()] == ["old"]
    assert store.create("new", 1).topic_id == 2


def test_failed_directory_fsync_makes_store_unusable_until_reopened(meta_dir, clock,
                                                                    monkeypatch):
    store = MetaStore(meta_dir, now_ms=clock)

    def refuse(directory):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(meta_store, "fsync_directory", refuse)
    with pytest.raises(StorageError, match="may or may not survive a crash"):
        store.create("t", 1)
    monkeypatch.undo()
    with pytest.raises(StorageError, match="unusable until reopened: fsync of .* failed"):
        store.topics()
    with pytest.raises(StorageError, match="unusable until reopened"):
        store.create("u", 1)
    assert [meta.name for meta in reopen(store).topics()] == ["t"]


def test_leftover_tmp_is_ignored_and_removed(meta_dir, clock):
    store = MetaStore(meta_dir, now_ms=clock)
    store.create("a", 1)
    (meta_dir / "topics.json.tmp").write_text('{"version": 1, "next_top')  # a crash mid-write
    store = reopen(store)
    assert [meta.name for meta in store.topics()] == ["a"]
    assert not (meta_dir / "topics.json.tmp").exists()


def test_tmp_only_means_the_first_write_never_finished(meta_dir, clock):
    meta_dir.mkdir(parents=True)
    (meta_dir / "topics.json.tmp").write_text("garbage")
    assert MetaStore(meta_dir, now_ms=clock).topics() == []


GOOD_TOPIC = {"name": "a", "topic_id": 1, "partitions": 1, "config": {}, "created_ms": 0}


def document(**changes):
    return json.dumps({"version": 1, "next_topic_id": 2, "topics": [GOOD_TOPIC], **changes})


@pytest.mark.parametrize("content, problem", [
    ("", "Expecting value"),
    (b"\xff\xfe", "codec can't decode"),
    ('{"version": 1, "next_topic_id": 2, "topics": [', "Expecting value"),
    ("[]", "not an object with the keys version, next_topic_id, topics"),
    (document(version=2), "unknown version 2"),
    (document(version=True), "unknown version True"),
    (document(next_topic_id=1), "topic_id 1, which is repeated or not below next_topic_id 1"),
    (document(next_topic_id="2"), "next_topic_id is '2'"),
    (document(topics={}), "topics is not a list"),
    (document(topics=[GOOD_TOPIC, GOOD_TOPIC]), "topic 'a' appears twice"),
    (document(topics=[GOOD_TOPIC, {**GOOD_TOPIC, "name": "b"}]), "repeated"),
    (document(topics=[{**GOOD_TOPIC, "name": "a/b"}]), "invalid topic name 'a/b'"),
    (document(topics=[{**GOOD_TOPIC, "partitions": 0}]), "topic 'a': a partition count"),
    (document(topics=[{**GOOD_TOPIC, "config": {"x": 1}}]), "topic 'a': unknown config 'x'"),
    (document(topics=[{**GOOD_TOPIC, "topic_id": -1}]), "topic_id is -1"),
    (document(topics=[{**GOOD_TOPIC, "created_ms": 1.5}]), "created_ms is 1.5"),
    (document(topics=[{**GOOD_TOPIC, "extra": 1}]), "a topic has the keys"),
    (document(topics=[7]), "a topic is a JSON object, not 7"),
    ('{"version": NaN, "next_topic_id": 2, "topics": []}', "NaN is not valid JSON"),
    ("[" * 100_000 + "]" * 100_000, "recursion"),
])
def test_corrupt_snapshot_is_storage_error(meta_dir, content, problem):
    meta_dir.mkdir(parents=True)
    path = meta_dir / "topics.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(StorageError) as raised:
        MetaStore(meta_dir)
    message = str(raised.value)
    assert message.startswith(f"topic metadata {path} is corrupt: ")
    assert problem in message
    assert path.read_bytes() == (content if isinstance(content, bytes) else content.encode())


def test_oversized_snapshot_is_storage_error(meta_dir, monkeypatch):
    monkeypatch.setattr(meta_store, "SNAPSHOT_BYTES_MAX", 10)
    meta_dir.mkdir(parents=True)
    (meta_dir / "topics.json").write_text(document())
    with pytest.raises(StorageError, match="is corrupt: it is larger than 10 bytes"):
        MetaStore(meta_dir)


def test_unreadable_snapshot_is_storage_error(meta_dir):
    (meta_dir / "topics.json").mkdir(parents=True)  # a directory where the file should be
    with pytest.raises(StorageError, match="cannot read topic metadata .*topics.json"):
        MetaStore(meta_dir)


def test_meta_dir_that_is_a_file_is_storage_error(tmp_path):
    (tmp_path / "meta").write_text("")
    with pytest.raises(StorageError, match="cannot open topic metadata in"):
        MetaStore(tmp_path / "meta")


# -- model test -----------------------------------------------------------------------------------

NAMES = st.sampled_from(["a", "b", "c.d", "e_f", "g-h"])
CHANGES = st.dictionaries(
    st.sampled_from(["retention_ms", "segment_bytes", "flush_messages", "cleanup_policy"]),
    st.one_of(st.none(), st.integers(-10, 2000), st.just("delete"), st.just("compact")),
    max_size=3)


def expected_overrides(config, changes):
    """The model's answer: merged overrides, or None if the merged config is invalid."""
    merged = dict(config)
    for key, value in changes.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = value
    try:
        LogConfig.from_mapping(merged)
    except InvalidConfigError:
        return None
    return merged


class MetaStoreMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.directory = Path(tempfile.mkdtemp(prefix="shmbroker-meta-"))
        self.clock = FakeClock(now_ms=1000)
        self.store = MetaStore(self.directory / "meta", now_ms=self.clock)
        self.model: dict[str, TopicMeta] = {}
        self.next_topic_id = 1

    def teardown(self):
        shutil.rmtree(self.directory, ignore_errors=True)

    @rule(name=NAMES, partitions=st.integers(0, 6), config=CHANGES)
    def create(self, name, partitions, config):
        self.clock.advance(1)
        config = {key: value for key, value in config.items() if value is not None}
        valid = expected_overrides({}, config) is not None
        if name in self.model:
            with pytest.raises(TopicExistsError):
                self.store.create(name, partitions, config)
        elif partitions < 1 or not valid:
            with pytest.raises((InvalidPartitionsError, InvalidConfigError)):
                self.store.create(name, partitions, config)
        else:
            expected = TopicMeta(name, self.next_topic_id, partitions, config, self.clock.now_ms)
            assert self.store.create(name, partitions, config) == expected
            self.model[name] = expected
            self.next_topic_id += 1

    @rule(name=NAMES)
    def delete(self, name):
        if name in self.model:
            assert self.store.delete(name) == self.model.pop(name)
        else:
            with pytest.raises(UnknownTopicOrPartitionError):
                self.store.delete(name)

    @rule(name=NAMES, changes=CHANGES)
    def alter_config(self, name, changes):
        if name not in self.model:
            with pytest.raises(UnknownTopicOrPartitionError):
                self.store.alter_config(name, changes)
            return
        merged = expected_overrides(self.model[name].config, changes)
        if merged is None:
            with pytest.raises(InvalidConfigError):
                self.store.alter_config(name, changes)
        else:
            self.model[name] = TopicMeta(name, self.model[name].topic_id,
                                         self.model[name].partitions, merged,
                                         self.model[name].created_ms)
            assert self.store.alter_config(name, changes) == self.model[name]

    @rule(name=NAMES, total=st.integers(0, 10))
    def add_partitions(self, name, total):
        if name not in self.model:
            with pytest.raises(UnknownTopicOrPartitionError):
                self.store.add_partitions(name, total)
        elif total <= self.model[name].partitions:
            with pytest.raises(InvalidPartitionsError):
                self.store.add_partitions(name, total)
        else:
            old = self.model[name]
            self.model[name] = TopicMeta(name, old.topic_id, total, old.config, old.created_ms)
            assert self.store.add_partitions(name, total) == self.model[name]

    @rule()
    def reopen(self):
        self.store = MetaStore(self.directory / "meta", now_ms=self.clock)

    @invariant()
    def matches_model(self):
        assert self.store.topics() == [self.model[name] for name in sorted(self.model)]
        assert self.store.next_topic_id == self.next_topic_id


MetaStoreMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestMetaStoreModel = MetaStoreMachine.TestCase
