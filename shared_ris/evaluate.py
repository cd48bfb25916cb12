"""Evaluation loop shared by training's validation and ``sris eval``: one score per expression."""

from __future__ import annotations

import contextlib
from typing import Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .metrics import MetricAccumulator


def logits_to_mask(logits: torch.Tensor, size: tuple[int, int], threshold: float) -> torch.Tensor:
    """(1, h, w) or (h, w) logits → boolean mask at ``size``: bilinear resize, then σ > τ."""
    logits = logits.reshape(1, 1, *logits.shape[-2:]).float()
    if tuple(logits.shape[-2:]) != tuple(size):
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    return logits[0, 0].sigmoid() > threshold


def _autocast(device: torch.device, amp: str):
    if device.type == "cuda" and amp in ("bf16", "fp16"):
        return torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate_model(
    model: torch.nn.Module,
    loader: Iterable[dict],
    threshold: float = 0.35,
    resolution: str = "original",
    device: torch.device | str = "cpu",
    amp: str = "fp32",
    progress=None,
) -> MetricAccumulator:
    """Score every expression the loader yields.

    ``resolution="original"`` scores at the image's own size against ``orig_masks``;
    ``"input"`` scores at the model's input size (S×S) against the resized mask (LAVT's protocol).
    Under torch.distributed every rank scores its share and the records of all ranks are merged,
    so each rank returns the accumulator of the whole split. ``progress(n)`` is called per batch.
    """
    if resolution not in ("original", "input"):
        raise ValueError(f"resolution must be 'original' or 'input', got {resolution!r}")
    device = torch.device(device)
    was_training = model.training
    model.eval()
    acc = MetricAccumulator()
    for batch in loader:
        with _autocast(device, amp):
            logits = model(
                batch["images"].to(device), batch["text_ids"].to(device), batch["text_padding_mask"].to(device)
            )
        logits = logits.float().cpu()
        for i, (key, sent_id) in enumerate(zip(batch["keys"], batch["sent_ids"])):
            if resolution == "original":
                target = batch["orig_masks"][i].bool()
            else:
                side = batch["images"].shape[-1]
                target = F.interpolate(batch["orig_masks"][i][None, None].float(), size=(side, side), mode="nearest")[0, 0].bool()
            acc.add(f"{key}_{sent_id}", logits_to_mask(logits[i], tuple(target.shape), threshold), target)
        if progress is not None:
            progress(len(batch["keys"]))
    model.train(was_training)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, acc.records())
        return MetricAccumulator.from_records([r for part in gathered for r in part])
    return MetricAccumulator.from_records(acc.records())
