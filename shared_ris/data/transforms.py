"""Image and mask ↔ tensor conversions shared by the loader and the predictor.

BEiT-3 fine-tuning resizes to a square S×S with bicubic interpolation (no aspect preservation) and
normalises with mean = std = 0.5 (``beit3.md``, Images). Masks are resized with nearest neighbour so
they stay binary. Nothing here flips: a flip would contradict "left"/"right" in the expression.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps

MEAN = STD = 0.5


def load_image(source: bytes | str | Path | BinaryIO | Image.Image, exif_transpose: bool = True) -> Image.Image:
    """Decode an image to 8-bit RGB (grayscale, RGBA, palette, CMYK and 16-bit inputs included).

    Args:
        source: encoded bytes, a path, an open binary file, or a PIL image.
        exif_transpose: rotate as the EXIF orientation says (what a user's photo needs). Dataset
            samples pass False: COCO masks are drawn on the stored pixel grid, which ignores EXIF.
    """
    image = source if isinstance(source, Image.Image) else Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    if exif_transpose:
        image = ImageOps.exif_transpose(image)
    if image.mode == "I" or image.mode.startswith("I;16"):
        # 16-bit grayscale: PIL's convert("RGB") clips at 255 instead of scaling, so drop the low byte
        array = np.asarray(image, dtype=np.float32)
        if array.max() > 255:
            array = array / 257.0
        image = Image.fromarray(np.clip(array, 0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


def resize_image(image: Image.Image, size: int) -> Image.Image:
    """Bicubic resize of an RGB image to size×size (aspect ratio not preserved)."""
    return image if image.size == (size, size) else image.resize((size, size), Image.BICUBIC)


def image_to_uint8(image: Image.Image, size: int) -> torch.Tensor:
    """RGB PIL image → resized (3, size, size) uint8 tensor; :func:`normalize` finishes the job.

    Kept separate so loader workers ship 1-byte pixels between processes and normalise whole batches.
    """
    array = np.asarray(resize_image(image, size), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels (..., 3, H, W) → float32 with mean = std = 0.5, i.e. values in [-1, 1]."""
    return pixels.to(torch.float32).div_(255.0 * STD).sub_(MEAN / STD)


def image_to_tensor(image: Image.Image, size: int) -> torch.Tensor:
    """RGB PIL image → (3, size, size) float32, bicubic-resized, normalised with mean = std = 0.5."""
    return normalize(image_to_uint8(image, size))


def load_mask(source: bytes | str | Path | BinaryIO) -> np.ndarray:
    """A stored mask (8-bit PNG, 0/255) → (H, W) uint8 array in {0, 1}."""
    mask = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    return (np.asarray(mask.convert("L")) > 127).astype(np.uint8)


def mask_to_tensor(mask: np.ndarray | torch.Tensor, size: int) -> torch.Tensor:
    """(H, W) binary mask → (1, size, size) float32 in {0, 1}, nearest-neighbour resized."""
    array = mask.numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    image = Image.fromarray((array > 0).astype(np.uint8))
    if image.size != (size, size):
        image = image.resize((size, size), Image.NEAREST)
    return torch.from_numpy(np.asarray(image, dtype=np.float32).copy())[None]


def encode_mask_png(mask: np.ndarray) -> bytes:
    """(H, W) binary mask → 8-bit grayscale PNG bytes with values 0/255."""
    buffer = io.BytesIO()
    Image.fromarray(np.where(mask > 0, 255, 0).astype(np.uint8)).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()
