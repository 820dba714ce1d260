"""The eager primitive operations against float64 maths written out independently."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

from l4lab import RopeScaling
from l4lab.model import rope_angles, rope_inverse_frequencies
from l4lab.ops import Temperature, apply_rope, attention, rms_norm, visibility_mask


def test_rms_norm_against_the_formula() -> None:
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    w = torch.randn(16, dtype=torch.float64)
    expected = x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-5) * w
    torch.testing.assert_close(rms_norm(x.float(), w.float(), 1e-5).double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rms_norm(x, None, 1e-5), expected / w, rtol=1e-5, atol=1e-6)  # float32 inside


def test_rope_rotates_interleaved_pairs() -> None:
    x = torch.randn(1, 6, 2, 8, dtype=torch.float64)
    inv_freq = rope_inverse_frequencies(8, 10000.0)
    got = apply_rope(x.float(), rope_angles(torch.arange(6), inv_freq)).double()
    expected = torch.empty_like(x)
    for t in range(6):
        for i in range(4):
            angle = t * 10000.0 ** (-2 * i / 8)
            c, s = math.cos(angle), math.sin(angle)
            a, b = x[0, t, :, 2 * i], x[0, t, :, 2 * i + 1]
            expected[0, t, :, 2 * i] = a * c - b * s
            expected[0, t, :, 2 * i + 1] = a * s + b * c
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # rotate-half (Llama 3 in transformers) pairs i with i + D/2: a different function
    half = torch.cat([x[..., 4:], x[..., :4]], dim=-1)
    assert not torch.allclose(got, apply_rope(half.float(), rope_angles(torch.arange(6), inv_freq)).double())


def test_rope_keeps_lengths_and_encodes_relative_positions() -> None:
    q, k = torch.randn(1, 1, 1, 32), torch.randn(1, 1, 1, 32)
    inv_freq = rope_inverse_frequencies(32, 500000.0)

    def score(i: int, j: int) -> float:
        qi = apply_rope(q, rope_angles(torch.tensor([i]), inv_freq))
        kj = apply_rope(k, rope_angles(torch.tensor([j]), inv_freq))
        return float((qi * kj).sum())

    assert score(10, 3) == pytest.approx(score(107, 100), rel=1e-4)
    torch.testing.assert_close(apply_rope(q, rope_angles(torch.tensor([77]), inv_freq)).norm(), q.norm())


@pytest.mark.parametrize(
    "scaling",
    [RopeScaling(16.0, 1.0, 4.0, 8192), RopeScaling(8.0, 1.0, 4.0, 64), RopeScaling(16.0, 1.0, 1.0, 8192)],
)
def test_rope_scaling_matches_transformers(scaling: RopeScaling) -> None:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = transformers.Llama4TextConfig(
        head_dim=128,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, **vars(scaling)},
    )
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    torch.testing.assert_close(rope_inverse_frequencies(128, 500000.0, scaling), expected, rtol=1e-6, atol=0)


def test_temperature_at_published_positions() -> None:
    """Scout's NoPE scale: 1 below 8191, about 1.069 at 8191, 1.48 at 1M, 1.71 at 10M."""
    scales = Temperature(8192, 0.1).scales(torch.tensor([0, 8190, 8191, 1_000_000, 10_000_000]))
    assert scales[:2].tolist() == [1.0, 1.0]
    assert scales[2:].tolist() == pytest.approx([1 + 0.1 * math.log(2), 1.4816, 1.7115], abs=1e-3)


@settings(max_examples=40, deadline=None)
@given(
    query_start=st.integers(0, 30),
    num_queries=st.integers(1, 12),
    cached=st.integers(0, 10),
    chunk=st.one_of(st.none(), st.integers(1, 9)),
)
def test_visibility_mask_is_the_definition(
    query_start: int, num_queries: int, cached: int, chunk: int | None
) -> None:
    key_start = max(0, query_start - cached)
    num_keys = query_start + num_queries - key_start
    mask = visibility_mask(query_start, num_queries, key_start, num_keys, chunk)
    for a in range(num_queries):
        for b in range(num_keys):
            i, j = query_start + a, key_start + b
            assert bool(mask[a, b]) == (j <= i and (chunk is None or j // chunk == i // chunk))


def reference_attention(q, k, v, query_start, key_start, chunk, temperature) -> torch.Tensor:
    """Float64 softmax attention, one query at a time, straight from the definition."""
    q, k, v = q.double(), k.double(), v.double()
    out = torch.zeros_like(q)
    group = q.shape[1] // k.shape[1]
    for h in range(q.shape[1]):
        for a in range(q.shape[2]):
            i = query_start + a
            scale = 1.0
            if temperature is not None:
                scale = (
                    math.log(math.floor((i + 1) / temperature.floor_scale) + 1) * temperature.attn_scale + 1
                )
            visible = [b for b in range(k.shape[2]) if key_start + b <= i]
            if chunk is not None:
                visible = [b for b in visible if (key_start + b) // chunk == i // chunk]
            logits = (k[:, h // group, visible] @ (q[:, h, a] * scale)[..., None]).squeeze(-1) / math.sqrt(
                q.shape[-1]
            )
            out[:, h, a] = (torch.softmax(logits, -1)[..., None] * v[:, h // group, visible]).sum(-2)
    return out


@pytest.mark.parametrize(
    ("query_start", "num_queries", "key_start", "chunk"),
    [
        (0, 13, 0, None),  # prefill, global: SDPA causal
        (0, 13, 0, 4),  # prefill across chunks, T not a multiple of C: chunk-folded path
        (0, 3, 0, 4),  # shorter than a chunk
        (9, 1, 0, None),  # decoding against a global cache
        (9, 1, 8, 4),  # decoding inside a chunk
        (5, 6, 4, 4),  # a prefill continuing a cache across a boundary: explicit mask
        (6, 5, 0, None),  # a prefill continuing a global cache
    ],
)
@pytest.mark.parametrize("need_probs", [False, True])
@pytest.mark.parametrize("temperature", [None, Temperature(3, 0.5)])
def test_attention_paths_against_float64(
    query_start, num_queries, key_start, chunk, need_probs, temperature
) -> None:
    generator = torch.Generator().manual_seed(query_start * 31 + num_queries)
    num_keys = query_start + num_queries - key_start
    q = torch.randn(2, 4, num_queries, 8, generator=generator)
    k = torch.randn(2, 2, num_keys, 8, generator=generator)
    v = torch.randn(2, 2, num_keys, 8, generator=generator)
    out, probs = attention(q, k, v, query_start, key_start, chunk, temperature, need_probs)
    expected = reference_attention(q, k, v, query_start, key_start, chunk, temperature)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    assert (probs is not None) == need_probs
    if need_probs:
        torch.testing.assert_close(probs.sum(-1), torch.ones(2, 4, num_queries))


def test_chunked_attention_gradients_match_the_masked_path() -> None:
    q, k, v = (torch.randn(1, 2, 11, 8, requires_grad=True) for _ in range(3))
    fast, _ = attention(q, k, v, 0, 0, 4, None, False)
    grads_fast = torch.autograd.grad(fast.square().sum(), (q, k, v))
    slow, _ = attention(q, k, v, 0, 0, 4, None, True)
    grads_slow = torch.autograd.grad(slow.square().sum(), (q, k, v))
    for a, b in zip(grads_fast, grads_slow, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
