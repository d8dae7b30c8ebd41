"""``shmbroker-bench``: load-test a broker (Kafka's perf-test and OMB, for shmbroker).

With no arguments it starts an embedded broker in a temp dir, runs the default workload (1 topic,
1 partition, 1 producer, 1 consumer, 100-byte records, as fast as it goes, 10 s), prints the
results and cleans up.  ``--data-dir`` targets a broker that is already running.  Exit status 1
when an acknowledged record was not consumed (lost), 2 for bad options.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import click
import orjson

from shmbroker import __version__, limits
from shmbroker.perf.compare import compare
from shmbroker.perf.workload import Workload, load_workload
from shmbroker.subprocesses import child_environment, python_module

BROKER_START_TIMEOUT_S = 30.0


def _broker_pid(data_dir: Path) -> int | None:
    """The supervisor's pid, from the data dir's lock file (for CPU and RSS figures)."""
    with contextlib.suppress(OSError, ValueError):
        return int((data_dir / "broker.lock").read_text().split()[0])
    return None


@contextlib.contextmanager
def embedded_broker(settings: Mapping[str, Any] | None = None) -> Iterator[tuple[Path, int]]:
    """A broker serving a fresh temp data dir: (data dir, supervisor pid); removed after.
    ``settings``: broker settings (``worker_spin_us``, ...; checked values, see
    :func:`_broker_settings`), the others at their defaults."""
    temp = Path(tempfile.mkdtemp(prefix="shmbroker-bench-"))
    data_dir = temp / "data"
    command = python_module("shmbroker.cli", "serve", "--data-dir", str(data_dir),
                            "--log-level", "WARNING")
    if settings:
        config = temp / "broker.toml"  # TOML's strings and integers read as JSON's
        config.write_text("".join(f"{name} = {orjson.dumps(value).decode()}\n"
                                  for name, value in settings.items()))
        command += ["--config", str(config)]
    process = subprocess.Popen(command, env=child_environment())
    try:
        deadline = time.monotonic() + BROKER_START_TIMEOUT_S
        while not (data_dir / "broker.sock").exists():
            if process.poll() is not None:
                raise click.ClickException(f"the embedded broker exited ({process.returncode})")
            if time.monotonic() > deadline:
                raise click.ClickException("the embedded broker did not start in "
                                           f"{BROKER_START_TIMEOUT_S:.0f} s")
            time.sleep(0.02)
        yield data_dir, process.pid
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(temp, ignore_errors=True)


def _progress(point: dict[str, float]) -> None:
    if not sys.stderr.isatty():
        return
    p99 = point.get("p99_us")
    sys.stderr.write(f"\r{point['t_s']:7.1f} s  produce {point['produce_per_s']:>12,.0f} rec/s"
                     f"  consume {point['consume_per_s']:>12,.0f} rec/s"
                     + (f"  p99 {p99:,.0f} us" if p99 else "") + "   ")
    sys.stderr.flush()


def _summary(result: Any) -> list[str]:
    workload = result.workload
    lines = [
        f"workload {workload.name}: {workload.topics} topic(s) x {workload.partitions} "
        f"partition(s), {workload.producers} producer(s), {workload.consumers} consumer(s)"
        + (f" in group {workload.group!r}" if workload.group else "")
        + f", {workload.record_size} B {workload.payload} records, api {workload.api}, "
        f"acks {workload.acks}{' (durable: fsync before ack)' if workload.durable else ''}"
        f", rate "
        + (f"{workload.rate_per_sec:,}/s" if workload.rate_per_sec else "max")
        + f", {workload.duration_s:g} s (+{workload.warmup_s:g} s warm-up)"
        + (f", consumers spin {workload.poll_spin_us} µs" if workload.poll_spin_us else ""),
        "",
        f"{'':12}{'records/s':>14}{'MB/s':>10}",
        f"{'produce':12}{result.produce_rate_per_s:>14,.0f}{result.produce_mb_per_s:>10,.1f}",
        f"{'consume':12}{result.consume_rate_per_s:>14,.0f}{result.consume_mb_per_s:>10,.1f}",
        ""]
    if result.latency.count:
        ps = result.latency.percentiles([50, 90, 99, 99.9, 99.99, 100])
        lines.append("latency (intended send -> consumed, us): " + "  ".join(
            f"{'max' if p == 100 else f'p{p:g}'} {value / 1000:,.0f}" for p, value in ps.items()))
    if result.latency_max_per_s:
        worst = max(result.latency_max_per_s, key=lambda second: second["max_us"])
        lines.append(f"slowest second: {worst['t_s']:,.1f}-{worst['t_s'] + 1:,.1f} s after the "
                     f"start, max {worst['max_us']:,.0f} us (each second's max: --json)")
        if result.client_pauses:
            lines.append("  in it: " + _pauses_within(result.client_pauses, worst["t_s"]))
    lines += _pause_lines(result.client_pauses, result.workload.warmup_s)
    lines.append(f"records: sent {result.sent:,}, acknowledged {result.acknowledged:,}, "
                 f"consumed {result.consumed:,}, duplicates {result.duplicates:,}, "
                 f"send errors {result.send_errors:,}, lost {result.lost:,}")
    if result.broker:
        lines.append(f"broker processes: CPU {result.broker['broker_cpu_pct_median']:,.0f} % "
                     f"(median of the seconds; 100 = one core), RSS up to "
                     f"{result.broker['broker_rss_bytes_max'] / 2**20:,.0f} MiB")
    if result.clients:
        lines.append("client processes: CPU " + ", ".join(
            f"{kind} {result.clients[f'{kind}_cpu_pct_median']:,.0f} %"
            for kind in ("producers", "consumers") if f"{kind}_cpu_pct_median" in result.clients)
            + " (medians, summed over each kind's processes)")
        if result.clients.get("host_steal_cpu_pct_max"):
            lines.append(f"host steal time: up to {result.clients['host_steal_cpu_pct_max']:,.0f}"
                         " % in a second (100 = one core that the virtual machine's host ran "
                         "something else on)")
    return lines


def _pauses_within(pauses: dict[str, Any], t_s: float) -> str:
    """What the clients' pauses say of the second from ``t_s``: how late the paced sends went
    (the producers' seconds overlapping it) and its longest garbage collection.  Neither says
    the latency came from the broker or the consumers' side."""
    late = [second["ms"] for second in pauses["late_send_max_per_s"]
            if abs(second["t_s"] - t_s) < 1]
    collections = [pause for pause in pauses["long_collections"]
                   if t_s <= pause["t_s"] < t_s + 1]
    return "; ".join([
        f"paced sends up to {max(late):,.1f} ms late" if late
        else "no paced send 1 ms late or more",
        f"the longest garbage collection {collections[0]['ms']:,.1f} ms "
        f"({collections[0]['process']})" if collections
        else "no garbage collection of 1 ms or more"])


def _pause_lines(pauses: dict[str, Any], warmup_s: float) -> list[str]:
    """Where the clients paused after the warm-up (PauseWatch): the longest garbage
    collection, and how late a paced producer sent at worst; to put a slow second on a
    process."""
    if not pauses:
        return []
    lines = []
    longest = [pause for pause in pauses["long_collections"] if pause["t_s"] >= warmup_s][:1]
    collections = sum(sum(counts) for counts in pauses["collections"].values())
    lines.append(f"client pauses: {collections:,} garbage collections" + (
        f", the longest {longest[0]['ms']:,.1f} ms ({longest[0]['process']}, generation "
        f"{longest[0]['generation']}, {longest[0]['t_s']:,.1f} s after the start)"
        if longest else ", none of 1 ms or more after the warm-up"))
    late = [second for second in pauses["late_send_max_per_s"] if second["t_s"] >= warmup_s]
    if late:
        worst = max(late, key=lambda second: second["ms"])
        lines.append(f"paced sends: up to {worst['ms']:,.1f} ms late "
                     f"({worst['t_s']:,.0f}-{worst['t_s'] + 1:,.0f} s after the start; in the "
                     f"{worst['gap_ms']:,.1f} ms since its last send on time the sending thread "
                     f"ran {worst['cpu_ms']:,.1f} ms, waited {worst['waits']:,} times, was "
                     f"preempted {worst['preempted']:,} times and took "
                     f"{worst['page_faults']:,} page faults)")
    return lines


def _pyplot() -> Any:
    """matplotlib's pyplot (headless), or a clear error: checked before a run, not after."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise click.ClickException("--plot needs matplotlib: pip install 'shmbroker[plot]'") \
            from None
    return plt


def _plot(result: Any, path: Path) -> None:
    plt = _pyplot()
    figure, (rates, latency) = plt.subplots(1, 2, figsize=(12, 4.5))
    t = [point["t_s"] for point in result.timeline]
    rates.plot(t, [point["produce_per_s"] for point in result.timeline], label="produce")
    rates.plot(t, [point["consume_per_s"] for point in result.timeline], label="consume")
    rates.set(xlabel="s", ylabel="records/s", title="throughput")
    rates.legend()
    if result.latency.count:
        ps = [50, 75, 90, 95, 99, 99.5, 99.9, 99.95, 99.99, 100]
        values = result.latency.percentiles(ps)
        latency.plot([1 / (1 - p / 100) if p < 100 else 1e5 for p in ps],
                     [values[p] / 1000 for p in ps], marker="o")
        latency.set(xscale="log", yscale="log", xlabel="1 / (1 - percentile)",
                    ylabel="us", title="latency by percentile")
    figure.tight_layout()
    figure.savefig(path)


def _broker_settings(ctx: click.Context, param: click.Parameter,
                     value: tuple[str, ...]) -> dict[str, Any]:
    """``NAME=VALUE`` items, checked as the broker checks its config file, into their values."""
    from shmbroker.cli import key_values
    from shmbroker.config import BrokerConfig
    from shmbroker.errors import InvalidConfigError

    raw = key_values(ctx, param, value, "worker_check_thread=off")
    try:
        config = BrokerConfig.from_mapping(raw)
    except InvalidConfigError as error:
        raise click.BadParameter(str(error)) from None
    return {name: getattr(config, name) for name in raw}


BROKER_SETTING_OPTION = click.option(
    "--broker-setting", "broker_settings", multiple=True, callback=_broker_settings,
    metavar="NAME=VALUE", help="A setting of the embedded broker (repeatable), as in its "
    "config file: e.g. worker_check_thread=off; not with --data-dir.")


@click.group(invoke_without_command=True,
             context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="shmbroker-bench")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Load-test the broker already serving this data dir (default: start an "
                   "embedded one in a temp dir).")
@click.option("--workload", "workload_file", type=click.Path(dir_okay=False, exists=True,
                                                             path_type=Path),
              default=None, help="A workload file (TOML; see bench/workloads/); options given "
                                 "here override it.")
@click.option("--topics", type=click.IntRange(min=1), default=None)
@click.option("--partitions", type=click.IntRange(min=1), default=None,
              help="Partitions per topic.")
@click.option("--producers", type=click.IntRange(min=1), default=None)
@click.option("--consumers", type=click.IntRange(min=1), default=None)
@click.option("--group", default=None, help="Consumers join this consumer group "
                                           "(default: partitions split by assignment).")
@click.option("--record-size-bytes", "record_size", default=None,
              help="Value size: fixed (100) or uniform in a range (64-1024); >= 24.")
@click.option("--keyed/--no-keyed", default=None, help="Records carry one of 1,000 keys.")
@click.option("--rate-per-sec", type=click.IntRange(min=0), default=None,
              help="Target records/s, all producers together; 0 = as fast as possible.")
@click.option("--duration-s", type=click.FloatRange(min=0, min_open=True), default=None)
@click.option("--warmup-s", type=click.FloatRange(min=0), default=None,
              help="Not counted in the latency histogram.")
@click.option("--acks", type=click.Choice(["0", "1", "all"]), default=None)
@click.option("--linger-ms", type=click.IntRange(min=0), default=None)
@click.option("--batch-size-bytes", type=click.IntRange(min=1), default=None)
@click.option("--ring-bytes", type=click.IntRange(min=1), default=None,
              help="The producers' ring per partition (default 8 MiB; a multiple of 4096): "
              "the bytes in flight unacknowledged, which under --durable must cover an fsync.")
@click.option("--api", type=click.Choice(["per-record", "columnar"]), default=None)
@click.option("--chunk-records", type=click.IntRange(min=1), default=None,
              help="Records per send_batch call with --api columnar (default 1024).")
@click.option("--compression", type=click.Choice(["none", "gzip", "lz4", "zstd"]), default=None)
@click.option("--payload", type=click.Choice(["random", "telemetry"]), default=None)
@click.option("--poll-spin-us", type=click.IntRange(min=0, max=limits.poll_spin_us_max),
              default=None, help="The consumers' poll_spin_us: busy-poll this long before "
              "sleeping (default 0).")
@click.option("--worker-spin-us", type=click.IntRange(min=0), default=None,
              help="The embedded broker's worker_spin_us setting (default: the setting's "
              "default); not with --data-dir.")
@BROKER_SETTING_OPTION
@click.option("--durable/--no-durable", default=None,
              help="Acknowledge only fsynced records (the topics' flush_messages = 1).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Write everything measured here (JSON).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Draw throughput over time and the latency percentiles "
                                 "(PNG; needs the [plot] extra).")
@click.pass_context
def main(ctx: click.Context, data_dir: Path | None, workload_file: Path | None,
         json_path: Path | None, plot_path: Path | None, **options: Any) -> None:
    """Load-test shmbroker: producers and consumers, latency from the intended send time
    (coordinated omission corrected), every acknowledged record checked consumed."""
    if ctx.invoked_subcommand is not None:
        return
    settings = options.pop("broker_settings")
    worker_spin_us = options.pop("worker_spin_us")
    if worker_spin_us is not None:
        settings = {**settings, "worker_spin_us": worker_spin_us}
    if settings and data_dir is not None:
        raise click.UsageError("--worker-spin-us and --broker-setting set the embedded "
                               "broker's config; a broker already serving --data-dir keeps "
                               "its own config")
    try:
        workload = load_workload(workload_file) if workload_file else Workload()
        workload = workload.with_overrides(options)
    except ValueError as error:
        raise click.UsageError(str(error)) from None
    if plot_path is not None:
        _pyplot()
    from shmbroker.perf import runner

    def go(target: Path, pid: int | None) -> Any:
        return runner.run(workload, str(target), progress=_progress, broker_pid=pid)

    try:
        if data_dir is None:
            with embedded_broker(settings) as (target, pid):
                result = go(target, pid)
        else:
            if not (data_dir / "broker.sock").exists():
                raise click.ClickException(
                    f"no broker at {data_dir / 'broker.sock'} — start one with `shmbroker "
                    f"serve --data-dir {data_dir}` or leave out --data-dir")
            result = go(data_dir, _broker_pid(data_dir))
    except RuntimeError as error:
        raise click.ClickException(str(error)) from None
    if sys.stderr.isatty():
        sys.stderr.write("\n")
    for line in _summary(result):
        click.echo(line)
    if json_path is not None:
        json_path.write_bytes(orjson.dumps({**result.to_dict(),
                                            "environment": runner.environment()},
                                           option=orjson.OPT_INDENT_2))
    if plot_path is not None:
        _plot(result, plot_path)
    if result.lost:
        click.echo(f"\nLOST {result.lost:,} ACKNOWLEDGED RECORDS: they were never consumed",
                   err=True)
        sys.exit(1)


SCALE_GOALS = {4: 3.4, 8: 5.0}  # issue 5: speed-up over one partition
SCALE_CPU_KINDS = ("producers", "broker", "consumers")  # the scale table's CPU columns


def _partition_counts(ctx: click.Context, param: click.Parameter, value: str) -> list[int]:
    try:
        counts = [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of counts") from None
    if not counts or any(count < 1 for count in counts):
        raise click.BadParameter(f"{value!r}: give one or more partition counts >= 1")
    return counts


@main.command("scale")
@click.option("--partitions", "counts", default="1,2,4,8", show_default=True,
              callback=_partition_counts, help="Partition counts to run, comma-separated.")
@click.option("--rounds", type=click.IntRange(min=1), default=1, show_default=True,
              help="Repeat the sweep; counts alternate (1 2 4 8 1 2 4 8) and medians are kept.")
@click.option("--duration-s", type=click.FloatRange(min=0, min_open=True), default=10.0,
              show_default=True)
@click.option("--warmup-s", type=click.FloatRange(min=0), default=1.0, show_default=True)
@click.option("--api", type=click.Choice(["per-record", "columnar"]), default="columnar",
              show_default=True)
@click.option("--record-size-bytes", "record_size", default="100", show_default=True)
@click.option("--batch-size-bytes", type=click.IntRange(min=1),
              default=Workload.batch_size_bytes, show_default=True)
@click.option("--chunk-records", type=click.IntRange(min=1), default=Workload.chunk_records,
              show_default=True, help="Records per send_batch call (columnar).")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Use the broker already serving this data dir (default: an embedded one).")
@BROKER_SETTING_OPTION
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Write every run and the table here (JSON).")
def scale(counts: list[int], rounds: int, duration_s: float, warmup_s: float, api: str,
          record_size: str, batch_size_bytes: int, chunk_records: int, data_dir: Path | None,
          broker_settings: dict[str, Any], json_path: Path | None) -> None:
    """Speed-up with partitions: for each count N, N producers and N consumers, one partition
    each, as fast as they go.  Reports records/s and the ratio to one partition (goal: 4
    partitions >= 3.4x, 8 >= 5x, on a machine with cores to spare: 16 or more)."""
    from shmbroker.perf import runner

    if broker_settings and data_dir is not None:
        raise click.UsageError("--broker-setting sets the embedded broker's config; a broker "
                               "already serving --data-dir keeps its own config")
    try:
        workloads = {count: Workload(name=f"scale-{count}", partitions=count, producers=count,
                                     consumers=count, duration_s=duration_s, warmup_s=warmup_s,
                                     api=api, record_size=record_size,
                                     batch_size_bytes=batch_size_bytes,
                                     chunk_records=chunk_records) for count in counts}
    except ValueError as error:
        raise click.UsageError(str(error)) from None
    runs: list[dict[str, Any]] = []

    def sweep(target: Path, pid: int | None) -> None:
        for round_index in range(rounds):
            for count in counts:
                result = runner.run(workloads[count], str(target), broker_pid=pid)
                if result.lost:
                    raise click.ClickException(f"{result.lost:,} acknowledged records lost "
                                               f"with {count} partition(s)")
                runs.append({"round": round_index, "partitions": count,
                             "produce_per_s": result.produce_rate_per_s,
                             "consume_per_s": result.consume_rate_per_s,
                             "sent": result.sent, "acknowledged": result.acknowledged,
                             "consumed": result.consumed,
                             "p99_us": result.latency.percentile(99) / 1000
                             if result.latency.count else None,
                             **_cpu_medians(result)})
                click.echo(f"round {round_index} partitions {count}: produce "
                           f"{result.produce_rate_per_s:,.0f}/s consume "
                           f"{result.consume_rate_per_s:,.0f}/s", err=True)

    try:
        if data_dir is None:
            with embedded_broker(broker_settings) as (target, pid):
                sweep(target, pid)
        else:
            sweep(data_dir, _broker_pid(data_dir))
    except RuntimeError as error:
        raise click.ClickException(str(error)) from None
    table = _scale_table(runs, counts)
    click.echo(f"\n{os.cpu_count()} CPUs; {api} API, {record_size} B records, "
               f"{duration_s:g} s per run, medians of {rounds} round(s)"
               + "".join(f"; {name} = {value}" for name, value in broker_settings.items()))
    click.echo(f"{'partitions':>10}{'produce/s':>14}{'consume/s':>14}{'speed-up':>10}"
               f"{'CPU % per partition':>24}  goal")
    click.echo(f"{'':48}{'producer/broker/consumer':>24}")
    for row in table:
        goal = SCALE_GOALS.get(row["partitions"])
        verdict = "" if goal is None else (
            f">= {goal}x: {'met' if row['speed_up'] >= goal else 'NOT met'}")
        cpu = "/".join("-" if row.get(f"{kind}_cpu_pct") is None else
                       f"{row[f'{kind}_cpu_pct'] / row['partitions']:.0f}"
                       for kind in SCALE_CPU_KINDS)
        click.echo(f"{row['partitions']:>10}{row['produce_per_s']:>14,.0f}"
                   f"{row['consume_per_s']:>14,.0f}{row['speed_up']:>9.2f}x{cpu:>24}  {verdict}")
    if json_path is not None:
        json_path.write_bytes(orjson.dumps({"runs": runs, "table": table,
                                            "broker_settings": broker_settings,
                                            "environment": runner.environment()},
                                           option=orjson.OPT_INDENT_2))


def _cpu_medians(result: Any) -> dict[str, float]:
    """``{"producers_cpu_pct": ..., "broker_cpu_pct": ..., "consumers_cpu_pct": ...}`` of a
    run (the medians of its seconds), those that were measured."""
    medians = {**result.clients, **result.broker}
    return {f"{kind}_cpu_pct": medians[f"{kind}_cpu_pct_median"] for kind in SCALE_CPU_KINDS
            if f"{kind}_cpu_pct_median" in medians}


def _scale_table(runs: list[dict[str, Any]], counts: list[int]) -> list[dict[str, Any]]:
    """Per partition count: median rates; speed-up = the slower side's rate over one
    partition's (the first count's when 1 is not among them)."""
    import statistics

    rows = []
    for count in counts:
        mine = [run for run in runs if run["partitions"] == count]
        produce = statistics.median(run["produce_per_s"] for run in mine)
        consume = statistics.median(run["consume_per_s"] for run in mine)
        row = {"partitions": count, "produce_per_s": produce, "consume_per_s": consume,
               "rate_per_s": min(produce, consume)}
        for kind in SCALE_CPU_KINDS:  # CPU% of all the count's processes of a kind
            values = [run[f"{kind}_cpu_pct"] for run in mine if f"{kind}_cpu_pct" in run]
            if values:
                row[f"{kind}_cpu_pct"] = statistics.median(values)
        rows.append(row)
    base = rows[0]["rate_per_s"] or 1.0
    for row in rows:
        row["speed_up"] = row["rate_per_s"] / base
    return rows


def _fault_kinds(ctx: click.Context, param: click.Parameter, value: str) -> tuple[str, ...]:
    from shmbroker.perf.soak import FAULT_KINDS

    kinds = tuple(part.strip() for part in value.split(",") if part.strip())
    unknown = [kind for kind in kinds if kind not in FAULT_KINDS]
    if unknown or not kinds:
        raise click.BadParameter(f"{value!r}: give some of {', '.join(FAULT_KINDS)}")
    return kinds


@main.command("soak")
@click.option("--duration-s", type=click.FloatRange(min=1), default=600.0, show_default=True)
@click.option("--fault-interval-s", type=click.FloatRange(min=0.1), default=15.0,
              show_default=True, help="Mean time between faults (each interval is drawn "
                                      "uniformly from 0.5x to 1.5x of it).")
@click.option("--seed", type=int, default=None,
              help="Seed of the fault schedule (default: a random one, printed).")
@click.option("--faults", default="kill_worker,kill_all_workers,stop_worker,kill_supervisor,"
                                  "clean_restart,hard_restart,kill_producer,kill_member",
              show_default=True, callback=_fault_kinds, help="Fault kinds to draw from.")
@click.option("--partitions", type=click.IntRange(min=1, max=64), default=4, show_default=True)
@click.option("--producers", type=click.IntRange(min=1, max=64), default=3, show_default=True)
@click.option("--members-per-group", type=click.IntRange(min=1, max=64), default=2,
              show_default=True, help="Members of each of the two consumer groups.")
@click.option("--rate-per-producer", "rate", type=click.IntRange(min=1), default=1000,
              show_default=True, help="Records/s each producer sends.")
@click.option("--record-size-bytes", type=click.IntRange(min=24), default=100,
              show_default=True)
@click.option("--acks", type=click.Choice(["1", "all", "mixed"]), default="mixed",
              show_default=True, help="mixed: producers alternate acks=1 and acks=all.")
@click.option("--stop-worker-s", type=click.FloatRange(min=0), default=5.0, show_default=True,
              help="How long the stop_worker fault keeps a worker stopped.")
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Keep the broker's data dir and the run's files here (default: a temp dir, "
                   "removed after a run that passed).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Write the faults, counts and figures here (JSON).")
def soak(duration_s: float, fault_interval_s: float, seed: int | None, faults: tuple[str, ...],
         partitions: int, producers: int, members_per_group: int, rate: int,
         record_size_bytes: int, acks: str, stop_worker_s: float, work_dir: Path | None,
         json_path: Path | None) -> None:
    """A long run under faults: producers, two consumer groups, a broker it starts itself, and
    a fault every --fault-interval-s from a seeded random schedule.  Ends with a table of
    faults and recovery times, and every acknowledged record checked consumed by both groups
    (exit 1 if one was lost)."""
    import random

    from shmbroker.perf.soak import SoakConfig, report, run_soak

    if seed is None:
        seed = random.SystemRandom().randrange(1 << 31)
    if work_dir is not None and work_dir.exists() and any(work_dir.iterdir()):
        raise click.UsageError(f"--work-dir {work_dir} is not empty")
    config = SoakConfig(duration_s=duration_s, fault_interval_s=fault_interval_s, seed=seed,
                        faults=faults, partitions=partitions, producers=producers,
                        members_per_group=members_per_group, rate_per_producer_per_s=rate,
                        record_size_bytes=record_size_bytes, acks=acks,
                        stop_worker_s=stop_worker_s)
    click.echo(f"soak seed {seed} (replay: shmbroker-bench soak --seed {seed} "
               f"--duration-s {duration_s:g} --fault-interval-s {fault_interval_s:g} ...)",
               err=True)
    from shmbroker.perf import runner

    result = run_soak(config, work_dir, say=lambda line: click.echo(line, err=True))
    for line in report(result):
        click.echo(line)
    if json_path is not None:
        json_path.write_bytes(orjson.dumps({**result.to_dict(),
                                            "environment": runner.environment()},
                                           option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
    if not result.ok:
        if result.work_dir:
            click.echo(f"the run's files are kept in {result.work_dir}", err=True)
        sys.exit(1)


main.add_command(compare)  # shmbroker-bench compare: shmbroker vs Redis, NATS, raw


if __name__ == "__main__":
    main()
