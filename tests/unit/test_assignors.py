"""The server-side assignors: Kafka's documented examples, then properties with hypothesis.

Seeded: SHMBROKER_TEST_SEED (default below) replays a failure; hypothesis prints the example.
"""

import os
import random

import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from shmbroker.coordinator.assignors import (
    ASSIGNORS,
    MemberSpec,
    assignment_problems,
    member_order,
    range_assign,
    roundrobin_assign,
    sticky_assign,
)

SEED = int(os.environ.get("SHMBROKER_TEST_SEED", "848"))
print(f"assignor properties: SHMBROKER_TEST_SEED={SEED}")
PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def tps(*names):
    """tps("t0p1", "t1p0") -> {("t0", 1), ("t1", 0)}"""
    return frozenset((name.split("p")[0], int(name.split("p")[1])) for name in names)


def specs(**subscriptions):
    return {member: MemberSpec(frozenset(topics)) for member, topics in subscriptions.items()}


# -- Kafka's examples ---------------------------------------------------------------------------
def test_range_kafka_example_two_consumers_two_topics():
    result = range_assign(specs(C0=["t0", "t1"], C1=["t0", "t1"]), {"t0": 3, "t1": 3})
    assert result == {"C0": tps("t0p0", "t0p1", "t1p0", "t1p1"), "C1": tps("t0p2", "t1p2")}


def test_roundrobin_kafka_example_two_consumers_two_topics():
    result = roundrobin_assign(specs(C0=["t0", "t1"], C1=["t0", "t1"]), {"t0": 3, "t1": 3})
    assert result == {"C0": tps("t0p0", "t0p2", "t1p1"), "C1": tps("t0p1", "t1p0", "t1p2")}


def test_roundrobin_kafka_example_unequal_subscriptions():
    # RoundRobinAssignor's javadoc: C0 [t0], C1 [t0, t1], C2 [t0, t1, t2]; t0 1, t1 2, t2 3.
    result = roundrobin_assign(specs(C0=["t0"], C1=["t0", "t1"], C2=["t0", "t1", "t2"]),
                               {"t0": 1, "t1": 2, "t2": 3})
    assert result == {"C0": tps("t0p0"), "C1": tps("t1p0"),
                      "C2": tps("t1p1", "t2p0", "t2p1", "t2p2")}


def test_range_extra_partitions_go_to_the_first_members():
    result = range_assign(specs(C0=["t"], C1=["t"], C2=["t"]), {"t": 7})
    assert result == {"C0": tps("tp0", "tp1", "tp2"), "C1": tps("tp3", "tp4"),
                      "C2": tps("tp5", "tp6")}


def test_range_per_topic_only_among_its_subscribers():
    result = range_assign(specs(C0=["a"], C1=["a", "b"], C2=["b"]), {"a": 2, "b": 4})
    assert result == {"C0": tps("ap0"), "C1": tps("ap1", "bp0", "bp1"), "C2": tps("bp2", "bp3")}


def test_static_members_sort_first_by_instance_id():
    members = {"m-a": MemberSpec(frozenset({"t"})),
               "m-b": MemberSpec(frozenset({"t"}), instance_id="z"),
               "m-c": MemberSpec(frozenset({"t"}), instance_id="y")}
    assert member_order(members) == ["m-c", "m-b", "m-a"]
    assert range_assign(members, {"t": 3}) == {"m-c": tps("tp0"), "m-b": tps("tp1"),
                                               "m-a": tps("tp2")}


def test_missing_topics_and_empty_groups():
    for assign in ASSIGNORS.values():
        assert assign({}, {"t": 3}) == {}
        assert assign(specs(C0=["nope"], C1=[]), {"t": 3}) == {"C0": frozenset(),
                                                                "C1": frozenset()}


