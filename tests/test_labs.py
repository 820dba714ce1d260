"""The lab checkers: they accept right answers written from scratch and reject the usual wrong ones
with a message that says what is wrong (and never raise)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from l4lab import labs, ops, routing, vision
from l4lab.cache import LayerCache
from l4lab.config import RopeScaling
from l4lab.model import RoutingRecord, rope_angles, rope_inverse_frequencies

ROOT = Path(__file__).resolve().parents[1]
LAB_NOTEBOOKS = ROOT / "notebooks" / "labs"


# ------------------------------------------------------------ right answers, as a student writes them
def rms_norm(x, weight, eps):
    x32 = x.float()
    return (x32 / torch.sqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)).type_as(x) * weight


def rope_frequencies(head_dim, theta):
    return theta ** (-2 * torch.arange(head_dim // 2, dtype=torch.float32) / head_dim)


def apply_rope(x, positions, theta):
    angles = positions.float()[:, None] * rope_frequencies(x.shape[-1], theta)[None, :]
    cos, sin = angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]
    even, odd = x[..., 0::2].float(), x[..., 1::2].float()
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2).type_as(x)


def scaled_rope_frequencies(head_dim, theta, factor, low_freq_factor, high_freq_factor, original_context):
    inv_freq = rope_frequencies(head_dim, theta)
    wavelength = 2 * math.pi / inv_freq
    slow = wavelength > original_context / low_freq_factor
    fast = wavelength < original_context / high_freq_factor
    if high_freq_factor > low_freq_factor:
        smooth = (original_context / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
        between = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    else:
        between = inv_freq  # no band: every pair is either slow or fast
    return torch.where(slow, inv_freq / factor, torch.where(fast, inv_freq, between))


def qk_norm(x, eps):
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)


def route(x, router_weight, top_k):
    top_logits, experts = (x @ router_weight.T).topk(top_k, dim=-1)
    return experts, torch.sigmoid(top_logits)


def expert(z, gate_up, down):
    gate, up = (z @ gate_up).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ down


def moe_forward(x, router_weight, gate_up, down, shared, top_k):
    experts, scores = route(x, router_weight, top_k)
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        for j in range(top_k):
            out[n] += expert(scores[n, j] * x[n], gate_up[experts[n, j]], down[experts[n, j]])
    gate, up, shared_down = shared
    return out + (F.silu(x @ gate) * (x @ up)) @ shared_down


def sparse_dispatch(x, experts, scores, gate_up, down):
    flat = experts.flatten()
    order = torch.argsort(flat)
    tokens = order // experts.shape[1]
    inputs = x[tokens] * scores.flatten()[order, None]
    counts = torch.bincount(flat, minlength=gate_up.shape[0]).tolist()
    outputs = [expert(rows, gate_up[e], down[e]) for e, rows in enumerate(inputs.split(counts))]
    return torch.zeros_like(x).index_add_(0, tokens, torch.cat(outputs))


def chunked_causal_mask(T, chunk):
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    return (j <= i) & (j // chunk == i // chunk)


def temperature_scale(positions, floor_scale, attn_scale):
    return torch.log(torch.floor((positions.float() + 1) / floor_scale) + 1) * attn_scale + 1


def attention(q, k, v, chunk, temperature):
    _, heads, length, dim = q.shape
    if temperature is not None:
        q = q * temperature_scale(torch.arange(length), *temperature)[:, None]
    group = heads // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    visible = (
        torch.ones(length, length, dtype=torch.bool).tril()
        if chunk is None
        else chunked_causal_mask(length, chunk)
    )
    logits = (q @ k.transpose(-2, -1) / math.sqrt(dim)).masked_fill(~visible, float("-inf"))
    return torch.softmax(logits, dim=-1) @ v


def chunked_cache_update(keys, start, new_keys, chunk):
    every = torch.cat([keys, new_keys], dim=2)
    end = start + every.shape[2]
    keep_from = max(start, end // chunk * chunk)  # the chunk of the next token, which sits at `end`
    return every[:, :, keep_from - start :], keep_from


def same_expert_rate(experts):
    return (experts[:, 1:] == experts[:, :-1]).float().mean().item()


def load_stats(experts, num_experts):
    counts = torch.bincount(experts.flatten(), minlength=num_experts).double()
    load = counts / counts.sum()
    return float(-torch.special.xlogy(load, load).sum()), float((load.max() - load.mean()) / load.mean())


def pixel_shuffle(patches, factor):
    n, count, c = patches.shape
    side = math.isqrt(count)
    grid = patches.reshape(n, side // factor, factor, side // factor, factor, c)
    return grid.permute(0, 1, 3, 2, 4, 5).reshape(n, -1, factor * factor * c)


def add_class_token(patches, class_embedding, positions):
    return torch.cat([patches, class_embedding.expand(len(patches), 1, -1)], dim=1) + positions


def merge_image_features(embeddings, input_ids, features, image_token_id):
    out = embeddings.clone()
    out[input_ids == image_token_id] = features
    return out


def send_splits(expert_counts, world_size):
    per_rank = len(expert_counts) // world_size
    return [int(expert_counts[r * per_rank : (r + 1) * per_rank].sum()) for r in range(world_size)]


def dispatch_order(experts, world_size, num_experts):
    slots = experts.flatten().tolist()
    return torch.tensor([s for e in range(num_experts) for s, chosen in enumerate(slots) if chosen == e])


def combine(results, order, top_k):
    per_slot = torch.empty_like(results)
    per_slot[order] = results
    return per_slot.unflatten(0, (-1, top_k)).sum(dim=1)


def average_gradients(grads_per_rank):
    total = sum(grads_per_rank)
    return [total / len(grads_per_rank) for _ in grads_per_rank]


SOLUTIONS = {
    "1.1": rms_norm,
    "1.2": rope_frequencies,
    "1.3": apply_rope,
    "1.4": scaled_rope_frequencies,
    "1.5": qk_norm,
    "2.1": route,
    "2.2": moe_forward,
    "2.3": sparse_dispatch,
    "3.1": chunked_causal_mask,
    "3.2": temperature_scale,
    "3.3": attention,
    "3.4": chunked_cache_update,
    "4.1": same_expert_rate,
    "4.2": load_stats,
    "6.1": pixel_shuffle,
    "6.2": add_class_token,
    "6.3": merge_image_features,
    "7.1": send_splits,
    "7.2": dispatch_order,
    "7.3": combine,
    "7.4": average_gradients,
}


# ------------------------------------------------------------ the same answers, from l4lab's own code
def _record(experts, num_experts):
    experts = experts[..., None] if experts.dim() == 2 else experts
    b, t, _ = experts.shape
    return RoutingRecord(0, experts, torch.ones(experts.shape), torch.zeros(b, t, num_experts))


def _l4lab_moe(x, router_weight, gate_up, down, shared, top_k):
    logits = x @ router_weight.T
    experts = logits.topk(top_k, dim=-1).indices
    scores = torch.sigmoid(logits.gather(-1, experts))
    gate, up, shared_down = shared
    return ops.routed_experts(x, experts, scores, gate_up, down) + ops.swiglu(x @ gate, x @ up) @ shared_down


def _l4lab_cache_update(keys, start, new_keys, chunk):
    cache = LayerCache(chunk)
    cache.update(keys, keys, start)
    cache.update(new_keys, new_keys, start + keys.shape[2])
    return cache.keys, cache.start


def _l4lab_load_stats(experts, num_experts):
    load = routing.expert_load(_record(experts, num_experts), num_experts)
    return routing.load_entropy(load), routing.max_violation(load)


FROM_L4LAB = {
    "1.1": ops.rms_norm,
    "1.2": rope_inverse_frequencies,
    "1.3": lambda x, p, theta: ops.apply_rope(
        x, rope_angles(p, rope_inverse_frequencies(x.shape[-1], theta))
    ),
    "1.4": lambda d, theta, f, low, high, context: rope_inverse_frequencies(
        d, theta, RopeScaling(f, low, high, context)
    ),
    "1.5": lambda x, eps: ops.rms_norm(x, None, eps),
    "2.2": _l4lab_moe,
    "2.3": ops.routed_experts,
    "3.1": lambda t, c: ops.visibility_mask(0, t, 0, t, c),
    "3.2": lambda p, f, a: ops.Temperature(f, a).scales(p),
    "3.3": lambda q, k, v, c, t: ops.attention(q, k, v, 0, 0, c, t and ops.Temperature(*t), True)[0],
    "3.4": _l4lab_cache_update,
    "4.1": lambda e: routing.same_expert_rate(_record(e, int(e.max()) + 1))[0],
    "4.2": _l4lab_load_stats,
    "6.1": vision.pixel_shuffle,
    "6.3": vision.merge_image_features,
}


@pytest.mark.parametrize("step", sorted(SOLUTIONS))
def test_a_right_answer_written_from_scratch_passes(step):
    result = labs.check(step, SOLUTIONS[step])
    assert result.passed, result.message
    total = len(labs._steps_table()[step].cases())
    assert total >= 6 and result.message.startswith(f"✓ {step} passed: {total} cases")
    assert result.cases == total and result.failed_case is None
    assert bool(result)


@pytest.mark.parametrize("step", sorted(FROM_L4LAB))
def test_l4lab_itself_passes(step):
    result = labs.check(step, FROM_L4LAB[step])
    assert result.passed, result.message


def test_steps_list_every_step_with_a_description():
    lines = labs.steps()
    lab5 = ["5.1", "5.2", "5.3"]  # lab 5's answers are in test_lab5.py
    # 7.5 runs on 2 processes: tests/test_lab7.py checks it
    expected = [s for s in SOLUTIONS if s < "5"] + lab5 + [s for s in SOLUTIONS if s > "6"] + ["7.5"]
    assert [line.split()[0] for line in lines] == expected
    assert lines[0].startswith("1.1  rms_norm(x, weight, eps) — ")
    assert all(len(line.split(" — ", 1)[1]) > 20 for line in lines)
    assert labs.steps("2") == labs.steps("router_moe") == lines[5:8]
    assert labs.check("router_moe.1", route).passed  # the lab's name works as well as its number


# ---------------------------------------------------------------------- wrong answers
def rms_eps_outside(x, weight, eps):
    return x / (x.pow(2).mean(-1, keepdim=True).sqrt() + eps) * weight


def rope_rotate_half(x, positions, theta):
    angles = positions.float()[:, None] * rope_frequencies(x.shape[-1], theta)
    cos = torch.cat([angles.cos()] * 2, -1)[None, :, None, :]
    sin = torch.cat([angles.sin()] * 2, -1)[None, :, None, :]
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-second, first], dim=-1) * sin


def route_softmax(x, router_weight, top_k):
    scores, experts = torch.softmax(x @ router_weight.T, dim=-1).topk(top_k, dim=-1)
    return experts, scores


def route_renormalised(x, router_weight, top_k):
    experts, scores = route(x, router_weight, top_k)
    return experts, scores / scores.sum(-1, keepdim=True)


def moe_score_on_output(x, router_weight, gate_up, down, shared, top_k):
    experts, scores = route(x, router_weight, top_k)
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        for j in range(top_k):
            out[n] += scores[n, j] * expert(x[n], gate_up[experts[n, j]], down[experts[n, j]])
    gate, up, shared_down = shared
    return out + (F.silu(x @ gate) * (x @ up)) @ shared_down


def moe_renormalised(x, router_weight, gate_up, down, shared, top_k):
    experts, scores = route_renormalised(x, router_weight, top_k)
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        for j in range(top_k):
            out[n] += expert(scores[n, j] * x[n], gate_up[experts[n, j]], down[experts[n, j]])
    gate, up, shared_down = shared
    return out + (F.silu(x @ gate) * (x @ up)) @ shared_down


def dispatch_dense(x, experts, scores, gate_up, down):
    """Right answers, but every expert multiplies every token (masked by a zero score)."""
    out = torch.zeros_like(x)
    for e in range(gate_up.shape[0]):
        weight = ((experts == e) * scores).sum(-1, keepdim=True)
        out += expert(x * weight, gate_up[e], down[e])
    return out


def dispatch_dense_broadcast(x, experts, scores, gate_up, down):
    """Dense again, without a single matmul: FLOP counting sees nothing, the element count does."""
    weight = torch.zeros(x.shape[0], gate_up.shape[0]).scatter_add(1, experts, scores)
    hidden = ((x[:, None, :] * weight[:, :, None])[..., None] * gate_up[None]).sum(2)
    gate, up = hidden.chunk(2, dim=-1)
    return ((F.silu(gate) * up)[..., None] * down[None]).sum(2).sum(1)


def mask_sliding_window(T, chunk):
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    return (j <= i) & (j > i - chunk)


def mask_not_causal(T, chunk):
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    return j // chunk == i // chunk


def temperature_relative(positions, floor_scale, attn_scale):
    return temperature_scale(torch.arange(len(positions)), floor_scale, attn_scale)


def attention_not_causal(q, k, v, chunk, temperature):
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    logits = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if chunk is not None:
        i, j = torch.arange(q.shape[2])[:, None], torch.arange(q.shape[2])[None, :]
        logits = logits.masked_fill(j // chunk != i // chunk, float("-inf"))
    return torch.softmax(logits, dim=-1) @ v


def attention_gqa_repeat(q, k, v, chunk, temperature):
    group = q.shape[1] // k.shape[1]
    return attention(q, k.repeat(1, group, 1, 1), v.repeat(1, group, 1, 1), chunk, temperature)


def rope_positions_interpolated(head_dim, theta, factor, low_freq_factor, high_freq_factor, original_context):
    return rope_frequencies(head_dim, theta) / factor  # every pair slowed down, also the fast ones


def rope_scaling_as_a_step(head_dim, theta, factor, low_freq_factor, high_freq_factor, original_context):
    inv_freq = rope_frequencies(head_dim, theta)
    slow = 2 * math.pi / inv_freq > original_context / low_freq_factor
    return torch.where(slow, inv_freq / factor, inv_freq)  # Scout's case only: no band between


def qk_norm_l2(x, eps):
    return x / x.norm(dim=-1, keepdim=True)


def qk_norm_whole_token(x, eps):
    flat = x.flatten(-2)
    return (flat * torch.rsqrt(flat.pow(2).mean(dim=-1, keepdim=True) + eps)).view_as(x)


def cache_keeps_everything(keys, start, new_keys, chunk):
    return torch.cat([keys, new_keys], dim=2), start


def cache_sliding_window(keys, start, new_keys, chunk):
    every = torch.cat([keys, new_keys], dim=2)
    return every[:, :, -chunk:], start + max(0, every.shape[2] - chunk)


def cache_keeps_a_finished_chunk(keys, start, new_keys, chunk):
    every = torch.cat([keys, new_keys], dim=2)
    keep_from = max(start, (start + every.shape[2] - 1) // chunk * chunk)  # the last token's chunk
    return every[:, :, keep_from - start :], keep_from


def rate_across_sequences(experts):
    flat = experts.flatten()
    return (flat[1:] == flat[:-1]).float().mean().item()


def load_stats_nan(experts, num_experts):
    counts = torch.bincount(experts.flatten(), minlength=num_experts).double()
    p = counts / counts.sum()
    return float(-(p * p.log()).sum()), float((p.max() - p.mean()) / p.mean())


def load_stats_dropping_idle_experts(experts, num_experts):
    counts = torch.bincount(experts.flatten()).double()
    p = counts / counts.sum()
    return float(-torch.special.xlogy(p, p).sum()), float((p.max() - p.mean()) / p.mean())


def pixel_shuffle_transpose_order(patches, factor):
    n, count, c = patches.shape
    side = math.isqrt(count)
    grid = patches.reshape(n, side // factor, factor, side // factor, factor, c)
    return grid.permute(0, 1, 3, 4, 2, 5).reshape(n, -1, factor * factor * c)  # [i, j, dj, di, C]


def pixel_shuffle_plain_reshape(patches, factor):
    return patches.reshape(patches.shape[0], -1, factor * factor * patches.shape[2])


def class_token_first(patches, class_embedding, positions):
    return torch.cat([class_embedding.expand(len(patches), 1, -1), patches], dim=1) + positions


def merge_each_row_from_zero(embeddings, input_ids, features, image_token_id):
    out = embeddings.clone()
    for row in range(len(input_ids)):
        where = input_ids[row] == image_token_id
        out[row, where] = features[: int(where.sum())]
    return out


def merge_into_first_positions(embeddings, input_ids, features, image_token_id):
    out = embeddings.clone().flatten(0, 1)
    out[: len(features)] = features
    return out.view_as(embeddings)


def splits_per_expert(expert_counts, world_size):
    return expert_counts.tolist()


def splits_experts_round_robin(expert_counts, world_size):
    return [int(expert_counts[r::world_size].sum()) for r in range(world_size)]


def splits_ranks_reversed(expert_counts, world_size):
    return send_splits(expert_counts, world_size)[::-1]


def order_of_the_tokens(experts, world_size, num_experts):
    return torch.arange(experts.numel())


def order_by_rank_only(experts, world_size, num_experts):
    ranks = experts.flatten() // (num_experts // world_size)
    return torch.argsort(ranks, stable=True)


def combine_without_permutation(results, order, top_k):
    return results.unflatten(0, (-1, top_k)).sum(dim=1)


def combine_permuting_forward(results, order, top_k):
    return results[order].unflatten(0, (-1, top_k)).sum(dim=1)


def gradients_summed(grads_per_rank):
    return [sum(grads_per_rank) for _ in grads_per_rank]


def gradients_not_reduced(grads_per_rank):
    return [g.clone() for g in grads_per_rank]


WRONG = [
    ("1.1", rms_eps_outside, 4, "eps goes INSIDE the square root"),
    ("1.3", rope_rotate_half, 1, "Llama 4 pairs (2i, 2i+1), not (i, i+D/2)"),
    ("1.4", rope_positions_interpolated, 1, "only the SLOW pairs are stretched"),
    ("1.4", rope_scaling_as_a_step, 2, "between the two thresholds the frequency is interpolated"),
    ("1.5", qk_norm_l2, 1, "divide by the root MEAN square, not by the length"),
    ("1.5", qk_norm_whole_token, 1, "normalise each HEAD on its own"),
    ("2.1", route_softmax, 1, "no softmax"),
    ("2.1", route_renormalised, 1, "do not renormalise"),
    ("2.2", moe_score_on_output, 1, "the score scales the expert's INPUT"),
    ("2.2", moe_renormalised, 1, "do not renormalise"),
    ("3.1", mask_sliding_window, 1, "chunks are fixed blocks: position 8 with C=8 sees only itself"),
    ("3.1", mask_not_causal, 1, "j <= i"),
    ("3.2", temperature_relative, 2, "ABSOLUTE positions"),
    ("3.3", attention_not_causal, 1, "attention is causal"),
    ("3.3", attention_gqa_repeat, 1, "repeat_interleave"),
    ("3.4", cache_keeps_everything, 1, "drops the keys of every FINISHED chunk"),
    ("3.4", cache_sliding_window, 1, "keep the current chunk, not the last `chunk` keys"),
    ("3.4", cache_keeps_a_finished_chunk, 2, "that chunk is finished"),
    ("4.1", rate_across_sequences, 1, "pairs never cross from one sequence to the next"),
    ("4.2", load_stats_nan, 2, "0 * ln 0 counts as 0"),
    ("4.2", load_stats_dropping_idle_experts, 2, "minlength=num_experts"),
    ("6.1", pixel_shuffle_transpose_order, 1, "Check the order of your permute"),
    ("6.1", pixel_shuffle_plain_reshape, 1, "a token must gather an f x f SQUARE"),
    ("6.2", class_token_first, 1, "Llama 4 APPENDS the class token after the patches"),
    ("6.3", merge_each_row_from_zero, 2, "row 1's placeholders continue where row 0's stopped"),
    ("6.3", merge_into_first_positions, 1, "the features go where the placeholders are"),
    ("7.1", splits_per_expert, 1, "ONE split per RANK"),
    ("7.1", splits_experts_round_robin, 1, "the experts are held in BLOCKS"),
    ("7.1", splits_ranks_reversed, 1, "split i is the number of rows sent to rank i"),
    ("7.2", order_of_the_tokens, 1, "sort the slots by expert"),
    ("7.2", order_by_rank_only, 1, "sort by expert, not only by rank"),
    ("7.3", combine_without_permutation, 1, "undo the dispatch order"),
    ("7.3", combine_permuting_forward, 1, "applies the dispatch order a second time"),
    ("7.4", gradients_summed, 1, "divide by the number of ranks"),
    ("7.4", gradients_not_reduced, 1, "without an all-reduce the ranks hold different"),
]


@pytest.mark.parametrize(("step", "fn", "case_number", "hint"), WRONG, ids=[w[1].__name__ for w in WRONG])
def test_a_typical_mistake_fails_with_its_hint(step, fn, case_number, hint):
    result = labs.check(step, fn)
    assert not result.passed
    assert result.failed_case == case_number, result.message
    total = len(labs._steps_table()[step].cases())
    assert result.message.startswith(f"✗ {step} failed on case {case_number} of {total}: ")
    assert hint in result.message, result.message
    assert f'labs.case("{step}", {case_number})' in result.message


def test_the_failure_message_shows_expected_and_received_values():
    message = labs.check("1.1", rms_eps_outside).message
    assert "inputs: x=float32 [2, 3, 8], weight=float32 [8], eps=1e-05" in message
    expected = labs.case("1.1", 4)["expected"]
    assert f"expected {expected[0, 0, 0].item():.4f}" in message
    assert "expected output[0, 0][...] = [" in message and "got      output[0, 0][...] = [" in message
    mask = labs.check("3.1", mask_sliding_window).message
    assert "row 8 (query 8, # = visible)" in mask
    assert "expected ........#......." in mask and "got      .########......." in mask


@pytest.mark.parametrize("fn", [dispatch_dense, dispatch_dense_broadcast])
def test_a_dense_dispatch_is_right_but_fails_for_not_being_sparse(fn):
    for number in range(1, 7):
        example = labs.case("2.3", number)
        assert torch.allclose(fn(**example["inputs"]), example["expected"], atol=1e-5)  # right answers
    result = labs.check("2.3", fn)
    assert not result.passed
    assert "grows with the number of experts" in result.message
    assert "Sort the token slots by expert" in result.message


def test_the_sparse_check_reports_flops():
    message = labs.check("2.3", sparse_dispatch).message
    assert message == "✓ 2.3 passed: 6 cases, and sparse: 196,608 FLOPs with 2 experts, 196,608 with 16"


def test_an_exception_is_reported_with_its_case_and_line():
    def broken(x, weight, eps):
        scale = torch.rsqrt(x.pow(2).mean(-1) + eps)
        return x * scale * weight  # [B, T, D] * [B, T]: broadcasts wrongly

    result = labs.check("1.1", broken)
    assert not result.passed
    assert result.message.startswith("✗ 1.1 failed on case 1 of 6: batch 2, 5 tokens, dim 16")
    assert "your function raised RuntimeError: The size of tensor a (16)" in result.message
    assert "in broken, line " in result.message and "return x * scale * weight" in result.message


def test_wrong_shapes_name_both_shapes():
    result = labs.check("1.3", lambda x, p, theta: apply_rope(x, p, theta)[..., ::2])
    assert "expected shape (2, 5, 3, 8), got (2, 5, 3, 4)" in result.message
    result = labs.check("1.2", lambda d, theta: theta ** (-torch.arange(0, d, 1) / d))
    assert "inv_freq: expected shape (4,), got (8,)" in result.message
    result = labs.check("2.1", lambda x, w, k: route(x, w, k)[0])
    assert "expected a tuple (experts, scores)" in result.message
    result = labs.check("4.1", lambda e: (e[:, 1:] == e[:, :-1]).float().mean(1))
    assert "expected one number, got a tensor of shape (4,)" in result.message


def test_unfinished_missing_return_and_in_place_answers():
    def unfinished(x, weight, eps):
        raise NotImplementedError

    message = labs.check("1.1", unfinished).message
    assert message.startswith("✗ 1.1 not done yet: rms_norm still raises NotImplementedError")
    assert "return` missing" in labs.check("3.1", lambda t, c: None).message

    def in_place(x, weight, eps):
        x.mul_(torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))
        return x * weight

    assert "changed its input x in place" in labs.check("1.1", in_place).message
    assert "a bool tensor" in labs.check("3.1", lambda t, c: chunked_causal_mask(t, c).float()).message


def test_unknown_steps_and_non_functions_are_answered_not_raised():
    assert not labs.check("1.9", rms_norm).passed
    assert "the steps are 1.1, 1.2, 1.3" in labs.check("1.9", rms_norm).message
    result = labs.check("1.1", rms_norm(torch.ones(2), torch.ones(2), 1e-5))
    assert "pass the function itself" in result.message


def test_a_lab_is_one_module_that_registers_its_steps(monkeypatch):
    """What a teacher's new module does (l4lab/labs/core.py): steps registered under a lab number become
    checkable by id and by the lab's name; ids that do not start with the number and a name already
    taken are refused with a message."""
    from l4lab.labs import core

    monkeypatch.setattr(core, "LABS", dict(core.LABS))
    monkeypatch.setattr(core, "_STEPS", list(core._STEPS))
    square = core.Step(
        "9.1",
        "square",
        ("x",),
        "x times itself",
        lambda: [core.Case("x = 3", (torch.tensor(3.0),), torch.tensor(9.0))],
        core.compare_tensor,
        (core.Mistake("doubled", lambda x: 2 * x, "multiply x by itself, not by 2"),),
        "x * x",
    )
    core.register_lab("9", "squares", [square])
    assert labs.steps("squares") == ["9.1  square(x) — x times itself"]
    assert labs.check("squares.1", lambda x: x * x).passed
    assert "multiply x by itself, not by 2" in labs.check("9.1", lambda x: x + x).message
    assert labs.steps()[-1].startswith("9.1")  # after the labs registered before it
    with pytest.raises(ValueError, match=r"must be named '8\.<step>'"):
        core.register_lab("8", "cubes", [square])
    with pytest.raises(ValueError, match="already called 'squares'"):
        core.register_lab("8", "squares", [dataclasses.replace(square, id="8.1")])


@pytest.mark.parametrize("step", sorted(SOLUTIONS))
def test_every_step_has_three_hints_that_lead_to_the_code(step):
    """Hint 1 is the idea in words (no code), hint 2 the formula, hint 3 names a file of this repository
    and a function or class defined in it; none of them passes for the answer (the checker still
    fails on an unfinished function after each, which the notebooks show)."""
    hints = labs._steps_table()[step].hints
    assert hints is not None and len(set(hints)) == 3
    for code_like in ("torch.", "//", " @ ", "**", "[:", "def "):
        assert code_like not in hints.concept, (step, code_like)
    path, _, rest = hints.code.partition(", ")
    source = (ROOT / path).read_text()
    for name in re.match(r"[\w.]+", rest).group(0).split("."):  # e.g. LayerCache.update
        assert re.search(rf"^\s*(def|class) {name}\b", source, re.M), (step, path, name)
    for level in (1, 2, 3):
        shown = labs.hint(step, level)
        assert shown.startswith(f"{step}, hint {level} of 3") and repr(shown) == str(shown)
    failing = labs.check(step, lambda *args: None).message
    assert f'labs.hint("{step}")' in failing  # a wrong answer that matches no known mistake points to them


def test_hint_levels_are_checked():
    assert labs.hint("3.1").startswith("3.1")
    with pytest.raises(ValueError, match="level must be 1"):
        labs.hint("3.1", 4)
    with pytest.raises(ValueError, match="unknown step"):
        labs.hint("3.9")


def test_result_display():
    passed, failed = labs.check("3.1", chunked_causal_mask), labs.check("3.1", mask_sliding_window)
    assert repr(passed) == str(passed) == "✓ 3.1 passed: 6 cases"
    assert "color:#1a7f37" in passed._repr_html_() and "✓ 3.1 passed: 6 cases" in passed._repr_html_()
    assert failed._repr_html_().startswith("<pre") and "#b42318" in failed._repr_html_()
    assert "j &lt;= i" in labs.check("3.1", mask_not_causal)._repr_html_()  # escaped


def test_cases_are_deterministic_and_reproduce_with_case():
    first, second = labs.case("3.3", 2), labs.case("3.3", 2)
    assert torch.equal(first["inputs"]["q"], second["inputs"]["q"])
    assert first["label"].startswith("batch 1, 3 query heads / 1 kv head")
    assert torch.allclose(attention(**first["inputs"]), first["expected"], atol=1e-6)
    assert set(labs.case("2.2", 4)["inputs"]) == {"x", "router_weight", "gate_up", "down", "shared", "top_k"}
    with pytest.raises(ValueError, match="cases 1 to 6"):
        labs.case("1.1", 7)


def test_the_hidden_cases_cover_the_edge_cases():
    labels = " | ".join(labs.case(step, n)["label"] for step in SOLUTIONS for n in range(1, 7))
    for edge in ("batch 1", "odd", "not a power of two", "does not divide", "get no token", "no token"):
        assert edge in labels, edge
    some_idle = labs.case("2.3", 4)["inputs"]
    assert torch.bincount(some_idle["experts"].flatten(), minlength=8).eq(0).any()


def test_train_tiny_moe_is_quick_and_deterministic():
    first = labs.train_tiny_moe(steps=2, seed=3)
    second = labs.train_tiny_moe(steps=2, seed=3)
    assert [h["loss"] for h in first.history] == [h["loss"] for h in second.history]
    assert len(first.history) == 2 and "val_loss" in first.history[-1]
    assert first.data.domains is not None and first.data.tokens.shape == (64, 65)
    with torch.no_grad():
        records = first.model(first.data.inputs[:4]).routing
    assert len(records) == 4 and records[0].router_logits.shape[-1] == 8
    rate, _ = routing.same_expert_rate(records[0])
    assert same_expert_rate(records[0].experts[..., 0]) == pytest.approx(rate)
    assert labs.train_tiny_moe(steps=0).history == []


# ---------------------------------------------------------------------- the notebooks
def _cells(path):
    return json.loads(path.read_text())["cells"]


EXERCISES = sorted(LAB_NOTEBOOKS.glob("lab*.ipynb"))


def test_every_lab_has_an_exercise_and_a_solution_notebook():
    assert [p.name for p in EXERCISES] == [
        "lab1_rmsnorm_rope.ipynb",
        "lab2_router_moe.ipynb",
        "lab3_chunked_attention.ipynb",
        "lab4_routing_experiment.ipynb",
        "lab5_irope_length.ipynb",
        "lab6_multimodal.ipynb",
        "lab7_expert_dispatch.ipynb",
    ]
    for exercise in EXERCISES:
        assert (LAB_NOTEBOOKS / "solutions" / exercise.name).exists()


@pytest.mark.parametrize("exercise", EXERCISES, ids=[p.stem for p in EXERCISES])
def test_exercises_match_their_solutions_except_the_answers(exercise):
    """The exercise notebook is its solution with each answer replaced by ``raise NotImplementedError``,
    stored without outputs; the solution is stored executed (strict nbval compares its outputs)."""
    solution = LAB_NOTEBOOKS / "solutions" / exercise.name
    ex_cells, sol_cells = _cells(exercise), _cells(solution)
    assert len(ex_cells) == len(sol_cells)
    checked = []
    for ex, sol in zip(ex_cells, sol_cells, strict=True):
        ex_text, sol_text = "".join(ex["source"]), "".join(sol["source"])
        assert ex["cell_type"] == sol["cell_type"]
        if ex["cell_type"] == "code":
            assert ex["outputs"] == [] and ex["execution_count"] is None
            assert sol["outputs"] and sol["execution_count"] is not None
            assert "NotImplementedError" not in sol_text
        if ex["cell_type"] == "code" and "raise NotImplementedError" in ex_text:
            head, tail = ex_text.split("    raise NotImplementedError")
            assert sol_text.startswith(head), head
            call = tail[tail.index("labs.check(") :]
            assert sol_text.endswith(call)
            checked.append(call.split('"')[1])
        elif ex_text.startswith("**Your answer"):
            assert sol_text.startswith("**A possible answer")
        else:
            assert ex_text == sol_text
    assert checked == [line.split()[0] for line in labs.steps(exercise.name[3])]


# ------------------------------------------------------------ verdicts independent of the machine
VERDICTS_SCRIPT = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("lab_answers", sys.argv[1])
answers = importlib.util.module_from_spec(spec)
spec.loader.exec_module(answers)
from l4lab import labs
table = labs._steps_table()
verdicts = {}
for step, fn in answers.SOLUTIONS.items():
    verdicts[f"{step} right answer"] = labs.check(step, fn).passed
for step, fn, _, _ in answers.WRONG:
    verdicts[f"{step} {fn.__name__}"] = labs.check(step, fn).failed_case
for step in answers.SOLUTIONS:
    for mistake in table[step].mistakes:
        verdicts[f"{step} {mistake.name}"] = labs.check(step, mistake.fn).failed_case
print(json.dumps(verdicts))
"""

