"""A training run as one HTML file that opens anywhere, offline: summary, loss curves, figures.

The page is self-contained: plotly.js (about 4.8 MB) is copied in once, inline, from the installed
plotly package, and every figure after the first reuses it. Nothing is fetched from a CDN, so the file
works on a machine without network access and still shows the same thing in ten years.

Each figure is embedded with a fixed ``div`` id (``figure-0``, ``figure-1``, ...), so the same run
gives the same file, byte for byte. The file is written beside ``path``, fsynced and moved into place
(``l4lab.storage.atomic_write_text``): a reader (or a crash) never sees half a report.

::

    write_report(
        "runs/x/report.html",
        histories={"tiny-moe": trainer.history},
        figures=[("Expert load", viz.expert_load_figure(loads))],
        summary={"steps": 300, "validation loss": 1.23},
    )
"""

from __future__ import annotations

import html
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import plotly.graph_objects as go

from l4lab import viz
from l4lab.storage import atomic_write_text

__all__ = ["atomic_write_text", "format_value", "write_report"]

_STYLE = """
body { font-family: Arial, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { font-size: 1.7em; } h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5em 0 1em; }
th, td { text-align: left; padding: 0.3em 0.9em; border-bottom: 1px solid #eee; vertical-align: top; }
th { background: #e8ecf4; }
td.value { font-family: monospace; white-space: pre-wrap; }
footer { margin-top: 3em; color: #888; font-size: 0.85em; }
"""


def format_value(value: Any) -> str:
    """A summary value as text: floats to 4 significant digits, big integers with separators."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def _table(rows: Sequence[Sequence[str]], header: Sequence[str] | None = None) -> str:
    """An HTML table of already-formatted text cells (escaped here)."""
    parts = ["<table>"]
    if header is not None:
        parts.append("<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>")
    for row in rows:
        first, *rest = row
        cells = f"<th>{html.escape(first)}</th>" + "".join(
            f'<td class="value">{html.escape(cell)}</td>' for cell in rest
        )
        parts.append(f"<tr>{cells}</tr>")
    parts.append("</table>")
    return "\n".join(parts)


def _runs_table(histories: Mapping[str, Sequence[Mapping[str, Any]]]) -> str:
    """One row per run: steps, first and last training loss, last validation loss."""
    rows = []
    for name, history in histories.items():
        losses = [h["loss"] for h in history if h.get("loss") is not None]
        vals = [h["val_loss"] for h in history if h.get("val_loss") is not None]
        rows.append(
            [
                name,
                format_value(len(history)),
                format_value(float(losses[0])) if losses else "-",
                format_value(float(losses[-1])) if losses else "-",
                format_value(float(vals[-1])) if vals else "-",
            ]
        )
    header = ["run", "steps", "first loss", "last loss", "last validation loss"]
    return _table(rows, header)


def write_report(
    path: str | os.PathLike[str],
    histories: Mapping[str, Sequence[Mapping[str, Any]]],
    figures: Sequence[tuple[str, go.Figure]],
    summary: Mapping[str, object],
    title: str = "l4lab training report",
) -> Path:
    """Write one self-contained HTML page and return its path.

    ``histories``: run name -> ``Trainer.history`` (dicts with ``step``, ``loss`` and sometimes
    ``val_loss``); they become a table and a loss-curve figure (``viz.loss_curves_figure``), first.
    ``figures``: (heading, figure) pairs, shown in order under their headings. ``summary``: name ->
    value, shown as a table at the top. plotly.js is inlined once, with the first figure.
    """
    sections: list[tuple[str, go.Figure]] = []
    if any(histories.values()):
        sections.append(("Loss curves", viz.loss_curves_figure(histories)))
    sections.extend(figures)

    body = [f"<h1>{html.escape(title)}</h1>", "<h2>Summary</h2>"]
    body.append(_table([[str(key), format_value(value)] for key, value in summary.items()]))
    if histories:
        body += ["<h2>Runs</h2>", _runs_table(histories)]
    for i, (heading, fig) in enumerate(sections):
        height = fig.layout.height or 460
        div = fig.to_html(
            full_html=False,
            include_plotlyjs=i == 0,  # True: the whole plotly.js of the installed package, inline
            div_id=f"figure-{i}",
            default_height=f"{height}px",
            default_width="100%",
        )
        body.append(f"<section>\n<h2>{html.escape(heading)}</h2>\n{div}\n</section>")
    body.append("<footer>Written by l4lab. Self-contained: opens offline.</footer>")
    page = (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )
    return atomic_write_text(path, page)
