"""The architecture figures follow the config: every layer's kind, mask, norm and feed-forward.

The oracle is the published layer rules (Scout: NoPE on layers 3, 7, ..., 47, MoE everywhere; Maverick:
MoE on odd layers, no QK norm) and, for other configs, the fields of ``layer_plan()`` read directly.
"""

from __future__ import annotations

import pytest

import l4lab
from l4lab.viz import decoder_layer_figure, layer_stack_figure, moe_block_figure

CONFIGS = {
    "Scout": l4lab.preset("llama4-scout"),
    "Maverick": l4lab.preset("llama4-maverick"),
    "tiny-moe": l4lab.preset("tiny-moe"),
    "odd": l4lab.preset(
        "tiny-moe", num_layers=6, nope_layer_interval=2, moe_layer_step=3, attention_chunk_size=8
    ),
    "Llama 3": l4lab.preset("llama3-8b"),
    "rope": l4lab.preset("tiny-moe", positions="rope"),
    "no tuning": l4lab.preset("tiny", temperature_tuning=False),
}


def _layers_by_kind(fig, row: str) -> dict[str, list[int]]:
    return {trace.name: list(trace.x) for trace in fig.data if trace.y[0] == row}


def test_stack_of_scout_and_maverick_follows_the_published_layer_rules():
    fig = layer_stack_figure({"Scout": CONFIGS["Scout"], "Maverick": CONFIGS["Maverick"]})
    nope = list(range(3, 48, 4))
    for name in ("Scout", "Maverick"):
        attention = _layers_by_kind(fig, f"{name} · attention")
        assert attention == {
            "RoPE, chunked": [i for i in range(48) if i not in nope],
            "NoPE, global, temperature tuned": nope,
        }
    assert _layers_by_kind(fig, "Scout · FFN") == {"MoE": list(range(48))}
    assert _layers_by_kind(fig, "Maverick · FFN") == {
        "MoE": list(range(1, 48, 2)),
        "dense": list(range(0, 48, 2)),
    }
    hover = {trace.name: list(trace.customdata) for trace in fig.data if trace.y[0] == "Scout · attention"}
    assert all(
        "chunked causal mask, C = 8,192" in text and "QK norm" in text for text in hover["RoPE, chunked"]
    )
    maverick = next(t for t in fig.data if t.y[0] == "Maverick · attention" and t.name == "RoPE, chunked")
    assert not any("QK norm" in text for text in maverick.customdata)  # Maverick has no QK norm


@pytest.mark.parametrize("name", list(CONFIGS))
def test_stack_has_every_layer_once_per_row_with_its_planned_kind(name):
    config = CONFIGS[name]
    fig = layer_stack_figure({name: config})
    for row in ("attention", "FFN"):
        layers = _layers_by_kind(fig, f"{name} · {row}")
        assert sorted(i for xs in layers.values() for i in xs) == list(range(config.num_layers))
    attention = _layers_by_kind(fig, f"{name} · attention")
    ffn = _layers_by_kind(fig, f"{name} · FFN")
    for spec in config.layer_plan():
        (kind,) = [k for k, xs in attention.items() if spec.index in xs]
        assert kind.startswith("RoPE" if spec.uses_rope else "NoPE")
        assert ("chunked" in kind) == (spec.chunk_size is not None)
        assert ("temperature" in kind) == spec.temperature_tuning
        assert spec.index in ffn["MoE" if spec.moe else "dense"]


def test_stack_colours_a_kind_the_same_in_every_model_and_lists_it_once_in_the_legend():
    fig = layer_stack_figure(CONFIGS)
    colours: dict[str, set[str]] = {}
    for trace in fig.data:
        colours.setdefault(trace.name, set()).add(trace.marker.color)
    assert all(len(c) == 1 for c in colours.values())
    legend = [trace.name for trace in fig.data if trace.showlegend]
    assert sorted(legend) == sorted(colours)


def _texts(fig) -> str:
    return "\n".join(a.text for a in fig.layout.annotations)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_decoder_layer_figure_says_what_each_layer_does(name):
    config = CONFIGS[name]
    for spec in config.layer_plan()[:8]:  # Llama 4's patterns repeat every 4 layers (NoPE) and 2 (MoE)
        text = _texts(decoder_layer_figure(config, spec.index))
        assert ("RoPE on q and k" in text) == spec.uses_rope
        assert ("QK norm" in text) == spec.qk_norm
        assert ("queries × s(p)" in text) == spec.temperature_tuning
        if spec.chunk_size is None:
            assert "global causal mask" in text and "chunked" not in text
        else:
            assert f"chunked causal mask, C = {spec.chunk_size:,}" in text
        if spec.moe:
            assert f"picks {config.top_k} of {config.num_experts} experts" in text
        else:
            assert f"dense SwiGLU, width {config.dense_intermediate_size:,}" in text
        assert f"{config.num_heads} query / {config.num_kv_heads} KV heads" in text


def test_decoder_layer_figure_rejects_a_layer_outside_the_model():
    with pytest.raises(ValueError, match="layers 0 to 3"):
        decoder_layer_figure(CONFIGS["tiny-moe"], 4)


@pytest.mark.parametrize(
    ("num_experts", "top_k", "drawn", "gap"),
    [(4, 1, 4, None), (8, 2, 8, None), (16, 1, 7, 9), (128, 1, 7, 121)],
)
def test_moe_block_draws_the_configs_experts_and_marks_the_chosen(num_experts, top_k, drawn, gap):
    config = l4lab.preset("tiny-moe", num_experts=num_experts, top_k=top_k)
    fig = moe_block_figure(config)
    experts = [a.text for a in fig.layout.annotations if a.text.startswith("expert ")]
    assert len(experts) == drawn and experts[-1] == f"expert {num_experts - 1}"
    assert (f"… {gap} more …" in _texts(fig)) == (gap is not None)
    assert f"{num_experts} logits" in _texts(fig) and f"top-{top_k}" in _texts(fig)
    filled = [s for s in fig.layout.shapes if s.type == "rect" and s.fillcolor == "#54A24B"]
    assert len(filled) == top_k  # the chosen experts


def test_moe_block_of_a_dense_model_is_refused_with_what_to_pass():
    with pytest.raises(ValueError, match="ffn='moe'"):
        moe_block_figure(l4lab.preset("tiny"))
