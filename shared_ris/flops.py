"""Parameters and FLOPs per component, counted by fvcore at the recipe's image size and text length.

fvcore's "flops" are multiply-adds (one fused multiply-add = 1), as in the paper's tables.
fvcore has no handle for ``aten::scaled_dot_product_attention`` and would silently skip
QKᵀ and AV (a ViT-B at 480 shows 78.8 G instead of 94.4 G), so we register one.
"""

from __future__ import annotations

import warnings
from math import prod

import torch

from .config import Recipe
from .model import build_model

COMPONENTS = {"encoder": "beit3", "fpn": "fpn", "decoder": "decoder"}


def sdpa_flop_jit(inputs, outputs) -> int:
    """Multiply-adds of softmax(Q Kᵀ) V: B·h·Nq·Nk·d for QKᵀ plus B·h·Nq·Nk·dv for AV."""
    from fvcore.nn.jit_handles import get_shape

    q, k, v = (get_shape(x) for x in inputs[:3])
    return prod(q[:-1]) * k[-2] * q[-1] + prod(q[:-1]) * k[-2] * v[-1]


def dummy_inputs(recipe: Recipe, batch_size: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random image and an unpadded text of ``max_text_len`` tokens, shaped as the recipe expects."""
    size, length = recipe.model.image_size, recipe.model.max_text_len
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 3, size, size, generator=generator)
    text_ids = torch.randint(4, 100, (batch_size, length), generator=generator)
    return images, text_ids, torch.zeros(batch_size, length, dtype=torch.bool)


def dummy_batch(recipe: Recipe, batch_size: int, device: torch.device | str = "cpu", seed: int = 0) -> dict:
    """A training batch of :func:`dummy_inputs` and random masks (30 % foreground), on ``device``."""
    images, text_ids, padding = dummy_inputs(recipe, batch_size)
    size = recipe.model.image_size
    masks = (torch.rand(batch_size, 1, size, size, generator=torch.Generator().manual_seed(seed)) > 0.7).float()
    batch = {"images": images, "text_ids": text_ids, "text_padding_mask": padding, "masks": masks}
    return {key: value.to(device) for key, value in batch.items()}


def count_flops(recipe: Recipe) -> dict:
    """{"recipe", "image_size", "text_len", "components": {name: {"params", "gflops"}}, "skipped_ops"}.

    ``gflops`` are fvcore giga multiply-adds for one image-expression pair.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fvcore's import runs deprecated torch.jit.script
        from fvcore.nn import FlopCountAnalysis

    model = build_model(recipe).eval()
    analysis = (
        FlopCountAnalysis(model, dummy_inputs(recipe))
        .set_op_handle("aten::scaled_dot_product_attention", sdpa_flop_jit)
        .unsupported_ops_warnings(False)
        .uncalled_modules_warnings(False)
        .tracer_warnings("none")
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        by_module = analysis.by_module()
        skipped = dict(analysis.unsupported_ops())
    components = {}
    for name, module_name in COMPONENTS.items():
        params = sum(p.numel() for p in getattr(model, module_name).parameters())
        components[name] = {"params": params, "gflops": by_module.get(module_name, 0) / 1e9}
    components["total"] = {
        "params": sum(p.numel() for p in model.parameters()),
        "gflops": by_module[""] / 1e9,
    }
    return {
        "recipe": recipe.name,
        "image_size": recipe.model.image_size,
        "text_len": recipe.model.max_text_len,
        "components": components,
        "skipped_ops": skipped,
    }
