"""Runs one workload against a peer: its server, one producer and one consumer process.

The same shape as :mod:`shmbroker.perf.runner` (whose watch, collect and verdict steps it
reuses, so every system is measured and judged by one piece of code): the consumer process opens
its session first and says it is ready; the producer process opens its session, says it is
ready and starts when the parent opens the start gate (``StartGate``); it sends
the template payloads in chunks, each record carrying the 24-byte header (intended send time,
producer id, sequence: :mod:`shmbroker.perf.payloads`); the consumer decodes the headers of what
arrives into the latency histogram and the per-producer sequence bitmap.  The verdict: rates are
medians of the measured seconds, every acknowledged record must have been consumed.

Only the workload's record size, payload, rate, duration and warm-up apply to a peer: one
producer, one consumer, no keys, no compression.
"""

from __future__ import annotations

import multiprocessing
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from shmbroker.perf import payloads
from shmbroker.perf import runner as shm_runner
from shmbroker.perf.peers.base import Chunk, Peer
from shmbroker.perf.workload import Workload
from shmbroker.subprocesses import join_or_kill

TEMPLATE_RECORDS = shm_runner.TEMPLATE_RECORDS  # payloads generated once, reused cyclically
CHUNK_RECORDS = 1024  # records handed to a session at once (Redis: one pipeline); divides 4096
POLL_TIMEOUT_S = 0.1
FLUSH_TIMEOUT_S = 120.0
PRODUCER_INDEX = 0
CONSUMER_INDEX = 0


def _producer_main(peer_name: str, address: dict[str, Any], workload_dict: dict[str, Any],
                   start: Any, counters: Any, results: Any) -> None:
    try:
        results.put(("producer", PRODUCER_INDEX, _produce(
            peer_name, address, Workload(**workload_dict), start, counters)))
    except BaseException as error:  # the parent reports it; never hang it
        results.put(("error", f"{peer_name} producer", repr(error)))


def _produce(peer_name: str, address: dict[str, Any], workload: Workload, start: Any,
             counters: Any) -> dict[str, Any]:
    """``start``: the start gate shared with shmbroker's runner (:class:`StartGate`)."""
    from shmbroker.perf.peers import PEERS

    rng = np.random.default_rng(PRODUCER_INDEX)
    lengths = payloads.sizes(payloads.parse_size_spec(workload.record_size), TEMPLATE_RECORDS,
                             rng)
    template, lengths = payloads.make_payloads(workload.payload, lengths, rng)
    session = PEERS[peer_name].producer(address)
    session.prepare(template, lengths)
    interval_ns = int(1e9 / workload.rate_per_sec) if workload.rate_per_sec else 0
    shm_runner.freeze_startup_objects()  # as shmbroker's producers do
    pauses = shm_runner.PauseWatch()
    start_at = shm_runner._wait_for_start(start)
    end_at = start_at + workload.warmup_s + workload.duration_s
    sent = 0
    sent_bytes = 0
    slot = 2 * PRODUCER_INDEX
    try:
        while time.monotonic() < start_at:
            time.sleep(0.0005)
        start_ns = time.monotonic_ns()
        next_update = time.monotonic() + shm_runner.COUNTER_UPDATE_S
        while True:
            now = time.monotonic()
            if now >= end_at:
                break
            due = shm_runner.next_chunk(sent, start_ns, interval_ns, CHUNK_RECORDS)
            if due is None:
                continue
            first, seqs, intended = due
            count = len(seqs)
            session.send(Chunk(first, count, seqs, intended))
            if interval_ns:
                pauses.sent(int(intended[-1]), start_ns)  # due with its last record
            sent += count
            sent_bytes += int(lengths[first:first + count].sum())
            if now >= next_update:
                counters[slot] = sent
                next_update = now + shm_runner.COUNTER_UPDATE_S
        counters[slot] = sent
        session.flush(FLUSH_TIMEOUT_S)
    finally:
        session.close()
    acked = np.zeros(sent, dtype=bool)
    for first_seq, count in session.acked_ranges:
        acked[first_seq:first_seq + count] = True
    return {"sent": sent, "sent_bytes": sent_bytes, "errors": int(sent - acked.sum()),
            "acked": np.packbits(acked).tobytes(), "acked_count": int(acked.sum()),
            "pauses": pauses.close()}


