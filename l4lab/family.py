"""The Llama family and its rivals, computed from configs: sizes, context, KV cache, FLOPs per token.

Every open model of the table is an l4lab preset, so its parameter counts come from
:func:`l4lab.count_params`, its KV cache from its layer plan and its FLOPs from both; only the
published figures they are checked against are typed in (:data:`PUBLISHED`, with their sources).
Closed models (GPT-4, Claude 3, Gemini 1.5) get their published context length and nothing else: their
architectures are not published. DeepSeek-V3 is listed with its published figures; its multi-head
latent attention (MLA) is not modelled here, so nothing of it is computed.

:func:`llama2_to_llama4` walks from a Llama 2-style dense model to Llama 4 Scout one idea at a time on
Scout's own width and depth, so that each step's cost or saving is that idea's alone.
"""

from __future__ import annotations

from dataclasses import dataclass

from l4lab.config import Config, RopeScaling, count_params, preset


@dataclass(frozen=True)
class Published:
    """What a model's authors published: sizes (billions of parameters), release, context, source."""

    released: str
    total_b: float | None
    active_b: float | None
    context: int | None
    source: str
    experts: str = "dense"


# The open models of the table, each with a preset of the same name. Totals of "7B"-class models are
# the counts published with the weights (the names round them).
PUBLISHED: dict[str, Published] = {
    "llama1-7b": Published("Feb 2023", 6.7, 6.7, 2048, "Touvron et al. 2023a, Table 2"),
    "llama1-65b": Published("Feb 2023", 65.2, 65.2, 2048, "Touvron et al. 2023a, Table 2"),
    "llama2-7b": Published("Jul 2023", 6.74, 6.74, 4096, "Llama 2 release (6.74B parameters)"),
    "llama2-13b": Published("Jul 2023", 13.0, 13.0, 4096, "Touvron et al. 2023b, Table 1"),
    "llama2-70b": Published("Jul 2023", 69.0, 69.0, 4096, "Llama 2 release (69.0B parameters)"),
    "llama3-8b": Published("Apr 2024", 8.03, 8.03, 8192, "Llama 3 release (8.03B parameters)"),
    "llama3-70b": Published("Apr 2024", 70.6, 70.6, 8192, "Llama 3 release (70.6B parameters)"),
    "llama3.1-405b": Published("Jul 2024", 405.9, 405.9, 131072, "Llama 3.1 release (405.9B parameters)"),
    "mixtral-8x7b": Published("Dec 2023", 46.7, 12.9, 32768, "Jiang et al. 2024; Mistral AI", "8, top-2"),
    "mixtral-8x22b": Published("Apr 2024", 141.0, 39.0, 65536, "Mistral AI, Mixtral 8x22B", "8, top-2"),
    "llama4-scout": Published(
        "Apr 2025",
        109.0,
        17.0,
        10485760,
        "Meta, Llama 4 model card (total includes vision)",
        "16, top-1 + shared",
    ),
    "llama4-maverick": Published(
        "Apr 2025", 400.0, 17.0, 1048576, "Meta, Llama 4 model card", "128, top-1 + shared"
    ),
    "llama4-behemoth": Published(
        "preview", 2000.0, 288.0, None, 'Meta, Llama 4 announcement ("nearly 2T")', "16"
    ),
}

# Models whose architecture is not modelled: (name, released, context, what is published)
OTHERS: list[tuple[str, str, int | None, str]] = [
    (
        "deepseek-v3",
        "Dec 2024",
        131072,
        "671B total / 37B active, 256 routed experts top-8 + 1 shared, sigmoid router with bias-only "
        "balancing (DeepSeek-AI 2024); MLA attention not modelled here",
    ),
    ("gpt-4", "Mar 2023", 32768, "architecture not published; 8,192 and 32,768-token versions (OpenAI 2023)"),
    ("claude-3", "Mar 2024", 200000, "architecture not published; 200K context (Anthropic 2024)"),
    (
        "gemini-1.5-pro",
        "Feb 2024",
        1000000,
        "architecture not published (a sparse MoE, says the report); 1M context, 10M in research "
        "(Gemini Team 2024)",
    ),
]


