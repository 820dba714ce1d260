"""The multimodal model: logits equal transformers' Llama4ForConditionalGeneration on the same weights
(fp32), for several tile and patch sizes, tile counts, images per prompt and text-only rows; the pieces
(pixel shuffle, 2D RoPE, the merge) against transformers and hand-checked cases; published parameter
counts; cached generation with the images encoded once; errors that say what to pass."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import (
    IMAGE_END_ID,
    IMAGE_START_ID,
    IMAGE_TOKEN_ID,
    hf_multimodal,
    hf_multimodal_logits,
    transformers,
)
from safetensors.torch import load_file, save_file

import l4lab
from l4lab import interop
from l4lab.claims import relative_error
from l4lab.config import VisionConfig
from l4lab.vision import Llama4Multimodal, merge_image_features, pixel_shuffle, vision_rope_angles

# name: (vision sizes, tiles of each image in each row of the batch, text config changes)
CASES = {
    # 28-pixel tiles of 7-pixel patches (4 tokens a tile); row 1 is text only
    "one-image-and-a-text-row": (dict(image_size=28, patch_size=7), [[1], []], {}),
    # 56-pixel tiles of 14-pixel patches, head_dim 12; several images per row, multi-tile images
    "several-images-several-tiles": (
        dict(image_size=56, patch_size=14, hidden_size=48, heads=4),
        [[2, 1], [3]],
        dict(interleave_moe_layer_step=2, num_experts_per_tok=2),
    ),
    # a 6 x 6 patch grid (9 tokens a tile), head_dim 8
    "grid-6-patch-4": (dict(image_size=24, patch_size=4, hidden_size=16, heads=2), [[1], [1, 2]], {}),
    # pixel shuffle ratio 0.25: 4 x 4 patches per token
    "shuffle-quarter": (
        dict(image_size=32, patch_size=4, hidden_size=16, heads=2, ratio=0.25),
        [[2], [1]],
        dict(use_qk_norm=False),
    ),
}


def prompt(images: list[list[int]], tokens_per_tile: int, seed: int = 0) -> torch.Tensor:
    """Rows of text with each image's placeholders between <|image_start|> and <|image_end|>."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for tiles_per_image in images:
        row: list[int] = []
        for tiles in tiles_per_image:
            row += torch.randint(3, 89, (3,), generator=generator).tolist()
            row += [IMAGE_START_ID, *[IMAGE_TOKEN_ID] * (tiles * tokens_per_tile), IMAGE_END_ID]
        rows.append(row)
    length = max(len(row) for row in rows) + 5
    return torch.tensor(
        [row + torch.randint(3, 89, (length - len(row),), generator=generator).tolist() for row in rows]
    )


def case(name: str, seed: int = 0) -> tuple:
    vision, images, text = CASES[name]
    hf = hf_multimodal(seed=seed, text=text, **vision)
    ours = l4lab.from_transformers(hf)
    ids = prompt(images, ours.config.vision.tokens_per_tile, seed)
    size = vision["image_size"]
    tiles = sum(sum(row) for row in images)
    pixel_values = torch.randn(tiles, 3, size, size, generator=torch.Generator().manual_seed(seed))
    return hf, ours, ids, pixel_values


@pytest.mark.parametrize("name", list(CASES))
def test_logits_equal_transformers(name: str) -> None:
    hf, ours, ids, pixel_values = case(name)
    assert isinstance(ours, Llama4Multimodal)
    with torch.no_grad():
        got = ours(ids, pixel_values=pixel_values).logits
    expected = hf_multimodal_logits(hf, ids, pixel_values)
    assert relative_error(got, expected) < 1e-5
    # the images matter: other pixels give other logits at the text tokens after them
    with torch.no_grad():
        other = ours(ids, pixel_values=pixel_values.flip(-1)).logits
    assert relative_error(other, expected) > 1e-3


def test_text_only_batch_needs_no_pixels() -> None:
    hf, ours, _, _ = case("one-image-and-a-text-row")
    ids = prompt([[], []], 4)
    with torch.no_grad():
        assert relative_error(ours(ids).logits, hf_multimodal_logits(hf, ids, None)) < 1e-5


