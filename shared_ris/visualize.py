"""Pictures of predictions: binary masks, tinted overlays, attention heat maps (Fig. 7) and the
IoU-by-target-size bar chart (Fig. 6). Pillow only; every function works at the image's own size
without keeping more than one extra full-size copy."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont, ImageStat

# Tints for masks: saturated and far apart, so that the one farthest from a region's own colour
# stands out on it (a red tint on a blue shape reads as purple, one of the shapes' own colours).
MASK_PALETTE = {
    "yellow": (255, 221, 0), "cyan": (0, 229, 255), "magenta": (255, 0, 170), "green": (60, 255, 60),
    "orange": (255, 110, 0), "blue": (40, 80, 255), "red": (255, 40, 40), "white": (255, 255, 255),
}  # fmt: skip
# Anchor colours of a perceptually ordered map (dark blue → teal → yellow → red), interpolated to 256.
_HEAT_ANCHORS = np.array([[48, 18, 59], [40, 120, 220], [30, 200, 160], [190, 230, 50], [250, 150, 30], [180, 20, 10]], np.float32)
SPLIT_COLORS = [(66, 133, 244), (234, 67, 53), (251, 188, 5), (52, 168, 83), (154, 80, 200), (90, 90, 90)]


def save_mask(mask: np.ndarray, path: str | Path) -> None:
    """(H, W) boolean mask → 8-bit grayscale PNG with values 0 / 255."""
    mask_image(mask).save(path, format="PNG", compress_level=1)


def mask_image(mask: np.ndarray) -> Image.Image:
    """(H, W) boolean mask → an "L" image, 255 inside, 0 outside."""
    return Image.fromarray(np.asarray(mask, dtype=bool)).convert("L")


def contrasting_color(image: Image.Image, mask: np.ndarray, taken: Sequence[tuple[int, int, int]] = ()) -> tuple[int, int, int]:
    """The :data:`MASK_PALETTE` colour farthest (RGB distance) from the mean colour of ``image``'s
    pixels under the (H, W) boolean ``mask`` (of the whole image when the mask is empty), skipping
    the ``taken`` ones while others are left."""
    region = mask_image(mask) if mask.any() else None
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    mean = np.array(ImageStat.Stat(rgb, mask=region).mean, np.float32)  # (3,), without a float copy of the image
    free = [color for color in MASK_PALETTE.values() if color not in taken] or list(MASK_PALETTE.values())
    return max(free, key=lambda color: float(np.sum((np.array(color, np.float32) - mean) ** 2)))


def mask_contour(mask: np.ndarray, width: int = 2) -> np.ndarray:
    """(H, W) bool: the mask's pixels within ``width`` pixels (8-connected) of a pixel outside it,
    i.e. the mask minus its erosion by a (2·width + 1)² square. The image's edge is not a border."""
    eroded = np.asarray(mask_image(mask).filter(ImageFilter.MinFilter(2 * width + 1))) > 0
    return np.asarray(mask, dtype=bool) & ~eroded


def contour_width_for(size: tuple[int, int]) -> int:
    """1 px on small images, up to 3 px on large ones (one per 256 px of the shorter side)."""
    return min(3, max(1, round(min(size) / 256)))


def overlay_masks(
    image: Image.Image, masks: Sequence[np.ndarray], alpha: float = 0.55, contour_width: int | None = None
) -> tuple[Image.Image, list[tuple[int, int, int]]]:
    """A copy of the RGB ``image`` with each (H, W) boolean mask tinted at opacity ``alpha`` and
    outlined (``contour_width`` px, opaque; ``None``: :func:`contour_width_for` the image), each in
    its own colour, chosen to contrast with the region it covers (:func:`contrasting_color`).
    Later masks are drawn over earlier ones. Returns the picture and the colour of each mask."""
    out, colors = image.convert("RGB"), []
    contour_width = contour_width_for(image.size) if contour_width is None else contour_width
    for mask in masks:
        if mask.shape != (image.height, image.width):
            raise ValueError(f"mask {mask.shape} does not match image {(image.height, image.width)}")
        color = contrasting_color(image, mask, colors)
        colors.append(color)
        out.paste(color, mask=mask_image(mask).point(lambda v: int(v * alpha)))
        if contour_width > 0:
            out.paste(color, mask=Image.fromarray(mask_contour(mask, contour_width)))
    return out, colors


def overlay_mask(image: Image.Image, mask: np.ndarray, alpha: float = 0.55, contour_width: int | None = None) -> Image.Image:
    """A copy of the RGB ``image`` with the (H, W) boolean ``mask`` tinted and outlined in a
    colour that contrasts with it (:func:`overlay_masks` with one mask)."""
    return overlay_masks(image, [mask], alpha, contour_width)[0]


