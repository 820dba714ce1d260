"""Distillation: the loss against a hand computation, the weight schedule, a trainer with a teacher,
and ``python -m l4lab train --teacher DIR``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import l4lab
from l4lab import __main__ as cli
from l4lab.data import TokenDataset
from l4lab.train import TrainConfig, Trainer, distillation_loss, distillation_weight, language_model_loss


def _softmax(values: list[float]) -> list[float]:
    exps = [math.exp(v) for v in values]
    return [e / sum(exps) for e in exps]


def test_distillation_loss_by_hand() -> None:
    # two predicted tokens over a vocabulary of three; the second is masked out of the loss
    student = [[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]]
    teacher = [[2.0, 0.0, 0.0], [0.0, 3.0, 0.0]]
    temperature = 2.0
    p = _softmax([t / temperature for t in teacher[0]])  # [0.5761, 0.2119, 0.2119]
    q = _softmax([s / temperature for s in student[0]])  # [0.5065, 0.3072, 0.1863]
    by_hand = temperature**2 * sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
    assert by_hand == pytest.approx(0.0914, abs=1e-4)

    batch = TokenDataset(torch.zeros(1, 3, dtype=torch.long), loss_mask=torch.tensor([[True, True, False]]))
    got = distillation_loss(torch.tensor([student]), torch.tensor([teacher]), batch, temperature)
    assert float(got) == pytest.approx(by_hand, rel=1e-5)
    # no mask: the mean over both tokens
    p2 = _softmax([t / temperature for t in teacher[1]])
    q2 = _softmax([s / temperature for s in student[1]])
    second = temperature**2 * sum(pi * math.log(pi / qi) for pi, qi in zip(p2, q2, strict=True))
    unmasked = TokenDataset(torch.zeros(1, 3, dtype=torch.long))
    got = distillation_loss(torch.tensor([student]), torch.tensor([teacher]), unmasked, temperature)
    assert float(got) == pytest.approx((by_hand + second) / 2, rel=1e-5)


def test_the_weight_schedule() -> None:
    fixed = TrainConfig(steps=11, distill_weight=0.3)
    assert [distillation_weight(s, fixed) for s in (0, 5, 10)] == [0.3, 0.3, 0.3]
    linear = TrainConfig(steps=11, distill_weight=0.9, distill_weight_end=0.1)
    assert [distillation_weight(s, linear) for s in (0, 5, 10)] == pytest.approx([0.9, 0.5, 0.1])
    with pytest.raises(ValueError, match=r"distill_weight_end = 1\.5 is not allowed: a number in \[0, 1\]"):
        TrainConfig(distill_weight_end=1.5)
    with pytest.raises(ValueError, match="distill_temperature = 0 is not allowed"):
        TrainConfig(distill_temperature=0)


def _rows(seed: int) -> TokenDataset:
    return TokenDataset(torch.randint(0, 260, (32, 17), generator=torch.Generator().manual_seed(seed)))


def test_a_trainer_step_mixes_soft_and_hard_targets() -> None:
    torch.manual_seed(0)
    student = l4lab.Llama4(l4lab.preset("tiny", num_layers=1))
    teacher = l4lab.Llama4(l4lab.preset("tiny", num_layers=2))
    config = TrainConfig(steps=2, batch_size=4, distill_weight=0.25, distill_temperature=3.0)
    trainer = Trainer(student, _rows(0), config=config, teacher=teacher)
    batch = trainer.sampler.next()  # the batch the first step will draw, from a copy of the sampler
    trainer.sampler = type(trainer.sampler)(_rows(0), 4, 0)
    with torch.no_grad():
        s, t = student(batch.tokens[:, :-1]).logits, teacher(batch.tokens[:, :-1]).logits
    expected_soft = float(distillation_loss(s, t, batch, 3.0))
    expected_hard = float(language_model_loss(s, batch))
    metrics = trainer.step()
    assert metrics["distill_loss"] == pytest.approx(expected_soft, rel=1e-5)
    assert metrics["loss"] == pytest.approx(expected_hard, rel=1e-5)
    assert metrics["distill_weight"] == 0.25
    assert not any(p.requires_grad for p in teacher.parameters())


def test_a_teacher_over_another_vocabulary_is_refused() -> None:
    student = l4lab.Llama4(l4lab.preset("tiny", num_layers=1))
    teacher = l4lab.Llama4(l4lab.preset("tiny", num_layers=1, vocab_size=300))
    with pytest.raises(
        ValueError, match=r"teacher's vocabulary \(300 ids\) differs from the student's \(260\)"
    ):
        Trainer(student, _rows(0), teacher=teacher)


SMALL = ["--steps", "3", "--seq-len", "32", "--batch-size", "2", "--quiet", "--minutes", "0"]


def test_command_line_teacher(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert (
        cli.main(["train", "--preset", "tiny", "--task", "text", "--out", str(tmp_path / "big"), *SMALL]) == 0
    )
    argv = ["train", "--preset", "tiny-moe", "--task", "text", "--out", str(tmp_path / "small"), *SMALL]
    assert cli.main([*argv, "--teacher", str(tmp_path / "big"), "--distill-weight-end", "0.1"]) == 0
    history = json.loads((tmp_path / "small" / "metrics.json").read_text())
    assert [h["distill_weight"] for h in history] == pytest.approx([0.5, 0.3, 0.1])
    assert all(h["distill_loss"] > 0 for h in history)
    state = json.loads((tmp_path / "small" / "checkpoint" / "state.json").read_text())
    assert state["metadata"]["teacher"] == str(tmp_path / "big")
    assert "teacher (distillation)" in (tmp_path / "small" / "report.html").read_text()
    capsys.readouterr()
    with pytest.raises(SystemExit):
        cli.main([*argv, "--overwrite", "--teacher", str(tmp_path / "nowhere")])
    assert "cannot load the teacher" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main([*argv, "--overwrite", "--distill-weight", "0.2"])
    assert "need --teacher" in capsys.readouterr().err
