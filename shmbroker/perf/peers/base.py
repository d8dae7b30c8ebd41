"""What every peer of ``shmbroker-bench compare`` provides, and the pieces they share.

A peer is a system that the same workload runs against: Redis Streams, NATS JetStream, the raw
Unix-socket baseline.  It has three parts, each small:

* :meth:`Peer.missing` -- None when its server and client are installed, else why not and how
  to install them (the tool installs nothing at run time: it skips the peer and says so);
* :meth:`Peer.server` -- a context manager that starts its server in a temp dir on loopback or
  a Unix socket and yields ``(address, server_pid)``; the address is a small dict that the
  producer and consumer processes receive (pickled), the pid lets the runner sample the server's
  CPU and RSS (None when there is no server);
* :meth:`Peer.producer` and :meth:`Peer.consumer` -- the client sessions, opened inside the
  spawned producer and consumer processes (:mod:`shmbroker.perf.peers.runner` drives them).

Sessions and their contract:

* :class:`ProducerSession`.  The runner calls :meth:`ProducerSession.prepare` once with the
  template payloads (values back to back, their lengths, zeroed 24-byte headers), then
  :meth:`ProducerSession.send` with consecutive :class:`Chunk` s: records ``template[first :
  first + count]`` with sequence numbers ``seqs`` and intended send times ``intended_ns``
  (:mod:`shmbroker.perf.payloads`).  A session acknowledges records by appending
  ``(first_seq, count)`` to ``acked_ranges``; :meth:`ProducerSession.flush` waits for every
  outstanding acknowledgement (a record never acknowledged is a send error, not a loss).
* :class:`ConsumerSession`.  Opened before the producer starts (it creates what the producer
  writes to: a stream and its group, a listening socket); :meth:`ConsumerSession.poll` returns
  what arrived as ``(data, value_positions, value_lengths)`` triples, the columnar shape that
  :func:`payloads.decode_headers` reads.  The arrays stay valid until the next poll.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from shmbroker.perf import payloads

I64 = npt.NDArray[np.int64]
SERVER_START_TIMEOUT_S = 30.0
SERVER_STOP_TIMEOUT_S = 20.0
# Where Debian puts daemons (nats-server is /usr/sbin/nats-server): not on every user's PATH.
SYSTEM_BINARY_DIRS = ("/usr/sbin", "/usr/local/sbin", "/sbin")
PEERS_EXTRA_HINT = "pip install 'shmbroker[peers]'"


class Chunk(NamedTuple):
    """Records ``first .. first + count - 1`` of the template, sent as sequence numbers
    ``seqs`` at intended times ``intended_ns`` (both int64 arrays of ``count``)."""

    first: int
    count: int
    seqs: I64
    intended_ns: I64


class Columns(NamedTuple):
    """Values that arrived: ``data[value_positions[i]:][:value_lengths[i]]`` is value i."""

    data: Any  # bytes, bytearray or a uint8 array
    value_positions: I64
    value_lengths: I64


class ProducerSession:
    """One producer's connection to a peer (see the module docstring for the contract)."""

    producer_id = 0

    def __init__(self) -> None:
        self.acked_ranges: list[tuple[int, int]] = []
        self.template = bytearray()
        self.template_lengths: I64 = np.zeros(0, dtype=np.int64)
        self.template_starts: I64 = np.zeros(0, dtype=np.int64)

    def prepare(self, template: bytearray, lengths: I64) -> None:
        """Keep the template payloads (a subclass may pre-encode from them)."""
        self.template = template
        self.template_lengths = lengths
        self.template_starts = exclusive_cumsum(lengths)

    def values(self, chunk: Chunk) -> tuple[bytearray, I64, I64]:
        """The chunk's values with their headers written: (buffer, starts in it, lengths)."""
        begin = int(self.template_starts[chunk.first])
        lengths = self.template_lengths[chunk.first:chunk.first + chunk.count]
        starts = self.template_starts[chunk.first:chunk.first + chunk.count] - begin
        buffer = bytearray(memoryview(self.template)[begin:begin + int(lengths.sum())])
        payloads.encode_headers(buffer, starts, chunk.intended_ns, self.producer_id, chunk.seqs)
        return buffer, starts, lengths

    def send(self, chunk: Chunk) -> None:
        raise NotImplementedError

    def flush(self, timeout_s: float) -> None:
        """Wait until every record sent is acknowledged or failed."""

    def close(self) -> None:
        """Release the connection (after :meth:`flush`)."""


