#!/usr/bin/env python3
"""Check that shmbroker's layering holds (STYLE.md, "Dependencies point one way").

* pure layers (``shmbroker.format``, ``shmbroker.protocol``, ``shmbroker.coordinator``) import no
  ``os``, ``socket``, ``mmap``, ``multiprocessing``, ``selectors`` or ``threading``;
* a layer imports only layers below it: format < {protocol, storage, shm} < transport <
  {partition, coordinator, replication} < supervisor < server; client imports protocol, format,
  shm, transport and the top-level modules only.

Run: ``python tools/check_layers.py`` (exit 1 and a list of violations on failure).  The test
suite runs it too.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "shmbroker"
PURE = {"format", "protocol", "coordinator"}
IO_MODULES = {"os", "socket", "mmap", "multiprocessing", "selectors", "threading", "subprocess"}
RANK = {"format": 0, "protocol": 1, "storage": 1, "shm": 1, "transport": 2, "partition": 3,
        "coordinator": 3, "replication": 3, "supervisor": 4, "server": 5}
CLIENT_ALLOWED = {"protocol", "format", "shm", "transport", "client"}


def imports_of(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def violations(root: Path = ROOT) -> list[str]:
    problems = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if len(relative.parts) < 2:
            continue  # top-level modules (errors, limits, config, cli) are shared
        layer = relative.parts[0]
        for line, module in imports_of(path):
            top = module.split(".")[0]
            if layer in PURE and top in IO_MODULES:
                problems.append(f"{relative}:{line}: pure layer '{layer}' imports {module}")
            if top != "shmbroker" or module.count(".") < 1:
                continue
            target = module.split(".")[1]
            if target == layer or target not in RANK and target != "client":
                continue
            if layer == "client":
                if target not in CLIENT_ALLOWED:
                    problems.append(f"{relative}:{line}: client imports {module}")
            elif layer in RANK and target in RANK and RANK[target] >= RANK[layer]:
                problems.append(f"{relative}:{line}: '{layer}' imports '{target}', which is "
                                f"not below it")
            elif layer in RANK and target == "client":
                problems.append(f"{relative}:{line}: broker layer '{layer}' imports the client")
    return problems


def main() -> int:
    problems = violations()
    for problem in problems:
        print(problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
