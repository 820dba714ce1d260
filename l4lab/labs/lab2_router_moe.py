"""Lab 2, the router and the mixture of experts: Llama 4's sigmoid top-k router, a MoE layer with its
shared expert, and a sparse dispatch whose work does not grow with the number of experts
(``notebooks/labs/lab2_router_moe.ipynb``).

Steps: 2.1 ``route``, 2.2 ``moe_forward``, 2.3 ``sparse_dispatch``; references in ``l4lab.model``
(``Router``, ``MoE``) and ``l4lab.ops.routed_experts``.

Step 2.3 also measures the work: ``torch.utils.flop_counter.FlopCounterMode`` counts the FLOPs of the
student's dispatch at 2 and at 16 experts, which must not grow (when no matmul is counted, the elements
the operations write are counted instead, so a broadcast multiply over every expert is caught too).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from l4lab import ops
from l4lab.compare import matmul_flops
from l4lab.config import preset
from l4lab.labs.core import (
    Case,
    Hints,
    Mistake,
    Step,
    as_tensor,
    clone,
    compare_tensor,
    generator,
    register_lab,
    student_line,
)
from l4lab.model import MoE, Router


# ====================================================================== the router
def _ref_route(x: Tensor, router_weight: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    num_experts, dim = router_weight.shape
    router = Router(dim, num_experts, top_k)
    with torch.no_grad():
        router.weight.copy_(router_weight)
        experts, scores, _ = router(x)
    return experts, scores


def _cases_route() -> list[Case]:
    g = generator(201)
    specs = [
        ("6 tokens, 4 experts, top-1 (Llama 4's k)", 6, 8, 4, 1),
        ("1 token, 8 experts, top-2", 1, 8, 8, 2),
        ("7 tokens, 5 experts, top-3, dim 12", 7, 12, 5, 3),
        ("one expert (E = 1)", 4, 6, 1, 1),
        ("13 tokens, 16 experts, top-1, dim 10", 13, 10, 16, 1),
        ("top-k = E = 3: every expert chosen", 3, 5, 3, 3),
    ]
    cases = []
    for label, n, d, e, k in specs:
        x = torch.randn(n, d, generator=g)
        weight = 0.5 * torch.randn(e, d, generator=g)
        cases.append(Case(label, (x, weight, k), _ref_route(x, weight, k)))
    return cases


def _sorted_route(experts: Tensor, scores: Tensor) -> tuple[Tensor, Tensor]:
    order = experts.argsort(dim=-1)
    return experts.gather(-1, order), scores.gather(-1, order)


def _compare_route(expected: Any, got: Any) -> str | None:
    if got is None:
        return "your function returned None (is a `return` missing?)"
    if not isinstance(got, (tuple, list)) or len(got) != 2:
        return f"expected a tuple (experts, scores), got {type(got).__name__}"
    experts, problem = as_tensor(got[0], "experts")
    if problem or experts is None:
        return problem
    scores, problem = as_tensor(got[1], "scores")
    if problem or scores is None:
        return problem
    want_experts, want_scores = expected
    for name, tensor, want in (("experts", experts, want_experts), ("scores", scores, want_scores)):
        if tuple(tensor.shape) != tuple(want.shape):
            return f"{name}: expected shape {tuple(want.shape)}, got {tuple(tensor.shape)}"
    if experts.dtype.is_floating_point or experts.dtype == torch.bool:
        return f"experts: expected integer expert ids, got dtype {str(experts.dtype).removeprefix('torch.')}"
    if not scores.dtype.is_floating_point:
        return f"scores: expected floating-point scores, got dtype {str(scores.dtype).removeprefix('torch.')}"
    # the order of the k choices does not matter: compare both sorted by expert id
    got_e, got_s = _sorted_route(experts.long(), scores.detach().float())
    want_e, want_s = _sorted_route(want_experts.long(), want_scores.float())
    if not torch.equal(got_e, want_e):
        token = int((got_e != want_e).any(-1).nonzero()[0])
        return (
            f"experts: token {token} should go to experts {want_e[token].tolist()}, yours chose "
            f"{got_e[token].tolist()}"
        )
    return compare_tensor(want_s, got_s, "scores", rtol=1e-4, atol=1e-5)


def _route_parts(x: Tensor, w: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    logits = x @ w.T
    top, experts = logits.topk(k, dim=-1)
    return logits, top, experts


def _route_softmax_all(x: Tensor, w: Tensor, k: int) -> tuple[Tensor, Tensor]:
    logits, _, experts = _route_parts(x, w, k)
    return experts, torch.softmax(logits, -1).gather(-1, experts)


def _route_softmax_topk(x: Tensor, w: Tensor, k: int) -> tuple[Tensor, Tensor]:
    _, top, experts = _route_parts(x, w, k)
    return experts, torch.softmax(top, -1)


def _route_renormalised(x: Tensor, w: Tensor, k: int) -> tuple[Tensor, Tensor]:
    _, top, experts = _route_parts(x, w, k)
    s = torch.sigmoid(top)
    return experts, s / s.sum(-1, keepdim=True)


def _route_raw(x: Tensor, w: Tensor, k: int) -> tuple[Tensor, Tensor]:
    _, top, experts = _route_parts(x, w, k)
    return experts, top


_SOFTMAX_HINT = (
    "Llama 4's router has no softmax: each chosen expert's score is sigmoid(its own logit), whatever the "
    "other experts' logits (a softmax makes experts compete for one unit of weight, as in Mixtral)."
)
_RENORM_HINT = (
    "do not renormalise, and no softmax over the chosen logits either: Llama 4 keeps sigmoid(logit) for "
    "each chosen expert, so the scores of a token's experts need not sum to 1 (with k = 1 a renormalised "
    "score would always be 1.0)."
)

_ROUTE_MISTAKES = (
    Mistake("softmax router", _route_softmax_all, _SOFTMAX_HINT),
    Mistake("renormalised", _route_renormalised, _RENORM_HINT),
    Mistake("softmax over the top-k", _route_softmax_topk, _SOFTMAX_HINT),
    Mistake(
        "raw logits", _route_raw, "the score is sigmoid(logit), a number between 0 and 1, not the logit."
    ),
)


def _swiglu_expert(z: Tensor, gate_up: Tensor, down: Tensor) -> Tensor:
    gate, up = (z @ gate_up).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ down


def _shared(x: Tensor, shared: tuple[Tensor, Tensor, Tensor]) -> Tensor:
    gate, up, down = shared
    return (F.silu(x @ gate) * (x @ up)) @ down


def _ref_moe_forward(
    x: Tensor,
    router_weight: Tensor,
    gate_up: Tensor,
    down: Tensor,
    shared: tuple[Tensor, Tensor, Tensor],
    top_k: int,
) -> Tensor:
    """l4lab's own MoE layer, with these weights loaded into it."""
    num_experts, dim, width = gate_up.shape[0], gate_up.shape[1], down.shape[1]
    config = preset(
        "tiny-moe", hidden_size=dim, num_experts=num_experts, top_k=top_k, moe_intermediate_size=width
    )
    layer = MoE(config, 0)
    gate, up, shared_down = shared
    with torch.no_grad():
        layer.router.weight.copy_(router_weight)
        layer.experts.gate_up_proj.copy_(gate_up)
        layer.experts.down_proj.copy_(down)
        layer.shared_expert.gate_proj.weight.copy_(gate.T)
        layer.shared_expert.up_proj.weight.copy_(up.T)
        layer.shared_expert.down_proj.weight.copy_(shared_down.T)
        out, _ = layer(x)
    return out


