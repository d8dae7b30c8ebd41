"""``shmbroker-bench compare``: one workload, in one run, against shmbroker and its peers.

Systems (``--systems``, default all of them):

==================== ===========================================================================
shmbroker            an embedded broker, per-record API (``send`` / ``poll``), acks 1, linger 5 ms
shmbroker-columnar   the same broker, columnar API (``send_batch`` / ``poll_columnar``)
redis                Redis Streams (:mod:`shmbroker.perf.peers.redis_streams`)
nats                 NATS JetStream (:mod:`shmbroker.perf.peers.nats_jetstream`)
raw                  pre-encoded batches over a Unix socket: the wire ceiling
                     (:mod:`shmbroker.perf.peers.raw_socket`)
==================== ===========================================================================

Each run starts the system's server afresh in a temp dir, runs one producer process and one
consumer process (consuming while producing, so latency is end to end, from each record's
intended send time) and stops the server.  Rounds alternate the systems (A B C A B C ...) so
that a machine's slow minute hits every system, and the table quotes medians over the rounds;
the ratio to shmbroker is the median of the per-round ratios (each against the shmbroker run
of the same round).  Every system's records are checked consumed, by count and by sequence
number; a run that lost acknowledged records is reported and the command exits 1.

The tool installs nothing: a peer whose server or client is missing is skipped with the
command that installs it.
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Any

import click
import orjson

from shmbroker import __version__
from shmbroker.perf import runner as shm_runner
from shmbroker.perf.workload import Workload

SHMBROKER_SYSTEMS = {"shmbroker": "per-record", "shmbroker-columnar": "columnar"}
SYSTEMS = ("shmbroker", "shmbroker-columnar", "redis", "nats", "raw")
BASELINE = "shmbroker"  # ratios are against the per-record API
GOAL_RATIO = 15.0  # issue 5: the per-record API >= 15x Redis Streams' produce and consume rates
GOAL_PEER = "redis"
TITLES = {"shmbroker": "shmbroker per-record", "shmbroker-columnar": "shmbroker columnar"}


def parse_systems(value: str) -> list[str]:
    """``"redis,shmbroker"`` -> ``["redis", "shmbroker"]``; ValueError names an unknown one."""
    names: list[str] = []
    for part in value.split(","):
        name = part.strip()
        if not name:
            continue
        if name not in SYSTEMS:
            raise ValueError(f"unknown system {name!r}; choose from {', '.join(SYSTEMS)}")
        if name not in names:
            names.append(name)
    if not names:
        raise ValueError(f"name one or more systems: {', '.join(SYSTEMS)}")
    return names


def plan(systems: list[str]) -> tuple[list[str], dict[str, str]]:
    """The systems that can run here, and for each that cannot, why and how to install it."""
    from shmbroker.perf.peers import PEERS

    runnable: list[str] = []
    skipped: dict[str, str] = {}
    for name in systems:
        reason = PEERS[name].missing() if name in PEERS else None
        if reason is None:
            runnable.append(name)
        else:
            skipped[name] = reason
    return runnable, skipped


def title(system: str) -> str:
    from shmbroker.perf.peers import PEERS

    return TITLES.get(system) or PEERS[system].title


def describe(system: str, workload: Workload) -> str:
    from shmbroker.perf.peers import PEERS

    if system in SHMBROKER_SYSTEMS:
        calls = ("send / poll" if SHMBROKER_SYSTEMS[system] == "per-record"
                 else "send_batch / poll_columnar")
        return (f"embedded broker, 1 partition, shared-memory ring produce, Unix-socket fetch; "
                f"{calls}, acks {workload.acks}, linger {workload.linger_ms} ms, batch "
                f"{workload.batch_size_bytes} B")
    return PEERS[system].describe()


def run_system(system: str, workload: Workload) -> shm_runner.RunResult:
    """One run of ``workload`` against ``system``, its server started and stopped around it."""
    if system in SHMBROKER_SYSTEMS:
        from shmbroker.perf.cli import embedded_broker

        with embedded_broker() as (data_dir, pid):
            return shm_runner.run(workload.replace(api=SHMBROKER_SYSTEMS[system]),
                                  str(data_dir), broker_pid=pid)
    from shmbroker.perf.peers import PEERS
    from shmbroker.perf.peers import runner as peer_runner

    return peer_runner.run(PEERS[system], workload)


def run_row(system: str, round_index: int, result: shm_runner.RunResult) -> dict[str, Any]:
    """What one run contributes to the table and the JSON."""
    latency = result.latency
    return {
        "system": system, "round": round_index,
        "produce_per_s": result.produce_rate_per_s, "consume_per_s": result.consume_rate_per_s,
        "produce_mb_per_s": result.produce_mb_per_s, "consume_mb_per_s": result.consume_mb_per_s,
        "p50_us": latency.percentile(50) / 1000 if latency.count else None,
        "p99_us": latency.percentile(99) / 1000 if latency.count else None,
        "sent": result.sent, "acknowledged": result.acknowledged, "consumed": result.consumed,
        "lost": result.lost, "duplicates": result.duplicates,
        "send_errors": result.send_errors,
        "server_cpu_pct": result.broker.get("broker_cpu_pct_median"),
        "server_rss_bytes_max": result.broker.get("broker_rss_bytes_max"),
        "latency_histogram": latency.to_dict(),
    }


def _median(values: list[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return statistics.median(present) if present else None


def summarise(runs: list[dict[str, Any]], systems: list[str]) -> list[dict[str, Any]]:
    """Per system: medians over its rounds, and the median of per-round ratios
    (shmbroker per-record's rate over the system's, both from the same round)."""
    base = {run["round"]: run for run in runs if run["system"] == BASELINE}
    rows = []
    for system in systems:
        mine = [run for run in runs if run["system"] == system]
        if not mine:
            continue
        ratios: dict[str, float | None] = {}
        spreads: dict[str, list[float] | None] = {}
        for side in ("produce", "consume"):
            per_round = [base[run["round"]][f"{side}_per_s"] / run[f"{side}_per_s"]
                         for run in mine if run["round"] in base and run[f"{side}_per_s"] > 0]
            ratios[side] = statistics.median(per_round) if per_round else None
            spreads[side] = [min(per_round), max(per_round)] if per_round else None
        rows.append({
            "system": system, "title": title(system), "rounds": len(mine),
            "produce_per_s": _median([run["produce_per_s"] for run in mine]),
            "consume_per_s": _median([run["consume_per_s"] for run in mine]),
            "mb_per_s": _median([run["consume_mb_per_s"] for run in mine]),
            "p50_us": _median([run["p50_us"] for run in mine]),
            "p99_us": _median([run["p99_us"] for run in mine]),
            "server_cpu_pct": _median([run["server_cpu_pct"] for run in mine]),
            "shmbroker_x_produce": ratios["produce"],
            "shmbroker_x_consume": ratios["consume"],
            # the lowest and highest per-round ratio: how far the noise moved them
            "shmbroker_x_produce_range": spreads["produce"],
            "shmbroker_x_consume_range": spreads["consume"],
            "lost": sum(run["lost"] for run in mine),
            "duplicates": sum(run["duplicates"] for run in mine)})
    return rows


def goal(rows: list[dict[str, Any]], paced: bool = False) -> dict[str, Any]:
    """Issue 5's goal: the per-record API at >= GOAL_RATIO x Redis Streams' rates, both sides
    (not judged, ``met`` None, without both systems or in a paced run, whose rates are the
    pace)."""
    peer = next((row for row in rows if row["system"] == GOAL_PEER), None)
    verdict: dict[str, Any] = {"ratio_min": GOAL_RATIO, "peer": GOAL_PEER, "met": None,
                               "produce_ratio": None, "consume_ratio": None}
    if paced or peer is None or not any(row["system"] == BASELINE for row in rows):
        return verdict
    verdict["produce_ratio"] = peer["shmbroker_x_produce"]
    verdict["consume_ratio"] = peer["shmbroker_x_consume"]
    if verdict["produce_ratio"] is not None and verdict["consume_ratio"] is not None:
        verdict["met"] = min(verdict["produce_ratio"], verdict["consume_ratio"]) >= GOAL_RATIO
    return verdict


def _number(value: float | None, scale: float = 1.0, digits: int = 0) -> str:
    return "-" if value is None else f"{value / scale:,.{digits}f}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def table_lines(rows: list[dict[str, Any]]) -> list[str]:
    header = (f"{'system':<22}{'produce rec/s':>15}{'consume rec/s':>15}{'MB/s':>8}"
              f"{'p50 ms':>9}{'p99 ms':>9}{'server CPU%':>12}{'shm x prod':>11}"
              f"{'shm x cons':>11}{'lost':>6}")
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(
            f"{row['title']:<22}{_number(row['produce_per_s']):>15}"
            f"{_number(row['consume_per_s']):>15}{_number(row['mb_per_s'], digits=1):>8}"
            f"{_number(row['p50_us'], 1000, 2):>9}{_number(row['p99_us'], 1000, 2):>9}"
            f"{_number(row['server_cpu_pct']):>12}{_ratio(row['shmbroker_x_produce']):>11}"
            f"{_ratio(row['shmbroker_x_consume']):>11}{row['lost']:>6,}")
    return lines


def environment(systems: list[str]) -> dict[str, Any]:
    """The machine and the versions of everything that ran."""
    from shmbroker.perf.peers import PEERS

    versions = {"python": platform.python_version(), "shmbroker": __version__}
    for name in systems:
        if name in PEERS:
            versions.update(PEERS[name].versions())
    cpu_model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    return {**shm_runner.environment(), "cpu_model": cpu_model, "versions": versions,
            "load_average": list(os.getloadavg())}


def _systems_option(ctx: click.Context, param: click.Parameter, value: str) -> list[str]:
    try:
        return parse_systems(value)
    except ValueError as error:
        raise click.BadParameter(str(error)) from None


@click.command("compare")
@click.option("--systems", default=",".join(SYSTEMS), show_default=True,
              callback=_systems_option, help="Systems to run, comma-separated, in this order.")
@click.option("--rounds", type=click.IntRange(min=1), default=3, show_default=True,
              help="Repeat; systems alternate each round and medians are kept.")
@click.option("--record-size-bytes", "record_size", default="100", show_default=True,
              help="Value size: fixed (100) or uniform in a range (64-1024); >= 24.")
@click.option("--duration-s", type=click.FloatRange(min=0, min_open=True), default=5.0,
              show_default=True, help="Measured seconds of each run.")
@click.option("--warmup-s", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="Seconds before those, not measured.")
@click.option("--rate-per-sec", type=click.IntRange(min=0), default=0, show_default=True,
              help="Records/s the producer is paced at; 0 = as fast as each system goes.")
@click.option("--payload", type=click.Choice(["random", "telemetry"]), default="random",
              show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Write every run, the table and the environment here (JSON).")
def compare(systems: list[str], rounds: int, record_size: str, duration_s: float,
            warmup_s: float, rate_per_sec: int, payload: str, json_path: Path | None) -> None:
    """The same workload against shmbroker (per-record and columnar APIs), Redis Streams,
    NATS JetStream and a raw Unix-socket baseline: one producer and one consumer process each,
    rounds alternating the systems; prints produce and consume records/s, MB/s, p50/p99
    latency and the ratio to shmbroker's per-record API (goal: >= 15x Redis Streams).  Exit
    status 1 when a run lost acknowledged records."""
    try:
        workload = Workload(name="compare", record_size=record_size, duration_s=duration_s,
                            warmup_s=warmup_s, rate_per_sec=rate_per_sec, payload=payload)
    except ValueError as error:
        raise click.UsageError(str(error)) from None
    runnable, skipped = plan(systems)
    for name, reason in skipped.items():
        click.echo(f"{name}: skipped — {reason}")
    if not runnable:
        raise click.ClickException("no system to run: every one asked for was skipped")
    runs: list[dict[str, Any]] = []
    for round_index in range(rounds):
        for system in runnable:
            try:
                result = run_system(system, workload)
            except RuntimeError as error:
                raise click.ClickException(f"{system}, round {round_index + 1}: {error}") \
                    from None
            row = run_row(system, round_index, result)
            runs.append(row)
            click.echo(f"round {round_index + 1}/{rounds} {system}: produce "
                       f"{row['produce_per_s']:,.0f}/s consume {row['consume_per_s']:,.0f}/s "
                       f"p99 {_number(row['p99_us'], 1000, 2)} ms, records sent "
                       f"{row['sent']:,} consumed {row['consumed']:,} lost {row['lost']:,}",
                       err=True)
    rows = summarise(runs, runnable)
    verdict = goal(rows, paced=rate_per_sec > 0)
    click.echo("")
    click.echo(f"{os.cpu_count()} CPUs; {record_size} B {payload} records, 1 producer + 1 "
               f"consumer process, "
               + (f"{rate_per_sec:,} records/s" if rate_per_sec else "as fast as each goes")
               + f", {duration_s:g} s measured (+{warmup_s:g} s warm-up) per run; medians of "
               f"{rounds} round(s); 'shm x': shmbroker per-record's rate / the system's "
               f"(median of per-round ratios)")
    for line in table_lines(rows):
        click.echo(line)
    if verdict["met"] is not None:
        click.echo(f"goal: shmbroker per-record >= {GOAL_RATIO:g}x Redis Streams' produce and "
                   f"consume: {verdict['produce_ratio']:.2f}x and {verdict['consume_ratio']:.2f}x"
                   f" — {'met' if verdict['met'] else 'NOT met'}")
    for name, reason in skipped.items():
        click.echo(f"{name}: skipped — {reason}")
    if json_path is not None:
        json_path.write_bytes(orjson.dumps({
            "config": {"systems": systems, "rounds": rounds, "record_size": record_size,
                       "duration_s": duration_s, "warmup_s": warmup_s,
                       "rate_per_sec": rate_per_sec, "payload": payload,
                       "setups": {name: describe(name, workload) for name in runnable}},
            "runs": runs, "table": rows, "goal": verdict, "skipped": skipped,
            "environment": environment(runnable)}, option=orjson.OPT_INDENT_2))
    lost = sum(row["lost"] for row in rows)
    if lost:
        lossy = ", ".join(f"{row['system']} ({row['lost']:,})" for row in rows if row["lost"])
        click.echo(f"\nLOST {lost:,} ACKNOWLEDGED RECORDS: they were never consumed — {lossy}",
                   err=True)
        sys.exit(1)
