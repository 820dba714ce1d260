"""The image processor and the prompt layout.

Oracles: transformers' ``Llama4Processor`` for the layout (its own method, called here); hand-checked
cases computed in float64 for tiling, padding and normalisation; and, where the file exists, reference
outputs of transformers' ``Llama4ImageProcessor`` recorded by tests/oracles/llama4_image_processor.py
(it needs torchvision, which does not import beside the CPU torch of this project's environment)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import l4lab
from l4lab.images import (
    IMAGE,
    IMAGE_END,
    IMAGE_START,
    PATCH,
    TILE_X_SEPARATOR,
    TILE_Y_SEPARATOR,
    ImageProcessor,
    best_canvas,
    candidate_canvases,
    expand_image_tokens,
    image_prompt,
    layout_token_ids,
    pattern_image,
)

REFERENCE = Path(__file__).parent / "oracles" / "llama4_image_processor.json"


def float64_normalised(pixels: np.ndarray) -> torch.Tensor:
    """(x / 255 - 0.5) / 0.5 in float64, channels first."""
    return torch.from_numpy((pixels.astype(np.float64) / 255 - 0.5) / 0.5).permute(2, 0, 1)


def triangle_filtered_row(pixels: np.ndarray, row: int, scale: int) -> np.ndarray:
    """Output row ``row`` of shrinking ``pixels`` [H, W, 3] vertically by ``scale``: the input rows
    within ``scale`` of its centre, weighted by 1 - distance / scale (PIL's bilinear filter), normalised."""
    centre = (row + 0.5) * scale
    rows = np.arange(max(0, int(centre - scale)), min(pixels.shape[0], int(centre + scale) + 1))
    weights = np.clip(1 - np.abs(rows + 0.5 - centre) / scale, 0, None)
    return np.tensordot(weights / weights.sum(), pixels[rows], axes=1)


def close_to(tile: torch.Tensor, expected: torch.Tensor) -> bool:
    """Llama 4 normalises in bfloat16 (8 bits of mantissa, rounded twice): within 1/128 of float64."""
    return bool((tile.double() - expected).abs().max() <= 1 / 128)


@pytest.mark.parametrize("grid", [(1, 1), (1, 2), (2, 1), (3, 4), (4, 4), (1, 16)])
@pytest.mark.parametrize("tokens", [144, 2])
def test_layout_equals_llama4_processor(grid: tuple[int, int], tokens: int) -> None:
    from transformers.models.llama4.processing_llama4 import Llama4Processor

    # the method reads no state of the processor (whose constructor needs a tokenizer and torchvision)
    assert image_prompt(grid, tokens) == Llama4Processor._prompt_split_image(None, grid, tokens)
    assert image_prompt(grid, tokens).count(PATCH) == tokens * (grid[0] * grid[1] + (grid != (1, 1)))


def test_markers_in_a_text_become_each_images_layout() -> None:
    text = f"Compare {IMAGE} with {IMAGE}."
    expanded = expand_image_tokens(text, torch.tensor([[1, 1], [1, 2]]), 2)
    assert expanded == f"Compare {image_prompt((1, 1), 2)} with {image_prompt((1, 2), 2)}."
    with pytest.raises(ValueError, match=r"the text has 2 <\|image\|> markers but there are 1 images"):
        expand_image_tokens(text, [[1, 1]], 2)


def test_canvases_are_every_grid_up_to_max_tiles() -> None:
    canvases = candidate_canvases(4, 10)
    grids = sorted((h // 10, w // 10) for h, w in canvases)
    assert grids == [(1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1), (4, 1)]
    assert len(candidate_canvases(16, 336)) == sum(
        len([d for d in range(1, n + 1) if n % d == 0]) for n in range(1, 17)
    )


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((336, 336), (336, 336)),  # fits one tile exactly
        ((100, 50), (336, 336)),  # small: the least enlargement (x3.36), the smaller of two canvases
        ((672, 336), (672, 336)),  # exactly two tiles, one above the other
        ((400, 2000), (672, 2016)),  # wide: 2 x 6 tiles enlarge it least (x1.008; 1 x 5 would shrink it)
        ((5000, 5000), (1344, 1344)),  # big: the largest square grid, 4 x 4
    ],
)
def test_best_canvas_by_hand(size: tuple[int, int], expected: tuple[int, int]) -> None:
    assert best_canvas(*size, candidate_canvases(16, 336)) == expected


def test_one_tile_image_is_normalised_without_resizing() -> None:
    pixels = pattern_image(336, 336, seed=1)
    processed = ImageProcessor()(pixels)
    assert processed.pixel_values.shape == (1, 3, 336, 336) and processed.aspect_ratios.tolist() == [[1, 1]]
    assert processed["pixel_values"].dtype == torch.bfloat16
    assert close_to(processed["pixel_values"][0], float64_normalised(pixels))
    # 0 and 255 land exactly on -1 and 1
    extremes = ImageProcessor()(np.array([[[0, 255, 0]]], np.uint8)).pixel_values[0, :, 0, 0]
    assert extremes.tolist() == [-1.0, 1.0, -1.0]


def test_two_tiles_split_top_and_bottom_then_the_global_tile() -> None:
    pixels = pattern_image(672, 336, seed=2)
    processed = ImageProcessor()(pixels)
    assert processed.aspect_ratios.tolist() == [[2, 1]] and processed.tiles_per_image() == [3]
    expected = float64_normalised(pixels)
    assert close_to(processed.pixel_values[0], expected[:, :336])
    assert close_to(processed.pixel_values[1], expected[:, 336:])
    # the global tile: the whole image squeezed to 336 x 336 rows, each output row a triangle-filtered
    # (antialiased bilinear) mix of the 4 input rows around it, computed here in float64
    squeezed = np.stack([triangle_filtered_row(pixels.astype(np.float64), i, scale=2) for i in range(336)])
    global_tile = (processed.pixel_values[2].double().permute(1, 2, 0) + 1) / 2 * 255
    assert (global_tile - torch.from_numpy(squeezed)).abs().max() <= 0.5 + 1.0  # rounding, then bfloat16


def test_a_small_image_is_enlarged_to_one_tile_and_padded_right() -> None:
    processed = ImageProcessor()(pattern_image(100, 50, seed=3))
    tile = processed.pixel_values[0].float()
    assert processed.aspect_ratios.tolist() == [[1, 1]]
    assert torch.all(tile[:, :, 168:] == -1)  # 50 * 3.36 = 168 columns of image, then black padding
    assert tile[:, :, :168].abs().sum() > 0


def test_several_images_one_after_the_other() -> None:
    processed = ImageProcessor()([pattern_image(336, 336), pattern_image(400, 2000), pattern_image(3, 900)])
    assert processed.aspect_ratios.tolist() == [[1, 1], [2, 6], [1, 3]]
    assert processed.tiles_per_image() == [1, 13, 4]
    assert processed.pixel_values.shape == (18, 3, 336, 336)
    layouts = ImageProcessor().prompt(processed)
    assert [layout.count(PATCH) for layout in layouts] == [144, 13 * 144, 4 * 144]


def test_pil_images_are_converted_to_rgb() -> None:
    image_module = pytest.importorskip("PIL.Image")
    pixels = pattern_image(40, 30)
    grey = image_module.fromarray(pixels[:, :, 0])
    expected = ImageProcessor()(np.repeat(pixels[:, :, :1], 3, axis=2)).pixel_values
    assert torch.equal(ImageProcessor()(grey).pixel_values, expected)


@pytest.mark.parametrize(
    ("image", "error", "message"),
    [
        (
            np.zeros((5, 5, 4), np.uint8),
            ValueError,
            r"image 0 has shape \(5, 5, 4\); pass height x width x 3",
        ),
        (np.zeros((3, 5, 5), np.uint8), ValueError, r"channels first\? use image.transpose\(1, 2, 0\)"),
        (np.zeros((5, 5, 3), np.float32), TypeError, r"dtype torch.float32; pass uint8 pixels"),
        (np.zeros((0, 5, 3), np.uint8), ValueError, r"image 0 is empty \(0 x 5 pixels\)"),
        ("cat.png", TypeError, r"image 0 is a str; pass a PIL image or an H x W x 3 uint8 array"),
        ([], ValueError, r"no images"),
    ],
)
def test_bad_images_are_named(image: object, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        ImageProcessor()(image)


def test_processed_images_feed_the_model() -> None:
    """The processor's tiles and the layout's placeholders fit a model built for 336-pixel tiles."""
    ids = {
        PATCH: 258,
        IMAGE_START: 259,
        IMAGE_END: 260,
        IMAGE: 261,
        TILE_X_SEPARATOR: 262,
        TILE_Y_SEPARATOR: 263,
    }
    vision = l4lab.VisionConfig(
        hidden_size=32,
        num_layers=1,
        num_heads=4,
        intermediate_size=128,
        adapter_size=16,
        image_token_id=258,
        image_start_token_id=259,
        image_end_token_id=260,
    )
    model = l4lab.Llama4Multimodal(l4lab.preset("tiny", vocab_size=264, vision=vision)).eval()
    processed = ImageProcessor()([pattern_image(336, 700), pattern_image(50, 60)])
    prompt = [1, 2, 3]
    for layout in ImageProcessor().prompt(processed, vision.tokens_per_tile):
        prompt += [*layout_token_ids(layout, ids), 4, 5]
    with torch.no_grad():
        logits = model(torch.tensor([prompt]), pixel_values=processed.pixel_values).logits
    assert logits.shape == (1, len(prompt), 264) and prompt.count(258) == (3 + 1 + 1) * 144


# run in a fresh interpreter on the scalar CPU path (the variable must be set before torch loads): the
# path on which the reference was recorded, and on which transformers' torchvision resize computes in
# float32 like l4lab's; on AVX2/AVX-512 it resizes uint8 with its own kernel (a few grey levels apart)
HASHES = """
import hashlib, json, sys
import torch
from l4lab.images import ImageProcessor, pattern_image
out = []
for case in json.load(sys.stdin):
    processed = ImageProcessor()(pattern_image(case["height"], case["width"], seed=case["seed"]))
    values = processed.pixel_values.float()
    digest = hashlib.sha256(values.numpy().tobytes()).hexdigest()
    out.append([processed.aspect_ratios.tolist(), list(values.shape), digest])
print(json.dumps([torch.backends.cpu.get_cpu_capability(), out]))
"""


def test_pixel_values_equal_recorded_llama4_image_processor() -> None:
    record = json.loads(REFERENCE.read_text())
    assert record["versions"]["cpu_capability"] == "DEFAULT"
    cases = record["cases"]
    assert len(cases) >= 10
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent.parent), env.get("PYTHONPATH", "")])
    run = subprocess.run(
        [sys.executable, "-c", HASHES],
        input=json.dumps(cases),
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    capability, results = json.loads(run.stdout)
    assert capability == "DEFAULT"
    for case, (ratios, shape, digest) in zip(cases, results, strict=True):
        assert (ratios, shape, digest) == (case["aspect_ratios"], case["shape"], case["sha256"]), case
