"""Opt-in capture of attention weights, without a flag on any ``forward`` (DINOv2 keeps extra
outputs out of ``forward`` too): forward hooks recompute the softmax weights from each watched
module's own inputs. The forward pass itself is untouched, so its output is bit-for-bit the same."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import nn


@contextlib.contextmanager
def record_attention(
    modules: dict[str, nn.Module], reduce: Callable[[torch.Tensor], torch.Tensor] = lambda weights: weights
) -> Iterator[dict[str, torch.Tensor]]:
    """While active, every forward of ``modules[name]`` stores ``reduce(weights)`` under ``name``.

    Each module must offer ``attention_weights(*args, **kwargs)`` taking its forward's arguments and
    returning (B, heads, N, N). ``reduce`` keeps only what is needed (e.g. one row), so a batch
    never holds many full N×N maps. Yields the dict that fills up; hooks are removed on exit.
    """
    recorded: dict[str, torch.Tensor] = {}

    def hook_for(name: str):
        def hook(module, args, kwargs, _output) -> None:
            recorded[name] = reduce(module.attention_weights(*args, **kwargs))

        return hook

    handles = [module.register_forward_hook(hook_for(name), with_kwargs=True) for name, module in modules.items()]
    try:
        yield recorded
    finally:
        for handle in handles:
            handle.remove()
