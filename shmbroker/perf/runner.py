"""Runs one workload against a broker: producer and consumer processes, then the verdict.

Processes (``multiprocessing``, spawn: no fork of a process with threads):

* **consumers** start first and say when they have their partitions (a group's assignment, or
  their share of every partition by explicit assignment);
* **producers** then start together at one ``start_at``, set once every producer process has
  started and opened its producer (:class:`StartGate`: a slow spawn on a loaded machine must
  not eat into the measured seconds).  Record ``seq`` of a producer is meant
  to be sent at ``start + seq / rate``: that *intended* time, not the moment ``send`` was
  reached, goes into the record (its 24-byte header: ``payloads.encode_headers``).  A producer
  that falls behind keeps the schedule, so the latency a consumer measures (arrival minus
  intended time) includes the time records waited to be sent: coordinated omission corrected,
  as the OpenMessaging Benchmark and Chronicle's JLBH do.  With ``rate_per_sec`` 0 the intended
  time is the send time.
* every child publishes running counts in a shared array (the live progress line and the
  per-second timeline) and, at the end, its results through a queue: producers the sequence
  numbers acknowledged (a bitmap), consumers a histogram of latencies after the warm-up and the
  sequence numbers they saw (a bitmap per producer).

The verdict: every acknowledged record must have been consumed; records lost are counted and
reported loudly (the CLI exits non-zero), duplicates are counted.
"""

from __future__ import annotations

import array
import collections
import contextlib
import gc
import multiprocessing
import operator
import os
import queue
import resource
import struct
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shmbroker.client.partitioner import partition_for_key
from shmbroker.perf import payloads
from shmbroker.perf.histogram import Histogram
from shmbroker.perf.workload import Workload
from shmbroker.subprocesses import join_or_kill

TEMPLATE_RECORDS = 4096  # payloads generated once per producer and reused cyclically
COUNTER_UPDATE_S = 0.05
CHUNKS_UNSWEPT_MAX = 64  # columnar: send_batch futures kept before the done ones are swept
# A consumer takes what it noted into its histogram at once after this many polls or records:
# few enough that taking them in (~0.2 ms) does not hold up the next poll for long
TALLY_PENDING_POLLS_MAX = 256
TALLY_PENDING_RECORDS_MAX = 16_384
# A client's pause worth noting: a garbage collection, or a paced send this late
PAUSE_NOTE_NS = 1_000_000
PAUSES_KEPT_MAX = 1000  # garbage collections noted per process, at most
READY_TIMEOUT_S = 60.0
CHILD_JOIN_TIMEOUT_S = 5.0  # at the end: then the children still alive are killed
START_MARGIN_S = 0.05  # from the last producer ready to the common start
DRAIN_IDLE_S = 3.0  # consumers stop after this long without a record, once producers are done
DONE_IDLE_S = 0.3  # ... or this long, once they have as many records as were acknowledged
_HEADER = struct.Struct("<qiiq")  # payloads.encode_headers' layout, for the per-record path
KEYS = 1000  # --keyed: records cycle through this many sensor keys


@dataclass
class RunResult:
    workload: Workload
    elapsed_s: float
    sent: int
    acknowledged: int
    send_errors: int
    consumed: int
    lost: int
    duplicates: int
    produce_rate_per_s: float
    consume_rate_per_s: float
    produce_mb_per_s: float
    consume_mb_per_s: float
    latency: Histogram
    timeline: list[dict[str, float]] = field(default_factory=list)
    broker: dict[str, Any] = field(default_factory=dict)
    clients: dict[str, float] = field(default_factory=dict)  # the producers' and consumers' CPU%
    start_monotonic_s: float = 0.0  # the producers' start, CLOCK_MONOTONIC (for other logs)
    # the worst latency of each second of the run (after the warm-up): where a stall happened
    latency_max_per_s: list[dict[str, float]] = field(default_factory=list)
    # the clients' garbage collections and late paced sends (PauseWatch; t_s as above)
    client_pauses: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        percentiles = self.latency.percentiles([50, 90, 99, 99.9, 99.99, 100]) \
            if self.latency.count else {}
        return {
            "workload": self.workload.to_dict(), "elapsed_s": self.elapsed_s,
            "sent": self.sent, "acknowledged": self.acknowledged,
            "send_errors": self.send_errors, "consumed": self.consumed, "lost": self.lost,
            "duplicates": self.duplicates, "produce_rate_per_s": self.produce_rate_per_s,
            "consume_rate_per_s": self.consume_rate_per_s,
            "produce_mb_per_s": self.produce_mb_per_s, "consume_mb_per_s": self.consume_mb_per_s,
            "latency_us": {f"{p:g}": value / 1000 for p, value in percentiles.items()},
            "latency_histogram": self.latency.to_dict(), "timeline": self.timeline,
            "broker": self.broker, "clients": self.clients,
            "start_monotonic_s": self.start_monotonic_s,
            "latency_max_per_s": self.latency_max_per_s, "client_pauses": self.client_pauses}


# -- children ------------------------------------------------------------------------------------
def _producer_main(data_dir: str, topics: list[str], workload_dict: dict[str, Any], index: int,
                   start: Any, counters: Any, results: Any) -> None:
    try:
        results.put(("producer", index, _produce(data_dir, topics, Workload(**workload_dict),
                                                 index, start, counters)))
    except BaseException as error:  # the parent reports it; never hang it
        results.put(("error", f"producer {index}", repr(error)))


