"""Letterboxing (CRIS / CGFormer's aspect-kept input) and CRIS's way back to the image."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from shared_ris.data.transforms import image_pixels, letterbox_box, mask_pixels
from shared_ris.model.postprocess import cris_probabilities, logits_to_mask

SHAPES = [(37, 61), (61, 37), (9, 31), (23, 23), (5, 7)]  # (height, width): odd sizes and aspect ratios


def blob_mask(height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mask = rng.random((height, width)) > 0.6
    mask[height // 3 : 2 * height // 3 + 1, width // 4 : 3 * width // 4 + 1] = True
    return mask


@pytest.mark.parametrize("height,width", SHAPES)
def test_the_box_keeps_the_aspect_ratio_centred(height, width):
    size = 64
    top, left, new_h, new_w = letterbox_box(height, width, size)
    assert max(new_h, new_w) == size  # the longer side fills the canvas
    assert abs(new_h / new_w - height / width) <= 1 / min(new_h, new_w)  # rounding only
    assert (top, left) == ((size - new_h) // 2, (size - new_w) // 2)


@pytest.mark.parametrize("height,width", SHAPES)
def test_a_mask_goes_into_the_letterbox_and_back_exactly(height, width):
    size = 480  # every shape here is scaled up, so no pixel of the mask is lost on the way in
    mask = blob_mask(height, width)
    boxed = mask_pixels(Image.fromarray(mask.astype(np.uint8) * 255), size, "letterbox")
    top, left, new_h, new_w = letterbox_box(height, width, size)
    assert boxed.sum() > 0 and boxed[:top].sum() == 0 and boxed[top + new_h :].sum() == 0  # padding stays empty
    assert boxed[:, :left].sum() == 0 and boxed[:, left + new_w :].sum() == 0
    logits = (boxed.float() * 20 - 10)[None]  # ±10: the model saying exactly the letterboxed mask
    back = logits_to_mask(logits, (height, width), 0.5, (top, left, new_h, new_w), size)
    assert torch.equal(back, torch.from_numpy(mask))


def test_a_letterboxed_image_is_padded_with_the_mean_and_resized_bicubically():
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (30, 50, 3), dtype=np.uint8))
    pixels = image_pixels(image, 64, "letterbox")
    top, left, new_h, new_w = letterbox_box(30, 50, 64)
    assert (pixels[:, :top] == 128).all() and (pixels[:, top + new_h :] == 128).all()
    expected = np.asarray(image.resize((new_w, new_h), Image.BICUBIC)).transpose(2, 0, 1)
    assert np.array_equal(pixels[:, top : top + new_h, left : left + new_w].numpy(), expected)


def _cubic(t: float, a: float = -0.75) -> float:
    t = abs(t)
    if t <= 1:
        return (a + 2) * t**3 - (a + 3) * t**2 + 1
    if t < 2:
        return a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a
    return 0.0


def _sample(grid: np.ndarray, y: float, x: float, outside) -> float:
    """Bicubic value of ``grid`` at (y, x) (integer = pixel centre); ``outside(i, j)`` gives taps off the grid."""
    y0, x0 = math.floor(y), math.floor(x)
    total = 0.0
    for i in range(y0 - 1, y0 + 3):
        for j in range(x0 - 1, x0 + 3):
            inside = 0 <= i < grid.shape[0] and 0 <= j < grid.shape[1]
            total += _cubic(y - i) * _cubic(x - j) * (grid[i, j] if inside else outside(i, j))
    return total


def test_the_cris_protocol_is_cris_arithmetic_by_hand():
    """σ; bicubic (a = −0.75) to the S×S input with align_corners=True, edges replicated (torch);
    then each image pixel (x, y) reads the input at (left + x·w'/W, top + y·h'/H), bicubic, 0 off the
    input (cv2.warpAffine(…, INTER_CUBIC, borderValue=0) with CRIS's inverse matrix)."""
    logits = torch.randn(1, 4, 4, generator=torch.Generator().manual_seed(0))
    size, (height, width) = 8, (5, 9)
    box = letterbox_box(height, width, size)
    probs = 1 / (1 + np.exp(-logits[0].numpy().astype(np.float64)))
    step = 3 / 7  # align_corners=True: output pixel k reads input position k·(4−1)/(8−1)
    replicate = lambda i, j: probs[min(max(i, 0), 3), min(max(j, 0), 3)]  # noqa: E731
    upsampled = np.array([[_sample(probs, k * step, m * step, replicate) for m in range(size)] for k in range(size)])
    top, left, new_h, new_w = box
    expected = np.array([[_sample(upsampled, top + y * new_h / height, left + x * new_w / width, lambda i, j: 0.0)
                          for x in range(width)] for y in range(height)])  # fmt: skip
    got = cris_probabilities(logits, (height, width), box, size).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)


