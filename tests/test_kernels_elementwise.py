"""The memory-bound kernels (RMSNorm, SwiGLU, RoPE + QK norm) against their eager references.

Each case runs the fused op and the eager op in the test dtype and the eager op on float64 copies of the
same inputs (the exact answer), pushes the same random upstream gradient through all three, and checks
the outputs and every input gradient with :func:`kernel_testing.assert_matches`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_testing import DEVICE, DTYPES, assert_matches
from torch import Tensor

from l4lab import ops
from l4lab.kernels.rms_norm import rms_norm
from l4lab.kernels.rope import rope_qk_norm
from l4lab.kernels.swiglu import swiglu

EPS = 1e-5
# the upstream gradients draw from other seeds than the inputs: an upstream gradient parallel to x would
# make the norm's input gradient vanish, leaving only rounding noise to compare
UPSTREAM_SEED_OFFSET = 1 << 20


def as_tuple(out: Tensor | tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


def check_forward_backward(
    fused: Callable[..., Tensor | tuple[Tensor, ...]],
    eager: Callable[..., Tensor | tuple[Tensor, ...]],
    inputs: Sequence[Tensor],
    seed: int = 0,
    name: str = "",
) -> None:
    """Outputs and the gradients of all ``inputs`` of ``fused`` match ``eager``'s (float64 = exact)."""

    def run(fn: Callable, dtype_of: Callable[[Tensor], torch.dtype], upstream: Sequence[Tensor] | None):
        leaves = [x.detach().to(dtype_of(x)).requires_grad_() for x in inputs]
        outputs = as_tuple(fn(*leaves))
        if upstream is None:
            generator = torch.Generator().manual_seed(UPSTREAM_SEED_OFFSET + seed)
            upstream = [torch.randn(out.shape, generator=generator).to(out.dtype) for out in outputs]
        torch.autograd.backward(
            outputs, [g.to(out.device, out.dtype) for g, out in zip(upstream, outputs, strict=True)]
        )
        return outputs, [leaf.grad for leaf in leaves], upstream

    eager_out, eager_grads, upstream = run(eager, lambda x: x.dtype, None)
    fused_out, fused_grads, _ = run(fused, lambda x: x.dtype, upstream)
    exact_out, exact_grads, _ = run(eager, lambda x: torch.float64, upstream)
    for i, (got, ref, exact) in enumerate(zip(fused_out, eager_out, exact_out, strict=True)):
        assert_matches(got.detach(), ref.detach(), exact.detach(), f"{name} output {i}")
    for i, (got, ref, exact) in enumerate(zip(fused_grads, eager_grads, exact_grads, strict=True)):
        assert_matches(got, ref, exact, f"{name} grad of input {i}")


def randn(*shape: int, dtype: torch.dtype, seed: int, scale: float = 1.0) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=generator)).to(DEVICE, dtype)


def random_freqs_cis(length: int, head_dim: int, seed: int) -> Tensor:
    """Rotations [T, D/2] at random angles (wider than RoPE's, to exercise every quadrant)."""
    generator = torch.Generator().manual_seed(seed)
    angles = 10 * torch.randn(length, head_dim // 2, generator=generator)
    return torch.polar(torch.ones_like(angles), angles).to(DEVICE)


def eager_rope(freqs_cis: Tensor, qk_norm: bool) -> Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """The eager reference; float64 inputs get complex128 rotations, so the exact run is exact."""

    def run(q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        freqs = freqs_cis.to(torch.complex128) if q.dtype == torch.float64 else freqs_cis
        return ops.rope_qk_norm(q, k, freqs, qk_norm, EPS)

    return run


# ---------------------------------------------------------------------- rms_norm
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 48), (2, 5, 80), (2, 3, 4, 100)])
@pytest.mark.parametrize("with_weight", [True, False])
def test_rms_norm(dtype: torch.dtype, shape: tuple[int, ...], with_weight: bool) -> None:
    x = randn(*shape, dtype=dtype, seed=1, scale=3.0)
    inputs = [x, 1.0 + 0.5 * randn(shape[-1], dtype=dtype, seed=2)] if with_weight else [x]

    def fused(x: Tensor, weight: Tensor | None = None) -> Tensor:
        return rms_norm(x, weight, EPS)

    def eager(x: Tensor, weight: Tensor | None = None) -> Tensor:
        return ops.rms_norm(x, weight, EPS)

    check_forward_backward(fused, eager, inputs, name=f"rms_norm {shape}")


