"""Kernel figures (notebook 06): the tiles a flash-attention kernel computes, the grouped GEMM's launch,
and benchmark times against peers (``benchmarks/results/``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go

from l4lab.viz.common import (
    COLOURS,
    expert_colours,
    finish,
)

TILE_KINDS = ("skipped: never loaded", "computed without a mask", "computed with the mask")
TILE_COLOURS = ("#eef0f4", "#3b6fb6", "#f28e2b")


def attention_tiles_figure(
    visited: Sequence[tuple[Sequence[int], Sequence[int]]],
    num_key_tiles: int,
    block_m: int,
    block_n: int,
    title: str,
) -> go.Figure:
    """Which tiles of the score matrix a flash-attention kernel computes, one cell per tile.

    ``visited[i]`` is (key tiles computed without a mask, key tiles computed with the mask) of query
    tile i, as ``l4lab.kernels.attention.visited_key_tiles`` returns; every other cell is skipped: its
    keys are never loaded. A causal layer computes a triangle; a chunked layer a staircase of small
    triangles, so its work grows like T x C instead of T^2 / 2.
    """
    grid = np.zeros((len(visited), num_key_tiles), dtype=np.int64)
    for row, (full, masked) in enumerate(visited):
        grid[row, list(full)] = 1
        grid[row, list(masked)] = 2
    computed = int((grid > 0).sum())
    with_mask = int((grid == 2).sum())
    scale = [[bound, TILE_COLOURS[kind]] for kind in range(3) for bound in (kind / 3, (kind + 1) / 3)]
    labels = np.array(TILE_KINDS, dtype=object)[grid]
    fig = go.Figure(
        go.Heatmap(
            z=grid,
            x=np.arange(num_key_tiles),
            y=np.arange(len(visited)),
            zmin=-0.5,
            zmax=2.5,
            colorscale=scale,
            customdata=labels,
            xgap=1,
            ygap=1,
            colorbar=dict(tickvals=[0, 1, 2], ticktext=list(TILE_KINDS)),
            hovertemplate="query tile %{y} x key tile %{x}: %{customdata}<extra></extra>",
        )
    )
    fig.update_yaxes(autorange="reversed")
    subtitle = (
        f"{computed} of {grid.size} tiles computed ({with_mask} with the mask); "
        f"tiles of {block_m} queries x {block_n} keys"
    )
    return finish(
        fig,
        f"{title}<br><sup>{subtitle}</sup>",
        "key tile",
        "query tile",
        height=520,
        width=720,
    )


def moe_tiles_figure(
    schedule: Sequence[tuple[int, int, int]], num_experts: int, num_programs: int
) -> go.Figure:
    """The grouped GEMM's launch: one bar per program, its height the rows it multiplies.

    ``schedule`` is ``(expert, first sorted row, end row)`` per tile, as
    ``l4lab.kernels.moe.tile_schedule`` returns; the launch has ``num_programs`` programs, an upper bound
    known without reading the routing back to the host, and the surplus ones exit at once (grey).
    """
    colours = expert_colours(num_experts)
    fig = go.Figure()
    for expert in range(num_experts):
        programs = [i for i, tile in enumerate(schedule) if tile[0] == expert]
        if not programs:
            continue
        fig.add_bar(
            x=programs,
            y=[schedule[i][2] - schedule[i][1] for i in programs],
            name=f"expert {expert}",
            marker_color=colours[expert],
            customdata=[[schedule[i][1], schedule[i][2]] for i in programs],
            hovertemplate=f"program %{{x}}: expert {expert}, sorted rows %{{customdata[0]}}"
            "-%{customdata[1]}<extra></extra>",
        )
    surplus = list(range(len(schedule), num_programs))
    if surplus:
        fig.add_bar(
            x=surplus,
            y=[0.5] * len(surplus),
            name="exits at once",
            marker_color="#bbbbbb",
            hovertemplate="program %{x}: no tile, exits<extra></extra>",
        )
    empty = num_experts - len({tile[0] for tile in schedule})
    return finish(
        fig,
        f"Grouped GEMM launch: {len(schedule)} tiles in {num_programs} programs"
        f"<br><sup>{empty} expert(s) received no token and get no tile</sup>",
        "program",
        "rows in its tile",
        bargap=0.15,
        height=380,
    )


def benchmark_rows(markdown: str) -> list[dict[str, Any]]:
    """The rows of the table written by ``benchmarks/kernels.py``: work, peer and ms (None: not run).

    Reads the first markdown table whose header starts ``| work | peer | time (ms) |``.
    """
    rows: list[dict[str, Any]] = []
    in_table = False
    for line in markdown.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if cells[:3] == ["work", "peer", "time (ms)"]:
            in_table = True
        elif in_table and line.startswith("|"):
            if all(cell and set(cell) <= set("-:") for cell in cells):
                continue  # the separator row
            rows.append(dict(work=cells[0], peer=cells[1], ms=None if cells[2] == "-" else float(cells[2])))
        elif in_table:
            break
    return rows


def benchmark_figure(rows: Sequence[Mapping[str, Any]], title: str) -> go.Figure:
    """Benchmark times side by side: one panel per piece of work, one bar per peer, fastest = 1.

    ``rows``: mappings with ``work``, ``peer`` and ``ms`` (None for a peer that did not run), e.g. the
    rows of a table in ``benchmarks/results/``. Each bar is the peer's time over the fastest peer's on
    the same work; l4lab's bars are drawn in the accent colour.
    """
    works = list(dict.fromkeys(row["work"] for row in rows))
    fig = go.Figure()
    y_labels, x_values, colours, texts = [], [], [], []
    for work in works:
        measured = [row for row in rows if row["work"] == work and row.get("ms") is not None]
        if not measured:
            continue
        fastest = min(row["ms"] for row in measured)
        for row in measured:
            y_labels.append(f"{work}: {row['peer']}")
            x_values.append(row["ms"] / fastest)
            colours.append(COLOURS[1] if "l4lab" in row["peer"] else "#8c9bb0")
            texts.append(f"{row['ms']:.3g} ms")
    fig.add_bar(
        x=x_values,
        y=y_labels,
        orientation="h",
        marker_color=colours,
        text=texts,
        textposition="outside",
        hovertemplate="%{y}: %{x:.2f}x the fastest (%{text})<extra></extra>",
    )
    fig.update_yaxes(autorange="reversed")
    return finish(
        fig,
        title,
        "time / fastest peer's time (lower is better)",
        None,
        height=120 + 28 * len(y_labels),
        margin=dict(l=420),
    )
