"""Small, independent building blocks shared by the encoder, FPN and decoder."""

from .checkpointing import run_block
from .attention import Attention, attention_naive, attention_weights, key_padding_to_attn_mask, sdpa
from .drop_path import DropPath, drop_path
from .mlp import Mlp
from .multiway import Multiway
from .recorder import record_attention

__all__ = [
    "Attention", "run_block", "attention_naive", "attention_weights", "key_padding_to_attn_mask", "sdpa", "record_attention",
    "DropPath", "drop_path", "Mlp", "Multiway",
]
