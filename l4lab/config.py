"""The configuration: every architectural number of a Llama 4 text model, and three toggles.

A :class:`Config` holds what the published ``config.json`` of a Llama 4 checkpoint holds, under names
that say what they mean, plus the three toggles that l4lab is built to compare:

* ``ffn = "moe" | "dense"``: Llama 4's interleaved mixture-of-experts layers, or a dense SwiGLU in
  every layer (as in Llama 2 and 3).
* ``positions = "irope" | "rope"``: Llama 4's iRoPE (every ``nope_layer_interval``-th layer has no
  positional encoding, attends globally and tunes its temperature; the other layers use RoPE and attend
  within chunks of ``attention_chunk_size`` tokens), or Llama 3's RoPE with global attention everywhere.
  Both read the same weights, so a trained model can be flipped to compare them. Two more settings
  take iRoPE apart, for experiments that attribute its effect: ``"nope"`` (every layer NoPE, global,
  temperature tuned like Llama 4's NoPE layers) and ``"chunked"`` (every layer RoPE and chunked).
* ``backend = "eager" | "fused"``: plain PyTorch operations, or the Triton kernels of ``l4lab.kernels``.

The toggles are resolved in ONE place, :meth:`Config.layer_plan`, into a :class:`LayerSpec` per layer;
the model reads those specs and never looks at the toggles itself.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

FFN_CHOICES = ("moe", "dense")
POSITION_CHOICES = ("irope", "rope", "nope", "chunked")
BACKEND_CHOICES = ("eager", "fused")


def _invalid(name: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"Config.{name} = {value!r} is not allowed: {allowed}")


def _is_number(value: Any) -> bool:
    """A finite real number (bool is not one: True is no rope_theta)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1's frequency scaling ("llama3" in transformers), used by Llama 4 Scout.

    Wavelengths shorter than ``original_max_position_embeddings / high_freq_factor`` are kept, those
    longer than ``original_max_position_embeddings / low_freq_factor`` are stretched by ``factor``, and
    the ones between are interpolated smoothly. Scout uses ``low == high == 1``: a pure step.
    """

    factor: float = 16.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 1.0
    original_max_position_embeddings: int = 8192

    def validate(self) -> None:
        if not _is_number(self.factor) or not self.factor >= 1.0:
            raise _invalid("rope_scaling.factor", self.factor, "a number >= 1")
        if not _is_number(self.low_freq_factor) or not self.low_freq_factor > 0:
            raise _invalid("rope_scaling.low_freq_factor", self.low_freq_factor, "a positive number")
        if not _is_number(self.high_freq_factor) or not self.high_freq_factor >= self.low_freq_factor:
            raise _invalid(
                "rope_scaling.high_freq_factor",
                self.high_freq_factor,
                f"a number >= low_freq_factor ({self.low_freq_factor})",
            )
        original = self.original_max_position_embeddings
        if isinstance(original, bool) or not isinstance(original, int) or not original > 0:
            raise _invalid(
                "rope_scaling.original_max_position_embeddings",
                self.original_max_position_embeddings,
                "a positive integer",
            )


@dataclass(frozen=True)
class LayerSpec:
    """What one decoder layer does, resolved from the config's fields and toggles.

    ``uses_rope``: rotate queries and keys (a RoPE layer) or not (a NoPE layer).
    ``chunk_size``: attend only within blocks of this many tokens (None: globally, causally).
    ``temperature_tuning``: scale queries by their absolute position (Llama 4's NoPE layers).
    ``qk_norm``: normalise queries and keys over head_dim after RoPE (weightless).
    ``moe``: a mixture-of-experts feed-forward, or a dense SwiGLU.
    """

    index: int
    uses_rope: bool
    chunk_size: int | None
    temperature_tuning: bool
    qk_norm: bool
    moe: bool


@dataclass
class Config:
    """Every architectural field of a Llama 4 text model, and the three toggles.

    Field names map one to one onto transformers' ``Llama4TextConfig`` (see ``l4lab.interop``).
    The defaults are the "tiny-moe" preset: a model that trains on two CPU cores in minutes.
    """

    vocab_size: int = 260
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    # routed and shared experts (transformers: intermediate_size)
    moe_intermediate_size: int = 256
    # dense SwiGLU layers (transformers: intermediate_size_mlp); Llama 4 uses twice the expert width
    dense_intermediate_size: int = 512
    num_experts: int = 4
    top_k: int = 1
    # layer i is MoE when (i + 1) % moe_layer_step == 0 (Scout: 1, every layer; Maverick: 2)
    moe_layer_step: int = 1
    # layer i is NoPE when (i + 1) % nope_layer_interval == 0 (Llama 4: 4)
    nope_layer_interval: int = 4
    attention_chunk_size: int = 64
    temperature_tuning: bool = True
    floor_scale: int = 32
    attn_scale: float = 0.1
    use_qk_norm: bool = True
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 4096
    ffn: str = "moe"
    positions: str = "irope"
    backend: str = "eager"
    # token ids used by generation and tokenizers; not part of the architecture
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, dict):
            known = [f.name for f in dataclasses.fields(RopeScaling)]
            unknown = sorted(str(k) for k in set(self.rope_scaling) - set(known))
            if unknown:
                raise _invalid(
                    "rope_scaling", self.rope_scaling, f"None or a dict of {known}; unknown {unknown}"
                )
            self.rope_scaling = RopeScaling(**self.rope_scaling)
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ValueError naming the first field whose value is impossible."""
        for name in (
            "vocab_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "moe_intermediate_size",
            "dense_intermediate_size",
            "num_experts",
            "top_k",
            "moe_layer_step",
            "nope_layer_interval",
            "attention_chunk_size",
            "floor_scale",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise _invalid(name, value, "a positive integer")
        for name in ("rope_theta", "rms_norm_eps"):
            value = getattr(self, name)
            if not _is_number(value) or not value > 0:
                raise _invalid(name, value, "a positive finite number")
        if not _is_number(self.attn_scale):
            raise _invalid("attn_scale", self.attn_scale, "a finite number")
        if self.head_dim % 2:
            raise _invalid("head_dim", self.head_dim, "an even number (RoPE rotates pairs of features)")
        if self.num_heads % self.num_kv_heads:
            raise _invalid(
                "num_kv_heads",
                self.num_kv_heads,
                f"a divisor of num_heads ({self.num_heads}) so that query heads share key/value heads evenly",
            )
        if self.top_k > self.num_experts:
            raise _invalid("top_k", self.top_k, f"at most num_experts ({self.num_experts})")
        for name in ("temperature_tuning", "use_qk_norm"):
            if not isinstance(getattr(self, name), bool):
                raise _invalid(name, getattr(self, name), "True or False")
        for name, choices in (
            ("ffn", FFN_CHOICES),
            ("positions", POSITION_CHOICES),
            ("backend", BACKEND_CHOICES),
        ):
            if getattr(self, name) not in choices:
                raise _invalid(name, getattr(self, name), " or ".join(repr(c) for c in choices))
        if self.rope_scaling is not None:
            if not isinstance(self.rope_scaling, RopeScaling):
                raise _invalid("rope_scaling", self.rope_scaling, "None or a RopeScaling")
            self.rope_scaling.validate()
        for name in ("bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            integer = isinstance(value, int) and not isinstance(value, bool)
            if value is not None and not (integer and 0 <= value < self.vocab_size):
                raise _invalid(name, value, f"None or a token id in [0, {self.vocab_size})")

    # ------------------------------------------------------------------ the one place toggles resolve
    def layer_plan(self) -> list[LayerSpec]:
        """Resolve the toggles into what each layer does. The model reads only this."""
        plan = []
        for i in range(self.num_layers):
            interleaved_nope = self.positions == "irope" and (i + 1) % self.nope_layer_interval == 0
            nope = self.positions == "nope" or interleaved_nope
            chunked = self.positions == "chunked" or (self.positions == "irope" and not nope)
            plan.append(
                LayerSpec(
                    index=i,
                    uses_rope=not nope,
                    chunk_size=self.attention_chunk_size if chunked else None,
                    temperature_tuning=nope and self.temperature_tuning,
                    qk_norm=self.use_qk_norm and not nope,
                    moe=self.ffn == "moe" and (i + 1) % self.moe_layer_step == 0,
                )
            )
        return plan

    def replace(self, **changes: Any) -> Config:
        """A validated copy with some fields changed, e.g. ``config.replace(positions="rope")``."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        if not isinstance(data, dict):
            raise TypeError(f"Config.from_dict needs a dict of fields; got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown Config fields {unknown}; known fields are {sorted(known)}")
        return cls(**data)


# ---------------------------------------------------------------------- presets
_LLAMA4_SHARED: dict[str, Any] = dict(
    vocab_size=202048,
    hidden_size=5120,
    num_layers=48,
    num_heads=40,
    num_kv_heads=8,
    head_dim=128,
    moe_intermediate_size=8192,
    dense_intermediate_size=16384,
    top_k=1,
    nope_layer_interval=4,
    attention_chunk_size=8192,
    temperature_tuning=True,
    floor_scale=8192,
    attn_scale=0.1,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    bos_token_id=200000,
    eos_token_id=200008,
)

_PRESETS: dict[str, dict[str, Any]] = {
    # Llama 4 Scout 17B-16E (text): MoE in every layer, QK norm, RoPE scaling, 10M context.
    "llama4-scout": dict(
        _LLAMA4_SHARED,
        num_experts=16,
        moe_layer_step=1,
        use_qk_norm=True,
        rope_scaling=RopeScaling(16.0, 1.0, 1.0, 8192),
        max_position_embeddings=10485760,
    ),
    # Llama 4 Maverick 17B-128E (text): MoE every other layer, no QK norm, no RoPE scaling, 1M context.
    "llama4-maverick": dict(
        _LLAMA4_SHARED,
        num_experts=128,
        moe_layer_step=2,
        use_qk_norm=False,
        rope_scaling=None,
        max_position_embeddings=1048576,
    ),
    # Llama 3 8B: dense, RoPE everywhere, GQA.
    "llama3-8b": dict(
        vocab_size=128256,
        hidden_size=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        dense_intermediate_size=14336,
        moe_intermediate_size=14336,
        num_experts=1,
        use_qk_norm=False,
        rope_theta=500000.0,
        max_position_embeddings=8192,
        ffn="dense",
        positions="rope",
        attention_chunk_size=8192,
        floor_scale=8192,
        bos_token_id=128000,
        eos_token_id=128001,
    ),
    # Llama 2 7B: dense, RoPE everywhere, no GQA (32 key/value heads).
    "llama2-7b": dict(
        vocab_size=32000,
        hidden_size=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=32,
        head_dim=128,
        dense_intermediate_size=11008,
        moe_intermediate_size=11008,
        num_experts=1,
        use_qk_norm=False,
        rope_theta=10000.0,
        max_position_embeddings=4096,
        ffn="dense",
        positions="rope",
        attention_chunk_size=4096,
        floor_scale=8192,
        bos_token_id=1,
        eos_token_id=2,
    ),
    # Tiny models that train on two CPU cores in minutes, on the byte tokenizer's 260 ids.
    # "tiny" (dense) and "tiny-moe" have the same ACTIVE parameters: the dense width is twice the
    # expert width, and a MoE token passes through one routed expert plus the shared expert.
    "tiny": dict(ffn="dense", bos_token_id=256, eos_token_id=257),
    "tiny-moe": dict(ffn="moe", bos_token_id=256, eos_token_id=257),
}


def preset_names() -> list[str]:
    return sorted(_PRESETS)


def preset(name: str, **overrides: Any) -> Config:
    """A published or teaching configuration by name, with optional field overrides."""
    if name not in _PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {preset_names()}")
    return Config(**{**_PRESETS[name], **overrides})


# ---------------------------------------------------------------------- parameter counts
def count_params(config: Config) -> tuple[int, int]:
    """(total, active) parameter counts, from the config alone (no model is built).

    Active parameters are those one token passes through: the embedding and head tables in full, the
    attention, and in a MoE layer the router, the shared expert and ``top_k`` routed experts.
    Scout comes out at about 107.8B / 17.2B (the published 109B adds the vision encoder), Maverick at
    about 400.7B / 17.2B.
    """
    d = config.hidden_size
    attention = d * config.head_dim * (2 * config.num_heads + 2 * config.num_kv_heads)
    norms = 2 * d
    swiglu_expert = 3 * d * config.moe_intermediate_size
    swiglu_dense = 3 * d * config.dense_intermediate_size
    total = active = 2 * config.vocab_size * d + d  # embedding, untied head, final norm
    for spec in config.layer_plan():
        total += attention + norms
        active += attention + norms
        if spec.moe:
            router = d * config.num_experts
            total += router + swiglu_expert * (config.num_experts + 1)
            active += router + swiglu_expert * (config.top_k + 1)
        else:
            total += swiglu_dense
            active += swiglu_dense
    return total, active


__all__ = [
    "Config",
    "LayerSpec",
    "RopeScaling",
    "count_params",
    "preset",
    "preset_names",
]
