import os
from pathlib import Path

import pytest

from shmbroker.errors import StorageError  # noqa: E402
from shmbroker.storage.checkpoint_file import CheckpointFile  # noqa: E402


def test_round_trip(tmp_path):
    checkpoint = CheckpointFile(tmp_path / "cp")
    checkpoint.write({"recovery_point_offset": 12345, "clean_shutdown": 1, "neg": -1})
    assert checkpoint.read() == {"recovery_point_offset": 12345, "clean_shutdown": 1, "neg": -1}
    assert (tmp_path / "cp").read_text() == (
        "0\n3\nrecovery_point_offset 12345\nclean_shutdown 1\nneg -1\n")
    assert not os.path.exists(checkpoint.tmp_path)


def test_missing_file_reads_none(tmp_path):
    assert CheckpointFile(tmp_path / "absent").read() is None


def test_rewrite_replaces(tmp_path):
    checkpoint = CheckpointFile(tmp_path / "cp")
    checkpoint.write({"a": 1})
    checkpoint.write({"b": 2})
    assert checkpoint.read() == {"b": 2}


@pytest.mark.parametrize("content", [
    "", "1\n0\n", "0\n2\na 1\n", "0\n1\na\n", "0\n1\na x\n", "0\n1\n$ 1\n",
    "0\n1\na 99999999999999999999\n", "\xff",
])
def test_malformed_is_storage_error(tmp_path, content):
    (tmp_path / "cp").write_text(content, errors="surrogateescape")
    with pytest.raises(StorageError, match="malformed"):
        CheckpointFile(tmp_path / "cp").read()


def test_bad_entry_names_and_values_refused(tmp_path):
    checkpoint = CheckpointFile(tmp_path / "cp")
    with pytest.raises(ValueError):
        checkpoint.write({"has space": 1})
    with pytest.raises(ValueError):
        checkpoint.write({"a": 2**63})
    assert checkpoint.read() is None


def test_stale_tmp_is_ignored_and_removable(tmp_path):
    checkpoint = CheckpointFile(tmp_path / "cp")
    checkpoint.write({"a": 1})
    Path(checkpoint.tmp_path).write_text("0\n1\na 2")  # a crash mid-write
    assert checkpoint.read() == {"a": 1}
    assert checkpoint.remove_stale_tmp()
    assert not checkpoint.remove_stale_tmp()


def test_write_failure_is_storage_error(tmp_path):
    checkpoint = CheckpointFile(tmp_path / "missing-dir" / "cp")
    with pytest.raises(StorageError, match="cannot write checkpoint"):
        checkpoint.write({"a": 1})
