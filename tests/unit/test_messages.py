"""Messages (shmbroker.protocol.messages) and error codes (shmbroker.errors.error_from_code)."""

from __future__ import annotations

import importlib
import pkgutil
import struct

import orjson
import pytest

import shmbroker
from shmbroker import errors
from shmbroker.errors import (
    BrokerError,
    OffsetOutOfRangeBrokerError,
    OffsetOutOfRangeError,
    ProtocolError,
    error_from_code,
)
from shmbroker.protocol import messages
from shmbroker.protocol.frames import FrameDecoder
from shmbroker.protocol.messages import (
    SUPERVISOR_APIS,
    WORKER_APIS,
    ApiKey,
    check_response,
    error_body,
    error_frame,
    field,
)


def all_coded_classes() -> list[type[BrokerError]]:
    """BrokerError and every subclass defined anywhere in shmbroker."""
    for module in pkgutil.walk_packages(shmbroker.__path__, "shmbroker."):
        if module.name.endswith("__main__"):
            continue
        importlib.import_module(module.name)
    found: list[type[BrokerError]] = []
    pending: list[type[BrokerError]] = [BrokerError]
    while pending:
        cls = pending.pop()
        if cls not in found:
            found.append(cls)
        pending.extend(cls.__subclasses__())
    return found


def instance_of(cls: type[BrokerError]) -> BrokerError:
    if issubclass(cls, OffsetOutOfRangeBrokerError):
        return cls(17, 5, 12)
    return cls(f"something about {cls.__name__} went wrong")


# ------------------------------------------------------------------------------------------------
# api keys
# ------------------------------------------------------------------------------------------------

def test_api_key_numbers_are_the_wire_values() -> None:
    assert {key.name: key.value for key in ApiKey} == {
        "ERROR": 0, "METADATA": 1, "CREATE_TOPIC": 2, "DELETE_TOPIC": 3, "LIST_TOPICS": 4,
        "DESCRIBE_TOPIC": 5, "ALTER_CONFIGS": 6, "ADD_PARTITIONS": 7, "STATUS": 8,
        "OFFSET_COMMIT": 9, "OFFSET_FETCH": 10,
        "FETCH": 20, "PRODUCE": 21, "ATTACH_RING": 22, "LIST_OFFSETS": 23, "PING": 25,
        "JOIN_GROUP": 30, "HEARTBEAT": 31, "LEAVE_GROUP": 32, "LIST_GROUPS": 33,
        "DESCRIBE_GROUP": 34, "DELETE_GROUP": 35,
    }


def test_every_api_is_served_by_exactly_one_role() -> None:
    assert not SUPERVISOR_APIS & WORKER_APIS
    assert SUPERVISOR_APIS | WORKER_APIS == set(ApiKey) - {ApiKey.ERROR}
    assert all(0 <= key <= 0xFFFF for key in ApiKey)  # fits the u16 of the header


def test_ring_result_numbers_invert_the_errors_and_name_coded_classes() -> None:
    assert {number: code for code, number in messages.RING_RESULT_NUMBERS.items()} == \
        messages.RING_RESULT_ERRORS
    assert all(number < 0 for number in messages.RING_RESULT_ERRORS)
    for code in messages.RING_RESULT_ERRORS.values():
        assert error_from_code(code, "m").code == code


# ------------------------------------------------------------------------------------------------
# field()
# ------------------------------------------------------------------------------------------------

def test_field_returns_present_values() -> None:
    body = {"offset": 5, "name": "metrics", "flag": False, "config": {"a": 1}}
    assert field(body, "offset", int) == 5
    assert field(body, "name", str) == "metrics"
    assert field(body, "flag", bool) is False
    assert field(body, "config", dict) == {"a": 1}
    assert field(body, "offset", (int, str)) == 5
    assert field(body, "name", (int, str)) == "metrics"


def test_missing_field_is_named() -> None:
    with pytest.raises(ProtocolError, match="request field 'offset' is missing"):
        field({}, "offset", int)


def test_default_is_used_for_missing_and_null() -> None:
    assert field({}, "max_wait_ms", int, default=0) == 0
    assert field({"max_wait_ms": None}, "max_wait_ms", int, default=0) == 0
    assert field({}, "topics", list, default=None) is None
    assert field({"topics": None}, "topics", list, default=None) is None


def test_null_without_default_is_a_wrong_type() -> None:
    with pytest.raises(ProtocolError, match="'offset' must be int, not NoneType"):
        field({"offset": None}, "offset", int)


@pytest.mark.parametrize("value", [True, False])
def test_bool_is_not_an_int(value: bool) -> None:
    with pytest.raises(ProtocolError, match="'offset' must be int, not bool"):
        field({"offset": value}, "offset", int)
    with pytest.raises(ProtocolError, match="must be int or str, not bool"):
        field({"offset": value}, "offset", (int, str))
    assert field({"flag": value}, "flag", (bool, int)) is value


@pytest.mark.parametrize(("value", "kind"), [
    (1, bool), (1.0, int), ("1", int), (1, str), ([1], dict), ({}, list), (1, float),
])
def test_wrong_types_are_refused(value: object, kind: type) -> None:
    with pytest.raises(ProtocolError, match=f"'x' must be {kind.__name__}, "
                                            f"not {type(value).__name__}"):
        field({"x": value}, "x", kind)


