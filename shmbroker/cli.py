"""The ``shmbroker`` command line.

Exit codes: 0 ok, 1 an error (one line on stderr), 2 usage (click's own).
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import click

from shmbroker import __version__
from shmbroker.errors import ShmbrokerError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="shmbroker")
def main() -> None:
    """shmbroker: a persistent, Kafka-style event-streaming broker for one large host."""


@main.command("dump-log")
@click.argument("paths", nargs=-1, required=True,
                type=click.Path(exists=True, dir_okay=True, path_type=Path))
@click.option("--print-data", is_flag=True, help="Also print every record (key and value).")
@click.option("--verify", is_flag=True,
              help="Exit 1 if any corruption is found, naming the first bad position.")
def dump_log(paths: tuple[Path, ...], print_data: bool, verify: bool) -> None:
    """Print the batches of segment files (.log) or of every segment in a partition directory,
    or the entries of index files (.index, .timeindex), like kafka-dump-log.sh."""
    from shmbroker.dump_log import DumpResult, dump_file, segment_paths

    results: list[tuple[Path, DumpResult]] = []
    for path in paths:
        files = segment_paths(path)
        if not files:  # (a directory: a file is its own list)
            click.echo(f"{path}: no segment files (*.log) in this directory", err=True)
        for segment in files:
            result = DumpResult()
            try:
                dumped = dump_file(segment, click.echo, print_data=print_data, result=result)
            except BrokenPipeError:
                sys.exit(1)
            except OSError as error:
                click.echo(f"error: cannot read {segment}: {error.strerror}", err=True)
                sys.exit(1)
            if dumped:
                results.append((segment, result))
    bad = [(segment, result) for segment, result in results if result.errors]
    total_batches = sum(result.batches for _, result in results)
    entries = sum(result.index_entries for _, result in results)
    click.echo(f"Checked {len(results)} file(s), {total_batches} batch(es)"
               f"{f', {entries} index entries' if entries else ''}: "
               f"{'corruption found' if bad else 'all valid'}", err=True)
    if verify and bad:
        segment, result = bad[0]
        click.echo(f"error: {segment}: first corruption at position "
                   f"{result.first_error_position}: {result.first_error}", err=True)
        sys.exit(1)


DATA_DIR_OPTION = click.option(
    "--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
    help="Broker data directory (default: $SHMBROKER_DATA_DIR or ./shmbroker-data).")


@main.command("serve")
@DATA_DIR_OPTION
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help="Broker settings (TOML); [topic_defaults] sets topic configs' defaults.")
@click.option("--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"],
                                               case_sensitive=False), default="INFO",
              show_default=True)
@click.option("--allow-foreign-data-dir", is_flag=True,
              help="Serve a data dir owned by another user (refused by default).")
def serve(data_dir: Path | None, config_file: str | None, log_level: str,
          allow_foreign_data_dir: bool) -> None:
    """Run the broker in the foreground until SIGTERM or Ctrl-C."""
    import logging

    from shmbroker.config import BrokerConfig
    from shmbroker.errors import ShmbrokerError
    from shmbroker.supervisor.supervisor import default_data_dir, run

    logging.basicConfig(level=log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
    try:
        config = BrokerConfig.load(config_file)
        code = run(data_dir or default_data_dir(), config, log_level.upper(),
                   allow_foreign_data_dir)
    except ShmbrokerError as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(1)
    sys.exit(code)


# ------------------------------------------------------------------------------------------------
# The commands of a Kafka user's daily work: topics, produce, consume, status.  Each imports the
# client lazily (``shmbroker --help`` stays quick) and runs under ``_expected_errors``, the one
# place where ShmbrokerError and OSError become ``error: ...`` and exit 1.
# ------------------------------------------------------------------------------------------------

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a process that Ctrl-C stopped
PRODUCE_PENDING_RECORDS_MAX = 65_536  # futures held before the oldest half is checked
CONSUME_POLL_WAIT_MS_MAX = 1_000  # one poll's wait when no --timeout-ms bounds it
PRODUCE_INTERRUPT_FLUSH_S = 10.0  # Ctrl-C: how long the records already read may take
PRODUCE_CLOSE_TIMEOUT_S = 10.0  # after an error: how long records still queued may take
NULL_FIELD = b"null"  # a null key or value, as kafka-console-consumer prints it


def _fail(message: str) -> NoReturn:
    click.echo(f"error: {' '.join(message.splitlines())}", err=True)
    sys.exit(EXIT_ERROR)


def _error_message(error: BaseException) -> str:
    if isinstance(error, OSError) and not isinstance(error, ShmbrokerError) and error.strerror:
        where = error.filename if error.filename is not None else ""
        return f"{error.strerror}: {where}" if where else error.strerror
    return str(error) or type(error).__name__


class _StdoutClosed(Exception):
    """The reader of our stdout went away (``| head``): the end of the output, not an error.

    Raised only by the writes to stdout (``_out``, ``_RecordPrinter``), so that a broken pipe
    to the broker still counts as the error it is."""


def _out(text: str = "") -> None:
    """One line to stdout."""
    try:
        click.echo(text)
    except BrokenPipeError:
        raise _StdoutClosed from None


def _quiet_stdout() -> None:
    """Point fd 1 at /dev/null, so that the interpreter's final flush of what a failed write
    left buffered does not complain about the closed pipe."""
    with contextlib.suppress(OSError, ValueError, AttributeError, io.UnsupportedOperation):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def _expected_errors(command: Callable[..., None]) -> Callable[..., None]:
    """Expected failures (no broker, unknown topic, a bad config, a full disk) exit 1 with one
    line on stderr; a closed stdout pipe exits 0 without a word; anything else is our bug and
    keeps its traceback."""

    @functools.wraps(command)
    def run_command(*args: Any, **kwargs: Any) -> None:
        try:
            command(*args, **kwargs)
        except _StdoutClosed:
            _quiet_stdout()
            sys.exit(0)
        except (ShmbrokerError, OSError) as error:
            _fail(_error_message(error))

    return run_command


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM stops the command as Ctrl-C does (KeyboardInterrupt), so it can end cleanly."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def key_values(ctx: click.Context, param: click.Parameter, items: tuple[str, ...],
               example: str) -> dict[str, str]:
    """A repeatable ``KEY=VALUE`` option's items as a dict (spaces around either side dropped);
    a usage error, in the option's metavar and with ``example``, for an item without a key."""
    pairs: dict[str, str] = {}
    for item in items:
        key, found, value = item.partition("=")
        if not found or not key.strip():
            raise click.BadParameter(f"{item!r}: give {param.metavar or 'KEY=VALUE'}, e.g. "
                                     f"{example}", ctx=ctx, param=param)
        pairs[key.strip()] = value.strip()
    return pairs


