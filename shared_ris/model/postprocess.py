"""Mask logits → probabilities and masks at an image's own size (SAM's ``postprocess_masks``).

The logits cover the model's S×S input; ``box`` = (top, left, height, width) says where the image
lay in it (the whole canvas when stretched, a centred box when letterboxed: see
:func:`shared_ris.data.transforms.content_box`). Two resamplings:

- ours (``sris eval``'s default and ``sris predict``): bilinear, half-pixel centres
  (``align_corners=False``), then σ;
- CRIS's (``--protocol cris``, its ``engine.py``): σ, bicubic ×4 to S×S with ``align_corners=True``,
  then the inverse affine warp to the image (bicubic, integer pixel centres, 0 outside), as
  ``cv2.warpAffine(…, INTER_CUBIC, borderValue=0)`` does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Box = tuple[int, int, int, int]


def _bilinear_weights(out_len: int, in_len: int, start: int, extent: int, total: int) -> torch.Tensor:
    """(out_len, in_len) weights: output pixel i reads the input grid at the position of
    S-space coordinate start + (i + ½)·extent/out_len (half-pixel centres, clamped at the edges)."""
    centres = start + (torch.arange(out_len, dtype=torch.float64) + 0.5) * extent / out_len
    source = (centres * in_len / total - 0.5).clamp(0, in_len - 1)
    low = source.floor().long()
    high = (low + 1).clamp(max=in_len - 1)
    frac = (source - low).float()
    weights = torch.zeros(out_len, in_len)
    weights.scatter_add_(1, low[:, None], (1 - frac)[:, None])
    weights.scatter_add_(1, high[:, None], frac[:, None])
    return weights


def upsample_probabilities(logits: torch.Tensor, size: tuple[int, int], box: Box | None = None, input_size: int = 0) -> torch.Tensor:
    """(1, h, w) or (h, w) logits → (H, W) float32 probabilities: bilinear resize, then sigmoid.

    With ``box`` (a letterboxed input of side ``input_size``) only that part is mapped to the image;
    bilinear is separable, so it is two small matrix products, never a full-size coordinate grid.
    The sigmoid runs in place on the resized map, so a 12-MP image costs one float map, not two.
    """
    logits = logits.reshape(1, 1, *logits.shape[-2:]).float()
    if box is not None:
        top, left, height, width = box
        rows = _bilinear_weights(size[0], logits.shape[-2], top, height, input_size)
        cols = _bilinear_weights(size[1], logits.shape[-1], left, width, input_size)
        return (rows @ logits[0, 0] @ cols.T).sigmoid_()
    if tuple(logits.shape[-2:]) != tuple(size):
        return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)[0, 0].sigmoid_()
    return logits[0, 0].sigmoid()


def logits_to_mask(
    logits: torch.Tensor, size: tuple[int, int], threshold: float, box: Box | None = None, input_size: int = 0
) -> torch.Tensor:
    """(1, h, w) or (h, w) logits → boolean mask at ``size``: bilinear resize, then σ > τ."""
    return upsample_probabilities(logits, size, box, input_size) > threshold


def cris_probabilities(logits: torch.Tensor, size: tuple[int, int], box: Box, input_size: int) -> torch.Tensor:
    """CRIS's resampling of (1, h, w) logits to the (H, W) image whose content lies at ``box`` of the
    ``input_size``² input: σ, bicubic to the input size (``align_corners=True``), then every image
    pixel (x, y) reads the input at (left + x·width/W, top + y·height/H) bicubically, 0 outside."""
    probs = logits.reshape(1, 1, *logits.shape[-2:]).float().sigmoid()
    probs = F.interpolate(probs, size=(input_size, input_size), mode="bicubic", align_corners=True)
    top, left, height, width = box
    ys = top + torch.arange(size[0], dtype=torch.float64) * height / size[0]
    xs = left + torch.arange(size[1], dtype=torch.float64) * width / size[1]
    scale = 2.0 / (input_size - 1)  # align_corners=True: −1 and 1 are the centres of the edge pixels
    grid = torch.stack(torch.meshgrid(xs * scale - 1, ys * scale - 1, indexing="xy"), dim=-1).float()[None]
    return F.grid_sample(probs, grid, mode="bicubic", padding_mode="zeros", align_corners=True)[0, 0]
