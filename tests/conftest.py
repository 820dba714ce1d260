"""Shared fixtures: tiny transformers Llama 4 models with every weight re-initialised (the parity oracle)."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch

if not torch.cuda.is_available():
    # before anything imports triton: without a GPU the kernels run in Triton's interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

transformers = pytest.importorskip("transformers")


def hf_text_config(**overrides: Any) -> Any:
    """A tiny ``Llama4TextConfig`` in which every feature fires at short lengths."""
    fields: dict[str, Any] = dict(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=48,
        intermediate_size_mlp=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=4,
        num_experts_per_tok=1,
        interleave_moe_layer_step=1,
        no_rope_layer_interval=2,
        attention_chunk_size=8,
        attn_temperature_tuning=True,
        floor_scale=4,
        attn_scale=0.5,
        use_qk_norm=True,
        max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=1,
        eos_token_id=2,
    )
    fields.update(overrides)
    config = transformers.Llama4TextConfig(**fields)
    config._attn_implementation = "eager"
    return config


@torch.no_grad()
def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Re-initialise EVERY parameter (transformers starts experts' gate_up_proj at zero)."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=generator)
        if "norm" in name:
            param.copy_(1.0 + 0.1 * noise)
        else:
            param.copy_(0.15 * noise)
    return model


def hf_model(seed: int = 0, **overrides: Any) -> Any:
    model = transformers.Llama4ForCausalLM(hf_text_config(**overrides)).eval()
    return randomise(model, seed)


# the <|patch|>, <|image_start|> and <|image_end|> ids of the tiny multimodal models (inside vocab 97)
IMAGE_TOKEN_ID, IMAGE_START_ID, IMAGE_END_ID = 90, 91, 92


def hf_multimodal(
    seed: int = 0,
    image_size: int = 28,
    patch_size: int = 7,
    hidden_size: int = 32,
    heads: int = 4,
    ratio: float = 0.5,
    text: dict[str, Any] | None = None,
) -> Any:
    """A tiny ``Llama4ForConditionalGeneration``, every weight redrawn. Its encoder's MLP width is
    ``hidden_size / ratio^2``, the width of a pixel-shuffled token (the class default 768 / 5632 is not)."""
    vision = transformers.Llama4VisionConfig(
        hidden_size=hidden_size,
        num_hidden_layers=2,
        num_attention_heads=heads,
        intermediate_size=round(hidden_size / ratio**2),
        image_size=image_size,
        patch_size=patch_size,
        pixel_shuffle_ratio=ratio,
        projector_input_dim=48,
        projector_output_dim=48,
        vision_output_dim=48,
    )
    config = transformers.Llama4Config(
        text_config=hf_text_config(**(text or {})).to_dict(),
        vision_config=vision.to_dict(),
        image_token_index=IMAGE_TOKEN_ID,
        boi_token_index=IMAGE_START_ID,
        eoi_token_index=IMAGE_END_ID,
    )
    for part in (config, config.text_config, config.vision_config):
        part._attn_implementation = "eager"
    return randomise(transformers.Llama4ForConditionalGeneration(config).eval(), seed)


@torch.no_grad()
def hf_multimodal_logits(
    model: Any, input_ids: torch.Tensor, pixel_values: torch.Tensor | None
) -> torch.Tensor:
    """transformers' multimodal logits built from its own parts: ``forward`` raises AttributeError
    (``image_outputs``) in transformers 5.24."""
    embeddings = model.get_input_embeddings()(input_ids)
    if pixel_values is not None:
        features = model.get_image_features(pixel_values=pixel_values, return_dict=True).last_hidden_state
        flat = model.multi_modal_projector(features.view(-1, features.size(-1)))
        mask = model.get_placeholder_mask(input_ids, inputs_embeds=embeddings, image_features=flat)
        embeddings = embeddings.masked_scatter(mask, flat)
    return model.language_model(inputs_embeds=embeddings).logits
