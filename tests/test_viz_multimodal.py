"""Notebook 07's figures: pictures stored as PNG that decode to the same pixels, the tile and patch grids
drawn where they belong, the layout summary, and the parameter parts adding up to count_params."""

from __future__ import annotations

import base64
import struct
import zlib

import numpy as np
import pytest
import torch

import l4lab
from l4lab import viz
from l4lab.images import image_prompt, pattern_image
from l4lab.viz.multimodal import png_data_url


def decode_png(url: str) -> np.ndarray:
    """An 8-bit RGB PNG without interlacing, decoded by hand: chunks, zlib, one filter byte per row."""
    data = base64.b64decode(url.removeprefix("data:image/png;base64,"))
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    position, chunks = 8, {}
    while position < len(data):
        (length,) = struct.unpack(">I", data[position : position + 4])
        kind, body = data[position + 4 : position + 8], data[position + 8 : position + 8 + length]
        assert struct.unpack(">I", data[position + 8 + length : position + 12 + length])[0] == zlib.crc32(
            kind + body
        )
        chunks[kind] = body
        position += 12 + length
    width, height, depth, colour, *_ = struct.unpack(">IIBBBBB", chunks[b"IHDR"])
    assert (depth, colour) == (8, 2)
    rows = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), np.uint8).reshape(height, 1 + 3 * width)
    assert not rows[:, 0].any()  # filter type 0: raw rows
    return rows[:, 1:].reshape(height, width, 3)


def test_pictures_are_stored_as_png_of_the_same_pixels() -> None:
    pixels = pattern_image(37, 53, seed=4)
    assert np.array_equal(decode_png(png_data_url(pixels)), pixels)


def test_tiles_figure_draws_the_grid_and_the_global_tile() -> None:
    processor = l4lab.ImageProcessor()
    picture = pattern_image(500, 900)
    fig = viz.tiles_figure(picture, processor(picture), processor)
    images = [trace for trace in fig.data if trace.type == "image"]
    assert len(images) == 2  # the canvas and the global tile
    assert decode_png(images[0].source).shape == (672, 1008, 3)  # 2 x 3 tiles of 336
    lines = [shape for shape in fig.layout.shapes if shape.type == "line"]
    assert len(lines) == (3 + 1) + (2 + 1)
    outline = next(shape for shape in fig.layout.shapes if shape.type == "rect")
    assert (outline.x1, outline.y1) == (899.5, 499.5)  # the resized picture: 500 x 900, not enlarged
    single = viz.tiles_figure(picture[:300, :300], processor(picture[:300, :300]), processor)
    assert len([trace for trace in single.data if trace.type == "image"]) == 1


def test_patches_figure_draws_patches_and_tokens() -> None:
    vision = l4lab.preset("llama4-scout").vision
    tile = pattern_image(336, 336)
    fig = viz.patches_figure(tile, vision)
    widths = [shape.line.width for shape in fig.layout.shapes]
    assert widths.count(0.6) == 2 * (24 + 1) and widths.count(2) == 2 * (12 + 1)
    assert "576 patches" in fig.layout.title.text and "144 tokens" in fig.layout.title.text


def test_layout_summary_counts_runs() -> None:
    summary = viz.layout_summary(image_prompt((1, 2), 3))
    assert summary == (
        "<|image_start|> <|patch|> x3 <|tile_x_separator|> <|patch|> x3 <|tile_y_separator|> "
        "<|image|> <|patch|> x3 <|image_end|>"
    )


def test_parameter_parts_add_up_to_count_params() -> None:
    for name in ("llama4-scout", "llama4-maverick"):
        config = l4lab.preset(name)
        parts = viz.parameter_parts(config)
        assert sum(parts.values()) == l4lab.count_params(config)[0]
        assert parts["34 encoder layers (+ LayerNorms before and after)"] == 809_473_280


