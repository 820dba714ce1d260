"""Llama 2/3 and Mixtral from the same code: logits equal transformers' LlamaForCausalLM and
MixtralForCausalLM on random tiny configs (every weight redrawn), checkpoints both ways, the router
variants against float64 definitions, and the fused backend refusing what it does not implement."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import randomise, transformers

import l4lab
from l4lab import interop
from l4lab.claims import relative_error
from l4lab.model import MoE

VOCAB = 97
IDS = torch.randint(0, VOCAB, (2, 41), generator=torch.Generator().manual_seed(3))

LLAMA_BASE: dict[str, Any] = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=80,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
)
LLAMA_CASES: dict[str, dict[str, Any]] = {
    # Llama 2 7B's shape of choices: multi-head attention, theta 10000
    "llama2-mha": dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    # Llama 3: GQA, theta 500000, eps 1e-6, head_dim not hidden / heads
    "llama3-gqa": dict(
        num_key_value_heads=2,
        head_dim=24,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    ),
    # Llama 3.1: RoPE scaling with an interpolated band that the 41 tokens reach
    "llama3.1-scaling": dict(
        num_key_value_heads=1,
        num_hidden_layers=2,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ),
}

MIXTRAL_BASE: dict[str, Any] = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    num_local_experts=4,
    num_experts_per_tok=2,
    max_position_embeddings=256,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
)
MIXTRAL_CASES: dict[str, dict[str, Any]] = {
    # Mixtral 8x7B's choices: top-2 of 8, no window
    "top2-of-8": dict(num_local_experts=8),
    # a sliding window shorter than the sequence (Mistral's), top-2 of 4
    "window-7": dict(sliding_window=7),
    # top-1 and top-3, multi-head attention
    "top1": dict(num_experts_per_tok=1, num_key_value_heads=4),
    "top3-window-16": dict(num_experts_per_tok=3, sliding_window=16, num_hidden_layers=2),
}


def llama(seed: int = 0, **overrides: Any) -> Any:
    config = transformers.LlamaConfig(**{**LLAMA_BASE, **overrides})
    config._attn_implementation = "eager"
    return randomise(transformers.LlamaForCausalLM(config).eval(), seed)


def mixtral(seed: int = 0, **overrides: Any) -> Any:
    config = transformers.MixtralConfig(**{**MIXTRAL_BASE, **overrides})
    config._attn_implementation = "eager"
    return randomise(transformers.MixtralForCausalLM(config).eval(), seed)


def logits(model: torch.nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


# ---------------------------------------------------------------------- Llama 2/3
@pytest.mark.parametrize("name", sorted(LLAMA_CASES))
def test_llama_logits_match_transformers(name: str) -> None:
    hf = llama(seed=len(name), **LLAMA_CASES[name])
    ours = l4lab.from_transformers(hf)
    plan = ours.config.layer_plan()
    assert ours.config.ffn == "dense" and all(s.uses_rope and s.chunk_size is None for s in plan)
    assert relative_error(logits(ours), logits(hf)) < 1e-5


def test_llama31_scaling_is_read_and_matters() -> None:
    hf = llama(**LLAMA_CASES["llama3.1-scaling"])
    ours = l4lab.from_transformers(hf)
    assert ours.config.rope_scaling == l4lab.RopeScaling(8.0, 1.0, 4.0, 16)
    ours.reconfigure(rope_scaling=None)
    assert relative_error(logits(ours), logits(hf)) > 1e-3


def test_the_qk_row_permutation_is_what_makes_llama_exact() -> None:
    """Without moving q/k rows from rotate-half to interleaved order, the logits differ."""
    hf = llama(**LLAMA_CASES["llama3-gqa"])
    ours = l4lab.from_transformers(hf)
    q = ours.layers[0].self_attn.q_proj.weight
    hf_q = hf.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(interop.rotate_half_rope_rows(q, 4, 24), hf_q)
    assert torch.equal(interop.interleaved_rope_rows(hf_q, 4, 24), q)
    with torch.no_grad():
        for layer, theirs in zip(ours.layers, hf.model.layers, strict=True):
            layer.self_attn.q_proj.weight.copy_(theirs.self_attn.q_proj.weight)
            layer.self_attn.k_proj.weight.copy_(theirs.self_attn.k_proj.weight)
    assert relative_error(logits(ours), logits(hf)) > 1e-2


def test_llama_checkpoints_both_ways(tmp_path: Path) -> None:
    hf = llama(seed=7, **LLAMA_CASES["llama3.1-scaling"])
    hf.save_pretrained(tmp_path / "hub")  # the hub layout, as transformers writes it
    ours = l4lab.load_pretrained(tmp_path / "hub")
    assert relative_error(logits(ours), logits(hf)) < 1e-5
    ours.save_pretrained(tmp_path / "back", layout="llama")
    assert '"model_type": "llama"' in (tmp_path / "back" / "config.json").read_text()
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.float32).eval()
    reloaded.config._attn_implementation = "eager"
    assert relative_error(logits(reloaded), logits(hf)) < 1e-5
    again = l4lab.load_pretrained(tmp_path / "back")
    assert again.config == ours.config
    assert relative_error(logits(again), logits(ours)) == 0.0


# ---------------------------------------------------------------------- Mixtral
@pytest.mark.parametrize("name", sorted(MIXTRAL_CASES))
def test_mixtral_logits_match_transformers(name: str) -> None:
    hf = mixtral(seed=len(name), **MIXTRAL_CASES[name])
    ours = l4lab.from_transformers(hf)
    plan = ours.config.layer_plan()
    assert all(s.router is not None and s.router.kind == "mixtral" for s in plan)
    assert all(layer.feed_forward.shared_expert is None for layer in ours.layers)
    assert relative_error(logits(ours), logits(hf)) < 1e-5


def test_the_sliding_window_fires_and_matters() -> None:
    hf = mixtral(**MIXTRAL_CASES["window-7"])
    ours = l4lab.from_transformers(hf)
    assert [s.window for s in ours.config.layer_plan()] == [7, 7, 7]
    ours.reconfigure(sliding_window=None)
    assert relative_error(logits(ours), logits(hf)) > 1e-3


def test_sliding_window_decoding_keeps_window_minus_one_keys() -> None:
    ours = l4lab.from_transformers(mixtral(**MIXTRAL_CASES["window-7"]))
    full = logits(ours, IDS[:1])
    cache = ours.new_cache()
    with torch.no_grad():
        steps = [ours(IDS[:1, :10], cache=cache).logits]
        for t in range(10, IDS.shape[1]):
            steps.append(ours(IDS[:1, t : t + 1], cache=cache).logits)
    assert cache.lengths() == [6, 6, 6]
    assert relative_error(torch.cat(steps, dim=1), full) < 1e-5


def test_mixtral_checkpoints_both_ways(tmp_path: Path) -> None:
    hf = mixtral(seed=11, **MIXTRAL_CASES["window-7"])
    hf.save_pretrained(tmp_path / "hub")  # experts one by one: block_sparse_moe.experts.{j}.w1/w2/w3
    ours = l4lab.load_pretrained(tmp_path / "hub")
    assert ours.config.sliding_window == 7
    assert relative_error(logits(ours), logits(hf)) < 1e-5
    ours.save_pretrained(tmp_path / "back")  # a Mixtral-routed model saves as Mixtral by default
    reloaded = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.float32).eval()
    reloaded.config._attn_implementation = "eager"
    assert relative_error(logits(reloaded), logits(hf)) < 1e-5
    again = l4lab.load_pretrained(tmp_path / "back")
    assert again.config == ours.config
    assert relative_error(logits(again), logits(ours)) == 0.0


def test_a_missing_expert_is_named(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    mixtral(**MIXTRAL_CASES["top1"]).save_pretrained(tmp_path / "hub")
    weights = load_file(tmp_path / "hub" / "model.safetensors")
    del weights["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    save_file(weights, tmp_path / "hub" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing keys .*layers\.1\.block_sparse_moe\.experts\.2\.w3"):
        l4lab.load_pretrained(tmp_path / "hub")


def test_layouts_refuse_what_they_cannot_express(tmp_path: Path) -> None:
    with pytest.raises(
        ValueError, match=r"'llama' checkpoint cannot express.*positions = 'irope'.*ffn = 'moe'"
    ):
        l4lab.Llama4(l4lab.preset("tiny-moe")).save_pretrained(tmp_path / "a", layout="llama")
    deepseek = l4lab.Llama4(l4lab.preset("tiny-moe", router="deepseek", routed_scaling_factor=2.5))
    with pytest.raises(ValueError, match=r"'llama4' checkpoint cannot express.*router = 'deepseek'"):
        deepseek.save_pretrained(tmp_path / "b")
    with pytest.raises(ValueError, match="layout 'gpt' is not known"):
        deepseek.save_pretrained(tmp_path / "c", layout="gpt")
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------------- the routers, float64
def expert64(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    gate, up = (x @ gate_up.double()).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ down.double()


def reference_moe(moe: MoE, x: torch.Tensor, kind: str, top_k: int, factor: float = 1.0) -> torch.Tensor:
    """Each router's published definition, written out token by token in float64."""
    x = x.double()
    logits = x @ moe.router.weight.double().T
    bias = moe.router.selection_bias.double()
    gate_up, down = moe.experts.gate_up_proj, moe.experts.down_proj
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        if kind == "mixtral":  # softmax over all, top-k, renormalised, scales the output
            probs = logits[n].softmax(-1)
            chosen = (probs + bias).topk(top_k).indices
            weights = probs[chosen] / probs[chosen].sum()
        else:  # DeepSeek-V3: sigmoid, top-k of score + bias, renormalised, times a factor
            probs = torch.sigmoid(logits[n])
            chosen = (probs + bias).topk(top_k).indices
            weights = probs[chosen] / probs[chosen].sum() * factor
        for e, w in zip(chosen.tolist(), weights, strict=True):
            out[n] += w * expert64(x[n : n + 1], gate_up[e], down[e])[0]
    if moe.shared_expert is not None:
        s = moe.shared_expert
        out += (F.silu(x @ s.gate_proj.weight.double().T) * (x @ s.up_proj.weight.double().T)) @ (
            s.down_proj.weight.double().T
        )
    return out


