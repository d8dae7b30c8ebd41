"""Produce-consume-validate under faults, as Kafka's system tests do.

A real broker serves one topic of 4 partitions.  Producer *processes* (``fault_producer.py``)
send sequence-numbered records (value ``b"<producer>:<seq>"``, no key, partition
``seq % 4``) and log every acknowledged ``(seq, partition, offset)``; a consumer-group member
consumes the topic all along.  Once some records are acknowledged, a fault is injected while the
producers keep sending; after it, the producers go on until each has had more records
acknowledged, then stop.  Then the validation:

* the log is read back from offset 0 of every partition (CRC-checked): offsets dense from 0, no
  corrupt record (a value that is not ``<known producer>:<seq>`` in its partition, a key, a
  header), no value stored twice (acks=1 and "all" through shared-memory rings are exactly-once
  across worker and broker crashes; only the socket fallback, not used here, is at-least-once);
* every acknowledged record sits exactly once, at its acknowledged offset;
* each producer's records are in increasing seq order within a partition;
* the group member consumed every offset up to the end, each with the value the log holds
  (at least once: a member whose partitions were lost with the supervisor consumes again from
  the last auto-commit, which is not an error), and closing it committed the end offsets;
* once every producer closed (or was killed), the workers removed all their rings.

The faults: SIGKILL one worker, all workers at once, SIGSTOP a worker for 2 s, and for three
times as long as the clients' request and delivery timeouts, SIGKILL the
supervisor (its workers die with it) and start it again, a clean restart (SIGTERM), a hard
restart (SIGKILL everything) and SIGKILL a producer; acks=1 for each, acks="all" for two.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from broker_helpers import RunningBroker, wait_for
from integration.produce_helpers import read_partitions

from shmbroker import Consumer, Record, TopicPartition
from shmbroker.errors import ClosedError, ShmbrokerError
from shmbroker.shm import names

pytestmark = [pytest.mark.integration, pytest.mark.fault]

TOPIC = "validate"
PARTITIONS = 4
PRODUCERS = ("p0", "p1")
RATE_PER_S = 1500  # per producer
VICTIM_RATE_PER_S = 6000  # the producer to be SIGKILLed: busy writing into its rings
IN_FLIGHT_MAX = 3000
ACKED_BEFORE_FAULT = 600  # per producer, before the fault
ACKED_AFTER_FAULT = 900  # per surviving producer, after the fault
RECORDS_MAX = 20_000  # per producer: a bound on the load, not a target
DURATION_S_MAX = 60.0
STOP_WORKER_S = 2.0
# stop_worker_past_timeouts: the clients give up on a request after CLIENT_TIMEOUT_MS, and the
# worker stays stopped three times as long
CLIENT_TIMEOUT_MS = 1000
STOP_WORKER_PAST_TIMEOUTS_S = 3 * CLIENT_TIMEOUT_MS / 1000
ACK_WAIT_S = 45.0
RESTART_TIMEOUT_S = 20.0
RING_RELEASE_TIMEOUT_S = 10.0  # a worker checks a ring's producer is alive once a second
PROCESS_TIMEOUT_S = 60.0
READ_TIMEOUT_S = 30.0
POLL_MS = 200
SCRIPT = Path(__file__).with_name("fault_producer.py")
VALUE = re.compile(rb"(p\d+):(\d+)")


# -- the producer processes ----------------------------------------------------------------------
class ProducerProcess:
    """One ``fault_producer.py`` process and the files it writes."""

    def __init__(self, work: Path, data_dir: Path, name: str, acks: int | str,
                 rate_per_s: int = RATE_PER_S, timeout_ms: int | None = None) -> None:
        self.name = name
        self.out = work / f"{name}.acked.jsonl"
        self.summary_path = work / f"{name}.summary.json"
        self.log_path = work / f"{name}.log"
        self.stop_path = work / "stop"
        self.spec = {"data_dir": os.fspath(data_dir), "topic": TOPIC, "name": name,
                     "partitions": PARTITIONS, "acks": acks, "out": os.fspath(self.out),
                     "summary": os.fspath(self.summary_path), "stop": os.fspath(self.stop_path),
                     "records_max": RECORDS_MAX, "duration_s_max": DURATION_S_MAX,
                     "rate_per_s": rate_per_s, "in_flight_max": IN_FLIGHT_MAX}
        if timeout_ms is not None:
            self.spec.update(max_block_ms=timeout_ms, delivery_timeout_ms=timeout_ms,
                             request_timeout_ms=timeout_ms)
        self.process: subprocess.Popen[bytes] | None = None
        self.killed = False

    def start(self) -> ProducerProcess:
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, os.fspath(SCRIPT), json.dumps(self.spec)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def check_alive(self) -> None:
        assert self.process is not None
        if not self.killed and self.process.poll() is not None:
            raise AssertionError(f"producer {self.name} exited with {self.process.returncode}:\n"
                                 f"{self.log()}")

    def acked_count(self) -> int:
        """Acknowledged records it logged so far (complete lines)."""
        self.check_alive()
        with contextlib.suppress(FileNotFoundError):
            return self.out.read_bytes().count(b"\n")
        return 0

    def acked(self) -> list[tuple[int, int, int]]:
        """Its (seq, partition, offset) triples; a torn last line (SIGKILL) is left out."""
        data = self.out.read_bytes()
        lines = data.split(b"\n")[:-1]  # the part after the last newline is not a whole line
        acked = []
        for line in lines:
            row = json.loads(line)
            acked.append((row["seq"], row["partition"], row["offset"]))
        return acked

    def kill(self) -> None:
        assert self.process is not None
        self.killed = True
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(PROCESS_TIMEOUT_S)

    def finish(self) -> dict[str, Any]:
        """Wait for it to stop (the stop file exists); its summary."""
        assert self.process is not None
        try:
            code = self.process.wait(PROCESS_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"producer {self.name} did not stop in {PROCESS_TIMEOUT_S} s:"
                                 f"\n{self.log()}") from None
        assert code == 0, f"producer {self.name} exited with {code}:\n{self.log()}"
        summary: dict[str, Any] = json.loads(self.summary_path.read_text())
        return summary

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-4000:]
        return ""

    def end(self) -> None:
        """Teardown: make sure the process we started is gone."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(PROCESS_TIMEOUT_S)


