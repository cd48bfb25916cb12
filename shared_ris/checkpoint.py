"""A training run's files: what ``sris train`` saves, and what resume, eval and predict read back.

A checkpoint is one plain dict, written atomically and read with ``torch.load(weights_only=True)``::

    {"model", "optimizer", "scaler", "epoch", "epoch_step", "step", "best_oiou", "rng", "recipe",
     "tokenizer_path", "dataset", "version"}

``epoch`` is the epoch to continue and ``epoch_step`` the batches of it already trained (see
:class:`shared_ris.train_state.RunState`); ``rng`` holds one entry per rank; ``dataset`` is the
manifest's name of the training data (absent in older checkpoints). Inference needs only
``model`` and ``recipe`` (:func:`save_trained` writes just those). Official BEiT-3 files are a
different thing, read by :mod:`shared_ris.model.pretrained`; passing one here is caught and named.
Every failure is one :class:`CheckpointError` line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import Recipe, RecipeError, recipe_from_dict
from .errors import CheckpointError, SharedRISError
from .fileio import atomic_write, load_torch_file
from .model import SharedRIS, build_model, state_dict_kind
from .tokenizer import Tokenizer

CHECKPOINT_VERSION = 1
RESUME_KEYS = ("model", "optimizer", "epoch", "epoch_step", "step", "best_oiou", "rng", "recipe")
# Looked for next to a checkpoint when no tokenizer is given or recorded.
TOKENIZER_NAMES = ("tokenizer.model", "spm.model", "beit3.spm")


# -- writing ---------------------------------------------------------------------------------------


def save_checkpoint(state: dict, path: str | Path) -> None:
    """Write ``state`` (plus ``version``) to ``path.tmp``, flush it to disk, rename it over ``path``."""
    with atomic_write(path) as handle:
        torch.save({**state, "version": CHECKPOINT_VERSION}, handle)


def save_trained(model: nn.Module, recipe: Recipe, path: str | Path, **meta: Any) -> Path:
    """Save weights and recipe in the format eval and predict read (``meta``: plain values such as
    ``step`` or ``tokenizer_path``). What tests, benchmarks and exports use instead of a full run.
    The folder is created if needed."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint({"model": model.state_dict(), "recipe": recipe.to_dict(), **meta}, path)
    return Path(path)


# -- resuming --------------------------------------------------------------------------------------


