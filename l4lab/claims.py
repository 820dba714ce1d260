"""Claims, not digits: how the notebooks check what their text says.

The last digits of a trained result depend on the machine. AVX2 and AVX-512 kernels, MKL's code paths
and the number of threads sum in different orders; a few hundred training steps amplify a difference in
the last bit of one product into a different second decimal. Text comparison of a trained result can
only pass on the machine that stored it. So the notebooks print their measured numbers for the reader,
and check the CLAIM the text makes about them::

    claim("iRoPE's accuracy at 16x the training length", accuracy, at_least=0.9, fmt="{:.0%}")

prints ``✓ iRoPE's accuracy at 16x the training length >= 90%``: the same line on every machine, which
is what nbval compares. A claim that does not hold raises :class:`ClaimError`, naming the claim, the
measured value and the allowed range.

Every bound comes from a measured spread, never from the one run at hand:
``benchmarks/claims_spread.py`` re-executes each notebook under five seeds (:func:`seed` reads
``L4LAB_SEED``) and under other numeric settings, with ``L4LAB_CLAIMS_RECORD`` naming a file where
:func:`claim` records each value instead of raising; ``benchmarks/results/claims_spread.md`` holds the
values, and ``tests/test_claims.py`` checks that every claim in a notebook held in every recorded run.

Comparisons of two computations that should agree (your function and l4lab's, fused and eager) use
:func:`agree`: the largest difference relative to the largest magnitude, within a tolerance set by the
dtype (:data:`TOLERANCE`). That verdict is the same on every CPU and at every thread count.
"""

from __future__ import annotations

import ast
import json
import math
import os
import statistics
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

__all__ = [
    "RECORD_VARIABLE",
    "SEED_VARIABLE",
    "TOLERANCE",
    "Claim",
    "ClaimError",
    "agree",
    "claim",
    "notebook_claims",
    "relative_error",
    "seed",
    "spread",
]

SEED_VARIABLE = "L4LAB_SEED"
RECORD_VARIABLE = "L4LAB_CLAIMS_RECORD"

# How far two computations of the same function may differ in each dtype, relative to the largest
# magnitude of the result. The same maths summed in another order differs by a few units in the last
# place per operation (float32: 1.2e-7); 1e-4 leaves room for hundreds of them through a whole model
# while a wrong formula (a missing scale, a shifted mask, another rotation) differs by 1e-2 or more.
# 16-bit types round every stored value (float16 1e-3, bfloat16 8e-3), so they get a few of their units.
TOLERANCE: dict[torch.dtype, float] = {
    torch.float64: 1e-10,
    torch.float32: 1e-4,
    torch.float16: 1e-2,
    torch.bfloat16: 5e-2,
}


class ClaimError(AssertionError):
    """A claim did not hold: its message names the claim, the measured value and the allowed range."""


@dataclass(frozen=True)
class Claim:
    """One checked claim: ``quantity`` must lie in [``at_least``, ``at_most``] (either may be open)."""

    quantity: str
    value: float
    at_least: float | None = None
    at_most: float | None = None
    fmt: str = "{:.3g}"

    @property
    def holds(self) -> bool:
        if math.isnan(self.value):
            return False
        return (self.at_least is None or self.value >= self.at_least) and (
            self.at_most is None or self.value <= self.at_most
        )

    @property
    def bound(self) -> str:
        """The allowed range as text: ``>= 90%``, ``<= 0.05`` or ``between 0.2 and 0.4``."""
        low = None if self.at_least is None else self.fmt.format(self.at_least)
        high = None if self.at_most is None else self.fmt.format(self.at_most)
        if low is not None and high is not None:
            return f"between {low} and {high}"
        return f">= {low}" if low is not None else f"<= {high}"

    def __str__(self) -> str:
        return f"✓ {self.quantity} {self.bound}"


