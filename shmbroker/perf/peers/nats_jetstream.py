"""NATS JetStream as a peer: ``nats-server -js`` on 127.0.0.1, file storage in a temp dir, nats-py.

Server: ``nats-server -js -sd <tmp> -a 127.0.0.1 -p -1`` (-1: a port the server picks; it writes
it to ``--ports_file_dir``).  The stream keeps its messages in files (``storage=file``, the
server's default sync: written at once, fsynced periodically).

Producer: ``js.publish_async`` (each message acknowledged by the server once stored) with at most
:data:`PUBLISH_IN_FLIGHT` acknowledgements outstanding, then it waits for the rest.
Consumer: a durable pull consumer made before the producer starts, ``fetch`` of
:data:`FETCH_RECORDS` messages at a time, ack policy *all*: one ack of a fetch's last message
acknowledges the fetch (as XACK of a whole read does for Redis).

nats-py is asyncio; each session runs its own event loop and drives it from the runner's
synchronous calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

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

STREAM = "shmbroker-bench"
SUBJECT = "shmbroker-bench.records"
DURABLE = "bench"
PUBLISH_IN_FLIGHT = 4000  # nats-py's default publish_async_max_pending
FETCH_RECORDS = 4096
ACK_PENDING_MAX = 1 << 20  # the consumer's max_ack_pending: never the bottleneck
CONNECT_TIMEOUT_S = 10.0


class NatsJetStream(Peer):
    def missing(self) -> str | None:
        problems = []
        if find_binary("nats-server") is None:
            problems.append("nats-server not found")
        if module_missing("nats"):
            problems.append("Python package nats-py not installed")
        if not problems:
            return None
        return (f"{'; '.join(problems)}; install: apt-get install nats-server && "
                f"{PEERS_EXTRA_HINT}")

    def versions(self) -> dict[str, str]:
        line = command_output([find_binary("nats-server") or "nats-server", "--version"])
        match = re.search(r"v(\d\S*)", line)
        return {"nats-server": match.group(1) if match else line,
                "nats-py": package_version("nats-py")}

    def describe(self) -> str:
        return (f"127.0.0.1 TCP, JetStream file storage; publish_async with {PUBLISH_IN_FLIGHT} "
                f"acks in flight, durable pull consumer fetching {FETCH_RECORDS}, ack policy all")

    @contextlib.contextmanager
    def server(self, temp_dir: Path) -> Iterator[tuple[dict[str, Any], int | None]]:
        argv = [find_binary("nats-server") or "nats-server", "-js", "-sd", str(temp_dir / "js"),
                "-a", "127.0.0.1", "-p", "-1", "--ports_file_dir", str(temp_dir)]
        found: dict[str, str] = {}

        def ready() -> bool:
            ports = list(temp_dir.glob("nats-server_*.ports"))
            if not ports:
                return False
            url = json.loads(ports[0].read_text())["nats"][0]
            parsed = urlparse(url)
            with socket.create_connection((parsed.hostname, parsed.port), timeout=1.0) as probe:
                if not probe.recv(4096).startswith(b"INFO "):
                    return False
            found["url"] = url
            return True

        with server_process(argv, temp_dir / "nats.log", ready, "nats-server") as process:
            yield {"url": found["url"]}, process.pid

    def producer(self, address: dict[str, Any]) -> ProducerSession:
        return _Producer(address["url"])

    def consumer(self, address: dict[str, Any]) -> ConsumerSession:
        return _Consumer(address["url"])


async def _connect(url: str) -> tuple[Any, Any]:
    import nats

    connection = await nats.connect(url, connect_timeout=CONNECT_TIMEOUT_S,
                                    allow_reconnect=False)
    return connection, connection.jetstream(publish_async_max_pending=PUBLISH_IN_FLIGHT)


class _Producer(ProducerSession):
    def __init__(self, url: str) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.connection, self.js = self.loop.run_until_complete(_connect(url))
        # (first seq, count, futures) per chunk whose acknowledgements are not all in
        self.pending: deque[tuple[int, int, list[asyncio.Future[Any]]]] = deque()

    def send(self, chunk: Chunk) -> None:
        buffer, starts, lengths = self.values(chunk)
        self.loop.run_until_complete(self._publish(chunk, buffer, starts.tolist(),
                                                   lengths.tolist()))
        self._reap(finished=False)

    async def _publish(self, chunk: Chunk, buffer: bytearray, starts: list[int],
                       lengths: list[int]) -> None:
        publish = self.js.publish_async
        view = memoryview(buffer)
        futures = [await publish(SUBJECT, bytes(view[start:start + length]))
                   for start, length in zip(starts, lengths)]
        self.pending.append((int(chunk.seqs[0]), chunk.count, futures))

    def _reap(self, finished: bool) -> None:
        """Move chunks whose acks are all in (every chunk when ``finished``) to acked_ranges;
        a message whose ack failed or never came is not acknowledged."""
        while self.pending and (finished or all(f.done() for f in self.pending[0][2])):
            first, count, futures = self.pending.popleft()
            good = [f.done() and not f.cancelled() and f.exception() is None for f in futures]
            if all(good):
                self.acked_ranges.append((first, count))
            else:
                self.acked_ranges += [(first + i, 1) for i, ok in enumerate(good) if ok]

    def flush(self, timeout_s: float) -> None:
        with contextlib.suppress(TimeoutError):
            self.loop.run_until_complete(asyncio.wait_for(self.js.publish_async_completed(),
                                                          timeout_s))
        self._reap(finished=True)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.loop.run_until_complete(self.connection.close())
        self.loop.close()


class _Consumer(ConsumerSession):
    def __init__(self, url: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.connection, self.js = self.loop.run_until_complete(_connect(url))
        self.subscription = self.loop.run_until_complete(self._subscribe())

    async def _subscribe(self) -> Any:
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StorageType

        await self.js.add_stream(name=STREAM, subjects=[SUBJECT], storage=StorageType.FILE)
        return await self.js.pull_subscribe(
            SUBJECT, durable=DURABLE, stream=STREAM,
            config=ConsumerConfig(ack_policy=AckPolicy.ALL, deliver_policy=DeliverPolicy.ALL,
                                  max_ack_pending=ACK_PENDING_MAX))

    def poll(self, timeout_s: float) -> list[Columns]:
        return self.loop.run_until_complete(self._fetch(timeout_s))

    async def _fetch(self, timeout_s: float) -> list[Columns]:
        try:
            messages = await self.subscription.fetch(FETCH_RECORDS, timeout=timeout_s)
        except TimeoutError:  # nats.errors.TimeoutError is one: nothing came
            return []
        if not messages:
            return []
        await messages[-1].ack()  # ack policy all: acknowledges the whole fetch
        return [columns_of([message.data for message in messages])]

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.loop.run_until_complete(self.connection.close())
        self.loop.close()
