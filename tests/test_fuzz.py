"""Fuzzed bad inputs (hypothesis, derandomised): Config fields, input ids, generate's arguments, checkpoint
files (truncated, bit-flipped, wrong dtypes, missing keys, missing files, other text) and command-line
arguments. Each case must end in ValueError, TypeError or FileNotFoundError (a usage error, status 2, on
the command line) whose message names what is wrong; never in another exception, a hang or a silently
wrong result. A corrupted checkpoint may also load, but then it must be bitwise the model that was saved
(a flip in a byte nothing reads, say).

What is invalid is decided here, from the documented rules, not by asking l4lab. The cases tried, by
kind and outcome, are written to the file named by ``L4LAB_FUZZ_COUNTS`` (benchmarks/faults.py --fuzz).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import l4lab
from l4lab import __main__ as cli
from l4lab import interop
from l4lab.data import mixture
from l4lab.train import TrainConfig, Trainer

COUNTS: dict[str, Counter] = {}
ALLOWED = (ValueError, TypeError, FileNotFoundError)
VOCAB, MAX_POSITIONS = 260, 64


def fuzz_settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )


def record(kind: str, outcome: str) -> None:
    COUNTS.setdefault(kind, Counter())[outcome] += 1


def expect_error(kind: str, call: Any, *names: str) -> None:
    """``call()`` must raise ValueError, TypeError or FileNotFoundError naming one of ``names``."""
    with pytest.raises(ALLOWED) as caught:
        call()
    message = str(caught.value)
    assert any(name in message for name in names), f"{message!r} names none of {names}"
    record(kind, type(caught.value).__name__)


@pytest.fixture(scope="module", autouse=True)
def write_counts():
    yield
    target = os.environ.get("L4LAB_FUZZ_COUNTS")
    if target:
        Path(target).write_text(json.dumps({k: dict(v) for k, v in sorted(COUNTS.items())}, indent=1))


# ---------------------------------------------------------------------- values that are not what fields need
TEXT = st.text(max_size=6)
NOT_NUMBERS = st.one_of(TEXT, st.none(), st.booleans(), st.lists(st.integers(), max_size=2))
NON_FINITE = st.sampled_from([math.nan, math.inf, -math.inf])
POSITIVE_INT_FIELDS = [
    "vocab_size",
    "hidden_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "moe_intermediate_size",
    "dense_intermediate_size",
    "num_experts",
    "top_k",
    "moe_layer_step",
    "nope_layer_interval",
    "attention_chunk_size",
    "floor_scale",
    "max_position_embeddings",
]
CHOICES = {"ffn": ("moe", "dense"), "positions": ("irope", "rope"), "backend": ("eager", "fused")}


def not_positive_int() -> st.SearchStrategy:
    return st.one_of(st.integers(max_value=0), st.floats(allow_nan=True), NOT_NUMBERS)


def not_positive_number() -> st.SearchStrategy:
    return st.one_of(st.floats(max_value=0), st.integers(max_value=0), NON_FINITE, NOT_NUMBERS)


@st.composite
def bad_config(draw: Any) -> tuple[dict[str, Any], str]:
    """Config keyword arguments with exactly one thing wrong, and the field the error must name."""
    case = draw(
        st.sampled_from(["int", "float", "attn_scale", "flag", "choice", "token", "rope", "relation"])
    )
    if case == "int":
        name = draw(st.sampled_from(POSITIVE_INT_FIELDS))
        return {name: draw(not_positive_int())}, name
    if case == "float":
        name = draw(st.sampled_from(["rope_theta", "rms_norm_eps"]))
        return {name: draw(not_positive_number())}, name
    if case == "attn_scale":
        return {"attn_scale": draw(st.one_of(NON_FINITE, NOT_NUMBERS))}, "attn_scale"
    if case == "flag":
        name = draw(st.sampled_from(["temperature_tuning", "use_qk_norm"]))
        return {name: draw(st.one_of(st.integers(), st.floats(), TEXT, st.none()))}, name
    if case == "choice":
        name = draw(st.sampled_from(sorted(CHOICES)))
        value = draw(st.one_of(TEXT, st.integers(), st.none()).filter(lambda v: v not in CHOICES[name]))
        return {name: value}, name
    if case == "token":
        name = draw(st.sampled_from(["bos_token_id", "eos_token_id"]))
        outside = st.one_of(st.integers(max_value=-1), st.integers(min_value=VOCAB))
        return {name: draw(st.one_of(outside, st.floats(), TEXT, st.booleans()))}, name
    if case == "rope":
        field = draw(
            st.sampled_from(["factor", "low_freq_factor", "high_freq_factor", "original", "unknown"])
        )
        scaling: Any = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
        if field == "factor":
            scaling["factor"] = draw(st.one_of(st.floats(max_value=0.999), NON_FINITE, NOT_NUMBERS))
        elif field == "low_freq_factor":
            scaling["low_freq_factor"] = draw(not_positive_number())
        elif field == "high_freq_factor":
            scaling["high_freq_factor"] = draw(st.one_of(st.floats(max_value=0.999), NON_FINITE, NOT_NUMBERS))
        elif field == "original":
            scaling["original_max_position_embeddings"] = draw(not_positive_int())
        else:
            scaling = draw(st.one_of(TEXT, st.integers(), st.dictionaries(TEXT, st.integers(), min_size=1)))
            if isinstance(scaling, dict) and set(scaling) <= {
                "factor",
                "low_freq_factor",
                "high_freq_factor",
            }:
                scaling["nonsense"] = 1
        return {"rope_scaling": scaling}, "rope_scaling"
    relation = draw(st.sampled_from(["head_dim", "num_kv_heads", "top_k"]))
    if relation == "head_dim":
        return {"head_dim": 2 * draw(st.integers(1, 64)) + 1}, "head_dim"
    if relation == "num_kv_heads":
        heads = draw(st.integers(1, 32))
        kv = draw(st.integers(1, 64).filter(lambda k, h=heads: h % k != 0))
        return {"num_heads": heads, "num_kv_heads": kv}, "num_kv_heads"
    experts = draw(st.integers(1, 16))
    return {"num_experts": experts, "top_k": draw(st.integers(experts + 1, 64))}, "top_k"


def test_bad_config_fields() -> None:
    @fuzz_settings(320)
    @given(bad_config())
    def check(case: tuple[dict[str, Any], str]) -> None:
        fields, name = case
        expect_error("Config fields", lambda: l4lab.Config(**fields), f"Config.{name}")

    check()
    assert sum(COUNTS["Config fields"].values()) >= 320


# ---------------------------------------------------------------------- input ids and generate's arguments
@pytest.fixture(scope="module")
def model() -> l4lab.Llama4:
    torch.manual_seed(0)
    return l4lab.Llama4(l4lab.preset("tiny-moe", max_position_embeddings=MAX_POSITIONS))


@st.composite
def bad_ids(draw: Any) -> tuple[Any, list[str]]:
    """Input ids with one thing wrong, and what the message must say."""
    case = draw(st.sampled_from(["type", "dtype", "dims", "empty", "vocab", "long", "device"]))
    shape = (draw(st.integers(1, 3)), draw(st.integers(1, 8)))
    if case == "type":
        value = draw(st.one_of(st.lists(st.integers(0, 9), max_size=3), st.integers(), TEXT, st.none()))
        value = draw(st.sampled_from([value, np.zeros(shape, dtype=np.int64)]))
        return value, ["input_ids must be a torch tensor"]
    if case == "dtype":
        floats = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.complex64]
        dtype = draw(st.sampled_from([*floats, torch.bool, torch.uint8, torch.int8, torch.int16]))
        return torch.zeros(shape, dtype=dtype), [f"input_ids has dtype {dtype}"]
    if case == "dims":
        dims = draw(st.sampled_from([0, 1, 3, 4]))
        return torch.zeros(tuple(draw(st.integers(1, 3)) for _ in range(dims)), dtype=torch.long), [
            "input_ids must have shape [batch, time]"
        ]
    if case == "empty":
        empty = draw(st.sampled_from([(0, shape[1]), (shape[0], 0), (0, 0)]))
        return torch.zeros(empty, dtype=torch.long), ["input_ids is empty"]
    if case == "vocab":
        ids = torch.zeros(shape, dtype=draw(st.sampled_from([torch.long, torch.int32])))
        b, t = draw(st.integers(0, shape[0] - 1)), draw(st.integers(0, shape[1] - 1))
        bad = draw(st.one_of(st.integers(-(2**31), -1), st.integers(VOCAB, 2**31 - 1)))
        ids[b, t] = bad
        return ids, [f"token id {bad} at [batch {b}, position {t}]"]
    if case == "long":
        return torch.zeros(1, draw(st.integers(MAX_POSITIONS + 1, 3 * MAX_POSITIONS)), dtype=torch.long), [
            f"beyond max_position_embeddings ({MAX_POSITIONS})"
        ]
    return torch.zeros(shape, dtype=torch.long, device="meta"), ["input_ids is on meta"]


def test_bad_input_ids(model: l4lab.Llama4) -> None:
    @fuzz_settings(220)
    @given(bad_ids())
    def check(case: tuple[Any, list[str]]) -> None:
        ids, names = case
        expect_error("input ids", lambda: model(ids), *names)

    check()
    assert sum(COUNTS["input ids"].values()) >= 220


@st.composite
def bad_generation(draw: Any) -> tuple[dict[str, Any], str]:
    """generate's keyword arguments with one of them wrong, and its name."""
    arguments: dict[str, Any] = {"max_new_tokens": 2}
    name = draw(st.sampled_from(["max_new_tokens", "temperature", "top_p", "seed", "eos_token_id"]))
    if name == "max_new_tokens":
        too_many = st.integers(MAX_POSITIONS - 3 + 1, 10**6)  # the prompt has 3 tokens
        value = draw(st.one_of(st.integers(max_value=-1), too_many, st.floats(), NOT_NUMBERS))
    elif name == "temperature":
        value = draw(
            st.one_of(st.floats(max_value=-1e-9), st.integers(max_value=-1), NON_FINITE, NOT_NUMBERS)
        )
    elif name == "top_p":
        value = draw(
            st.one_of(st.floats(max_value=0), st.floats(min_value=1.000001), NON_FINITE, NOT_NUMBERS)
        )
    elif name == "seed":
        out_of_range = st.one_of(st.integers(max_value=-(2**63) - 1), st.integers(min_value=2**64))
        value = draw(st.one_of(st.floats(), out_of_range, TEXT, st.booleans()))
    else:
        outside = st.one_of(st.integers(max_value=-1), st.integers(min_value=VOCAB))
        value = draw(st.one_of(outside, st.floats(), TEXT, st.booleans()))
    arguments[name] = value
    return arguments, name


