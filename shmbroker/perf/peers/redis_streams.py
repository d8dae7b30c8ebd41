"""Redis Streams as a peer: ``redis-server`` on a Unix socket in a temp dir, redis-py + hiredis.

Server: ``redis-server --port 0`` (no TCP) ``--unixsocket <tmp>/redis.sock``, persistence by
AOF only (``--appendonly yes --appendfsync everysec --save ""``: written at once, fsynced every
second -- the setting Redis recommends, close to shmbroker's page cache plus periodic flush).

Producer: ``XADD <stream> * v <value>`` pipelined, one pipeline of :data:`PIPELINE_RECORDS`
commands per round trip (redis-py's non-transactional pipeline; a reply is the record's ack).
Consumer: a consumer group made before the producer starts; ``XREADGROUP COUNT``
:data:`READ_COUNT` ``BLOCK`` and one ``XACK`` of the previous read's ids, the two in one
pipeline, so each read is one round trip.
"""

from __future__ import annotations

import contextlib
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from shmbroker.perf.peers.base import (
    PEERS_EXTRA_HINT,
    Chunk,
    Columns,
    ConsumerSession,
    Peer,
    ProducerSession,
    columns_of,
    command_output,
    find_binary,
    module_missing,
    package_version,
    server_process,
)

STREAM = b"shmbroker-bench"
GROUP = b"bench"
CONSUMER = b"bench-consumer-0"
FIELD = b"v"
PIPELINE_RECORDS = 1024  # XADDs per pipeline round trip (the runner's chunk)
READ_COUNT = 8192  # XREADGROUP COUNT


class RedisStreams(Peer):
    def missing(self) -> str | None:
        problems = []
        if find_binary("redis-server") is None:
            problems.append("redis-server not found")
        absent = module_missing("redis", "hiredis")
        if absent:
            problems.append(f"Python package{'s' if len(absent) > 1 else ''} "
                            f"{' and '.join(absent)} not installed")
        if not problems:
            return None
        return (f"{'; '.join(problems)}; install: apt-get install redis-server && "
                f"{PEERS_EXTRA_HINT}")

    def versions(self) -> dict[str, str]:
        line = command_output([find_binary("redis-server") or "redis-server", "--version"])
        match = re.search(r"v=(\S+)", line)
        return {"redis-server": match.group(1) if match else line,
                "redis-py": package_version("redis"), "hiredis": package_version("hiredis")}

    def describe(self) -> str:
        return (f"Unix socket, AOF appendfsync everysec, no RDB; XADD pipelined "
                f"{PIPELINE_RECORDS} per round trip, XREADGROUP COUNT {READ_COUNT} + XACK")

    @contextlib.contextmanager
    def server(self, temp_dir: Path) -> Iterator[tuple[dict[str, Any], int | None]]:
        path = temp_dir / "redis.sock"
        argv = [find_binary("redis-server") or "redis-server", "--port", "0",
                "--unixsocket", str(path), "--unixsocketperm", "700", "--dir", str(temp_dir),
                "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
                "--daemonize", "no", "--loglevel", "warning"]

        def ready() -> bool:
            if not path.exists():
                return False
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                probe.settimeout(1.0)
                probe.connect(str(path))
                probe.sendall(b"PING\r\n")
                return probe.recv(64).startswith(b"+PONG")

        with server_process(argv, temp_dir / "redis.log", ready, "redis-server") as process:
            yield {"path": str(path)}, process.pid

    def producer(self, address: dict[str, Any]) -> ProducerSession:
        return _Producer(address["path"])

    def consumer(self, address: dict[str, Any]) -> ConsumerSession:
        return _Consumer(address["path"])


def _client(path: str) -> Any:
    import redis

    return redis.Redis(unix_socket_path=path, decode_responses=False, socket_timeout=60)


class _Producer(ProducerSession):
    def __init__(self, path: str) -> None:
        super().__init__()
        self.client = _client(path)

    def send(self, chunk: Chunk) -> None:
        buffer, starts, lengths = self.values(chunk)
        # bytes, not memoryview slices: redis-py packs a memoryview argument as a separate
        # piece of its send list (one send per piece), bytes into one joined buffer
        data = bytes(buffer)
        pipe = self.client.pipeline(transaction=False)
        command = pipe.execute_command  # what pipe.xadd(STREAM, {FIELD: value}) ends in
        for start, length in zip(starts.tolist(), lengths.tolist()):
            command("XADD", STREAM, "*", FIELD, data[start:start + length])
        replies = pipe.execute(raise_on_error=False)
        first = int(chunk.seqs[0])
        if not any(isinstance(reply, Exception) for reply in replies):
            self.acked_ranges.append((first, chunk.count))
            return
        self.acked_ranges += [(first + index, 1) for index, reply in enumerate(replies)
                              if not isinstance(reply, Exception)]

    def close(self) -> None:
        self.client.close()


class _Consumer(ConsumerSession):
    def __init__(self, path: str) -> None:
        import redis

        self.client = _client(path)
        with contextlib.suppress(redis.ResponseError):  # BUSYGROUP: it exists already
            self.client.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
        self.unacked: list[bytes] = []

    def poll(self, timeout_s: float) -> list[Columns]:
        block_ms = max(1, int(timeout_s * 1000))
        if self.unacked:  # XACK the previous read and read on, in one round trip
            pipe = self.client.pipeline(transaction=False)
            pipe.xack(STREAM, GROUP, *self.unacked)
            pipe.xreadgroup(GROUP, CONSUMER, {STREAM: ">"}, count=READ_COUNT, block=block_ms)
            acked, reply = pipe.execute()
            if acked != len(self.unacked):
                raise RuntimeError(f"XACK acknowledged {acked} of {len(self.unacked)} entries")
        else:
            reply = self.client.xreadgroup(GROUP, CONSUMER, {STREAM: ">"}, count=READ_COUNT,
                                           block=block_ms)
        entries = _entries(reply)
        self.unacked = [entry_id for entry_id, _ in entries]
        if not entries:
            return []
        return [columns_of([fields[FIELD] for _, fields in entries])]

    def close(self) -> None:
        if self.unacked:
            self.client.xack(STREAM, GROUP, *self.unacked)
            self.unacked = []
        self.client.close()


def _entries(reply: Any) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """The (id, fields) entries of an XREADGROUP reply for one stream (RESP2, redis-py's
    default: ``[[stream, [(id, fields), ...]]]``), [] when it timed out."""
    return list(reply[0][1]) if reply else []
