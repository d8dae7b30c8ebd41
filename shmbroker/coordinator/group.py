"""Consumer groups: the coordinator's state machine, KIP-848 style ("next generation" rebalances).

Pure: no sockets, files, clocks or threads.  Time comes in as ``now_ms`` arguments (the caller's
monotonic clock), member ids from an injectable ``new_member_id`` callable; the server layer turns
the exceptions raised here into response error codes and owns the connections.

How a group works
-----------------
Members send heartbeats naming the partitions they own.  The coordinator keeps, per group:

* the **group epoch**, bumped whenever what the assignment depends on changes: a member joins or is
  removed, a subscription or assignor changes, a subscribed topic is created, grown or deleted;
* the **target assignment**, computed at once for each group epoch by a server-side assignor
  (``assignors.py``: a pure function of the members' subscriptions, their previous targets and the
  partition counts);
* per member, its **current assignment**: ``assigned`` (partitions it may consume) and ``revoking``
  (partitions it was told to give up and still owns), and its **member epoch**.

Each member is reconciled towards its target, incrementally, when it heartbeats: partitions it is
losing are put in ``revoking`` and it keeps consuming the rest; it is given the free partitions
of its target at once (nobody owns them: a dead member's, a new topic's), and only once it
acknowledges the revocation (a heartbeat whose owned set no longer holds them) does it move to the
target epoch.  A partition another member still owns is granted only
after that member released it: acknowledged the revocation, left, closed its connection or timed
out.  Who computed the target does not matter to this machinery: a Kafka classic-protocol adapter
can register an "assignor" that returns the assignment its group leader sent in SyncGroup.

Invariants (asserted after every change, see :meth:`GroupCoordinator.check_invariants`)
-------------------------------------------------------------------------------------------
* **one owner**: a partition is in the ``assigned`` or ``revoking`` set of at most one member of a
  group (``_Group.owner`` indexes exactly these sets);
* the target gives a partition to at most one member, subscribed to its topic (the built-in
  assignors give every subscribed partition, exactly once); its epoch is the group epoch;
* a member's epoch never exceeds the group epoch and only grows (a rejoin bumps the group epoch);
* a static member that left (``departed``) owns nothing outside its target, nothing ``revoking``.

Member states (derived from the sets; :class:`MemberState`)
-----------------------------------------------------------
=============  ===================================================  =============================
state          condition                                            leaves it when
=============  ===================================================  =============================
stable         assigned == target, nothing revoking                 the target changes
unrevoked      some owned partition is not in the target            its heartbeat no longer owns
               (told to revoke, or will be at its next heartbeat)   them -> epoch = target epoch
unreleased     nothing to revoke, some target partitions are        their owners release them ->
               still owned by other members                         granted at its next heartbeat
departed       static member that left or lost its connection;      it rejoins with its instance
               keeps ``assigned``, nobody else gets those           id (new member id, same epoch
                                                                    and partitions) or expires
=============  ===================================================  =============================

Transitions:

====================================  =============================================================
event                                 effect
====================================  =============================================================
join (new member)                     new member id; group epoch + 1; takes the free partitions of
                                      its target at once
join (member id known)                a fenced member starting over: it owns nothing, all its
                                      partitions are released; group epoch + 1
join (instance id of a departed       static restart: new member id, the departed member's epoch,
member)                               partitions and target; no group epoch change (unless the
                                      subscription changed), others unaffected
heartbeat                             acknowledges revocations (owned set), reconciles as above
heartbeat, epoch not current/previous FencedMemberEpochError; nothing changes
leave / member_gone (dynamic) or      member removed, all its partitions released, group epoch + 1
leave(permanent=True)
leave / member_gone (static)          departed: it keeps the partitions of its target it owns for
                                      session_timeout_ms, the others are released at once
tick: no heartbeat for session_timeout_ms, departed for session_timeout_ms, or revoking for longer
than rebalance_timeout_ms             member removed as by a dynamic leave
update_topics                         groups whose subscribed topics changed: group epoch + 1
====================================  =============================================================

Group state (:class:`GroupState`): Empty (no members), Stable (every member stable), Reconciling
(otherwise; KIP-848's Assigning never shows, the target is computed synchronously), Dead (deleted:
describe of a deleted or unknown group raises GroupIdNotFoundError, so only the removed group
object itself reads Dead).  A group stays, Empty, after its last member leaves, until
``delete_group`` (refused with NonEmptyGroupError while it has members, departed static ones too).

Epochs and fencing.  A heartbeat must carry the member's current epoch, or its previous one with an
owned set inside what the coordinator gives it (the previous response was lost); anything else is
FencedMemberEpochError.  A commit (:meth:`GroupCoordinator.validate_commit`) is accepted from a
live member for partitions it owns (``assigned`` or ``revoking``: it commits before it
acknowledges a revocation) with its current or previous epoch.  Accepting the previous epoch is safe
because a member's requests are served in order on its one connection and a member sends its next
heartbeat only after handling the previous response: no partition can be released and come back to
it between its commit and the heartbeat answered just before it.

The caller's side of the protocol: a member has one heartbeat in flight at a time, reports in
``owned`` exactly the partitions it consumes when it sends it, and takes a partition only when a
response lists it in ``assigned``.  Time: members ask for ``session_timeout_ms`` and
``rebalance_timeout_ms`` (Kafka's max.poll.interval.ms; the client enforces its poll interval
itself and leaves); heartbeats are asked for every min(``heartbeat_interval_ms``,
session / 3) ms, and :meth:`GroupCoordinator.wakeups` names the members to nudge at once so a
rebalance costs round trips, not heartbeat intervals.

API: :class:`GroupCoordinator` -- ``join``, ``heartbeat`` (with ``subscription`` to change what
a member subscribes to), ``leave``, ``member_gone``, ``tick``, ``update_topics``,
``validate_commit``, ``describe``, ``list_groups``, ``delete_group``, ``wakeups`` and
``check_invariants``.

Limits (shmbroker.limits, "consumer groups"): groups, members per group, name lengths, topics per
subscription, pattern length, timeouts, partitions per commit.  Patterns are Python ``re``
matched in full against topic names (<= 249 characters); a pathological pattern can backtrack for
long (Kafka uses RE2 for this reason), so the length cap is the only guard so far.
"""

