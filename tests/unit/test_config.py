from __future__ import annotations

import pytest

from shmbroker.config import LOG_SETTINGS, LogConfig, reference_table
from shmbroker.errors import InvalidConfigError


def test_defaults_match_declarations() -> None:
    config = LogConfig()
    for setting in LOG_SETTINGS:
        assert getattr(config, setting.name) == setting.default
    assert config.segment_bytes == 1024**3 and config.index_interval_bytes == 4096


def test_from_mapping_converts_strings() -> None:
    config = LogConfig.from_mapping({"segment_bytes": "1_048_576", "retention_ms": "-1",
                                     "flush_messages": 1})
    assert (config.segment_bytes, config.retention_ms, config.flush_messages) == (1 << 20, -1, 1)


@pytest.mark.parametrize(("values", "fragment"), [
    ({"segment_byte": 1}, "unknown config 'segment_byte'"),
    ({"segment_bytes": "big"}, "takes an integer (bytes), not 'big'"),
    ({"segment_bytes": True}, "takes an integer"),
    ({"retention_ms": -2}, "retention_ms must be >= -1 ms"),
    ({"cleanup_policy": "compact"}, "cleanup_policy must be one of delete"),
])
def test_bad_values_are_refused_clearly(values: dict[str, object], fragment: str) -> None:
    with pytest.raises(InvalidConfigError, match=None) as info:
        LogConfig.from_mapping(values)
    assert fragment in str(info.value)


def test_reference_table_lists_every_setting() -> None:
    table = reference_table()
    for setting in LOG_SETTINGS:
        assert f"`{setting.name}`" in table


def test_readme_config_tables_are_generated_from_the_settings() -> None:
    from pathlib import Path

    from shmbroker.config import BROKER_SETTINGS

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert reference_table(LOG_SETTINGS) in readme
    assert reference_table(BROKER_SETTINGS) in readme