def _produce(data_dir: str, topics: list[str], workload: Workload, index: int, start: Any,
             counters: Any) -> dict[str, Any]:
    """``start``: the start gate (a shared double): this producer says it is ready by adding 1
    to ``start.ready``, then waits until the parent sets ``start.value`` to the common start
    time (monotonic seconds)."""
    from shmbroker import Producer

    rng = np.random.default_rng(index)
    spec = payloads.parse_size_spec(workload.record_size)
    # (a columnar chunk never wraps the template: it holds one chunk at least)
    template_records = (max(TEMPLATE_RECORDS, workload.chunk_records)
                        if workload.api == "columnar" else TEMPLATE_RECORDS)
    lengths = payloads.sizes(spec, template_records, rng)
    buffer, lengths = payloads.make_payloads(workload.payload, lengths, rng)
    template = bytearray(buffer)
    template_view = memoryview(template)
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1])).astype(np.int64)
    rate = workload.rate_per_sec / workload.producers
    interval_ns = int(1e9 / rate) if rate > 0 else 0
    compression = None if workload.compression == "none" else workload.compression
    acks = {"0": 0, "1": 1, "all": "all"}[workload.acks]
    keys = [b"sensor-%04d" % k for k in range(KEYS)] if workload.keyed else None
    partitions: list[tuple[str, int]] = []
    sent = 0
    sent_bytes = 0
    # columnar: the send_batch futures not yet swept (future, first seq, count), and the chunks
    # acknowledged so far as (first seq, count) pairs of ints: a run of millions of records
    # keeps no future it no longer needs (those it kept had made the producer's full garbage
    # collections walk every batch of the run: 46 ms at the end of a 10-s run)
    outcomes: collections.deque[tuple[Any, int, int]] = collections.deque()
    acked_chunks = array.array("q")
    chunk_errors = 0
    # per-record: each record's batch slot; batches are swept into ``batch_ok`` as they
    # complete and then dropped, so the producer does not hold every batch of the run (a full
    # garbage collection walking them stalled it for tens of ms: the latency tail)
    open_slots: dict[Any, int] = {}
    unswept: collections.deque[tuple[Any, int]] = collections.deque()
    slot_of_seq = array.array("i")  # (an append costs less than a numpy element store)
    batch_ok = np.zeros(1 << 12, dtype=bool)
    slots = 0

    def sweep_chunks(final: bool) -> None:
        nonlocal chunk_errors
        while outcomes and (final or outcomes[0][0].done()):
            future, first, count = outcomes.popleft()
            try:
                future.result(0)
                acked_chunks.extend((first, count))
            except Exception:
                chunk_errors += count

    def sweep(final: bool) -> None:
        nonlocal batch_ok
        while unswept and (final or unswept[0][0].done):
            batch, slot = unswept.popleft()
            if slot >= len(batch_ok):
                batch_ok = np.concatenate((batch_ok, np.zeros(max(slot + 1, len(batch_ok)),
                                                              dtype=bool)))
            batch_ok[slot] = batch.done and batch.error is None
            del open_slots[batch]
    with Producer(data_dir, acks=acks, linger_ms=workload.linger_ms,
                  batch_size_bytes=workload.batch_size_bytes, ring_bytes=workload.ring_bytes,
                  compression=compression) as producer:
        partition_counts = {topic: len(producer.partitions_for(topic)) for topic in topics}
        for topic in topics:
            partitions += [(topic, partition) for partition in range(partition_counts[topic])]
        partitions = producer_share(partitions, index, workload.producers)
        freeze_startup_objects()
        pauses = PauseWatch()
        start_at = _wait_for_start(start)
        end_at = start_at + workload.warmup_s + workload.duration_s
        while time.monotonic() < start_at:
            time.sleep(0.0005)
        start_ns = time.monotonic_ns()
        next_update = time.monotonic() + COUNTER_UPDATE_S
        topic_count = len(topics)
        if workload.api == "columnar":
            chunk = workload.chunk_records if not interval_ns else max(1, min(
                workload.chunk_records, int(rate / 1000) or 1))
            target = 0
            while True:
                now = time.monotonic()
                if now >= end_at:
                    break
                due = next_chunk(sent, start_ns, interval_ns, chunk, template_records)
                if due is None:
                    continue
                first, seqs, intended = due
                take = len(seqs)
                values = bytearray(template_view[starts[first]:starts[first] + int(
                    lengths[first:first + take].sum())])  # one copy (a slice would be two)
                payloads.encode_headers(values, starts[first:first + take] - starts[first],
                                        intended, index, seqs)
                topic, partition = partitions[target % len(partitions)]
                chunk_keys = None
                if keys is not None:  # a burst of one sensor: the key routes the chunk
                    key = keys[target % KEYS]
                    topic = topics[target % topic_count]
                    partition = partition_for_key(key, partition_counts[topic])
                    chunk_keys = [key] * take
                target += 1
                future = producer.send_batch(topic, (values, lengths[first:first + take]),
                                             partition=partition, keys=chunk_keys)
                if interval_ns:  # a chunk goes when its last record is due
                    pauses.sent(int(intended[-1]), start_ns)
                outcomes.append((future, sent, take))
                if len(outcomes) >= CHUNKS_UNSWEPT_MAX:
                    sweep_chunks(final=False)
                sent += take
                sent_bytes += len(values)
                if now >= next_update:
                    counters[2 * index] = sent
                    next_update = now + COUNTER_UPDATE_S
        else:
            # The loop's own bookkeeping is kept to a few operations a record (a third of the
            # producer's time went to it): each value made by one pack of the header and the
            # template's payload, and a record's batch looked up only when it differs from
            # the record before's.
            send = producer.send
            views = [bytes(template[int(starts[i]) + payloads.HEADER_BYTES:
                                    int(starts[i] + lengths[i])]) for i in range(TEMPLATE_RECORDS)]
            packers = {len(view): struct.Struct(f"{_HEADER.format}{len(view)}s").pack
                       for view in views}
            packs = [packers[len(view)] for view in views]
            append_slot = slot_of_seq.append
            last_batch = None
            last_slot = -1
            while True:
                if interval_ns:
                    intended = start_ns + sent * interval_ns
                    ahead_ns = intended - time.monotonic_ns()
                    if ahead_ns > 2_000_000:  # sleep most of a long wait, spin the rest:
                        time.sleep((ahead_ns - 1_000_000) / 1e9)  # a sleep overshoots
                    while time.monotonic_ns() < intended:
                        pass
                else:
                    intended = time.monotonic_ns()
                template_index = sent % TEMPLATE_RECORDS
                value = packs[template_index](intended, index, 0, sent, views[template_index])
                if keys is not None:
                    future = send(topics[sent % topic_count], value, key=keys[sent % KEYS])
                else:
                    topic, partition = partitions[sent % len(partitions)]
                    future = send(topic, value, partition=partition)
                if interval_ns:
                    pauses.sent(intended, start_ns)
                batch = future.batch
                if batch is not last_batch:
                    last_slot = open_slots.get(batch, -1)
                    if last_slot < 0:
                        last_slot = open_slots[batch] = slots
                        slots += 1
                        unswept.append((batch, last_slot))
                    last_batch = batch
                append_slot(last_slot)
                sent += 1
                sent_bytes += len(value)
                if not sent & 255:
                    sweep(final=False)
                    now = time.monotonic()
                    if now >= end_at:
                        break
                    if now >= next_update:
                        counters[2 * index] = sent
                        next_update = now + COUNTER_UPDATE_S
        producer.flush(120)
        sweep(final=True)
    counters[2 * index] = sent
    acked = np.zeros(sent, dtype=bool)
    errors = 0
    if workload.api == "columnar":
        sweep_chunks(final=True)
        for first, count in zip(acked_chunks[::2], acked_chunks[1::2]):
            acked[first:first + count] = True
        errors = chunk_errors
    else:
        acked = batch_ok[np.frombuffer(slot_of_seq, dtype=np.intc)] if sent else acked
        errors = int(sent - acked.sum())
    if acks == 0:
        acked[:] = False  # acks=0: nothing is acknowledged, nothing can be called lost
    return {"sent": sent, "sent_bytes": sent_bytes, "errors": errors,
            "acked": np.packbits(acked).tobytes(), "acked_count": int(acked.sum()),
            "pauses": pauses.close()}