from __future__ import annotations

import enum
import re
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from shmbroker import limits
from shmbroker.coordinator.assignors import (
    ASSIGNORS,
    Assignor,
    MemberSpec,
    TopicPartition,
    assignment_problems,
)
from shmbroker.errors import (
    BrokerError,
    FencedInstanceIdError,
    FencedMemberEpochError,
    GroupIdNotFoundError,
    GroupMaxSizeReachedError,
    InvalidCommitOffsetSizeError,
    InvalidGroupIdError,
    InvalidRegularExpressionError,
    InvalidSessionTimeoutError,
    NonEmptyGroupError,
    PartitionNotOwnedError,
    ProtocolError,
    StaleMemberEpochError,
    UnknownMemberIdError,
    UnreleasedInstanceIdError,
    UnsupportedAssignorError,
)
from shmbroker.format.names import safe_repr, validate_topic_name

Partitions = frozenset[TopicPartition]
_NO_PARTITIONS: Partitions = frozenset()


class GroupState(enum.Enum):
    EMPTY = "Empty"
    RECONCILING = "Reconciling"
    STABLE = "Stable"
    DEAD = "Dead"


class MemberState(enum.Enum):
    STABLE = "stable"
    UNREVOKED = "unrevoked"
    UNRELEASED = "unreleased"
    DEPARTED = "departed"


class ExpiryReason(enum.Enum):
    SESSION_TIMEOUT = "session_timeout"  # no heartbeat for session_timeout_ms
    REBALANCE_TIMEOUT = "rebalance_timeout"  # a revocation unacknowledged for rebalance_timeout_ms
    STATIC_NOT_RETURNED = "static_not_returned"  # departed static member, session_timeout_ms over


@dataclass(frozen=True)
class Subscription:
    """What a member subscribes to: a list of topics or (exclusive) a regex, and its assignor."""

    topics: frozenset[str] | None
    pattern: str | None
    assignor: str


@dataclass(frozen=True)
class HeartbeatResponse:
    """``assigned``: the partitions the member may consume; ``revoke``: those it must stop (after
    committing) and then stop reporting as owned.  It owns ``assigned | revoke`` until then."""

    member_id: str
    member_epoch: int
    assigned: Partitions
    revoke: Partitions
    heartbeat_interval_ms: int


