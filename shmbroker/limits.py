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
