"""Lab 3, chunked attention and the temperature: the chunked causal mask of Llama 4's RoPE layers, the
query temperature of its NoPE layers, grouped-query attention with both, and the KV cache of a chunked
layer, which drops every finished chunk (``notebooks/labs/lab3_chunked_attention.ipynb``).

Steps: 3.1 ``chunked_causal_mask``, 3.2 ``temperature_scale``, 3.3 ``attention``, 3.4
``chunked_cache_update``; references in ``l4lab.ops`` (``visibility_mask``, ``Temperature``,
``attention``) and ``l4lab.cache.LayerCache``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from l4lab import ops
from l4lab.cache import LayerCache
from l4lab.labs.core import Case, Hints, Mistake, Step, as_tensor, compare_tensor, generator, register_lab


# ====================================================================== the chunked causal mask
def _ref_chunked_causal_mask(length: int, chunk: int) -> Tensor:
    return ops.visibility_mask(0, length, 0, length, chunk)


def _cases_chunked_causal_mask() -> list[Case]:
    specs = [
        ("T 16, chunk 8", 16, 8),
        ("T 20, chunk 8: the last chunk is partial (8 does not divide 20)", 20, 8),
        ("T 1, chunk 4", 1, 4),
        ("T 9, chunk 3", 9, 3),
        ("T 5, chunk 16: one chunk longer than the sequence", 5, 16),
        ("T 7, chunk 1: every token sees only itself", 7, 1),
    ]
    return [Case(label, (t, c), _ref_chunked_causal_mask(t, c)) for label, t, c in specs]


def _grid(length: int) -> tuple[Tensor, Tensor]:
    return torch.arange(length)[:, None], torch.arange(length)[None, :]


_MASK_MISTAKES = (
    Mistake(
        "sliding window",
        lambda t, c: (lambda i, j: (j <= i) & (j > i - c))(*_grid(t)),
        "this is a sliding window; chunks are fixed blocks: position 8 with C=8 sees only itself "
        "(j // C == i // C), not the 7 tokens before it.",
    ),
    Mistake(
        "no causality",
        lambda t, c: (lambda i, j: j // c == i // c)(*_grid(t)),
        "inside its chunk a query still sees only the past: require j <= i as well as j // C == i // C.",
    ),
    Mistake(
        "chunks ignored",
        lambda t, c: (lambda i, j: j <= i)(*_grid(t)),
        "this is plain causal attention: a query also must not see keys of earlier chunks "
        "(j // C == i // C).",
    ),
    Mistake(
        "no diagonal",
        lambda t, c: (lambda i, j: (j < i) & (j // c == i // c))(*_grid(t)),
        "a token sees itself: j <= i, not j < i.",
    ),
    Mistake(
        "transposed",
        lambda t, c: _ref_chunked_causal_mask(t, c).T.contiguous(),
        "rows are queries and columns keys: mask[i, j] is True when query i may see key j (lower triangle).",
    ),
    Mistake(
        "inverted",
        lambda t, c: ~_ref_chunked_causal_mask(t, c),
        "True means VISIBLE here; if you built the mask of hidden keys (for masked_fill), "
        "return its negation.",
    ),
)


def _ref_temperature_scale(positions: Tensor, floor_scale: float, attn_scale: float) -> Tensor:
    return ops.Temperature(floor_scale, attn_scale).scales(positions)


def _cases_temperature_scale() -> list[Case]:
    specs = [
        ("positions 0..19, floor_scale 4, attn_scale 0.5", torch.arange(20), 4, 0.5),
        (
            "Llama 4's values around the floor: positions 8185..8200, floor 8192, attn 0.1",
            torch.arange(8185, 8201),
            8192,
            0.1,
        ),
        ("positions 100..106 (queries after a KV cache), floor 8, attn 0.1", torch.arange(100, 107), 8, 0.1),
        ("a single position 0", torch.tensor([0]), 4, 0.5),
        ("floor_scale 3 (not a power of two), positions 0..30", torch.arange(31), 3, 0.25),
        ("long context: positions 10^6 and 10^7 - 1", torch.tensor([1_000_000, 9_999_999]), 8192, 0.1),
    ]
    return [Case(label, (p, f, a), _ref_temperature_scale(p, f, a)) for label, p, f, a in specs]


def _temperature(
    positions: Tensor,
    floor_scale: float,
    attn_scale: float,
    *,
    shift: float = 1.0,
    log: Callable[[Tensor], Tensor] = torch.log1p,
    rounding: bool = True,
) -> Tensor:
    ratio = (positions.double() + shift) / floor_scale
    return log(torch.floor(ratio) if rounding else ratio) * attn_scale + 1.0


_TEMPERATURE_MISTAKES = (
    Mistake(
        "relative positions",
        lambda p, f, a: _temperature(torch.arange(p.numel()), f, a),
        "the temperature uses ABSOLUTE positions: use positions[t] itself, not its index t in this "
        "tensor (queries after a KV cache, or deep in a long document, sit far from 0).",
    ),
    Mistake(
        "p instead of p + 1",
        lambda p, f, a: _temperature(p, f, a, shift=0.0),
        "floor((p + 1) / floor_scale): with the + 1, position floor_scale - 1 is the first to get "
        "a scale above 1.",
    ),
    Mistake(
        "log without + 1",
        lambda p, f, a: _temperature(p, f, a, log=torch.log),
        "log(floor((p + 1) / floor_scale) + 1): the + 1 inside the log keeps the first positions "
        "at exactly 1.",
    ),
    Mistake(
        "no floor",
        lambda p, f, a: _temperature(p, f, a, rounding=False),
        "round down: floor((p + 1) / floor_scale), so the scale grows in steps of floor_scale positions.",
    ),
    Mistake(
        "log2",
        lambda p, f, a: _temperature(p, f, a, log=lambda t: torch.log2(t + 1)),
        "use the natural logarithm (torch.log or torch.log1p), not log2.",
    ),
    Mistake(
        "log10",
        lambda p, f, a: _temperature(p, f, a, log=lambda t: torch.log10(t + 1)),
        "use the natural logarithm (torch.log or torch.log1p), not log10.",
    ),
    Mistake(
        "no + 1 at the end",
        lambda p, f, a: _temperature(p, f, a) - 1.0,
        "the scale is log(...) * attn_scale + 1: it starts at 1 (no change), not at 0.",
    ),
)


def _ref_attention(
    q: Tensor, k: Tensor, v: Tensor, chunk: int | None, temperature: tuple[float, float] | None
) -> Tensor:
    tuning = ops.Temperature(*temperature) if temperature is not None else None
    out, _ = ops.attention(q, k, v, 0, 0, chunk, tuning, need_probs=False)
    return out


def _cases_attention() -> list[Case]:
    g = generator(303)
    specs = [
        (
            "batch 2, 4 query heads / 2 kv heads, T 12, head_dim 8, chunk 5 (does not divide 12)",
            2,
            4,
            2,
            12,
            8,
            5,
            None,
        ),
        (
            "batch 1, 3 query heads / 1 kv head, T 7, head_dim 6, global, temperature (2, 0.5)",
            1,
            3,
            1,
            7,
            6,
            None,
            (2, 0.5),
        ),
        ("multi-head (4 / 4), T 8, chunk 4", 1, 4, 4, 8, 8, 4, None),
        ("a single token (T 1), global", 1, 2, 1, 1, 4, None, None),
        ("6 query heads / 3 kv heads, T 10, head_dim 10, chunk 3", 2, 6, 3, 10, 10, 3, None),
        ("global causal, T 20, temperature (4, 1.0), 2 / 1 heads", 1, 2, 1, 20, 8, None, (4, 1.0)),
    ]
    cases = []
    for label, b, h, hkv, t, d, chunk, temperature in specs:
        q = torch.randn(b, h, t, d, generator=g)
        k = torch.randn(b, hkv, t, d, generator=g)
        v = torch.randn(b, hkv, t, d, generator=g)
        args = (q, k, v, chunk, temperature)
        cases.append(Case(label, args, _ref_attention(*args)))
    return cases


def _attention_variant(
    mask_kind: str = "right",
    gqa: str = "interleave",
    scale: str = "sqrt",
    use_temperature: bool = True,
) -> Callable[..., Tensor]:
    def attend(q: Tensor, k: Tensor, v: Tensor, chunk: int | None, temperature: Any) -> Tensor:
        length, dim = q.shape[2], q.shape[3]
        if temperature is not None and use_temperature:
            q = q * _ref_temperature_scale(torch.arange(length), *temperature)[:, None]
        group = q.shape[1] // k.shape[1]
        if gqa == "interleave":
            k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        else:
            k, v = k.repeat(1, group, 1, 1), v.repeat(1, group, 1, 1)
        logits = q @ k.transpose(-2, -1) * (dim**-0.5 if scale == "sqrt" else 1.0 / dim)
        i, j = _grid(length)
        if mask_kind == "right":
            visible = _ref_chunked_causal_mask(length, chunk) if chunk is not None else j <= i
        elif mask_kind == "global":
            visible = j <= i
        elif mask_kind == "sliding":
            visible = (j <= i) & (j > i - chunk) if chunk is not None else j <= i
        else:  # no causality
            visible = (j // chunk == i // chunk) if chunk is not None else torch.ones_like(j <= i)
        return torch.softmax(logits.masked_fill(~visible, float("-inf")), -1) @ v

    return attend


_ATTENTION_MISTAKES = (
    Mistake(
        "chunk ignored",
        _attention_variant(mask_kind="global"),
        "with a chunk size, a query sees only keys of its own chunk: use your chunked_causal_mask(T, chunk).",
    ),
    Mistake(
        "sliding window",
        _attention_variant(mask_kind="sliding"),
        "chunks are fixed blocks, not a sliding window: position 8 with C=8 sees only itself.",
    ),
    Mistake(
        "no causal mask",
        _attention_variant(mask_kind="none"),
        "attention is causal: query i sees keys j <= i only (set the others to -inf before the softmax).",
    ),
    Mistake(
        "GQA by repeat",
        _attention_variant(gqa="repeat"),
        "query head h reads key/value head h // (H / Hkv): neighbouring query heads share a kv head. "
        "Use repeat_interleave(H // Hkv, dim=1), not repeat.",
    ),
    Mistake(
        "temperature ignored",
        _attention_variant(use_temperature=False),
        "when temperature = (floor_scale, attn_scale) is given, multiply query t by "
        "temperature_scale(t, floor_scale, attn_scale) before the dot products.",
    ),
    Mistake(
        "scale 1/D",
        _attention_variant(scale="d"),
        "scale the dot products by 1 / sqrt(head_dim), not 1 / head_dim.",
    ),
)


# ====================================================================== the chunked KV cache
def _ref_chunked_cache_update(keys: Tensor, start: int, new_keys: Tensor, chunk: int) -> tuple[Tensor, int]:
    """What a chunked layer's cache keeps after ``new_keys`` (positions start + S ...) are appended."""
    cache = LayerCache(chunk)
    if keys.shape[2] > 0:
        cache.keys, cache.values, cache.start = keys, keys, start
    cache.update(new_keys, new_keys, start + keys.shape[2])
    assert cache.keys is not None
    return cache.keys, cache.start


