"""Routing figures (notebook 03, lab 4): expert load, the token-by-token expert map, specialisation by
domain, and the routing statistics beside published reference values."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go
from torch import Tensor

from l4lab.routing import RoutingStats
from l4lab.viz.common import (
    COLOURS,
    expert_colours,
    finish,
    hline,
    to_numpy,
)

# Published numbers to read our routing statistics against, each with its source.
ROUTING_REFERENCES: dict[str, dict[str, str]] = {
    "same_expert_rate": {
        "published": "25-28% at middle layers (8 experts, first choice)",
        "source": "Mixtral of Experts (Jiang et al. 2024), section 5",
    },
    "chance_rate": {
        "published": "12.5% = 1/8 (uniform load, 8 experts)",
        "source": "Mixtral of Experts (Jiang et al. 2024), section 5",
    },
    "switch_loss": {
        "published": "1.00 at perfect balance (times alpha = 1e-2)",
        "source": "Switch Transformer (Fedus et al. 2021)",
    },
    "max_violation": {
        "published": "0.04 with loss-free balancing; 0.5-0.7 with an auxiliary loss instead",
        "source": "DeepSeek-V3 auxiliary-loss-free balancing (Wang et al. 2024)",
    },
    "normalised_entropy": {
        "published": "1.00 at perfect balance",
        "source": "definition: ln E / ln E",
    },
}


def expert_load_figure(
    loads: Tensor | Sequence[Tensor] | Sequence[Sequence[float]],
    layer_ids: Sequence[int] | None = None,
    kind: str = "bars",
) -> go.Figure:
    """The share of tokens each expert receives, per MoE layer, against the uniform share 1/E.

    ``loads`` [layers, E]: fractions (``l4lab.routing.expert_load``) or counts (rows are normalised);
    ``layer_ids`` label the rows (default 0, 1, ...). ``kind="bars"``: grouped bars, one colour per
    layer, with a dashed line at 1/E; ``kind="heatmap"``: layers x experts coloured red above 1/E, blue
    below and white at 1/E, better for many layers.
    """
    table = to_numpy(loads)
    if table.ndim == 1:
        table = table[None, :]
    table = table / np.where(table.sum(-1, keepdims=True) > 0, table.sum(-1, keepdims=True), 1.0)
    num_layers, num_experts = table.shape
    layer_ids = list(range(num_layers)) if layer_ids is None else list(layer_ids)
    if len(layer_ids) != num_layers:
        raise ValueError(f"{len(layer_ids)} layer_ids for {num_layers} rows of loads")
    uniform = 1.0 / num_experts
    experts = np.arange(num_experts)
    fig = go.Figure()
    if kind == "bars":
        for row, layer in enumerate(layer_ids):
            fig.add_trace(
                go.Bar(
                    x=experts,
                    y=table[row],
                    name=f"layer {layer}",
                    marker_color=COLOURS[row % len(COLOURS)],
                    hovertemplate=f"layer {layer}, expert %{{x}}: %{{y:.1%}} of tokens<extra></extra>",
                )
            )
        hline(fig, uniform, f"uniform 1/E = {uniform:.3g}")
        fig.update_layout(barmode="group", xaxis=dict(tickmode="array", tickvals=experts))
        return finish(fig, "Expert load per layer: share of tokens each expert receives", "expert", "load")
    if kind == "heatmap":
        fig.add_trace(
            go.Heatmap(
                z=table,
                x=experts,
                y=[f"layer {layer}" for layer in layer_ids],
                colorscale="RdBu_r",
                zmid=uniform,
                colorbar=dict(title=dict(text=f"load<br>(white = 1/E<br>= {uniform:.3g})")),
                hovertemplate="%{y}, expert %{x}: %{z:.1%} of tokens<extra></extra>",
            )
        )
        fig.update_layout(xaxis=dict(tickmode="array", tickvals=experts), yaxis=dict(autorange="reversed"))
        return finish(fig, "Expert load per layer (red: busier than uniform, blue: idler)", "expert", "layer")
    raise ValueError(f"kind {kind!r} is not known: 'bars' or 'heatmap'")


def _display_token(token: str) -> str:
    """Make invisible characters visible and keep plotly from reading ``<b>`` in a token as markup."""
    shown = token.replace(" ", "␣").replace("\n", "↵").replace("\t", "⇥")
    return html.escape(shown, quote=False)


def token_expert_figure(
    tokens: Sequence[str], experts: Sequence[int] | Tensor, num_experts: int, columns: int = 20
) -> go.Figure:
    """The text, token by token, each on a cell coloured by its first-choice expert.

    ``tokens``: the tokens as text (spaces show as ␣, newlines as ↵); ``experts``: each token's
    first-choice expert, e.g. ``out.routing[i].experts[0, :, 0]``. Tokens fill a grid of ``columns``
    cells per row, read left to right and top to bottom; hovering a cell shows the token's position.
    Runs of one colour are consecutive tokens sent to the same expert (compare ``same_expert_rate``).
    """
    ids = [int(e) for e in (experts.reshape(-1).tolist() if isinstance(experts, Tensor) else experts)]
    if len(ids) != len(tokens):
        raise ValueError(f"{len(tokens)} tokens but {len(ids)} experts")
    if ids and not 0 <= min(ids) <= max(ids) < num_experts:
        raise ValueError(f"expert ids must lie in [0, {num_experts})")
    rows = max(1, math.ceil(len(tokens) / columns))
    z = np.full((rows, columns), np.nan)
    text = [[""] * columns for _ in range(rows)]
    hover = [[""] * columns for _ in range(rows)]
    for i, (token, expert) in enumerate(zip(tokens, ids, strict=True)):
        r, c = divmod(i, columns)
        z[r, c] = expert
        text[r][c] = _display_token(token)
        hover[r][c] = f"token {i}: {_display_token(token)} → expert {expert}"
    colours = expert_colours(num_experts)
    colourscale = []
    for i, colour in enumerate(colours):  # a step per expert: expert i owns [i, i + 1) / E
        colourscale += [(i / num_experts, colour), ((i + 1) / num_experts, colour)]
    ticks = list(range(num_experts)) if num_experts <= 24 else list(range(0, num_experts, 8))
    fig = go.Figure(
        go.Heatmap(
            z=z,
            text=text,
            texttemplate="%{text}",
            textfont=dict(size=11),
            hovertext=hover,
            hovertemplate="%{hovertext}<extra></extra>",
            colorscale=colourscale,
            zmin=-0.5,
            zmax=num_experts - 0.5,
            xgap=1,
            ygap=1,
            colorbar=dict(title=dict(text="expert"), tickvals=ticks, ticktext=[f"expert {i}" for i in ticks]),
        )
    )
    fig.update_xaxes(showticklabels=False, showgrid=False, zeroline=False)
    fig.update_yaxes(showticklabels=False, showgrid=False, zeroline=False, autorange="reversed")
    return finish(
        fig,
        "Which expert each token goes to first (read left to right, top to bottom)",
        None,
        None,
        height=140 + 26 * rows,
    )


def specialisation_figure(
    counts: Tensor | Sequence[Sequence[float]], domain_names: Sequence[str]
) -> go.Figure:
    """``P(expert | domain)``: for each domain (row), how its tokens spread over the experts.

    ``counts`` [num_domains, E] from ``l4lab.routing.domain_expert_counts``; each row is divided by its
    total (a domain without tokens stays at 0). Rows that look alike mean the router does not care about
    the domain; a bright cell is an expert that specialises. Uniform routing puts 1/E in every cell.
    """
    table = to_numpy(counts)
    num_domains, num_experts = table.shape
    if len(domain_names) != num_domains:
        raise ValueError(f"{len(domain_names)} domain names for {num_domains} rows of counts")
    totals = table.sum(-1, keepdims=True)
    probs = table / np.where(totals > 0, totals, 1.0)
    tokens = np.broadcast_to(totals, table.shape)
    fig = go.Figure(
        go.Heatmap(
            z=probs,
            x=[f"expert {i}" for i in range(num_experts)],
            y=list(domain_names),
            customdata=tokens,
            colorscale="Blues",
            zmin=0.0,
            texttemplate="%{z:.0%}" if num_experts <= 24 else None,
            colorbar=dict(title=dict(text="P(expert | domain)")),
            hovertemplate="P(%{x} | %{y}) = %{z:.1%} of %{customdata:,} tokens<extra></extra>",
        )
    )
    fig.update_yaxes(autorange="reversed")
    return finish(
        fig,
        "Expert specialisation: P(expert | domain), first choice<br>"
        f"<sup>uniform = 1/E = {1 / num_experts:.3g} in every cell; similar rows = no specialisation</sup>",
        "expert",
        "domain",
    )


def routing_stats_table(stats: Sequence[RoutingStats]) -> go.Figure:
    """The per-layer routing statistics beside the published reference values.

    The first two rows are the references of :data:`ROUTING_REFERENCES` and their sources, then one row
    per MoE layer. Rates are percentages; MaxVio and the Switch loss are plain numbers.
    """
    keys = ["same_expert_rate", "chance_rate", "switch_loss", "max_violation", "normalised_entropy"]
    header = [
        "layer",
        "same expert as previous token",
        "chance (Σ load²)",
        "Switch loss (E·Σ f·P)",
        "MaxVio",
        "load entropy / ln E",
    ]

    def show(key: str, value: float) -> str:
        if math.isnan(value):
            return "-"
        return f"{value:.1%}" if key in ("same_expert_rate", "chance_rate") else f"{value:.3f}"

    columns: list[list[str]] = [["published", "source"] + [str(s.layer) for s in stats]]
    for key in keys:
        reference = ROUTING_REFERENCES[key]
        columns.append(
            [reference["published"], reference["source"]] + [show(key, getattr(s, key)) for s in stats]
        )
    fill = ["#fff4d6", "#fff4d6"] + ["white"] * len(stats)
    fig = go.Figure(
        go.Table(
            columnwidth=[70] + [140] * len(keys),
            header=dict(values=header, fill_color="#e8ecf4", align="left", font=dict(size=12)),
            cells=dict(values=columns, fill_color=[fill] * len(columns), align="left", font=dict(size=12)),
        )
    )
    return finish(
        fig,
        "Routing statistics per MoE layer, against published values",
        None,
        None,
        height=180 + 30 * (len(stats) + 2),
    )
