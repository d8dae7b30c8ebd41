"""Hard limits: every buffer, count and size the broker bounds, declared in one place.

Per-topic knobs that users set live in :mod:`shmbroker.config`; these are the limits that protect
the process itself from hostile or broken input.  Names carry their unit, ``_max``/``_min`` last.
"""

from __future__ import annotations

MIB = 1024 * 1024

# A compressed batch may not inflate beyond this (decompression-bomb guard).
decompressed_batch_bytes_max = 64 * MIB
# Largest batch any path accepts, whatever a topic's max_batch_bytes says.
batch_bytes_max = 64 * MIB
# Records in one batch (Kafka's offset deltas are int32; we cap far lower).
batch_records_max = 1 << 22
# Chunk the recovery scan reads at a time.
recovery_read_bytes = 16 * MIB

# -- sockets and frames (shmbroker.protocol) -----------------------------------------------------
# Largest frame on any local socket: a produce over the socket fallback carries batches up to
# batch_bytes_max; fetch responses are capped by fetch_bytes_max.
frame_bytes_max = batch_bytes_max + 1 * MIB
# JSON part of a frame (control messages are small).
frame_json_bytes_max = 1 * MIB
# Bytes one fetch response may carry (a request's max_bytes is clamped to it).
fetch_bytes_max = 64 * MIB
# Longest a fetch may park waiting for data.
fetch_wait_ms_max = 60_000
# Connections one worker or the supervisor accepts at once.
connections_max = 4096
# Requests are answered in order, one at a time per connection; a worker parks at most one fetch
# per connection (a later request on it answers the parked one first).  Input a client pipelines
# waits in its socket buffer and in the frame decoder, which frame_bytes_max bounds.
# Produce rings one worker attaches in total, and per producer client.
rings_per_worker_max = 1024
# Topics, and partitions per topic.
topics_max = 10_000
partitions_per_topic_max = 4096
# Kafka's topic-name rule.
topic_name_chars_max = 249

# -- produce rings (shmbroker.shm) ---------------------------------------------------------------
ring_data_bytes_min = 64 * 1024
ring_data_bytes_max = 1024 * MIB
ring_ack_slots_max = 1 << 20
# Bytes a worker takes from its rings per loop iteration (then it serves fetches).
drain_bytes_max = 1 * MIB
