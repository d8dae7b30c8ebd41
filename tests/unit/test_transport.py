"""Unix-socket plumbing (shmbroker.transport.unix): long paths, listen/connect, ServerConnection.

Socket pairs stand in for accepted connections.  Tests that need output to back up shrink the
sending socket's buffer, so a few MiB are enough to make ``send``/``sendfile`` stop part way.
"""

from __future__ import annotations

import errno
import os
import random
import resource
import shutil
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from shmbroker import limits
from shmbroker.errors import ProtocolError
from shmbroker.protocol.frames import encode_frame
from shmbroker.transport import unix
from shmbroker.transport.unix import (
    SUN_PATH_BYTES_MAX,
    ServerConnection,
    connect,
    fit_fd_limit,
    listen,
    recv_exact_into,
    usable_address,
)

SMALL_BUFFER_BYTES = 64 * 1024
RESERVED = limits.connection_fds_reserved


def deep_directory(base: Path) -> Path:
    """A directory whose socket path is well past sun_path's 107 bytes."""
    directory = base / ("d" * 50) / ("e" * 50) / ("f" * 50)
    directory.mkdir(parents=True)
    assert len(os.fsencode(directory / "broker.sock")) > SUN_PATH_BYTES_MAX
    return directory


def open_fds() -> set[int]:
    """This process's open fds (less the one listdir used for /proc/self/fd itself)."""
    return {fd for fd in map(int, os.listdir("/proc/self/fd")) if fd_is_open(fd)}


def fd_is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError as error:
        assert error.errno == errno.EBADF
        return False
    return True


def drain(sock: socket.socket, limit_bytes: int) -> bytes:
    """What ``sock`` (non-blocking) holds now, at most ``limit_bytes``."""
    try:
        return sock.recv(limit_bytes)
    except BlockingIOError:
        return b""


@pytest.fixture
def pair() -> Iterator[tuple[ServerConnection, socket.socket]]:
    """A ServerConnection with a small send buffer, and its non-blocking peer."""
    server_sock, client = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    connection = ServerConnection(server_sock)
    server_sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_BUFFER_BYTES)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_BUFFER_BYTES)
    client.setblocking(False)
    try:
        yield connection, client
    finally:
        connection.close()
        client.close()


@pytest.fixture
def segment(tmp_path: Path) -> tuple[Path, bytes]:
    """A file of 6 MiB of seeded random bytes (a stand-in for a segment)."""
    content = random.Random(7).randbytes(6 << 20)
    path = tmp_path / "00000000000000000000.log"
    path.write_bytes(content)
    return path, content


# ------------------------------------------------------------------------------------------------
# addresses, listen, connect
# ------------------------------------------------------------------------------------------------

def test_short_paths_are_used_as_they_are(tmp_path: Path) -> None:
    path = "/tmp/x.sock"
    assert usable_address(path) == path
    assert usable_address(Path(path)) == path
    exact = "/" + "a" * (SUN_PATH_BYTES_MAX - 1)
    assert usable_address(exact) == exact


def test_long_paths_go_through_proc_self_fd(tmp_path: Path) -> None:
    directory = deep_directory(tmp_path)
    short = usable_address(directory / "broker.sock")
    assert short.startswith("/proc/self/fd/") and short.endswith("/broker.sock")
    assert len(os.fsencode(short)) <= SUN_PATH_BYTES_MAX
    (directory / "probe").write_text("x")
    assert Path(short).with_name("probe").read_text() == "x"  # names the same directory
    assert usable_address(directory / "other.sock").rsplit("/", 1)[0] == short.rsplit("/", 1)[0]


def test_too_long_a_name_is_enametoolong(tmp_path: Path) -> None:
    with pytest.raises(OSError) as info:
        usable_address(tmp_path / ("n" * 120))
    assert info.value.errno == errno.ENAMETOOLONG


def test_bind_and_connect_under_a_long_path(tmp_path: Path) -> None:
    path = deep_directory(tmp_path) / "broker.sock"
    listener = listen(path, mode=0o600)
    try:
        assert stat.S_ISSOCK(os.lstat(path).st_mode)  # the socket file is at the real path
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
        client = connect(path, timeout_s=5)
        try:
            listener.setblocking(True)
            accepted, _ = listener.accept()
            with accepted:
                client.sendall(b"ping")
                buffer = bytearray(4)
                recv_exact_into(accepted, memoryview(buffer))
                assert buffer == b"ping"
        finally:
            client.close()
    finally:
        listener.close()


def test_long_path_in_a_recreated_directory(tmp_path: Path) -> None:
    """The cached directory fd must follow the path, not the directory that was removed."""
    directory = deep_directory(tmp_path)
    listen(directory / "broker.sock").close()
    shutil.rmtree(tmp_path / ("d" * 50))
    directory.mkdir(parents=True)
    listener = listen(directory / "broker.sock")
    try:
        assert stat.S_ISSOCK(os.lstat(directory / "broker.sock").st_mode)
        connect(directory / "broker.sock", timeout_s=5).close()
    finally:
        listener.close()


