#!/usr/bin/env python3
"""Consumer groups (issue 4): how fast a group heals, grows, and commits.

Three measurements against a real broker (``shmbroker serve`` in a temp dir), with member
processes that each run one :class:`shmbroker.Consumer` subscribed to a 64-partition topic while
a producer process sends one record to every partition every ``--produce-interval-ms``:

* **takeover** -- SIGKILL one of 4 members; the time until *every* partition it owned has been
  consumed again by the others (the member's connection closes at once, so the supervisor knows
  in microseconds; Kafka's default waits for its 45 s session timeout).  Goal p50 <= 100 ms.
* **join** -- a 5th member subscribes to the 4-member group; the time from its ``subscribe`` call
  to its first record, and until it has consumed from every partition it was given, while the
  others keep consuming the partitions they keep (their longest pause is reported too).
  Goal <= 200 ms.
* **commits** -- 16 committing consumer processes (each its own group, one assigned partition)
  commit as fast as they can: with ``commit_async`` (pipelined, up to 1,024 in flight each) and
  with ``commit`` (one at a time); durable commits acknowledged per second.  Goal >= 50,000/s.

Times are CLOCK_MONOTONIC, comparable across the processes of one host.  Each round repeats
join, then takeover; medians over rounds are printed.  Run from the repository root:

    python bench/groups.py                  # 5 rounds; 3 commit rounds of 3 s per mode
    python bench/groups.py --rounds 0 --commit-rounds 7   # commits only
    python bench/groups.py --assignor range # the members' assignor (default sticky)
    python bench/groups.py --rounds 9 --json groups.json
"""

from __future__ import annotations

import argparse
import contextlib
import os
import selectors
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import orjson

TOPIC = "telemetry"
GROUP = "bench-group"
PARTITIONS = 64
MEMBERS = 4
COMMITTERS = 16
GOALS = {"takeover_ms": 100, "join_all_ms": 200, "commits_per_s": 50_000}


# -- member process ---------------------------------------------------------------------------
def member(data_dir: str, name: str, assignor: str) -> None:
    """Subscribe, poll, and report every assignment change and poll with records as JSON lines
    on stdout: {"ev", "t" (monotonic s), "parts"}.  SIGTERM: close (leave the group) and exit."""
    from shmbroker import Consumer

    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    out = sys.stdout.buffer

    def emit(event: str, parts: Any) -> None:
        out.write(orjson.dumps({"ev": event, "t": time.monotonic(), "m": name,
                                "parts": sorted(parts)}) + b"\n")
        out.flush()

    class Listener:
        def on_partitions_assigned(self, assigned: set[Any]) -> None:
            emit("assigned", [tp.partition for tp in assigned])

        def on_partitions_revoked(self, revoked: set[Any]) -> None:
            emit("revoked", [tp.partition for tp in revoked])

    consumer = Consumer(data_dir, group_id=GROUP, auto_offset_reset="latest",
                        auto_commit_interval_ms=1000, assignor=assignor)
    emit("subscribing", [])
    consumer.subscribe([TOPIC], listener=Listener())
    try:
        while not stopping.is_set():
            parts = {record.partition for record in consumer.poll(50)}
            if parts:
                emit("consumed", parts)
    finally:
        consumer.close()


# -- commit process ---------------------------------------------------------------------------
def committer(data_dir: str, index: int, seconds: float, mode: str) -> None:
    """Commit increasing offsets of one partition for ``seconds``; print commits acknowledged.
    Says "ready" once connected and warm, then starts at the time read from stdin (the same
    for every committer, once all are ready: no process is still starting while others
    measure)."""
    from shmbroker import Consumer, TopicPartition

    tp = TopicPartition(TOPIC, index % PARTITIONS)
    acknowledged = 0
    failed = 0

    def done(offsets: Any, error: Exception | None) -> None:
        nonlocal acknowledged, failed
        if error is None:
            acknowledged += 1
        else:
            failed += 1

    with Consumer(data_dir, group_id=f"bench-commits-{index}",
                  enable_auto_commit=False) as consumer:
        consumer.assign([tp])
        consumer.commit({tp: 0})  # connected and warm before the clock starts
        print("ready", flush=True)
        start_at = float(sys.stdin.readline())
        while time.monotonic() < start_at:
            time.sleep(0.001)
        began = time.monotonic()
        deadline = began + seconds
        offset = 1
        if mode == "async":
            while time.monotonic() < deadline:
                for _ in range(64):
                    consumer.commit_async({tp: offset}, done)
                    offset += 1
            consumer.commit({tp: offset})  # waits for the asynchronous ones (ordering), runs
            acknowledged += 1               # their callbacks
        else:
            while time.monotonic() < deadline:
                consumer.commit({tp: offset})
                offset += 1
                acknowledged += 1
            offset -= 1  # the last one committed
        elapsed = time.monotonic() - began
        committed = consumer.committed([tp])[tp]
    print(orjson.dumps({"acknowledged": acknowledged, "failed": failed, "elapsed_s": elapsed,
                        "last": offset, "committed": committed}).decode(), flush=True)


