"""Small file helpers used by every writer and reader: atomic writes, the one safe ``torch.load``,
and the one check that a path derived from data stays inside its folder."""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from typing import BinaryIO, Iterator

import torch

from .errors import CheckpointError, SharedRISError, first_line


class UnsafePathError(SharedRISError):
    """A name read from a file would lead outside the folder the command line named."""


def confined(root: str | Path, relative: str | Path, what: str = "a file name") -> Path:
    """``root / relative``, refused with :class:`UnsafePathError` when it is absolute, climbs with
    ``..``, or resolves outside ``root`` through a symbolic link. Every path derived from data (an
    output name, a shard to delete, a member to write) goes through here.

    ``what`` names where ``relative`` came from, for the message (e.g. ``"prompts.jsonl:3"``).
    """
    text = str(relative)
    candidate = Path(text)
    if not text or "\x00" in text or candidate.is_absolute() or candidate.drive or ".." in candidate.parts:
        raise UnsafePathError(f"{what}: {text!r} is not a plain relative name inside {root}")
    base = Path(root).resolve()
    target = (base / candidate).resolve()
    if target != base and base not in target.parents:
        raise UnsafePathError(f"{what}: {text!r} leads outside {root} (through a symbolic link)")
    return Path(root) / candidate


@contextlib.contextmanager
def atomic_write(path: str | Path) -> Iterator[BinaryIO]:
    """Open ``path.tmp`` for binary writing; on success flush it to disk and rename it over ``path``.

    A reader sees the old file or the new one, never half of one. If the block raises, ``path`` is
    left as it was and so is ``path.tmp``, as after a kill: writers that resume clean leftovers up.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        yield handle
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """``path.tmp`` for a writer that takes a file name (safetensors, ONNX); on success flushed to
    disk, given the umask's permissions (such writers may create it private) and renamed over ``path``."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    yield tmp
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    with atomic_write(path) as handle:
        handle.write(data)
    return Path(path)


def write_text_atomic(path: str | Path, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def load_torch_file(path: str | Path, missing_hint: str, mmap: bool = False):
    """``torch.load(weights_only=True)`` on the CPU: a pickle can only rebuild tensors and plain
    containers, never run code. A missing or unreadable file raises one :class:`CheckpointError`
    line; ``missing_hint`` says what to pass instead. ``mmap`` reads tensors only when used."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file; {missing_hint}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # corrupt or truncated file, pickled non-tensor objects, not a torch file at all
        raise CheckpointError(f"{path}: cannot be read as a PyTorch checkpoint ({first_line(exc, 160)})") from None


def read_small_text(path: str | Path, max_bytes: int, fix: str, error: type[SharedRISError] = SharedRISError) -> str:
    """UTF-8 text of a small file a user hands us (a recipe, an eval JSON); a missing, oversized
    or binary file is one ``error`` line naming it, ending with ``fix``."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: file not found; {fix}")
    if path.stat().st_size > max_bytes:
        raise error(f"{path}: {path.stat().st_size:,} bytes, too large for what it should hold; {fix}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise error(f"{path}: not UTF-8 text; {fix}") from None


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _first_existing(path: Path) -> Path:
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def check_output_folder(path: str | Path, option: str) -> None:
    """Before any work: ``path`` can become a folder (it is one, or it and its missing parents can be made)."""
    path = Path(path)
    found = _first_existing(path)
    if not found.is_dir():
        raise SharedRISError(f"{found}: exists and is not a folder, so {option} {path} cannot be created; choose another {option}")


def check_output_file(path: str | Path, option: str) -> None:
    """Before any work: ``path`` can be written as a file (not a folder; its parents can be made)."""
    path = Path(path)
    if path.is_dir():
        raise SharedRISError(f"{path}: is a folder; {option} needs a file name")
    check_output_folder(path.parent, option)
