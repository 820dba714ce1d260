"""The checking machinery every lab shares: cases, typical mistakes, steps, comparisons and the registry.

A lab is a module beside this one (``lab1_rmsnorm_rope.py``, ...) that holds, for each step the student
writes:

* a **reference**: l4lab's own implementation, which computes each case's expected answer;
* its **cases** (:class:`Case`): seeded inputs chosen to catch mistakes (batch 1, odd lengths, sizes
  that are not powers of two, experts that receive no token...), with the expected answer;
* its **typical mistakes** (:class:`Mistake`): wrong implementations a student is likely to write, each
  with the hint shown when the student's answer equals that mistake's;
* the **step** (:class:`Step`): its id ``"<lab>.<step>"``, the function's name and parameters, a
  summary, how to compare an answer (:func:`compare_tensor`, :func:`compare_float`, ...), and a hint
  for when no known mistake matches.

The module ends with ``register_lab("<number>", "<name>", STEPS)``. To add a lab, write such a module
(``lab5_<name>.py``) and import it in ``l4lab/labs/__init__.py``; nothing else changes.
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
from torch import Tensor

from l4lab.claims import TOLERANCE

# lab number -> lab name ("1" -> "rmsnorm_rope"), and every step in the order the labs registered them
LABS: dict[str, str] = {}
_STEPS: list[Step] = []


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
class Case:
    """One hidden test: a short description, the arguments passed to the student's function, and the
    reference's answer."""

    label: str
    args: tuple[Any, ...]
    expected: Any


@dataclass(frozen=True)
class Mistake:
    """A typical wrong answer: if the student's output equals ``fn(*args)`` on the failing case, the
    failure message gives ``hint``."""

    name: str
    fn: Callable[..., Any]
    hint: str


class Hints(NamedTuple):
    """A step's hints, each a little closer to the answer and none of them the answer: ``concept`` (the
    idea in words), ``formula`` (the maths to compute), ``code`` (where l4lab does it: a file and a name
    to read)."""

    concept: str
    formula: str
    code: str


class Hint(str):
    """One hint's text; shows as plain text (no quotes) when it is the last expression of a cell."""

    def __repr__(self) -> str:
        return str(self)


@dataclass(frozen=True)
class Step:
    """One function the student writes. ``id`` "<lab>.<step>"; ``function`` and ``params``: its name and
    parameters; ``summary``: one line for :func:`steps`; ``cases``: makes the hidden cases; ``compare``:
    (expected, got) -> what differs, or None; ``mistakes``: typical wrong answers, tried in order on the
    failing case; ``hint``: shown when no mistake matches; ``extra``: a check run after every case
    passed, returning (failure or None, a note for the success line); ``output_hints``: (test on the
    student's output, hint) pairs for wrong outputs that no mistake reproduces; ``hints``: the tiered
    hints :func:`hint` gives on request."""

    id: str
    function: str
    params: tuple[str, ...]
    summary: str
    cases: Callable[[], list[Case]]
    compare: Callable[[Any, Any], str | None]  # (expected, got) -> what differs, or None
    mistakes: tuple[Mistake, ...]
    hint: str  # when no known mistake matches
    extra: Callable[[Callable[..., Any]], tuple[str | None, str]] | None = None  # -> (failure, note)
    output_hints: tuple[tuple[Callable[[Any], bool], str], ...] = field(default=())
    hints: Hints | None = None

    @property
    def lab_number(self) -> str:
        return self.id.split(".")[0]

    @property
    def lab(self) -> str:
        return LABS[self.lab_number]

    @property
    def signature(self) -> str:
        return f"{self.function}({', '.join(self.params)})"


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"{str(value.dtype).removeprefix('torch.')} {list(value.shape)}"
    if isinstance(value, (tuple, list)) and value and all(isinstance(v, Tensor) for v in value):
        return "(" + ", ".join(_describe(v) for v in value) + ")"
    if isinstance(value, float):
        return f"{value:g}"
    return repr(value)


def _inputs_line(step: Step, args: Sequence[Any]) -> str:
    return ", ".join(f"{name}={_describe(value)}" for name, value in zip(step.params, args, strict=True))


