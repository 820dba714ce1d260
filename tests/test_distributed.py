"""Expert parallelism on local gloo processes equals the single-process model: logits, gradients, training.

Every multi-process test runs through ``l4lab.distributed.spawn``: localhost only, one thread per
process, a time limit, and every process killed and reaped before the test returns.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors import safe_open
from torch.distributed.tensor import DTensor

import l4lab
from l4lab.claims import relative_error
from l4lab.data import TokenDataset, mixture
from l4lab.distributed import (
    ExpertParallelTrainer,
    check_backend,
    check_divisible,
    export_pretrained,
    full_state_dict,
    init_process_group,
    is_expert_parameter,
    load_pretrained_expert_parallel,
    load_sharded,
    save_sharded,
    shard_experts,
    spawn,
)
from l4lab.interop import save_pretrained
from l4lab.train import TrainConfig, Trainer, load_checkpoint_model

CONFIG = dict(
    num_layers=2,
    hidden_size=32,
    head_dim=8,
    moe_intermediate_size=24,
    num_experts=8,
    vocab_size=61,
    bos_token_id=None,
    eos_token_id=None,
)
ROWS, LENGTH = 8, 12


def skewed_model(seed: int = 0) -> l4lab.Llama4:
    """A float64 model whose routing is uneven: layer 0 sends every token to expert 1 (the seven other
    experts, and under 4 ranks three whole ranks, receive nothing), layer 1 favours experts 5 and 6."""
    torch.manual_seed(seed)
    model = l4lab.Llama4(l4lab.preset("tiny-moe", **CONFIG)).double()
    with torch.no_grad():
        model.layers[0].feed_forward.router.selection_bias[1] = 100.0
        model.layers[1].feed_forward.router.selection_bias[5:7] = 0.15
    return model


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [ROWS, LENGTH] and the weights [ROWS, LENGTH, vocab] of a loss ``sum(w * logits)``."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, CONFIG["vocab_size"], (ROWS, LENGTH), generator=generator)
    weights = torch.randn(ROWS, LENGTH, CONFIG["vocab_size"], generator=generator, dtype=torch.float64)
    return ids, weights


def expert_parallel_forward_backward() -> dict[str, torch.Tensor]:
    """On each rank: its block of rows through the sharded model; logits, counts and gradients."""
    rank, ranks = dist.get_rank(), dist.get_world_size()
    model = shard_experts(skewed_model())
    ids, weights = inputs()
    rows = slice(rank * ROWS // ranks, (rank + 1) * ROWS // ranks)
    logits = model(ids[rows]).logits
    (weights[rows] * logits).sum().backward()
    result = {"logits": logits.detach()}
    for name, param in model.named_parameters():
        grad = param.grad if param.grad is not None else torch.zeros_like(param)
        if not is_expert_parameter(name):
            dist.all_reduce(grad)  # replicated: the ranks' rows sum to the batch
        result[f"grad.{name}"] = grad
    for i, layer in enumerate(model.layers):
        result[f"received.{i}"] = layer.feed_forward.experts.last_counts
    return result


@pytest.fixture(scope="module")
def single_process() -> dict[str, torch.Tensor]:
    model = skewed_model()
    ids, weights = inputs()
    out = model(ids)
    (weights * out.logits).sum().backward()
    result = {"logits": out.logits.detach()}
    result.update({f"grad.{n}": p.grad for n, p in model.named_parameters()})
    for record in out.routing:
        result[f"experts.{record.layer}"] = record.experts
    return result


@pytest.mark.parametrize("ranks", [2, 4])
def test_logits_and_gradients_equal_the_single_process_model(single_process, ranks: int) -> None:
    results = spawn(expert_parallel_forward_backward, ranks, timeout_s=240)
    logits = torch.cat([r["logits"] for r in results])
    # float64 weights, but the norms and RoPE compute in float32: agreement to float32's precision
    assert relative_error(logits, single_process["logits"]) < 1e-6
    for key, expected in single_process.items():
        if not key.startswith("grad."):
            continue
        if is_expert_parameter(key):
            found = torch.cat([r[key] for r in results])  # rank r holds block r of the experts
        else:
            found = results[0][key]
            for other in results[1:]:
                assert torch.equal(other[key], found), f"{key} differs between ranks"
        assert relative_error(found, expected) < 1e-6, key

    # the routing really was uneven, with experts (and under 4 ranks whole ranks) left without a token
    per_expert = torch.bincount(single_process["experts.0"].reshape(-1), minlength=8)
    assert per_expert.tolist() == [0, ROWS * LENGTH, 0, 0, 0, 0, 0, 0]
    counts_1 = torch.bincount(single_process["experts.1"].reshape(-1), minlength=8)
    assert counts_1.max() > 2 * counts_1.float().mean()
    per_rank = torch.stack([r["received.0"].sum() for r in results])
    assert per_rank[0] == ROWS * LENGTH and per_rank[1:].sum() == 0
    received = torch.cat([r["received.1"].sum(0) for r in results])  # slots per expert, all sources
    assert received.tolist() == counts_1.tolist()


def test_experts_that_do_not_split_evenly_are_refused() -> None:
    assert check_divisible(16, 4) == 4
    with pytest.raises(ValueError, match=r"num_experts = 6 cannot be split over 4 ranks.*\[1, 2, 3, 6\]"):
        check_divisible(6, 4)


def test_unavailable_backend_is_named() -> None:
    if torch.cuda.is_available():
        pytest.skip("NCCL may run here")
    with pytest.raises(ValueError, match=r"the 'nccl' backend is not available here .*\['gloo'\]"):
        check_backend("nccl")
    with pytest.raises(ValueError, match=r"'mpi' backend is not available"):
        check_backend("mpi")


def test_missing_launch_and_wrong_world_size_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(RuntimeError, match="torchrun --standalone --nproc-per-node N"):
        init_process_group()
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"over 4 ranks was asked for, but 2 processes.*--nproc-per-node 4"):
        init_process_group(world_size=4)


# ---------------------------------------------------------------------- training
def tiny_trainer(balance: str) -> Trainer:
    """A float32 tiny MoE (8 experts) on a small mixture, 4 rows per step: the same on every rank."""
    torch.manual_seed(0)
    model = l4lab.Llama4(l4lab.preset("tiny-moe", **CONFIG))
    train, val = mixture(48, 33, seed=0).split(0.75)
    train = TokenDataset(train.tokens % CONFIG["vocab_size"], train.loss_mask)
    val = TokenDataset(val.tokens % CONFIG["vocab_size"], val.loss_mask)
    config = TrainConfig(steps=4, batch_size=4, eval_every=2, warmup_steps=1, balance=balance, bias_rate=0.05)
    return Trainer(model, train, val, config)


def expert_parallel_training(balance: str) -> dict[str, torch.Tensor]:
    trainer = ExpertParallelTrainer.from_trainer(tiny_trainer(balance))
    history = trainer.run(progress=False)
    result = {f"weight.{k}": v for k, v in full_state_dict(trainer.model).items()}
    for key in ("loss", "switch_loss", "grad_norm"):
        result[key] = torch.tensor([h[key] for h in history], dtype=torch.float64)
    result["val_loss"] = torch.tensor(
        [h["val_loss"] for h in history if "val_loss" in h], dtype=torch.float64
    )
    return result


@pytest.mark.parametrize(("balance", "ranks"), [("aux_free", 4), ("switch", 2)])
def test_training_steps_equal_the_single_process_run(balance: str, ranks: int) -> None:
    trainer = tiny_trainer(balance)
    history = trainer.run(progress=False)
    results = spawn(expert_parallel_training, ranks, balance, timeout_s=300)
    for key in ("loss", "switch_loss", "grad_norm", "val_loss"):
        expected = torch.tensor([h[key] for h in history if key in h], dtype=torch.float64)
        for result in results:  # every rank reports the global numbers
            assert relative_error(result[key], expected) < 1e-4, key
    for name, expected in trainer.model.state_dict().items():
        found = results[0][f"weight.{name}"]
        assert all(torch.equal(r[f"weight.{name}"], found) for r in results[1:]), name
        assert relative_error(found, expected) < 1e-4, name
    biases = [results[0][f"weight.layers.{i}.feed_forward.router.selection_bias"] for i in range(2)]
    if balance == "aux_free":  # the bias moved, by the global batch's load: equal to one process's
        assert all(float(b.abs().max()) > 0 for b in biases)
    else:
        assert all(float(b.abs().max()) == 0 for b in biases)


def train_until(balance: str, steps: int, checkpoint: str) -> None:
    """Train the expert-parallel run to ``steps`` of its 4 and save the (whole-model) checkpoint."""
    trainer = ExpertParallelTrainer.from_trainer(tiny_trainer(balance))
    trainer.run(progress=False, after_step=lambda t: t.step_count == steps)
    trainer.save(checkpoint)


def resume_and_finish(checkpoint: str) -> dict[str, torch.Tensor]:
    base = tiny_trainer("aux_free")
    resumed = Trainer.resume(checkpoint, base.train_data, base.val_data)
    trainer = ExpertParallelTrainer.from_trainer(resumed)
    history = trainer.run(progress=False)
    result = {f"weight.{k}": v for k, v in full_state_dict(trainer.model).items()}
    result["loss"] = torch.tensor([h["loss"] for h in history], dtype=torch.float64)
    return result


def test_a_run_saved_under_4_ranks_resumes_under_2(tmp_path: Path) -> None:
    single = tiny_trainer("aux_free")
    history = single.run(progress=False)
    spawn(train_until, 4, "aux_free", 2, str(tmp_path / "checkpoint"), timeout_s=300)
    assert json.loads((tmp_path / "checkpoint" / "state.json").read_text())["step"] == 2
    results = spawn(resume_and_finish, 2, str(tmp_path / "checkpoint"), timeout_s=300)
    expected = torch.tensor([h["loss"] for h in history], dtype=torch.float64)
    assert relative_error(results[0]["loss"], expected) < 1e-4
    for name, weight in single.model.state_dict().items():
        assert relative_error(results[1][f"weight.{name}"], weight) < 1e-4, name


# ---------------------------------------------------------------------- the command line under torchrun
def run_command(args: list[str], timeout_s: float = 300) -> subprocess.CompletedProcess:
    """Run ``args`` in its own process group; on a timeout the whole group is killed, then the test fails."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(l4lab.__file__).parents[1]))
    process = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail(f"{' '.join(args)} ran over {timeout_s} s")
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return subprocess.CompletedProcess(args, process.returncode, stdout, stderr)


