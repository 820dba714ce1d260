"""Lab 7, the dispatch of expert parallelism: how many rows each rank sends to each rank, the order the
rows are sent in, the permutation that puts the experts' results back in the tokens' order, and the
averaging of the replicated parameters' gradients over the ranks
(``notebooks/labs/lab7_expert_dispatch.ipynb``).

Steps: 7.1 ``send_splits``, 7.2 ``dispatch_order``, 7.3 ``combine``, 7.4 ``average_gradients``, pure
functions checked on cases; 7.5 ``expert_parallel_moe``, the whole dispatch, run on 2 gloo processes
(``l4lab.distributed.spawn``, localhost, bounded time, every process ended) and compared with the
single-process ``l4lab.ops.routed_experts``: outputs and the gradient of the input. The reference is
``l4lab.distributed.ExpertParallelExperts.forward``, where rank r holds experts
``r * E / N .. (r + 1) * E / N - 1``.

A function defined in a notebook cannot be pickled into a new process, so step 7.5 sends its SOURCE:
the student's function and the functions of the same module it calls (its 7.1 to 7.3 answers), with
the modules and imported names they use, rebuilt in each process.
"""

from __future__ import annotations

import importlib
import inspect
import textwrap
import types
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from l4lab import ops
from l4lab.labs.core import Case, Hints, Mistake, Step, compare_tensor, generator, register_lab, student_line


# ====================================================================== the split sizes
def _ref_send_splits(expert_counts: Tensor, world_size: int) -> list[int]:
    return expert_counts.view(world_size, -1).sum(1).tolist()


def _cases_send_splits() -> list[Case]:
    specs = [
        ("8 experts on 2 ranks, uneven counts", [3, 0, 5, 1, 0, 2, 7, 4], 2),
        ("8 experts on 4 ranks, some experts receive nothing", [0, 2, 6, 1, 0, 0, 3, 9], 4),
        ("4 experts on 1 rank: everything stays", [2, 3, 1, 4], 1),
        (
            "16 experts on 4 ranks, rank 1's experts receive nothing",
            [1] * 4 + [0] * 4 + [2, 5, 0, 1] + [3] * 4,
            4,
        ),
        ("6 experts on 3 ranks", [4, 1, 0, 2, 2, 9], 3),
        ("2 experts on 2 ranks, every row to the last rank", [0, 12], 2),
    ]
    cases = []
    for label, counts, world_size in specs:
        expert_counts = torch.tensor(counts)
        cases.append(Case(label, (expert_counts, world_size), _ref_send_splits(expert_counts, world_size)))
    return cases


def _as_ints(value: Any, name: str) -> tuple[list[int] | None, str | None]:
    if isinstance(value, Tensor):
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        return (
            None,
            f"{name}: expected a list of ints (tensor.tolist() makes one), got {type(value).__name__}",
        )
    return list(value), None


def _compare_splits(expected: list[int], got: Any) -> str | None:
    splits, problem = _as_ints(got, "splits")
    if problem is not None or splits is None:
        return problem
    if len(splits) != len(expected):
        return f"splits: expected {len(expected)} numbers (one per rank), got {len(splits)}: {splits}"
    if splits != expected:
        return f"splits: expected {expected}, got {splits}"
    return None


_SPLITS_MISTAKES = (
    Mistake(
        "split by expert",
        lambda counts, n: counts.tolist(),
        "all_to_all_single wants ONE split per RANK (how many rows go to rank 0, 1, ...), not one per "
        "expert: add up the counts of the experts each rank holds.",
    ),
    Mistake(
        "experts dealt round-robin",
        lambda counts, n: counts.view(-1, n).sum(0).tolist(),
        "the experts are held in BLOCKS: rank r holds experts r * E/N to (r + 1) * E/N - 1, not experts "
        "r, r + N, r + 2N, ... Group neighbouring experts: counts.view(world_size, -1).",
    ),
    Mistake(
        "ranks in reverse order",
        lambda counts, n: counts.view(n, -1).sum(1).flip(0).tolist(),
        "split i is the number of rows sent to rank i: list the ranks in order 0, 1, ..., N - 1.",
    ),
)


