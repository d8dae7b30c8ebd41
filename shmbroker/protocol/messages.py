"""Messages of the local protocol: api keys, request fields, error responses.

Every request is a frame (protocol.frames) whose ``api_key`` names it and whose JSON part holds
its fields; the response repeats api key and correlation id.  A successful response's JSON has
no ``error``; a failed one is ``{"error": CODE, "message": "...", ...}`` where CODE is the
``code`` of a class in :mod:`shmbroker.errors` (``error_from_code`` turns it back into that
exception).  Requests are checked field by field here (:func:`field`), so handlers never see a
wrong type: JSON of the wrong shape is a ProtocolError with the field named.

Supervisor (``broker.sock``)         Worker (one socket per partition)
  METADATA       topics?               FETCH          offset, max_bytes, max_wait_ms, min_bytes
  CREATE_TOPIC   name, partitions,     PRODUCE        acks (+ raw batches)
                 config?               ATTACH_RING    name
  DELETE_TOPIC   name                  LIST_OFFSETS   timestamp_ms (-2 earliest, -1 latest)
  LIST_TOPICS    -                     PING           -
  DESCRIBE_TOPIC name
  ALTER_CONFIGS  name, config
  ADD_PARTITIONS name, partitions
  STATUS         -
  OFFSET_COMMIT  group_id, offsets
                 [[topic, partition, offset, metadata]]
  OFFSET_FETCH   group_id, partitions?
  (OFFSET_COMMIT also takes member_id and member_epoch: a group member's commit, fenced by them)

Consumer groups (``broker.sock``; the connection that joins is the member's liveness: when it
closes the member is gone at once)
  JOIN_GROUP     group_id, member_id?, group_instance_id?, client_id, pid, topics | pattern,
                 assignor, session_timeout_ms, rebalance_timeout_ms
  HEARTBEAT      group_id, member_id, member_epoch, owned [[topic, partition]],
                 (topics | pattern, assignor)?  -- a new subscription
     both answer member_id, member_epoch, assigned, revoke, heartbeat_interval_ms
  LEAVE_GROUP    group_id, member_id, permanent?
  LIST_GROUPS    -
  DESCRIBE_GROUP group_id
  DELETE_GROUP   group_id
The supervisor *nudges* a member whose next heartbeat would bring news (partitions to revoke or to
take) with an unsolicited HEARTBEAT frame of correlation id 0, body ``{"nudge": true, ...}``, so a
rebalance costs round trips rather than heartbeat intervals.
"""

from __future__ import annotations

import enum
from typing import Any

from shmbroker.errors import (
    BrokerError,
    OffsetOutOfRangeError,
    ProtocolError,
    ShmbrokerError,
    error_from_code,
)
from shmbroker.protocol.frames import encode_frame


class ApiKey(enum.IntEnum):
    ERROR = 0  # a response to a frame that could not be parsed at all
    # supervisor
    METADATA = 1
    CREATE_TOPIC = 2
    DELETE_TOPIC = 3
    LIST_TOPICS = 4
    DESCRIBE_TOPIC = 5
    ALTER_CONFIGS = 6
    ADD_PARTITIONS = 7
    STATUS = 8
    OFFSET_COMMIT = 9
    OFFSET_FETCH = 10
    # worker
    FETCH = 20
    PRODUCE = 21
    ATTACH_RING = 22
    LIST_OFFSETS = 23
    PING = 25  # (24 was a config update; workers re-read their topic config on SIGHUP)

    JOIN_GROUP = 30
    HEARTBEAT = 31
    LEAVE_GROUP = 32
    LIST_GROUPS = 33
    DESCRIBE_GROUP = 34
    DELETE_GROUP = 35