def visible_keys(config: Config, length: int) -> list[int]:
    """Keys each layer holds in its KV cache after ``length`` tokens: all of them on a global layer,
    the current chunk on a chunked one (iRoPE), the last ``window`` on a sliding-window one."""
    kept = []
    for spec in config.layer_plan():
        if spec.chunk_size is not None:
            kept.append(min(length, spec.chunk_size))
        elif spec.window is not None:
            kept.append(min(length, spec.window))
        else:
            kept.append(length)
    return kept


def kv_cache_bytes(config: Config, length: int, bytes_per_value: int = 2, batch: int = 1) -> int:
    """Bytes of KV cache for one sequence of ``length`` tokens (bf16: 2 bytes per value):
    ``2 (K and V) * kept_tokens * num_kv_heads * head_dim * bytes`` summed over the layers."""
    per_token = 2 * config.num_kv_heads * config.head_dim * bytes_per_value * batch
    return sum(visible_keys(config, length)) * per_token


def _mean_visible(length: int, chunk: int | None, window: int | None) -> float:
    """Mean number of keys a query attends to over positions 0 .. length-1."""
    if chunk is not None:
        full, rest = divmod(length, chunk)
        return (full * chunk * (chunk + 1) / 2 + rest * (rest + 1) / 2) / length
    if window is not None and window < length:
        return (window * (window + 1) / 2 + (length - window) * window) / length
    return (length + 1) / 2


def flops_per_token(config: Config, length: int) -> float:
    """Forward FLOPs per token, averaged over a sequence of ``length`` tokens.

    ``2 x`` the active parameters that multiply (all but the embedding lookup and the norms' weights),
    plus attention:
    ``4 * num_heads * head_dim`` per visible key (scores q.k and the weighted sum of v), for the mean
    number of keys a query sees: half the context on a causal global layer, half a chunk on a
    chunked one. Norms, softmax and activations are left out (well under 1%).
    """
    norms = (2 * config.num_layers + 1) * config.hidden_size
    active = count_params(config)[1] - config.vocab_size * config.hidden_size - norms
    attention = sum(
        4 * config.num_heads * config.head_dim * _mean_visible(length, spec.chunk_size, spec.window)
        for spec in config.layer_plan()
    )
    return 2.0 * active + attention


def position_scheme(config: Config) -> str:
    """The positional scheme of a config in words: RoPE (theta, scaling), iRoPE, sliding window."""
    theta = f"theta {config.rope_theta:.0f}"
    scaling = f", scaled x{config.rope_scaling.factor:g}" if config.rope_scaling is not None else ""
    if config.positions == "irope":
        return (
            f"iRoPE: RoPE ({theta}{scaling}) in chunks of {config.attention_chunk_size}, "
            f"NoPE every {config.nope_layer_interval}th layer"
        )
    window = f", sliding window {config.sliding_window}" if config.sliding_window else ""
    return f"RoPE ({theta}{scaling}), global{window}"


@dataclass(frozen=True)
class FamilyRow:
    """One row of the family table. Computed: ``total``, ``active``, ``kv_cache_bytes`` (bf16, one
    sequence at ``context`` tokens). Published: ``published_total_b``/``published_active_b``,
    ``context``. None where nothing is published or computed."""

    model: str
    released: str
    experts: str
    total: int | None
    active: int | None
    published_total_b: float | None
    published_active_b: float | None
    context: int | None
    positions: str
    kv_cache_bytes: int | None
    notes: str


def family_table() -> list[FamilyRow]:
    """The table of the herd and its rivals: every open model computed from its preset, checked
    against :data:`PUBLISHED`; the others with what is published only."""
    rows = []
    for name, published in PUBLISHED.items():
        config = preset(name)
        total, active = count_params(config)
        context = published.context
        notes = published.source
        if name == "llama4-behemoth":
            notes = "config ESTIMATED from 16 experts, 288B active, ~2T total (see l4lab.config); " + notes
        rows.append(
            FamilyRow(
                name,
                published.released,
                published.experts,
                total,
                active,
                published.total_b,
                published.active_b,
                context,
                position_scheme(config),
                kv_cache_bytes(config, context) if context is not None else None,
                notes,
            )
        )
    for name, released, context, notes in OTHERS:
        rows.append(FamilyRow(name, released, "-", None, None, None, None, context, "-", None, notes))
    return rows


