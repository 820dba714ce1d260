"""The mixture of experts: Llama 4's router maths, sparse dispatch, and the cost it saves."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import l4lab
from l4lab.model import MoE
from l4lab.ops import routed_experts


def dense_reference(x, router, gate_up, down, shared, top_k) -> torch.Tensor:
    """Every expert on every token in float64, weighted by the masked sigmoid scores (transformers' way)."""
    x = x.double()
    logits = x @ router.double().T
    top = logits.topk(top_k, dim=-1)
    scores = torch.zeros_like(logits).scatter(-1, top.indices, torch.sigmoid(top.values))
    out = torch.zeros_like(x)
    for e in range(router.shape[0]):
        z = x * scores[:, e : e + 1]  # the score scales the expert's INPUT
        gate, up = (z @ gate_up[e].double()).chunk(2, dim=-1)
        out += (F.silu(gate) * up) @ down[e].double()
    shared_gate, shared_up, shared_down = (w.double() for w in shared)
    return out + (F.silu(x @ shared_gate.T) * (x @ shared_up.T)) @ shared_down.T


def make_moe(num_experts: int, top_k: int, seed: int = 0) -> MoE:
    torch.manual_seed(seed)
    config = l4lab.Config(hidden_size=32, moe_intermediate_size=24, num_experts=num_experts, top_k=top_k)
    moe = MoE(config, layer=0)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return moe


def test_sparse_dispatch_equals_the_dense_definition() -> None:
    for num_experts, top_k in ((1, 1), (4, 1), (8, 2), (5, 3)):
        moe = make_moe(num_experts, top_k)
        x = torch.randn(3, 7, 32)
        out, record = moe(x)
        shared = (
            moe.shared_expert.gate_proj.weight,
            moe.shared_expert.up_proj.weight,
            moe.shared_expert.down_proj.weight,
        )
        expected = dense_reference(
            x.reshape(-1, 32),
            moe.router.weight,
            moe.experts.gate_up_proj,
            moe.experts.down_proj,
            shared,
            top_k,
        )
        torch.testing.assert_close(out.reshape(-1, 32).double(), expected, rtol=1e-5, atol=1e-5)
        assert record.experts.shape == record.scores.shape == (3, 7, top_k)
        assert record.router_logits.shape == (3, 7, num_experts)


def test_scaling_the_input_is_not_scaling_the_output() -> None:
    """Guards the Llama 4 convention: silu-gated experts are not linear in their input."""
    moe = make_moe(4, 1)
    x = torch.randn(10, 32)
    experts, scores, _ = moe.router(x)
    ours = routed_experts(x, experts, scores, moe.experts.gate_up_proj, moe.experts.down_proj)
    on_output = routed_experts(
        x, experts, torch.ones_like(scores), moe.experts.gate_up_proj, moe.experts.down_proj
    )
    assert not torch.allclose(ours, on_output * scores)


def test_experts_with_no_tokens_and_their_gradients() -> None:
    moe = make_moe(6, 1)
    x = torch.randn(5, 32)
    experts = torch.tensor([[0], [0], [2], [2], [0]])  # experts 1, 3, 4, 5 receive nothing
    scores = torch.rand(5, 1)
    out = routed_experts(x, experts, scores, moe.experts.gate_up_proj, moe.experts.down_proj)
    out.square().sum().backward()
    grad = moe.experts.gate_up_proj.grad.abs().sum(dim=(1, 2))
    assert (grad[[0, 2]] > 0).all() and (grad[[1, 3, 4, 5]] == 0).all()


def test_compute_does_not_grow_with_the_number_of_experts() -> None:
    """Sparse dispatch: 16 experts cost what 1 does (transformers' dense bmm costs 16 times more)."""

    def flops(num_experts: int) -> int:
        moe = make_moe(num_experts, 1)
        with FlopCounterMode(display=False) as counter:
            moe(torch.randn(4, 64, 32))
        return counter.get_total_flops()

    one, sixteen = flops(1), flops(16)
    router_extra = 2 * 256 * 32 * 15  # the router's logits for 15 more experts
    assert sixteen == one + router_extra


def test_a_tiny_moe_learns() -> None:
    """Twenty AdamW steps on a repeating pattern drive the loss well down: gradients reach everything."""
    torch.manual_seed(0)
    model = l4lab.Llama4(l4lab.preset("tiny-moe"))
    data = torch.arange(64).remainder(13)[None].repeat(4, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        logits = model(data[:, :-1]).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), data[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]
    assert all(p.grad is not None for name, p in model.named_parameters() if "experts" not in name)
