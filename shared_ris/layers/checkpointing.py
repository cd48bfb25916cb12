"""Activation checkpointing of one block: its activations are dropped after the forward and
recomputed in the backward (non-reentrant, RNG preserved, so drop path draws the same masks and
the gradients are the same)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def run_block(block: nn.Module, enabled: bool, *args) -> torch.Tensor:
    """``block(*args)``, checkpointed when ``enabled`` and gradients are being recorded."""
    if enabled and block.training and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False)
    return block(*args)
