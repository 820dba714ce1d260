"""SIGKILL at random moments of repeated saves and of training runs: does every kill leave a checkpoint?

Two experiments, each killing processes with SIGKILL (no handler runs, no cleanup) at a random moment:

* **saves**: a process saves model 0, 1, 2, ... with ``save_pretrained`` into one directory (which also
  holds the user's files), switching between one file and several shards and between iRoPE and RoPE
  configs, and logs each save once it returns. After each kill the directory must load, as exactly
  (bitwise, config included) the last save logged or the one after it (killed after its commit, before
  its log line), the user's files must be intact, and at most one staging entry and one journal may be
  left (debris must not accumulate: each save clears the previous debris).
* **training**: ``python -m l4lab train`` with a checkpoint every step, killed and then continued with
  ``--resume`` until it completes. After each kill the checkpoint must resume (``Trainer.resume``), its
  history must equal the first steps of an uninterrupted run of the same command, and at most one
  staging entry may be left in each directory; each completed chain of kills and resumes must end with
  exactly the uninterrupted run's metrics.

Killed processes are forked from a helper process that has imported torch and l4lab (so a kill can land
every second or so rather than after a three-second import); all of them use one thread
(``OMP_NUM_THREADS=1``), so that the uninterrupted reference and the resumed runs compute the same
numbers. Every process is killed and waited for before the script ends.

    .venv/bin/python benchmarks/faults.py                     # 40 + 20 kills; prints the table
    .venv/bin/python benchmarks/faults.py --write --fuzz      # and runs tests/test_fuzz.py; writes
                                                              # benchmarks/results/faults.md

``tests/test_faults.py`` runs the same two experiments with a few kills each.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import random
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from machine import cpu_model

ROOT = Path(__file__).resolve().parents[1]
STAGING_PREFIX = ".l4lab-staging-"  # l4lab.storage's; repeated so that the controller need not import torch
JOURNAL_NAME = ".l4lab-commit.json"
USER_FILES = {"notes.txt": b"the user's notes\n", "data/table.csv": b"a,b\n1,2\n"}
SHARD_BYTES = 3_000_000  # tiny-moe's 9 MB of float32 weights in 3 or 4 shards
TRAIN_STEPS = 30
TRAIN_ARGV = ["--steps", str(TRAIN_STEPS), "--minutes", "0", "--seq-len", "16", "--batch-size", "2"]
TRAIN_ARGV += ["--quiet", "--checkpoint-every", "1"]
TRAIN_KILL_AFTER_S = (0.5, 4.0)
SAVE_KILL_AFTER_S = (0.05, 2.5)


# ---------------------------------------------------------------------- the models the saves write
def saved_model(i: int, base: Any = None) -> Any:
    """Save number ``i``: tiny-moe with every parameter shifted by i / 1000, RoPE when i is odd."""
    import torch

    import l4lab

    if base is None:
        torch.manual_seed(0)
        base = l4lab.Llama4(l4lab.preset("tiny-moe"))
    model = l4lab.Llama4(base.config.replace(positions="rope" if i % 2 else "irope"))
    with torch.no_grad():
        for (_, target), (_, source) in zip(model.named_parameters(), base.named_parameters(), strict=True):
            target.copy_(source + i / 1000)
    return model


def shard_bytes(i: int) -> int:
    """Every third save is sharded, the others one file: saves switch layouts and leave stale shards."""
    return SHARD_BYTES if i % 3 == 0 else 4 * 2**30


# ---------------------------------------------------------------------- the forking helper
def _child_saves(directory: str, start: int, log: str) -> None:
    import torch

    import l4lab
    from l4lab import interop

    torch.manual_seed(0)
    base = l4lab.Llama4(l4lab.preset("tiny-moe"))
    i = start
    while True:
        interop.save_pretrained(saved_model(i, base), directory, max_shard_bytes=shard_bytes(i))
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        os.write(fd, f"{i}\n".encode())
        os.close(fd)
        i += 1


def _child_train(argv: list[str]) -> int:
    from l4lab import __main__ as cli

    return cli.main(argv)


def zygote() -> None:
    """Read one JSON job per line; fork a child for it; report its pid, then its exit status."""
    import torch._dynamo  # noqa: F401 (imported once here, inherited by every child: AdamW imports it)

    import l4lab.__main__  # noqa: F401
    from l4lab.data import corpus_text

    corpus_text()  # read and cached once (pure Python: no torch thread exists before the forks)

    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                fd = os.open(job["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                if job["kind"] == "saves":
                    _child_saves(job["directory"], job["start"], job["saves_log"])
                else:
                    code = _child_train(job["argv"])
            except SystemExit as error:
                code = error.code if isinstance(error.code, int) else 1
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        print(json.dumps({"pid": pid, "status": code}), flush=True)


class Zygote:
    """The forking helper as a context manager; on leaving, every process it started is ended."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.process: subprocess.Popen | None = None
        self.child: int | None = None
        self._buffer = b""

    def __enter__(self) -> Zygote:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--zygote"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        ready = self._read(timeout=120)
        if ready is None or not ready.get("ready"):
            raise RuntimeError("the forking helper did not start within 120 s")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.child is not None:
            _kill(self.child)
        assert self.process is not None
        self.process.stdin.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=30)

    def _read(self, timeout: float) -> dict | None:
        """The helper's next line as JSON, or None after ``timeout`` seconds (unbuffered: select sees
        exactly what has not been read yet)."""
        assert self.process is not None
        fd = self.process.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                raise RuntimeError("the forking helper ended unexpectedly")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return json.loads(line)

    def run(self, job: dict, kill_after_s: float | None, timeout_s: float = 300) -> tuple[int, bool]:
        """Start ``job``; SIGKILL it after ``kill_after_s`` seconds unless it ended first.

        Returns (exit status or minus the signal, whether this call killed it)."""
        assert self.process is not None
        self.process.stdin.write(json.dumps(job).encode() + b"\n")
        self.process.stdin.flush()
        started = self._read(timeout=60)
        if started is None:
            raise RuntimeError("the forking helper did not fork within 60 s")
        self.child = started["pid"]
        wait = timeout_s if kill_after_s is None else kill_after_s
        ended = self._read(timeout=wait)
        killed = False
        if ended is None:
            if kill_after_s is None:
                _kill(self.child)
                raise RuntimeError(f"job {job['kind']} did not end within {timeout_s} s")
            _kill(self.child)
            killed = True
            ended = self._read(timeout=60)
            if ended is None:
                raise RuntimeError(f"process {self.child} survived SIGKILL for 60 s")
        self.child = None
        return ended["status"], killed


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


