#!/usr/bin/env python3
"""What waking up costs on this machine: the floor under any produce-to-consume latency.

A record produced at 10k records/s with linger 0 wakes three sleepers on its way: the producer
(between paced sends), the partition worker (its doorbell) and the consumer (its fetch socket).
This measures the two costs every such hand-off pays, alternating conditions round by round:

* ``work after sleeping``: one linger-0 batch of one 100-byte record encoded (what ``send``
  does before the ring write) right after ``time.sleep(gap)``, against the same work in a hot
  loop.  On a virtual machine whose CPU idles, code that runs after a sleep finds cold caches
  (and, under a hypervisor, a vCPU that must be scheduled again).
* ``datagram ping-pong``: a doorbell datagram to another process and its reply, once every
  millisecond, the other process either blocked in ``poll`` (woken by each datagram) or
  spinning on a non-blocking ``recv``.

    python bench/wakeup.py --rounds 5
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import socket
import statistics
import sys
import time
from typing import Any

import numpy as np

from shmbroker.format import record_batch

VALUE = b"x" * 100
SAMPLES = 1500
ECHO_LIFETIME_S = 120.0  # far more than one ping-pong case takes (SAMPLES ms and a start)


def work_after_sleep(gap_s: float) -> float:
    """Median µs of encoding a one-record batch right after sleeping ``gap_s`` (0: hot loop)."""
    timings = np.empty(SAMPLES)
    for index in range(SAMPLES):
        if gap_s:
            time.sleep(gap_s)
        began = time.perf_counter_ns()
        record_batch.encode_batch([VALUE], timestamps=[1_700_000_000_000], producer_id=1,
                                  producer_epoch=0, base_sequence=index)
        timings[index] = time.perf_counter_ns() - began
    return float(np.median(timings)) / 1000


def _echo(address: bytes, spin: bool, ready: Any) -> None:
    """Answer each datagram until told to quit, or ECHO_LIFETIME_S at most (an orphan, its
    parent killed, must not spin on)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(0.0 if spin else 1.0)
    ready.set()
    deadline = time.monotonic() + ECHO_LIFETIME_S
    while time.monotonic() < deadline:
        try:
            data, sender = sock.recvfrom(16)
        except (BlockingIOError, TimeoutError):
            continue
        if data == b"q":
            return
        sock.sendto(data, sender)


def ping_pong(spin: bool) -> float:
    """Median µs of a datagram round trip to a process that sleeps in recv or spins on it."""
    context = multiprocessing.get_context("spawn")
    name = f"\0shmbroker-wakeup-{os.getpid()}-{int(spin)}".encode()
    ready = context.Event()
    echo = context.Process(target=_echo, args=(name, spin, ready), daemon=True)
    echo.start()
    ready.wait(30)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(name + b".client")
    sock.settimeout(5)
    timings = np.empty(SAMPLES)
    try:
        for index in range(SAMPLES):
            time.sleep(0.001)
            began = time.perf_counter_ns()
            sock.sendto(b"p", name)
            sock.recv(16)
            timings[index] = time.perf_counter_ns() - began
    finally:
        sock.sendto(b"q", name)
        echo.join(10)
        sock.close()
    return float(np.median(timings)) / 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    cases = {
        "encode, hot loop": lambda: work_after_sleep(0),
        "encode after a 50 us sleep": lambda: work_after_sleep(50e-6),
        "encode after a 200 us sleep": lambda: work_after_sleep(200e-6),
        "encode after a 2 ms sleep": lambda: work_after_sleep(2e-3),
        "ping-pong, the other side spins": lambda: ping_pong(spin=True),
        "ping-pong, the other side sleeps": lambda: ping_pong(spin=False),
    }
    results: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, case in cases.items():
            results[name].append(case())
    print(f"machine: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}; "
          f"{args.rounds} rounds of {SAMPLES} samples, median of the rounds' medians (µs)")
    for name, values in results.items():
        print(f"  {name:36s} {statistics.median(values):8.1f}   "
              f"(rounds {min(values):.1f}-{max(values):.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
