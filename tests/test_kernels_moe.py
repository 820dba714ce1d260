"""The mixture-of-experts kernels (route, routed_experts) against their eager references.

Each case runs the fused op and the eager op in the test dtype and the eager op on float64 copies of the
same inputs (the exact answer), pushes the same random upstream gradient through all three, and checks
the output and every input gradient with :func:`kernel_testing.assert_matches`. Small tiles (16) make
even tiny problems span several tiles, column blocks and reduction steps.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_testing import DEVICE, DTYPES, assert_matches
from torch import Tensor

import l4lab
from l4lab import ops
from l4lab.kernels import moe
from l4lab.model import MoE

SMALL_TILES = moe.Tiles(block_m=16, block_n=16, block_k=16, group_m=2, num_warps=4, num_stages=2)
TENSOR_NAMES = ("out", "d x", "d scores", "d gate_up", "d down", "d shared")


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------- route
def tie_free_logits(num_tokens: int, num_experts: int, seed: int) -> Tensor:
    """Logits whose ranks differ by 0.5 per row (plus small noise): no ties in any dtype or with a bias
    that is a multiple of 0.5 plus 0.25."""
    rng = generator(seed)
    ranks = torch.stack([torch.randperm(num_experts, generator=rng) for _ in range(num_tokens)])
    return (ranks - num_experts / 2) * 0.5 + 0.01 * torch.randn(num_tokens, num_experts, generator=rng)


@pytest.mark.parametrize("dtype", DTYPES)
def test_route_top1_matches_eager(dtype: torch.dtype) -> None:
    logits = tie_free_logits(45, 5, seed=0).to(DEVICE, dtype)  # 45 rows: a partial block of rows
    bias = torch.zeros(5, device=DEVICE)
    experts, scores = moe.route(logits, bias, 1)
    eager_experts, eager_scores = ops.route(logits, bias, 1)
    assert experts.dtype == torch.int64 and experts.shape == (45, 1)
    assert torch.equal(experts, eager_experts)
    exact_scores = ops.route(logits.double(), bias.double(), 1)[1]
    assert_matches(scores, eager_scores, exact_scores, "scores")


def test_route_bias_changes_choice_not_score() -> None:
    logits = tie_free_logits(20, 6, seed=1).to(DEVICE)
    bias = torch.arange(6, device=DEVICE) * 0.5 + 0.25
    experts, scores = moe.route(logits, bias, 1)
    eager_experts, eager_scores = ops.route(logits, bias, 1)
    assert torch.equal(experts, eager_experts)
    assert not torch.equal(experts, logits.argmax(-1, keepdim=True))  # the bias moved some choices
    torch.testing.assert_close(scores, torch.sigmoid(logits.gather(1, experts)))
    torch.testing.assert_close(scores, eager_scores)


def test_route_breaks_ties_toward_the_lowest_expert() -> None:
    logits = torch.tensor([[0.0, 2.0, 2.0, 1.0], [3.0, 3.0, 3.0, 3.0]], device=DEVICE)
    experts, _ = moe.route(logits, torch.zeros(4, device=DEVICE), 1)
    assert experts.flatten().tolist() == [1, 0]


def test_route_top2_falls_back_to_eager() -> None:
    logits = tie_free_logits(12, 5, seed=2).to(DEVICE)
    bias = torch.zeros(5, device=DEVICE)
    experts, scores = moe.route(logits, bias, 2)
    eager_experts, eager_scores = ops.route(logits, bias, 2)
    assert torch.equal(experts, eager_experts)
    torch.testing.assert_close(scores, eager_scores)


@pytest.mark.parametrize("dtype", DTYPES)
def test_route_gradient_reaches_the_chosen_logit_only(dtype: torch.dtype) -> None:
    logits = tie_free_logits(37, 5, seed=3).to(DEVICE)
    bias = (torch.arange(5, device=DEVICE) % 2) * 0.5 + 0.25
    upstream = torch.randn(37, 1, generator=generator(4)).to(DEVICE)

    def grad(fn: Callable, dtype: torch.dtype) -> Tensor:
        leaf = logits.detach().to(dtype).requires_grad_()
        _, scores = fn(leaf, bias.to(dtype) if dtype == torch.float64 else bias, 1)
        scores.backward(upstream.to(dtype))
        return leaf.grad

    fused = grad(moe.route, dtype)
    assert_matches(fused, grad(ops.route, dtype), grad(ops.route, torch.float64), "d logits")
    experts, _ = moe.route(logits, bias, 1)
    unchosen = torch.ones_like(fused, dtype=torch.bool).scatter_(1, experts, False)
    assert (fused[unchosen] == 0).all()


# ---------------------------------------------------------------------- tile schedule and sort
def test_tile_schedule_cuts_each_expert_into_tiles() -> None:
    assert moe.tile_schedule([3, 0, 16, 17], block_m=16) == [
        (0, 0, 3),
        (2, 3, 19),
        (3, 19, 35),
        (3, 35, 36),
    ]
    assert moe.tile_schedule([0, 0], block_m=16) == []


@pytest.mark.parametrize("top_k", [1, 2])
def test_sort_by_expert_is_a_stable_counting_sort(top_k: int) -> None:
    num_experts, block_m = 6, 16
    rng = generator(5)
    expert_ids = torch.stack([torch.randperm(num_experts - 1, generator=rng)[:top_k] for _ in range(50)])
    expert_ids[expert_ids == 2] = 1  # experts 2 and 5 get no slot
    dispatch = moe.sort_by_expert(expert_ids.to(DEVICE), num_experts, block_m)

    flat = expert_ids.flatten()
    assert dispatch.sorted_slots.cpu().tolist() == torch.argsort(flat, stable=True).tolist()
    counts = torch.bincount(flat, minlength=num_experts)
    assert dispatch.expert_ends.cpu().tolist() == counts.cumsum(0).tolist()
    assert dispatch.expert_starts.cpu().tolist() == (counts.cumsum(0) - counts).tolist()
    schedule = moe.tile_schedule(counts.tolist(), block_m)
    num_tiles = int(dispatch.num_tiles)
    assert num_tiles == len(schedule) <= dispatch.max_tiles
    assert dispatch.tile_expert[:num_tiles].cpu().tolist() == [expert for expert, _, _ in schedule]
    assert dispatch.tile_first_row[:num_tiles].cpu().tolist() == [first for _, first, _ in schedule]


# ---------------------------------------------------------------------- routed experts
@dataclass
class Case:
    """A routed-experts problem in float64 on the CPU: tokens, routing, weights, shared output."""

    x: Tensor
    expert_ids: Tensor
    scores: Tensor
    gate_up: Tensor
    down: Tensor
    shared: Tensor | None
    upstream: Tensor

    @property
    def inputs(self) -> list[Tensor | None]:
        return [self.x, self.scores, self.gate_up, self.down, self.shared]


def make_case(
    num_tokens: int,
    num_experts: int,
    dim: int,
    hidden: int,
    top_k: int = 1,
    with_shared: bool = True,
    unused_experts: int = 0,
    seed: int = 0,
) -> Case:
    """Random problem; each token picks ``top_k`` distinct experts among the first
    ``num_experts - unused_experts`` (the others receive nothing)."""
    rng = generator(seed)

    def randn(*shape: int, scale: float = 1.0) -> Tensor:
        return torch.randn(*shape, generator=rng, dtype=torch.float64) * scale

    used = num_experts - unused_experts
    expert_ids = torch.stack([torch.randperm(used, generator=rng)[:top_k] for _ in range(num_tokens)])
    return Case(
        x=randn(num_tokens, dim),
        expert_ids=expert_ids,
        scores=torch.rand(num_tokens, top_k, generator=rng, dtype=torch.float64),
        gate_up=randn(num_experts, dim, 2 * hidden, scale=dim**-0.5),
        down=randn(num_experts, hidden, dim, scale=hidden**-0.5),
        shared=randn(num_tokens, dim) if with_shared else None,
        upstream=randn(num_tokens, dim),
    )


def run_experts(fn: Callable[..., Tensor], case: Case, dtype: torch.dtype, **kwargs) -> list[Tensor | None]:
    """fn's output and the gradients of x, scores, gate_up, down and shared (None without shared)."""
    leaves = [None if t is None else t.to(DEVICE, dtype).requires_grad_() for t in case.inputs]
    x, scores, gate_up, down, shared = leaves
    out = fn(x, case.expert_ids.to(DEVICE), scores, gate_up, down, shared, **kwargs)
    out.backward(case.upstream.to(DEVICE, dtype))
    return [out.detach()] + [None if leaf is None else leaf.grad for leaf in leaves]


