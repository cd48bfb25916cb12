"""Segmentation loss (eq. 12): λ_bce · BCE + λ_dice · Dice on the probability map."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 − (2·Σ p·g + s) / (Σ p + Σ g + s) per sample, averaged over the batch.

    logits, target: (B, 1, H, W); target in {0, 1}. ``smooth`` keeps empty masks finite.
    """
    prob = logits.float().sigmoid().flatten(1)
    target = target.float().flatten(1)
    inter = (prob * target).sum(1)
    return (1 - (2 * inter + smooth) / (prob.sum(1) + target.sum(1) + smooth)).mean()


def segmentation_loss(
    logits: torch.Tensor, target: torch.Tensor, bce_weight: float = 2.0, dice_weight: float = 0.5
) -> dict[str, torch.Tensor]:
    """logits (B, 1, h, w) at decoder resolution; target (B, 1, H, W) or (B, H, W) mask in {0, 1}.

    Logits are upsampled bilinearly to the mask's size (the full input resolution), so the loss
    sees every ground-truth pixel rather than a nearest-downsampled mask.
    Returns {"loss", "bce", "dice"} (scalars).
    """
    if target.ndim == 3:
        target = target[:, None]
    target = target.float()
    if logits.shape[-2:] != target.shape[-2:]:
        logits = F.interpolate(logits.float(), size=target.shape[-2:], mode="bilinear", align_corners=False)
    bce = F.binary_cross_entropy_with_logits(logits.float(), target)
    dice = dice_loss(logits, target)
    return {"loss": bce_weight * bce + dice_weight * dice, "bce": bce, "dice": dice}