def test_bad_generation_arguments(model: l4lab.Llama4) -> None:
    ids = torch.tensor([[1, 2, 3]])

    @fuzz_settings(220)
    @given(bad_generation())
    def check(case: tuple[dict[str, Any], str]) -> None:
        arguments, name = case
        expect_error("generate's arguments", lambda: model.generate(ids, **arguments), name)

    check()
    assert sum(COUNTS["generate's arguments"].values()) >= 220


# ---------------------------------------------------------------------- checkpoint files
def small_model(seed: int = 0) -> l4lab.Llama4:
    torch.manual_seed(seed)
    return l4lab.Llama4(
        l4lab.preset("tiny-moe", num_layers=2, hidden_size=32, num_heads=2, num_kv_heads=1, head_dim=16)
    )


def same_model(a: l4lab.Llama4, b: l4lab.Llama4) -> bool:
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    return a.config == b.config and pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[l4lab.Llama4, dict[str, Path]]:
    """The model, saved as one file and as shards with an index."""
    root = tmp_path_factory.mktemp("saved")
    reference = small_model()
    reference.save_pretrained(root / "single")
    interop.save_pretrained(reference, root / "sharded", max_shard_bytes=25_000)
    return reference, {"single": root / "single", "sharded": root / "sharded"}


JSON_TEXT = st.one_of(
    TEXT,
    st.recursive(
        st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), TEXT),
        lambda children: st.one_of(
            st.lists(children, max_size=3), st.dictionaries(TEXT, children, max_size=3)
        ),
        max_leaves=6,
    ).map(json.dumps),
)


