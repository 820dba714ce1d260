"""Passkey retrieval to 128K tokens (Mohtashami & Jaggi 2023): RoPE, NoPE and iRoPE, temperature on/off.

Every cell is ``l4lab.passkey.run_passkey`` (what ``python -m l4lab passkey`` runs): a 2-layer model
trained at 64 tokens on passkey rows with the key at every depth, tested by greedy decoding through the
KV cache on a depth x length grid, with temperature tuning on and (same weights) off where the model has
a NoPE layer, and the attention of the question on the key per layer (``needle_attention``), beside an
untrained model of the same shape.

Each trained cell is written at once to ``benchmarks/results/passkey/<row>-seed<N>.json`` and skipped when
it is there, so the sweep can stop and continue; workers started side by side share the cells (each claims
its next cell with a ``.claimed`` file; delete those left by a killed worker). ``--summarise`` writes
``benchmarks/results/passkey.{json,md}`` (mean over seeds per cell, versions, machine and date)::

    OMP_NUM_THREADS=1 python benchmarks/passkey.py --seeds 0,1 &
    OMP_NUM_THREADS=1 python benchmarks/passkey.py --seeds 0,1 &
    python benchmarks/passkey.py --summarise
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from l4lab.passkey import KEY_COUNT, KEY_DIGITS, YANG_2025, PasskeySetup, run_passkey

from machine import machine
from recording import unclaimed, write_cell, write_summary

ROOT = Path(__file__).resolve().parents[1]
CELLS = ROOT / "benchmarks" / "results" / "passkey"
SUMMARY = ROOT / "benchmarks" / "results" / "passkey"
ROWS = ("irope", "rope", "nope")
LENGTHS = [64, 256, 1024, 4096, 16384, 65536, 131072]
DEPTHS = [0.0, 0.25, 0.5, 0.75, 1.0]
GLOBAL_MAX = 16384  # RoPE and NoPE: layer 0 is global, O(T^2): a 64K row costs about a minute
MECHANISM = [1024, 8192, 32768, 131072]  # Yang et al. report 8K, 32K and 128K
ROWS_AT = {64: 32, 256: 32, 1024: 32, 4096: 16, 16384: 4, 65536: 4, 131072: 4}


def lengths_for(name: str) -> tuple[list[int], list[int]]:
    """The grid's lengths and the mechanism's lengths for one row of the table."""
    cap = None if name == "irope" else GLOBAL_MAX
    grid = [n for n in LENGTHS if cap is None or n <= cap]
    mechanism = [n for n in MECHANISM if cap is None or n <= 2 * cap]
    return grid, mechanism


def run_cells(seeds: list[int]) -> None:
    """Run every cell not yet written or claimed; several workers share the list through claim files."""
    order = {CELLS / f"{name}-seed{seed}.json": (seed, name) for seed in seeds for name in ROWS}
    for path in unclaimed(order):
        seed, name = order[path]
        grid, mechanism = lengths_for(name)
        print(f"{name} seed {seed}: training", flush=True)
        result = run_passkey(PasskeySetup(positions=name, seed=seed), grid, DEPTHS, ROWS_AT, mechanism)
        result["machine"] = machine()
        write_cell(path, result)
        on = result["temperature"]["on"]["grid"]
        print(
            f"{name} seed {seed} ({result['train_seconds']:.0f} s training): exact "
            + ", ".join(f"{c['length']}@{c['depth']}: {c['exact']:.0%}" for c in on),
            flush=True,
        )


LABELS = {
    ("irope", "on"): "iRoPE",
    ("irope", "off"): "iRoPE, temperature off",
    ("rope", "on"): "RoPE",
    ("nope", "on"): "NoPE",
    ("nope", "off"): "NoPE, temperature off",
}


def exact_at_training_length(run: dict) -> float:
    """A trained cell's exact match at its training length, temperature on, mean over depths (0-1)."""
    train = run["setup"]["train_length"]
    return statistics.fmean(c["exact"] for c in run["temperature"]["on"]["grid"] if c["length"] == train)


