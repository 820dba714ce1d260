"""The planner against the model card's deployment facts and hand computations."""

from __future__ import annotations

import pytest

import l4lab
from l4lab.planner import GB, all_to_all_bytes_per_token, ep_cost, expert_parameters, kv_cache_bytes, plan


def test_scout_fits_one_h100_with_int4_weights_and_not_with_bf16() -> None:
    # Llama 4 model card (Quantization): "Scout ... can fit within a single H100 GPU with on-the-fly int4
    # quantization"; its bf16 weights alone are over twice the GPU
    assert plan("scout", gpus=1, weights="int4", context="256K").fits
    assert plan("scout", gpus=1, weights="bf16").weights > 2 * 80 * GB


def test_maverick_fits_one_h100_host_in_fp8_and_not_in_bf16() -> None:
    # model card: "The FP8 quantized weights fit on a single H100 DGX host" (8 x 80 GB)
    assert plan("maverick", gpus=8, weights="fp8", context="256K").fits
    assert not plan("maverick", gpus=8, weights="bf16", context="256K").fits
    assert not plan("maverick", gpus=1, weights="fp8").fits


def test_kv_cache_grows_with_the_global_layers_only() -> None:
    scout = l4lab.preset("llama4-scout")
    per_token_layer = 2 * 8 * 128 * 2  # k and v, 8 kv heads of 128, bf16
    million = 1024 * 1024
    # 12 NoPE layers keep every token, the 36 chunked layers one chunk of 8192
    assert kv_cache_bytes(scout, million) == 12 * million * per_token_layer + 36 * 8192 * per_token_layer
    assert kv_cache_bytes(scout.replace(positions="rope"), million) == 48 * million * per_token_layer
    ten_million = plan("scout", gpus=1, weights="int4", context="10M")
    assert not ten_million.fits and ten_million.kv_cache > 500 * GB  # 10M tokens need a cluster's memory


def test_weights_split_experts_over_gpus() -> None:
    maverick = l4lab.preset("llama4-maverick")
    assert expert_parameters(maverick) == 24 * 128 * 3 * 5120 * 8192
    total, _ = l4lab.count_params(maverick)
    dense = total - expert_parameters(maverick)
    replicated = plan("maverick", gpus=16, weights="fp8", replicate_dense=True)
    assert replicated.weights == pytest.approx(expert_parameters(maverick) / 16 + dense)
    assert plan("maverick", gpus=16, weights="fp8").weights == pytest.approx(total / 16)


def test_all_to_all_bytes_per_token_by_hand() -> None:
    maverick = l4lab.preset("llama4-maverick")
    # dispatch + combine of one bf16 hidden vector, 7 of 8 destinations remote
    assert all_to_all_bytes_per_token(maverick, 8) == 2 * 5120 * 2 * 7 / 8
    assert plan("maverick", gpus=8).all_to_all_per_token_layer == 17920
    assert all_to_all_bytes_per_token(maverick, 1) == 0


def test_communication_overtakes_compute_share_across_nodes() -> None:
    costs = {n: ep_cost("maverick", n) for n in (8, 16, 32, 64)}
    flops = 2 * 3 * 5120 * 8192 * 2  # routed + shared expert
    assert costs[8].compute_s == pytest.approx(flops / (0.5 * 989e12))
    assert costs[8].infiniband_s == 0 and costs[8].ratio < 0.1  # inside one node: NVLink is cheap
    assert costs[16].infiniband_s == pytest.approx(2 * 5120 * 2 * 8 / 16 / 50e9)
    ratios = [costs[n].ratio for n in (8, 16, 32, 64)]
    assert ratios == sorted(ratios) and ratios[-1] > 0.3  # across nodes it nears compute


def test_bad_plans_are_named() -> None:
    with pytest.raises(ValueError, match=r"weights must be one of \['bf16', 'fp8', 'int4'\]"):
        plan("scout", weights="fp4")
    with pytest.raises(ValueError, match="16 experts do not split over 3 GPUs"):
        plan("scout", gpus=3)
    with pytest.raises(ValueError, match="context must be a number of tokens or one of"):
        plan("scout", context="2M")
    with pytest.raises(ValueError, match="model must be a Config or one of"):
        plan("llama5")


# ---------------------------------------------------------------------- the figures of notebook 10
def test_figures_draw_the_numbers_they_are_given() -> None:
    import torch

    from l4lab import viz

    sent = torch.tensor([[[5, 1], [2, 8]], [[3, 3], [0, 10]]])
    fig = viz.traffic_figure(sent)
    assert [t.type for t in fig.data] == ["heatmap", "heatmap"]
    assert fig.data[1].z.tolist() == [[3, 3], [0, 10]]
    waits = viz.rank_wait_figure(
        [torch.tensor([4.0, 1.0])], [torch.tensor([0.001, 0.004])], [torch.tensor([0.003, 0.0])], ["a"]
    )
    bars = {t.name: list(t.y) for t in waits.data}
    assert bars["a"] == [4.0, 1.0] and bars["a: all-to-all and waiting"] == pytest.approx([1.0, 4.0])
    plans = [plan("scout", weights="int4"), plan("maverick", gpus=8, weights="fp8")]
    stacked = viz.plan_figure(plans)
    assert [t.name for t in stacked.data] == ["weights", "kv cache", "activations"]
    assert stacked.data[0].x[0] == pytest.approx(plans[0].weights / GB)
    costs = [ep_cost("maverick", n) for n in (8, 16)]
    bars = viz.ep_cost_figure(costs)
    assert bars.data[2].y[0] == 0 and bars.data[2].y[1] == pytest.approx(1e9 * costs[1].infiniband_s)