@st.composite
def corruption(draw: Any) -> tuple[str, str, Any]:
    """(layout, what to do, its details): one corruption of one checkpoint file."""
    layout = draw(st.sampled_from(["single", "sharded"]))
    what = draw(st.sampled_from(["truncate", "flip", "flip", "dtype", "drop key", "delete", "replace json"]))
    return layout, what, draw(st.tuples(st.integers(0, 10**9), st.integers(0, 10**9), st.integers(0, 7)))


def corrupt(directory: Path, what: str, numbers: tuple[int, int, int], text: str) -> tuple[str, list[str]]:
    """Apply the corruption; returns the file changed and the names an error must mention."""
    files = sorted(p.name for p in directory.iterdir() if p.is_file())
    weights = [name for name in files if name.endswith(".safetensors")]
    a, b, bit = numbers
    if what in ("truncate", "flip", "delete"):
        name = files[a % len(files)]
        path = directory / name
        data = path.read_bytes()
        if what == "truncate":
            path.write_bytes(data[: b % len(data)])
        elif what == "flip":
            flipped = bytearray(data)
            flipped[b % len(data)] ^= 1 << bit
            path.write_bytes(bytes(flipped))
        else:
            path.unlink()
        return name, [name]
    if what == "replace json":
        documents = [n for n in files if n.endswith(".json")]
        name = documents[a % len(documents)]
        (directory / name).write_text(text)
        return name, [name]
    name = weights[a % len(weights)]
    tensors = load_file(str(directory / name))
    key = sorted(tensors)[b % len(tensors)]
    if what == "dtype":
        dtypes = [
            torch.float16,
            torch.bfloat16,
            torch.float64,
            torch.int32,
            torch.int64,
            torch.int8,
            torch.bool,
        ]
        tensors[key] = tensors[key].to(dtypes[bit % len(dtypes)])
    else:
        del tensors[key]
        index = directory / "model.safetensors.index.json"
        if bit % 2 and index.exists():  # also from the index: then the key is missing, not misplaced
            content = json.loads(index.read_text())
            del content["weight_map"][key]
            index.write_text(json.dumps(content))
    save_file(tensors, str(directory / name), metadata={"format": "pt"})  # as another tool would
    return name, [key]


