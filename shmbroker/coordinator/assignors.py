"""Server-side partition assignors: pure functions from a group's members to a target assignment.

An assignor is any callable ``assign(members, partitions_by_topic) -> assignment`` where

* ``members`` maps member id -> :class:`MemberSpec` (the topics it subscribes to, already resolved
  from a pattern; the partitions of its current *target* assignment, for stickiness; its static
  ``group_instance_id`` or None);
* ``partitions_by_topic`` maps topic -> partition count (topics absent from it do not exist, and a
  member's subscription to them is ignored);
* the result maps *every* member id to a frozenset of ``(topic, partition)`` tuples.

Invariants of every assignor here (:func:`assignment_problems` checks them): each partition of a
subscribed, existing topic goes to exactly one member, and only to a member subscribed to its
topic; the result depends on nothing but the arguments (same input, same output: no randomness,
no dict-order or hash-order dependence).

Member order (range and roundrobin), as Kafka's ``MemberInfo.compareTo``: static members first,
sorted by ``group_instance_id``, then dynamic members sorted by member id.  A static member that
restarts keeps its place, so these assignors give it the same partitions again.

* :func:`range_assign` -- Kafka's RangeAssignor: per topic, the members subscribed to it split the
  partitions into contiguous ranges, the first ``partitions % members`` members one extra.
* :func:`roundrobin_assign` -- Kafka's RoundRobinAssignor: all subscribed partitions, sorted by
  (topic, partition), dealt in turn to the members, skipping a member not subscribed to the topic.
* :func:`sticky_assign` -- keeps each member's current partitions where balance allows and moves
  the fewest partitions needed: afterwards no member holds two or more partitions more than
  another member subscribed to one of its topics (so members with the same subscription differ by
  at most one).  With identical subscriptions the number moved is the minimum possible; fed its
  own output it returns it unchanged (no churn without a change).
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

TopicPartition = tuple[str, int]
Assignment = dict[str, frozenset[TopicPartition]]


@dataclass(frozen=True)
class MemberSpec:
    """What an assignor knows of one member."""

    subscribed_topics: frozenset[str]
    current: frozenset[TopicPartition] = frozenset()
    instance_id: str | None = None


Assignor = Callable[[Mapping[str, MemberSpec], Mapping[str, int]], Assignment]


def member_order(members: Mapping[str, MemberSpec]) -> list[str]:
    """Member ids in Kafka's order: static members by instance id, then dynamic by member id."""
    def key(member_id: str) -> tuple[int, str, str]:
        instance_id = members[member_id].instance_id
        return (0, instance_id, member_id) if instance_id is not None else (1, member_id, "")
    return sorted(members, key=key)


def _subscriptions(members: Mapping[str, MemberSpec],
                   partitions_by_topic: Mapping[str, int]) -> dict[str, frozenset[str]]:
    """Each member's subscribed topics that exist and have partitions."""
    return {member_id: frozenset(topic for topic in spec.subscribed_topics
                                 if partitions_by_topic.get(topic, 0) > 0)
            for member_id, spec in members.items()}


def range_assign(members: Mapping[str, MemberSpec],
                 partitions_by_topic: Mapping[str, int]) -> Assignment:
    order = member_order(members)
    subscriptions = _subscriptions(members, partitions_by_topic)
    result: dict[str, set[TopicPartition]] = {member_id: set() for member_id in order}
    for topic in sorted({topic for topics in subscriptions.values() for topic in topics}):
        subscribers = [member_id for member_id in order if topic in subscriptions[member_id]]
        count = partitions_by_topic[topic]
        per_member, with_extra = divmod(count, len(subscribers))
        for index, member_id in enumerate(subscribers):
            start = per_member * index + min(index, with_extra)
            length = per_member + (1 if index < with_extra else 0)
            result[member_id].update((topic, partition)
                                     for partition in range(start, start + length))
    return {member_id: frozenset(partitions) for member_id, partitions in result.items()}


