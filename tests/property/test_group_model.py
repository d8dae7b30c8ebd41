"""GroupCoordinator driven by simulated consumer clients (hypothesis RuleBasedStateMachine).

Clients join (dynamic or static, topic lists or patterns, any assignor), heartbeat with what they
own (acknowledging revocations after random delays, sometimes losing the response), change
subscriptions, commit, leave, lose their connection, hang past their session timeout (and come
back as zombies), restart as the same static instance; topics are created, grown and deleted.

After every step: the coordinator's invariants hold; no partition is owned by two members; every
live client consumes only partitions the coordinator gives it (so no two clients consume the same
partition).  Rules also check: fencing (stale epochs, zombies, partitions not owned are refused),
static restarts (same partitions, nobody else touched), session/rebalance timeouts (exactly the
members whose deadlines passed), and convergence (once every client heartbeats, each owns its
target and the targets cover every subscribed partition once).

Seeded: SHMBROKER_TEST_SEED (default below); hypothesis prints the failing rule sequence and the
same seed replays it.
"""

import os
import re
from dataclasses import dataclass, field
from itertools import count

import pytest
from hypothesis import HealthCheck, event, seed, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from shmbroker.coordinator import ExpiryReason, GroupCoordinator, GroupState, MemberState
from shmbroker.errors import (
    FencedMemberEpochError,
    GroupIdNotFoundError,
    PartitionNotOwnedError,
    StaleMemberEpochError,
    UnknownMemberIdError,
    UnreleasedInstanceIdError,
)

SEED = int(os.environ.get("SHMBROKER_TEST_SEED", "848"))
print(f"group model: SHMBROKER_TEST_SEED={SEED}")

GROUPS = ("g0", "g1")
TOPICS = ("a0", "a1", "b0")
INSTANCE_IDS = ("i0", "i1", "i2")
SUBSCRIPTIONS = st.one_of(
    st.builds(lambda topics: {"subscribed_topics": sorted(topics)},
              st.sets(st.sampled_from(TOPICS + ("zz",)), max_size=3)),
    st.builds(lambda pattern: {"subscribed_pattern": pattern},
              st.sampled_from(["a.*", "b.*", ".*", "a0|b0"])))
ASSIGNORS = st.sampled_from(["range", "roundrobin", "sticky"])
MEMBERS_PER_GROUP_MAX = 6


@dataclass
class Client:
    """A consumer process as the coordinator's protocol expects it to behave."""

    group_id: str
    member_id: str
    instance_id: str | None
    subscription: dict
    assignor: str
    session_timeout_ms: int
    rebalance_timeout_ms: int
    epoch: int = 0  # the last epoch it received
    owned: set = field(default_factory=set)  # what it consumes
    revoke: set = field(default_factory=set)  # what it was told to give up
    # What the coordinator last sent, received or lost: its current and previous member epoch.
    sent_epoch: int = 0
    sent_previous_epoch: int = 0
    heartbeat_ms: int = 0
    revoke_deadline_ms: int | None = None

    def join_args(self):
        return dict(group_instance_id=self.instance_id, client_id=f"client-{self.member_id}",
                    assignor=self.assignor, session_timeout_ms=self.session_timeout_ms,
                    rebalance_timeout_ms=self.rebalance_timeout_ms, **self.subscription)


