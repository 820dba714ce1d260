"""Flash attention for Llama 4: GQA, causal or chunked-causal, NoPE temperature, prefill and decode.

What it computes is exactly :func:`l4lab.ops.attention`: for queries q [B, H, Tq, D] at absolute positions
``query_start + i`` and keys/values k, v [B, Hkv, Tk, D] at positions ``key_start + j``,

    out_i = sum_j softmax_j(s_ij) v_j,   s_ij = (q_i . k_j) / sqrt(D)   over the VISIBLE keys j,

where key j is visible to query i iff ``kpos <= qpos`` and, on chunked layers (chunk C), also
``kpos // C == qpos // C``. Query head h reads key/value head ``h // (H / Hkv)`` (GQA). Nothing of size
Tq x Tk is ever stored: the kernels stream over tiles of keys and keep, per query row, a running maximum
and a running sum (the "online softmax").

Online softmax (FlashAttention-2)
---------------------------------
The logits are computed in base 2: ``t_ij = (q_i . k_j) * D^-0.5 * log2(e)`` so that ``exp(s) = 2^t``
and the kernel uses the cheap ``exp2``. After each tile of keys, with running max m, sum l and
unnormalised output acc (all float32):

    m' = max(m, max_j t_ij)
    l' = l * 2^(m - m') + sum_j 2^(t_ij - m')
    acc' = acc * 2^(m - m') + sum_j 2^(t_ij - m') v_j

and at the end ``out = acc / l`` and ``lse = m + log2(l)`` (the base-2 log-sum-exp, saved for the
backward pass, which recomputes ``p_ij = 2^(t_ij - lse_i)`` instead of storing it). ``m`` starts at a
large negative finite number rather than -inf, so that a row whose first tiles are all masked (a query
tile straddling a chunk boundary) never computes ``-inf - (-inf)``.

Tiles, and which are skipped
----------------------------
A prefill program owns BLOCK_M queries of one head and loops over tiles of BLOCK_N keys. For the query
tile whose real queries sit at positions ``first .. last``, only keys in

    [max(key_start, chunk(first)),  min(last + 1, key_start + Tk))      chunk(p) = (p // C) * C

can be visible (``chunk(p) = -inf`` on global layers): the key loop runs over the key tiles covering this
range and NO other tile is loaded. Inside it, a key tile is fully visible to every query of the tile, and
runs without a mask, iff all its keys lie in

    [max(key_start, chunk(last)),  min(first + 1, key_start + Tk))

so the loop is split in three: masked tiles at the start (the chunk start when C is not a multiple of
BLOCK_N, or every tile when the query tile straddles two chunks, which happens when BLOCK_M does not
divide C), unmasked tiles, and masked tiles at the end (the diagonal, and a partial last tile).
:func:`key_tile_bounds` is this arithmetic in Python and ``_key_tile_bounds`` the same in Triton; a test
checks that they agree, and :func:`visited_key_tiles` lists the tiles each query tile computes (a
notebook draws them).

Cost: on a global causal layer the tiles below the diagonal, ``~ T^2 / (2 BLOCK_M BLOCK_N)``. On a chunked
layer a query tile at offset r inside its chunk visits about ``(r + BLOCK_M) / BLOCK_N`` key tiles, so a
chunk costs ``~ C^2 / (2 BLOCK_M BLOCK_N)`` tiles and the sequence ``~ T C / (2 BLOCK_M BLOCK_N)``: linear
in T, where a dense mask would cost T^2. With C a multiple of both tiles and ``n = C / BLOCK`` (equal
tiles), prefill from position 0 visits ``(T / C) n (n + 1) / 2`` tiles, ``(T / C) n (n - 1) / 2`` of them
unmasked.

GQA and temperature
-------------------
Programs are indexed by (query tile, batch x query head); each reads the K/V of head ``h // group``
through strides, so neither K/V nor the (usually transposed, non-contiguous) q is copied or repeated.
On NoPE layers each q row is multiplied, in the prologue, by ``log(floor((pos + 1) / floor_scale) + 1)
* attn_scale + 1`` computed in float32 and cast back to q's dtype before the dot, as the eager code does;
the backward multiplies dq by the same factor.

Decode (Tq == 1): flash-decoding
--------------------------------
One query per head cannot fill a GPU tile by tile, so the visible key range is cut into splits of
``split_tiles`` key tiles; a program handles one (batch, KV head, split) for ALL ``group`` query heads
that share the KV head (they form the rows of its tile, padded to 16), so each K/V tile is read once for
the whole group. Each split writes its normalised partial output and its lse; a second kernel merges the
splits of each head: ``out = sum_s 2^(lse_s - M) o_s / sum_s 2^(lse_s - M)`` with ``M = max_s lse_s``.
Tq > 1 (prefill, or a chunk of tokens after a cache prefix, ``query_start > key_start``) uses the prefill
kernel.

Backward (FlashAttention-2)
---------------------------
``delta_i = sum_d out_id dout_id``; with ``p_ij = 2^(t_ij - lse_i)``: ``dv_j = sum_i p_ij dout_i``,
``ds_ij = p_ij (dout_i . v_j - delta_i)``, ``dq_i = D^-0.5 sum_j ds_ij k_j`` and
``dk_j = D^-0.5 sum_i ds_ij q_i``. One kernel owns a key tile and loops over the query tiles that can see
it (mirror of the forward's range: queries in ``[max(query_start, first_key), min(query_start + Tq,
chunk(last_key) + C))``) for every query head of its KV group, so GQA gradients are summed in registers;
another owns a query tile and loops over the same key tiles as the forward to accumulate dq.

``need_probs=True`` asks for the probabilities [B, H, Tq, Tk], which this kernel never forms: that call
falls back to the eager reference and returns its (out, probs).

Block sizes are ``tl.constexpr`` (:class:`Tiling`): the defaults suit head_dim 128 in 16-bit on Hopper;
tests in the interpreter use 16 x 16 tiles to exercise many tiles on small shapes. head_dim may be any
size: it is padded to a power of two >= 16 with a mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from l4lab import ops
from l4lab.kernels.matmul_precision import dot_precision, refuse_interpreted_bfloat16
from l4lab.ops import Temperature

LOG2E = math.log2(math.e)


# ---------------------------------------------------------------------- tile ranges (Python and Triton)
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def key_tile_bounds(
    first_query: int, last_query: int, key_start: int, num_keys: int, chunk_size: int | None, block_n: int
) -> tuple[int, int, int, int]:
    """Key tiles visited by queries at positions ``first_query .. last_query``: (lo, full_lo, full_hi, hi).

    Tiles ``[lo, hi)`` are loaded, ``[full_lo, full_hi)`` without a mask; tile t holds key indices
    ``t * block_n ...`` (positions ``key_start + t * block_n ...``). Mirrors ``_key_tile_bounds``.
    """
    lo, full_lo = key_start, key_start
    if chunk_size is not None:
        lo = max(lo, first_query // chunk_size * chunk_size)
        full_lo = max(full_lo, last_query // chunk_size * chunk_size)
    end = min(last_query + 1, key_start + num_keys)
    full_end = min(first_query + 1, key_start + num_keys)
    tile_lo = (lo - key_start) // block_n
    tile_hi = _cdiv(max(end - key_start, lo - key_start), block_n)
    tile_full_lo = min(max(_cdiv(full_lo - key_start, block_n), tile_lo), tile_hi)
    tile_full_hi = max(min(max(full_end - key_start, 0) // block_n, tile_hi), tile_full_lo)
    return tile_lo, tile_full_lo, tile_full_hi, tile_hi


def query_tile_bounds(
    first_key: int, last_key: int, query_start: int, num_queries: int, chunk_size: int | None, block_m: int
) -> tuple[int, int, int, int]:
    """Query tiles that can see keys at positions ``first_key .. last_key`` (the dK/dV loop of the backward).

    Same layout as :func:`key_tile_bounds`, roles swapped. Mirrors ``_query_tile_bounds``.
    """
    lo, full_lo = max(first_key, query_start), max(last_key, query_start)
    end = full_end = query_start + num_queries
    if chunk_size is not None:
        end = min(end, last_key // chunk_size * chunk_size + chunk_size)
        full_end = min(full_end, first_key // chunk_size * chunk_size + chunk_size)
    tile_lo = (lo - query_start) // block_m
    tile_hi = _cdiv(max(end - query_start, lo - query_start), block_m)
    tile_full_lo = min(max(_cdiv(full_lo - query_start, block_m), tile_lo), tile_hi)
    tile_full_hi = max(min(max(full_end - query_start, 0) // block_m, tile_hi), tile_full_lo)
    return tile_lo, tile_full_lo, tile_full_hi, tile_hi


def visited_key_tiles(
    query_start: int,
    num_queries: int,
    key_start: int,
    num_keys: int,
    chunk_size: int | None,
    block_m: int,
    block_n: int,
) -> list[tuple[list[int], list[int]]]:
    """For each query tile of the prefill kernel: (key tiles computed without a mask, key tiles masked).

    Every key tile not listed is skipped: never loaded.
    """
    tiles = []
    for first in range(0, num_queries, block_m):
        last = min(first + block_m, num_queries) - 1
        lo, full_lo, full_hi, hi = key_tile_bounds(
            query_start + first, query_start + last, key_start, num_keys, chunk_size, block_n
        )
        tiles.append((list(range(full_lo, full_hi)), [*range(lo, full_lo), *range(full_hi, hi)]))
    return tiles


@triton.jit
def _key_tile_bounds(
    first_query, last_query, key_start, num_keys, chunk_size, CHUNKED: tl.constexpr, BLOCK_N: tl.constexpr
):
    lo = key_start
    full_lo = key_start
    if CHUNKED:
        lo = tl.maximum(lo, first_query // chunk_size * chunk_size)
        full_lo = tl.maximum(full_lo, last_query // chunk_size * chunk_size)
    end = tl.minimum(last_query + 1, key_start + num_keys)
    full_end = tl.minimum(first_query + 1, key_start + num_keys)
    tile_lo = (lo - key_start) // BLOCK_N
    tile_hi = (tl.maximum(end - key_start, lo - key_start) + BLOCK_N - 1) // BLOCK_N
    tile_full_lo = tl.minimum(tl.maximum((full_lo - key_start + BLOCK_N - 1) // BLOCK_N, tile_lo), tile_hi)
    tile_full_hi = tl.maximum(
        tl.minimum(tl.maximum(full_end - key_start, 0) // BLOCK_N, tile_hi), tile_full_lo
    )
    return tile_lo, tile_full_lo, tile_full_hi, tile_hi


@triton.jit
def _query_tile_bounds(
    first_key, last_key, query_start, num_queries, chunk_size, CHUNKED: tl.constexpr, BLOCK_M: tl.constexpr
):
    lo = tl.maximum(first_key, query_start)
    full_lo = tl.maximum(last_key, query_start)
    end = query_start + num_queries
    full_end = query_start + num_queries
    if CHUNKED:
        end = tl.minimum(end, last_key // chunk_size * chunk_size + chunk_size)
        full_end = tl.minimum(full_end, first_key // chunk_size * chunk_size + chunk_size)
    tile_lo = (lo - query_start) // BLOCK_M
    tile_hi = (tl.maximum(end - query_start, lo - query_start) + BLOCK_M - 1) // BLOCK_M
    tile_full_lo = tl.minimum(tl.maximum((full_lo - query_start + BLOCK_M - 1) // BLOCK_M, tile_lo), tile_hi)
    tile_full_hi = tl.maximum(
        tl.minimum(tl.maximum(full_end - query_start, 0) // BLOCK_M, tile_hi), tile_full_lo
    )
    return tile_lo, tile_full_lo, tile_full_hi, tile_hi


# ---------------------------------------------------------------------- shared pieces of the kernels
@triton.jit
def _load_rows(ptrs, row_ok, d_ok, CHECK_ROWS: tl.constexpr, EVEN_D: tl.constexpr):
    """A [rows, BLOCK_D] tile; rows are checked only in masked (boundary) tiles, columns only if padded."""
    if CHECK_ROWS:
        x = tl.load(ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    elif EVEN_D:
        x = tl.load(ptrs)
    else:
        x = tl.load(ptrs, mask=d_ok[None, :], other=0.0)
    return x


@triton.jit
def _row_offsets(rows, stride):
    """``rows * stride`` as a column, in int64: a long sequence times its row stride overflows int32."""
    return rows.to(tl.int64)[:, None] * stride


@triton.jit
def _temperature(q_pos, floor_scale, attn_scale):
    """``log(floor((pos + 1) / floor_scale) + 1) * attn_scale + 1`` in float32, rounded as eager rounds it."""
    steps = tl.floor(tl.math.div_rn(q_pos.to(tl.float32) + 1.0, floor_scale))
    return tl.log(steps + 1.0) * attn_scale + 1.0


@triton.jit
def _visible(q_pos, k_pos, chunk_size, CHUNKED: tl.constexpr):
    """Causal (and same-chunk) visibility of positions broadcast against each other."""
    visible = k_pos <= q_pos
    if CHUNKED:
        visible = visible & (k_pos // chunk_size == q_pos // chunk_size)
    return visible


@triton.jit
def _attend_key_tiles(
    acc,
    m_i,
    l_i,
    q,
    q_pos,
    k_base,
    v_base,
    stride_kn,
    stride_vn,
    offs_d,
    d_ok,
    key_start,
    num_keys,
    chunk_size,
    qk_scale,
    tile_lo,
    tile_hi,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    CHUNKED: tl.constexpr,
    EVEN_D: tl.constexpr,
):
    """Online softmax over key tiles ``[tile_lo, tile_hi)``; MASKED tiles apply visibility and bounds."""
    for tile in range(tile_lo, tile_hi):
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        key_ok = offs_n < num_keys
        k = _load_rows(
            k_base + _row_offsets(offs_n, stride_kn) + offs_d[None, :], key_ok, d_ok, MASKED, EVEN_D
        )
        qk = tl.dot(q, tl.trans(k)) * qk_scale
        if MASKED:
            visible = (
                _visible(q_pos[:, None], key_start + offs_n[None, :], chunk_size, CHUNKED) & key_ok[None, :]
            )
            qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_rows(
            v_base + _row_offsets(offs_n, stride_vn) + offs_d[None, :], key_ok, d_ok, MASKED, EVEN_D
        )
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _attend_three_parts(
    acc,
    m_i,
    l_i,
    q,
    q_pos,
    k_base,
    v_base,
    stride_kn,
    stride_vn,
    offs_d,
    d_ok,
    key_start,
    num_keys,
    chunk_size,
    qk_scale,
    tile_lo,
    full_lo,
    full_hi,
    tile_hi,
    BLOCK_N: tl.constexpr,
    CHUNKED: tl.constexpr,
    EVEN_D: tl.constexpr,
):
    """Masked tiles before ``full_lo``, unmasked tiles up to ``full_hi``, masked tiles after."""
    acc, m_i, l_i = _attend_key_tiles(
        acc, m_i, l_i, q, q_pos, k_base, v_base, stride_kn, stride_vn, offs_d, d_ok, key_start, num_keys,
        chunk_size, qk_scale, tile_lo, full_lo, BLOCK_N, True, CHUNKED, EVEN_D,
    )  # fmt: skip
    acc, m_i, l_i = _attend_key_tiles(
        acc, m_i, l_i, q, q_pos, k_base, v_base, stride_kn, stride_vn, offs_d, d_ok, key_start, num_keys,
        chunk_size, qk_scale, full_lo, full_hi, BLOCK_N, False, CHUNKED, EVEN_D,
    )  # fmt: skip
    acc, m_i, l_i = _attend_key_tiles(
        acc, m_i, l_i, q, q_pos, k_base, v_base, stride_kn, stride_vn, offs_d, d_ok, key_start, num_keys,
        chunk_size, qk_scale, full_hi, tile_hi, BLOCK_N, True, CHUNKED, EVEN_D,
    )  # fmt: skip
    return acc, m_i, l_i


# ---------------------------------------------------------------------- forward: prefill
@triton.jit
def _prefill_kernel(
    Q, K, V, O, LSE,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    num_heads, num_queries, num_keys, query_start, key_start, chunk_size, group,
    qk_scale, floor_scale, attn_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CHUNKED: tl.constexpr, TEMPERATURE: tl.constexpr,
):  # fmt: skip
    # the last query tiles see the most keys on causal layers: launch them first
    tile_m = tl.num_programs(0) - 1 - tl.program_id(0)
    batch_head = tl.program_id(1)
    b = (batch_head // num_heads).to(tl.int64)
    h = (batch_head % num_heads).to(tl.int64)
    kv_head = h // group
    EVEN_D: tl.constexpr = BLOCK_D == HEAD_DIM

    offs_m = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < num_queries
    d_ok = offs_d < HEAD_DIM
    q_pos = query_start + offs_m
    q = _load_rows(Q + b * stride_qb + h * stride_qh + _row_offsets(offs_m, stride_qm) + offs_d[None, :],
                   row_ok, d_ok, True, EVEN_D)  # fmt: skip
    if TEMPERATURE:
        q = (q.to(tl.float32) * _temperature(q_pos, floor_scale, attn_scale)[:, None]).to(q.dtype)

    first_query = query_start + tile_m * BLOCK_M
    last_query = query_start + tl.minimum(tile_m * BLOCK_M + BLOCK_M, num_queries) - 1
    tile_lo, full_lo, full_hi, tile_hi = _key_tile_bounds(
        first_query, last_query, key_start, num_keys, chunk_size, CHUNKED, BLOCK_N
    )
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    k_base = K + b * stride_kb + kv_head * stride_kh
    v_base = V + b * stride_vb + kv_head * stride_vh
    acc, m_i, l_i = _attend_three_parts(
        acc, m_i, l_i, q, q_pos, k_base, v_base, stride_kn, stride_vn, offs_d, d_ok,
        key_start, num_keys, chunk_size, qk_scale,
        tile_lo, full_lo, full_hi, tile_hi, BLOCK_N, CHUNKED, EVEN_D,
    )  # fmt: skip

    l_i = tl.where(row_ok, l_i, 1.0)  # padding rows past a chunk boundary may see no key at all
    out = acc / l_i[:, None]
    o_ptrs = O + b * stride_ob + h * stride_oh + _row_offsets(offs_m, stride_om) + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + batch_head.to(tl.int64) * num_queries + offs_m, m_i + tl.math.log2(l_i), mask=row_ok)


# ---------------------------------------------------------------------- forward: decode (split-K)
@triton.jit
def _decode_split_kernel(
    Q, K, V, PART_O, PART_LSE,
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    num_kv_heads, num_keys, query_start, key_start, chunk_size, group, split_tiles,
    qk_scale, floor_scale, attn_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    CHUNKED: tl.constexpr, TEMPERATURE: tl.constexpr,
):  # fmt: skip
    batch_kv = tl.program_id(0)
    split = tl.program_id(1)
    b = (batch_kv // num_kv_heads).to(tl.int64)
    kv_head = (batch_kv % num_kv_heads).to(tl.int64)
    EVEN_D: tl.constexpr = BLOCK_D == HEAD_DIM

    # the rows of the tile are the query heads sharing this KV head
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    head_ok = offs_h < group
    d_ok = offs_d < HEAD_DIM
    heads = kv_head * group + offs_h
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=head_ok[:, None] & d_ok[None, :], other=0.0)  # fmt: skip
    q_pos = tl.zeros([BLOCK_H], dtype=tl.int32) + query_start
    if TEMPERATURE:
        q = (q.to(tl.float32) * _temperature(q_pos, floor_scale, attn_scale)[:, None]).to(q.dtype)

    tile_lo, full_lo, full_hi, tile_hi = _key_tile_bounds(
        query_start, query_start, key_start, num_keys, chunk_size, CHUNKED, BLOCK_N
    )
    split_lo = tile_lo + split * split_tiles
    split_hi = tl.minimum(split_lo + split_tiles, tile_hi)
    full_lo = tl.minimum(tl.maximum(full_lo, split_lo), split_hi)
    full_hi = tl.maximum(tl.minimum(full_hi, split_hi), full_lo)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_H], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    k_base = K + b * stride_kb + kv_head * stride_kh
    v_base = V + b * stride_vb + kv_head * stride_vh
    acc, m_i, l_i = _attend_three_parts(
        acc, m_i, l_i, q, q_pos, k_base, v_base, stride_kn, stride_vn, offs_d, d_ok,
        key_start, num_keys, chunk_size, qk_scale,
        split_lo, full_lo, full_hi, split_hi, BLOCK_N, CHUNKED, EVEN_D,
    )  # fmt: skip

    # partials [B * H, splits, BLOCK_D] and [B * H, splits]
    rows = (b * num_kv_heads * group + heads) * tl.num_programs(1) + split
    tl.store(PART_O + rows[:, None] * BLOCK_D + offs_d[None, :], acc / l_i[:, None], mask=head_ok[:, None])
    tl.store(PART_LSE + rows, m_i + tl.math.log2(l_i), mask=head_ok)


@triton.jit
def _decode_merge_kernel(
    PART_O, PART_LSE, O, LSE,
    stride_ob, stride_oh,
    num_heads, num_splits,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    batch_head = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    split_ok = offs_s < num_splits
    rows = batch_head * num_splits + offs_s
    lse = tl.load(PART_LSE + rows, mask=split_ok, other=float("-inf"))
    top = tl.max(lse, 0)
    weight = tl.math.exp2(lse - top)
    parts = tl.load(PART_O + rows[:, None] * BLOCK_D + offs_d[None, :], mask=split_ok[:, None], other=0.0)
    total = tl.sum(weight, 0)
    out = tl.sum(parts * weight[:, None], 0) / total
    b = batch_head // num_heads
    h = batch_head % num_heads
    tl.store(O + b * stride_ob + h * stride_oh + offs_d, out.to(O.dtype.element_ty), mask=offs_d < HEAD_DIM)
    tl.store(LSE + batch_head, top + tl.math.log2(total))


# ---------------------------------------------------------------------- backward
@triton.jit
def _delta_kernel(
    O, DO, DELTA,
    stride_ob, stride_oh, stride_om,
    stride_dob, stride_doh, stride_dom,
    num_heads, num_queries,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """``delta_i = sum_d out_id * dout_id``, float32 [B * H, Tq]."""
    batch_head = tl.program_id(1)
    b = (batch_head // num_heads).to(tl.int64)
    h = (batch_head % num_heads).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < num_queries
    mask = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    out = tl.load(
        O + b * stride_ob + h * stride_oh + _row_offsets(offs_m, stride_om) + offs_d[None, :], mask=mask
    )
    dout = tl.load(
        DO + b * stride_dob + h * stride_doh + _row_offsets(offs_m, stride_dom) + offs_d[None, :], mask=mask
    )
    delta = tl.sum(out.to(tl.float32) * dout.to(tl.float32), 1)
    tl.store(DELTA + batch_head.to(tl.int64) * num_queries + offs_m, delta, mask=row_ok)


@triton.jit
def _dkdv_query_tiles(
    dk,
    dv,
    k,
    v,
    k_pos,
    q_base,
    do_base,
    lse_base,
    delta_base,
    stride_qm,
    stride_dom,
    offs_d,
    d_ok,
    num_queries,
    query_start,
    chunk_size,
    qk_scale,
    floor_scale,
    attn_scale,
    tile_lo,
    tile_hi,
    BLOCK_M: tl.constexpr,
    MASKED: tl.constexpr,
    CHUNKED: tl.constexpr,
    TEMPERATURE: tl.constexpr,
    EVEN_D: tl.constexpr,
):
    """Add to dK, dV [BLOCK_N, BLOCK_D] the contributions of query tiles ``[tile_lo, tile_hi)``.

    Query rows past Tq load as zeros (q, dout, lse, delta): their p is finite and their terms vanish.
    """
    for tile in range(tile_lo, tile_hi):
        offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = offs_m < num_queries
        q_pos = query_start + offs_m
        q = _load_rows(
            q_base + _row_offsets(offs_m, stride_qm) + offs_d[None, :], row_ok, d_ok, MASKED, EVEN_D
        )
        if TEMPERATURE:
            q = (q.to(tl.float32) * _temperature(q_pos, floor_scale, attn_scale)[:, None]).to(q.dtype)
        dout = _load_rows(
            do_base + _row_offsets(offs_m, stride_dom) + offs_d[None, :], row_ok, d_ok, MASKED, EVEN_D
        )
        if MASKED:
            lse = tl.load(lse_base + offs_m, mask=row_ok, other=0.0)
            delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
        else:
            lse = tl.load(lse_base + offs_m)
            delta = tl.load(delta_base + offs_m)
        p_t = tl.math.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse[None, :])  # [BLOCK_N, BLOCK_M]
        if MASKED:
            p_t = tl.where(_visible(q_pos[None, :], k_pos[:, None], chunk_size, CHUNKED), p_t, 0.0)
        dv = tl.dot(p_t.to(dout.dtype), dout, dv)
        ds_t = p_t * (tl.dot(v, tl.trans(dout)) - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk)
    return dk, dv


@triton.jit
def _dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    num_kv_heads, num_queries, num_keys, query_start, key_start, chunk_size, group,
    qk_scale, sm_scale, floor_scale, attn_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CHUNKED: tl.constexpr, TEMPERATURE: tl.constexpr,
):  # fmt: skip
    tile_n = tl.program_id(0)
    batch_kv = tl.program_id(1)
    b = (batch_kv // num_kv_heads).to(tl.int64)
    kv_head = (batch_kv % num_kv_heads).to(tl.int64)
    EVEN_D: tl.constexpr = BLOCK_D == HEAD_DIM

    offs_n = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    key_ok = offs_n < num_keys
    d_ok = offs_d < HEAD_DIM
    k_pos = key_start + offs_n
    k_ptrs = K + b * stride_kb + kv_head * stride_kh + _row_offsets(offs_n, stride_kn) + offs_d[None, :]
    v_ptrs = V + b * stride_vb + kv_head * stride_vh + _row_offsets(offs_n, stride_vn) + offs_d[None, :]
    k = _load_rows(k_ptrs, key_ok, d_ok, True, EVEN_D)
    v = _load_rows(v_ptrs, key_ok, d_ok, True, EVEN_D)

    first_key = key_start + tile_n * BLOCK_N
    last_key = key_start + tl.minimum(tile_n * BLOCK_N + BLOCK_N, num_keys) - 1
    tile_lo, full_lo, full_hi, tile_hi = _query_tile_bounds(
        first_key, last_key, query_start, num_queries, chunk_size, CHUNKED, BLOCK_M
    )
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for g in range(group):  # every query head of the KV group adds to the same dK, dV
        h = kv_head * group + g
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        row = ((b * num_kv_heads * group) + h) * num_queries
        dk, dv = _dkdv_query_tiles(
            dk, dv, k, v, k_pos, q_base, do_base, LSE + row, DELTA + row, stride_qm, stride_dom, offs_d, d_ok,
            num_queries, query_start, chunk_size, qk_scale, floor_scale, attn_scale,
            tile_lo, full_lo, BLOCK_M, True, CHUNKED, TEMPERATURE, EVEN_D,
        )  # fmt: skip
        dk, dv = _dkdv_query_tiles(
            dk, dv, k, v, k_pos, q_base, do_base, LSE + row, DELTA + row, stride_qm, stride_dom, offs_d, d_ok,
            num_queries, query_start, chunk_size, qk_scale, floor_scale, attn_scale,
            full_lo, full_hi, BLOCK_M, False, CHUNKED, TEMPERATURE, EVEN_D,
        )  # fmt: skip
        dk, dv = _dkdv_query_tiles(
            dk, dv, k, v, k_pos, q_base, do_base, LSE + row, DELTA + row, stride_qm, stride_dom, offs_d, d_ok,
            num_queries, query_start, chunk_size, qk_scale, floor_scale, attn_scale,
            full_hi, tile_hi, BLOCK_M, True, CHUNKED, TEMPERATURE, EVEN_D,
        )  # fmt: skip

    mask = key_ok[:, None] & d_ok[None, :]
    dk_ptrs = DK + b * stride_dkb + kv_head * stride_dkh + _row_offsets(offs_n, stride_dkn) + offs_d[None, :]
    dv_ptrs = DV + b * stride_dvb + kv_head * stride_dvh + _row_offsets(offs_n, stride_dvn) + offs_d[None, :]
    tl.store(dk_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=mask)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=mask)


@triton.jit
def _dq_key_tiles(
    dq,
    q,
    dout,
    lse,
    delta,
    q_pos,
    k_base,
    v_base,
    stride_kn,
    stride_vn,
    offs_d,
    d_ok,
    key_start,
    num_keys,
    chunk_size,
    qk_scale,
    tile_lo,
    tile_hi,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    CHUNKED: tl.constexpr,
    EVEN_D: tl.constexpr,
):
    """Add to dQ [BLOCK_M, BLOCK_D] (before the D^-0.5 factor) the key tiles ``[tile_lo, tile_hi)``."""
    for tile in range(tile_lo, tile_hi):
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        key_ok = offs_n < num_keys
        k = _load_rows(
            k_base + _row_offsets(offs_n, stride_kn) + offs_d[None, :], key_ok, d_ok, MASKED, EVEN_D
        )
        v = _load_rows(
            v_base + _row_offsets(offs_n, stride_vn) + offs_d[None, :], key_ok, d_ok, MASKED, EVEN_D
        )
        p = tl.math.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse[:, None])
        if MASKED:
            visible = (
                _visible(q_pos[:, None], key_start + offs_n[None, :], chunk_size, CHUNKED) & key_ok[None, :]
            )
            p = tl.where(visible, p, 0.0)
        ds = p * (tl.dot(dout, tl.trans(v)) - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq)
    return dq


@triton.jit
def _dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_dqb, stride_dqh, stride_dqm,
    num_heads, num_queries, num_keys, query_start, key_start, chunk_size, group,
    qk_scale, sm_scale, floor_scale, attn_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CHUNKED: tl.constexpr, TEMPERATURE: tl.constexpr,
):  # fmt: skip
    tile_m = tl.num_programs(0) - 1 - tl.program_id(0)
    batch_head = tl.program_id(1)
    b = (batch_head // num_heads).to(tl.int64)
    h = (batch_head % num_heads).to(tl.int64)
    kv_head = h // group
    EVEN_D: tl.constexpr = BLOCK_D == HEAD_DIM

    offs_m = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < num_queries
    d_ok = offs_d < HEAD_DIM
    q_pos = query_start + offs_m
    q = _load_rows(Q + b * stride_qb + h * stride_qh + _row_offsets(offs_m, stride_qm) + offs_d[None, :],
                   row_ok, d_ok, True, EVEN_D)  # fmt: skip
    scale = tl.zeros([BLOCK_M], dtype=tl.float32) + sm_scale
    if TEMPERATURE:
        temperature = _temperature(q_pos, floor_scale, attn_scale)
        q = (q.to(tl.float32) * temperature[:, None]).to(q.dtype)
        scale = scale * temperature  # d(q * t)/dq = t
    do_ptrs = DO + b * stride_dob + h * stride_doh + _row_offsets(offs_m, stride_dom) + offs_d[None, :]
    dout = _load_rows(do_ptrs, row_ok, d_ok, True, EVEN_D)
    row = batch_head.to(tl.int64) * num_queries + offs_m
    lse = tl.load(LSE + row, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + row, mask=row_ok, other=0.0)

    first_query = query_start + tile_m * BLOCK_M
    last_query = query_start + tl.minimum(tile_m * BLOCK_M + BLOCK_M, num_queries) - 1
    tile_lo, full_lo, full_hi, tile_hi = _key_tile_bounds(
        first_query, last_query, key_start, num_keys, chunk_size, CHUNKED, BLOCK_N
    )
    k_base = K + b * stride_kb + kv_head * stride_kh
    v_base = V + b * stride_vb + kv_head * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = _dq_key_tiles(dq, q, dout, lse, delta, q_pos, k_base, v_base, stride_kn, stride_vn, offs_d, d_ok,
                       key_start, num_keys, chunk_size, qk_scale, tile_lo, full_lo,
                       BLOCK_N, True, CHUNKED, EVEN_D)  # fmt: skip
    dq = _dq_key_tiles(dq, q, dout, lse, delta, q_pos, k_base, v_base, stride_kn, stride_vn, offs_d, d_ok,
                       key_start, num_keys, chunk_size, qk_scale, full_lo, full_hi,
                       BLOCK_N, False, CHUNKED, EVEN_D)  # fmt: skip
    dq = _dq_key_tiles(dq, q, dout, lse, delta, q_pos, k_base, v_base, stride_kn, stride_vn, offs_d, d_ok,
                       key_start, num_keys, chunk_size, qk_scale, full_hi, tile_hi,
                       BLOCK_N, True, CHUNKED, EVEN_D)  # fmt: skip
    dq_ptrs = DQ + b * stride_dqb + h * stride_dqh + _row_offsets(offs_m, stride_dqm) + offs_d[None, :]
    tl.store(dq_ptrs, (dq * scale[:, None]).to(DQ.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


# ---------------------------------------------------------------------- launchers
@dataclass(frozen=True)
class Tiling:
    """Block sizes and launch settings; the defaults suit head_dim 128 in 16-bit on an H100.

    ``split_tiles``: key tiles per decode split (None: enough splits for about two programs per SM).
    """

    block_m: int = 128
    block_n: int = 64
    num_warps: int = 8
    num_stages: int = 3
    decode_warps: int = 4
    split_tiles: int | None = None
    bwd_block_m: int = 64
    bwd_block_n: int = 64
    bwd_warps: int = 8
    bwd_stages: int = 2


def default_tiling(dtype: torch.dtype, head_dim: int) -> Tiling:
    """Smaller tiles where 16-bit 128-wide tiles would not fit in shared memory (float32, head_dim > 128)."""
    if dtype == torch.float32 or head_dim > 128:
        return Tiling(
            block_m=64, block_n=32, num_warps=4, num_stages=2, bwd_block_m=32, bwd_block_n=32, bwd_warps=4
        )
    return Tiling()


@dataclass(frozen=True)
class _Problem:
    """Everything about one call that is not a tensor."""

    query_start: int
    key_start: int
    chunk_size: int | None
    temperature: Temperature | None
    tiling: Tiling

    def scalars(self, head_dim: int) -> dict[str, object]:
        return dict(
            query_start=self.query_start,
            key_start=self.key_start,
            chunk_size=self.chunk_size or 0,
            qk_scale=head_dim**-0.5 * LOG2E,
            floor_scale=float(self.temperature.floor_scale) if self.temperature else 1.0,  # configs hold ints
            attn_scale=float(self.temperature.attn_scale) if self.temperature else 0.0,
            HEAD_DIM=head_dim,
            BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
            CHUNKED=self.chunk_size is not None,
            TEMPERATURE=self.temperature is not None,
        )


def _unit_stride(x: Tensor) -> Tensor:
    """The kernels read head_dim with stride 1 (true of transposed [B, T, H, D] tensors): copy otherwise."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _decode_split_tiles(num_tiles: int, programs: int, device: torch.device) -> int:
    """Key tiles per split: enough splits that the GPU runs about two programs per multiprocessor."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    splits = max(1, min(num_tiles, _cdiv(2 * sms, programs)))
    return max(1, _cdiv(num_tiles, splits))


def _forward(q: Tensor, k: Tensor, v: Tensor, problem: _Problem) -> tuple[Tensor, Tensor]:
    """(out [B, H, Tq, D] in q's dtype, laid out [B, Tq, H, D] in memory; lse [B, H, Tq] float32)."""
    batch, heads, num_queries, head_dim = q.shape
    kv_heads, num_keys = k.shape[1], k.shape[2]
    tiling = problem.tiling
    scalars = problem.scalars(head_dim)
    # [B, Tq, H, D] in memory: the model's next step (transpose, reshape to [B, Tq, H * D]) is then free
    out = q.new_empty(batch, num_queries, heads, head_dim).transpose(1, 2)
    lse = torch.empty(batch, heads, num_queries, device=q.device, dtype=torch.float32)
    if out.numel() == 0:
        return out, lse

    if num_queries > 1:
        grid = (triton.cdiv(num_queries, tiling.block_m), batch * heads)
        _prefill_kernel[grid](
            q, k, v, out, lse, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
            heads, num_queries, num_keys, group=heads // kv_heads, BLOCK_M=tiling.block_m,
            BLOCK_N=tiling.block_n, num_warps=tiling.num_warps, num_stages=tiling.num_stages, **scalars,
            **dot_precision(q.dtype),
        )  # fmt: skip
        return out, lse

    lo, _, _, hi = key_tile_bounds(
        problem.query_start,
        problem.query_start,
        problem.key_start,
        num_keys,
        problem.chunk_size,
        tiling.block_n,
    )
    split_tiles = tiling.split_tiles or _decode_split_tiles(hi - lo, batch * kv_heads, q.device)
    num_splits = max(1, _cdiv(hi - lo, split_tiles))
    block_d = scalars["BLOCK_D"]
    part_out = torch.empty(batch * heads, num_splits, block_d, device=q.device, dtype=torch.float32)
    part_lse = torch.empty(batch * heads, num_splits, device=q.device, dtype=torch.float32)
    group = heads // kv_heads
    _decode_split_kernel[(batch * kv_heads, num_splits)](
        q, k, v, part_out, part_lse, *q.stride()[:2], *k.stride()[:3], *v.stride()[:3],
        kv_heads, num_keys, group=group, split_tiles=split_tiles,
        BLOCK_H=max(16, triton.next_power_of_2(group)), BLOCK_N=tiling.block_n,
        num_warps=tiling.decode_warps, num_stages=tiling.num_stages, **scalars, **dot_precision(q.dtype),
    )  # fmt: skip
    _decode_merge_kernel[(batch * heads,)](
        part_out, part_lse, out, lse, *out.stride()[:2], heads, num_splits, HEAD_DIM=head_dim,
        BLOCK_D=block_d, BLOCK_S=triton.next_power_of_2(num_splits), num_warps=tiling.decode_warps,
    )  # fmt: skip
    return out, lse


def _backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, problem: _Problem
) -> tuple[Tensor, Tensor, Tensor]:
    batch, heads, num_queries, head_dim = q.shape
    kv_heads, num_keys = k.shape[1], k.shape[2]
    tiling = problem.tiling
    scalars = problem.scalars(head_dim)
    dout = _unit_stride(dout)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    delta = torch.empty_like(lse)
    if dq.numel() == 0 or dk.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    block_m, block_n = tiling.bwd_block_m, tiling.bwd_block_n
    launch = dict(
        group=heads // kv_heads, sm_scale=head_dim**-0.5, BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=tiling.bwd_warps, num_stages=tiling.bwd_stages, **scalars, **dot_precision(q.dtype),
    )  # fmt: skip

    _delta_kernel[(triton.cdiv(num_queries, block_m), batch * heads)](
        out, dout, delta, *out.stride()[:3], *dout.stride()[:3], heads, num_queries,
        HEAD_DIM=head_dim, BLOCK_D=scalars["BLOCK_D"], BLOCK_M=block_m,
    )  # fmt: skip
    _dkdv_kernel[(triton.cdiv(num_keys, block_n), batch * kv_heads)](
        q, k, v, dout, lse, delta, dk, dv, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
        *dout.stride()[:3], *dk.stride()[:3], *dv.stride()[:3], kv_heads, num_queries, num_keys,
        **launch,
    )  # fmt: skip
    _dq_kernel[(triton.cdiv(num_queries, block_m), batch * heads)](
        q, k, v, dout, lse, delta, dq, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
        *dout.stride()[:3], *dq.stride()[:3], heads, num_queries, num_keys,
        **launch,
    )  # fmt: skip
    return dq, dk, dv


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, problem: _Problem) -> Tensor:  # type: ignore[override]
        q, k, v = _unit_stride(q), _unit_stride(k), _unit_stride(v)
        out, lse = _forward(q, k, v, problem)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.problem = problem
        return out

    @staticmethod
    def backward(ctx, dout: Tensor) -> tuple[Tensor, Tensor, Tensor, None]:  # type: ignore[override]
        q, k, v, out, lse = ctx.saved_tensors
        return (*_backward(dout, q, k, v, out, lse, ctx.problem), None)


