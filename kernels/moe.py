"""Llama 4's mixture of experts as Triton kernels: the router's choice, and the routed experts.

What it computes
    Exactly :func:`l4lab.ops.route` and :func:`l4lab.ops.routed_experts`. Tokens x [N, D] each choose
    k experts (k = 1 in Llama 4); slot ``s = n * k + j`` is token n's j-th choice, with expert ``e_s``
    and score ``s_s``. Per slot, with ``z = s_s * x_n`` (the score scales the expert's INPUT),
    ``p = z @ gate_up[e]`` [2I] (gate = first I, up = last I), ``h = silu(gate) * up`` and
    ``y_s = h @ down[e]``; then ``out_n = shared_n + sum_j y_(n k + j)``.

The pipeline, step by step
    1. Route (``_route_kernel``): one program per block of token rows takes the argmax of
       ``logits + selection_bias`` (rounded to the dtype PyTorch's promotion gives, as eager does) and
       ``sigmoid`` of the chosen expert's RAW logit in float32. No sort: k = 1 is an argmax.
    2. Counting sort of the N*k slots by expert, on the device (:func:`sort_by_expert`):
       ``_histogram_kernel`` counts each block of slots per expert (a one-hot sum); torch ``cumsum``s turn
       those counts into where each expert's rows start, and where each block's rows of each expert start;
       ``_scatter_kernel`` puts every slot at its place: its block's start for its expert plus its rank
       among the block's slots of that expert (a ``tl.cumsum`` of the one-hot). The sort is stable, so
       the results (and the weight gradients' summation order) are deterministic.
    3. Tile list (``_tile_list_kernel``): expert e's rows are cut into ``cdiv(rows_e, BLOCK_M)`` tiles of
       BLOCK_M sorted rows; one program per expert writes (expert, first sorted row) of each of its
       tiles. A tile never straddles two experts, so each GEMM program multiplies by ONE expert's weights.
    4. GEMM 1 (``_gate_up_kernel``): each program computes a [BLOCK_M, BLOCK_N] block of gate AND up
       for one tile: it GATHERS the tile's token rows of x by the sorted slot indices while loading (no
       permuted or padded copy of the activations), keeps two fp32 accumulators over D, multiplies each
       row by its score in the epilogue (linear, so ``(s x) W = s (x W)``: one multiply per output
       instead of one per loaded element), applies SwiGLU and stores h in sorted order [N*k, I]. When
       training it also stores the pre-activations [N*k, 2I] for the backward.
    5. GEMM 2 (``_grouped_matmul_kernel``): ``h @ down[e]`` per tile, SCATTERED back as each row is
       written: to row ``slot``. With k = 1 the slot is the token, each output row has exactly one writer
       (no atomics) and the shared expert's output is added in the same epilogue, so ``out`` [N, D] is
       written once. With k > 1 rows go to a [N*k, D] buffer summed over k by torch, then ``shared``.

The backward's math (per slot; g = d out [N, D], and every slot of token n receives g_n)
    dh      = g_n @ down[e]^T                               GEMM, rows of g gathered by token
    dp      = SwiGLU backward of dh at (gate, up):           in that GEMM's epilogue
              dgate = dh * up * sig * (1 + gate * (1 - sig)),  dup = dh * silu(gate),  sig = sigmoid(gate)
    d down[e]    = h_e^T g_e                                 grouped weight-gradient GEMM over e's rows
    d gate_up[e] = z_e^T dp_e,  z = s * x                    the same kernel, x rows gathered and scaled
    dz      = dp @ gate_up[e]^T                             GEMM 2's kernel with transposed strides
    dx_n = sum_j s_j dz_j,  d s_j = <x_n, dz_j>              one program per token (``_input_grad_kernel``)
    d shared = g.
    The weight-gradient kernel (``_expert_weight_grad_kernel``) gives each program one [BLOCK_M, BLOCK_N]
    block of one expert's weight gradient and loops over that expert's sorted rows, BLOCK_K at a time;
    an expert with no rows runs no iteration and writes zeros. The backward reads h (GEMM 2's input,
    which exists anyway) and the pre-activations saved by the forward, instead of rerunning GEMM 1 (2/3 of
    the forward's FLOPs): the price is 2I stored values per slot while training.

Why no host synchronisation
    The number of tiles depends on the routing, which lives on the GPU; reading it (``.tolist()``,
    ``.item()``, ``torch.bincount``'s output size) would stall the CPU until the GPU catches up and leave
    the GPU idle while the next launches are queued. Instead every GEMM launches an upper bound of
    ``cdiv(N*k, BLOCK_M) + E`` tiles (each expert wastes at most one partial tile); the real number of
    tiles sits in a one-element device tensor and the surplus programs return at once.

Tiling
    BLOCK_M sorted rows (tokens) x BLOCK_N output columns per program, BLOCK_K-wide steps of the
    reduction; fp32 accumulators; row indices and expert offsets in int64 (Maverick's gate_up has 10^10
    elements). Programs are numbered in GROUP_M groups of tiles: within a group, the tile index varies
    fastest, so programs running at the same time read the same column block of their expert's weights
    (from HBM once, then from L2) while the group's gathered rows of x stay in L2 across column blocks.
    On Hopper in bf16 (:data:`GPU_TILES`): 128 x 128 x 64, GROUP_M 8, 8 warps, 3 stages. Compiled for sm_90
    at Scout's shape, every GEMM uses wgmma with cp.async pipelining; GEMM 1 (two 128 x 128 fp32
    accumulators) takes 234 registers a thread with Triton 3.9 (255 with 3.6), without spills when it
    does not store the pre-activations (training's epilogue spills a few dozen bytes), and 144 KiB of
    shared memory for its three stages of one x and two weight tiles, GEMM 2 96 KiB
    (``benchmarks/compile_check.py`` prints these). In the interpreter: 32 x 32 x 32 (tests use 16).
    ``tl.dot`` needs every block dimension >= 16. Masks handle D, I and row counts that are not multiples
    of the blocks; all tensors are addressed through their strides, so weights need not be contiguous.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from l4lab import ops
from l4lab.config import RouterSpec
from l4lab.kernels.matmul_precision import dot_precision, refuse_interpreted_bfloat16

# token rows per route program: E logits each, a few KiB per program
ROUTE_BLOCK_ROWS = 32
# a sort program holds a [SORT_TILE // E, E] one-hot in registers
SORT_TILE = 8192
# features per step of the input-gradient kernel's loop over D
INPUT_GRAD_BLOCK_D = 1024
# tiles written per iteration of the tile-list kernel
TILE_LIST_BLOCK = 256


@dataclass(frozen=True)
class Tiles:
    """Block sizes of the grouped GEMMs (all >= 16, powers of two) and the GPU launch options."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 8
    num_stages: int = 3