def _moe_inputs(g: torch.Generator, n: int, d: int, width: int, e: int) -> tuple[Any, ...]:
    x = torch.randn(n, d, generator=g)
    router_weight = 0.5 * torch.randn(e, d, generator=g)
    gate_up = torch.randn(e, d, 2 * width, generator=g) / math.sqrt(d)
    down = torch.randn(e, width, d, generator=g) / math.sqrt(width)
    shared = (
        torch.randn(d, width, generator=g) / math.sqrt(d),
        torch.randn(d, width, generator=g) / math.sqrt(d),
        torch.randn(width, d, generator=g) / math.sqrt(width),
    )
    return x, router_weight, gate_up, down, shared


_MOE_SPECS = [
    ("5 tokens, 4 experts, top-1, dim 8, expert width 6", 5, 8, 6, 4, 1),
    ("1 token (batch 1), 4 experts, top-1", 1, 8, 6, 4, 1),
    ("9 tokens, 3 experts, top-2, dim 12, width 10", 9, 12, 10, 3, 2),
    ("3 tokens, 8 experts: most experts get no token", 3, 8, 4, 8, 1),
    ("6 tokens, one expert (E = 1)", 6, 6, 6, 1, 1),
    ("11 tokens, 6 experts, top-2, width 5", 11, 10, 5, 6, 2),
]


