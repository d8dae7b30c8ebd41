"""shmbroker: a persistent, Kafka-style event-streaming broker for one large host."""

__version__ = "0.1.0"
