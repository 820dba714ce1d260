"""Routing statistics and balancing losses against hand computations on hand-built routing records."""

from __future__ import annotations

import math

import pytest
import torch

import l4lab
from l4lab.model import RoutingRecord
from l4lab.routing import (
    RoutingStats,
    domain_expert_counts,
    expert_load,
    load_entropy,
    max_violation,
    mean_over_layers,
    router_z_loss,
    routing_stats,
    same_expert_rate,
    switch_loss,
    update_selection_bias,
)


def make_record(experts: list[list[int]] | list[list[list[int]]], logits: torch.Tensor, layer: int = 0):
    """A record from expert ids [B, T] (top-1) or [B, T, k] and router logits [B, T, E]."""
    ids = torch.tensor(experts)
    if ids.dim() == 2:
        ids = ids[..., None]
    return RoutingRecord(layer, ids, torch.sigmoid(logits.gather(-1, ids)), logits)


def softmax_row(row: list[float]) -> list[float]:
    exps = [math.exp(v) for v in row]
    return [e / sum(exps) for e in exps]


# ---------------------------------------------------------------------- Switch loss
def test_switch_loss_is_one_at_perfect_balance_whatever_the_logits() -> None:
    logits = torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(0)) * 3
    top1 = make_record([[0, 1, 2, 3], [3, 2, 1, 0]], logits)
    assert switch_loss(top1).item() == pytest.approx(1.0, abs=1e-6)
    # top-2: each expert gets 4 of the 16 slots
    top2 = make_record([[[0, 1], [2, 3], [0, 1], [2, 3]], [[1, 0], [3, 2], [0, 2], [1, 3]]], logits)
    assert switch_loss(top2).item() == pytest.approx(1.0, abs=1e-6)


def test_switch_loss_when_every_token_goes_to_one_expert() -> None:
    rows = [[3.0, 0.0, 0.0, 0.0], [2.0, 1.0, 0.0, -1.0], [1.0, 0.5, 0.5, 0.0]]
    record = make_record([[0, 0, 0]], torch.tensor([rows]))
    # f = (1, 0, 0, 0), so the loss is E * P_0 with P_0 the mean softmax probability of expert 0
    p0 = sum(softmax_row(row)[0] for row in rows) / len(rows)
    expected = 4 * 1.0 * p0
    assert switch_loss(record).item() == pytest.approx(expected, rel=1e-6)
    assert expected > 1


def test_switch_loss_gradient_pushes_the_overloaded_expert_down() -> None:
    logits = torch.randn(1, 5, 4, generator=torch.Generator().manual_seed(1)).requires_grad_()
    record = make_record([[0, 0, 0, 0, 1]], logits)
    switch_loss(record).backward()
    assert logits.grad is not None
    assert (logits.grad[..., 0] > 0).all()  # a descent step lowers expert 0's logit everywhere
    assert (logits.grad[..., 2:] < 0).all()  # and raises the idle experts'


def test_losses_over_a_list_of_records_are_the_mean_over_layers() -> None:
    gen = torch.Generator().manual_seed(2)
    a = make_record([[0, 0, 1, 2]], torch.randn(1, 4, 3, generator=gen), layer=0)
    b = make_record([[2, 2, 2, 1]], torch.randn(1, 4, 3, generator=gen), layer=1)
    assert switch_loss([a, b]).item() == pytest.approx((switch_loss(a) + switch_loss(b)).item() / 2)
    assert router_z_loss([a, b]).item() == pytest.approx((router_z_loss(a) + router_z_loss(b)).item() / 2)
    assert mean_over_layers(switch_loss, [a]).item() == pytest.approx(switch_loss(a).item())
    with pytest.raises(ValueError, match="no routing records"):
        switch_loss([])