# -- the group member ------------------------------------------------------------------------------
class GroupMember:
    """A thread consuming the topic as the only member of group "validate" through the fault;
    keeps what it consumed by (partition, offset)."""

    def __init__(self, data_dir: Path, request_timeout_ms: int = 30_000) -> None:
        self.data_dir = data_dir
        self.request_timeout_ms = request_timeout_ms
        self.consumed: dict[tuple[int, int], bytes | None] = {}
        self.mismatches: list[tuple[int, int, bytes | None, bytes | None]] = []
        self.again = 0  # records consumed more than once (allowed: at least once)
        self.errors: collections.Counter[str] = collections.Counter()
        self.failure: BaseException | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="group-member", daemon=True)

    def start(self) -> GroupMember:
        self._thread.start()
        return self

    def _consumer(self) -> Consumer:
        while True:
            try:
                consumer = Consumer(self.data_dir, group_id="validate",
                                    auto_offset_reset="earliest", auto_commit_interval_ms=500,
                                    request_timeout_ms=self.request_timeout_ms)
                consumer.subscribe([TOPIC])
                return consumer
            except ShmbrokerError as error:  # no broker at the moment
                self.errors["create:" + type(error).__name__] += 1
                if self._stop.wait(0.05):
                    raise

    def _run(self) -> None:
        consumer: Consumer | None = None
        try:
            consumer = self._consumer()
            while not self._stop.is_set():
                try:
                    records = consumer.poll(timeout_ms=POLL_MS)
                except ClosedError as error:
                    self.errors["poll:" + type(error).__name__] += 1
                    with contextlib.suppress(ShmbrokerError, OSError):
                        consumer.close()
                    consumer = self._consumer()
                    continue
                except ShmbrokerError as error:  # the broker is being restarted
                    self.errors["poll:" + type(error).__name__] += 1
                    self._stop.wait(0.05)
                    continue
                with self._lock:
                    for record in records:
                        key = (record.partition, record.offset)
                        seen = self.consumed.get(key, self)
                        if seen is self:
                            self.consumed[key] = record.value
                        else:
                            self.again += 1
                            if seen != record.value:
                                self.mismatches.append((*key, seen, record.value))  # type: ignore[arg-type]
        except BaseException as error:  # noqa: BLE001 - reported by finish()
            self.failure = error
        finally:
            if consumer is not None:
                with contextlib.suppress(ShmbrokerError, OSError):
                    consumer.close()

    def has_consumed(self, ends: dict[int, int]) -> bool:
        assert self.failure is None, f"the group member failed: {self.failure!r}"
        with self._lock:
            counts = collections.Counter(p for p, offset in self.consumed if offset < ends[p])
        return all(counts[p] == end for p, end in ends.items())

    def finish(self, ends: dict[int, int]) -> None:
        """Wait until it consumed every offset below ``ends``, then stop it."""
        try:
            wait_for(lambda: self.has_consumed(ends), READ_TIMEOUT_S,
                     message=f"the group member to consume up to {ends}")
        finally:
            self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(PROCESS_TIMEOUT_S)