@seed(SEED)
class GroupMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        ids = count()
        self.coordinator = GroupCoordinator(new_member_id=lambda: f"m{next(ids)}")
        self.now_ms = 1000
        self.partitions = {"a0": 2, "b0": 3}
        self.coordinator.update_topics(self.partitions)
        self.clients: dict[str, Client] = {}  # live members, by member id
        self.departed: dict[str, tuple[Client, int]] = {}  # static, left: (client, left at)
        self.zombies: list[Client] = []  # removed by tick while "hung": consume nothing

    # -- helpers --------------------------------------------------------------------------------
    def pick(self, index, pool):
        pool = sorted(pool, key=lambda client: client.member_id)
        return pool[index % len(pool)]

    def member(self, client):
        description = self.coordinator.describe(client.group_id)
        return next(m for m in description.members if m.member_id == client.member_id)

    def members_in(self, group_id):
        return [c for c in self.clients.values() if c.group_id == group_id] + [
            c for c, _ in self.departed.values() if c.group_id == group_id]

    def receive(self, client, response, lost=False):
        """Book what the coordinator sent; unless ``lost``, the client acts on it."""
        assert response.member_id == client.member_id
        if response.member_epoch != client.sent_epoch:
            client.sent_previous_epoch, client.sent_epoch = client.sent_epoch, response.member_epoch
        revoking = self.member(client).revoking
        if revoking and client.revoke_deadline_ms is None:
            client.revoke_deadline_ms = self.now_ms + client.rebalance_timeout_ms
        elif not revoking:
            client.revoke_deadline_ms = None
        if not lost:
            client.epoch = response.member_epoch
            client.owned = set(response.assigned) | (client.owned & response.revoke)
            client.revoke = set(response.revoke)

    def join_client(self, client, **extra):
        response = self.coordinator.join(client.group_id, now_ms=self.now_ms,
                                         **client.join_args(), **extra)
        client.member_id = response.member_id
        client.owned, client.revoke = set(), set()
        client.sent_epoch = client.sent_previous_epoch = response.member_epoch
        client.heartbeat_ms = self.now_ms
        client.revoke_deadline_ms = None
        self.receive(client, response)
        assert not response.revoke  # a joining member owns nothing, so revokes nothing
        return response

    def existing_partitions(self):
        return {(topic, partition) for topic, n in self.partitions.items()
                for partition in range(n)}

    def subscribed(self, client):
        if "subscribed_pattern" in client.subscription:
            pattern = re.compile(client.subscription["subscribed_pattern"])
            return {t for t in self.partitions if pattern.fullmatch(t)}
        return set(client.subscription["subscribed_topics"]) & self.partitions.keys()

    # -- rules ----------------------------------------------------------------------------------
    JOIN = dict(group_id=st.sampled_from(GROUPS), subscription=SUBSCRIPTIONS, assignor=ASSIGNORS,
                static=st.booleans(), session_timeout_ms=st.sampled_from([400, 1500]),
                rebalance_timeout_ms=st.sampled_from([100, 300]))

    @initialize(joins=st.lists(st.fixed_dictionaries(JOIN), min_size=1, max_size=8))
    def start(self, joins):
        for arguments in joins:
            self.join(**arguments)

    @rule(**JOIN)
    def join(self, group_id, subscription, assignor, static, session_timeout_ms,
             rebalance_timeout_ms):
        if len(self.members_in(group_id)) >= MEMBERS_PER_GROUP_MAX:
            return
        used = {c.instance_id for c in self.members_in(group_id)}
        free = [i for i in INSTANCE_IDS if i not in used]
        instance_id = free[0] if static and free else None
        client = Client(group_id, "", instance_id, subscription, assignor, session_timeout_ms,
                        rebalance_timeout_ms)
        self.join_client(client)
        assert client.member_id not in self.clients
        self.clients[client.member_id] = client

    @precondition(lambda self: any(c.instance_id for c in self.clients.values()))
    @rule(index=st.integers(0, 99))
    def instance_id_in_use_is_refused(self, index):
        holder = self.pick(index, [c for c in self.clients.values() if c.instance_id])
        before = self.coordinator.describe(holder.group_id)
        with pytest.raises(UnreleasedInstanceIdError):
            self.coordinator.join(holder.group_id, now_ms=self.now_ms, **holder.join_args())
        assert self.coordinator.describe(holder.group_id) == before

    @precondition(lambda self: self.clients)
    @rule(index=st.integers(0, 99), acknowledge=st.booleans(), lose_response=st.booleans(),
          resubscribe=st.one_of(st.none(), st.none(), st.tuples(SUBSCRIPTIONS, ASSIGNORS)))
    def heartbeat(self, index, acknowledge, lose_response, resubscribe):
        client = self.pick(index, self.clients.values())
        self.send_heartbeat(client, acknowledge, lose_response, resubscribe)

    def send_heartbeat(self, client, acknowledge, lose_response=False, resubscribe=None):
        if acknowledge:  # it committed and stopped consuming what it was told to revoke
            client.owned -= client.revoke
            client.revoke = set()
        subscription = None
        if resubscribe is not None:
            client.subscription, client.assignor = resubscribe
            subscription = self.coordinator.subscription(assignor=client.assignor,
                                                         **client.subscription)
        coordinator_owned = self.member(client).assignment
        expect_fenced = client.epoch != client.sent_epoch and not (
            client.epoch == client.sent_previous_epoch and client.owned <= coordinator_owned)
        try:
            response = self.coordinator.heartbeat(client.group_id, client.member_id,
                                                  client.epoch, frozenset(client.owned),
                                                  self.now_ms, subscription=subscription)
        except FencedMemberEpochError:
            assert expect_fenced
            event("heartbeat fenced, member rejoins")
            # A fenced member's commits are refused (its epoch is older than the previous one).
            if client.owned:
                with pytest.raises(StaleMemberEpochError):
                    self.coordinator.validate_commit(client.group_id, client.member_id,
                                                     client.epoch, client.owned)
            self.join_client(client, member_id=client.member_id)  # drops all, starts over
            return
        assert not expect_fenced
        if client.epoch != client.sent_epoch:
            event("heartbeat at the previous epoch accepted")
        if response.revoke:
            event("heartbeat told to revoke")
        client.heartbeat_ms = self.now_ms
        self.receive(client, response, lost=lose_response)

    @precondition(lambda self: self.clients)
    @rule(index=st.integers(0, 99), closed=st.booleans(), permanent=st.booleans())
    def leave(self, index, closed, permanent):
        client = self.pick(index, self.clients.values())
        before = self.coordinator.describe(client.group_id)
        leaving = self.member(client)
        if closed:
            assert self.coordinator.member_gone(client.group_id, client.member_id, self.now_ms)
            permanent = False
        else:
            self.coordinator.leave(client.group_id, client.member_id, self.now_ms,
                                   permanent=permanent)
        del self.clients[client.member_id]
        if client.instance_id is None or permanent:
            return
        # A static member keeps the partitions of its target it owns; nothing else changes.
        self.departed[client.member_id] = (client, self.now_ms)
        after = self.coordinator.describe(client.group_id)
        assert after.group_epoch == before.group_epoch
        left = next(m for m in after.members if m.member_id == client.member_id)
        assert left.state is MemberState.DEPARTED
        assert left.assignment == leaving.assignment & leaving.target and not left.revoking
        assert [m for m in after.members if m.member_id != client.member_id] == [
            m for m in before.members if m.member_id != client.member_id]

    @precondition(lambda self: self.departed)
    @rule(index=st.integers(0, 99))
    def static_restart(self, index):
        old = self.pick(index, [client for client, _ in self.departed.values()])
        del self.departed[old.member_id]
        before = self.coordinator.describe(old.group_id)
        held = next(m for m in before.members if m.member_id == old.member_id)
        client = Client(old.group_id, "", old.instance_id, old.subscription, old.assignor,
                        old.session_timeout_ms, old.rebalance_timeout_ms)
        response = self.join_client(client)
        self.clients[client.member_id] = client
        event(f"static restart with {len(response.assigned)} partitions")
        # The same partitions back, and any free ones its target gained meanwhile.
        owned = set().union(*(m.assignment for m in before.members))
        assert response.assigned == held.assignment | (held.target - owned)
        after = self.coordinator.describe(old.group_id)
        assert after.group_epoch == before.group_epoch  # no rebalance
        others_before = [m for m in before.members if m.member_id != old.member_id]
        others_after = [m for m in after.members if m.member_id != client.member_id]
        assert others_after == others_before
        mine = next(m for m in after.members if m.member_id == client.member_id)
        assert mine.target == held.target and mine.assignment == response.assigned

    @precondition(lambda self: self.clients)
    @rule(acknowledge=st.lists(st.booleans(), min_size=6, max_size=6))
    def everybody_heartbeats(self, acknowledge):
        for client, ack in zip(sorted(self.clients.values(), key=lambda c: c.member_id),
                               acknowledge * 2):
            self.send_heartbeat(client, ack)

    @precondition(lambda self: self.clients)
    @rule(index=st.integers(0, 99), skew=st.sampled_from([1, 2, -2, -5]))
    def forged_epoch_is_fenced(self, index, skew):
        client = self.pick(index, self.clients.values())
        epoch = client.sent_epoch + skew
        if epoch == client.sent_previous_epoch:
            return
        before = self.coordinator.describe(client.group_id)
        with pytest.raises(FencedMemberEpochError):
            self.coordinator.heartbeat(client.group_id, client.member_id, epoch,
                                       frozenset(client.owned), self.now_ms)
        with pytest.raises(FencedMemberEpochError if skew > 0 else StaleMemberEpochError):
            self.coordinator.validate_commit(client.group_id, client.member_id, epoch,
                                             client.owned)
        assert self.coordinator.describe(client.group_id) == before

    @rule(elapsed_ms=st.sampled_from([0, 20, 50, 100, 150, 250, 400, 1000]))
    def time_passes(self, elapsed_ms):
        self.now_ms += elapsed_ms
        expected = set()
        for client in self.clients.values():
            if self.now_ms >= client.heartbeat_ms + client.session_timeout_ms:
                expected.add((client.member_id, ExpiryReason.SESSION_TIMEOUT))
            elif client.revoke_deadline_ms is not None and self.now_ms >= client.revoke_deadline_ms:
                expected.add((client.member_id, ExpiryReason.REBALANCE_TIMEOUT))
        for client, left_ms in self.departed.values():
            if self.now_ms >= left_ms + client.session_timeout_ms:
                expected.add((client.member_id, ExpiryReason.STATIC_NOT_RETURNED))
        expired = self.coordinator.tick(self.now_ms)
        assert {(e.member_id, e.reason) for e in expired} == expected
        for member_id, reason in expected:
            event(f"expired: {reason.value}")
            if reason is ExpiryReason.STATIC_NOT_RETURNED:
                del self.departed[member_id]
            else:  # a hung process: it consumes nothing until it wakes up
                self.zombies.append(self.clients.pop(member_id))

    @precondition(lambda self: self.zombies)
    @rule(index=st.integers(0, 99))
    def zombie_wakes_up(self, index):
        zombie = self.pick(index, self.zombies)
        self.zombies.remove(zombie)
        event("zombie refused")
        if zombie.owned:
            with pytest.raises(UnknownMemberIdError):
                self.coordinator.validate_commit(zombie.group_id, zombie.member_id, zombie.epoch,
                                                 zombie.owned)
        with pytest.raises(UnknownMemberIdError):
            self.coordinator.heartbeat(zombie.group_id, zombie.member_id, zombie.epoch,
                                       frozenset(zombie.owned), self.now_ms)

    @precondition(lambda self: self.clients)
    @rule(index=st.integers(0, 99), data=st.data())
    def commit(self, index, data):
        client = self.pick(index, self.clients.values())
        mine = sorted(client.owned)
        partitions = set(data.draw(st.lists(st.sampled_from(mine), unique=True))) if mine \
            else set()
        if client.epoch in (client.sent_epoch, client.sent_previous_epoch):
            self.coordinator.validate_commit(client.group_id, client.member_id, client.epoch,
                                             partitions)
        else:
            with pytest.raises(StaleMemberEpochError):
                self.coordinator.validate_commit(client.group_id, client.member_id,
                                                 client.epoch, partitions)
        others = sorted(self.existing_partitions() - self.member(client).assignment)
        if others:
            stranger = data.draw(st.sampled_from(others))
            with pytest.raises((PartitionNotOwnedError, StaleMemberEpochError)):
                self.coordinator.validate_commit(client.group_id, client.member_id,
                                                 client.epoch, partitions | {stranger})

    @rule(counts=st.fixed_dictionaries({topic: st.integers(0, 4) for topic in TOPICS}))
    def topics_change(self, counts):
        self.partitions = {topic: n for topic, n in counts.items() if n}
        self.coordinator.update_topics(self.partitions)

    @rule()
    def converge(self):
        """Every live client heartbeats, acknowledging at once, until nothing changes."""
        for _ in range(8):
            for client in sorted(self.clients.values(), key=lambda c: c.member_id):
                self.send_heartbeat(client, acknowledge=True)
        for group_id in GROUPS:
            try:
                description = self.coordinator.describe(group_id)
            except GroupIdNotFoundError:
                continue
            subscribed = set()
            for member in description.members:
                if member.state is not MemberState.DEPARTED:
                    assert member.state is MemberState.STABLE, member
                    assert member.assignment == member.target
                    assert self.clients[member.member_id].owned == set(member.target)
            for client in self.members_in(group_id):
                subscribed |= {(topic, partition) for topic in self.subscribed(client)
                               for partition in range(self.partitions[topic])}
            targets = [m.target for m in description.members]
            assert sum(map(len, targets)) == len(set().union(*targets)) if targets else True
            assert set().union(*targets) == subscribed if targets else not subscribed
            owned = set().union(*(m.assignment for m in description.members)) \
                if description.members else set()
            waiting = set().union(*(m.target - m.assignment for m in description.members
                                    if m.state is MemberState.DEPARTED)) \
                if description.members else set()
            assert owned | waiting == subscribed  # every subscribed partition is assigned
            if not waiting and description.members:
                assert description.state is GroupState.STABLE
            event(f"converged group of {len(description.members)} members, "
                  f"{len(subscribed) // 4 * 4}+ partitions")

    # -- invariants -----------------------------------------------------------------------------
    @invariant()
    def one_owner_per_partition(self):
        self.coordinator.check_invariants()
        for group_id in GROUPS:
            try:
                description = self.coordinator.describe(group_id)
            except GroupIdNotFoundError:
                continue
            seen = set()
            for member in description.members:
                assert not seen & member.assignment, "a partition has two owners"
                seen |= member.assignment
                assert member.member_epoch <= description.group_epoch
            live = {m.member_id for m in description.members}
            assert live == {c.member_id for c in self.members_in(group_id)}

    @invariant()
    def clients_consume_only_what_they_own(self):
        consuming = {}
        for client in self.clients.values():
            assert client.owned <= self.member(client).assignment, client
            for tp in client.owned:
                assert (client.group_id, tp) not in consuming, (tp, consuming[client.group_id, tp],
                                                                client.member_id)
                consuming[client.group_id, tp] = client.member_id


