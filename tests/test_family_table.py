"""The family table: every open model's size computed from its preset and checked against the published
figure; Behemoth's estimate; closed models without invented numbers; KV cache and FLOPs per token."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import l4lab
from l4lab import family

# (total, active) in billions, as published: model cards, papers, release notes (see l4lab.family)
PUBLISHED_SIZES = {
    "llama1-7b": (6.7, 6.7),
    "llama1-65b": (65.2, 65.2),
    "llama2-7b": (6.74, 6.74),
    "llama2-13b": (13.0, 13.0),
    "llama2-70b": (69.0, 69.0),
    "llama3-8b": (8.03, 8.03),
    "llama3-70b": (70.6, 70.6),
    "llama3.1-405b": (405.9, 405.9),
    "mixtral-8x7b": (46.7, 12.9),
    "mixtral-8x22b": (141.0, 39.0),
    "llama4-scout": (109.0, 17.0),
    "llama4-maverick": (400.0, 17.0),
    "llama4-behemoth": (2000.0, 288.0),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_SIZES))
def test_presets_reproduce_the_published_sizes(name: str) -> None:
    total, active = l4lab.count_params(l4lab.preset(name))
    published_total, published_active = PUBLISHED_SIZES[name]
    assert abs(total / 1e9 / published_total - 1) < 0.015
    assert abs(active / 1e9 / published_active - 1) < 0.015


def test_the_table_covers_the_issue_list() -> None:
    assert set(family.PUBLISHED) == set(PUBLISHED_SIZES)
    rows = {row.model: row for row in family.family_table()}
    assert set(rows) == set(PUBLISHED_SIZES) | {"deepseek-v3", "gpt-4", "claude-3", "gemini-1.5-pro"}
    for name in ("gpt-4", "claude-3", "gemini-1.5-pro"):
        row = rows[name]
        assert row.total is row.active is row.published_total_b is row.kv_cache_bytes is None
        assert "architecture not published" in row.notes
    assert (rows["gpt-4"].context, rows["claude-3"].context, rows["gemini-1.5-pro"].context) == (
        32768,
        200000,
        1000000,
    )
    assert rows["llama4-behemoth"].context is None and "ESTIMATED" in rows["llama4-behemoth"].notes
    assert rows["llama3.1-405b"].positions == "RoPE (theta 500000, scaled x8), global"
    assert rows["llama4-scout"].positions.startswith("iRoPE")


def test_why_8x22b_is_not_176b() -> None:
    """Only the feed-forward is replicated per expert: attention and embeddings are shared."""
    config = l4lab.preset("mixtral-8x22b")
    parts = family.param_breakdown(config)
    assert sum(parts.values()) == l4lab.count_params(config)[0]
    one_expert_model = (
        parts["embeddings"] + parts["attention"] + parts["routers"] + parts["routed_experts"] // 8
    )
    naive = 8 * one_expert_model
    assert naive - l4lab.count_params(config)[0] == 7 * (
        parts["embeddings"] + parts["attention"] + parts["routers"]
    )
    assert 175e9 < naive < 180e9


def test_kv_cache_by_hand() -> None:
    # Llama 2 70B at 4096 tokens, bf16: 80 layers x 4096 x 2 (K, V) x 8 heads x 128 x 2 bytes = 1.34 GB
    assert family.kv_cache_bytes(l4lab.preset("llama2-70b"), 4096) == 80 * 4096 * 2 * 8 * 128 * 2
    # Scout at 10M: 12 NoPE layers keep everything, 36 chunked layers one chunk of 8192
    scout = family.kv_cache_bytes(l4lab.preset("llama4-scout"), 10485760)
    assert scout == (12 * 10485760 + 36 * 8192) * 2 * 8 * 128 * 2
    # a sliding window keeps at most the window
    windowed = l4lab.preset("mixtral-8x7b", sliding_window=4096)
    assert family.kv_cache_bytes(windowed, 32768) == 32 * 4096 * 2 * 8 * 128 * 2


def test_flops_per_token_against_torch_flop_counter() -> None:
    """torch counts every matmul, attention's too when the probabilities are formed (T keys per query,
    masked or not); ours counts a causal query's visible keys: (T + 1) / 2 on average."""
    config = l4lab.preset("tiny", positions="rope", num_layers=2)
    model = l4lab.Llama4(config)
    length = 32
    ids = torch.zeros(1, length, dtype=torch.long)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(ids, return_attention=True)
    attention_per_key = config.num_layers * 4 * config.num_heads * config.head_dim
    counted = counter.get_total_flops() / length
    causal_discount = attention_per_key * (length - (length + 1) / 2)
    assert family.flops_per_token(config, length) == pytest.approx(counted - causal_discount, rel=1e-9)


def test_chunked_attention_costs_a_chunk_not_the_context() -> None:
    scout = l4lab.preset("llama4-scout")
    long = family.flops_per_token(scout, 1048576)
    global_rope = family.flops_per_token(scout.replace(positions="rope"), 1048576)
    assert long < global_rope / 2


def test_llama2_to_llama4_changes_one_thing_per_step() -> None:
    steps = family.llama2_to_llama4()
    assert steps[-1].config == l4lab.preset("llama4-scout", vision=None)
    fields = [
        {k for k, v in a.config.to_dict().items() if v != b.config.to_dict()[k]}
        for a, b in itertools.pairwise(steps)
    ]
    assert fields == [
        {"num_kv_heads"},
        {"rope_theta", "rope_scaling"},
        {"ffn", "router", "num_experts", "top_k"},
        {"router", "top_k"},
        {"positions"},
        {"use_qk_norm"},
    ]
    active = [l4lab.count_params(s.config)[1] for s in steps]
    d = 5120
    assert active[3] - active[2] == 48 * 16 * d  # the MoE keeps the active FFN width: only routers added
    assert active[4] == active[3]  # top-1 + shared = top-2 in active width
    kv = [family.kv_cache_bytes(s.config, 10485760) for s in steps]
    assert kv[0] == 5 * kv[1]  # 40 -> 8 KV heads
