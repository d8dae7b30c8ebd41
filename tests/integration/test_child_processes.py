"""The broker's processes run the shmbroker that started them, not modules that their working
directory happens to hold (shmbroker.subprocesses: ``python -P -m``, PYTHONPATH led by the
package's directory)."""

from __future__ import annotations

from pathlib import Path

import pytest
from broker_helpers import RunningBroker
from integration.produce_helpers import read_partitions

from shmbroker import Producer

pytestmark = pytest.mark.integration


def test_a_broker_started_among_decoy_modules_runs_the_real_ones(tmp_path: Path) -> None:
    decoys = tmp_path / "cwd"
    (decoys / "shmbroker").mkdir(parents=True)
    for path in (decoys / "shmbroker" / "__init__.py", decoys / "numpy.py",
                 decoys / "orjson.py"):
        path.write_text("raise SystemExit('a decoy module was imported: ' + __file__)\n")
    with RunningBroker(tmp_path / "data", cwd=decoys) as broker:
        with broker.admin() as admin:
            admin.create_topic("checked", partitions=2)
        broker.wait_ready()  # both workers run: started from the decoys' directory too
        with Producer(broker.data_dir) as producer:
            offsets = [producer.send("checked", b"real", partition=partition).result(10).offset
                       for partition in (0, 1)]
        assert offsets == [0, 0]
        stored = read_partitions(broker.data_dir, "checked", [0, 1])
        assert {partition: [record.value for record in records]
                for partition, records in stored.items()} == {0: [b"real"], 1: [b"real"]}
    assert "decoy module" not in broker.log()
