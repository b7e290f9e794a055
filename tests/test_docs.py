"""The generated CLI reference matches the CLI."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_cli_reference_is_current() -> None:
    """docs/cli.md is what docs/cli_reference.py makes of the CLI today."""
    done = subprocess.run([sys.executable, str(ROOT / "docs" / "cli_reference.py"), "--check"],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
