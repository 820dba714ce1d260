"""Bad input raises an error that says what was wrong and what to pass."""

from __future__ import annotations

import pytest
import torch

import l4lab


@pytest.fixture(scope="module")
def model() -> l4lab.Llama4:
    torch.manual_seed(0)
    return l4lab.Llama4(l4lab.preset("tiny-moe", max_position_embeddings=64))


def test_token_id_outside_the_vocabulary(model: l4lab.Llama4) -> None:
    ids = torch.tensor([[1, 2, 3], [4, 260, 5]])
    with pytest.raises(ValueError, match=r"token id 260 at \[batch 1, position 1\] .* \[0, 260\)"):
        model(ids)
    with pytest.raises(ValueError, match="token id -1"):
        model(torch.tensor([[-1]]))


def test_float_ids(model: l4lab.Llama4) -> None:
    with pytest.raises(TypeError, match=r"dtype torch\.float32; token ids must be integers"):
        model(torch.zeros(1, 4))


def test_wrong_shapes(model: l4lab.Llama4) -> None:
    with pytest.raises(
        ValueError, match=r"shape \[batch, time\]; got shape \(4,\) \(a single sequence: use ids\[None\]\)"
    ):
        model(torch.tensor([1, 2, 3, 4]))
    with pytest.raises(ValueError, match=r"got shape \(1, 2, 3\)"):
        model(torch.zeros(1, 2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="empty"):
        model(torch.zeros(1, 0, dtype=torch.long))


def test_not_a_tensor(model: l4lab.Llama4) -> None:
    with pytest.raises(TypeError, match="got list"):
        model([[1, 2, 3]])


def test_too_long(model: l4lab.Llama4) -> None:
    with pytest.raises(ValueError, match=r"reaches 65, beyond max_position_embeddings \(64\)"):
        model(torch.zeros(1, 65, dtype=torch.long))
    cache = model.new_cache()
    model(torch.zeros(1, 60, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="starting at position 60 reaches 65"):
        model(torch.zeros(1, 5, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="= 70 exceeds max_position_embeddings"):
        model.generate(torch.zeros(1, 10, dtype=torch.long), max_new_tokens=60)


def test_device_mix(model: l4lab.Llama4) -> None:
    with pytest.raises(ValueError, match="input_ids is on meta but the model is on cpu"):
        model(torch.zeros(1, 3, dtype=torch.long, device="meta"))
    with torch.device("meta"):
        shapes_only = l4lab.Llama4(l4lab.preset("tiny"))
    with pytest.raises(RuntimeError, match="meta device"):
        shapes_only(torch.zeros(1, 3, dtype=torch.long))


def test_bad_generation_arguments(model: l4lab.Llama4) -> None:
    ids = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(ids, -1)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(ids, 2, temperature=-0.5)
    with pytest.raises(ValueError, match="top_p"):
        model.generate(ids, 2, temperature=1.0, top_p=0.0)


def test_bad_toggle_value(model: l4lab.Llama4) -> None:
    with pytest.raises(ValueError, match=r"Config\.positions = 'alibi' is not allowed: 'irope' or 'rope'"):
        model.set_positions("alibi")
    assert model.config.positions == "irope"


def test_integer_ids_the_embedding_cannot_take(model: l4lab.Llama4) -> None:
    with pytest.raises(
        TypeError, match=r"dtype torch\.uint8; token ids must be torch\.long \(or torch\.int32\)"
    ):
        model(torch.zeros(1, 4, dtype=torch.uint8))
    assert model(torch.zeros(1, 4, dtype=torch.int32)).logits.shape == (1, 4, 260)


def test_generation_arguments_of_the_wrong_kind(model: l4lab.Llama4) -> None:
    ids = torch.zeros(1, 3, dtype=torch.long)
    for kwargs, message in [
        (dict(max_new_tokens=True), "max_new_tokens must be a non-negative integer; got True"),
        (dict(max_new_tokens=2, temperature="hot"), "temperature must be a finite number >= 0"),
        (dict(max_new_tokens=2, temperature=float("inf")), "temperature must be a finite number"),
        (dict(max_new_tokens=2, top_p="all"), r"top_p must be a number in \(0, 1\]; got 'all'"),
        (dict(max_new_tokens=2, seed=1.5), r"seed must be None or an integer .*; got 1\.5"),
        (dict(max_new_tokens=2, eos_token_id=260), r"eos_token_id must be None or a token id in \[0, 260\)"),
    ]:
        with pytest.raises(ValueError, match=message):
            model.generate(ids, **kwargs)


def test_config_fields_of_the_wrong_kind() -> None:
    for field, value, message in [
        ("rope_theta", float("inf"), "a positive finite number"),
        ("attn_scale", float("nan"), "a finite number"),
        ("bos_token_id", 1.5, r"None or a token id in \[0, 260\)"),
        ("rope_scaling", {"factor": "8"}, r"\.factor = '8' is not allowed: a number >= 1"),
        ("rope_scaling", {"scale": 8.0}, r"unknown \['scale'\]"),
    ]:
        with pytest.raises(ValueError, match=rf"Config\.{field}\b.*{message}"):
            l4lab.Config(**{field: value})
    with pytest.raises(TypeError, match=r"Config\.from_dict needs a dict of fields; got list"):
        l4lab.Config.from_dict([("vocab_size", 5)])
