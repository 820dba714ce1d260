"""RoPE on interleaved pairs, fused with Llama 4's weightless QK norm, as two Triton kernels.

What it computes
    :func:`l4lab.ops.rope_qk_norm`: queries [B, T, H, D] and keys [B, T, Hkv, D] have each feature pair
    (2i, 2i+1) of every head row rotated by the angle of its position t, ``freqs_cis[t, i] = cos + j sin``;
    then, when ``qk_norm``, every head row is divided by its RMS (no weight). As in eager, the rotation is
    computed in float32 and rounded to the input dtype before the norm reads it again, so both backends
    round at the same places.

The math, per head row at position t, pair i = (a, b), angle (c, s) = (cos, sin)
    rotate      r = (a c - b s,  a s + b c)                      a rotation: linear and orthogonal
    norm        rstd = (sum(r^2) / D + eps)^(-1/2),  y = r * rstd
    backward    through the norm (y saved, no weight):  dr = rstd * (dy - y * mean(dy * y))
                through the rotation, its transpose = the rotation by -angle:
                da = dr_a c + dr_b s,   db = -dr_a s + dr_b c
    The backward reads the saved OUTPUT y and rstd (one float per head row) instead of the input: the
    attention that consumes q and k keeps them alive anyway, while the input would be an extra tensor.

Tiling
    A head row is D contiguous features (the inputs are views of the projections' outputs; any strides
    are accepted for the batch, time and head dimensions, which is what lets the backward read the
    gradient of a ``transpose(1, 2)`` without copying). One program takes ``BLOCK_ROWS`` head rows, row
    index r -> (batch, time, head) = (r // (T H), (r // H) % T, r % H), and loads them as a
    [BLOCK_ROWS, BLOCK_D] tile with contiguous columns (vector loads). ``tl.reshape`` to
    [BLOCK_ROWS, BLOCK_D / 2, 2] and ``tl.split`` give the even and odd features as two
    [BLOCK_ROWS, BLOCK_D / 2] register tensors, so each pair rotates in registers; ``tl.join`` and the
    reverse reshape restore the interleaved layout for the store. cos and sin are gathered per row from
    ``view_as_real(freqs_cis)`` [T, D/2, 2] (T x D floats, which stay in L2). The norm's sum of squares
    is a ``tl.sum`` over the pair axis of both halves. ``BLOCK_D`` is the next power of two of D, and
    ``BLOCK_ROWS`` fills a tile of about 4096 elements on a GPU (32 rows at head_dim 128), with 8 warps
    (16 elements per thread); the interpreter gets tiles 16x larger. q and k go through the same kernel,
    one launch each.
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
def _head_rows(rows, seq_len, num_heads, stride_batch, stride_time, stride_head):
    """Element offset of each head row, and its position t, for row indices (int64)."""
    head = rows % num_heads
    time = (rows // num_heads) % seq_len
    batch = rows // (num_heads * seq_len)
    return batch * stride_batch + time * stride_time + head * stride_head, time


@triton.jit
def _rope_qk_norm_forward_kernel(
    x_ptr,
    angles_ptr,
    out_ptr,
    rstd_ptr,
    num_rows,
    seq_len,
    num_heads,
    head_dim,
    x_stride_batch,
    x_stride_time,
    x_stride_head,
    angles_stride_time,
    eps,
    QK_NORM: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = rows < num_rows
    rows = rows.to(tl.int64)
    features = tl.arange(0, BLOCK_D)
    mask = row_mask[:, None] & (features < head_dim)[None, :]
    pairs = tl.arange(0, BLOCK_D // 2)
    pair_mask = row_mask[:, None] & (pairs < head_dim // 2)[None, :]

    row_offsets, time = _head_rows(rows, seq_len, num_heads, x_stride_batch, x_stride_time, x_stride_head)
    x = tl.load(x_ptr + row_offsets[:, None] + features[None, :], mask=mask, other=0.0).to(tl.float32)
    even, odd = tl.split(tl.reshape(x, [BLOCK_ROWS, BLOCK_D // 2, 2]))
    angle_offsets = time[:, None] * angles_stride_time + 2 * pairs[None, :]
    cos = tl.load(angles_ptr + angle_offsets, mask=pair_mask, other=0.0)
    sin = tl.load(angles_ptr + angle_offsets + 1, mask=pair_mask, other=0.0)

    rotated_even = even * cos - odd * sin
    rotated_odd = even * sin + odd * cos
    if QK_NORM:
        # eager stores the rotation in x's dtype and the norm reads it back: round here too
        rotated_even = rotated_even.to(x_ptr.dtype.element_ty).to(tl.float32)
        rotated_odd = rotated_odd.to(x_ptr.dtype.element_ty).to(tl.float32)
        sum_squares = tl.sum(rotated_even * rotated_even + rotated_odd * rotated_odd, axis=1)
        rstd = tl.rsqrt(sum_squares / head_dim + eps)
        rotated_even = rotated_even * rstd[:, None]
        rotated_odd = rotated_odd * rstd[:, None]
        tl.store(rstd_ptr + rows, rstd, mask=row_mask)

    out = tl.reshape(tl.join(rotated_even, rotated_odd), [BLOCK_ROWS, BLOCK_D])
    out_offsets = rows[:, None] * head_dim + features[None, :]
    tl.store(out_ptr + out_offsets, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_qk_norm_backward_kernel(
    grad_out_ptr,
    out_ptr,
    rstd_ptr,
    angles_ptr,
    grad_x_ptr,
    num_rows,
    seq_len,
    num_heads,
    head_dim,
    grad_stride_batch,
    grad_stride_time,
    grad_stride_head,
    angles_stride_time,
    QK_NORM: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = rows < num_rows
    rows = rows.to(tl.int64)
    features = tl.arange(0, BLOCK_D)
    mask = row_mask[:, None] & (features < head_dim)[None, :]
    pairs = tl.arange(0, BLOCK_D // 2)
    pair_mask = row_mask[:, None] & (pairs < head_dim // 2)[None, :]
    contiguous_offsets = rows[:, None] * head_dim + features[None, :]

    grad_offsets, time = _head_rows(
        rows, seq_len, num_heads, grad_stride_batch, grad_stride_time, grad_stride_head
    )
    grad = tl.load(grad_out_ptr + grad_offsets[:, None] + features[None, :], mask=mask, other=0.0)
    grad = grad.to(tl.float32)
    if QK_NORM:
        out = tl.load(out_ptr + contiguous_offsets, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)
        mean_grad_dot_out = tl.sum(grad * out, axis=1) / head_dim
        grad = rstd[:, None] * (grad - out * mean_grad_dot_out[:, None])
    grad_even, grad_odd = tl.split(tl.reshape(grad, [BLOCK_ROWS, BLOCK_D // 2, 2]))
    angle_offsets = time[:, None] * angles_stride_time + 2 * pairs[None, :]
    cos = tl.load(angles_ptr + angle_offsets, mask=pair_mask, other=0.0)
    sin = tl.load(angles_ptr + angle_offsets + 1, mask=pair_mask, other=0.0)

    grad_x_even = grad_even * cos + grad_odd * sin
    grad_x_odd = grad_odd * cos - grad_even * sin
    grad_x = tl.reshape(tl.join(grad_x_even, grad_x_odd), [BLOCK_ROWS, BLOCK_D])
    tl.store(grad_x_ptr + contiguous_offsets, grad_x.to(grad_x_ptr.dtype.element_ty), mask=mask)


def _launch_config(x: Tensor) -> tuple[tuple[int], dict]:
    """The grid and the block sizes / num_warps for the head rows of ``x`` [B, T, H, D]."""
    num_rows, head_dim = x.shape[:-1].numel(), x.shape[-1]
    tile = GPU_TILE if x.device.type == "cuda" else INTERPRETER_TILE
    block_d = triton.next_power_of_2(head_dim)
    block_rows = max(1, min(tile // block_d, triton.next_power_of_2(num_rows)))
    grid = (triton.cdiv(num_rows, block_rows),)
    return grid, dict(BLOCK_ROWS=block_rows, BLOCK_D=block_d, num_warps=GPU_NUM_WARPS)


def _rotate_forward(x: Tensor, angles: Tensor, qk_norm: bool, eps: float) -> tuple[Tensor, Tensor | None]:
    """Rotated (and normalised) x, contiguous, with the rstd of each head row (None without the norm)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    _, seq_len, num_heads, head_dim = x.shape
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device) if qk_norm else None
    grid, config = _launch_config(x)
    _rope_qk_norm_forward_kernel[grid](
        x,
        angles,
        out,
        angles if rstd is None else rstd,  # never written without the norm
        x.shape[:-1].numel(),
        seq_len,
        num_heads,
        head_dim,
        *x.stride()[:3],
        angles.stride(0),
        eps,
        QK_NORM=qk_norm,
        **config,
    )
    return out, rstd


