"""When does a kernel agree with its reference? Within twice the eager backend's own rounding error.

A fused kernel and the eager PyTorch reference both round; neither is "the truth". The oracle is the
eager reference evaluated in float64. A kernel passes when its error from that oracle is at most twice
the eager backend's error in the same dtype, plus a small absolute floor (relative to the oracle's
largest magnitude), so that an op whose eager error is zero is not held to zero::

    error(x) = max |x - exact| / max |exact|        fused passes when  error(fused) <= 2 error(eager) + floor

:func:`fused_agrees` runs both on the same inputs and compares every floating output and the gradient of
every floating input (under one fixed random upstream gradient, so a wrong backward cannot hide behind a
sum). Notebook 06 and the kernel tests (``tests/kernel_testing.py``) use this one rule.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["errors_from_exact", "fused_agrees", "outputs_and_gradients", "within_eager_error"]


def errors_from_exact(fused: Tensor, eager: Tensor, exact: Tensor) -> tuple[float, float]:
    """(fused error, eager error): the largest difference from ``exact`` over ``exact``'s largest value."""
    exact = exact.detach().double().cpu()
    scale = float(exact.abs().max()) or 1.0
    fused_error = float((fused.detach().double().cpu() - exact).abs().max()) / scale
    eager_error = float((eager.detach().double().cpu() - exact).abs().max()) / scale
    return fused_error, eager_error


def within_eager_error(
    fused: Tensor | None, eager: Tensor | None, exact: Tensor | None, floor: float
) -> bool:
    """The rule above. ``None`` (an input no output depends on has no gradient) agrees only with ``None``."""
    if fused is None or eager is None or exact is None:
        return fused is None and eager is None and exact is None
    if fused.shape != exact.shape or not bool(torch.isfinite(fused).all()):
        return False
    fused_error, eager_error = errors_from_exact(fused, eager, exact)
    return fused_error <= 2 * eager_error + floor


def outputs_and_gradients(
    fn: Callable[..., Any], inputs: Sequence[Any], dtype: torch.dtype, grads: bool = True
) -> list[Tensor | None]:
    """``fn``'s floating outputs on ``inputs`` cast to ``dtype``, then (if ``grads``) the gradients of the
    floating inputs under a fixed random upstream gradient (seed 1, drawn in float64). Non-floating
    inputs (expert indices, flags, sizes) pass through unchanged."""
    xs = [
        x.detach().to(dtype).requires_grad_(grads) if torch.is_tensor(x) and x.is_floating_point() else x
        for x in inputs
    ]
    results = fn(*xs)
    outputs = [
        out
        for out in (results if isinstance(results, tuple) else (results,))
        if torch.is_tensor(out) and out.is_floating_point()
    ]
    if not grads:
        return list(outputs)
    upstream = torch.Generator().manual_seed(1)
    loss = sum(
        (out * torch.randn(out.shape, generator=upstream, dtype=torch.float64).to(out.device, dtype)).sum()
        for out in outputs
    )
    loss.backward()
    return [*outputs, *(x.grad for x in xs if torch.is_tensor(x) and x.requires_grad)]


def fused_agrees(
    fused_fn: Callable[..., Any],
    eager_fn: Callable[..., Any],
    inputs: Sequence[Any],
    floor: float,
    grads: bool = True,
) -> bool:
    """``fused_fn`` agrees with ``eager_fn`` on ``inputs``: outputs (and input gradients) by the rule above,
    in the dtype of the first input, against ``eager_fn`` in float64."""
    dtype = inputs[0].dtype
    fused = outputs_and_gradients(fused_fn, inputs, dtype, grads)
    eager = outputs_and_gradients(eager_fn, inputs, dtype, grads)
    exact = outputs_and_gradients(eager_fn, inputs, torch.float64, grads)
    if not len(fused) == len(eager) == len(exact):
        return False
    return all(within_eager_error(*triple, floor) for triple in zip(fused, eager, exact, strict=True))
