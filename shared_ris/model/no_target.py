"""Deciding "the expression names nothing here" (gRefCOCO's no-target expressions).

Two ways, compared in BENCHMARKS.md: a learned head, after ReLA's no-target branch, reading the
decoder's text token (the <s> state after the shared layer(s), which has attended to every patch)
and two numbers pooled from the predicted mask, trained with BCE beside the mask loss; or, without
a head, the rule "no target when the predicted mask covers fewer than ``min_area`` pixels of the
S×S input". Either decision empties the mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class NoTargetHead(nn.Module):
    """Text state (B, C) and mask logits (B, 1, h, w) → no-target logit (B,).

    Reads the decoder's <s> state (LayerNorm) beside two numbers pooled from the mask it produced,
    σ of its largest logit and its mean probability, detached: the evidence the area rule uses, so
    the head can only add to it, without pushing the masks themselves. Then Linear → GELU → Linear.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.hidden = nn.Linear(dim + 2, dim)
        self.out = nn.Linear(dim, 1)

    def forward(self, text_state: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
        text = self.norm(text_state)  # (B, C); float32 under autocast
        probs = mask_logits.detach().float().flatten(1).sigmoid()  # (B, h·w)
        pooled = torch.stack([probs.amax(1), probs.mean(1)], dim=1).to(text.dtype)  # (B, 2)
        features = torch.cat([text, pooled], dim=1)  # (B, C + 2)
        return self.out(F.gelu(self.hidden(features)))[:, 0]


def mask_areas(logits: torch.Tensor, side: int, threshold: float) -> torch.Tensor:
    """(B, 1, h, w) logits → (B,) pixels of the S×S mask (bilinear to ``side``, then σ > τ)."""
    probs = F.interpolate(logits.float(), size=(side, side), mode="bilinear", align_corners=False).sigmoid()
    return (probs > threshold).flatten(1).sum(1)


@dataclass(frozen=True)
class NoTargetRule:
    """How the decision is taken: by the head's σ > ``head_threshold`` when ``head`` (the model must
    have one), else by the area rule (``min_area`` pixels at S×S; 0: never decide "no target")."""

    head: bool = False
    min_area: int = 0
    head_threshold: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 < self.head_threshold < 1.0:
            raise ValueError(f"the no-target head's threshold must be a probability in (0, 1), got {self.head_threshold}")

    @classmethod
    def of(cls, model) -> "NoTargetRule":
        """The model's own: its head (at its recipe's threshold) when it has one, else its recipe's area rule."""
        return cls(
            head=getattr(model, "no_target_head", None) is not None, min_area=getattr(model, "no_target_min_area", 0),
            head_threshold=getattr(model, "no_target_threshold", 0.5),
        )  # fmt: skip

    @property
    def active(self) -> bool:
        return self.head or self.min_area > 0

    def describe(self) -> str:
        if self.head:
            return f"no-target head (σ > {self.head_threshold:g})"
        return f"area rule (< {self.min_area} px at the input size)" if self.min_area > 0 else "never (no head, no area rule)"

    def decide(self, logits: torch.Tensor, no_target_logits: torch.Tensor | None, side: int, threshold: float) -> torch.Tensor:
        """(B,) bool on the CPU: True where the expression is decided to name nothing."""
        if self.head:
            if no_target_logits is None:
                raise ValueError("the no-target rule asks for the head's logits, but the model has no head")
            return no_target_logits.float().cpu() > math.log(self.head_threshold / (1 - self.head_threshold))
        if self.min_area <= 0:
            return torch.zeros(len(logits), dtype=torch.bool)
        return (mask_areas(logits, side, threshold) < self.min_area).cpu()


def run_model(model, rule: NoTargetRule, images: torch.Tensor, text_ids: torch.Tensor, text_padding_mask: torch.Tensor):
    """(mask logits (B, 1, h, w), no-target logits (B,) or None): the head runs only when the rule reads it."""
    if rule.head:
        return model.forward_with_no_target(images, text_ids, text_padding_mask)
    return model(images, text_ids, text_padding_mask), None
