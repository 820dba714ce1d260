"""Generated pictures and questions for a tiny multimodal Llama 4: shapes, colours, counts, positions,
two pictures in one prompt, and a highlighted region. Nothing is downloaded.

A picture is ``size`` x ``size`` pixels (32 by default) cut into a 2 x 2 grid of cells. Each cell is
empty or holds one shape (square, circle, triangle) in one of four colours, on black. A region question
draws a white frame around one cell. Every answer is one word, right by construction (the generator
knows the scene it drew), and every answer of a question type is equally likely, so a model that cannot
see scores the chance level of :data:`CHANCE`.

============  ===========================================  =============  ========
type          question (words)                             answer         chance
============  ===========================================  =============  ========
colour        ``colour top-left``                          a colour       1/4
shape         ``shape bottom-right``                       a shape        1/3
count         ``count``                                    1, 2, 3 or 4   1/4
position      ``where red circle``                         a cell         1/4
region        ``colour boxed`` (a frame around one cell)   a colour       1/4
two-images    ``colour top-left second`` (two pictures)    a colour       1/4
============  ===========================================  =============  ========

A prompt is ``<bos>``, each picture as ``<|image_start|>``, its ``tokens_per_image`` ``<|patch|>``
placeholders, ``<|image_end|>``, then the question's words; the model must predict the answer word.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 240),
    "yellow": (235, 215, 40),
}
SHAPES = ("square", "circle", "triangle")
CELLS = ("top-left", "top-right", "bottom-left", "bottom-right")  # row by row, like the patches
COUNTS = ("1", "2", "3", "4")
ORDINALS = ("first", "second")
QUESTION_TYPES = ("colour", "shape", "count", "position", "region", "two-images")
CHANCE = {
    "colour": 1 / 4,
    "shape": 1 / 3,
    "count": 1 / 4,
    "position": 1 / 4,
    "region": 1 / 4,
    "two-images": 1 / 4,
}
FRAME = (255, 255, 255)  # the highlight drawn around the cell a region question asks about

SPECIAL_TOKENS = ("<pad>", "<bos>", "<|image_start|>", "<|image_end|>", "<|patch|>")
WORDS = (*COLOURS, *SHAPES, *CELLS, *COUNTS, *ORDINALS, "colour", "shape", "count", "where", "boxed")
VOCAB = (*SPECIAL_TOKENS, *WORDS)
TOKEN_ID = {token: i for i, token in enumerate(VOCAB)}
PAD, BOS = TOKEN_ID["<pad>"], TOKEN_ID["<bos>"]
IMAGE_START, IMAGE_END, PATCH = TOKEN_ID["<|image_start|>"], TOKEN_ID["<|image_end|>"], TOKEN_ID["<|patch|>"]


@dataclass(frozen=True)
class Thing:
    """One shape in one cell (0..3, row by row) of a picture."""

    shape: str
    colour: str
    cell: int


@dataclass(frozen=True)
class Scene:
    """What one picture shows: its things (at most one per cell), and the framed cell (or None)."""

    things: tuple[Thing, ...]
    framed: int | None = None

    def at(self, cell: int) -> Thing | None:
        return next((thing for thing in self.things if thing.cell == cell), None)


@dataclass(frozen=True)
class Example:
    """One question: its type, its pictures, its words and its one-word answer."""

    kind: str
    scenes: tuple[Scene, ...]
    question: tuple[str, ...]
    answer: str


# ---------------------------------------------------------------------- pictures
def draw(scene: Scene, size: int = 32) -> np.ndarray:
    """The picture of ``scene``: size x size x 3 uint8, integer arithmetic only (the same everywhere).

    Each shape is centred in its cell, ``3/8`` of the cell wide on each side of the centre: a filled
    square, a filled disc, or a triangle pointing up. The frame is the outermost pixel ring of its cell.
    """
    if size % 2 or size < 8:
        raise ValueError(f"size = {size}: pass an even number of pixels >= 8 (two cells per side)")
    picture = np.zeros((size, size, 3), np.uint8)
    cell_size = size // 2
    radius = 3 * cell_size // 8
    dy, dx = np.mgrid[0:cell_size, 0:cell_size] - cell_size // 2
    masks = {
        "square": (abs(dx) <= radius) & (abs(dy) <= radius),
        "circle": dx * dx + dy * dy <= radius * radius,
        "triangle": (dy >= -radius) & (dy <= radius) & (2 * abs(dx) <= dy + radius),
    }
    for thing in scene.things:
        top, left = cell_origin(thing.cell, cell_size)
        picture[top : top + cell_size, left : left + cell_size][masks[thing.shape]] = COLOURS[thing.colour]
    if scene.framed is not None:
        top, left = cell_origin(scene.framed, cell_size)
        view = picture[top : top + cell_size, left : left + cell_size]
        view[[0, -1], :] = FRAME
        view[:, [0, -1]] = FRAME
    return picture


def cell_origin(cell: int, cell_size: int) -> tuple[int, int]:
    """The (row, column) pixel of a cell's top-left corner."""
    return (cell // 2) * cell_size, (cell % 2) * cell_size


# ---------------------------------------------------------------------- questions
def random_scene(rng: np.random.Generator, count: int | None = None) -> Scene:
    """1-4 things (``count`` of them when given) in distinct cells, shapes and colours drawn uniformly."""
    count = int(rng.integers(1, 5)) if count is None else count
    cells = sorted(rng.choice(4, size=count, replace=False).tolist())
    return Scene(
        tuple(Thing(SHAPES[rng.integers(3)], list(COLOURS)[rng.integers(4)], cell) for cell in cells)
    )


def make_example(kind: str, rng: np.random.Generator) -> Example:
    """One question of type ``kind`` (see :data:`QUESTION_TYPES`) with a uniformly distributed answer."""
    scene = random_scene(rng)
    if kind == "colour" or kind == "shape":
        thing = scene.things[rng.integers(len(scene.things))]
        answer = thing.colour if kind == "colour" else thing.shape
        return Example(kind, (scene,), (kind, CELLS[thing.cell]), answer)
    if kind == "count":
        return Example(kind, (scene,), ("count",), str(len(scene.things)))
    if kind == "position":
        target = scene.things[rng.integers(len(scene.things))]
        # the asked-for colour and shape name one thing: the others are redrawn until they differ
        others = []
        for thing in scene.things:
            while thing != target and (thing.colour, thing.shape) == (target.colour, target.shape):
                thing = Thing(SHAPES[rng.integers(3)], list(COLOURS)[rng.integers(4)], thing.cell)
            others.append(thing)
        scene = Scene(tuple(others))
        return Example(kind, (scene,), ("where", target.colour, target.shape), CELLS[target.cell])
    if kind == "region":
        thing = scene.things[rng.integers(len(scene.things))]
        return Example(kind, (Scene(scene.things, thing.cell),), ("colour", "boxed"), thing.colour)
    if kind == "two-images":
        scenes = (scene, random_scene(rng))
        which = int(rng.integers(2))
        asked = scenes[which]
        thing = asked.things[rng.integers(len(asked.things))]
        return Example(kind, scenes, ("colour", CELLS[thing.cell], ORDINALS[which]), thing.colour)
    raise ValueError(f"question type {kind!r} is unknown: pass one of {QUESTION_TYPES}")


def make_examples(count: int, seed: int, kinds: tuple[str, ...] = QUESTION_TYPES) -> list[Example]:
    """``count`` questions, the types taking turns, from a generator seeded with ``seed``."""
    rng = np.random.default_rng(seed)
    return [make_example(kinds[i % len(kinds)], rng) for i in range(count)]


# ---------------------------------------------------------------------- tensors
@dataclass
class MultimodalBatch:
    """Prompts as token ids and pictures as tiles, ready for :class:`l4lab.vision.Llama4Multimodal`.

    ``input_ids`` [B, T] (right-padded with ``<pad>``); ``answer_at`` [B]: the position whose next-token
    prediction is the answer (the prompt's last token); ``answers`` [B]: the answer's token id;
    ``pixel_values`` [images, 3, size, size] normalised to [-1, 1], in the order of the placeholders;
    ``kinds``: each row's question type.
    """

    input_ids: Tensor
    answer_at: Tensor
    answers: Tensor
    pixel_values: Tensor
    kinds: list[str]


def prompt_ids(example: Example, tokens_per_image: int) -> list[int]:
    """``<bos>``, each picture's placeholders between ``<|image_start|>`` and ``<|image_end|>``, the words."""
    ids = [BOS]
    for _ in example.scenes:
        ids += [IMAGE_START, *[PATCH] * tokens_per_image, IMAGE_END]
    return ids + [TOKEN_ID[word] for word in example.question]


def encode(examples: list[Example], tokens_per_image: int, size: int = 32) -> MultimodalBatch:
    """Token ids, answer positions and normalised pictures of ``examples``."""
    prompts = [prompt_ids(example, tokens_per_image) for example in examples]
    length = max(len(prompt) for prompt in prompts)
    input_ids = torch.full((len(prompts), length), PAD, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, : len(prompt)] = torch.tensor(prompt)
    pictures = np.stack([draw(scene, size) for example in examples for scene in example.scenes])
    pixel_values = torch.from_numpy(pictures).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return MultimodalBatch(
        input_ids,
        torch.tensor([len(prompt) - 1 for prompt in prompts]),
        torch.tensor([TOKEN_ID[example.answer] for example in examples]),
        pixel_values,
        [example.kind for example in examples],
    )