# -- reading the log back ------------------------------------------------------------------------
def read_log(data_dir: Path) -> dict[int, list[Record]]:
    """Every record of the topic, from offset 0 to the end offsets as they are now."""
    wanted = [TopicPartition(TOPIC, p) for p in range(PARTITIONS)]
    with Consumer(data_dir) as consumer:
        assert consumer.beginning_offsets(wanted) == dict.fromkeys(wanted, 0)
    return read_partitions(data_dir, TOPIC, range(PARTITIONS), READ_TIMEOUT_S)


def rings_left(data_dir: Path) -> list[str]:
    """The produce rings of the topic still in /dev/shm."""
    prefix = names.shm_prefix(data_dir)
    return [name for name in names.list_names(prefix) if re.search(r"\.r[0-9a-f]{16}$", name)]


def committed_offsets(data_dir: Path) -> dict[int, int | None]:
    wanted = [TopicPartition(TOPIC, p) for p in range(PARTITIONS)]
    with Consumer(data_dir, group_id="validate") as consumer:
        return {tp.partition: offset for tp, offset in consumer.committed(wanted).items()}


def validate(stored: dict[int, list[Record]],
             acked: dict[str, list[tuple[int, int, int]]]) -> tuple[list[str], dict[str, int]]:
    """The failures (empty when the run is right) and some counts."""
    failures: list[str] = []
    by_position: dict[tuple[int, int], bytes | None] = {}
    values: collections.Counter[bytes | None] = collections.Counter()
    corrupt = []
    order: dict[tuple[str, int], list[int]] = collections.defaultdict(list)
    for partition, records in stored.items():
        offsets = [record.offset for record in records]
        if offsets != list(range(len(offsets))):
            failures.append(f"partition {partition}: offsets not dense from 0: "
                            f"{_first_gap(offsets)}")
        for record in records:
            by_position[(partition, record.offset)] = record.value
            values[record.value] += 1
            match = VALUE.fullmatch(record.value or b"")
            if (match is None or match[1].decode() not in acked or record.key is not None
                    or record.headers or int(match[2]) % PARTITIONS != partition):
                corrupt.append((partition, record.offset, record.key, record.value,
                                record.headers))
                continue
            order[(match[1].decode(), partition)].append(int(match[2]))
    if corrupt:
        failures.append(f"{len(corrupt)} corrupt record(s) (partition, offset, key, value, "
                        f"headers): {corrupt[:5]}")
    duplicates = {value: count for value, count in values.items() if count > 1}
    if duplicates:
        examples = [(value, [pos for pos, v in by_position.items() if v == value])
                    for value in list(duplicates)[:5]]
        failures.append(f"{sum(duplicates.values()) - len(duplicates)} duplicate(s): "
                        f"{len(duplicates)} value(s) stored more than once, e.g. "
                        f"(value, [(partition, offset), ...]) {examples}")
    for (name, partition), seqs in sorted(order.items()):
        backwards = [(a, b) for a, b in zip(seqs, seqs[1:]) if b <= a]
        if backwards:
            failures.append(f"{name} in partition {partition}: seqs out of order at "
                            f"{backwards[:5]}")
    missing = []
    for name, triples in acked.items():
        for seq, partition, offset in triples:
            want = b"%s:%d" % (name.encode(), seq)
            found = by_position.get((partition, offset))
            if found != want:
                missing.append((want, partition, offset, found))
    if missing:
        failures.append(f"{len(missing)} acknowledged record(s) not at their acknowledged "
                        f"offset, e.g. (value, partition, offset, found) {missing[:5]}")
    counts = {"stored": sum(len(records) for records in stored.values()),
              "acked": sum(len(triples) for triples in acked.values()),
              "duplicates": sum(duplicates.values()) - len(duplicates),
              "corrupt": len(corrupt), "missing": len(missing)}
    return failures, counts