class ConsumerSession:
    """One consumer's connection to a peer (see the module docstring for the contract)."""

    def poll(self, timeout_s: float) -> list[Columns]:
        raise NotImplementedError

    def close(self) -> None:
        """Release the connection (acknowledging what was consumed, where the peer acks)."""


@dataclass(frozen=True)
class Peer:
    """A system ``compare`` runs the workload against (see the module docstring)."""

    name: str  # on the command line: --systems redis,nats,raw
    title: str  # in the table

    def missing(self) -> str | None:
        return None

    def versions(self) -> dict[str, str]:
        return {}

    def describe(self) -> str:
        """One line: how this peer is set up for the run (for the report)."""
        return ""

    @contextlib.contextmanager
    def server(self, temp_dir: Path) -> Iterator[tuple[dict[str, Any], int | None]]:
        raise NotImplementedError
        yield  # pragma: no cover

    def producer(self, address: dict[str, Any]) -> ProducerSession:
        raise NotImplementedError

    def consumer(self, address: dict[str, Any]) -> ConsumerSession:
        raise NotImplementedError


# -- helpers the peers share ---------------------------------------------------------------------

def exclusive_cumsum(values: I64) -> I64:
    starts = np.zeros(len(values), dtype=np.int64)
    if len(values):
        np.cumsum(values[:-1], out=starts[1:])
    return starts


def columns_of(values: Sequence[bytes]) -> Columns:
    """A list of values as one :class:`Columns` (one join, no Python work per value beyond
    ``len``)."""
    lengths = np.fromiter(map(len, values), dtype=np.int64, count=len(values))
    return Columns(b"".join(values), exclusive_cumsum(lengths), lengths)


def find_binary(name: str) -> str | None:
    """``name`` on PATH, or in the system binary dirs that a user's PATH may lack."""
    found = shutil.which(name)
    if found is not None:
        return found
    for directory in SYSTEM_BINARY_DIRS:
        candidate = Path(directory) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def module_missing(*modules: str) -> list[str]:
    """The modules of ``modules`` that cannot be imported here (without importing them)."""
    import importlib.util

    return [module for module in modules if importlib.util.find_spec(module) is None]


def command_output(argv: list[str]) -> str:
    """First line of a short command's output ('' if it fails): for version strings."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        run = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        text = (run.stdout or run.stderr).strip()
        return text.splitlines()[0] if text else ""
    return ""


def package_version(distribution: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return "not installed"


@contextlib.contextmanager
def server_process(argv: list[str], log_path: Path, ready: Callable[[], bool],
                   what: str) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``argv`` (output to ``log_path``) until the block ends; yield once ``ready()``.

    RuntimeError, with the log's tail, when the server exits or is not ready within
    SERVER_START_TIMEOUT_S.  Stopped with SIGTERM (SIGKILL after SERVER_STOP_TIMEOUT_S).
    """
    with log_path.open("wb") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{what} exited with status {process.returncode} at start: "
                                   f"{_tail(log_path)}")
            with contextlib.suppress(OSError):
                if ready():
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} was not ready after {SERVER_START_TIMEOUT_S:.0f} s: "
                                   f"{_tail(log_path)}")
            time.sleep(0.02)
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(SERVER_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _tail(path: Path, lines: int = 5) -> str:
    with contextlib.suppress(OSError):
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    return "(no log)"
