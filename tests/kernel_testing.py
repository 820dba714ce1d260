"""What the kernel tests share: where they run, in which dtypes, and how close is close enough.

On a machine without a GPU the kernels run in Triton's interpreter on the CPU, in float32 and float16
(its bfloat16 ``tl.dot`` multiplies bit patterns: wrong); on a GPU also in bfloat16. The oracle is the
eager reference evaluated in float64: a kernel passes when its error is within twice the eager backend's
own error in the same dtype, plus a floor per dtype (the rule of ``l4lab.kernels.agreement``).
"""

from __future__ import annotations

import pytest
import torch

kernels = pytest.importorskip("l4lab.kernels")  # before triton: it picks the interpreter

from l4lab.kernels.agreement import errors_from_exact  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])

# absolute error floor per dtype, relative to the reference's largest magnitude
FLOOR = {
    # float32 dots run in IEEE precision on a GPU too (the kernels ask for it instead of tf32); what is
    # left are the GPU's approximate exp2 and rsqrt and another summation order
    torch.float32: 1e-5 if DEVICE == "cpu" else 1e-4,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}


def assert_matches(fused: torch.Tensor, eager: torch.Tensor, exact: torch.Tensor, name: str = "") -> None:
    """``fused`` is within 2x the error of ``eager`` (same inputs, same dtype) from ``exact`` (float64)."""
    assert fused.shape == exact.shape, f"{name}: shape {tuple(fused.shape)} != {tuple(exact.shape)}"
    assert fused.dtype == eager.dtype, f"{name}: dtype {fused.dtype} != {eager.dtype}"
    assert torch.isfinite(fused).all(), f"{name}: non-finite values"
    fused_error, eager_error = errors_from_exact(fused, eager, exact)
    allowed = 2 * eager_error + FLOOR[fused.dtype]
    assert fused_error <= allowed, (
        f"{name}: error {fused_error:.2e} > {allowed:.2e} (eager's {eager_error:.2e})"
    )