def test_features_replace_the_placeholders_in_reading_order() -> None:
    _, ours, ids, pixel_values = case("several-images-several-tiles")
    with torch.no_grad():
        embeddings = ours.embed(ids, pixel_values)
        features = ours.image_features(pixel_values).flatten(0, 1)
        plain = ours.language_model.embed_tokens(ids)
    placeholders = (ids == IMAGE_TOKEN_ID).nonzero().tolist()  # row 0 left to right, then row 1
    assert len(placeholders) == features.shape[0] == 6 * 4
    for k, (b, t) in enumerate(placeholders):
        assert torch.equal(embeddings[b, t], features[k])
    text = ids != IMAGE_TOKEN_ID
    assert torch.equal(embeddings[text], plain[text])


def test_pixel_shuffle_equals_transformers_and_a_hand_checked_grid() -> None:
    from transformers.models.llama4.modeling_llama4 import pixel_shuffle as hf_pixel_shuffle

    x = torch.randn(3, 64, 12)
    assert torch.equal(pixel_shuffle(x, 2), hf_pixel_shuffle(x, 0.5))
    assert torch.equal(pixel_shuffle(x, 4), hf_pixel_shuffle(x, 0.25))
    # a 4 x 4 grid whose one channel is the patch's index: token (0, 0) holds patches 0, 1 (right of
    # it), 4 and 5 (the row below); token (0, 1) patches 2, 3, 6, 7; 16 patches -> 4 tokens of 4 channels
    grid = torch.arange(16.0).view(1, 16, 1)
    assert pixel_shuffle(grid, 2)[0].tolist() == [
        [0, 1, 4, 5],
        [2, 3, 6, 7],
        [8, 9, 12, 13],
        [10, 11, 14, 15],
    ]


def test_2d_rope_equals_transformers_and_hand_checked_angles() -> None:
    from transformers.models.llama4.modeling_llama4 import Llama4VisionRotaryEmbedding

    hf_config = transformers.Llama4VisionConfig(
        hidden_size=64, num_attention_heads=4, image_size=28, patch_size=7
    )
    expected = Llama4VisionRotaryEmbedding._compute_freqs_ci(hf_config)[:, 0]
    vision = VisionConfig(
        hidden_size=64, num_heads=4, image_size=28, patch_size=7, intermediate_size=256, num_layers=1
    )
    angles = vision_rope_angles(vision)
    assert angles.shape == (17, 8)
    assert relative_error(torch.view_as_real(angles), torch.view_as_real(expected)) < 1e-6
    # patch 6 is in column 2, row 1 (counting from 0): its first pair turns by 3 radians (frequency 1,
    # column + 1), its pair head_dim / 4 = 4 by 2 (row + 1); the class token (last) does not turn
    assert math.isclose(angles[6, 0].angle().item(), 3.0, abs_tol=1e-6)
    assert math.isclose(angles[6, 4].angle().item(), 2.0, abs_tol=1e-6)
    assert torch.equal(angles[-1], torch.ones(8, dtype=torch.complex64))


def test_published_totals_within_one_percent() -> None:
    for name, published in (("llama4-scout", 109e9), ("llama4-maverick", 400e9)):
        config = l4lab.preset(name)
        total, active = l4lab.count_params(config)
        assert abs(total - published) / published < 0.01, (name, total)
        assert round(active / 1e9, 1) == 17.2  # per text token: the vision encoder is not in it
        assert round(l4lab.count_vision_params(config.vision, config.hidden_size) / 1e9, 2) == 0.87
    vision = l4lab.preset("llama4-scout").vision
    assert (vision.image_size, vision.patch_size, vision.hidden_size, vision.num_layers) == (
        336,
        14,
        1408,
        34,
    )
    assert (vision.num_heads, vision.intermediate_size, vision.adapter_size, vision.tokens_per_tile) == (
        16,
        5632,
        4096,
        144,
    )


def test_count_params_equals_the_built_multimodal_model() -> None:
    config = l4lab.preset("llama4-scout")
    with torch.device("meta"):
        model = Llama4Multimodal(config)
    assert sum(p.numel() for p in model.parameters()) == l4lab.count_params(config)[0]
    assert model.multi_modal_projector.linear_1.weight.shape == (5120, 4096)


