"""Classroom labs: a student writes one piece of Llama 4, and a checker says whether it is right.

Each lab is a notebook in ``notebooks/labs/`` (the worked solutions are in ``notebooks/labs/solutions/``):
a short brief, then exercise cells whose function bodies read ``raise NotImplementedError``, each
followed by its check::

    from l4lab import labs

    def rms_norm(x, weight, eps):
        ...

    labs.check("1.1", rms_norm)  # ✓ 1.1 passed: 6 cases   (or what failed, and a hint)

:func:`check` runs the student's function on hidden, seeded cases (batch 1, odd lengths, sizes that
are not powers of two, a chunk size that does not divide the length, experts that receive no token...)
and compares every answer with l4lab's own implementation (``l4lab.ops``, ``l4lab.model``,
``l4lab.routing``). It never raises on a wrong answer: it returns a :class:`CheckResult` naming the
first case that failed, the expected and the received shapes or values, and a hint. When the answer
matches a typical mistake (rotate-half RoPE, a softmax router, a sliding window instead of chunks...)
the hint names that mistake. Exceptions raised by the student's function are caught and reported with
the case that triggered them and the line of the student's code that raised.

======================  =========================================================================
:func:`steps`           every step with a one-line description (``steps("2")``: one lab's)
:func:`check`           run a step's hidden cases on a function; returns a :class:`CheckResult`
:func:`case`            one case's inputs and expected output, to debug a failure by hand
:func:`train_tiny_moe`  lab 4's model: a tiny 8-expert Llama 4 trained briefly on the data mixture
                        (returns a :class:`TinyMoE`: model, held-out data, history)
======================  =========================================================================

Step 2.3 also measures the work: ``torch.utils.flop_counter.FlopCounterMode`` counts the FLOPs of the
student's dispatch at 2 and at 16 experts, which must not grow (when no matmul is counted, the elements
the operations write are counted instead, so a broadcast multiply over every expert is caught too).

The labs (``LABS``): 1 ``rmsnorm_rope``, 2 ``router_moe``, 3 ``chunked_attention``,
4 ``routing_experiment``. A step is named ``"<lab>.<step>"``, e.g. ``"1.3"`` (``"rmsnorm_rope.3"``
works too).
"""

from __future__ import annotations

import html
import math
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from l4lab import ops, routing
from l4lab.claims import TOLERANCE
from l4lab.config import preset
from l4lab.data import TokenDataset, mixture
from l4lab.model import MoE, Router, RoutingRecord, rope_angles, rope_inverse_frequencies

__all__ = [
    "LABS",
    "TINY_MOE_CONFIG",
    "CheckResult",
    "TinyMoE",
    "case",
    "check",
    "steps",
    "train_tiny_moe",
]

LABS: dict[str, str] = {
    "1": "rmsnorm_rope",
    "2": "router_moe",
    "3": "chunked_attention",
    "4": "routing_experiment",
}


# ====================================================================== results
@dataclass(frozen=True)
class CheckResult:
    """What :func:`check` found. ``passed``; ``message``: the text shown (one line when it passed);
    ``cases``: how many cases ran; ``failed_case``: the 1-based number of the failing case, or None.

    In a notebook it shows as a short green line or a red explanation; ``bool(result)`` is ``passed``.
    """

    step: str
    passed: bool
    message: str
    cases: int = 0
    failed_case: int | None = None

    def __bool__(self) -> bool:
        return self.passed

    def __repr__(self) -> str:
        return self.message

    __str__ = __repr__

    def _repr_html_(self) -> str:
        if self.passed:
            return f'<div style="color:#1a7f37;font-weight:600">{html.escape(self.message)}</div>'
        return (
            '<pre style="color:#b42318;white-space:pre-wrap;font-size:0.95em;margin:0">'
            f"{html.escape(self.message)}</pre>"
        )


# ====================================================================== machinery
@dataclass
class _Case:
    label: str
    args: tuple[Any, ...]
    expected: Any


@dataclass(frozen=True)
class _Mistake:
    """A typical wrong answer: if the student's output equals ``fn(*args)`` on the failing case, the
    failure message gives ``hint``."""

    name: str
    fn: Callable[..., Any]
    hint: str


@dataclass(frozen=True)
class _Step:
    id: str
    function: str
    params: tuple[str, ...]
    summary: str
    cases: Callable[[], list[_Case]]
    compare: Callable[[Any, Any], str | None]  # (expected, got) -> what differs, or None
    mistakes: tuple[_Mistake, ...]
    hint: str  # when no known mistake matches
    extra: Callable[[Callable[..., Any]], tuple[str | None, str]] | None = None  # -> (failure, note)
    output_hints: tuple[tuple[Callable[[Any], bool], str], ...] = field(default=())

    @property
    def lab(self) -> str:
        return LABS[self.id.split(".")[0]]

    @property
    def signature(self) -> str:
        return f"{self.function}({', '.join(self.params)})"


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"{str(value.dtype).removeprefix('torch.')} {list(value.shape)}"
    if isinstance(value, (tuple, list)) and value and all(isinstance(v, Tensor) for v in value):
        return "(" + ", ".join(_describe(v) for v in value) + ")"
    if isinstance(value, float):
        return f"{value:g}"
    return repr(value)


def _inputs_line(step: _Step, args: Sequence[Any]) -> str:
    return ", ".join(f"{name}={_describe(value)}" for name, value in zip(step.params, args, strict=True))