@dataclass(frozen=True)
class ExpiredMember:
    group_id: str
    member_id: str
    group_instance_id: str | None
    reason: ExpiryReason


@dataclass(frozen=True)
class MemberDescription:
    member_id: str
    group_instance_id: str | None
    client_id: str
    member_epoch: int
    state: MemberState
    subscribed_topics: frozenset[str] | None
    subscribed_pattern: str | None
    assignor: str
    assignment: Partitions  # assigned | revoking: what it owns now
    revoking: Partitions
    target: Partitions


@dataclass(frozen=True)
class GroupDescription:
    group_id: str
    state: GroupState
    group_epoch: int
    assignor: str | None  # the one the target was computed with; None when Empty
    members: tuple[MemberDescription, ...]  # sorted by member id


@dataclass(frozen=True)
class GroupListing:
    group_id: str
    state: GroupState
    group_epoch: int
    members: int


class _Member:
    __slots__ = ("member_id", "instance_id", "client_id", "subscription", "topics",
                 "session_timeout_ms", "rebalance_timeout_ms", "epoch", "previous_epoch",
                 "assigned", "revoking", "heartbeat_ms", "departed_ms", "revoke_deadline_ms")

    def __init__(self, member_id: str, instance_id: str | None, now_ms: int) -> None:
        self.member_id = member_id
        self.instance_id = instance_id
        self.client_id = ""
        self.subscription = Subscription(frozenset(), None, "")
        self.topics: frozenset[str] = frozenset()  # resolved subscription (pattern matched)
        self.session_timeout_ms = 0
        self.rebalance_timeout_ms = 0
        self.epoch = 0  # 0 until its first reconciliation
        self.previous_epoch = 0
        self.assigned: set[TopicPartition] = set()
        self.revoking: set[TopicPartition] = set()
        self.heartbeat_ms = now_ms
        self.departed_ms: int | None = None
        self.revoke_deadline_ms: int | None = None


class _Group:
    __slots__ = ("group_id", "epoch", "members", "target", "target_epoch", "owner",
                 "topic_partitions", "assignor", "dead")

    def __init__(self, group_id: str) -> None:
        self.group_id = group_id
        self.epoch = 0
        self.members: dict[str, _Member] = {}
        self.target: dict[str, Partitions] = {}
        # == epoch between calls: a target is computed as soon as the group epoch moves
        self.target_epoch = 0
        self.owner: dict[TopicPartition, str] = {}
        self.topic_partitions: dict[str, int] = {}  # subscribed topics that exist -> count
        self.assignor: str | None = None
        self.dead = False


