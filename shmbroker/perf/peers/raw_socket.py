"""The raw baseline: pre-encoded RecordBatch v2 bytes streamed over one Unix socket.

No broker, no storage, no acknowledgements: the wire ceiling a local broker's records cannot
beat.  The producer encodes each distinct chunk of its template payloads into a RecordBatch once
(:func:`record_batch.encode_batch_columnar`); per send it writes only the records' 24-byte
benchmark headers into that batch, refreshes its CRC-32C and ``sendall`` s it.  The consumer
(listening since before the producer starts) reads into one buffer, cuts whole batches by their
length field and decodes each into columns with its CRC checked, as shmbroker's consumer does by
default.  A record counts as acknowledged once ``sendall`` returned.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from shmbroker.format import record_batch
from shmbroker.perf import payloads
from shmbroker.perf.peers.base import (
    I64,
    Chunk,
    Columns,
    ConsumerSession,
    Peer,
    ProducerSession,
)

RECEIVE_BUFFER_BYTES = 4 * 1024 * 1024  # grown when one batch is larger
BATCH_CACHE_MAX = 256  # pre-encoded (first, count) chunks kept; a paced run has more shapes
_CRC = struct.Struct(">I")


class RawSocket(Peer):
    def describe(self) -> str:
        return ("pre-encoded RecordBatch v2 over one Unix socket, CRC checked by the consumer; "
                "no broker, no storage, no acks")

    @contextlib.contextmanager
    def server(self, temp_dir: Path) -> Iterator[tuple[dict[str, Any], int | None]]:
        yield {"path": str(temp_dir / "raw.sock")}, None  # the consumer listens there

    def producer(self, address: dict[str, Any]) -> ProducerSession:
        return _Producer(address["path"])

    def consumer(self, address: dict[str, Any]) -> ConsumerSession:
        return _Consumer(address["path"])


class _Producer(ProducerSession):
    def __init__(self, path: str) -> None:
        super().__init__()
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.socket.connect(path)
        self.batches: dict[tuple[int, int], tuple[bytearray, I64]] = {}

    def _batch(self, first: int, count: int) -> tuple[bytearray, I64]:
        """The chunk's batch, encoded once, and where its values start in it."""
        cached = self.batches.get((first, count))
        if cached is None:
            begin = int(self.template_starts[first])
            lengths = self.template_lengths[first:first + count]
            values = memoryview(self.template)[begin:begin + int(lengths.sum())]
            batch = record_batch.encode_batch_columnar(values, lengths)
            positions = record_batch.decode_columnar(batch).value_positions
            cached = (batch, positions)
            if len(self.batches) < BATCH_CACHE_MAX:
                self.batches[(first, count)] = cached
        return cached

    def send(self, chunk: Chunk) -> None:
        batch, positions = self._batch(chunk.first, chunk.count)
        payloads.encode_headers(batch, positions, chunk.intended_ns, self.producer_id,
                                chunk.seqs)
        _CRC.pack_into(batch, record_batch.CRC_POSITION,
                       record_batch.compute_crc(batch, 0, len(batch)))
        self.socket.sendall(batch)
        self.acked_ranges.append((int(chunk.seqs[0]), chunk.count))

    def close(self) -> None:
        self.socket.close()


class _Consumer(ConsumerSession):
    def __init__(self, path: str) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(1)
        self.connection: socket.socket | None = None
        self.buffer = bytearray(RECEIVE_BUFFER_BYTES)
        self.filled = 0  # bytes received into buffer
        self.parsed = 0  # bytes of whole batches already returned
        self.ended = False

    def poll(self, timeout_s: float) -> list[Columns]:
        if self.connection is None:
            if not select.select([self.listener], [], [], timeout_s)[0]:
                return []
            self.connection, _ = self.listener.accept()
        if self.parsed:  # keep the partial batch at the front
            rest = self.filled - self.parsed
            self.buffer[:rest] = self.buffer[self.parsed:self.filled]
            self.filled, self.parsed = rest, 0
        if self.filled >= record_batch.LOG_OVERHEAD:
            needed = record_batch.batch_size_at(self.buffer, 0)
            if needed > len(self.buffer):  # a new buffer: the last poll's arrays may hold it
                grown = bytearray(needed)
                grown[:self.filled] = self.buffer[:self.filled]
                self.buffer = grown
        if self.ended:
            time.sleep(timeout_s)
            return []
        if not select.select([self.connection], [], [], timeout_s)[0]:
            return []
        received = self.connection.recv_into(memoryview(self.buffer)[self.filled:])
        if not received:
            self.ended = True  # the producer is done (end of stream)
            return []
        self.filled += received
        data = np.frombuffer(self.buffer, dtype=np.uint8)
        positions: list[I64] = []
        lengths: list[I64] = []
        position = 0
        while self.filled - position >= record_batch.LOG_OVERHEAD:
            size = record_batch.batch_size_at(self.buffer, position)
            if self.filled - position < size:
                break
            batch = record_batch.decode_columnar(data[:position + size], position)
            positions.append(batch.value_positions)
            lengths.append(batch.value_lengths)
            position += size
        self.parsed = position
        if not positions:
            return []
        return [Columns(data, np.concatenate(positions), np.concatenate(lengths))]

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
        self.listener.close()