def check_experts(case: Case, dtype: torch.dtype, tiles: moe.Tiles | None = SMALL_TILES) -> None:
    """Output and all input gradients of the fused op match eager's (float64 = exact)."""
    fused = run_experts(moe.routed_experts, case, dtype, tiles=tiles)
    eager = run_experts(ops.routed_experts, case, dtype)
    exact = run_experts(ops.routed_experts, case, torch.float64)
    for name, got, reference, answer in zip(TENSOR_NAMES, fused, eager, exact, strict=True):
        if answer is None:
            assert got is None, name
        else:
            assert_matches(got, reference, answer, name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("with_shared", [True, False])
def test_routed_experts_forward_and_backward(dtype: torch.dtype, top_k: int, with_shared: bool) -> None:
    # D = 48 and I = 40 are not multiples of the 16-wide blocks; expert 4 gets no token
    case = make_case(37, 5, 48, 40, top_k=top_k, with_shared=with_shared, unused_experts=1, seed=top_k)
    check_experts(case, dtype)


@pytest.mark.parametrize("num_tokens", [1, 3])
def test_fewer_tokens_than_a_tile(num_tokens: int) -> None:
    check_experts(make_case(num_tokens, 4, 24, 20, seed=num_tokens), torch.float32)


def test_experts_without_tokens_get_zero_weight_gradients() -> None:
    case = make_case(20, 6, 32, 16, unused_experts=3, seed=7)
    _, _, _, grad_gate_up, grad_down, _ = run_experts(
        moe.routed_experts, case, torch.float32, tiles=SMALL_TILES
    )
    assert (grad_gate_up[3:] == 0).all() and (grad_down[3:] == 0).all()
    assert (grad_gate_up[:3] != 0).any() and (grad_down[:3] != 0).any()
    check_experts(case, torch.float32)


def test_non_contiguous_inputs_and_weights() -> None:
    case = make_case(30, 3, 40, 24, seed=8)
    # [E, D, 2I] and [E, I, D] with stride 1 along their middle dimension (``.to`` keeps these strides)
    case.gate_up = case.gate_up.transpose(1, 2).contiguous().transpose(1, 2)
    case.down = case.down.transpose(1, 2).contiguous().transpose(1, 2)

    def with_strided_x(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        def call(x: Tensor, expert_ids: Tensor, scores: Tensor, gate_up: Tensor, *rest, **kwargs) -> Tensor:
            assert not gate_up.is_contiguous()
            interleaved = torch.stack([x, torch.zeros_like(x)], dim=-1)  # [N, D, 2]
            return fn(interleaved[..., 0], expert_ids, scores, gate_up, *rest, **kwargs)  # column stride 2

        return call

    fused = run_experts(with_strided_x(moe.routed_experts), case, torch.float32, tiles=SMALL_TILES)
    eager = run_experts(with_strided_x(ops.routed_experts), case, torch.float32)
    exact = run_experts(ops.routed_experts, case, torch.float64)
    for name, got, reference, answer in zip(TENSOR_NAMES, fused, eager, exact, strict=True):
        assert_matches(got, reference, answer, name)


def test_expanded_upstream_gradient() -> None:
    """``out.sum()`` sends back a gradient with stride 0 in both dimensions."""
    case = make_case(20, 3, 24, 20, top_k=2, seed=11)
    grads = []
    for fn, kwargs in ((moe.routed_experts, {"tiles": SMALL_TILES}), (ops.routed_experts, {})):
        leaves = [t.to(DEVICE, torch.float32).requires_grad_() for t in case.inputs]
        x, scores, gate_up, down, shared = leaves
        fn(x, case.expert_ids.to(DEVICE), scores, gate_up, down, shared, **kwargs).sum().backward()
        grads.append([leaf.grad for leaf in leaves])
    for fused, eager in zip(*grads, strict=True):
        torch.testing.assert_close(fused, eager, atol=1e-3, rtol=1e-3)


def test_moe_layer_with_fused_route_and_experts() -> None:
    """A whole MoE layer (router, shared expert, routed experts) gives eager's output and gradients."""
    config = l4lab.Config(hidden_size=32, moe_intermediate_size=48, num_experts=4)
    torch.manual_seed(12)
    eager_layer = MoE(config, layer=0).to(DEVICE)
    for param in eager_layer.parameters():
        torch.nn.init.normal_(param, std=0.2)
    fused_layer = copy.deepcopy(eager_layer)
    fused_layer.router.ops = fused_layer.experts.ops = replace(
        ops.EAGER, route=moe.route, routed_experts=moe.routed_experts
    )
    x = torch.randn(2, 9, 32, device=DEVICE)
    results = []
    for layer in (fused_layer, eager_layer):
        out, record = layer(x)
        out.square().sum().backward()
        results.append((out, record.experts, *(p.grad for p in layer.parameters())))
    assert torch.equal(results[0][1], results[1][1])
    for fused, eager in zip(*results, strict=True):
        torch.testing.assert_close(fused, eager, atol=1e-4, rtol=1e-4)


def test_default_tiles_and_no_grad() -> None:
    case = make_case(40, 3, 36, 20, seed=10)
    check_experts(case, torch.float32, tiles=None)
    with torch.no_grad():
        args = [None if t is None else t.to(DEVICE, torch.float32) for t in case.inputs]
        x, scores, gate_up, down, shared = args
        out = moe.routed_experts(x, case.expert_ids.to(DEVICE), scores, gate_up, down, shared)
        eager = ops.routed_experts(x, case.expert_ids.to(DEVICE), scores, gate_up, down, shared)
    torch.testing.assert_close(out, eager, atol=1e-4, rtol=1e-4)


@settings(max_examples=10, deadline=None)
@given(
    num_tokens=st.integers(1, 40),
    num_experts=st.integers(1, 6),
    dim=st.integers(1, 40),
    hidden=st.integers(1, 40),
    top_k=st.integers(1, 2),
    with_shared=st.booleans(),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)
def test_routed_experts_random_problems(
    num_tokens: int,
    num_experts: int,
    dim: int,
    hidden: int,
    top_k: int,
    with_shared: bool,
    dtype: torch.dtype,
    seed: int,
) -> None:
    top_k = min(top_k, num_experts)
    case = make_case(num_tokens, num_experts, dim, hidden, top_k=top_k, with_shared=with_shared, seed=seed)
    check_experts(case, dtype)
