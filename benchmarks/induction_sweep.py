"""Gu & Dao (2023, Mamba) Table 11 on l4lab's position schemes, and iRoPE past the paper's lengths.

Every cell is ``l4lab.induction.run_induction`` (what ``python -m l4lab induction`` runs): a 2-layer
model trained at 256 tokens on induction heads (vocabulary 16), tested at 2^6 ... 2^14 tokens, the iRoPE
rows continued to 2^15, 2^16 and 2^17. Rows: MHA-RoPE (global), NoPE everywhere, RoPE+chunked, iRoPE,
iRoPE without temperature tuning; several seeds each.

Each trained cell is written at once to ``benchmarks/results/induction/<row>-seed<N>.json`` and skipped
when it is there, so the sweep can stop and continue; workers started side by side share the cells
(each claims its next cell with a ``.claimed`` file; delete those left by a killed worker).
``--summarise`` reads the cells and writes ``benchmarks/results/induction_sweep.{json,md}``: mean and
spread per row and length beside the published rows, with versions, machine and date::

    OMP_NUM_THREADS=1 python benchmarks/induction_sweep.py --seeds 0,1,2 &
    OMP_NUM_THREADS=1 python benchmarks/induction_sweep.py --seeds 0,1,2 &
    python benchmarks/induction_sweep.py --summarise
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
from pathlib import Path

import torch

from l4lab.induction import PUBLISHED_LENGTHS, PUBLISHED_TABLE_11, InductionSetup, run_induction

from machine import machine as cpu_machine

ROOT = Path(__file__).resolve().parents[1]
CELLS = ROOT / "benchmarks" / "results" / "induction"
SUMMARY = ROOT / "benchmarks" / "results" / "induction_sweep"
ROWS = {  # file name -> (positions, temperature tuning)
    "rope": ("rope", True),
    "nope": ("nope", True),
    "chunked": ("chunked", True),
    "irope": ("irope", True),
    "irope-no-temperature": ("irope", False),
}
LONG_LENGTHS = [2**15, 2**16, 2**17]  # past the paper's attention models: iRoPE rows only


def rows_at(length: int) -> int:
    """Test rows per length: 256 as in the paper up to 2^10, fewer where a CPU row costs seconds."""
    if length <= 2**10:
        return 256
    return {2**11: 128, 2**12: 64, 2**13: 32, 2**14: 32}.get(length, 16)


def cell_order(seeds: list[int]) -> list[tuple[int, str]]:
    """Seed 0 of every row first (the table's first complete column), then RoPE and iRoPE (the rows the
    claims rest on), then the rest: a sweep stopped early has the most useful cells."""
    first = [(seeds[0], name) for name in ("rope", "irope", "chunked", "nope", "irope-no-temperature")]
    main = [(seed, name) for seed in seeds[1:] for name in ("rope", "irope")]
    rest = [(seed, name) for seed in seeds[1:] for name in ("chunked", "nope", "irope-no-temperature")]
    return first + main + rest


def run_cells(seeds: list[int], steps: int) -> None:
    """Run every cell not yet written or claimed; several workers share the list through claim files."""
    CELLS.mkdir(parents=True, exist_ok=True)
    for seed, name in cell_order(seeds):
        path = CELLS / f"{name}-seed{seed}.json"
        claim = path.with_suffix(".claimed")
        if path.exists():
            continue
        try:
            claim.touch(exist_ok=False)  # atomic: one worker per cell
        except FileExistsError:
            continue
        positions, tuned = ROWS[name]
        setup = InductionSetup(positions=positions, temperature_tuning=tuned, steps=steps, seed=seed)
        lengths = PUBLISHED_LENGTHS + (LONG_LENGTHS if positions == "irope" else [])
        print(f"{name} seed {seed}: training", flush=True)
        result = run_induction(setup, lengths, rows=rows_at)
        result["machine"] = machine()
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        os.replace(tmp, path)
        claim.unlink()
        accuracies = ", ".join(f"{r['accuracy']:.0%}" for r in result["results"])
        print(f"{name} seed {seed} ({result['train_seconds']:.0f} s training): {accuracies}", flush=True)


def machine() -> dict[str, str]:
    """The date, CPU, cores, kernels and versions (benchmarks/machine.py), and the thread count."""
    return {
        "date": datetime.date.today().isoformat(),
        **cpu_machine(),
        "threads": str(torch.get_num_threads()),
    }


def summarise() -> None:
    """Mean, standard deviation, min and max per row and length, beside Table 11; JSON and markdown."""
    cells: dict[str, list[dict]] = {}
    for path in sorted(CELLS.glob("*.json")):
        name = path.stem.rsplit("-seed", 1)[0]
        cells.setdefault(name, []).append(json.loads(path.read_text()))
    rows = {}
    for name in ROWS:
        runs = cells.get(name, [])
        if not runs:
            continue
        by_length: dict[int, list[float]] = {}
        edge: dict[int, list[float]] = {}
        for run in runs:
            for r in run["results"]:
                by_length.setdefault(r["length"], []).append(100 * r["accuracy"])
                if r["edge_accuracy"] is not None:
                    edge.setdefault(r["length"], []).append(100 * r["edge_accuracy"])
        rows[name] = {
            "label": runs[0]["label"],
            "seeds": sorted(run["setup"]["seed"] for run in runs),
            "setup": {k: v for k, v in runs[0]["setup"].items() if k != "seed"},
            "train_seconds": [run["train_seconds"] for run in runs],
            "final_loss": [run["final_loss"] for run in runs],
            "other_min": min(100 * r["other_accuracy"] for run in runs for r in run["results"]),
            "lengths": {
                str(n): {
                    "mean": statistics.fmean(values),
                    "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
                    "min": min(values),
                    "max": max(values),
                    "values": values,
                    "rows": rows_at(n),
                    "edge_mean": statistics.fmean(edge[n]) if edge.get(n) else None,
                }
                for n, values in sorted(by_length.items())
            },
        }
    info = machine()
    summary = {"machine": info, "published": PUBLISHED_TABLE_11, "published_lengths": PUBLISHED_LENGTHS}
    summary["rows"] = rows
    SUMMARY.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    SUMMARY.with_suffix(".md").write_text(markdown(summary))
    print(SUMMARY.with_suffix(".md").read_text())


MULTIPLES = [0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048]


def _multiple(m: float) -> str:
    return f"1/{round(1 / m)}x" if m < 1 else f"{m:g}x"


def markdown(summary: dict) -> str:
    """The table by multiples of the training length (the paper trained at 256, l4lab at 64)."""
    info = summary["machine"]
    lines = [
        "# Induction heads: Gu & Dao 2023 (Mamba), Table 11, beside l4lab's position schemes",
        "",
        f"- written by benchmarks/induction_sweep.py; {info['date']}; torch {info['torch']}, Python "
        f"{info['python']}, CPU {info['cpu']}, one thread per run",
        "- accuracy (%) of the one scored token of 2-layer models, vocabulary 16 (chance 1/15 = 6.7%), at "
        "test length / training length: the paper trained at 256 (its 2^6 ... 2^14 are 1/4x ... 64x), "
        "l4lab at 64 (2^6 ... 2^17 are 1x ... 2048x); l4lab cells: mean +- sd over seeds [min-max]",
        "",
        "| model | seeds | " + " | ".join(_multiple(m) for m in MULTIPLES) + " |",
        "|---|---|" + "---|" * len(MULTIPLES),
    ]
    for name, values in summary["published"].items():
        by_multiple = {n / 256: v for n, v in zip(PUBLISHED_LENGTHS, values, strict=True)}
        cells = [f"{by_multiple[m]:g}" if m in by_multiple else ("OOM" if m > 64 else "") for m in MULTIPLES]
        lines.append(f"| {name} (published, Gu & Dao) | - | " + " | ".join(cells) + " |")
    for row in summary["rows"].values():
        train = row["setup"]["train_length"]
        cells = []
        for m in MULTIPLES:
            cell = row["lengths"].get(str(int(m * train))) if m * train == int(m * train) else None
            cells.append(
                ""
                if cell is None
                else f"{cell['mean']:.1f} +- {cell['sd']:.1f} [{cell['min']:.0f}-{cell['max']:.0f}]"
            )
        lines.append(f"| {row['label']} (l4lab) | {len(row['seeds'])} | " + " | ".join(cells) + " |")
    lengths = PUBLISHED_LENGTHS + LONG_LENGTHS
    lines += [
        "",
        "OOM: the paper's attention models ran out of memory. Test rows per length (l4lab): "
        + ", ".join(f"2^{n.bit_length() - 1}: {rows_at(n)}" for n in lengths),
        "",
        "Accuracy (%) on the rows whose answer opens a chunk (the chunk-boundary blind spot), mean over "
        "seeds, at 2^6 ... 2^17 (-: no such row):",
    ]
    for row in summary["rows"].values():
        edges = [row["lengths"].get(str(n), {}).get("edge_mean") for n in lengths]
        if row["setup"]["positions"] in ("irope", "chunked"):
            lines.append(f"- {row['label']}: " + ", ".join("-" if e is None else f"{e:.0f}" for e in edges))
    setup = next(iter(summary["rows"].values()))["setup"] if summary["rows"] else {}
    shared = {k: v for k, v in setup.items() if k not in ("positions", "temperature_tuning")}
    lines += ["", f"Setup shared by every row: {shared}", "", discussion(summary), CHOICES]
    return "\n".join(lines) + "\n"


def discussion(summary: dict) -> str:
    """What agrees with the paper and what does not, with the numbers of this summary."""
    rows = summary["rows"]

    def at(key: str, multiple: float) -> str:
        row = rows.get(key)
        cell = None if row is None else row["lengths"].get(str(int(multiple * row["setup"]["train_length"])))
        return "-" if cell is None else f"{cell['mean']:.0f}%"

    return f"""## What agrees with the paper, what does not, and why