# ---------------------------------------------------------------------- checks
def staging_entries(directory: Path) -> list[str]:
    if not directory.is_dir():
        return []
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(STAGING_PREFIX))


def user_files_intact(directory: Path) -> bool:
    return all((directory / name).read_bytes() == data for name, data in USER_FILES.items())


def same_model(a: Any, b: Any) -> bool:
    import torch

    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    return a.config == b.config and pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)


@dataclass
class Tally:
    """What the kills of one experiment found."""

    kills: int = 0
    survived: int = 0  # the checks after the kill all passed
    finished_first: int = 0  # the process ended before its kill was due
    phases: dict[str, int] = field(default_factory=dict)  # where the kills landed, judged from the files
    max_staging: int = 0  # the most staging entries in one directory after a kill
    max_journals: int = 0
    chains: int = 0  # training: runs completed by a chain of kills and resumes
    chains_exact: int = 0  # ... that ended with the uninterrupted run's metrics
    steps: list[int] = field(default_factory=list)  # training: the checkpoint's step after each kill
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)

    def landed(self, phase: str) -> None:
        self.phases[phase] = self.phases.get(phase, 0) + 1


def _phase(directory: Path, before: set[str]) -> str:
    """Where a kill landed, from what it left in ``directory`` beside what was there before (``before``:
    the staging entries left by earlier kills, which the process's first save clears)."""
    journal = directory / JOURNAL_NAME
    if journal.exists() and json.loads(journal.read_text())["staging"] not in before:
        return "after a commit, before its end"
    if set(staging_entries(directory)) - before:
        return "while writing, before the commit"
    if journal.exists() or set(staging_entries(directory)) & before:
        return "starting, before its first save"
    return "between saves, or starting"


