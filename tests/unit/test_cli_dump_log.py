"""`shmbroker dump-log`: real command-line runs over real segment files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from shmbroker.config import LogConfig
from shmbroker.format.record_batch import encode_batch, read_header
from shmbroker.storage.partition_log import PartitionLog


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


# -- index files ----------------------------------------------------------------------------------

def _partition(tmp_path: Path, *, close: bool = True) -> tuple[Path, list[tuple[int, int, int]]]:
    """A real partition log with an index entry every batch: its directory and each batch's
    (position, base offset, largest timestamp)."""
    directory = tmp_path / "p"
    log = PartitionLog(directory, LogConfig(index_interval_bytes=1, retention_ms=-1))
    for index in range(6):
        log.append(encode_batch([b"v%d" % index * 20, b"w"],
                                timestamps=[1_700_000_000_000 + 10 * index, 1_700_000_000_003]))
    if close:
        log.close()
    else:
        log.active_segment.flush_indexes()
        log.abandon()  # a crash: the indexes keep their preallocated zero tail
    data = (directory / "00000000000000000000.log").read_bytes()
    batches = []
    position = 0
    while position < len(data):
        header = read_header(data, position)
        batches.append((position, header.base_offset, header.max_timestamp))
        position += header.size
    return directory, batches


def test_dump_log_prints_and_checks_index_files(tmp_path: Path) -> None:
    for close in (True, False):
        directory, batches = _partition(tmp_path / str(close), close=close)
        index = directory / "00000000000000000000.index"
        time_index = directory / "00000000000000000000.timeindex"
        result = _run("--verify", str(index), str(time_index))
        assert result.returncode == 0, result.stdout + result.stderr
        lines = result.stdout.splitlines()
        offsets = lines[1 : lines.index(f"Dumping {time_index}")]
        # an entry for each batch after the first (none at position 0), as the log has them
        assert offsets == [f"offset: {base} position: {position}"
                           for position, base, _ in batches[1:]]
        times = lines[lines.index(f"Dumping {time_index}") + 1 :]
        assert times and all(line.startswith("timestamp: ") for line in times)
        for line in times:
            _, timestamp, _, offset = line.split()
            assert (int(offset), int(timestamp)) in [(base, largest)
                                                     for _, base, largest in batches]
        assert "index entries: all valid" in result.stderr


def test_dump_log_verify_finds_a_wrong_index_entry(tmp_path: Path) -> None:
    directory, batches = _partition(tmp_path)
    index = directory / "00000000000000000000.index"
    data = bytearray(index.read_bytes())
    data[8 + 7] ^= 0x01  # the second entry's position, off by one
    index.write_bytes(bytes(data))
    result = _run("--verify", str(index))
    assert result.returncode == 1
    assert "first corruption at position 8: no batch of the log starts at position" in (
        result.stderr)

    time_index = directory / "00000000000000000000.timeindex"
    data = bytearray(time_index.read_bytes())
    data[7] ^= 0x01  # the first entry's timestamp
    time_index.write_bytes(bytes(data) + b"\x00\x01")  # and a torn entry at the end
    result = _run("--verify", str(time_index))
    assert result.returncode == 1
    assert "first corruption at position 0: the batch at offset" in result.stderr
    assert f"CORRUPT position: {len(data)} 2 bytes after the last whole 12-byte entry" in (
        result.stdout)


def test_dump_log_skips_other_files(tmp_path: Path) -> None:
    directory, _ = _partition(tmp_path)
    others = sorted(path for path in directory.iterdir()
                    if path.suffix not in (".log", ".index", ".timeindex"))
    assert others  # the recovery-point checkpoint
    result = _run("--verify", *map(str, sorted(directory.iterdir())))
    assert result.returncode == 0, result.stdout + result.stderr
    for path in others:
        assert f"Ignoring unknown file {path} " in result.stdout
    assert "Checked 3 file(s), 6 batch(es)" in result.stderr
    (tmp_path / "empty").mkdir()
    result = _run(str(tmp_path / "empty"))
    assert result.returncode == 0
    assert f"{tmp_path / 'empty'}: no segment files (*.log) in this directory" in result.stderr


# -- what --verify finds in a segment, and how it says it ----------------------------------------

def _damage(kind: str, path: Path, positions: list[int]) -> tuple[int, str]:
    """Damage the segment at ``path`` in one way; (the position, the words) --verify reports."""
    import struct

    from storage_helpers import chain_lie

    data = bytearray(path.read_bytes())
    position = positions[2]
    if kind == "magic":
        data[position + 16] = 1
        words = "unsupported magic 1"
    elif kind == "header cut":
        position = positions[3]
        del data[position + 20 :]
        words = "truncated batch header: 20 bytes at the end of the file"
    elif kind == "offset gap":  # base offsets lie outside the CRC: only the sequence shows it
        struct.pack_into(">q", data, position, 100)
        words = "batch base offset 100 where 6 was expected"
    else:  # "record chain": a batch whose CRC is right but whose records are not what it says
        lie = bytearray(chain_lie())
        struct.pack_into(">q", lie, 0, 12)
        position = len(data)
        data += lie
        words = "records:"
    path.write_bytes(bytes(data))
    return position, words


def test_dump_log_verify_names_each_kind_of_damage(tmp_path: Path) -> None:
    for kind in ("magic", "header cut", "offset gap", "record chain"):
        directory = tmp_path / kind.replace(" ", "-")
        directory.mkdir()
        path, positions = _segment(directory)
        position, words = _damage(kind, path, positions)
        for print_data in ((), ("--print-data",)):  # records decoded, or their chain walked
            result = _run("--verify", *print_data, str(path))
            assert result.returncode == 1, (kind, result.stdout, result.stderr)
            corrupt = [line for line in result.stdout.splitlines()
                       if line.startswith("CORRUPT")]
            assert corrupt and corrupt[0].startswith(f"CORRUPT position: {position} "), (
                kind, corrupt)
            assert words in corrupt[0], (kind, corrupt)
            assert f"first corruption at position {position}" in result.stderr, kind


def test_dump_log_verify_finds_offsets_missing_before_the_next_segment(tmp_path: Path) -> None:
    path, _ = _segment(tmp_path)  # offsets 0..11
    (tmp_path / "00000000000000000020.log").write_bytes(
        encode_batch([b"later"], base_offset=20, timestamps=1))
    result = _run("--verify", str(path))
    assert result.returncode == 1
    assert "the batches end at offset 12 but the next segment starts at 20: offsets [12, 20) " \
           "are missing" in result.stdout


def test_dump_log_of_an_empty_segment_and_binary_payloads(tmp_path: Path) -> None:
    empty = tmp_path / "00000000000000000000.log"
    empty.write_bytes(b"")
    result = _run("--verify", str(empty))
    assert result.returncode == 0 and "baseOffset" not in result.stdout
    binary = tmp_path / "00000000000000000005.log"
    binary.write_bytes(encode_batch([b"\xff\x00\xfe", None], keys=[b"\x80k", b"k"],
                                    base_offset=5, timestamps=1))
    result = _run("--print-data", "--verify", str(binary))
    assert result.returncode == 0, result.stderr
    assert "key: 806b payload: ff00fe" in result.stdout  # not UTF-8: shown as hex
    assert "keySize: 1 valueSize: -1 " in result.stdout and "payload: null" in result.stdout