def _parse_configs(ctx: click.Context, param: click.Parameter,
                   values: tuple[str, ...]) -> dict[str, str]:
    return key_values(ctx, param, values, "retention_ms=3600000")


def _separator(ctx: click.Context, param: click.Parameter, value: str | None) -> bytes | None:
    if value is None:
        return None
    if value == "":
        raise click.BadParameter("the separator cannot be empty", ctx=ctx, param=param)
    return os.fsencode(value)


def _format_configs(config: dict[str, Any]) -> str:
    return ",".join(f"{key}={value}" for key, value in sorted(config.items()))


def _format_bytes(size: int) -> str:
    if size < 1024:
        return "-" if size < 0 else f"{size} B"
    scaled = float(size)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        scaled /= 1024
        if scaled < 1024 or unit == "TiB":
            break
    return f"{scaled:.1f} {unit}"


def _format_duration(seconds: float) -> str:
    whole = int(seconds)
    days, rest = divmod(whole, 86_400)
    hours, rest = divmod(rest, 3_600)
    minutes, secs = divmod(rest, 60)
    parts = [(days, "d"), (hours, "h"), (minutes, "m")]
    leading = [f"{amount}{unit}" for amount, unit in parts if amount] + [f"{secs}s"]
    return " ".join(leading)


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows)]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
            for row in [headers, *rows]]


def _dump_json(value: Any) -> str:
    import orjson

    return orjson.dumps(value, option=orjson.OPT_INDENT_2).decode()


# -- topics ----------------------------------------------------------------------------------------
@main.group("topics")
def topics() -> None:
    """Create, list, describe, alter and delete topics (like kafka-topics.sh)."""


CONFIG_OPTION_HELP = ("A topic config override KEY=VALUE (repeatable); the names are those of "
                      "`python -m shmbroker.config`, e.g. retention_ms=3600000.")