@pytest.mark.parametrize(
    ("kind", "top_k", "factor"), [("mixtral", 2, 1.0), ("mixtral", 3, 1.0), ("deepseek", 2, 2.5)]
)
def test_router_variants_match_float64_definitions(kind: str, top_k: int, factor: float) -> None:
    torch.manual_seed(top_k)
    config = l4lab.Config(
        hidden_size=32,
        moe_intermediate_size=24,
        num_experts=6,
        top_k=top_k,
        router=kind,
        routed_scaling_factor=factor,
    )
    moe = MoE(config, layer=0)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    moe.router.selection_bias.normal_(0.0, 0.2)  # balancing biases choose, never weigh
    assert (moe.shared_expert is None) == (kind == "mixtral")
    x = torch.randn(3, 5, 32)
    with torch.no_grad():
        out, record = moe(x)
    expected = reference_moe(moe, x.reshape(-1, 32), kind, top_k, factor)
    assert relative_error(out.reshape(-1, 32).double(), expected) < 1e-5
    assert record.experts.shape == (3, 5, top_k)
    if kind == "mixtral":  # the chosen weights of a renormalised router sum to one
        assert torch.allclose(record.scores.sum(-1), torch.ones(3, 5))


# ---------------------------------------------------------------------- the fused backend refuses
def test_fused_backend_refuses_other_routers_and_windows() -> None:
    with pytest.raises(ValueError, match=r"'eager' with router = 'mixtral': the fused kernels implement"):
        l4lab.preset("tiny-moe", router="mixtral", backend="fused")
    with pytest.raises(ValueError, match=r"'eager' with a sliding_window"):
        l4lab.preset("tiny", positions="rope", sliding_window=8, backend="fused")
    model = l4lab.from_transformers(mixtral(**MIXTRAL_CASES["top1"]))
    with pytest.raises(ValueError, match="router = 'mixtral'"):
        model.set_backend("fused")
    assert {m.ops.name for m in model.modules() if hasattr(m, "ops")} == {"eager"}  # nothing half-switched


