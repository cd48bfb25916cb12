"""A trained model as a shareable folder, in the layout Hugging Face model repositories use::

    DIR/model.safetensors   the weights (the model's state dict, float32; safetensors)
    DIR/recipe.yaml         the resolved recipe: architecture, τ, image size, training values
    DIR/tokenizer.model     the sentencepiece model the text ids come from
    DIR/README.md           a model card: data, evaluation, protocol, how to use it, how it was made

``sris export --format bundle`` writes it; ``--checkpoint DIR`` (predict, eval, export) and
``Predictor.from_pretrained(DIR)`` read it. Reading a bundle never unpickles anything: the weights
are safetensors (a JSON header and raw bytes), the recipe is ``yaml.safe_load``-ed and typed, the
tokenizer is a sentencepiece protobuf. Every failure is one :class:`CheckpointError` line.
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import __version__
from .checkpoint import TrainedCheckpoint, find_tokenizer, load_tokenizer, model_from_checkpoint, read_trained
from .config import Recipe, RecipeError, recipe_from_yaml
from .errors import CheckpointError, first_line
from .fileio import atomic_path, check_output_folder, read_small_text, write_bytes_atomic, write_text_atomic
from .model import build_model

WEIGHTS, RECIPE, TOKENIZER, MODEL_CARD = "model.safetensors", "recipe.yaml", "tokenizer.model", "README.md"
BUNDLE_FILES = (WEIGHTS, RECIPE, TOKENIZER, MODEL_CARD)
MAX_TEXT_BYTES = 1 << 20  # recipe.yaml: far more than any real one holds


# -- reading -----------------------------------------------------------------------------------------


def read_bundle(folder: str | Path) -> TrainedCheckpoint:
    """A bundle folder → a validated :class:`TrainedCheckpoint` (weights checked against the recipe's
    model: every key, shape and dtype). The tokenizer is ``tokenizer.model`` beside the weights."""
    folder = Path(folder)
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{folder}: not a model bundle (no {WEIGHTS}); pass a folder written by sris export --format bundle, or a run's best.pt")
    recipe = read_recipe(folder / RECIPE)
    state_dict = read_weights(weights)
    _check_dtypes(state_dict, recipe, weights)
    return TrainedCheckpoint(weights, recipe, state_dict, {"tokenizer_path": TOKENIZER})


def read_recipe(path: Path) -> Recipe:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; a bundle needs the recipe its weights were built with (sris export --format bundle writes it)")
    text = read_small_text(path, MAX_TEXT_BYTES, "export the bundle again", CheckpointError)
    try:
        return recipe_from_yaml(text, str(path))
    except RecipeError as exc:
        raise CheckpointError(str(exc)) from None


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """``safetensors.torch.load_file`` on the CPU; a damaged or foreign file is one line."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # SafetensorError (bad header, truncated), OSError, unknown dtype
        raise CheckpointError(f"{path}: cannot be read as safetensors weights ({first_line(exc)}); export the bundle again") from None


def _check_dtypes(state_dict: dict[str, torch.Tensor], recipe: Recipe, path: Path) -> None:
    """Keys and shapes are checked when the model is built; dtypes here (the model keeps what it is given)."""
    with torch.device("meta"):
        expected = build_model(recipe).state_dict()
    for key, value in state_dict.items():
        if key in expected and value.dtype != expected[key].dtype:
            raise CheckpointError(f"{path}: {key} is {value.dtype}, the model needs {expected[key].dtype}; export the bundle again")



# -- writing -----------------------------------------------------------------------------------------


def safetensors_ready(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous tensors, none sharing memory with another (safetensors refuses both): a tensor
    whose storage an earlier one already uses is copied, the others are passed as they are."""
    seen: set[int] = set()
    tensors = {}
    for key, value in state_dict.items():
        value = value.detach().contiguous()
        storage = value.untyped_storage().data_ptr()
        if storage in seen and value.numel():
            value = value.clone()
        seen.add(value.untyped_storage().data_ptr())
        tensors[key] = value
    return tensors


def write_bundle(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    tokenizer: str | Path | None = None,
    eval_json: str | Path | None = None,
    data_dir: str | Path | None = None,
) -> list[Path]:
    """Write the bundle of a trained run (``best.pt``, ``last.pt``, or another bundle) to ``out_dir``.

    The model card's evaluation comes from ``eval_json`` (what ``sris eval --json`` writes), else
    from the last validation in ``metrics.jsonl`` beside the checkpoint; its data section from the
    manifest of ``data_dir`` (the run folder does not record where its data was). Everything is
    checked before the first file is written; each file is written atomically. Returns the files.
    """
    out_dir = Path(out_dir)
    check_output_folder(out_dir, "--out")
    trained = read_trained(checkpoint)
    recorded = trained.meta.get("tokenizer_path")
    tokenizer_path = find_tokenizer(trained.path, tokenizer, recorded=recorded if isinstance(recorded, str) else None)
    load_tokenizer(tokenizer_path, trained.recipe)  # it must fit the model before it is shipped with it
    model = model_from_checkpoint(trained)  # every key and shape against the recipe
    from .model_card import ModelFacts, data_summary, evaluation_from_eval_json, evaluation_from_metrics, render_model_card

    evaluation = evaluation_from_eval_json(Path(eval_json)) if eval_json is not None else evaluation_from_metrics(trained.path.parent / "metrics.jsonl", trained.recipe)
    facts = ModelFacts.of(model, trained, evaluation, data_summary(data_dir) if data_dir is not None else None, _command(checkpoint, out_dir, tokenizer, eval_json, data_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = safetensors_ready(model.state_dict())
    from safetensors.torch import save_file

    with atomic_path(out_dir / WEIGHTS) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", "shared_ris.recipe": trained.recipe.name, "shared_ris.version": __version__})
    write_text_atomic(out_dir / RECIPE, trained.recipe.to_yaml())
    write_bytes_atomic(out_dir / TOKENIZER, Path(tokenizer_path).read_bytes())
    write_text_atomic(out_dir / MODEL_CARD, render_model_card(facts))
    return [out_dir / name for name in BUNDLE_FILES]


def _command(checkpoint, out_dir, tokenizer, eval_json, data_dir) -> str:
    parts = ["sris export", f"--checkpoint {checkpoint}", "--format bundle", f"--out {out_dir}"]
    parts += [f"{option} {value}" for option, value in (("--tokenizer", tokenizer), ("--eval-json", eval_json), ("--data", data_dir)) if value is not None]
    return " ".join(parts)
