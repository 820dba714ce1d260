"""The induction-heads length sweep: the command line's results.json, exact last-token evaluation, the
position schemes that take iRoPE apart, and the chunk-boundary blind spot seen from the mask."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import l4lab
from l4lab import __main__ as cli
from l4lab import viz
from l4lab.induction import (
    PUBLISHED_LENGTHS,
    PUBLISHED_TABLE_11,
    VOCAB,
    InductionSetup,
    first_trigger,
    held_out_rows,
    induction_hits,
    length_stages,
    train_induction,
)

TINY = ["--train-length", "16", "--chunk", "4", "--steps", "3", "--rows", "8", "--quiet"]


def test_published_table_is_gu_and_dao_table_11() -> None:
    assert PUBLISHED_LENGTHS == [64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]
    # trained at 256: MHA-RoPE is perfect up to and at 256, 83.6 at 2x, 5.5 at 64x
    assert PUBLISHED_TABLE_11["MHA-RoPE"][:4] == [100, 100, 100, 83.6]
    assert PUBLISHED_TABLE_11["MHA-RoPE"][-1] == 5.5
    assert all(len(row) == len(PUBLISHED_LENGTHS) for row in PUBLISHED_TABLE_11.values())


def test_the_recipe_defaults_are_the_papers_protocol() -> None:
    """Gu & Dao's Table 11 trains 2-layer models on induction heads with vocabulary 16 at length 256."""
    setup = InductionSetup()
    config = setup.config(1024)
    assert (VOCAB, config.vocab_size, config.num_layers, setup.train_length) == (16, 16, 2, 256)
    # the curriculum (a recorded departure) ends on the paper's length: 64, then 128, then 256
    assert length_stages(setup) == [(64, 400), (128, 200), (256, 200)]
    # trained at 64 (notebook 04's and lab 5's recipe), nothing is shorter: every step at 64
    assert length_stages(InductionSetup(train_length=64)) == [(64, 800)]
    assert length_stages(InductionSetup(curriculum=())) == [(256, 800)]


def test_each_stage_trains_on_rows_of_its_length(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []
    forward = l4lab.Llama4.forward

    def recording(self, tokens, *args, **kwargs):
        if self.training:
            seen.append(tokens.shape[1] + 1)  # the model reads a row without its last token
        return forward(self, tokens, *args, **kwargs)

    monkeypatch.setattr(l4lab.Llama4, "forward", recording)
    setup = InductionSetup(
        train_length=16, curriculum=((8, 0.25), (12, 0.5)), steps=8, batch_size=2, hidden_size=16
    )
    _, history = train_induction(setup, max_length=16)
    assert seen == [8, 8, 12, 12, 16, 16, 16, 16]
    assert [h["step"] for h in history] == list(range(1, 9))  # one schedule over all the stages


@pytest.mark.parametrize(
    "curriculum",
    [((64, 0.5), (128, 0.5)), ((64, 0.0),), ((64, 1.0),), ((3, 0.5),), ((64.0, 0.5),)],
)
def test_a_bad_curriculum_is_refused(curriculum: tuple) -> None:
    with pytest.raises(ValueError, match=r"curriculum = .* is not allowed: \(length, share\) pairs"):
        InductionSetup(curriculum=curriculum)


@pytest.mark.parametrize(
    ("positions", "expected"),
    [
        ("rope", [(True, None, False), (True, None, False)]),
        ("nope", [(False, None, True), (False, None, True)]),
        ("chunked", [(True, 32, False), (True, 32, False)]),
        ("irope", [(True, 32, False), (False, None, True)]),
    ],
)
def test_each_scheme_resolves_to_its_layers(positions: str, expected: list) -> None:
    plan = InductionSetup(positions=positions).config(1024).layer_plan()
    assert [(s.uses_rope, s.chunk_size, s.temperature_tuning) for s in plan] == expected
    untuned = InductionSetup(positions=positions, temperature_tuning=False).config(1024).layer_plan()
    assert not any(s.temperature_tuning for s in untuned)


def test_last_token_hits_equal_a_full_forward() -> None:
    torch.manual_seed(0)
    model = l4lab.Llama4(InductionSetup(positions="irope", chunk=8).config(200)).eval()
    tokens = held_out_rows(200, 6, seed=0)
    with torch.no_grad():
        expected = model(tokens[:, :-1]).logits[:, -1].argmax(-1) == tokens[:, -1]
    assert torch.equal(induction_hits(model, tokens, batch_tokens=400), expected)


def test_held_out_rows_are_induction_rows_apart_from_training() -> None:
    tokens = held_out_rows(64, 32, seed=0)
    trigger = first_trigger(tokens)
    rows = torch.arange(32)
    assert torch.equal(tokens[rows, trigger + 1], tokens[:, -1])  # the answer follows the first trigger
    assert bool((tokens[:, -2] == VOCAB - 1).all())
    assert not torch.equal(tokens, held_out_rows(64, 32, seed=1))
    assert not torch.equal(tokens, l4lab.data.induction_heads(32, 64, VOCAB, seed=1).tokens)  # training seed


def test_a_chunked_only_model_cannot_see_an_answer_in_another_chunk() -> None:
    """The mechanism behind the "RoPE+chunked" row: no path reaches across chunks."""
    torch.manual_seed(0)
    model = l4lab.Llama4(InductionSetup(positions="chunked", chunk=8).config(64)).eval()
    tokens = held_out_rows(64, 4, seed=0)
    changed = tokens.clone()
    changed[:, :8] = (changed[:, :8] + 1) % (VOCAB - 1)  # the first chunk only; the query is in the last
    with torch.no_grad():
        a, b = model(tokens[:, :-1]).logits[:, -1], model(changed[:, :-1]).logits[:, -1]
    assert torch.equal(a, b)
    model.reconfigure(positions="irope")  # the NoPE layer is a path across chunks
    with torch.no_grad():
        assert not torch.equal(model(tokens[:, :-1]).logits[:, -1], model(changed[:, :-1]).logits[:, -1])


def test_command_line_writes_one_cell_of_the_table(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "cell"
    argv = ["induction", "--positions", "irope", "--test-lengths", "32,8", "--seed", "1", "--out", str(out)]
    assert cli.main(argv + TINY) == 0
    result = json.loads((out / "results.json").read_text())
    assert result["label"] == "iRoPE"
    assert result["setup"]["seed"] == 1 and result["setup"]["chunk"] == 4 and result["setup"]["steps"] == 3
    assert [r["length"] for r in result["results"]] == [8, 32]
    assert result["stages"] == [{"length": 16, "steps": 3}]  # nothing shorter than 16 to start from
    for row in result["results"]:
        assert row["rows"] == 8 and 0.0 <= row["accuracy"] <= 1.0
        assert 0 <= row["edge_rows"] <= row["rows"]
    assert result["layers"] == [
        {"rope": True, "chunk": 4, "temperature": False},
        {"rope": False, "chunk": None, "temperature": True},
    ]
    assert "length      32: accuracy" in capsys.readouterr().out

    curriculum = ["--train-length", "80", "--overwrite"]  # 64 is shorter: 2 of the 3 steps there
    assert cli.main(argv + TINY + curriculum) == 0
    assert json.loads((out / "results.json").read_text())["stages"] == [
        {"length": 64, "steps": 2},
        {"length": 80, "steps": 1},
    ]
    assert "trained 2 steps at 64, then 1 steps at 80, seed 1" in capsys.readouterr().out
    assert cli.main(argv + TINY + curriculum + ["--no-curriculum"]) == 0
    assert json.loads((out / "results.json").read_text())["stages"] == [{"length": 80, "steps": 3}]

    with pytest.raises(SystemExit):  # never replaced without --overwrite
        cli.main(argv + TINY)
    assert "exists; nothing was changed" in capsys.readouterr().err
    assert cli.main(argv + TINY + ["--overwrite", "--no-temperature"]) == 0
    result = json.loads((out / "results.json").read_text())
    assert result["label"] == "iRoPE, no temperature"
    assert not any(layer["temperature"] for layer in result["layers"])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--positions", "alibi"], "invalid choice: 'alibi'"),
        (["--test-lengths", "64,x"], "comma-separated integers from 4"),
        (["--test-lengths", "2"], "comma-separated integers from 4"),
        (["--seed", "-1"], "must be an integer in \\[0, 2\\*\\*31\\)"),
        (["--train-length", "3"], "--train-length must be at least 4"),
    ],
)
def test_command_line_errors_name_the_option(
    extra: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit):
        cli.main(["induction", "--out", str(tmp_path), "--quiet", *extra])
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "results.json").exists()


