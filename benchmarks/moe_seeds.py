"""Notebook 03's two experiments over three seeds, and the balancing run twice as long.

Notebook 03 trains, under one seed, (a) a dense model and a MoE with the same active parameters and
(b) a MoE of 8 experts under three balancing methods. One seed cannot say whether a gap is an effect
or noise, and 200 steps cannot say where balancing ends up. This script repeats both for seeds 0-2,
exactly as the notebook runs them (same presets, data, batches and steps), and runs the balancing
methods for ``--balance-steps`` steps (default 400, twice the notebook's), measuring MaxVio on the
notebook's validation tokens every 100 steps. Notebook 03 loads the results and draws every seed, their
mean and their spread with ``l4lab.viz.seed_spread_figure``::

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/moe_seeds.py   # about 10 minutes on one idle core

It writes ``benchmarks/results/moe_seeds.json`` (every curve of every seed, with machine, versions and
date).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import l4lab
from l4lab import routing
from l4lab.storage import atomic_write_text
from l4lab.train import TrainConfig, Trainer

from machine import machine

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "moe_seeds.json"
SEEDS = (0, 1, 2)
METHODS = {
    "none": dict(balance="none"),
    "switch": dict(balance="switch", switch_coef=1e-2),
    "aux_free": dict(balance="aux_free", bias_rate=1e-3),
}


def notebook_data(seed: int) -> tuple[l4lab.data.TokenDataset, l4lab.data.TokenDataset, torch.Tensor]:
    """Notebook 03's training rows, validation rows and the validation tokens its routing is read on."""
    data = l4lab.data.mixture(2000, 129, seed=seed)
    train, val = data[:1936], data[1936:]
    real = int((val.tokens != l4lab.ByteTokenizer().pad_token_id).sum(1).min())
    return train, val, val.tokens[:, :real]


def dense_vs_moe(seed: int) -> dict[str, list[list[float]]]:
    """Validation loss curves [[step, loss], ...] of notebook 03's dense model and MoE, one seed."""
    train, val, _ = notebook_data(seed)
    curves = {}
    for name, config in {
        "dense": l4lab.preset("tiny", num_layers=2),
        "MoE": l4lab.preset("tiny-moe", num_layers=2),
    }.items():
        torch.manual_seed(seed)
        model = l4lab.Llama4(config)
        run = TrainConfig(steps=300, batch_size=16, eval_every=50, seed=seed)
        history = Trainer(model, train, val, run).run(progress=False)
        curves[name] = [[h["step"], h["val_loss"]] for h in history if "val_loss" in h]
    return curves


def balancing(seed: int, steps: int, every: int = 100) -> dict[str, dict[str, list[list[float]]]]:
    """Per method: MaxVio (mean over the 2 layers) and validation loss every ``every`` steps, one seed."""
    train, val, inputs = notebook_data(seed)
    results = {}
    for name, fields in METHODS.items():
        torch.manual_seed(seed)
        model = l4lab.Llama4(l4lab.preset("tiny-moe", num_layers=2, num_experts=8))
        run = TrainConfig(steps=steps, batch_size=8, eval_every=every, seed=seed, **fields)
        trainer = Trainer(model, train, val, run)
        max_violation, val_loss = [], []
        while trainer.step_count < steps:
            metrics = trainer.step()
            if trainer.step_count % every == 0:
                with torch.no_grad():
                    stats = routing.routing_stats(model.eval()(inputs).routing)
                max_violation.append([trainer.step_count, sum(s.max_violation for s in stats) / len(stats)])
                val_loss.append([trainer.step_count, metrics["val_loss"]])
        results[name] = {"max_violation": max_violation, "val_loss": val_loss}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--balance-steps", type=int, default=400)
    args = parser.parse_args()
    started = time.monotonic()
    for seed in args.seeds:  # written after every seed, so that a stopped run keeps what it measured
        curves, balance = dense_vs_moe(seed), balancing(seed, args.balance_steps)
        # the other seeds already in the file stay (seeds can run in separate processes, same settings)
        results = json.loads(RESULT.read_text()) if RESULT.exists() else {"dense_vs_moe": {}, "balancing": {}}
        if results.get("meta", {}).get("balance_steps", str(args.balance_steps)) != str(args.balance_steps):
            results = {"dense_vs_moe": {}, "balancing": {}}  # another length: start afresh
        results["dense_vs_moe"][str(seed)] = curves
        results["balancing"][str(seed)] = balance
        results["meta"] = {
            **machine(),
            "seconds per seed": str(round((time.monotonic() - started) / (args.seeds.index(seed) + 1))),
            "balance_steps": str(args.balance_steps),
        }
        atomic_write_text(RESULT, json.dumps(results, indent=1) + "\n")
        print(f"seed {seed} done after {time.monotonic() - started:.0f} s", flush=True)
    print(f"wrote {RESULT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
