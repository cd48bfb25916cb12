"""Shared-RIS: BEiT-3 encoder → Shared FPN → Shared mask decoder. This module only composes."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from .beit3 import BEiT3
from .decoder import SharedMaskDecoder
from .fpn import NoFPN, SharedFPN


def text_cls_attention_map(weights: torch.Tensor, num_vision_tokens: int) -> torch.Tensor:
    """Row of the text cls token over the patch tokens, head-averaged.

    weights: (B, heads, N, N) → (B, g, g) with g² = num_vision_tokens − 1.
    """
    row = weights.float().mean(1)[:, num_vision_tokens, 1:num_vision_tokens]
    grid = math.isqrt(num_vision_tokens - 1)
    return row.reshape(-1, grid, grid)


class SharedRIS(nn.Module):
    """Referring image segmentation with one shared vision-language encoder.

    Args:
        beit3: the encoder (its state-dict keys sit under ``beit3.``, as in the official files).
        fpn: :class:`SharedFPN` or :class:`NoFPN`.
        decoder: :class:`SharedMaskDecoder`.
        threshold: τ applied to sigmoid(logits) at inference.
    """

    def __init__(self, beit3: BEiT3, fpn: SharedFPN | NoFPN, decoder: SharedMaskDecoder, threshold: float = 0.35) -> None:
        super().__init__()
        self.beit3 = beit3
        self.fpn = fpn
        self.decoder = decoder
        self.threshold = threshold
        # The FPN reads nothing past its deepest stage (e.g. stages [3, 6] of 12 layers): skip those layers.
        self.encoder_layers = max(fpn.stages) if fpn.stages else beit3.depth
        # Loaded for checkpoint compatibility but never on RIS's path: freeze them so DDP needs
        # no find_unused_parameters and the optimizer never sees them.
        for param in self.unused_parameters():
            param.requires_grad_(False)

    def unused_parameters(self) -> list[nn.Parameter]:
        """The MIM mask token, the final norm and any encoder layer past the deepest FPN stage."""
        unused = [self.beit3.vision_embed.mask_token]
        if self.beit3.encoder.layer_norm is not None:
            unused += list(self.beit3.encoder.layer_norm.parameters())
        for layer in self.beit3.encoder.layers[self.encoder_layers :]:
            unused += list(layer.parameters())
        return unused

    @property
    def image_size(self) -> int:
        return self.beit3.image_size

    def encode(self, images: torch.Tensor, text_ids: torch.Tensor, text_padding_mask: torch.Tensor) -> list[torch.Tensor]:
        """[h0, h1, …, hL], each (B, n + 1 + T, D): embedding output then the raw state after every
        layer the FPN reads (L = its deepest stage)."""
        return self.beit3(images, text_ids, text_padding_mask, num_layers=self.encoder_layers)

    def forward(
        self,
        images: torch.Tensor,
        text_ids: torch.Tensor,
        text_padding_mask: torch.Tensor,
        return_attention: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """images (B, 3, S, S) normalised; text_ids (B, T); text_padding_mask (B, T) True = pad.

        Returns mask logits (B, 1, S/4, S/4). With ``return_attention`` also the paper's attention
        maps (Fig. 7) as {"encoder", "fpn", "decoder"} → (B, S/p, S/p): the text-cls row over the
        patches from the encoder's last layer run (the deepest FPN stage), the mean over FPN levels,
        and the decoder's last layer.
        """
        padding = self.beit3.sequence_padding_mask(text_padding_mask)
        split = self.beit3.num_vision_tokens
        if not return_attention:
            states = self.encode(images, text_ids, text_padding_mask)
            return self.decoder(self.fpn(states, padding), padding, split)

        states, encoder_weights = self.beit3(
            images, text_ids, text_padding_mask, return_last_attention=True, num_layers=self.encoder_layers
        )
        z, fpn_weights = self.fpn(states, padding, return_weights=True)
        logits, decoder_weights = self.decoder(z, padding, split, return_weights=True)
        maps = {"encoder": text_cls_attention_map(encoder_weights, split)}
        if fpn_weights:
            maps["fpn"] = torch.stack([text_cls_attention_map(w, split) for w in fpn_weights]).mean(0)
        if decoder_weights:
            maps["decoder"] = text_cls_attention_map(decoder_weights[-1], split)
        return logits, maps

    def load_pretrained(self, path: str | Path, verbose: bool = True):
        """Load an official BEiT-3 ``.pth`` into the encoder; see :func:`load_beit3_checkpoint`."""
        from .checkpoint import load_beit3_checkpoint

        report = load_beit3_checkpoint(self.beit3, path)
        if verbose:
            print(report.summary())
        return report
