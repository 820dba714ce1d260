"""Explorers: their figures against direct forward passes, their controls, and the model left untouched."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

import l4lab
from l4lab import widgets
from l4lab.widgets import attention_explorer, attention_view, routing_explorer, routing_view

PLOTLY_JSON = "application/vnd.plotly.v1+json"


def small_model(seed: int = 0, **overrides: object) -> l4lab.Llama4:
    """4 layers, NoPE every 2nd (temperature fires from position 3), chunks of 4 tokens."""
    fields = dict(
        hidden_size=32,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        moe_intermediate_size=32,
        dense_intermediate_size=64,
        num_experts=4,
        nope_layer_interval=2,
        attention_chunk_size=4,
        floor_scale=4,
        attn_scale=0.5,
    )
    fields.update(overrides)
    torch.manual_seed(seed)
    model = l4lab.Llama4(l4lab.preset("tiny-moe", **fields)).eval()
    with torch.no_grad():  # larger weights than the 0.02 default, so that routing and attention vary
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.3)
    return model


TOKENS = l4lab.ByteTokenizer()("Routing, attention: look inside!")  # [1, 32]


def direct_attention(model: l4lab.Llama4, **changes: object) -> list[torch.Tensor]:
    """Attention of a separate copy of the model, reconfigured by hand."""
    other = copy.deepcopy(model)
    other.reconfigure(**changes)
    with torch.no_grad():
        return other(TOKENS, return_attention=True).attentions


# ---------------------------------------------------------------------- attention_view
@pytest.mark.parametrize(
    "settings, changes",
    [
        (dict(), dict(positions="irope")),
        (dict(positions="rope"), dict(positions="rope")),
        (
            dict(chunk_size=8, temperature_tuning=False),
            dict(positions="irope", attention_chunk_size=8, temperature_tuning=False),
        ),
    ],
)
def test_attention_view_equals_a_direct_forward(settings: dict, changes: dict) -> None:
    model = small_model()
    before = model.config
    with torch.no_grad():
        logits_before = model(TOKENS).logits
    expected = direct_attention(model, **changes)
    for layer, head in [(0, 1), (1, 3)]:
        fig = attention_view(model, TOKENS, layer, head, **settings)
        np.testing.assert_allclose(fig.data[0].z, expected[layer][0, head].double().numpy(), atol=1e-7)
        assert fig.layout.title.text.startswith(f"Layer {layer} (")
        assert f"head {head}" in fig.layout.title.text
    assert model.config == before
    with torch.no_grad():
        assert torch.equal(model(TOKENS).logits, logits_before)


def test_attention_view_changes_what_it_should() -> None:
    """The settings really change the maps: chunks cut a RoPE layer, global RoPE does not."""
    model = small_model()
    chunked = attention_view(model, TOKENS, 0, 0).data[0].z
    assert chunked[5, 3] == 0 and chunked[5, 4] > 0  # query 5 sees keys 4-5 only (chunk 4..7)
    global_ = attention_view(model, TOKENS, 0, 0, positions="rope").data[0].z
    assert global_[5, 3] > 0
    assert np.allclose(global_.sum(-1), 1.0)
    tuned = attention_view(model, TOKENS, 1, 0).data[0].z
    untuned = attention_view(model, TOKENS, 1, 0, temperature_tuning=False).data[0].z
    np.testing.assert_allclose(tuned[:3], untuned[:3], atol=1e-7)  # scale 1 below floor_scale - 1
    assert not np.allclose(tuned[-1], untuned[-1])


def test_attention_view_restores_the_config_on_errors() -> None:
    model = small_model()
    before = model.config

    def broken(*args: object, **kwargs: object) -> None:
        assert model.config.positions == "rope"  # it did run under the requested settings
        raise RuntimeError("boom")

    model.forward = broken  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="boom"):
        attention_view(model, TOKENS, 0, 0, positions="rope", chunk_size=16)
    assert model.config == before
    assert [layer.spec for layer in model.layers] == before.layer_plan()

    del model.forward
    with pytest.raises(ValueError, match="attention_chunk_size"):
        attention_view(model, TOKENS, 0, 0, chunk_size=0)
    with pytest.raises(ValueError, match="layer 4 is out of range"):
        attention_view(model, TOKENS, 4, 0)
    with pytest.raises(ValueError, match="head 4 is out of range"):
        attention_view(model, TOKENS, 0, 4)
    with pytest.raises(ValueError, match=r"\[1, T\]"):
        attention_view(model, TOKENS[0], 0, 0)
    assert model.config == before


# ---------------------------------------------------------------------- routing
def test_routing_view_colours_each_token_by_its_expert() -> None:
    model = small_model(moe_layer_step=2)
    with torch.no_grad():
        out = model(TOKENS)
    texts = widgets.token_texts(TOKENS)
    assert "".join(texts) == "Routing, attention: look inside!"
    fig = routing_view(out, 1, texts, 4)
    experts = out.routing[1].experts[0, :, 0].numpy()
    z = np.asarray(fig.data[0].z, dtype=float).reshape(-1)
    np.testing.assert_array_equal(z[: len(texts)], experts)
    assert fig.layout.title.text.startswith("Layer 3:")  # position 1 is MoE layer 3
    with pytest.raises(ValueError, match=r"layers \[1, 3\]"):
        routing_view(out, 2, texts, 4)
    dense = small_model(ffn="dense")
    with torch.no_grad(), pytest.raises(ValueError, match="dense"):
        routing_view(dense(TOKENS), 0, texts, 4)


def test_routing_explorer_lists_the_moe_layers_and_redraws() -> None:
    model = small_model(moe_layer_step=2)
    before = model.config
    with torch.no_grad():
        out = model(TOKENS)
    explorer = routing_explorer(model, TOKENS)
    layer = explorer.controls["layer"]
    assert list(layer.options) == [("layer 1", 1), ("layer 3", 3)]
    assert explorer.figure.layout.title.text.startswith("Layer 1:")
    assert list(explorer.figures) == ["tokens", "load"]

    layer.value = 3
    assert explorer.figure.layout.title.text.startswith("Layer 3:")
    z = np.asarray(explorer.figure.data[0].z, dtype=float).reshape(-1)[: TOKENS.shape[1]]
    np.testing.assert_array_equal(z, out.routing[1].experts[0, :, 0].numpy())
    load = np.bincount(out.routing[1].experts.reshape(-1).numpy(), minlength=4) / TOKENS.shape[1]
    np.testing.assert_allclose(explorer.figures["load"].data[0].y, load, rtol=1e-6)
    # what the Output widgets hold is the figures themselves
    shown = explorer.panels["tokens"].outputs[0]["data"][PLOTLY_JSON]
    assert shown["layout"]["title"]["text"].startswith("Layer 3:")
    assert explorer.children[1] is explorer.panels["tokens"]
    assert model.config == before
    with pytest.raises(ValueError, match="no MoE layer"):
        routing_explorer(small_model(ffn="dense"), TOKENS)


def test_the_display_bundle_carries_the_current_figures() -> None:
    """Beside the widget view, the bundle holds the figures as they are now, as plain plotly JSON."""
    explorer = routing_explorer(small_model(moe_layer_step=2), TOKENS)
    explorer.controls["layer"].value = 3
    bundle = explorer._repr_mimebundle_()
    assert "model_id" in bundle["application/vnd.jupyter.widget-view+json"]
    assert bundle["text/plain"].startswith("Explorer(")
    assert bundle[PLOTLY_JSON]["layout"]["title"]["text"].startswith("Layer 3:")
    figures = bundle[widgets.FIGURES_MIMETYPE]["figures"]
    assert [f["layout"]["title"]["text"] for f in figures] == [
        f.layout.title.text for f in explorer.figures.values()
    ]
    assert figures[0] == bundle[PLOTLY_JSON]
    json.dumps(bundle)  # what a notebook stores: plain JSON, no numpy arrays

    single = attention_explorer(small_model(), TOKENS[:, :8])._repr_mimebundle_()
    assert single[PLOTLY_JSON]["layout"]["title"]["text"].startswith("Layer 0")
    assert widgets.FIGURES_MIMETYPE not in single  # one figure: the plotly JSON is all of it
    assert single[PLOTLY_JSON]["data"][0]["type"] == "heatmap"


# ---------------------------------------------------------------------- attention explorer
def test_attention_explorer_redraws_on_every_control() -> None:
    moe, dense = small_model(), small_model(seed=1, ffn="dense", num_layers=2, attention_chunk_size=8)
    configs = (moe.config, dense.config)
    explorer = attention_explorer({"MoE": moe, "dense": dense}, TOKENS)
    controls = explorer.controls
    assert set(controls) == {"model", "layer", "head", "positions", "chunk_size", "temperature_tuning"}
    assert list(controls["chunk_size"].options) == [2, 4, 8, 16, 32]
    assert controls["chunk_size"].value == 4 and controls["positions"].value == "irope"
    assert explorer.figure.layout.title.text.startswith("MoE · Layer 0 (RoPE, chunked C=4), head 0")

    controls["head"].value = 2
    expected = direct_attention(moe)[0][0, 2]
    np.testing.assert_allclose(explorer.figure.data[0].z, expected.double().numpy(), atol=1e-7)

    controls["chunk_size"].value = 16
    assert "chunked C=16" in explorer.figure.layout.title.text
    controls["positions"].value = "rope"
    assert "(RoPE, global)" in explorer.figure.layout.title.text
    assert controls["chunk_size"].disabled and controls["temperature_tuning"].disabled
    expected = direct_attention(moe, positions="rope")[0][0, 2]
    np.testing.assert_allclose(explorer.figure.data[0].z, expected.double().numpy(), atol=1e-7)

    controls["layer"].value = 3
    controls["model"].value = "dense"  # 2 layers only: the layer falls back to the last one
    assert list(controls["layer"].options) == [("layer 0", 0), ("layer 1", 1)]
    assert controls["layer"].value == 1
    assert explorer.figure.layout.title.text.startswith("dense · Layer 1 (RoPE, global)")
    expected = direct_attention(dense, positions="rope", attention_chunk_size=16)[1][0, 2]
    np.testing.assert_allclose(explorer.figure.data[0].z, expected.double().numpy(), atol=1e-7)

    controls["positions"].value = "irope"
    assert not controls["chunk_size"].disabled
    controls["temperature_tuning"].value = False
    assert "temperature" not in explorer.figure.layout.title.text  # layer 1 is NoPE, now untuned
    assert "NoPE, global" in explorer.figure.layout.title.text
    assert (moe.config, dense.config) == configs


def test_a_single_model_has_no_model_toggle() -> None:
    explorer = attention_explorer(small_model(), TOKENS[:, :5])
    assert "model" not in explorer.controls
    assert list(explorer.controls["chunk_size"].options) == [2, 4]
    assert explorer.figure.layout.title.text.startswith("Layer 0")
    assert widgets.chunk_size_choices(1) == [] and widgets.chunk_size_choices(9, 64) == [2, 4, 8, 64]


def test_token_texts() -> None:
    assert widgets.token_texts([104, 105, 256]) == ["h", "i", "<|begin_of_text|>"]
    assert widgets.token_texts(torch.tensor([3, 300]), vocab_size=1000) == ["3", "300"]
    assert widgets.token_texts([0xC3, 0xA9]) == ["\ufffd", "\ufffd"]  # half a character each
