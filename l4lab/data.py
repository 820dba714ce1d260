"""Data for the guided notebooks: small generated datasets that each measure one ability.

Every dataset here is generated on the spot or read from files that ship with Python, so nothing is
downloaded, and each one is deterministic under its ``seed`` (a private ``random.Random(seed)`` or
``torch.Generator().manual_seed(seed)``; the global random state is never touched). All of them come
as a :class:`TokenDataset`: a ``[N, T]`` tensor of token ids plus masks saying which targets count.

What each task measures
-----------------------

:func:`mixture`, the training mixture
    Rows of short segments from five domains (:data:`DOMAINS`), each segment closed by ``<|sep|>``, with
    every token's domain recorded, so a notebook can plot the loss per domain and watch a model learn
    them at different speeds, or see which experts the router sends each domain to:

    * ``arithmetic``: ``"123+45=168;7+8=15;"``. The operands are random (unlearnable) and the sums are
      exact: predicting a sum's digits takes carrying, a small algorithm.
    * ``code``: ``"y = f(x[1], (n+2))"`` or ``"([]{()})"``. Every bracket opened is closed, in the right
      order, so the model has to keep a stack of open brackets in its state.
    * ``copy``: ``"qhzkw>qhzkw"``. Random letters, then the same again: the second half is predictable
      only by looking back, the job of an induction head (find the previous occurrence of the current
      token, copy what followed it).
    * ``recall``: ``"a=3,k=7,q=1?k=7"``. Key-value pairs, then a question: retrieval by content.
    * ``text``: natural English from :func:`corpus_text`, for the plain statistics of language.

:func:`induction_heads`, the synthetic task of the Mamba paper (Gu & Dao, 2023)
    Random tokens with a trigger token placed once, followed by a random token ``x``; the trigger comes
    again at the end and the model must answer ``x``. Only that final answer counts. A model that has
    learned the induction mechanism answers correctly at any length, so training at 256 tokens and
    testing at 2048-16384 measures length generalisation (RoPE vs NoPE vs iRoPE).

:func:`passkey`, the pass-key retrieval test of Landmark Attention (Mohtashami & Jaggi, 2023)
    A five-digit pass key hidden at a chosen depth of repetitive filler text, asked for at the end: does
    the model find one needle in a long context, and does that depend on where the needle sits?

:func:`associative_recall`, multi-query associative recall (MQAR, Zoology: Arora et al., 2023)
    Key-value pairs, then several keys asked for again. Attention solves it by looking each key up; a
    fixed-size recurrent state has to store every pair. It measures recall capacity as pairs grow.

:func:`corpus_text` / :func:`corpus_dataset`
    Real English technical prose (the docstrings and comments of Python's standard library), for plain
    language-model training and the ``text`` domain of the mixture.

Loss masks
----------

``tokens[:, :-1]`` is the model's input and ``tokens[:, 1:]`` its target. ``loss_mask`` (and
``answers``) are aligned with ``tokens``: ``loss_mask[i, t]`` says whether predicting ``tokens[i, t]``
from ``tokens[i, :t]`` counts, so position 0 (predicted from nothing) never counts and the mask for the
targets is ``loss_mask[:, 1:]`` (the property :attr:`TokenDataset.target_mask`)::

    logits = model(batch.inputs).logits  # [B, T-1, vocab]
    losses = F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), reduction="none")
    loss = (losses * batch.target_mask.flatten()).sum() / batch.target_mask.sum()

:class:`BatchSampler` (also built by :func:`batches`) draws random batches of rows forever and saves its
position as a small JSON-serialisable dict, so an interrupted training run resumes on exactly the
batches it would have seen.
"""

from __future__ import annotations

import ast
import functools
import io
import os
import random
import string
import tokenize
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from l4lab.tokenizer import ByteTokenizer

__all__ = [
    "CORPUS_MODULES",
    "DOMAINS",
    "PASSKEY_FILLER",
    "BatchSampler",
    "TokenDataset",
    "associative_recall",
    "batches",
    "corpus_dataset",
    "corpus_text",
    "induction_heads",
    "mixture",
    "passkey",
]