def test_text_toggles_act_on_the_text_model() -> None:
    hf, ours, ids, pixel_values = case("one-image-and-a-text-row")
    # switching the positions is the same as transformers' model with RoPE and global attention everywhere
    hf_rope = hf_multimodal(text=dict(attention_chunk_size=None, no_rope_layers=[1, 1, 1, 1]))
    ours.set_positions("rope")
    with torch.no_grad():
        got = ours(ids, pixel_values=pixel_values).logits
    assert relative_error(got, hf_multimodal_logits(hf_rope, ids, pixel_values)) < 1e-5
    assert relative_error(got, hf_multimodal_logits(hf, ids, pixel_values)) > 1e-3


def test_fused_backend_gives_the_same_logits() -> None:
    _, ours, ids, pixel_values = case("one-image-and-a-text-row")
    with torch.no_grad():
        eager = ours(ids, pixel_values=pixel_values).logits
        ours.set_backend("fused")
        fused = ours(ids, pixel_values=pixel_values).logits
    assert relative_error(fused, eager) < 1e-5


# ---------------------------------------------------------------------- generation
def test_generation_equals_a_full_forward_at_every_step_and_encodes_once() -> None:
    hf, ours, ids, pixel_values = case("several-images-several-tiles", seed=1)
    calls = []
    ours.vision_model.register_forward_hook(lambda *_: calls.append(1))
    got = ours.generate(ids, max_new_tokens=6, pixel_values=pixel_values)
    assert len(calls) == 1
    expected = ids
    for _ in range(6):
        logits = hf_multimodal_logits(hf, expected, pixel_values)[:, -1]
        expected = torch.cat([expected, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(got, expected)


def test_cached_logits_equal_the_full_forward() -> None:
    _, ours, ids, pixel_values = case("one-image-and-a-text-row", seed=2)
    with torch.no_grad():
        full = ours(ids, pixel_values=pixel_values).logits
        cache = ours.new_cache()
        pieces = [ours(ids[:, :12], pixel_values=pixel_values, cache=cache).logits]
        pieces += [ours(ids[:, t : t + 1], cache=cache).logits for t in range(12, ids.shape[1])]
    assert relative_error(torch.cat(pieces, dim=1), full) < 1e-5


# ---------------------------------------------------------------------- errors
@pytest.fixture(scope="module")
def tiny() -> tuple:
    _, ours, ids, pixel_values = case("one-image-and-a-text-row")
    return ours, ids, pixel_values


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        (lambda p: p[:, :2], ValueError, r"has 2 channels in dimension 1; the encoder reads 3"),
        (
            lambda p: p.permute(0, 2, 3, 1),
            ValueError,
            r"channels last\? use pixel_values.permute\(0, 3, 1, 2\)",
        ),
        (
            lambda p: p[:, :, :14, :14],
            ValueError,
            r"tiles of 14 x 14 pixels; the encoder reads tiles of 28 x 28",
        ),
        (lambda p: (p * 255).to(torch.uint8), TypeError, r"dtype torch.uint8; .*l4lab.ImageProcessor"),
        (lambda p: p[0], ValueError, r"one tile: use pixel_values\[None\]"),
        (lambda p: p.numpy(), TypeError, r"must be a float tensor of tiles \[tiles, 3, 28, 28\]"),
        (lambda p: torch.cat([p, p]), ValueError, r"4 image placeholder tokens .* images give 8 features"),
        (lambda p: None, ValueError, r"4 image placeholder tokens .* images give 0 features"),
    ],
)
def test_bad_pixel_values_are_named(tiny: tuple, change, error, message: str) -> None:
    ours, ids, pixel_values = tiny
    with pytest.raises(error, match=message):
        ours(ids, pixel_values=change(pixel_values))


