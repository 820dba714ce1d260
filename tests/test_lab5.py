"""Lab 5's checker (iRoPE length generalisation): right answers written from scratch pass, l4lab's own
code passes, and the typical wrong answers are each rejected with their hint."""

from __future__ import annotations

import math

import pytest
import torch

from l4lab import labs
from l4lab.induction import first_trigger


# ------------------------------------------------------------ right answers, as a student writes them
def answer_opens_chunk(tokens, chunk, trigger):
    first = (tokens[:, :-2] == trigger).int().argmax(dim=1)
    return (first + 1) % chunk == 0


def blind_spot_share(length, chunk):
    positions = range(length - 3)
    return sum((p + 1) % chunk == 0 for p in positions) / (length - 3)


def split_accuracy(hits, at_edge):
    def mean(x):
        return x.float().mean().item() if len(x) else float("nan")

    return mean(hits[at_edge]), mean(hits[~at_edge])


SOLUTIONS = {"5.1": answer_opens_chunk, "5.2": blind_spot_share, "5.3": split_accuracy}


def _l4lab_split(hits, at_edge):
    return tuple(
        float(hits[group].double().mean()) if bool(group.any()) else math.nan for group in (at_edge, ~at_edge)
    )


FROM_L4LAB = {
    # l4lab.induction.first_trigger knows the task's trigger (vocabulary 16); the cases use others too
    "5.1": lambda t, c, trig: (first_trigger(torch.where(t == trig, 15, t.clamp(max=14))) + 1) % c == 0,
    "5.3": _l4lab_split,
}


@pytest.mark.parametrize("step", sorted(SOLUTIONS))
def test_a_right_answer_written_from_scratch_passes(step: str) -> None:
    result = labs.check(step, SOLUTIONS[step])
    assert result.passed, result.message
    assert result.message.startswith(f"✓ {step} passed: 6 cases")


@pytest.mark.parametrize("step", sorted(FROM_L4LAB))
def test_l4lab_itself_passes(step: str) -> None:
    assert labs.check(step, FROM_L4LAB[step]).passed


# ---------------------------------------------------------------------- wrong answers a student writes
def trigger_opens_chunk(tokens, chunk, trigger):
    return (tokens[:, :-2] == trigger).int().argmax(dim=1) % chunk == 0


def last_trigger(tokens, chunk, trigger):
    last = tokens.shape[1] - 1 - (tokens.flip(1)[:, 1:] == trigger).int().argmax(dim=1) - 1
    return (last + 1) % chunk == 0


def share_one_over_chunk(length, chunk):
    return 1 / chunk


def share_over_all_positions(length, chunk):
    return sum((p + 1) % chunk == 0 for p in range(length)) / length


def split_swapped(hits, at_edge):
    return split_accuracy(hits, at_edge)[::-1]


def split_over_all_rows(hits, at_edge):
    return (hits & at_edge).sum().item() / len(hits), (hits & ~at_edge).sum().item() / len(hits)


def split_empty_group_zero(hits, at_edge):
    edge, other = split_accuracy(hits, at_edge)
    return (0.0 if math.isnan(edge) else edge), other


WRONG = [
    ("5.1", trigger_opens_chunk, "the ANSWER x"),
    ("5.1", last_trigger, "FIRST trigger"),
    ("5.2", share_one_over_chunk, "endless row"),
    ("5.2", share_over_all_positions, "0 .. length - 4"),
    ("5.3", split_swapped, "in that order"),
    ("5.3", split_over_all_rows, "rows in the group"),
    ("5.3", split_empty_group_zero, "NaN"),
]


@pytest.mark.parametrize(("step", "fn", "words"), WRONG, ids=[w[1].__name__ for w in WRONG])
def test_typical_wrong_answers_are_rejected_with_their_hint(step, fn, words) -> None:
    result = labs.check(step, fn)
    assert not result.passed
    assert words in result.message, result.message  # the hint of the mistake matched


@pytest.mark.parametrize("step", sorted(SOLUTIONS))
def test_every_registered_mistake_is_rejected(step: str) -> None:
    for mistake in labs._steps_table()[step].mistakes:
        assert not labs.check(step, mistake.fn).passed, mistake.name


def test_hints_come_in_three_tiers_none_of_them_the_answer() -> None:
    for step in SOLUTIONS:
        tiers = [str(labs.hint(step, level)) for level in (1, 2, 3)]
        assert len(set(tiers)) == 3
        assert "l4lab/" in tiers[2]
    assert labs.steps("5") == labs.steps("irope_length")
    assert len(labs.steps("5")) == 3


def test_the_prediction_matches_the_task() -> None:
    """5.2's reference predicts the share of blind-spot rows that induction_heads actually draws."""
    from l4lab.data import induction_heads

    tokens = induction_heads(20000, 64, 16, seed=7).tokens
    drawn = float(answer_opens_chunk(tokens, 32, 15).float().mean())
    assert drawn == pytest.approx(blind_spot_share(64, 32), abs=0.004)  # 1/61 = 0.0164, sd 0.0009
