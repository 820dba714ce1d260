"""Attention figures (notebooks 00, 02 and 04): one head's attention map, attention mass by distance per
layer, and the temperature of NoPE layers against position."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go
import torch
from torch import Tensor

from l4lab.config import LayerSpec
from l4lab.ops import Temperature
from l4lab.viz.common import (
    COLOURS,
    finish,
    layer_label,
    to_numpy,
    vline,
)

LOG_FLOOR = 1e-4  # the smallest probability a log-scaled attention map tells apart


def attention_map_figure(
    probs: Tensor, spec: LayerSpec, title: str | None = None, scale: str = "linear"
) -> go.Figure:
    """One head's attention probabilities [Tq, Tk] as a heatmap: row = query, column = key.

    Take it from ``out.attentions[layer][batch, head]`` of a full forward (positions from 0; when
    Tq < Tk the queries are taken to be the last Tq positions). On chunked (RoPE) layers dotted lines
    mark the chunk boundaries: every query sees only keys of its own block, so the map is a staircase of
    triangles. On global (NoPE) layers it is one causal triangle.

    ``scale="linear"`` colours the probability itself: a few large weights dominate and a head that
    spreads its attention looks empty. ``scale="log"`` colours log10 of the probability from
    log10(:data:`LOG_FLOOR`) = -4 to 0, so small and spread-out weights show; keys a query cannot see
    (probability exactly 0) stay blank. Hovering shows the probability either way.
    """
    if probs.dim() != 2:
        raise ValueError(f"probs must be [queries, keys] (one head), got shape {tuple(probs.shape)}")
    if scale not in ("linear", "log"):
        raise ValueError(f"scale must be 'linear' or 'log', got {scale!r}")
    p = to_numpy(probs)
    num_queries, num_keys = p.shape
    offset = num_keys - num_queries
    queries = np.arange(offset, num_keys)
    if scale == "log":
        z = np.where(p > 0, np.log10(np.maximum(p, LOG_FLOOR)), np.nan)
        colour = dict(zmin=math.log10(LOG_FLOOR), zmax=0.0)
        colorbar = dict(
            title=dict(text="probability (log)"),
            tickvals=list(range(round(math.log10(LOG_FLOOR)), 1)),
            ticktext=[f"1e{k}" if k else "1" for k in range(round(math.log10(LOG_FLOOR)), 1)],
        )
    else:
        z, colour, colorbar = p, dict(zmin=0.0), dict(title=dict(text="probability"))
    fig = go.Figure(
        go.Heatmap(
            z=z,
            customdata=p,
            x=np.arange(num_keys),
            y=queries,
            colorscale="Viridis",
            colorbar=colorbar,
            hovertemplate="query %{y} → key %{x}: %{customdata:.3g}<extra></extra>",
            **colour,
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
    return finish(
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
        mass = to_numpy(attention_mass_by_distance(probs))
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
        vline(fig, chunk, f"chunk size {chunk}")
    return finish(
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
            y=to_numpy(scales),
            mode="lines",
            line_shape="hv",
            name="query scale",
            hovertemplate="position %{x:,}: ×%{y:.4f}<extra></extra>",
        )
    )
    if floor_scale - 1 <= max_position:
        vline(fig, floor_scale - 1, f"p + 1 = floor_scale = {floor_scale:g}")
    fig.update_xaxes(type="log")
    return finish(
        fig,
        f"NoPE attention temperature: queries scaled by log(⌊(p+1)/{floor_scale:g}⌋ + 1)·{attn_scale:g} + 1",
        "query position p (log scale)",
        "query scale factor",
        showlegend=False,
    )


def attention_row_entropy(probs: Tensor, spec: LayerSpec) -> tuple[Tensor, Tensor]:
    """Each query's attention entropy (nats) and the entropy of uniform attention over what it may see.

    ``probs`` [..., T, T] from a full forward (queries and keys at positions 0..T-1) of a layer with
    ``spec``. Returns ``(entropy, uniform)``, both [..., T]: ``entropy[i] = -sum_j a_ij ln a_ij`` and
    ``uniform[i] = ln n_i``, with n_i the keys query i may see (i + 1 on a global causal layer, its
    position within the chunk + 1 on a chunked one). A ratio near 1 is a head that spreads its attention
    evenly; near 0, one that looks at a single key.
    """
    if probs.dim() < 2 or probs.shape[-1] != probs.shape[-2]:
        raise ValueError(f"probs must be [..., T, T] from a full forward, got shape {tuple(probs.shape)}")
    p = probs.double()
    entropy = -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(-1)
    position = torch.arange(p.shape[-1], dtype=torch.float64)
    visible = position + 1 if spec.chunk_size is None else position % spec.chunk_size + 1
    return entropy, visible.log().expand_as(entropy)
