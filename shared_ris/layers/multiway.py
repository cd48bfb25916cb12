"""Multiway (mixture-of-modality-experts) wrapper: expert A for vision tokens, expert B for text."""

import copy

import torch
from torch import nn


class Multiway(nn.Module):
    """Apply ``A`` to tokens ``[:split]`` and ``B`` to tokens ``[split:]`` along dim 1.

    Keys are ``A.*`` and ``B.*``, as in the official BEiT-3 checkpoints.
    Shapes: (B, N, ...) → (B, N, ...), with ``split`` the number of vision tokens.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.A = module
        self.B = copy.deepcopy(module)

    def forward(self, x: torch.Tensor, split: int) -> torch.Tensor:
        if split >= x.shape[1]:
            return self.A(x)
        if split == 0:
            return self.B(x)
        return torch.cat([self.A(x[:, :split]), self.B(x[:, split:])], dim=1)
