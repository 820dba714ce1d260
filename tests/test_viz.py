"""Figures: the data inside each returned figure, checked against the inputs and hand computations."""

from __future__ import annotations

import math

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio
import pytest
import torch

import l4lab
from l4lab import viz
from l4lab.config import LayerSpec
from l4lab.routing import RoutingStats

CHUNKED = LayerSpec(index=0, uses_rope=True, chunk_size=4, temperature_tuning=False, qk_norm=True, moe=True)
GLOBAL_NOPE = LayerSpec(
    index=3, uses_rope=False, chunk_size=None, temperature_tuning=True, qk_norm=False, moe=True
)


def causal_uniform(length: int, chunk: int | None = None) -> torch.Tensor:
    """Attention that spreads evenly over every visible key: [T, T]."""
    i = torch.arange(length)[:, None]
    j = torch.arange(length)[None, :]
    visible = (j <= i) & ((j // chunk == i // chunk) if chunk else True)
    return visible.float() / visible.float().sum(-1, keepdim=True)


def shapes_at(fig: go.Figure, axis: str) -> list[float]:
    """Positions of the vertical (axis="x") or horizontal (axis="y") line shapes of a figure."""
    return sorted(
        s[f"{axis}0"] for s in fig.layout.shapes if s.type == "line" and s[f"{axis}0"] == s[f"{axis}1"]
    )


# ---------------------------------------------------------------------- routing
def test_expert_load_figure_bars_and_heatmap() -> None:
    loads = torch.tensor([[0.5, 0.25, 0.25, 0.0], [0.25, 0.25, 0.25, 0.25], [0.1, 0.2, 0.3, 0.4]])
    fig = viz.expert_load_figure(loads, layer_ids=[0, 2, 5])
    assert len(fig.data) == 3
    assert [t.name for t in fig.data] == ["layer 0", "layer 2", "layer 5"]
    for trace, row in zip(fig.data, loads, strict=True):
        np.testing.assert_allclose(trace.y, row.numpy(), rtol=1e-7)
        np.testing.assert_array_equal(trace.x, [0, 1, 2, 3])
    assert shapes_at(fig, "y") == [0.25]  # the uniform line at 1/E
    assert fig.layout.barmode == "group"

    heat = viz.expert_load_figure(list(loads), kind="heatmap")  # a list of [E] tensors works too
    np.testing.assert_allclose(heat.data[0].z, loads.numpy(), rtol=1e-7)
    assert heat.data[0].zmid == 0.25
    assert list(heat.data[0].y) == ["layer 0", "layer 1", "layer 2"]

    counts = viz.expert_load_figure([[2, 1, 1, 0]])  # counts are normalised
    np.testing.assert_allclose(counts.data[0].y, [0.5, 0.25, 0.25, 0.0])
    with pytest.raises(ValueError, match="kind"):
        viz.expert_load_figure(loads, kind="pie")


def test_token_expert_figure_grid() -> None:
    tokens = [chr(ord("a") + i % 26) for i in range(45)]
    tokens[1], tokens[2], tokens[3] = " ", "\n", "<b>"
    experts = [(i * 7) % 5 for i in range(45)]
    fig = viz.token_expert_figure(tokens, torch.tensor(experts), num_experts=5, columns=20)
    heat = fig.data[0]
    z = np.asarray(heat.z)
    assert z.shape == (3, 20)  # 45 tokens in rows of 20
    np.testing.assert_array_equal(z.reshape(-1)[:45], experts)
    assert np.isnan(z.reshape(-1)[45:]).all()
    assert heat.text[0][0] == "a" and heat.text[0][1] == "␣" and heat.text[0][2] == "↵"
    assert heat.text[0][3] == "&lt;b&gt;"  # not read as bold markup
    assert heat.text[2][4] == tokens[44] and heat.text[2][5] == ""
    assert (heat.zmin, heat.zmax) == (-0.5, 4.5)  # one colour step per expert
    assert len(heat.colorscale) == 2 * 5
    assert fig.layout.yaxis.autorange == "reversed"  # read top to bottom
    with pytest.raises(ValueError, match="tokens"):
        viz.token_expert_figure(tokens, experts[:-1], num_experts=5)
    with pytest.raises(ValueError, match="expert ids"):
        viz.token_expert_figure(["a"], [5], num_experts=5)


def test_specialisation_figure_is_row_normalised() -> None:
    counts = torch.tensor([[6, 2, 0, 2], [1, 1, 1, 1], [0, 0, 0, 0]])
    fig = viz.specialisation_figure(counts, ["code", "maths", "empty"])
    expected = np.array([[0.6, 0.2, 0.0, 0.2], [0.25, 0.25, 0.25, 0.25], [0.0, 0.0, 0.0, 0.0]])
    np.testing.assert_allclose(fig.data[0].z, expected)
    assert list(fig.data[0].y) == ["code", "maths", "empty"]
    assert list(fig.data[0].x) == ["expert 0", "expert 1", "expert 2", "expert 3"]
    assert "P(expert | domain)" in fig.layout.title.text


def test_routing_stats_table_cells_beside_the_references() -> None:
    stats = [
        RoutingStats(1, torch.full((8,), 1 / 8), math.log(8), 1.0, 0.0, 1.0, 2.5, 0.27, 0.125),
        RoutingStats(3, torch.tensor([0.5, 0.5]), math.log(2), 1.0, 0.04123, 1.0312, 2.5, math.nan, math.nan),
    ]
    fig = viz.routing_stats_table(stats)
    table = fig.data[0]
    assert isinstance(table, go.Table)
    layer, same, chance, switch, maxvio, entropy = (list(column) for column in table.cells.values)
    assert layer == ["published", "source", "1", "3"]
    assert same[0] == viz.ROUTING_REFERENCES["same_expert_rate"]["published"] and "25-28%" in same[0]
    assert "Mixtral" in same[1]
    assert same[2:] == ["27.0%", "-"]
    assert "12.5%" in chance[0] and chance[2:] == ["12.5%", "-"]
    assert "1.00" in switch[0] and switch[2:] == ["1.000", "1.031"]
    assert "0.04" in maxvio[0] and "0.5-0.7" in maxvio[0] and "DeepSeek-V3" in maxvio[1]
    assert maxvio[2:] == ["0.000", "0.041"]
    assert entropy[2:] == ["1.000", "1.000"]
    assert all(ref["source"] for ref in viz.ROUTING_REFERENCES.values())


# ---------------------------------------------------------------------- attention
def test_attention_map_figure_chunked_and_global() -> None:
    probs = causal_uniform(10, chunk=4)
    fig = viz.attention_map_figure(probs, CHUNKED)
    np.testing.assert_allclose(fig.data[0].z, probs.numpy())
    # chunks [0..3], [4..7], [8, 9]: boundaries between keys 3|4 and 7|8, both ways
    assert shapes_at(fig, "x") == [3.5, 7.5]
    assert shapes_at(fig, "y") == [3.5, 7.5]
    assert "RoPE, chunked C=4" in fig.layout.title.text
    assert fig.layout.yaxis.autorange == "reversed"

    nope = viz.attention_map_figure(causal_uniform(10), GLOBAL_NOPE)
    assert len(nope.layout.shapes) == 0
    assert "NoPE, global, temperature tuned" in nope.layout.title.text
    assert viz.attention_map_figure(probs, CHUNKED, title="mine").layout.title.text == "mine"
    with pytest.raises(ValueError, match="one head"):
        viz.attention_map_figure(probs[None, None], CHUNKED)


def test_attention_mass_by_distance_by_hand() -> None:
    probs = torch.tensor([[1.0, 0.0, 0.0], [0.25, 0.75, 0.0], [0.2, 0.3, 0.5]])
    mass = viz.attention_mass_by_distance(probs)
    # distance 0 (the diagonal), 1 (first sub-diagonal), 2, each averaged over the 3 queries
    np.testing.assert_allclose(mass.numpy(), [(1 + 0.75 + 0.5) / 3, (0.25 + 0.3) / 3, 0.2 / 3], rtol=1e-6)
    assert mass.sum().item() == pytest.approx(1.0)
    # leading dims are averaged: a second head that only looks at itself
    heads = torch.stack([probs, torch.eye(3)])[None]  # [1, 2, 3, 3]
    np.testing.assert_allclose(
        viz.attention_mass_by_distance(heads).numpy(), (mass.numpy() + np.array([1, 0, 0])) / 2, rtol=1e-6
    )
    # one query at the end of 4 keys (decoding): key j is 3 - j back
    last = viz.attention_mass_by_distance(torch.tensor([[0.1, 0.2, 0.3, 0.4]]))
    np.testing.assert_allclose(last.numpy(), [0.4, 0.3, 0.2, 0.1], rtol=1e-6)


def test_attention_distance_figure() -> None:
    attentions = [causal_uniform(12, chunk=4)[None, None], causal_uniform(12)[None, None].repeat(2, 3, 1, 1)]
    fig = viz.attention_distance_figure(attentions, [CHUNKED, GLOBAL_NOPE])
    assert len(fig.data) == 2
    assert "RoPE" in fig.data[0].name and "NoPE" in fig.data[1].name
    np.testing.assert_allclose(
        fig.data[0].y, viz.attention_mass_by_distance(attentions[0]).numpy(), rtol=1e-6
    )
    assert (np.asarray(fig.data[0].y)[4:] == 0).all()  # a chunk of 4 never looks 4 or more tokens back
    assert (np.asarray(fig.data[1].y) > 0).all()  # a global layer does
    assert shapes_at(fig, "x") == [4]
    short = viz.attention_distance_figure(attentions, [CHUNKED, GLOBAL_NOPE], max_distance=5)
    assert [len(t.y) for t in short.data] == [6, 6]
    with pytest.raises(ValueError, match="return_attention"):
        viz.attention_distance_figure([None], [CHUNKED])


def test_attention_figures_from_a_model() -> None:
    torch.manual_seed(0)
    config = l4lab.preset("tiny-moe", attention_chunk_size=8, floor_scale=4)
    out = l4lab.Llama4(config)(torch.randint(0, 256, (1, 20)), return_attention=True)
    plan = config.layer_plan()
    fig = viz.attention_distance_figure(out.attentions, plan)
    assert len(fig.data) == config.num_layers
    assert [("NoPE" in t.name) for t in fig.data] == [not spec.uses_rope for spec in plan]
    chunked = viz.attention_map_figure(out.attentions[0][0, 1], plan[0])
    assert shapes_at(chunked, "x") == [7.5, 15.5]


def test_temperature_figure() -> None:
    fig = viz.temperature_figure(floor_scale=8192, attn_scale=0.1, max_position=10_000_000)
    assert fig.layout.xaxis.type == "log"
    x, y = np.asarray(fig.data[0].x), np.asarray(fig.data[0].y)
    assert x[0] == 1 and x[-1] == 10_000_000
    assert (y[x < 8191] == 1.0).all()
    assert y[x == 8191][0] == pytest.approx(1 + 0.1 * math.log(2), rel=1e-6)
    assert y[-1] == pytest.approx(1 + 0.1 * math.log(10_000_001 // 8192 + 1), rel=1e-6)  # 1.71
    assert y[-1] == pytest.approx(1.71, abs=0.005)
    assert shapes_at(fig, "x") == [8191]


# ---------------------------------------------------------------------- long context
def test_accuracy_vs_length_figure() -> None:
    lengths = [64, 128, 256, 512, 1024]
    accuracies = {"RoPE": [1.0, 1.0, 0.84, 0.31, 0.18], "iRoPE": [1.0, 1.0, 1.0, 0.9, 0.7]}
    fig = viz.accuracy_vs_length_figure(lengths, accuracies, train_length=256)
    assert [t.name for t in fig.data] == ["RoPE", "iRoPE"]
    np.testing.assert_allclose(fig.data[1].y, accuracies["iRoPE"])
    np.testing.assert_array_equal(fig.data[0].x, lengths)
    assert fig.layout.xaxis.type == "log"
    assert shapes_at(fig, "x") == [256]
    assert list(fig.layout.xaxis.ticktext) == ["64", "128", "256", "512", "1K"]
    assert len(viz.accuracy_vs_length_figure(lengths, accuracies).layout.shapes) == 0
    with pytest.raises(ValueError, match="lengths"):
        viz.accuracy_vs_length_figure(lengths, {"short": [1.0]})


def test_needle_heatmap() -> None:
    accuracy = [[1.0, 1.0, 0.5], [1.0, 0.8, 0.1]]
    fig = viz.needle_heatmap([0.0, 0.5], [1024, 8192, 1 << 20], accuracy)
    np.testing.assert_allclose(fig.data[0].z, accuracy)
    assert list(fig.data[0].x) == ["1K", "8K", "1M"]
    assert list(fig.data[0].y) == ["0%", "50%"]
    assert (fig.data[0].zmin, fig.data[0].zmax) == (0.0, 1.0)
    with pytest.raises(ValueError, match="shape"):
        viz.needle_heatmap([0.0], [1024], accuracy)


def test_kv_cache_memory_for_scout_by_hand() -> None:
    scout = l4lab.preset("llama4-scout")
    per_token_layer = 8 * 128 * 2 * 2  # KV heads x head_dim x (K, V) x bf16 bytes = 4096
    lengths = [4096, 8192, 1_000_000, 10_000_000]
    memory = viz.kv_cache_memory(scout, lengths)
    # 10M tokens: 12 of 48 layers global (every 4th is NoPE), 36 chunked at 8192 keys
    assert memory["all_global"][-1] == 48 * 10_000_000 * per_token_layer == 1_966_080_000_000
    assert memory["irope"][-1] == (12 * 10_000_000 + 36 * 8192) * per_token_layer == 492_727_959_552
    # below one chunk the plans keep the same keys; beyond it chunked layers stop growing
    assert memory["irope"][:2] == memory["all_global"][:2]
    chunked_part = [m - 12 * t * per_token_layer for m, t in zip(memory["irope"], lengths, strict=True)]
    assert chunked_part[1:] == [36 * 8192 * per_token_layer] * 3
    # batch and bytes per value scale linearly; a "rope" config still reports Llama 4's iRoPE plan
    fp32 = viz.kv_cache_memory(scout, lengths, batch=3, bytes_per_value=4)
    assert fp32["irope"] == [6 * m for m in memory["irope"]]
    assert viz.kv_cache_memory(scout.replace(positions="rope"), lengths) == memory
    assert all(isinstance(v, int) for v in memory["irope"])


def test_kv_cache_figure_is_log_log_in_gigabytes() -> None:
    scout = l4lab.preset("llama4-scout")
    fig = viz.kv_cache_figure(scout)
    assert fig.layout.xaxis.type == "log" and fig.layout.yaxis.type == "log"
    assert len(fig.data) == 2
    assert fig.data[0].x[-1] == 10_000_000
    memory = viz.kv_cache_memory(scout, list(fig.data[0].x))
    np.testing.assert_allclose(fig.data[0].y, np.array(memory["all_global"]) / 1e9)
    np.testing.assert_allclose(fig.data[1].y, np.array(memory["irope"]) / 1e9)
    assert fig.data[1].y[-1] == pytest.approx(492.73, abs=0.01)
    assert "12 global + 36 chunked" in fig.data[1].name
    assert shapes_at(fig, "y") == [80]  # one H100


def test_cache_trace_figure_draws_what_a_real_cache_held() -> None:
    config = l4lab.preset("tiny", num_layers=4, attention_chunk_size=4, max_position_embeddings=64)
    model = l4lab.Llama4(config).eval()
    plan = config.layer_plan()
    traces = {}
    for positions in ("irope", "rope"):
        model.reconfigure(positions=positions)
        cache, token, lengths, nbytes = model.new_cache(), torch.tensor([[1]]), [], []
        with torch.no_grad():
            for _ in range(9):
                token = model(token, cache=cache).logits[:, -1].argmax(-1, keepdim=True)
                lengths.append(cache.lengths())
                nbytes.append(cache.nbytes())
        traces[positions] = (lengths, nbytes)
    fig = viz.cache_trace_figure(
        plan, traces["irope"][0], traces["rope"][0], traces["irope"][1], traces["rope"][1]
    )
    per_layer = [t for t in fig.data if t.name.startswith("iRoPE layer")]
    assert len(per_layer) == len(plan)
    for spec, trace in zip(plan, per_layer, strict=True):
        # a chunked layer (C = 4) holds t mod 4 keys after t tokens, a global layer all t
        expected = [t % 4 if spec.chunk_size else t for t in range(1, 10)]
        assert list(trace.y) == expected
        assert trace.line.dash == ("dot" if spec.chunk_size else "solid")
    rope = next(t for t in fig.data if t.name.startswith("RoPE: every layer"))
    assert list(rope.y) == list(range(1, 10))
    whole = {t.name: list(t.y) for t in fig.data if "whole cache" in t.name}
    assert whole["iRoPE, whole cache"] == [b / 1024 for b in traces["irope"][1]]
    assert whole["RoPE (all global), whole cache"][-1] > whole["iRoPE, whole cache"][-1]
    with pytest.raises(ValueError, match="one entry per decode step"):
        viz.cache_trace_figure(plan, traces["irope"][0], traces["rope"][0][:3], [], [])


# ---------------------------------------------------------------------- models and training
def test_parameter_table_cells() -> None:
    configs = {"Llama 4 Scout": l4lab.preset("llama4-scout"), "tiny": l4lab.preset("tiny")}
    fig = viz.parameter_table(configs)
    table = fig.data[0]
    assert isinstance(table, go.Table)
    assert list(table.header.values)[:3] == ["model", "total parameters", "active per token"]
    model, total, active, layers, hidden, experts, context = (list(c) for c in table.cells.values)
    assert model == ["Llama 4 Scout", "tiny"]
    tiny_total, tiny_active = l4lab.count_params(configs["tiny"])
    assert total == ["108.6B", f"{tiny_total / 1e6:.4g}M"]  # 108,641,793,536 with the vision encoder
    assert active == ["17.17B", f"{tiny_active / 1e6:.4g}M"]  # 17,172,894,720
    assert layers == ["48", "4"] and hidden == ["5,120", "128"]
    assert experts == ["16 routed + 1 shared, top-1", "dense"]
    assert context == ["10,485,760", "4,096"]
    maverick = viz.parameter_table({"m": l4lab.preset("llama4-maverick")}).data[0].cells.values
    assert maverick[1][0] == "401.6B" and "1 of 2 layers" in maverick[5][0]


def test_loss_curves_figure_skips_missing_validation() -> None:
    histories = {
        "dense": [
            {"step": 0, "loss": 5.5, "val_loss": 5.6},
            {"step": 10, "loss": 4.0},
            {"step": 20, "loss": 3.0, "val_loss": None},
            {"step": 30, "loss": 2.5, "val_loss": 2.9},
        ],
        "moe": [{"step": 0, "loss": 5.4}, {"step": 10, "loss": 3.5}],
    }
    fig = viz.loss_curves_figure(histories)
    assert [t.name for t in fig.data] == ["dense train", "dense validation", "moe train"]
    np.testing.assert_array_equal(fig.data[0].x, [0, 10, 20, 30])
    np.testing.assert_array_equal(fig.data[1].x, [0, 30])
    np.testing.assert_allclose(fig.data[1].y, [5.6, 2.9])
    assert fig.data[0].line.color == fig.data[1].line.color != fig.data[2].line.color
    assert fig.data[1].line.dash == "dash"


# ---------------------------------------------------------------------- every figure
def all_figures() -> list[go.Figure]:
    stats = [RoutingStats(0, torch.full((4,), 0.25), math.log(4), 1.0, 0.0, 1.0, 0.5, 0.3, 0.25)]
    return [
        viz.expert_load_figure(torch.full((2, 4), 0.25)),
        viz.token_expert_figure(["a", "b"], [0, 1], 4),
        viz.specialisation_figure(torch.ones(2, 4), ["x", "y"]),
        viz.routing_stats_table(stats),
        viz.attention_map_figure(causal_uniform(6, 4), CHUNKED),
        viz.attention_distance_figure([causal_uniform(6)], [GLOBAL_NOPE]),
        viz.temperature_figure(max_position=100_000),
        viz.accuracy_vs_length_figure([1, 2], {"m": [1.0, 0.5]}, 1),
        viz.needle_heatmap([0.5], [10], [[1.0]]),
        viz.kv_cache_figure(l4lab.preset("tiny-moe"), [16, 256]),
        viz.parameter_table({"tiny": l4lab.preset("tiny")}),
        viz.loss_curves_figure({"r": [{"step": 0, "loss": 1.0, "val_loss": 1.1}]}),
    ]


def test_figures_share_a_template_have_titles_and_are_deterministic() -> None:
    first, second = all_figures(), all_figures()
    for a, b in zip(first, second, strict=True):
        assert isinstance(a, go.Figure)
        assert a.layout.template == pio.templates[viz.TEMPLATE]
        assert a.layout.title.text
        assert a.to_json() == b.to_json()
        assert '"uid"' not in a.to_json()


def test_temperature_figure_below_the_floor_scale_is_flat() -> None:
    fig = viz.temperature_figure(floor_scale=8192, max_position=1000)
    assert (np.asarray(fig.data[0].y) == 1.0).all()
    assert len(fig.layout.shapes) == 0


# ---------------------------------------------------------------------- kernel figures
def tile_kinds_from_mask(length: int, chunk: int | None, block: int) -> np.ndarray:
    """The oracle: a tile is skipped when no query sees any of its keys, unmasked when all do."""
    visible = causal_uniform(length, chunk) > 0
    tiles = -(-length // block)
    kinds = np.zeros((tiles, tiles), dtype=np.int64)
    for row in range(tiles):
        for col in range(tiles):
            block_visible = visible[row * block : (row + 1) * block, col * block : (col + 1) * block]
            if block_visible.any():
                kinds[row, col] = 1 if block_visible.all() else 2
    return kinds


@pytest.mark.parametrize("chunk", [None, 8])
def test_attention_tiles_figure_draws_the_given_tiles(chunk: int | None) -> None:
    length, block = 32, 4
    kinds = tile_kinds_from_mask(length, chunk, block)
    visited = [(list(np.flatnonzero(row == 1)), list(np.flatnonzero(row == 2))) for row in kinds]
    fig = viz.attention_tiles_figure(visited, kinds.shape[1], block, block, "tiles")
    assert np.array_equal(np.asarray(fig.data[0].z), kinds)
    computed, total = int((kinds > 0).sum()), kinds.size
    assert (
        f"{computed} of {total} tiles computed ({int((kinds == 2).sum())} with the mask)"
        in fig.layout.title.text
    )
    expected = 8 * 9 // 2 if chunk is None else 4 * (2 * 3 // 2)  # a triangle, or 4 chunks of 2 x 2 tiles
    assert computed == expected


def test_moe_tiles_figure_has_one_bar_per_tile_and_greys_the_surplus() -> None:
    schedule = [(0, 0, 4), (0, 4, 5), (2, 5, 9), (3, 9, 10)]  # expert 1 has no token
    fig = viz.moe_tiles_figure(schedule, num_experts=4, num_programs=7)
    bars = {trace.name: trace for trace in fig.data}
    assert list(bars) == ["expert 0", "expert 2", "expert 3", "exits at once"]
    assert sum(sum(trace.y) for name, trace in bars.items() if name != "exits at once") == 10
    assert list(bars["exits at once"].x) == [4, 5, 6]
    assert "1 expert(s) received no token" in fig.layout.title.text


def test_benchmark_figure_scales_each_work_to_its_fastest_peer() -> None:
    rows = [
        dict(work="norm", peer="torch", ms=2.0),
        dict(work="norm", peer="l4lab fused", ms=1.0),
        dict(work="moe", peer="transformers", ms=52.3),
        dict(work="moe", peer="floor", ms=6.45),
        dict(work="moe", peer="Liger", ms=None),
    ]
    fig = viz.benchmark_figure(rows, "peers")
    bar = fig.data[0]
    assert list(bar.y) == ["norm: torch", "norm: l4lab fused", "moe: transformers", "moe: floor"]
    assert list(bar.x) == pytest.approx([2.0, 1.0, 52.3 / 6.45, 1.0])


def test_benchmark_rows_reads_the_table_the_benchmark_writes() -> None:
    text = """# Fused kernels vs peers

| work | peer | time (ms) | rate | note |
|---|---|---:|---:|---|
| RMSNorm [4, 8] forward | plain torch | 1.273 | 0.26 TB/s |  |
| RMSNorm [4, 8] forward | Liger-Kernel | - |  | not installed |

## Goals
"""
    assert viz.benchmark_rows(text) == [
        dict(work="RMSNorm [4, 8] forward", peer="plain torch", ms=1.273),
        dict(work="RMSNorm [4, 8] forward", peer="Liger-Kernel", ms=None),
    ]
