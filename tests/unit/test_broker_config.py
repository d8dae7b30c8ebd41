"""Broker settings (shmbroker.config.BrokerConfig): defaults, TOML files, topic defaults."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from shmbroker.config import BROKER_SETTINGS, BrokerConfig, LogConfig
from shmbroker.errors import InvalidConfigError


def write(tmp_path: Path, text: str | bytes) -> str:
    path = tmp_path / "broker.toml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return str(path)


def test_defaults_match_declarations() -> None:
    config = BrokerConfig()
    for setting in BROKER_SETTINGS:
        assert getattr(config, setting.name) == setting.default
    assert config.topic_defaults == LogConfig()
    assert {field.name for field in dataclasses.fields(BrokerConfig)} == \
        {setting.name for setting in BROKER_SETTINGS} | {"topic_defaults"}


def test_load_none_is_all_defaults() -> None:
    assert BrokerConfig.load(None) == BrokerConfig()


def test_empty_file_is_all_defaults(tmp_path: Path) -> None:
    assert BrokerConfig.load(write(tmp_path, "")) == BrokerConfig()


def test_from_mapping_converts_strings() -> None:
    config = BrokerConfig.from_mapping({"socket_mode": "0o600", "worker_stop_timeout_ms": "10_000",
                                        "worker_boot_failures_max": 3,
                                        "topic_defaults": {"segment_bytes": "1_048_576"}})
    assert config.socket_mode == 0o600
    assert config.worker_stop_timeout_ms == 10_000
    assert config.worker_boot_failures_max == 3
    assert config.topic_defaults == LogConfig(segment_bytes=1 << 20)


def test_load_a_toml_file(tmp_path: Path) -> None:
    path = write(tmp_path, """
socket_mode = 0o600
data_dir_mode = "0o700"
worker_restart_backoff_ms_max = 1_000
topic_ready_timeout_ms = 5000

[topic_defaults]
segment_bytes = 16777216
retention_ms = -1
flush_messages = "1"
cleanup_policy = "delete"
""")
    config = BrokerConfig.load(path)
    assert config == BrokerConfig(
        socket_mode=0o600, data_dir_mode=0o700, worker_restart_backoff_ms_max=1000,
        topic_ready_timeout_ms=5000,
        topic_defaults=LogConfig(segment_bytes=16 << 20, retention_ms=-1, flush_messages=1))
    assert config.worker_boot_failures_max == 5  # untouched settings keep their default


@pytest.mark.parametrize(("text", "fragments"), [
    ("socket_mod = 0o600\n", ["unknown broker setting 'socket_mod'", "socket_mode",
                              "topic_defaults"]),
    ("[topic_defaults]\nsegment_byte = 1\n", ["unknown config 'segment_byte'"]),
    ("[topics]\na = 1\n", ["unknown broker setting 'topics'"]),
    ("socket_mode = true\n", ["socket_mode takes an integer", "True"]),
    ("socket_mode = 1.5\n", ["socket_mode takes an integer", "1.5"]),
    ("socket_mode = [1]\n", ["socket_mode takes an integer"]),
    ("socket_mode = 'rw'\n", ["socket_mode takes an integer", "'rw'"]),
    ("socket_mode = 2020-01-01\n", ["socket_mode takes an integer"]),
    ("worker_boot_failures_max = 0\n", ["worker_boot_failures_max must be >= 1"]),
    ("socket_mode = -1\n", ["socket_mode must be >= 0"]),
    ("topic_defaults = 5\n", ["[topic_defaults] must be a table"]),
    ("[topic_defaults]\nsegment_bytes = 'huge'\n", ["segment_bytes takes an integer"]),
    ("[topic_defaults]\nretention_ms = -2\n", ["retention_ms must be >= -1"]),
    ("[topic_defaults]\ncleanup_policy = 'compact'\n", ["cleanup_policy must be one of delete"]),
])
def test_bad_settings_name_the_file(tmp_path: Path, text: str, fragments: list[str]) -> None:
    path = write(tmp_path, text)
    with pytest.raises(InvalidConfigError) as info:
        BrokerConfig.load(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    for fragment in fragments:
        assert fragment in message


@pytest.mark.parametrize("text", ["socket_mode = \n", "[topic_defaults\n", "a = 1\na = 2\n",
                                  "= 3\n", "x = 'unterminated\n"])
def test_bad_toml_names_the_file(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(InvalidConfigError, match="is not valid TOML") as info:
        BrokerConfig.load(path)
    assert path in str(info.value)


def test_file_that_is_not_utf8_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, b'socket_mode = "\xff"\n')  # tomllib: UnicodeDecodeError, not TOML's
    with pytest.raises(InvalidConfigError, match="is not valid TOML") as info:
        BrokerConfig.load(path)
    assert path in str(info.value)


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    path = str(tmp_path / "nowhere.toml")
    with pytest.raises(InvalidConfigError, match="cannot read config file") as info:
        BrokerConfig.load(path)
    assert path in str(info.value) and "No such file" in str(info.value)


def test_directory_instead_of_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(InvalidConfigError, match="cannot read config file") as info:
        BrokerConfig.load(str(tmp_path))
    assert str(tmp_path) in str(info.value)


def test_invalid_config_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        BrokerConfig.from_mapping({"nope": 1})


def test_constructor_checks_values_too() -> None:
    with pytest.raises(InvalidConfigError, match="worker_stop_timeout_ms must be >= 1"):
        BrokerConfig(worker_stop_timeout_ms=0)


# ------------------------------------------------------------------------------------------------
# topic_config
# ------------------------------------------------------------------------------------------------

def test_topic_config_without_overrides_is_the_defaults() -> None:
    config = BrokerConfig(topic_defaults=LogConfig(segment_bytes=1 << 20, retention_ms=-1))
    assert config.topic_config({}) == config.topic_defaults


def test_topic_config_overrides_win_and_the_rest_is_inherited() -> None:
    config = BrokerConfig(topic_defaults=LogConfig(segment_bytes=1 << 20, retention_ms=-1))
    topic = config.topic_config({"retention_ms": "60000", "flush_messages": 1})
    assert topic == LogConfig(segment_bytes=1 << 20, retention_ms=60_000, flush_messages=1)
    assert config.topic_defaults == LogConfig(segment_bytes=1 << 20, retention_ms=-1)  # unchanged


def test_topic_config_from_a_loaded_file(tmp_path: Path) -> None:
    config = BrokerConfig.load(write(tmp_path, "[topic_defaults]\nindex_interval_bytes = 0\n"))
    topic = config.topic_config({"segment_bytes": 4096})
    assert (topic.index_interval_bytes, topic.segment_bytes) == (0, 4096)
    assert topic.retention_ms == LogConfig().retention_ms


@pytest.mark.parametrize(("overrides", "fragment"), [
    ({"segment_byte": 1}, "unknown config 'segment_byte'"),
    ({"segment_bytes": 1}, "segment_bytes must be >= 14"),
    ({"segment_bytes": False}, "segment_bytes takes an integer"),
])
def test_topic_config_refuses_bad_overrides(overrides: dict[str, object], fragment: str) -> None:
    with pytest.raises(InvalidConfigError) as info:
        BrokerConfig().topic_config(overrides)
    assert fragment in str(info.value)
