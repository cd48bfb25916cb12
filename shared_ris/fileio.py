"""Small file helpers used by every writer and reader: atomic writes and the one safe ``torch.load``."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import BinaryIO, Iterator

import torch

from .errors import CheckpointError


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
        text = str(exc).strip()
        first = (text.splitlines()[0] if text else type(exc).__name__)[:160]
        raise CheckpointError(f"{path}: cannot be read as a PyTorch checkpoint ({first})") from None
