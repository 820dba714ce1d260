"""Compile every Triton kernel of ``l4lab.kernels`` for sm_90 (H100) without a GPU, at Scout's configurations.

Each kernel is compiled as a GPU launch would compile it: its arguments are ``meta`` tensors of Llama 4
Scout's shapes in bf16, and for the kernels with matrix products (attention, MoE) also in float32, the
dtype of the GPU tests (hidden 5120, 40 query / 8 KV heads of 128, experts 16 x 8192, 8192 tokens) and
the integers a launch would pass, specialised by Triton's own launch code (pointer and integer
divisibility, constants equal to 1), with the block sizes, ``num_warps`` and ``num_stages`` that each
file uses on a GPU (``GPU_TILE``, ``Tiling`` / ``default_tiling``, ``GPU_TILES``). ``triton.compile``
then runs the whole pipeline down to a cubin with the ptxas that Triton bundles, for the target
``GPUTarget("cuda", 90, 32)``; no driver or device is needed.

It prints a table of kernel / variant / warps / stages / registers per thread / spill bytes (stores +
loads) / shared memory, and exits non-zero if any kernel fails to compile or needs more shared memory
than an H100 gives a block (227 KiB: such a launch fails with "out of resources"). Registers and spills come
from ptxas' ``-v`` report (without a device, Triton's ``n_regs`` and ``n_spills`` stay unset), shared
memory from the compiled kernel's metadata. Works with Triton 3.6 and 3.9 (it uses the launch path's
helpers ``create_function_from_signature`` and ``JITFunction._pack_args``, present in both).

    python benchmarks/compile_check.py                 # every kernel
    python benchmarks/compile_check.py --only moe      # the kernels of some files

The kernels package runs Triton's interpreter on a machine without CUDA; this script unsets
``TRITON_INTERPRET`` and imports ``l4lab.kernels`` as if a GPU were present, so ``@triton.jit`` gives real
JIT functions. Run it as its own process, not after anything else imported triton.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import re
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any
from unittest import mock

import torch

BF16 = torch.bfloat16
F32 = torch.float32
SHARED_MEMORY_LIMIT = 232448  # bytes of shared memory one block may use on an H100 (sm_90)
# the dtype of the activations and weights under compilation: bf16, then float32 for the dot kernels
DTYPE = BF16
I32 = torch.int32
I64 = torch.int64

# Llama 4 Scout, and the workloads benchmarks/kernels.py times
HIDDEN = 5120
HEADS, KV_HEADS, HEAD_DIM = 40, 8, 128
EXPERTS, EXPERT_WIDTH, SHARED_WIDTH = 16, 8192, 8192
CHUNK = 8192
TOKENS = 8192  # prefill length (one sequence) and MoE tokens
NORM_ROWS = 16384  # rows of the RMSNorm / SwiGLU benchmarks
DECODE_KEYS = 131072
H100_SMS = 132
EPS = 1e-5


def meta(*shape: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A tensor with a shape, strides and dtype (default :data:`DTYPE`) but no storage: all a launch looks
    at."""
    dtype = dtype or DTYPE
    return torch.empty(*shape, dtype=dtype, device="meta")


@dataclass
class Case:
    """One kernel at one configuration: the arguments of its launch, grid excluded."""

    file: str
    kernel: Any
    variant: str
    args: tuple
    kwargs: dict = field(default_factory=dict)


def _import_kernels() -> dict[str, Any]:
    """``l4lab.kernels``' modules with real JIT functions (no interpreter), on any machine."""
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("triton was imported in interpreter mode: run this script in a fresh process")
    os.environ.pop("TRITON_INTERPRET", None)
    # l4lab.kernels turns the interpreter on when torch sees no GPU: let it see one while importing
    with mock.patch.object(torch.cuda, "is_available", return_value=True):
        from l4lab.kernels import attention, moe, rms_norm, rope, swiglu
    return dict(rms_norm=rms_norm, swiglu=swiglu, rope=rope, attention=attention, moe=moe)