DOMAINS: tuple[str, ...] = ("arithmetic", "code", "copy", "recall", "text")

_TOKENIZER = ByteTokenizer()
PAD_ID: int = _TOKENIZER.pad_token_id  # 258
SEP_ID: int = _TOKENIZER.sep_token_id  # 259


# ---------------------------------------------------------------------------------------------- checks


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return value


# ------------------------------------------------------------------------------------------- dataset


@dataclass(eq=False)  # tensors have no single truth value: compare fields with torch.equal
class TokenDataset:
    """Rows of token ids with the masks that say which targets count.

    ``tokens``: ``long [N, T]``. The model reads ``tokens[:, :-1]`` and predicts ``tokens[:, 1:]``.

    ``loss_mask``: ``bool [N, T]`` or None. ``loss_mask[i, t]`` is True where the *target*
    ``tokens[i, t]`` counts in the loss; aligned with ``tokens``, so column 0 is always False. None means
    every target counts.

    ``domains``: ``long [N, T]`` or None (only :func:`mixture` sets it): each token's index into
    :data:`DOMAINS`, with ``-1`` on padding. A ``<|sep|>`` belongs to the segment it closes.

    ``answers``: ``bool [N, T]`` or None, aligned like ``loss_mask``: True on the tokens that the
    preceding context determines exactly, so that a perfect model predicts them with certainty (the
    digits of a sum, the second half of a copy, a recalled value, a pass key, an induction target). Use
    it to measure accuracy rather than loss. In :func:`induction_heads`, :func:`passkey` and
    :func:`associative_recall` it equals ``loss_mask``; in :func:`mixture` the loss counts every real
    token while ``answers`` marks only the determined ones (``code`` and ``text`` have none).
    """

    tokens: torch.Tensor
    loss_mask: torch.Tensor | None = None
    domains: torch.Tensor | None = None
    answers: torch.Tensor | None = None

    def __post_init__(self) -> None:
        tokens = self.tokens
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype != torch.long:
            got = (
                f"shape {tuple(tokens.shape)}, dtype {tokens.dtype}"
                if isinstance(tokens, torch.Tensor)
                else type(tokens).__name__
            )
            raise ValueError(f"TokenDataset.tokens must be a long tensor [N, T], got {got}")
        for name, dtype in (("loss_mask", torch.bool), ("domains", torch.long), ("answers", torch.bool)):
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, torch.Tensor) or value.shape != tokens.shape or value.dtype != dtype:
                got = (
                    f"shape {tuple(value.shape)}, dtype {value.dtype}"
                    if isinstance(value, torch.Tensor)
                    else type(value).__name__
                )
                raise ValueError(
                    f"TokenDataset.{name} must be a {dtype} tensor of the tokens' shape "
                    f"{tuple(tokens.shape)}, got {got}"
                )

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, index: int | slice | torch.Tensor | list[int]) -> TokenDataset:
        """The rows ``index`` (an int keeps the row dimension: ``dataset[3]`` has ``N = 1``)."""
        if isinstance(index, int):
            index = [index]

        def pick(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x[index]

        return TokenDataset(self.tokens[index], pick(self.loss_mask), pick(self.domains), pick(self.answers))

    def rows(self, index: int | slice | torch.Tensor | list[int]) -> TokenDataset:
        """The rows ``index``, as a :class:`TokenDataset`: the same as ``dataset[index]``."""
        return self[index]

    @property
    def inputs(self) -> torch.Tensor:
        """``tokens[:, :-1]``: what the model reads."""
        return self.tokens[:, :-1]

    @property
    def targets(self) -> torch.Tensor:
        """``tokens[:, 1:]``: what the model should predict at each input position."""
        return self.tokens[:, 1:]

    @property
    def target_mask(self) -> torch.Tensor:
        """``loss_mask[:, 1:]`` (all True when ``loss_mask`` is None): which targets count."""
        if self.loss_mask is None:
            return torch.ones_like(self.targets, dtype=torch.bool)
        return self.loss_mask[:, 1:]

    def to(self, device: torch.device | str) -> TokenDataset:
        """The same dataset with every tensor on ``device``."""

        def move(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x.to(device)

        return TokenDataset(
            self.tokens.to(device), move(self.loss_mask), move(self.domains), move(self.answers)
        )

    def split(self, fraction: float, seed: int = 0) -> tuple[TokenDataset, TokenDataset]:
        """Split the rows at random into ``(first, second)`` with ``round(fraction * N)`` rows in first.

        Typically ``train, val = dataset.split(0.9)``. Deterministic under ``seed``; every row lands in
        exactly one part, and each part keeps the rows in their original order.
        """
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"split fraction must be strictly between 0 and 1, got {fraction}")
        n = len(self)
        first = round(fraction * n)
        if not 0 < first < n:
            raise ValueError(
                f"split({fraction}) of {n} rows leaves an empty part ({first} and {n - first} rows): "
                "use more rows or a fraction closer to 0.5"
            )
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        return self[order[:first].sort().values], self[order[first:].sort().values]


# -------------------------------------------------------------------------------------------- corpus

# Modules that exist as plain .py files in every CPython from 3.10 on (none of them is deprecated, or
# became a package), sorted. Missing files (a stripped-down install) are skipped.
CORPUS_MODULES: tuple[str, ...] = (
    "argparse.py",
    "bisect.py",
    "calendar.py",
    "cmd.py",
    "colorsys.py",
    "configparser.py",
    "contextlib.py",
    "copy.py",
    "csv.py",
    "dataclasses.py",
    "difflib.py",
    "fnmatch.py",
    "fractions.py",
    "functools.py",
    "getopt.py",
    "gettext.py",
    "glob.py",
    "graphlib.py",
    "heapq.py",
    "ipaddress.py",
    "json/__init__.py",
    "json/decoder.py",
    "json/encoder.py",
    "numbers.py",
    "pprint.py",
    "queue.py",
    "random.py",
    "reprlib.py",
    "sched.py",
    "shlex.py",
    "statistics.py",
    "textwrap.py",
    "timeit.py",
    "tokenize.py",
    "weakref.py",
)

_COMMENT_NOISE = ("noqa", "type: ignore", "pragma", "-*-", "fmt:", "!/usr/bin")


def _strip_doctests(doc: str) -> str:
    """Drop doctest examples: from a ``>>>`` line up to the next blank line (their expected output)."""
    kept: list[str] = []
    in_example = False
    for line in doc.splitlines():
        stripped = line.strip()
        if stripped.startswith(">>>"):
            in_example = True
        elif not stripped:
            in_example = False
        if not in_example:
            kept.append(line)
    return "\n".join(kept).strip()


def _module_prose(source: str) -> list[str]:
    """The docstrings and comment blocks of one module's source, in source order."""
    pieces: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                doc = _strip_doctests(doc)
                if doc:
                    pieces.append((node.body[0].lineno, doc))
    # consecutive comment lines form one block (a wrapped paragraph)
    block: list[str] = []
    block_start = last_line = -10
    blocks: list[tuple[int, list[str]]] = []
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type != tokenize.COMMENT:
            continue
        line = token.start[0]
        text = token.string.lstrip("#").strip()
        if line != last_line + 1:
            if block:
                blocks.append((block_start, block))
            block, block_start = [], line
        last_line = line
        if text and not any(noise in text for noise in _COMMENT_NOISE):
            block.append(text)
    if block:
        blocks.append((block_start, block))
    for line, lines in blocks:
        text = "\n".join(lines)
        if len(text.split()) >= 4 and sum(c.isalpha() for c in text) >= len(text) / 2:
            pieces.append((line, text))
    pieces.sort(key=lambda piece: piece[0])
    return [text for _, text in pieces]


@functools.lru_cache(maxsize=1)
def _full_corpus() -> str:
    stdlib = Path(os.__file__).parent
    paragraphs: list[str] = []
    for name in CORPUS_MODULES:
        path = stdlib / name
        if not path.is_file():
            continue
        with tokenize.open(path) as f:  # honours the file's encoding declaration
            source = f.read()
        paragraphs.extend(_module_prose(source))
    if not paragraphs:
        raise FileNotFoundError(
            f"found none of the corpus modules ({', '.join(CORPUS_MODULES[:3])}, ...) in {stdlib}: this "
            "Python install ships without the standard library's source files"
        )
    return "\n\n".join(paragraphs) + "\n"


def corpus_text(max_chars: int | None = None) -> str:
    """Real English technical prose, with nothing to download: Python's standard library documenting itself.

    The text is the docstrings (read with ``ast``, doctest examples removed) and comment blocks of a
    fixed, sorted list of standard-library modules (:data:`CORPUS_MODULES`: ``argparse.py``,
    ``difflib.py``, ``fractions.py``, ``textwrap.py``, ...), read from the running interpreter's own
    standard library, in source order, one paragraph per docstring or comment block, separated by blank
    lines: about 300,000 characters (Python 3.11), almost all ASCII.

    It is deterministic for a given Python version, but its content changes between Python versions (the
    library's docstrings are edited from release to release), so a model's loss on it is comparable only
    under the same Python. The text is Python's, under the Python Software Foundation License
    (https://docs.python.org/3/license.html).

    ``max_chars``: return only the first ``max_chars`` characters.
    """
    text = _full_corpus()
    if max_chars is None:
        return text
    if isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars < 0:
        raise ValueError(f"max_chars must be None or a non-negative int, got {max_chars!r}")
    return text[:max_chars]


def corpus_dataset(length: int, max_chars: int | None = None) -> TokenDataset:
    """:func:`corpus_text` as UTF-8 byte tokens chopped into consecutive rows of ``length`` tokens.

    Rows do not overlap; the tail that does not fill a whole row is dropped. Every target counts
    (``loss_mask`` is None). Split it with :meth:`TokenDataset.split`.
    """
    length = _positive_int("length", length)
    if length < 2:
        raise ValueError(f"length {length} is too short: a row needs at least 2 tokens (input and target)")
    data = corpus_text(max_chars).encode("utf-8")
    rows = len(data) // length
    if rows == 0:
        raise ValueError(
            f"the corpus ({len(data)} bytes with max_chars={max_chars}) is shorter than one row "
            f"of {length} tokens"
        )
    tokens = torch.frombuffer(bytearray(data[: rows * length]), dtype=torch.uint8).long().view(rows, length)
    return TokenDataset(tokens)


# ------------------------------------------------------------------------------------------- mixture

_LETTERS = string.ascii_lowercase
_NAMES = ("a", "b", "c", "i", "n", "x", "y", "z")
_FUNCTIONS = ("f", "g", "h", "len", "max", "min", "sum")
_BRACKETS = ("()", "[]", "{}")
_MIN_FILLER = 8  # a row's last few slots take a text snippet of at least this many tokens, else padding

Segment = tuple[str, list[tuple[int, int]]]  # text (ASCII unless text domain), answer spans [start, end)


def _number(rng: random.Random) -> int:
    digits = rng.randint(1, 4)
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def _arithmetic(rng: random.Random) -> Segment:
    text, spans = "", []
    for _ in range(rng.randint(1, 3)):
        a, b = _number(rng), _number(rng)
        question, answer = f"{a}+{b}=", str(a + b)
        spans.append((len(text) + len(question), len(text) + len(question) + len(answer)))
        text += question + answer + ";"
    return text, spans


def _expression(rng: random.Random, depth: int, compound: bool = False) -> str:
    """A random Python expression; ``compound``: not a bare name or number (it has brackets)."""
    if not compound and (depth == 0 or rng.random() < 0.3):
        return rng.choice(_NAMES) if rng.random() < 0.6 else str(rng.randint(0, 20))
    form = rng.randrange(6)
    inner = functools.partial(_expression, rng, depth - 1)
    if form == 0:
        args = ", ".join(inner() for _ in range(rng.randint(1, 2)))
        return f"{rng.choice(_FUNCTIONS)}({args})"
    if form == 1:
        return f"{rng.choice(_NAMES)}[{inner()}]"
    if form == 2:
        return f"({inner()}{rng.choice('+-*')}{inner()})"
    if form == 3:
        return "[" + ", ".join(inner() for _ in range(rng.randint(1, 3))) + "]"
    if form == 4:
        return f"{{{rng.choice(_NAMES)!r}: {inner()}}}"
    return f"({inner()}, {inner()})"


def _brackets(rng: random.Random, depth: int) -> str:
    out = ""
    for _ in range(rng.randint(1, 3)):
        opening, closing = rng.choice(_BRACKETS)
        out += opening + (_brackets(rng, depth - 1) if depth and rng.random() < 0.6 else "") + closing
    return out


def _code(rng: random.Random) -> Segment:
    kind = rng.randrange(4)
    if kind == 0:
        return _brackets(rng, 3), []
    expression = _expression(rng, 3, compound=True)
    if kind == 1:
        return f"{rng.choice(_NAMES)} = {expression}", []
    if kind == 2:
        return f"return {expression}", []
    return f"{rng.choice(_FUNCTIONS)}({expression})", []


def _copy(rng: random.Random) -> Segment:
    n = rng.randint(2, 10)
    letters = "".join(rng.choice(_LETTERS) for _ in range(n))
    return f"{letters}>{letters}", [(n + 1, 2 * n + 1)]


def _recall(rng: random.Random) -> Segment:
    keys = rng.sample(_LETTERS, rng.randint(2, 6))
    values = {key: str(rng.randrange(10)) for key in keys}
    query = rng.choice(keys)
    text = ",".join(f"{key}={values[key]}" for key in keys) + f"?{query}={values[query]}"
    return text, [(len(text) - 1, len(text))]


def _text(rng: random.Random, max_bytes: int | None = None) -> Segment:
    """A window of the corpus starting at a word, 16-96 characters (or filling exactly ``max_bytes``)."""
    corpus = _full_corpus()
    chars = rng.randint(16, 96) if max_bytes is None else max_bytes
    start = rng.randrange(max(1, len(corpus) - chars - 100))
    while start < len(corpus) - 1 and not corpus[start - 1].isspace():
        start += 1
    while start < len(corpus) - 1 and corpus[start].isspace():
        start += 1
    window = corpus[start : start + chars]
    if max_bytes is not None:  # a non-ASCII character takes several bytes: trim to fit
        while len(window.encode("utf-8")) > max_bytes:
            window = window[:-1]
    return window, []


_GENERATORS = (_arithmetic, _code, _copy, _recall, _text)


def mixture(num_sequences: int, length: int, seed: int = 0) -> TokenDataset:
    """Rows of ``length`` byte tokens made of whole segments from the five :data:`DOMAINS`.

    Each segment is one domain's text followed by ``<|sep|>`` (see the module docstring for the five
    formats); domains are chosen uniformly at random per segment (text segments are the longest, so
    text is about 40% of the tokens, each other domain 10-17%). When the next segment does not fit in what is
    left of the row, the row ends with a ``text`` segment cut to fill it exactly (if at least 8 tokens
    are left, or the row is still empty) and otherwise with ``<|pad|>`` tokens, so no segment except
    such a final text snippet is ever cut.

    ``domains`` gives each token's index into :data:`DOMAINS` (``-1`` on padding). ``loss_mask`` counts
    every real token (False on padding and at position 0). ``answers`` marks the tokens the context
    determines: the digits of each sum, the repeated half of a copy, the recalled value.

    Text segments come from :func:`corpus_text`, so rows depend on the Python version as well as ``seed``.
    """
    num_sequences = _positive_int("num_sequences", num_sequences)
    length = _positive_int("length", length)
    if length < 2:
        raise ValueError(f"length {length} is too short: a row needs at least 2 tokens (input and target)")
    rng = random.Random(seed)
    tokens = torch.full((num_sequences, length), PAD_ID, dtype=torch.long)
    domains = torch.full((num_sequences, length), -1, dtype=torch.long)
    answers = torch.zeros((num_sequences, length), dtype=torch.bool)
    text_domain = DOMAINS.index("text")
    for row in range(num_sequences):
        row_tokens: list[int] = []
        row_domains: list[int] = []
        row_answers: list[int] = []
        while (left := length - len(row_tokens)) >= 2:
            domain = rng.randrange(len(DOMAINS))
            text, spans = _GENERATORS[domain](rng)
            segment = list(text.encode("utf-8"))
            if len(segment) + 1 > left:
                if left < _MIN_FILLER and row_tokens:
                    break
                domain = text_domain
                text, spans = _text(rng, max_bytes=left - 1)
                segment = list(text.encode("utf-8"))
            start = len(row_tokens)
            # generated segments are ASCII, so character offsets are byte offsets
            row_answers.extend(start + i for a, b in spans for i in range(a, b))
            row_tokens.extend([*segment, SEP_ID])
            row_domains.extend([domain] * (len(segment) + 1))
        n = len(row_tokens)
        tokens[row, :n] = torch.tensor(row_tokens, dtype=torch.long)
        domains[row, :n] = torch.tensor(row_domains, dtype=torch.long)
        if row_answers:
            answers[row, row_answers] = True
    loss_mask = tokens != PAD_ID
    loss_mask[:, 0] = False
    return TokenDataset(tokens, loss_mask, domains, answers)


# ---------------------------------------------------------------------------------- induction heads


def induction_heads(num_sequences: int, length: int, vocab_size: int = 16, seed: int = 0) -> TokenDataset:
    """The induction-heads task of Gu & Dao (2023, Mamba): recall the token that followed a trigger.

    Each row holds random ids from ``0 .. vocab_size - 2``; the trigger ``vocab_size - 1`` appears once
    at a random position ``p`` (``0 <= p <= length - 4``) followed by a random token ``x``, and again as
    the second-to-last token; the last token is ``x``. Only that last target counts (``loss_mask`` and
    ``answers`` have exactly one True per row, in the last column). The trigger appears exactly twice.

    Ids are small (``vocab_size`` 16 by default), so a model with a bigger vocabulary simply never sees
    the rest. Any ``length >= 4`` works, e.g. train at 256 and test at 4096 or 16384.
    """
    num_sequences = _positive_int("num_sequences", num_sequences)
    length = _positive_int("length", length)
    vocab_size = _positive_int("vocab_size", vocab_size)
    if vocab_size < 3:
        raise ValueError(
            f"vocab_size {vocab_size} is too small for induction heads: at least 3 (two ordinary "
            "tokens and the trigger)"
        )
    if length < 4:
        raise ValueError(
            f"length {length} is too short for an induction-heads sequence: at least 4 tokens "
            "(trigger, x, trigger, x)"
        )
    generator = torch.Generator().manual_seed(seed)
    trigger = vocab_size - 1
    tokens = torch.randint(0, trigger, (num_sequences, length), generator=generator)
    position = torch.randint(0, length - 3, (num_sequences,), generator=generator)
    answer = torch.randint(0, trigger, (num_sequences,), generator=generator)
    rows = torch.arange(num_sequences)
    tokens[rows, position] = trigger
    tokens[rows, position + 1] = answer
    tokens[:, -2] = trigger
    tokens[:, -1] = answer
    mask = torch.zeros((num_sequences, length), dtype=torch.bool)
    mask[:, -1] = True
    return TokenDataset(tokens, mask, None, mask.clone())


# -------------------------------------------------------------------------------------------- passkey

PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
_PASSKEY_QUESTION = "What is the pass key? The pass key is"


def _passkey_info(key: str) -> str:
    return f"The pass key is {key}. Remember it. {key} is the pass key."


def passkey(num_sequences: int, length: int, depth: float, seed: int = 0, digits: int = 5) -> TokenDataset:
    """Pass-key retrieval as in Landmark Attention (Mohtashami & Jaggi, 2023): a needle in filler text.

    Each row is exactly ``length`` byte tokens::

        <filler prefix>\\n
        The pass key is 12345. Remember it. 12345 is the pass key.\\n
        <filler suffix>\\n
        What is the pass key? The pass key is 12345

    The filler is :data:`PASSKEY_FILLER` repeated and cut at a character count, as in Landmark's code
    (prefix and suffix both start at the filler's beginning); the prefix takes ``round(depth * F)`` of
    the ``F`` filler characters, so ``depth = 0`` puts the key first and ``depth = 1`` right before the
    question. Landmark's opening task description is left out: it means nothing to a model trained from
    scratch, and it would cost 150 tokens of a short context.

    The key is a random ``digits``-digit number (no leading zero), different in each row. ``loss_mask``
    (and ``answers``) are True on the final ``digits`` tokens only: the answer.
    """
    num_sequences = _positive_int("num_sequences", num_sequences)
    length = _positive_int("length", length)
    digits = _positive_int("digits", digits)
    if not isinstance(depth, (int, float)) or isinstance(depth, bool) or not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be a number in [0, 1] (0: start, 1: end), got {depth!r}")
    fixed = len(_passkey_info("0" * digits)) + len(_PASSKEY_QUESTION) + 3 + 1 + digits  # 3 newlines, 1 space
    if length < fixed:
        raise ValueError(
            f"length {length} is too short for a passkey sequence with {digits}-digit keys: "
            f"at least {fixed} tokens"
        )
    filler_chars = length - fixed
    prefix_chars = round(depth * filler_chars)
    repeats = filler_chars // len(PASSKEY_FILLER) + 1
    filler = PASSKEY_FILLER * repeats
    prefix, suffix = filler[:prefix_chars], filler[: filler_chars - prefix_chars]
    rng = random.Random(seed)
    low, high = (0 if digits == 1 else 10 ** (digits - 1)), 10**digits - 1
    rows = []
    for _ in range(num_sequences):
        key = str(rng.randint(low, high))
        text = f"{prefix}\n{_passkey_info(key)}\n{suffix}\n{_PASSKEY_QUESTION} {key}"
        rows.append(list(text.encode("ascii")))
    tokens = torch.tensor(rows, dtype=torch.long)
    assert tokens.shape == (num_sequences, length)
    mask = torch.zeros((num_sequences, length), dtype=torch.bool)
    mask[:, -digits:] = True
    return TokenDataset(tokens, mask, None, mask.clone())


# --------------------------------------------------------------------------------- associative recall


def associative_recall(
    num_sequences: int, num_pairs: int, num_queries: int, vocab_size: int = 64, seed: int = 0
) -> TokenDataset:
    """Multi-query associative recall (MQAR; Arora et al., 2023, "Zoology").

    Each row is ``k1 v1 k2 v2 ... kn vn`` (``n = num_pairs``) then ``q1 a1 q2 a2 ... qm am``
    (``m = num_queries``): keys are distinct ids from ``[0, vocab_size // 2)``, values distinct ids from
    ``[vocab_size // 2, vocab_size)``, each query ``q`` is a different key of the row (asked in random
    order), and ``a`` is the value that followed it. Length ``2 * (num_pairs + num_queries)``.

    ``loss_mask`` (and ``answers``) are True exactly at the answers ``a``; the keys and values are random
    and their prediction does not count.
    """
    num_sequences = _positive_int("num_sequences", num_sequences)
    num_pairs = _positive_int("num_pairs", num_pairs)
    num_queries = _positive_int("num_queries", num_queries)
    vocab_size = _positive_int("vocab_size", vocab_size)
    if num_queries > num_pairs:
        raise ValueError(
            f"num_queries {num_queries} > num_pairs {num_pairs}: each key is queried at most once"
        )
    num_keys = vocab_size // 2
    if num_pairs > num_keys:
        raise ValueError(
            f"vocab_size {vocab_size} is too small for {num_pairs} pairs: keys and values each need "
            f"{num_pairs} distinct ids, so vocab_size >= {2 * num_pairs}"
        )
    generator = torch.Generator().manual_seed(seed)

    def distinct(count: int, out_of: int) -> torch.Tensor:  # [N, count], distinct in each row
        return torch.rand((num_sequences, out_of), generator=generator).argsort(dim=1)[:, :count]

    keys = distinct(num_pairs, num_keys)
    values = num_keys + distinct(num_pairs, vocab_size - num_keys)
    asked = distinct(num_queries, num_pairs)  # which pairs are queried, in query order
    length = 2 * (num_pairs + num_queries)
    tokens = torch.empty((num_sequences, length), dtype=torch.long)
    tokens[:, 0 : 2 * num_pairs : 2] = keys
    tokens[:, 1 : 2 * num_pairs : 2] = values
    tokens[:, 2 * num_pairs :: 2] = keys.gather(1, asked)
    tokens[:, 2 * num_pairs + 1 :: 2] = values.gather(1, asked)
    mask = torch.zeros((num_sequences, length), dtype=torch.bool)
    mask[:, 2 * num_pairs + 1 :: 2] = True
    return TokenDataset(tokens, mask, None, mask.clone())


# -------------------------------------------------------------------------------------------- batches


class BatchSampler:
    """An endless, resumable stream of random batches of rows.

    Rows are drawn epoch by epoch: each epoch is a random permutation of all rows (from a
    ``torch.Generator`` seeded with ``seed``), so every row is seen once per epoch, and a batch that
    crosses the end of an epoch continues into the next one (every batch has ``batch_size`` rows).

    :meth:`state` is a JSON-serialisable dict (the generator's state at the start of the current epoch,
    as a list of ints, and the position within the epoch); :meth:`load_state` puts a sampler built on the
    same dataset back there, so the batches that follow are exactly those an uninterrupted run would
    have drawn. Save it with the model's checkpoint.

    ::

        sampler = BatchSampler(dataset, batch_size=32, seed=0)
        batch = sampler.next()  # or next(sampler), or: for batch in sampler
        checkpoint["sampler"] = sampler.state()  # ... later: sampler.load_state(checkpoint["sampler"])
    """

    def __init__(self, dataset: TokenDataset, batch_size: int, seed: int = 0) -> None:
        self.batch_size = _positive_int("batch_size", batch_size)
        if len(dataset) == 0:
            raise ValueError("cannot sample batches from an empty dataset")
        self.dataset = dataset
        self.seed = seed
        self._generator = torch.Generator().manual_seed(seed)
        self._epoch = -1
        self._start_epoch()

    def _start_epoch(self) -> None:
        self._epoch_start_state = self._generator.get_state()
        self._order = torch.randperm(len(self.dataset), generator=self._generator)
        self._position = 0
        self._epoch += 1

    @property
    def epoch(self) -> int:
        """How many full passes over the rows have been completed before the current one."""
        return self._epoch

    def next(self) -> TokenDataset:
        """The next batch: a :class:`TokenDataset` of ``batch_size`` rows."""
        pieces: list[torch.Tensor] = []
        needed = self.batch_size
        while needed:
            if self._position == len(self._order):
                self._start_epoch()
            take = min(needed, len(self._order) - self._position)
            pieces.append(self._order[self._position : self._position + take])
            self._position += take
            needed -= take
        return self.dataset[torch.cat(pieces)]

    __next__ = next

    def __iter__(self) -> BatchSampler:
        return self

    def state(self) -> dict[str, Any]:
        """Where the stream is, as a JSON-serialisable dict."""
        return {
            "seed": self.seed,
            "batch_size": self.batch_size,
            "num_rows": len(self.dataset),
            "epoch": self._epoch,
            "position": self._position,
            "generator": self._epoch_start_state.tolist(),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        """Resume from a :meth:`state` taken from a sampler over the same dataset and batch size."""
        for field in ("num_rows", "batch_size"):
            mine = len(self.dataset) if field == "num_rows" else self.batch_size
            if state[field] != mine:
                raise ValueError(
                    f"cannot resume: the saved sampler had {field} = {state[field]}, this one has {mine}"
                )
        generator = torch.Generator()
        generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))
        self._generator = generator
        self._epoch = state["epoch"] - 1
        self._start_epoch()  # redraws the saved epoch's permutation from the saved generator state
        self._position = state["position"]
        self.seed = state["seed"]


def batches(dataset: TokenDataset, batch_size: int, seed: int) -> BatchSampler:
    """An endless deterministic stream of random batches of ``dataset``: a :class:`BatchSampler`."""
    return BatchSampler(dataset, batch_size, seed)
