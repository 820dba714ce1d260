"""Saving never loses what the user has: saves keep other files, refuse to replace a file, commit all
their files together, survive disk-full and permission errors at every I/O call, clear their own debris;
loading errors name the file and the problem."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import l4lab
from l4lab import interop, storage
from l4lab.data import mixture
from l4lab.train import TrainConfig, Trainer, load_checkpoint_model

IDS = torch.tensor([[1, 5, 9, 2, 7, 3]])
USER_FILES = {"notes.txt": b"my notes\n", "mine/data.csv": b"a,b\n1,2\n", ".ck.123/keep": b"not l4lab's"}


def small_model(seed: int = 0, **overrides: object) -> l4lab.Llama4:
    torch.manual_seed(seed)
    fields = dict(num_layers=2, hidden_size=32, num_heads=2, num_kv_heads=1, head_dim=16)
    return l4lab.Llama4(l4lab.preset("tiny-moe", **{**fields, **overrides}))


def same_model(a: l4lab.Llama4, b: l4lab.Llama4) -> bool:
    """Same config and bitwise the same parameters: the oracle for 'this is that save'."""
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    return a.config == b.config and pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)


def add_user_files(directory: Path) -> None:
    for name, data in USER_FILES.items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_bytes(data)


def assert_user_files_intact(directory: Path) -> None:
    for name, data in USER_FILES.items():
        assert (directory / name).read_bytes() == data, name


def listing(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())


def debris(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(storage.STAGING_PREFIX))


# ---------------------------------------------------------------------- saving into a directory
def test_save_keeps_the_users_files_and_replaces_only_its_own(tmp_path: Path) -> None:
    target = tmp_path / "mywork"
    target.mkdir()
    add_user_files(target)
    first, second = small_model(0), small_model(1)
    first.save_pretrained(target)
    assert_user_files_intact(target)
    assert listing(target) == sorted([*USER_FILES, "config.json", "model.safetensors"])
    assert same_model(l4lab.load_pretrained(target), first)

    interop.save_pretrained(second, target, max_shard_bytes=20_000)  # sharded: the single file goes
    shards = sorted(p.name for p in target.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and not (target / "model.safetensors").exists()
    assert_user_files_intact(target)
    assert same_model(l4lab.load_pretrained(target), second)

    interop.save_pretrained(first, target, max_shard_bytes=60_000)  # fewer shards: the others go
    fewer = sorted(p.name for p in target.glob("model-*-of-*.safetensors"))
    index = json.loads((target / "model.safetensors.index.json").read_text())
    assert fewer == sorted(set(index["weight_map"].values())) and len(fewer) < len(shards)
    assert same_model(l4lab.load_pretrained(target), first)

    (target / "model-00009-of-00009.safetensors").write_bytes(b"the user's, named by no index")
    first.save_pretrained(target)  # back to one file: the index and its shards go, nothing else
    assert listing(target) == sorted(
        [*USER_FILES, "config.json", "model.safetensors", "model-00009-of-00009.safetensors"]
    )
    assert same_model(l4lab.load_pretrained(target), first)
    assert debris(target) == [] and not (target / storage.JOURNAL_NAME).exists()


def test_save_refuses_a_regular_file(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("precious")
    with pytest.raises(FileExistsError, match=r"afile is an existing file, not a directory"):
        small_model().save_pretrained(afile)
    assert afile.read_text() == "precious"
    with pytest.raises(FileExistsError, match="not a directory"):
        Trainer(small_model(), mixture(8, 17, seed=0), None, TrainConfig(steps=1, batch_size=2)).save(afile)
    assert afile.read_text() == "precious" and sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_next_save_clears_only_l4labs_debris(tmp_path: Path) -> None:
    target = tmp_path / "ckpt"
    target.mkdir()
    add_user_files(target)
    (target / ".l4lab-staging-killed1").mkdir()
    (target / ".l4lab-staging-killed1" / "model.safetensors").write_bytes(b"half a file")
    (target / ".l4lab-staging-killed2").write_bytes(b"a killed atomic_write_text")
    small_model().save_pretrained(target)
    assert debris(target) == []
    assert_user_files_intact(target)  # .ck.123, a name l4lab does not own, stays


def test_a_save_killed_after_its_commit_is_the_new_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stop a save right after the journal is renamed into place (what SIGKILL does there): loading
    already gives the new model, and the next save finishes the old one and cleans up."""
    target = tmp_path / "ckpt"
    old, new, newest = small_model(0), small_model(1), small_model(2)
    interop.save_pretrained(old, target, max_shard_bytes=20_000)
    add_user_files(target)
    roll_forward = storage._roll_forward
    calls = []

    def killed_on_second_call(directory: Path) -> None:
        calls.append(directory)
        if len(calls) == 2:  # the first call finishes earlier saves; the second would finish this one
            raise KeyboardInterrupt
        roll_forward(directory)

    monkeypatch.setattr(storage, "_roll_forward", killed_on_second_call)
    with pytest.raises(KeyboardInterrupt):
        interop.save_pretrained(new, target, max_shard_bytes=40_000)
    monkeypatch.undo()
    assert (target / storage.JOURNAL_NAME).exists() and len(debris(target)) == 1
    assert same_model(l4lab.load_pretrained(target), new)
    newest.save_pretrained(target)
    assert same_model(l4lab.load_pretrained(target), newest)
    assert debris(target) == [] and not (target / storage.JOURNAL_NAME).exists()
    assert listing(target) == sorted([*USER_FILES, "config.json", "model.safetensors"])


