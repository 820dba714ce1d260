"""Attention maps on a log colour scale, and each query's attention entropy against uniform."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from l4lab import viz
from l4lab.config import LayerSpec

CHUNKED = LayerSpec(index=0, uses_rope=True, chunk_size=2, temperature_tuning=False, qk_norm=False, moe=False)
GLOBAL = LayerSpec(
    index=3, uses_rope=False, chunk_size=None, temperature_tuning=True, qk_norm=False, moe=False
)
PROBS = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [1e-6, 0.1, 0.899999]])


def test_log_scale_colours_log10_floored_and_leaves_invisible_keys_blank() -> None:
    heatmap = viz.attention_map_figure(PROBS, GLOBAL, scale="log").data[0]
    z = np.array(heatmap.z, dtype=np.float64)
    assert z[0, 0] == 0.0 and math.isclose(z[1, 0], math.log10(0.5))
    assert z[2, 0] == -4.0  # 1e-6 is below the floor of 1e-4
    assert np.isnan(z[0, 1]) and np.isnan(z[1, 2])  # probability 0: a masked key
    assert (heatmap.zmin, heatmap.zmax) == (-4.0, 0.0)
    assert np.array_equal(np.array(heatmap.customdata, dtype=np.float64), PROBS.double().numpy())
    linear = viz.attention_map_figure(PROBS, GLOBAL).data[0]
    assert np.array_equal(np.array(linear.z, dtype=np.float64), PROBS.double().numpy())
    with pytest.raises(ValueError, match="'linear' or 'log'"):
        viz.attention_map_figure(PROBS, GLOBAL, scale="sqrt")


def test_row_entropy_against_uniform_on_global_and_chunked_layers() -> None:
    uniform_causal = torch.tril(torch.ones(4, 4)) / torch.arange(1, 5)[:, None]
    entropy, uniform = viz.attention_row_entropy(uniform_causal, GLOBAL)
    assert torch.allclose(entropy, torch.log(torch.arange(1.0, 5.0)).double())
    assert torch.allclose(uniform, entropy)
    one_hot = torch.eye(4)
    entropy, uniform = viz.attention_row_entropy(one_hot[None], CHUNKED)  # leading dims are kept
    assert entropy.shape == (1, 4) and torch.all(entropy == 0)
    assert torch.allclose(uniform[0], torch.tensor([0.0, math.log(2), 0.0, math.log(2)]).double())
    with pytest.raises(ValueError, match=r"\[\.\.\., T, T\]"):
        viz.attention_row_entropy(torch.ones(2, 3), GLOBAL)
