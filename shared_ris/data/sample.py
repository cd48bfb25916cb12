"""One shard sample as untrusted data: members present, JSON of the expected shape, image and
mask decodable within a pixel bound and of the same size. Every failure is one :class:`DataError`
naming the shard and the sample."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .errors import DataError, short_repr
from .targets import is_no_target, mask_is_learnable, target_count, target_count_problem
from .transforms import load_image

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff")
MAX_SAMPLE_PIXELS = 40_000_000  # a COCO image has under 0.4 MP; stops decompression bombs before decoding
FIX = "re-run sris prepare with --overwrite"


@dataclass
class Sample:
    """A checked sample: ``sentences`` is a non-empty list of {"sent_id": int, "sent": str, "raw": str, …}.

    Every ref and sentence of the dataset is kept (evaluation scores them all); what training cannot
    learn from is flagged: a text that is empty (or only spaces) as it stands, a ref whose mask is
    empty by ``"empty_mask": true`` in its JSON (absent means false), unless it is a no-target
    sample (``"target_count": 0``, gRefCOCO), whose empty mask is the answer to learn.
    """

    key: str
    where: str  # the shard, for messages
    image_bytes: bytes
    mask_bytes: bytes
    meta: dict
    sentences: list[dict]

    @property
    def empty_mask(self) -> bool:
        return self.meta.get("empty_mask") is True

    @property
    def target_count(self) -> int:
        """Objects the expressions name: 0 (no target), 1, or more (1 when the JSON does not say)."""
        return target_count(self.meta)

    @property
    def no_target(self) -> bool:
        return is_no_target(self.meta)

    def trainable_texts(self, text_field: str) -> list[str]:
        """The texts training may draw from: none for an unlearnable empty mask, else the non-empty ones."""
        return [s[text_field] for s in self.sentences if s[text_field].strip()] if mask_is_learnable(self.meta) else []

    def fail(self, problem: str) -> DataError:
        return DataError(f"{self.where}: sample {self.key}: {problem}; {FIX}")

    def image(self) -> Image.Image:
        """The image as RGB, EXIF ignored (COCO masks are drawn on the stored pixel grid)."""
        return load_image(self._open(self.image_bytes, "image"), exif_transpose=False)

    def mask(self, size: tuple[int, int]) -> Image.Image:
        """The mask as an 8-bit image, which must be ``size`` = (width, height), the image's size."""
        mask = self._open(self.mask_bytes, "mask.png")
        if mask.size != tuple(size):
            raise self.fail(f"mask.png is {mask.size[0]}x{mask.size[1]} but the image is {size[0]}x{size[1]}")
        return mask if mask.mode in ("L", "1") else mask.convert("L")

    def mask_array(self, size: tuple[int, int]) -> np.ndarray:
        """(H, W) uint8 in {0, 1}."""
        return (np.asarray(self.mask(size).convert("L")) > 127).astype(np.uint8)

    def _open(self, data: bytes, member: str) -> Image.Image:
        try:
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > MAX_SAMPLE_PIXELS:
                raise self.fail(f"{member} claims {width}x{height} pixels, more than {MAX_SAMPLE_PIXELS} (a decompression bomb?)")
            image.load()
            return image
        except DataError:
            raise
        except Exception as exc:  # PIL raises many types for corrupt data, including DecompressionBombError
            raise self.fail(f"{member} cannot be decoded ({type(exc).__name__})") from None


def parse_sample(raw: dict, where: str, text_field: str) -> Sample:
    """A raw shard sample (``__key__`` and bytes per member) → :class:`Sample`, checked."""
    key = raw["__key__"]
    image_key = next((k for k in IMAGE_KEYS if k in raw), None)
    for member, present in (("an image", image_key), ("mask.png", "mask.png" in raw), ("json", "json" in raw)):
        if not present:
            raise DataError(f"{where}: sample {key} has no {member} (members: {', '.join(k for k in raw if k != '__key__')}); {FIX}")
    try:
        meta = json.loads(raw["json"].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"{where}: sample {key}: its json member is not valid UTF-8 JSON ({type(exc).__name__}); {FIX}") from None
    sample = Sample(key, where, raw[image_key], raw["mask.png"], meta if isinstance(meta, dict) else {}, [])
    if not isinstance(meta, dict):
        raise sample.fail("its json member is not an object")
    sample.sentences = _check_sentences(sample, meta.get("sentences"), text_field)
    if not isinstance(meta.get("empty_mask", False), bool):
        raise sample.fail(f"'empty_mask' must be true or false, got {short_repr(meta['empty_mask'])}")
    problem = target_count_problem(meta)
    if problem:
        raise sample.fail(problem)
    return sample


def _check_sentences(sample: Sample, sentences, text_field: str) -> list[dict]:
    if not isinstance(sentences, list) or not sentences:
        raise sample.fail("'sentences' must be a non-empty list")
    for i, sentence in enumerate(sentences):
        if not isinstance(sentence, dict):
            raise sample.fail(f"sentence {i} must be an object with sent_id, sent and raw, got {type(sentence).__name__}")
        sent_id, text = sentence.get("sent_id"), sentence.get(text_field)
        if not isinstance(sent_id, int) or isinstance(sent_id, bool):
            raise sample.fail(f"sentence {i}: 'sent_id' must be an integer, got {sent_id!r}")
        if not isinstance(text, str):  # an empty string is a flagged text: scored, not trained on
            raise sample.fail(f"sentence {sent_id}: '{text_field}' must be a string, got {short_repr(text)}")
    return sentences