def _cases_moe_forward() -> list[Case]:
    g = generator(202)
    cases = []
    for label, n, d, width, e, k in _MOE_SPECS:
        x, router_weight, gate_up, down, shared = _moe_inputs(g, n, d, width, e)
        args = (x, router_weight, gate_up, down, shared, k)
        cases.append(Case(label, args, _ref_moe_forward(*args)))
    return cases


def _moe_variant(
    score_on: str = "input",
    with_shared: bool = True,
    scorer: Callable[..., Any] | None = None,
    swap: bool = False,
) -> Callable[..., Tensor]:
    def forward(
        x: Tensor, w: Tensor, gate_up: Tensor, down: Tensor, shared: tuple[Tensor, Tensor, Tensor], k: int
    ) -> Tensor:
        experts, scores = (scorer or _ref_route)(x, w, k)
        if swap:
            gate_up = torch.cat(gate_up.chunk(2, dim=-1)[::-1], dim=-1)
        out = torch.zeros_like(x)
        for n in range(x.shape[0]):
            for j in range(k):
                e, s = int(experts[n, j]), scores[n, j]
                if score_on == "input":
                    out[n] += _swiglu_expert(s * x[n], gate_up[e], down[e])
                elif score_on == "output":
                    out[n] += s * _swiglu_expert(x[n], gate_up[e], down[e])
                else:
                    out[n] += _swiglu_expert(x[n], gate_up[e], down[e])
        return out + _shared(x, shared) if with_shared else out

    return forward


_SCORE_OUTPUT_HINT = (
    "the score scales the expert's INPUT: expert(score * x), as Llama 4 does. SwiGLU is not linear, so "
    "score * expert(x) gives a different answer."
)
_GATE_UP_HINT = (
    "gate is the FIRST half of gate_up[e]'s columns and up the second: "
    "gate, up = (z @ gate_up[e]).chunk(2, -1)."
)

_MOE_MISTAKES = (
    Mistake("score on the output", _moe_variant(score_on="output"), _SCORE_OUTPUT_HINT),
    Mistake(
        "no shared expert",
        _moe_variant(with_shared=False),
        "add the shared expert: every token also goes through the SwiGLU of shared = (gate, up, down), "
        "unscaled: (silu(x @ gate) * (x @ up)) @ down.",
    ),
    Mistake("softmax router", _moe_variant(scorer=_route_softmax_all), _SOFTMAX_HINT),
    Mistake("renormalised scores", _moe_variant(scorer=_route_renormalised), _RENORM_HINT),
    Mistake("softmax over the top-k", _moe_variant(scorer=_route_softmax_topk), _SOFTMAX_HINT),
    Mistake(
        "score ignored",
        _moe_variant(score_on="none"),
        "multiply each routed expert's input by its router score sigmoid(logit): expert(score * x).",
    ),
    Mistake("gate and up swapped", _moe_variant(swap=True), _GATE_UP_HINT),
)


def _ref_sparse_dispatch(x: Tensor, experts: Tensor, scores: Tensor, gate_up: Tensor, down: Tensor) -> Tensor:
    return ops.routed_experts(x, experts, scores, gate_up, down)


def _cases_sparse_dispatch() -> list[Case]:
    g = generator(203)
    cases = []
    for label, n, d, width, e, k in _MOE_SPECS:
        x, router_weight, gate_up, down, _ = _moe_inputs(g, n, d, width, e)
        experts, scores = _ref_route(x, router_weight, k)
        args = (x, experts, scores, gate_up, down)
        cases.append(Case(label, args, _ref_sparse_dispatch(*args)))
    return cases


