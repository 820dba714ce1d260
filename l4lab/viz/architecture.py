"""Pictures of the architecture, drawn from a config's ``layer_plan()`` so that they cannot lie.

:func:`layer_stack_figure` draws whole models layer by layer (RoPE or NoPE, chunked or global, MoE or
dense); :func:`decoder_layer_figure` one decoder layer with its norms, attention and feed-forward;
:func:`moe_block_figure` the mixture-of-experts block with its router, routed experts and shared expert.
Every label comes from the config and its resolved :class:`~l4lab.config.LayerSpec`, so a changed
toggle or field changes the picture.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from itertools import pairwise

import plotly.graph_objects as go

from l4lab.config import Config, LayerSpec
from l4lab.viz.common import FONT, TEMPLATE

# one colour per kind of layer, the same in every figure of this module
KIND_COLOURS = {
    "RoPE, chunked": "#4C78A8",
    "RoPE, global": "#9ECAE9",
    "NoPE, global, temperature tuned": "#F58518",
    "NoPE, global": "#FFBF79",
    "MoE": "#54A24B",
    "dense": "#B8B8B8",
}
MOST_EXPERTS_DRAWN = 8  # more experts than this are drawn as the first few, a gap and the last


def attention_kind(spec: LayerSpec) -> str:
    """The layer's attention as one of the keys of :data:`KIND_COLOURS` ("RoPE, chunked", ...)."""
    reach = "chunked" if spec.chunk_size is not None else "global"
    if spec.uses_rope:
        return f"RoPE, {reach}"
    return f"NoPE, {reach}, temperature tuned" if spec.temperature_tuning else f"NoPE, {reach}"


def ffn_kind(spec: LayerSpec) -> str:
    """The layer's feed-forward: "MoE" or "dense"."""
    return "MoE" if spec.moe else "dense"


