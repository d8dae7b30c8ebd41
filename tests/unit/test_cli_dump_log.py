"""`shmbroker dump-log`: real command-line runs over real segment files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from shmbroker.format.record_batch import encode_batch


def _segment(tmp_path: Path, batches: int = 4) -> tuple[Path, list[int]]:
    data = bytearray()
    positions = []
    for index in range(batches):
        positions.append(len(data))
        data += encode_batch([b"value-%d-%d" % (index, i) for i in range(3)],
                             keys=[b"k", None, b"k2"], base_offset=3 * index,
                             timestamps=1_700_000_000_000 + index)
    path = tmp_path / "00000000000000000000.log"
    path.write_bytes(bytes(data))
    return path, positions


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shmbroker.cli", "dump-log", *args],
                          capture_output=True, text=True, timeout=60)


def test_dump_log_prints_batches_and_records(tmp_path: Path) -> None:
    path, positions = _segment(tmp_path)
    result = _run(str(path), "--print-data", "--verify")
    assert result.returncode == 0, result.stderr
    batch_lines = [line for line in result.stdout.splitlines() if line.startswith("baseOffset")]
    assert len(batch_lines) == 4
    for line, position in zip(batch_lines, positions):
        assert f"position: {position} " in line and "isvalid: true" in line
    assert "| offset: 7 CreateTime: 1700000000002 keySize: -1 valueSize: 9 " in result.stdout
    assert "payload: value-3-2" in result.stdout


def test_dump_log_verify_reports_first_bad_position(tmp_path: Path) -> None:
    path, positions = _segment(tmp_path)
    data = bytearray(path.read_bytes())
    data[positions[2] + 70] ^= 0xFF  # inside the third batch's records: CRC breaks
    path.write_bytes(bytes(data))
    result = _run("--verify", str(path))
    assert result.returncode == 1
    assert f"first corruption at position {positions[2]}" in result.stderr
    # the batch after the damaged one is still shown
    assert f"position: {positions[3]} " in result.stdout
    assert _run(str(path)).returncode == 0  # without --verify it only reports


def test_dump_log_truncated_tail_and_directory(tmp_path: Path) -> None:
    path, positions = _segment(tmp_path)
    path.write_bytes(path.read_bytes()[: positions[3] + 30])
    result = _run("--verify", str(tmp_path))
    assert result.returncode == 1
    assert f"first corruption at position {positions[3]}" in result.stderr
    assert "truncated" in result.stderr


def test_dump_log_missing_file_is_usage_error(tmp_path: Path) -> None:
    result = _run(str(tmp_path / "nope.log"))
    assert result.returncode == 2
    assert "does not exist" in result.stderr
