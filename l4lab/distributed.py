"""Expert parallelism: the routed experts of every MoE layer spread over N processes.

Scout holds 16 routed experts per layer, Maverick 128: together 97% of Maverick's 400B parameters. No
device holds them all, so each of N ranks keeps ``num_experts / N`` experts of every MoE layer and the
TOKENS travel instead: to the rank that holds their expert and back. One MoE layer on rank r::

    x [T, D] (this rank's tokens)
      1. route locally                       experts, scores [T, k]        (the router is replicated)
      2. exchange counts                     how many slots each rank sends to each of my experts
         all-to-all the tokens               payload [slots for me, D + 1] (the score travels along)
      3. run the local experts               the same routed_experts op as the single-process model
      4. all-to-all the results back         [T * k, D] in the order this rank sent them
         combine                             undo the sort by expert, sum the k choices, add the shared expert

Everything else (embedding, attention, norms, router, shared expert, head) is replicated: each rank
runs it on its own rows of the batch, and their gradients are summed over the ranks after backward.

Built on PyTorch's own distributed engine: process groups (gloo on the CPU, NCCL on GPUs, chosen by
:func:`default_backend`), ``all_to_all_single`` with autograd (``torch.distributed.nn.functional``) for
the tokens, so that the backward pass sends the gradients the same way back, and ``torchrun`` (or
:func:`spawn` in tests and notebooks) to start the processes.

Training (:class:`ExpertParallelTrainer`) splits each global batch into N equal row blocks and makes
every rank's loss its SHARE of the global loss (``sum of its token losses / tokens of the global
batch``): summed over the ranks the gradients are exactly those of the single-process step, and the
router's balancing (aux-free bias, Switch loss) reads the load of the global batch.

With ``data_parallel = D`` the ranks form a 2-D DeviceMesh (D replicas x N / D expert-parallel ranks) and
FSDP2 (``fully_shard``) shards every parameter but the experts over all of them.

Checkpoints: :meth:`ExpertParallelTrainer.save` gathers the single-process checkpoint (any N, or one
process, resumes it); :func:`save_sharded` / :func:`load_sharded` use ``torch.distributed.checkpoint``
so that no rank ever holds every expert, and resume under another N; :func:`export_pretrained` writes the
checkpoint that ``load_pretrained`` and transformers read; :func:`load_pretrained_expert_parallel` reads
a published checkpoint's shards, each rank only its experts' rows. :func:`trace_expert_parallel`
records what travels where (notebook 10).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from safetensors import safe_open
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.nn import functional as autograd_collectives
from torch.distributed.tensor import DTensor, Shard

from l4lab.config import Config
from l4lab.data import TokenDataset
from l4lab.model import Llama4, MoE, RoutingRecord
from l4lab.ops import EAGER, Ops
from l4lab.storage import SafetensorsFile, atomic_write_text, read_json, save_safetensors
from l4lab.train import TrainConfig, Trainer, backward_at, with_balance_terms

BACKENDS = ("gloo", "nccl")


# ---------------------------------------------------------------------- process groups
def default_backend() -> str:
    """``"nccl"`` where CUDA GPUs and NCCL are, else ``"gloo"`` (the CPU: tests, laptops, classrooms)."""
    if torch.cuda.is_available() and dist.is_nccl_available():
        return "nccl"
    return "gloo"


def check_backend(backend: str) -> str:
    """``backend`` if this machine can run it; otherwise a ValueError naming what it can run."""
    available = [name for name in BACKENDS if getattr(dist, f"is_{name}_available")()]
    if backend == "nccl" and not torch.cuda.is_available():
        available = [name for name in available if name != "nccl"]
    if backend not in available:
        raise ValueError(
            f"the {backend!r} backend is not available here (this machine can run {available}); "
            f"pass backend=None to choose {default_backend()!r} automatically"
        )
    return backend


def init_process_group(backend: str | None = None, world_size: int | None = None) -> dist.ProcessGroup:
    """Join the process group that ``torchrun`` (or :func:`spawn`) set up in the environment.

    ``backend``: None chooses :func:`default_backend`. ``world_size``: the number of processes the
    caller expects (``--expert-parallel N``); a launch with another number is refused. Returns the
    group of all ranks (on GPUs each rank uses the device ``LOCAL_RANK``).
    """
    launched = os.environ.get("WORLD_SIZE")
    if launched is None:
        raise RuntimeError(
            "no distributed launch found (WORLD_SIZE is not set): start the processes with "
            "torchrun --standalone --nproc-per-node N -m l4lab ..., or l4lab.distributed.spawn"
        )
    if world_size is not None and int(launched) != world_size:
        raise ValueError(
            f"expert parallelism over {world_size} ranks was asked for, but {launched} processes were "
            f"launched: use torchrun --nproc-per-node {world_size}"
        )
    backend = check_backend(backend or default_backend())
    if not dist.is_initialized():
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return dist.group.WORLD


def check_divisible(num_experts: int, world_size: int) -> int:
    """Experts per rank, ``num_experts / world_size``; a ValueError when it is not a whole number."""
    if num_experts % world_size:
        divisors = [n for n in range(1, num_experts + 1) if num_experts % n == 0]
        raise ValueError(
            f"num_experts = {num_experts} cannot be split over {world_size} ranks: each rank must hold "
            f"the same number of experts, so use a number of processes among {divisors}"
        )
    return num_experts // world_size


# ---------------------------------------------------------------------- the expert-parallel layer
def all_to_all(
    rows: Tensor, receive_splits: list[int], send_splits: list[int], group: dist.ProcessGroup
) -> Tensor:
    """Send ``rows`` [sum(send_splits), ...] in blocks, block i to rank i; receive block j from rank j.

    ``torch.distributed.nn.functional.all_to_all_single``: differentiable, its backward is the same
    exchange with the splits swapped (the gradients go back to where the rows came from). PyTorch 2.13
    marks it deprecated in favour of the private ``_functional_collectives``; it is the public one.
    """
    received = rows.new_empty(sum(receive_splits), *rows.shape[1:])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed.nn.functional.all_to_all_single", FutureWarning)
        return autograd_collectives.all_to_all_single(
            received, rows, receive_splits, send_splits, group=group
        )


class ExpertParallelExperts(nn.Module):
    """This rank's share of one MoE layer's routed experts, and the all-to-alls that reach the others.

    Holds experts ``first .. first + num_local - 1`` of ``num_experts``: ``gate_up_proj``
    [num_local, D, 2I] and ``down_proj`` [num_local, I, D] (the rows of the full tensors; rank r holds
    block r). Called like :class:`l4lab.model.Experts`, with THIS rank's tokens and their GLOBAL expert
    ids, and returns what the single-process layer returns for them.
    """

    def __init__(self, full: nn.Module, group: dist.ProcessGroup) -> None:
        super().__init__()
        self.group = group
        self.world_size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.num_experts = full.gate_up_proj.shape[0]
        self.num_local = check_divisible(self.num_experts, self.world_size)
        self.first = self.rank * self.num_local
        mine = slice(self.first, self.first + self.num_local)
        self.gate_up_proj = nn.Parameter(full.gate_up_proj.detach()[mine].clone())
        self.down_proj = nn.Parameter(full.down_proj.detach()[mine].clone())
        self.ops: Ops = getattr(full, "ops", EAGER)
        self.last_counts: Tensor | None = None  # [N, num_local]: slots each rank sent to my experts
        # when a list: each forward appends (seconds in the all-to-alls, seconds in the local experts)
        self.timings: list[tuple[float, float]] | None = None

    def forward(self, x: Tensor, experts: Tensor, scores: Tensor, shared: Tensor | None = None) -> Tensor:
        """Tokens x [T, D] through their chosen experts wherever they live, plus ``shared`` [T, D]."""
        num_tokens, top_k = experts.shape
        ranks, local = self.world_size, self.num_local

        # 1. slots (token, choice) sorted by expert: experts are numbered rank by rank, so this also
        #    lines them up by the rank that holds them
        slots = experts.reshape(-1)
        order = torch.argsort(slots, stable=True)
        sent_per_expert = torch.bincount(slots, minlength=self.num_experts)  # [E]

        # 2. counts first (each rank must know how many rows will arrive from whom), then the tokens
        started = time.perf_counter()
        received_per_expert = torch.empty_like(sent_per_expert)
        dist.all_to_all_single(received_per_expert, sent_per_expert, group=self.group)
        received_per_expert = received_per_expert.view(ranks, local)  # [source rank, my expert]
        self.last_counts = received_per_expert.detach()
        send_splits = sent_per_expert.view(ranks, local).sum(1).tolist()
        receive_splits = received_per_expert.sum(1).tolist()
        payload = torch.cat([x.index_select(0, order // top_k), scores.reshape(-1, 1)[order]], dim=1)
        arrived = all_to_all(payload, receive_splits, send_splits, self.group)
        tokens, token_scores = arrived[:, :-1], arrived[:, -1:]
        exchanged = time.perf_counter()

        # 3. the local experts: rows arrive by source rank, then by expert within each block
        local_ids = torch.arange(local, device=x.device).repeat(ranks)
        local_ids = local_ids.repeat_interleave(received_per_expert.reshape(-1))
        if tokens.shape[0]:
            results = self.ops.routed_experts(
                tokens, local_ids[:, None], token_scores, self.gate_up_proj, self.down_proj
            )
        else:  # no rank sent this rank a token; it still takes part in both all-to-alls
            results = tokens * 0

        # 4. back to the ranks the rows came from, then each slot back to its token
        computed = time.perf_counter()
        returned = all_to_all(results, send_splits, receive_splits, self.group)
        if self.timings is not None:
            self.timings.append(
                ((exchanged - started) + (time.perf_counter() - computed), computed - exchanged)
            )
        per_slot = returned.index_select(0, torch.argsort(order))  # the combine permutation
        out = per_slot if top_k == 1 else per_slot.view(num_tokens, top_k, -1).sum(dim=1)
        return out if shared is None else out + shared


def moe_layers(model: Llama4) -> list[MoE]:
    """The model's MoE feed-forwards, in layer order."""
    return [layer.feed_forward for layer in model.layers if isinstance(layer.feed_forward, MoE)]


