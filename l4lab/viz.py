"""Figures for looking inside Llama 4: routing, attention, temperature, memory, parameters, training.

Every function here is pure: it takes tensors or numbers and returns a ``plotly.graph_objects.Figure``
(or, for the numbers behind a figure, a plain dict or tensor). Nothing is displayed and no widget is
created; in a notebook, the figure shows itself when it is the last expression of a cell, and
``fig.write_html(...)`` or ``fig.write_image(...)`` saves it. Figures are deterministic (the same inputs
give the same JSON) and share one template, so they look alike side by side.

=================================  ==================================================================
routing                            :func:`expert_load_figure`, :func:`token_expert_figure`,
                                   :func:`specialisation_figure`, :func:`routing_stats_table`
attention                          :func:`attention_map_figure`, :func:`attention_distance_figure`
                                   (numbers: :func:`attention_mass_by_distance`),
                                   :func:`temperature_figure`
long context                       :func:`accuracy_vs_length_figure`, :func:`needle_heatmap`,
                                   :func:`kv_cache_figure` (numbers: :func:`kv_cache_memory`)
models and training                :func:`parameter_table`, :func:`loss_curves_figure`
kernels                            :func:`attention_tiles_figure`, :func:`moe_tiles_figure`,
                                   :func:`benchmark_figure` (numbers: :func:`benchmark_rows`)
=================================  ==================================================================
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.colors import qualitative, sample_colorscale
from torch import Tensor

from l4lab.config import Config, LayerSpec, count_params
from l4lab.ops import Temperature
from l4lab.routing import RoutingStats

TEMPLATE = "plotly_white"
FONT = dict(family="Arial, sans-serif", size=13)
COLOURS = qualitative.Plotly  # one colour per model or layer, in order

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


# ---------------------------------------------------------------------- helpers
def _array(x: Tensor | Sequence[Any] | np.ndarray) -> np.ndarray:
    """A float64 numpy copy of a tensor (any dtype, any device), list or array."""
    if isinstance(x, Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    if isinstance(x, (list, tuple)) and x and isinstance(x[0], Tensor):
        return np.stack([_array(item) for item in x])
    return np.asarray(x, dtype=np.float64)


def _finish(fig: go.Figure, title: str, x_title: str | None, y_title: str | None, **layout: Any) -> go.Figure:
    """Apply the shared look: template, font, title and axis titles."""
    fig.update_layout(
        template=TEMPLATE,
        font=FONT,
        title=dict(text=title, x=0.02, xanchor="left"),
        xaxis_title=x_title,
        yaxis_title=y_title,
        **layout,
    )
    return fig


def _count_label(n: float) -> str:
    """Parameter counts the way papers write them: 107.8B, 17.17B, 1.23M, 950."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.4g}{unit}"
    return f"{n:g}"


def _length_label(n: int) -> str:
    """Context lengths the way people say them: 1K (1,024), 8K, 1M (1,048,576), 10M."""
    n = int(n)
    if n >= 1 << 20 and n % (1 << 20) == 0:
        return f"{n >> 20}M"
    if n >= 1_000_000 and n % 1_000_000 == 0:
        return f"{n // 1_000_000}M"
    if n >= 1024 and n % 1024 == 0:
        return f"{n >> 10}K"
    if n >= 1000 and n % 1000 == 0:
        return f"{n // 1000}K"
    return str(n)


def _vline(fig: go.Figure, x: float, label: str, **line: Any) -> None:
    """A vertical line across the plot in data units (also on log axes) with a label at its top."""
    fig.add_shape(
        type="line",
        xref="x",
        yref="paper",
        x0=x,
        x1=x,
        y0=0,
        y1=1,
        line={"color": "grey", "dash": "dash", "width": 1.5, **line},
        label=dict(text=label, textposition="end", yanchor="top", xanchor="left", font=dict(size=11)),
    )


def _hline(fig: go.Figure, y: float, label: str, **line: Any) -> None:
    """A horizontal line across the plot in data units (also on log axes) with a label at its right end."""
    fig.add_shape(
        type="line",
        xref="paper",
        yref="y",
        x0=0,
        x1=1,
        y0=y,
        y1=y,
        line={"color": "grey", "dash": "dash", "width": 1.5, **line},
        label=dict(text=label, textposition="end", yanchor="bottom", xanchor="right", font=dict(size=11)),
    )


