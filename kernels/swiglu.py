"""SwiGLU as two elementwise Triton kernels: ``out = silu(gate) * up``, ``silu(g) = g * sigmoid(g)``.

What it computes
    :func:`l4lab.ops.swiglu` for ``gate`` and ``up`` of the same shape ``[..., I]``, in float32 inside
    each kernel and rounded once on store (eager rounds silu(gate) to the input dtype before multiplying,
    so the fused result is, if anything, closer to exact). The output dtype is PyTorch's promotion of the
    two inputs' dtypes, as in eager.

The math (s = sigmoid(g), so ds/dg = s * (1 - s))
    forward    out = g * s * u
    backward   d up   = dout * g * s
               d gate = dout * u * (s + g * s * (1 - s)) = dout * u * s * (1 + g * (1 - s))
    The backward recomputes s from g instead of saving it: one exp per element is cheaper than
    writing and reading another tensor of the size of the activations.

Tiling
    The inputs are seen as [rows, I] matrices, each with its own row stride and unit column stride, so
    the column halves that :func:`l4lab.ops.routed_experts` takes with ``chunk`` are read in place
    (any other layout is copied first). One program handles a ``BLOCK_ROWS x BLOCK_COLS`` tile: the
    grid is (row tiles, column tiles). ``BLOCK_COLS`` is the next power of two of I, capped at 4096 on a
    GPU, and ``BLOCK_ROWS`` stacks rows until the tile holds about 4096 elements, so every program moves
    the same number of bytes whatever I is; the interpreter gets tiles 16x larger (it vectorises in numpy,
    and fewer programs run faster). Each thread holds 16 (8 warps) contiguous elements per input,
    enough for 16-byte vector loads; the op is bound by memory traffic: 3 tensors forward, 5 backward.
    Row offsets are int64: rows * stride exceeds 2^31 for long sequences.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

GPU_TILE = 4096
INTERPRETER_TILE = 1 << 16
GPU_NUM_WARPS = 8


@triton.jit
def _swiglu_forward_kernel(
    gate_ptr,
    up_ptr,
    out_ptr,
    num_rows,
    num_cols,
    gate_row_stride,
    up_row_stride,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    mask = (rows < num_rows)[:, None] & (cols < num_cols)[None, :]
    rows = rows.to(tl.int64)

    gate = tl.load(gate_ptr + rows[:, None] * gate_row_stride + cols[None, :], mask=mask, other=0.0)
    up = tl.load(up_ptr + rows[:, None] * up_row_stride + cols[None, :], mask=mask, other=0.0)
    gate = gate.to(tl.float32)
    out = gate * tl.sigmoid(gate) * up.to(tl.float32)
    tl.store(out_ptr + rows[:, None] * num_cols + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_backward_kernel(
    grad_out_ptr,
    gate_ptr,
    up_ptr,
    grad_gate_ptr,
    grad_up_ptr,
    num_rows,
    num_cols,
    grad_out_row_stride,
    gate_row_stride,
    up_row_stride,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    mask = (rows < num_rows)[:, None] & (cols < num_cols)[None, :]
    rows = rows.to(tl.int64)

    grad_out = tl.load(
        grad_out_ptr + rows[:, None] * grad_out_row_stride + cols[None, :], mask=mask, other=0.0
    ).to(tl.float32)
    gate = tl.load(gate_ptr + rows[:, None] * gate_row_stride + cols[None, :], mask=mask, other=0.0)
    up = tl.load(up_ptr + rows[:, None] * up_row_stride + cols[None, :], mask=mask, other=0.0)
    gate = gate.to(tl.float32)
    up = up.to(tl.float32)
    sig = tl.sigmoid(gate)
    grad_up = grad_out * gate * sig
    grad_gate = grad_out * up * sig * (1.0 + gate * (1.0 - sig))
    out_offsets = rows[:, None] * num_cols + cols[None, :]
    tl.store(grad_gate_ptr + out_offsets, grad_gate.to(grad_gate_ptr.dtype.element_ty), mask=mask)
    tl.store(grad_up_ptr + out_offsets, grad_up.to(grad_up_ptr.dtype.element_ty), mask=mask)


def _as_rows(t: Tensor) -> Tensor:
    """``t`` as [rows, I] with unit column stride (a view when the layout allows, else a copy)."""
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _launch_config(num_rows: int, num_cols: int, device: torch.device) -> tuple[tuple[int, int], dict]:
    """The grid and the block sizes / num_warps for a [num_rows, num_cols] problem on ``device``."""
    tile = GPU_TILE if device.type == "cuda" else INTERPRETER_TILE
    block_cols = min(triton.next_power_of_2(num_cols), tile)
    block_rows = max(1, min(tile // block_cols, triton.next_power_of_2(num_rows)))
    grid = (triton.cdiv(num_rows, block_rows), triton.cdiv(num_cols, block_cols))
    return grid, dict(BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols, num_warps=GPU_NUM_WARPS)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: Tensor, up: Tensor) -> Tensor:
        if gate.shape != up.shape:
            raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} must have the same shape")
        gate_rows, up_rows = _as_rows(gate), _as_rows(up)
        num_rows, num_cols = gate_rows.shape
        out_dtype = torch.promote_types(gate.dtype, up.dtype)
        out = torch.empty(gate_rows.shape, dtype=out_dtype, device=gate.device)
        grid, config = _launch_config(num_rows, num_cols, gate.device)
        _swiglu_forward_kernel[grid](
            gate_rows, up_rows, out, num_rows, num_cols, gate_rows.stride(0), up_rows.stride(0), **config
        )
        ctx.save_for_backward(gate_rows, up_rows)
        ctx.shape = gate.shape
        return out.view(gate.shape)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, Tensor]:
        gate_rows, up_rows = ctx.saved_tensors
        grad_out_rows = _as_rows(grad_out)
        num_rows, num_cols = gate_rows.shape
        grad_gate = torch.empty(gate_rows.shape, dtype=gate_rows.dtype, device=gate_rows.device)
        grad_up = torch.empty(up_rows.shape, dtype=up_rows.dtype, device=up_rows.device)
        grid, config = _launch_config(num_rows, num_cols, gate_rows.device)
        _swiglu_backward_kernel[grid](
            grad_out_rows,
            gate_rows,
            up_rows,
            grad_gate,
            grad_up,
            num_rows,
            num_cols,
            grad_out_rows.stride(0),
            gate_rows.stride(0),
            up_rows.stride(0),
            **config,
        )
        return grad_gate.view(ctx.shape), grad_up.view(ctx.shape)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """``silu(gate) * up``, elementwise, for two tensors of the same shape; differentiable in both.

    The fused counterpart of :func:`l4lab.ops.swiglu`, with the same signature and output dtype.
    """
    return _SwiGLU.apply(gate, up)
