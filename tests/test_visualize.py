"""Readable overlays: a tint that contrasts with the region, an outline exactly on the mask's border,
a colour per mask; and the mask PNG unchanged (0/255)."""

from __future__ import annotations

import colorsys

import numpy as np
from PIL import Image

from shared_ris.visualize import MASK_PALETTE, contrasting_color, mask_contour, overlay_mask, overlay_masks, save_mask

BLUE = (40, 60, 220)


def eroded(mask: np.ndarray, width: int) -> np.ndarray:
    """Reference erosion by a (2·width + 1)² square, the image's edge replicated outward."""
    padded = np.pad(mask, width, mode="edge")
    height, breadth = mask.shape
    shifts = [padded[dy : dy + height, dx : dx + breadth] for dy in range(2 * width + 1) for dx in range(2 * width + 1)]
    return np.logical_and.reduce(shifts)


def blue_disc(size: int = 48) -> tuple[Image.Image, np.ndarray]:
    """A gray image with a blue disc, and the disc's mask."""
    yy, xx = np.mgrid[:size, :size]
    mask = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 3) ** 2
    pixels = np.full((size, size, 3), 128, np.uint8)
    pixels[mask] = BLUE
    return Image.fromarray(pixels), mask


def hue_degrees(rgb) -> float:
    return colorsys.rgb_to_hsv(*(c / 255 for c in rgb))[0] * 360


def test_tint_on_a_blue_region_is_not_red_or_purple():
    image, mask = blue_disc()
    color = contrasting_color(image, mask)
    assert color == MASK_PALETTE["yellow"]  # the palette colour farthest from blue
    out = np.asarray(overlay_mask(image, mask, contour_width=0))
    tinted = out[mask][0]
    assert not 240 <= hue_degrees(tinted) <= 345, f"tinted blue reads as purple/violet: {tinted}"  # red on blue did
    assert tinted[0] > BLUE[0] + 60 and tinted[2] < BLUE[2] - 60  # moved towards yellow, away from blue
    assert (out[~mask] == 128).all()  # outside the mask: untouched


def test_contour_is_exactly_the_masks_border():
    mask = np.zeros((30, 40), bool)
    mask[5:20, 8:40] = True  # touches the right edge: the image's edge is not a border
    mask[12:15, 20:25] = False  # a hole has a border too
    for width in (1, 2, 3):
        expected = mask & ~eroded(mask, width)
        assert (mask_contour(mask, width) == expected).all(), width
    assert not mask_contour(mask, 1)[6:19, 39].any()


def test_overlay_outline_opaque_fill_blended_outside_untouched():
    image, mask = blue_disc()
    out = np.asarray(overlay_mask(image, mask, contour_width=2)).astype(int)
    ring = mask_contour(mask, 2)
    color = np.array(MASK_PALETTE["yellow"])
    assert ring.any() and (out[ring] == color).all()  # the outline: the colour itself
    inside = mask & ~ring
    assert inside.any() and not (out[inside] == color).all(axis=1).any()  # the fill: blended, not opaque
    assert (out[~mask] == np.asarray(image)[~mask]).all()


def test_each_mask_gets_its_own_colour():
    image, mask = blue_disc()
    halves = [mask & (np.arange(48)[None, :] < 24), mask & (np.arange(48)[None, :] >= 24), mask]
    _, colors = overlay_masks(image, halves)
    assert len(set(colors)) == 3 and colors[0] == MASK_PALETTE["yellow"]
    assert all(color in MASK_PALETTE.values() for color in colors)


def test_empty_mask_leaves_the_image_as_it_was():
    image, _ = blue_disc()
    empty = np.zeros((48, 48), bool)
    assert np.array_equal(np.asarray(overlay_mask(image, empty)), np.asarray(image))


def test_save_mask_is_still_0_and_255(tmp_path):
    _, mask = blue_disc()
    save_mask(mask, tmp_path / "m.png")
    saved = Image.open(tmp_path / "m.png")
    assert saved.mode == "L" and set(np.unique(np.asarray(saved))) == {0, 255}
    assert np.array_equal(np.asarray(saved) == 255, mask)