def layer_label(spec: LayerSpec) -> str:
    """A layer's attention in words: "RoPE, chunked C=8192" or "NoPE, global, temperature tuned"."""
    kind = "RoPE" if spec.uses_rope else "NoPE"
    reach = f"chunked C={spec.chunk_size}" if spec.chunk_size is not None else "global"
    tuned = ", temperature tuned" if spec.temperature_tuning else ""
    return f"{kind}, {reach}{tuned}"


# ---------------------------------------------------------------------- routing
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
    table = _array(loads)
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
        _hline(fig, uniform, f"uniform 1/E = {uniform:.3g}")
        fig.update_layout(barmode="group", xaxis=dict(tickmode="array", tickvals=experts))
        return _finish(fig, "Expert load per layer: share of tokens each expert receives", "expert", "load")
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
        return _finish(
            fig, "Expert load per layer (red: busier than uniform, blue: idler)", "expert", "layer"
        )
    raise ValueError(f"kind {kind!r} is not known: 'bars' or 'heatmap'")


def expert_colours(num_experts: int) -> list[str]:
    """One colour per expert: distinct light colours up to 24 experts, a smooth scale beyond."""
    if num_experts <= len(qualitative.Light24):
        return list(qualitative.Light24[:num_experts])
    return sample_colorscale("Turbo", [i / (num_experts - 1) for i in range(num_experts)])


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
    return _finish(
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
    table = _array(counts)
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
    return _finish(
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
    return _finish(
        fig,
        "Routing statistics per MoE layer, against published values",
        None,
        None,
        height=180 + 30 * (len(stats) + 2),
    )


# ---------------------------------------------------------------------- attention
def attention_map_figure(probs: Tensor, spec: LayerSpec, title: str | None = None) -> go.Figure:
    """One head's attention probabilities [Tq, Tk] as a heatmap: row = query, column = key.

    Take it from ``out.attentions[layer][batch, head]`` of a full forward (positions from 0; when
    Tq < Tk the queries are taken to be the last Tq positions). On chunked (RoPE) layers dotted lines
    mark the chunk boundaries: every query sees only keys of its own block, so the map is a staircase of
    triangles. On global (NoPE) layers it is one causal triangle.
    """
    if probs.dim() != 2:
        raise ValueError(f"probs must be [queries, keys] (one head), got shape {tuple(probs.shape)}")
    z = _array(probs)
    num_queries, num_keys = z.shape
    offset = num_keys - num_queries
    queries = np.arange(offset, num_keys)
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=np.arange(num_keys),
            y=queries,
            colorscale="Viridis",
            zmin=0.0,
            colorbar=dict(title=dict(text="probability")),
            hovertemplate="query %{y} → key %{x}: %{z:.3f}<extra></extra>",
        )
    )
    if spec.chunk_size is not None:
        line = dict(color="white", width=1, dash="dot")
        for boundary in range(spec.chunk_size, num_keys, spec.chunk_size):
            edge = boundary - 0.5  # between key boundary - 1 and key boundary
            fig.add_shape(type="line", x0=edge, x1=edge, y0=offset - 0.5, y1=num_keys - 0.5, line=line)
            if boundary > offset:
                fig.add_shape(type="line", x0=-0.5, x1=num_keys - 0.5, y0=edge, y1=edge, line=line)
    fig.update_yaxes(autorange="reversed")
    return _finish(
        fig,
        title or f"Layer {spec.index} ({layer_label(spec)}): attention of one head",
        "key position",
        "query position",
        height=560,
        width=640,
    )