def test_router_z_loss_is_the_mean_squared_logsumexp() -> None:
    rows = [[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [-1.0, 5.0, 0.5], [10.0, -10.0, 0.0]]
    record = make_record([[2, 0], [1, 0]], torch.tensor(rows).view(2, 2, 3))
    expected = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in rows) / len(rows)
    assert router_z_loss(record).item() == pytest.approx(expected, rel=1e-6)


def test_losses_flow_back_to_the_router_of_a_model() -> None:
    torch.manual_seed(0)
    model = l4lab.Llama4(l4lab.preset("tiny-moe", num_layers=2))
    out = model(torch.randint(0, 256, (2, 12)))
    (switch_loss(out.routing) + 1e-3 * router_z_loss(out.routing)).backward()
    grad = model.layers[0].feed_forward.router.weight.grad
    assert grad is not None and grad.abs().sum() > 0


# ---------------------------------------------------------------------- load statistics
def test_expert_load_counts_every_slot_and_sums_to_one() -> None:
    record = make_record([[0, 0, 1, 3]], torch.zeros(1, 4, 4))
    assert expert_load(record).tolist() == [0.5, 0.25, 0.0, 0.25]
    top2 = make_record([[[0, 1], [0, 2], [0, 3]]], torch.zeros(1, 3, 4))
    load = expert_load(top2)
    assert load.tolist() == pytest.approx([3 / 6, 1 / 6, 1 / 6, 1 / 6])
    assert load.sum().item() == pytest.approx(1.0)
    assert expert_load(record, num_experts=6).tolist() == [0.5, 0.25, 0.0, 0.25, 0.0, 0.0]
    with pytest.raises(ValueError, match="num_experts"):
        expert_load(record, num_experts=2)


def test_load_entropy() -> None:
    for num_experts in (2, 8, 16):
        uniform = torch.full((num_experts,), 1 / num_experts)
        assert load_entropy(uniform) == pytest.approx(math.log(num_experts))
        assert load_entropy(uniform, normalised=True) == pytest.approx(1.0)
    one_hot = torch.tensor([0.0, 1.0, 0.0, 0.0])
    assert load_entropy(one_hot) == 0.0
    assert load_entropy(torch.tensor([0.5, 0.5, 0.0, 0.0])) == pytest.approx(math.log(2))
    assert load_entropy(torch.tensor([0.5, 0.5, 0.0, 0.0]), normalised=True) == pytest.approx(0.5)
    assert load_entropy(torch.tensor([3.0, 3.0, 0.0, 0.0])) == pytest.approx(math.log(2))  # counts


def test_max_violation() -> None:
    assert max_violation(torch.full((8,), 1 / 8)) == pytest.approx(0.0)
    assert max_violation(torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0])) == pytest.approx(4.0)  # E - 1
    assert max_violation(torch.tensor([0.4, 0.2, 0.2, 0.2])) == pytest.approx((0.4 - 0.25) / 0.25)
    assert max_violation(torch.tensor([40.0, 20.0, 20.0, 20.0])) == pytest.approx(0.6)  # counts


def test_same_expert_rate_within_sequences_only() -> None:
    first = [[0, 0, 1, 1, 1], [1, 3, 1, 1, 0]]
    second = [[2, 3, 0, 2, 0], [0, 0, 3, 0, 1]]  # second choices must not matter
    experts = [[[f, s] for f, s in zip(fr, sr, strict=True)] for fr, sr in zip(first, second, strict=True)]
    record = make_record(experts, torch.zeros(2, 5, 4))
    rate, chance = same_expert_rate(record)
    # sequence 0: same, differ, same, same -> 3 of 4; sequence 1: differ, differ, same, differ -> 1 of 4;
    # the pair across the batch (1 then 1) is not consecutive text and must not count
    assert rate == pytest.approx(4 / 8)
    # first-choice counts: expert 0: 3, expert 1: 6, expert 2: 0, expert 3: 1 (of 10)
    assert chance == pytest.approx(0.3**2 + 0.6**2 + 0.1**2)
    uniform = make_record([[0, 1, 2, 3, 0, 1, 2, 3]], torch.zeros(1, 8, 4))
    assert same_expert_rate(uniform) == (0.0, pytest.approx(1 / 4))
    with pytest.raises(ValueError, match="at least 2"):
        same_expert_rate(make_record([[1]], torch.zeros(1, 1, 4)))


