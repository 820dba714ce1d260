"""Triton kernels behind ``backend="fused"``, installed as ``l4lab.kernels``.

One file per operation, each holding its Triton kernel(s), the ``torch.autograd.Function`` that makes it
trainable, and a docstring that explains the tiling. Every function here has the signature of its eager
reference in :mod:`l4lab.ops`, which is what the tests compare it with:

==================  ==========================  ===================================================
operation           file                        kernels
==================  ==========================  ===================================================
``rms_norm``        ``rms_norm.py``             one row per program; backward with dW partial sums
``rope_qk_norm``    ``rope.py``                 interleaved-pair rotation + weightless QK norm
``swiglu``          ``swiglu.py``               ``silu(gate) * up``, elementwise
``attention``       ``attention.py``            flash attention: GQA, causal / chunked tiles
                                                skipped, NoPE temperature, prefill and decode
``route``           ``moe.py``                  argmax + sigmoid per token
``routed_experts``  ``moe.py``                  counting sort, grouped GEMMs with SwiGLU fused
==================  ==========================  ===================================================

``matmul_precision.py`` holds what the two files with matrix products share: float32 dots in IEEE
precision on a GPU, and the refusal of bfloat16 in the interpreter. ``agreement.py`` holds the rule by
which a kernel is judged against its eager reference (notebook 06 and the kernel tests).

On a machine without a CUDA GPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set
here before any kernel is defined): exact and slow, for learning and testing on small shapes.
"""

from __future__ import annotations

import os
import sys

import torch

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    # Triton reads it when it is imported and when each @triton.jit decorator runs: set it first
    if "triton" in sys.modules:
        raise ImportError(
            "no GPU here, so the kernels must run in Triton's interpreter, but triton was imported before "
            "l4lab.kernels without TRITON_INTERPRET=1: import l4lab.kernels first, or set TRITON_INTERPRET=1"
        )
    os.environ["TRITON_INTERPRET"] = "1"

from l4lab.kernels import attention, moe, rms_norm, rope, swiglu
from l4lab.ops import Ops

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

# the six operations of l4lab.ops.Ops, as kernels; ``l4lab.kernels.<file>`` is each one's module
FUSED = Ops(
    name="fused",
    rms_norm=rms_norm.rms_norm,
    rope_qk_norm=rope.rope_qk_norm,
    swiglu=swiglu.swiglu,
    attention=attention.attention,
    route=moe.route,
    routed_experts=moe.routed_experts,
)

__all__ = ["FUSED", "INTERPRETED", "attention", "moe", "rms_norm", "rope", "swiglu"]