SUMMARY = {
    "published_lengths": PUBLISHED_LENGTHS,
    "published": PUBLISHED_TABLE_11,
    "rows": {
        "irope": {
            "label": "iRoPE",
            "seeds": [0, 1],
            "setup": {"train_length": 64},
            "lengths": {
                "64": {"mean": 99.0, "min": 98.0, "max": 100.0},
                "4096": {"mean": 95.0, "min": 90.0, "max": 97.0},
            },
        }
    },
}


def test_table11_figure_puts_both_at_multiples_of_their_training_length() -> None:
    fig = viz.table11_figure(SUMMARY)
    published = [t for t in fig.data if "Gu & Dao" in t.name]
    assert [t.name for t in published] == [f"{n} (Gu & Dao)" for n in PUBLISHED_TABLE_11]
    assert list(published[1].x) == [n / 256 for n in PUBLISHED_LENGTHS] and published[1].x[2] == 1.0
    ours = fig.data[-1]
    assert ours.name == "iRoPE (l4lab, 2 seeds)"
    assert list(ours.x) == [1.0, 64.0] and list(ours.y) == [99.0, 95.0]
    assert list(ours.error_y.array) == [1.0, 2.0] and list(ours.error_y.arrayminus) == [1.0, 5.0]
    assert fig.layout.xaxis.type == "log"


def test_prefill_cost_figure_leaves_out_the_last_layer() -> None:
    run = {
        "positions": "irope",
        "length": 1024,
        "layers": [
            {"kind": "chunked", "seconds": 1.0},
            {"kind": "global", "seconds": 3.0},
            {"kind": "chunked", "seconds": 100.0},  # the last layer: one query per block
        ],
    }
    summary = {"runs": [run, {**run, "length": 2048}], "exponents": {"irope, chunked layers": 1.02}}
    fig = viz.prefill_cost_figure(summary)
    assert [t.name for t in fig.data] == ["irope: chunked layer, slope 1.02", "irope: global layer"]
    assert list(fig.data[0].y) == [1.0, 1.0] and list(fig.data[1].x) == [1024, 2048]
