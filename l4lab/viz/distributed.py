"""Expert parallelism figures (notebook 10): tokens sent rank to rank, the load and the wait per rank,
memory per GPU from the planner, and all-to-all against compute at scale."""

from __future__ import annotations

from collections.abc import Sequence

import plotly.graph_objects as go
from plotly.subplots import make_subplots
from torch import Tensor

from l4lab.planner import GB, ExpertParallelCost, Plan
from l4lab.viz.common import COLOURS, finish, hline, to_numpy


def traffic_figure(sent: Tensor, layer_ids: Sequence[int] | None = None) -> go.Figure:
    """Slots sent from each rank (rows) to each rank (columns), one heatmap per MoE layer.

    ``sent`` [layers, N, N]. The diagonal stays on its rank (no network); everything else crosses it
    twice (there and back). A balanced layer has equal columns; a crowded expert shows as a hot column.
    """
    table = to_numpy(sent)
    layers, ranks = table.shape[0], table.shape[1]
    ids = list(layer_ids) if layer_ids is not None else list(range(layers))
    fig = make_subplots(
        rows=1, cols=layers, subplot_titles=[f"layer {i}" for i in ids], horizontal_spacing=0.04
    )
    labels = [f"rank {r}" for r in range(ranks)]
    top = float(table.max()) if table.size else 1.0
    for j in range(layers):
        fig.add_trace(
            go.Heatmap(
                z=table[j],
                x=labels,
                y=labels,
                zmin=0,
                zmax=top,
                colorscale="Blues",
                showscale=j == layers - 1,
                text=table[j].astype(int),
                texttemplate="%{text}",
                hovertemplate="from %{y} to %{x}: %{z:.0f} slots<extra></extra>",
            ),
            row=1,
            col=j + 1,
        )
        fig.update_yaxes(autorange="reversed", row=1, col=j + 1, showticklabels=j == 0)
    return finish(fig, "Tokens sent from rank (row) to rank (column), per MoE layer", None, None, height=330)


def rank_wait_figure(
    slots: Sequence[Tensor], exchange_s: Sequence[Tensor], experts_s: Sequence[Tensor], labels: Sequence[str]
) -> go.Figure:
    """Per rank: slots its experts processed, and where its time went, for each setting (e.g. before
    and after balancing).

    ``slots``, ``exchange_s``, ``experts_s``: one [N] tensor per setting (summed over layers). Time in
    the all-to-alls includes waiting: a rank whose experts had little to do waits for the busiest.
    """
    fig = make_subplots(
        rows=1, cols=2, subplot_titles=["slots per rank (its experts' work)", "milliseconds per rank"]
    )
    for k, (load, exchange, compute, label) in enumerate(
        zip(slots, exchange_s, experts_s, labels, strict=True)
    ):
        ranks = [f"rank {r}" for r in range(len(load))]
        colour = COLOURS[k % len(COLOURS)]
        fig.add_trace(go.Bar(x=ranks, y=to_numpy(load), name=label, marker_color=colour), row=1, col=1)
        fig.add_trace(
            go.Bar(
                x=ranks,
                y=1e3 * to_numpy(compute),
                name=f"{label}: experts",
                marker_color=colour,
                offsetgroup=str(k),
            ),
            row=1,
            col=2,
        )
        fig.add_trace(
            go.Bar(
                x=ranks,
                y=1e3 * to_numpy(exchange),
                name=f"{label}: all-to-all and waiting",
                marker_color=colour,
                marker_pattern_shape="/",
                opacity=0.6,
                offsetgroup=str(k),
                base=1e3 * to_numpy(compute),
            ),
            row=1,
            col=2,
        )
    return finish(fig, "Load and time per rank", None, None, barmode="group", height=380)


def plan_figure(plans: Sequence[Plan]) -> go.Figure:
    """Stacked GB per GPU (weights, KV cache, activations) for each plan, against the GPU's memory."""
    names = [
        f"{p.model}, {p.gpus} GPU{'s' if p.gpus > 1 else ''}, {p.weights_dtype}, {p.context:,}" for p in plans
    ]
    fig = go.Figure()
    for part, colour in (("weights", COLOURS[0]), ("kv_cache", COLOURS[1]), ("activations", COLOURS[2])):
        fig.add_trace(
            go.Bar(
                y=names,
                x=[getattr(p, part) / GB for p in plans],
                name=part.replace("_", " "),
                orientation="h",
                marker_color=colour,
            )
        )
    memory = {p.gpu_memory for p in plans}
    for value in memory:
        fig.add_vline(
            x=value / GB, line_dash="dash", line_color="grey", annotation_text=f"{value / GB:.0f} GB"
        )
    fig.update_yaxes(autorange="reversed")
    return finish(fig, "Memory per GPU", "GB per GPU", None, barmode="stack", height=120 + 40 * len(plans))


def ep_cost_figure(costs: Sequence[ExpertParallelCost], model: str = "Maverick") -> go.Figure:
    """Per token and MoE layer: expert compute against all-to-all time (NVLink and InfiniBand) by GPUs."""
    gpus = [str(c.gpus) for c in costs]
    fig = go.Figure()
    fig.add_trace(
        go.Bar(x=gpus, y=[1e9 * c.compute_s for c in costs], name="expert compute", marker_color=COLOURS[0])
    )
    fig.add_trace(
        go.Bar(
            x=gpus,
            y=[1e9 * c.nvlink_s for c in costs],
            name="all-to-all over NVLink",
            marker_color=COLOURS[2],
        )
    )
    fig.add_trace(
        go.Bar(
            x=gpus,
            y=[1e9 * c.infiniband_s for c in costs],
            name="all-to-all over InfiniBand",
            marker_color=COLOURS[1],
        )
    )
    fig.update_layout(barmode="group")
    hline(fig, 1e9 * costs[0].compute_s, "compute")
    return finish(
        fig, f"{model}: all-to-all vs expert compute per token and MoE layer", "GPUs", "nanoseconds"
    )


__all__ = ["ep_cost_figure", "plan_figure", "rank_wait_figure", "traffic_figure"]
