#!/usr/bin/env python3
"""Durable writes against the disk's own ceiling, in one run (issue 5's durable goal).

For ``--rounds`` rounds, alternating:

* ``dd``: ``dd if=/dev/zero of=FILE bs=1M count=N conv=fdatasync`` on the filesystem of the
  broker's data dir: the rate the disk takes sequential bytes and makes them durable (one
  fdatasync at the end: the most favourable case for the disk); also ``bs=1k``, the same bytes
  in 1 KiB writes, as a record-sized reference;
* ``shmbroker``: ``shmbroker-bench`` with the ``durable-1k`` workload (1 KiB records, the topic's
  flush_messages = 1: a producer's batch is acknowledged only after the fsync that covers it,
  many batches per fsync), columnar and per-record APIs, one producer and one consumer.

Prints the medians and the ratio of each API's produce MB/s to dd's (goal: >= 80 %).

    python bench/durable.py --rounds 3 --duration-s 10
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson

from shmbroker.perf import runner
from shmbroker.perf.cli import embedded_broker
from shmbroker.perf.workload import load_workload

WORKLOAD = Path(__file__).with_name("workloads") / "durable-1k.toml"
DD_BYTES = 1 << 30


def dd_mb_per_s(path: Path, block: str, count: int) -> float:
    """dd's own figure (bytes / s, its last line), in MB/s."""
    done = subprocess.run(["dd", "if=/dev/zero", f"of={path}", f"bs={block}", f"count={count}",
                           "conv=fdatasync"], capture_output=True, text=True, check=True)
    path.unlink()
    match = re.search(r"(\d+) bytes .* copied, ([\d.]+) s", done.stderr)
    if match is None:
        raise RuntimeError(f"cannot read dd's output: {done.stderr!r}")
    return int(match[1]) / float(match[2]) / 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration-s", type=float, default=10.0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    base = load_workload(WORKLOAD)
    runs: list[dict[str, Any]] = []
    with embedded_broker() as (data_dir, pid):
        scratch = data_dir.parent / "dd.bin"
        for round_index in range(args.rounds):
            for system in ("dd-1M", "columnar", "dd-1k", "per-record"):
                if system.startswith("dd"):
                    block, count = ("1M", DD_BYTES >> 20) if system == "dd-1M" \
                        else ("1k", DD_BYTES >> 10)
                    rate = dd_mb_per_s(scratch, block, count)
                else:
                    workload = base.with_overrides({"api": system,
                                                    "duration_s": args.duration_s})
                    result = runner.run(workload, str(data_dir), broker_pid=pid)
                    if result.lost:
                        raise SystemExit(f"{result.lost} acknowledged records lost")
                    rate = result.produce_mb_per_s
                runs.append({"round": round_index, "system": system, "mb_per_s": rate})
                print(f"round {round_index} {system:>10}: {rate:8.1f} MB/s", file=sys.stderr)
    medians = {system: statistics.median(run["mb_per_s"] for run in runs
                                         if run["system"] == system)
               for system in ("dd-1M", "dd-1k", "columnar", "per-record")}
    print(f"medians of {args.rounds} rounds (MB/s): " + ", ".join(
        f"{system} {rate:,.1f}" for system, rate in medians.items()))
    for api in ("columnar", "per-record"):
        ratio = medians[api] / medians["dd-1M"]
        print(f"{api}: {ratio:.0%} of dd bs=1M conv=fdatasync "
              f"({medians[api] / medians['dd-1k']:.0%} of bs=1k); goal >= 80 %: "
              + ("met" if ratio >= 0.8 else "NOT met"))
    if args.json is not None:
        args.json.write_bytes(orjson.dumps({"runs": runs, "medians": medians,
                                            "environment": runner.environment()},
                                           option=orjson.OPT_INDENT_2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
