#!/usr/bin/env python3
"""Storage and codec benchmarks for issue 2, with the machine's own limits measured alongside.

Prints medians of ``--runs`` runs; the systems under test and their baselines alternate
(A B A B ...) so that a noisy machine hurts both alike.  Run from the repository root:

    python bench/storage.py                    # defaults: 512 MiB per run, 5 runs
    python bench/storage.py --size-mib 256 --runs 3 --dir /path/on/the/disk/to/test

Figures:
  append   pre-encoded 64 KiB batches into a PartitionLog, 1 and 16 batches per call, with the
           default record_validation ("records") and with "crc", vs a raw sequential os.write
           of the same bytes in the same write sizes (64 KiB, 1 MiB) to the same directory (no
           fsync: page cache), extending a new file and into space reserved beforehand.
           The log checks a large append's batches on a helper thread while it writes them
           (APPEND_OVERLAP in partition_log.py): ``--check-thread`` as the broker setting
           worker_check_thread (auto: on with 4 CPUs or more), ``--check-thread-min-kib`` the
           smallest append it takes (limits.append_overlap_bytes_min; 64 puts single 64 KiB
           batches on it).
  read     1 MiB ranges located through the index and sent with os.sendfile to a Unix socket
           drained by another process, vs raw sendfile of the same file.
  codec    100-byte records: list API (encode_batch / decode_batch) and columnar API
           (encode_batch_columnar / decode_columnar) on equal-sized records.  "list decode"
           makes every Record and lets it go (a C-level loop reads them, as a consumer's loop
           would read each once); "list decode, kept" holds them all in a list.
  recovery reopening the log after an unclean shutdown with no recovery checkpoint: every
           batch header walked and CRC-checked (page cache warm, so CRC and Python are measured).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import socket
import statistics
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import numpy as np

from shmbroker import limits
from shmbroker.config import LogConfig
from shmbroker.format.record_batch import (
    decode_batch,
    decode_columnar,
    encode_batch,
    encode_batch_columnar,
)
from shmbroker.storage import overlap
from shmbroker.storage.partition_log import PartitionLog
from shmbroker.storage.reserve import reserve

KIB = 1024
MIB = 1024 * KIB
RECORD_BYTES = 100


def median(values: list[float]) -> float:
    return statistics.median(values)


def records_for(batch_bytes: int) -> int:
    # 100-byte value + 8 bytes of record framing with a 2-byte offset delta: ~108 per record
    return max(1, (batch_bytes - 61) // 108)


def make_batch(batch_bytes: int) -> bytearray:
    count = records_for(batch_bytes)
    values = np.random.default_rng(7).integers(0, 256, count * RECORD_BYTES, dtype=np.uint8)
    return encode_batch_columnar(values, np.full(count, RECORD_BYTES), timestamps=1_700_000_000_000)


# -- append ---------------------------------------------------------------------------------------

def raw_write(directory: Path, chunk: bytes | bytearray, total_bytes: int,
              reserved: bool = False) -> float:
    """os.write of ``chunk`` until ``total_bytes``: extending a new file (the issue's baseline),
    or with ``reserved`` into space reserved for all of it beforehand, untimed (what the log
    does as it goes, segment_preallocate_bytes at a time: the kernel's cheaper path)."""
    path = directory / "raw.bin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    if reserved:
        reserve(fd, 0, total_bytes + len(chunk))
    view = memoryview(chunk)
    started = time.perf_counter()
    written = 0
    while written < total_bytes:
        written += os.write(fd, view)
    elapsed = time.perf_counter() - started
    os.close(fd)
    path.unlink()
    return written / elapsed


def log_append(directory: Path, chunk: bytearray, total_bytes: int,
               record_validation: str = "records") -> float:
    log_dir = directory / "log-append"
    log = PartitionLog(log_dir, LogConfig(segment_bytes=1 << 30, retention_ms=-1,
                                          record_validation=record_validation))
    started = time.perf_counter()
    written = 0
    while written < total_bytes:
        log.append(chunk)  # base offsets rewritten in place: the buffer is writable
        written += len(chunk)
    elapsed = time.perf_counter() - started
    log.close()
    shutil.rmtree(log_dir)
    return written / elapsed


# -- read -----------------------------------------------------------------------------------------

def _drain_process() -> tuple[socket.socket, int]:
    """A child process that reads a Unix socket to EOF; returns (our end, child pid)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:  # child
        ours.close()
        buffer = bytearray(4 * MIB)
        while theirs.recv_into(buffer):
            pass
        os._exit(0)
    theirs.close()
    return ours, pid


def _sendfile_all(sock: socket.socket, fd: int, position: int, size: int) -> None:
    while size:
        sent = os.sendfile(sock.fileno(), fd, position, size)
        position += sent
        size -= sent


def raw_sendfile(path: Path, range_bytes: int) -> float:
    sock, pid = _drain_process()
    fd = os.open(path, os.O_RDONLY)
    size = os.fstat(fd).st_size
    started = time.perf_counter()
    for position in range(0, size, range_bytes):
        _sendfile_all(sock, fd, position, min(range_bytes, size - position))
    sock.shutdown(socket.SHUT_WR)
    os.waitpid(pid, 0)
    elapsed = time.perf_counter() - started
    sock.close()
    os.close(fd)
    return size / elapsed


def log_sendfile(log: PartitionLog, range_bytes: int) -> float:
    sock, pid = _drain_process()
    offset = log.log_start_offset
    sent = 0
    started = time.perf_counter()
    while offset < log.log_end_offset:
        piece = log.read(offset, range_bytes)
        _sendfile_all(sock, piece.fd, piece.position, piece.size_bytes)
        sent += piece.size_bytes
        offset = piece.next_offset
    sock.shutdown(socket.SHUT_WR)
    os.waitpid(pid, 0)
    elapsed = time.perf_counter() - started
    sock.close()
    return sent / elapsed


# -- codec ----------------------------------------------------------------------------------------

def codec_rates(batch_bytes: int, runs: int) -> dict[str, float]:
    count = records_for(batch_bytes)
    rng = np.random.default_rng(11)
    value_buffer = rng.integers(0, 256, count * RECORD_BYTES, dtype=np.uint8).tobytes()
    values = [value_buffer[i * RECORD_BYTES : (i + 1) * RECORD_BYTES] for i in range(count)]
    lengths = np.full(count, RECORD_BYTES, dtype=np.int64)
    timestamps = 1_700_000_000_000 + np.arange(count, dtype=np.int64) // 50  # ~20 per ms
    timestamp_list = timestamps.tolist()
    encoded = encode_batch(values, timestamps=timestamp_list)
    columnar = encode_batch_columnar(value_buffer, lengths, timestamps=timestamps)
    assert bytes(columnar) == bytes(encoded)
    cases: dict[str, Callable[[], object]] = {
        "list encode": lambda: encode_batch(values, timestamps=timestamp_list),
        "list decode": lambda: deque(decode_batch(encoded), 0),
        "list decode, kept": lambda: list(decode_batch(encoded)),
        "columnar encode": lambda: encode_batch_columnar(value_buffer, lengths,
                                                         timestamps=timestamps),
        "columnar decode": lambda: decode_columnar(encoded),
    }
    repeat = max(1, 2_000_000 // count)
    results: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(runs):
        for name, case in cases.items():
            started = time.perf_counter()
            for _ in range(repeat):
                case()
            results[name].append(repeat * count / (time.perf_counter() - started))
    return {name: median(rates) for name, rates in results.items()}


# -- recovery -------------------------------------------------------------------------------------

def recovery_rate(log_dir: Path) -> tuple[float, int]:
    for name in os.listdir(log_dir):
        if "checkpoint" in name:
            os.unlink(log_dir / name)
    started = time.perf_counter()
    log = PartitionLog(log_dir, LogConfig(segment_bytes=1 << 30, retention_ms=-1))
    elapsed = time.perf_counter() - started
    scanned = sum(os.path.getsize(log_dir / n) for n in os.listdir(log_dir) if n.endswith(".log"))
    log.abandon()
    return scanned / elapsed, scanned


def append_rates(base: Path, batch_64k: bytearray, region_1m: bytearray, total: int,
                 runs: int) -> None:
    """Each log row against raw os.write of the same bytes in the same write sizes: a call of
    16 batches is one 1 MiB os.write in the log, and on some file systems (ext4 here) the cost
    of a write is far from proportional to its size (1 MiB writes ran 1.5-1.8x the speed of 64 KiB
    ones), so comparing it with 64 KiB writes would credit the log with the kernel's gain."""
    raw, raw_1m, reserved, reserved_1m = [], [], [], []
    one, sixteen, one_crc, sixteen_crc = [], [], [], []
    for _ in range(runs):
        raw.append(raw_write(base, batch_64k, total))
        reserved.append(raw_write(base, batch_64k, total, reserved=True))
        one.append(log_append(base, batch_64k, total))
        raw_1m.append(raw_write(base, region_1m, total))
        reserved_1m.append(raw_write(base, region_1m, total, reserved=True))
        sixteen.append(log_append(base, region_1m, total))
        one_crc.append(log_append(base, batch_64k, total, "crc"))
        sixteen_crc.append(log_append(base, region_1m, total, "crc"))
    print("append (GB/s)                     median   ratio to raw os.write of the same size:\n"
          "                                           extending the file, into reserved space")
    for label, rates in (("raw os.write 64 KiB", raw), ("raw os.write 64 KiB, reserved", reserved),
                         ("raw os.write 1 MiB", raw_1m), ("raw os.write 1 MiB, reserved",
                                                          reserved_1m)):
        print(f"  {label:<32} {median(rates) / 1e9:6.2f}")
    for label, rates, baseline, best in (
            ("log, 1 batch/call", one, raw, reserved),
            ("log, 16 batches/call", sixteen, raw_1m, reserved_1m),
            ("log, 1 batch/call, crc only", one_crc, raw, reserved),
            ("log, 16 batches/call, crc only", sixteen_crc, raw_1m, reserved_1m)):
        print(f"  {label:<32} {median(rates) / 1e9:6.2f}   "
              f"{median(rates) / median(baseline):.2f}   {median(rates) / median(best):.2f}")
    print("  (record_validation: 'records', the default, walks each batch's record chain;\n"
          "   'crc only' checks header, size and CRC-32C; 16 batches a call are one 1 MiB\n"
          "   write, compared with 1 MiB raw writes; the log reserves its segment's space\n"
          "   ahead, segment_preallocate_bytes at a time, as the 'reserved' raw rows do)\n")


def read_rates(base: Path, region_1m: bytearray, total: int, runs: int) -> None:
    log_dir = base / "log-read"
    log = PartitionLog(log_dir, LogConfig(segment_bytes=1 << 30, retention_ms=-1))
    written = 0
    while written < total:
        log.append(region_1m)
        written += len(region_1m)
    log.flush()
    segment_path = log_dir / f"{0:020d}.log"
    raw_reads, log_reads = [], []
    for _ in range(runs):
        raw_reads.append(raw_sendfile(segment_path, MIB))
        log_reads.append(log_sendfile(log, MIB))
    print("read, 1 MiB sendfile to a Unix socket drained by another process (GB/s)")
    print(f"  raw sendfile         {median(raw_reads) / 1e9:6.2f}")
    print(f"  log.read + sendfile  {median(log_reads) / 1e9:6.2f}   "
          f"{median(log_reads) / median(raw_reads):.2f}\n")
    log.abandon()  # unclean: the recovery benchmark scans it all

    rates = [recovery_rate(log_dir) for _ in range(runs)]
    print(f"recovery scan (no checkpoint, page cache warm): "
          f"{median([r for r, _ in rates]) / 1e9:.2f} GB/s over {rates[0][1] / MIB:.0f} MiB\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mib", type=int, default=512, help="bytes written per run")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=None,
                        help="directory on the filesystem to test (default: a temp dir here)")
    parser.add_argument("--parts", default="append,read,codec",
                        help="comma-separated: append, read (and the recovery scan of the log "
                             "it wrote), codec")
    parser.add_argument("--check-thread", choices=overlap.MODES, default="auto",
                        help="the append check's helper thread, as the broker setting "
                             "worker_check_thread (default auto: on with 4 CPUs or more)")
    parser.add_argument("--check-thread-min-kib", type=int,
                        default=limits.append_overlap_bytes_min // KIB,
                        help="smallest append checked on the helper thread, KiB (default "
                             "limits.append_overlap_bytes_min)")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    if not parts <= {"append", "read", "codec"}:
        parser.error(f"unknown part in --parts {args.parts!r}")
    if args.check_thread_min_kib < 1:
        parser.error("--check-thread-min-kib must be at least 1")
    check_thread = overlap.configure(args.check_thread)
    limits.append_overlap_bytes_min = args.check_thread_min_kib * KIB
    total = args.size_mib * MIB
    base = Path(tempfile.mkdtemp(prefix="shmbroker-bench-", dir=args.dir or Path.cwd()))
    print(f"machine: {platform.machine()} {os.cpu_count()} cpus, {platform.platform()}, "
          f"Python {platform.python_version()}, numpy {np.__version__}")
    print(f"directory: {base}  ({args.size_mib} MiB per run, {args.runs} runs, medians)")
    print(f"check thread: {'on' if check_thread else 'off'} ({args.check_thread}), for appends "
          f"of {args.check_thread_min_kib} KiB or more\n")
    try:
        batch_64k = make_batch(64 * KIB)
        region_1m = bytearray(b"".join([bytes(batch_64k)] * 16))
        if "append" in parts:
            append_rates(base, batch_64k, region_1m, total, args.runs)
        if "read" in parts:
            read_rates(base, region_1m, total, args.runs)
        if "codec" in parts:
            for batch_bytes in (64 * KIB, 1 * MIB):
                rates_by_case = codec_rates(batch_bytes, args.runs)
                print(f"codec, 100-byte records, {batch_bytes // KIB} KiB batches "
                      f"({records_for(batch_bytes)} records), M records/s")
                for name, rate in rates_by_case.items():
                    print(f"  {name:18s} {rate / 1e6:7.2f}")
                print()
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
