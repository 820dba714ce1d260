"""Images in, tiles and prompt tokens out: what Llama 4's processor does before the vision encoder.

An image of any size becomes a grid of 336 x 336 tiles:

1. choose the canvas: among every grid of at most ``max_tiles`` tiles (1 x 1, 1 x 2, 2 x 1, ..., 4 x 4,
   1 x 16), the one that needs the smallest enlargement, or, when every grid needs shrinking, the least
   shrinking; ties go to the smallest canvas (the least padding);
2. resize the image to fit that canvas WITHOUT distortion (both sides by one factor; never enlarged
   beyond one tile's size on a side), and pad it with black on the right and at the bottom;
3. cut the canvas into tiles, row by row, and, when there is more than one, add a "global" tile: the
   whole image squeezed into one tile, so the model sees both details and the overall picture;
4. normalise to [-1, 1] (Llama 4 does this in bfloat16).

The prompt then holds, per image: ``<|image_start|>``, each tile's placeholders with
``<|tile_x_separator|>`` between the tiles of a row and ``<|tile_y_separator|>`` after each row,
``<|image|>`` and the global tile's placeholders, ``<|image_end|>`` (:func:`image_prompt`). Each tile
gives 144 ``<|patch|>`` placeholders (24 x 24 patches, 2 x 2 merged by the pixel shuffle).

Plain PyTorch (no torchvision): the resize is ``torch.nn.functional.interpolate`` with antialiasing,
the computation torchvision's resize runs for bilinear images in float.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

IMAGE_START, IMAGE_END, IMAGE = "<|image_start|>", "<|image_end|>", "<|image|>"
PATCH, TILE_X_SEPARATOR, TILE_Y_SEPARATOR = "<|patch|>", "<|tile_x_separator|>", "<|tile_y_separator|>"


@dataclass
class ProcessedImages:
    """``pixel_values`` [tiles, 3, S, S] of every image, one after the other (bfloat16, as Llama 4's
    processor gives them); ``aspect_ratios`` [images, 2]: each image's grid (rows, columns) of tiles.
    Also readable as a mapping: ``processed["pixel_values"]``."""

    pixel_values: Tensor
    aspect_ratios: Tensor

    def __getitem__(self, key: str) -> Tensor:
        if key not in ("pixel_values", "aspect_ratios"):
            raise KeyError(f"{key!r}: ProcessedImages holds 'pixel_values' and 'aspect_ratios'")
        return getattr(self, key)

    def keys(self) -> list[str]:
        return ["pixel_values", "aspect_ratios"]

    def tiles_per_image(self) -> list[int]:
        """Tiles of each image: rows x columns, plus the global tile when that is more than one."""
        return [rows * columns + (rows * columns > 1) for rows, columns in self.aspect_ratios.tolist()]


def candidate_canvases(max_tiles: int, tile_size: int) -> list[tuple[int, int]]:
    """Every (height, width) in pixels of a grid of at most ``max_tiles`` tiles, grouped by aspect ratio
    in the order Llama 4's processor lists them (the order decides between equally good canvases)."""
    by_ratio: dict[float, list[tuple[int, int]]] = {}
    for tiles in range(max_tiles, 0, -1):
        for rows in sorted(r for r in range(1, tiles + 1) if tiles % r == 0):
            by_ratio.setdefault(rows / (tiles // rows), []).append((rows, tiles // rows))
    return [(rows * tile_size, columns * tile_size) for grids in by_ratio.values() for rows, columns in grids]


def best_canvas(height: int, width: int, canvases: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The canvas that enlarges an image of ``height`` x ``width`` least (or shrinks it least, when every
    canvas is smaller), the smallest such canvas on a tie.

    A canvas's scale is ``min(canvas_h / h, canvas_w / w)``: the factor that fits the image inside it
    without distortion (computed in float32, like the reference).
    """
    sizes = torch.tensor(canvases)
    scales = torch.minimum(sizes[:, 0] / height, sizes[:, 1] / width)
    enlarging = scales[scales >= 1]
    chosen = enlarging.min() if len(enlarging) else scales.max()
    fitting = sizes[scales == chosen]
    best = fitting[torch.argmin(fitting[:, 0] * fitting[:, 1])]
    return int(best[0]), int(best[1])


def fit_without_distortion(height: int, width: int, target: tuple[int, int]) -> tuple[int, int]:
    """The largest (height, width) with the image's aspect ratio inside ``target`` (rounded down)."""
    scale_h, scale_w = target[0] / height, target[1] / width
    if scale_w < scale_h:
        return max(min(int(height * scale_w), target[0]), 1), target[1]
    return target[0], max(min(int(width * scale_h), target[1]), 1)


def resize(image: Tensor, height: int, width: int) -> Tensor:
    """Bilinear resize with antialiasing of a uint8 image [3, H, W]: in float32, rounded back to uint8."""
    resized = F.interpolate(
        image[None].float(), size=(height, width), mode="bilinear", align_corners=False, antialias=True
    )
    return resized[0].round().clamp(0, 255).to(torch.uint8)


class ImageProcessor:
    """Llama 4's image processor: ``ImageProcessor()(images)`` -> :class:`ProcessedImages`.

    ``images``: one image or a list, each a PIL image or an H x W x 3 uint8 array (numpy or torch).
    ``tile_size`` and ``max_tiles`` are Llama 4's 336 and 16; ``mean`` and ``std`` normalise each channel.
    """

    def __init__(
        self,
        tile_size: int = 336,
        max_tiles: int = 16,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
    ) -> None:
        for name, value in (("tile_size", tile_size), ("max_tiles", max_tiles)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"ImageProcessor {name} = {value!r} is not allowed: a positive integer")
        self.tile_size, self.max_tiles = tile_size, max_tiles
        self.mean, self.std = tuple(mean), tuple(std)
        self.canvases = candidate_canvases(max_tiles, tile_size)

    def __call__(self, images: Any) -> ProcessedImages:
        if not isinstance(images, (list, tuple)):
            images = [images]
        if not images:
            raise ValueError("no images: pass a PIL image, an H x W x 3 uint8 array, or a list of them")
        tiles, ratios = [], []
        for i, image in enumerate(images):
            image_tiles, grid = self.tiles(as_uint8_chw(image, i))
            tiles.append(image_tiles)
            ratios.append(grid)
        return ProcessedImages(torch.cat(tiles), torch.tensor(ratios))

    def tiles(self, image: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """One uint8 image [3, H, W] -> its normalised tiles [tiles, 3, S, S] and its grid (rows, columns)."""
        height, width = image.shape[1:]
        size = self.tile_size
        canvas, fitted = self.placement(height, width)
        resized = resize(image, *fitted)
        padded = F.pad(resized, (0, canvas[1] - resized.shape[2], 0, canvas[0] - resized.shape[1]))
        rows, columns = canvas[0] // size, canvas[1] // size
        grid = padded.view(3, rows, size, columns, size).permute(1, 3, 0, 2, 4).reshape(-1, 3, size, size)
        if rows * columns > 1:
            grid = torch.cat([grid, resize(image, size, size)[None]])  # the global tile, last
        return self.normalise(grid), (rows, columns)

    def placement(self, height: int, width: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """The canvas (height, width) chosen for an image of ``height`` x ``width``, and the size the image
        is resized to inside it (at the top left; the rest is padding)."""
        size = self.tile_size
        canvas = best_canvas(height, width, self.canvases)
        # never enlarge a side beyond one tile (a small image is not blown up to fill many tiles)
        limit = (min(max(height, size), canvas[0]), min(max(width, size), canvas[1]))
        return canvas, fit_without_distortion(height, width, limit)

    def normalise(self, tiles: Tensor) -> Tensor:
        """uint8 -> ``(x / 255 - mean) / std`` in bfloat16, as Llama 4's processor computes it."""
        x = tiles.to(torch.bfloat16) * (1 / 255)
        mean = torch.tensor(self.mean, dtype=x.dtype).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype).view(-1, 1, 1)
        return (x - mean) / std

    def prompt(self, processed: ProcessedImages, tokens_per_tile: int = 144) -> list[str]:
        """The placeholder layout of each image (see :func:`image_prompt`)."""
        return [image_prompt(tuple(ratio), tokens_per_tile) for ratio in processed.aspect_ratios.tolist()]


def image_prompt(aspect_ratio: tuple[int, int], tokens_per_tile: int = 144) -> str:
    """The text that stands for one image in a Llama 4 prompt, for its grid (rows, columns) of tiles.

    ``<|image_start|>``, then (only for more than one tile) each row's tiles of ``tokens_per_tile``
    ``<|patch|>`` placeholders separated by ``<|tile_x_separator|>``, each row ended by
    ``<|tile_y_separator|>``; then ``<|image|>`` and the global tile's placeholders (the only tile's,
    for a one-tile image); ``<|image_end|>``. The placeholders come in the order of the tiles in
    ``pixel_values``, which is the order the model fills them in.
    """
    rows, columns = aspect_ratio
    tile = PATCH * tokens_per_tile
    text = IMAGE_START
    if rows * columns > 1:
        for _ in range(rows):
            text += TILE_X_SEPARATOR.join([tile] * columns) + TILE_Y_SEPARATOR
    return text + IMAGE + tile + IMAGE_END


def expand_image_tokens(
    text: str, aspect_ratios: Tensor | Sequence[Sequence[int]], tokens_per_tile: int = 144
) -> str:
    """Replace each ``<|image|>`` the user wrote in ``text`` by its image's layout, in order."""
    ratios = aspect_ratios.tolist() if isinstance(aspect_ratios, Tensor) else list(aspect_ratios)
    pieces = text.split(IMAGE)
    if len(pieces) - 1 != len(ratios):
        raise ValueError(
            f"the text has {len(pieces) - 1} {IMAGE} markers but there are {len(ratios)} images: write one "
            f"{IMAGE} where each image goes"
        )
    out = pieces[0]
    for ratio, piece in zip(ratios, pieces[1:], strict=True):
        out += image_prompt(tuple(ratio), tokens_per_tile) + piece
    return out


def as_uint8_chw(image: Any, index: int = 0) -> Tensor:
    """A PIL image or an H x W x 3 uint8 array (numpy or torch) as a uint8 tensor [3, H, W]."""
    where = f"image {index}"
    if hasattr(image, "convert") and hasattr(image, "mode"):  # a PIL image: RGB, whatever its mode
        image = torch.from_numpy(np.asarray(image.convert("RGB")).copy())
    elif not isinstance(image, Tensor):
        if not isinstance(image, np.ndarray):
            raise TypeError(
                f"{where} is a {type(image).__name__}; pass a PIL image or an H x W x 3 uint8 array"
            )
        image = torch.from_numpy(image.copy())
    if image.dtype != torch.uint8:
        raise TypeError(
            f"{where} has dtype {image.dtype}; pass uint8 pixels 0..255 (for floats in [0, 1]: "
            "(x * 255).round().astype('uint8'))"
        )
    if image.dim() != 3 or image.shape[2] != 3:
        hint = (
            " (channels first? use image.transpose(1, 2, 0))"
            if image.dim() == 3 and image.shape[0] == 3
            else ""
        )
        raise ValueError(
            f"{where} has shape {tuple(image.shape)}; pass height x width x 3 (RGB){hint}; a greyscale or "
            "RGBA picture can go in as a PIL image, which is converted to RGB"
        )
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(
            f"{where} is empty ({image.shape[0]} x {image.shape[1]} pixels); pass at least 1 x 1"
        )
    return image.permute(2, 0, 1).contiguous()


def layout_token_ids(layout: str, ids: Mapping[str, int]) -> list[int]:
    """The token ids of an image's layout (:func:`image_prompt`), given the id of each special token."""
    tokens = re.findall(r"<\|[a-z_]+\|>", layout)
    missing = sorted(set(tokens) - set(ids))
    if missing:
        raise ValueError(f"no id given for {missing}; pass ids for {sorted(set(tokens))}")
    return [ids[token] for token in tokens]


def pattern_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A deterministic H x W x 3 uint8 test picture (gradients, stripes and a checkerboard), the same on
    every machine and library version: integer arithmetic only."""
    rows = np.arange(height, dtype=np.int64)[:, None, None]
    columns = np.arange(width, dtype=np.int64)[None, :, None]
    channels = np.arange(3, dtype=np.int64)[None, None, :]
    texture = (rows * (3 + seed) + columns * (5 + 2 * channels) + 40 * ((rows // 7 + columns // 5) % 2)) % 256
    stripes = (rows * columns * (seed + 1) + 97 * channels) % 61
    return ((texture + stripes) % 256).astype(np.uint8)