class PauseWatch:
    """When a benchmark client stopped running its loop, so that a latency spike can be put
    on a process: its garbage collections (through ``gc.callbacks``: how many per generation,
    and each one of PAUSE_NOTE_NS or longer with its start) and, for a paced producer, the
    latest send of each second against its intended time, with what the sending thread did
    since its last send on time: the CPU it ran (a page fault's time in the kernel counts), its
    voluntary (a lock, the GIL) and involuntary (preempted by the kernel) context switches and
    its page faults (``thread_time_ns`` and ``getrusage(RUSAGE_THREAD)``: ~1.2 µs a send).
    Read beside the consumers' worst latency per second and the broker's stall warnings
    (README, "Read the stall warnings")."""

    def __init__(self) -> None:
        self.collections = [0, 0, 0]
        self.long_collections: list[tuple[int, int, int]] = []  # (start ns, took ns, gen)
        # second of the run -> the latest send: (ns late, ns since the last send on time,
        # the thread's CPU ns meanwhile, voluntary and involuntary context switches and page
        # faults meanwhile)
        self.late_max: dict[int, tuple[int, int, int, int, int, int]] = {}
        self._started_ns = 0
        # the last send on time returned: (monotonic ns, thread CPU ns, rusage)
        self._last: tuple[int, int, Any] | None = None
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        now = time.monotonic_ns()
        if phase == "start":
            self._started_ns = now
            return
        generation = info["generation"]
        self.collections[generation] += 1
        took = now - self._started_ns
        if took >= PAUSE_NOTE_NS and len(self.long_collections) < PAUSES_KEPT_MAX:
            self.long_collections.append((self._started_ns, took, generation))

    def sent(self, intended_ns: int, start_ns: int) -> None:
        """A paced send just returned; it was meant to go at ``intended_ns``."""
        now = time.monotonic_ns()
        cpu = time.thread_time_ns()  # (getrusage's CPU times lag by milliseconds)
        usage = resource.getrusage(resource.RUSAGE_THREAD)
        late = now - intended_ns
        if late >= PAUSE_NOTE_NS and self._last is not None:
            second = (intended_ns - start_ns) // 1_000_000_000
            if late > self.late_max.get(second, (0,))[0]:
                last_ns, last_cpu, last = self._last
                self.late_max[second] = (late, now - last_ns, cpu - last_cpu,
                                         usage.ru_nvcsw - last.ru_nvcsw,
                                         usage.ru_nivcsw - last.ru_nivcsw,
                                         usage.ru_minflt - last.ru_minflt)
        else:
            self._last = (now, cpu, usage)

    def close(self) -> dict[str, Any]:
        """Stop watching; what the parent merges (:func:`_client_pauses`)."""
        with contextlib.suppress(ValueError):
            gc.callbacks.remove(self._on_gc)
        return {"collections": self.collections, "long_collections": self.long_collections,
                "late_max": self.late_max}


def freeze_startup_objects() -> None:
    """What the README advises latency-minded applications: once set up, move every object
    made so far (modules, numpy, the client) out of the garbage collector's reach, so that a
    full collection walks only what the run makes (a full collection of a process that imported
    numpy took ~30 ms on the 16-core device machine)."""
    gc.collect()
    gc.freeze()


