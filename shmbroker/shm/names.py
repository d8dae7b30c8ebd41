"""Names of a broker's shared-memory objects.

Every object of one broker lives under one prefix derived from its data directory, so two
brokers on one host never collide and a restarted broker can find (and unlink) what a killed one
left behind::

    prefix                 shmb.<first 12 hex digits of sha1(realpath(data_dir))>
    produce ring           /<prefix>.t<topic_id>.p<partition>.r<ring_id as 16 hex digits>
    control block          /<prefix>.t<topic_id>.p<partition>.ctl
    doorbell (abstract)    <prefix>.db.<pid>.<8 hex digits>   (see shmbroker.shm.doorbell)

On Linux, POSIX shared-memory names appear as files in /dev/shm without the leading "/".
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
from pathlib import Path

import posix_ipc

SHM_DIR = "/dev/shm"
PREFIX_HEX_DIGITS = 12
RING_ID_BITS = 63


def shm_prefix(data_dir: str | Path) -> str:
    """The prefix of every shared-memory name of the broker that owns ``data_dir``."""
    digest = hashlib.sha1(os.path.realpath(data_dir).encode()).hexdigest()
    return "shmb." + digest[:PREFIX_HEX_DIGITS]


def ring_name(prefix: str, topic_id: int, partition: int, ring_id: int) -> str:
    return f"/{prefix}.t{topic_id}.p{partition}.r{ring_id:016x}"


def control_block_name(prefix: str, topic_id: int, partition: int) -> str:
    return f"/{prefix}.t{topic_id}.p{partition}.ctl"


def _shm_entries() -> list[str]:
    try:
        return os.listdir(SHM_DIR)
    except FileNotFoundError:
        return []


def list_rings(prefix: str, topic_id: int, partition: int) -> list[str]:
    """Names (with the leading "/") of the rings of one partition present now, sorted."""
    pattern = re.compile(rf"{re.escape(prefix)}\.t{topic_id}\.p{partition}\.r[0-9a-f]{{16}}")
    return sorted("/" + entry for entry in _shm_entries() if pattern.fullmatch(entry))


def list_names(prefix: str) -> list[str]:
    """Every shared-memory name (with the leading "/") under ``prefix``, sorted: for cleaning up
    after a broker that was killed."""
    return sorted("/" + entry for entry in _shm_entries() if entry.startswith(prefix + "."))


def partition_of(prefix: str, name: str) -> tuple[int, int] | None:
    """``(topic_id, partition)`` of a control block or ring name under ``prefix`` (with or
    without the leading "/"); None for any other name."""
    rest = name.lstrip("/")
    if not rest.startswith(prefix + "."):
        return None
    match = _PARTITION_NAME.fullmatch(rest, len(prefix) + 1)
    if match is None:
        return None
    return int(match[1]), int(match[2])


_PARTITION_NAME = re.compile(r"t(0|[1-9][0-9]*)\.p(0|[1-9][0-9]*)\.(?:ctl|r[0-9a-f]{16})")


def new_ring_id() -> int:
    """A random positive 63-bit ring id; also the Kafka producer_id stamped in its batches."""
    return secrets.randbits(RING_ID_BITS) | 1


def unlink(name: str) -> bool:
    """Remove shared-memory object ``name`` (mappings stay valid until closed); False if it was
    already gone."""
    try:
        posix_ipc.unlink_shared_memory(name)
    except posix_ipc.ExistentialError:
        return False
    return True
