"""Lab 5, iRoPE length generalisation: train a RoPE and an iRoPE model on induction heads, predict where
each fails, measure it, and explain the chunk-boundary blind spot
(``notebooks/labs/lab5_irope_length.ipynb``).

Steps: 5.1 ``answer_opens_chunk`` (which rows sit in the blind spot), 5.2 ``blind_spot_share`` (the
share of rows a model of chunk C is predicted to lose there, from the task's definition),
5.3 ``split_accuracy`` (the measured accuracy on those rows and on the others). References in
``l4lab.induction`` (``first_trigger``, ``evaluate``) and ``l4lab.data.induction_heads``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from l4lab.data import induction_heads
from l4lab.induction import blind_spot_share
from l4lab.labs.core import (
    Case,
    Hints,
    Mistake,
    Step,
    compare_float,
    compare_floats,
    compare_tensor,
    register_lab,
)


# ====================================================================== 5.1 the rows in the blind spot
def _first_trigger(tokens: Tensor, trigger: int) -> Tensor:
    return (tokens[:, :-2] == trigger).float().argmax(-1)


def _ref_answer_opens_chunk(tokens: Tensor, chunk: int, trigger: int) -> Tensor:
    return (_first_trigger(tokens, trigger) + 1) % chunk == 0


def _rows_with_trigger_at(positions: list[int], length: int, vocab: int = 16, seed: int = 0) -> Tensor:
    """Induction rows of ``length`` whose first trigger sits at each of ``positions``."""
    tokens = induction_heads(len(positions), length, vocab, seed=seed).tokens.clone()
    body = tokens[:, :-2]
    body[body == vocab - 1] = 0
    for row, p in enumerate(positions):
        tokens[row, p], tokens[row, p + 1] = vocab - 1, tokens[row, -1]
    return tokens


def _cases_answer_opens_chunk() -> list[Case]:
    specs = [
        ("64 random rows of 64 tokens, chunk 32", induction_heads(64, 64, 16, seed=501).tokens, 32, 15),
        (
            "triggers at 6, 7, 8, 15, 0 in rows of 20, chunk 8",
            _rows_with_trigger_at([6, 7, 8, 15, 0], 20),
            8,
            15,
        ),
        (
            "rows of 50, chunk 12 (12 does not divide 50), triggers at 10, 11, 23, 35, 46",
            _rows_with_trigger_at([10, 11, 23, 35, 46], 50),
            12,
            15,
        ),
        ("batch 1: a trigger at 3 in a row of 9, chunk 4", _rows_with_trigger_at([3], 9), 4, 15),
        ("chunk 1: every answer opens a chunk", induction_heads(5, 17, 16, seed=502).tokens, 1, 15),
        ("vocabulary 8 (trigger 7), rows of 33, chunk 5", induction_heads(40, 33, 8, seed=503).tokens, 5, 7),
    ]
    return [Case(label, (t, c, trig), _ref_answer_opens_chunk(t, c, trig)) for label, t, c, trig in specs]


_EDGE_MISTAKES = (
    Mistake(
        "the trigger opens the chunk",
        lambda t, c, trig: _first_trigger(t, trig) % c == 0,
        "the blind spot is where the ANSWER x (the token after the trigger) is the first token of a "
        "chunk: its chunked layer then cannot see the trigger just before it.",
    ),
    Mistake(
        "the answer closes the chunk",
        lambda t, c, trig: (_first_trigger(t, trig) + 2) % c == 0,
        "a chunk starts at positions 0, C, 2C, ...: the answer at position p + 1 opens one when "
        "(p + 1) is a multiple of C.",
    ),
    Mistake(
        "the final trigger",
        lambda t, c, trig: torch.full((t.shape[0],), (t.shape[1] - 1) % c == 0),
        "use the FIRST trigger (the one followed by the answer x), not the trigger at the end of the row.",
    ),
    Mistake(
        "the last token of a chunk",
        lambda t, c, trig: (_first_trigger(t, trig) + 1) % c == c - 1,
        "the answer opens the chunk when (p + 1) % C == 0, with p the first trigger's position.",
    ),
)


# ====================================================================== 5.2 the predicted share
def _cases_blind_spot_share() -> list[Case]:
    specs = [
        ("length 64, chunk 32", 64, 32),
        ("length 1024, chunk 32", 1024, 32),
        ("length 35, chunk 32: the first possible edge is the last position a trigger can take", 35, 32),
        ("length 16, chunk 32: no chunk edge inside the row", 16, 32),
        ("length 100, chunk 7 (7 does not divide 97)", 100, 7),
        ("length 16384, chunk 8192 (Scout's chunk)", 16384, 8192),
    ]
    return [Case(label, (n, c), blind_spot_share(n, c)) for label, n, c in specs]


_SHARE_MISTAKES = (
    Mistake(
        "1 / C",
        lambda n, c: 1 / c,
        "1 / C is the share for an endless row; count the trigger positions exactly: p runs over "
        "0 .. length - 4 (length - 3 positions), and p + 1 must be a multiple of C.",
    ),
    Mistake(
        "every position",
        lambda n, c: float(((torch.arange(n) + 1) % c == 0).double().mean()),
        "the first trigger cannot be anywhere: it sits at 0 .. length - 4 (the row ends with "
        "trigger, x after it, and the first pair must fit before them).",
    ),
    Mistake(
        "the trigger opens the chunk",
        lambda n, c: float((torch.arange(0, n - 3) % c == 0).double().mean()),
        "count positions p whose ANSWER p + 1 opens a chunk ((p + 1) % C == 0), not p % C == 0.",
    ),
)


# ====================================================================== 5.3 the measured split
def _ref_split_accuracy(hits: Tensor, at_edge: Tensor) -> tuple[float, float]:
    edge = float(hits[at_edge].double().mean()) if bool(at_edge.any()) else math.nan
    other = float(hits[~at_edge].double().mean()) if bool((~at_edge).any()) else math.nan
    return edge, other


def _cases_split_accuracy() -> list[Case]:
    g = torch.Generator().manual_seed(505)
    specs = []
    for label, n, p_edge in (
        ("256 rows, 8 at the edge", 256, 8 / 256),
        ("64 rows, a third at the edge", 64, 1 / 3),
        ("batch 1 at the edge", 1, 1.0),
        ("17 rows (odd), 5 at the edge", 17, 5 / 17),
        ("1000 rows, 31 at the edge", 1000, 31 / 1000),
    ):
        at_edge = torch.zeros(n, dtype=torch.bool)
        at_edge[torch.randperm(n, generator=g)[: round(p_edge * n)]] = True
        hits = torch.rand(n, generator=g) < torch.where(at_edge, 0.2, 0.95)
        specs.append((label, hits, at_edge))
    specs.append(
        (
            "no row at the edge: its accuracy is NaN",
            torch.rand(12, generator=g) < 0.9,
            torch.zeros(12, dtype=torch.bool),
        )
    )
    return [Case(label, (h, e), _ref_split_accuracy(h, e)) for label, h, e in specs]


def _divided_by_all(hits: Tensor, at_edge: Tensor) -> tuple[float, float]:
    n = hits.numel()
    return float((hits & at_edge).sum() / n), float((hits & ~at_edge).sum() / n)


_SPLIT_MISTAKES = (
    Mistake(
        "swapped",
        lambda h, e: _ref_split_accuracy(h, e)[::-1],
        "return (accuracy at the edge, accuracy elsewhere), in that order.",
    ),
    Mistake(
        "divided by all rows",
        _divided_by_all,
        "an accuracy within a group is hits in the group / rows in the group, not / all rows.",
    ),
    Mistake(
        "overall twice",
        lambda h, e: (float(h.double().mean()), float(h.double().mean())),
        "split the rows by at_edge: hits[at_edge] and hits[~at_edge].",
    ),
)


def _compare_split(expected: tuple[float, float], got: object) -> str | None:
    """Like compare_floats, except that an empty group's NaN must come back as NaN."""
    names = ("edge_accuracy", "other_accuracy")
    if not isinstance(got, (tuple, list)) or len(got) != 2:
        return compare_floats(names)(expected, got)
    for name, e, g in zip(names, expected, got, strict=True):
        if math.isnan(e):
            try:
                empty = math.isnan(float(g))
            except (TypeError, ValueError):
                empty = False
            if not empty:
                return f"{name}: no row is in this group, so its accuracy is NaN (float('nan')); got {g!r}"
            continue
        problem = compare_float(e, g, name)
        if problem:
            return problem
    return None