class StartGate:
    """Producers start together once all of them are ready (a slow spawn on a loaded machine
    must not eat into the measured seconds: a 1-second run could see none of them)."""

    def __init__(self, context: Any) -> None:
        self.ready = context.Value("i", 0)
        self.start_at = context.Value("d", 0.0, lock=False)

    def open(self, producers: int, processes: list[Any], results: Any) -> float:
        """Wait until ``producers`` are ready; set and return the start time."""
        _wait_children("producers", lambda: self.ready.value >= producers,
                       lambda: f"{self.ready.value} of {producers} ready", processes, results,
                       0.005)
        self.start_at.value = start_at = time.monotonic() + START_MARGIN_S
        return start_at


def _wait_children(what: str, ready: Callable[[], bool], progress: Callable[[], str],
                   processes: list[Any], results: Any, pause_s: float) -> None:
    """Wait until ``ready()``; RuntimeError naming the children that died (with their errors)
    or, after READY_TIMEOUT_S, what ``progress()`` says."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not ready():
        if time.monotonic() > deadline or not all(p.is_alive() for p in processes):
            dead = [f"{p.name} exited with {p.exitcode}" for p in processes
                    if not p.is_alive()]
            raise RuntimeError(_child_errors(results) or (
                f"the {what} did not start: {', '.join(dead)}" if dead else
                f"the {what} did not start in {READY_TIMEOUT_S:.0f} s: {progress()}"))
        time.sleep(pause_s)


def _wait_for_start(start: StartGate) -> float:
    with start.ready.get_lock():
        start.ready.value += 1
    deadline = time.monotonic() + 2 * READY_TIMEOUT_S
    while not start.start_at.value:
        if time.monotonic() > deadline:
            raise RuntimeError("the start signal never came")
        time.sleep(0.001)
    return float(start.start_at.value)


def next_chunk(sent: int, start_ns: int, interval_ns: int, chunk: int,
               template_records: int = TEMPLATE_RECORDS,
               ) -> tuple[int, np.ndarray, np.ndarray] | None:
    """The next chunk a chunked producer sends: ``(first, seqs, intended_ns)``, ``first`` the
    index of record ``sent`` in a template of ``template_records`` (a chunk never wraps the
    template).  Paced (``interval_ns``): what the schedule says is due, at most ``chunk``, or
    None after a short sleep while nothing is; else ``chunk`` records, intended now."""
    if interval_ns:
        due = (time.monotonic_ns() - start_ns) // interval_ns + 1
        if due <= sent:
            time.sleep(min(0.001, (sent - due + 1) * interval_ns / 1e9))
            return None
        count = min(chunk, due - sent)
    else:
        count = chunk
    first = sent % template_records
    seqs = np.arange(sent, sent + min(count, template_records - first), dtype=np.int64)
    intended = (start_ns + seqs * interval_ns) if interval_ns else np.full(
        len(seqs), time.monotonic_ns(), dtype=np.int64)
    return first, seqs, intended


def producer_share(partitions: list[tuple[str, int]], index: int,
                   producers: int) -> list[tuple[str, int]]:
    """The partitions unkeyed producer ``index`` sends to: the producers split them as the
    consumers do (N producers on N partitions: one each), and share them round-robin when
    there are more producers than partitions."""
    if producers <= len(partitions):
        return partitions[index::producers]
    return [partitions[index % len(partitions)]]


def _consumer_main(data_dir: str, topics: list[str], workload_dict: dict[str, Any], index: int,
                   expected: Any, ready: Any, counters: Any, results: Any,
                   warmup_end_ns: Any) -> None:
    try:
        results.put(("consumer", index, _consume(data_dir, topics, Workload(**workload_dict),
                                                 index, expected, ready, counters,
                                                 warmup_end_ns)))
    except BaseException as error:
        results.put(("error", f"consumer {index}", repr(error)))


def _consume(data_dir: str, topics: list[str], workload: Workload, index: int,
             expected: Any, ready: Any, counters: Any, warmup_end_ns: Any) -> dict[str, Any]:
    """Consume until the producers are done (``expected`` >= 0: the records acknowledged, or
    sent with acks=0) and either the consumers together have that many and nothing came for
    DONE_IDLE_S, or nothing came for DRAIN_IDLE_S."""
    from shmbroker import Consumer, TopicPartition

    tally = ConsumerTally(counters, 2 * (workload.producers + index))
    group = workload.group
    with Consumer(data_dir, group_id=group, auto_offset_reset="earliest",
                  enable_auto_commit=group is not None, fetch_max_wait_ms=100,
                  poll_spin_us=workload.poll_spin_us) as consumer:
        if group is not None:  # the parent waits for the group to settle (more consumers than
            consumer.subscribe(topics)  # partitions: some never get one)
            consumer.poll(50)
        else:
            every = [TopicPartition(topic, partition) for topic in topics
                     for partition in consumer.partitions_for(topic)]
            mine = every[index::workload.consumers]
            consumer.assign(mine)
            if mine:
                consumer.seek_to_beginning()
        freeze_startup_objects()
        pauses = PauseWatch()
        with ready.get_lock():  # += is a read and a write: two consumers at once
            ready.value += 1  # could lose one, and the parent wait for it forever
        next_offsets: dict[Any, int] = {}
        columnar = workload.api == "columnar"
        record_value = operator.attrgetter("value")
        while True:
            got = 0
            if columnar:
                # a poll's headers gathered with one copy (zero-copy views of each batch's
                # values) and noted once: paced runs fetch many small batches, and the
                # histogram and bookkeeping per batch made the consumer fall behind
                headers: list[np.ndarray] = []
                for part in consumer.poll_columnar(100):
                    tp = (part.topic, part.partition)
                    floor = next_offsets.get(tp, -1)
                    for batch in part.batches:
                        offsets = batch.offsets
                        skip = 0 if not len(offsets) or offsets[0] >= floor else int(
                            np.searchsorted(offsets, floor))
                        items, value_bytes = payloads.batch_headers(batch, skip)
                        headers += items
                        got += max(len(offsets) - skip, 0)
                        tally.consumed_bytes += value_bytes
                    next_offsets[tp] = int(part.offsets[-1]) + 1
                if headers:
                    intended, producer_ids, numbers = payloads.header_columns(headers)
                    tally.note(time.monotonic_ns(), intended, producer_ids, numbers,
                               warmup_end_ns.value)
            else:
                records = consumer.poll(100)
                if records:
                    now_ns = time.monotonic_ns()
                    intended, producer_ids, numbers, value_bytes = payloads.value_headers(
                        list(map(record_value, records)))
                    tally.note(now_ns, intended, producer_ids, numbers, warmup_end_ns.value)
                    got = len(records)
                    tally.consumed_bytes += value_bytes
            idle = tally.polled(got)
            if expected.value >= 0:
                together = sum(counters[2 * (workload.producers + other)]
                               for other in range(workload.consumers))
                if idle > DRAIN_IDLE_S or idle > DONE_IDLE_S and together >= expected.value:
                    break
    return {**tally.result(), "pauses": pauses.close()}


class ConsumerTally:
    """What a benchmark consumer process counts (shmbroker's and the peers'): the latency
    histogram, the sequence numbers seen per producer, records and bytes, and when it last got
    one; published to the parent's shared ``counters`` at ``slot`` (records every
    COUNTER_UPDATE_S, and the live line's "p99 so far" at ``slot + 1`` every second)."""

    def __init__(self, counters: Any, slot: int) -> None:
        self.histogram = Histogram()
        self.seqs: dict[int, list[np.ndarray]] = {}
        # what note() was given and the histogram and ``seqs`` have not taken yet: a paced run
        # polls one record at a time, and taking each poll's few records into them (~40 µs of
        # numpy calls) kept a consumer busy enough at 10k polls/s to add to the latency
        # (measured latencies, producer ids, sequence numbers, the poll's time in ns) per poll
        self._pending: list[tuple[np.ndarray, np.ndarray, np.ndarray, int]] = []
        self._pending_records = 0
        # the worst latency (ns) of the records consumed in each second after the warm-up (0 =
        # the first): when in a run a stall happened
        self.second_max: dict[int, int] = {}
        self._warmup_end_ns = 0
        self.consumed = 0
        self.consumed_bytes = 0
        self.counters = counters
        self.slot = slot
        self.idle_since = time.monotonic()
        self._next_update = self.idle_since + COUNTER_UPDATE_S
        self._next_p99 = self.idle_since

    def note(self, now_ns: int, intended: np.ndarray, producer_ids: np.ndarray,
             numbers: np.ndarray, warmup_end_ns: int) -> None:
        """Latencies (after the warm-up) for the histogram; sequence numbers per producer.
        Taken in by :meth:`flush` (after TALLY_PENDING_POLLS_MAX calls or
        TALLY_PENDING_RECORDS_MAX records, and before the histogram or the sequence numbers are
        read)."""
        if not len(intended):
            return
        self._warmup_end_ns = warmup_end_ns
        latencies = now_ns - intended
        if intended.min() < warmup_end_ns:
            latencies = latencies[intended >= warmup_end_ns]
        self._pending.append((latencies, producer_ids, numbers, now_ns))
        self._pending_records += len(intended)
        if (self._pending_records >= TALLY_PENDING_RECORDS_MAX
                or len(self._pending) >= TALLY_PENDING_POLLS_MAX):
            self.flush()

    def flush(self) -> None:
        """Take what :meth:`note` was given into the histogram and ``seqs``."""
        if not self._pending:
            return
        latency_parts, id_parts, number_parts, polls = zip(*self._pending)
        latencies, producer_ids, numbers = (np.concatenate(parts) for parts in (
            latency_parts, id_parts, number_parts))
        if len(latencies):
            self.histogram.record_many(latencies)
            # per poll's second: the polls' times repeated per measured latency, then the
            # maximum of each run of one second (the polls come in time order; a poll with a
            # measured latency came after the warm-up's end)
            seconds = np.repeat((np.array(polls, dtype=np.int64) - self._warmup_end_ns)
                                // 1_000_000_000, [len(part) for part in latency_parts])
            starts = np.flatnonzero(np.diff(seconds, prepend=-1))
            for second, worst in zip(seconds[starts].tolist(),
                                     np.maximum.reduceat(latencies, starts).tolist()):
                self.second_max[second] = max(worst, self.second_max.get(second, worst))
        self._pending.clear()
        self._pending_records = 0
        for producer_id in np.unique(producer_ids):
            self.seqs.setdefault(int(producer_id), []).append(numbers[producer_ids == producer_id])

    def polled(self, records: int) -> float:
        """Count one poll's records, publish when due; the seconds since a record last came."""
        self.consumed += records
        now = time.monotonic()
        if records:
            self.idle_since = now
        if now >= self._next_update:
            self.counters[self.slot] = self.consumed
            self._next_update = now + COUNTER_UPDATE_S
            if now >= self._next_p99:
                self.flush()
                if self.histogram.count:
                    self.counters[self.slot + 1] = int(self.histogram.percentile(99) // 1000)
                self._next_p99 = now + 1.0
        return now - self.idle_since

    def result(self) -> dict[str, Any]:
        """The final count (also into the shared counters) and what the parent merges."""
        self.flush()
        self.counters[self.slot] = self.consumed
        bitmaps = {}
        duplicates = 0
        for producer_id, parts in self.seqs.items():
            counts = np.bincount(np.concatenate(parts))
            duplicates += int((counts > 1).sum() and (counts - 1).clip(0).sum())
            bitmaps[producer_id] = np.packbits(counts > 0).tobytes()
        return {"consumed": self.consumed, "consumed_bytes": self.consumed_bytes,
                "duplicates": duplicates, "histogram": self.histogram.to_dict(),
                "seen": bitmaps, "second_max": self.second_max}


# -- the parent ----------------------------------------------------------------------------------
def run(workload: Workload, data_dir: str,
        progress: Callable[[dict[str, float]], None] | None = None,
        broker_pid: int | None = None) -> RunResult:
    """Create the workload's topics, run it, delete them, return the verdict."""
    from shmbroker import Admin

    context = multiprocessing.get_context("spawn")
    prefix = f"shmbroker-bench-{uuid.uuid4().hex[:8]}"
    topics = [f"{prefix}-{i}" for i in range(workload.topics)]
    with Admin(data_dir) as admin:
        for topic in topics:
            admin.create_topic(topic, partitions=workload.partitions,
                               config={"flush_messages": 1} if workload.durable else None)
    children = workload.producers + workload.consumers
    counters = context.Array("q", 2 * children, lock=False)
    expected = context.Value("q", -1, lock=False)  # set when the producers are done
    ready = context.Value("i", 0)
    warmup_end_ns = context.Value("q", 1 << 62, lock=False)
    results = context.Queue()
    processes = []
    workload_dict = workload.to_dict()
    try:
        for index in range(workload.consumers):
            processes.append(context.Process(
                target=_consumer_main, name=f"bench-consumer-{index}",
                args=(data_dir, topics, workload_dict, index, expected, ready, counters,
                      results, warmup_end_ns)))
            processes[-1].start()
        group = workload.group
        _wait_children(
            "consumers", lambda: ready.value >= workload.consumers and (
                group is None or _group_settled(data_dir, group, workload.consumers)),
            lambda: f"{ready.value} of {workload.consumers} ready" + (
                f", group {group!r}: {_group_state(data_dir, group)}" if group is not None
                else ""),
            processes, results, 0.01)
        gate = StartGate(context)
        for index in range(workload.producers):
            processes.append(context.Process(
                target=_producer_main, name=f"bench-producer-{index}",
                args=(data_dir, topics, workload_dict, index, gate, counters, results)))
            processes[-1].start()
        start_at = gate.open(workload.producers, processes, results)
        warmup_end_ns.value = int((start_at + workload.warmup_s) * 1e9)
        timeline = _watch(workload, start_at, counters, processes, progress, broker_pid)
        collected = _collect(results, processes, workload, expected)
    finally:
        join_or_kill(processes, CHILD_JOIN_TIMEOUT_S)
        with contextlib.suppress(Exception), Admin(data_dir) as admin:
            for topic in topics:
                admin.delete_topic(topic)
    return _verdict(workload, collected, timeline, broker_pid, start_at)


def _group_state(data_dir: str, group: str) -> str:
    """The group's state and members, for an error message."""
    from shmbroker import Admin
    from shmbroker.errors import ShmbrokerError

    try:
        with Admin(data_dir) as admin:
            description = admin.describe_consumer_group(group)
    except ShmbrokerError as error:
        return f"cannot describe it ({error})"
    return (f"{description['state']}, {len(description['members'])} member(s) "
            f"{[(m['state'], m['assignment']) for m in description['members']]}")


def _group_settled(data_dir: str, group: str, consumers: int) -> bool:
    """Every consumer is a member and the assignment is reconciled (Stable)."""
    from shmbroker import Admin
    from shmbroker.errors import GroupIdNotFoundError

    try:
        with Admin(data_dir) as admin:
            description = admin.describe_consumer_group(group)
    except GroupIdNotFoundError:
        return False
    return description["state"] == "Stable" and len(description["members"]) == consumers


def _watch(workload: Workload, start_at: float, counters: Any, processes: list[Any],
           progress: Callable[[dict[str, float]], None] | None,
           broker_pid: int | None) -> list[dict[str, float]]:
    """Sample the counters every second until the run's end; the timeline.  (It does not wait
    for the children to exit: they exit after the parent has read their results, which may be
    larger than a pipe holds.)"""
    producer_slots = range(0, 2 * workload.producers, 2)
    consumer_slots = range(2 * workload.producers, 2 * (workload.producers
                                                        + workload.consumers), 2)
    end_at = start_at + workload.warmup_s + workload.duration_s
    last_cpu_s = _broker_usage(broker_pid)["broker_cpu_s"] if broker_pid is not None else None
    clients = ClientCpu(processes)
    timeline = []
    last_sent = last_consumed = 0
    last_t = start_at
    while time.monotonic() < start_at:
        time.sleep(0.01)
    while last_t < end_at:
        time.sleep(max(0.0, min(last_t + 1.0, end_at) - time.monotonic()))
        now = time.monotonic()
        sent = sum(counters[slot] for slot in producer_slots)
        consumed = sum(counters[slot] for slot in consumer_slots)
        point = {"t_s": round(now - start_at, 3),
                 "produce_per_s": (sent - last_sent) / (now - last_t),
                 "consume_per_s": (consumed - last_consumed) / (now - last_t),
                 "sent": sent, "consumed": consumed,
                 # the worst consumer's p99 so far (an upper bound of the merged one)
                 "p99_us": max((counters[slot + 1] for slot in consumer_slots), default=0)}
        if broker_pid is not None:
            usage = _broker_usage(broker_pid)
            point.update(usage)
            # CPU% of the broker's processes (100 = one core) over this second
            point["broker_cpu_pct"] = round(
                100 * (usage["broker_cpu_s"] - last_cpu_s) / (now - last_t), 1) \
                if last_cpu_s is not None else 0.0
            last_cpu_s = usage["broker_cpu_s"]
        point.update(clients.sample(now))
        timeline.append(point)
        if progress is not None:
            progress(point)
        last_sent, last_consumed, last_t = sent, consumed, now
        if not any(process.is_alive() for process in processes):
            break  # every child failed early: _collect says why
    return timeline


def _collect(results: Any, processes: list[Any], workload: Workload,
             expected: Any) -> dict[str, Any]:
    """Every child's results; once every producer reported, ``expected`` tells the consumers
    how many records to wait for."""
    collected: dict[str, Any] = {"producer": {}, "consumer": {}, "errors": []}
    wanted = workload.producers + workload.consumers
    deadline = time.monotonic() + 240
    while len(collected["producer"]) + len(collected["consumer"]) + len(
            collected["errors"]) < wanted:
        try:
            kind, index, value = results.get(timeout=1.0)
        except queue.Empty:
            if time.monotonic() > deadline or not any(p.is_alive() for p in processes):
                collected["errors"].append("some workers never reported (killed?)")
                break
            continue
        if kind == "error":
            collected["errors"].append(f"{index}: {value}")
            expected.value = 0  # a failed run: consumers stop at the idle timeout
        else:
            collected[kind][index] = value
        if kind == "producer" and len(collected["producer"]) == workload.producers:
            expected.value = sum(max(result["acked_count"], 0 if workload.acks != "0"
                                     else result["sent"])
                                 for result in collected["producer"].values())
    return collected


def _child_errors(results: Any, wait_s: float = 1.0) -> str:
    """The errors children reported.  A child that failed puts its error on the queue just
    before it exits, and the queue's feeder thread may deliver it a moment after the exit: wait
    up to ``wait_s`` for the first one."""
    found = []
    with contextlib.suppress(queue.Empty):
        while True:
            kind, index, value = results.get(timeout=wait_s) if not found and wait_s else \
                results.get_nowait()
            wait_s = 0.0
            if kind == "error":
                found.append(f"{index}: {value}")
    return "; ".join(found)


def _broker_usage(broker_pid: int) -> dict[str, float]:
    """CPU seconds and RSS of the broker's processes (supervisor and workers)."""
    import psutil

    cpu = 0.0
    rss = 0
    with contextlib.suppress(psutil.Error):
        supervisor = psutil.Process(broker_pid)
        for process in [supervisor, *supervisor.children(recursive=True)]:
            with contextlib.suppress(psutil.Error), process.oneshot():
                cpu += _cpu_s(process)
                rss += process.memory_info().rss
    return {"broker_cpu_s": round(cpu, 3), "broker_rss_bytes": rss}


def _cpu_s(process: Any) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


class ClientCpu:
    """CPU% of the run's producer and consumer processes over each second of the timeline
    (100 = one core, summed over the processes of a kind): with the broker's, where a
    partition's cores go, and so what bounds scaling on a many-core host.  A process is a
    producer when its name says so (both runners name their children "...producer...")."""

    KINDS = ("producers", "consumers")

    def __init__(self, processes: list[Any]) -> None:
        import psutil

        self._psutil = psutil
        self._processes: dict[str, list[Any]] = {kind: [] for kind in self.KINDS}
        for process in processes:
            kind = "producers" if "producer" in process.name else "consumers"
            with contextlib.suppress(psutil.Error, ValueError):
                self._processes[kind].append(psutil.Process(process.pid))
        self._last = self._totals()
        self._last_t = time.monotonic()

    def _totals(self) -> dict[str, float]:
        totals = {}
        for kind, processes in self._processes.items():
            total = 0.0
            for process in processes:
                with contextlib.suppress(self._psutil.Error):
                    total += _cpu_s(process)
            totals[kind] = total
        totals["host_steal"] = float(getattr(self._psutil.cpu_times(), "steal", 0.0))
        return totals

    def sample(self, now: float) -> dict[str, float]:
        """``{"producers_cpu_pct": ..., "consumers_cpu_pct": ..., "host_steal_cpu_pct": ...}``
        since the last sample.  (A process that exited counts 0 from then on: its last second
        reads low.)  The host's steal time: a virtual machine's CPUs that its host ran
        something else on, which stalls whatever ran on them."""
        totals = self._totals()
        span = max(now - self._last_t, 1e-9)
        point = {f"{kind}_cpu_pct": round(100 * max(totals[kind] - self._last[kind], 0.0)
                                          / span, 1) for kind in (*self.KINDS, "host_steal")}
        self._last, self._last_t = totals, now
        return point


def _verdict(workload: Workload, collected: dict[str, Any], timeline: list[dict[str, float]],
             broker_pid: int | None, start_at: float) -> RunResult:
    if collected["errors"]:
        raise RuntimeError("the run failed: " + "; ".join(collected["errors"]))
    histogram = Histogram()
    for result in collected["consumer"].values():
        histogram.merge(Histogram.from_dict(result["histogram"]))
    sent = sum(result["sent"] for result in collected["producer"].values())
    acknowledged = sum(result["acked_count"] for result in collected["producer"].values())
    consumed = sum(result["consumed"] for result in collected["consumer"].values())
    lost = 0
    unique = 0
    for index, result in collected["producer"].items():
        count = result["sent"]
        acked = np.unpackbits(np.frombuffer(result["acked"], dtype=np.uint8))[:count].astype(bool)
        seen = np.zeros(count, dtype=bool)
        for consumer in collected["consumer"].values():
            bits = consumer["seen"].get(index)
            if bits is not None:
                found = np.unpackbits(np.frombuffer(bits, dtype=np.uint8)).astype(bool)
                seen[:min(count, len(found))] |= found[:count]
        lost += int((acked & ~seen).sum())
        unique += int(seen.sum())
    elapsed = workload.duration_s + workload.warmup_s
    measured = [point for point in timeline if point["t_s"] > workload.warmup_s]
    if measured:
        produce_rate = float(np.median([p["produce_per_s"] for p in measured]))
        consume_rate = float(np.median([p["consume_per_s"] for p in measured]))
    else:
        produce_rate = sent / elapsed
        consume_rate = consumed / elapsed
    sent_bytes = sum(result["sent_bytes"] for result in collected["producer"].values())
    consumed_bytes = sum(result["consumed_bytes"] for result in collected["consumer"].values())
    record_bytes = sent_bytes / sent if sent else 0.0
    consumed_record_bytes = consumed_bytes / consumed if consumed else 0.0
    return RunResult(
        workload=workload, elapsed_s=elapsed, sent=sent,
        acknowledged=acknowledged,
        send_errors=sum(result["errors"] for result in collected["producer"].values()),
        consumed=consumed, lost=lost, duplicates=consumed - unique,
        produce_rate_per_s=produce_rate, consume_rate_per_s=consume_rate,
        produce_mb_per_s=produce_rate * record_bytes / 1e6,
        consume_mb_per_s=consume_rate * consumed_record_bytes / 1e6,
        latency=histogram, timeline=timeline, broker=_broker_summary(timeline),
        clients=_client_summary(timeline), start_monotonic_s=start_at,
        latency_max_per_s=_latency_max_per_s(collected["consumer"].values(),
                                             workload.warmup_s),
        client_pauses=_client_pauses(collected, start_at))


def _client_pauses(collected: dict[str, Any], start_at: float) -> dict[str, Any]:
    """The children's PauseWatch results merged: collections per process and generation, the
    garbage collections of PAUSE_NOTE_NS or longer (longest first, ``t_s`` since the
    producers' start), and the producers' latest send of each second."""
    counts: dict[str, list[int]] = {}
    long_collections = []
    late: dict[int, tuple[int, int, int, int, int, int]] = {}
    for kind in ("producer", "consumer"):
        for index, result in sorted(collected[kind].items()):
            pauses = result.get("pauses")
            if pauses is None:
                continue
            process = f"{kind} {index}"
            counts[process] = pauses["collections"]
            long_collections += [
                {"process": process, "generation": generation,
                 "t_s": round(started_ns / 1e9 - start_at, 3), "ms": round(took_ns / 1e6, 3)}
                for started_ns, took_ns, generation in pauses["long_collections"]]
            for second, worst in pauses["late_max"].items():
                if int(second) not in late or worst[0] > late[int(second)][0]:
                    late[int(second)] = worst
    if not counts:
        return {}
    long_collections.sort(key=lambda pause: -pause["ms"])
    return {"collections": counts, "long_collections": long_collections,
            "late_send_max_per_s": [
                {"t_s": float(second), "ms": round(late_ns / 1e6, 3),
                 "gap_ms": round(gap_ns / 1e6, 3), "cpu_ms": round(cpu_ns / 1e6, 3),
                 "waits": waits, "preempted": preempted, "page_faults": faults}
                for second, (late_ns, gap_ns, cpu_ns, waits, preempted, faults)
                in sorted(late.items())]}


def _latency_max_per_s(consumers: Any, warmup_s: float) -> list[dict[str, float]]:
    """The worst latency of each second after the warm-up, over every consumer; ``t_s``: when
    the second began, in seconds since the producers' start."""
    worst: dict[int, int] = {}
    for result in consumers:
        for second, value in result["second_max"].items():
            worst[int(second)] = max(value, worst.get(int(second), value))
    return [{"t_s": round(warmup_s + second, 3), "max_us": value / 1000}
            for second, value in sorted(worst.items())]


def _broker_summary(timeline: list[dict[str, Any]]) -> dict[str, Any]:
    """The broker's CPU% (median of the run's seconds) and peak RSS, from the timeline (its
    processes of this run's topics are gone by the end)."""
    points = [point for point in timeline if "broker_cpu_pct" in point]
    if not points:
        return {}
    return {"broker_cpu_pct_median": float(np.median([p["broker_cpu_pct"] for p in points])),
            "broker_rss_bytes_max": max(p["broker_rss_bytes"] for p in points)}


def _client_summary(timeline: list[dict[str, Any]]) -> dict[str, float]:
    """The producers' and the consumers' CPU% (each kind summed over its processes; median of
    the run's seconds), and the host's steal time in its worst second."""
    summary = {}
    for kind in ClientCpu.KINDS:
        values = [point[f"{kind}_cpu_pct"] for point in timeline if f"{kind}_cpu_pct" in point]
        if values:
            summary[f"{kind}_cpu_pct_median"] = float(np.median(values))
    steal = [point["host_steal_cpu_pct"] for point in timeline if "host_steal_cpu_pct" in point]
    if steal:
        summary["host_steal_cpu_pct_max"] = max(steal)
    return summary


def environment() -> dict[str, Any]:
    import platform

    return {"python": platform.python_version(), "machine": platform.machine(),
            "cpus": os.cpu_count(), "platform": platform.platform()}
