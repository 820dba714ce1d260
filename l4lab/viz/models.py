"""Model and training figures (notebooks 01 and 02): parameter counts side by side, and loss curves."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go

from l4lab.config import Config, count_params, router_spec
from l4lab.viz.common import (
    COLOURS,
    count_label,
    finish,
)


def parameter_table(configs: Mapping[str, Config]) -> go.Figure:
    """Total and active parameters, layers, width, experts and context of several models, as a table.

    Counts come from ``l4lab.count_params``: the total includes the vision encoder of a config that has
    one (Scout, Maverick). Active parameters are those one text token passes through.
    """
    columns: list[list[str]] = [[] for _ in range(7)]
    for name, config in configs.items():
        total, active = count_params(config)
        if config.ffn == "dense":
            experts = "dense"
        else:
            shared = " + 1 shared" if router_spec(config.router).shared_expert else ""
            experts = f"{config.num_experts} routed{shared}, top-{config.top_k}"
            if config.moe_layer_step > 1:
                experts += f", MoE in 1 of {config.moe_layer_step} layers"
        row = [
            name,
            count_label(total),
            count_label(active),
            str(config.num_layers),
            f"{config.hidden_size:,}",
            experts,
            f"{config.max_position_embeddings:,}",
        ]
        for column, cell in zip(columns, row, strict=True):
            column.append(cell)
    header = ["model", "total parameters", "active per token", "layers", "hidden", "experts", "context"]
    fig = go.Figure(
        go.Table(
            columnwidth=[110, 90, 90, 55, 65, 190, 90],
            header=dict(values=header, fill_color="#e8ecf4", align="left", font=dict(size=12)),
            cells=dict(values=columns, align="left", font=dict(size=12)),
        )
    )
    return finish(fig, "Model sizes: total vs active parameters", None, None, height=160 + 30 * len(configs))


def loss_curves_figure(histories: Mapping[str, Sequence[Mapping[str, float | None]]]) -> go.Figure:
    """Training (solid) and validation (dashed, markers) loss against step, one colour per run.

    ``histories`` maps a run's name to its log: a list of dicts with ``"step"``, ``"loss"`` and, on the
    steps where it was measured, ``"val_loss"`` (missing or None elsewhere). Losses are cross-entropy
    in nats per token (ln 260 = 5.56 for a byte model that knows nothing).
    """
    fig = go.Figure()
    for i, (name, history) in enumerate(histories.items()):
        colour = COLOURS[i % len(COLOURS)]
        for key, label, style in (
            ("loss", "train", dict(mode="lines", line=dict(color=colour))),
            ("val_loss", "validation", dict(mode="lines+markers", line=dict(color=colour, dash="dash"))),
        ):
            points = [(h["step"], h[key]) for h in history if h.get(key) is not None]
            if not points:
                continue
            steps, values = zip(*points, strict=True)
            fig.add_trace(
                go.Scatter(
                    x=np.asarray(steps),
                    y=np.asarray(values, dtype=np.float64),
                    name=f"{name} {label}",
                    legendgroup=name,
                    hovertemplate=f"{name} {label}, step %{{x}}: %{{y:.4f}}<extra></extra>",
                    **style,
                )
            )
    return finish(fig, "Loss curves", "step", "loss (nats per token)")
