"""The ``README.md`` of a model bundle: what the model is, what it was trained on, how it scores
and under which protocol, how to use it, and the command that made the bundle.

Its figures come from files (an eval JSON, ``metrics.jsonl``, a data manifest), so they are read
as data: sizes bounded, types checked, every number finite, names plain; text that reaches the
Markdown is escaped, so a file cannot add links, HTML or table cells to the card.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from . import __version__
from .checkpoint import TrainedCheckpoint
from .config import Recipe
from .errors import SharedRISError
from .fileio import read_small_text
from .model import SharedRIS

MAX_TEXT_BYTES = 16 << 20  # an eval JSON or metrics.jsonl far larger than any real one
SCORE_KEYS = ("oIoU", "mIoU", "P@0.5", "P@0.7", "P@0.9")
PLAIN_NAME = re.compile(r"[A-Za-z0-9_.+-]{1,64}")


@dataclass
class Evaluation:
    splits: dict[str, dict[str, float]]  # split → {oIoU, mIoU, P@0.5, P@0.7, P@0.9 (fractions), n}
    protocol: str  # the protocol line sris eval prints under its tables
    source: str  # where the figures came from


@dataclass
class DataSummary:
    dataset: str
    splits: dict[str, tuple[int, int]]  # split → (refs, expressions)
    details: str = ""  # e.g. "split_by unc"


@dataclass
class ModelFacts:
    recipe: Recipe
    parameters: int
    step: int | None
    epoch: int | None
    evaluation: Evaluation | None
    data: DataSummary | None
    command: str

    @classmethod
    def of(cls, model: SharedRIS, trained: TrainedCheckpoint, evaluation, data, command: str) -> "ModelFacts":
        plain_int = lambda v: v if isinstance(v, int) and not isinstance(v, bool) else None  # noqa: E731
        parameters = sum(p.numel() for p in model.parameters())
        return cls(trained.recipe, parameters, plain_int(trained.meta.get("step")), plain_int(trained.meta.get("epoch")), evaluation, data, command)


# -- reading the figures -------------------------------------------------------------------------------


def _parse_json(text: str, where: str, fix: str):
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        raise SharedRISError(f"{where}: not valid JSON; {fix}") from None


def _scores(record, where: str) -> dict[str, float]:
    """One split's figures: each score a finite fraction in [0, 1], ``n`` a count."""
    if not isinstance(record, dict):
        raise SharedRISError(f"{where}: a split's figures must be an object")
    scores = {}
    for key in SCORE_KEYS:
        value = record.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not 0.0 <= value <= 1.0:
            raise SharedRISError(f"{where}: {key} must be a fraction in [0, 1], got {str(value)[:20]}")
        scores[key] = float(value)
    n = record.get("n")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise SharedRISError(f"{where}: n must be a count, got {str(n)[:20]}")
    return {**scores, "n": n}


def _split_name(name, where: str) -> str:
    if not isinstance(name, str) or not PLAIN_NAME.fullmatch(name):
        raise SharedRISError(f"{where}: split name {str(name)[:40]!r} is not a plain name (letters, digits, . _ + -)")
    return name


def evaluation_from_eval_json(path: Path) -> Evaluation:
    """The figures of ``sris eval --json FILE``."""
    fix = "pass the JSON that sris eval --json writes"
    document = _parse_json(read_small_text(path, MAX_TEXT_BYTES, fix), str(path), fix)
    splits = document.get("splits") if isinstance(document, dict) else None
    if not isinstance(splits, dict) or not splits:
        raise SharedRISError(f"{path}: no 'splits' with figures; {fix}")
    protocol = document.get("protocol")
    description = protocol.get("description") if isinstance(protocol, dict) else None
    figures = {_split_name(name, str(path)): _scores(record, f"{path}: split {name}") for name, record in splits.items()}
    return Evaluation(figures, description if isinstance(description, str) else "protocol: not recorded", f"`sris eval` ({path.name})")


def evaluation_from_metrics(path: Path, recipe: Recipe) -> Evaluation | None:
    """The last validation that ``sris train`` logged in ``metrics.jsonl`` (None: no file, or none logged)."""
    if not path.is_file():
        return None
    fix = "repair it, or pass --eval-json FILE (sris eval --json) instead"
    last = None
    for number, line in enumerate(read_small_text(path, MAX_TEXT_BYTES, fix).splitlines(), 1):
        if line.strip():
            record = _parse_json(line, f"{path}:{number}", fix)
            if isinstance(record, dict) and "split" in record:
                last = (number, record)
    if last is None:
        return None
    number, record = last
    split = _split_name(record["split"], f"{path}:{number}")
    from .evaluate import PROTOCOLS  # what training's validation scores with

    step = record.get("step") if isinstance(record.get("step"), int) else "?"
    return Evaluation({split: _scores(record, f"{path}:{number}")}, PROTOCOLS["default"].describe(recipe.model.image_size), f"the last validation of training (step {step}, `metrics.jsonl`)")


