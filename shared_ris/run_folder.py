"""The run folder that rank 0 writes: ``recipe.yaml``, ``tokenizer.model`` (a copy of the tokenizer
the run uses, so the folder is self-contained), ``metrics.jsonl``, ``last.pt`` and ``best.pt``.

Rank 0 holds an exclusive lock on the folder while the run lives (``flock`` on the folder itself,
released by the kernel however the process ends), so a second ``sris train`` into the same folder
is refused instead of interleaving its files with the first. Other ranks hold a :class:`RunFolder`
too, because saving gathers every rank's RNG state (a collective); they write nothing.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

from .checkpoint import save_checkpoint
from .config import Recipe
from .distributed import DistEnv, gather_objects
from .errors import SharedRISError
from .fileio import write_bytes_atomic, write_text_atomic
from .train_state import RunState, rng_state


TOKENIZER_COPY = "tokenizer.model"


class RunFolderBusy(SharedRISError):
    """Another process is training into this run folder."""


def lock_folder(path: Path) -> int:
    """An open descriptor of ``path`` holding its exclusive lock; :class:`RunFolderBusy` if taken."""
    if path.exists() and not path.is_dir():
        raise SharedRISError(f"{path}: exists and is not a folder; choose another --out")
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunFolderBusy(f"{path}: another sris train is running in this folder; wait for it to end or choose another --out") from None
    return fd


def check_folder_free(path: str | Path) -> None:
    """Fail now (e.g. in a launcher, before starting workers) if a run holds ``path``."""
    if Path(path).exists():
        os.close(lock_folder(Path(path)))


class RunFolder:
    """``out_dir`` of a training run, as seen from one rank; a context manager holding the lock."""

    def __init__(
        self, out_dir: str | Path, recipe: Recipe, env: DistEnv, tokenizer_path: str | Path | None = None, dataset: str | None = None
    ) -> None:
        self.path, self.recipe, self.env, self.tokenizer_source = Path(out_dir), recipe, env, tokenizer_path
        self.dataset = dataset  # the manifest's dataset name, recorded so that a model can say what it learnt from
        self.metrics = self.path / "metrics.jsonl"
        # Checkpoints record the copy's bare name: a path read from a checkpoint is never followed
        # outside the checkpoint's own folder (see shared_ris.checkpoint.find_tokenizer).
        self.tokenizer_path = TOKENIZER_COPY if tokenizer_path is not None else None
        self._lock: int | None = None

    def __enter__(self) -> "RunFolder":
        if self.env.is_main:
            self._lock = lock_folder(self.path)
            write_text_atomic(self.path / "recipe.yaml", self.recipe.to_yaml())
            if self.tokenizer_source is not None and Path(self.tokenizer_source).resolve() != (self.path / TOKENIZER_COPY).resolve():
                write_bytes_atomic(self.path / TOKENIZER_COPY, Path(self.tokenizer_source).read_bytes())
        return self

    def __exit__(self, *exc) -> None:
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def resume_path(self, resume: str | Path | None) -> Path | None:
        """``"auto"`` → ``last.pt`` if there is one (else start afresh); a path → that checkpoint."""
        if resume == "auto":
            last = self.path / "last.pt"
            return last if last.is_file() else None
        return Path(resume) if resume is not None else None

    def open_log(self, resumed_step: int | None) -> None:
        """Start ``metrics.jsonl`` afresh, or on resume drop the lines past the resumed step (written
        after that checkpoint by a run that then died), so the log stays one history."""
        if not self.env.is_main:
            return
        kept = []
        if resumed_step is not None and self.metrics.is_file():
            kept = [line for line in self.metrics.read_text().splitlines() if line and json.loads(line)["step"] <= resumed_step]
        write_text_atomic(self.metrics, "".join(line + "\n" for line in kept))

    def log(self, record: dict) -> None:
        if self.env.is_main:
            with open(self.metrics, "a") as f:
                f.write(json.dumps(record) + "\n")

    def save(self, names: list[str], state_dicts: dict, state: RunState) -> None:
        """Write ``state_dicts`` ({"model", "optimizer", "scaler"}), the counters, every rank's RNG and
        the recipe to each of ``names`` (rank 0); every rank must call it (it gathers the RNGs)."""
        rngs = gather_objects(rng_state(), self.env)
        if not self.env.is_main:
            return
        checkpoint = {
            **state_dicts, **state.to_checkpoint(), "rng": rngs, "recipe": self.recipe.to_dict(),
            "tokenizer_path": self.tokenizer_path, **({"dataset": self.dataset} if self.dataset else {}),
        }  # fmt: skip
        for name in names:
            save_checkpoint(checkpoint, self.path / name)
