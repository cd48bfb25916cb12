"""Shared-RIS: BEiT-3 encoder → Shared FPN → Shared mask decoder. This module only composes."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, TypeVar

import torch
from torch import nn

from ..layers import record_attention
from .beit3 import BEiT3
from .decoder import SharedMaskDecoder
from .fpn import NoFPN, SharedFPN
from .no_target import NoTargetHead
from .pretrained import LoadReport, load_beit3_checkpoint

T = TypeVar("T")


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
        no_target_head: gRefCOCO's "names nothing" classifier (:class:`NoTargetHead`), or None.
        no_target_threshold: the head decides "no target" when σ(its logit) > this.
        no_target_min_area: without a head, masks under this many pixels at S×S mean "no target" (0: off).
    """

    def __init__(
        self, beit3: BEiT3, fpn: SharedFPN | NoFPN, decoder: SharedMaskDecoder, threshold: float = 0.35,
        no_target_head: NoTargetHead | None = None, no_target_threshold: float = 0.5, no_target_min_area: int = 0,
    ) -> None:  # fmt: skip
        super().__init__()
        self.beit3 = beit3
        self.fpn = fpn
        self.decoder = decoder
        self.no_target_head = no_target_head
        self.threshold = threshold
        self.no_target_threshold = no_target_threshold
        self.no_target_min_area = no_target_min_area
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

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Recompute each encoder layer, FPN level and shared decoder layer in the backward instead of
        keeping its activations (same gradients, less memory, one more forward of those blocks). The
        upsampling blocks are not: a recomputed BatchNorm would update its statistics twice."""
        for part in (self.beit3, self.fpn, self.decoder):
            part.activation_checkpointing = enabled

    @property
    def image_size(self) -> int:
        return self.beit3.image_size

    def encode(self, images: torch.Tensor, text_ids: torch.Tensor, text_padding_mask: torch.Tensor) -> list[torch.Tensor]:
        """[h0, h1, …, hL], each (B, n + 1 + T, D): embedding output then the raw state after every
        layer the FPN reads (L = its deepest stage)."""
        return self.beit3(images, text_ids, text_padding_mask, num_layers=self.encoder_layers)

    def forward(self, images: torch.Tensor, text_ids: torch.Tensor, text_padding_mask: torch.Tensor) -> torch.Tensor:
        """images (B, 3, S, S) normalised; text_ids (B, T); text_padding_mask (B, T) True = pad
        → mask logits (B, 1, S/4, S/4)."""
        padding = self.beit3.sequence_padding_mask(text_padding_mask)
        states = self.encode(images, text_ids, text_padding_mask)
        return self.decoder(self.fpn(states, padding), padding, self.beit3.num_vision_tokens)

    def forward_with_no_target(
        self, images: torch.Tensor, text_ids: torch.Tensor, text_padding_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """As :meth:`forward`, plus the no-target head's logits (B,) (> 0: the expression names nothing)."""
        if self.no_target_head is None:
            raise ValueError("this model has no no-target head (recipe key model.no_target_head)")
        padding = self.beit3.sequence_padding_mask(text_padding_mask)
        states = self.encode(images, text_ids, text_padding_mask)
        logits, text_state = self.decoder.forward_with_text_state(self.fpn(states, padding), padding, self.beit3.num_vision_tokens)
        return logits, self.no_target_head(text_state, logits)

    def attention_modules(self) -> dict[str, nn.Module]:
        """The attentions the paper's Fig. 7 shows: the encoder's last run layer (the deepest FPN
        stage), each FPN level and the decoder's last shared layer, by name."""
        modules: dict[str, nn.Module] = {"encoder": self.beit3.encoder.layers[self.encoder_layers - 1].self_attn}
        for i, level in enumerate(getattr(self.fpn, "levels", [])):
            modules[f"fpn.{i}"] = level.attn
        if len(self.decoder.layers):
            modules["decoder"] = self.decoder.layers[-1].attn
        return modules

    def attention_maps(
        self, images: torch.Tensor, text_ids: torch.Tensor, text_padding_mask: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Mask logits and the paper's attention maps (Fig. 7) from one forward pass.

        Returns the logits of :meth:`forward` (bit for bit) and {"encoder", "fpn", "decoder"} →
        (B, S/p, S/p): the text-cls row over the patches, head-averaged, of the encoder's last run
        layer, the mean over the FPN levels, and the decoder's last layer ("fpn" / "decoder" are
        absent when the model has none).
        """
        return self.recording_attention(lambda: self(images, text_ids, text_padding_mask))

    def recording_attention(self, run: Callable[[], T]) -> tuple[T, dict[str, torch.Tensor]]:
        """``run()``'s result (any forward of this model, e.g. :meth:`forward_with_no_target`) and
        the attention maps of :meth:`attention_maps` recorded during it: one pass for both."""
        split = self.beit3.num_vision_tokens
        with record_attention(self.attention_modules(), lambda w: text_cls_attention_map(w, split)) as recorded:
            result = run()
        maps = {"encoder": recorded["encoder"]}
        levels = [recorded[name] for name in recorded if name.startswith("fpn.")]
        if levels:
            maps["fpn"] = torch.stack(levels).mean(0)
        if "decoder" in recorded:
            maps["decoder"] = recorded["decoder"]
        return result, maps

    def load_pretrained(self, path: str | Path, verbose: bool = True) -> LoadReport:
        """Load an official BEiT-3 ``.pth`` into the encoder; see :func:`load_beit3_checkpoint`."""
        report = load_beit3_checkpoint(self.beit3, path)
        if verbose:
            print(report.summary())
        return report
