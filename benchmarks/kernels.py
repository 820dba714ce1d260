"""The fused backend's Triton kernels against the strongest peers, on one GPU, in one run.

Every peer is measured in the same process on the same card, on the Scout shapes of
``../shared/reference/anchors.md`` (bf16):

==========================  =====================================================================
work                        peers
==========================  =====================================================================
device copy, 1 GiB          the memory ceiling every memory-bound op is reported against
RMSNorm [16384, 5120]       plain torch (l4lab's eager op), ``F.rms_norm``, torch.compile, Liger
SwiGLU [16384, 8192]        plain torch, torch.compile, Liger
RoPE + QK norm              plain torch (complex multiply), torch.compile; q 8192 x 40 x 128, k x 8
attention, 40 / 8 heads     SDPA (flash) and FlexAttention: causal at T = 8192 and 32768 (NoPE
of 128                      layers), chunked causal at T = 32768, C = 8192 (RoPE layers: Flex with
                            its block mask, and SDPA chunk by chunk); decode against 131072 keys
MoE layer, 8192 tokens      transformers' Llama4TextMoe, sorted loop of matmuls (l4lab eager),
(5120, 8192, 16 experts)    ``torch._grouped_mm``, and the floor: two dense FFNs of the same FLOPs
whole model forward         l4lab eager, transformers; anchors' model, 1 x 8192 tokens, 1 and 16
                            experts
==========================  =====================================================================

Before timing, each fused op's output is checked against its eager reference (computed in float32
from the same bf16 inputs) on a freshly poisoned allocator, so an element the kernel never wrote shows
up as NaN. Times are medians of ``triton.testing.do_bench``; rates are bytes moved (read + write) per
second for memory-bound ops and useful FLOP per second for attention and GEMMs.

Goals (H100): RMSNorm and SwiGLU >= 95% of the copy ceiling (and at or above torch.compile, above
Liger); chunked attention >= 1.5x faster than FlexAttention with its block mask; global causal attention
>= 0.9x SDPA flash; the MoE layer within 1.15x of the two-dense-FFN floor and >= 6x faster than
transformers; a whole-model forward >= 2x the eager backend.

    python benchmarks/kernels.py                # on a GPU: check, time, print the table
    python benchmarks/kernels.py --write        # and write benchmarks/results/kernels-<card>.md
    python benchmarks/kernels.py --smoke        # anywhere: tiny shapes (CPU: Triton's interpreter), to
                                                # check that the script runs; its numbers mean nothing

On the GPU image, packages it lacks (plotly for ``import l4lab``, liger-kernel) travel as wheels:
``benchmarks/gpu_check.sh`` installs them, runs the kernel tests on the GPU, then this script.
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

import l4lab
from l4lab import kernels, ops
from l4lab.kernels import FUSED
from l4lab.model import MoE

RESULTS = Path(__file__).resolve().parent / "results"
CHECK_TOLERANCE = 3e-2  # relative to the reference's largest magnitude; bf16 inputs and outputs


# ---------------------------------------------------------------------- shapes
@dataclass(frozen=True)
class Shapes:
    rows: int = 16384
    hidden: int = 5120
    swiglu_width: int = 8192
    heads: int = 40
    kv_heads: int = 8
    head_dim: int = 128
    attention_lengths: tuple[int, ...] = (8192, 32768)
    chunk: int = 8192
    decode_keys: int = 131072
    moe_tokens: int = 8192
    moe_width: int = 8192
    experts: int = 16
    model: dict = field(
        default_factory=lambda: dict(
            vocab_size=32000,
            hidden_size=2048,
            num_layers=16,
            num_heads=16,
            num_kv_heads=4,
            head_dim=128,
            moe_intermediate_size=2048,
            dense_intermediate_size=4096,
            attention_chunk_size=2048,
        )
    )
    model_tokens: int = 8192
    copy_bytes: int = 1 << 30


SMOKE = Shapes(
    rows=24,
    hidden=48,
    swiglu_width=40,
    heads=4,
    kv_heads=2,
    head_dim=16,
    attention_lengths=(40,),
    chunk=16,
    decode_keys=48,
    moe_tokens=24,
    moe_width=32,
    experts=4,
    model=dict(
        vocab_size=64,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        moe_intermediate_size=32,
        dense_intermediate_size=64,
        attention_chunk_size=16,
    ),
    model_tokens=40,
    copy_bytes=1 << 16,
)


# ---------------------------------------------------------------------- measuring
@dataclass
class Row:
    work: str
    peer: str
    ms: float | None
    rate: str = ""
    note: str = ""


@dataclass
class Bench:
    device: str
    smoke: bool
    # bf16 on the GPU; fp16 in a smoke run on the CPU, where the interpreter's bf16 dot is wrong
    dtype: torch.dtype = torch.bfloat16
    rows: list[Row] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)
    goals: list[str] = field(default_factory=list)

    def time_ms(self, fn: Callable[[], object]) -> float:
        if self.device == "cuda":
            import triton.testing

            return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
        fn()
        samples = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e3)
        return statistics.median(samples)

    def measure(
        self, work: str, peer: str, fn: Callable[[], object], rate: Callable[[float], str]
    ) -> float | None:
        """Time ``fn``; a peer that fails (not installed, unsupported shape) is a row saying why."""
        try:
            ms = self.time_ms(fn)
        except Exception as error:  # a peer's failure is reported, not fatal: the others still count
            self.rows.append(Row(work, peer, None, note=f"failed: {type(error).__name__}: {error}"[:160]))
            return None
        self.rows.append(Row(work, peer, ms, rate(ms)))
        return ms

    def check(self, name: str, fused: Tensor, reference: Tensor) -> None:
        error = float((fused.float() - reference.float()).abs().max() / reference.float().abs().max())
        ok = math.isfinite(error) and error < CHECK_TOLERANCE
        self.checks.append(f"{name}: relative error {error:.2e} ({'ok' if ok else 'FAILED'})")

    def goal(self, text: str, value: float | None, target: float, higher_is_better: bool = True) -> None:
        if value is None:
            self.goals.append(f"{text}: not measured")
            return
        if self.smoke:
            self.goals.append(f"{text}: {value:.2f} (smoke run: not a measurement, goal not evaluated)")
            return
        met = value >= target if higher_is_better else value <= target
        self.goals.append(
            f"{text}: {value:.2f} (goal {'>=' if higher_is_better else '<='} {target}): "
            f"{'met' if met else 'MISSED'}"
        )


def bandwidth(num_bytes: float) -> Callable[[float], str]:
    return lambda ms: f"{num_bytes / ms / 1e9:.2f} TB/s"


def flops(count: float) -> Callable[[float], str]:
    return lambda ms: f"{count / ms / 1e9:.0f} TFLOP/s"


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    return None if numerator is None or denominator is None else numerator / denominator


def poisoned(device: str) -> None:
    """Fill the allocator's free memory with NaN so that an output element never written shows up."""
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        block = torch.full((int(free * 0.5) // 4,), float("nan"), device=device)
        del block


def compiled(fn: Callable, smoke: bool) -> Callable:
    """torch.compile, except in a smoke run (compiling on the CPU needs minutes and a C++ toolchain)."""
    if smoke:

        def not_compiled(*args: object) -> object:
            raise RuntimeError("torch.compile is skipped in a smoke run")

        return not_compiled
    return torch.compile(fn)


# ---------------------------------------------------------------------- memory-bound ops
def bench_copy(bench: Bench, shapes: Shapes) -> float:
    source = torch.randn(shapes.copy_bytes // 2, device=bench.device, dtype=bench.dtype)
    target = torch.empty_like(source)
    ms = bench.measure(
        "device copy", "Tensor.copy_", lambda: target.copy_(source), bandwidth(2 * shapes.copy_bytes)
    )
    assert ms is not None
    return 2 * shapes.copy_bytes / ms / 1e9  # TB/s


def liger() -> object | None:
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        return None
    import liger_kernel.ops.swiglu as swiglu_ops
    import liger_kernel.transformers.rms_norm as rms_norm_module

    return rms_norm_module, swiglu_ops


def bench_rms_norm(bench: Bench, shapes: Shapes, ceiling: float) -> None:
    x = torch.randn(shapes.rows, shapes.hidden, device=bench.device, dtype=bench.dtype)
    weight = 1 + 0.1 * torch.randn(shapes.hidden, device=bench.device, dtype=bench.dtype)
    eps = 1e-5
    poisoned(bench.device)
    bench.check("rms_norm", FUSED.rms_norm(x, weight, eps), ops.rms_norm(x.float(), weight.float(), eps))
    moved = bandwidth(2 * x.numel() * x.element_size())
    work = f"RMSNorm {list(x.shape)} forward"
    times = {
        "plain torch": bench.measure(work, "plain torch", lambda: ops.rms_norm(x, weight, eps), moved),
        "F.rms_norm": bench.measure(
            work, "F.rms_norm", lambda: F.rms_norm(x, (shapes.hidden,), weight, eps), moved
        ),
    }
    compiled_norm = compiled(ops.rms_norm, bench.smoke)
    times["torch.compile"] = bench.measure(
        work, "torch.compile", lambda: compiled_norm(x, weight, eps), moved
    )
    liger_modules = liger()
    if liger_modules is not None:
        liger_norm = liger_modules[0].LigerRMSNorm(shapes.hidden, eps=eps).to(bench.device, bench.dtype)
        liger_norm.weight.data.copy_(weight)
        times["Liger"] = bench.measure(work, "Liger-Kernel", lambda: liger_norm(x), moved)
    else:
        bench.rows.append(Row(work, "Liger-Kernel", None, note="not installed"))
    fused = bench.measure(work, "l4lab fused", lambda: FUSED.rms_norm(x, weight, eps), moved)
    if fused is not None:
        fraction = 2 * x.numel() * x.element_size() / fused / 1e9 / ceiling
        bench.goal("RMSNorm forward, fraction of the copy ceiling", fraction, 0.95)
    bench.goal("RMSNorm forward, torch.compile time / fused time", ratio(times["torch.compile"], fused), 1.0)
    bench.goal("RMSNorm forward, Liger time / fused time", ratio(times.get("Liger"), fused), 1.0)

    x_grad = x.clone().requires_grad_()
    weight_grad = weight.clone().requires_grad_()
    upstream = torch.randn_like(x)

    def forward_backward(norm: Callable[[Tensor, Tensor], Tensor]) -> Callable[[], object]:
        return lambda: torch.autograd.grad(norm(x_grad, weight_grad), (x_grad, weight_grad), upstream)

    work = f"RMSNorm {list(x.shape)} forward + backward"
    bench.measure(work, "plain torch", forward_backward(lambda a, w: ops.rms_norm(a, w, eps)), lambda ms: "")
    bench.measure(
        work, "torch.compile", forward_backward(lambda a, w: compiled_norm(a, w, eps)), lambda ms: ""
    )
    if liger_modules is not None:
        bench.measure(
            work,
            "Liger-Kernel",
            lambda: torch.autograd.grad(liger_norm(x_grad), (x_grad,), upstream),
            lambda ms: "",
        )
    bench.measure(
        work, "l4lab fused", forward_backward(lambda a, w: FUSED.rms_norm(a, w, eps)), lambda ms: ""
    )


def bench_swiglu(bench: Bench, shapes: Shapes, ceiling: float) -> None:
    gate = torch.randn(shapes.rows, shapes.swiglu_width, device=bench.device, dtype=bench.dtype)
    up = torch.randn_like(gate)
    poisoned(bench.device)
    bench.check("swiglu", FUSED.swiglu(gate, up), ops.swiglu(gate.float(), up.float()))
    num_bytes = 3 * gate.numel() * gate.element_size()
    moved = bandwidth(num_bytes)
    work = f"SwiGLU {list(gate.shape)} forward"
    bench.measure(work, "plain torch", lambda: ops.swiglu(gate, up), moved)
    compiled_swiglu = compiled(ops.swiglu, bench.smoke)
    compile_ms = bench.measure(work, "torch.compile", lambda: compiled_swiglu(gate, up), moved)
    liger_modules = liger()
    liger_ms = None
    if liger_modules is not None:
        liger_ms = bench.measure(
            work, "Liger-Kernel", lambda: liger_modules[1].LigerSiLUMulFunction.apply(gate, up), moved
        )
    else:
        bench.rows.append(Row(work, "Liger-Kernel", None, note="not installed"))
    fused = bench.measure(work, "l4lab fused", lambda: FUSED.swiglu(gate, up), moved)
    if fused is not None:
        bench.goal("SwiGLU forward, fraction of the copy ceiling", num_bytes / fused / 1e9 / ceiling, 0.95)
    bench.goal("SwiGLU forward, torch.compile time / fused time", ratio(compile_ms, fused), 1.0)
    bench.goal("SwiGLU forward, Liger time / fused time", ratio(liger_ms, fused), 1.0)


def bench_rope(bench: Bench, shapes: Shapes, ceiling: float) -> None:
    length = shapes.attention_lengths[0]
    q = torch.randn(1, length, shapes.heads, shapes.head_dim, device=bench.device, dtype=bench.dtype)
    k = torch.randn(1, length, shapes.kv_heads, shapes.head_dim, device=bench.device, dtype=bench.dtype)
    inverse = 1.0 / (500000.0 ** (torch.arange(0, shapes.head_dim, 2, device=bench.device) / shapes.head_dim))
    angles = torch.arange(length, device=bench.device)[:, None] * inverse[None, :]
    freqs_cis = torch.polar(torch.ones_like(angles), angles)
    poisoned(bench.device)
    fused_q, fused_k = FUSED.rope_qk_norm(q, k, freqs_cis, True, 1e-5)
    reference_q, reference_k = ops.rope_qk_norm(q.float(), k.float(), freqs_cis, True, 1e-5)
    bench.check("rope_qk_norm q", fused_q, reference_q)
    bench.check("rope_qk_norm k", fused_k, reference_k)
    num_bytes = 2 * (q.numel() + k.numel()) * q.element_size()
    moved = bandwidth(num_bytes)
    work = f"RoPE + QK norm, q {list(q.shape)}, k {list(k.shape)}"
    bench.measure(work, "plain torch", lambda: ops.rope_qk_norm(q, k, freqs_cis, True, 1e-5), moved)
    compiled_rope = compiled(ops.rope_qk_norm, bench.smoke)
    bench.measure(work, "torch.compile", lambda: compiled_rope(q, k, freqs_cis, True, 1e-5), moved)
    fused = bench.measure(work, "l4lab fused", lambda: FUSED.rope_qk_norm(q, k, freqs_cis, True, 1e-5), moved)
    if fused is not None:
        bench.goal("RoPE + QK norm, fraction of the copy ceiling", num_bytes / fused / 1e9 / ceiling, 0.9)


# ---------------------------------------------------------------------- attention
def flex_peer(length: int, chunk: int | None, smoke: bool, device: str) -> Callable | None:
    """FlexAttention (compiled) with a block mask of the causal or chunked-causal pattern."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def causal(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        return q >= kv

    def chunked(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        return (q >= kv) & (q // chunk == kv // chunk)

    block_size = 128 if not smoke else 16
    mask = create_block_mask(
        causal if chunk is None else chunked, None, None, length, length, device=device, BLOCK_SIZE=block_size
    )
    attend = flex_attention if smoke else torch.compile(flex_attention)
    return lambda q, k, v: attend(q, k, v, block_mask=mask, enable_gqa=True)


def sdpa_flash(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Tensor:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = [SDPBackend.FLASH_ATTENTION] if q.is_cuda else [SDPBackend.MATH]
    with sdpa_kernel(backends):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)


def bench_attention(bench: Bench, shapes: Shapes) -> None:
    def inputs(length: int) -> tuple[Tensor, Tensor, Tensor]:
        def make(heads: int) -> Tensor:
            return torch.randn(1, heads, length, shapes.head_dim, device=bench.device, dtype=bench.dtype)

        return make(shapes.heads), make(shapes.kv_heads), make(shapes.kv_heads)

    def reference(q: Tensor, k: Tensor, v: Tensor, query_start: int, chunk: int | None) -> Tensor:
        """Eager attention in float32 with the kv heads repeated (SDPA's memory-efficient kernel)."""
        group = q.shape[1] // k.shape[1]
        k, v = (t.float().repeat_interleave(group, dim=1) for t in (k, v))
        return ops.attention(q.float(), k, v, query_start, 0, chunk, None, False)[0]

    def fused_attention(chunk: int | None) -> Callable:
        return lambda q, k, v: FUSED.attention(q, k, v, 0, 0, chunk, None, False)[0]

    for length in shapes.attention_lengths:
        q, k, v = inputs(length)
        causal_flops = 4 * shapes.heads * shapes.head_dim * length * (length + 1) / 2
        work = f"attention causal, T = {length}"
        poisoned(bench.device)
        bench.check(work, fused_attention(None)(q, k, v), reference(q, k, v, 0, None))
        sdpa_ms = bench.measure(
            work, "SDPA (flash)", lambda q=q, k=k, v=v: sdpa_flash(q, k, v, True), flops(causal_flops)
        )
        flex = flex_peer(length, None, bench.smoke, bench.device)
        bench.measure(
            work, "FlexAttention", lambda q=q, k=k, v=v, flex=flex: flex(q, k, v), flops(causal_flops)
        )
        fused_ms = bench.measure(
            work, "l4lab fused", lambda q=q, k=k, v=v: fused_attention(None)(q, k, v), flops(causal_flops)
        )
        bench.goal(
            f"global causal attention T = {length}, SDPA time / fused time", ratio(sdpa_ms, fused_ms), 0.9
        )

    length, chunk = shapes.attention_lengths[-1], shapes.chunk
    q, k, v = inputs(length)
    chunk_flops = sum(
        4 * shapes.heads * shapes.head_dim * n * (n + 1) / 2
        for n in [min(chunk, length - start) for start in range(0, length, chunk)]
    )
    work = f"attention chunked causal, T = {length}, C = {chunk}"
    poisoned(bench.device)
    bench.check(work, fused_attention(chunk)(q, k, v), reference(q, k, v, 0, chunk))
    flex = flex_peer(length, chunk, bench.smoke, bench.device)
    flex_ms = bench.measure(work, "FlexAttention, block mask", lambda: flex(q, k, v), flops(chunk_flops))
    bench.measure(
        work,
        "SDPA per chunk (l4lab eager)",
        lambda: ops.attention(q, k, v, 0, 0, chunk, None, False),
        flops(chunk_flops),
    )
    fused_ms = bench.measure(work, "l4lab fused", lambda: fused_attention(chunk)(q, k, v), flops(chunk_flops))
    bench.goal("chunked attention, FlexAttention time / fused time", ratio(flex_ms, fused_ms), 1.5)

    # decode: one query against a long cache (a NoPE layer sees every cached key)
    keys = shapes.decode_keys
    q = torch.randn(1, shapes.heads, 1, shapes.head_dim, device=bench.device, dtype=bench.dtype)
    _, k, v = inputs(keys)
    work = f"decode attention, 1 query vs {keys} cached keys"
    poisoned(bench.device)
    bench.check(
        work,
        FUSED.attention(q, k, v, keys - 1, 0, None, None, False)[0],
        reference(q, k, v, keys - 1, None),
    )
    kv_bytes = bandwidth(2 * k.numel() * k.element_size())
    bench.measure(work, "SDPA", lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), kv_bytes)
    bench.measure(
        work, "l4lab fused", lambda: FUSED.attention(q, k, v, keys - 1, 0, None, None, False), kv_bytes
    )

    # forward + backward, causal
    length = shapes.attention_lengths[0]
    q, k, v = (t.requires_grad_() for t in inputs(length))
    upstream = torch.randn_like(q)
    work = f"attention causal forward + backward, T = {length}"
    bench.measure(
        work,
        "SDPA (flash)",
        lambda: torch.autograd.grad(sdpa_flash(q, k, v, True), (q, k, v), upstream),
        lambda ms: "",
    )
    bench.measure(
        work,
        "l4lab fused",
        lambda: torch.autograd.grad(fused_attention(None)(q, k, v), (q, k, v), upstream),
        lambda ms: "",
    )


# ---------------------------------------------------------------------- mixture of experts
def bench_moe(bench: Bench, shapes: Shapes) -> None:
    from transformers import Llama4TextConfig
    from transformers.models.llama4.modeling_llama4 import Llama4TextMoe

    hidden, width, experts, tokens = shapes.hidden, shapes.moe_width, shapes.experts, shapes.moe_tokens
    hf_config = Llama4TextConfig(
        hidden_size=hidden, intermediate_size=width, num_local_experts=experts, num_experts_per_tok=1
    )
    with torch.device(bench.device):  # built where it runs: GBs of weights are not drawn on the CPU
        reference = Llama4TextMoe(hf_config)
    torch.manual_seed(0)
    with torch.no_grad():
        for param in reference.parameters():  # gate_up_proj starts at zero: draw every weight
            param.copy_(torch.randn_like(param) * param.shape[-2] ** -0.5)
    reference = reference.to(bench.dtype)

    config = l4lab.Config(
        vocab_size=16,
        hidden_size=hidden,
        num_layers=1,
        num_heads=1,
        num_kv_heads=1,
        head_dim=16,
        moe_intermediate_size=width,
        dense_intermediate_size=width,
        num_experts=experts,
        top_k=1,
    )
    with torch.device(bench.device):
        layer = MoE(config, layer=0)
    missing, unexpected = layer.load_state_dict(reference.state_dict(), strict=False)
    assert not unexpected and set(missing) <= {"router.selection_bias"}, (missing, unexpected)
    layer = layer.to(bench.device, bench.dtype)
    x = torch.randn(tokens, hidden, device=bench.device, dtype=bench.dtype)

    def l4lab_layer(backend: str) -> Callable[[], Tensor]:
        table = ops.ops_for(backend)

        def run() -> Tensor:
            for module in layer.modules():
                if hasattr(module, "ops"):
                    module.ops = table
            return layer(x)[0]

        return run

    with torch.no_grad():
        poisoned(bench.device)
        expected = reference(x)[0]
        bench.check("MoE layer, fused vs transformers", l4lab_layer("fused")(), expected)
        bench.check("MoE layer, eager vs transformers", l4lab_layer("eager")(), expected)

        # the same FLOPs as dense: routed (one expert per token) + shared = two SwiGLU FFNs over every token
        floor_up = torch.randn(hidden, 2 * width, device=bench.device, dtype=bench.dtype) * hidden**-0.5
        floor_down = torch.randn(width, hidden, device=bench.device, dtype=bench.dtype) * width**-0.5

        def two_dense_ffns() -> Tensor:
            out = None
            for _ in range(2):
                gate, up = (x @ floor_up).chunk(2, dim=-1)
                y = (F.silu(gate) * up) @ floor_down
                out = y if out is None else out + y
            return out

        grouped_weights = (layer.experts.gate_up_proj, layer.experts.down_proj)

        def grouped_mm() -> Tensor:
            experts_chosen, scores, _ = layer.router(x)
            order = torch.argsort(experts_chosen[:, 0])
            offsets = torch.bincount(experts_chosen[:, 0], minlength=experts).cumsum(0).to(torch.int32)
            rows = x.index_select(0, order) * scores.index_select(0, order)
            gate, up = torch._grouped_mm(rows, grouped_weights[0], offs=offsets).chunk(2, dim=-1)
            routed = torch._grouped_mm(F.silu(gate) * up, grouped_weights[1], offs=offsets)
            out = layer.shared_expert(x)
            return out.index_add_(0, order, routed)

        moe_flops = flops(2 * 2 * tokens * 3 * hidden * width)
        work = (
            f"MoE layer, {tokens} tokens, hidden {hidden}, width {width}, {experts} experts, top-1 + shared"
        )
        transformers_ms = bench.measure(work, "transformers Llama4TextMoe", lambda: reference(x), moe_flops)
        bench.measure(work, "sorted loop of matmuls (l4lab eager)", l4lab_layer("eager"), moe_flops)
        bench.measure(work, "torch._grouped_mm", grouped_mm, moe_flops)
        floor_ms = bench.measure(work, "two dense FFNs, same FLOPs (floor)", two_dense_ffns, moe_flops)
        fused_ms = bench.measure(work, "l4lab fused", l4lab_layer("fused"), moe_flops)
        bench.goal("MoE layer, fused time / two-dense-FFN floor", ratio(fused_ms, floor_ms), 1.15, False)
        bench.goal("MoE layer, transformers time / fused time", ratio(transformers_ms, fused_ms), 6.0)


# ---------------------------------------------------------------------- whole model
def bench_model(bench: Bench, shapes: Shapes) -> None:
    for experts in (1, shapes.experts):
        bench_model_with(bench, shapes, experts)


def bench_model_with(bench: Bench, shapes: Shapes, experts: int) -> None:
    """Whole-model forward: transformers (sdpa), l4lab eager and l4lab fused on the same weights."""
    import transformers

    config = l4lab.Config(**shapes.model, num_experts=experts, top_k=1, moe_layer_step=1)
    hf_config = transformers.Llama4TextConfig(**l4lab.to_transformers_config(config))
    hf_config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(bench.device):  # built where it runs: GBs of weights are not drawn on the CPU
        hf_model = transformers.Llama4ForCausalLM(hf_config)
    with torch.no_grad():  # gate_up_proj starts at zero: draw every weight
        for name, param in hf_model.named_parameters():
            param.copy_(
                1.0 + 0.1 * torch.randn_like(param) if "norm" in name else 0.02 * torch.randn_like(param)
            )
    hf_model = hf_model.to(bench.dtype).eval()
    model = l4lab.from_transformers(hf_model).eval()
    tokens = torch.randint(0, config.vocab_size, (1, shapes.model_tokens), device=bench.device)

    def forward(backend: str) -> Callable[[], Tensor]:
        def run() -> Tensor:
            model.set_backend(backend)
            return model(tokens).logits

        return run

    def rate(ms: float) -> str:
        return f"{shapes.model_tokens / ms * 1e3:,.0f} tok/s"

    with torch.no_grad():
        poisoned(bench.device)
        bench.check(
            f"model logits, {experts} expert(s), fused vs eager", forward("fused")(), forward("eager")()
        )
        work = f"whole model forward, {experts} expert(s), 1 x {shapes.model_tokens} tokens"
        bench.measure(work, "transformers (sdpa)", lambda: hf_model(tokens).logits, rate)
        eager_ms = bench.measure(work, "l4lab eager", forward("eager"), rate)
        fused_ms = bench.measure(work, "l4lab fused", forward("fused"), rate)
    bench.goal(
        f"whole model forward, {experts} expert(s), eager time / fused time", ratio(eager_ms, fused_ms), 2.0
    )


# ---------------------------------------------------------------------- report
def header(bench: Bench) -> list[str]:
    import transformers
    import triton

    card = (
        torch.cuda.get_device_name()
        if bench.device == "cuda"
        else f"CPU ({platform.processor() or 'unknown'})"
    )
    lines = [
        "# Fused kernels vs peers"
        + (" (SMOKE RUN: tiny shapes, numbers meaningless)" if bench.smoke else ""),
        "",
        f"- {datetime.date.today()}; {card}; torch {torch.__version__}, triton {triton.__version__}, "
        f"transformers {transformers.__version__}" + ("; Triton interpreter" if kernels.INTERPRETED else ""),
        "- bf16; medians of triton.testing.do_bench; every peer measured in this run",
        "",
    ]
    return lines


def report(bench: Bench) -> str:
    lines = header(bench)
    lines += ["## Checks (fused output vs eager reference in float32, allocator poisoned with NaN)", ""]
    lines += [f"- {check}" for check in bench.checks] + ["", "| work | peer | time (ms) | rate | note |"]
    lines += ["|---|---|---:|---:|---|"]
    for row in bench.rows:
        ms = "-" if row.ms is None else f"{row.ms:.3f}"
        lines.append(f"| {row.work} | {row.peer} | {ms} | {row.rate} | {row.note} |")
    lines += ["", "## Goals", ""] + [f"- {goal}" for goal in bench.goals]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--smoke", action="store_true", help="tiny shapes, any device: checks the script runs"
    )
    parser.add_argument("--write", action="store_true", help="write the table under benchmarks/results/")
    parser.add_argument(
        "--only",
        nargs="*",
        default=["norm", "swiglu", "rope", "attention", "moe", "model"],
        help="which groups to run",
    )
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.smoke:
        parser.error(
            "no GPU here: the goals are for an H100; run with --smoke to check the script on the CPU"
        )
    shapes = SMOKE if args.smoke else Shapes()
    torch.manual_seed(0)
    bench = Bench(device, args.smoke, torch.bfloat16 if device == "cuda" else torch.float16)
    ceiling = bench_copy(bench, shapes)
    groups = {
        "norm": lambda: bench_rms_norm(bench, shapes, ceiling),
        "swiglu": lambda: bench_swiglu(bench, shapes, ceiling),
        "rope": lambda: bench_rope(bench, shapes, ceiling),
        "attention": lambda: bench_attention(bench, shapes),
        "moe": lambda: bench_moe(bench, shapes),
        "model": lambda: bench_model(bench, shapes),
    }
    for name in args.only:
        groups[name]()
        print(f"[{name} done]", flush=True)
    text = report(bench)
    print(text)
    if args.write:
        card = torch.cuda.get_device_name().replace(" ", "-") if device == "cuda" else "cpu-smoke"
        path = RESULTS / f"kernels-{card}-{datetime.date.today()}.md"
        path.write_text(text)
        print(f"written: {path}")


if __name__ == "__main__":
    main()
