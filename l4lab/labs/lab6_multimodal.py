"""Lab 6, images as tokens: the pixel shuffle that turns 2 x 2 patches into one token, the class token
appended after the patches, and the merge of image features into the placeholders of the prompt
(``notebooks/labs/lab6_multimodal.ipynb``).

Steps: 6.1 ``pixel_shuffle``, 6.2 ``add_class_token``, 6.3 ``merge_image_features``; references in
``l4lab.vision`` (``pixel_shuffle``, ``VisionModel.encode``, ``merge_image_features``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from l4lab import vision
from l4lab.labs.core import Case, Hints, Mistake, Step, compare_tensor, generator, register_lab


# ====================================================================== the pixel shuffle
def _ref_pixel_shuffle(patches: Tensor, factor: int) -> Tensor:
    return vision.pixel_shuffle(patches, factor)


def _cases_pixel_shuffle() -> list[Case]:
    g = generator(601)
    specs = [
        ("a 4 x 4 grid of one channel holding each patch's index, factor 2", None, 4, 1, 2),
        ("2 tiles, a 6 x 6 grid, 3 channels, factor 2", 2, 6, 3, 2),
        ("1 tile, an 8 x 8 grid, 2 channels, factor 4 (4 x 4 patches a token)", 1, 8, 2, 4),
        ("3 tiles, Llama 4's 24 x 24 grid, 5 channels, factor 2", 3, 24, 5, 2),
        ("1 tile, a 2 x 2 grid: one token", 1, 2, 4, 2),
        ("2 tiles, a 10 x 10 grid, 1 channel, factor 2", 2, 10, 1, 2),
    ]
    cases = []
    for label, tiles, side, channels, factor in specs:
        if tiles is None:
            patches = torch.arange(float(side * side)).view(1, side * side, 1)
        else:
            patches = torch.randn(tiles, side * side, channels, generator=g)
        cases.append(Case(label, (patches, factor), _ref_pixel_shuffle(patches, factor)))
    return cases


def _shuffle(order: tuple[int, ...]) -> Callable[[Tensor, int], Tensor]:
    """A pixel shuffle that permutes the grid [N, i, di, j, dj, C] by ``order`` before flattening."""

    def shuffle(patches: Tensor, factor: int) -> Tensor:
        tiles, count, channels = patches.shape
        side = math.isqrt(count)
        grid = patches.reshape(tiles, side // factor, factor, side // factor, factor, channels).permute(order)
        return grid.reshape(tiles, (side // factor) ** 2, factor * factor * channels)

    return shuffle


_SHUFFLE_MISTAKES = (
    Mistake(
        "no 2D grouping",
        lambda p, f: p.reshape(p.shape[0], -1, f * f * p.shape[2]),
        "a plain reshape merges f*f patches that follow each other in reading order (a strip of one "
        "row); a token must gather an f x f SQUARE: view the patches as a grid [N, side, side, C] first.",
    ),
    Mistake(
        "wrong transpose order",
        _shuffle((0, 1, 3, 4, 2, 5)),
        "the tokens are right but the channels inside a token are ordered [dj, di, C]; Llama 4's adapter "
        "reads [di, dj, C]: the patch above-left, the one to its RIGHT, then the row below. "
        "Check the order of your permute.",
    ),
    Mistake(
        "columns first",
        _shuffle((0, 3, 1, 2, 4, 5)),
        "your tokens come column by column; they must come in reading order, row by row, like the "
        "patches (token index = i * (side / f) + j).",
    ),
    Mistake(
        "channels before the patch offsets",
        _shuffle((0, 1, 3, 5, 2, 4)),
        "inside a token, put the channel LAST: [di, dj, C], i.e. the four patches' vectors one after "
        "the other, not interleaved channel by channel.",
    ),
)


# ====================================================================== the class token
def _ref_add_class_token(patches: Tensor, class_embedding: Tensor, positions: Tensor) -> Tensor:
    with_class = torch.cat([patches, class_embedding.expand(patches.shape[0], 1, -1)], dim=1)
    return with_class + positions


def _cases_add_class_token() -> list[Case]:
    g = generator(602)
    specs = [
        ("1 tile, 4 patches, width 3", 1, 4, 3),
        ("2 tiles, 16 patches, width 8", 2, 16, 8),
        ("3 tiles, 9 patches, width 5", 3, 9, 5),
        ("1 tile, 1 patch, width 2", 1, 1, 2),
        ("4 tiles, 36 patches, width 6", 4, 36, 6),
        ("1 tile, 576 patches (Llama 4's grid), width 4", 1, 576, 4),
    ]
    cases = []
    for label, tiles, count, width in specs:
        patches = torch.randn(tiles, count, width, generator=g)
        class_embedding = torch.randn(width, generator=g)
        positions = torch.randn(count + 1, width, generator=g)
        args = (patches, class_embedding, positions)
        cases.append(Case(label, args, _ref_add_class_token(*args)))
    return cases


_CLASS_MISTAKES = (
    Mistake(
        "class token first",
        lambda p, c, pos: torch.cat([c.expand(p.shape[0], 1, -1), p], dim=1) + pos,
        "Llama 4 APPENDS the class token after the patches (CLIP puts it first); its learned position "
        "is the last row of the positional embedding.",
    ),
    Mistake(
        "class token without its position",
        lambda p, c, pos: torch.cat([p + pos[:-1], c.expand(p.shape[0], 1, -1)], dim=1),
        "the positional embedding has one row per token INCLUDING the class token: add it after "
        "appending the class token, to all patches + 1 rows.",
    ),
    Mistake(
        "no positions",
        lambda p, c, pos: torch.cat([p, c.expand(p.shape[0], 1, -1)], dim=1),
        "add the learned positional embedding [patches + 1, width] to every tile.",
    ),
)


# ====================================================================== the merge
def _ref_merge(embeddings: Tensor, input_ids: Tensor, features: Tensor, image_token_id: int) -> Tensor:
    return vision.merge_image_features(embeddings, input_ids, features, image_token_id)


def _cases_merge() -> list[Case]:
    g = generator(603)
    patch = 7
    specs = [
        ("one row, one image of 4 tokens", [[1, 2, patch, patch, patch, patch, 3]]),
        ("two rows, an image in each", [[patch, patch, 1, 2], [3, patch, patch, 4]]),
        ("a text-only row between two rows with images", [[patch, 1, patch], [1, 2, 3], [2, patch, patch]]),
        ("two images in one row", [[1, patch, patch, 2, patch, patch, patch, 3]]),
        ("no placeholder at all (text only)", [[1, 2, 3, 4]]),
        ("placeholders at the very start and end", [[patch, 1, 2, patch], [patch, patch, 3, 4]]),
    ]
    cases = []
    for label, rows in specs:
        ids = torch.tensor(rows)
        embeddings = torch.randn(*ids.shape, 6, generator=g)
        features = torch.randn(int((ids == patch).sum()), 6, generator=g)
        args = (embeddings, ids, features, patch)
        cases.append(Case(label, args, _ref_merge(*args)))
    return cases


def _merge_at_start(embeddings: Tensor, ids: Tensor, features: Tensor, token: int) -> Tensor:
    out = embeddings.clone().view(-1, embeddings.shape[-1])
    out[: features.shape[0]] = features
    return out.view_as(embeddings)


def _merge_each_row_from_zero(embeddings: Tensor, ids: Tensor, features: Tensor, token: int) -> Tensor:
    out = embeddings.clone()
    for b in range(ids.shape[0]):
        where = (ids[b] == token).nonzero().flatten()
        out[b, where] = features[: len(where)]
    return out


def _merge_added(embeddings: Tensor, ids: Tensor, features: Tensor, token: int) -> Tensor:
    out = embeddings.clone()
    out[ids == token] += features
    return out


def _merge_reversed(embeddings: Tensor, ids: Tensor, features: Tensor, token: int) -> Tensor:
    return _ref_merge(embeddings, ids, features.flip(0), token)


_MERGE_MISTAKES = (
    Mistake(
        "features at the start",
        _merge_at_start,
        "the features go where the placeholders are (input_ids == image_token_id), not into the first "
        "positions of the sequence.",
    ),
    Mistake(
        "each row from feature 0",
        _merge_each_row_from_zero,
        "the features are ALL the images' tokens of the batch, one after the other: row 1's placeholders "
        "continue where row 0's stopped (reading order over the whole batch).",
    ),
    Mistake(
        "added, not replaced",
        _merge_added,
        "the features REPLACE the placeholders' embeddings; the <|patch|> token's own embedding does "
        "not stay in.",
    ),
    Mistake(
        "reversed order",
        _merge_reversed,
        "the first feature goes to the first placeholder: keep the order (flattened reading order).",
    ),
)


# ====================================================================== the steps
STEPS: tuple[Step, ...] = (
    Step(
        "6.1",
        "pixel_shuffle",
        ("patches", "factor"),
        "merge factor x factor neighbouring patches into one token: [N, side^2, C] -> [N, (side/f)^2, f^2 C]",
        _cases_pixel_shuffle,
        lambda e, g: compare_tensor(e, g, "tokens"),
        _SHUFFLE_MISTAKES,
        "view [N, side/f, f, side/f, f, C] (i, di, j, dj), permute to (i, j, di, dj, C), reshape.",
        hints=Hints(
            "a token is an f x f square of patches, and tokens come row by row like the patches",
            "token (i, j) = concat over di, then dj, of patch (f*i + di, f*j + dj)",
            "l4lab/vision.py, pixel_shuffle",
        ),
    ),
    Step(
        "6.2",
        "add_class_token",
        ("patches", "class_embedding", "positions"),
        "append the class token after the patches, then add the learned positions",
        _cases_add_class_token,
        compare_tensor,
        _CLASS_MISTAKES,
        "torch.cat([patches, class_embedding expanded to [N, 1, width]], dim=1) + positions.",
        hints=Hints(
            "Llama 4's class token sits at the END of the tile's sequence, and has a position of its own",
            "x = cat(patches [N, P, W], class [N, 1, W]) along the sequence; x + positions [P + 1, W]",
            "l4lab/vision.py, VisionModel.encode",
        ),
    ),
    Step(
        "6.3",
        "merge_image_features",
        ("embeddings", "input_ids", "features", "image_token_id"),
        "replace the placeholders' embeddings by the image features, in reading order over the batch",
        _cases_merge,
        compare_tensor,
        _MERGE_MISTAKES,
        "mask = input_ids == image_token_id; out = embeddings.clone(); out[mask] = features.",
        hints=Hints(
            "every <|patch|> placeholder of the batch takes the next image feature; other tokens stay",
            "out[b, t] = features[k] for the k-th placeholder (b, t) in reading order; embeddings elsewhere",
            "l4lab/vision.py, merge_image_features",
        ),
    ),
)

register_lab("6", "multimodal", STEPS)