def fusion_results() -> dict:
    """A results file of benchmarks/multimodal_fusion.py's shape, two seeds, two question types."""
    runs = [
        {
            "accuracy": {"blind": {"colour": 0.25, "count": 0.2}, "sees": {"colour": 0.9, "count": 0.5}},
            "routing_tv": {"early fusion": [0.5, 0.1], "untrained": [0.2, 0.2]},
        },
        {
            "accuracy": {"blind": {"colour": 0.27, "count": 0.3}, "sees": {"colour": 1.0, "count": 0.7}},
            "routing_tv": {"early fusion": [0.7, 0.3], "untrained": [0.0, 0.4]},
        },
    ]
    return {
        "question_types": ["colour", "count"],
        "variants": ["blind", "sees"],
        "chance": {"colour": 0.25, "count": 0.25},
        "runs": runs,
    }


def test_fusion_accuracy_figure_shows_means_seeds_and_chance() -> None:
    fig = viz.fusion_accuracy_figure(fusion_results())
    bars = [trace for trace in fig.data if trace.type == "bar"]
    assert [bar.name.split(" (")[0] for bar in bars] == ["blind", "sees"]
    assert np.allclose(bars[1].y, [95.0, 60.0])
    dots = [trace for trace in fig.data if trace.type == "scatter" and trace.name.endswith("one seed")]
    assert sorted(dots[1].y) == [50.0, 70.0, 90.0, 100.0]
    (chance,) = [trace for trace in fig.data if trace.name.startswith("chance")]
    assert list(chance.y) == [25.0, 25.0]


def test_modality_routing_figure_shows_each_layer_trained_and_untrained() -> None:
    fig = viz.modality_routing_figure(fusion_results())
    bars = [trace for trace in fig.data if trace.type == "bar"]
    assert np.allclose(bars[0].y, [0.6, 0.2]) and np.allclose(bars[1].y, [0.1, 0.3])
    assert list(bars[0].x) == ["layer 0", "layer 1"]


def test_image_attention_keeps_the_image_tokens_of_one_query() -> None:
    # row 1 of a batch: [bos, 4 tokens of picture one, word, 4 tokens of picture two, word]; ids 9 = image
    ids = torch.tensor([[0] * 11, [1, 9, 9, 9, 9, 5, 9, 9, 9, 9, 6]])
    attention = torch.zeros(2, 2, 3, 11, 11)  # [layers] x [B, heads, T, T]
    attention[0, 1, :, 10, 2] = 0.3  # layer 0: token (0, 1) of picture one
    attention[1, 1, :, 10, 9] = 0.1  # layer 1: token (1, 1) of picture two
    attention[:, 1, :, 10, 5] = 0.6  # a word: not an image token, dropped
    grids = viz.image_attention(list(attention), ids, row=1, query=10, image_token_id=9, side=2)
    assert grids.shape == (2, 2, 2)
    assert np.allclose(grids[0], [[0, 0.75], [0, 0]]) and np.allclose(grids[1], [[0, 0], [0, 0.25]])
    with pytest.raises(ValueError, match="not a multiple of side x side = 9"):
        viz.image_attention(list(attention), ids, row=1, query=10, image_token_id=9, side=3)


def test_grounding_figure_lays_the_attention_over_each_picture() -> None:
    pictures = [pattern_image(32, 32), pattern_image(32, 32, seed=1)]
    attention = np.arange(8, dtype=float).reshape(2, 2, 2) / 28
    fig = viz.grounding_figure(pictures, attention, ["first", "second"], "where the answer looks")
    heatmaps = [trace for trace in fig.data if trace.type == "heatmap"]
    assert len(heatmaps) == 2 and heatmaps[1].dx == 16 and heatmaps[1].x0 == 7.5
    assert np.allclose(heatmaps[1].z, attention[1]) and heatmaps[0].zmax == attention.max()
    assert [decode_png(trace.source).shape for trace in fig.data if trace.type == "image"] == [
        (32, 32, 3)
    ] * 2


def test_grounding_figure_without_attention_shows_the_pictures_only() -> None:
    fig = viz.grounding_figure([pattern_image(32, 32)], None, ["a picture"], "")
    assert [trace.type for trace in fig.data] == ["image"]
    with pytest.raises(ValueError, match="2 attention grids for 1 pictures"):
        viz.grounding_figure([pattern_image(32, 32)], np.ones((2, 2, 2)), ["a picture"], "")