@topics.command("create")
@click.argument("name")
@click.option("--partitions", type=int, default=1, show_default=True,
              help="Number of partitions.")
@click.option("--config", "configs", multiple=True, callback=_parse_configs,
              metavar="KEY=VALUE", help=CONFIG_OPTION_HELP)
@DATA_DIR_OPTION
@_expected_errors
def topics_create(name: str, partitions: int, configs: dict[str, str],
                  data_dir: Path | None) -> None:
    """Create topic NAME; returns once every partition's worker runs."""
    from shmbroker.client.admin import Admin

    with Admin(data_dir) as admin:
        topic = admin.create_topic(name, partitions=partitions, config=configs)
    _out(f"Created topic {topic['name']} with {len(topic['partitions'])} partition(s).")


@topics.command("list")
@DATA_DIR_OPTION
@_expected_errors
def topics_list(data_dir: Path | None) -> None:
    """Print every topic's name, one per line."""
    from shmbroker.client.admin import Admin

    with Admin(data_dir) as admin:
        names = admin.list_topics()
    for name in sorted(names):
        _out(name)


@topics.command("describe")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print the broker's raw JSON answer.")
@DATA_DIR_OPTION
@_expected_errors
def topics_describe(name: str, as_json: bool, data_dir: Path | None) -> None:
    """Show topic NAME: its id, partition count and config overrides, then per partition the
    log start and end offsets, high watermark, size on disk, worker pid and state.

    An offset of -1 means the partition's worker has not published its positions (yet)."""
    from shmbroker.client.admin import Admin

    with Admin(data_dir) as admin:
        topic = admin.describe_topic(name)
    if as_json:
        _out(_dump_json(topic))
        return
    partitions = topic["partitions"]
    _out(f"Topic: {topic['name']}\tTopicId: {topic['topic_id']}\t"
               f"PartitionCount: {len(partitions)}\tConfigs: {_format_configs(topic['config'])}")
    rows = [[str(entry["partition"]), str(entry["log_start_offset"]),
             str(entry["log_end_offset"]), str(entry["high_watermark"]),
             _format_bytes(entry["size_bytes"]),
             str(entry["worker_pid"]) if entry["worker_pid"] else "-", entry["state"]]
            for entry in partitions]
    for line in _table(["PARTITION", "LOG_START", "LOG_END", "HIGH_WATERMARK", "SIZE",
                        "WORKER_PID", "STATE"], rows):
        _out(f"  {line}")


@topics.command("alter")
@click.argument("name")
@click.option("--config", "configs", multiple=True, callback=_parse_configs,
              metavar="KEY=VALUE", help=CONFIG_OPTION_HELP)
@click.option("--delete-config", "deleted", multiple=True, metavar="KEY",
              help="Remove the override KEY (the broker default applies again); repeatable.")
@DATA_DIR_OPTION
@_expected_errors
def topics_alter(name: str, configs: dict[str, str], deleted: tuple[str, ...],
                 data_dir: Path | None) -> None:
    """Set or remove config overrides of topic NAME; its workers apply them at once."""
    from shmbroker.client.admin import Admin

    if not configs and not deleted:
        raise click.UsageError("give at least one --config KEY=VALUE or --delete-config KEY")
    both = sorted(set(configs) & set(deleted))
    if both:
        raise click.UsageError(f"{', '.join(both)}: both set and deleted")
    changes: dict[str, Any] = {**configs, **dict.fromkeys(deleted)}
    with Admin(data_dir) as admin:
        topic = admin.alter_configs(name, changes)
    _out(f"Altered topic {topic['name']}; config overrides now: "
               f"{_format_configs(topic['config']) or '(none)'}")


@topics.command("add-partitions")
@click.argument("name")
@click.option("--partitions", type=int, required=True,
              help="The new total number of partitions (partitions are never removed).")
@DATA_DIR_OPTION
@_expected_errors
def topics_add_partitions(name: str, partitions: int, data_dir: Path | None) -> None:
    """Grow topic NAME to --partitions partitions in all."""
    from shmbroker.client.admin import Admin

    with Admin(data_dir) as admin:
        topic = admin.create_partitions(name, partitions)
    _out(f"Topic {topic['name']} now has {len(topic['partitions'])} partition(s).")


