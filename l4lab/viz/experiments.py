"""Measurements with their spread (notebooks 03 and 05): curves over seeds, and decoding time."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go

from l4lab.viz.common import COLOURS, finish, hline

Curve = Sequence[Sequence[float]]  # [[step, value], ...]


def seed_statistics(curves: Mapping[str, Curve]) -> dict[str, np.ndarray]:
    """Mean, min and max over seeds, step by step, of curves {seed: [[step, value], ...]}.

    Every seed must have measured the same steps. Returns ``{"step", "mean", "min", "max"}`` arrays.
    """
    if not curves:
        raise ValueError("curves is empty: pass {seed: [[step, value], ...]} for at least one seed")
    steps = {tuple(point[0] for point in curve) for curve in curves.values()}
    if len(steps) != 1:
        raise ValueError(f"every seed must be measured at the same steps, got {sorted(steps)}")
    values = np.array([[point[1] for point in curve] for curve in curves.values()], dtype=np.float64)
    return {
        "step": np.array(next(iter(steps)), dtype=np.float64),
        "mean": values.mean(0),
        "min": values.min(0),
        "max": values.max(0),
    }


def seed_spread_figure(
    runs: Mapping[str, Mapping[str, Curve]], title: str, y_title: str, zero_line: str | None = None
) -> go.Figure:
    """Per run, every seed's curve (thin), their mean (bold) and the band from their min to their max.

    ``runs`` maps a run's name to ``{seed: [[step, value], ...]}``. A difference is supported where the
    bands of two runs (or one run's band and ``zero_line``, a label for y = 0) do not overlap; where
    they do, the seeds disagree and one seed's curve says nothing.
    """
    fig = go.Figure()
    for i, (name, curves) in enumerate(runs.items()):
        colour = COLOURS[i % len(COLOURS)]
        stats = seed_statistics(curves)
        band_x = np.concatenate([stats["step"], stats["step"][::-1]])
        band_y = np.concatenate([stats["max"], stats["min"][::-1]])
        fig.add_scatter(
            x=band_x,
            y=band_y,
            fill="toself",
            fillcolor=colour,
            opacity=0.15,
            line=dict(width=0),
            name=f"{name}: min to max of {len(curves)} seeds",
            legendgroup=name,
            hoverinfo="skip",
        )
        for seed, curve in curves.items():
            fig.add_scatter(
                x=[point[0] for point in curve],
                y=[point[1] for point in curve],
                mode="lines",
                line=dict(color=colour, width=0.8),
                opacity=0.5,
                name=f"{name}, seed {seed}",
                legendgroup=name,
                showlegend=False,
                hovertemplate=f"{name}, seed {seed}, step %{{x}}: %{{y:.3f}}<extra></extra>",
            )
        fig.add_scatter(
            x=stats["step"],
            y=stats["mean"],
            mode="lines+markers",
            line=dict(color=colour, width=3),
            name=f"{name}: mean",
            legendgroup=name,
            hovertemplate=f"{name}, mean, step %{{x}}: %{{y:.3f}}<extra></extra>",
        )
    if zero_line is not None:
        hline(fig, 0.0, zero_line)
    return finish(fig, title, "step", y_title)


def decode_time_figure(lengths: Sequence[int], times: Mapping[str, Sequence[float]]) -> go.Figure:
    """Milliseconds to produce one token against the context length, with and without a KV cache.

    ``times`` is what ``l4lab.cache.time_per_token`` returns: ``{"cached": [...], "uncached": [...]}``
    seconds per token at each of ``lengths``. Both axes are logarithmic: a cost that grows in proportion
    to the context is a line of slope 1, a constant cost a flat line.
    """
    fig = go.Figure()
    labels = {"uncached": "without a cache (whole sequence again)", "cached": "with the KV cache (one token)"}
    for i, key in enumerate(("uncached", "cached")):
        fig.add_scatter(
            x=list(lengths),
            y=[1e3 * t for t in times[key]],
            mode="lines+markers",
            line=dict(color=COLOURS[i]),
            name=labels[key],
            hovertemplate=f"{key}, context %{{x}}: %{{y:.2f}} ms per token<extra></extra>",
        )
    fig.update_xaxes(type="log")
    fig.update_yaxes(type="log")
    return finish(fig, "Time to produce one token", "context length (tokens)", "milliseconds per token")
