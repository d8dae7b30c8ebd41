"""The ``shmbroker`` command line against a real broker: topics, produce, consume, status.

Most tests run the commands in-process through click's CliRunner (fast); a few run real
``python -m shmbroker.cli`` processes for what only a process shows: stdin/stdout pipes between
produce and consume, Ctrl-C and SIGTERM, a reader that closes the pipe (``| head``).
"""

from __future__ import annotations

import select
import signal
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from broker_helpers import RunningBroker, wait_for
from click.testing import CliRunner
from integration.cli_helpers import cli, failed, ok

from shmbroker import Producer, __version__
from shmbroker.cli import main

pytestmark = pytest.mark.integration

SUBPROCESS_TIMEOUT_S = 60
TOPIC_NAME_RULE = "1 to 249 characters from [a-zA-Z0-9._-]"



def run_process(data_dir: Path, *args: str,
                input: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "shmbroker.cli", *args, "--data-dir",
                           str(data_dir)], input=input, capture_output=True,
                          timeout=SUBPROCESS_TIMEOUT_S, check=False)


def start_process(data_dir: Path, *args: str, stdin: int = subprocess.DEVNULL,
                  stdout: int | None = subprocess.PIPE) -> subprocess.Popen[bytes]:
    """A CLI process that Ctrl-C (SIGINT) can stop even when this test runs with SIGINT ignored
    (as a background job of a script does): an ignored signal stays ignored across exec."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return subprocess.Popen([sys.executable, "-m", "shmbroker.cli", *args, "--data-dir",
                                 str(data_dir)], stdin=stdin, stdout=stdout,
                                stderr=subprocess.PIPE)
    finally:
        signal.signal(signal.SIGINT, previous)


def read_line(process: subprocess.Popen[bytes], timeout_s: float = 10.0) -> bytes:
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], timeout_s)
    assert ready, f"no output within {timeout_s} s"
    return process.stdout.readline()


# -- topics ------------------------------------------------------------------------------------
def test_topics_create_list_describe_alter_add_partitions_delete(broker: RunningBroker) -> None:
    data_dir = broker.data_dir
    assert ok(cli(data_dir, "topics", "create", "metrics", "--partitions", "2",
                  "--config", "retention_ms=3600000", "--config", "segment_bytes=1_048_576")
              ).stdout == "Created topic metrics with 2 partition(s).\n"
    assert ok(cli(data_dir, "topics", "create", "audit")).stdout == (
        "Created topic audit with 1 partition(s).\n")
    assert ok(cli(data_dir, "topics", "list")).stdout == "audit\nmetrics\n"
    assert "already exists" in failed(cli(data_dir, "topics", "create", "audit"))

    ok(cli(data_dir, "produce", "metrics", "--partition", "1", input=b"a\nb\nc\n"))
    lines = ok(cli(data_dir, "topics", "describe", "metrics")).stdout.splitlines()
    assert lines[0] == ("Topic: metrics\tTopicId: 1\tPartitionCount: 2\t"
                        "Configs: retention_ms=3600000,segment_bytes=1048576")
    assert lines[1].split() == ["PARTITION", "LOG_START", "LOG_END", "HIGH_WATERMARK", "SIZE",
                                "WORKER_PID", "STATE"]
    pids = broker.worker_pids()
    partition_0, partition_1 = (line.split() for line in lines[2:])
    assert partition_0 == ["0", "0", "0", "0", "0", "B", str(pids[("metrics", 0)]), "running"]
    assert partition_1[:4] == ["1", "0", "3", "3"]
    assert int(partition_1[4]) > 0 and partition_1[5] == "B"
    assert partition_1[6:] == [str(pids[("metrics", 1)]), "running"]
    described = orjson.loads(ok(cli(data_dir, "topics", "describe", "metrics", "--json")).stdout)
    assert described["partitions"][1]["log_end_offset"] == 3

    assert ok(cli(data_dir, "topics", "alter", "metrics", "--config", "segment_ms=60000",
                  "--delete-config", "retention_ms")).stdout == (
        "Altered topic metrics; config overrides now: segment_bytes=1048576,segment_ms=60000\n")
    assert ok(cli(data_dir, "topics", "alter", "metrics", "--delete-config", "segment_bytes",
                  "--delete-config", "segment_ms")).stdout.endswith("overrides now: (none)\n")
    described_lines = ok(cli(data_dir, "topics", "describe", "metrics")).stdout.splitlines()
    assert described_lines[0].endswith("\tConfigs: ")

    assert ok(cli(data_dir, "topics", "add-partitions", "metrics", "--partitions", "3")
              ).stdout == "Topic metrics now has 3 partition(s).\n"
    lines = ok(cli(data_dir, "topics", "describe", "metrics")).stdout.splitlines()
    assert "PartitionCount: 3" in lines[0]
    assert lines[4].split()[0] == "2" and lines[4].split()[-1] == "running"

    assert ok(cli(data_dir, "topics", "delete", "audit")).stdout == "Deleted topic audit.\n"
    assert ok(cli(data_dir, "topics", "list")).stdout == "metrics\n"
    assert not (data_dir / "topics" / "audit").exists()


# -- produce and consume -----------------------------------------------------------------------
def test_produce_then_consume_through_real_pipes(broker: RunningBroker) -> None:
    data_dir = broker.data_dir
    ok(cli(data_dir, "topics", "create", "events"))
    lines = [b"user-1\tlogin", b"user-2\t\xff\xfe not utf-8 \x00", b"\tempty key",
             b"user-1\tvalue\twith a second tab", b"user-3\t"]
    produced = run_process(data_dir, "produce", "events", "--key-separator", "\t",
                           "--acks", "all", input=b"\n".join(lines) + b"\n")
    assert (produced.returncode, produced.stderr) == (0, b"")

    consumed = run_process(data_dir, "consume", "events", "--from-beginning",
                           "--max-messages", "5", "--print-key", "--print-offset")
    assert consumed.returncode == 0, consumed.stderr
    assert consumed.stdout == b"".join(b"0:%d\t%s\n" % (offset, line)
                                       for offset, line in enumerate(lines))
    assert consumed.stderr == b"Processed a total of 5 message(s).\n"

    values_only = run_process(data_dir, "consume", "events", "--from-beginning",
                              "--max-messages", "2")
    assert values_only.stdout == b"login\n\xff\xfe not utf-8 \x00\n"


def test_consume_output_formats_offsets_and_timeouts(broker: RunningBroker) -> None:
    data_dir = broker.data_dir
    ok(cli(data_dir, "topics", "create", "logs", "--partitions", "2"))
    ok(cli(data_dir, "produce", "logs", "--partition", "0", input=b"zero\none\ntwo\nthree"))
    ok(cli(data_dir, "produce", "logs", "--partition", "1", "--key-separator", "=",
           "--linger-ms", "0", input=b"k=v=w\n=\n"))
    with Producer(data_dir) as producer:
        producer.send("logs", None, b"tombstone", partition=1).result(10)

    def consume(*args: str) -> bytes:
        return ok(cli(data_dir, "consume", "logs", *args)).stdout_bytes

    assert consume("--partition", "0", "--from-beginning", "--max-messages", "4") == (
        b"zero\none\ntwo\nthree\n")
    assert consume("--partition", "1", "--from-beginning", "--max-messages", "3",
                   "--print-key", "--key-separator", " => ") == (
        b"k => v=w\n => \ntombstone => null\n")
    assert consume("--partition", "0", "--from-beginning", "--max-messages", "4",
                   "--print-key", "--print-offset") == (
        b"0:0\tnull\tzero\n0:1\tnull\tone\n0:2\tnull\ttwo\n0:3\tnull\tthree\n")
    assert consume("--partition", "0", "--offset", "2", "--print-offset",
                   "--timeout-ms", "300") == b"0:2\ttwo\n0:3\tthree\n"
    assert consume("--partition", "0", "--offset", "4", "--timeout-ms", "100") == b""

    every = consume("--from-beginning", "--max-messages", "7", "--print-offset")
    assert sorted(every.splitlines()) == [b"0:0\tzero", b"0:1\tone", b"0:2\ttwo", b"0:3\tthree",
                                          b"1:0\tv=w", b"1:1\t", b"1:2\tnull"]
    # Without --from-beginning a consumer starts at the end: the old records are not shown.
    latest = ok(cli(data_dir, "consume", "logs", "--timeout-ms", "300"))
    assert latest.stdout_bytes == b""
    assert latest.stderr == "Processed a total of 0 message(s).\n"


def test_produce_stops_at_a_line_without_the_key_separator(broker: RunningBroker) -> None:
    data_dir = broker.data_dir
    ok(cli(data_dir, "topics", "create", "keyed"))
    error = failed(cli(data_dir, "produce", "keyed", "--key-separator", ":",
                       input=b"a:1\nb:2\nno separator\nc:3\n"))
    assert "line 3 has no key separator ':'" in error
    assert ok(cli(data_dir, "consume", "keyed", "--from-beginning", "--print-key",
                  "--timeout-ms", "300")).stdout == "a\t1\nb\t2\n"


def test_consume_stops_cleanly_on_ctrl_c_and_sigterm(broker: RunningBroker) -> None:
    data_dir = broker.data_dir
    ok(cli(data_dir, "topics", "create", "live"))
    ok(cli(data_dir, "produce", "live", input=b"first\n"))
    for sig in (signal.SIGINT, signal.SIGTERM):
        process = start_process(data_dir, "consume", "live", "--from-beginning")
        try:
            assert read_line(process) == b"first\n"
            process.send_signal(sig)
            _, stderr = process.communicate(timeout=SUBPROCESS_TIMEOUT_S)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        assert process.returncode == 0, (sig, stderr)
        assert stderr == b"Processed a total of 1 message(s).\n"


def test_produce_ends_cleanly_on_ctrl_c_and_sigterm(broker: RunningBroker) -> None:
    data_dir = broker.data_dir
    ok(cli(data_dir, "topics", "create", "typed"))

    def log_end_offset() -> int:
        with broker.admin() as admin:
            return int(admin.describe_topic("typed")["partitions"][0]["log_end_offset"])

    for sig, total in ((signal.SIGINT, 2), (signal.SIGTERM, 4)):
        process = start_process(data_dir, "produce", "typed", stdin=subprocess.PIPE,
                                stdout=None)
        try:
            assert process.stdin is not None
            process.stdin.write(b"typed at\na terminal\n")  # stdin stays open, as a terminal
            process.stdin.flush()
            wait_for(lambda: log_end_offset() == total, message=f"{total} records")  # noqa: B023
            process.send_signal(sig)
            _, stderr = process.communicate(timeout=SUBPROCESS_TIMEOUT_S)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        assert (process.returncode, stderr) == (130, b""), sig


def test_consume_into_a_pipe_closed_early_exits_quietly(broker: RunningBroker) -> None:
    data_dir = broker.data_dir
    ok(cli(data_dir, "topics", "create", "piped"))
    ok(cli(data_dir, "produce", "piped", input=b"first\n"))
    process = start_process(data_dir, "consume", "piped", "--from-beginning")  # as `| head -1`
    try:
        assert read_line(process) == b"first\n"
        assert process.stdout is not None
        process.stdout.close()
        ok(cli(data_dir, "produce", "piped", input=b"second\n"))  # its write meets EPIPE
        _, stderr = process.communicate(timeout=SUBPROCESS_TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert (process.returncode, stderr) == (0, b"")


# -- status ------------------------------------------------------------------------------------
def test_status_shows_the_broker_and_every_worker(broker: RunningBroker) -> None:
    data_dir = broker.data_dir
    ok(cli(data_dir, "topics", "create", "orders", "--partitions", "2"))
    pids = broker.worker_pids()
    lines = ok(cli(data_dir, "status")).stdout.splitlines()
    fields = dict(line.split(":", 1) for line in lines[:7])
    assert {key: value.strip() for key, value in fields.items()} == {
        "Broker pid": str(broker.pid), "Data dir": str(data_dir),
        "Uptime": fields["Uptime"].strip(), "Version": __version__,
        "Topics": "1", "Partitions": "2", "Workers alive": "2/2"}
    assert fields["Uptime"].strip().endswith("s")
    assert lines[7] == ""
    assert lines[8].split() == ["TOPIC/PARTITION", "PID", "STATE", "RESTARTS"]
    assert [line.split() for line in lines[9:]] == [
        ["orders/0", str(pids[("orders", 0)]), "running", "0"],
        ["orders/1", str(pids[("orders", 1)]), "running", "0"]]

    raw = orjson.loads(ok(cli(data_dir, "status", "--json")).stdout)
    assert raw["pid"] == broker.pid and raw["workers_alive"] == 2
    assert {(w["topic"], w["partition"]) for w in raw["workers"]} == {("orders", 0),
                                                                      ("orders", 1)}


# -- errors --------------------------------------------------------------------------------------
@pytest.mark.parametrize("args", [
    ("status",), ("topics", "list"), ("topics", "create", "t"), ("topics", "describe", "t"),
    ("topics", "delete", "t"), ("produce", "t"), ("consume", "t", "--timeout-ms", "100"),
])
def test_every_command_without_a_broker_says_how_to_start_one(tmp_path: Path,
                                                              args: tuple[str, ...]) -> None:
    error = failed(cli(tmp_path / "data", *args, input=b"x\n"))
    assert f"no broker at {tmp_path / 'data' / 'broker.sock'}" in error
    assert "shmbroker serve" in error


def test_data_dir_defaults_to_the_environment_variable(tmp_path: Path) -> None:
    result = CliRunner(env={"SHMBROKER_DATA_DIR": str(tmp_path / "elsewhere")}).invoke(
        main, ["topics", "list"])
    assert f"no broker at {tmp_path / 'elsewhere' / 'broker.sock'}" in failed(result)


@pytest.mark.parametrize("args", [
    ("topics", "create", "t", "--partitions", "abc"),
    ("topics", "create", "t", "--config", "retention_ms"),
    ("topics", "create"),
    ("topics", "alter", "t"),
    ("topics", "add-partitions", "t"),
    ("produce", "t", "--acks", "2"),
    ("consume", "t", "--offset", "3"),
    ("consume", "t", "--partition", "0", "--offset", "3", "--from-beginning"),
    ("consume", "t", "--max-messages", "0"),
    ("consume",),
])
def test_usage_errors_exit_2(tmp_path: Path, args: tuple[str, ...]) -> None:
    assert "Usage:" in failed(cli(tmp_path / "data", *args), code=2)


def test_expected_errors_exit_1_with_one_line(broker: RunningBroker) -> None:
    data_dir = broker.data_dir
    ok(cli(data_dir, "topics", "create", "known", "--partitions", "2"))
    ok(cli(data_dir, "produce", "known", "--partition", "0", input=b"a\nb\n"))

    for args in [("topics", "describe", "nope"), ("topics", "delete", "nope"),
                 ("topics", "alter", "nope", "--config", "retention_ms=1"),
                 ("topics", "add-partitions", "nope", "--partitions", "2"),
                 ("produce", "nope"), ("consume", "nope", "--timeout-ms", "100")]:
        assert "unknown topic 'nope'" in failed(cli(data_dir, *args, input=b"x\n")), args

    for args in [("topics", "create", "a/b"), ("topics", "describe", "a/b"),
                 ("produce", "a/b"), ("consume", "a/b", "--timeout-ms", "100")]:
        error = failed(cli(data_dir, *args, input=b"x\n"))
        assert "invalid topic name 'a/b'" in error and TOPIC_NAME_RULE in error, args

    assert "unknown config 'colour'" in failed(
        cli(data_dir, "topics", "create", "t", "--config", "colour=blue"))
    assert "retention_ms takes an integer (ms), not 'soon'" in failed(
        cli(data_dir, "topics", "alter", "known", "--config", "retention_ms=soon"))
    assert "segment_bytes must be >= 14" in failed(
        cli(data_dir, "topics", "alter", "known", "--config", "segment_bytes=1"))
    assert "partition count" in failed(cli(data_dir, "topics", "create", "t", "--partitions", "0"))
    assert "can only grow" in failed(
        cli(data_dir, "topics", "add-partitions", "known", "--partitions", "1"))
    assert "partition 5 does not exist" in failed(
        cli(data_dir, "produce", "known", "--partition", "5", input=b"x\n"))
    assert "partition 5 does not exist" in failed(
        cli(data_dir, "consume", "known", "--partition", "5", "--timeout-ms", "100"))
    assert "offset 9 is out of range" in failed(
        cli(data_dir, "consume", "known", "--partition", "0", "--offset", "9"))
    assert ok(cli(data_dir, "topics", "list")).stdout == "known\n"
    wait_for(lambda: broker.worker_pids().keys() == {("known", 0), ("known", 1)},
             message="only the workers of 'known'")


@pytest.mark.parametrize("content, message", [
    (b"worker_spin_us = 'fast'\n", "worker_spin_us"),
    (b"colour = 'blue'\n", "colour"),
    (b"this is not toml\n", "is not valid TOML"),
    (b"\xff\xfe\n", "is not valid TOML"),
])
def test_serve_with_a_bad_config_file_says_why_and_starts_nothing(
        tmp_path: Path, content: bytes, message: str) -> None:
    config = tmp_path / "broker.toml"
    config.write_bytes(content)
    error = failed(cli(tmp_path / "data", "serve", "--config", str(config)))
    assert str(config) in error and message in error
    assert not (tmp_path / "data" / "broker.sock").exists()


def test_serve_with_a_missing_config_file_says_so(tmp_path: Path) -> None:
    error = failed(cli(tmp_path / "data", "serve", "--config", str(tmp_path / "absent.toml")))
    assert "cannot read config file" in error and "absent.toml" in error


def test_produce_names_the_line_of_a_record_the_topic_refuses(broker: RunningBroker) -> None:
    data_dir = broker.data_dir
    ok(cli(data_dir, "topics", "create", "small", "--config", "max_batch_bytes=4096"))
    error = failed(cli(data_dir, "produce", "small", "--partition", "0",
                       input=b"one\ntwo\n" + b"x" * 8000 + b"\n"))
    assert error.startswith("error: line 3: ") and "max_batch_bytes is 4096" in error
    assert ok(cli(data_dir, "consume", "small", "--from-beginning", "--timeout-ms", "300",
                  "--max-messages", "2")).stdout == "one\ntwo\n"


@pytest.mark.parametrize("args", [
    ("produce", "t", "--key-separator", ""),
    ("topics", "alter", "t", "--config", "retention_ms=1", "--delete-config", "retention_ms"),
])
def test_more_usage_errors_exit_2(tmp_path: Path, args: tuple[str, ...]) -> None:
    assert "Usage:" in failed(cli(tmp_path / "data", *args), code=2)