SUPERVISOR_APIS = frozenset({ApiKey.METADATA, ApiKey.CREATE_TOPIC, ApiKey.DELETE_TOPIC,
                             ApiKey.LIST_TOPICS, ApiKey.DESCRIBE_TOPIC, ApiKey.ALTER_CONFIGS,
                             ApiKey.ADD_PARTITIONS, ApiKey.STATUS, ApiKey.OFFSET_COMMIT,
                             ApiKey.OFFSET_FETCH, ApiKey.JOIN_GROUP, ApiKey.HEARTBEAT,
                             ApiKey.LEAVE_GROUP, ApiKey.LIST_GROUPS, ApiKey.DESCRIBE_GROUP,
                             ApiKey.DELETE_GROUP})
GROUP_APIS = frozenset({ApiKey.JOIN_GROUP, ApiKey.HEARTBEAT, ApiKey.LEAVE_GROUP,
                        ApiKey.LIST_GROUPS, ApiKey.DESCRIBE_GROUP, ApiKey.DELETE_GROUP})
# correlation id of a supervisor-initiated frame (a heartbeat nudge); requests start at 1
UNSOLICITED_CORRELATION_ID = 0
WORKER_APIS = frozenset({ApiKey.FETCH, ApiKey.PRODUCE, ApiKey.ATTACH_RING, ApiKey.LIST_OFFSETS,
                         ApiKey.PING})

# Kafka's ListOffsets sentinels.
LATEST_TIMESTAMP = -1
EARLIEST_TIMESTAMP = -2

# acks, as Kafka: 0 none, 1 leader, -1 all in-sync replicas.
ACKS_NONE, ACKS_LEADER, ACKS_ALL = 0, 1, -1

# Error numbers in ring ack slots (a negative result instead of a base offset).
RING_RESULT_ERRORS: dict[int, str] = {
    -1: "CORRUPT_MESSAGE",
    -2: "MESSAGE_TOO_LARGE",
    -3: "KAFKA_STORAGE_ERROR",
    -4: "SHUTTING_DOWN",
    -5: "BROKER_ERROR",
    -6: "STORAGE_FULL",
}
RING_RESULT_NUMBERS: dict[str, int] = {code: number for number, code in RING_RESULT_ERRORS.items()}

_MISSING = object()


def field(body: dict[str, Any], name: str, kind: type | tuple[type, ...], *,
          default: Any = _MISSING, minimum: int | None = None, maximum: int | None = None) -> Any:
    """``body[name]`` checked to be of ``kind`` (bool is never an int), within bounds."""
    value = body.get(name, _MISSING)
    if value is _MISSING or value is None and default is not _MISSING:
        if default is _MISSING:
            raise ProtocolError(f"request field {name!r} is missing")
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        expected = " or ".join(k.__name__ for k in kinds)
        raise ProtocolError(
            f"request field {name!r} must be {expected}, not {type(value).__name__}")
    if isinstance(value, int) and not isinstance(value, bool):
        if minimum is not None and value < minimum:
            raise ProtocolError(f"request field {name!r} must be >= {minimum}, not {value}")
        if maximum is not None and value > maximum:
            raise ProtocolError(f"request field {name!r} must be <= {maximum}, not {value}")
    return value


def error_body(error: BaseException) -> dict[str, Any]:
    """The JSON of an error response for ``error``."""
    code = error.code if isinstance(error, ShmbrokerError) else None
    body: dict[str, Any] = {"error": code or BrokerError.code, "message": str(error)}
    if isinstance(error, OffsetOutOfRangeError):
        body.update(offset=error.offset,
                    log_start_offset=error.log_start_offset,
                    log_end_offset=error.log_end_offset)
    return body


def error_frame(api_key: int, correlation_id: int, error: BaseException) -> bytes:
    return encode_frame(api_key, correlation_id, error_body(error))


def check_response(body: dict[str, Any]) -> dict[str, Any]:
    """Raise the error a response carries; return the body otherwise."""
    code = body.get("error")
    if code is None:
        return body
    fields = {key: body[key] for key in ("offset", "log_start_offset", "log_end_offset")
              if isinstance(body.get(key), int)}
    raise error_from_code(str(code), str(body.get("message", code)), **fields)
