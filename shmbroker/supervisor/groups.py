"""Consumer groups served by the supervisor: the coordinator (a pure state machine) bound to
connections, clocks and the committed-offset log.

* A member's **connection** is its liveness: the connection that joined (or last heartbeated) for
  a member is recorded, and when it closes the member is gone at once (``member_gone``: a dynamic
  member's partitions go to the others, a static one's wait ``session_timeout_ms`` for its
  instance).  A hung member (its connection open, no heartbeats) is removed by ``tick`` after its
  session timeout.
* **Nudges**: after every loop iteration the supervisor asks the coordinator which members' next
  heartbeat would bring news and sends each an unsolicited HEARTBEAT frame (correlation id 0);
  the client heartbeats at once.  A rebalance therefore costs a few round trips on a Unix socket,
  not heartbeat intervals.
* Views for admin: list (coordinator groups and groups that only have committed offsets, as
  Kafka lists them) and describe (members, assignment, committed offset, log end and lag).

The clock is ``time.monotonic`` in integer milliseconds (the coordinator's ``now_ms``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from shmbroker.coordinator.assignors import TopicPartition
from shmbroker.coordinator.group import (
    GroupCoordinator,
    GroupDescription,
    GroupState,
    HeartbeatResponse,
)
from shmbroker.errors import GroupIdNotFoundError, InvalidGroupIdError, ProtocolError
from shmbroker.protocol.frames import Frame, frame_head
from shmbroker.protocol.messages import UNSOLICITED_CORRELATION_ID, ApiKey, field
from shmbroker.storage.offset_log import OffsetLog, validate_group_id
from shmbroker.transport.unix import ServerConnection

logger = logging.getLogger("shmbroker.groups")

# How often expiry deadlines are checked; session timeouts are >= 100 ms (limits).
TICK_INTERVAL_MS = 10


def monotonic_ms() -> int:
    return time.monotonic_ns() // 1_000_000


def partitions_field(body: dict[str, Any], name: str) -> list[TopicPartition]:
    """A request's list of [topic, partition] pairs, checked."""
    found = []
    for entry in field(body, name, list):
        if (not isinstance(entry, list) or len(entry) != 2 or not isinstance(entry[0], str)
                or type(entry[1]) is not int):
            raise ProtocolError(f"each entry of {name!r} is [topic, partition]")
        found.append((entry[0], entry[1]))
    return found


def check_group_id(value: object) -> str:
    try:
        return validate_group_id(value)
    except ValueError as error:
        raise InvalidGroupIdError(str(error)) from None


def _pairs(partitions: frozenset[TopicPartition]) -> list[list[Any]]:
    return [[topic, partition] for topic, partition in sorted(partitions)]


def heartbeat_body(response: HeartbeatResponse) -> dict[str, Any]:
    return {"member_id": response.member_id, "member_epoch": response.member_epoch,
            "assigned": _pairs(response.assigned), "revoke": _pairs(response.revoke),
            "heartbeat_interval_ms": response.heartbeat_interval_ms}


class _Link:
    """The connection speaking for a member, and what it told us about its process."""

    __slots__ = ("connection", "pid")

    def __init__(self, connection: ServerConnection, pid: int | None) -> None:
        self.connection = connection
        self.pid = pid