@topics.command("delete")
@click.argument("name")
@DATA_DIR_OPTION
@_expected_errors
def topics_delete(name: str, data_dir: Path | None) -> None:
    """Delete topic NAME: its workers stop and its records are removed from disk."""
    from shmbroker.client.admin import Admin

    with Admin(data_dir) as admin:
        admin.delete_topic(name)
    _out(f"Deleted topic {name}.")


# -- produce -----------------------------------------------------------------------------------
class _PendingAcks:
    """The futures of records sent but not yet checked, with the stdin line of the first.

    Checked oldest first when PRODUCE_PENDING_RECORDS_MAX are held (by then most are done), and
    all at EOF, so a failed record is named by its line without waiting on each record."""

    def __init__(self) -> None:
        self.first_line_number = 1
        self.futures: list[Any] = []

    def add(self, future: Any) -> None:
        self.futures.append(future)
        if len(self.futures) >= PRODUCE_PENDING_RECORDS_MAX:
            self.check(len(self.futures) // 2)

    def check(self, count: int | None = None) -> None:
        """Wait for the oldest ``count`` futures (all by default); raise the first error."""
        count = len(self.futures) if count is None else count
        for index, future in enumerate(self.futures[:count]):
            try:
                future.result()
            except ShmbrokerError as error:
                raise _LineError(self.first_line_number + index, error) from None
        del self.futures[:count]
        self.first_line_number += count


class _LineError(ShmbrokerError):
    def __init__(self, line_number: int, error: BaseException) -> None:
        super().__init__(f"line {line_number}: {_error_message(error)}")


@main.command("produce")
@click.argument("topic")
@click.option("--partition", type=click.IntRange(min=0), default=None,
              help="Send every record to this partition (default: by key hash, or sticky "
                   "batches across partitions when records have no key).")
@click.option("--key-separator", callback=_separator, default=None, metavar="SEP",
              help="Each line is KEY<SEP>VALUE, split at the first SEP; a line without SEP is "
                   "an error (as kafka-console-producer's parse.key=true).")
@click.option("--acks", type=click.Choice(["0", "1", "all"]), default="1", show_default=True,
              help="0: do not wait for the broker; 1: wait until the partition log has each "
                   "record; all: also until every replica has it.")
@click.option("--linger-ms", type=click.IntRange(min=0), default=5, show_default=True,
              help="How long a batch waits for more records before it is sent.")
@DATA_DIR_OPTION
@_expected_errors
def produce(topic: str, partition: int | None, key_separator: bytes | None, acks: str,
            linger_ms: int, data_dir: Path | None) -> None:
    """Send one record per line of stdin to TOPIC.

    The line's bytes, newline removed, are the value: any bytes work, not only UTF-8 (an empty
    line is an empty value).  At end of input every record is flushed and, unless --acks 0, its
    acknowledgement awaited; a record the broker refused stops the command with exit 1 and an
    error naming its line.  Ctrl-C flushes what was read and exits 130.

    \b
    Example:
      printf 'sensor-7\\t21.5\\n' | shmbroker produce metrics --key-separator $'\\t'
    """
    from shmbroker.client.producer import Producer
    from shmbroker.errors import UnknownTopicOrPartitionError

    stdin = sys.stdin.buffer
    producer = Producer(data_dir, acks=acks, linger_ms=linger_ms)
    try:
        partition_count = len(producer.partitions_for(topic))  # unknown topic: before any input
        if partition is not None and partition >= partition_count:
            raise UnknownTopicOrPartitionError(
                f"topic {topic!r} has {partition_count} partition(s); partition {partition} "
                "does not exist")
        pending = _PendingAcks()
        try:
            with _sigterm_as_interrupt():
                _produce_lines(producer, stdin, topic, partition, key_separator, pending)
        except KeyboardInterrupt:
            producer.flush(PRODUCE_INTERRUPT_FLUSH_S)
            pending.check()
            sys.exit(EXIT_INTERRUPTED)
        producer.flush()
        pending.check()
    finally:
        producer.close(timeout=PRODUCE_CLOSE_TIMEOUT_S)


def _produce_lines(producer: Any, stdin: Any, topic: str, partition: int | None,
                   key_separator: bytes | None, pending: _PendingAcks) -> None:
    for line_number, line in enumerate(stdin, 1):
        if line.endswith(b"\n"):
            line = line[:-1]
        key = None
        if key_separator is not None:
            key, found, line = line.partition(key_separator)
            if not found:
                producer.flush()
                pending.check()
                _fail(f"line {line_number} has no key separator "
                      f"{os.fsdecode(key_separator)!r}: with --key-separator every line is "
                      f"KEY<SEP>VALUE ({line_number - 1} line(s) before it were sent)")
        pending.add(producer.send(topic, line, key, partition=partition))


# -- consume -----------------------------------------------------------------------------------
@main.command("consume")
@click.argument("topic")
@click.option("--partition", type=click.IntRange(min=0), default=None,
              help="Consume only this partition (default: every partition of TOPIC).")
@click.option("--from-beginning", is_flag=True,
              help="Start at each partition's earliest record (default: only new records).")
@click.option("--offset", type=click.IntRange(min=0), default=None,
              help="Start at this offset (needs --partition).")
@click.option("--max-messages", type=click.IntRange(min=1), default=None,
              help="Exit after this many records.")
@click.option("--timeout-ms", type=click.IntRange(min=0), default=None,
              help="Exit when no record arrived for this long (default: run until Ctrl-C).")
@click.option("--print-key", is_flag=True, help="Print KEY<SEP> before each value.")
@click.option("--print-offset", is_flag=True,
              help="Print PARTITION:OFFSET and a tab at the start of each line.")
@click.option("--key-separator", callback=_separator, default="\t", show_default="tab",
              metavar="SEP", help="What follows the key with --print-key.")
@click.option("--group", "group_id", default=None, metavar="GROUP",
              help="Consume as a member of consumer group GROUP: the group assigns the "
                   "partitions, consumption starts at the group's committed offsets and the "
                   "positions are committed as it goes and at exit (--from-beginning: where "
                   "nothing is committed, start at the earliest record instead of new ones).")
@DATA_DIR_OPTION
@_expected_errors
def consume(topic: str, partition: int | None, from_beginning: bool, offset: int | None,
            max_messages: int | None, timeout_ms: int | None, print_key: bool,
            print_offset: bool, key_separator: bytes, group_id: str | None,
            data_dir: Path | None) -> None:
    """Print the records of TOPIC to stdout, one per line.

    \b
    Each line is   [PARTITION:OFFSET<TAB>][KEY<SEP>]VALUE
      PARTITION:OFFSET<TAB>  with --print-offset, e.g. "0:42\\t"
      KEY<SEP>               with --print-key (SEP: --key-separator, a tab by default)
      VALUE                  the value's bytes as they are (not decoded), then a newline
    A null key or value prints as: null

    Records of one partition come in offset order; partitions interleave.  Ends after
    --max-messages records, after --timeout-ms without a record, or at Ctrl-C / SIGTERM
    (exit 0).  A closed stdout (`| head`) ends it quietly, with exit 0.

    With --group GROUP it joins that consumer group instead of reading every partition: it
    resumes at the group's committed offsets and commits what it printed (see `shmbroker
    groups describe GROUP`).
    """
    if group_id is not None and (partition is not None or offset is not None):
        raise click.UsageError("--group excludes --partition and --offset: the group assigns "
                               "the partitions and starts at its committed offsets")
    if offset is not None and partition is None:
        raise click.UsageError("--offset needs --partition")
    if offset is not None and from_beginning:
        raise click.UsageError("--offset and --from-beginning exclude each other")
    printer = _RecordPrinter(sys.stdout.buffer, print_key, print_offset, key_separator)
    try:
        with _sigterm_as_interrupt():
            if group_id is not None:
                _consume_as_member(data_dir, topic, group_id, from_beginning, printer,
                                   max_messages, timeout_ms)
            else:
                _consume_assigned(data_dir, topic, partition, from_beginning, offset, printer,
                                  max_messages, timeout_ms)
    except KeyboardInterrupt:
        pass
    click.echo(f"Processed a total of {printer.count} message(s).", err=True)


def _consume_assigned(data_dir: Path | None, topic: str, partition: int | None,
                      from_beginning: bool, offset: int | None, printer: _RecordPrinter,
                      max_messages: int | None, timeout_ms: int | None) -> None:
    """Consume ``partition`` (default: every partition) of ``topic`` by explicit assignment."""
    from shmbroker.client.admin import Admin
    from shmbroker.client.consumer import Consumer
    from shmbroker.client.types import TopicPartition

    if partition is None:
        with Admin(data_dir) as admin:
            (found,) = admin.metadata([topic])
        wanted = [TopicPartition(topic, entry["partition"]) for entry in found["partitions"]]
    else:
        wanted = [TopicPartition(topic, partition)]
    # An --offset past the log end is an error; otherwise a position that retention
    # passed resets to the earliest record left (Kafka's auto.offset.reset=earliest).
    with Consumer(data_dir, auto_offset_reset="none" if offset is not None
                  else "earliest") as consumer:
        consumer.assign(wanted)
        if offset is not None:
            consumer.seek(wanted[0], offset)
        elif from_beginning:
            consumer.seek_to_beginning()
        else:
            consumer.seek_to_end()
        _consume_until_done(consumer, printer, max_messages, timeout_ms)


def _consume_as_member(data_dir: Path | None, topic: str, group_id: str, from_beginning: bool,
                       printer: _RecordPrinter, max_messages: int | None,
                       timeout_ms: int | None) -> None:
    """Consume ``topic`` as a member of ``group_id`` (subscribe, auto-commit; closing commits
    what was printed and leaves the group)."""
    from shmbroker.client.admin import Admin
    from shmbroker.client.consumer import Consumer

    with Admin(data_dir) as admin:
        admin.metadata([topic])  # an unknown topic is an error, not an endless wait
    with Consumer(data_dir, group_id=group_id, client_id="shmbroker-console-consumer",
                  auto_offset_reset="earliest" if from_beginning else "latest") as consumer:
        consumer.subscribe([topic])
        _consume_until_done(consumer, printer, max_messages, timeout_ms)


class _RecordPrinter:
    """Writes records as [PARTITION:OFFSET<TAB>][KEY<SEP>]VALUE<LF>, one write per poll."""

    def __init__(self, stdout: Any, print_key: bool, print_offset: bool,
                 key_separator: bytes) -> None:
        self.stdout = stdout
        self.print_key = print_key
        self.print_offset = print_offset
        self.key_separator = key_separator
        self.count = 0

    def write(self, records: list[Any]) -> None:
        out: list[bytes] = []
        for record in records:
            if self.print_offset:
                out.append(b"%d:%d\t" % (record.partition, record.offset))
            if self.print_key:
                out += (NULL_FIELD if record.key is None else record.key, self.key_separator)
            out += (NULL_FIELD if record.value is None else record.value, b"\n")
        self.count += len(records)  # before the write: a signal may follow its last byte
        try:
            self.stdout.write(b"".join(out))
            self.stdout.flush()
        except BrokenPipeError:
            raise _StdoutClosed from None


def _consume_until_done(consumer: Any, printer: _RecordPrinter, max_messages: int | None,
                        timeout_ms: int | None) -> None:
    idle_s = None if timeout_ms is None else timeout_ms / 1000
    last_record_at = time.monotonic()
    while max_messages is None or printer.count < max_messages:
        if idle_s is None:
            wait_ms = CONSUME_POLL_WAIT_MS_MAX
        else:
            left_s = last_record_at + idle_s - time.monotonic()
            if left_s <= 0:
                return
            wait_ms = max(1, int(left_s * 1000))
        records = consumer.poll(timeout_ms=wait_ms, max_records=(
            None if max_messages is None else max_messages - printer.count))
        if records:
            last_record_at = time.monotonic()
            printer.write(records)


# -- status ------------------------------------------------------------------------------------
@main.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print the broker's raw JSON answer.")
@DATA_DIR_OPTION
@_expected_errors
def status(as_json: bool, data_dir: Path | None) -> None:
    """Show the broker: pid, data dir, uptime, topics, and the state of every worker."""
    from shmbroker.client.admin import Admin

    with Admin(data_dir) as admin:
        answer = admin.status()
    if as_json:
        _out(_dump_json(answer))
        return
    workers = answer["workers"]
    for label, value in (
            ("Broker pid", answer["pid"]), ("Data dir", answer["data_dir"]),
            ("Uptime", _format_duration(answer["uptime_s"])), ("Version", answer["version"]),
            ("Topics", answer["topics"]), ("Partitions", answer["partitions"]),
            ("Workers alive", f"{answer['workers_alive']}/{len(workers)}")):
        _out(f"{label + ':':<15}{value}")
    if workers:
        rows = [[f"{worker['topic']}/{worker['partition']}",
                 str(worker["pid"]) if worker["pid"] else "-", _worker_state(worker),
                 str(worker["restarts"])]
                for worker in sorted(workers, key=lambda w: (w["topic"], w["partition"]))]
        _out()
        for line in _table(["TOPIC/PARTITION", "PID", "STATE", "RESTARTS"], rows):
            _out(line)


def _worker_state(worker: dict[str, Any]) -> str:
    """The state column: the supervisor's state, and what stops a running worker's appends."""
    notes = [worker["state"]]
    if worker.get("storage_full"):
        notes.append("storage full: appends refused until space is freed")
    if worker.get("responsive") is False:
        notes.append("unresponsive")
    return ", ".join(notes)


# -- groups ------------------------------------------------------------------------------------
@main.group("groups")
def groups() -> None:
    """List, describe, reset the offsets of and delete consumer groups (like
    kafka-consumer-groups.sh)."""


def _cell(value: Any) -> str:
    return "-" if value is None else str(value)


def _format_assignment(pairs: list[list[Any]]) -> str:
    """[[topic, partition], ...] as Kafka's tools print an assignment: topic(0,1,2)."""
    by_topic: dict[str, list[int]] = {}
    for topic, partition in pairs:
        by_topic.setdefault(topic, []).append(partition)
    return " ".join(f"{topic}({','.join(map(str, sorted(partitions)))})"
                    for topic, partitions in sorted(by_topic.items())) or "-"


@groups.command("list")
@DATA_DIR_OPTION
@_expected_errors
def groups_list(data_dir: Path | None) -> None:
    """Show every consumer group: its state, member count and group epoch.  Groups that only
    have committed offsets (no members) are listed as Empty."""
    from shmbroker.client.admin import Admin

    with Admin(data_dir) as admin:
        found = admin.list_consumer_groups()
    rows = [[group["group_id"], group["state"], str(group["members"]),
             str(group["group_epoch"])] for group in found]
    for line in _table(["GROUP", "STATE", "MEMBERS", "EPOCH"], rows):
        _out(line)


@groups.command("describe")
@click.argument("group_id", metavar="GROUP")
@click.option("--json", "as_json", is_flag=True, help="Print the broker's raw JSON answer.")
@DATA_DIR_OPTION
@_expected_errors
def groups_describe(group_id: str, as_json: bool, data_dir: Path | None) -> None:
    """Show consumer group GROUP: its state, epoch and assignor; its members (id, static
    instance id, client id, pid, state, assigned partitions); and per partition the committed
    offset, the log end, the lag and the member consuming it.  "-" means none."""
    from shmbroker.client.admin import Admin

    with Admin(data_dir) as admin:
        group = admin.describe_consumer_group(group_id)
    if as_json:
        _out(_dump_json(group))
        return
    members = group["members"]
    _out(f"Group: {group['group_id']}\tState: {group['state']}\t"
         f"Epoch: {group['group_epoch']}\tAssignor: {_cell(group['assignor'])}\t"
         f"Members: {len(members)}")
    _out()
    if members:
        rows = [[member["member_id"], _cell(member["group_instance_id"]),
                 member["client_id"] or "-", _cell(member["pid"]), member["state"],
                 _format_assignment(member["assignment"])] for member in members]
        for line in _table(["MEMBER-ID", "INSTANCE", "CLIENT-ID", "PID", "STATE",
                            "PARTITIONS"], rows):
            _out(line)
    else:
        _out(f"Consumer group {group_id!r} has no active members.")
    _out()
    rows = [[entry["topic"], str(entry["partition"]), _cell(entry["committed_offset"]),
             _cell(entry["log_end_offset"]), _cell(entry["lag"]), _cell(entry["member_id"])]
            for entry in group["partitions"]]
    if rows:
        for line in _table(["TOPIC", "PARTITION", "COMMITTED", "LOG-END", "LAG", "MEMBER"],
                           rows):
            _out(line)
    else:
        _out(f"Consumer group {group_id!r} has no committed offsets and no assigned "
             "partitions.")


def _parse_datetime_ms(ctx: click.Context, param: click.Parameter,
                       value: str | None) -> int | None:
    """An ISO 8601 date-time (naive = local time) as milliseconds since the epoch."""
    if value is None:
        return None
    import datetime as dt

    try:
        moment = dt.datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is not an ISO 8601 date-time, e.g. 2024-05-01T12:00:00 (local time) "
            "or 2024-05-01T12:00:00+00:00", ctx=ctx, param=param) from None
    if moment.tzinfo is None:
        moment = moment.astimezone()  # a naive time is local, as kafka-consumer-groups reads it
    epoch = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    if moment < epoch:
        raise click.BadParameter(f"{value!r} is before 1970-01-01T00:00:00Z", ctx=ctx,
                                 param=param)
    return (moment - epoch) // dt.timedelta(milliseconds=1)