def norm_cases(rms_norm: Any) -> list[Case]:
    gpu = torch.device("cuda")
    x = meta(NORM_ROWS, HIDDEN)
    weight = meta(HIDDEN)
    rstd = meta(NORM_ROWS, dtype=F32)
    block_rows, block_cols = rms_norm._tile(NORM_ROWS, HIDDEN, gpu)
    tile = block_rows * block_cols
    forward = Case(
        "rms_norm",
        rms_norm._rms_norm_forward_kernel,
        "weight",
        (x, weight, x, rstd, NORM_ROWS, HIDDEN, x.stride(0), EPS),
        dict(
            HAS_WEIGHT=True,
            BLOCK_ROWS=block_rows,
            BLOCK_COLS=block_cols,
            num_warps=rms_norm._num_warps(tile, rms_norm.FORWARD_VALUES_PER_THREAD),
        ),
    )
    num_tiles = math.ceil(NORM_ROWS / block_rows)
    tiles_per_program = max(1, math.ceil(num_tiles / H100_SMS))
    num_programs = math.ceil(num_tiles / tiles_per_program)
    partials = meta(num_programs, HIDDEN, dtype=F32)
    backward = Case(
        "rms_norm",
        rms_norm._rms_norm_backward_kernel,
        "weight",
        (x, x, weight, rstd, x, partials, NORM_ROWS, HIDDEN, x.stride(0), x.stride(0)),
        dict(
            rows_per_program=tiles_per_program * block_rows,
            HAS_WEIGHT=True,
            BLOCK_ROWS=block_rows,
            BLOCK_COLS=block_cols,
            num_warps=rms_norm._num_warps(tile, rms_norm.BACKWARD_VALUES_PER_THREAD),
        ),
    )
    return [forward, backward]


def swiglu_cases(swiglu: Any) -> list[Case]:
    # the shared expert's gate and up: column halves of one [N, 2I] projection, read in place
    gate_up = meta(NORM_ROWS, 2 * SHARED_WIDTH)
    gate, up = gate_up.chunk(2, dim=-1)
    out = meta(NORM_ROWS, SHARED_WIDTH)
    _, config = swiglu._launch_config(NORM_ROWS, SHARED_WIDTH, torch.device("cuda"))
    sizes = (NORM_ROWS, SHARED_WIDTH)
    return [
        Case(
            "swiglu",
            swiglu._swiglu_forward_kernel,
            "halves",
            (gate, up, out, *sizes, gate.stride(0), up.stride(0)),
            config,
        ),
        Case(
            "swiglu",
            swiglu._swiglu_backward_kernel,
            "halves",
            (out, gate, up, out, out, *sizes, out.stride(0), gate.stride(0), up.stride(0)),
            config,
        ),
    ]


