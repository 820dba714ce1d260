"""Long-context figures (notebooks 04, 05 and 08): accuracy against test length, needle in a haystack,
the KV cache's memory (all layers global against iRoPE) and while decoding, Gu & Dao's Table 11 beside
l4lab's rows, the streaming prefill's cost per layer type, and passkey retrieval (grid, attention on the
key, attention entropy beside Yang et al. 2025)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots
from torch import Tensor

from l4lab.config import Config, LayerSpec
from l4lab.viz.common import (
    COLOURS,
    finish,
    hline,
    layer_label,
    length_label,
    to_numpy,
    vline,
)


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
                y=to_numpy(values),
                mode="lines+markers",
                name=name,
                line=dict(color=COLOURS[i % len(COLOURS)]),
                hovertemplate=f"{name}, length %{{x:,}}: %{{y:.3g}}<extra></extra>",
            )
        )
    if train_length is not None:
        vline(fig, train_length, f"trained at {length_label(train_length)}")
    fig.update_xaxes(
        type="log", tickmode="array", tickvals=list(lengths), ticktext=[length_label(n) for n in lengths]
    )
    return finish(fig, "Accuracy against sequence length", "test length (tokens, log scale)", "accuracy")


def needle_heatmap(
    depths: Sequence[float], lengths: Sequence[int], accuracy: Tensor | Sequence[Sequence[float]]
) -> go.Figure:
    """Needle in a haystack: retrieval accuracy [len(depths), len(lengths)] by depth and context length.

    ``depths`` are where the needle sits, as fractions of the context (0 = start, 1 = end) or as
    percentages; ``lengths`` the context lengths, shown evenly spaced. Green is found, red is lost.
    """
    z = to_numpy(accuracy)
    if z.shape != (len(depths), len(lengths)):
        raise ValueError(f"accuracy has shape {z.shape}, expected ({len(depths)}, {len(lengths)})")
    fractions = all(0 <= d <= 1 for d in depths)
    percent = bool(np.nanmax(z) > 1) if z.size else False
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=[length_label(n) for n in lengths],
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
    return finish(
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
    hline(fig, 80, "one H100: 80 GB", dash="dot")
    fig.update_xaxes(type="log")
    fig.update_yaxes(type="log")
    return finish(
        fig,
        "KV cache memory against context length<br><sup>"
        f"{config.num_kv_heads} KV heads × {config.head_dim}, K and V, {8 * bytes_per_value}-bit values, "
        f"batch {batch}</sup>",
        "context length (tokens, log scale)",
        "KV cache (GB = 10⁹ bytes, log scale)",
    )


def table11_figure(summary: Mapping[str, Any]) -> go.Figure:
    """Gu & Dao's Table 11 beside l4lab's rows: accuracy (%) against test length / training length.

    ``summary`` is ``benchmarks/results/induction_sweep_256.json`` (trained at the paper's 256) or
    ``induction_sweep.json`` (trained at 64): ``"published"`` rows (trained at 256,
    drawn dashed at x = length / 256) and l4lab's ``"rows"`` (mean over seeds with min-max error bars
    at x = length / their training length). Both axes share one scale, so rows trained at different
    lengths compare at equal multiples of what they saw. Log-length x axis; chance is 1/15 = 6.7%.
    """
    fig = go.Figure()
    published_lengths = summary["published_lengths"]
    for i, (name, values) in enumerate(summary["published"].items()):
        fig.add_trace(
            go.Scatter(
                x=[n / 256 for n in published_lengths],
                y=values,
                mode="lines+markers",
                name=f"{name} (Gu & Dao)",
                line=dict(color="grey", dash=("dash", "dot", "dashdot")[i % 3], width=1.5),
                marker=dict(symbol="x", size=6),
                hovertemplate=f"{name}, published, %{{x:g}}x: %{{y:.1f}}%<extra></extra>",
            )
        )
    for i, row in enumerate(summary["rows"].values()):
        train = row["setup"]["train_length"]
        lengths = sorted(int(n) for n in row["lengths"])
        cells = [row["lengths"][str(n)] for n in lengths]
        fig.add_trace(
            go.Scatter(
                x=[n / train for n in lengths],
                y=[c["mean"] for c in cells],
                error_y=dict(
                    type="data",
                    symmetric=False,
                    array=[c["max"] - c["mean"] for c in cells],
                    arrayminus=[c["mean"] - c["min"] for c in cells],
                    thickness=1,
                ),
                mode="lines+markers",
                name=f"{row['label']} (l4lab, {len(row['seeds'])} seeds)",
                line=dict(color=COLOURS[i % len(COLOURS)]),
                hovertemplate=f"{row['label']}, %{{x:g}}x: %{{y:.1f}}%<extra></extra>",
            )
        )
    vline(fig, 1, "training length")
    hline(fig, 100 / 15, "chance", dash="dot")
    ticks = [2.0**k for k in range(-2, 12)]
    fig.update_xaxes(type="log", tickmode="array", tickvals=ticks, ticktext=[f"{t:g}x" for t in ticks])
    fig.update_yaxes(range=[0, 105])
    return finish(
        fig,
        "Induction heads: accuracy against length (Gu & Dao 2023, Table 11, and l4lab)",
        "test length / training length (log scale)",
        "accuracy (%)",
    )


def prefill_cost_figure(summary: Mapping[str, Any]) -> go.Figure:
    """Seconds per layer against prompt length (log-log), per model and layer type.

    ``summary`` is ``benchmarks/results/long_prefill.json``. A chunked layer's line should rise with
    slope 1 (cost T x C), a global layer's with slope 2 (cost T^2): the fitted exponents are in the
    legend.
    """
    fig = go.Figure()
    series: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for run in summary["runs"]:
        for kind in ("chunked", "global"):
            times = [layer["seconds"] for layer in run["layers"][:-1] if layer["kind"] == kind]
            if times:
                series.setdefault((run["positions"], kind), []).append(
                    (run["length"], sum(times) / len(times))
                )
    for i, ((positions, kind), points) in enumerate(series.items()):
        slope = summary["exponents"].get(f"{positions}, {kind} layers")
        slope_text = "" if slope is None else f", slope {slope:.2f}"
        fig.add_trace(
            go.Scatter(
                x=[p[0] for p in points],
                y=[p[1] for p in points],
                mode="lines+markers",
                name=f"{positions}: {kind} layer{slope_text}",
                line=dict(color=COLOURS[i % len(COLOURS)]),
                hovertemplate="%{x:,} tokens: %{y:.3g} s<extra></extra>",
            )
        )
    fig.update_xaxes(type="log")
    fig.update_yaxes(type="log")
    return finish(
        fig,
        "Streaming prefill: seconds per layer against prompt length",
        "prompt length (tokens, log scale)",
        "seconds per layer (log scale)",
    )


def passkey_grid_figure(summary: Mapping[str, Any]) -> go.Figure:
    """Passkey retrieval: exact match (%) by context length and key depth, one heat map per model.

    ``summary`` is ``benchmarks/results/passkey.json``. Lengths a model was not tested at (the global
    models stop where a row costs minutes) are left blank.
    """
    rows = list(summary["rows"].values())
    if not rows:
        raise ValueError("the summary has no rows: run benchmarks/passkey.py, then --summarise")
    lengths, depths = summary["lengths"], summary["depths"]
    fig = make_subplots(
        rows=len(rows),
        cols=1,
        shared_xaxes=True,
        vertical_spacing=0.04,
        subplot_titles=[f"{row['label']} ({len(row['seeds'])} seeds)" for row in rows],
    )
    for i, row in enumerate(rows, start=1):
        z = np.full((len(depths), len(lengths)), np.nan)
        for cell in row["cells"]:
            z[depths.index(cell["depth"]), lengths.index(cell["length"])] = cell["exact_mean"]
        fig.add_trace(
            go.Heatmap(
                z=z,
                x=[length_label(n) for n in lengths],
                y=[f"{d:.0%}" for d in depths],
                colorscale="RdYlGn",
                zmin=0.0,
                zmax=100.0,
                texttemplate="%{z:.0f}",
                showscale=i == 1,
                colorbar=dict(title=dict(text="exact %")),
                hovertemplate=f"{row['label']}, length %{{x}}, depth %{{y}}: %{{z:.0f}}%<extra></extra>",
            ),
            row=i,
            col=1,
        )
        fig.update_yaxes(type="category", autorange="reversed", title_text="depth", row=i, col=1)
    fig.update_xaxes(type="category")
    return finish(
        fig,
        "Passkey retrieval: exact match by context length and key depth (trained at 64 tokens)",
        "context length (tokens)",
        None,
        height=170 * len(rows) + 120,
    )


def needle_mass_figure(summary: Mapping[str, Any]) -> go.Figure:
    """The question's attention mass on the passkey against context length, per model and layer.

    ``summary`` is ``benchmarks/results/passkey.json`` (its ``mechanism`` entries). A chunked layer sees
    only its chunk, so its mass on a key far back is 0; the global NoPE layer is where retrieval happens.
    """
    fig = go.Figure()
    colour = 0
    for row in summary["rows"].values():
        layers = sorted({m["layer"] for m in row["mechanism"]})
        for layer in layers:
            points = [m for m in row["mechanism"] if m["layer"] == layer]
            fig.add_trace(
                go.Scatter(
                    x=[m["length"] for m in points],
                    y=[m["mass"] for m in points],
                    mode="lines+markers",
                    name=f"{row['label']}: layer {layer}, {points[0]['kind']}",
                    line=dict(color=COLOURS[colour % len(COLOURS)]),
                    hovertemplate="%{x:,} tokens: %{y:.3f}<extra></extra>",
                )
            )
            colour += 1
    fig.update_xaxes(type="log")
    fig.update_yaxes(range=[-0.02, 1.02])
    return finish(
        fig,
        "Attention of the question on the passkey, per layer",
        "context length (tokens, log scale)",
        "attention mass on the key (mean over heads and rows)",
    )


def entropy_beside_yang_figure(summary: Mapping[str, Any]) -> go.Figure:
    """Attention entropy of the question against ln T, ours beside Yang et al. 2025's published values.

    Ours: each global layer of ``benchmarks/results/passkey.json``, trained (temperature tuning on and
    off) and untrained; theirs (RNoPE, arXiv:2501.18795): RoPE and QK-norm layers of language models at
    8K / 32K / 128K. ``ln T`` is the entropy of uniform attention over T keys. What compares is the slope
    against ln T; the levels differ because the tasks do (one needle in filler against language).
    """
    fig = go.Figure()
    colour = 0
    for row in summary["rows"].values():
        for layer in sorted({m["layer"] for m in row["mechanism"]}):
            points = [m for m in row["mechanism"] if m["layer"] == layer]
            if points[0]["kind"] == "chunked RoPE":
                continue
            for key, dash, suffix in (("entropy", "solid", ""), ("untrained_entropy", "dot", ", untrained")):
                if suffix and not row["temperature"]:
                    continue  # the untrained control once per model: its temperature-on line
                fig.add_trace(
                    go.Scatter(
                        x=[np.log(m["length"]) for m in points],
                        y=[m[key] for m in points],
                        mode="lines+markers",
                        name=f"{row['label']}: layer {layer}, {points[0]['kind']}{suffix}",
                        line=dict(color=COLOURS[colour % len(COLOURS)], dash=dash),
                        hovertemplate="ln T %{x:.2f}: %{y:.2f} nats<extra></extra>",
                    )
                )
            colour += 1
    yang = summary["yang_2025"]
    for key, name, symbol in (
        ("rope_layers", "RoPE layers", "x"),
        ("qk_norm_layers", "QK-norm layers", "cross"),
    ):
        fig.add_trace(
            go.Scatter(
                x=[np.log(n) for n in yang["lengths"]],
                y=yang[key],
                mode="lines+markers",
                name=f"Yang et al. 2025, {name} (language)",
                line=dict(color="grey", dash="dash" if symbol == "x" else "dashdot", width=1.5),
                marker=dict(symbol=symbol, size=8),
                hovertemplate=f"Yang et al., {name}, ln T %{{x:.2f}}: %{{y:.2f}} nats<extra></extra>",
            )
        )
    span = [np.log(min(m["length"] for r in summary["rows"].values() for m in r["mechanism"])), np.log(2**17)]
    fig.add_trace(
        go.Scatter(
            x=span,
            y=span,
            mode="lines",
            name="ln T (uniform attention)",
            line=dict(color="black", dash="dot"),
        )
    )
    return finish(
        fig,
        "Attention entropy of the question against ln T: l4lab (passkey) beside Yang et al. 2025",
        "ln T (T: context length in tokens)",
        "entropy (nats)",
    )


def cache_trace_figure(
    plan: Sequence[LayerSpec],
    irope_lengths: Sequence[Sequence[int]],
    rope_lengths: Sequence[Sequence[int]],
    irope_bytes: Sequence[int],
    rope_bytes: Sequence[int],
) -> go.Figure:
    """What a KV cache holds while decoding, step by step: keys per layer (left), whole cache (right).

    ``*_lengths[t][layer]`` are ``cache.lengths()`` and ``*_bytes[t]`` ``cache.nbytes()`` after decode
    step ``t + 1`` (notebook 05), for the same weights under iRoPE (``plan``: its ``layer_plan()``) and with
    every layer global (``positions="rope"``). Chunked layers are dotted: their keys drop to 0 at every
    chunk boundary; a global layer's line is the diagonal, drawn once for RoPE since all its layers are
    alike.
    """
    steps = list(range(1, len(irope_lengths) + 1))
    if not (len(rope_lengths) == len(irope_bytes) == len(rope_bytes) == len(steps)):
        raise ValueError("the four traces must have one entry per decode step")
    fig = make_subplots(
        rows=1,
        cols=2,
        subplot_titles=("Keys held per layer", "Whole KV cache"),
        horizontal_spacing=0.12,
    )
    for spec in plan:
        fig.add_scatter(
            x=steps,
            y=[held[spec.index] for held in irope_lengths],
            name=f"iRoPE layer {spec.index}: {layer_label(spec)}",
            line=dict(color=COLOURS[spec.index % len(COLOURS)], dash="dot" if spec.chunk_size else "solid"),
            row=1,
            col=1,
        )
    fig.add_scatter(
        x=steps,
        y=[held[0] for held in rope_lengths],
        name="RoPE: every layer (global)",
        line=dict(color="grey", dash="dash"),
        row=1,
        col=1,
    )
    whole_cache = {
        "iRoPE, whole cache": (irope_bytes, dict(color="black")),
        "RoPE (all global), whole cache": (rope_bytes, dict(color="grey", dash="dash")),
    }
    for name, (nbytes, line) in whole_cache.items():
        fig.add_scatter(x=steps, y=[b / 1024 for b in nbytes], name=name, line=line, row=1, col=2)
    fig.update_xaxes(title_text="tokens in the context")
    fig.update_yaxes(title_text="keys cached", row=1, col=1)
    fig.update_yaxes(title_text="KiB", row=1, col=2)
    return finish(
        fig, "The KV cache while decoding: iRoPE against every layer global", None, None, height=420
    )
