"""How long the filesystem under a directory makes small appends wait: the longest ``write``
of each second while one file takes ``--record-bytes`` at ``--rate-per-sec`` (a partition's
log at a paced load), optionally with another thread fsyncing it every ``--fsync-every-s`` (as
a worker's flush thread does for the recovery-point checkpoint).

No broker: plain ``os.write`` calls from Python, to tell the disk's stalls from the broker's.
On ext4 in data=ordered mode a write can wait for the journal's commit (every 5 s by default),
and a write to a page under writeback can wait for the I/O to finish (stable pages); a worker's
stall warning of tens of ms in "rings and flushes" at a light load points there.

    python bench/write_stalls.py --dir /var/lib/shmbroker --seconds 15
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time


def run(directory: str, rate_per_s: int, record_bytes: int, seconds: float,
        fsync_every_s: float) -> list[tuple[int, float, int]]:
    """Per second: (second, the longest write in ms, writes over 1 ms)."""
    record = b"x" * record_bytes
    interval_ns = 1_000_000_000 // rate_per_s
    with tempfile.NamedTemporaryFile(dir=directory, prefix="write-stalls-") as handle:
        fd = handle.fileno()
        stop = threading.Event()

        def fsyncs() -> None:
            while not stop.wait(fsync_every_s):
                os.fsync(fd)

        syncer = threading.Thread(target=fsyncs, daemon=True)
        if fsync_every_s > 0:
            syncer.start()
        worst: dict[int, float] = {}
        slow: dict[int, int] = {}
        start = time.monotonic_ns()
        end = start + int(seconds * 1e9)
        sent = 0
        while True:
            intended = start + sent * interval_ns
            if intended >= end:
                break
            while time.monotonic_ns() < intended:
                time.sleep(0.00005)
            began = time.monotonic_ns()
            os.write(fd, record)
            took_ms = (time.monotonic_ns() - began) / 1e6
            second = (began - start) // 1_000_000_000
            worst[second] = max(took_ms, worst.get(second, 0.0))
            if took_ms > 1.0:
                slow[second] = slow.get(second, 0) + 1
            sent += 1
        stop.set()
    return [(second, worst[second], slow.get(second, 0)) for second in sorted(worst)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default=".", help="where the file goes (default: here)")
    parser.add_argument("--rate-per-sec", type=int, default=10_000)
    parser.add_argument("--record-bytes", type=int, default=170,
                        help="bytes a write (170: a one-record batch of a 100-byte value)")
    parser.add_argument("--seconds", type=float, default=12.0)
    parser.add_argument("--fsync-every-s", type=float, default=0.0,
                        help="also fsync the file from another thread this often (0: never)")
    args = parser.parse_args()
    if args.rate_per_sec < 1 or args.record_bytes < 1 or args.seconds <= 0:
        parser.error("--rate-per-sec, --record-bytes and --seconds must be positive")
    rows = run(args.dir, args.rate_per_sec, args.record_bytes, args.seconds, args.fsync_every_s)
    print(f"{args.dir}: {args.rate_per_sec:,} writes/s of {args.record_bytes} B"
          + (f", fsync every {args.fsync_every_s:g} s" if args.fsync_every_s > 0 else ""))
    print("second  longest write ms  writes > 1 ms")
    for second, worst_ms, slow in rows:
        print(f"{second:>6}  {worst_ms:>16.2f}  {slow:>13}")
    print(f"median of the seconds' longest: {statistics.median(r[1] for r in rows):.2f} ms; "
          f"longest: {max(r[1] for r in rows):.2f} ms")


if __name__ == "__main__":
    main()
