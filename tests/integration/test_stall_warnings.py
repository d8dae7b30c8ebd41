"""A worker's stall warning says where a long loop turn went: here the write of an append into
its segment file is held (a ``sitecustomize`` on the broker's PYTHONPATH wraps ``os.write`` in
worker processes, as a disk that lags behind makes the kernel hold writers), and the warning puts
that time in the appends' writes, while the record is stored and acknowledged all the same."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from broker_helpers import hooked_broker, wait_for
from integration.produce_helpers import read_partitions

from shmbroker import Producer

pytestmark = [pytest.mark.integration]

HOLD_S = 0.2
# While the gate file exists, every os.write of a worker into a segment file (.log) first sleeps
# HOLD_S, and notes that it did in <gate>.held.
WRITE_GATE_HOOK = f'''
_gate = os.environ.get("SHMBROKER_TEST_WRITE_GATE")
if _gate and _worker:
    _real_write = os.write

    def _held_write(fd, data):
        if os.path.exists(_gate):
            try:
                segment = os.readlink(f"/proc/self/fd/{{fd}}").endswith(".log")
            except OSError:
                segment = False
            if segment:
                time.sleep({HOLD_S})
                with open(_gate + ".held", "a") as note:
                    note.write("held\\n")
        return _real_write(fd, data)

    os.write = _held_write
'''


def test_a_write_held_by_the_disk_is_named_in_the_stall_warning(tmp_path: Path) -> None:
    gate = tmp_path / "write-gate"
    broker = hooked_broker(tmp_path, WRITE_GATE_HOOK, {"SHMBROKER_TEST_WRITE_GATE": str(gate)})
    with broker.start(), broker.admin() as admin:
        admin.create_topic("metrics")
        with Producer(broker.data_dir, acks=1, linger_ms=0) as producer:
            assert producer.send("metrics", b"before", partition=0).result(10).offset == 0
            gate.touch()
            try:
                assert producer.send("metrics", b"held", partition=0).result(10).offset == 1
            finally:
                gate.unlink()
            assert producer.send("metrics", b"after", partition=0).result(10).offset == 2
        assert Path(str(gate) + ".held").exists()  # (the hook did hold a segment write)
        wait_for(lambda: "kept it busy" in broker.log(), message="the stall warning")
        stored = read_partitions(broker.data_dir, "metrics", [0])[0]
        assert [(r.offset, r.value) for r in stored] == [(0, b"before"), (1, b"held"),
                                                         (2, b"after")]
    warning = next(line for line in broker.log().splitlines() if "kept it busy" in line)
    assert "WARNING" in warning and "metrics/0" in warning, warning
    found = re.search(r"of which appends ([\d.]+) ms \(copying out of the rings ([\d.]+) ms, "
                      r"checking ([\d.]+) ms, writing the segment files ([\d.]+) ms, "
                      r"rolling segments ([\d.]+) ms\)", warning)
    assert found is not None, warning
    appends_ms, copying_ms, checking_ms, writing_ms, rolling_ms = map(float, found.groups())
    assert HOLD_S * 1000 * 0.9 <= writing_ms <= appends_ms, warning
    assert copying_ms + checking_ms + rolling_ms < HOLD_S * 1000 / 2, warning  # the write's