def _clone(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.clone()
    if isinstance(value, tuple):
        return tuple(_clone(v) for v in value)
    if isinstance(value, list):
        return [_clone(v) for v in value]
    return value


def _changed_inputs(step: _Step, original: Sequence[Any], passed: Sequence[Any]) -> list[str]:
    changed = []
    for name, before, after in zip(step.params, original, passed, strict=True):
        pairs = (
            list(zip(before, after, strict=True)) if isinstance(before, (tuple, list)) else [(before, after)]
        )
        for b, a in pairs:
            if isinstance(b, Tensor) and not (b.shape == a.shape and torch.equal(b, a)):
                changed.append(name)
                break
    return changed


def _student_line(error: BaseException) -> str:
    """Where in the student's code the exception came from (the last frame outside torch and l4lab)."""
    frames = traceback.extract_tb(error.__traceback__)
    for frame in reversed(frames):
        path = Path(frame.filename).as_posix()
        if "/torch/" in path or path.endswith("l4lab/labs.py") or "/site-packages/" in path:
            continue
        code = (frame.line or "").strip()
        return f"in {frame.name}, line {frame.lineno}: {code}" if code else f"in {frame.name}"
    return ""


def _format_number(x: float) -> str:
    if math.isnan(x) or math.isinf(x):
        return str(x)
    return f"{x:.4f}" if x == 0 or 1e-3 <= abs(x) < 1e4 else f"{x:.4g}"


def _numbers(row: Tensor, around: int, width: int = 6) -> str:
    start = max(0, min(around - width // 2, row.numel() - width))
    values = [_format_number(float(v)) for v in row[start : start + width]]
    prefix = "..., " if start > 0 else ""
    suffix = ", ..." if start + width < row.numel() else ""
    return "[" + prefix + ", ".join(values) + suffix + "]"


def _as_tensor(got: Any, name: str) -> tuple[Tensor | None, str | None]:
    if got is None:
        return None, f"{name}: your function returned None (is a `return` missing?)"
    if isinstance(got, Tensor):
        return got, None
    if isinstance(got, (tuple, list)) and got and all(isinstance(g, Tensor) for g in got):
        return None, f"{name}: expected one tensor, got a {type(got).__name__} of {len(got)} tensors"
    try:
        return torch.as_tensor(got), None
    except Exception:
        return None, f"{name}: expected a tensor, got {type(got).__name__}"


def _compare_tensor(
    expected: Tensor, got: Any, name: str = "output", rtol: float | None = None, atol: float | None = None
) -> str | None:
    """None when ``got`` equals ``expected``, else what differs. Numbers are close when
    ``|got - expected| <= atol + rtol * |expected|``; by default ``rtol`` is the dtype's tolerance
    (``l4lab.claims.TOLERANCE``, the less precise of the two dtypes) and ``atol`` that times the largest
    ``|expected|``, so that the verdict does not depend on the CPU or the thread count that computed it."""
    tensor, problem = _as_tensor(got, name)
    if problem is not None or tensor is None:
        return problem
    got = tensor.detach().cpu()
    if tuple(got.shape) != tuple(expected.shape):
        return f"{name}: expected shape {tuple(expected.shape)}, got {tuple(got.shape)}"
    if expected.dtype == torch.bool:
        if got.dtype != torch.bool:
            return (
                f"{name}: expected a bool tensor (True = visible), got dtype "
                f"{str(got.dtype).removeprefix('torch.')}"
            )
        wrong = got != expected
    else:
        if got.is_complex():
            return f"{name}: expected real numbers, got a complex tensor (torch.view_as_real converts)"
        if got.dtype == torch.bool:
            return f"{name}: expected numbers ({expected.dtype}), got a bool tensor"
        g64, e64 = got.double(), expected.double()
        if rtol is None:
            rtol = max(TOLERANCE.get(dtype, 0.0) for dtype in (expected.dtype, got.dtype))
        if atol is None:
            atol = rtol * float(e64.abs().max()) if e64.numel() else 0.0
        wrong = ~torch.isclose(g64, e64, rtol=rtol, atol=atol, equal_nan=False)
    if not bool(wrong.any()):
        return None
    index = tuple(int(i) for i in wrong.nonzero()[0])
    count = int(wrong.sum())
    where = f"[{', '.join(str(i) for i in index)}]" if index else "(the single value)"
    if expected.dtype == torch.bool:
        if expected.dim() == 2:
            row = index[0]

            def draw(mask: Tensor) -> str:
                return "".join("#" if bool(v) else "." for v in mask[row])

            return (
                f"{name}: {count} of {expected.numel()} entries differ, first at {where}; "
                f"row {row} (query {row}, # = visible):\n"
                f"      expected {draw(expected)}\n      got      {draw(got)}"
            )
        return f"{name}: {count} of {expected.numel()} entries differ, first at {where}"
    g64, e64 = got.double(), expected.double()
    if bool(torch.isnan(g64).any()):
        first_nan = tuple(int(i) for i in torch.isnan(g64).nonzero()[0])
        return f"{name}: your output holds NaN (first at {list(first_nan)}), expected finite numbers"
    message = (
        f"{name}: {count} of {expected.numel()} values differ (largest difference "
        f"{float((g64 - e64).abs().max()):.3g}); first at {where}: expected "
        f"{_format_number(float(e64[index]))}, got {_format_number(float(g64[index]))}"
    )
    if expected.dim() >= 1 and expected.shape[-1] > 1:
        row = index[:-1]
        message += (
            f"\n      expected {name}{list(row) if row else ''}[...] = {_numbers(e64[row], index[-1])}"
            f"\n      got      {name}{list(row) if row else ''}[...] = {_numbers(g64[row], index[-1])}"
        )
    return message


def _compare_float(expected: float, got: Any, name: str = "result") -> str | None:
    if got is None:
        return f"{name}: your function returned None (is a `return` missing?)"
    if isinstance(got, Tensor) and got.numel() != 1:
        return f"{name}: expected one number, got a tensor of shape {tuple(got.shape)}"
    try:
        value = float(got)
    except Exception:
        return f"{name}: expected one number (a float), got {type(got).__name__}"
    if math.isnan(value):
        return f"{name}: expected {_format_number(expected)}, got nan"
    if not math.isclose(value, expected, rel_tol=1e-5, abs_tol=1e-6):
        return f"{name}: expected {expected:.6f}, got {value:.6f}"
    return None


def _compare_floats(names: Sequence[str]) -> Callable[[Any, Any], str | None]:
    def compare(expected: Any, got: Any) -> str | None:
        if got is None:
            return "your function returned None (is a `return` missing?)"
        if not isinstance(got, (tuple, list)) or len(got) != len(names):
            return f"expected a tuple of {len(names)} numbers ({', '.join(names)}), got {type(got).__name__}"
        for name, e, g in zip(names, expected, got, strict=True):
            problem = _compare_float(e, g, name)
            if problem:
                return problem
        return None

    return compare


def _run(fn: Callable[..., Any], args: Sequence[Any]) -> tuple[Any, BaseException | None]:
    try:
        return fn(*args), None
    except Exception as error:  # the student's bug, reported rather than raised
        return None, error


def _known_mistake(step: _Step, case: _Case, got: Any) -> _Mistake | None:
    for mistake in step.mistakes:
        try:
            wrong = mistake.fn(*_clone(case.args))
            if step.compare(wrong, got) is None:
                return mistake
        except Exception:
            continue
    return None


def _steps_table() -> dict[str, _Step]:
    return {s.id: s for s in _STEPS}


def _resolve(step: str) -> _Step | None:
    table = _steps_table()
    step = str(step).strip()
    if step in table:
        return table[step]
    lab, _, number = step.partition(".")
    for key, name in LABS.items():
        if lab == name and f"{key}.{number}" in table:
            return table[f"{key}.{number}"]
    return None


# ====================================================================== public API
def steps(lab: str | int | None = None) -> list[str]:
    """Every step as ``"1.1  rms_norm(x, weight, eps) — what it computes"``; ``lab`` ("1" or
    "rmsnorm_rope") keeps one lab's."""
    lines = []
    for s in _STEPS:
        number = s.id.split(".")[0]
        if lab is not None and str(lab) not in (number, LABS[number]):
            continue
        lines.append(f"{s.id}  {s.signature} — {s.summary}")
    return lines


def case(step: str, number: int) -> dict[str, Any]:
    """The inputs and expected output of case ``number`` (1-based, as failure messages count) of ``step``:
    ``{"label": ..., "inputs": {name: value}, "expected": ...}``. Call your function on
    ``**case(...)["inputs"]`` to reproduce a failure."""
    resolved = _resolve(step)
    if resolved is None:
        raise ValueError(f"unknown step {step!r}; the steps are {', '.join(s.id for s in _STEPS)}")
    cases = resolved.cases()
    if not 1 <= number <= len(cases):
        raise ValueError(f"step {resolved.id} has cases 1 to {len(cases)}; got {number}")
    chosen = cases[number - 1]
    return {
        "label": chosen.label,
        "inputs": dict(zip(resolved.params, chosen.args, strict=True)),
        "expected": chosen.expected,
    }


def check(step: str, fn: Callable[..., Any]) -> CheckResult:
    """Run the hidden cases of ``step`` (e.g. ``"1.2"``) on ``fn`` and say what went right or wrong.

    Never raises on a wrong answer or on an exception inside ``fn``: the returned :class:`CheckResult`
    says which case failed, what was expected and what came back, and gives a hint.
    """
    resolved = _resolve(step)
    if resolved is None:
        known = ", ".join(s.id for s in _STEPS)
        return CheckResult(str(step), False, f"✗ unknown step {step!r}: the steps are {known}")
    if not callable(fn):
        return CheckResult(
            resolved.id,
            False,
            f"✗ {resolved.id}: pass the function itself, e.g. labs.check({resolved.id!r}, "
            f"{resolved.function}), not the result of calling it (got {type(fn).__name__})",
        )
    try:
        return _check(resolved, fn)
    except Exception as error:  # a bug of the checker must not look like the student's
        return CheckResult(
            resolved.id,
            False,
            f"✗ {resolved.id}: the checker itself failed ({type(error).__name__}: {error}). This is a bug "
            "in l4lab.labs, not in your code: please tell your teacher.",
        )


def _check(step: _Step, fn: Callable[..., Any]) -> CheckResult:
    cases = step.cases()
    total = len(cases)
    for number, current in enumerate(cases, start=1):
        head = f"✗ {step.id} failed on case {number} of {total}: {current.label}"
        inputs = f"  inputs: {_inputs_line(step, current.args)}"
        debug = f'  (labs.case("{step.id}", {number}) gives this case\'s inputs and expected output)'
        passed = _clone(current.args)
        got, error = _run(fn, passed)
        if error is not None:
            if isinstance(error, NotImplementedError) and number == 1:
                message = (
                    f"✗ {step.id} not done yet: {step.function} still raises NotImplementedError. "
                    "Replace that line with your code and run the cell again."
                )
                return CheckResult(step.id, False, message, number, number)
            where = _student_line(error)
            lines = [
                head,
                inputs,
                f"  your function raised {type(error).__name__}: {error}",
                *([f"  {where}"] if where else []),
                f"  hint: {step.hint}",
                debug,
            ]
            return CheckResult(step.id, False, "\n".join(lines), number, number)
        problem = step.compare(current.expected, got)
        if problem is not None:
            mistake = _known_mistake(step, current, got)
            hint = mistake.hint if mistake is not None else step.hint
            for test, output_hint in step.output_hints:
                try:
                    if mistake is None and test(got):
                        hint = output_hint
                        break
                except Exception:
                    continue
            lines = [head, inputs, f"  {problem}", f"  hint: {hint}", debug]
            return CheckResult(step.id, False, "\n".join(lines), number, number)
        changed = _changed_inputs(step, current.args, passed)
        if changed:
            lines = [
                head,
                inputs,
                f"  the output is right, but your function changed its input {', '.join(changed)} in place",
                "  hint: the caller still needs its tensors: work on a copy, or use out-of-place operations "
                "(x = x * s rather than x *= s or x.mul_(s))",
                debug,
            ]
            return CheckResult(step.id, False, "\n".join(lines), number, number)
    note = ""
    if step.extra is not None:
        failure, note = step.extra(fn)
        if failure is not None:
            return CheckResult(step.id, False, f"✗ {step.id} failed: {failure}", total, None)
    plural = "case" if total == 1 else "cases"
    return CheckResult(step.id, True, f"✓ {step.id} passed: {total} {plural}{note}", total, None)


# ====================================================================== lab 1: RMSNorm and RoPE
def _ref_rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return ops.rms_norm(x, weight, eps)


def _cases_rms_norm() -> list[_Case]:
    g = _generator(101)
    specs = [
        ("batch 2, 5 tokens, dim 16", torch.randn(2, 5, 16, generator=g), 1e-5),
        ("batch 1, 1 token, odd dim 7", torch.randn(1, 1, 7, generator=g), 1e-6),
        ("a 2-D input [3, 12]", torch.randn(3, 12, generator=g), 1e-5),
        (
            "small activations (|x| ~ 0.001), where eps matters",
            1e-3 * torch.randn(2, 3, 8, generator=g),
            1e-5,
        ),
        ("a large eps (0.5)", torch.randn(4, 10, generator=g), 0.5),
        ("activations with a large mean (x ~ 5 + noise)", 5.0 + torch.randn(2, 6, 9, generator=g), 1e-5),
    ]
    cases = []
    for label, x, eps in specs:
        weight = 1.0 + 0.5 * torch.randn(x.shape[-1], generator=g)
        cases.append(_Case(label, (x, weight, eps), _ref_rms_norm(x, weight, eps)))
    return cases


def _rms_eps_outside(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return x / (x.pow(2).mean(-1, keepdim=True).sqrt() + eps) * weight


def _rms_layer_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    centred = x - x.mean(-1, keepdim=True)
    return centred / (centred.pow(2).mean(-1, keepdim=True) + eps).sqrt() * weight


def _rms_l2(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return x / (x.pow(2).sum(-1, keepdim=True) + eps).sqrt() * weight


def _rms_no_weight(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return ops.rms_norm(x, None, eps)


def _rms_first_dim(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return x / (x.pow(2).mean(0, keepdim=True) + eps).sqrt() * weight


def _rms_no_sqrt(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return x / (x.pow(2).mean(-1, keepdim=True) + eps) * weight


_RMS_MISTAKES = (
    _Mistake(
        "eps outside the square root",
        _rms_eps_outside,
        "eps goes INSIDE the square root: x / sqrt(mean(x²) + eps). Added outside, it changes the result "
        "wherever the RMS is small (as in this case).",
    ),
    _Mistake(
        "LayerNorm",
        _rms_layer_norm,
        "RMSNorm does not subtract the mean (that is LayerNorm): divide x itself by sqrt(mean(x²) + eps).",
    ),
    _Mistake(
        "L2 norm",
        _rms_l2,
        "use the MEAN of the squares, not their sum: sqrt(mean(x²)) is the L2 norm divided by sqrt(dim).",
    ),
    _Mistake(
        "no weight", _rms_no_weight, "multiply the normalised x by weight (one gain per feature) at the end."
    ),
    _Mistake(
        "wrong dimension",
        _rms_first_dim,
        "normalise over the LAST dimension, the features: mean(dim=-1, keepdim=True).",
    ),
    _Mistake(
        "no sqrt", _rms_no_sqrt, "divide by the square ROOT of mean(x²) + eps (torch.rsqrt or .sqrt())."
    ),
)


def _ref_rope_frequencies(head_dim: int, theta: float) -> Tensor:
    return rope_inverse_frequencies(head_dim, theta)


def _cases_rope_frequencies() -> list[_Case]:
    specs = [
        ("head_dim 8, theta 10000", 8, 10000.0),
        ("Llama 4: head_dim 128, theta 500000", 128, 500000.0),
        ("head_dim 6 (not a power of two)", 6, 10000.0),
        ("head_dim 2: a single pair", 2, 10000.0),
        ("head_dim 10, theta 100", 10, 100.0),
        ("head_dim 64, theta 1e6", 64, 1e6),
    ]
    return [_Case(label, (d, theta), _ref_rope_frequencies(d, theta)) for label, d, theta in specs]


_FREQ_MISTAKES = (
    _Mistake(
        "exponent i/D",
        lambda d, theta: theta ** (-torch.arange(d // 2, dtype=torch.float64) / d),
        "the exponent is 2i/head_dim for i = 0 .. head_dim/2 - 1 (torch.arange(0, head_dim, 2) / head_dim): "
        "the last pair turns about theta times slower than the first.",
    ),
    _Mistake(
        "not inverse",
        lambda d, theta: theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d),
        "these are INVERSE frequencies, theta ** (-2i/head_dim): 1.0 for the first pair, then falling.",
    ),
    _Mistake(
        "exponent 2i/(D-2)",
        lambda d, theta: theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / max(d - 2, 1)),
        "divide 2i by head_dim, not by head_dim - 2: the slowest pair is theta ** (-(head_dim-2)/head_dim).",
    ),
)


def _ref_apply_rope(x: Tensor, positions: Tensor, theta: float) -> Tensor:
    return ops.apply_rope(x, rope_angles(positions, rope_inverse_frequencies(x.shape[-1], theta)))


def _cases_apply_rope() -> list[_Case]:
    g = _generator(103)
    specs = [
        ("batch 2, 5 positions, 3 heads, head_dim 8", (2, 5, 3, 8), torch.arange(5), 10000.0),
        ("batch 1, odd length 7, 1 head, head_dim 6", (1, 7, 1, 6), torch.arange(7), 10000.0),
        ("positions 100..104 (tokens after a KV cache)", (2, 5, 2, 8), torch.arange(100, 105), 10000.0),
        ("Llama 4's theta 500000, head_dim 32", (1, 9, 2, 32), torch.arange(9), 500000.0),
        ("a single token at position 0 (no rotation at all)", (1, 1, 2, 4), torch.arange(1), 10000.0),
        ("positions in any order: [7, 3, 0, 12]", (3, 4, 2, 10), torch.tensor([7, 3, 0, 12]), 10000.0),
    ]
    cases = []
    for label, shape, positions, theta in specs:
        x = torch.randn(shape, generator=g)
        cases.append(_Case(label, (x, positions, theta), _ref_apply_rope(x, positions, theta)))
    return cases


def _rope_rotate_half(x: Tensor, positions: Tensor, theta: float) -> Tensor:
    inv_freq = rope_inverse_frequencies(x.shape[-1], theta)
    angles = positions.float()[:, None] * inv_freq[None, :]
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    first, second = x.chunk(2, dim=-1)
    rotated = torch.cat([-second, first], dim=-1)
    return x * cos[None, :, None, :] + rotated * sin[None, :, None, :]


def _rope_backwards(x: Tensor, positions: Tensor, theta: float) -> Tensor:
    return _ref_apply_rope(x, -positions, theta)


def _rope_arange(x: Tensor, positions: Tensor, theta: float) -> Tensor:
    return _ref_apply_rope(x, torch.arange(x.shape[1]), theta)


_ROPE_MISTAKES = (
    _Mistake(
        "rotate-half",
        _rope_rotate_half,
        "this is the rotate-half layout: Llama 4 pairs (2i, 2i+1), not (i, i+D/2). Take x[..., 0::2] "
        "and x[..., 1::2] as the two halves of each pair and interleave the rotated results back.",
    ),
    _Mistake(
        "rotated backwards",
        _rope_backwards,
        "you rotate the wrong way: x'_2i = x_2i cos(a) - x_2i+1 sin(a), "
        "x'_2i+1 = x_2i sin(a) + x_2i+1 cos(a), with a = position * inv_freq_i.",
    ),
    _Mistake(
        "ignores positions",
        _rope_arange,
        "rotate by the positions you are given, not by 0 .. T-1: after a KV cache the first new token "
        "sits at position 100, not 0.",
    ),
)


# ====================================================================== lab 2: router and MoE
def _ref_route(x: Tensor, router_weight: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    num_experts, dim = router_weight.shape
    router = Router(dim, num_experts, top_k)
    with torch.no_grad():
        router.weight.copy_(router_weight)
        experts, scores, _ = router(x)
    return experts, scores


def _cases_route() -> list[_Case]:
    g = _generator(201)
    specs = [
        ("6 tokens, 4 experts, top-1 (Llama 4's k)", 6, 8, 4, 1),
        ("1 token, 8 experts, top-2", 1, 8, 8, 2),
        ("7 tokens, 5 experts, top-3, dim 12", 7, 12, 5, 3),
        ("one expert (E = 1)", 4, 6, 1, 1),
        ("13 tokens, 16 experts, top-1, dim 10", 13, 10, 16, 1),
        ("top-k = E = 3: every expert chosen", 3, 5, 3, 3),
    ]
    cases = []
    for label, n, d, e, k in specs:
        x = torch.randn(n, d, generator=g)
        weight = 0.5 * torch.randn(e, d, generator=g)
        cases.append(_Case(label, (x, weight, k), _ref_route(x, weight, k)))
    return cases


def _sorted_route(experts: Tensor, scores: Tensor) -> tuple[Tensor, Tensor]:
    order = experts.argsort(dim=-1)
    return experts.gather(-1, order), scores.gather(-1, order)


def _compare_route(expected: Any, got: Any) -> str | None:
    if got is None:
        return "your function returned None (is a `return` missing?)"
    if not isinstance(got, (tuple, list)) or len(got) != 2:
        return f"expected a tuple (experts, scores), got {type(got).__name__}"
    experts, problem = _as_tensor(got[0], "experts")
    if problem or experts is None:
        return problem
    scores, problem = _as_tensor(got[1], "scores")
    if problem or scores is None:
        return problem
    want_experts, want_scores = expected
    for name, tensor, want in (("experts", experts, want_experts), ("scores", scores, want_scores)):
        if tuple(tensor.shape) != tuple(want.shape):
            return f"{name}: expected shape {tuple(want.shape)}, got {tuple(tensor.shape)}"
    if experts.dtype.is_floating_point or experts.dtype == torch.bool:
        return f"experts: expected integer expert ids, got dtype {str(experts.dtype).removeprefix('torch.')}"
    if not scores.dtype.is_floating_point:
        return f"scores: expected floating-point scores, got dtype {str(scores.dtype).removeprefix('torch.')}"
    # the order of the k choices does not matter: compare both sorted by expert id
    got_e, got_s = _sorted_route(experts.long(), scores.detach().float())
    want_e, want_s = _sorted_route(want_experts.long(), want_scores.float())
    if not torch.equal(got_e, want_e):
        token = int((got_e != want_e).any(-1).nonzero()[0])
        return (
            f"experts: token {token} should go to experts {want_e[token].tolist()}, yours chose "
            f"{got_e[token].tolist()}"
        )
    return _compare_tensor(want_s, got_s, "scores", rtol=1e-4, atol=1e-5)


def _route_parts(x: Tensor, w: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    logits = x @ w.T
    top, experts = logits.topk(k, dim=-1)
    return logits, top, experts


def _route_softmax_all(x: Tensor, w: Tensor, k: int) -> tuple[Tensor, Tensor]:
    logits, _, experts = _route_parts(x, w, k)
    return experts, torch.softmax(logits, -1).gather(-1, experts)


def _route_softmax_topk(x: Tensor, w: Tensor, k: int) -> tuple[Tensor, Tensor]:
    _, top, experts = _route_parts(x, w, k)
    return experts, torch.softmax(top, -1)


def _route_renormalised(x: Tensor, w: Tensor, k: int) -> tuple[Tensor, Tensor]:
    _, top, experts = _route_parts(x, w, k)
    s = torch.sigmoid(top)
    return experts, s / s.sum(-1, keepdim=True)


def _route_raw(x: Tensor, w: Tensor, k: int) -> tuple[Tensor, Tensor]:
    _, top, experts = _route_parts(x, w, k)
    return experts, top


_SOFTMAX_HINT = (
    "Llama 4's router has no softmax: each chosen expert's score is sigmoid(its own logit), whatever the "
    "other experts' logits (a softmax makes experts compete for one unit of weight, as in Mixtral)."
)
_RENORM_HINT = (
    "do not renormalise, and no softmax over the chosen logits either: Llama 4 keeps sigmoid(logit) for "
    "each chosen expert, so the scores of a token's experts need not sum to 1 (with k = 1 a renormalised "
    "score would always be 1.0)."
)

_ROUTE_MISTAKES = (
    _Mistake("softmax router", _route_softmax_all, _SOFTMAX_HINT),
    _Mistake("renormalised", _route_renormalised, _RENORM_HINT),
    _Mistake("softmax over the top-k", _route_softmax_topk, _SOFTMAX_HINT),
    _Mistake(
        "raw logits", _route_raw, "the score is sigmoid(logit), a number between 0 and 1, not the logit."
    ),
)


def _swiglu_expert(z: Tensor, gate_up: Tensor, down: Tensor) -> Tensor:
    gate, up = (z @ gate_up).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ down


def _shared(x: Tensor, shared: tuple[Tensor, Tensor, Tensor]) -> Tensor:
    gate, up, down = shared
    return (F.silu(x @ gate) * (x @ up)) @ down


def _ref_moe_forward(
    x: Tensor,
    router_weight: Tensor,
    gate_up: Tensor,
    down: Tensor,
    shared: tuple[Tensor, Tensor, Tensor],
    top_k: int,
) -> Tensor:
    """l4lab's own MoE layer, with these weights loaded into it."""
    num_experts, dim, width = gate_up.shape[0], gate_up.shape[1], down.shape[1]
    config = preset(
        "tiny-moe", hidden_size=dim, num_experts=num_experts, top_k=top_k, moe_intermediate_size=width
    )
    layer = MoE(config, 0)
    gate, up, shared_down = shared
    with torch.no_grad():
        layer.router.weight.copy_(router_weight)
        layer.experts.gate_up_proj.copy_(gate_up)
        layer.experts.down_proj.copy_(down)
        layer.shared_expert.gate_proj.weight.copy_(gate.T)
        layer.shared_expert.up_proj.weight.copy_(up.T)
        layer.shared_expert.down_proj.weight.copy_(shared_down.T)
        out, _ = layer(x)
    return out


def _moe_inputs(g: torch.Generator, n: int, d: int, width: int, e: int) -> tuple[Any, ...]:
    x = torch.randn(n, d, generator=g)
    router_weight = 0.5 * torch.randn(e, d, generator=g)
    gate_up = torch.randn(e, d, 2 * width, generator=g) / math.sqrt(d)
    down = torch.randn(e, width, d, generator=g) / math.sqrt(width)
    shared = (
        torch.randn(d, width, generator=g) / math.sqrt(d),
        torch.randn(d, width, generator=g) / math.sqrt(d),
        torch.randn(width, d, generator=g) / math.sqrt(width),
    )
    return x, router_weight, gate_up, down, shared


_MOE_SPECS = [
    ("5 tokens, 4 experts, top-1, dim 8, expert width 6", 5, 8, 6, 4, 1),
    ("1 token (batch 1), 4 experts, top-1", 1, 8, 6, 4, 1),
    ("9 tokens, 3 experts, top-2, dim 12, width 10", 9, 12, 10, 3, 2),
    ("3 tokens, 8 experts: most experts get no token", 3, 8, 4, 8, 1),
    ("6 tokens, one expert (E = 1)", 6, 6, 6, 1, 1),
    ("11 tokens, 6 experts, top-2, width 5", 11, 10, 5, 6, 2),
]


def _cases_moe_forward() -> list[_Case]:
    g = _generator(202)
    cases = []
    for label, n, d, width, e, k in _MOE_SPECS:
        x, router_weight, gate_up, down, shared = _moe_inputs(g, n, d, width, e)
        args = (x, router_weight, gate_up, down, shared, k)
        cases.append(_Case(label, args, _ref_moe_forward(*args)))
    return cases


def _moe_variant(
    score_on: str = "input",
    with_shared: bool = True,
    scorer: Callable[..., Any] | None = None,
    swap: bool = False,
) -> Callable[..., Tensor]:
    def forward(
        x: Tensor, w: Tensor, gate_up: Tensor, down: Tensor, shared: tuple[Tensor, Tensor, Tensor], k: int
    ) -> Tensor:
        experts, scores = (scorer or _ref_route)(x, w, k)
        if swap:
            gate_up = torch.cat(gate_up.chunk(2, dim=-1)[::-1], dim=-1)
        out = torch.zeros_like(x)
        for n in range(x.shape[0]):
            for j in range(k):
                e, s = int(experts[n, j]), scores[n, j]
                if score_on == "input":
                    out[n] += _swiglu_expert(s * x[n], gate_up[e], down[e])
                elif score_on == "output":
                    out[n] += s * _swiglu_expert(x[n], gate_up[e], down[e])
                else:
                    out[n] += _swiglu_expert(x[n], gate_up[e], down[e])
        return out + _shared(x, shared) if with_shared else out

    return forward


_SCORE_OUTPUT_HINT = (
    "the score scales the expert's INPUT: expert(score * x), as Llama 4 does. SwiGLU is not linear, so "
    "score * expert(x) gives a different answer."
)
_GATE_UP_HINT = (
    "gate is the FIRST half of gate_up[e]'s columns and up the second: "
    "gate, up = (z @ gate_up[e]).chunk(2, -1)."
)

_MOE_MISTAKES = (
    _Mistake("score on the output", _moe_variant(score_on="output"), _SCORE_OUTPUT_HINT),
    _Mistake(
        "no shared expert",
        _moe_variant(with_shared=False),
        "add the shared expert: every token also goes through the SwiGLU of shared = (gate, up, down), "
        "unscaled: (silu(x @ gate) * (x @ up)) @ down.",
    ),
    _Mistake("softmax router", _moe_variant(scorer=_route_softmax_all), _SOFTMAX_HINT),
    _Mistake("renormalised scores", _moe_variant(scorer=_route_renormalised), _RENORM_HINT),
    _Mistake("softmax over the top-k", _moe_variant(scorer=_route_softmax_topk), _SOFTMAX_HINT),
    _Mistake(
        "score ignored",
        _moe_variant(score_on="none"),
        "multiply each routed expert's input by its router score sigmoid(logit): expert(score * x).",
    ),
    _Mistake("gate and up swapped", _moe_variant(swap=True), _GATE_UP_HINT),
)


def _ref_sparse_dispatch(x: Tensor, experts: Tensor, scores: Tensor, gate_up: Tensor, down: Tensor) -> Tensor:
    return ops.routed_experts(x, experts, scores, gate_up, down)


def _cases_sparse_dispatch() -> list[_Case]:
    g = _generator(203)
    cases = []
    for label, n, d, width, e, k in _MOE_SPECS:
        x, router_weight, gate_up, down, _ = _moe_inputs(g, n, d, width, e)
        experts, scores = _ref_route(x, router_weight, k)
        args = (x, experts, scores, gate_up, down)
        cases.append(_Case(label, args, _ref_sparse_dispatch(*args)))
    return cases


def _dispatch_variant(score_on: str = "input", swap: bool = False) -> Callable[..., Tensor]:
    def dispatch(x: Tensor, experts: Tensor, scores: Tensor, gate_up: Tensor, down: Tensor) -> Tensor:
        if swap:
            gate_up = torch.cat(gate_up.chunk(2, dim=-1)[::-1], dim=-1)
        out = torch.zeros_like(x)
        for n in range(x.shape[0]):
            for j in range(experts.shape[1]):
                e, s = int(experts[n, j]), scores[n, j]
                if score_on == "input":
                    out[n] += _swiglu_expert(s * x[n], gate_up[e], down[e])
                elif score_on == "output":
                    out[n] += s * _swiglu_expert(x[n], gate_up[e], down[e])
                else:
                    out[n] += _swiglu_expert(x[n], gate_up[e], down[e])
        return out

    return dispatch


_DISPATCH_MISTAKES = (
    _Mistake("score on the output", _dispatch_variant(score_on="output"), _SCORE_OUTPUT_HINT),
    _Mistake(
        "score ignored", _dispatch_variant(score_on="none"), "multiply each slot's input by its score first."
    ),
    _Mistake("gate and up swapped", _dispatch_variant(swap=True), _GATE_UP_HINT),
)

# the sparsity measurement: the same tokens and routing width, 2 experts and then 16
_SPARSE_TOKENS, _SPARSE_DIM, _SPARSE_WIDTH = 64, 16, 32
_SPARSE_EXPERTS = (2, 16)


class _ElementCounter(TorchDispatchMode):
    """Counts the elements that operations write (views excluded): work that FLOP counting misses,
    e.g. a broadcast multiply-and-sum over every expert."""

    def __init__(self) -> None:
        super().__init__()
        self.elements = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        is_view = bool(getattr(func, "is_view", False)) or any(
            a.alias_info is not None and not a.alias_info.is_write for a in func._schema.returns
        )
        if not is_view:
            for value in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(value, Tensor):
                    self.elements += value.numel()
        return out


def _measure_dispatch(fn: Callable[..., Any], num_experts: int) -> tuple[Any, int, int, tuple[Any, ...]]:
    g = _generator(204)
    n, d, width = _SPARSE_TOKENS, _SPARSE_DIM, _SPARSE_WIDTH
    x = torch.randn(n, d, generator=g)
    experts = torch.randint(0, num_experts, (n, 1), generator=g)
    scores = torch.rand(n, 1, generator=g)
    gate_up = torch.randn(num_experts, d, 2 * width, generator=g) / math.sqrt(d)
    down = torch.randn(num_experts, width, d, generator=g) / math.sqrt(width)
    args = (x, experts, scores, gate_up, down)
    with FlopCounterMode(display=False) as counter:
        out = fn(*_clone(args))
    flops = counter.get_total_flops()
    elements = 0
    if flops == 0:  # nothing went through a matmul: count the elements written instead
        with _ElementCounter() as element_counter:
            fn(*_clone(args))
        elements = element_counter.elements
    return out, flops, elements, args


def _check_sparse(fn: Callable[..., Any]) -> tuple[str | None, str]:
    measured = {}
    for e in _SPARSE_EXPERTS:
        out, error = None, None
        try:
            out, flops, elements, args = _measure_dispatch(fn, e)
        except Exception as exc:
            error = exc
        if error is not None:
            where = _student_line(error)
            return (
                f"on the sparsity case ({_SPARSE_TOKENS} tokens, {e} experts, top-1) your function raised "
                f"{type(error).__name__}: {error}" + (f"\n  {where}" if where else ""),
                "",
            )
        problem = _compare_tensor(_ref_sparse_dispatch(*args), out)
        if problem is not None:
            return f"on the sparsity case ({_SPARSE_TOKENS} tokens, {e} experts, top-1): {problem}", ""
        measured[e] = (flops, elements)
    (few_flops, few_elements), (many_flops, many_elements) = measured[2], measured[16]
    useful = 2 * _SPARSE_TOKENS * 3 * _SPARSE_DIM * _SPARSE_WIDTH  # one expert per token
    how_to = (
        "Sort the token slots by expert (torch.argsort(experts.flatten())), let each expert multiply only "
        "its own rows (torch.bincount gives how many each expert has), and put the results back in token "
        "order (index_add_ or the inverse permutation)."
    )
    if many_flops > 0:
        if many_flops > 1.5 * max(few_flops, useful):
            return (
                f"the answers are right, but the work grows with the number of experts: "
                f"{few_flops:,} FLOPs with 2 experts, {many_flops:,} with 16 (x{many_flops / few_flops:.1f}; "
                f"the routed work is {useful:,} whatever the number of experts). Your function runs "
                f"every expert on every token.\n  hint: {how_to}",
                "",
            )
        return None, f", and sparse: {few_flops:,} FLOPs with 2 experts, {many_flops:,} with 16"
    if many_elements > 2.0 * max(few_elements, 1):
        return (
            f"the answers are right, but the work grows with the number of experts: it writes "
            f"{few_elements:,} numbers with 2 experts and {many_elements:,} with 16. Your function computes "
            f"every expert for every token.\n  hint: {how_to}",
            "",
        )
    return None, ", and sparse (no matmul FLOPs counted; the work does not grow with the experts)"


# ====================================================================== lab 3: chunked attention
def _ref_chunked_causal_mask(length: int, chunk: int) -> Tensor:
    return ops.visibility_mask(0, length, 0, length, chunk)


def _cases_chunked_causal_mask() -> list[_Case]:
    specs = [
        ("T 16, chunk 8", 16, 8),
        ("T 20, chunk 8: the last chunk is partial (8 does not divide 20)", 20, 8),
        ("T 1, chunk 4", 1, 4),
        ("T 9, chunk 3", 9, 3),
        ("T 5, chunk 16: one chunk longer than the sequence", 5, 16),
        ("T 7, chunk 1: every token sees only itself", 7, 1),
    ]
    return [_Case(label, (t, c), _ref_chunked_causal_mask(t, c)) for label, t, c in specs]


def _grid(length: int) -> tuple[Tensor, Tensor]:
    return torch.arange(length)[:, None], torch.arange(length)[None, :]


_MASK_MISTAKES = (
    _Mistake(
        "sliding window",
        lambda t, c: (lambda i, j: (j <= i) & (j > i - c))(*_grid(t)),
        "this is a sliding window; chunks are fixed blocks: position 8 with C=8 sees only itself "
        "(j // C == i // C), not the 7 tokens before it.",
    ),
    _Mistake(
        "no causality",
        lambda t, c: (lambda i, j: j // c == i // c)(*_grid(t)),
        "inside its chunk a query still sees only the past: require j <= i as well as j // C == i // C.",
    ),
    _Mistake(
        "chunks ignored",
        lambda t, c: (lambda i, j: j <= i)(*_grid(t)),
        "this is plain causal attention: a query also must not see keys of earlier chunks "
        "(j // C == i // C).",
    ),
    _Mistake(
        "no diagonal",
        lambda t, c: (lambda i, j: (j < i) & (j // c == i // c))(*_grid(t)),
        "a token sees itself: j <= i, not j < i.",
    ),
    _Mistake(
        "transposed",
        lambda t, c: _ref_chunked_causal_mask(t, c).T.contiguous(),
        "rows are queries and columns keys: mask[i, j] is True when query i may see key j (lower triangle).",
    ),
    _Mistake(
        "inverted",
        lambda t, c: ~_ref_chunked_causal_mask(t, c),
        "True means VISIBLE here; if you built the mask of hidden keys (for masked_fill), "
        "return its negation.",
    ),
)


def _ref_temperature_scale(positions: Tensor, floor_scale: float, attn_scale: float) -> Tensor:
    return ops.Temperature(floor_scale, attn_scale).scales(positions)


def _cases_temperature_scale() -> list[_Case]:
    specs = [
        ("positions 0..19, floor_scale 4, attn_scale 0.5", torch.arange(20), 4, 0.5),
        (
            "Llama 4's values around the floor: positions 8185..8200, floor 8192, attn 0.1",
            torch.arange(8185, 8201),
            8192,
            0.1,
        ),
        ("positions 100..106 (queries after a KV cache), floor 8, attn 0.1", torch.arange(100, 107), 8, 0.1),
        ("a single position 0", torch.tensor([0]), 4, 0.5),
        ("floor_scale 3 (not a power of two), positions 0..30", torch.arange(31), 3, 0.25),
        ("long context: positions 10^6 and 10^7 - 1", torch.tensor([1_000_000, 9_999_999]), 8192, 0.1),
    ]
    return [_Case(label, (p, f, a), _ref_temperature_scale(p, f, a)) for label, p, f, a in specs]


def _temperature(
    positions: Tensor,
    floor_scale: float,
    attn_scale: float,
    *,
    shift: float = 1.0,
    log: Callable[[Tensor], Tensor] = torch.log1p,
    rounding: bool = True,
) -> Tensor:
    ratio = (positions.double() + shift) / floor_scale
    return log(torch.floor(ratio) if rounding else ratio) * attn_scale + 1.0


_TEMPERATURE_MISTAKES = (
    _Mistake(
        "relative positions",
        lambda p, f, a: _temperature(torch.arange(p.numel()), f, a),
        "the temperature uses ABSOLUTE positions: use positions[t] itself, not its index t in this "
        "tensor (queries after a KV cache, or deep in a long document, sit far from 0).",
    ),
    _Mistake(
        "p instead of p + 1",
        lambda p, f, a: _temperature(p, f, a, shift=0.0),
        "floor((p + 1) / floor_scale): with the + 1, position floor_scale - 1 is the first to get "
        "a scale above 1.",
    ),
    _Mistake(
        "log without + 1",
        lambda p, f, a: _temperature(p, f, a, log=torch.log),
        "log(floor((p + 1) / floor_scale) + 1): the + 1 inside the log keeps the first positions "
        "at exactly 1.",
    ),
    _Mistake(
        "no floor",
        lambda p, f, a: _temperature(p, f, a, rounding=False),
        "round down: floor((p + 1) / floor_scale), so the scale grows in steps of floor_scale positions.",
    ),
    _Mistake(
        "log2",
        lambda p, f, a: _temperature(p, f, a, log=lambda t: torch.log2(t + 1)),
        "use the natural logarithm (torch.log or torch.log1p), not log2.",
    ),
    _Mistake(
        "log10",
        lambda p, f, a: _temperature(p, f, a, log=lambda t: torch.log10(t + 1)),
        "use the natural logarithm (torch.log or torch.log1p), not log10.",
    ),
    _Mistake(
        "no + 1 at the end",
        lambda p, f, a: _temperature(p, f, a) - 1.0,
        "the scale is log(...) * attn_scale + 1: it starts at 1 (no change), not at 0.",
    ),
)


def _ref_attention(
    q: Tensor, k: Tensor, v: Tensor, chunk: int | None, temperature: tuple[float, float] | None
) -> Tensor:
    tuning = ops.Temperature(*temperature) if temperature is not None else None
    out, _ = ops.attention(q, k, v, 0, 0, chunk, tuning, need_probs=False)
    return out


def _cases_attention() -> list[_Case]:
    g = _generator(303)
    specs = [
        (
            "batch 2, 4 query heads / 2 kv heads, T 12, head_dim 8, chunk 5 (does not divide 12)",
            2,
            4,
            2,
            12,
            8,
            5,
            None,
        ),
        (
            "batch 1, 3 query heads / 1 kv head, T 7, head_dim 6, global, temperature (2, 0.5)",
            1,
            3,
            1,
            7,
            6,
            None,
            (2, 0.5),
        ),
        ("multi-head (4 / 4), T 8, chunk 4", 1, 4, 4, 8, 8, 4, None),
        ("a single token (T 1), global", 1, 2, 1, 1, 4, None, None),
        ("6 query heads / 3 kv heads, T 10, head_dim 10, chunk 3", 2, 6, 3, 10, 10, 3, None),
        ("global causal, T 20, temperature (4, 1.0), 2 / 1 heads", 1, 2, 1, 20, 8, None, (4, 1.0)),
    ]
    cases = []
    for label, b, h, hkv, t, d, chunk, temperature in specs:
        q = torch.randn(b, h, t, d, generator=g)
        k = torch.randn(b, hkv, t, d, generator=g)
        v = torch.randn(b, hkv, t, d, generator=g)
        args = (q, k, v, chunk, temperature)
        cases.append(_Case(label, args, _ref_attention(*args)))
    return cases


def _attention_variant(
    mask_kind: str = "right",
    gqa: str = "interleave",
    scale: str = "sqrt",
    use_temperature: bool = True,
) -> Callable[..., Tensor]:
    def attend(q: Tensor, k: Tensor, v: Tensor, chunk: int | None, temperature: Any) -> Tensor:
        length, dim = q.shape[2], q.shape[3]
        if temperature is not None and use_temperature:
            q = q * _ref_temperature_scale(torch.arange(length), *temperature)[:, None]
        group = q.shape[1] // k.shape[1]
        if gqa == "interleave":
            k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        else:
            k, v = k.repeat(1, group, 1, 1), v.repeat(1, group, 1, 1)
        logits = q @ k.transpose(-2, -1) * (dim**-0.5 if scale == "sqrt" else 1.0 / dim)
        i, j = _grid(length)
        if mask_kind == "right":
            visible = _ref_chunked_causal_mask(length, chunk) if chunk is not None else j <= i
        elif mask_kind == "global":
            visible = j <= i
        elif mask_kind == "sliding":
            visible = (j <= i) & (j > i - chunk) if chunk is not None else j <= i
        else:  # no causality
            visible = (j // chunk == i // chunk) if chunk is not None else torch.ones_like(j <= i)
        return torch.softmax(logits.masked_fill(~visible, float("-inf")), -1) @ v

    return attend


_ATTENTION_MISTAKES = (
    _Mistake(
        "chunk ignored",
        _attention_variant(mask_kind="global"),
        "with a chunk size, a query sees only keys of its own chunk: use your chunked_causal_mask(T, chunk).",
    ),
    _Mistake(
        "sliding window",
        _attention_variant(mask_kind="sliding"),
        "chunks are fixed blocks, not a sliding window: position 8 with C=8 sees only itself.",
    ),
    _Mistake(
        "no causal mask",
        _attention_variant(mask_kind="none"),
        "attention is causal: query i sees keys j <= i only (set the others to -inf before the softmax).",
    ),
    _Mistake(
        "GQA by repeat",
        _attention_variant(gqa="repeat"),
        "query head h reads key/value head h // (H / Hkv): neighbouring query heads share a kv head. "
        "Use repeat_interleave(H // Hkv, dim=1), not repeat.",
    ),
    _Mistake(
        "temperature ignored",
        _attention_variant(use_temperature=False),
        "when temperature = (floor_scale, attn_scale) is given, multiply query t by "
        "temperature_scale(t, floor_scale, attn_scale) before the dot products.",
    ),
    _Mistake(
        "scale 1/D",
        _attention_variant(scale="d"),
        "scale the dot products by 1 / sqrt(head_dim), not 1 / head_dim.",
    ),
)


# ====================================================================== lab 4: the routing experiment
def _record(experts: Tensor, num_experts: int) -> RoutingRecord:
    if experts.dim() == 2:
        experts = experts[..., None]
    batch, length, _ = experts.shape
    return RoutingRecord(
        0, experts.long(), torch.ones(experts.shape), torch.zeros(batch, length, num_experts)
    )


def _ref_same_expert_rate(experts: Tensor) -> float:
    rate, _ = routing.same_expert_rate(_record(experts, int(experts.max()) + 1))
    return rate


def _runs(g: torch.Generator, batch: int, length: int, num_experts: int) -> Tensor:
    """Expert ids that often repeat from one token to the next (as a trained router's do)."""
    stay = torch.rand(batch, length, generator=g) < 0.6
    fresh = torch.randint(0, num_experts, (batch, length), generator=g)
    out = fresh.clone()
    for t in range(1, length):
        out[:, t] = torch.where(stay[:, t], out[:, t - 1], fresh[:, t])
    return out


def _cases_same_expert_rate() -> list[_Case]:
    g = _generator(401)
    specs = [
        ("4 sequences of 9 tokens, 8 experts, random", torch.randint(0, 8, (4, 9), generator=g)),
        (
            "3 sequences [0, 1], [1, 2], [2, 3]: pairs never cross sequences",
            torch.tensor([[0, 1], [1, 2], [2, 3]]),
        ),
        ("1 sequence of 2 tokens, the same expert", torch.tensor([[3, 3]])),
        ("one sequence alternating 0, 1, 0, 1, ... (rate 0)", torch.tensor([[0, 1] * 5 + [0]])),
        ("2 sequences of 33 tokens, 5 experts, in runs", _runs(g, 2, 33, 5)),
        ("64 sequences of 16 tokens, 16 experts, in runs", _runs(g, 64, 16, 16)),
    ]
    return [_Case(label, (e,), _ref_same_expert_rate(e)) for label, e in specs]


_RATE_MISTAKES = (
    _Mistake(
        "across sequences",
        lambda e: float((e.reshape(-1)[1:] == e.reshape(-1)[:-1]).float().mean()),
        "pairs never cross from one sequence to the next: compare experts[:, 1:] with experts[:, :-1] "
        "(the last token of row b and the first of row b + 1 are not neighbours).",
    ),
    _Mistake(
        "divided by T",
        lambda e: float((e[:, 1:] == e[:, :-1]).float().sum() / e.numel()),
        "a sequence of T tokens has T - 1 consecutive pairs: divide by B * (T - 1), not B * T.",
    ),
    _Mistake(
        "different instead of same",
        lambda e: float((e[:, 1:] != e[:, :-1]).float().mean()),
        "count the pairs with the SAME expert (==), not different ones.",
    ),
)


def _ref_load_stats(experts: Tensor, num_experts: int) -> tuple[float, float]:
    load = routing.expert_load(_record(experts, num_experts), num_experts)
    return routing.load_entropy(load), routing.max_violation(load)


def _cases_load_stats() -> list[_Case]:
    g = _generator(402)
    specs = [
        ("4 x 16 tokens, 8 experts, top-1, random", torch.randint(0, 8, (4, 16, 1), generator=g), 8),
        (
            "5 experts, of which 2 and 4 get no token",
            torch.tensor([0, 1, 3, 3, 1, 0, 3, 3, 0, 1, 1, 3]).view(2, 6, 1),
            5,
        ),
        ("perfect balance: 4 tokens for each of 8 experts", torch.arange(32).remainder(8).view(2, 16, 1), 8),
        ("every slot on expert 2 (of 4)", torch.full((3, 5, 1), 2), 4),
        ("top-2 routing: 2 x 10 tokens, 6 experts", torch.rand(2, 10, 6, generator=g).topk(2, -1).indices, 6),
        ("a single token, top-1, 4 experts", torch.tensor([[[1]]]), 4),
    ]
    return [_Case(label, (e, n), _ref_load_stats(e, n)) for label, e, n in specs]


def _load(experts: Tensor, num_experts: int, minlength: bool = True, first_only: bool = False) -> Tensor:
    flat = (experts[..., 0] if first_only else experts).reshape(-1)
    counts = torch.bincount(flat, minlength=num_experts if minlength else 0).double()
    return counts / counts.sum()


def _entropy(load: Tensor, log: Callable[[Tensor], Tensor] = torch.log) -> float:
    p = load[load > 0]
    return float(-(p * log(p)).sum())


def _maxvio(load: Tensor) -> float:
    return float((load.max() - load.mean()) / load.mean())


_LOAD_MISTAKES = (
    _Mistake(
        "log2",
        lambda e, n: (_entropy(_load(e, n), torch.log2), _maxvio(_load(e, n))),
        "entropy in nats: use the natural logarithm (torch.log), not log2 (bits).",
    ),
    _Mistake(
        "normalised entropy",
        lambda e, n: (_entropy(_load(e, n)) / math.log(n) if n > 1 else 1.0, _maxvio(_load(e, n))),
        "return the entropy itself, -sum p ln p (ln E at perfect balance), not divided by ln E.",
    ),
    _Mistake(
        "max / mean",
        lambda e, n: (_entropy(_load(e, n)), float(_load(e, n).max() / _load(e, n).mean())),
        "MaxVio is (max load - mean load) / mean load: subtract the mean, so that perfect balance gives 0.",
    ),
    _Mistake(
        "(max - min) / mean",
        lambda e, n: (
            _entropy(_load(e, n)),
            float((_load(e, n).max() - _load(e, n).min()) / _load(e, n).mean()),
        ),
        "MaxVio compares the busiest expert with the MEAN load: (max - mean) / mean, not (max - min) / mean.",
    ),
    _Mistake(
        "experts with no tokens dropped",
        lambda e, n: (_entropy(_load(e, n, minlength=False)), _maxvio(_load(e, n, minlength=False))),
        "experts that got no token still count (load 0): torch.bincount(ids, minlength=num_experts), so "
        "that the mean load is 1 / num_experts.",
    ),
    _Mistake(
        "first choice only",
        lambda e, n: (_entropy(_load(e, n, first_only=True)), _maxvio(_load(e, n, first_only=True))),
        "count every slot: with top-k routing each token fills k slots (experts[..., j] for every j).",
    ),
)


def _has_nan(got: Any) -> bool:
    return isinstance(got, (tuple, list)) and any(math.isnan(float(v)) for v in got)


# ====================================================================== the steps
_SHAPE_HINT = "compare your output's shape with the expected one; print(x.shape) along the way helps."

_STEPS: tuple[_Step, ...] = (
    _Step(
        "1.1",
        "rms_norm",
        ("x", "weight", "eps"),
        "RMSNorm over the last dimension: x / sqrt(mean(x²) + eps) * weight",
        _cases_rms_norm,
        _compare_tensor,
        _RMS_MISTAKES,
        "y = x / sqrt(mean(x², over the last dim, keepdim) + eps) * weight; compute in float32.",
    ),
    _Step(
        "1.2",
        "rope_frequencies",
        ("head_dim", "theta"),
        "RoPE's inverse frequencies theta^(-2i/head_dim), one per feature pair",
        _cases_rope_frequencies,
        lambda e, g: _compare_tensor(e, g, "inv_freq", rtol=1e-5, atol=1e-9),
        _FREQ_MISTAKES,
        "inv_freq[i] = theta ** (-2i / head_dim) for i = 0 .. head_dim/2 - 1: head_dim/2 values, "
        "float32, starting at 1.0.",
    ),
    _Step(
        "1.3",
        "apply_rope",
        ("x", "positions", "theta"),
        "rotate the interleaved pairs (2i, 2i+1) of x [B, T, H, D] by position * inv_freq_i",
        _cases_apply_rope,
        _compare_tensor,
        _ROPE_MISTAKES,
        "pair i of the features is (x[..., 2i], x[..., 2i+1]); rotate it by the angle positions[t] * "
        "inv_freq[i] (one angle per position and pair, the same for every batch row and head).",
    ),
    _Step(
        "2.1",
        "route",
        ("x", "router_weight", "top_k"),
        "Llama 4's router: the top-k logits x @ W^T, each scored by sigmoid(logit)",
        _cases_route,
        _compare_route,
        _ROUTE_MISTAKES,
        "logits = x @ router_weight.T [N, E]; take the top_k largest per token (torch.topk); "
        "scores = sigmoid of those logits.",
    ),
    _Step(
        "2.2",
        "moe_forward",
        ("x", "router_weight", "gate_up", "down", "shared", "top_k"),
        "a MoE layer: routed experts on score-scaled inputs, plus the shared expert",
        _cases_moe_forward,
        _compare_tensor,
        _MOE_MISTAKES,
        "out[n] = shared(x[n]) + sum over token n's chosen experts e of expert_e(score * x[n]), where "
        "expert_e(z) = (silu(z @ W_gate) * (z @ W_up)) @ down[e] and gate_up[e] = [W_gate | W_up].",
    ),
    _Step(
        "2.3",
        "sparse_dispatch",
        ("x", "experts", "scores", "gate_up", "down"),
        "the routed experts computing only the chosen (token, expert) pairs: sort tokens by expert",
        _cases_sparse_dispatch,
        _compare_tensor,
        _DISPATCH_MISTAKES,
        "out[n] = sum over j of expert_{experts[n, j]}(scores[n, j] * x[n]) (no shared expert here); "
        "the tokens an expert gets may be none at all.",
        extra=_check_sparse,
    ),
    _Step(
        "3.1",
        "chunked_causal_mask",
        ("T", "chunk"),
        "which keys each query sees on RoPE layers: causal, within fixed chunks (bool [T, T])",
        _cases_chunked_causal_mask,
        lambda e, g: _compare_tensor(e, g, "mask"),
        _MASK_MISTAKES,
        "mask[i, j] = (j <= i) and (j // chunk == i // chunk): causal, and in the same fixed block.",
    ),
    _Step(
        "3.2",
        "temperature_scale",
        ("positions", "floor_scale", "attn_scale"),
        "NoPE layers' query scale log(floor((p+1)/floor_scale) + 1) * attn_scale + 1",
        _cases_temperature_scale,
        lambda e, g: _compare_tensor(e, g, "scale", rtol=1e-5, atol=1e-6),
        _TEMPERATURE_MISTAKES,
        "scale[t] = log(floor((positions[t] + 1) / floor_scale) + 1) * attn_scale + 1, as float32.",
    ),
    _Step(
        "3.3",
        "attention",
        ("q", "k", "v", "chunk", "temperature"),
        "grouped-query attention, causal, with optional chunks or temperature",
        _cases_attention,
        _compare_tensor,
        _ATTENTION_MISTAKES,
        "scale q by the temperature (if given), repeat each kv head H/Hkv times (repeat_interleave), "
        "softmax(q k^T / sqrt(D)) with invisible keys at -inf, then multiply by v.",
    ),
    _Step(
        "4.1",
        "same_expert_rate",
        ("experts",),
        "how often two consecutive tokens share their first-choice expert",
        _cases_same_expert_rate,
        lambda e, g: _compare_float(e, g, "rate"),
        _RATE_MISTAKES,
        "the fraction of pairs (t, t + 1) inside each sequence with experts[b, t] == experts[b, t + 1], "
        "over all B * (T - 1) pairs.",
    ),
    _Step(
        "4.2",
        "load_stats",
        ("experts", "num_experts"),
        "the load's entropy (nats) and MaxVio, from every routed slot",
        _cases_load_stats,
        _compare_floats(("entropy", "max_violation")),
        _LOAD_MISTAKES,
        "load_i = (slots routed to expert i) / (all slots); entropy = -sum_i load_i ln load_i "
        "(0 ln 0 = 0); MaxVio = (max_i load_i - mean load) / mean load.",
        output_hints=(
            (
                _has_nan,
                "0 * ln 0 counts as 0: an expert without tokens must not make the entropy NaN "
                "(torch.special.xlogy(p, p), or keep only p > 0).",
            ),
        ),
    ),
)


# ====================================================================== lab 4's model
# A tiny Llama 4 with 8 experts (as Mixtral, so that chance is 1/8 at balance), small enough to train
# in well under a minute on two CPU cores.
TINY_MOE_CONFIG: dict[str, Any] = dict(
    hidden_size=64,
    num_layers=4,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    moe_intermediate_size=128,
    dense_intermediate_size=256,
    num_experts=8,
    top_k=1,
    attention_chunk_size=32,
    floor_scale=32,
    max_position_embeddings=512,
)


class TinyMoE(NamedTuple):
    """What :func:`train_tiny_moe` returns: the trained ``model`` (in eval mode), held-out mixture
    ``data`` (with each token's domain), and the training ``history`` (one dict per step)."""

    model: Any
    data: TokenDataset
    history: list[dict[str, float]]


def train_tiny_moe(
    steps: int = 300,
    seed: int = 0,
    balance: str = "aux_free",
    length: int = 64,
    progress: bool = False,
) -> TinyMoE:
    """Train a tiny 8-expert, top-1 Llama 4 on the data mixture (``l4lab.data.mixture``) for ``steps``.

    Four MoE layers of hidden size 64, trained with AdamW on 512 rows of ``length + 1`` tokens, batch 16,
    ``balance`` = "aux_free" (DeepSeek-V3's bias), "switch" or "none". About 20 s of CPU time for
    300 steps; ``steps=0`` gives the untrained model (a baseline). ``data``: 64 held-out rows
    (``mixture(64, length + 1, seed + 1)``); ``model(data.inputs).routing`` gives the routing records.
    Deterministic under ``seed``.
    """
    from l4lab.model import Llama4
    from l4lab.train import TrainConfig, Trainer

    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative integer; got {steps!r}")
    torch.manual_seed(seed)
    model = Llama4(preset("tiny-moe", **TINY_MOE_CONFIG))
    train = mixture(512, length + 1, seed=seed)
    data = mixture(64, length + 1, seed=seed + 1)
    history: list[dict[str, float]] = []
    if steps > 0:
        config = TrainConfig(
            steps=steps,
            batch_size=16,
            warmup_steps=min(30, steps // 10),
            eval_every=steps,
            balance=balance,
            seed=seed,
        )
        history = Trainer(model, train, data, config).run(progress=progress)
    model.eval()
    return TinyMoE(model, data, history)