def test_listen_applies_mode_and_is_non_blocking(tmp_path: Path) -> None:
    path = tmp_path / "a.sock"
    listener = listen(path)
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
        assert listener.getblocking() is False
        with pytest.raises(BlockingIOError):
            listener.accept()
    finally:
        listener.close()


def test_listen_replaces_a_stale_socket_file(tmp_path: Path) -> None:
    path = tmp_path / "a.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays behind, as after a crash
    with pytest.raises(ConnectionRefusedError):
        connect(path, timeout_s=5)
    listener = listen(path, mode=0o640)
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
        connect(path, timeout_s=5).close()
    finally:
        listener.close()


def test_listen_never_removes_a_regular_file(tmp_path: Path) -> None:
    path = tmp_path / "a.sock"
    path.write_text("not a socket")
    with pytest.raises(OSError) as info:
        listen(path)
    assert info.value.errno == errno.EADDRINUSE
    assert path.read_text() == "not a socket"


def test_connect_errors_are_the_kernels(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        connect(tmp_path / "missing.sock", timeout_s=1)


def test_connect_sets_the_timeout(tmp_path: Path) -> None:
    listener = listen(tmp_path / "a.sock")
    try:
        client = connect(tmp_path / "a.sock", timeout_s=2.5)
        with client:
            assert client.gettimeout() == 2.5
    finally:
        listener.close()


# ------------------------------------------------------------------------------------------------
# recv_exact_into
# ------------------------------------------------------------------------------------------------

def test_recv_exact_into_collects_several_sends() -> None:
    left, right = socket.socketpair()
    with left, right:
        for piece in (b"ab", b"c", b"defg"):
            left.sendall(piece)
        buffer = bytearray(6)
        recv_exact_into(right, memoryview(buffer))
        assert buffer == b"abcdef"
        recv_exact_into(right, memoryview(buffer)[:0])  # nothing asked, nothing read
        left.close()
        rest = bytearray(2)
        with pytest.raises(ConnectionError):
            recv_exact_into(right, memoryview(rest))
        assert rest[:1] == b"g"


# ------------------------------------------------------------------------------------------------
# ServerConnection: input
# ------------------------------------------------------------------------------------------------

def test_receive_frames_split_arbitrarily() -> None:
    seed = 12345
    rng = random.Random(seed)
    frames = [encode_frame(20, index, {"offset": index}, rng.randbytes(rng.randint(0, 5000)))
              for index in range(200)]
    stream = b"".join(frames)
    server_sock, client = socket.socketpair()
    connection = ServerConnection(server_sock)
    try:
        assert connection.receive() == []  # nothing there yet: not EOF
        got = []
        position = 0
        while position < len(stream):
            size = rng.choice([1, 2, 3, 15, 16, 17, rng.randint(1, 20_000)])
            client.sendall(stream[position:position + size])
            position += size
            received = connection.receive()
            assert received is not None
            got += received
        while len(got) < len(frames):
            more = connection.receive()
            assert more, f"seed {seed}: stream ended after {len(got)} frames"
            got += more
        assert [(frame.correlation_id, frame.body, bytes(frame.raw)) for frame in got] == \
            [(index, {"offset": index}, frame[16 + len(f'{{"offset":{index}}}'):])
             for index, frame in enumerate(frames)], f"seed {seed}"
        client.close()
        assert connection.receive() is None  # EOF
    finally:
        connection.close()
        client.close()


def test_receive_raises_protocol_error_on_a_bad_frame() -> None:
    server_sock, client = socket.socketpair()
    connection = ServerConnection(server_sock)
    try:
        client.sendall(encode_frame(25, 1) + b"\xff\xff\xff\xff")
        with pytest.raises(ProtocolError):
            connection.receive()
    finally:
        connection.close()
        client.close()


def test_receive_honours_frame_bytes_max() -> None:
    server_sock, client = socket.socketpair()
    connection = ServerConnection(server_sock, frame_bytes_max=64)
    try:
        client.sendall(encode_frame(25, 1, raw=b"x" * 60))
        with pytest.raises(ProtocolError, match="frame_bytes_max 64"):
            connection.receive()
    finally:
        connection.close()
        client.close()


# ------------------------------------------------------------------------------------------------
# ServerConnection: output
# ------------------------------------------------------------------------------------------------

def test_send_small_output_goes_out_at_once(pair: tuple[ServerConnection, socket.socket]) -> None:
    connection, client = pair
    assert connection.fileno() == connection.sock.fileno()
    connection.send(b"hello ")
    connection.send(memoryview(b"world"))
    assert not connection.pending_output
    assert drain(client, 100) == b"hello world"


def test_send_large_output_is_queued_and_flushed_in_order(
        pair: tuple[ServerConnection, socket.socket]) -> None:
    connection, client = pair
    pieces = [bytes([index]) * (1 << 20) for index in range(4)]
    for piece in pieces:
        connection.send(piece)
    assert connection.pending_output
    received = bytearray()
    while connection.pending_output or len(received) < 4 << 20:
        received += drain(client, 1 << 20)
        connection.flush()
    assert received == b"".join(pieces)


def test_send_file_small_range(pair: tuple[ServerConnection, socket.socket],
                               segment: tuple[Path, bytes]) -> None:
    connection, client = pair
    path, content = segment
    fd = os.open(path, os.O_RDONLY)
    try:
        connection.send_file(b"HEAD", fd, 1000, 500)
        connection.send_file(b"EMPTY", fd, 0, 0)
        assert not connection.pending_output
    finally:
        os.close(fd)
    assert drain(client, 10_000) == b"HEAD" + content[1000:1500] + b"EMPTY"


def test_send_file_larger_than_the_socket_buffer(pair: tuple[ServerConnection, socket.socket],
                                                 segment: tuple[Path, bytes],
                                                 tmp_path: Path) -> None:
    connection, client = pair
    path, content = segment
    position, size = 12_345, 5 << 20
    before = open_fds()
    fd = os.open(path, os.O_RDONLY)
    connection.send_file(b"HEAD", fd, position, size)
    assert connection.pending_output, "5 MiB fit a 64 KiB socket buffer?"
    os.close(fd)  # retention deletes the segment: the queued range must not care
    decoy_path = tmp_path / "decoy"
    decoy_path.write_bytes(b"\0" * (6 << 20))
    decoy = os.open(decoy_path, os.O_RDONLY)  # probably reuses fd's number
    try:
        received = bytearray()
        flushes = 0
        while connection.pending_output:
            received += drain(client, 256 * 1024)
            connection.flush()
            flushes += 1
            assert flushes < 100_000 and not connection.closed
        while len(received) < 4 + size:
            chunk = drain(client, 1 << 20)
            assert chunk, "output missing after the queue emptied"
            received += chunk
    finally:
        os.close(decoy)
    assert flushes > 1
    assert received == b"HEAD" + content[position:position + size]
    assert open_fds() == before, "the dup of a fully sent range was not closed"


def test_pipelined_file_ranges_survive_their_fds_being_closed(
        pair: tuple[ServerConnection, socket.socket], segment: tuple[Path, bytes]) -> None:
    """A second range queued behind one that is part way out is dup'ed too."""
    connection, client = pair
    path, content = segment
    first = os.open(path, os.O_RDONLY)
    connection.send_file(b"ONE", first, 0, 2 << 20)
    os.close(first)
    assert connection.pending_output
    received = bytearray(drain(client, 100_000))  # room for the next flush to send part of it
    assert received
    second = os.open(path, os.O_RDONLY)
    connection.send_file(b"TWO", second, 3 << 20, 1 << 20)
    os.close(second)
    while connection.pending_output:
        received += drain(client, 256 * 1024)
        connection.flush()
        assert not connection.closed
    while chunk := drain(client, 1 << 20):
        received += chunk
    expected = b"ONE" + content[: 2 << 20] + b"TWO" + content[3 << 20: 4 << 20]
    assert bytes(received) == expected


def test_close_releases_dup_fds(pair: tuple[ServerConnection, socket.socket],
                                segment: tuple[Path, bytes]) -> None:
    connection, _client = pair
    path, _ = segment
    server_fd = connection.fileno()
    before = open_fds()
    fds = [os.open(path, os.O_RDONLY) for _ in range(3)]
    for index, fd in enumerate(fds):
        connection.send_file(b"H", fd, index, 1 << 20)
    for fd in fds:
        os.close(fd)
    duplicates = open_fds() - before
    assert len(duplicates) == 3, "every queued range holds its own dup"
    assert all(fd_is_open(fd) for fd in duplicates)
    connection.close()
    assert not any(fd_is_open(fd) for fd in duplicates)
    assert open_fds() == before - {server_fd}
    connection.close()  # twice is harmless
    assert not connection.pending_output and connection.closed


@pytest.mark.parametrize(("size", "received"), [
    (100, b""),  # copied: the short read is seen before anything is sent
    (unix.COPY_SEND_BYTES_MAX + 1, b"H56789"),  # sendfile: it stops at the end of the file
])
def test_file_range_past_the_end_of_the_file_closes_the_connection(
        pair: tuple[ServerConnection, socket.socket], tmp_path: Path, size: int,
        received: bytes) -> None:
    connection, client = pair
    path = tmp_path / "short.log"
    path.write_bytes(b"0123456789")
    fd = os.open(path, os.O_RDONLY)
    try:
        connection.send_file(b"H", fd, 5, size)  # the segment was truncated
    finally:
        os.close(fd)
    connection.flush()  # the next flush finds the end of the file
    assert connection.closed and not connection.pending_output
    assert drain(client, 1000) == received


def test_small_ranges_are_copied_larger_ones_sent_by_sendfile(
        pair: tuple[ServerConnection, socket.socket], segment: tuple[Path, bytes],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Up to COPY_SEND_BYTES_MAX the head and the range go out in one send, no sendfile."""
    connection, client = pair
    path, content = segment
    calls: list[int] = []
    real_sendfile = os.sendfile

    def counting_sendfile(out_fd: int, in_fd: int, offset: int, count: int) -> int:
        calls.append(count)
        return real_sendfile(out_fd, in_fd, offset, count)

    monkeypatch.setattr(unix.os, "sendfile", counting_sendfile)
    limit = unix.COPY_SEND_BYTES_MAX
    fd = os.open(path, os.O_RDONLY)
    try:
        connection.send_file(b"SMALL", fd, 7, limit)
        assert calls == [] and not connection.pending_output
        assert drain(client, 2 * limit) == b"SMALL" + content[7:7 + limit]
        connection.send_file(b"LARGE", fd, 7, limit + 1)
        assert calls == [limit + 1] and not connection.pending_output
    finally:
        os.close(fd)
    assert drain(client, 2 * limit) == b"LARGE" + content[7:8 + limit]


def test_send_to_a_closed_peer_closes_the_connection(
        pair: tuple[ServerConnection, socket.socket]) -> None:
    connection, client = pair
    client.close()
    connection.send(b"x" * 1000)  # EPIPE: no exception, the connection is closed instead
    assert connection.closed and not connection.pending_output


def test_close_releases_dups_even_after_a_broken_pipe(
        pair: tuple[ServerConnection, socket.socket], segment: tuple[Path, bytes]) -> None:
    connection, client = pair
    path, _ = segment
    before = open_fds()
    fd = os.open(path, os.O_RDONLY)
    connection.send_file(b"H", fd, 0, 4 << 20)
    os.close(fd)
    (duplicate,) = open_fds() - before
    client.close()
    connection.flush()  # EPIPE
    assert connection.closed
    assert not fd_is_open(duplicate)


def test_module_exports() -> None:
    assert set(unix.__all__) >= {"ServerConnection", "connect", "listen", "recv_exact_into",
                                 "usable_address"}


class _FakeLimits:
    """resource.getrlimit / setrlimit for RLIMIT_NOFILE, starting at (soft, hard)."""

    def __init__(self, soft: int, hard: int, refuse: bool = False) -> None:
        self.limits = (soft, hard)
        self.refuse = refuse
        self.set_to: list[tuple[int, int]] = []

    def getrlimit(self, which: int) -> tuple[int, int]:
        assert which == resource.RLIMIT_NOFILE
        return self.limits

    def setrlimit(self, which: int, limits: tuple[int, int]) -> None:
        assert which == resource.RLIMIT_NOFILE
        self.set_to.append(limits)
        if self.refuse:
            raise ValueError("not allowed")
        self.limits = limits


@pytest.mark.parametrize("soft, hard, refuse, raised_to, fits", [
    (1024, 1 << 20, False, 1000 + RESERVED, 1000),  # raised to what is wanted
    (1024, 1100, False, 1100, 1100 - RESERVED),  # up to the hard limit: fewer connections fit
    (1024, 1 << 20, True, None, 1024 - RESERVED),  # refused: what the soft limit allows
    (1 << 20, 1 << 20, False, None, 1000),  # enough already: untouched
    (resource.RLIM_INFINITY, resource.RLIM_INFINITY, False, None, 1000),
    (1024, resource.RLIM_INFINITY, False, 1000 + RESERVED, 1000),
    (100, 100, False, None, 1),  # even the reserve does not fit: one connection at least
])
def test_fit_fd_limit_raises_the_soft_limit_as_far_as_it_may(
        monkeypatch: pytest.MonkeyPatch, soft: int, hard: int, refuse: bool,
        raised_to: int | None, fits: int) -> None:
    fake = _FakeLimits(soft, hard, refuse)
    monkeypatch.setattr(resource, "getrlimit", fake.getrlimit)
    monkeypatch.setattr(resource, "setrlimit", fake.setrlimit)
    assert fit_fd_limit(1000) == fits
    if raised_to is None:
        assert fake.limits == (soft, hard)
    else:
        assert fake.set_to == [(raised_to, hard)] and fake.limits == (raised_to, hard)
