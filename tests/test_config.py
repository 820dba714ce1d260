"""Configuration: validation that names the field, presets, published parameter counts, the layer plan."""

from __future__ import annotations

import pytest
import torch

import l4lab
from l4lab import Config


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        (dict(num_heads=6, num_kv_heads=4), "num_kv_heads"),
        (dict(top_k=5, num_experts=4), "top_k"),
        (dict(ffn="sparse"), "ffn"),
        (dict(positions="alibi"), "positions"),
        (dict(backend="cuda"), "backend"),
        (dict(hidden_size=0), "hidden_size"),
        (dict(num_layers=-2), "num_layers"),
        (dict(head_dim=15), "head_dim"),
        (dict(attention_chunk_size=0), "attention_chunk_size"),
        (dict(rms_norm_eps=0.0), "rms_norm_eps"),
        (dict(vocab_size=3.5), "vocab_size"),
        (dict(use_qk_norm="yes"), "use_qk_norm"),
        (dict(eos_token_id=999), "eos_token_id"),
        (dict(rope_scaling=l4lab.RopeScaling(factor=0.5)), "rope_scaling.factor"),
        (
            dict(rope_scaling=l4lab.RopeScaling(low_freq_factor=4.0, high_freq_factor=1.0)),
            "rope_scaling.high_freq_factor",
        ),
    ],
)
def test_impossible_configs_name_the_field(changes: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"Config\.{field} = .* is not allowed"):
        Config(**changes)


def test_scout_like_pure_step_scaling_is_legal() -> None:
    assert l4lab.preset("llama4-scout").rope_scaling.low_freq_factor == 1.0


def test_published_parameter_counts() -> None:
    scout_total, scout_active = l4lab.count_params(l4lab.preset("llama4-scout", vision=None))
    maverick_total, maverick_active = l4lab.count_params(l4lab.preset("llama4-maverick", vision=None))
    # text-only figures; with the vision encoder (tests/test_vision.py) they are Meta's 109B and 400B
    assert round(scout_total / 1e9, 1) == 107.8 and round(scout_active / 1e9, 1) == 17.2
    assert round(maverick_total / 1e9, 1) == 400.7 and round(maverick_active / 1e9, 1) == 17.2
    # Llama 2 7B and Llama 3 8B are dense: everything is active
    for name, billions in (("llama2-7b", 6.7), ("llama3-8b", 8.0)):
        total, active = l4lab.count_params(l4lab.preset(name))
        assert total == active and round(total / 1e9, 1) == billions


@pytest.mark.parametrize("name", ["tiny", "tiny-moe", "llama3-8b"])
def test_count_params_equals_the_built_model(name: str) -> None:
    config = l4lab.preset(name)
    with torch.device("meta"):
        model = l4lab.Llama4(config)
    assert sum(p.numel() for p in model.parameters()) == l4lab.count_params(config)[0]


def test_tiny_presets_have_equal_active_parameters() -> None:
    dense, moe = l4lab.count_params(l4lab.preset("tiny")), l4lab.count_params(l4lab.preset("tiny-moe"))
    assert dense[0] == dense[1]
    assert moe[0] > dense[0]
    assert abs(moe[1] - dense[1]) / dense[1] < 0.01  # only the routers differ


def test_layer_plans_of_the_published_models() -> None:
    scout = l4lab.preset("llama4-scout").layer_plan()
    assert [s.index for s in scout if not s.uses_rope] == list(range(3, 48, 4))
    assert all(s.moe for s in scout)
    assert all(s.chunk_size == 8192 and s.qk_norm for s in scout if s.uses_rope)
    assert all(
        s.chunk_size is None and s.temperature_tuning and not s.qk_norm for s in scout if not s.uses_rope
    )
    maverick = l4lab.preset("llama4-maverick").layer_plan()
    assert [s.index for s in maverick if s.moe] == list(range(1, 48, 2))
    assert not any(s.qk_norm for s in maverick)
    llama3 = l4lab.preset("llama3-8b").layer_plan()
    assert all(s.uses_rope and s.chunk_size is None and not s.moe for s in llama3)


def test_toggles_resolve_in_the_plan() -> None:
    base = l4lab.preset("tiny-moe")
    rope = base.replace(positions="rope").layer_plan()
    assert all(s.uses_rope and s.chunk_size is None and not s.temperature_tuning for s in rope)
    assert not any(s.moe for s in base.replace(ffn="dense").layer_plan())


def test_unknown_preset_lists_the_choices() -> None:
    with pytest.raises(ValueError, match="llama4-scout"):
        l4lab.preset("llama5")


def test_backend_selects_the_table_of_operations() -> None:
    pytest.importorskip("l4lab.kernels")  # Triton present (without it: tests/test_fused_model.py)
    model = l4lab.Llama4(l4lab.preset("tiny", backend="fused", num_layers=2))
    assert {m.ops.name for m in model.modules() if hasattr(m, "ops")} == {"fused"}
    with pytest.raises(ValueError, match=r"Config\.backend = 'triton' is not allowed: 'eager' or 'fused'"):
        l4lab.Llama4(l4lab.preset("tiny", backend="triton"))


def test_config_dict_round_trip() -> None:
    config = l4lab.preset("llama4-scout")
    assert Config.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown Config fields \\['experts'\\]"):
        Config.from_dict({"experts": 3})


def test_reconfigure_changes_weightless_fields_only() -> None:
    torch.manual_seed(0)
    model = l4lab.Llama4(l4lab.preset("tiny-moe"))
    ids = torch.randint(0, 260, (1, 150))
    before = model(ids).logits
    model.reconfigure(attention_chunk_size=16, floor_scale=4)
    assert all(s.chunk_size == 16 for s in model.config.layer_plan() if s.uses_rope)
    assert model.layers[3].self_attn.temperature.floor_scale == 4
    assert not torch.allclose(model(ids).logits, before)
    model.reconfigure(attention_chunk_size=64, floor_scale=32)
    torch.testing.assert_close(model(ids).logits, before)
    with pytest.raises(ValueError, match=r"cannot reconfigure \['ffn'\]"):
        model.reconfigure(ffn="dense")