def _cases_chunked_cache_update() -> list[Case]:
    g = generator(304)
    specs = [
        ("empty cache, a prompt of 10 tokens, chunk 4", 0, 0, 10, 4),
        ("empty cache, a prompt of exactly 8 tokens, chunk 4: both chunks finished", 0, 0, 8, 4),
        ("2 keys at positions 8-9, one new token (10), chunk 4", 8, 2, 1, 4),
        ("3 keys at 8-10, one new token (11): the chunk is finished", 8, 3, 1, 4),
        ("empty cache at position 12, one new token, chunk 4", 12, 0, 1, 4),
        ("5 keys at 16-20, 7 new tokens (21-27), chunk 8", 16, 5, 7, 8),
        ("a prompt of 10 tokens, chunk 64: nothing is finished", 0, 0, 10, 64),
        ("chunk 3 (odd): 1 key at 9, 5 new tokens (10-14)", 9, 1, 5, 3),
    ]
    cases = []
    for label, start, cached, new, chunk in specs:
        keys = torch.randn(1, 2, cached, 4, generator=g)
        new_keys = torch.randn(1, 2, new, 4, generator=g)
        args = (keys, start, new_keys, chunk)
        cases.append(Case(label, args, _ref_chunked_cache_update(*args)))
    return cases


