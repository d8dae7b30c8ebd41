"""The ``shmbroker`` command line.

Exit codes: 0 ok, 1 an error (one line on stderr), 2 usage (click's own).
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from shmbroker import __version__


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
    like kafka-dump-log.sh."""
    from shmbroker.dump_log import DumpResult, dump_segment, segment_paths

    results: list[tuple[Path, DumpResult]] = []
    for path in paths:
        for segment in segment_paths(path):
            result = DumpResult()
            try:
                dump_segment(segment, click.echo, print_data=print_data, result=result)
            except BrokenPipeError:
                sys.exit(1)
            except OSError as error:
                click.echo(f"error: cannot read {segment}: {error.strerror}", err=True)
                sys.exit(1)
            results.append((segment, result))
    bad = [(segment, result) for segment, result in results if result.errors]
    total_batches = sum(result.batches for _, result in results)
    click.echo(f"Checked {len(results)} segment(s), {total_batches} batch(es): "
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
def serve(data_dir: Path | None, config_file: str | None, log_level: str) -> None:
    """Run the broker in the foreground until SIGTERM or Ctrl-C."""
    import logging

    from shmbroker.config import BrokerConfig
    from shmbroker.errors import ShmbrokerError
    from shmbroker.supervisor.supervisor import default_data_dir, run

    logging.basicConfig(level=log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
    try:
        config = BrokerConfig.load(config_file)
        code = run(data_dir or default_data_dir(), config, log_level.upper())
    except ShmbrokerError as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(1)
    sys.exit(code)


if __name__ == "__main__":
    main()
