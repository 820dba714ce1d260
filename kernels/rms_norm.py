"""RMSNorm as two Triton kernels: ``y = round(x * rstd) * weight`` with ``rstd = 1 / sqrt(mean(x^2) + eps)``.

What it computes
    Exactly :func:`l4lab.ops.rms_norm`: the statistics and the normalisation in float32, the normalised
    row rounded to x's dtype, and only then multiplied by ``weight`` (in float32, stored in the dtype that
    PyTorch's promotion of x and weight gives, as eager's ``y.type_as(x) * weight`` does). ``weight=None``
    is Llama 4's weightless QK norm. Any shape ``[..., D]``; the leading dimensions are rows.

The math, per row of D features (x̂ = x * rstd, g = dy * weight, or g = dy without a weight)
    forward    rstd = (sum(x^2) / D + eps)^(-1/2),   y = round(x̂) * weight
    backward   d rstd / d x_j = -rstd^3 x_j / D, so
               dx_j = rstd * g_j + sum_i g_i x_i (d rstd / d x_j) = rstd * (g_j - x̂_j * mean(g * x̂))
               dweight = sum over rows of dy * round(x̂)   (round(x̂) is what forward multiplied)
    eps keeps a row of zeros finite: rstd = eps^(-1/2) and y = 0.

Tiling
    Forward: one program normalises a tile of ``BLOCK_ROWS x BLOCK_COLS`` where ``BLOCK_COLS`` is the next
    power of two of D (a whole row sits in registers; the sum of squares is one ``tl.sum`` along the
    row) and ``BLOCK_ROWS`` stacks rows until the tile holds about 4096 elements on a GPU (one row for a
    model's hidden size; several for small D, so that each program still moves enough bytes; the
    interpreter gets 65536, as it runs programs one after another). It writes the row's
    rstd (4 bytes per row) for the backward, which then never recomputes the reduction over x^2.
    Backward: a grid of about one program per SM (Liger-Kernel's layout). Each program walks a
    contiguous range of rows tile by tile, writes dx, and accumulates its share of dweight in an fp32
    register row; it stores that row into a ``[num_programs, D]`` buffer, summed by torch afterwards. This
    avoids both atomics and a second pass over x.
    num_warps gives each thread about 16 elements of the tile in the forward (Llama 4's hidden size 5120
    pads to 8192 columns: 16 warps) and 8 in the backward, which keeps about twice as many values live
    per element (x, dy, x̂, weight): 32 warps at 8192 columns compile for sm_90 to 52 registers per
    thread with Triton 3.9 (63 with 3.6), without spills, where 16 would need about 100. Between 4 and
    32 warps; beyond 16384 columns the backward starts to spill.
    Row offsets are int64: rows * stride exceeds 2^31 at long context.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

# elements per tile: a GPU program keeps its tile in registers; the interpreter vectorises in numpy, so
# bigger tiles (fewer programs) run much faster there
GPU_TILE = 4096
INTERPRETER_TILE = 1 << 16
# backward programs on a machine without a GPU: few, but more than one, so the dweight sum is exercised
INTERPRETER_BACKWARD_PROGRAMS = 4
# elements of the tile per GPU thread: the backward holds about twice as many values per element
FORWARD_VALUES_PER_THREAD = 16
BACKWARD_VALUES_PER_THREAD = 8


@triton.jit
def _rms_norm_forward_kernel(
    x_ptr,
    weight_ptr,
    out_ptr,
    rstd_ptr,
    num_rows,
    num_cols,
    x_row_stride,
    eps,
    HAS_WEIGHT: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_COLS)
    row_mask = rows < num_rows
    col_mask = cols < num_cols
    mask = row_mask[:, None] & col_mask[None, :]
    rows = rows.to(tl.int64)

    x = tl.load(x_ptr + rows[:, None] * x_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / num_cols + eps)
    normed = (x * rstd[:, None]).to(x_ptr.dtype.element_ty)  # eager rounds before the weight
    if HAS_WEIGHT:
        weight = tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        out = normed.to(tl.float32) * weight[None, :]
    else:
        out = normed
    tl.store(out_ptr + rows[:, None] * num_cols + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + rows, rstd, mask=row_mask)


@triton.jit
def _rms_norm_backward_kernel(
    grad_out_ptr,
    x_ptr,
    weight_ptr,
    rstd_ptr,
    grad_x_ptr,
    grad_weight_partials_ptr,
    num_rows,
    num_cols,
    x_row_stride,
    grad_out_row_stride,
    rows_per_program,
    HAS_WEIGHT: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    program = tl.program_id(0)
    first_row = program * rows_per_program
    end_row = tl.minimum(first_row + rows_per_program, num_rows)
    cols = tl.arange(0, BLOCK_COLS)
    col_mask = cols < num_cols
    if HAS_WEIGHT:
        weight = tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        grad_weight = tl.zeros([BLOCK_COLS], dtype=tl.float32)

    for tile_start in range(first_row, end_row, BLOCK_ROWS):
        rows = tile_start + tl.arange(0, BLOCK_ROWS)
        row_mask = rows < end_row
        mask = row_mask[:, None] & col_mask[None, :]
        rows = rows.to(tl.int64)

        x = tl.load(x_ptr + rows[:, None] * x_row_stride + cols[None, :], mask=mask, other=0.0)
        x = x.to(tl.float32)
        grad_out = tl.load(
            grad_out_ptr + rows[:, None] * grad_out_row_stride + cols[None, :], mask=mask, other=0.0
        ).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)
        normed = x * rstd[:, None]
        if HAS_WEIGHT:
            rounded = normed.to(x_ptr.dtype.element_ty).to(tl.float32)
            grad_weight += tl.sum(grad_out * rounded, axis=0)
            grad_normed = grad_out * weight[None, :]
        else:
            grad_normed = grad_out
        mean_grad_dot_normed = tl.sum(grad_normed * normed, axis=1) / num_cols
        grad_x = rstd[:, None] * (grad_normed - normed * mean_grad_dot_normed[:, None])
        tl.store(
            grad_x_ptr + rows[:, None] * num_cols + cols[None, :],
            grad_x.to(grad_x_ptr.dtype.element_ty),
            mask=mask,
        )

    if HAS_WEIGHT:
        tl.store(grad_weight_partials_ptr + program * num_cols + cols, grad_weight, mask=col_mask)


def _num_warps(tile_elements: int, values_per_thread: int) -> int:
    """Warps that give each thread about ``values_per_thread`` elements of the tile, from 4 to 32."""
    return min(32, max(4, tile_elements // (32 * values_per_thread)))


@functools.lru_cache
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _tile(num_rows: int, num_cols: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK_ROWS, BLOCK_COLS): whole rows, stacked up to the tile size of ``device``."""
    block_cols = triton.next_power_of_2(num_cols)
    tile = GPU_TILE if device.type == "cuda" else INTERPRETER_TILE
    block_rows = max(1, min(tile // block_cols, triton.next_power_of_2(num_rows)))
    return block_rows, block_cols


def _as_rows(t: Tensor) -> Tensor:
    """``t`` as [rows, D] with unit column stride (a view when the layout allows, else a copy)."""
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
        x_rows = _as_rows(x)
        num_rows, num_cols = x_rows.shape
        out_dtype = x.dtype if weight is None else torch.promote_types(x.dtype, weight.dtype)
        out = torch.empty(x_rows.shape, dtype=out_dtype, device=x.device)
        rstd = torch.empty(num_rows, dtype=torch.float32, device=x.device)
        block_rows, block_cols = _tile(num_rows, num_cols, x.device)
        _rms_norm_forward_kernel[(triton.cdiv(num_rows, block_rows),)](
            x_rows,
            x_rows if weight is None else weight,  # never read without a weight
            out,
            rstd,
            num_rows,
            num_cols,
            x_rows.stride(0),
            eps,
            HAS_WEIGHT=weight is not None,
            BLOCK_ROWS=block_rows,
            BLOCK_COLS=block_cols,
            num_warps=_num_warps(block_rows * block_cols, FORWARD_VALUES_PER_THREAD),
        )
        ctx.save_for_backward(x_rows, weight, rstd)
        ctx.x_shape = x.shape
        return out.view(x.shape)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, Tensor | None, None]:
        x_rows, weight, rstd = ctx.saved_tensors
        grad_out_rows = _as_rows(grad_out)
        num_rows, num_cols = x_rows.shape
        block_rows, block_cols = _tile(num_rows, num_cols, x_rows.device)
        on_gpu = x_rows.device.type == "cuda"
        max_programs = _num_sms(x_rows.device) if on_gpu else INTERPRETER_BACKWARD_PROGRAMS
        # whole tiles per program, so only the last tile of each range is partly masked
        num_tiles = triton.cdiv(num_rows, block_rows)
        tiles_per_program = max(1, triton.cdiv(num_tiles, max_programs))
        num_programs = triton.cdiv(num_tiles, tiles_per_program)

        grad_x = torch.empty(x_rows.shape, dtype=x_rows.dtype, device=x_rows.device)
        grad_weight_partials = None
        if weight is not None:
            grad_weight_partials = torch.empty(
                (num_programs, num_cols), dtype=torch.float32, device=x_rows.device
            )
        _rms_norm_backward_kernel[(num_programs,)](
            grad_out_rows,
            x_rows,
            x_rows if weight is None else weight,  # never read without a weight
            rstd,
            grad_x,
            grad_x if grad_weight_partials is None else grad_weight_partials,  # never written then
            num_rows,
            num_cols,
            x_rows.stride(0),
            grad_out_rows.stride(0),
            tiles_per_program * block_rows,
            HAS_WEIGHT=weight is not None,
            BLOCK_ROWS=block_rows,
            BLOCK_COLS=block_cols,
            num_warps=_num_warps(block_rows * block_cols, BACKWARD_VALUES_PER_THREAD),
        )
        grad_weight = None
        if grad_weight_partials is not None:
            grad_weight = grad_weight_partials.sum(dim=0).to(weight.dtype)
        return grad_x.view(ctx.x_shape), grad_weight, None


def rms_norm(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    """``x / sqrt(mean(x^2) + eps)`` over the last dimension, in float32, cast back, times ``weight``.

    The fused counterpart of :func:`l4lab.ops.rms_norm`, with the same signature, output dtype and
    rounding; differentiable in ``x`` and ``weight``.
    """
    return _RMSNorm.apply(x, weight, eps)
