"""The user's door to a trained model: a :class:`Predictor` (load once, ask many), as
segment-anything's ``SamPredictor``. Folders, prompt files and output files are :mod:`.predict`.

The predictor owns the image↔model resizing, as segment-anything's does: an image is resized once
to S×S (bicubic, mean = std = 0.5, as BEiT-3 fine-tuning does), and the mask logits are resized
bilinearly back to the image's own size and thresholded at the recipe's τ.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .checkpoint import load_run
from .data.transforms import image_to_tensor, load_image
from .device import check_device
from .errors import SharedRISError
from .model import SharedRIS, upsample_probabilities
from .tokenizer import Tokenizer


# Decoded pixels allowed per image, read from the header before decoding: 8192 × 8192, which
# admits 64 MP phone photos (9248 × 6936) but not a small file that decodes to gigabytes.
DEFAULT_MAX_PIXELS = 8192 * 8192


class ImageReadError(SharedRISError):
    """An image file that cannot be decoded; ``reason`` says why, without the path."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


class ImageTooLargeError(ImageReadError):
    """An image whose header declares more pixels than the limit; it is never decoded."""


def open_image(
    path: str | Path, max_pixels: int | None = DEFAULT_MAX_PIXELS, before_decode: Callable[[int, int], None] | None = None
) -> Image.Image:
    """Read an image file as 8-bit RGB, rotated as its EXIF orientation says.

    Grayscale, RGBA / LA / transparent palette (composited on white), palette, 16-bit (scaled to
    8 bits, not clipped) and CMYK inputs all come out as RGB. An unreadable file, or one whose
    header declares more than ``max_pixels`` pixels (``None``: no limit but Pillow's own, about
    179 MP), raises :class:`ImageReadError`, whose message is one line naming the file.
    ``before_decode(width, height)`` is called between reading the header and decoding (a caller
    can free memory for the pixels to come).
    """
    path = Path(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the limit that counts is ours
        with _read_errors(path):
            raw = Image.open(path)
        with raw:
            check_pixels(path, raw.size, max_pixels)  # from the header: nothing is decoded yet
            if before_decode is not None:
                before_decode(*raw.size)  # outside _read_errors: its failures are not this file's
            with _read_errors(path):
                return load_image(raw)


@contextlib.contextmanager
def _read_errors(path: Path) -> Iterator[None]:
    """Turn whatever decoding a bad file raises into one :class:`ImageReadError` line."""
    try:
        yield
    except FileNotFoundError:
        raise ImageReadError(path, "file not found") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ImageReadError(path, f"cannot read image ({detail})") from None


def check_pixels(path: Path, size: tuple[int, int], max_pixels: int | None) -> None:
    """Refuse (``ImageTooLargeError``) a header ``size`` = (W, H) over ``max_pixels``."""
    width, height = size
    if max_pixels is not None and width * height > max_pixels:
        reason = f"{width}×{height} = {width * height:,} pixels, over the limit of {max_pixels:,} (--max-pixels)"
        raise ImageTooLargeError(path, reason)


@dataclass
class Prediction:
    """One (image, expression) result.

    Attributes:
        mask: (H, W) bool at the image's own size.
        mean_prob: mean σ over the mask's pixels (0.0 when the mask is empty).
        low_res_probs: (S/4, S/4) float32 probabilities at the model's output size.
        attention: {"encoder", "fpn", "decoder"} → (g, g) text-cls attention over the patches, when asked.
    """

    mask: np.ndarray
    mean_prob: float
    low_res_probs: np.ndarray
    attention: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def area(self) -> int:
        return int(self.mask.sum())


class Predictor:
    """Segment what a text refers to in images.

    Args:
        model: a trained :class:`SharedRIS` (put in eval mode here).
        tokenizer: the tokenizer the model was trained with.
        device: where the model runs; the model is moved there.
        threshold: τ on σ(logits); ``None`` uses ``model.threshold`` (the recipe's).
    """

    def __init__(self, model: SharedRIS, tokenizer: Tokenizer, device: str | torch.device = "cpu", threshold: float | None = None) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.threshold = model.threshold if threshold is None else threshold

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, tokenizer: str | Path | None = None, device: str = "cpu") -> "Predictor":
        """Load a trained run (see :func:`shared_ris.checkpoint.load_run` for the tokenizer search)."""
        check_device(device)
        model, _, text_tokenizer = load_run(checkpoint, tokenizer, device=device)
        return cls(model, text_tokenizer, device)

    @property
    def image_size(self) -> int:
        return self.model.image_size

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """RGB image → (3, S, S) float32 input: one bicubic resize, mean = std = 0.5."""
        return image_to_tensor(image, self.image_size)

    def encode_texts(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Texts → ids (B, T), padding mask (B, T) True = pad; too-long texts are truncated."""
        return self.tokenizer(list(texts))

    def postprocess(self, logits: torch.Tensor, size: tuple[int, int]) -> tuple[np.ndarray, float]:
        """(1, h, w) logits → (mask bool (H, W), mean σ inside the mask) at ``size`` = (H, W).

        One float map at full size is alive at a time: resize, sigmoid and masking run in place.
        """
        probs = upsample_probabilities(logits, size)
        mask = probs > self.threshold
        area = int(mask.sum())
        mean_prob = float(probs.mul_(mask).sum() / area) if area else 0.0
        return mask.numpy(), mean_prob

    @torch.no_grad()
    def predict_tensors(
        self, pixels: torch.Tensor, sizes: Sequence[tuple[int, int]], texts: Sequence[str], attention: bool = False
    ) -> list[Prediction]:
        """Preprocessed images (B, 3, S, S), their original (H, W) and one text each → predictions."""
        if not (len(pixels) == len(sizes) == len(texts)):
            raise ValueError(f"got {len(pixels)} images, {len(sizes)} sizes and {len(texts)} texts")
        ids, padding = self.encode_texts(texts)
        inputs = (pixels.to(self.device), ids.to(self.device), padding.to(self.device))
        logits, maps = self.model.attention_maps(*inputs) if attention else (self.model(*inputs), {})
        logits = logits.float().cpu()
        maps = {k: v.float().cpu().numpy() for k, v in maps.items()}
        results = []
        for i, size in enumerate(sizes):
            mask, mean_prob = self.postprocess(logits[i], size)
            results.append(Prediction(mask, mean_prob, logits[i, 0].sigmoid().numpy(), {k: v[i] for k, v in maps.items()}))
        return results

    def predict(self, images: Sequence[Image.Image], texts: Sequence[str] | str, attention: bool = False) -> list[Prediction]:
        """RGB images and one text each (or one text for all) → one :class:`Prediction` per image."""
        texts = [texts] * len(images) if isinstance(texts, str) else list(texts)
        pixels = torch.stack([self.preprocess(image) for image in images])
        return self.predict_tensors(pixels, [(image.height, image.width) for image in images], texts, attention)
