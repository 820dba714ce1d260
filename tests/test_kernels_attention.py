"""The flash attention kernel against the eager reference: prefill, cache prefix, decode, backward, tiles.

Outputs and gradients are checked with :func:`kernel_testing.assert_matches` (the fused op in the test
dtype against the eager op in the same dtype and in float64). In Triton's interpreter the tiles are
16 x 16 so that small shapes cross many tiles, chunk boundaries and partial tiles. The tile ranges the
kernels loop over are checked three ways: the Triton helpers agree with their Python mirrors, the
visited tiles cover every visible (query, key) pair and the unmasked ones hold no hidden pair, and on
chunked layers their number grows like T x C.
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_testing import DEVICE, DTYPES, assert_matches
from torch import Tensor

from l4lab import ops
from l4lab.cache import LayerCache
from l4lab.kernels.attention import (
    Tiling,
    _key_tile_bounds,
    _query_tile_bounds,
    attention,
    flash_attention,
    key_tile_bounds,
    query_tile_bounds,
    visited_key_tiles,
)
from l4lab.ops import Temperature, visibility_mask

SMALL = Tiling(block_m=16, block_n=16, split_tiles=1, bwd_block_m=16, bwd_block_n=16)
TEMPERATURE = Temperature(floor_scale=4, attn_scale=0.5)  # an int, as configs give it


def heads_last(batch: int, length: int, heads: int, dim: int, dtype: torch.dtype, seed: int) -> Tensor:
    """[B, heads, T, D] as the model makes it: a transpose of [B, T, heads, D] (not contiguous)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, length, heads, dim, generator=generator).to(DEVICE, dtype).transpose(1, 2)


def qkv(batch, heads, kv_heads, num_queries, num_keys, dim, dtype, seed=0) -> tuple[Tensor, Tensor, Tensor]:
    return (
        heads_last(batch, num_queries, heads, dim, dtype, seed),
        heads_last(batch, num_keys, kv_heads, dim, dtype, seed + 1),
        heads_last(batch, num_keys, kv_heads, dim, dtype, seed + 2),
    )