def test_fused_kernels_refuse_them_too() -> None:
    kernels = pytest.importorskip("l4lab.kernels")
    logits = torch.randn(4, 6)
    spec = l4lab.config.router_spec("mixtral")
    with pytest.raises(NotImplementedError, match="Llama 4's router only, not 'mixtral'"):
        kernels.moe.route(logits, torch.zeros(6), 2, spec)
    x, ids, scores = torch.randn(4, 8), torch.zeros(4, 1, dtype=torch.long), torch.ones(4, 1)
    with pytest.raises(NotImplementedError, match="scaling the output"):
        kernels.moe.routed_experts(x, ids, scores, torch.randn(2, 8, 6), torch.randn(2, 3, 8), None, True)
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(NotImplementedError, match="no sliding window"):
        kernels.attention.attention(q, q, q, 0, 0, None, None, False, 3)


def test_sliding_window_needs_global_rope() -> None:
    with pytest.raises(
        ValueError, match=r"Config\.sliding_window = 8 is not allowed: None under positions='irope'"
    ):
        l4lab.preset("tiny", sliding_window=8)
    with pytest.raises(ValueError, match=r"routed_scaling_factor = 2\.5 is not allowed: 1\.0 unless router"):
        l4lab.preset("tiny-moe", routed_scaling_factor=2.5)


def test_deepseek_router_matches_transformers_deepseek_v3_moe() -> None:
    """DeepSeek-V3's MoE block (one group, so no group-limited choice) with a non-zero balancing bias."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    hf_config = transformers.DeepseekV3Config(
        hidden_size=32,
        moe_intermediate_size=24,
        n_routed_experts=6,
        num_experts_per_tok=2,
        n_shared_experts=1,
        n_group=1,
        topk_group=1,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
    )
    hf = randomise(DeepseekV3MoE(hf_config).eval(), seed=4)
    with torch.no_grad():
        hf.gate.e_score_correction_bias.normal_(0.0, 0.2, generator=torch.Generator().manual_seed(1))
    config = l4lab.Config(
        hidden_size=32,
        moe_intermediate_size=24,
        num_experts=6,
        top_k=2,
        router="deepseek",
        routed_scaling_factor=2.5,
    )
    ours = MoE(config, layer=0)
    with torch.no_grad():
        ours.router.weight.copy_(hf.gate.weight)
        ours.router.selection_bias.copy_(hf.gate.e_score_correction_bias)
        ours.experts.gate_up_proj.copy_(hf.experts.gate_up_proj.transpose(1, 2))
        ours.experts.down_proj.copy_(hf.experts.down_proj.transpose(1, 2))
        for proj in ("gate_proj", "up_proj", "down_proj"):
            getattr(ours.shared_expert, proj).weight.copy_(getattr(hf.shared_experts, proj).weight)
        x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(2))
        assert relative_error(ours(x)[0], hf(x)) < 1e-5
