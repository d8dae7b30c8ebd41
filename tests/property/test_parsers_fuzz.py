"""Fuzz targets for the parsers of untrusted input that test_frames_fuzz.py and
test_record_batch_fuzz.py do not cover: each may raise only its documented error type.

- request fields (protocol.messages.field) and responses (check_response): ProtocolError /
  the ShmbrokerError a response names;
- record sections (format.small_batch, format.columnar, format.uniform_records, format.varint):
  CorruptRecordError (uniform_records.decode may also answer None: "not that shape");
- topic configs and broker settings (config.py): InvalidConfigError;
- workload files (perf/workload.py): ValueError naming the file.

Bounded for CI: every target has max_examples set (the whole module takes a few seconds).
Hypothesis prints a failing example and its ``@reproduce_failure`` blob.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from shmbroker.config import BROKER_SETTINGS, LOG_SETTINGS, BrokerConfig, LogConfig
from shmbroker.errors import (
    CorruptRecordError,
    InvalidConfigError,
    ProtocolError,
    ShmbrokerError,
)
from shmbroker.format import columnar, small_batch, uniform_records, varint
from shmbroker.format import record_batch as rb
from shmbroker.perf.workload import Workload, load_workload
from shmbroker.protocol.messages import check_response, field

SETTINGS = settings(max_examples=200, deadline=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

json_scalars = (st.none() | st.booleans() | st.integers(-(2**64), 2**64) | st.floats()
                | st.text(max_size=20))
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=10)
KINDS = [int, str, list, dict, bool, float, (int, str), (list, dict)]


# ------------------------------------------------------------------------------------------------
# protocol.messages
# ------------------------------------------------------------------------------------------------

@SETTINGS
@given(st.dictionaries(st.sampled_from(["offset", "name", "x"]), json_values, max_size=3),
       st.sampled_from(KINDS), st.none() | st.integers(-5, 5), st.none() | st.integers(-5, 5),
       st.booleans())
def test_field_raises_only_protocol_error(body: dict[str, Any], kind: Any, minimum: int | None,
                                          maximum: int | None, with_default: bool) -> None:
    extra = {"default": None} if with_default else {}
    try:
        value = field(body, "offset", kind, minimum=minimum, maximum=maximum, **extra)
    except ProtocolError as error:
        assert "'offset'" in str(error)
        return
    if value is None:
        assert with_default
        return
    kinds = kind if isinstance(kind, tuple) else (kind,)
    assert isinstance(value, kinds) and (bool in kinds or not isinstance(value, bool))
    if isinstance(value, int) and not isinstance(value, bool):
        assert minimum is None or value >= minimum
        assert maximum is None or value <= maximum


@SETTINGS
@given(st.dictionaries(st.sampled_from(["error", "message", "offset", "log_start_offset",
                                        "log_end_offset", "x"]), json_values, max_size=5)
       | st.fixed_dictionaries({"error": st.text(max_size=30), "message": json_values}))
def test_check_response_raises_only_shmbroker_errors(body: dict[str, Any]) -> None:
    try:
        assert check_response(body) is body
    except ShmbrokerError:
        assert body.get("error") is not None


# ------------------------------------------------------------------------------------------------
# record sections
# ------------------------------------------------------------------------------------------------

def _section(draw: st.DrawFn) -> bytes:
    """Random bytes, or a valid records section (of a batch of random records) damaged."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=300))
    values = draw(st.lists(st.none() | st.binary(max_size=12), min_size=1, max_size=8))
    if draw(st.booleans()):  # same-shape records: the uniform decoder's case
        size = draw(st.integers(0, 8))
        values = [bytes([index]) * size for index in range(len(values))]
    section = bytearray(rb.encode_batch(values)[rb.HEADER_SIZE:])
    for _ in range(draw(st.integers(0, 3))):
        if not section:
            break
        index = draw(st.integers(0, len(section) - 1))
        action = draw(st.sampled_from(["set", "cut", "grow"]))
        if action == "set":
            section[index] = draw(st.integers(0, 255))
        elif action == "cut":
            del section[index:]
        else:
            section[index:index] = draw(st.binary(min_size=1, max_size=4))
    return bytes(section)


sections = st.composite(_section)()


