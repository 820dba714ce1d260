"""Models side by side in numbers (notebook 01): the fields in which configs differ, and the parameters
of a built model counted by part.

``config_table(configs)`` prints the architectural numbers of several configs in columns, only the rows
that differ, and one line for what all share; the last two rows spell each of the first layers' plan
from ``layer_plan()`` (R: RoPE global, c: RoPE chunked, N: NoPE; D: dense, M: MoE).
``parameters_by_part(model)`` sums ``model.named_parameters()`` into the parts a parameter formula
names (embeddings + head, attention, dense FFN, shared experts, routed experts, norms + routers).
``moe_dispatch_flops(config, tokens)`` counts the matrix-product FLOPs of one MoE layer in l4lab (tokens
sorted by expert) and in transformers' ``Llama4TextMoe`` (every token through every expert), notebook 03.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from l4lab.config import Config

PARTS = ("embeddings + head", "attention", "dense FFN", "shared experts", "routed experts", "norms + routers")


def attention_pattern(config: Config, layers: int = 8) -> str:
    """The first ``layers`` layers' attention as letters: N (NoPE), c (RoPE chunked), R (RoPE global)."""
    return "".join(
        "N" if not s.uses_rope else "c" if s.chunk_size else "R" for s in config.layer_plan()[:layers]
    )


def ffn_pattern(config: Config, layers: int = 8) -> str:
    """The first ``layers`` layers' feed-forward as letters: M (mixture of experts) or D (dense)."""
    return "".join("M" if s.moe else "D" for s in config.layer_plan()[:layers])


def _rope_scaling(config: Config) -> str:
    scaling = config.rope_scaling
    if scaling is None:
        return "none"
    return f"x{scaling.factor:g} past {scaling.original_max_position_embeddings:,}"


def config_fields(config: Config) -> dict[str, str]:
    """Every architectural number of ``config`` as display text, by a name a reader knows."""
    plan = config.layer_plan()
    has_moe, has_dense = any(s.moe for s in plan), not all(s.moe for s in plan)
    chunked, irope = any(s.chunk_size for s in plan), config.positions == "irope"
    fields: dict[str, Callable[[Config], str]] = {
        "layers": lambda c: str(c.num_layers),
        "hidden size": lambda c: f"{c.hidden_size:,}",
        "query / KV heads": lambda c: f"{c.num_heads} / {c.num_kv_heads}",
        "head dim": lambda c: str(c.head_dim),
        "vocabulary": lambda c: f"{c.vocab_size:,}",
        "dense FFN width": lambda c: f"{c.dense_intermediate_size:,}" if has_dense else "-",
        "expert FFN width": lambda c: f"{c.moe_intermediate_size:,}" if has_moe else "-",
        "experts (routed + shared)": lambda c: f"{c.num_experts} + 1, top-{c.top_k}" if has_moe else "-",
        "MoE every k-th layer": lambda c: str(c.moe_layer_step) if has_moe else "-",
        "max positions": lambda c: f"{c.max_position_embeddings:,}",
        "RoPE theta": lambda c: f"{c.rope_theta:,.0f}",
        "RoPE scaling": _rope_scaling,
        "QK norm": lambda c: "yes" if c.use_qk_norm else "no",
        "NoPE every k-th layer": lambda c: str(c.nope_layer_interval) if irope else "-",
        "chunk size": lambda c: f"{c.attention_chunk_size:,}" if chunked else "- (global)",
        "temperature floor / scale": lambda c: f"{c.floor_scale} / {c.attn_scale}" if irope else "-",
        "RMS eps": lambda c: f"{c.rms_norm_eps:g}",
        "layers 0-7 attention": attention_pattern,
        "layers 0-7 FFN": ffn_pattern,
    }
    return {name: value(config) for name, value in fields.items()}


