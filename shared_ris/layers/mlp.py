"""Two-layer MLP with GELU, as in ViT blocks."""

import torch
from torch import nn


class Mlp(nn.Module):
    """Linear(in → hidden) → GELU → Linear(hidden → out). Shapes: (..., in) → (..., out)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int | None = None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, out_dim or in_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))