# ====================================================================== the send order
def _ref_dispatch_order(experts: Tensor, world_size: int, num_experts: int) -> Tensor:
    return torch.argsort(experts.reshape(-1), stable=True)


def _cases_dispatch_order() -> list[Case]:
    g = generator(702)
    specs = [
        ("6 tokens, top-1, 4 experts on 2 ranks", 6, 1, 4, 2),
        ("5 tokens, top-2, 8 experts on 4 ranks", 5, 2, 8, 4),
        ("9 tokens, top-1, 8 experts on 2 ranks", 9, 1, 8, 2),
        ("1 token, top-3, 6 experts on 3 ranks", 1, 3, 6, 3),
        ("12 tokens, top-2, 16 experts on 4 ranks", 12, 2, 16, 4),
        ("7 tokens, top-1, 2 experts on 2 ranks", 7, 1, 2, 2),
    ]
    cases = []
    for label, tokens, top_k, num_experts, world_size in specs:
        experts = torch.stack([torch.randperm(num_experts, generator=g)[:top_k] for _ in range(tokens)])
        args = (experts, world_size, num_experts)
        cases.append(Case(label, args, _ref_dispatch_order(*args)))
    return cases


_ORDER_MISTAKES = (
    Mistake(
        "token order",
        lambda experts, n, e: torch.arange(experts.numel()),
        "all_to_all_single sends the first split to rank 0, the next to rank 1...: the rows must be "
        "SORTED so that each rank's rows are contiguous: sort the slots by expert.",
    ),
    Mistake(
        "sorted by rank only",
        lambda experts, n, e: torch.argsort(experts.reshape(-1) // (e // n), stable=True),
        "within the block for one rank, that rank reads the rows expert by expert (it only receives "
        "the COUNTS per expert): sort by expert, not only by rank.",
    ),
    Mistake(
        "where each slot goes",
        lambda experts, n, e: torch.argsort(torch.argsort(experts.reshape(-1), stable=True)),
        "you returned the position each slot takes in the sent rows; the order is the other way "
        "round: entry i is the slot (token * top_k + choice) SENT i-th, so that x[order // top_k] "
        "gathers the rows.",
    ),
)


# ====================================================================== the combine
def _ref_combine(results: Tensor, order: Tensor, top_k: int) -> Tensor:
    per_slot = results.index_select(0, torch.argsort(order))
    return per_slot.view(-1, top_k, results.shape[-1]).sum(dim=1)


def _cases_combine() -> list[Case]:
    g = generator(703)
    specs = [
        ("6 tokens, top-1, width 4", 6, 1, 4),
        ("5 tokens, top-2, width 3", 5, 2, 3),
        ("1 token, top-3, width 5", 1, 3, 5),
        ("11 tokens, top-1, width 8", 11, 1, 8),
        ("8 tokens, top-2, width 6", 8, 2, 6),
        ("4 tokens, top-4, width 2", 4, 4, 2),
    ]
    cases = []
    for label, tokens, top_k, width in specs:
        experts = torch.randint(0, 8, (tokens * top_k,), generator=g)
        order = torch.argsort(experts, stable=True)
        results = torch.randn(tokens * top_k, width, generator=g)
        args = (results, order, top_k)
        cases.append(Case(label, args, _ref_combine(*args)))
    return cases


_COMBINE_MISTAKES = (
    Mistake(
        "missing combine permutation",
        lambda results, order, k: results.view(-1, k, results.shape[-1]).sum(dim=1),
        "the results come back in the order they were SENT (sorted by expert), not in the tokens' "
        "order: undo the dispatch order before adding the choices (out[order] = results, or "
        "results[torch.argsort(order)]).",
    ),
    Mistake(
        "permutation applied forward",
        lambda results, order, k: results[order].view(-1, k, results.shape[-1]).sum(dim=1),
        "results[order] applies the dispatch order a second time; row i of the results belongs to "
        "slot order[i]: scatter it there (per_slot[order] = results) or gather with torch.argsort(order).",
    ),
    Mistake(
        "choices not added",
        lambda results, order, k: results.index_select(0, torch.argsort(order)),
        "one row per (token, choice) came back: add a token's top_k results, "
        "view(tokens, top_k, D).sum(1), to get one output per token.",
    ),
    Mistake(
        "choices averaged",
        lambda results, order, k: (
            results.index_select(0, torch.argsort(order)).view(-1, k, results.shape[-1]).mean(dim=1)
        ),
        "the experts already weighted each result by its router score: ADD a token's top_k results.",
    ),
)


# ====================================================================== the gradients
def _ref_average_gradients(grads_per_rank: list[Tensor]) -> list[Tensor]:
    mean = torch.stack(grads_per_rank).mean(dim=0)
    return [mean.clone() for _ in grads_per_rank]


def _cases_average_gradients() -> list[Case]:
    g = generator(704)
    specs = [
        ("2 ranks, a [4, 3] weight", 2, (4, 3)),
        ("4 ranks, a [5] norm weight", 4, (5,)),
        ("1 rank: nothing to average", 1, (3, 2)),
        ("3 ranks, a [2, 2, 3] tensor", 3, (2, 2, 3)),
        ("8 ranks, a [6] vector", 8, (6,)),
        ("2 ranks, a [3, 5] weight", 2, (3, 5)),
    ]
    cases = []
    for label, ranks, shape in specs:
        grads = [torch.randn(*shape, generator=g) for _ in range(ranks)]
        cases.append(Case(label, (grads,), _ref_average_gradients(grads)))
    return cases


def _compare_per_rank(expected: list[Tensor], got: Any) -> str | None:
    if isinstance(got, Tensor) or not isinstance(got, (list, tuple)):
        return (
            f"expected a list with one gradient per rank (what each rank holds after the all-reduce), got "
            f"{type(got).__name__}"
        )
    if len(got) != len(expected):
        return f"expected {len(expected)} gradients (one per rank), got {len(got)}"
    for rank, (e, g) in enumerate(zip(expected, got, strict=True)):
        problem = compare_tensor(e, g, f"rank {rank}'s gradient")
        if problem is not None:
            return problem
    return None


_GRADIENT_MISTAKES = (
    Mistake(
        "not reduced",
        lambda grads: [g.clone() for g in grads],
        "each rank saw only its share of the batch: without an all-reduce the ranks hold different "
        "gradients, and their copies of the weights drift apart. Every rank must end with the same one.",
    ),
    Mistake(
        "summed, not averaged",
        lambda grads: [torch.stack(grads).sum(dim=0) for _ in grads],
        "each rank's loss is the MEAN over its own tokens, so the sum over N ranks is N times the "
        "gradient of the global batch's mean loss: divide by the number of ranks (all_reduce(SUM) / N, "
        "or ReduceOp.AVG).",
    ),
    Mistake(
        "rank 0's everywhere",
        lambda grads: [grads[0].clone() for _ in grads],
        "a broadcast makes the ranks agree, but on rank 0's gradient only: the others' tokens are lost. "
        "Average all of them.",
    ),
)


# ====================================================================== the dispatch on 2 processes
WORLD_SIZE = 2
TIMEOUT_S = 90.0

# (label, experts, tokens per rank, top_k, seed); dim 6, intermediate 5
_LAYOUTS = (
    ("4 experts, top-1, 6 tokens a rank, expert 3 chosen by no token", 4, 6, 1, 705),
    ("8 experts, top-2, 5 tokens a rank, uneven loads", 8, 5, 2, 706),
    ("4 experts, top-1, 4 tokens a rank, every token to rank 0: rank 1 receives nothing", 4, 4, 1, 707),
)


def _layout(num_experts: int, tokens: int, top_k: int, seed: int) -> dict[str, Tensor]:
    g = generator(seed)
    total, dim, hidden = WORLD_SIZE * tokens, 6, 5
    if seed == 705:
        experts = torch.randint(0, num_experts - 1, (total, 1), generator=g)
    elif seed == 707:
        experts = torch.randint(0, num_experts // WORLD_SIZE, (total, 1), generator=g)
    else:
        experts = torch.stack([torch.randperm(num_experts, generator=g)[:top_k] for _ in range(total)])
    return {
        "x": torch.randn(total, dim, generator=g),
        "experts": experts,
        "scores": torch.rand(total, top_k, generator=g),
        "gate_up": torch.randn(num_experts, dim, 2 * hidden, generator=g) * 0.5,
        "down": torch.randn(num_experts, hidden, dim, generator=g) * 0.5,
        "upstream": torch.randn(total, dim, generator=g),
    }


def _reference(layout: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    x = layout["x"].clone().requires_grad_(True)
    out = ops.routed_experts(x, layout["experts"], layout["scores"], layout["gate_up"], layout["down"])
    (out * layout["upstream"]).sum().backward()
    return out.detach(), x.grad


def _program(fn: Callable[..., Any]) -> dict[str, Any]:
    """What a new process needs to rebuild ``fn``: the sources of fn and of the same module's functions it
    calls, the modules it uses by name, the names it imported, and simple constants."""
    home = fn.__module__
    sources: dict[str, str] = {}
    modules: dict[str, str] = {}
    imported: dict[str, tuple[str, str]] = {}
    constants: dict[str, Any] = {}
    pending = [fn]
    while pending:
        current = pending.pop()
        if current.__name__ in sources:
            continue
        sources[current.__name__] = textwrap.dedent(inspect.getsource(current))
        codes = [current.__code__]
        names: set[str] = set()
        while codes:
            code = codes.pop()
            names.update(code.co_names)
            codes.extend(c for c in code.co_consts if isinstance(c, types.CodeType))
        for name in names:
            if name not in current.__globals__:
                continue
            value = current.__globals__[name]
            if isinstance(value, types.ModuleType):
                modules[name] = value.__name__
            elif isinstance(value, types.FunctionType) and value.__module__ == home:
                pending.append(value)
            elif getattr(value, "__module__", None) and hasattr(value, "__qualname__"):
                imported[name] = (value.__module__, value.__qualname__)
            elif isinstance(value, (int, float, str, bool)):
                constants[name] = value
    return {
        "name": fn.__name__,
        "sources": sources,
        "modules": modules,
        "imported": imported,
        "constants": constants,
    }


def _rebuild(program: dict[str, Any]) -> Callable[..., Any]:
    namespace: dict[str, Any] = {"__name__": "student", **program["constants"]}
    for name, module in program["modules"].items():
        namespace[name] = importlib.import_module(module)
    for name, (module, qualname) in program["imported"].items():
        value: Any = importlib.import_module(module)
        for part in qualname.split("."):
            value = getattr(value, part)
        namespace[name] = value
    for name, source in program["sources"].items():
        exec(compile(source, f"<your {name}>", "exec"), namespace)  # the student's own code
    return namespace[program["name"]]


def _run_dispatch(program: dict[str, Any]) -> dict[str, Tensor]:
    """On each of the 2 processes: this rank's tokens and experts of every layout through the student's
    dispatch, then backward; returns the outputs and the input's gradients (or the error, as text)."""
    rank = dist.get_rank()
    try:
        fn = _rebuild(program)
    except Exception as error:
        return {"error": torch.tensor(list(f"{type(error).__name__}: {error}".encode()), dtype=torch.uint8)}
    found: dict[str, Tensor] = {}
    for number, (_, num_experts, tokens, top_k, seed) in enumerate(_LAYOUTS):
        layout = _layout(num_experts, tokens, top_k, seed)
        mine, local = slice(rank * tokens, (rank + 1) * tokens), num_experts // WORLD_SIZE
        experts_here = slice(rank * local, (rank + 1) * local)
        x = layout["x"][mine].clone().requires_grad_(True)
        gate_up = layout["gate_up"][experts_here].clone().requires_grad_(True)
        down = layout["down"][experts_here].clone().requires_grad_(True)
        try:
            out = fn(x, layout["experts"][mine], layout["scores"][mine], gate_up, down, dist.group.WORLD)
            found[f"out{number}"] = out.detach().clone()
            if out.requires_grad:
                (out * layout["upstream"][mine]).sum().backward()
            found[f"grad{number}"] = torch.zeros_like(x) if x.grad is None else x.grad
        except Exception as error:
            where = student_line(error)
            text = f"{type(error).__name__}: {error}" + (f" ({where})" if where else "")
            found["error"] = torch.tensor(list(text.encode()), dtype=torch.uint8)
            found["error_layout"] = torch.tensor(number)
            break  # the same code fails alike on both ranks; if not, spawn's timeout ends the other
    return found


def _check_on_processes(fn: Callable[..., Any]) -> tuple[str | None, str]:
    """Step 7.5's check: the student's dispatch on 2 gloo processes against the single-process MoE."""
    from l4lab.distributed import spawn  # torch.distributed's launcher, only when this step runs

    try:
        program = _program(fn)
    except (OSError, TypeError) as error:
        return (
            f"cannot read the source of {fn.__name__} ({error}); define it with def in a notebook cell "
            "or a .py file",
            "",
        )
    if "raise NotImplementedError" in program["sources"][fn.__name__]:
        return (
            f"not done yet: {fn.__name__} still raises NotImplementedError. Replace that line with your "
            "code and run the cell again.",
            "",
        )
    try:
        ranks = spawn(_run_dispatch, WORLD_SIZE, program, timeout_s=TIMEOUT_S)
    except (RuntimeError, TimeoutError) as error:
        return (
            f"the 2 processes did not finish: {error}. A rank that waits forever in a collective usually "
            "means the ranks disagree on the split sizes: each rank's receive splits must be the other "
            "ranks' send splits to it (exchange the counts first).",
            "",
        )
    return _verdict(ranks)


def _sent_order_sums(layout: dict[str, Tensor], rank: int, tokens: int) -> Tensor:
    """Rank ``rank``'s outputs when the combine skips the permutation: each token's top_k rows added in
    the order they were SENT, not in the token's order."""
    experts, scores = layout["experts"][rank * tokens : (rank + 1) * tokens], layout["scores"]
    top_k = experts.shape[1]
    x = layout["x"][rank * tokens : (rank + 1) * tokens].repeat_interleave(top_k, dim=0)
    slot_scores = scores[rank * tokens : (rank + 1) * tokens].reshape(-1, 1)
    per_slot = ops.routed_experts(x, experts.reshape(-1, 1), slot_scores, layout["gate_up"], layout["down"])
    order = torch.argsort(experts.reshape(-1), stable=True)
    return per_slot[order].view(tokens, top_k, -1).sum(dim=1)


def _verdict(ranks: list[dict[str, Tensor]]) -> tuple[str | None, str]:
    """What each rank returned (outputs ``out<layout>``, input gradients ``grad<layout>``, or ``error``)
    against the single-process MoE; names the typical mistakes."""
    for rank, found in enumerate(ranks):
        if "error" in found:
            text = bytes(found["error"].tolist()).decode()
            label = _LAYOUTS[int(found["error_layout"])][0] if "error_layout" in found else "rebuilding it"
            return f"on rank {rank}, layout '{label}', your function raised {text}", ""
    for number, (label, num_experts, tokens, top_k, seed) in enumerate(_LAYOUTS):
        layout = _layout(num_experts, tokens, top_k, seed)
        expected_out, expected_grad = _reference(layout)
        for rank, found in enumerate(ranks):
            if f"out{number}" not in found or f"grad{number}" not in found:
                return f"layout '{label}': rank {rank} returned no output", ""
            mine = slice(rank * tokens, (rank + 1) * tokens)
            got = found[f"out{number}"]
            problem = compare_tensor(expected_out[mine], got, f"rank {rank}'s output")
            if problem is not None and compare_tensor(_sent_order_sums(layout, rank, tokens), got) is None:
                return (
                    f"layout '{label}': {problem}. hint: missing combine permutation: the results came "
                    "back in the order they were sent (sorted by expert); put them back in the tokens' "
                    "order (your 7.3) before adding each token's top_k results.",
                    "",
                )
            if problem is not None:
                return (
                    f"layout '{label}': {problem}. hint: check 7.1 to 7.3 again; then the receiving side: "
                    "rows arrive by source rank, and inside each rank's block by expert (the counts you "
                    "received say how many), and the results must go back with the splits swapped.",
                    "",
                )
            problem = compare_tensor(
                expected_grad[mine], found[f"grad{number}"], f"rank {rank}'s input gradient"
            )
            if problem is not None:
                return (
                    f"layout '{label}': the outputs are right but {problem}. hint: "
                    "dist.all_to_all_single writes into a tensor and carries no gradient; move the ROWS "
                    "with l4lab.distributed.all_to_all (torch.distributed.nn.functional.all_to_all_single), "
                    "whose backward sends the gradients back to the ranks the rows came from.",
                    "",
                )
    return None, f": {len(_LAYOUTS)} layouts on {WORLD_SIZE} gloo processes, outputs and input gradients"


# ====================================================================== the steps
STEPS: tuple[Step, ...] = (
    Step(
        "7.1",
        "send_splits",
        ("expert_counts", "world_size"),
        "rows per expert [E] -> rows to send to each rank [N] (rank r holds a block of E / N experts)",
        _cases_send_splits,
        _compare_splits,
        _SPLITS_MISTAKES,
        "rank r holds a contiguous block of experts: its split is the number of rows sent to that block.",
        hints=Hints(
            "all_to_all_single needs, for every destination rank, how many rows go there",
            "split[r] = sum of expert_counts[e] for r * E/N <= e < (r + 1) * E/N",
            "l4lab/distributed.py, ExpertParallelExperts.forward, send_splits",
        ),
    ),
    Step(
        "7.2",
        "dispatch_order",
        ("experts", "world_size", "num_experts"),
        "the slots (token, choice) in the order they are sent: by expert, hence by rank, stable",
        _cases_dispatch_order,
        lambda e, g: compare_tensor(e, g, "order"),
        _ORDER_MISTAKES,
        "rows leave grouped by expert (so by rank), ties in token order; slot s = token * top_k + choice.",
        hints=Hints(
            "the rows for rank 0 go first, then rank 1's...; inside a rank's block, its experts in order",
            "order = the slots sorted by their expert id, ties kept in token order",
            "l4lab/distributed.py, ExpertParallelExperts.forward, order = torch.argsort(...)",
        ),
    ),
    Step(
        "7.3",
        "combine",
        ("results", "order", "top_k"),
        "results in the order they were sent -> one output per token, in the tokens' order",
        _cases_combine,
        lambda e, g: compare_tensor(e, g, "combined"),
        _COMBINE_MISTAKES,
        "results return in the order they were sent: put each in its slot, add a token's top_k results.",
        hints=Hints(
            "undo the permutation of 7.2, then add each token's top_k results",
            "per_slot[order[i]] = results[i]; out[t] = sum over c of per_slot[t * top_k + c]",
            "l4lab/distributed.py, ExpertParallelExperts.forward, the combine permutation",
        ),
    ),
    Step(
        "7.4",
        "average_gradients",
        ("grads_per_rank",),
        "each rank's gradient of a replicated weight -> what every rank holds after the all-reduce",
        _cases_average_gradients,
        _compare_per_rank,
        _GRADIENT_MISTAKES,
        "after the all-reduce every rank holds the same gradient: the mean over the ranks' gradients.",
        hints=Hints(
            "every rank must step with the gradient of the GLOBAL batch's mean loss, the same everywhere",
            "g = (g_0 + ... + g_{N-1}) / N on every rank (all_reduce with SUM, then divide by N)",
            "l4lab/distributed.py, _sum_over_ranks: an all_reduce that sums; divide by N after it",
        ),
    ),
)

STEPS += (
    Step(
        "7.5",
        "expert_parallel_moe",
        ("x", "experts", "scores", "gate_up_proj", "down_proj", "group"),
        "the whole dispatch on 2 processes: counts, all_to_all, local experts, all_to_all back, combine",
        list,  # no in-process cases: the check runs the function on 2 gloo processes
        compare_tensor,
        (),
        "",
        extra=_check_on_processes,
        hints=Hints(
            "counts first, so every rank knows what arrives; rows out, experts, rows back, in place again",
            "send = send_splits(counts); receive[j] = what rank j sends me; back: the splits swapped",
            "l4lab/distributed.py, ExpertParallelExperts.forward",
        ),
    ),
)

register_lab("7", "expert_dispatch", STEPS)