- **RoPE agrees.** Perfect at the training length ({at("rope", 1)}; paper 100), then
  {at("rope", 2)} at 2x (paper 83.6), {at("rope", 4)} at 4x (paper 31.3), {at("rope", 8)} at 8x (18.4)
  and chance from 16x on ({at("rope", 16)}; paper 8.6): the same collapse within a few doublings, at
  the same multiples of the training length, although our training length is a quarter of theirs.
- **What differs:** ours falls faster at 2x, and its seeds disagree there most (the spread in the
  table: one seed kept three quarters of the rows at 2x, another a quarter). Our models are smaller and
  trained for 800 steps, and the paper reports one number per cell, not a spread. With 32 test rows at
  2^13 and 2^14, one row is 3 points: the tail is chance in both.
- **Past the paper:** iRoPE holds {at("irope", 64)} at 64x (where the paper's RoPE has 5.5%) and
  {at("irope", 2048)} at 2048x (2^17 tokens; the paper's attention models ran out of memory past 2^14).
- **Attribution.** Chunking alone (RoPE+chunked) fails even at the training length ({at("chunked", 1)}:
  only rows whose first trigger lies in the last chunk are solvable) and is at chance by 16x
  ({at("chunked", 16)}). NoPE alone had not fully learned the task in 800 steps ({at("nope", 1)} at 1x)
  and falls to chance too ({at("nope", 16)} at 16x): global attention without positions does not
  extrapolate by itself either. iRoPE, the chunked RoPE layer (a local step whose number of keys never
  grows) feeding a global NoPE layer (retrieval with no position-dependent logits), is what holds.
  Temperature tuning changes nothing measurable here (iRoPE without it: {at("irope-no-temperature", 64)}
  at 64x, {at("irope-no-temperature", 2048)} at 2048x): the trained NoPE head is already sharp
  (benchmarks/results/induction_mechanism.md).
- **iRoPE's misses are the blind spot**: on rows whose answer does not open a chunk iRoPE's lowest
  accuracy over every length and seed is {rows["irope"]["other_min"]:.0f}% (without temperature:
  {rows.get("irope-no-temperature", {}).get("other_min", float("nan")):.0f}%; per cell in
  benchmarks/results/induction/*.json, other_accuracy); on the 1/32 of rows whose answer opens a chunk
  it is near chance, at every length.
"""


CHOICES = """## Choices, and why

- **Follows the paper:** the task (`l4lab.data.induction_heads`: one trigger and its answer at a random
  position, the trigger again at the end, only the answer scored), vocabulary 16, 2 attention layers,
  test lengths 2^6 ... 2^14, 256 test rows where the CPU allows it.
- **Training length 64, not 256.** Pilots at 256 (batch 32, lr 2e-3 and 5e-3, two-layer RoPE and iRoPE)
  stayed at chance: loss 2.72-2.74 (chance ln 15 = 2.71) and accuracy 3-8% after 200-300 steps, 10
  minutes each on this shared machine, where the whole sweep had about an hour. At 64 the same models learn
  in 800 steps (notebook 04's recipe; at 400 steps two seeds of five had not). Rows are therefore
  compared at equal multiples of the training length: the paper's 2^14 is 64x, ours is 256x.
- **Width 64, 4 query heads sharing 2 key/value heads (head_dim 16), SwiGLU width 128** per layer:
  notebook 04's tiny model, chosen so that one model trains in a few minutes of one core.
- **800 steps of 64 fresh rows, AdamW lr 1e-3, 40 warm-up steps then a cosine to 1e-4, no weight
  decay, clipping at 1**: every training row is new (the paper also draws fresh data).
- **Chunk 32** (two chunks per training row, so the chunked layer meets chunk edges in training) and
  **floor_scale 16** (the temperature moves inside the training length, as Scout's 8192 does inside its
  256K).
- **Test rows:** 256 up to 2^10, 128 at 2^11, 64 at 2^12, 32 at 2^13 and 2^14, 16 beyond: a row of
  2^14 tokens through a global layer costs seconds on one core.
- **Scoring:** the argmax at the last position, computed with `last_only=True` (exactly the full
  forward's last row; tests/test_induction.py).
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (0,1,2)")
    parser.add_argument("--steps", type=int, default=InductionSetup().steps)
    parser.add_argument("--summarise", action="store_true", help="write the summary from the cells")
    args = parser.parse_args(argv)
    if args.summarise:
        summarise()
        return 0
    run_cells([int(s) for s in args.seeds.split(",")], args.steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
