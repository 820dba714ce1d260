"""Writing a benchmark's results: the cells of a sweep, shared by workers, and the summary.

A sweep is a list of cells, one trained model and one JSON file each. Workers started side by side share
it: each claims its next cell with an empty ``<cell>.claimed`` file, created atomically, and skips the
cells already written or claimed by another; a killed worker leaves its claim behind, to be deleted by
hand before a rerun. Every file is written by ``l4lab.storage.atomic_write_text``, so a run killed
half-way leaves the previous file or the new one, never half of one.

Imported by the scripts beside it (``python benchmarks/x.py`` puts this folder on ``sys.path``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from l4lab.storage import atomic_write_text


def unclaimed(cells: Iterable[Path]) -> Iterator[Path]:
    """The cells of ``cells`` neither written nor claimed by another worker, each claimed as it is
    yielded; :func:`write_cell` releases the claim."""
    for path in cells:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            continue
        try:
            path.with_suffix(".claimed").touch(exist_ok=False)  # atomic: one worker per cell
        except FileExistsError:
            continue
        yield path


def write_cell(path: Path, result: dict[str, Any]) -> None:
    """One cell's result as JSON, then its claim released."""
    atomic_write_text(path, json.dumps(result, indent=1) + "\n")
    path.with_suffix(".claimed").unlink()


def write_summary(base: Path, summary: dict[str, Any], markdown: str) -> None:
    """``base``.json (the data the notebooks read) and ``base``.md (the table for readers), printed too."""
    atomic_write_text(base.with_suffix(".json"), json.dumps(summary, indent=1) + "\n")
    atomic_write_text(base.with_suffix(".md"), markdown)
    print(markdown)
