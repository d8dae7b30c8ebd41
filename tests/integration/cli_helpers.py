"""Running the ``shmbroker`` CLI in-process in tests (click's CliRunner), and checking how it
ended: the helpers of test_cli.py and test_groups_cli.py."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner, Result

from shmbroker.cli import main


def cli(data_dir: Path, *args: str, input: bytes | None = None) -> Result:
    """Run ``shmbroker ARGS --data-dir DATA_DIR`` in-process (exceptions stay in the result)."""
    return CliRunner().invoke(main, [*args, "--data-dir", str(data_dir)], input=input)


def ok(result: Result) -> Result:
    assert result.exit_code == 0, (result.exit_code, result.output, result.exception)
    return result


def failed(result: Result, code: int = 1) -> str:
    """The error text of a run that exited ``code``; never a traceback."""
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    if code == 1:
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    return result.stderr