def _first_gap(offsets: list[int]) -> str:
    for index, offset in enumerate(offsets):
        if offset != index:
            return f"offset {offset} at position {index} (of {len(offsets)})"
    return f"{len(offsets)} offsets"


# -- the faults ------------------------------------------------------------------------------------
def _workers(broker: RunningBroker) -> dict[int, int]:
    """partition -> worker pid, once every worker runs."""
    def running() -> dict[int, int] | None:
        with broker.admin() as admin:
            workers = admin.status()["workers"]
        if all(w["state"] == "running" and w["pid"] for w in workers):
            return {w["partition"]: w["pid"] for w in workers if w["topic"] == TOPIC}
        return None

    return wait_for(running, RESTART_TIMEOUT_S, message="every worker running")


def _wait_replaced(broker: RunningBroker, old: dict[int, int]) -> None:
    def replaced() -> bool:
        with broker.admin() as admin:
            workers = {w["partition"]: w for w in admin.status()["workers"]
                       if w["topic"] == TOPIC}
        return all(workers[p]["state"] == "running" and workers[p]["pid"] not in (None, pid)
                   for p, pid in old.items())

    wait_for(replaced, RESTART_TIMEOUT_S, message=f"new workers for partitions {sorted(old)}")


def kill_one_worker(broker: RunningBroker, producers: list[ProducerProcess]) -> None:
    pid = _workers(broker)[1]
    os.kill(pid, signal.SIGKILL)
    _wait_replaced(broker, {1: pid})


def kill_all_workers(broker: RunningBroker, producers: list[ProducerProcess]) -> None:
    pids = _workers(broker)
    for pid in pids.values():
        os.kill(pid, signal.SIGKILL)
    _wait_replaced(broker, pids)


def stop_worker(broker: RunningBroker, producers: list[ProducerProcess]) -> None:
    pid = _workers(broker)[2]
    os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(STOP_WORKER_S)  # the fault's duration, not a wait for a condition
    finally:
        os.kill(pid, signal.SIGCONT)
    assert _workers(broker)[2] == pid, "the stopped worker was replaced"


def stop_worker_past_timeouts(broker: RunningBroker, producers: list[ProducerProcess]) -> None:
    """SIGSTOP a worker for longer than the clients wait for an answer (the test gives them
    CLIENT_TIMEOUT_MS): their requests to it time out, the records they wrote into its ring
    wait there, and when it runs again it appends them (acknowledged or not, never twice)."""
    pid = _workers(broker)[2]
    os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(STOP_WORKER_PAST_TIMEOUTS_S)  # the fault's duration
    finally:
        os.kill(pid, signal.SIGCONT)
    assert _workers(broker)[2] == pid, "the stopped worker was replaced"


def kill_supervisor(broker: RunningBroker, producers: list[ProducerProcess]) -> None:
    assert broker.process is not None
    workers = [psutil.Process(pid) for pid in _workers(broker).values()]
    broker.process.kill()
    broker.process.wait(RESTART_TIMEOUT_S)
    _, alive = psutil.wait_procs(workers, timeout=RESTART_TIMEOUT_S)
    for worker in alive:  # ours to end: we started the broker
        with contextlib.suppress(psutil.NoSuchProcess):
            worker.kill()
    assert not alive, f"workers {[w.pid for w in alive]} outlived their supervisor"
    broker.process = None
    broker.start()


def clean_restart(broker: RunningBroker, producers: list[ProducerProcess]) -> None:
    assert broker.stop() == 0, broker.log()[-4000:]
    broker.start()


def hard_restart(broker: RunningBroker, producers: list[ProducerProcess]) -> None:
    broker.kill()
    broker.start()


def kill_producer(broker: RunningBroker, producers: list[ProducerProcess]) -> None:
    """SIGKILL the last producer (it sends 4 times faster: more often mid-write)."""
    producers[-1].kill()


