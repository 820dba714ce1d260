"""Measure the spread of every claim the notebooks check, over seeds and numeric settings.

A notebook checks the claims its text makes with ``l4lab.claims.claim``; this script is where each
claim's bound comes from. It re-executes every notebook that checks a claim, in a fresh kernel and a
temporary working directory:

* under five seeds (``L4LAB_SEED`` = 0..4, read by ``l4lab.claims.seed()``: other initial weights,
  data and batches), one thread each;
* under seed 0 with other numeric paths: two threads, ATen's AVX2 kernels
  (``ATEN_CPU_CAPABILITY=avx2``), MKL's conditional numerical reproducibility mode
  (``MKL_CBWR=COMPATIBLE``), and the path ``make test`` runs the notebooks on (the "tripwire": ATen
  without vectorisation, ``ATEN_CPU_CAPABILITY=default``, with ``MKL_CBWR=COMPATIBLE``, one thread).

``L4LAB_CLAIMS_RECORD`` makes each claim record its value instead of raising, so every claim of every run
is seen. The results go to ``benchmarks/results/claims_spread.json`` (every value) and ``.md`` (per claim:
the bound, the values, min, max, mean, standard deviation, and the margin to the bound in standard
deviations). ``tests/test_claims.py`` checks that every claim a notebook prints held in every run
recorded here, with its bound at least three standard deviations from the mean of the runs::

    python benchmarks/claims_spread.py                      # all notebooks with claims (about 45 minutes)
    python benchmarks/claims_spread.py notebooks/04_irope_long_context.ipynb --update  # after changing it
    python benchmarks/claims_spread.py --summarise          # after changing a bound: no run

Run it after changing a claim or the code under it, and commit the results with the notebooks.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nbformat
from nbclient import NotebookClient

from l4lab.claims import notebook_claims, spread

from machine import machine

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "claims_spread"
SEEDS = (0, 1, 2, 3, 4)
# seed 0 under other numeric paths; the seed runs above use one thread and the machine's best kernels
SETTINGS: dict[str, dict[str, str]] = {
    "2 threads": {"OMP_NUM_THREADS": "2"},
    "ATEN_CPU_CAPABILITY=avx2": {"ATEN_CPU_CAPABILITY": "avx2"},
    "MKL_CBWR=COMPATIBLE": {"MKL_CBWR": "COMPATIBLE"},
    # what `make test` runs the notebooks under: ATen without vectorisation, MKL compatible, one thread
    "tripwire": {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE"},
}
CELL_TIMEOUT_S = 1800


def executed_notebooks() -> list[Path]:
    """The notebooks stored with their outputs (and compared by nbval): the guided ones and the labs'
    solutions, not the exercises."""
    return sorted((ROOT / "notebooks").glob("*.ipynb")) + sorted(
        (ROOT / "notebooks/labs/solutions").glob("*.ipynb")
    )


def notebooks_with_claims() -> list[Path]:
    """Every stored notebook whose code calls ``claim(``."""
    found = []
    for path in executed_notebooks():
        cells = nbformat.read(path, as_version=4).cells
        if any(c.cell_type == "code" and "claim(" in c.source for c in cells):
            found.append(path)
    return found


def run_notebook(path: Path, seed: int, setting: str, env: dict[str, str]) -> dict:
    """Execute ``path`` with ``L4LAB_SEED=seed`` and ``env``; return the claims it recorded."""
    notebook = nbformat.read(path, as_version=4)
    with tempfile.TemporaryDirectory(prefix="l4lab-spread-") as work:
        record = Path(work) / "claims.jsonl"
        kernel_env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            **env,
            "L4LAB_SEED": str(seed),
            "L4LAB_CLAIMS_RECORD": str(record),
            "TRITON_INTERPRET": "1",
        }
        client = NotebookClient(
            notebook,
            timeout=CELL_TIMEOUT_S,
            kernel_name="python3",
            resources={"metadata": {"path": work}},
        )
        start = time.perf_counter()
        error = None
        try:
            client.execute(env=kernel_env)
        except Exception as failure:  # a cell that fails for another reason than a claim
            error = f"{type(failure).__name__}: {str(failure)[-2000:]}"
        seconds = time.perf_counter() - start
        claims = [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []
    name = path.relative_to(ROOT).as_posix()
    print(
        f"{name}  seed {seed}  {setting}: {len(claims)} claims in {seconds:.0f} s"
        + (f"  ERROR {error}" if error else "")
    )
    sys.stdout.flush()
    return {
        "notebook": name,
        "seed": seed,
        "setting": setting,
        "env": env,
        "seconds": round(seconds, 1),
        "error": error,
        "claims": claims,
    }


def summarise(runs: list[dict]) -> dict[str, dict[str, dict]]:
    """Per notebook and claim (by quantity): the values of every run against the bounds the notebook's
    source states now (``l4lab.claims.notebook_claims``)."""
    table: dict[str, dict[str, dict]] = {}
    for notebook in dict.fromkeys(run["notebook"] for run in runs):
        mine = [run for run in runs if run["notebook"] == notebook]
        table[notebook] = {}
        for claim in notebook_claims(ROOT / notebook):
            values = [
                {"seed": run["seed"], "setting": run["setting"], "value": c["value"]}
                for run in mine
                for c in run["claims"]
                if c["quantity"] == claim.quantity
            ]
            numbers = [v["value"] for v in values]
            table[notebook][claim.quantity] = (
                {**spread(claim, numbers), "fmt": claim.fmt, "values": values}
                if numbers
                else {"line": str(claim), "runs": 0, "values": []}
            )
    return table


def markdown(result: dict) -> str:
    def show(entry: dict, x: float) -> str:
        return entry["fmt"].format(x) if math.isfinite(x) else str(x)

    lines = [
        "# Spread of the notebooks' claims",
        "",
        f"Measured {result['date']} by `benchmarks/claims_spread.py` on {result['machine']['cpu']} "
        f"({result['machine']['cores']} cores, best ATen kernels {result['machine']['best ATen kernels']}), "
        f"torch {result['machine']['torch']}, Python {result['machine']['python']}.",
        "",
        f"Runs per notebook: seeds {', '.join(map(str, result['seeds']))} (one thread), and seed 0 under "
        + "; ".join(
            f"{s} (`{' '.join(f'{k}={v}' for k, v in SETTINGS[s].items())}`)" for s in result["settings"]
        )
        + ". `sd` is the standard deviation over all runs, and the margin the distance from their mean "
        "to the bound in sd. `tests/test_claims.py` requires every claim to hold in every run with a margin "
        "of at least 3 sd.",
        "",
    ]
    for notebook, claims in result["claims"].items():
        lines += [
            f"## {notebook}",
            "",
            "| claim | seeds 0-4 | other settings | mean | sd | margin (sd) | held in all |",
            "|---|---|---|---:|---:|---:|---|",
        ]
        for e in claims.values():
            if not e["runs"]:
                lines.append(f"| {e['line'].removeprefix('✓ ')} | not measured | | | | | **NO** |")
                continue
            seeds = [show(e, v["value"]) for v in e["values"] if v["setting"] == "1 thread"]
            others = [show(e, v["value"]) for v in e["values"] if v["setting"] != "1 thread"]
            margin = (
                f"{e['margin_in_sd']:.1f}" if math.isfinite(e["margin_in_sd"]) else str(e["margin_in_sd"])
            )
            held = "yes" if e["held_in_all"] else "**NO**"
            lines.append(
                f"| {e['line'].removeprefix('✓ ')} | {' '.join(seeds)} | {' '.join(others)} | "
                f"{show(e, e['mean'])} | {e['sd']:.3g} | {margin} | {held} |"
            )
        lines.append("")
    times = {}
    for run in result["runs"]:
        times.setdefault(run["notebook"], []).append(run["seconds"])
    lines += ["## Run times (s)", "", "| notebook | runs | mean | max |", "|---|---:|---:|---:|"]
    lines += [f"| {n} | {len(t)} | {statistics.fmean(t):.0f} | {max(t):.0f} |" for n, t in times.items()]
    return "\n".join(lines) + "\n"


def write(result: dict, out: Path) -> int:
    """Write ``out``.json and ``out``.md; print and count the claims that did not hold in every run."""
    result["claims"] = summarise(result["runs"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(f"wrote {out.with_suffix('.md')} and .json")
    broken = [
        (n, e["line"]) for n, cs in result["claims"].items() for e in cs.values() if not e.get("held_in_all")
    ]
    for notebook, line in broken:
        print(f"claim did not hold in every run: {notebook}: {line}")
    return len(broken) + sum(1 for run in result["runs"] if run["error"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: every notebook that checks a claim")
    parser.add_argument("--seeds", nargs="*", type=int, default=list(SEEDS))
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--jobs", type=int, default=2, help="notebooks executed at once (2)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results path without suffix")
    parser.add_argument(
        "--summarise", action="store_true", help="run nothing: re-read the bounds from the notebooks"
    )
    parser.add_argument(
        "--update", action="store_true", help="replace these runs in the existing results, keep the others"
    )
    args = parser.parse_args(argv)

    if args.summarise:
        return 1 if write(json.loads(args.out.with_suffix(".json").read_text()), args.out) else 0
    paths = [p.resolve() for p in args.notebooks] or notebooks_with_claims()
    jobs = [(p, s, "1 thread", {}) for s in args.seeds for p in paths]  # seed 0 of every notebook first
    jobs += [(p, 0, name, SETTINGS[name]) for p in paths for name in args.settings]
    with ThreadPoolExecutor(args.jobs) as pool:
        runs = list(pool.map(lambda job: run_notebook(*job), jobs))
    result = {
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "seeds": args.seeds,
        "settings": args.settings,
        "runs": runs,
    }
    if args.update:
        earlier = json.loads(args.out.with_suffix(".json").read_text())
        done = {(run["notebook"], run["seed"], run["setting"]) for run in runs}
        kept = [run for run in earlier["runs"] if (run["notebook"], run["seed"], run["setting"]) not in done]
        result.update(
            seeds=sorted(set(earlier["seeds"]) | set(args.seeds)),
            settings=list(dict.fromkeys(earlier["settings"] + args.settings)),
            runs=kept + runs,
        )
    return 1 if write(result, args.out) else 0


if __name__ == "__main__":
    sys.exit(main())
