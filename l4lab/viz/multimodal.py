"""Multimodal figures (notebook 07): an image's path to tokens, drawn on the image itself, the prompt
layout, where a multimodal model's parameters go, and what a trained one does: accuracy per question
type of early fusion against a late adapter and a blind model, routing of image and text tokens, and
the attention of the answer to the picture (grounding)."""

from __future__ import annotations

import base64
import re
import struct
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots
from torch import Tensor

from l4lab.config import Config, VisionConfig, count_params, vision_parameters
from l4lab.images import ImageProcessor, ProcessedImages
from l4lab.viz.common import COLOURS, count_label, finish, to_numpy


def png_data_url(pixels: np.ndarray) -> str:
    """An H x W x 3 uint8 picture as a ``data:image/png`` URL (a PNG written with zlib, no imaging
    library): a figure holds the compressed picture instead of every pixel value as JSON."""
    height, width = pixels.shape[:2]
    rows = b"".join(b"\x00" + row.tobytes() for row in np.ascontiguousarray(pixels, dtype=np.uint8))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    png = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows, 9))
        + chunk(b"IEND", b"")
    )
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _picture(pixels: np.ndarray) -> go.Image:
    return go.Image(source=png_data_url(pixels), hoverinfo="skip")


def _lines(fig: go.Figure, xs: list[float], ys: list[float], colour: str, width: float) -> None:
    """A grid on the first panel: vertical lines at ``xs`` and horizontal lines at ``ys``."""
    line = dict(color=colour, width=width)
    for x in xs:
        fig.add_shape(type="line", x0=x, x1=x, y0=min(ys), y1=max(ys), line=line, xref="x", yref="y")
    for y in ys:
        fig.add_shape(type="line", x0=min(xs), x1=max(xs), y0=y, y1=y, line=line, xref="x", yref="y")


def tiles_figure(image: np.ndarray, processed: ProcessedImages, processor: ImageProcessor) -> go.Figure:
    """The image on the canvas the processor chose, cut into tiles, beside the global tile.

    ``image``: the H x W x 3 uint8 picture; ``processed``: what ``processor(image)`` returned. The left
    panel puts the tiles back together: the resized image (dashed outline) at the top left of its canvas,
    padded with black, and the tile boundaries; the right panel shows the whole picture squeezed into
    one more tile (when there are several).
    """
    height, width = image.shape[:2]
    size = processor.tile_size
    (canvas_h, canvas_w), (fit_h, fit_w) = processor.placement(height, width)
    rows, columns = canvas_h // size, canvas_w // size
    several = rows * columns > 1
    tiles = tile_pictures(processed)
    canvas = tiles[: rows * columns].reshape(rows, columns, size, size, 3).transpose(0, 2, 1, 3, 4)
    fig = make_subplots(
        rows=1,
        cols=2 if several else 1,
        column_widths=[0.75, 0.25] if several else None,
        subplot_titles=[
            f"{height} x {width} pixels, resized to {fit_h} x {fit_w}: {rows} x {columns} tiles of {size}",
            *(["+ the global tile"] if several else []),
        ],
    )
    fig.add_trace(_picture(canvas.reshape(canvas_h, canvas_w, 3)), row=1, col=1)
    _lines(
        fig,
        [c * size - 0.5 for c in range(columns + 1)],
        [r * size - 0.5 for r in range(rows + 1)],
        "white",
        3,
    )
    fig.add_shape(
        type="rect",
        x0=-0.5,
        y0=-0.5,
        x1=fit_w - 0.5,
        y1=fit_h - 0.5,
        line=dict(color=COLOURS[1], width=3, dash="dash"),
    )
    if several:
        fig.add_trace(_picture(tiles[-1]), row=1, col=2)
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return finish(fig, "", None, None, height=380)


