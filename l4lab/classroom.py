"""Notebooks for a class: the guided notebooks and the labs ship inside the package, and
``python -m l4lab notebooks DIR`` copies them into a folder the student owns::

    python -m l4lab notebooks ~/l4lab                          # the chapters and the lab exercises
    python -m l4lab notebooks ~/l4lab-teacher --solutions      # the same and the labs' worked solutions

The copy keeps the repository's layout: the chapters (``00_tour.ipynb`` ...) at the top, the lab
exercises in ``labs/``, and, only with ``--solutions``, the worked solutions in ``labs/solutions/``, so a
student's folder holds no solution unless someone asks for one.

A student's work is never lost. Running the command again (after upgrading l4lab, say) adds what is
missing, updates a notebook the student has not changed since it was copied, and keeps a notebook the
student edited, saying so. ``--overwrite`` replaces edited notebooks too, after moving each one to
``<name>.ipynb.bak`` (``.bak2``, ``.bak3``... when that exists). What was copied is recorded, with a
sha256 per file, in ``.l4lab-notebooks.json`` in the folder; that is how an edit is told from an older
copy. Files are written with ``l4lab.storage.replace_files`` (staged, fsynced, renamed into place).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import l4lab
from l4lab.storage import atomic_write_text, replace_files

MANIFEST = ".l4lab-notebooks.json"
ACTIONS = ("added", "updated", "unchanged", "kept", "replaced")

__all__ = [
    "ACTIONS",
    "MANIFEST",
    "Copied",
    "copy_notebooks",
    "describe",
    "notebook_files",
    "shipped_folder",
    "shipped_notebooks",
]


@dataclass(frozen=True)
class Copied:
    """What :func:`copy_notebooks` did with one notebook: ``path`` relative to the folder; ``action``
    one of :data:`ACTIONS`; ``backup``: where the student's edited version went ("replaced" only)."""

    path: str
    action: str
    backup: str | None = None


def shipped_folder(in_wheel: str, in_clone: str, marker: str = "") -> Path:
    """A folder l4lab ships as package data: ``l4lab/<in_wheel>`` in an installed wheel, or ``<in_clone>``
    beside ``l4lab/`` when l4lab runs from a clone; the first that holds the folder ``marker`` (by default,
    the first that exists)."""
    package = Path(l4lab.__file__).resolve().parent
    candidates = (package / in_wheel, package.parent / in_clone)
    for candidate in candidates:
        if (candidate / marker).is_dir():
            return candidate
    raise FileNotFoundError(
        f"no {in_wheel} ship with this l4lab ({package}): neither {candidates[0] / marker} nor "
        f"{candidates[1] / marker} exists. Reinstall l4lab from its wheel, or run from a clone"
    )


def shipped_notebooks() -> Path:
    """The folder of notebooks l4lab ships: ``l4lab/notebooks`` in an installed wheel, or the clone's
    ``notebooks/`` beside ``l4lab/`` when l4lab runs from a clone."""
    return shipped_folder("notebooks", "notebooks", marker="labs")


def notebook_files(solutions: bool = False) -> list[str]:
    """The shipped notebooks as paths relative to :func:`shipped_notebooks`: the chapters, then the lab
    exercises, then (``solutions=True``) the labs' worked solutions."""
    root = shipped_notebooks()
    patterns = ["[0-9][0-9]_*.ipynb", "labs/lab*.ipynb"] + (
        ["labs/solutions/lab*.ipynb"] if solutions else []
    )
    return [path.relative_to(root).as_posix() for pattern in patterns for path in sorted(root.glob(pattern))]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_manifest(directory: Path) -> dict[str, str]:
    path = directory / MANIFEST
    if not path.is_file():
        return {}
    try:
        files = json.loads(path.read_text(encoding="utf-8")).get("files", {})
    except (ValueError, AttributeError):
        return {}  # unreadable: every differing notebook then counts as edited, which keeps it
    return {name: digest for name, digest in files.items() if isinstance(digest, str)}


def _backup_name(target: Path) -> Path:
    for number in range(1, 1000):
        candidate = target.with_name(target.name + (".bak" if number == 1 else f".bak{number}"))
        if not candidate.exists():
            return candidate
    raise FileExistsError(f"{target}: .bak to .bak999 all exist; move some away")


def copy_notebooks(
    directory: str | os.PathLike[str], solutions: bool = False, overwrite: bool = False
) -> list[Copied]:
    """Copy the shipped notebooks into ``directory`` (created if needed) and say what happened to each.

    A notebook missing there is added; one equal to the shipped version is unchanged; one still equal to
    what an earlier run copied (the student has not edited it) is updated; any other is the student's
    and is kept, unless ``overwrite``: then it is moved to ``<name>.ipynb.bak`` and replaced.
    ``solutions`` adds the labs' worked solutions (``labs/solutions/``).
    """
    directory = Path(directory).expanduser()
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"{directory} is a file, not a folder: choose a folder for the notebooks")
    root = shipped_notebooks()
    recorded = _read_manifest(directory)
    manifest: dict[str, str] = dict(recorded)
    results: list[Copied] = []
    writes: dict[Path, list[tuple[str, bytes]]] = {}  # folder -> (file name, content)
    for name in notebook_files(solutions):
        data = (root / name).read_bytes()
        target = directory / name
        digest = _sha256(data)
        if not target.exists():
            action, backup = "added", None
        else:
            current = _sha256(target.read_bytes())
            if current == digest:
                manifest[name] = digest
                results.append(Copied(name, "unchanged"))
                continue
            if recorded.get(name) == current:
                action, backup = "updated", None
            elif overwrite:
                moved = _backup_name(target)
                os.replace(target, moved)  # the student's version first, so that it survives any failure
                action, backup = "replaced", moved.relative_to(directory).as_posix()
            else:
                results.append(Copied(name, "kept"))
                continue
        writes.setdefault(target.parent, []).append((target.name, data))
        manifest[name] = digest
        results.append(Copied(name, action, backup))
    for folder, files in writes.items():
        with replace_files(folder) as staging:
            for file_name, data in files:
                staging.path(file_name).write_bytes(data)
    record = {"l4lab": l4lab.__version__, "files": dict(sorted(manifest.items()))}
    atomic_write_text(directory / MANIFEST, json.dumps(record, indent=1) + "\n")
    return results


def describe(results: list[Copied], directory: Path) -> str:
    """What :func:`copy_notebooks` did, one line per notebook and a summary, for the command line."""
    lines = [f"l4lab {l4lab.__version__}'s notebooks in {directory}:"]
    for result in results:
        line = f"  {result.action:9s}  {result.path}"
        if result.action == "kept":
            line += ": you edited it, so it was left alone (--overwrite replaces it, keeping yours as .bak)"
        elif result.action == "replaced":
            line += f": your edited version is now {result.backup}"
        lines.append(line)
    counts = [f"{sum(r.action == a for r in results)} {a}" for a in ACTIONS]
    lines.append(", ".join(count for count in counts if not count.startswith("0 ")) or "no notebooks")
    lines.append(f"open them: jupyter lab {directory}")
    return "\n".join(lines)
