"""A producer process that SIGKILLs itself in the middle of a frame (``test_torn_frame.py``).

``python torn_frame_producer.py SPEC_JSON``; the spec holds ``ring_name``, ``ring_id``,
``socket`` (the partition worker's socket), ``good`` (a list of batches, each a list of values
as latin-1 strings), ``torn`` (the values of the frame it is killed in), ``mode`` and
``cut_fraction`` (see ``tests/unit/test_ring_torn_frame.py`` for the modes).

It creates its ring and attaches it to the worker as the Producer does, prints ``ready`` and
waits for a line on stdin; then it writes the good batches (waiting for room when the ring is
full), writes the torn frame as ``mode`` says and SIGKILLs itself: no ``finally``, no close, no
flag left in the ring.
"""

from __future__ import annotations

import json
import mmap
import os
import signal
import struct
import sys
import time
from typing import Any

import posix_ipc

from shmbroker.client.connection import Connection
from shmbroker.format import record_batch, ring_layout
from shmbroker.protocol.messages import ApiKey
from shmbroker.shm.ring import RingWriter

DATA_BYTES = 256 * 1024
ACK_SLOTS = 64
ROOM_WAIT_S = 20.0


def poke(name: str, position: int, value: int) -> None:
    """Store a u64 in the ring through a second mapping (a wrong write, not the RingWriter's)."""
    shared = posix_ipc.SharedMemory(name)
    try:
        mapping = mmap.mmap(shared.fd, shared.size)
    finally:
        shared.close_fd()
    struct.pack_into("<Q", mapping, position, value)
    mapping.close()


def write_or_wait(writer: RingWriter, frame: bytearray) -> None:
    deadline = time.monotonic() + ROOM_WAIT_S
    while writer.try_write(frame) is None:
        if time.monotonic() > deadline:
            raise SystemExit("the ring stayed full: is the worker draining it?")
        time.sleep(0.001)
        writer.acks()


def main(spec: dict[str, Any]) -> None:
    ring_id = spec["ring_id"]
    name = spec["ring_name"]
    writer = RingWriter.create(name, data_bytes=DATA_BYTES, ack_slots=ACK_SLOTS,
                               producer_id=ring_id)
    connection = Connection(spec["socket"], 10.0)
    connection.request(ApiKey.ATTACH_RING, {"name": name})
    print("ready", flush=True)
    sys.stdin.readline()

    sequence = 0
    head = 0  # the frames stay in the ring's first lap (the test keeps them small): no wrap
    for values in spec["good"]:
        encoded = [value.encode("latin-1") for value in values]
        frame = record_batch.encode_batch(encoded, producer_id=ring_id, producer_epoch=0,
                                          base_sequence=sequence)
        write_or_wait(writer, frame)
        sequence += len(values)
        head += len(frame)
    torn = record_batch.encode_batch([value.encode("latin-1") for value in spec["torn"]],
                                     producer_id=ring_id, producer_epoch=0,
                                     base_sequence=sequence)
    assert head + len(torn) <= DATA_BYTES, "the test's frames must fit in one lap"
    deadline = time.monotonic() + ROOM_WAIT_S
    while (view := writer.writable_region(len(torn))) is None:
        if time.monotonic() > deadline:
            raise SystemExit("no room for the torn frame")
        time.sleep(0.001)
        writer.acks()
    mode, fraction = spec["mode"], spec["cut_fraction"]
    if mode in ("unpublished", "head_seq", "torn_head"):
        cut = int(fraction * len(torn))
        view[:cut] = torn[:cut]
        view.release()
        if mode in ("head_seq", "torn_head"):
            poke(name, ring_layout.HEAD_SEQ_POSITION, len(spec["good"]) + 1)
        if mode == "torn_head":  # a head over the written part only (no RingWriter does it)
            poke(name, ring_layout.HEAD_POSITION, head + cut)
    else:
        view[:] = torn
        if mode == "bad_length":
            struct.pack_into(">i", view, ring_layout.FRAME_BATCH_LENGTH_POSITION,
                             len(torn) + 1000)
        else:  # flipped: a byte of the records (the CRC no longer matches)
            view[record_batch.HEADER_SIZE + int(fraction * (len(torn) - 61))] ^= 0xFF
        view.release()
        writer.commit(len(torn))
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
