"""benchmarks/recording.py: workers side by side share a sweep's cells without running one twice, and a
result is either whole on disk or absent. (benchmarks/machine.py: the header every result carries.)"""

from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def recording():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import machine
        import recording

        yield recording, machine
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_two_workers_share_the_cells_and_each_runs_once(recording, tmp_path: Path) -> None:
    record, _ = recording
    cells = [tmp_path / "sweep" / f"cell{i}.json" for i in range(5)]
    first, second = record.unclaimed(cells), record.unclaimed(cells)
    ran: dict[str, list[str]] = {"first": [], "second": []}
    for worker, name in [(first, "first"), (second, "second")] * 5:  # interleaved, as two processes
        path = next(worker, None)
        if path is not None:
            ran[name].append(path.name)
            record.write_cell(path, {"cell": path.name, "worker": name})
    assert sorted(ran["first"] + ran["second"]) == sorted(p.name for p in cells)
    assert ran["first"] and ran["second"] and not set(ran["first"]) & set(ran["second"])
    assert not list((tmp_path / "sweep").glob("*.claimed"))  # every claim released
    assert json.loads(cells[0].read_text())["cell"] == "cell0.json"


def test_written_and_claimed_cells_are_skipped(recording, tmp_path: Path) -> None:
    record, _ = recording
    written, claimed, free = (tmp_path / f"{name}.json" for name in ("written", "claimed", "free"))
    written.write_text("{}")
    claimed.with_suffix(".claimed").touch()  # a worker still on it, or killed: deleted by hand
    assert list(record.unclaimed([written, claimed, free])) == [free]
    assert free.with_suffix(".claimed").exists()  # claimed while yielded


def test_summary_is_json_and_markdown(recording, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    record, _ = recording
    base = tmp_path / "results" / "sweep"
    record.write_summary(base, {"rows": [1, 2]}, "# Sweep\n")
    assert json.loads(base.with_suffix(".json").read_text()) == {"rows": [1, 2]}
    assert base.with_suffix(".md").read_text() == "# Sweep\n" and "# Sweep" in capsys.readouterr().out
    assert sorted(p.name for p in base.parent.iterdir()) == ["sweep.json", "sweep.md"]  # no staging left


def test_the_machine_header_says_when_and_on_what(recording) -> None:
    _, machine = recording
    import torch

    header = machine.machine()
    assert header["date"] == datetime.date.today().isoformat()
    assert header["threads"] == str(torch.get_num_threads()) and header["torch"] == torch.__version__
    assert float(header["load_average_1min"]) >= 0
