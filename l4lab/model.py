"""Llama 4's text model, top to bottom, the way the architecture reads.

    tokens -> embedding -> N x DecoderLayer -> RMSNorm -> lm_head -> logits

    DecoderLayer:  h   = x + Attention(RMSNorm(x))          (pre-norm residual blocks)
                   out = h + FeedForward(RMSNorm(h))        (FeedForward: MoE or dense SwiGLU)

Every computation goes through the backend's table of primitive operations (``l4lab.ops``), so the
same model runs on plain PyTorch ("eager") or on Triton kernels ("fused"). What each layer does (RoPE or
NoPE, chunked or global attention, MoE or dense) comes from ``Config.layer_plan()``, resolved once.

Parameter names are the ones of published checkpoints (transformers' ``Llama4ForCausalLM`` less its
``model.`` prefix), so a state dict maps onto a checkpoint key for key.
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from l4lab.cache import KVCache, LayerCache
from l4lab.config import Config, LayerSpec, RopeScaling, RouterSpec, router_spec
from l4lab.ops import EAGER, Ops, Temperature, ops_for

PREFILL_BLOCK = 1024  # tokens per block of a streaming prefill (Llama4.prefill)

# config fields that hold no weights: a built model can change them (see Llama4.reconfigure)
RECONFIGURABLE = frozenset(
    {
        "positions",
        "backend",
        "attention_chunk_size",
        "nope_layer_interval",
        "temperature_tuning",
        "floor_scale",
        "attn_scale",
        "use_qk_norm",
        "rope_theta",
        "rope_scaling",
        "sliding_window",
    }
)


# ---------------------------------------------------------------------- normalisation
class RMSNorm(nn.Module):
    """``x / sqrt(mean(x^2) + eps) * weight``: LayerNorm without the mean and the bias.

    Llama normalises the input of every block (pre-norm) and the final hidden state. Cheaper than
    LayerNorm and as stable; computed in float32.
    """

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.ops: Ops = EAGER

    def forward(self, x: Tensor) -> Tensor:
        return self.ops.rms_norm(x, self.weight, self.eps)


# ---------------------------------------------------------------------- rotary positions
def rope_inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> Tensor:
    """``inv_freq_i = theta^(-2i / head_dim)`` for i < head_dim / 2, float32, with Llama 3.1 scaling.

    Pair i turns by ``position * inv_freq_i`` radians: fast pairs see local order, slow pairs see long
    range. With scaling (Scout), wavelengths longer than ``L0 / low_freq_factor`` are stretched by
    ``factor`` so that slow pairs do not wrap around within a long context, those shorter than
    ``L0 / high_freq_factor`` are kept, and the band between is interpolated.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    if scaling is None:
        return inv_freq
    wavelength = 2 * math.pi / inv_freq
    context = scaling.original_max_position_embeddings
    long_wave = wavelength > context / scaling.low_freq_factor
    short_wave = wavelength < context / scaling.high_freq_factor
    stretched = torch.where(long_wave, inv_freq / scaling.factor, inv_freq)
    band = scaling.high_freq_factor - scaling.low_freq_factor
    if band > 0:
        smooth = (context / wavelength - scaling.low_freq_factor) / band
        interpolated = (1 - smooth) * stretched / scaling.factor + smooth * stretched
        stretched = torch.where(~long_wave & ~short_wave, interpolated, stretched)
    return stretched


def rope_angles(positions: Tensor, inv_freq: Tensor) -> Tensor:
    """Complex rotations ``exp(j * p * inv_freq_i)`` [T, head_dim / 2] for positions [T]."""
    angles = positions.float()[:, None] * inv_freq.to(positions.device)[None, :]
    return torch.polar(torch.ones_like(angles), angles)


