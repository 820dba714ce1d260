"""Cached generation: same tokens as an uncached argmax loop over transformers, same logits as a full
forward at every step, bounded memory on chunked layers, reproducible sampling."""

from __future__ import annotations

import pytest
import torch
from conftest import hf_model

import l4lab
from l4lab.claims import relative_error


@pytest.fixture(scope="module")
def pair() -> tuple:
    hf = hf_model(
        seed=3, attention_chunk_size=6, floor_scale=3, interleave_moe_layer_step=2, num_experts_per_tok=2
    )
    return hf, l4lab.from_transformers(hf)


def test_greedy_generation_equals_transformers_argmax_loop(pair: tuple) -> None:
    hf, ours = pair
    prompt = torch.randint(3, 97, (2, 5), generator=torch.Generator().manual_seed(0))
    new = 20  # positions 5..24 cross the chunk boundaries at 6, 12, 18 and 24
    expected = prompt
    with torch.no_grad():
        for _ in range(new):
            next_token = hf(expected, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            expected = torch.cat([expected, next_token], dim=1)
    got = ours.generate(prompt, max_new_tokens=new)
    assert torch.equal(got, expected)


def test_incremental_logits_equal_full_forward_at_every_step(pair: tuple) -> None:
    _, ours = pair
    ids = torch.randint(0, 97, (2, 26), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = ours(ids).logits
        cache = ours.new_cache()
        # a prefill of 4 (inside the first chunk), then a prefill of 9 crossing a boundary, then one by one
        pieces = [ours(ids[:, :4], cache=cache).logits, ours(ids[:, 4:13], cache=cache).logits]
        pieces += [ours(ids[:, t : t + 1], cache=cache).logits for t in range(13, 26)]
    assert cache.position == 26
    assert relative_error(torch.cat(pieces, dim=1), full) < 1e-5


def test_chunked_layers_keep_only_the_current_chunk(pair: tuple) -> None:
    _, ours = pair
    plan = ours.config.layer_plan()
    cache = ours.new_cache()
    with torch.no_grad():
        ours(torch.randint(0, 97, (1, 3)), cache=cache)
        for step in range(3, 40):
            ours(torch.randint(0, 97, (1, 1)), cache=cache)
            position = step + 1  # tokens seen so far
            for spec, length in zip(plan, cache.lengths(), strict=True):
                if spec.chunk_size is None:
                    assert length == position  # global layers keep everything
                else:
                    assert length == position % spec.chunk_size  # at most C - 1 keys
    chunked = [layer for spec, layer in zip(plan, cache.layers, strict=True) if spec.chunk_size]
    assert max(layer.nbytes() for layer in chunked) <= 2 * 1 * 2 * 5 * 16 * 4  # K and V, C - 1 keys, fp32


def test_temperature_tuning_uses_absolute_positions_through_the_cache() -> None:
    """With floor_scale 2 the NoPE layers' scale changes every other token; decoding must track it."""
    hf = hf_model(seed=4, floor_scale=2, attn_scale=1.0, attention_chunk_size=64)
    ours = l4lab.from_transformers(hf)
    ids = torch.randint(0, 97, (1, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        cache = ours.new_cache()
        ours(ids[:, :10], cache=cache)
        step = ours(ids[:, 10:11], cache=cache).logits[:, -1]
        full = hf(ids[:, :11]).logits[:, -1]
    assert relative_error(step, full) < 1e-5


def test_sampling_is_reproducible_with_a_seed(pair: tuple) -> None:
    _, ours = pair
    prompt = torch.randint(3, 97, (3, 4), generator=torch.Generator().manual_seed(2))
    a = ours.generate(prompt, 12, temperature=1.0, seed=7)
    b = ours.generate(prompt, 12, temperature=1.0, seed=7)
    c = ours.generate(prompt, 12, temperature=1.0, seed=8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(a[:, :4], prompt) and a.shape == (3, 16)


def test_tiny_top_p_is_greedy(pair: tuple) -> None:
    _, ours = pair
    prompt = torch.randint(3, 97, (2, 4), generator=torch.Generator().manual_seed(3))
    assert torch.equal(
        ours.generate(prompt, 8, temperature=1.0, top_p=1e-6, seed=0), ours.generate(prompt, 8)
    )


def test_top_p_keeps_the_nucleus_only() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    generator = torch.Generator().manual_seed(0)
    draws = {int(l4lab.model.sample_next_token(logits, 1.0, 0.7, generator)) for _ in range(300)}
    assert draws == {0, 1}  # 0.5 + 0.3 reaches 0.7; 0.15 and 0.05 are cut


def test_generation_stops_at_eos(pair: tuple) -> None:
    _, ours = pair
    prompt = torch.randint(3, 97, (1, 4), generator=torch.Generator().manual_seed(4))
    greedy = ours.generate(prompt, 6)
    eos = int(greedy[0, 5])  # the second generated token
    stopped = ours.generate(prompt, 6, eos_token_id=eos)
    assert torch.equal(stopped, greedy[:, :6])


@pytest.mark.parametrize("positions", ["irope", "rope", "nope", "chunked"])
def test_last_only_equals_the_last_row_of_a_full_forward(positions: str) -> None:
    config = l4lab.preset(
        "tiny",
        num_layers=2,
        nope_layer_interval=2,
        attention_chunk_size=8,
        floor_scale=4,
        positions=positions,
    )
    torch.manual_seed(0)
    model = l4lab.Llama4(config).eval()
    ids = torch.randint(0, 256, (2, 45), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids).logits[:, -1:]
        last = model(ids, last_only=True).logits
    assert last.shape == full.shape
    assert relative_error(last, full) < 1e-5


@pytest.mark.parametrize("block_size", [7, 16, 64])
def test_streaming_prefill_equals_the_full_forward(pair: tuple, block_size: int) -> None:
    _, ours = pair  # chunk 6, NoPE every 4th layer: blocks of 7 cross chunk edges, 16 and 64 do too
    ids = torch.randint(0, 97, (2, 41), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = ours(ids).logits[:, -1]
        logits, cache = ours.prefill(ids, block_size=block_size)
        lengths = cache.lengths()
        after = ours(ids[:, -1:] * 0 + 3, cache=cache).logits[:, -1]
        reference = ours(torch.cat([ids, ids[:, -1:] * 0 + 3], dim=1)).logits[:, -1]
    assert relative_error(logits, full) < 1e-5
    assert relative_error(after, reference) < 1e-5  # the cache is ready for decoding
    for spec, length in zip(ours.config.layer_plan(), lengths, strict=True):
        assert length == (41 % 6 if spec.chunk_size else 41)  # chunked layers keep the current chunk only


def test_generate_streams_a_prompt_longer_than_one_block(
    pair: tuple, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, ours = pair
    prompt = torch.randint(3, 97, (1, 30), generator=torch.Generator().manual_seed(6))
    expected = ours.generate(prompt, max_new_tokens=6)
    blocks: list[int] = []
    forward = l4lab.Llama4.forward

    def counting(self: l4lab.Llama4, input_ids: torch.Tensor, *args: object, **kwargs: object) -> object:
        blocks.append(input_ids.shape[1])
        return forward(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(l4lab.model, "PREFILL_BLOCK", 8)
    monkeypatch.setattr(l4lab.Llama4, "forward", counting)
    assert torch.equal(ours.generate(prompt, max_new_tokens=6), expected)
    assert blocks[:4] == [8, 8, 8, 6]  # the prompt in blocks, then one token at a time
    assert set(blocks[4:]) == {1}


def test_prefill_rejects_a_bad_block_size(pair: tuple) -> None:
    _, ours = pair
    with pytest.raises(ValueError, match="block_size must be a positive integer"):
        ours.prefill(torch.zeros(1, 4, dtype=torch.long), block_size=0)


def test_time_per_token_times_one_cached_step_and_one_full_forward_per_length() -> None:
    from l4lab.cache import time_per_token

    model = l4lab.Llama4(l4lab.preset("tiny", num_layers=2, attention_chunk_size=4)).train()
    tokens = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    calls = []

    def record(module, args, kwargs):
        cache = kwargs.get("cache")
        calls.append((args[0].shape[1], None if cache is None else cache.position))

    handle = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        times = time_per_token(model, tokens, [3, 8], repeats=2)
    finally:
        handle.remove()
    # per repeat: the prompt into an empty cache, one token after n cached, n + 1 tokens without a cache
    assert calls == [call for n in (3, 8) for call in [(n, 0), (1, n), (n + 1, None)] * 2]
    assert set(times) == {"cached", "uncached"} and all(len(v) == 2 and min(v) > 0 for v in times.values())
    assert model.training  # the mode is restored


@pytest.mark.parametrize(("shape", "lengths", "match"), [((2, 12), [3], "one row"), ((1, 12), [12], "1..11")])
def test_time_per_token_rejects_bad_input(shape: tuple, lengths: list, match: str) -> None:
    from l4lab.cache import time_per_token

    model = l4lab.Llama4(l4lab.preset("tiny", num_layers=1))
    with pytest.raises(ValueError, match=match):
        time_per_token(model, torch.zeros(shape, dtype=torch.long), lengths)
