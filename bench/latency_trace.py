#!/usr/bin/env python3
"""Where a record's produce-to-consume latency goes, stage by stage.

One paced producer (``linger_ms = 0``, acks 1), one consumer, and a broker whose partition
worker notes the time of its steps (``shmbroker/partition/trace.py``: ``SHMBROKER_TRACE_DIR``
is set for the broker this script starts).  Every process reads one clock
(``time.monotonic_ns``: CLOCK_MONOTONIC, the same on the whole host), so each record's path is
cut into stages:

  pacing          intended send time -> the producer calls send (late when the producer is)
  send call       the call itself (with linger 0: encode, ring write, the worker's doorbell)
  to the worker   send called -> the worker takes the ring region that holds the record
                  (the ring, the doorbell, the worker's wake-up or spin)
  append          the region appended and acknowledged (its records in the log)
  to the answer   appended -> the worker starts sending a fetch answer holding the record
                  (at once for a parked fetch; else when the consumer's next fetch arrives);
                  none for a record the consumer read from the segment file itself
  to the consumer the answer's send begun (or, read directly, the append's end) -> the
                  consumer's poll returns the record (its wake-up, reading the answer or the
                  file, decoding)
  total           intended send time -> consumed

and the consumer's fetch cycle as the worker sees it: how long a fetch takes to be answered
(at once, or parked until records come) and the turnaround from an answer to the next fetch.
Percentiles are of the measured records (the warm-up excluded); each round has a fresh broker.
This is a diagnostic: tracing costs the worker ~0.3 µs a step, and the figures hold for one
machine and one load.

    python bench/latency_trace.py                       # 20,000 records at 10k/s, 1 round
    python bench/latency_trace.py --rounds 3 --worker-spin-us 5000 --poll-spin-us 5000
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from shmbroker.partition import trace

sys.path.insert(0, str(Path(__file__).resolve().parent))
from broker import (  # noqa: E402  (bench/broker.py, beside this file)
    SPIN_NS,
    TOPIC,
    paced,
    running_broker,
)

RECORD_BYTES = 100
INDEX = struct.Struct("<q")  # each value starts with its record's index
SPIN_US = SPIN_NS // 1000  # the producer's default spin before a record is due (bench/broker.py)
WARMUP_FRACTION = 0.1  # the first records (connections warming up) are not counted
STAGES = ("pacing", "send call", "to the worker", "append", "to the answer", "to the consumer",
          "total")
PARKED_ANSWER = "  of which by a parked fetch"  # "to the answer", split by how the record left
LATER_ANSWER = "  of which by a later fetch"
READ_DIRECTLY = "  of which read directly"  # "to the consumer" of records no answer held
PERCENTILES = (50, 90, 99)


def produce(data_dir: str, count: int, rate_per_s: int, spin_us: int, start: Any,
            out: str) -> None:
    from shmbroker import Producer

    pad = b"x" * (RECORD_BYTES - INDEX.size)
    intended = np.zeros(count, dtype=np.int64)
    called = np.zeros(count, dtype=np.int64)
    returned = np.zeros(count, dtype=np.int64)
    with Producer(data_dir, acks=1, linger_ms=0) as producer:
        start.wait()
        for index, due in paced(count, rate_per_s, spin_us * 1000):
            intended[index] = due
            called[index] = time.monotonic_ns()
            producer.send(TOPIC, INDEX.pack(index) + pad, partition=0)
            returned[index] = time.monotonic_ns()
        producer.flush(60)
    np.savez(out, intended=intended, called=called, returned=returned)


def consume(data_dir: str, count: int, poll_spin_us: int, direct_reads: bool, start: Any,
            out: str) -> None:
    from shmbroker import Consumer, TopicPartition

    partition = TopicPartition(TOPIC, 0)
    offsets: list[int] = []
    indexes: list[int] = []
    received: list[int] = []
    with Consumer(data_dir, fetch_max_wait_ms=100, poll_spin_us=poll_spin_us,
                  direct_reads=direct_reads) as consumer:
        consumer.assign([partition])
        consumer.seek(partition, 0)
        start.wait()
        deadline = time.monotonic() + 60 + count / 1000
        while len(offsets) < count and time.monotonic() < deadline:
            records = consumer.poll(timeout_ms=100)
            now = time.monotonic_ns()
            for record in records:
                offsets.append(record.offset)
                indexes.append(INDEX.unpack_from(record.value)[0])
                received.append(now)
    np.savez(out, offsets=np.array(offsets, dtype=np.int64),
             indexes=np.array(indexes, dtype=np.int64),
             received=np.array(received, dtype=np.int64))


def _pairs(steps: dict[str, np.ndarray], begin_kind: int, end_kind: int,
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(begin times, end times, first values, end values) of steps that come in pairs."""
    kinds = steps["kinds"]
    begins = np.flatnonzero(kinds == begin_kind)
    ends = np.flatnonzero(kinds == end_kind)
    count = min(len(begins), len(ends))
    begins, ends = begins[:count], ends[:count]
    return (steps["times_ns"][begins], steps["times_ns"][ends], steps["first"][begins],
            steps["first"][ends])


