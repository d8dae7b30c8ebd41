"""A consumer's group membership: the heartbeat thread and what it shares with the consumer.

The heartbeat thread owns one connection to the supervisor (the *member connection*; its closing
is how the supervisor learns at once that this process died).  It joins, heartbeats every
``heartbeat_interval_ms`` (the coordinator's choice) and whenever the supervisor nudges it or the
consumer asks, independently of the application's poll loop, so a slow handler is not evicted.

Division of work (the coordinator's contract, ``shmbroker.coordinator.group``):

* the thread reports in ``owned`` exactly the partitions the consumer consumes (the consumer
  updates :attr:`Membership.owned` under :attr:`Membership.lock` as it takes and drops them);
* the thread stores the latest response's ``assigned`` and ``revoke`` sets and wakes the consumer;
* the consumer, inside ``poll`` on the application's thread, reconciles: it commits and drops the
  partitions it is losing (then asks for a heartbeat at once: that acknowledges the revocation),
  and takes the newly assigned ones; listener callbacks run there, as Kafka's do.

Losing the membership (fenced, session expired, the supervisor gone, ``max_poll_interval_ms``
passed without a poll): the thread marks the partitions *lost* and waits; the consumer drops them
at its next poll without committing (``on_partitions_lost``) and the thread then joins again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shmbroker.client.connection import read_frame
from shmbroker.client.types import TopicPartition
from shmbroker.errors import (
    BrokerError,
    FencedMemberEpochError,
    ProtocolError,
    ShmbrokerError,
    UnknownMemberIdError,
    UnreleasedInstanceIdError,
)
from shmbroker.protocol.frames import frame_head
from shmbroker.protocol.messages import UNSOLICITED_CORRELATION_ID, ApiKey, check_response
from shmbroker.transport.unix import connect

logger = logging.getLogger("shmbroker.consumer")

RECONNECT_PAUSE_S = 0.05
# Before the first response tells us the coordinator's interval.
INITIAL_HEARTBEAT_INTERVAL_S = 1.0


class Membership:
    """State shared between the heartbeat thread and the consumer (guarded by ``lock``)."""

    def __init__(self, socket_path: Path, group_id: str, *, group_instance_id: str | None,
                 client_id: str, assignor: str, session_timeout_ms: int,
                 max_poll_interval_ms: int, request_timeout_s: float,
                 wake_consumer: Callable[[], None]) -> None:
        self.socket_path = socket_path
        self.group_id = group_id
        self.group_instance_id = group_instance_id
        self.client_id = client_id
        self.assignor = assignor
        self.session_timeout_ms = session_timeout_ms
        self.max_poll_interval_s = max_poll_interval_ms / 1000
        self.request_timeout_s = request_timeout_s
        self._wake_consumer = wake_consumer
        self.lock = threading.Lock()
        # -- shared, under lock -----------------------------------------------------------------
        self.topics: list[str] | None = None
        self.pattern: str | None = None
        self.member_id: str | None = None
        self.member_epoch = 0
        self.owned: set[TopicPartition] = set()  # what the consumer consumes (it updates this)
        # A request reporting ``owned`` is in flight: the consumer must not take partitions
        # now.  That request may report them not owned, which the coordinator reads as "given
        # up": it could hand them to another member while we start consuming them.
        self.request_in_flight = False
        self.assigned: frozenset[TopicPartition] = frozenset()  # latest response
        self.revoke: frozenset[TopicPartition] = frozenset()
        self.version = 0  # bumped at every response and loss: the consumer reconciles on change
        self.lost = False  # the consumer must drop everything (no commit), then we rejoin
        self.lost_reason = ""
        self.error: ShmbrokerError | None = None  # fatal: raised by the consumer's next poll
        self.last_poll = time.monotonic()
        self.joined = threading.Event()  # set at every successful join
        # -- thread-side --------------------------------------------------------------------------
        self._subscription_changed = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._stopping = False
        self._heartbeat_now = False
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None
        self._in_flight: int | None = None  # api key of the request in flight
        self._sent_at = 0.0
        self._correlation = 0
        self._interval_s = INITIAL_HEARTBEAT_INTERVAL_S
        self._next_heartbeat = 0.0
        self._unreleased_until: float | None = None
        self._needs_join = True
        self._join_not_before = 0.0

    # -- called by the consumer ------------------------------------------------------------------
    def subscribe(self, topics: list[str] | None, pattern: str | None) -> None:
        with self.lock:
            self.topics, self.pattern = topics, pattern
            self._subscription_changed = True
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="shmbroker-heartbeat",
                                            daemon=True)
            self._thread.start()
        else:
            self.heartbeat_now()

    def heartbeat_now(self) -> None:
        """Heartbeat at once (the consumer dropped partitions: this acknowledges it)."""
        self._heartbeat_now = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"h")

    def polled(self) -> None:
        self.last_poll = time.monotonic()

    def acknowledge_lost(self) -> None:
        """The consumer dropped every partition after a loss: the thread may join again."""
        with self.lock:
            self.lost = False
            self.owned.clear()
        self.heartbeat_now()

    def close(self) -> None:
        """Stop heartbeating; leave the group (a static member keeps its partitions for its
        session timeout, as Kafka's static members do) and close the member connection."""
        thread = self._thread
        if thread is not None:
            self._stopping = True
            with contextlib.suppress(OSError):
                self._wake_w.send(b"s")
            thread.join(self.request_timeout_s + 1)
        self._wake_r.close()
        self._wake_w.close()

    # -- the heartbeat thread --------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stopping:
                self._step()
            self._leave_group()
        except BaseException as error:  # never die silently: the consumer raises it
            logger.exception("heartbeat thread failed")
            with self.lock:
                self.error = error if isinstance(error, ShmbrokerError) else BrokerError(
                    f"the heartbeat thread failed: {error!r}")
            self._wake_consumer()
        finally:
            self._disconnect()

    def _step(self) -> None:
        now = time.monotonic()
        if self._sock is None and not self._connect():
            self._wait(RECONNECT_PAUSE_S)
            return
        with self.lock:
            lost, error, member_id = self.lost, self.error, self.member_id
        if error is not None:
            self._wait(1.0)
            return
        if member_id is not None and not lost and now - self.last_poll > self.max_poll_interval_s:
            self._leave_group(permanent=True)
            self._lose(f"no poll for more than max_poll_interval_ms "
                       f"({self.max_poll_interval_s * 1000:.0f} ms): left the group; the next "
                       f"poll joins again")
            return
        if self._in_flight is None and not lost:
            if self._needs_join:
                if now >= self._join_not_before:
                    self._send_join()
            elif self._heartbeat_now or self._subscription_changed or (
                    now >= self._next_heartbeat):
                self._send_heartbeat()
        if self._in_flight is not None and now - self._sent_at > self.request_timeout_s:
            logger.warning("group %r: no answer to a heartbeat in %.1f s; reconnecting",
                           self.group_id, self.request_timeout_s)
            self._connection_lost()
            return
        if self._in_flight is not None:
            timeout = self.request_timeout_s
        elif self._needs_join:
            timeout = max(0.0, self._join_not_before - now)
        else:
            timeout = max(0.0, self._next_heartbeat - now)
        if member_id is not None and not lost:
            timeout = min(timeout, max(0.01, self.max_poll_interval_s - (now - self.last_poll)))
        self._wait(timeout)

    def _wait(self, timeout: float) -> None:
        watched: list[Any] = [self._wake_r]
        if self._sock is not None:
            watched.append(self._sock)
        readable, _, _ = select.select(watched, [], [], timeout)
        if self._wake_r in readable:
            with contextlib.suppress(BlockingIOError):
                self._wake_r.recv(4096)
        if self._sock is not None and self._sock in readable:
            self._read()

    def _connect(self) -> bool:
        try:
            self._sock = connect(self.socket_path, self.request_timeout_s)
        except OSError:
            return False
        self._in_flight = None
        return True

    def _disconnect(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None
        self._in_flight = None
        self._request_done()

    def _send(self, api_key: ApiKey, body: dict[str, Any]) -> None:
        """Send a join or heartbeat; ``request_in_flight`` is already set (under the lock that
        read ``owned``) and stays set until its answer is applied or the connection is lost."""
        assert self._sock is not None
        self._correlation = self._correlation % 0x7FFFFFFF + 1
        try:
            self._sock.sendall(frame_head(api_key, self._correlation, body))
        except OSError:
            self._connection_lost()
            return
        self._in_flight = self._correlation
        self._sent_at = time.monotonic()

    def _request_done(self) -> None:
        with self.lock:
            self.request_in_flight = False

    def _subscription_body(self) -> dict[str, Any]:
        with self.lock:
            self._subscription_changed = False
            return {"topics": self.topics, "pattern": self.pattern, "assignor": self.assignor}

    def _send_join(self) -> None:
        self._needs_join = False
        with self.lock:
            self.request_in_flight = True  # a join owns nothing
        self._send(ApiKey.JOIN_GROUP, {
            "group_id": self.group_id, "member_id": self.member_id,
            "group_instance_id": self.group_instance_id, "client_id": self.client_id,
            "pid": os.getpid(), "session_timeout_ms": self.session_timeout_ms,
            "rebalance_timeout_ms": int(self.max_poll_interval_s * 1000),
            **self._subscription_body()})

    def _send_heartbeat(self) -> None:
        self._heartbeat_now = False
        with self.lock:
            owned = sorted(self.owned)
            self.request_in_flight = True
        body: dict[str, Any] = {"group_id": self.group_id, "member_id": self.member_id,
                                "member_epoch": self.member_epoch,
                                "owned": [[topic, partition] for topic, partition in owned]}
        if self._subscription_changed:
            body.update(self._subscription_body())
        self._send(ApiKey.HEARTBEAT, body)

    def _read(self) -> None:
        assert self._sock is not None
        try:
            body, _, correlation_id = read_frame(self._sock)
        except (OSError, ProtocolError):
            self._connection_lost()
            return
        if correlation_id == UNSOLICITED_CORRELATION_ID and body.get("nudge"):
            self._heartbeat_now = True
            return
        if correlation_id != self._in_flight:
            self._connection_lost()
            return
        self._in_flight = None
        if "error" in body:  # refused: it changed nothing the consumer must wait for
            self._request_done()
        try:
            check_response(body)
        except (UnknownMemberIdError, FencedMemberEpochError) as error:
            forget = isinstance(error, UnknownMemberIdError)
            self._lose(f"the coordinator fenced this member: {error}", forget_member=forget)
            return
        except UnreleasedInstanceIdError as error:
            # our previous incarnation's connection is not closed yet: retry for a session
            now = time.monotonic()
            if self._unreleased_until is None:
                self._unreleased_until = now + self.session_timeout_ms / 1000
            if now >= self._unreleased_until:
                self._fail(error)
            self._join_not_before = now + RECONNECT_PAUSE_S
            self._needs_join = True
            return
        except ShmbrokerError as error:
            self._fail(error)
            return
        self._unreleased_until = None
        self._interval_s = body["heartbeat_interval_ms"] / 1000
        self._next_heartbeat = time.monotonic() + self._interval_s
        assigned = frozenset(TopicPartition(t, p) for t, p in body["assigned"])
        revoke = frozenset(TopicPartition(t, p) for t, p in body["revoke"])
        with self.lock:
            self.request_in_flight = False
            joined = self.member_id != body["member_id"] or self.member_epoch == 0
            # (also when partitions given earlier are still to take: the consumer deferred
            # them while this request was in flight)
            changed = (assigned != self.assigned or revoke != self.revoke
                       or self.member_epoch != body["member_epoch"] or not assigned <= self.owned)
            self.member_id = body["member_id"]
            self.member_epoch = body["member_epoch"]
            self.assigned, self.revoke = assigned, revoke
            if changed:
                self.version += 1
        if joined:
            self.joined.set()
        if changed:
            self._wake_consumer()

    def _lose(self, reason: str, forget_member: bool = True) -> None:
        """Everything owned is lost: the consumer drops it at its next poll; then rejoin."""
        logger.warning("group %r: %s", self.group_id, reason)
        with self.lock:
            self.lost = True
            self.lost_reason = reason
            self.assigned = self.revoke = frozenset()
            self.member_epoch = 0
            if forget_member:
                self.member_id = None
            self.version += 1
        self._needs_join = True
        self._wake_consumer()

    def _fail(self, error: ShmbrokerError) -> None:
        logger.error("group %r: %s", self.group_id, error)
        with self.lock:
            self.error = error
            self.version += 1
        self._wake_consumer()

    def _connection_lost(self) -> None:
        self._disconnect()
        # the supervisor is gone or restarting: a new one knows nothing of this member
        self._lose("the connection to the supervisor closed", forget_member=True)

    def _leave_group(self, permanent: bool = False) -> None:
        """Leave (answered before this returns).  A static member leaves only ``permanent``ly
        (its poll interval passed); closing, it just closes its connection: the coordinator
        then keeps its partitions for its session timeout, for the restarted instance."""
        if self._sock is None or self.member_id is None:
            return
        member_id = self.member_id
        if not permanent and self.group_instance_id is not None:
            return
        with contextlib.suppress(OSError, ShmbrokerError):
            self._sock.settimeout(self.request_timeout_s)
            if self._in_flight is not None:  # take the answer in flight first
                read_frame(self._sock)
                self._in_flight = None
            self._sock.sendall(frame_head(ApiKey.LEAVE_GROUP, 0x7FFFFFFF, {
                "group_id": self.group_id, "member_id": member_id,
                "permanent": permanent}))
            while True:
                body, _, correlation_id = read_frame(self._sock)
                if correlation_id == 0x7FFFFFFF:
                    check_response(body)
                    break
        with self.lock:
            self.member_id = None
            self.member_epoch = 0