def rope_cases(rope: Any) -> list[Case]:
    # q as the projection's output viewed [B, T, H, D]; angles = view_as_real(freqs_cis) [T, D/2, 2]
    q = meta(1, TOKENS, HEADS * HEAD_DIM).view(1, TOKENS, HEADS, HEAD_DIM)
    angles = meta(TOKENS, HEAD_DIM // 2, 2, dtype=F32)
    rstd = meta(1, TOKENS, HEADS, dtype=F32)
    block_d = 1 << (HEAD_DIM - 1).bit_length()
    config = dict(
        BLOCK_ROWS=rope.GPU_TILE // block_d, BLOCK_D=block_d, num_warps=rope.GPU_NUM_WARPS, QK_NORM=True
    )
    rows = TOKENS * HEADS
    return [
        Case(
            "rope",
            rope._rope_qk_norm_forward_kernel,
            "qk_norm",
            (q, angles, q, rstd, rows, TOKENS, HEADS, HEAD_DIM, *q.stride()[:3], angles.stride(0), EPS),
            config,
        ),
        Case(
            "rope",
            rope._rope_qk_norm_backward_kernel,
            "qk_norm",
            (q, q, rstd, angles, q, rows, TOKENS, HEADS, HEAD_DIM, *q.stride()[:3], angles.stride(0)),
            config,
        ),
    ]


def attention_cases(attention: Any) -> list[Case]:
    tiling = attention.default_tiling(DTYPE, HEAD_DIM)
    precision = attention.dot_precision(DTYPE)
    # q and out [B, H, T, D] are transposed views of [B, T, H, D]; so are k and v, with Hkv heads
    q = meta(1, TOKENS, HEADS, HEAD_DIM).transpose(1, 2)
    k = meta(1, TOKENS, KV_HEADS, HEAD_DIM).transpose(1, 2)
    lse = meta(1, HEADS, TOKENS, dtype=F32)
    group = HEADS // KV_HEADS
    layers = {
        "chunked (RoPE)": attention._Problem(0, 0, CHUNK, None, tiling),
        "global+temp (NoPE)": attention._Problem(0, 0, None, attention.Temperature(8192.0, 0.1), tiling),
    }
    cases = []
    for variant, problem in layers.items():
        scalars = problem.scalars(HEAD_DIM)
        cases.append(
            Case(
                "attention",
                attention._prefill_kernel,
                variant,
                (q, k, k, q, lse, *q.stride()[:3], *k.stride()[:3], *k.stride()[:3], *q.stride()[:3]),
                dict(
                    num_heads=HEADS,
                    num_queries=TOKENS,
                    num_keys=TOKENS,
                    group=group,
                    BLOCK_M=tiling.block_m,
                    BLOCK_N=tiling.block_n,
                    num_warps=tiling.num_warps,
                    num_stages=tiling.num_stages,
                    **scalars,
                    **precision,
                ),
            )
        )
        launch = dict(
            group=group,
            sm_scale=HEAD_DIM**-0.5,
            BLOCK_M=tiling.bwd_block_m,
            BLOCK_N=tiling.bwd_block_n,
            num_warps=tiling.bwd_warps,
            num_stages=tiling.bwd_stages,
            **scalars,
            **precision,
        )
        strides = (*q.stride()[:3], *k.stride()[:3], *k.stride()[:3], *q.stride()[:3])
        cases.append(
            Case(
                "attention",
                attention._dkdv_kernel,
                variant,
                (q, k, k, q, lse, lse, k, k, *strides, *k.stride()[:3], *k.stride()[:3]),
                dict(num_kv_heads=KV_HEADS, num_queries=TOKENS, num_keys=TOKENS, **launch),
            )
        )
        cases.append(
            Case(
                "attention",
                attention._dq_kernel,
                variant,
                (q, k, k, q, lse, lse, q, *strides, *q.stride()[:3]),
                dict(num_heads=HEADS, num_queries=TOKENS, num_keys=TOKENS, **launch),
            )
        )
    scalars = layers["chunked (RoPE)"].scalars(HEAD_DIM)
    cases.append(
        Case(
            "attention",
            attention._delta_kernel,
            "",
            (q, q, lse, *q.stride()[:3], *q.stride()[:3], HEADS, TOKENS),
            dict(HEAD_DIM=HEAD_DIM, BLOCK_D=scalars["BLOCK_D"], BLOCK_M=tiling.bwd_block_m),
        )
    )

    # decode: one query per head against a [B, Hkv, T, D] cache: a NoPE layer sees all T keys, a RoPE
    # layer the keys of its chunk (the query at the last position of a chunk: all CHUNK of them)
    q1 = meta(1, 1, HEADS, HEAD_DIM).transpose(1, 2)
    decodes = {
        "global+temp (NoPE)": (DECODE_KEYS - 1, None, attention.Temperature(8192.0, 0.1)),
        "chunked (RoPE)": (DECODE_KEYS + CHUNK - 1, CHUNK, None),
    }
    for variant, (position, chunk_size, temperature) in decodes.items():
        problem = attention._Problem(position, 0, chunk_size, temperature, tiling)
        scalars = problem.scalars(HEAD_DIM)
        cache = meta(1, KV_HEADS, position + 1, HEAD_DIM)
        lo, _, _, hi = attention.key_tile_bounds(
            position, position, 0, position + 1, chunk_size, tiling.block_n
        )
        splits = max(1, min(hi - lo, math.ceil(2 * H100_SMS / KV_HEADS)))  # as _decode_split_tiles
        split_tiles = math.ceil((hi - lo) / splits)
        num_splits = math.ceil((hi - lo) / split_tiles)
        part_out = meta(HEADS, num_splits, scalars["BLOCK_D"], dtype=F32)
        part_lse = meta(HEADS, num_splits, dtype=F32)
        kv_strides = (*cache.stride()[:3], *cache.stride()[:3])
        cases.append(
            Case(
                "attention",
                attention._decode_split_kernel,
                variant,
                (q1, cache, cache, part_out, part_lse, *q1.stride()[:2], *kv_strides),
                dict(
                    num_kv_heads=KV_HEADS,
                    num_keys=position + 1,
                    group=group,
                    split_tiles=split_tiles,
                    BLOCK_H=max(16, 1 << (group - 1).bit_length()),
                    BLOCK_N=tiling.block_n,
                    num_warps=tiling.decode_warps,
                    num_stages=tiling.num_stages,
                    **scalars,
                    **precision,
                ),
            )
        )
        cases.append(
            Case(
                "attention",
                attention._decode_merge_kernel,
                f"{num_splits} splits",
                (part_out, part_lse, q1, lse, *q1.stride()[:2], HEADS, num_splits),
                dict(
                    HEAD_DIM=HEAD_DIM,
                    BLOCK_D=scalars["BLOCK_D"],
                    BLOCK_S=1 << (num_splits - 1).bit_length(),
                    num_warps=tiling.decode_warps,
                ),
            )
        )
    return cases


def moe_cases(moe: Any) -> list[Case]:
    tiles = moe.default_tiles(torch.device("cuda"), DTYPE)
    gemm = moe._launch_options(tiles, DTYPE)
    slots = TOKENS  # top-1
    max_tiles = math.ceil(slots / tiles.block_m) + EXPERTS
    x = meta(TOKENS, HIDDEN)
    logits = meta(TOKENS, EXPERTS)
    bias = meta(EXPERTS)  # the selection bias buffer, cast to bf16 with the model
    experts = meta(TOKENS, 1, dtype=I64)
    scores = meta(TOKENS, 1)
    gate_up = meta(EXPERTS, HIDDEN, 2 * EXPERT_WIDTH)
    down = meta(EXPERTS, EXPERT_WIDTH, HIDDEN)
    h = meta(slots, EXPERT_WIDTH)
    preact = meta(slots, 2 * EXPERT_WIDTH)
    int32 = meta(max_tiles, dtype=I32)  # sorted slots, expert starts / ends, tile list, tile count
    block_experts = 1 << (EXPERTS - 1).bit_length()
    sort_block = max(16, moe.SORT_TILE // block_experts)
    route = dict(BLOCK_ROWS=moe.ROUTE_BLOCK_ROWS, BLOCK_EXPERTS=block_experts)
    dispatch = (int32, int32, int32, int32, int32, max_tiles)  # sorted_slots .. max_tiles

    def grouped(
        variant: str, a: Any, b: Any, b_strides: tuple, c: Any, inner: int, cols: int, **flags: Any
    ) -> Case:
        residual = flags.pop("residual", None)
        return Case(
            "moe",
            moe._grouped_matmul_kernel,
            variant,
            (
                a,
                a.stride(0),
                a.stride(1),
                b,
                *b_strides,
                c,
                c.stride(0),
                residual if residual is not None else c,
                residual.stride(0) if residual is not None else 0,
                residual.stride(1) if residual is not None else 0,
                preact,
                *dispatch,
                inner,
                cols,
            ),
            dict(TOP_K=1, ADD_RESIDUAL=residual is not None, GROUP_M=tiles.group_m, **flags, **gemm),
        )

    def weight_grad(variant: str, a: Any, b: Any, out: Any, **flags: Any) -> Case:
        return Case(
            "moe",
            moe._expert_weight_grad_kernel,
            variant,
            (
                a,
                a.stride(0),
                a.stride(1),
                b,
                b.stride(0),
                b.stride(1),
                out,
                *out.stride(),
                scores,
                int32,
                int32,
                int32,
                out.shape[1],
                out.shape[2],
            ),
            dict(TOP_K=1, **flags, **gemm),
        )

    gate_up_cases = [
        Case(
            "moe",
            moe._gate_up_kernel,
            "training" if store_preact else "inference",
            (
                x,
                *x.stride(),
                gate_up,
                *gate_up.stride(),
                h,
                preact,
                scores,
                *dispatch[:-1],
                max_tiles,
                HIDDEN,
                EXPERT_WIDTH,
            ),
            dict(TOP_K=1, STORE_PREACT=store_preact, GROUP_M=tiles.group_m, **gemm),
        )
        for store_preact in (False, True)
    ]

    return [
        Case(
            "moe",
            moe._route_kernel,
            "",
            (logits, *logits.stride(), bias, experts, scores, TOKENS, EXPERTS),
            dict(CHOICE_DTYPE=moe._TRITON_DTYPES[DTYPE], **route),
        ),
        Case(
            "moe",
            moe._route_backward_kernel,
            "",
            (logits, *logits.stride(), experts, scores, logits, TOKENS, EXPERTS),
            route,
        ),
        Case(
            "moe",
            moe._histogram_kernel,
            "",
            (experts, int32, slots, EXPERTS),
            dict(BLOCK=sort_block, BLOCK_EXPERTS=block_experts),
        ),
        Case(
            "moe",
            moe._scatter_kernel,
            "",
            (experts, int32, int32, slots, EXPERTS),
            dict(BLOCK=sort_block, BLOCK_EXPERTS=block_experts),
        ),
        Case(
            "moe",
            moe._tile_list_kernel,
            "",
            (int32, int32, int32, int32, int32),
            dict(BLOCK_M=tiles.block_m, BLOCK=moe.TILE_LIST_BLOCK),
        ),
        *gate_up_cases,
        grouped(
            "h @ down + shared",
            h,
            down,
            down.stride(),
            x,
            EXPERT_WIDTH,
            HIDDEN,
            residual=x,
            A_ROWS_BY_TOKEN=False,
            C_ROWS_BY_SLOT=True,
            SWIGLU_BACKWARD=False,
        ),
        grouped(
            "dout @ down^T, swiglu bwd",
            x,
            down,
            (down.stride(0), down.stride(2), down.stride(1)),
            preact,
            HIDDEN,
            EXPERT_WIDTH,
            A_ROWS_BY_TOKEN=True,
            C_ROWS_BY_SLOT=False,
            SWIGLU_BACKWARD=True,
        ),
        grouped(
            "dp @ gate_up^T",
            preact,
            gate_up,
            (gate_up.stride(0), gate_up.stride(2), gate_up.stride(1)),
            x,
            2 * EXPERT_WIDTH,
            HIDDEN,
            A_ROWS_BY_TOKEN=False,
            C_ROWS_BY_SLOT=True,
            SWIGLU_BACKWARD=False,
        ),
        weight_grad("d down", h, x, down, A_ROWS_BY_TOKEN=False, A_SCALED=False, B_ROWS_BY_TOKEN=True),
        weight_grad(
            "d gate_up", x, preact, gate_up, A_ROWS_BY_TOKEN=True, A_SCALED=True, B_ROWS_BY_TOKEN=False
        ),
        Case(
            "moe",
            moe._input_grad_kernel,
            "",
            (x, x, *x.stride(), scores, x, scores, HIDDEN),
            dict(
                TOP_K=1, BLOCK_K_SLOTS=1, BLOCK_D=min(moe.INPUT_GRAD_BLOCK_D, 1 << (HIDDEN - 1).bit_length())
            ),
        ),
    ]


@dataclass
class Result:
    case: Case
    ok: bool
    seconds: float
    num_warps: int | None = None
    num_stages: int | None = None
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    shared: int | None = None
    error: str = ""


def compile_case(case: Case, target: Any) -> Result:
    """Specialise the arguments as a launch does, compile to a cubin for ``target``, read its resources."""
    import triton
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = case.kernel
    start = time.perf_counter()
    log = io.StringIO()
    try:
        backend = make_backend(target)
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        bound_args, specialization, options = binder(*case.args, **case.kwargs)
        options, signature, constexprs, attrs = fn._pack_args(
            backend, case.kwargs, bound_args, specialization, options
        )
        with contextlib.redirect_stdout(log):  # ptxas' -v report is printed with dump_ptxas_log
            compiled = triton.compile(
                ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__
            )
    except Exception as error:  # any failure is reported, then the next kernel compiles
        detail = "".join(traceback.format_exception_only(type(error), error)).strip()
        return Result(case, False, time.perf_counter() - start, error=detail + "\n" + log.getvalue()[-4000:])

    if compiled.metadata.shared > SHARED_MEMORY_LIMIT:
        error = (
            f"needs {compiled.metadata.shared} B of shared memory; an H100 block has {SHARED_MEMORY_LIMIT}"
        )
        return Result(case, False, time.perf_counter() - start, error=error)
    report = log.getvalue()
    registers = re.search(r"Used (\d+) registers", report)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    return Result(
        case,
        True,
        time.perf_counter() - start,
        num_warps=compiled.metadata.num_warps,
        num_stages=compiled.metadata.num_stages,
        registers=int(registers.group(1)) if registers else None,
        spill_stores=int(spills.group(1)) if spills else None,
        spill_loads=int(spills.group(2)) if spills else None,
        shared=compiled.metadata.shared,
    )


def _cell(value: int | None) -> str:
    return "?" if value is None else str(value)


def print_table(results: list[Result]) -> None:
    header = ("file", "kernel", "variant", "warps", "stages", "regs", "spills (st/ld B)", "shared B", "s")
    rows = []
    for r in results:
        spills = f"{_cell(r.spill_stores)}/{_cell(r.spill_loads)}" if r.ok else "-"
        rows.append(
            (
                r.case.file,
                r.case.kernel.__name__,
                r.case.variant,
                _cell(r.num_warps),
                _cell(r.num_stages),
                _cell(r.registers) if r.ok else "FAILED",
                spills,
                _cell(r.shared) if r.ok else "-",
                f"{r.seconds:.1f}",
            )
        )
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=["rms_norm", "swiglu", "rope", "attention", "moe"])
    args = parser.parse_args()

    modules = _import_kernels()
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget

    knobs.nvidia.dump_ptxas_log = True  # ptxas' register and spill report, captured per kernel
    knobs.compilation.always_compile = True  # a cached kernel would skip ptxas, and its report
    target = GPUTarget("cuda", 90, 32)

    builders = dict(
        rms_norm=norm_cases, swiglu=swiglu_cases, rope=rope_cases, attention=attention_cases, moe=moe_cases
    )
    global DTYPE
    cases = []
    for dtype, names in ((BF16, builders), (F32, ["attention", "moe"])):
        DTYPE = dtype
        for name in names:
            if not args.only or name in args.only:
                for case in builders[name](modules[name]):
                    case.variant = f"{case.variant} {str(dtype).removeprefix('torch.')}".strip()
                    cases.append(case)
    print(
        f"triton {triton.__version__}, torch {torch.__version__}: {len(cases)} kernels for sm_90", flush=True
    )
    results = []
    for case in cases:
        result = compile_case(case, target)
        status = "ok" if result.ok else "FAILED"
        print(f"  {case.kernel.__name__} [{case.variant}]: {status} in {result.seconds:.1f} s", flush=True)
        results.append(result)
    print()
    print_table(results)
    failures = [r for r in results if not r.ok]
    for r in failures:
        print(f"\n{r.case.kernel.__name__} [{r.case.variant}] failed:\n{r.error}")
    if failures:
        print(f"\n{len(failures)} of {len(results)} kernels failed to compile")
        return 1
    print(f"\nall {len(results)} kernels compiled")
    return 0


if __name__ == "__main__":
    sys.exit(main())
