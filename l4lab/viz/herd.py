"""The herd and its rivals (notebook 09): the family table, Llama 2 -> Llama 4 one idea at a time, the
routers compared, Mixtral's same-expert measurement side by side, distillation."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from l4lab.config import count_params
from l4lab.family import FamilyRow, Step, flops_per_token, kv_cache_bytes
from l4lab.viz.common import COLOURS, FONT, TEMPLATE, count_label, finish

# Jiang et al. 2024 (Mixtral), Table 5, ArXiv: first-choice repetition at layers 0, 15, 31 (32 layers)
MIXTRAL_SAME_EXPERT = {"layer 0": 0.140, "layer 15": 0.279, "layer 31": 0.227}
MIXTRAL_CHANCE = 1 / 8


def _bytes_label(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1e9:,.1f} GB" if n >= 1e8 else f"{n / 1e6:,.1f} MB"


def family_table_figure(rows: Sequence[FamilyRow]) -> go.Figure:
    """:func:`l4lab.family.family_table` as a table: computed sizes beside the published ones, context,
    positions, and the bf16 KV cache of one sequence at the full context."""
    header = [
        "model",
        "released",
        "experts",
        "total",
        "active",
        "published",
        "context",
        "positions",
        "KV cache",
    ]
    cells: list[list[str]] = [[] for _ in header]
    for row in rows:
        published = "-"
        if row.published_total_b is not None:
            published = f"{row.published_total_b:g}B / {row.published_active_b:g}B"
        values = [
            row.model,
            row.released,
            row.experts,
            count_label(row.total) if row.total is not None else "not published",
            count_label(row.active) if row.active is not None else "-",
            published,
            f"{row.context:,}" if row.context is not None else "not published",
            row.positions,
            _bytes_label(row.kv_cache_bytes),
        ]
        for column, value in zip(cells, values, strict=True):
            column.append(value)
    fig = go.Figure(
        go.Table(
            columnwidth=[1.3, 0.8, 1.2, 0.9, 0.9, 1.1, 1.0, 3.0, 0.9],
            header=dict(values=header, fill_color="#e8ecf4", align="left"),
            cells=dict(values=cells, align="left"),
        )
    )
    return finish(
        fig, "The herd and its rivals: sizes computed from configs, beside the published ones", None, None
    )


def toggle_steps_figure(steps: Sequence[Step], context: int) -> go.Figure:
    """Parameters (total, active), KV cache and FLOPs per token at ``context`` tokens, step by step from
    Llama 2's choices to Llama 4 Scout (:func:`l4lab.family.llama2_to_llama4`)."""
    names = [step.change for step in steps]
    counts = [count_params(step.config) for step in steps]
    fig = make_subplots(
        rows=1,
        cols=3,
        subplot_titles=(
            "parameters (B)",
            f"KV cache at {context:,} tokens (GB, bf16)",
            f"forward TFLOPs per token at {context:,}",
        ),
    )
    fig.add_bar(x=names, y=[t / 1e9 for t, _ in counts], name="total", marker_color=COLOURS[0], row=1, col=1)
    fig.add_bar(x=names, y=[a / 1e9 for _, a in counts], name="active", marker_color=COLOURS[1], row=1, col=1)
    kv = [kv_cache_bytes(step.config, context) / 1e9 for step in steps]
    fig.add_bar(x=names, y=kv, name="KV cache", marker_color=COLOURS[2], row=1, col=2)
    flops = [flops_per_token(step.config, context) / 1e12 for step in steps]
    fig.add_bar(x=names, y=flops, name="FLOPs per token", marker_color=COLOURS[3], row=1, col=3)
    fig.update_xaxes(tickangle=40)
    fig.update_layout(height=520, barmode="group")
    return finish(
        fig, "From Llama 2 to Llama 4 Scout, one idea at a time (Scout's width and depth)", None, None
    )


def _seed_points(fig: go.Figure, groups: Mapping[str, Sequence[float]], row: int, col: int) -> None:
    for i, (name, values) in enumerate(groups.items()):
        colour = COLOURS[i % len(COLOURS)]
        fig.add_scatter(
            x=[name] * len(values),
            y=list(values),
            mode="markers",
            marker=dict(color=colour, size=9),
            name=f"{name} (each seed)",
            showlegend=False,
            row=row,
            col=col,
        )
        fig.add_scatter(
            x=[name],
            y=[float(np.mean(values))],
            mode="markers",
            marker=dict(color=colour, symbol="line-ew-open", size=28, line=dict(width=3)),
            name=f"{name} (mean)",
            showlegend=False,
            row=row,
            col=col,
        )