def test_bounds_are_inclusive() -> None:
    body = {"low": -1, "high": 1}
    assert field(body, "low", int, minimum=-1, maximum=1) == -1
    assert field(body, "high", int, minimum=-1, maximum=1) == 1
    with pytest.raises(ProtocolError, match="'low' must be >= 0, not -1"):
        field(body, "low", int, minimum=0)
    with pytest.raises(ProtocolError, match="'high' must be <= 0, not 1"):
        field(body, "high", int, maximum=0)


def test_default_is_not_bounds_checked() -> None:
    assert field({}, "offset", int, default=-1, minimum=0) == -1


def test_huge_json_integers_are_not_ints() -> None:
    body = orjson.loads(b'{"offset": 18446744073709551616}')  # past u64: orjson gives a float
    with pytest.raises(ProtocolError, match="'offset' must be int"):
        field(body, "offset", int)


# ------------------------------------------------------------------------------------------------
# error bodies, error frames, check_response
# ------------------------------------------------------------------------------------------------

def test_error_body_of_a_coded_error() -> None:
    body = error_body(ProtocolError("frame too short"))
    assert body == {"error": "INVALID_REQUEST", "message": "frame too short"}


@pytest.mark.parametrize("error", [ValueError("boom"), OSError(5, "EIO"), KeyError("k")])
def test_error_body_of_an_uncoded_error_is_broker_error(error: BaseException) -> None:
    assert error_body(error) == {"error": "BROKER_ERROR", "message": str(error)}


@pytest.mark.parametrize("error", [OffsetOutOfRangeError(17, 5, 12),
                                   OffsetOutOfRangeBrokerError(17, 5, 12)])
def test_error_body_of_offset_out_of_range_carries_offsets(error: BaseException) -> None:
    assert error_body(error) == {
        "error": "OFFSET_OUT_OF_RANGE", "message": str(error),
        "offset": 17, "log_start_offset": 5, "log_end_offset": 12,
    }


def test_error_frame_exact_bytes() -> None:
    error = errors.UnknownTopicOrPartitionError("topic 'x' does not exist")
    json_bytes = b'{"error":"UNKNOWN_TOPIC_OR_PARTITION","message":"topic \'x\' does not exist"}'
    expected = struct.pack(">IHHII", 12 + len(json_bytes), 5, 0, 42, len(json_bytes)) + json_bytes
    assert error_frame(ApiKey.DESCRIBE_TOPIC, 42, error) == expected


def test_check_response_returns_a_success_unchanged() -> None:
    body = {"offset": 3, "error": None}
    assert check_response(body) is body
    assert check_response({}) == {}


@pytest.mark.parametrize("cls", all_coded_classes(), ids=lambda cls: cls.__name__)
def test_every_coded_error_survives_the_wire(cls: type[BrokerError]) -> None:
    sent = instance_of(cls)
    decoder = FrameDecoder()
    decoder.receive_data(error_frame(ApiKey.FETCH, 7, sent))
    frame = decoder.next_frame()
    assert frame is not None and frame.correlation_id == 7 and frame.api_key == ApiKey.FETCH
    with pytest.raises(BrokerError) as info:
        check_response(frame.body)
    assert type(info.value) is cls
    assert str(info.value) == str(sent)


def test_offset_out_of_range_carries_its_offsets() -> None:
    with pytest.raises(OffsetOutOfRangeBrokerError) as info:
        check_response({"error": "OFFSET_OUT_OF_RANGE", "message": "m", "offset": 9,
                        "log_start_offset": 10, "log_end_offset": 20})
    error = info.value
    assert (error.offset, error.log_start_offset, error.log_end_offset) == (9, 10, 20)
    assert isinstance(error, OffsetOutOfRangeError)  # storage callers catch this one


def test_offset_out_of_range_without_offsets() -> None:
    with pytest.raises(OffsetOutOfRangeBrokerError) as info:
        check_response({"error": "OFFSET_OUT_OF_RANGE", "offset": "nine"})
    assert (info.value.offset, info.value.log_start_offset, info.value.log_end_offset) == \
        (-1, -1, -1)


def test_unknown_code_is_a_plain_broker_error() -> None:
    with pytest.raises(BrokerError) as info:
        check_response({"error": "FROM_THE_FUTURE", "message": "new broker, old client"})
    assert type(info.value) is BrokerError
    assert str(info.value) == "new broker, old client"


def test_missing_message_falls_back_to_the_code() -> None:
    with pytest.raises(errors.TopicExistsError, match="^TOPIC_ALREADY_EXISTS$"):
        check_response({"error": "TOPIC_ALREADY_EXISTS"})


# ------------------------------------------------------------------------------------------------
# the code table itself
# ------------------------------------------------------------------------------------------------

def test_every_coded_class_declares_its_own_unique_code() -> None:
    classes = all_coded_classes()
    inherited = [cls.__qualname__ for cls in classes if "code" not in vars(cls)]
    assert not inherited, f"these classes inherit their parent's code: {inherited}"
    by_code: dict[str, list[str]] = {}
    for cls in classes:
        by_code.setdefault(cls.code, []).append(f"{cls.__module__}.{cls.__qualname__}")
    shared = {code: names for code, names in by_code.items() if len(names) > 1}
    assert not shared, f"codes shared by several classes: {shared}"
    assert all(isinstance(code, str) and code.isupper() for code in by_code)


@pytest.mark.parametrize("cls", all_coded_classes(), ids=lambda cls: cls.__name__)
def test_error_from_code_maps_back_to_the_class(cls: type[BrokerError]) -> None:
    error = error_from_code(cls.code, "message", offset=1, log_start_offset=2, log_end_offset=3)
    assert type(error) is cls
    if cls is not OffsetOutOfRangeBrokerError:
        assert str(error) == "message"
