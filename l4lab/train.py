"""Training tiny Llama 4s on the CPU: AdamW, warm-up + cosine, clipping, MoE balancing, distillation,
exact resume.

One optimisation step::

    logits  = model(batch[:, :-1])
    loss    = cross_entropy(logits, batch[:, 1:])          (only where the dataset's loss_mask says)
    with a teacher (distillation, as Meta distilled Scout and Maverick from Behemoth):
    loss    = w * T^2 * KL(teacher_T || student_T) + (1 - w) * loss
              (softmax at temperature T; w fixed, or moved linearly from distill_weight to
              distill_weight_end over the run)
    loss   += switch_coef * switch_loss                     (balance = "switch")
            + z_loss_coef * router_z_loss                   (any balance, when the coefficient is > 0)
    clip the gradient norm, AdamW step at the scheduled learning rate
    nudge each router's selection bias toward balance     (balance = "aux_free")

Checkpoints are directories of safetensors (model, optimiser moments) and JSON (configs, step, history,
the batch sampler's random state), the three files committed together (``l4lab.storage.replace_files``):
a save that is killed leaves the previous checkpoint or the new one, never a mix, and other files in the
directory stay. The safetensors carry checksums of every tensor and of state.json, checked on loading.
Resuming from one continues the run exactly: the same batches, the same learning rates, the same losses
as a run that never stopped.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from l4lab.config import Config
from l4lab.data import BatchSampler, TokenDataset
from l4lab.model import Llama4, RoutingRecord
from l4lab.routing import router_z_loss, switch_loss, update_selection_bias
from l4lab.storage import (
    SafetensorsFile,
    brief_list,
    committed_file,
    read_json,
    reading,
    replace_files,
    save_safetensors,
    sha256_text,
)

BALANCE_CHOICES = ("aux_free", "switch", "none")
CHECKPOINT_FORMAT = 1
STATE_CHECKSUM_KEY = "l4lab.state_sha256"  # in model.safetensors' metadata: the sha256 of state.json


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
    # distillation (used only when the Trainer has a teacher): weight of the soft-target term
    distill_weight: float = 0.5
    distill_weight_end: float | None = None  # a linear schedule to this weight at the last step
    distill_temperature: float = 2.0
    # only the last token is scored (induction heads, pass keys): the last layer computes that row only
    last_token_only: bool = False

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
        for name in ("distill_weight", "distill_weight_end"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
                raise ValueError(f"TrainConfig.{name} = {value!r} is not allowed: a number in [0, 1]")
        temperature = self.distill_temperature
        if not (isinstance(temperature, (int, float)) and 0.0 < temperature < math.inf):
            raise ValueError(
                f"TrainConfig.distill_temperature = {temperature!r} is not allowed: a positive number"
            )


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warm-up to ``lr`` over ``warmup_steps``, then a cosine down to ``lr * min_lr_ratio``."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    floor = config.lr * config.min_lr_ratio
    return floor + (config.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def with_balance_terms(loss: Tensor, switch: Tensor, z_loss: Tensor, config: TrainConfig) -> Tensor:
    """The loss to minimise: ``loss`` plus the router z-loss, plus the Switch loss when that is the
    balancing method (the auxiliary-loss-free method adds nothing to the loss: it moves a bias)."""
    loss = loss + config.z_loss_coef * z_loss
    if config.balance == "switch":
        loss = loss + config.switch_coef * switch
    return loss


def backward_at(step: int, loss: Tensor, optimizer: torch.optim.Optimizer, config: TrainConfig) -> float:
    """Set step ``step``'s learning rate (warm-up + cosine), clear old gradients, backpropagate ``loss``.
    Returns the learning rate; clipping and the optimiser step are the caller's."""
    lr = learning_rate(step, config)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    return lr


def language_model_loss(logits: Tensor, batch: TokenDataset) -> Tensor:
    """Next-token cross-entropy of ``logits`` [B, T-1, V] against ``batch.tokens[:, 1:]``, masked."""
    targets = batch.tokens[:, 1:]
    losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    if batch.loss_mask is None:
        return losses.mean()
    mask = batch.loss_mask[:, 1:].reshape(-1).to(losses.dtype)
    return (losses * mask).sum() / mask.sum().clamp(min=1.0)


def distillation_weight(step: int, config: TrainConfig) -> float:
    """The soft-target weight at ``step`` (0-based): ``distill_weight``, or a straight line from it to
    ``distill_weight_end`` at the last step (e.g. 0.9 -> 0.1: lean on the teacher early, on the data
    late; Meta says only that Llama 4 weighted soft and hard targets dynamically)."""
    if config.distill_weight_end is None:
        return config.distill_weight
    progress = min(1.0, step / max(1, config.steps - 1))
    return config.distill_weight + (config.distill_weight_end - config.distill_weight) * progress


