"""Shared mask decoder (eq. 8-11): shared transformer layer(s), upsampling, text-cls dot product."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..layers import Attention, Mlp, run_block


class SharedBlock(nn.Module):
    """u' = MSA(LN(z)) + z;  u = MLP(LN(u')) + u'  — one MLP shared by both modalities."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, z: torch.Tensor, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
        """z: (B, N, C) → (B, N, C)."""
        u = z + self.attn(self.norm1(z), key_padding_mask)
        return u + self.mlp(self.norm2(u))


class UpsampleBlock(nn.Sequential):
    """×2 bilinear upsampling → Conv3×3 → BN → ReLU (eq. 10)."""

    def __init__(self, dim: int) -> None:
        super().__init__(
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            nn.Conv2d(dim, dim, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(dim),
            nn.ReLU(inplace=True),
        )


class SharedMaskDecoder(nn.Module):
    """Decode the fused sequence into mask logits.

    Args:
        dim: d_w, the width of z.
        num_heads: heads of the shared layer(s).
        mlp_ratio: hidden width of the shared MLP, relative to dim.
        shared_layers: number of shared transformer layers (paper: 1; 0 = "no fusion" ablation).
        upsample_blocks: l in eq. 10; output side = grid · 2**l.
        projection: end the upsampling with a linear 1×1 conv, as CRIS's projector does (the
            features dotted with the text vector are then not all ReLU outputs, i.e. not all ≥ 0);
            Table V's decoder FLOPs count it.
    """

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float, shared_layers: int, upsample_blocks: int, projection: bool = False
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(SharedBlock(dim, num_heads, mlp_ratio) for _ in range(shared_layers))
        self.upsample = nn.Sequential(*(UpsampleBlock(dim) for _ in range(upsample_blocks)))
        self.projection = nn.Conv2d(dim, dim, kernel_size=1) if projection else None
        self.text_mlp = Mlp(dim, dim, dim)
        self.activation_checkpointing = False

    def forward(self, z: torch.Tensor, key_padding_mask: torch.Tensor | None, num_vision_tokens: int) -> torch.Tensor:
        """z: (B, N, C) with vision tokens [cls, patches…] first → logits (B, 1, g·2**l, g·2**l)."""
        return self.forward_with_text_state(z, key_padding_mask, num_vision_tokens)[0]

    def forward_with_text_state(
        self, z: torch.Tensor, key_padding_mask: torch.Tensor | None, num_vision_tokens: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """As :meth:`forward`, plus the <s> token's state after the shared layer(s) (B, C), which a
        no-target head reads."""
        for layer in self.layers:
            z = run_block(layer, self.activation_checkpointing, z, key_padding_mask)
        b, _, c = z.shape
        patches = z[:, 1:num_vision_tokens]  # drop the visual cls
        grid = math.isqrt(num_vision_tokens - 1)
        # Not checkpointed: a recomputed BatchNorm would update its running statistics twice.
        feature_map = self.upsample(patches.transpose(1, 2).reshape(b, c, grid, grid))  # (B, C, H', W')
        if self.projection is not None:
            feature_map = self.projection(feature_map)
        text_cls = self.text_mlp(z[:, num_vision_tokens])  # (B, C): the <s> token
        logits = torch.einsum("bchw,bc->bhw", feature_map, text_cls)[:, None]
        return logits, z[:, num_vision_tokens]
