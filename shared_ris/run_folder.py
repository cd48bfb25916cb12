"""The run folder that rank 0 writes: ``recipe.yaml``, ``metrics.jsonl``, ``last.pt`` and ``best.pt``.

Other ranks hold a :class:`RunFolder` too, because saving gathers every rank's RNG state (a
collective); they write nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

from .checkpoint import save_checkpoint
from .config import Recipe
from .distributed import DistEnv, gather_objects
from .fileio import write_text_atomic
from .train_state import RunState, rng_state


class RunFolder:
    """``out_dir`` of a training run, as seen from one rank."""

    def __init__(self, out_dir: str | Path, recipe: Recipe, env: DistEnv, tokenizer_path: str | None = None) -> None:
        self.path, self.recipe, self.env, self.tokenizer_path = Path(out_dir), recipe, env, tokenizer_path
        self.metrics = self.path / "metrics.jsonl"
        if env.is_main:
            self.path.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.path / "recipe.yaml", recipe.to_yaml())

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
            "tokenizer_path": self.tokenizer_path,
        }  # fmt: skip
        for name in names:
            save_checkpoint(checkpoint, self.path / name)
