"""Where a training run stands: its counters and every random generator, as checkpoint values.

``epoch`` is the epoch to continue and ``epoch_step`` the batches of it already trained, so a
resumed run asks the loader for batch ``epoch_step`` of epoch ``epoch``. The learning rate is a
pure function of ``step``, so the step is the scheduler's whole state. Every value is a tensor,
number, string or plain container, so checkpoints load with ``weights_only=True``.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

import numpy as np
import torch


@dataclass
class RunState:
    """The loop's counters and its best validation oIoU so far (-1 before any validation)."""

    step: int = 0
    epoch: int = 0
    epoch_step: int = 0
    best_oiou: float = -1.0

    @classmethod
    def from_checkpoint(cls, checkpoint: dict) -> "RunState":
        return cls(checkpoint["step"], checkpoint["epoch"], checkpoint["epoch_step"], checkpoint["best_oiou"])

    def to_checkpoint(self) -> dict:
        return asdict(self)

    def advance(self) -> None:
        """One optimizer step done."""
        self.step, self.epoch_step = self.step + 1, self.epoch_step + 1

    def next_epoch(self) -> None:
        self.epoch, self.epoch_step = self.epoch + 1, 0

    def record_val(self, oiou: float) -> bool:
        """Keep the best oIoU; True when ``oiou`` is a new best."""
        improved = oiou > self.best_oiou
        self.best_oiou = max(self.best_oiou, oiou)
        return improved


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