GPU_TILES = Tiles(block_m=128, block_n=128, block_k=64)
# float32 tiles take twice the shared memory per element: GEMM 1's three stages of 128 x 128 x 64 would
# need 288 KiB, more than an H100 SM has (227 KiB); float32 is for checking, not for speed
FLOAT32_GPU_TILES = Tiles(block_m=64, block_n=64, block_k=32, num_warps=4)
INTERPRETER_TILES = Tiles(block_m=32, block_n=32, block_k=32)

_TRITON_DTYPES = {
    torch.float64: tl.float64,
    torch.float32: tl.float32,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
}


# ---------------------------------------------------------------------- route
@triton.jit
def _route_kernel(
    logits_ptr,
    stride_logits_row,
    stride_logits_col,
    bias_ptr,
    experts_ptr,
    scores_ptr,
    num_rows,
    num_experts,
    CHOICE_DTYPE: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_EXPERTS: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    experts = tl.arange(0, BLOCK_EXPERTS)
    valid = (rows < num_rows)[:, None] & (experts < num_experts)[None, :]
    raw = tl.load(
        logits_ptr + rows.to(tl.int64)[:, None] * stride_logits_row + experts[None, :] * stride_logits_col,
        mask=valid,
        other=0.0,
    ).to(tl.float32)
    bias = tl.load(bias_ptr + experts, mask=experts < num_experts, other=0.0).to(tl.float32)
    # eager adds in PyTorch's promoted dtype: round the fp32 sum to it, so that the same expert wins
    choice = (raw + bias[None, :]).to(CHOICE_DTYPE).to(tl.float32)
    choice = tl.where(valid, choice, float("-inf"))
    chosen = tl.argmax(choice, axis=1, tie_break_left=True)
    chosen_logit = tl.sum(tl.where(experts[None, :] == chosen[:, None], raw, 0.0), axis=1)
    score = tl.sigmoid(chosen_logit)
    tl.store(experts_ptr + rows, chosen.to(tl.int64), mask=rows < num_rows)
    tl.store(scores_ptr + rows, score.to(scores_ptr.dtype.element_ty), mask=rows < num_rows)


@triton.jit
def _route_backward_kernel(
    logits_ptr,
    stride_logits_row,
    stride_logits_col,
    experts_ptr,
    grad_scores_ptr,
    grad_logits_ptr,
    num_rows,
    num_experts,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_EXPERTS: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_valid = rows < num_rows
    experts = tl.arange(0, BLOCK_EXPERTS)
    chosen = tl.load(experts_ptr + rows, mask=row_valid, other=0)
    chosen_logit = tl.load(
        logits_ptr + rows.to(tl.int64) * stride_logits_row + chosen * stride_logits_col, mask=row_valid
    ).to(tl.float32)
    score = tl.sigmoid(chosen_logit)
    grad_score = tl.load(grad_scores_ptr + rows, mask=row_valid, other=0.0).to(tl.float32)
    grad_chosen = (grad_score * score * (1.0 - score)).to(grad_logits_ptr.dtype.element_ty)
    grad_row = tl.where(experts[None, :] == chosen[:, None], grad_chosen[:, None], 0.0)
    tl.store(
        grad_logits_ptr + rows.to(tl.int64)[:, None] * num_experts + experts[None, :],
        grad_row.to(grad_logits_ptr.dtype.element_ty),
        mask=row_valid[:, None] & (experts < num_experts)[None, :],
    )


def _route_grid(num_rows: int) -> tuple[int]:
    return (triton.cdiv(num_rows, ROUTE_BLOCK_ROWS),)


class _TopOneRoute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, selection_bias: Tensor) -> tuple[Tensor, Tensor]:
        num_rows, num_experts = logits.shape
        experts = torch.empty(num_rows, 1, dtype=torch.int64, device=logits.device)
        scores = torch.empty(num_rows, 1, dtype=logits.dtype, device=logits.device)
        choice_dtype = _TRITON_DTYPES[torch.result_type(logits, selection_bias)]
        _route_kernel[_route_grid(num_rows)](
            logits,
            logits.stride(0),
            logits.stride(1),
            selection_bias,
            experts,
            scores,
            num_rows,
            num_experts,
            CHOICE_DTYPE=choice_dtype,
            BLOCK_ROWS=ROUTE_BLOCK_ROWS,
            BLOCK_EXPERTS=triton.next_power_of_2(num_experts),
        )
        ctx.save_for_backward(logits, experts)
        ctx.mark_non_differentiable(experts)
        return experts, scores

    @staticmethod
    def backward(ctx, _grad_experts: Tensor | None, grad_scores: Tensor) -> tuple[Tensor, None]:
        logits, experts = ctx.saved_tensors
        num_rows, num_experts = logits.shape
        grad_logits = torch.empty(num_rows, num_experts, dtype=logits.dtype, device=logits.device)
        _route_backward_kernel[_route_grid(num_rows)](
            logits,
            logits.stride(0),
            logits.stride(1),
            experts,
            grad_scores.contiguous(),
            grad_logits,
            num_rows,
            num_experts,
            BLOCK_ROWS=ROUTE_BLOCK_ROWS,
            BLOCK_EXPERTS=triton.next_power_of_2(num_experts),
        )
        return grad_logits, None


def route(
    logits: Tensor, selection_bias: Tensor, top_k: int, router: RouterSpec | None = None
) -> tuple[Tensor, Tensor]:
    """Each token's top-k experts of ``logits + selection_bias`` and ``sigmoid`` of their raw logits.

    ``logits`` [N, E] -> (experts [N, k] int64, scores [N, k] in logits' dtype); scores carry a gradient
    to ``logits``. k = 1 (Llama 4) runs the Triton kernel; ties go to the lowest expert index
    (``torch.topk`` on the CPU breaks ties arbitrarily, so with exact ties the two may differ). Other k
    use the eager :func:`l4lab.ops.route`: a top-k needs a partial sort, which torch already does well.
    Llama 4's router only: another ``router`` (Mixtral's, DeepSeek-V3's) is refused.
    """
    if router is not None and router.kind != "llama4":
        raise NotImplementedError(
            f"the fused route kernel implements Llama 4's router only, not {router.kind!r}; "
            "use backend='eager'"
        )
    if top_k != 1:
        return ops.route(logits, selection_bias, top_k)
    return _TopOneRoute.apply(logits, selection_bias)


# ---------------------------------------------------------------------- counting sort and tile list
class Dispatch(NamedTuple):
    """Where every slot goes: the result of :func:`sort_by_expert`, all on the device.

    ``sorted_slots`` [N*k] int32: the slot of each sorted row, grouped by expert, in slot order within an
    expert. ``expert_starts``/``expert_ends`` [E] int32: each expert's sorted rows. ``tile_expert`` and
    ``tile_first_row`` [max_tiles] int32: the tile list (valid up to ``num_tiles`` [1] int32).
    """

    sorted_slots: Tensor
    expert_starts: Tensor
    expert_ends: Tensor
    tile_expert: Tensor
    tile_first_row: Tensor
    num_tiles: Tensor
    max_tiles: int


@triton.jit
def _histogram_kernel(
    expert_ids_ptr, block_counts_ptr, num_slots, num_experts, BLOCK: tl.constexpr, BLOCK_EXPERTS: tl.constexpr
):
    slots = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    experts = tl.arange(0, BLOCK_EXPERTS)
    slot_experts = tl.load(expert_ids_ptr + slots, mask=slots < num_slots, other=-1).to(tl.int32)
    one_hot = (slot_experts[:, None] == experts[None, :]).to(tl.int32)
    counts = tl.sum(one_hot, axis=0)
    tl.store(block_counts_ptr + tl.program_id(0) * num_experts + experts, counts, mask=experts < num_experts)


@triton.jit
def _scatter_kernel(
    expert_ids_ptr,
    block_starts_ptr,
    sorted_slots_ptr,
    num_slots,
    num_experts,
    BLOCK: tl.constexpr,
    BLOCK_EXPERTS: tl.constexpr,
):
    slots = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = slots < num_slots
    experts = tl.arange(0, BLOCK_EXPERTS)
    slot_experts = tl.load(expert_ids_ptr + slots, mask=valid, other=-1).to(tl.int32)
    one_hot = (slot_experts[:, None] == experts[None, :]).to(tl.int32)
    # rank of each slot among this block's slots of the same expert (0, 1, ...): stable
    rank = tl.sum(tl.where(one_hot != 0, tl.cumsum(one_hot, axis=0), 0), axis=1) - 1
    start = tl.load(block_starts_ptr + tl.program_id(0) * num_experts + slot_experts, mask=valid, other=0)
    tl.store(sorted_slots_ptr + start + rank, slots, mask=valid)


@triton.jit
def _tile_list_kernel(
    expert_starts_ptr,
    expert_ends_ptr,
    tile_starts_ptr,
    tile_expert_ptr,
    tile_first_row_ptr,
    BLOCK_M: tl.constexpr,
    BLOCK: tl.constexpr,
):
    expert = tl.program_id(0)
    first_row = tl.load(expert_starts_ptr + expert)
    num_rows = tl.load(expert_ends_ptr + expert) - first_row
    first_tile = tl.load(tile_starts_ptr + expert)
    for tile0 in range(0, tl.cdiv(num_rows, BLOCK_M), BLOCK):
        tiles = tile0 + tl.arange(0, BLOCK)
        valid = tiles * BLOCK_M < num_rows
        tl.store(tile_expert_ptr + first_tile + tiles, tl.full([BLOCK], 0, tl.int32) + expert, mask=valid)
        tl.store(tile_first_row_ptr + first_tile + tiles, first_row + tiles * BLOCK_M, mask=valid)


def sort_by_expert(expert_ids: Tensor, num_experts: int, block_m: int) -> Dispatch:
    """Counting sort of the slots of ``expert_ids`` [N, k] by expert, and the tile list; no host sync."""
    flat_experts = expert_ids.reshape(-1)
    num_slots = flat_experts.numel()
    device = expert_ids.device
    block_experts = triton.next_power_of_2(num_experts)
    sort_block = max(16, SORT_TILE // block_experts)
    num_blocks = triton.cdiv(num_slots, sort_block)

    block_counts = torch.empty(num_blocks, num_experts, dtype=torch.int32, device=device)
    _histogram_kernel[(num_blocks,)](
        flat_experts, block_counts, num_slots, num_experts, BLOCK=sort_block, BLOCK_EXPERTS=block_experts
    )
    counts = block_counts.sum(0, dtype=torch.int32)
    expert_ends = counts.cumsum(0, dtype=torch.int32)
    expert_starts = expert_ends - counts
    block_starts = expert_starts + block_counts.cumsum(0, dtype=torch.int32) - block_counts

    sorted_slots = torch.empty(num_slots, dtype=torch.int32, device=device)
    _scatter_kernel[(num_blocks,)](
        flat_experts,
        block_starts,
        sorted_slots,
        num_slots,
        num_experts,
        BLOCK=sort_block,
        BLOCK_EXPERTS=block_experts,
    )

    tiles_per_expert = (counts + block_m - 1) // block_m
    tile_ends = tiles_per_expert.cumsum(0, dtype=torch.int32)
    max_tiles = triton.cdiv(num_slots, block_m) + num_experts
    tile_expert = torch.empty(max_tiles, dtype=torch.int32, device=device)
    tile_first_row = torch.empty(max_tiles, dtype=torch.int32, device=device)
    _tile_list_kernel[(num_experts,)](
        expert_starts,
        expert_ends,
        tile_ends - tiles_per_expert,
        tile_expert,
        tile_first_row,
        BLOCK_M=block_m,
        BLOCK=TILE_LIST_BLOCK,
    )
    return Dispatch(
        sorted_slots, expert_starts, expert_ends, tile_expert, tile_first_row, tile_ends[-1:], max_tiles
    )


def tile_schedule(rows_per_expert: Sequence[int], block_m: int) -> list[tuple[int, int, int]]:
    """The tile list in plain Python: ``(expert, first sorted row, end row)`` of every tile, in order.

    Expert e owns sorted rows ``[sum(rows[:e]), sum(rows[:e + 1]))``, cut into tiles of ``block_m`` rows;
    the last tile of an expert may be partial, and an expert with no rows has no tile. This is what
    :func:`sort_by_expert` builds on the device (there as ``tile_expert`` and ``tile_first_row``).
    """
    schedule = []
    expert_start = 0
    for expert, rows in enumerate(rows_per_expert):
        expert_end = expert_start + rows
        for first_row in range(expert_start, expert_end, block_m):
            schedule.append((expert, first_row, min(first_row + block_m, expert_end)))
        expert_start = expert_end
    return schedule


# ---------------------------------------------------------------------- grouped GEMMs
@triton.jit
def _tile_and_column_block(pid, max_tiles, num_column_blocks, GROUP_M: tl.constexpr):
    """Program id -> (tile, column block), the tile varying fastest within groups of GROUP_M tiles."""
    programs_per_group = GROUP_M * num_column_blocks
    first_tile = (pid // programs_per_group) * GROUP_M
    group_size = tl.minimum(max_tiles - first_tile, GROUP_M)
    tile = first_tile + (pid % programs_per_group) % group_size
    column_block = (pid % programs_per_group) // group_size
    return tile, column_block


@triton.jit
def _gate_up_kernel(
    x_ptr,
    stride_x_row,
    stride_x_col,
    gate_up_ptr,
    stride_w_expert,
    stride_w_row,
    stride_w_col,
    h_ptr,
    preact_ptr,
    scores_ptr,
    sorted_slots_ptr,
    expert_ends_ptr,
    tile_expert_ptr,
    tile_first_row_ptr,
    num_tiles_ptr,
    max_tiles,
    dim,
    hidden,
    TOP_K: tl.constexpr,
    STORE_PREACT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """h[rows] = SwiGLU(s * x[tokens] @ gate_up[e]) for one tile of rows and BLOCK_N of the I columns."""
    tile, column_block = _tile_and_column_block(
        tl.program_id(0), max_tiles, tl.cdiv(hidden, BLOCK_N), GROUP_M
    )
    if tile >= tl.load(num_tiles_ptr):
        return
    expert = tl.load(tile_expert_ptr + tile).to(tl.int64)
    rows = tl.load(tile_first_row_ptr + tile) + tl.arange(0, BLOCK_M)
    row_valid = rows < tl.load(expert_ends_ptr + expert)
    slots = tl.load(sorted_slots_ptr + rows, mask=row_valid, other=0)
    tokens = (slots // TOP_K).to(tl.int64)
    cols = column_block * BLOCK_N + tl.arange(0, BLOCK_N)
    col_valid = cols < hidden
    ks = tl.arange(0, BLOCK_K)

    x_ptrs = x_ptr + tokens[:, None] * stride_x_row + ks[None, :] * stride_x_col
    gate_ptrs = (
        gate_up_ptr + expert * stride_w_expert + ks[:, None] * stride_w_row + cols[None, :] * stride_w_col
    )
    up_offset = hidden * stride_w_col
    gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, dim, BLOCK_K):
        k_valid = (k0 + ks) < dim
        x_tile = tl.load(x_ptrs, mask=row_valid[:, None] & k_valid[None, :], other=0.0)
        w_mask = k_valid[:, None] & col_valid[None, :]
        gate = tl.dot(x_tile, tl.load(gate_ptrs, mask=w_mask, other=0.0), gate)
        up = tl.dot(x_tile, tl.load(gate_ptrs + up_offset, mask=w_mask, other=0.0), up)
        x_ptrs += BLOCK_K * stride_x_col
        gate_ptrs += BLOCK_K * stride_w_row

    score = tl.load(scores_ptr + slots, mask=row_valid, other=0.0).to(tl.float32)
    gate = gate * score[:, None]
    up = up * score[:, None]
    out_mask = row_valid[:, None] & col_valid[None, :]
    out_offsets = rows.to(tl.int64)[:, None] * hidden + cols[None, :]
    if STORE_PREACT:
        preact_offsets = rows.to(tl.int64)[:, None] * (2 * hidden) + cols[None, :]
        tl.store(preact_ptr + preact_offsets, gate.to(preact_ptr.dtype.element_ty), mask=out_mask)
        tl.store(preact_ptr + preact_offsets + hidden, up.to(preact_ptr.dtype.element_ty), mask=out_mask)
    h = gate * tl.sigmoid(gate) * up
    tl.store(h_ptr + out_offsets, h.to(h_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _grouped_matmul_kernel(
    a_ptr,
    stride_a_row,
    stride_a_col,
    b_ptr,
    stride_b_expert,
    stride_b_row,
    stride_b_col,
    c_ptr,
    stride_c_row,
    residual_ptr,
    stride_residual_row,
    stride_residual_col,
    preact_ptr,
    sorted_slots_ptr,
    expert_ends_ptr,
    tile_expert_ptr,
    tile_first_row_ptr,
    num_tiles_ptr,
    max_tiles,
    inner,
    cols_total,
    TOP_K: tl.constexpr,
    A_ROWS_BY_TOKEN: tl.constexpr,
    C_ROWS_BY_SLOT: tl.constexpr,
    ADD_RESIDUAL: tl.constexpr,
    SWIGLU_BACKWARD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """c = a[rows] @ b[e] for one tile of rows and BLOCK_N columns, three ways.

    a's rows are the sorted rows themselves, or (``A_ROWS_BY_TOKEN``) the tile's tokens, gathered.
    c's rows are the sorted rows, or (``C_ROWS_BY_SLOT``) the slots, scattered; ``ADD_RESIDUAL`` adds
    ``residual[slot]`` (top-1: slot = token). ``SWIGLU_BACKWARD`` reads the product as dh and writes
    (dgate, dup) into c [rows, 2 * cols_total] from the pre-activations stored beside it in ``preact``.
    """
    tile, column_block = _tile_and_column_block(
        tl.program_id(0), max_tiles, tl.cdiv(cols_total, BLOCK_N), GROUP_M
    )
    if tile >= tl.load(num_tiles_ptr):
        return
    expert = tl.load(tile_expert_ptr + tile).to(tl.int64)
    rows = tl.load(tile_first_row_ptr + tile) + tl.arange(0, BLOCK_M)
    row_valid = rows < tl.load(expert_ends_ptr + expert)
    slots = tl.load(sorted_slots_ptr + rows, mask=row_valid, other=0).to(tl.int64)
    a_rows = slots // TOP_K if A_ROWS_BY_TOKEN else rows.to(tl.int64)
    cols = column_block * BLOCK_N + tl.arange(0, BLOCK_N)
    col_valid = cols < cols_total
    ks = tl.arange(0, BLOCK_K)

    a_ptrs = a_ptr + a_rows[:, None] * stride_a_row + ks[None, :] * stride_a_col
    b_ptrs = b_ptr + expert * stride_b_expert + ks[:, None] * stride_b_row + cols[None, :] * stride_b_col
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, inner, BLOCK_K):
        k_valid = (k0 + ks) < inner
        a_tile = tl.load(a_ptrs, mask=row_valid[:, None] & k_valid[None, :], other=0.0)
        b_tile = tl.load(b_ptrs, mask=k_valid[:, None] & col_valid[None, :], other=0.0)
        acc = tl.dot(a_tile, b_tile, acc)
        a_ptrs += BLOCK_K * stride_a_col
        b_ptrs += BLOCK_K * stride_b_row

    out_mask = row_valid[:, None] & col_valid[None, :]
    c_rows = slots if C_ROWS_BY_SLOT else rows.to(tl.int64)
    c_ptrs = c_ptr + c_rows[:, None] * stride_c_row + cols[None, :]
    if SWIGLU_BACKWARD:
        preact_ptrs = preact_ptr + rows.to(tl.int64)[:, None] * (2 * cols_total) + cols[None, :]
        gate = tl.load(preact_ptrs, mask=out_mask, other=0.0).to(tl.float32)
        up = tl.load(preact_ptrs + cols_total, mask=out_mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(gate)
        grad_gate = acc * up * sig * (1.0 + gate * (1.0 - sig))
        tl.store(c_ptrs, grad_gate.to(c_ptr.dtype.element_ty), mask=out_mask)
        tl.store(c_ptrs + cols_total, (acc * gate * sig).to(c_ptr.dtype.element_ty), mask=out_mask)
    else:
        if ADD_RESIDUAL:
            residual_ptrs = (
                residual_ptr + slots[:, None] * stride_residual_row + cols[None, :] * stride_residual_col
            )
            acc += tl.load(residual_ptrs, mask=out_mask, other=0.0).to(tl.float32)
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _expert_weight_grad_kernel(
    a_ptr,
    stride_a_row,
    stride_a_col,
    b_ptr,
    stride_b_row,
    stride_b_col,
    out_ptr,
    stride_out_expert,
    stride_out_row,
    stride_out_col,
    scores_ptr,
    sorted_slots_ptr,
    expert_starts_ptr,
    expert_ends_ptr,
    out_rows,
    out_cols,
    TOP_K: tl.constexpr,
    A_ROWS_BY_TOKEN: tl.constexpr,
    A_SCALED: tl.constexpr,
    B_ROWS_BY_TOKEN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out[e] block = a_e^T b_e, summed over expert e's sorted rows (a's rows scaled by their score
    if ``A_SCALED``; a's and b's rows are sorted rows or, ``*_ROWS_BY_TOKEN``, gathered tokens)."""
    blocks_m = tl.cdiv(out_rows, BLOCK_M)
    blocks_n = tl.cdiv(out_cols, BLOCK_N)
    pid = tl.program_id(0)
    expert = pid // (blocks_m * blocks_n)
    m_block = (pid // blocks_n) % blocks_m
    n_block = pid % blocks_n
    ms = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    ns = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
    m_valid = ms < out_rows
    n_valid = ns < out_cols
    expert_end = tl.load(expert_ends_ptr + expert)

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for row0 in range(tl.load(expert_starts_ptr + expert), expert_end, BLOCK_K):
        rows = row0 + tl.arange(0, BLOCK_K)
        row_valid = rows < expert_end
        slots = tl.load(sorted_slots_ptr + rows, mask=row_valid, other=0).to(tl.int64)
        a_rows = slots // TOP_K if A_ROWS_BY_TOKEN else rows.to(tl.int64)
        b_rows = slots // TOP_K if B_ROWS_BY_TOKEN else rows.to(tl.int64)
        a_tile = tl.load(
            a_ptr + a_rows[:, None] * stride_a_row + ms[None, :] * stride_a_col,
            mask=row_valid[:, None] & m_valid[None, :],
            other=0.0,
        )
        if A_SCALED:
            score = tl.load(scores_ptr + slots, mask=row_valid, other=0.0).to(tl.float32)
            a_tile = (a_tile.to(tl.float32) * score[:, None]).to(a_ptr.dtype.element_ty)
        b_tile = tl.load(
            b_ptr + b_rows[:, None] * stride_b_row + ns[None, :] * stride_b_col,
            mask=row_valid[:, None] & n_valid[None, :],
            other=0.0,
        )
        acc = tl.dot(tl.trans(a_tile), b_tile, acc)

    out_ptrs = (
        out_ptr
        + expert.to(tl.int64) * stride_out_expert
        + ms[:, None] * stride_out_row
        + ns[None, :] * stride_out_col
    )
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_valid[:, None] & n_valid[None, :])


@triton.jit
def _input_grad_kernel(
    grad_z_ptr,
    x_ptr,
    stride_x_row,
    stride_x_col,
    scores_ptr,
    grad_x_ptr,
    grad_scores_ptr,
    dim,
    TOP_K: tl.constexpr,
    BLOCK_K_SLOTS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One token: dx = sum_j s_j dz_j and d s_j = <x, dz_j> over its k slots (dz in slot order)."""
    token = tl.program_id(0).to(tl.int64)
    choices = tl.arange(0, BLOCK_K_SLOTS)
    choice_valid = choices < TOP_K
    slots = token * TOP_K + choices
    score = tl.load(scores_ptr + slots, mask=choice_valid, other=0.0).to(tl.float32)
    grad_score = tl.zeros([BLOCK_K_SLOTS], dtype=tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_valid = ds < dim
        grad_z = tl.load(
            grad_z_ptr + slots[:, None] * dim + ds[None, :],
            mask=choice_valid[:, None] & d_valid[None, :],
            other=0.0,
        ).to(tl.float32)
        x = tl.load(x_ptr + token * stride_x_row + ds * stride_x_col, mask=d_valid, other=0.0).to(tl.float32)
        grad_score += tl.sum(grad_z * x[None, :], axis=1)
        grad_x = tl.sum(grad_z * score[:, None], axis=0)
        tl.store(grad_x_ptr + token * dim + ds, grad_x.to(grad_x_ptr.dtype.element_ty), mask=d_valid)
    tl.store(grad_scores_ptr + slots, grad_score.to(grad_scores_ptr.dtype.element_ty), mask=choice_valid)


# ---------------------------------------------------------------------- host side
def _row_grid(dispatch: Dispatch, columns: int, tiles: Tiles) -> tuple[int]:
    return (dispatch.max_tiles * triton.cdiv(columns, tiles.block_n),)


def _launch_options(tiles: Tiles, dtype: torch.dtype) -> dict[str, int | str]:
    """Blocks, warps and (float32: IEEE) dot precision of a GEMM launch."""
    return dict(
        BLOCK_M=tiles.block_m,
        BLOCK_N=tiles.block_n,
        BLOCK_K=tiles.block_k,
        num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
        **dot_precision(dtype),
    )


def _grouped_matmul(
    a: Tensor,
    b: Tensor,
    b_strides: tuple[int, int, int],
    out: Tensor,
    dispatch: Dispatch,
    top_k: int,
    tiles: Tiles,
    *,
    a_rows_by_token: bool,
    c_rows_by_slot: bool,
    residual: Tensor | None = None,
    preact: Tensor | None = None,
) -> None:
    """``out[rows] = a[rows] @ b[e]`` tile by tile; ``b_strides`` (expert, inner, column) read b."""
    inner, cols_total = a.shape[1], out.shape[1] // (2 if preact is not None else 1)
    _grouped_matmul_kernel[_row_grid(dispatch, cols_total, tiles)](
        a,
        a.stride(0),
        a.stride(1),
        b,
        *b_strides,
        out,
        out.stride(0),
        residual if residual is not None else out,
        residual.stride(0) if residual is not None else 0,
        residual.stride(1) if residual is not None else 0,
        preact if preact is not None else out,
        dispatch.sorted_slots,
        dispatch.expert_ends,
        dispatch.tile_expert,
        dispatch.tile_first_row,
        dispatch.num_tiles,
        dispatch.max_tiles,
        inner,
        cols_total,
        TOP_K=top_k,
        A_ROWS_BY_TOKEN=a_rows_by_token,
        C_ROWS_BY_SLOT=c_rows_by_slot,
        ADD_RESIDUAL=residual is not None,
        SWIGLU_BACKWARD=preact is not None,
        GROUP_M=tiles.group_m,
        **_launch_options(tiles, a.dtype),
    )


def _expert_weight_grad(
    a: Tensor,
    b: Tensor,
    out: Tensor,
    dispatch: Dispatch,
    top_k: int,
    tiles: Tiles,
    *,
    a_rows_by_token: bool,
    b_rows_by_token: bool,
    scores: Tensor | None = None,
) -> None:
    """``out[e] = a_e^T b_e`` for every expert e (a's rows times their scores if ``scores`` is given)."""
    num_experts, out_rows, out_cols = out.shape
    grid = (num_experts * triton.cdiv(out_rows, tiles.block_m) * triton.cdiv(out_cols, tiles.block_n),)
    _expert_weight_grad_kernel[grid](
        a,
        a.stride(0),
        a.stride(1),
        b,
        b.stride(0),
        b.stride(1),
        out,
        out.stride(0),
        out.stride(1),
        out.stride(2),
        scores if scores is not None else a,
        dispatch.sorted_slots,
        dispatch.expert_starts,
        dispatch.expert_ends,
        out_rows,
        out_cols,
        TOP_K=top_k,
        A_ROWS_BY_TOKEN=a_rows_by_token,
        A_SCALED=scores is not None,
        B_ROWS_BY_TOKEN=b_rows_by_token,
        **_launch_options(tiles, a.dtype),
    )


def _experts_forward(
    x: Tensor,
    scores_flat: Tensor,
    gate_up: Tensor,
    down: Tensor,
    shared: Tensor | None,
    dispatch: Dispatch,
    top_k: int,
    tiles: Tiles,
    keep_preact: bool,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """GEMM 1 then GEMM 2: (out [N, D], h [N*k, I] sorted, pre-activations [N*k, 2I] or None)."""
    num_tokens, dim = x.shape
    num_slots, hidden = num_tokens * top_k, down.shape[1]
    h = torch.empty(num_slots, hidden, dtype=x.dtype, device=x.device)
    preact = torch.empty(num_slots, 2 * hidden, dtype=x.dtype, device=x.device) if keep_preact else None
    _gate_up_kernel[_row_grid(dispatch, hidden, tiles)](
        x,
        x.stride(0),
        x.stride(1),
        gate_up,
        *gate_up.stride(),
        h,
        preact if keep_preact else h,
        scores_flat,
        dispatch.sorted_slots,
        dispatch.expert_ends,
        dispatch.tile_expert,
        dispatch.tile_first_row,
        dispatch.num_tiles,
        dispatch.max_tiles,
        dim,
        hidden,
        TOP_K=top_k,
        STORE_PREACT=keep_preact,
        GROUP_M=tiles.group_m,
        **_launch_options(tiles, x.dtype),
    )
    slot_out = torch.empty(num_slots, dim, dtype=x.dtype, device=x.device)
    fuse_shared = shared if top_k == 1 else None
    _grouped_matmul(
        h,
        down,
        down.stride(),
        slot_out,
        dispatch,
        top_k,
        tiles,
        a_rows_by_token=False,
        c_rows_by_slot=True,
        residual=fuse_shared,
    )
    if top_k == 1:  # slot order is token order, and shared (if any) is already in
        return slot_out, h, preact
    out = slot_out.view(num_tokens, top_k, dim).sum(dim=1)
    if shared is not None:
        out += shared
    return out, h, preact


class _RoutedExperts(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        x: Tensor,
        expert_ids: Tensor,
        scores: Tensor,
        gate_up: Tensor,
        down: Tensor,
        shared: Tensor | None,
        tiles: Tiles,
    ) -> Tensor:
        top_k = expert_ids.shape[1]
        dispatch = sort_by_expert(expert_ids, gate_up.shape[0], tiles.block_m)
        scores_flat = scores.reshape(-1)
        out, h, preact = _experts_forward(
            x, scores_flat, gate_up, down, shared, dispatch, top_k, tiles, keep_preact=True
        )
        ctx.save_for_backward(x, scores_flat, gate_up, down, h, preact, *dispatch[:-1])
        ctx.max_tiles, ctx.top_k, ctx.tiles, ctx.scores_shape = dispatch.max_tiles, top_k, tiles, scores.shape
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x, scores_flat, gate_up, down, h, preact, *dispatch_tensors = ctx.saved_tensors
        dispatch = Dispatch(*dispatch_tensors, ctx.max_tiles)
        top_k, tiles = ctx.top_k, ctx.tiles
        need_x, _, need_scores, need_gate_up, need_down, need_shared, _ = ctx.needs_input_grad
        num_slots = h.shape[0]

        grad_preact = torch.empty_like(preact)  # (dgate, dup), sorted rows
        down_transposed = (down.stride(0), down.stride(2), down.stride(1))
        _grouped_matmul(
            grad_out,
            down,
            down_transposed,
            grad_preact,
            dispatch,
            top_k,
            tiles,
            a_rows_by_token=True,
            c_rows_by_slot=False,
            preact=preact,
        )
        grad_down = grad_gate_up = grad_x = grad_scores = None
        if need_down:
            grad_down = torch.empty(down.shape, dtype=down.dtype, device=down.device)
            _expert_weight_grad(
                h, grad_out, grad_down, dispatch, top_k, tiles, a_rows_by_token=False, b_rows_by_token=True
            )
        if need_gate_up:
            grad_gate_up = torch.empty(gate_up.shape, dtype=gate_up.dtype, device=gate_up.device)
            _expert_weight_grad(
                x,
                grad_preact,
                grad_gate_up,
                dispatch,
                top_k,
                tiles,
                a_rows_by_token=True,
                b_rows_by_token=False,
                scores=scores_flat,
            )
        if need_x or need_scores:
            grad_z = torch.empty(num_slots, x.shape[1], dtype=x.dtype, device=x.device)  # slot order
            gate_up_transposed = (gate_up.stride(0), gate_up.stride(2), gate_up.stride(1))
            _grouped_matmul(
                grad_preact,
                gate_up,
                gate_up_transposed,
                grad_z,
                dispatch,
                top_k,
                tiles,
                a_rows_by_token=False,
                c_rows_by_slot=True,
            )
            grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device)
            grad_scores = torch.empty(ctx.scores_shape, dtype=scores_flat.dtype, device=x.device)
            _input_grad_kernel[(x.shape[0],)](
                grad_z,
                x,
                x.stride(0),
                x.stride(1),
                scores_flat,
                grad_x,
                grad_scores,
                x.shape[1],
                TOP_K=top_k,
                BLOCK_K_SLOTS=triton.next_power_of_2(top_k),
                BLOCK_D=min(INPUT_GRAD_BLOCK_D, triton.next_power_of_2(x.shape[1])),
            )
        return (
            grad_x if need_x else None,
            None,
            grad_scores if need_scores else None,
            grad_gate_up,
            grad_down,
            grad_out if need_shared else None,
            None,
        )


def default_tiles(device: torch.device, dtype: torch.dtype) -> Tiles:
    """:data:`GPU_TILES` on a GPU (:data:`FLOAT32_GPU_TILES` in float32), :data:`INTERPRETER_TILES` in
    Triton's interpreter."""
    if device.type != "cuda":
        return INTERPRETER_TILES
    return FLOAT32_GPU_TILES if dtype == torch.float32 else GPU_TILES


def routed_experts(
    x: Tensor,
    expert_ids: Tensor,
    scores: Tensor,
    gate_up: Tensor,
    down: Tensor,
    shared: Tensor | None = None,
    scale_output: bool = False,
    *,
    tiles: Tiles | None = None,
) -> Tensor:
    """Sparse mixture-of-experts dispatch: :func:`l4lab.ops.routed_experts` on grouped Triton GEMMs.

    ``x`` [N, D], ``expert_ids``/``scores`` [N, k], ``gate_up`` [E, D, 2I], ``down`` [E, I, D],
    ``shared`` [N, D] or None; returns [N, D]. ``tiles`` overrides the block sizes (tests, tuning).
    Differentiable in x, scores, gate_up, down and shared; the backward's GEMMs are Triton kernels too.
    Scores scale the expert's input (Llama 4); ``scale_output`` (Mixtral, DeepSeek-V3) is refused.
    """
    if scale_output:
        raise NotImplementedError(
            "the fused experts kernel scales each expert's input by its score (Llama 4); scaling the "
            "output (Mixtral, DeepSeek-V3) runs on backend='eager' only"
        )
    refuse_interpreted_bfloat16(x, "experts")
    tiles = tiles or default_tiles(x.device, x.dtype)
    inputs = (x, scores, gate_up, down, shared)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        return _RoutedExperts.apply(x, expert_ids, scores, gate_up, down, shared, tiles)
    dispatch = sort_by_expert(expert_ids, gate_up.shape[0], tiles.block_m)
    out, _, _ = _experts_forward(
        x, scores.reshape(-1), gate_up, down, shared, dispatch, expert_ids.shape[1], tiles, keep_preact=False
    )
    return out