def flash_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    query_start: int,
    key_start: int,
    chunk_size: int | None,
    temperature: Temperature | None,
    tiling: Tiling | None = None,
) -> Tensor:
    """The attention output [B, H, Tq, D] in q's dtype, differentiable; ``tiling`` overrides the blocks."""
    refuse_interpreted_bfloat16(q, "attention")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads cannot share {k.shape[1]} key/value heads evenly")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    problem = _Problem(
        query_start, key_start, chunk_size, temperature, tiling or default_tiling(q.dtype, q.shape[-1])
    )
    return _FlashAttention.apply(q, k, v, problem)


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
    """:func:`l4lab.ops.attention` as a flash kernel: (out [B, H, Tq, D], None).

    With ``need_probs`` the probabilities are wanted, which a flash kernel never forms: the eager
    reference computes both and its (out, probs) is returned. A sliding ``window`` is refused: the
    kernel's tile skipping knows causal and chunked masks only.
    """
    if window is not None:
        raise NotImplementedError(
            f"the fused attention kernel has no sliding window (window = {window}); use backend='eager'"
        )
    if need_probs:
        return ops.attention(q, k, v, query_start, key_start, chunk_size, temperature, need_probs=True)
    return flash_attention(q, k, v, query_start, key_start, chunk_size, temperature), None
