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

Only safetensors are read: pickle files can run code when loaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from l4lab.config import Config, RopeScaling
from l4lab.model import Llama4
from l4lab.storage import atomic_directory

# prefixes under which published checkpoints store the text model's weights (multimodal ones first)
_TEXT_PREFIXES = ("language_model.model.", "model.language_model.", "language_model.", "model.")
_VISION_PREFIXES = (
    "vision_model.",
    "multi_modal_projector.",
    "model.vision_model.",
    "model.multi_modal_projector.",
)


# ---------------------------------------------------------------------- configuration
def to_transformers_config(config: Config, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """The ``config.json`` of a transformers ``Llama4ForCausalLM`` with the same behaviour.

    The l4lab config itself is kept under the key ``"l4lab"``, so that fields transformers has no
    place for (the chunk size of a model switched to global RoPE) come back on loading.
    """
    plan = config.layer_plan()
    irope = config.positions == "irope"
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling is not None:
        rope.update(rope_type="llama3", **vars(config.rope_scaling))
    hf: dict[str, Any] = {
        "architectures": ["Llama4ForCausalLM"],
        "model_type": "llama4_text",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.moe_intermediate_size,
        "intermediate_size_mlp": config.dense_intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_parameters": rope,
        "num_local_experts": config.num_experts,
        "num_experts_per_tok": config.top_k,
        "interleave_moe_layer_step": config.moe_layer_step,
        "moe_layers": [spec.index for spec in plan if spec.moe],
        "no_rope_layers": [int(spec.uses_rope) for spec in plan],
        "no_rope_layer_interval": config.nope_layer_interval,
        "attention_chunk_size": config.attention_chunk_size if irope else None,
        "attn_temperature_tuning": config.temperature_tuning and irope,
        "floor_scale": config.floor_scale,
        "attn_scale": config.attn_scale,
        "use_qk_norm": config.use_qk_norm,
        "attention_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "l4lab": config.to_dict(),
    }
    if dtype is not None:
        hf["dtype"] = str(dtype).removeprefix("torch.")
    return hf


def _rope_from_transformers(hf: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    rope = dict(hf.get("rope_parameters") or {})
    legacy = hf.get("rope_scaling") or {}
    rope = {**legacy, **rope}
    theta = float(rope.get("rope_theta", hf.get("rope_theta", 500000.0)))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise ValueError(f"rope_parameters.rope_type {kind!r} is not supported: 'default' or 'llama3'")
    return theta, RopeScaling(
        factor=float(rope["factor"]),
        low_freq_factor=float(rope["low_freq_factor"]),
        high_freq_factor=float(rope["high_freq_factor"]),
        original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
    )


def _every_kth(num_layers: int, step: int) -> list[int]:
    return [i for i in range(num_layers) if (i + 1) % step == 0]


def config_from_transformers(hf: dict[str, Any] | Any) -> Config:
    """An l4lab :class:`Config` from a transformers Llama 4 config (object or ``config.json`` dict).

    Accepts the text config or a multimodal config holding one under ``text_config``. Raises
    ValueError naming the field when the checkpoint uses something l4lab does not model.
    """
    if not isinstance(hf, dict):
        hf = hf.to_dict()
    if "text_config" in hf:
        hf = hf["text_config"]
        if not isinstance(hf, dict):
            hf = hf.to_dict()
    if hf.get("l4lab"):
        config = Config.from_dict(hf["l4lab"])
        _check_agrees(config, hf)
        return config

    for name, expected in (("hidden_act", "silu"), ("tie_word_embeddings", False), ("attention_bias", False)):
        if name in hf and hf[name] != expected:
            raise ValueError(
                f"config field {name} = {hf[name]!r} is not supported: l4lab models {expected!r}"
            )
    layers = int(hf["num_hidden_layers"])
    heads = int(hf["num_attention_heads"])
    theta, scaling = _rope_from_transformers(hf)

    step = int(hf.get("interleave_moe_layer_step", 1))
    moe_layers = hf.get("moe_layers")
    ffn = "moe"
    if moe_layers is not None and list(moe_layers) != _every_kth(layers, step):
        if len(moe_layers) == 0:
            ffn = "dense"
        else:
            raise ValueError(
                f"config field moe_layers = {moe_layers} is not every interleave_moe_layer_step-th layer; "
                "l4lab models MoE layers at (i + 1) % step == 0"
            )

    interval = int(hf.get("no_rope_layer_interval", 4))
    chunk = hf.get("attention_chunk_size")
    max_positions = int(hf.get("max_position_embeddings", 131072))
    uses_rope = list(hf.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(layers)])
    positions = "irope"
    if all(uses_rope[:layers]) and chunk is None:
        positions = "rope"
    elif uses_rope[:layers] != [int((i + 1) % interval != 0) for i in range(layers)]:
        raise ValueError(
            f"config field no_rope_layers = {uses_rope} is not one NoPE layer every no_rope_layer_interval "
            f"({interval}) layers, the only pattern l4lab models"
        )
    return Config(
        vocab_size=int(hf["vocab_size"]),
        hidden_size=int(hf["hidden_size"]),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or hf["hidden_size"] // heads),
        moe_intermediate_size=int(hf["intermediate_size"]),
        dense_intermediate_size=int(hf.get("intermediate_size_mlp", hf["intermediate_size"])),
        num_experts=int(hf.get("num_local_experts", 1)),
        top_k=int(hf.get("num_experts_per_tok", 1)),
        moe_layer_step=step,
        nope_layer_interval=interval,
        attention_chunk_size=int(chunk) if chunk is not None else max_positions,
        temperature_tuning=bool(hf.get("attn_temperature_tuning", True)),
        floor_scale=int(hf.get("floor_scale", 8192)),
        attn_scale=float(hf.get("attn_scale", 0.1)),
        use_qk_norm=bool(hf.get("use_qk_norm", True)),
        rope_theta=theta,
        rope_scaling=scaling,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
        max_position_embeddings=max_positions,
        ffn=ffn,
        positions=positions,
        bos_token_id=_single_id(hf.get("bos_token_id")),
        eos_token_id=_single_id(hf.get("eos_token_id")),
    )


def _single_id(value: Any) -> int | None:
    if isinstance(value, list):
        return int(value[0]) if value else None
    return None if value is None else int(value)


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


# ---------------------------------------------------------------------- weights
def checkpoint_key(name: str) -> str:
    """The transformers ``Llama4ForCausalLM`` key of an l4lab parameter name."""
    return name if name == "lm_head.weight" else "model." + name


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
    """Collects missing, unexpected and mis-shaped keys, then reports them all at once."""

    def __init__(self, model: nn.Module, source: str) -> None:
        self.expected = {name: tuple(p.shape) for name, p in model.named_parameters()}
        self.source = source
        self.seen: set[str] = set()
        self.unexpected: list[str] = []
        self.misshaped: list[str] = []

    def accept(self, key: str, name: str | None, shape: tuple[int, ...]) -> bool:
        if name is None:
            return False
        if name not in self.expected:
            self.unexpected.append(key)
            return False
        if tuple(shape) != self.expected[name]:
            self.misshaped.append(f"{key}: expected {self.expected[name]}, got {tuple(shape)}")
            self.seen.add(name)  # reported as mis-shaped, not also as missing
            return False
        self.seen.add(name)
        return True

    def raise_if_wrong(self) -> None:
        missing = sorted(checkpoint_key(n) for n in set(self.expected) - self.seen)
        problems = []
        if missing:
            problems.append(f"missing keys {missing}")
        if self.unexpected:
            problems.append(f"unexpected keys {sorted(self.unexpected)}")
        if self.misshaped:
            problems.append(f"mis-shaped keys {self.misshaped}")
        if problems:
            raise ValueError(f"weights in {self.source} do not fit the model: " + "; ".join(problems))


def _materialise_buffers(model: Llama4, device: str | torch.device) -> None:
    """Buffers (the routers' selection biases) are not in checkpoints: they start at zero."""
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None and buffer.is_meta:
                module._buffers[name] = torch.zeros(buffer.shape, dtype=model.dtype, device=device)


def from_transformers(hf_model: nn.Module) -> Llama4:
    """An l4lab model with a copy of the weights of a transformers ``Llama4ForCausalLM``
    (or of the text part of a ``Llama4ForConditionalGeneration``)."""
    config = config_from_transformers(hf_model.config)
    state = hf_model.state_dict()
    dtype = next(iter(state.values())).dtype
    with torch.device("meta"):
        model = Llama4(config)
    checker = _WeightChecker(model, type(hf_model).__name__)
    for key, tensor in state.items():
        name = l4lab_key(key)
        if name is not None and name.startswith("rotary_emb."):
            continue  # transformers' RoPE buffers; l4lab derives them from the config
        if checker.accept(key, name, tuple(tensor.shape)):
            _set_parameter(model, name, tensor.detach().clone())
    checker.raise_if_wrong()
    _materialise_buffers(model, model.device)
    return model.to(dtype)


def _shard_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / name for name in sorted(set(weight_map.values()))]
    single = path / "model.safetensors"
    if single.exists():
        return [single]
    pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt*"))
    hint = (
        f" (found {pickles}: l4lab never reads pickle files, convert them to safetensors)" if pickles else ""
    )
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path}{hint}")


