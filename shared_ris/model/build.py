"""Builders: recipe → modules. The only place that reads a ModelConfig."""

from __future__ import annotations

from ..config import ModelConfig, Recipe
from .beit3 import BEiT3
from .decoder import SharedMaskDecoder
from .fpn import NoFPN, SharedFPN
from .no_target import NoTargetHead
from .shared_ris import SharedRIS


def build_beit3(cfg: ModelConfig) -> BEiT3:
    enc = cfg.encoder
    return BEiT3(
        image_size=cfg.image_size,
        patch_size=enc.patch_size,
        embed_dim=enc.embed_dim,
        depth=enc.depth,
        num_heads=enc.num_heads,
        ffn_dim=enc.ffn_dim,
        vocab_size=enc.vocab_size,
        max_text_positions=enc.max_text_positions,
        drop_path_rate=enc.drop_path_rate,
        final_norm=enc.final_norm,
    )


def build_fpn(cfg: ModelConfig) -> SharedFPN | NoFPN:
    if not cfg.fpn.stages:
        return NoFPN(cfg.encoder.embed_dim, cfg.fpn.dim)
    return SharedFPN(cfg.encoder.embed_dim, cfg.fpn.dim, cfg.fpn.stages, cfg.fpn.num_heads)


def build_decoder(cfg: ModelConfig) -> SharedMaskDecoder:
    d = cfg.decoder
    return SharedMaskDecoder(cfg.fpn.dim, d.num_heads, d.mlp_ratio, d.shared_layers, d.upsample_blocks, d.projection)


def build_model(recipe: Recipe | ModelConfig) -> SharedRIS:
    """Build a randomly initialised :class:`SharedRIS` from a recipe (or its ``model`` section)."""
    cfg = recipe.model if isinstance(recipe, Recipe) else recipe
    head = NoTargetHead(cfg.fpn.dim) if cfg.no_target_head else None
    return SharedRIS(
        build_beit3(cfg), build_fpn(cfg), build_decoder(cfg), threshold=cfg.threshold,
        no_target_head=head, no_target_threshold=cfg.no_target_threshold, no_target_min_area=cfg.no_target_min_area,
    )  # fmt: skip