class GroupCoordinator:
    """Every consumer group of one broker.  Not thread-safe: one caller (the supervisor loop)."""

    def __init__(self, assignor_by_name: Mapping[str, Assignor] | None = None, *,
                 new_member_id: Callable[[], str] | None = None,
                 heartbeat_interval_ms: int = limits.heartbeat_interval_ms_max) -> None:
        self._assignors = dict(ASSIGNORS if assignor_by_name is None else assignor_by_name)
        assert self._assignors, "at least one assignor"
        self._new_member_id = new_member_id or (lambda: uuid.uuid4().hex)
        assert 1 <= heartbeat_interval_ms <= limits.heartbeat_interval_ms_max
        self._heartbeat_interval_ms = heartbeat_interval_ms
        self._groups: dict[str, _Group] = {}
        self._partitions_by_topic: dict[str, int] = {}
        self._touched: set[str] = set()  # groups changed since the last wakeups()

    # -- membership ------------------------------------------------------------------------------
    def join(self, group_id: str, *, member_id: str | None = None,
             group_instance_id: str | None = None, client_id: str = "",
             subscribed_topics: Iterable[str] | None = None,
             subscribed_pattern: str | None = None, assignor: str = "range",
             session_timeout_ms: int = 10_000, rebalance_timeout_ms: int = 300_000,
             now_ms: int) -> HeartbeatResponse:
        """A member joins (member epoch 0: it owns nothing).  See the module's transition table
        for ``member_id`` and ``group_instance_id``."""
        _check_name(group_id, limits.group_id_chars_max, "group id", InvalidGroupIdError)
        if group_instance_id is not None:
            _check_name(group_instance_id, limits.group_instance_id_chars_max,
                        "group instance id", ProtocolError)
        if not isinstance(client_id, str) or len(client_id) > limits.client_id_chars_max:
            raise ProtocolError(f"client id {safe_repr(client_id)} is not a str of at most "
                                f"{limits.client_id_chars_max} characters")
        subscription = self._subscription(subscribed_topics, subscribed_pattern, assignor)
        _check_timeout(session_timeout_ms, "session_timeout_ms", limits.session_timeout_ms_min,
                       limits.session_timeout_ms_max)
        _check_timeout(rebalance_timeout_ms, "rebalance_timeout_ms",
                       limits.rebalance_timeout_ms_min, limits.rebalance_timeout_ms_max)
        group = self._groups.get(group_id)
        holder = None if group is None or group_instance_id is None else next(
            (m for m in group.members.values() if m.instance_id == group_instance_id), None)
        if holder is not None and holder.departed_ms is not None:
            if member_id not in (None, holder.member_id):
                raise FencedInstanceIdError(
                    f"group instance id {group_instance_id!r} of group {group_id!r} belongs to "
                    f"member {holder.member_id}, not {safe_repr(member_id)}")
            assert group is not None
            member = self._replace_static(group, holder, now_ms)
        elif holder is not None and member_id != holder.member_id:
            cls = UnreleasedInstanceIdError if member_id is None else FencedInstanceIdError
            raise cls(f"group instance id {group_instance_id!r} is in use by live member "
                      f"{holder.member_id} of group {group_id!r}; it is released when that member "
                      f"leaves, closes its connection or misses heartbeats for "
                      f"{holder.session_timeout_ms} ms")
        elif member_id is not None:
            member = self._member(group_id, member_id)
            group = self._groups[group_id]
            if member.instance_id != group_instance_id:
                raise FencedInstanceIdError(
                    f"member {member_id} of group {group_id!r} has group instance id "
                    f"{member.instance_id!r}, not {group_instance_id!r}")
            for tp in sorted(member.assigned | member.revoking):  # it starts over, owning nothing
                self._release(group, member, tp)
            member.epoch = member.previous_epoch = 0
            member.revoke_deadline_ms = None
            group.epoch += 1  # a new incarnation gets an epoch its zombie never had
        else:
            if group is None:
                if len(self._groups) >= limits.groups_max:
                    raise BrokerError(f"the coordinator holds {len(self._groups)} groups, the "
                                      f"limit (groups_max); delete unused groups")
                group = self._groups[group_id] = _Group(group_id)
            if len(group.members) >= limits.members_per_group_max:
                raise GroupMaxSizeReachedError(
                    f"group {group_id!r} has {len(group.members)} members, the limit "
                    f"(members_per_group_max)")
            new_id = self._new_member_id()
            assert isinstance(new_id, str) and new_id and new_id not in group.members, new_id
            member = group.members[new_id] = _Member(new_id, group_instance_id, now_ms)
            group.epoch += 1
        member.client_id = client_id
        member.session_timeout_ms = session_timeout_ms
        member.rebalance_timeout_ms = rebalance_timeout_ms
        member.heartbeat_ms = now_ms
        return self._finish(group, member, subscription, frozenset(), now_ms)

    def heartbeat(self, group_id: str, member_id: str, member_epoch: int,
                  owned: Iterable[TopicPartition], now_ms: int, *,
                  subscription: Subscription | None = None) -> HeartbeatResponse:
        """A live member reports what it owns; the answer says what to consume and what to revoke.
        ``subscription`` (from :meth:`subscription`) changes what it subscribes to."""
        member = self._member(group_id, member_id)
        group = self._groups[group_id]
        if member.departed_ms is not None:
            raise FencedMemberEpochError(
                f"member {member_id} of group {group_id!r} left the group (a static member "
                f"waiting for its instance to rejoin); join again")
        owned = frozenset(owned)
        if member_epoch != member.epoch and not (
                member_epoch == member.previous_epoch
                and owned <= member.assigned | member.revoking):
            raise FencedMemberEpochError(
                f"member {member_id} of group {group_id!r} sent epoch {member_epoch}; its epoch is "
                f"{member.epoch}; it must drop its partitions and join again")
        member.heartbeat_ms = now_ms
        return self._finish(group, member, subscription or member.subscription, owned, now_ms)

    def subscription(self, subscribed_topics: Iterable[str] | None = None,
                     subscribed_pattern: str | None = None,
                     assignor: str = "range") -> Subscription:
        """A checked :class:`Subscription` for :meth:`heartbeat` (raises as :meth:`join`)."""
        return self._subscription(subscribed_topics, subscribed_pattern, assignor)

    def leave(self, group_id: str, member_id: str, now_ms: int, *,
              permanent: bool = False) -> None:
        """The member leaves.  A static member (unless ``permanent``) keeps its partitions for
        its session timeout, waiting for its instance to rejoin."""
        member = self._member(group_id, member_id)
        self._gone(self._groups[group_id], member, now_ms, permanent)

    def member_gone(self, group_id: str, member_id: str, now_ms: int) -> bool:
        """The member's connection closed (its process exited or was killed): as :meth:`leave`,
        at once.  False (and nothing done) when the member is not in the group any more."""
        group = self._groups.get(group_id)
        member = None if group is None else group.members.get(member_id)
        if group is None or member is None:
            return False
        self._gone(group, member, now_ms, permanent=False)
        return True

    def tick(self, now_ms: int) -> list[ExpiredMember]:
        """Remove the members whose deadlines passed; returns them.  O(members) per call."""
        expired = []
        for group in list(self._groups.values()):
            removed = False
            for member in list(group.members.values()):
                if member.departed_ms is not None:
                    if now_ms < member.departed_ms + member.session_timeout_ms:
                        continue
                    reason = ExpiryReason.STATIC_NOT_RETURNED
                elif now_ms >= member.heartbeat_ms + member.session_timeout_ms:
                    reason = ExpiryReason.SESSION_TIMEOUT
                elif member.revoke_deadline_ms is not None and now_ms >= member.revoke_deadline_ms:
                    reason = ExpiryReason.REBALANCE_TIMEOUT
                else:
                    continue
                expired.append(ExpiredMember(group.group_id, member.member_id,
                                             member.instance_id, reason))
                self._remove(group, member)
                removed = True
            if removed:
                group.epoch += 1
                self._compute_target(group)
                self._touched.add(group.group_id)
                self._check_group(group)
        return expired

    def update_topics(self, partitions_by_topic: Mapping[str, int]) -> list[str]:
        """The broker's complete topic metadata (topic -> partition count; an absent topic does
        not exist).  Returns the ids of the groups whose target changed epoch."""
        for topic, count in partitions_by_topic.items():
            assert isinstance(topic, str) and isinstance(count, int) and count >= 0, (topic, count)
        self._partitions_by_topic = dict(partitions_by_topic)
        matched: dict[str, frozenset[str]] = {}
        changed = []
        for group in self._groups.values():
            moved = False
            for member in group.members.values():
                pattern = member.subscription.pattern
                if pattern is not None:
                    if pattern not in matched:
                        matched[pattern] = self._matching(pattern)
                    moved |= member.topics != matched[pattern]
                    member.topics = matched[pattern]
            if moved or self._topic_partitions(group) != group.topic_partitions:
                group.epoch += 1
                self._compute_target(group)
                self._touched.add(group.group_id)
                self._check_group(group)
                changed.append(group.group_id)
        return changed

    # -- commits and admin -----------------------------------------------------------------------
    def validate_commit(self, group_id: str, member_id: str | None, member_epoch: int,
                        partitions: Iterable[TopicPartition]) -> None:
        """Raise unless ``member_id`` may commit offsets of ``partitions`` now.  ``member_id``
        None or "" (Kafka's generation -1 commit: admin tools, manual assignment) is allowed
        while the group has no members (or does not exist)."""
        partitions = frozenset(partitions)
        if len(partitions) > limits.commit_partitions_max:
            raise InvalidCommitOffsetSizeError(
                f"a commit names {len(partitions)} partitions; the limit is "
                f"{limits.commit_partitions_max} (commit_partitions_max)")
        if not member_id:
            group = self._groups.get(group_id)
            if group is not None and group.members:
                raise NonEmptyGroupError(
                    f"group {group_id!r} has {len(group.members)} member(s); offsets can be "
                    f"committed without a member id only while it has none")
            return
        member = self._member(group_id, member_id)
        if member.departed_ms is not None:
            raise UnknownMemberIdError(f"member {member_id} of group {group_id!r} left the "
                                       f"group; its commits are refused")
        if member_epoch not in (member.epoch, member.previous_epoch):
            cls = StaleMemberEpochError if member_epoch < member.epoch else FencedMemberEpochError
            raise cls(f"member {member_id} of group {group_id!r} committed with epoch "
                      f"{member_epoch}; its epoch is {member.epoch}")
        not_owned = partitions - member.assigned - member.revoking
        if not_owned:
            shown = ", ".join(f"{topic}/{partition}" for topic, partition in sorted(not_owned)[:8])
            raise PartitionNotOwnedError(
                f"member {member_id} of group {group_id!r} does not own {len(not_owned)} of the "
                f"partitions it committed ({shown}{', ...' if len(not_owned) > 8 else ''}); "
                f"they were revoked or not yet granted to it")

    def describe(self, group_id: str) -> GroupDescription:
        group = self._group(group_id)
        members = tuple(
            MemberDescription(
                member_id=member.member_id, group_instance_id=member.instance_id,
                client_id=member.client_id, member_epoch=member.epoch,
                state=self._member_state(group, member),
                subscribed_topics=member.subscription.topics,
                subscribed_pattern=member.subscription.pattern,
                assignor=member.subscription.assignor,
                assignment=frozenset(member.assigned | member.revoking),
                revoking=frozenset(member.revoking), target=group.target[member.member_id])
            for _, member in sorted(group.members.items()))
        return GroupDescription(group_id, _group_state(group, members), group.epoch,
                                group.assignor, members)

    def list_groups(self) -> list[GroupListing]:
        return [GroupListing(group_id, self.describe(group_id).state, group.epoch,
                             len(group.members))
                for group_id, group in sorted(self._groups.items())]

    def delete_group(self, group_id: str) -> None:
        group = self._group(group_id)
        if group.members:
            raise NonEmptyGroupError(f"group {group_id!r} has {len(group.members)} member(s); it "
                                     f"can be deleted once they have left")
        group.dead = True
        del self._groups[group_id]
        self._touched.discard(group_id)

    def wakeups(self) -> list[tuple[str, str]]:
        """(group id, member id) of the live members whose next heartbeat would bring news
        (partitions to revoke, free partitions to take), among the groups changed since the last
        call.  The server nudges them to heartbeat now, so a rebalance waits on round trips, not
        on heartbeat intervals."""
        found = []
        for group_id in sorted(self._touched):
            group = self._groups.get(group_id)
            if group is None:
                continue
            for member_id, member in sorted(group.members.items()):
                target = group.target[member_id]
                if member.departed_ms is None and (
                        member.assigned - target or any(
                            tp not in group.owner for tp in target - member.assigned)):
                    found.append((group_id, member_id))
        self._touched.clear()
        return found

    def check_invariants(self) -> None:
        """Assert the module's invariants for every group (the tests call it after each step)."""
        for group in self._groups.values():
            self._check_group(group)

    # -- internals -------------------------------------------------------------------------------
    def _group(self, group_id: str) -> _Group:
        group = self._groups.get(group_id)
        if group is None:
            raise GroupIdNotFoundError(f"group {safe_repr(group_id)} does not exist")
        return group

    def _member(self, group_id: str, member_id: str) -> _Member:
        member = self._group(group_id).members.get(member_id)
        if member is None:
            raise UnknownMemberIdError(
                f"member {safe_repr(member_id)} is not in group {group_id!r} (it left or its "
                f"session timed out); join again without a member id")
        return member

    def _subscription(self, topics: Iterable[str] | None, pattern: str | None,
                      assignor: str) -> Subscription:
        if (topics is None) == (pattern is None):
            raise ProtocolError("a member subscribes to a list of topics or to a pattern, "
                                "exactly one of them")
        if assignor not in self._assignors:
            raise UnsupportedAssignorError(f"assignor {safe_repr(assignor)} is unknown; this "
                                           f"coordinator has {sorted(self._assignors)}")
        if pattern is not None:
            if not isinstance(pattern, str) or len(pattern) > limits.subscribed_pattern_chars_max:
                raise InvalidRegularExpressionError(
                    f"subscription pattern {safe_repr(pattern)} is not a str of at most "
                    f"{limits.subscribed_pattern_chars_max} characters")
            try:
                re.compile(pattern)
            except re.error as error:
                raise InvalidRegularExpressionError(
                    f"subscription pattern {safe_repr(pattern)} is not a valid regular "
                    f"expression: {error}") from None
            return Subscription(None, pattern, assignor)
        if isinstance(topics, str):
            raise ProtocolError(f"subscribed topics must be a list of names, not the str "
                                f"{safe_repr(topics)}")
        assert topics is not None
        names = list(topics)
        if len(names) > limits.subscribed_topics_max:
            raise ProtocolError(f"a subscription names {len(names)} topics; the limit is "
                                f"{limits.subscribed_topics_max} (subscribed_topics_max)")
        return Subscription(frozenset(validate_topic_name(name) for name in names), None,
                            assignor)

    def _matching(self, pattern: str) -> frozenset[str]:
        regex = re.compile(pattern)
        return frozenset(topic for topic in self._partitions_by_topic if regex.fullmatch(topic))

    def _topic_partitions(self, group: _Group) -> dict[str, int]:
        return {topic: self._partitions_by_topic[topic]
                for member in group.members.values() for topic in member.topics
                if topic in self._partitions_by_topic}

    def _finish(self, group: _Group, member: _Member, subscription: Subscription,
                owned: Partitions, now_ms: int) -> HeartbeatResponse:
        """Apply a (possibly new) subscription, reconcile ``member``, check, answer."""
        if subscription != member.subscription:
            member.subscription = subscription
            topics = (subscription.topics if subscription.topics is not None
                      else self._matching(subscription.pattern or ""))
            if group.target_epoch == group.epoch and (
                    topics != member.topics or self._pick_assignor(group) != group.assignor):
                group.epoch += 1
            member.topics = topics
        if group.target_epoch != group.epoch:
            self._compute_target(group)
        self._reconcile(group, member, owned, now_ms)
        self._touched.add(group.group_id)
        self._check_group(group)
        return HeartbeatResponse(
            member.member_id, member.epoch, frozenset(member.assigned),
            frozenset(member.revoking),
            max(1, min(self._heartbeat_interval_ms, member.session_timeout_ms // 3)))

    def _pick_assignor(self, group: _Group) -> str | None:
        """The assignor most members ask for (ties: the first name in sorted order)."""
        votes = Counter(member.subscription.assignor for member in group.members.values())
        return min(votes, key=lambda name: (-votes[name], name)) if votes else None

    def _compute_target(self, group: _Group) -> None:
        group.topic_partitions = self._topic_partitions(group)
        group.assignor = self._pick_assignor(group)
        specs = {member_id: MemberSpec(member.topics, group.target.get(member_id, _NO_PARTITIONS),
                                       member.instance_id)
                 for member_id, member in group.members.items()}
        result = self._assignors[group.assignor](specs, group.topic_partitions) \
            if group.assignor is not None else {}
        problems = assignment_problems(result, specs, group.topic_partitions, complete=False)
        assert not problems, problems
        group.target = {member_id: frozenset(result[member_id]) for member_id in group.members}
        group.target_epoch = group.epoch
        for member in group.members.values():
            if member.departed_ms is not None:
                self._settle_departed(group, member)

    def _settle_departed(self, group: _Group, member: _Member) -> None:
        """A departed static member consumes nothing: what it owns outside its target is
        released at once; it keeps the rest, at the group epoch, for its instance to rejoin."""
        target = group.target[member.member_id]
        for tp in sorted((member.assigned | member.revoking) - target):
            self._release(group, member, tp)
        member.assigned |= member.revoking
        member.revoking.clear()
        member.epoch = member.previous_epoch = group.epoch

    def _reconcile(self, group: _Group, member: _Member, owned: Partitions, now_ms: int) -> None:
        target = group.target[member.member_id]
        losing = member.assigned - target
        member.assigned -= losing
        member.revoking |= losing
        for tp in sorted(member.revoking - owned):  # acknowledged (or never taken): released
            self._release(group, member, tp)
        # Free partitions of its target are granted at once, revocations pending or not (as
        # Kafka's cooperative protocol gives unowned partitions in the first round): a dead
        # member's partitions must not wait for the survivors to shuffle theirs.  Nobody owns
        # them, so this cannot make two owners.
        for tp in sorted(target - member.assigned):
            if tp not in group.owner:
                group.owner[tp] = member.member_id
                member.assigned.add(tp)
        if member.revoking:
            if member.revoke_deadline_ms is None:
                member.revoke_deadline_ms = now_ms + member.rebalance_timeout_ms
            return
        member.revoke_deadline_ms = None
        if member.epoch != group.epoch:
            member.previous_epoch = member.epoch if member.epoch else group.epoch
            member.epoch = group.epoch

    def _release(self, group: _Group, member: _Member, tp: TopicPartition) -> None:
        assert group.owner.get(tp) == member.member_id, (tp, group.owner.get(tp), member.member_id)
        del group.owner[tp]
        member.assigned.discard(tp)
        member.revoking.discard(tp)

    def _gone(self, group: _Group, member: _Member, now_ms: int, permanent: bool) -> None:
        if member.instance_id is not None and not permanent:
            if member.departed_ms is None:
                member.departed_ms = now_ms
                member.revoke_deadline_ms = None
                self._settle_departed(group, member)
        else:
            self._remove(group, member)
            group.epoch += 1
            self._compute_target(group)
        self._touched.add(group.group_id)
        self._check_group(group)

    def _remove(self, group: _Group, member: _Member) -> None:
        for tp in sorted(member.assigned | member.revoking):
            self._release(group, member, tp)
        del group.members[member.member_id]
        del group.target[member.member_id]

    def _replace_static(self, group: _Group, holder: _Member, now_ms: int) -> _Member:
        """A restarted static member takes the departed one's place: same partitions, epoch
        and target under a new member id; nothing else in the group changes."""
        new_id = self._new_member_id()
        assert isinstance(new_id, str) and new_id and new_id not in group.members, new_id
        member = _Member(new_id, holder.instance_id, now_ms)
        member.subscription, member.topics = holder.subscription, holder.topics
        member.epoch = member.previous_epoch = holder.epoch  # a new incarnation: no previous
        assert not holder.revoking
        for tp in holder.assigned:
            group.owner[tp] = new_id
        member.assigned = holder.assigned
        del group.members[holder.member_id]
        group.members[new_id] = member
        group.target[new_id] = group.target.pop(holder.member_id)
        return member

    def _member_state(self, group: _Group, member: _Member) -> MemberState:
        target = group.target[member.member_id]
        if member.departed_ms is not None:
            return MemberState.DEPARTED
        if member.revoking or member.assigned - target:
            return MemberState.UNREVOKED
        if target - member.assigned:
            return MemberState.UNRELEASED
        return MemberState.STABLE

    def _check_group(self, group: _Group) -> None:
        owned = 0
        for member_id, member in group.members.items():
            assert not member.assigned & member.revoking, member_id
            for tp in member.assigned | member.revoking:
                assert group.owner.get(tp) == member_id, (tp, group.owner.get(tp), member_id)
            owned += len(member.assigned) + len(member.revoking)
            assert 0 <= member.epoch <= group.epoch, (member.epoch, group.epoch)
            assert member.departed_ms is None or not member.revoking, member_id
        assert owned == len(group.owner), "a partition is owned by two members"
        assert group.target_epoch == group.epoch, (group.target_epoch, group.epoch)
        assert group.target.keys() == group.members.keys(), (sorted(group.target),
                                                             sorted(group.members))
        seen: set[TopicPartition] = set()
        for partitions in group.target.values():
            assert not seen & partitions, "a partition is in two targets"
            seen |= partitions


def _group_state(group: _Group, members: tuple[MemberDescription, ...]) -> GroupState:
    if group.dead:
        return GroupState.DEAD
    if not members:
        return GroupState.EMPTY
    if all(m.assignment == m.target and not m.revoking for m in members):
        return GroupState.STABLE
    return GroupState.RECONCILING


def _check_name(value: object, chars_max: int, what: str, error: type[BrokerError]) -> None:
    if not isinstance(value, str) or not 1 <= len(value) <= chars_max:
        raise error(f"{what} {safe_repr(value)} is not a str of 1 to {chars_max} characters")


def _check_timeout(value: object, name: str, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise InvalidSessionTimeoutError(f"{name} is {safe_repr(value)}; it must be an int in "
                                         f"[{low}, {high}]")