# ---------------------------------------------------------------------- disk full, permission denied
def test_disk_full_while_writing_a_shard_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "ckpt"
    old = small_model(0)
    old.save_pretrained(target)
    add_user_files(target)
    before = {name: (target / name).read_bytes() for name in listing(target)}
    written = []

    def disk_fills(tensors: dict, filename: str, metadata: dict | None = None) -> None:
        """What safetensors does when the disk fills: part of the file written, then its error."""
        written.append(filename)
        if len(written) == 2:
            Path(filename).write_bytes(b"\0" * 1000)
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(storage, "save_file", disk_fills)
    with pytest.raises(OSError) as caught:
        interop.save_pretrained(small_model(1), target, max_shard_bytes=20_000)
    assert caught.value.errno == errno.ENOSPC
    message = str(caught.value)
    assert "No space left on device: model-00002-of-" in message
    assert f"saving into {target} failed" in message and "the previous files there are intact" in message
    assert {name: (target / name).read_bytes() for name in listing(target)} == before
    assert same_model(l4lab.load_pretrained(target), old)


@pytest.mark.parametrize(
    "call, code", [("fsync", errno.ENOSPC), ("replace", errno.EACCES), ("mkdtemp", errno.EACCES)]
)
def test_an_error_at_every_io_call_leaves_one_whole_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, call: str, code: int
) -> None:
    """Fail the k-th fsync / rename / staging directory of a save, for every k: the error keeps its errno
    and says whether the save committed; the directory then loads as the old model (not committed) or
    the new one (committed), the user's files are intact, and the next save leaves no debris."""
    old, new = small_model(0), small_model(1)
    module, name = (storage.tempfile, "mkdtemp") if call == "mkdtemp" else (storage.os, call)
    real = getattr(module, name)
    failures = 0
    for k in range(1, 50):
        target = tmp_path / f"k{k}"
        interop.save_pretrained(old, target, max_shard_bytes=30_000)
        add_user_files(target)
        count = [0]

        def failing(*args: object, k: int = k, count: list[int] = count, **kwargs: object) -> object:
            count[0] += 1
            if count[0] == k:
                raise OSError(code, os.strerror(code))
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, failing)
        try:
            interop.save_pretrained(new, target, max_shard_bytes=20_000)
        except OSError as error:
            failures += 1
            assert error.errno == code and f"saving into {target} failed ({os.strerror(code)}" in str(error)
            committed = "already committed" in str(error)
            assert committed or "the previous files there are intact" in str(error)
        else:
            committed = True
            assert count[0] < k  # the save made fewer calls than k: every call has been failed once
        monkeypatch.setattr(module, name, real)
        assert same_model(l4lab.load_pretrained(target), new if committed else old)
        assert_user_files_intact(target)
        if count[0] < k:
            break
        new.save_pretrained(target)
        assert debris(target) == [] and same_model(l4lab.load_pretrained(target), new)
    assert failures >= (1 if call == "mkdtemp" else 10)


def test_disk_full_in_a_training_checkpoint_keeps_the_previous_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = mixture(16, 17, seed=0)
    trainer = Trainer(small_model(), data, None, TrainConfig(steps=4, batch_size=2))
    trainer.step()
    trainer.save(tmp_path / "ck")
    before = {p.name: p.read_bytes() for p in (tmp_path / "ck").iterdir()}
    trainer.step()

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage, "_fsync_file", disk_full)
    with pytest.raises(OSError, match=r"No space left on device.*previous files there are intact"):
        trainer.save(tmp_path / "ck")
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in (tmp_path / "ck").iterdir()} == before
    assert Trainer.resume(tmp_path / "ck", data).step_count == 1


