"""One producer process of the produce-consume-validate fault harness
(``test_produce_consume_validate.py``).

``python fault_producer.py SPEC_JSON``; the spec holds ``data_dir``, ``topic``, ``name`` (the
producer's name, the prefix of its values), ``partitions``, ``acks``, ``out`` (the JSONL file of
acknowledged records), ``summary`` (a JSON file written at the end), ``stop`` (a path: the
producer stops once it exists), ``records_max``, ``duration_s_max``, ``rate_per_s`` and
``in_flight_max``; optionally the client's ``max_block_ms``, ``delivery_timeout_ms`` and
``request_timeout_ms``.

Record ``seq`` (0, 1, 2, ...) has value ``b"<name>:<seq>"``, no key and partition
``seq % partitions``.  Every acknowledged record is written to ``out`` as one line
``{"seq": .., "partition": .., "offset": ..}`` as soon as its future completes (the file is
flushed after every few lines, so a SIGKILLed producer leaves what it saw acknowledged, at most
a torn last line).  A send that fails (the broker being restarted: BrokerNotRunningError,
RequestTimeoutError, a full ring) is counted and the producer goes on with the next sequence
number after a short pause: a sequence number is never sent twice, so a value stored twice is a
broker duplicate, never a client retry.  Records whose futures failed are not acknowledged: they
may or may not be stored.
"""

from __future__ import annotations

import collections
import json
import os
import sys
import time
from typing import Any

from shmbroker import Producer
from shmbroker.errors import ClosedError, ShmbrokerError

SEND_RETRY_PAUSE_S = 0.05
ACK_WAIT_S = 0.2  # one wait for the oldest pending future when too many are in flight
DRAIN_TIMEOUT_S = 30.0


def main(spec: dict[str, Any]) -> int:
    name = spec["name"]
    topic = spec["topic"]
    partitions = int(spec["partitions"])
    stop_path = spec["stop"]
    rate_per_s = float(spec["rate_per_s"])
    in_flight_max = int(spec["in_flight_max"])
    counts: collections.Counter[str] = collections.Counter()
    wrong: list[Any] = []
    pending: collections.deque[tuple[int, Any]] = collections.deque()
    out = open(spec["out"], "w", buffering=1 << 16)  # noqa: SIM115 - closed at the end

    def make_producer() -> Producer:
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while True:
            try:
                return Producer(spec["data_dir"], acks=spec["acks"], linger_ms=1,
                                max_block_ms=spec.get("max_block_ms", 5000),
                                delivery_timeout_ms=spec.get("delivery_timeout_ms", 120_000),
                                request_timeout_ms=spec.get("request_timeout_ms", 30_000))
            except ShmbrokerError:  # no broker right now (a restart): try again
                counts["producer_create_errors"] += 1
                if time.monotonic() > deadline:
                    raise
                time.sleep(SEND_RETRY_PAUSE_S)

    def settle(seq: int, future: Any) -> None:
        error = future.exception(0)
        if error is not None:
            counts["failed:" + type(error).__name__] += 1
            return
        meta = future.result(0)
        if meta.partition != seq % partitions or meta.topic != topic or meta.offset < 0:
            wrong.append([seq, meta.topic, meta.partition, meta.offset])
        out.write(f'{{"seq": {seq}, "partition": {meta.partition}, "offset": {meta.offset}}}\n')
        counts["acked"] += 1

    def drain(block: bool) -> None:
        wrote = False
        while pending:
            seq, future = pending[0]
            if not future.done():
                if not block:
                    break
                future.batch.wait(ACK_WAIT_S)
                if not future.done():
                    break  # still waiting: the caller checks the stop file and comes back
            pending.popleft()
            settle(seq, future)
            wrote = True
            block = False
        if wrote:
            out.flush()

    producer = make_producer()
    started = time.monotonic()
    deadline = started + float(spec["duration_s_max"])
    seq = 0
    try:
        while seq < int(spec["records_max"]) and time.monotonic() < deadline:
            if seq % 16 == 0 and os.path.exists(stop_path):
                break
            ahead_s = started + seq / rate_per_s - time.monotonic()
            if ahead_s > 0:
                time.sleep(ahead_s)  # the rate limit, not a wait for a condition
            try:
                future = producer.send(topic, b"%s:%d" % (name.encode(), seq),
                                       partition=seq % partitions)
                pending.append((seq, future))
            except ClosedError:
                counts["send_errors:ClosedError"] += 1
                producer.close(0)
                producer = make_producer()
            except ShmbrokerError as error:
                counts["send_errors:" + type(error).__name__] += 1
                time.sleep(SEND_RETRY_PAUSE_S)
            seq += 1
            drain(block=len(pending) >= in_flight_max)
        counts["sent"] = seq
        try:
            producer.flush(DRAIN_TIMEOUT_S)
        except ShmbrokerError as error:
            counts["flush_errors:" + type(error).__name__] += 1
        drain_deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while pending and time.monotonic() < drain_deadline:
            drain(block=True)
        counts["unresolved"] = len(pending)
        producer.close(5)
    finally:
        out.close()
    with open(spec["summary"], "w") as file:
        json.dump({"counts": dict(counts), "wrong_metadata": wrong[:20]}, file)
    return 0


if __name__ == "__main__":
    sys.exit(main(json.loads(sys.argv[1])))
