"""Recipes: YAML files → typed dataclasses, with validated ``--set a.b=value`` overrides.

Modules never read recipes; builders turn a :class:`Recipe` into plain constructor arguments.
A recipe names a file in the packaged ``recipes/`` folder (``base``) or a path (``my.yaml``).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

import yaml

from .errors import SharedRISError, first_line


class RecipeError(SharedRISError):
    """A recipe file, name or override is invalid; the message is one line for the user."""


@dataclass
class EncoderConfig:
    """BEiT-3 multiway encoder (``beit3.md``)."""

    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    ffn_dim: int = 3072
    vocab_size: int = 64010
    patch_size: int = 16
    max_text_positions: int = 1024  # rows of encoder.embed_positions.B
    drop_path_rate: float = 0.1
    final_norm: bool = True  # encoder.layer_norm: loaded when present, unused by RIS


@dataclass
class FPNConfig:
    """Shared FPN (eq. 6-7). ``stages`` are 1-based encoder layers; [] means no FPN."""

    stages: list[int] = field(default_factory=lambda: [3, 6, 9, 12])
    dim: int = 512
    num_heads: int = 8


@dataclass
class DecoderConfig:
    """Shared mask decoder (eq. 8-11)."""

    shared_layers: int = 1  # 0 = the paper's "no fusion" ablation, 1 = the paper, 2 = deeper
    num_heads: int = 8
    mlp_ratio: float = 4.0
    upsample_blocks: int = 2  # l in eq. 10: output stride = patch_size / 2**l
    projection: bool = False  # a linear 1×1 conv after the upsampling (CRIS's projector; Table V's FLOPs); off when a recipe lacks the key


@dataclass
class ModelConfig:
    name: str = "beit3_base"
    image_size: int = 480
    max_text_len: int = 20  # <s> + pieces + </s>
    threshold: float = 0.35  # tau: probability threshold at inference
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    fpn: FPNConfig = field(default_factory=FPNConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    # Generalized RIS (gRefCOCO): a classifier deciding "the expression names nothing" (ReLA's
    # no-target branch), or, without it, "no target" when the mask has < no_target_min_area pixels at S×S.
    no_target_head: bool = False
    no_target_threshold: float = 0.5  # the head decides "no target" when σ(its logit) > this; choose on val
    no_target_min_area: int = 0  # 0: off


@dataclass
class LossConfig:
    bce_weight: float = 2.0
    dice_weight: float = 0.5
    no_target_weight: float = 1.0  # BCE of the no-target head (when the model has one)


@dataclass
class DataConfig:
    text_field: str = "sent"  # "sent" (CRIS, cleaned) or "raw" (LAVT, as typed)
    resize: str = "stretch"  # "stretch" (LAVT, BEiT-3) or "letterbox" (CRIS, CGFormer: aspect kept, padded)
    train_split: str = "train"
    val_split: str = "val"
    shuffle_buffer: int = 1000
    num_workers: int = 4


@dataclass
class TrainConfig:
    epochs: int = 35
    max_steps: int = 0  # cap on optimizer steps for smoke runs; 0 = no cap
    batch_size: int = 14  # per process and micro-batch
    accumulate_steps: int = 1  # micro-batches per optimizer step: global batch = batch_size × processes × this
    lr: float = 1e-4
    min_lr: float = 0.0
    weight_decay: float = 5e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    warmup_steps: int = 0
    layer_decay: float = 1.0  # 1.0 = off; <1 scales encoder lr by decay**(depth - layer)
    grad_clip: float = 1.0
    sync_bn: bool = True  # batch-norm statistics over all processes (2×b trains like 1×2b)
    amp: str = "bf16"  # bf16 autocast on CUDA; ignored (fp32) on CPU
    activation_checkpointing: bool = False  # recompute encoder / FPN / decoder blocks in backward: less memory
    compile: bool = False  # torch.compile the training forward (CUDA; slower on CPU, see BENCHMARKS.md)
    eval_every: int = 1  # epochs
    log_every: int = 10  # steps
    seed: int = 0


@dataclass
class Recipe:
    name: str = "base"
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def available_recipes() -> list[str]:
    """Names of the recipes packaged with shared-ris."""
    folder = resources.files("shared_ris.recipes")
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _parse_yaml(text_source, where: str) -> dict:
    try:
        return _yaml_mapping(text_source.read_text(encoding="utf-8"), where)
    except (UnicodeDecodeError, OSError) as exc:
        raise RecipeError(f"{where}: not a readable YAML recipe ({first_line(exc)})") from None


def _yaml_mapping(text: str, where: str) -> dict:
    try:
        tree = yaml.safe_load(text) or {}  # safe_load builds plain data only, never objects
    except (yaml.YAMLError, RecursionError) as exc:
        raise RecipeError(f"{where}: not a readable YAML recipe ({first_line(exc)})") from None
    if not isinstance(tree, dict):
        raise RecipeError(f"{where}: a recipe must be a mapping of sections (model, loss, data, train), got {type(tree).__name__}")
    return tree


def recipe_from_yaml(text: str, where: str) -> Recipe:
    """A resolved recipe written by :meth:`Recipe.to_yaml` (a run's, a bundle's, an export's) →
    :class:`Recipe`; anything else is one :class:`RecipeError` line naming ``where``."""
    tree = _yaml_mapping(text, where)
    try:
        return recipe_from_dict(tree)
    except RecipeError as exc:
        raise RecipeError(f"{where}: invalid recipe ({exc})") from None


def _read_recipe_file(name_or_path: str | Path) -> tuple[str, dict]:
    text_name = str(name_or_path)
    path = Path(text_name)
    if text_name.endswith((".yaml", ".yml")) or path.exists():
        if not path.is_file():
            raise RecipeError(f"recipe file {path} not found; give a YAML path or one of {available_recipes()}")
        return path.stem, _parse_yaml(path, str(path))
    packaged = resources.files("shared_ris.recipes") / f"{text_name}.yaml"
    if not packaged.is_file():
        raise RecipeError(f"unknown recipe '{text_name}'; choose one of {available_recipes()} or give a YAML path")
    return text_name, _parse_yaml(packaged, text_name)


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _valid_keys(cls, prefix: str = "") -> list[str]:
    keys = []
    for name, tp in _field_types(cls).items():
        if dataclasses.is_dataclass(tp):
            keys += _valid_keys(tp, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints and numeric strings widen to floats, nothing else converts."""
    origin = typing.get_origin(tp)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise RecipeError(f"{key} must be a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, key)
            except RecipeError:
                pass
        raise RecipeError(f"{key} must be {tp}, got {value!r}")
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp in (str, bool) and isinstance(value, tp):
        return value
    if tp is type(None) and value is None:
        return None
    raise RecipeError(f"{key} must be {getattr(tp, '__name__', tp)}, got {value!r}")


def _build(cls, data: dict, prefix: str = ""):
    if not isinstance(data, dict):
        raise RecipeError(f"{prefix.rstrip('.') or 'recipe'} must be a mapping, got {data!r}")
    types_ = _field_types(cls)
    unknown = sorted(set(data) - set(types_))
    if unknown:
        raise RecipeError(
            f"unknown recipe key {prefix}{unknown[0]}; valid keys: {', '.join(_valid_keys(cls, prefix))}"
        )
    kwargs = {}
    for name, value in data.items():
        tp = types_[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, tp, f"{prefix}{name}")
    return cls(**kwargs)


def _apply_override(tree: dict, override: str) -> None:
    if "=" not in override:
        raise RecipeError(f"override '{override}' must look like key=value, e.g. model.fpn.stages=[6,12]")
    key, raw = override.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    cls = Recipe
    node = tree
    for depth, part in enumerate(parts):
        types_ = _field_types(cls)
        if part not in types_:
            raise RecipeError(f"unknown recipe key {key}; valid keys: {', '.join(_valid_keys(Recipe))}")
        tp = types_[part]
        last = depth == len(parts) - 1
        if dataclasses.is_dataclass(tp):
            if last:
                raise RecipeError(f"{key} is a section; set one of its keys, e.g. {key}.{next(iter(_field_types(tp)))}")
            node = node.setdefault(part, {})
            cls = tp
        elif not last:
            raise RecipeError(f"unknown recipe key {key}; valid keys: {', '.join(_valid_keys(Recipe))}")
        else:
            try:
                node[part] = yaml.safe_load(raw) if raw.strip() else ""
            except yaml.YAMLError:
                node[part] = raw


def load_recipe(name_or_path: str | Path = "base", overrides: Iterable[str] = ()) -> Recipe:
    """Load a packaged recipe by name or a YAML file by path, then apply ``key=value`` overrides.

    Unknown keys or wrongly-typed values raise :class:`RecipeError` with a one-line message.
    """
    name, tree = _read_recipe_file(name_or_path)
    tree = dict(tree)
    tree.setdefault("name", name)
    for override in overrides:
        _apply_override(tree, override)
    return recipe_from_dict(tree)


def recipe_from_dict(tree: dict) -> Recipe:
    """Rebuild a recipe saved in a checkpoint or ``recipe.yaml``."""
    recipe = _build(Recipe, tree)
    validate_recipe(recipe)
    return recipe


# Ranges a type alone cannot express, as intervals; every number must also be finite.
RANGES = {
    "model.image_size": "[1, inf)", "model.max_text_len": "[3, inf)", "model.threshold": "(0, 1)",
    "model.encoder.embed_dim": "[1, inf)", "model.encoder.depth": "[1, inf)", "model.encoder.num_heads": "[1, inf)",
    "model.encoder.ffn_dim": "[1, inf)", "model.encoder.vocab_size": "[4, inf)", "model.encoder.patch_size": "[1, inf)",
    "model.encoder.drop_path_rate": "[0, 1)", "model.fpn.dim": "[1, inf)", "model.fpn.num_heads": "[1, inf)",
    "model.decoder.num_heads": "[1, inf)", "model.decoder.mlp_ratio": "(0, inf)", "model.decoder.upsample_blocks": "[0, inf)",
    "model.no_target_min_area": "[0, inf)", "model.no_target_threshold": "(0, 1)", "loss.no_target_weight": "[0, inf)",
    "loss.bce_weight": "[0, inf)", "loss.dice_weight": "[0, inf)", "data.shuffle_buffer": "[1, inf)", "data.num_workers": "[0, inf)",
    "train.epochs": "[1, inf)", "train.max_steps": "[0, inf)", "train.batch_size": "[1, inf)", "train.lr": "(0, inf)",
    "train.accumulate_steps": "[1, inf)",
    "train.min_lr": "[0, inf)", "train.weight_decay": "[0, inf)", "train.warmup_steps": "[0, inf)", "train.layer_decay": "(0, 1]",
    "train.grad_clip": "[0, inf)", "train.eval_every": "[1, inf)", "train.log_every": "[1, inf)",
}  # fmt: skip


def _in_interval(value: float, interval: str) -> bool:
    low, high = (float(x) for x in interval[1:-1].split(","))
    above = value >= low if interval[0] == "[" else value > low
    below = value <= high if interval[-1] == "]" else value < high
    return math.isfinite(value) and above and below


def _check_ranges(recipe: Recipe) -> None:
    for key, interval in RANGES.items():
        value = recipe
        for part in key.split("."):
            value = getattr(value, part)
        if not _in_interval(value, interval):
            raise RecipeError(f"{key} must be in {interval}, got {value}")
    betas = recipe.train.betas
    if len(betas) != 2 or not all(_in_interval(b, "[0, 1)") for b in betas):
        raise RecipeError(f"train.betas must be two numbers in [0, 1), got {betas}")


def validate_recipe(recipe: Recipe) -> None:
    """Cross-field checks that a type alone cannot express."""
    _check_ranges(recipe)
    m = recipe.model
    enc = m.encoder
    if m.image_size % enc.patch_size:
        raise RecipeError(f"model.image_size={m.image_size} must be a multiple of model.encoder.patch_size={enc.patch_size}")
    if enc.embed_dim % enc.num_heads:
        raise RecipeError(f"model.encoder.embed_dim={enc.embed_dim} must be divisible by model.encoder.num_heads={enc.num_heads}")
    bad = [s for s in m.fpn.stages if not 1 <= s <= enc.depth]
    if bad or len(set(m.fpn.stages)) != len(m.fpn.stages):
        raise RecipeError(f"model.fpn.stages={m.fpn.stages} must be distinct layers in 1..{enc.depth}")
    if m.fpn.dim % m.fpn.num_heads or m.fpn.dim % m.decoder.num_heads:
        raise RecipeError("model.fpn.dim must be divisible by model.fpn.num_heads and model.decoder.num_heads")
    if m.decoder.shared_layers < 0:
        raise RecipeError("model.decoder.shared_layers must be >= 0")
    if not 3 <= m.max_text_len <= enc.max_text_positions - 2:
        raise RecipeError(f"model.max_text_len must be in 3..{enc.max_text_positions - 2}")
    if recipe.data.text_field not in ("sent", "raw"):
        raise RecipeError("data.text_field must be 'sent' or 'raw'")
    if recipe.data.resize not in ("stretch", "letterbox"):
        raise RecipeError(f"data.resize must be 'stretch' or 'letterbox', got {recipe.data.resize!r}")
    if recipe.train.amp not in ("bf16", "fp16", "fp32"):
        raise RecipeError("train.amp must be one of bf16, fp16, fp32")