def attention_mass_by_distance(probs: Tensor) -> Tensor:
    """The average query's attention mass at each distance d = query position - key position: [Tk].

    ``probs`` [..., Tq, Tk] (e.g. [B, heads, T, T]); queries are the last Tq positions. Every query's
    row sums to 1, so the result (averaged over queries and all leading dimensions) sums to 1:
    ``mass[d]`` is the share of attention that goes to the token d places back. Early queries cannot look
    far, so long distances are under-represented even for a layer that would like to look far.
    """
    num_queries, num_keys = probs.shape[-2:]
    mean_probs = probs.detach().float().reshape(-1, num_queries, num_keys).mean(0)  # [Tq, Tk]
    query_pos = torch.arange(num_keys - num_queries, num_keys, device=probs.device)[:, None]
    distance = query_pos - torch.arange(num_keys, device=probs.device)[None, :]
    visible = distance >= 0
    mass = torch.zeros(num_keys, device=probs.device)
    mass.index_add_(0, distance[visible], mean_probs[visible])
    return mass / num_queries


def attention_distance_figure(
    attentions: Sequence[Tensor | None], specs: Sequence[LayerSpec], max_distance: int | None = None
) -> go.Figure:
    """How far each layer looks: mean attention mass by query-key distance, one line per layer.

    ``attentions``: ``Llama4(...)(ids, return_attention=True).attentions`` (per layer [B, H, T, T]);
    ``specs``: ``config.layer_plan()``. NoPE (global) layers are solid lines, RoPE layers dotted; a
    chunked layer cannot look further back than its chunk size (a grey line marks it).
    """
    if len(attentions) != len(specs):
        raise ValueError(f"{len(attentions)} attention tensors for {len(specs)} layer specs")
    fig = go.Figure()
    chunk_sizes = set()
    for i, (probs, spec) in enumerate(zip(attentions, specs, strict=True)):
        if probs is None:
            raise ValueError("no attention probabilities: run the model with return_attention=True")
        mass = _array(attention_mass_by_distance(probs))
        if max_distance is not None:
            mass = mass[: max_distance + 1]
        if spec.chunk_size is not None and spec.chunk_size < len(mass):
            chunk_sizes.add(spec.chunk_size)
        fig.add_trace(
            go.Scatter(
                x=np.arange(len(mass)),
                y=mass,
                mode="lines",
                name=f"layer {spec.index}: {layer_label(spec)}",
                line=dict(color=COLOURS[i % len(COLOURS)], dash="solid" if not spec.uses_rope else "dot"),
                hovertemplate=f"layer {spec.index}, distance %{{x}}: %{{y:.3f}}<extra></extra>",
            )
        )
    for chunk in sorted(chunk_sizes):
        _vline(fig, chunk, f"chunk size {chunk}")
    return _finish(
        fig,
        "How far back each layer attends: mean attention mass by distance",
        "distance (query position − key position, tokens)",
        "share of attention",
    )


def temperature_figure(
    floor_scale: float = 8192, attn_scale: float = 0.1, max_position: int = 10_000_000
) -> go.Figure:
    """The factor Llama 4's NoPE layers multiply a query by, against its absolute position (log x).

    ``scale(p) = log(floor((p + 1) / floor_scale) + 1) * attn_scale + 1`` (``l4lab.ops.Temperature``):
    exactly 1 until ``p + 1 = floor_scale``, then a staircase that grows like log p (1.71 at 10M with
    Scout's numbers). Larger query norms make softmax sharper, so that a query can still single out a few
    keys among millions.
    """
    points = np.round(np.logspace(0, math.log10(max_position), 600)).astype(np.int64)
    first_step = [int(floor_scale) - 2, int(floor_scale) - 1]  # drawn exactly: last 1.0, first above
    points = np.unique(np.concatenate([points, [p for p in first_step if 1 <= p <= max_position]]))
    scales = Temperature(floor_scale, attn_scale).scales(torch.from_numpy(points))
    fig = go.Figure(
        go.Scatter(
            x=points,
            y=_array(scales),
            mode="lines",
            line_shape="hv",
            name="query scale",
            hovertemplate="position %{x:,}: ×%{y:.4f}<extra></extra>",
        )
    )
    if floor_scale - 1 <= max_position:
        _vline(fig, floor_scale - 1, f"p + 1 = floor_scale = {floor_scale:g}")
    fig.update_xaxes(type="log")
    return _finish(
        fig,
        f"NoPE attention temperature: queries scaled by log(⌊(p+1)/{floor_scale:g}⌋ + 1)·{attn_scale:g} + 1",
        "query position p (log scale)",
        "query scale factor",
        showlegend=False,
    )


