"""The herd's experiments over several seeds, for notebooks/09_herd_and_rivals.ipynb to load and plot.

1. Three routers on the same tiny model and the same text (Python's standard library documenting
   itself, l4lab.data.corpus_dataset), at equal active parameters and so equal FLOPs per token:
   Mixtral's softmax top-2 (Switch balancing loss, as Mixtral trained), Llama 4's sigmoid top-1 + a
   shared expert, DeepSeek-V3's sigmoid top-2 + a shared expert with its bias-only balancing (narrower
   experts, so that 3 x width = 2 x the others'). Llama 4's balancing is not published: it uses the
   bias here too. Validation loss, load balance (MaxVio) and the same-expert rate per layer.
2. Mixtral's Table 5 measurement on the Mixtral-routed runs: the rate at which consecutive tokens get
   the same first-choice expert, per layer, trained and untrained (the control).
3. Distillation: a larger tiny "behemoth" teacher; a Llama 4-routed student (the runs of 1) trained
   alone, distilled with a fixed weight (0.5) and with a schedule (0.9 -> 0.1), at temperature 2.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/herd.py            # writes benchmarks/results/herd.*
    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/herd.py --quick    # a smoke run, nothing written

On two cores, ``--part routers`` and ``--part distillation`` run the two halves as two processes, each
writing ``herd_<part>.json``; ``--part assemble`` then writes herd.json and herd.md from them.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

import l4lab
from l4lab.config import Config
from l4lab.data import TokenDataset, corpus_dataset
from l4lab.family import flops_per_token
from l4lab.routing import routing_stats
from l4lab.train import TrainConfig, Trainer

RESULTS = Path(__file__).parent / "results"
SEQ_LEN = 64
BASE: dict[str, Any] = dict(
    hidden_size=64,
    num_layers=4,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    num_experts=8,
    attention_chunk_size=SEQ_LEN,
    bos_token_id=256,
    eos_token_id=257,
)
# (router, top_k, expert width, balance): active FFN width 2 x 128 = 256 for each (DeepSeek: 3 x 85 = 255)
ROUTERS: dict[str, tuple[str, int, int, str]] = {
    "mixtral": ("mixtral", 2, 128, "switch"),
    "llama4": ("llama4", 1, 128, "aux_free"),
    "deepseek": ("deepseek", 2, 85, "aux_free"),
}
TEACHER: dict[str, Any] = dict(
    BASE, hidden_size=128, num_heads=8, num_experts=16, moe_intermediate_size=256, num_layers=6
)
STUDENTS = {"alone": None, "fixed 0.5": (0.5, None), "scheduled 0.9 -> 0.1": (0.9, 0.1)}


def router_config(name: str) -> Config:
    router, top_k, width, _ = ROUTERS[name]
    return l4lab.preset("tiny-moe", **BASE, router=router, top_k=top_k, moe_intermediate_size=width)


@torch.no_grad()
def routing_measures(model: l4lab.Llama4, rows: TokenDataset) -> dict[str, list[float]]:
    """Per MoE layer on validation rows: MaxVio, same-expert rate of first choices, and chance."""
    model.eval()
    stats = routing_stats(model(rows.tokens[:, :-1]).routing)
    return {
        "max_violation": [s.max_violation for s in stats],
        "same_expert_rate": [s.same_expert_rate for s in stats],
        "chance_rate": [s.chance_rate for s in stats],
    }


def train(
    config: Config,
    data: tuple[TokenDataset, TokenDataset],
    seed: int,
    steps: int,
    balance: str,
    teacher: l4lab.Llama4 | None = None,
    weights: tuple[float, float | None] | None = None,
) -> tuple[l4lab.Llama4, dict[str, Any]]:
    torch.manual_seed(seed)
    model = l4lab.Llama4(config)
    distill = {}
    if weights is not None:
        distill = dict(distill_weight=weights[0], distill_weight_end=weights[1], distill_temperature=2.0)
    train_config = TrainConfig(
        steps=steps,
        batch_size=16,
        warmup_steps=steps // 10,
        eval_every=steps,
        eval_rows=128,
        balance=balance,
        seed=seed,
        **distill,
    )
    started = time.monotonic()
    history = Trainer(model, data[0], data[1], train_config, teacher).run(progress=False)
    return model, {"val_loss": history[-1]["val_loss"], "seconds": round(time.monotonic() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run: 3 steps, one seed, nothing written"
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--teacher-steps", type=int, default=300)
    parser.add_argument("--part", choices=("all", "routers", "distillation", "assemble"), default="all")
    args = parser.parse_args()
    if args.part == "assemble":
        routers = json.loads((RESULTS / "herd_routers.json").read_text())
        distilled = json.loads((RESULTS / "herd_distillation.json").read_text())
        alone = [r["val_loss"] for r in routers["routers"]["llama4"]["runs"]]
        distilled["distillation"]["students"] = {"alone": alone, **distilled["distillation"]["students"]}
        results = {**routers, "distillation": distilled["distillation"]}
        results["setup"]["teacher_steps"] = distilled["setup"]["teacher_steps"]
        (RESULTS / "herd.json").write_text(json.dumps(results, indent=1) + "\n")
        (RESULTS / "herd.md").write_text(summary(results))
        print(summary(results))
        return
    seeds = [0] if args.quick else list(range(args.seeds))
    steps = 3 if args.quick else args.steps
    teacher_steps = 3 if args.quick else args.teacher_steps
    data = corpus_dataset(SEQ_LEN + 1).split(0.9)
    probe_rows = data[1].rows(slice(0, 128))
    results: dict[str, Any] = {"routers": {}, "untrained": {}, "distillation": {}}

    for name in ROUTERS if args.part in ("all", "routers") else ():
        config = router_config(name)
        total, active = l4lab.count_params(config)
        entry: dict[str, Any] = {
            "config": {"router": config.router, "top_k": config.top_k, "width": config.moe_intermediate_size},
            "balance": ROUTERS[name][3],
            "total_params": total,
            "active_params": active,
            "flops_per_token": flops_per_token(config, SEQ_LEN),
            "runs": [],
        }
        torch.manual_seed(0)
        results["untrained"][name] = routing_measures(l4lab.Llama4(config), probe_rows)
        for seed in seeds:
            model, run = train(config, data, seed, steps, ROUTERS[name][3])
            run.update(seed=seed, **routing_measures(model, probe_rows))
            entry["runs"].append(run)
            print(name, run)
        results["routers"][name] = entry

    if args.part == "routers":
        results["setup"] = setup(seeds, steps, teacher_steps)
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "herd_routers.json").write_text(json.dumps(results, indent=1) + "\n")
        return
    teacher, teacher_run = train(l4lab.preset("tiny-moe", **TEACHER), data, 0, teacher_steps, "aux_free")
    teacher_total, teacher_active = l4lab.count_params(teacher.config)
    results["distillation"] = {
        "teacher": {**teacher_run, "total_params": teacher_total, "active_params": teacher_active},
        "temperature": 2.0,
        "students": {},
    }
    if args.part == "all":
        alone = [r["val_loss"] for r in results["routers"]["llama4"]["runs"]]
        results["distillation"]["students"]["alone"] = alone
    print("teacher", teacher_run)
    for label, weights in STUDENTS.items():
        if weights is None:
            continue
        losses = []
        for seed in seeds:
            _, run = train(router_config("llama4"), data, seed, steps, "aux_free", teacher, weights)
            losses.append(run["val_loss"])
            print(label, seed, run)
        results["distillation"]["students"][label] = losses

    results["setup"] = setup(seeds, steps, teacher_steps)
    if args.part == "distillation":
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "herd_distillation.json").write_text(json.dumps(results, indent=1) + "\n")
        return
    if args.quick:
        print(json.dumps(results, indent=1)[:2000])
        return
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "herd.json").write_text(json.dumps(results, indent=1) + "\n")
    (RESULTS / "herd.md").write_text(summary(results))
    print(summary(results))


def setup(seeds: list[int], steps: int, teacher_steps: int) -> dict[str, Any]:
    """Where and how the results were measured."""
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, 1 thread",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "seeds": seeds,
        "steps": steps,
        "teacher_steps": teacher_steps,
        "batch": f"16 x {SEQ_LEN} tokens",
        "data": "l4lab.data.corpus_dataset (90% train, 10% validation)",
    }


def summary(results: dict[str, Any]) -> str:
    setup = results["setup"]
    lines = [
        "# The herd's experiments (benchmarks/herd.py)",
        "",
        f"{setup['date']}; {setup['machine']}; Python {setup['python']}, torch {setup['torch']}; "
        f"seeds {setup['seeds']}, {setup['steps']} steps of {setup['batch']}; {setup['data']}.",
        "",
        "| router | balance | active params | FLOPs/token | val loss (per seed) | MaxVio "
        "| same-expert rate / chance |",
        "|---|---|---:|---:|---|---:|---|",
    ]
    for name, entry in results["routers"].items():
        runs = entry["runs"]
        losses = ", ".join(f"{r['val_loss']:.4f}" for r in runs)
        maxvio = sum(sum(r["max_violation"]) / len(r["max_violation"]) for r in runs) / len(runs)
        rates = [
            sum(r["same_expert_rate"][i] for r in runs) / len(runs)
            for i in range(len(runs[0]["chance_rate"]))
        ]
        chance = [sum(r["chance_rate"][i] for r in runs) / len(runs) for i in range(len(rates))]
        per_layer = ", ".join(f"{100 * a:.1f}/{100 * c:.1f}%" for a, c in zip(rates, chance, strict=True))
        lines.append(
            f"| {name} | {entry['balance']} | {entry['active_params']:,} | {entry['flops_per_token']:,.0f} | "
            f"{losses} | {maxvio:.2f} | {per_layer} |"
        )
    distillation = results["distillation"]
    lines += [
        "",
        f"Teacher: {distillation['teacher']['total_params']:,} parameters, validation loss "
        f"{distillation['teacher']['val_loss']:.4f} after {setup['teacher_steps']} steps.",
        "",
        "| student | val loss (per seed) |",
        "|---|---|",
    ]
    for label, losses in distillation["students"].items():
        lines.append(f"| {label} | {', '.join(f'{v:.4f}' for v in losses)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