def shard_experts(model: Llama4, group: dist.ProcessGroup | None = None) -> Llama4:
    """Keep only this rank's experts in every MoE layer of ``model`` (in place) and return it.

    Every rank must hold the same full model first (same seed, or the same checkpoint). Raises a
    ValueError when the experts do not split evenly over the group.
    """
    group = group or dist.group.WORLD
    check_divisible(model.config.num_experts, dist.get_world_size(group))
    for moe in moe_layers(model):
        if not isinstance(moe.experts, ExpertParallelExperts):
            moe.experts = ExpertParallelExperts(moe.experts, group)
    return model


def is_expert_parameter(name: str) -> bool:
    """Whether a parameter name is one of the routed experts' (sharded under expert parallelism)."""
    return ".experts." in name


def gather_experts(local: Tensor, group: dist.ProcessGroup) -> Tensor:
    """Every rank's block of an expert tensor, concatenated in rank order: the full [E, ...] tensor."""
    blocks = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(blocks, local.contiguous(), group=group)
    return torch.cat(blocks)


def full_state_dict(model: Llama4) -> dict[str, Tensor]:
    """The single-process model's state dict, gathered from the ranks (a collective: every rank calls it)."""
    experts = {
        name: module for name, module in model.named_modules() if isinstance(module, ExpertParallelExperts)
    }
    state = {}
    for name, tensor in model.state_dict().items():
        owner = name.rpartition(".")[0]
        if isinstance(tensor, DTensor):  # sharded by FSDP2
            state[name] = tensor.full_tensor().detach()
        elif owner in experts:
            state[name] = gather_experts(tensor, experts[owner].group)
        else:
            state[name] = tensor.detach()
    return state


