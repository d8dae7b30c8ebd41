"""Where a partition's files, sockets and shared-memory names live (one home for the naming).

::

    <data_dir>/topics/<topic>/config.json            the topic's LogConfig overrides (supervisor)
    <data_dir>/topics/<topic>/<partition>/           the PartitionLog
    <data_dir>/run/t<topic_id>p<partition>.sock      the worker's socket
    <data_dir>/run/t<topic_id>p<partition>.lock      held by the live worker (flock)
    /dev/shm/<prefix>.t<topic_id>.p<partition>.ctl   control block;  ...r<ring id>: rings
    abstract socket <prefix>.t<topic_id>.p<partition>.db   the worker's doorbell
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

from shmbroker.shm import names

TOPICS_DIR = "topics"
RUN_DIR = "run"
TOPIC_CONFIG_FILE = "config.json"


class PartitionPaths(NamedTuple):
    data_dir: Path
    topic: str
    topic_id: int
    partition: int

    @property
    def log_dir(self) -> Path:
        return self.data_dir / TOPICS_DIR / self.topic / str(self.partition)

    @property
    def topic_config_file(self) -> Path:
        return self.data_dir / TOPICS_DIR / self.topic / TOPIC_CONFIG_FILE

    @property
    def socket_path(self) -> Path:
        return self.data_dir / RUN_DIR / f"t{self.topic_id}p{self.partition}.sock"

    @property
    def lock_path(self) -> Path:
        return self.data_dir / RUN_DIR / f"t{self.topic_id}p{self.partition}.lock"

    @property
    def shm_prefix(self) -> str:
        return names.shm_prefix(self.data_dir)

    @property
    def control_block_name(self) -> str:
        return names.control_block_name(self.shm_prefix, self.topic_id, self.partition)

    @property
    def doorbell_name(self) -> str:
        return f"{self.shm_prefix}.t{self.topic_id}.p{self.partition}.db"

    def ring_name(self, ring_id: int) -> str:
        return names.ring_name(self.shm_prefix, self.topic_id, self.partition, ring_id)

    def is_ring_name(self, name: str) -> bool:
        prefix = self.ring_name(0)[: -16]
        suffix = name[len(prefix):]
        return (name.startswith(prefix) and len(suffix) == 16
                and all(c in "0123456789abcdef" for c in suffix))


def describe(paths: PartitionPaths) -> dict[str, object]:
    """What a client needs to reach this partition (sent in METADATA responses)."""
    return {"partition": paths.partition, "socket": os.fspath(paths.socket_path),
            "control_block": paths.control_block_name, "doorbell": paths.doorbell_name,
            "shm_prefix": paths.shm_prefix, "log_dir": os.fspath(paths.log_dir)}
