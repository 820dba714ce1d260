"""Lab 1, RMSNorm and RoPE: the normalisation before every block, the rotary position encoding of
Llama 4's RoPE layers, Scout's frequency scaling for long contexts and the QK norm
(``notebooks/labs/lab1_rmsnorm_rope.ipynb``).

Steps: 1.1 ``rms_norm``, 1.2 ``rope_frequencies``, 1.3 ``apply_rope``, 1.4 ``scaled_rope_frequencies``,
1.5 ``qk_norm``; references in ``l4lab.ops`` and ``l4lab.model``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from l4lab import ops
from l4lab.config import RopeScaling
from l4lab.labs.core import Case, Hints, Mistake, Step, compare_tensor, generator, register_lab
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


# ====================================================================== Scout's RoPE scaling
def _ref_scaled_rope_frequencies(
    head_dim: int, theta: float, factor: float, low_freq_factor: float, high_freq_factor: float, context: int
) -> Tensor:
    return rope_inverse_frequencies(
        head_dim, theta, RopeScaling(factor, low_freq_factor, high_freq_factor, context)
    )


def _cases_scaled_rope_frequencies() -> list[Case]:
    specs = [
        (
            "Scout: head_dim 128, theta 500000, factor 16, low = high = 1, context 8192",
            128,
            5e5,
            16.0,
            1.0,
            1.0,
            8192,
        ),
        (
            "a smooth band: head_dim 128, theta 500000, factor 8, low 1, high 4, 8192",
            128,
            5e5,
            8.0,
            1.0,
            4.0,
            8192,
        ),
        ("head_dim 64, theta 10000, factor 4, low 1, high 4, context 256", 64, 1e4, 4.0, 1.0, 4.0, 256),
        ("factor 1: nothing changes", 32, 1e4, 1.0, 1.0, 2.0, 512),
        (
            "head_dim 10 (not a power of two), theta 100, factor 2, low 2, high 8, context 64",
            10,
            100.0,
            2.0,
            2.0,
            8.0,
            64,
        ),
        ("a short original context (16): most pairs stretched", 16, 1e4, 32.0, 1.0, 1.0, 16),
    ]
    return [Case(label, args, _ref_scaled_rope_frequencies(*args)) for label, *args in specs]


def _scaled(
    head_dim: int,
    theta: float,
    factor: float,
    low: float,
    high: float,
    context: int,
    *,
    wavelength_of: float = 2 * math.pi,
    stretch: str = "long",
    smooth: bool = True,
    divide: bool = True,
) -> Tensor:
    inv_freq = rope_inverse_frequencies(head_dim, theta)
    wavelength = wavelength_of / inv_freq
    scaled = inv_freq / factor if divide else inv_freq * factor
    if stretch == "all":
        return scaled
    long_wave, short_wave = wavelength > context / low, wavelength < context / high
    picked = long_wave if stretch == "long" else short_wave
    out = torch.where(picked, scaled, inv_freq)
    if smooth and high > low:
        blend = (context / wavelength - low) / (high - low)
        between = (1 - blend) * inv_freq / factor + blend * inv_freq
        out = torch.where(~long_wave & ~short_wave, between, out)
    return out


_SCALED_ROPE_MISTAKES = (
    Mistake(
        "every pair stretched",
        lambda *a: _scaled(*a, stretch="all"),
        "only the SLOW pairs are stretched: those whose wavelength 2π / inv_freq_i is longer than "
        "context / low_freq_factor. The fast pairs, which see word order, must keep their frequency.",
    ),
    Mistake(
        "fast pairs stretched",
        lambda *a: _scaled(*a, stretch="short"),
        "you stretched the FAST pairs (short wavelengths); it is the slow ones, wavelength > "
        "context / low_freq_factor, that would otherwise wrap around within a long context.",
    ),
    Mistake(
        "frequency multiplied",
        lambda *a: _scaled(*a, divide=False),
        "stretching a wavelength by the factor DIVIDES the frequency: inv_freq_i / factor.",
    ),
    Mistake(
        "wavelength without 2π",
        lambda *a: _scaled(*a, wavelength_of=1.0),
        "a pair turning by inv_freq_i radians per token comes back after 2π / inv_freq_i tokens: that is "
        "its wavelength (not 1 / inv_freq_i).",
    ),
    Mistake(
        "no interpolation",
        lambda *a: _scaled(*a, smooth=False),
        "between the two thresholds the frequency is interpolated: with s = (context / wavelength - low) "
        "/ (high - low), (1 - s) * inv_freq / factor + s * inv_freq.",
    ),
)


# ====================================================================== QK norm
def _ref_qk_norm(x: Tensor, eps: float) -> Tensor:
    return ops.rms_norm(x, None, eps)


def _cases_qk_norm() -> list[Case]:
    g = generator(105)
    specs = [
        ("batch 2, 5 positions, 4 heads, head_dim 8", (2, 5, 4, 8), 1e-5),
        ("batch 1, 1 position, 1 head, head_dim 6", (1, 1, 1, 6), 1e-5),
        ("heads of very different sizes (one head scaled by 100)", (1, 3, 3, 16), 1e-5),
        ("small vectors (|x| ~ 0.001), where eps matters", (2, 2, 2, 4), 1e-5),
        ("Llama 4's head_dim 128, 2 heads", (1, 4, 2, 128), 1e-5),
        ("a large eps (0.1)", (1, 3, 5, 10), 0.1),
    ]
    cases = []
    for label, shape, eps in specs:
        x = torch.randn(shape, generator=g)
        if "very different" in label:
            x[:, :, 1] *= 100.0
        if "small" in label:
            x *= 1e-3
        cases.append(Case(label, (x, eps), _ref_qk_norm(x, eps)))
    return cases


_QK_MISTAKES = (
    Mistake(
        "over every head at once",
        lambda x, eps: ops.rms_norm(x.flatten(-2), None, eps).view_as(x),
        "normalise each HEAD on its own, over head_dim (the last dimension): a head with large values "
        "must not shrink the others.",
    ),
    Mistake(
        "L2 norm",
        lambda x, eps: x / (x.pow(2).sum(-1, keepdim=True) + eps).sqrt(),
        "divide by the root MEAN square, not by the length: transformers calls this L2Norm, but it is "
        "RMSNorm without a weight, so each head vector ends with length sqrt(head_dim), not 1.",
    ),
    Mistake(
        "over the heads",
        lambda x, eps: x / (x.pow(2).mean(-2, keepdim=True) + eps).sqrt(),
        "normalise over head_dim, the LAST dimension of [B, T, H, D], not over the heads.",
    ),
    Mistake(
        "eps outside the square root",
        lambda x, eps: x / (x.pow(2).mean(-1, keepdim=True).sqrt() + eps),
        "eps goes inside the square root, as in RMSNorm: x / sqrt(mean(x²) + eps).",
    ),
    Mistake(
        "centred",
        lambda x, eps: ops.rms_norm(x - x.mean(-1, keepdim=True), None, eps),
        "no mean is subtracted: this is RMSNorm (without a weight), not LayerNorm.",
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
        "each token's feature vector is divided by its root-mean-square, then multiplied by the gains.",
        hints=Hints(
            "Every token is rescaled on its own so that its features have a root-mean-square of 1; then a "
            "learned gain per feature sets the scale back. Nothing is subtracted: the mean stays.",
            "y = x / sqrt(mean over the last dimension of x² + eps) * weight, with the mean taken with "
            "keepdim so that it broadcasts; compute in float32 and cast back before the weight.",
            "l4lab/ops.py, rms_norm: three lines, and the model's RMSNorm class in l4lab/model.py uses it.",
        ),
    ),
    Step(
        "1.2",
        "rope_frequencies",
        ("head_dim", "theta"),
        "RoPE's inverse frequencies theta^(-2i/head_dim), one per feature pair",
        _cases_rope_frequencies,
        lambda e, g: compare_tensor(e, g, "inv_freq", rtol=1e-5, atol=1e-9),
        _FREQ_MISTAKES,
        "one frequency per feature PAIR (head_dim / 2 of them), falling geometrically from 1.0.",
        hints=Hints(
            "A head of D features is D / 2 pairs, each turning at its own speed: the first pair once per "
            "token, each next one slower by the same ratio, the last about theta times slower.",
            "inv_freq_i = theta ** (-2i / D) for i = 0, 1, ..., D/2 - 1; the even numbers 0, 2, ..., D - 2 "
            "divided by D are the exponents.",
            "l4lab/model.py, rope_inverse_frequencies (its first line; the rest is step 1.4).",
        ),
    ),
    Step(
        "1.3",
        "apply_rope",
        ("x", "positions", "theta"),
        "rotate the interleaved pairs (2i, 2i+1) of x [B, T, H, D] by position * inv_freq_i",
        _cases_apply_rope,
        compare_tensor,
        _ROPE_MISTAKES,
        "each neighbouring feature pair (2i, 2i+1) is a point in the plane, turned by its own angle.",
        hints=Hints(
            "Read features (2i, 2i+1) as the coordinates of a point in the plane and turn it by an angle "
            "that grows with the token's position, faster for the first pairs. The batch and the heads "
            "share the angles.",
            "angle[t, i] = positions[t] * inv_freq_i; new x_2i = x_2i cos - x_2i+1 sin, new x_2i+1 = "
            "x_2i sin + x_2i+1 cos. x[..., 0::2] and x[..., 1::2] take the pairs apart; torch.stack(..., "
            "-1).flatten(-2) puts them back interleaved.",
            "l4lab/ops.py, apply_rope (it uses complex numbers: torch.view_as_complex), with rope_angles in "
            "l4lab/model.py.",
        ),
    ),
    Step(
        "1.4",
        "scaled_rope_frequencies",
        ("head_dim", "theta", "factor", "low_freq_factor", "high_freq_factor", "original_context"),
        "Scout's RoPE scaling (Llama 3.1's): slow pairs stretched by factor, fast ones kept, a band between",
        _cases_scaled_rope_frequencies,
        lambda e, g: compare_tensor(e, g, "inv_freq", rtol=1e-5, atol=1e-12),
        _SCALED_ROPE_MISTAKES,
        "sort the pairs by wavelength: the slow ones are stretched, the fast ones kept, the ones between "
        "blended.",
        hints=Hints(
            "A pair whose wavelength (tokens per full turn) is longer than the original training context "
            "never turned fully in training: stretch it by the factor so that it does not wrap around in a "
            "longer context. Pairs that turn many times per context keep their speed; between two "
            "thresholds the two are blended.",
            "wavelength_i = 2π / inv_freq_i. Above original_context / low_freq_factor: inv_freq_i / factor. "
            "Below original_context / high_freq_factor: inv_freq_i. Between: with s = (original_context / "
            "wavelength_i - low) / (high - low), (1 - s) * inv_freq_i / factor + s * inv_freq_i.",
            "l4lab/model.py, rope_inverse_frequencies with a RopeScaling (l4lab/config.py); Scout's values "
            "are in l4lab.preset('llama4-scout').rope_scaling.",
        ),
    ),
    Step(
        "1.5",
        "qk_norm",
        ("x", "eps"),
        "Llama 4's QK norm: every query or key head divided by its root-mean-square, no weight",
        _cases_qk_norm,
        compare_tensor,
        _QK_MISTAKES,
        "each head's vector (the last dimension) is normalised on its own, as RMSNorm without a gain.",
        hints=Hints(
            "On its RoPE layers Llama 4 rescales every query and key head vector to a fixed size, so that "
            "no dot product grows without bound as training goes on. It is RMSNorm with no learned gain, "
            "applied to each head separately.",
            "For x [B, T, H, D]: x / sqrt(mean over D of x² + eps), the mean over the last dimension with "
            "keepdim; no weight.",
            "l4lab/ops.py, rope_qk_norm: after the rotation it calls rms_norm with weight None.",
        ),
    ),
)

register_lab("1", "rmsnorm_rope", STEPS)