# ---------------------------------------------------------------------- experiment 1: saves
def save_kills(zyg: Zygote, workdir: Path, kills: int, deadline_s: float, seed: int = 0) -> Tally:
    """Kill repeated ``save_pretrained`` calls ``kills`` times (fewer if ``deadline_s`` runs out)."""
    import torch

    import l4lab
    from l4lab import interop

    rng = random.Random(seed)
    tally = Tally()
    started = time.monotonic()
    directory = workdir / "saves"
    directory.mkdir(parents=True)
    for name, data in USER_FILES.items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_bytes(data)
    torch.manual_seed(0)
    base = l4lab.Llama4(l4lab.preset("tiny-moe"))
    interop.save_pretrained(saved_model(0, base), directory, max_shard_bytes=shard_bytes(0))
    last = 0  # the save the directory holds
    # one save of tiny-moe takes a fraction of a second: kills spread over the first few saves
    while tally.kills < kills and time.monotonic() - started < deadline_s:
        log = workdir / f"saves-{tally.kills}.log"
        job = {"kind": "saves", "directory": str(directory), "start": last + 1, "saves_log": str(log)}
        job["log"] = str(workdir / "children.log")
        before = set(staging_entries(directory))
        status, killed = zyg.run(job, kill_after_s=rng.uniform(*SAVE_KILL_AFTER_S))
        if not killed:
            tally.failures.append(f"save child ended by itself with status {status}")
            break
        tally.kills += 1
        logged = [int(x) for x in log.read_text().split()] if log.exists() else []
        candidates = [logged[-1], logged[-1] + 1] if logged else [last, last + 1]
        tally.landed(_phase(directory, before))
        tally.max_staging = max(tally.max_staging, len(staging_entries(directory)))
        tally.max_journals = max(tally.max_journals, int((directory / JOURNAL_NAME).exists()))
        try:
            loaded = l4lab.load_pretrained(directory)
            match = [i for i in candidates if same_model(loaded, saved_model(i, base))]
        except Exception as error:  # a failed load is what this experiment counts
            tally.failures.append(f"kill {tally.kills}: does not load: {error}")
            continue
        if not match:
            tally.failures.append(f"kill {tally.kills}: loads, but as none of saves {candidates}")
        elif not user_files_intact(directory):
            tally.failures.append(f"kill {tally.kills}: the user's files changed")
        else:
            tally.survived += 1
            last = match[0]
    interop.save_pretrained(saved_model(last + 1, base), directory)  # a last save clears the debris
    if staging_entries(directory) or (directory / JOURNAL_NAME).exists() or not user_files_intact(directory):
        tally.failures.append("the last save left debris or changed the user's files")
    tally.seconds = time.monotonic() - started
    return tally


