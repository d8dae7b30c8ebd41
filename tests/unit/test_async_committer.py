"""AsyncCommitter (client/committer.py) against a scripted server on a real Unix socket: the
pipelining bound (SENT_AHEAD_MAX written, the rest buffered and written by the reader thread as
answers come), answers and callbacks in order, an error answer, the in-flight bound's timeout,
and a server that goes away."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest
from broker_helpers import wait_for

from shmbroker.client.committer import SENT_AHEAD_MAX, AsyncCommitter
from shmbroker.client.types import TopicPartition
from shmbroker.errors import BrokerNotRunningError, RequestTimeoutError, ShmbrokerError
from shmbroker.protocol.frames import FrameDecoder, encode_frame
from shmbroker.protocol.messages import ApiKey

WAIT_S = 10.0


class ScriptedServer:
    """Accepts one connection; keeps every request frame; answers only when told."""

    def __init__(self, path: Path) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(1)
        self.requests: list[tuple[int, dict]] = []  # (correlation id, body)
        self.conn: socket.socket | None = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        self.conn = conn
        decoder = FrameDecoder()
        while True:
            try:
                data = conn.recv(1 << 20)
            except OSError:
                return
            if not data:
                return
            decoder.receive_data(data)
            frames = decoder.frames()
            with self._lock:
                self.requests += [(frame.correlation_id, frame.body) for frame in frames]

    def received(self) -> int:
        with self._lock:
            return len(self.requests)

    def answer(self, first: int, count: int, body: dict | None = None) -> None:
        assert self.conn is not None
        with self._lock:
            ids = [correlation for correlation, _ in self.requests[first : first + count]]
        self.conn.sendall(b"".join(encode_frame(ApiKey.OFFSET_COMMIT, correlation, body or {})
                                   for correlation in ids))

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.listener.close()


@pytest.fixture
def server(tmp_path):
    scripted = ScriptedServer(tmp_path / "broker.sock")
    yield scripted
    scripted.close()


def _commit(committer, partition, results, offset=1):
    offsets = {TopicPartition("t", partition): offset}
    committer.send({"group": "g", "offsets": [["t", partition, offset]]}, offsets,
                   lambda done, error: results.append((dict(done), error)))


def test_commits_beyond_the_sent_ahead_bound_wait_and_go_out_together(tmp_path, server):
    committer = AsyncCommitter(tmp_path / "broker.sock", WAIT_S)
    results: list = []
    total = SENT_AHEAD_MAX + 12
    for partition in range(total):
        _commit(committer, partition, results)
    wait_for(lambda: server.received() == SENT_AHEAD_MAX, WAIT_S,
             message="the first commits written at once")
    assert committer.pending == total
    assert [body["offsets"][0][1] for _, body in server.requests] == list(range(SENT_AHEAD_MAX))
    server.answer(0, SENT_AHEAD_MAX)  # answers come: the reader writes the 12 buffered ones
    wait_for(lambda: server.received() == total, WAIT_S, message="the buffered commits")
    assert [body["offsets"][0][1] for _, body in server.requests] == list(range(total))
    server.answer(SENT_AHEAD_MAX, 12)
    committer.flush(WAIT_S)
    assert committer.run_callbacks() == []
    assert results == [({TopicPartition("t", partition): 1}, None)
                       for partition in range(total)]
    committer.close()


def test_an_error_answer_reaches_its_callback_in_order(tmp_path, server):
    committer = AsyncCommitter(tmp_path / "broker.sock", WAIT_S)
    results: list = []
    for partition in range(3):
        _commit(committer, partition, results)
    wait_for(lambda: server.received() == 3, WAIT_S, message="three commits")
    server.answer(0, 1)
    server.answer(1, 1, {"error": "BROKER_ERROR", "message": "refused for the test"})
    server.answer(2, 1)
    committer.flush(WAIT_S)
    committer.run_callbacks()
    assert [error for _, error in results][0::2] == [None, None]
    assert isinstance(results[1][1], ShmbrokerError) and "refused for the test" in str(
        results[1][1])
    committer.close()


def test_the_in_flight_bound_blocks_then_times_out(tmp_path, server):
    committer = AsyncCommitter(tmp_path / "broker.sock", 0.3, in_flight_max=3)
    results: list = []
    for partition in range(3):
        _commit(committer, partition, results)
    with pytest.raises(RequestTimeoutError, match="3 asynchronous commits unanswered"):
        _commit(committer, 3, results)
    # once an answer comes, a blocked send goes through (given time enough on a busy machine)
    committer.timeout_s = WAIT_S
    sender = threading.Thread(target=_commit, args=(committer, 4, results))
    sender.start()
    wait_for(lambda: server.received() == 3, WAIT_S, message="three commits")
    server.answer(0, 1)
    sender.join(WAIT_S)
    assert not sender.is_alive()
    wait_for(lambda: server.received() == 4, WAIT_S, message="the commit that waited")
    committer.close()


def test_commits_in_flight_fail_when_the_server_goes_away(tmp_path, server):
    committer = AsyncCommitter(tmp_path / "broker.sock", WAIT_S)
    results: list = []
    for partition in range(SENT_AHEAD_MAX + 2):  # some written, some still buffered
        _commit(committer, partition, results)
    wait_for(lambda: server.received() == SENT_AHEAD_MAX, WAIT_S, message="the commits")
    server.answer(0, 1)
    wait_for(lambda: committer.pending == SENT_AHEAD_MAX + 1, WAIT_S, message="one answer")
    server.conn.shutdown(socket.SHUT_RDWR)
    wait_for(lambda: committer.pending == 0, WAIT_S, message="the others failed")
    committer.run_callbacks()
    assert results[0][1] is None
    assert all(isinstance(error, BrokerNotRunningError) for _, error in results[1:])
    assert len(results) == SENT_AHEAD_MAX + 2
    committer.close()