def _answered_fetches(steps: dict[str, np.ndarray]) -> list[tuple[int | None, int, bool]]:
    """Each answered fetch in order: (when it was read, None if not traced; when it was
    answered; whether it was parked in between)."""
    fetches: list[tuple[int | None, int, bool]] = []
    read_at = None
    parked = False
    for kind, at in zip(steps["kinds"].tolist(), steps["times_ns"].tolist()):
        if kind == trace.FETCH_READ:
            read_at, parked = at, False
        elif kind == trace.FETCH_PARKED:
            parked = True
        elif kind == trace.FETCH_ANSWERED:
            fetches.append((read_at, at, parked))
            read_at, parked = None, False
    return fetches


def stages(producer: dict[str, np.ndarray], consumer: dict[str, np.ndarray],
           steps: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each stage's duration (µs) for every record traced all the way (the module docstring
    names the stages).  ``producer``: per record index ``intended``, ``called``, ``returned``;
    ``consumer``: per record received ``offsets``, ``indexes``, ``received``; ``steps``: the
    worker's trace (:func:`trace.load`).  Offsets are the records' indexes (one producer, a
    fresh partition).  "to the answer" is also given split by how the record left: by a fetch
    that was parked (waiting for records) and by one that came after them; a record that no
    answer held was read from the segment file by the consumer (consumer.py, "Direct reads"):
    its "to the consumer" runs from the append's end, and is also given on its own."""
    offsets = consumer["offsets"]
    if not np.array_equal(offsets, consumer["indexes"]):
        raise ValueError("a record's offset is not its index: the partition was not fresh")
    begin_ns, end_ns, before, after = _pairs(steps, trace.APPEND_BEGIN, trace.APPEND_END)
    region = np.searchsorted(after, offsets, side="right")  # the first region ending past it
    answered = steps["kinds"] == trace.FETCH_ANSWERED
    answer_ns = steps["times_ns"][answered]
    answer_first, answer_after = steps["first"][answered], steps["second"][answered]
    answer_parked = np.array([parked for _, _, parked in _answered_fetches(steps)], dtype=bool)
    answer = np.searchsorted(answer_after, offsets, side="right")
    traced = region < len(after)
    region = np.minimum(region, len(after) - 1)
    traced &= before[region] <= offsets
    by_answer = answer < len(answer_after)
    if len(answer_after):
        answer = np.minimum(answer, len(answer_after) - 1)
        by_answer &= answer_first[answer] <= offsets
    offsets, region, answer = offsets[traced], region[traced], answer[traced]
    by_answer = by_answer[traced]
    received = consumer["received"][traced]
    intended, called = producer["intended"][offsets], producer["called"][offsets]
    answered_ns = answer_ns[answer[by_answer]]
    left_ns = end_ns[region].copy()  # when the record left the worker's hands
    left_ns[by_answer] = answered_ns
    times = {
        "pacing": called - intended,
        "send call": producer["returned"][offsets] - called,
        "to the worker": begin_ns[region] - called,
        "append": end_ns[region] - begin_ns[region],
        "to the answer": answered_ns - end_ns[region][by_answer],
        "to the consumer": received - left_ns,
        "total": received - intended,
    }
    parked = answer_parked[answer[by_answer]]
    times[PARKED_ANSWER] = times["to the answer"][parked]
    times[LATER_ANSWER] = times["to the answer"][~parked]
    times[READ_DIRECTLY] = times["to the consumer"][~by_answer]
    order = (*STAGES[:5], PARKED_ANSWER, LATER_ANSWER, STAGES[5], READ_DIRECTLY, *STAGES[6:])
    return {name: times[name] / 1000 for name in order}


