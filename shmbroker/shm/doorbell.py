"""Doorbells: wake-ups between processes as one-byte Unix datagrams in the abstract namespace.

A doorbell is a non-blocking ``AF_UNIX``/``SOCK_DGRAM`` socket bound to the abstract address
``b"\\0" + name`` (no file, gone when the socket closes).  Ringing sends one byte; the datagram
carries no meaning, only "look at the shared memory again".  Invariants:

* ringing never blocks and never fails: a full receive queue means a wake-up is already pending,
  an unbound address means nobody waits (both are ignored);
* a sleeper drains every queued datagram after waking, so many rings cost one wake-up;
* wake-ups can be lost to the flag race described in :mod:`shmbroker.shm.ring`: every wait
  has a timeout.
"""

from __future__ import annotations

import atexit
import errno
import os
import secrets
import select
import socket

ADDRESS_BYTES_MAX = 108  # sizeof(sun_path), the leading NUL included
DRAIN_DATAGRAMS_MAX = 65_536
_IGNORED_ERRNOS = frozenset({errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOBUFS, errno.ECONNREFUSED,
                             errno.ENOENT})
_RECV_BYTES = 16

_sender: socket.socket | None = None


def sender_socket() -> socket.socket:
    """The process-wide non-blocking socket :func:`ring` sends from by default."""
    global _sender
    if _sender is None:
        _sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        _sender.setblocking(False)
        atexit.register(_sender.close)
    return _sender


def ring(address: bytes, sock: socket.socket | None = None) -> None:
    """Send one wake-up byte to the doorbell at ``address``; never blocks, never raises for a
    full queue or an absent doorbell."""
    try:
        (sock or sender_socket()).sendto(b"\x01", address)
    except OSError as error:
        if error.errno not in _IGNORED_ERRNOS:
            raise


class Doorbell:
    """A bound doorbell that this process sleeps on."""

    def __init__(self, sock: socket.socket, address: bytes) -> None:
        self._socket = sock
        self.address = address
        self._poll = select.poll()
        self._poll.register(sock, select.POLLIN)

    @staticmethod
    def new_name(prefix: str) -> str:
        """A name unique to this process and call: ``<prefix>.db.<pid>.<8 hex digits>``."""
        return f"{prefix}.db.{os.getpid()}.{secrets.token_hex(4)}"

    @classmethod
    def bind(cls, name: str) -> Doorbell:
        address = b"\0" + name.encode()
        if len(address) > ADDRESS_BYTES_MAX:
            raise ValueError(f"doorbell name {name!r} is {len(address) - 1} bytes; at most "
                             f"{ADDRESS_BYTES_MAX - 1} fit in a Unix socket address")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.bind(address)
        except BaseException:
            sock.close()
            raise
        return cls(sock, address)

    def fileno(self) -> int:
        return self._socket.fileno()

    def drain(self) -> int:
        """Receive every queued wake-up; how many there were."""
        count = 0
        recv = self._socket.recv
        while count < DRAIN_DATAGRAMS_MAX:
            try:
                recv(_RECV_BYTES)
            except BlockingIOError:
                break
            count += 1
        return count

    def wait(self, timeout_s: float) -> bool:
        """Sleep until rung or ``timeout_s`` passed; True if rung (the queue is then drained)."""
        if not self._poll.poll(max(0, int(timeout_s * 1000 + 0.999))):
            return False
        self.drain()
        return True

    def close(self) -> None:
        self._socket.close()

    def __enter__(self) -> Doorbell:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