@groups.command("reset-offsets")
@click.argument("group_id", metavar="GROUP")
@click.option("--topic", required=True, help="The topic whose committed offsets to reset.")
@click.option("--partition", "partitions", type=click.IntRange(min=0), multiple=True,
              help="Reset only this partition (repeatable; default: every partition).")
@click.option("--to-earliest", is_flag=True, help="To each partition's log start.")
@click.option("--to-latest", is_flag=True, help="To each partition's log end.")
@click.option("--to-offset", type=click.IntRange(min=0), default=None, metavar="N",
              help="To offset N (clamped into [log start, log end]).")
@click.option("--to-datetime", "to_datetime_ms", callback=_parse_datetime_ms, default=None,
              metavar="ISO8601",
              help="To the first record whose timestamp is at or after this date-time (e.g. "
                   "2024-05-01T12:00:00, local time, or with +00:00); the log end if none is.")
@click.option("--shift-by", type=int, default=None, metavar="N",
              help="Move each committed offset by N (negative: back), clamped into "
                   "[log start, log end].")
@click.option("--execute", is_flag=True,
              help="Commit the new offsets (without it: a dry run that only prints them).")
@DATA_DIR_OPTION
@_expected_errors
def groups_reset_offsets(group_id: str, topic: str, partitions: tuple[int, ...],
                         to_earliest: bool, to_latest: bool, to_offset: int | None,
                         to_datetime_ms: int | None, shift_by: int | None, execute: bool,
                         data_dir: Path | None) -> None:
    """Reset the committed offsets of consumer GROUP for --topic, with exactly one of
    --to-earliest, --to-latest, --to-offset, --to-datetime, --shift-by.

    Prints the plan (CURRENT: the committed offset, "-" if none; NEW); only with --execute are
    the new offsets committed.  The group must have no members (stop its consumers first); a
    group that does not exist yet gets its offsets created.

    \b
    Example:
      shmbroker groups reset-offsets dashboards --topic metrics --to-earliest --execute
    """
    from shmbroker.client.admin import Admin

    given = [name for name, value in (
        ("--to-earliest", to_earliest or None), ("--to-latest", to_latest or None),
        ("--to-offset", to_offset), ("--to-datetime", to_datetime_ms),
        ("--shift-by", shift_by)) if value is not None]
    if len(given) != 1:
        raise click.UsageError(
            "give exactly one of --to-earliest, --to-latest, --to-offset, --to-datetime, "
            f"--shift-by (got {', '.join(given) or 'none'})")
    with Admin(data_dir) as admin:
        plan = admin.reset_consumer_group_offsets(
            group_id, topic, to_earliest=to_earliest, to_latest=to_latest, to_offset=to_offset,
            to_datetime_ms=to_datetime_ms, shift_by=shift_by,
            partitions=partitions or None, execute=execute)
    rows = [[tp.topic, str(tp.partition), _cell(current), str(new)]
            for tp, (current, new) in sorted(plan.items())]
    for line in _table(["TOPIC", "PARTITION", "CURRENT", "NEW"], rows):
        _out(line)
    if execute:
        click.echo(f"Committed the new offsets of {len(plan)} partition(s) for group "
                   f"{group_id!r}.", err=True)
    else:
        click.echo("Dry run: nothing was changed; add --execute to commit these offsets.",
                   err=True)


@groups.command("delete")
@click.argument("group_id", metavar="GROUP")
@DATA_DIR_OPTION
@_expected_errors
def groups_delete(group_id: str, data_dir: Path | None) -> None:
    """Delete consumer GROUP and its committed offsets (it must have no members)."""
    from shmbroker.client.admin import Admin

    with Admin(data_dir) as admin:
        admin.delete_consumer_group(group_id)
    _out(f"Deleted consumer group {group_id}.")


if __name__ == "__main__":
    main()
