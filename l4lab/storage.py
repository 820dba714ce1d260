"""Saving files so that nothing the user has is lost: l4lab's own files change all together or not at all.

A save into a directory (``save_pretrained``, ``Trainer.save``, ``atomic_write_text``) goes through
:func:`replace_files`, which touches only the files the save names and leaves every other file alone:

1. each new file is written into a staging directory inside the target directory (so on the same file
   system) and fsynced;
2. a journal listing the files to move into place and the stale files of an earlier save to remove is
   written there, fsynced, and renamed to ``.l4lab-commit.json``: one atomic rename, the commit point;
3. each staged file is renamed over its final name, the stale files are removed, then the journal.

Weights are written with :func:`save_safetensors`, which records a sha256 of every tensor (its dtype,
shape and bytes) in the file's metadata; :class:`SafetensorsFile` checks them on reading, so a flipped
bit or a partial overwrite is an error that names the file and the tensor, never a silently wrong model.

A kill before the commit leaves the old files untouched. A kill after it leaves the journal, through which
readers (:func:`committed_file`) already see the new files. The next save into the directory first
finishes that journal, then removes the debris of killed saves: entries whose names start with
``.l4lab-staging-``, which only l4lab creates. It never deletes anything else. Saves and reads of one
directory take a lock on it (``fcntl.flock``, where the platform has it), so they do not interleave.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; saves into one directory must not run concurrently
    fcntl = None

__all__ = [
    "CHECKSUM_KEY",
    "JOURNAL_NAME",
    "STAGING_PREFIX",
    "SafetensorsFile",
    "Staging",
    "atomic_write_text",
    "brief_list",
    "committed_file",
    "read_json",
    "reading",
    "replace_files",
    "save_safetensors",
    "sha256_text",
    "tensor_digest",
]

STAGING_PREFIX = ".l4lab-staging-"
JOURNAL_NAME = ".l4lab-commit.json"
_JOURNAL_FORMAT = 1
CHECKSUM_KEY = "l4lab.sha256"  # safetensors metadata: JSON {tensor name: sha256 of dtype, shape and bytes}


# ---------------------------------------------------------------------- small pieces
def _check_name(name: str) -> str:
    """A save writes plain file names into its directory: no separators, no dot names, no staging names."""
    separators = {"/", os.sep, os.altsep or "/", "\0"}
    if (
        not isinstance(name, str)
        or name in ("", ".", "..")
        or any(s in name for s in separators)
        or name.startswith(STAGING_PREFIX)
        or name == JOURNAL_NAME
    ):
        raise ValueError(f"{name!r} is not a plain file name that l4lab saves")
    return name


def _fsync_directory(directory: Path) -> None:
    """Make renames and removals in ``directory`` durable (where the platform can open a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # Windows cannot open a directory; its renames are durable on return
        return
    try:
        os.fsync(fd)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


@contextmanager
def _locked(directory: Path, shared: bool = False) -> Iterator[None]:
    """Hold ``flock`` on ``directory``: exclusive while saving, shared while reading."""
    if fcntl is None:
        yield
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        yield  # unreadable: the save or load itself will say why
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        except OSError as error:
            if error.errno not in (errno.ENOLCK, errno.ENOTSUP, errno.EINVAL):  # file systems without locks
                raise
        yield
    finally:
        os.close(fd)  # closing releases the lock


def read_json(path: str | os.PathLike) -> Any:
    """The JSON value in ``path``; errors name the file and, for invalid JSON, the line and column."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist") from None
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text (byte {error.start}): it is corrupt") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{path} is not valid JSON: {error.msg} at line {error.lineno}, column {error.colno}"
            + (" (the file is empty)" if not text.strip() else "")
        ) from None


# ---------------------------------------------------------------------- the journal
def _read_journal(directory: Path) -> dict[str, Any] | None:
    """The journal of a committed but unfinished save in ``directory``, or None."""
    path = directory / JOURNAL_NAME
    if not path.exists():
        return None
    journal = read_json(path)
    try:
        staging = journal["staging"]
        replace, remove = list(journal["replace"]), list(journal["remove"])
        valid = (
            journal["format"] == _JOURNAL_FORMAT
            and isinstance(staging, str)
            and staging.startswith(STAGING_PREFIX)
            and "/" not in staging
            and all(_check_name(name) for name in replace + remove)
        )
    except (KeyError, TypeError, ValueError):
        valid = False
    if not valid:
        raise ValueError(
            f"{path} is not a journal l4lab wrote (format {_JOURNAL_FORMAT}); it is corrupt. Remove it "
            "to fall back on the files in the directory"
        )
    return {"staging": staging, "replace": replace, "remove": remove}


def _roll_forward(directory: Path) -> None:
    """Finish a committed save: move its staged files into place, remove stale files and the journal."""
    journal = _read_journal(directory)
    if journal is None:
        return
    staging = directory / journal["staging"]
    for name in journal["replace"]:
        if (staging / name).exists():
            os.replace(staging / name, directory / name)
    _fsync_directory(directory)
    for name in journal["remove"]:
        (directory / name).unlink(missing_ok=True)
    (directory / JOURNAL_NAME).unlink()
    _fsync_directory(directory)
    shutil.rmtree(staging, ignore_errors=True)


def _clear_debris(directory: Path) -> list[str]:
    """Remove what killed saves left: entries named ``.l4lab-staging-*``. Returns their names."""
    removed = []
    for entry in directory.iterdir():
        if entry.name.startswith(STAGING_PREFIX):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry.name)
    return removed


def _explained(error: OSError, directory: Path, staging: Path, committed: bool) -> OSError:
    """The same kind of OSError (same errno), saying what failed and what is left in ``directory``."""
    what = error.strerror or str(error)
    if error.filename:
        name = Path(os.fsdecode(error.filename))
        where = name.name if name.parent in (staging, directory) else str(name)
        what = f"{what}: {where}"
    if committed:
        state = (
            "the new files are already committed and are what loads from now on; finishing the save "
            "(moving them into place, removing stale files) did not complete, and the next save into "
            "this directory completes it"
        )
    else:
        state = "nothing in it was changed: the previous files there are intact"
    message = f"saving into {directory} failed ({what}); {state}"
    return OSError(message) if error.errno is None else OSError(error.errno, message)


# ---------------------------------------------------------------------- saving
class Staging:
    """The new files of one save, written beside the old ones until :func:`replace_files` commits them."""

    def __init__(self, directory: Path, root: Path) -> None:
        self.directory = directory
        self.root = root
        self.names: list[str] = []
        self.stale: list[str] = []
        self.committed = False

    def path(self, name: str) -> Path:
        """Where to write the new file ``name`` (a plain file name); it replaces ``directory / name``."""
        if _check_name(name) in self.names:
            raise ValueError(f"{name} is already part of this save")
        if (self.directory / name).is_dir():
            raise IsADirectoryError(
                errno.EISDIR, f"{self.directory / name} is a directory; l4lab will not replace it with a file"
            )
        self.names.append(name)
        return self.root / name

    def write_text(self, name: str, text: str) -> Path:
        """Write ``text`` (UTF-8) as the new file ``name``."""
        path = self.path(name)
        path.write_text(text, encoding="utf-8")
        return path

    def remove(self, name: str) -> None:
        """Remove ``directory / name`` when the save commits: a stale file of an earlier save."""
        if _check_name(name) not in self.stale:
            self.stale.append(name)

    def commit(self) -> None:
        """fsync the new files, then rename the journal into place: after this the save has happened."""
        for name in self.names:
            _fsync_file(self.root / name)
        stale = [n for n in self.stale if n not in self.names and (self.directory / n).exists()]
        if len(self.names) == 1 and not stale:  # one file: its own rename is the commit
            os.replace(self.root / self.names[0], self.directory / self.names[0])
            self.committed = True
            _fsync_directory(self.directory)
            return
        journal = {
            "format": _JOURNAL_FORMAT,
            "staging": self.root.name,
            "replace": self.names,
            "remove": stale,
        }
        staged = self.root / JOURNAL_NAME
        staged.write_text(json.dumps(journal, indent=1) + "\n", encoding="utf-8")
        _fsync_file(staged)
        _fsync_directory(self.root)
        os.replace(staged, self.directory / JOURNAL_NAME)
        self.committed = True
        _fsync_directory(self.directory)


def _prepare_directory(directory: Path) -> None:
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(
            errno.EEXIST,
            f"{directory} is an existing file, not a directory; l4lab saves into a directory and never "
            "replaces a file. Choose another path, or move the file away",
        )
    directory.mkdir(parents=True, exist_ok=True)


@contextmanager
def replace_files(directory: str | os.PathLike) -> Iterator[Staging]:
    """Save some files into ``directory`` all at once; every other file there is left alone.

    Yields a :class:`Staging`: write each new file at ``staging.path(name)`` (or with
    ``staging.write_text``), and name the stale files of an earlier save with ``staging.remove(name)``.
    When the body returns, the files are fsynced and committed together (see the module's docstring);
    if it raises, nothing in ``directory`` changes. ``directory`` is created if needed; a path that is a
    regular file is refused. An OSError (disk full, permission denied) is raised again with its errno,
    saying what failed and that the previous files are intact.
    """
    directory = Path(directory)
    _prepare_directory(directory)
    with _locked(directory):
        try:
            _roll_forward(directory)
            _clear_debris(directory)
            root = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=directory))
        except OSError as error:
            raise _explained(error, directory, directory, committed=False) from error
        staging = Staging(directory, root)
        try:
            yield staging
            staging.commit()
            _roll_forward(directory)
        except BaseException as error:
            if not staging.committed:  # a committed journal still needs its staged files
                shutil.rmtree(root, ignore_errors=True)
            if isinstance(error, OSError):
                raise _explained(error, directory, root, staging.committed) from error
            raise
        shutil.rmtree(root, ignore_errors=True)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` all at once: staged beside it, fsynced, renamed into place.

    ``path`` holds either the old content or the new, never a mixture; the parent directory is created
    if needed and its other files are left alone.
    """
    path = Path(path)
    with replace_files(path.parent) as staging:
        staging.write_text(path.name, text)
    return path


# ---------------------------------------------------------------------- reading
@contextmanager
def reading(directory: str | os.PathLike) -> Iterator[Path]:
    """Hold a shared lock on ``directory`` while reading a save from it, so no save interleaves."""
    directory = Path(directory)
    with _locked(directory, shared=True):
        yield directory


def committed_file(directory: str | os.PathLike, name: str) -> Path | None:
    """The file holding ``name`` of the last committed save in ``directory`` (None: there is none).

    Usually ``directory / name``; after a save killed between its commit and its end, the staged file
    the journal names, or None for a stale file the journal removes.
    """
    directory = Path(directory)
    journal = _read_journal(directory)
    if journal is not None:
        if name in journal["replace"]:
            staged = directory / journal["staging"] / name
            if staged.exists():
                return staged
        elif name in journal["remove"]:
            return None
    path = directory / name
    return path if path.exists() else None


# ---------------------------------------------------------------------- safetensors with checksums
def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def tensor_digest(tensor: Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes: any flipped bit, or a reinterpreted dtype, changes it."""
    flat = tensor.detach().contiguous().cpu().reshape(-1)
    digest = hashlib.sha256(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
    digest.update(flat.view(torch.uint8).numpy())
    return digest.hexdigest()


def _os_error(error: SafetensorError, path: Path) -> OSError:
    """safetensors reports an I/O failure as text ("... (os error 28)"): the OSError it stands for."""
    found = re.search(r"os error (\d+)", str(error))
    code = int(found.group(1)) if found else errno.EIO
    return OSError(code, os.strerror(code), str(path))


def save_safetensors(
    tensors: dict[str, Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> None:
    """``safetensors.torch.save_file`` plus a checksum of every tensor in the metadata (:data:`CHECKSUM_KEY`).

    An I/O failure (disk full, permission denied) is raised as the OSError it is, with its errno.
    """
    checksums = json.dumps({key: tensor_digest(t) for key, t in tensors.items()}, sort_keys=True)
    try:
        save_file(tensors, str(path), metadata={"format": "pt", **(metadata or {}), CHECKSUM_KEY: checksums})
    except SafetensorError as error:
        raise _os_error(error, Path(path)) from error


class SafetensorsFile:
    """A safetensors file open for reading whose every error names it and says what is wrong.

    Use as a context manager. ``get(key)`` checks the tensor against the checksum l4lab recorded when it
    saved the file (files written elsewhere have none) unless ``verify`` is False.
    """

    def __init__(
        self, path: str | os.PathLike, device: str | torch.device = "cpu", verify: bool = True
    ) -> None:
        self.path = Path(path)
        self.device = str(device)
        self.verify = verify
        self._handle: Any = None
        self.metadata: dict[str, str] = {}
        self.checksums: dict[str, str] | None = None

    def __enter__(self) -> SafetensorsFile:
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path} does not exist")
        try:
            self._handle = safe_open(str(self.path), framework="pt", device=self.device)
            self._handle.__enter__()
            self.metadata = dict(self._handle.metadata() or {})
            self._keys = list(self._handle.keys())
        except SafetensorError as error:
            raise ValueError(
                f"{self.path} is not a readable safetensors file ({error}): it is truncated or corrupt"
            ) from None
        if CHECKSUM_KEY in self.metadata:
            self.checksums = self._read_checksums()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._handle.__exit__(*exc)
            self._handle = None

    def _read_checksums(self) -> dict[str, str]:
        try:
            checksums = json.loads(self.metadata[CHECKSUM_KEY])
            valid = isinstance(checksums, dict) and all(isinstance(v, str) for v in checksums.values())
        except json.JSONDecodeError:
            valid = False
        if not valid:
            raise ValueError(f"{self.path}: its checksums (metadata {CHECKSUM_KEY!r}) are corrupt")
        if set(checksums) != set(self._keys):
            odd = sorted(set(checksums) ^ set(self._keys))
            raise ValueError(
                f"{self.path}: its tensors and its checksums do not match (tensors {brief_list(odd)} are "
                "in one and not the other): the file is corrupt"
            )
        return checksums

    def keys(self) -> list[str]:
        return list(self._keys)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handle.get_slice(key).get_shape())

    def get(self, key: str) -> Tensor:
        """The tensor ``key``, checked against its checksum when the file has one."""
        try:
            tensor = self._handle.get_tensor(key)
        except SafetensorError as error:
            raise ValueError(
                f"{self.path}: tensor {key} cannot be read ({error}): the file is corrupt"
            ) from None
        if self.verify and self.checksums is not None and tensor_digest(tensor) != self.checksums[key]:
            raise ValueError(
                f"{self.path}: tensor {key} does not match the checksum recorded when l4lab saved it: the "
                "file is corrupt (a flipped bit or a partial overwrite)"
            )
        return tensor


def brief_list(items: list[Any], limit: int = 8) -> str:
    """A list for an error message, cut after ``limit`` items."""
    if len(items) <= limit:
        return str(items)
    return f"{items[:limit]} and {len(items) - limit} more"
