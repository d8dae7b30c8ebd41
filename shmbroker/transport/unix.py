"""Unix stream sockets: addresses, listening, connecting, and a non-blocking server connection.

``sun_path`` holds at most 107 bytes, and data dirs under pytest's or a user's temp dir are often
longer.  :func:`usable_address` then goes through ``/proc/self/fd/<dirfd>/<name>`` (Linux), which
the kernel resolves like the real path, so long data dirs work for bind and connect alike.

:class:`ServerConnection` is one accepted connection of a single-threaded selector loop: a
:class:`FrameDecoder` for input (bounded by ``frame_bytes_max``) and an output queue of byte
strings and file ranges, written with ``send`` and ``os.sendfile`` as the socket accepts them.
A file range that cannot be sent at once keeps a ``dup`` of its fd, so retention deleting the
segment meanwhile cannot make the connection send from a reused descriptor.

Hostile clients: a connection remembers when the frame it is receiving began to arrive
(:meth:`ServerConnection.frame_overdue`), so its owner can close one that sends a frame too slowly
(slow-loris); :func:`fit_fd_limit` and :class:`Refusals` bound and log the connections a listener
takes.  An idle connection between requests costs one fd and is not timed out: a Unix socket's
peer is a local process, whose death closes the connection at once.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import os
import resource
import socket
import stat
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from shmbroker import limits
from shmbroker.errors import ProtocolError
from shmbroker.protocol.frames import Frame, FrameDecoder

SUN_PATH_BYTES_MAX = 107
SOCKET_BUFFER_BYTES = 4 * 1024 * 1024
RECV_BYTES = 256 * 1024
REFUSAL_LOG_INTERVAL_S = 1.0
# A file range up to this size is sent by copy (pread, then one send with its frame head), not
# sendfile: one syscall instead of two, and a sleeping reader wakes once, to a whole frame.
# Measured here (head + range to a socketpair, reader not sleeping): 170 B 3.4 vs 4.5 µs
# (copy vs head + sendfile), 4 KiB 5.0 vs 4.9, 16 KiB 6.7 vs 5.7, 64 KiB 16.3 vs 9.7; a
# reader's wake-up costs tens of µs on these VMs (bench/wakeup.py), so copy up to 16 KiB.
COPY_SEND_BYTES_MAX = 16 * 1024
CONNECT_RETRY_S = 0.002

_directory_fds: dict[str, int] = {}
_directory_lock = threading.Lock()


def usable_address(path: str | os.PathLike[str]) -> str:
    """``path``, or an equivalent short ``/proc/self/fd`` path when it is too long to bind."""
    path = os.fspath(path)
    if len(os.fsencode(path)) <= SUN_PATH_BYTES_MAX:
        return path
    directory, name = os.path.split(os.path.abspath(path))
    with _directory_lock:
        fd = _directory_fds.get(directory)
        if fd is not None and not _still_names(fd, directory):
            # the directory was removed (and maybe recreated): the cached fd points at the old one
            os.close(fd)
            del _directory_fds[directory]
            fd = None
        if fd is None:
            fd = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            _directory_fds[directory] = fd
    short = f"/proc/self/fd/{fd}/{name}"
    if len(os.fsencode(short)) > SUN_PATH_BYTES_MAX:
        raise OSError(errno.ENAMETOOLONG, f"socket name {name!r} is too long", path)
    return short


def _still_names(fd: int, directory: str) -> bool:
    """Whether the cached ``O_PATH`` fd ``fd`` is still the directory at path ``directory``."""
    try:
        now = os.stat(directory)
    except OSError:
        return False
    cached = os.fstat(fd)
    return (cached.st_dev, cached.st_ino) == (now.st_dev, now.st_ino)


def listen(path: str | os.PathLike[str], mode: int = 0o660, backlog: int = 512) -> socket.socket:
    """A non-blocking listening socket at ``path`` (a stale socket file there is replaced; the
    caller must own the path, e.g. by holding the data dir's lock)."""
    path = Path(path)
    try:
        if stat.S_ISSOCK(path.lstat().st_mode):
            path.unlink()
    except FileNotFoundError:
        pass
    # Bind under a temporary name, listen, then rename into place: a client never finds a
    # socket file that refuses connections (the broker is "up" once the path exists).
    if os.path.lexists(path):  # not a socket (a stale one was removed above): never replace it
        raise OSError(errno.EADDRINUSE, "a file that is not a socket is in the way", str(path))
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        temporary.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(usable_address(temporary))
        os.chmod(temporary, mode)
        sock.listen(backlog)
        sock.setblocking(False)
        os.rename(temporary, path)
    except BaseException:
        sock.close()
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise
    return sock


def connect(path: str | os.PathLike[str], timeout_s: float | None = None) -> socket.socket:
    """A blocking connection to ``path`` (OSError as the kernel says: ENOENT, ECONNREFUSED...)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout_s)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER_BYTES)
        address = usable_address(path)
        deadline = time.monotonic() + (timeout_s or 0.0)
        while True:
            try:
                sock.connect(address)
                break
            except BlockingIOError:
                # With a timeout the socket is non-blocking, and a Unix socket whose listen
                # backlog is full (a flood of connects) answers EAGAIN at once: wait for room.
                if time.monotonic() >= deadline:
                    raise
                time.sleep(CONNECT_RETRY_S)
    except BaseException:
        sock.close()
        raise
    return sock


def recv_exact_into(sock: socket.socket, view: memoryview) -> None:
    """Fill ``view`` from ``sock`` (blocking); ConnectionError at EOF."""
    got = 0
    size = len(view)
    while got < size:
        count = sock.recv_into(view[got:])
        if not count:
            raise ConnectionResetError("the broker closed the connection")
        got += count


class _FileRange:
    __slots__ = ("fd", "position", "remaining", "owned")

    def __init__(self, fd: int, position: int, remaining: int) -> None:
        self.fd = fd
        self.position = position
        self.remaining = remaining
        self.owned = False


class ServerConnection:
    """One accepted, non-blocking connection: framed input, queued output (bytes + sendfile).

    Invariant: output goes out in the order it was queued; ``pending_output`` is True exactly
    when the queue is not empty (the owner then watches the socket for EVENT_WRITE).
    """

    def __init__(self, sock: socket.socket, frame_bytes_max: int | None = None) -> None:
        sock.setblocking(False)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER_BYTES)
        except OSError:
            pass
        self.sock = sock
        self.decoder = FrameDecoder(frame_bytes_max)
        self._output: collections.deque[bytes | memoryview | _FileRange] = collections.deque()
        self.closed = False
        self.pending_requests = 0
        self.user: object = None  # what the owner hangs on the connection (rings, member ids)
        # monotonic time the first bytes of the frame being received arrived; None between
        # frames (see frame_overdue)
        self.frame_started_at: float | None = None

    def fileno(self) -> int:
        return self.sock.fileno()

    @property
    def pending_output(self) -> bool:
        return bool(self._output)

    def receive(self) -> list[Frame] | None:
        """Read what is there; the whole frames received, or None at EOF.  ProtocolError on a
        malformed frame (the owner answers with an error frame and closes)."""
        if not self.fill():
            return None
        frames = self.decoder.frames()
        if frames:
            self._frame_taken()
        return frames

    def fill(self) -> bool:
        """Read what is there into the frame decoder (take the frames with
        :meth:`next_frame`); False at EOF or a read error."""
        try:
            data = self.sock.recv(RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return False
        if not data:
            return False
        self.decoder.receive_data(data)
        if self.frame_started_at is None:
            self.frame_started_at = time.monotonic()
        return True

    def next_frame(self) -> Frame | None:
        """The next whole frame received (ProtocolError on a malformed one)."""
        frame = self.decoder.next_frame()
        if frame is not None:
            self._frame_taken()
        return frame

    def _frame_taken(self) -> None:
        # bytes left over belong to the next frame, whose clock starts now
        self.frame_started_at = time.monotonic() if self.decoder.buffered_bytes else None

    def frame_overdue(self, now: float, timeout_s: float) -> bool:
        """Whether the frame being received began more than ``timeout_s`` before ``now``.

        Time with answers waiting to be written does not count (the owner does not read the
        connection then: the frame may be whole in the kernel's buffer): while output waits, the
        clock restarts at each call, so an owner that asks at least every ``timeout_s / 4``
        gives a frame at least 3/4 of ``timeout_s`` of reading time."""
        started = self.frame_started_at
        if started is None:
            return False
        if self._output:
            self.frame_started_at = now
            return False
        return now - started > timeout_s

    def send(self, data: bytes | memoryview) -> None:
        self._output.append(data)
        self.flush()

    def send_file(self, head: bytes, fd: int, position: int, size: int) -> None:
        """Queue ``head`` then ``size`` bytes of file ``fd`` from ``position``: copied with
        the head into one send up to COPY_SEND_BYTES_MAX, else by sendfile."""
        if 0 < size <= COPY_SEND_BYTES_MAX:
            try:
                data = os.pread(fd, size, position)
            except OSError:
                self.close()
                return
            if len(data) < size:  # as sendfile's early end: the reader must not wait for more
                self.close()
                return
            self._output.append(head + data)
        else:
            self._output.append(head)
            if size:
                self._output.append(_FileRange(fd, position, size))
        self.flush()

    def flush(self) -> None:
        """Write as much queued output as the socket takes now."""
        output = self._output
        sock = self.sock
        try:
            while output:
                item = output[0]
                if isinstance(item, _FileRange):
                    sent = os.sendfile(sock.fileno(), item.fd, item.position, item.remaining)
                    if sent == 0:
                        raise BrokenPipeError("file range ended early (segment truncated?)")
                    item.position += sent
                    item.remaining -= sent
                    if item.remaining:
                        # every queued range, not just this one: the caller may close its fds
                        self._own_file_ranges()
                        return
                    if item.owned:
                        os.close(item.fd)
                else:
                    sent = sock.send(item)
                    if sent < len(item):
                        output[0] = memoryview(item)[sent:]
                        self._own_file_ranges()
                        return
                output.popleft()
        except (BlockingIOError, InterruptedError):
            self._own_file_ranges()
        except OSError:
            self.close()

    def _own(self, item: _FileRange) -> None:
        if not item.owned:
            item.fd = os.dup(item.fd)
            item.owned = True

    def _own_file_ranges(self) -> None:
        for item in self._output:
            if isinstance(item, _FileRange):
                self._own(item)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for item in self._output:
            if isinstance(item, _FileRange) and item.owned:
                os.close(item.fd)
        self._output.clear()
        try:
            self.sock.close()
        except OSError:
            pass


def fit_fd_limit(connections_max: int) -> int:
    """Raise this process's RLIMIT_NOFILE soft limit so that ``connections_max`` connections
    and ``limits.connection_fds_reserved`` other fds fit (up to the hard limit); the number of
    connections that fit.  Accepting past the fd limit would fail with EMFILE, and a listener
    that cannot accept stays readable (a busy loop)."""
    wanted = connections_max + limits.connection_fds_reserved
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return connections_max
    return max(1, min(connections_max, soft - limits.connection_fds_reserved))


class Refusals:
    """Connections a listener closes at once because it holds its limit: counted, and logged
    at most once per second (a flood of connects must not flood the log)."""

    def __init__(self, logger: logging.Logger, what: str) -> None:
        self.logger = logger
        self.what = what
        self.count = 0
        self._logged = 0
        self._next_log = 0.0

    def refuse(self, sock: socket.socket, connections_max: int) -> None:
        sock.close()
        self.count += 1
        now = time.monotonic()
        if now >= self._next_log:
            self._next_log = now + REFUSAL_LOG_INTERVAL_S
            self.logger.warning("%s: refused %d connection(s): connections_max %d reached",
                                self.what, self.count - self._logged, connections_max)
            self._logged = self.count


__all__ = ["ProtocolError", "Refusals", "ServerConnection", "connect", "fit_fd_limit", "listen",
           "recv_exact_into", "usable_address"]


def overdue_frames(candidates: Iterable[object], now: float,
                   timeout_s: float) -> list[tuple[ServerConnection, ProtocolError]]:
    """The connections among ``candidates`` (a selector's data: others are skipped) whose frame
    began more than ``timeout_s`` before ``now`` (slow-loris), each with the error to send it
    before closing it."""
    overdue = []
    for connection in candidates:
        if isinstance(connection, ServerConnection) and connection.frame_overdue(now, timeout_s):
            began_s = now - (connection.frame_started_at or now)
            overdue.append((connection, ProtocolError(
                f"a frame begun {began_s:.1f} s ago is still incomplete "
                f"({connection.decoder.buffered_bytes} bytes received; frame_read_timeout_ms "
                f"{timeout_s * 1000:.0f}): closing the connection")))
    return overdue