def load_checkpoint(path: str | Path) -> dict:
    """A training checkpoint to resume from, on the CPU; one-line :class:`CheckpointError` if it is not one."""
    state = load_torch_file(path, "use --resume auto or a path to last.pt")
    missing = [k for k in RESUME_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{path}: not a Shared-RIS training checkpoint (no {missing[0]!r}); pass last.pt or best.pt")
    return state


# -- loading a trained model -----------------------------------------------------------------------


def clean_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip the ``module.`` prefix that a DDP wrapper adds to every key."""
    if state_dict and all(k.startswith("module.") for k in state_dict):
        return {k[len("module.") :]: v for k, v in state_dict.items()}
    return state_dict


@dataclass
class TrainedCheckpoint:
    """A validated training checkpoint, not yet turned into a model."""

    path: Path
    recipe: Recipe
    state_dict: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)  # epoch, step, tokenizer_path, … (plain values)


def read_trained(path: str | Path) -> TrainedCheckpoint:
    """Read and validate a checkpoint written by ``sris train`` (``weights_only``, on the CPU).

    The file is memory-mapped: tensors are read when used, so the optimizer state that ``last.pt``
    also holds is never loaded, and checking a checkpoint costs almost nothing. A folder is read
    as a model bundle (:func:`shared_ris.bundle.read_bundle`: safetensors, never unpickled)."""
    path = Path(path)
    if path.is_dir():
        from .bundle import read_bundle  # the bundle module builds on this one

        return read_bundle(path)
    obj = load_torch_file(path, "pass a run's best.pt or last.pt (written by sris train)", mmap=True)
    if not (isinstance(obj, dict) and isinstance(obj.get("model"), dict) and isinstance(obj.get("recipe"), dict)):
        inner = (obj.get("model") or obj.get("module") or obj) if isinstance(obj, dict) else None
        if isinstance(inner, dict) and state_dict_kind(inner) == "beit3":
            raise CheckpointError(f"{path}: this is a BEiT-3 pretrained checkpoint; use it with sris train --pretrained")
        raise CheckpointError(f"{path}: not a Shared-RIS training checkpoint (expected a dict with 'model' and 'recipe', as sris train writes)")
    try:
        recipe = recipe_from_dict(obj["recipe"])
    except RecipeError as exc:
        raise CheckpointError(f"{path}: its recipe is invalid ({exc})") from None
    meta = {k: v for k, v in obj.items() if k not in ("model", "recipe") and isinstance(v, (int, float, str, bool))}
    return TrainedCheckpoint(path, recipe, clean_state_dict(obj["model"]), meta)


def model_from_checkpoint(checkpoint: TrainedCheckpoint, device: str | torch.device = "cpu") -> SharedRIS:
    """Build the recipe's model, load the weights strictly and return it in eval mode on ``device``.

    The model is built on the meta device and takes the checkpoint's tensors as they are, so no
    time goes into a random initialisation that would be overwritten."""
    with torch.device("meta"):
        model = build_model(checkpoint.recipe)
    expected = model.state_dict()
    missing = [k for k in expected if k not in checkpoint.state_dict]
    unexpected = [k for k in checkpoint.state_dict if k not in expected]
    where = f"{checkpoint.path}: does not match its recipe '{checkpoint.recipe.name}'"
    if missing:
        raise CheckpointError(f"{where}: {len(missing)} keys are missing (e.g. {missing[0]})")
    if unexpected:
        raise CheckpointError(f"{where}: {len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
    for key, value in checkpoint.state_dict.items():
        if value.shape != expected[key].shape:
            raise CheckpointError(f"{where}: shape mismatch for {key}: checkpoint {list(value.shape)} vs model {list(expected[key].shape)}")
    model.load_state_dict(checkpoint.state_dict, assign=True)
    return model.to(device).eval()


def load_trained(path: str | Path, device: str | torch.device = "cpu") -> tuple[SharedRIS, Recipe]:
    """A trained run's checkpoint → (model in eval mode on ``device``, its recipe)."""
    checkpoint = read_trained(path)
    return model_from_checkpoint(checkpoint, device), checkpoint.recipe


# -- the tokenizer that goes with a run --------------------------------------------------------------


def find_tokenizer(
    checkpoint_path: str | Path,
    explicit: str | Path | None = None,
    *,
    recorded: str | None = None,
    data_dir: str | Path | None = None,
) -> Path:
    """Which sentencepiece file to use, first found of: ``explicit``; ``data_dir/spm.model``; beside
    the checkpoint, the file name it recorded, then ``tokenizer.model`` / ``spm.model`` / ``beit3.spm``.

    ``recorded`` comes from the checkpoint, which is data: only its file name is used, and only
    inside the checkpoint's folder. Raises a one-line error naming the places it looked."""
    if explicit is not None:
        return Path(explicit)
    folder = Path(checkpoint_path).parent
    candidates = []
    if data_dir is not None:
        candidates.append(Path(data_dir) / "spm.model")
    if recorded and Path(recorded).name not in ("", ".", ".."):
        candidates.append(folder / Path(recorded).name)
    candidates += [folder / name for name in TOKENIZER_NAMES]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    looked = ", ".join(dict.fromkeys(str(c) for c in candidates))
    raise SharedRISError(f"no tokenizer found (looked for {looked}); pass --tokenizer PATH (beit3.spm, or the synthetic set's spm.model)")


def load_tokenizer(path: str | Path, recipe: Recipe) -> Tokenizer:
    """A :class:`Tokenizer` at the recipe's text length whose ids fit the model's text embedding."""
    tokenizer = Tokenizer(path, max_len=recipe.model.max_text_len)
    if tokenizer.vocab_size > recipe.model.encoder.vocab_size:
        raise SharedRISError(
            f"{path}: tokenizer has {tokenizer.vocab_size} ids but model.encoder.vocab_size is {recipe.model.encoder.vocab_size}; "
            "pass the tokenizer the model was built for (--tokenizer) or raise model.encoder.vocab_size"
        )
    return tokenizer


def _checkpoint_and_tokenizer(checkpoint, tokenizer, data_dir) -> tuple[TrainedCheckpoint, Tokenizer]:
    trained = read_trained(checkpoint)
    recorded = trained.meta.get("tokenizer_path")
    # trained.path: the weights file, whose folder holds the tokenizer (a bundle's model.safetensors)
    tokenizer_path = find_tokenizer(trained.path, tokenizer, recorded=recorded if isinstance(recorded, str) else None, data_dir=data_dir)
    return trained, load_tokenizer(tokenizer_path, trained.recipe)


def check_run(checkpoint: str | Path, tokenizer: str | Path | None = None, *, data_dir: str | Path | None = None) -> Recipe:
    """Every check :func:`load_run` makes before building the model (for a launcher's preflight)."""
    return _checkpoint_and_tokenizer(checkpoint, tokenizer, data_dir)[0].recipe


def load_run(
    checkpoint: str | Path,
    tokenizer: str | Path | None = None,
    *,
    device: str | torch.device = "cpu",
    data_dir: str | Path | None = None,
) -> tuple[SharedRIS, Recipe, Tokenizer]:
    """Everything inference needs from a run: model (eval mode, on ``device``), recipe, tokenizer.

    The tokenizer is resolved (:func:`find_tokenizer`) before the weights are built, so a missing
    tokenizer fails fast.
    """
    trained, text_tokenizer = _checkpoint_and_tokenizer(checkpoint, tokenizer, data_dir)
    return model_from_checkpoint(trained, device), trained.recipe, text_tokenizer