def check(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    query_start: int,
    key_start: int,
    chunk_size: int | None,
    temperature: Temperature | None,
    tiling: Tiling | None = SMALL,
    grad: bool = False,
) -> None:
    """The output (and, with ``grad``, dq, dk, dv) of the kernel against eager and float64 eager."""
    args = (query_start, key_start, chunk_size, temperature)
    leaves = {
        name: [x.detach().to(dtype).requires_grad_(grad) for x in (q, k, v)]
        for name, dtype in (("fused", q.dtype), ("eager", q.dtype), ("exact", torch.float64))
    }
    outs = {
        "fused": flash_attention(*leaves["fused"], *args, tiling),
        "eager": ops.attention(*leaves["eager"], *args, need_probs=False)[0],
        "exact": ops.attention(*leaves["exact"], *args, need_probs=False)[0],
    }
    assert_matches(*(out.detach() for out in outs.values()), "out")
    if not grad:
        return
    dout = torch.randn(outs["exact"].shape, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    for out in outs.values():
        out.backward(dout.to(out.dtype))
    for i, name in enumerate(("dq", "dk", "dv")):
        assert_matches(*(leaves[key][i].grad for key in ("fused", "eager", "exact")), name)


# ---------------------------------------------------------------------- which tiles are visited
@triton.jit
def _bounds_kernel(PARAMS, OUT, CHUNKED: tl.constexpr, BLOCK: tl.constexpr):
    params = PARAMS + tl.program_id(0) * 5
    first, last, start = tl.load(params), tl.load(params + 1), tl.load(params + 2)
    count, chunk = tl.load(params + 3), tl.load(params + 4)
    out = OUT + tl.program_id(0) * 8
    lo, full_lo, full_hi, hi = _key_tile_bounds(first, last, start, count, chunk, CHUNKED, BLOCK)
    tl.store(out, lo)
    tl.store(out + 1, full_lo)
    tl.store(out + 2, full_hi)
    tl.store(out + 3, hi)
    lo, full_lo, full_hi, hi = _query_tile_bounds(first, last, start, count, chunk, CHUNKED, BLOCK)
    tl.store(out + 4, lo)
    tl.store(out + 5, full_lo)
    tl.store(out + 6, full_hi)
    tl.store(out + 7, hi)


@pytest.mark.parametrize("chunked", [False, True])
def test_triton_tile_bounds_equal_the_python_mirror(chunked: bool) -> None:
    generator = torch.Generator().manual_seed(int(chunked))
    rows = 200
    start = torch.randint(0, 50, (rows,), generator=generator)
    first = start + torch.randint(-10, 60, (rows,), generator=generator)
    first = first.clamp(min=0)
    last = first + torch.randint(0, 40, (rows,), generator=generator)
    count = torch.randint(1, 80, (rows,), generator=generator)
    chunk = torch.randint(1, 64, (rows,), generator=generator)
    params = torch.stack([first, last, start, count, chunk], dim=1).to(torch.int32)
    out = torch.empty(rows, 8, dtype=torch.int32, device=DEVICE)
    _bounds_kernel[(rows,)](params.to(DEVICE), out, CHUNKED=chunked, BLOCK=16)
    for row, got in zip(params.tolist(), out.cpu().tolist(), strict=True):
        first_, last_, start_, count_, chunk_ = row
        chunk_size = chunk_ if chunked else None
        expected = key_tile_bounds(first_, last_, start_, count_, chunk_size, 16)
        expected += query_tile_bounds(first_, last_, start_, count_, chunk_size, 16)
        assert tuple(got) == expected, row


@pytest.mark.parametrize(
    ("query_start", "num_queries", "key_start", "chunk_size"),
    [(0, 70, 0, None), (0, 70, 0, 5), (0, 70, 0, 12), (0, 64, 0, 16), (0, 90, 0, 40), (13, 30, 0, None),
     (21, 30, 16, 8), (27, 9, 24, 12), (50, 1, 48, 8), (50, 1, 0, None)],
)  # fmt: skip
@pytest.mark.parametrize(("block_m", "block_n"), [(16, 16), (32, 16), (16, 8)])
def test_visited_tiles_hold_every_visible_pair_and_no_hidden_tile(
    query_start: int, num_queries: int, key_start: int, chunk_size: int | None, block_m: int, block_n: int
) -> None:
    num_keys = query_start + num_queries - key_start
    visible = visibility_mask(query_start, num_queries, key_start, num_keys, chunk_size)
    padded = torch.zeros(num_queries + block_m, num_keys + block_n, dtype=torch.bool)
    padded[:num_queries, :num_keys] = visible
    for tile_m, (full, masked) in enumerate(visited_key_tiles(
        query_start, num_queries, key_start, num_keys, chunk_size, block_m, block_n
    )):  # fmt: skip
        rows = slice(tile_m * block_m, min(tile_m * block_m + block_m, num_queries))
        visited = torch.zeros(num_keys + block_n, dtype=torch.bool)
        for tile in full:
            assert visible[rows, tile * block_n : tile * block_n + block_n].all()
            assert tile * block_n + block_n <= num_keys
        for tile in full + masked:
            assert visible[rows, tile * block_n : tile * block_n + block_n].any(), "a hidden tile was loaded"
            visited[tile * block_n : tile * block_n + block_n] = True
        assert not (padded[rows] & ~visited).any(), "a visible key was skipped"
        assert sorted(full + masked) == list(range(min(full + masked, default=0), max(full + masked) + 1))

    # the backward's query tiles per key tile: the same property, transposed
    for tile_n in range(triton.cdiv(num_keys, block_n)):
        keys = slice(tile_n * block_n, min(tile_n * block_n + block_n, num_keys))
        lo, full_lo, full_hi, hi = query_tile_bounds(
            key_start + keys.start, key_start + keys.stop - 1, query_start, num_queries, chunk_size, block_m
        )
        assert visible[full_lo * block_m : full_hi * block_m, keys].all()
        assert full_hi == full_lo or full_hi * block_m <= num_queries
        assert not padded[: lo * block_m, keys].any() and not padded[hi * block_m :, keys].any()
        for tile in range(lo, hi):
            assert visible[tile * block_m : tile * block_m + block_m, keys].any(), "a hidden tile was loaded"


def test_visited_tiles_grow_like_length_times_chunk() -> None:
    def count(length: int, chunk_size: int | None) -> tuple[int, int]:
        tiles = visited_key_tiles(0, length, 0, length, chunk_size, 16, 16)
        return sum(len(full) for full, _ in tiles), sum(len(full) + len(masked) for full, masked in tiles)

    for chunk_size in (32, 64):
        n = chunk_size // 16
        for length in (256, 512, 1024):
            full, total = count(length, chunk_size)
            assert total == length // chunk_size * n * (n + 1) // 2
            assert full == length // chunk_size * n * (n - 1) // 2
        assert count(1024, chunk_size)[1] == 2 * count(512, chunk_size)[1]  # linear in T
    # global causal: quadratic, the lower triangle of tiles
    assert count(512, None)[1] == 32 * 33 // 2 and count(1024, None)[1] == 64 * 65 // 2


# ---------------------------------------------------------------------- forward
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("length", "chunk_size", "kv_heads", "temperature"),
    [(37, None, 2, None), (7, None, 4, TEMPERATURE), (40, None, 1, TEMPERATURE), (48, 5, 1, None),
     (45, 8, 2, TEMPERATURE), (50, 12, 4, None), (48, 16, 2, None), (53, 40, 1, TEMPERATURE),
     (11, 12, 2, None)],
)  # fmt: skip
def test_prefill_matches_eager(
    dtype: torch.dtype, length: int, chunk_size: int | None, kv_heads: int, temperature: Temperature | None
) -> None:
    q, k, v = qkv(2, 4, kv_heads, length, length, 32, dtype)
    check(q, k, v, 0, 0, chunk_size, temperature)