def test_sticky_kafka_example_keeps_survivors_partitions():
    # StickyAssignor's javadoc: C0, C1, C2 on t0..t3 of 2 partitions each; C1 goes away.
    current = {"C0": tps("t0p0", "t1p1", "t3p0"), "C2": tps("t1p0", "t2p1")}
    topics = frozenset({"t0", "t1", "t2", "t3"})
    members = {member: MemberSpec(topics, owned) for member, owned in current.items()}
    result = sticky_assign(members, dict.fromkeys(topics, 2))
    assert result["C0"] >= current["C0"] and result["C2"] >= current["C2"]
    assert sorted(map(len, result.values())) == [4, 4]
    assert not assignment_problems(result, members, dict.fromkeys(topics, 2))


def test_sticky_new_member_takes_only_the_excess():
    before = sticky_assign(specs(C0=["t"], C1=["t"]), {"t": 8})
    members = {member: MemberSpec(frozenset({"t"}), before[member]) for member in before}
    members["C2"] = MemberSpec(frozenset({"t"}))
    after = sticky_assign(members, {"t": 8})
    moved = sum(len(before[member] - after[member]) for member in before)
    assert moved == 2 and len(after["C2"]) == 2
    assert sorted(map(len, after.values())) == [2, 3, 3]


def test_assignment_problems_reports_each_fault():
    members = specs(C0=["t"], C1=["u"])
    problems = assignment_problems({"C0": tps("tp0", "up0", "tp9"), "C1": tps("tp0")}, members,
                                   {"t": 2, "u": 1})
    text = "\n".join(problems)
    assert "C0 is given u/0 but does not subscribe to 'u'" in text
    assert "C0 is given t/9, which does not exist" in text
    assert "C1 is given t/0 but does not subscribe" in text
    assert "t/0 is given to both C0 and C1" in text
    assert "t/1 is subscribed to but given to nobody" in text
    assert "members ['C0', 'C1'] but assignment for ['C0']" in "\n".join(
        assignment_problems({"C0": frozenset()}, members, {"t": 2}, complete=False))


# -- properties ---------------------------------------------------------------------------------
TOPIC_NAMES = ["a", "b", "c", "d"]


@st.composite
def groups(draw, uniform=False):
    """(members, partitions_by_topic): up to 7 members, 4 topics of 0-9 partitions (0: absent),
    subscriptions that may name a missing topic, a current assignment that may be stale."""
    partitions_by_topic = {topic: count for topic in TOPIC_NAMES
                           if (count := draw(st.integers(0, 9)))}
    member_ids = draw(st.lists(st.sampled_from([f"m{i:02}" for i in range(20)]), min_size=1,
                               max_size=7, unique=True))
    shared = draw(st.sets(st.sampled_from(TOPIC_NAMES + ["zz"]), min_size=1))
    every = [(topic, partition) for topic in TOPIC_NAMES + ["zz"] for partition in range(10)]
    holder = {tp: draw(st.sampled_from([None, *member_ids])) for tp in every
              if draw(st.integers(0, 3))}
    members = {}
    for index, member_id in enumerate(member_ids):
        topics = shared if uniform else draw(st.sets(st.sampled_from(TOPIC_NAMES + ["zz"])))
        instance_id = draw(st.one_of(st.none(), st.just(f"i{index}")))
        current = frozenset(tp for tp, owner in holder.items() if owner == member_id)
        members[member_id] = MemberSpec(frozenset(topics), current, instance_id)
    return members, partitions_by_topic


def shuffled(members, rng_seed):
    items = list(members.items())
    random.Random(rng_seed).shuffle(items)
    return dict(items)


@seed(SEED)
@PROPERTY
@given(groups(), st.sampled_from(sorted(ASSIGNORS)), st.integers(0, 2**32))
def test_every_subscribed_partition_once_to_a_subscriber(group, name, order_seed):
    members, partitions_by_topic = group
    result = ASSIGNORS[name](members, partitions_by_topic)
    assert assignment_problems(result, members, partitions_by_topic) == []
    # Deterministic: the same input in another dict order gives the same output.
    assert ASSIGNORS[name](shuffled(members, order_seed), dict(partitions_by_topic)) == result


@seed(SEED)
@PROPERTY
@given(groups(uniform=True), st.sampled_from(["roundrobin", "sticky"]))
def test_uniform_subscriptions_balance_within_one(group, name):
    members, partitions_by_topic = group
    counts = [len(partitions) for partitions in ASSIGNORS[name](members,
                                                                 partitions_by_topic).values()]
    assert max(counts) - min(counts) <= 1