def fetch_cycle(steps: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The consumer's fetches as the worker saw them (µs): read -> answered, for those answered
    at once and those parked first, and answered -> the next fetch read (the turnaround)."""
    fetches = _answered_fetches(steps)
    at_once = [answered - read for read, answered, parked in fetches
               if read is not None and not parked]
    parked_first = [answered - read for read, answered, parked in fetches
                    if read is not None and parked]
    turnaround = [read - answered for (_, answered, _), (read, _, _) in zip(fetches, fetches[1:])
                  if read is not None]
    return {name: np.array(values, dtype=np.int64) / 1000 for name, values in (
        ("answered at once", at_once), ("parked, then answered", parked_first),
        ("answer -> next fetch", turnaround))}


def summary(values: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    return {name: {"count": len(found), **{f"p{q}": float(np.percentile(found, q))
                                           for q in PERCENTILES}}
            for name, found in values.items() if len(found)}


def print_table(title: str, table: dict[str, dict[str, float]]) -> None:
    print(f"{title:34s}" + "".join(f"{'p' + str(q) + ' us':>10s}" for q in PERCENTILES)
          + f"{'count':>9s}")
    for name, row in table.items():
        print(f"  {name:32s}" + "".join(f"{row[f'p{q}']:10.1f}" for q in PERCENTILES)
              + f"{int(row['count']):9d}")


def run_round(temp: str, round_index: int, args: argparse.Namespace) -> dict[str, Any]:
    trace_dir = Path(temp) / f"trace-{round_index}"
    os.environ[trace.TRACE_DIR_ENVIRONMENT] = str(trace_dir)  # the broker's children inherit it
    context = multiprocessing.get_context("spawn")
    start = context.Event()
    produced = os.path.join(temp, f"produced-{round_index}.npz")
    consumed = os.path.join(temp, f"consumed-{round_index}.npz")
    try:
        with running_broker(temp, f"data-{round_index}",
                            f"worker_spin_us = {args.worker_spin_us}\n") as data_dir:
            consumer = context.Process(target=consume, args=(
                data_dir, args.records, args.poll_spin_us, args.direct_reads, start, consumed))
            producer = context.Process(target=produce, args=(
                data_dir, args.records, args.rate_per_sec, args.producer_spin_us, start, produced))
            consumer.start()
            producer.start()
            time.sleep(1.0)  # both imported numpy and connected
            start.set()
            producer.join(120 + args.records / args.rate_per_sec)
            consumer.join(120)
            if producer.exitcode != 0 or consumer.exitcode != 0:
                raise SystemExit(f"round {round_index}: the producer exited {producer.exitcode}"
                                 f", the consumer {consumer.exitcode}")
    finally:
        del os.environ[trace.TRACE_DIR_ENVIRONMENT]
    files = sorted(trace_dir.glob("worker-*.npz"))
    if len(files) != 1:
        raise SystemExit(f"round {round_index}: expected one worker trace in {trace_dir}, "
                         f"found {len(files)}")
    steps = trace.load(files[0])
    with np.load(produced) as saved:
        producer_times = {name: saved[name] for name in saved.files}
    with np.load(consumed) as saved:
        consumer_times = {name: saved[name] for name in saved.files}
    if len(consumer_times["offsets"]) != args.records:
        raise SystemExit(f"round {round_index}: consumed {len(consumer_times['offsets'])} of "
                         f"{args.records} records")
    warm = int(args.records * WARMUP_FRACTION)
    measured = consumer_times["offsets"] >= warm
    consumer_times = {name: values[measured] for name, values in consumer_times.items()}
    return {"round": round_index, "stages": summary(stages(producer_times, consumer_times, steps)),
            "fetch_cycle": summary(fetch_cycle(steps))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--rate-per-sec", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--worker-spin-us", type=int, default=50,
                        help="the broker's worker_spin_us (default: its default, 50)")
    parser.add_argument("--poll-spin-us", type=int, default=0,
                        help="the consumer's poll_spin_us (default 0)")
    parser.add_argument("--no-direct-reads", dest="direct_reads", action="store_false",
                        help="the consumer fetches everything through the worker")
    parser.add_argument("--producer-spin-us", type=int, default=SPIN_US,
                        help="the producer sleeps until this long before a record is due, then "
                             f"spins (default {SPIN_US}: at 10k/s it never sleeps, which on a "
                             "2-core machine takes a core from the worker and the consumer)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.records < 10 or args.rate_per_sec < 1 or args.rounds < 1:
        parser.error("--records >= 10, --rate-per-sec >= 1 and --rounds >= 1")
    print(f"{args.records} records of {RECORD_BYTES} B at {args.rate_per_sec}/s, linger 0, "
          f"worker_spin_us {args.worker_spin_us}, poll_spin_us {args.poll_spin_us}, "
          f"direct reads {'on' if args.direct_reads else 'off'}, "
          f"producer spin {args.producer_spin_us} us; "
          f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}", flush=True)
    rounds = []
    with tempfile.TemporaryDirectory(prefix="shmbroker-trace-") as temp:
        for round_index in range(args.rounds):
            result = run_round(temp, round_index, args)
            rounds.append(result)
            print(f"\nround {round_index}")
            print_table("stage of a record", result["stages"])
            print_table("the consumer's fetches", result["fetch_cycle"])
    if args.rounds > 1:
        print(f"\nmedians of {args.rounds} rounds")
        for part, title in (("stages", "stage of a record"),
                            ("fetch_cycle", "the consumer's fetches")):
            names = dict.fromkeys(name for result in rounds for name in result[part])
            print_table(title, {name: {
                key: statistics.median(result[part][name][key] for result in rounds
                                       if name in result[part])
                for key in ("count", *(f"p{q}" for q in PERCENTILES))} for name in names})
    if args.json:
        args.json.write_bytes(orjson.dumps({"arguments": vars(args) | {"json": str(args.json)},
                                            "rounds": rounds}))


if __name__ == "__main__":
    main()
