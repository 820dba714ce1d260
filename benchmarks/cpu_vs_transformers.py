"""CPU throughput of l4lab (eager backend) against transformers' ``Llama4ForCausalLM``.

What it measures: tokens per second of a forward pass (under ``torch.no_grad()``) and of a training step
(forward + next-token cross-entropy computed from the logits by the same code for both + backward +
``torch.optim.AdamW`` step), for l4lab and for transformers on the SAME configuration and the SAME
weights (transformers' model is re-initialised at random, then copied into l4lab with
``l4lab.from_transformers``), at 1, 4 and 16 experts, all in one run. Before timing, the two models'
logits are compared on a short input.

The shape follows the project's anchors: hidden 256, 8 layers, 8 query / 2 key-value heads of 32,
expert width 512, dense width 1024 (unused: every layer is MoE), top-1 routing, NoPE every 4th layer,
attention chunk 8192 (longer than the sequence, so chunking never cuts), temperature tuning with
floor_scale 8192, QK norm, RoPE theta 500000, batch 8 x 512 tokens, float32, transformers on "sdpa".
The vocabulary is 16384 by default: of 260, 8192, 16384 and 32000, it reproduces the anchors'
transformers numbers (forward ~4,800 / 3,950 / 1,170 and training ~2,040 / 1,010 / 256 tok/s at
1 / 4 / 16 experts on 2 cores) best; at 32000 the output head and the loss make transformers' 1-expert
training ~1,170 tok/s, far below the anchor. ``--vocab`` changes it; the table header states it.

Timing: one warm-up call of each model, then N rounds that time transformers and l4lab alternately,
and the median per model (tokens per second = batch x seq / median seconds).

transformers' ``Llama4TextMoe`` runs every token through every expert (zero scores for the unchosen
ones), so its MoE cost grows with the number of experts; l4lab sorts tokens by expert and multiplies
each expert's own rows only, so its cost does not.

Goals: l4lab >= 1.0x transformers everywhere; at 16 experts >= 3x on the forward pass and >= 4x on the
training step.

    .venv/bin/python benchmarks/cpu_vs_transformers.py                # print the table
    .venv/bin/python benchmarks/cpu_vs_transformers.py --write        # and write benchmarks/results/
"""

from __future__ import annotations

import argparse
import datetime
import gc
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from torch import Tensor, nn
from transformers import Llama4ForCausalLM, Llama4TextConfig

import l4lab

from machine import cpu_model

RESULTS = Path(__file__).resolve().parent / "results" / "cpu_vs_transformers.md"
PARITY_TOLERANCE = 1e-4
GOAL_EVERYWHERE = 1.0
GOAL_FORWARD_16 = 3.0
GOAL_TRAIN_16 = 4.0

Forward = Callable[[Tensor], Tensor]


# ---------------------------------------------------------------------- models
def transformers_config(num_experts: int, vocab_size: int) -> Llama4TextConfig:
    """The anchors' shape as a transformers config (every layer MoE, top-1, sdpa attention)."""
    config = Llama4TextConfig(
        vocab_size=vocab_size,
        hidden_size=256,
        intermediate_size=512,
        intermediate_size_mlp=1024,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=32,
        num_local_experts=num_experts,
        num_experts_per_tok=1,
        interleave_moe_layer_step=1,
        no_rope_layer_interval=4,
        attention_chunk_size=8192,
        attn_temperature_tuning=True,
        floor_scale=8192,
        attn_scale=0.1,
        use_qk_norm=True,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        max_position_embeddings=8192,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
    )
    config._attn_implementation = "sdpa"
    return config


@torch.no_grad()
def reinitialise(model: nn.Module, std: float = 0.02) -> None:
    """Normal(0, std) on every weight, ones on the norms.

    transformers starts ``Llama4TextExperts.gate_up_proj`` at zeros, which would make every expert
    output zero (and identical); re-drawing everything gives experts real work and distinct weights.
    """
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        else:
            param.normal_(0.0, std)


