"""BEiT-3 multiway transformer, written from the public description and loadable key-for-key
from the official checkpoints (see ``shared/spec/beit3.md``).

Magneto / sub-LN blocks, pre-LN, residual scale 1. Vision tokens use expert ``A``, text tokens
expert ``B``; attention is one joint softmax over image+text with padded text keys masked.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import DropPath, Multiway, run_block
from ..layers.attention import attention_weights, merge_heads, sdpa, split_heads

# Rows 0 and 1 of each fairseq position table are padding rows that are never read.
POSITION_OFFSET = 2


def layer_norm(dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=1e-5)


class VisionEmbedding(nn.Module):
    """Conv patchify + cls token. Images (B, 3, H, W) → tokens (B, 1 + H/p·W/p, D), cls first."""

    def __init__(self, embed_dim: int, patch_size: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))  # MIM only; kept for loading

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.proj(images).flatten(2).transpose(1, 2)  # (B, n, D), patches row-major
        return torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)


class MultiwayPositions(nn.Module):
    """The two learned position tables: ``A`` (vision, n + 3 rows) and ``B`` (text)."""

    def __init__(self, num_vision_positions: int, num_text_positions: int, embed_dim: int) -> None:
        super().__init__()
        self.A = nn.Embedding(num_vision_positions + POSITION_OFFSET, embed_dim)
        self.B = nn.Embedding(num_text_positions, embed_dim)


class MultiwayAttention(nn.Module):
    """Self-attention with per-modality q/k/v/out projections and the sub-LN before ``out_proj``."""

    def __init__(self, embed_dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = Multiway(nn.Linear(embed_dim, embed_dim))
        self.k_proj = Multiway(nn.Linear(embed_dim, embed_dim))
        self.v_proj = Multiway(nn.Linear(embed_dim, embed_dim))
        self.out_proj = Multiway(nn.Linear(embed_dim, embed_dim))
        self.inner_attn_ln = Multiway(layer_norm(embed_dim))

    def forward(self, x: torch.Tensor, split: int, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
        """x: (B, N, D); split: number of vision tokens; key_padding_mask: (B, N) True = pad → (B, N, D)."""
        q, k, v = (split_heads(proj(x, split), self.num_heads) for proj in (self.q_proj, self.k_proj, self.v_proj))
        # BEiT-3 scales q by head_dim**-0.5 before the product: the same as SDPA's default scale.
        out = sdpa(q, k, v, key_padding_mask)
        return self.out_proj(self.inner_attn_ln(merge_heads(out), split), split)

    def attention_weights(self, x: torch.Tensor, split: int, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
        """The softmax weights (B, h, N, N) that :meth:`forward` applies to the same inputs."""
        q, k = (split_heads(proj(x, split), self.num_heads) for proj in (self.q_proj, self.k_proj))
        return attention_weights(q, k, key_padding_mask)


class FeedForward(nn.Module):
    """fc1 → GELU (erf) → sub-LN → fc2."""

    def __init__(self, embed_dim: int, ffn_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(embed_dim, ffn_dim)
        self.ffn_layernorm = layer_norm(ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.ffn_layernorm(F.gelu(self.fc1(x))))


class EncoderLayer(nn.Module):
    def __init__(self, embed_dim: int, num_heads: int, ffn_dim: int, drop_path: float) -> None:
        super().__init__()
        self.self_attn = MultiwayAttention(embed_dim, num_heads)
        self.self_attn_layer_norm = Multiway(layer_norm(embed_dim))
        self.ffn = Multiway(FeedForward(embed_dim, ffn_dim))
        self.final_layer_norm = Multiway(layer_norm(embed_dim))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, split: int, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
        """x: (B, N, D) → (B, N, D)."""
        x = x + self.drop_path(self.self_attn(self.self_attn_layer_norm(x, split), split, key_padding_mask))
        return x + self.drop_path(self.ffn(self.final_layer_norm(x, split), split))


class Encoder(nn.Module):
    def __init__(
        self,
        embed_dim: int,
        depth: int,
        num_heads: int,
        ffn_dim: int,
        num_vision_positions: int,
        num_text_positions: int,
        drop_path_rate: float,
        final_norm: bool,
    ) -> None:
        super().__init__()
        self.embed_positions = MultiwayPositions(num_vision_positions, num_text_positions, embed_dim)
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # linspace(0, rate, L)
        self.layers = nn.ModuleList(EncoderLayer(embed_dim, num_heads, ffn_dim, r) for r in rates)
        # Present in pretrained files, absent in some fine-tuned ones; RIS reads the raw stream.
        self.layer_norm = Multiway(layer_norm(embed_dim)) if final_norm else None


class BEiT3(nn.Module):
    """The BEiT-3 encoder. State-dict keys equal the official ones without the ``beit3.`` prefix.

    Args:
        image_size: square input side S; the vision position table has (S/p)² + 1 (+2 padding) rows.
        patch_size: p.
        embed_dim, depth, num_heads, ffn_dim: transformer sizes (base: 768, 12, 12, 3072).
        vocab_size: rows of ``text_embed`` (64010 for the official sentencepiece vocabulary).
        max_text_positions: rows of the text position table (1024 in the official files).
        drop_path_rate: stochastic depth of the last layer (linear from 0).
        final_norm: define ``encoder.layer_norm`` (loaded when present; not used by RIS).
    """

    def __init__(
        self,
        image_size: int = 480,
        patch_size: int = 16,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        ffn_dim: int = 3072,
        vocab_size: int = 64010,
        max_text_positions: int = 1024,
        drop_path_rate: float = 0.0,
        final_norm: bool = True,
    ) -> None:
        super().__init__()
        self.image_size = image_size
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.grid_size = image_size // patch_size
        self.num_vision_tokens = self.grid_size**2 + 1  # patches + cls
        self.text_embed = nn.Embedding(vocab_size, embed_dim)
        self.vision_embed = VisionEmbedding(embed_dim, patch_size)
        self.encoder = Encoder(
            embed_dim, depth, num_heads, ffn_dim, self.num_vision_tokens, max_text_positions, drop_path_rate, final_norm
        )
        self.activation_checkpointing = False  # see SharedRIS.set_activation_checkpointing
        self.init_weights()

    def init_weights(self) -> None:
        """Random init for training from scratch; pretrained weights overwrite all of it."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.trunc_normal_(m.weight, std=0.02)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.vision_embed.cls_token, std=0.02)
        nn.init.trunc_normal_(self.vision_embed.mask_token, std=0.02)

    @property
    def depth(self) -> int:
        return len(self.encoder.layers)

    def embed(
        self, images: torch.Tensor, text_ids: torch.Tensor, text_padding_mask: torch.Tensor
    ) -> torch.Tensor:
        """images (B, 3, S, S), text_ids (B, T), text_padding_mask (B, T) → h0 (B, n + 1 + T, D)."""
        if images.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"expected images of {self.image_size}x{self.image_size}, got {tuple(images.shape[-2:])}")
        num_text = text_ids.shape[1]
        positions = self.encoder.embed_positions
        if num_text + POSITION_OFFSET > positions.B.num_embeddings:
            raise ValueError(f"text of {num_text} tokens exceeds the {positions.B.num_embeddings - POSITION_OFFSET} text positions")
        vision = self.vision_embed(images)
        vision = vision + positions.A.weight[POSITION_OFFSET : POSITION_OFFSET + vision.shape[1]]
        text = self.text_embed(text_ids) + positions.B.weight[POSITION_OFFSET : POSITION_OFFSET + num_text]
        text = text.masked_fill(text_padding_mask[..., None], 0.0)
        return torch.cat([vision, text], dim=1)

    def sequence_padding_mask(self, text_padding_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) text padding → (B, n + 1 + T) padding over the joint sequence (vision never padded)."""
        vision = text_padding_mask.new_zeros(text_padding_mask.shape[0], self.num_vision_tokens)
        return torch.cat([vision, text_padding_mask], dim=1)

    def forward(
        self, images: torch.Tensor, text_ids: torch.Tensor, text_padding_mask: torch.Tensor, num_layers: int | None = None
    ) -> list[torch.Tensor]:
        """Return [h0, h1, …, hL], each (B, n + 1 + T, D): the embedding then the raw residual
        stream after every layer, with no final norm. ``num_layers`` runs only the first L layers
        (default all)."""
        x = self.embed(images, text_ids, text_padding_mask)
        padding = self.sequence_padding_mask(text_padding_mask)
        states = [x]
        for layer in self.encoder.layers[: self.depth if num_layers is None else num_layers]:
            x = run_block(layer, self.activation_checkpointing, x, self.num_vision_tokens, padding)
            states.append(x)
        return states
