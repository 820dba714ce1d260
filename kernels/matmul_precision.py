"""What the kernels with matrix products (attention, MoE) share: the precision of their dots.

float32 inputs: Triton's GPU default for ``tl.dot`` is tf32, which rounds the inputs to 10 mantissa bits
(about 1e-3 relative); float32 is the dtype in which fused must equal eager, so the launches ask for
IEEE float32 products instead. 16-bit inputs take the tensor cores as usual.

bfloat16 on the CPU: the kernels would run in Triton's interpreter, whose bfloat16 ``tl.dot`` multiplies
bit patterns and returns garbage; that is refused with an error rather than computed wrongly.
"""

from __future__ import annotations

import torch


def dot_precision(dtype: torch.dtype) -> dict[str, str]:
    """The launch option that makes float32 dots IEEE (none for 16-bit inputs)."""
    return {"default_dot_input_precision": "ieee"} if dtype == torch.float32 else {}


def refuse_interpreted_bfloat16(x: torch.Tensor, operation: str) -> None:
    """Raise if ``x`` is bfloat16 on the CPU, where ``operation``'s dots would be computed wrongly."""
    if x.device.type == "cpu" and x.dtype == torch.bfloat16:
        raise ValueError(
            f"fused {operation} in bfloat16 on the CPU would run in Triton's interpreter, whose bfloat16 "
            "matrix products are wrong: use float32 or float16 on the CPU (or backend='eager'); bf16 is for "
            "a GPU"
        )
