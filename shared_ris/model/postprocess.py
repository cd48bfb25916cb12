"""Mask logits → probabilities and masks at an image's own size (SAM's ``postprocess_masks``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def upsample_probabilities(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(1, h, w) or (h, w) logits → (H, W) float32 probabilities: bilinear resize, then sigmoid.

    The sigmoid runs in place on the resized map, so a 12-MP image costs one float map, not two.
    """
    logits = logits.reshape(1, 1, *logits.shape[-2:]).float()
    if tuple(logits.shape[-2:]) != tuple(size):
        return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)[0, 0].sigmoid_()
    return logits[0, 0].sigmoid()


def logits_to_mask(logits: torch.Tensor, size: tuple[int, int], threshold: float) -> torch.Tensor:
    """(1, h, w) or (h, w) logits → boolean mask at ``size``: bilinear resize, then σ > τ."""
    return upsample_probabilities(logits, size) > threshold
