"""SIGKILL at random moments of repeated saves and of training runs (benchmarks/faults.py, a few kills
here, about 50 there): every kill leaves a checkpoint equal to a completed save, and debris does not
accumulate. Each experiment stops starting kills after its deadline, and every process it starts is
killed and waited for."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "faults.py"


@pytest.fixture(scope="module")
def faults():
    spec = importlib.util.spec_from_file_location("l4lab_faults", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["l4lab_faults"] = module
    sys.path.insert(0, str(SCRIPT.parent))  # the script imports benchmarks/machine.py beside it
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(SCRIPT.parent))
    yield module
    del sys.modules["l4lab_faults"]


@pytest.mark.skipif(sys.platform == "win32", reason="fork and SIGKILL")
def test_killed_saves_and_training_runs_leave_a_whole_checkpoint(faults, tmp_path: Path) -> None:
    with faults.Zygote(tmp_path) as zygote:
        saves = faults.save_kills(zygote, tmp_path, kills=6, deadline_s=120, seed=1)
        training = faults.train_kills(zygote, tmp_path, kills=4, deadline_s=180, seed=1)
    for tally in (saves, training):
        assert tally.failures == []
        assert tally.kills >= 3 and tally.survived == tally.kills
        assert tally.max_staging <= 1 and tally.max_journals <= 1  # each save clears the last one's debris
    assert training.chains_exact == training.chains
