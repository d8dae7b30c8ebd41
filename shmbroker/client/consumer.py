"""The consumer: fetches from partition workers (long poll), decodes batches, tracks positions.

>>> with Consumer(data_dir="./shmbroker-data") as consumer:
...     consumer.assign([TopicPartition("metrics", 0)])
...     consumer.seek_to_beginning()
...     for record in consumer.poll(timeout_ms=1000):
...         print(record.offset, record.value)

Without direct reads (below), each assigned partition keeps one fetch in flight on its worker's
socket: as soon as a response arrives the next fetch is sent, before the records are decoded,
so the worker reads the next range while we decode this one.  A response is whole RecordBatches
straight from the segment file (the worker uses sendfile); records below the position are
skipped (a fetch starts at the batch holding the position).

Direct reads.  A consumer on the broker's host reads on by itself: once a fetch response has
said where its batches lie (segment, byte position), later polls read the active segment file
with one ``os.preadv`` up to the readable end its worker publishes in the partition's control
block after each append (the high watermark's byte position: batch boundaries, committed
records only), without a round trip to the worker.  Only when nothing new is there does a
fetch go to the worker (and wait there, parked, as before); with ``poll_spin_us`` the poll first
busy-waits on the readable end, so a spinning consumer takes a record as soon as it is
appended.  A segment that rolled is read to its end (sealed: its size is final, and a readable
end in a later segment covers all of it), then the next one from its start.  What it cannot
read this way goes through the worker as before: a worker restarted, a position moved by seek,
log start past the position, damaged batches (the worker's answer reports them), files it may
not open.  Why: a fetch round trip costs the worker a wake-up and ~20 µs of
its time per answer, and the consumer a wake-up; the page cache is shared anyway.

Partitions come from :meth:`Consumer.assign` (explicit) or :meth:`Consumer.subscribe` (a consumer
group: the supervisor's coordinator assigns them, see ``membership.py``).  As a group member the
consumer reconciles inside ``poll``, on the application's thread: it commits (with auto-commit)
and drops the partitions it is losing, calls ``on_partitions_revoked``, has its heartbeat thread
acknowledge at once, then takes the partitions newly given to it (``on_partitions_assigned``)
starting at their committed offsets.  A partition is therefore never consumed by two members of
a group at once, and a clean rebalance consumes nothing twice.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import selectors
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol

from shmbroker import limits
from shmbroker.client.committer import AsyncCommitter, CommitCallback
from shmbroker.client.connection import Connection, read_frame, receive_buffer
from shmbroker.client.membership import Membership
from shmbroker.client.metadata import BROKER_SOCKET, Metadata, PartitionInfo
from shmbroker.client.types import (
    ColumnarRecords,
    OffsetAndTimestamp,
    Record,
    TopicPartition,
    resolve_data_dir,
)
from shmbroker.errors import (
    BrokerNotRunningError,
    ClosedError,
    CorruptLogError,
    CorruptRecordError,
    NoOffsetForPartitionError,
    OffsetOutOfRangeError,
    ProtocolError,
    RequestTimeoutError,
    ShmbrokerError,
    UnknownMemberIdError,
)
from shmbroker.format import record_batch
from shmbroker.protocol.frames import frame_head
from shmbroker.protocol.messages import EARLIEST_TIMESTAMP, LATEST_TIMESTAMP, ApiKey, check_response
from shmbroker.shm import control_block
from shmbroker.shm.control_block import ControlBlock
from shmbroker.transport.unix import connect

logger = logging.getLogger("shmbroker.consumer")

RECONNECT_PAUSE_S = 0.05
# Kafka's max.poll.records default: a poll returns at most this many records (the rest of
# what was fetched waits for the next polls), which bounds the work between polls (and so
# max_poll_interval_ms) and keeps each poll's list young for the garbage collector.
MAX_POLL_RECORDS_DEFAULT = 500
_WAKE = "wake"


class ConsumerRebalanceListener(Protocol):
    """Kafka's ConsumerRebalanceListener.  Called inside ``poll`` (the application's thread).
    ``on_partitions_lost`` (optional; default: ``on_partitions_revoked``) is called instead of
    revoked when the membership was lost (fenced, session expired, supervisor gone): the
    partitions may already belong to another member, so nothing is committed."""

    def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None: ...

    def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None: ...


class _Fetcher:
    """One assigned partition: its position, its worker connection and the fetch in flight."""

    def __init__(self, info: PartitionInfo, tp: TopicPartition) -> None:
        self.info = info
        self.tp = tp
        self.position: int | None = None
        self.paused = False
        self.sock: socket.socket | None = None
        self.in_flight_offset: int | None = None  # offset of the fetch in flight
        self.correlation_id = 0
        self.buffered: list[Any] = []  # decoded, not yet returned (max_records)
        self.retry_at = 0.0
        self.high_watermark = -1
        self.committed_checked = False  # its committed offset was looked up already
        self.error: CorruptLogError | None = None  # damage met at ``position``: next poll raises
        self.direct: _Direct | None = None  # where it reads the segment file itself
        self.direct_refused = False  # the segment files cannot be opened here (permissions)

    def close(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()
            self.sock = None
        self.in_flight_offset = None
        self.close_direct()

    def close_direct(self) -> None:
        if self.direct is not None:
            with contextlib.suppress(OSError):
                os.close(self.direct.fd)
            self.direct = None


class _Direct:
    """A segment file a fetcher reads itself: byte ``position`` of the segment of
    ``segment_base_offset`` holds ``offset`` (a batch boundary), as a fetch response said; the
    control block of worker ``generation`` says how far it may read."""

    __slots__ = ("fd", "block", "generation", "segment_base_offset", "position", "offset")

    def __init__(self, fd: int, block: ControlBlock, generation: int, segment_base_offset: int,
                 position: int, offset: int) -> None:
        self.fd = fd
        self.block = block
        self.generation = generation
        self.segment_base_offset = segment_base_offset
        self.position = position
        self.offset = offset


class Consumer:
    """Kafka-shaped consumer: explicit assignment or group subscription.  Not thread-safe (as
    Kafka's); its heartbeat thread is internal."""

    def __init__(self, data_dir: str | os.PathLike[str] | None = None, *,
                 auto_offset_reset: str = "latest", fetch_max_bytes: int = 4 * 1024 * 1024,
                 fetch_max_wait_ms: int = 500, fetch_min_bytes: int = 1,
                 max_poll_records: int | None = MAX_POLL_RECORDS_DEFAULT, check_crcs: bool = True,
                 request_timeout_ms: int = 30_000, group_id: str | None = None,
                 enable_auto_commit: bool = True, auto_commit_interval_ms: int = 5000,
                 session_timeout_ms: int = 10_000, max_poll_interval_ms: int = 300_000,
                 group_instance_id: str | None = None, assignor: str = "range",
                 poll_spin_us: int = 0, direct_reads: bool = True,
                 client_id: str = "shmbroker-consumer") -> None:
        if auto_offset_reset not in ("earliest", "latest", "none"):
            raise ValueError(f"auto_offset_reset must be 'earliest', 'latest' or 'none', not "
                             f"{auto_offset_reset!r}")
        for name, value in (("session_timeout_ms", session_timeout_ms),
                            ("max_poll_interval_ms", max_poll_interval_ms),
                            ("auto_commit_interval_ms", auto_commit_interval_ms)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be an int > 0, not {value!r}")
        if group_instance_id is not None and group_id is None:
            raise ValueError("group_instance_id needs a group_id")
        _check_max_records("max_poll_records", max_poll_records)
        if not isinstance(poll_spin_us, int) or isinstance(poll_spin_us, bool) \
                or not 0 <= poll_spin_us <= limits.poll_spin_us_max:
            raise ValueError(f"poll_spin_us must be an int from 0 to "
                             f"{limits.poll_spin_us_max}, not {poll_spin_us!r}")
        self.data_dir = resolve_data_dir(data_dir)
        self.auto_offset_reset = auto_offset_reset
        self.fetch_max_bytes = fetch_max_bytes
        self.fetch_max_wait_ms = fetch_max_wait_ms
        self.fetch_min_bytes = fetch_min_bytes
        self.max_poll_records = max_poll_records
        self.check_crcs = check_crcs
        # Busy-poll the fetch sockets this long before sleeping in select: on a host with a
        # core to spare for the consumer, the record that arrives meanwhile skips a wake-up
        # (tens of µs on a virtual machine: README, "Latency").  0 = never spin (Kafka's way).
        self.poll_spin_s = poll_spin_us / 1e6
        # Read the active segment file ourselves while the worker's control block says how far
        # (module docstring, "Direct reads"); with fetch_min_bytes above 1 every fetch goes to
        # the worker, which waits for the bytes.
        self.direct_reads = direct_reads and fetch_min_bytes <= 1
        self.request_timeout_s = request_timeout_ms / 1000
        self._metadata = Metadata(self.data_dir, self.request_timeout_s)
        self._metadata.refresh()
        # group_id: committed offsets (for assign() too: Kafka's generation -1 commits) and,
        # after subscribe(), membership
        self.group_id = group_id
        self.group_instance_id = group_instance_id
        self.session_timeout_ms = session_timeout_ms
        self.max_poll_interval_ms = max_poll_interval_ms
        self.assignor = assignor
        self.client_id = client_id
        self._membership: Membership | None = None
        self._listener: Any = None
        self._seen_version = -1
        self._committer: AsyncCommitter | None = None
        self.auto_commit_s = (auto_commit_interval_ms / 1000
                              if group_id is not None and enable_auto_commit else None)
        self._next_auto_commit = time.monotonic() + (self.auto_commit_s or 0)
        self._fetchers: dict[TopicPartition, _Fetcher] = {}
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, _WAKE)
        self._control_blocks: dict[TopicPartition, ControlBlock] = {}
        self._closed = False
        self._correlation = 0

    # -- assignment and positions ----------------------------------------------------------------
    def subscribe(self, topics: Iterable[str] = (), pattern: str | re.Pattern[str] | None = None,
                  listener: ConsumerRebalanceListener | None = None) -> None:
        """Join ``group_id`` subscribed to ``topics`` or (exclusive) to the topics whose whole
        name matches ``pattern`` (also topics created later); the coordinator assigns the
        partitions.  Calling it again changes the subscription."""
        self._check_open()
        if self.group_id is None:
            raise ValueError("subscribe() needs a group_id (Consumer(group_id=...))")
        if isinstance(topics, str):
            topics = [topics]
        names = list(topics)
        if isinstance(pattern, re.Pattern):
            pattern = pattern.pattern
        if (pattern is None) == (not names):
            raise ValueError("subscribe to a list of topics or to a pattern, exactly one")
        if self._membership is None and self._fetchers:
            raise ValueError("this consumer has partitions from assign(); a consumer either "
                             "assigns or subscribes (unsubscribe() first)")
        self._listener = listener
        if self._membership is None:
            self._seen_version = -1  # a new membership counts its versions from 0 again
            self._membership = Membership(
                self.data_dir / BROKER_SOCKET, self.group_id,
                group_instance_id=self.group_instance_id, client_id=self.client_id,
                assignor=self.assignor, session_timeout_ms=self.session_timeout_ms,
                max_poll_interval_ms=self.max_poll_interval_ms,
                request_timeout_s=self.request_timeout_s, wake_consumer=self._wake)
        self._membership.subscribe(names or None, pattern)

    def subscription(self) -> set[str] | str | None:
        """The subscribed topics (or pattern), None when not subscribed."""
        if self._membership is None:
            return None
        return set(self._membership.topics or ()) or self._membership.pattern

    def unsubscribe(self) -> None:
        """Leave the group (committing first with auto-commit) and drop every partition."""
        self._check_open()
        self._leave_group()
        for tp in list(self._fetchers):
            self._drop(tp)

    def assign(self, partitions: Iterable[TopicPartition | tuple[str, int]]) -> None:
        """Consume exactly these partitions (replacing any previous assignment)."""
        self._check_open()
        if self._membership is not None:
            raise ValueError("this consumer is subscribed to a group; unsubscribe() before "
                             "assign()")
        wanted = [TopicPartition(*tp) for tp in partitions]
        infos = {tp: self._metadata.partition(tp.topic, tp.partition) for tp in wanted}
        for tp in list(self._fetchers):
            if tp not in infos:
                self._drop(tp)
        for tp, info in infos.items():
            if tp not in self._fetchers:
                self._fetchers[tp] = _Fetcher(info, tp)

    def partitions_for(self, topic: str) -> list[int]:
        """The partitions of ``topic`` (Kafka's partitionsFor)."""
        return [info.partition for info in self._metadata.partitions(topic)]

    def assignment(self) -> set[TopicPartition]:
        return set(self._fetchers)

    def seek(self, partition: TopicPartition, offset: int) -> None:
        """Consume ``partition`` from ``offset`` on the next poll."""
        if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
            raise ValueError(f"offset must be an int >= 0, not {offset!r}")
        fetcher = self._fetcher(partition)
        self._reset_fetch(fetcher)
        fetcher.position = offset

    def seek_to_beginning(self, *partitions: TopicPartition) -> None:
        for tp in partitions or tuple(self._fetchers):
            self.seek(tp, self._list_offset(self._fetcher(tp), EARLIEST_TIMESTAMP).offset)

    def seek_to_end(self, *partitions: TopicPartition) -> None:
        for tp in partitions or tuple(self._fetchers):
            self.seek(tp, self._list_offset(self._fetcher(tp), LATEST_TIMESTAMP).offset)

    def position(self, partition: TopicPartition) -> int:
        """The offset of the next record poll will return for ``partition``."""
        fetcher = self._fetcher(partition)
        if fetcher.position is None:
            self._reset_position(fetcher)
        assert fetcher.position is not None
        if fetcher.buffered:
            first, min_offset = fetcher.buffered[0]
            return max(int(_first_offset(first)), min_offset)
        return fetcher.position

    def pause(self, *partitions: TopicPartition) -> None:
        for tp in partitions:
            self._fetcher(tp).paused = True

    def resume(self, *partitions: TopicPartition) -> None:
        for tp in partitions:
            self._fetcher(tp).paused = False

    def paused(self) -> set[TopicPartition]:
        return {tp for tp, fetcher in self._fetchers.items() if fetcher.paused}

    def beginning_offsets(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: self._list_offset(self._info_fetcher(tp), EARLIEST_TIMESTAMP).offset
                for tp in partitions}

    def end_offsets(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: self._list_offset(self._info_fetcher(tp), LATEST_TIMESTAMP).offset
                for tp in partitions}

    def offsets_for_times(self, timestamps: Mapping[TopicPartition, int]
                          ) -> dict[TopicPartition, OffsetAndTimestamp | None]:
        """The earliest offset whose timestamp is >= the given one (None if there is none)."""
        found: dict[TopicPartition, OffsetAndTimestamp | None] = {}
        for tp, timestamp_ms in timestamps.items():
            if not isinstance(timestamp_ms, int) or timestamp_ms < 0:
                raise ValueError(f"timestamp for {tp} must be an int >= 0, not {timestamp_ms!r}")
            answer = self._list_offset(self._info_fetcher(tp), timestamp_ms)
            found[tp] = answer if answer.offset >= 0 else None
        return found

    # -- polling -----------------------------------------------------------------------------------
    def poll(self, timeout_ms: int = 0, max_records: int | None = None) -> list[Record]:
        """Records fetched since the last poll, waiting up to ``timeout_ms`` for the first: at
        most ``max_records`` (default: the consumer's ``max_poll_records``; None = all there
        are).  Those fetched and not returned are returned by the next polls, in order."""
        if max_records is not None:
            _check_max_records("max_records", max_records)
        self._maybe_auto_commit()
        limit = max_records or self.max_poll_records
        out: list[Record] = []
        decode_rows = record_batch.decode_rows

        def decode(fetcher: _Fetcher, fetched: _Fetched, min_offset: int) -> Sequence[Record]:
            tp = fetcher.tp
            return decode_rows(fetched.raw, fetched.position, fetched.header, Record,
                               (tp.topic, tp.partition), min_offset)

        for _, item in self._decoded_batches(timeout_ms, decode, limit):
            out += item
        return out

    def poll_columnar(self, timeout_ms: int = 0) -> list[ColumnarRecords]:
        """As :meth:`poll`, one :class:`ColumnarRecords` per partition that had records: numpy
        offsets and timestamps, values as positions into the fetched bytes (zero copy).  Whole
        batches: a first batch may start before the position (use ``offsets`` to filter)."""
        self._maybe_auto_commit()
        grouped: dict[TopicPartition, list[Any]] = {}
        leftovers: dict[TopicPartition, list[Record]] = {}

        def decode(fetcher: _Fetcher, fetched: _Fetched, min_offset: int) -> Any:
            return record_batch.decode_columnar(fetched.raw, fetched.position, verify_crc=False)

        for fetcher, item in self._decoded_batches(timeout_ms, decode):
            if not isinstance(item, record_batch.ColumnarBatch):  # held back by an earlier poll
                leftovers.setdefault(fetcher.tp, []).extend(item)
            else:
                grouped.setdefault(fetcher.tp, []).append(item)
        for tp, records in leftovers.items():
            # they come first (lower offsets); as columns, via batches rebuilt from the rows,
            # one per run of consecutive offsets
            rebuilt = []
            start = 0
            for index in range(1, len(records) + 1):
                if index < len(records) and records[index].offset == records[index - 1].offset + 1:
                    continue
                run = records[start:index]
                rebuilt.append(record_batch.decode_columnar(record_batch.encode_batch(
                    [r.value for r in run], keys=[r.key for r in run],
                    timestamps=[r.timestamp_ms for r in run],
                    headers=[list(r.headers) for r in run], base_offset=run[0].offset)))
                start = index
            grouped[tp] = [*rebuilt, *grouped.get(tp, [])]
        return [ColumnarRecords(tp.topic, tp.partition, batches)
                for tp, batches in grouped.items()]

    def _decoded_batches(self, timeout_ms: int, decode: Callable[[_Fetcher, _Fetched, int], Any],
                         records_max: int | None = None) -> Iterator[tuple[_Fetcher, Any]]:
        """The batches of :meth:`_poll_batches`, each through ``decode(fetcher, batch,
        min_offset)`` (records held back by an earlier poll come as a sequence of them).  A batch
        whose records do not parse ends its partition's share of this poll: see
        :meth:`_records_damaged`.

        With ``records_max`` (``decode`` then gives sequences of records), what would go past
        it is held back for the next poll as it is: the rest of a sequence as one slice, the
        batches after it undecoded.  So each record is decoded and moved once, however many polls
        it takes to return them all."""
        damaged: set[_Fetcher] = set()
        ready = self._poll_batches(timeout_ms)
        returned = 0
        for index, (fetcher, fetched, min_offset) in enumerate(ready):
            if fetcher in damaged:
                continue
            if records_max is not None and returned >= records_max:
                self._hold_back(ready[index:], damaged)
                return
            if isinstance(fetched, _Leftover):
                pending = fetched
            else:
                try:
                    decoded = decode(fetcher, fetched, min_offset)
                except CorruptRecordError as error:
                    self._records_damaged(fetcher, fetched, min_offset, error)
                    damaged.add(fetcher)
                    continue
                if records_max is None:
                    yield fetcher, decoded
                    continue
                pending = _Leftover(decoded)
            decoded = pending.take(None if records_max is None else records_max - returned)
            if pending.records:  # some are left: they go first next time
                self._hold_back([(fetcher, pending, pending.first_offset()),
                                 *ready[index + 1:]], damaged)
                yield fetcher, decoded
                return
            returned += len(decoded)
            yield fetcher, decoded

    def _hold_back(self, entries: list[tuple[_Fetcher, Any, int]],
                   damaged: set[_Fetcher]) -> None:
        """Put what a poll does not return back in front of its partitions' buffers, in order
        (records a paused partition received since come after them)."""
        held: dict[_Fetcher, list[tuple[Any, int]]] = {}
        for fetcher, batch, min_offset in entries:
            if fetcher not in damaged:
                held.setdefault(fetcher, []).append((batch, min_offset))
        for fetcher, batches in held.items():
            fetcher.buffered[:0] = batches

    def _poll_batches(self, timeout_ms: int) -> list[tuple[_Fetcher, Any, int]]:
        self._check_open()
        if not self._fetchers and self._membership is None:
            raise ClosedError("the consumer has no partitions: call assign() or subscribe() "
                              "first")
        deadline = time.monotonic() + max(0, timeout_ms) / 1000
        ready: list[tuple[_Fetcher, Any, int]] = []
        spin_until: float | None = None
        while True:
            self._reconcile()  # nothing polled but not returned yet: positions are exact
            for fetcher in self._fetchers.values():
                if fetcher.buffered and not fetcher.paused:
                    ready += [(fetcher, batch, min_offset)
                              for batch, min_offset in fetcher.buffered]
                    fetcher.buffered = []
            if ready:
                break
            for fetcher in self._fetchers.values():
                if fetcher.error is not None and not fetcher.paused:
                    # Kafka's way: the records before the damage were returned; now the error,
                    # raised again by each poll (a fetch at the same position meets it again)
                    # until the application seeks past it (``error.next_offset``).
                    error, fetcher.error = fetcher.error, None
                    raise error
            idle: list[_Fetcher] = []  # read directly, nothing new: fetch (or spin first)
            for fetcher in self._fetchers.values():
                if fetcher.paused or fetcher.in_flight_offset is not None:
                    continue
                if fetcher.direct is not None:
                    found = self._read_direct(fetcher)
                    if found:
                        ready += found
                        continue
                    if found is not None:
                        idle.append(fetcher)
                        continue
                idle.append(fetcher)
            if ready:
                break
            if spin_until is None:  # (once a poll: the spin budget is the poll's)
                spin_until = min(deadline, time.monotonic() + self.poll_spin_s)
            if self.poll_spin_s and any(fetcher.direct is not None for fetcher in idle):
                if self._spin_direct(idle, spin_until):
                    continue  # records came (a readable end moved): read them
            now = time.monotonic()
            wait_ms = int(max(0.0, deadline - now) * 1000)
            for fetcher in idle:
                self._send_fetch(fetcher, min(wait_ms, self.fetch_max_wait_ms), now)
            timeout = max(0.0, deadline - time.monotonic())
            retry = [f.retry_at for f in self._fetchers.values() if f.sock is None]
            if retry:
                timeout = min(timeout, max(0.0, min(retry) - time.monotonic()))
            if self._membership is not None:
                # Time inside poll is polling (max_poll_interval_ms bounds the time between
                # polls, as Kafka's): come round to _reconcile, which says so, before the
                # heartbeat thread gives up on us.  Fetch answers would wake us anyway, but a
                # member with no partition (or all paused) has none: it would leave and join
                # again every interval, rebalancing the group each time.
                timeout = min(timeout, self._membership.max_poll_interval_s / 2)
            events = self._select(timeout, spin_until) if self._selector.get_map() else (
                time.sleep(timeout) or [])
            for key, _ in events:
                if key.data is _WAKE:
                    with contextlib.suppress(BlockingIOError):
                        self._wake_r.recv(4096)
                    continue
                ready += self._receive(key.data)
            if ready or time.monotonic() >= deadline:
                break
        return ready

    def _select(self, timeout: float,
                spin_until: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        """The selector's events within ``timeout`` s: spinning (``poll_spin_us``, until
        ``spin_until`` when the poll spun already) first."""
        if self.poll_spin_s and timeout > 0:
            began = time.monotonic()
            spin_until = min(began + timeout, began + self.poll_spin_s if spin_until is None
                             else spin_until)
            select = self._selector.select
            while True:
                events = select(0)
                if events:
                    return events
                now = time.monotonic()
                if now >= spin_until:
                    break
            timeout = max(0.0, timeout - (now - began))
        return self._selector.select(timeout)

    def _send_fetch(self, fetcher: _Fetcher, wait_ms: int, now: float) -> None:
        if fetcher.position is None:
            try:
                self._reset_position(fetcher)
            except (BrokerNotRunningError, RequestTimeoutError):
                fetcher.retry_at = now + RECONNECT_PAUSE_S
                return
        if fetcher.sock is None:
            if now < fetcher.retry_at:
                return
            try:
                fetcher.sock = connect(fetcher.info.socket, self.request_timeout_s)
            except OSError:
                fetcher.retry_at = now + RECONNECT_PAUSE_S
                return
            self._selector.register(fetcher.sock, selectors.EVENT_READ, fetcher)
        self._correlation = (self._correlation + 1) & 0xFFFFFFFF
        fetcher.correlation_id = self._correlation
        body = {"offset": fetcher.position, "max_bytes": self.fetch_max_bytes,
                "max_wait_ms": wait_ms, "min_bytes": self.fetch_min_bytes}
        try:
            fetcher.sock.sendall(frame_head(ApiKey.FETCH, fetcher.correlation_id, body))
        except OSError:
            self._disconnect(fetcher)
            return
        fetcher.in_flight_offset = fetcher.position

    def _receive(self, fetcher: _Fetcher) -> list[tuple[_Fetcher, Any, int]]:
        """Read the response of ``fetcher``'s fetch; send the next one; decode this one."""
        assert fetcher.sock is not None
        try:
            body, raw, correlation_id = read_frame(fetcher.sock)
        except (OSError, ProtocolError):
            self._disconnect(fetcher)
            return []
        fetcher.in_flight_offset = None
        if correlation_id != fetcher.correlation_id:
            self._disconnect(fetcher)
            return []
        try:
            check_response(body)
        except OffsetOutOfRangeError as error:
            self._out_of_range(fetcher, error)
            return []
        fetcher.high_watermark = body.get("high_watermark", -1)
        min_offset = fetcher.position or 0
        damaged = body.get("damaged")
        if damaged is not None:  # the worker found the stored batches damaged: nothing sent
            offset = max(min_offset, int(damaged["offset"]))
            fetcher.error = CorruptLogError(
                str(damaged["reason"]), offset=offset,
                next_offset=max(int(damaged["next_offset"]), offset + 1),
                position=damaged["position"], segment_base_offset=damaged["segment_base_offset"],
                topic=fetcher.tp.topic, partition=fetcher.tp.partition)
            return []
        batches, fetcher.error, _ = self._decode(fetcher, raw, min_offset, body)
        if batches:
            fetcher.position = max(min_offset, batches[-1].header.next_offset)
        if self.direct_reads and fetcher.error is None:
            self._follow_directly(fetcher, body, len(raw))
        if batches:
            if fetcher.paused:  # paused while this fetch was in flight: keep it for resume
                fetcher.buffered += [(batch, min_offset) for batch in batches]
                return []
            if fetcher.error is None and fetcher.direct is None:
                self._send_fetch(fetcher, self.fetch_max_wait_ms, time.monotonic())  # prefetch
        return [(fetcher, batch, min_offset) for batch in batches]

    # -- direct reads --------------------------------------------------------------------------
    def _follow_directly(self, fetcher: _Fetcher, body: dict[str, Any], size: int) -> None:
        """After a fetch response: read on from where it ended in the segment file ourselves
        (the response says which segment and where; a response at the log end, with no
        batches, says where the log ends), unless the file cannot be opened here."""
        segment, position, offset = (body.get("segment_base_offset"), body.get("position"),
                                     body.get("next_offset"))
        if not (type(segment) is int and type(position) is int and type(offset) is int) or (
                offset != fetcher.position or not size and offset != body.get("log_end_offset")):
            fetcher.close_direct()  # (an empty answer inside the log says no position)
            return
        direct = fetcher.direct
        if direct is not None and direct.segment_base_offset == segment:
            direct.position, direct.offset = position + size, offset
            return
        block = self._control_block(fetcher)
        if block is None:
            fetcher.close_direct()
        else:  # (closes what it read before)
            self._open_segment(fetcher, block, block.generation, segment, position + size,
                               offset)

    @staticmethod
    def _open_segment(fetcher: _Fetcher, block: ControlBlock, generation: int, segment: int,
                      position: int, offset: int) -> bool:
        """Read on directly in the segment file of base offset ``segment`` from byte
        ``position`` (which holds ``offset``); False when it cannot be opened."""
        fetcher.close_direct()
        if fetcher.info.log_dir is None or fetcher.direct_refused:
            return False
        path = fetcher.info.log_dir / f"{segment:020d}.log"
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except PermissionError as error:
            fetcher.direct_refused = True
            logger.info("%s/%d: reading through the worker only: %s", fetcher.tp.topic,
                        fetcher.tp.partition, error)
            return False
        except OSError:  # deleted since (retention): a fetch answer names another
            return False
        fetcher.direct = _Direct(fd, block, generation, segment, position, offset)
        return True

    def _read_direct(self, fetcher: _Fetcher) -> list[tuple[_Fetcher, Any, int]] | None:
        """The batches from ``fetcher``'s position to the readable end its worker published
        (at most fetch_max_bytes, at least one batch), read from the segment file (a sealed
        one to its end, then the next); [] when there are none yet; None when this read must
        go through the worker instead (the worker restarted, the position moved, damage: it
        then reports)."""
        direct = fetcher.direct
        assert direct is not None
        block = direct.block
        if (fetcher.position != direct.offset or block is not self._control_blocks.get(fetcher.tp)
                or block.state != control_block.RUNNING or block.generation != direct.generation):
            fetcher.close_direct()
            return None
        readable = block.readable()
        if readable is None:
            return None
        segment, end, _ = readable
        if segment != direct.segment_base_offset:
            if segment < direct.segment_base_offset:  # (not while one worker runs)
                fetcher.close_direct()
                return None
            # The readable end is in a later segment: ours is sealed, all of it below the end
            # (its offsets end where the later ones begin) and its size final.
            try:
                end = os.fstat(direct.fd).st_size
            except OSError:
                fetcher.close_direct()
                return None
            if end <= direct.position:  # read to its end: on to the next one, which starts
                if direct.offset == direct.segment_base_offset or not self._open_segment(
                        fetcher, block, direct.generation, direct.offset, 0, direct.offset):
                    fetcher.close_direct()  # (an empty one: not a segment a roll seals)
                    return None
                return self._read_direct(fetcher)
        position = direct.position
        if end <= position:
            return []
        if block.log_start_offset > direct.offset:  # deleted meanwhile: the worker says so
            fetcher.close_direct()
            return None
        size = min(end - position, self.fetch_max_bytes)
        try:
            raw = receive_buffer(size)  # (as a fetch response's: never zero-filled first)
            short = os.preadv(direct.fd, [raw], position) < size
            if not short and size < end - position:  # whole batches, at least one (as a fetch)
                whole = _whole_batches_bytes(raw)
                if whole:
                    raw = raw[:whole]
                else:  # one batch larger than fetch_max_bytes
                    size = record_batch.batch_size_at(raw)
                    if not record_batch.HEADER_SIZE <= size <= end - position:
                        raise CorruptRecordError(f"a batch of {size} bytes", position)
                    raw = receive_buffer(size)
                    short = os.preadv(direct.fd, [raw], position) < size
        except (OSError, CorruptRecordError):
            fetcher.close_direct()  # damage (the worker reports it), or the file is gone
            return None
        if short:
            fetcher.close_direct()  # shorter than the worker said: let it tell
            return None
        min_offset = direct.offset
        batches, error, next_offset = self._decode(fetcher, raw, min_offset, {})
        if error is not None:  # damage: fetched through the worker, which reports it
            fetcher.close_direct()
            return None
        direct.position += len(raw)
        direct.offset = fetcher.position = next_offset
        fetcher.high_watermark = block.high_watermark
        return [(fetcher, batch, min_offset) for batch in batches]

    def _spin_direct(self, idle: list[_Fetcher], until: float) -> bool:
        """Busy-wait (poll_spin_us) on the readable ends of the ``idle`` fetchers that read
        directly, and on the sockets: True as soon as an end moves past a position (or to
        another segment); False when a socket has an event (the caller's select takes it; a
        readable end being written counts as unmoved) or at ``until``."""
        watched = [(fetcher.direct.block, fetcher.direct.segment_base_offset,
                    fetcher.direct.position) for fetcher in idle if fetcher.direct is not None]
        select = self._selector.select
        while True:
            for block, segment, position in watched:
                readable = block.readable()
                if readable is not None and (readable[0] != segment or readable[1] > position):
                    return True
            if select(0) or time.monotonic() >= until:
                return False

    def _decode(self, fetcher: _Fetcher, raw: memoryview, min_offset: int,
                body: dict[str, Any]) -> tuple[list[Any], CorruptLogError | None, int]:
        """The batches of a fetch response holding records at or after ``min_offset``, and the
        damage met, if any: a batch that is not whole, fails its CRC-32C (with check_crcs, as
        Kafka's consumer does) or does not continue the offsets (the worker sends whole,
        contiguous batches, the first holding ``min_offset``; base offsets are not covered by
        the CRC).  The batches before the damage are returned; poll raises the error next.
        One CRC call per batch and no per-record work: the hot path stays vectorised.  Third:
        the offset after the last batch taken (``min_offset`` when none)."""
        batches = []
        verify = self.check_crcs
        position = 0
        end = len(raw)
        expected: int | None = None  # the base offset the next batch must have
        while position < end:
            try:
                header = record_batch.read_header(raw, position)
                if position + header.size > end:
                    raise CorruptRecordError(f"truncated batch: {end - position} of "
                                             f"{header.size} bytes")
                if expected is None and not header.base_offset <= min_offset < header.next_offset:
                    raise CorruptRecordError(f"the first batch holds offsets [{header.base_offset}"
                                             f", {header.next_offset}), not {min_offset}")
                if expected is not None and header.base_offset != expected:
                    raise CorruptRecordError(f"base offset {header.base_offset} where {expected} "
                                             "was expected")
                if verify:
                    actual = record_batch.compute_crc(raw, position, header.size)
                    if actual != header.crc:
                        raise CorruptRecordError(f"CRC-32C mismatch: stored {header.crc:#010x}, "
                                                 f"computed {actual:#010x}")
            except CorruptRecordError as error:
                offset = min_offset if expected is None else expected
                return batches, self._damage(fetcher, raw, position, offset, body, error), offset
            if not header.is_control:
                batches.append(_Fetched(raw, position, header))
            expected = header.next_offset
            position += header.size
        return batches, None, min_offset if expected is None else expected

    def _damage(self, fetcher: _Fetcher, raw: memoryview, position: int, offset: int,
                body: dict[str, Any], error: CorruptRecordError) -> CorruptLogError:
        """The error for the damaged batch at ``position`` of a response, its first offset
        not returned being ``offset``.  Where reading can resume is judged from evidence (this
        is the error path): the first whole, CRC-valid batch after it in the response (its
        length may be the damaged field), at an offset the bytes in between can hold; else,
        when nothing valid follows it, the offset the worker says its slice ends at (checked
        there against the next header or the segment's end)."""
        next_offset = offset + 1
        found = record_batch.find_next_valid_batch(raw, position)
        if found is not None:
            after_position, after = found
            records_max = (after_position - position) // record_batch.RECORD_SIZE_MIN
            if offset < after.base_offset <= offset + max(1, records_max):
                next_offset = after.base_offset
        else:
            vouched = body.get("next_offset")
            if isinstance(vouched, int) and vouched > offset:
                next_offset = vouched
        start = body.get("position")
        return CorruptLogError(
            error.reason, offset=offset, next_offset=next_offset,
            position=start + position if isinstance(start, int) else None,
            segment_base_offset=body.get("segment_base_offset"),
            topic=fetcher.tp.topic, partition=fetcher.tp.partition)

    def _records_damaged(self, fetcher: _Fetcher, fetched: _Fetched, min_offset: int,
                         error: CorruptRecordError) -> None:
        """A batch whose CRC-32C holds but whose records do not parse (stored under
        record_validation = "crc"), met while decoding: as for any damaged batch, what came
        before it is returned and the next poll raises CorruptLogError, each poll again until
        the application seeks past it.  The position goes back to its first record not
        returned; the fetch sent ahead, for records past it, is dropped with the connection."""
        header = fetched.header
        offset = max(min_offset, header.base_offset)
        fetcher.error = CorruptLogError(
            error.reason, offset=offset, next_offset=max(header.next_offset, offset + 1),
            topic=fetcher.tp.topic, partition=fetcher.tp.partition)
        fetcher.position = offset
        fetcher.buffered = []
        self._disconnect(fetcher)

    def _out_of_range(self, fetcher: _Fetcher, error: OffsetOutOfRangeError) -> None:
        if self.auto_offset_reset == "none":
            raise error
        fetcher.position = (error.log_start_offset if self.auto_offset_reset == "earliest"
                            or (fetcher.position or 0) < error.log_start_offset
                            else error.log_end_offset)

    # -- group membership --------------------------------------------------------------------------
    def _wake(self) -> None:
        """Called by the heartbeat thread: a response or a loss is waiting to be reconciled."""
        with contextlib.suppress(OSError):
            self._wake_w.send(b"w")

    def _reconcile(self) -> None:
        """Bring the partitions consumed in line with the membership's latest response (on the
        application's thread, between polls' records: positions are exactly what was returned)."""
        membership = self._membership
        if membership is None:
            return
        membership.polled()
        with membership.lock:
            error = membership.error
            if error is None and membership.version == self._seen_version:
                return
            self._seen_version = membership.version
            lost, reason, assigned = membership.lost, membership.lost_reason, membership.assigned
        if error is not None:
            raise error
        if lost:
            dropped = set(self._fetchers)
            for tp in dropped:
                self._drop(tp)
            if dropped:
                logger.warning("group %r: %d partition(s) lost: %s", self.group_id,
                               len(dropped), reason)
                self._call_listener("on_partitions_lost", dropped)
            membership.acknowledge_lost()
            return
        revoked = set(self._fetchers) - assigned
        if revoked:
            self._revoke(revoked)
            with membership.lock:
                membership.owned -= revoked
            membership.heartbeat_now()  # acknowledges the revocation
        with membership.lock:
            # Taken only while no heartbeat is in flight: one sent before we took them reports
            # them not owned, and the coordinator may have released them on that word.  Its
            # answer brings them again (or not) and wakes us.
            new = set(membership.assigned) - membership.owned
            if membership.request_in_flight or membership.lost:
                new = set()
            membership.owned |= new  # claimed before the next heartbeat can report otherwise
        if new:
            try:
                self._take(new)
            except BaseException:
                with membership.lock:  # not consumed after all: not ours to report
                    membership.owned -= new - set(self._fetchers)
                raise
            self._call_listener("on_partitions_assigned", new)

    def _revoke(self, revoked: set[TopicPartition]) -> None:
        """Commit (auto-commit) the positions of ``revoked``, tell the listener, drop them."""
        if self.auto_commit_s is not None:
            offsets = {tp: self.position(tp) for tp in revoked
                       if self._fetchers[tp].position is not None}
            try:
                self.commit(offsets)
            except (ShmbrokerError, OSError) as error:
                logger.warning("group %r: commit before revoking %d partition(s) failed: %s",
                               self.group_id, len(revoked), error)
        self._call_listener("on_partitions_revoked", revoked)
        for tp in revoked:
            self._drop(tp)

    def _take(self, new: set[TopicPartition]) -> None:
        """Start consuming ``new`` partitions at their committed offsets (one request)."""
        for tp in sorted(new):
            try:
                info = self._metadata.partition(tp.topic, tp.partition)
            except ShmbrokerError:  # created a moment ago: our cache is older
                self._metadata.refresh([tp.topic])
                info = self._metadata.partition(tp.topic, tp.partition)
            self._fetchers[tp] = _Fetcher(info, tp)
        try:
            committed = self.committed(new)
        except (BrokerNotRunningError, RequestTimeoutError):
            return  # the supervisor restarts: each fetcher asks again before its first fetch
        for tp, offset in committed.items():
            fetcher = self._fetchers[tp]
            fetcher.committed_checked = True
            if offset is not None:
                fetcher.position = offset

    def _call_listener(self, name: str, partitions: set[TopicPartition]) -> None:
        listener = self._listener
        if listener is None:
            return
        method = getattr(listener, name, None)
        if method is None and name == "on_partitions_lost":
            method = getattr(listener, "on_partitions_revoked", None)
        if method is not None:
            method(set(partitions))

    def _leave_group(self) -> None:
        """Commit (auto-commit), revoke everything through the listener, leave the group."""
        membership = self._membership
        if membership is None:
            return
        try:
            with membership.lock:
                lost = membership.lost or membership.member_id is None
            if self._fetchers and not lost:
                self._revoke(set(self._fetchers))
        finally:
            self._membership = None
            membership.close()

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("the consumer is closed")

    def _fetcher(self, tp: TopicPartition | tuple[str, int]) -> _Fetcher:
        fetcher = self._fetchers.get(TopicPartition(*tp))
        if fetcher is None:
            raise ValueError(f"partition {tp[0]}/{tp[1]} is not assigned to this consumer")
        return fetcher

    def _info_fetcher(self, tp: TopicPartition) -> _Fetcher:
        fetcher = self._fetchers.get(TopicPartition(*tp))
        if fetcher is not None:
            return fetcher
        return _Fetcher(self._metadata.partition(tp[0], tp[1]), TopicPartition(*tp))

    def _reset_fetch(self, fetcher: _Fetcher) -> None:
        fetcher.buffered = []
        fetcher.error = None
        if fetcher.in_flight_offset is not None:
            self._disconnect(fetcher)  # drop the answer to a fetch from the old position
            fetcher.retry_at = 0.0

    # -- committed offsets ---------------------------------------------------------------------
    def commit(self, offsets: Mapping[TopicPartition, int] | None = None) -> None:
        """Durably commit ``offsets`` (default: the position of every assigned partition, the
        next record to consume) for this consumer's group_id; returns once stored.  A group
        member's commit is refused (UnknownMemberIdError, FencedMemberEpochError,
        StaleMemberEpochError, PartitionNotOwnedError) once the partitions are no longer its;
        a subscribed consumer that is not a member now (still joining, or its membership lost
        and not yet reconciled by ``poll``) raises UnknownMemberIdError without sending."""
        body = self._commit_body(offsets)
        if self._committer is not None:  # asynchronous commits sent before go first
            self._committer.flush()
            self._run_commit_callbacks()
        if body is not None:
            self._metadata.connection.request(ApiKey.OFFSET_COMMIT, body)

    def commit_async(self, offsets: Mapping[TopicPartition, int] | None = None,
                     callback: CommitCallback | None = None) -> None:
        """Commit without waiting: ``callback(offsets, error_or_None)`` is called from a later
        ``poll``, ``commit`` or ``close``.  Commits land in the order they were made.  A
        subscribed consumer that is not a member now gets UnknownMemberIdError in the callback
        (as Kafka's commitAsync reports a commit that could not be sent); a consumer without a
        group_id raises ValueError at once."""
        if self._committer is None:
            self._committer = AsyncCommitter(self.data_dir / BROKER_SOCKET,
                                             self.request_timeout_s)
        try:
            body = self._commit_body(offsets)
        except UnknownMemberIdError as error:
            wanted = dict(offsets) if offsets is not None else {
                tp: fetcher.position for tp, fetcher in self._fetchers.items()
                if fetcher.position is not None}
            self._committer.refused(wanted, callback, error)
            return
        if body is None:
            return
        sent = {TopicPartition(t, p): offset for t, p, offset, _ in body["offsets"]}
        self._committer.send(body, sent, callback)

    def _commit_body(self, offsets: Mapping[TopicPartition, int] | None) -> dict[str, Any] | None:
        self._check_open()
        if self.group_id is None:
            raise ValueError("commit() needs a group_id (Consumer(group_id=...))")
        if offsets is None:  # what poll returned so far (held-back records not included)
            offsets = {tp: self.position(tp) for tp, fetcher in self._fetchers.items()
                       if fetcher.position is not None}
        if not offsets:
            return None
        body: dict[str, Any] = {"group_id": self.group_id, "offsets": [
            [tp[0], tp[1], offset, None] for tp, offset in offsets.items()]}
        membership = self._membership
        if membership is not None:
            with membership.lock:
                if membership.lost or membership.member_id is None:
                    # Not a member now (joining, or the membership was lost and not yet
                    # reconciled): without a member id the commit would go as a member-less
                    # one, refused as NonEmptyGroupError, or accepted unfenced when the group
                    # is empty (after a supervisor restart), rewinding what a later owner
                    # committed.  Refused here, as Kafka's consumer does (CommitFailed).
                    raise UnknownMemberIdError(
                        f"this consumer is not a member of group {self.group_id!r} now ("
                        f"{membership.lost_reason if membership.lost else 'joining'}); its "
                        f"partitions may belong to another member: nothing committed")
                body["member_id"] = membership.member_id
                body["member_epoch"] = membership.member_epoch
        return body

    def _run_commit_callbacks(self) -> None:
        if self._committer is not None:
            for error in self._committer.run_callbacks():
                logger.warning("an asynchronous commit failed: %s", error)

    def committed(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int | None]:
        """The group's committed offset of each partition (None where nothing is committed)."""
        if self.group_id is None:
            raise ValueError("committed() needs a group_id (Consumer(group_id=...))")
        wanted = [TopicPartition(*tp) for tp in partitions]
        body, _ = self._metadata.connection.request(
            ApiKey.OFFSET_FETCH, {"group_id": self.group_id,
                                  "partitions": [[tp.topic, tp.partition] for tp in wanted]})
        found = {TopicPartition(topic, partition): offset
                 for topic, partition, offset, _ in body["offsets"]}
        return {tp: (found.get(tp, -1) if found.get(tp, -1) >= 0 else None) for tp in wanted}

    def _maybe_auto_commit(self) -> None:
        self._run_commit_callbacks()
        if self.auto_commit_s is None or time.monotonic() < self._next_auto_commit:
            return
        self._next_auto_commit = time.monotonic() + self.auto_commit_s
        if self._membership is None:
            self.commit()
            return
        try:  # a member's commit can be refused (fenced): the next reconcile sorts it out
            self.commit()
        except (ShmbrokerError, OSError) as error:
            logger.warning("group %r: auto-commit failed: %s", self.group_id, error)

    def _reset_position(self, fetcher: _Fetcher) -> None:
        if self.group_id is not None and not fetcher.committed_checked:
            committed = self.committed([fetcher.tp])[fetcher.tp]
            if committed is not None:
                fetcher.position = committed
                return
        if self.auto_offset_reset == "none":
            raise NoOffsetForPartitionError(
                f"no position for {fetcher.tp.topic}/{fetcher.tp.partition} and "
                "auto_offset_reset is 'none': seek() first")
        timestamp = EARLIEST_TIMESTAMP if self.auto_offset_reset == "earliest" else (
            LATEST_TIMESTAMP)
        fetcher.position = self._list_offset(fetcher, timestamp).offset

    def highwater(self, partition: TopicPartition) -> int:
        """The partition's high watermark, read from its shared control block (no round trip;
        -1 when the worker is not running)."""
        positions = self._shared_positions(self._info_fetcher(partition))
        return positions[2] if positions is not None else -1

    def _shared_positions(self, fetcher: _Fetcher) -> tuple[int, int, int] | None:
        """(log_start, log_end, high_watermark) from the worker's control block, or None when
        it is unavailable or its worker is not running (then ask the worker)."""
        block = self._control_block(fetcher)
        return block.positions() if block is not None else None

    def _control_block(self, fetcher: _Fetcher) -> ControlBlock | None:
        """The partition's control block, mapped once, or None when it is unavailable or its
        worker is not running."""
        block = self._control_blocks.get(fetcher.tp)
        if block is None:
            try:
                block = ControlBlock.open(fetcher.info.control_block, readonly=True)
            except (ShmbrokerError, OSError):
                return None
            self._control_blocks[fetcher.tp] = block
        if block.state != control_block.RUNNING:
            # a restarted broker makes a new block: map it again next time (direct reads
            # through this one stop: _read_direct compares blocks)
            block.close()
            del self._control_blocks[fetcher.tp]
            return None
        return block

    def _list_offset(self, fetcher: _Fetcher, timestamp_ms: int) -> OffsetAndTimestamp:
        """The offset for ``timestamp_ms`` (-2 earliest, -1 latest): earliest and latest come from
        the shared control block when the worker runs; otherwise one LIST_OFFSETS, retried while
        the partition's worker restarts (up to request_timeout_ms, as Kafka's
        default.api.timeout.ms)."""
        if timestamp_ms in (EARLIEST_TIMESTAMP, LATEST_TIMESTAMP):
            positions = self._shared_positions(fetcher)
            if positions is not None:
                offset = positions[0] if timestamp_ms == EARLIEST_TIMESTAMP else positions[2]
                return OffsetAndTimestamp(offset, -1)
        deadline = time.monotonic() + self.request_timeout_s
        connection = Connection(fetcher.info.socket, self.request_timeout_s)
        try:
            while True:
                try:
                    body, _ = connection.request(ApiKey.LIST_OFFSETS,
                                                 {"timestamp_ms": timestamp_ms})
                    break
                except BrokerNotRunningError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(RECONNECT_PAUSE_S)
        finally:
            connection.close()
        return OffsetAndTimestamp(body["offset"], body["timestamp_ms"])

    def _disconnect(self, fetcher: _Fetcher) -> None:
        if fetcher.sock is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(fetcher.sock)
        fetcher.close()
        fetcher.retry_at = time.monotonic() + RECONNECT_PAUSE_S

    def _drop(self, tp: TopicPartition) -> None:
        fetcher = self._fetchers.pop(tp)
        self._disconnect(fetcher)

    def close(self) -> None:
        """Close; with auto-commit on, commit the positions first (as Kafka's consumer)."""
        if self._closed:
            return
        try:
            if self._membership is not None:
                self._leave_group()
            elif self.auto_commit_s is not None:
                with contextlib.suppress(ShmbrokerError, OSError):
                    self.commit()
        finally:
            if self._committer is not None:
                with contextlib.suppress(ShmbrokerError, OSError):
                    self._committer.flush()
                self._run_commit_callbacks()
                self._committer.close()
            for tp in list(self._fetchers):
                self._drop(tp)
            for block in self._control_blocks.values():
                block.close()
            self._control_blocks.clear()
            self._selector.close()
            self._wake_r.close()
            self._wake_w.close()
            self._metadata.close()
            self._closed = True

    def __enter__(self) -> Consumer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _whole_batches_bytes(data: memoryview) -> int:
    """How many bytes at the start of ``data`` are whole batches (by their length fields)."""
    whole = 0
    end = len(data)
    while whole + record_batch.LOG_OVERHEAD <= end:
        size = record_batch.batch_size_at(data, whole)
        if size < record_batch.HEADER_SIZE or whole + size > end:  # (damage: _decode says)
            break
        whole += size
    return whole


class _Fetched:
    """One RecordBatch of a fetch response, decoded only when poll knows how."""

    __slots__ = ("raw", "position", "header")

    def __init__(self, raw: memoryview, position: int, header: Any) -> None:
        self.raw = raw
        self.position = position
        self.header = header


def _check_max_records(name: str, value: int | None) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                              or value < 1):
        raise ValueError(f"{name} must be an int >= 1 or None (no limit), not {value!r}")


class _Leftover:
    """Records decoded by an earlier poll and held back by max_records: ``records[start:]``
    (a list, or a RecordList whose records are made when a poll takes them)."""

    __slots__ = ("records", "start")

    def __init__(self, records: Sequence[Any]) -> None:
        self.records = records
        self.start = 0

    def take(self, count: int | None) -> Sequence[Any]:
        """The next ``count`` records (None: all), removed from this leftover."""
        start = self.start
        end = len(self.records) if count is None else min(len(self.records), start + count)
        taken = self.records[start:end] if start or end < len(self.records) else self.records
        self.start = end
        if end == len(self.records):
            self.records = []
            self.start = 0
        return taken

    def first_offset(self) -> int:
        return int(self.records[self.start].offset)


def _first_offset(batch: Any) -> int:
    if isinstance(batch, _Leftover):
        return batch.first_offset()
    return int(batch.header.base_offset)