def _dispatch_variant(score_on: str = "input", swap: bool = False) -> Callable[..., Tensor]:
    def dispatch(x: Tensor, experts: Tensor, scores: Tensor, gate_up: Tensor, down: Tensor) -> Tensor:
        if swap:
            gate_up = torch.cat(gate_up.chunk(2, dim=-1)[::-1], dim=-1)
        out = torch.zeros_like(x)
        for n in range(x.shape[0]):
            for j in range(experts.shape[1]):
                e, s = int(experts[n, j]), scores[n, j]
                if score_on == "input":
                    out[n] += _swiglu_expert(s * x[n], gate_up[e], down[e])
                elif score_on == "output":
                    out[n] += s * _swiglu_expert(x[n], gate_up[e], down[e])
                else:
                    out[n] += _swiglu_expert(x[n], gate_up[e], down[e])
        return out

    return dispatch


_DISPATCH_MISTAKES = (
    Mistake("score on the output", _dispatch_variant(score_on="output"), _SCORE_OUTPUT_HINT),
    Mistake(
        "score ignored", _dispatch_variant(score_on="none"), "multiply each slot's input by its score first."
    ),
    Mistake("gate and up swapped", _dispatch_variant(swap=True), _GATE_UP_HINT),
)

# the sparsity measurement: the same tokens and routing width, 2 experts and then 16
_SPARSE_TOKENS, _SPARSE_DIM, _SPARSE_WIDTH = 64, 16, 32
_SPARSE_EXPERTS = (2, 16)


class _ElementCounter(TorchDispatchMode):
    """Counts the elements that operations write (views excluded): work that FLOP counting misses,
    e.g. a broadcast multiply-and-sum over every expert."""

    def __init__(self) -> None:
        super().__init__()
        self.elements = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        is_view = bool(getattr(func, "is_view", False)) or any(
            a.alias_info is not None and not a.alias_info.is_write for a in func._schema.returns
        )
        if not is_view:
            for value in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(value, Tensor):
                    self.elements += value.numel()
        return out


def _measure_dispatch(fn: Callable[..., Any], num_experts: int) -> tuple[Any, int, int, tuple[Any, ...]]:
    g = generator(204)
    n, d, width = _SPARSE_TOKENS, _SPARSE_DIM, _SPARSE_WIDTH
    x = torch.randn(n, d, generator=g)
    experts = torch.randint(0, num_experts, (n, 1), generator=g)
    scores = torch.rand(n, 1, generator=g)
    gate_up = torch.randn(num_experts, d, 2 * width, generator=g) / math.sqrt(d)
    down = torch.randn(num_experts, width, d, generator=g) / math.sqrt(width)
    args = (x, experts, scores, gate_up, down)
    out, flops = matmul_flops(fn, *clone(args))
    elements = 0
    if flops == 0:  # nothing went through a matmul: count the elements written instead
        with _ElementCounter() as element_counter:
            fn(*clone(args))
        elements = element_counter.elements
    return out, flops, elements, args


