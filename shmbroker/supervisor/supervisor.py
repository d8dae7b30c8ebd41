"""The supervisor: the broker's parent process.

It owns the data dir (an exclusive ``flock`` on ``broker.lock``), ``broker.sock`` (topic admin,
metadata, status), the topic metadata (meta_store), and one worker process per partition
(workers.py).  Everything runs in one selector loop; signal handlers only set flags and wake the
loop through ``signal.set_wakeup_fd`` (gunicorn's arbiter habit).

Topic creation and partition addition answer once the new workers said ready (or failed, or
``topic_ready_timeout_ms`` passed).  Deletion answers once the topic's workers have stopped and
its files are gone: the directory is first renamed into ``deleted/`` (atomic), then removed.
Shutdown (SIGTERM/SIGINT): stop accepting, SIGTERM every worker (they drain their rings, answer
fetches, flush and close), wait up to ``worker_stop_timeout_ms``, exit 0.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import selectors
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import psutil

from shmbroker import __version__, limits
from shmbroker.config import BrokerConfig
from shmbroker.errors import (
    BrokerAlreadyRunningError,
    BrokerError,
    BrokerStorageError,
    BrokerStorageFullError,
    InvalidCommitOffsetError,
    ProtocolError,
    ShmbrokerError,
    ShuttingDownError,
    StorageError,
    StorageFullError,
    TopicExistsError,
    storage_error,
)
from shmbroker.format.names import validate_partition, validate_topic_name
from shmbroker.partition.paths import RUN_DIR, TOPICS_DIR, PartitionPaths, describe
from shmbroker.protocol.frames import Frame, frame_head
from shmbroker.protocol.messages import GROUP_APIS, ApiKey, error_frame, field
from shmbroker.shm import names
from shmbroker.shm.control_block import ControlBlock
from shmbroker.storage.checkpoint_file import fsync_directory
from shmbroker.storage.offset_log import OffsetLog
from shmbroker.supervisor.groups import GroupService, check_group_id, partitions_field
from shmbroker.supervisor.meta_store import MetaStore, TopicMeta
from shmbroker.supervisor.workers import HEALTHY_RUN_S, Standby, WorkerHandle, describe_exit
from shmbroker.transport.unix import (
    Refusals,
    ServerConnection,
    fit_fd_limit,
    listen,
    overdue_frames,
)

logger = logging.getLogger("shmbroker.supervisor")

LOCK_FILE = "broker.lock"
SOCKET_FILE = "broker.sock"
META_DIR = "meta"
DELETED_DIR = "deleted"
GROUPS_DIR = "groups"
LOOP_WAIT_S_MAX = 0.1
STANDBY_EXIT_TIMEOUT_S = 5.0  # a retired standby only has to notice its closed stdin
STANDBY_START_DELAY_S = 1.0  # standbys start this long after the last worker spawn
# A running worker ticks its control block every 100 ms; much older means stopped or hung
# (reported by status; not killed: a SIGSTOPped worker must survive its SIGCONT).
WORKER_UNRESPONSIVE_MS = 5000


class _Pending:
    """An admin request answered when ``done()`` says so, or at ``deadline``."""

    __slots__ = ("connection", "frame", "done", "answer", "deadline")

    def __init__(self, connection: ServerConnection, frame: Frame, done: Callable[[], bool],
                 answer: Callable[[], dict[str, Any]], deadline: float) -> None:
        self.connection = connection
        self.frame = frame
        self.done = done
        self.answer = answer
        self.deadline = deadline


def lock_data_dir(data_dir: Path) -> int:
    """Take the data dir's exclusive lock; BrokerAlreadyRunningError if another broker has it."""
    fd = os.open(data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise BrokerAlreadyRunningError(
            f"another broker (pid {holder}) is already serving {data_dir}; stop it first or "
            "use another --data-dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


class Supervisor:
    def __init__(self, data_dir: Path, config: BrokerConfig, log_level: str = "INFO") -> None:
        self.data_dir = data_dir
        self.config = config
        self.log_level = log_level
        self.selector = selectors.DefaultSelector()
        self.workers: dict[tuple[str, int], WorkerHandle] = {}
        self.pending: list[_Pending] = []
        self.deleting: set[str] = set()  # topics whose workers are stopping, files not gone yet
        self.offsets: OffsetLog | None = None
        self.groups: GroupService | None = None
        # OFFSET_COMMITs (and group deletions) of this loop iteration: made durable by one fsync,
        # then answered with the body staged with them (bytes: the ready answer of a later
        # request of the same connection, sent after them as it is: see _answer)
        self._staged_commits: list[tuple[ServerConnection, Frame, dict[str, Any] | bytes]] = []
        self._offsets_dirty = False  # tombstones staged without a request waiting on them
        self._checked_group_ids: set[str] = set()  # valid group ids seen (a cache)
        self.started_at = time.time()
        self.listener: socket.socket | None = None
        self.store: MetaStore | None = None
        self._lock_fd: int | None = None
        self._stopping = False
        # Worker upkeep (reap, restart, kill the overdue) walks every worker: it runs when a
        # child exited (SIGCHLD), when a restart or stop deadline is due, and at least every
        # LOOP_WAIT_S_MAX -- not at every loop iteration, which under load (thousands of
        # commits a second) would cost more than the requests themselves.
        self._child_exited = False
        self._next_upkeep = 0.0
        self.connections_max = config.connections_max
        self._refusals = Refusals(logger, SOCKET_FILE)
        self._next_slow_frame_check = 0.0
        self._signal_r, self._signal_w = socket.socketpair()
        self._standbys: list[Standby] = []
        self._standbys_due: float | None = None  # when to start standbys (after spawns settle)

    # -- start --------------------------------------------------------------------------------
    def start(self, allow_foreign_data_dir: bool = False) -> None:
        mode = self.config.data_dir_mode
        self.data_dir.mkdir(mode=mode, parents=True, exist_ok=True)
        check_data_dir_owner(self.data_dir, allow_foreign_data_dir)
        self._lock_fd = lock_data_dir(self.data_dir)
        for sub in (META_DIR, TOPICS_DIR, RUN_DIR, DELETED_DIR):
            (self.data_dir / sub).mkdir(mode=mode, exist_ok=True)
        self.store = MetaStore(self.data_dir / META_DIR)
        self.offsets = OffsetLog(self.data_dir / GROUPS_DIR)
        report = self.offsets.recovery_report
        if report.truncated_bytes:
            logger.warning("committed offsets: cut a torn tail of %d bytes (%s)",
                           report.truncated_bytes, report.reason)
        self.groups = GroupService(self.offsets, self._log_positions)
        self._remove_deleted()
        self._clean_shared_memory()
        self._topics_changed()
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGHUP):
            signal.signal(signum, self._on_signal)
        self._signal_r.setblocking(False)
        self._signal_w.setblocking(False)
        signal.set_wakeup_fd(self._signal_w.fileno(), warn_on_full_buffer=False)
        self.selector.register(self._signal_r, selectors.EVENT_READ, "signal")
        for topic in self.store.topics():
            self._write_topic_config(topic)
            for partition in range(topic.partitions):
                self._add_worker(topic, partition)
        self.connections_max = fit_fd_limit(self.config.connections_max)
        self.listener = listen(self.data_dir / SOCKET_FILE, self.config.socket_mode)
        self.selector.register(self.listener, selectors.EVENT_READ, "accept")
        logger.info("shmbroker %s serving %s (pid %d): %d topic(s), %d partition worker(s)",
                    __version__, self.data_dir, os.getpid(), len(self.store.topics()),
                    len(self.workers))

    def _on_signal(self, signum: int, frame: object) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            self._stopping = True
        elif signum == signal.SIGCHLD:
            self._child_exited = True

    def _remove_deleted(self) -> None:
        """Finish deletions a killed broker left: everything in deleted/, and topic dirs whose
        topic is no longer in the metadata (deleted, then killed before the files went)."""
        assert self.store is not None
        live = {topic.name for topic in self.store.topics()}
        for entry in (self.data_dir / TOPICS_DIR).iterdir():
            if entry.name not in live:
                logger.warning("removing %s: its topic was deleted", entry)
                target = self.data_dir / DELETED_DIR / f"{entry.name}-orphan-{time.time_ns()}"
                os.rename(entry, target)
        for entry in (self.data_dir / DELETED_DIR).iterdir():
            shutil.rmtree(entry, ignore_errors=True)

    def _clean_shared_memory(self) -> None:
        """Unlink the shm names under our prefix that no live partition owns (a killed broker's
        leftovers: deleted topics, names of a data dir deleted and made again at this path,
        anything else).  Control blocks and rings of live partitions stay: the workers reuse
        the blocks, drain the rings and release those of dead producers."""
        assert self.store is not None
        prefix = names.shm_prefix(self.data_dir)
        live = {topic.topic_id: topic.partitions for topic in self.store.topics()}
        removed = 0
        for name in names.list_names(prefix):
            where = names.partition_of(prefix, name)
            if where is not None and where[1] < live.get(where[0], 0):
                continue
            removed += names.unlink(name)
        if removed:
            logger.info("removed %d shared-memory name(s) of deleted topics or partitions, or "
                        "of an earlier data dir at this path", removed)

    # -- workers ------------------------------------------------------------------------------
    def _paths(self, topic: TopicMeta, partition: int) -> PartitionPaths:
        return PartitionPaths(self.data_dir, topic.name, topic.topic_id, partition)

    def _add_worker(self, topic: TopicMeta, partition: int) -> WorkerHandle:
        handle = WorkerHandle(self._paths(topic, partition), self.config, self.log_level)
        self.workers[(topic.name, partition)] = handle
        self._spawn(handle)
        return handle

    def _spawn(self, handle: WorkerHandle) -> None:
        standby = self._take_standby()
        try:
            ready_fd = handle.spawn(standby)
        except OSError as error:
            if standby is None:
                logger.error("%s: cannot start a worker: %s", handle.name, error)
                handle.on_exit(1, time.monotonic())
                return
            logger.warning("%s: %s; starting a worker from scratch", handle.name, error)
            self._spawn(handle)
            return
        self.selector.register(ready_fd, selectors.EVENT_READ, handle)
        self._refill_standbys()

    def _take_standby(self) -> Standby | None:
        self._drop_dead_standbys()  # one dying after this is caught by assign(): see _spawn
        return self._standbys.pop(0) if self._standbys else None

    def _drop_dead_standbys(self) -> bool:
        """Reap standbys that died waiting; True when one that had lived HEALTHY_RUN_S did (an
        event, e.g. an operator's kill: replace it now).  One dying younger may be a broken
        install: replaced only at the next spawn, so that it cannot loop."""
        now = time.monotonic()
        replace = False
        for standby in self._standbys:
            if not standby.alive():
                standby.retire()
                replace = replace or now - standby.started_at >= HEALTHY_RUN_S
                logger.warning("the standby worker (pid %d) %s", standby.process.pid,
                               describe_exit(standby.process.returncode))
        self._standbys = [standby for standby in self._standbys if standby.ready_fd >= 0]
        return replace

    def _refill_standbys(self) -> None:
        """Start standby workers up to worker_standby_count (see workers.Standby), once no
        worker was spawned for STANDBY_START_DELAY_S: a burst of spawns (a topic's partitions, a
        broker's start) boots first, and a broker that lives a moment (a test) starts none."""
        self._standbys_due = time.monotonic() + STANDBY_START_DELAY_S

    def _start_standbys(self) -> None:
        self._standbys_due = None
        self._drop_dead_standbys()
        while not self._stopping and len(self._standbys) < self.config.worker_standby_count:
            try:
                self._standbys.append(Standby())
            except OSError as error:
                logger.warning("cannot start a standby worker: %s", error)
                return

    def _reap(self) -> None:
        now = time.monotonic()
        if self._drop_dead_standbys():
            self._refill_standbys()
        for handle in list(self.workers.values()):
            process = handle.process
            if process is None or process.poll() is None:
                continue
            if handle.ready_fd is not None:
                with contextlib.suppress(KeyError, ValueError):
                    self.selector.unregister(handle.ready_fd)
            handle.on_exit(process.returncode, now)

    def _restart_due(self, now: float) -> None:
        if self._stopping:
            return
        for handle in self.workers.values():
            if handle.state == "backoff" and now >= handle.restart_at:
                self._spawn(handle)

    def _write_topic_config(self, topic: TopicMeta) -> None:
        """The effective config workers read (at boot and on SIGHUP), written atomically."""
        directory = self.data_dir / TOPICS_DIR / topic.name
        directory.mkdir(mode=self.config.data_dir_mode, exist_ok=True)
        effective = self.config.topic_config(topic.config).as_dict()
        target = directory / "config.json"
        temporary = directory / "config.json.tmp"
        try:
            with open(temporary, "wb") as file:
                file.write(orjson.dumps(effective))
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, target)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
        fsync_directory(directory)

    # -- loop ---------------------------------------------------------------------------------
    def serve(self) -> None:
        while not self._stopping:
            self._loop_once()
        self._shutdown()

    def _loop_once(self) -> None:
        timeout = min(LOOP_WAIT_S_MAX, max(0.0, self._next_upkeep - time.monotonic()))
        for key, mask in self.selector.select(timeout):
            data = key.data
            if data == "accept":
                self._accept()
            elif data == "signal":
                with contextlib.suppress(BlockingIOError):
                    self._signal_r.recv(4096)
            elif isinstance(data, WorkerHandle):
                with contextlib.suppress(KeyError, ValueError):
                    self.selector.unregister(key.fd)
                if data.on_ready_readable():
                    logger.info("%s: worker pid %s ready", data.name, data.pid)
            elif isinstance(data, ServerConnection):
                if mask & selectors.EVENT_WRITE:
                    data.flush()
                if mask & selectors.EVENT_READ:
                    self._on_readable(data)
                self._update_interest(data)
        self._serve_groups()
        self._sync_commits()
        now = time.monotonic()
        if self._child_exited or now >= self._next_upkeep:
            self._child_exited = False
            self._upkeep(now)
        if now >= self._next_slow_frame_check:
            self._close_slow_frames(now)
        self._answer_pending(now)

    def _close_slow_frames(self, now: float) -> None:
        """Close connections whose frame began more than frame_read_timeout_ms ago."""
        timeout_s = self.config.frame_read_timeout_ms / 1000
        self._next_slow_frame_check = now + min(1.0, timeout_s / 4)
        for connection, error in overdue_frames(
                [key.data for key in self.selector.get_map().values()], now, timeout_s):
            logger.warning("%s: %s", SOCKET_FILE, error)
            connection.send(error_frame(ApiKey.ERROR, 0, error))
            connection.close()
            self._update_interest(connection)

    def _upkeep(self, now: float) -> None:
        self._reap()
        self._restart_due(now)
        if self._standbys_due is not None and now >= self._standbys_due:
            self._start_standbys()
        next_upkeep = now + LOOP_WAIT_S_MAX
        for handle in self.workers.values():
            handle.kill_if_overdue(now)
            if handle.state == "backoff":
                next_upkeep = min(next_upkeep, handle.restart_at)
            elif handle.state == "stopping":
                next_upkeep = min(next_upkeep, handle.stop_deadline)
        self._next_upkeep = next_upkeep

    def _accept(self) -> None:
        assert self.listener is not None
        for _ in range(64):
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:  # EMFILE, ENFILE, ENOBUFS: the client sees its connect
                logger.warning("cannot accept a connection on %s: %s", SOCKET_FILE, error)
                return
            # less the listener and the signal socket (and, for a moment, the ready pipes of
            # starting workers)
            if len(self.selector.get_map()) - 2 >= self.connections_max:
                self._refusals.refuse(sock, self.connections_max)
                continue
            connection = ServerConnection(sock, limits.frame_json_bytes_max + 64)
            self.selector.register(sock, selectors.EVENT_READ, connection)

    def _on_readable(self, connection: ServerConnection) -> None:
        try:
            frames = connection.receive()
        except ProtocolError as error:
            connection.send(error_frame(ApiKey.ERROR, 0, error))
            connection.close()
            return
        if frames is None:
            connection.close()
            return
        for frame in frames:
            try:
                body = self._handle(connection, frame)
            except ProtocolError as error:
                connection.send(error_frame(frame.api_key, frame.correlation_id, error))
                connection.close()
                return
            except (ShmbrokerError, OSError) as error:
                if isinstance(error, OSError):
                    logger.exception("request %s failed", frame.api_key)
                    error = StorageError(f"the broker could not do it: {error}")
                self._answer(connection, frame, error)
                continue
            except Exception as error:  # a bug: this request fails, the broker serves on
                logger.exception("request %s failed unexpectedly", frame.api_key)
                connection.send(error_frame(frame.api_key, frame.correlation_id, BrokerError(
                    f"the broker failed on this request ({type(error).__name__}: {error}); "
                    "see its log")))
                connection.close()
                return
            if body is not None:
                self._answer(connection, frame, body)

    def _answer(self, connection: ServerConnection, frame: Frame,
                answer: dict[str, Any] | ShmbrokerError) -> None:
        """Answer now, or after this connection's commits staged before it, if any: requests
        are answered in order per connection (limits.py), and a pipelining client (the
        committer of ``commit_async``) pairs answers with requests by their order.  A refused
        commit answered at once would overtake the accepted ones waiting for the fsync."""
        head = (error_frame(frame.api_key, frame.correlation_id, answer)
                if isinstance(answer, ShmbrokerError)
                else frame_head(frame.api_key, frame.correlation_id, answer))
        if self._staged_commits and any(staged is connection
                                        for staged, _, _ in self._staged_commits):
            self._staged_commits.append((connection, frame, head))
        else:
            connection.send(head)

    def _serve_groups(self) -> None:
        """Expire members past their deadlines; nudge those with news to heartbeat now."""
        assert self.groups is not None
        self.groups.tick()
        for connection in self.groups.nudge():
            self._update_interest(connection)

    def _topics_changed(self) -> None:
        assert self.store is not None and self.groups is not None
        self.groups.update_topics({topic.name: topic.partitions for topic in self.store.topics()})

    def _update_interest(self, connection: ServerConnection) -> None:
        if connection.closed:
            if self.groups is not None:
                self.groups.connection_closed(connection)
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(connection.sock)
            return
        # Backpressure: no new requests from a connection whose answers wait to be written (a
        # client that pipelines and does not read is held back by its socket buffer).
        events = selectors.EVENT_WRITE if connection.pending_output else selectors.EVENT_READ
        with contextlib.suppress(KeyError, ValueError):
            if self.selector.get_key(connection.sock).events != events:
                self.selector.modify(connection.sock, events, connection)

    def _answer_pending(self, now: float) -> None:
        still = []
        for pending in self.pending:
            if pending.connection.closed:
                continue
            if pending.done() or now >= pending.deadline:
                try:
                    body = pending.answer()
                    head = frame_head(pending.frame.api_key, pending.frame.correlation_id, body)
                except ShmbrokerError as error:
                    head = error_frame(pending.frame.api_key, pending.frame.correlation_id,
                                       error)
                pending.connection.send(head)
                self._update_interest(pending.connection)
            else:
                still.append(pending)
        self.pending = still

    # -- requests -----------------------------------------------------------------------------
    def _handle(self, connection: ServerConnection, frame: Frame) -> dict[str, Any] | None:
        store = self.store
        assert store is not None
        api_key, body = frame.api_key, frame.body
        if api_key == ApiKey.METADATA:
            wanted = field(body, "topics", list, default=None)
            topics = ([store.get(validate_topic_name(name)) for name in wanted]
                      if wanted is not None else store.topics())
            return {"topics": [self._topic_metadata(topic) for topic in topics]}
        if api_key == ApiKey.LIST_TOPICS:
            return {"topics": [topic.name for topic in store.topics()]}
        if api_key == ApiKey.DESCRIBE_TOPIC:
            return self._describe(store.get(validate_topic_name(field(body, "name", str))))
        if api_key == ApiKey.STATUS:
            return self._status()
        if api_key == ApiKey.OFFSET_FETCH:
            return self._offset_fetch(body)
        if api_key == ApiKey.OFFSET_COMMIT:
            self._offset_commit(connection, frame)
            return None
        if api_key in GROUP_APIS:
            assert self.groups is not None and self.offsets is not None
            if api_key == ApiKey.DELETE_GROUP:
                group_id = check_group_id(field(body, "group_id", str))
                self.groups.delete_group(group_id)
                self._staged_commits.append((connection, frame, {"group_id": group_id}))
                return None
            return self.groups.handle(connection, frame)
        if self._stopping:
            raise ShuttingDownError("the broker is shutting down")
        if api_key == ApiKey.CREATE_TOPIC:
            name = field(body, "name", str)
            if name in self.deleting:
                raise TopicExistsError(f"topic {name!r} is still being deleted; retry in a "
                                       "moment")
            config = field(body, "config", dict, default={})
            self.config.topic_config(config)  # refuse bad values before anything is stored
            topic = store.create(name, field(body, "partitions", int), config)
            try:
                self._write_topic_config(topic)
            except OSError as error:  # a full disk: the topic must not exist without workers
                with contextlib.suppress(ShmbrokerError, OSError):
                    store.delete(name)  # best effort; a restart writes the config anyway
                raise storage_error(f"cannot create topic {name!r}: writing its config: "
                                    f"{error.strerror or error}", error.errno) from None
            for partition in range(topic.partitions):
                self._add_worker(topic, partition)
            self._topics_changed()
            self._park_until_ready(connection, frame, topic, range(topic.partitions))
            return None
        if api_key == ApiKey.ADD_PARTITIONS:
            old = store.get(validate_topic_name(field(body, "name", str)))
            topic = store.add_partitions(old.name, field(body, "partitions", int))
            for partition in range(old.partitions, topic.partitions):
                self._add_worker(topic, partition)
            self._topics_changed()
            self._park_until_ready(connection, frame, topic,
                                   range(old.partitions, topic.partitions))
            return None
        if api_key == ApiKey.ALTER_CONFIGS:
            name = validate_topic_name(field(body, "name", str))
            changes = field(body, "config", dict)
            current = store.get(name)
            merged = {**current.config, **changes}
            self.config.topic_config({k: v for k, v in merged.items() if v is not None})
            topic = store.alter_config(name, changes)
            self._write_topic_config(topic)
            for partition in range(topic.partitions):
                self.workers[(topic.name, partition)].reload()
            return {"topic": self._topic_metadata(topic)}
        if api_key == ApiKey.DELETE_TOPIC:
            topic = store.delete(validate_topic_name(field(body, "name", str)))
            self._topics_changed()
            if self.offsets is not None and topic.name in self._committed_topics():
                self.offsets.delete_topic(topic.name)  # as Kafka: a deleted topic's offsets go
                self._offsets_dirty = True
            self._delete_topic(connection, frame, topic)
            return None
        raise ProtocolError(f"api key {api_key} is not served by the supervisor")

    # -- committed offsets (group commit: one fsync per loop iteration) -----------------------
    def _offset_commit(self, connection: ServerConnection, frame: Frame) -> None:
        """Stage the commits of one request; answered after the iteration's single fsync.

        The hottest request under load (tens of thousands a second): exact-type checks and
        plain locals first; anything unusual goes through ``field`` for its precise error."""
        assert self.offsets is not None and self.store is not None and self.groups is not None
        body = frame.body
        group_id = body.get("group_id")
        if type(group_id) is not str or group_id not in self._checked_group_ids:
            check_group_id(field(body, "group_id", str))
            if len(self._checked_group_ids) >= limits.groups_max:
                self._checked_group_ids.clear()
            self._checked_group_ids.add(group_id)
        member_id = body.get("member_id")
        if member_id is not None and type(member_id) is not str:
            field(body, "member_id", str)  # raises
        member_epoch = body.get("member_epoch", -1)
        if type(member_epoch) is not int:
            member_epoch = field(body, "member_epoch", int, default=-1)
        entries = body.get("offsets")
        if type(entries) is not list:
            entries = field(body, "offsets", list)
        commits = []
        partitions = []
        get_topic = self.store.get
        for entry in entries:
            if type(entry) is not list or len(entry) != 4:
                raise ProtocolError("each committed offset is [topic, partition, offset, "
                                    "metadata or null]")
            topic, partition, offset, metadata = entry
            if (type(topic) is not str or type(partition) is not int or type(offset) is not int
                    or metadata is not None and type(metadata) is not str):
                raise ProtocolError("each committed offset is [topic, partition, offset, "
                                    "metadata or null]")
            try:
                count = get_topic(topic).partitions
            except ShmbrokerError:
                validate_topic_name(topic)  # a clearer error for a malformed name
                raise
            if not 0 <= partition < count:
                validate_partition(partition, count, topic)  # raises
            if offset < 0:
                raise InvalidCommitOffsetError(
                    f"cannot commit offset {offset} for {topic}/{partition}: offsets are >= 0")
            commits.append((topic, partition, offset, metadata))
            partitions.append((topic, partition))
        # a member's commit is fenced by its member id and epoch; one without a member id
        # (Kafka's generation -1: manual assignment, admin tools) only while the group is empty
        self.groups.coordinator.validate_commit(group_id, member_id, member_epoch, partitions)
        if self.offsets.staged_bytes > limits.offset_log_staged_bytes_max // 2:
            self._sync_commits()  # a flood of commits in one iteration: make room, go on
        try:
            self.offsets.stage(group_id, commits)
        except ValueError as error:
            raise ProtocolError(str(error)) from None
        self._staged_commits.append((connection, frame, {"committed": len(commits)}))

    def _committed_topics(self) -> set[str]:
        assert self.offsets is not None
        return {topic for group in self.offsets.groups()
                for topic, _ in self.offsets.offsets(group)}

    def _sync_commits(self) -> None:
        if not self._staged_commits and not self._offsets_dirty:
            return
        assert self.offsets is not None
        staged, self._staged_commits = self._staged_commits, []
        self._offsets_dirty = False
        try:
            self.offsets.sync()
            error: ShmbrokerError | None = None
        except StorageError as failure:
            logger.error("committed offsets: %s", failure)
            # the client's error class by the failure's code: a full disk stays STORAGE_FULL
            full = isinstance(failure, StorageFullError)
            error = (BrokerStorageFullError if full else BrokerStorageError)(str(failure))
        # one send per connection: a pipelining client has many answers in one iteration
        answers: dict[ServerConnection, list[bytes]] = {}
        for connection, frame, answer in staged:
            if connection.closed:
                continue
            if isinstance(answer, bytes):  # a later request's answer, ready: in its turn
                head = answer
            elif error is not None:
                head = error_frame(frame.api_key, frame.correlation_id, error)
            else:
                head = frame_head(frame.api_key, frame.correlation_id, answer)
            answers.setdefault(connection, []).append(head)
        for connection, heads in answers.items():
            connection.send(b"".join(heads))
            self._update_interest(connection)

    def _offset_fetch(self, body: dict[str, Any]) -> dict[str, Any]:
        assert self.offsets is not None
        group_id = field(body, "group_id", str)
        stored = self.offsets.offsets(group_id)
        keys = (sorted(stored) if body.get("partitions") is None
                else partitions_field(body, "partitions"))
        return {"offsets": [[topic, partition, *stored.get((topic, partition), (-1, None))]
                            for topic, partition in keys]}

    def _park_until_ready(self, connection: ServerConnection, frame: Frame, topic: TopicMeta,
                          partitions: range) -> None:
        handles = [self.workers[(topic.name, partition)] for partition in partitions]

        def done() -> bool:
            return all(handle.state in ("running", "failed") for handle in handles)

        self.pending.append(_Pending(
            connection, frame, done, lambda: {"topic": self._topic_metadata(topic)},
            time.monotonic() + self.config.topic_ready_timeout_ms / 1000))

    def _delete_topic(self, connection: ServerConnection, frame: Frame,
                      topic: TopicMeta) -> None:
        now = time.monotonic()
        handles = [self.workers.pop((topic.name, partition))
                   for partition in range(topic.partitions)
                   if (topic.name, partition) in self.workers]
        for handle in handles:
            handle.stop(now)
        self.deleting.add(topic.name)

        def done() -> bool:
            for handle in handles:
                if handle.process is not None and handle.process.poll() is not None:
                    if handle.ready_fd is not None:
                        with contextlib.suppress(KeyError, ValueError):
                            self.selector.unregister(handle.ready_fd)
                    handle.on_exit(handle.process.returncode, time.monotonic())
                handle.kill_if_overdue(time.monotonic())
            return all(handle.process is None for handle in handles)

        def answer() -> dict[str, Any]:
            if not done():  # past the deadline: kill what is left and reap it
                for handle in handles:
                    if handle.process is not None:
                        with contextlib.suppress(ProcessLookupError):
                            handle.process.kill()
                        handle.process.wait()
                        handle.on_exit(handle.process.returncode, time.monotonic())
            self._remove_topic_files(topic)
            self.deleting.discard(topic.name)
            return {"topic": topic.to_json()}

        self.pending.append(_Pending(connection, frame, done, answer,
                                     now + self.config.worker_stop_timeout_ms / 1000 + 1))

    def _remove_topic_files(self, topic: TopicMeta) -> None:
        source = self.data_dir / TOPICS_DIR / topic.name
        target = self.data_dir / DELETED_DIR / f"{topic.name}-{topic.topic_id}"
        with contextlib.suppress(FileNotFoundError):
            os.rename(source, target)
            fsync_directory(self.data_dir / TOPICS_DIR)
            shutil.rmtree(target, ignore_errors=True)
        prefix = names.shm_prefix(self.data_dir)
        for name in names.list_names(prefix):
            if name.lstrip("/").startswith(f"{prefix}.t{topic.topic_id}."):
                names.unlink(name)
        for partition in range(topic.partitions):
            paths = self._paths(topic, partition)
            for path in (paths.lock_path, paths.socket_path):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

    # -- views --------------------------------------------------------------------------------
    def _topic_metadata(self, topic: TopicMeta) -> dict[str, Any]:
        partitions = []
        for partition in range(topic.partitions):
            paths = self._paths(topic, partition)
            handle = self.workers.get((topic.name, partition))
            partitions.append({**describe(paths),
                               "state": handle.state if handle else "stopped",
                               "worker_pid": handle.pid if handle else None})
        return {"name": topic.name, "topic_id": topic.topic_id,
                "partitions": partitions, "config": topic.config,
                "max_batch_bytes": self.config.topic_config(topic.config).max_batch_bytes}

    def _log_positions(self, topic_name: str, partition: int) -> tuple[int, int, int]:
        """(log_start, log_end, high_watermark) of a partition from its worker's control block;
        (-1, -1, -1) when unknown (no such topic, worker not running)."""
        assert self.store is not None
        positions = (-1, -1, -1)
        with contextlib.suppress(ShmbrokerError, OSError):
            paths = self._paths(self.store.get(topic_name), partition)
            block = ControlBlock.open(paths.control_block_name, readonly=True)
            try:
                positions = block.positions()
            finally:
                block.close()
        return positions

    def _describe(self, topic: TopicMeta) -> dict[str, Any]:
        view = self._topic_metadata(topic)
        for entry in view["partitions"]:
            paths = self._paths(topic, entry["partition"])
            entry["size_bytes"] = _directory_bytes(paths.log_dir)
            entry["log_start_offset"], entry["log_end_offset"], entry["high_watermark"] = (
                self._log_positions(topic.name, entry["partition"]))
        view["effective_config"] = self.config.topic_config(topic.config).as_dict()
        return view

    def _status(self) -> dict[str, Any]:
        assert self.store is not None
        workers = [{"topic": handle.paths.topic, "partition": handle.paths.partition,
                    "pid": handle.pid, "state": handle.state, "restarts": handle.restarts,
                    **_process_view(handle)}
                   for handle in self.workers.values()]
        return {"pid": os.getpid(), "version": __version__, "data_dir": str(self.data_dir),
                "uptime_s": round(time.time() - self.started_at, 3),
                "topics": len(self.store.topics()), "partitions": len(workers),
                "workers_alive": sum(1 for worker in workers
                                     if worker["state"] in ("running", "starting")),
                "workers": workers}

    # -- stop ---------------------------------------------------------------------------------
    def _shutdown(self) -> None:
        logger.info("shutting down: stopping %d worker(s)", len(self.workers))
        if self.listener is not None:
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(self.listener)
            self.listener.close()
            with contextlib.suppress(FileNotFoundError):
                (self.data_dir / SOCKET_FILE).unlink()
        for standby in self._standbys:
            standby.retire()  # stdin closed: it exits 0 (waited for below)
        now = time.monotonic()
        for handle in self.workers.values():
            handle.stop(now)
        while any(handle.process is not None for handle in self.workers.values()):
            self.selector.select(0.05)
            with contextlib.suppress(BlockingIOError):
                self._signal_r.recv(4096)
            now = time.monotonic()
            for handle in self.workers.values():
                if handle.process is not None and handle.process.poll() is not None:
                    handle.on_exit(handle.process.returncode, now)
                handle.kill_if_overdue(now)
        for standby in self._standbys:
            try:
                standby.process.wait(STANDBY_EXIT_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                standby.process.kill()
                standby.process.wait()
        self._standbys = []
        for handle in self.workers.values():
            handle.close_ready_fd()
            names.unlink(handle.paths.control_block_name)
        for key in list(self.selector.get_map().values()):
            if isinstance(key.data, ServerConnection):
                key.data.close()
        self._sync_commits()
        if self.offsets is not None:
            self.offsets.close()
        signal.set_wakeup_fd(-1)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
        logger.info("stopped")


def _process_view(handle: WorkerHandle) -> dict[str, Any]:
    """What psutil and the control block say about a worker process: its OS status (running,
    sleeping, stopped, zombie), RSS, CPU seconds, whether its loop ticked recently, and whether
    its appends are failing on the disk (storage_full)."""
    view: dict[str, Any] = {"process_status": None, "rss_bytes": None, "cpu_s": None,
                            "responsive": None, "storage_full": None}
    if handle.pid is None:
        return view
    with contextlib.suppress(psutil.Error):
        process = psutil.Process(handle.pid)
        with process.oneshot():
            times = process.cpu_times()
            view.update(process_status=process.status(), rss_bytes=process.memory_info().rss,
                        cpu_s=round(times.user + times.system, 3))
    if handle.state == "running":
        with contextlib.suppress(ShmbrokerError, OSError):
            block = ControlBlock.open(handle.paths.control_block_name, readonly=True)
            try:
                age_ms = time.time_ns() // 1_000_000 - block.updated_ms
                view["storage_full"] = bool(block.storage_full)
            finally:
                block.close()
            view["responsive"] = age_ms < WORKER_UNRESPONSIVE_MS
    return view


def _directory_bytes(directory: Path) -> int:
    total = 0
    with contextlib.suppress(OSError):  # gone, not a directory, unreadable: describe goes on
        for entry in os.scandir(directory):
            if entry.is_file(follow_symlinks=False) and entry.name.endswith(".log"):
                total += entry.stat(follow_symlinks=False).st_size
    return total


def default_data_dir() -> Path:
    return Path(os.environ.get("SHMBROKER_DATA_DIR") or "./shmbroker-data")


def check_data_dir_owner(data_dir: Path, allow_foreign: bool) -> None:
    """Refuse a data dir another user owns (someone else's broker data, or a path mistake that
    would have us write root-owned files into it), unless told to (``--allow-foreign-data-dir``,
    e.g. a shared service account's dir)."""
    owner = data_dir.stat().st_uid
    if owner != os.geteuid() and not allow_foreign:
        try:
            import pwd

            name = pwd.getpwuid(owner).pw_name
        except (KeyError, ImportError):
            name = str(owner)
        raise BrokerError(f"data dir {data_dir} belongs to user {name!r} (uid {owner}), not to "
                          f"this user (uid {os.geteuid()}); run the broker as its owner, or "
                          f"pass --allow-foreign-data-dir if sharing it is intended")


def run(data_dir: Path, config: BrokerConfig, log_level: str = "INFO",
        allow_foreign_data_dir: bool = False) -> int:
    """``shmbroker serve``: start, serve until SIGTERM/SIGINT, return the exit code."""
    supervisor = Supervisor(data_dir.resolve(), config, log_level)
    try:
        supervisor.start(allow_foreign_data_dir)
    except OSError as error:
        if error.errno in (errno.EACCES, errno.EPERM):
            raise StorageError(f"cannot use data dir {data_dir}: {error.strerror}") from None
        raise
    supervisor.serve()
    return 0
