"""Byte layouts of shmbroker's shared memory: produce rings and partition control blocks.

Pure constants (no I/O): :mod:`shmbroker.shm.ring` and :mod:`shmbroker.shm.control_block` map
these objects; anything that inspects a ring or a control block (a debugger, a dump tool) reads
the same numbers.  Every shared counter is one *native-endian* (little-endian on x86-64), 8-byte
aligned u64 word, read and written with a single load/store; each word has exactly one writer.

Produce ring, version 1 (one per producer client and partition; single producer, single
consumer)::

    position  size       writer    field
    0         8          producer  magic                  b"SHMBRNG1" as a little-endian u64
    8         8          producer  version                1
    16        8          producer  data_bytes             capacity of the data area (n x 4096)
    24        8          producer  ack_slots              number of ack slots (power of two)
    32        8          producer  producer_pid
    40        8          producer  producer_start_time_ms process create time, detects pid reuse
    48        8          producer  producer_id            == the ring id, stamped into batches
    56        8          producer  doorbell_length        bytes of doorbell_address used
    64        128        producer  doorbell_address       producer's AF_UNIX abstract address
    -- cache line 4 (256) --
    256       8          producer  head                   bytes published (monotonic)
    264       8          producer  head_seq               frames published (monotonic)
    -- cache line 5 (320) --
    320       8          producer  producer_closed        1 = clean close, no more frames
    328       8          producer  producer_waiting       1 = asleep on its doorbell
    -- cache line 6 (384) --
    384       8          worker    progress_gen           seqlock generation of progress
    392       2 x 16     worker    progress[2]            (tail u64, tail_seq u64), slot gen % 2
    -- cache line 7 (448) --
    448       8          worker    worker_broken          0, or an error number (RING_BROKEN_*)
    -- 4096: ack slots --
    4096      16 x n     worker    (seq u64, result i64)  result >= 0: base offset, < 0: error
    -- page aligned after the ack slots: data area --
    D         data_bytes producer  frames

Frames are Kafka RecordBatch v2 batches verbatim, packed back to back (size = batch_length +
12), so consecutive frames are directly writable to a log segment.  A frame never straddles the
end of the data area: when it does not fit in the bytes left before the end, the producer writes
WRAP_MARKER there (if at least FRAME_HEADER_BYTES are left) and the frame starts the next lap;
the reader treats "fewer than FRAME_HEADER_BYTES left" or a base_offset of WRAP_MARKER as wrap.
A frame's base_offset can therefore never be WRAP_MARKER (-1); producers write 0.  A frame's
producer_id is the ring's producer_id, and each frame's base_sequence is the previous frame's
plus its record count (mod 2**31): a reader that finds otherwise (stale bytes of an earlier lap
behind a head that was overwritten, another ring's frames) marks the ring broken.

Invariants: ``tail <= head``, ``head - tail <= data_bytes``, ``tail_seq <= head_seq``,
``head_seq - tail_seq <= ack_slots``; position of byte ``x`` in the data area is
``x % data_bytes``; frame ``seq`` owns ack slot ``seq % ack_slots``.  The worker writes a
frame's ack slot before it publishes a progress that covers it.

Partition control block, version 1 (one per partition, written by its worker only)::

    position  size  field
    0         8     magic               b"SHMBCTL1" as a little-endian u64
    8         8     version             1
    16        8     worker_pid
    24        8     state               CONTROL_STATE_* below
    32        8     generation          incremented by each worker start
    40        8     updated_ms          wall clock of the last update
    48        8     storage_full        1 while appends fail on the disk (no space left, ...)
    -- cache line 1 (64) --
    64        8     log_start_offset
    72        8     log_end_offset
    80        8     high_watermark
    88        8     readable_sequence   even: the three below agree; odd: being written
    96        8     readable_segment    base offset of a segment (the active one when written)
    104       8     readable_position   byte position in it where batches a consumer may
                                        read end (a batch boundary) ...
    112       8     readable_offset     ... and the offset there (<= high_watermark)
    -- cache line 2 (128) --
    128       8     worker_sleeping     1 = worker blocks in select; producers ring its doorbell
    (rest of the 4096 bytes zero)
"""