def router_comparison_figure(routers: Mapping[str, Mapping]) -> go.Figure:
    """Validation loss, MaxVio and same-expert rate of each router, one point per seed (bar: the mean).

    ``routers``: ``herd.json``'s "routers" entry (benchmarks/herd.py): per router its runs, each with
    ``val_loss`` and per-layer ``max_violation``, ``same_expert_rate`` and ``chance_rate``.
    """
    fig = make_subplots(
        rows=1,
        cols=3,
        subplot_titles=("validation loss", "MaxVio (mean over layers)", "same-expert rate - chance (mean)"),
    )
    _seed_points(fig, {n: [r["val_loss"] for r in e["runs"]] for n, e in routers.items()}, 1, 1)
    _seed_points(
        fig, {n: [float(np.mean(r["max_violation"])) for r in e["runs"]] for n, e in routers.items()}, 1, 2
    )
    excess = {
        n: [float(np.mean(r["same_expert_rate"]) - np.mean(r["chance_rate"])) for r in e["runs"]]
        for n, e in routers.items()
    }
    _seed_points(fig, excess, 1, 3)
    fig.update_layout(height=420)
    return finish(fig, "Three routers, same model, same text, equal active parameters", None, None)


def same_expert_figure(
    trained: Sequence[float], untrained: Sequence[float], chance: Sequence[float]
) -> go.Figure:
    """Mixtral's Table 5 measurement beside ours: the rate at which consecutive tokens share their
    first-choice expert, per layer; published (ArXiv, 32 layers) and measured on a tiny Mixtral-routed
    model trained on the shipped corpus and untrained (the control), with chance (``sum p_i^2``)."""
    fig = make_subplots(
        rows=1, cols=2, subplot_titles=("Mixtral 8x7B, published", "tiny Mixtral-routed model, measured")
    )
    fig.add_bar(
        x=list(MIXTRAL_SAME_EXPERT),
        y=[100 * v for v in MIXTRAL_SAME_EXPERT.values()],
        name="published",
        marker_color=COLOURS[0],
        row=1,
        col=1,
    )
    fig.add_scatter(
        x=list(MIXTRAL_SAME_EXPERT),
        y=[100 * MIXTRAL_CHANCE] * 3,
        mode="lines+markers",
        name="chance (1/8)",
        line=dict(color="grey", dash="dash"),
        row=1,
        col=1,
    )
    layers = [f"layer {i}" for i in range(len(trained))]
    fig.add_bar(x=layers, y=[100 * v for v in trained], name="trained", marker_color=COLOURS[1], row=1, col=2)
    fig.add_bar(
        x=layers, y=[100 * v for v in untrained], name="untrained", marker_color=COLOURS[2], row=1, col=2
    )
    fig.add_scatter(
        x=layers,
        y=[100 * v for v in chance],
        mode="lines+markers",
        name="chance (sum p_i^2)",
        line=dict(color="black", dash="dot"),
        row=1,
        col=2,
    )
    fig.update_yaxes(title_text="same first-choice expert (%)", row=1, col=1)
    fig.update_layout(height=420, barmode="group", template=TEMPLATE, font=FONT)
    return finish(fig, "Consecutive tokens on the same expert: a measurement, not a match", None, None)


def distillation_figure(students: Mapping[str, Sequence[float]], teacher_loss: float) -> go.Figure:
    """Validation loss of each student recipe, one point per seed, with the teacher's as a line."""
    fig = make_subplots(rows=1, cols=1)
    _seed_points(fig, students, 1, 1)
    fig.add_hline(y=teacher_loss, line=dict(color="grey", dash="dash"), annotation_text="teacher")
    fig.update_layout(height=400)
    return finish(fig, "Distilling a tiny scout from a tiny behemoth", None, "validation loss")


__all__ = [
    "MIXTRAL_CHANCE",
    "MIXTRAL_SAME_EXPERT",
    "distillation_figure",
    "family_table_figure",
    "router_comparison_figure",
    "same_expert_figure",
    "toggle_steps_figure",
]