def claim(
    quantity: str,
    value: float,
    *,
    at_least: float | None = None,
    at_most: float | None = None,
    fmt: str = "{:.3g}",
) -> None:
    """Check that ``value`` (a measured ``quantity``) lies within the bounds; print the claim, not the value.

    Prints ``✓ <quantity> >= <at_least>`` (or ``<=``, or ``between``), formatted with ``fmt``, and
    returns nothing, so that a notebook cell ending with a claim shows no value. Raises
    :class:`ClaimError` with the value and the range when the claim does not hold. With
    ``L4LAB_CLAIMS_RECORD`` set to a file path, appends the claim and its value to that file as one JSON
    line and does not raise (``benchmarks/claims_spread.py`` collects them).
    """
    if at_least is None and at_most is None:
        raise ValueError(f"claim {quantity!r} needs at_least, at_most or both")
    if at_least is not None and at_most is not None and at_least > at_most:
        raise ValueError(f"claim {quantity!r}: at_least {at_least} is above at_most {at_most}")
    result = Claim(quantity, float(value), at_least, at_most, fmt)
    record = os.environ.get(RECORD_VARIABLE)
    if record:
        with open(record, "a", encoding="utf-8") as file:
            file.write(json.dumps({**asdict(result), "line": str(result), "holds": result.holds}) + "\n")
    elif not result.holds:
        raise ClaimError(
            f"claim does not hold: {quantity} should be {result.bound}, measured {fmt.format(result.value)}"
            f" ({result.value!r})"
        )
    print(result)


def notebook_claims(path: str | os.PathLike[str]) -> list[Claim]:
    """The claims a notebook's code makes, read from its source: quantity, bounds and format (value NaN).

    Each ``claim(...)`` call must spell its quantity, bounds and ``fmt`` as literals, so that the claim can
    be read without running the notebook (``tests/test_claims.py`` compares it with the measured spread).
    """
    found = []
    for cell in json.loads(Path(path).read_text(encoding="utf-8"))["cells"]:
        if cell["cell_type"] != "code":
            continue
        source = "".join(cell["source"])
        code = "\n".join(line for line in source.splitlines() if not line.lstrip().startswith(("%", "!")))
        for node in ast.walk(ast.parse(code)):
            if not (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "claim"):
                continue
            try:
                quantity = ast.literal_eval(node.args[0])
                options = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
            except (ValueError, IndexError):
                raise ValueError(
                    f"{path}: claim(...) must spell its quantity and bounds as literals: {ast.unparse(node)}"
                ) from None
            found.append(Claim(quantity, math.nan, **options))
    return found


def spread(claim: Claim, values: list[float]) -> dict[str, float | int | bool | str]:
    """How measured ``values`` (one per run) sit against ``claim``'s bounds.

    Returns the claim's printed ``line``, the number of ``runs``, ``min``, ``max``, ``mean``, the
    standard deviation ``sd``, the ``margin`` from the mean to the nearer bound (negative: outside) and
    the same in standard deviations, and whether the claim ``held_in_all`` runs.
    """
    if not values:
        raise ValueError(f"no measured values for the claim {claim.quantity!r}")
    low, high = claim.at_least, claim.at_most
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    margins = ([] if low is None else [mean - low]) + ([] if high is None else [high - mean])
    margin = min(margins)
    return {
        "line": str(claim),
        "runs": len(values),
        "min": min(values),
        "max": max(values),
        "mean": mean,
        "sd": sd,
        "margin": margin,
        "margin_in_sd": margin / sd if sd > 0 else (math.inf if margin >= 0 else -math.inf),
        "held_in_all": all(replace(claim, value=float(x)).holds for x in values),
    }


def seed() -> int:
    """The notebook's seed: 0, or ``L4LAB_SEED`` when ``benchmarks/claims_spread.py`` measures the spread."""
    text = os.environ.get(SEED_VARIABLE, "0")
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{SEED_VARIABLE} must be an integer, got {text!r}") from None


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """``max |got - expected| / max |expected|``, in float64: the error relative to the result's scale.

    Scaling by the largest magnitude, not element by element, keeps values near zero (where an
    element-wise relative error explodes) from deciding the verdict.
    """
    if got.shape != expected.shape:
        raise ValueError(f"shapes differ: {tuple(got.shape)} and {tuple(expected.shape)}")
    got, expected = got.detach().double().cpu(), expected.detach().double().cpu()
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    difference = float((got - expected).abs().max()) if expected.numel() else 0.0
    if scale == 0.0:
        return 0.0 if difference == 0.0 else math.inf
    return difference / scale


def agree(got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None) -> bool:
    """Do two computations of the same function agree? Within ``TOLERANCE[dtype]`` relative to the largest
    magnitude (``dtype`` defaults to the less precise of the two tensors' dtypes); NaN never agrees."""
    tolerance = (
        TOLERANCE[dtype] if dtype is not None else max(TOLERANCE[got.dtype], TOLERANCE[expected.dtype])
    )
    error = relative_error(got, expected)
    return not math.isnan(error) and error <= tolerance
