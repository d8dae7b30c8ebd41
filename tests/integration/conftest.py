from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from broker_helpers import RunningBroker


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[RunningBroker]:
    """A running broker on a fresh data dir, stopped (SIGTERM) after the test."""
    with RunningBroker(tmp_path / "data") as running:
        yield running