def full_model(model: Llama4) -> Llama4:
    """A single-process :class:`Llama4` with every expert, on every rank (a collective)."""
    whole = Llama4(model.config).to(model.dtype)
    whole.load_state_dict(full_state_dict(model))
    return whole


# ---------------------------------------------------------------------- training
def _sum_over_ranks(tensor: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """``tensor`` summed in place over ``group`` (default: all ranks), and returned."""
    dist.all_reduce(tensor, group=group)
    return tensor


def shard_replicated(model: Llama4, mesh: DeviceMesh) -> Llama4:
    """FSDP2 on every parameter but the routed experts: each decoder layer, then the rest, sharded over
    ``mesh``; their gradients are SUMMED over the ranks (each rank's loss is its share of the global
    loss), with sum-only collectives (gloo has no pre-multiplied sum)."""
    from torch.distributed.fsdp import fully_shard  # seconds to import: only for FSDP2 runs

    experts = {p for name, p in model.named_parameters() if is_expert_parameter(name)}
    for module in [*model.layers, model]:
        fully_shard(module, mesh=mesh, ignored_params=experts)
        module.set_gradient_divide_factor(1.0)
        module.set_force_sum_reduction_for_comms(True)
    return model


class ExpertParallelTrainer(Trainer):
    """:class:`l4lab.train.Trainer` over all the launched ranks: the same steps as one process would take.

    Each rank draws the same global batch (same sampler, same seed), keeps its block of
    ``batch_size / world_size`` rows and computes its share of every loss term. After backward the
    replicated parameters' gradients are summed over the ranks (each rank's experts already received
    the gradients of every token they processed, through the all-to-alls); the gradient norm for
    clipping is the global one; the aux-free bias steps use the load of the global batch, so every
    rank's biases stay equal. Build one from a single-process trainer with :meth:`from_trainer`.

    With ``data_parallel = D > 1`` the ranks form a 2-D DeviceMesh of D data-parallel replicas x
    ``world_size / D`` expert-parallel ranks: the experts are split over the expert-parallel dimension
    (and their gradients summed over the D replicas), while FSDP2 (``fully_shard``) shards every other
    parameter over all the ranks and sums their gradients with its reduce-scatter.
    """

    group: dist.ProcessGroup  # the expert-parallel ranks (all of them without data parallelism)
    data_group: dist.ProcessGroup | None  # the data-parallel replicas of this rank's experts
    fsdp: bool

    @classmethod
    def from_trainer(cls, trainer: Trainer, data_parallel: int = 1) -> ExpertParallelTrainer:
        """Shard ``trainer``'s model and optimiser moments over the ranks; keep its step, history, sampler.

        ``trainer`` is the same on every rank (built with the same seed, or resumed from the same
        checkpoint), so a fresh run and a resumed one start exactly where one process would.
        ``data_parallel``: see the class; FSDP2 runs start from a trainer that has not stepped yet.
        """
        world = dist.get_world_size()
        if data_parallel < 1 or world % data_parallel:
            raise ValueError(
                f"data_parallel = {data_parallel} does not divide the {world} ranks into replicas: use one "
                f"of {[d for d in range(1, world + 1) if world % d == 0]}"
            )
        check_divisible(trainer.model.config.num_experts, world // data_parallel)
        if trainer.config.batch_size % world:
            raise ValueError(
                f"batch_size = {trainer.config.batch_size} cannot be split into {world} equal blocks of "
                f"rows: use a multiple of {world}"
            )
        if data_parallel > 1 and trainer.optimizer.state:
            raise ValueError(
                "FSDP2 (data_parallel > 1) starts from a trainer that has not stepped yet; resume a run "
                "under expert parallelism alone (data_parallel = 1)"
            )
        group, data_group = dist.group.WORLD, None
        if data_parallel > 1:
            device = "cuda" if dist.get_backend() == "nccl" else "cpu"
            mesh = init_device_mesh(
                device, (data_parallel, world // data_parallel), mesh_dim_names=("dp", "ep")
            )
            group, data_group = mesh.get_group("ep"), mesh.get_group("dp")
        moments = {name: trainer.optimizer.state.get(p, {}) for name, p in trainer.model.named_parameters()}
        model = shard_experts(trainer.model, group)
        if data_parallel > 1:
            shard_replicated(model, device_mesh(dist.group.WORLD))
        sharded = cls(model, trainer.train_data, trainer.val_data, trainer.config)
        sharded.group, sharded.data_group, sharded.fsdp = group, data_group, data_parallel > 1
        for name, param in model.named_parameters():
            state = moments[name]
            if state and is_expert_parameter(name):
                first = dist.get_rank(group) * param.shape[0]
                state = {
                    key: value[first : first + param.shape[0]].clone() if value.dim() else value
                    for key, value in state.items()
                }
            if state:
                sharded.optimizer.state[param] = state
        sharded.step_count, sharded.history = trainer.step_count, trainer.history
        sharded.sampler.load_state(trainer.sampler.state())
        return sharded

    @property
    def rank(self) -> int:
        """This process's rank among all the ranks."""
        return dist.get_rank()

    @property
    def world_size(self) -> int:
        """The number of ranks, which split each global batch between them."""
        return dist.get_world_size()

    def my_rows(self, batch: TokenDataset) -> TokenDataset:
        """This rank's block of the global batch's rows."""
        rows = len(batch) // self.world_size
        return batch.rows(slice(self.rank * rows, (self.rank + 1) * rows))

    def loss_shares(self, batch: TokenDataset) -> tuple[Tensor, Tensor, Tensor, list[RoutingRecord]]:
        """(language-model, Switch, z-loss) shares of this rank, and its routing records.

        A share is this rank's sum of a term divided by the count over the GLOBAL batch, so the shares
        sum over ranks to the single-process term (masked tokens counted over the global batch too).
        """
        mine = self.my_rows(batch)
        out = self.model(mine.tokens[:, :-1])
        logits = out.logits
        losses = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), mine.tokens[:, 1:].reshape(-1), reduction="none"
        )
        if mine.loss_mask is None:
            weight = torch.tensor(float(losses.numel()))
        else:
            mask = mine.loss_mask[:, 1:].reshape(-1).to(losses.dtype)
            losses, weight = losses * mask, mask.sum().detach().cpu()
        weight = _sum_over_ranks(weight.to(logits.device)).clamp(min=1.0)
        lm_share = losses.sum() / weight
        zero = logits.new_zeros(())
        if not out.routing:
            return lm_share, zero, zero, out.routing
        tokens = float(losses.numel() * self.world_size)
        switch_terms, z_terms = [], []
        for record in out.routing:
            num_experts = record.router_logits.shape[-1]
            load = self.global_load(record, num_experts)
            probability = torch.softmax(record.router_logits.float(), dim=-1).reshape(-1, num_experts).sum(0)
            switch_terms.append(num_experts * (load * probability / tokens).sum())
            z_terms.append(torch.logsumexp(record.router_logits.float(), dim=-1).pow(2).sum() / tokens)
        return lm_share, torch.stack(switch_terms).mean(), torch.stack(z_terms).mean(), out.routing

    def global_load(self, record: RoutingRecord, num_experts: int) -> Tensor:
        """The fraction of the GLOBAL batch's slots routed to each expert [E] (a collective)."""
        counts = torch.bincount(record.experts.reshape(-1), minlength=num_experts).to(torch.float64)
        counts = _sum_over_ranks(counts)
        return (counts / counts.sum().clamp_min(1)).float()

    def synchronise_gradients(self) -> None:
        """Sum the gradients over the ranks that computed parts of them; zeros for unused experts.

        Replicated parameters: summed over all ranks (FSDP2's reduce-scatter does it for sharded ones).
        Experts: already complete within the expert-parallel group; summed over the data-parallel
        replicas. An expert that no token of the batch chose has a zero gradient in the single-process
        model (and AdamW still decays it); here its rank saw no row for it, so the zero is put in.
        """
        for name, param in self.model.named_parameters():
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            if is_expert_parameter(name):
                if self.data_group is not None:
                    _sum_over_ranks(param.grad, self.data_group)
            elif not isinstance(param.grad, DTensor):
                _sum_over_ranks(param.grad)

    def clip_gradients(self) -> Tensor:
        """Clip to ``grad_clip`` by the norm of ALL the gradients: every rank's experts and shards too."""
        whole, sharded, experts = [torch.zeros(())], [torch.zeros(())], [torch.zeros(())]
        for name, param in self.model.named_parameters():
            grad = param.grad
            if isinstance(grad, DTensor):  # this rank's FSDP2 shard
                sharded.append(grad.to_local().float().pow(2).sum().cpu())
            else:
                (experts if is_expert_parameter(name) else whole).append(grad.float().pow(2).sum().cpu())
        squares = (
            torch.stack(whole).sum()
            + _sum_over_ranks(torch.stack(sharded).sum())
            + _sum_over_ranks(torch.stack(experts).sum(), self.group)
        )
        norm = squares.sqrt()
        scale = torch.clamp(self.config.grad_clip / (norm + 1e-6), max=1.0)  # as clip_grad_norm_
        for param in self.model.parameters():
            param.grad.mul_(scale.to(param.grad.device))
        return norm

    def step(self) -> dict[str, float]:
        """One optimisation step of the global batch; every rank returns the same metrics."""
        config = self.config
        self.model.train()
        batch = self.sampler.next()
        lm_share, switch_share, z_share, routing = self.loss_shares(batch)
        loss = with_balance_terms(lm_share, switch_share, z_share, config)
        lr = backward_at(self.step_count, loss, self.optimizer, config)
        self.synchronise_gradients()
        grad_norm = self.clip_gradients()
        self.optimizer.step()
        if config.balance == "aux_free":
            for record in routing:
                router = self.model.layers[record.layer].feed_forward.router
                load = self.global_load(record, router.selection_bias.numel())
                # routing.update_selection_bias's step, on the load of the global batch
                router.selection_bias.add_(config.bias_rate * torch.sign(load.mean() - load))

        terms = torch.stack([lm_share, switch_share, z_share]).detach().double()
        lm_loss, switch, z_loss = _sum_over_ranks(terms).tolist()
        self.step_count += 1
        metrics = {
            "step": self.step_count,
            "loss": lm_loss,
            "switch_loss": switch,
            "z_loss": z_loss,
            "lr": lr,
            "grad_norm": float(grad_norm),
        }
        if self.step_count % config.eval_every == 0 or self.step_count == config.steps:
            val = self.evaluate()
            if val is not None:
                metrics["val_loss"] = val
        self.history.append(metrics)
        return metrics

    # evaluate(): inherited. Every rank runs the same validation rows (the all-to-alls need every rank
    # in every forward), so each computes the single-process value; validation is small.

    def agree(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any (a stop asked on one rank stops them all
        after the same step)."""
        value = torch.tensor([1.0 if flag else 0.0])
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def checkpoint_tensors(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The single-process checkpoint's tensors, gathered from the ranks (a collective)."""
        model_state = full_state_dict(self.model)
        moments: dict[str, Tensor] = {}
        for name, param in self.model.named_parameters():
            for key, value in self.optimizer.state.get(param, {}).items():
                if isinstance(value, DTensor):
                    value = value.full_tensor()
                elif is_expert_parameter(name) and value.dim():
                    value = gather_experts(value, self.group)
                moments[f"{name}.{key}"] = value.detach().reshape(-1).clone()
        return model_state, moments

    def save(self, path: str | Path, metadata: dict[str, Any] | None = None) -> None:
        """The single-process checkpoint (``Trainer.resume`` reads it under any N), written by rank 0."""
        tensors = self.checkpoint_tensors()
        if self.rank == 0:
            self.write_checkpoint(path, *tensors, metadata=metadata)
        dist.barrier()


# ---------------------------------------------------------------------- watching it
def trace_expert_parallel(
    config: dict[str, Any], seed: int, rows: int, length: int, biases: list[list[Tensor]], repeats: int = 3
) -> dict[str, Tensor]:
    """Run on every rank of a group (e.g. ``spawn(trace_expert_parallel, 4, ...)``): what travels where.

    Builds ``Llama4(Config(**config))`` under ``seed`` on every rank, keeps this rank's experts, and
    for each entry of ``biases`` (one selection-bias vector per MoE layer; e.g. none, then balanced)
    runs this rank's block of ``rows`` random sequences of ``length`` tokens through it ``repeats``
    times, without gradients. Returns for each setting ``i``:

    * ``received.i`` [layers, N]: slots this rank received from each rank, per MoE layer (a column of
      the rank-to-rank traffic matrix);
    * ``exchange_s.i`` and ``experts_s.i`` [layers]: median seconds in the all-to-alls (waiting for
      the slowest rank included) and in this rank's experts.
    """
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    model = shard_experts(Llama4(Config(**config))).eval()
    ranks, rank = dist.get_world_size(), dist.get_rank()
    generator = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, model.config.vocab_size, (rows, length), generator=generator)
    mine = ids[rank * rows // ranks : (rank + 1) * rows // ranks]
    layers = moe_layers(model)
    result: dict[str, Tensor] = {}
    for i, setting in enumerate(biases):
        with torch.no_grad():
            for moe, bias in zip(layers, setting, strict=True):
                moe.router.selection_bias.copy_(bias)
                moe.experts.timings = []
            for _ in range(repeats):
                dist.barrier()
                model(mine)
        result[f"received.{i}"] = torch.stack([moe.experts.last_counts.sum(1) for moe in layers])
        timings = torch.tensor([moe.experts.timings for moe in layers])  # [layers, repeats, 2]
        result[f"exchange_s.{i}"], result[f"experts_s.{i}"] = timings.median(dim=1).values.unbind(-1)
    return result


# ---------------------------------------------------------------------- sharded checkpoints
CHECKPOINT_POINTER = "latest.json"  # names the step directory of the last complete sharded save
SHARDED_FORMAT = 1


def device_mesh(group: dist.ProcessGroup) -> DeviceMesh:
    """The 1-D DeviceMesh of ``group``'s ranks, on the devices its backend runs on."""
    device = "cuda" if dist.get_backend(group) == "nccl" else "cpu"
    return DeviceMesh.from_group(group, device)


def sharded_state_dict(trainer: ExpertParallelTrainer, moments: bool = True) -> dict[str, Tensor]:
    """What a sharded checkpoint holds: weights, router biases and (``moments``) AdamW's moments.

    Tensors of the routed experts are DTensors sharded on dim 0 over the ranks (each rank contributes
    only its experts); the others are plain tensors, the same on every rank (saved once). The DTensors
    share memory with the parameters and moments, so loading into this dict loads the trainer. Moments
    not created yet (before the first step) are created as zeros.
    """
    mesh = device_mesh(trainer.group)

    def placed(name: str, tensor: Tensor) -> Tensor:
        if is_expert_parameter(name) and tensor.dim():
            return DTensor.from_local(tensor, mesh, [Shard(0)], run_check=False)
        return tensor

    state = {f"model.{name}": placed(name, t.detach()) for name, t in trainer.model.state_dict().items()}
    if moments:
        for name, param in trainer.model.named_parameters():
            entry = trainer.optimizer.state[param]
            if not entry:
                entry.update(
                    step=torch.zeros((), dtype=torch.float32),
                    exp_avg=torch.zeros_like(param, memory_format=torch.preserve_format),
                    exp_avg_sq=torch.zeros_like(param, memory_format=torch.preserve_format),
                )
            for key, value in entry.items():
                state[f"optimizer.{name}.{key}"] = placed(name, value)
    return state


def save_sharded(
    trainer: ExpertParallelTrainer, path: str | Path, metadata: dict[str, Any] | None = None
) -> Path:
    """Save the run with ``torch.distributed.checkpoint``, every rank writing only its own tensors.

    ``path/step-<k>/`` gets one safetensors file per rank (DCP's Hugging Face writer: no pickle; each
    file's metadata records where its slices sit in the full tensors) and ``state.json`` (configs, step,
    history, sampler, the world size); then rank 0 replaces ``path/latest.json`` (one atomic rename)
    to name it, and removes older step directories. A save that is killed leaves the previous one
    named. :func:`load_sharded` reads it back under any number of ranks that divides the experts.
    """
    if trainer.fsdp:
        raise ValueError(
            "save_sharded saves expert parallelism alone; under FSDP2 (data_parallel > 1) save the "
            "gathered checkpoint with trainer.save"
        )
    path = Path(path)
    step_dir = path / f"step-{trainer.step_count:06d}"
    state = {
        "format": SHARDED_FORMAT,
        "model_config": trainer.model.config.to_dict(),
        "train_config": asdict(trainer.config),
        "step": trainer.step_count,
        "history": trainer.history,
        "sampler": trainer.sampler.state(),
        "world_size": trainer.world_size,
        "metadata": metadata,
    }
    from torch.distributed import checkpoint as dcp  # seconds to import: only when saving or loading

    tensors = sharded_state_dict(trainer, moments=trainer.step_count > 0)
    dcp.save(
        tensors,
        storage_writer=dcp.HuggingFaceStorageWriter(str(step_dir), save_distributed=True),
    )
    dist.barrier()
    if trainer.rank == 0:
        atomic_write_text(step_dir / "state.json", json.dumps(state, indent=1) + "\n")
        atomic_write_text(path / CHECKPOINT_POINTER, json.dumps({"step_dir": step_dir.name}) + "\n")
        for old in path.glob("step-*"):
            if old.is_dir() and old.name != step_dir.name:
                shutil.rmtree(old)
    dist.barrier()
    return step_dir


def load_sharded(
    path: str | Path,
    train_data: TokenDataset,
    val_data: TokenDataset | None = None,
) -> ExpertParallelTrainer:
    """The trainer saved by :func:`save_sharded`, on the launched ranks (their number may differ).

    Each rank reads only the slices of the files that its experts and the replicated tensors need.
    A number of ranks that does not divide the experts (or the batch) is a ValueError naming the
    numbers that work; a missing or foreign directory a FileNotFoundError or ValueError naming it.
    """
    path = Path(path)
    pointer = path / CHECKPOINT_POINTER
    if not pointer.is_file():
        raise FileNotFoundError(
            f"{pointer} does not exist: {path} holds no sharded checkpoint (save_sharded)"
        )
    step_dir = path / read_json(pointer)["step_dir"]
    state = read_json(step_dir / "state.json")
    if not isinstance(state, dict) or state.get("format") != SHARDED_FORMAT:
        raise ValueError(f"{step_dir / 'state.json'} is not the state of an l4lab sharded checkpoint")
    model = Llama4(Config.from_dict(state["model_config"]))
    trainer = Trainer(model, train_data, val_data, TrainConfig(**state["train_config"]))
    try:
        sharded = ExpertParallelTrainer.from_trainer(trainer)
    except ValueError as error:
        raise ValueError(f"{step_dir} was saved by {state['world_size']} ranks; here: {error}") from None
    from torch.distributed import checkpoint as dcp  # seconds to import: only when saving or loading

    tensors = sharded_state_dict(sharded, moments=state["step"] > 0)
    dcp.load(tensors, storage_reader=dcp.HuggingFaceStorageReader(str(step_dir)))
    if state["step"] == 0:
        sharded.optimizer.state.clear()
    sharded.step_count, sharded.history = state["step"], state["history"]
    sharded.sampler.load_state(state["sampler"])
    return sharded


def export_pretrained(model: Llama4, path: str | Path) -> None:
    """Gather the experts and write the single-directory checkpoint that ``load_pretrained`` and
    transformers read (``Llama4.save_pretrained``), from rank 0; every rank calls it."""
    whole = full_model(model)
    if dist.get_rank() == 0:
        whole.save_pretrained(path)
    dist.barrier()


# ---------------------------------------------------------------------- published checkpoints under EP
@dataclass
class ShardedRead:
    """What one rank read from a checkpoint's safetensors shards: bytes of tensor data by kind, files."""

    rank: int
    expert_bytes: int = 0
    other_bytes: int = 0
    files: int = 0

    @property
    def total_bytes(self) -> int:
        return self.expert_bytes + self.other_bytes


def load_pretrained_expert_parallel(
    path: str | Path, dtype: torch.dtype | None = None
) -> tuple[Llama4, ShardedRead]:
    """This rank's part of a checkpoint directory (config.json + safetensors shards), read lazily.

    Every rank builds the model on the meta device (no memory), keeps its experts only, then reads
    from the shards the replicated tensors in full and, of each expert tensor, only the rows of its own
    experts (``safe_open(...).get_slice(key)[first:last]``: safetensors maps the file and copies just
    those bytes). No rank ever holds all the experts, so a checkpoint larger than one device's memory
    loads on N of them. Returns the model and what this rank read. The same directories as
    ``l4lab.load_pretrained`` (l4lab's or transformers'; vision weights skipped); l4lab's checksums
    cover whole tensors and are not checked on slices.
    """
    from l4lab.interop import CONFIG_NAME, _read_config, _weight_files, l4lab_key

    path = Path(path)
    if not (path / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {path}: not a checkpoint directory")
    files, _ = _weight_files(path)
    config, declared, _multimodal, layout = _read_config(path, path / CONFIG_NAME, False, None)
    if layout != "llama4":
        raise ValueError(
            f"{path} holds a {layout!r} checkpoint; expert parallelism loads Llama 4 checkpoints (use "
            "l4lab.load_pretrained for the others)"
        )
    with torch.device("meta"):
        model = shard_experts(Llama4(config))
    expected = dict(model.named_parameters())
    read = ShardedRead(rank=dist.get_rank())
    loaded: dict[str, Tensor] = {}
    for shard, _keys in files:
        with safe_open(str(shard), framework="pt") as f:
            read.files += 1
            for key in f.keys():  # noqa: SIM118 (not a mapping)
                name = l4lab_key(key)
                if name is None or name.startswith("rotary_emb.") or name not in expected:
                    continue
                if is_expert_parameter(name):
                    local = expected[name].shape[0]
                    first = dist.get_rank(model.layers[0].feed_forward.experts.group) * local
                    tensor = f.get_slice(key)[first : first + local]
                    read.expert_bytes += tensor.numel() * tensor.element_size()
                else:
                    tensor = f.get_tensor(key)
                    read.other_bytes += tensor.numel() * tensor.element_size()
                loaded[name] = tensor if dtype is None else tensor.to(dtype)
    missing = sorted(set(expected) - set(loaded))
    wrong = [n for n, t in loaded.items() if t.shape != expected[n].shape]
    if missing or wrong:
        raise ValueError(
            f"weights in {path} do not fit the model: missing {missing[:4]}, mis-shaped {wrong[:4]}"
        )
    model.to_empty(device="cpu")
    with torch.no_grad():
        for buffer in model.buffers():  # the routers' selection biases: not in checkpoints, zero
            buffer.zero_()
    model.load_state_dict(loaded, strict=False)  # every parameter is there (checked above)
    model.to(dtype or declared or next(iter(loaded.values())).dtype)
    return model, read


# ---------------------------------------------------------------------- launching processes
def free_port() -> int:
    """A TCP port on localhost that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawned(
    rank: int, world_size: int, port: int, out: str, fn: Callable[..., dict[str, Tensor] | None], args: tuple
) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        GLOO_SOCKET_IFNAME=os.environ.get("GLOO_SOCKET_IFNAME", "lo"),
    )
    torch.set_num_threads(1)
    init_process_group("gloo", world_size)
    try:
        result = fn(*args)
        if result is not None:
            save_safetensors(
                {k: v.detach().contiguous() for k, v in result.items()}, Path(out) / f"{rank}.st"
            )
        dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn(
    fn: Callable[..., dict[str, Tensor] | None],
    world_size: int,
    *args: Any,
    timeout_s: float = 300.0,
) -> list[dict[str, Tensor]]:
    """Run ``fn(*args)`` on ``world_size`` local processes in one gloo group; return each rank's tensors.

    ``fn`` must be importable (a module-level function); inside it the process group is initialised
    (``dist.get_rank()`` says which rank it is) and it may return a dict of tensors, handed back here in
    rank order. The processes listen on localhost only, each on one thread. Every one of them is ended
    before this returns: after ``timeout_s`` seconds, or as soon as one fails, the others are killed and
    a RuntimeError says which.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be a positive number of processes; got {world_size}")
    with tempfile.TemporaryDirectory(prefix="l4lab-spawn-") as out:
        context = mp.start_processes(
            _spawned,
            args=(world_size, free_port(), out, fn, args),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout_s
        try:
            while not context.join(timeout=max(0.0, min(1.0, deadline - time.monotonic()))):
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{world_size} processes running {fn.__name__} took over {timeout_s:.0f} s"
                    )
        except mp.ProcessRaisedException as error:
            raise RuntimeError(f"a rank running {fn.__name__} failed:\n{error}") from None
        except mp.ProcessExitedException as error:
            raise RuntimeError(f"a rank running {fn.__name__} died: {error}") from None
        finally:
            _end(context.processes)
        results = []
        for rank in range(world_size):
            path = Path(out) / f"{rank}.st"
            if not path.exists():
                results.append({})
                continue
            with SafetensorsFile(path) as file:
                results.append({key: file.get(key) for key in file.keys()})  # noqa: SIM118
        return results


def _end(processes: list[Any]) -> None:
    """Kill every process still alive and wait for it: nothing is left behind."""
    for process in processes:
        if process.is_alive():
            process.kill()
    for process in processes:
        process.join(timeout=30)


__all__ = [
    "BACKENDS",
    "ExpertParallelExperts",
    "ExpertParallelTrainer",
    "ShardedRead",
    "check_backend",
    "check_divisible",
    "default_backend",
    "device_mesh",
    "export_pretrained",
    "free_port",
    "full_model",
    "full_state_dict",
    "gather_experts",
    "init_process_group",
    "is_expert_parameter",
    "load_pretrained_expert_parallel",
    "load_sharded",
    "moe_layers",
    "save_sharded",
    "shard_experts",
    "shard_replicated",
    "sharded_state_dict",
    "spawn",
    "trace_expert_parallel",
]