def summarise() -> dict:
    """Mean, min and max over seeds per (row, temperature, length, depth); the mechanism per length.

    A seed that did not learn the task (under 50% exact match at its own training length) says nothing
    about length generalisation: it is listed under ``not_learned`` (with its loss) and left out of the
    means, unless no seed of the row learned.
    """
    runs: dict[str, list[dict]] = {}
    for path in sorted(CELLS.glob("*.json")):
        runs.setdefault(path.stem.rsplit("-seed", 1)[0], []).append(json.loads(path.read_text()))
    rows = {}
    for (name, tuned), label in LABELS.items():
        every = [run for run in runs.get(name, []) if tuned in run["temperature"]]
        if not every:
            continue
        seeds = [run for run in every if exact_at_training_length(run) >= 0.5] or every
        not_learned = [
            {
                "seed": run["setup"]["seed"],
                "final_loss": run["final_loss"],
                "exact_at_training_length": exact_at_training_length(run),
            }
            for run in every
            if exact_at_training_length(run) < 0.5
        ]
        cells: dict[tuple[int, float], list[float]] = {}
        digits: dict[tuple[int, float], list[float]] = {}
        for run in seeds:
            for c in run["temperature"][tuned]["grid"]:
                cells.setdefault((c["length"], c["depth"]), []).append(100 * c["exact"])
                digits.setdefault((c["length"], c["depth"]), []).append(100 * c["digits"])
        mechanism: dict[tuple[int, int], dict[str, Any]] = {}
        for run in seeds:
            for m in run["temperature"][tuned]["mechanism"]:
                for trained, untrained in zip(m["trained"], m["untrained"], strict=True):
                    into = mechanism.setdefault(
                        (m["length"], trained["layer"]), {"kind": trained["kind"], "values": {}}
                    )["values"]
                    for key in ("mass", "entropy", "ln_visible"):
                        into.setdefault(key, []).append(trained[key])
                        into.setdefault(f"untrained_{key}", []).append(untrained[key])
        rows[f"{name}-{tuned}"] = {
            "label": label,
            "positions": name,
            "temperature": tuned == "on",
            "seeds": sorted(run["setup"]["seed"] for run in seeds),
            "train_seconds": [run["train_seconds"] for run in seeds],
            "final_loss": [run["final_loss"] for run in seeds],
            "not_learned": not_learned,
            "cells": [
                {
                    "length": length,
                    "depth": depth,
                    "rows": ROWS_AT[length],
                    "exact_mean": statistics.fmean(values),
                    "exact_min": min(values),
                    "exact_max": max(values),
                    "exact_values": values,
                    "digits_mean": statistics.fmean(digits[(length, depth)]),
                }
                for (length, depth), values in sorted(cells.items())
            ],
            "mechanism": [
                {
                    "length": length,
                    "layer": layer,
                    "kind": entry["kind"],
                    **{k: statistics.fmean(v) for k, v in entry["values"].items()},
                }
                for (length, layer), entry in sorted(mechanism.items())
            ],
        }
    first = next(iter(runs.values()))[0]
    summary = {
        "machine": first["machine"],
        "setup": {k: v for k, v in first["setup"].items() if k not in ("positions", "seed")},
        "key_digits": KEY_DIGITS,
        "chance_exact": 1 / KEY_COUNT,
        "depths": DEPTHS,
        "lengths": LENGTHS,
        "rows_at": {str(k): v for k, v in ROWS_AT.items()},
        "cpu_seconds": sum(run["train_seconds"] for rs in runs.values() for run in rs)
        + sum(
            c["seconds"]
            for rs in runs.values()
            for run in rs
            for setting in run["temperature"].values()
            for c in setting["grid"]
        ),
        "yang_2025": YANG_2025,
        "rows": rows,
    }
    write_summary(SUMMARY, summary, markdown(summary))
    return summary