# ---------------------------------------------------------------------- experiment 2: training runs
def train_kills(zyg: Zygote, workdir: Path, kills: int, deadline_s: float, seed: int = 0) -> Tally:
    """Kill ``python -m l4lab train`` (checkpoint every step) ``kills`` times, resuming after each."""
    from l4lab import __main__ as cli

    rng = random.Random(seed)
    tally = Tally()
    if kills <= 0:
        return tally
    started = time.monotonic()
    reference_out = workdir / "reference"
    argv = ["train", *TRAIN_ARGV, "--out", str(reference_out)]
    status, _ = zyg.run({"kind": "train", "argv": argv, "log": str(workdir / "children.log")}, None)
    if status != 0:
        tally.failures.append(f"the uninterrupted reference run failed with status {status}")
        return tally
    reference = json.loads((reference_out / "metrics.json").read_text())
    train_data, val_data = cli.build_datasets("mixture", 16, 0)
    chain = 0
    out = workdir / f"run-{chain}"
    while True:
        last = tally.kills >= kills or time.monotonic() - started > deadline_s
        if last and not (out / "checkpoint").is_dir():
            break
        # once the kills are done, the chain in progress is completed without one and checked too
        resumable = (out / "checkpoint").is_dir() and _resumes(out, train_data, val_data) is not None
        argv = ["train", "--resume", "--out", str(out), "--quiet", "--checkpoint-every", "1"]
        if not resumable:
            argv = ["train", *TRAIN_ARGV, "--out", str(out), "--overwrite"]
        job = {"kind": "train", "argv": argv, "log": str(workdir / "children.log")}
        before = set(staging_entries(out / "checkpoint"))
        status, killed = zyg.run(job, kill_after_s=None if last else rng.uniform(*TRAIN_KILL_AFTER_S))
        if not killed:
            if status != 0:
                tally.failures.append(f"a training run ended with status {status}")
                break
            tally.finished_first += int(not last)
            tally.chains += 1
            final = json.loads((out / "metrics.json").read_text())
            tally.chains_exact += int(final == reference)
            if final != reference:
                tally.failures.append(f"chain {chain}: the final metrics differ from the uninterrupted run's")
            if last:
                break
            chain += 1
            out = workdir / f"run-{chain}"
            continue
        tally.kills += 1
        checkpoint = out / "checkpoint"
        staging = max(len(staging_entries(checkpoint)), len(staging_entries(out)))
        tally.max_staging = max(tally.max_staging, staging)
        tally.max_journals = max(tally.max_journals, int((checkpoint / JOURNAL_NAME).exists()))
        if not (checkpoint / "state.json").exists() and not (checkpoint / JOURNAL_NAME).exists():
            tally.survived += 1  # killed before its first checkpoint: nothing to lose yet
            tally.landed("before the first checkpoint")
            continue
        tally.landed(_phase(checkpoint, before))
        trainer = _resumes(out, train_data, val_data)
        tally.steps.append(-1 if trainer is None else trainer.step_count)
        if trainer is None:
            tally.failures.append(f"kill {tally.kills}: the checkpoint does not resume")
        elif trainer.history != reference[: trainer.step_count] and trainer.step_count < TRAIN_STEPS:
            tally.failures.append(f"kill {tally.kills}: step {trainer.step_count} differs from the reference")
        elif trainer.step_count == TRAIN_STEPS and trainer.history != reference:
            tally.failures.append(f"kill {tally.kills}: the last checkpoint differs from the reference")
        else:
            tally.survived += 1
    tally.seconds = time.monotonic() - started
    return tally


def _resumes(out: Path, train_data: Any, val_data: Any) -> Any:
    from l4lab.train import Trainer

    try:
        return Trainer.resume(out / "checkpoint", train_data, val_data)
    except (ValueError, FileNotFoundError):
        return None


# ---------------------------------------------------------------------- report
def versions() -> str:
    import safetensors
    import torch

    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    return (
        f"Python {platform.python_version()}, torch {torch.__version__}, "
        f"safetensors {safetensors.__version__}, l4lab at commit {commit or 'unknown'}"
    )


def tally_rows(saves: Tally, training: Tally) -> list[str]:
    lines = [
        "| experiment | kills | survived | ended before the kill | where the kills landed "
        "| most staging entries left | journals left | completed runs equal to uninterrupted | seconds |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for name, t in (
        ("repeated save_pretrained", saves),
        ("train --checkpoint-every 1, then --resume", training),
    ):
        phases = "; ".join(f"{k}: {v}" for k, v in sorted(t.phases.items()))
        runs = f"{t.chains_exact} of {t.chains}" if name.startswith("train") else "-"
        lines.append(
            f"| {name} | {t.kills} | {t.survived} | {t.finished_first} | {phases} | {t.max_staging} "
            f"| {t.max_journals} | {runs} | {t.seconds:.0f} |"
        )
    return lines


def run_fuzz() -> dict[str, Any] | None:
    """Run tests/test_fuzz.py, which writes its counts of cases by kind to L4LAB_FUZZ_COUNTS."""
    with tempfile.TemporaryDirectory() as tmp:
        counts = Path(tmp) / "counts.json"
        env = {**os.environ, "L4LAB_FUZZ_COUNTS": str(counts), "PYTHONPATH": str(ROOT)}
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "-p",
                "no:cacheprovider",
                str(ROOT / "tests" / "test_fuzz.py"),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=1800,
        )
        if not counts.exists():
            print(result.stdout[-3000:], result.stderr[-3000:])
            return None
        return {"passed": result.returncode == 0, "counts": json.loads(counts.read_text())}


