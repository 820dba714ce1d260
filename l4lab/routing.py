"""How the routers of a mixture-of-experts model spread tokens over experts, and how to keep them balanced.

Every MoE layer of ``Llama4`` returns a :class:`~l4lab.model.RoutingRecord`: the chosen experts
[B, T, k], their sigmoid scores [B, T, k] and the raw router logits [B, T, E]. This module turns records
into numbers:

* balancing losses a trainer adds to the language-model loss: :func:`switch_loss` (Switch Transformer)
  and :func:`router_z_loss` (ST-MoE), both differentiable;
* the auxiliary-loss-free alternative of DeepSeek-V3: :func:`update_selection_bias`;
* statistics to look at: :func:`expert_load`, :func:`load_entropy`, :func:`max_violation`,
  :func:`same_expert_rate`, :func:`domain_expert_counts`, gathered per layer by :func:`routing_stats`.

Vocabulary. A *slot* is one (token, choice) pair: with top-k routing each token fills k slots. The
*load* of expert i is the fraction of slots routed to it; a perfectly balanced layer has load 1/E for
every expert. The *first-choice* expert of a token is ``experts[..., 0]`` (``topk`` sorts by logit,
so it is the expert with the highest score; with Llama 4's k = 1 it is the only one).

Llama 4 publishes no training losses (its config carries ``router_aux_loss_coef`` 0.001, unused at
inference), so these are the standard recipes of the MoE literature, here to train and compare tiny models.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from l4lab.model import RoutingRecord

Records = RoutingRecord | Sequence[RoutingRecord]


def _as_list(records: Records) -> list[RoutingRecord]:
    if isinstance(records, RoutingRecord):
        return [records]
    records = list(records)
    if not records:
        raise ValueError("no routing records: the model has no MoE layer (ffn='dense'?)")
    return records


def mean_over_layers(fn: Callable[[RoutingRecord], Tensor], records: Records) -> Tensor:
    """``mean_l fn(records[l])``: one loss for the whole model from a per-layer loss.

    ``records`` may be a single record (then this is just ``fn(record)``) or the list
    ``Llama4Output.routing``. Gradients flow through every layer's term.
    """
    terms = [fn(record) for record in _as_list(records)]
    return torch.stack(terms).mean()


# ---------------------------------------------------------------------- balancing losses
def _switch_loss_one(record: RoutingRecord) -> Tensor:
    logits = record.router_logits
    num_experts = logits.shape[-1]
    with torch.no_grad():
        fraction = expert_load(record, num_experts).to(logits.device)  # f_i, no gradient
    probability = torch.softmax(logits.float(), dim=-1).reshape(-1, num_experts).mean(0)  # P_i
    return num_experts * (fraction * probability).sum()


def switch_loss(records: Records) -> Tensor:
    """The Switch Transformer load-balancing loss, ``E * sum_i f_i * P_i`` (Fedus et al. 2021, eq. 4).

    * ``f_i``: the fraction of slots routed to expert i, counted from ``record.experts``. Counting is
      not differentiable, so ``f_i`` is a constant.
    * ``P_i``: the mean over tokens of ``softmax(router_logits)_i``, the router's average probability
      for expert i. The gradient flows through ``P_i`` only: it lowers the probability of the experts
      that receive many tokens (large ``f_i``) and raises it for those that receive few.

    At perfect balance (``f_i = 1/E`` for every i) the loss is ``E * sum_i P_i / E = 1`` whatever the
    router's probabilities; when every token goes to one expert j it is ``E * P_j``, up to E. The
    coefficient (alpha, 1e-2 in the paper) is left to the trainer: ``loss = lm_loss + alpha * switch``.

    Llama 4's router scores tokens with a sigmoid, not a softmax; the softmax here is only the loss's
    differentiable stand-in for "how much the router prefers expert i", as in the paper.

    A list of records (one per MoE layer, as in ``Llama4Output.routing``) gives the mean over layers.
    """
    return mean_over_layers(_switch_loss_one, records)


def _router_z_loss_one(record: RoutingRecord) -> Tensor:
    return torch.logsumexp(record.router_logits.float(), dim=-1).pow(2).mean()


def router_z_loss(records: Records) -> Tensor:
    """The router z-loss of ST-MoE (Zoph et al. 2022): ``mean over tokens of logsumexp(router_logits)^2``.

    It pulls the router's logits towards zero, which keeps them in a range where the exponentials and
    rounding of low-precision arithmetic stay harmless; it does not balance anything by itself.
    The paper's coefficient is 1e-3. A list of records gives the mean over layers.
    """
    return mean_over_layers(_router_z_loss_one, records)


# ---------------------------------------------------------------------- load statistics
def expert_load(record: RoutingRecord, num_experts: int | None = None) -> Tensor:
    """The fraction of slots routed to each expert, float32 [E], summing to 1.

    ``num_experts`` defaults to the width of ``record.router_logits``; experts that receive no token
    get 0. Perfect balance is ``1/E`` everywhere.
    """
    if num_experts is None:
        num_experts = record.router_logits.shape[-1]
    counts = torch.bincount(record.experts.reshape(-1).long(), minlength=num_experts)
    if counts.numel() > num_experts:
        raise ValueError(f"expert ids reach {counts.numel() - 1} but num_experts is {num_experts}")
    return counts.float() / counts.sum().clamp_min(1)


def load_entropy(load: Tensor, normalised: bool = False) -> float:
    """The entropy of the load, ``H = -sum_i load_i * ln(load_i)`` in nats (``0 * ln 0 = 0``).

    ``H = ln E`` at perfect balance and 0 when one expert takes every slot. With ``normalised=True`` it
    is ``H / ln E``, between 0 and 1 whatever the number of experts (1.0 when E = 1: one expert is
    trivially balanced). ``load`` may hold counts: it is divided by its sum first.
    """
    p = load.double() / load.double().sum()
    entropy = float(-torch.special.xlogy(p, p).sum())  # xlogy(0, 0) = 0
    if not normalised:
        return entropy
    num_experts = p.numel()
    return 1.0 if num_experts == 1 else entropy / math.log(num_experts)


def max_violation(load: Tensor) -> float:
    """MaxVio, as DeepSeek measures imbalance: ``(max_i load_i - mean load) / mean load``.

    0 at perfect balance; ``E - 1`` when one expert takes every slot. 0.5 means the busiest expert does
    half as much work again as an average one: in expert parallelism the whole layer waits for it.
    Scale-free: counts and fractions give the same value.
    """
    load = load.double()
    mean = load.mean()
    return float((load.max() - mean) / mean)


def same_expert_rate(record: RoutingRecord) -> tuple[float, float]:
    """How often two consecutive tokens share their first-choice expert, and the rate chance gives.

    ``rate``: over all pairs (t, t + 1) inside a sequence (never across the batch), the fraction with
    ``experts[b, t, 0] == experts[b, t + 1, 0]``.

    ``chance``: the rate if each token drew its expert independently from the layer's first-choice load
    p: ``sum_i p_i^2``, which is ``1/E`` at perfect balance (12.5% for Mixtral's 8 experts) and larger
    when the load is uneven. Mixtral (Jiang et al. 2024, section 5) finds 25-28% at its middle layers:
    routing follows local structure (syntax, repeated words), not independent draws.
    """
    first = record.experts[..., 0]  # [B, T]
    if first.shape[-1] < 2:
        raise ValueError("same_expert_rate needs sequences of at least 2 tokens")
    rate = float((first[:, 1:] == first[:, :-1]).float().mean())
    counts = torch.bincount(first.reshape(-1).long(), minlength=record.router_logits.shape[-1]).double()
    p = counts / counts.sum()
    return rate, float((p * p).sum())


def domain_expert_counts(record: RoutingRecord, domains: Tensor, num_domains: int) -> Tensor:
    """How many tokens of each domain chose each expert first: int64 [num_domains, E].

    ``domains`` [B, T] gives each token's domain id (a language, a topic, a part of speech...); ids
    below 0 mark tokens to leave out (padding). Row-normalised, a row is P(expert | domain): equal rows
    mean the router ignores the domain (Mixtral finds little topic specialisation).
    """
    first = record.experts[..., 0].reshape(-1).long()
    domains = domains.reshape(-1).long().to(first.device)
    if domains.numel() != first.numel():
        raise ValueError(f"domains has {domains.numel()} entries but the record has {first.numel()} tokens")
    if domains.numel() and int(domains.max()) >= num_domains:
        raise ValueError(f"domain id {int(domains.max())} is not below num_domains ({num_domains})")
    num_experts = record.router_logits.shape[-1]
    keep = domains >= 0
    cells = domains[keep] * num_experts + first[keep]
    return torch.bincount(cells, minlength=num_domains * num_experts).view(num_domains, num_experts)


# ---------------------------------------------------------------------- per-layer summary
@dataclass
class RoutingStats:
    """The routing of one MoE layer in numbers (see the functions of the same names).

    ``load`` [E] fractions of slots; ``entropy`` in nats and ``normalised_entropy`` (= entropy / ln E);
    ``max_violation`` (MaxVio); ``switch_loss`` (1.0 at balance); ``z_loss``; ``same_expert_rate`` and
    ``chance_rate``; ``domain_counts`` [num_domains, E] when domains were given.
    """

    layer: int
    load: Tensor
    entropy: float
    normalised_entropy: float
    max_violation: float
    switch_loss: float
    z_loss: float
    same_expert_rate: float
    chance_rate: float
    domain_counts: Tensor | None = None


@torch.no_grad()
def routing_stats(
    records: Records,
    num_experts: int | None = None,
    domains: Tensor | None = None,
    num_domains: int | None = None,
) -> list[RoutingStats]:
    """One :class:`RoutingStats` per record (per MoE layer), e.g. ``routing_stats(out.routing)``.

    ``num_experts`` defaults to the router's width. With ``domains`` [B, T], each layer also counts
    first-choice experts per domain (``num_domains`` defaults to ``domains.max() + 1``). Sequences of
    one token have no consecutive pairs: their same-expert rate is NaN.
    """
    if domains is not None and num_domains is None:
        num_domains = int(domains.max()) + 1
    stats = []
    for record in _as_list(records):
        load = expert_load(record, num_experts)
        if record.experts.shape[1] >= 2:
            rate, chance = same_expert_rate(record)
        else:
            rate, chance = math.nan, math.nan
        stats.append(
            RoutingStats(
                layer=record.layer,
                load=load.cpu(),
                entropy=load_entropy(load),
                normalised_entropy=load_entropy(load, normalised=True),
                max_violation=max_violation(load),
                switch_loss=float(switch_loss(record)),
                z_loss=float(router_z_loss(record)),
                same_expert_rate=rate,
                chance_rate=chance,
                domain_counts=(
                    None
                    if domains is None or num_domains is None
                    else domain_expert_counts(record, domains, num_domains).cpu()
                ),
            )
        )
    return stats


# ---------------------------------------------------------------------- auxiliary-loss-free balancing
@torch.no_grad()
def update_selection_bias(bias: Tensor, record: RoutingRecord, rate: float) -> None:
    """DeepSeek-V3's auxiliary-loss-free balancing step, in place: ``bias_i += rate * sign(mean - load_i)``.

    The bias [E] is added to the router logits ONLY to choose the top-k experts; the scores that weight
    the experts' outputs still come from the unbiased logits, so balancing never distorts them and no
    gradient fights the language-model loss. After each training step, experts that received fewer
    slots than average (``load_i < mean load = 1/E``) get their bias raised by ``rate`` (gamma, 0.001 in
    DeepSeek-V3) and busier ones lowered; an expert exactly at the mean is left alone (sign 0).

    In a training loop (Llama 4's router has no such bias; this is an experiment on top of it)::

        experts = (logits + bias).topk(k, dim=-1).indices  # the bias only picks
        scores = torch.sigmoid(logits.gather(-1, experts))  # the weights ignore it
        ...
        update_selection_bias(bias, record, rate=1e-3)  # after the optimiser step
    """
    load = expert_load(record, bias.numel()).to(bias.device)
    bias.add_(rate * torch.sign(load.mean() - load).to(bias.dtype))


__all__ = [
    "RoutingStats",
    "domain_expert_counts",
    "expert_load",
    "load_entropy",
    "max_violation",
    "mean_over_layers",
    "router_z_loss",
    "routing_stats",
    "same_expert_rate",
    "switch_loss",
    "update_selection_bias",
]