def heat_colors(levels: np.ndarray) -> np.ndarray:
    """uint8 levels (...) → RGB uint8 (..., 3) on a map from low (dark blue) to high (red)."""
    x = np.linspace(0, len(_HEAT_ANCHORS) - 1, 256)
    lut = np.stack([np.interp(x, np.arange(len(_HEAT_ANCHORS)), _HEAT_ANCHORS[:, c]) for c in range(3)], axis=1)
    return lut.round().astype(np.uint8)[levels]


def overlay_attention(image: Image.Image, attention: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """Blend a (g, g) attention map, min-max scaled and coloured, upsampled bilinearly over ``image``."""
    values = np.asarray(attention, dtype=np.float32)
    span = float(values.max() - values.min())
    levels = ((values - values.min()) / span * 255 if span > 0 else np.zeros_like(values)).round().astype(np.uint8)
    heat = Image.fromarray(heat_colors(levels)).resize(image.size, Image.BILINEAR)
    return Image.blend(image.convert("RGB"), heat, alpha)


# Pillow's built-in font has no glyphs for these; the chart spells them in ASCII.
_ASCII = str.maketrans({"σ": "p", "≥": ">=", "×": "x", "–": "-", "τ": "tau"})


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one fixed-size bitmap font
        return ImageFont.load_default()


def plot_iou_by_size(
    by_size: dict[str, Sequence[dict]],
    path: str | Path,
    metric: str = "mIoU",
    title: str = "IoU by target size ratio (target area / image area)",
    subtitle: str = "",
    size: tuple[int, int] = (900, 520),
) -> None:
    """Grouped bar chart (PNG) of ``metric`` per size bin, one colour per split (the paper's Fig. 6).

    Args:
        by_size: split name → the ``by_size`` rows of :func:`shared_ris.metrics.iou_by_size`
            (``lo``, ``hi``, ``n``, ``mIoU``, ``oIoU``); every split must use the same bins.
        metric: ``"mIoU"`` or ``"oIoU"``; bars are drawn in percent, empty bins (n = 0) are left out.
        subtitle: a second line under the title, e.g. the protocol.
    """
    width, height = size
    left, right, top, bottom = 70, 20, 70 if subtitle else 50, 90
    plot_w, plot_h = width - left - right, height - top - bottom
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font, small = _font(16), _font(12)
    draw.text((width // 2, 12), title.translate(_ASCII), fill="black", font=font, anchor="mt")
    if subtitle:
        draw.text((width // 2, 36), subtitle.translate(_ASCII), fill=(90, 90, 90), font=small, anchor="mt")
    for pct in range(0, 101, 20):
        y = top + plot_h - pct / 100 * plot_h
        draw.line([(left, y), (left + plot_w, y)], fill=(225, 225, 225))
        draw.text((left - 8, y), f"{pct}", fill="black", font=small, anchor="rm")
    draw.text((left, top - 8), f"{metric} (%)", fill="black", font=small, anchor="rb")
    splits = list(by_size)
    bins = list(by_size[splits[0]]) if splits else []
    group_w = plot_w / max(len(bins), 1)
    bar_w = group_w * 0.8 / max(len(splits), 1)
    for b, row in enumerate(bins):
        x0 = left + b * group_w + group_w * 0.1
        label = f"{row['lo'] * 100:g}-{row['hi'] * 100:g}%"
        draw.text((left + (b + 0.5) * group_w, top + plot_h + 8), label, fill="black", font=small, anchor="mt")
        for s, split in enumerate(splits):
            cell = by_size[split][b]
            if not cell["n"]:
                continue
            value = 100 * float(cell[metric])
            xa, xb = x0 + s * bar_w, x0 + (s + 1) * bar_w - 2
            y = top + plot_h - value / 100 * plot_h
            draw.rectangle([xa, y, xb, top + plot_h], fill=SPLIT_COLORS[s % len(SPLIT_COLORS)])
            draw.text(((xa + xb) / 2, y - 3), f"{value:.0f}", fill="black", font=small, anchor="mb")
    draw.line([(left, top), (left, top + plot_h), (left + plot_w, top + plot_h)], fill="black")
    x = left
    for s, split in enumerate(splits):  # legend under the bin labels
        draw.rectangle([x, height - 30, x + 14, height - 16], fill=SPLIT_COLORS[s % len(SPLIT_COLORS)])
        draw.text((x + 20, height - 23), split, fill="black", font=small, anchor="lm")
        x += 40 + int(draw.textlength(split, font=small))
    draw.text((width - right, height - 23), "target area / image area", fill=(90, 90, 90), font=small, anchor="rm")
    image.save(path)
