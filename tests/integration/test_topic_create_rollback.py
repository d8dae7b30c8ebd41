"""A topic whose config cannot be written is not created: the metadata is rolled back, so no
topic exists without its workers (a full disk does this; here a file in the way does)."""

from __future__ import annotations

from pathlib import Path

import pytest
from broker_helpers import RunningBroker

from shmbroker.errors import BrokerStorageError

pytestmark = pytest.mark.integration


def test_a_topic_whose_config_cannot_be_written_is_rolled_back(tmp_path: Path) -> None:
    with RunningBroker(tmp_path / "data") as broker:
        blocker = broker.data_dir / "topics" / "blocked"
        blocker.parent.mkdir(parents=True, exist_ok=True)
        blocker.write_bytes(b"not a directory")  # the topic's directory cannot be made
        with broker.admin() as admin:
            with pytest.raises(BrokerStorageError, match="cannot create topic 'blocked'"):
                admin.create_topic("blocked", partitions=2)
            assert "blocked" not in admin.list_topics()
            assert not [w for w in admin.status()["workers"] if w["topic"] == "blocked"]
        blocker.unlink()
        with broker.admin() as admin:
            admin.create_topic("blocked", partitions=2)
        broker.wait_ready()
        with broker.admin() as admin:
            assert "blocked" in admin.list_topics()
