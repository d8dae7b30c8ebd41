"""How shmbroker starts Python child processes (the supervisor its workers, the benchmarks a
broker): ``python -P -m MODULE`` with ``PYTHONPATH`` led by the directory this shmbroker was
imported from.

So a child runs the very shmbroker of its parent: not one that the child's working directory
happens to hold (``-m`` would put the working directory first on ``sys.path``, ``-P`` does not;
a stray ``numpy.py`` or ``shmbroker/`` there would shadow the real one), and not another
installed version.  It also makes ``PYTHONPATH=/other/tree`` A/B benchmarks run the other tree
in every process, wherever they are started from.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

# the directory holding the shmbroker package this process imported (this file is in it)
PACKAGE_PARENT = str(Path(__file__).resolve().parent.parent)


def python_module(module: str, *arguments: str) -> list[str]:
    """The command that runs ``module`` as ``python -m`` would, without the working directory
    on ``sys.path``."""
    return [sys.executable, "-P", "-m", module, *arguments]


def child_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """``environ`` (default: this process's) with this shmbroker's directory first on
    ``PYTHONPATH``."""
    environment = dict(os.environ if environ is None else environ)
    rest = environment.get("PYTHONPATH", "")
    environment["PYTHONPATH"] = PACKAGE_PARENT + (os.pathsep + rest if rest else "")
    return environment


def join_or_kill(processes: Iterable[Any], timeout_s: float) -> None:
    """Wait up to ``timeout_s`` for each ``multiprocessing`` child to end (None entries are
    skipped), then kill (SIGKILL) and reap the ones still alive: a benchmark's clean-up."""
    for process in processes:
        if process is None:
            continue
        process.join(timeout_s)
        if process.is_alive():
            process.kill()
            process.join()
