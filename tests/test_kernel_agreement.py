"""l4lab.kernels.agreement: the rule that notebook 06 and the kernel tests judge kernels by.

The oracle is hand-made error: a "kernel" that is the eager op itself must agree; one that adds an error
far above float32 rounding to the output, or returns a wrong gradient, must not.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("l4lab.kernels")

from l4lab import ops
from l4lab.kernels.agreement import errors_from_exact, fused_agrees, within_eager_error

FLOOR = 1e-6


def inputs() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(6, 32, generator=generator), torch.randn(6, 32, generator=generator)]


def test_the_reference_agrees_with_itself_outputs_and_gradients() -> None:
    assert fused_agrees(ops.EAGER.swiglu, ops.EAGER.swiglu, inputs(), FLOOR)


def test_an_output_error_above_rounding_is_caught() -> None:
    def off_by_a_little(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return ops.EAGER.swiglu(gate, up) * (1 + 1e-4)

    assert not fused_agrees(off_by_a_little, ops.EAGER.swiglu, inputs(), FLOOR)
    assert fused_agrees(off_by_a_little, ops.EAGER.swiglu, inputs(), FLOOR, grads=False) is False


class WrongBackward(torch.autograd.Function):
    """silu(gate) * up forward, but the gradient of ``up`` forgets the silu: right output, wrong backward."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, gate: torch.Tensor, up: torch.Tensor
    ) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return torch.nn.functional.silu(gate) * up

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
        gate, up = ctx.saved_tensors
        sig = torch.sigmoid(gate)
        return grad * up * sig * (1 + gate * (1 - sig)), grad * gate


def test_a_wrong_gradient_is_caught_and_only_by_the_gradient_check() -> None:
    assert fused_agrees(WrongBackward.apply, ops.EAGER.swiglu, inputs(), FLOOR, grads=False)
    assert not fused_agrees(WrongBackward.apply, ops.EAGER.swiglu, inputs(), FLOOR)


def test_errors_are_relative_to_the_largest_exact_value() -> None:
    exact = torch.tensor([4.0, -2.0], dtype=torch.float64)
    fused, eager = torch.tensor([4.0, -1.0]), torch.tensor([3.0, -2.0])
    assert errors_from_exact(fused, eager, exact) == (0.25, 0.25)
    assert within_eager_error(fused, eager, exact, floor=0.0)  # 0.25 <= 2 * 0.25
    assert not within_eager_error(fused, exact.float(), exact, floor=0.1)  # eager exact: 0.25 > 0 + 0.1
    assert within_eager_error(None, None, None, FLOOR)
    assert not within_eager_error(None, eager, exact, FLOOR)
    assert not within_eager_error(torch.tensor([float("nan"), 0.0]), eager, exact, floor=10.0)


# every module of the API reference but the kernels, imported first, as the book's autodoc does
EVERY_MODULE_THEN_THE_KERNELS = """
import importlib, sys, torch
for name in sys.argv[1:]:
    importlib.import_module(name)
print("triton" in sys.modules)
from l4lab import ops
from l4lab.kernels import FUSED, INTERPRETED
from l4lab.kernels.agreement import fused_agrees
generator = torch.Generator().manual_seed(0)
x, weight = torch.randn(6, 32, generator=generator), torch.randn(32, generator=generator)
print(INTERPRETED, fused_agrees(
    lambda a, w: FUSED.rms_norm(a, w, 1e-5), lambda a, w: ops.EAGER.rms_norm(a, w, 1e-5), [x, weight], 1e-6
))
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernels compile; no interpreter")
def test_importing_l4lab_leaves_the_kernels_importable() -> None:
    """On a CPU the kernels need Triton's interpreter, which must be on before triton is imported:
    l4lab.kernels turns it on, so no other l4lab module may import triton (torch.utils.flop_counter does).
    The book's API pages import every module, in the order of its table of contents, without
    TRITON_INTERPRET set."""
    book_api = Path(__file__).resolve().parents[1] / "book" / "api"
    modules = [page.stem for page in sorted(book_api.glob("l4lab.*.md")) if page.stem != "l4lab.kernels"]
    assert "l4lab.compare" in modules and "l4lab.labs" in modules  # the two that imported flop_counter
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, "-c", EVERY_MODULE_THEN_THE_KERNELS, *modules]
    done = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "True", "True"]  # triton not imported; interpreted; agrees
