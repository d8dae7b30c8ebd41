"""A worker starts the kernel's writeback of each segment_writeback_bytes it appends, on its
flush thread (a ``sitecustomize`` on the broker's PYTHONPATH notes each call in worker
processes), and every acknowledged record is stored as it was sent."""

from __future__ import annotations

from pathlib import Path

import pytest
from broker_helpers import hooked_broker
from integration.produce_helpers import read_partitions

from shmbroker import Producer

pytestmark = [pytest.mark.integration]

STEP_BYTES = 256 * 1024
RECORDS_MAX = 5000  # ~10 MB: the most a test sends waiting for its hints
# Each start_writeback of a worker is noted in $SHMBROKER_TEST_WRITEBACK_NOTES: "thread offset
# length" (flusher.py looks the function up at each call, so the patch is seen).
NOTE_HOOK = '''
_notes = os.environ.get("SHMBROKER_TEST_WRITEBACK_NOTES")
if _notes and _worker:
    import threading

    from shmbroker.storage import writeback as _writeback

    _real_start = _writeback.start_writeback

    def _noted_start(fd, offset, length):
        with open(_notes, "a") as note:
            note.write(f"{threading.current_thread().name} {offset} {length}\\n")
        return _real_start(fd, offset, length)

    _writeback.start_writeback = _noted_start
'''


@pytest.mark.parametrize("transport", ["shm", "socket"])
def test_a_worker_starts_the_writeback_of_each_step_on_its_flush_thread(tmp_path: Path,
                                                                       transport: str) -> None:
    """Whether the records come through a ring or the socket fallback."""
    notes = tmp_path / "writeback-notes"
    broker = hooked_broker(tmp_path, NOTE_HOOK, {"SHMBROKER_TEST_WRITEBACK_NOTES": str(notes)})
    values: list[bytes] = []

    def hints() -> int:
        return len(notes.read_text().splitlines()) if notes.exists() else 0

    def send_until(producer: Producer, count: int) -> None:
        """Send ~100 KB at a time until ``count`` hints ran (a hint queued behind a flush
        ticket takes what is appended meanwhile with the next one, on a later drain)."""
        while hints() < count:
            assert len(values) < RECORDS_MAX, f"{hints()} hints after {len(values)} records"
            chunk = [bytes([index % 251]) * 2000 + index.to_bytes(4, "big")
                     for index in range(len(values), len(values) + 50)]
            futures = [producer.send("metrics", value, partition=0) for value in chunk]
            assert [future.result(30).offset for future in futures] == list(
                range(len(values), len(values) + 50))
            values.extend(chunk)

    with broker.start(), broker.admin() as admin:
        admin.create_topic("metrics", config={"segment_writeback_bytes": STEP_BYTES})
        with Producer(broker.data_dir, acks=1, linger_ms=1, transport=transport) as producer:
            send_until(producer, 1)
            send_until(producer, 3)
        stored = read_partitions(broker.data_dir, "metrics", [0])[0]
        assert [(r.offset, r.value) for r in stored] == list(enumerate(values))
    hints_run = [line.split() for line in notes.read_text().splitlines()]
    assert {thread for thread, _, _ in hints_run} == {"flusher"}
    spans = [(int(offset), int(length)) for _, offset, length in hints_run]
    assert all(length >= STEP_BYTES for _, length in spans)
    assert spans[0][0] == 0 and all(  # one segment (1 GiB): each hint goes on from the last
        later[0] == earlier[0] + earlier[1] for earlier, later in zip(spans, spans[1:]))
    assert sum(length for _, length in spans) <= len(values) * 2100  # nothing twice