class _CanvasLogits(torch.nn.Module):
    """A stand-in model: fixed logits over the 64² input (+10 in the given 16×16 cells, −10
    elsewhere) and an 8×8 "encoder" attention map numbered by cell."""

    image_size, threshold = 64, 0.5

    def __init__(self, positive: tuple[slice, slice]):
        super().__init__()
        self.logits = torch.full((1, 1, 16, 16), -10.0)
        self.logits[0, 0][positive] = 10.0

    def forward(self, images, ids, padding):
        return self.logits.expand(len(images), -1, -1, -1)

    def recording_attention(self, run):
        logits = run()
        return logits, {"encoder": torch.arange(64.0).reshape(1, 8, 8).expand(len(logits), -1, -1)}


def _predictor(resize: str, positive):
    from shared_ris.predictor import Predictor

    tokenizer = lambda texts: (torch.zeros(len(texts), 4, dtype=torch.long), torch.zeros(len(texts), 4, dtype=torch.bool))  # noqa: E731
    return Predictor(_CanvasLogits(positive), tokenizer, resize=resize)


def test_the_predictor_maps_a_letterboxed_image_back_from_its_box():
    # A 64×128 image letterboxed into 64²: scaled by ½, at rows 16..47 of the input (logit rows 4..11).
    image = Image.fromarray(np.full((64, 128, 3), 200, np.uint8))
    box_rows = _predictor("letterbox", (slice(4, 12), slice(None)))
    pixels = box_rows.preprocess(image)
    assert pixels[:, :16].abs().max() < 0.01 and pixels[:, 16:48].min() > 0.5  # gray bars, then the image
    [prediction] = box_rows.predict([image], "x", attention=True)
    assert prediction.mask.all()  # positive over the box's rows: the whole image
    assert prediction.low_res_probs.shape == (8, 16) and prediction.low_res_probs.min() > 0.99  # logit rows 4..11 only
    assert np.array_equal(prediction.attention["encoder"], np.arange(64.0).reshape(8, 8)[2:6])  # patch rows of the box
    stretched = _predictor("stretch", (slice(4, 12), slice(None))).predict([image], "x")[0]
    assert 0.4 < stretched.mask.mean() < 0.6 and stretched.low_res_probs.shape == (16, 16)  # the same logits, stretched

    # Positive over the left half of the canvas (all rows) → the image's left half, to the pixel.
    [left] = _predictor("letterbox", (slice(None), slice(0, 8))).predict([image], "x")
    expected = np.zeros((64, 128), bool)
    expected[:, :64] = True
    assert np.array_equal(left.mask, expected)


def test_the_predictor_takes_the_recipes_resize(tmp_path):
    from fixtures_predict import make_trained_run
    from shared_ris.predictor import Predictor

    run = make_trained_run(tmp_path, overrides=("data.resize=letterbox",))
    predictor = Predictor.from_checkpoint(run)
    assert predictor.resize == "letterbox"
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 90, 3), dtype=np.uint8))
    [prediction] = predictor.predict([image], "the red circle")
    assert prediction.mask.shape == (30, 90)