# ---------------------------------------------------------------------- attention
class Attention(nn.Module):
    """Grouped-query self-attention as Llama 4 configures it per layer.

    ``num_heads`` query heads share ``num_kv_heads`` key/value heads (GQA: a smaller KV cache).
    RoPE layers rotate q and k, optionally QK-normalise them, and attend within chunks of
    ``attention_chunk_size`` tokens. NoPE layers skip the rotation, attend to the whole causal past and
    sharpen their queries with the temperature of their absolute position.
    """

    def __init__(self, config: Config, spec: LayerSpec) -> None:
        super().__init__()
        self.spec = spec
        self.num_heads, self.num_kv_heads, self.head_dim = (
            config.num_heads,
            config.num_kv_heads,
            config.head_dim,
        )
        self.eps = config.rms_norm_eps
        self.temperature = Temperature(config.floor_scale, config.attn_scale)
        d, hd = config.hidden_size, config.head_dim
        self.q_proj = nn.Linear(d, config.num_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, config.num_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, config.num_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(config.num_heads * hd, d, bias=False)
        self.ops: Ops = EAGER

    def forward(
        self,
        x: Tensor,
        freqs_cis: Tensor | None,
        position: int,
        cache: LayerCache | None,
        need_probs: bool,
        queries: int | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Attend from the last ``queries`` tokens of ``x`` (all of them when None) to every visible key.

        Keys and values come from all of ``x`` (and the cache); only the output rows are cut. The last
        layer of a model that needs only the next token's logits computes one query row: exact, and
        linear instead of quadratic in the context on a global layer.
        """
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(batch, length, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(batch, length, self.num_kv_heads, self.head_dim)
        if self.spec.uses_rope:
            q, k = self.ops.rope_qk_norm(q, k, freqs_cis, self.spec.qk_norm, self.eps)
        queries = length if queries is None else queries
        q = q[:, length - queries :]
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, head_dim]

        key_start = position
        if cache is not None:
            k, v, key_start = cache.update(k, v, position)
        out, probs = self.ops.attention(
            q,
            k,
            v,
            position + length - queries,
            key_start,
            self.spec.chunk_size,
            self.temperature if self.spec.temperature_tuning else None,
            need_probs,
            self.spec.window,
        )
        out = out.transpose(1, 2).reshape(batch, queries, self.num_heads * self.head_dim)
        return self.o_proj(out), probs


# ---------------------------------------------------------------------- feed-forward
class SwiGLU(nn.Module):
    """The gated feed-forward of Llama: ``down(silu(gate(x)) * up(x))``.

    Used as the dense feed-forward (width ``dense_intermediate_size``) and as the MoE's shared expert
    (width ``moe_intermediate_size``).
    """

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        self.ops: Ops = EAGER

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.ops.swiglu(self.gate_proj(x), self.up_proj(x)))


@dataclass
class RoutingRecord:
    """What the router of one MoE layer decided, for balance losses and routing plots.

    ``experts`` and ``scores`` [B, T, top_k]: the chosen experts and their sigmoid scores;
    ``router_logits`` [B, T, num_experts]: the raw logits before the top-k.
    """

    layer: int
    experts: Tensor
    scores: Tensor
    router_logits: Tensor


class Router(nn.Module):
    """Llama 4's router: a linear map to one logit per expert, top-k, then a sigmoid.

    No softmax and no renormalisation: each chosen expert's score is ``sigmoid(logit)`` on its own, and
    the unchosen experts get exactly zero. Llama 4 uses k = 1. ``spec`` (``Config.router``) swaps in
    Mixtral's softmax top-2, renormalised, or DeepSeek-V3's sigmoid top-k, renormalised and scaled
    (:func:`l4lab.ops.route`).

    ``selection_bias`` [E] is DeepSeek-V3's auxiliary-loss-free balancing: it is added to the logits
    (to the scores, for the routers that choose on scores) only to CHOOSE the experts, and training
    nudges it toward balance. It stays zero unless a trainer uses it, and published Llama 4 has none.
    """

    def __init__(self, dim: int, num_experts: int, top_k: int, spec: RouterSpec | None = None) -> None:
        super().__init__()
        self.top_k = top_k
        self.spec = spec
        self.weight = nn.Parameter(torch.empty(num_experts, dim))
        self.register_buffer("selection_bias", torch.zeros(num_experts))
        self.ops: Ops = EAGER

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x [N, D] -> (experts [N, k], scores [N, k], logits [N, E])."""
        logits = F.linear(x, self.weight)
        experts, scores = self.ops.route(logits, self.selection_bias, self.top_k, self.spec)
        return experts, scores, logits


class Experts(nn.Module):
    """The routed experts' weights, stacked: ``gate_up_proj`` [E, D, 2I] and ``down_proj`` [E, I, D].

    Each expert is a SwiGLU; gate and up are stored side by side (as in published checkpoints) and
    used as ``x @ W``. Dispatch is sparse: an expert multiplies only the tokens routed to it.
    """

    def __init__(self, num_experts: int, dim: int, hidden: int, scale_output: bool = False) -> None:
        super().__init__()
        self.scale_output = scale_output
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, dim, 2 * hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.ops: Ops = EAGER

    def forward(self, x: Tensor, experts: Tensor, scores: Tensor, shared: Tensor | None = None) -> Tensor:
        """Tokens x [N, D] through their chosen experts, plus ``shared`` [N, D] if given; each score
        scales its expert's input (Llama 4) or, with ``scale_output``, its output (Mixtral, DeepSeek)."""
        return self.ops.routed_experts(
            x, experts, scores, self.gate_up_proj, self.down_proj, shared, self.scale_output
        )


class MoE(nn.Module):
    """Mixture of experts: ``out = shared_expert(x) + sum_chosen expert_e(score_e * x)``.

    Every token passes through the shared expert and through its top-k routed experts, so a token's
    compute is that of k + 1 small SwiGLUs whatever the number of experts: total parameters grow with
    experts, active parameters do not. Mixtral has no shared expert and scales the outputs:
    ``out = sum_chosen score_e * expert_e(x)`` (the layer's :class:`~l4lab.config.RouterSpec`).
    """

    def __init__(self, config: Config, layer: int, router: RouterSpec | None = None) -> None:
        """``router``: the layer's spec (``LayerSpec.router``); by default the config's choice."""
        super().__init__()
        router = router or router_spec(config.router, config.routed_scaling_factor)
        self.layer = layer
        self.router = Router(config.hidden_size, config.num_experts, config.top_k, router)
        self.experts = Experts(
            config.num_experts, config.hidden_size, config.moe_intermediate_size, router.scale == "output"
        )
        self.shared_expert = (
            SwiGLU(config.hidden_size, config.moe_intermediate_size) if router.shared_expert else None
        )

    def forward(self, x: Tensor) -> tuple[Tensor, RoutingRecord]:
        tokens = x.reshape(-1, x.shape[-1])  # [B*T, D]
        experts, scores, logits = self.router(tokens)
        shared = self.shared_expert(tokens) if self.shared_expert is not None else None
        out = self.experts(tokens, experts, scores, shared=shared)
        batch_time = x.shape[:-1]
        record = RoutingRecord(
            self.layer,
            experts.view(*batch_time, -1),
            scores.view(*batch_time, -1),
            logits.view(*batch_time, -1),
        )
        return out.view_as(x), record


# ---------------------------------------------------------------------- the stack
class DecoderLayer(nn.Module):
    """One pre-norm block: attention then feed-forward, each added to the residual stream."""

    def __init__(self, config: Config, spec: LayerSpec) -> None:
        super().__init__()
        self.spec = spec
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, spec)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.feed_forward: MoE | SwiGLU = (
            MoE(config, spec.index, spec.router)
            if spec.moe
            else SwiGLU(config.hidden_size, config.dense_intermediate_size)
        )

    def forward(
        self,
        x: Tensor,
        freqs_cis: Tensor | None,
        position: int,
        cache: LayerCache | None,
        need_probs: bool,
        queries: int | None = None,
    ) -> tuple[Tensor, Tensor | None, RoutingRecord | None]:
        """The block for the last ``queries`` tokens of ``x`` (all when None); see Attention.forward."""
        attended, probs = self.self_attn(
            self.input_layernorm(x), freqs_cis, position, cache, need_probs, queries
        )
        h = (x if queries is None else x[:, x.shape[1] - queries :]) + attended
        record = None
        if isinstance(self.feed_forward, MoE):
            ffn_out, record = self.feed_forward(self.post_attention_layernorm(h))
        else:
            ffn_out = self.feed_forward(self.post_attention_layernorm(h))
        return h + ffn_out, probs, record


@dataclass
class Llama4Output:
    """``logits`` [B, T, vocab]; ``routing``: one record per MoE layer; ``attentions``: per layer
    [B, heads, T, keys] when asked for, else None."""

    logits: Tensor
    routing: list[RoutingRecord] = field(default_factory=list)
    attentions: list[Tensor] | None = None


class Llama4(nn.Module):
    """The Llama 4 text model: embedding, decoder layers, final norm, untied output head."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        plan = config.layer_plan()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, spec) for spec in plan)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.reset_parameters()
        self.reconfigure()

    # ------------------------------------------------------------------ set-up
    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02) -> None:
        """Normal(0, std) weights, norms at one (a no-op on the meta device)."""
        for name, param in self.named_parameters():
            if name.endswith("layernorm.weight") or name == "norm.weight":
                param.fill_(1.0)
            else:
                param.normal_(0.0, std)

    def set_backend(self, backend: str) -> None:
        """Swap every primitive operation to ``"eager"`` (PyTorch) or ``"fused"`` (Triton) ones."""
        self.reconfigure(backend=backend)

    def set_positions(self, positions: str) -> None:
        """Switch between ``"irope"`` and ``"rope"`` on the same weights (QK norm has no weights)."""
        self.reconfigure(positions=positions)

    def reconfigure(self, **changes: Any) -> None:
        """Change config fields that hold no weights, on the trained model, e.g. the chunk size.

        Allowed: the ``positions`` and ``backend`` toggles and the attention fields (chunk size, NoPE
        interval, temperature tuning, QK norm, RoPE theta and scaling). ``ffn`` and sizes change the
        weights: build a new model for those.
        """
        unknown = sorted(set(changes) - RECONFIGURABLE)
        if unknown:
            raise ValueError(f"cannot reconfigure {unknown} on a built model: only {sorted(RECONFIGURABLE)}")
        config = self.config.replace(**changes)
        ops = ops_for(config.backend)
        for module in self.modules():
            if hasattr(module, "ops"):
                module.ops = ops
        for layer, spec in zip(self.layers, config.layer_plan(), strict=True):
            layer.spec = layer.self_attn.spec = spec
            layer.self_attn.temperature = Temperature(config.floor_scale, config.attn_scale)
        self.config = config

    def save_pretrained(self, path: str | os.PathLike, layout: str | None = None) -> None:
        """Write a checkpoint directory that transformers' ``Llama4ForCausalLM`` loads (``l4lab.interop``);
        ``layout="llama"`` or ``"mixtral"`` writes one for ``LlamaForCausalLM`` or ``MixtralForCausalLM``.

        Only the checkpoint's own files in ``path`` are replaced, all at once; other files there stay.
        """
        from l4lab.interop import save_pretrained

        save_pretrained(self, path, layout=layout)

    def new_cache(self) -> KVCache:
        return KVCache(self.config.layer_plan())

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: Tensor,
        cache: KVCache | None = None,
        return_attention: bool = False,
        inputs_embeds: Tensor | None = None,
        last_only: bool = False,
    ) -> Llama4Output:
        """Logits for ``input_ids`` [B, T]; with a cache, the tokens continue what it holds.

        ``inputs_embeds`` [B, T, D], when given, replaces the embeddings of ``input_ids``: a multimodal
        model (``l4lab.vision``) passes the embeddings in which image features fill the placeholders.

        ``last_only``: the logits of the last token only [B, 1, vocab], all that predicting the next
        token needs. The last layer then computes one query row instead of T (its keys and values, and
        every earlier layer, are computed in full), so a global last layer costs O(T) instead of O(T^2).
        """
        position = cache.position if cache is not None else 0
        check_input_ids(input_ids, self.config, position, self.device)
        length = input_ids.shape[1]
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        expected = (*input_ids.shape, self.config.hidden_size)
        if tuple(x.shape) != expected:
            raise ValueError(
                f"inputs_embeds must have shape {expected} (input_ids' and the width); got {tuple(x.shape)}"
            )

        freqs_cis = None
        if any(layer.spec.uses_rope for layer in self.layers):
            inv_freq = rope_inverse_frequencies(
                self.config.head_dim, self.config.rope_theta, self.config.rope_scaling
            )
            positions = torch.arange(position, position + length, device=x.device)
            freqs_cis = rope_angles(positions, inv_freq)

        routing, attentions = [], [] if return_attention else None
        for i, layer in enumerate(self.layers):
            layer_cache = cache.layers[i] if cache is not None else None
            queries = 1 if last_only and i == len(self.layers) - 1 else None
            x, probs, record = layer(x, freqs_cis, position, layer_cache, return_attention, queries)
            if record is not None:
                routing.append(record)
            if attentions is not None:
                attentions.append(probs)
        if cache is not None:
            cache.position += length
        return Llama4Output(self.lm_head(self.norm(x)), routing, attentions)

    # ------------------------------------------------------------------ long prompts
    @torch.no_grad()
    def prefill(
        self,
        input_ids: Tensor,
        cache: KVCache | None = None,
        block_size: int | None = None,
        inputs_embeds: Tensor | None = None,
    ) -> tuple[Tensor, KVCache]:
        """Read a long prompt [B, T] into a KV cache ``block_size`` tokens at a time (streaming prefill).

        ``block_size`` defaults to ``l4lab.model.PREFILL_BLOCK`` (1024); ``inputs_embeds`` [B, T, D]
        replaces the prompt's embeddings, as in ``forward``.
        Returns the logits of the prompt's last token [B, vocab] (equal to a full forward's last row)
        and the cache, ready for decoding. Only one block is in flight at a time, so activation memory is
        bounded by the block instead of growing with T: a chunked layer attends from the block to at
        most ``C - 1 + block_size`` keys, a global layer to the T keys seen so far (its mask is
        ``block_size x T`` booleans, never ``T x T``). The cache is what grows: all T keys on global
        layers, less than one chunk on chunked layers.
        """
        block_size = PREFILL_BLOCK if block_size is None else block_size
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
            raise ValueError(f"block_size must be a positive integer (tokens per block); got {block_size!r}")
        cache = self.new_cache() if cache is None else cache
        check_input_ids(input_ids, self.config, cache.position, self.device)
        blocks = input_ids.split(block_size, dim=1)
        embeds = [None] * len(blocks) if inputs_embeds is None else inputs_embeds.split(block_size, dim=1)
        for block, embed in zip(blocks[:-1], embeds[:-1], strict=True):
            self(block, cache=cache, inputs_embeds=embed, last_only=True)
        logits = self(blocks[-1], cache=cache, inputs_embeds=embeds[-1], last_only=True).logits[:, -1]
        return logits, cache

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        eos_token_id: int | None = None,
        inputs_embeds: Tensor | None = None,
    ) -> Tensor:
        """The prompt [B, T] followed by ``max_new_tokens`` new tokens, decoded with a KV cache.

        Greedy when ``temperature`` is 0; otherwise sampling from ``softmax(logits / temperature)``
        restricted to the smallest set of tokens whose probability reaches ``top_p``, reproducible with
        ``seed``. A sequence that emits ``eos_token_id`` keeps emitting it; generation stops early once
        every sequence has. ``inputs_embeds`` [B, T, D] replaces the prompt's embeddings (images merged in).
        """
        check_generation_arguments(self.config, max_new_tokens, temperature, top_p, seed, eos_token_id)
        check_input_ids(input_ids, self.config, 0, self.device)
        total = input_ids.shape[1] + max_new_tokens
        if total > self.config.max_position_embeddings:
            raise ValueError(
                f"prompt length {input_ids.shape[1]} + max_new_tokens {max_new_tokens} = {total} exceeds "
                f"max_position_embeddings ({self.config.max_position_embeddings})"
            )
        generator = None
        if seed is not None:
            generator = torch.Generator(device=input_ids.device).manual_seed(seed)

        tokens = [input_ids]
        if max_new_tokens == 0:
            return input_ids.clone()
        # a long prompt goes through the cache block by block
        logits, cache = self.prefill(input_ids, inputs_embeds=inputs_embeds)
        finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for step in range(max_new_tokens):
            next_token = sample_next_token(logits, temperature, top_p, generator)
            if eos_token_id is not None:
                next_token = torch.where(finished, eos_token_id, next_token)
                finished |= next_token == eos_token_id
            tokens.append(next_token[:, None])
            if step + 1 == max_new_tokens or (eos_token_id is not None and bool(finished.all())):
                break
            logits = self(next_token[:, None], cache=cache).logits[:, -1]
        return torch.cat(tokens, dim=1)


def sample_next_token(
    logits: Tensor, temperature: float = 0.0, top_p: float = 1.0, generator: torch.Generator | None = None
) -> Tensor:
    """One token per row of ``logits`` [B, vocab]: argmax, or nucleus sampling at a temperature."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the tokens ranked above
        sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ---------------------------------------------------------------------- input checks
