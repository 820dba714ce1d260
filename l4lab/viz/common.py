"""What every figure shares: the template, font and colours, and small layout helpers (axis lines with
a label, number formats, a layer's attention in words, one colour per expert)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.colors import qualitative, sample_colorscale
from torch import Tensor

from l4lab.config import LayerSpec

TEMPLATE = "plotly_white"
FONT = dict(family="Arial, sans-serif", size=13)
COLOURS = qualitative.Plotly  # one colour per model or layer, in order


def to_numpy(x: Tensor | Sequence[Any] | np.ndarray) -> np.ndarray:
    """A float64 numpy copy of a tensor (any dtype, any device), list or array."""
    if isinstance(x, Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    if isinstance(x, (list, tuple)) and x and isinstance(x[0], Tensor):
        return np.stack([to_numpy(item) for item in x])
    return np.asarray(x, dtype=np.float64)


def finish(fig: go.Figure, title: str, x_title: str | None, y_title: str | None, **layout: Any) -> go.Figure:
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


def count_label(n: float) -> str:
    """Parameter counts the way papers write them: 107.8B, 17.17B, 1.23M, 950."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.4g}{unit}"
    return f"{n:g}"


def length_label(n: int) -> str:
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


def vline(fig: go.Figure, x: float, label: str, **line: Any) -> None:
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


def hline(fig: go.Figure, y: float, label: str, **line: Any) -> None:
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


def expert_colours(num_experts: int) -> list[str]:
    """One colour per expert: distinct light colours up to 24 experts, a smooth scale beyond."""
    if num_experts <= len(qualitative.Light24):
        return list(qualitative.Light24[:num_experts])
    return sample_colorscale("Turbo", [i / (num_experts - 1) for i in range(num_experts)])