def _check_sparse(fn: Callable[..., Any]) -> tuple[str | None, str]:
    measured = {}
    for e in _SPARSE_EXPERTS:
        out, error = None, None
        try:
            out, flops, elements, args = _measure_dispatch(fn, e)
        except Exception as exc:
            error = exc
        if error is not None:
            where = student_line(error)
            return (
                f"on the sparsity case ({_SPARSE_TOKENS} tokens, {e} experts, top-1) your function raised "
                f"{type(error).__name__}: {error}" + (f"\n  {where}" if where else ""),
                "",
            )
        problem = compare_tensor(_ref_sparse_dispatch(*args), out)
        if problem is not None:
            return f"on the sparsity case ({_SPARSE_TOKENS} tokens, {e} experts, top-1): {problem}", ""
        measured[e] = (flops, elements)
    (few_flops, few_elements), (many_flops, many_elements) = measured[2], measured[16]
    useful = 2 * _SPARSE_TOKENS * 3 * _SPARSE_DIM * _SPARSE_WIDTH  # one expert per token
    how_to = (
        "Sort the token slots by expert (torch.argsort(experts.flatten())), let each expert multiply only "
        "its own rows (torch.bincount gives how many each expert has), and put the results back in token "
        "order (index_add_ or the inverse permutation)."
    )
    if many_flops > 0:
        if many_flops > 1.5 * max(few_flops, useful):
            return (
                f"the answers are right, but the work grows with the number of experts: "
                f"{few_flops:,} FLOPs with 2 experts, {many_flops:,} with 16 (x{many_flops / few_flops:.1f}; "
                f"the routed work is {useful:,} whatever the number of experts). Your function runs "
                f"every expert on every token.\n  hint: {how_to}",
                "",
            )
        return None, f", and sparse: {few_flops:,} FLOPs with 2 experts, {many_flops:,} with 16"
    if many_elements > 2.0 * max(few_elements, 1):
        return (
            f"the answers are right, but the work grows with the number of experts: it writes "
            f"{few_elements:,} numbers with 2 experts and {many_elements:,} with 16. Your function computes "
            f"every expert for every token.\n  hint: {how_to}",
            "",
        )
    return None, ", and sparse (no matmul FLOPs counted; the work does not grow with the experts)"


# ====================================================================== the steps
STEPS: tuple[Step, ...] = (
    Step(
        "2.1",
        "route",
        ("x", "router_weight", "top_k"),
        "Llama 4's router: the top-k logits x @ W^T, each scored by sigmoid(logit)",
        _cases_route,
        _compare_route,
        _ROUTE_MISTAKES,
        "each token picks its k experts by their logits, and each chosen expert gets a score on its own.",
        hints=Hints(
            "The router gives each token one logit per expert. The token goes to the experts with the k "
            "largest logits; each chosen expert's score is a number between 0 and 1 computed from its own "
            "logit alone: no softmax, so the experts do not share one unit of weight.",
            "logits = x W_r^T [N, E]; experts = the indices of the k largest logits per row (torch.topk); "
            "scores = sigmoid(those k logits).",
            "l4lab/model.py, Router.forward; the same in l4lab/ops.py, route.",
        ),
    ),
    Step(
        "2.2",
        "moe_forward",
        ("x", "router_weight", "gate_up", "down", "shared", "top_k"),
        "a MoE layer: routed experts on score-scaled inputs, plus the shared expert",
        _cases_moe_forward,
        compare_tensor,
        _MOE_MISTAKES,
        "every token goes through the shared expert, and through its chosen experts with its input scaled.",
        hints=Hints(
            "Two paths are added: the shared expert, which every token goes through unscaled, and the "
            "token's chosen routed experts, each fed the token multiplied by that expert's router score. "
            "Every expert is a small SwiGLU.",
            "out[n] = shared(x[n]) + sum over token n's experts e of E_e(s_e x[n]), with E_e(z) = "
            "(silu(z W_gate) * (z W_up)) W_down, W_gate and W_up the two halves of gate_up[e]'s columns.",
            "l4lab/model.py, MoE.forward (with Experts and SwiGLU above it).",
        ),
    ),
    Step(
        "2.3",
        "sparse_dispatch",
        ("x", "experts", "scores", "gate_up", "down"),
        "the routed experts computing only the chosen (token, expert) pairs: sort tokens by expert",
        _cases_sparse_dispatch,
        compare_tensor,
        _DISPATCH_MISTAKES,
        "the same sum as 2.2 without the shared expert, with each expert multiplying only its own tokens.",
        hints=Hints(
            "Instead of asking every expert about every token, line the (token, expert) slots up by expert, "
            "let each expert multiply the block of rows that chose it (maybe none), and send the results "
            "back to their tokens.",
            "order = argsort of experts.flatten(); slot s belongs to token s // k; rows = x[token] * score "
            "in that order; counts = bincount(experts, minlength=E) cuts them per expert (split); results "
            "go back with index_add_ on the token index.",
            "l4lab/ops.py, routed_experts.",
        ),
        extra=_check_sparse,
    ),
)

register_lab("2", "router_moe", STEPS)