def clone(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.clone()
    if isinstance(value, tuple):
        return tuple(clone(v) for v in value)
    if isinstance(value, list):
        return [clone(v) for v in value]
    return value


def _changed_inputs(step: Step, original: Sequence[Any], passed: Sequence[Any]) -> list[str]:
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


def student_line(error: BaseException) -> str:
    """Where in the student's code the exception came from (the last frame outside torch and l4lab)."""
    frames = traceback.extract_tb(error.__traceback__)
    for frame in reversed(frames):
        path = Path(frame.filename).as_posix()
        if "/torch/" in path or "/l4lab/labs/" in path or "/site-packages/" in path:
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


def as_tensor(got: Any, name: str) -> tuple[Tensor | None, str | None]:
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


def compare_tensor(
    expected: Tensor, got: Any, name: str = "output", rtol: float | None = None, atol: float | None = None
) -> str | None:
    """None when ``got`` equals ``expected``, else what differs. Numbers are close when
    ``|got - expected| <= atol + rtol * |expected|``; by default ``rtol`` is the dtype's tolerance
    (``l4lab.claims.TOLERANCE``, the less precise of the two dtypes) and ``atol`` that times the largest
    ``|expected|``, so that the verdict does not depend on the CPU or the thread count that computed it."""
    tensor, problem = as_tensor(got, name)
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


def compare_float(expected: float, got: Any, name: str = "result") -> str | None:
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


def compare_floats(names: Sequence[str]) -> Callable[[Any, Any], str | None]:
    def compare(expected: Any, got: Any) -> str | None:
        if got is None:
            return "your function returned None (is a `return` missing?)"
        if not isinstance(got, (tuple, list)) or len(got) != len(names):
            return f"expected a tuple of {len(names)} numbers ({', '.join(names)}), got {type(got).__name__}"
        for name, e, g in zip(names, expected, got, strict=True):
            problem = compare_float(e, g, name)
            if problem:
                return problem
        return None

    return compare


def _run(fn: Callable[..., Any], args: Sequence[Any]) -> tuple[Any, BaseException | None]:
    try:
        return fn(*args), None
    except Exception as error:  # the student's bug, reported rather than raised
        return None, error


def _known_mistake(step: Step, case: Case, got: Any) -> Mistake | None:
    for mistake in step.mistakes:
        try:
            wrong = mistake.fn(*clone(case.args))
            if step.compare(wrong, got) is None:
                return mistake
        except Exception:
            continue
    return None


def register_lab(number: str, name: str, lab_steps: Sequence[Step]) -> None:
    """Make a lab's steps known to :func:`check`, :func:`case` and :func:`steps`: lab ``number`` ("5")
    called ``name`` ("irope_generalisation"), whose ``lab_steps`` have ids ``"<number>.<step>"``.
    Registering the same lab again replaces its steps."""
    if not lab_steps:
        raise ValueError(f"lab {number} ({name}) has no steps")
    for step in lab_steps:
        if step.lab_number != number:
            raise ValueError(f"step {step.id!r} of lab {number} ({name}) must be named '{number}.<step>'")
    taken = {lab: lab_name for lab, lab_name in LABS.items() if lab != number}
    if name in taken.values():
        raise ValueError(f"another lab is already called {name!r}: choose another name for lab {number}")
    LABS[number] = name
    _STEPS[:] = [s for s in _STEPS if s.lab_number != number] + list(lab_steps)


def step_table() -> dict[str, Step]:
    """Every registered step by id."""
    return {s.id: s for s in _STEPS}


def _resolve(step: str) -> Step | None:
    table = step_table()
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


HINT_LEVELS = ("the idea", "the formula", "where l4lab does it")


def hint(step: str, level: int = 1) -> Hint:
    """Hint ``level`` (1, 2 or 3) of ``step``: 1 the idea, 2 the formula, 3 where l4lab does it (a file
    and a name to read). Ask for the next level only when the one before did not get you going."""
    resolved = _resolve(step)
    if resolved is None:
        raise ValueError(f"unknown step {step!r}; the steps are {', '.join(s.id for s in _STEPS)}")
    if isinstance(level, bool) or level not in (1, 2, 3):
        raise ValueError(
            f"level must be 1 (the idea), 2 (the formula) or 3 (where l4lab does it); got {level!r}"
        )
    if resolved.hints is None:
        return Hint(f"{resolved.id}: {resolved.hint}")
    text = resolved.hints[level - 1]
    more = f' (next: labs.hint("{resolved.id}", {level + 1}))' if level < 3 else ""
    return Hint(f"{resolved.id}, hint {level} of 3, {HINT_LEVELS[level - 1]}: {text}{more}")


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


def _more_hints(step: Step, mistake: Mistake | None) -> list[str]:
    """Where the tiered hints are, when the hint shown is the step's general one."""
    if step.hints is None or mistake is not None:
        return []
    more = f'labs.hint("{step.id}") gives the idea, labs.hint("{step.id}", 2) the formula, 3 the code to read'
    return [f"  stuck? {more}"]


def _check(step: Step, fn: Callable[..., Any]) -> CheckResult:
    cases = step.cases()
    total = len(cases)
    for number, current in enumerate(cases, start=1):
        head = f"✗ {step.id} failed on case {number} of {total}: {current.label}"
        inputs = f"  inputs: {_inputs_line(step, current.args)}"
        debug = f'  (labs.case("{step.id}", {number}) gives this case\'s inputs and expected output)'
        passed = clone(current.args)
        got, error = _run(fn, passed)
        if error is not None:
            if isinstance(error, NotImplementedError) and number == 1:
                message = (
                    f"✗ {step.id} not done yet: {step.function} still raises NotImplementedError. "
                    "Replace that line with your code and run the cell again."
                )
                return CheckResult(step.id, False, message, number, number)
            where = student_line(error)
            lines = [
                head,
                inputs,
                f"  your function raised {type(error).__name__}: {error}",
                *([f"  {where}"] if where else []),
                f"  hint: {step.hint}",
                *_more_hints(step, None),
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
            lines = [head, inputs, f"  {problem}", f"  hint: {hint}", *_more_hints(step, mistake), debug]
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
    counted = f": {total} {plural}{note}" if total else note  # no cases: the extra check says what ran
    return CheckResult(step.id, True, f"✓ {step.id} passed{counted}", total, None)
