"""The command line and the HTML report: files written, their contents, errors that list the choices."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import plotly.graph_objects as go
import pytest
import torch

import l4lab
from l4lab import __main__ as cli
from l4lab.data import mixture
from l4lab.report import write_report
from l4lab.train import TrainConfig, Trainer, load_checkpoint_model

SMALL = ["--steps", "3", "--seq-len", "64", "--batch-size", "4", "--quiet"]
BUNDLE = re.compile(r"<script>/\*\*\n\* plotly\.js v.*?</script>", re.S)


def check_self_contained(text: str) -> None:
    """Exactly one inline plotly.js, no script loaded from anywhere, no CDN address outside plotly.js.

    (plotly.js itself holds default addresses of map assets, e.g. ``https://cdn.plot.ly/un/`` for
    topojson, which no figure here asks for.)
    """
    assert len(BUNDLE.findall(text)) == 1
    assert text.count("* plotly.js v") == 1
    assert not re.search(r"<script[^>]*\bsrc=", text)
    assert "https://cdn" not in BUNDLE.sub("", text)


def report_headings(path: Path) -> list[str]:
    return re.findall(r"<h2>(.*?)</h2>", path.read_text())


# ---------------------------------------------------------------------- report
def test_write_report_is_one_self_contained_page(tmp_path: Path) -> None:
    figures = [
        ("First figure", go.Figure(go.Scatter(x=[0, 1], y=[1, 0]), layout=dict(title_text="alpha curve"))),
        ("Second <figure>", go.Figure(go.Bar(x=[0, 1], y=[2, 3]), layout=dict(title_text="beta bars"))),
    ]
    history = [{"step": 1, "loss": 5.5}, {"step": 2, "loss": 4.25, "val_loss": 4.5}]
    summary = {"steps": 2, "loss": 4.25, "note": "a < b"}
    path = write_report(tmp_path / "sub" / "report.html", {"run": history}, figures, summary)
    assert path == tmp_path / "sub" / "report.html"
    text = path.read_text()
    check_self_contained(text)
    headings = ["Summary", "Runs", "Loss curves", "First figure", "Second &lt;figure&gt;"]
    assert report_headings(path) == headings
    for title in ("alpha curve", "beta bars", "Loss curves"):
        assert title in text
    assert '<td class="value">a &lt; b</td>' in text and "4.25" in text
    assert text.count('class="plotly-graph-div"') == 3

    # the same inputs give the same bytes, and rewriting leaves no temporary file behind
    again = write_report(path, {"run": history}, figures, summary)
    assert again.read_text() == text
    assert sorted(p.name for p in path.parent.iterdir()) == ["report.html"]


# ---------------------------------------------------------------------- train
def test_train_writes_checkpoint_metrics_and_report(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    assert cli.main(["train", "--preset", "tiny-moe", "--task", "mixture", "--out", str(out), *SMALL]) == 0
    printed = capsys.readouterr().out
    for name in ("checkpoint", "metrics.json", "report.html"):
        assert str(out / name) in printed

    checkpoint = out / "checkpoint"
    assert sorted(p.name for p in checkpoint.iterdir()) == [
        "model.safetensors",
        "optimizer.safetensors",
        "state.json",
    ]
    state = json.loads((checkpoint / "state.json").read_text())
    assert state["step"] == 3 and state["model_config"]["ffn"] == "moe"
    metrics = json.loads((out / "metrics.json").read_text())
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert metrics == state["history"] and "val_loss" in metrics[-1]
    model = load_checkpoint_model(checkpoint)
    assert model.config == l4lab.preset("tiny-moe")

    report = out / "report.html"
    text = report.read_text()
    check_self_contained(text)
    headings = report_headings(report)
    for heading in (
        "Loss curves",
        "Expert load per MoE layer",
        "Routing statistics",
        "Expert specialisation by domain, layer 0",
        "Routing token by token, layer 0",
        "Attention, layer 0 (RoPE, chunked C=64), head 0",
        "Attention, layer 3 (NoPE, global, temperature tuned), head 0",
    ):
        assert heading in headings
    assert sum(h.startswith("Attention") for h in headings) == 2  # one per kind of layer
    assert "tiny-moe" in text and f"{metrics[-1]['loss']:.4f}" in text


def test_train_dense_on_induction(tmp_path: Path) -> None:
    result = cli.train(tmp_path, "tiny", "induction", steps=2, minutes=None, seq_len=32, batch_size=2)
    assert len(result["history"]) == 2 and result["probe"].stats == []
    headings = report_headings(result["report"])
    assert not any("Expert" in h or "Routing" in h for h in headings)
    assert "Attention, layer 0 (RoPE, chunked C=64), head 0" in headings
    assert re.fullmatch(r"[0-9 ]+", result["probe"].continuation)  # ids, not text


def test_datasets_for_each_task() -> None:
    for task in cli.TASKS:
        train, val = cli.build_datasets(task, 40, seed=1)
        assert train.tokens.shape[1] == val.tokens.shape[1] == 41
        assert len(train) == 8 * len(val) or task == "text"
    with pytest.raises(ValueError, match="unknown task"):
        cli.build_datasets("poems", 40)


def test_train_for_fits_the_schedule_to_the_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fake clock where each step takes 1 s: 20 s allow 20 steps, and the cosine ends at step 20."""
    clock = [0.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    torch.manual_seed(0)
    model = l4lab.Llama4(l4lab.preset("tiny-moe", hidden_size=32, num_heads=2, num_kv_heads=1, head_dim=16))
    data = mixture(16, 17, seed=0)
    trainer = Trainer(model, data, data, TrainConfig(steps=1000, batch_size=2, warmup_steps=2))
    step = trainer.step

    def timed_step() -> dict[str, float]:
        clock[0] += 1.0
        return step()

    monkeypatch.setattr(trainer, "step", timed_step)
    history = cli.train_for(trainer, time_limit_s=20.0, progress=False)
    assert trainer.config.steps == 20 and len(history) == 20
    assert "val_loss" in history[-1]
    assert history[-1]["lr"] < 0.2 * trainer.config.lr  # near the floor (min_lr_ratio 0.1)


# ---------------------------------------------------------------------- tour
def test_tour(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "tour"
    assert cli.main(["tour", "--out", str(out), "--steps", "3", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("trained tiny-moe on the mixture: 3 steps, 12,288 tokens")
    assert re.search(r"layer 3: load entropy \d\.\d\d of the maximum", printed)
    assert "sample, greedy:" in printed and str(out / "report.html") in printed
    assert (out / "checkpoint" / "model.safetensors").exists()
    assert len(json.loads((out / "metrics.json").read_text())) == 3
    assert "<title>l4lab tour</title>" in (out / "report.html").read_text()


# ---------------------------------------------------------------------- runs are never overwritten
@pytest.fixture
def one_thread():
    """One intra-op thread: much faster for these tiny runs on a busy machine (two threads contend)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_a_second_run_into_the_same_out_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture, one_thread: None
) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert cli.main(["train", "--out", str(out), *SMALL]) == 0
    before = run_files(out)
    capsys.readouterr()
    for command in (["train", "--seed", "1", *SMALL], ["tour", "--steps", "2", "--quiet"]):
        with pytest.raises(SystemExit) as exit_info:
            cli.main([*command, "--out", str(out)])
        assert exit_info.value.code == 2
        error = capsys.readouterr().err
        assert (
            f"--out {out} already holds a run (checkpoint, metrics.json, report.html); nothing was changed"
            in error
        )
        assert f"python -m l4lab train --resume --out {out}" in error and "add --overwrite" in error
        assert run_files(out) == before
    assert cli.main(["train", "--out", str(out), "--seed", "1", "--overwrite", *SMALL]) == 0
    assert json.loads((out / "checkpoint" / "state.json").read_text())["train_config"]["seed"] == 1
    assert (out / "notes.txt").read_text() == "mine"
    afile = tmp_path / "afile"
    afile.write_text("mine")
    with pytest.raises(SystemExit):
        cli.main(["train", "--out", str(afile), *SMALL])
    assert "is a file, not a directory" in capsys.readouterr().err and afile.read_text() == "mine"
    with pytest.raises(SystemExit):
        cli.main(["train", "--resume", "--out", str(tmp_path / "empty")])
    assert "holds no checkpoint to continue" in capsys.readouterr().err


DETERMINISTIC = ["--steps", "6", "--minutes", "0", "--seq-len", "32", "--batch-size", "2", "--quiet"]


def test_ctrl_c_saves_a_checkpoint_and_resume_continues_exactly(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, one_thread: None
) -> None:
    assert cli.main(["train", "--out", str(tmp_path / "whole"), *DETERMINISTIC]) == 0
    step = Trainer.step

    def step_then_ctrl_c(self: Trainer) -> dict[str, float]:
        metrics = step(self)
        if self.step_count == 3:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C during step 3: honoured once it is complete
        return metrics

    monkeypatch.setattr(Trainer, "step", step_then_ctrl_c)
    out = tmp_path / "cut"
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN where the shell started the tests in the background
    assert cli.main(["train", "--out", str(out), "--checkpoint-every", "2", *DETERMINISTIC]) == 128 + 2
    monkeypatch.undo()
    error = capsys.readouterr().err
    assert "SIGINT: stopped at step 3 of 6; the checkpoint of that step is in" in error
    assert f"Continue with: python -m l4lab train --resume --out {out}" in error
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 3
    assert len(json.loads((out / "metrics.json").read_text())) == 3 and not (out / "report.html").exists()
    assert signal.getsignal(signal.SIGINT) is before  # the handlers are put back

    assert cli.main(["train", "--resume", "--out", str(out), "--quiet"]) == 0
    whole = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    assert json.loads((out / "metrics.json").read_text()) == whole and len(whole) == 6
    a, b = load_checkpoint_model(tmp_path / "whole" / "checkpoint"), load_checkpoint_model(out / "checkpoint")
    assert all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )
    assert "resumed at step 3" in (out / "report.html").read_text()


def test_sigterm_to_a_real_process_then_resume_through_the_command_line(tmp_path: Path) -> None:
    """SIGTERM to ``python -m l4lab train`` after its first periodic checkpoint: status 143, a checkpoint
    of the last completed step, then ``--resume`` in another process ends with the history of an
    uninterrupted run in a third. Every process is waited for with a timeout and killed if it overruns."""
    env = {**os.environ, "PYTHONPATH": str(Path(cli.__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "l4lab", "train", "--steps", "30", "--minutes", "0", "--quiet"]
    argv += ["--seq-len", "16", "--batch-size", "2"]

    def run(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([*argv, *extra], env=env, capture_output=True, text=True, timeout=300)

    whole = run("--out", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr[-2000:]
    out = tmp_path / "cut"
    command = [*argv, "--out", str(out), "--checkpoint-every", "5"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoint" / "state.json").exists() and process.poll() is None:
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.01)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
        process.wait(timeout=30)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    stopped = re.search(r"SIGTERM: stopped at step (\d+) of 30", stderr)
    assert stopped and f"python -m l4lab train --resume --out {out}" in stderr
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == int(stopped.group(1)) < 30
    resumed = subprocess.run(
        [*argv[:3], "train", "--resume", "--out", str(out), "--quiet"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    expected = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    assert json.loads((out / "metrics.json").read_text()) == expected and len(expected) == 30


# ---------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--preset", "llama4-scout"], r"invalid choice: 'llama4-scout' \(choose from .*'tiny-moe'"),
        (["train", "--task", "poems"], r"invalid choice: 'poems' \(choose from .*'mixture'.*'induction'"),
        (["train", "--balance", "magic"], r"invalid choice: 'magic'"),
        (["train", "--steps", "0"], r"--steps: must be a positive integer"),
        (["train", "--steps", "many"], r"--steps: must be a positive integer, got 'many'"),
        (["train", "--minutes", "-1"], r"--minutes: must be a number of minutes from 0 \(no time limit\)"),
        (
            ["train", "--minutes", "inf"],
            r"--minutes: must be a number of minutes from 0 .* to 1e\+06, got 'inf'",
        ),
        (["train", "--seq-len", "100000"], r"--seq-len: must be a positive integer up to 16384"),
        (["train", "--batch-size", "5000"], r"--batch-size: must be a positive integer up to 4096"),
        (["tour", "--seed", str(2**64)], r"--seed: must be an integer in \[-2\*\*63, 2\*\*64\)"),
        (["train", "--steps", "3", "--seq-len", "3"], r"--seq-len must be at least 4"),
        (["train", "--minutes", "0"], r"--minutes 0 \(no time limit\) needs --steps"),
        (["fly"], r"invalid choice: 'fly'"),
        (
            ["train", "--resume", "--task", "text", "--seed", "1"],
            r"--resume continues a run with .*drop --task, --seed",
        ),
        (
            ["train", "--resume", "--overwrite"],
            r"--resume continues the run in --out and --overwrite .*choose one",
        ),
        (["train", "--checkpoint-every", "0"], r"--checkpoint-every: must be a positive integer"),
    ],
)
def test_errors_list_the_choices(argv: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)
    assert cli.trainable_presets() == ["tiny", "tiny-moe"]