def distillation_loss(
    student_logits: Tensor, teacher_logits: Tensor, batch: TokenDataset, temperature: float
) -> Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))`` per predicted token, masked like the
    cross-entropy (Hinton et al. 2015: the ``T^2`` keeps the soft term's gradients at the scale of the
    hard one's as T changes). Logits [B, T-1, V]; the teacher's carry no gradient."""
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    per_token = (teacher.exp() * (teacher - student)).sum(-1) * temperature**2  # [B, T-1]
    if batch.loss_mask is None:
        return per_token.mean()
    mask = batch.loss_mask[:, 1:].to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp(min=1.0)


class Trainer:
    """Trains ``model`` on ``train_data``; ``run()`` returns the history, one dict per step.

    With a ``teacher`` (a model over the same vocabulary, kept frozen), the loss mixes the teacher's
    soft targets with the data's hard ones (:func:`distillation_loss`, :func:`distillation_weight`).
    """

    def __init__(
        self,
        model: Llama4,
        train_data: TokenDataset,
        val_data: TokenDataset | None = None,
        config: TrainConfig | None = None,
        teacher: Llama4 | None = None,
    ) -> None:
        if teacher is not None and teacher.config.vocab_size != model.config.vocab_size:
            raise ValueError(
                f"the teacher's vocabulary ({teacher.config.vocab_size} ids) differs from the student's "
                f"({model.config.vocab_size}): distillation compares their distributions token by token, "
                "so both must use the same tokenizer"
            )
        self.teacher = teacher
        if teacher is not None:
            teacher.eval().requires_grad_(False)
        self.model = model
        self.train_data, self.val_data = train_data, val_data
        self.config = config or TrainConfig()
        if self.config.last_token_only:
            mask = train_data.loss_mask
            if mask is None or bool(mask[:, :-1].any()) or not bool(mask[:, -1].all()):
                raise ValueError(
                    "TrainConfig.last_token_only needs data whose loss_mask scores the last token of every "
                    "row and nothing else (e.g. l4lab.data.induction_heads); use last_token_only=False"
                )
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
        out = self.model(batch.tokens[:, :-1], last_only=config.last_token_only)
        if config.last_token_only:
            lm_loss = F.cross_entropy(out.logits[:, -1], batch.tokens[:, -1])
        else:
            lm_loss = language_model_loss(out.logits, batch)
        switch, z_loss = self.balance_terms(out.routing, lm_loss)
        loss = lm_loss
        distilled = {}
        if self.teacher is not None:
            with torch.no_grad():
                teacher_logits = self.teacher(batch.tokens[:, :-1]).logits
            soft = distillation_loss(out.logits, teacher_logits, batch, config.distill_temperature)
            weight = distillation_weight(self.step_count, config)
            loss = weight * soft + (1.0 - weight) * lm_loss
            distilled = {"distill_loss": float(soft.detach()), "distill_weight": weight}
        loss = with_balance_terms(loss, switch, z_loss, config)
        lr = backward_at(self.step_count, loss, self.optimizer, config)
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
            **distilled,
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

    def run(
        self,
        progress: bool = True,
        time_limit_s: float | None = None,
        after_step: Callable[[Trainer], bool | None] | None = None,
    ) -> list[dict[str, float]]:
        """Train until ``config.steps`` (or the time limit); a tqdm bar shows the loss.

        ``after_step(trainer)`` is called after each step (to save periodic checkpoints, say); when it
        returns True the run stops there (the command line stops this way on Ctrl-C).
        """
        started = time.monotonic()
        with tqdm(
            total=self.config.steps, initial=self.step_count, disable=not progress, desc="training"
        ) as bar:
            while self.step_count < self.config.steps:
                metrics = self.step()
                bar.update(1)
                # refresh=False: update() redraws, rate-limited; a redraw per step floods a notebook
                bar.set_postfix(loss=f"{metrics['loss']:.3f}", refresh=False)
                if after_step is not None and after_step(self):
                    break
                if time_limit_s is not None and time.monotonic() - started > time_limit_s:
                    break
        return self.history

    # ------------------------------------------------------------------ checkpoints
    def save(self, path: str | Path, metadata: dict[str, Any] | None = None) -> None:
        """Write a checkpoint directory (safetensors and JSON only, no pickle), its files all at once.

        ``metadata``: JSON-serialisable facts kept with the checkpoint (the command line records how
        to rebuild the run's data); :func:`checkpoint_state` reads them back under ``"metadata"``.
        """
        self.write_checkpoint(path, *self.checkpoint_tensors(), metadata=metadata)

    def checkpoint_tensors(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """(the model's state dict, the optimiser's moments by ``<parameter name>.<moment>``, flat)."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        moments: dict[str, Tensor] = {}
        for group in self.optimizer.param_groups:
            for param in group["params"]:
                for key, value in self.optimizer.state.get(param, {}).items():
                    moments[f"{names[id(param)]}.{key}"] = value.detach().reshape(-1).clone()
        model_state = {n: t.detach().contiguous() for n, t in self.model.state_dict().items()}
        return model_state, moments

    def write_checkpoint(
        self,
        path: str | Path,
        model_state: dict[str, Tensor],
        moments: dict[str, Tensor],
        metadata: dict[str, Any] | None = None,
    ) -> None:
        """Write ``model_state``, ``moments`` and this trainer's state.json into ``path``, all at once."""
        state = {
            "format": CHECKPOINT_FORMAT,
            "model_config": self.model.config.to_dict(),
            "train_config": asdict(self.config),
            "step": self.step_count,
            "history": self.history,
            "sampler": self.sampler.state(),
        }
        if metadata is not None:
            state["metadata"] = metadata
        state_text = json.dumps(state, indent=1) + "\n"
        with replace_files(path) as staging:
            recorded = {STATE_CHECKSUM_KEY: sha256_text(state_text)}
            save_safetensors(model_state, staging.path("model.safetensors"), metadata=recorded)
            save_safetensors(moments, staging.path("optimizer.safetensors"))
            staging.write_text("state.json", state_text)

    @classmethod
    def resume(
        cls,
        path: str | Path,
        train_data: TokenDataset,
        val_data: TokenDataset | None = None,
        teacher: Llama4 | None = None,
    ) -> Trainer:
        """Rebuild model, optimiser, schedule and batch stream from a checkpoint written by ``save``
        (a distilled run needs its ``teacher`` again: the checkpoint holds the student only).

        Every problem with the checkpoint is a ValueError or FileNotFoundError naming the file.
        """
        path = Path(path)
        with reading(path):
            state = checkpoint_state(path)
            model = _read_checkpoint_model(path, state)
            try:
                train_config = TrainConfig(**state["train_config"])
            except (TypeError, ValueError) as error:
                raise ValueError(f"{path / 'state.json'}: train_config: {error}") from None
            trainer = cls(model, train_data, val_data, train_config, teacher)
            _load_moments(trainer, path)
        trainer.step_count = state["step"]
        trainer.history = state["history"]
        try:
            trainer.sampler.load_state(state["sampler"])
        except (KeyError, TypeError, ValueError, RuntimeError) as error:
            raise ValueError(
                f"{path / 'state.json'}: the sampler's state does not fit these training rows ({error})"
            ) from None
        return trainer


def checkpoint_state(path: str | Path) -> dict[str, Any]:
    """state.json of a training checkpoint (step, configs, history, sampler, metadata), checked."""
    path = Path(path)
    if not path.is_dir():
        there = "a file" if path.exists() else "nothing"
        raise FileNotFoundError(f"no training checkpoint directory at {path} ({there} is there)")
    state_file = committed_file(path, "state.json")
    if state_file is None:
        raise FileNotFoundError(f"{path / 'state.json'} does not exist: {path} is not a training checkpoint")
    state = read_json(state_file)
    name = path / "state.json"
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"{name} is not the state of an l4lab training checkpoint of format {CHECKPOINT_FORMAT}"
        )
    kinds = {"model_config": dict, "train_config": dict, "step": int, "history": list, "sampler": dict}
    for field, kind in kinds.items():
        if not isinstance(state.get(field), kind) or isinstance(state.get(field), bool):
            raise ValueError(
                f"{name}: field {field} is missing or not a {kind.__name__}: the file is corrupt"
            )
    if state["step"] < 0 or len(state["history"]) != state["step"]:
        raise ValueError(
            f"{name}: step {state['step']} but {len(state['history'])} steps of history: the file is corrupt"
        )
    if not all(isinstance(h, dict) for h in state["history"]):
        raise ValueError(f"{name}: history holds something other than one object per step: it is corrupt")
    return state


def _check_state_checksum(path: Path, weights: SafetensorsFile) -> None:
    recorded = weights.metadata.get(STATE_CHECKSUM_KEY)
    if recorded is None:
        return  # a checkpoint written before checksums
    state_file = committed_file(path, "state.json")
    if state_file is not None and hashlib.sha256(state_file.read_bytes()).hexdigest() != recorded:
        raise ValueError(
            f"{path / 'state.json'} was changed after the checkpoint was saved (its sha256 differs from the "
            "one recorded in model.safetensors): it is corrupt, or edited by hand"
        )


def _read_checkpoint_model(path: Path, state: dict[str, Any]) -> Llama4:
    try:
        config = Config.from_dict(state["model_config"])
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path / 'state.json'}: model_config: {error}") from None
    weights_file = committed_file(path, "model.safetensors")
    if weights_file is None:
        raise FileNotFoundError(f"{path / 'model.safetensors'} does not exist: the checkpoint is incomplete")
    model = Llama4(config)
    expected = model.state_dict()
    with SafetensorsFile(weights_file) as weights:
        _check_state_checksum(path, weights)
        keys = set(weights.keys())
        if keys != set(expected):
            missing, unexpected = sorted(set(expected) - keys), sorted(keys - set(expected))
            raise ValueError(
                f"{path / 'model.safetensors'} does not fit its config: missing {brief_list(missing)}, "
                f"unexpected {brief_list(unexpected)}"
            )
        loaded = {key: weights.get(key) for key in sorted(keys)}
    dtype = Counter(t.dtype for t in loaded.values()).most_common(1)[0][0]  # the model's, but for a stray one
    for key, tensor in loaded.items():
        problem = None
        if tensor.shape != expected[key].shape:
            problem = f"expected shape {tuple(expected[key].shape)}, got {tuple(tensor.shape)}"
        elif tensor.dtype != dtype or not dtype.is_floating_point:
            wanted = (
                f"{dtype}, like the other tensors" if dtype.is_floating_point else "a floating-point dtype"
            )
            problem = f"expected {wanted}, got {tensor.dtype}"
        if problem is not None:
            raise ValueError(f"{path / 'model.safetensors'}: {key}: {problem}")
    model.to(dtype).load_state_dict(loaded)
    return model


