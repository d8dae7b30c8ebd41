"""A worker starts the kernel's writeback of each segment_writeback_bytes it appends, on its
flush thread (a ``sitecustomize`` on the broker's PYTHONPATH notes each call in worker
processes), and every acknowledged record is stored as it was sent."""

from __future__ import annotations

from pathlib import Path

import pytest
from broker_helpers import hooked_broker, wait_for
from integration.produce_helpers import read_partitions

from shmbroker import Producer

pytestmark = [pytest.mark.integration]

STEP_BYTES = 256 * 1024
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


def test_a_worker_starts_the_writeback_of_each_step_on_its_flush_thread(tmp_path: Path) -> None:
    notes = tmp_path / "writeback-notes"
    broker = hooked_broker(tmp_path, NOTE_HOOK, {"SHMBROKER_TEST_WRITEBACK_NOTES": str(notes)})
    values = [bytes([index % 251]) * 2000 + index.to_bytes(4, "big") for index in range(600)]
    with broker.start(), broker.admin() as admin:
        admin.create_topic("metrics", config={"segment_writeback_bytes": STEP_BYTES})
        with Producer(broker.data_dir, acks=1, linger_ms=1) as producer:
            futures = [producer.send("metrics", value, partition=0) for value in values]
            assert [future.result(30).offset for future in futures] == list(range(600))
        wait_for(lambda: notes.exists() and len(notes.read_text().splitlines()) >= 2,
                 message="the writeback hints")
        stored = read_partitions(broker.data_dir, "metrics", [0])[0]
        assert [(r.offset, r.value) for r in stored] == list(enumerate(values))
    hints = [line.split() for line in notes.read_text().splitlines()]
    assert {thread for thread, _, _ in hints} == {"flusher"}
    spans = [(int(offset), int(length)) for _, offset, length in hints]
    assert all(length >= STEP_BYTES for _, length in spans)
    assert spans[0][0] == 0 and all(  # one segment (1 GiB): each hint goes on from the last
        later[0] == earlier[0] + earlier[1] for earlier, later in zip(spans, spans[1:]))
    assert sum(length for _, length in spans) <= 600 * 2100  # nothing handed out twice