# ====================================================================== the steps
STEPS: tuple[Step, ...] = (
    Step(
        "5.1",
        "answer_opens_chunk",
        ("tokens", "chunk", "trigger"),
        "which induction rows put the answer x on the first token of a chunk (the blind spot)",
        _cases_answer_opens_chunk,
        lambda e, g: compare_tensor(e, g, "at_edge"),
        _EDGE_MISTAKES,
        "find each row's first trigger p among tokens[:, :-2]; the row is at the edge when p + 1 is a "
        "multiple of the chunk.",
        hints=Hints(
            concept="A chunked layer's query sees only keys of its own chunk. The answer x learns 'the "
            "trigger came just before me' in layer 0, a chunked layer: when x is the first token of its "
            "chunk, the trigger is in the previous chunk and out of sight.",
            formula="p = position of the first trigger in the row (not the final one); at the edge when "
            "(p + 1) mod C = 0. Return a bool tensor [N].",
            code="l4lab/induction.py, first_trigger and evaluate (edge = ...); l4lab/ops.py, "
            "visibility_mask, for which keys a chunked query sees.",
        ),
    ),
    Step(
        "5.2",
        "blind_spot_share",
        ("length", "chunk"),
        "the share of induction rows of a length whose answer opens a chunk (a prediction)",
        _cases_blind_spot_share,
        lambda e, g: compare_float(e, g, "share"),
        _SHARE_MISTAKES,
        "count the first-trigger positions p in 0 .. length - 4 with (p + 1) % chunk == 0, over all "
        "length - 3 of them.",
        hints=Hints(
            concept="l4lab.data.induction_heads draws the first trigger uniformly; the share of rows in "
            "the blind spot is the share of its possible positions that put x on a chunk's first token.",
            formula="share = #{p in [0, length - 4] : (p + 1) mod C = 0} / (length - 3); about 1 / C for "
            "long rows, but not exactly.",
            code="l4lab/data.py, induction_heads: where `position` is drawn (l4lab/induction.py has the "
            "reference, blind_spot_share: look only after trying).",
        ),
    ),
    Step(
        "5.3",
        "split_accuracy",
        ("hits", "at_edge"),
        "the accuracy on rows at the chunk edge and on the others (NaN for an empty group)",
        _cases_split_accuracy,
        _compare_split,
        _SPLIT_MISTAKES,
        "edge = mean of hits over the rows where at_edge is True, other = over the rest; a group "
        "without rows has accuracy NaN (float('nan')).",
        hints=Hints(
            concept="Split the test rows into the two groups and score each on its own: a blind spot on "
            "3% of the rows hides inside an overall accuracy of 97%.",
            formula="edge = sum(hits & at_edge) / sum(at_edge); other = sum(hits & ~at_edge) / "
            "sum(~at_edge).",
            code="l4lab/induction.py, evaluate: edge_accuracy and other_accuracy.",
        ),
    ),
)

register_lab("5", "irope_length", STEPS)
