"""Image and mask ↔ tensor conversions shared by the loader and the predictor.

BEiT-3 fine-tuning resizes to a square S×S with bicubic interpolation (no aspect preservation) and
normalises with mean = std = 0.5 (``beit3.md``, Images): ``data.resize: stretch``. CRIS and CGFormer
keep the aspect ratio and pad (``letterbox``): the image is scaled by min(S/h, S/w) to
(round(h·s), round(w·s)) and placed at the centre (integer offsets, :func:`letterbox_box`) of an
S×S canvas of the mean colour (0 once normalised). Masks are resized with nearest neighbour so they
stay binary. Nothing here flips: a flip would contradict "left"/"right" in the expression.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps

MEAN = STD = 0.5
RESIZES = ("stretch", "letterbox")
PAD_GRAY = 128  # the canvas around a letterboxed image: (128/255 − 0.5) / 0.5 ≈ 0 once normalised


def letterbox_box(height: int, width: int, size: int) -> tuple[int, int, int, int]:
    """(top, left, new_height, new_width) of an image of ``height`` × ``width`` letterboxed into
    ``size`` × ``size``: scaled by min(size/h, size/w), centred, at integer pixels."""
    scale = min(size / height, size / width)
    new_h, new_w = max(1, min(size, round(height * scale))), max(1, min(size, round(width * scale)))
    return (size - new_h) // 2, (size - new_w) // 2, new_h, new_w


def content_box(height: int, width: int, size: int, resize: str) -> tuple[int, int, int, int] | None:
    """Where the image lies in the S×S input; ``None`` when stretched (it fills the canvas)."""
    return letterbox_box(height, width, size) if resize == "letterbox" else None


def _letterboxed(image: Image.Image, size: int, mode: str, fill, resample: int) -> Image.Image:
    """``image`` scaled into its :func:`letterbox_box` of a ``size``² ``mode`` canvas of ``fill``."""
    top, left, new_h, new_w = letterbox_box(image.height, image.width, size)
    canvas = Image.new(mode, (size, size), fill)
    canvas.paste(image.resize((new_w, new_h), resample), (left, top))
    return canvas


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
    return image if image.mode == "RGB" else image.convert("RGB")


def resize_image(image: Image.Image, size: int) -> Image.Image:
    """Bicubic resize of an RGB image to size×size (aspect ratio not preserved)."""
    return image if image.size == (size, size) else image.resize((size, size), Image.BICUBIC)


def image_pixels(image: Image.Image, size: int, resize: str = "stretch") -> torch.Tensor:
    """RGB PIL image → bicubic-resized (3, size, size) uint8 tensor (pass it to :func:`normalize_`),
    stretched or letterboxed (``resize``)."""
    if resize == "letterbox":
        image = _letterboxed(image, size, "RGB", (PAD_GRAY,) * 3, Image.BICUBIC)
    return torch.from_numpy(np.array(resize_image(image, size), dtype=np.uint8)).permute(2, 0, 1)


def normalize_(pixels: torch.Tensor) -> torch.Tensor:
    """Float pixels in [0, 255] → mean = std = 0.5 normalised, i.e. [-1, 1], in place."""
    return pixels.mul_(1.0 / (255.0 * STD)).sub_(MEAN / STD)


def image_to_tensor(image: Image.Image, size: int, resize: str = "stretch") -> torch.Tensor:
    """RGB PIL image → (3, size, size) float32, bicubic-resized (stretched or letterboxed),
    normalised with mean = std = 0.5."""
    return normalize_(image_pixels(image, size, resize).to(dtype=torch.float32, memory_format=torch.contiguous_format))


def load_mask(source: bytes | str | Path | BinaryIO) -> np.ndarray:
    """A stored mask (8-bit PNG, 0/255) → (H, W) uint8 array in {0, 1}."""
    mask = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    return (np.asarray(mask.convert("L")) > 127).astype(np.uint8)


def mask_to_tensor(mask: np.ndarray | torch.Tensor, size: int, resize: str = "stretch") -> torch.Tensor:
    """(H, W) binary mask → (1, size, size) float32 in {0, 1}, nearest-neighbour resized."""
    array = mask.numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    return mask_pixels(Image.fromarray((array > 0).astype(np.uint8)), size, resize).to(torch.float32)[None]


def mask_pixels(mask: bytes | Image.Image, size: int, resize: str = "stretch") -> torch.Tensor:
    """A stored mask (PNG bytes or a PIL image, any value > 0 is foreground) → (size, size) uint8 in
    {0, 1}, nearest-neighbour resized (stretched or letterboxed) without a full-size array."""
    image = Image.open(io.BytesIO(mask)) if isinstance(mask, bytes) else mask
    if image.mode not in ("L", "1"):
        image = image.convert("L")
    if resize == "letterbox":
        image = _letterboxed(image, size, "L", 0, Image.NEAREST)
    elif image.size != (size, size):
        image = image.resize((size, size), Image.NEAREST)
    return torch.from_numpy(np.array(image, dtype=np.uint8) > 0).to(torch.uint8)


def encode_mask_png(mask: np.ndarray) -> bytes:
    """(H, W) binary mask → 8-bit grayscale PNG bytes with values 0/255."""
    buffer = io.BytesIO()
    Image.fromarray(np.where(mask > 0, 255, 0).astype(np.uint8)).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()