def _load_moments(trainer: Trainer, path: Path) -> None:
    """Put the optimiser's moments saved in ``path`` back into ``trainer.optimizer``."""
    moments_file = committed_file(path, "optimizer.safetensors")
    name = path / "optimizer.safetensors"
    if moments_file is None:
        raise FileNotFoundError(f"{name} does not exist: the checkpoint is incomplete")
    params = dict(trainer.model.named_parameters())
    with SafetensorsFile(moments_file) as moments:
        entries: dict[str, dict[str, Tensor]] = {}
        for key in moments.keys():  # noqa: SIM118 (not a mapping)
            param, _, kind = key.rpartition(".")
            if param not in params or kind not in ("exp_avg", "exp_avg_sq", "step"):
                raise ValueError(f"{name}: {key} is not a moment of any parameter of the model")
            entries.setdefault(param, {})[kind] = moments.get(key)
    for param_name, entry in entries.items():
        param = params[param_name]
        missing = [f"{param_name}.{kind}" for kind in ("exp_avg", "exp_avg_sq", "step") if kind not in entry]
        if missing:
            raise ValueError(f"{name}: moments {missing} are missing (the others of {param_name} are there)")
        for kind, numel, dtype in (
            ("exp_avg", param.numel(), param.dtype),
            ("exp_avg_sq", param.numel(), param.dtype),
            ("step", 1, None),
        ):
            found = entry[kind]
            if (
                found.numel() != numel
                or not found.dtype.is_floating_point
                or dtype not in (None, found.dtype)
            ):
                raise ValueError(
                    f"{name}: {param_name}.{kind}: expected {numel} values of "
                    f"{dtype or 'a floating-point dtype'}, got {found.numel()} of {found.dtype}"
                )
        for kind in ("exp_avg", "exp_avg_sq"):
            entry[kind] = entry[kind].view_as(param)
        entry["step"] = entry["step"].reshape(())
        trainer.optimizer.state[param] = entry


def load_checkpoint_model(path: str | Path) -> Llama4:
    """The model saved in a training checkpoint directory (weights and router biases)."""
    path = Path(path)
    with reading(path):
        return _read_checkpoint_model(path, checkpoint_state(path))


def metrics_json(history: list[dict[str, Any]]) -> str:
    """The history as JSON text, one step per line."""
    return "[\n" + ",\n".join(json.dumps(h) for h in history) + "\n]\n"
