"""The fusion experiment's parts: what each variant trains and sees, and the two measurements checked
against cases whose answer is known without the code under test (uniform attention, counted experts)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from l4lab import multimodal_data as data
from l4lab.fusion import (
    FusionSetup,
    accuracy_per_type,
    grounding_shares,
    routing_by_modality,
    run_variant,
    train_answers,
)
from l4lab.vision import Llama4Multimodal

SETUP = FusionSetup()


def fresh_model(seed: int = 0) -> Llama4Multimodal:
    torch.manual_seed(seed)
    return Llama4Multimodal(SETUP.config()).eval()


def test_the_blind_variant_ignores_the_pictures_and_the_others_read_them() -> None:
    model = fresh_model()
    examples = data.make_examples(12, seed=3)
    batch = SETUP.encode(examples)
    flipped = copy.copy(batch)
    flipped.pixel_values = batch.pixel_values.flip(-1)
    blind = [run_variant(model, b, "text-only").logits for b in (batch, flipped)]
    seeing = [run_variant(model, b, "early fusion").logits for b in (batch, flipped)]
    assert torch.equal(*blind) and not torch.allclose(*seeing)
    with pytest.raises(ValueError, match="variant 'late' is unknown"):
        run_variant(model, batch, "late")


def test_the_late_adapter_trains_the_vision_side_only() -> None:
    model = fresh_model()
    text_before = copy.deepcopy(model.language_model.state_dict())
    vision_before = copy.deepcopy(model.vision_model.state_dict())
    train_answers(model, "late adapter", SETUP, seed=0, steps=3)
    assert all(torch.equal(text_before[k], v) for k, v in model.language_model.state_dict().items())
    assert not all(torch.equal(vision_before[k], v) for k, v in model.vision_model.state_dict().items())


def test_early_fusion_learns_colour_and_the_blind_model_stays_at_chance() -> None:
    colour = data.make_examples(200, seed=7, kinds=("colour",))
    test = SETUP.encode(colour)
    seeing, blind = fresh_model(), fresh_model()
    train_answers(seeing, "early fusion", SETUP, seed=0, steps=150)
    train_answers(blind, "text-only", SETUP, seed=0, steps=150)
    assert accuracy_per_type(seeing, "early fusion", test)["colour"] > 0.6
    assert abs(accuracy_per_type(blind, "text-only", test)["colour"] - 0.25) < 0.1


def test_uniform_attention_gives_each_part_its_share_of_the_tokens() -> None:
    model = fresh_model()
    with torch.no_grad():  # zero queries: every key scores the same, attention is uniform over the past
        for layer in model.language_model.layers:
            layer.self_attn.q_proj.weight.zero_()
    examples = [e for e in data.make_examples(60, seed=4) if e.kind in ("region", "two-images")]
    shares = grounding_shares(model, SETUP.encode(examples), examples)
    assert shares == pytest.approx({"region": 0.25, "two-images": 0.5}, abs=1e-6)


def test_routing_by_modality_is_the_total_variation_of_counted_choices() -> None:
    model = fresh_model(1)
    batch = SETUP.encode(data.make_examples(30, seed=5))
    out = model(batch.input_ids, pixel_values=batch.pixel_values)
    ids = batch.input_ids.numpy()
    expected = []
    for record in out.routing:
        chosen = record.experts[..., 0].numpy()
        image = np.array([np.mean(chosen[ids == data.PATCH] == e) for e in range(SETUP.experts)])
        text_mask = (ids != data.PATCH) & (ids != data.PAD)
        text = np.array([np.mean(chosen[text_mask] == e) for e in range(SETUP.experts)])
        expected.append(0.5 * np.abs(image - text).sum())
    assert routing_by_modality(model, batch) == pytest.approx(expected, abs=1e-12)