def param_breakdown(config: Config) -> dict[str, int]:
    """Where the parameters are: embeddings (input and output tables, final norm), attention (with the
    layers' norms), routers, shared experts, routed experts, dense feed-forwards. Sums to the total of
    :func:`l4lab.count_params`."""
    d = config.hidden_size
    parts = dict.fromkeys(
        ("embeddings", "attention", "routers", "shared_experts", "routed_experts", "dense_ffn"), 0
    )
    parts["embeddings"] = 2 * config.vocab_size * d + d
    swiglu_expert = 3 * d * config.moe_intermediate_size
    for spec in config.layer_plan():
        parts["attention"] += d * config.head_dim * (2 * config.num_heads + 2 * config.num_kv_heads) + 2 * d
        if spec.moe:
            parts["routers"] += d * config.num_experts
            parts["routed_experts"] += swiglu_expert * config.num_experts
            if spec.router is None or spec.router.shared_expert:
                parts["shared_experts"] += swiglu_expert
        else:
            parts["dense_ffn"] += 3 * d * config.dense_intermediate_size
    return parts


@dataclass(frozen=True)
class Step:
    """One step of :func:`llama2_to_llama4`: what changed, and the config after it."""

    change: str
    config: Config


def llama2_to_llama4() -> list[Step]:
    """From a Llama 2-style model to Llama 4 Scout, one idea per step, at Scout's width and depth.

    1. Llama 2's choices: multi-head attention, RoPE theta 10000, a dense SwiGLU of width 16384.
    2. GQA: 8 key/value heads for 40 query heads.
    3. RoPE theta 500000 with Llama 3.1-style scaling (Scout's: x16).
    4. MoE: 16 experts of width 8192, top-2, softmax router (Mixtral's): the active FFN width stays 16384.
    5. Llama 4's router: top-1 + a shared expert of width 8192 (the same active width again).
    6. iRoPE: RoPE layers attend within chunks of 8192, every 4th layer is NoPE and global.
    7. QK norm on the RoPE layers: Scout's text model (``preset("llama4-scout", vision=None)``).
    """
    scout = preset("llama4-scout", vision=None)
    start = scout.replace(
        num_kv_heads=scout.num_heads,
        rope_theta=10000.0,
        rope_scaling=None,
        ffn="dense",
        positions="rope",
        use_qk_norm=False,
        num_experts=1,
    )
    gqa = start.replace(num_kv_heads=scout.num_kv_heads)
    scaled = gqa.replace(rope_theta=scout.rope_theta, rope_scaling=RopeScaling(16.0, 1.0, 1.0, 8192))
    moe = scaled.replace(ffn="moe", router="mixtral", num_experts=16, top_k=2)
    shared = moe.replace(router="llama4", top_k=1)
    irope = shared.replace(positions="irope")
    return [
        Step("Llama 2's choices (MHA, RoPE 1e4, dense)", start),
        Step("+ GQA (8 KV heads)", gqa),
        Step("+ RoPE theta 5e5, scaled x16", scaled),
        Step("+ MoE (16 experts, top-2 softmax)", moe),
        Step("+ top-1 + shared expert (Llama 4 router)", shared),
        Step("+ iRoPE (chunks of 8192, NoPE every 4th)", irope),
        Step("+ QK norm = Llama 4 Scout", irope.replace(use_qk_norm=True)),
    ]


__all__ = [
    "OTHERS",
    "PUBLISHED",
    "FamilyRow",
    "Published",
    "Step",
    "family_table",
    "flops_per_token",
    "kv_cache_bytes",
    "llama2_to_llama4",
    "param_breakdown",
    "position_scheme",
    "visible_keys",
]
