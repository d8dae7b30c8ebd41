"""The supervisor's view of its workers: psutil facts and the control block's heartbeat."""

from __future__ import annotations

import os
import signal

import pytest
from broker_helpers import RunningBroker, wait_for

pytestmark = pytest.mark.integration


def _worker(broker: RunningBroker) -> dict[str, object]:
    with broker.admin() as admin:
        (worker,) = admin.status()["workers"]
    return worker


def test_status_reports_process_facts_and_a_stopped_worker(broker: RunningBroker) -> None:
    with broker.admin() as admin:
        admin.create_topic("watched", partitions=1)
    worker = _worker(broker)
    assert worker["state"] == "running" and worker["responsive"] is True
    assert worker["process_status"] in ("running", "sleeping")
    assert isinstance(worker["rss_bytes"], int) and worker["rss_bytes"] > 1 << 20
    assert isinstance(worker["cpu_s"], float)
    pid = worker["pid"]
    assert isinstance(pid, int)
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_for(lambda: _worker(broker)["process_status"] == "stopped", 10,
                 message="psutil to see the stopped worker")
        wait_for(lambda: _worker(broker)["responsive"] is False, 15,
                 message="the stale control-block heartbeat")
        assert _worker(broker)["pid"] == pid  # reported, not killed
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_for(lambda: _worker(broker)["responsive"] is True, 10, message="the worker to resume")
