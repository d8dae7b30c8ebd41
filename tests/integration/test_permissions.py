"""Permissions: the data dir and sockets are created with restrictive modes; a client of another
user gets a clear permission error, not a hang; the broker refuses a data dir another user owns
unless told to (``--allow-foreign-data-dir``).

Tests that need a second user run only as root (they chown a directory, or fork a child that
drops to the ``nobody`` uid); elsewhere they are skipped, saying why.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from broker_helpers import RunningBroker

import shmbroker.client.admin  # noqa: F401  (loaded before a child drops its privileges)
from shmbroker import Admin
from shmbroker.errors import AccessDeniedError

pytestmark = pytest.mark.integration
NOBODY = 65534
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as a second user")


def test_data_dir_and_socket_modes(broker: RunningBroker) -> None:
    assert stat.S_IMODE(broker.data_dir.stat().st_mode) == 0o750
    assert stat.S_IMODE(broker.socket_path.stat().st_mode) == 0o660
    for sub in ("meta", "topics", "run", "groups"):
        assert stat.S_IMODE((broker.data_dir / sub).stat().st_mode) & 0o007 == 0, sub


@as_root
def test_a_data_dir_of_another_user_is_refused_unless_allowed(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    os.chown(data_dir, NOBODY, NOBODY)
    refused = subprocess.run([sys.executable, "-m", "shmbroker.cli", "serve", "--data-dir",
                              str(data_dir)], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1
    assert f"data dir {data_dir} belongs to user" in refused.stderr
    assert "--allow-foreign-data-dir" in refused.stderr
    assert not (data_dir / "broker.lock").exists()  # refused before it wrote anything
    broker = RunningBroker(data_dir, extra_args=("--allow-foreign-data-dir",)).start()
    try:
        with broker.admin() as admin:
            admin.create_topic("t")
            assert admin.list_topics() == ["t"]
    finally:
        broker.stop()
        broker.cleanup_shared_memory()


@as_root
def test_a_client_of_another_user_gets_a_clear_permission_error(broker: RunningBroker) -> None:
    """A forked child drops to ``nobody`` and asks the broker: AccessDeniedError at once."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report what happened through the pipe, never return to pytest
        code = 0
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            try:
                Admin(broker.data_dir, request_timeout_ms=5000).list_topics()
                outcome = "no error"
            except AccessDeniedError as error:
                outcome = f"AccessDeniedError: {error}"
            except BaseException as error:
                outcome = f"{type(error).__name__}: {error}"
            os.write(write, outcome.encode())
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(write)
    try:
        with os.fdopen(read, "rb") as pipe:
            outcome = pipe.read().decode()
    finally:
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert outcome.startswith("AccessDeniedError: permission denied connecting to"), outcome
    assert "socket_mode" in outcome
