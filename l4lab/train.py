"""Training tiny Llama 4s on the CPU: AdamW, warm-up + cosine, clipping, MoE balancing, exact resume.

One optimisation step::

    logits  = model(batch[:, :-1])
    loss    = cross_entropy(logits, batch[:, 1:])          (only where the dataset's loss_mask says)
            + switch_coef * switch_loss                     (balance = "switch")
            + z_loss_coef * router_z_loss                   (any balance, when the coefficient is > 0)
    clip the gradient norm, AdamW step at the scheduled learning rate
    nudge each router's selection bias toward balance     (balance = "aux_free")

Checkpoints are directories of safetensors (model, optimiser moments) and JSON (configs, step, history,
the batch sampler's random state), written atomically. Resuming from one continues the run exactly:
the same batches, the same learning rates, the same losses as a run that never stopped.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from l4lab.config import Config
from l4lab.data import BatchSampler, TokenDataset
from l4lab.model import Llama4, RoutingRecord
from l4lab.routing import router_z_loss, switch_loss, update_selection_bias
from l4lab.storage import atomic_directory

BALANCE_CHOICES = ("aux_free", "switch", "none")
CHECKPOINT_FORMAT = 1


@dataclass
class TrainConfig:
    """How to train. The defaults suit the tiny presets on two CPU cores."""

    steps: int = 300
    batch_size: int = 16
    lr: float = 3e-3
    warmup_steps: int = 30
    min_lr_ratio: float = 0.1  # the cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.1  # on matrices only, not on norms
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    eval_every: int = 50  # also evaluated after the last step
    eval_rows: int = 64  # the first rows of the validation set, the same every time
    balance: str = "aux_free"  # "aux_free" (DeepSeek-V3 bias), "switch" (load-balancing loss), "none"
    switch_coef: float = 1e-2
    z_loss_coef: float = 0.0  # router z-loss (ST-MoE uses 1e-3)
    bias_rate: float = 1e-3  # the aux-free bias step (gamma)
    seed: int = 0

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        if self.balance not in BALANCE_CHOICES:
            raise ValueError(
                f"TrainConfig.balance = {self.balance!r} is not allowed: one of {BALANCE_CHOICES}"
            )
        for name in ("steps", "batch_size", "eval_every", "eval_rows"):
            if getattr(self, name) <= 0:
                raise ValueError(
                    f"TrainConfig.{name} = {getattr(self, name)!r} is not allowed: a positive integer"
                )
        if self.warmup_steps < 0 or not self.lr > 0:
            raise ValueError(
                f"TrainConfig needs lr > 0 and warmup_steps >= 0; got {self.lr}, {self.warmup_steps}"
            )


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warm-up to ``lr`` over ``warmup_steps``, then a cosine down to ``lr * min_lr_ratio``."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    floor = config.lr * config.min_lr_ratio
    return floor + (config.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def language_model_loss(logits: Tensor, batch: TokenDataset) -> Tensor:
    """Next-token cross-entropy of ``logits`` [B, T-1, V] against ``batch.tokens[:, 1:]``, masked."""
    targets = batch.tokens[:, 1:]
    losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    if batch.loss_mask is None:
        return losses.mean()
    mask = batch.loss_mask[:, 1:].reshape(-1).to(losses.dtype)
    return (losses * mask).sum() / mask.sum().clamp(min=1.0)


class Trainer:
    """Trains ``model`` on ``train_data``; ``run()`` returns the history, one dict per step."""

    def __init__(
        self,
        model: Llama4,
        train_data: TokenDataset,
        val_data: TokenDataset | None = None,
        config: TrainConfig | None = None,
    ) -> None:
        self.model = model
        self.train_data, self.val_data = train_data, val_data
        self.config = config or TrainConfig()
        self.sampler = BatchSampler(train_data, self.config.batch_size, self.config.seed)
        matrices = [p for p in model.parameters() if p.dim() >= 2]
        vectors = [p for p in model.parameters() if p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [
                {"params": matrices, "weight_decay": self.config.weight_decay},
                {"params": vectors, "weight_decay": 0.0},
            ],
            lr=self.config.lr,
            betas=self.config.betas,
        )
        self.step_count = 0
        self.history: list[dict[str, float]] = []

    # ------------------------------------------------------------------ one step
    def balance_terms(self, routing: list[RoutingRecord], like: Tensor) -> tuple[Tensor, Tensor]:
        """(switch loss, router z-loss), each averaged over the MoE layers (zeros for a dense model)."""
        if not routing:
            return like.new_zeros(()), like.new_zeros(())
        return switch_loss(routing), router_z_loss(routing)

    def step(self) -> dict[str, float]:
        """One optimisation step; returns its metrics."""
        config = self.config
        self.model.train()
        batch = self.sampler.next()
        out = self.model(batch.tokens[:, :-1])
        lm_loss = language_model_loss(out.logits, batch)
        switch, z_loss = self.balance_terms(out.routing, lm_loss)
        loss = lm_loss + config.z_loss_coef * z_loss
        if config.balance == "switch":
            loss = loss + config.switch_coef * switch

        lr = learning_rate(self.step_count, config)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.grad_clip)
        self.optimizer.step()
        if config.balance == "aux_free":
            for record in out.routing:
                router = self.model.layers[record.layer].feed_forward.router
                update_selection_bias(router.selection_bias, record, config.bias_rate)

        self.step_count += 1
        metrics = {
            "step": self.step_count,
            "loss": float(lm_loss.detach()),
            "switch_loss": float(switch.detach()),
            "z_loss": float(z_loss.detach()),
            "lr": lr,
            "grad_norm": float(grad_norm),
        }
        if self.step_count % config.eval_every == 0 or self.step_count == config.steps:
            val = self.evaluate()
            if val is not None:
                metrics["val_loss"] = val
        self.history.append(metrics)
        return metrics

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean loss on the first ``eval_rows`` validation rows (None without validation data)."""
        if self.val_data is None:
            return None
        self.model.eval()
        rows = min(self.config.eval_rows, len(self.val_data))
        total, weight = 0.0, 0.0
        for start in range(0, rows, self.config.batch_size):
            stop = min(rows, start + self.config.batch_size)
            batch = self.val_data.rows(slice(start, stop))
            loss = language_model_loss(self.model(batch.tokens[:, :-1]).logits, batch)
            total += float(loss) * (stop - start)
            weight += stop - start
        return total / weight

    def run(self, progress: bool = True, time_limit_s: float | None = None) -> list[dict[str, float]]:
        """Train until ``config.steps`` (or the time limit); a tqdm bar shows the loss."""
        started = time.monotonic()
        with tqdm(
            total=self.config.steps, initial=self.step_count, disable=not progress, desc="training"
        ) as bar:
            while self.step_count < self.config.steps:
                metrics = self.step()
                bar.update(1)
                # refresh=False: update() redraws, rate-limited; a redraw per step floods a notebook
                bar.set_postfix(loss=f"{metrics['loss']:.3f}", refresh=False)
                if time_limit_s is not None and time.monotonic() - started > time_limit_s:
                    break
        return self.history

    # ------------------------------------------------------------------ checkpoints
    def save(self, path: str | Path) -> None:
        """Write a checkpoint directory atomically (safetensors and JSON only, no pickle)."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        moments: dict[str, Tensor] = {}
        for group in self.optimizer.param_groups:
            for param in group["params"]:
                for key, value in self.optimizer.state.get(param, {}).items():
                    moments[f"{names[id(param)]}.{key}"] = value.detach().reshape(-1).clone()
        state = {
            "format": CHECKPOINT_FORMAT,
            "model_config": self.model.config.to_dict(),
            "train_config": asdict(self.config),
            "step": self.step_count,
            "history": self.history,
            "sampler": self.sampler.state(),
        }
        with atomic_directory(path) as staging:
            model_state = {n: t.detach().contiguous() for n, t in self.model.state_dict().items()}
            save_file(model_state, str(staging / "model.safetensors"))
            save_file(moments, str(staging / "optimizer.safetensors"))
            (staging / "state.json").write_text(json.dumps(state, indent=1) + "\n")

    @classmethod
    def resume(
        cls, path: str | Path, train_data: TokenDataset, val_data: TokenDataset | None = None
    ) -> Trainer:
        """Rebuild model, optimiser, schedule and batch stream from a checkpoint written by ``save``."""
        path = Path(path)
        state = json.loads((path / "state.json").read_text())
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path} is not an l4lab training checkpoint of format {CHECKPOINT_FORMAT}")
        model = load_checkpoint_model(path)
        trainer = cls(model, train_data, val_data, TrainConfig(**state["train_config"]))
        moments = load_file(str(path / "optimizer.safetensors"))
        params = dict(model.named_parameters())
        for name, param in params.items():
            entry = {
                key.removeprefix(f"{name}."): value
                for key, value in moments.items()
                if key.rsplit(".", 1)[0] == name
            }
            if entry:
                for key in ("exp_avg", "exp_avg_sq"):
                    entry[key] = entry[key].view_as(param)
                entry["step"] = entry["step"].reshape(())
                trainer.optimizer.state[param] = entry
        trainer.step_count = state["step"]
        trainer.history = state["history"]
        trainer.sampler.load_state(state["sampler"])
        return trainer


def load_checkpoint_model(path: str | Path) -> Llama4:
    """The model saved in a training checkpoint directory (weights and router biases)."""
    path = Path(path)
    state = json.loads((path / "state.json").read_text())
    model = Llama4(Config.from_dict(state["model_config"]))
    weights = load_file(str(path / "model.safetensors"))
    expected = set(model.state_dict())
    if set(weights) != expected:
        raise ValueError(
            f"checkpoint {path} does not fit its config: missing {sorted(expected - set(weights))}, "
            f"unexpected {sorted(set(weights) - expected)}"
        )
    model.load_state_dict(weights)
    return model


def metrics_json(history: list[dict[str, Any]]) -> str:
    """The history as JSON text, one step per line."""
    return "[\n" + ",\n".join(json.dumps(h) for h in history) + "\n]\n"
