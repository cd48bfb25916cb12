"""Shared FPN (eq. 6-7): multi-level encoder states fused by shared self-attention."""

from __future__ import annotations

import torch
from torch import nn

from ..layers import Attention, run_block


class SharedFPNLevel(nn.Module):
    """One level: z_j = MSA(LN(h_j W_j)) + h_j W_j over the whole image+text sequence."""

    def __init__(self, in_dim: int, dim: int, num_heads: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)

    def forward(self, h: torch.Tensor, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
        """h: (B, N, D) → (B, N, dim)."""
        x = self.proj(h)
        return self.attn(self.norm(x), key_padding_mask) + x


class SharedFPN(nn.Module):
    """Fuse K encoder states: concat the K levels' outputs on channels, then Linear(K·dim → dim).

    Args:
        in_dim: encoder width D.
        dim: d_w.
        stages: 1-based encoder layers to read (e.g. [3, 6, 9, 12]).
        num_heads: heads of each level's self-attention.
    """

    def __init__(self, in_dim: int, dim: int, stages: list[int], num_heads: int) -> None:
        super().__init__()
        if not stages:
            raise ValueError("SharedFPN needs at least one stage; use NoFPN for the no-FPN ablation")
        self.stages = list(stages)
        self.levels = nn.ModuleList(SharedFPNLevel(in_dim, dim, num_heads) for _ in stages)
        self.fuse = nn.Linear(len(stages) * dim, dim)
        self.activation_checkpointing = False

    def forward(self, states: list[torch.Tensor], key_padding_mask: torch.Tensor | None) -> torch.Tensor:
        """states: [h0, …, hL] from the encoder, each (B, N, D) → z (B, N, dim)."""
        checkpointed = self.activation_checkpointing
        outs = [run_block(level, checkpointed, states[stage], key_padding_mask) for stage, level in zip(self.stages, self.levels)]
        return self.fuse(torch.cat(outs, dim=-1))


class NoFPN(nn.Module):
    """The paper's "No FPN" ablation: the last encoder state, LN then Linear(D → dim)."""

    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.stages: list[int] = []
        self.norm = nn.LayerNorm(in_dim)
        self.proj = nn.Linear(in_dim, dim)
        self.activation_checkpointing = False  # nothing large to recompute here

    def forward(self, states: list[torch.Tensor], key_padding_mask: torch.Tensor | None) -> torch.Tensor:
        """states: [h0, …, hL], each (B, N, D) → z (B, N, dim) from hL alone."""
        return self.proj(self.norm(states[-1]))