FAULTS: dict[str, Callable[[RunningBroker, list[ProducerProcess]], None]] = {
    fault.__name__: fault for fault in (kill_one_worker, kill_all_workers, stop_worker,
                                        stop_worker_past_timeouts, kill_supervisor,
                                        clean_restart, hard_restart, kill_producer)}
CASES = [pytest.param(name, 1, id=f"{name}-acks1") for name in FAULTS]
CASES.append(pytest.param("kill_all_workers", "all", id="kill_all_workers-acksall"))
CASES.append(pytest.param("hard_restart", "all", id="hard_restart-acksall"))


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[RunningBroker]:
    with RunningBroker(tmp_path / "data") as running:
        yield running


# -- the test ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("fault", "acks"), CASES)
def test_produce_consume_validate(broker: RunningBroker, tmp_path: Path, fault: str,
                                  acks: int | str) -> None:
    with broker.admin() as admin:
        admin.create_topic(TOPIC, partitions=PARTITIONS)
    broker.wait_ready()
    timeout_ms = CLIENT_TIMEOUT_MS if fault == "stop_worker_past_timeouts" else None
    member = GroupMember(broker.data_dir, request_timeout_ms=timeout_ms or 30_000).start()
    producers = [ProducerProcess(tmp_path, broker.data_dir, name, acks, timeout_ms=timeout_ms)
                 for name in PRODUCERS]
    if fault == "kill_producer":
        producers[-1] = ProducerProcess(tmp_path, broker.data_dir, PRODUCERS[-1], acks,
                                        rate_per_s=VICTIM_RATE_PER_S)
    try:
        for producer in producers:
            producer.start()
        wait_for(lambda: all(p.acked_count() >= ACKED_BEFORE_FAULT for p in producers),
                 ACK_WAIT_S, interval_s=0.02, message=f"{ACKED_BEFORE_FAULT} acks per producer")
        at_fault = {p.name: p.acked_count() for p in producers}

        FAULTS[fault](broker, producers)

        survivors = [p for p in producers if not p.killed]
        wait_for(lambda: all(p.acked_count() >= at_fault[p.name] + ACKED_AFTER_FAULT
                             for p in survivors),
                 ACK_WAIT_S, interval_s=0.02,
                 message=f"{ACKED_AFTER_FAULT} more acks per producer after the fault")
        producers[0].stop_path.touch()
        summaries = {p.name: p.finish() for p in survivors}
        acked = {p.name: p.acked() for p in producers}

        stored = read_log(broker.data_dir)
        ends = {p: len(records) for p, records in stored.items()}
        member.finish(ends)  # closing it commits its positions, the end offsets
        committed = committed_offsets(broker.data_dir)
        # Every producer closed or died: the workers remove their rings.
        wait_for(lambda: not rings_left(broker.data_dir), RING_RELEASE_TIMEOUT_S,
                 message="the workers to remove the rings of closed and dead producers")
    finally:
        member.stop()
        for producer in producers:
            producer.end()

    failures, counts = validate(stored, acked)
    for name, summary in summaries.items():
        if summary["wrong_metadata"]:
            failures.append(f"{name}: acks with a wrong topic or partition: "
                            f"{summary['wrong_metadata']}")
    consumed_wrong = [(p, o, value, stored[p][o].value)
                      for (p, o), value in member.consumed.items()
                      if o < len(stored[p]) and stored[p][o].value != value]
    if member.mismatches or consumed_wrong:
        failures.append(f"the group member consumed values the log does not hold at their "
                        f"offsets: {(member.mismatches + consumed_wrong)[:5]}")
    if committed != ends:
        failures.append(f"group 'validate' committed {committed} on close, not the end offsets "
                        f"{ends} it consumed up to")
    report = (f"{fault} acks={acks}: {counts}; producers "
              f"{ {name: s['counts'] for name, s in summaries.items()} }; group member "
              f"consumed {len(member.consumed)} (again {member.again}, errors "
              f"{dict(member.errors)})")
    print(report)
    assert not failures, "\n".join([report, *failures])
    assert counts["acked"] >= len(producers) * ACKED_BEFORE_FAULT + ACKED_AFTER_FAULT
