"""Training checkpoints: one plain dict, written atomically, read back with ``weights_only=True``.

{"model", "optimizer", "scaler", "epoch", "epoch_step", "step", "best_oiou", "rng", "recipe",
"tokenizer_path", "version"}
``epoch`` is the epoch to continue and ``epoch_step`` the batches of it already trained, so a
resumed run asks the loader for batch ``epoch_step`` of epoch ``epoch``. The learning rate is a
pure function of ``step``, so the step is the scheduler's whole state. ``rng`` holds one entry
per rank (drop path draws from it); every value is a tensor, number, string or plain container.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from .model import CheckpointError
from .model.checkpoint import load_torch_file

CHECKPOINT_VERSION = 1
REQUIRED_KEYS = ("model", "optimizer", "epoch", "epoch_step", "step", "best_oiou", "rng", "recipe")


def rng_state() -> dict:
    """This process's torch, CUDA, numpy and Python RNG states as weights_only-safe values."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": [list(part) if isinstance(part, tuple) else part for part in random.getstate()],
    }


def set_rng_state(state: dict) -> None:
    """Inverse of :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    random.setstate(tuple(tuple(part) if isinstance(part, list) else part for part in state["python"]))


def save_checkpoint(state: dict, path: str | Path) -> None:
    """Write to ``path.tmp``, flush to disk, then rename over ``path``: a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save({**state, "version": CHECKPOINT_VERSION}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> dict:
    """Read a training checkpoint on the CPU; one-line :class:`CheckpointError` if it is not one."""
    state = load_torch_file(path, "use --resume auto or a path to last.pt")
    missing = [k for k in REQUIRED_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{path}: not a Shared-RIS training checkpoint (no {missing[0]!r}); pass last.pt or best.pt")
    return state
