"""Claims, not digits: the claim helper, the dtype-scaled comparison, and every notebook claim against the
spread measured over seeds and numeric settings (benchmarks/results/claims_spread.json)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nbformat
import pytest
import torch

from l4lab import claims
from l4lab.claims import Claim, ClaimError, agree, claim, relative_error

ROOT = Path(__file__).resolve().parents[1]
SPREAD = ROOT / "benchmarks" / "results" / "claims_spread.json"
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb")) + sorted(
    (ROOT / "notebooks/labs/solutions").glob("*.ipynb")
)


# ---------------------------------------------------------------------- the helper
def test_a_claim_that_holds_prints_its_bound_not_its_value(capsys, monkeypatch):
    monkeypatch.delenv(claims.RECORD_VARIABLE, raising=False)
    shown = claim("iRoPE's accuracy at 16x", 0.9688, at_least=0.9, fmt="{:.0%}")
    assert shown is None  # a notebook cell ending with a claim displays no value
    assert capsys.readouterr().out == "✓ iRoPE's accuracy at 16x >= 90%\n"
    claim("a loss gap", -0.01, at_most=0.05)
    claim("a rate", 0.3, at_least=0.2, at_most=0.4)
    assert capsys.readouterr().out.splitlines() == ["✓ a loss gap <= 0.05", "✓ a rate between 0.2 and 0.4"]


@pytest.mark.parametrize(
    ("value", "bounds", "message"),
    [
        (0.85, dict(at_least=0.9), "iRoPE at 16x should be >= 0.9, measured 0.85"),
        (0.5, dict(at_most=0.2), "iRoPE at 16x should be <= 0.2, measured 0.5"),
        (0.1, dict(at_least=0.2, at_most=0.4), "should be between 0.2 and 0.4, measured 0.1"),
        (math.nan, dict(at_least=0.0), "should be >= 0, measured nan"),
    ],
)
def test_a_claim_that_fails_names_the_claim_the_value_and_the_range(value, bounds, message, monkeypatch):
    monkeypatch.delenv(claims.RECORD_VARIABLE, raising=False)
    with pytest.raises(ClaimError, match="claim does not hold") as error:
        claim("iRoPE at 16x", value, **bounds)
    assert message in str(error.value)


def test_a_claim_needs_a_sensible_range():
    with pytest.raises(ValueError, match="needs at_least, at_most or both"):
        claim("x", 1.0)
    with pytest.raises(ValueError, match="at_least 2 is above at_most 1"):
        claim("x", 1.0, at_least=2, at_most=1)


def test_record_mode_writes_every_claim_and_raises_for_none(tmp_path, monkeypatch, capsys):
    record = tmp_path / "claims.jsonl"
    monkeypatch.setenv(claims.RECORD_VARIABLE, str(record))
    claim("holds", 1.0, at_least=0.5)
    claim("fails", 0.1, at_least=0.5)  # recorded, not raised: the spread script sees every run's value
    rows = [json.loads(line) for line in record.read_text().splitlines()]
    assert [(r["quantity"], r["value"], r["holds"], r["line"]) for r in rows] == [
        ("holds", 1.0, True, "✓ holds >= 0.5"),
        ("fails", 0.1, False, "✓ fails >= 0.5"),
    ]


def test_seed_reads_the_environment(monkeypatch):
    monkeypatch.delenv(claims.SEED_VARIABLE, raising=False)
    assert claims.seed() == 0
    monkeypatch.setenv(claims.SEED_VARIABLE, "3")
    assert claims.seed() == 3
    monkeypatch.setenv(claims.SEED_VARIABLE, "three")
    with pytest.raises(ValueError, match="L4LAB_SEED must be an integer, got 'three'"):
        claims.seed()


# ---------------------------------------------------------------------- comparing two computations
def test_relative_error_is_scaled_by_the_largest_magnitude():
    expected = torch.tensor([1000.0, 1e-3, -2.0])
    got = expected + torch.tensor([0.0, 1e-2, 0.0])  # 10x off on a tiny value: tiny against the scale
    assert relative_error(got, expected) == pytest.approx(1e-5)
    assert relative_error(torch.zeros(3), torch.zeros(3)) == 0.0
    assert relative_error(torch.ones(3), torch.zeros(3)) == math.inf
    with pytest.raises(ValueError, match=r"shapes differ: \(3,\) and \(2,\)"):
        relative_error(torch.ones(3), torch.ones(2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_agree_accepts_another_summation_order_and_rejects_a_wrong_formula(dtype):
    """The float64 product is the oracle; the same product in ``dtype``, summed in another order, agrees;
    a formula off by 1% (a wrong scale) or with one row shifted does not."""
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 256, generator=generator), torch.randn(256, 32, generator=generator)
    exact = (a.double() @ b.double()).to(dtype)
    forward = a.to(dtype) @ b.to(dtype)
    backward = (a.to(dtype).flip(1) @ b.to(dtype).flip(0)).to(dtype)  # the other order of the sum
    assert agree(forward, exact) and agree(backward, exact) and agree(forward, backward)
    assert not agree(1.01 * forward.float(), exact.float(), dtype=torch.float32)
    assert not agree(forward.roll(1, 0), exact)
    assert not agree(torch.full_like(forward, math.nan), exact)


def test_agree_uses_the_less_precise_dtype():
    x = torch.randn(100, generator=torch.Generator().manual_seed(1))
    rounded = x.to(torch.bfloat16)
    assert agree(rounded, x)  # bfloat16's tolerance: its rounding is not an error
    assert not agree(rounded.float(), x)  # in float32 the same rounding is far beyond 1e-4


# ---------------------------------------------------------------------- notebook claims vs measured spread
def stored_claim_lines(path: Path) -> list[str]:
    """The claim lines ("✓ ...") in a notebook's stored outputs."""
    lines = []
    for cell in nbformat.read(path, as_version=4).cells:
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream" and output.get("name") == "stdout":
                lines += [line for line in output["text"].splitlines() if line.startswith("✓ ")]
    return lines


