"""Multi-head self-attention over a padded joint image+text sequence.

The fused kernel (``F.scaled_dot_product_attention``) is the only path used in training and
inference; :func:`attention_naive` is the readable reference kept for tests, and
:func:`attention_weights` gives the softmax weights that attention maps show (computed apart from
the forward pass, see :mod:`.recorder`).
"""

import torch
import torch.nn.functional as F
from torch import nn


def key_padding_to_attn_mask(key_padding_mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B, N) bool, True = padded key → (B, 1, 1, N) bool, True = may attend (SDPA's convention)."""
    if key_padding_mask is None:
        return None
    return ~key_padding_mask[:, None, None, :]


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
    """softmax(q kᵀ / sqrt(d)) v with padded keys excluded. q, k, v: (B, h, N, d) → (B, h, N, d)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=key_padding_to_attn_mask(key_padding_mask))


def attention_weights(q: torch.Tensor, k: torch.Tensor, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
    """softmax(q kᵀ / sqrt(d)) in fp32 with padded keys at exactly 0. q, k: (B, h, N, d) → (B, h, N, N)."""
    scores = (q.float() @ k.float().transpose(-2, -1)) * q.shape[-1] ** -0.5
    if key_padding_mask is not None:
        scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    return scores.softmax(dim=-1)


def attention_naive(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference attention, softmax in fp32. Returns the output (B, h, N, d) and the weights (B, h, N, N)."""
    weights = attention_weights(q, k, key_padding_mask)
    return (weights @ v.float()).to(v.dtype), weights


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, N, h·d) → (B, h, N, d)."""
    b, n, c = x.shape
    return x.view(b, n, num_heads, c // num_heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, h, N, d) → (B, N, h·d)."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


class Attention(nn.Module):
    """Plain multi-head self-attention (the shared layer of the FPN and the decoder).

    Args:
        dim: token width C.
        num_heads: number of heads; C must divide by it.
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple(split_heads(t, self.num_heads) for t in self.qkv(x).chunk(3, dim=-1))

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, N, C); key_padding_mask: (B, N) True = pad. Returns (B, N, C)."""
        q, k, v = self._qkv(x)
        return self.proj(merge_heads(sdpa(q, k, v, key_padding_mask)))

    def attention_weights(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The softmax weights (B, h, N, N) that :meth:`forward` applies to the same inputs."""
        q, k, _ = self._qkv(x)
        return attention_weights(q, k, key_padding_mask)
