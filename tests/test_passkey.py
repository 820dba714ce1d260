"""Pass-key retrieval (l4lab.passkey): the rows' layout, greedy answers through the cache against a
naive decoder, the question's attention against a full forward, and the command line's results.json."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

import l4lab
from l4lab import __main__ as cli
from l4lab import viz
from l4lab.passkey import (
    FILLER_SENTENCE,
    KEY,
    KEY_DIGITS,
    QUERY,
    YANG_2025,
    PasskeySetup,
    entropy_slope,
    exact_by_length,
    held_out_rows,
    key_position,
    key_straddles_chunk,
    mixed_depth_rows,
    needle_attention,
    passkey_hits,
    passkey_rows,
    run_passkey,
)


def filler(count: int) -> list[int]:
    return [FILLER_SENTENCE[i % len(FILLER_SENTENCE)] for i in range(count)]


@pytest.mark.parametrize(("depth", "before"), [(0.0, 0), (0.5, 27), (1.0, 54)])
def test_rows_put_the_key_at_its_depth_of_the_filler(depth: float, before: int) -> None:
    rows = passkey_rows(3, 64, depth, seed=1)
    assert rows.tokens.shape == (3, 64)
    for row in rows.tokens.tolist():
        key = row[before + 1 : before + 1 + KEY_DIGITS]
        assert row[:before] == filler(before)  # Landmark: the prefix starts at the sentence's start
        assert row[before] == KEY
        after = 64 - before - 2 - 2 * KEY_DIGITS
        assert row[before + 1 + KEY_DIGITS : -1 - KEY_DIGITS] == filler(after)  # and so does the suffix
        assert row[-1 - KEY_DIGITS] == QUERY and row[-KEY_DIGITS:] == key
        assert len(set(key)) == KEY_DIGITS and all(0 <= d <= 9 for d in key)
    assert rows.loss_mask.sum(1).tolist() == [KEY_DIGITS] * 3 and bool(rows.loss_mask[:, -KEY_DIGITS:].all())


def test_training_rows_cover_every_depth_and_differ_from_the_test_rows() -> None:
    rows = mixed_depth_rows(400, 64, seed=1)
    where = (rows.tokens == KEY).float().argmax(1)
    assert int(where.min()) == 0 and int(where.max()) == 64 - 2 - 2 * KEY_DIGITS
    assert all(len(set(key)) == KEY_DIGITS for key in rows.tokens[:, -KEY_DIGITS:].tolist())
    test = held_out_rows(64, 0.5, 8, seed=0)
    assert not any(row in rows.tokens.tolist() for row in test.tokens.tolist())


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: passkey_rows(2, 9, 0.5), "too short for a passkey row: at least 10"),
        (lambda: passkey_rows(2, 64, 1.5), r"depth must be a number in \[0, 1\]"),
        (lambda: passkey_rows(0, 64, 0.5), "num_rows = 0 is not allowed"),
        (lambda: PasskeySetup(positions="alibi"), "positions = 'alibi' is not allowed"),
        (lambda: PasskeySetup(hidden_size=30, num_heads=4), "not a multiple of num_heads"),
        (lambda: PasskeySetup(min_lr_ratio=1.5), r"min_lr_ratio = 1.5 is not allowed"),
    ],
)
def test_bad_input_names_the_problem(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


def test_greedy_answers_through_the_cache_equal_a_naive_decoder() -> None:
    torch.manual_seed(0)
    model = l4lab.Llama4(PasskeySetup(positions="irope", chunk=8).config(100)).eval()
    rows = held_out_rows(100, 0.3, 5, seed=0)
    context = rows.tokens[:, :-KEY_DIGITS]
    with torch.no_grad():  # no cache, no prefill: the whole sequence again for every digit
        for _ in range(KEY_DIGITS):
            context = torch.cat([context, model(context).logits[:, -1:].argmax(-1)], dim=1)
    expected = context[:, -KEY_DIGITS:] == rows.tokens[:, -KEY_DIGITS:]
    assert torch.equal(passkey_hits(model, rows), expected)


@pytest.mark.parametrize("positions", ["irope", "rope"])
def test_the_questions_attention_equals_a_full_forward(positions: str) -> None:
    torch.manual_seed(0)
    model = l4lab.Llama4(PasskeySetup(positions=positions, chunk=16).config(80)).eval()
    rows = held_out_rows(80, 0.25, 3, seed=0)
    layers = needle_attention(model, rows)
    prompt = rows.tokens[:, :-KEY_DIGITS]  # up to and with the question
    with torch.no_grad():
        full = model(prompt, return_attention=True).attentions
    question = prompt.shape[1] - 1
    key_at = int((rows.tokens[0] == KEY).nonzero()[0])
    for layer, probs in zip(layers, full, strict=True):
        row = probs[:, :, question].double()  # [B, heads, T] in float64
        visible = int((row[0, 0] > 0).sum()) if layer["kind"] == "chunked RoPE" else question + 1
        entropy = -(row * row.clamp_min(1e-300).log()).sum(-1).mean()
        assert layer["visible_keys"] == visible
        assert layer["ln_visible"] == pytest.approx(math.log(visible))
        assert layer["entropy"] == pytest.approx(float(entropy), abs=1e-5)
        mass = row[..., key_at : key_at + 1 + KEY_DIGITS].sum(-1).mean()
        assert layer["mass"] == pytest.approx(float(mass), abs=1e-6)
    if positions == "irope":  # the key sits 3 chunks before the question: the chunked layer cannot see it
        assert layers[0]["kind"] == "chunked RoPE" and layers[0]["mass"] == 0.0
        assert layers[0]["visible_keys"] == 80 - KEY_DIGITS - 64


def test_temperature_is_switched_off_only_where_there_is_a_nope_layer() -> None:
    irope = run_passkey(PasskeySetup(positions="irope", steps=2), [32], [0.5], {32: 2}, [32], 1)
    rope = run_passkey(PasskeySetup(positions="rope", steps=2), [32], [0.5], {32: 2}, [32], 1)
    assert sorted(irope["temperature"]) == ["off", "on"] and sorted(rope["temperature"]) == ["on"]
    mechanism = irope["temperature"]["on"]["mechanism"][0]
    assert [layer["kind"] for layer in mechanism["untrained"]] == ["chunked RoPE", "global NoPE"]


def test_command_line_writes_the_grid(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    argv = ["passkey", "--test-lengths", "16,48", "--depths", "0,1", "--steps", "2", "--rows", "2"]
    argv += ["--out", str(tmp_path), "--quiet"]
    assert cli.main(argv) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    grid = result["temperature"]["off"]["grid"]
    assert [(c["length"], c["depth"], c["rows"]) for c in grid] == [
        (16, 0, 2),
        (16, 1, 2),
        (48, 0, 2),
        (48, 1, 2),
    ]
    assert "length      48, depth 1.00: exact" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # never replaced without --overwrite
        cli.main(argv)
    assert "exists; nothing was changed" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--depths", "0,2"], r"--depths: .*numbers in \[0, 1\]"),
        (["--test-lengths", "8,64"], r"--test-lengths: must be at least 10"),
        (["--positions", "alibi"], r"--positions: invalid choice: 'alibi'"),
    ],
)
def test_command_line_errors_name_the_option(
    extra: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit):
        cli.main(["passkey", "--out", str(tmp_path), "--quiet", *extra])
    assert re.search(message, capsys.readouterr().err)


def summary_of_two_rows() -> dict:
    """A summary in the shape benchmarks/passkey.py writes, with two rows and known numbers."""

    def mechanism(kinds: list[str]) -> list[dict]:
        return [
            {
                "length": n,
                "layer": i,
                "kind": kind,
                "mass": 0.5,
                "entropy": 1.0 + i,
                "ln_visible": math.log(n),
            }
            | {"untrained_mass": 0.0, "untrained_entropy": math.log(n), "untrained_ln_visible": math.log(n)}
            for n in (1024, 8192)
            for i, kind in enumerate(kinds)
        ]

    return {
        "lengths": [64, 1024, 8192],
        "depths": [0.0, 0.5, 1.0],
        "yang_2025": {
            "lengths": [8192, 32768, 131072],
            "rope_layers": [6.02, 6.95, 7.62],
            "qk_norm_layers": [1, 2, 3],
        },
        "rows": {
            "irope-on": {
                "label": "iRoPE",
                "temperature": True,
                "seeds": [0, 1],
                "cells": [{"length": 8192, "depth": 0.5, "exact_mean": 75.0}],
                "mechanism": mechanism(["chunked RoPE", "global NoPE"]),
            },
            "rope-on": {
                "label": "RoPE",
                "temperature": True,
                "seeds": [0],
                "cells": [{"length": 64, "depth": 1.0, "exact_mean": 100.0}],
                "mechanism": mechanism(["global RoPE", "global RoPE"]),
            },
        },
    }


def test_grid_figure_puts_each_cell_at_its_length_and_depth() -> None:
    fig = viz.passkey_grid_figure(summary_of_two_rows())
    irope, rope = fig.data
    assert irope.z[1][2] == 75.0 and rope.z[2][0] == 100.0  # [depth, length]
    assert sum(v == v for line in irope.z for v in line) == 1  # the other cells are blank (NaN)
    with pytest.raises(ValueError, match="no rows"):
        viz.passkey_grid_figure({"rows": {}, "lengths": [], "depths": []})


def test_entropy_figure_shows_yang_et_al_and_skips_chunked_layers() -> None:
    fig = viz.entropy_beside_yang_figure(summary_of_two_rows())
    names = [trace.name for trace in fig.data]
    assert not any("chunked" in name for name in names)
    yang = next(trace for trace in fig.data if trace.name.startswith("Yang et al. 2025, RoPE"))
    assert list(yang.y) == [6.02, 6.95, 7.62] and yang.x[0] == pytest.approx(math.log(8192))
    uniform = next(trace for trace in fig.data if trace.name.startswith("ln T"))
    assert list(uniform.x) == list(uniform.y)
    mass = viz.needle_mass_figure(summary_of_two_rows())
    assert len(mass.data) == 4  # two layers of two models


def test_slope_against_ln_t_is_one_for_uniform_attention_and_yang_et_al_are_as_published() -> None:
    lengths = [1024, 8192, 131072]
    assert entropy_slope(lengths, [math.log(n) for n in lengths]) == pytest.approx(1.0)
    assert entropy_slope(lengths, [0.3, 0.3, 0.3]) == pytest.approx(0.0)
    assert YANG_2025["rope_layers"] == [6.02, 6.95, 7.62] and YANG_2025["qk_norm_layers"][-1] == 14.14
    row = {"cells": [{"length": 64, "depth": d, "exact_mean": e} for d, e in ((0.0, 100.0), (1.0, 50.0))]}
    assert exact_by_length(row) == {64: 75.0}
    with pytest.raises(ValueError, match="two or more"):
        entropy_slope([64], [1.0])


def test_a_key_straddles_a_chunk_where_a_digit_opens_one() -> None:
    # at a depth of 0.25 and a power-of-two length >= 256, the key's second digit sits at length / 4
    for length in (256, 1024, 131072):
        start = key_position(length, 0.25)
        assert (start + 2) == length // 4 and key_straddles_chunk(length, 0.25, 32)
        assert int((passkey_rows(1, length, 0.25).tokens[0] == KEY).nonzero()[0]) == start
    assert not key_straddles_chunk(64, 0.25, 32)  # KEY at 14, digits at 15-18
    assert [key_straddles_chunk(64, d, 32) for d in (0.0, 0.5, 1.0)] == [False, False, False]
