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
# An append of this many bytes or more (going whole into one segment) checks its batches' CRCs and
# record chains on a helper thread while it writes them, where the helper is on (broker setting
# worker_check_thread); of more than the max, it checks them first.  A crash mid-append can so
# leave up to the max of unchecked bytes at the end of the last segment: recovery checks those as
# an append would.  Why and what it gains: APPEND_OVERLAP in shmbroker/storage/partition_log.py.
append_overlap_bytes_min = 256 * 1024
append_overlap_bytes_max = 16 * MIB

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
# Longest a consumer busy-polls its fetch sockets before it sleeps (Consumer's poll_spin_us).
poll_spin_us_max = 1_000_000
# Connections one worker or the supervisor accepts at once: the most the broker setting
# connections_max may ask for (a process also keeps its fd soft limit above what it accepts:
# it raises RLIMIT_NOFILE toward the hard limit at start, and accepts fewer if it cannot).
# Further connections are accepted and closed at once, with a (rate-limited) log line.
connections_max = 4096
# File descriptors a process keeps for itself beyond its connections (segments, indexes,
# rings, doorbells, the supervisor's worker pipes).
connection_fds_reserved = 256
# A frame whose first bytes arrived must be whole within the broker setting
# frame_read_timeout_ms (slow-loris); these bound the setting.
frame_read_timeout_ms_min = 100
frame_read_timeout_ms_max = 3_600_000
# Requests are answered in order, one at a time per connection; a worker parks at most one fetch
# per connection (a later request on it answers the parked one first).  Input a client pipelines
# waits in its socket buffer and in the frame decoder, which frame_bytes_max bounds.
# Produce rings one worker attaches in total, and per connection (a producer attaches one ring
# per partition, each over its own connection to that partition's worker).
rings_per_worker_max = 1024
rings_per_connection_max = 16
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

# -- committed offsets (shmbroker.storage.offset_log) --------------------------------------------
# A consumer group id is a str of 1 to this many characters (Kafka sets no bound; we reuse the
# topic-name length).
group_id_chars_max = 249
# UTF-8 bytes of the metadata string committed with an offset (Kafka's offset.metadata.max.bytes).
offset_metadata_bytes_max = 4096
# Longest record of the offset log: a commit with the longest group id, topic and metadata fits
# (about 5.4 KiB); a length field above it marks a corrupt record.
offset_log_record_bytes_max = 8 * 1024
# Encoded bytes staged (not yet synced) at once; stage() refuses more until the next sync().
offset_log_staged_bytes_max = 16 * MIB
# The log is compacted only once it is at least this big (replaying 4 MiB at start takes ~0.1 s).
offset_log_compact_bytes_min = 4 * MIB

# -- consumer groups (shmbroker.coordinator) -----------------------------------------------------
# Groups one coordinator holds, and members per group (static members that left and may return
# count until their session timeout).
groups_max = 10_000
members_per_group_max = 1000
# Lengths of the names a member sends (a group id: group_id_chars_max, above).
group_instance_id_chars_max = 255
client_id_chars_max = 255
# Topics one member may name in a subscription, and the length of a subscription regex (Python
# `re`, matched in full against each topic name; topic names are at most topic_name_chars_max).
subscribed_topics_max = topics_max
subscribed_pattern_chars_max = 1000
# A member is removed when it sends no heartbeat for session_timeout_ms, or does not acknowledge
# a revocation within rebalance_timeout_ms (Kafka's max.poll.interval.ms).  One host sees a dead
# process at once (its socket closes), so the lower bounds are far below Kafka's 6 s.
session_timeout_ms_min = 100
session_timeout_ms_max = 1_800_000
rebalance_timeout_ms_min = 100
rebalance_timeout_ms_max = 3_600_000
# Longest interval the coordinator asks members to heartbeat at (it asks for at most a third of
# their session timeout).
heartbeat_interval_ms_max = 5000
# Partitions one offset commit may name (metadata: offset_metadata_bytes_max, above).
commit_partitions_max = 100_000