def roundrobin_assign(members: Mapping[str, MemberSpec],
                      partitions_by_topic: Mapping[str, int]) -> Assignment:
    order = member_order(members)
    subscriptions = _subscriptions(members, partitions_by_topic)
    result: dict[str, set[TopicPartition]] = {member_id: set() for member_id in order}
    cursor = 0
    for topic in sorted({topic for topics in subscriptions.values() for topic in topics}):
        for partition in range(partitions_by_topic[topic]):
            # Some member subscribes to ``topic``, so this loop ends within len(order) steps.
            while topic not in subscriptions[order[cursor % len(order)]]:
                cursor += 1
            result[order[cursor % len(order)]].add((topic, partition))
            cursor += 1
    return {member_id: frozenset(partitions) for member_id, partitions in result.items()}


def sticky_assign(members: Mapping[str, MemberSpec],
                  partitions_by_topic: Mapping[str, int]) -> Assignment:
    order = member_order(members)
    subscriptions = _subscriptions(members, partitions_by_topic)
    owned: dict[str, set[TopicPartition]] = {member_id: set() for member_id in order}
    taken: set[TopicPartition] = set()
    # 1. Keep every current partition that is still valid (a partition claimed twice stays with
    #    the first member in order).
    for member_id in order:
        for topic, partition in sorted(members[member_id].current):
            if topic in subscriptions[member_id] and 0 <= partition < partitions_by_topic[topic] \
                    and (topic, partition) not in taken:
                owned[member_id].add((topic, partition))
                taken.add((topic, partition))
    if not order:
        return {}
    if len(set(subscriptions.values())) == 1:
        _balance_uniform(order, owned, subscriptions[order[0]], partitions_by_topic, taken)
    else:
        _place_unowned(order, owned, subscriptions, partitions_by_topic, taken)
        _balance_general(order, owned, subscriptions)
    return {member_id: frozenset(partitions) for member_id, partitions in owned.items()}


def _balance_uniform(order: list[str], owned: dict[str, set[TopicPartition]],
                     topics: frozenset[str], partitions_by_topic: Mapping[str, int],
                     taken: set[TopicPartition]) -> None:
    """Every member subscribes to the same topics: quotas of floor/ceil(P / M), the ceilings going
    to the members that hold the most now (which makes the number of moves minimal)."""
    total = sum(partitions_by_topic[topic] for topic in topics)
    floor, with_ceiling = divmod(total, len(order))
    rank = {member_id: index for index, member_id in enumerate(order)}
    by_holding = sorted(order, key=lambda member_id: (-len(owned[member_id]), rank[member_id]))
    quota = {member_id: floor + (1 if index < with_ceiling else 0)
             for index, member_id in enumerate(by_holding)}
    pool = [(topic, partition) for topic in sorted(topics)
            for partition in range(partitions_by_topic[topic]) if (topic, partition) not in taken]
    for member_id in order:
        excess = len(owned[member_id]) - quota[member_id]
        if excess > 0:
            surrendered = sorted(owned[member_id])[-excess:]  # the highest ones move
            owned[member_id].difference_update(surrendered)
            pool.extend(surrendered)
    pool.sort(reverse=True)
    for member_id in order:
        while len(owned[member_id]) < quota[member_id]:
            owned[member_id].add(pool.pop())
    assert not pool, pool


def _place_unowned(order: list[str], owned: dict[str, set[TopicPartition]],
                   subscriptions: dict[str, frozenset[str]],
                   partitions_by_topic: Mapping[str, int], taken: set[TopicPartition]) -> None:
    """Give each unowned subscribed partition to the least-loaded member subscribed to its topic,
    the partitions of topics with the fewest subscribers first."""
    rank = {member_id: index for index, member_id in enumerate(order)}
    classes: dict[frozenset[str], list[tuple[int, int, str]]] = {}
    for member_id in order:
        classes.setdefault(subscriptions[member_id], []).append(
            (len(owned[member_id]), rank[member_id], member_id))
    for heap in classes.values():
        heapq.heapify(heap)
    subscribers = {topic: sum(1 for member_id in order if topic in subscriptions[member_id])
                   for topics in classes for topic in topics}
    unowned = sorted(((topic, partition) for topic in subscribers
                      for partition in range(partitions_by_topic[topic])
                      if (topic, partition) not in taken),
                     key=lambda tp: (subscribers[tp[0]], tp))
    for topic, partition in unowned:
        heap = min((heap for topics, heap in classes.items() if topic in topics),
                   key=lambda heap: heap[0])
        count, member_rank, member_id = heap[0]
        owned[member_id].add((topic, partition))
        heapq.heapreplace(heap, (count + 1, member_rank, member_id))


