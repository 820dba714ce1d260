"""The primitive operations of the model, in plain PyTorch: the "eager" backend.

The model calls these six functions through a table (:class:`Ops`) and nothing else that computes
(besides the matmuls of its linear layers); the fused backend (``l4lab.kernels``) provides the same six
functions, with the same signatures, as Triton kernels. Each eager function is the reference its kernel
is tested against.

========================  =====================================================================
``rms_norm``              ``x / sqrt(mean(x^2) + eps) * weight``, in float32, cast back
``rope_qk_norm``          rotate interleaved pairs of q and k by their positions, then (optionally)
                          normalise them over head_dim without a weight
``swiglu``                ``silu(gate) * up``
``attention``             softmax(q k^T / sqrt(d)) v under a causal or chunked-causal mask, with the
                          NoPE temperature applied to q by absolute position
``route``                 choose each token's top-k experts and score them (Llama 4: a sigmoid;
                          Mixtral and DeepSeek-V3 variants through ``router``)
``routed_experts``        send each token to its chosen experts only, scaled by its router score
========================  =====================================================================

The fused backend implements Llama 4's choices only; ``Config.validate`` refuses the fused backend
with the Mixtral and DeepSeek-V3 routers and with a sliding window, and the kernels refuse them too.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from l4lab.config import RouterSpec


# ---------------------------------------------------------------------- normalisation
def rms_norm(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    """Root-mean-square normalisation over the last dimension.

    ``y = x / sqrt(mean(x^2) + eps)`` computed in float32 (as Llama does, so that bf16 activations do not
    lose the small mean), cast back to x's dtype, then scaled by ``weight`` if there is one. Without a
    weight this is Llama 4's QK norm (transformers calls it L2Norm; it divides by the RMS, not the L2 norm).
    """
    x32 = x.float()
    y = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)
    return y if weight is None else y * weight


# ---------------------------------------------------------------------- rotary positions
def apply_rope(x: Tensor, freqs_cis: Tensor) -> Tensor:
    """Rotate interleaved feature pairs of ``x`` [B, T, H, D] by complex ``freqs_cis`` [T, D/2].

    Features (2i, 2i+1) form the complex number ``x_2i + j x_2i+1``, which is multiplied by
    ``exp(j * position * inv_freq_i)``. This interleaved layout is Llama 4's (and Meta's Llama 2/3 code);
    the "rotate-half" layout pairs i with i + D/2 instead and does NOT match Llama 4 weights.
    """
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))  # [B, T, H, D/2]
    rotated = pairs * freqs_cis[None, :, None, :]
    return torch.view_as_real(rotated).flatten(3).type_as(x)


def rope_qk_norm(q: Tensor, k: Tensor, freqs_cis: Tensor, qk_norm: bool, eps: float) -> tuple[Tensor, Tensor]:
    """RoPE on queries [B, T, H, D] and keys [B, T, Hkv, D], then the weightless QK norm if asked.

    Llama 4 normalises AFTER rotating, and only on RoPE layers: the rotation preserves each pair's
    length, so the norm bounds the logits of these layers whatever the position.
    """
    q, k = apply_rope(q, freqs_cis), apply_rope(k, freqs_cis)
    if qk_norm:
        q, k = rms_norm(q, None, eps), rms_norm(k, None, eps)
    return q, k


# ---------------------------------------------------------------------- feed-forward
def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """The SwiGLU gate: ``silu(gate) * up`` where ``silu(g) = g * sigmoid(g)``."""
    return F.silu(gate) * up


def route(
    logits: Tensor, selection_bias: Tensor, top_k: int, router: RouterSpec | None = None
) -> tuple[Tensor, Tensor]:
    """The router's decision from ``logits`` [N, E]: (experts [N, k] int64, scores [N, k]).

    Llama 4 (``router`` None or kind "llama4"): the experts are the top k of ``logits + selection_bias``
    (the bias, zero in published Llama 4, is DeepSeek-V3's auxiliary-loss-free balancing and only
    CHOOSES); each score is ``sigmoid`` of the raw logit of its expert, on its own: no softmax, no
    renormalisation, unchosen experts get nothing.

    Other routers (:class:`l4lab.config.RouterSpec`), in float32 as transformers computes them:
    scores ``softmax(logits)`` (Mixtral) or ``sigmoid(logits)`` (DeepSeek-V3) over ALL experts; the top
    k of ``scores + selection_bias``; the chosen scores divided by their sum (``+ 1e-20``, DeepSeek's
    guard) and multiplied by ``routed_scaling_factor``.
    """
    if router is None or router.select_on == "logits":
        experts = (logits + selection_bias).topk(top_k, dim=-1).indices
        scores = torch.sigmoid(logits.gather(-1, experts).float()).to(logits.dtype)
        return experts, scores
    probs = logits.float().softmax(-1) if router.scoring == "softmax" else torch.sigmoid(logits.float())
    experts = (probs + selection_bias).topk(top_k, dim=-1).indices
    chosen = probs.gather(-1, experts)
    if router.renormalise:
        chosen = chosen / (chosen.sum(-1, keepdim=True) + (1e-20 if router.scoring == "sigmoid" else 0.0))
    return experts, (chosen * router.routed_scaling_factor).to(logits.dtype)


def routed_experts(
    x: Tensor,
    expert_ids: Tensor,
    scores: Tensor,
    gate_up: Tensor,
    down: Tensor,
    shared: Tensor | None = None,
    scale_output: bool = False,
) -> Tensor:
    """Sparse mixture-of-experts dispatch.

    ``x`` [N, D] tokens, ``expert_ids`` and ``scores`` [N, k] their routing, ``gate_up`` [E, D, 2I] and
    ``down`` [E, I, D] the experts' weights (gate = first I columns, up = last I). Returns [N, D]:

        y_n = shared_n + sum_j  expert_{e_nj}(s_nj * x_n),
        expert_e(z) = (silu(z W_gate,e) * (z W_up,e)) W_down,e

    The score scales the expert's INPUT (Llama 4's choice; SwiGLU is not linear, so it is not the same as
    scaling the output). ``shared`` [N, D], if given, is the shared expert's output, added to the result
    (the fused kernel adds it as it writes, instead of reading and writing a second [N, D] tensor).
    ``scale_output``: Mixtral's and DeepSeek-V3's choice instead, ``y_n = sum_j s_nj * expert(x_n)``.
    Tokens are sorted by expert so that each expert multiplies only its own rows: cost grows with k,
    not with the number of experts.
    """
    num_tokens, top_k = expert_ids.shape
    flat_experts = expert_ids.reshape(-1)  # slot s holds token s // k's (s % k)-th choice
    order = torch.argsort(flat_experts, stable=True)  # slots grouped by expert
    rows_per_expert = torch.bincount(flat_experts, minlength=gate_up.shape[0]).tolist()
    sorted_scores = scores.reshape(-1, 1).index_select(0, order)
    sorted_inputs = x.index_select(0, order // top_k)
    if not scale_output:
        sorted_inputs = sorted_inputs * sorted_scores

    outputs = []
    for expert, rows in enumerate(sorted_inputs.split(rows_per_expert)):
        if rows.shape[0] == 0:
            continue
        gate, up = (rows @ gate_up[expert]).chunk(2, dim=-1)
        outputs.append(swiglu(gate, up) @ down[expert])
    sorted_outputs = torch.cat(outputs) if len(outputs) > 1 else outputs[0]
    if scale_output:
        sorted_outputs = sorted_outputs * sorted_scores
    slot_outputs = sorted_outputs.index_select(0, torch.argsort(order))  # back to slot order
    # one slot per token: slot order is token order
    out = slot_outputs if top_k == 1 else slot_outputs.view(num_tokens, top_k, -1).sum(dim=1)
    if shared is not None:
        out += shared  # in place: one [N, D] buffer fewer
    return out


# ---------------------------------------------------------------------- attention
@dataclass(frozen=True)
class Temperature:
    """Llama 4's attention temperature tuning on NoPE layers (Scalable-Softmax style).

    A query at absolute position p is multiplied by
    ``log(floor((p + 1) / floor_scale) + 1) * attn_scale + 1``: exactly 1 for the first
    ``floor_scale - 1`` positions, then growing like log(p), which keeps attention sharp when a query
    must pick a few keys among millions.
    """

    floor_scale: float
    attn_scale: float

    def scales(self, positions: Tensor) -> Tensor:
        return torch.log1p(torch.floor((positions.float() + 1.0) / self.floor_scale)) * self.attn_scale + 1.0


def visibility_mask(
    query_start: int,
    num_queries: int,
    key_start: int,
    num_keys: int,
    chunk_size: int | None,
    device: torch.device | str | None = None,
    window: int | None = None,
) -> Tensor:
    """Which keys each query may see, as a bool [num_queries, num_keys] (True = visible).

    Causal: key position j <= query position i. Chunked (Llama 4's RoPE layers): additionally
    ``j // C == i // C``: the sequence is cut into blocks of C tokens and no query looks outside its
    block. This is block-diagonal, not a sliding window: the first token of a chunk sees only itself.
    Sliding window (Mistral, Mixtral when configured): additionally ``j > i - window``: every query
    sees itself and the ``window - 1`` keys before it.
    """
    i = torch.arange(query_start, query_start + num_queries, device=device)[:, None]
    j = torch.arange(key_start, key_start + num_keys, device=device)[None, :]
    visible = j <= i
    if chunk_size is not None:
        visible = visible & (j // chunk_size == i // chunk_size)
    if window is not None:
        visible = visible & (j > i - window)
    return visible


def _sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool) -> Tensor:
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=k.shape[1] != q.shape[1]
    )


def _chunked_causal_sdpa(q: Tensor, k: Tensor, v: Tensor, chunk_size: int) -> Tensor:
    """Chunked attention from a chunk boundary, computed chunk by chunk: cost T x C, not T^2.

    Queries and keys [B, H, T, D] are padded to whole chunks and folded into the batch, so every chunk is
    an independent causal attention. Padding sits after the real tokens, so causality hides it.
    """
    batch, heads, length, dim = q.shape
    chunks = math.ceil(length / chunk_size)
    padding = chunks * chunk_size - length

    def fold(x: Tensor) -> Tensor:  # [B, h, T, D] -> [B * chunks, h, C, D]
        x = F.pad(x, (0, 0, 0, padding))
        return x.view(batch, x.shape[1], chunks, chunk_size, dim).transpose(1, 2).flatten(0, 1)

    out = _sdpa(fold(q), fold(k), fold(v), None, causal=True)
    out = out.view(batch, chunks, heads, chunk_size, dim).transpose(1, 2).reshape(batch, heads, -1, dim)
    return out[:, :, :length]


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    query_start: int,
    key_start: int,
    chunk_size: int | None,
    temperature: Temperature | None,
    need_probs: bool,
    window: int | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Grouped-query attention over queries [B, H, Tq, D] and keys/values [B, Hkv, Tk, D].

    Queries sit at absolute positions ``query_start ...``, keys at ``key_start ...`` (a KV cache puts
    keys before the queries). Query head h reads key/value head ``h // (H / Hkv)``. The scale is
    ``D ** -0.5`` on every layer; NoPE layers also multiply q by the temperature of its position.
    ``window``: a sliding window (see :func:`visibility_mask`), under an explicit mask.

    Returns the output [B, H, Tq, D] and, when ``need_probs``, the attention probabilities
    [B, H, Tq, Tk] (computed explicitly; otherwise a fused SDPA kernel runs and nothing extra is kept).
    """
    num_queries, num_keys = q.shape[2], k.shape[2]
    if temperature is not None:
        positions = torch.arange(query_start, query_start + num_queries, device=q.device)
        q = (q * temperature.scales(positions)[:, None]).to(q.dtype)

    if need_probs:
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        mask = visibility_mask(query_start, num_queries, key_start, num_keys, chunk_size, q.device, window)
        logits = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
        probs = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)
        return probs @ v, probs

    last_query = query_start + num_queries - 1
    if window is not None and last_query - key_start >= window:  # some key falls out of the window
        mask = visibility_mask(query_start, num_queries, key_start, num_keys, None, q.device, window)
        return _sdpa(q, k, v, mask, causal=False), None
    one_chunk = chunk_size is None or key_start // chunk_size == last_query // chunk_size
    aligned = key_start == query_start
    if aligned and one_chunk:
        return _sdpa(q, k, v, None, causal=True), None
    if num_queries == 1 and one_chunk:  # decoding: every cached key is visible
        return _sdpa(q, k, v, None, causal=False), None
    if aligned and chunk_size is not None and query_start % chunk_size == 0:
        return _chunked_causal_sdpa(q, k, v, chunk_size), None
    mask = visibility_mask(query_start, num_queries, key_start, num_keys, chunk_size, q.device)
    return _sdpa(q, k, v, mask, causal=False), None


