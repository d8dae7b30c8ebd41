#!/usr/bin/env python3
"""Durable committed offsets (issue 4): how many commits/s the offset log makes durable.

The supervisor stages the commits that arrive during one loop iteration and makes them durable
with one write + fdatasync (group commit).  This bench plays 16 committing consumers of one group
(each owning 4 partitions of one topic, committing one partition per request) and syncs after
every 1, 16 or 64 commits.  The log uses its default compaction settings, so compactions run
during the measurement as they would in the broker.  Baselines measured in the same run and
directory: a raw 4 KiB write + fdatasync loop (the floor MEASUREMENTS.md quotes), and stage()
alone without any sync (the Python cost per commit).

Cases alternate (A B C A B C ...) so that a noisy machine hurts them alike; medians are printed.
Run from the repository root, on the disk the broker's data dir lives on (not /dev/shm):

    python bench/offset_log.py                      # 3 runs of 2 s per case, temp dir in cwd
    python bench/offset_log.py --runs 5 --seconds 3 --dir /path/on/the/data/disk
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from shmbroker.storage.offset_log import OffsetLog

GROUP = "bench-group"
TOPIC = "events"
PARTITIONS_PER_CONSUMER = 4
GOAL_COMMITS_PER_S = 50_000


def raw_fdatasync(directory: Path, seconds: float) -> float:
    """Syncs/s of a 4 KiB append + fdatasync loop (no Python encoding at all)."""
    path = directory / "raw-sync.bin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    block = b"x" * 4096
    syncs = 0
    started = time.perf_counter()
    deadline = started + seconds
    try:
        while time.perf_counter() < deadline:
            os.write(fd, block)
            os.fdatasync(fd)
            syncs += 1
        elapsed = time.perf_counter() - started
    finally:
        os.close(fd)
        path.unlink()
    return syncs / elapsed


class Consumers:
    """``count`` consumers committing increasing offsets, one partition per request, in turn."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.next_consumer = 0
        self.turns = [0] * count
        self.offsets = [0] * (count * PARTITIONS_PER_CONSUMER)

    def stage_one(self, log: OffsetLog) -> None:
        consumer = self.next_consumer
        self.next_consumer = (consumer + 1) % self.count
        turn = self.turns[consumer]
        self.turns[consumer] = turn + 1
        partition = consumer * PARTITIONS_PER_CONSUMER + turn % PARTITIONS_PER_CONSUMER
        self.offsets[partition] += 100
        log.stage(GROUP, [(TOPIC, partition, self.offsets[partition], None, 7)])

    def committed(self) -> dict[tuple[str, int], tuple[int, None]]:
        return {(TOPIC, partition): (offset, None)
                for partition, offset in enumerate(self.offsets) if offset}


class CaseResult:
    def __init__(self, commits_per_s: float, syncs_per_s: float, sync_us: list[float],
                 compactions: int, size_bytes: int) -> None:
        self.commits_per_s = commits_per_s
        self.syncs_per_s = syncs_per_s
        self.sync_us = sorted(sync_us)
        self.compactions = compactions
        self.size_bytes = size_bytes

    def sync_us_quantile(self, quantile: float) -> float:
        return self.sync_us[min(len(self.sync_us) - 1, int(quantile * len(self.sync_us)))]


def group_commit(directory: Path, commits_per_sync: int, consumers: int,
                 seconds: float) -> CaseResult:
    log_dir = directory / f"groups-{commits_per_sync}"
    log = OffsetLog(log_dir)
    players = Consumers(consumers)
    commits = syncs = 0
    sync_us: list[float] = []
    started = time.perf_counter()
    deadline = started + seconds
    try:
        while True:
            batch_started = time.perf_counter()
            if batch_started >= deadline:
                break
            for _ in range(commits_per_sync):
                players.stage_one(log)
            sync_started = time.perf_counter()
            commits += log.sync()
            sync_us.append((time.perf_counter() - sync_started) * 1e6)
            syncs += 1
        elapsed = time.perf_counter() - started
        stats = log.statistics()
    finally:
        log.close()
    assert stats.commits_synced == commits
    reopened = OffsetLog(log_dir)  # every commit is there after a reopen
    assert reopened.offsets(GROUP) == players.committed()
    reopened.close()
    shutil.rmtree(log_dir)
    return CaseResult(commits / elapsed, syncs / elapsed, sync_us, stats.compactions,
                      stats.size_bytes)


def stage_only(directory: Path, consumers: int, seconds: float) -> float:
    """Commits/s through stage() with the staged records dropped every 64 (no I/O)."""
    log = OffsetLog(directory / "groups-stage-only")
    players = Consumers(consumers)
    commits = 0
    started = time.perf_counter()
    deadline = started + seconds
    try:
        while time.perf_counter() < deadline:
            for _ in range(64):
                players.stage_one(log)
            commits += log.discard_staged()
        elapsed = time.perf_counter() - started
    finally:
        log.close()
    return commits / elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=2.0, help="length of each case")
    parser.add_argument("--consumers", type=int, default=16)
    parser.add_argument("--dir", type=Path, default=None,
                        help="directory on the filesystem to test (default: a temp dir here)")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="shmbroker-bench-", dir=args.dir or Path.cwd()))
    print(f"machine: {platform.machine()} {os.cpu_count()} cpus, {platform.platform()}, "
          f"Python {platform.python_version()}")
    print(f"directory: {base}  ({args.runs} runs of {args.seconds:g} s per case, medians; "
          f"{args.consumers} consumers of one group, {PARTITIONS_PER_CONSUMER} partitions each)\n")
    batch_sizes = (1, 16, 64)
    try:
        raw: list[float] = []
        staged: list[float] = []
        results: dict[int, list[CaseResult]] = {size: [] for size in batch_sizes}
        for _ in range(args.runs):
            raw.append(raw_fdatasync(base, args.seconds))
            for size in batch_sizes:
                results[size].append(group_commit(base, size, args.consumers, args.seconds))
            staged.append(stage_only(base, args.consumers, args.seconds))
        print(f"baseline: 4 KiB write + fdatasync       {statistics.median(raw):10,.0f} syncs/s")
        print(f"baseline: stage() only, no sync          {statistics.median(staged):10,.0f} "
              "commits/s\n")
        print("commits/sync   commits/s      syncs/s   sync p50 / p99 (us)   compactions  "
              "log bytes at end")
        for size in batch_sizes:
            runs = results[size]
            commits = statistics.median(r.commits_per_s for r in runs)
            syncs = statistics.median(r.syncs_per_s for r in runs)
            p50 = statistics.median(r.sync_us_quantile(0.5) for r in runs)
            p99 = statistics.median(r.sync_us_quantile(0.99) for r in runs)
            compactions = statistics.median(r.compactions for r in runs)
            size_bytes = statistics.median(r.size_bytes for r in runs)
            print(f"{size:12d}  {commits:10,.0f}  {syncs:11,.0f}   {p50:8.0f} / {p99:7.0f}"
                  f"   {compactions:11.0f}  {size_bytes:16,.0f}")
        at_16 = statistics.median(r.commits_per_s for r in results[16])
        verdict = "meets" if at_16 >= GOAL_COMMITS_PER_S else "MISSES"
        print(f"\ngoal: >= {GOAL_COMMITS_PER_S:,} durable commits/s across {args.consumers} "
              f"consumers at 16 commits/sync: {at_16:,.0f} ({verdict})")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
