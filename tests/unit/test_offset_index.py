import os
import struct

import numpy as np
import pytest

from shmbroker.storage.offset_index import OffsetIndex
from shmbroker.storage.time_index import TimeIndex


def test_offset_index_layout_and_lookup(tmp_path):
    index = OffsetIndex(str(tmp_path / "x.index"), 800)
    index.write_file(active=True)
    assert os.path.getsize(index.path) == 800  # preallocated
    for number in range(1, 51):
        index.append(number * 3, number * 100)
    assert index.lookup(0) == (0, 0)  # before the first entry: the segment start
    assert index.lookup(2) == (0, 0)
    assert index.lookup(3) == (3, 100)
    assert index.lookup(4) == (3, 100)
    assert index.lookup(150) == (150, 5000)
    assert index.lookup(10**6) == (150, 5000)
    with open(index.path, "rb") as file:
        assert not file.read().strip(b"\x00")  # entries reach the file in write_pending
    index.write_pending()
    with open(index.path, "rb") as file:
        data = file.read()
    assert data[:8] == struct.pack(">II", 3, 100)  # Kafka's big-endian entry
    assert data[49 * 8 : 50 * 8] == struct.pack(">II", 150, 5000)
    assert data[50 * 8 :] == bytes(800 - 400)
    index.seal()
    assert os.path.getsize(index.path) == 400 and not index.is_active
    keys, values, size = index.read_file()
    assert size == 400 and list(keys[:2]) == [3, 6] and list(values[:2]) == [100, 200]


def test_full_and_monotonic(tmp_path):
    index = OffsetIndex(str(tmp_path / "x.index"), 64)
    assert index.max_entries == 8
    index.write_file(active=True)
    for number in range(8):
        index.append(number, number * 10)
    assert index.free_entries == 0
    with pytest.raises(AssertionError):
        index.append(9, 90)


def test_truncate_entries_zeroes_file(tmp_path):
    index = OffsetIndex(str(tmp_path / "x.index"), 80)
    index.write_file(active=True)
    for number in range(5):
        index.append(number, number * 10)
    index.truncate_entries(2)
    assert index.entries_count == 2
    with open(index.path, "rb") as file:
        assert file.read()[16:] == bytes(64)
    index.append(7, 70)
    assert index.lookup(8) == (7, 70)


@pytest.mark.parametrize("entries, size_extra, problem", [
    ([(1, 10), (2, 20)], 0, None),
    ([(1, 10), (1, 20)], 0, "strictly increase"),
    ([(1, 10), (2, 10)], 0, "positions do not strictly increase"),
    ([(2, 10), (1, 20)], 0, "strictly increase"),
    ([(1, 10)], 3, "multiple"),
])
def test_shape_problem(tmp_path, entries, size_extra, problem):
    index = OffsetIndex(str(tmp_path / "x.index"), 1024)
    keys = np.array([key for key, _ in entries])
    values = np.array([value for _, value in entries])
    found = index.shape_problem(keys, values, len(entries) * 8 + size_extra)
    assert (found is None) if problem is None else (problem in found)


def test_time_index(tmp_path):
    index = TimeIndex(str(tmp_path / "x.timeindex"), 1200)
    assert index.max_entries == 100
    index.write_file(active=True)
    index.append(1000, 0)
    index.append(1005, 4)
    index.append(2000, 9)
    assert index.lookup(999) is None
    assert index.lookup(1000) == (1000, 0)
    assert index.lookup(1999) == (1005, 4)
    assert index.lookup(5000) == (2000, 9)
    index.seal()
    with open(index.path, "rb") as file:
        assert file.read() == b"".join(struct.pack(">qI", t, o)
                                       for t, o in [(1000, 0), (1005, 4), (2000, 9)])


def test_big_index_lookup_is_vectorised(tmp_path):
    index = OffsetIndex(str(tmp_path / "x.index"), 8 * 200_000)
    keys = np.arange(0, 400_000, 2)
    index.set_entries(keys, keys * 7)
    for wanted in (0, 1, 2, 399_999, 123_457):
        key, value = index.lookup(wanted)
        assert key == wanted - wanted % 2 and value == key * 7
