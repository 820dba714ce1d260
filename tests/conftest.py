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