def test_rms_norm_weight_of_another_dtype_and_strided_input() -> None:
    """float16 activations with a float32 weight promote to float32, as in eager; a transposed x works."""
    x = randn(40, 3, dtype=torch.float16, seed=3).t()  # [3, 40], column stride 3
    weight = randn(40, dtype=torch.float32, seed=4)
    check_forward_backward(
        lambda x, w: rms_norm(x, w, EPS), lambda x, w: ops.rms_norm(x, w, EPS), [x, weight], name="mixed"
    )


def test_rms_norm_many_rows_split_over_backward_programs() -> None:
    """Enough rows that each backward program walks several tiles (the last one partly masked) and sums
    them into its own dweight partial (on the CPU: 11 tiles of 64 rows over 4 programs)."""
    x = randn(700, 1000, dtype=torch.float32, seed=5)
    weight = randn(1000, dtype=torch.float32, seed=6)
    check_forward_backward(
        lambda x, w: rms_norm(x, w, EPS), lambda x, w: ops.rms_norm(x, w, EPS), [x, weight], name="rows"
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_eps_keeps_zero_rows_finite(dtype: torch.dtype) -> None:
    x = torch.zeros(4, 36, dtype=dtype, device=DEVICE, requires_grad=True)
    weight = torch.ones(36, dtype=dtype, device=DEVICE, requires_grad=True)
    out = rms_norm(x, weight, EPS)
    out.backward(torch.ones_like(out))
    assert torch.equal(out, torch.zeros_like(out))
    # d out / d x at 0 is rstd = eps^(-1/2) per unit of upstream gradient
    expected_grad = torch.full_like(x, EPS**-0.5)
    torch.testing.assert_close(x.grad, expected_grad, rtol=1e-3, atol=0)
    assert torch.equal(weight.grad, torch.zeros_like(weight))


# ---------------------------------------------------------------------- swiglu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 48), (2, 5, 80), (2, 3, 2, 100)])
def test_swiglu(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    gate = randn(*shape, dtype=dtype, seed=7, scale=4.0)
    up = randn(*shape, dtype=dtype, seed=8)
    check_forward_backward(swiglu, ops.swiglu, [gate, up], name=f"swiglu {shape}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_on_column_halves(dtype: torch.dtype) -> None:
    """The layout routed_experts passes: gate and up are the two halves of one [N, 2I] product."""

    def halves(fn: Callable[[Tensor, Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
        return lambda gate_up: fn(*gate_up.chunk(2, dim=-1))

    gate_up = randn(2, 7, 2 * 80, dtype=dtype, seed=9, scale=3.0)
    check_forward_backward(halves(swiglu), halves(ops.swiglu), [gate_up], name="halves")


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # the interpreter's numpy: exp(1e4) = inf
def test_swiglu_saturates_without_nan() -> None:
    gate = torch.tensor([[-1e4, -90.0, 0.0, 90.0, 1e4]], device=DEVICE, requires_grad=True)
    up = torch.ones_like(gate, requires_grad=True)
    out = swiglu(gate, up)
    out.backward(torch.ones_like(out))
    assert torch.isfinite(out).all() and torch.isfinite(gate.grad).all() and torch.isfinite(up.grad).all()
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.0, 0.0, 90.0, 1e4]], device=DEVICE))


# ---------------------------------------------------------------------- rope_qk_norm
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("qk_norm", [True, False])
@pytest.mark.parametrize(
    ("batch", "length", "heads", "kv_heads", "head_dim"), [(2, 5, 4, 2, 16), (1, 7, 3, 1, 48)]
)
def test_rope_qk_norm(
    dtype: torch.dtype, qk_norm: bool, batch: int, length: int, heads: int, kv_heads: int, head_dim: int
) -> None:
    q = randn(batch, length, heads, head_dim, dtype=dtype, seed=10, scale=2.0)
    k = randn(batch, length, kv_heads, head_dim, dtype=dtype, seed=11, scale=2.0)
    freqs_cis = random_freqs_cis(length, head_dim, seed=12)

    def fused(q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        return rope_qk_norm(q, k, freqs_cis, qk_norm, EPS)

    check_forward_backward(fused, eager_rope(freqs_cis, qk_norm), [q, k], name="rope")


@pytest.mark.parametrize("qk_norm", [True, False])
def test_rope_qk_norm_strided_heads_and_transposed_gradients(qk_norm: bool) -> None:
    """q and k are head slices of one projection, and the outputs are used transposed ([B, H, T, D]),
    as the attention does: the kernels read both strided layouts in place."""
    freqs_cis = random_freqs_cis(6, 16, seed=13)

    def split_transposed(fn: Callable) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
        def run(qk: Tensor) -> tuple[Tensor, Tensor]:
            q, k = fn(qk[:, :, :4], qk[:, :, 4:])
            return q.transpose(1, 2), k.transpose(1, 2)

        return run

    qk = randn(2, 6, 6, 16, dtype=torch.float32, seed=14)
    fused = split_transposed(lambda q, k: rope_qk_norm(q, k, freqs_cis, qk_norm, EPS))
    check_forward_backward(fused, split_transposed(eager_rope(freqs_cis, qk_norm)), [qk], name="strided")


def test_rope_qk_norm_eps_keeps_zero_rows_finite() -> None:
    q = torch.zeros(1, 3, 2, 16, device=DEVICE, requires_grad=True)
    k = torch.zeros(1, 3, 1, 16, device=DEVICE, requires_grad=True)
    q_out, k_out = rope_qk_norm(q, k, random_freqs_cis(3, 16, seed=15), True, EPS)
    (q_out.sum() + k_out.sum()).backward()
    for tensor in (q_out, k_out, q.grad, k.grad):
        assert torch.isfinite(tensor).all()
    assert torch.equal(q_out, torch.zeros_like(q_out)) and torch.equal(k_out, torch.zeros_like(k_out))


def test_rope_without_norm_keeps_each_pair_length() -> None:
    """A rotation: every (2i, 2i+1) pair keeps its length, and position 0 (angle 0) is unchanged."""
    q = randn(1, 4, 2, 16, dtype=torch.float32, seed=16)
    angles = torch.arange(4.0)[:, None] * torch.linspace(1.0, 0.01, 8)[None, :]
    freqs_cis = torch.polar(torch.ones_like(angles), angles).to(DEVICE)
    q_out, _ = rope_qk_norm(q, q[:, :, :1], freqs_cis, False, EPS)
    pair_length = q.view(1, 4, 2, 8, 2).norm(dim=-1)
    torch.testing.assert_close(q_out.view(1, 4, 2, 8, 2).norm(dim=-1), pair_length)
    torch.testing.assert_close(q_out[:, 0], q[:, 0])


# ---------------------------------------------------------------------- random shapes
@settings(max_examples=10, deadline=None)
@given(
    leading=st.lists(st.integers(1, 4), min_size=1, max_size=3),
    dim=st.integers(2, 130),  # at D = 1 the norm is sign(x): its gradient is pure rounding noise
    with_weight=st.booleans(),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)
def test_rms_norm_and_swiglu_random_shapes(
    leading: list[int], dim: int, with_weight: bool, dtype: torch.dtype, seed: int
) -> None:
    shape = (*leading, dim)
    x = randn(*shape, dtype=dtype, seed=seed, scale=2.0)
    weight = randn(dim, dtype=dtype, seed=seed + 1)
    if with_weight:
        check_forward_backward(
            lambda x, w: rms_norm(x, w, EPS), lambda x, w: ops.rms_norm(x, w, EPS), [x, weight], seed
        )
    else:
        check_forward_backward(
            lambda x: rms_norm(x, None, EPS), lambda x: ops.rms_norm(x, None, EPS), [x], seed
        )
    up = weight.expand(shape)  # one row broadcast: a row stride of 0, which the kernels read in place
    check_forward_backward(swiglu, ops.swiglu, [x, up], seed, name="swiglu")


@settings(max_examples=10, deadline=None)
@given(
    batch=st.integers(1, 2),
    length=st.integers(1, 6),
    kv_heads=st.integers(1, 3),
    group=st.integers(1, 3),
    half_dim=st.integers(1, 40),
    qk_norm=st.booleans(),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)
def test_rope_qk_norm_random_shapes(
    batch: int,
    length: int,
    kv_heads: int,
    group: int,
    half_dim: int,
    qk_norm: bool,
    dtype: torch.dtype,
    seed: int,
) -> None:
    head_dim = 2 * half_dim
    q = randn(batch, length, kv_heads * group, head_dim, dtype=dtype, seed=seed)
    k = randn(batch, length, kv_heads, head_dim, dtype=dtype, seed=seed + 1)
    freqs_cis = random_freqs_cis(length, head_dim, seed=seed + 2)
    check_forward_backward(
        lambda q, k: rope_qk_norm(q, k, freqs_cis, qk_norm, EPS), eager_rope(freqs_cis, qk_norm), [q, k], seed
    )
