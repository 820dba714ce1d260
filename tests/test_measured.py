"""The committed results the notebooks read: one lookup, every name a notebook asks for is there, and a
missing one is named with what exists. (That the wheel ships them: tests/test_classroom.py.)"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import l4lab
from l4lab.measured import committed_results, results_folder

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(ROOT.glob("notebooks/**/*.ipynb"))


def names_read_by_notebooks() -> set[str]:
    """Every ``committed_results("...")`` in a notebook's code cells."""
    names = set()
    for path in NOTEBOOKS:
        for cell in json.loads(path.read_text())["cells"]:
            if cell["cell_type"] == "code":
                names.update(re.findall(r'committed_results\("([^"]+)"\)', "".join(cell["source"])))
    return names


def test_in_a_clone_the_results_are_benchmarks_results() -> None:
    assert results_folder() == ROOT / "benchmarks" / "results"


def test_every_result_a_notebook_reads_is_committed() -> None:
    names = names_read_by_notebooks()
    # 03, 04, 07, 08 and 09 each read at least one
    assert {"moe_seeds", "induction_sweep", "multimodal_fusion", "passkey", "herd"} <= names
    for name in names:
        assert committed_results(name) == json.loads(
            (ROOT / "benchmarks/results" / f"{name}.json").read_text()
        )


def test_no_notebook_reads_results_by_a_path_of_its_own() -> None:
    """A hand-built path (``Path(l4lab.__file__).parents[1] / "benchmarks" ...``) works in a clone only."""
    for path in NOTEBOOKS:
        for cell in json.loads(path.read_text())["cells"]:
            source = "".join(cell["source"])
            if cell["cell_type"] == "code":
                assert "parents[1]" not in source and '"benchmarks' not in source, path.name


def test_a_missing_result_is_named_with_the_script_and_what_exists() -> None:
    with pytest.raises(FileNotFoundError) as raised:
        committed_results("no_such_script")
    message = str(raised.value)
    assert "'no_such_script'" in message and "benchmarks/no_such_script.py" in message
    assert "moe_seeds" in message  # what there is instead


def test_the_installed_package_folder_comes_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In a wheel, ``l4lab/benchmark_results`` holds them (no ``benchmarks/`` beside the package)."""
    package = tmp_path / "site-packages" / "l4lab"
    (package / "benchmark_results").mkdir(parents=True)
    (package / "benchmark_results" / "herd.json").write_text('{"from": "wheel"}')
    monkeypatch.setattr(l4lab, "__file__", str(package / "__init__.py"))
    assert committed_results("herd") == {"from": "wheel"}
    (package / "benchmark_results" / "herd.json").unlink()
    (package / "benchmark_results").rmdir()
    with pytest.raises(FileNotFoundError, match="Reinstall l4lab from its wheel"):
        results_folder()