@pytest.mark.parametrize("head_dim", [16, 24, 64])
def test_head_dims_and_default_tiles(head_dim: int) -> None:
    q, k, v = qkv(1, 4, 2, 70, 70, head_dim, torch.float32)
    check(q, k, v, 0, 0, 12, TEMPERATURE, tiling=None)
    q, k, v = (x.contiguous() for x in (q, k, v))
    check(q, k, v, 0, 0, None, None)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunk_size", [None, 8, 12])
def test_prefill_after_a_cache_prefix(dtype: torch.dtype, chunk_size: int | None) -> None:
    """A second prompt piece at position 21 against the keys the cache hands back: query_start > key_start."""
    cache = LayerCache(chunk_size)
    _, k0, v0 = qkv(1, 4, 2, 21, 21, 16, dtype, seed=3)
    cache.update(k0, v0, 0)
    q, k_new, v_new = qkv(1, 4, 2, 19, 19, 16, dtype, seed=6)
    k, v, key_start = cache.update(k_new, v_new, 21)
    assert key_start == (0 if chunk_size is None else 21 // chunk_size * chunk_size)
    check(q, k, v, 21, key_start, chunk_size, TEMPERATURE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunk_size", [None, 8])
def test_decode_inside_and_at_chunk_boundaries(dtype: torch.dtype, chunk_size: int | None) -> None:
    """One token at a time from a 15-token prompt: positions 15 (chunk end), 16 (chunk start, one key), ..."""
    cache = LayerCache(chunk_size)
    _, k, v = qkv(1, 4, 2, 15, 15, 16, dtype, seed=4)
    cache.update(k, v, 0)
    for position in range(15, 42):
        q, k_new, v_new = qkv(1, 4, 2, 1, 1, 16, dtype, seed=10 + position)
        k, v, key_start = cache.update(k_new, v_new, position)
        if position in (15, 16, 17, 23, 24, 41):
            check(q, k, v, position, key_start, chunk_size, TEMPERATURE, Tiling(block_n=16, split_tiles=1))
            check(q, k, v, position, key_start, chunk_size, None, tiling=None)


def test_decode_splits_and_gqa_groups() -> None:
    """A long global cache cut into 1, 2 and 3 tiles per split, with groups of 1, 3 and 5 query heads."""
    for heads, kv_heads in ((2, 2), (6, 2), (5, 1)):
        q, k, v = qkv(2, heads, kv_heads, 1, 75, 32, torch.float32, seed=heads)
        for split_tiles in (1, 2, 3):
            check(q, k, v, 80, 6, None, TEMPERATURE, Tiling(block_n=16, split_tiles=split_tiles))


def test_need_probs_falls_back_to_eager() -> None:
    q, k, v = qkv(1, 4, 2, 20, 20, 16, torch.float32)
    out, probs = attention(q, k, v, 0, 0, 8, TEMPERATURE, need_probs=True)
    eager_out, eager_probs = ops.attention(q, k, v, 0, 0, 8, TEMPERATURE, need_probs=True)
    assert probs is not None and torch.equal(probs, eager_probs) and torch.equal(out, eager_out)
    out, probs = attention(q, k, v, 0, 0, 8, TEMPERATURE, need_probs=False)
    assert probs is None and out.shape == (1, 4, 20, 16) and out.dtype == q.dtype


# ---------------------------------------------------------------------- backward
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("num_queries", "query_start", "key_start", "chunk_size", "kv_heads", "temperature"),
    [(37, 0, 0, None, 2, TEMPERATURE), (40, 0, 0, 5, 1, None), (45, 0, 0, 12, 4, TEMPERATURE),
     (70, 0, 0, 40, 2, None), (20, 13, 0, None, 2, TEMPERATURE), (20, 29, 24, 8, 1, TEMPERATURE),
     (1, 30, 0, None, 2, TEMPERATURE)],
)  # fmt: skip
def test_backward_matches_float64_gradients(
    dtype: torch.dtype,
    num_queries: int,
    query_start: int,
    key_start: int,
    chunk_size: int | None,
    kv_heads: int,
    temperature: Temperature | None,
) -> None:
    num_keys = query_start + num_queries - key_start
    q, k, v = qkv(1, 4, kv_heads, num_queries, num_keys, 16, dtype, seed=num_queries)
    check(q, k, v, query_start, key_start, chunk_size, temperature, grad=True)


# ---------------------------------------------------------------------- property
@settings(max_examples=10, deadline=None)
@given(
    kv_heads=st.integers(1, 2),
    group=st.integers(1, 3),
    head_dim=st.sampled_from([16, 24, 32]),
    num_queries=st.integers(1, 40),
    prefix=st.integers(0, 30),
    cached=st.integers(0, 30),
    chunk_size=st.one_of(st.none(), st.integers(1, 24)),
    temperature=st.booleans(),
    blocks=st.sampled_from([(16, 16), (32, 16), (16, 32)]),
    split_tiles=st.integers(1, 3),
)
def test_random_shapes_positions_and_chunks(
    kv_heads: int,
    group: int,
    head_dim: int,
    num_queries: int,
    prefix: int,
    cached: int,
    chunk_size: int | None,
    temperature: bool,
    blocks: tuple[int, int],
    split_tiles: int,
) -> None:
    """Queries at ``prefix + cached ...`` against keys from ``prefix`` (a cache holding ``cached`` keys)."""
    query_start = prefix + cached
    num_keys = query_start + num_queries - prefix
    q, k, v = qkv(
        2, kv_heads * group, kv_heads, num_queries, num_keys, head_dim, torch.float32, seed=num_keys
    )
    tiling = Tiling(
        block_m=blocks[0], block_n=blocks[1], split_tiles=split_tiles, bwd_block_m=16, bwd_block_n=16
    )
    check(q, k, v, query_start, prefix, chunk_size, TEMPERATURE if temperature else None, tiling, grad=True)