@SETTINGS
@given(sections, st.integers(0, 12), st.integers(0, 3))  # (a header never has count < 0)
# found in CI: a record whose fields end exactly at the section's end, no headers count byte
@example(section=b"\x0c\x00\x00\x00\x02\x01\x00", count=1, start=0)
def test_record_section_decoders_raise_only_corrupt_record_error(section: bytes, count: int,
                                                                 start: int) -> None:
    data = b"\xAA" * start + section
    end = len(data)
    array = np.frombuffer(data, dtype=np.uint8)
    try:
        rows = small_batch.decode_records(data, start, end, count, 100, 5000, None, (), 0)
    except CorruptRecordError:
        rows = None
    try:
        columns = columnar.decode_records(data, start, end, count)
    except CorruptRecordError:
        columns = None
    if rows is not None and columns is not None:
        assert len(rows) == len(columns.value_lengths) == count
    try:
        uniform = uniform_records.decode(array, start, end, count)
    except CorruptRecordError:
        uniform = None
    if uniform is not None:
        assert columns is not None, "the uniform decoder accepted what the general one refused"
        assert len(uniform.value_positions) == count


@settings(SETTINGS, max_examples=400)
@given(st.binary(max_size=14), st.integers(0, 14), st.integers(1, 10))
def test_varint_decoders_raise_only_corrupt_record_error(data: bytes, end: int,
                                                         max_bytes: int) -> None:
    end = min(end, len(data))
    try:
        value, after = varint.decode_varint(data, 0, end, max_bytes)
    except CorruptRecordError:
        value = None
    else:
        assert 0 < after <= min(end, max_bytes)
        assert varint.encode_varint(value) == data[:after] or data[after - 1] == 0
    array = np.frombuffer(data, dtype=np.uint8)
    positions = np.arange(0, end, dtype=np.int64)
    try:
        values, sizes = varint.read_varints(array, positions, end, max_bytes)
    except CorruptRecordError:
        return
    assert len(values) == len(sizes) == len(positions)
    if len(positions) and value is not None:
        assert int(values[0]) == value


# ------------------------------------------------------------------------------------------------
# configuration: topic configs (CREATE_TOPIC / ALTER_CONFIGS bodies, CLI KEY=VALUE, TOML)
# ------------------------------------------------------------------------------------------------

config_names = st.sampled_from([setting.name for setting in LOG_SETTINGS] + ["nope", ""])
broker_names = st.sampled_from([setting.name for setting in BROKER_SETTINGS]
                               + ["topic_defaults", "nope"])
config_values = json_scalars | st.lists(json_scalars, max_size=2) | st.sampled_from(
    ["0x10", "1_000", " 7 ", "-1", "delete", "compact", "1e3", "", "0o17"])


@SETTINGS
@given(st.dictionaries(config_names, config_values, max_size=4))
def test_topic_config_raises_only_invalid_config_error(values: dict[str, Any]) -> None:
    try:
        config = LogConfig.from_mapping(values)
    except InvalidConfigError:
        return
    for setting in LOG_SETTINGS:
        value = getattr(config, setting.name)
        if setting.choices is not None:
            assert value in setting.choices
        else:
            assert isinstance(value, int) and not isinstance(value, bool)
            assert setting.minimum is None or value >= setting.minimum


@SETTINGS
@given(st.dictionaries(broker_names, config_values
                       | st.dictionaries(config_names, config_values, max_size=2), max_size=4))
def test_broker_settings_raise_only_invalid_config_error(values: dict[str, Any]) -> None:
    try:
        config = BrokerConfig.from_mapping(values)
    except InvalidConfigError:
        return
    for setting in BROKER_SETTINGS:
        value = getattr(config, setting.name)
        assert setting.minimum is None or value >= setting.minimum
        assert setting.maximum is None or value <= setting.maximum


# ------------------------------------------------------------------------------------------------
# workload files (shmbroker-bench --workload FILE.toml)
# ------------------------------------------------------------------------------------------------

toml_keys = st.sampled_from(list(Workload.field_names()) + ["nope"])
toml_values = st.sampled_from(['1', '-1', '0', '1e4', '1.5', '"x"', 'true', '[]', '{}',
                               '"100"', '"1KiB"', '"all"', '"lz4"', '"columnar"', 'nan',
                               'inf', '9999999999999999999999', '"a/b"', '""'])


@SETTINGS
@given(st.lists(st.tuples(toml_keys, toml_values), max_size=6) | st.binary(max_size=80))
def test_workload_files_raise_only_value_error(content: list[tuple[str, str]] | bytes) -> None:
    if isinstance(content, list):
        seen: dict[str, str] = dict(content)  # TOML refuses a key twice
        data = "\n".join(f"{key} = {value}" for key, value in seen.items()).encode()
    else:
        data = content
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "fuzz.toml"
        path.write_bytes(data)
        try:
            workload = load_workload(path)
        except ValueError as error:
            assert str(path) in str(error), str(error)
            return
    workload.validate()