def test_domain_expert_counts() -> None:
    record = make_record([[0, 1, 1, 2], [2, 2, 0, 1]], torch.zeros(2, 4, 3))
    domains = torch.tensor([[0, 0, 1, 1], [1, -1, 0, 0]])  # -1: left out
    counts = domain_expert_counts(record, domains, num_domains=2)
    assert counts.tolist() == [[2, 2, 0], [0, 1, 2]]
    with pytest.raises(ValueError, match="num_domains"):
        domain_expert_counts(record, domains, num_domains=1)


def test_routing_stats_per_layer() -> None:
    gen = torch.Generator().manual_seed(3)
    balanced = make_record([[0, 1, 2, 3, 0, 1, 2, 3]], torch.randn(1, 8, 4, generator=gen), layer=1)
    skewed = make_record([[0, 0, 0, 0, 0, 0, 1, 1]], torch.randn(1, 8, 4, generator=gen), layer=3)
    stats = routing_stats([balanced, skewed], num_experts=4, domains=torch.tensor([[0, 1] * 4]))
    assert [s.layer for s in stats] == [1, 3]
    assert all(isinstance(s, RoutingStats) for s in stats)
    first, second = stats
    assert first.load.tolist() == [0.25] * 4
    assert first.entropy == pytest.approx(math.log(4))
    assert first.normalised_entropy == pytest.approx(1.0)
    assert first.max_violation == pytest.approx(0.0)
    assert first.switch_loss == pytest.approx(1.0, abs=1e-6)
    assert (first.same_expert_rate, first.chance_rate) == (0.0, pytest.approx(0.25))
    assert first.domain_counts.tolist() == [[2, 0, 2, 0], [0, 2, 0, 2]]
    assert second.load.tolist() == [0.75, 0.25, 0.0, 0.0]
    assert second.max_violation == pytest.approx(2.0)
    assert second.same_expert_rate == pytest.approx(6 / 7)
    assert second.chance_rate == pytest.approx(0.75**2 + 0.25**2)
    assert second.switch_loss == pytest.approx(switch_loss(skewed).item())
    assert second.z_loss == pytest.approx(router_z_loss(skewed).item())
    assert routing_stats(balanced)[0].domain_counts is None  # a single record is accepted too


# ---------------------------------------------------------------------- auxiliary-loss-free balancing
def test_update_selection_bias_raises_idle_experts_and_lowers_busy_ones() -> None:
    record = make_record([[0, 0, 1, 2]], torch.zeros(1, 4, 4))  # load 0.5, 0.25, 0.25, 0 (mean 0.25)
    bias = torch.tensor([0.1, 0.0, 0.0, 0.0])
    storage = bias.data_ptr()
    update_selection_bias(bias, record, rate=0.01)
    assert bias.data_ptr() == storage  # in place
    assert bias.tolist() == pytest.approx([0.09, 0.0, 0.0, 0.01])


def test_selection_bias_balances_a_biased_router() -> None:
    """Route 256 fixed tokens by logits + bias, nudging the bias each step: the load evens out."""
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(1, 256, 4, generator=gen) + torch.tensor([1.5, 0.5, 0.0, -1.0])
    bias = torch.zeros(4)

    def route() -> RoutingRecord:
        experts = (logits + bias).argmax(-1)
        return make_record(experts.tolist(), logits)

    before = max_violation(expert_load(route()))
    for _ in range(300):
        update_selection_bias(bias, route(), rate=0.01)
    after = max_violation(expert_load(route()))
    assert before > 1.0
    assert after < 0.15
