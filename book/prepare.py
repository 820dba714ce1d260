"""Prepare the book's notebooks: copy them from notebooks/ into book/notebooks/, ready for a static site.

``make book`` runs this before ``jupyter-book build book``. The notebooks are rendered from their
STORED outputs (nothing is executed here or in the build), but two kinds of output need work first:

* plotly figures are stored as ``application/vnd.plotly.v1+json`` only, which myst-nb drops. Each
  becomes a ``text/html`` output, ``<div class="plotly-figure" id="fig-N"></div><script>...``, that
  draws the figure with the site's own ``_static/plotly.min.js`` (copied here from the installed plotly
  package; ``_config.yml`` loads it on every page). The ids count the figures of a page: 1, 2, ...
* ipywidget views (``application/vnd.jupyter.widget-view+json``) need a kernel. An explorer of
  ``l4lab.widgets`` also stores its current figure(s) in its bundle: the page shows them in that last
  state with a line saying how to use the controls. Other widgets (tqdm's training progress bars) are
  dropped, and so is the notebook's saved widget state (myst-nb would load widget scripts from a CDN).

nbval's ``# NBVAL_...`` marker lines are removed from the code shown. Exercise notebooks get a link
to their solution, solutions a title that says so. Files are written only
when their content changes, so Sphinx rebuilds only the pages that changed. Run from anywhere:
``python book/prepare.py``.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import nbformat
import plotly

BOOK = Path(__file__).resolve().parent
REPO = BOOK.parent
SOURCE = REPO / "notebooks"
TARGET = BOOK / "notebooks"  # generated, gitignored
STATIC = BOOK / "_static"

PLOTLY = "application/vnd.plotly.v1+json"
FIGURES = "application/vnd.l4lab.figures+json"  # l4lab.widgets.FIGURES_MIMETYPE: all of an explorer's figures
WIDGET = "application/vnd.jupyter.widget-view+json"
EXPLORER_NOTE = (
    "Interactive explorer: open this notebook in JupyterLab (make lab) to use its controls; "
    "shown here in its last state."
)

# which notebooks the book shows: the chapters, the lab exercises and their solutions
PATTERNS = ["[0-9][0-9]_*.ipynb", "labs/lab*.ipynb", "labs/solutions/lab*.ipynb"]


def figure_html(figure: dict, number: int) -> str:
    """A div and a script that draw ``figure`` (plotly JSON) with the page's plotly.js."""
    spec = {
        "data": figure.get("data", []),
        "layout": figure.get("layout", {}),
        "config": {"responsive": True, "displaylogo": False, **figure.get("config", {})},
    }
    # "</" would end the script element early; "<\/" is the same string to JavaScript
    payload = json.dumps(spec, separators=(",", ":"), ensure_ascii=False).replace("</", "<\\/")
    return (
        f'<div class="plotly-figure" id="fig-{number}"></div>\n'
        "<script>(function () {\n"
        f"  var spec = {payload};\n"
        f'  function draw() {{ Plotly.newPlot("fig-{number}", spec.data, spec.layout, spec.config); }}\n'
        '  if (window.Plotly) { draw(); } else { window.addEventListener("load", draw); }\n'
        "})();</script>"
    )


class Converter:
    """Rewrites one notebook's outputs; counts its figures so that ids are fixed by their order."""

    def __init__(self) -> None:
        self.figures = 0

    def html_output(self, figures: list[dict], note: str | None = None) -> nbformat.NotebookNode:
        parts = [f'<p class="explorer-note">{note}</p>'] if note else []
        for figure in figures:
            self.figures += 1
            parts.append(figure_html(figure, self.figures))
        return nbformat.v4.new_output("display_data", data={"text/html": "\n".join(parts)})

    def output(self, output: nbformat.NotebookNode) -> nbformat.NotebookNode | None:
        data = output.get("data", {})
        if WIDGET in data:
            if FIGURES in data:
                return self.html_output(data[FIGURES]["figures"], EXPLORER_NOTE)
            if PLOTLY in data:
                return self.html_output([data[PLOTLY]], EXPLORER_NOTE)
            return None  # a progress bar or another widget without a static form
        if PLOTLY in data:
            return self.html_output([data[PLOTLY]])
        return output

    def notebook(self, nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
        nb = copy.deepcopy(nb)
        nb.metadata.pop("widgets", None)
        for cell in nb.cells:
            if cell.cell_type == "code":
                # nbval's markers are for the test suite, not for the reader
                lines = cell.source.splitlines()
                cell.source = "\n".join(line for line in lines if not line.startswith("# NBVAL_"))
                converted = (self.output(output) for output in cell.get("outputs", []))
                cell.outputs = [output for output in converted if output is not None]
        return nb


def retitle(nb: nbformat.NotebookNode, relative: Path) -> None:
    """Solutions say so in their title; exercises link to their solution."""
    first = nb.cells[0] if nb.cells else None
    if first is None or first.cell_type != "markdown" or not first.source.startswith("# "):
        return
    title, _, rest = first.source.partition("\n")
    if relative.parent.name == "solutions":
        first.source = f"{title} (solution)\n{rest}"
    elif relative.parent.name == "labs":
        link = (
            f"*The exercise, as students get it: the functions raise `NotImplementedError`. "
            f"The worked solution: [{title[2:]} (solution)](solutions/{relative.name}).*"
        )
        first.source = f"{title}\n\n{link}\n{rest}"


def write_if_changed(path: Path, content: bytes) -> bool:
    if path.exists() and path.read_bytes() == content:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return True


def prepare() -> list[str]:
    """Copy and convert every notebook; returns the paths written (relative to book/)."""
    written = []
    plotly_js = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    if write_if_changed(STATIC / "plotly.min.js", plotly_js.read_bytes()):
        written.append("_static/plotly.min.js")

    wanted = set()
    for pattern in PATTERNS:
        for source in sorted(SOURCE.glob(pattern)):
            relative = source.relative_to(SOURCE)
            wanted.add(relative)
            nb = Converter().notebook(nbformat.read(source, as_version=4))
            retitle(nb, relative)
            text = nbformat.writes(nb) + "\n"
            if write_if_changed(TARGET / relative, text.encode()):
                written.append(str(Path("notebooks") / relative))

    # a notebook removed from notebooks/ leaves the book too
    if TARGET.exists():
        for stale in sorted(TARGET.rglob("*")):
            if stale.is_file() and stale.relative_to(TARGET) not in wanted:
                stale.unlink()
                written.append(f"removed {stale.relative_to(BOOK)}")
    return written


def main() -> int:
    if not SOURCE.is_dir():
        print(f"no notebooks at {SOURCE}", file=sys.stderr)
        return 1
    written = prepare()
    count = sum(1 for _ in TARGET.rglob("*.ipynb"))
    print(f"book/prepare.py: {count} notebooks in book/notebooks, {len(written)} files updated")
    for line in written:
        print(f"  {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