def data_summary(data_dir: str | Path) -> DataSummary:
    """Dataset, splits and counts from a prepared folder's (checked) manifest."""
    from .data import read_manifest

    manifest = read_manifest(data_dir)
    dataset = manifest.get("dataset")
    where = f"{data_dir}: manifest.json"
    splits = {}
    for name, info in (manifest.get("splits") or {}).items():
        counts = (info.get("samples"), info.get("sentences")) if isinstance(info, dict) else (None, None)
        if not all(isinstance(c, int) and not isinstance(c, bool) for c in counts):
            raise SharedRISError(f"{where}: split {str(name)[:40]!r} lacks its counts; prepare the data again")
        splits[_split_name(name, where)] = counts
    config = manifest.get("config") if isinstance(manifest.get("config"), dict) else {}
    details = f"split_by {config['split_by']}" if isinstance(config.get("split_by"), str) else ""
    return DataSummary(_split_name(dataset, where) if dataset is not None else "unknown", splits, _escape(details))


# -- rendering --------------------------------------------------------------------------------------------


def _escape(text: str, limit: int = 300) -> str:
    """Data as inert Markdown: one line, no HTML, links, emphasis or table cells."""
    text = " ".join(str(text).split())[:limit]
    return re.sub(r"([\\`*_\[\]<>|#!])", r"\\\1", text)


def _front_matter(facts: ModelFacts) -> str:
    meta = {"library_name": "shared-ris", "pipeline_tag": "image-segmentation",
            "tags": ["referring-image-segmentation", "shared-ris", "beit3", facts.recipe.name]}  # fmt: skip
    if facts.data is not None and facts.data.dataset != "unknown":
        meta["datasets"] = [facts.data.dataset]
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---"


def _overview(facts: ModelFacts) -> list[str]:
    model, side = facts.recipe.model, facts.recipe.model.image_size
    trained = ", ".join(part for part in (f"{facts.step:,} steps" if facts.step is not None else "", f"epoch {facts.epoch}" if facts.epoch is not None else "") if part)
    rows = [
        ("recipe", f"`{_escape(facts.recipe.name)}` (`recipe.yaml`)"),
        ("parameters", f"{facts.parameters / 1e6:.2f} M"),
        ("input", f"{side}×{side} RGB (bicubic resize, mean = std = 0.5) and a text of up to {model.max_text_len - 2} tokens"),
        ("output", f"mask logits at {side // 4}×{side // 4}, resized to the image; mask = σ(logit) > {model.threshold:g}"),
        ("trained", trained or "not recorded"),
    ]
    if model.no_target_head or model.no_target_min_area:  # generalized RIS: it may answer "nothing here"
        rule = f"a no-target head (σ > {model.no_target_threshold:g})" if model.no_target_head else f"masks under {model.no_target_min_area} pixels at {side}×{side}"
        rows.insert(4, ("no target", f"an expression that names nothing gets an empty mask, decided by {rule}"))
    return ["| | |", "|---|---|", *(f"| {key} | {value} |" for key, value in rows)]


def _data_section(data: DataSummary | None) -> list[str]:
    if data is None:
        return ["Not recorded in the run folder; `sris export --format bundle --data DIR` names the prepared data it was trained on."]
    details = f" ({data.details})" if data.details else ""
    lines = [f"`{data.dataset}`{details}, as prepared by `sris prepare`:", ""]
    return lines + [f"- {split}: {refs:,} objects, {sentences:,} expressions" for split, (refs, sentences) in data.splits.items()]


def _evaluation_section(evaluation: Evaluation | None) -> list[str]:
    if evaluation is None:
        return ["No evaluation recorded; `sris export --format bundle --eval-json FILE` adds the figures of `sris eval --json FILE`."]
    lines = [f"From {evaluation.source}; IoUs in %.", "", "| split | oIoU | mIoU | P@0.5 | P@0.7 | P@0.9 | expressions |", "|---|---|---|---|---|---|---|"]
    for split, scores in evaluation.splits.items():
        lines.append(f"| {split} | " + " | ".join(f"{100 * scores[key]:.2f}" for key in SCORE_KEYS) + f" | {scores['n']:,} |")
    return lines + ["", _escape(evaluation.protocol)]


def render_model_card(facts: ModelFacts) -> str:
    name = _escape(facts.recipe.name)
    command = facts.command.replace("`", "'")
    sections = [
        _front_matter(facts),
        f"# Shared-RIS `{name}`: referring image segmentation",
        "Segments the object a text refers to (\"the red cup on the left\") with one BEiT-3 encoder over the joint "
        "image + text sequence, a Shared FPN and a Shared Mask Decoder (Shared-RIS, \"A Simple Baseline with "
        "Single-encoder for Referring Image Segmentation\").",
        "\n".join(_overview(facts)),
        "## Training data\n\n" + "\n".join(_data_section(facts.data)),
        "## Evaluation\n\n" + "\n".join(_evaluation_section(facts.evaluation)),
        "## Use\n\n```bash\npip install shared-ris\nsris predict photos/ \"the red cup\" --checkpoint THIS_FOLDER --out predictions/\n```\n\n"
        "```python\nfrom shared_ris.predictor import Predictor, open_image\n\npredictor = Predictor.from_pretrained(\"THIS_FOLDER\")\n"
        "[prediction] = predictor.predict([open_image(\"photo.jpg\")], [\"the red cup\"])\nprediction.mask  # (H, W) bool\n```",
        "## Files\n\n| file | content |\n|---|---|\n| `model.safetensors` | the weights (state dict, float32); safetensors, so loading never unpickles |\n"
        "| `recipe.yaml` | the recipe: architecture, τ, image size and training values |\n"
        "| `tokenizer.model` | the sentencepiece model the text ids come from |\n| `README.md` | this card |",
        f"## How this bundle was made\n\n```bash\n{command}\n```\n\nwith shared-ris {__version__}.",
    ]
    return "\n\n".join(sections) + "\n"
