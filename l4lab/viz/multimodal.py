"""Multimodal figures (notebook 07): an image's path to tokens, drawn on the image itself, the prompt
layout, and where a multimodal model's parameters go."""

from __future__ import annotations

import base64
import re
import struct
import zlib

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots
from torch import Tensor

from l4lab.config import Config, VisionConfig, count_params, vision_parameters
from l4lab.images import ImageProcessor, ProcessedImages
from l4lab.viz.common import COLOURS, count_label, finish


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
