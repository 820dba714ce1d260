"""Lab 1, RMSNorm and RoPE: the normalisation before every block, and the rotary position encoding of
Llama 4's RoPE layers (``notebooks/labs/lab1_rmsnorm_rope.ipynb``).

Steps: 1.1 ``rms_norm``, 1.2 ``rope_frequencies``, 1.3 ``apply_rope``; references in ``l4lab.ops`` and
``l4lab.model``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from l4lab import ops
from l4lab.labs.core import Case, Mistake, Step, compare_tensor, generator, register_lab
from l4lab.model import rope_angles, rope_inverse_frequencies


# ====================================================================== RMSNorm
def _ref_rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return ops.rms_norm(x, weight, eps)


def _cases_rms_norm() -> list[Case]:
    g = generator(101)
    specs = [
        ("batch 2, 5 tokens, dim 16", torch.randn(2, 5, 16, generator=g), 1e-5),
        ("batch 1, 1 token, odd dim 7", torch.randn(1, 1, 7, generator=g), 1e-6),
        ("a 2-D input [3, 12]", torch.randn(3, 12, generator=g), 1e-5),
        (
            "small activations (|x| ~ 0.001), where eps matters",
            1e-3 * torch.randn(2, 3, 8, generator=g),
            1e-5,
        ),
        ("a large eps (0.5)", torch.randn(4, 10, generator=g), 0.5),
        ("activations with a large mean (x ~ 5 + noise)", 5.0 + torch.randn(2, 6, 9, generator=g), 1e-5),
    ]
    cases = []
    for label, x, eps in specs:
        weight = 1.0 + 0.5 * torch.randn(x.shape[-1], generator=g)
        cases.append(Case(label, (x, weight, eps), _ref_rms_norm(x, weight, eps)))
    return cases


def _rms_eps_outside(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return x / (x.pow(2).mean(-1, keepdim=True).sqrt() + eps) * weight


def _rms_layer_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    centred = x - x.mean(-1, keepdim=True)
    return centred / (centred.pow(2).mean(-1, keepdim=True) + eps).sqrt() * weight


def _rms_l2(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return x / (x.pow(2).sum(-1, keepdim=True) + eps).sqrt() * weight


def _rms_no_weight(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return ops.rms_norm(x, None, eps)


def _rms_first_dim(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return x / (x.pow(2).mean(0, keepdim=True) + eps).sqrt() * weight


def _rms_no_sqrt(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return x / (x.pow(2).mean(-1, keepdim=True) + eps) * weight


_RMS_MISTAKES = (
    Mistake(
        "eps outside the square root",
        _rms_eps_outside,
        "eps goes INSIDE the square root: x / sqrt(mean(x²) + eps). Added outside, it changes the result "
        "wherever the RMS is small (as in this case).",
    ),
    Mistake(
        "LayerNorm",
        _rms_layer_norm,
        "RMSNorm does not subtract the mean (that is LayerNorm): divide x itself by sqrt(mean(x²) + eps).",
    ),
    Mistake(
        "L2 norm",
        _rms_l2,
        "use the MEAN of the squares, not their sum: sqrt(mean(x²)) is the L2 norm divided by sqrt(dim).",
    ),
    Mistake(
        "no weight", _rms_no_weight, "multiply the normalised x by weight (one gain per feature) at the end."
    ),
    Mistake(
        "wrong dimension",
        _rms_first_dim,
        "normalise over the LAST dimension, the features: mean(dim=-1, keepdim=True).",
    ),
    Mistake("no sqrt", _rms_no_sqrt, "divide by the square ROOT of mean(x²) + eps (torch.rsqrt or .sqrt())."),
)


def _ref_rope_frequencies(head_dim: int, theta: float) -> Tensor:
    return rope_inverse_frequencies(head_dim, theta)


def _cases_rope_frequencies() -> list[Case]:
    specs = [
        ("head_dim 8, theta 10000", 8, 10000.0),
        ("Llama 4: head_dim 128, theta 500000", 128, 500000.0),
        ("head_dim 6 (not a power of two)", 6, 10000.0),
        ("head_dim 2: a single pair", 2, 10000.0),
        ("head_dim 10, theta 100", 10, 100.0),
        ("head_dim 64, theta 1e6", 64, 1e6),
    ]
    return [Case(label, (d, theta), _ref_rope_frequencies(d, theta)) for label, d, theta in specs]


_FREQ_MISTAKES = (
    Mistake(
        "exponent i/D",
        lambda d, theta: theta ** (-torch.arange(d // 2, dtype=torch.float64) / d),
        "the exponent is 2i/head_dim for i = 0 .. head_dim/2 - 1 (torch.arange(0, head_dim, 2) / head_dim): "
        "the last pair turns about theta times slower than the first.",
    ),
    Mistake(
        "not inverse",
        lambda d, theta: theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d),
        "these are INVERSE frequencies, theta ** (-2i/head_dim): 1.0 for the first pair, then falling.",
    ),
    Mistake(
        "exponent 2i/(D-2)",
        lambda d, theta: theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / max(d - 2, 1)),
        "divide 2i by head_dim, not by head_dim - 2: the slowest pair is theta ** (-(head_dim-2)/head_dim).",
    ),
)


def _ref_apply_rope(x: Tensor, positions: Tensor, theta: float) -> Tensor:
    return ops.apply_rope(x, rope_angles(positions, rope_inverse_frequencies(x.shape[-1], theta)))


def _cases_apply_rope() -> list[Case]:
    g = generator(103)
    specs = [
        ("batch 2, 5 positions, 3 heads, head_dim 8", (2, 5, 3, 8), torch.arange(5), 10000.0),
        ("batch 1, odd length 7, 1 head, head_dim 6", (1, 7, 1, 6), torch.arange(7), 10000.0),
        ("positions 100..104 (tokens after a KV cache)", (2, 5, 2, 8), torch.arange(100, 105), 10000.0),
        ("Llama 4's theta 500000, head_dim 32", (1, 9, 2, 32), torch.arange(9), 500000.0),
        ("a single token at position 0 (no rotation at all)", (1, 1, 2, 4), torch.arange(1), 10000.0),
        ("positions in any order: [7, 3, 0, 12]", (3, 4, 2, 10), torch.tensor([7, 3, 0, 12]), 10000.0),
    ]
    cases = []
    for label, shape, positions, theta in specs:
        x = torch.randn(shape, generator=g)
        cases.append(Case(label, (x, positions, theta), _ref_apply_rope(x, positions, theta)))
    return cases


def _rope_rotate_half(x: Tensor, positions: Tensor, theta: float) -> Tensor:
    inv_freq = rope_inverse_frequencies(x.shape[-1], theta)
    angles = positions.float()[:, None] * inv_freq[None, :]
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    first, second = x.chunk(2, dim=-1)
    rotated = torch.cat([-second, first], dim=-1)
    return x * cos[None, :, None, :] + rotated * sin[None, :, None, :]


def _rope_backwards(x: Tensor, positions: Tensor, theta: float) -> Tensor:
    return _ref_apply_rope(x, -positions, theta)


def _rope_arange(x: Tensor, positions: Tensor, theta: float) -> Tensor:
    return _ref_apply_rope(x, torch.arange(x.shape[1]), theta)


_ROPE_MISTAKES = (
    Mistake(
        "rotate-half",
        _rope_rotate_half,
        "this is the rotate-half layout: Llama 4 pairs (2i, 2i+1), not (i, i+D/2). Take x[..., 0::2] "
        "and x[..., 1::2] as the two halves of each pair and interleave the rotated results back.",
    ),
    Mistake(
        "rotated backwards",
        _rope_backwards,
        "you rotate the wrong way: x'_2i = x_2i cos(a) - x_2i+1 sin(a), "
        "x'_2i+1 = x_2i sin(a) + x_2i+1 cos(a), with a = position * inv_freq_i.",
    ),
    Mistake(
        "ignores positions",
        _rope_arange,
        "rotate by the positions you are given, not by 0 .. T-1: after a KV cache the first new token "
        "sits at position 100, not 0.",
    ),
)


# ====================================================================== the steps
STEPS: tuple[Step, ...] = (
    Step(
        "1.1",
        "rms_norm",
        ("x", "weight", "eps"),
        "RMSNorm over the last dimension: x / sqrt(mean(x²) + eps) * weight",
        _cases_rms_norm,
        compare_tensor,
        _RMS_MISTAKES,
        "y = x / sqrt(mean(x², over the last dim, keepdim) + eps) * weight; compute in float32.",
    ),
    Step(
        "1.2",
        "rope_frequencies",
        ("head_dim", "theta"),
        "RoPE's inverse frequencies theta^(-2i/head_dim), one per feature pair",
        _cases_rope_frequencies,
        lambda e, g: compare_tensor(e, g, "inv_freq", rtol=1e-5, atol=1e-9),
        _FREQ_MISTAKES,
        "inv_freq[i] = theta ** (-2i / head_dim) for i = 0 .. head_dim/2 - 1: head_dim/2 values, "
        "float32, starting at 1.0.",
    ),
    Step(
        "1.3",
        "apply_rope",
        ("x", "positions", "theta"),
        "rotate the interleaved pairs (2i, 2i+1) of x [B, T, H, D] by position * inv_freq_i",
        _cases_apply_rope,
        compare_tensor,
        _ROPE_MISTAKES,
        "pair i of the features is (x[..., 2i], x[..., 2i+1]); rotate it by the angle positions[t] * "
        "inv_freq[i] (one angle per position and pair, the same for every batch row and head).",
    ),
)

register_lab("1", "rmsnorm_rope", STEPS)