def _compare_cache(expected: Any, got: Any) -> str | None:
    if got is None:
        return "your function returned None (is a `return` missing?)"
    if not isinstance(got, (tuple, list)) or len(got) != 2:
        return f"expected a tuple (kept_keys, kept_start), got {type(got).__name__}"
    want_keys, want_start = expected
    kept, problem = as_tensor(got[0], "kept_keys")
    if problem or kept is None:
        return problem
    if tuple(kept.shape) != tuple(want_keys.shape):
        return (
            f"kept_keys: expected shape {tuple(want_keys.shape)} ({want_keys.shape[2]} keys kept), got "
            f"{tuple(kept.shape)} ({kept.shape[2] if kept.dim() == 4 else '?'} keys)"
        )
    try:
        start = int(got[1])
    except (TypeError, ValueError):
        return f"kept_start: expected an int, got {type(got[1]).__name__}"
    if start != want_start:
        return f"kept_start: expected {want_start} (the position of the first kept key), got {start}"
    return compare_tensor(want_keys, kept, "kept_keys")


def _cache_variant(rule: str) -> Callable[..., tuple[Tensor, int]]:
    def update(keys: Tensor, start: int, new_keys: Tensor, chunk: int) -> tuple[Tensor, int]:
        every = torch.cat([keys, new_keys], dim=2)
        end = start + every.shape[2]
        if rule == "everything":
            keep_from = start
        elif rule == "window":
            keep_from = max(start, end - chunk)
        else:  # the last full chunk
            keep_from = max(start, (end - 1) // chunk * chunk)
        return every[:, :, keep_from - start :], keep_from

    return update


_CACHE_MISTAKES = (
    Mistake(
        "everything kept",
        _cache_variant("everything"),
        "a chunked layer drops the keys of every FINISHED chunk: no later query can see them, so keeping "
        "them only costs memory (a global layer keeps everything).",
    ),
    Mistake(
        "finished chunk kept at the boundary",
        _cache_variant("last full chunk"),
        "when the new tokens end exactly on a chunk boundary, that chunk is finished: the next token "
        "starts a new chunk, so nothing is kept: keep from the start of the chunk the NEXT token falls in.",
    ),
    Mistake(
        "sliding window",
        _cache_variant("window"),
        "keep the current chunk, not the last `chunk` keys: chunks are fixed blocks, and the next query "
        "sees only its own block (from the last multiple of chunk up to itself).",
    ),
)


# ====================================================================== the steps
STEPS: tuple[Step, ...] = (
    Step(
        "3.1",
        "chunked_causal_mask",
        ("T", "chunk"),
        "which keys each query sees on RoPE layers: causal, within fixed chunks (bool [T, T])",
        _cases_chunked_causal_mask,
        lambda e, g: compare_tensor(e, g, "mask"),
        _MASK_MISTAKES,
        "a query sees a key when two conditions hold together: one about order, one about blocks.",
        hints=Hints(
            "Cut the sequence into fixed blocks of `chunk` tokens (0..C-1, C..2C-1, ...). A query sees a "
            "key when the key is not in its future AND both sit in the same block: the first token of a "
            "block sees only itself, however many tokens came before.",
            "Two conditions on query i and key j, both true: j <= i, and the block number of j equals the "
            "block number of i (a position's block number is its integer division by the chunk). "
            "torch.arange(T)[:, None] and [None, :] give every (i, j) pair by broadcasting.",
            "l4lab/ops.py, visibility_mask (it also handles queries that start after a KV cache).",
        ),
    ),
    Step(
        "3.2",
        "temperature_scale",
        ("positions", "floor_scale", "attn_scale"),
        "NoPE layers' query scale log(floor((p+1)/floor_scale) + 1) * attn_scale + 1",
        _cases_temperature_scale,
        lambda e, g: compare_tensor(e, g, "scale", rtol=1e-5, atol=1e-6),
        _TEMPERATURE_MISTAKES,
        "the scale is 1 for the first positions, then grows in steps with the logarithm of the position.",
        hints=Hints(
            "The further a query sits in a long context, the more keys compete for its attention; Llama "
            "4's NoPE layers make such queries larger, by a factor that grows like the logarithm of the "
            "absolute position, in steps of floor_scale positions.",
            "scale = ln(floor((p + 1) / floor_scale) + 1) * attn_scale + 1 for each absolute position p; "
            "torch.floor and torch.log1p, in float32.",
            "l4lab/ops.py, Temperature.scales (the NoPE layers call it on their queries).",
        ),
    ),
    Step(
        "3.3",
        "attention",
        ("q", "k", "v", "chunk", "temperature"),
        "grouped-query attention, causal, with optional chunks or temperature",
        _cases_attention,
        compare_tensor,
        _ATTENTION_MISTAKES,
        "scaled dot-product attention, with the kv heads shared by groups of query heads and your mask.",
        hints=Hints(
            "Each query head is paired with one key/value head (neighbouring query heads share one); every "
            "query scores every key it may see, the scores become weights by a softmax, and the output is "
            "the weighted average of the values. The temperature, when given, scales the queries first.",
            "o = softmax((tau * q) k^T / sqrt(D) + M) v, with M = 0 where the key is visible and -inf "
            "elsewhere; kv head h // (H / Hkv) serves query head h (repeat_interleave on the head "
            "dimension).",
            "l4lab/ops.py, attention (from `if temperature` to the softmax; it uses your mask's twin, "
            "visibility_mask).",
        ),
    ),
    Step(
        "3.4",
        "chunked_cache_update",
        ("keys", "start", "new_keys", "chunk"),
        "a chunked layer's KV cache: append the new keys, then drop every finished chunk",
        _cases_chunked_cache_update,
        _compare_cache,
        _CACHE_MISTAKES,
        "after the new keys, keep only what a later query can still see on a chunked layer.",
        hints=Hints(
            "On a chunked layer the next query sees only keys of its own chunk. So once the new keys are "
            "appended, every chunk that is finished can go: the cache never holds more than one chunk, "
            "which is what makes a 10M-token context affordable on three layers in four.",
            "The keys cover positions start, start + 1, ..., end - 1 (end = start + old + new). The next "
            "token sits at end, in the chunk that begins at floor(end / chunk) * chunk: keep the keys from "
            "there on (none when end is a multiple of chunk) and return that position as kept_start.",
            "l4lab/cache.py, LayerCache.update (the chunk_size branch).",
        ),
    ),
)

register_lab("3", "chunked_attention", STEPS)
