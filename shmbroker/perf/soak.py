"""``shmbroker-bench soak``: a long run under faults, and the proof that nothing acknowledged
was lost.

The soak starts its own broker (it must be free to kill it) on a fresh data dir, one topic of
``partitions`` partitions, ``producers`` producer processes and two consumer groups of
``members_per_group`` member processes each, and runs for ``duration_s``.  Every
``fault_interval_s`` (jittered ±50 %) it injects a fault whose kind is drawn from a random
schedule made from ``seed``: the seed is printed, and the same seed replays the same schedule.

The fault kinds (the produce-consume-validate faults of ``tests/fault/``, at random moments):
SIGKILL of one worker, of all workers, SIGSTOP of a worker for ``stop_worker_s`` (longer than a
client's patience for a fetch), SIGKILL of the supervisor (its workers die with it) and a
restart, a clean restart (SIGTERM), a hard restart (SIGKILL of everything at once), SIGKILL of
a producer (mid-batch, often: a half-written ring frame) and SIGKILL of a group member (mid-
commit, often: members commit every ``AUTO_COMMIT_MS``).  A killed producer or member is
replaced at once by a new incarnation.

After each fault the soak waits for **recovery**: every producer has had a record acknowledged
that it meant to send after the fault began, and each group has consumed, on every partition, a
record meant to be sent after it.  The next fault waits for that.

How the accounting cannot be fooled:

* a producer writes each acknowledged record (producer id, seq, partition, offset, intended
  time) with ``os.write`` as its future completes; a SIGKILLed producer loses at most the rows of
  its last few milliseconds, which then count as *unacknowledged* (never as lost);
* a member writes each record it consumed (partition, offset, producer id, seq, intended time,
  consumed time) with ``os.write`` right after ``poll`` returns and before the next ``poll``,
  and commits by auto-commit inside ``poll``, which commits only what earlier polls returned:
  what is committed has been written down, so a killed member loses nothing it committed;
* records carry the 24-byte header of :mod:`shmbroker.perf.payloads`; the producer id encodes
  the producer and its incarnation, so a sequence number is never sent twice.

The verdict, per group: **lost** = acknowledged records the group never consumed (must be 0);
**redelivered** = records the group consumed more than once (at least once is the contract: a
member that dies, or loses its partitions with the supervisor, is followed by an owner that
starts at the last commit); across the log: acknowledged records not found at their acknowledged
offset, and records stored twice at different offsets (both must be 0).  Exit status 1 when any
of these fails or a fault did not recover.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import multiprocessing
import os
import random
import shutil
import signal
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from shmbroker.perf.histogram import Histogram
from shmbroker.subprocesses import child_environment, join_or_kill, python_module

TOPIC = "soak"
GROUPS = ("soak-a", "soak-b")
FAULT_KINDS = ("kill_worker", "kill_all_workers", "stop_worker", "kill_supervisor",
               "clean_restart", "hard_restart", "kill_producer", "kill_member")
INCARNATIONS_MAX = 10_000  # producer id = index * INCARNATIONS_MAX + incarnation
AUTO_COMMIT_MS = 200
BROKER_START_TIMEOUT_S = 60.0
BROKER_STOP_TIMEOUT_S = 60.0
RECOVERY_TIMEOUT_S = 60.0
DRAIN_TIMEOUT_S = 120.0  # at the end: groups consume and commit up to the log end
CHILD_STOP_TIMEOUT_S = 60.0
ROWS_FLUSH_S = 0.05
# Shared counters of each producer (all its incarnations): records acknowledged, the intended
# time of the newest acknowledged one (ns), records sent (send() called)
PRODUCER_SLOTS = 3
IN_FLIGHT_MAX = 5000
_HEADER = struct.Struct("<qiiq")  # payloads.HEADER_DTYPE: intended ns, producer id, 0, seq
# Rows the children write (all int64).
ACKED_COLUMNS = ("producer_id", "seq", "partition", "offset", "intended_ns")
CONSUMED_COLUMNS = ("partition", "offset", "producer_id", "seq", "intended_ns", "consumed_ns")


@dataclass
class SoakConfig:
    duration_s: float = 600.0
    fault_interval_s: float = 15.0
    seed: int = 0
    faults: tuple[str, ...] = FAULT_KINDS
    partitions: int = 4
    producers: int = 3
    members_per_group: int = 2
    rate_per_producer_per_s: int = 1000
    record_size_bytes: int = 100
    acks: str = "mixed"  # "1", "all", or "mixed" (producers alternate 1 and all)
    stop_worker_s: float = 5.0

    def __post_init__(self) -> None:
        unknown = set(self.faults) - set(FAULT_KINDS)
        if unknown or not self.faults:
            raise ValueError(f"fault kinds must be some of {', '.join(FAULT_KINDS)}; "
                             f"got {', '.join(self.faults) or 'none'}")
        if self.record_size_bytes < _HEADER.size:
            raise ValueError(f"record_size_bytes must be >= {_HEADER.size} (the header)")
        if self.acks not in ("1", "all", "mixed"):
            raise ValueError(f"acks must be 1, all or mixed, got {self.acks!r}")
        for name in ("duration_s", "fault_interval_s", "partitions", "producers",
                     "members_per_group", "rate_per_producer_per_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")

    def producer_acks(self, index: int) -> int | str:
        acks = self.acks if self.acks != "mixed" else ("1", "all")[index % 2]
        return 1 if acks == "1" else "all"


def schedule(config: SoakConfig) -> list[tuple[float, str]]:
    """(seconds after the start, fault kind) for the whole run: a function of the seed and the
    config alone, so a seed replays the same faults."""
    rng = random.Random(config.seed)
    at = 0.0
    planned = []
    while True:
        at += config.fault_interval_s * rng.uniform(0.5, 1.5)
        if at >= config.duration_s:
            return planned
        planned.append((round(at, 3), rng.choice(config.faults)))


# -- children ------------------------------------------------------------------------------------
def _log_to(path: str) -> None:
    """A child's warnings (the client library says when it loses the broker) go to its own
    file, not over the soak's report."""
    logging.basicConfig(filename=path, level=logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")


def _producer_main(spec: dict[str, Any], progress: Any, stop: Any) -> None:
    from shmbroker import Producer
    from shmbroker.errors import ClosedError, ShmbrokerError

    _log_to(spec["log_path"])
    index = spec["index"]
    producer_id = index * INCARNATIONS_MAX + spec["incarnation"]
    partitions = spec["partitions"]
    interval_ns = int(1e9 / spec["rate_per_s"])
    padding = os.urandom(spec["record_size_bytes"] - _HEADER.size)
    counts: collections.Counter[str] = collections.Counter()
    pending: collections.deque[tuple[int, int, Any]] = collections.deque()
    rows: list[tuple[int, int, int, int, int]] = []
    fd = os.open(spec["acked_path"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def connect() -> Any:
        while not stop.is_set():
            try:
                return Producer(spec["data_dir"], acks=spec["acks"], linger_ms=2,
                                max_block_ms=2000)
            except ShmbrokerError as error:  # the broker is being restarted
                counts["connect:" + type(error).__name__] += 1
                stop.wait(0.05)
        return None

    def write_rows() -> None:
        if rows:
            os.write(fd, np.array(rows, dtype=np.int64).tobytes())
            progress[PRODUCER_SLOTS * index] += len(rows)
            progress[PRODUCER_SLOTS * index + 1] = rows[-1][4]
            rows.clear()

    def settle(block_s: float) -> None:
        while pending:
            seq, intended, future = pending[0]
            if not future.done():
                if block_s <= 0:
                    return
                future.batch.wait(block_s)
                block_s = 0
                if not future.done():
                    return
            pending.popleft()
            error = future.exception(0)
            if error is not None:
                counts["failed:" + type(error).__name__] += 1
                continue
            meta = future.result(0)
            rows.append((producer_id, seq, meta.partition, meta.offset, intended))

    producer = connect()
    start_ns = time.monotonic_ns()
    seq = 0
    next_flush = time.monotonic() + ROWS_FLUSH_S
    while producer is not None and not stop.is_set():
        due = (time.monotonic_ns() - start_ns) // interval_ns + 1
        if due <= seq:
            time.sleep(0.001)
        while seq < due and len(pending) < IN_FLIGHT_MAX:
            intended = start_ns + seq * interval_ns
            try:
                future = producer.send(TOPIC, _HEADER.pack(intended, producer_id, 0, seq)
                                       + padding, partition=seq % partitions)
                pending.append((seq, intended, future))
            except ClosedError:
                counts["send:ClosedError"] += 1
                producer.close(0)
                producer = connect()
                if producer is None:
                    break
            except ShmbrokerError as error:
                counts["send:" + type(error).__name__] += 1
                stop.wait(0.05)
            seq += 1  # never sent twice: a failed send is simply not acknowledged
            progress[PRODUCER_SLOTS * index + 2] += 1
        settle(0.2 if len(pending) >= IN_FLIGHT_MAX else 0)
        if time.monotonic() >= next_flush:
            write_rows()
            next_flush = time.monotonic() + ROWS_FLUSH_S
    counts["sent"] = seq
    if producer is not None:
        with contextlib.suppress(ShmbrokerError):
            producer.flush(30)
    deadline = time.monotonic() + 30
    while pending and time.monotonic() < deadline:
        settle(0.2)
    counts["unresolved"] = len(pending)
    write_rows()
    os.close(fd)
    if producer is not None:
        with contextlib.suppress(ShmbrokerError):
            producer.close(5)
    Path(spec["summary_path"]).write_text(json.dumps(dict(counts)))


def _member_main(spec: dict[str, Any], progress: Any, stop: Any) -> None:
    from shmbroker import Consumer
    from shmbroker.errors import ClosedError, ShmbrokerError

    _log_to(spec["log_path"])
    slot = spec["slot"]  # first of this member's per-partition progress slots
    counts: collections.Counter[str] = collections.Counter()
    fd = os.open(spec["consumed_path"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def connect() -> Any:
        while not stop.is_set():
            try:
                consumer = Consumer(spec["data_dir"], group_id=spec["group"],
                                    auto_offset_reset="earliest",
                                    auto_commit_interval_ms=AUTO_COMMIT_MS,
                                    client_id=spec["name"])
                consumer.subscribe([TOPIC])
                return consumer
            except ShmbrokerError as error:
                counts["connect:" + type(error).__name__] += 1
                stop.wait(0.05)
        return None

    consumer = connect()
    while consumer is not None and not stop.is_set():
        try:
            records = consumer.poll(timeout_ms=200)
        except ClosedError as error:
            counts["poll:" + type(error).__name__] += 1
            with contextlib.suppress(ShmbrokerError, OSError):
                consumer.close()
            consumer = connect()
            continue
        except ShmbrokerError as error:  # the broker is being restarted
            counts["poll:" + type(error).__name__] += 1
            stop.wait(0.05)
            continue
        if not records:
            continue
        now_ns = time.monotonic_ns()
        heads = np.frombuffer(b"".join([record.value[:_HEADER.size] for record in records]),
                              dtype=np.dtype([("intended_ns", "<i8"), ("producer_id", "<i4"),
                                              ("reserved", "<i4"), ("seq", "<i8")]))
        rows = np.empty((len(records), len(CONSUMED_COLUMNS)), dtype=np.int64)
        rows[:, 0] = [record.partition for record in records]
        rows[:, 1] = [record.offset for record in records]
        rows[:, 2] = heads["producer_id"]
        rows[:, 3] = heads["seq"]
        rows[:, 4] = heads["intended_ns"]
        rows[:, 5] = now_ns
        os.write(fd, rows.tobytes())  # before the next poll commits these positions
        for partition in np.unique(rows[:, 0]):
            newest = int(rows[rows[:, 0] == partition, 4].max())
            if newest > progress[slot + int(partition)]:
                progress[slot + int(partition)] = newest
        counts["consumed"] += len(records)
    os.close(fd)
    if consumer is not None:
        with contextlib.suppress(ShmbrokerError, OSError):
            consumer.close()
    Path(spec["summary_path"]).write_text(json.dumps(dict(counts)))


# -- the broker ----------------------------------------------------------------------------------
class SoakBroker:
    """The broker the soak owns: ``shmbroker serve`` as a child process."""

    def __init__(self, data_dir: Path, log_path: Path) -> None:
        self.data_dir = data_dir
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                python_module("shmbroker.cli", "serve", "--data-dir", str(self.data_dir),
                              "--log-level", "WARNING"),
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=child_environment())
        deadline = time.monotonic() + BROKER_START_TIMEOUT_S
        while self.workers() is None:
            if self.process.poll() is not None:
                raise RuntimeError(f"the broker exited ({self.process.returncode}) at start; "
                                   f"its log: {self.log_path}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the broker did not start in {BROKER_START_TIMEOUT_S:.0f} "
                                   f"s; its log: {self.log_path}")
            time.sleep(0.02)

    def status(self) -> dict[str, Any] | None:
        from shmbroker import Admin
        from shmbroker.errors import ShmbrokerError

        if self.process is None or not (self.data_dir / "broker.sock").exists():
            return None
        try:
            with Admin(self.data_dir, request_timeout_ms=5000) as admin:
                status: dict[str, Any] = admin.status()
        except (ShmbrokerError, OSError):
            return None
        return status if status["pid"] == self.process.pid else None

    def workers(self) -> dict[int, int] | None:
        """partition -> worker pid, once the supervisor answers and every worker runs."""
        status = self.status()
        if status is None or not all(w["state"] == "running" and w["pid"]
                                     for w in status["workers"]):
            return None
        return {w["partition"]: w["pid"] for w in status["workers"] if w["topic"] == TOPIC}

    def wait_workers(self, timeout_s: float = RECOVERY_TIMEOUT_S) -> dict[int, int]:
        deadline = time.monotonic() + timeout_s
        while True:
            workers = self.workers()
            if workers:
                return workers
            if time.monotonic() > deadline:
                raise RuntimeError(f"the workers were not all running after {timeout_s:.0f} s; "
                                   f"the broker's log: {self.log_path}")
            time.sleep(0.02)

    def kill(self, workers: bool) -> None:
        """SIGKILL the supervisor (and, with ``workers``, every worker at the same moment);
        wait until all of them are gone (workers die with their supervisor: PDEATHSIG)."""
        import psutil

        assert self.process is not None
        children = []
        with contextlib.suppress(psutil.Error):
            children = psutil.Process(self.process.pid).children(recursive=True)
        self.process.kill()
        if workers:
            for child in children:
                with contextlib.suppress(psutil.Error):
                    child.kill()
        self.process.wait(BROKER_STOP_TIMEOUT_S)
        _, alive = psutil.wait_procs(children, timeout=BROKER_STOP_TIMEOUT_S)
        for child in alive:  # ours: we started the broker
            with contextlib.suppress(psutil.Error):
                child.kill()
        self.process = None

    def stop(self) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(BROKER_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.kill(workers=True)
            return -signal.SIGKILL
        self.process = None
        return code


# -- the run -------------------------------------------------------------------------------------
@dataclass
class FaultRecord:
    kind: str
    at_s: float  # seconds after the start
    detail: str
    recover_s: float | None = None  # None: it did not recover in RECOVERY_TIMEOUT_S
    started_ns: int = 0
    recovered_ns: int = 0
    max_latency_ms: float | None = None


@dataclass
class SoakResult:
    config: SoakConfig
    elapsed_s: float
    faults: list[FaultRecord]
    producers: dict[str, Any]
    groups: dict[str, dict[str, int]]
    misplaced: int
    stored_twice: int
    latency: Histogram
    work_dir: str | None = None
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (not self.errors and self.misplaced == 0 and self.stored_twice == 0
                and all(group["lost"] == 0 for group in self.groups.values())
                and all(fault.recover_s is not None for fault in self.faults))

    def to_dict(self) -> dict[str, Any]:
        percentiles = self.latency.percentiles([50, 90, 99, 99.9, 100]) \
            if self.latency.count else {}
        return {"config": asdict(self.config), "elapsed_s": self.elapsed_s,
                "faults": [asdict(fault) for fault in self.faults],
                "faults_by_kind": fault_table(self.faults), "producers": self.producers,
                "groups": self.groups, "misplaced": self.misplaced,
                "stored_twice": self.stored_twice,
                "latency_ms": {f"{p:g}": value / 1e6 for p, value in percentiles.items()},
                "ok": self.ok, "errors": self.errors, "work_dir": self.work_dir}


class Soak:
    """One soak run: children, faults, then the accounting."""

    def __init__(self, config: SoakConfig, work_dir: Path,
                 say: Callable[[str], None] = lambda line: None) -> None:
        self.config = config
        self.work = work_dir
        self.say = say
        self.data_dir = work_dir / "data"
        self.broker = SoakBroker(self.data_dir, work_dir / "broker.log")
        self.context = multiprocessing.get_context("spawn")
        members = len(GROUPS) * config.members_per_group
        # producers: PRODUCER_SLOTS each; members: per partition the newest consumed intended ns
        self.progress = self.context.Array(
            "q", PRODUCER_SLOTS * config.producers + members * config.partitions, lock=False)
        self.stop_producers = self.context.Event()
        self.stop_members = self.context.Event()
        self.producers: list[Any] = [None] * config.producers
        self.members: dict[tuple[int, int], Any] = {}
        self.incarnations: collections.Counter[str] = collections.Counter()
        self.rng = random.Random(config.seed + 1)  # victims: also replayed by the seed
        self.struck_ns = 0  # when the last fault struck (monotonic ns)

    # children
    def _start_producer(self, index: int) -> None:
        name = f"p{index}"
        incarnation = self.incarnations[name]
        self.incarnations[name] += 1
        spec = {"index": index, "incarnation": incarnation, "data_dir": str(self.data_dir),
                "partitions": self.config.partitions, "acks": self.config.producer_acks(index),
                "rate_per_s": self.config.rate_per_producer_per_s,
                "record_size_bytes": self.config.record_size_bytes,
                "acked_path": str(self.work / f"{name}.{incarnation}.acked"),
                "summary_path": str(self.work / f"{name}.{incarnation}.summary.json"),
                "log_path": str(self.work / f"{name}.{incarnation}.log")}
        process = self.context.Process(target=_producer_main, name=f"soak-{name}",
                                       args=(spec, self.progress, self.stop_producers))
        process.start()
        self.producers[index] = process

    def _member_slot(self, group: int, member: int) -> int:
        return PRODUCER_SLOTS * self.config.producers + (
            group * self.config.members_per_group + member) * self.config.partitions

    def _start_member(self, group: int, member: int) -> None:
        name = f"{GROUPS[group]}.m{member}"
        incarnation = self.incarnations[name]
        self.incarnations[name] += 1
        spec = {"group": GROUPS[group], "name": name, "slot": self._member_slot(group, member),
                "data_dir": str(self.data_dir),
                "consumed_path": str(self.work / f"{name}.{incarnation}.consumed"),
                "summary_path": str(self.work / f"{name}.{incarnation}.summary.json"),
                "log_path": str(self.work / f"{name}.{incarnation}.log")}
        process = self.context.Process(target=_member_main, name=f"soak-{name}",
                                       args=(spec, self.progress, self.stop_members))
        process.start()
        self.members[(group, member)] = process

    # recovery
    def _recovered(self, since_ns: int) -> bool:
        config = self.config
        if any(self.progress[PRODUCER_SLOTS * i + 1] <= since_ns
               for i in range(config.producers)):
            return False
        for group in range(len(GROUPS)):
            for partition in range(config.partitions):
                newest = max(self.progress[self._member_slot(group, member) + partition]
                             for member in range(config.members_per_group))
                if newest <= since_ns:
                    return False
        return True

    def _wait_recovered(self, since_ns: int) -> bool:
        deadline = time.monotonic() + RECOVERY_TIMEOUT_S
        while not self._recovered(since_ns):
            if time.monotonic() > deadline:
                return False
            self._check_children()
            time.sleep(0.005)
        return True

    def _check_children(self) -> None:
        for index, process in enumerate(self.producers):
            if not process.is_alive() and not self.stop_producers.is_set():
                raise RuntimeError(f"producer p{index} exited ({process.exitcode}) on its own")
        for (group, member), process in self.members.items():
            if not process.is_alive() and not self.stop_members.is_set():
                raise RuntimeError(f"member {GROUPS[group]}.m{member} exited "
                                   f"({process.exitcode}) on its own")

    # faults
    def _strike(self) -> None:
        """The fault's moment: just before its first signal (finding the victims, e.g. waiting
        for every worker to run, is not part of it)."""
        self.struck_ns = time.monotonic_ns()

    def inject(self, kind: str) -> str:
        """Inject one fault (its moment in ``struck_ns``); what was hit."""
        broker = self.broker
        if kind in ("kill_worker", "stop_worker"):
            partition, pid = self.rng.choice(sorted(broker.wait_workers().items()))
            self._strike()
            if kind == "kill_worker":
                os.kill(pid, signal.SIGKILL)
                return f"worker of partition {partition} (pid {pid})"
            os.kill(pid, signal.SIGSTOP)
            try:
                time.sleep(self.config.stop_worker_s)  # the fault's duration
            finally:
                os.kill(pid, signal.SIGCONT)
            return f"worker of partition {partition} (pid {pid}) for " \
                   f"{self.config.stop_worker_s:g} s"
        if kind == "kill_all_workers":
            pids = broker.wait_workers()
            self._strike()
            for pid in pids.values():
                os.kill(pid, signal.SIGKILL)
            return f"{len(pids)} workers"
        if kind in ("kill_supervisor", "hard_restart"):
            self._strike()
            broker.kill(workers=kind == "hard_restart")
            broker.start()
            return "supervisor" + (" and workers" if kind == "hard_restart" else "")
        if kind == "clean_restart":
            self._strike()
            code = broker.stop()
            broker.start()
            return f"SIGTERM (exit {code}), started again"
        if kind == "kill_producer":
            index = self.rng.randrange(self.config.producers)
            process = self.producers[index]
            self._strike()
            process.kill()
            process.join(CHILD_STOP_TIMEOUT_S)
            self._start_producer(index)
            return f"producer p{index} (pid {process.pid})"
        if kind == "kill_member":
            group = self.rng.randrange(len(GROUPS))
            member = self.rng.randrange(self.config.members_per_group)
            process = self.members[(group, member)]
            self._strike()
            process.kill()
            process.join(CHILD_STOP_TIMEOUT_S)
            self._start_member(group, member)
            return f"member {GROUPS[group]}.m{member} (pid {process.pid})"
        raise ValueError(f"unknown fault kind {kind!r}")

    def run(self) -> SoakResult:
        from shmbroker import Admin

        config = self.config
        self.work.mkdir(parents=True, exist_ok=True)
        self.broker.start()
        with Admin(self.data_dir) as admin:
            admin.create_topic(TOPIC, partitions=config.partitions)
        self.broker.wait_workers()
        faults: list[FaultRecord] = []
        errors: list[str] = []
        started = time.monotonic()
        try:
            for group in range(len(GROUPS)):
                for member in range(config.members_per_group):
                    self._start_member(group, member)
            for index in range(config.producers):
                self._start_producer(index)
            started = time.monotonic()
            started_ns = time.monotonic_ns()
            if not self._wait_recovered(started_ns):
                raise RuntimeError("the producers and groups did not get going in "
                                   f"{RECOVERY_TIMEOUT_S:.0f} s")
            for at_s, kind in schedule(config):
                while time.monotonic() < started + at_s:
                    self._check_children()
                    time.sleep(0.01)
                detail = self.inject(kind)
                fault_ns = self.struck_ns
                record = FaultRecord(kind, round((fault_ns - started_ns) / 1e9, 3), detail,
                                     started_ns=fault_ns)
                if self._wait_recovered(fault_ns):
                    record.recovered_ns = time.monotonic_ns()
                    record.recover_s = round((record.recovered_ns - fault_ns) / 1e9, 3)
                faults.append(record)
                self.say(f"{record.at_s:8.1f} s  {kind:<17} {detail}: " + (
                    f"recovered in {record.recover_s:.2f} s" if record.recover_s is not None
                    else f"NOT RECOVERED in {RECOVERY_TIMEOUT_S:.0f} s"))
                if record.recover_s is None:
                    errors.append(f"{kind} at {record.at_s} s did not recover")
                    break
            while time.monotonic() < started + config.duration_s:
                self._check_children()
                time.sleep(0.05)
            self.say("stopping the producers; the groups consume to the end")
            self.stop_producers.set()
            for process in self.producers:
                process.join(CHILD_STOP_TIMEOUT_S)
            self.broker.wait_workers()
            if not self._drained():
                errors.append(f"the groups did not commit up to the log end in "
                              f"{DRAIN_TIMEOUT_S:.0f} s")
        except RuntimeError as error:
            errors.append(str(error))
        finally:
            self.stop_producers.set()
            self.stop_members.set()
            join_or_kill([*self.producers, *self.members.values()], CHILD_STOP_TIMEOUT_S)
            if self.broker.process is not None:
                self.broker.stop()
        return self._verdict(faults, errors, time.monotonic() - started)

    def _drained(self) -> bool:
        """Every group committed up to the log end of every partition."""
        from shmbroker import Admin
        from shmbroker.errors import ShmbrokerError

        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                with Admin(self.data_dir) as admin:
                    described = [admin.describe_consumer_group(group) for group in GROUPS]
            except ShmbrokerError:
                described = []
            if described and all(
                    len([p for p in d["partitions"] if p["topic"] == TOPIC])
                    == self.config.partitions
                    and all(p["lag"] == 0 for p in d["partitions"] if p["topic"] == TOPIC)
                    for d in described):
                return True
            time.sleep(0.05)
        return False

    # accounting
    def _verdict(self, faults: list[FaultRecord], errors: list[str],
                 elapsed: float) -> SoakResult:
        acked = _read_rows(sorted(self.work.glob("p*.acked")), len(ACKED_COLUMNS))
        consumed = {group: _read_rows(sorted(self.work.glob(f"{group}.m*.consumed")),
                                      len(CONSUMED_COLUMNS)) for group in GROUPS}
        summaries: collections.Counter[str] = collections.Counter()
        for path in self.work.glob("p*.summary.json"):
            summaries.update(json.loads(path.read_text()))
        accounting = account(acked, consumed)
        summaries.pop("sent", None)
        producers = {"sent": sum(self.progress[PRODUCER_SLOTS * i + 2]
                                 for i in range(self.config.producers)),
                     "acknowledged": len(acked),
                     "incarnations": sum(self.incarnations[f"p{i}"]
                                         for i in range(self.config.producers)),
                     "outcomes": dict(summaries)}
        latency = Histogram()
        firsts = accounting.pop("first_latencies_ns")
        if len(firsts):
            latency.record_many(firsts)
        all_rows = np.concatenate(list(consumed.values())) if consumed else np.empty((0, 6))
        for fault in faults:
            if fault.recover_s is None or not len(all_rows):
                continue
            window = (all_rows[:, 4] >= fault.started_ns) & (all_rows[:, 4] <= fault.recovered_ns)
            if window.any():
                fault.max_latency_ms = round(float(
                    (all_rows[window, 5] - all_rows[window, 4]).max()) / 1e6, 1)
        return SoakResult(self.config, round(elapsed, 3), faults, producers,
                          accounting["groups"], accounting["misplaced"],
                          accounting["stored_twice"], latency, errors=errors)


def _read_rows(paths: list[Path], columns: int) -> np.ndarray:
    """The int64 rows of these files; a torn last row (a SIGKILLed writer) is left out."""
    parts = []
    row_bytes = 8 * columns
    for path in paths:
        data = path.read_bytes()
        whole = len(data) - len(data) % row_bytes
        parts.append(np.frombuffer(data[:whole], dtype=np.int64).reshape(-1, columns))
    return np.concatenate(parts) if parts else np.empty((0, columns), dtype=np.int64)


def _identity(producer_ids: np.ndarray, seqs: np.ndarray) -> np.ndarray:
    return (producer_ids.astype(np.int64) << 40) | seqs.astype(np.int64)


def _position(partitions: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    return (partitions.astype(np.int64) << 48) | offsets.astype(np.int64)


def account(acked: np.ndarray, consumed: dict[str, np.ndarray]) -> dict[str, Any]:
    """The verdict from the rows, vectorised: per group the records consumed, the offsets they
    cover, ``lost`` (acknowledged, never consumed by the group), ``redelivered`` (consumed more
    than once) and ``unacknowledged_stored``; across groups ``misplaced`` (an offset where two
    groups saw different records, or an acknowledged record consumed somewhere else than its
    acknowledged offset) and ``stored_twice`` (one record at two offsets); and the latency
    (ns) of each offset's first consumption by each group."""
    acked_ids = _identity(acked[:, 0], acked[:, 1])
    acked_positions = _position(acked[:, 2], acked[:, 3])
    groups: dict[str, dict[str, int]] = {}
    pairs = []  # (offset, record) as each group saw it
    latencies = []
    for group, rows in consumed.items():
        ids = _identity(rows[:, 2], rows[:, 3])
        positions = _position(rows[:, 0], rows[:, 1])
        order = np.lexsort((rows[:, 5], positions))  # by offset, then by consumption time
        firsts = order[np.r_[True, positions[order][1:] != positions[order][:-1]]] \
            if len(order) else order
        latencies.append(rows[firsts, 5] - rows[firsts, 4])
        pairs.append(np.stack([positions, ids], axis=1))
        unique_ids = np.unique(ids)
        groups[group] = {"consumed": len(rows), "unique": len(firsts),
                         "lost": int((~np.isin(acked_ids, unique_ids)).sum()),
                         "redelivered": len(rows) - len(firsts),
                         "unacknowledged_stored": int((~np.isin(unique_ids, acked_ids)).sum())}
    seen = np.unique(np.concatenate(pairs), axis=0) if pairs else np.empty((0, 2), np.int64)
    positions, first, per_position = np.unique(seen[:, 0], return_index=True,
                                               return_counts=True)
    stored_ids = seen[first, 1]  # the record at each offset (the first, if groups disagree)
    at = np.searchsorted(positions, acked_positions).clip(0, max(len(positions) - 1, 0))
    holds = (positions[at] == acked_positions) & (stored_ids[at] == acked_ids) \
        if len(positions) else np.zeros(len(acked_ids), dtype=bool)
    elsewhere = ~holds & np.isin(acked_ids, stored_ids)
    _, per_record = np.unique(stored_ids, return_counts=True)
    return {"groups": groups,
            "misplaced": int((per_position > 1).sum()) + int(elsewhere.sum()),
            "stored_twice": int((per_record - 1).sum()),
            "first_latencies_ns": np.concatenate(latencies) if latencies else np.empty(0)}


def fault_table(faults: list[FaultRecord]) -> list[dict[str, Any]]:
    """Per fault kind: count, time to recover (median, max) and the worst end-to-end latency
    of a record meant to be sent while the broker was recovering."""
    rows = []
    for kind in FAULT_KINDS:
        mine = [fault for fault in faults if fault.kind == kind]
        if not mine:
            continue
        recovered = [fault.recover_s for fault in mine if fault.recover_s is not None]
        latencies = [fault.max_latency_ms for fault in mine if fault.max_latency_ms is not None]
        rows.append({"kind": kind, "count": len(mine), "not_recovered": len(mine) - len(recovered),
                     "recover_s_median": float(np.median(recovered)) if recovered else None,
                     "recover_s_max": max(recovered) if recovered else None,
                     "max_latency_ms": max(latencies) if latencies else None})
    return rows


def report(result: SoakResult) -> list[str]:
    config = result.config
    lines = [f"soak: {result.elapsed_s:,.0f} s, seed {config.seed}; topic of "
             f"{config.partitions} partitions, {config.producers} producers at "
             f"{config.rate_per_producer_per_s:,}/s (acks {config.acks}), groups "
             f"{', '.join(GROUPS)} of {config.members_per_group} members; a fault every "
             f"~{config.fault_interval_s:g} s", "",
             f"{'fault':<18}{'count':>6}{'recover median':>16}{'recover max':>13}"
             f"{'max latency in recovery':>25}"]
    for row in fault_table(result.faults):
        median = f"{row['recover_s_median']:.2f} s" if row["recover_s_median"] is not None \
            else "-"
        worst = f"{row['recover_s_max']:.2f} s" if row["recover_s_max"] is not None else "-"
        latency = f"{row['max_latency_ms']:,.0f} ms" if row["max_latency_ms"] is not None \
            else "-"
        lines.append(f"{row['kind']:<18}{row['count']:>6}{median:>16}{worst:>13}{latency:>25}"
                     + (f"  ({row['not_recovered']} NOT RECOVERED)" if row["not_recovered"]
                        else ""))
    producers = result.producers
    outcomes = ", ".join(f"{key} {value:,}" for key, value in sorted(
        producers["outcomes"].items()) if value)
    lines += ["", f"records: sent {producers['sent']:,}, acknowledged "
                  f"{producers['acknowledged']:,} (producer incarnations "
                  f"{producers['incarnations']})"
              + (f"; outcomes of the closed producers: {outcomes}" if outcomes else "")]
    for group, counts in result.groups.items():
        lines.append(f"group {group}: consumed {counts['consumed']:,} ({counts['unique']:,} "
                     f"offsets), lost {counts['lost']:,}, redelivered "
                     f"{counts['redelivered']:,}, stored but unacknowledged "
                     f"{counts['unacknowledged_stored']:,}")
    lines.append(f"acknowledged records not at their offset: {result.misplaced:,}; records "
                 f"stored twice: {result.stored_twice:,}")
    lines.append("redelivered = consumed again after a member was killed or lost its "
                 "partitions with the supervisor (at least once: the new owner starts at the "
                 "last commit); stored but unacknowledged = sends whose acknowledgement a fault "
                 "cut off or that a killed producer never saw")
    if result.latency.count:
        ps = result.latency.percentiles([50, 99, 99.9, 100])
        lines.append("latency, intended send -> first consumed (ms): " + "  ".join(
            f"{'max' if p == 100 else f'p{p:g}'} {value / 1e6:,.1f}" for p, value in ps.items()))
    lines += [f"ERROR: {error}" for error in result.errors]
    lines.append("verdict: " + ("OK: nothing acknowledged was lost" if result.ok else "FAILED"))
    return lines


def run_soak(config: SoakConfig, work_dir: Path | None = None,
             say: Callable[[str], None] = lambda line: None) -> SoakResult:
    """Run a soak in ``work_dir`` (default: a temp dir, removed after a run that passed)."""
    temp = work_dir is None
    work = Path(tempfile.mkdtemp(prefix="shmbroker-soak-")) if work_dir is None else work_dir
    result = Soak(config, work, say).run()
    if temp and result.ok:
        shutil.rmtree(work, ignore_errors=True)
    else:
        result.work_dir = str(work)
    return result
