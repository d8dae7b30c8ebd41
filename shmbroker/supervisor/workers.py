"""Worker lifecycle: spawn, readiness, exit, restart with backoff, give up on boot failures.

States (transitions are the only ones listed)::

    starting --ready--> running --exit(unasked)--> backoff --delay--> starting
    starting --exit(EXIT_BOOT_FAILED) x worker_boot_failures_max--> failed
    starting|running|backoff --stop()--> stopping --exit--> stopped
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time

import orjson

from shmbroker.config import BrokerConfig
from shmbroker.partition.paths import PartitionPaths
from shmbroker.partition.worker import EXIT_BOOT_FAILED, EXIT_OK, STANDBY_FLAG
from shmbroker.subprocesses import child_environment, python_module

logger = logging.getLogger("shmbroker.supervisor")

# A worker that ran this long starts its backoff from scratch.  Short: a worker that served for
# two seconds was healthy, and its death (an OOM kill, an operator's SIGKILL) is an event, not a
# crash loop: it is back in 50 ms.  (At 10 s, the soak run's faults every ~15 s pushed restarts
# to seconds.)  A loop that kills it faster than this still backs off, doubling to
# worker_restart_backoff_ms_max.
HEALTHY_RUN_S = 2.0
FIRST_RESTART_DELAY_S = 0.05


class WorkerHandle:
    """One partition's worker process as the supervisor tracks it."""

    def __init__(self, paths: PartitionPaths, config: BrokerConfig, log_level: str) -> None:
        self.paths = paths
        self.config = config
        self.log_level = log_level
        self.state = "backoff"
        self.process: subprocess.Popen[bytes] | None = None
        self.ready_fd: int | None = None
        self.started_at = 0.0
        self.restart_at = 0.0
        self.consecutive_failures = 0
        self.boot_failures = 0
        self.restarts = 0
        self.stop_deadline = 0.0
        self.reload_pending = False

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def name(self) -> str:
        return f"{self.paths.topic}/{self.paths.partition}"

    def spawn(self, standby: Standby | None = None) -> int:
        """Start the process, or hand the partition to ``standby`` (a process started earlier,
        already past Python's start and imports); return the read end of its ready pipe (the
        caller watches it).  OSError when neither works."""
        arguments = ["--data-dir", os.fspath(self.paths.data_dir), "--topic", self.paths.topic,
                     "--topic-id", str(self.paths.topic_id),
                     "--partition", str(self.paths.partition),
                     "--socket-mode", format(self.config.socket_mode, "o"),
                     "--spin-us", str(self.config.worker_spin_us),
                     "--check-thread", self.config.worker_check_thread,
                     "--stall-warn-ms", str(self.config.worker_stall_warn_ms),
                     "--connections-max", str(self.config.connections_max),
                     "--frame-read-timeout-ms", str(self.config.frame_read_timeout_ms),
                     "--log-level", self.log_level]
        if standby is not None:
            standby.assign(arguments)
            self.process, self.ready_fd = standby.process, standby.ready_fd
        else:
            self.process, self.ready_fd = _start_worker_process(arguments)
        self.state = "starting"
        self.started_at = time.monotonic()
        return self.ready_fd

    def on_ready_readable(self) -> bool:
        """The ready pipe has data or EOF; True once the worker said ready."""
        assert self.ready_fd is not None
        try:
            data = os.read(self.ready_fd, 64)
        except OSError:
            data = b""
        self.close_ready_fd()
        if data.startswith(b"ready") and self.state == "starting":
            self.state = "running"
            self.boot_failures = 0
            if self.reload_pending:
                self.reload_pending = False
                self.reload()
            return True
        return False

    def close_ready_fd(self) -> None:
        if self.ready_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.ready_fd)
            self.ready_fd = None

    def on_exit(self, returncode: int, now: float) -> None:
        """The process is gone: decide what comes next."""
        self.close_ready_fd()
        self.process = None
        if self.state == "stopping":
            self.state = "stopped"
            if returncode != EXIT_OK:
                logger.warning("%s: worker exited with %s while stopping", self.name,
                               describe_exit(returncode))
            return
        booting = self.state == "starting"
        if booting and returncode == EXIT_BOOT_FAILED:
            self.boot_failures += 1
            if self.boot_failures >= self.config.worker_boot_failures_max:
                self.state = "failed"
                logger.error("%s: worker failed to boot %d times in a row; not restarting it "
                             "(fix the cause, then restart the broker)", self.name,
                             self.boot_failures)
                return
        if now - self.started_at >= HEALTHY_RUN_S:
            self.consecutive_failures = 0
        delay = min(self.config.worker_restart_backoff_ms_max / 1000,
                    FIRST_RESTART_DELAY_S * (2 ** self.consecutive_failures))
        self.consecutive_failures += 1
        self.restarts += 1
        self.state = "backoff"
        self.restart_at = now + delay
        logger.warning("%s: worker %s; restarting in %.0f ms", self.name, describe_exit(returncode),
                       delay * 1000)

    def stop(self, now: float) -> None:
        """Ask the worker to drain and exit (SIGTERM); kill() after the deadline."""
        if self.process is None:
            self.state = "stopped"
            self.close_ready_fd()
            return
        if self.state != "stopping":
            self.state = "stopping"
            self.stop_deadline = now + self.config.worker_stop_timeout_ms / 1000
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)

    def kill_if_overdue(self, now: float) -> None:
        if self.state == "stopping" and self.process is not None and now > self.stop_deadline:
            logger.error("%s: worker did not stop in time; killing it", self.name)
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()

    def reload(self) -> None:
        """Make the worker re-read its topic config (SIGHUP).  A starting worker may not have
        its handler yet (SIGHUP would kill it): it is signalled once it says ready."""
        if self.process is None:
            return  # the next process reads the new config at boot
        if self.state == "running":
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGHUP)
        elif self.state == "starting":
            self.reload_pending = True