class GroupService:
    """The supervisor's consumer-group requests.  Single-threaded: called from its loop."""

    def __init__(self, offsets: OffsetLog,
                 log_positions: Callable[[str, int], tuple[int, int, int]],
                 clock_ms: Callable[[], int] = monotonic_ms) -> None:
        self.coordinator = GroupCoordinator()
        self.offsets = offsets
        self._log_positions = log_positions  # (topic, partition) -> (start, end, high watermark)
        self._clock_ms = clock_ms
        self._links: dict[tuple[str, str], _Link] = {}
        self._by_connection: dict[ServerConnection, set[tuple[str, str]]] = {}
        self._next_tick_ms = 0

    # -- requests -----------------------------------------------------------------------------
    def handle(self, connection: ServerConnection, frame: Frame) -> dict[str, Any]:
        api_key, body = frame.api_key, frame.body
        if api_key == ApiKey.JOIN_GROUP:
            return self._join(connection, body)
        if api_key == ApiKey.HEARTBEAT:
            return self._heartbeat(connection, body)
        if api_key == ApiKey.LEAVE_GROUP:
            group_id = field(body, "group_id", str)
            member_id = field(body, "member_id", str)
            self.coordinator.leave(group_id, member_id, self._clock_ms(),
                                   permanent=field(body, "permanent", bool, default=False))
            self._unlink((group_id, member_id))
            return {}
        if api_key == ApiKey.LIST_GROUPS:
            return {"groups": self.list_groups()}
        if api_key == ApiKey.DESCRIBE_GROUP:
            return self.describe(field(body, "group_id", str))
        raise ProtocolError(f"api key {api_key} is not a group request")

    def _subscription_args(self, body: dict[str, Any]) -> dict[str, Any]:
        topics = field(body, "topics", list, default=None)
        return {"subscribed_topics": topics,
                "subscribed_pattern": field(body, "pattern", str, default=None),
                "assignor": field(body, "assignor", str, default="range")}

    def _join(self, connection: ServerConnection, body: dict[str, Any]) -> dict[str, Any]:
        group_id = field(body, "group_id", str)
        pid = field(body, "pid", int, default=None, minimum=0)
        response = self.coordinator.join(
            group_id, member_id=field(body, "member_id", str, default=None),
            group_instance_id=field(body, "group_instance_id", str, default=None),
            client_id=field(body, "client_id", str, default=""),
            session_timeout_ms=field(body, "session_timeout_ms", int),
            rebalance_timeout_ms=field(body, "rebalance_timeout_ms", int),
            now_ms=self._clock_ms(), **self._subscription_args(body))
        self._link((group_id, response.member_id), connection, pid)
        logger.info("group %r: member %s joined (pid %s, epoch %d)", group_id,
                    response.member_id, pid, response.member_epoch)
        return heartbeat_body(response)

    def _heartbeat(self, connection: ServerConnection, body: dict[str, Any]) -> dict[str, Any]:
        group_id = field(body, "group_id", str)
        member_id = field(body, "member_id", str)
        subscription = None
        if "topics" in body or "pattern" in body:
            subscription = self.coordinator.subscription(**self._subscription_args(body))
        response = self.coordinator.heartbeat(
            group_id, member_id, field(body, "member_epoch", int),
            partitions_field(body, "owned"), self._clock_ms(), subscription=subscription)
        key = (group_id, member_id)
        link = self._links.get(key)
        if link is None or link.connection is not connection:
            self._link(key, connection, link.pid if link else None)
        return heartbeat_body(response)

    # -- connections and time -----------------------------------------------------------------
    def _link(self, key: tuple[str, str], connection: ServerConnection, pid: int | None) -> None:
        self._unlink(key)
        self._links[key] = _Link(connection, pid)
        self._by_connection.setdefault(connection, set()).add(key)

    def _unlink(self, key: tuple[str, str]) -> None:
        link = self._links.pop(key, None)
        if link is not None:
            keys = self._by_connection.get(link.connection)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._by_connection[link.connection]

    def connection_closed(self, connection: ServerConnection) -> None:
        """The members this connection spoke for are gone (process exit or kill)."""
        keys = self._by_connection.pop(connection, None)
        if not keys:
            return
        now_ms = self._clock_ms()
        for group_id, member_id in sorted(keys):
            self._links.pop((group_id, member_id), None)
            if self.coordinator.member_gone(group_id, member_id, now_ms):
                logger.info("group %r: member %s gone (its connection closed)", group_id,
                            member_id)

    def tick(self) -> None:
        now_ms = self._clock_ms()
        if now_ms < self._next_tick_ms:
            return
        self._next_tick_ms = now_ms + TICK_INTERVAL_MS
        for expired in self.coordinator.tick(now_ms):
            logger.warning("group %r: member %s removed (%s)", expired.group_id,
                           expired.member_id, expired.reason.value)
            self._unlink((expired.group_id, expired.member_id))

    def nudge(self) -> list[ServerConnection]:
        """Nudge the members whose next heartbeat brings news; returns the connections written."""
        written = []
        for group_id, member_id in self.coordinator.wakeups():
            link = self._links.get((group_id, member_id))
            if link is None or link.connection.closed or link.connection.pending_output:
                continue  # gone, or not reading what it was sent: it heartbeats on its own
            link.connection.send(frame_head(
                ApiKey.HEARTBEAT, UNSOLICITED_CORRELATION_ID,
                {"nudge": True, "group_id": group_id, "member_id": member_id}))
            written.append(link.connection)
        return written

    def update_topics(self, partitions_by_topic: dict[str, int]) -> None:
        changed = self.coordinator.update_topics(partitions_by_topic)
        if changed:
            logger.info("topics changed: reassigning groups %s", ", ".join(map(repr, changed)))

    # -- admin views ----------------------------------------------------------------------------
    def list_groups(self) -> list[dict[str, Any]]:
        listed = {listing.group_id: {"group_id": listing.group_id,
                                     "state": listing.state.value,
                                     "group_epoch": listing.group_epoch,
                                     "members": listing.members}
                  for listing in self.coordinator.list_groups()}
        for group_id in self.offsets.groups():
            listed.setdefault(group_id, {"group_id": group_id, "state": GroupState.EMPTY.value,
                                         "group_epoch": 0, "members": 0})
        return [listed[group_id] for group_id in sorted(listed)]

    def _description(self, group_id: str) -> GroupDescription | None:
        try:
            return self.coordinator.describe(group_id)
        except GroupIdNotFoundError:
            if group_id not in self.offsets.groups():
                raise
            return None

    def describe(self, group_id: str) -> dict[str, Any]:
        """State, members (client id, pid, assignment) and per partition the committed offset,
        the log end and the lag, as kafka-consumer-groups --describe."""
        check_group_id(group_id)
        description = self._description(group_id)
        committed = self.offsets.offsets(group_id)
        owners: dict[tuple[str, int], str] = {}
        members = []
        if description is not None:
            for member in description.members:
                link = self._links.get((group_id, member.member_id))
                for tp in member.assignment:
                    owners[tp] = member.member_id
                members.append({
                    "member_id": member.member_id, "group_instance_id": member.group_instance_id,
                    "client_id": member.client_id, "pid": link.pid if link else None,
                    "member_epoch": member.member_epoch, "state": member.state.value,
                    "subscribed_topics": (sorted(member.subscribed_topics)
                                          if member.subscribed_topics is not None else None),
                    "subscribed_pattern": member.subscribed_pattern,
                    "assignor": member.assignor, "assignment": _pairs(member.assignment),
                    "revoking": _pairs(member.revoking), "target": _pairs(member.target)})
        partitions = []
        for topic, partition in sorted(set(committed) | set(owners)):
            offset, metadata = committed.get((topic, partition), (-1, None))
            _, log_end, high_watermark = self._log_positions(topic, partition)
            partitions.append({
                "topic": topic, "partition": partition,
                "committed_offset": offset if offset >= 0 else None, "metadata": metadata,
                "log_end_offset": high_watermark if high_watermark >= 0 else None,
                "lag": (high_watermark - offset if offset >= 0 and high_watermark >= 0
                        else None),
                "member_id": owners.get((topic, partition))})
        return {"group_id": group_id,
                "state": description.state.value if description else GroupState.EMPTY.value,
                "group_epoch": description.group_epoch if description else 0,
                "assignor": description.assignor if description else None,
                "members": members, "partitions": partitions}

    def delete_group(self, group_id: str) -> None:
        """Forget ``group_id``: refused while it has members; its committed offsets are staged
        for deletion (durable at the supervisor's next offsets sync)."""
        check_group_id(group_id)
        try:
            self.coordinator.delete_group(group_id)
        except GroupIdNotFoundError:
            if group_id not in self.offsets.groups():
                raise
        if group_id in self.offsets.groups():
            self.offsets.delete_group(group_id)
