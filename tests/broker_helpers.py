"""Test helpers that run a real broker: ``shmbroker serve`` as a subprocess in a temp data dir.

>>> with RunningBroker(tmp_path / "data") as broker:
...     broker.admin().create_topic("t", partitions=2)

Teardown sends SIGTERM and waits (then SIGKILL), so a test never leaves processes behind; the
broker's stderr goes to ``<data_dir>/../broker-<n>.log`` and is printed when startup fails.
Shared-memory names the broker or a test's producers left in /dev/shm are removed at the end.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from shmbroker.subprocesses import child_environment, python_module

STARTUP_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0
_counter = itertools.count()


# The start of a ``sitecustomize`` that acts in worker processes only (see
# :func:`hooked_broker`): it imports os and time, and ``_worker`` says whether this process is
# a partition worker (its command line names the module).
WORKER_HOOK_PRELUDE = """
import os
import time

try:
    with open("/proc/self/cmdline", "rb") as _cmdline:
        _worker = b"shmbroker.partition.worker" in _cmdline.read()
except OSError:
    _worker = False
"""


def hooked_broker(tmp_path: Path, hook: str, env: dict[str, str]) -> RunningBroker:
    """A broker (not started) whose processes run ``WORKER_HOOK_PRELUDE + hook`` as their
    ``sitecustomize`` (on PYTHONPATH, ahead of the caller's), with ``env`` added."""
    directory = tmp_path / "hook"
    directory.mkdir()
    (directory / "sitecustomize.py").write_text(WORKER_HOOK_PRELUDE + hook)
    path = os.pathsep.join(filter(None, [str(directory), os.environ.get("PYTHONPATH")]))
    return RunningBroker(tmp_path / "data", env={"PYTHONPATH": path, **env})


def wait_for(condition: Callable[[], Any], timeout_s: float = 10.0, interval_s: float = 0.01,
             message: str = "condition") -> Any:
    """Poll ``condition`` until it returns something truthy; AssertionError after timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {message}")
        time.sleep(interval_s)


def end_process(process: subprocess.Popen[bytes], timeout_s: float) -> None:
    """SIGKILL a helper process if it still runs, reap it, close our ends of its pipes."""
    if process.poll() is None:
        process.kill()
    process.wait(timeout_s)
    for stream in (process.stdin, process.stdout):
        if stream is not None:
            stream.close()


class RunningBroker:
    """A supervisor process (and its workers) serving ``data_dir``."""

    def __init__(self, data_dir: Path, *, config_toml: str | None = None,
                 log_level: str = "INFO", extra_args: tuple[str, ...] = (),
                 env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.env = env  # added to the broker's (and so its workers') environment
        self.cwd = cwd  # the broker's working directory (default: ours)
        self.config_toml = config_toml
        self.log_level = log_level
        self.extra_args = extra_args
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = self.data_dir.parent / f"broker-{next(_counter)}.log"

    @property
    def socket_path(self) -> Path:
        return self.data_dir / "broker.sock"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, wait: bool = True, workers: bool = True) -> RunningBroker:
        command = python_module("shmbroker.cli", "serve", "--data-dir", str(self.data_dir),
                                "--log-level", self.log_level, *self.extra_args)
        if self.config_toml is not None:
            config_path = self.data_dir.parent / f"{self.log_path.stem}.toml"
            config_path.write_text(self.config_toml)
            command += ["--config", str(config_path)]
        log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        env = child_environment({**os.environ, **(self.env or {})})
        self.process = subprocess.Popen(command, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                        env=env, cwd=self.cwd)
        log.close()
        if wait:
            self.wait_ready(workers)
        return self

    def wait_ready(self, workers: bool = True) -> None:
        """Wait until the supervisor answers STATUS and (``workers``) every worker runs."""
        from shmbroker.errors import BrokerNotRunningError

        def ready() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"broker exited with {self.process.returncode} at start:\n"
                                     f"{self.log()}")
            if not self.socket_path.exists():
                return False
            try:
                with self.admin() as admin:
                    status = admin.status()
            except BrokerNotRunningError:
                return False
            return status["pid"] == self.pid and (not workers or all(
                worker["state"] == "running" for worker in status["workers"]))

        wait_for(ready, STARTUP_TIMEOUT_S, message=f"the broker serving {self.data_dir}")

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")
        return ""

    def admin(self) -> Any:
        from shmbroker import Admin

        return Admin(self.data_dir)

    def worker_pids(self) -> dict[tuple[str, int], int]:
        with self.admin() as admin:
            status = admin.status()
        return {(worker["topic"], worker["partition"]): worker["pid"]
                for worker in status["workers"] if worker["pid"]}

    def children(self) -> list[psutil.Process]:
        with contextlib.suppress(psutil.NoSuchProcess):
            return psutil.Process(self.pid).children(recursive=True)
        return []

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """Signal the supervisor and wait for it and its workers; its exit code."""
        process = self.process
        if process is None:
            return 0
        children = self.children()
        if process.poll() is None:
            process.send_signal(sig)
        try:
            code = process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            code = process.wait()
        _, alive = psutil.wait_procs(children, timeout=timeout_s)
        for child in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        self.process = None
        return code

    def kill(self) -> None:
        """SIGKILL the supervisor and every worker at once (a hard crash)."""
        assert self.process is not None
        victims = [psutil.Process(self.pid), *self.children()]
        for victim in victims:
            with contextlib.suppress(psutil.NoSuchProcess):
                victim.kill()
        psutil.wait_procs(victims, timeout=STOP_TIMEOUT_S)
        self.process.wait()
        self.process = None

    def cleanup_shared_memory(self) -> None:
        from shmbroker.shm import names

        prefix = names.shm_prefix(self.data_dir)
        for name in names.list_names(prefix):
            names.unlink(name)

    def __enter__(self) -> RunningBroker:
        if self.process is None:
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            self.stop()
        finally:
            self.cleanup_shared_memory()
