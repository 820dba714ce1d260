"""l4lab's logits equal transformers' Llama 4 on the same weights (fp32, eager attention)."""

from __future__ import annotations

import pytest
import torch
from conftest import hf_model, hf_text_config, randomise, transformers

import l4lab
from l4lab.claims import relative_error

LLAMA3_SCALING = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 16.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
SCOUT_SCALING = {**LLAMA3_SCALING, "high_freq_factor": 1.0, "original_max_position_embeddings": 8}

CASES = {
    # chunk 8 < 37 tokens, NoPE every 2nd layer with floor_scale 4 (temperature != 1), MoE everywhere, top-1
    "irope-moe-top1-qknorm": dict(),
    # dense and MoE layers interleaved, top-2 routing, no QK norm
    "interleaved-top2-no-qknorm": dict(interleave_moe_layer_step=2, num_experts_per_tok=2, use_qk_norm=False),
    # Scout's RoPE scaling (a pure step: low == high)
    "scout-rope-scaling": dict(rope_parameters=SCOUT_SCALING),
    # Llama 3.1 scaling with an interpolated band, chunk 5 (not a power of two), NoPE every 4th layer
    "llama3-scaling-chunk5": dict(
        rope_parameters=LLAMA3_SCALING, attention_chunk_size=5, no_rope_layer_interval=4
    ),
    # dense SwiGLU everywhere, RoPE and global attention in every layer (Llama 3 style)
    "dense-rope": dict(moe_layers=[], no_rope_layers=[1, 1, 1, 1], attention_chunk_size=None),
    # one expert, no temperature tuning, chunk larger than the sequence
    "one-expert-no-temperature": dict(
        num_local_experts=1, attn_temperature_tuning=False, attention_chunk_size=64
    ),
    # multi-head attention (no GQA), 8 experts top-2, Maverick-like interleave
    "mha-8experts-top2": dict(
        num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2, interleave_moe_layer_step=2
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("batch", [1, 3])
def test_logits_match_transformers(name: str, batch: int) -> None:
    hf = hf_model(seed=len(name), **CASES[name])
    ours = l4lab.from_transformers(hf)
    ids = torch.randint(0, 97, (batch, 37), generator=torch.Generator().manual_seed(batch))
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids).logits
    assert got.shape == expected.shape == (batch, 37, 97)
    assert relative_error(got, expected) < 1e-5


def test_every_feature_fires_in_the_cases() -> None:
    """The cases above really exercise chunking, temperature, both FFNs, scaling and top-k 1 and 2."""
    plans = {name: l4lab.config_from_transformers(hf_text_config(**kw)) for name, kw in CASES.items()}
    assert any(c.attention_chunk_size < 37 and c.positions == "irope" for c in plans.values())
    assert all(c.floor_scale < 37 for c in plans.values())
    specs = [s for c in plans.values() for s in c.layer_plan()]
    assert {s.moe for s in specs} == {True, False}
    assert {s.qk_norm for s in specs} == {True, False}
    assert {s.temperature_tuning for s in specs} == {True, False}
    assert {c.top_k for c in plans.values()} == {1, 2}
    assert {c.rope_scaling is None for c in plans.values()} == {True, False}


def test_attention_probabilities_match_transformers() -> None:
    hf = hf_model(**CASES["irope-moe-top1-qknorm"])
    ours = l4lab.from_transformers(hf)
    ids = torch.randint(0, 97, (2, 21), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(ids, output_attentions=True).attentions
        out = ours(ids, return_attention=True)
    assert len(out.attentions) == len(expected) == 4
    for got, want in zip(out.attentions, expected, strict=True):
        assert got.shape == want.shape == (2, 4, 21, 21)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # the chunked layer (0) sees nothing across the chunk boundary at 8; the NoPE layer (1) does
    assert float(out.attentions[0][:, :, 8:16, :8].abs().max()) == 0.0
    assert float(out.attentions[1][:, :, 8:16, :8].min()) > 0.0
    # asking for probabilities does not change the logits
    torch.testing.assert_close(out.logits, ours(ids).logits, rtol=1e-5, atol=1e-5)


def test_router_logits_match_transformers() -> None:
    hf = hf_model(**CASES["interleaved-top2-no-qknorm"])
    ours = l4lab.from_transformers(hf)
    ids = torch.randint(0, 97, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids, output_router_logits=True).router_logits
        routing = ours(ids).routing
    assert [r.layer for r in routing] == [1, 3]
    assert len(expected) == len(routing)
    for record, want in zip(routing, expected, strict=True):
        torch.testing.assert_close(record.router_logits.reshape(-1, 4), want, rtol=1e-5, atol=1e-6)
        top = want.topk(2, dim=-1)
        assert torch.equal(record.experts.reshape(-1, 2), top.indices)
        torch.testing.assert_close(record.scores.reshape(-1, 2), torch.sigmoid(top.values))


def test_flipping_to_rope_matches_a_transformers_rope_model() -> None:
    """The positions toggle keeps the weights: iRoPE-trained weights run as Llama 3 style RoPE."""
    hf_irope = hf_model(**CASES["irope-moe-top1-qknorm"])
    ours = l4lab.from_transformers(hf_irope)
    ours.set_positions("rope")
    hf_rope = transformers.Llama4ForCausalLM(
        hf_text_config(no_rope_layers=[1, 1, 1, 1], attention_chunk_size=None, attn_temperature_tuning=False)
    ).eval()
    hf_rope.load_state_dict(hf_irope.state_dict())
    ids = torch.randint(0, 97, (2, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert relative_error(ours(ids).logits, hf_rope(ids).logits) < 1e-5
        ours.set_positions("irope")
        assert relative_error(ours(ids).logits, hf_irope(ids).logits) < 1e-5


def test_randomise_reaches_every_parameter() -> None:
    """Guard against a trivial pass: every weight, the experts' included, is redrawn before parity."""
    model = transformers.Llama4ForCausalLM(hf_text_config())
    with torch.no_grad():
        model.model.layers[0].feed_forward.experts.gate_up_proj.zero_()  # the bare experts module's init
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    randomise(model)
    for name, param in model.named_parameters():
        assert not torch.equal(param.detach(), before[name]), name
    assert float(model.model.layers[0].feed_forward.experts.gate_up_proj.detach().abs().min()) > 0.0
