"""Interop with Hugging Face transformers and published checkpoints.

l4lab's parameter names are those of transformers' ``Llama4ForCausalLM`` without the ``model.`` prefix,
so converting is a matter of configuration fields and key prefixes:

====================================  ============================================================
l4lab ``Config``                      transformers ``Llama4TextConfig``
====================================  ============================================================
``num_layers``                        ``num_hidden_layers``
``num_heads`` / ``num_kv_heads``      ``num_attention_heads`` / ``num_key_value_heads``
``moe_intermediate_size``             ``intermediate_size`` (routed and shared experts)
``dense_intermediate_size``           ``intermediate_size_mlp`` (dense layers)
``num_experts`` / ``top_k``           ``num_local_experts`` / ``num_experts_per_tok``
``moe_layer_step``                    ``interleave_moe_layer_step`` (or ``moe_layers``)
``nope_layer_interval``               ``no_rope_layer_interval`` (or ``no_rope_layers``, 1 = uses RoPE)
``temperature_tuning``                ``attn_temperature_tuning``
``rope_theta``, ``rope_scaling``      ``rope_parameters`` (or ``rope_theta`` + ``rope_scaling``)
====================================  ============================================================

The same code is Llama 2/3 and Mixtral: ``from_transformers`` also takes a ``LlamaForCausalLM`` or a
``MixtralForCausalLM``, ``load_pretrained`` reads their hub layouts (``config.json`` with ``model_type``
"llama" or "mixtral"; Mixtral's experts one by one, ``block_sparse_moe.experts.{j}.w1/w2/w3``, or
stacked as transformers 5 holds them) and ``save_pretrained(..., layout="llama" | "mixtral")`` writes
them. Those layouts store q_proj and k_proj rows permuted for rotate-half RoPE; l4lab rotates
interleaved pairs, so the rows are permuted back on the way in and forth on the way out
(:func:`interleaved_rope_rows`); the maths stays l4lab's.

A multimodal model (``l4lab.vision.Llama4Multimodal``) maps onto ``Llama4ForConditionalGeneration``: its
``vision_model.*`` and ``multi_modal_projector.*`` parameters have the checkpoint's names, its text model's
are l4lab's under ``language_model.`` (``language_model.model.`` in the checkpoint). The vision fields:

====================================  ============================================================
l4lab ``VisionConfig``                transformers ``Llama4VisionConfig`` / ``Llama4Config``
====================================  ============================================================
``num_layers`` / ``num_heads``        ``num_hidden_layers`` / ``num_attention_heads``
``adapter_size``                      ``projector_input_dim`` = ``projector_output_dim`` =
                                      ``vision_output_dim``
``rope_theta``                        ``rope_parameters`` (or ``rope_theta``)
``image_token_id``                    ``image_token_index`` (top level)
``image_start_token_id`` / ``_end_``  ``boi_token_index`` / ``eoi_token_index`` (top level)
====================================  ============================================================

Only safetensors are read: pickle files can run code when loaded.

``save_pretrained`` writes into a directory and replaces only the checkpoint's own files (config.json,
model.safetensors or the index and its shards), all together or not at all (``l4lab.storage``); every
other file there stays. It records checksums (of each tensor, and of config.json) that
``load_pretrained`` checks, and every loading error names the file and what is wrong with it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from l4lab.config import Config, RopeScaling, VisionConfig
from l4lab.model import Llama4
from l4lab.storage import (
    SafetensorsFile,
    brief_list,
    committed_file,
    read_json,
    reading,
    replace_files,
    save_safetensors,
    sha256_text,
)
from l4lab.vision import Llama4Multimodal

# prefixes under which published checkpoints store the text model's weights (multimodal ones first)
_TEXT_PREFIXES = ("language_model.model.", "model.language_model.", "language_model.", "model.")
_VISION_PREFIXES = (
    "vision_model.",
    "multi_modal_projector.",
    "model.vision_model.",
    "model.multi_modal_projector.",
)
CONFIG_NAME = "config.json"
SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CONFIG_CHECKSUM_KEY = "l4lab.config_sha256"  # in model.safetensors' or the index's metadata


# ---------------------------------------------------------------------- configuration
def _decoder_fields(config: Config) -> dict[str, Any]:
    """The transformers config fields every Llama decoder shares (Llama 2/3, Mixtral and Llama 4):
    sizes, heads, activation, norm epsilon, RoPE (with Llama 3.1's scaling), no biases, untied head."""
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling is not None:
        rope.update(rope_type="llama3", **vars(config.rope_scaling))
    return {
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_parameters": rope,
        "attention_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
    }


def to_transformers_config(config: Config, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """The ``config.json`` of a transformers ``Llama4ForCausalLM`` with the same behaviour.

    The l4lab config itself is kept under the key ``"l4lab"``, so that fields transformers has no
    place for (the chunk size of a model switched to global RoPE) come back on loading.
    """
    plan = config.layer_plan()
    chunked = any(spec.chunk_size is not None for spec in plan)
    hf: dict[str, Any] = {
        "architectures": ["Llama4ForCausalLM"],
        "model_type": "llama4_text",
        **_decoder_fields(config),
        "intermediate_size": config.moe_intermediate_size,
        "intermediate_size_mlp": config.dense_intermediate_size,
        "num_local_experts": config.num_experts,
        "num_experts_per_tok": config.top_k,
        "interleave_moe_layer_step": config.moe_layer_step,
        "moe_layers": [spec.index for spec in plan if spec.moe],
        "no_rope_layers": [int(spec.uses_rope) for spec in plan],
        "no_rope_layer_interval": config.nope_layer_interval,
        "attention_chunk_size": config.attention_chunk_size if chunked else None,
        "attn_temperature_tuning": any(spec.temperature_tuning for spec in plan),
        "floor_scale": config.floor_scale,
        "attn_scale": config.attn_scale,
        "use_qk_norm": config.use_qk_norm,
        "l4lab": config.to_dict(),
    }
    if dtype is not None:
        hf["dtype"] = str(dtype).removeprefix("torch.")
    return hf


def to_transformers_multimodal_config(config: Config, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """The ``config.json`` of a transformers ``Llama4ForConditionalGeneration`` with the same behaviour."""
    vision = config.vision
    if vision is None:
        raise ValueError("config.vision is None: a text model's config is to_transformers_config(config)")
    hf: dict[str, Any] = {
        "architectures": ["Llama4ForConditionalGeneration"],
        "model_type": "llama4",
        "text_config": to_transformers_config(config, dtype),
        "vision_config": {
            "model_type": "llama4_vision_model",
            "hidden_size": vision.hidden_size,
            "hidden_act": "gelu",
            "num_hidden_layers": vision.num_layers,
            "num_attention_heads": vision.num_heads,
            "num_channels": vision.num_channels,
            "intermediate_size": vision.intermediate_size,
            "vision_output_dim": vision.adapter_size,
            "projector_input_dim": vision.adapter_size,
            "projector_output_dim": vision.adapter_size,
            "multi_modal_projector_bias": False,
            "image_size": vision.image_size,
            "patch_size": vision.patch_size,
            "pixel_shuffle_ratio": vision.pixel_shuffle_ratio,
            "norm_eps": 1e-5,
            "rope_parameters": {"rope_type": "default", "rope_theta": vision.rope_theta},
            "vision_feature_select_strategy": "default",
        },
        "image_token_index": vision.image_token_id,
        "boi_token_index": vision.image_start_token_id,
        "eoi_token_index": vision.image_end_token_id,
        "tie_word_embeddings": False,
    }
    if dtype is not None:
        hf["dtype"] = str(dtype).removeprefix("torch.")
    return hf


_REQUIRED: Any = object()


def _number(
    hf: dict[str, Any], name: str, kind: type, default: Any = _REQUIRED, minimum: float | None = None
) -> Any:
    """``hf[name]`` as an int or float, or ``default`` when absent or null; ValueError naming the field."""
    value = hf.get(name)
    if value is None:
        if default is _REQUIRED:
            raise ValueError(f"config field {name} is missing")
        return default
    integral = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not integral):
        raise ValueError(
            f"config field {name} = {value!r} is not {'an integer' if kind is int else 'a number'}"
        )
    if minimum is not None and not value >= minimum:
        raise ValueError(f"config field {name} = {value!r} is not allowed: at least {minimum}")
    return kind(value)


def _flag(hf: dict[str, Any], name: str, default: bool) -> bool:
    """``hf[name]`` as a bool (published configs write some flags as numbers: 4 means on)."""
    value = hf.get(name, default)
    if value is not None and not isinstance(value, (bool, int, float)):
        raise ValueError(f"config field {name} = {value!r} is not true or false")
    return bool(value)


def _int_list(hf: dict[str, Any], name: str) -> list[int] | None:
    value = hf.get(name)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ValueError(f"config field {name} = {value!r} is not a list of integers")
    return value


def _rope_from_transformers(
    hf: dict[str, Any], default_theta: float = 500000.0
) -> tuple[float, RopeScaling | None]:
    for name in ("rope_parameters", "rope_scaling"):
        if hf.get(name) is not None and not isinstance(hf[name], dict):
            raise ValueError(f"config field {name} = {hf[name]!r} is not an object")
    rope = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    theta = _number(rope, "rope_theta", float, _number(hf, "rope_theta", float, default_theta))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise ValueError(f"rope_parameters.rope_type {kind!r} is not supported: 'default' or 'llama3'")
    fields = {name: _number(rope, name, float) for name in ("factor", "low_freq_factor", "high_freq_factor")}
    original = _number(rope, "original_max_position_embeddings", int)
    try:
        return theta, RopeScaling(**fields, original_max_position_embeddings=original)
    except ValueError as error:
        raise ValueError(f"config field rope_parameters: {error}") from None


def _every_kth(num_layers: int, step: int) -> list[int]:
    return [i for i in range(num_layers) if (i + 1) % step == 0]


def _side(hf: dict[str, Any], name: str) -> int:
    """An image or patch size: an integer, or a [height, width] pair of equal integers."""
    value = hf.get(name)
    if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == value[1]:
        value = value[0]
    return _number({name: value}, name, int, minimum=1)


def vision_config_from_transformers(hf: dict[str, Any] | Any) -> VisionConfig | None:
    """The :class:`VisionConfig` of a transformers multimodal Llama 4 config (None: it has none)."""
    if not isinstance(hf, dict):
        hf = hf.to_dict()
    vision = hf.get("vision_config")
    if vision is None:
        return None
    if not isinstance(vision, dict):
        vision = vision.to_dict()
    for name, expected in (("hidden_act", "gelu"), ("multi_modal_projector_bias", False)):
        if name in vision and vision[name] != expected:
            raise ValueError(
                f"config field vision_config.{name} = {vision[name]!r} is not supported: "
                f"l4lab models {expected!r}"
            )
    widths = {
        name: _number(vision, name, int, minimum=1)
        for name in ("projector_input_dim", "projector_output_dim", "vision_output_dim")
    }
    if len(set(widths.values())) != 1:
        raise ValueError(
            f"config fields vision_config {widths} differ; l4lab models Llama 4's adapter, where all three "
            "are one width (adapter_size)"
        )
    rope = vision.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise ValueError(f"config field vision_config.rope_parameters = {rope!r} is not an object")
    theta = _number(rope, "rope_theta", float, _number(vision, "rope_theta", float, 10000.0))
    try:
        return VisionConfig(
            image_size=_side(vision, "image_size"),
            patch_size=_side(vision, "patch_size"),
            num_channels=_number(vision, "num_channels", int, 3),
            hidden_size=_number(vision, "hidden_size", int),
            num_layers=_number(vision, "num_hidden_layers", int),
            num_heads=_number(vision, "num_attention_heads", int),
            intermediate_size=_number(vision, "intermediate_size", int),
            pixel_shuffle_ratio=_number(vision, "pixel_shuffle_ratio", float, 0.5),
            adapter_size=widths["vision_output_dim"],
            rope_theta=theta,
            image_token_id=_number(hf, "image_token_index", int, 200092),
            image_start_token_id=_number(hf, "boi_token_index", int, 200080),
            image_end_token_id=_number(hf, "eoi_token_index", int, 200081),
        )
    except ValueError as error:
        raise ValueError(f"config field vision_config: {error}") from None


def config_from_transformers(hf: dict[str, Any] | Any) -> Config:
    """An l4lab :class:`Config` from a transformers Llama 4, Llama or Mixtral config (object or
    ``config.json`` dict).

    Accepts the text config or a multimodal config holding one under ``text_config`` (and then its
    ``vision_config`` too). Raises ValueError naming the field when a field is missing or malformed, or
    when the checkpoint uses something l4lab does not model.
    """
    if not isinstance(hf, dict):
        hf = hf.to_dict()
    vision = vision_config_from_transformers(hf)
    if "text_config" in hf:
        hf = hf["text_config"]
        if not isinstance(hf, dict):
            hf = hf.to_dict()
    config = _text_config_from_transformers(hf)
    if vision is not None:
        config = config.replace(vision=vision)
    return config


def _text_config_from_transformers(hf: dict[str, Any]) -> Config:
    if layout_of(hf) != "llama4":
        return _config_from_layout(hf, layout_of(hf))
    if hf.get("l4lab"):
        if not isinstance(hf["l4lab"], dict):
            raise ValueError(f"config field l4lab = {hf['l4lab']!r} is not an object of Config fields")
        config = Config.from_dict(hf["l4lab"])
        _check_agrees(config, hf)
        return config

    for name, expected in (("hidden_act", "silu"), ("tie_word_embeddings", False), ("attention_bias", False)):
        if name in hf and hf[name] != expected:
            raise ValueError(
                f"config field {name} = {hf[name]!r} is not supported: l4lab models {expected!r}"
            )
    layers = _number(hf, "num_hidden_layers", int, minimum=1)
    heads = _number(hf, "num_attention_heads", int, minimum=1)
    hidden = _number(hf, "hidden_size", int, minimum=1)
    theta, scaling = _rope_from_transformers(hf)

    step = _number(hf, "interleave_moe_layer_step", int, 1, minimum=1)
    moe_layers = _int_list(hf, "moe_layers")
    ffn = "moe"
    if moe_layers is not None and moe_layers != _every_kth(layers, step):
        if len(moe_layers) == 0:
            ffn = "dense"
        else:
            raise ValueError(
                f"config field moe_layers = {moe_layers} is not every interleave_moe_layer_step-th layer; "
                "l4lab models MoE layers at (i + 1) % step == 0"
            )

    interval = _number(hf, "no_rope_layer_interval", int, 4, minimum=1)
    chunk = _number(hf, "attention_chunk_size", int, None)
    max_positions = _number(hf, "max_position_embeddings", int, 131072)
    pattern = [int((i + 1) % interval != 0) for i in range(layers)]
    uses_rope = _int_list(hf, "no_rope_layers") or pattern
    positions = "irope"
    if all(uses_rope[:layers]) and chunk is None:
        positions = "rope"
    elif not any(uses_rope[:layers]):
        positions = "nope"
    elif uses_rope[:layers] != pattern:
        raise ValueError(
            f"config field no_rope_layers = {uses_rope} is not one NoPE layer every no_rope_layer_interval "
            f"({interval}) layers, the only pattern l4lab models"
        )
    return Config(
        vocab_size=_number(hf, "vocab_size", int),
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=_number(hf, "num_key_value_heads", int, 0) or heads,
        head_dim=_number(hf, "head_dim", int, 0) or hidden // heads,
        moe_intermediate_size=_number(hf, "intermediate_size", int),
        dense_intermediate_size=_number(
            hf, "intermediate_size_mlp", int, _number(hf, "intermediate_size", int)
        ),
        num_experts=_number(hf, "num_local_experts", int, 1),
        top_k=_number(hf, "num_experts_per_tok", int, 1),
        moe_layer_step=step,
        nope_layer_interval=interval,
        attention_chunk_size=chunk if chunk is not None else max_positions,
        temperature_tuning=_flag(hf, "attn_temperature_tuning", True),
        floor_scale=_number(hf, "floor_scale", int, 8192),
        attn_scale=_number(hf, "attn_scale", float, 0.1),
        use_qk_norm=_flag(hf, "use_qk_norm", True),
        rope_theta=theta,
        rope_scaling=scaling,
        rms_norm_eps=_number(hf, "rms_norm_eps", float, 1e-5),
        max_position_embeddings=max_positions,
        ffn=ffn,
        positions=positions,
        bos_token_id=_single_id(hf, "bos_token_id"),
        eos_token_id=_single_id(hf, "eos_token_id"),
    )


def _single_id(hf: dict[str, Any], name: str) -> int | None:
    value = hf.get(name)
    if isinstance(value, list):
        ids = _int_list(hf, name)
        return ids[0] if ids else None
    return _number(hf, name, int, None)


def _check_agrees(config: Config, hf: dict[str, Any]) -> None:
    """The ``l4lab`` entry of a config.json must describe the same model as its transformers fields."""
    expected = to_transformers_config(config)
    for name in (
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "intermediate_size",
        "intermediate_size_mlp",
        "num_local_experts",
        "num_experts_per_tok",
        "moe_layers",
        "no_rope_layers",
    ):
        if name in hf and hf[name] != expected[name]:
            raise ValueError(
                f"config.json disagrees with its own 'l4lab' entry on {name}: "
                f"{hf[name]!r} vs {expected[name]!r}"
            )


# ---------------------------------------------------------------------- Llama 2/3 and Mixtral layouts
LAYOUTS = ("llama4", "llama", "mixtral")
_DEFAULT_THETA = {"llama4": 500000.0, "llama": 10000.0, "mixtral": 1000000.0}


def layout_of(hf: dict[str, Any] | Any) -> str:
    """Which checkpoint layout a transformers config describes: "llama", "mixtral" or "llama4"."""
    model_type = hf.get("model_type") if isinstance(hf, dict) else getattr(hf, "model_type", None)
    return {"llama": "llama", "mixtral": "mixtral"}.get(model_type, "llama4")


def interleaved_rope_rows(weight: Tensor, num_heads: int, head_dim: int) -> Tensor:
    """q_proj/k_proj rows of a Llama/Mixtral checkpoint (rotate-half) in l4lab's interleaved order.

    transformers' ``LlamaForCausalLM`` rotates feature i with feature i + D/2 of each head, so the
    checkpoint conversion reordered the rows that Meta's interleaved code (pairs 2i, 2i+1) had. Row
    ``(head, half, i)`` moves to ``(head, i, half)``; the attention logits are unchanged because q and k
    move together. :func:`rotate_half_rope_rows` is the inverse.
    """
    rows = num_heads * head_dim
    return weight.reshape(num_heads, 2, head_dim // 2, -1).transpose(1, 2).reshape(rows, -1)


def rotate_half_rope_rows(weight: Tensor, num_heads: int, head_dim: int) -> Tensor:
    """The inverse of :func:`interleaved_rope_rows`: l4lab's q/k rows in a Llama checkpoint's order."""
    rows = num_heads * head_dim
    return weight.reshape(num_heads, head_dim // 2, 2, -1).transpose(1, 2).reshape(rows, -1)


def _same(t: Tensor) -> Tensor:
    return t


@dataclass(frozen=True)
class _Placement:
    """Where one tensor of a Llama/Mixtral checkpoint goes in l4lab: ``region`` of parameter ``name``
    (None: all of it), converted by ``to_l4lab``; ``from_l4lab`` computes it from the whole parameter."""

    name: str
    shape: tuple[int, ...]
    to_l4lab: Callable[[Tensor], Tensor] = _same
    from_l4lab: Callable[[Tensor], Tensor] = _same
    region: tuple[Any, ...] | None = None


def _layout_tensors(config: Config, layout: str, per_expert: bool = True) -> dict[str, _Placement]:
    """Every tensor of a checkpoint in ``layout`` ("llama" or "mixtral"), by key, and its place in l4lab.

    ``per_expert``: Mixtral's hub layout, ``block_sparse_moe.experts.{j}.w1`` (gate [I, D]), ``w3`` (up)
    and ``w2`` (down [D, I]); otherwise transformers 5's stacked ``mlp.experts.gate_up_proj``
    [E, 2I, D] and ``down_proj`` [E, D, I]. l4lab stacks them as [E, D, 2I] and [E, I, D].
    """
    d, hd, i_moe = config.hidden_size, config.head_dim, config.moe_intermediate_size
    heads, kv_heads = config.num_heads, config.num_kv_heads
    tensors = {
        "model.embed_tokens.weight": _Placement("embed_tokens.weight", (config.vocab_size, d)),
        "model.norm.weight": _Placement("norm.weight", (d,)),
        "lm_head.weight": _Placement("lm_head.weight", (config.vocab_size, d)),
    }

    def rope_rows(n: int) -> dict[str, Any]:
        return dict(
            to_l4lab=lambda t: interleaved_rope_rows(t, n, hd),
            from_l4lab=lambda t: rotate_half_rope_rows(t, n, hd),
        )

    for spec in config.layer_plan():
        ours, theirs = f"layers.{spec.index}.", f"model.layers.{spec.index}."
        attn = "self_attn."
        tensors.update(
            {
                theirs + "input_layernorm.weight": _Placement(ours + "input_layernorm.weight", (d,)),
                theirs + "post_attention_layernorm.weight": _Placement(
                    ours + "post_attention_layernorm.weight", (d,)
                ),
                theirs + attn + "q_proj.weight": _Placement(
                    ours + attn + "q_proj.weight", (heads * hd, d), **rope_rows(heads)
                ),
                theirs + attn + "k_proj.weight": _Placement(
                    ours + attn + "k_proj.weight", (kv_heads * hd, d), **rope_rows(kv_heads)
                ),
                theirs + attn + "v_proj.weight": _Placement(
                    ours + attn + "v_proj.weight", (kv_heads * hd, d)
                ),
                theirs + attn + "o_proj.weight": _Placement(ours + attn + "o_proj.weight", (d, heads * hd)),
            }
        )
        ffn = ours + "feed_forward."
        if layout == "llama":
            i_dense = config.dense_intermediate_size
            for proj, shape in (
                ("gate_proj", (i_dense, d)),
                ("up_proj", (i_dense, d)),
                ("down_proj", (d, i_dense)),
            ):
                tensors[f"{theirs}mlp.{proj}.weight"] = _Placement(f"{ffn}{proj}.weight", shape)
            continue
        moe = theirs + ("block_sparse_moe." if per_expert else "mlp.")
        tensors[moe + "gate.weight"] = _Placement(ffn + "router.weight", (config.num_experts, d))
        gate_up, down = ffn + "experts.gate_up_proj", ffn + "experts.down_proj"
        if not per_expert:
            transpose = dict(to_l4lab=lambda t: t.transpose(1, 2), from_l4lab=lambda t: t.transpose(1, 2))
            tensors[moe + "experts.gate_up_proj"] = _Placement(
                gate_up, (config.num_experts, 2 * i_moe, d), **transpose
            )
            tensors[moe + "experts.down_proj"] = _Placement(down, (config.num_experts, d, i_moe), **transpose)
            continue
        for j in range(config.num_experts):
            expert = f"{moe}experts.{j}."
            gate, up = slice(0, i_moe), slice(i_moe, 2 * i_moe)
            tensors[expert + "w1.weight"] = _Placement(
                gate_up,
                (i_moe, d),
                lambda t: t.T,
                lambda t, j=j, r=gate: t[j, :, r].T,
                (j, slice(None), gate),
            )
            tensors[expert + "w3.weight"] = _Placement(
                gate_up, (i_moe, d), lambda t: t.T, lambda t, j=j, r=up: t[j, :, r].T, (j, slice(None), up)
            )
            tensors[expert + "w2.weight"] = _Placement(
                down, (d, i_moe), lambda t: t.T, lambda t, j=j: t[j].T, (j,)
            )
    return tensors


def check_layout(config: Config, layout: str) -> None:
    """Raise ValueError naming what of ``config`` a checkpoint in ``layout`` cannot express."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r} is not known: one of {LAYOUTS}")
    problems = []
    if layout == "llama4":
        if config.router != "llama4":
            problems.append(f"router = {config.router!r} (Llama 4 checkpoints route as 'llama4')")
        if config.sliding_window is not None:
            problems.append(f"sliding_window = {config.sliding_window} (Llama 4 has none)")
    else:
        if config.positions != "rope":
            problems.append("positions = 'irope' (Llama and Mixtral use RoPE with global attention)")
        if config.use_qk_norm:
            problems.append("use_qk_norm = True (Llama and Mixtral have no QK norm)")
    if layout == "llama":
        if config.ffn != "dense":
            problems.append("ffn = 'moe' (Llama 2/3 are dense: save a MoE with layout 'llama4' or 'mixtral')")
        if config.sliding_window is not None:
            problems.append(f"sliding_window = {config.sliding_window} (LlamaForCausalLM has none)")
    if layout == "mixtral":
        if config.ffn != "moe" or config.moe_layer_step != 1:
            problems.append("dense layers (Mixtral is MoE in every layer: ffn = 'moe', moe_layer_step = 1)")
        if config.router != "mixtral":
            problems.append(f"router = {config.router!r} (Mixtral routes as 'mixtral')")
    if problems:
        raise ValueError(f"a {layout!r} checkpoint cannot express this model: " + "; ".join(problems))


def _layout_config(config: Config, layout: str) -> dict[str, Any]:
    """The ``config.json`` of a transformers ``LlamaForCausalLM`` or ``MixtralForCausalLM``."""
    hf: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM" if layout == "llama" else "MixtralForCausalLM"],
        "model_type": layout,
        **_decoder_fields(config),
        "intermediate_size": (
            config.dense_intermediate_size if layout == "llama" else config.moe_intermediate_size
        ),
    }
    if layout == "llama":
        hf.update(mlp_bias=False, pretraining_tp=1)
    else:
        hf.update(
            num_local_experts=config.num_experts,
            num_experts_per_tok=config.top_k,
            sliding_window=config.sliding_window,
            router_jitter_noise=0.0,
        )
    return hf


def _config_from_layout(hf: dict[str, Any], layout: str) -> Config:
    """An l4lab Config from a Llama 2/3 or Mixtral ``config.json``: dense or Mixtral-routed MoE, RoPE
    with global attention in every layer, no QK norm."""
    for name, expected in (
        ("hidden_act", "silu"),
        ("tie_word_embeddings", False),
        ("attention_bias", False),
        ("mlp_bias", False),
        ("pretraining_tp", 1),
    ):
        if name in hf and hf[name] != expected:
            raise ValueError(
                f"config field {name} = {hf[name]!r} is not supported: l4lab models {expected!r}"
            )
    layers = _number(hf, "num_hidden_layers", int, minimum=1)
    heads = _number(hf, "num_attention_heads", int, minimum=1)
    hidden = _number(hf, "hidden_size", int, minimum=1)
    width = _number(hf, "intermediate_size", int, minimum=1)
    max_positions = _number(hf, "max_position_embeddings", int, 4096)
    theta, scaling = _rope_from_transformers(hf, _DEFAULT_THETA[layout])
    moe: dict[str, Any] = dict(ffn="dense", num_experts=1)
    if layout == "mixtral":
        moe = dict(
            ffn="moe",
            router="mixtral",
            num_experts=_number(hf, "num_local_experts", int, 8, minimum=1),
            top_k=_number(hf, "num_experts_per_tok", int, 2, minimum=1),
            sliding_window=_number(hf, "sliding_window", int, None, minimum=1),
        )
    return Config(
        vocab_size=_number(hf, "vocab_size", int),
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=_number(hf, "num_key_value_heads", int, 0) or heads,
        head_dim=_number(hf, "head_dim", int, 0) or hidden // heads,
        moe_intermediate_size=width,
        dense_intermediate_size=width,
        moe_layer_step=1,
        attention_chunk_size=max_positions,
        temperature_tuning=False,
        use_qk_norm=False,
        rope_theta=theta,
        rope_scaling=scaling,
        rms_norm_eps=_number(hf, "rms_norm_eps", float, 1e-5),
        max_position_embeddings=max_positions,
        positions="rope",
        bos_token_id=_single_id(hf, "bos_token_id"),
        eos_token_id=_single_id(hf, "eos_token_id"),
        **moe,
    )


# ---------------------------------------------------------------------- weights
def checkpoint_key(name: str) -> str:
    """The transformers ``Llama4ForCausalLM`` key of an l4lab parameter name."""
    return name if name == "lm_head.weight" else "model." + name


def multimodal_checkpoint_key(name: str) -> str:
    """The transformers ``Llama4ForConditionalGeneration`` key of a multimodal l4lab parameter name."""
    text, found, rest = name.partition("language_model.")
    if found and not text:
        return "language_model." + checkpoint_key(rest)
    return name


def multimodal_key(key: str) -> str | None:
    """The multimodal l4lab parameter name of a checkpoint key (vision keys keep their names)."""
    if key.startswith(("model.vision_model.", "model.multi_modal_projector.")):
        return key.removeprefix("model.")
    if key.startswith(_VISION_PREFIXES):
        return key
    name = l4lab_key(key)
    return None if name is None else "language_model." + name


def _derived(name: str) -> bool:
    """RoPE buffers of transformers' models: l4lab derives them from the config."""
    return "rotary_emb." in name or "rotary_embedding." in name


def l4lab_key(key: str) -> str | None:
    """The l4lab parameter name of a checkpoint key; None for vision weights, which l4lab skips."""
    if key.startswith(_VISION_PREFIXES):
        return None
    for prefix in _TEXT_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def _set_parameter(model: nn.Module, name: str, tensor: Tensor) -> None:
    module_name, _, param_name = name.rpartition(".")
    module = model.get_submodule(module_name)
    module._parameters[param_name] = nn.Parameter(tensor, requires_grad=True)


class _WeightChecker:
    """Collects missing, unexpected, mis-shaped and mis-typed keys, then reports them all at once."""

    def __init__(self, model: nn.Module, source: str) -> None:
        self.expected = {name: tuple(p.shape) for name, p in model.named_parameters()}
        self.source = source
        self.key_of = multimodal_checkpoint_key if isinstance(model, Llama4Multimodal) else checkpoint_key
        self.seen: set[str] = set()
        self.unexpected: list[str] = []
        self.misshaped: list[str] = []
        self.mistyped: list[str] = []

    def accept(self, key: str, name: str | None, shape: tuple[int, ...], where: str = "") -> bool:
        if name is None:
            return False
        if name not in self.expected:
            self.unexpected.append(key)
            return False
        if tuple(shape) != self.expected[name]:
            self.misshaped.append(f"{key}: expected {self.expected[name]}, got {tuple(shape)}{where}")
            self.seen.add(name)  # reported as mis-shaped, not also as missing
            return False
        self.seen.add(name)
        return True

    def dtype_is_wrong(self, key: str, found: torch.dtype, expected: torch.dtype | None, why: str) -> bool:
        """Record ``key`` as mis-typed unless it is floating point (and ``expected``, when given)."""
        if found.is_floating_point and expected in (None, found):
            return False
        wanted = "a floating-point dtype" if expected is None else str(expected).removeprefix("torch.")
        self.mistyped.append(f"{key}: expected {wanted}{why}, got {str(found).removeprefix('torch.')}")
        return True

    def raise_if_wrong(self) -> None:
        missing = sorted(self.key_of(n) for n in set(self.expected) - self.seen)
        problems = []
        if missing:
            problems.append(f"missing keys {brief_list(missing)}")
        if self.unexpected:
            problems.append(f"unexpected keys {brief_list(sorted(self.unexpected))}")
        if self.misshaped:
            problems.append(f"mis-shaped keys {brief_list(self.misshaped)}")
        if self.mistyped:
            problems.append(f"mis-typed keys {brief_list(self.mistyped)}")
        if problems:
            raise ValueError(f"weights in {self.source} do not fit the model: " + "; ".join(problems))


class _LayoutLoader:
    """Places the tensors of a Llama/Mixtral checkpoint into an l4lab model built on the meta device,
    collecting missing, unexpected, mis-shaped and mis-typed keys to report them all at once."""

    def __init__(self, model: Llama4, tensors: dict[str, _Placement], source: str) -> None:
        self.model, self.tensors, self.source = model, tensors, source
        self.seen: set[str] = set()
        self.unexpected: list[str] = []
        self.misshaped: list[str] = []
        self.mistyped: list[str] = []
        self.stacked: dict[str, Tensor] = {}  # experts' parameters filled one expert at a time

    def accept(self, key: str, shape: tuple[int, ...], where: str = "") -> _Placement | None:
        if key.endswith("rotary_emb.inv_freq"):
            return None  # RoPE buffers of older checkpoints; l4lab derives them from the config
        placement = self.tensors.get(key)
        if placement is None:
            self.unexpected.append(key)
            return None
        self.seen.add(key)
        if tuple(shape) != placement.shape:
            self.misshaped.append(f"{key}: expected {placement.shape}, got {tuple(shape)}{where}")
            return None
        return placement

    def dtype_is_wrong(self, key: str, found: torch.dtype, expected: torch.dtype | None) -> bool:
        if found.is_floating_point and expected in (None, found):
            return False
        wanted = "a floating-point dtype" if expected is None else str(expected).removeprefix("torch.")
        self.mistyped.append(f"{key}: expected {wanted}, got {str(found).removeprefix('torch.')}")
        return True

    def place(self, placement: _Placement, tensor: Tensor) -> None:
        value = placement.to_l4lab(tensor)
        if placement.region is None:
            _set_parameter(self.model, placement.name, value.contiguous())
            return
        whole = self.stacked.get(placement.name)
        if whole is None:
            shape = self.model.get_parameter(placement.name).shape
            whole = self.stacked[placement.name] = torch.empty(shape, dtype=value.dtype, device=value.device)
        whole[placement.region] = value.to(whole.dtype)

    def finish(self) -> None:
        problems = []
        missing = sorted(set(self.tensors) - self.seen)
        if missing:
            problems.append(f"missing keys {brief_list(missing)}")
        for what, found in (
            ("unexpected", sorted(self.unexpected)),
            ("mis-shaped", self.misshaped),
            ("mis-typed", self.mistyped),
        ):
            if found:
                problems.append(f"{what} keys {brief_list(found)}")
        if problems:
            raise ValueError(f"weights in {self.source} do not fit the model: " + "; ".join(problems))
        for name, whole in self.stacked.items():
            _set_parameter(self.model, name, whole)


def _materialise_buffers(model: Llama4 | Llama4Multimodal, device: str | torch.device) -> None:
    """Buffers (the routers' selection biases) are not in checkpoints: they start at zero."""
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None and buffer.is_meta:
                module._buffers[name] = torch.zeros(buffer.shape, dtype=model.dtype, device=device)


def _new_model(config: Config, multimodal: bool) -> Llama4 | Llama4Multimodal:
    """The model on the meta device (shapes only), ready to receive a checkpoint's tensors."""
    with torch.device("meta"):
        return Llama4Multimodal(config) if multimodal else Llama4(config)


def from_transformers(hf_model: nn.Module, text_only: bool = False) -> Llama4 | Llama4Multimodal:
    """An l4lab model with a copy of the weights of a transformers ``Llama4ForCausalLM`` (a
    :class:`Llama4`) or ``Llama4ForConditionalGeneration`` (a :class:`~l4lab.vision.Llama4Multimodal`;
    its text part alone with ``text_only``), ``LlamaForCausalLM`` or ``MixtralForCausalLM``.

    Llama and Mixtral q/k rows are permuted from rotate-half to interleaved order here
    (:func:`interleaved_rope_rows`); their logits then equal transformers' on l4lab's own RoPE."""
    config = config_from_transformers(hf_model.config)
    multimodal = config.vision is not None and not text_only
    state = hf_model.state_dict()
    dtype = next(iter(state.values())).dtype
    model = _new_model(config, multimodal)
    name_of = multimodal_key if multimodal else l4lab_key
    layout = layout_of(hf_model.config)
    if layout != "llama4":
        loader = _LayoutLoader(
            model, _layout_tensors(config, layout, per_expert=False), type(hf_model).__name__
        )
        for key, tensor in state.items():
            placement = loader.accept(key, tuple(tensor.shape))
            if placement is not None:
                loader.place(placement, tensor.detach().clone())
        loader.finish()
        _materialise_buffers(model, model.device)
        return model.to(dtype)
    checker = _WeightChecker(model, type(hf_model).__name__)
    for key, tensor in state.items():
        name = name_of(key)
        if name is not None and _derived(name):
            continue
        if checker.accept(key, name, tuple(tensor.shape)):
            _set_parameter(model, name, tensor.detach().clone())
    checker.raise_if_wrong()
    _materialise_buffers(model, model.device)
    return model.to(dtype)


# ---------------------------------------------------------------------- checkpoint directories
def _read_config(
    path: Path, config_file: Path, verify: bool, recorded: tuple[str, str] | None
) -> tuple[Config, torch.dtype | None, bool, str]:
    """The Config in ``path``'s config.json, the dtype it declares, whether it describes a multimodal
    model (it has a ``vision_config``) and its layout ("llama4", "llama" or "mixtral"); errors name the
    file.

    ``recorded``: (the sha256 of config.json that l4lab recorded when saving, the file it is in)."""
    if (
        verify
        and recorded is not None
        and hashlib.sha256(config_file.read_bytes()).hexdigest() != recorded[0]
    ):
        raise ValueError(
            f"{path / CONFIG_NAME} was changed after l4lab saved it with these weights (its sha256 differs "
            f"from the one recorded in {recorded[1]}): one of the two is corrupt, or config.json was edited "
            "by hand. To keep an edit on purpose, load with verify=False and save again"
        )
    hf = read_json(config_file)
    if not isinstance(hf, dict):
        raise ValueError(
            f"{path / CONFIG_NAME} holds a JSON {type(hf).__name__}, not an object of config fields"
        )
    try:
        config = config_from_transformers(hf)
    except (ValueError, TypeError) as error:
        raise ValueError(f"{path / CONFIG_NAME}: {error}") from None
    declared = hf.get("dtype", hf.get("torch_dtype"))
    if declared is None and isinstance(hf.get("text_config"), dict):
        declared = hf["text_config"].get("dtype", hf["text_config"].get("torch_dtype"))
    dtype = getattr(torch, declared, None) if isinstance(declared, str) else None
    floating = dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None
    return config, floating, hf.get("vision_config") is not None, layout_of(hf)


def _weight_files(path: Path) -> tuple[list[tuple[Path, set[str] | None]], dict[str, Any]]:
    """The weight files of the checkpoint in ``path``, each with the keys its index maps to it (None
    without an index), and the index's metadata."""
    index_file = committed_file(path, INDEX_NAME)
    if index_file is not None:
        index = read_json(index_file)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        plain = isinstance(weight_map, dict) and all(
            isinstance(v, str) and v and Path(v).name == v for v in weight_map.values()
        )
        if not plain or not weight_map:
            raise ValueError(
                f"{path / INDEX_NAME} has no valid weight_map (an object from tensor names to shard file "
                "names in this directory): it is corrupt"
            )
        keys_by_file: dict[str, set[str]] = {}
        for key, name in weight_map.items():
            keys_by_file.setdefault(name, set()).add(key)
        files = []
        for name in sorted(keys_by_file):
            shard = committed_file(path, name)
            if shard is None:
                example = sorted(keys_by_file[name])[0]
                raise FileNotFoundError(
                    f"{path / name} does not exist: {INDEX_NAME} names it as the shard holding "
                    f"{len(keys_by_file[name])} tensors (e.g. {example})"
                )
            files.append((shard, keys_by_file[name]))
        metadata = index.get("metadata")
        return files, metadata if isinstance(metadata, dict) else {}
    single = committed_file(path, SINGLE_NAME)
    if single is not None:
        return [(single, None)], {}
    pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt*"))
    hint = (
        f" (found {pickles}: l4lab never reads pickle files, convert them to safetensors)" if pickles else ""
    )
    raise FileNotFoundError(f"no {SINGLE_NAME} or {INDEX_NAME} in {path}{hint}")


def _check_index_keys(shard: SafetensorsFile, keys: set[str] | None) -> None:
    """The index and the shard it points to must agree on which tensors the shard holds."""
    if keys is None:
        return
    held = set(shard.keys())
    if keys - held:
        raise ValueError(
            f"{shard.path.name} lacks tensors that {INDEX_NAME} says it holds: "
            f"{brief_list(sorted(keys - held))}"
        )
    if held - keys:
        raise ValueError(
            f"{shard.path.name} holds tensors that {INDEX_NAME} does not map to it: "
            f"{brief_list(sorted(held - keys))}"
        )


def load_pretrained(
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    device: str = "cpu",
    verify: bool = True,
    text_only: bool = False,
) -> Llama4 | Llama4Multimodal:
    """Load a local checkpoint directory (config.json + safetensors, one file or shards with an index).

    A multimodal checkpoint (its config.json has a ``vision_config``) gives a
    :class:`~l4lab.vision.Llama4Multimodal` with its vision encoder and projector, or with ``text_only``
    a :class:`Llama4` of its text part (the vision weights are then not read). The model is built on the
    meta device and each tensor is read straight into its place, so memory peaks at the model plus one
    tensor, never two copies of the model. ``dtype`` converts the weights (default: as stored, which must
    then be one floating-point dtype, the one config.json declares). Checkpoints saved by l4lab carry
    checksums, checked unless ``verify`` is False. Every error names the file and what is wrong with it.
    """
    path = Path(path)
    if not path.is_dir():
        there = "a file" if path.exists() else "nothing"
        raise FileNotFoundError(f"no checkpoint directory at {path} ({there} is there)")
    with reading(path):
        config_file = committed_file(path, CONFIG_NAME)
        if config_file is None:
            raise FileNotFoundError(f"no {CONFIG_NAME} in {path}")
        files, index_metadata = _weight_files(path)
        with SafetensorsFile(files[0][0], device, verify) as first:
            recorded = (index_metadata.get(CONFIG_CHECKSUM_KEY), INDEX_NAME)
            if recorded[0] is None:
                recorded = (first.metadata.get(CONFIG_CHECKSUM_KEY), first.path.name)
            all_keys = set(first.keys()).union(*(keys or () for _, keys in files))
        config, declared, has_vision, layout = _read_config(
            path, config_file, verify, recorded if isinstance(recorded[0], str) else None
        )
        multimodal = has_vision and not text_only
        model = _new_model(config, multimodal)
        name_of = multimodal_key if multimodal else l4lab_key
        if layout != "llama4":
            per_expert = not any(key.endswith("experts.gate_up_proj") for key in all_keys)
            tensors = _layout_tensors(config, layout, per_expert)
            _load_layout(model, tensors, files, path, device, verify, dtype, declared)
            _materialise_buffers(model, device)
            return model
        checker = _WeightChecker(model, str(path))
        expected = dtype if dtype is not None else declared
        why = "" if dtype is not None or declared is None else f" ({CONFIG_NAME}'s dtype)"
        for shard_path, keys in files:
            with SafetensorsFile(shard_path, device, verify) as shard:
                _check_index_keys(shard, keys)
                for key in shard.keys():  # noqa: SIM118 (not a mapping)
                    name = name_of(key)
                    if name is not None and _derived(name):
                        continue
                    if not checker.accept(key, name, shard.shape(key), f" in {shard_path.name}"):
                        continue
                    tensor = shard.get(key)
                    if checker.dtype_is_wrong(
                        key, tensor.dtype, None if dtype is not None else expected, why
                    ):
                        continue
                    expected = expected or tensor.dtype  # without a declared dtype, the first one found
                    _set_parameter(model, name, tensor if dtype is None else tensor.to(dtype))
        checker.raise_if_wrong()
    _materialise_buffers(model, device)
    return model


def _load_layout(
    model: Llama4,
    tensors: dict[str, _Placement],
    files: list[tuple[Path, set[str] | None]],
    path: Path,
    device: str,
    verify: bool,
    dtype: torch.dtype | None,
    declared: torch.dtype | None,
) -> None:
    """Read a Llama/Mixtral checkpoint's shards into ``model``, converting each tensor to l4lab's layout."""
    loader = _LayoutLoader(model, tensors, str(path))
    expected = declared
    for shard_path, keys in files:
        with SafetensorsFile(shard_path, device, verify) as shard:
            _check_index_keys(shard, keys)
            for key in shard.keys():  # noqa: SIM118 (not a mapping)
                placement = loader.accept(key, shard.shape(key), f" in {shard_path.name}")
                if placement is None:
                    continue
                tensor = shard.get(key)
                if loader.dtype_is_wrong(key, tensor.dtype, None if dtype is not None else expected):
                    continue
                expected = expected or tensor.dtype
                loader.place(placement, tensor if dtype is None else tensor.to(dtype))
    loader.finish()


def _shards(state: dict[str, Tensor], max_shard_bytes: int) -> list[dict[str, Tensor]]:
    """Consecutive tensors grouped into shards of at most ``max_shard_bytes`` (one tensor may exceed it)."""
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    return shards


def _saved_weight_names(path: Path) -> set[str]:
    """The weight files of the checkpoint already in ``path``: model.safetensors, the index and the
    shards it names. A corrupt index names no shards: files that cannot be identified are left alone."""
    names = {name for name in (SINGLE_NAME, INDEX_NAME) if (path / name).is_file()}
    if INDEX_NAME in names:
        try:
            weight_map = json.loads((path / INDEX_NAME).read_text())["weight_map"]
            names |= {
                v
                for v in weight_map.values()
                if isinstance(v, str) and Path(v).name == v and v.endswith(".safetensors")
            }
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass
    return names


def save_pretrained(
    model: Llama4 | Llama4Multimodal,
    path: str | os.PathLike,
    max_shard_bytes: int = 4 * 2**30,
    layout: str | None = None,
) -> None:
    """Write ``config.json`` and safetensors shards that transformers' ``Llama4ForCausalLM`` loads (or
    ``Llama4ForConditionalGeneration``, for a multimodal model).

    ``layout``: "llama4" (the default, except for a Mixtral-routed model), "llama" (a dense RoPE model
    as ``LlamaForCausalLM``, q/k rows in rotate-half order) or "mixtral" (``MixtralForCausalLM``'s hub
    layout, one tensor per expert); :func:`check_layout` says what a layout cannot express.

    ``path`` is a directory (created if needed; a regular file there is refused). Only the checkpoint's
    own files are replaced: config.json, and model.safetensors or model.safetensors.index.json with its
    shards, including those of an earlier save that this one no longer needs. Every other file stays.
    The new files are written beside the old ones, fsynced, and committed together
    (``l4lab.storage.replace_files``): a save that is interrupted, killed or runs out of disk leaves the
    previous checkpoint or the new one, never a mix. The weights carry checksums that
    :func:`load_pretrained` checks.
    """
    if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) or max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes = {max_shard_bytes!r} is not allowed: a positive integer")
    biased = [name for name, b in model.named_buffers() if name.endswith("selection_bias") and bool(b.any())]
    if biased:
        raise ValueError(
            f"routers {biased} carry a non-zero selection bias (auxiliary-loss-free balancing); "
            "transformers' Llama 4 has no such bias, so the exported model would route differently. "
            "Save the training checkpoint instead (l4lab.train), or train with another balancing method"
        )
    multimodal = isinstance(model, Llama4Multimodal)
    layout = layout or ("mixtral" if model.config.router == "mixtral" else "llama4")
    check_layout(model.config, layout)
    if multimodal and layout != "llama4":
        raise ValueError(f"a multimodal model saves as layout 'llama4' only, not {layout!r}")
    if layout == "llama4":
        key_of = multimodal_checkpoint_key if multimodal else checkpoint_key
        state = {key_of(n): p.detach().contiguous().cpu() for n, p in model.named_parameters()}
        to_config = to_transformers_multimodal_config if multimodal else to_transformers_config
        hf_config = to_config(model.config, model.dtype)
    else:
        params = dict(model.named_parameters())
        state = {
            key: placement.from_l4lab(params[placement.name].detach()).contiguous().cpu()
            for key, placement in _layout_tensors(model.config, layout).items()
        }
        hf_config = {**_layout_config(model.config, layout), "dtype": str(model.dtype).removeprefix("torch.")}
    shards = _shards(state, max_shard_bytes)
    config_text = json.dumps(hf_config, indent=2) + "\n"
    recorded = {CONFIG_CHECKSUM_KEY: sha256_text(config_text)}

    with replace_files(path) as staging:
        previous = _saved_weight_names(Path(path))
        staging.write_text(CONFIG_NAME, config_text)
        if len(shards) == 1:
            save_safetensors(shards[0], staging.path(SINGLE_NAME), metadata=recorded)
            written = {SINGLE_NAME}
        else:
            weight_map = {}
            for i, shard in enumerate(shards, start=1):
                name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_safetensors(shard, staging.path(name))
                weight_map.update(dict.fromkeys(shard, name))
            total = sum(t.numel() * t.element_size() for t in state.values())
            index = {"metadata": {"total_size": total, **recorded}, "weight_map": weight_map}
            staging.write_text(INDEX_NAME, json.dumps(index, indent=2) + "\n")
            written = {INDEX_NAME, *weight_map.values()}
        for name in sorted(previous - written):
            staging.remove(name)
