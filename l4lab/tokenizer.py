"""Tokenizers: text in, token ids out, and back.

A language model never sees text, only integers. A tokenizer is the fixed, agreed-upon mapping between
the two, and a model is only meaningful together with the tokenizer it was trained with: id 1234 means
nothing on its own.

Two tokenizers live here, with one interface (``encode``, ``decode``, ``__call__``, ``vocab_size``,
``bos_token_id``, ``eos_token_id``, ``pad_token_id``, ``special_tokens``):

* :class:`ByteTokenizer`, for the tiny models trained from scratch in this project. Its vocabulary is
  the 256 possible byte values plus four special tokens, and it needs no files at all.
* :class:`HFTokenizer`, a thin wrapper around a Hugging Face ``tokenizer.json`` (the format the
  published Llama 4 checkpoints ship), loaded with the ``tokenizers`` package.

:func:`load_tokenizer` picks one: ``load_tokenizer("bytes")`` or ``load_tokenizer("path/to/checkpoint")``.

Neither tokenizer adds special tokens behind your back: ``<|begin_of_text|>`` (or ``<s>``) and the
end-of-text token appear only where you ask for them with ``bos=True`` / ``eos=True``, or where you
write them in the text.
"""

from __future__ import annotations

import json
import operator
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    import tokenizers

__all__ = ["ByteTokenizer", "HFTokenizer", "load_tokenizer"]

TokenIds = Iterable[int] | torch.Tensor


def _as_id_list(ids: TokenIds, vocab_size: int) -> list[int]:
    """Turn a list of ints or a 1-D integer tensor into a list of ints, checking every id's range."""
    if isinstance(ids, torch.Tensor):
        if ids.dim() != 1:
            raise ValueError(
                f"decode takes a 1-D tensor of token ids, got shape {tuple(ids.shape)}; "
                "for a batch [B, T], decode each row: [tok.decode(row) for row in ids]"
            )
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise TypeError(f"token ids must be integers, got a tensor of dtype {ids.dtype}")
        ids = ids.tolist()
    elif isinstance(ids, (str, bytes)):
        raise TypeError(f"decode takes token ids (a list of ints or a 1-D tensor), got {type(ids).__name__}")
    out: list[int] = []
    for position, item in enumerate(ids):
        # operator.index accepts ints, numpy integers and 0-d integer tensors, and rejects floats
        try:
            if isinstance(item, bool):
                raise TypeError
            token = operator.index(item)
        except TypeError:
            raise TypeError(f"token id at position {position} is {item!r}, not an int") from None
        if not 0 <= token < vocab_size:
            raise ValueError(
                f"token id {token} at position {position} is out of range: ids must be in [0, {vocab_size})"
            )
        out.append(token)
    return out


def _check_text(text: Any) -> str:
    if not isinstance(text, str):
        raise TypeError(f"encode takes a str, got {type(text).__name__}")
    return text