class Standby:
    """A worker process started ahead of need (broker setting ``worker_standby_count``).

    Starting Python and importing shmbroker takes ~0.3 s on a quiet machine and over a second
    on a loaded one, and a partition is unavailable for all of it when its worker dies.  A
    standby has done that already and waits on stdin for a partition's arguments (the worker's
    ``--standby`` mode), so a dead worker's replacement starts at its boot (opening the log,
    the sockets, the rings): tens of milliseconds.  It is an ordinary child of the supervisor,
    reaped and watched like any worker once assigned; a retired standby (stdin closed) exits 0.
    """

    def __init__(self) -> None:
        self.process, self.ready_fd = _start_worker_process([STANDBY_FLAG], stdin=True)
        self.started_at = time.monotonic()

    def alive(self) -> bool:
        return self.process.poll() is None

    def assign(self, arguments: list[str]) -> None:
        """Hand it a partition (OSError if it died meanwhile)."""
        stdin = self.process.stdin
        assert stdin is not None
        try:
            stdin.write(orjson.dumps(arguments) + b"\n")
            stdin.close()
        except (OSError, ValueError) as error:
            self.retire()
            raise OSError(f"the standby worker (pid {self.process.pid}) is gone: {error}"
                          ) from error

    def retire(self) -> None:
        """Let it exit (closing stdin) and close our end of its ready pipe."""
        with contextlib.suppress(OSError, ValueError):
            if self.process.stdin is not None:
                self.process.stdin.close()
        if self.ready_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.ready_fd)
            self.ready_fd = -1


def _start_worker_process(arguments: list[str], *, stdin: bool = False,
                          ) -> tuple[subprocess.Popen[bytes], int]:
    """Popen ``python -m shmbroker.partition.worker`` with a ready pipe; (process, read end)."""
    read_fd, write_fd = os.pipe()
    os.set_inheritable(write_fd, True)
    command = python_module("shmbroker.partition.worker", *arguments,
                            "--ready-fd", str(write_fd), "--parent-pid", str(os.getpid()))
    try:
        process = subprocess.Popen(command, pass_fds=(write_fd,), env=child_environment(),
                                   stdin=subprocess.PIPE if stdin else subprocess.DEVNULL)
    except OSError:
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)
    return process, read_fd


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-returncode).name}"
        return f"was killed by signal {-returncode}"
    names = {0: "exited cleanly", 1: "crashed (exit 1)", 2: "exited with a usage error (2)",
             EXIT_BOOT_FAILED: f"failed to boot (exit {EXIT_BOOT_FAILED})"}
    return names.get(returncode, f"exited with code {returncode}")