def measured() -> dict:
    return json.loads(SPREAD.read_text())


def test_notebook_claims_reads_literal_claims_and_refuses_computed_bounds(tmp_path):
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [
        nbformat.v4.new_code_cell(
            '%time x = 1\nclaim("a rate", rate, at_least=0.2, at_most=0.4, fmt="{:.0%}")'
        ),
        nbformat.v4.new_markdown_cell('claim("not code", 1, at_least=0)'),
    ]
    path = tmp_path / "n.ipynb"
    nbformat.write(notebook, path)
    (found,) = claims.notebook_claims(path)
    assert (found.quantity, found.at_least, found.at_most, str(found)) == (
        "a rate",
        0.2,
        0.4,
        "✓ a rate between 20% and 40%",
    )
    notebook.cells = [nbformat.v4.new_code_cell('claim("a rate", rate, at_least=best - 0.1)')]
    nbformat.write(notebook, path)
    with pytest.raises(ValueError, match="must spell its quantity and bounds as literals"):
        claims.notebook_claims(path)


def test_spread_measures_the_margin_in_standard_deviations():
    result = claims.spread(Claim("x", math.nan, at_least=0.5), [0.9, 1.0, 1.1])
    assert result["mean"] == pytest.approx(1.0) and result["sd"] == pytest.approx(0.1)
    assert result["margin_in_sd"] == pytest.approx(5.0) and result["held_in_all"]
    assert not claims.spread(Claim("x", math.nan, at_most=1.05), [0.9, 1.0, 1.1])["held_in_all"]


def test_the_spread_was_measured_over_five_seeds_and_three_numeric_paths():
    result = measured()
    assert len(set(result["seeds"])) >= 5
    assert len(result["settings"]) >= 3
    assert not [r for r in result["runs"] if r["error"]], "a notebook failed in the spread run"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_notebook_claim_held_in_every_measured_run(path):
    """Each claim in a notebook's code is printed in its stored outputs, was measured in every run of the
    spread (every seed and numeric setting), held in all of them, and has its bound at least three
    standard deviations from the runs' mean."""
    name = path.relative_to(ROOT).as_posix()
    made = claims.notebook_claims(path)
    assert sorted(stored_claim_lines(path)) == sorted(str(c) for c in made), (
        f"{name}: the stored claim lines are not the claims of its code: re-execute it"
    )
    if not made:
        return
    runs = [r for r in measured()["runs"] if r["notebook"] == name]
    assert runs, f"{name} is not in {SPREAD.name}: run benchmarks/claims_spread.py"
    for made_claim in made:
        quantity = made_claim.quantity
        values = [c["value"] for r in runs for c in r["claims"] if c["quantity"] == quantity]
        assert len(values) == len(runs), f"{name}: {quantity!r} was not measured in every run"
        result = claims.spread(made_claim, values)
        assert result["held_in_all"], f"{name}: {result['line']!r} failed in a measured run: {values}"
        assert result["margin"] >= 3 * result["sd"], (
            f"{name}: {result['line']!r}: mean {result['mean']:.4g} is {result['margin_in_sd']:.1f} sd "
            "from the bound, under 3"
        )
