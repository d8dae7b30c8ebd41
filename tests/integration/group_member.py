"""A consumer-group member as its own process, for tests/integration/test_consumer_groups.py.

    python tests/integration/group_member.py SPEC_JSON

SPEC_JSON: ``data_dir``, ``group_id``, ``name`` (how the test calls this member), ``out`` (a
JSONL path), ``topics`` (a list) or ``pattern``, ``consumer`` (keyword arguments of Consumer),
``commit`` ("auto": the consumer's auto-commit; "sync": ``commit()`` after every poll that
returned records; "none"), ``poll_ms``, ``commit_on_cont`` (after SIGCONT, try one explicit
``commit()`` and record what it raised).  SIGUSR1 stops its "sync" commits (it writes
``commits_paused`` once it made its last one), so that a test knows what it last committed.

It writes one JSON object a line to ``out``, each flushed at once (a SIGKILL loses nothing
written), every one with ``ev``, ``name`` and ``t`` (``time.monotonic()``: CLOCK_MONOTONIC is one
clock for every process of the host, so times of different members compare):

* ``start`` (with ``pid``), ``exit`` (after ``close()`` returned);
* ``assigned`` / ``revoked`` / ``lost`` with ``parts`` ([[topic, partition], ...]): the rebalance
  listener, timed when it is called (inside ``poll``);
* ``records`` with ``recs`` ([[topic, partition, offset], ...]) and ``t`` the time the poll
  returned them;
* ``commit`` with ``offsets`` ([[topic, partition, offset], ...]) and ``error`` (the exception's
  class name, or null);
* ``commit_after_cont``: the explicit commit tried after SIGCONT, with ``error``;
* ``commits_paused``: after SIGUSR1, no ``commit`` follows.

SIGTERM ends the poll loop; the member closes (auto-commit and leave) and exits 0.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from typing import Any

from shmbroker import Consumer, TopicPartition


class Journal:
    def __init__(self, path: str, name: str) -> None:
        self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - lives as the process
        self.name = name

    def write(self, ev: str, t: float | None = None, **fields: Any) -> None:
        line = {"ev": ev, "name": self.name, "t": time.monotonic() if t is None else t, **fields}
        self.file.write(json.dumps(line) + "\n")
        self.file.flush()


def _parts(partitions: set[TopicPartition]) -> list[list[Any]]:
    return [[topic, partition] for topic, partition in sorted(partitions)]


class Listener:
    def __init__(self, journal: Journal) -> None:
        self.journal = journal

    def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self.journal.write("assigned", parts=_parts(assigned))

    def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        self.journal.write("revoked", parts=_parts(revoked))

    def on_partitions_lost(self, lost: set[TopicPartition]) -> None:
        self.journal.write("lost", parts=_parts(lost))


def main() -> int:
    spec = json.loads(sys.argv[1])
    journal = Journal(spec["out"], spec["name"])
    flags = {"stop": False, "cont": False, "pause": False, "paused": False}

    def on_term(signum: int, frame: object) -> None:
        flags["stop"] = True

    def on_cont(signum: int, frame: object) -> None:
        flags["cont"] = True

    def on_usr1(signum: int, frame: object) -> None:
        flags["pause"] = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGUSR1, on_usr1)
    if spec.get("commit_on_cont"):
        signal.signal(signal.SIGCONT, on_cont)
    mode = spec.get("commit", "auto")
    consumer_args = dict(spec.get("consumer", {}))
    consumer_args.setdefault("auto_offset_reset", "earliest")
    consumer_args.setdefault("enable_auto_commit", mode == "auto")
    consumer = Consumer(spec["data_dir"], group_id=spec["group_id"], **consumer_args)
    journal.write("start", pid=os.getpid())
    try:
        consumer.subscribe(spec.get("topics") or (), pattern=spec.get("pattern"),
                           listener=Listener(journal))
        poll_ms = spec.get("poll_ms", 100)
        while not flags["stop"]:
            if flags["pause"] and not flags["paused"]:
                flags["paused"] = True
                journal.write("commits_paused")
            if flags["cont"]:
                flags["cont"] = False
                try:
                    consumer.commit()
                    error = None
                except Exception as failure:  # noqa: BLE001 - recorded for the test
                    error = type(failure).__name__
                journal.write("commit_after_cont", error=error)
            records = consumer.poll(poll_ms)
            if records:
                journal.write("records", recs=[[r.topic, r.partition, r.offset]
                                               for r in records])
                if mode == "sync" and not flags["paused"]:
                    offsets = {TopicPartition(r.topic, r.partition): r.offset + 1
                               for r in records}
                    try:
                        consumer.commit(offsets)
                        error = None
                    except Exception as failure:  # noqa: BLE001 - recorded for the test
                        error = type(failure).__name__
                    journal.write("commit", error=error, offsets=[
                        [tp.topic, tp.partition, offset] for tp, offset in sorted(offsets.items())])
    finally:
        consumer.close()
        journal.write("exit")
    return 0


if __name__ == "__main__":
    sys.exit(main())