def build_pair(num_experts: int, vocab_size: int, seed: int) -> tuple[nn.Module, l4lab.Llama4]:
    """A transformers model with random weights and the l4lab model holding a copy of them."""
    torch.manual_seed(seed)
    hf_model = Llama4ForCausalLM(transformers_config(num_experts, vocab_size)).float()
    reinitialise(hf_model)
    attn = hf_model.config._attn_implementation
    if attn != "sdpa":
        raise RuntimeError(f"transformers model runs attention with {attn!r}, not 'sdpa'")
    model = l4lab.from_transformers(hf_model)
    model.set_backend("eager")
    return hf_model, model


def hf_forward(hf_model: nn.Module) -> Forward:
    return lambda ids: hf_model(input_ids=ids, use_cache=False).logits


def l4lab_forward(model: l4lab.Llama4) -> Forward:
    return lambda ids: model(ids).logits


# ---------------------------------------------------------------------- parity
@torch.no_grad()
def parity(hf_model: nn.Module, model: l4lab.Llama4, vocab_size: int) -> float:
    """max |l4lab - transformers| / max |transformers| over the logits of a short batch."""
    hf_model.eval()
    model.eval()
    ids = torch.randint(0, vocab_size, (2, 64), generator=torch.Generator().manual_seed(1))
    reference = hf_forward(hf_model)(ids)
    ours = l4lab_forward(model)(ids)
    return float((ours - reference).abs().max() / reference.abs().max())