# ---------------------------------------------------------------------- long context
def accuracy_vs_length_figure(
    lengths: Sequence[int],
    accuracies: Mapping[str, Sequence[float]],
    train_length: int | None = None,
) -> go.Figure:
    """Accuracy against test length (log x), one line per model, with a line at the training length.

    ``accuracies`` maps a model's name to its accuracy at each of ``lengths``. Left of the training
    length every model has seen such sequences; right of it the question is how far each one holds up
    (Mamba's Table 11: RoPE induction heads collapse just past it).
    """
    fig = go.Figure()
    for i, (name, values) in enumerate(accuracies.items()):
        if len(values) != len(lengths):
            raise ValueError(f"{name!r} has {len(values)} accuracies for {len(lengths)} lengths")
        fig.add_trace(
            go.Scatter(
                x=np.asarray(lengths),
                y=_array(values),
                mode="lines+markers",
                name=name,
                line=dict(color=COLOURS[i % len(COLOURS)]),
                hovertemplate=f"{name}, length %{{x:,}}: %{{y:.3g}}<extra></extra>",
            )
        )
    if train_length is not None:
        _vline(fig, train_length, f"trained at {_length_label(train_length)}")
    fig.update_xaxes(
        type="log", tickmode="array", tickvals=list(lengths), ticktext=[_length_label(n) for n in lengths]
    )
    return _finish(fig, "Accuracy against sequence length", "test length (tokens, log scale)", "accuracy")


def needle_heatmap(
    depths: Sequence[float], lengths: Sequence[int], accuracy: Tensor | Sequence[Sequence[float]]
) -> go.Figure:
    """Needle in a haystack: retrieval accuracy [len(depths), len(lengths)] by depth and context length.

    ``depths`` are where the needle sits, as fractions of the context (0 = start, 1 = end) or as
    percentages; ``lengths`` the context lengths, shown evenly spaced. Green is found, red is lost.
    """
    z = _array(accuracy)
    if z.shape != (len(depths), len(lengths)):
        raise ValueError(f"accuracy has shape {z.shape}, expected ({len(depths)}, {len(lengths)})")
    fractions = all(0 <= d <= 1 for d in depths)
    percent = bool(np.nanmax(z) > 1) if z.size else False
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=[_length_label(n) for n in lengths],
            y=[f"{d:.0%}" if fractions else f"{d:g}%" for d in depths],
            colorscale="RdYlGn",
            zmin=0.0,
            zmax=100.0 if percent else 1.0,
            texttemplate="%{z:.0f}" if percent else "%{z:.0%}",
            colorbar=dict(title=dict(text="accuracy")),
            hovertemplate="length %{x}, depth %{y}: %{z:.3g}<extra></extra>",
        )
    )
    fig.update_xaxes(type="category")
    fig.update_yaxes(type="category", autorange="reversed")
    return _finish(
        fig,
        "Needle in a haystack: retrieval accuracy by context length and needle depth",
        "context length (tokens)",
        "needle depth (0% = start of the context)",
    )


def kv_cache_memory(
    config: Config, context_lengths: Sequence[int], batch: int = 1, bytes_per_value: int = 2
) -> dict[str, list[int]]:
    """Bytes of KV cache at each context length T: every layer global vs Llama 4's iRoPE plan.

    A layer caches a key and a value (2) for each kept token, batch sequence and KV head:
    ``2 * kept_tokens * batch * num_kv_heads * head_dim * bytes_per_value`` bytes (2 bytes in bf16).

    * ``"all_global"``: every layer keeps all T tokens (Llama 3, or Llama 4 with ``positions="rope"``).
    * ``"irope"``: the layers of ``config.replace(positions="irope").layer_plan()``: global (NoPE) layers
      keep T tokens, chunked (RoPE) layers at most ``min(T, chunk_size)``: the current chunk.

    Scout at 10M tokens in bf16: 12 global layers x 10M x 8 heads x 128 x 2 x 2 bytes = 491.5 GB, plus
    36 chunked layers x 8192 tokens = 1.2 GB, against 1966 GB if all 48 layers were global.
    """
    per_token = 2 * batch * config.num_kv_heads * config.head_dim * bytes_per_value
    plan = config.replace(positions="irope").layer_plan()
    all_global, irope = [], []
    for length in context_lengths:
        length = int(length)
        all_global.append(config.num_layers * length * per_token)
        kept = sum(length if spec.chunk_size is None else min(length, spec.chunk_size) for spec in plan)
        irope.append(kept * per_token)
    return {"all_global": all_global, "irope": irope}