def _consumer_main(peer_name: str, address: dict[str, Any], workload_dict: dict[str, Any],
                   expected: Any, ready: Any, counters: Any, results: Any,
                   warmup_end_ns: Any) -> None:
    try:
        results.put(("consumer", CONSUMER_INDEX, _consume(
            peer_name, address, Workload(**workload_dict), expected, ready, counters,
            warmup_end_ns)))
    except BaseException as error:
        results.put(("error", f"{peer_name} consumer", repr(error)))


def _consume(peer_name: str, address: dict[str, Any], workload: Workload, expected: Any,
             ready: Any, counters: Any, warmup_end_ns: Any) -> dict[str, Any]:
    """Consume until the producer is done (``expected`` >= 0: the records it had
    acknowledged) and either that many came and nothing more for DONE_IDLE_S, or nothing came
    for DRAIN_IDLE_S (the rules of shmbroker's runner)."""
    from shmbroker.perf.peers import PEERS

    tally = shm_runner.ConsumerTally(counters, 2 * (workload.producers + CONSUMER_INDEX))
    session = PEERS[peer_name].consumer(address)
    shm_runner.freeze_startup_objects()
    pauses = shm_runner.PauseWatch()
    try:
        with ready.get_lock():  # += is a read and a write: two consumers at once
            ready.value += 1  # could lose one, and the parent wait for it forever
        while True:
            got = 0
            for columns in session.poll(POLL_TIMEOUT_S):
                now_ns = time.monotonic_ns()
                intended, producer_ids, numbers = payloads.decode_headers(
                    columns.data, columns.value_positions, columns.value_lengths)
                tally.note(now_ns, intended, producer_ids, numbers, warmup_end_ns.value)
                got += len(columns.value_positions)
                tally.consumed_bytes += int(columns.value_lengths.sum())
            idle = tally.polled(got)
            if expected.value >= 0:
                if idle > shm_runner.DRAIN_IDLE_S or (
                        idle > shm_runner.DONE_IDLE_S and tally.consumed >= expected.value):
                    break
    finally:
        session.close()
    return {**tally.result(), "pauses": pauses.close()}


def run(peer: Peer, workload: Workload,
        progress: Callable[[dict[str, float]], None] | None = None) -> shm_runner.RunResult:
    """Start ``peer``'s server in a temp dir, run the workload against it, stop the server;
    the verdict (RuntimeError when a process failed)."""
    if workload.producers != 1 or workload.consumers != 1:
        raise ValueError("a peer runs one producer and one consumer")
    context = multiprocessing.get_context("spawn")
    counters = context.Array("q", 4, lock=False)
    expected = context.Value("q", -1, lock=False)  # set when the producer is done
    ready = context.Value("i", 0)
    warmup_end_ns = context.Value("q", 1 << 62, lock=False)
    results = context.Queue()
    processes: list[Any] = []
    workload_dict = workload.to_dict()
    with tempfile.TemporaryDirectory(prefix=f"shmbroker-compare-{peer.name}-") as temp:
        with peer.server(Path(temp)) as (address, server_pid):
            try:
                processes.append(context.Process(
                    target=_consumer_main, name=f"compare-{peer.name}-consumer",
                    args=(peer.name, address, workload_dict, expected, ready, counters,
                          results, warmup_end_ns)))
                processes[-1].start()
                deadline = time.monotonic() + shm_runner.READY_TIMEOUT_S
                while ready.value < 1:
                    if time.monotonic() > deadline or not processes[0].is_alive():
                        raise RuntimeError(shm_runner._child_errors(results)
                                           or f"the {peer.name} consumer did not start")
                    time.sleep(0.01)
                gate = shm_runner.StartGate(context)
                processes.append(context.Process(
                    target=_producer_main, name=f"compare-{peer.name}-producer",
                    args=(peer.name, address, workload_dict, gate, counters, results)))
                processes[-1].start()
                start_at = gate.open(1, processes, results)
                warmup_end_ns.value = int((start_at + workload.warmup_s) * 1e9)
                timeline = shm_runner._watch(workload, start_at, counters, processes, progress,
                                             server_pid)
                collected = shm_runner._collect(results, processes, workload, expected)
            finally:
                join_or_kill(processes, shm_runner.CHILD_JOIN_TIMEOUT_S)
    return shm_runner._verdict(workload, collected, timeline, server_pid, start_at)