def _balance_general(order: list[str], owned: dict[str, set[TopicPartition]],
                     subscriptions: dict[str, frozenset[str]]) -> None:
    """Move one partition at a time from the most loaded member to the least loaded one that can
    take one of its partitions, while some member holds at least two more than such a member.
    Each move lowers the sum of squared counts, so this ends (after at most P moves)."""
    rank = {member_id: index for index, member_id in enumerate(order)}
    by_count = sorted((len(owned[member_id]), rank[member_id], member_id) for member_id in order)
    while True:
        move = _find_move(by_count, owned, subscriptions)
        if move is None:
            return
        donor, receiver, tp = move
        for member_id, delta in ((donor, -1), (receiver, +1)):
            entry = (len(owned[member_id]), rank[member_id], member_id)
            del by_count[bisect.bisect_left(by_count, entry)]
            bisect.insort(by_count, (entry[0] + delta, entry[1], member_id))
        owned[donor].remove(tp)
        owned[receiver].add(tp)


def _find_move(by_count: list[tuple[int, int, str]], owned: dict[str, set[TopicPartition]],
               subscriptions: dict[str, frozenset[str]]
               ) -> tuple[str, str, TopicPartition] | None:
    for donor_count, _, donor in reversed(by_count):
        for receiver_count, _, receiver in by_count:
            if donor_count < receiver_count + 2:
                break
            movable = [tp for tp in owned[donor] if tp[0] in subscriptions[receiver]]
            if movable:
                return donor, receiver, max(movable)
    return None


ASSIGNORS: dict[str, Assignor] = {
    "range": range_assign,
    "roundrobin": roundrobin_assign,
    "sticky": sticky_assign,
}


def subscribed_partitions(members: Mapping[str, MemberSpec],
                          partitions_by_topic: Mapping[str, int]) -> set[TopicPartition]:
    """Every partition of an existing topic that some member subscribes to."""
    topics = {topic for spec in members.values() for topic in spec.subscribed_topics}
    return {(topic, partition) for topic in topics
            for partition in range(partitions_by_topic.get(topic, 0))}


def assignment_problems(assignment: Mapping[str, Iterable[TopicPartition]],
                        members: Mapping[str, MemberSpec], partitions_by_topic: Mapping[str, int],
                        *, complete: bool = True) -> list[str]:
    """What is wrong with ``assignment`` (empty when nothing): members missing or unknown, a
    partition that does not exist, given to a member not subscribed to its topic or to two
    members, and (with ``complete``) a subscribed partition given to nobody."""
    problems = []
    if set(assignment) != set(members):
        problems.append(f"members {sorted(members)} but assignment for {sorted(assignment)}")
    owner: dict[TopicPartition, str] = {}
    for member_id in sorted(assignment):
        for topic, partition in sorted(assignment[member_id]):
            if not 0 <= partition < partitions_by_topic.get(topic, 0):
                problems.append(f"{member_id} is given {topic}/{partition}, which does not exist")
            elif member_id in members and topic not in members[member_id].subscribed_topics:
                problems.append(f"{member_id} is given {topic}/{partition} but does not "
                                f"subscribe to {topic!r}")
            if (topic, partition) in owner:
                problems.append(f"{topic}/{partition} is given to both "
                                f"{owner[(topic, partition)]} and {member_id}")
            owner[(topic, partition)] = member_id
    if complete:
        for topic, partition in sorted(subscribed_partitions(members, partitions_by_topic)
                                       - owner.keys()):
            problems.append(f"{topic}/{partition} is subscribed to but given to nobody")
    return problems