# ---------------------------------------------------------------------- loading errors name the file
@pytest.fixture
def saved(tmp_path: Path) -> Path:
    interop.save_pretrained(small_model(), tmp_path / "ckpt", max_shard_bytes=30_000)
    return tmp_path / "ckpt"


def first_shard(path: Path) -> Path:
    return sorted(path.glob("model-*-of-*.safetensors"))[0]


def test_truncated_shard_is_named(saved: Path) -> None:
    shard = first_shard(saved)
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(ValueError, match=rf"{shard.name} is not a readable safetensors file .*truncated"):
        l4lab.load_pretrained(saved)


def test_invalid_json_names_the_file_and_line(saved: Path) -> None:
    text = (saved / "config.json").read_text()
    (saved / "config.json").write_text(text.replace('"hidden_size": 32,', '"hidden_size": 32,,'))
    with pytest.raises(ValueError, match=r"config\.json is not valid JSON: Expecting .* at line \d+, column"):
        l4lab.load_pretrained(saved, verify=False)
    (saved / "model.safetensors.index.json").write_text("")
    with pytest.raises(ValueError, match=r"index\.json is not valid JSON: .*line 1.*\(the file is empty\)"):
        l4lab.load_pretrained(saved)


def test_missing_shard_named_by_the_index(saved: Path) -> None:
    shard = first_shard(saved)
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=rf"{shard.name} does not exist: .*index\.json names it"):
        l4lab.load_pretrained(saved)


def test_dtype_and_shape_mismatches_name_the_key(tmp_path: Path) -> None:
    small_model().save_pretrained(tmp_path)
    weights = load_file(str(tmp_path / "model.safetensors"))
    weights["model.norm.weight"] = weights["model.norm.weight"].half()
    weights["lm_head.weight"] = weights["lm_head.weight"].int()
    weights["model.embed_tokens.weight"] = weights["model.embed_tokens.weight"][:5]
    save_file(weights, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError) as caught:
        l4lab.load_pretrained(tmp_path)
    message = str(caught.value)
    assert "model.norm.weight: expected float32 (config.json's dtype), got float16" in message
    assert "lm_head.weight: expected float32 (config.json's dtype), got int32" in message
    assert "model.embed_tokens.weight: expected (260, 32), got (5, 32) in model.safetensors" in message
    # a dtype asked for converts floating weights, but integers are still wrong
    with pytest.raises(ValueError, match=r"lm_head\.weight: expected a floating-point dtype, got int32"):
        l4lab.load_pretrained(tmp_path, dtype=torch.bfloat16)


def test_flipped_bits_are_caught_by_the_checksums(saved: Path) -> None:
    shard = first_shard(saved)
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x10  # in the last tensor's bytes
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"{shard.name}: tensor .* does not match the checksum"):
        l4lab.load_pretrained(saved)
    assert l4lab.load_pretrained(saved, verify=False) is not None  # verify=False reads it anyway

    text = (saved / "config.json").read_text()
    (saved / "config.json").write_text(text.replace('"rms_norm_eps": 1e-05', '"rms_norm_eps": 1e-06'))
    with pytest.raises(ValueError, match=r"config\.json was changed after l4lab saved it"):
        l4lab.load_pretrained(saved)


def test_training_checkpoint_errors_name_the_file(tmp_path: Path) -> None:
    data = mixture(16, 17, seed=0)
    trainer = Trainer(small_model(), data, None, TrainConfig(steps=4, batch_size=2))
    trainer.step()
    trainer.save(tmp_path / "ck")
    assert load_checkpoint_model(tmp_path / "ck") is not None
    state = (tmp_path / "ck" / "state.json").read_text()
    (tmp_path / "ck" / "state.json").write_text(state.replace('"step": 1', '"step": 2'))
    with pytest.raises(ValueError, match=r"state\.json: step 2 but 1 steps of history"):
        Trainer.resume(tmp_path / "ck", data)
    (tmp_path / "ck" / "state.json").write_text(state[:-20])
    with pytest.raises(ValueError, match=r"state\.json is not valid JSON: .* at line \d+"):
        Trainer.resume(tmp_path / "ck", data)
    (tmp_path / "ck" / "state.json").write_text(state.replace('"loss": ', '"loss": 1'))
    with pytest.raises(ValueError, match=r"state\.json was changed after the checkpoint was saved"):
        Trainer.resume(tmp_path / "ck", data)
    (tmp_path / "ck" / "state.json").write_text(state)
    (tmp_path / "ck" / "optimizer.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"optimizer\.safetensors does not exist"):
        Trainer.resume(tmp_path / "ck", data)
    with pytest.raises(FileNotFoundError, match=r"no training checkpoint directory at .*nowhere"):
        Trainer.resume(tmp_path / "nowhere", data)