def fuzz_rows(fuzz: dict[str, Any]) -> list[str]:
    lines = [
        "| kind | cases | ValueError | TypeError | FileNotFoundError | usage error (exit 2) "
        "| accepted, checked |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    totals: dict[str, int] = {}
    for kind, outcomes in sorted(fuzz["counts"].items()):
        cells = [
            outcomes.get(k, 0)
            for k in ("ValueError", "TypeError", "FileNotFoundError", "usage error", "accepted")
        ]
        lines.append(f"| {kind} | {sum(outcomes.values())} | " + " | ".join(str(c) for c in cells) + " |")
        for k, v in outcomes.items():
            totals[k] = totals.get(k, 0) + v
    cells = [
        totals.get(k, 0) for k in ("ValueError", "TypeError", "FileNotFoundError", "usage error", "accepted")
    ]
    lines.append(f"| all | {sum(totals.values())} | " + " | ".join(str(c) for c in cells) + " |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--save-kills", type=int, default=40)
    parser.add_argument("--train-kills", type=int, default=20)
    parser.add_argument("--minutes", type=float, default=8.0, help="time limit of each experiment")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fuzz", action="store_true", help="also run tests/test_fuzz.py and count its cases")
    parser.add_argument("--write", action="store_true", help="write benchmarks/results/faults.md")
    parser.add_argument("--zygote", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.zygote:
        zygote()
        return 0

    sys.path.insert(0, str(ROOT))
    os.environ["OMP_NUM_THREADS"] = "1"  # before torch is imported: the same numbers as the children
    workdir = Path(tempfile.mkdtemp(prefix="l4lab-faults-"))
    try:
        with Zygote(workdir) as zyg:
            saves = save_kills(zyg, workdir, args.save_kills, 60 * args.minutes, args.seed)
            training = train_kills(zyg, workdir, args.train_kills, 60 * args.minutes, args.seed)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    fuzz = run_fuzz() if args.fuzz else None

    lines = [
        "# SIGKILL at random moments, and fuzzed bad inputs",
        "",
        f"- {datetime.date.today().isoformat()}; {versions()}; {os.cpu_count()} cores, CPU: {cpu_model()}; "
        f"{platform.system()} {platform.release()}",
        f"- saves: tiny-moe (9 MB of float32), every third save in shards of {SHARD_BYTES:,} bytes and the "
        "others one file, odd saves with RoPE positions, into a directory that also holds the user's files; "
        f"killed {SAVE_KILL_AFTER_S[0]}-{SAVE_KILL_AFTER_S[1]} s after the process starts",
        f"- training: `python -m l4lab train {' '.join(TRAIN_ARGV)}`, killed {TRAIN_KILL_AFTER_S[0]}-"
        f"{TRAIN_KILL_AFTER_S[1]} s after it starts, then `--resume`d (and killed again) until it completes; "
        "the chain in progress when the kills are done is completed without a kill",
        f"- seed {args.seed}; one thread per process",
        "",
        *tally_rows(saves, training),
        "",
    ]
    kills = saves.kills + training.kills
    survived = saves.survived + training.survived
    lines.append(f"- {survived} of {kills} kills left a checkpoint equal to a completed save")
    if training.steps:
        lines.append(
            f"- training: the checkpoint's step after each kill (of {TRAIN_STEPS}): "
            + ", ".join(str(s) for s in training.steps)
        )
    for failure in saves.failures + training.failures:
        lines.append(f"- FAILURE: {failure}")
    if fuzz is not None:
        lines += ["", "Fuzzed bad inputs (`tests/test_fuzz.py`, hypothesis):", "", *fuzz_rows(fuzz), ""]
        lines.append(f"- tests/test_fuzz.py {'passed' if fuzz['passed'] else 'FAILED'}")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        path = ROOT / "benchmarks" / "results" / "faults.md"
        path.write_text(text)
        print(f"written: {path}")
    ok = not saves.failures and not training.failures and (fuzz is None or fuzz["passed"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
