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
    python bench/durable.py --rounds 3 --batch-size-bytes 65536,1048576 --ring-bytes 8388608
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


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a comma-separated list of integers: {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"sizes must be >= 1 byte: {text!r}")
    return sizes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration-s", type=float, default=10.0)
    parser.add_argument("--batch-size-bytes", type=_sizes, default=None,
                        help="the producers' batch_size_bytes, comma-separated to compare "
                             "several in one run (default: the workload's)")
    parser.add_argument("--ring-bytes", type=_sizes, default=None,
                        help="the producers' ring_bytes, comma-separated to compare several "
                             "(default: the workload's); every pair of the two lists runs")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    base = load_workload(WORKLOAD)
    configs = [(size, ring) for size in args.batch_size_bytes or [base.batch_size_bytes]
               for ring in args.ring_bytes or [base.ring_bytes]]

    def label(api: str, size: int, ring: int) -> str:
        if len(configs) == 1:
            return api
        return f"{api} {size // 1024} KiB/{ring >> 20} MiB"

    order = (["dd-1M"] + [label("columnar", *config) for config in configs] + ["dd-1k"]
             + [label("per-record", *config) for config in configs])
    try:  # every workload checked before the first run (a ring that is not whole pages...)
        setups = {label(api, size, ring): base.with_overrides(
            {"api": api, "batch_size_bytes": size, "ring_bytes": ring,
             "duration_s": args.duration_s})
            for api in ("columnar", "per-record") for size, ring in configs}
    except ValueError as error:
        parser.error(str(error))
    runs: list[dict[str, Any]] = []
    with embedded_broker() as (data_dir, pid):
        scratch = data_dir.parent / "dd.bin"
        for round_index in range(args.rounds):
            for system in order:
                if system.startswith("dd"):
                    block, count = ("1M", DD_BYTES >> 20) if system == "dd-1M" \
                        else ("1k", DD_BYTES >> 10)
                    rate = dd_mb_per_s(scratch, block, count)
                else:
                    result = runner.run(setups[system], str(data_dir), broker_pid=pid)
                    if result.lost:
                        raise SystemExit(f"{result.lost} acknowledged records lost")
                    rate = result.produce_mb_per_s
                runs.append({"round": round_index, "system": system, "mb_per_s": rate})
                print(f"round {round_index} {system:>26}: {rate:8.1f} MB/s", file=sys.stderr)
    medians = {system: statistics.median(run["mb_per_s"] for run in runs
                                         if run["system"] == system)
               for system in order}
    print(f"medians of {args.rounds} rounds (MB/s): " + ", ".join(
        f"{system} {rate:,.1f}" for system, rate in medians.items()))
    for system in setups:
        ratio = medians[system] / medians["dd-1M"]
        print(f"{system}: {ratio:.0%} of dd bs=1M conv=fdatasync "
              f"({medians[system] / medians['dd-1k']:.0%} of bs=1k); goal >= 80 %: "
              + ("met" if ratio >= 0.8 else "NOT met"))
    if args.json is not None:
        args.json.write_bytes(orjson.dumps({"runs": runs, "medians": medians,
                                            "environment": runner.environment()},
                                           option=orjson.OPT_INDENT_2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