NUMERIC_PATHS = {
    "as configured": {},
    "1 thread": {"OMP_NUM_THREADS": "1"},
    "3 threads": {"OMP_NUM_THREADS": "3"},
    "ATen without vectorisation": {"ATEN_CPU_CAPABILITY": "default"},
    "ATen AVX2": {"ATEN_CPU_CAPABILITY": "avx2"},
    "MKL compatible mode": {"MKL_CBWR": "COMPATIBLE"},
}


def test_verdicts_are_the_same_on_every_numeric_path():
    """Each lab checker's verdict on right answers and on every typical mistake (the tests' and those
    registered in l4lab.labs) is the same whatever kernels, MKL mode and thread count compute it."""
    verdicts = {}
    for name, env in NUMERIC_PATHS.items():
        run = subprocess.run(
            [sys.executable, "-c", VERDICTS_SCRIPT, __file__],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
        )
        verdicts[name] = json.loads(run.stdout.splitlines()[-1])
    reference = verdicts["as configured"]
    assert all(passed is True for key, passed in reference.items() if key.endswith("right answer"))
    assert all(case is not None for key, case in reference.items() if not key.endswith("right answer"))
    for name, found in verdicts.items():
        assert found == reference, f"{name}: {set(found.items()) ^ set(reference.items())}"
