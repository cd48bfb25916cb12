"""Evaluation: the loop shared by training's validation and ``sris eval``, one score per expression.

The protocol is explicit because published RIS numbers mix two: CRIS / CGFormer score masks at the
original image size with P@X counting IoU > X; LAVT scores at the 480×480 input size with IoU ≥ X
and IoU 0 for an empty prediction of an empty ground truth. :class:`Protocol` names the four
choices and :data:`PROTOCOLS` holds the presets. Every sentence of every ref is scored, an empty
text and an empty mask included (the refer API's count, what the papers' figures are over).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.distributed as dist

from .checkpoint import check_run, load_run
from .data import DataError, build_eval_loader
from .data.location import DataLocation, data_location
from .data.manifest import read_manifest, split_info, split_shards
from .data.transforms import content_box, mask_to_tensor
from .device import autocast, check_device
from .distributed import setup, teardown
from .errors import SharedRISError
from .fileio import confined
from .metrics import MetricAccumulator
from .model import NoTargetRule, logits_to_mask, run_model
from .model.postprocess import cris_probabilities
from .visualize import save_mask

RESOLUTIONS = ("original", "input")
RESAMPLINGS = ("bilinear", "cris")


@dataclass(frozen=True)
class Protocol:
    """How masks are scored.

    Args:
        resolution: ``"original"`` (the image's own size; logits resized bilinearly) or ``"input"``
            (S×S, LAVT's protocol: the ground truth resized as a PIL image with ``Image.NEAREST``,
            pixel for pixel what LAVT's ``transforms.Resize`` feeds its ``test.py``).
        threshold: τ on σ(logits); ``None`` means the recipe's ``model.threshold``.
        inclusive: P@X counts IoU ≥ X (LAVT) instead of IoU > X.
        empty_iou: the IoU of an expression whose prediction and ground truth are both empty:
            1 (a correct "nothing there") or 0 (LAVT's ``test.py``: IoU 0 when the union is 0).
        resampling: how logits reach the image's size: ``"bilinear"`` (ours) or ``"cris"`` (CRIS's
            ``engine.py``: σ, bicubic to S×S with ``align_corners=True``, bicubic inverse warp).
    """

    resolution: str = "original"
    threshold: float | None = None
    inclusive: bool = False
    empty_iou: float = 1.0
    resampling: str = "bilinear"

    def __post_init__(self) -> None:
        if self.resolution not in RESOLUTIONS:
            raise SharedRISError(f"resolution must be one of {', '.join(RESOLUTIONS)}, got {self.resolution!r}")
        if self.threshold is not None and not 0.0 < self.threshold < 1.0:
            raise SharedRISError(f"threshold must be a probability in (0, 1), got {self.threshold}")
        if self.resampling not in RESAMPLINGS:
            raise SharedRISError(f"resampling must be one of {', '.join(RESAMPLINGS)}, got {self.resampling!r}")
        if self.empty_iou not in (0.0, 1.0):
            raise SharedRISError(f"empty IoU (both masks empty) must be 1 or 0, got {self.empty_iou}")
        object.__setattr__(self, "empty_iou", float(self.empty_iou))  # 1 and 1.0 print and compare alike

    def describe(self, image_size: int | None = None) -> str:
        """One line to print under every table, e.g. ``protocol: masks at original size, σ>0.35,
        P@X: IoU > X, both empty: IoU 1, per expression``."""
        if self.resolution == "original":
            where = "original size"
        else:
            side = f"{image_size}×{image_size} " if image_size else ""
            where = f"{side}input size (ground truth resized, PIL nearest)"
        tau = "recipe τ" if self.threshold is None else f"{self.threshold:g}"
        comparison = "≥" if self.inclusive else ">"
        resampled = ", CRIS's bicubic resampling" if self.resampling == "cris" else ""
        return f"protocol: masks at {where}{resampled}, σ>{tau}, P@X: IoU {comparison} X, both empty: IoU {self.empty_iou:g}, per expression"

    def to_dict(self) -> dict:
        return asdict(self)


# "default" is what training's validation reports; "lavt" reproduces LAVT's test.py: scores at the
# 480×480 input, argmax over two classes (= probability > 0.5 for our single logit), P@X with ≥,
# IoU 0 when prediction and ground truth are both empty.
PROTOCOLS = {
    "default": Protocol(),
    "lavt": Protocol(resolution="input", threshold=0.5, inclusive=True, empty_iou=0.0),
    # CRIS's engine.py (CGFormer's too): σ → bicubic → inverse warp to the image, > 0.35, IoU = I/(U+1e-6)
    # (0 for an empty union), P@X with IoU > X.
    "cris": Protocol(resolution="original", threshold=0.35, inclusive=False, empty_iou=0.0, resampling="cris"),
}


def resolve_protocol(
    preset: str = "default",
    *,
    resolution: str | None = None,
    threshold: float | None = None,
    inclusive: bool | None = None,
    empty_iou: float | None = None,
) -> Protocol:
    """A preset from :data:`PROTOCOLS` with any explicitly given choice overriding it."""
    if preset not in PROTOCOLS:
        raise SharedRISError(f"unknown protocol {preset!r}; choose one of {', '.join(PROTOCOLS)}")
    given = {"resolution": resolution, "threshold": threshold, "inclusive": inclusive, "empty_iou": empty_iou}
    return replace(PROTOCOLS[preset], **{k: v for k, v in given.items() if v is not None})


def _is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@torch.no_grad()
def evaluate_model(
    model: torch.nn.Module,
    loader: Iterable[dict],
    threshold: float = 0.35,
    resolution: str = "original",
    device: torch.device | str = "cpu",
    amp: str = "fp32",
    progress=None,
    on_mask: Callable[[str, int, torch.Tensor], None] | None = None,
    on_target: Callable[[str, torch.Tensor], None] | None = None,
    resize: str = "stretch",
    resampling: str = "bilinear",
    no_target: NoTargetRule | None = None,
) -> MetricAccumulator:
    """Score every expression the loader yields.

    ``resolution="original"`` scores at the image's own size against ``orig_masks``;
    ``"input"`` scores at the model's input size (S×S) against the mask resized as LAVT resizes it
    (:func:`lavt_target`; letterboxed like the image when ``resize="letterbox"``). ``resampling``:
    ``"bilinear"`` (ours) or ``"cris"`` (:func:`shared_ris.model.postprocess.cris_probabilities`).
    ``no_target`` decides which expressions name nothing (default: the model's own rule, see
    :class:`~shared_ris.model.NoTargetRule`); such a mask is scored as empty, and the decision is
    recorded for the generalized figures.
    Under torch.distributed every rank scores its share and the exact integer records of all ranks
    are merged, so each rank returns the accumulator of the whole split. ``progress(n)`` is called
    per batch with the batch's size. ``on_mask(key, sent_id, mask)`` gets each scored prediction and
    ``on_target(key, target)`` each ground truth it was scored against (bool, at the scoring
    resolution; once per expression), e.g. to save them.
    """
    if resolution not in RESOLUTIONS:
        raise ValueError(f"resolution must be 'original' or 'input', got {resolution!r}")
    device = torch.device(device)
    rule = NoTargetRule.of(model) if no_target is None else no_target
    was_training = model.training
    model.eval()
    acc = MetricAccumulator()
    targets = _Targets(resolution, resize)
    for batch in loader:
        inputs = (batch["images"].to(device), batch["text_ids"].to(device), batch["text_padding_mask"].to(device))
        with autocast(device, amp):
            logits, no_target_logits = run_model(model, rule, *inputs)
        logits = logits.float().cpu()
        side = batch["images"].shape[-1]
        decided = rule.decide(logits, no_target_logits, side, threshold)
        counts = batch.get("target_counts") or [1] * len(decided)  # a classic RIS batch: one object each
        for i, (key, sent_id) in enumerate(zip(batch["keys"], batch["sent_ids"])):
            target = targets.get(key, torch.as_tensor(batch["orig_masks"][i]).bool(), side)
            pred = _predicted_mask(logits[i], target.shape, threshold, resolution, resampling, targets.box, side)
            acc.add(f"{key}_{sent_id}", pred, target, bool(decided[i]), counts[i])
            if on_mask is not None:
                on_mask(key, sent_id, torch.zeros_like(pred) if decided[i] else pred)
            if on_target is not None:
                on_target(key, target)
        if progress is not None:
            progress(len(batch["keys"]))
    model.train(was_training)
    if _is_distributed():
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, acc.records())
        return MetricAccumulator.from_records([r for part in gathered for r in part])
    return MetricAccumulator.from_records(acc.records())


class _Targets:
    """The ground truth at the scoring resolution, made once per ref (its sentences come one after
    another), and where the image lay in the model's input (``box``)."""

    def __init__(self, resolution: str, resize: str) -> None:
        self.resolution, self.resize = resolution, resize
        self.key: str | None = None
        self.target: torch.Tensor | None = None
        self.box: tuple[int, int, int, int] | None = None

    def get(self, key: str, original: torch.Tensor, side: int) -> torch.Tensor:
        if key != self.key:
            height, width = original.shape
            self.key = key
            self.box = content_box(height, width, side, self.resize)
            if self.resolution == "original":
                self.target = original
            elif self.resize == "letterbox":
                self.target = mask_to_tensor(original, side, "letterbox")[0].bool()
            else:
                self.target = lavt_target(original, side)
        return self.target


def _predicted_mask(logits, shape, threshold: float, resolution: str, resampling: str, box, side: int) -> torch.Tensor:
    if resolution == "input":
        return logits_to_mask(logits, tuple(shape), threshold)  # the whole S×S canvas, as the target
    if resampling == "cris":
        return cris_probabilities(logits, tuple(shape), box or (0, 0, side, side), side) > threshold
    return logits_to_mask(logits, tuple(shape), threshold, box, side)


def lavt_target(mask: torch.Tensor, side: int) -> torch.Tensor:
    """LAVT's S×S ground truth: the mask as a PIL image resized with ``Image.NEAREST`` (its
    ``transforms.Resize`` → torchvision's ``F.resize`` on a PIL image). torch's ``nearest`` picks
    other source pixels on non-square images, so PIL does the resize here, bit for bit."""
    return mask_to_tensor(mask, side)[0].bool()


def parse_splits(splits: str | Iterable[str]) -> list[str]:
    """``"val,testA"`` or ``["val", "testA"]`` → ``["val", "testA"]`` (order kept, duplicates dropped)."""
    items = splits.split(",") if isinstance(splits, str) else list(splits)
    names = list(dict.fromkeys(s.strip() for s in items if s.strip()))
    if not names:
        raise SharedRISError("no split given; pass e.g. --split val or --split val,testA,testB")
    return names


def _split_progress(progress, split: str, total: int | None) -> Callable[[int], None] | None:
    """evaluate_model's per-batch ``progress(n)`` → the caller's ``progress(split, done, total)``."""
    if progress is None:
        return None
    done = 0

    def step(n: int) -> None:
        nonlocal done
        done += n
        progress(split, done, total)

    return step


class _MaskSaver:
    """``--save-masks``: ``{key}_{sent_id}.png``, each prediction as it was scored, and
    ``gt/{key}.png``, the ground truth it was scored against (both 0/255 at the scoring resolution:
    the image's own size, or S×S under ``resolution="input"``), so the figures can be recomputed
    from the saved files alone under the protocol the JSON report states."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.targets = folder, folder / "gt"
        self.targets.mkdir(parents=True, exist_ok=True)
        self.last_target: str | None = None

    def mask(self, key: str, sent_id: int, mask: torch.Tensor) -> None:
        save_mask(mask.numpy(), confined(self.folder, f"{key}_{sent_id}.png", f"sample {key}"))  # keys come from the shards

    def target(self, key: str, target: torch.Tensor) -> None:
        if key != self.last_target:  # one file per ref, written by the one reader that holds the ref
            save_mask(target.numpy(), confined(self.targets, f"{key}.png", f"sample {key}"))
            self.last_target = key


def evaluate_run(
    checkpoint: str | Path,
    data_dir: str | Path,
    splits: str | Iterable[str],
    *,
    tokenizer: str | Path | None = None,
    protocol: Protocol | str = "default",
    save_masks: str | Path | None = None,
    device: str | None = None,
    batch_size: int | None = None,
    num_workers: int | None = None,
    progress: Callable[[str, int, int | None], None] | None = None,
    no_target: NoTargetRule | None = None,
) -> dict:
    """Evaluate a trained checkpoint on prepared splits; returns the ``sris eval --json`` document::

        {"checkpoint": str, "protocol": {...}, "no_target_rule": str, "splits": {split: {"oIoU", "mIoU",
         "P@0.5", "P@0.7", "P@0.9", "n", "by_size": [{"lo", "hi", "n", "mIoU", "oIoU"}, ...],
         "generalized": {"all" | "0" | "1" | "2+": {"gIoU", "cIoU", "N-acc", "T-acc", "Pr@0.7", ...}}}}}

    ``generalized`` is there when the data set is (gRefCOCO, ``prepare synthetic --generalized``);
    ``no_target`` overrides the model's rule for deciding "names nothing" (e.g. the area rule on a
    model with a head, to compare the two).

    IoUs are fractions in [0, 1]. ``protocol`` is a preset name or a :class:`Protocol` (default:
    the protocol of training's validation; single choices: ``resolve_protocol("lavt", empty_iou=1)``);
    a threshold of None is the recipe's τ. ``save_masks`` writes ``DIR/{split}/{key}_{sent_id}.png``
    (the scored predictions) and ``DIR/{split}/gt/{key}.png`` (the ground truth they were scored
    against), 0/255 at the scoring resolution. Started by torchrun (``sris eval --gpus N`` / ``--nproc N``), each
    process joins the group, scores its share and every rank returns the whole split's figures,
    equal to the single-process ones to the last digit. ``progress(split, done, total)`` is called
    per batch with the expressions scored so far (``total`` is None when unknown).
    """
    split_names = parse_splits(splits)
    protocol = resolve_protocol(protocol) if isinstance(protocol, str) else protocol
    check_device(device)
    location = data_location(data_dir)
    joined_here = not (dist.is_available() and dist.is_initialized())
    env = setup(None if device in (None, "cuda") else device)
    try:
        model, recipe, text_tokenizer = load_run(checkpoint, tokenizer, device=env.device, data_dir=_local_folder(location))
        if protocol.threshold is None:
            protocol = replace(protocol, threshold=recipe.model.threshold)
        rule = _no_target_rule(model, no_target, checkpoint)
        generalized = read_manifest(location).get("generalized") is True
        loaders = {  # built up front, so a missing split fails before the first one is scored
            split: build_eval_loader(
                location, split, recipe, text_tokenizer, rank=env.rank, world_size=env.world_size,
                num_workers=num_workers, batch_size=batch_size,
            )
            for split in split_names
        }  # fmt: skip
        results = {}
        for split, loader in loaders.items():
            saver = _MaskSaver(Path(save_masks) / split) if save_masks is not None else None
            progress_of_split = _split_progress(progress, split, loader.sentences if env.world_size == 1 else None)
            acc = _score(model, loader, recipe, protocol, rule, env.device, progress_of_split, saver)
            _check_count(acc, loader.sentences, location, split)
            results[split] = acc.summary(inclusive=protocol.inclusive, empty_iou=protocol.empty_iou, generalized=generalized)
    finally:
        if joined_here:
            teardown(env)
    return {
        "checkpoint": str(checkpoint),
        "protocol": {**protocol.to_dict(), "image_size": recipe.model.image_size, "description": protocol.describe(recipe.model.image_size)},
        "no_target_rule": rule.describe(),
        "splits": results,
    }


def _no_target_rule(model, asked: NoTargetRule | None, checkpoint: str | Path) -> NoTargetRule:
    """The rule asked for, or the model's own; a head rule needs a model with a head."""
    rule = NoTargetRule.of(model) if asked is None else asked
    if rule.head and getattr(model, "no_target_head", None) is None:
        raise SharedRISError(f"{checkpoint}: this model has no no-target head to decide with; use the area rule (--no-target-area K)")
    return rule


def _score(model, loader, recipe, protocol: Protocol, rule: NoTargetRule, device, progress, saver: "_MaskSaver | None") -> MetricAccumulator:
    """:func:`evaluate_model` under ``protocol``, saving masks when ``saver`` is given."""
    return evaluate_model(
        model, loader, threshold=protocol.threshold, resolution=protocol.resolution, device=device, amp=recipe.train.amp,
        progress=progress, on_mask=saver and saver.mask, on_target=saver and saver.target, resize=recipe.data.resize,
        resampling=protocol.resampling, no_target=rule,
    )  # fmt: skip


def check_eval_inputs(checkpoint: str | Path, data_dir: str | Path, splits: str | Iterable[str], *, tokenizer: str | Path | None = None) -> None:
    """The checks :func:`evaluate_run` would fail on first (checkpoint, tokenizer, every split), without
    loading the weights: a launcher calls it so that a bad path fails once, not on every rank."""
    names = parse_splits(splits)
    location = data_location(data_dir)
    check_run(checkpoint, tokenizer, data_dir=_local_folder(location))
    manifest = read_manifest(location)
    for split in names:
        split_shards(split_info(manifest, split, location), location)  # local shards: present, of the recorded size


def _check_count(acc: MetricAccumulator, expected: int, location: DataLocation, split: str) -> None:
    """Shards are verified one by one as they are read; this checks the split as a whole."""
    if len(acc.keys) != expected:
        raise DataError(f"{location}: split {split}: scored {len(acc.keys)} expressions but the manifest lists {expected}; re-run sris prepare")


def _local_folder(location: DataLocation) -> str | None:
    """Where a data folder's own ``spm.model`` may be (none for remote data)."""
    return location.text if location.is_local else None