@seed(SEED)
@PROPERTY
@given(groups(uniform=True))
def test_range_balances_each_topic_within_one(group):
    members, partitions_by_topic = group
    result = range_assign(members, partitions_by_topic)
    for topic in partitions_by_topic:
        counts = [sum(1 for tp in partitions if tp[0] == topic) for partitions in result.values()]
        if any(topic in spec.subscribed_topics for spec in members.values()):
            assert max(counts) - min(counts) <= 1


def valid_current(members, partitions_by_topic):
    """What sticky can keep: current partitions that exist and are subscribed (first claim)."""
    taken, kept = set(), {}
    for member_id in member_order(members):
        spec = members[member_id]
        kept[member_id] = {tp for tp in spec.current if tp[0] in spec.subscribed_topics
                           and tp[1] < partitions_by_topic.get(tp[0], 0) and tp not in taken}
        taken |= kept[member_id]
    return kept


@seed(SEED)
@PROPERTY
@given(groups(uniform=True))
def test_sticky_moves_the_minimum_with_uniform_subscriptions(group):
    members, partitions_by_topic = group
    result = sticky_assign(members, partitions_by_topic)
    kept = valid_current(members, partitions_by_topic)
    moved = sum(len(kept[member_id] - result[member_id]) for member_id in members)
    # The fewest possible: give the ceil(P/M) quotas to those holding the most.
    topics = next(iter(members.values())).subscribed_topics
    total = sum(partitions_by_topic.get(topic, 0) for topic in topics)
    floor, with_ceiling = divmod(total, len(members))
    holdings = sorted((len(partitions) for partitions in kept.values()), reverse=True)
    minimum = sum(max(0, held - floor - (index < with_ceiling))
                  for index, held in enumerate(holdings))
    assert moved == minimum


@seed(SEED)
@PROPERTY
@given(groups())
def test_sticky_balance_and_stickiness_with_any_subscriptions(group):
    members, partitions_by_topic = group
    result = sticky_assign(members, partitions_by_topic)
    subscribed = {member_id: spec.subscribed_topics & partitions_by_topic.keys()
                  for member_id, spec in members.items()}
    # No single move could improve balance: a member holding two more than another holds
    # nothing that other one subscribes to.  Hence equal subscriptions differ by at most one.
    for donor in members:
        for receiver in members:
            if len(result[donor]) >= len(result[receiver]) + 2:
                assert not any(tp[0] in subscribed[receiver] for tp in result[donor])
            if subscribed[donor] == subscribed[receiver]:
                assert abs(len(result[donor]) - len(result[receiver])) <= 1
    # A valid partition kept by its member stays unless its member is above the others.
    kept = valid_current(members, partitions_by_topic)
    for member_id in members:
        lost = kept[member_id] - result[member_id]
        if lost:
            assert len(result[member_id]) >= min(len(result[other]) for other in members
                                                 if other != member_id)
    # Its own output is a fixed point: nothing moves without a change.
    again = {member_id: MemberSpec(spec.subscribed_topics, result[member_id], spec.instance_id)
             for member_id, spec in members.items()}
    assert sticky_assign(again, partitions_by_topic) == result


@pytest.mark.parametrize("name", sorted(ASSIGNORS))
def test_large_group_is_fast_enough(name):
    import time

    members = {f"m{index:04}": MemberSpec(frozenset({"a", "b"}) if index % 3 else
                                          frozenset({"a"})) for index in range(300)}
    partitions_by_topic = {"a": 4096, "b": 1024}
    start = time.perf_counter()
    result = ASSIGNORS[name](members, partitions_by_topic)
    again = {member_id: MemberSpec(spec.subscribed_topics, result[member_id])
             for member_id, spec in members.items()}
    again.pop("m0001")
    ASSIGNORS[name](again, partitions_by_topic)
    assert time.perf_counter() - start < 5.0
    assert assignment_problems(result, members, partitions_by_topic) == []
