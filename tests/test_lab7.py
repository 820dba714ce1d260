"""Lab 7's step 7.5: the student's whole dispatch runs on 2 gloo processes (localhost, bounded time,
every process ended) and is compared with the single-process MoE. The pure steps 7.1 to 7.4 are
tested with the other labs' steps in test_labs.py."""

import multiprocessing

import torch
import torch.distributed as dist

from l4lab import labs
from l4lab.distributed import all_to_all
from l4lab.labs import lab7_expert_dispatch as lab7
from l4lab.ops import routed_experts


def send_splits(expert_counts, world_size):
    per_rank = len(expert_counts) // world_size
    return [int(expert_counts[r * per_rank : (r + 1) * per_rank].sum()) for r in range(world_size)]


def dispatch_order(experts, world_size, num_experts):
    return torch.sort(experts.flatten(), stable=True).indices


def combine(results, order, top_k):
    per_slot = torch.zeros_like(results).index_add(0, order, results)
    return per_slot.unflatten(0, (-1, top_k)).sum(dim=1)


def exchange(rows, receive, send, group):
    """The rows' exchange without autograd: the typical mistake of step 7.5."""
    out = rows.new_empty(sum(receive), *rows.shape[1:])
    dist.all_to_all_single(out, rows.detach().contiguous(), receive, send, group=group)
    return out


def dispatch(x, experts, scores, gate_up_proj, down_proj, group, move):
    world_size, num_local = dist.get_world_size(group), gate_up_proj.shape[0]
    top_k = experts.shape[1]
    counts = torch.bincount(experts.flatten(), minlength=num_local * world_size)
    arriving = torch.empty_like(counts)
    dist.all_to_all_single(arriving, counts, group=group)
    arriving = arriving.view(world_size, num_local)
    order = dispatch_order(experts, world_size, num_local * world_size)
    send, receive = send_splits(counts, world_size), arriving.sum(1).tolist()
    rows = move(torch.cat([x[order // top_k], scores.flatten()[order, None]], 1), receive, send, group)
    expert_ids = torch.arange(num_local).repeat(world_size).repeat_interleave(arriving.flatten())
    results = rows[:, :-1] * 0
    if len(rows):
        results = routed_experts(rows[:, :-1], expert_ids[:, None], rows[:, -1:], gate_up_proj, down_proj)
    return combine(move(results, send, receive, group), order, top_k)


def expert_parallel_moe(x, experts, scores, gate_up_proj, down_proj, group):
    return dispatch(x, experts, scores, gate_up_proj, down_proj, group, all_to_all)


def expert_parallel_moe_without_gradients(x, experts, scores, gate_up_proj, down_proj, group):
    return dispatch(x, experts, scores, gate_up_proj, down_proj, group, exchange)


def test_the_dispatch_on_two_processes_passes_and_leaves_no_process():
    result = labs.check("7.5", expert_parallel_moe)
    assert result.passed, result.message
    assert result.message == "✓ 7.5 passed: 3 layouts on 2 gloo processes, outputs and input gradients"
    assert multiprocessing.active_children() == []


def test_an_exchange_without_autograd_is_named():
    result = labs.check("7.5", expert_parallel_moe_without_gradients)
    assert not result.passed
    assert "the outputs are right but rank 0's input gradient" in result.message, result.message
    assert "l4lab.distributed.all_to_all" in result.message
    assert multiprocessing.active_children() == []


# ------------------------------------------------------------ the verdict on what the ranks returned
def _returned(outputs, gradients=True):
    """What the 2 ranks would return, with the outputs ``outputs(layout, rank, tokens)``."""
    ranks = [{}, {}]
    for number, (_, experts, tokens, top_k, seed) in enumerate(lab7._LAYOUTS):
        layout = lab7._layout(experts, tokens, top_k, seed)
        _, grad = lab7._reference(layout)
        for rank in range(2):
            mine = slice(rank * tokens, (rank + 1) * tokens)
            ranks[rank][f"out{number}"] = outputs(layout, rank, tokens)
            ranks[rank][f"grad{number}"] = grad[mine] if gradients else torch.zeros_like(grad[mine])
    return ranks


def _right(layout, rank, tokens):
    return lab7._reference(layout)[0][rank * tokens : (rank + 1) * tokens]


def test_the_verdict_names_the_missing_combine_permutation_and_the_lost_gradients():
    assert lab7._verdict(_returned(_right)) == (
        None,
        ": 3 layouts on 2 gloo processes, outputs and input gradients",
    )
    failure, _ = lab7._verdict(_returned(lab7._sent_order_sums))
    assert "missing combine permutation" in failure
    failure, _ = lab7._verdict(_returned(lambda layout, rank, tokens: _right(layout, rank, tokens) * 2))
    assert "check 7.1 to 7.3 again" in failure
    failure, _ = lab7._verdict(_returned(_right, gradients=False))
    assert "the outputs are right but rank 0's input gradient" in failure
    error = {"error": torch.tensor(list(b"ValueError: split sizes"), dtype=torch.uint8)}
    failure, _ = lab7._verdict([{}, {**error, "error_layout": torch.tensor(1)}])
    assert failure.startswith("on rank 1, layout '8 experts, top-2") and "ValueError: split sizes" in failure
    assert lab7._verdict([{}, {}])[0].endswith("expert 3 chosen by no token': rank 0 returned no output")


def unfinished(x, experts, scores, gate_up_proj, down_proj, group):
    raise NotImplementedError  # replace this line with your code


def test_an_unfinished_dispatch_is_answered_without_starting_processes():
    result = labs.check("7.5", unfinished)
    assert not result.passed
    assert result.message == (
        "✗ 7.5 failed: not done yet: unfinished still raises NotImplementedError. Replace that line with "
        "your code and run the cell again."
    )