def layer_stack_figure(configs: Mapping[str, Config]) -> go.Figure:
    """Whole models layer by layer: per model, a row of attention cells and a row of feed-forward cells.

    A cell's colour is its layer's kind from ``config.layer_plan()`` (RoPE chunked / RoPE global / NoPE,
    MoE / dense); hovering shows the layer's full description (chunk size, QK norm, experts). One trace
    per (model, kind), whose x values are the layers of that kind.
    """
    if not configs:
        raise ValueError(
            "configs is empty: pass {name: config}, e.g. {'Scout': l4lab.preset('llama4-scout')}"
        )
    fig = go.Figure()
    rows = []
    shown: set[str] = set()
    most_layers = max(config.num_layers for config in configs.values())
    size = max(6, min(22, 560 // most_layers))  # squares that do not overlap on the longest model
    for name, config in configs.items():
        plan = config.layer_plan()
        for row, kind_of, describe in (
            (f"{name} · attention", attention_kind, _attention_text),
            (f"{name} · FFN", ffn_kind, lambda s, c=config: _ffn_text(s, c)),
        ):
            rows.append(row)
            for kind in KIND_COLOURS:
                layers = [spec for spec in plan if kind_of(spec) == kind]
                if not layers:
                    continue
                fig.add_scatter(
                    x=[spec.index for spec in layers],
                    y=[row] * len(layers),
                    mode="markers",
                    marker=dict(symbol="square", size=size, color=KIND_COLOURS[kind]),
                    name=kind,
                    legendgroup=kind,
                    showlegend=kind not in shown,
                    customdata=[describe(spec).replace("<br>", "; ") for spec in layers],
                    hovertemplate=f"{name}, layer %{{x}}: %{{customdata}}<extra></extra>",
                )
                shown.add(kind)
    fig.update_yaxes(categoryorder="array", categoryarray=rows[::-1], showgrid=False)
    fig.update_xaxes(title="layer", showgrid=False, zeroline=False)
    fig.update_layout(
        template=TEMPLATE,
        font=FONT,
        title=dict(text="Layer by layer: attention and feed-forward of each layer", x=0.02, xanchor="left"),
        height=140 + 50 * len(rows),
        legend=dict(orientation="h", y=-0.25 - 0.6 / len(rows)),
        margin=dict(l=160),
    )
    return fig


# ---------------------------------------------------------------------- block diagrams
@dataclass(frozen=True)
class _Box:
    x: float  # centre
    y: float
    width: float
    height: float
    text: str
    colour: str = "#FFFFFF"


def _diagram(
    boxes: list[_Box], arrows: list[tuple[float, float, float, float]], title: str, **size: int
) -> go.Figure:
    """Boxes with centred text, and arrows (x0, y0) -> (x1, y1), on hidden axes in data units."""
    fig = go.Figure()
    for box in boxes:
        fig.add_shape(
            type="rect",
            x0=box.x - box.width / 2,
            x1=box.x + box.width / 2,
            y0=box.y - box.height / 2,
            y1=box.y + box.height / 2,
            line=dict(color="#555555", width=1.2),
            fillcolor=box.colour,
            layer="below",
        )
        fig.add_annotation(x=box.x, y=box.y, text=box.text, showarrow=False, font=dict(size=12))
    for x0, y0, x1, y1 in arrows:
        fig.add_annotation(
            x=x1, y=y1, ax=x0, ay=y0, xref="x", yref="y", axref="x", ayref="y", text="", showarrow=True,
            arrowhead=2, arrowwidth=1.3, arrowcolor="#555555",
        )  # fmt: skip
    xs = [b.x - b.width / 2 for b in boxes] + [b.x + b.width / 2 for b in boxes]
    ys = [b.y - b.height / 2 for b in boxes] + [b.y + b.height / 2 for b in boxes]
    fig.update_xaxes(visible=False, range=[min(xs) - 0.2, max(xs) + 0.2])
    fig.update_yaxes(visible=False, range=[min(ys) - 0.2, max(ys) + 0.2])
    fig.update_layout(
        template=TEMPLATE,
        font=FONT,
        title=dict(text=title, x=0.02, xanchor="left"),
        margin=dict(l=10, r=10, t=50, b=10),
        **size,
    )
    return fig


def _attention_text(spec: LayerSpec) -> str:
    if spec.uses_rope:
        positions = "RoPE on q and k" + (", then QK norm" if spec.qk_norm else "")
    else:
        positions = "no positions (NoPE)" + (", queries × s(p)" if spec.temperature_tuning else "")
    reach = (
        f"chunked causal mask, C = {spec.chunk_size:,}"
        if spec.chunk_size is not None
        else "global causal mask"
    )
    return f"{positions}<br>{reach}"


def _ffn_text(spec: LayerSpec, config: Config) -> str:
    if spec.moe:
        return (
            f"MoE: router picks {config.top_k} of {config.num_experts} experts (width "
            f"{config.moe_intermediate_size:,})<br>+ shared expert (width {config.moe_intermediate_size:,})"
        )
    return f"dense SwiGLU, width {config.dense_intermediate_size:,}"


def decoder_layer_figure(config: Config, layer: int) -> go.Figure:
    """One decoder layer of ``config`` as a block diagram, from its ``layer_plan()[layer]``.

    Bottom to top: the residual stream x, RMSNorm, grouped-query attention (its positions and mask from
    the layer's spec), the residual add, RMSNorm, the feed-forward (MoE or dense SwiGLU), the residual
    add: ``h = x + attn(norm(x))``, ``out = h + ffn(norm(h))``.
    """
    plan = config.layer_plan()
    if not 0 <= layer < len(plan):
        raise ValueError(f"layer {layer} is out of range: the model has layers 0 to {len(plan) - 1}")
    spec = plan[layer]
    d = config.hidden_size
    heads = (
        f"grouped-query attention: {config.num_heads} query / {config.num_kv_heads} KV heads"
        f" of {config.head_dim}"
    )
    boxes = [
        _Box(3.0, 0.4, 3.6, 0.5, f"x: residual stream [T, {d:,}]"),
        _Box(3.0, 1.3, 2.0, 0.5, "RMSNorm", "#EEEEEE"),
        _Box(3.0, 2.45, 5.6, 1.0, f"{heads}<br>{_attention_text(spec)}", KIND_COLOURS[attention_kind(spec)]),
        _Box(3.0, 3.55, 0.5, 0.45, "+"),
        _Box(3.0, 4.4, 2.0, 0.5, "RMSNorm", "#EEEEEE"),
        _Box(3.0, 5.45, 5.6, 0.9, _ffn_text(spec, config), KIND_COLOURS[ffn_kind(spec)]),
        _Box(3.0, 6.5, 0.5, 0.45, "+"),
        _Box(
            3.0,
            7.35,
            3.6,
            0.5,
            f"to layer {layer + 1}" if layer + 1 < len(plan) else "final RMSNorm, LM head",
        ),
    ]
    centre = [(3.0, a.y + a.height / 2, 3.0, b.y - b.height / 2) for a, b in pairwise(boxes)]
    fig = _diagram(
        boxes,
        centre,
        f"Layer {layer} of {config.num_layers}: {attention_kind(spec)}, {ffn_kind(spec)}",
        height=560,
        width=620,
    )
    # the residual connections skip the norm and the block: x to the first +, h to the second
    for x0, y0, x1, y1 in (
        (1.2, 0.4, 0.0, 0.4),
        (0.0, 0.4, 0.0, 6.5),
        (0.0, 3.55, 2.75, 3.55),
        (0.0, 6.5, 2.75, 6.5),
    ):
        fig.add_shape(type="line", x0=x0, y0=y0, x1=x1, y1=y1, line=dict(color="#999999", dash="dot"))
    fig.add_annotation(
        x=0.0,
        y=2.0,
        text="residual",
        textangle=-90,
        showarrow=False,
        xshift=-10,
        font=dict(size=11, color="#777777"),
    )
    fig.update_xaxes(range=[-0.5, 6.0])
    return fig


def moe_block_figure(config: Config) -> go.Figure:
    """The mixture-of-experts block of ``config``: router, routed experts and shared expert.

    Left to right: the token x goes to the router (``x W_r^T``, top-k of the raw logits, a sigmoid
    score s for each chosen expert), the chosen experts run on ``s · x`` (the score scales the input),
    the shared expert runs on every token unscaled, and the outputs are summed. At most
    :data:`MOST_EXPERTS_DRAWN` experts are drawn: the first ones, a gap, and the last one.
    """
    if not any(spec.moe for spec in config.layer_plan()):
        raise ValueError("this config has no MoE layer (ffn='dense'): pass a config with ffn='moe'")
    E, k, width = config.num_experts, config.top_k, config.moe_intermediate_size
    drawn = list(range(E)) if E <= MOST_EXPERTS_DRAWN else [*range(MOST_EXPERTS_DRAWN - 2), None, E - 1]
    top = 0.6 * (len(drawn) - 1)
    boxes = [
        _Box(0.6, top / 2, 1.0, 0.6, "token x"),
        _Box(
            2.3,
            top / 2,
            1.8,
            1.2,
            f"router<br>x W<sub>r</sub><sup>T</sup>: {E} logits<br>top-{k}, then sigmoid → s",
            "#EEEEEE",
        ),
    ]
    arrows = [(1.1, top / 2, 1.4, top / 2)]
    for row, expert in enumerate(drawn):
        y = top - 0.6 * row
        if expert is None:
            boxes.append(_Box(4.6, y, 1.6, 0.4, f"… {E - len(drawn) + 1} more …"))
            continue
        chosen = expert < k  # draw the first k experts as the chosen ones
        boxes.append(
            _Box(4.6, y, 1.6, 0.45, f"expert {expert}", KIND_COLOURS["MoE"] if chosen else "#FFFFFF")
        )
        if chosen:
            arrows.append((3.2, top / 2, 3.8, y))
            arrows.append((5.4, y, 6.5, top / 2))
    boxes.append(
        _Box(4.6, -0.9, 1.6, 0.5, f"shared expert: every token,<br>unscaled, width {width:,}", "#D9EAD3")
    )
    boxes.append(_Box(6.8, top / 2, 0.5, 0.45, "+"))
    boxes.append(_Box(8.0, top / 2, 1.2, 0.6, "MoE(x)"))
    arrows += [
        (0.6, top / 2 - 0.3, 3.8, -0.9),
        (5.4, -0.9, 6.6, top / 2 - 0.2),
        (7.05, top / 2, 7.4, top / 2),
    ]
    fig = _diagram(
        boxes,
        arrows,
        f"MoE block: {k} of {E} routed experts on s·x (SwiGLU, width {width:,}), plus a shared expert",
        height=300 + 30 * len(drawn),
        width=760,
    )
    fig.add_annotation(x=3.55, y=top / 2 + 0.35, text="s·x", showarrow=False, font=dict(size=11))
    return fig
