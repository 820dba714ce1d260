"""The KV cache: what each layer keeps of past keys and values so that decoding one token is cheap.

Global layers (NoPE layers under iRoPE, every layer under RoPE) keep every past key: memory grows with
the context. Chunked layers keep only the keys of the CURRENT chunk, because no later query can see
an earlier chunk: their memory is bounded by the chunk size (at most C - 1 keys between steps), which is
what makes Llama 4's 10M-token context affordable on three layers out of four.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from l4lab.config import LayerSpec

if TYPE_CHECKING:
    from l4lab.model import Llama4


class LayerCache:
    """Past keys and values [B, Hkv, S, D] of one layer, starting at absolute position ``start``."""

    def __init__(self, chunk_size: int | None, window: int | None = None) -> None:
        self.chunk_size = chunk_size
        self.window = window
        self.keys: Tensor | None = None
        self.values: Tensor | None = None
        self.start = 0

    def update(self, keys: Tensor, values: Tensor, position: int) -> tuple[Tensor, Tensor, int]:
        """Append the new keys/values (at absolute ``position``); return all visible ones and their start.

        Afterwards, keep only what a later query can still see: everything on a global layer, the keys from
        the start of the current chunk on a chunked layer (none when the new tokens end exactly on a
        chunk boundary), the last ``window - 1`` keys on a sliding-window layer.
        """
        if self.keys is None:
            all_keys, all_values, start = keys, values, position
        else:
            all_keys = torch.cat([self.keys, keys], dim=2)
            all_values = torch.cat([self.values, values], dim=2)
            start = self.start
        end = position + keys.shape[2]
        if self.chunk_size is None and self.window is None:
            self.keys, self.values, self.start = all_keys, all_values, start
        else:
            if self.chunk_size is not None:
                keep_from = max(start, end // self.chunk_size * self.chunk_size)
            else:
                keep_from = max(start, end - (self.window - 1))
            # clone: a view would keep the whole concatenation alive
            self.keys = all_keys[:, :, keep_from - start :].clone()
            self.values = all_values[:, :, keep_from - start :].clone()
            self.start = keep_from
        return all_keys, all_values, start

    @property
    def length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def nbytes(self) -> int:
        if self.keys is None or self.values is None:
            return 0
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()


class KVCache:
    """One :class:`LayerCache` per layer, and the absolute position of the next token."""

    def __init__(self, plan: list[LayerSpec]) -> None:
        self.layers = [LayerCache(spec.chunk_size, spec.window) for spec in plan]
        self.position = 0

    def lengths(self) -> list[int]:
        """How many keys each layer holds now."""
        return [layer.length for layer in self.layers]

    def nbytes(self) -> int:
        """Bytes held by all layers' keys and values."""
        return sum(layer.nbytes() for layer in self.layers)


@torch.no_grad()
def time_per_token(
    model: Llama4, tokens: Tensor, lengths: list[int], repeats: int = 5
) -> dict[str, list[float]]:
    """Seconds to produce the next token's logits at each context length, with and without a KV cache.

    For each length ``n`` in ``lengths``: *uncached* is one forward pass over ``tokens[:, :n + 1]`` (what
    a decoder without a cache runs at every step); *cached* is one forward pass of the single token
    ``tokens[:, n]`` after a cache holding the first ``n`` tokens (what ``model.generate`` runs). Both
    give the same last-position logits. Each time is the fastest of ``repeats`` runs, the least disturbed
    by other work on the machine. ``tokens`` [1, T] needs ``T > max(lengths)``.
    """
    if tokens.dim() != 2 or tokens.shape[0] != 1:
        raise ValueError(f"tokens must be one row [1, T], got shape {tuple(tokens.shape)}")
    if not lengths or min(lengths) < 1 or max(lengths) >= tokens.shape[1]:
        raise ValueError(
            f"lengths must lie in 1..{tokens.shape[1] - 1} (tokens has {tokens.shape[1]}), got {lengths}"
        )
    was_training = model.training
    model.eval()
    times: dict[str, list[float]] = {"cached": [], "uncached": []}
    for n in lengths:
        best_cached = best_uncached = float("inf")
        for _ in range(repeats):
            cache = model.new_cache()
            model(tokens[:, :n], cache=cache)  # the prompt: not timed
            started = time.perf_counter()
            model(tokens[:, n : n + 1], cache=cache)
            best_cached = min(best_cached, time.perf_counter() - started)
            started = time.perf_counter()
            model(tokens[:, : n + 1])
            best_uncached = min(best_uncached, time.perf_counter() - started)
        times["cached"].append(best_cached)
        times["uncached"].append(best_uncached)
    model.train(was_training)
    return times
