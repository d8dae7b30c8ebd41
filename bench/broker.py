#!/usr/bin/env python3
"""End-to-end broker benchmark: one partition, one producer process, one consumer process.

Runs a real broker (``shmbroker serve``) in a temp dir and measures, with 100-byte records and
acks=1 (issue 3's performance section):

* ``per-record``: ``Producer.send`` with linger, ``Consumer.poll`` -> records/s end to end;
* ``columnar``: ``Producer.send_batch((buffer, lengths))``, ``Consumer.poll_columnar`` -> records/s
  and GB/s end to end;
* ``file write ceiling`` (with ``columnar``): the bytes of the columnar run's records written
  to a new file with 1 MiB ``os.write`` calls, as records/s: past a few hundred MiB the page
  cache can only take new data as fast as the disk writes it back, so this bounds any
  end-to-end rate of a broker that keeps its records (every scenario starts after ``os.sync``);
* ``latency``: 10k records/s, linger 0, each value carries its send time (CLOCK_MONOTONIC, one
  clock for every process); the consumer reports p50/p99/p99.9 produce-to-consume.

End to end = first send to last record consumed, both processes running at once.  Each scenario
runs ``--repeat`` times alternating with the others; the medians are printed (machines here are
noisy, so compare runs of one invocation only).  ``--json FILE`` writes every run.

    python bench/broker.py --records 2000000 --repeat 3
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from shmbroker.subprocesses import child_environment, python_module

RECORD_BYTES = 100
SPIN_NS = 150_000
TOPIC = "bench"


def _wait_socket(path: Path, process: subprocess.Popen[bytes], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"broker did not start (exit {process.poll()})")
        time.sleep(0.02)


def produce_per_record(data_dir: str, count: int, start: Any) -> None:
    from shmbroker import Producer

    value = b"x" * RECORD_BYTES
    with Producer(data_dir, acks=1, linger_ms=5, batch_size_bytes=256 * 1024) as producer:
        start.wait()
        send = producer.send
        for _ in range(count):
            send(TOPIC, value, partition=0)
        producer.flush()


def produce_columnar(data_dir: str, count: int, start: Any) -> None:
    from shmbroker import Producer

    chunk = 100_000
    buffer = b"x" * (RECORD_BYTES * chunk)
    lengths = np.full(chunk, RECORD_BYTES, dtype=np.int64)
    with Producer(data_dir, acks=1, batch_size_bytes=1000 * 1024, ring_bytes=32 << 20) as producer:
        start.wait()
        sent = 0
        while sent < count:
            n = min(chunk, count - sent)
            producer.send_batch(TOPIC, (memoryview(buffer)[: n * RECORD_BYTES], lengths[:n]),
                                partition=0)
            sent += n
        producer.flush()


def wait_until(due_ns: int, spin_ns: int = SPIN_NS) -> None:
    """Sleep most of the wait for ``due_ns`` (CLOCK_MONOTONIC; frees the CPU and the GIL for
    the producer's I/O thread), spin the last ``spin_ns`` (a sleep overshoots)."""
    ahead = due_ns - time.monotonic_ns()
    if ahead > spin_ns:
        time.sleep((ahead - spin_ns) / 1e9)
    while time.monotonic_ns() < due_ns:
        pass


def paced(count: int, rate_per_s: int, spin_ns: int = SPIN_NS) -> Iterator[tuple[int, int]]:
    """``(index, intended send time)`` for ``count`` records at ``rate_per_s`` from now, each
    when its time has come (:func:`wait_until`)."""
    began = time.monotonic_ns()
    interval_ns = 1_000_000_000 // rate_per_s
    for index in range(count):
        due = began + index * interval_ns
        wait_until(due, spin_ns)
        yield index, due


def produce_paced(data_dir: str, count: int, start: Any, rate_per_s: int) -> None:
    from shmbroker import Producer

    pad = b"x" * (RECORD_BYTES - 8)
    with Producer(data_dir, acks=1, linger_ms=0) as producer:
        start.wait()
        for _, intended in paced(count, rate_per_s):
            # the intended send time, not the actual one (no coordinated omission)
            producer.send(TOPIC, struct.pack("<q", intended) + pad, partition=0)
        producer.flush()


def consume(data_dir: str, count: int, start_offset: int, mode: str, start: Any,
            results: Any, poll_spin_us: int = 0) -> None:
    from shmbroker import Consumer, TopicPartition

    tp = TopicPartition(TOPIC, 0)
    latencies: list[np.ndarray[Any, Any]] = []
    with Consumer(data_dir, fetch_max_bytes=8 << 20, fetch_max_wait_ms=100,
                  poll_spin_us=poll_spin_us) as consumer:
        consumer.assign([tp])
        consumer.seek(tp, start_offset)
        start.wait()
        began = time.perf_counter()
        got = 0
        deadline = time.monotonic() + 300
        while got < count and time.monotonic() < deadline:
            if mode == "columnar":
                for part in consumer.poll_columnar(timeout_ms=100):
                    got += int((part.offsets >= start_offset).sum())
            elif mode == "latency":
                records = consumer.poll(timeout_ms=100)
                now = time.monotonic_ns()
                if records:
                    sent = np.array([struct.unpack_from("<q", r.value)[0] for r in records])
                    latencies.append(now - sent)
                got += len(records)
            else:
                got += len(consumer.poll(timeout_ms=100))
        elapsed = time.perf_counter() - began
    lat = np.concatenate(latencies) / 1000 if latencies else np.empty(0)
    results.put({"records": got, "elapsed_s": elapsed,
                 "latency_us": {q: float(np.percentile(lat, q)) for q in (50, 99, 99.9)}
                 if len(lat) else {}})


def run_scenario(data_dir: str, mode: str, count: int, offset: int,
                 poll_spin_us: int = 0) -> dict[str, Any]:
    context = multiprocessing.get_context("spawn")
    start = context.Event()
    results = context.Queue()
    consumer = context.Process(target=consume,
                               args=(data_dir, count, offset, mode, start, results,
                                     poll_spin_us))
    if mode == "per-record":
        producer = context.Process(target=produce_per_record, args=(data_dir, count, start))
    elif mode == "columnar":
        producer = context.Process(target=produce_columnar, args=(data_dir, count, start))
    else:
        producer = context.Process(target=produce_paced, args=(data_dir, count, start, 10_000))
    consumer.start()
    producer.start()
    time.sleep(1.0)  # both processes imported numpy and connected
    start.set()
    result = results.get(timeout=600)
    producer.join(60)
    consumer.join(60)
    result["mode"] = mode
    result["records_per_s"] = result["records"] / result["elapsed_s"]
    result["gb_per_s"] = result["records_per_s"] * RECORD_BYTES / 1e9
    return result


def file_write_ceiling(directory: str, record_count: int) -> dict[str, Any]:
    """The disk's side of the columnar figure: the bytes that many records take in the log
    (RecordBatch framing included), written to a new file in the broker's directory with
    1 MiB ``os.write`` calls, no fsync, as the worker writes them.  Past the first few hundred
    MiB the page cache must write back as fast as it takes new data, so a long run measures
    the disk: the ceiling of any end-to-end figure that keeps what it is given."""
    from shmbroker.format.record_batch import encode_batch_columnar

    sample = 9708  # one ~1 MiB batch, as produce_columnar's batches are
    batch_bytes = len(encode_batch_columnar(b"x" * (RECORD_BYTES * sample),
                                            np.full(sample, RECORD_BYTES), timestamps=0))
    total = record_count * batch_bytes // sample
    chunk = b"x" * (1 << 20)
    path = os.path.join(directory, "write-ceiling.tmp")
    os.sync()  # start from the state every scenario starts from: nothing dirty
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        began = time.perf_counter()
        written = 0
        while written < total:
            written += os.write(fd, chunk[: min(len(chunk), total - written)])
        elapsed = time.perf_counter() - began
    finally:
        os.close(fd)
        os.unlink(path)
    return {"mode": "file write ceiling", "records": record_count, "elapsed_s": elapsed,
            "records_per_s": record_count / elapsed,
            "gb_per_s": record_count * RECORD_BYTES / elapsed / 1e9,
            "disk_gb_per_s": total / elapsed / 1e9,
            "latency_us": {}}


def python_call_floor(count: int = 300_000) -> float:
    """Calls/s of the cheapest possible ``send``: a function taking a lock and appending the
    value and a timestamp to lists.  No per-record API can beat it on this machine; it is the
    baseline the per-record figure is compared with."""
    import threading

    lock = threading.Lock()
    values: list[bytes] = []
    stamps: list[int] = []

    def send(topic: str, value: bytes, partition: int | None = None) -> int:
        lock.acquire()  # faster than "with lock" here, as Producer.send does it
        try:
            values.append(value)
            stamps.append(time.time_ns())
            return len(values)
        finally:
            lock.release()

    value = b"x" * RECORD_BYTES
    began = time.perf_counter()
    for _ in range(count):
        send(TOPIC, value, partition=0)
    return count / (time.perf_counter() - began)


@contextlib.contextmanager
def running_broker(temp: str, name: str, config_toml: str = "") -> Iterator[str]:
    """A broker serving a fresh data dir with the bench topic; yields the data dir."""
    data_dir = os.path.join(temp, name)
    command = python_module("shmbroker.cli", "serve", "--data-dir", data_dir,
                            "--log-level", "WARNING")
    if config_toml:
        config_path = os.path.join(temp, f"{name}.toml")
        Path(config_path).write_text(config_toml)
        command += ["--config", config_path]
    broker = subprocess.Popen(command, env=child_environment())
    try:
        _wait_socket(Path(data_dir) / "broker.sock", broker)
        from shmbroker import Admin

        with Admin(data_dir) as admin:
            admin.create_topic(TOPIC, partitions=1,
                               config={"segment_bytes": 1 << 30, "retention_bytes": 4 << 30})
        yield data_dir
    finally:
        broker.terminate()
        broker.wait(60)


def _print_run(label: str, result: dict[str, Any]) -> None:
    latency = result["latency_us"]
    print(f"{label:28s} {result['records_per_s'] / 1e6:7.3f}M rec/s "
          f"{result['gb_per_s']:6.3f} GB/s"
          + (f"  p50 {latency[50]:.0f} us p99 {latency[99]:.0f} us "
             f"p99.9 {latency[99.9]:.0f} us" if latency else ""), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=2_000_000)
    parser.add_argument("--columnar-records", type=int, default=20_000_000)
    parser.add_argument("--latency-records", type=int, default=30_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--modes", default="per-record,columnar,latency")
    parser.add_argument("--spin-sweep", default="",
                        help="comma-separated worker_spin_us values, each optionally "
                             "'/POLL_SPIN_US' for the consumer's poll_spin_us (default 0): "
                             "run the latency scenario once per value per round, each on its "
                             "own broker")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    modes = [mode for mode in args.modes.split(",") if mode]
    spins = [tuple(int(part) for part in (value + "/0").split("/")[:2])
             for value in args.spin_sweep.split(",") if value]
    counts = {"per-record": args.records, "columnar": args.columnar_records,
              "latency": args.latency_records}
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="shmbroker-bench-") as temp:
        if modes:
            with running_broker(temp, "data") as data_dir:
                offset = 0
                for round_index in range(args.repeat):
                    floor = {"mode": "python call floor", "round": round_index,
                             "records_per_s": python_call_floor(), "latency_us": {}}
                    floor["gb_per_s"] = floor["records_per_s"] * RECORD_BYTES / 1e9
                    runs.append(floor)
                    _print_run(f"round {round_index} python call floor", floor)
                    if "columnar" in modes:
                        ceiling = file_write_ceiling(data_dir, counts["columnar"])
                        ceiling["round"] = round_index
                        runs.append(ceiling)
                        _print_run(f"round {round_index} file write ceiling", ceiling)
                    for mode in modes:
                        os.sync()  # each scenario starts with nothing dirty in the page cache
                        result = run_scenario(data_dir, mode, counts[mode], offset)
                        offset += counts[mode]
                        result["round"] = round_index
                        runs.append(result)
                        _print_run(f"round {round_index} {mode}", result)
        for round_index in range(args.repeat if spins else 0):
            for spin, poll_spin in spins:
                with running_broker(temp, f"spin{spin}-{poll_spin}-{round_index}",
                                    f"worker_spin_us = {spin}\n") as data_dir:
                    result = run_scenario(data_dir, "latency", counts["latency"], 0, poll_spin)
                result.update(round=round_index,
                              mode=f"latency spin {spin}/{poll_spin} us")
                runs.append(result)
                _print_run(f"round {round_index} {result['mode']}", result)
    print("\nmedians:")
    for mode in dict.fromkeys(run["mode"] for run in runs):
        mine = [run for run in runs if run["mode"] == mode]
        rate = statistics.median(run["records_per_s"] for run in mine)
        line = f"  {mode:22s} {rate / 1e6:7.3f}M rec/s {rate * RECORD_BYTES / 1e9:6.3f} GB/s"
        if mode.startswith("latency"):
            for q in (50, 99, 99.9):
                line += f"  p{q} {statistics.median(run['latency_us'][q] for run in mine):.0f} us"
        print(line)
    print(f"  machine: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}")
    if args.json:
        args.json.write_bytes(orjson.dumps({"runs": runs}, option=orjson.OPT_NON_STR_KEYS))


if __name__ == "__main__":
    main()
