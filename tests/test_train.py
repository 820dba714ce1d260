"""Training: schedule, masked loss, balancing methods, deterministic runs and exact resume."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import l4lab
from l4lab.data import TokenDataset, mixture
from l4lab.train import TrainConfig, Trainer, language_model_loss, learning_rate, load_checkpoint_model


def small_model(ffn: str = "moe") -> l4lab.Llama4:
    torch.manual_seed(0)
    return l4lab.Llama4(l4lab.preset("tiny-moe", ffn=ffn, num_layers=2, hidden_size=64, head_dim=16))


@pytest.fixture(scope="module")
def data() -> tuple[TokenDataset, TokenDataset]:
    return mixture(48, 65, seed=0).split(0.75)


def test_schedule_warms_up_then_follows_the_cosine() -> None:
    config = TrainConfig(steps=110, lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    assert learning_rate(0, config) == pytest.approx(1e-4)
    assert learning_rate(9, config) == pytest.approx(1e-3)
    assert learning_rate(60, config) == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi / 2)))
    assert learning_rate(110, config) == pytest.approx(1e-4)


def test_masked_loss_counts_only_masked_targets() -> None:
    tokens = torch.tensor([[1, 2, 3, 4]])
    mask = torch.tensor([[False, False, True, False]])
    logits = torch.randn(1, 3, 8)
    expected = F.cross_entropy(logits[0, 1:2], tokens[0, 2:3])
    assert float(language_model_loss(logits, TokenDataset(tokens, loss_mask=mask))) == pytest.approx(
        float(expected)
    )


def test_bad_train_config_names_the_field() -> None:
    with pytest.raises(ValueError, match=r"TrainConfig\.balance = 'softmax'"):
        TrainConfig(balance="softmax")


def test_same_seed_same_run(data) -> None:
    train, val = data
    config = TrainConfig(steps=4, batch_size=4, eval_every=2, warmup_steps=1)
    a = Trainer(small_model(), train, val, config).run(progress=False)
    b = Trainer(small_model(), train, val, config).run(progress=False)
    assert a == b
    assert [h["step"] for h in a if "val_loss" in h] == [2, 4]


@pytest.mark.parametrize("balance", ["aux_free", "switch", "none"])
def test_resume_continues_exactly(data, tmp_path: Path, balance: str) -> None:
    train, val = data
    config = TrainConfig(
        steps=6, batch_size=4, eval_every=3, warmup_steps=2, balance=balance, z_loss_coef=1e-3
    )
    uninterrupted = Trainer(small_model(), train, val, config).run(progress=False)

    first = Trainer(small_model(), train, val, config)
    for _ in range(3):
        first.step()
    first.save(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "model.safetensors",
        "optimizer.safetensors",
        "state.json",
    ]
    resumed = Trainer.resume(tmp_path / "ckpt", train, val)
    assert resumed.run(progress=False) == uninterrupted


def test_balancing_methods_do_what_they_say(data) -> None:
    train, _ = data
    runs = {}
    for balance in ("aux_free", "switch", "none"):
        trainer = Trainer(small_model(), train, None, TrainConfig(steps=3, batch_size=4, balance=balance))
        history = trainer.run(progress=False)
        bias = torch.stack([layer.feed_forward.router.selection_bias for layer in trainer.model.layers])
        runs[balance] = (history, bias, trainer.model.layers[0].feed_forward.router.weight.detach().clone())
    assert runs["aux_free"][1].abs().sum() > 0  # the bias moved
    assert runs["switch"][1].abs().sum() == 0 and runs["none"][1].abs().sum() == 0
    # the first step's batch and model are the same; only the switch term changes the router's update
    assert runs["switch"][0][0]["loss"] == runs["none"][0][0]["loss"]
    assert not torch.equal(runs["switch"][2], runs["none"][2])


def test_dense_models_train_without_routing(data) -> None:
    train, _ = data
    history = Trainer(small_model("dense"), train, None, TrainConfig(steps=2, batch_size=4)).run(
        progress=False
    )
    assert history[-1]["switch_loss"] == 0.0


def test_checkpoint_model_keeps_the_router_bias(data, tmp_path: Path) -> None:
    train, _ = data
    trainer = Trainer(small_model(), train, None, TrainConfig(steps=2, batch_size=4))
    trainer.run(progress=False)
    trainer.save(tmp_path / "ckpt")
    model = load_checkpoint_model(tmp_path / "ckpt")
    for a, b in zip(model.state_dict().values(), trainer.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_last_token_only_training_takes_the_same_steps() -> None:
    """Scoring only the last token, the one-row last layer gives the loss and gradients of the full one."""
    data = l4lab.data.induction_heads(16, 24, 16, seed=0)
    config = l4lab.preset(
        "tiny",
        vocab_size=16,
        num_layers=2,
        nope_layer_interval=2,
        attention_chunk_size=8,
        bos_token_id=None,
        eos_token_id=None,
    )
    losses = []
    for last_only in (False, True):
        torch.manual_seed(0)
        model = l4lab.Llama4(config)
        train = TrainConfig(steps=3, batch_size=8, warmup_steps=1, last_token_only=last_only)
        losses.append([h["loss"] for h in Trainer(model, data, None, train).run(progress=False)])
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    with pytest.raises(ValueError, match="last_token_only needs data whose loss_mask"):
        Trainer(
            l4lab.Llama4(config), l4lab.data.corpus_dataset(32, 4000), None, TrainConfig(last_token_only=True)
        )