def test_corrupted_checkpoint_files(saved: tuple[l4lab.Llama4, dict[str, Path]]) -> None:
    reference, layouts = saved

    @fuzz_settings(300)
    @given(corruption(), JSON_TEXT)
    def check(case: tuple[str, str, Any], text: str) -> None:
        layout, what, numbers = case
        with tempfile.TemporaryDirectory() as tmp:
            directory = Path(tmp) / "ckpt"
            shutil.copytree(layouts[layout], directory)
            _, names = corrupt(directory, what, numbers, text)
            try:
                loaded = l4lab.load_pretrained(directory)
            except ALLOWED as error:
                assert any(name in str(error) for name in names), f"{error!r} names none of {names}"
                record(f"checkpoint files ({what})", type(error).__name__)
            else:  # allowed only where the change touched nothing that is read
                assert same_model(loaded, reference), f"{what} {numbers}: loaded a different model"
                record(f"checkpoint files ({what})", "accepted")

    check()
    assert sum(sum(c.values()) for k, c in COUNTS.items() if k.startswith("checkpoint files")) >= 300


@pytest.fixture(scope="module")
def training_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Trainer, Path, Any]:
    data = mixture(16, 17, seed=0)
    trainer = Trainer(small_model(), data, None, TrainConfig(steps=4, batch_size=2))
    trainer.step()
    trainer.step()
    path = tmp_path_factory.mktemp("training") / "ck"
    trainer.save(path)
    return trainer, path, data


def same_trainer(a: Trainer, b: Trainer) -> bool:
    """Same step, history, batch stream, weights and moments, bitwise and in the same dtypes."""

    def equal(x: torch.Tensor, y: torch.Tensor) -> bool:
        return x.dtype == y.dtype and torch.equal(x, y)

    moments = [
        (a.optimizer.state.get(p, {}), b.optimizer.state.get(q, {}))
        for p, q in zip(a.model.parameters(), b.model.parameters(), strict=True)
    ]
    weights = zip(a.model.state_dict().values(), b.model.state_dict().values(), strict=True)
    return (
        a.step_count == b.step_count
        and a.history == b.history
        and a.sampler.state() == b.sampler.state()
        and all(equal(x, y) for x, y in weights)
        and all(sa.keys() == sb.keys() and all(equal(sa[k], sb[k]) for k in sa) for sa, sb in moments)
    )


def test_corrupted_training_checkpoints(training_checkpoint: tuple[Trainer, Path, Any]) -> None:
    trainer, path, data = training_checkpoint

    @fuzz_settings(140)
    @given(corruption(), JSON_TEXT)
    def check(case: tuple[str, str, Any], text: str) -> None:
        _, what, numbers = case
        with tempfile.TemporaryDirectory() as tmp:
            directory = Path(tmp) / "ck"
            shutil.copytree(path, directory)
            _, names = corrupt(directory, what, numbers, text)
            try:
                resumed = Trainer.resume(directory, data)
            except ALLOWED as error:
                assert any(name in str(error) for name in names), f"{error!r} names none of {names}"
                record(f"training checkpoints ({what})", type(error).__name__)
            else:
                assert same_trainer(resumed, trainer), f"{what} {numbers}: resumed a different run"
                record(f"training checkpoints ({what})", "accepted")

    check()
    assert sum(sum(c.values()) for k, c in COUNTS.items() if k.startswith("training checkpoints")) >= 140


