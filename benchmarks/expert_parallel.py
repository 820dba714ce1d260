"""Expert parallelism on this machine: training tokens/s on 1, 2 and 4 processes at equal global batch.

    PYTHONPATH=$PWD python benchmarks/expert_parallel.py            # prints the table
    PYTHONPATH=$PWD python benchmarks/expert_parallel.py --write    # and writes benchmarks/results/

Each process runs one thread (gloo on the CPU; NCCL when each process has a GPU of its own). One step is
``ExpertParallelTrainer.step``: the global batch split over the ranks, forward with the all-to-alls,
backward, gradients summed, AdamW; 1 process is the plain ``Trainer.step`` on the whole batch. The
peer is the single process, measured in the same run. Communication is the time spent inside
torch.distributed's collectives (all-to-all of counts and tokens, forward and backward; all-reduce of
gradients and counts): it includes WAITING for the slowest rank, which is where load imbalance shows.

On a CPU the processes share the machine's cores and memory bandwidth, so more processes do not add
compute the way more GPUs do: this measures the mechanism's overhead honestly, not a speed-up.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time
from pathlib import Path

import torch
import torch.distributed as dist

import l4lab
from l4lab.data import mixture
from l4lab.distributed import ExpertParallelTrainer, default_backend, spawn
from l4lab.train import TrainConfig, Trainer

RESULTS = Path(__file__).parent / "results" / "expert_parallel.md"
SEQ_LEN, BATCH, WARMUP, STEPS = 128, 16, 2, 6


def trainer(experts: int) -> Trainer:
    torch.manual_seed(0)
    model = l4lab.Llama4(l4lab.preset("tiny-moe", num_experts=experts))
    train = mixture(256, SEQ_LEN + 1, seed=0)
    config = TrainConfig(steps=WARMUP + STEPS, batch_size=BATCH, eval_every=10**6, warmup_steps=1)
    return Trainer(model, train, None, config)


class CollectiveClock:
    """Wraps torch.distributed's collectives so that the seconds spent inside them add up."""

    NAMES = ("all_to_all_single", "all_reduce", "all_gather")

    def __init__(self) -> None:
        self.seconds = 0.0
        self.originals = {name: getattr(dist, name) for name in self.NAMES}
        for name, original in self.originals.items():
            setattr(dist, name, self.timed(original))

    def timed(self, function):
        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - started

        return wrapper


def measure(experts: int) -> dict[str, torch.Tensor]:
    """On each rank: seconds per step and seconds in collectives per step (medians over STEPS)."""
    torch.set_num_threads(1)
    clock = CollectiveClock()
    run = ExpertParallelTrainer.from_trainer(trainer(experts))
    steps, waits = [], []
    for i in range(WARMUP + STEPS):
        dist.barrier()
        before, started = clock.seconds, time.perf_counter()
        run.step()
        if i >= WARMUP:
            steps.append(time.perf_counter() - started)
            waits.append(clock.seconds - before)
    return {"step": torch.tensor(steps).median()[None], "comm": torch.tensor(waits).median()[None]}


def single_process(experts: int) -> float:
    torch.set_num_threads(1)
    run = trainer(experts)
    times = []
    for i in range(WARMUP + STEPS):
        started = time.perf_counter()
        run.step()
        if i >= WARMUP:
            times.append(time.perf_counter() - started)
    return float(torch.tensor(times).median())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"write {RESULTS.relative_to(Path.cwd())}")
    parser.add_argument("--experts", type=int, default=8)
    args = parser.parse_args()
    tokens = BATCH * SEQ_LEN
    rows = []
    base = single_process(args.experts)
    rows.append((1, tokens / base, None, 1.0))
    for ranks in (2, 4):
        results = spawn(measure, ranks, args.experts, timeout_s=900)
        step = max(float(r["step"]) for r in results)
        comm = [float(r["comm"]) / float(r["step"]) for r in results]
        rows.append((ranks, tokens / step, comm, base / step))
    lines = [
        "# Expert parallelism on the CPU: training tokens/s at equal global batch",
        "",
        f"- {datetime.date.today()}; torch {torch.__version__}, backend {default_backend()}, "
        f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), one thread per process",
        f"- tiny-moe with {args.experts} experts (4 layers, all MoE, hidden 128), global batch {BATCH} x "
        f"{SEQ_LEN} tokens, float32; median of {STEPS} steps after {WARMUP}; a step = forward + backward + "
        "gradient sums + AdamW",
        "- communication: the share of a step spent inside torch.distributed's collectives (all-to-all, "
        "all-reduce), waiting for the slowest rank included; min-max over the ranks",
        "",
        "| processes | tokens/s | vs 1 process | communication (share of the step) |",
        "|---:|---:|---:|---:|",
    ]
    for ranks, rate, comm, ratio in rows:
        share = "-" if comm is None else f"{min(comm):.0%}-{max(comm):.0%}"
        lines.append(f"| {ranks} | {rate:,.0f} | {ratio:.2f}x | {share} |")
    lines += [
        "",
        f"On {os.cpu_count()} cores the processes share the cores and the memory bandwidth: more processes "
        "bring no more compute, so the ratio shows the cost of splitting the work and exchanging tokens, "
        "not the speed-up that more GPUs bring.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        RESULTS.write_text(text)


if __name__ == "__main__":
    main()