def load_pretrained(path: str | os.PathLike, dtype: torch.dtype | None = None, device: str = "cpu") -> Llama4:
    """Load a local checkpoint directory (config.json + safetensors, one file or shards with an index).

    The model is built on the meta device and each tensor is read straight into its place, so memory
    peaks at the model plus one tensor, never two copies of the model. ``dtype`` converts the weights
    (default: as stored). Vision weights of multimodal checkpoints are skipped.
    """
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"no config.json in {path}")
    config = config_from_transformers(json.loads(config_file.read_text()))
    with torch.device("meta"):
        model = Llama4(config)
    checker = _WeightChecker(model, str(path))
    for shard in _shard_files(path):
        with safe_open(str(shard), framework="pt", device=device) as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                name = l4lab_key(key)
                if name is not None and name.startswith("rotary_emb."):
                    continue
                shape = tuple(f.get_slice(key).get_shape())
                if checker.accept(key, name, shape):
                    tensor = f.get_tensor(key)
                    _set_parameter(model, name, tensor if dtype is None else tensor.to(dtype))
    checker.raise_if_wrong()
    _materialise_buffers(model, device)
    return model


def save_pretrained(model: Llama4, path: str | os.PathLike, max_shard_bytes: int = 4 * 2**30) -> None:
    """Write ``config.json`` and safetensors shards that transformers' ``Llama4ForCausalLM`` loads.

    Written into a temporary directory beside ``path`` and moved into place at the end, so an
    interrupted save never leaves a half-written checkpoint, and an existing one is replaced whole.
    """
    biased = [name for name, b in model.named_buffers() if name.endswith("selection_bias") and bool(b.any())]
    if biased:
        raise ValueError(
            f"routers {biased} carry a non-zero selection bias (auxiliary-loss-free balancing); "
            "transformers' Llama 4 has no such bias, so the exported model would route differently. "
            "Save the training checkpoint instead (l4lab.train), or train with another balancing method"
        )
    state = {checkpoint_key(n): p.detach().contiguous().cpu() for n, p in model.named_parameters()}
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes

    with atomic_directory(path) as staging:
        config = to_transformers_config(model.config, model.dtype)
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if len(shards) == 1:
            save_file(shards[0], str(staging / "model.safetensors"), metadata={"format": "pt"})
            return
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(staging / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
