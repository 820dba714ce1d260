"""benchmarks/kernels.py runs end to end: its smoke mode (tiny shapes, the CPU interpreter) checks every
fused op against its reference on a poisoned allocator and times every peer that exists here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "kernels.py"


def test_smoke_run_checks_and_times_every_fused_op() -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    checks = [line for line in result.stdout.splitlines() if "relative error" in line]
    assert len(checks) == 11 and all(line.endswith("(ok)") for line in checks), checks
    fused_rows = [line for line in result.stdout.splitlines() if "| l4lab fused |" in line]
    assert len(fused_rows) == 11  # 4 memory-bound, 4 attention, the MoE layer, the model twice
    assert not any("failed" in line for line in fused_rows), fused_rows
    assert "MISSED" not in result.stdout  # a smoke run evaluates no goal