def patches_figure(tile: np.ndarray, vision: VisionConfig) -> go.Figure:
    """One tile with its patch grid (thin lines) and the groups the pixel shuffle merges into one token
    (thick lines): 24 x 24 = 576 patches -> 12 x 12 = 144 tokens for Llama 4."""
    side, patch, factor = vision.patches_per_side, vision.patch_size, vision.shuffle_factor
    fig = go.Figure(_picture(tile))
    edges = [k * patch - 0.5 for k in range(side + 1)]
    _lines(fig, edges, edges, "rgba(255,255,255,0.45)", 0.6)
    groups = [k * patch * factor - 0.5 for k in range(side // factor + 1)]
    _lines(fig, groups, groups, "white", 2)
    title = (
        f"{side} x {side} = {side * side} patches of {patch} pixels -> pixel shuffle -> "
        f"{side // factor} x {side // factor} = {vision.tokens_per_tile} tokens"
    )
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return finish(fig, title, None, None, height=560, width=560)


def _as_pixels(pixel_values: Tensor) -> np.ndarray:
    """Normalised tiles [N, 3, S, S] in [-1, 1] -> uint8 pictures [N, S, S, 3]."""
    values = pixel_values.float().clamp(-1, 1).permute(0, 2, 3, 1).numpy()
    return np.round((values + 1) / 2 * 255).astype(np.uint8)


def tile_pictures(processed: ProcessedImages) -> np.ndarray:
    """The processor's tiles as uint8 pictures [tiles, S, S, 3], for drawing."""
    return _as_pixels(processed.pixel_values)


def layout_summary(layout: str) -> str:
    """A prompt layout with each run of identical tokens written once with its count: ``<|patch|> x144``."""
    tokens = re.findall(r"<\|[a-z_]+\|>", layout)
    out: list[str] = []
    run = 0
    for i, token in enumerate(tokens):
        run += 1
        if i + 1 == len(tokens) or tokens[i + 1] != token:
            out.append(token if run == 1 else f"{token} x{run}")
            run = 0
    return " ".join(out)


def parameter_parts(config: Config) -> dict[str, int]:
    """Where a multimodal config's parameters go: the text model, then each part of the vision side."""
    if config.vision is None:
        raise ValueError("config.vision is None: a text config has no vision parameters")
    text = count_params(config.replace(vision=None))[0]
    return {"text model": text, **vision_parameters(config.vision, config.hidden_size)}


def parameters_figure(parts: dict[str, int]) -> go.Figure:
    """A bar per part of :func:`parameter_parts`, on a log scale (the text model dwarfs the rest)."""
    names = list(parts)
    fig = go.Figure(
        go.Bar(
            x=[parts[n] for n in names],
            y=names,
            orientation="h",
            text=[count_label(parts[n]) for n in names],
            textposition="outside",
            marker_color=[COLOURS[0] if n == "text model" else COLOURS[1] for n in names],
        )
    )
    fig.update_xaxes(type="log")
    fig.update_yaxes(autorange="reversed")
    return finish(fig, "Where the parameters go (log scale)", "parameters", None, height=340)


# ---------------------------------------------------------------------- a trained multimodal model
def _seed_values(runs: Sequence[Mapping[str, Any]], *keys: str) -> list[float]:
    values = []
    for run in runs:
        value: Any = run
        for key in keys:
            value = value[key]
        values.append(float(value))
    return values


def fusion_accuracy_figure(results: Mapping[str, Any]) -> go.Figure:
    """Accuracy (%) per question type and variant: a bar at the mean of the seeds, a dot per seed, and
    the chance level of each type (a grey dash): what a model that cannot see the picture scores.

    ``results`` is ``benchmarks/results/multimodal_fusion.json`` as a dict (``runs``, ``variants``,
    ``question_types``, ``chance``)."""
    kinds, runs = results["question_types"], results["runs"]
    fig = go.Figure()
    for i, variant in enumerate(results["variants"]):
        colour = COLOURS[i % len(COLOURS)]
        per_seed = {kind: [100 * v for v in _seed_values(runs, "accuracy", variant, kind)] for kind in kinds}
        fig.add_bar(
            x=kinds,
            y=[float(np.mean(per_seed[kind])) for kind in kinds],
            name=f"{variant} (mean of {len(runs)} seeds)",
            marker_color=colour,
            opacity=0.75,
            offsetgroup=variant,
            hovertemplate=f"{variant}, %{{x}}: mean %{{y:.1f}}%<extra></extra>",
        )
        fig.add_scatter(
            x=[kind for kind in kinds for _ in runs],
            y=[value for kind in kinds for value in per_seed[kind]],
            mode="markers",
            marker=dict(color="black", size=5),
            name=f"{variant}: one seed",
            offsetgroup=variant,
            showlegend=i == 0,
            legendgroup="seeds",
            hovertemplate=f"{variant}, %{{x}}: %{{y:.1f}}%<extra>one seed</extra>",
        )
    fig.add_scatter(
        x=kinds,
        y=[100 * results["chance"][kind] for kind in kinds],
        mode="markers",
        marker=dict(symbol="line-ew", size=60, line=dict(width=2, color="grey")),
        name="chance (a blind guess)",
        hovertemplate="chance, %{x}: %{y:.0f}%<extra></extra>",
    )
    fig.update_yaxes(range=[0, 105])
    return finish(
        fig,
        "Who can answer? Held-out accuracy per question type",
        "question type",
        "accuracy (%)",
        barmode="group",
        scattermode="group",
        height=420,
    )


def modality_routing_figure(results: Mapping[str, Any]) -> go.Figure:
    """Per MoE layer, the total-variation distance between the experts chosen by image tokens and by text
    tokens (0: the same mix of experts; 1: no expert in common), trained early fusion against the same
    model untrained: a bar at the mean of the seeds and a dot per seed."""
    runs = results["runs"]
    layers = range(len(runs[0]["routing_tv"]["untrained"]))
    fig = go.Figure()
    for i, model in enumerate(("early fusion", "untrained")):
        per_layer = [[run["routing_tv"][model][layer] for run in runs] for layer in layers]
        labels = [f"layer {layer}" for layer in layers]
        fig.add_bar(
            x=labels,
            y=[float(np.mean(values)) for values in per_layer],
            name=f"{model} (mean of {len(runs)} seeds)",
            marker_color=COLOURS[2] if i == 0 else "lightgrey",
            offsetgroup=model,
        )
        fig.add_scatter(
            x=[label for label, values in zip(labels, per_layer, strict=True) for _ in values],
            y=[value for values in per_layer for value in values],
            mode="markers",
            marker=dict(color="black", size=5),
            offsetgroup=model,
            name="one seed",
            showlegend=i == 0,
        )
    fig.update_yaxes(range=[0, 1])
    return finish(
        fig,
        "Do image tokens go to other experts than text tokens?",
        "MoE layer",
        "total-variation distance",
        barmode="group",
        scattermode="group",
        height=380,
    )


def image_attention(
    attentions: Sequence[Tensor], input_ids: Tensor, row: int, query: int, image_token_id: int, side: int
) -> np.ndarray:
    """Where one query looks in the pictures: [images, side, side], summing to one over all image tokens.

    ``attentions``: per layer [B, heads, T, T] (a model's ``return_attention=True``); the weights of
    ``query`` in ``row`` are averaged over layers and heads, kept on the ``image_token_id`` placeholders
    (``side * side`` per picture, in reading order) and divided by their sum.
    """
    weights = torch.stack([layer[row, :, query] for layer in attentions]).mean(dim=(0, 1))  # [T]
    on_images = weights[input_ids[row] == image_token_id]
    if on_images.numel() == 0 or on_images.numel() % (side * side):
        raise ValueError(
            f"row {row} holds {on_images.numel()} image tokens, not a multiple of side x side = "
            f"{side * side}: pass the side of one picture's token grid"
        )
    return to_numpy(on_images / on_images.sum()).reshape(-1, side, side)


def grounding_figure(
    pictures: Sequence[np.ndarray], attention: np.ndarray | None, titles: Sequence[str], title: str
) -> go.Figure:
    """Pictures side by side, each with the answer's attention to its tokens laid over it
    (:func:`image_attention`, [pictures, side, side]): the more magenta a square, the larger the share of
    the attention that falls on that token's pixels. ``attention=None`` shows the pictures alone."""
    fig = make_subplots(rows=1, cols=len(pictures), subplot_titles=list(titles))
    for i, picture in enumerate(pictures):
        fig.add_trace(_picture(picture), row=1, col=i + 1)
    if attention is None:
        attention = np.zeros((0, 1, 1))
    elif len(attention) != len(pictures):
        raise ValueError(
            f"{len(attention)} attention grids for {len(pictures)} pictures: pass one per picture"
        )
    top = float(attention.max(initial=0.0))
    for i, grid in enumerate(attention):
        step = pictures[i].shape[0] / grid.shape[0]
        fig.add_trace(
            go.Heatmap(
                z=grid,
                x0=step / 2 - 0.5,
                dx=step,
                y0=step / 2 - 0.5,
                dy=step,
                zmin=0,
                zmax=top,
                colorscale=[[0, "rgba(255,255,255,0)"], [1, "rgba(255,0,255,0.75)"]],
                showscale=i == 0,
                colorbar=dict(title="attention share"),
                hovertemplate="attention share %{z:.1%}<extra></extra>",
            ),
            row=1,
            col=i + 1,
        )
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False, autorange="reversed")
    return finish(fig, title, None, None, height=340)