# ---------------------------------------------------------------------- timing
def next_token_loss(logits: Tensor, ids: Tensor) -> Tensor:
    """Mean cross-entropy of predicting token t + 1 from positions <= t (same code for both models)."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


def interleaved_medians(steps: dict[str, Callable[[], object]], iterations: int) -> dict[str, float]:
    """One warm-up call of each step, then ``iterations`` rounds timing each step once per round;
    the median wall time of each.

    Alternating the two models round by round means that a slow spell of the machine (a shared,
    2-core VM) slows both, so their ratio stays meaningful even when the absolute numbers wobble.
    """
    for step in steps.values():
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(iterations):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def forward_step(module: nn.Module, forward: Forward, ids: Tensor) -> Callable[[], None]:
    """A forward pass under ``torch.no_grad()``, in eval mode."""
    module.eval()

    def step() -> None:
        with torch.no_grad():
            forward(ids)

    return step


def train_step(module: nn.Module, forward: Forward, ids: Tensor) -> Callable[[], None]:
    """Forward, next-token loss, backward and an AdamW step, in train mode."""
    module.train()
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        next_token_loss(forward(ids), ids).backward()
        optimizer.step()

    return step


def tokens_per_second(
    models: dict[str, tuple[nn.Module, Forward]],
    ids: Tensor,
    iterations: int,
    make_step: Callable[[nn.Module, Forward, Tensor], Callable[[], None]],
) -> dict[str, float]:
    steps = {name: make_step(module, forward, ids) for name, (module, forward) in models.items()}
    seconds = interleaved_medians(steps, iterations)
    return {name: ids.numel() / value for name, value in seconds.items()}


# ---------------------------------------------------------------------- report
def header(args: argparse.Namespace) -> list[str]:
    today = datetime.date.today().isoformat()
    return [
        "# l4lab (eager) vs transformers Llama4ForCausalLM on CPU",
        "",
        f"- {today}; torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{torch.get_num_threads()} threads, CPU: {cpu_model()}",
        f"- shape: vocab {args.vocab}, hidden 256, 8 layers (all MoE, top-1), 8 heads / 2 kv heads of 32, "
        f"expert width 512, NoPE every 4th layer, chunk 8192, QK norm, temperature tuning (floor 8192); "
        f"batch {args.batch} x {args.seq} tokens, float32, transformers attention 'sdpa'",
        f"- median of {args.forward_iters} forward / {args.train_iters} training iterations (the two "
        "models alternating) after one warm-up; training step = forward + next-token cross-entropy "
        "+ backward + AdamW",
        "- goals: l4lab >= 1.0x everywhere; >= 3x forward and >= 4x training at 16 experts",
        "",
    ]


def table(rows: list[dict[str, float]]) -> list[str]:
    lines = [
        "| experts | forward tok/s transformers | forward tok/s l4lab | ratio "
        "| train tok/s transformers | train tok/s l4lab | ratio |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {int(r['experts'])} | {r['fwd_hf']:,.0f} | {r['fwd_l4']:,.0f} "
            f"| {r['fwd_l4'] / r['fwd_hf']:.2f}x | {r['train_hf']:,.0f} | {r['train_l4']:,.0f} "
            f"| {r['train_l4'] / r['train_hf']:.2f}x |"
        )
    return lines


def goals(rows: list[dict[str, float]]) -> list[str]:
    lines = []
    for r in rows:
        fwd, train = r["fwd_l4"] / r["fwd_hf"], r["train_l4"] / r["train_hf"]
        need_fwd, need_train = GOAL_EVERYWHERE, GOAL_EVERYWHERE
        if int(r["experts"]) == 16:
            need_fwd, need_train = GOAL_FORWARD_16, GOAL_TRAIN_16
        for what, ratio, need in (("forward", fwd, need_fwd), ("training", train, need_train)):
            verdict = "met" if ratio >= need else "MISSED"
            lines.append(
                f"- {int(r['experts'])} experts, {what}: {ratio:.2f}x (goal >= {need:g}x): {verdict}"
            )
    return lines


# ---------------------------------------------------------------------- main
def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experts", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=16384)
    parser.add_argument("--forward-iters", type=int, default=5, help="timed forward passes (median)")
    parser.add_argument("--train-iters", type=int, default=3, help="timed training steps (median)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (0: leave default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--write", action="store_true", help="also write benchmarks/results/cpu_vs_transformers.md"
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    print("\n".join(header(args)), flush=True)

    rows: list[dict[str, float]] = []
    parity_lines = []
    for num_experts in args.experts:
        hf_model, model = build_pair(num_experts, args.vocab, args.seed)
        diff = parity(hf_model, model, args.vocab)
        verdict = "ok" if diff < PARITY_TOLERANCE else "FAILED"
        line = (
            f"- parity, {num_experts} experts: max |l4lab - transformers| / max |transformers| "
            f"= {diff:.2e} (< {PARITY_TOLERANCE:g}: {verdict})"
        )
        print(line, flush=True)
        parity_lines.append(line)
        if diff >= PARITY_TOLERANCE:
            raise SystemExit("l4lab and transformers disagree; timings would compare different models")

        ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(2))
        models = {"hf": (hf_model, hf_forward(hf_model)), "l4": (model, l4lab_forward(model))}
        fwd = tokens_per_second(models, ids, args.forward_iters, forward_step)
        print(f"  forward tok/s: transformers {fwd['hf']:,.0f}, l4lab {fwd['l4']:,.0f}", flush=True)
        train = tokens_per_second(models, ids, args.train_iters, train_step)
        print(f"  train tok/s: transformers {train['hf']:,.0f}, l4lab {train['l4']:,.0f}", flush=True)
        row = {
            "experts": num_experts,
            "fwd_hf": fwd["hf"],
            "fwd_l4": fwd["l4"],
            "train_hf": train["hf"],
            "train_l4": train["l4"],
        }
        rows.append(row)
        del hf_model, model, models
        gc.collect()

    report = [*header(args), *parity_lines, "", *table(rows), "", *goals(rows)]
    print()
    print("\n".join(report[len(header(args)) :]))
    if args.write:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text("\n".join(report) + "\n")
        print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
