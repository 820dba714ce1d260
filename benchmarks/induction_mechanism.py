"""Why iRoPE holds: the attention of a trained 2-layer iRoPE model as the context grows to 2^17 tokens.

Trains the first sweep's iRoPE model (``l4lab.induction.InductionSetup``, seed 0, trained at 64
tokens: the recipe of ``benchmarks/induction_sweep.py --train-length 64``), saves it
(``benchmarks/results/induction_mechanism/irope-seed0/``, a transformers-compatible checkpoint of 0.3 MB
that notebook 08 loads), and measures on held-out rows at
2^6 ... 2^17 tokens:

* layer 1 (NoPE, global): the final query's attention entropy (nats) and its attention mass on the
  answer token x, with temperature tuning on and, on the same weights, off; and the accuracy both ways;
* layer 0 (RoPE, chunked): the answer token's attention mass on the trigger just before it, for rows
  whose answer does not open a chunk and for those that do (the blind spot: there the trigger is out
  of sight and the mass is exactly 0).

The final query's attention is computed from the input of layer 1 (captured with a hook on a
``last_only`` forward), so a 2^17-token row never builds a T x T map. Yang et al. 2025 (RNoPE,
arXiv:2501.18795) report, for their 8B-scale models at 8K / 32K / 128K tokens, entropies of 6.02 / 6.95 /
7.62 nats in RoPE layers and 10.71 / 12.46 / 14.14 in QK-norm layers; uniform attention over T keys has
ln T (9.0 / 10.4 / 11.8). Results: ``benchmarks/results/induction_mechanism.{json,md}``::

    OMP_NUM_THREADS=1 python benchmarks/induction_mechanism.py
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

import torch
from torch import Tensor

import l4lab
from l4lab.induction import InductionSetup, first_trigger, held_out_rows, induction_hits, train_induction
from l4lab.model import Llama4
from l4lab.ops import Temperature

from machine import machine
from recording import write_summary

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "induction_mechanism"
LENGTHS = [2**k for k in range(6, 18)]
YANG_2025 = {"lengths": [8192, 32768, 131072], "rope": [6.02, 6.95, 7.62], "qk_norm": [10.71, 12.46, 14.14]}


def rows_at(length: int) -> int:
    return 64 if length <= 2**12 else 16 if length <= 2**15 else 8


@torch.no_grad()
def final_query_attention(model: Llama4, tokens: Tensor, tuned: bool) -> Tensor:
    """Layer 1's attention probabilities [N, heads, T-1] for the final query (float64)."""
    captured: list[Tensor] = []
    attention = model.layers[1].self_attn
    handle = attention.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    model(tokens[:, :-1], last_only=True)
    handle.remove()
    x = captured[0].double()  # [N, T-1, D], the normed input of layer 1
    n, length, _ = x.shape
    heads, kv_heads, dim = attention.num_heads, attention.num_kv_heads, attention.head_dim
    q = (x[:, -1] @ attention.q_proj.weight.double().T).view(n, heads, dim)
    k = (x @ attention.k_proj.weight.double().T).view(n, length, kv_heads, dim)
    k = k.repeat_interleave(heads // kv_heads, dim=2)  # [N, T-1, heads, D]
    if tuned:
        config = model.config
        q = q * Temperature(config.floor_scale, config.attn_scale).scales(torch.tensor([length - 1])).double()
    logits = torch.einsum("nhd,nthd->nht", q, k) / math.sqrt(dim)
    return torch.softmax(logits, dim=-1)


@torch.no_grad()
def answer_to_trigger(model: Llama4, tokens: Tensor, chunk: int) -> Tensor:
    """Layer 0's attention [N] (largest head) from the answer x to the trigger just before it.

    Layer 0 is chunked and relative (RoPE): its row for x depends only on x's chunk, so it is read from a
    forward over that chunk alone (which starts on a chunk boundary, so the chunks line up).
    """
    out = []
    trigger = first_trigger(tokens)
    for row, p in zip(tokens, trigger.tolist(), strict=True):
        start = (p + 1) // chunk * chunk
        window = row[start : p + 2][None]
        probs = model(window, return_attention=True).attentions[0][0, :, -1]  # [heads, keys]
        out.append(float(probs[:, p - start].max()) if p >= start else 0.0)
    return torch.tensor(out)


def measure(model: Llama4, setup: InductionSetup) -> list[dict]:
    results = []
    for length in LENGTHS:
        tokens = held_out_rows(length, rows_at(length), setup.seed)
        answer = first_trigger(tokens) + 1
        edge = answer % setup.chunk == 0
        row: dict = {"length": length, "rows": len(tokens), "ln_T": math.log(length - 1)}
        batch = max(1, 2**16 // length)  # rows per forward: bounded memory at 2^17 tokens
        for tuned in (True, False):
            entropy, on_answer = [], []
            for rows, answers in zip(tokens.split(batch), answer.split(batch), strict=True):
                probs = final_query_attention(model, rows, tuned)
                entropy.append(-(probs * probs.clamp_min(1e-300).log()).sum(-1))  # [n, heads]
                on_answer.append(probs[torch.arange(len(rows)), :, answers])  # [n, heads]
            entropy, on_answer = torch.cat(entropy), torch.cat(on_answer)
            key = "on" if tuned else "off"
            row[f"entropy_{key}_mean_head"] = float(entropy.mean())
            row[f"entropy_{key}_min_head"] = float(entropy.min(-1).values.mean())
            row[f"mass_on_answer_{key}"] = float(on_answer.max(-1).values.mean())
            model.reconfigure(temperature_tuning=tuned)
            row[f"accuracy_{key}"] = float(induction_hits(model, tokens, batch_tokens=2**16).double().mean())
        model.reconfigure(temperature_tuning=True)
        to_trigger = answer_to_trigger(model, tokens, setup.chunk)
        row["layer0_to_trigger_inside"] = float(to_trigger[~edge].mean()) if (~edge).any() else None
        row["layer0_to_trigger_edge"] = float(to_trigger[edge].mean()) if edge.any() else None
        row["edge_rows"] = int(edge.sum())
        results.append(row)
        print(json.dumps(row), flush=True)
    return results


def markdown(summary: dict) -> str:
    info = summary["machine"]
    lines = [
        "# Inside a trained 2-layer iRoPE model on induction heads, 2^6 to 2^17 tokens",
        "",
        f"- benchmarks/induction_mechanism.py; {info['date']}; torch {info['torch']}, CPU {info['cpu']}",
        f"- model: {summary['setup']} (trained at {summary['setup']['train_length']} tokens); weights in "
        "benchmarks/results/induction_mechanism/irope-seed0/",
        "- layer 1 = NoPE, global; the final query's attention, mean over rows (entropy: mean over heads; "
        "mass on x: the largest head); temperature off = the same weights with temperature_tuning=False",
        "",
        "| T | rows | ln T | entropy on | entropy off | mass on x, on | mass on x, off | accuracy on "
        "| accuracy off | layer 0: x -> trigger (inside / at the edge) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in summary["results"]:
        inside = r["layer0_to_trigger_inside"]
        edge = r["layer0_to_trigger_edge"]
        lines.append(
            f"| {r['length']:,} | {r['rows']} | {r['ln_T']:.2f} | {r['entropy_on_mean_head']:.2f} | "
            f"{r['entropy_off_mean_head']:.2f} | {r['mass_on_answer_on']:.2f} | "
            f"{r['mass_on_answer_off']:.2f} | "
            f"{r['accuracy_on']:.0%} | {r['accuracy_off']:.0%} | "
            f"{'-' if inside is None else f'{inside:.2f}'} / {'-' if edge is None else f'{edge:.2f}'} |"
        )
    yang = summary["yang_2025"]
    lines += [
        "",
        "Yang et al. 2025 (RNoPE), 8B-scale models, entropy in nats at "
        + " / ".join(f"{n // 1024}K" for n in yang["lengths"])
        + f": RoPE layers {' / '.join(map(str, yang['rope']))}, QK-norm layers "
        + f"{' / '.join(map(str, yang['qk_norm']))}.",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    # no options: --help says what the script measures instead of starting the measurement
    text = argparse.RawDescriptionHelpFormatter
    argparse.ArgumentParser(description=__doc__, formatter_class=text).parse_args()
    setup = InductionSetup(positions="irope", train_length=64, seed=0)  # the committed checkpoint's
    checkpoint = RESULTS / "irope-seed0"
    if (checkpoint / "model.safetensors").exists():
        model = l4lab.load_pretrained(checkpoint).eval()
    else:
        model, _ = train_induction(setup, max_length=max(LENGTHS))
        model.save_pretrained(checkpoint)
    summary = {
        "machine": machine(),
        "setup": dataclasses.asdict(setup),
        "yang_2025": YANG_2025,
        "results": measure(model, setup),
    }
    write_summary(RESULTS, summary, markdown(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