TRAIN = [
    "-m",
    "l4lab",
    "train",
    "--preset",
    "tiny-moe",
    "--steps",
    "3",
    "--seq-len",
    "32",
    "--batch-size",
    "4",
]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def test_torchrun_trains_the_single_process_model(tmp_path: Path) -> None:
    one = run_command([sys.executable, *TRAIN, "--minutes", "0", "--quiet", "--out", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr
    two = run_command(
        [*TORCHRUN, *TRAIN, "--expert-parallel", "2", "--quiet", "--out", str(tmp_path / "two")]
    )
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("trained tiny-moe") == 1  # rank 0 reports
    losses = [
        torch.tensor([h["loss"] for h in json.loads((tmp_path / run / "metrics.json").read_text())])
        for run in ("one", "two")
    ]
    assert len(losses[0]) == 3 and relative_error(losses[1], losses[0]) < 1e-4
    # Adam moves every weight by about lr * g / |g| in its first steps: an element whose gradient is
    # near zero moves by an amount its rounding decides, so a few elements in 10^5 differ by up to 1e-4
    weights = [load_checkpoint_model(tmp_path / run / "checkpoint").state_dict() for run in ("one", "two")]
    for name, weight in weights[0].items():
        assert relative_error(weights[1][name], weight) < 3e-3, name
    differing = sum(int(((weights[1][n] - w).abs() > 1e-5).sum()) for n, w in weights[0].items())
    assert differing < 1e-3 * sum(w.numel() for w in weights[0].values())
    assert (tmp_path / "two" / "report.html").exists()


def test_command_line_refuses_what_expert_parallelism_cannot_do(tmp_path: Path) -> None:
    out = ["--out", str(tmp_path / "x")]
    alone = run_command([sys.executable, *TRAIN, "--expert-parallel", "2", *out])
    assert alone.returncode == 2 and "torchrun --standalone --nproc-per-node N" in alone.stderr
    timed = run_command([sys.executable, *TRAIN, "--expert-parallel", "2", "--minutes", "1", *out])
    assert timed.returncode == 2 and "limited by --steps only" in timed.stderr
    odd = run_command([sys.executable, *TRAIN, "--expert-parallel", "3", *out])
    assert odd.returncode == 2 and "num_experts = 4 cannot be split over 3 ranks" in odd.stderr
    rows = run_command([sys.executable, *TRAIN, "--expert-parallel", "4", "--batch-size", "6", *out])
    assert rows.returncode == 2 and "--batch-size 6 cannot be split into 4" in rows.stderr
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------- sharded checkpoints
def train_and_save_sharded(steps: int, checkpoint: str) -> dict[str, torch.Tensor]:
    trainer = ExpertParallelTrainer.from_trainer(tiny_trainer("aux_free"))
    trainer.run(progress=False, after_step=lambda t: t.step_count == steps)
    save_sharded(trainer, checkpoint, metadata={"note": "test"})
    return {}


def load_sharded_and_finish(checkpoint: str) -> dict[str, torch.Tensor]:
    base = tiny_trainer("aux_free")
    trainer = load_sharded(checkpoint, base.train_data, base.val_data)
    history = trainer.run(progress=False)
    result = {f"weight.{k}": v for k, v in full_state_dict(trainer.model).items()}
    result["loss"] = torch.tensor([h["loss"] for h in history], dtype=torch.float64)
    return result


def try_loading(checkpoint: str) -> None:
    base = tiny_trainer("aux_free")
    load_sharded(checkpoint, base.train_data, base.val_data)


def test_sharded_checkpoint_of_4_ranks_resumes_under_2_and_not_under_3(tmp_path: Path) -> None:
    single = tiny_trainer("aux_free")
    history = single.run(progress=False)
    spawn(train_and_save_sharded, 4, 2, str(tmp_path / "sharded"), timeout_s=300)
    step_dir = tmp_path / "sharded" / "step-000002"
    assert json.loads((tmp_path / "sharded" / "latest.json").read_text()) == {"step_dir": step_dir.name}
    files = sorted(p.name for p in step_dir.rglob("*") if p.is_file())
    assert not [f for f in files if f.endswith((".distcp", ".metadata"))]  # safetensors, no pickle
    # each rank wrote its own experts: 2 of 8 per layer in each rank's file
    key = "model.layers.0.feed_forward.experts.gate_up_proj"
    shapes = []
    for file in step_dir.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            if key in f.keys():  # noqa: SIM118
                shapes.append(f.get_slice(key).get_shape()[0])
    assert shapes == [2, 2, 2, 2]

    results = spawn(load_sharded_and_finish, 2, str(tmp_path / "sharded"), timeout_s=300)
    expected = torch.tensor([h["loss"] for h in history], dtype=torch.float64)
    assert relative_error(results[0]["loss"], expected) < 1e-4
    for name, weight in single.model.state_dict().items():
        assert relative_error(results[1][f"weight.{name}"], weight) < 1e-4, name
    with pytest.raises(RuntimeError, match=r"saved by 4 ranks; here: num_experts = 8 cannot be split over 3"):
        spawn(try_loading, 3, str(tmp_path / "sharded"), timeout_s=300)


def export_and_forward(path: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = shard_experts(l4lab.Llama4(l4lab.preset("tiny-moe", **CONFIG)))
    export_pretrained(model, path)
    return {"logits": model(inputs()[0]).logits.detach()}


def test_export_is_the_single_directory_checkpoint_load_pretrained_and_transformers_read(
    tmp_path: Path,
) -> None:
    results = spawn(export_and_forward, 2, str(tmp_path / "export"), timeout_s=300)
    ids = inputs()[0]
    loaded = l4lab.load_pretrained(tmp_path / "export")
    assert relative_error(loaded(ids).logits, results[0]["logits"]) < 1e-5
    transformers = pytest.importorskip("transformers")
    reference = transformers.Llama4ForCausalLM.from_pretrained(tmp_path / "export").eval()
    with torch.no_grad():
        assert relative_error(reference(ids).logits, results[1]["logits"]) < 1e-4


# ---------------------------------------------------------------------- FSDP2 x expert parallelism
def fsdp_expert_parallel_training() -> dict[str, torch.Tensor]:
    """4 ranks = 2 data-parallel replicas x 2 expert-parallel ranks, FSDP2 on the rest."""
    trainer = ExpertParallelTrainer.from_trainer(tiny_trainer("aux_free"), data_parallel=2)
    sharded = [n for n, p in trainer.model.named_parameters() if isinstance(p, DTensor)]
    experts = [n for n, p in trainer.model.named_parameters() if is_expert_parameter(n)]
    assert sharded and experts and not set(sharded) & set(experts)
    assert trainer.model.layers[0].feed_forward.experts.gate_up_proj.shape[0] == 4  # 8 experts / 2
    history = trainer.run(progress=False)
    result = {f"weight.{k}": v for k, v in full_state_dict(trainer.model).items()}
    result["loss"] = torch.tensor([h["loss"] for h in history], dtype=torch.float64)
    result["grad_norm"] = torch.tensor([h["grad_norm"] for h in history], dtype=torch.float64)
    return result


def test_fsdp2_with_expert_parallelism_on_a_2d_mesh_trains_the_single_process_model() -> None:
    single = tiny_trainer("aux_free")
    history = single.run(progress=False)
    results = spawn(fsdp_expert_parallel_training, 4, timeout_s=300)
    for key in ("loss", "grad_norm"):
        expected = torch.tensor([h[key] for h in history], dtype=torch.float64)
        assert all(relative_error(r[key], expected) < 1e-4 for r in results), key
    for name, weight in single.model.state_dict().items():
        assert relative_error(results[3][f"weight.{name}"], weight) < 1e-4, name


# ---------------------------------------------------------------------- a sharded checkpoint under EP
def load_and_forward(path: str) -> dict[str, torch.Tensor]:
    model, read = load_pretrained_expert_parallel(path)
    ids = inputs()[0]
    rows = slice(
        dist.get_rank() * ROWS // dist.get_world_size(), (dist.get_rank() + 1) * ROWS // dist.get_world_size()
    )
    return {
        "logits": model(ids[rows]).logits.detach(),
        "read": torch.tensor([read.expert_bytes, read.other_bytes, read.files]),
    }


@pytest.mark.parametrize("ranks", [2, 4])
def test_each_rank_reads_only_its_experts_from_a_sharded_checkpoint(tmp_path: Path, ranks: int) -> None:
    torch.manual_seed(0)
    model = l4lab.Llama4(l4lab.preset("tiny-moe", **CONFIG))
    save_pretrained(model, tmp_path / "ckpt", max_shard_bytes=100_000)  # several shards and an index
    assert len(list((tmp_path / "ckpt").glob("model-*.safetensors"))) > 2
    expert_bytes = sum(4 * p.numel() for n, p in model.named_parameters() if is_expert_parameter(n))
    other_bytes = sum(4 * p.numel() for n, p in model.named_parameters() if not is_expert_parameter(n))

    results = spawn(load_and_forward, ranks, str(tmp_path / "ckpt"), timeout_s=300)
    expected = l4lab.load_pretrained(tmp_path / "ckpt")(inputs()[0]).logits
    assert relative_error(torch.cat([r["logits"] for r in results]), expected) < 1e-5
    for result in results:
        experts_read, others_read, _files = result["read"].tolist()
        assert experts_read == expert_bytes // ranks and others_read == other_bytes
