"""The layering rules of STYLE.md hold (tools/check_layers.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_layers_hold() -> None:
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "check_layers.py")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout


def test_checker_catches_a_violation(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import check_layers
    finally:
        sys.path.pop(0)
    package = tmp_path / "shmbroker"
    (package / "format").mkdir(parents=True)
    (package / "storage").mkdir()
    (package / "storage" / "segment.py").write_text("from shmbroker.format import varint\n")
    (package / "format" / "probe.py").write_text(
        "import os\nfrom shmbroker.storage import segment\n")
    problems = check_layers.violations(package)
    assert any("probe.py:1: pure layer 'format' imports os" in p for p in problems)
    assert any("'format' imports 'storage'" in p for p in problems)
    assert not any("segment.py" in p for p in problems)