def kv_cache_figure(
    config: Config,
    context_lengths: Sequence[int] | None = None,
    batch: int = 1,
    bytes_per_value: int = 2,
) -> go.Figure:
    """KV cache memory (GB, log-log) against context length: all layers global vs iRoPE.

    ``context_lengths`` default to powers of two from 1K to 8M, then 10M. With Scout's shape
    (``l4lab.preset("llama4-scout")``) the iRoPE cache is a quarter of the all-global one once T is well
    past the chunk size: only every fourth layer keeps everything. A dotted line marks one 80 GB H100.
    """
    if context_lengths is None:
        context_lengths = [1 << k for k in range(10, 24)] + [10_000_000]
    memory = kv_cache_memory(config, context_lengths, batch, bytes_per_value)
    plan = config.replace(positions="irope").layer_plan()
    num_global = sum(spec.chunk_size is None for spec in plan)
    names = {
        "all_global": f"all {config.num_layers} layers global",
        "irope": f"iRoPE: {num_global} global + {config.num_layers - num_global} chunked "
        f"(C={config.attention_chunk_size})",
    }
    fig = go.Figure()
    for i, (key, name) in enumerate(names.items()):
        fig.add_trace(
            go.Scatter(
                x=np.asarray(context_lengths),
                y=np.asarray(memory[key], dtype=np.float64) / 1e9,
                mode="lines+markers",
                name=name,
                line=dict(color=COLOURS[i]),
                hovertemplate="%{x:,} tokens: %{y:.4g} GB<extra></extra>",
            )
        )
    _hline(fig, 80, "one H100: 80 GB", dash="dot")
    fig.update_xaxes(type="log")
    fig.update_yaxes(type="log")
    return _finish(
        fig,
        "KV cache memory against context length<br><sup>"
        f"{config.num_kv_heads} KV heads × {config.head_dim}, K and V, {8 * bytes_per_value}-bit values, "
        f"batch {batch}</sup>",
        "context length (tokens, log scale)",
        "KV cache (GB = 10⁹ bytes, log scale)",
    )


# ---------------------------------------------------------------------- models and training
def parameter_table(configs: Mapping[str, Config]) -> go.Figure:
    """Total and active parameters, layers, width, experts and context of several models, as a table.

    Counts come from ``l4lab.count_params`` (text model only: Scout's published 109B includes its
    vision encoder). Active parameters are those one token passes through.
    """
    columns: list[list[str]] = [[] for _ in range(7)]
    for name, config in configs.items():
        total, active = count_params(config)
        if config.ffn == "dense":
            experts = "dense"
        else:
            experts = f"{config.num_experts} routed + 1 shared, top-{config.top_k}"
            if config.moe_layer_step > 1:
                experts += f", MoE in 1 of {config.moe_layer_step} layers"
        row = [
            name,
            _count_label(total),
            _count_label(active),
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
    return _finish(fig, "Model sizes: total vs active parameters", None, None, height=160 + 30 * len(configs))


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
    return _finish(fig, "Loss curves", "step", "loss (nats per token)")


__all__ = [
    "ROUTING_REFERENCES",
    "TEMPLATE",
    "accuracy_vs_length_figure",
    "attention_distance_figure",
    "attention_map_figure",
    "attention_mass_by_distance",
    "expert_colours",
    "expert_load_figure",
    "kv_cache_figure",
    "kv_cache_memory",
    "layer_label",
    "loss_curves_figure",
    "needle_heatmap",
    "parameter_table",
    "routing_stats_table",
    "specialisation_figure",
    "temperature_figure",
    "token_expert_figure",
]


# ---------------------------------------------------------------------- kernels
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
    return _finish(
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
    return _finish(
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
    return _finish(
        fig,
        title,
        "time / fastest peer's time (lower is better)",
        None,
        height=120 + 28 * len(y_labels),
        margin=dict(l=420),
    )
