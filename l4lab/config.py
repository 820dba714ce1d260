"""The configuration: every architectural number of a Llama 4 model (or of its family), and the toggles.

A :class:`Config` holds what the published ``config.json`` of a Llama 4 checkpoint holds, under names
that say what they mean, plus the toggles that l4lab is built to compare:

* ``ffn = "moe" | "dense"``: Llama 4's interleaved mixture-of-experts layers, or a dense SwiGLU in
  every layer (as in Llama 2 and 3).
* ``positions = "irope" | "rope"``: Llama 4's iRoPE (every ``nope_layer_interval``-th layer has no
  positional encoding, attends globally and tunes its temperature; the other layers use RoPE and attend
  within chunks of ``attention_chunk_size`` tokens), or Llama 3's RoPE with global attention everywhere.
  Both read the same weights, so a trained model can be flipped to compare them. Two more settings
  take iRoPE apart, for experiments that attribute its effect: ``"nope"`` (every layer NoPE, global,
  temperature tuned like Llama 4's NoPE layers) and ``"chunked"`` (every layer RoPE and chunked).
* ``backend = "eager" | "fused"``: plain PyTorch operations, or the Triton kernels of ``l4lab.kernels``.
* ``router = "llama4" | "mixtral" | "deepseek"``: how a MoE layer picks and weighs its experts (see
  :class:`RouterSpec`): Llama 4's sigmoid top-k scaling the expert's input beside a shared expert,
  Mixtral's softmax top-2 renormalised and scaling the output with no shared expert, or DeepSeek-V3's
  sigmoid top-k renormalised, scaled by ``routed_scaling_factor``, beside a shared expert.

With ``ffn = "dense"`` and ``positions = "rope"`` (and no QK norm) the same code is Llama 2 and 3; with
``router = "mixtral"`` (and ``sliding_window`` where a checkpoint has one) it is Mixtral.

The toggles are resolved in ONE place, :meth:`Config.layer_plan`, into a :class:`LayerSpec` per layer;
the model reads those specs and never looks at the toggles itself.

A multimodal model (``l4lab.vision``) adds a :class:`VisionConfig` under ``Config.vision``: the image
encoder, the adapter that turns its patches into tokens, and the placeholder token they replace. The
toggles act on the text part only.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

FFN_CHOICES = ("moe", "dense")
POSITION_CHOICES = ("irope", "rope", "nope", "chunked")
BACKEND_CHOICES = ("eager", "fused")
ROUTER_CHOICES = ("llama4", "mixtral", "deepseek")


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
class RouterSpec:
    """How one MoE layer routes, resolved from ``Config.router``.

    ``scoring``: ``"sigmoid"`` scores each expert on its own (Llama 4, DeepSeek-V3); ``"softmax"``
    makes the experts compete for a total of one (Mixtral).
    ``select_on``: the top-k is taken over the raw ``"logits"`` (Llama 4) or over the ``"scores"``
    (Mixtral, DeepSeek-V3); the selection bias of auxiliary-loss-free balancing is added there.
    ``renormalise``: divide the chosen k scores by their sum (Mixtral, DeepSeek-V3).
    ``scale``: multiply the chosen score into the expert's ``"input"`` (Llama 4) or ``"output"``.
    ``shared_expert``: a SwiGLU every token passes through besides its routed experts.
    ``routed_scaling_factor``: a constant on the routed weights (DeepSeek-V3: 2.5; others 1).

    Not modelled: DeepSeek-V3's restriction of the choice to the best few groups of experts (its
    ``n_group``/``topk_group``, for expert parallelism) and its multi-head latent attention.
    """

    kind: str
    scoring: str
    select_on: str
    renormalise: bool
    scale: str
    shared_expert: bool
    routed_scaling_factor: float = 1.0


def router_spec(kind: str, routed_scaling_factor: float = 1.0) -> RouterSpec:
    """The :class:`RouterSpec` of a ``Config.router`` choice."""
    if kind == "llama4":
        return RouterSpec(kind, "sigmoid", "logits", False, "input", True)
    if kind == "mixtral":
        return RouterSpec(kind, "softmax", "scores", True, "output", False)
    if kind == "deepseek":
        return RouterSpec(kind, "sigmoid", "scores", True, "output", True, routed_scaling_factor)
    raise _invalid("router", kind, " or ".join(repr(c) for c in ROUTER_CHOICES))


@dataclass(frozen=True)
class LayerSpec:
    """What one decoder layer does, resolved from the config's fields and toggles.

    ``uses_rope``: rotate queries and keys (a RoPE layer) or not (a NoPE layer).
    ``chunk_size``: attend only within blocks of this many tokens (None: globally, causally).
    ``temperature_tuning``: scale queries by their absolute position (Llama 4's NoPE layers).
    ``qk_norm``: normalise queries and keys over head_dim after RoPE (weightless).
    ``moe``: a mixture-of-experts feed-forward, or a dense SwiGLU.
    ``router``: how the MoE routes (None on dense layers).
    ``window``: attend only to the last ``window`` tokens, this one included (Mistral's sliding window;
    None: no window).
    """

    index: int
    uses_rope: bool
    chunk_size: int | None
    temperature_tuning: bool
    qk_norm: bool
    moe: bool
    router: RouterSpec | None = None
    window: int | None = None


@dataclass(frozen=True)
class VisionConfig:
    """Every architectural field of Llama 4's vision encoder and of the adapter into the text model.

    Field names map onto transformers' ``Llama4VisionConfig`` (see ``l4lab.interop``). The defaults are
    those of Scout and Maverick (one encoder for both): 336-pixel tiles cut into 14-pixel patches
    (24 x 24 = 576 per tile), 34 pre-norm layers of width 1408, and a pixel shuffle that merges 2 x 2
    neighbouring patches, so each tile becomes 144 tokens of the text model.
    """

    image_size: int = 336
    patch_size: int = 14
    num_channels: int = 3
    hidden_size: int = 1408
    num_layers: int = 34
    num_heads: int = 16
    # the encoder's MLP width; it must also be the width of a pixel-shuffled token, hidden_size / ratio^2
    intermediate_size: int = 5632
    # each side of the patch grid shrinks by this factor; the channels grow by its inverse squared
    pixel_shuffle_ratio: float = 0.5
    # the adapter MLP's width (transformers: projector_input_dim = projector_output_dim = vision_output_dim)
    adapter_size: int = 4096
    rope_theta: float = 10000.0
    # the <|patch|> placeholder whose embeddings the image features replace (transformers: image_token_index)
    image_token_id: int = 200092
    # <|image_start|> and <|image_end|> around each image's tokens (transformers: boi/eoi_token_index)
    image_start_token_id: int = 200080
    image_end_token_id: int = 200081

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def shuffle_factor(self) -> int:
        """How many patches per side one token merges: 2 for the ratio 0.5."""
        return round(1 / self.pixel_shuffle_ratio)

    @property
    def tokens_per_tile(self) -> int:
        """Text-model tokens per tile after the pixel shuffle: (336 / 14 / 2)^2 = 144 for Scout."""
        return (self.patches_per_side // self.shuffle_factor) ** 2

    def validate(self) -> None:
        """Raise ValueError naming the first field whose value is impossible."""
        for name in (
            "image_size",
            "patch_size",
            "num_channels",
            "hidden_size",
            "num_layers",
            "num_heads",
            "intermediate_size",
            "adapter_size",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise _invalid(f"vision.{name}", value, "a positive integer")
        for name in ("image_token_id", "image_start_token_id", "image_end_token_id"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise _invalid(f"vision.{name}", value, "a token id (a non-negative integer)")
        if not _is_number(self.rope_theta) or not self.rope_theta > 0:
            raise _invalid("vision.rope_theta", self.rope_theta, "a positive finite number")
        if self.image_size % self.patch_size:
            raise _invalid(
                "vision.image_size", self.image_size, f"a multiple of patch_size ({self.patch_size})"
            )
        ratio = self.pixel_shuffle_ratio
        if not _is_number(ratio) or not 0 < ratio <= 1 or abs(1 / ratio - round(1 / ratio)) > 1e-9:
            raise _invalid(
                "vision.pixel_shuffle_ratio", ratio, "1 / k for a positive integer k (Llama 4: 0.5)"
            )
        if self.patches_per_side % self.shuffle_factor:
            raise _invalid(
                "vision.image_size",
                self.image_size,
                f"a tile whose {self.patches_per_side} patches per side divide by the pixel shuffle's "
                f"{self.shuffle_factor}",
            )
        if self.hidden_size % self.num_heads or self.head_dim % 4:
            raise _invalid(
                "vision.num_heads",
                self.num_heads,
                f"a divisor of hidden_size ({self.hidden_size}) leaving a head_dim divisible by 4 "
                "(2D RoPE turns one half of the feature pairs by the column, the other half by the row)",
            )
        shuffled = self.hidden_size * self.shuffle_factor**2
        if self.intermediate_size != shuffled:
            raise _invalid(
                "vision.intermediate_size",
                self.intermediate_size,
                f"hidden_size / pixel_shuffle_ratio^2 = {shuffled}: the adapter's first layer reads "
                "pixel-shuffled tokens through a matrix of this width",
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Config:
    """Every architectural field of a Llama 4 text model, and the toggles.

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
    router: str = "llama4"
    routed_scaling_factor: float = 1.0  # DeepSeek-V3's constant on routed weights (2.5 there)
    # Mistral-style sliding window (global RoPE positions only): query i sees keys i - window < j <= i
    sliding_window: int | None = None
    # token ids used by generation and tokenizers; not part of the architecture
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    # the image encoder and adapter of a multimodal model (l4lab.vision); None for a text model
    vision: VisionConfig | None = None

    def __post_init__(self) -> None:
        if isinstance(self.vision, dict):
            known = [f.name for f in dataclasses.fields(VisionConfig)]
            unknown = sorted(str(k) for k in set(self.vision) - set(known))
            if unknown:
                raise _invalid("vision", self.vision, f"None or a dict of {known}; unknown {unknown}")
            self.vision = VisionConfig(**self.vision)
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
        for name in ("rope_theta", "rms_norm_eps", "routed_scaling_factor"):
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
            ("router", ROUTER_CHOICES),
        ):
            if getattr(self, name) not in choices:
                raise _invalid(name, getattr(self, name), " or ".join(repr(c) for c in choices))
        if self.router != "deepseek" and self.routed_scaling_factor != 1.0:
            raise _invalid(
                "routed_scaling_factor", self.routed_scaling_factor, "1.0 unless router = 'deepseek'"
            )
        window = self.sliding_window
        if window is not None:
            if isinstance(window, bool) or not isinstance(window, int) or window <= 0:
                raise _invalid("sliding_window", window, "None or a positive integer")
            if self.positions != "rope":
                raise _invalid(
                    "sliding_window",
                    window,
                    f"None under positions={self.positions!r} (a sliding window goes with global RoPE "
                    "attention, positions='rope', as in Mistral and Mixtral; iRoPE's chunks are a "
                    "different mask)",
                )
        if self.backend == "fused" and self.router != "llama4":
            raise _invalid(
                "backend",
                self.backend,
                f"'eager' with router = {self.router!r}: the fused kernels implement Llama 4's router "
                "(sigmoid scores scaling the expert input) only",
            )
        if self.backend == "fused" and window is not None:
            raise _invalid(
                "backend",
                self.backend,
                "'eager' with a sliding_window: the fused attention kernel knows causal and chunked "
                "masks only",
            )
        if self.rope_scaling is not None:
            if not isinstance(self.rope_scaling, RopeScaling):
                raise _invalid("rope_scaling", self.rope_scaling, "None or a RopeScaling")
            self.rope_scaling.validate()
        for name in ("bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            integer = isinstance(value, int) and not isinstance(value, bool)
            if value is not None and not (integer and 0 <= value < self.vocab_size):
                raise _invalid(name, value, f"None or a token id in [0, {self.vocab_size})")
        if self.vision is not None:
            if not isinstance(self.vision, VisionConfig):
                raise _invalid("vision", self.vision, "None or a VisionConfig")
            self.vision.validate()
            for name in ("image_token_id", "image_start_token_id", "image_end_token_id"):
                if getattr(self.vision, name) >= self.vocab_size:
                    raise _invalid(
                        f"vision.{name}", getattr(self.vision, name), f"a token id in [0, {self.vocab_size})"
                    )

    # ------------------------------------------------------------------ the one place toggles resolve
    def layer_plan(self) -> list[LayerSpec]:
        """Resolve the toggles into what each layer does. The model reads only this."""
        plan = []
        for i in range(self.num_layers):
            interleaved_nope = self.positions == "irope" and (i + 1) % self.nope_layer_interval == 0
            nope = self.positions == "nope" or interleaved_nope
            chunked = self.positions == "chunked" or (self.positions == "irope" and not nope)
            moe = self.ffn == "moe" and (i + 1) % self.moe_layer_step == 0
            plan.append(
                LayerSpec(
                    index=i,
                    uses_rope=not nope,
                    chunk_size=self.attention_chunk_size if chunked else None,
                    temperature_tuning=nope and self.temperature_tuning,
                    qk_norm=self.use_qk_norm and not nope,
                    moe=moe,
                    router=router_spec(self.router, self.routed_scaling_factor) if moe else None,
                    window=self.sliding_window,
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


def _llama(
    hidden: int,
    layers: int,
    heads: int,
    kv_heads: int,
    ffn: int,
    vocab: int,
    context: int,
    theta: float,
    eps: float = 1e-5,
    bos: int = 1,
    eos: int = 2,
    rope_scaling: RopeScaling | None = None,
) -> dict[str, Any]:
    """A dense Llama 1/2/3 config: SwiGLU, RoPE with global attention in every layer, no QK norm."""
    return dict(
        vocab_size=vocab,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=hidden // heads,
        dense_intermediate_size=ffn,
        moe_intermediate_size=ffn,
        num_experts=1,
        use_qk_norm=False,
        rope_theta=theta,
        rope_scaling=rope_scaling,
        rms_norm_eps=eps,
        max_position_embeddings=context,
        attention_chunk_size=context,
        floor_scale=8192,
        ffn="dense",
        positions="rope",
        bos_token_id=bos,
        eos_token_id=eos,
    )


def _mixtral(hidden: int, layers: int, heads: int, ffn: int, vocab: int, context: int) -> dict[str, Any]:
    """A Mixtral config: the Llama block with 8 experts of width ``ffn`` routed top-2 in every layer."""
    return dict(
        _llama(hidden, layers, heads, 8, ffn, vocab, context, 1000000.0),
        num_experts=8,
        top_k=2,
        moe_layer_step=1,
        ffn="moe",
        router="mixtral",
    )


_PRESETS: dict[str, dict[str, Any]] = {
    # Llama 4 Scout 17B-16E: MoE in every layer, QK norm, RoPE scaling, 10M context; vision encoder.
    "llama4-scout": dict(
        _LLAMA4_SHARED,
        vision=VisionConfig(),
        num_experts=16,
        moe_layer_step=1,
        use_qk_norm=True,
        rope_scaling=RopeScaling(16.0, 1.0, 1.0, 8192),
        max_position_embeddings=10485760,
    ),
    # Llama 4 Maverick 17B-128E: MoE every other layer, no QK norm, no RoPE scaling, 1M context; the
    # same vision encoder as Scout.
    "llama4-maverick": dict(
        _LLAMA4_SHARED,
        vision=VisionConfig(),
        num_experts=128,
        moe_layer_step=2,
        use_qk_norm=False,
        rope_scaling=None,
        max_position_embeddings=1048576,
    ),
    # Llama 4 Behemoth: AN ESTIMATE. Meta published 16 experts, 288B active and about 2T total, nothing
    # more. Assumed: Scout's layout (MoE in every layer, top-1 + a shared expert, iRoPE, QK norm, the
    # Llama 4 vocabulary), Llama 3.1 405B's width (hidden 16384, 128 heads, 8 KV heads); the depth (96)
    # and expert width (24064) are solved for the two published numbers: 1.99T / 288.5B. Other
    # combinations fit as well (e.g. hidden 14336, 116 layers, width 23040): only two numbers are known.
    "llama4-behemoth": dict(
        _LLAMA4_SHARED,
        hidden_size=16384,
        num_layers=96,
        num_heads=128,
        moe_intermediate_size=24064,
        dense_intermediate_size=2 * 24064,
        num_experts=16,
        moe_layer_step=1,
        use_qk_norm=True,
        rope_scaling=None,
        max_position_embeddings=1048576,
    ),
    # The dense Llamas: RoPE with global attention everywhere, no QK norm (the Llama 2/3 toggles).
    # LLaMA 1 (Touvron et al. 2023a, Table 2): no GQA, 2K context.
    "llama1-7b": _llama(4096, 32, 32, 32, 11008, 32000, 2048, 10000.0, eps=1e-6),
    "llama1-65b": _llama(8192, 80, 64, 64, 22016, 32000, 2048, 10000.0, eps=1e-5),
    # Llama 2 (Touvron et al. 2023b): 4K context; GQA on 70B only.
    "llama2-7b": _llama(4096, 32, 32, 32, 11008, 32000, 4096, 10000.0),
    "llama2-13b": _llama(5120, 40, 40, 40, 13824, 32000, 4096, 10000.0),
    "llama2-70b": _llama(8192, 80, 64, 8, 28672, 32000, 4096, 10000.0),
    # Llama 3 (Grattafiori et al. 2024): 128K vocabulary, GQA everywhere, theta 500000, 8K context;
    # Llama 3.1 stretches RoPE (factor 8) to 128K.
    "llama3-8b": _llama(4096, 32, 32, 8, 14336, 128256, 8192, 500000.0, bos=128000, eos=128001),
    "llama3-70b": _llama(8192, 80, 64, 8, 28672, 128256, 8192, 500000.0, bos=128000, eos=128001),
    "llama3.1-405b": _llama(
        16384,
        126,
        128,
        8,
        53248,
        128256,
        131072,
        500000.0,
        bos=128000,
        eos=128001,
        rope_scaling=RopeScaling(8.0, 1.0, 4.0, 8192),
    ),
    # Mixtral (Jiang et al. 2024): every layer MoE, 8 experts, top-2 softmax router, no shared expert.
    "mixtral-8x7b": _mixtral(4096, 32, 32, 14336, 32000, 32768),
    "mixtral-8x22b": _mixtral(6144, 56, 48, 16384, 32768, 65536),
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

    Active parameters are those one TEXT token passes through: the embedding and head tables in full,
    the attention, and in a MoE layer the router, the shared expert (if the router has one) and
    ``top_k`` routed experts. The total adds the vision encoder and adapter when the config has one
    (:func:`count_vision_params`).
    Scout comes out at 108.6B / 17.2B (Meta: 109B / 17B; the text model alone is 107.8B), Maverick at
    401.6B / 17.2B (Meta: 400B / 17B).
    Mixtral 8x7B comes out at 46.7B / 12.9B: only the feed-forward is replicated per expert, so "8 x 7B"
    overcounts.
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
            shared = int(spec.router is None or spec.router.shared_expert)
            total += router + swiglu_expert * (config.num_experts + shared)
            active += router + swiglu_expert * (config.top_k + shared)
        else:
            total += swiglu_dense
            active += swiglu_dense
    if config.vision is not None:
        total += count_vision_params(config.vision, d)
    return total, active


def vision_parameters(vision: VisionConfig, text_hidden_size: int) -> dict[str, int]:
    """Parameters of each part of the vision side, for a text model of width ``text_hidden_size``."""
    d, inner = vision.hidden_size, vision.intermediate_size
    layer = (
        4 * (d * d + d) + (d * inner + inner) + (inner * d + d) + 2 * 2 * d
    )  # attention, MLP, 2 LayerNorms
    return {
        "patch embedding, class token, positions": vision.num_channels * vision.patch_size**2 * d
        + d
        + (vision.patches_per_side**2 + 1) * d,
        f"{vision.num_layers} encoder layers (+ LayerNorms before and after)": vision.num_layers * layer
        + 2 * 2 * d,
        "adapter MLP (two bias-free layers)": inner * vision.adapter_size + vision.adapter_size**2,
        "projector into the text width": vision.adapter_size * text_hidden_size,
    }


def count_vision_params(vision: VisionConfig, text_hidden_size: int) -> int:
    """Parameters of the vision encoder, its adapter and the projector into a text model of that width.

    For Scout and Maverick: 0.87B, of which the 34 encoder layers hold 0.81B.
    """
    return sum(vision_parameters(vision, text_hidden_size).values())


__all__ = [
    "Config",
    "LayerSpec",
    "RopeScaling",
    "RouterSpec",
    "VisionConfig",
    "count_params",
    "count_vision_params",
    "preset",
    "preset_names",
    "router_spec",
    "vision_parameters",
]