# ---------------------------------------------------------------------- the backend table
@dataclass(frozen=True)
class Ops:
    """The table of primitive operations a backend provides; the model calls only these."""

    name: str
    rms_norm: Callable[[Tensor, Tensor | None, float], Tensor]
    rope_qk_norm: Callable[[Tensor, Tensor, Tensor, bool, float], tuple[Tensor, Tensor]]
    swiglu: Callable[[Tensor, Tensor], Tensor]
    attention: Callable[..., tuple[Tensor, Tensor | None]]
    route: Callable[..., tuple[Tensor, Tensor]]
    routed_experts: Callable[..., Tensor]


EAGER = Ops(
    name="eager",
    rms_norm=rms_norm,
    rope_qk_norm=rope_qk_norm,
    swiglu=swiglu,
    attention=attention,
    route=route,
    routed_experts=routed_experts,
)


def ops_for(backend: str) -> Ops:
    """The table for ``backend``: "eager" here; "fused" from ``l4lab.kernels`` (needs Triton)."""
    if backend == "eager":
        return EAGER
    if backend == "fused":
        try:
            from l4lab.kernels import FUSED
        except ModuleNotFoundError as error:
            if error.name != "triton":
                raise
            raise ImportError(
                "backend='fused' needs Triton, which is not installed: pip install 'l4lab[kernels]' "
                "(or pip install triton). Triton ships wheels for Linux only; elsewhere use backend='eager'"
            ) from error
        return FUSED
    raise ValueError(f"backend {backend!r} is not known: 'eager' or 'fused'")