def _rotate_backward(grad: Tensor, angles: Tensor, out: Tensor | None, rstd: Tensor | None) -> Tensor:
    """The gradient of the input from that of the output; ``out`` and ``rstd`` are given with the norm."""
    if grad.stride(-1) != 1:
        grad = grad.contiguous()
    _, seq_len, num_heads, head_dim = grad.shape
    qk_norm = out is not None
    grad_x = torch.empty(grad.shape, dtype=grad.dtype, device=grad.device)
    grid, config = _launch_config(grad)
    _rope_qk_norm_backward_kernel[grid](
        grad,
        out if qk_norm else grad,  # out and rstd are never read without the norm
        rstd if qk_norm else angles,
        angles,
        grad_x,
        grad.shape[:-1].numel(),
        seq_len,
        num_heads,
        head_dim,
        *grad.stride()[:3],
        angles.stride(0),
        QK_NORM=qk_norm,
        **config,
    )
    return grad_x


class _RopeQKNorm(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, q: Tensor, k: Tensor, freqs_cis: Tensor, qk_norm: bool, eps: float
    ) -> tuple[Tensor, Tensor]:
        # [T, D/2, 2] float32: (cos, sin) of each position and pair, interleaved like the features
        angles = torch.view_as_real(freqs_cis.contiguous()).float()
        q_out, q_rstd = _rotate_forward(q, angles, qk_norm, eps)
        k_out, k_rstd = _rotate_forward(k, angles, qk_norm, eps)
        if qk_norm:
            ctx.save_for_backward(angles, q_out, q_rstd, k_out, k_rstd)
        else:
            ctx.save_for_backward(angles)
        return q_out, k_out

    @staticmethod
    def backward(ctx, grad_q: Tensor, grad_k: Tensor) -> tuple[Tensor, Tensor, None, None, None]:
        angles, *norm_state = ctx.saved_tensors  # norm_state: q_out, q_rstd, k_out, k_rstd, or nothing
        q_out, q_rstd, k_out, k_rstd = norm_state or (None, None, None, None)
        grad_q = _rotate_backward(grad_q, angles, q_out, q_rstd)
        grad_k = _rotate_backward(grad_k, angles, k_out, k_rstd)
        return grad_q, grad_k, None, None, None


def rope_qk_norm(q: Tensor, k: Tensor, freqs_cis: Tensor, qk_norm: bool, eps: float) -> tuple[Tensor, Tensor]:
    """Rotate the interleaved pairs of q [B, T, H, D] and k [B, T, Hkv, D] by ``freqs_cis`` [T, D/2]
    (complex), then, if ``qk_norm``, divide each head row by its RMS (no weight).

    The fused counterpart of :func:`l4lab.ops.rope_qk_norm`, with the same signature, output dtypes and
    rounding; differentiable in q and k.
    """
    return _RopeQKNorm.apply(q, k, freqs_cis, qk_norm, eps)
