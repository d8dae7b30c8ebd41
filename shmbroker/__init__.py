"""shmbroker: a persistent, Kafka-style event-streaming broker for one large host.

>>> from shmbroker import Producer, Consumer, Admin, TopicPartition
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_PUBLIC = {
    "Producer": "shmbroker.client.producer",
    "RecordFuture": "shmbroker.client.futures",
    "BatchMetadata": "shmbroker.client.futures",
    "Consumer": "shmbroker.client.consumer",
    "Admin": "shmbroker.client.admin",
    "TopicPartition": "shmbroker.client.types",
    "Record": "shmbroker.client.types",
    "RecordMetadata": "shmbroker.client.types",
    "OffsetAndTimestamp": "shmbroker.client.types",
    "ColumnarRecords": "shmbroker.client.types",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    """Import the client lazily, so that ``shmbroker --help`` and workers stay quick to start."""
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'shmbroker' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
