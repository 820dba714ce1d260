"""l4lab.kernels.agreement: the rule that notebook 06 and the kernel tests judge kernels by.

The oracle is hand-made error: a "kernel" that is the eager op itself must agree; one that adds an error
far above float32 rounding to the output, or returns a wrong gradient, must not.
"""

from __future__ import annotations

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
