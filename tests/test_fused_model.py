"""The whole model on the fused backend: the same logits, gradients and generated tokens as eager.

On a machine without a GPU the kernels run in Triton's interpreter (float32: exact dots), so the model is
tiny; every toggle still fires: MoE and dense layers, RoPE layers with QK norm and chunks shorter than the
sequence, NoPE layers with temperature tuning, top-1 and top-2 routing, prefill and decode with a cache.
"""

from __future__ import annotations

import builtins
import sys

import pytest
import torch
from kernel_testing import DEVICE

import l4lab
from l4lab.claims import relative_error
from l4lab.ops import ops_for

TINY = dict(
    vocab_size=61,
    hidden_size=32,
    num_layers=4,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    moe_intermediate_size=24,
    dense_intermediate_size=40,
    num_experts=4,
    top_k=1,
    moe_layer_step=2,  # layers 1 and 3 MoE, 0 and 2 dense
    nope_layer_interval=2,  # layers 1 and 3 NoPE
    attention_chunk_size=8,
    floor_scale=4,
    attn_scale=0.5,
    max_position_embeddings=256,
)


def model_pair(**overrides: object) -> tuple[l4lab.Llama4, l4lab.Llama4]:
    torch.manual_seed(0)
    eager = l4lab.Llama4(l4lab.Config(**{**TINY, **overrides})).to(DEVICE)
    fused = l4lab.Llama4(l4lab.Config(**{**TINY, **overrides, "backend": "fused"})).to(DEVICE)
    fused.load_state_dict(eager.state_dict())
    return eager, fused


TOLERANCE = 1e-5 if DEVICE == "cpu" else 1e-4  # float32 dots are IEEE on a GPU too, exp2 approximate


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("positions", ["irope", "rope"])
def test_logits_equal_eager(top_k: int, positions: str) -> None:
    eager, fused = model_pair(top_k=top_k, positions=positions)
    ids = torch.randint(0, 61, (2, 21), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    with torch.no_grad():
        expected, got = eager(ids), fused(ids)
    assert relative_error(got.logits, expected.logits) < TOLERANCE
    for ours, theirs in zip(got.routing, expected.routing, strict=True):
        assert torch.equal(ours.experts, theirs.experts)
        assert relative_error(ours.scores, theirs.scores) < TOLERANCE


def test_set_backend_switches_the_same_weights() -> None:
    eager, _ = model_pair()
    ids = torch.randint(0, 61, (1, 13), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    with torch.no_grad():
        expected = eager(ids).logits
        eager.set_backend("fused")
        assert all(m.ops.name == "fused" for m in eager.modules() if hasattr(m, "ops"))
        got = eager(ids).logits
    assert relative_error(got, expected) < TOLERANCE


def test_training_gradients_equal_eager() -> None:
    eager, fused = model_pair()
    ids = torch.randint(0, 61, (2, 17), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    for model in (eager, fused):
        logits = model(ids).logits
        torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    for (name, expected), got in zip(eager.named_parameters(), fused.parameters(), strict=True):
        assert got.grad is not None, name
        assert relative_error(got.grad, expected.grad) < 20 * TOLERANCE, name


def test_cached_generation_equals_eager() -> None:
    """Prefill, then decode one token at a time across chunk boundaries: the decode kernel's path."""
    eager, fused = model_pair()
    prompt = torch.randint(0, 61, (2, 5), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    tokens = fused.generate(prompt, max_new_tokens=14)
    if DEVICE == "cpu":  # float32 dots are exact in the interpreter: the very same tokens
        assert torch.equal(tokens, eager.generate(prompt, max_new_tokens=14))
        return
    # another summation order on a GPU may flip a near-tie: each token must be eager's argmax up to the
    # tolerance
    with torch.no_grad():
        logits = eager(tokens).logits[:, prompt.shape[1] - 1 : -1]
    chosen = logits.gather(-1, tokens[:, prompt.shape[1] :, None])[..., 0]
    assert (chosen >= logits.max(-1).values - TOLERANCE * logits.abs().max()).all()


def test_need_probs_returns_the_same_attention_maps() -> None:
    eager, fused = model_pair()
    ids = torch.randint(0, 61, (1, 12), generator=torch.Generator().manual_seed(5)).to(DEVICE)
    with torch.no_grad():
        expected, got = eager(ids, return_attention=True), fused(ids, return_attention=True)
    for ours, theirs in zip(got.attentions, expected.attentions, strict=True):
        assert relative_error(ours, theirs) < TOLERANCE


@pytest.mark.skipif(DEVICE != "cpu", reason="only the CPU interpreter gets bfloat16 products wrong")
def test_bfloat16_on_the_cpu_is_refused_not_computed_wrongly() -> None:
    _, fused = model_pair()
    with pytest.raises(ValueError, match="bfloat16 on the CPU"):
        fused.to(torch.bfloat16)(torch.randint(0, 61, (1, 9)))


def test_fused_without_triton_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_triton(name: str, *args: object, **kwargs: object) -> object:
        if name == "triton" or name.startswith("triton."):
            raise ModuleNotFoundError("No module named 'triton'", name="triton")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_triton)
    for name in [
        name for name in sys.modules if name == "triton" or name.startswith(("triton.", "l4lab.kernels"))
    ]:
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(ImportError, match=r"pip install 'l4lab\[kernels\]'"):
        ops_for("fused")
    assert ops_for("eager").name == "eager"  # the eager backend needs no Triton