def config_table(configs: Mapping[str, Config], width: int = 17) -> str:
    """The fields that differ between ``configs``, one column per config, then the fields they share.

    A row whose longest value does not fit in ``width`` characters is written as ``name: value; ...``.
    """
    if not configs:
        raise ValueError(
            "configs is empty: pass {name: config}, e.g. {'Scout': l4lab.preset('llama4-scout')}"
        )
    names = list(configs)
    values = {name: config_fields(config) for name, config in configs.items()}
    lines = [f"{'':27}" + "".join(f"{name:>{width}}" for name in names)]
    same = []
    for field in values[names[0]]:
        row = [values[name][field] for name in names]
        if len(set(row)) == 1:
            same.append(f"{field} {row[0]}")
        elif max(map(len, row)) >= width:
            lines.append(f"{field:27}" + "; ".join(f"{n}: {v}" for n, v in zip(names, row, strict=True)))
        else:
            lines.append(f"{field:27}" + "".join(f"{v:>{width}}" for v in row))
    return "\n".join(lines) + "\n\nthe same in all: " + ", ".join(same)


def part_of(parameter_name: str) -> str:
    """Which part of :data:`PARTS` an l4lab parameter belongs to, from its name in ``named_parameters``."""
    if parameter_name.startswith(("embed_tokens", "lm_head")):
        return "embeddings + head"
    if "self_attn" in parameter_name:
        return "attention"
    if "norm" in parameter_name or "router" in parameter_name:
        return "norms + routers"
    if "shared_expert" in parameter_name:
        return "shared experts"
    if "experts" in parameter_name:
        return "routed experts"
    return "dense FFN"


def parameters_by_part(model: nn.Module) -> dict[str, int]:
    """Parameter counts of ``model`` per part of :data:`PARTS` (parts with no parameter are left out).

    Reads only shapes, so it works on a model built on the ``meta`` device.
    """
    counts: dict[str, int] = {}
    for name, parameter in model.named_parameters():
        part = part_of(name)
        counts[part] = counts.get(part, 0) + parameter.numel()
    return {part: counts[part] for part in PARTS if part in counts}


def matmul_flops(fn: Callable[..., Any], *args: Any) -> tuple[Any, int]:
    """``fn(*args)`` and the FLOPs of its matrix products, counted by torch's ``FlopCounterMode``."""
    # imported here: torch.utils.flop_counter imports triton, which must come after l4lab.kernels on a CPU
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        out = fn(*args)
    return out, counter.get_total_flops()


def moe_dispatch_flops(config: Config, tokens: Tensor, init_std: float = 0.1) -> dict[str, float | bool]:
    """Matrix-product FLOPs of layer 0's MoE on ``tokens`` [N, D], l4lab against transformers.

    Both layers carry the same weights, all drawn from N(0, ``init_std``²) (transformers' own experts
    start at zero). l4lab sorts the tokens by expert and runs each expert on its rows only: the shared
    expert plus ``top_k`` routed experts per token. transformers' ``Llama4TextMoe`` runs every token
    through all E experts and zeroes the unchosen ones: with top-1 the ratio is about (1 + E) / 2.
    Returns ``{"l4lab": flops, "transformers": flops, "same_output": bool}`` (outputs within 1e-5).
    Needs transformers.
    """
    from transformers import Llama4TextConfig
    from transformers.models.llama4.modeling_llama4 import Llama4TextMoe

    from l4lab.interop import to_transformers_config
    from l4lab.model import MoE

    ours = MoE(config, layer=0)
    with torch.no_grad():
        for parameter in ours.parameters():
            parameter.normal_(0.0, init_std)
    theirs = Llama4TextMoe(Llama4TextConfig(**to_transformers_config(config)))
    theirs.load_state_dict({k: v for k, v in ours.state_dict().items() if k != "router.selection_bias"})
    with torch.no_grad():
        same = torch.allclose(ours(tokens)[0], theirs(tokens)[0], atol=1e-5)
        _, ours_flops = matmul_flops(ours, tokens)
        _, theirs_flops = matmul_flops(theirs, tokens)
    return {
        "l4lab": float(ours_flops),
        "transformers": float(theirs_flops),
        "same_output": bool(same),
    }
