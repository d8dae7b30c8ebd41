#!/usr/bin/env python3
"""What rolls and writeback cost the appending thread, appending as a partition worker does.

A worker appends on its own thread while its flush thread runs the log's flush tickets
(``begin_flush`` / ``FlushTicket.run`` / ``end_flush``: group commit, the recovery-point
checkpoint, and what a roll leaves to them) and starts the kernel's writeback of each
``segment_writeback_bytes`` appended (``take_writeback``, storage/writeback.py).  This script
does the same at full speed -- 1 MiB regions of 64 KiB batches of 100-byte records, the next
ticket begun as soon as one is due and the last one ended -- into a log with small segments, so
that it rolls often while the kernel writes back what the appends dirtied, and reports per run:
the rate, the appending thread's time in rolls (``PartitionLog.roll_s``: the next segment made,
the last one sealed), in writes (``write_s``: where the kernel holds a writer back once dirty
pages pile up) and in checks (``check_s``), and the slowest appends (p99.9, max).

    python bench/rolls.py                              # 4 GiB, 64 MiB segments, 3 runs
    python bench/rolls.py --writeback-mib 0            # no early writeback (the A/B's other side)
    python bench/rolls.py --size-gib 2 --segment-mib 32 --runs 5 --dir /path/to/disk
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from storage import make_batch  # noqa: E402  (bench/storage.py, beside this file)

from shmbroker.config import LogConfig  # noqa: E402
from shmbroker.partition.flusher import Flusher  # noqa: E402
from shmbroker.storage.partition_log import PartitionLog  # noqa: E402

KIB = 1024
MIB = 1024 * KIB
LAST_FLUSH_WAIT_S = 600.0  # the run's last ticket, ended before the log is closed


class _FlushPump:
    """What a worker does with its flush thread (shmbroker.partition.flusher.Flusher): one
    ticket at a time, ended on this thread, and one writeback hint at a time."""

    def __init__(self, log: PartitionLog) -> None:
        self.log = log
        self.flusher = Flusher()

    def pump(self) -> None:
        log, flusher = self.log, self.flusher
        if not flusher.writeback_queued:
            hint = log.take_writeback()
            if hint is not None:
                flusher.start_writeback(hint)
        if flusher.in_flight is not None:
            done = flusher.finished()
            if done is None:
                return
            log.end_flush(*done)
        if log.flush_due():
            ticket = log.begin_flush()
            if ticket is not None:
                flusher.submit(ticket)

    def finish(self) -> None:
        if self.flusher.in_flight is not None:  # (an fsync of what a run wrote: seconds)
            done = self.flusher.finished(wait_s=LAST_FLUSH_WAIT_S)
            if done is not None:
                self.log.end_flush(*done)
        self.flusher.close()  # (runs a hint still queued first)


def run(directory: Path, region: bytearray, total_bytes: int, segment_bytes: int,
        writeback_bytes: int) -> dict[str, Any]:
    log = PartitionLog(directory, LogConfig(segment_bytes=segment_bytes, retention_ms=-1,
                                            segment_writeback_bytes=writeback_bytes))
    log.tick(background_flush=True)  # flushes on tickets, as a worker's log does
    flusher = _FlushPump(log)
    appends = []
    written = 0
    started = time.perf_counter()
    while written < total_bytes:
        began = time.perf_counter()
        log.append(region)
        appends.append(time.perf_counter() - began)
        written += len(region)
        flusher.pump()
    elapsed = time.perf_counter() - started
    flusher.finish()
    appends.sort()
    result = {"gb_per_s": written / elapsed / 1e9, "segments": len(log.segments),
              "roll_ms": log.roll_s * 1000, "write_ms": log.write_s * 1000,
              "check_ms": log.check_s * 1000,
              "p999_append_ms": appends[int(len(appends) * 0.999)] * 1000,
              "longest_append_ms": appends[-1] * 1000}
    log.close()
    shutil.rmtree(directory)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-gib", type=float, default=4.0, help="bytes appended per run")
    parser.add_argument("--segment-mib", type=int, default=64, help="segment_bytes, MiB")
    parser.add_argument("--writeback-mib", type=float,
                        default=LogConfig.segment_writeback_bytes / MIB,
                        help="segment_writeback_bytes, MiB (default: the setting's; 0 = off)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None,
                        help="directory on the file system to test (default: a temp dir here)")
    args = parser.parse_args()
    if args.size_gib <= 0 or args.segment_mib < 1 or args.runs < 1 or args.writeback_mib < 0:
        parser.error("--size-gib, --segment-mib and --runs must be positive, "
                     "--writeback-mib not negative")
    region = bytearray(b"".join([bytes(make_batch(64 * KIB))] * 16))
    base = Path(tempfile.mkdtemp(prefix="shmbroker-rolls-", dir=args.dir or Path.cwd()))
    print(f"{args.size_gib:g} GiB of 1 MiB appends per run, {args.segment_mib} MiB segments, "
          f"writeback every {args.writeback_mib:g} MiB, tickets on a thread; {base}")
    print("run    GB/s  segments  rolls ms  writes ms  checks ms  append p99.9 ms  max ms")
    results = []
    try:
        for number in range(args.runs):
            result = run(base / f"run-{number}", region, int(args.size_gib * (1 << 30)),
                         args.segment_mib * MIB, int(args.writeback_mib * MIB))
            results.append(result)
            print(f"{number:3d}  {result['gb_per_s']:6.2f}  {result['segments']:8d}  "
                  f"{result['roll_ms']:8.0f}  {result['write_ms']:9.0f}  "
                  f"{result['check_ms']:9.0f}  {result['p999_append_ms']:15.1f}  "
                  f"{result['longest_append_ms']:6.1f}", flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print("medians: rolls ms "
          f"{statistics.median(result['roll_ms'] for result in results):.0f}, append p99.9 ms "
          f"{statistics.median(result['p999_append_ms'] for result in results):.1f}, max ms "
          f"{statistics.median(result['longest_append_ms'] for result in results):.1f}, GB/s "
          f"{statistics.median(result['gb_per_s'] for result in results):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