# -- the driver -------------------------------------------------------------------------------
class Members:
    """Member processes and what they reported."""

    def __init__(self, data_dir: str, assignor: str) -> None:
        self.data_dir = data_dir
        self.assignor = assignor
        self.selector = selectors.DefaultSelector()
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.owned: dict[str, set[int]] = {}
        self.events: list[dict[str, Any]] = []
        self._buffers: dict[str, bytes] = {}
        self._count = 0

    def start(self) -> str:
        name = f"m{self._count}"
        self._count += 1
        process = subprocess.Popen([sys.executable, __file__, "member", self.data_dir, name,
                                    self.assignor],
                                   stdout=subprocess.PIPE)
        assert process.stdout is not None
        os.set_blocking(process.stdout.fileno(), False)
        self.selector.register(process.stdout, selectors.EVENT_READ, name)
        self.processes[name] = process
        self.owned[name] = set()
        self._buffers[name] = b""
        return name

    def pump(self, timeout_s: float = 0.01) -> None:
        for key, _ in self.selector.select(timeout_s):
            name = key.data
            with contextlib.suppress(BlockingIOError):
                chunk = key.fileobj.read()  # type: ignore[union-attr]
                if not chunk:
                    self.selector.unregister(key.fileobj)
                    continue
                data = self._buffers[name] + chunk
                *lines, self._buffers[name] = data.split(b"\n")
                for line in lines:
                    event = orjson.loads(line)
                    self.events.append(event)
                    if event["ev"] == "assigned":
                        self.owned[name] |= set(event["parts"])
                    elif event["ev"] == "revoked":
                        self.owned[name] -= set(event["parts"])

    def wait(self, condition: Any, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            if time.monotonic() > deadline:
                raise SystemExit(f"timed out after {timeout_s} s waiting for {what}; owned: "
                                 f"{ {name: len(parts) for name, parts in self.owned.items()} }")
            self.pump()

    def live(self) -> list[str]:
        return [name for name, process in self.processes.items() if process.poll() is None]

    def stable(self) -> bool:
        """Every partition owned by exactly one live member, and consumed since it was taken."""
        owned = [self.owned[name] for name in self.live()]
        if sum(len(parts) for parts in owned) != PARTITIONS or set().union(*owned) != set(
                range(PARTITIONS)) or any(not parts for parts in owned):
            return False
        since = max((e["t"] for e in self.events if e["ev"] in ("assigned", "revoked")),
                    default=0.0)
        consumed = {p for e in self.events if e["ev"] == "consumed" and e["t"] > since
                    for p in e["parts"]}
        return consumed == set(range(PARTITIONS))

    def consumed_after(self, t0: float, partitions: set[int], by: set[str]) -> dict[int, float]:
        first: dict[int, float] = {}
        for event in self.events:
            if event["ev"] == "consumed" and event["t"] > t0 and event["m"] in by:
                for p in event["parts"]:
                    if p in partitions and p not in first:
                        first[p] = event["t"]
        return first

    def stop(self, name: str) -> None:
        process = self.processes[name]
        process.terminate()
        deadline = time.monotonic() + 30
        while process.poll() is None and time.monotonic() < deadline:
            self.pump()
        self.owned[name] = set()

    def kill(self, name: str) -> float:
        t0 = time.monotonic()
        self.processes[name].kill()
        self.processes[name].wait()
        self.owned[name] = set()
        return t0

    def close(self) -> None:
        for name in self.live():
            self.processes[name].terminate()
        for process in self.processes.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(30)
            if process.poll() is None:
                process.kill()
                process.wait()


def produce_forever(data_dir: str, interval_s: float) -> None:
    """The producer process: one record to every partition every ``interval_s``, until
    SIGTERM.  Its own process, so that its pace does not depend on this driver's work."""
    from shmbroker import Producer

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with Producer(data_dir, linger_ms=1) as producer:
        while not stop.is_set():
            for partition in range(PARTITIONS):
                producer.send(TOPIC, b"reading", partition=partition)
            stop.wait(interval_s)


def measure_join(members: Members) -> dict[str, float]:
    before = {name: set(parts) for name, parts in members.owned.items()}
    start = len(members.events)
    name = members.start()
    members.wait(lambda: any(e["ev"] == "subscribing" and e["m"] == name
                             for e in members.events[start:]), 60, "the 5th member to start")
    t_subscribe = next(e["t"] for e in members.events[start:]
                       if e["ev"] == "subscribing" and e["m"] == name)
    members.wait(members.stable, 30, "the group to settle after the join")
    given = members.owned[name]
    first = members.consumed_after(t_subscribe, given, {name})
    kept = {p for other, parts in before.items() if other != name
            for p in parts & members.owned[other]}
    # the longest pause of the partitions that did not move, around the rebalance
    window_end = max(first.values())
    times: dict[int, list[float]] = {p: [] for p in kept}
    for event in members.events:
        if event["ev"] == "consumed" and t_subscribe - 0.5 <= event["t"] <= window_end + 0.5:
            for p in event["parts"]:
                if p in times:
                    times[p].append(event["t"])
    gaps = [b - a for stamps in times.values() for a, b in zip(stamps, stamps[1:])]
    # the same partitions' longest pause in an equally long window just before: the baseline
    length = window_end - t_subscribe + 1.0
    before_times: dict[int, list[float]] = {p: [] for p in kept}
    for event in members.events:
        if event["ev"] == "consumed" and t_subscribe - 0.5 - length <= event["t"] < (
                t_subscribe - 0.5):
            for p in event["parts"]:
                if p in before_times:
                    before_times[p].append(event["t"])
    baseline = [b - a for stamps in before_times.values() for a, b in zip(stamps, stamps[1:])]
    return {"join_first_ms": (min(first.values()) - t_subscribe) * 1000,
            "join_all_ms": (window_end - t_subscribe) * 1000,
            "join_partitions": len(given),
            "kept_partitions_max_gap_ms": max(gaps, default=0.0) * 1000,
            "kept_partitions_max_gap_before_ms": max(baseline, default=0.0) * 1000,
            "_member": name}


def measure_takeover(members: Members, victim: str) -> dict[str, float]:
    lost = set(members.owned[victim])
    t0 = members.kill(victim)
    others = set(members.live())
    members.wait(lambda: len(members.consumed_after(t0, lost, others)) == len(lost), 30,
                 "the killed member's partitions to be consumed again")
    first = members.consumed_after(t0, lost, others)
    delays = sorted((t - t0) * 1000 for t in first.values())
    return {"takeover_ms": delays[-1], "takeover_median_partition_ms": statistics.median(delays),
            "takeover_partitions": len(lost)}


def measure_commits(data_dir: str, mode: str, seconds: float) -> dict[str, float]:
    processes = [subprocess.Popen([sys.executable, __file__, "committer", data_dir, str(index),
                                   str(seconds), mode], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE)
                 for index in range(COMMITTERS)]
    for process in processes:
        assert process.stdout is not None
        if process.stdout.readline().strip() != b"ready":
            raise SystemExit(f"a committer failed to start (exit {process.wait()})")
    start_at = time.monotonic() + 0.2
    for process in processes:  # every one told before any is waited for
        assert process.stdin is not None
        process.stdin.write(f"{start_at!r}\n".encode())
        process.stdin.close()
    results = []
    for process in processes:
        out = process.stdout.read()  # type: ignore[union-attr]
        process.wait(timeout=seconds + 120)
        if process.returncode != 0:
            raise SystemExit(f"a committer failed (exit {process.returncode})")
        results.append(orjson.loads(out.splitlines()[-1]))
    for result in results:
        assert result["committed"] == result["last"], result  # the last commit is the one kept
    total = sum(result["acknowledged"] for result in results)
    elapsed = max(result["elapsed_s"] for result in results)
    return {f"commits_{mode}_per_s": total / elapsed,
            f"commits_{mode}_failed": sum(result["failed"] for result in results)}


def measure_rebalances(data_dir: str, rounds: int, interval_ms: float,
                       assignor: str) -> list[dict[str, Any]]:
    """``rounds`` of (a 5th member joins, then one of 4 is SIGKILLed), with traffic."""
    results: list[dict[str, Any]] = []
    producer = subprocess.Popen([sys.executable, __file__, "producer", data_dir,
                                 repr(interval_ms / 1000)])
    members = Members(data_dir, assignor)
    try:
        for _ in range(MEMBERS):
            members.start()
        members.wait(members.stable, 120, "4 members to share the partitions")
        for round_index in range(rounds):
            result: dict[str, Any] = {"round": round_index}
            joined = measure_join(members)
            fifth = joined.pop("_member")
            result.update(joined)
            members.stop(fifth)
            members.wait(members.stable, 30, "the group to settle after a leave")
            result.update(measure_takeover(members, members.live()[0]))
            members.start()
            members.wait(members.stable, 60, "4 members again")
            print(" ".join(f"{key} {value:.1f}" if isinstance(value, float) else
                           f"{key} {value}" for key, value in result.items()), flush=True)
            results.append(result)
    finally:
        producer.terminate()
        producer.wait(30)
        members.close()
    return results


def run(rounds: int, commit_rounds: int, commit_seconds: float, interval_ms: float,
        assignor: str) -> list[dict[str, Any]]:
    from shmbroker import Admin
    from shmbroker.perf.cli import embedded_broker

    results: list[dict[str, Any]] = []
    with embedded_broker() as (target, _):
        data_dir = str(target)
        with Admin(data_dir) as admin:
            admin.create_topic(TOPIC, partitions=PARTITIONS)
        if rounds:
            results += measure_rebalances(data_dir, rounds, interval_ms, assignor)
        for round_index in range(commit_rounds):  # alternating: A B A B
            for mode in ("async", "sync"):
                commits = measure_commits(data_dir, mode, commit_seconds)
                commits["round"] = round_index
                print(" ".join(f"{key} {value:.0f}" for key, value in commits.items()),
                      flush=True)
                results.append(commits)
    return results


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "member":
        member(sys.argv[2], sys.argv[3], sys.argv[4])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "producer":
        produce_forever(sys.argv[2], float(sys.argv[3]))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "committer":
        committer(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), sys.argv[5])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--commit-rounds", type=int, default=3)
    parser.add_argument("--commit-seconds", type=float, default=3.0)
    parser.add_argument("--produce-interval-ms", type=float, default=10.0)
    parser.add_argument("--assignor", default="sticky",
                        help="the members' assignor: range, roundrobin or sticky")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = run(args.rounds, args.commit_rounds, args.commit_seconds,
                  args.produce_interval_ms, args.assignor)
    print("\nmedians:")
    keys = dict.fromkeys(key for result in results for key in result if key != "round")
    summary = {}
    for key in keys:
        values = [result[key] for result in results if key in result]
        summary[key] = statistics.median(values)
        goal = GOALS.get(key) or GOALS.get(key.replace("_async", "").replace("_sync", ""))
        verdict = ""
        if goal is not None:
            met = summary[key] >= goal if key.startswith("commits") else summary[key] <= goal
            verdict = f"  (goal {'>=' if key.startswith('commits') else '<='} {goal}: " \
                      f"{'met' if met else 'NOT met'})"
        print(f"  {key:32s} {summary[key]:12.1f}   samples {len(values)}{verdict}")
    if args.json:
        args.json.write_bytes(orjson.dumps({"runs": results, "medians": summary},
                                           option=orjson.OPT_INDENT_2))


if __name__ == "__main__":
    main()
