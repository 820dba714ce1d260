"""Checkpoints: save/load round trips through transformers, sharded and multimodal layouts, clear errors,
atomic writes, no pickle."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import hf_model, transformers
from safetensors.torch import load_file, save_file

import l4lab
from l4lab import interop
from l4lab.claims import relative_error

IDS = torch.randint(0, 97, (2, 19), generator=torch.Generator().manual_seed(0))


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.fixture(scope="module")
def hf() -> transformers.Llama4ForCausalLM:
    return hf_model(seed=5, interleave_moe_layer_step=2)


def test_save_pretrained_loads_in_transformers(hf: transformers.Llama4ForCausalLM, tmp_path: Path) -> None:
    ours = l4lab.from_transformers(hf)
    ours.save_pretrained(tmp_path / "ckpt")
    reloaded = transformers.Llama4ForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32).eval()
    reloaded.config._attn_implementation = "eager"
    assert relative_error(logits(reloaded), logits(hf)) < 1e-6


def test_transformers_checkpoint_loads_in_l4lab(hf: transformers.Llama4ForCausalLM, tmp_path: Path) -> None:
    hf.save_pretrained(tmp_path / "hf")
    ours = l4lab.load_pretrained(tmp_path / "hf")
    assert ours.config.moe_layer_step == 2
    assert relative_error(logits(ours), logits(hf)) < 1e-5


def test_round_trip_keeps_the_toggles(hf: transformers.Llama4ForCausalLM, tmp_path: Path) -> None:
    ours = l4lab.from_transformers(hf)
    ours.set_positions("rope")
    ours.save_pretrained(tmp_path / "rope")
    back = l4lab.load_pretrained(tmp_path / "rope")
    assert back.config == ours.config
    assert relative_error(logits(back), logits(ours)) == 0.0
    # transformers reads the same model: RoPE and global attention in every layer
    reloaded = transformers.Llama4ForCausalLM.from_pretrained(tmp_path / "rope", dtype=torch.float32).eval()
    reloaded.config._attn_implementation = "eager"
    assert relative_error(logits(reloaded), logits(ours)) < 1e-5


@pytest.mark.parametrize("positions", ["nope", "chunked"])
def test_the_schemes_that_take_irope_apart_load_in_transformers(
    hf: transformers.Llama4ForCausalLM, positions: str, tmp_path: Path
) -> None:
    """NoPE everywhere (temperature tuned) and chunked RoPE everywhere are Llama 4 configs too: transformers
    runs them from the exported config, and its logits are ours."""
    ours = l4lab.from_transformers(hf)
    ours.reconfigure(positions=positions, floor_scale=4)  # the temperature acts inside 19 tokens
    ours.save_pretrained(tmp_path / positions)
    reloaded = transformers.Llama4ForCausalLM.from_pretrained(
        tmp_path / positions, dtype=torch.float32
    ).eval()
    reloaded.config._attn_implementation = "eager"
    assert relative_error(logits(reloaded), logits(ours)) < 1e-5
    assert relative_error(logits(l4lab.from_transformers(reloaded)), logits(ours)) < 1e-5


def test_sharded_checkpoint_with_index(hf: transformers.Llama4ForCausalLM, tmp_path: Path) -> None:
    ours = l4lab.from_transformers(hf)
    interop.save_pretrained(ours, tmp_path / "sharded", max_shard_bytes=40_000)
    shards = sorted((tmp_path / "sharded").glob("model-*-of-*.safetensors"))
    assert len(shards) > 3
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == {interop.checkpoint_key(n) for n, _ in ours.named_parameters()}
    back = l4lab.load_pretrained(tmp_path / "sharded")
    assert relative_error(logits(back), logits(ours)) == 0.0
    # dtype converts while loading: the same as rounding the loaded weights afterwards
    bf16 = l4lab.load_pretrained(tmp_path / "sharded", dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16
    assert torch.equal(logits(bf16.float()), logits(back.to(torch.bfloat16).float()))


def _write_multimodal(hf: transformers.Llama4ForCausalLM, path: Path) -> None:
    """A checkpoint laid out like the published multimodal ones: text under language_model., vision beside."""
    path.mkdir()
    text = hf.config.to_dict()
    (path / "config.json").write_text(json.dumps({"model_type": "llama4", "text_config": text}))
    tensors = {f"language_model.{k}": v.contiguous() for k, v in hf.state_dict().items()}
    tensors["vision_model.patch_embedding.linear.weight"] = torch.zeros(4, 4)
    keys = sorted(tensors)
    half = len(keys) // 2
    weight_map = {}
    for i, part in enumerate((keys[:half], keys[half:]), start=1):
        name = f"model-{i:05d}-of-00002.safetensors"
        save_file({k: tensors[k] for k in part}, str(path / name))
        weight_map.update(dict.fromkeys(part, name))
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def test_multimodal_layout_with_language_model_prefix(
    hf: transformers.Llama4ForCausalLM, tmp_path: Path
) -> None:
    _write_multimodal(hf, tmp_path / "mm")
    ours = l4lab.load_pretrained(tmp_path / "mm")
    assert relative_error(logits(ours), logits(hf)) < 1e-5


def test_key_problems_are_listed(hf: transformers.Llama4ForCausalLM, tmp_path: Path) -> None:
    ours = l4lab.from_transformers(hf)
    ours.save_pretrained(tmp_path / "ok")
    weights = load_file(str(tmp_path / "ok" / "model.safetensors"))
    del weights["model.layers.0.self_attn.q_proj.weight"]
    weights["model.layers.9.extra.weight"] = torch.zeros(2)
    weights["model.norm.weight"] = torch.ones(5)
    save_file(weights, str(tmp_path / "ok" / "model.safetensors"))
    with pytest.raises(ValueError) as error:
        l4lab.load_pretrained(tmp_path / "ok")
    message = str(error.value)
    assert "missing keys ['model.layers.0.self_attn.q_proj.weight']" in message
    assert "unexpected keys ['model.layers.9.extra.weight']" in message
    assert "model.norm.weight: expected (64,), got (5,)" in message


def test_pickle_checkpoints_are_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(l4lab.to_transformers_config(l4lab.preset("tiny"))))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(FileNotFoundError, match="never reads pickle"):
        l4lab.load_pretrained(tmp_path)


def test_missing_config_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        l4lab.load_pretrained(tmp_path)


def test_big_presets_load_on_meta_without_memory() -> None:
    with torch.device("meta"):
        scout = l4lab.Llama4(l4lab.preset("llama4-scout"))
    text_only = scout.config.replace(vision=None)
    assert sum(p.numel() for p in scout.parameters()) == l4lab.count_params(text_only)[0]
    assert scout.device.type == "meta"
    config = interop.to_transformers_config(scout.config)
    assert config["rope_parameters"]["rope_type"] == "llama3"
    assert config["no_rope_layers"][:4] == [1, 1, 1, 0] and config["moe_layers"] == list(range(48))


def test_selection_bias_is_not_exported(hf: transformers.Llama4ForCausalLM, tmp_path: Path) -> None:
    ours = l4lab.from_transformers(hf)
    router = ours.layers[1].feed_forward.router
    assert router.selection_bias.device.type == "cpu" and not router.selection_bias.any()
    router.selection_bias[2] = 0.5
    with pytest.raises(ValueError, match=r"layers\.1\.feed_forward\.router\.selection_bias"):
        ours.save_pretrained(tmp_path / "biased")
    assert not (tmp_path / "biased").exists()


def test_published_config_layout_is_understood() -> None:
    """The fields of Scout's published config.json (legacy rope_scaling, empty no_rope_layers, an int
    attn_temperature_tuning, a list of eos ids), nested under text_config as in the multimodal release."""
    published = {
        "architectures": ["Llama4ForConditionalGeneration"],
        "model_type": "llama4",
        "text_config": {
            "model_type": "llama4_text",
            "attention_bias": False,
            "attention_chunk_size": 8192,
            "attn_scale": 0.1,
            "attn_temperature_tuning": 4,
            "bos_token_id": 200000,
            "eos_token_id": [200001, 200007, 200008],
            "floor_scale": 8192,
            "head_dim": 128,
            "hidden_act": "silu",
            "hidden_size": 5120,
            "interleave_moe_layer_step": 1,
            "intermediate_size": 8192,
            "intermediate_size_mlp": 16384,
            "max_position_embeddings": 10485760,
            "moe_layers": None,
            "no_rope_layers": [],
            "num_attention_heads": 40,
            "num_experts_per_tok": 1,
            "num_hidden_layers": 48,
            "num_key_value_heads": 8,
            "num_local_experts": 16,
            "rms_norm_eps": 1e-05,
            "rope_scaling": {
                "factor": 16.0,
                "high_freq_factor": 1.0,
                "low_freq_factor": 1.0,
                "original_max_position_embeddings": 8192,
                "rope_type": "llama3",
            },
            "rope_theta": 500000.0,
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
            "use_qk_norm": True,
            "vocab_size": 202048,
        },
        "vision_config": {
            "attention_dropout": 0.0,
            "hidden_act": "gelu",
            "hidden_size": 1408,
            "image_size": 336,
            "initializer_range": 0.02,
            "intermediate_layers_indices": [-1],
            "intermediate_size": 5632,
            "model_type": "llama4_vision_model",
            "multi_modal_projector_bias": False,
            "norm_eps": 1e-05,
            "num_attention_heads": 16,
            "num_channels": 3,
            "num_hidden_layers": 34,
            "patch_size": 14,
            "pixel_shuffle_ratio": 0.5,
            "projector_dropout": 0.0,
            "projector_input_dim": 4096,
            "projector_output_dim": 4096,
            "rope_theta": 10000,
            "vision_feature_layer": -1,
            "vision_feature_select_strategy": "default",
            "vision_output_dim": 4096,
        },
        "boi_token_index": 200080,
        "eoi_token_index": 200081,
        "image_token_index": 200092,
    }
    config = l4lab.config_from_transformers(published)
    assert config == l4lab.preset("llama4-scout", eos_token_id=200001)
    text = l4lab.config_from_transformers({k: v for k, v in published.items() if k != "vision_config"})
    assert text == l4lab.preset("llama4-scout", eos_token_id=200001, vision=None)


def test_saved_directory_has_the_usual_mode(hf: transformers.Llama4ForCausalLM, tmp_path: Path) -> None:
    import os

    umask = os.umask(0)
    os.umask(umask)
    l4lab.from_transformers(hf).save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt").stat().st_mode & 0o777 == 0o777 & ~umask
