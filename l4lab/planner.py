"""Will it fit, and what will the all-to-all cost? A planner for Llama 4 on N GPUs, on paper.

:func:`plan` answers, for a configuration (Scout, Maverick, a tiny model) on ``gpus`` devices of
``gpu_memory_gb`` each:

* **weights per GPU** at bf16, fp8 or int4: the routed experts split over the GPUs by expert
  parallelism, the rest split by tensor parallelism or replicated (``replicate_dense``);
* **KV cache per GPU** for a context of 256K, 1M or 10M tokens: iRoPE keeps every key only in the
  NoPE (global) layers, one in four; the chunked RoPE layers keep at most one chunk (8192 tokens), so
  the cache grows with 1/4 of the layers, not all of them. Attention is split by KV heads (tensor
  parallel), so at most ``num_kv_heads`` ways;
* **activations**: the working set of one layer at a time over the tokens in flight (inference);
* **all-to-all bytes per MoE layer per token**: each token goes to its expert's GPU and back
  (``2 x top_k x hidden x bytes``), except the ``1/N`` that stay home under uniform routing.

:func:`ep_cost` sets that traffic against the experts' compute per token, for a GPU's peak and its
links (NVLink inside a node, InfiniBand between nodes): where does communication dominate?

Everything is arithmetic on the config (``l4lab.config.count_params`` and the layer plan): no tensor is
built. Checked in tests/test_planner.py against the model card (Scout fits one H100 with int4 weights;
Maverick's fp8 weights fit one H100 host, 8 x 80 GB) and hand computations.
"""

from __future__ import annotations

from dataclasses import dataclass

from l4lab.config import Config, count_params, preset

GB = 1e9
BYTES_PER_WEIGHT = {
    "bf16": 2.0,
    "fp8": 1.0,
    # int4: half a byte per weight, plus one bf16 scale per group of 128 weights (group-wise quantisation)
    "int4": 0.5 + 2.0 / 128,
}
CONTEXTS = {"256K": 256 * 1024, "1M": 1024 * 1024, "10M": 10 * 1024 * 1024}
MODELS = {"scout": "llama4-scout", "maverick": "llama4-maverick"}

# H100 SXM (NVIDIA's datasheet): bf16 dense 989 TFLOP/s; NVLink 4 900 GB/s per GPU both ways together
# (450 each way); one 400 Gb/s InfiniBand NIC per GPU (50 GB/s each way); 8 GPUs per node
H100_BF16_FLOPS = 989e12
NVLINK_BYTES_PER_S = 450e9
INFINIBAND_BYTES_PER_S = 50e9
GPUS_PER_NODE = 8


def _config(model: str | Config) -> Config:
    if isinstance(model, Config):
        return model
    if model in MODELS:
        return preset(MODELS[model])
    raise ValueError(f"model must be a Config or one of {sorted(MODELS)}; got {model!r}")


