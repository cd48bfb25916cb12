"""Small, independent building blocks shared by the encoder, FPN and decoder."""

from .attention import Attention, attention_naive, key_padding_to_attn_mask, sdpa
from .drop_path import DropPath, drop_path
from .mlp import Mlp
from .multiway import Multiway

__all__ = [
    "Attention", "attention_naive", "key_padding_to_attn_mask", "sdpa",
    "DropPath", "drop_path", "Mlp", "Multiway",
]
