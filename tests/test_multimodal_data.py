"""The generated multimodal task: every answer is read back from the PIXELS by an independent reader
(colour by value, shape by how much of its bounding box it fills, the frame by its white ring), and
every answer of a question type is about equally likely (the chance level the experiment compares to)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from l4lab.multimodal_data import (
    CHANCE,
    PAD,
    PATCH,
    QUESTION_TYPES,
    VOCAB,
    Scene,
    Thing,
    draw,
    encode,
    make_example,
    make_examples,
)

NAMED_COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 240),
    "yellow": (235, 215, 40),
}
CELL_NAMES = ["top-left", "top-right", "bottom-left", "bottom-right"]


def read_cell(picture: np.ndarray, cell: int) -> tuple[str | None, str | None, bool]:
    """(colour, shape, framed) of one cell, from its pixels alone."""
    half = picture.shape[0] // 2
    top, left = (cell // 2) * half, (cell % 2) * half
    view = picture[top : top + half, left : left + half].astype(int)
    ring = np.concatenate([view[0], view[-1], view[:, 0], view[:, -1]])
    framed = bool((ring == 255).all())
    inside = view[1:-1, 1:-1]
    lit = inside.sum(axis=2) > 0
    if not lit.any():
        return None, None, framed
    colours = {tuple(pixel) for pixel in inside[lit]}
    assert len(colours) == 1, f"cell {cell} holds several colours {colours}"
    value = colours.pop()
    (colour,) = [name for name, rgb in NAMED_COLOURS.items() if rgb == value]
    rows, columns = np.nonzero(lit)
    fill = lit.sum() / ((np.ptp(rows) + 1) * (np.ptp(columns) + 1))
    shape = "square" if fill > 0.95 else "circle" if fill > 0.6 else "triangle"
    return colour, shape, framed


def answer_from_pixels(pictures: list[np.ndarray], question: tuple[str, ...]) -> str:
    """The answer to ``question`` computed from the pictures, without the scenes that drew them."""
    cells = [[read_cell(picture, cell) for cell in range(4)] for picture in pictures]
    if question == ("count",):
        return str(sum(colour is not None for colour, _, _ in cells[0]))
    if question == ("colour", "boxed"):
        (framed,) = [c for c in range(4) if cells[0][c][2]]
        return cells[0][framed][0]
    if question[0] == "where":
        (cell,) = [c for c in range(4) if cells[0][c][:2] == (question[1], question[2])]
        return CELL_NAMES[cell]
    picture = {"first": 0, "second": 1}[question[2]] if len(question) == 3 else 0
    colour, shape, _ = cells[picture][CELL_NAMES.index(question[1])]
    return colour if question[0] == "colour" else shape


@pytest.mark.parametrize("size", [32, 64])
def test_every_answer_is_what_the_pixels_show(size: int) -> None:
    for example in make_examples(600, seed=1):
        pictures = [draw(scene, size) for scene in example.scenes]
        assert answer_from_pixels(pictures, example.question) == example.answer, example


def test_answers_are_about_uniform_so_chance_is_the_control() -> None:
    examples = make_examples(6 * 800, seed=2)
    for kind in QUESTION_TYPES:
        answers = Counter(example.answer for example in examples if example.kind == kind)
        assert len(answers) == round(1 / CHANCE[kind])
        for share in (count / 800 for count in answers.values()):
            assert abs(share - CHANCE[kind]) < 0.06, (kind, answers)


def test_the_drawing_is_the_scene() -> None:
    scene = Scene((Thing("circle", "blue", 1), Thing("triangle", "red", 2)), framed=2)
    picture = draw(scene)
    assert read_cell(picture, 0) == (None, None, False)
    assert read_cell(picture, 1) == ("blue", "circle", False)
    assert read_cell(picture, 2) == ("red", "triangle", True)
    assert picture.dtype == np.uint8 and picture.shape == (32, 32, 3)


def test_encode_lays_out_placeholders_answers_and_pictures() -> None:
    examples = [
        make_example("two-images", np.random.default_rng(0)),
        make_example("count", np.random.default_rng(1)),
    ]
    batch = encode(examples, tokens_per_image=16)
    assert batch.pixel_values.shape == (3, 3, 32, 32)
    assert int((batch.input_ids == PATCH).sum()) == 3 * 16
    assert batch.pixel_values.min() >= -1 and batch.pixel_values.max() <= 1
    for row, example in enumerate(examples):
        last = int(batch.answer_at[row])
        assert VOCAB[int(batch.input_ids[row, last])] == example.question[-1]
        assert (batch.input_ids[row, last + 1 :] == PAD).all()
        assert VOCAB[int(batch.answers[row])] == example.answer
    assert batch.input_ids.shape[1] == 1 + 2 * 18 + 3
    assert torch.equal(
        batch.pixel_values[2], torch.from_numpy(draw(examples[1].scenes[0])).permute(2, 0, 1) / 127.5 - 1
    )


def test_bad_requests_say_what_to_pass() -> None:
    with pytest.raises(ValueError, match="question type 'size' is unknown"):
        make_example("size", np.random.default_rng(0))
    with pytest.raises(ValueError, match="an even number of pixels >= 8"):
        draw(Scene(()), size=7)