# ---------------------------------------------------------------------- command-line arguments
LIMITS = {"--steps": None, "--checkpoint-every": None, "--seq-len": 16384, "--batch-size": 4096}
TRAIN_ONLY = {"--seq-len", "--batch-size", "--preset", "--task", "--balance", "--resume"}
OPTIONS = [*LIMITS, "--minutes", "--seed", "--preset", "--task", "--balance", "--out", "--quiet"]
OPTIONS += ["--overwrite", "--resume", "--help"]


def is_positive_int(text: str, limit: int | None) -> bool:
    try:
        value = int(text)
    except ValueError:
        return False
    return value > 0 and (limit is None or value <= limit)


def is_minutes(text: str) -> bool:
    try:
        return 0 <= float(text) <= 1e6
    except ValueError:
        return False


def is_seed(text: str) -> bool:
    try:
        return -(2**63) <= int(text) < 2**64
    except ValueError:
        return False


VALUE = st.text(max_size=8).filter(lambda t: not t.startswith("-"))


@st.composite
def bad_argv(draw: Any) -> tuple[list[str], str]:
    """A command line with one thing wrong, and the text the error must show."""
    command = draw(st.sampled_from(["train", "tour"]))
    case = draw(
        st.sampled_from(["int", "minutes", "seed", "choice", "unknown", "missing", "resume", "short"])
    )
    if case == "int":
        option = draw(
            st.sampled_from(
                ["--steps", "--checkpoint-every"]
                + (["--seq-len", "--batch-size"] if command == "train" else [])
            )
        )
        bad = [option, draw(VALUE.filter(lambda t, o=option: not is_positive_int(t, LIMITS[o])))]
    elif case == "minutes":
        option, bad = "--minutes", ["--minutes", draw(VALUE.filter(lambda t: not is_minutes(t)))]
    elif case == "seed":
        option, bad = "--seed", ["--seed", draw(VALUE.filter(lambda t: not is_seed(t)))]
    elif case == "choice" and command == "train":
        option = draw(st.sampled_from(["--preset", "--task", "--balance"]))
        known = {
            "--preset": cli.trainable_presets(),
            "--task": cli.TASKS,
            "--balance": ("aux_free", "switch", "none"),
        }
        bad = [option, draw(VALUE.filter(lambda t, o=option: t not in known[o]))]
    elif case in ("unknown", "choice"):
        name = "--" + draw(st.text("abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=8))
        option = draw(st.sampled_from([name, draw(VALUE.filter(lambda t: t not in ("",)))]))
        if any(real.startswith(option) for real in OPTIONS):  # an abbreviation argparse accepts
            option = "--no-such-option"
        bad = [option]
    elif case == "missing":
        option = draw(st.sampled_from(["--steps", "--minutes", "--seed", "--out", "--checkpoint-every"]))
        return [command, "--quiet", option], option
    elif case == "resume" and command == "train":
        option = draw(st.sampled_from(["--preset", "--task", "--steps", "--seed", "--overwrite"]))
        value = {
            "--preset": ["tiny"],
            "--task": ["text"],
            "--steps": ["3"],
            "--seed": ["1"],
            "--overwrite": [],
        }
        return [command, "--resume", option, *value[option]], option
    else:
        option = "--seq-len" if command == "train" else "--minutes"
        value = draw(st.sampled_from(["1", "2", "3"])) if command == "train" else "0"
        return [command, option, value], option
    valid = draw(
        st.lists(st.sampled_from([["--quiet"], ["--out", "runs/fuzz"], ["--overwrite"]]), max_size=2)
    )
    pieces = draw(st.permutations([bad, *valid]))
    return [command, *[word for piece in pieces for word in piece]], option


def test_bad_command_lines(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    def no_run(*args: object, **kwargs: object) -> None:
        raise AssertionError("a bad command line started a run")

    for name in ("train", "tour", "resume"):
        monkeypatch.setattr(cli, name, no_run)

    @fuzz_settings(220)
    @given(bad_argv())
    def check(case: tuple[list[str], str]) -> None:
        argv, shown = case
        capsys.readouterr()
        with pytest.raises(SystemExit) as caught:
            cli.main(argv)
        error = capsys.readouterr().err
        assert caught.value.code == 2, (argv, error)
        assert shown in error or repr(shown)[1:-1] in error, (argv, error)
        record("command-line arguments", "usage error")

    check()
    assert sum(COUNTS["command-line arguments"].values()) >= 220
