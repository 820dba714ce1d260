"""Lab 4, the routing experiment: measure how a trained router spreads tokens over experts (the
same-expert rate of consecutive tokens, the load's entropy and MaxVio) on a tiny 8-expert Llama 4 that
:func:`train_tiny_moe` trains in well under a minute (``notebooks/labs/lab4_routing_experiment.ipynb``).

Steps: 4.1 ``same_expert_rate``, 4.2 ``load_stats``; references in ``l4lab.routing``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from l4lab import routing
from l4lab.config import preset
from l4lab.data import TokenDataset, mixture
from l4lab.labs.core import Case, Hints, Mistake, Step, compare_float, compare_floats, generator, register_lab
from l4lab.model import RoutingRecord


# ====================================================================== same expert as the previous token
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


def _cases_same_expert_rate() -> list[Case]:
    g = generator(401)
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
    return [Case(label, (e,), _ref_same_expert_rate(e)) for label, e in specs]


_RATE_MISTAKES = (
    Mistake(
        "across sequences",
        lambda e: float((e.reshape(-1)[1:] == e.reshape(-1)[:-1]).float().mean()),
        "pairs never cross from one sequence to the next: compare experts[:, 1:] with experts[:, :-1] "
        "(the last token of row b and the first of row b + 1 are not neighbours).",
    ),
    Mistake(
        "divided by T",
        lambda e: float((e[:, 1:] == e[:, :-1]).float().sum() / e.numel()),
        "a sequence of T tokens has T - 1 consecutive pairs: divide by B * (T - 1), not B * T.",
    ),
    Mistake(
        "different instead of same",
        lambda e: float((e[:, 1:] != e[:, :-1]).float().mean()),
        "count the pairs with the SAME expert (==), not different ones.",
    ),
)


def _ref_load_stats(experts: Tensor, num_experts: int) -> tuple[float, float]:
    load = routing.expert_load(_record(experts, num_experts), num_experts)
    return routing.load_entropy(load), routing.max_violation(load)


def _cases_load_stats() -> list[Case]:
    g = generator(402)
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
    return [Case(label, (e, n), _ref_load_stats(e, n)) for label, e, n in specs]


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
    Mistake(
        "log2",
        lambda e, n: (_entropy(_load(e, n), torch.log2), _maxvio(_load(e, n))),
        "entropy in nats: use the natural logarithm (torch.log), not log2 (bits).",
    ),
    Mistake(
        "normalised entropy",
        lambda e, n: (_entropy(_load(e, n)) / math.log(n) if n > 1 else 1.0, _maxvio(_load(e, n))),
        "return the entropy itself, -sum p ln p (ln E at perfect balance), not divided by ln E.",
    ),
    Mistake(
        "max / mean",
        lambda e, n: (_entropy(_load(e, n)), float(_load(e, n).max() / _load(e, n).mean())),
        "MaxVio is (max load - mean load) / mean load: subtract the mean, so that perfect balance gives 0.",
    ),
    Mistake(
        "(max - min) / mean",
        lambda e, n: (
            _entropy(_load(e, n)),
            float((_load(e, n).max() - _load(e, n).min()) / _load(e, n).mean()),
        ),
        "MaxVio compares the busiest expert with the MEAN load: (max - mean) / mean, not (max - min) / mean.",
    ),
    Mistake(
        "experts with no tokens dropped",
        lambda e, n: (_entropy(_load(e, n, minlength=False)), _maxvio(_load(e, n, minlength=False))),
        "experts that got no token still count (load 0): torch.bincount(ids, minlength=num_experts), so "
        "that the mean load is 1 / num_experts.",
    ),
    Mistake(
        "first choice only",
        lambda e, n: (_entropy(_load(e, n, first_only=True)), _maxvio(_load(e, n, first_only=True))),
        "count every slot: with top-k routing each token fills k slots (experts[..., j] for every j).",
    ),
)


def _has_nan(got: Any) -> bool:
    return isinstance(got, (tuple, list)) and any(math.isnan(float(v)) for v in got)


# ====================================================================== the steps
STEPS: tuple[Step, ...] = (
    Step(
        "4.1",
        "same_expert_rate",
        ("experts",),
        "how often two consecutive tokens share their first-choice expert",
        _cases_same_expert_rate,
        lambda e, g: compare_float(e, g, "rate"),
        _RATE_MISTAKES,
        "count the neighbouring pairs of tokens, inside each sequence, that went to the same expert.",
        hints=Hints(
            "Look at each pair of neighbouring tokens within a sequence (never across two sequences) and "
            "ask whether the router sent both to the same expert; the rate is the share of such pairs.",
            "rate = (number of (b, t) with experts[b, t] == experts[b, t + 1]) / (B * (T - 1)); "
            "experts[:, 1:] and experts[:, :-1] line the pairs up.",
            "l4lab/routing.py, same_expert_rate.",
        ),
    ),
    Step(
        "4.2",
        "load_stats",
        ("experts", "num_experts"),
        "the load's entropy (nats) and MaxVio, from every routed slot",
        _cases_load_stats,
        compare_floats(("entropy", "max_violation")),
        _LOAD_MISTAKES,
        "first the load (each expert's share of the routed slots), then two numbers that summarise it.",
        hints=Hints(
            "The load is the share of all routed slots each expert received (every expert counts, also "
            "one that got nothing). Entropy is high when the shares are even; MaxVio says how much busier "
            "the busiest expert is than the average, relative to the average.",
            "load_i = slots of expert i / all slots (torch.bincount with minlength); entropy = "
            "-sum_i load_i ln load_i, with 0 ln 0 = 0; MaxVio = (max_i load_i - mean load) / mean load.",
            "l4lab/routing.py, expert_load, load_entropy and max_violation.",
        ),
        output_hints=(
            (
                _has_nan,
                "0 * ln 0 counts as 0: an expert without tokens must not make the entropy NaN "
                "(torch.special.xlogy(p, p), or keep only p > 0).",
            ),
        ),
    ),
)

register_lab("4", "routing_experiment", STEPS)


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