def markdown(summary: dict) -> str:
    info = summary["machine"]
    lines = [
        "# Passkey retrieval far past the training length: RoPE, NoPE, iRoPE, temperature on/off",
        "",
        f"- written by benchmarks/passkey.py; {info['date']}; torch {info['torch']}, "
        f"Python {info['python']}, CPU {info['cpu']}, one thread per worker, "
        "two or three workers side by side on a machine shared with other jobs",
        "- protocol: Mohtashami & Jaggi 2023 on a synthetic vocabulary (l4lab/passkey.py): "
        f"a {KEY_DIGITS}-digit key after a KEY token at a depth of a repeated 8-token filler sentence, "
        "a QUERY token at the end, "
        "the key decoded greedily through the KV cache; exact match of all digits "
        f"(chance 1/{KEY_COUNT:,}); 2-layer models trained at 64 tokens",
        "- recipe: 3,000 steps, the cosine ending at half the peak rate (the comment above "
        "l4lab.passkey.PasskeySetup has the pilots); the first table, 1,200 steps to 0.1 x lr, learned "
        "in 3 seeds of 3 for RoPE but 1 of 3 for iRoPE and NoPE (the others: final loss 0.55-1.77, "
        "0-24% exact at 64)",
        f"- setup: {summary['setup']}; test rows per cell: {summary['rows_at']}; total CPU time of the cells "
        f"(training and grid): {summary['cpu_seconds'] / 60:.0f} min",
        "",
        "Exact match (%), mean over seeds, averaged over the depths "
        + ", ".join(f"{d:g}" for d in summary["depths"])
        + " (per depth: the JSON):",
        "",
        "| model | seeds (in the mean) | " + " | ".join(f"{n:,}" for n in summary["lengths"]) + " |",
        "|---|---|" + "---:|" * len(summary["lengths"]),
    ]
    for row in summary["rows"].values():
        by_length: dict[int, list[float]] = {}
        for c in row["cells"]:
            by_length.setdefault(c["length"], []).append(c["exact_mean"])
        cells = [
            f"{statistics.fmean(by_length[n]):.0f}" if n in by_length else "-" for n in summary["lengths"]
        ]
        failed = {n["seed"] for n in row["not_learned"]}
        learned = f"{len(set(row['seeds']) - failed)} learned" + (f", {len(failed)} not" if failed else "")
        lines.append(f"| {row['label']} | {learned} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"-: not run (RoPE and NoPE stop at {GLOBAL_MAX:,}: their layer 0 is global, O(T^2) per row). "
        "Seeds: those that learned the task (>= 50% exact at the training length); the others, left out "
        "of the means: "
        + (
            "; ".join(
                f"{row['label']} seed {n['seed']} (final loss {n['final_loss']:.2f}, "
                f"{n['exact_at_training_length']:.0%} exact at 64)"
                for row in summary["rows"].values()
                for n in row["not_learned"]
            )
            or "none"
        )
        + ".",
        "",
        "The question's attention at depth 0.5 (2 rows per seed): mass on the key (KEY and its digits) and "
        "entropy (nats) per layer, trained and untrained; ln(keys) is uniform attention's entropy:",
        "",
        "| model | T | layer | mass on key | entropy | untrained entropy | ln(visible keys) |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for row in summary["rows"].values():
        for m in row["mechanism"]:
            lines.append(
                f"| {row['label']} | {m['length']:,} | {m['layer']}: {m['kind']} | {m['mass']:.3f} | "
                f"{m['entropy']:.3f} | {m['untrained_entropy']:.3f} | {m['ln_visible']:.2f} |"
            )
    yang = summary["yang_2025"]
    lines += [
        "",
        "Yang et al. 2025 (RNoPE, arXiv:2501.18795), language models at "
        + " / ".join(f"{n:,}" for n in yang["lengths"])
        + f" tokens: RoPE layers {' / '.join(map(str, yang['rope_layers']))} nats, QK-norm layers "
        + f"{' / '.join(map(str, yang['qk_norm_layers']))}. Comparable: how entropy grows with ln T. Not "
        "comparable: absolute values (their heads read language, ours one needle in a periodic filler).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (0,1,2)")
    parser.add_argument("--summarise", action="store_true", help="write the summary from the cells")
    args = parser.parse_args(argv)
    if args.summarise:
        summarise()
        return 0
    run_cells([int(s) for s in args.seeds.split(",")])
    return 0


if __name__ == "__main__":
    sys.exit(main())