def _is_integer(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_generation_arguments(
    config: Config, max_new_tokens: Any, temperature: Any, top_p: Any, seed: Any, eos_token_id: Any
) -> None:
    """Raise an error naming the argument of ``generate`` that is wrong, and what it must be."""
    if not _is_integer(max_new_tokens) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative integer; got {max_new_tokens!r}")
    if not _is_real(temperature) or not 0 <= temperature < math.inf:
        raise ValueError(f"temperature must be a finite number >= 0 (0 means greedy); got {temperature!r}")
    if not _is_real(top_p) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be a number in (0, 1]; got {top_p!r}")
    if seed is not None and (not _is_integer(seed) or not -(2**63) <= seed < 2**64):
        raise ValueError(f"seed must be None or an integer in [-2**63, 2**64); got {seed!r}")
    if eos_token_id is not None and (
        not _is_integer(eos_token_id) or not 0 <= eos_token_id < config.vocab_size
    ):
        raise ValueError(
            f"eos_token_id must be None or a token id in [0, {config.vocab_size}); got {eos_token_id!r}"
        )


def check_input_ids(input_ids: Tensor, config: Config, position: int, device: torch.device) -> None:
    """Raise an error that says what is wrong with ``input_ids`` and what to pass instead."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(
            f"input_ids must be a torch tensor of token ids [batch, time]; got {type(input_ids).__name__}. "
            "Use torch.tensor([[...]]) or a tokenizer's encode(...)."
        )
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise TypeError(
            f"input_ids has dtype {input_ids.dtype}; token ids must be integers (torch.long). "
            "Pass token ids, not embeddings or probabilities (ids.long() converts)."
        )
    if input_ids.dtype not in (torch.long, torch.int32):
        raise TypeError(
            f"input_ids has dtype {input_ids.dtype}; token ids must be torch.long (or torch.int32), which "
            "the embedding table takes (ids.long() converts)"
        )
    if input_ids.dim() != 2:
        hint = " (a single sequence: use ids[None])" if input_ids.dim() == 1 else ""
        raise ValueError(f"input_ids must have shape [batch, time]; got shape {tuple(input_ids.shape)}{hint}")
    if input_ids.numel() == 0:
        raise ValueError(f"input_ids is empty (shape {tuple(input_ids.shape)}); pass at least one token")
    if device.type == "meta":
        raise RuntimeError(
            "the model is on the meta device (shapes only, no weights); load weights with "
            "l4lab.load_pretrained or build it on a real device"
        )
    if input_ids.device != device:
        raise ValueError(
            f"input_ids is on {input_ids.device} but the model is on {device}; "
            f"move them with input_ids.to({str(device)!r})"
        )
    bad = (input_ids < 0) | (input_ids >= config.vocab_size)
    if bool(bad.any()):
        b, t = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"token id {int(input_ids[b, t])} at [batch {b}, position {t}] is outside the vocabulary: "
            f"ids must be in [0, {config.vocab_size})"
        )
    end = position + input_ids.shape[1]
    if end > config.max_position_embeddings:
        raise ValueError(
            f"sequence of {input_ids.shape[1]} tokens starting at position {position} reaches {end}, beyond "
            f"max_position_embeddings ({config.max_position_embeddings}); shorten the input"
        )