def test_placeholders_without_their_image_are_refused(tiny: tuple) -> None:
    ours, ids, pixel_values = tiny
    extra = ids.clone()
    extra[1, -1] = IMAGE_TOKEN_ID
    with pytest.raises(ValueError, match=r"input_ids hold 5 image placeholder tokens \(<\|patch\|>, id 90\)"):
        ours(extra, pixel_values=pixel_values)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            dict(intermediate_size=768),
            r"vision.intermediate_size = 768 .* hidden_size / pixel_shuffle_ratio\^2 = 5632",
        ),
        (dict(image_size=330), r"vision.image_size = 330 .* a multiple of patch_size \(14\)"),
        (dict(image_size=322), r"23 patches per side divide by the pixel shuffle's 2"),
        (dict(num_heads=64), r"vision.num_heads = 64 .* head_dim divisible by 4"),
        (dict(pixel_shuffle_ratio=0.3), r"1 / k for a positive integer k"),
    ],
)
def test_impossible_vision_configs_name_the_field(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        l4lab.preset("llama4-scout", vision=VisionConfig(**fields))


def test_a_text_config_builds_no_multimodal_model() -> None:
    with pytest.raises(ValueError, match=r"needs config.vision"):
        Llama4Multimodal(l4lab.preset("tiny"))


def test_merge_counts_before_it_writes() -> None:
    embeddings = torch.zeros(1, 3, 2)
    ids = torch.tensor([[5, IMAGE_TOKEN_ID, 5]])
    merged = merge_image_features(embeddings, ids, torch.ones(1, 2), IMAGE_TOKEN_ID)
    assert merged[0].tolist() == [[0, 0], [1, 1], [0, 0]]
    with pytest.raises(ValueError, match="1 image placeholder tokens"):
        merge_image_features(embeddings, ids, torch.ones(2, 2), IMAGE_TOKEN_ID)


# ---------------------------------------------------------------------- checkpoints
def reload_in_transformers(path: Path) -> Any:
    model = transformers.Llama4ForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    for part in (model.config, model.config.text_config, model.config.vision_config):
        part._attn_implementation = "eager"
    return model


def test_saved_multimodal_checkpoint_loads_in_transformers(tmp_path: Path) -> None:
    hf, ours, ids, pixel_values = case("several-images-several-tiles")
    ours.save_pretrained(tmp_path / "ours")
    reloaded = reload_in_transformers(tmp_path / "ours")
    expected = hf_multimodal_logits(hf, ids, pixel_values)
    assert relative_error(hf_multimodal_logits(reloaded, ids, pixel_values), expected) < 1e-6
    saved = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert saved["architectures"] == ["Llama4ForConditionalGeneration"]
    assert saved["vision_config"]["projector_output_dim"] == 48
    assert saved["image_token_index"] == IMAGE_TOKEN_ID


def test_transformers_multimodal_checkpoint_loads_in_l4lab(tmp_path: Path) -> None:
    hf, _, ids, pixel_values = case("grid-6-patch-4")
    hf.save_pretrained(tmp_path / "hf")
    ours = l4lab.load_pretrained(tmp_path / "hf")
    assert isinstance(ours, Llama4Multimodal) and ours.config.vision.tokens_per_tile == 9
    with torch.no_grad():
        got = ours(ids, pixel_values=pixel_values).logits
    assert relative_error(got, hf_multimodal_logits(hf, ids, pixel_values)) < 1e-5
    # the text part alone, without reading the vision weights
    text = l4lab.load_pretrained(tmp_path / "hf", text_only=True)
    assert isinstance(text, l4lab.Llama4)
    plain = prompt([[], []], 9)
    with torch.no_grad():
        assert relative_error(text(plain).logits, hf_multimodal_logits(hf, plain, None)) < 1e-5


def test_sharded_multimodal_round_trip(tmp_path: Path) -> None:
    _, ours, ids, pixel_values = case("one-image-and-a-text-row")
    interop.save_pretrained(ours, tmp_path / "sharded", max_shard_bytes=30_000)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 3
    assert "vision_model.model.layers.0.self_attn.q_proj.bias" in index["weight_map"]
    assert "language_model.model.layers.0.self_attn.q_proj.weight" in index["weight_map"]
    assert "language_model.lm_head.weight" in index["weight_map"]
    back = l4lab.load_pretrained(tmp_path / "sharded")
    with torch.no_grad():
        logits = back(ids, pixel_values=pixel_values).logits
        assert torch.equal(logits, ours(ids, pixel_values=pixel_values).logits)
    assert back.config == ours.config


def test_missing_vision_weights_are_named(tmp_path: Path) -> None:
    _, ours, _, _ = case("one-image-and-a-text-row")
    ours.save_pretrained(tmp_path / "ckpt")
    weights = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    del weights["multi_modal_projector.linear_1.weight"]
    weights["vision_model.class_embedding"] = torch.zeros(5)
    save_file(weights, str(tmp_path / "ckpt" / "model.safetensors"))
    with pytest.raises(ValueError) as error:
        l4lab.load_pretrained(tmp_path / "ckpt")
    message = str(error.value)
    assert "missing keys ['multi_modal_projector.linear_1.weight']" in message
    assert "vision_model.class_embedding: expected (32,), got (5,)" in message