from __future__ import annotations

PAGE_BYTES = 4096
CACHE_LINE_BYTES = 64
WORD_BYTES = 8

# -- produce ring ------------------------------------------------------------------------------
RING_MAGIC = int.from_bytes(b"SHMBRNG1", "little")
RING_VERSION = 1
RING_HEADER_BYTES = PAGE_BYTES

MAGIC_POSITION = 0
VERSION_POSITION = 8
DATA_BYTES_POSITION = 16
ACK_SLOTS_POSITION = 24
PRODUCER_PID_POSITION = 32
PRODUCER_START_TIME_MS_POSITION = 40
PRODUCER_ID_POSITION = 48
DOORBELL_LENGTH_POSITION = 56
DOORBELL_ADDRESS_POSITION = 64
DOORBELL_ADDRESS_BYTES_MAX = 128

HEAD_POSITION = 256
HEAD_SEQ_POSITION = 264
PRODUCER_CLOSED_POSITION = 320
PRODUCER_WAITING_POSITION = 328
PROGRESS_GEN_POSITION = 384
PROGRESS_POSITION = 392  # slot i: tail at PROGRESS_POSITION + 16 i, tail_seq 8 bytes later
PROGRESS_SLOT_BYTES = 16
WORKER_BROKEN_POSITION = 448

ACK_AREA_POSITION = RING_HEADER_BYTES
ACK_SLOT_BYTES = 16  # seq u64, result i64

# Word indexes (position // 8) for memoryview.cast("Q") access.
MAGIC_WORD = MAGIC_POSITION // WORD_BYTES
VERSION_WORD = VERSION_POSITION // WORD_BYTES
DATA_BYTES_WORD = DATA_BYTES_POSITION // WORD_BYTES
ACK_SLOTS_WORD = ACK_SLOTS_POSITION // WORD_BYTES
PRODUCER_PID_WORD = PRODUCER_PID_POSITION // WORD_BYTES
PRODUCER_START_TIME_MS_WORD = PRODUCER_START_TIME_MS_POSITION // WORD_BYTES
PRODUCER_ID_WORD = PRODUCER_ID_POSITION // WORD_BYTES
DOORBELL_LENGTH_WORD = DOORBELL_LENGTH_POSITION // WORD_BYTES
HEAD_WORD = HEAD_POSITION // WORD_BYTES
HEAD_SEQ_WORD = HEAD_SEQ_POSITION // WORD_BYTES
PRODUCER_CLOSED_WORD = PRODUCER_CLOSED_POSITION // WORD_BYTES
PRODUCER_WAITING_WORD = PRODUCER_WAITING_POSITION // WORD_BYTES
PROGRESS_GEN_WORD = PROGRESS_GEN_POSITION // WORD_BYTES
PROGRESS_WORD = PROGRESS_POSITION // WORD_BYTES
PROGRESS_SLOT_WORDS = PROGRESS_SLOT_BYTES // WORD_BYTES
WORKER_BROKEN_WORD = WORKER_BROKEN_POSITION // WORD_BYTES
ACK_AREA_WORD = ACK_AREA_POSITION // WORD_BYTES
ACK_SLOT_WORDS = ACK_SLOT_BYTES // WORD_BYTES

# Frames (Kafka RecordBatch v2: base_offset int64, batch_length int32, then the rest).
FRAME_HEADER_BYTES = 12  # base_offset + batch_length; a frame's size = batch_length + 12
FRAME_BATCH_LENGTH_POSITION = 8
FRAME_BYTES_MIN = 61  # the RecordBatch v2 header
WRAP_MARKER = b"\xff" * 8