class ByteTokenizer:
    """A byte-level tokenizer: every UTF-8 byte is a token, plus four special tokens.

    ========  ========================
    ids       meaning
    ========  ========================
    0 - 255   the UTF-8 bytes of the text
    256       ``<|begin_of_text|>`` (bos)
    257       ``<|end_of_text|>`` (eos)
    258       ``<|pad|>``
    259       ``<|sep|>``
    ========  ========================

    ``vocab_size`` is 260, matching ``l4lab.preset("tiny")`` (bos 256, eos 257).

    Why bytes? Any string, in any language, with emoji or typos, is a sequence of UTF-8 bytes, so there
    is no such thing as an out-of-vocabulary word and nothing to train or download. The embedding table
    and the output layer have 260 rows instead of Llama 4's 202,048, which keeps a tiny model tiny.

    The cost is sequence length: ``"hello"`` is 5 tokens instead of 1, and ``"日本語"`` is 9 (three bytes
    per character). Attention's cost grows with the square of the length, and the model has to learn
    spelling before it can learn words. Subword tokenizers (BPE, as in Llama 4) trade a big vocabulary
    for short sequences; bytes make the opposite trade, which is the right one for small experiments.

    >>> tok = ByteTokenizer()
    >>> tok.encode("hi", bos=True)
    [256, 104, 105]
    >>> tok.decode([256, 104, 105])
    '<|begin_of_text|>hi'
    >>> tok.decode([256, 104, 105], skip_special_tokens=True)
    'hi'
    """

    num_byte_tokens: int = 256

    def __init__(self) -> None:
        names = ("<|begin_of_text|>", "<|end_of_text|>", "<|pad|>", "<|sep|>")
        self.special_tokens: dict[str, int] = {name: 256 + i for i, name in enumerate(names)}
        self._special_names: dict[int, str] = {i: name for name, i in self.special_tokens.items()}
        self.bos_token_id: int = self.special_tokens["<|begin_of_text|>"]
        self.eos_token_id: int = self.special_tokens["<|end_of_text|>"]
        self.pad_token_id: int = self.special_tokens["<|pad|>"]
        self.sep_token_id: int = self.special_tokens["<|sep|>"]
        self.vocab_size: int = self.num_byte_tokens + len(self.special_tokens)
        # longest first, so that a special token that is a prefix of another cannot steal its match
        alternatives = sorted(self.special_tokens, key=len, reverse=True)
        self._special_pattern = re.compile("(" + "|".join(re.escape(s) for s in alternatives) + ")")

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of ``text``: its UTF-8 bytes, with special-token strings as their single ids.

        ``"<|sep|>"`` written in the text becomes the one id 259, not its 7 bytes. ``bos`` / ``eos``
        put ``<|begin_of_text|>`` / ``<|end_of_text|>`` at the start / end.
        """
        text = _check_text(text)
        ids: list[int] = [self.bos_token_id] if bos else []
        # re.split with a capturing group alternates: plain text, special, plain text, special, ...
        for i, piece in enumerate(self._special_pattern.split(text)):
            if i % 2:
                ids.append(self.special_tokens[piece])
            else:
                ids.extend(piece.encode("utf-8"))
        if eos:
            ids.append(self.eos_token_id)
        return ids

    def decode(self, ids: TokenIds, skip_special_tokens: bool = False) -> str:
        """Text of ``ids`` (a list of ints or a 1-D tensor).

        Runs of byte ids are decoded as UTF-8 together, so a character split over several tokens comes
        back whole. A model can emit byte sequences that are not valid UTF-8 (a lone ``0xff``, half of a
        character); those become the replacement character ``"\\ufffd"`` rather than an error. Special
        ids are written as their strings, or left out with ``skip_special_tokens=True``.
        """
        pieces: list[str] = []
        run = bytearray()
        for token in _as_id_list(ids, self.vocab_size):
            if token < self.num_byte_tokens:
                run.append(token)
                continue
            if run:
                pieces.append(run.decode("utf-8", errors="replace"))
                run.clear()
            if not skip_special_tokens:
                pieces.append(self._special_names[token])
        if run:
            pieces.append(run.decode("utf-8", errors="replace"))
        return "".join(pieces)

    def __call__(self, text: str, bos: bool = False, eos: bool = False) -> torch.Tensor:
        """``encode`` as a batch of one: a ``torch.long`` tensor of shape ``[1, T]``, ready for the model."""
        return torch.tensor([self.encode(text, bos=bos, eos=eos)], dtype=torch.long)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={self.vocab_size})"


class HFTokenizer:
    """A Hugging Face ``tokenizers.Tokenizer`` behind the same interface as :class:`ByteTokenizer`.

    Build one with :func:`load_tokenizer` (or :meth:`from_directory`) from a checkpoint directory that
    holds ``tokenizer.json``. ``bos_token_id`` / ``eos_token_id`` / ``pad_token_id`` come from the
    ``bos_token`` / ``eos_token`` / ``pad_token`` strings of ``tokenizer_config.json`` (or
    ``special_tokens_map.json``), looked up in the vocabulary; they are ``None`` when not configured.

    Unlike transformers' tokenizers, :meth:`encode` never adds special tokens on its own (a
    ``tokenizer.json`` may carry a post-processor that prepends bos); pass ``bos=True`` / ``eos=True``.
    """

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        name_or_path: str | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.name_or_path = name_or_path
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)
        self.bos_token: str | None = bos_token
        self.eos_token: str | None = eos_token
        self.pad_token: str | None = pad_token
        self.bos_token_id: int | None = self._token_id(bos_token, "bos_token")
        self.eos_token_id: int | None = self._token_id(eos_token, "eos_token")
        self.pad_token_id: int | None = self._token_id(pad_token, "pad_token")
        self.special_tokens: dict[str, int] = {
            added.content: token_id
            for token_id, added in sorted(tokenizer.get_added_tokens_decoder().items())
            if added.special
        }

    def _token_id(self, token: str | None, field: str) -> int | None:
        if token is None:
            return None
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            where = f" in {self.name_or_path}" if self.name_or_path else ""
            raise ValueError(f"{field} {token!r}{where} is not in the tokenizer's vocabulary")
        return token_id

    @classmethod
    def from_directory(cls, path: str | os.PathLike[str]) -> HFTokenizer:
        """Load ``tokenizer.json`` (and the special-token names) from a local directory."""
        try:
            from tokenizers import Tokenizer
        except ImportError as error:
            raise ImportError(
                "loading a Hugging Face tokenizer needs the `tokenizers` package: pip install tokenizers"
            ) from error

        path = Path(path)
        if path.is_file():
            if path.suffix != ".json":
                raise FileNotFoundError(
                    f"{str(path)!r} is a file, not a tokenizer directory: expected a directory holding "
                    "tokenizer.json, or tokenizer.json itself (sentencepiece tokenizer.model files are "
                    "not supported)"
                )
            directory, tokenizer_file = path.parent, path
        else:
            directory, tokenizer_file = path, path / "tokenizer.json"
        if not directory.is_dir():
            raise FileNotFoundError(
                f"tokenizer directory {str(path)!r} does not exist; expected a local directory holding "
                "tokenizer.json (or the name 'bytes' for the byte-level tokenizer)"
            )
        if not tokenizer_file.is_file():
            hint = ""
            if (directory / "tokenizer.model").is_file():
                hint = " It holds a sentencepiece tokenizer.model, which is not supported: convert it first."
            raise FileNotFoundError(
                f"no tokenizer.json in {str(directory)!r}: expected a Hugging Face tokenizers file "
                f"(tokenizer.json; sentencepiece tokenizer.model files are not supported).{hint}"
            )

        specials = _special_token_names(directory)
        return cls(
            Tokenizer.from_file(str(tokenizer_file)),
            bos_token=specials.get("bos_token"),
            eos_token=specials.get("eos_token"),
            pad_token=specials.get("pad_token"),
            name_or_path=str(directory),
        )

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of ``text``, with no special tokens added except those asked for by ``bos``/``eos``.

        Special-token strings written in the text (``"<s>"``) still become their single ids, as the
        ``tokenizers`` library matches added tokens before splitting the rest.
        """
        text = _check_text(text)
        ids: list[int] = []
        if bos:
            ids.append(self._required(self.bos_token_id, "bos"))
        ids.extend(self.tokenizer.encode(text, add_special_tokens=False).ids)
        if eos:
            ids.append(self._required(self.eos_token_id, "eos"))
        return ids

    def _required(self, token_id: int | None, name: str) -> int:
        if token_id is None:
            raise ValueError(
                f"{name}=True, but this tokenizer has no {name}_token: set {name}_token in "
                f"tokenizer_config.json (directory: {self.name_or_path})"
            )
        return token_id

    def decode(self, ids: TokenIds, skip_special_tokens: bool = False) -> str:
        """Text of ``ids`` (a list of ints or a 1-D tensor); special tokens kept unless asked otherwise."""
        # the tokenizers library silently drops unknown ids, so they are checked here
        return self.tokenizer.decode(
            _as_id_list(ids, self.vocab_size), skip_special_tokens=skip_special_tokens
        )

    def __call__(self, text: str, bos: bool = False, eos: bool = False) -> torch.Tensor:
        """``encode`` as a batch of one: a ``torch.long`` tensor of shape ``[1, T]``, ready for the model."""
        return torch.tensor([self.encode(text, bos=bos, eos=eos)], dtype=torch.long)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (
            f"HFTokenizer({self.name_or_path!r}, vocab_size={self.vocab_size}, "
            f"bos_token_id={self.bos_token_id}, eos_token_id={self.eos_token_id})"
        )


def _special_token_names(directory: Path) -> dict[str, str]:
    """The ``bos_token``/``eos_token``/``pad_token`` strings of a checkpoint directory.

    tokenizer_config.json wins over special_tokens_map.json. Either file may write a token as a plain
    string or as a dict with its ``"content"``.
    """
    names: dict[str, str] = {}
    for filename in ("tokenizer_config.json", "special_tokens_map.json"):
        file = directory / filename
        if not file.is_file():
            continue
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
        for field in ("bos_token", "eos_token", "pad_token"):
            value = data.get(field)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str) and field not in names:
                names[field] = value
    return names


def load_tokenizer(path: str | os.PathLike[str]) -> HFTokenizer | ByteTokenizer:
    """The tokenizer at ``path``: a local Hugging Face checkpoint directory with ``tokenizer.json``.

    The name ``"bytes"`` gives a :class:`ByteTokenizer` instead (for the ``"tiny"`` preset). To load a
    directory that happens to be called ``bytes``, pass ``"./bytes"`` or a ``Path``. Only local files are
    read; nothing is downloaded.
    """
    if isinstance(path, str) and path == "bytes":
        return ByteTokenizer()
    return HFTokenizer.from_directory(path)