def _positive(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number; got {value!r}")


def expert_parameters(config: Config) -> int:
    """The routed experts' parameters (all layers): what expert parallelism splits."""
    moe_layers = sum(spec.moe for spec in config.layer_plan())
    return moe_layers * config.num_experts * 3 * config.hidden_size * config.moe_intermediate_size


def kv_cache_bytes(config: Config, context: int, batch: int = 1, bytes_per_value: float = 2.0) -> float:
    """Bytes of keys and values for ``batch`` sequences of ``context`` tokens (the whole model).

    Per layer and token: ``2 (k, v) x num_kv_heads x head_dim`` values. A layer that attends within
    chunks keeps at most ``attention_chunk_size`` tokens; a global layer keeps them all.
    """
    per_token_layer = 2 * config.num_kv_heads * config.head_dim * bytes_per_value
    total = 0.0
    for spec in config.layer_plan():
        kept = context if spec.chunk_size is None else min(context, spec.chunk_size)
        total += kept * per_token_layer
    return total * batch


def activation_bytes(config: Config, tokens: int, bytes_per_value: float = 2.0) -> float:
    """A rough working set for ``tokens`` in flight, one layer at a time, at inference (no autograd).

    Per token: the residual, the normalised input and the attention output (3 x hidden), queries, keys
    and values (``head_dim x (heads + 2 kv_heads)``), and the SwiGLU gate, up and product of the routed
    and shared experts (``3 x moe_intermediate x (top_k + 1)``); plus the float32 logits of one
    position per sequence are left out (small). Flash attention never holds the scores.
    """
    per_token = (
        3 * config.hidden_size
        + config.head_dim * (config.num_heads + 2 * config.num_kv_heads)
        + 3 * config.moe_intermediate_size * (config.top_k + 1)
    )
    return tokens * per_token * bytes_per_value


def all_to_all_bytes_per_token(config: Config, gpus: int, bytes_per_value: float = 2.0) -> float:
    """Bytes one token sends and receives back per MoE layer under expert parallelism over ``gpus``.

    Dispatch and combine each move ``top_k`` hidden vectors, except those whose expert lives on the
    token's own GPU: ``1/gpus`` of them under uniform routing.
    """
    return 2 * config.top_k * config.hidden_size * bytes_per_value * (gpus - 1) / gpus


@dataclass(frozen=True)
class Plan:
    """Per-GPU memory in bytes, and the all-to-all traffic; ``fits``: the total is within the GPU."""

    model: str
    gpus: int
    gpu_memory: float
    weights_dtype: str
    context: int
    weights: float
    kv_cache: float
    activations: float
    all_to_all_per_token_layer: float
    moe_layers: int

    @property
    def total(self) -> float:
        return self.weights + self.kv_cache + self.activations

    @property
    def fits(self) -> bool:
        return self.total <= self.gpu_memory

    def summary(self) -> str:
        """One line in GB: weights + KV cache + activations against the GPU's memory."""
        verdict = "fits" if self.fits else "does not fit"
        return (
            f"{self.model} on {self.gpus} GPU(s), {self.weights_dtype} weights, {self.context:,} tokens: "
            f"{self.weights / GB:.1f} + {self.kv_cache / GB:.1f} + {self.activations / GB:.1f} = "
            f"{self.total / GB:.1f} GB per GPU of {self.gpu_memory / GB:.0f}: {verdict}"
        )


def plan(
    model: str | Config = "scout",
    gpus: int = 1,
    gpu_memory_gb: float = 80.0,
    weights: str = "bf16",
    context: int | str = "256K",
    batch: int = 1,
    tokens_in_flight: int = 8192,
    kv_bytes: float = 2.0,
    replicate_dense: bool = False,
) -> Plan:
    """Per-GPU bytes for ``model`` ("scout", "maverick" or a Config) on ``gpus`` GPUs.

    ``weights``: "bf16", "fp8" or "int4" (group-wise, 128 weights per bf16 scale). ``context``: tokens
    per sequence, or "256K", "1M", "10M"; ``batch`` sequences; the KV cache in ``kv_bytes`` per value
    (2: bf16). ``tokens_in_flight``: the prefill chunk the activations are sized for. The experts are
    split over the GPUs (expert parallelism); the other weights too (tensor parallelism), or copied on
    every GPU with ``replicate_dense``. ``fits`` compares the total with ``gpu_memory_gb`` (decimal GB,
    as GPUs are sold: an H100 has 80 GB); it leaves nothing for the CUDA context and fragmentation.
    """
    config = _config(model)
    name = model if isinstance(model, str) else "config"
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1:
        raise ValueError(f"gpus must be a positive integer; got {gpus!r}")
    _positive("gpu_memory_gb", gpu_memory_gb)
    if weights not in BYTES_PER_WEIGHT:
        raise ValueError(f"weights must be one of {sorted(BYTES_PER_WEIGHT)}; got {weights!r}")
    if isinstance(context, str):
        if context not in CONTEXTS:
            raise ValueError(
                f"context must be a number of tokens or one of {list(CONTEXTS)}; got {context!r}"
            )
        context = CONTEXTS[context]
    _positive("context", context)
    _positive("batch", batch)
    _positive("tokens_in_flight", tokens_in_flight)
    if config.num_experts % gpus and config.ffn == "moe":
        raise ValueError(
            f"{name}'s {config.num_experts} experts do not split over {gpus} GPUs: use a divisor of "
            f"{config.num_experts}"
        )
    total, _ = count_params(config)
    experts = expert_parameters(config)
    dense = total - experts
    per_weight = BYTES_PER_WEIGHT[weights]
    weight_bytes = per_weight * (experts / gpus + (dense if replicate_dense else dense / gpus))
    attention_ways = min(gpus, config.num_kv_heads)
    kv = kv_cache_bytes(config, int(context), batch, kv_bytes) / attention_ways
    return Plan(
        model=name,
        gpus=gpus,
        gpu_memory=gpu_memory_gb * GB,
        weights_dtype=weights,
        context=int(context),
        weights=weight_bytes,
        kv_cache=kv,
        activations=activation_bytes(config, tokens_in_flight) / attention_ways,
        all_to_all_per_token_layer=all_to_all_bytes_per_token(config, gpus),
        moe_layers=sum(spec.moe for spec in config.layer_plan()),
    )


@dataclass(frozen=True)
class ExpertParallelCost:
    """Per token and MoE layer, on ``gpus`` GPUs: seconds of expert compute and of all-to-all."""

    gpus: int
    compute_s: float
    nvlink_s: float
    infiniband_s: float

    @property
    def communication_s(self) -> float:
        return self.nvlink_s + self.infiniband_s

    @property
    def ratio(self) -> float:
        """Communication time over compute time: above 1, the all-to-all dominates (without overlap)."""
        return self.communication_s / self.compute_s


def ep_cost(
    model: str | Config = "maverick",
    gpus: int = 8,
    flops: float = H100_BF16_FLOPS,
    efficiency: float = 0.5,
    nvlink: float = NVLINK_BYTES_PER_S,
    infiniband: float = INFINIBAND_BYTES_PER_S,
    gpus_per_node: int = GPUS_PER_NODE,
    bytes_per_value: float = 2.0,
) -> ExpertParallelCost:
    """Expert compute against all-to-all time per token and MoE layer, under uniform routing.

    Compute: the routed and shared experts, ``2 x 3 x hidden x moe_intermediate x (top_k + 1)`` FLOPs,
    at ``efficiency x flops``. Traffic: dispatch and combine of ``top_k`` hidden vectors; a token's
    expert is on its own GPU with probability 1/N, on another GPU of its node (NVLink) with
    ``(gpus_per_node - 1) / N``, elsewhere (InfiniBand) with the rest. Every GPU sends and receives at
    once, each over its own links, so the per-token times are those of one GPU's share.
    """
    config = _config(model)
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1:
        raise ValueError(f"gpus must be a positive integer; got {gpus!r}")
    for name, value in (
        ("flops", flops),
        ("efficiency", efficiency),
        ("nvlink", nvlink),
        ("infiniband", infiniband),
    ):
        _positive(name, value)
    compute = 2 * 3 * config.hidden_size * config.moe_intermediate_size * (config.top_k + 1)
    vectors = 2 * config.top_k * config.hidden_size * bytes_per_value  # dispatch + combine
    in_node = min(gpus, gpus_per_node)
    nvlink_share = (in_node - 1) / gpus
    infiniband_share = (gpus - in_node) / gpus
    return ExpertParallelCost(
        gpus=gpus,
        compute_s=compute / (efficiency * flops),
        nvlink_s=vectors * nvlink_share / nvlink,
        infiniband_s=vectors * infiniband_share / infiniband,
    )


__all__ = [
    "BYTES_PER_WEIGHT",
    "CONTEXTS",
    "ExpertParallelCost",
    "Plan",
    "activation_bytes",
    "all_to_all_bytes_per_token",
    "ep_cost",
    "expert_parameters",
    "kv_cache_bytes",
    "plan",
]