GroupMachine.TestCase.settings = settings(
    max_examples=100, stateful_step_count=50, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
TestGroupModel = GroupMachine.TestCase


# -- scenarios, step by step --------------------------------------------------------------------
def coordinator(**topics):
    ids = count()
    result = GroupCoordinator(new_member_id=lambda: f"m{next(ids)}")
    result.update_topics(topics)
    return result


def tps(topic, *partitions):
    return frozenset((topic, partition) for partition in partitions)


def test_incremental_rebalance_step_by_step():
    c = coordinator(t=4)
    a = c.join("g", subscribed_topics=["t"], now_ms=0)
    assert (a.member_id, a.member_epoch, a.assigned, a.revoke) == ("m0", 1, tps("t", 0, 1, 2, 3),
                                                                   frozenset())
    b = c.join("g", subscribed_topics=["t"], now_ms=1)
    assert (b.member_epoch, b.assigned) == (2, frozenset())  # t2, t3 are still a's
    states = {m.member_id: m.state for m in c.describe("g").members}
    assert states == {"m0": MemberState.UNREVOKED, "m1": MemberState.UNRELEASED}
    assert c.describe("g").state is GroupState.RECONCILING
    assert c.wakeups() == [("g", "m0")]  # a must hear of its revocation; b waits
    a = c.heartbeat("g", "m0", 1, tps("t", 0, 1, 2, 3), now_ms=2)
    assert (a.member_epoch, a.assigned, a.revoke) == (1, tps("t", 0, 1), tps("t", 2, 3))
    assert c.heartbeat("g", "m1", 2, frozenset(), now_ms=3).assigned == frozenset()
    c.validate_commit("g", "m0", 1, tps("t", 2))  # it commits before it lets go
    with pytest.raises(PartitionNotOwnedError, match="does not own 1 of the partitions"):
        c.validate_commit("g", "m1", 2, tps("t", 2))
    a = c.heartbeat("g", "m0", 1, tps("t", 0, 1), now_ms=4)  # revocation acknowledged
    assert (a.member_epoch, a.assigned, a.revoke) == (2, tps("t", 0, 1), frozenset())
    assert c.wakeups() == [("g", "m1")]
    b = c.heartbeat("g", "m1", 2, frozenset(), now_ms=5)
    assert b.assigned == tps("t", 2, 3)
    assert c.describe("g").state is GroupState.STABLE
    with pytest.raises(StaleMemberEpochError):  # a's epoch moved from 1 to 2: 0 is too old
        c.validate_commit("g", "m0", 0, tps("t", 0))
    c.validate_commit("g", "m0", 1, tps("t", 0))  # the previous epoch, still its partition


def settle(c, group_id, now_ms):
    """Every live member heartbeats, acknowledging its revocations at once, until Stable."""
    for _ in range(4):
        for m in c.describe(group_id).members:
            if m.state is not MemberState.DEPARTED:
                c.heartbeat(group_id, m.member_id, m.member_epoch, m.assignment - m.revoking,
                            now_ms)
    assert c.describe(group_id).state is GroupState.STABLE


def test_closed_connection_hands_partitions_over_at_once():
    c = coordinator(t=4)
    c.join("g", subscribed_topics=["t"], now_ms=0)
    c.join("g", subscribed_topics=["t"], now_ms=0)
    settle(c, "g", now_ms=1)
    assert c.member_gone("g", "m1", now_ms=2)
    assert not c.member_gone("g", "m1", now_ms=2)  # idempotent
    assert c.wakeups() == [("g", "m0")]
    a = c.heartbeat("g", "m0", 2, tps("t", 0, 1), now_ms=3)
    assert a.assigned == tps("t", 0, 1, 2, 3) and a.member_epoch == 3


def test_static_member_restart_and_expiry():
    c = coordinator(t=4)
    s = c.join("g", group_instance_id="i-s", subscribed_topics=["t"], session_timeout_ms=1000,
               now_ms=0)
    d = c.join("g", subscribed_topics=["t"], now_ms=0)
    settle(c, "g", now_ms=1)
    s, d = c.describe("g").members
    kept, epoch = s.assignment, c.describe("g").group_epoch
    assert len(kept) == 2 and len(d.assignment) == 2
    c.member_gone("g", s.member_id, now_ms=10)
    assert c.describe("g").group_epoch == epoch  # no rebalance
    assert c.tick(now_ms=1009) == []
    again = c.join("g", group_instance_id="i-s", subscribed_topics=["t"],
                   session_timeout_ms=1000, now_ms=1009)
    assert again.assigned == kept and again.member_id != s.member_id
    assert c.describe("g").group_epoch == epoch
    with pytest.raises(UnknownMemberIdError):  # the old incarnation is gone
        c.heartbeat("g", s.member_id, s.member_epoch, kept, now_ms=1010)
    c.leave("g", again.member_id, now_ms=1020)
    c.heartbeat("g", d.member_id, d.member_epoch, d.assignment, now_ms=1500)
    expired = c.tick(now_ms=2020)
    assert [(e.member_id, e.group_instance_id, e.reason) for e in expired] == [
        (again.member_id, "i-s", ExpiryReason.STATIC_NOT_RETURNED)]
    assert c.heartbeat("g", d.member_id, d.member_epoch, d.assignment,
                       now_ms=2021).assigned == tps("t", 0, 1, 2, 3)


def test_a_fenced_member_rejoins_under_its_member_id_owning_nothing():
    """KIP-848: a member fenced for an epoch it cannot have (a zombie's) joins again with its
    member id and epoch 0: everything it owned is released at once (the group epoch moves, as
    for a new incarnation), its old epochs can no longer commit, and it is given partitions
    again by the usual reconciliation, never while another member owns them."""
    c = coordinator(t=4)
    c.join("g", subscribed_topics=["t"], now_ms=0)
    c.join("g", subscribed_topics=["t"], now_ms=0)
    settle(c, "g", now_ms=1)
    a, b = c.describe("g").members
    epoch_before = c.describe("g").group_epoch
    with pytest.raises(FencedMemberEpochError, match="must drop its partitions and join again"):
        c.heartbeat("g", a.member_id, a.member_epoch + 7, a.assignment, now_ms=2)
    again = c.join("g", member_id=a.member_id, subscribed_topics=["t"], now_ms=3)
    assert again.member_id == a.member_id
    assert c.describe("g").group_epoch > epoch_before
    with pytest.raises(StaleMemberEpochError):  # the zombie's commits, at its old epoch
        c.validate_commit("g", a.member_id, a.member_epoch, a.assignment)
    # What it owned was released: b may be given it, and no partition has two owners.
    settle(c, "g", now_ms=4)
    members = c.describe("g").members
    owned = [tp for member in members for tp in member.assignment]
    assert sorted(owned) == sorted(tps("t", 0, 1, 2, 3)) and len(owned) == len(set(owned))
    assert {member.member_id for member in members} == {a.member_id, b.member_id}
    with pytest.raises(UnknownMemberIdError):  # and an id it never had is refused
        c.join("g", member_id="m-unknown", subscribed_topics=["t"], now_ms=5)


def test_timeouts():
    c = coordinator(t=2)
    a = c.join("g", subscribed_topics=["t"], session_timeout_ms=1000, rebalance_timeout_ms=300,
               now_ms=0)
    c.join("g", subscribed_topics=["t"], session_timeout_ms=1000, now_ms=0)
    a = c.heartbeat("g", "m0", a.member_epoch, a.assigned, now_ms=100)
    assert a.revoke  # it must give one partition up within 300 ms
    c.heartbeat("g", "m1", 2, frozenset(), now_ms=300)
    assert c.tick(now_ms=399) == []
    assert [(e.member_id, e.reason) for e in c.tick(now_ms=400)] == [
        ("m0", ExpiryReason.REBALANCE_TIMEOUT)]
    b = c.heartbeat("g", "m1", 2, frozenset(), now_ms=401)
    assert b.assigned == tps("t", 0, 1)
    assert [(e.member_id, e.reason) for e in c.tick(now_ms=1401)] == [
        ("m1", ExpiryReason.SESSION_TIMEOUT)]
    assert c.describe("g").state is GroupState.EMPTY


def test_pattern_subscription_follows_topic_changes():
    c = coordinator(**{"metrics-1": 1, "logs": 1})
    a = c.join("g", subscribed_pattern=r"metrics-\d+", now_ms=0)
    assert a.assigned == tps("metrics-1", 0)
    assert c.update_topics({"metrics-1": 2, "metrics-2": 1, "logs": 1}) == ["g"]
    assert c.update_topics({"metrics-1": 2, "metrics-2": 1, "logs": 3}) == []  # not subscribed
    a = c.heartbeat("g", a.member_id, a.member_epoch, a.assigned, now_ms=1)
    assert a.assigned == tps("metrics-1", 0, 1) | tps("metrics-2", 0)
    c.update_topics({"metrics-2": 1, "logs": 3})  # metrics-1 deleted: revoked like any other
    a = c.heartbeat("g", a.member_id, a.member_epoch, a.assigned, now_ms=2)
    assert (a.assigned, a.revoke) == (tps("metrics-2", 0), tps("metrics-1", 0, 1))


def test_subscription_change_and_assignor_vote():
    c = coordinator(t=4, u=2)
    a = c.join("g", subscribed_topics=["t"], assignor="sticky", now_ms=0)
    c.join("g", subscribed_topics=["t"], assignor="roundrobin", now_ms=0)
    c.join("g", subscribed_topics=["t"], assignor="roundrobin", now_ms=0)
    assert c.describe("g").assignor == "roundrobin"
    a = c.heartbeat("g", "m0", a.member_epoch, a.assigned, now_ms=1,
                    subscription=c.subscription(["u"], assignor="sticky"))
    description = c.describe("g")
    mine = next(m for m in description.members if m.member_id == "m0")
    assert mine.target == tps("u", 0, 1) and mine.subscribed_topics == {"u"}
    # its free new partitions at once, while it still revokes the old ones
    assert a.revoke == tps("t", 0, 1, 2, 3) and a.assigned == tps("u", 0, 1)


def test_free_partitions_are_granted_while_revocations_are_pending():
    """A dead member's partitions go to their new owners at the first heartbeat, even to a
    member that must still give up others (range moves every member's range)."""
    c = coordinator(t=6)
    members = [c.join("g", subscribed_topics=["t"], assignor="range", now_ms=0)
               for _ in range(3)]
    for _ in range(3):  # settle: each owns its range of two
        members = [c.heartbeat("g", m.member_id, m.member_epoch, m.assigned - m.revoke,
                               now_ms=1) for m in members]
    assert [sorted(m.assigned) for m in members] == [
        sorted(tps("t", 0, 1)), sorted(tps("t", 2, 3)), sorted(tps("t", 4, 5))]
    c.member_gone("g", members[0].member_id, now_ms=2)  # t-0 and t-1 are free now
    m1, m2 = members[1], members[2]
    # range over 2 members: m1 gets t-0..2 and must give t-3 to m2; its free t-0 and t-1 come
    # at once, with the revocation still pending
    m1 = c.heartbeat("g", m1.member_id, m1.member_epoch, m1.assigned, now_ms=3)
    assert (m1.assigned, m1.revoke) == (tps("t", 0, 1, 2), tps("t", 3))
    m2 = c.heartbeat("g", m2.member_id, m2.member_epoch, m2.assigned, now_ms=3)
    assert m2.assigned == tps("t", 4, 5)  # t-3 is still m1's
    c.check_invariants()
    m1 = c.heartbeat("g", m1.member_id, m1.member_epoch, m1.assigned, now_ms=4)  # acknowledges
    m2 = c.heartbeat("g", m2.member_id, m2.member_epoch, m2.assigned, now_ms=4)
    assert (m1.assigned, m1.revoke, m2.assigned) == (tps("t", 0, 1, 2), frozenset(),
                                                     tps("t", 3, 4, 5))
    c.check_invariants()


def test_custom_assignor_plugs_in():
    """The state machine does not care who computes the target (a classic-protocol leader)."""
    leader_says = {}

    def from_leader(members, partitions_by_topic):
        return {member_id: leader_says.get(member_id, frozenset()) for member_id in members}

    c = GroupCoordinator({"leader": from_leader}, new_member_id=iter(["x", "y"]).__next__)
    c.update_topics({"t": 2})
    leader_says["x"] = tps("t", 1)
    assert c.join("g", subscribed_topics=["t"], assignor="leader", now_ms=0).assigned == tps(
        "t", 1)


def test_bad_input_gets_clear_errors(monkeypatch):
    from shmbroker import limits
    from shmbroker.errors import (
        BrokerError,
        GroupMaxSizeReachedError,
        InvalidCommitOffsetSizeError,
        InvalidGroupIdError,
        InvalidRegularExpressionError,
        InvalidSessionTimeoutError,
        InvalidTopicNameError,
        NonEmptyGroupError,
        ProtocolError,
        UnsupportedAssignorError,
        error_from_code,
    )

    c = coordinator(t=1)
    with pytest.raises(GroupIdNotFoundError, match="group 'nope' does not exist"):
        c.describe("nope")
    with pytest.raises(InvalidGroupIdError):
        c.join("", subscribed_topics=["t"], now_ms=0)
    with pytest.raises(ProtocolError, match="exactly one"):
        c.join("g", subscribed_topics=["t"], subscribed_pattern="t", now_ms=0)
    with pytest.raises(InvalidRegularExpressionError, match="not a valid regular expression"):
        c.join("g", subscribed_pattern="(", now_ms=0)
    with pytest.raises(UnsupportedAssignorError, match="'cooperative'"):
        c.join("g", subscribed_topics=["t"], assignor="cooperative", now_ms=0)
    with pytest.raises(InvalidSessionTimeoutError, match="session_timeout_ms is 5"):
        c.join("g", subscribed_topics=["t"], session_timeout_ms=5, now_ms=0)
    with pytest.raises(InvalidTopicNameError):
        c.join("g", subscribed_topics=["bad/name"], now_ms=0)
    assert c.list_groups() == []  # nothing was created by the refused joins
    c.validate_commit("g", None, -1, tps("t", 0))  # no members: admin commits are fine
    a = c.join("g", subscribed_topics=["t"], now_ms=0)
    with pytest.raises(NonEmptyGroupError):
        c.validate_commit("g", "", -1, tps("t", 0))
    with pytest.raises(NonEmptyGroupError, match=r"has 1 member\(s\)"):
        c.delete_group("g")
    with pytest.raises(InvalidCommitOffsetSizeError):
        c.validate_commit("g", a.member_id, a.member_epoch,
                          tps("t", *range(limits.commit_partitions_max + 1)))
    with pytest.raises(UnknownMemberIdError, match="join again without a member id"):
        c.heartbeat("g", "m9", 1, frozenset(), now_ms=0)
    with pytest.raises(GroupIdNotFoundError):
        c.heartbeat("h", a.member_id, 1, frozenset(), now_ms=0)
    monkeypatch.setattr(limits, "members_per_group_max", 1)
    with pytest.raises(GroupMaxSizeReachedError):
        c.join("g", subscribed_topics=["t"], now_ms=0)
    c.leave("g", a.member_id, now_ms=1)
    assert [(g.group_id, g.state, g.members) for g in c.list_groups()] == [
        ("g", GroupState.EMPTY, 0)]
    c.delete_group("g")
    assert c.list_groups() == []
    # Every coded error maps back to its class across the wire.
    seen = {}
    pending = [BrokerError]
    while pending:
        cls = pending.pop()
        assert seen.setdefault(cls.code, cls) is cls, f"code {cls.code} used twice"
        assert type(error_from_code(cls.code, "m")) is cls
        pending.extend(cls.__subclasses__())
