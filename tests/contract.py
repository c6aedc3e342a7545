"""The shared I/O-contract checker run on an out-root (skipped when it is not beside this
checkout)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

CHECKER = Path(__file__).resolve().parents[2] / "shared" / "tools" / "check_contract.py"


def assert_contract_holds(out_root: str | Path) -> None:
    """Run the contract checker on ``out_root``; fail with its report when it fails."""
    if not CHECKER.exists():
        pytest.skip("the shared contract checker is not beside this checkout")
    res = subprocess.run([sys.executable, str(CHECKER), str(out_root)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
