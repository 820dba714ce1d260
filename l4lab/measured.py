"""Results measured by runs longer than a notebook can afford, which the notebooks draw and check.

The scripts in ``benchmarks/`` (five seeds of 03's training, the herd of routers, the induction and
passkey sweeps, the fusion variants...) write ``benchmarks/results/<name>.json``, and the repository
commits them. The wheel ships the same files as package data (``l4lab/benchmark_results/``), so that a
notebook reads them the same way in a clone and in a classroom's install: through
:func:`committed_results`, never through a path of its own.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from l4lab.classroom import shipped_folder


def results_folder() -> Path:
    """The committed results: ``l4lab/benchmark_results`` in an installed wheel, or the clone's
    ``benchmarks/results`` beside ``l4lab/`` when l4lab runs from a clone."""
    return shipped_folder("benchmark_results", "benchmarks/results")


def committed_results(name: str) -> dict[str, Any]:
    """A benchmark's committed results, ``benchmarks/results/<name>.json`` (``benchmarks/<name>.py``
    writes it): e.g. ``"moe_seeds"`` (03), ``"induction_sweep"`` (04, lab 5), ``"multimodal_fusion"``
    (07), ``"induction_sweep_256"``, ``"long_prefill"``, ``"passkey"`` (08), ``"herd"`` (09)."""
    folder = results_folder()
    path = folder / f"{name}.json"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in folder.glob("*.json")))
        raise FileNotFoundError(
            f"no committed results named {name!r} in {folder} (python benchmarks/{name}.py writes it); "
            f"there are: {known}"
        )
    return json.loads(path.read_text())


__all__ = ["committed_results", "results_folder"]