# RecordBatch v2 fields the reader checks in every frame (positions from the frame's start): a
# ring's frames carry its producer id, and their base sequences are contiguous modulo 2**31 (each
# frame's base sequence is the previous one's plus its record count).
FRAME_LAST_OFFSET_DELTA_POSITION = 23
FRAME_PRODUCER_ID_POSITION = 43
FRAME_BASE_SEQUENCE_POSITION = 53
FRAME_SEQUENCE_MODULUS = 1 << 31

# worker_broken values (0 = healthy).  A broken ring is never read again: the worker releases
# (unlinks) it, and its producer fails the frames still in flight and opens a new ring.
RING_HEALTHY = 0
RING_BROKEN_CORRUPT_FRAME = 1  # a published frame is impossible (length, wrap, identity)
RING_BROKEN_BY_WORKER = 2  # the worker gave up on the ring for another reason
RING_BROKEN_CORRUPT_HEADER = 3  # the header changed under the worker (magic, geometry, id)
RING_BROKEN_RELEASED = 4  # the worker released the ring (its producer closed or died)
RING_BROKEN_REASONS = {
    RING_BROKEN_CORRUPT_FRAME: "a frame in it was corrupt",
    RING_BROKEN_BY_WORKER: "the worker gave up on it",
    RING_BROKEN_CORRUPT_HEADER: "its header was overwritten",
    RING_BROKEN_RELEASED: "the worker released it (it took the producer for closed or dead)",
}


def broken_reason(code: int) -> str:
    """What a nonzero worker_broken value means, for error messages."""
    return f"{RING_BROKEN_REASONS.get(code, 'unknown reason')} (error {code})"


def ack_area_bytes(ack_slots: int) -> int:
    """Bytes of the ack slot area: ``ack_slots`` x 16, rounded up to whole pages."""
    return -(-ack_slots * ACK_SLOT_BYTES // PAGE_BYTES) * PAGE_BYTES


def data_area_position(ack_slots: int) -> int:
    """Byte position of the data area in the ring object."""
    return ACK_AREA_POSITION + ack_area_bytes(ack_slots)


def ring_object_bytes(data_bytes: int, ack_slots: int) -> int:
    """Total size of a ring's shared-memory object."""
    return data_area_position(ack_slots) + data_bytes


# -- partition control block ---------------------------------------------------------------------
CONTROL_MAGIC = int.from_bytes(b"SHMBCTL1", "little")
CONTROL_VERSION = 1
CONTROL_BLOCK_BYTES = PAGE_BYTES

CONTROL_MAGIC_POSITION = 0
CONTROL_VERSION_POSITION = 8
CONTROL_WORKER_PID_POSITION = 16
CONTROL_STATE_POSITION = 24
CONTROL_GENERATION_POSITION = 32
CONTROL_UPDATED_MS_POSITION = 40
CONTROL_STORAGE_FULL_POSITION = 48  # added in place of zero padding: version 1 still
CONTROL_LOG_START_OFFSET_POSITION = 64
CONTROL_LOG_END_OFFSET_POSITION = 72
CONTROL_HIGH_WATERMARK_POSITION = 80
# where consumers that read segment files themselves may read to (in place of zero padding, as
# storage_full: version 1 still; a block whose readable_sequence is 0 has published none)
CONTROL_READABLE_SEQUENCE_POSITION = 88
CONTROL_READABLE_SEGMENT_POSITION = 96
CONTROL_READABLE_POSITION_POSITION = 104
CONTROL_READABLE_OFFSET_POSITION = 112
CONTROL_WORKER_SLEEPING_POSITION = 128

CONTROL_STATE_STARTING = 0
CONTROL_STATE_RUNNING = 1
CONTROL_STATE_STOPPING = 2
CONTROL_STATE_STOPPED = 3
CONTROL_STATE_NAMES = {CONTROL_STATE_STARTING: "starting", CONTROL_STATE_RUNNING: "running",
                       CONTROL_STATE_STOPPING: "stopping", CONTROL_STATE_STOPPED: "stopped"}
