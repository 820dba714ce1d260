"""Long prompts through the KV cache: iRoPE against RoPE everywhere, measured, then scaled to Scout.

``Llama4.prefill`` reads a prompt in blocks through the KV cache. This script reads 16K, 64K and 128K
random tokens that way with two 5-layer models that share every weight shape and differ only in
``positions``: iRoPE (layers 0-2 and 4 RoPE chunked with C = 1024, layer 3 NoPE global)
and RoPE with global attention in every layer (Llama 3). The last layer computes only the last query
of each block (all a prefill needs from it), so the time per layer type is taken over layers 0-3.
Each (model, length) runs in its own process, so that its peak resident memory (``ru_maxrss``) is its
own. Per run it records:

* wall time of the prefill, and per layer (forward hooks), summed per layer type;
* the KV cache bytes each layer holds at the end;
* peak RSS of the process.

From the times it fits the growth exponent per layer type (chunked layers should grow like T, i.e.
O(T x C) at fixed C; global layers like T^2), and from the measured cost of one global and one
chunked layer it extrapolates to Llama 4 Scout's shape (40 query heads, 8 KV heads, head_dim 128, 36
chunked + 12 global layers, bf16 cache) at 256K and 10M tokens. Results:
``benchmarks/results/long_prefill.{json,md}``::

    OMP_NUM_THREADS=2 python benchmarks/long_prefill.py     # 16K, 64K, 128K, both models (~10 min)
    python benchmarks/long_prefill.py --lengths 4096,16384 --rope-max 4096  # a quick look
    python benchmarks/long_prefill.py --lengths 16384,65536 --keep  # re-run these, keep the others
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

import l4lab

from machine import machine
from recording import write_summary

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "long_prefill"
MODEL = dict(
    vocab_size=256,
    hidden_size=64,
    num_layers=5,
    num_heads=2,
    num_kv_heads=1,
    head_dim=32,
    dense_intermediate_size=128,
    ffn="dense",
    nope_layer_interval=4,
    attention_chunk_size=1024,  # T >> C at the lengths a shared CPU measures; scaled to Scout's 8192
    floor_scale=8192,
    bos_token_id=None,
    eos_token_id=None,
)
BLOCK = 1024
SCOUT = dict(
    layers_chunked=36, layers_global=12, heads=40, kv_heads=8, head_dim=128, chunk=8192, cache_bytes=2
)


def measure(positions: str, length: int) -> dict:
    """One prefill of ``length`` tokens (run in a child process by :func:`main`)."""
    config = l4lab.preset("tiny", **MODEL, positions=positions, max_position_embeddings=length)
    torch.manual_seed(0)
    model = l4lab.Llama4(config).eval()
    ids = torch.randint(0, config.vocab_size, (1, length), generator=torch.Generator().manual_seed(1))
    layer_seconds = [0.0] * config.num_layers
    started: dict[int, float] = {}

    def before(index: int):
        return lambda module, args: started.__setitem__(index, time.perf_counter())

    def after(index: int):
        def hook(module, args, output) -> None:
            layer_seconds[index] += time.perf_counter() - started[index]

        return hook

    for i, layer in enumerate(model.layers):
        layer.register_forward_pre_hook(before(i))
        layer.register_forward_hook(after(i))
    begin = time.perf_counter()
    _, cache = model.prefill(ids, block_size=BLOCK)
    seconds = time.perf_counter() - begin
    plan = config.layer_plan()
    return {
        "positions": positions,
        "length": length,
        "seconds": seconds,
        "layers": [
            {
                "kind": "chunked" if spec.chunk_size else "global",
                "seconds": layer_seconds[spec.index],
                "cache_keys": cache.layers[spec.index].length,
                "cache_bytes": cache.layers[spec.index].nbytes(),
            }
            for spec in plan
        ],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "load_average_1min": os.getloadavg()[0],  # > threads: other jobs shared the cores
    }


def per_kind(run: dict, kind: str) -> float:
    """Mean seconds of one layer of ``kind`` in ``run``, the last layer (one query per block) left out."""
    times = [layer["seconds"] for layer in run["layers"][:-1] if layer["kind"] == kind]
    return sum(times) / len(times)


def exponent(runs: list[dict], positions: str, kind: str) -> float | None:
    """Least-squares slope of log(seconds per layer) against log(T): the growth exponent."""
    points = [
        (math.log(r["length"]), math.log(per_kind(r, kind))) for r in runs if r["positions"] == positions
    ]
    points = [p for p in points if math.isfinite(p[1])]
    if len(points) < 2:
        return None
    mx = sum(x for x, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    return sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)


def scout_extrapolation(runs: list[dict]) -> dict:
    """Scout's prefill attention cost and KV cache at 256K and 10M, from the largest measured iRoPE run.

    A global layer's time is scaled by (T'/T)^2 and by Scout's heads x head_dim over ours; a chunked
    layer's by T'/T, by Scout's chunk over ours (its cost is T x C) and the same width ratio. The
    cache: a global layer holds T keys and values, a chunked one less than C.
    """
    irope = max((r for r in runs if r["positions"] == "irope"), key=lambda r: r["length"])
    width = (SCOUT["heads"] * SCOUT["head_dim"]) / (MODEL["num_heads"] * MODEL["head_dim"])
    per_token = 2 * SCOUT["kv_heads"] * SCOUT["head_dim"] * SCOUT["cache_bytes"]  # K and V, one layer
    out = {}
    for target in (256 * 1024, 10 * 1024 * 1024):
        ratio = target / irope["length"]
        global_s = per_kind(irope, "global") * ratio**2 * width
        chunked_s = (
            per_kind(irope, "chunked") * ratio * width * SCOUT["chunk"] / MODEL["attention_chunk_size"]
        )
        out[str(target)] = {
            "global_layer_seconds": global_s,
            "chunked_layer_seconds": chunked_s,
            "irope_seconds": SCOUT["layers_global"] * global_s + SCOUT["layers_chunked"] * chunked_s,
            "rope_everywhere_seconds": (SCOUT["layers_global"] + SCOUT["layers_chunked"]) * global_s,
            "global_layer_cache_gb": target * per_token / 1e9,
            "chunked_layer_cache_gb": (SCOUT["chunk"] - 1) * per_token / 1e9,
            "irope_cache_gb": (
                SCOUT["layers_global"] * target + SCOUT["layers_chunked"] * (SCOUT["chunk"] - 1)
            )
            * per_token
            / 1e9,
            "rope_everywhere_cache_gb": 48 * target * per_token / 1e9,
        }
    return {"from": {"positions": "irope", "length": irope["length"]}, "width_ratio": width, "targets": out}


def markdown(summary: dict) -> str:
    info = summary["machine"]
    lines = [
        "# Streaming prefill of long prompts: iRoPE vs RoPE everywhere",
        "",
        f"- benchmarks/long_prefill.py; {info['date']}; torch {info['torch']}, Python {info['python']}, "
        f"CPU {info['cpu']}, {info['threads']} threads; "
        "a machine shared with other jobs (load column: the 1-minute load average at the end of a run; "
        "above the thread count, times are upper bounds)",
        f"- model: {MODEL}; float32; `Llama4.prefill` in blocks of {BLOCK} tokens; one process per run",
        "",
        "| model | T | wall s | s per chunked layer | s per global layer | KV cache per layer (MB) "
        "| peak RSS (MB) | load (1 min) |",
        "|---|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in summary["runs"]:
        chunked = [layer for layer in r["layers"][:-1] if layer["kind"] == "chunked"]
        cache = ", ".join(f"{layer['cache_bytes'] / 1e6:.2f}" for layer in r["layers"])
        lines.append(
            f"| {r['positions']} | {r['length']:,} | {r['seconds']:.1f} | "
            + (f"{per_kind(r, 'chunked'):.2f}" if chunked else "-")
            + f" | {per_kind(r, 'global'):.2f} | {cache} | {r['peak_rss_mb']:.0f} "
            + f"| {r['load_average_1min']:.1f} |"
        )
    lines += ["", "Growth exponent of the time per layer in T (least squares over the lengths measured):"]
    for key, value in summary["exponents"].items():
        lines.append(f"- {key}: {'-' if value is None else f'{value:.2f}'}")
    scout = summary["scout"]
    lines += [
        "",
        f"Extrapolated to Scout's attention shape (x{scout['width_ratio']:.0f} our heads x head_dim; "
        "36 chunked + 12 global layers; bf16 cache) from the iRoPE run at "
        f"{scout['from']['length']:,} tokens, this CPU:",
        "",
        "| T | one global layer | one chunked layer | iRoPE, all 48 layers | RoPE everywhere "
        "| KV cache iRoPE | KV cache RoPE everywhere |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for target, e in scout["targets"].items():
        lines.append(
            f"| {int(target):,} | {e['global_layer_seconds']:.3g} s | {e['chunked_layer_seconds']:.3g} s | "
            f"{e['irope_seconds']:.3g} s | {e['rope_everywhere_seconds']:.3g} s | "
            f"{e['irope_cache_gb']:.3g} GB | {e['rope_everywhere_cache_gb']:.3g} GB |"
        )
    lines += [
        "",
        "Attention only (projections and experts grow like T in both models and are left out). The global",
        "layers pay: their time grows like T^2 and their cache like T; a chunked layer's cache stays under",
        f"one chunk ({MODEL['attention_chunk_size'] - 1} tokens here, 8191 in Scout) and its time grows "
        "like T.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="16384,65536,131072")
    parser.add_argument("--rope-max", type=int, default=131072, help="longest prompt for RoPE everywhere")
    parser.add_argument(
        "--keep", action="store_true", help="keep the committed runs of (model, length) pairs not re-run"
    )
    parser.add_argument("--child", nargs=2, metavar=("POSITIONS", "LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child[0], int(args.child[1]))))
        return 0
    measured = []
    for length in [int(n) for n in args.lengths.split(",")]:
        for positions in ("irope", "rope"):
            if positions == "rope" and length > args.rope_max:
                continue
            child = [sys.executable, __file__, "--child", positions, str(length)]
            out = subprocess.run(child, check=True, capture_output=True, text=True)
            run = json.loads(out.stdout)
            measured.append(run)
            print(f"{positions} {length}: {run['seconds']:.1f} s, {run['peak_rss_mb']:.0f} MB", flush=True)
    runs = measured
    if args.keep and RESULTS.with_suffix(".json").is_file():  # earlier runs this call did not repeat
        new = {(r["positions"], r["length"]) for r in measured}
        earlier = json.loads(RESULTS.with_suffix(".json").read_text())["runs"]
        runs = sorted(
            [r for r in earlier if (r["positions"], r["length"]) not in new] + measured,
            key=lambda r: (r["length"], r["positions"] != "irope"),
        )
    summary = {
        "machine": machine(),
        "runs": runs,
        "exponents": {
            f"{positions}, {kind} layers": exponent(runs, positions, kind)
            for positions, kind in (("irope", "chunked"), ("irope", "global"), ("rope", "global"))
        },
        "scout": scout_extrapolation(runs),
    }
    write_summary(RESULTS, summary, markdown(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
